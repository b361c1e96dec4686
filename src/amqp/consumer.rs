//! The AMQP consumer thread.
//!
//! It owns the broker connection, the consuming channel and every unacknowledged
//! delivery, and it is the only thread that acks (amiquip acks a delivery only on the
//! channel that received it). Its loop `select!`s over these inputs:
//!
//! * deliveries from `execute.queue`: decoded into [`Job`]s and queued in a backlog
//!   (at most `prefetch` jobs), or moved to the rejected queue;
//! * deliveries from `cancel.queue`: a job waiting in the backlog is dropped (status
//!   `cancelled`), one in the `jobs` channel or in dispatch has its [`CancelToken`]
//!   fired, one not consumed yet is remembered for `--cancel-ttl`;
//! * its inbox ([`ConsumerMsg`]): "the statuses of jobs X, Y… are confirmed, ack their
//!   deliveries" (a run of the oldest unacked deliveries goes as one multiple ack),
//!   "job X was not started, requeue it", "the publisher lost its channel",
//!   "drain";
//! * the bounded `jobs` channel to the dispatch pool, which takes the backlog's oldest
//!   job while it has room (its capacity is the prefetch, so it rarely fills). A job
//!   sits there until a dispatch thread is free, without waking this thread again; the
//!   consumer takes unstarted jobs back from the same channel on a drain or when the
//!   connection is lost, and a cancel fires the job's token (the dispatch thread that
//!   takes it publishes `cancelled` instead of running it).
//!
//! Invariants:
//! * a delivery is acked only after everything published for it was confirmed;
//! * a jobId consumed here and not yet confirmed is never handed to dispatch twice: a
//!   redelivery (or a duplicate publish) joins the first delivery and is acked with it;
//! * a jobId confirmed within the de-duplication window is acked at once, not run again;
//! * deliveries belong to one connection generation: when the connection dies they are
//!   forgotten (the broker redelivers them), never acked on the next connection.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection, ConsumerMessage, ConsumerOptions, Delivery};
use crossbeam_channel::{Receiver, Select, Sender};
use log::{debug, info, warn};

use super::{declare_topology, AmqpUrl};
use crate::config::Topology;
use crate::grpc::cancel::{CancelReason, CancelToken};
use crate::job::{self, decode_cancel, EventKind, Job, Outcome, Rejection, Status};
use crate::metrics::Metrics;
use crate::pipeline::{AckKey, Assignment, Connected, ConsumerMsg, Publication};

/// How many confirmed jobIds the de-duplication window remembers at most.
const RECENT_JOBS_CAPACITY: usize = 100_000;
/// First and longest pause between two connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A connection that lived this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(5);

/// Settings of the consumer thread.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Broker URL.
    pub url: AmqpUrl,
    /// Queue and exchange names.
    pub topology: Topology,
    /// Most unacknowledged deliveries at once.
    pub prefetch: u16,
    /// Larger messages are rejected.
    pub max_message_bytes: usize,
    /// How long a confirmed jobId is remembered.
    pub dedupe_window: Duration,
    /// How long a drain may wait for running jobs.
    pub drain_timeout: Duration,
    /// How long a cancel for a job not consumed yet is remembered.
    pub cancel_ttl: Duration,
}

/// The channels the consumer thread talks through.
pub struct ConsumerLinks {
    /// Its inbox.
    pub inbox: Receiver<ConsumerMsg>,
    /// Jobs to the dispatch pool (bounded by the prefetch).
    pub jobs: Sender<Assignment>,
    /// The receiving end of `jobs`, to take back jobs no dispatch thread has taken.
    pub unstarted: Receiver<Assignment>,
    /// Publications (rejected messages) to the publisher.
    pub publications: Sender<Publication>,
    /// Fresh publishing channels to the publisher.
    pub connections: Sender<Connected>,
    /// Counters it keeps.
    pub metrics: Arc<Metrics>,
}

