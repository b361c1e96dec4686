//! Fault injection (issue 6): jobs flow from RabbitMQ through an orchestrator to real
//! `blacktree worker` processes while the test SIGKILLs and freezes workers, closes every
//! broker connection, stops and starts the broker app, and SIGKILLs the orchestrator.
//! Everything runs on a private broker node, since the test stops its app.
//!
//! At the end it checks what must hold under faults:
//! * no job is lost: every jobId gets a status;
//! * duplicates (at-least-once) stay within what the faults can explain, and each one
//!   is attributed to a fault by its timing;
//! * no worker incarnation (worker id + agent pid) ever ran more steps than its capacity;
//! * outcomes are `succeeded`, or `worker_lost` on a worker that was killed or frozen;
//! * the orchestrator's RSS comes back near its idle baseline.
//!
//! `CHAOS_JOBS` sets the number of jobs (300 by default, `scripts/chaos.sh` runs 2,000)
//! and `CHAOS_SEED` replays a run's fault schedule (the seed is printed first): the kinds
//! of fault, their order, the gaps and durations. Which worker a worker fault hits also
//! depends on which workers are running a step at that moment.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amiquip::{AmqpProperties, Channel, Confirm, ConfirmSmoother, Connection, Publish};
use common::build_env::TempDir;
use common::{free_port, poll, rss_kib, LoggedChild, Mq, Names, Orchestrator, PrivateBroker, Rng};
use crossbeam_channel::Receiver;
use serde_json::{json, Value};

/// Jobs of the short form that CI runs; `CHAOS_JOBS` overrides.
const DEFAULT_JOBS: usize = 300;
/// Workers, and the steps each runs at once.
const WORKERS: usize = 4;
const CAPACITY: usize = 2;
/// The orchestrator's dispatch threads and prefetch (they bound the duplicates).
const DISPATCH_THREADS: usize = 16;
const PREFETCH: usize = 16;
/// Jobs per confirmed batch of the test's publisher.
const BATCH: usize = 10;
/// Publishing is spread over at least this long, at most `MAX_RATE` jobs a second, so
/// that every fault hits a flowing workload.
const MIN_PUBLISHING: Duration = Duration::from_secs(20);
const MAX_RATE: f64 = 50.0;
/// Share of the workers' slots the jobs keep busy on average: the mean step time is
/// chosen from it, so that steps are running whenever a fault hits, in the short form
/// (300 jobs over 20 s: ≈300 ms steps) as in the long one (2,000 over 40 s: ≈100 ms),
/// with room left for the backlog a fault leaves behind.
const UTILISATION: f64 = 0.6;
/// Ranges (ms) of the gap between two faults, of how long a worker stays frozen, of how
/// long the broker app stays stopped, and of how long a killed process stays down.
const FAULT_GAP: (u64, u64) = (500, 2000);
const FREEZE: (u64, u64) = (1500, 3000);
const BROKER_DOWN: (u64, u64) = (500, 2000);
const DOWNTIME: (u64, u64) = (0, 1000);
/// Deadline of any single wait (a process to start, the broker to come back).
const LONG: Duration = Duration::from_secs(60);
/// Deadline for every job to have its status once publishing and faults are over.
const SETTLE: Duration = Duration::from_secs(180);
/// How far from a fault an effect may show and still be attributed to it: a status
/// published on a connection that the fault cut was finished shortly before; a job
/// on a killed or frozen worker ends within two missed pings (≈1 s) of the fault, or
/// when a call to the restarted worker fails while gRPC still reconnects.
const ATTRIBUTION_SLACK: Duration = Duration::from_secs(5);
/// The orchestrator's memory is bounded by the prefetch, the dispatch threads and the
/// workers (ARCHITECTURE.md, "Memory"); what it keeps per job is the dedupe window's
/// jobId (≈100 bytes, well under 1 MiB for 2,000 jobs). 16 MiB over the idle baseline
/// leaves room for the allocator keeping freed pages in its per-thread arenas, while a
/// leak of 8 KiB per job (a kept delivery, log or status) would exceed it at 2,000.
const RSS_TOLERANCE_KIB: u64 = 16 * 1024;

