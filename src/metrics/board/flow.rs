//! Jobs received and finished, and how long they waited for a worker, minute by minute
//! over the last hour (the status page's charts). Fixed size: one bucket per minute.

use std::time::{Duration, Instant};

/// The minutes the charts cover.
pub const MINUTES: usize = 60;

/// One minute's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Minute {
    /// Jobs consumed.
    pub received: u32,
    /// Statuses published.
    pub finished: u32,
    /// Jobs that reached a worker, and their summed and longest wait for one.
    pub waited: u32,
    /// Milliseconds, summed over `waited`.
    pub wait_ms_sum: u64,
    /// The longest wait, in milliseconds.
    pub wait_ms_max: u64,
}

impl Minute {
    /// The mean wait for a worker in milliseconds (0 when no job reached one).
    pub fn wait_ms_mean(&self) -> u64 {
        self.wait_ms_sum
            .checked_div(u64::from(self.waited))
            .unwrap_or(0)
    }
}

/// A ring of [`MINUTES`] buckets, each stamped with the minute (since `start`) it holds.
#[derive(Debug)]
pub struct Flow {
    start: Instant,
    buckets: [(u64, Minute); MINUTES],
}

impl Flow {
    /// An empty hour starting now.
    pub fn new(start: Instant) -> Flow {
        Flow {
            start,
            buckets: [(u64::MAX, Minute::default()); MINUTES],
        }
    }

    fn minute_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_secs() / 60
    }

    /// The bucket of minute `at`, emptied first when it held an older minute.
    fn bucket(&mut self, at: Instant) -> &mut Minute {
        let minute = self.minute_of(at);
        let (stamp, counts) = &mut self.buckets[(minute % MINUTES as u64) as usize];
        if *stamp != minute {
            *stamp = minute;
            *counts = Minute::default();
        }
        counts
    }

    /// A job was consumed at `at`.
    pub fn received(&mut self, at: Instant) {
        self.bucket(at).received += 1;
    }

    /// A status was published at `at`.
    pub fn finished(&mut self, at: Instant) {
        self.bucket(at).finished += 1;
    }

    /// A job reached a worker at `at` after waiting `wait` since it was consumed.
    pub fn waited(&mut self, at: Instant, wait: Duration) {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let bucket = self.bucket(at);
        bucket.waited += 1;
        bucket.wait_ms_sum = bucket.wait_ms_sum.saturating_add(ms);
        bucket.wait_ms_max = bucket.wait_ms_max.max(ms);
    }

    /// The last [`MINUTES`] minutes up to `now`, oldest first (minutes without a job
    /// count zero).
    pub fn hour(&self, now: Instant) -> Vec<Minute> {
        let current = self.minute_of(now);
        (0..MINUTES as u64)
            .rev()
            .map(|ago| match current.checked_sub(ago) {
                Some(minute) => {
                    let (stamp, counts) = self.buckets[(minute % MINUTES as u64) as usize];
                    if stamp == minute {
                        counts
                    } else {
                        Minute::default()
                    }
                }
                None => Minute::default(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_minute_and_an_hour_later_the_bucket_is_reused() {
        let start = Instant::now();
        let mut flow = Flow::new(start);
        let minute = |m: u64| start + Duration::from_secs(60 * m + 1);
        flow.received(minute(0));
        flow.received(minute(0));
        flow.finished(minute(2));
        flow.waited(minute(2), Duration::from_millis(30));
        flow.waited(minute(2), Duration::from_millis(10));
        let hour = flow.hour(minute(2));
        assert_eq!(hour.len(), MINUTES);
        assert_eq!(hour[MINUTES - 3].received, 2, "two minutes ago");
        let now = hour[MINUTES - 1];
        assert_eq!((now.finished, now.waited, now.wait_ms_max), (1, 2, 30));
        assert_eq!(now.wait_ms_mean(), 20);
        // Minute 60 shares minute 0's bucket: the old counts are gone, not added to.
        flow.received(minute(60));
        let hour = flow.hour(minute(60));
        assert_eq!(hour[MINUTES - 1].received, 1);
        assert_eq!(
            hour.iter().map(|m| m.received).sum::<u32>(),
            1,
            "minute 0 is out of the hour"
        );
        assert_eq!(hour[MINUTES - 59].finished, 1, "minute 2 still is");
    }
}
