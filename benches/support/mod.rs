//! What the benchmarks share: no-op workers (one grpcio server listening on many ports,
//! each port a worker of its own), per-process resource readings from `/proc`, and a
//! plain HTTP GET for the orchestrator's `/metrics` and `/workers`.

#![allow(dead_code)] // each bench uses a part

pub mod raw;
pub mod skeleton;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use blacktree::grpc;
use blacktree::proto::job::{
    CancelJobRequest, CancelJobResponse, JobRequest, JobResponse, PingRequest, PingResponse,
};
use blacktree::proto::job_grpc::{create_job_service, JobService, JobServiceClient};
use crossbeam_channel::Sender;
use grpcio::{EnvBuilder, RpcContext, Server, ServerBuilder, ServerCredentials, UnarySink};

/// A worker that answers every call at once (RunJob: success), optionally reporting
/// when each RunJob arrived.
#[derive(Clone, Default)]
pub struct NoopWorker {
    /// Receives the arrival time of each RunJob.
    pub arrivals: Option<Sender<Instant>>,
}

impl JobService for NoopWorker {
    fn run_job(&mut self, ctx: RpcContext, req: JobRequest, sink: UnarySink<JobResponse>) {
        if let Some(arrivals) = &self.arrivals {
            let _ = arrivals.send(Instant::now());
        }
        let answer = JobResponse {
            jobId: req.jobId,
            success: true,
            ..JobResponse::default()
        };
        blacktree::grpc::reply(&ctx, sink, answer);
    }

    fn ping(&mut self, ctx: RpcContext, _req: PingRequest, sink: UnarySink<PingResponse>) {
        blacktree::grpc::reply(&ctx, sink, PingResponse::default());
    }

    fn cancel_job(
        &mut self,
        ctx: RpcContext,
        _req: CancelJobRequest,
        sink: UnarySink<CancelJobResponse>,
    ) {
        blacktree::grpc::reply(&ctx, sink, CancelJobResponse::default());
    }
}

/// `count` no-op workers: one grpcio server (`cq_count` completion-queue threads)
/// listening on `count` loopback ports. Returns the running server and its ports.
pub fn serve_noop_workers(worker: NoopWorker, count: usize, cq_count: usize) -> (Server, Vec<u16>) {
    let env = Arc::new(
        EnvBuilder::new()
            .cq_count(cq_count)
            .name_prefix(NOOP_THREADS)
            .build(),
    );
    let mut server = ServerBuilder::new(env)
        .register_service(create_job_service(worker))
        .build()
        .expect("building the no-op workers' server");
    let ports = (0..count)
        .map(|_| {
            server
                .add_listening_port("127.0.0.1:0", ServerCredentials::insecure())
                .expect("a loopback port")
        })
        .collect();
    server.start();
    (server, ports)
}

/// A client of the no-op worker on loopback `port`, as the orchestrator makes them at
/// its default `--lost-after` (60 s).
pub fn worker_client(env: &Arc<grpcio::Environment>, port: u16) -> JobServiceClient {
    let keepalive = grpc::Keepalive::for_lost_after(std::time::Duration::from_secs(60));
    grpc::job_client(env.clone(), &format!("127.0.0.1:{port}"), None, keepalive)
}

/// The `--worker` value naming each port as a static worker `PREFIX-i`.
pub fn static_workers(prefix: &str, ports: &[u16]) -> String {
    let workers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| format!("{prefix}-{i}=127.0.0.1:{port}"))
        .collect();
    workers.join(",")
}

/// A process's fields from `/proc/PID/stat` after the command name.
fn stat_fields(pid: u32) -> Vec<String> {
    stat_fields_at(&format!("/proc/{pid}/stat")).expect("reading /proc/PID/stat")
}

/// The fields of a `stat` file of `/proc` (a process's or a thread's) after the command
/// name.
fn stat_fields_at(path: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let after_name = &stat[stat.rfind(')').expect("a command name") + 2..];
    Some(after_name.split_whitespace().map(str::to_string).collect())
}

/// Seconds of CPU (user + system) in `stat` fields: after the name, state is field 3,
/// utime field 14, stime field 15 (proc(5)).
fn cpu_of(fields: &[String]) -> f64 {
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / per_second as f64
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_of(&stat_fields(pid))
}

/// The name prefix of the no-op workers' threads, so that their CPU can be told apart
/// from the rest of the bench process's.
pub const NOOP_THREADS: &str = "noop-worker";

/// This process's threads whose name starts with `prefix`, by thread id.
pub fn tids_named(prefix: &str) -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .expect("reading /proc/self/task")
        .filter_map(|task| {
            let path = task.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            comm.starts_with(prefix)
                .then(|| path.file_name()?.to_str()?.parse().ok())
                .flatten()
        })
        .collect()
}

/// CPU seconds (user + system) thread `tid` of this process has used so far (0 once it
/// ended).
pub fn tid_cpu_seconds(tid: u32) -> f64 {
    stat_fields_at(&format!("/proc/self/task/{tid}/stat")).map_or(0.0, |f| cpu_of(&f))
}

/// CPU seconds the threads of this process whose name starts with `prefix` have used so
/// far (threads that ended are not counted: the no-op workers' outlive every reading).
pub fn threads_cpu_seconds(prefix: &str) -> f64 {
    tids_named(prefix).into_iter().map(tid_cpu_seconds).sum()
}

