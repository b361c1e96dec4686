//! The dispatch pool: a fixed number of threads that each take a job, claim a free
//! worker slot, make one blocking `RunJob` call with the job's deadline, release the
//! slot and hand the job's status to the publisher.
//!
//! A redelivered job may still run (or have its answer held) on a worker whose
//! orchestrator is gone: it goes to the worker that reports it, whose `RunJob` attaches
//! to the running build (adoption). One that no worker reports within `--adopt-wait` is
//! dispatched afresh; first deliveries never wait (but go to a worker that reports
//! their jobId, if one does).
//!
//! A job is never retried after it reached a worker: every ending (answer, lost worker,
//! deadline, cancel, error) becomes its one status. A cancelled or timed-out call is
//! also stopped on the worker with `CancelJob`. The only cases that go to another worker
//! are the answers that say the worker started nothing: RESOURCE_EXHAUSTED (full; a Go
//! worker's UNKNOWN "worker is currently busy"), ALREADY_EXISTS (it already runs this
//! jobId), UNAUTHENTICATED, PERMISSION_DENIED and UNIMPLEMENTED; that worker's slot then
//! waits for a FREE ping.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{select, Receiver, Sender};
use log::{info, warn};

use super::registry::{Claim, Hint, LabelledClaim, Registry, Release};
use crate::grpc::cancel::{CallError, CancelToken};
use crate::job::{Event, EventKind, Job, Outcome, Status};
use crate::metrics::Metrics;
use crate::pipeline::{Assignment, ConsumerMsg, LogBudget, Publication};
use crate::proto::job::JobRequest;
use ending::{answered, failed_call, stop_on_worker, Ending, Then};
use output::Output;
use run_call::RunCall;

/// The whole message of the deployed Go worker's UNKNOWN answer when it runs a job
/// already (it started nothing).
const GO_WORKER_BUSY: &str = "worker is currently busy";

/// How long a worker may take to answer `CancelJob`.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a redelivered job looks for a worker that reports it.
const ADOPT_POLL: Duration = Duration::from_millis(50);

/// The channels and shared state the dispatch threads use.
#[derive(Clone)]
pub struct DispatchLinks {
    /// Jobs from the consumer thread.
    pub jobs: Receiver<Assignment>,
    /// Free-slot hints from the registry.
    pub hints: Receiver<Hint>,
    /// Disconnected (never sent on) when the orchestrator drains.
    pub shutdown: Receiver<()>,
    /// Statuses to the publisher.
    pub publications: Sender<Publication>,
    /// Jobs given back (drain) to the consumer thread.
    pub consumer: Sender<ConsumerMsg>,
    /// The worker registry.
    pub registry: Arc<Registry>,
    /// Counters the pool keeps.
    pub metrics: Arc<Metrics>,
    /// The bytes of live output held at once.
    pub log_budget: Arc<LogBudget>,
}

/// Settings of the dispatch pool.
#[derive(Debug, Clone, Copy)]
pub struct DispatchSettings {
    /// Number of dispatch threads (jobs running at once).
    pub threads: u16,
    /// Deadline of a job without `timeoutSeconds`.
    pub job_timeout: Duration,
    /// How long a redelivered job waits for a worker to report it.
    pub adopt_wait: Duration,
    /// Whether lifecycle events are published (`--events-key` set).
    pub events: bool,
    /// Whether live build output is published (`--logs-key` set).
    pub logs: bool,
}

/// Starts the dispatch threads.
pub fn spawn_pool(settings: DispatchSettings, links: DispatchLinks) -> Vec<JoinHandle<()>> {
    (0..settings.threads)
        .map(|i| {
            let dispatcher = Dispatcher {
                links: links.clone(),
                settings,
            };
            std::thread::Builder::new()
                .name(format!("dispatch-{i}"))
                .spawn(move || dispatcher.run())
                .expect("spawning a dispatch thread")
        })
        .collect()
}

struct Dispatcher {
    links: DispatchLinks,
    settings: DispatchSettings,
}

