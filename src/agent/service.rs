//! The worker's `JobService` (RunJob, Ping, CancelJob: the contract of
//! `proto/job.proto`). Handlers run on grpcio's threads and never block: `RunJob` starts
//! a job thread (or attaches to the running job of that jobId, or answers with its held
//! answer, see [`super::jobs`]) and waits for the answer in a future on grpcio's thread.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError};
use futures_sink::Sink;
use grpcio::{
    Method, MethodType, RpcContext, RpcStatus, RpcStatusCode, ServerStreamingSink, ServiceBuilder,
    UnarySink, WriteFlags,
};
use log::{debug, info, warn};
use protobuf::RepeatedField;

use super::checks;
use super::executor::Executor;
use super::jobs::{Begin, JobTable, Running};
use super::live_log::Batch;
use crate::grpc::{self, pb_method, RUN_JOB_STREAM};
use crate::job::Secret;
use crate::proto::job::{
    CancelJobRequest, CancelJobResponse, JobRequest, JobResponse, PingRequest, PingResponse,
    SetDrainingRequest, SetDrainingResponse, WorkerStatus,
};

/// What the handlers share.
#[derive(Clone)]
pub struct Agent {
    /// The worker's id, in Ping answers.
    pub id: String,
    /// Running jobs and held answers.
    pub jobs: Arc<JobTable>,
    /// Runs a job's steps.
    pub executor: Arc<Executor>,
    /// The registration token every call must carry, if one is configured.
    pub token: Option<Secret>,
    /// Set at SIGTERM: nothing new starts.
    pub draining: Arc<AtomicBool>,
    /// Set by an operator (`blacktree workers drain`, through `SetDraining`): nothing
    /// new starts until resumed.
    pub drained: Arc<AtomicBool>,
    /// Jobs by outcome and step durations (the worker's `/metrics`).
    pub metrics: Arc<super::metrics::WorkerMetrics>,
}

const PING: Method<PingRequest, PingResponse> =
    pb_method(MethodType::Unary, "/job.JobService/Ping");
const CANCEL_JOB: Method<CancelJobRequest, CancelJobResponse> =
    pb_method(MethodType::Unary, "/job.JobService/CancelJob");
const SET_DRAINING: Method<SetDrainingRequest, SetDrainingResponse> =
    pb_method(MethodType::Unary, "/job.JobService/SetDraining");

/// The worker's `JobService`.
pub fn job_service(agent: Agent) -> grpcio::Service {
    let (run, ping, cancel, drain) = (agent.clone(), agent.clone(), agent.clone(), agent);
    ServiceBuilder::new()
        .add_server_streaming_handler(&RUN_JOB_STREAM, move |ctx, job, sink| {
            run.run_job(ctx, job, sink)
        })
        .add_unary_handler(&PING, move |ctx, _req, sink| ping.ping(ctx, sink))
        .add_unary_handler(&CANCEL_JOB, move |ctx, req, sink| {
            cancel.cancel_job(ctx, req, sink)
        })
        .add_unary_handler(&SET_DRAINING, move |ctx, req, sink| {
            drain.set_draining(ctx, req, sink)
        })
        .build()
}

/// Answers a `RunJob` call with an error status: nothing was started.
fn refuse(ctx: &RpcContext, sink: ServerStreamingSink<JobResponse>, status: RpcStatus) {
    ctx.spawn(async move {
        if let Err(e) = sink.fail(status).await {
            debug!("could not answer a call: {e}");
        }
    });
}

/// The most bytes of output lines in one streamed message.
const BATCH_BYTES: usize = 64 * 1024;

/// What a streaming `RunJob` call waits for next.
enum Next {
    Answer(Arc<JobResponse>),
    Lines(Batch),
    Gone,
}

/// Sends one message of a streamed `RunJob` ahead of its answer, and waits until it is
/// written (gRPC's flow control: a slow caller holds it here, lines pile up in the
/// job's bounded live log meanwhile).
async fn send_one(
    sink: &mut ServerStreamingSink<JobResponse>,
    message: JobResponse,
) -> grpcio::Result<()> {
    poll_fn(|cx| Pin::new(&mut *sink).poll_ready(cx)).await?;
    Pin::new(&mut *sink).start_send((message, WriteFlags::default()))?;
    poll_fn(|cx| Pin::new(&mut *sink).poll_flush(cx)).await
}

/// Sends a `RunJob` call its one answer.
async fn send(
    sink: &mut ServerStreamingSink<JobResponse>,
    answer: JobResponse,
) -> grpcio::Result<()> {
    poll_fn(|cx| Pin::new(&mut *sink).poll_ready(cx)).await?;
    Pin::new(&mut *sink).start_send((answer, WriteFlags::default()))?;
    poll_fn(|cx| Pin::new(&mut *sink).poll_close(cx)).await
}