/// How many times a thread went to sleep (`voluntary_ctxt_switches` of a `status` file
/// of `/proc`): each sleep ends in a wake-up, so per job they count the hand-offs
/// between threads (a channel, a park, a socket wait).
fn sleeps_at(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What a kind of thread (its name without its number) has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ThreadUse {
    /// Seconds on the CPU (`/proc/…/schedstat`).
    pub cpu: f64,
    /// Times it went to sleep (see [`sleeps_at`]).
    pub sleeps: u64,
}

impl std::ops::Sub for ThreadUse {
    type Output = ThreadUse;
    fn sub(self, before: ThreadUse) -> ThreadUse {
        ThreadUse {
            cpu: self.cpu - before.cpu,
            sleeps: self.sleeps.saturating_sub(before.sleeps),
        }
    }
}

impl ThreadUse {
    /// What all the kinds of thread of `by_kind` used together.
    pub fn total(by_kind: &std::collections::BTreeMap<String, ThreadUse>) -> ThreadUse {
        by_kind
            .values()
            .fold(ThreadUse::default(), |sum, used| ThreadUse {
                cpu: sum.cpu + used.cpu,
                sleeps: sum.sleeps + used.sleeps,
            })
    }
}

/// The use so far of the threads in these `/proc` task directories, by thread kind
/// (`dispatch`, `grpc`…).
fn use_by_kind(
    tasks: impl Iterator<Item = std::path::PathBuf>,
) -> std::collections::BTreeMap<String, ThreadUse> {
    let mut by_kind = std::collections::BTreeMap::<String, ThreadUse>::new();
    for task in tasks {
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        // Time on the CPU in ns (`stat` counts whole clock ticks per thread, which loses
        // most of the time of 1,000 threads that each run for a few ms).
        let Some(on_cpu) = std::fs::read_to_string(task.join("schedstat"))
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        else {
            continue; // it ended meanwhile
        };
        let used = by_kind.entry(thread_kind(&comm).to_string()).or_default();
        used.cpu += on_cpu as f64 / 1e9;
        used.sleeps += sleeps_at(task.join("status").to_str().unwrap_or_default());
    }
    by_kind
}

/// The use so far of the threads of process `pid`, by kind (threads that ended are not
/// counted).
pub fn process_threads(pid: u32) -> std::collections::BTreeMap<String, ThreadUse> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("reading /proc/PID/task");
    use_by_kind(tasks.map(|task| task.expect("a task").path()))
}

/// The use so far of these threads of this process, by kind.
pub fn own_threads(tids: &[u32]) -> std::collections::BTreeMap<String, ThreadUse> {
    use_by_kind(
        tids.iter()
            .map(|tid| std::path::PathBuf::from(format!("/proc/self/task/{tid}"))),
    )
}

/// A thread's name without its number (`dispatch-12` → `dispatch`).
fn thread_kind(comm: &str) -> &str {
    comm.trim()
        .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-')
}

/// Resident memory of `pid`, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    crate::common::rss_kib(pid) as f64 / 1024.0
}

/// Threads of `pid`.
pub fn threads(pid: u32) -> u64 {
    crate::common::proc_status(pid, "Threads")
}

/// `pid`'s threads by name (trailing digits dropped), e.g. `dispatch×64 grpc×1`.
pub fn thread_names(pid: u32) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("reading /proc/PID/task") {
        let comm =
            std::fs::read_to_string(task.expect("a task").path().join("comm")).unwrap_or_default();
        *counts.entry(thread_kind(&comm).to_string()).or_default() += 1;
    }
    let names: Vec<String> = counts
        .iter()
        .map(|(name, n)| format!("{name}×{n}"))
        .collect();
    names.join(" ")
}

/// The pid of the shared RabbitMQ node's Erlang VM.
pub fn broker_pid() -> u32 {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "eval", "os:getpid()."])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_matches('"')
        .parse()
        .expect("the broker's pid")
}

/// CPU seconds used by several processes between two readings.
pub struct CpuMeter {
    pids: Vec<u32>,
    start: Vec<f64>,
    started: Instant,
}

impl CpuMeter {
    /// Starts measuring `pids`.
    pub fn start(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            pids: pids.to_vec(),
            start: pids.iter().map(|&p| cpu_seconds(p)).collect(),
            started: Instant::now(),
        }
    }

    /// CPU seconds each process used since the start, and the wall seconds elapsed.
    pub fn read(&self) -> (Vec<f64>, f64) {
        let used = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|(&p, s)| cpu_seconds(p) - s)
            .collect();
        (used, self.started.elapsed().as_secs_f64())
    }
}

/// `GET path` from an HTTP server on loopback `port`; returns the body.
pub fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting over HTTP");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("sending a request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading a response");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    body.to_string()
}

/// The number in environment variable `name` (a bench's size), or `default`.
pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// Median, smallest and largest of `values`.
pub fn median_and_range(values: impl IntoIterator<Item = f64>) -> (f64, f64, f64) {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    (
        percentile(&values, 0.5),
        values[0],
        values[values.len() - 1],
    )
}

/// p50 and p99 of `samples`, in ms.
pub fn percentiles_ms(samples: &[std::time::Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}

/// Percentile `q` (0..=1) of sorted `samples`.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
