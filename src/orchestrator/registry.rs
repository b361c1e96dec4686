//! The worker registry: which workers exist, whether they are healthy, and how many of
//! their slots are taken.
//!
//! The registry holds the truth; the `hints` channel only carries hints that a slot
//! *may* be free (worker id and registration generation). A dispatch thread takes a
//! hint and [`Registry::claim`]s the slot, which checks the truth under the lock: a
//! stale hint (older generation, unhealthy or busy worker, full worker) is dropped.
//!
//! Invariants (checked by the tests below and by the integration tests):
//! * a worker never has more than its capacity of jobs in flight;
//! * a worker gets no job while it is unhealthy or reports BUSY for reasons of its own;
//! * no free slot is forgotten: for every worker, the hints of its current generation
//!   waiting in the channel (`hinted`) are at least its free slots. Every change that
//!   frees a slot calls `top_up`, which sends the missing hints; `hinted` never exceeds
//!   the capacity, so the channel stays small.
//!
//! With a state file, every change of the set of workers (a registration, a worker
//! forgotten) is written to it before the change is acknowledged; at start the
//! remembered workers come back as [`Origin::Restored`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use grpcio::{CallOption, Environment};
use log::{info, warn};

use super::state_file::{Remembered, StateFile};
use crate::grpc::cancel::CancelToken;
use crate::grpc::{self, Tls};
use crate::job::Secret;
use crate::labels::Labels;
use crate::proto::job_grpc::JobServiceClient;
pub use liveness::{PingResult, PingTarget};
pub use reports::Reported;
pub use routing::{LabelledClaim, SlotWait};
pub use view::WorkerView;

mod liveness;
mod reports;
mod routing;
mod view;

/// A hint that a worker may have a free slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// The worker's id.
    pub worker: Arc<str>,
    /// The registration the hint belongs to.
    pub generation: u64,
}

/// A slot taken on a worker; give it back with [`Registry::release`].
#[derive(Clone)]
pub struct Claim {
    /// The worker's id.
    pub worker: Arc<str>,
    /// The registration the slot belongs to.
    pub generation: u64,
    /// Client of the worker's `JobService`.
    pub client: JobServiceClient,
}

/// How a job ended on a worker, as far as the worker's state is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The call ended; the slot is free again.
    Done,
    /// The worker could not be reached: mark it unhealthy at once.
    Unreachable,
    /// The worker refused the job (no free slot of its own), or may still be running a
    /// job it could not be asked to stop: treat it as busy until a ping says FREE.
    Withheld,
}

/// How the orchestrator came to know a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// It called `Register`.
    Registered,
    /// `--worker ID=HOST:PORT`: never forgotten, and a registration under its id keeps it
    /// static.
    Static,
    /// Read from the state file at start: it gets no job until it answers a ping, and is
    /// forgotten like a registered worker if it never does.
    Restored,
}

/// Settings of the registry.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Consecutive failed pings that make a worker unhealthy (no new job).
    pub unhealthy_after: u32,
    /// How long a worker may not answer pings before its running jobs are given up.
    pub lost_after: Duration,
    /// HTTP/2 keepalive on the connections to workers.
    pub keepalive: grpc::Keepalive,
    /// How long a registered worker may stay unhealthy before it is forgotten.
    pub forget_after: Duration,
    /// Mutual TLS for the calls to workers, when configured.
    pub tls: Option<Tls>,
    /// The registration token, sent on every call to workers (ours check it).
    pub token: Option<Secret>,
    /// The most workers `Register` may add (`--max-workers`); static and restored
    /// workers are the operator's and always count.
    pub max_workers: usize,
}

/// The registry of workers; shared by the gRPC server, the dispatch pool and the
/// health ticker.
pub struct Registry {
    state: Mutex<HashMap<Arc<str>, Worker>>,
    next_generation: std::sync::atomic::AtomicU64,
    hints: Sender<Hint>,
    env: Arc<Environment>,
    settings: RegistrySettings,
    /// Where the set of workers is remembered, if anywhere.
    state_file: Option<Arc<StateFile>>,
    /// Which worker reports each jobId (running or held), so that every consumed job
    /// can look for its worker without a scan. Taken after `state`, never before.
    reported_by: Mutex<HashMap<String, Arc<str>>>,
    /// Dispatch threads waiting for a labelled slot, and the consumer's signal.
    signals: routing::Signals,
    /// Times a worker went out of rotation, and jobs given up for `lost_after`, not yet
    /// taken by [`Registry::take_liveness_counts`].
    liveness_counts: Mutex<(u64, u64)>,
}

