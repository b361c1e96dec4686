//! Jobs that require labels: which workers can take them, and slots claimed by labels.
//!
//! A job without labels claims slots through the hints channel like always. A job
//! with labels cannot use a hint of any worker, so it claims by scanning for a free
//! slot on a worker that has its labels ([`Registry::claim_matching`]); when none is
//! free it leaves a waiter, which is woken when such a worker has a free slot again
//! (`top_up`), or when workers come and go (`routing_changed`). At most as many jobs
//! of a label set wait so as their workers have slots ([`Registry::room`]): the others
//! wait on the consumer thread, so that a small pool (two `arch=arm64` slots, say) with
//! a long queue cannot take every dispatch thread from the other jobs. Claiming through the
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
        // Room for one more job with these labels in dispatch.
        let _ = self.registry.signals.changed.0.try_send(());
    }
}

/// How a labelled claim went.
pub enum LabelledClaim<'a> {
    /// A slot was taken.
    Claimed(Claim),
    /// None is free: wait for this.
    Wait(SlotWait<'a>),
    /// As many jobs with these labels wait for a slot as their workers have slots (or no
    /// healthy worker has them): this one waits elsewhere, without a dispatch thread.
    NoRoom,
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

    /// How many dispatch threads wait for a slot with exactly these labels.
    fn waiting_with(&self, labels: &Labels) -> usize {
        self.waiters()
            .iter()
            .filter(|w| w.labels == *labels)
            .count()
    }
}

/// Whether `worker` takes jobs that require `labels`: healthy, not draining, and it has
/// them all.
fn takes(worker: &Worker, labels: &Labels) -> bool {
    worker.healthy && !worker.draining && worker.labels.satisfies(labels)
}

/// The slots of the workers among `workers` that take jobs requiring `labels`.
fn matching_slots<'a>(workers: impl Iterator<Item = &'a Worker>, labels: &Labels) -> usize {
    workers
        .filter(|w| takes(w, labels))
        .map(|w| w.capacity as usize)
        .sum()
}

impl crate::pipeline::Router for Registry {
    fn routable(&self, labels: &Labels) -> bool {
        Registry::routable(self, labels)
    }

    fn room(&self, labels: &Labels) -> usize {
        Registry::room(self, labels)
    }
}

impl Registry {
    /// Whether a healthy worker that is not draining has every one of `labels` (every
    /// job without labels is).
    pub fn routable(&self, labels: &Labels) -> bool {
        labels.is_empty() || self.lock().values().any(|w| takes(w, labels))
    }

    /// How many more jobs with `labels` may wait in dispatch threads for a slot: the slots
    /// of the healthy, not draining workers that have them, less the jobs with these
    /// labels waiting already (`usize::MAX` for none).
    pub fn room(&self, labels: &Labels) -> usize {
        if labels.is_empty() {
            return usize::MAX;
        }
        let workers = self.lock();
        let slots = matching_slots(workers.values(), labels);
        let waiting = self.signals.waiting_with(labels);
        slots.saturating_sub(waiting)
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
    /// unhealthy, or was drained or resumed, and when a labelled job took a slot or
    /// stopped waiting for one: jobs held back for their labels may go now.
    pub fn routing_changes(&self) -> Receiver<()> {
        self.signals.changed.1.clone()
    }

    /// Takes a free slot for `job_id` on a worker that has `labels`; when none is free,
    /// a wait that is signalled when one may be (or when workers change), unless as many
    /// jobs with these labels wait already as their workers have slots: those would only
    /// hold dispatch threads that other jobs can use.
    pub fn claim_matching(
        &self,
        labels: &Labels,
        job_id: &str,
        token: &CancelToken,
    ) -> LabelledClaim<'_> {
        let mut workers = self.lock();
        let found = workers
            .iter_mut()
            .find(|(_, w)| w.free_slots() > 0 && w.labels.satisfies(labels));
        if let Some((id, worker)) = found {
            worker.started += 1;
            worker.running.insert(job_id.to_string(), token.clone());
            // The consumer may send another job with these labels in its place.
            let _ = self.signals.changed.0.try_send(());
            return LabelledClaim::Claimed(Claim {
                worker: id.clone(),
                generation: worker.generation,
                client: worker.client.clone(),
            });
        }
        if self.signals.waiting_with(labels) >= matching_slots(workers.values(), labels) {
            return LabelledClaim::NoRoom;
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
        LabelledClaim::Wait(SlotWait {
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