/// The exec executor's step (bash, run as `exec bash STEP "$PPID" FILE MS` by the
/// agent's `sh -c`, so `$1` is the worker agent's pid): notes `start` and `end` lines
/// with the jobId, the agent's pid and a timestamp in ns (`$EPOCHREALTIME`, no fork) in
/// the worker's steps file, and sleeps between for 0.5–1.5 × MS ms (by jobId).
///
/// A step that dies before its `end` (the worker kills its process group; the agent's
/// death kills it through `PR_SET_PDEATHSIG`) writes no `end`: a watcher in a session
/// of its own, outside the group the worker kills, notes `died` when the step's shell is
/// gone. It reads a pipe whose only writer is that shell (`sleep` gets it closed), which
/// ends the moment the shell dies; a step that ends normally writes `ok` into it first.
/// A step orphaned by a SIGKILLed agent (no `PR_SET_PDEATHSIG`) runs on and writes its
/// `end` under the dead incarnation's pid.
const STEP_SCRIPT: &str = r#"agent=$1 file=$2 mean=$3
note() { local t=${EPOCHREALTIME//[!0-9]/}; echo "$1 $BLACKTREE_JOB_ID $agent ${t}000" >> "$file"; }
if [ "$4" = watch ]; then
  read -r how
  [ "$how" = ok ] || note died
  exit 0
fi
note start
exec 3> >(exec setsid bash "$0" "$agent" "$file" "$mean" watch >/dev/null 2>&1)
ms=$(( mean * (50 + ${BLACKTREE_JOB_ID##*-} % 101) / 100 ))
printf -v fraction %03d $(( ms % 1000 ))
sleep "$(( ms / 1000 )).$fraction" 3>&-
note end
echo ok >&3
"#;

#[test]
fn chaos() {
    let wall = Instant::now();
    let settings = Settings::from_env();
    let step_ms = step_millis(settings.jobs);
    println!(
        "chaos: {} jobs over {:?}, steps of {step_ms} ms on average, seed {} \
         (replay with CHAOS_SEED={})",
        settings.jobs,
        publishing_time(settings.jobs),
        settings.seed,
        settings.seed
    );
    let mut rng = Rng::new(settings.seed);
    let dir = TempDir::new("chaos");
    let mut cluster = Cluster::start(&dir.0, step_ms);
    let ids: Vec<String> = (0..settings.jobs).map(|i| format!("chaos-{i}")).collect();

    let publisher = spawn_publisher(
        cluster.broker.url(),
        cluster.names.exchange.clone(),
        ids.clone(),
        publishing_time(ids.len()),
    );
    let faults = run_faults(&mut cluster, &mut rng, &publisher);
    let published = publisher.join().expect("the publisher thread");
    // Kept to the end: dropping it deletes the queues the orchestrator consumes.
    let reader = Mq::connect(&cluster.broker.url(), &cluster.names);
    let statuses = collect_statuses(&reader, &cluster.broker, &ids);
    let rss_end = rss_kib(cluster.orchestrator.process.pid());

    let report = Report::new(&ids, &statuses, &faults, &published, &cluster);
    report.print(&cluster, rss_end, wall.elapsed());
    report.check(&cluster, rss_end);
}

/// What the environment asks for.
struct Settings {
    jobs: usize,
    seed: u64,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
            })
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        Settings {
            jobs: var("CHAOS_JOBS").map_or(DEFAULT_JOBS, |n| n as usize),
            seed: var("CHAOS_SEED")
                .unwrap_or(now.as_nanos() as u64 ^ u64::from(std::process::id())),
        }
    }
}

/// How long publishing is spread over.
fn publishing_time(jobs: usize) -> Duration {
    MIN_PUBLISHING.max(Duration::from_secs_f64(jobs as f64 / MAX_RATE))
}

/// The mean step time (ms) that keeps `UTILISATION` of the slots busy.
fn step_millis(jobs: usize) -> u64 {
    let slots = (WORKERS * CAPACITY) as f64;
    let ms = UTILISATION * slots * publishing_time(jobs).as_secs_f64() * 1000.0 / jobs as f64;
    (ms as u64).clamp(20, 500)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A `blacktree worker` with the exec executor on a fixed port, so that it can be
/// SIGKILLed and started again where it was.
struct ChaosWorker {
    id: String,
    args: Vec<String>,
    process: LoggedChild,
    /// Every process that served as this worker: its pid, and when it was SIGKILLed.
    incarnations: Vec<(u32, Option<SystemTime>)>,
    /// Logs of its killed incarnations (evidence for failures).
    old_logs: Vec<String>,
    steps: PathBuf,
    _work_dir: TempDir,
}

impl ChaosWorker {
    fn start(index: usize, orchestrator_port: u16, dir: &Path, step_ms: u64) -> ChaosWorker {
        let id = format!("chaos-w{index}");
        let script = dir.join("step.sh");
        let steps = dir.join(format!("{id}.steps"));
        let work_dir = TempDir::new("chaos-worker");
        let command = format!(
            "exec bash '{}' \"$PPID\" '{}' {step_ms}",
            script.display(),
            steps.display()
        );
        let args: Vec<String> = [
            "worker",
            "--id",
            &id,
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--orchestrator",
            &format!("127.0.0.1:{orchestrator_port}"),
            "--check-in-interval",
            "500ms",
            "--capacity",
            &CAPACITY.to_string(),
            "--work-dir",
            &work_dir.0.display().to_string(),
            "--executor",
            "exec",
            "--exec-command",
            &command,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let process = Self::spawn(&args);
        ChaosWorker {
            incarnations: vec![(process.pid(), None)],
            old_logs: Vec::new(),
            id,
            args,
            process,
            steps,
            _work_dir: work_dir,
        }
    }

    fn spawn(args: &[String]) -> LoggedChild {
        LoggedChild::spawn(args, &[" listening on port "]).0
    }

    /// Whether it has registered with the orchestrator.
    fn registered(&self) -> bool {
        self.process
            .log()
            .contains("registered with the orchestrator")
    }

    /// Whether its current incarnation has a step running (started, not ended).
    fn running_a_step(&self) -> bool {
        read_steps(&self.steps)
            .get(&self.process.pid())
            .is_some_and(|steps| steps.iter().any(|s| s.until().is_none()))
    }

    fn kill(&mut self) {
        self.process.signal("KILL");
        self.process.wait_exit(LONG);
        self.incarnations.last_mut().unwrap().1 = Some(SystemTime::now());
        self.old_logs.push(self.process.log());
    }

    /// Starts it again on the same port, with the same id and steps file.
    fn restart(&mut self) {
        self.process = Self::spawn(&self.args);
        self.incarnations.push((self.process.pid(), None));
    }
}

/// The kinds of fault the test injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum FaultKind {
    KillWorker,
    FreezeWorker,
    CloseConnections,
    RestartBroker,
    KillOrchestrator,
}

impl FaultKind {
    const ALL: [FaultKind; 5] = [
        FaultKind::KillWorker,
        FaultKind::FreezeWorker,
        FaultKind::CloseConnections,
        FaultKind::RestartBroker,
        FaultKind::KillOrchestrator,
    ];
    /// The kinds injected again at random while jobs are still being published (the
    /// orchestrator is killed once).
    const REPEATABLE: [FaultKind; 4] = [
        FaultKind::KillWorker,
        FaultKind::FreezeWorker,
        FaultKind::CloseConnections,
        FaultKind::RestartBroker,
    ];

    fn label(self) -> &'static str {
        match self {
            FaultKind::KillWorker => "worker SIGKILL+restart",
            FaultKind::FreezeWorker => "worker SIGSTOP/SIGCONT",
            FaultKind::CloseConnections => "close_all_connections",
            FaultKind::RestartBroker => "broker stop_app/start_app",
            FaultKind::KillOrchestrator => "orchestrator SIGKILL+restart",
        }
    }

    /// Whether the orchestrator's broker connection is lost (without the orchestrator).
    fn cuts_broker(self) -> bool {
        matches!(self, FaultKind::CloseConnections | FaultKind::RestartBroker)
    }

    /// Whether it makes the jobs running on one worker end as `worker_lost`.
    fn loses_worker(self) -> bool {
        matches!(self, FaultKind::KillWorker | FaultKind::FreezeWorker)
    }
}

/// A fault as it was injected.
#[derive(Debug, Clone)]
struct Fault {
    kind: FaultKind,
    /// The worker it hit, for worker faults.
    worker: Option<String>,
    began: SystemTime,
    ended: SystemTime,
}

impl Fault {
    /// Whether `at` falls within the fault, widened by `before` and `after`.
    fn around(&self, at: SystemTime, before: Duration, after: Duration) -> bool {
        at + before >= self.began && at <= self.ended + after
    }
}

/// The broker node, the orchestrator and the workers under test.
struct Cluster {
    orchestrator: Orchestrator,
    /// Logs of the orchestrators killed so far (evidence for failures).
    old_logs: Vec<String>,
    workers: Vec<ChaosWorker>,
    /// Idle RSS (KiB) of each orchestrator process right after it started.
    baselines: Vec<u64>,
    grpc_port: u16,
    names: Names,
    /// Declared the test's queues; deletes them when dropped.
    _topology: Mq,
    /// Last: stopping the node ends everything.
    broker: PrivateBroker,
}

impl Cluster {
    /// Starts the broker node, the orchestrator and the workers; returns once every
    /// worker has registered, with the orchestrator's idle baseline measured.
    fn start(dir: &Path, step_ms: u64) -> Cluster {
        std::fs::write(dir.join("step.sh"), STEP_SCRIPT).unwrap();
        let broker = PrivateBroker::start();
        let names = Names::unique("chaos");
        let topology = Mq::connect(&broker.url(), &names);
        let grpc_port = free_port();
        let orchestrator = start_orchestrator(&broker, &names, grpc_port);
        let workers: Vec<ChaosWorker> = (0..WORKERS)
            .map(|i| ChaosWorker::start(i, grpc_port, dir, step_ms))
            .collect();
        for worker in &workers {
            poll(LONG, &format!("{} to register", worker.id), || {
                worker.registered().then_some(())
            });
        }
        Cluster {
            baselines: vec![rss_kib(orchestrator.process.pid())],
            orchestrator,
            old_logs: Vec::new(),
            workers,
            grpc_port,
            names,
            _topology: topology,
            broker,
        }
    }

    /// Injects one fault; returns once it is over (the process restarted, the worker
    /// thawed, the broker accepting connections again).
    fn inject(&mut self, kind: FaultKind, rng: &mut Rng) -> Fault {
        let began = SystemTime::now();
        let mut worker = None;
        match kind {
            FaultKind::KillWorker => {
                let index = self.pick_victim(rng);
                let victim = &mut self.workers[index];
                victim.kill();
                std::thread::sleep(rng.millis(DOWNTIME));
                victim.restart();
                worker = Some(victim.id.clone());
            }
            FaultKind::FreezeWorker => {
                let victim = &self.workers[self.pick_victim(rng)];
                victim.process.signal("STOP");
                std::thread::sleep(rng.millis(FREEZE));
                victim.process.signal("CONT");
                worker = Some(victim.id.clone());
            }
            FaultKind::CloseConnections => self
                .broker
                .ctl(&["close_all_connections", "chaos test: connections cut"]),
            FaultKind::RestartBroker => {
                self.broker.ctl(&["stop_app"]);
                std::thread::sleep(rng.millis(BROKER_DOWN));
                self.broker.ctl(&["start_app"]);
                let url = self.broker.url();
                poll(LONG, "the broker to accept connections again", || {
                    Connection::insecure_open(&url).ok().map(|c| {
                        let _ = c.close();
                    })
                });
            }
            FaultKind::KillOrchestrator => self.restart_orchestrator(rng),
        }
        Fault {
            kind,
            worker,
            began,
            ended: SystemTime::now(),
        }
    }

    /// A worker for a worker fault: one running a step if any (so the fault hits a job),
    /// chosen at random.
    fn pick_victim(&self, rng: &mut Rng) -> usize {
        let busy: Vec<usize> = (0..WORKERS)
            .filter(|&i| self.workers[i].running_a_step())
            .collect();
        match busy.len() {
            0 => rng.below(WORKERS),
            n => busy[rng.below(n)],
        }
    }

    /// SIGKILLs the orchestrator and starts a new one on the same gRPC port (the
    /// workers register with it by themselves); measures the new one's baseline.
    fn restart_orchestrator(&mut self, rng: &mut Rng) {
        self.orchestrator.signal("KILL");
        self.orchestrator.wait_exit(LONG);
        self.old_logs.push(self.orchestrator.log());
        std::thread::sleep(rng.millis(DOWNTIME));
        self.orchestrator = start_orchestrator(&self.broker, &self.names, self.grpc_port);
        self.baselines
            .push(rss_kib(self.orchestrator.process.pid()));
    }

    /// The lines about `job_id` in every log, the killed processes' included.
    fn log_lines_about(&self, job_id: &str) -> Vec<String> {
        let needle = format!("job {job_id}:");
        let mut logs: Vec<(&str, String)> = self
            .old_logs
            .iter()
            .map(|log| ("orchestrator", log.clone()))
            .collect();
        logs.push(("orchestrator", self.orchestrator.log()));
        for worker in &self.workers {
            logs.extend(
                worker
                    .old_logs
                    .iter()
                    .map(|log| (worker.id.as_str(), log.clone())),
            );
            logs.push((&worker.id, worker.process.log()));
        }
        logs.iter()
            .flat_map(|(source, log)| log.lines().map(move |line| format!("{source}: {line}")))
            .filter(|line| line.contains(&needle))
            .collect()
    }
}

fn start_orchestrator(broker: &PrivateBroker, names: &Names, grpc_port: u16) -> Orchestrator {
    let listen = format!("127.0.0.1:{grpc_port}");
    let threads = DISPATCH_THREADS.to_string();
    let prefetch = PREFETCH.to_string();
    let flags = [
        "--grpc-listen",
        &listen,
        "--dispatch-threads",
        &threads,
        "--prefetch",
        &prefetch,
        "--health-interval",
        "200ms",
        "--health-timeout",
        "300ms",
    ];
    Orchestrator::start(&broker.url(), names, &flags)
}

/// Injects faults at random moments: every kind once, in a random order, then more
/// (the orchestrator aside) while jobs are still being published.
fn run_faults(
    cluster: &mut Cluster,
    rng: &mut Rng,
    publisher: &JoinHandle<Published>,
) -> Vec<Fault> {
    let mut plan = FaultKind::ALL.to_vec();
    rng.shuffle(&mut plan);
    let mut faults = Vec::new();
    loop {
        // The workload between two faults (not a synchronisation).
        std::thread::sleep(rng.millis(FAULT_GAP));
        let kind = match plan.pop() {
            Some(kind) => kind,
            None if !publisher.is_finished() => {
                FaultKind::REPEATABLE[rng.below(FaultKind::REPEATABLE.len())]
            }
            None => break,
        };
        let fault = cluster.inject(kind, rng);
        let took = fault.ended.duration_since(fault.began).unwrap_or_default();
        println!(
            "chaos: {} {} ({} ms)",
            kind.label(),
            fault.worker.as_deref().unwrap_or(""),
            took.as_millis()
        );
        faults.push(fault);
    }
    faults
}

/// What the test's publisher did.
#[derive(Debug, Clone, Default)]
struct Published {
    /// Jobs it published more than once (a batch not confirmed in full is published
    /// again, and some of it may have reached the queue the first time).
    republished: HashSet<String>,
    /// Connections it had to open again.
    reconnects: u32,
}

/// Publishes `ids` in confirmed batches spread over `duration`, on a connection of its
/// own that survives broker faults.
fn spawn_publisher(
    url: String,
    exchange: String,
    ids: Vec<String>,
    duration: Duration,
) -> JoinHandle<Published> {
    std::thread::spawn(move || {
        let mut publisher = ConfirmedPublisher {
            url,
            exchange,
            link: None,
            sent: HashSet::new(),
            published: Published::default(),
        };
        let batches = ids.len().div_ceil(BATCH).max(1);
        let pace = duration / batches as u32;
        let started = Instant::now();
        for (i, batch) in ids.chunks(BATCH).enumerate() {
            // Batch i goes out at i × pace: jobs arrive gradually (the workload).
            let due = started + pace * i as u32;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            poll(LONG, "a batch of jobs to be confirmed", || {
                publisher.publish(batch).ok()
            });
        }
        publisher.published
    })
}

/// A channel with publisher confirms on a connection of the publisher's own.
struct Link {
    // Declared before the connection: the channel closes first.
    channel: Channel,
    confirms: Receiver<Confirm>,
    smoother: ConfirmSmoother,
    _connection: Connection,
}

impl Link {
    fn open(url: &str) -> Result<Link, String> {
        let mut connection = blacktree::amqp::AmqpUrl::parse(url)?.connect()?;
        let channel = connection.open_channel(None).map_err(|e| e.to_string())?;
        let confirms = channel
            .listen_for_publisher_confirms()
            .map_err(|e| e.to_string())?;
        channel
            .enable_publisher_confirms()
            .map_err(|e| e.to_string())?;
        Ok(Link {
            channel,
            confirms,
            smoother: ConfirmSmoother::new(),
            _connection: connection,
        })
    }

    /// Waits for the broker to ack the next `n` publications.
    fn acked(&mut self, n: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut acked = 0;
        while acked < n {
            let confirm = self
                .confirms
                .recv_deadline(deadline)
                .map_err(|e| format!("no confirm: {e}"))?;
            for confirm in self.smoother.process(confirm) {
                match confirm {
                    Confirm::Ack(_) => acked += 1,
                    Confirm::Nack(_) => return Err("the broker nacked a job".into()),
                }
            }
        }
        Ok(())
    }
}

/// Publishes jobs with publisher confirms; any failure drops the connection, and the
/// batch is published again on a new one.
struct ConfirmedPublisher {
    url: String,
    exchange: String,
    link: Option<Link>,
    /// Jobs handed to a channel at least once.
    sent: HashSet<String>,
    published: Published,
}

impl ConfirmedPublisher {
    /// Publishes `ids` as persistent job messages and waits for their confirms.
    fn publish(&mut self, ids: &[String]) -> Result<(), String> {
        let result = self.try_publish(ids);
        if result.is_err() && self.link.take().is_some() {
            self.published.reconnects += 1;
        }
        result
    }

    fn try_publish(&mut self, ids: &[String]) -> Result<(), String> {
        if self.link.is_none() {
            self.link = Some(Link::open(&self.url)?);
        }
        let link = self.link.as_mut().expect("connected");
        for id in ids {
            let body = serde_json::to_vec(&json!({ "jobId": id })).unwrap();
            let properties = AmqpProperties::default().with_delivery_mode(2);
            link.channel
                .basic_publish(
                    self.exchange.as_str(),
                    Publish::with_properties(&body, "worker.execute", properties),
                )
                .map_err(|e| e.to_string())?;
            if !self.sent.insert(id.clone()) {
                self.published.republished.insert(id.clone());
            }
        }
        link.acked(ids.len())
    }
}

/// Messages in `queue`, ready or delivered and not yet acked (`rabbitmqctl`).
fn queue_messages(broker: &PrivateBroker, queue: &str) -> Option<u64> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-n",
            &broker.node,
            "-q",
            "list_queues",
            "--no-table-headers",
        ])
        .args(["name", "messages"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let (name, count) = line.trim().rsplit_once(char::is_whitespace)?;
            (name.trim() == queue).then(|| count.parse().ok())?
        })
}