/// Starts the consumer thread; it returns when a drain has finished.
pub fn spawn(config: ConsumerConfig, links: ConsumerLinks) -> JoinHandle<()> {
    let consumer = Consumer {
        recent: RecentJobs::new(config.dedupe_window, RECENT_JOBS_CAPACITY),
        early_cancels: RecentJobs::new(config.cancel_ttl, RECENT_JOBS_CAPACITY),
        config,
        links,
        generation: 0,
        pending: HashMap::new(),
        rejected: HashMap::new(),
        next_rejected: 0,
        unacked: Unacked::default(),
        backlog: VecDeque::new(),
        drain_deadline: None,
        stats: Stats::default(),
    };
    std::thread::Builder::new()
        .name("amqp-consumer".into())
        .spawn(move || consumer.run())
        .expect("spawning the AMQP consumer thread")
}

/// A job consumed and not yet confirmed.
struct Pending {
    /// Its deliveries on the live connection.
    deliveries: Vec<Delivery>,
    /// Stops it wherever it is in dispatch.
    token: CancelToken,
}

#[derive(Debug, Default)]
struct Stats {
    received: u64,
    rejected: u64,
    duplicates: u64,
}

struct Consumer {
    config: ConsumerConfig,
    links: ConsumerLinks,
    /// Incremented on each connection; the publisher tags its channel with it.
    generation: u64,
    /// Jobs consumed and not yet confirmed.
    pending: HashMap<String, Pending>,
    /// Rejected deliveries waiting for their rejected copy to be confirmed.
    rejected: HashMap<u64, Delivery>,
    next_rejected: u64,
    /// Every delivery of the live channel not acked or nacked yet.
    unacked: Unacked,
    recent: RecentJobs,
    /// Jobs consumed and not yet taken by a dispatch thread, oldest first.
    backlog: VecDeque<Assignment>,
    /// Cancels of jobs not consumed yet.
    early_cancels: RecentJobs,
    drain_deadline: Option<Instant>,
    stats: Stats,
}

/// Which queue a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Jobs,
    Cancels,
}

