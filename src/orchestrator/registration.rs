//! The orchestrator's gRPC server: `WorkerService` (workers register, ask whether we
//! still know them, and `blacktree workers` lists them), with the registration-token
//! check, and `grpc.health.v1`.

use std::sync::Arc;
use std::time::Duration;

use grpcio::{Environment, RpcContext, RpcStatus, RpcStatusCode, Server, UnarySink};
use grpcio_health::create_health;
use log::{info, warn};

use super::registry::{Origin, Registry, Reported};
use crate::grpc::serving::{Serving, ORCHESTRATOR_SERVICE};
use crate::grpc::{admit, fail, reply, server_credentials, Tls};
use crate::job::{is_plain_id, Secret, MAX_JOB_ID_LEN};
use crate::labels::Labels;
use crate::proto::job::{PingRequest as JobPingRequest, SetDrainingRequest};
use crate::proto::worker::{
    DrainWorkerRequest, DrainWorkerResponse, ListWorkersRequest, ListWorkersResponse, PingRequest,
    PongResponse, RegisterAck, WorkerInfo,
};
use crate::proto::worker_grpc::{create_worker_service, WorkerService};

/// The running gRPC server of the orchestrator.
pub struct OrchestratorServer {
    /// Kept alive while the orchestrator runs; dropping it stops the server.
    _server: Server,
    /// grpc.health.v1 status: SERVING while connected to the broker, not blocked by it
    /// and not draining ([`CONNECTED`], [`UNBLOCKED`], [`RUNNING`]).
    pub health: Arc<Serving>,
    /// The port it listens on (useful with `:0`).
    pub port: u16,
}

/// What a registration must satisfy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The registration token every WorkerService call must carry, if one is configured.
    pub token: Option<Secret>,
    /// The largest capacity a worker may announce (`--max-worker-capacity`).
    pub max_capacity: u32,
    /// How long the address of an id being registered elsewhere has to answer a ping.
    pub ping_timeout: Duration,
}

/// A health condition: the consumer is connected to the broker.
pub const CONNECTED: &str = "connected to the broker";
/// A health condition: the broker does not block our publishing (no memory or disk
/// alarm).
pub const UNBLOCKED: &str = "not blocked by the broker";
/// A health condition: no drain started.
pub const RUNNING: &str = "not draining";

/// Starts the orchestrator's gRPC server on `listen`.
pub fn serve(
    env: Arc<Environment>,
    listen: &str,
    registry: Arc<Registry>,
    policy: Policy,
    tls: Option<&Tls>,
) -> Result<OrchestratorServer, String> {
    // No broker connection yet.
    let health = Arc::new(Serving::new(ORCHESTRATOR_SERVICE, &[CONNECTED]));
    let service = WorkerServiceImpl {
        registry,
        policy: Arc::new(policy),
    };
    let mut server = crate::grpc::server_builder(env)
        .register_service(create_worker_service(service))
        .register_service(create_health(health.service()))
        .build()
        .map_err(|e| format!("building the gRPC server: {e}"))?;
    crate::grpc::check_listen(listen, "--grpc-listen", "BLACKTREE_GRPC_LISTEN")?;
    let port = server
        .add_listening_port(listen, server_credentials(tls))
        .map_err(|e| format!("gRPC server cannot listen on {listen}: {e}"))?;
    server.start();
    Ok(OrchestratorServer {
        _server: server,
        health,
        port,
    })
}

/// `WorkerService`: workers register and ask whether we still know them.
#[derive(Clone)]
struct WorkerServiceImpl {
    registry: Arc<Registry>,
    policy: Arc<Policy>,
}

/// A registration that passed the checks.
struct Checked {
    id: String,
    addr: String,
    region: String,
    labels: Labels,
    capacity: u32,
    reported: Reported,
}

