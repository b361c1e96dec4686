//! Live build output on `--logs-key`: the lines of each job are gathered into batches of
//! at most [`MAX_BATCH_BYTES`], published at the latest [`MAX_BATCH_DELAY`] after their
//! first line, and before the job's status. Each job's batches are numbered from 0 with
//! no gap (`seq`). They are non-persistent and not `mandatory` (logs are a view: the
//! status carries the final tail), but confirmed like the rest, and their bytes stay in
//! the [`LogBudget`] until the broker confirms them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::AmqpProperties;

use super::{Entry, Message, Publisher};
use crate::pipeline::{LogBudget, LogLines};

/// The most bytes of lines in one message.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

/// The longest a line waits for others before it is published.
pub const MAX_BATCH_DELAY: Duration = Duration::from_millis(200);

/// Lines waiting to be published, per job.
pub(super) struct LogBatches {
    pub(super) budget: Arc<LogBudget>,
    jobs: HashMap<String, Batch>,
}

/// One job's lines not published yet, and its next `seq`.
#[derive(Default)]
struct Batch {
    deployment_id: Option<String>,
    lines: Vec<String>,
    dropped: u64,
    bytes: usize,
    since: Option<Instant>,
    seq: u64,
}

impl LogBatches {
    pub(super) fn new(budget: Arc<LogBudget>) -> LogBatches {
        LogBatches {
            budget,
            jobs: HashMap::new(),
        }
    }

    /// When the oldest waiting line is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.jobs
            .values()
            .filter_map(|b| b.since)
            .min()
            .map(|since| since + MAX_BATCH_DELAY)
    }
}

impl Publisher {
    /// Adds a job's lines; publishes its batch once full.
    pub(super) fn add_logs(&mut self, logs: LogLines) {
        let batch = self.logs.jobs.entry(logs.job_id.clone()).or_default();
        batch.deployment_id = logs.deployment_id;
        batch.lines.extend(logs.lines);
        batch.dropped += logs.dropped;
        batch.bytes += logs.bytes;
        batch.since.get_or_insert_with(Instant::now);
        if batch.bytes >= MAX_BATCH_BYTES {
            self.flush_logs(&logs.job_id);
        }
    }

    /// Publishes the batches whose first line waited [`MAX_BATCH_DELAY`].
    pub(super) fn flush_due_logs(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .logs
            .jobs
            .iter()
            .filter(|(_, b)| b.since.is_some_and(|t| t + MAX_BATCH_DELAY <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for job_id in due {
            self.flush_logs(&job_id);
        }
    }

    /// The job ended: its last lines go now, before its status; its numbering ends.
    pub(super) fn end_logs(&mut self, job_id: &str) {
        self.flush_logs(job_id);
        self.logs.jobs.remove(job_id);
    }

    /// Publishes a job's waiting lines as its next message.
    fn flush_logs(&mut self, job_id: &str) {
        let Some(batch) = self.logs.jobs.get_mut(job_id) else {
            return;
        };
        if batch.since.is_none() {
            return;
        }
        let mut body = serde_json::json!({
            "jobId": job_id,
            "seq": batch.seq,
            "lines": std::mem::take(&mut batch.lines),
        });
        if let Some(deployment_id) = &batch.deployment_id {
            body["deploymentId"] = deployment_id.as_str().into();
        }
        if batch.dropped > 0 {
            body["dropped"] = batch.dropped.into();
        }
        batch.seq += 1;
        batch.dropped = 0;
        batch.since = None;
        let bytes = std::mem::take(&mut batch.bytes);
        let message = Message {
            exchange: self.topology.exchange.clone(),
            routing_key: self.topology.logs_key.clone(),
            body: serde_json::to_vec(&body).expect("JSON serialises"),
            properties: AmqpProperties::default()
                .with_delivery_mode(1)
                .with_content_type("application/json".into())
                .with_message_id(job_id.to_string()),
            status: false,
        };
        self.metrics.log_messages.inc();
        self.push_entry(Entry {
            key: None,
            messages: vec![message],
            unconfirmed: 1,
            losses: 0,
            retries: 0,
            log_bytes: bytes,
        });
    }
}
