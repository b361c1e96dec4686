//! Queue types (issue 15, `--queue-type`): quorum queues declared and used end to end on
//! the real broker, and a queue of another type refused at start with a clear error.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::build_env::sh;
use common::*;
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

/// The type RabbitMQ reports for `queue` (`classic`, `quorum`).
fn queue_type(queue: &str) -> String {
    sh("rabbitmqctl list_queues -q name type")
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .map(|(_, kind)| kind.trim().to_string())
        .unwrap_or_else(|| panic!("no queue {queue}"))
}

#[test]
fn with_queue_type_quorum_the_queues_are_quorum_queues_and_jobs_flow() {
    let names = Names::unique("quorum");
    let orch = Orchestrator::start(
        SHARED_BROKER,
        &names,
        &["--queue-type", "quorum", "--events-key", "api.event"],
    );
    let mq = Mq::without_declaring(SHARED_BROKER, &names);
    for queue in [
        &names.execute,
        &names.status,
        &names.cancel,
        &names.rejected,
        &names.events,
    ] {
        assert_eq!(queue_type(queue), "quorum", "{queue}");
    }
    let _worker = orch.worker("quorum-w", Behaviour::default());
    mq.publish_job("quorum-1", json!({}));
    let statuses = mq.statuses(1, LONG);
    assert_eq!(statuses[0]["outcome"], "succeeded", "{}", statuses[0]);
    mq.assert_no_more_statuses();
}

#[test]
fn a_queue_of_another_type_stops_the_start_with_a_clear_error() {
    let names = Names::unique("qtype");
    // The test's connection declares classic queues, as an existing deployment has.
    let _mq = Mq::connect(SHARED_BROKER, &names);
    let mut args = vec![
        "orchestrator".to_string(),
        "--amqp-url".into(),
        SHARED_BROKER.into(),
        "--queue-type".into(),
        "quorum".into(),
        "--grpc-listen".into(),
        "127.0.0.1:0".into(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(names.args());
    let mut child = command()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LONG;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the orchestrator kept running with queues of another type");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    let message = stderr
        .lines()
        .find(|line| line.starts_with("blacktree: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    for part in [
        names.execute.as_str(),
        "classic queue",
        "--queue-type",
        "quorum",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}
