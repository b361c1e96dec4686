//! Unit tests of the ledger: every rule without a broker.

use super::*;

fn fresh() -> Ledger {
    ledger_with(Duration::from_secs(600))
}

fn ledger_with(dedupe_window: Duration) -> Ledger {
    let config = LedgerConfig {
        max_message_bytes: 4096,
        dedupe_window,
        drain_timeout: Duration::from_secs(30),
        cancel_ttl: Duration::from_secs(3600),
        events: false,
        derived_image_prefix: "blacktree/".into(),
        unroutable_after: None,
    };
    Ledger::new(config, Arc::new(Metrics::default()), Vec::new())
}

fn job(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"jobId": id, "repoUrl": "a/b"})).unwrap()
}

fn cancel(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "jobId": id })).unwrap()
}

/// The (run, single) of the only action, which must be an ack.
fn acked(actions: &[Action]) -> (Vec<u64>, Vec<u64>) {
    match actions {
        [Action::Ack { run, single }] => (run.clone(), single.clone()),
        other => panic!("expected one ack, got {other:?}"),
    }
}

/// The statuses among `actions`: (jobId, outcome).
fn statuses(actions: &[Action]) -> Vec<(String, Outcome)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish(Publication::Status(s)) => Some((s.job_id.clone(), s.outcome)),
            _ => None,
        })
        .collect()
}

/// The actions after a leading `Remember`, and the jobIds it remembers (sorted).
fn after_remember(actions: &[Action]) -> (Vec<String>, &[Action]) {
    match actions {
        [Action::Remember(cancels), rest @ ..] => {
            let mut ids: Vec<_> = cancels.iter().map(|c| c.job_id.clone()).collect();
            ids.sort();
            (ids, rest)
        }
        other => panic!("expected the early cancels to be remembered first, got {other:?}"),
    }
}

fn confirmed(ledger: &mut Ledger, ids: &[&str]) -> Vec<Action> {
    ledger.confirmed(ids.iter().map(|id| AckKey::Job(id.to_string())).collect())
}

fn dispatch_all(ledger: &mut Ledger) -> Vec<Assignment> {
    std::iter::from_fn(|| ledger.next_job()).collect()
}

#[test]
fn a_job_is_acked_only_once_its_status_is_confirmed() {
    let mut ledger = fresh();
    assert!(ledger.job_delivery(1, job("a"), false).is_empty());
    let jobs = dispatch_all(&mut ledger);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].job.job_id, "a");
    assert!(confirmed(&mut ledger, &["b"]).is_empty(), "not its status");
    assert_eq!(acked(&confirmed(&mut ledger, &["a"])), (vec![], vec![1]));
    assert!(confirmed(&mut ledger, &["a"]).is_empty(), "acked once");
}

#[test]
fn a_run_of_the_oldest_deliveries_is_one_multiple_ack() {
    let mut ledger = fresh();
    for (tag, id) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
        ledger.job_delivery(tag, job(id), false);
    }
    // c is not the oldest: a and b are still unacked.
    assert_eq!(acked(&confirmed(&mut ledger, &["c"])), (vec![], vec![3]));
    // a, b and d: a and b are the oldest in a row (c is gone); d follows them.
    assert_eq!(
        acked(&confirmed(&mut ledger, &["d", "a", "b"])),
        (vec![1, 2, 4], vec![])
    );
    let mut ledger = fresh();
    for (tag, id) in [(1, "a"), (2, "b"), (3, "c")] {
        ledger.job_delivery(tag, job(id), false);
    }
    assert_eq!(
        acked(&confirmed(&mut ledger, &["c", "b"])),
        (vec![], vec![2, 3]),
        "a is still running: no multiple ack may cover it"
    );
    assert_eq!(
        acked(&confirmed(&mut ledger, &["a"])),
        (vec![], vec![1]),
        "a run of one is an ordinary ack"
    );
}

