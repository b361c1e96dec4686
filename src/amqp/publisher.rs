//! The status publisher thread.
//!
//! It owns a publishing channel with publisher confirms. Every [`Publication`] (a job's
//! status, a rejected message and its status, or a lifecycle event) is published at once,
//! confirms are pipelined, and only when the broker has confirmed every message of a
//! publication does the thread send [`ConsumerMsg::Confirmed`] so the consumer thread
//! acks the delivery (one message for all the publications one confirm completes: the
//! broker confirms many messages at once under load). When the channel is lost, every
//! unconfirmed publication is kept and published again on the next channel: a status
//! may be published twice, never lost.
//!
//! Live build output (`--logs-key`) is batched per job in [`logs`].
//!
//! Statuses are published `mandatory` and cut to `--max-status-bytes` (their logs keep
//! the tail). A status the broker returns (no queue is bound to the status key) or a
//! message it nacks is published again after a backoff, and its job stays unacked until
//! a publication is confirmed. A status whose channel was lost [`LOSSES_BEFORE_SHRINKING`]
//! times while it was unconfirmed (a broker refusing it, say for its size, closes the
//! channel) is sent without its logs from then on: it never blocks the others forever.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Confirm, ConfirmSmoother, Connection,
    ConnectionBlockedNotification, FieldTable, Publish, Return,
};
use crossbeam_channel::{at, never, select, Receiver, Sender};
use log::{debug, info, warn};

use crate::config::Topology;
use crate::job::{Event, EventKind, Status};
use crate::metrics::Metrics;
use crate::pipeline::{AckKey, Connected, ConsumerMsg, LogBudget, Publication};
use logs::LogBatches;
use retry::shrink;

mod logs;
mod retry;

/// Header of a message moved to the rejected queue that says why it was rejected.
pub const REJECT_REASON_HEADER: &str = "x-blacktree-reject-reason";

/// Channel losses while a publication was unconfirmed after which its statuses are sent
/// without their logs.
pub const LOSSES_BEFORE_SHRINKING: u32 = 3;

/// The first wait before a returned or nacked message is published again; it doubles
/// with each attempt, up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// One message to publish.
struct Message {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: AmqpProperties,
    /// A status: published `mandatory` (returned when no queue is bound to its key), and
    /// sent without its logs when the broker keeps refusing it.
    status: bool,
}

/// The messages of one publication, and how many the broker has yet to confirm.
struct Entry {
    /// What to tell the consumer thread once all are confirmed (events: nothing).
    key: Option<AckKey>,
    messages: Vec<Message>,
    unconfirmed: usize,
    /// Channels lost while it was unconfirmed.
    losses: u32,
    /// Returns and nacks so far (for the backoff).
    retries: u32,
    /// Bytes of live output it holds in the [`LogBudget`] until confirmed.
    log_bytes: usize,
}

struct Link {
    channel: Channel,
    /// Its connection (the publishing one); dropped after the channel.
    _connection: Connection,
    /// `connection.blocked` notifications of that connection.
    blocked: Receiver<ConnectionBlockedNotification>,
    confirms: Receiver<Confirm>,
    generation: u64,
    smoother: ConfirmSmoother,
    next_tag: u64,
    /// Confirm tag → (entry id, message index).
    tags: HashMap<u64, (u64, usize)>,
    /// Messages the broker returned as unroutable.
    returns: Receiver<Return>,
    /// Tags of returned messages whose confirm has not come yet.
    returned: HashSet<u64>,
}

/// What the publisher publishes where.
pub struct PublisherConfig {
    /// Exchange and routing keys.
    pub topology: Topology,
    /// This orchestrator's `--instance-id`, put in every status and event.
    pub instance_id: String,
    /// `--max-status-bytes`.
    pub max_status_bytes: usize,
}

