//! Lifecycle events (`received`, `dispatched`, `adopted`, `finished`), published on the
//! events routing key when `--events-key` is set.

use std::time::SystemTime;

use serde::Serialize;

use super::rfc3339;

/// A step of a job's life, as lifecycle events report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The orchestrator consumed the job.
    Received,
    /// The job was sent to a worker.
    Dispatched,
    /// The job, redelivered, was taken over from the worker that already ran it.
    Adopted,
    /// The job ended; its status follows.
    Finished,
}

/// A lifecycle event, published on the events routing key when enabled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// The job's id.
    pub job_id: String,
    /// What happened.
    pub event: EventKind,
    /// The worker involved (empty for `received`).
    pub worker_id: String,
    /// When (RFC 3339).
    pub at: String,
    /// The orchestrator that published it (`--instance-id`; set by its publisher).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub orchestrator_id: String,
}

impl Event {
    /// An event that happens now.
    pub fn now(job_id: &str, event: EventKind, worker_id: &str) -> Event {
        Event {
            job_id: job_id.to_string(),
            event,
            worker_id: worker_id.to_string(),
            at: rfc3339(SystemTime::now()),
            orchestrator_id: String::new(),
        }
    }

    /// The JSON body of the event message.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serialises")
    }
}