impl WorkerServiceImpl {
    /// Registers a checked worker; the answer to its call.
    fn accept(&self, peer: &str, worker: &Checked) -> Result<RegisterAck, RpcStatus> {
        let Checked {
            id,
            addr,
            region,
            labels,
            capacity,
            reported,
        } = worker;
        let Some(generation) =
            self.registry
                .register(id, addr, region, labels, *capacity, Origin::Registered)
        else {
            warn!("refused a registration from {peer}: the registry is full");
            return Err(RpcStatus::with_message(
                RpcStatusCode::RESOURCE_EXHAUSTED,
                "the orchestrator has as many workers as --max-workers allows".to_string(),
            ));
        };
        self.registry.report(id, reported.clone());
        info!(
            "worker {id} registered at {addr} (capacity {capacity}, region {region:?}, labels {{{labels}}}, generation {generation}{})",
            describe(reported)
        );
        Ok(RegisterAck {
            success: true,
            message: format!("registered {id} at {addr}"),
            ..RegisterAck::default()
        })
    }
}

impl WorkerService for WorkerServiceImpl {
    /// A new id, or an id registering again from its own address, is registered at once.
    /// An id registering from another address is refused while its current address
    /// still answers a ping as that id (a live worker's id cannot be taken over).
    fn register(&mut self, ctx: RpcContext, info: WorkerInfo, sink: UnarySink<RegisterAck>) {
        let Some(sink) = admit(&ctx, sink, self.policy.token.as_ref()) else {
            return;
        };
        let peer = ctx.peer();
        let worker = match checked_registration(&info, self.policy.max_capacity) {
            Ok(worker) => worker,
            Err(reason) => {
                warn!("refused a registration from {peer}: {reason}");
                let ack = RegisterAck {
                    message: reason,
                    ..RegisterAck::default()
                };
                return reply(&ctx, sink, ack);
            }
        };
        let current = self.registry.address_of(&worker.id);
        let ping = match current {
            Some((old, client)) if old != worker.addr => client
                .ping_async_opt(
                    &JobPingRequest::default(),
                    self.registry.call_options(self.policy.ping_timeout),
                )
                .ok()
                .map(|call| (old, call)),
            _ => None,
        };
        let Some((old, ping)) = ping else {
            return answer(&ctx, sink, self.accept(&peer, &worker));
        };
        let this = self.clone();
        ctx.spawn(async move {
            let alive = matches!(ping.await, Ok(pong) if pong.workerId == worker.id);
            let answer = if alive {
                warn!(
                    "refused a registration of worker {} at {} from {peer}: the worker at {old} still answers as {}",
                    worker.id, worker.addr, worker.id
                );
                Err(RpcStatus::with_message(
                    RpcStatusCode::ALREADY_EXISTS,
                    format!(
                        "worker id {} is in use by a live worker at {old}",
                        worker.id
                    ),
                ))
            } else {
                this.accept(&peer, &worker)
            };
            let sent = match answer {
                Ok(ack) => sink.success(ack).await,
                Err(status) => sink.fail(status).await,
            };
            if let Err(e) = sent {
                log::debug!("could not answer a registration: {e}");
            }
        });
    }

    fn ping(&mut self, ctx: RpcContext, req: PingRequest, sink: UnarySink<PongResponse>) {
        let Some(sink) = admit(&ctx, sink, self.policy.token.as_ref()) else {
            return;
        };
        let mut pong = PongResponse::new();
        pong.healthy = self.registry.is_registered(&req.id);
        if pong.healthy {
            match Reported::checked(&req.jobIds, &req.heldJobIds, self.policy.max_capacity) {
                Ok(reported) => self.registry.report(&req.id, reported),
                Err(reason) => warn!("worker {}: check-in report ignored: {reason}", req.id),
            }
        }
        reply(&ctx, sink, pong);
    }