/// Starts the publisher thread. It ends when both input channels are closed.
pub fn spawn(
    config: PublisherConfig,
    publications: Receiver<Publication>,
    connections: Receiver<Connected>,
    consumer: Sender<ConsumerMsg>,
    metrics: Arc<Metrics>,
    log_budget: Arc<LogBudget>,
) -> JoinHandle<()> {
    let PublisherConfig {
        topology,
        instance_id,
        max_status_bytes,
    } = config;
    let publisher = Publisher {
        logs: LogBatches::new(log_budget),
        topology,
        instance_id,
        max_status_bytes,
        retries: Vec::new(),
        consumer,
        metrics,
        entries: HashMap::new(),
        next_entry: 0,
        waiting: VecDeque::new(),
        link: None,
    };
    std::thread::Builder::new()
        .name("status-publisher".into())
        .spawn(move || publisher.run(publications, connections))
        .expect("spawning the status publisher thread")
}

struct Publisher {
    topology: Topology,
    /// This orchestrator's `--instance-id`, put in every status and event as
    /// `orchestratorId`.
    instance_id: String,
    max_status_bytes: usize,
    /// Messages to publish again, and when.
    retries: Vec<(Instant, u64, usize)>,
    consumer: Sender<ConsumerMsg>,
    metrics: Arc<Metrics>,
    entries: HashMap<u64, Entry>,
    next_entry: u64,
    /// Entries to publish once a channel is available, oldest first.
    waiting: VecDeque<u64>,
    link: Option<Link>,
    /// Live build output waiting to be published.
    logs: LogBatches,
}

impl Publisher {
    fn run(mut self, publications: Receiver<Publication>, connections: Receiver<Connected>) {
        let (mut publications, mut connections) = (Some(publications), Some(connections));
        while publications.is_some() || connections.is_some() {
            let confirms = self.link.as_ref().map(|l| l.confirms.clone());
            let returns = self.link.as_ref().map(|l| l.returns.clone());
            let blocked = self.link.as_ref().map(|l| l.blocked.clone());
            let retry = match self.retries.iter().map(|r| r.0).min() {
                Some(due) => at(due),
                None => never(),
            };
            let logs_due = self.logs.next_due().map_or_else(never, at);
            select! {
                recv(publications.as_ref().unwrap_or(&never())) -> msg => match msg {
                    Ok(publication) => self.add(publication),
                    Err(_) => publications = None,
                },
                recv(connections.as_ref().unwrap_or(&never())) -> msg => match msg {
                    Ok(connected) => self.connected(connected),
                    Err(_) => connections = None,
                },
                recv(confirms.as_ref().unwrap_or(&never())) -> msg => match msg {
                    Ok(confirm) => self.confirm(confirm),
                    Err(_) => self.lose_link("the confirm stream closed"),
                },
                recv(returns.as_ref().unwrap_or(&never())) -> msg => {
                    if let Ok(returned) = msg {
                        self.returned(&returned);
                    }
                },
                recv(retry) -> _ => self.retry_due(),
                recv(logs_due) -> _ => self.flush_due_logs(),
                recv(blocked.as_ref().unwrap_or(&never())) -> msg => {
                    if let Ok(notification) = msg {
                        self.blocked(notification);
                    }
                },
            }
        }
    }

