//! The system under test: a private broker node and an orchestrator (or a three-node
//! cluster and two orchestrators), and `blacktree worker`s with a step that records
//! itself; and the faults injected into it.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use amiquip::Connection;

use crate::common::build_env::TempDir;
use crate::common::{
    free_port, http, poll, rss_kib, BrokerCluster, LoggedChild, Mq, Names, Orchestrator,
    PrivateBroker, Rng,
};

use crate::*;

/// The exec executor's step (bash, run as `exec bash STEP "$PPID" FILE MS EVERY LONG`
/// by the agent's `sh -c`, so `$1` is the worker agent's pid): notes `start` and `end`
/// lines with the jobId, the agent's pid and a timestamp in ns (`$EPOCHREALTIME`, no
/// fork) in the worker's steps file, and sleeps between for 0.5–1.5 × MS ms (by jobId),
/// or LONG ms for every EVERY-th job (a long build, for orchestrator restarts to hit).
///
/// A step that dies before its `end` (the worker kills its process group; the agent's
/// death kills it through `PR_SET_PDEATHSIG`) writes no `end`: a watcher in a session
/// of its own, outside the group the worker kills, notes `died` when the step's shell is
/// gone. It reads a pipe whose only writer is that shell (`sleep` gets it closed), which
/// ends the moment the shell dies; a step that ends normally writes `ok` into it first.
/// A step orphaned by a SIGKILLed agent (no `PR_SET_PDEATHSIG`) runs on and writes its
/// `end` under the dead incarnation's pid.
pub const STEP_SCRIPT: &str = r#"agent=$1 file=$2 mean=$3 every=$4 long=$5
note() { local t=${EPOCHREALTIME//[!0-9]/}; echo "$1 $BLACKTREE_JOB_ID $agent ${t}000" >> "$file"; }
if [ "$4" = watch ]; then
  read -r how
  [ "$how" = ok ] || note died
  exit 0
fi
note start
exec 3> >(exec setsid bash "$0" "$agent" "$file" "$mean" watch >/dev/null 2>&1)
n=${BLACKTREE_JOB_ID##*-}
if (( n % every == 0 )); then ms=$long; else ms=$(( mean * (50 + n % 101) / 100 )); fi
printf -v fraction %03d $(( ms % 1000 ))
sleep "$(( ms / 1000 )).$fraction" 3>&-
note end
echo ok >&3
"#;

/// A `blacktree worker` with the exec executor on a fixed port, so that it can be
/// SIGKILLed and started again where it was.
pub struct ChaosWorker {
    pub id: String,
    pub args: Vec<String>,
    pub process: LoggedChild,
    /// Every process that served as this worker: its pid, and when it was SIGKILLed.
    pub incarnations: Vec<(u32, Option<SystemTime>)>,
    /// Logs of its killed incarnations (evidence for failures).
    pub old_logs: Vec<String>,
    pub steps: PathBuf,
    pub _work_dir: TempDir,
}

impl ChaosWorker {
    pub fn start(
        index: usize,
        orchestrator_ports: &[u16],
        dir: &Path,
        step_ms: u64,
    ) -> ChaosWorker {
        let id = format!("chaos-w{index}");
        let script = dir.join("step.sh");
        let steps = dir.join(format!("{id}.steps"));
        let work_dir = TempDir::new("chaos-worker");
        let command = format!(
            "exec bash '{}' \"$PPID\" '{}' {step_ms} {LONG_EVERY} {LONG_STEP_MS}",
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
            &orchestrator_ports
                .iter()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect::<Vec<_>>()
                .join(","),
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

    pub fn spawn(args: &[String]) -> LoggedChild {
        LoggedChild::spawn(args, &[" listening on port "]).0
    }

    /// Whether it has registered with `orchestrators` orchestrators.
    pub fn registered(&self, orchestrators: usize) -> bool {
        self.process
            .log()
            .matches("registered with the orchestrator")
            .count()
            >= orchestrators
    }

    /// Whether its current incarnation has a step running (started, not ended).
    pub fn running_a_step(&self) -> bool {
        self.running_steps().next().is_some()
    }

    /// Whether its current incarnation runs a long build now.
    pub fn running_a_long_build(&self) -> bool {
        self.running_steps().any(|job| is_long(&job))
    }

    /// The jobs of its current incarnation's running steps.
    fn running_steps(&self) -> impl Iterator<Item = String> {
        read_steps(&self.steps)
            .remove(&self.process.pid())
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.until().is_none())
            .map(|s| s.job)
    }

    pub fn kill(&mut self) {
        self.process.signal("KILL");
        self.process.wait_exit(LONG);
        self.incarnations.last_mut().unwrap().1 = Some(SystemTime::now());
        self.old_logs.push(self.process.log());
    }

    /// Starts it again on the same port, with the same id and steps file.
    pub fn restart(&mut self) {
        self.process = Self::spawn(&self.args);
        self.incarnations.push((self.process.pid(), None));
    }
}

/// The kinds of fault the test injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    KillWorker,
    FreezeWorker,
    CloseConnections,
    RestartBroker,
    KillOrchestrator,
    TermOrchestrator,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::KillWorker,
        FaultKind::FreezeWorker,
        FaultKind::CloseConnections,
        FaultKind::RestartBroker,
        FaultKind::KillOrchestrator,
        FaultKind::TermOrchestrator,
    ];
    /// The kinds injected again at random while jobs are still being published (the
    /// orchestrator is restarted once each way).
    pub const REPEATABLE: [FaultKind; 4] = [
        FaultKind::KillWorker,
        FaultKind::FreezeWorker,
        FaultKind::CloseConnections,
        FaultKind::RestartBroker,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FaultKind::KillWorker => "worker SIGKILL+restart",
            FaultKind::FreezeWorker => "worker SIGSTOP/SIGCONT",
            FaultKind::CloseConnections => "close_all_connections",
            FaultKind::RestartBroker => "broker stop_app/start_app",
            FaultKind::KillOrchestrator => "orchestrator SIGKILL+restart",
            FaultKind::TermOrchestrator => "orchestrator SIGTERM+restart",
        }
    }

    /// Whether the orchestrator process is replaced (its unacked deliveries go to the
    /// next one, which adopts the builds still running).
    pub fn restarts_orchestrator(self) -> bool {
        matches!(
            self,
            FaultKind::KillOrchestrator | FaultKind::TermOrchestrator
        )
    }

    /// Whether the orchestrator's broker connection is lost (without the orchestrator).
    pub fn cuts_broker(self) -> bool {
        matches!(self, FaultKind::CloseConnections | FaultKind::RestartBroker)
    }

    /// Whether it makes the jobs running on one worker end as `worker_lost`.
    pub fn loses_worker(self) -> bool {
        matches!(self, FaultKind::KillWorker | FaultKind::FreezeWorker)
    }
}

/// A fault as it was injected.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    /// The worker it hit, for worker faults (the node, for a broker node stop).
    pub worker: Option<String>,
    pub began: SystemTime,
    pub ended: SystemTime,
    /// For orchestrator restarts: whether a long build was running when it went.
    pub hit_long_build: bool,
}

