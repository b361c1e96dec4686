//! What the status page shows of jobs beyond the counters: those running on workers
//! (with their step and last lines of output when live logs are on), the last finished
//! ones (a ring of `--finished-jobs`), and the flow minute by minute over the last hour.
//! Everything here is bounded: running jobs by the dispatch threads, their lines by
//! [`TAIL_LINES`], finished jobs by the ring, their text by [`TEXT_BYTES`].
//!
//! A job that reached a worker is recorded as finished by its dispatch thread
//! ([`Running::finish`], with its run's facts); one that never did (rejected, cancelled
//! or given up while it waited) by the publisher ([`Board::finished_unstarted`]).

mod flow;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

pub use flow::{Minute, MINUTES};

use crate::job::{rfc3339, Status};

/// The lines of live output kept per running job.
pub const TAIL_LINES: usize = 40;

/// The bytes kept of a line of live output, of an error and of a finished job's logs.
pub const TEXT_BYTES: usize = 4096;

/// The default length of the finished jobs' ring (`--finished-jobs`).
pub const DEFAULT_FINISHED: usize = 100;

/// A job on a worker now.
#[derive(Debug, Clone)]
struct RunningJob {
    worker: String,
    labels: String,
    adopted: bool,
    received: SystemTime,
    started: SystemTime,
    started_instant: Instant,
    deadline: Duration,
    /// The step its output last announced (`$ git clone` → `git clone`).
    step: String,
    tail: VecDeque<String>,
}

/// A running job, as the page lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningView {
    /// Its id.
    pub job_id: String,
    /// The worker it runs on.
    pub worker: String,
    /// The labels it required (`k=v,…`).
    pub labels: String,
    /// The step its output last announced (empty: not known).
    pub step: String,
    /// How long it has run.
    pub elapsed: Duration,
    /// Its deadline, from its start.
    pub deadline: Duration,
    /// When it reached its worker (RFC 3339).
    pub started_at: String,
}

/// A finished job, as the page lists it.
#[derive(Debug, Clone)]
pub struct FinishedJob {
    /// The status it ended with, its logs cut to their last [`TEXT_BYTES`].
    pub status: Status,
    /// The labels it required (`k=v,…`; empty: none).
    pub labels: String,
    /// When it was consumed, when it reached its worker and whether it was adopted
    /// there; `None` for a job that never reached one.
    pub run: Option<(SystemTime, SystemTime, bool)>,
}

/// The jobs' side of the status page.
#[derive(Debug)]
pub struct Board {
    running: Mutex<HashMap<String, RunningJob>>,
    finished: Mutex<VecDeque<Arc<FinishedJob>>>,
    finished_limit: usize,
    flow: Mutex<flow::Flow>,
}