    fn add(&mut self, publication: Publication) {
        self.count_finished(&publication);
        let (key, messages) = match publication {
            Publication::Logs(logs) => return self.add_logs(logs),
            Publication::Status(status) => {
                // The job's last lines go before its status.
                self.end_logs(&status.job_id);
                let mut messages = Vec::with_capacity(2);
                if self.topology.events_on() {
                    let finished =
                        Event::now(&status.job_id, EventKind::Finished, &status.worker_id);
                    messages.push(self.event_message(finished));
                }
                let key = AckKey::Job(status.job_id.clone());
                messages.push(self.status_message(status));
                (Some(key), messages)
            }
            Publication::Event(_) if !self.topology.events_on() => return,
            Publication::Event(event) => (None, vec![self.event_message(event)]),
            Publication::Rejected {
                id,
                body,
                reason,
                status,
            } => {
                let mut headers = FieldTable::new();
                headers.insert(REJECT_REASON_HEADER.into(), AmqpValue::LongString(reason));
                let mut properties = AmqpProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers);
                if let Some(status) = &status {
                    properties = properties.with_message_id(status.job_id.clone());
                }
                let mut messages = vec![Message {
                    exchange: String::new(),
                    routing_key: self.topology.rejected_queue.clone(),
                    body,
                    properties,
                    status: false,
                }];
                messages.extend(status.map(|s| self.status_message(s)));
                (Some(AckKey::Rejected(id)), messages)
            }
        };
        let unconfirmed = messages.len();
        self.push_entry(Entry {
            key,
            messages,
            unconfirmed,
            losses: 0,
            retries: 0,
            log_bytes: 0,
        });
    }

    /// Publishes a publication's messages now, or once a channel is available.
    fn push_entry(&mut self, entry: Entry) {
        let id = self.next_entry;
        self.next_entry += 1;
        self.entries.insert(id, entry);
        if self.link.is_some() && self.waiting.is_empty() {
            self.publish_entry(id);
        } else {
            self.waiting.push_back(id);
        }
    }

    /// Counts a job's end (each status is published once, republished ones aside).
    fn count_finished(&self, publication: &Publication) {
        let status = match publication {
            Publication::Status(status) => status,
            Publication::Rejected {
                status: Some(status),
                ..
            } => status,
            _ => return,
        };
        if status.started_at.is_none() {
            // One that ran was put on the board by its dispatch thread.
            self.metrics.board.finished_unstarted(status);
        }
        let outcome = status.outcome.word();
        self.metrics
            .jobs_finished
            .with_label_values(&[outcome])
            .inc();
        if status.started_at.is_some() {
            self.metrics
                .job_duration
                .observe(status.duration_ms as f64 / 1000.0);
        }
    }

    fn status_message(&self, mut status: Status) -> Message {
        status.orchestrator_id.clone_from(&self.instance_id);
        Message {
            exchange: self.topology.exchange.clone(),
            routing_key: self.topology.status_key.clone(),
            body: status.to_json_within(self.max_status_bytes),
            properties: AmqpProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(status.job_id.clone()),
            status: true,
        }
    }

    /// The event's message (only called when events are on).
    fn event_message(&self, mut event: Event) -> Message {
        event.orchestrator_id.clone_from(&self.instance_id);
        Message {
            exchange: self.topology.exchange.clone(),
            routing_key: self.topology.events_key.clone(),
            body: event.to_json(),
            properties: AmqpProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(event.job_id.clone()),
            status: false,
        }
    }

    fn connected(&mut self, connected: Connected) {
        if let Some(old) = &self.link {
            debug!(
                "publisher: channel of connection {} replaced",
                old.generation
            );
            self.lose_link_quietly();
        }
        let returns = match connected.channel.listen_for_returns() {
            Ok(returns) => returns,
            Err(e) => {
                warn!("publisher: cannot listen for returned messages: {e}");
                never()
            }
        };
        self.metrics.set_broker_blocked(false);
        self.link = Some(Link {
            channel: connected.channel,
            _connection: connected.connection,
            blocked: connected.blocked,
            confirms: connected.confirms,
            generation: connected.generation,
            smoother: ConfirmSmoother::new(),
            next_tag: 1,
            tags: HashMap::new(),
            returns,
            returned: HashSet::new(),
        });
        while self.link.is_some() {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            self.publish_entry(id);
        }
    }

    fn publish_entry(&mut self, id: u64) {
        let count = self.entries.get(&id).map_or(0, |e| e.messages.len());
        for index in 0..count {
            if !self.publish_message(id, index) {
                return;
            }
        }
    }

    /// Publishes one message; false when the channel was lost doing so.
    fn publish_message(&mut self, id: u64, index: usize) -> bool {
        let (Some(link), Some(entry)) = (self.link.as_mut(), self.entries.get(&id)) else {
            return false;
        };
        let message = &entry.messages[index];
        let mut publish = Publish::with_properties(
            &message.body,
            message.routing_key.as_str(),
            message.properties.clone(),
        );
        publish.mandatory = message.status;
        // The lines logged before this message was handed over go first (they wait for
        // it: `log_sink::defer`).
        crate::log_sink::flush();
        match link
            .channel
            .basic_publish(message.exchange.as_str(), publish)
        {
            Ok(()) => {
                link.tags.insert(link.next_tag, (id, index));
                link.next_tag += 1;
                true
            }
            Err(e) => {
                self.lose_link(&format!("publish failed: {e}"));
                false
            }
        }
    }

    fn confirm(&mut self, raw: Confirm) {
        // The broker sends a message's return before its confirm: take the returns that
        // are waiting first, so the confirm below knows.
        let waiting: Vec<Return> = self
            .link
            .as_ref()
            .map(|l| l.returns.try_iter().collect())
            .unwrap_or_default();
        for returned in &waiting {
            self.returned(returned);
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let confirms: Vec<Confirm> = link.smoother.process(raw).collect();
        let mut confirmed = Vec::new();
        for confirm in confirms {
            let (tag, acked) = match confirm {
                Confirm::Ack(p) => (p.delivery_tag, true),
                Confirm::Nack(p) => (p.delivery_tag, false),
            };
            let Some(link) = self.link.as_mut() else {
                continue;
            };
            let Some((id, index)) = link.tags.remove(&tag) else {
                continue;
            };
            if link.returned.remove(&tag) {
                self.metrics.statuses_unroutable.inc();
                self.schedule_retry(
                    id,
                    index,
                    "returned it as unroutable (no queue is bound to the status key)",
                );
                continue;
            }
            if !acked {
                self.schedule_retry(id, index, "refused it (nack)");
                continue;
            }
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            entry.unconfirmed -= 1;
            if entry.unconfirmed == 0 {
                let entry = self.entries.remove(&id).expect("entry present");
                self.logs.budget.give_back(entry.log_bytes);
                confirmed.extend(entry.key);
            }
        }
        if !confirmed.is_empty() {
            // The consumer thread lives as long as the process does its job.
            let _ = self.consumer.send(ConsumerMsg::Confirmed(confirmed));
        }
    }

    /// The channel failed: tell the consumer thread (it reconnects) and keep every
    /// unconfirmed publication for the next channel.
    fn lose_link(&mut self, why: &str) {
        if let Some(generation) = self.lose_link_quietly() {
            warn!("publisher: channel of connection {generation} lost: {why}");
            let _ = self.consumer.send(ConsumerMsg::PublisherLost(generation));
        }
    }

    fn lose_link_quietly(&mut self) -> Option<u64> {
        let link = self.link.take()?;
        let in_flight: HashSet<u64> = link.tags.values().map(|(id, _)| *id).collect();
        let mut ids: Vec<u64> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        for id in &ids {
            let entry = self.entries.get_mut(id).expect("listed entry");
            entry.unconfirmed = entry.messages.len();
            if in_flight.contains(id) {
                entry.losses += 1;
                if entry.losses == LOSSES_BEFORE_SHRINKING {
                    shrink(entry, &self.metrics);
                }
            }
        }
        // Everything unconfirmed goes out again on the next channel.
        self.retries.clear();
        self.waiting = ids.into();
        Some(link.generation)
    }

    /// The broker blocked (memory or disk alarm) or unblocked the publishing connection.
    fn blocked(&mut self, notification: ConnectionBlockedNotification) {
        match notification {
            ConnectionBlockedNotification::Blocked(reason) => {
                warn!(
                    "the broker blocks publishing ({reason}): statuses wait, and so do their acks"
                );
                self.metrics.set_broker_blocked(true);
            }
            ConnectionBlockedNotification::Unblocked => {
                info!("the broker unblocked publishing");
                self.metrics.set_broker_blocked(false);
            }
        }
    }

    /// Notes a message the broker returned; its confirm follows.
    fn returned(&mut self, returned: &Return) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let job_id = returned.properties.message_id().as_deref();
        let tag = link.tags.iter().find_map(|(tag, (id, index))| {
            let message = &self.entries.get(id)?.messages[*index];
            let same = message.routing_key == returned.routing_key
                && message.properties.message_id().as_deref() == job_id
                && !link.returned.contains(tag);
            same.then_some(*tag)
        });
        if let Some(tag) = tag {
            link.returned.insert(tag);
        }
    }
}
