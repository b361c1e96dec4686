//! The `blacktree` command line: one binary, one subcommand per role. Exit codes: 0
//! success, 1 failure (or unhealthy), 2 bad usage, 3 another instance is running, 4 the
//! broker, the orchestrator or the checked target could not be reached.

pub mod health;
pub mod logging;
pub mod progress;
pub mod submit;
pub mod tools;
pub mod watch;
pub mod workers;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::agent;
use crate::config::{ExecutorKind, OrchestratorConfig, WorkerConfig};
use crate::lock;
use crate::orchestrator;
use tools::{CliError, EXIT_ALREADY_RUNNING, EXIT_FAILURE};

/// Blacktree: dispatches Docker build jobs from RabbitMQ to gRPC build workers.
#[derive(Parser, Debug)]
#[command(name = "blacktree", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: logging::LogArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume jobs from RabbitMQ, run them on workers, publish their statuses.
    Orchestrator(Box<OrchestratorConfig>),
    /// Serve JobService on a build host: clone, build and push images.
    Worker(WorkerConfig),
    /// Publish a job; prints its jobId.
    Submit(submit::SubmitArgs),
    /// Ask the orchestrator to cancel a job.
    Cancel(submit::CancelArgs),
    /// Print statuses (and events) as they are published.
    Watch(watch::WatchArgs),
    /// List the orchestrator's workers; `workers drain ID` / `workers resume ID` take one
    /// out of rotation and back.
    Workers(workers::WorkersArgs),
    /// Exit 0 when an orchestrator or worker is healthy.
    Healthcheck(health::HealthcheckArgs),
}

/// Parses the command line, runs the subcommand and turns its result into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log);
    let result = match cli.command {
        Command::Orchestrator(config) => {
            let listen = config.grpc_listen.clone();
            service("orchestrator", &listen, config.lock_file.clone(), || {
                orchestrator::run(*config)
            })
        }
        Command::Worker(config) => {
            if config.exec_command.is_some() && config.executor != ExecutorKind::Exec {
                Cli::command()
                    .error(
                        clap::error::ErrorKind::ArgumentConflict,
                        "--exec-command (BLACKTREE_EXEC_COMMAND) is only run by \
                         --executor exec (BLACKTREE_EXECUTOR); this worker would build \
                         with docker and ignore it",
                    )
                    .exit();
            }
            let listen = config.listen.clone();
            service("worker", &listen, config.lock_file.clone(), || {
                agent::run(config)
            })
        }
        Command::Submit(args) => submit::submit(args),
        Command::Cancel(args) => submit::cancel(args),
        Command::Watch(args) => watch::watch(args),
        Command::Workers(args) => workers::workers(args),
        Command::Healthcheck(args) => health::healthcheck(args),
    };
    logging::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blacktree: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

/// Runs a long-lived service under its single-instance lock.
fn service(
    role: &str,
    listen: &str,
    lock_file: Option<PathBuf>,
    run: impl FnOnce() -> Result<(), String>,
) -> Result<(), CliError> {
    let _lock = match lock_file.or_else(|| lock::default_path(role, listen)) {
        Some(path) => Some(lock::acquire(&path).map_err(|e| match e {
            lock::LockError::Held(path) => CliError {
                code: EXIT_ALREADY_RUNNING,
                message: format!(
                    "another {role} is already running (lock {} is held{}); not starting",
                    path.display(),
                    lock::holder(&path).map_or(String::new(), |pid| format!(" by pid {pid}"))
                ),
            },
            lock::LockError::Io(message) => CliError {
                code: EXIT_FAILURE,
                message,
            },
        })?),
        None => None,
    };
    run().map_err(|message| {
        log::error!("{message}");
        CliError {
            code: EXIT_FAILURE,
            message,
        }
    })
}