    /// Relays `blacktree workers drain|resume` to the worker's `SetDraining` (with our
    /// token) and records its answer; the worker's own flag is the truth, so every
    /// orchestrator it checks in with sees it at its next ping.
    fn drain_worker(
        &mut self,
        ctx: RpcContext,
        req: DrainWorkerRequest,
        sink: UnarySink<DrainWorkerResponse>,
    ) {
        let Some(sink) = admit(&ctx, sink, self.policy.token.as_ref()) else {
            return;
        };
        let id = req.id;
        let Some((_, client)) = self.registry.address_of(&id) else {
            let status = RpcStatus::with_message(
                RpcStatusCode::NOT_FOUND,
                format!("no worker {id:?} is registered here"),
            );
            return fail(&ctx, sink, status);
        };
        let request = SetDrainingRequest {
            draining: req.drain,
            ..SetDrainingRequest::default()
        };
        let options = self.registry.call_options(self.policy.ping_timeout);
        let call = client.set_draining_async_opt(&request, options);
        let registry = self.registry.clone();
        ctx.spawn(async move {
            let answer = match call {
                Ok(call) => call.await,
                Err(e) => Err(e),
            };
            let sent = match answer {
                Ok(answer) => {
                    registry.set_draining(&id, answer.draining);
                    info!(
                        "worker {id}: {} by an operator ({} running)",
                        if answer.draining {
                            "drained"
                        } else {
                            "resumed"
                        },
                        answer.running
                    );
                    let reply = DrainWorkerResponse {
                        draining: answer.draining,
                        running: answer.running,
                        ..DrainWorkerResponse::default()
                    };
                    sink.success(reply).await
                }
                Err(grpcio::Error::RpcFailure(s)) if s.code() == RpcStatusCode::UNIMPLEMENTED => {
                    let why = format!(
                        "worker {id:?} cannot be drained: it does not serve SetDraining \
                         (an older or Go worker); stop sending it jobs by stopping it"
                    );
                    sink.fail(RpcStatus::with_message(
                        RpcStatusCode::FAILED_PRECONDITION,
                        why,
                    ))
                    .await
                }
                Err(e) => {
                    let why = format!("worker {id:?} did not answer: {e}");
                    sink.fail(RpcStatus::with_message(RpcStatusCode::UNAVAILABLE, why))
                        .await
                }
            };
            if let Err(e) = sent {
                log::debug!("could not answer a drain request: {e}");
            }
        });
    }

    fn list_workers(
        &mut self,
        ctx: RpcContext,
        _req: ListWorkersRequest,
        sink: UnarySink<ListWorkersResponse>,
    ) {
        let Some(sink) = admit(&ctx, sink, self.policy.token.as_ref()) else {
            return;
        };
        let workers = self
            .registry
            .list()
            .into_iter()
            .map(|w| w.to_proto())
            .collect();
        let answer = ListWorkersResponse {
            workers,
            ..ListWorkersResponse::default()
        };
        reply(&ctx, sink, answer);
    }
}

/// Sends a registration's answer.
fn answer(ctx: &RpcContext, sink: UnarySink<RegisterAck>, answer: Result<RegisterAck, RpcStatus>) {
    match answer {
        Ok(ack) => reply(ctx, sink, ack),
        Err(status) => fail(ctx, sink, status),
    }
}

/// The longest region a worker may announce, in characters.
const MAX_REGION_CHARS: usize = 64;