impl Fault {
    /// Whether `at` falls within the fault, widened by `before` and `after`.
    pub fn around(&self, at: SystemTime, before: Duration, after: Duration) -> bool {
        at + before >= self.began && at <= self.ended + after
    }
}

/// What runs: broker nodes (three form one cluster), orchestrators (each given every
/// node's URL, starting with a node of its own), and the queue type.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub nodes: usize,
    pub orchestrators: usize,
    pub quorum: bool,
}

impl Shape {
    pub const SINGLE: Shape = Shape {
        nodes: 1,
        orchestrators: 1,
        quorum: false,
    };
    pub const CLUSTER: Shape = Shape {
        nodes: 3,
        orchestrators: 2,
        quorum: true,
    };

    /// The faults injected once each, in a random order: on the cluster, the node the
    /// first orchestrator uses stopped and started, the second orchestrator SIGKILLed,
    /// every connection closed.
    pub fn faults(self) -> Vec<FaultKind> {
        if self.orchestrators > 1 {
            vec![
                FaultKind::RestartBroker,
                FaultKind::KillOrchestrator,
                FaultKind::CloseConnections,
            ]
        } else {
            FaultKind::ALL.to_vec()
        }
    }

    /// The faults injected again at random while jobs are still being published.
    pub fn repeatable(self) -> &'static [FaultKind] {
        if self.orchestrators > 1 {
            &[FaultKind::CloseConnections, FaultKind::RestartBroker]
        } else {
            &FaultKind::REPEATABLE
        }
    }
}

/// One orchestrator under test and what it left behind.
pub struct Member {
    pub process: Orchestrator,
    pub grpc_port: u16,
    /// Its `--amqp-url`: every node, starting with one of its own.
    pub urls: String,
    /// Its `--state-file`, kept across its restarts (as systemd's `StateDirectory=`
    /// keeps it): the workers it knew are known again at once.
    pub state_file: PathBuf,
    /// Logs of its killed processes (evidence for failures).
    pub old_logs: Vec<String>,
    /// Idle RSS (KiB) of each of its processes right after it started.
    pub baselines: Vec<u64>,
}

/// The broker nodes, the orchestrators and the workers under test.
pub struct Cluster {
    pub shape: Shape,
    pub orchestrators: Vec<Member>,
    pub workers: Vec<ChaosWorker>,
    pub names: Names,
    /// Declared the test's queues; deletes them when dropped.
    pub _topology: Mq,
    /// Last: stopping the nodes ends everything.
    pub nodes: Vec<PrivateBroker>,
}