struct Worker {
    addr: String,
    region: String,
    /// The labels it offers, `region=<region>` among them.
    labels: Labels,
    /// When it last answered a ping.
    last_seen: Option<Instant>,
    generation: u64,
    capacity: u32,
    /// Hints of this generation sent and not yet taken.
    hinted: u32,
    healthy: bool,
    /// Reported BUSY while running none of our jobs (or refused one).
    busy: bool,
    /// Takes no new job (`blacktree workers drain`, or it is stopping).
    draining: bool,
    failures: u32,
    /// Its last failed ping went unanswered (rather than being refused).
    unanswered: bool,
    unhealthy_since: Option<Instant>,
    /// Named on the command line: never forgotten.
    is_static: bool,
    client: JobServiceClient,
    /// Jobs of ours running on it → the token that cancels their call.
    running: HashMap<String, CancelToken>,
    /// What it last reported.
    reported: Reported,
    /// Our jobs started on it (adoptions included) and ended there, ever.
    started: u64,
    ended: u64,
    /// Our jobs that ended with a status there, and those of them that did not succeed,
    /// since this orchestrator started (the status page shows them).
    jobs_run: u64,
    jobs_failed: u64,
    /// The free slots its last ping answer reported, if it reports them.
    pinged: Option<PingedSlots>,
}

/// Free slots a worker reported in a ping answer, with our counts when that ping was
/// sent (`started`) and answered (`ended`): the slots our jobs took and gave back since
/// are accounted for exactly, those of other orchestrators as of the answer.
#[derive(Debug, Clone, Copy)]
struct PingedSlots {
    free: u32,
    started: u64,
    ended: u64,
}

