//! The other untrusted inputs of `src/job.rs`, from the same bytes:
//!
//! - `decode_cancel` on the bytes as a message on `cancel.queue`: a valid jobId (the
//!   message's own) or a known reason quoting none of the message's values;
//! - a status built as `dispatch::answered` builds it from a worker's answer, with the
//!   bytes split at `0xFF` (never in UTF-8) into token, logs, error and jobId: its JSON
//!   parses back to the same jobId, logs and error, and the token appears in it only
//!   where it cannot come from the logs or error;
//! - `Secret::redact` on the first two parts: the secret never survives it, unless it is
//!   too short to be a real token (`MIN_REDACTED_LEN`), and then the text is unchanged.
#![no_main]

use std::time::{Duration, SystemTime};

use blacktree_fuzz::job::{decode_cancel, Outcome, Secret, Status};
use blacktree_fuzz::{
    assert_valid_job_id, check_reason, escape_tails, occurrences, syntax_error_at, ReasonNumbers,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    cancel(data);
    let mut parts = data.split(|&b| b == 0xFF).map(String::from_utf8_lossy);
    let mut next = || parts.next().unwrap_or_default().into_owned();
    let (token, logs, error, job_id) = (next(), next(), next(), next());
    redact(&token, &logs);
    status(data, &token, &logs, &error, &job_id);
});

fn cancel(data: &[u8]) {
    match decode_cancel(data) {
        Ok(id) => {
            assert_valid_job_id(&id);
            let message: Value = serde_json::from_slice(data).expect("accepted as JSON");
            assert_eq!(
                message.get("jobId").and_then(Value::as_str),
                Some(id.as_str())
            );
        }
        Err(rejection) => {
            assert_eq!(rejection.job_id, None);
            let numbers = ReasonNumbers {
                size_and_limit: None,
                syntax_error_at: syntax_error_at(data),
            };
            check_reason(&rejection.reason, data, &numbers, true);
        }
    }
}

/// Whether a secret is left alone by design: too short to be a real token.
fn unredactable(secret: &str) -> bool {
    !Secret::new(secret.to_string()).is_redacted()
}

fn redact(secret: &str, text: &str) {
    let redacted = Secret::new(secret.to_string()).redact(text);
    if !unredactable(secret) {
        assert!(
            !redacted.contains(secret),
            "{secret:?} survives in {redacted:?} (from {text:?})"
        );
    }
    if unredactable(secret) || !text.contains(secret) {
        assert_eq!(redacted, text, "text changed without a secret in it");
    }
}

fn status(data: &[u8], token: &str, logs: &str, error: &str, job_id: &str) {
    let token = Secret::new(token.to_string());
    let success = data.first().is_some_and(|b| b & 1 == 1);
    let worker = "builder-3";
    // As dispatch::answered does with a worker's JobResponse.
    let mut status = Status {
        job_id: job_id.to_string(),
        success,
        logs: token.redact(logs),
        image_url: if success {
            "registry.internal:5000/acme/app:1.2".to_string()
        } else {
            String::new()
        },
        error: token.redact(error),
        worker_id: worker.to_string(),
        outcome: if success {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        },
        ..Status::without_answer(job_id, Outcome::Failed, worker, String::new())
    };
    if data.last().is_some_and(|b| b & 2 != 0) {
        status = status.started(SystemTime::now() - Duration::from_millis(1500));
    }
    let json = status.to_json();
    let parsed: Value = serde_json::from_slice(&json).expect("a status is JSON");
    assert_eq!(parsed["jobId"].as_str(), Some(job_id));
    assert_eq!(parsed["logs"].as_str(), Some(status.logs.as_str()));
    assert_eq!(parsed["error"].as_str(), Some(status.error.as_str()));
    assert_eq!(parsed["success"].as_bool(), Some(success));

    let secret = token.expose();
    if unredactable(secret) {
        return;
    }
    for (field, value) in [("logs", &parsed["logs"]), ("error", &parsed["error"])] {
        let value = value.as_str().unwrap_or_default();
        assert!(
            !value.contains(secret),
            "the token is in the status's {field}: {value:?}"
        );
    }
    // The JSON text itself. The token may be there when the status without logs and error
    // (jobId, worker, field names, outcome, times) contains it. Otherwise, as it has no
    // quote, every occurrence lies inside the logs or error string; unless the token has
    // characters JSON escapes, an occurrence is only harmless when it starts inside an
    // escape sequence (a token "nabc" in the `\nabc` of logs "\nabc").
    let bare = Status {
        logs: String::new(),
        error: String::new(),
        ..status.clone()
    }
    .to_json();
    let escaped = |c: char| c == '"' || c == '\\' || u32::from(c) < 0x20;
    if occurrences(&bare, secret.as_bytes()).is_empty() && !secret.chars().any(escaped) {
        let tails = escape_tails(&json);
        for at in occurrences(&json, secret.as_bytes()) {
            assert!(
                tails[at],
                "the token is at byte {at} of {:?}",
                String::from_utf8_lossy(&json)
            );
        }
    }
}