/// Reads statuses until every job has one and the execute queue is empty: every
/// delivery acked, so every status confirmed and already in the status queue, and
/// nothing left that could still publish one (a late duplicate included).
fn collect_statuses(reader: &Mq, broker: &PrivateBroker, ids: &[String]) -> Vec<Value> {
    let names = &reader.names;
    let mut statuses: Vec<Value> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    poll(
        SETTLE,
        "every job's status, with the execute queue acked",
        || {
            let settled = queue_messages(broker, &names.execute) == Some(0);
            let waiting = reader.depth(&names.status) as usize;
            let batch = reader.statuses(waiting, LONG);
            seen.extend(
                batch
                    .iter()
                    .filter_map(|s| s["jobId"].as_str().map(str::to_string)),
            );
            statuses.extend(batch);
            (settled && ids.iter().all(|id| seen.contains(id))).then_some(())
        },
    );
    statuses
}

/// A status, as far as the checks need it.
#[derive(Debug, Clone)]
struct StatusInfo {
    job: String,
    outcome: String,
    worker: String,
    started: Option<SystemTime>,
    finished: SystemTime,
}

impl StatusInfo {
    fn parse(status: &Value) -> StatusInfo {
        let time = |field: &str| {
            status[field]
                .as_str()
                .map(|t| humantime::parse_rfc3339(t).unwrap_or_else(|e| panic!("{field} {t}: {e}")))
        };
        StatusInfo {
            job: status["jobId"].as_str().expect("jobId").to_string(),
            outcome: status["outcome"].as_str().expect("outcome").to_string(),
            worker: status["workerId"].as_str().unwrap_or_default().to_string(),
            started: time("startedAt"),
            finished: time("finishedAt").expect("finishedAt"),
        }
    }

