//! Test harness: the real broker (shared or a private node), real gRPC test workers,
//! and the real `blacktree` binary as a child process. By concern: [`broker`] (queue
//! names, the test's connection, private nodes), [`workers`] (in-process gRPC workers),
//! [`processes`] (the binary as a child: orchestrator, logs), [`fixtures`] (the setup
//! most tests share), [`build_env`] (Docker, registry, git, `blacktree worker`),
//! [`gated`] (builds that end when the test says), [`partition`] (a port cut off on
//! loopback), [`rabbit_cluster`] (three private nodes joined in one cluster),
//! [`go_worker`] (a real grpc-go worker process).
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod broker;
pub mod build_env;
pub mod fixtures;
pub mod gated;
pub mod go_worker;
pub mod partition;
pub mod processes;
pub mod rabbit_cluster;
pub mod workers;

// Each test binary uses a different part of the harness.
#[allow(unused_imports)]
pub use {broker::*, fixtures::*, processes::*, rabbit_cluster::*, workers::*};

use std::process::Command;
use std::time::{Duration, Instant};

/// A token that must never show up in logs or statuses.
pub const TOKEN: &str = "ghp_TESTSECRET0123456789";

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET http://127.0.0.1:port/path` with curl: (status code, body).
pub fn http(port: u16, path: &str) -> (String, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", &url])
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string())
}

/// The orchestrator's `/workers` JSON (on its metrics port): one object per worker.
pub fn workers_json(port: u16) -> Vec<serde_json::Value> {
    let (code, body) = http(port, "/workers");
    assert_eq!(code, "200", "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).expect("/workers is JSON");
    list.as_array().expect("/workers is a list").clone()
}

/// `/workers` as worker id → state.
pub fn worker_states(port: u16) -> Vec<(String, String)> {
    workers_json(port)
        .iter()
        .map(|w| {
            (
                w["id"].as_str().unwrap().to_string(),
                w["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The state `/workers` gives worker `id`, if it lists it.
pub fn state_of(port: u16, id: &str) -> Option<String> {
    worker_states(port)
        .into_iter()
        .find(|(w, _)| w == id)
        .map(|(_, state)| state)
}

/// The value of the Prometheus sample `name` (a full `name{labels}` prefix, without
/// the `orchestrator_id` label every sample of an orchestrator carries) in `metrics`.
pub fn find_sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        without_instance_label(l)
            .strip_prefix(name)?
            .strip_prefix(' ')?
            .parse()
            .ok()
    })
}

/// A sample line without its `orchestrator_id="…"` label (and without `{}` left empty).
pub fn without_instance_label(line: &str) -> String {
    let Some(start) = line.find("orchestrator_id=\"") else {
        return line.to_string();
    };
    let value_end = line[start + 17..]
        .find('"')
        .map_or(line.len(), |i| start + 18 + i);
    let (mut before, mut after) = (&line[..start], &line[value_end..]);
    if let Some(rest) = after.strip_prefix(',') {
        after = rest;
    } else if let Some(head) = before.strip_suffix(',') {
        before = head;
    }
    let joined = format!("{before}{after}");
    joined.replacen("{}", "", 1)
}

/// [`find_sample`], which must be there.
pub fn sample(metrics: &str, name: &str) -> f64 {
    find_sample(metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// xorshift64*: a tiny seeded generator, so that a run's fault schedule can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Multiplying by an odd constant is a bijection; only the zero state is unusable.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A duration in the `(low, high)` range of milliseconds.
    pub fn millis(&mut self, (low, high): (u64, u64)) -> Duration {
        Duration::from_millis(low + self.next_u64() % (high - low + 1))
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// A number field of `/proc/PID/status` (`VmRSS` in KiB, `Threads`, …).
pub fn proc_status(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} for process {pid}"))
}

/// The resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS")
}
