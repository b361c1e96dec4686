//! The AMQP consumer thread: the amiquip layer around the [`Ledger`].
//!
//! It owns the broker connection, the consuming channel and every unacknowledged
//! delivery, and it is the only thread that acks (amiquip acks a delivery only on the
//! channel that received it). Its loop takes the next event (`next_event`,
//! one `select!` over its inputs) and handles it (`handle_event`):
//!
//! * deliveries from `execute.queue` and `cancel.queue` go to the ledger, which decides
//!   (a job joins the backlog or is rejected; a cancel drops, stops or remembers a job);
//! * its inbox ([`ConsumerMsg`]): statuses confirmed (ack their deliveries), a job not
//!   started (requeue it), the publisher lost its channel, drain;
//! * the bounded `jobs` channel to the dispatch pool, which takes the backlog's oldest
//!   job while it has room (its capacity is the prefetch, so it rarely fills). A job
//!   sits there until a dispatch thread is free, without waking this thread again; the
//!   consumer takes unstarted jobs back from the same channel on a drain or when the
//!   connection is lost, and a cancel fires the job's token (the dispatch thread that
//!   takes it publishes `cancelled` instead of running it).
//!
//! The ledger's [`Action`]s are carried out here: acks (a run of the oldest unacked
//! deliveries as one multiple ack), nacks and publications.
//!
//! Jobs and cancels are consumed on channels of their own. A multiple ack covers every
//! delivery of its channel up to its tag, so the channel it goes to must carry nothing
//! this thread has not read yet: on the jobs channel, deliveries come in tag order from
//! one consumer. Cancel deliveries are acked one by one; the ledger tells their tags
//! apart by [`CANCEL_TAG`].

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection, ConsumerMessage, ConsumerOptions, Delivery};
use crossbeam_channel::{Receiver, Select, Sender};
use log::{debug, info, warn};

use super::ledger::{Action, Ledger, LedgerConfig, Stats, CANCEL_TAG};
use super::Brokers;
use crate::config::Topology;
use crate::metrics::Metrics;
use crate::orchestrator::state_file::{EarlyCancel, StateFile};
use crate::pipeline::{Assignment, Connected, ConsumerMsg, Publication, Router};

/// First and longest pause between two connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The exit code when the broker refuses the configuration itself (a queue of another
/// type than `--queue-type`): the command line's usage error.
const EXIT_MISCONFIGURED: i32 = 2;
/// How long a cancelled consumer's `ClientCancelled` may take once the broker
/// confirmed the cancel (it follows at once).
const CANCEL_OK_WAIT: Duration = Duration::from_secs(10);
/// A connection that lived this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(5);

mod connect;

/// The consuming channels of one connection.
struct Channels {
    jobs: Channel,
    cancels: Channel,
}

impl Channels {
    /// The channel a delivery with this (ledger) tag came on.
    fn of(&self, tag: u64) -> &Channel {
        if tag & CANCEL_TAG != 0 {
            &self.cancels
        } else {
            &self.jobs
        }
    }
}

/// Settings of the consumer thread.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The broker's nodes: the first that answers is used, the others on its loss.
    pub brokers: Brokers,
    /// Queue and exchange names.
    pub topology: Topology,
    /// This orchestrator's `--instance-id`: it names its own cancel queue.
    pub instance_id: String,
    /// Most unacknowledged deliveries at once (jobs held back for their labels apart).
    pub prefetch: u16,
    /// The most jobs held back for their labels outside the prefetch window.
    pub max_parked: usize,
    /// The ledger's settings.
    pub ledger: LedgerConfig,
    /// Early cancels the state file remembered at start.
    pub remembered_cancels: Vec<EarlyCancel>,
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
    /// Where early cancels are remembered, if anywhere.
    pub state_file: Option<Arc<StateFile>>,
    /// Signalled when workers changed (jobs held back for their labels may go now).
    pub routing: Receiver<()>,
    /// Which labels a worker can take now.
    pub router: Arc<dyn Router>,
}

/// Starts the consumer thread; it returns when a drain has finished.
pub fn spawn(config: ConsumerConfig, links: ConsumerLinks) -> JoinHandle<()> {
    let consumer = Consumer {
        ledger: Ledger::new(
            config.ledger.clone(),
            links.metrics.clone(),
            config.remembered_cancels.clone(),
        )
        .with_router(links.router.clone()),
        config,
        links,
        generation: 0,
        node: 0,
        window: 0,
        deliveries: HashMap::new(),
    };
    std::thread::Builder::new()
        .name("amqp-consumer".into())
        .spawn(move || consumer.run())
        .expect("spawning the AMQP consumer thread")
}

