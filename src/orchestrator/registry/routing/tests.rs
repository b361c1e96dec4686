//! Labelled claims, their waiters, routability and draining, without a broker.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver};
use grpcio::Environment;

use super::super::{
    Claim, Hint, LabelledClaim, Origin, PingResult, Registry, RegistrySettings, Release, SlotWait,
};
use crate::grpc::cancel::CancelToken;
use crate::labels::Labels;

fn registry() -> (Registry, Receiver<Hint>) {
    let (tx, rx) = unbounded();
    let settings = RegistrySettings {
        unhealthy_after: 1,
        lost_after: Duration::from_secs(60),
        keepalive: crate::grpc::Keepalive::for_lost_after(Duration::from_secs(60)),
        forget_after: Duration::from_secs(600),
        tls: None,
        token: None,
        max_workers: 10,
    };
    (
        Registry::new(Arc::new(Environment::new(1)), tx, settings),
        rx,
    )
}

fn labels(text: &str) -> Labels {
    Labels::new(text.split(',').map(|kv| {
        let (k, v) = kv.split_once('=').unwrap();
        (k.to_string(), v.to_string())
    }))
    .unwrap()
}

fn claimed(claim: LabelledClaim<'_>) -> Claim {
    match claim {
        LabelledClaim::Claimed(claim) => claim,
        _ => panic!("no slot was claimed"),
    }
}

