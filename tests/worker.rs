//! The worker agent end to end: the real `blacktree worker` binary, real git
//! repositories, Debian's Docker engine and a real registry with htpasswd auth.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use blacktree::proto::job::{CancelJobRequest, JobRequest, JobResponse, PingRequest, WorkerStatus};
use common::build_env::*;
use common::*;
use grpcio::{CallOption, ClientUnaryReceiver, RpcStatusCode};
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

fn job(id: &str, repo: &TempDir, image: &str) -> JobRequest {
    JobRequest {
        jobId: id.into(),
        repoUrl: repo.0.display().to_string(),
        branch: "main".into(),
        dockerfilePath: "Dockerfile".into(),
        contextDir: ".".into(),
        imageName: image.into(),
        githubToken: TOKEN.into(),
        ..JobRequest::default()
    }
}

fn run(port: u16, request: &JobRequest) -> JobResponse {
    job_client(port)
        .run_job_opt(request, CallOption::default().timeout(LONG))
        .expect("RunJob call")
}

fn registry_args(registry: &Registry, password_file: &TempDir) -> Vec<String> {
    let file = password_file.0.join("password");
    std::fs::write(&file, format!("{REGISTRY_PASSWORD}\n")).unwrap();
    vec![
        "--registry".into(),
        registry.addr.clone(),
        "--registry-user".into(),
        REGISTRY_USER.into(),
        "--registry-password-file".into(),
        file.display().to_string(),
    ]
}

