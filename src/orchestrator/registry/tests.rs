//! Unit tests of the worker registry and its slot accounting.

use super::*;
use crate::agent::jobs::MAX_HELD;
use crate::grpc::cancel::CancelReason;
use crate::labels::Labels;
use crossbeam_channel::{unbounded, Receiver};

/// `--lost-after` of the test registries: short, so that giving up can be seen.
const LOST_AFTER: Duration = Duration::from_millis(50);

fn registry(unhealthy_after: u32) -> (Registry, Receiver<Hint>) {
    let (tx, rx) = unbounded();
    let env = Arc::new(Environment::new(1));
    let settings = RegistrySettings {
        unhealthy_after,
        lost_after: LOST_AFTER,
        keepalive: crate::grpc::Keepalive::for_lost_after(LOST_AFTER),
        forget_after: Duration::ZERO,
        tls: None,
        token: None,
        max_workers: 3,
    };
    (Registry::new(env, tx, settings), rx)
}

/// Claims with every waiting hint; returns the claims obtained.
fn claim_all(registry: &Registry, hints: &Receiver<Hint>, token: &CancelToken) -> Vec<Claim> {
    // Claimed jobs are named job0, job1… in the order they got a slot.
    let mut claims = Vec::new();
    for hint in hints.try_iter() {
        if let Some(claim) = registry.claim(&hint, &format!("job{}", claims.len()), token) {
            claims.push(claim);
        }
    }
    claims
}

/// Registers a worker without region or labels.
fn add(registry: &Registry, id: &str, addr: &str, capacity: u32, origin: Origin) -> Option<u64> {
    registry.register(id, addr, "", &Labels::default(), capacity, origin)
}

fn target(registry: &Registry, id: &str) -> PingTarget {
    registry
        .ping_targets()
        .into_iter()
        .find(|t| &*t.worker == id)
        .expect("worker listed")
}

#[test]
fn a_worker_never_gets_more_than_its_capacity() {
    let (registry, hints) = registry(2);
    let token = CancelToken::default();
    add(&registry, "w", "127.0.0.1:1", 3, Origin::Registered);
    add(&registry, "w", "127.0.0.1:1", 3, Origin::Registered); // re-registration: old hints stale
    let claims = claim_all(&registry, &hints, &token);
    assert_eq!(claims.len(), 3);
    assert!(hints.is_empty());
    registry.release(&claims[0], "job0", Release::Done);
    let again = claim_all(&registry, &hints, &token);
    assert_eq!(again.len(), 1, "exactly the freed slot is hinted again");
}

#[test]
fn unhealthy_or_busy_workers_get_no_job_and_recover_their_slots() {
    let (registry, hints) = registry(2);
    let token = CancelToken::default();
    add(&registry, "w", "127.0.0.1:1", 2, Origin::Registered);
    for _ in 0..2 {
        registry.record_ping(
            &target(&registry, "w"),
            PingResult::Failed("timeout".into()),
        );
    }
    assert!(claim_all(&registry, &hints, &token).is_empty(), "unhealthy");
    registry.record_ping(&target(&registry, "w"), PingResult::Busy);
    assert!(claim_all(&registry, &hints, &token).is_empty(), "busy");
    registry.record_ping(&target(&registry, "w"), PingResult::Free(None));
    assert_eq!(
        claim_all(&registry, &hints, &token).len(),
        2,
        "both slots hinted again"
    );
}

#[test]
fn busy_explained_by_our_own_jobs_does_not_withhold_the_worker() {
    let (registry, hints) = registry(2);
    let token = CancelToken::default();
    add(&registry, "w", "127.0.0.1:1", 1, Origin::Registered);
    let ping = target(&registry, "w");
    let claim = claim_all(&registry, &hints, &token)
        .pop()
        .expect("one slot");
    registry.release(&claim, "job0", Release::Done);
    registry.record_ping(&ping, PingResult::Busy);
    assert_eq!(claim_all(&registry, &hints, &token).len(), 1);
}

