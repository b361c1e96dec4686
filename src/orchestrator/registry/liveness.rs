//! What the health ticker needs of the registry: the workers to ping, their answers
//! (healthy, busy, unhealthy after failures in a row), and forgetting workers unhealthy
//! for too long.

use std::sync::Arc;
use std::time::Instant;

use log::{info, warn};

use super::{Registry, Worker};
use crate::grpc::cancel::CancelReason;
use crate::proto::job_grpc::JobServiceClient;

/// What a ping found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PingResult {
    /// The worker answered FREE (or an older worker's UNKNOWN), with its free slots
    /// when it reports them (ours do; 0 or absent is not reported).
    Free(Option<u32>),
    /// The worker answered BUSY.
    Busy,
    /// The worker takes no new job (drained by an operator, or stopping).
    Draining,
    /// An error: refused, reset, or not the worker it should be.
    Failed(String),
    /// No answer: the deadline passed, or no connection could be made for a reason
    /// other than a refusal. The worker is frozen or its host unreachable, so it may
    /// still run builds it has not reported.
    Unanswered(String),
}

impl PingResult {
    /// Whether the ping failed (errors and no answers alike).
    pub fn failed(&self) -> bool {
        matches!(self, PingResult::Failed(_) | PingResult::Unanswered(_))
    }
}

/// A worker to ping, as the health ticker sees it.
pub struct PingTarget {
    /// The worker's id.
    pub worker: Arc<str>,
    /// Client of its `JobService`.
    pub client: JobServiceClient,
    /// Jobs it runs at once (bounds what its answer may report).
    pub capacity: u32,
    generation: u64,
    /// Jobs ever started on it when the ping was sent, to tell whether a BUSY answer is
    /// explained by our own jobs.
    started: u64,
    in_flight: u32,
}

impl Registry {
    /// The workers to ping in a health round.
    pub fn ping_targets(&self) -> Vec<PingTarget> {
        self.lock()
            .iter()
            .map(|(id, w)| PingTarget {
                worker: id.clone(),
                client: w.client.clone(),
                capacity: w.capacity,
                generation: w.generation,
                started: w.started,
                in_flight: w.in_flight(),
            })
            .collect()
    }

    /// Records a ping's result: `unhealthy_after` failures in a row make a worker
    /// unhealthy (and cancel the calls running on it), one answer makes it healthy.
    /// Returns whether the worker is suspect: its ping failed and it is still healthy.
    pub fn record_ping(&self, target: &PingTarget, result: PingResult) -> bool {
        let mut workers = self.lock();
        let Some(worker) = workers.get_mut(&target.worker) else {
            return false;
        };
        if worker.generation != target.generation {
            return false;
        }
        let mut suspect = false;
        match result {
            PingResult::Free(_) | PingResult::Busy | PingResult::Draining => {
                if !worker.healthy {
                    info!(
                        "worker {} ({}) answers pings: healthy",
                        target.worker, worker.addr
                    );
                    self.routing_changed();
                }
                worker.healthy = true;
                worker.failures = 0;
                worker.unanswered = false;
                worker.last_seen = Some(Instant::now());
                worker.unhealthy_since = None;
                // BUSY while our own jobs ran (or started) since the ping left is ours.
                let ours = target.in_flight > 0
                    || worker.in_flight() > 0
                    || worker.started != target.started;
                worker.busy = result == PingResult::Busy && !ours;
                let draining = result == PingResult::Draining;
                if worker.draining != draining {
                    info!(
                        "worker {} ({}) {}",
                        target.worker,
                        worker.addr,
                        if draining {
                            "is draining: no new jobs"
                        } else {
                            "takes jobs again"
                        }
                    );
                    worker.draining = draining;
                    self.routing_changed();
                }
                worker.pinged = match result {
                    PingResult::Free(Some(free)) => Some(super::PingedSlots {
                        free: free.min(worker.capacity),
                        started: target.started,
                        ended: worker.ended,
                    }),
                    _ => None,
                };
            }
            PingResult::Failed(ref error) | PingResult::Unanswered(ref error) => {
                worker.unanswered = matches!(result, PingResult::Unanswered(_));
                worker.failures += 1;
                if worker.last_seen.is_none() && worker.failures == 1 {
                    // A static or restored worker that has not answered yet: said once.
                    info!(
                        "worker {} ({}) does not answer yet: {error}",
                        target.worker, worker.addr
                    );
                }
                if worker.healthy && worker.failures >= self.settings.unhealthy_after {
                    warn!(
                        "worker {} ({}) failed {} pings in a row ({error}): unhealthy",
                        target.worker, worker.addr, worker.failures
                    );
                    self.mark_unhealthy(worker);
                }
                suspect = worker.healthy;
            }
        }
        self.top_up(&target.worker, worker);
        suspect
    }

