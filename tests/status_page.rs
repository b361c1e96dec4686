//! The status page and its JSON (issue 18), end to end: an orchestrator on the shared
//! broker with workers in every state (free, busy, withheld, unhealthy, draining) and
//! jobs waiting, running and finished, read by a real headless Chromium (Debian's
//! `chromium`, installed by `scripts/setup.sh`) and by the JSON API, whose numbers must
//! agree with `/metrics` and `blacktree workers --json`; who may read it
//! (`--http-auth-file`, loopback); and the progress line of `submit --wait` on a
//! terminal and in a pipe.

mod common;

use std::process::Command;
use std::time::Duration;

use common::build_env::{TempDir, WorkerProcess};
use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

/// A job id that would run as script if the page did not escape it.
const XSS_ID: &str = "<script>document.body.setAttribute('data-pwned','1')</script>";

/// `GET` with curl and these extra arguments: (status code, body).
fn get(port: u16, path: &str, extra: &[&str]) -> (String, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(&url)
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string())
}

fn api(port: u16, path: &str) -> Value {
    let (code, body) = get(port, path, &[]);
    assert_eq!(code, "200", "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
}

/// The page as headless Chromium rendered it (its DOM, serialised).
fn rendered(port: u16, path: &str) -> String {
    let (mut chromium, _profile) = chromium();
    let out = chromium
        .args(["--dump-dom", &format!("http://127.0.0.1:{port}{path}")])
        .output()
        .expect("running chromium (scripts/setup.sh installs it)");
    assert!(out.status.success(), "chromium: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Headless Chromium with a profile directory of its own (kept apart from parallel
/// runs; removed when the returned directory is dropped).
fn chromium() -> (Command, TempDir) {
    let mut cmd = Command::new("chromium");
    // Root needs --no-sandbox.
    let profile = TempDir::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        &format!("--user-data-dir={}", profile.0.display()),
    ]);
    (cmd, profile)
}

/// The opening tag of the row whose `attribute` is `value` (HTML-escaped as the page
/// writes it).
fn row<'a>(dom: &'a str, attribute: &str, value: &str) -> &'a str {
    let escaped = value
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    let needle = format!("{attribute}=\"{escaped}\"");
    let at = dom
        .find(&needle)
        .unwrap_or_else(|| panic!("no row with {needle} in the page:\n{dom}"));
    let start = dom[..at].rfind("<tr").expect("inside a row");
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

fn state_of_worker(workers: &Value, id: &str) -> (String, bool) {
    let worker = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {workers}"));
    (
        worker["state"].as_str().unwrap().to_string(),
        worker["withheld"] == true,
    )
}