/// How waiting for a free slot ended.
enum Wait {
    Claimed(Claim),
    /// The orchestrator drains: give the job back.
    Draining,
    /// The job was cancelled while it waited.
    Cancelled,
    /// No healthy worker has the labels the job requires, or as many jobs with them wait
    /// for a slot as those workers have: the consumer holds it back.
    Unroutable,
}

/// How one `RunJob` attempt ended.
// Almost every attempt ends with a status: boxing it would allocate for nothing.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    /// The job ended with this status.
    Ended(Status, Release),
    /// The worker refused it without starting it (why, for the log).
    Refused(String),
}

impl Dispatcher {
    fn run(self) {
        loop {
            let job = select! {
                recv(self.links.jobs) -> job => match job {
                    Ok(job) => job,
                    Err(_) => return,
                },
                recv(self.links.shutdown) -> _ => return,
            };
            let busy = &self.links.metrics.load.dispatch_threads_busy;
            busy.inc();
            self.dispatch(job);
            busy.dec();
        }
    }

    fn dispatch(
        &self,
        Assignment {
            job,
            token,
            received,
            redelivered,
            mut waiting,
        }: Assignment,
    ) {
        let mut adopted = if redelivered {
            match self.wait_for_report(&job, &token, received) {
                Some(Wait::Claimed(claim)) => Some(claim),
                Some(ending) => return self.unstarted(job, &token, ending),
                None => None,
            }
        } else {
            // A first delivery waits for nothing, but goes to the worker that reports
            // its jobId, if one does (the same job published again while it runs).
            self.links.registry.adopt(&job.job_id, &token)
        };
        loop {
            let (claim, kind) = match adopted.take() {
                Some(claim) => (claim, EventKind::Adopted),
                None => match self.claim(&job, &token) {
                    Wait::Claimed(claim) => (claim, EventKind::Dispatched),
                    Wait::Unroutable => {
                        info!(
                            "job {}: no room for it on the workers with the labels {}; held back",
                            job.job_id, job.labels
                        );
                        let assignment = Assignment {
                            job,
                            token,
                            received,
                            redelivered,
                            waiting,
                        };
                        let back = ConsumerMsg::Unroutable(Box::new(assignment));
                        let _ = self.links.consumer.send(back);
                        return;
                    }
                    ending => return self.unstarted(job, &token, ending),
                },
            };
            if !token.begin_attempt() {
                self.links
                    .registry
                    .release(&claim, &job.job_id, Release::Done);
                return self.unstarted(job, &token, Wait::Cancelled);
            }
            // On a worker now: no longer waiting.
            drop(waiting.take());
            let metrics = &self.links.metrics;
            if kind == EventKind::Adopted {
                info!("job {}: adopted from worker {}", job.job_id, claim.worker);
                metrics.jobs_adopted.inc();
            } else {
                crate::log_sink::routine(|| {
                    info!("job {}: dispatched to worker {}", job.job_id, claim.worker)
                });
                metrics.jobs_dispatched.inc();
            }
            metrics
                .dispatch_latency
                .observe(received.elapsed().as_secs_f64());
            metrics.jobs_in_flight.inc();
            let running = metrics.board.start(
                &job.job_id,
                &claim.worker,
                job.labels.to_string(),
                received,
                self.deadline(&job),
                kind == EventKind::Adopted,
            );
            if self.settings.events {
                // Skipped when off: no wake-up of the publisher for nothing.
                self.publish(Publication::Event(Event::now(
                    &job.job_id,
                    kind,
                    &claim.worker,
                )));
            }
            let attempt = self.attempt(&job, &claim, &token);
            metrics.jobs_in_flight.dec();
            match attempt {
                Attempt::Refused(_) => {
                    token.attempt_refused();
                    // Waiting again, for another worker.
                    let load = &self.links.metrics.load;
                    waiting = Some(load.waiting(&job.job_id, &job.labels, received));
                    self.links
                        .registry
                        .release(&claim, &job.job_id, Release::Withheld)
                }
                Attempt::Ended(status, release) => {
                    let registry = &self.links.registry;
                    registry.release_ended(&claim, &job.job_id, release, status.success);
                    running.finish(&status);
                    self.publish(Publication::Status(status));
                    return;
                }
            }
        }
    }