    /// Takes `worker` out of rotation: no new job until it answers a ping. The jobs
    /// running there go on until it has been silent for `lost_after`
    /// ([`Registry::give_up_silent`]) or their call fails.
    pub(super) fn mark_unhealthy(&self, worker: &mut Worker) {
        worker.healthy = false;
        worker.unhealthy_since = Some(Instant::now());
        self.liveness_counts.lock().expect("liveness counts lock").0 += 1;
        self.routing_changed();
    }

    /// Ends the jobs running on workers silent for `lost_after` or more (`worker_lost`,
    /// the silence in their status).
    pub fn give_up_silent(&self) {
        let lost_after = self.settings.lost_after;
        for (id, worker) in self.lock().iter() {
            if !worker.healthy && worker.silence() >= lost_after {
                self.give_up(id, worker);
            }
        }
    }

    /// Fires the tokens of `worker`'s running calls with its silence; counts and logs
    /// those not fired before.
    fn give_up(&self, id: &str, worker: &Worker) {
        let silence = worker.silence();
        let fired = worker
            .running
            .values()
            .filter(|token| token.cancel(CancelReason::WorkerLost(silence)))
            .count();
        if fired > 0 {
            warn!(
                "worker {id} ({}) silent for {}s: its {} given up (worker_lost)",
                worker.addr,
                silence.as_secs(),
                crate::plural::count(fired, "running job")
            );
            self.liveness_counts.lock().expect("liveness counts lock").1 += fired as u64;
        }
    }

    /// A worker that may be running a job it has not reported, with its silence: one
    /// not heard from yet (restored from the state file or just registered, its first
    /// ping not answered yet), or one whose pings go unanswered (frozen, or its host
    /// unreachable) and that is not given up yet (`lost_after`). One that refuses
    /// connections runs nothing.
    pub fn unheard_worker(&self) -> Option<(Arc<str>, std::time::Duration)> {
        let lost_after = self.settings.lost_after;
        self.lock()
            .iter()
            .find(|(_, w)| {
                let not_pinged_yet = w.last_seen.is_none() && w.failures == 0;
                not_pinged_yet || (w.unanswered && w.silence() < lost_after)
            })
            .map(|(id, w)| (id.clone(), w.silence()))
    }

    /// How many times workers went out of rotation, and how many jobs were given up,
    /// since the last call.
    pub fn take_liveness_counts(&self) -> (u64, u64) {
        std::mem::take(&mut *self.liveness_counts.lock().expect("liveness counts lock"))
    }

    /// Forgets registered workers unhealthy for longer than `forget_after` (their
    /// running jobs are given up first).
    pub fn forget_expired(&self) {
        let forget_after = self.settings.forget_after;
        let mut forgotten = false;
        self.lock().retain(|id, w| {
            let expired = !w.is_static
                && w.unhealthy_since
                    .is_some_and(|t| t.elapsed() >= forget_after);
            if expired {
                info!(
                    "worker {id} ({}) forgotten after {} unhealthy",
                    w.addr,
                    humantime::format_duration(forget_after)
                );
                self.give_up(id, w);
                self.unindex(id, w.reported.ids());
            }
            forgotten |= expired;
            !expired
        });
        if forgotten {
            self.remember();
        }
    }
}
