//! The consumer thread's bookkeeping, without the broker: which jobs were consumed and
//! wait for their status, which deliveries (by tag) each one acks, the backlog of jobs
//! not handed to dispatch yet, the de-duplication window, early cancels and the drain.
//!
//! It takes events (a job or cancel delivery, confirmed statuses, a requeue, a lost
//! connection, a drain) and returns [`Action`]s (ack these tags, nack that one, publish
//! this) for the amiquip layer in [`super::consumer`] to carry out, so every rule here
//! is unit-tested without a broker.
//!
//! Invariants:
//! * a delivery is acked only after everything published for it was confirmed;
//! * a jobId consumed here and not yet confirmed is never handed to dispatch twice: a
//!   redelivery (or a duplicate publish) joins the first delivery and is acked with it;
//! * a jobId confirmed within the de-duplication window is acked at once, not run again;
//! * deliveries belong to one connection: when it dies they are forgotten (the broker
//!   redelivers them), never acked on the next connection.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::grpc::cancel::{CancelReason, CancelToken};
use crate::job::{self, decode_cancel, EventKind, Job, Outcome, Rejection, Status};
use crate::metrics::Metrics;
use crate::orchestrator::state_file::EarlyCancel;
use crate::pipeline::{AckKey, Assignment, Publication, Router};
use early_cancels::EarlyCancels;
use parked::Parked;
use recent::RecentJobs;

mod early_cancels;
mod parked;
mod recent;

/// How many jobIds the de-duplication window remembers at most.
const RECENT_JOBS_CAPACITY: usize = 100_000;

/// Settings of the ledger.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// Larger messages are rejected.
    pub max_message_bytes: usize,
    /// How long a confirmed jobId is remembered.
    pub dedupe_window: Duration,
    /// How long a drain may wait for running jobs.
    pub drain_timeout: Duration,
    /// How long a cancel for a job not consumed yet is remembered.
    pub cancel_ttl: Duration,
    /// Whether lifecycle events are published.
    pub events: bool,
    /// A deployment without `imageName` builds this + its id.
    pub derived_image_prefix: String,
    /// A job held back this long for its labels ends `rejected` (`--unroutable-after`).
    pub unroutable_after: Option<Duration>,
}

/// What the consumer thread must do on the live channel, in order.
// A publication is as common as an ack (one status per job): boxing it would allocate
// once per job for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Action {
    /// Ack these deliveries: `run` (empty, or two or more) are the oldest unacked ones
    /// in a row (one ack with `multiple` of its last tag acks them all), `single` are
    /// acked one by one.
    Ack { run: Vec<u64>, single: Vec<u64> },
    /// Give this delivery back to the queue.
    Nack(u64),
    /// Hand this to the status publisher.
    Publish(Publication),
    /// Write these (every early cancel) to the state file; it comes before the ack of
    /// the cancel that changed them, so an acked cancel survives a restart.
    Remember(Vec<EarlyCancel>),
}

/// A job consumed and not yet confirmed.
struct Pending {
    /// Tags of its deliveries on the live connection.
    tags: Vec<u64>,
    /// Stops it wherever it is in dispatch.
    token: CancelToken,
    /// The consumer window its first delivery came in.
    window: u64,
}

/// Counts for the consumer's last log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Messages received on the execute queue.
    pub received: u64,
    /// Deliveries of a job in flight or recently confirmed, not run again.
    pub duplicates: u64,
}

/// Added to the delivery tags of the cancels channel before they reach the ledger: the
/// consumer reads jobs and cancels on channels of their own, which count tags
/// separately (a channel's tags never reach 2^63). Such tags never join a multiple ack.
pub const CANCEL_TAG: u64 = 1 << 63;