    /// Whether both are the same status (published twice), not two runs of the job.
    fn same_run(&self, other: &StatusInfo) -> bool {
        (&self.outcome, &self.worker, self.started, self.finished)
            == (&other.outcome, &other.worker, other.started, other.finished)
    }
}

/// Why a job has more than one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum DuplicateCause {
    /// The same status, published again on a new connection after a broker fault cut
    /// the one it was published on before its confirm arrived.
    BrokerFault,
    /// The job ran again: the killed orchestrator had finished it but not yet acked its
    /// delivery, which the broker gave to its successor.
    OrchestratorKill,
    /// The test published the job twice (a batch whose confirms a broker fault cut off)
    /// and the copies reached orchestrators that did not share a dedupe window.
    TestRepublish,
    Unexplained,
}

impl DuplicateCause {
    /// Why `extra` (a later status of a job) exists, given the job's `earlier` ones.
    fn of(
        extra: &StatusInfo,
        earlier: &[StatusInfo],
        faults: &[Fault],
        republished: &HashSet<String>,
    ) -> DuplicateCause {
        let slack = ATTRIBUTION_SLACK;
        if earlier.iter().any(|e| e.same_run(extra)) {
            let cut = faults
                .iter()
                .any(|f| f.kind.cuts_broker() && f.around(extra.finished, slack, Duration::ZERO));
            return if cut {
                DuplicateCause::BrokerFault
            } else {
                DuplicateCause::Unexplained
            };
        }
        let across_kill = faults.iter().any(|f| {
            f.kind == FaultKind::KillOrchestrator
                && earlier.iter().any(|e| e.finished <= f.ended)
                && extra.started.is_some_and(|s| s >= f.began)
        });
        if across_kill {
            DuplicateCause::OrchestratorKill
        } else if republished.contains(&extra.job) {
            DuplicateCause::TestRepublish
        } else {
            DuplicateCause::Unexplained
        }
    }
}