#[test]
fn the_exec_executor_runs_its_command_in_the_checkout_with_the_job_in_its_environment() {
    let repo = git_repo(&[("Dockerfile", "FROM scratch\n"), ("build.sh", "exit 3\n")]);
    let command = r#"echo "job=$BLACKTREE_JOB_ID image=$BLACKTREE_IMAGE_NAME token=$BLACKTREE_GITHUB_TOKEN"; test -f Dockerfile; [ "$BLACKTREE_IMAGE_NAME" != fail ] || sh build.sh"#;
    let worker = WorkerProcess::start(
        "exec-w",
        NO_ORCHESTRATOR,
        &[
            "--executor",
            "exec",
            "--exec-command",
            command,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );

    let answer = run(worker.port, &job("exec-1", &repo, "acme/app:1"));
    assert!(answer.success, "{answer:?}");
    assert_eq!(answer.jobId, "exec-1");
    assert!(
        answer
            .logs
            .contains("job=exec-1 image=acme/app:1 token=***"),
        "{}",
        answer.logs
    );
    assert!(!answer.logs.contains(TOKEN));

    let answer = run(worker.port, &job("exec-2", &repo, "fail"));
    assert!(!answer.success);
    assert!(
        answer
            .error
            .contains("exec command failed (exit status: 3)"),
        "{answer:?}"
    );
    assert!(
        worker.workspaces().is_empty(),
        "workspaces are removed after each job"
    );
    assert!(!worker.log().contains(TOKEN));

    // The worker's /metrics: jobs by outcome, its steps timed, its slots.
    let port: u16 = worker
        .log()
        .split("metrics listening on port ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("the worker's metrics port in its log");
    let metrics = http(port, "/metrics").1;
    for (name, value) in [
        ("blacktree_worker_jobs_total{outcome=\"succeeded\"}", 1.0),
        ("blacktree_worker_jobs_total{outcome=\"failed\"}", 1.0),
        (
            "blacktree_worker_step_duration_seconds_count{step=\"clone\"}",
            2.0,
        ),
        (
            "blacktree_worker_step_duration_seconds_count{step=\"exec\"}",
            2.0,
        ),
        ("blacktree_worker_slots{state=\"free\"}", 1.0),
        ("blacktree_worker_slots{state=\"busy\"}", 0.0),
    ] {
        assert_eq!(sample(&metrics, name), value, "{name} in\n{metrics}");
    }
}

#[test]
fn a_docker_build_is_pushed_to_the_registry_and_can_be_read_back() {
    docker_ready();
    let registry = Registry::start();
    let secrets = TempDir::new("secrets");
    let repo = git_repo(&[
        (
            "svc/Dockerfile",
            &format!("FROM {BASE_IMAGE}\nCOPY hello.txt /hello.txt\nRUN cat /hello.txt\n"),
        ),
        ("svc/hello.txt", "hello from blacktree\n"),
    ]);
    let args = registry_args(&registry, &secrets);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let worker = WorkerProcess::start("docker-w", NO_ORCHESTRATOR, &args);

    let mut request = job("push-1", &repo, "bt/pushed:v1");
    request.contextDir = "svc".into();
    let answer = run(worker.port, &request);
    assert!(answer.success, "{answer:?}");
    assert_eq!(answer.imageUrl, format!("{}/bt/pushed:v1", registry.addr));
    assert!(
        answer.logs.contains("hello from blacktree"),
        "build output in logs: {}",
        answer.logs
    );
    assert!(
        registry.tags("bt/pushed").contains("\"v1\""),
        "{}",
        registry.tags("bt/pushed")
    );
    // Pulled back from the registry after removing the local copy.
    sh(&format!("docker rmi -f {} >/dev/null", answer.imageUrl));
    let config = worker.work_dir.0.join("docker-config");
    sh(&format!(
        "DOCKER_CONFIG={} docker pull -q {} >/dev/null",
        config.display(),
        answer.imageUrl
    ));
    let content = sh(&format!(
        "docker run --rm {} cat /hello.txt",
        answer.imageUrl
    ));
    assert_eq!(content, "hello from blacktree\n");
    for text in [answer.logs.as_str(), answer.error.as_str(), &worker.log()] {
        assert!(
            !text.contains(REGISTRY_PASSWORD) && !text.contains(TOKEN),
            "secret leaked: {text}"
        );
    }
    assert_no_secret_in_argv(
        &worker,
        &["git clone", "docker build", "docker login", "docker push"],
    );
    assert!(worker.workspaces().is_empty());
}

/// Asserts that the worker ran each of `expected` (`PROGRAM SUBCOMMAND`) and that
/// neither the token nor the registry password was ever in a `git` or `docker` argv.
fn assert_no_secret_in_argv(worker: &WorkerProcess, expected: &[&str]) {
    let invocations = worker.invocations();
    for wanted in expected {
        let (program, subcommand) = wanted.split_once(' ').unwrap();
        assert!(
            invocations.iter().any(|argv| argv.starts_with(program)
                && argv.split_whitespace().any(|word| word == subcommand)),
            "no `{wanted}` among {invocations:?}"
        );
    }
    for argv in &invocations {
        assert!(
            !argv.contains(TOKEN) && !argv.contains(REGISTRY_PASSWORD),
            "a secret in argv: {argv}"
        );
    }
}

#[test]
fn a_broken_dockerfile_fails_with_the_build_output_in_the_logs() {
    docker_ready();
    let repo = git_repo(&[(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN echo about-to-fail && exit 7\n"),
    )]);
    let worker = WorkerProcess::start("broken-w", NO_ORCHESTRATOR, &[]);
    let answer = run(worker.port, &job("broken-1", &repo, "bt/broken:1"));
    assert!(!answer.success);
    assert!(answer.error.contains("docker build failed"), "{answer:?}");
    assert!(answer.logs.contains("about-to-fail"), "{}", answer.logs);
    assert!(answer.logs.contains("code: 7"), "{}", answer.logs);
}

#[test]
fn bad_input_is_refused_before_anything_runs() {
    let repo = git_repo(&[("Dockerfile", "FROM scratch\n")]);
    let worker = WorkerProcess::start("refuse-w", NO_ORCHESTRATOR, &[]);
    type Spoil = fn(&mut JobRequest);
    let cases: [(&str, Spoil); 4] = [
        ("contextDir", |j| j.contextDir = "../../etc".into()),
        ("dockerfilePath", |j| {
            j.dockerfilePath = "/etc/passwd".into()
        }),
        ("branch", |j| {
            j.branch = "--upload-pack=touch /tmp/pwned".into()
        }),
        ("imageName", |j| j.imageName = "-H evil".into()),
    ];
    for (i, (field, spoil)) in cases.iter().enumerate() {
        let mut request = job(&format!("refuse-{i}"), &repo, "bt/app:1");
        spoil(&mut request);
        let answer = run(worker.port, &request);
        assert!(!answer.success);
        assert!(
            answer.error.starts_with("invalid job") && answer.error.contains(field),
            "{answer:?}"
        );
        assert!(
            answer.logs.is_empty(),
            "nothing ran, not even the clone: {}",
            answer.logs
        );
    }
    // Ids that cannot name a thread or a workspace are refused before a slot is taken
    // (a NUL used to panic grpcio's thread when the job thread was named).
    let long = "j".repeat(256);
    for (id, why) in [
        ("", "empty"),
        ("a\0b", "control"),
        (long.as_str(), "longer"),
    ] {
        let mut request = job("x", &repo, "bt/app:1");
        request.jobId = id.to_string();
        match job_client(worker.port).run_job_opt(&request, CallOption::default().timeout(LONG)) {
            Err(grpcio::Error::RpcFailure(s)) => assert!(
                s.code() == RpcStatusCode::INVALID_ARGUMENT && s.message().contains(why),
                "{s:?}"
            ),
            other => panic!("jobId {id:?} was not refused: {other:?}"),
        }
    }
    let pong = job_client(worker.port)
        .ping_opt(&PingRequest::default(), CallOption::default().timeout(LONG))
        .expect("the worker still answers");
    assert_eq!(pong.status, WorkerStatus::FREE, "its slot is free");
}

#[test]
fn local_repositories_are_refused_unless_the_worker_allows_them() {
    let repo = git_repo(&[("Dockerfile", "FROM scratch\n")]);
    let exec = ["--executor", "exec", "--exec-command", "true"];
    let strict = WorkerProcess::start_refusing_local_repos("strict-w", NO_ORCHESTRATOR, &exec);
    let path = repo.0.display().to_string();
    for source in [path.clone(), format!("file://{path}")] {
        let mut request = job("local-1", &repo, "");
        request.repoUrl = source;
        let answer = run(strict.port, &request);
        assert!(
            !answer.success && answer.error.contains("--allow-local-repos"),
            "{answer:?}"
        );
    }
    assert!(
        strict.invocations().is_empty(),
        "{:?}",
        strict.invocations()
    );
    let allowed = WorkerProcess::start("allowed-w", NO_ORCHESTRATOR, &exec);
    let answer = run(allowed.port, &job("local-2", &repo, ""));
    assert!(answer.success, "{answer:?}");
}

#[test]
fn sigterm_lets_running_jobs_finish_and_starts_nothing_new_a_second_signal_stops_them() {
    let exec = |command: &'static str| ["--executor", "exec", "--exec-command", command];
    let mut draining = WorkerProcess::start(
        "drain-w",
        NO_ORCHESTRATOR,
        &[&exec("sleep 3; echo finished")[..], &["--capacity", "2"]].concat(),
    );
    let client = job_client(draining.port);
    let request = |id: &str| JobRequest {
        jobId: id.into(),
        ..JobRequest::default()
    };
    let running = client
        .run_job_async_opt(&request("drain-1"), CallOption::default().timeout(LONG))
        .unwrap();
    poll(LONG, "drain-1 to start", || {
        draining
            .log()
            .contains("job drain-1: started")
            .then_some(())
    });
    draining.signal("TERM");
    draining.wait_for_log("signal received: draining", LONG);
    let pong = client
        .ping_opt(&PingRequest::default(), CallOption::default().timeout(LONG))
        .unwrap();
    assert_eq!(pong.status, WorkerStatus::BUSY, "a draining worker is busy");
    match client.run_job_opt(&request("drain-2"), CallOption::default().timeout(LONG)) {
        Err(grpcio::Error::RpcFailure(s)) => assert!(
            s.code() == RpcStatusCode::RESOURCE_EXHAUSTED && s.message().contains("shutting down"),
            "{s:?}"
        ),
        other => panic!("a new job was accepted while draining: {other:?}"),
    }
    let health = blacktree(&[
        "healthcheck",
        "--worker",
        &format!("127.0.0.1:{}", draining.port),
    ]);
    assert_eq!(health.status.code(), Some(1), "NOT_SERVING while draining");
    let answer = futures_block_on(running).expect("the running job answers");
    assert!(
        answer.success && answer.logs.contains("finished"),
        "{answer:?}"
    );
    assert_eq!(draining.wait_exit(LONG), Some(0));

    let mut stopped = WorkerProcess::start("stop-w", NO_ORCHESTRATOR, &exec("sleep 60"));
    let client = job_client(stopped.port);
    let running = client
        .run_job_async_opt(&request("stop-1"), CallOption::default().timeout(LONG))
        .unwrap();
    poll(LONG, "stop-1 to start", || {
        stopped.log().contains("job stop-1: started").then_some(())
    });
    stopped.signal("TERM");
    stopped.wait_for_log("signal received: draining", LONG);
    stopped.signal("TERM");
    let answer = futures_block_on(running).expect("the stopped job answers");
    assert!(
        !answer.success && answer.error.contains("shutting down"),
        "{answer:?}"
    );
    assert_eq!(stopped.wait_exit(LONG), Some(0));
}

#[test]
fn a_cancel_during_a_long_run_step_stops_it_and_leaves_no_process_or_secret() {
    docker_ready();
    let marker = format!("sleep 3{}", std::process::id() % 10000 + 10000);
    let repo = git_repo(&[("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN {marker}\n"))]);
    let worker = WorkerProcess::start("cancel-w", NO_ORCHESTRATOR, &[]);
    let client = job_client(worker.port);
    let call = client
        .run_job_async_opt(
            &job("cancel-1", &repo, "bt/cancel:1"),
            CallOption::default().timeout(LONG),
        )
        .unwrap();
    poll(LONG, "the RUN step to start", || {
        process_running(&marker).then_some(())
    });

    // While it runs: the token is in no command line and not in the checkout.
    assert_no_secret_in_argv(&worker, &["git clone", "docker build"]);
    assert!(
        !worker.processes().iter().any(|c| c.contains(TOKEN)),
        "token in argv"
    );
    let workspaces = worker.workspaces();
    assert_eq!(workspaces.len(), 1);
    assert!(
        !tree_contains(&workspaces[0], TOKEN),
        "token written into the workspace"
    );

    let started = Instant::now();
    let cancel = CancelJobRequest {
        jobId: "cancel-1".into(),
        ..CancelJobRequest::default()
    };
    assert!(client.cancel_job(&cancel).unwrap().cancelled);
    let answer = futures_block_on(call).expect("RunJob answer");
    let took = started.elapsed();
    assert!(!answer.success);
    assert_eq!(answer.error, "cancelled");
    assert!(took < Duration::from_secs(10), "cancel took {took:?}");
    poll(
        Duration::from_secs(30),
        "the RUN step's process to go",
        || (!process_running(&marker)).then_some(()),
    );
    assert!(worker.workspaces().is_empty());
    let again = client.cancel_job(&cancel).unwrap();
    assert!(!again.cancelled, "a finished job cannot be cancelled");
}

#[test]
fn jobs_on_the_execute_queue_end_as_images_in_the_registry_via_two_workers() {
    docker_ready();
    let registry = Registry::start();
    let secrets = TempDir::new("secrets");
    let Setup { mq, orch, .. } = Setup::new("e2e");
    let args = registry_args(&registry, &secrets);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|i| WorkerProcess::start(&format!("e2e-w{i}"), orch.grpc_port, &args))
        .collect();
    for w in &workers {
        orch.wait_for_log(&format!("worker {} registered", w.id), LONG);
    }
    let repo = git_repo(&[(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN echo built\n"),
    )]);
    // The base layer is in the repository before the two workers push at once.
    registry.seed(BASE_IMAGE, "bt/e2e:base");
    let ids: Vec<String> = (0..4).map(|i| format!("e2e-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        mq.publish_job(
            id,
            json!({"repoUrl": repo.0.display().to_string(), "imageName": format!("bt/e2e:v{i}")}),
        );
    }
    let statuses = mq.statuses(ids.len(), LONG);
    let mut by_worker = HashSet::new();
    for status in &statuses {
        assert_eq!(status["outcome"], "succeeded", "{status}");
        by_worker.insert(status["workerId"].as_str().unwrap().to_string());
    }
    let tags = registry.tags("bt/e2e");
    for i in 0..ids.len() {
        assert!(
            tags.contains(&format!("\"v{i}\"")),
            "v{i} missing from {tags}"
        );
    }
    assert_eq!(by_worker.len(), 2, "both workers built: {by_worker:?}");
    for i in 0..ids.len() {
        sh(&format!(
            "docker rmi -f {}/bt/e2e:v{i} >/dev/null",
            registry.addr
        ));
    }
    orch.assert_no_secret_logged();
}

