//! `Job::decode` on arbitrary bytes, as a message on `execute.queue`.
//!
//! Properties: it never panics; an accepted job has a valid jobId (non-blank, at most
//! `MAX_JOB_ID_LEN` bytes and an AMQP `message_id`, no control characters), the message's
//! own, and survives `to_json` and decoding again; a rejection's reason is one of the
//! known wordings and quotes none of the message's values (above all not its
//! `githubToken`); a rejection's jobId is valid and is the one a full decode reads,
//! whatever the size limit.
#![no_main]

use blacktree_fuzz::job::{Job, Rejection};
use blacktree_fuzz::{
    assert_valid_job_id, check_reason, syntax_error_at, ReasonKind, ReasonNumbers,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The orchestrator's limit is 1 MiB; anything the fuzzer makes fits 64 KiB.
const LIMIT: usize = 64 * 1024;

/// The worker's `timeoutSeconds` is a uint32, and grpcio turns the deadline into an i64.
const MOST_TIMEOUT_SECONDS: u64 = u32::MAX as u64;

fuzz_target!(|data: &[u8]| {
    let full = check(data, LIMIT);
    // A small limit taken from the first byte, so that the oversized path (which only
    // scans for the jobId) runs too; it must read the same jobId as a full decode.
    if let Some(&first) = data.first() {
        let small = check(data, usize::from(first));
        if data.len() > usize::from(first) {
            let read = |r: &Result<Job, Rejection>| match r {
                Ok(job) => Some(job.job_id.clone()),
                Err(rejection) => rejection.job_id.clone(),
            };
            let (full_id, small_id) = (read(&full), read(&small));
            if full_id.is_some() || serde_json::from_slice::<Value>(data).is_ok() {
                assert_eq!(small_id, full_id, "the oversized path read another jobId");
            }
        }
    }
});

fn check(data: &[u8], limit: usize) -> Result<Job, Rejection> {
    let decoded = Job::decode(data, limit);
    let message = serde_json::from_slice::<Value>(data).ok();
    let message_id = message
        .as_ref()
        .and_then(|m| m.as_object())
        .and_then(|fields| fields.get("jobId"))
        .and_then(Value::as_str);
    match &decoded {
        Ok(job) => {
            assert!(data.len() <= limit, "accepted a message above the limit");
            assert_valid_job_id(&job.job_id);
            assert_eq!(
                message_id,
                Some(job.job_id.as_str()),
                "not the message's jobId"
            );
            if let Some(t) = job.timeout_seconds {
                assert!(
                    (1..=MOST_TIMEOUT_SECONDS).contains(&t),
                    "timeoutSeconds {t} kept"
                );
            }
            let encoded = serde_json::to_vec(&job.to_json()).expect("a job serialises");
            if encoded.len() <= limit {
                assert_eq!(
                    Job::decode(&encoded, limit).as_ref(),
                    Ok(job),
                    "no round trip"
                );
            }
        }
        Err(rejection) => {
            let oversized = data.len() > limit;
            let numbers = ReasonNumbers {
                size_and_limit: oversized.then_some((data.len(), limit)),
                syntax_error_at: syntax_error_at(data),
            };
            let kind = check_reason(&rejection.reason, data, &numbers, false);
            assert_eq!(kind == ReasonKind::Oversized, oversized, "{rejection:?}");
            if let Some(id) = &rejection.job_id {
                assert_valid_job_id(id);
                assert_ne!(kind, ReasonKind::JobId, "{rejection:?}");
                if message.is_some() {
                    assert_eq!(message_id, Some(id.as_str()), "not the message's jobId");
                }
            } else if !oversized && kind == ReasonKind::Field {
                panic!("a readable jobId was dropped: {rejection:?}");
            }
        }
    }
    decoded
}
