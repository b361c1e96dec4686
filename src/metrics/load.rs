//! The metrics an autoscaler acts on: jobs waiting for a worker and how long the oldest
//! has waited, worker slots by state, busy dispatch threads, and the registered slots
//! the dispatch threads cannot use.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{Gauge, IntGauge, IntGaugeVec, Opts};

use crate::labels::Labels;

/// Worker slots by state, summed over the workers (what `blacktree_worker_slots` shows).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    /// Free for a job now.
    pub free: u64,
    /// Running a job (ours or another orchestrator's).
    pub busy: u64,
    /// On workers that do not answer pings.
    pub unhealthy: u64,
    /// On workers that said BUSY or refused a job: none until a ping says FREE.
    pub withheld: u64,
}

/// The gauges, and the jobs waiting now (consumed, not yet on a worker).
pub struct Load {
    /// By the labels the jobs require (`""`: none); a label set's series goes when no
    /// job with it waits, so their number is bounded by the jobs held.
    jobs_waiting: IntGaugeVec,
    /// The label sets `jobs_waiting` has a series for.
    shown: Mutex<HashSet<Arc<str>>>,
    oldest_waiting: Gauge,
    slots: IntGaugeVec,
    /// Dispatch threads with a job (waiting for a slot, or running it).
    pub dispatch_threads_busy: IntGauge,
    slots_beyond_threads: IntGauge,
    dispatch_threads: u64,
    /// Whether the slots beyond the dispatch threads were warned about.
    warned: AtomicBool,
    /// The waiting jobs, by a number of their own (in the order they started to wait).
    waiting: Mutex<BTreeMap<u64, WaitingEntry>>,
    next: AtomicU64,
}

/// What is known of a waiting job.
#[derive(Debug)]
struct WaitingEntry {
    job_id: Box<str>,
    /// When it was consumed.
    since: Instant,
    /// The labels it requires, as `k=v,…`.
    labels: Arc<str>,
}

/// A waiting job, as the status page lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingJob {
    /// Its id.
    pub job_id: String,
    /// How long since it was consumed.
    pub age: std::time::Duration,
    /// The labels it requires (`k=v,…`; empty: none).
    pub labels: String,
}

/// A job waiting for a worker: it stops waiting when dropped.
pub struct Waiting {
    load: Arc<Load>,
    id: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.load
            .waiting
            .lock()
            .expect("waiting jobs lock")
            .remove(&self.id);
    }
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Waiting({})", self.id)
    }
}

impl Load {
    /// The gauges, registered in `registry`; `dispatch_threads` is `--dispatch-threads`.
    pub fn new(registry: &prometheus::Registry, dispatch_threads: u64) -> Load {
        let int = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let load = Load {
            jobs_waiting: IntGaugeVec::new(
                Opts::new(
                    "blacktree_jobs_waiting",
                    "Jobs consumed and not yet on a worker (the queue behind the workers), \
                     by the labels they require (\"\": none).",
                ),
                &["labels"],
            )
            .expect("valid metric"),
            shown: Mutex::default(),
            oldest_waiting: Gauge::new(
                "blacktree_oldest_waiting_job_age_seconds",
                "How long the job waiting longest has waited for a worker (0: none waits).",
            )
            .expect("valid metric"),
            slots: IntGaugeVec::new(
                Opts::new("blacktree_worker_slots", "Worker slots by state."),
                &["state"],
            )
            .expect("valid metric"),
            dispatch_threads_busy: int(
                "blacktree_dispatch_threads_busy",
                "Dispatch threads with a job (waiting for a slot or running it).",
            ),
            slots_beyond_threads: int(
                "blacktree_slots_beyond_dispatch_threads",
                "Registered healthy slots beyond --dispatch-threads: they cannot all be used.",
            ),
            dispatch_threads,
            warned: AtomicBool::new(false),
            waiting: Mutex::default(),
            next: AtomicU64::new(0),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 5] = [
            Box::new(load.jobs_waiting.clone()),
            Box::new(load.oldest_waiting.clone()),
            Box::new(load.slots.clone()),
            Box::new(load.dispatch_threads_busy.clone()),
            Box::new(load.slots_beyond_threads.clone()),
        ];
        super::register(registry, collectors);
        load
    }