/// Duplicates the faults can explain at most:
/// * an orchestrator SIGKILL: the deliveries it held unacked (at most the prefetch) go
///   to its successor, which runs them again; only those whose status had already been
///   published become duplicates;
/// * a lost broker connection (close_all_connections, stop_app): the statuses published
///   and not yet confirmed are published again. A status is unconfirmed only while its
///   job is pending: at most the prefetch of the connection plus the jobs still
///   running from an earlier one (at most the dispatch threads);
/// * a job the test published twice runs twice only when the copies reach different
///   orchestrators (a single one deduplicates): one extra status each.
fn duplicate_bound(faults: &[Fault], published: &Published) -> usize {
    let kills = faults
        .iter()
        .filter(|f| f.kind == FaultKind::KillOrchestrator)
        .count();
    let cuts = faults.iter().filter(|f| f.kind.cuts_broker()).count();
    kills * PREFETCH + cuts * (PREFETCH + DISPATCH_THREADS) + published.republished.len()
}

/// One step of one worker incarnation, from the steps file.
#[derive(Debug, Clone)]
struct Step {
    job: String,
    start: u64,
    /// `None` when the step was killed (no `end` line).
    end: Option<u64>,
    /// When a killed step was seen to die (its `died` line), if it was.
    died: Option<u64>,
}

