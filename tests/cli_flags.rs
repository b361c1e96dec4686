//! The command line's promises that `tests/cli.rs` leaves out: exit code 2 for bad usage
//! of every subcommand, 3 for a second worker on the same lock, 4 when `watch` or
//! `cancel` cannot reach the broker, `watch --json/--follow/--events-key`, every field
//! `submit` takes reaching the job message, and the environment fallbacks of the main
//! flags of the operator commands, the orchestrator and the worker. Everything runs
//! against the real broker, the real `blacktree` binary and real gRPC workers.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use amiquip::Publish;
use common::build_env::TempDir;
use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);
/// A broker URL nobody answers at (port 1 is never handed out), with a password that
/// must not show up in an error.
const NOWHERE: &str = "amqp://guest:s3cret@127.0.0.1:1/%2f";

/// What a finished `blacktree` printed and how it ended.
#[derive(Debug)]
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// A running `blacktree` whose stdout and stderr lines are collected as they come;
/// killed on drop (also when an assertion fails).
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    /// Starts `blacktree args…` with `env` on top of the test's environment, minus any
    /// `MQ_URL`/`BLACKTREE_*` the test run itself may have, so only `env` configures it
    /// (and an orchestrator's own state file, as everywhere in the tests).
    fn start(args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut command = command();
        for (key, _) in std::env::vars() {
            if key == "MQ_URL" || key.starts_with("BLACKTREE_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting blacktree");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Running {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until a stderr line contains `text`.
    fn wait_stderr(&self, text: &str) {
        poll(LONG, &format!("stderr line {text:?}"), || {
            self.stderr_text().contains(text).then_some(())
        });
    }

    /// Waits until the stdout lines so far satisfy `done`; returns them.
    fn wait_stdout(&self, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        poll(LONG, what, || {
            let lines = self.stdout_lines();
            done(&lines).then_some(lines)
        })
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to end, then for the rest of its output.
    fn finish(mut self) -> Finished {
        let status = poll(LONG, "blacktree to exit", || self.exited());
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        Finished {
            status,
            stdout: self.stdout_lines().join("\n"),
            stderr: self.stderr_text(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A thread that appends each line of `pipe` to `lines`.
fn collect(
    pipe: impl std::io::Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    })
}

/// Runs `blacktree args…` with `env` to its end (at most [`LONG`]).
fn run(args: &[&str], env: &[(&str, &str)]) -> Finished {
    Running::start(args, env).finish()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn env_pairs(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Publishes `body` on the test's exchange with `routing_key`.
fn publish(mq: &Mq, routing_key: &str, body: &Value) {
    mq.channel()
        .basic_publish(
            mq.names.exchange.as_str(),
            Publish::new(&serde_json::to_vec(body).unwrap(), routing_key),
        )
        .unwrap();
}

/// The one message that arrives in `queue` (asserting it does within [`LONG`]).
fn one_message(mq: &Mq, queue: &str) -> Value {
    let got = mq.read_until(queue, LONG, |m| !m.is_empty());
    assert_eq!(got.len(), 1, "one message in {queue}");
    serde_json::from_slice(&got[0].0).expect("the message is JSON")
}

#[test]
fn bad_usage_of_every_subcommand_exits_2_with_the_reason_on_stderr() {
    // Each invocation, were it wrongly accepted, could reach nothing: its broker and
    // orchestrator are unreachable, its queues are the test's own and its ports are 0.
    let names = Names::unique("cli-usage");
    let work_dir = TempDir::new("usage-worker");
    let work_dir = work_dir.0.to_str().unwrap();
    let mut orchestrator_args = vec![
        "orchestrator",
        "--amqp-url",
        NOWHERE,
        "--grpc-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let names_args = names.args();
    let names_args_str: Vec<&str> = names_args.iter().map(String::as_str).collect();
    orchestrator_args.extend(names_args_str.iter().copied());
    let orchestrator: &[&str] = &orchestrator_args;
    let worker = [
        "worker",
        "--orchestrator",
        "127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
        "--work-dir",
        work_dir,
    ];
    let exec = ["--executor", "exec", "--exec-command", "true"];
    let submit = [
        "submit",
        "--amqp-url",
        NOWHERE,
        "--exchange",
        &names.exchange,
    ];
    let watch = [
        "watch",
        "--amqp-url",
        NOWHERE,
        "--exchange",
        &names.exchange,
    ];
    let cancel = [
        "cancel",
        "--amqp-url",
        NOWHERE,
        "--exchange",
        &names.exchange,
    ];
    // Runs `blacktree` with the concatenated `parts` and `env`: exit code 2, nothing on
    // stdout, and a clap error on stderr that names `named`.
    let bad = |parts: &[&[&str]], env: &[(&str, &str)], named: &str| {
        let args = parts.concat();
        let out = run(&args, env);
        assert_eq!(out.code(), Some(2), "blacktree {args:?} {env:?}: {out:?}");
        assert!(out.stdout.is_empty(), "blacktree {args:?}: stdout {out:?}");
        assert!(
            out.stderr.starts_with("error:") && out.stderr.contains(named),
            "blacktree {args:?} {env:?}: stderr should say what is wrong ({named}): {}",
            out.stderr
        );
    };
    bad(&[&["frobnicate"]], &[], "frobnicate");
    // Without a subcommand, the usage goes to stderr.
    let out = run(&[], &[]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        out.stderr.contains("Usage: blacktree [OPTIONS] <COMMAND>"),
        "{out:?}"
    );

    bad(&[orchestrator, &["--no-such-flag"]], &[], "--no-such-flag");
    bad(&[orchestrator, &["--health-interval", "xyz"]], &[], "xyz");
    bad(
        &[orchestrator],
        &[("BLACKTREE_HEALTH_INTERVAL", "xyz")],
        "xyz",
    );
    bad(
        &[orchestrator, &["--dispatch-threads", "0"]],
        &[],
        "--dispatch-threads",
    );
    bad(&[orchestrator, &["--prefetch", "0"]], &[], "--prefetch");
    bad(
        &[orchestrator, &["--worker", "just-an-id"]],
        &[],
        "just-an-id",
    );
    bad(&[orchestrator, &["--tls-cert", "/x.pem"]], &[], "--tls-key");

    bad(
        &[&worker, &exec, &["--no-such-flag"]],
        &[],
        "--no-such-flag",
    );
    bad(&[&worker, &exec, &["--capacity", "0"]], &[], "--capacity");
    bad(&[&worker, &exec], &[("BLACKTREE_CAPACITY", "none")], "none");
    bad(&[&worker, &["--executor", "podman"]], &[], "podman");
    bad(&[&worker, &["--executor", "exec"]], &[], "--exec-command");
    // An exec command a docker worker would ignore is refused.
    bad(
        &[&worker, &["--exec-command", "true"]],
        &[],
        "--executor exec",
    );
    // Addresses are HOST:PORT, checked at start.
    let unlistened = ["orchestrator", "--amqp-url", NOWHERE];
    for address in ["127.0.0.1", "http://127.0.0.1:5051"] {
        let expected = "expected HOST:PORT";
        let grpc = ["--metrics-listen", "127.0.0.1:0", "--grpc-listen", address];
        bad(&[&unlistened, &names_args_str, &grpc], &[], expected);
        let metrics = ["--grpc-listen", "127.0.0.1:0", "--metrics-listen", address];
        bad(&[&unlistened, &names_args_str, &metrics], &[], expected);
        bad(
            &[&worker, &exec, &["--orchestrator", address]],
            &[],
            expected,
        );
        bad(&[&worker, &exec, &["--advertise", address]], &[], expected);
    }
    bad(
        &[&worker, &exec, &["--check-in-interval", "soon"]],
        &[],
        "soon",
    );
    let user_only = ["--registry-user", "ci"];
    bad(
        &[&worker, &exec, &user_only],
        &[],
        "--registry-password-file",
    );

    bad(&[&submit, &["--image", "a/b:1"]], &[], "--repo");
    let both = ["--json", "job.json", "--repo", "a/b"];
    bad(&[&submit, &both], &[], "cannot be used with");
    let job = ["--repo", "a/b", "--image", "a/b:1"];
    bad(&[&submit, &job, &["--timeout", "soon"]], &[], "soon");
    bad(&[&submit, &job, &["--no-such-flag"]], &[], "--no-such-flag");

    bad(&[&cancel], &[], "JOB_ID");
    bad(&[&cancel, &["job-1", "job-2"]], &[], "job-2");
    bad(
        &[&cancel, &["job-1", "--no-such-flag"]],
        &[],
        "--no-such-flag",
    );

    bad(&[&watch, &["--count", "many"]], &[], "many");
    bad(&[&watch, &["--idle", "forever"]], &[], "forever");
    bad(&[&watch, &["--no-such-flag"]], &[], "--no-such-flag");

    let workers = ["workers", "--orchestrator", "127.0.0.1:1"];
    bad(&[&workers, &["--no-such-flag"]], &[], "--no-such-flag");

    let dead = "127.0.0.1:1";
    bad(&[&["healthcheck"]], &[], "--orchestrator");
    let two = ["--orchestrator", dead, "--worker", dead];
    bad(&[&["healthcheck"], &two], &[], "cannot be used with");
    let half_tls = ["--worker", dead, "--tls-cert", "/x.pem"];
    bad(&[&["healthcheck"], &half_tls], &[], "--tls-key");
    let metrics = ["--metrics", "http://127.0.0.1:1/healthz"];
    bad(
        &[&["healthcheck"], &metrics, &["--no-such-flag"]],
        &[],
        "--no-such-flag",
    );
}

#[test]
fn a_second_worker_on_the_same_lock_file_exits_3_and_leaves_the_first_alone() {
    let dir = TempDir::new("worker-lock");
    let lock = dir.0.join("worker.lock");
    let args = strings(&[
        "worker",
        "--id",
        "lock-w",
        "--executor",
        "exec",
        "--exec-command",
        "true",
        "--orchestrator",
        "127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
        "--work-dir",
        dir.0.to_str().unwrap(),
        "--lock-file",
        lock.to_str().unwrap(),
    ]);
    let (mut first, ports) = LoggedChild::spawn(&args, &[" listening on port "]);
    let first_addr = format!("127.0.0.1:{}", ports[0]);

    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let second = run(&argv, &[]);
    assert_eq!(second.code(), Some(3), "{second:?}");
    assert!(
        second.stderr.contains("another worker is already running")
            && second.stderr.contains(lock.to_str().unwrap())
            && second
                .stderr
                .contains(&format!("held by pid {}", first.pid())),
        "{}",
        second.stderr
    );
    assert!(second.stdout.is_empty(), "{second:?}");
    // The second touched nothing: the lock still names the first, which still serves.
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        first.pid().to_string()
    );
    // It answers (NOT_SERVING: its orchestrator at 127.0.0.1:1 never registered it).
    let health = run(&["healthcheck", "--worker", &first_addr], &[]);
    assert!(
        health.code() == Some(1) && health.stderr.contains("NOT_SERVING"),
        "the first worker is undisturbed: {health:?}"
    );

    // A lock left by a killed worker does not block its restart.
    first.signal("KILL");
    first.wait_exit(LONG);
    let (again, ports) = LoggedChild::spawn(&args, &[" listening on port "]);
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        again.pid().to_string()
    );
    let health = run(
        &[
            "healthcheck",
            "--worker",
            &format!("127.0.0.1:{}", ports[0]),
        ],
        &[],
    );
    assert!(
        health.code() == Some(1) && health.stderr.contains("NOT_SERVING"),
        "{health:?}"
    );
}

#[test]
fn watch_cancel_and_healthcheck_exit_4_when_their_target_is_unreachable() {
    for args in [
        vec!["watch", "--amqp-url", NOWHERE, "--idle", "1s"],
        vec!["cancel", "--amqp-url", NOWHERE, "job-1"],
    ] {
        let out = run(&args, &[]);
        assert_eq!(out.code(), Some(4), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("127.0.0.1:1") && out.stderr.contains("MQ_URL"),
            "{args:?}: the message names the address and the variable: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("s3cret"), "{}", out.stderr);
    }

    // A broker that answers and refuses the login is not a broker that is down: 1, and
    // the message says to check the credentials (without showing them).
    let refused = "amqp://guest:wrongpassword@127.0.0.1:5672/%2f";
    let out = run(&["cancel", "--amqp-url", refused, "job-1"], &[]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("refused the login") && out.stderr.contains("MQ_URL"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("wrongpassword"), "{}", out.stderr);

    // `healthcheck` tells a target that does not answer (4) from an unhealthy one (1),
    // with one line naming the address, for an orchestrator, a worker and /healthz.
    let dead = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{dead}/healthz");
    for target in ["--orchestrator", "--worker", "--metrics"] {
        let addr = if target == "--metrics" { &url } else { &dead };
        let out = run(&["healthcheck", target, addr, "--timeout", "1s"], &[]);
        assert_eq!(out.code(), Some(4), "{target}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(
            out.stderr.contains(&dead) && out.stderr.contains("cannot reach"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn watch_json_prints_each_status_as_one_json_line() {
    let setup = Setup::new("cli-watch-json");
    let _w = setup.worker("json-w", Behaviour::default());
    let watch = Running::start(
        &[
            "watch",
            "--json",
            "--count",
            "2",
            "--idle",
            "60s",
            "--amqp-url",
            SHARED_BROKER,
            "--exchange",
            &setup.names.exchange,
        ],
        &[],
    );
    watch.wait_stderr("watching");
    setup.mq.publish_job("json-1", json!({}));
    setup.mq.publish_job("json-2", json!({}));
    let out = watch.finish();
    assert_eq!(out.code(), Some(0), "{out:?}");

    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "one line per status: {}", out.stdout);
    let mut ids = Vec::new();
    for line in lines {
        let status: Value = serde_json::from_str(line).expect("each line is JSON");
        assert_eq!(status["outcome"], "succeeded", "{status}");
        assert_eq!(status["success"], true, "{status}");
        assert_eq!(status["workerId"], "json-w", "{status}");
        assert!(status["durationMs"].is_u64(), "{status}");
        assert!(status["startedAt"].is_string(), "{status}");
        assert!(status["finishedAt"].is_string(), "{status}");
        assert!(status["logs"].is_string(), "{status}");
        ids.push(status["jobId"].as_str().unwrap().to_string());
    }
    ids.sort();
    assert_eq!(ids, ["json-1", "json-2"]);
    assert!(!out.stdout.contains(TOKEN), "{}", out.stdout);
    assert!(
        out.stderr.contains("summary: 2 jobs") && out.stderr.contains("2 succeeded"),
        "{}",
        out.stderr
    );
    // watch took nothing from the control plane.
    assert_eq!(setup.mq.statuses(2, LONG).len(), 2);
}

#[test]
fn watch_follow_keeps_going_past_statuses_and_shows_events_with_events_key() {
    let setup = Setup::with_flags("cli-watch-follow", &["--events-key", "api.event"]);
    let _w = setup.worker("follow-w", Behaviour::default());
    // --idle 1ms: without --follow, watch would give up long before the first status
    // (the test worker alone takes 10 ms per job).
    let mut watch = Running::start(
        &[
            "watch",
            "--follow",
            "--idle",
            "1ms",
            "--events-key",
            "api.event",
            "--amqp-url",
            SHARED_BROKER,
            "--exchange",
            &setup.names.exchange,
        ],
        &[],
    );
    watch.wait_stderr("(statuses and events)");
    for job in ["follow-1", "follow-2"] {
        setup.mq.publish_job(job, json!({}));
        let lines = watch.wait_stdout(&format!("{job}'s status and events"), |lines| {
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{job} succeeded ")))
                && lines
                    .iter()
                    .any(|l| l.starts_with(&format!("{job} finished ")))
        });
        let at = |line: &str| {
            lines
                .iter()
                .position(|l| l == line)
                .unwrap_or_else(|| panic!("no line {line:?} in {lines:?}"))
        };
        let received = at(&format!("{job} received worker="));
        let dispatched = at(&format!("{job} dispatched worker=follow-w"));
        let finished = at(&format!("{job} finished worker=follow-w"));
        assert!(
            received < dispatched && dispatched < finished,
            "events in order: {lines:?}"
        );
        let status = lines
            .iter()
            .find(|l| l.starts_with(&format!("{job} succeeded ")))
            .unwrap();
        assert!(
            status.starts_with(&format!("{job} succeeded worker=follow-w "))
                && status.ends_with("ms"),
            "{status}"
        );
        assert!(
            watch.exited().is_none(),
            "--follow keeps watching: {lines:?}"
        );
    }
    assert_eq!(
        watch.stdout_lines().len(),
        8,
        "a status and three events per job: {:?}",
        watch.stdout_lines()
    );

    // Stopped with a signal, it ends (`finish` fails when it does not exit within a
    // minute). SIGTERM rather than SIGINT: a test run started in the background by a
    // non-interactive shell inherits SIGINT ignored, and so would watch.
    watch.signal("TERM");
    let out = watch.finish();
    assert!(
        out.status.code() != Some(0) || out.stderr.contains("summary:"),
        "{out:?}"
    );
}

#[test]
fn submit_puts_every_field_it_takes_into_the_job_and_never_prints_the_token() {
    // No orchestrator: the job stays in the test's execute queue to be read back raw.
    let names = Names::unique("cli-submit-fields");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let dir = TempDir::new("submit-token");
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, format!("  {TOKEN}\n\n")).unwrap();
    let out = run(
        &[
            "submit",
            "--amqp-url",
            SHARED_BROKER,
            "--exchange",
            &names.exchange,
            "--repo",
            "acme/fields",
            "--branch",
            "release-7",
            "--image",
            "acme/fields:7",
            "--dockerfile",
            "docker/Dockerfile.ci",
            "--context",
            "services/api",
            "--timeout",
            "321",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let job_id = out.stdout.trim();
    assert!(uuid::Uuid::parse_str(job_id).is_ok(), "a UUID: {job_id}");
    for text in [&out.stdout, &out.stderr] {
        assert!(!text.contains(TOKEN), "the token was printed: {text}");
    }

    let job = one_message(&mq, &names.execute);
    assert_eq!(job["jobId"], job_id);
    assert_eq!(job["repoUrl"], "acme/fields");
    assert_eq!(job["branch"], "release-7");
    assert_eq!(job["imageName"], "acme/fields:7");
    assert_eq!(job["dockerfilePath"], "docker/Dockerfile.ci");
    assert_eq!(job["contextDir"], "services/api");
    assert_eq!(job["timeoutSeconds"], 321);
    assert_eq!(job["githubToken"], TOKEN, "the file's content, trimmed");
}

#[test]
fn submit_cancel_and_watch_take_the_broker_and_exchange_from_the_environment() {
    let names = Names::unique("cli-env-tools");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let env = [
        ("MQ_URL", SHARED_BROKER),
        ("BLACKTREE_EXCHANGE", names.exchange.as_str()),
    ];

    let out = run(
        &["submit", "--repo", "acme/env", "--image", "acme/env:1"],
        &env,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let job = one_message(&mq, &names.execute);
    assert_eq!(job["jobId"], out.stdout.trim());
    assert_eq!(job["repoUrl"], "acme/env");

    let out = run(&["cancel", "env-cancel-1"], &env);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(
        one_message(&mq, &names.cancel),
        json!({"jobId": "env-cancel-1"})
    );

    let watch = Running::start(&["watch", "--count", "1", "--idle", "60s"], &env);
    watch.wait_stderr(&format!("watching {} ", names.exchange));
    let status = json!({"jobId": "env-watch-1", "outcome": "failed", "workerId": "env-w",
                        "durationMs": 7, "error": "boom"});
    publish(&mq, "api.result", &status);
    let out = watch.finish();
    // A watched job that did not succeed: exit 1, with the count.
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("1 of 1 watched jobs did not succeed"),
        "{out:?}"
    );
    assert_eq!(out.stdout, "env-watch-1 failed worker=env-w 7ms error=boom");

    // MQ_URL is what they connect to (the default is the same broker, so show it with
    // an unreachable one), and a flag wins over its variable.
    let nowhere = [("MQ_URL", NOWHERE)];
    for args in [
        vec!["submit", "--repo", "a/b", "--image", "a/b:1"],
        vec!["cancel", "job-1"],
        vec!["watch", "--idle", "1s"],
    ] {
        let out = run(&args, &nowhere);
        assert_eq!(
            out.code(),
            Some(4),
            "{args:?} with MQ_URL={NOWHERE}: {out:?}"
        );
        assert!(out.stderr.contains("127.0.0.1:1"), "{}", out.stderr);
    }
    let out = run(
        &[
            "cancel",
            "--amqp-url",
            SHARED_BROKER,
            "--exchange",
            &names.exchange,
            "env-cancel-2",
        ],
        &nowhere,
    );
    assert_eq!(out.code(), Some(0), "--amqp-url wins over MQ_URL: {out:?}");
    assert_eq!(one_message(&mq, &names.cancel)["jobId"], "env-cancel-2");
}

#[test]
fn the_orchestrator_takes_its_broker_queues_ports_and_workers_from_the_environment() {
    let names = Names::unique("cli-env-orch");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let dir = TempDir::new("env-orch");
    let lock = dir.0.join("orchestrator.lock");
    let a = TestWorker::start("env-a", 0, Behaviour::default());
    let b = TestWorker::start("env-b", 0, Behaviour::default());
    let (grpc_port, metrics_port) = (free_port(), free_port());
    let grpc_listen = format!("127.0.0.1:{grpc_port}");
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let workers = format!("env-a=127.0.0.1:{},env-b=127.0.0.1:{}", a.port, b.port);
    // A URL that differs from the default in what the log shows (its query).
    let url = format!("{SHARED_BROKER}?heartbeat=7");
    // Keys that the test's own bindings (`Mq::connect`) do not use: a job, status or
    // event reaches the test's queues only through the orchestrator's own bindings.
    let env = env_pairs(&[
        ("MQ_URL", &url),
        ("BLACKTREE_EXCHANGE", &names.exchange),
        ("BLACKTREE_EXECUTE_QUEUE", &names.execute),
        ("BLACKTREE_EXECUTE_KEY", "env.execute"),
        ("BLACKTREE_STATUS_QUEUE", &names.status),
        ("BLACKTREE_STATUS_KEY", "env.result"),
        ("BLACKTREE_REJECTED_QUEUE", &names.rejected),
        ("BLACKTREE_CANCEL_QUEUE", &names.cancel),
        ("BLACKTREE_EVENTS_QUEUE", &names.events),
        ("BLACKTREE_EVENTS_KEY", "env.event"),
        ("BLACKTREE_GRPC_LISTEN", &grpc_listen),
        ("BLACKTREE_METRICS_LISTEN", &metrics_listen),
        ("BLACKTREE_WORKERS", &workers),
        ("BLACKTREE_HEALTH_INTERVAL", "200ms"),
        ("BLACKTREE_HEALTH_TIMEOUT", "300ms"),
        ("BLACKTREE_DISPATCH_THREADS", "4"),
        ("BLACKTREE_LOCK_FILE", lock.to_str().unwrap()),
    ]);
    let announces = [
        "gRPC server listening on port ",
        "metrics listening on port ",
    ];
    let (orch, ports) = LoggedChild::spawn_with_env(&strings(&["orchestrator"]), &env, &announces);
    assert_eq!(ports, [grpc_port, metrics_port]);
    orch.wait_for_log(
        "broker: connected to amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=7",
        LONG,
    );
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        orch.pid().to_string()
    );
    let healthz = format!("http://{metrics_listen}/healthz");
    let out = run(&["healthcheck", "--metrics", &healthz], &[]);
    assert_eq!(out.code(), Some(0), "{out:?}");

    // Both static workers, listed by `workers` (BLACKTREE_ORCHESTRATOR for its address).
    let listing = [("BLACKTREE_ORCHESTRATOR", grpc_listen.as_str())];
    poll(LONG, "both static workers to be free", || {
        let out = run(&["workers", "--json"], &listing);
        assert_eq!(out.code(), Some(0), "{out:?}");
        let listed: Value = serde_json::from_str(&out.stdout).unwrap();
        let mut free: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "free")
            .map(|w| w["id"].as_str().unwrap())
            .collect();
        free.sort();
        (free == ["env-a", "env-b"]).then_some(())
    });

    // One job through the exchange and the execute key, one straight into the execute
    // queue (the default exchange routes by queue name).
    publish(
        &mq,
        "env.execute",
        &json!({"jobId": "env-1", "repoUrl": "acme/app", "imageName": "acme/app:1"}),
    );
    mq.channel()
        .basic_publish(
            "",
            Publish::new(
                &serde_json::to_vec(
                    &json!({"jobId": "env-2", "repoUrl": "acme/app", "imageName": "acme/app:1"}),
                )
                .unwrap(),
                names.execute.as_str(),
            ),
        )
        .unwrap();
    let statuses = mq.statuses(2, LONG);
    let mut ids: Vec<&str> = statuses
        .iter()
        .map(|s| s["jobId"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["env-1", "env-2"], "{statuses:?}");
    for status in &statuses {
        assert_eq!(status["outcome"], "succeeded", "{status}");
        assert!(
            ["env-a", "env-b"].contains(&status["workerId"].as_str().unwrap()),
            "{status}"
        );
    }
    let events = mq.events_until(LONG, |e| e.len() >= 6);
    for job in ["env-1", "env-2"] {
        let kinds: Vec<&str> = events
            .iter()
            .filter(|e| e["jobId"] == job)
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["received", "dispatched", "finished"], "{events:?}");
    }
}

#[test]
fn the_worker_takes_its_id_capacity_and_executor_from_the_environment() {
    use blacktree::proto::job::{PingRequest, WorkerStatus};
    use blacktree::proto::job_grpc::JobServiceClient;

    let setup = Setup::new("cli-env-worker");
    let dir = TempDir::new("env-worker");
    let lock = dir.0.join("worker.lock");
    let orchestrator = format!("127.0.0.1:{}", setup.orch.grpc_port);
    let env = env_pairs(&[
        ("BLACKTREE_ORCHESTRATOR", &orchestrator),
        ("BLACKTREE_WORKER_LISTEN", "127.0.0.1:0"),
        ("BLACKTREE_WORKER_ID", "env-w"),
        ("BLACKTREE_CAPACITY", "3"),
        ("BLACKTREE_REGION", "eu-test"),
        ("BLACKTREE_EXECUTOR", "exec"),
        (
            "BLACKTREE_EXEC_COMMAND",
            "echo \"env-exec ran $BLACKTREE_JOB_ID\"",
        ),
        ("BLACKTREE_WORK_DIR", dir.0.to_str().unwrap()),
        ("BLACKTREE_CHECK_IN_INTERVAL", "500ms"),
        ("BLACKTREE_LOCK_FILE", lock.to_str().unwrap()),
    ]);
    let (worker, ports) =
        LoggedChild::spawn_with_env(&strings(&["worker"]), &env, &[" listening on port "]);
    let port = ports[0];
    // (The announce can come before its line is in the log: wait for the line.)
    worker.wait_for_log(
        &format!(
            "worker env-w listening on port {port} (127.0.0.1:0), advertised as \
             127.0.0.1:{port}, capacity 3, Exec executor"
        ),
        LONG,
    );
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        worker.pid().to_string()
    );
    setup.orch.wait_for_log(
        &format!("worker env-w registered at 127.0.0.1:{port} (capacity 3, region \"eu-test\""),
        LONG,
    );

    let env_grpc = Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
    let client = JobServiceClient::new(
        grpcio::ChannelBuilder::new(env_grpc).connect(&format!("127.0.0.1:{port}")),
    );
    let pong = client
        .ping_opt(
            &PingRequest::default(),
            grpcio::CallOption::default().timeout(Duration::from_secs(10)),
        )
        .expect("Ping");
    assert_eq!(pong.workerId, "env-w");
    assert_eq!(pong.status, WorkerStatus::FREE);

    setup.mq.publish_job("env-job-1", json!({"repoUrl": ""}));
    let status = &setup.mq.statuses(1, LONG)[0];
    assert_eq!(status["outcome"], "succeeded", "{status}");
    assert_eq!(status["workerId"], "env-w", "{status}");
    assert!(
        status["logs"]
            .as_str()
            .unwrap()
            .contains("env-exec ran env-job-1"),
        "the exec command from BLACKTREE_EXEC_COMMAND ran: {status}"
    );
}

#[test]
fn a_port_in_use_names_the_flag_and_the_variable_without_the_grpc_core_dump() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let names = Names::unique("cli-port");
    let names_args = names.args();
    let mut orchestrator = vec!["orchestrator", "--amqp-url", NOWHERE];
    orchestrator.extend(names_args.iter().map(String::as_str));
    let work_dir = TempDir::new("port-worker");
    let worker = [
        "worker",
        "--orchestrator",
        "127.0.0.1:1",
        "--executor",
        "exec",
        "--exec-command",
        "true",
        "--work-dir",
        work_dir.0.to_str().unwrap(),
    ];
    let cases: [(Vec<&str>, &str, &str); 3] = [
        (
            [
                &orchestrator[..],
                &["--metrics-listen", "127.0.0.1:0", "--grpc-listen", &addr],
            ]
            .concat(),
            "--grpc-listen",
            "BLACKTREE_GRPC_LISTEN",
        ),
        (
            [
                &orchestrator[..],
                &["--grpc-listen", "127.0.0.1:0", "--metrics-listen", &addr],
            ]
            .concat(),
            "--metrics-listen",
            "BLACKTREE_METRICS_LISTEN",
        ),
        (
            [&worker[..], &["--listen", &addr]].concat(),
            "--listen",
            "BLACKTREE_WORKER_LISTEN",
        ),
    ];
    for (args, flag, variable) in cases {
        let out = run(&args, &[]);
        assert_eq!(out.code(), Some(1), "{args:?}: {out:?}");
        assert!(
            out.stderr
                .contains(&format!("cannot listen on {addr} ({flag}, {variable})"))
                && out.stderr.contains("another process listens there"),
            "{}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("chttp2"),
            "the gRPC core's dump: {}",
            out.stderr
        );
    }
}
