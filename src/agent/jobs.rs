//! The worker's jobs by jobId: the running ones, with the `RunJob` calls waiting for
//! each, and the answers of finished ones that no call received (held for the next call
//! of that jobId).
//!
//! A build does not depend on its caller: when the orchestrator that called `RunJob`
//! goes away (restart, crash, lost host), the build keeps running as an orphan, and a
//! later call for the same jobId (from the next orchestrator, which got the job's
//! redelivery) attaches to it. Whatever the number of calls, a jobId runs once here:
//! * a call for a running jobId attaches and gets its answer when it ends;
//! * a finished job's answer is held until a call received it, for at most
//!   `--hold-results`, within [`MAX_HELD`] answers and [`MAX_HELD_BYTES`] bytes (the
//!   oldest go first, logged);
//! * a received answer stays held for [`KEEP_DELIVERED`] more (or `--hold-results` when
//!   shorter): the orchestrator that received it may die or lose its broker before its
//!   status is confirmed, and the job's redelivery (to it or to another orchestrator)
//!   then gets the answer instead of running the build again;
//! * a call for a held jobId gets its answer at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use log::warn;
use protobuf::Message;

use super::executor::JobControl;
use super::live_log::LiveLog;
use crate::proto::job::JobResponse;

/// The most answers held at once.
pub const MAX_HELD: usize = 1000;
/// The most bytes of held answers at once.
pub const MAX_HELD_BYTES: usize = 256 * 1024 * 1024;
/// How long an answer stays held after a call received it: longer than the broker
/// takes to redeliver the job of an orchestrator that died or lost its connection.
pub const KEEP_DELIVERED: Duration = Duration::from_secs(60);

/// A running job: its control, and its answer once it ended.
pub struct Running {
    /// Stops it.
    pub control: Arc<JobControl>,
    /// Its output as it is printed, for calls that stream it.
    pub live: LiveLog,
    answer: Mutex<Answer>,
}

/// A running job's answer and the calls waiting for it.
#[derive(Default)]
struct Answer {
    value: Option<Arc<JobResponse>>,
    /// Waiting calls, by their waiter number.
    waiters: HashMap<u64, Waker>,
}

impl Running {
    /// Its answer if it ended; otherwise `waker` is woken when it does (and replaces
    /// what waiter `waiter` left before).
    pub fn answer_or_wait(&self, waiter: u64, waker: &Waker) -> Option<Arc<JobResponse>> {
        let mut answer = self.answer.lock().expect("answer lock");
        if answer.value.is_none() {
            answer.waiters.insert(waiter, waker.clone());
        }
        answer.value.clone()
    }

    /// Waiter `waiter` no longer waits (its caller went away).
    pub fn leave(&self, waiter: u64) {
        self.answer
            .lock()
            .expect("answer lock")
            .waiters
            .remove(&waiter);
    }
}