#[test]
fn the_page_shows_every_worker_and_job_state_in_a_real_browser_and_agrees_with_the_api() {
    let flags = ["--finished-jobs", "3", "--events-key", "ev"];
    let Setup { mq, orch, .. } = Setup::with_flags("page", &flags);
    let port = orch.metrics_port;

    // Busy: its one slot holds a job until the gate opens.
    let (gate, gated) = crossbeam_channel::bounded::<()>(0);
    let busy = Behaviour {
        gate: Some(gated),
        run_time: Duration::from_secs(600),
        ..Behaviour::default()
    };
    let _busy = orch.worker("pg-busy", busy);
    mq.publish_job("pg-run", json!({}));
    poll(LONG, "pg-run to run on pg-busy", || {
        let running = api(port, "/api/jobs?state=running");
        (running["running"]["jobs"][0]["workerId"] == "pg-busy").then_some(())
    });
    // Free, withheld (pings BUSY), unhealthy (killed), draining (a real worker, drained).
    let _free = orch.worker("pg-free", Behaviour::default());
    let withheld = Behaviour {
        busy: true,
        ..Behaviour::default()
    };
    let _withheld = orch.worker("pg-withheld", withheld);
    let mut dead = orch.worker("pg-dead", Behaviour::default());
    let exec = ["--executor", "exec", "--exec-command", "true"];
    let _draining = WorkerProcess::start("pg-drain", orch.grpc_port, &exec);
    orch.wait_for_log("worker pg-drain registered", LONG);
    let grpc = format!("127.0.0.1:{}", orch.grpc_port);
    let out = blacktree(&["workers", "--orchestrator", &grpc, "drain", "pg-drain"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    dead.kill();
    let expected = [
        ("pg-busy", "busy", false),
        ("pg-free", "free", false),
        ("pg-withheld", "busy", true),
        ("pg-dead", "unhealthy", false),
        ("pg-drain", "draining", false),
    ];
    poll(LONG, "every worker in its state", || {
        let workers = api(port, "/api/workers");
        expected
            .iter()
            .all(|(id, state, w)| state_of_worker(&workers, id) == (state.to_string(), *w))
            .then_some(())
    });

    // Finished: one succeeded on pg-free (the only free worker), one rejected as not a
    // job. Waiting: labels no worker has, and an id that is a script.
    mq.publish_job("pg-ok", json!({}));
    mq.publish_raw(br#"{"jobId":"pg-bad","repoUrl":5}"#);
    mq.publish_job(XSS_ID, json!({"labels": {"arch": "riscv"}}));
    let jobs = poll(LONG, "every job in its state", || {
        let jobs = api(port, "/api/jobs");
        let finished = jobs["finished"]["jobs"].as_array().unwrap().len();
        let waiting = jobs["waiting"]["total"].as_u64().unwrap();
        (finished == 2 && waiting == 1).then_some(jobs)
    });

    // The JSON: shapes, and the same numbers as /metrics and `blacktree workers --json`.
    assert_eq!(jobs["waiting"]["jobs"][0]["jobId"], XSS_ID);
    assert_eq!(jobs["waiting"]["jobs"][0]["labels"], "arch=riscv");
    assert!(jobs["waiting"]["jobs"][0]["ageMs"].is_u64());
    let running = &jobs["running"]["jobs"][0];
    assert_eq!(
        (&running["jobId"], &jobs["running"]["total"]),
        (&json!("pg-run"), &json!(1))
    );
    assert!(running["deadlineMs"].as_u64().unwrap() > 0);
    let finished = jobs["finished"]["jobs"].as_array().unwrap();
    let outcomes: Vec<(&str, &str)> = finished
        .iter()
        .map(|j| (j["jobId"].as_str().unwrap(), j["outcome"].as_str().unwrap()))
        .collect();
    assert!(outcomes.contains(&("pg-ok", "succeeded")), "{outcomes:?}");
    assert!(outcomes.contains(&("pg-bad", "rejected")), "{outcomes:?}");
    assert_eq!(jobs["finished"]["limit"], 3);
    let only_running = api(port, "/api/jobs?state=running");
    assert!(only_running.get("waiting").is_none() && only_running.get("finished").is_none());
    assert_eq!(get(port, "/api/jobs?state=bogus", &[]).0, "400");
    let detail = api(port, "/api/jobs/pg-ok");
    let events: Vec<&str> = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["received", "dispatched", "finished"]);
    assert_eq!(detail["status"]["workerId"], "pg-free");
    let encoded: String = url::form_urlencoded::byte_serialize(XSS_ID.as_bytes()).collect();
    let waiting = api(port, &format!("/api/jobs/{}", encoded.replace('+', "%20")));
    assert_eq!(waiting["state"], "waiting");
    assert_eq!(get(port, "/api/jobs/nothing-here", &[]).0, "404");

    let workers = api(port, "/api/workers");
    let metrics = http(port, "/metrics").1;
    for state in ["free", "busy", "draining", "unhealthy"] {
        let listed = workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == state)
            .count();
        let sample_name = format!("blacktree_workers{{state=\"{state}\"}}");
        assert_eq!(sample(&metrics, &sample_name), listed as f64, "{state}");
    }
    let cli = blacktree(&["workers", "--orchestrator", &grpc, "--json"]);
    let cli: Vec<Value> = serde_json::from_slice(&cli.stdout).unwrap();
    for w in &cli {
        let api_worker = workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == w["id"])
            .unwrap();
        for field in ["state", "capacity", "inFlight", "address"] {
            assert_eq!(api_worker[field], w[field], "{field} of {}", w["id"]);
        }
    }
    let pg_free = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == "pg-free")
        .unwrap();
    assert_eq!(
        (pg_free["jobsRun"].as_u64(), pg_free["jobsFailed"].as_u64()),
        (Some(1), Some(0))
    );
    let flow = api(port, "/api/flow");
    let received = sample(&metrics, "blacktree_jobs_received_total");
    assert_eq!(flow["received"].as_f64(), Some(received));
    let per_minute: u64 = flow["minutes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["received"].as_u64().unwrap())
        .sum();
    assert_eq!(per_minute as f64, received, "every job this hour");
    assert_eq!(flow["outcomes"]["succeeded"], 1);
    assert_eq!(flow["broker"]["connected"], true);

    // The page, as a browser renders it.
    let dom = rendered(port, "/");
    for (id, state, withheld) in expected {
        let tag = row(&dom, "data-worker", id);
        assert!(tag.contains(&format!("data-state=\"{state}\"")), "{tag}");
        assert_eq!(tag.contains("data-withheld"), withheld, "{tag}");
    }
    assert!(
        row(&dom, "data-worker", "pg-dead").contains("recent"),
        "a worker that just went unhealthy stands out"
    );
    assert!(row(&dom, "data-job", "pg-run").contains("data-job-state=\"running\""));
    assert!(row(&dom, "data-job", XSS_ID).contains("data-job-state=\"waiting\""));
    assert!(row(&dom, "data-job", "pg-ok").contains("data-outcome=\"succeeded\""));
    assert!(row(&dom, "data-job", "pg-bad").contains("data-outcome=\"rejected\""));
    assert!(dom.contains("arch=riscv"));
    // The script-like id is text: shown escaped, never run.
    assert!(dom.contains("&lt;script&gt;document.body"), "shown as text");
    assert!(
        !dom.contains("data-pwned=\"1\""),
        "the id ran as script:\n{dom}"
    );
    assert!(dom.contains("<svg"), "the flow charts");

    // A job's page: its events and fields.
    let job_dom = rendered(port, "/jobs/pg-ok");
    assert!(
        job_dom.contains("succeeded") && job_dom.contains("dispatched"),
        "{job_dom}"
    );

    // A screenshot into the test's output (README's picture is one of these).
    let shot = std::env::var("BLACKTREE_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::temp_dir().join(format!("status-page-{}.png", std::process::id()))
        });
    let (mut chromium, _profile) = chromium();
    let out = chromium
        .args([
            "--window-size=1100,1000",
            &format!("--screenshot={}", shot.display()),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    println!("screenshot: {}", shot.display());

    // The finished list is a ring of --finished-jobs.
    drop(gate);
    for i in 0..3 {
        mq.publish_job(&format!("pg-more-{i}"), json!({}));
    }
    let jobs = poll(LONG, "the ring to turn", || {
        let jobs = api(port, "/api/jobs?state=finished");
        let ids: Vec<String> = jobs["finished"]["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["jobId"].as_str().unwrap().to_string())
            .collect();
        (ids.iter().filter(|id| id.starts_with("pg-more")).count() == 3).then_some(ids)
    });
    assert_eq!(jobs.len(), 3, "bounded by --finished-jobs: {jobs:?}");
    orch.assert_no_secret_logged();
}

#[test]
fn the_page_asks_for_the_token_when_one_is_set_and_stays_local_without_one() {
    let dir = TempDir::new("page-auth");
    let token_file = dir.0.join("http-token");
    std::fs::write(&token_file, "page-S3CRET-7777\n").unwrap();
    let token = token_file.to_str().unwrap();
    let Setup { orch, mq: _mq, .. } = Setup::with_flags("page-auth", &["--http-auth-file", token]);
    let port = orch.metrics_port;
    let (code, _) = get(port, "/", &["-D", "-"]);
    assert_eq!(code, "401");
    let (_, headers) = get(port, "/api/workers", &["-D", "-", "-o", "/dev/null"]);
    assert!(headers.contains("WWW-Authenticate: Basic"), "{headers}");
    assert_eq!(get(port, "/metrics", &[]).0, "401");
    assert_eq!(
        get(port, "/healthz", &[]).0,
        "200",
        "health checks need no token"
    );
    let bearer = ["-H", "Authorization: Bearer page-S3CRET-7777"];
    assert_eq!(get(port, "/", &bearer).0, "200");
    assert_eq!(get(port, "/metrics", &bearer).0, "200");
    assert_eq!(
        get(port, "/api/jobs", &["-u", "ops:page-S3CRET-7777"]).0,
        "200"
    );
    assert_eq!(get(port, "/", &["-u", "ops:wrong"]).0, "401");
    let wrong = ["-H", "Authorization: Bearer page-S3CRET-7778"];
    assert_eq!(get(port, "/api/workers", &wrong).0, "401");
    assert!(!orch.log().contains("page-S3CRET-7777"));

    // Bound beyond loopback without a token: the page is refused, metrics are not.
    let Setup {
        orch: open,
        mq: _open_mq,
        ..
    } = Setup::with_flags("page-open", &["--metrics-listen", "0.0.0.0:0"]);
    let port = open.metrics_port;
    assert_eq!(get(port, "/", &[]).0, "403");
    assert_eq!(get(port, "/api/jobs", &[]).0, "403");
    assert_eq!(get(port, "/metrics", &[]).0, "200");
    assert_eq!(get(port, "/workers", &[]).0, "200");
    assert!(open.log().contains("without --http-auth-file"));
}

/// `submit --wait` for a job on a real worker whose build takes a second: piped, and on
/// a pseudo-terminal.
#[test]
fn submit_wait_shows_an_updating_line_on_a_terminal_and_plain_lines_in_a_pipe() {
    let flags = ["--events-key", "ev", "--logs-key", "lg"];
    let Setup {
        orch,
        names,
        mq: _mq,
    } = Setup::with_flags("page-progress", &flags);
    let _w = WorkerProcess::start(
        "pp-w",
        orch.grpc_port,
        &["--executor", "exec", "--exec-command", "sleep 1"],
    );
    orch.wait_for_log("worker pp-w registered", LONG);
    let dir = TempDir::new("page-progress");
    let submit = |id: &str| -> Vec<String> {
        // No repository: the exec worker runs its command without a clone.
        let job = dir.0.join(format!("{id}.json"));
        std::fs::write(&job, json!({"jobId": id, "repoUrl": ""}).to_string()).unwrap();
        [
            "submit",
            "--amqp-url",
            SHARED_BROKER,
            "--exchange",
            &names.exchange,
            "--events-key",
            "ev",
            "--logs-key",
            "lg",
            "--json",
            job.to_str().unwrap(),
            "--wait",
            "--timeout",
            "1m",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // Piped: one plain line per state, no control characters.
    let out = blacktree(
        &submit("pp-pipe")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    for line in [
        "job pp-pipe: waiting",
        "running on pp-w: exec command",
        "succeeded on pp-w",
    ] {
        assert!(err.contains(line), "{line} missing from:\n{err}");
    }
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    assert!(text(&out.stdout).starts_with("pp-pipe succeeded"));

    // On a terminal (script(1) gives it one): the line redraws itself in place.
    let line = std::iter::once(binary())
        .chain(submit("pp-tty"))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .output()
        .expect("running script(1)");
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("\x1b[2K") || shown.contains('\r'),
        "{shown:?}"
    );
    assert!(shown.contains("running on pp-w"), "{shown:?}");
    assert!(shown.contains("succeeded on pp-w"), "{shown:?}");
    assert!(
        !shown.lines().any(|l| l.starts_with("job pp-tty:")),
        "no plain progress lines on a terminal: {shown:?}"
    );
    assert!(
        shown.contains("\npp-tty succeeded worker=pp-w"),
        "the status goes below the line: {shown:?}"
    );
}
