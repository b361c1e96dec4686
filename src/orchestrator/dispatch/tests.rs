//! Unit tests of the mapping from a `RunJob` call's end to the job's status.

use super::ending::*;
use super::*;
use crate::grpc::cancel::CancelReason;
use grpcio::{RpcStatus, RpcStatusCode};

const TIMEOUT: Duration = Duration::from_secs(90);

fn grpc(code: RpcStatusCode) -> CallError {
    CallError::Grpc(grpcio::Error::RpcFailure(RpcStatus::with_message(
        code,
        "details".into(),
    )))
}

fn ended(outcome: Outcome, then: Then, error: &str) -> Ending {
    Ending::Ended {
        outcome,
        then,
        error: error.to_string(),
    }
}

#[test]
fn every_grpc_code_maps_to_one_ending() {
    let failed = |code: &str| {
        ended(
            Outcome::Failed,
            Then::Release(Release::Done),
            &format!("worker w1 failed the call: {code} details"),
        )
    };
    let refused = |code: &str| {
        Ending::Refused(format!(
            "refused the job without starting it ({code} \"details\")"
        ))
    };
    let lost = |code: &str| {
        ended(
            Outcome::WorkerLost,
            Then::Release(Release::Unreachable),
            &format!("lost worker w1: {code} details"),
        )
    };
    let cases = [
        (RpcStatusCode::CANCELLED, lost("1-CANCELLED")),
        (RpcStatusCode::UNKNOWN, failed("2-UNKNOWN")),
        (
            RpcStatusCode::INVALID_ARGUMENT,
            failed("3-INVALID_ARGUMENT"),
        ),
        (
            RpcStatusCode::DEADLINE_EXCEEDED,
            ended(
                Outcome::TimedOut,
                Then::StopOnWorker,
                "no answer from worker w1 within 1m 30s",
            ),
        ),
        (RpcStatusCode::NOT_FOUND, failed("5-NOT_FOUND")),
        (RpcStatusCode::ALREADY_EXISTS, refused("6-ALREADY_EXISTS")),
        (
            RpcStatusCode::PERMISSION_DENIED,
            refused("7-PERMISSION_DENIED"),
        ),
        (
            RpcStatusCode::RESOURCE_EXHAUSTED,
            Ending::Refused("is full".into()),
        ),
        (
            RpcStatusCode::FAILED_PRECONDITION,
            failed("9-FAILED_PRECONDITION"),
        ),
        (RpcStatusCode::ABORTED, failed("10-ABORTED")),
        (RpcStatusCode::OUT_OF_RANGE, failed("11-OUT_OF_RANGE")),
        (RpcStatusCode::UNIMPLEMENTED, refused("12-UNIMPLEMENTED")),
        (RpcStatusCode::INTERNAL, failed("13-INTERNAL")),
        (RpcStatusCode::UNAVAILABLE, lost("14-UNAVAILABLE")),
        (RpcStatusCode::DATA_LOSS, failed("15-DATA_LOSS")),
        (
            RpcStatusCode::UNAUTHENTICATED,
            refused("16-UNAUTHENTICATED"),
        ),
    ];
    for (code, ending) in cases {
        assert_eq!(failed_call(&grpc(code), "w1", TIMEOUT), ending, "{code:?}");
    }
}

#[test]
fn a_go_worker_that_is_busy_started_nothing_and_its_build_errors_are_failures() {
    let unknown = |message: &str| {
        CallError::Grpc(grpcio::Error::RpcFailure(RpcStatus::with_message(
            RpcStatusCode::UNKNOWN,
            message.into(),
        )))
    };
    assert_eq!(
        failed_call(&unknown("worker is currently busy"), "go", TIMEOUT),
        Ending::Refused("is full".into())
    );
    assert_eq!(
        failed_call(
            &unknown("Failed to build Docker image: exit status 1"),
            "go",
            TIMEOUT
        ),
        ended(
            Outcome::Failed,
            Then::Release(Release::Done),
            "worker go failed the call: 2-UNKNOWN Failed to build Docker image: exit status 1"
        )
    );
}

#[test]
fn our_own_cancels_and_other_errors_map_to_their_endings() {
    assert_eq!(
        failed_call(
            &CallError::Cancelled(CancelReason::WorkerLost(Duration::from_secs(61))),
            "w1",
            TIMEOUT
        ),
        ended(
            Outcome::WorkerLost,
            Then::Release(Release::Done),
            "worker w1 did not answer health pings for 61s (--lost-after) while running the \
             job: given up"
        )
    );
    assert_eq!(
        failed_call(
            &CallError::Cancelled(CancelReason::Cancelled),
            "w1",
            TIMEOUT
        ),
        ended(Outcome::Cancelled, Then::StopOnWorker, "cancelled")
    );
    let Ending::Ended { outcome, then, .. } = failed_call(
        &CallError::Grpc(grpcio::Error::RemoteStopped),
        "w1",
        TIMEOUT,
    ) else {
        panic!("a call that failed otherwise is not a refusal");
    };
    assert_eq!(
        (outcome, then),
        (Outcome::Failed, Then::Release(Release::Done))
    );
}