/// The consumer's state; see the module documentation.
pub struct Ledger {
    config: LedgerConfig,
    metrics: Arc<Metrics>,
    /// Jobs consumed and not yet confirmed.
    pending: HashMap<String, Pending>,
    /// Rejected deliveries (by the publisher's id) waiting for their copy's confirm.
    rejected: HashMap<u64, u64>,
    next_rejected: u64,
    /// Every delivery tag of the live channel not acked or nacked yet.
    unacked: BTreeSet<u64>,
    /// JobIds confirmed recently.
    recent: RecentJobs,
    /// Jobs consumed and not yet taken by a dispatch thread, oldest first.
    backlog: VecDeque<Assignment>,
    /// Jobs held back because no healthy worker has their labels.
    parked: Parked,
    /// Which labels a worker can take now.
    router: Arc<dyn Router>,
    /// The consumer window deliveries come in now (see [`Ledger::new_window`]).
    window: u64,
    /// Cancels of jobs not consumed yet.
    early_cancels: EarlyCancels,
    drain_deadline: Option<Instant>,
    stats: Stats,
}

impl Ledger {
    /// A ledger with no jobs, holding the early cancels a state file remembered.
    pub fn new(
        config: LedgerConfig,
        metrics: Arc<Metrics>,
        remembered_cancels: Vec<EarlyCancel>,
    ) -> Ledger {
        Ledger {
            recent: RecentJobs::new(config.dedupe_window, RECENT_JOBS_CAPACITY),
            early_cancels: EarlyCancels::new(config.cancel_ttl, remembered_cancels),
            config,
            metrics,
            pending: HashMap::new(),
            rejected: HashMap::new(),
            next_rejected: 0,
            unacked: BTreeSet::new(),
            backlog: VecDeque::new(),
            parked: Parked::default(),
            router: Arc::new(parked::EveryLabel),
            window: 0,
            drain_deadline: None,
            stats: Stats::default(),
        }
    }

    /// The same ledger, asking `router` which labels a worker can take (until then: all).
    pub fn with_router(self, router: Arc<dyn Router>) -> Ledger {
        Ledger { router, ..self }
    }

    /// A message on the execute queue, with its delivery tag and whether the broker
    /// delivered it before.
    pub fn job_delivery(&mut self, tag: u64, body: Vec<u8>, redelivered: bool) -> Vec<Action> {
        self.unacked.insert(tag);
        self.stats.received += 1;
        if self.drain_deadline.is_some() {
            return vec![self.nack(tag)];
        }
        let mut job = match Job::decode(&body, self.config.max_message_bytes) {
            Ok(job) => job,
            Err(rejection) => return vec![self.reject(tag, body, rejection)],
        };
        job.derive_image_name(&self.config.derived_image_prefix);
        if let Some(pending) = self.pending.get_mut(&job.job_id) {
            info!(
                "job {}: delivered again while running here; not run twice",
                job.job_id
            );
            self.stats.duplicates += 1;
            pending.tags.push(tag);
            return Vec::new();
        }
        if self.recent.contains(&job.job_id) {
            info!(
                "job {}: delivered again after its status was confirmed; acked",
                job.job_id
            );
            self.stats.duplicates += 1;
            return vec![self.ack(vec![tag])];
        }
        self.metrics.jobs_received.inc();
        self.metrics.board.received();
        crate::log_sink::routine(|| info!("job {}: received", job.job_id));
        let token = CancelToken::default();
        let pending = Pending {
            tags: vec![tag],
            token: token.clone(),
            window: self.window,
        };
        self.pending.insert(job.job_id.clone(), pending);
        let mut actions = Vec::new();
        if self.config.events {
            let event = job::Event::now(&job.job_id, EventKind::Received, "");
            actions.push(Action::Publish(Publication::Event(event)));
        }
        if self.early_cancels.take(&job.job_id) {
            info!("job {}: cancelled before it arrived; not run", job.job_id);
            actions.push(cancelled(&job));
            actions.push(Action::Remember(self.early_cancels.snapshot()));
        } else {
            let received = Instant::now();
            let waiting = Some(
                self.metrics
                    .load
                    .waiting(&job.job_id, &job.labels, received),
            );
            let assignment = Assignment {
                job,
                token,
                received,
                redelivered,
                waiting,
            };
            self.dispatch_or_park(assignment);
        }
        actions
    }

    /// A message on the cancel queue: acked once applied (malformed: rejected).
    /// Its tag is never part of a multiple ack: cancels come on a channel of their own,
    /// and are acked one by one.
    pub fn cancel_delivery(&mut self, tag: u64, body: Vec<u8>) -> Vec<Action> {
        match decode_cancel(&body) {
            Ok(job_id) => {
                let mut actions = self.cancel(job_id);
                actions.push(self.ack(vec![tag]));
                actions
            }
            Err(rejection) => vec![self.reject(tag, body, rejection)],
        }
    }

