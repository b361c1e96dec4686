//! The health ticker: every interval it pings every worker's `JobService.Ping` at once
//! (each call with its own deadline), records the answers in the registry, gives up
//! the jobs of workers silent for `--lost-after`, and forgets workers that stayed
//! unhealthy too long. A worker whose ping failed is pinged again a
//! timeout after the failed ping was sent (at once when it timed out), not a whole
//! interval later, until it answers or is unhealthy: a frozen worker is out of the pool
//! within one interval plus `unhealthy-after` × timeout (4 s at the defaults), while a
//! healthy one is still pinged once per interval.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::registry::{PingResult, PingTarget, Registry, Reported};
use crate::grpc::cancel::{self, CallError};
use crate::metrics::Metrics;
use crate::proto::job::{PingRequest, WorkerStatus};

/// Starts the health ticker; its first round runs at once.
pub fn spawn(
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    interval: Duration,
    timeout: Duration,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("health-ticker".into())
        .spawn(move || loop {
            let started = Instant::now();
            let failures = round(&registry, timeout);
            metrics.ping_failures.inc_by(failures);
            metrics.health_round.set(started.elapsed().as_secs_f64());
            registry.give_up_silent();
            let (out_of_rotation, given_up) = registry.take_liveness_counts();
            metrics.workers_unhealthy.inc_by(out_of_rotation);
            metrics.jobs_given_up.inc_by(given_up);
            // The load gauges stay fresh between scrapes (and too many slots are warned
            // about once, scraped or not).
            metrics.load.update(registry.slots());
            registry.forget_expired();
            std::thread::sleep(interval.saturating_sub(started.elapsed()));
        })
        .expect("spawning the health ticker thread")
}

/// Pings every worker concurrently and records the results, pinging suspects (failed,
/// still healthy) again a timeout after their last ping was sent; returns when every
/// worker answered or is unhealthy, with the number of failed pings.
pub fn round(registry: &Registry, timeout: Duration) -> u64 {
    let mut failures = 0;
    let mut targets = registry.ping_targets();
    while !targets.is_empty() {
        let sent = Instant::now();
        let (failed, suspects) = ping_all(registry, targets, timeout);
        failures += failed;
        targets = suspects;
        if !targets.is_empty() {
            // Failures stay a timeout apart: a refused connection is not asked again
            // within the same instant (a timed-out ping already waited that long).
            std::thread::sleep(timeout.saturating_sub(sent.elapsed()));
        }
    }
    failures
}

/// Pings `targets` concurrently and records the results; returns the number of failed
/// pings and the suspects.
fn ping_all(
    registry: &Registry,
    targets: Vec<PingTarget>,
    timeout: Duration,
) -> (u64, Vec<PingTarget>) {
    let mut failures = 0;
    let mut suspects = Vec::new();
    let request = PingRequest::new();
    let calls: Vec<_> = targets
        .into_iter()
        .map(|target| {
            let call = target
                .client
                .ping_async_opt(&request, registry.call_options(timeout));
            (target, call)
        })
        .collect();
    for (target, call) in calls {
        let result = match call
            .map_err(CallError::Grpc)
            .and_then(|mut c| cancel::wait(&mut c, None))
        {
            // Another worker now listens at this address (an id moved): not this one.
            Ok(pong) if !pong.workerId.is_empty() && *pong.workerId != *target.worker => {
                let other: String = pong.workerId.chars().take(64).collect();
                PingResult::Failed(format!("its address answers as worker {other:?}"))
            }
            Ok(pong) => {
                // What it runs and holds counts before it can look free.
                match Reported::checked(&pong.jobIds, &pong.heldJobIds, target.capacity) {
                    Ok(reported) => registry.report(&target.worker, reported),
                    Err(reason) => {
                        log::warn!("worker {}: ping report ignored: {reason}", target.worker)
                    }
                }
                if pong.draining {
                    PingResult::Draining
                } else if pong.status == WorkerStatus::BUSY {
                    PingResult::Busy
                } else {
                    PingResult::Free(u32::try_from(pong.freeSlots).ok().filter(|&n| n > 0))
                }
            }
            Err(CallError::Grpc(grpcio::Error::RpcFailure(s)))
                if s.code() == grpcio::RpcStatusCode::UNIMPLEMENTED =>
            {
                PingResult::Failed("its address is not a Blacktree worker (no JobService)".into())
            }
            Err(CallError::Grpc(e)) => failed_ping(e, timeout),
            Err(CallError::Cancelled(reason)) => PingResult::Failed(format!("{reason:?}")),
        };
        failures += u64::from(result.failed());
        if registry.record_ping(&target, result) {
            suspects.push(target);
        }
    }
    (failures, suspects)
}

/// What a failed ping says: refused (nothing listens there: the worker process is gone)
/// or another error (an answer) is `Failed`; no answer at all (the deadline passed, or
/// no connection could be made for another reason: the worker is frozen or its host
/// unreachable, and it may still run builds) is `Unanswered`.
fn failed_ping(error: grpcio::Error, timeout: Duration) -> PingResult {
    use grpcio::RpcStatusCode;
    let grpcio::Error::RpcFailure(status) = &error else {
        return PingResult::Failed(error.to_string());
    };
    match status.code() {
        RpcStatusCode::DEADLINE_EXCEEDED => PingResult::Unanswered(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
        RpcStatusCode::UNAVAILABLE if !status.message().contains("Connection refused") => {
            PingResult::Unanswered(error.to_string())
        }
        _ => PingResult::Failed(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpcio::{RpcStatus, RpcStatusCode};

    fn failure(code: RpcStatusCode, message: &str) -> grpcio::Error {
        grpcio::Error::RpcFailure(RpcStatus::with_message(code, message.into()))
    }

    #[test]
    fn a_refused_ping_is_failed_and_one_without_an_answer_is_unanswered() {
        let second = Duration::from_secs(1);
        let classify = |code, message| failed_ping(failure(code, message), second);
        let refused = "failed to connect to all addresses; last error: UNKNOWN: \
                       ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused";
        assert!(matches!(
            classify(RpcStatusCode::UNAVAILABLE, refused),
            PingResult::Failed(_)
        ));
        assert_eq!(
            classify(RpcStatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded"),
            PingResult::Unanswered("no answer within 1s".into())
        );
        assert!(matches!(
            classify(RpcStatusCode::UNAVAILABLE, "Socket closed"),
            PingResult::Unanswered(_)
        ));
        assert!(matches!(
            classify(RpcStatusCode::UNAUTHENTICATED, "bad token"),
            PingResult::Failed(_)
        ));
    }
}