#[test]
fn a_redelivery_of_a_job_in_flight_joins_it_and_is_acked_with_it() {
    let mut ledger = fresh();
    ledger.job_delivery(1, job("a"), false);
    assert_eq!(dispatch_all(&mut ledger).len(), 1);
    assert!(ledger.job_delivery(2, job("a"), false).is_empty());
    assert!(dispatch_all(&mut ledger).is_empty(), "not run twice");
    assert_eq!(acked(&confirmed(&mut ledger, &["a"])), (vec![1, 2], vec![]));
    assert_eq!(ledger.stats().duplicates, 1);
}

#[test]
fn a_job_confirmed_within_the_window_is_acked_at_once_and_not_run_again() {
    let mut ledger = fresh();
    ledger.job_delivery(1, job("a"), false);
    dispatch_all(&mut ledger);
    confirmed(&mut ledger, &["a"]);
    assert_eq!(
        acked(&ledger.job_delivery(2, job("a"), false)),
        (vec![], vec![2])
    );
    assert!(dispatch_all(&mut ledger).is_empty());

    let mut ledger = ledger_with(Duration::ZERO);
    ledger.job_delivery(1, job("a"), false);
    dispatch_all(&mut ledger);
    confirmed(&mut ledger, &["a"]);
    assert!(ledger.job_delivery(2, job("a"), false).is_empty());
    assert_eq!(
        dispatch_all(&mut ledger).len(),
        1,
        "outside the window: runs"
    );
}

#[test]
fn only_a_run_of_the_oldest_unacked_deliveries_is_acked_as_multiple() {
    let unacked: BTreeSet<u64> = [3, 4, 5, 7, 9].into();
    assert_eq!(oldest_run(&unacked, &[3, 4, 5]), 3);
    assert_eq!(oldest_run(&unacked, &[3, 4, 7]), 2, "5 is still running");
    assert_eq!(oldest_run(&unacked, &[4, 5]), 0, "3 is still running");
    assert_eq!(oldest_run(&unacked, &[3, 4, 5, 7, 9]), 5);
    assert_eq!(oldest_run(&unacked, &[]), 0);
}

#[test]
fn recent_jobs_forget_by_age_and_by_count() {
    let mut recent = RecentJobs::new(Duration::from_secs(60), 2);
    recent.insert("a".into());
    recent.insert("b".into());
    recent.insert("a".into());
    assert!(recent.contains("a") && recent.contains("b"));
    recent.insert("c".into());
    assert!(!recent.contains("a"), "over capacity, the oldest goes");
    assert!(recent.contains("b") && recent.contains("c"));

    let mut recent = RecentJobs::new(Duration::ZERO, 10);
    recent.insert("a".into());
    assert!(!recent.contains("a"), "outside the window");
}

#[test]
fn a_cancel_before_its_job_means_the_job_is_cancelled_on_arrival() {
    let mut ledger = fresh();
    let actions = ledger.cancel_delivery(1, cancel("a"));
    let (remembered, rest) = after_remember(&actions);
    assert_eq!(remembered, ["a"], "remembered before the cancel is acked");
    assert_eq!(acked(rest), (vec![], vec![1]));
    let actions = ledger.job_delivery(2, job("a"), false);
    assert_eq!(statuses(&actions), [("a".to_string(), Outcome::Cancelled)]);
    assert!(
        matches!(actions.last(), Some(Action::Remember(c)) if c.is_empty()),
        "the state file forgets the cancel once it is used: {actions:?}"
    );
    assert!(dispatch_all(&mut ledger).is_empty(), "never dispatched");
    assert_eq!(acked(&confirmed(&mut ledger, &["a"])), (vec![], vec![2]));
}

#[test]
fn early_cancels_a_state_file_remembered_cancel_their_jobs() {
    let config = fresh().config;
    let until = std::time::SystemTime::now() + Duration::from_secs(60);
    let remembered = vec![EarlyCancel::new("a".into(), until)];
    let mut ledger = Ledger::new(config, Arc::new(Metrics::default()), remembered);
    let actions = ledger.job_delivery(1, job("a"), false);
    assert_eq!(statuses(&actions), [("a".to_string(), Outcome::Cancelled)]);
    assert!(dispatch_all(&mut ledger).is_empty(), "never dispatched");
}

