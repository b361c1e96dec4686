//! The status page (`GET /` on `--metrics-listen`) and a job's page (`/jobs/ID`): HTML
//! from askama templates (`templates/`), checked when the crate compiles and escaping
//! every value, since ids, labels, errors and log lines come from peers. The page
//! refreshes itself every few seconds with a `<meta>` tag: no script at all. Its data
//! is the JSON API's (`page::api`).

mod api;
mod chart;

use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use serde_json::Value;

use super::registry::{Registry, WorkerView};
use crate::metrics::{Metrics, RunningView, WaitingJob};
use crate::web::Reply;
pub use api::WAITING_LISTED;

/// How often the page reloads itself, in seconds.
const REFRESH_SECONDS: u32 = 5;

/// How long a worker counts as having just gone unhealthy (its row stands out).
const RECENT: Duration = Duration::from_secs(60);

/// What the page and the API read.
pub struct Sources {
    /// The counters, the waiting jobs and the jobs' board.
    pub metrics: Arc<Metrics>,
    /// The workers.
    pub registry: Arc<Registry>,
    /// This orchestrator's instance id.
    pub instance_id: String,
}

/// `d` in a short human form: `850ms`, `12s`, `3m 04s`, `2h 05m`.
fn short(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, secs / 60 % 60),
    }
}

/// A worker's row.
struct WorkerRow {
    view: WorkerView,
    /// What the state cell says (`busy (withheld)` for a withheld worker).
    state: String,
    /// Went unhealthy within the last minute.
    recent: bool,
    last_ping: String,
}

/// A waiting job's row.
struct WaitingRow {
    job: WaitingJob,
    age: String,
}

/// A running job's row.
struct RunningRow {
    job: RunningView,
    elapsed: String,
    deadline: String,
}

/// A finished job's row.
struct FinishedRow {
    job_id: String,
    outcome: &'static str,
    worker: String,
    duration: String,
    finished_at: String,
    error: String,
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage<'a> {
    instance_id: &'a str,
    refresh: u32,
    broker_connected: bool,
    broker_blocked: bool,
    broker_node: String,
    workers: Vec<WorkerRow>,
    waiting_total: usize,
    waiting: Vec<WaitingRow>,
    running: Vec<RunningRow>,
    finished: Vec<FinishedRow>,
    finished_limit: usize,
    outcomes: Vec<(&'static str, u64)>,
    received: u64,
    charts: Vec<chart::Chart>,
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage<'a> {
    instance_id: &'a str,
    refresh: u32,
    job_id: &'a str,
    state: String,
    fields: Vec<(String, String)>,
    events: Vec<(String, String, String)>,
    log_tail: Vec<String>,
}

fn html(page: impl Template) -> Reply {
    match page.render() {
        Ok(body) => Reply::new(200, "text/html; charset=utf-8", body),
        Err(e) => Reply::text(500, format!("rendering the page: {e}\n")),
    }
}

/// `GET /`: workers, jobs and the flow at a glance.
pub fn index(sources: &Sources) -> Reply {
    let metrics = &sources.metrics;
    let workers = sources
        .registry
        .list()
        .into_iter()
        .map(|view| WorkerRow {
            state: if view.withheld {
                format!("{} (withheld)", view.state)
            } else {
                view.state_text()
            },
            recent: view.unhealthy_for.is_some_and(|d| d < RECENT),
            last_ping: view.last_ping.map_or("never".into(), |d| short(d) + " ago"),
            view,
        })
        .collect();
    let (waiting_total, waiting) = metrics.load.waiting_jobs(WAITING_LISTED);
    let waiting = waiting
        .into_iter()
        .map(|job| WaitingRow {
            age: short(job.age),
            job,
        })
        .collect();
    let running = metrics
        .board
        .running()
        .into_iter()
        .map(|job| RunningRow {
            elapsed: short(job.elapsed),
            deadline: short(job.deadline),
            job,
        })
        .collect();
    let finished = metrics
        .board
        .finished()
        .iter()
        .map(|job| FinishedRow {
            job_id: job.status.job_id.clone(),
            outcome: job.status.outcome.word(),
            worker: job.status.worker_id.clone(),
            duration: short(Duration::from_millis(job.status.duration_ms)),
            finished_at: job.status.finished_at.clone(),
            error: job.error_line().to_string(),
        })
        .collect();
    html(IndexPage {
        instance_id: &sources.instance_id,
        refresh: REFRESH_SECONDS,
        broker_connected: metrics.broker_connected.get() == 1,
        broker_blocked: metrics.broker_blocked.get() == 1,
        broker_node: metrics.broker_in_use(),
        workers,
        waiting_total,
        waiting,
        running,
        finished,
        finished_limit: metrics.board.finished_limit(),
        outcomes: api::outcome_counts(sources),
        received: metrics.jobs_received.get(),
        charts: chart::charts(&metrics.board.hour()),
    })
}

/// A JSON value as a table cell: strings as they are, the rest as JSON.
fn cell(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `GET /jobs/ID`: one job's fields, events and output (404 when this orchestrator
/// holds no job by that id).
pub fn job(sources: &Sources, job_id: &str) -> Reply {
    let Some(value) = api::job(sources, job_id) else {
        return Reply::text(
            404,
            "no such job here (it may have left the finished list)\n",
        );
    };
    let state = cell(&value["state"]);
    let mut fields = Vec::new();
    let status = value.get("status").and_then(Value::as_object);
    let top = value.as_object().into_iter().flatten();
    for (key, field) in top.chain(status.into_iter().flatten()) {
        if !matches!(key.as_str(), "events" | "logTail" | "status" | "logs") {
            fields.push((key.clone(), cell(field)));
        }
    }
    let events = value["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (cell(&e["event"]), cell(&e["at"]), cell(&e["workerId"])))
        .collect();
    let log_tail = value["logTail"]
        .as_array()
        .into_iter()
        .flatten()
        .map(cell)
        .collect();
    html(JobPage {
        instance_id: &sources.instance_id,
        refresh: if state == "finished" {
            0
        } else {
            REFRESH_SECONDS
        },
        job_id,
        state,
        fields,
        events,
        log_tail,
    })
}

/// The `/api/…` routes.
pub fn api(sources: &Sources, path: &str, query: &str) -> Reply {
    match path {
        "/api/workers" => Reply::json(200, &api::workers(sources)),
        "/api/jobs" => match api::jobs(sources, query) {
            Ok(value) => Reply::json(200, &value),
            Err(e) => Reply::text(400, e + "\n"),
        },
        "/api/flow" => Reply::json(200, &api::flow(sources)),
        _ => match path.strip_prefix("/api/jobs/").map(decode) {
            Some(id) => match api::job(sources, &id) {
                Some(value) => Reply::json(200, &value),
                None => Reply::not_found(),
            },
            None => Reply::not_found(),
        },
    }
}

/// A path segment, percent-decoded (invalid UTF-8 replaced).
pub fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_short() {
        assert_eq!(short(Duration::from_millis(850)), "850ms");
        assert_eq!(short(Duration::from_secs(12)), "12s");
        assert_eq!(short(Duration::from_secs(184)), "3m 04s");
        assert_eq!(short(Duration::from_secs(7500)), "2h 05m");
        assert_eq!(decode("a%3Cb%3E%2Fc"), "a<b>/c");
    }
}