#[test]
fn an_unhealthy_worker_keeps_its_calls_until_silent_for_lost_after() {
    let (registry, hints) = registry(1);
    let token = CancelToken::default();
    add(&registry, "w", "127.0.0.1:1", 2, Origin::Registered);
    let claims = claim_all(&registry, &hints, &token);
    registry.record_ping(&target(&registry, "w"), PingResult::Failed("down".into()));
    registry.give_up_silent();
    assert_eq!(token.reason(), None, "out of rotation, its calls go on");
    assert!(
        claim_all(&registry, &hints, &token).is_empty(),
        "no new job"
    );
    // It answers again before lost-after: nothing is given up.
    registry.record_ping(&target(&registry, "w"), PingResult::Busy);
    std::thread::sleep(LOST_AFTER * 2);
    registry.give_up_silent();
    assert_eq!(token.reason(), None);
    assert_eq!(registry.take_liveness_counts(), (1, 0));
    // Silent again, now for longer than lost-after: given up, the silence told.
    registry.record_ping(&target(&registry, "w"), PingResult::Failed("down".into()));
    std::thread::sleep(LOST_AFTER * 2);
    registry.give_up_silent();
    match token.reason() {
        Some(CancelReason::WorkerLost(silent)) => assert!(silent >= LOST_AFTER * 2),
        other => panic!("not given up: {other:?}"),
    }
    registry.give_up_silent();
    assert_eq!(registry.take_liveness_counts(), (1, 1), "counted once");
    for (i, claim) in claims.iter().enumerate() {
        registry.release(claim, &format!("job{i}"), Release::Done);
    }
    assert!(claim_all(&registry, &hints, &token).is_empty());

    add(&registry, "v", "127.0.0.1:2", 1, Origin::Registered);
    let claim = claim_all(&registry, &hints, &token)
        .pop()
        .expect("one slot");
    registry.release(&claim, "job0", Release::Unreachable);
    assert!(claim_all(&registry, &hints, &token).is_empty());
}

#[test]
fn a_failed_ping_makes_a_suspect_until_the_worker_is_unhealthy_or_answers() {
    let (registry, _hints) = registry(3);
    add(&registry, "w", "127.0.0.1:1", 1, Origin::Registered);
    let fail = || registry.record_ping(&target(&registry, "w"), PingResult::Failed("x".into()));
    assert!(fail(), "first failure: still healthy, ping again");
    assert!(fail(), "second failure");
    assert!(!fail(), "third failure: unhealthy, no longer a suspect");
    assert!(!fail(), "unhealthy workers wait for the next round");
    assert!(!registry.record_ping(&target(&registry, "w"), PingResult::Free(None)));
    assert!(fail(), "healthy again: a failure is suspect again");
}

#[test]
fn registered_workers_are_forgotten_static_ones_are_not() {
    let (registry, _hints) = registry(1);
    add(&registry, "dyn", "127.0.0.1:1", 1, Origin::Registered);
    add(&registry, "static", "127.0.0.1:2", 1, Origin::Static);
    registry.record_ping(&target(&registry, "static"), PingResult::Free(None));
    for id in ["dyn", "static"] {
        registry.record_ping(&target(&registry, id), PingResult::Failed("down".into()));
    }
    registry.forget_expired();
    assert!(!registry.is_registered("dyn"));
    assert!(registry.is_registered("static"));
}

#[test]
fn a_worker_view_survives_list_workers() {
    let view = WorkerView {
        id: "w1".into(),
        addr: "10.0.0.2:6000".into(),
        region: "eu".into(),
        labels: Labels::new([
            ("arch".into(), "arm64".into()),
            ("region".into(), "eu".into()),
        ])
        .unwrap(),
        state: "busy".into(),
        capacity: 3,
        in_flight: 2,
        last_ping: Some(Duration::from_millis(1500)),
        withheld: false,
        unhealthy_for: None,
        jobs_run: 0,
        jobs_failed: 0,
    };
    assert_eq!(WorkerView::from_proto(&view.to_proto()), view);
    assert_eq!(view.state_text(), "busy");
    let silent = WorkerView {
        state: "unhealthy".into(),
        last_ping: Some(Duration::from_millis(12_400)),
        ..view.clone()
    };
    assert_eq!(silent.state_text(), "unhealthy (silent 12s)");
    let mute = WorkerView {
        last_ping: None,
        ..silent
    };
    assert_eq!(mute.state_text(), "unhealthy (never answered)");
    let never = WorkerView {
        last_ping: None,
        ..view
    };
    assert_eq!(never.to_proto().lastPingMsAgo, -1);
    assert_eq!(WorkerView::from_proto(&never.to_proto()), never);
}