    /// A job that never started: given back to the consumer (drain), dropped (its
    /// delivery died: the broker redelivers it), or ended with its `cancelled` status.
    fn unstarted(&self, job: Job, token: &CancelToken, ending: Wait) {
        if token.released() {
            info!(
                "job {}: its delivery was lost with the broker connection before it started; \
                 left to its redelivery",
                job.job_id
            );
        } else if let Wait::Cancelled = ending {
            info!("job {}: cancelled while waiting for a worker", job.job_id);
            let status =
                Status::without_answer(&job.job_id, Outcome::Cancelled, "", "cancelled".into())
                    .in_dialect(job.dialect);
            self.publish(Publication::Status(status));
        } else {
            // The consumer requeues it.
            let _ = self.links.consumer.send(ConsumerMsg::Requeue(job.job_id));
        }
    }

    /// Waits until `--adopt-wait` after its delivery (`received`) for a worker to report
    /// the redelivered `job` (a build that outlived the orchestrator that started it),
    /// and after that for as long as a worker that may run it has not answered
    /// ([`Registry::unheard_worker`]: a frozen worker is not given up before
    /// `--lost-after`, so its build must not start again elsewhere); `None`: none
    /// reported it, it is dispatched afresh. A job that waited that long already (held
    /// back for its labels, or behind busy dispatch threads) does not wait again: the
    /// workers' check-ins had the time to report it.
    fn wait_for_report(&self, job: &Job, token: &CancelToken, received: Instant) -> Option<Wait> {
        let deadline = received + self.settings.adopt_wait;
        let registry = &self.links.registry;
        let mut waited_for: Option<Arc<str>> = None;
        loop {
            if token.reason().is_some() {
                return Some(Wait::Cancelled);
            }
            if let Some(claim) = registry.adopt(&job.job_id, token) {
                return Some(Wait::Claimed(claim));
            }
            let now = Instant::now();
            if now >= deadline {
                match registry.unheard_worker() {
                    Some((worker, silence)) => {
                        if waited_for.as_ref() != Some(&worker) {
                            info!(
                                "job {}: redelivered and not reported yet; worker {worker} has not answered \
                                 ({}s) and may be running it: waiting for it (at most \
                                 --lost-after)",
                                job.job_id,
                                silence.as_secs()
                            );
                            waited_for = Some(worker);
                        }
                    }
                    None => {
                        info!(
                            "job {}: redelivered, and no worker reported it within {}: dispatched \
                             afresh",
                            job.job_id,
                            humantime::format_duration(Duration::from_millis(
                                now.duration_since(received).as_millis() as u64
                            ))
                        );
                        self.links.metrics.jobs_redispatched.inc();
                        return None;
                    }
                }
            }
            let pause = match deadline.checked_duration_since(now) {
                Some(left) if !left.is_zero() => ADOPT_POLL.min(left),
                _ => ADOPT_POLL,
            };
            select! {
                recv(token.fired()) -> _ => return Some(Wait::Cancelled),
                recv(self.links.shutdown) -> _ => return Some(Wait::Draining),
                default(pause) => {}
            }
        }
    }

    fn publish(&self, publication: Publication) {
        // The publisher outlives the dispatch pool.
        let _ = self.links.publications.send(publication);
    }

    /// Waits for a free slot, a drain or a cancel.
    fn claim(&self, job: &Job, token: &CancelToken) -> Wait {
        // Cancelled while it waited in the jobs channel: `select!` below picks among
        // ready operations at random, so a free slot could otherwise win.
        if token.reason().is_some() {
            return Wait::Cancelled;
        }
        if !job.labels.is_empty() {
            return self.claim_labelled(job, token);
        }
        loop {
            select! {
                recv(self.links.hints) -> hint => {
                    let Ok(hint) = hint else { return Wait::Draining };
                    if let Some(claim) = self.links.registry.claim(&hint, &job.job_id, token) {
                        return Wait::Claimed(claim);
                    }
                }
                recv(token.fired()) -> _ => return Wait::Cancelled,
                recv(self.links.shutdown) -> _ => return Wait::Draining,
            }
        }
    }