    /// The job `job_id`, consumed at `since` and requiring `labels`, waits for a worker
    /// until the returned value is dropped.
    pub fn waiting(self: &Arc<Load>, job_id: &str, labels: &Labels, since: Instant) -> Waiting {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = WaitingEntry {
            job_id: job_id.into(),
            since,
            labels: labels.to_string().into(),
        };
        self.waiting
            .lock()
            .expect("waiting jobs lock")
            .insert(id, entry);
        Waiting {
            load: self.clone(),
            id,
        }
    }

    /// How many jobs wait, and the `limit` that have waited longest, longest first.
    pub fn waiting_jobs(&self, limit: usize) -> (usize, Vec<WaitingJob>) {
        let waiting = self.waiting.lock().expect("waiting jobs lock");
        let mut jobs: Vec<&WaitingEntry> = waiting.values().collect();
        jobs.sort_by_key(|entry| entry.since);
        let shown = jobs
            .iter()
            .take(limit)
            .map(|entry| WaitingJob {
                job_id: entry.job_id.to_string(),
                age: entry.since.elapsed(),
                labels: entry.labels.to_string(),
            })
            .collect();
        (waiting.len(), shown)
    }

    /// Sets the gauges from the waiting jobs and the workers' `slots`; returns the
    /// registered healthy slots beyond the dispatch threads (warned about once).
    pub fn update(&self, slots: Slots) -> u64 {
        let waiting = self.waiting.lock().expect("waiting jobs lock");
        let mut counts: HashMap<Arc<str>, i64> = HashMap::from([("".into(), 0)]);
        for entry in waiting.values() {
            *counts.entry(entry.labels.clone()).or_default() += 1;
        }
        let oldest = waiting
            .values()
            .map(|entry| entry.since)
            .min()
            .map_or(0.0, |since| since.elapsed().as_secs_f64());
        drop(waiting);
        self.oldest_waiting.set(oldest);
        let mut shown = self.shown.lock().expect("shown label sets lock");
        for gone in shown.iter().filter(|labels| !counts.contains_key(*labels)) {
            let _ = self.jobs_waiting.remove_label_values(&[gone]);
        }
        for (labels, n) in &counts {
            self.jobs_waiting.with_label_values(&[labels]).set(*n);
        }
        *shown = counts.into_keys().collect();
        drop(shown);
        for (state, n) in [
            ("free", slots.free),
            ("busy", slots.busy),
            ("unhealthy", slots.unhealthy),
            ("withheld", slots.withheld),
        ] {
            self.slots.with_label_values(&[state]).set(n as i64);
        }
        let healthy = slots.free + slots.busy + slots.withheld;
        let beyond = healthy.saturating_sub(self.dispatch_threads);
        self.slots_beyond_threads.set(beyond as i64);
        if beyond > 0 && !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "the workers have {healthy} slots and there are {} dispatch threads: at most {} \
                 jobs run at once; raise --dispatch-threads (blacktree_slots_beyond_dispatch_threads)",
                self.dispatch_threads,
                self.dispatch_threads
            );
        }
        beyond
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_jobs_are_counted_until_they_are_dropped() {
        let registry = prometheus::Registry::new();
        let load = Arc::new(Load::new(&registry, 4));
        let arm: Labels = Labels::new([("arch".into(), "arm64".into())]).unwrap();
        let first = load.waiting("j1", &Labels::default(), Instant::now());
        let second = load.waiting("j2", &arm, Instant::now());
        let (total, listed) = load.waiting_jobs(1);
        assert_eq!((total, listed[0].job_id.as_str()), (2, "j1"));
        assert_eq!(listed.len(), 1, "at most the limit is listed");
        let slots = Slots {
            free: 3,
            busy: 2,
            unhealthy: 1,
            withheld: 1,
        };
        assert_eq!(load.update(slots), 2, "6 healthy slots, 4 threads");
        let waiting = |labels: &str| load.jobs_waiting.with_label_values(&[labels]).get();
        assert_eq!((waiting(""), waiting("arch=arm64")), (1, 1));
        assert!(load.oldest_waiting.get() >= 0.0);
        drop(first);
        load.update(Slots::default());
        assert_eq!((waiting(""), waiting("arch=arm64")), (0, 1));
        drop(second);
        load.update(Slots::default());
        assert_eq!((waiting(""), load.oldest_waiting.get()), (0, 0.0));
        let series = registry.gather();
        let text = format!("{series:?}");
        assert!(
            !text.contains("arm64"),
            "a label set none waits with is gone"
        );
        assert_eq!(load.slots.with_label_values(&["free"]).get(), 0);
    }
}
