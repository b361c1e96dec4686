//! gRPC plumbing: the orchestrator's server (`WorkerService` and `grpc.health.v1`),
//! clients of the workers' `JobService`, and a runtime-free way to wait for a call.
//!
//! grpcio completes calls on its own completion-queue threads; [`wait`] parks the
//! calling thread until the call's future is ready or its [`CancelToken`] fires, so a
//! dispatch thread can block on `RunJob` and still be cancelled from another thread.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::Duration;

use grpcio::{
    CallOption, CertificateRequestType, Channel, ChannelBuilder, ChannelCredentialsBuilder,
    ClientUnaryReceiver, Environment, MetadataBuilder, RpcContext, RpcStatus, RpcStatusCode,
    Server, ServerBuilder, ServerCredentials, ServerCredentialsBuilder, UnarySink,
};
use grpcio_health::{create_health, HealthService, ServingStatus};
use log::{debug, info, warn};

use crate::config::TlsArgs;
use crate::job::Secret;
use crate::proto::job_grpc::JobServiceClient;
use crate::proto::worker::{
    ListWorkersRequest, ListWorkersResponse, PingRequest, PongResponse, RegisterAck, WorkerInfo,
    WorkerState,
};
use crate::proto::worker_grpc::{create_worker_service, WorkerService};
use crate::workers::Registry;

/// Largest message accepted from a worker (build logs can be large).
const MAX_MESSAGE_BYTES: i32 = 64 * 1024 * 1024;

/// Mutual TLS material, loaded from the `--tls-*` files.
#[derive(Clone)]
pub struct Tls {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

impl Tls {
    /// Reads the files; `None` when TLS is not configured.
    pub fn load(args: &TlsArgs) -> Result<Option<Tls>, String> {
        let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_ca)
        else {
            return Ok(None);
        };
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| format!("reading the TLS {what} {}: {e}", path.display()))
        };
        Ok(Some(Tls {
            cert: read(cert, "certificate")?,
            key: read(key, "key")?,
            ca: read(ca, "CA certificate")?,
        }))
    }
}

/// Server credentials: mutual TLS (peers must present a certificate of our CA) or
/// plaintext.
pub fn server_credentials(tls: Option<&Tls>) -> ServerCredentials {
    match tls {
        Some(tls) => ServerCredentialsBuilder::new()
            .root_cert(
                tls.ca.clone(),
                CertificateRequestType::RequestAndRequireClientCertificateAndVerify,
            )
            .add_cert(tls.cert.clone(), tls.key.clone())
            .build(),
        None => ServerCredentials::insecure(),
    }
}

/// A (lazily connecting) channel to `addr`, over mutual TLS when configured.
pub fn connect(builder: ChannelBuilder, addr: &str, tls: Option<&Tls>) -> Channel {
    match tls {
        Some(tls) => {
            let credentials = ChannelCredentialsBuilder::new()
                .root_cert(tls.ca.clone())
                .cert(tls.cert.clone(), tls.key.clone())
                .build();
            builder.set_credentials(credentials).connect(addr)
        }
        None => builder.connect(addr),
    }
}

/// Opens a (lazily connecting) client of the `JobService` at `addr`.
pub fn job_client(env: Arc<Environment>, addr: &str, tls: Option<&Tls>) -> JobServiceClient {
    let builder = ChannelBuilder::new(env)
        // A worker back from a restart is reachable again within a health round or two.
        .initial_reconnect_backoff(Duration::from_millis(200))
        .max_reconnect_backoff(Duration::from_secs(2))
        .max_receive_message_len(MAX_MESSAGE_BYTES)
        .max_send_message_len(MAX_MESSAGE_BYTES);
    JobServiceClient::new(connect(builder, addr, tls))
}

/// Why the orchestrator stopped a job's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The worker stopped answering health pings while running the call.
    WorkerLost,
    /// The control plane cancelled the job.
    Cancelled,
}

/// Stops a job from another thread: a thread blocked in [`block_on`] with this token
/// wakes up, and [`CancelToken::fired`] becomes ready for `select!`.
#[derive(Clone)]
pub struct CancelToken(Arc<TokenInner>);

struct TokenInner {
    state: Mutex<TokenState>,
    fired: crossbeam_channel::Receiver<()>,
}

struct TokenState {
    reason: Option<CancelReason>,
    /// Dropped on cancel, which disconnects `fired`.
    fire: Option<crossbeam_channel::Sender<()>>,
    /// The thread waiting in `block_on`, to unpark.
    waiter: Option<Thread>,
}

impl Default for CancelToken {
    fn default() -> CancelToken {
        let (fire, fired) = crossbeam_channel::bounded(0);
        CancelToken(Arc::new(TokenInner {
            state: Mutex::new(TokenState {
                reason: None,
                fire: Some(fire),
                waiter: None,
            }),
            fired,
        }))
    }
}