    /// Waits for a free slot on a worker with the job's labels (hints name any worker:
    /// the registry finds one, and wakes this thread when one may be free), or until
    /// no healthy worker has them.
    fn claim_labelled(&self, job: &Job, token: &CancelToken) -> Wait {
        let registry = &self.links.registry;
        loop {
            let wait = match registry.claim_matching(&job.labels, &job.job_id, token) {
                LabelledClaim::Claimed(claim) => return Wait::Claimed(claim),
                LabelledClaim::Wait(wait) => wait,
                LabelledClaim::NoRoom => return Wait::Unroutable,
            };
            select! {
                recv(wait.woken) -> _ => {}
                recv(token.fired()) -> _ => return Wait::Cancelled,
                recv(self.links.shutdown) -> _ => return Wait::Draining,
            }
        }
    }

    /// The job's deadline: its own `timeoutSeconds`, or `--job-timeout`.
    fn deadline(&self, job: &Job) -> Duration {
        job.timeout_seconds
            .map_or(self.settings.job_timeout, Duration::from_secs)
    }

    fn attempt(&self, job: &Job, claim: &Claim, token: &CancelToken) -> Attempt {
        let timeout = self.deadline(job);
        let request = JobRequest {
            jobId: job.job_id.clone(),
            repoUrl: job.repo_url.clone(),
            branch: job.branch.clone(),
            dockerfilePath: job.dockerfile_path.clone(),
            contextDir: job.context_dir.clone(),
            imageName: job.image_name.clone(),
            githubToken: job.github_token.expose().to_string(),
            timeoutSeconds: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
            streamLogs: self.settings.logs,
            ..JobRequest::default()
        };
        job.github_token.warn_if_short("a job's githubToken");
        let started = SystemTime::now();
        let options = self.links.registry.call_options(timeout);
        let (result, mut call) = match RunCall::start(&claim.client, &request, options) {
            Ok(mut call) => {
                let mut output = Output::new(job, &self.links);
                (call.answer(token, |m| output.forward(m)), Some(call))
            }
            Err(e) => (Err(CallError::Grpc(e)), None),
        };
        let worker = &*claim.worker;
        let ended = |outcome, release, error: String| {
            let error = job.github_token.redact(&error);
            let status = Status::without_answer(&job.job_id, outcome, worker, error);
            Attempt::Ended(status.in_dialect(job.dialect).started(started), release)
        };
        let has_answer = result.is_ok();
        let attempt = match result {
            Ok(response) => {
                let status = answered(job, worker, response).started(started);
                Attempt::Ended(status, Release::Done)
            }
            Err(error) => match failed_call(&error, worker, timeout) {
                Ending::Refused(why) => Attempt::Refused(why),
                Ending::Ended {
                    outcome,
                    then,
                    error,
                } => {
                    let release = match then {
                        Then::Release(release) => release,
                        Then::StopOnWorker => {
                            stop_on_worker(&self.links.registry, claim, &job.job_id)
                        }
                    };
                    ended(outcome, release, error)
                }
            },
        };
        match &attempt {
            Attempt::Ended(status, _) => crate::log_sink::routine(|| {
                info!(
                    "job {}: {} on worker {worker} after {} ms",
                    job.job_id,
                    status.outcome.word(),
                    status.duration_ms
                )
            }),
            Attempt::Refused(why) => {
                warn!("job {}: worker {worker} {why}; trying another", job.job_id)
            }
        }
        // The worker was told first (CancelJob above); now our side of the call ends.
        // An answered call is only dropped: the C core cancels it then if the worker
        // has not ended it, and skips the cancel (a pass down the call's filter stack to
        // the transport, about 3 % of our CPU per job) when it has, as it has by the time
        // its answer is read.
        if let (Some(call), false) = (&mut call, has_answer) {
            call.cancel();
        }
        attempt
    }
}

mod ending;
mod output;
mod run_call;

#[cfg(test)]
mod tests;
