//! The `blacktree` command line: one binary, one subcommand per role.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::agent;
use crate::config::{OrchestratorConfig, WorkerConfig};
use crate::orchestrator;

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
    Orchestrator(OrchestratorConfig),
    /// Serve JobService on a build host: clone, build and push images.
    Worker(WorkerConfig),
}

/// Parses the command line, runs the subcommand and turns its result into an exit code.
pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Orchestrator(config) => orchestrator::run(config),
        Command::Worker(config) => agent::run(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("blacktree: {e}");
            ExitCode::FAILURE
        }
    }
}