#[test]
fn a_cancel_drops_a_job_in_the_backlog_and_fires_the_token_of_one_in_dispatch() {
    let mut ledger = fresh();
    ledger.job_delivery(1, job("running"), false);
    let running = dispatch_all(&mut ledger);
    ledger.job_delivery(2, job("waiting"), false);
    let actions = ledger.cancel_delivery(3, cancel("waiting"));
    assert_eq!(
        statuses(&actions),
        [("waiting".to_string(), Outcome::Cancelled)]
    );
    assert!(matches!(actions.last(), Some(Action::Ack { .. })));
    assert!(!ledger.has_backlog(), "dropped from the backlog");

    assert_eq!(running[0].token.reason(), None);
    let actions = ledger.cancel_delivery(4, cancel("running"));
    assert!(
        statuses(&actions).is_empty(),
        "dispatch publishes its status"
    );
    assert_eq!(running[0].token.reason(), Some(CancelReason::Cancelled));
}

/// A ledger with three jobs: `running` (tag 1, taken by dispatch), `in-channel` (tag
/// 2, in the `jobs` channel: returned here) and `waiting` (tag 3, in the backlog).
fn three_jobs() -> (Ledger, Assignment, Assignment) {
    let mut ledger = fresh();
    for (tag, id) in [(1, "running"), (2, "in-channel"), (3, "waiting")] {
        ledger.job_delivery(tag, job(id), false);
    }
    let running = ledger.next_job().unwrap();
    let in_channel = ledger.next_job().unwrap();
    (ledger, running, in_channel)
}

#[test]
fn a_drain_requeues_what_did_not_start_and_ends_when_running_jobs_are_confirmed() {
    let (mut ledger, _running, in_channel) = three_jobs();
    assert!(!ledger.drain_finished());
    let actions = ledger.start_drain(vec![in_channel]);
    let nacked: Vec<u64> = actions
        .iter()
        .map(|a| match a {
            Action::Nack(tag) => *tag,
            other => panic!("expected nacks, got {other:?}"),
        })
        .collect();
    assert_eq!(nacked, [2, 3]);
    assert!(!ledger.drain_finished(), "the running job is not confirmed");
    assert!(
        matches!(
            ledger.job_delivery(4, job("late"), false)[..],
            [Action::Nack(4)]
        ),
        "no new job during a drain"
    );
    confirmed(&mut ledger, &["running"]);
    assert!(ledger.drain_finished());
}

#[test]
fn a_lost_connection_forgets_deliveries_keeps_running_jobs_and_releases_waiting_ones() {
    let (mut ledger, _running, in_channel) = three_jobs();
    assert!(ledger.connection_lost(vec![in_channel]).is_empty());
    assert!(!ledger.has_backlog());
    assert!(
        confirmed(&mut ledger, &["running"]).is_empty(),
        "nothing of the dead connection is acked"
    );

    let mut ledger = fresh();
    ledger.job_delivery(1, job("running"), false);
    ledger.job_delivery(2, job("waiting"), false);
    ledger.job_delivery(3, job("held"), false);
    let running = ledger.next_job().unwrap();
    assert!(running.token.begin_attempt(), "sent to a worker");
    // A dispatch thread holds it, waiting for a slot.
    let held = ledger.next_job().unwrap();
    assert!(ledger.connection_lost(Vec::new()).is_empty());
    assert!(
        held.token.released() && !held.token.begin_attempt(),
        "a job not sent to a worker yet never starts here"
    );
    assert!(!running.token.released());
    // Redelivered on the new connection (tags start again).
    assert!(ledger.job_delivery(1, job("running"), false).is_empty());
    assert!(ledger.job_delivery(2, job("waiting"), false).is_empty());
    assert!(ledger.job_delivery(3, job("held"), false).is_empty());
    let again: Vec<String> = dispatch_all(&mut ledger)
        .into_iter()
        .map(|a| a.job.job_id)
        .collect();
    assert_eq!(
        again,
        ["waiting", "held"],
        "the running job is not dispatched again"
    );
    assert_eq!(
        acked(&confirmed(&mut ledger, &["running"])),
        (vec![], vec![1])
    );
}