/// Checks a registration's fields. The reasons never quote a value that failed a check
/// (it could be megabytes, or control characters meant for a terminal).
fn checked_registration(info: &WorkerInfo, max_capacity: u32) -> Result<Checked, String> {
    let id = info.id.as_str();
    if !is_plain_id(id) {
        return Err(format!(
            "id must be 1 to {MAX_JOB_ID_LEN} bytes with no control characters"
        ));
    }
    if !is_host(&info.ip) {
        return Err(format!(
            "worker {id}: ip must be an IP address or a host name"
        ));
    }
    let port = u16::try_from(info.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("worker {id}: port {} is not a TCP port", info.port))?;
    let region = info.region.as_str();
    if region.chars().count() > MAX_REGION_CHARS || region.chars().any(char::is_control) {
        return Err(format!(
            "worker {id}: region must be at most {MAX_REGION_CHARS} printable characters"
        ));
    }
    let labels = Labels::new(info.labels.iter().map(|(k, v)| (k.clone(), v.clone())))
        .map_err(|reason| format!("worker {id}: {reason}"))?;
    let capacity = match info.capacity {
        0 => 1,
        c if c < 0 => return Err(format!("worker {id}: capacity {c} is negative")),
        c if c as u32 > max_capacity => {
            return Err(format!(
                "worker {id}: capacity {c} is above --max-worker-capacity {max_capacity}"
            ))
        }
        c => c as u32,
    };
    let host = if info.ip.contains(':') {
        format!("[{}]", info.ip)
    } else {
        info.ip.clone()
    };
    let reported = Reported::checked(&info.jobIds, &info.heldJobIds, capacity)
        .map_err(|reason| format!("worker {id}: {reason}"))?;
    Ok(Checked {
        id: id.to_string(),
        addr: format!("{host}:{port}"),
        region: region.to_string(),
        labels,
        capacity,
        reported,
    })
}

/// `, running […], holding […]` for a registration's log line, when it reports jobs
/// (their ids when there are a few, else how many).
fn describe(reported: &Reported) -> String {
    let mut text = String::new();
    for (what, ids) in [("running", &reported.running), ("holding", &reported.held)] {
        if ids.len() > 10 {
            text.push_str(&format!(", {what} {} jobs", ids.len()));
        } else if !ids.is_empty() {
            let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            ids.sort_unstable();
            text.push_str(&format!(", {what} {}", ids.join(" ")));
        }
    }
    text
}

/// An IP address, or a host name: at most 253 bytes of dot-separated labels of 1 to 63
/// letters, digits, `-` and `_`, not starting or ending with `-`.
fn is_host(text: &str) -> bool {
    if text.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, ip: &str, port: i32, capacity: i32) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            ip: ip.into(),
            port,
            capacity,
            ..WorkerInfo::default()
        }
    }

    fn checked(info: &WorkerInfo) -> Result<(String, u32), String> {
        checked_registration(info, 64).map(|c| (c.addr, c.capacity))
    }

    #[test]
    fn registrations_are_checked() {
        assert_eq!(
            checked(&info("w1", "10.0.0.2", 6000, 0)),
            Ok(("10.0.0.2:6000".into(), 1))
        );
        assert_eq!(
            checked(&info("w1", "::1", 6000, 3)),
            Ok(("[::1]:6000".into(), 3))
        );
        assert_eq!(
            checked(&info("w1", "build-3.eu_west.internal", 6000, 64)),
            Ok(("build-3.eu_west.internal:6000".into(), 64))
        );
        assert!(checked(&info("", "10.0.0.2", 6000, 0)).is_err());
        assert!(checked(&info(&"w".repeat(256), "10.0.0.2", 6000, 0)).is_err());
        assert!(checked(&info("w\u{1b}[2J", "10.0.0.2", 6000, 0)).is_err());
        assert!(checked(&info("w1", "", 6000, 0)).is_err());
        assert!(checked(&info("w1", "h", 70000, 0)).is_err());
        assert!(checked(&info("w1", "h", 0, 0)).is_err());
        assert!(checked(&info("w1", "h", 1, -1)).is_err());
        assert!(checked(&info("w1", "h", 1, 65)).is_err());
        for ip in [
            "a b",
            "h\n",
            "[::1]",
            "-.x",
            "x..y",
            &"h".repeat(64),
            "10.0.0.1:80",
        ] {
            assert!(checked(&info("w1", ip, 1, 1)).is_err(), "{ip:?}");
        }
        let mut long_region = info("w1", "h", 1, 1);
        long_region.region = "r".repeat(65);
        let reason = checked(&long_region).unwrap_err();
        assert!(!reason.contains("rrrr"), "{reason}");
    }
}