    /// Cancels a job wherever it is: waiting here (its status is published now), in the
    /// `jobs` channel, in dispatch or on a worker (its token tells the dispatch thread
    /// that has or takes it), not consumed yet (remembered), or finished (nothing to do).
    fn cancel(&mut self, job_id: String) -> Vec<Action> {
        let waiting = match self.backlog.iter().position(|a| a.job.job_id == job_id) {
            Some(i) => self.backlog.remove(i),
            None => self.parked.take(&job_id),
        };
        if let Some(assignment) = waiting {
            info!("job {job_id}: cancelled before dispatch");
            return vec![cancelled(&assignment.job)];
        }
        if let Some(pending) = self.pending.get(&job_id) {
            if pending.token.cancel(CancelReason::Cancelled) {
                info!("job {job_id}: cancel requested; stopping it");
            } else {
                info!("job {job_id}: cancel requested; it is already being stopped");
            }
        } else if self.recent.contains(&job_id) {
            info!("job {job_id}: cancel requested after it finished; nothing to do");
        } else {
            info!(
                "job {job_id}: cancel requested before it arrived; remembered for {}",
                humantime::format_duration(self.config.cancel_ttl)
            );
            self.early_cancels.insert(job_id);
            return vec![Action::Remember(self.early_cancels.snapshot())];
        }
        Vec::new()
    }

    fn reject(&mut self, tag: u64, body: Vec<u8>, rejection: Rejection) -> Action {
        self.metrics.jobs_rejected.inc();
        let Rejection {
            reason,
            job_id,
            dialect,
        } = rejection;
        warn!(
            "rejected a message (jobId {}): {reason}",
            job_id.as_deref().unwrap_or("unreadable")
        );
        let id = self.next_rejected;
        self.next_rejected += 1;
        self.rejected.insert(id, tag);
        let status = job_id.map(|job_id| {
            Status::without_answer(
                &job_id,
                Outcome::Rejected,
                "",
                format!("rejected: {reason}"),
            )
            .in_dialect(dialect)
        });
        Action::Publish(Publication::Rejected {
            id,
            body: job::without_secrets(body),
            reason,
            status,
        })
    }

    /// Everything published for `keys` was confirmed: their deliveries are acked.
    pub fn confirmed(&mut self, keys: Vec<AckKey>) -> Vec<Action> {
        let mut tags = Vec::new();
        for key in keys {
            match key {
                AckKey::Job(job_id) => {
                    if let Some(pending) = self.pending.remove(&job_id) {
                        tags.extend(pending.tags);
                    }
                    self.recent.insert(job_id);
                }
                AckKey::Rejected(id) => tags.extend(self.rejected.remove(&id)),
            }
        }
        if tags.is_empty() {
            return Vec::new();
        }
        vec![self.ack(tags)]
    }

    /// A job no dispatch thread started (drain): its deliveries go back to the queue.
    pub fn requeue(&mut self, job_id: &str) -> Vec<Action> {
        let tags = self
            .pending
            .remove(job_id)
            .map(|p| p.tags)
            .unwrap_or_default();
        tags.into_iter().map(|tag| self.nack(tag)).collect()
    }

    /// Starts the drain: `unstarted` (taken back from the `jobs` channel) and the
    /// backlog go back to the queue; running jobs get `drain_timeout` to finish.
    pub fn start_drain(&mut self, unstarted: Vec<Assignment>) -> Vec<Action> {
        if self.drain_deadline.is_some() {
            return Vec::new();
        }
        self.drain_deadline = Some(Instant::now() + self.config.drain_timeout);
        let (cancelled, waiting): (Vec<_>, Vec<_>) = self
            .with_backlog(unstarted)
            .into_iter()
            .partition(was_cancelled);
        // A job whose cancel was taken ends cancelled (acked with its status), instead of
        // going back to the queue to run later.
        let mut actions: Vec<Action> = cancelled.iter().map(|a| self::cancelled(&a.job)).collect();
        actions.extend(waiting.iter().flat_map(|a| self.requeue(&a.job.job_id)));
        info!(
            "draining: {} jobs returned to the queue, {} still running (up to {})",
            waiting.len(),
            self.pending.len(),
            humantime::format_duration(self.config.drain_timeout)
        );
        actions
    }