#[test]
fn bad_messages_are_rejected_and_acked_once_their_copy_is_confirmed() {
    let mut ledger = fresh();
    let actions = ledger.job_delivery(1, b"not json".to_vec(), false);
    let id = match &actions[..] {
        [Action::Publish(Publication::Rejected { id, body, .. })] => {
            assert_eq!(body, b"not json");
            *id
        }
        other => panic!("expected a rejected copy, got {other:?}"),
    };
    assert_eq!(
        acked(&ledger.confirmed(vec![AckKey::Rejected(id)])),
        (vec![], vec![1])
    );
    assert_eq!(ledger.metrics.jobs_rejected.get(), 1);
}

#[test]
fn cancels_never_join_a_multiple_ack() {
    // Cancels come on a channel of their own: a multiple ack on the jobs channel must
    // not name them, and they must not make a run of jobs look broken.
    let mut ledger = fresh();
    let cancel_tag = CANCEL_TAG | 1;
    ledger.job_delivery(1, job("a"), false);
    ledger.job_delivery(2, job("b"), false);
    dispatch_all(&mut ledger);
    let rejected = match &ledger.cancel_delivery(cancel_tag, b"{not json".to_vec())[..] {
        [Action::Publish(Publication::Rejected { id, .. })] => *id,
        other => panic!("a malformed cancel is rejected: {other:?}"),
    };
    let keys = vec![
        AckKey::Job("a".into()),
        AckKey::Rejected(rejected),
        AckKey::Job("b".into()),
    ];
    assert_eq!(
        acked(&ledger.confirmed(keys)),
        (vec![1, 2], vec![cancel_tag])
    );
    let actions = ledger.cancel_delivery(cancel_tag + 1, cancel("c"));
    assert_eq!(
        acked(after_remember(&actions).1),
        (vec![], vec![cancel_tag + 1])
    );
}

#[test]
fn a_job_cancelled_while_it_waited_for_dispatch_ends_cancelled_on_drain_or_connection_loss() {
    // Drain: not sent back to the queue to run later, but ended with its status.
    let (mut ledger, _running, in_channel) = three_jobs();
    ledger.cancel_delivery(CANCEL_TAG | 1, cancel("in-channel"));
    let actions = ledger.start_drain(vec![in_channel]);
    assert_eq!(
        statuses(&actions),
        [("in-channel".to_string(), Outcome::Cancelled)]
    );
    assert!(
        actions.iter().all(|a| !matches!(a, Action::Nack(2))),
        "not requeued: {actions:?}"
    );
    assert_eq!(
        acked(&confirmed(&mut ledger, &["in-channel"])),
        (vec![], vec![2])
    );

    // Connection lost: its status now, and its redelivery is not run.
    let (mut ledger, _running, in_channel) = three_jobs();
    ledger.cancel_delivery(CANCEL_TAG | 1, cancel("in-channel"));
    let actions = ledger.connection_lost(vec![in_channel]);
    assert_eq!(
        statuses(&actions),
        [("in-channel".to_string(), Outcome::Cancelled)]
    );
    assert!(ledger.job_delivery(7, job("in-channel"), false).is_empty());
    assert!(
        dispatch_all(&mut ledger)
            .iter()
            .all(|a| a.job.job_id != "in-channel"),
        "the redelivery is not run"
    );
    assert_eq!(
        acked(&confirmed(&mut ledger, &["in-channel"])),
        (vec![], vec![7])
    );
}

#[test]
fn a_job_dropped_unstarted_on_connection_loss_waits_for_a_report_when_redelivered() {
    let mut ledger = fresh();
    ledger.job_delivery(1, job("running"), false);
    ledger.job_delivery(2, job("waiting"), false);
    let running = ledger.next_job().unwrap();
    assert!(running.token.begin_attempt());
    ledger.connection_lost(Vec::new());
    ledger.job_delivery(1, job("waiting"), true);
    let redelivered: Vec<(String, bool)> = dispatch_all(&mut ledger)
        .into_iter()
        .map(|a| (a.job.job_id, a.redelivered))
        .collect();
    assert_eq!(
        redelivered,
        [("waiting".to_string(), true)],
        "another orchestrator may have started it meanwhile: it waits for a report"
    );
}