impl Step {
    /// Until when the step ran: its end, or its death; `None` when neither is known.
    fn until(&self) -> Option<u64> {
        self.end.or(self.died)
    }
}

/// Reads a worker's steps file: its steps by agent pid.
fn read_steps(path: &Path) -> BTreeMap<u32, Vec<Step>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<(u64, String, String, u32)> = text
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let [kind, job, agent, at] = fields[..] else {
                panic!("bad line in {}: {line:?}", path.display())
            };
            (
                at.parse().unwrap(),
                kind.to_string(),
                job.to_string(),
                agent.parse().unwrap(),
            )
        })
        .collect();
    lines.sort();
    let mut steps: BTreeMap<u32, Vec<Step>> = BTreeMap::new();
    // The open step of each (agent, job). A worker never runs a job twice at once (it
    // answers ALREADY_EXISTS), so an `end` or `died` closes the job's latest start, and
    // a start still open when the job starts again on the same incarnation was killed.
    let mut open: HashMap<(u32, String), usize> = HashMap::new();
    for (at, kind, job, agent) in lines {
        let incarnation = steps.entry(agent).or_default();
        if kind == "start" {
            open.insert((agent, job.clone()), incarnation.len());
            incarnation.push(Step {
                job,
                start: at,
                end: None,
                died: None,
            });
            continue;
        }
        let i = open
            .remove(&(agent, job.clone()))
            .unwrap_or_else(|| panic!("{}: {job} {kind} without a start", path.display()));
        match kind.as_str() {
            "end" => incarnation[i].end = Some(at),
            "died" => incarnation[i].died = Some(at),
            other => panic!("{}: unknown line kind {other:?}", path.display()),
        }
    }
    steps
}

/// The steps running at the busiest moment. The count peaks at some step's start, so
/// only starts are looked at. A killed step runs until its watcher saw it die; one
/// whose death was not seen (its watcher was killed as it started) counts at its start
/// only, which can miss an excess but never make one up.
fn peak(steps: &[Step]) -> Vec<Step> {
    let running_at = |t: u64| -> Vec<Step> {
        steps
            .iter()
            .filter(|s| s.start <= t && s.until().map_or(s.start == t, |until| until > t))
            .cloned()
            .collect()
    };
    steps
        .iter()
        .map(|s| running_at(s.start))
        .max_by_key(Vec::len)
        .unwrap_or_default()
}

