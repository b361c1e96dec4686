use super::*;
use crate::job::Outcome;

fn status(job_id: &str, outcome: Outcome, error: &str) -> Status {
    Status::without_answer(job_id, outcome, "w1", error.to_string())
}

#[test]
fn a_running_job_shows_its_step_and_last_lines_then_moves_to_the_finished_ring() {
    let board = Arc::new(Board::new(2));
    let received = Instant::now();
    let running = board.start(
        "j1",
        "w1",
        "arch=arm64".into(),
        received,
        Duration::from_secs(60),
        false,
    );
    let lines: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
    board.lines("j1", &["$ git clone".into()]);
    board.lines("j1", &lines);
    let detail = board.job_json("j1").expect("running");
    assert_eq!(detail["state"], "running");
    assert_eq!(detail["step"], "git clone", "the step outlives the lines");
    let tail = detail["logTail"].as_array().unwrap();
    assert_eq!(tail.len(), TAIL_LINES);
    assert_eq!(tail[TAIL_LINES - 1], "line 49");
    assert_eq!(board.running()[0].step, "git clone");

    running.finish(&status("j1", Outcome::Failed, "step failed\nmore"));
    assert!(board.running().is_empty());
    let detail = board.job_json("j1").expect("finished");
    assert_eq!(detail["outcome"], "failed");
    assert_eq!(detail["labels"], "arch=arm64");
    let events: Vec<&str> = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["received", "dispatched", "finished"]);
    assert_eq!(board.finished()[0].error_line(), "step failed");
    assert_eq!(board.hour().iter().map(|m| m.waited).sum::<u32>(), 1);
}

#[test]
fn the_finished_ring_keeps_the_newest_and_cuts_long_text() {
    let board = Board::new(2);
    for id in ["a", "b", "c"] {
        board.finished_unstarted(&status(id, Outcome::Rejected, &"é".repeat(3000)));
    }
    let ids: Vec<String> = board
        .finished()
        .iter()
        .map(|j| j.status.job_id.clone())
        .collect();
    assert_eq!(ids, ["c", "b"], "newest first, the oldest dropped");
    assert!(board.job_json("a").is_none());
    let kept = &board.finished()[0].status.error;
    assert!(kept.len() <= TEXT_BYTES && kept.len() > TEXT_BYTES - 2);
    assert_eq!(board.hour().iter().map(|m| m.finished).sum::<u32>(), 3);
}

#[test]
fn a_dropped_running_job_leaves_no_trace() {
    let board = Arc::new(Board::default());
    let running = board.start(
        "j1",
        "w1",
        String::new(),
        Instant::now(),
        Duration::ZERO,
        true,
    );
    drop(running);
    assert!(board.job_json("j1").is_none());
    assert!(board.finished().is_empty());
    board.lines("j1", &["$ late".into()]);
    assert!(board.running().is_empty());
}
