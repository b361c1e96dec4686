//! Statuses that fit the broker. A status larger than `--max-status-bytes` loses the
//! start of its logs (their end says how the build ended) and says how much was cut; a
//! status the broker refuses all the same can be sent without logs at all.

use super::Status;

/// At most this much of an `error` is kept when a status must shrink: an error is a
/// message, not a log (the deployed Go workers put whole outputs in it).
const MAX_ERROR_BYTES: usize = 16 * 1024;

impl Status {
    /// Its JSON, at most `max` bytes: the error is cut to [`MAX_ERROR_BYTES`] and the
    /// logs keep the longest tail that fits, after a line that says how many bytes were
    /// cut. (Only a status whose other fields alone exceed `max` stays larger.)
    pub fn to_json_within(&self, max: usize) -> Vec<u8> {
        let json = self.to_json();
        if json.len() <= max {
            return json;
        }
        let mut fitted = self.clone();
        fitted.error = head(&self.error, MAX_ERROR_BYTES);
        fitted.logs = String::new();
        // Room for the kept logs as JSON, once the rest and the marker line are in.
        let budget = max.saturating_sub(fitted.to_json().len() + MARKER_ROOM);
        let (mut start, mut used) = (self.logs.len(), 0);
        for (i, c) in self.logs.char_indices().rev() {
            used += json_len(c);
            if used > budget {
                break;
            }
            start = i;
        }
        fitted.logs = format!(
            "[... {start} earlier bytes of logs cut: the status exceeded --max-status-bytes ...]\n{}",
            &self.logs[start..]
        );
        fitted.to_json()
    }
}

/// A status's JSON without its logs, its error saying `why` (for a status the broker
/// refused as it was); `None` when `json` is not a status object. Worked out only when
/// needed, from the JSON that was published, so the common path pays nothing for it.
pub fn status_without_logs(json: &[u8], why: &str) -> Option<Vec<u8>> {
    let mut status: serde_json::Value = serde_json::from_slice(json).ok()?;
    let fields = status.as_object_mut()?;
    let error = fields.get("error").and_then(|e| e.as_str()).unwrap_or("");
    let error = if error.is_empty() {
        why.to_string()
    } else {
        format!("{why}; {}", head(error, 1024))
    };
    fields.insert("error".into(), error.into());
    fields.insert("logs".into(), "".into());
    serde_json::to_vec(&status).ok()
}

/// Room for the line that says how much of the logs was cut, as JSON.
const MARKER_ROOM: usize = 128;

/// The bytes `c` takes in a JSON string, as serde_json writes it.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The first `max` bytes of `text` (on a character boundary), marked when cut.
fn head(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} [... cut]", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Outcome;

    fn status(logs: String, error: String) -> Status {
        Status {
            logs,
            error,
            ..Status::without_answer("j1", Outcome::Failed, "w1", String::new())
        }
    }

    #[test]
    fn a_large_status_keeps_the_tail_of_its_logs_and_fits() {
        let logs = format!("{}THE END", "é\n\u{1}".repeat(200_000));
        let json = status(logs, "x".repeat(100_000)).to_json_within(64 * 1024);
        assert!(json.len() <= 64 * 1024, "{}", json.len());
        let fitted: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let logs = fitted["logs"].as_str().unwrap();
        assert!(
            logs.starts_with("[... ") && logs.ends_with("THE END"),
            "{logs:.120}"
        );
        assert!(
            logs.len() > 10_000,
            "as much of the tail as fits: {}",
            logs.len()
        );
        assert!(fitted["error"].as_str().unwrap().ends_with("[... cut]"));
        let small = status("short".into(), String::new());
        assert_eq!(small.to_json_within(64 * 1024), small.to_json());
    }

    #[test]
    fn a_status_without_logs_says_why() {
        let json = status("logs".into(), "boom".into()).to_json();
        let shrunk: serde_json::Value =
            serde_json::from_slice(&status_without_logs(&json, "refused").unwrap()).unwrap();
        assert_eq!(
            (&shrunk["logs"], &shrunk["error"]),
            (&"".into(), &"refused; boom".into())
        );
        assert_eq!(shrunk["jobId"], "j1");
        assert_eq!(status_without_logs(b"[1]", "refused"), None);
    }
}