#[test]
fn a_restored_worker_gets_no_job_until_it_answers_a_ping() {
    let (registry, hints) = registry(1);
    add(&registry, "r", "127.0.0.1:1", 2, Origin::Restored);
    assert_eq!(registry.list()[0].state, "unhealthy");
    assert!(hints.try_iter().next().is_none(), "no hint before a ping");
    registry.record_ping(&target(&registry, "r"), PingResult::Free(None));
    assert_eq!(
        claim_all(&registry, &hints, &CancelToken::default()).len(),
        2
    );
}

#[test]
fn a_restored_worker_that_never_answers_is_forgotten() {
    let (registry, _hints) = registry(1);
    add(&registry, "r", "127.0.0.1:1", 1, Origin::Restored);
    registry.forget_expired(); // forget_after is zero here
    assert!(!registry.is_registered("r"));
}

#[test]
fn every_change_of_the_set_of_workers_reaches_the_state_file() {
    let path = std::env::temp_dir()
        .join(format!("blacktree-registry-{}", uuid::Uuid::new_v4()))
        .join("registry.json");
    let (file, _) = crate::orchestrator::state_file::open(Some(&path))
        .unwrap()
        .unwrap();
    let (registry, _hints) = registry(1);
    let registry = registry.remembered_in(Arc::new(file));
    let remembered = || -> Vec<(String, String, bool)> {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        json["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                let text = |k: &str| w[k].as_str().unwrap().to_string();
                (text("id"), text("address"), w["static"].as_bool().unwrap())
            })
            .collect()
    };
    registry.register(
        "dyn",
        "127.0.0.1:1",
        "eu",
        &Labels::default(),
        3,
        Origin::Registered,
    );
    add(&registry, "fixed", "127.0.0.1:2", 1, Origin::Static);
    assert_eq!(
        remembered(),
        [
            ("dyn".into(), "127.0.0.1:1".into(), false),
            ("fixed".into(), "127.0.0.1:2".into(), true)
        ]
    );
    registry.register(
        "dyn",
        "127.0.0.1:9",
        "eu",
        &Labels::default(),
        3,
        Origin::Registered,
    ); // it moved
    assert_eq!(remembered()[0], ("dyn".into(), "127.0.0.1:9".into(), false));
    registry.record_ping(&target(&registry, "dyn"), PingResult::Failed("down".into()));
    registry.forget_expired();
    assert_eq!(remembered(), [("fixed".into(), "127.0.0.1:2".into(), true)]);
}

#[test]
fn registrations_beyond_max_workers_are_refused_but_known_ids_and_static_ones_are_not() {
    let (registry, _hints) = registry(1); // max_workers: 3
    for id in ["a", "b", "c"] {
        assert!(add(&registry, id, "127.0.0.1:1", 1, Origin::Registered).is_some());
    }
    assert_eq!(
        add(&registry, "d", "127.0.0.1:1", 1, Origin::Registered),
        None
    );
    assert!(add(&registry, "a", "127.0.0.1:2", 1, Origin::Registered).is_some());
    assert!(add(&registry, "s", "127.0.0.1:3", 1, Origin::Static).is_some());
    assert_eq!(registry.list().len(), 4);
}

fn reported(running: &[&str], held: &[&str]) -> Reported {
    let set = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect();
    Reported {
        running: set(running),
        held: set(held),
    }
}

#[test]
fn reported_builds_take_slots_and_are_adopted_without_one() {
    let (registry, hints) = registry(2);
    let token = CancelToken::default();
    add(&registry, "w", "127.0.0.1:1", 3, Origin::Registered);
    // A build started by an earlier orchestrator runs there, and one answer is held.
    registry.report("w", reported(&["orphan"], &["done"]));
    let claims = claim_all(&registry, &hints, &token);
    assert_eq!(claims.len(), 2, "the orphan takes one of the three slots");
    assert!(registry.adopt("elsewhere", &token).is_none());
    let orphan = registry.adopt("orphan", &token).expect("reported running");
    let done = registry.adopt("done", &token).expect("reported held");
    assert_eq!(&*orphan.worker, "w");
    assert!(
        claim_all(&registry, &hints, &token).is_empty(),
        "still full"
    );
    // Once the adopted build ended, its slot is free, whatever the last report said.
    registry.release(&orphan, "orphan", Release::Done);
    registry.release(&done, "done", Release::Done);
    assert_eq!(claim_all(&registry, &hints, &token).len(), 1);
}