impl Agent {
    fn run_job(&self, ctx: RpcContext, job: JobRequest, sink: ServerStreamingSink<JobResponse>) {
        let refusal = match &self.token {
            Some(token) if !grpc::authorized(&ctx, token) => Some(grpc::unauthenticated(&ctx)),
            _ => checks::job_id(&job.jobId)
                .err()
                .map(|e| RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, e)),
        };
        if let Some(status) = refusal {
            return refuse(&ctx, sink, status);
        }
        let job_id = job.jobId.clone();
        let running = match self.jobs.begin(&job_id, self.closed()) {
            Begin::Full(why) => {
                let status = RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, why.into());
                return refuse(&ctx, sink, status);
            }
            Begin::Held(answer) => {
                info!("job {job_id}: a call came for its held answer");
                let jobs = self.jobs.clone();
                let mut sink = sink;
                ctx.spawn(async move {
                    match send(&mut sink, answer).await {
                        Ok(()) => jobs.delivered(&job_id),
                        Err(e) => warn!("job {job_id}: its held answer could not be sent: {e}"),
                    }
                });
                return;
            }
            Begin::Attach(running) => {
                info!("job {job_id}: a call attached to the running job");
                running
            }
            Begin::Start(running) => {
                if let Err(e) = self.start(job.clone(), &running) {
                    warn!("job {job_id}: could not start a job thread: {e}");
                    let error = "the worker could not start a job thread";
                    self.jobs.abandon(&job_id, failure(&job_id, error));
                    let status =
                        RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, error.into());
                    return refuse(&ctx, sink, status);
                }
                running
            }
        };
        self.wait_and_answer(&ctx, sink, job_id, running, job.streamLogs);
    }

    /// Waits on grpcio's thread (without blocking it) for the job's answer or the caller
    /// going away, whichever comes first; with `stream`, sends the job's output as it
    /// comes meanwhile ([`LiveLog`]: a slow caller makes it drop lines, never the build
    /// wait). The answer is sent; a caller that went away leaves the job running (an
    /// orphan), its answer held for the next call.
    fn wait_and_answer(
        &self,
        ctx: &RpcContext,
        mut sink: ServerStreamingSink<JobResponse>,
        job_id: String,
        running: Arc<Running>,
        stream: bool,
    ) {
        let jobs = self.jobs.clone();
        let metrics = self.metrics.clone();
        let waiter = jobs.waiter();
        ctx.spawn(async move {
            let mut cursor = 0;
            let lines = |batch: Batch| {
                metrics.log_lines_dropped(batch.missed);
                JobResponse {
                    jobId: job_id.clone(),
                    logLines: RepeatedField::from_vec(batch.lines),
                    logLinesDropped: batch.missed,
                    ..JobResponse::default()
                }
            };
            let answer = loop {
                let next = poll_fn(|cx| {
                    if let Some(answer) = running.answer_or_wait(waiter, cx.waker()) {
                        return Poll::Ready(Next::Answer(answer));
                    }
                    if stream {
                        if let Some(batch) = running.live.read(&mut cursor, BATCH_BYTES, cx.waker()) {
                            return Poll::Ready(Next::Lines(batch));
                        }
                    }
                    match Pin::new(&mut sink).poll_flush(cx) {
                        Poll::Ready(Err(_)) => Poll::Ready(Next::Gone),
                        _ => Poll::Pending,
                    }
                })
                .await;
                match next {
                    Next::Answer(answer) => break Some(answer),
                    Next::Gone => break None,
                    Next::Lines(batch) => {
                        if send_one(&mut sink, lines(batch)).await.is_err() {
                            break None;
                        }
                    }
                }
            };
            let Some(answer) = answer else {
                running.leave(waiter);
                info!("job {job_id}: the caller went away; the job keeps running, its answer will be held");
                return;
            };
            // The last lines, then the answer.
            if stream {
                let waker = std::task::Waker::noop();
                while let Some(batch) = running.live.read(&mut cursor, BATCH_BYTES, waker) {
                    if send_one(&mut sink, lines(batch)).await.is_err() {
                        break;
                    }
                }
            }
            match send(&mut sink, (*answer).clone()).await {
                Ok(()) => jobs.delivered(&job_id),
                Err(e) => warn!(
                    "job {job_id}: the answer could not be sent (the caller is gone: {e}); it is held for the next call"
                ),
            }
        });
    }

    /// Starts the thread that runs `job`.
    fn start(&self, job: JobRequest, running: &Arc<Running>) -> std::io::Result<()> {
        let (agent, running) = (self.clone(), running.clone());
        std::thread::Builder::new()
            .name(format!(
                "job-{}",
                job.jobId.chars().take(24).collect::<String>()
            ))
            .spawn(move || agent.run(job, running))
            .map(drop)
    }

    /// Why no new job may start, if none may: the worker is stopping, or drained.
    fn closed(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::SeqCst) {
            Some("the worker is shutting down")
        } else if self.drained.load(Ordering::SeqCst) {
            Some("the worker was drained by an operator")
        } else {
            None
        }
    }

    fn ping(&self, ctx: RpcContext, sink: UnarySink<PingResponse>) {
        let Some(sink) = grpc::admit(&ctx, sink, self.token.as_ref()) else {
            return;
        };
        let (running, held) = self.jobs.report();
        let closed = self.closed().is_some();
        let free = if closed { 0 } else { self.jobs.free_slots() };
        let pong = PingResponse {
            workerId: self.id.clone(),
            status: if free == 0 {
                WorkerStatus::BUSY
            } else {
                WorkerStatus::FREE
            },
            jobIds: RepeatedField::from_vec(running),
            heldJobIds: RepeatedField::from_vec(held),
            freeSlots: i32::try_from(free).unwrap_or(i32::MAX),
            draining: closed,
            ..PingResponse::default()
        };
        grpc::reply(&ctx, sink, pong);
    }

    /// `blacktree workers drain|resume`, relayed by an orchestrator.
    fn set_draining(
        &self,
        ctx: RpcContext,
        req: SetDrainingRequest,
        sink: UnarySink<SetDrainingResponse>,
    ) {
        let Some(sink) = grpc::admit(&ctx, sink, self.token.as_ref()) else {
            return;
        };
        let was = self.drained.swap(req.draining, Ordering::SeqCst);
        let running = self.jobs.report().0.len();
        if was != req.draining {
            if req.draining {
                info!(
                    "drained by an operator: no new jobs; {} running",
                    crate::plural::count(running, "job")
                );
            } else {
                info!("resumed by an operator: taking jobs again");
            }
        }
        let answer = SetDrainingResponse {
            draining: self.closed().is_some(),
            running: i32::try_from(running).unwrap_or(i32::MAX),
            ..SetDrainingResponse::default()
        };
        grpc::reply(&ctx, sink, answer);
    }

    fn cancel_job(
        &self,
        ctx: RpcContext,
        req: CancelJobRequest,
        sink: UnarySink<CancelJobResponse>,
    ) {
        let Some(sink) = grpc::admit(&ctx, sink, self.token.as_ref()) else {
            return;
        };
        let mut answer = CancelJobResponse::default();
        if self.jobs.cancel(&req.jobId, "cancelled") {
            answer.cancelled = true;
            answer.message = "stopping the job".to_string();
            info!("job {}: cancel requested", req.jobId);
        } else {
            answer.message = "no such job is running here".to_string();
        }
        grpc::reply(&ctx, sink, answer);
    }

    /// Runs one job on its own thread; its answer goes to the job table.
    fn run(self, job: JobRequest, running: Arc<Running>) {
        let control = running.control.clone();
        let job_id = job.jobId.clone();
        info!("job {job_id}: started");
        let started = std::time::Instant::now();
        // The watchdog stops the job at its deadline; the job's end closes `done`.
        let (done, finished) = bounded::<()>(0);
        if job.timeoutSeconds > 0 {
            let control = control.clone();
            let timeout = Duration::from_secs(job.timeoutSeconds.into());
            std::thread::spawn(move || {
                if finished.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout) {
                    control.cancel(&format!(
                        "timed out after {}",
                        humantime::format_duration(timeout)
                    ));
                }
            });
        }
        let answer = self.executor.run(&job, &control, &running.live);
        drop(done);
        self.metrics
            .job_ended(answer.success, control.reason().as_deref());
        info!(
            "job {job_id}: {} after {} ms{}",
            if answer.success {
                "succeeded"
            } else {
                "failed"
            },
            started.elapsed().as_millis(),
            if answer.error.is_empty() {
                String::new()
            } else {
                format!(": {}", answer.error)
            }
        );
        self.jobs.finish(&job_id, answer);
    }
}

/// A failed answer that says `error`.
fn failure(job_id: &str, error: &str) -> JobResponse {
    JobResponse {
        jobId: job_id.to_string(),
        error: error.to_string(),
        ..JobResponse::default()
    }
}