impl Cluster {
    /// Starts the broker nodes, the orchestrators and the workers; returns once every
    /// worker has registered with every orchestrator, with their idle baselines measured.
    pub fn start(shape: Shape, dir: &Path, step_ms: u64) -> Cluster {
        std::fs::write(dir.join("step.sh"), STEP_SCRIPT).unwrap();
        let nodes = match shape.nodes {
            1 => vec![PrivateBroker::start()],
            _ => BrokerCluster::start().nodes,
        };
        let names = Names::unique("chaos");
        let topology = match shape.quorum {
            true => Mq::on_quorum(&nodes[0], &names),
            false => Mq::connect(&nodes[0].url(), &names),
        };
        let orchestrators: Vec<Member> = (0..shape.orchestrators)
            .map(|i| {
                let urls = node_urls(&nodes, i);
                let grpc_port = free_port();
                let state_file = dir.join(format!("orchestrator-{i}.json"));
                let process = start_orchestrator(&urls, &names, grpc_port, shape, &state_file);
                Member {
                    state_file,
                    baselines: vec![rss_kib(process.process.pid())],
                    process,
                    grpc_port,
                    urls,
                    old_logs: Vec::new(),
                }
            })
            .collect();
        let ports: Vec<u16> = orchestrators.iter().map(|o| o.grpc_port).collect();
        let workers: Vec<ChaosWorker> = (0..WORKERS)
            .map(|i| ChaosWorker::start(i, &ports, dir, step_ms))
            .collect();
        for worker in &workers {
            poll(LONG, &format!("{} to register", worker.id), || {
                worker.registered(ports.len()).then_some(())
            });
        }
        Cluster {
            shape,
            orchestrators,
            workers,
            names,
            _topology: topology,
            nodes,
        }
    }

    /// A connection of the test's to read statuses (on the last node, never stopped
    /// while it reads), declaring nothing on the cluster.
    pub fn reader(&self) -> Mq {
        let node = self.nodes.last().unwrap();
        match self.shape.quorum {
            true => Mq::without_declaring(&node.url(), &self.names),
            false => Mq::connect(&node.url(), &self.names),
        }
    }

    /// The node orchestrator `index` is connected to, as its `/healthz` names it.
    pub fn node_used_by(&self, index: usize) -> usize {
        let metrics = self.orchestrators[index].process.metrics_port;
        poll(LONG, "the orchestrator to name its broker node", || {
            let (_, body) = http(metrics, "/healthz");
            let url = body.lines().find_map(|l| l.strip_prefix("broker: "))?;
            self.nodes
                .iter()
                .position(|n| url.contains(&format!(":{}/", n.port)))
        })
    }