#[test]
fn reports_are_bounded_and_checked() {
    let ids = |n: usize| (0..n).map(|i| format!("j{i}")).collect::<Vec<_>>();
    assert!(Reported::checked(&ids(2), &ids(3), 2).is_ok());
    assert!(
        Reported::checked(&ids(3), &[], 2).is_err(),
        "more running than the capacity"
    );
    assert!(Reported::checked(&[], &ids(MAX_HELD + 1), 2).is_err());
    let bad = ["ok".to_string(), "a\u{0}b".to_string()];
    let reason = Reported::checked(&bad, &[], 2).unwrap_err();
    assert!(!reason.contains("a\u{0}b"), "{reason}");
    assert!(Reported::checked(&[String::new()], &[], 2).is_err());
}

#[test]
fn a_worker_registering_again_or_reporting_anew_no_longer_offers_what_it_reported() {
    let (registry, _hints) = registry(2);
    let token = CancelToken::default();
    add(&registry, "w", "127.0.0.1:1", 2, Origin::Registered);
    registry.report("w", reported(&["a"], &["b"]));
    registry.report("w", reported(&["c"], &[]));
    assert!(registry.adopt("a", &token).is_none(), "no longer reported");
    assert!(registry.adopt("b", &token).is_none());
    add(&registry, "w", "127.0.0.1:1", 2, Origin::Registered);
    assert!(
        registry.adopt("c", &token).is_none(),
        "a new registration reports nothing yet"
    );
    assert!(
        registry.reported_by.lock().unwrap().is_empty(),
        "no stale index entry"
    );
}

#[test]
fn free_slots_a_ping_reports_bound_ours_when_another_orchestrator_shares_the_worker() {
    let (registry, hints) = registry(2);
    let token = CancelToken::default();
    add(&registry, "w", "127.0.0.1:1", 4, Origin::Registered);
    // Another orchestrator runs three jobs there: one slot is free.
    registry.record_ping(&target(&registry, "w"), PingResult::Free(Some(1)));
    let claims = claim_all(&registry, &hints, &token);
    assert_eq!(claims.len(), 1, "only the slot the worker reported free");
    // Our job ends: its slot is free again before the next ping says so.
    registry.release(&claims[0], "job0", Release::Done);
    let again = claim_all(&registry, &hints, &token);
    assert_eq!(again.len(), 1, "the slot our job gave back");
    // Two of the other orchestrator's jobs end (ours and one of theirs still run).
    registry.record_ping(&target(&registry, "w"), PingResult::Free(Some(2)));
    assert_eq!(claim_all(&registry, &hints, &token).len(), 2);
    assert_eq!(registry.list()[0].state, "busy");
    // A worker that does not report slots (older ones) is bounded by its capacity alone.
    add(&registry, "old", "127.0.0.1:2", 2, Origin::Registered);
    registry.record_ping(&target(&registry, "old"), PingResult::Free(None));
    assert_eq!(claim_all(&registry, &hints, &token).len(), 2);
}

#[test]
fn a_worker_not_heard_from_or_not_answering_may_hold_a_redelivered_job_until_given_up() {
    let (registry, _hints) = registry(2);
    let unheard = || registry.unheard_worker().map(|(id, _)| id.to_string());
    add(&registry, "w", "127.0.0.1:1", 1, Origin::Restored);
    assert_eq!(unheard().as_deref(), Some("w"), "not pinged yet");
    registry.record_ping(&target(&registry, "w"), PingResult::Free(None));
    assert_eq!(unheard(), None, "it answered: it reports what it runs");
    let no_answer = || PingResult::Unanswered("no answer within 1s".into());
    registry.record_ping(&target(&registry, "w"), no_answer());
    assert_eq!(
        unheard().as_deref(),
        Some("w"),
        "frozen, or its host cut off"
    );
    registry.record_ping(
        &target(&registry, "w"),
        PingResult::Failed("refused".into()),
    );
    assert_eq!(unheard(), None, "a refused connection: nothing runs there");
    registry.record_ping(&target(&registry, "w"), no_answer());
    assert_eq!(unheard().as_deref(), Some("w"));
    std::thread::sleep(LOST_AFTER * 2);
    assert_eq!(
        unheard(),
        None,
        "silent for --lost-after: given up, not waited for"
    );
}