impl Worker {
    /// How long it has not answered pings (since it went unhealthy, if it never did).
    fn silence(&self) -> Duration {
        self.last_seen
            .or(self.unhealthy_since)
            .map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Jobs running on it: ours, and those it reports (builds started by an earlier
    /// orchestrator).
    fn in_flight(&self) -> u32 {
        let others = self
            .reported
            .running
            .iter()
            .filter(|job_id| !self.running.contains_key(job_id.as_str()))
            .count();
        u32::try_from(self.running.len() + others).unwrap_or(u32::MAX)
    }

    /// Free slots: its capacity less what runs there, and at most what its last ping
    /// answer said were free (another orchestrator's jobs take slots too), less our jobs
    /// started since and plus ours ended since.
    fn free_slots(&self) -> u32 {
        if !self.healthy || self.busy || self.draining {
            return 0;
        }
        let free = self.capacity.saturating_sub(self.in_flight());
        match self.pinged {
            Some(pinged) => {
                let since = |now: u64, then: u64| u32::try_from(now - then).unwrap_or(u32::MAX);
                let reported = pinged.free.saturating_add(since(self.ended, pinged.ended));
                free.min(reported.saturating_sub(since(self.started, pinged.started)))
            }
            None => free,
        }
    }
}

impl Registry {
    /// An empty registry that sends its hints on `hints`.
    pub fn new(env: Arc<Environment>, hints: Sender<Hint>, settings: RegistrySettings) -> Registry {
        Registry {
            state: Mutex::new(HashMap::new()),
            next_generation: std::sync::atomic::AtomicU64::new(1),
            hints,
            env,
            settings,
            state_file: None,
            reported_by: Mutex::default(),
            signals: routing::Signals::default(),
            liveness_counts: Mutex::default(),
        }
    }

    /// The same registry, remembering its workers in `file` from now on (written at
    /// once).
    pub fn remembered_in(self, file: Arc<StateFile>) -> Registry {
        let registry = Registry {
            state_file: Some(file),
            ..self
        };
        registry.remember();
        registry
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Worker>> {
        self.state.lock().expect("worker registry lock")
    }

    /// Adds or replaces a worker; returns its new generation once the change is in the
    /// state file, or `None` when a registered worker with a new id would take the
    /// registry past `max_workers`. A registered worker starts healthy (it just reached
    /// us); a static or restored one starts unhealthy until a ping answers. Hints of an
    /// earlier registration under the same id become stale. The worker offers `labels`
    /// and `region=<region>` (when the region is a valid label value).
    pub fn register(
        &self,
        id: &str,
        addr: &str,
        region: &str,
        labels: &Labels,
        capacity: u32,
        origin: Origin,
    ) -> Option<u64> {
        let labels = match region {
            "" => labels.clone(),
            region => labels
                .with("region", region)
                .unwrap_or_else(|| labels.clone()),
        };
        let is_static = origin == Origin::Static;
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let client = grpc::job_client(
            self.env.clone(),
            addr,
            self.settings.tls.as_ref(),
            self.settings.keepalive,
        );
        let id: Arc<str> = id.into();
        let mut workers = self.lock();
        if origin == Origin::Registered
            && workers.len() >= self.settings.max_workers
            && !workers.contains_key(&id)
        {
            return None;
        }
        let is_static = is_static || workers.get(&id).is_some_and(|w| w.is_static);
        let mut counts = (0, 0);
        if let Some(old) = workers.get(&id) {
            self.unindex(&id, old.reported.ids());
            counts = (old.jobs_run, old.jobs_failed);
        }
        let healthy = origin == Origin::Registered && !is_static;
        let worker = workers.entry(id.clone()).insert_entry(Worker {
            addr: addr.to_string(),
            region: region.to_string(),
            labels,
            last_seen: None,
            generation,
            capacity: capacity.max(1),
            hinted: 0,
            healthy,
            busy: false,
            draining: false,
            failures: 0,
            unanswered: false,
            // A restored worker that never answers is forgotten `forget_after` from now.
            unhealthy_since: (origin == Origin::Restored).then(Instant::now),
            is_static,
            client,
            running: HashMap::new(),
            reported: Reported::default(),
            started: 0,
            ended: 0,
            jobs_run: counts.0,
            jobs_failed: counts.1,
            pinged: None,
        });
        self.top_up(&id, worker.into_mut());
        drop(workers);
        self.routing_changed();
        self.remember();
        Some(generation)
    }

    /// Where worker `id` is registered, and a client of it.
    pub fn address_of(&self, id: &str) -> Option<(String, JobServiceClient)> {
        self.lock()
            .get(id)
            .map(|w| (w.addr.clone(), w.client.clone()))
    }

    /// Writes the set of workers to the state file, if there is one; never called with
    /// the registry locked (the file's turn is taken first). A failure is logged: the
    /// registry itself goes on.
    fn remember(&self) {
        let Some(file) = &self.state_file else {
            return;
        };
        let snapshot = || {
            self.lock()
                .iter()
                .map(|(id, w)| Remembered {
                    id: id.to_string(),
                    address: w.addr.clone(),
                    region: w.region.clone(),
                    labels: w.labels.clone(),
                    capacity: w.capacity,
                    is_static: w.is_static,
                })
                .collect()
        };
        if let Err(e) = file.save(snapshot) {
            warn!("{e}: the latest change of the registry is not remembered");
        }
    }

    /// Options of a call to a worker: `timeout`, and the token when there is one.
    pub fn call_options(&self, timeout: Duration) -> CallOption {
        grpc::with_token(
            CallOption::default().timeout(timeout),
            self.settings.token.as_ref(),
        )
    }

    /// Sends the hints a worker's free slots are missing, and wakes the dispatch
    /// threads waiting for a slot with labels it has.
    fn top_up(&self, id: &Arc<str>, worker: &mut Worker) {
        let free = worker.free_slots();
        while worker.hinted < free {
            worker.hinted += 1;
            // The receiving side lives in the dispatch pool for the whole process.
            let _ = self.hints.send(Hint {
                worker: id.clone(),
                generation: worker.generation,
            });
        }
        if free > 0 {
            self.wake_waiters(worker);
        }
    }

    /// Whether `id` is registered (what `WorkerService.Ping` answers).
    pub fn is_registered(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// Takes a slot for `job_id` if `hint` still points at a free one; the token lets
    /// the registry cancel the call when the worker is lost.
    pub fn claim(&self, hint: &Hint, job_id: &str, token: &CancelToken) -> Option<Claim> {
        let mut workers = self.lock();
        let worker = workers.get_mut(&hint.worker)?;
        if worker.generation != hint.generation {
            return None;
        }
        worker.hinted = worker.hinted.saturating_sub(1);
        if worker.free_slots() == 0 {
            return None;
        }
        worker.started += 1;
        worker.running.insert(job_id.to_string(), token.clone());
        Some(Claim {
            worker: hint.worker.clone(),
            generation: worker.generation,
            client: worker.client.clone(),
        })
    }

    /// Gives a claimed slot back. The job is no longer the worker's, whatever its last
    /// report said.
    pub fn release(&self, claim: &Claim, job_id: &str, how: Release) {
        self.release_counted(claim, job_id, how, None);
    }

    /// [`release`](Registry::release) for a job that ended there with a status,
    /// counted as run (and failed unless it `succeeded`).
    pub fn release_ended(&self, claim: &Claim, job_id: &str, how: Release, succeeded: bool) {
        self.release_counted(claim, job_id, how, Some(succeeded));
    }

    fn release_counted(&self, claim: &Claim, job_id: &str, how: Release, ended: Option<bool>) {
        let mut workers = self.lock();
        let Some(worker) = workers.get_mut(&claim.worker) else {
            return;
        };
        if worker.generation != claim.generation {
            return;
        }
        if let Some(succeeded) = ended {
            worker.jobs_run += 1;
            worker.jobs_failed += u64::from(!succeeded);
        }
        if worker.running.remove(job_id).is_some() {
            worker.ended += 1;
        }
        if worker.reported.contains(job_id) {
            self.unindex(&claim.worker, [job_id.to_string()].iter());
            worker.reported.running.remove(job_id);
            worker.reported.held.remove(job_id);
        }
        match how {
            Release::Done => {}
            Release::Unreachable => {
                worker.failures = worker.failures.max(self.settings.unhealthy_after);
                if worker.healthy {
                    warn!(
                        "worker {} is unreachable; no jobs until it answers pings",
                        claim.worker
                    );
                    self.mark_unhealthy(worker);
                }
            }
            Release::Withheld => {
                info!("worker {}: no jobs until it reports FREE", claim.worker);
                worker.busy = true;
            }
        }
        self.top_up(&claim.worker, worker);
    }
}

#[cfg(test)]
mod tests;