impl CancelToken {
    fn state(&self) -> std::sync::MutexGuard<'_, TokenState> {
        self.0.state.lock().expect("cancel token lock")
    }

    /// Cancels (the first reason wins; returns whether this call was first) and wakes
    /// the waiter.
    pub fn cancel(&self, reason: CancelReason) -> bool {
        let mut state = self.state();
        if state.reason.is_some() {
            return false;
        }
        state.reason = Some(reason);
        state.fire = None;
        if let Some(waiter) = &state.waiter {
            waiter.unpark();
        }
        true
    }

    /// The reason it was cancelled, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        self.state().reason
    }

    /// Ready (disconnected) once cancelled: select on it while waiting for something else.
    pub fn fired(&self) -> &crossbeam_channel::Receiver<()> {
        &self.0.fired
    }
}

/// How a call ended without an answer.
#[derive(Debug)]
pub enum CallError {
    /// gRPC failed the call (status, connection, codec).
    Grpc(grpcio::Error),
    /// The orchestrator cancelled it.
    Cancelled(CancelReason),
}

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Blocks the current thread until `future` (a grpcio future, which grpcio's own threads
/// complete) is ready, or `token` (made on this thread) is cancelled.
pub fn block_on<F: Future>(
    future: F,
    token: Option<&CancelToken>,
) -> Result<F::Output, CancelReason> {
    let mut future = std::pin::pin!(future);
    if let Some(token) = token {
        token.state().waiter = Some(thread::current());
    }
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Some(reason) = token.and_then(CancelToken::reason) {
            return Err(reason);
        }
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return Ok(output);
        }
        thread::park();
    }
}

/// Waits for a unary call's answer. When `token` fires first, the call is left running:
/// the caller decides what to tell the peer before it cancels (or drops) the call.
pub fn wait<T: Unpin>(
    call: &mut ClientUnaryReceiver<T>,
    token: Option<&CancelToken>,
) -> Result<T, CallError> {
    match block_on(call, token) {
        Ok(answer) => answer.map_err(CallError::Grpc),
        Err(reason) => Err(CallError::Cancelled(reason)),
    }
}

/// The running gRPC server of the orchestrator.
pub struct OrchestratorServer {
    /// Kept alive while the orchestrator runs; dropping it stops the server.
    _server: Server,
    /// grpc.health.v1 status, set to NOT_SERVING when draining.
    pub health: HealthService,
    /// The port it listens on (useful with `:0`).
    pub port: u16,
}

/// Call options carrying `authorization: Bearer <token>` when there is a token.
pub fn with_token(options: CallOption, token: Option<&Secret>) -> CallOption {
    let Some(token) = token else { return options };
    let mut headers = MetadataBuilder::new();
    match headers.add_str("authorization", &format!("Bearer {}", token.expose())) {
        Ok(_) => options.headers(headers.build()),
        Err(_) => {
            warn!("the registration token is not printable ASCII; sending none");
            options
        }
    }
}

/// Whether the call carries `authorization: Bearer <token>` (compared in constant time).
fn authorized(ctx: &RpcContext, token: &Secret) -> bool {
    let expected = format!("Bearer {}", token.expose());
    ctx.request_headers().iter().any(|(key, value)| {
        key.eq_ignore_ascii_case("authorization")
            && value.len() == expected.len()
            && value
                .iter()
                .zip(expected.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
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
                let generation =
                    self.registry
                        .register(&info.id, &addr, &info.region, capacity, false);
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
            .map(|w| WorkerState {
                id: w.id,
                address: w.addr,
                state: w.state,
                capacity: w.capacity as i32,
                inFlight: w.in_flight as i32,
                lastPingMsAgo: w.last_ping.map_or(-1, |d| d.as_millis() as i64),
                region: w.region,
                ..WorkerState::default()
            })
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

/// Answers a unary call from a handler without blocking grpcio's thread. (The sink's
/// future must be driven to completion: dropping it early may cancel the call.)
pub fn reply<T: Send + 'static>(ctx: &RpcContext, sink: UnarySink<T>, message: T) {
    ctx.spawn(async move {
        if let Err(e) = sink.success(message).await {
            debug!("could not answer a call: {e}");
        }
    });
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

#[cfg(test)]
mod wait_tests {
    use super::*;

    #[test]
    fn a_cancel_from_another_thread_ends_the_wait() {
        let token = CancelToken::default();
        let canceller = token.clone();
        let (tid_tx, tid_rx) = crossbeam_channel::bounded(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            // SAFETY: gettid(2) has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_tx.send(block_on(std::future::pending::<()>(), Some(&token)));
        });
        // Cancelled only once the waiter has registered and sleeps in `park`, so the
        // wake-up (not the check before parking) is what ends the wait.
        let stat = format!("/proc/self/task/{}/stat", tid_rx.recv().unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let registered = canceller.state().waiter.is_some();
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            let sleeping = state
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('S'));
            if registered && sleeping {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the waiter never parked"
            );
            std::thread::yield_now();
        }
        assert!(canceller.cancel(CancelReason::Cancelled));
        assert_eq!(
            done.recv_timeout(Duration::from_secs(10)),
            Ok(Err(CancelReason::Cancelled)),
            "the cancel woke the waiter"
        );
        assert!(canceller.fired().recv().is_err(), "fired is disconnected");
    }
}
