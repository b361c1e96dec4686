//! Unit tests of the job table: one run per jobId, attaching, held answers and their
//! bounds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Wake;

use super::*;

fn answer(job_id: &str, logs: usize) -> JobResponse {
    JobResponse {
        jobId: job_id.into(),
        success: true,
        logs: "x".repeat(logs),
        ..JobResponse::default()
    }
}

/// A waker that counts its wakes.
#[derive(Default)]
struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_job_id_runs_once_and_later_calls_attach_or_get_the_held_answer() {
    let table = JobTable::new(2, Duration::from_secs(3600));
    let Begin::Start(running) = table.begin("a", None) else {
        panic!("a new job starts");
    };
    let Begin::Attach(attached) = table.begin("a", None) else {
        panic!("a second call attaches");
    };
    assert!(Arc::ptr_eq(&running, &attached));
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    let waiter = table.waiter();
    assert!(attached.answer_or_wait(waiter, &waker).is_none());
    assert_eq!(table.report(), (vec!["a".to_string()], vec![]));

    table.finish("a", answer("a", 3));
    assert_eq!(
        counter.0.load(Ordering::SeqCst),
        1,
        "the waiting call is woken"
    );
    assert_eq!(attached.answer_or_wait(waiter, &waker).unwrap().jobId, "a");
    assert_eq!(table.report(), (vec![], vec!["a".to_string()]));
    let Begin::Held(held) = table.begin("a", None) else {
        panic!("a call after the end gets the held answer");
    };
    assert_eq!(held.logs, "xxx");
    table.delivered("a");
    assert_eq!(
        table.report(),
        (vec![], vec!["a".to_string()]),
        "a received answer stays held for a redelivery"
    );
    assert!(matches!(table.begin("a", None), Begin::Held(_)));

    // Kept at most --hold-results (here nothing) once received.
    let table = JobTable::new(1, Duration::ZERO);
    assert!(matches!(table.begin("b", None), Begin::Start(_)));
    table.finish("b", answer("b", 1));
    table.delivered("b");
    assert_eq!(table.report(), (vec![], vec![]));
    assert!(
        matches!(table.begin("b", None), Begin::Start(_)),
        "an answer received and past its time is not held"
    );
}

#[test]
fn capacity_and_draining_refuse_new_jobs_but_not_calls_for_known_ones() {
    let table = JobTable::new(1, Duration::from_secs(3600));
    assert!(matches!(table.begin("a", None), Begin::Start(_)));
    assert!(matches!(
        table.begin("b", None),
        Begin::Full("no free slot")
    ));
    assert!(matches!(
        table.begin("a", Some("the worker is shutting down")),
        Begin::Attach(_)
    ));
    table.finish("a", answer("a", 0));
    assert!(matches!(
        table.begin("a", Some("the worker is shutting down")),
        Begin::Held(_)
    ));
    assert!(matches!(
        table.begin("b", Some("the worker is shutting down")),
        Begin::Full(_)
    ));
    assert!(
        matches!(table.begin("b", None), Begin::Start(_)),
        "a held answer takes no slot"
    );
}

#[test]
fn a_cancel_stops_a_running_job_or_drops_a_held_answer() {
    let table = JobTable::new(2, Duration::from_secs(3600));
    let Begin::Start(running) = table.begin("a", None) else {
        panic!();
    };
    assert!(table.cancel("a", "cancelled"));
    assert!(running.control.reason().is_some());
    table.finish("a", answer("a", 0));
    assert!(!table.cancel("a", "cancelled"));
    assert_eq!(
        table.report(),
        (vec![], vec![]),
        "the held answer is dropped"
    );
}

#[test]
fn held_answers_expire_and_are_bounded() {
    let table = JobTable::new(1, Duration::ZERO);
    table.begin("a", None);
    table.finish("a", answer("a", 0));
    assert_eq!(table.report(), (vec![], vec![]), "held for no time");

    let table = JobTable::new(1, Duration::from_secs(3600));
    for i in 0..MAX_HELD + 3 {
        let id = format!("job-{i}");
        table.begin(&id, None);
        table.finish(&id, answer(&id, 0));
    }
    let (_, held) = table.report();
    assert_eq!(held.len(), MAX_HELD);
    assert!(!held.contains(&"job-0".to_string()), "the oldest go first");

    let table = JobTable::new(1, Duration::from_secs(3600));
    let big = MAX_HELD_BYTES / 2 + 1;
    for id in ["a", "b"] {
        table.begin(id, None);
        table.finish(id, answer(id, big));
    }
    assert_eq!(table.report().1, ["b"], "bounded in bytes");
}

#[test]
fn an_abandoned_job_is_not_held() {
    let table = JobTable::new(1, Duration::from_secs(3600));
    table.begin("a", None);
    table.abandon("a", answer("a", 0));
    assert_eq!(table.report(), (vec![], vec![]));
}