    /// Injects one fault; returns once it is over (the process restarted, the worker
    /// thawed, the broker accepting connections again).
    pub fn inject(&mut self, kind: FaultKind, rng: &mut Rng) -> Fault {
        let mut began = SystemTime::now();
        let mut worker = None;
        let mut hit_long_build = false;
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
            FaultKind::CloseConnections => {
                // On a cluster, every node's connections are listed and closed.
                for node in &self.nodes {
                    node.ctl(&["close_all_connections", "chaos test: connections cut"]);
                }
            }
            FaultKind::RestartBroker => {
                let node = &self.nodes[self.node_used_by(0)];
                began = SystemTime::now();
                node.ctl(&["stop_app"]);
                std::thread::sleep(rng.millis(BROKER_DOWN));
                node.ctl(&["start_app"]);
                let url = node.url();
                poll(LONG, "the broker to accept connections again", || {
                    Connection::insecure_open(&url).ok().map(|c| {
                        let _ = c.close();
                    })
                });
                worker = Some(node.node.clone());
            }
            FaultKind::KillOrchestrator | FaultKind::TermOrchestrator => {
                // Aimed at a long build, so that a build outlives its orchestrator.
                hit_long_build = poll_until(LONG_BUILD_WAIT, || {
                    self.workers.iter().any(ChaosWorker::running_a_long_build)
                });
                began = SystemTime::now();
                let signal = if kind == FaultKind::KillOrchestrator {
                    "KILL"
                } else {
                    "TERM"
                };
                let victim = self.orchestrators.len() - 1;
                self.restart_orchestrator(victim, signal, rng);
            }
        }
        Fault {
            kind,
            worker,
            began,
            ended: SystemTime::now(),
            hit_long_build,
        }
    }

    /// A worker for a worker fault: one running a step if any (so the fault hits a job),
    /// chosen at random.
    pub fn pick_victim(&self, rng: &mut Rng) -> usize {
        let busy: Vec<usize> = (0..WORKERS)
            .filter(|&i| self.workers[i].running_a_step())
            .collect();
        match busy.len() {
            0 => rng.below(WORKERS),
            n => busy[rng.below(n)],
        }
    }

    /// Stops orchestrator `index` with `signal` (SIGTERM drains for `--drain-timeout`)
    /// and starts a new one on the same gRPC port (the workers register with it by
    /// themselves); measures the new one's baseline.
    pub fn restart_orchestrator(&mut self, index: usize, signal: &str, rng: &mut Rng) {
        let member = &mut self.orchestrators[index];
        member.process.signal(signal);
        member.process.wait_exit(LONG);
        member.old_logs.push(member.process.log());
        std::thread::sleep(rng.millis(DOWNTIME));
        member.process = start_orchestrator(
            &member.urls,
            &self.names,
            member.grpc_port,
            self.shape,
            &member.state_file,
        );
        member.baselines.push(rss_kib(member.process.process.pid()));
    }

    /// Every orchestrator's logs, its killed processes' first.
    pub fn orchestrator_logs(&self) -> Vec<String> {
        self.orchestrators
            .iter()
            .flat_map(|o| o.old_logs.iter().cloned().chain([o.process.log()]))
            .collect()
    }

    /// The lines about `job_id` in every log, the killed processes' included.
    pub fn log_lines_about(&self, job_id: &str) -> Vec<String> {
        let needle = format!("job {job_id}:");
        let mut logs: Vec<(&str, String)> = self
            .orchestrator_logs()
            .into_iter()
            .map(|log| ("orchestrator", log))
            .collect();
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

/// Every node's URL, comma-separated, starting with node `first`.
fn node_urls(nodes: &[PrivateBroker], first: usize) -> String {
    let n = nodes.len();
    let urls: Vec<String> = (0..n).map(|i| nodes[(first + i) % n].url()).collect();
    urls.join(",")
}

/// An orchestrator of `shape` on `grpc_port`. On one node, health pings are fast, to
/// find killed and frozen workers within the fault's window. On the cluster, no worker
/// fault is injected, and three broker nodes share the two cores with everything else
/// (their `stop_app`/`start_app` take a core each for seconds): pings get the defaults'
/// timeout, so a ping delayed by that load does not make a live worker "lost".
pub fn start_orchestrator(
    urls: &str,
    names: &Names,
    grpc_port: u16,
    shape: Shape,
    state_file: &Path,
) -> Orchestrator {
    let listen = format!("127.0.0.1:{grpc_port}");
    let state_file = state_file.to_str().expect("a UTF-8 temp path");
    let threads = DISPATCH_THREADS.to_string();
    let prefetch = PREFETCH.to_string();
    let (interval, timeout) = match shape.orchestrators {
        1 => ("200ms", "300ms"),
        _ => ("500ms", "1s"),
    };
    let flags = [
        "--grpc-listen",
        &listen,
        "--dispatch-threads",
        &threads,
        "--prefetch",
        &prefetch,
        "--health-interval",
        interval,
        "--health-timeout",
        timeout,
        "--drain-timeout",
        "1s",
        "--adopt-wait",
        ADOPT_WAIT,
        "--queue-type",
        if shape.quorum { "quorum" } else { "classic" },
        "--state-file",
        state_file,
    ];
    Orchestrator::start(urls, names, &flags)
}

/// Injects faults at random moments: every kind once, in a random order, then more
/// (the orchestrator aside) while jobs are still being published.
pub fn run_faults(
    cluster: &mut Cluster,
    rng: &mut Rng,
    publisher: &JoinHandle<Published>,
) -> Vec<Fault> {
    let mut plan = cluster.shape.faults();
    rng.shuffle(&mut plan);
    let repeatable = cluster.shape.repeatable();
    let mut faults = Vec::new();
    loop {
        // The workload between two faults (not a synchronisation).
        std::thread::sleep(rng.millis(FAULT_GAP));
        let kind = match plan.pop() {
            Some(kind) => kind,
            None if !publisher.is_finished() => repeatable[rng.below(repeatable.len())],
            None => break,
        };
        let fault = cluster.inject(kind, rng);
        let took = fault.ended.duration_since(fault.began).unwrap_or_default();
        println!(
            "chaos: {} {} ({} ms){}",
            kind.label(),
            fault.worker.as_deref().unwrap_or(""),
            took.as_millis(),
            if fault.hit_long_build {
                ", during a long build"
            } else {
                ""
            }
        );
        faults.push(fault);
    }
    faults
}

/// Whether job `job` is a long build (see [`STEP_SCRIPT`]).
pub fn is_long(job: &str) -> bool {
    job.rsplit('-')
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n % LONG_EVERY == 0)
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
fn poll_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
