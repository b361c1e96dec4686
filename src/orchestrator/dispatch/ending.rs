//! How a `RunJob` call ended, for the job's one status and for its worker's slot: every
//! way a call can fail (pure, unit-tested in `super::tests`), stopping a job on its
//! worker, and a worker's answer as a status.

use std::time::Duration;

use grpcio::RpcStatusCode;
use log::{info, warn};

use super::super::registry::{Claim, Registry, Release};
use super::{CANCEL_TIMEOUT, GO_WORKER_BUSY};
use crate::grpc::cancel::{self, CallError, CancelReason};
use crate::job::{Job, Outcome, Status};
use crate::proto::job::{CancelJobRequest, JobResponse};

/// How a `RunJob` call that brought no answer ended, for the job and for its slot.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ending {
    /// The worker started nothing (it is full, already runs this jobId, or does not
    /// accept us): the job goes to another worker. Says why, for the log.
    Refused(String),
    /// The job's one status: its outcome and error, and what becomes of the slot.
    Ended {
        outcome: Outcome,
        then: Then,
        error: String,
    },
}

/// What becomes of the slot of a call that ended without an answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Then {
    /// Release it so.
    Release(Release),
    /// Ask the worker to stop the job (`CancelJob`); its answer says how to release.
    StopOnWorker,
}

/// Maps every way a `RunJob` call can fail to its ending (pure, so every gRPC code is
/// unit-tested). `worker` names the worker in the error; `timeout` was the deadline.
pub(super) fn failed_call(error: &CallError, worker: &str, timeout: Duration) -> Ending {
    let ended = |outcome, then, error| Ending::Ended {
        outcome,
        then,
        error,
    };
    match error {
        CallError::Cancelled(CancelReason::WorkerLost(silent)) => ended(
            Outcome::WorkerLost,
            Then::Release(Release::Done),
            format!(
                "worker {worker} did not answer health pings for {}s (--lost-after) while \
                 running the job: given up",
                silent.as_secs()
            ),
        ),
        CallError::Cancelled(CancelReason::Cancelled) => {
            ended(Outcome::Cancelled, Then::StopOnWorker, "cancelled".into())
        }
        CallError::Grpc(grpcio::Error::RpcFailure(status)) => match status.code() {
            RpcStatusCode::RESOURCE_EXHAUSTED => Ending::Refused("is full".into()),
            // How the deployed Go workers say they are full: they started nothing.
            RpcStatusCode::UNKNOWN if status.message().trim() == GO_WORKER_BUSY => {
                Ending::Refused("is full".into())
            }
            // Codes that say the worker turned the call away before starting anything.
            code @ (RpcStatusCode::ALREADY_EXISTS
            | RpcStatusCode::UNAUTHENTICATED
            | RpcStatusCode::PERMISSION_DENIED
            | RpcStatusCode::UNIMPLEMENTED) => Ending::Refused(format!(
                "refused the job without starting it ({code} {:?})",
                status.message().chars().take(200).collect::<String>()
            )),
            RpcStatusCode::DEADLINE_EXCEEDED => ended(
                Outcome::TimedOut,
                Then::StopOnWorker,
                format!(
                    "no answer from worker {worker} within {}",
                    humantime::format_duration(timeout)
                ),
            ),
            RpcStatusCode::UNAVAILABLE | RpcStatusCode::CANCELLED => ended(
                Outcome::WorkerLost,
                Then::Release(Release::Unreachable),
                format!(
                    "lost worker {worker}: {} {}",
                    status.code(),
                    status.message()
                ),
            ),
            code => ended(
                Outcome::Failed,
                Then::Release(Release::Done),
                format!(
                    "worker {worker} failed the call: {code} {}",
                    status.message()
                ),
            ),
        },
        CallError::Grpc(e) => ended(
            Outcome::Failed,
            Then::Release(Release::Done),
            format!("call to worker {worker} failed: {e}"),
        ),
    }
}

/// Asks the worker to stop a job whose call we gave up on; says how to release its
/// slot: at once when the worker confirms, withheld until a Ping says FREE when it does
/// not know `CancelJob` (older workers), unreachable when it does not answer.
pub(super) fn stop_on_worker(registry: &Registry, claim: &Claim, job_id: &str) -> Release {
    let request = CancelJobRequest {
        jobId: job_id.to_string(),
        ..CancelJobRequest::default()
    };
    let call = claim
        .client
        .cancel_job_async_opt(&request, registry.call_options(CANCEL_TIMEOUT))
        .map_err(CallError::Grpc)
        .and_then(|mut call| cancel::wait(&mut call, None));
    match call {
        Ok(_) => Release::Done,
        Err(CallError::Grpc(grpcio::Error::RpcFailure(s)))
            if s.code() == RpcStatusCode::UNIMPLEMENTED =>
        {
            info!(
                "job {job_id}: worker {} has no CancelJob; its slot waits for a FREE ping",
                claim.worker
            );
            Release::Withheld
        }
        Err(e) => {
            warn!(
                "job {job_id}: could not ask worker {} to stop it: {e:?}",
                claim.worker
            );
            Release::Unreachable
        }
    }
}

/// The status of a job the worker answered.
pub(super) fn answered(job: &Job, worker: &str, response: JobResponse) -> Status {
    if response.jobId != job.job_id {
        warn!(
            "job {}: worker {worker} answered for job {:?}; keeping ours",
            job.job_id, response.jobId
        );
    }
    let token = &job.github_token;
    Status {
        job_id: job.job_id.clone(),
        success: response.success,
        logs: token.redact(&response.logs),
        image_url: token.redact(&response.imageUrl),
        error: token.redact(&response.error),
        worker_id: worker.to_string(),
        outcome: if response.success {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        },
        ..Status::without_answer(&job.job_id, Outcome::Failed, worker, String::new())
            .in_dialect(job.dialect)
    }
}
