//! The JSON behind the status page, public API too (README documents it):
//! `/api/workers`, `/api/jobs?state=waiting,running,finished`, `/api/jobs/ID` and
//! `/api/flow`. Every list is bounded: waiting jobs by [`WAITING_LISTED`] (with the
//! total), running ones by the dispatch threads, finished ones by `--finished-jobs`.

use serde_json::{json, Value};

use super::Sources;
use crate::job::Outcome;
use crate::metrics::WaitingJob;

/// The most waiting jobs listed (those waiting longest); `total` counts them all.
pub const WAITING_LISTED: usize = 200;

/// The job lists `/api/jobs` can give.
const STATES: [&str; 3] = ["waiting", "running", "finished"];

/// `/api/workers`.
pub fn workers(sources: &Sources) -> Value {
    let workers: Vec<Value> = sources
        .registry
        .list()
        .iter()
        .map(|w| w.to_api_json())
        .collect();
    json!({"orchestratorId": sources.instance_id, "workers": workers})
}

fn waiting_json(job: &WaitingJob) -> Value {
    json!({
        "jobId": job.job_id,
        "state": "waiting",
        "labels": job.labels,
        "ageMs": u64::try_from(job.age.as_millis()).unwrap_or(u64::MAX),
    })
}

/// `/api/jobs` with its query (`state=` a comma-separated subset of waiting, running,
/// finished; none: all three); an unknown state is an error.
pub fn jobs(sources: &Sources, query: &str) -> Result<Value, String> {
    let mut wanted: Vec<&str> = Vec::new();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if key != "state" {
            continue;
        }
        for state in value.split(',').filter(|s| !s.is_empty()) {
            match STATES.iter().find(|s| **s == state) {
                Some(known) => wanted.push(known),
                None => {
                    return Err(
                        "unknown job state: state= takes waiting, running and finished".into(),
                    )
                }
            }
        }
    }
    if wanted.is_empty() {
        wanted = STATES.to_vec();
    }
    let board = &sources.metrics.board;
    let mut value = json!({"orchestratorId": sources.instance_id});
    if wanted.contains(&"waiting") {
        let (total, jobs) = sources.metrics.load.waiting_jobs(WAITING_LISTED);
        let jobs: Vec<Value> = jobs.iter().map(waiting_json).collect();
        value["waiting"] = json!({"total": total, "jobs": jobs});
    }
    if wanted.contains(&"running") {
        let jobs: Vec<Value> = board.running().iter().map(|j| j.to_json()).collect();
        value["running"] = json!({"total": jobs.len(), "jobs": jobs});
    }
    if wanted.contains(&"finished") {
        let jobs: Vec<Value> = board.finished().iter().map(|j| j.to_json(false)).collect();
        value["finished"] = json!({"limit": board.finished_limit(), "jobs": jobs});
    }
    Ok(value)
}

/// `/api/jobs/ID`: a running or finished job with its events and the tail of its
/// output, or a waiting one; `None` when this orchestrator holds none by that id.
pub fn job(sources: &Sources, job_id: &str) -> Option<Value> {
    if let Some(job) = sources.metrics.board.job_json(job_id) {
        return Some(job);
    }
    let (_, waiting) = sources.metrics.load.waiting_jobs(usize::MAX);
    waiting
        .iter()
        .find(|job| job.job_id == job_id)
        .map(waiting_json)
}

/// `/api/flow`: the last hour minute by minute (oldest first), statuses by outcome
/// since start, the broker connection and this orchestrator's id.
pub fn flow(sources: &Sources) -> Value {
    let metrics = &sources.metrics;
    let minutes: Vec<Value> = metrics
        .board
        .hour()
        .iter()
        .map(|m| {
            json!({
                "received": m.received, "finished": m.finished,
                "waitMsMean": m.wait_ms_mean(), "waitMsMax": m.wait_ms_max,
            })
        })
        .collect();
    let outcomes: serde_json::Map<String, Value> = outcome_counts(sources)
        .into_iter()
        .map(|(word, n)| (word.to_string(), n.into()))
        .collect();
    json!({
        "orchestratorId": sources.instance_id,
        "broker": {
            "connected": metrics.broker_connected.get() == 1,
            "blocked": metrics.broker_blocked.get() == 1,
            "node": metrics.broker_in_use(),
        },
        "received": metrics.jobs_received.get(),
        "outcomes": outcomes,
        "minutes": minutes,
    })
}

/// Statuses published since start, by outcome.
pub fn outcome_counts(sources: &Sources) -> Vec<(&'static str, u64)> {
    Outcome::ALL
        .iter()
        .map(|o| {
            let word = o.word();
            let count = sources
                .metrics
                .jobs_finished
                .with_label_values(&[word])
                .get();
            (word, count)
        })
        .collect()
}