struct Consumer {
    config: ConsumerConfig,
    links: ConsumerLinks,
    ledger: Ledger,
    /// Incremented on each connection; the publisher tags its channel with it.
    generation: u64,
    /// The index of the broker URL tried first at the next connection: the one in use,
    /// and after its loss the next one.
    node: usize,
    /// The live channels' deliveries not acked or nacked yet, by ledger tag (amiquip
    /// acks a `Delivery`, not a tag).
    deliveries: HashMap<u64, Delivery>,
    /// Counts the consumers of the execute queue (see [`Consumer::widen_window`]).
    window: u64,
}

/// Which queue a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Jobs,
    Cancels,
}

/// The consumers of one connection: what each reads and whether it still delivers.
type Consumers<'a> = Vec<(Source, amiquip::Consumer<'a>, bool)>;

/// Cancels every consumer still active (drain); their `ClientCancelled` follows.
fn stop_consuming(consumers: &Consumers<'_>) -> Result<(), String> {
    for (_, consumer, active) in consumers {
        if *active {
            consumer.cancel().map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// One input of the consuming loop (`job::Event` is a lifecycle event, not this).
// Most events are deliveries (as in amiquip's own `ConsumerMessage`): boxing them would
// allocate once per message for nothing.
#[allow(clippy::large_enum_variant)]
enum Input {
    /// From the consumer with this index.
    Delivery(usize, Result<ConsumerMessage, crossbeam_channel::RecvError>),
    Inbox(ConsumerMsg),
    /// A job went to the dispatch pool.
    Sent,
    /// Workers changed: jobs held back for their labels may go now.
    RoutingChanged,
    /// The drain deadline passed, or a job held back reached `--unroutable-after`.
    Tick,
}

impl Consumer {
    fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        while !self.ledger.drain_finished() {
            match self.connect() {
                Ok((connection, channels, own_cancels)) => {
                    let started = Instant::now();
                    let result = self.consume(&channels, &own_cancels);
                    drop(channels);
                    self.end_session(connection, result);
                    // The node is lost: the others are tried first, in turn.
                    self.node = (self.node + 1) % self.config.brokers.count();
                    if started.elapsed() >= STABLE_SESSION {
                        backoff = BACKOFF_MIN;
                    }
                }
                Err(e) => warn!("broker: {e}"),
            }
            if self.ledger.drain_finished() {
                break;
            }
            info!(
                "broker: reconnecting in {}",
                humantime::format_duration(backoff)
            );
            self.serve_disconnected(Instant::now() + backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let Stats {
            received,
            duplicates,
        } = self.ledger.stats();
        let rejected = self.links.metrics.jobs_rejected.get();
        info!(
            "consumer stopped: {received} messages received, {rejected} rejected, \
             {duplicates} duplicates not run again, {} jobs left unfinished",
            self.ledger.unfinished()
        );
        if self.ledger.unfinished() > 0 {
            info!(
                "handing over {}: the broker redelivers them to the next orchestrator, \
                 which adopts the builds our workers keep running",
                crate::plural::count(self.ledger.unfinished(), "running job")
            );
        }
    }

    /// Consumes until the connection fails (`Err`) or the drain finished (`Ok`): jobs,
    /// and cancels from the shared cancel queue and from this orchestrator's own.
    fn consume(&mut self, channels: &Channels, own_cancels: &str) -> Result<(), String> {
        let topology = &self.config.topology;
        let mut consumers = Vec::new();
        for (source, queue, channel) in [
            (
                Source::Jobs,
                topology.execute_queue.as_str(),
                &channels.jobs,
            ),
            (
                Source::Cancels,
                topology.cancel_queue.as_str(),
                &channels.cancels,
            ),
            (Source::Cancels, own_cancels, &channels.cancels),
        ] {
            let consumer = channel
                .basic_consume(queue, ConsumerOptions::default())
                .map_err(|e| format!("consuming {queue}: {e}"))?;
            consumers.push((source, consumer, true));
        }
        self.window += 1;
        self.ledger.new_window(self.window);
        if self.ledger.drain_deadline().is_some() {
            stop_consuming(&consumers)?;
        }
        while !self.ledger.drain_finished() {
            let event = self.next_event(&consumers)?;
            self.handle_event(channels, &mut consumers, event)?;
            self.widen_window(channels, &mut consumers)?;
        }
        Ok(())
    }

    /// Keeps the jobs held back for their labels out of the prefetch window, which
    /// RabbitMQ counts per consumer: once they fill half of it, the execute queue's
    /// consumer is cancelled and a new one takes its place with a window of its own.
    /// Their deliveries stay unacked on the channel (acked there as usual), so they
    /// take room in no window; `--max-parked-jobs` bounds them, and so that jobs not
    /// held back cannot pile up either, this waits while more of those are in hand than
    /// twice the prefetch.
    ///
    /// Everything the old consumer was sent comes before its `ClientCancelled`; it is
    /// all read before the new consumer starts, so deliveries are still read in tag
    /// order (multiple acks rely on it).
    fn widen_window<'a>(
        &mut self,
        channels: &'a Channels,
        consumers: &mut Consumers<'a>,
    ) -> Result<(), String> {
        let prefetch = usize::from(self.config.prefetch);
        let (parked, in_window) = self.ledger.parked();
        let in_hand = self.ledger.unfinished().saturating_sub(parked);
        if in_window < (prefetch / 2).max(1)
            || parked >= self.config.max_parked
            || in_hand > 2 * prefetch
            || self.ledger.drain_deadline().is_some()
        {
            return Ok(());
        }
        let Some(i) = consumers
            .iter()
            .position(|(source, _, active)| *source == Source::Jobs && *active)
        else {
            return Ok(());
        };
        consumers[i].1.cancel().map_err(|e| e.to_string())?;
        loop {
            let message = consumers[i]
                .1
                .receiver()
                .recv_timeout(CANCEL_OK_WAIT)
                .map_err(|_| "the execute queue's consumer did not end".to_string())?;
            if matches!(message, ConsumerMessage::ClientCancelled) {
                break;
            }
            self.handle_event(channels, consumers, Input::Delivery(i, Ok(message)))?;
        }
        consumers.remove(i);
        let queue = self.config.topology.execute_queue.as_str();
        let consumer = channels
            .jobs
            .basic_consume(queue, ConsumerOptions::default())
            .map_err(|e| format!("consuming {queue}: {e}"))?;
        consumers.push((Source::Jobs, consumer, true));
        self.window += 1;
        self.ledger.new_window(self.window);
        debug!("{parked} jobs held back for their labels: consuming {queue} afresh");
        Ok(())
    }

    /// Waits for the next input: a delivery, an inbox message, room in the `jobs`
    /// channel for the backlog's oldest job (sent here), or the drain deadline.
    fn next_event(&mut self, consumers: &Consumers<'_>) -> Result<Input, String> {
        let mut sel = Select::new();
        let listening: Vec<(usize, usize)> = consumers
            .iter()
            .enumerate()
            .filter(|(_, (_, _, active))| *active)
            .map(|(i, (_, consumer, _))| (sel.recv(consumer.receiver()), i))
            .collect();
        let inbox = sel.recv(&self.links.inbox);
        let routing = sel.recv(&self.links.routing);
        let send = self
            .ledger
            .has_backlog()
            .then(|| sel.send(&self.links.jobs));
        let deadline = match (self.ledger.drain_deadline(), self.ledger.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let selected = match deadline {
            Some(deadline) => sel.select_deadline(deadline).ok(),
            None => Some(sel.select()),
        };
        let Some(op) = selected else {
            return Ok(Input::Tick);
        };
        if op.index() == inbox {
            return op
                .recv(&self.links.inbox)
                .map(Input::Inbox)
                .map_err(|_| "the orchestrator stopped".to_string());
        }
        if op.index() == routing {
            // The registry outlives this thread.
            let _ = op.recv(&self.links.routing);
            return Ok(Input::RoutingChanged);
        }
        if Some(op.index()) == send {
            let assignment = self.ledger.next_job().expect("the backlog is not empty");
            return op
                .send(&self.links.jobs, assignment)
                .map(|()| Input::Sent)
                .map_err(|_| "the dispatch pool stopped".to_string());
        }
        let (_, i) = *listening
            .iter()
            .find(|(index, _)| *index == op.index())
            .expect("a consumer was selected");
        Ok(Input::Delivery(i, op.recv(consumers[i].1.receiver())))
    }

    fn handle_event(
        &mut self,
        channels: &Channels,
        consumers: &mut Consumers<'_>,
        event: Input,
    ) -> Result<(), String> {
        match event {
            Input::Delivery(i, Ok(ConsumerMessage::Delivery(mut delivery))) => {
                let source = consumers[i].0;
                let redelivered = delivery.redelivered;
                let tag = match source {
                    Source::Jobs => delivery.delivery_tag(),
                    Source::Cancels => delivery.delivery_tag() | CANCEL_TAG,
                };
                let body = std::mem::take(&mut delivery.body);
                self.deliveries.insert(tag, delivery);
                let actions = match source {
                    Source::Jobs => self.ledger.job_delivery(tag, body, redelivered),
                    Source::Cancels => self.ledger.cancel_delivery(tag, body),
                };
                self.apply(Some(channels), actions)
            }
            Input::Delivery(i, Ok(ConsumerMessage::ClientCancelled)) => {
                consumers[i].2 = false;
                Ok(())
            }
            Input::Delivery(_, Ok(other)) => Err(format!("consumer ended: {other:?}")),
            Input::Delivery(..) => Err("the connection closed".to_string()),
            Input::Inbox(ConsumerMsg::PublisherLost(generation))
                if generation == self.generation =>
            {
                Err("the publishing channel failed".to_string())
            }
            Input::Inbox(msg) => {
                if matches!(msg, ConsumerMsg::Drain) {
                    stop_consuming(consumers)?;
                }
                self.inbox(msg, Some(channels))
            }
            Input::RoutingChanged => {
                self.ledger.routing_changed();
                Ok(())
            }
            Input::Tick => {
                let actions = self.ledger.expire_unroutable();
                self.apply(Some(channels), actions)
            }
            Input::Sent => Ok(()),
        }
    }

    /// While disconnected: serve the inbox until `until` (or the drain finishes).
    fn serve_disconnected(&mut self, until: Instant) {
        while !self.ledger.drain_finished() {
            let deadline = self.ledger.drain_deadline().map_or(until, |d| d.min(until));
            match self.links.inbox.recv_deadline(deadline) {
                Ok(msg) => {
                    // Nothing can fail without a channel.
                    let _ = self.inbox(msg, None);
                }
                Err(_) if Instant::now() >= until => return,
                Err(_) => {}
            }
        }
    }

    /// Handles an inbox message; `channels` is `None` while disconnected.
    fn inbox(&mut self, msg: ConsumerMsg, channels: Option<&Channels>) -> Result<(), String> {
        let actions = match msg {
            ConsumerMsg::Confirmed(keys) => self.ledger.confirmed(keys),
            ConsumerMsg::Requeue(job_id) => self.ledger.requeue(&job_id),
            ConsumerMsg::Unroutable(assignment) => self.ledger.unroutable(*assignment),
            ConsumerMsg::Drain => {
                let unstarted = self.links.unstarted.try_iter().collect();
                self.ledger.start_drain(unstarted)
            }
            ConsumerMsg::PublisherLost(generation) => {
                debug!("publisher lost the channel of old connection {generation}");
                Vec::new()
            }
        };
        self.apply(channels, actions)
    }

    /// Carries out the ledger's actions. Without channels there is nothing to ack: the
    /// ledger forgot the dead connection's deliveries.
    fn apply(&mut self, channels: Option<&Channels>, actions: Vec<Action>) -> Result<(), String> {
        let amqp = |e: amiquip::Error| e.to_string();
        for action in actions {
            match action {
                Action::Publish(publication) => {
                    // The publisher outlives the consumer thread.
                    let _ = self.links.publications.send(publication);
                }
                Action::Remember(cancels) => {
                    if let Some(file) = &self.links.state_file {
                        if let Err(e) = file.save_cancels(cancels) {
                            warn!("{e}: the latest early cancel is remembered in memory only");
                        }
                    }
                }
                Action::Nack(tag) => {
                    if let (Some(channels), Some(delivery)) =
                        (channels, self.deliveries.remove(&tag))
                    {
                        delivery.nack(channels.of(tag), true).map_err(amqp)?;
                    }
                }
                Action::Ack { run, single } => {
                    let Some(channels) = channels else { continue };
                    // A run is jobs only: the ledger never counts cancels in one.
                    if let Some((last, older)) = run.split_last() {
                        for tag in older {
                            self.deliveries.remove(tag);
                        }
                        if let Some(delivery) = self.deliveries.remove(last) {
                            delivery.ack_multiple(&channels.jobs).map_err(amqp)?;
                        }
                    }
                    for tag in single {
                        if let Some(delivery) = self.deliveries.remove(&tag) {
                            delivery.ack(channels.of(tag)).map_err(amqp)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn end_session(&mut self, connection: Connection, result: Result<(), String>) {
        if let Err(e) = result {
            warn!("broker: connection {} lost: {e}", self.generation);
        }
        self.links.metrics.set_broker_connected(false);
        self.links.metrics.set_broker_in_use("");
        let _ = connection.close();
        // Deliveries of a dead connection cannot be acked; the broker redelivers them.
        self.deliveries.clear();
        let unstarted = self.links.unstarted.try_iter().collect();
        let actions = self.ledger.connection_lost(unstarted);
        // Publications only: there is no channel to ack on.
        let _ = self.apply(None, actions);
    }
}
