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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;

use amiquip::{AmqpProperties, AmqpValue, Channel, Confirm, ConfirmSmoother, FieldTable, Publish};
use crossbeam_channel::{never, select, Receiver, Sender};
use log::{debug, warn};

use crate::config::Topology;
use crate::job::{Event, EventKind, Status};
use crate::metrics::Metrics;
use crate::pipeline::{AckKey, Connected, ConsumerMsg, Publication};

/// Header of a message moved to the rejected queue that says why it was rejected.
pub const REJECT_REASON_HEADER: &str = "x-blacktree-reject-reason";

/// One message to publish.
struct Message {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: AmqpProperties,
}

/// The messages of one publication, and how many the broker has yet to confirm.
struct Entry {
    /// What to tell the consumer thread once all are confirmed (events: nothing).
    key: Option<AckKey>,
    messages: Vec<Message>,
    unconfirmed: usize,
}

struct Link {
    channel: Channel,
    confirms: Receiver<Confirm>,
    generation: u64,
    smoother: ConfirmSmoother,
    next_tag: u64,
    /// Confirm tag → (entry id, message index).
    tags: HashMap<u64, (u64, usize)>,
}

/// Starts the publisher thread. It ends when both input channels are closed.
pub fn spawn(
    topology: Topology,
    publications: Receiver<Publication>,
    connections: Receiver<Connected>,
    consumer: Sender<ConsumerMsg>,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    let publisher = Publisher {
        topology,
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
    consumer: Sender<ConsumerMsg>,
    metrics: Arc<Metrics>,
    entries: HashMap<u64, Entry>,
    next_entry: u64,
    /// Entries to publish once a channel is available, oldest first.
    waiting: VecDeque<u64>,
    link: Option<Link>,
}

impl Publisher {
    fn run(mut self, publications: Receiver<Publication>, connections: Receiver<Connected>) {
        let (mut publications, mut connections) = (Some(publications), Some(connections));
        while publications.is_some() || connections.is_some() {
            let confirms = self.link.as_ref().map(|l| l.confirms.clone());
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
            }
        }
    }

    fn add(&mut self, publication: Publication) {
        self.count_finished(&publication);
        let (key, messages) = match publication {
            Publication::Status(status) => {
                let mut messages = Vec::with_capacity(2);
                if self.topology.events_on() {
                    let finished =
                        Event::now(&status.job_id, EventKind::Finished, &status.worker_id);
                    messages.push(self.event_message(&finished));
                }
                messages.push(self.status_message(&status));
                (Some(AckKey::Job(status.job_id.clone())), messages)
            }
            Publication::Event(_) if !self.topology.events_on() => return,
            Publication::Event(event) => (None, vec![self.event_message(&event)]),
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
                }];
                messages.extend(status.map(|s| self.status_message(&s)));
                (Some(AckKey::Rejected(id)), messages)
            }
        };
        let id = self.next_entry;
        self.next_entry += 1;
        let unconfirmed = messages.len();
        self.entries.insert(
            id,
            Entry {
                key,
                messages,
                unconfirmed,
            },
        );
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
        let outcome = serde_json::to_value(status.outcome).expect("an outcome serialises");
        let outcome = outcome.as_str().expect("outcomes are strings");
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

    fn status_message(&self, status: &Status) -> Message {
        Message {
            exchange: self.topology.exchange.clone(),
            routing_key: self.topology.status_key.clone(),
            body: status.to_json(),
            properties: AmqpProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(status.job_id.clone()),
        }
    }

    /// The event's message (only called when events are on).
    fn event_message(&self, event: &Event) -> Message {
        Message {
            exchange: self.topology.exchange.clone(),
            routing_key: self.topology.events_key.clone(),
            body: event.to_json(),
            properties: AmqpProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(event.job_id.clone()),
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
        self.link = Some(Link {
            channel: connected.channel,
            confirms: connected.confirms,
            generation: connected.generation,
            smoother: ConfirmSmoother::new(),
            next_tag: 1,
            tags: HashMap::new(),
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
        let publish = Publish::with_properties(
            &message.body,
            message.routing_key.as_str(),
            message.properties.clone(),
        );
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
            let Some((id, index)) = self.link.as_mut().and_then(|l| l.tags.remove(&tag)) else {
                continue;
            };
            if !acked {
                warn!("broker refused a message (nack); publishing it again");
                self.publish_message(id, index);
                continue;
            }
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            entry.unconfirmed -= 1;
            if entry.unconfirmed == 0 {
                let entry = self.entries.remove(&id).expect("entry present");
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
        let mut ids: Vec<u64> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        for id in &ids {
            let entry = self.entries.get_mut(id).expect("listed entry");
            entry.unconfirmed = entry.messages.len();
        }
        self.waiting = ids.into();
        Some(link.generation)
    }
}
