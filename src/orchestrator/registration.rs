//! The orchestrator's gRPC server: `WorkerService` (workers register, ask whether we
//! still know them, and `blacktree workers` lists them), with the registration-token
//! check, and `grpc.health.v1`.

use std::sync::Arc;

use grpcio::{Environment, RpcContext, RpcStatus, RpcStatusCode, Server, ServerBuilder, UnarySink};
use grpcio_health::{create_health, HealthService, ServingStatus};
use log::{info, warn};

use super::registry::{Origin, Registry};
use crate::grpc::{authorized, reply, server_credentials, Tls};
use crate::job::Secret;
use crate::proto::worker::{
    ListWorkersRequest, ListWorkersResponse, PingRequest, PongResponse, RegisterAck, WorkerInfo,
};
use crate::proto::worker_grpc::{create_worker_service, WorkerService};

/// The running gRPC server of the orchestrator.
pub struct OrchestratorServer {
    /// Kept alive while the orchestrator runs; dropping it stops the server.
    _server: Server,
    /// grpc.health.v1 status, set to NOT_SERVING when draining.
    pub health: HealthService,
    /// The port it listens on (useful with `:0`).
    pub port: u16,
}

/// Starts the orchestrator's gRPC server on `listen`; with `token`, every WorkerService
/// call must carry it.
pub fn serve(
    env: Arc<Environment>,
    listen: &str,
    registry: Arc<Registry>,
    token: Option<Secret>,
    tls: Option<&Tls>,
) -> Result<OrchestratorServer, String> {
    let health = HealthService::default();
    health.set_serving_status("", ServingStatus::Serving);
    let mut server = ServerBuilder::new(env)
        .register_service(create_worker_service(WorkerServiceImpl { registry, token }))
        .register_service(create_health(health.clone()))
        .build()
        .map_err(|e| format!("building the gRPC server: {e}"))?;
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
    /// The registration token calls must carry, if one is configured.
    token: Option<Secret>,
}

impl WorkerServiceImpl {
    /// Refuses (UNAUTHENTICATED) a call without the right token; true when it may go on.
    fn admit<T: Send + 'static>(
        &self,
        ctx: &RpcContext,
        sink: UnarySink<T>,
    ) -> Option<UnarySink<T>> {
        match &self.token {
            Some(token) if !authorized(ctx, token) => {
                warn!(
                    "refused a {} call from {}: missing or wrong registration token",
                    String::from_utf8_lossy(ctx.method()),
                    ctx.peer()
                );
                let status = RpcStatus::with_message(
                    RpcStatusCode::UNAUTHENTICATED,
                    "missing or wrong registration token".to_string(),
                );
                ctx.spawn(async move {
                    let _ = sink.fail(status).await;
                });
                None
            }
            _ => Some(sink),
        }
    }
}

impl WorkerService for WorkerServiceImpl {
    fn register(&mut self, ctx: RpcContext, info: WorkerInfo, sink: UnarySink<RegisterAck>) {
        let Some(sink) = self.admit(&ctx, sink) else {
            return;
        };
        let mut ack = RegisterAck::new();
        match checked_registration(&info) {
            Ok((addr, capacity)) => {
                let generation = self.registry.register(
                    &info.id,
                    &addr,
                    &info.region,
                    capacity,
                    Origin::Registered,
                );
                info!(
                    "worker {} registered at {addr} (capacity {capacity}, region {:?}, generation {generation})",
                    info.id, info.region
                );
                ack.success = true;
                ack.message = format!("registered {} at {addr}", info.id);
            }
            Err(reason) => {
                warn!("refused a registration from {}: {reason}", ctx.peer());
                ack.message = reason;
            }
        }
        reply(&ctx, sink, ack);
    }

    fn ping(&mut self, ctx: RpcContext, req: PingRequest, sink: UnarySink<PongResponse>) {
        let Some(sink) = self.admit(&ctx, sink) else {
            return;
        };
        let mut pong = PongResponse::new();
        pong.healthy = self.registry.is_registered(&req.id);
        reply(&ctx, sink, pong);
    }

    fn list_workers(
        &mut self,
        ctx: RpcContext,
        _req: ListWorkersRequest,
        sink: UnarySink<ListWorkersResponse>,
    ) {
        let Some(sink) = self.admit(&ctx, sink) else {
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

/// Checks a registration; returns the worker's `HOST:PORT` and capacity.
fn checked_registration(info: &WorkerInfo) -> Result<(String, u32), String> {
    let id = info.id.as_str();
    if id.trim().is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err("id must be 1 to 256 printable characters".to_string());
    }
    if info.ip.trim().is_empty() {
        return Err(format!("worker {id}: ip is empty"));
    }
    let port = u16::try_from(info.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("worker {id}: port {} is not a TCP port", info.port))?;
    let capacity = match info.capacity {
        0 => 1,
        c if c > 0 => c as u32,
        c => return Err(format!("worker {id}: capacity {c} is negative")),
    };
    let host = if info.ip.contains(':') && !info.ip.starts_with('[') {
        format!("[{}]", info.ip)
    } else {
        info.ip.clone()
    };
    Ok((format!("{host}:{port}"), capacity))
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

    #[test]
    fn registrations_are_checked() {
        assert_eq!(
            checked_registration(&info("w1", "10.0.0.2", 6000, 0)),
            Ok(("10.0.0.2:6000".into(), 1))
        );
        assert_eq!(
            checked_registration(&info("w1", "::1", 6000, 3)),
            Ok(("[::1]:6000".into(), 3))
        );
        assert!(checked_registration(&info("", "10.0.0.2", 6000, 0)).is_err());
        assert!(checked_registration(&info("w1", "", 6000, 0)).is_err());
        assert!(checked_registration(&info("w1", "h", 70000, 0)).is_err());
        assert!(checked_registration(&info("w1", "h", 0, 0)).is_err());
        assert!(checked_registration(&info("w1", "h", 1, -1)).is_err());
    }
}