impl Default for Board {
    fn default() -> Board {
        Board::new(DEFAULT_FINISHED)
    }
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail_of(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The first `max` bytes of `text`, cut at a character boundary.
fn head_of(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("status board lock")
}

impl Board {
    /// A board keeping the last `finished_limit` finished jobs.
    pub fn new(finished_limit: usize) -> Board {
        Board {
            running: Mutex::default(),
            finished: Mutex::new(VecDeque::with_capacity(finished_limit.min(1024))),
            finished_limit,
            flow: Mutex::new(flow::Flow::new(Instant::now())),
        }
    }

    /// A job was consumed.
    pub fn received(&self) {
        lock(&self.flow).received(Instant::now());
    }

    /// The job `job_id` (consumed at `received`, requiring `labels`) went to `worker`
    /// with `deadline`; it shows as running until the returned value is dropped or
    /// finished.
    pub fn start(
        self: &Arc<Board>,
        job_id: &str,
        worker: &str,
        labels: String,
        received: Instant,
        deadline: Duration,
        adopted: bool,
    ) -> Running {
        let now = Instant::now();
        let wait = now.saturating_duration_since(received);
        lock(&self.flow).waited(now, wait);
        let started = SystemTime::now();
        let job = RunningJob {
            worker: worker.to_string(),
            labels,
            adopted,
            received: started.checked_sub(wait).unwrap_or(started),
            started,
            started_instant: now,
            deadline,
            step: String::new(),
            tail: VecDeque::new(),
        };
        lock(&self.running).insert(job_id.to_string(), job);
        Running {
            board: self.clone(),
            job_id: job_id.to_string(),
        }
    }

    /// Lines of a running job's live output: the last step announced and the last
    /// [`TAIL_LINES`] lines are kept.
    pub fn lines(&self, job_id: &str, lines: &[String]) {
        let mut running = lock(&self.running);
        let Some(job) = running.get_mut(job_id) else {
            return;
        };
        let skip = lines.len().saturating_sub(TAIL_LINES);
        for line in &lines[skip..] {
            if job.tail.len() == TAIL_LINES {
                job.tail.pop_front();
            }
            job.tail.push_back(head_of(line, TEXT_BYTES).to_string());
        }
        if let Some(step) = lines.iter().rev().find_map(|l| l.strip_prefix("$ ")) {
            job.step = head_of(step.trim_end(), 200).to_string();
        }
    }

    /// A job that never reached a worker ended with `status`.
    pub fn finished_unstarted(&self, status: &Status) {
        self.push_finished(FinishedJob {
            status: Board::kept(status),
            labels: String::new(),
            run: None,
        });
    }

    /// `status`, with its logs and error cut to what the board keeps.
    fn kept(status: &Status) -> Status {
        // Field by field: cloning the whole status would copy up to a MiB of logs.
        Status {
            job_id: status.job_id.clone(),
            deployment_id: status.deployment_id.clone(),
            success: status.success,
            logs: tail_of(&status.logs, TEXT_BYTES).to_string(),
            image_url: status.image_url.clone(),
            error: head_of(&status.error, TEXT_BYTES).to_string(),
            worker_id: status.worker_id.clone(),
            outcome: status.outcome,
            started_at: status.started_at.clone(),
            finished_at: status.finished_at.clone(),
            duration_ms: status.duration_ms,
            orchestrator_id: status.orchestrator_id.clone(),
        }
    }

    fn push_finished(&self, job: FinishedJob) {
        lock(&self.flow).finished(Instant::now());
        if self.finished_limit == 0 {
            return;
        }
        let mut finished = lock(&self.finished);
        if finished.len() == self.finished_limit {
            finished.pop_back();
        }
        finished.push_front(Arc::new(job));
    }

    /// The last finished jobs, newest first.
    pub fn finished(&self) -> Vec<Arc<FinishedJob>> {
        lock(&self.finished).iter().cloned().collect()
    }

    /// The length of the finished jobs' ring.
    pub fn finished_limit(&self) -> usize {
        self.finished_limit
    }

    /// The running jobs, longest running first.
    pub fn running(&self) -> Vec<RunningView> {
        let running = lock(&self.running);
        let mut jobs: Vec<RunningView> = running
            .iter()
            .map(|(id, job)| RunningView::of(id, job))
            .collect();
        jobs.sort_by(|a, b| (b.elapsed, &a.job_id).cmp(&(a.elapsed, &b.job_id)));
        jobs
    }

    /// One job as `/api/jobs/ID` shows it, if it runs or is among the finished ones.
    pub fn job_json(&self, job_id: &str) -> Option<Value> {
        if let Some(job) = lock(&self.running).get(job_id) {
            let mut value = RunningView::of(job_id, job).to_json();
            let dispatched = if job.adopted { "adopted" } else { "dispatched" };
            value["events"] = json!([
                {"event": "received", "at": rfc3339(job.received), "workerId": ""},
                {"event": dispatched, "at": rfc3339(job.started), "workerId": job.worker},
            ]);
            value["logTail"] = json!(job.tail);
            return Some(value);
        }
        let finished = lock(&self.finished);
        let job = finished.iter().find(|j| j.status.job_id == job_id)?;
        Some(job.to_json(true))
    }

    /// The last hour, minute by minute, oldest first.
    pub fn hour(&self) -> Vec<Minute> {
        lock(&self.flow).hour(Instant::now())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RunningView {
    fn of(job_id: &str, job: &RunningJob) -> RunningView {
        RunningView {
            job_id: job_id.to_string(),
            worker: job.worker.clone(),
            labels: job.labels.clone(),
            step: job.step.clone(),
            elapsed: job.started_instant.elapsed(),
            deadline: job.deadline,
            started_at: rfc3339(job.started),
        }
    }

    /// As `/api/jobs` lists it.
    pub fn to_json(&self) -> Value {
        json!({
            "jobId": self.job_id,
            "state": "running",
            "workerId": self.worker,
            "labels": self.labels,
            "step": self.step,
            "elapsedMs": millis(self.elapsed),
            "deadlineMs": millis(self.deadline),
            "startedAt": self.started_at,
        })
    }
}

impl FinishedJob {
    /// The first line of its error.
    pub fn error_line(&self) -> &str {
        self.status.error.lines().next().unwrap_or("")
    }

    /// As `/api/jobs` lists it (`detail`: as `/api/jobs/ID` shows it, with its events
    /// and the tail of its logs).
    pub fn to_json(&self, detail: bool) -> Value {
        let status = &self.status;
        let mut value = json!({
            "jobId": status.job_id,
            "state": "finished",
            "outcome": status.outcome.word(),
            "workerId": status.worker_id,
            "labels": self.labels,
            "durationMs": status.duration_ms,
            "finishedAt": status.finished_at,
            "error": self.error_line(),
        });
        if detail {
            let mut events = Vec::new();
            if let Some((received, started, adopted)) = self.run {
                let dispatched = if adopted { "adopted" } else { "dispatched" };
                events.push(json!({"event": "received", "at": rfc3339(received), "workerId": ""}));
                events.push(
                    json!({"event": dispatched, "at": rfc3339(started), "workerId": status.worker_id}),
                );
            }
            events.push(json!({"event": "finished", "at": status.finished_at, "workerId": status.worker_id}));
            value["events"] = Value::Array(events);
            value["error"] = json!(status.error);
            value["status"] = serde_json::to_value(status).expect("a status serialises");
            value["logTail"] = json!(status.logs.lines().collect::<Vec<_>>());
        }
        value
    }
}

/// A job shown as running until dropped or [`finish`](Running::finish)ed.
#[derive(Debug)]
pub struct Running {
    board: Arc<Board>,
    job_id: String,
}

impl Running {
    /// The job ended with `status`: it moves to the finished jobs.
    pub fn finish(mut self, status: &Status) {
        // Taken: the drop below has nothing left to remove (one lock, not two).
        let job_id = std::mem::take(&mut self.job_id);
        let job = lock(&self.board.running).remove(&job_id);
        let (labels, run) = job.map_or_else(Default::default, |job| {
            (job.labels, Some((job.received, job.started, job.adopted)))
        });
        self.board.push_finished(FinishedJob {
            status: Board::kept(status),
            labels,
            run,
        });
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.job_id.is_empty() {
            lock(&self.board.running).remove(&self.job_id);
        }
    }
}

#[cfg(test)]
mod tests;
