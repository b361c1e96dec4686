//! Output of a job's steps: the tail kept for the answer's `logs`, and every line for
//! the callers that stream them ([`LiveLog`]); secrets redacted in both.

use super::super::live_log::{Lines, LiveLog};
use crate::job::Secret;

/// Output of a job's steps: the last `max` bytes, secrets redacted.
pub(super) struct JobLog<'a> {
    bytes: Vec<u8>,
    max: usize,
    secrets: Vec<Secret>,
    cut: usize,
    live: &'a LiveLog,
    lines: Lines,
}

impl<'a> JobLog<'a> {
    pub(super) fn new(max: usize, secrets: Vec<Secret>, live: &'a LiveLog) -> JobLog<'a> {
        JobLog {
            bytes: Vec::new(),
            max,
            secrets,
            cut: 0,
            live,
            lines: Lines::default(),
        }
    }

    /// `text` with every secret of the job redacted.
    pub(super) fn redact(&self, text: &str) -> String {
        redact_all(&self.secrets, text)
    }

    fn longest_secret(&self) -> usize {
        self.secrets
            .iter()
            .map(|s| s.expose().len())
            .max()
            .unwrap_or(0)
    }

    /// Keeps a margin beyond `max` so a secret cut in half at the front still gets
    /// redacted before the final cut.
    pub(super) fn push(&mut self, data: &[u8]) {
        let longest = self.longest_secret();
        let secrets = &self.secrets;
        let lines = self
            .lines
            .feed(data, longest, |line| redact_all(secrets, line));
        self.live.push(lines);
        self.bytes.extend_from_slice(data);
        let keep = self.max + longest;
        if self.bytes.len() > keep * 2 {
            let drop = self.bytes.len() - keep;
            self.bytes.drain(..drop);
            self.cut += drop;
        }
    }

    pub(super) fn note(&mut self, text: &str) {
        self.push(text.as_bytes());
    }

    pub(super) fn finish(mut self) -> String {
        let secrets = &self.secrets;
        let rest = self.lines.finish(|line| redact_all(secrets, line));
        self.live.push(rest);
        let mut text = self.redact(&String::from_utf8_lossy(&self.bytes));
        let mut cut = self.cut;
        if text.len() > self.max {
            let mut start = text.len() - self.max;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            cut += start;
            text.drain(..start);
        }
        if cut > 0 {
            text.insert_str(0, &format!("[... {cut} earlier bytes of output cut ...]\n"));
        }
        text
    }
}

/// `text` with every one of `secrets` redacted.
fn redact_all(secrets: &[Secret], text: &str) -> String {
    let mut text = text.to_string();
    for secret in secrets {
        text = secret.redact(&text);
    }
    text
}
