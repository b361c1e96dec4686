//! Jobs held back for their labels: every rule without a broker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::super::{Action, Ledger, LedgerConfig};
use crate::job::Outcome;
use crate::labels::Labels;
use crate::metrics::Metrics;
use crate::pipeline::{AckKey, Publication, Router};

/// A router that knows which label sets (as printed) a worker has now.
#[derive(Default)]
struct Workers(Mutex<Vec<String>>);

impl Workers {
    fn add(&self, labels: &str) {
        self.0.lock().unwrap().push(labels.to_string());
    }
}

impl Router for Workers {
    fn routable(&self, labels: &Labels) -> bool {
        labels.is_empty() || self.0.lock().unwrap().contains(&labels.to_string())
    }

    /// Two slots per label set a worker has.
    fn room(&self, labels: &Labels) -> usize {
        if self.routable(labels) {
            2
        } else {
            0
        }
    }
}

fn ledger(unroutable_after: Option<Duration>) -> (Ledger, Arc<Workers>) {
    let config = LedgerConfig {
        max_message_bytes: 4096,
        dedupe_window: Duration::from_secs(600),
        drain_timeout: Duration::from_secs(30),
        cancel_ttl: Duration::from_secs(3600),
        events: false,
        derived_image_prefix: "blacktree/".into(),
        unroutable_after,
    };
    let workers = Arc::new(Workers::default());
    let ledger =
        Ledger::new(config, Arc::new(Metrics::default()), Vec::new()).with_router(workers.clone());
    (ledger, workers)
}

fn arm(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"jobId": id, "labels": {"arch": "arm64"}})).unwrap()
}

fn plain(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "jobId": id })).unwrap()
}

fn next_ids(ledger: &mut Ledger) -> Vec<String> {
    std::iter::from_fn(|| ledger.next_job())
        .map(|a| a.job.job_id)
        .collect()
}

fn statuses(actions: &[Action]) -> Vec<(String, Outcome, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish(Publication::Status(s)) => {
                Some((s.job_id.clone(), s.outcome, s.error.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_job_no_worker_can_take_waits_apart_and_goes_once_one_can() {
    let (mut ledger, workers) = ledger(None);
    ledger.job_delivery(1, arm("a1"), false);
    ledger.job_delivery(2, plain("p1"), false);
    ledger.job_delivery(3, arm("a2"), false);
    assert_eq!(
        next_ids(&mut ledger),
        ["p1"],
        "the plain job is not behind them"
    );
    assert_eq!(ledger.parked(), (2, 2));
    ledger.routing_changed();
    assert!(next_ids(&mut ledger).is_empty(), "still no arm64 worker");
    workers.add("arch=arm64");
    ledger.job_delivery(4, plain("p2"), false);
    ledger.routing_changed();
    assert_eq!(
        next_ids(&mut ledger),
        ["a1", "a2", "p2"],
        "held jobs go first, oldest first"
    );
    assert_eq!(ledger.parked(), (0, 0));
}

#[test]
fn held_jobs_leave_the_window_count_when_the_consumer_consumes_afresh() {
    let (mut ledger, _) = ledger(None);
    ledger.new_window(1);
    ledger.job_delivery(1, arm("a1"), false);
    ledger.job_delivery(2, arm("a2"), false);
    assert_eq!(ledger.parked(), (2, 2));
    ledger.new_window(2);
    assert_eq!(ledger.parked(), (2, 0));
    ledger.job_delivery(3, arm("a3"), false);
    assert_eq!(ledger.parked(), (3, 1));
    ledger.cancel_delivery(4 | super::super::CANCEL_TAG, plain("a3"));
    assert_eq!(
        ledger.parked(),
        (2, 0),
        "a3 left, and it counted in this window"
    );
}

#[test]
fn a_held_job_can_be_cancelled() {
    let (mut ledger, _) = ledger(None);
    ledger.job_delivery(1, arm("a1"), false);
    let actions = ledger.cancel_delivery(2 | super::super::CANCEL_TAG, plain("a1"));
    assert_eq!(statuses(&actions)[0].1, Outcome::Cancelled);
    assert_eq!(ledger.parked(), (0, 0));
    let acked = ledger.confirmed(vec![AckKey::Job("a1".into())]);
    assert!(matches!(&acked[..], [Action::Ack { .. }]));
}

#[test]
fn a_job_held_for_unroutable_after_is_rejected_with_its_labels() {
    let (mut ledger, _) = ledger(Some(Duration::ZERO));
    ledger.job_delivery(1, arm("a1"), false);
    assert!(ledger.next_expiry().is_some());
    let actions = ledger.expire_unroutable();
    let [(id, outcome, error)] = &statuses(&actions)[..] else {
        panic!("one status expected: {actions:?}");
    };
    assert_eq!((id.as_str(), *outcome), ("a1", Outcome::Rejected));
    assert!(error.contains("arch=arm64"), "{error}");
    assert_eq!(ledger.parked(), (0, 0));
    assert!(ledger.next_expiry().is_none());
}

#[test]
fn without_unroutable_after_a_held_job_waits_as_long_as_it_takes() {
    let (mut ledger, _) = ledger(None);
    ledger.job_delivery(1, arm("a1"), false);
    assert!(ledger.next_expiry().is_none());
    assert!(ledger.expire_unroutable().is_empty());
    assert_eq!(ledger.parked().0, 1);
}

#[test]
fn held_jobs_are_dropped_with_their_connection_and_requeued_by_a_drain() {
    let (mut ledger, _) = ledger(None);
    ledger.job_delivery(1, arm("a1"), false);
    assert!(ledger.connection_lost(Vec::new()).is_empty());
    assert_eq!(ledger.parked(), (0, 0));
    assert_eq!(ledger.unfinished(), 0, "its redelivery is a fresh job");
    ledger.job_delivery(1, arm("a1"), true);
    let actions = ledger.start_drain(Vec::new());
    assert!(matches!(&actions[..], [Action::Nack(1)]), "{actions:?}");
}

#[test]
fn a_job_given_back_by_dispatch_is_held_dropped_or_ended() {
    let (mut ledger, workers) = ledger(None);
    workers.add("arch=arm64");
    ledger.job_delivery(1, arm("a1"), false);
    ledger.job_delivery(2, arm("a2"), false);
    ledger.job_delivery(3, arm("a3"), false);
    let mut jobs: Vec<_> = std::iter::from_fn(|| ledger.next_job()).collect();
    workers.0.lock().unwrap().clear();
    // a3's delivery was lost meanwhile: dropped.
    let a3 = jobs.pop().unwrap();
    a3.token.release();
    assert!(ledger.unroutable(a3).is_empty());
    // a2 was cancelled meanwhile: it ends cancelled.
    let a2 = jobs.pop().unwrap();
    a2.token
        .cancel(crate::grpc::cancel::CancelReason::Cancelled);
    assert_eq!(statuses(&ledger.unroutable(a2))[0].1, Outcome::Cancelled);
    // a1 waits.
    assert!(ledger.unroutable(jobs.pop().unwrap()).is_empty());
    assert_eq!(ledger.parked().0, 1);
    assert!(next_ids(&mut ledger).is_empty());
}
