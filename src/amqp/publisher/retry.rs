//! Publishing again: a message the broker returned or nacked goes out again after a
//! backoff; a status it keeps refusing goes without its logs.

use std::time::Instant;

use log::warn;

use super::{Entry, Publisher, FIRST_RETRY_DELAY, LOSSES_BEFORE_SHRINKING, MAX_RETRY_DELAY};
use crate::job::status_without_logs;
use crate::metrics::Metrics;

impl Publisher {
    /// Publishes a message again after a backoff that doubles with each attempt.
    pub(super) fn schedule_retry(&mut self, id: u64, index: usize, what: &str) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let delay = FIRST_RETRY_DELAY
            .saturating_mul(1 << entry.retries.min(16))
            .min(MAX_RETRY_DELAY);
        entry.retries += 1;
        let job = entry.messages[index]
            .properties
            .message_id()
            .clone()
            .unwrap_or_default();
        warn!(
            "the broker {what}: message of job {job} published again in {}",
            humantime::format_duration(delay)
        );
        self.retries.push((Instant::now() + delay, id, index));
    }

    /// Publishes the messages whose retry is due.
    pub(super) fn retry_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.retries.drain(..).partition(|r| r.0 <= now);
        self.retries = later;
        for (_, id, index) in due {
            if self.link.is_some() {
                self.publish_message(id, index);
            }
        }
    }
}

/// Replaces the statuses of a publication the broker keeps refusing by their versions
/// without logs.
pub(super) fn shrink(entry: &mut Entry, metrics: &Metrics) {
    let why = "the broker refused this status as it was (too large?); its logs were dropped";
    for message in entry.messages.iter_mut().filter(|m| m.status) {
        if let Some(smaller) = status_without_logs(&message.body, why) {
            let job = message.properties.message_id().clone().unwrap_or_default();
            warn!(
                "the status of job {job} ({} bytes) was unconfirmed through {LOSSES_BEFORE_SHRINKING} lost channels: sending it without its logs",
                message.body.len()
            );
            message.body = smaller;
            metrics.statuses_shrunk.inc();
        }
    }
}