/// A worker's figures, from its steps file.
#[derive(Debug)]
struct WorkerSteps {
    id: String,
    incarnations: usize,
    steps: usize,
    /// Steps killed, by the worker or with it (no `end` line).
    killed: usize,
    /// Killed steps whose death the watcher saw.
    died: usize,
    /// Steps that ended after their worker was SIGKILLed.
    orphaned: usize,
    /// The most steps one incarnation ran at once: that incarnation's agent pid, and
    /// the steps.
    peak: (u32, Vec<Step>),
    /// Agent pids in the file that are none of its incarnations'.
    unknown_pids: Vec<u32>,
    /// Jobs with a completed step.
    completed: HashSet<String>,
}

impl WorkerSteps {
    fn read(worker: &ChaosWorker) -> WorkerSteps {
        let by_agent = read_steps(&worker.steps);
        let killed_at: HashMap<u32, Option<SystemTime>> =
            worker.incarnations.iter().copied().collect();
        let ns = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        let all = || by_agent.values().flatten();
        WorkerSteps {
            id: worker.id.clone(),
            incarnations: worker.incarnations.len(),
            steps: all().count(),
            killed: all().filter(|s| s.end.is_none()).count(),
            died: all()
                .filter(|s| s.end.is_none() && s.died.is_some())
                .count(),
            orphaned: by_agent
                .iter()
                .map(
                    |(agent, steps)| match killed_at.get(agent).copied().flatten() {
                        Some(kill) => steps.iter().filter(|s| s.end > Some(ns(kill))).count(),
                        None => 0,
                    },
                )
                .sum(),
            peak: by_agent
                .iter()
                .map(|(agent, steps)| (*agent, peak(steps)))
                .max_by_key(|(_, steps)| steps.len())
                .unwrap_or_default(),
            unknown_pids: by_agent
                .keys()
                .filter(|pid| !killed_at.contains_key(pid))
                .copied()
                .collect(),
            completed: all()
                .filter(|s| s.end.is_some())
                .map(|s| s.job.clone())
                .collect(),
        }
    }
}

/// Everything the run produced, attributed and counted.
struct Report {
    jobs: usize,
    statuses: Vec<StatusInfo>,
    lost: Vec<String>,
    duplicates: BTreeMap<DuplicateCause, Vec<String>>,
    duplicate_bound: usize,
    faults: Vec<Fault>,
    published: Published,
    /// `worker_lost` statuses no worker fault explains, and other unexpected outcomes.
    odd_outcomes: Vec<StatusInfo>,
    /// Succeeded statuses without a completed step of their job on their worker.
    unbacked: Vec<StatusInfo>,
    workers: Vec<WorkerSteps>,
}

impl Report {
    fn new(
        ids: &[String],
        statuses: &[Value],
        faults: &[Fault],
        published: &Published,
        cluster: &Cluster,
    ) -> Report {
        let statuses: Vec<StatusInfo> = statuses.iter().map(StatusInfo::parse).collect();
        let mut by_job: HashMap<&str, Vec<StatusInfo>> = HashMap::new();
        for status in &statuses {
            by_job.entry(&status.job).or_default().push(status.clone());
        }
        let lost = ids
            .iter()
            .filter(|id| !by_job.contains_key(id.as_str()))
            .cloned()
            .collect();
        let mut duplicates: BTreeMap<DuplicateCause, Vec<String>> = BTreeMap::new();
        for (job, mut runs) in by_job {
            runs.sort_by_key(|s| s.finished);
            for i in 1..runs.len() {
                let cause =
                    DuplicateCause::of(&runs[i], &runs[..i], faults, &published.republished);
                duplicates.entry(cause).or_default().push(job.to_string());
            }
        }
        let lost_worker_explained = |s: &StatusInfo| {
            faults.iter().any(|f| {
                f.kind.loses_worker()
                    && f.worker.as_deref() == Some(s.worker.as_str())
                    && f.around(s.finished, Duration::ZERO, ATTRIBUTION_SLACK)
            })
        };
        let odd_outcomes = statuses
            .iter()
            .filter(|s| match s.outcome.as_str() {
                "succeeded" => false,
                "worker_lost" => !lost_worker_explained(s),
                _ => true,
            })
            .cloned()
            .collect();
        let workers: Vec<WorkerSteps> = cluster.workers.iter().map(WorkerSteps::read).collect();
        let unbacked = statuses
            .iter()
            .filter(|s| s.outcome == "succeeded")
            .filter(|s| {
                !workers
                    .iter()
                    .any(|w| w.id == s.worker && w.completed.contains(&s.job))
            })
            .cloned()
            .collect();
        Report {
            jobs: ids.len(),
            lost,
            duplicates,
            duplicate_bound: duplicate_bound(faults, published),
            faults: faults.to_vec(),
            published: published.clone(),
            odd_outcomes,
            unbacked,
            workers,
            statuses,
        }
    }

    fn duplicate_count(&self) -> usize {
        self.duplicates.values().map(Vec::len).sum()
    }

