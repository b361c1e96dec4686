//! Several orchestrators on a three-node RabbitMQ cluster with quorum queues (issue
//! 15): broker endpoints tried in turn (orchestrator and CLI), the node in use and the
//! instance id where an operator looks for them, and cancels that reach a job whichever
//! orchestrator holds it. One cluster serves the phases of one test, in order (starting
//! a cluster takes half a minute); `tests/chaos` runs 1,000 jobs through two
//! orchestrators on a cluster of its own while nodes, connections and orchestrators fail.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::build_env::{TempDir, WorkerProcess};
use common::gated::Builds;
use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

/// The tests of this file take turns: six nodes at once would crowd two cores.
static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn several_orchestrators_share_a_cluster_its_nodes_and_every_cancel() {
    let _turn = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = BrokerCluster::start();
    let names = Names::unique("cluster");
    let mq = Mq::on_quorum(&cluster.nodes[2], &names);
    let quorum = ["--queue-type", "quorum"];
    let a = Orchestrator::start(
        &cluster.urls_from(0),
        &names,
        &[&quorum[..], &["--instance-id", "orch-a"]].concat(),
    );
    let b = Orchestrator::start(&cluster.urls_from(1), &names, &quorum);

    let b_id = identity_is_shown_everywhere(&cluster, &a, &b);

    // Gated builds on two workers of capacity 2, each registered with both.
    let builds = Builds::start();
    let second = format!("127.0.0.1:{}", b.grpc_port);
    let both = ["--orchestrator", second.as_str()];
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|i| builds.worker(&format!("cw{i}"), a.grpc_port, 2, &both))
        .collect();
    for o in [&a, &b] {
        poll(LONG, "both workers registered with both", || {
            (workers_json(o.metrics_port).len() == 2).then_some(())
        });
    }
    cancels_reach_the_job_wherever_it_is(&mq, &builds, &workers, &b_id);
    the_cli_uses_the_next_node_when_the_first_is_down(&cluster, &mq, &builds);
    losing_its_node_moves_an_orchestrator_to_the_next(&cluster, &mq, &builds, &a);
}