#[test]
fn a_full_worker_reports_busy_and_refuses_more_jobs_at_once() {
    let repo = git_repo(&[("Dockerfile", "FROM scratch\n")]);
    let worker = WorkerProcess::start(
        "full-w",
        NO_ORCHESTRATOR,
        &[
            "--executor",
            "exec",
            "--exec-command",
            "sleep 2",
            "--capacity",
            "1",
        ],
    );
    let client = job_client(worker.port);
    let ping = blacktree::proto::job::PingRequest::default();
    let pong = client.ping(&ping).unwrap();
    assert_eq!(pong.status, blacktree::proto::job::WorkerStatus::FREE);
    assert_eq!(pong.workerId, "full-w");
    let first = client
        .run_job_async_opt(
            &job("full-1", &repo, ""),
            CallOption::default().timeout(LONG),
        )
        .unwrap();
    poll(LONG, "the worker to report BUSY", || {
        (client.ping(&ping).unwrap().status == blacktree::proto::job::WorkerStatus::BUSY)
            .then_some(())
    });
    match client.run_job(&job("full-2", &repo, "")) {
        Err(grpcio::Error::RpcFailure(status)) => {
            assert_eq!(status.code(), grpcio::RpcStatusCode::RESOURCE_EXHAUSTED)
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    assert!(futures_block_on(first).unwrap().success);
}

#[test]
fn a_worker_registers_again_with_a_restarted_orchestrator_and_gets_jobs() {
    let names = Names::unique("rejoin");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut first = Orchestrator::start(SHARED_BROKER, &names, &["--grpc-listen", &listen]);
    let worker = WorkerProcess::start(
        "rejoin-w",
        first.grpc_port,
        &[
            "--executor",
            "exec",
            "--exec-command",
            "echo ran $BLACKTREE_JOB_ID",
        ],
    );
    // The worker's own word: it got the answer (killing the orchestrator between its log
    // line and its answer would leave the worker registering for the first time).
    worker.wait_for_log("registered with the orchestrator", LONG);
    first.signal("KILL");
    first.wait_exit(LONG);

    let second = Orchestrator::start(SHARED_BROKER, &names, &["--grpc-listen", &listen]);
    second.wait_for_log("worker rejoin-w registered", LONG);
    mq.publish_job("rejoin-1", json!({"repoUrl": ""}));
    let statuses = mq.statuses(1, LONG);
    assert_eq!(statuses[0]["outcome"], "succeeded", "{statuses:?}");
    assert_eq!(statuses[0]["workerId"], "rejoin-w");
    assert!(statuses[0]["logs"]
        .as_str()
        .unwrap()
        .contains("ran rejoin-1"));
    assert!(
        worker.log().contains("registering again"),
        "{}",
        worker.log()
    );
}

/// A job whose step sleeps a long time, running on a worker of its own.
struct SleepingJob {
    worker: WorkerProcess,
    _call: ClientUnaryReceiver<JobResponse>,
    /// The step's command line (`sleep NNNNN`), unlike any other process's.
    marker: String,
    _repo: TempDir,
}

/// Starts worker `id` with a step that runs `{prefix}sleep BASE+n` and waits until the
/// step runs.
fn sleeping_job(id: &str, base: u32, prefix: &str) -> SleepingJob {
    let n = std::process::id() % 10000 + 10000;
    let marker = format!("sleep {}", base + n);
    let command = format!("{prefix}sleep $(({base} + {n}))");
    let repo = git_repo(&[("Dockerfile", "FROM scratch\n")]);
    let args = ["--executor", "exec", "--exec-command", command.as_str()];
    let worker = WorkerProcess::start(id, NO_ORCHESTRATOR, &args);
    let client = job_client(worker.port);
    let call = client
        .run_job_async_opt(
            &job(&format!("{id}-job"), &repo, ""),
            CallOption::default().timeout(LONG),
        )
        .unwrap();
    poll(LONG, "the job's command to start", || {
        worker.runs(&marker).then_some(())
    });
    SleepingJob {
        worker,
        _call: call,
        marker,
        _repo: repo,
    }
}

#[test]
fn a_killed_worker_takes_its_running_step_with_it() {
    // Only the step's own process dies with the agent: `exec` makes `sleep` that process
    // (dash would otherwise keep it as a child of its own).
    let job = sleeping_job("killed-w", 50000, "exec ");
    sh(&format!("kill -KILL {}", job.worker.pid()));
    poll(
        Duration::from_secs(10),
        "the step to die with its worker",
        || (!job.worker.runs(&job.marker)).then_some(()),
    );
}

#[test]
fn the_token_reaches_git_over_http_and_nowhere_else() {
    let server = GitHttpServer::start(TOKEN);
    let repo = git_repo(&[
        ("Dockerfile", "FROM scratch\n"),
        ("marker.txt", "private content\n"),
    ]);
    let url = server.publish(&repo, "private");
    let worker = WorkerProcess::start(
        "token-w",
        NO_ORCHESTRATOR,
        &[
            "--executor",
            "exec",
            "--exec-command",
            "cat marker.txt; git config --list --show-origin",
        ],
    );
    let mut request = job("token-1", &repo, "");
    request.repoUrl = url.clone();
    let answer = run(worker.port, &request);
    assert!(answer.success, "the clone with the token works: {answer:?}");
    assert!(answer.logs.contains("private content"), "{}", answer.logs);
    assert!(
        !answer.logs.contains(TOKEN) && !answer.logs.contains("***"),
        "not in the checkout's config either: {}",
        answer.logs
    );

    request.jobId = "token-2".into();
    request.githubToken = "ghp_WRONG_TOKEN_987".into();
    let answer = run(worker.port, &request);
    assert!(!answer.success, "a wrong token is refused by the server");
    assert!(answer.error.contains("git clone failed"), "{answer:?}");
    assert!(!answer.logs.contains("ghp_WRONG_TOKEN_987") && !worker.log().contains(TOKEN));
    assert_no_secret_in_argv(&worker, &["git clone"]);
    assert!(
        !worker
            .invocations()
            .iter()
            .any(|argv| argv.contains("ghp_WRONG_TOKEN_987")),
        "{:?}",
        worker.invocations()
    );
}

#[test]
fn a_killed_worker_takes_its_git_client_with_it() {
    // A git server that accepts the connection and never answers: the clone hangs.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hangs.git", silent.local_addr().unwrap());
    let worker = WorkerProcess::start(
        "killed-git-w",
        NO_ORCHESTRATOR,
        &["--executor", "exec", "--exec-command", "true"],
    );
    let client = job_client(worker.port);
    let mut request = job("killed-git-1", &TempDir::new("unused"), "");
    request.repoUrl = url.clone();
    let _call = client
        .run_job_async_opt(&request, CallOption::default().timeout(LONG))
        .unwrap();
    let clone = format!("clone --depth 1 --single-branch --branch main -- {url}");
    poll(LONG, "git clone to start", || {
        worker.runs(&clone).then_some(())
    });
    worker.signal("KILL");
    poll(
        Duration::from_secs(10),
        "the git client to die with its worker",
        || (!worker.runs(&clone)).then_some(()),
    );
}

#[test]
fn a_killed_worker_takes_its_docker_client_and_so_its_build_with_it() {
    docker_ready();
    let marker = format!("sleep 4{}", std::process::id() % 10000 + 10000);
    let repo = git_repo(&[("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN {marker}\n"))]);
    let worker = WorkerProcess::start("killed-docker-w", NO_ORCHESTRATOR, &[]);
    let client = job_client(worker.port);
    let _call = client
        .run_job_async_opt(
            &job("killed-docker-1", &repo, "bt/killed:1"),
            CallOption::default().timeout(LONG),
        )
        .unwrap();
    poll(LONG, "the RUN step to start", || {
        process_running(&marker).then_some(())
    });
    assert!(worker.runs("docker build"), "{:?}", worker.processes());
    worker.signal("KILL");
    poll(
        Duration::from_secs(10),
        "the docker client to die with its worker",
        || (!worker.runs("docker build")).then_some(()),
    );
    // The engine cancels a build whose client went away.
    poll(
        Duration::from_secs(30),
        "the build's RUN step to end",
        || (!process_running(&marker)).then_some(()),
    );
}
