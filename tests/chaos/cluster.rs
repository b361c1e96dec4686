//! The system under test: a private broker node, an orchestrator, and `blacktree worker`s
//! with a step that records itself; and the faults injected into it.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use amiquip::Connection;

use crate::common::build_env::TempDir;
use crate::common::{
    free_port, poll, rss_kib, LoggedChild, Mq, Names, Orchestrator, PrivateBroker, Rng,
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
    pub fn start(index: usize, orchestrator_port: u16, dir: &Path, step_ms: u64) -> ChaosWorker {
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

    pub fn spawn(args: &[String]) -> LoggedChild {
        LoggedChild::spawn(args, &[" listening on port "]).0
    }

    /// Whether it has registered with the orchestrator.
    pub fn registered(&self) -> bool {
        self.process
            .log()
            .contains("registered with the orchestrator")
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
    /// The worker it hit, for worker faults.
    pub worker: Option<String>,
    pub began: SystemTime,
    pub ended: SystemTime,
    /// For orchestrator restarts: whether a long build was running when it went.
    pub hit_long_build: bool,
    /// For orchestrator restarts: when the old process had exited (until then, a
    /// worker's answer could still reach it).
    pub gone: Option<SystemTime>,
}

impl Fault {
    /// Whether `at` falls within the fault, widened by `before` and `after`.
    pub fn around(&self, at: SystemTime, before: Duration, after: Duration) -> bool {
        at + before >= self.began && at <= self.ended + after
    }
}

/// The broker node, the orchestrator and the workers under test.
pub struct Cluster {
    pub orchestrator: Orchestrator,
    /// Logs of the orchestrators killed so far (evidence for failures).
    pub old_logs: Vec<String>,
    pub workers: Vec<ChaosWorker>,
    /// Idle RSS (KiB) of each orchestrator process right after it started.
    pub baselines: Vec<u64>,
    pub grpc_port: u16,
    pub names: Names,
    /// Declared the test's queues; deletes them when dropped.
    pub _topology: Mq,
    /// Last: stopping the node ends everything.
    pub broker: PrivateBroker,
}

impl Cluster {
    /// Starts the broker node, the orchestrator and the workers; returns once every
    /// worker has registered, with the orchestrator's idle baseline measured.
    pub fn start(dir: &Path, step_ms: u64) -> Cluster {
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
    pub fn inject(&mut self, kind: FaultKind, rng: &mut Rng) -> Fault {
        let mut began = SystemTime::now();
        let mut worker = None;
        let mut hit_long_build = false;
        let mut gone = None;
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
                gone = Some(self.restart_orchestrator(signal, rng));
            }
        }
        Fault {
            kind,
            worker,
            began,
            ended: SystemTime::now(),
            hit_long_build,
            gone,
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

    /// Stops the orchestrator with `signal` (SIGTERM drains for `--drain-timeout`) and
    /// starts a new one on the same gRPC port (the workers register with it by
    /// themselves); measures the new one's baseline. Returns when the old one had
    /// exited.
    pub fn restart_orchestrator(&mut self, signal: &str, rng: &mut Rng) -> SystemTime {
        self.orchestrator.signal(signal);
        self.orchestrator.wait_exit(LONG);
        let gone = SystemTime::now();
        self.old_logs.push(self.orchestrator.log());
        std::thread::sleep(rng.millis(DOWNTIME));
        self.orchestrator = start_orchestrator(&self.broker, &self.names, self.grpc_port);
        self.baselines
            .push(rss_kib(self.orchestrator.process.pid()));
        gone
    }

    /// The lines about `job_id` in every log, the killed processes' included.
    pub fn log_lines_about(&self, job_id: &str) -> Vec<String> {
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

pub fn start_orchestrator(broker: &PrivateBroker, names: &Names, grpc_port: u16) -> Orchestrator {
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
        "--drain-timeout",
        "1s",
        "--adopt-wait",
        ADOPT_WAIT,
    ];
    Orchestrator::start(&broker.url(), names, &flags)
}

/// Injects faults at random moments: every kind once, in a random order, then more
/// (the orchestrator aside) while jobs are still being published.
pub fn run_faults(
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
