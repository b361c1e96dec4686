//! The test's own publisher: jobs in confirmed batches, on a connection that survives
//! broker faults.

use std::collections::HashSet;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, Channel, Confirm, ConfirmSmoother, Connection, Publish};
use crossbeam_channel::Receiver;
use serde_json::json;

use crate::common::poll;

use crate::*;

/// What the test's publisher did.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Jobs it published more than once (a batch not confirmed in full is published
    /// again, and some of it may have reached the queue the first time).
    pub republished: HashSet<String>,
    /// Connections it had to open again.
    pub reconnects: u32,
}

/// Publishes `ids` in confirmed batches spread over `duration`, on a connection of its
/// own that survives broker faults.
pub fn spawn_publisher(
    url: String,
    exchange: String,
    ids: Vec<String>,
    duration: Duration,
) -> JoinHandle<Published> {
    std::thread::spawn(move || {
        let mut publisher = ConfirmedPublisher {
            url,
            exchange,
            link: None,
            sent: HashSet::new(),
            published: Published::default(),
        };
        let batches = ids.len().div_ceil(BATCH).max(1);
        let pace = duration / batches as u32;
        let started = Instant::now();
        for (i, batch) in ids.chunks(BATCH).enumerate() {
            // Batch i goes out at i × pace: jobs arrive gradually (the workload).
            let due = started + pace * i as u32;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            poll(LONG, "a batch of jobs to be confirmed", || {
                publisher.publish(batch).ok()
            });
        }
        publisher.published
    })
}

/// A channel with publisher confirms on a connection of the publisher's own.
pub struct Link {
    // Declared before the connection: the channel closes first.
    pub channel: Channel,
    pub confirms: Receiver<Confirm>,
    pub smoother: ConfirmSmoother,
    pub _connection: Connection,
}

impl Link {
    pub fn open(url: &str) -> Result<Link, String> {
        let mut connection = blacktree::amqp::AmqpUrl::parse(url)?.connect()?;
        let channel = connection.open_channel(None).map_err(|e| e.to_string())?;
        let confirms = channel
            .listen_for_publisher_confirms()
            .map_err(|e| e.to_string())?;
        channel
            .enable_publisher_confirms()
            .map_err(|e| e.to_string())?;
        Ok(Link {
            channel,
            confirms,
            smoother: ConfirmSmoother::new(),
            _connection: connection,
        })
    }

    /// Waits for the broker to ack the next `n` publications.
    pub fn acked(&mut self, n: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut acked = 0;
        while acked < n {
            let confirm = self
                .confirms
                .recv_deadline(deadline)
                .map_err(|e| format!("no confirm: {e}"))?;
            for confirm in self.smoother.process(confirm) {
                match confirm {
                    Confirm::Ack(_) => acked += 1,
                    Confirm::Nack(_) => return Err("the broker nacked a job".into()),
                }
            }
        }
        Ok(())
    }
}

/// Publishes jobs with publisher confirms; any failure drops the connection, and the
/// batch is published again on a new one.
pub struct ConfirmedPublisher {
    pub url: String,
    pub exchange: String,
    pub link: Option<Link>,
    /// Jobs handed to a channel at least once.
    pub sent: HashSet<String>,
    pub published: Published,
}

impl ConfirmedPublisher {
    /// Publishes `ids` as persistent job messages and waits for their confirms.
    pub fn publish(&mut self, ids: &[String]) -> Result<(), String> {
        let result = self.try_publish(ids);
        if result.is_err() && self.link.take().is_some() {
            self.published.reconnects += 1;
        }
        result
    }

    pub fn try_publish(&mut self, ids: &[String]) -> Result<(), String> {
        if self.link.is_none() {
            self.link = Some(Link::open(&self.url)?);
        }
        let link = self.link.as_mut().expect("connected");
        for id in ids {
            let body = serde_json::to_vec(&json!({ "jobId": id })).unwrap();
            let properties = AmqpProperties::default().with_delivery_mode(2);
            link.channel
                .basic_publish(
                    self.exchange.as_str(),
                    Publish::with_properties(&body, "worker.execute", properties),
                )
                .map_err(|e| e.to_string())?;
            if !self.sent.insert(id.clone()) {
                self.published.republished.insert(id.clone());
            }
        }
        link.acked(ids.len())
    }
}