    /// The connection died: its deliveries are forgotten (the broker redelivers them),
    /// and so are the jobs not started yet (`unstarted`, taken back from the `jobs`
    /// channel, the backlog, and those a dispatch thread holds before its first attempt,
    /// whose token is released), which come back with those redeliveries, here or at
    /// another orchestrator. Jobs running keep their entry, so their redeliveries are
    /// not run again; so do jobs cancelled while they waited, whose `cancelled` status
    /// is published now. A redelivery of a job dropped here waits for a worker's report
    /// like any other: between the two, another orchestrator may have started it.
    pub fn connection_lost(&mut self, unstarted: Vec<Assignment>) -> Vec<Action> {
        for pending in self.pending.values_mut() {
            pending.tags.clear();
        }
        self.rejected.clear();
        self.unacked.clear();
        let mut actions = Vec::new();
        for assignment in self.with_backlog(unstarted) {
            if was_cancelled(&assignment) {
                actions.push(cancelled(&assignment.job));
            } else {
                self.pending.remove(&assignment.job.job_id);
            }
        }
        // Jobs a dispatch thread holds, waiting for a slot or a report, must not start
        // either: another orchestrator may get their redelivery.
        self.pending.retain(|_, pending| !pending.token.release());
        actions
    }

    /// Whether a job waits to be handed to dispatch.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// The oldest job waiting to be handed to dispatch.
    pub fn next_job(&mut self) -> Option<Assignment> {
        self.backlog.pop_front()
    }

    /// When the drain gives up on running jobs, once it started.
    pub fn drain_deadline(&self) -> Option<Instant> {
        self.drain_deadline
    }

    /// Whether a drain started and is over: nothing waits for a confirm, or time is up.
    pub fn drain_finished(&self) -> bool {
        self.drain_deadline.is_some_and(|deadline| {
            (self.pending.is_empty() && self.rejected.is_empty()) || Instant::now() >= deadline
        })
    }

    /// Jobs consumed and not confirmed.
    pub fn unfinished(&self) -> usize {
        self.pending.len()
    }

    /// Counts so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn with_backlog(&mut self, mut unstarted: Vec<Assignment>) -> Vec<Assignment> {
        unstarted.extend(self.parked.take_all());
        unstarted.extend(self.backlog.drain(..));
        unstarted
    }

    fn nack(&mut self, tag: u64) -> Action {
        self.unacked.remove(&tag);
        Action::Nack(tag)
    }

    /// Acks `tags`: those that are the oldest unacked ones as a run (one multiple ack),
    /// the others one by one.
    fn ack(&mut self, mut tags: Vec<u64>) -> Action {
        tags.sort_unstable();
        let oldest = oldest_run(&self.unacked, &tags);
        for tag in &tags {
            self.unacked.remove(tag);
        }
        // A run of one is an ordinary ack.
        let single = tags.split_off(if oldest > 1 { oldest } else { 0 });
        Action::Ack { run: tags, single }
    }
}

/// Whether a job not started yet was cancelled while it waited (in the `jobs` channel).
fn was_cancelled(assignment: &Assignment) -> bool {
    assignment.token.reason() == Some(CancelReason::Cancelled)
}

/// The `cancelled` status of a job that never reached a worker.
fn cancelled(job: &Job) -> Action {
    let status = Status::without_answer(&job.job_id, Outcome::Cancelled, "", "cancelled".into())
        .in_dialect(job.dialect);
    Action::Publish(Publication::Status(status))
}

/// How many of `tags` (sorted) are the oldest of `unacked`, in a row: a multiple ack of
/// the last of them acks exactly those.
fn oldest_run(unacked: &BTreeSet<u64>, tags: &[u64]) -> usize {
    unacked
        .iter()
        .zip(tags)
        .take_while(|(unacked, tag)| unacked == tag)
        .count()
}

#[cfg(test)]
mod tests;
