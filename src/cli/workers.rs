//! `blacktree workers`: the orchestrator's workers (`ListWorkers`), and `workers drain
//! ID` / `workers resume ID` (`DrainWorker`, which the orchestrator relays to the
//! worker: it takes no new job from any orchestrator until resumed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, RpcStatusCode};
use serde_json::Value;

use super::tools::{CliError, EXIT_UNREACHABLE};
use crate::config::{read_secret_file, TlsArgs};
use crate::grpc::{self, Tls};
use crate::orchestrator::registry::WorkerView;
use crate::proto::worker::{DrainWorkerRequest, ListWorkersRequest};
use crate::proto::worker_grpc::WorkerServiceClient;

/// `blacktree workers [drain|resume ID]`.
#[derive(Args, Debug)]
pub struct WorkersArgs {
    /// `drain`: the worker takes no new job (from any orchestrator) and finishes what
    /// runs; `resume`: it takes jobs again. Without one, the workers are listed.
    #[arg(value_parser = ["drain", "resume"], requires = "id")]
    action: Option<String>,
    /// The worker to drain or resume.
    id: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// The orchestrator's gRPC address.
    #[arg(long, env = "BLACKTREE_ORCHESTRATOR", default_value = "127.0.0.1:5051",
          value_parser = crate::config::parse_host_port)]
    orchestrator: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// File holding the orchestrator's registration token, when it requires one.
    #[arg(long, env = "BLACKTREE_REGISTRATION_TOKEN_FILE")]
    registration_token_file: Option<PathBuf>,
}

/// Lists the orchestrator's workers, or drains or resumes one.
pub fn workers(args: WorkersArgs) -> Result<(), CliError> {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let tls = Tls::load(&args.tls).map_err(CliError::failed)?;
    let channel = grpc::connect(ChannelBuilder::new(env), &args.orchestrator, tls.as_ref());
    let client = WorkerServiceClient::new(channel);
    let token = read_secret_file(
        args.registration_token_file.as_deref(),
        "registration token",
    )
    .map_err(CliError::failed)?;
    // Draining waits for the worker's answer too.
    let options = grpc::with_token(
        CallOption::default().timeout(Duration::from_secs(10)),
        token.as_ref(),
    );
    if let (Some(action), Some(id)) = (&args.action, &args.id) {
        return drain(&client, options, &args.orchestrator, action == "drain", id);
    }
    let answer = client
        .list_workers_opt(&ListWorkersRequest::default(), options)
        .map_err(|e| orchestrator_error(&args.orchestrator, e))?;
    let views: Vec<WorkerView> = answer.workers.iter().map(WorkerView::from_proto).collect();
    if args.json {
        println!(
            "{}",
            Value::Array(views.iter().map(WorkerView::to_json).collect())
        );
        return Ok(());
    }
    println!(
        "{:<24} {:<22} {:<24} {:>8} {:>9} {:>10}  LABELS",
        "ID", "ADDRESS", "STATE", "CAPACITY", "IN FLIGHT", "LAST PING"
    );
    for w in &views {
        let last = w
            .last_ping
            .map_or("never".to_string(), |d| format!("{}ms ago", d.as_millis()));
        let note = if w.safe_to_stop() {
            "  (nothing runs: safe to stop)"
        } else {
            ""
        };
        println!(
            "{:<24} {:<22} {:<24} {:>8} {:>9} {:>10}  {}{note}",
            w.id,
            w.addr,
            w.state_text(),
            w.capacity,
            w.in_flight,
            last,
            w.labels
        );
    }
    Ok(())
}

/// Drains (or resumes) worker `id` through the orchestrator.
fn drain(
    client: &WorkerServiceClient,
    options: CallOption,
    addr: &str,
    drain: bool,
    id: &str,
) -> Result<(), CliError> {
    let request = DrainWorkerRequest {
        id: id.to_string(),
        drain,
        ..DrainWorkerRequest::default()
    };
    let answer = client
        .drain_worker_opt(&request, options)
        .map_err(|e| match e {
            grpcio::Error::RpcFailure(s)
                if matches!(
                    s.code(),
                    RpcStatusCode::NOT_FOUND | RpcStatusCode::FAILED_PRECONDITION
                ) =>
            {
                CliError::failed(s.message().to_string())
            }
            e => orchestrator_error(addr, e),
        })?;
    if !drain {
        println!("worker {id}: back in rotation");
    } else if answer.running == 0 {
        println!("worker {id}: draining; nothing runs: safe to stop");
    } else {
        println!(
            "worker {id}: draining; {} still running (`blacktree workers` says when it is safe to stop)",
            crate::plural::count(answer.running as usize, "job")
        );
    }
    Ok(())
}

/// A failed call to the orchestrator: refused (wrong token) or unreachable.
fn orchestrator_error(addr: &str, e: grpcio::Error) -> CliError {
    match e {
        grpcio::Error::RpcFailure(s) if s.code() == RpcStatusCode::UNAUTHENTICATED => {
            CliError::failed(format!(
                "the orchestrator at {addr} refused the call: {} (set --registration-token-file)",
                s.message()
            ))
        }
        grpcio::Error::RpcFailure(s) if s.code() == RpcStatusCode::UNIMPLEMENTED => {
            CliError::failed(format!(
                "{addr} is not a Blacktree orchestrator: it does not serve WorkerService \
                 (a worker's address? set --orchestrator to the orchestrator's gRPC address)"
            ))
        }
        e => CliError {
            code: EXIT_UNREACHABLE,
            message: format!(
                "cannot reach the orchestrator at {addr}: {e} (is it running? set --orchestrator or BLACKTREE_ORCHESTRATOR)"
            ),
        },
    }
}