/// What a `RunJob` call for a jobId finds.
pub enum Begin {
    /// Nothing of that jobId here: it was taken; run it (and call [`JobTable::finish`]).
    Start(Arc<Running>),
    /// It is running: wait for its answer.
    Attach(Arc<Running>),
    /// It ended and its answer was held for this call.
    Held(JobResponse),
    /// Not started: no free slot, or the worker is shutting down.
    Full(&'static str),
}

/// An answer no call has received yet.
struct Held {
    answer: JobResponse,
    until: Instant,
    bytes: usize,
    /// A call received it: it is kept only for a redelivery, and goes unremarked.
    delivered: bool,
}

/// The table; see the module documentation.
pub struct JobTable {
    capacity: usize,
    hold_for: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    running: HashMap<String, Arc<Running>>,
    held: HashMap<String, Held>,
    held_bytes: usize,
    next_waiter: u64,
}

impl JobTable {
    /// A table of `capacity` running jobs that holds answers for `hold_for`.
    pub fn new(capacity: usize, hold_for: Duration) -> JobTable {
        JobTable {
            capacity,
            hold_for,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("job table lock")
    }

    /// What a call for `job_id` does; `closed`: why no new job may start (draining).
    pub fn begin(&self, job_id: &str, closed: Option<&'static str>) -> Begin {
        let mut inner = self.lock();
        inner.expire();
        if let Some(running) = inner.running.get(job_id) {
            return Begin::Attach(running.clone());
        }
        if let Some(held) = inner.held.get(job_id) {
            return Begin::Held(held.answer.clone());
        }
        if let Some(why) = closed {
            return Begin::Full(why);
        }
        if inner.running.len() >= self.capacity {
            return Begin::Full("no free slot");
        }
        let running = Arc::new(Running {
            control: Arc::default(),
            live: LiveLog::default(),
            answer: Mutex::default(),
        });
        inner.running.insert(job_id.to_string(), running.clone());
        Begin::Start(running)
    }

    /// A number no other waiter has.
    pub fn waiter(&self) -> u64 {
        let mut inner = self.lock();
        inner.next_waiter += 1;
        inner.next_waiter
    }

    /// Job `job_id` ended with `answer`: it is held until a call received it, and the
    /// waiting calls are woken.
    pub fn finish(&self, job_id: &str, answer: JobResponse) {
        self.end(job_id, answer, true);
    }

    /// Job `job_id` could not start (no thread): it is forgotten, and calls that
    /// attached meanwhile get `answer`.
    pub fn abandon(&self, job_id: &str, answer: JobResponse) {
        self.end(job_id, answer, false);
    }

    fn end(&self, job_id: &str, answer: JobResponse, hold: bool) {
        let mut inner = self.lock();
        let Some(running) = inner.running.remove(job_id) else {
            return;
        };
        if hold {
            inner.hold(job_id, answer.clone(), Instant::now() + self.hold_for);
        }
        drop(inner);
        running.live.close();
        let mut slot = running.answer.lock().expect("answer lock");
        slot.value = Some(Arc::new(answer));
        for (_, waker) in slot.waiters.drain() {
            waker.wake();
        }
    }

    /// A call received `job_id`'s answer: it stays held for [`KEEP_DELIVERED`] (or
    /// `--hold-results` when shorter) more, for a redelivery of the job.
    pub fn delivered(&self, job_id: &str) {
        let until = Instant::now() + KEEP_DELIVERED.min(self.hold_for);
        if let Some(held) = self.lock().held.get_mut(job_id) {
            held.until = held.until.min(until);
            held.delivered = true;
        }
    }

    /// Stops `job_id` if it runs (true), or drops its held answer: the caller gave up
    /// on it.
    pub fn cancel(&self, job_id: &str, why: &str) -> bool {
        let mut inner = self.lock();
        if let Some(running) = inner.running.get(job_id) {
            return running.control.cancel(why);
        }
        if let Some(held) = inner.held.remove(job_id) {
            inner.held_bytes -= held.bytes;
        }
        false
    }

    /// Jobs running now.
    pub fn running_count(&self) -> usize {
        self.lock().running.len()
    }

    /// Slots free for a new job.
    pub fn free_slots(&self) -> usize {
        self.capacity.saturating_sub(self.running_count())
    }

    /// The controls of every running job.
    pub fn running_controls(&self) -> Vec<Arc<JobControl>> {
        let inner = self.lock();
        inner.running.values().map(|r| r.control.clone()).collect()
    }

    /// The jobIds running here and those whose answer is held, each sorted.
    pub fn report(&self) -> (Vec<String>, Vec<String>) {
        let mut inner = self.lock();
        inner.expire();
        let mut running: Vec<String> = inner.running.keys().cloned().collect();
        let mut held: Vec<String> = inner.held.keys().cloned().collect();
        running.sort();
        held.sort();
        (running, held)
    }
}

impl Inner {
    fn hold(&mut self, job_id: &str, answer: JobResponse, until: Instant) {
        let bytes = answer.compute_size() as usize;
        if let Some(old) = self.held.remove(job_id) {
            self.held_bytes -= old.bytes;
        }
        self.held_bytes += bytes;
        self.held.insert(
            job_id.to_string(),
            Held {
                answer,
                until,
                bytes,
                delivered: false,
            },
        );
        while self.held.len() > MAX_HELD || self.held_bytes > MAX_HELD_BYTES {
            let oldest = self
                .held
                .iter()
                .min_by_key(|(_, held)| held.until)
                .map(|(id, _)| id.clone())
                .expect("over the bounds, so not empty");
            let held = self.held.remove(&oldest).expect("found above");
            if !held.delivered {
                warn!(
                    "job {oldest}: its answer is dropped unreceived: more than {MAX_HELD} answers or {MAX_HELD_BYTES} bytes are held"
                );
            }
            self.held_bytes -= held.bytes;
        }
    }

    /// Drops the answers held past their time.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut freed = 0;
        self.held.retain(|job_id, held| {
            let keep = held.until > now;
            if !keep && !held.delivered {
                warn!("job {job_id}: its answer was held unreceived for too long; dropped");
                freed += held.bytes;
            }
            keep
        });
        self.held_bytes -= freed;
    }
}

#[cfg(test)]
mod tests;