    fn print(&self, cluster: &Cluster, rss_end: u64, wall: Duration) {
        let count_by = |items: Vec<String>| {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for item in items {
                *counts.entry(item).or_default() += 1;
            }
            counts
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let faults = count_by(
            self.faults
                .iter()
                .map(|f| f.kind.label().to_string())
                .collect(),
        );
        let duplicates = count_by(
            self.duplicates
                .iter()
                .flat_map(|(cause, jobs)| jobs.iter().map(move |_| format!("{cause:?}")))
                .collect(),
        );
        let concurrency = self
            .workers
            .iter()
            .map(|w| {
                format!(
                    "{} {}/{CAPACITY} ({} incarnations)",
                    w.id,
                    w.peak.1.len(),
                    w.incarnations
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let steps = self.workers.iter().fold((0, 0, 0, 0), |acc, w| {
            (
                acc.0 + w.steps,
                acc.1 + w.killed,
                acc.2 + w.died,
                acc.3 + w.orphaned,
            )
        });
        let baselines = cluster
            .baselines
            .iter()
            .map(|kib| mib(*kib))
            .collect::<Vec<_>>()
            .join(", restarted ");
        let rows = [
            (
                "jobs published",
                format!(
                    "{} ({} published twice by the test, {} publisher reconnects)",
                    self.jobs,
                    self.published.republished.len(),
                    self.published.reconnects
                ),
            ),
            ("statuses", self.statuses.len().to_string()),
            ("lost", self.lost.len().to_string()),
            (
                "duplicates",
                format!(
                    "{} (bound {}){}",
                    self.duplicate_count(),
                    self.duplicate_bound,
                    if duplicates.is_empty() {
                        String::new()
                    } else {
                        format!(": {duplicates}")
                    }
                ),
            ),
            ("faults", format!("{}: {faults}", self.faults.len())),
            (
                "outcomes",
                count_by(self.statuses.iter().map(|s| s.outcome.clone()).collect()),
            ),
            ("unexplained outcomes", self.odd_outcomes.len().to_string()),
            (
                "steps",
                format!(
                    "{} started, {} killed ({} seen to die), {} orphaned by a SIGKILL",
                    steps.0, steps.1, steps.2, steps.3
                ),
            ),
            ("max steps at once", concurrency),
            (
                "orchestrator RSS",
                format!(
                    "baseline {baselines}; end {} (limit {})",
                    mib(rss_end),
                    mib(cluster.baselines.last().unwrap() + RSS_TOLERANCE_KIB)
                ),
            ),
            ("wall time", format!("{:.1} s", wall.as_secs_f64())),
        ];
        let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
        println!("chaos: results");
        for (name, value) in rows {
            println!("  {name:<width$}  {value}");
        }
    }

    /// Asserts what must hold; the evidence (log lines) goes with a failure.
    fn check(&self, cluster: &Cluster, rss_end: u64) {
        assert!(
            self.lost.is_empty(),
            "jobs without a status: {:?}",
            self.lost
        );
        for kind in FaultKind::ALL {
            assert!(
                self.faults.iter().any(|f| f.kind == kind),
                "no {} was injected",
                kind.label()
            );
        }
        if let Some(jobs) = self.duplicates.get(&DuplicateCause::Unexplained) {
            panic!(
                "{} duplicates that no fault explains; statuses and orchestrator logs:\n{}\n{}",
                jobs.len(),
                self.statuses_of(jobs),
                evidence(cluster, jobs)
            );
        }
        assert!(
            self.duplicate_count() <= self.duplicate_bound,
            "{} duplicates, more than the faults explain ({})",
            self.duplicate_count(),
            self.duplicate_bound
        );
        assert!(
            self.odd_outcomes.is_empty(),
            "unexpected outcomes: {:?}\n{}",
            self.odd_outcomes,
            evidence(
                cluster,
                &self
                    .odd_outcomes
                    .iter()
                    .map(|s| s.job.clone())
                    .collect::<Vec<_>>()
            )
        );
        assert!(
            self.unbacked.is_empty(),
            "succeeded without a completed step on their worker: {:?}",
            self.unbacked
        );
        for worker in &self.workers {
            assert!(
                worker.unknown_pids.is_empty(),
                "{}: steps under agent pids {:?}, none of its incarnations",
                worker.id,
                worker.unknown_pids
            );
            // PR_SET_PDEATHSIG: a step dies with its SIGKILLed agent.
            assert_eq!(
                worker.orphaned, 0,
                "{}: steps ended after their agent was SIGKILLed",
                worker.id
            );
            let (agent, steps) = &worker.peak;
            assert!(
                steps.len() <= CAPACITY,
                "{} (agent pid {agent}) ran {} steps at once, capacity {CAPACITY}: {steps:?}\n{}",
                worker.id,
                steps.len(),
                evidence(
                    cluster,
                    &steps.iter().map(|s| s.job.clone()).collect::<Vec<_>>()
                )
            );
        }
        let baseline = *cluster.baselines.last().unwrap();
        assert!(
            rss_end <= baseline + RSS_TOLERANCE_KIB,
            "the orchestrator's RSS did not come back: {} idle after the run, baseline {}",
            mib(rss_end),
            mib(baseline)
        );
    }

    /// The statuses of `jobs`, one per line.
    fn statuses_of(&self, jobs: &[String]) -> String {
        self.statuses
            .iter()
            .filter(|s| jobs.contains(&s.job))
            .map(|s| format!("  {s:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// What the orchestrators logged about (the first few of) `jobs`.
fn evidence(cluster: &Cluster, jobs: &[String]) -> String {
    jobs.iter()
        .take(5)
        .map(|job| format!("{job}:\n  {}", cluster.log_lines_about(job).join("\n  ")))
        .collect::<Vec<_>>()
        .join("\n")
}
