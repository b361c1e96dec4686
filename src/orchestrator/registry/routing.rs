//! Jobs that require labels: which workers can take them, and slots claimed by labels.
//!
//! A job without labels claims slots through the hints channel like always. A job
//! with labels cannot use a hint of any worker, so it claims by scanning for a free
//! slot on a worker that has its labels ([`Registry::claim_matching`]); when none is
//! free it leaves a waiter, which is woken when such a worker has a free slot again
//! (`top_up`), or when workers come and go (`routing_changed`). Claiming through the
//! registry's lock leaves the hints' invariant alone: a slot taken this way makes its
//! hint stale, and the thread that takes the hint drops it.
//!
//! The consumer thread holds jobs that no healthy worker can take ([`Registry::routable`]
//! is false) away from the dispatch threads, and hears on [`Registry::routing_changes`]
//! when that may have changed.

use crossbeam_channel::{bounded, Receiver, Sender};

use super::{Claim, Registry, Worker};
use crate::grpc::cancel::CancelToken;
use crate::labels::Labels;

/// A dispatch thread waiting for a free slot on a worker with these labels.
pub(super) struct Waiter {
    id: u64,
    labels: Labels,
    wake: Sender<()>,
}

/// A dispatch thread's wait for a labelled slot: `woken` is signalled when a worker
/// with the labels may have a free slot, or when workers change. Dropping it ends the
/// wait.
pub struct SlotWait<'a> {
    /// Signalled once.
    pub woken: Receiver<()>,
    registry: &'a Registry,
    id: u64,
}

impl Drop for SlotWait<'_> {
    fn drop(&mut self) {
        self.registry
            .signals
            .waiters()
            .retain(|waiter| waiter.id != self.id);
    }
}

/// The signals about routing the registry sends: to dispatch threads waiting for a
/// labelled slot, and to the consumer thread (its receiver is handed out).
pub(super) struct Signals {
    waiters: std::sync::Mutex<Vec<Waiter>>,
    next_waiter: std::sync::atomic::AtomicU64,
    changed: (Sender<()>, Receiver<()>),
}

impl Default for Signals {
    fn default() -> Signals {
        Signals {
            waiters: std::sync::Mutex::default(),
            next_waiter: std::sync::atomic::AtomicU64::new(0),
            changed: bounded(1),
        }
    }
}

impl Signals {
    fn waiters(&self) -> std::sync::MutexGuard<'_, Vec<Waiter>> {
        self.waiters.lock().expect("waiters lock")
    }
}

impl crate::pipeline::Router for Registry {
    fn routable(&self, labels: &Labels) -> bool {
        Registry::routable(self, labels)
    }
}

impl Registry {
    /// Whether a healthy worker that is not draining has every one of `labels` (every
    /// job without labels is).
    pub fn routable(&self, labels: &Labels) -> bool {
        labels.is_empty()
            || self
                .lock()
                .values()
                .any(|w| w.healthy && !w.draining && w.labels.satisfies(labels))
    }

    /// Records whether worker `id` is draining (its answer to `SetDraining`): a drained
    /// worker gets no job; resumed, its free slots are hinted again.
    pub fn set_draining(&self, id: &str, draining: bool) {
        let mut workers = self.lock();
        let Some((id, worker)) = workers.iter_mut().find(|(k, _)| &***k == id) else {
            return;
        };
        if worker.draining != draining {
            worker.draining = draining;
            let id = id.clone();
            self.top_up(&id, worker);
            drop(workers);
            self.routing_changed();
        }
    }

    /// Signalled (at most one signal waits) when a worker registered, recovered, became
    /// unhealthy, or was drained or resumed: jobs held back for their labels may have a
    /// worker now.
    pub fn routing_changes(&self) -> Receiver<()> {
        self.signals.changed.1.clone()
    }

    /// Takes a free slot for `job_id` on a worker that has `labels`; when none is free,
    /// a wait that is signalled when one may be (or when workers change).
    pub fn claim_matching(
        &self,
        labels: &Labels,
        job_id: &str,
        token: &CancelToken,
    ) -> Result<Claim, SlotWait<'_>> {
        let mut workers = self.lock();
        let found = workers
            .iter_mut()
            .find(|(_, w)| w.free_slots() > 0 && w.labels.satisfies(labels));
        if let Some((id, worker)) = found {
            worker.started += 1;
            worker.running.insert(job_id.to_string(), token.clone());
            return Ok(Claim {
                worker: id.clone(),
                generation: worker.generation,
                client: worker.client.clone(),
            });
        }
        // Registered under the registry's lock: a slot freed from now on wakes it.
        let (wake, woken) = bounded(1);
        let id = self
            .signals
            .next_waiter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.signals.waiters().push(Waiter {
            id,
            labels: labels.clone(),
            wake,
        });
        Err(SlotWait {
            woken,
            registry: self,
            id,
        })
    }

    /// Wakes the waiters a free slot of `worker` can serve (called with the registry
    /// locked, by `top_up`).
    pub(super) fn wake_waiters(&self, worker: &Worker) {
        let mut waiters = self.signals.waiters();
        if waiters.is_empty() {
            return;
        }
        waiters.retain(|waiter| {
            if worker.labels.satisfies(&waiter.labels) {
                let _ = waiter.wake.try_send(());
                return false;
            }
            true
        });
    }

    /// Workers came, recovered or left: every waiter looks again (its job may have
    /// lost its last worker and go back to the consumer), and the consumer re-checks
    /// the jobs it holds back.
    pub(super) fn routing_changed(&self) {
        for waiter in self.signals.waiters().drain(..) {
            let _ = waiter.wake.try_send(());
        }
        let _ = self.signals.changed.0.try_send(());
    }
}

#[cfg(test)]
mod tests;