fn waiting(claim: LabelledClaim<'_>) -> SlotWait<'_> {
    match claim {
        LabelledClaim::Wait(wait) => wait,
        _ => panic!("it does not wait"),
    }
}

fn add(registry: &Registry, id: &str, offered: &str, capacity: u32) {
    let offered = if offered.is_empty() {
        Labels::default()
    } else {
        labels(offered)
    };
    registry.register(
        id,
        "127.0.0.1:1",
        "",
        &offered,
        capacity,
        Origin::Registered,
    );
}

#[test]
fn a_labelled_claim_goes_only_to_a_worker_with_every_label_and_within_its_capacity() {
    let (registry, _) = registry();
    let token = CancelToken::default();
    add(&registry, "amd", "arch=amd64", 4);
    add(&registry, "arm", "arch=arm64,os=linux", 1);
    let arm = labels("arch=arm64");
    let claim = claimed(registry.claim_matching(&arm, "j1", &token));
    assert_eq!(&*claim.worker, "arm");
    // Its one slot is taken: the next one waits, and is woken when it frees.
    let wait = waiting(registry.claim_matching(&arm, "j2", &token));
    assert!(wait.woken.try_recv().is_err());
    registry.release(&claim, "j1", Release::Done);
    assert!(
        wait.woken.try_recv().is_ok(),
        "a freed matching slot wakes it"
    );
    drop(wait);
    assert_eq!(
        &*claimed(registry.claim_matching(&arm, "j2", &token)).worker,
        "arm"
    );
    assert!(matches!(
        registry.claim_matching(&labels("arch=arm64,os=windows"), "j3", &token),
        LabelledClaim::NoRoom
    ));
}

#[test]
fn a_slot_taken_by_labels_makes_its_hint_stale_and_none_is_forgotten() {
    let (registry, hints) = registry();
    let token = CancelToken::default();
    add(&registry, "arm", "arch=arm64", 1);
    let claim = claimed(registry.claim_matching(&labels("arch=arm64"), "j1", &token));
    let hint = hints.try_recv().unwrap();
    assert!(registry.claim(&hint, "j2", &token).is_none(), "stale hint");
    registry.release(&claim, "j1", Release::Done);
    let hint = hints.try_recv().expect("the freed slot is hinted again");
    assert!(registry.claim(&hint, "j2", &token).is_some());
}

#[test]
fn routability_follows_registrations_health_and_drains() {
    let (registry, _) = registry();
    let changes = registry.routing_changes();
    let arm = labels("arch=arm64");
    assert!(registry.routable(&Labels::default()));
    assert!(!registry.routable(&arm));
    add(&registry, "arm", "arch=arm64", 1);
    assert!(changes.try_recv().is_ok(), "a registration signals");
    assert!(registry.routable(&arm));
    // A waiter is woken when the only matching worker goes, to give its job back.
    add(&registry, "busy-arm", "arch=arm64", 1);
    let token = CancelToken::default();
    let claims: Vec<_> = ["j1", "j2"]
        .iter()
        .map(|j| claimed(registry.claim_matching(&arm, j, &token)))
        .collect();
    let wait = waiting(registry.claim_matching(&arm, "j3", &token));
    registry.set_draining("arm", true);
    assert!(wait.woken.try_recv().is_ok());
    let target = registry
        .ping_targets()
        .into_iter()
        .find(|t| &*t.worker == "busy-arm")
        .unwrap();
    registry.record_ping(&target, PingResult::Failed("gone".into()));
    assert!(!registry.routable(&arm), "drained, or unhealthy");
    let _ = changes.try_recv();
    registry.set_draining("arm", false);
    assert!(changes.try_recv().is_ok(), "a resume signals");
    assert!(registry.routable(&arm));
    drop(claims);
}

#[test]
fn a_drained_worker_gets_no_job_and_is_hinted_again_when_resumed() {
    let (registry, hints) = registry();
    let token = CancelToken::default();
    add(&registry, "w", "", 2);
    registry.set_draining("w", true);
    let listed = registry.list();
    assert_eq!(listed[0].state, "draining");
    assert!(listed[0].safe_to_stop());
    let target = registry.ping_targets().pop().unwrap();
    registry.record_ping(&target, PingResult::Draining);
    let claimed = hints
        .try_iter()
        .filter(|h| registry.claim(h, "j1", &token).is_some())
        .count();
    assert_eq!(claimed, 0, "its hints are stale while it drains");
    // A FREE ping (it was resumed through another orchestrator) brings it back.
    let target = registry.ping_targets().pop().unwrap();
    registry.record_ping(&target, PingResult::Free(Some(2)));
    assert_eq!(registry.list()[0].state, "free");
    let claimed = hints
        .try_iter()
        .enumerate()
        .filter(|(i, h)| registry.claim(h, &format!("j{i}"), &token).is_some())
        .count();
    assert_eq!(claimed, 2, "its slots are hinted again");
}

#[test]
fn no_more_jobs_of_a_label_set_wait_than_their_workers_have_slots() {
    let (registry, _) = registry();
    let changes = registry.routing_changes();
    let token = CancelToken::default();
    add(&registry, "arm", "arch=arm64", 2);
    add(&registry, "amd", "arch=amd64", 8);
    let arm = labels("arch=arm64");
    let _running: Vec<_> = ["r1", "r2"]
        .iter()
        .map(|j| claimed(registry.claim_matching(&arm, j, &token)))
        .collect();
    assert_eq!(registry.room(&arm), 2);
    let _ = changes.try_recv();
    let first = waiting(registry.claim_matching(&arm, "w1", &token));
    let _second = waiting(registry.claim_matching(&arm, "w2", &token));
    assert_eq!(registry.room(&arm), 0);
    assert!(
        matches!(
            registry.claim_matching(&arm, "w3", &token),
            LabelledClaim::NoRoom
        ),
        "two arm64 slots, two jobs waiting for them: a third would only hold a thread"
    );
    assert!(changes.try_recv().is_err());
    drop(first);
    assert!(
        changes.try_recv().is_ok(),
        "a wait that ends makes room: signalled"
    );
    assert_eq!(registry.room(&arm), 1);
    assert_eq!(
        registry.room(&labels("arch=riscv")),
        0,
        "no worker: no room"
    );
    assert_eq!(registry.room(&Labels::default()), usize::MAX);
}
