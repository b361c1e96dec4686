//! The `blacktree` command line: one binary, one subcommand per role. Exit codes: 0
//! success, 1 failure (or unhealthy), 2 bad usage, 3 another instance is running, 4 the
//! broker or the orchestrator could not be reached.

pub mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::agent;
use crate::config::{OrchestratorConfig, WorkerConfig};
use crate::lock;
use crate::orchestrator;
use tools::{CliError, EXIT_ALREADY_RUNNING, EXIT_FAILURE};

/// Blacktree: dispatches Docker build jobs from RabbitMQ to gRPC build workers.
#[derive(Parser, Debug)]
#[command(name = "blacktree", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume jobs from RabbitMQ, run them on workers, publish their statuses.
    Orchestrator(Box<OrchestratorConfig>),
    /// Serve JobService on a build host: clone, build and push images.
    Worker(WorkerConfig),
    /// Publish a job; prints its jobId.
    Submit(tools::SubmitArgs),
    /// Ask the orchestrator to cancel a job.
    Cancel(tools::CancelArgs),
    /// Print statuses (and events) as they are published.
    Watch(tools::WatchArgs),
    /// List the orchestrator's workers.
    Workers(tools::WorkersArgs),
    /// Exit 0 when an orchestrator or worker is healthy.
    Healthcheck(tools::HealthcheckArgs),
}

/// Parses the command line, runs the subcommand and turns its result into an exit code.
pub fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Orchestrator(config) => {
            let listen = config.grpc_listen.clone();
            service("orchestrator", &listen, config.lock_file.clone(), || {
                orchestrator::run(*config)
            })
        }
        Command::Worker(config) => {
            let listen = config.listen.clone();
            service("worker", &listen, config.lock_file.clone(), || {
                agent::run(config)
            })
        }
        Command::Submit(args) => tools::submit(args),
        Command::Cancel(args) => tools::cancel(args),
        Command::Watch(args) => tools::watch(args),
        Command::Workers(args) => tools::workers(args),
        Command::Healthcheck(args) => tools::healthcheck(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blacktree: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

/// Logs to stderr (`RUST_LOG`, `info` by default); once an orchestrator knows its
/// instance id, every line carries it after the level.
fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            use std::io::Write;
            let timestamp = buf.timestamp();
            let level = record.level();
            let target = record.target();
            match crate::instance::in_logs() {
                Some(id) => writeln!(
                    buf,
                    "[{timestamp} {level:<5} {id} {target}] {}",
                    record.args()
                ),
                None => writeln!(buf, "[{timestamp} {level:<5} {target}] {}", record.args()),
            }
        })
        .init();
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
                    "another {role} is already running (lock {} is held); not starting",
                    path.display()
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
