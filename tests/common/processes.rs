//! The `blacktree` binary as a child process of the test: its log collected, its
//! announced ports read, signals sent; the orchestrator started the way tests need it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{poll, Behaviour, Names, TestWorker, TOKEN};

/// The `blacktree` binary to run: this build's, or `BLACKTREE_BIN` (an A/B benchmark
/// runs an older build's binary under the same harness).
pub fn binary() -> String {
    std::env::var("BLACKTREE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_blacktree").to_string())
}

/// A command running the `blacktree` binary. An orchestrator it starts remembers its
/// workers in a state file of its own (never the default one, which would carry workers
/// from test to test), unless the test names one.
pub fn command() -> Command {
    let mut command = Command::new(binary());
    command.env("BLACKTREE_STATE_FILE", own_state_file());
    command
}

/// A state file path no other orchestrator uses.
pub fn own_state_file() -> String {
    let dir = std::env::temp_dir().join("blacktree-test-state");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}.json", uuid::Uuid::new_v4().simple()));
    file.to_str().unwrap().to_string()
}

/// Runs `blacktree args…` to its end (a one-shot command: submit, workers, healthcheck…).
pub fn blacktree(args: &[&str]) -> std::process::Output {
    command()
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running blacktree")
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `blacktree` child process whose stderr is collected; killed on drop.
pub struct LoggedChild {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl LoggedChild {
    /// Spawns `blacktree args…` and waits until it has logged each of `announces`
    /// (lines like "… listening on port N"); returns the announced ports in that order.
    pub fn spawn(args: &[String], announces: &[&'static str]) -> (LoggedChild, Vec<u16>) {
        Self::spawn_with_env(args, &[], announces)
    }

    /// [`LoggedChild::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        args: &[String],
        env: &[(String, String)],
        announces: &[&'static str],
    ) -> (LoggedChild, Vec<u16>) {
        let mut blacktree = command();
        blacktree
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info");
        Self::spawn_command(blacktree, announces)
    }

    /// Spawns `command` (any program; its stdout is dropped, its stderr collected) and
    /// waits as [`LoggedChild::spawn`] does.
    pub fn spawn_command(
        mut command: Command,
        announces: &[&'static str],
    ) -> (LoggedChild, Vec<u16>) {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let (port_tx, port_rx) = crossbeam_channel::unbounded();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let wanted = announces.to_vec();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                for (i, announce) in wanted.iter().enumerate() {
                    if let Some(rest) = line.split(announce).nth(1) {
                        let port: u16 = rest.split_whitespace().next().unwrap().parse().unwrap();
                        let _ = port_tx.send((i, port));
                    }
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        // Owned before the wait: a process that never announces is killed with the
        // panic below, not left running after the test.
        let logged = LoggedChild { child, log };
        let mut ports = vec![0u16; announces.len()];
        for _ in announces {
            let (i, port) = port_rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| {
                    panic!(
                        "{command:?} did not announce {announces:?}; it logged:\n{}",
                        logged.log()
                    )
                });
            ports[i] = port;
        }
        (logged, ports)
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until its log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(text) {
                return;
            }
            if std::time::Instant::now() >= deadline {
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "timed out after {timeout:?} waiting for log line {text:?}; its last lines:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let status = poll(timeout, "process exit", || self.child.try_wait().unwrap());
        status.code()
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `blacktree orchestrator` binary running as a child process.
pub struct Orchestrator {
    pub process: LoggedChild,
    pub grpc_port: u16,
    pub metrics_port: u16,
    /// Its command line and extra environment, for [`Orchestrator::restart`].
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Orchestrator {
    /// Starts an orchestrator for `names` on `url` with fast health settings and `extra`
    /// flags; waits until its gRPC server listens and it is connected to the broker.
    pub fn start(url: &str, names: &Names, extra: &[&str]) -> Orchestrator {
        Self::start_with_env(url, names, extra, &[])
    }

    /// [`Orchestrator::start`] with extra environment variables.
    pub fn start_with_env(
        url: &str,
        names: &Names,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Orchestrator {
        let mut args = vec!["orchestrator".to_string(), "--amqp-url".into(), url.into()];
        args.extend(names.args());
        // Fast health settings and ephemeral ports, unless the test sets them itself.
        let defaults = [
            ("--health-interval", "200ms"),
            ("--health-timeout", "300ms"),
            ("--dispatch-threads", "16"),
            ("--grpc-listen", "127.0.0.1:0"),
            ("--metrics-listen", "127.0.0.1:0"),
        ];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Self::spawn(args, env.collect())
    }

    /// A new orchestrator with the same command line, to start once this one exited. A
    /// `--state-file` among its flags is kept; without one, it gets a fresh state file
    /// (it knows no worker).
    pub fn restart(&self) -> Orchestrator {
        Self::spawn(self.args.clone(), self.env.clone())
    }

    fn spawn(args: Vec<String>, env: Vec<(String, String)>) -> Orchestrator {
        let announces = [
            "gRPC server listening on port ",
            "metrics listening on port ",
        ];
        let (process, ports) = LoggedChild::spawn_with_env(&args, &env, &announces);
        let orchestrator = Orchestrator {
            process,
            grpc_port: ports[0],
            metrics_port: ports[1],
            args,
            env,
        };
        orchestrator.wait_for_log("broker: connected", Duration::from_secs(30));
        orchestrator
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits until its log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        self.process.wait_for_log(text, timeout)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal)
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.process.wait_exit(timeout)
    }

    /// Starts a test worker and registers it here.
    pub fn worker(&self, id: &str, behaviour: Behaviour) -> TestWorker {
        let worker = TestWorker::start(id, 0, behaviour);
        worker.register(self.grpc_port);
        worker
    }

    /// Asserts that the test token never reached its log.
    pub fn assert_no_secret_logged(&self) {
        let log = self.log();
        assert!(
            !log.contains(TOKEN),
            "the token reached the orchestrator's log:\n{log}"
        );
    }
}
