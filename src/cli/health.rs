//! `blacktree healthcheck`, by grpc_health_probe's conventions: exit 0 when the target
//! answers SERVING, 1 when it answers anything else (or is not what was asked for: a
//! worker checked as an orchestrator, a server without grpc.health.v1), 4 when it
//! cannot be reached within `--timeout`; one line on stderr says why.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, RpcStatusCode};
use grpcio_health::proto::HealthCheckRequest;
use grpcio_health::{HealthClient, ServingStatus};

use super::tools::{CliError, EXIT_UNREACHABLE};
use crate::config::{parse_duration, TlsArgs};
use crate::grpc::serving::{ORCHESTRATOR_SERVICE, WORKER_SERVICE};
use crate::grpc::{self, Tls};

/// `blacktree healthcheck`.
#[derive(Args, Debug)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    target: HealthTarget,
    /// The health service to ask for (default: the role's, `blacktree.Orchestrator` or
    /// `blacktree.Worker`; `""` is the server's overall health).
    #[arg(long)]
    service: Option<String>,
    /// How long to wait for the answer (connecting included).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    tls: TlsArgs,
}

/// What `healthcheck` checks: exactly one target.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct HealthTarget {
    /// Check an orchestrator's gRPC health service (`HOST:PORT`).
    #[arg(long)]
    orchestrator: Option<String>,
    /// Check a worker's gRPC health service (`HOST:PORT`).
    #[arg(long)]
    worker: Option<String>,
    /// Check an orchestrator's HTTP health URL (e.g. `http://127.0.0.1:9464/healthz`).
    #[arg(long)]
    metrics: Option<String>,
}

/// A role that serves grpc.health.v1, and its named service.
struct Role {
    name: &'static str,
    /// The name with its article.
    a: &'static str,
    service: &'static str,
}

const ORCHESTRATOR: Role = Role {
    name: "orchestrator",
    a: "an orchestrator",
    service: ORCHESTRATOR_SERVICE,
};
const WORKER: Role = Role {
    name: "worker",
    a: "a worker",
    service: WORKER_SERVICE,
};

/// Exits 0 when the target reports SERVING; otherwise one line says why.
pub fn healthcheck(args: HealthcheckArgs) -> Result<(), CliError> {
    let target = &args.target;
    let (role, other, addr) = match (&target.orchestrator, &target.worker, &target.metrics) {
        (Some(addr), _, _) => (ORCHESTRATOR, WORKER, addr),
        (None, Some(addr), _) => (WORKER, ORCHESTRATOR, addr),
        (None, None, Some(url)) => return http_health(url, args.timeout),
        (None, None, None) => unreachable!("clap requires one target"),
    };
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let tls = Tls::load(&args.tls).map_err(CliError::failed)?;
    let client = HealthClient::new(grpc::connect(ChannelBuilder::new(env), addr, tls.as_ref()));
    let check = |service: &str| {
        let request = HealthCheckRequest {
            service: service.to_string(),
            ..HealthCheckRequest::default()
        };
        client.check_opt(&request, CallOption::default().timeout(args.timeout))
    };
    let who = format!("{} at {addr}", role.name);
    let service = args.service.as_deref().unwrap_or(role.service);
    let status = match check(service) {
        Ok(answer) => answer.status,
        Err(grpcio::Error::RpcFailure(failure)) => match failure.code() {
            // Not the role's service: the other role's, or an older Blacktree's.
            RpcStatusCode::NOT_FOUND if args.service.is_none() => {
                if check(other.service).is_ok() {
                    return Err(CliError::failed(format!(
                        "{addr} is {} of Blacktree's, not {}: use --{}",
                        other.a, role.a, other.name
                    )));
                }
                check("")
                    .map_err(|_| CliError::failed(format!("{who} has no health service")))?
                    .status
            }
            RpcStatusCode::NOT_FOUND => {
                return Err(CliError::failed(format!(
                    "{who} has no health service {service:?}"
                )))
            }
            RpcStatusCode::UNIMPLEMENTED => {
                return Err(CliError::failed(format!(
                    "{addr} is not {} of Blacktree's: it serves no grpc.health.v1",
                    role.a
                )))
            }
            _ => return Err(no_answer(&who, &failure.to_string(), args.timeout)),
        },
        Err(e) => return Err(no_answer(&who, &e.to_string(), args.timeout)),
    };
    if status == ServingStatus::Serving {
        println!("{who} is healthy");
        Ok(())
    } else {
        Err(CliError::failed(format!(
            "{who} is unhealthy: {}",
            match status {
                ServingStatus::NotServing => "NOT_SERVING",
                ServingStatus::ServiceUnknown => "SERVICE_UNKNOWN",
                _ => "UNKNOWN",
            }
        )))
    }
}

/// The error of a target that did not answer.
fn no_answer(who: &str, error: &str, timeout: Duration) -> CliError {
    CliError {
        code: EXIT_UNREACHABLE,
        message: format!(
            "cannot reach the {who} within {}: {error} (is it running there?)",
            humantime::format_duration(timeout)
        ),
    }
}

/// `GET url` over plain HTTP/1.0: healthy when the answer is 200.
fn http_health(url: &str, timeout: Duration) -> Result<(), CliError> {
    let unhealthy = |why: String| CliError::failed(format!("{url} is unhealthy: {why}"));
    let unreachable = |why: String| CliError {
        code: EXIT_UNREACHABLE,
        message: format!("cannot reach {url}: {why} (is the orchestrator running there?)"),
    };
    let parsed =
        url::Url::parse(url).map_err(|e| CliError::failed(format!("{url} is not a URL: {e}")))?;
    if parsed.scheme() != "http" {
        return Err(CliError::failed(format!(
            "{url}: only http:// is supported"
        )));
    }
    let host = parsed.host_str().unwrap_or("127.0.0.1");
    let addr = (host, parsed.port_or_known_default().unwrap_or(80))
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| unreachable("cannot resolve the host".into()))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let request = format!("GET {} HTTP/1.0\r\nHost: {host}\r\n\r\n", parsed.path());
    stream
        .write_all(request.as_bytes())
        .map_err(|e| unreachable(e.to_string()))?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status_line = answer.lines().next().unwrap_or("no answer");
    if status_line.split_whitespace().nth(1) == Some("200") {
        println!("{url} is healthy");
        Ok(())
    } else {
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        Err(unhealthy(format!(
            "{status_line} {}",
            body.replace('\n', "; ")
        )))
    }
}
