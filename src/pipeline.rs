//! The messages that flow between the orchestrator's threads (see ARCHITECTURE.md):
//! jobs from the consumer to the dispatch pool, publications to the status publisher,
//! channels from the consumer to the publisher, and requests back to the consumer. A
//! leaf: every thread imports it, it imports none of them.

use std::time::Instant;

use amiquip::{Channel, Confirm, Connection, ConnectionBlockedNotification};
use crossbeam_channel::Receiver;

use crate::grpc::cancel::CancelToken;
use crate::job::{Event, Job, Status};
use crate::labels::Labels;

/// Whether a job with these labels has a worker that can take it (the registry
/// answers): the consumer holds back the jobs that have none, so that they wait without
/// a dispatch thread.
pub trait Router: Send + Sync {
    /// Whether a healthy worker has every one of `labels` (always, for none).
    fn routable(&self, labels: &Labels) -> bool;
    /// How many more jobs with `labels` may wait in dispatch threads for a slot.
    fn room(&self, labels: &Labels) -> usize;
}

/// A job handed to the dispatch pool, with the token that stops it (fired by the
/// consumer thread on a cancel, or by the registry when its worker is lost).
pub struct Assignment {
    /// The job.
    pub job: Job,
    /// Stops it wherever it is.
    pub token: CancelToken,
    /// When the consumer took it in.
    pub received: Instant,
    /// The broker delivered it before (AMQP `redelivered`): a worker may already run it
    /// for an orchestrator that is gone.
    pub redelivered: bool,
    /// Counts it as waiting for a worker until dropped (at its first attempt, or when
    /// it ends without one).
    pub waiting: Option<crate::metrics::Waiting>,
}

impl std::fmt::Debug for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assignment")
            .field("job_id", &self.job.job_id)
            .finish_non_exhaustive()
    }
}

/// What a delivery waits for before it is acked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AckKey {
    /// The status of this job.
    Job(String),
    /// The rejected copy (and status) of the consumer's rejected delivery with this id.
    Rejected(u64),
}

/// Messages to the consumer thread.
#[derive(Debug)]
pub enum ConsumerMsg {
    /// The broker confirmed everything published for these keys: ack their deliveries.
    Confirmed(Vec<AckKey>),
    /// The publisher's channel of this connection generation failed: reconnect.
    PublisherLost(u64),
    /// A dispatch thread gives back a job it never started (drain): requeue it.
    Requeue(String),
    /// A dispatch thread gives back a job whose labels no healthy worker has any more:
    /// held back until one has them.
    Unroutable(Box<Assignment>),
    /// Stop consuming, requeue what was not started, and end once running jobs are
    /// confirmed or the drain timeout passes.
    Drain,
}

/// Lines of a running job's output, for the publisher to batch and publish on
/// `--logs-key`.
#[derive(Debug)]
pub struct LogLines {
    /// The job.
    pub job_id: String,
    /// Its id again when it came as a deployment.
    pub deployment_id: Option<String>,
    /// The lines, secrets redacted by the worker.
    pub lines: Vec<String>,
    /// Lines dropped before these (by the worker or for the budget).
    pub dropped: u64,
    /// The bytes of [`LogBudget`] they hold.
    pub bytes: usize,
}

/// The bytes of live output the orchestrator holds at once (between a dispatch thread
/// and the broker's confirm): lines beyond it are dropped, and counted, so that a build
/// printing at full speed grows no memory and never slows the statuses.
#[derive(Debug)]
pub struct LogBudget {
    held: std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl LogBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> LogBudget {
        LogBudget {
            held: std::sync::atomic::AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `bytes` if they fit.
    pub fn try_take(&self, bytes: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + bytes <= self.limit).then_some(held + bytes)
            })
            .is_ok()
    }

    /// Gives back `bytes` taken before.
    pub fn give_back(&self, bytes: usize) {
        self.held
            .fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What the publisher is asked to publish.
#[derive(Debug)]
pub enum Publication {
    /// A job's final status (preceded by its `finished` event when events are on); its
    /// confirmation acks the job's deliveries.
    Status(Status),
    /// A lifecycle event; senders send none when events are off (one is dropped then).
    Event(Event),
    /// Lines of a running job's output (only when `--logs-key` is set).
    Logs(LogLines),
    /// A message that is not a valid job: a copy goes to the rejected queue with the
    /// reason in a header, and a `rejected` status when its jobId could be read.
    Rejected {
        /// The consumer's id for the delivery.
        id: u64,
        /// The message body, unchanged.
        body: Vec<u8>,
        /// Why it was rejected.
        reason: String,
        /// The `rejected` status, when the message had a readable jobId.
        status: Option<Status>,
    },
}

/// A fresh publishing channel, handed over by the consumer thread after each (re)connect.
pub struct Connected {
    /// The publishing connection, of its own: under a memory or disk alarm the broker
    /// blocks connections that publish, and the consuming one (acks) must not be.
    pub connection: Connection,
    /// Its channel, with publisher confirms enabled.
    pub channel: Channel,
    /// The broker's `connection.blocked` / `unblocked` notifications.
    pub blocked: Receiver<ConnectionBlockedNotification>,
    /// Its confirms.
    pub confirms: Receiver<Confirm>,
    /// The connection generation the channel belongs to.
    pub generation: u64,
}

#[cfg(test)]
mod tests {
    use super::LogBudget;

    #[test]
    fn the_log_budget_refuses_what_does_not_fit_until_bytes_come_back() {
        let budget = LogBudget::new(100);
        assert!(budget.try_take(60));
        assert!(
            !budget.try_take(41),
            "60 + 41 > 100: dropped, not waited for"
        );
        assert!(budget.try_take(40));
        budget.give_back(60);
        assert!(budget.try_take(60));
        assert!(!budget.try_take(1));
    }
}