/// Cancels every consumer still active (drain); their `ClientCancelled` follows.
fn stop_consuming(consumers: &[(Source, amiquip::Consumer<'_>, bool)]) -> Result<(), String> {
    for (_, consumer, active) in consumers {
        if *active {
            consumer.cancel().map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// One step of the consuming loop.
// Most events are deliveries (as in amiquip's own `ConsumerMessage`): boxing them would
// allocate once per message for nothing.
#[allow(clippy::large_enum_variant)]
enum Event {
    /// From the consumer with this index.
    Delivery(usize, Result<ConsumerMessage, crossbeam_channel::RecvError>),
    Inbox(ConsumerMsg),
    Sent,
    Tick,
}

impl Consumer {
    fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        while !self.drain_finished() {
            match self.connect() {
                Ok((connection, channel)) => {
                    let started = Instant::now();
                    let result = self.consume(&channel);
                    drop(channel);
                    self.end_session(connection, result);
                    if started.elapsed() >= STABLE_SESSION {
                        backoff = BACKOFF_MIN;
                    }
                }
                Err(e) => warn!("broker: {e}"),
            }
            if self.drain_finished() {
                break;
            }
            info!(
                "broker: reconnecting in {}",
                humantime::format_duration(backoff)
            );
            self.serve_disconnected(Instant::now() + backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let unfinished = self.pending.len();
        let Stats {
            received,
            rejected,
            duplicates,
        } = self.stats;
        info!(
            "consumer stopped: {received} messages received, {rejected} rejected, \
             {duplicates} duplicates not run again, {unfinished} jobs left unfinished"
        );
    }

    fn connect(&mut self) -> Result<(Connection, Channel), String> {
        let mut connection = self.config.url.connect()?;
        let mut setup =
            || -> Result<(Channel, Channel, Receiver<amiquip::Confirm>), amiquip::Error> {
                let channel = connection.open_channel(None)?;
                declare_topology(&channel, &self.config.topology)?;
                channel.qos(0, self.config.prefetch, false)?;
                let publish = connection.open_channel(None)?;
                let confirms = publish.listen_for_publisher_confirms()?;
                publish.enable_publisher_confirms()?;
                Ok((channel, publish, confirms))
            };
        match setup() {
            Ok((channel, publish, confirms)) => {
                self.generation += 1;
                if self.generation > 1 {
                    self.links.metrics.broker_reconnects.inc();
                }
                self.links.metrics.broker_connected.set(1);
                info!(
                    "broker: connected to {} (connection {})",
                    self.config.url.masked(),
                    self.generation
                );
                let connected = Connected {
                    channel: publish,
                    confirms,
                    generation: self.generation,
                };
                self.links
                    .connections
                    .send(connected)
                    .map_err(|_| "the status publisher has stopped".to_string())?;
                Ok((connection, channel))
            }
            Err(e) => {
                let _ = connection.close();
                Err(format!("setting up {}: {e}", self.config.url.masked()))
            }
        }
    }

    /// Consumes until the connection fails (`Err`) or the drain finished (`Ok`).
    fn consume(&mut self, channel: &Channel) -> Result<(), String> {
        let topology = &self.config.topology;
        let mut consumers = Vec::new();
        for (source, queue) in [
            (Source::Jobs, &topology.execute_queue),
            (Source::Cancels, &topology.cancel_queue),
        ] {
            let consumer = channel
                .basic_consume(queue.as_str(), ConsumerOptions::default())
                .map_err(|e| format!("consuming {queue}: {e}"))?;
            consumers.push((source, consumer, true));
        }
        if self.drain_deadline.is_some() {
            stop_consuming(&consumers)?;
        }
        while !self.drain_finished() {
            let event = {
                let mut sel = Select::new();
                let listening: Vec<(usize, usize)> = consumers
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, _, active))| *active)
                    .map(|(i, (_, consumer, _))| (sel.recv(consumer.receiver()), i))
                    .collect();
                let inbox = sel.recv(&self.links.inbox);
                let send = (!self.backlog.is_empty()).then(|| sel.send(&self.links.jobs));
                let selected = match self.drain_deadline {
                    Some(deadline) => sel.select_deadline(deadline).ok(),
                    None => Some(sel.select()),
                };
                match selected {
                    None => Event::Tick,
                    Some(op) if op.index() == inbox => match op.recv(&self.links.inbox) {
                        Ok(msg) => Event::Inbox(msg),
                        Err(_) => return Err("the orchestrator stopped".to_string()),
                    },
                    Some(op) if Some(op.index()) == send => {
                        let assignment = self.backlog.pop_front().expect("backlog is not empty");
                        match op.send(&self.links.jobs, assignment) {
                            Ok(()) => Event::Sent,
                            Err(_) => return Err("the dispatch pool stopped".to_string()),
                        }
                    }
                    Some(op) => {
                        let (_, i) = *listening
                            .iter()
                            .find(|(index, _)| *index == op.index())
                            .expect("a consumer was selected");
                        Event::Delivery(i, op.recv(consumers[i].1.receiver()))
                    }
                }
            };
            match event {
                Event::Delivery(i, Ok(ConsumerMessage::Delivery(delivery))) => {
                    self.unacked.received(&delivery);
                    let result = match consumers[i].0 {
                        Source::Jobs => self.delivery(channel, delivery),
                        Source::Cancels => self.cancel_delivery(channel, delivery),
                    };
                    result.map_err(|e| e.to_string())?
                }
                Event::Delivery(i, Ok(ConsumerMessage::ClientCancelled)) => consumers[i].2 = false,
                Event::Delivery(_, Ok(other)) => return Err(format!("consumer ended: {other:?}")),
                Event::Delivery(..) => return Err("the connection closed".to_string()),
                Event::Inbox(ConsumerMsg::Drain) => {
                    stop_consuming(&consumers)?;
                    self.start_drain(Some(channel)).map_err(|e| e.to_string())?;
                }
                Event::Inbox(ConsumerMsg::PublisherLost(generation))
                    if generation == self.generation =>
                {
                    return Err("the publishing channel failed".to_string())
                }
                Event::Inbox(msg) => self.inbox(msg, Some(channel)).map_err(|e| e.to_string())?,
                Event::Sent | Event::Tick => {}
            }
        }
        Ok(())
    }

    /// While disconnected: serve the inbox until `until` (or the drain finishes).
    fn serve_disconnected(&mut self, until: Instant) {
        while !self.drain_finished() {
            let deadline = self.drain_deadline.map_or(until, |d| d.min(until));
            match self.links.inbox.recv_deadline(deadline) {
                Ok(ConsumerMsg::Drain) => {
                    let _ = self.start_drain(None);
                }
                Ok(msg) => {
                    let _ = self.inbox(msg, None);
                }
                Err(_) if Instant::now() >= until => return,
                Err(_) => {}
            }
        }
    }

    fn end_session(&mut self, connection: Connection, result: Result<(), String>) {
        if let Err(e) = result {
            warn!("broker: connection {} lost: {e}", self.generation);
        }
        self.links.metrics.broker_connected.set(0);
        let _ = connection.close();
        // Deliveries of a dead connection cannot be acked; the broker redelivers them.
        for pending in self.pending.values_mut() {
            pending.deliveries.clear();
        }
        self.rejected.clear();
        self.unacked = Unacked::default();
        // Jobs not yet started come back with those redeliveries.
        for assignment in self.take_back_unstarted() {
            self.pending.remove(&assignment.job.job_id);
        }
    }

    fn delivery(&mut self, channel: &Channel, mut delivery: Delivery) -> amiquip::Result<()> {
        self.stats.received += 1;
        if self.drain_deadline.is_some() {
            return self.unacked.nack(channel, delivery);
        }
        let job = match Job::decode(&delivery.body, self.config.max_message_bytes) {
            Ok(job) => job,
            Err(rejection) => {
                let body = std::mem::take(&mut delivery.body);
                self.reject(delivery, body, rejection);
                return Ok(());
            }
        };
        if let Some(pending) = self.pending.get_mut(&job.job_id) {
            info!(
                "job {}: delivered again while running here; not run twice",
                job.job_id
            );
            self.stats.duplicates += 1;
            pending.deliveries.push(delivery);
            return Ok(());
        }
        if self.recent.contains(&job.job_id) {
            info!(
                "job {}: delivered again after its status was confirmed; acked",
                job.job_id
            );
            self.stats.duplicates += 1;
            return self.unacked.ack(channel, vec![delivery]);
        }
        self.links.metrics.jobs_received.inc();
        info!("job {}: received", job.job_id);
        let token = CancelToken::default();
        let pending = Pending {
            deliveries: vec![delivery],
            token: token.clone(),
        };
        self.pending.insert(job.job_id.clone(), pending);
        if self.config.topology.events_on() {
            self.publish(Publication::Event(job::Event::now(
                &job.job_id,
                EventKind::Received,
                "",
            )));
        }
        if self.early_cancels.remove(&job.job_id) {
            info!("job {}: cancelled before it arrived; not run", job.job_id);
            self.publish_cancelled(&job.job_id);
        } else {
            let received = Instant::now();
            self.backlog.push_back(Assignment {
                job,
                token,
                received,
            });
        }
        Ok(())
    }

    /// A message on the cancel queue: acked once applied (malformed: rejected).
    fn cancel_delivery(
        &mut self,
        channel: &Channel,
        mut delivery: Delivery,
    ) -> amiquip::Result<()> {
        match decode_cancel(&delivery.body) {
            Ok(job_id) => {
                self.cancel(job_id);
                self.unacked.ack(channel, vec![delivery])
            }
            Err(rejection) => {
                let body = std::mem::take(&mut delivery.body);
                self.reject(delivery, body, rejection);
                Ok(())
            }
        }
    }

    /// Cancels a job wherever it is: waiting here (its status is published now), in the
    /// `jobs` channel, in dispatch or on a worker (its token tells the dispatch thread
    /// that has or takes it), not consumed yet (remembered), or finished (nothing to do).
    fn cancel(&mut self, job_id: String) {
        if let Some(i) = self.backlog.iter().position(|a| a.job.job_id == job_id) {
            self.backlog.remove(i);
            info!("job {job_id}: cancelled before dispatch");
            self.publish_cancelled(&job_id);
        } else if let Some(pending) = self.pending.get(&job_id) {
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
        }
    }

    fn publish_cancelled(&self, job_id: &str) {
        let status =
            Status::without_answer(job_id, Outcome::Cancelled, "", "cancelled".to_string());
        self.publish(Publication::Status(status));
    }

    fn publish(&self, publication: Publication) {
        // The publisher outlives the consumer thread.
        let _ = self.links.publications.send(publication);
    }

    fn reject(&mut self, delivery: Delivery, body: Vec<u8>, rejection: Rejection) {
        self.stats.rejected += 1;
        self.links.metrics.jobs_rejected.inc();
        let Rejection { reason, job_id } = rejection;
        warn!(
            "rejected a message (jobId {}): {reason}",
            job_id.as_deref().unwrap_or("unreadable")
        );
        let id = self.next_rejected;
        self.next_rejected += 1;
        self.rejected.insert(id, delivery);
        let status = job_id.map(|job_id| {
            Status::without_answer(
                &job_id,
                Outcome::Rejected,
                "",
                format!("rejected: {reason}"),
            )
        });
        self.publish(Publication::Rejected {
            id,
            body,
            reason,
            status,
        });
    }

    /// Handles an inbox message; `channel` is `None` while disconnected.
    fn inbox(&mut self, msg: ConsumerMsg, channel: Option<&Channel>) -> amiquip::Result<()> {
        match msg {
            ConsumerMsg::Confirmed(keys) => {
                let mut deliveries = Vec::new();
                for key in keys {
                    match key {
                        AckKey::Job(job_id) => {
                            if let Some(pending) = self.pending.remove(&job_id) {
                                deliveries.extend(pending.deliveries);
                            }
                            self.recent.insert(job_id);
                        }
                        AckKey::Rejected(id) => deliveries.extend(self.rejected.remove(&id)),
                    }
                }
                if let Some(channel) = channel {
                    self.unacked.ack(channel, deliveries)?;
                }
            }
            ConsumerMsg::Requeue(job_id) => self.requeue(&job_id, channel)?,
            ConsumerMsg::Drain => self.start_drain(channel)?,
            ConsumerMsg::PublisherLost(generation) => {
                debug!("publisher lost the channel of old connection {generation}")
            }
        }
        Ok(())
    }

    fn requeue(&mut self, job_id: &str, channel: Option<&Channel>) -> amiquip::Result<()> {
        let deliveries = self
            .pending
            .remove(job_id)
            .map(|p| p.deliveries)
            .unwrap_or_default();
        if let Some(channel) = channel {
            for delivery in deliveries {
                self.unacked.nack(channel, delivery)?;
            }
        }
        Ok(())
    }

    fn start_drain(&mut self, channel: Option<&Channel>) -> amiquip::Result<()> {
        if self.drain_deadline.is_some() {
            return Ok(());
        }
        self.drain_deadline = Some(Instant::now() + self.config.drain_timeout);
        let waiting = self.take_back_unstarted();
        for assignment in &waiting {
            self.requeue(&assignment.job.job_id, channel)?;
        }
        info!(
            "draining: {} jobs returned to the queue, {} still running (up to {})",
            waiting.len(),
            self.pending.len(),
            humantime::format_duration(self.config.drain_timeout)
        );
        Ok(())
    }

    /// Every job not taken by a dispatch thread yet, from the backlog and the channel.
    fn take_back_unstarted(&mut self) -> Vec<Assignment> {
        let mut jobs: Vec<Assignment> = self.links.unstarted.try_iter().collect();
        jobs.extend(self.backlog.drain(..));
        jobs
    }

    fn drain_finished(&self) -> bool {
        match self.drain_deadline {
            None => false,
            Some(deadline) => {
                (self.pending.is_empty() && self.rejected.is_empty()) || Instant::now() >= deadline
            }
        }
    }
}

/// The delivery tags of the live channel not acked or nacked yet. Every ack goes
/// through it so that acks of the oldest deliveries become one `basic.ack` with
/// `multiple` set: under load the broker confirms statuses in batches, mostly of the
/// oldest jobs, and one frame then acks them all.
#[derive(Debug, Default)]
struct Unacked(BTreeSet<u64>);

impl Unacked {
    fn received(&mut self, delivery: &Delivery) {
        self.0.insert(delivery.delivery_tag());
    }

    fn nack(&mut self, channel: &Channel, delivery: Delivery) -> amiquip::Result<()> {
        self.0.remove(&delivery.delivery_tag());
        delivery.nack(channel, true)
    }

    /// Acks `deliveries`: those that are the oldest unacked ones with one multiple ack,
    /// the others one by one.
    fn ack(&mut self, channel: &Channel, mut deliveries: Vec<Delivery>) -> amiquip::Result<()> {
        deliveries.sort_unstable_by_key(Delivery::delivery_tag);
        let tags: Vec<u64> = deliveries.iter().map(Delivery::delivery_tag).collect();
        let oldest = oldest_run(&self.0, &tags);
        for tag in &tags {
            self.0.remove(tag);
        }
        let mut deliveries = deliveries.into_iter();
        if oldest > 1 {
            let last = deliveries.nth(oldest - 1).expect("the run is in the list");
            last.ack_multiple(channel)?;
        }
        for delivery in deliveries {
            delivery.ack(channel)?;
        }
        Ok(())
    }
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

/// The jobIds confirmed within a time window, bounded in number.
#[derive(Debug)]
struct RecentJobs {
    window: Duration,
    capacity: usize,
    order: VecDeque<(Instant, String)>,
    ids: HashSet<String>,
}

impl RecentJobs {
    fn new(window: Duration, capacity: usize) -> RecentJobs {
        RecentJobs {
            window,
            capacity,
            order: VecDeque::new(),
            ids: HashSet::new(),
        }
    }

    fn insert(&mut self, job_id: String) {
        self.expire();
        if self.ids.insert(job_id.clone()) {
            self.order.push_back((Instant::now(), job_id));
        }
        while self.order.len() > self.capacity {
            let (_, old) = self.order.pop_front().expect("over capacity");
            self.ids.remove(&old);
        }
    }

    /// Removes `job_id`; returns whether it was there.
    fn remove(&mut self, job_id: &str) -> bool {
        self.expire();
        // Its entry in `order` goes when it expires or is pushed out.
        self.ids.remove(job_id)
    }

    fn contains(&mut self, job_id: &str) -> bool {
        self.expire();
        self.ids.contains(job_id)
    }

    fn expire(&mut self) {
        while let Some((at, _)) = self.order.front() {
            if at.elapsed() < self.window {
                break;
            }
            let (_, old) = self.order.pop_front().expect("front exists");
            self.ids.remove(&old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_run_of_the_oldest_unacked_deliveries_is_acked_as_multiple() {
        let unacked: BTreeSet<u64> = [3, 4, 5, 7, 9].into();
        assert_eq!(oldest_run(&unacked, &[3, 4, 5]), 3);
        assert_eq!(oldest_run(&unacked, &[3, 4, 7]), 2, "5 is still running");
        assert_eq!(oldest_run(&unacked, &[4, 5]), 0, "3 is still running");
        assert_eq!(oldest_run(&unacked, &[3, 4, 5, 7, 9]), 5);
        assert_eq!(oldest_run(&unacked, &[]), 0);
    }

    #[test]
    fn recent_jobs_forget_by_age_and_by_count() {
        let mut recent = RecentJobs::new(Duration::from_secs(60), 2);
        recent.insert("a".into());
        recent.insert("b".into());
        recent.insert("a".into());
        assert!(recent.contains("a") && recent.contains("b"));
        recent.insert("c".into());
        assert!(!recent.contains("a"), "over capacity, the oldest goes");
        assert!(recent.contains("b") && recent.contains("c"));

        let mut recent = RecentJobs::new(Duration::ZERO, 10);
        recent.insert("a".into());
        assert!(!recent.contains("a"), "outside the window");
    }
}