/// `scripts/cluster.sh start` starts three joined nodes and prints the `MQ_URL` that
/// reaches them; `stop` stops them and removes their data.
#[test]
fn the_cluster_script_starts_a_cluster_and_stops_it() {
    let _turn = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("cluster-script");
    let data = dir.0.join("nodes");
    let base = free_port();
    let name = format!("btscript{}x", std::process::id());
    let script = |command: &str| {
        std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
            .arg(command)
            .env("BLACKTREE_CLUSTER_DIR", &data)
            .env("BLACKTREE_CLUSTER_PORT", base.to_string())
            .env("BLACKTREE_CLUSTER_NAME", &name)
            .output()
            .expect("running scripts/cluster.sh")
    };
    // Stopped when the test ends, also when it fails.
    let _stop = StopOnDrop(&script);
    let started = script("start");
    let stdout = text(&started.stdout);
    assert!(
        started.status.success(),
        "{stdout}{}",
        text(&started.stderr)
    );
    let urls = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MQ_URL="))
        .expect("the script prints MQ_URL=…");
    let urls: Vec<&str> = urls.split(',').collect();
    assert_eq!(urls.len(), 3, "{stdout}");
    let status = std::process::Command::new("rabbitmqctl")
        .args([
            "-n",
            &format!("{name}1@localhost"),
            "cluster_status",
            "--formatter",
            "json",
        ])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).expect("cluster_status JSON");
    assert_eq!(
        status["running_nodes"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    for url in &urls {
        let connection = amiquip::Connection::insecure_open(url);
        assert!(connection.is_ok(), "{url} does not answer");
        let _ = connection.unwrap().close();
    }
    let stopped = script("stop");
    assert!(stopped.status.success(), "{}", text(&stopped.stderr));
    assert!(!data.exists(), "the nodes' data is removed");
    assert!(
        amiquip::Connection::insecure_open(urls[0]).is_err(),
        "a node still answers"
    );
}

/// The node in use and the instance id in `/healthz`, metrics and logs; the default id
/// is the host name and the gRPC port. Returns the second orchestrator's id.
fn identity_is_shown_everywhere(
    cluster: &BrokerCluster,
    a: &Orchestrator,
    b: &Orchestrator,
) -> String {
    let healthz = |o: &Orchestrator| {
        poll(LONG, "/healthz to say ok", || {
            let (code, body) = http(o.metrics_port, "/healthz");
            (code == "200").then_some(body)
        })
    };
    let body = healthz(a);
    let node0 = format!(
        "broker: amqp://guest:***@127.0.0.1:{}/%2f",
        cluster.nodes[0].port
    );
    assert!(body.contains(&node0), "{body}");
    assert!(body.contains("orchestrator: orch-a"), "{body}");
    let body = healthz(b);
    let node1 = format!("127.0.0.1:{}/", cluster.nodes[1].port);
    assert!(
        body.contains(&node1),
        "the second starts with its own node: {body}"
    );
    let b_id = body
        .lines()
        .find_map(|l| l.strip_prefix("orchestrator: "))
        .expect("an instance id")
        .to_string();
    assert!(
        b_id.ends_with(&format!(":{}", b.grpc_port)),
        "default id is HOST:PORT: {b_id}"
    );
    let metrics = http(a.metrics_port, "/metrics").1;
    assert!(
        metrics.contains("blacktree_broker_connected{orchestrator_id=\"orch-a\"} 1"),
        "{metrics}"
    );
    assert!(a.log().contains(" orch-a blacktree::"), "{}", a.log());
    assert!(!a.log().contains("guest:guest"), "a password in the log");
    b_id
}

/// Twelve gated builds spread over both orchestrators (four running on two workers
/// registered with both, the rest waiting for a slot, in a backlog or in the queue):
/// every one is cancelled by a cancel that either orchestrator may consume.
fn cancels_reach_the_job_wherever_it_is(
    mq: &Mq,
    builds: &Builds,
    workers: &[WorkerProcess],
    b_id: &str,
) {
    let jobs: Vec<String> = (0..12).map(|i| format!("spread-{i}")).collect();
    for job in &jobs {
        mq.publish_job(job, json!({"repoUrl": "", "imageName": "unused"}));
    }
    poll(LONG, "four builds running", || {
        (builds.started() == 4).then_some(())
    });
    // The broker hands both jobs and cancels round-robin to the two orchestrators:
    // cancels in another order than the jobs (even ones first) reach, through the
    // shared cancel queue, the orchestrator that does not hold the job half the time.
    let (even, odd): (Vec<&String>, Vec<&String>) = jobs
        .iter()
        .partition(|j| j.ends_with(['0', '2', '4', '6', '8']));
    for job in even.into_iter().chain(odd) {
        mq.publish_cancel(job);
    }
    let statuses = mq.statuses_until(LONG, |s| s.len() >= jobs.len());
    let mut by = HashSet::new();
    for job in &jobs {
        let status = the_status(&statuses, job);
        assert_eq!(status["outcome"], "cancelled", "{status}");
        by.insert(status["orchestratorId"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(
        by,
        HashSet::from(["orch-a".to_string(), b_id.to_string()]),
        "the jobs were spread over both orchestrators"
    );
    for worker in workers {
        poll(LONG, "every cancelled build stopped", || {
            (!worker.runs("gates/")).then_some(())
        });
    }
    for job in &jobs {
        assert!(builds.runs(job) <= 1, "{job} ran twice");
        assert_eq!(builds.ended(job), None, "{job}'s build was not stopped");
    }
    mq.assert_no_more_statuses();
}

/// `blacktree submit` given a dead URL first publishes through the next one.
fn the_cli_uses_the_next_node_when_the_first_is_down(
    cluster: &BrokerCluster,
    mq: &Mq,
    builds: &Builds,
) {
    let urls = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f,{}",
        free_port(),
        cluster.nodes[1].url()
    );
    builds.open("via-cli");
    let dir = TempDir::new("cluster-cli");
    let job = dir.0.join("job.json");
    std::fs::write(
        &job,
        r#"{"jobId":"via-cli","repoUrl":"","imageName":"unused"}"#,
    )
    .unwrap();
    let out = blacktree(&[
        "submit",
        "--amqp-url",
        &urls,
        "--exchange",
        &mq.names.exchange,
        "--json",
        job.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let statuses = mq.statuses_until(LONG, |s| !s.is_empty());
    assert_eq!(the_status(&statuses, "via-cli")["outcome"], "succeeded");
}

/// The node an orchestrator uses stops: it reconnects to the next one, `/healthz` says
/// so, and jobs go on (the quorum queues keep a majority).
fn losing_its_node_moves_an_orchestrator_to_the_next(
    cluster: &BrokerCluster,
    mq: &Mq,
    builds: &Builds,
    a: &Orchestrator,
) {
    cluster.nodes[0].ctl(&["stop_app"]);
    let node1 = format!("127.0.0.1:{}/", cluster.nodes[1].port);
    poll(LONG, "the orchestrator on the next node", || {
        let (code, body) = http(a.metrics_port, "/healthz");
        (code == "200" && body.contains(&node1)).then_some(())
    });
    assert!(
        a.log()
            .contains(&format!("broker: connected to amqp://guest:***@{node1}")),
        "{}",
        a.log()
    );
    let jobs = ["after-0", "after-1", "after-2", "after-3"];
    for job in jobs {
        builds.open(job);
        mq.publish_job(job, json!({"repoUrl": "", "imageName": "unused"}));
    }
    let statuses = mq.statuses_until(LONG, |s| s.len() >= jobs.len());
    for job in jobs {
        assert_eq!(the_status(&statuses, job)["outcome"], "succeeded");
    }
    cluster.nodes[0].ctl(&["start_app"]);
    cluster.nodes[0].wait_accepting();
    mq.assert_no_more_statuses();
}

fn the_status<'a>(statuses: &'a [Value], job_id: &str) -> &'a Value {
    statuses
        .iter()
        .find(|s| s["jobId"] == job_id)
        .unwrap_or_else(|| panic!("no status for {job_id} in {statuses:?}"))
}

/// Runs `scripts/cluster.sh stop` when dropped.
struct StopOnDrop<'a>(&'a dyn Fn(&str) -> std::process::Output);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        (self.0)("stop");
    }
}
