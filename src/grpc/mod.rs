//! gRPC plumbing shared by the orchestrator, the worker agent and the CLI: channels and
//! servers with optional mutual TLS, `JobService` clients, the registration token as
//! call metadata, and answering a call without blocking grpcio's threads. Waiting for a
//! call without an async runtime is in [`cancel`].

pub mod cancel;
pub mod serving;

use std::sync::Arc;
use std::time::Duration;

use grpcio::{
    CallOption, CertificateRequestType, Channel, ChannelBuilder, ChannelCredentialsBuilder,
    Environment, Marshaller, MetadataBuilder, Method, MethodType, RpcContext, RpcStatus,
    RpcStatusCode, ServerBuilder, ServerCredentials, ServerCredentialsBuilder, UnarySink,
};
use log::{debug, warn};

use crate::config::TlsArgs;
use crate::job::Secret;
use crate::proto::job::{JobRequest, JobResponse};
use crate::proto::job_grpc::JobServiceClient;

/// `RunJob` as a server-streaming method. Our worker serves it so: a streaming sink shows
/// when the caller cancelled the call (or its connection died), and with `streamLogs`
/// the build's output goes ahead of the answer. The orchestrator calls it so too. With
/// one message it is, on the wire, the unary call `proto/job.proto` declares (older
/// peers see no difference).
pub const RUN_JOB_STREAM: Method<JobRequest, JobResponse> =
    pb_method(MethodType::ServerStreaming, "/job.JobService/RunJob");

/// A method of `proto/*.proto` with protobuf (de)serialisation.
pub const fn pb_method<Req: protobuf::Message, Resp: protobuf::Message>(
    ty: MethodType,
    name: &'static str,
) -> Method<Req, Resp> {
    Method {
        ty,
        name,
        req_mar: Marshaller {
            ser: grpcio::pb_ser,
            de: grpcio::pb_de,
        },
        resp_mar: Marshaller {
            ser: grpcio::pb_ser,
            de: grpcio::pb_de,
        },
    }
}

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

/// The most concurrent calls one client connection may have open on our servers. A
/// bound, not a fix: the gRPC core in use (1.56) predates the HTTP/2 "rapid reset"
/// mitigations (CVE-2023-44487), so a peer that opens and resets streams quickly still
/// costs CPU; keep the gRPC ports on a private network (README, Security).
pub const MAX_STREAMS_PER_CONNECTION: i32 = 256;

/// Checks that `listen` can be bound before gRPC tries (the gRPC core would log a dump
/// of its own and say only `BindFail`): an address in use or not ours is an error that
/// names the flag and the variable setting it. Port 0 (any free port) always can.
pub fn check_listen(listen: &str, flag: &str, variable: &str) -> Result<(), String> {
    if listen.ends_with(":0") {
        return Ok(());
    }
    match std::net::TcpListener::bind(listen) {
        Ok(_) => Ok(()),
        Err(e) => {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "another process listens there (another instance?); pick another port"
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    "no interface of this host has that address"
                }
                std::io::ErrorKind::PermissionDenied => "ports below 1024 need privileges",
                _ => "check the address",
            };
            Err(format!(
                "cannot listen on {listen} ({flag}, {variable}): {e}; {hint}"
            ))
        }
    }
}

/// A server builder with the limits every Blacktree gRPC server has: concurrent streams
/// per connection bounded, received messages at gRPC's default 4 MiB.
pub fn server_builder(env: Arc<Environment>) -> ServerBuilder {
    let args = ChannelBuilder::new(env.clone())
        .max_concurrent_stream(MAX_STREAMS_PER_CONNECTION)
        .build_args();
    ServerBuilder::new(env).channel_args(args)
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

/// HTTP/2 keepalive on the connections to workers, while a call runs on them.
///
/// A PING goes out once the connection has received nothing for `time` (so never while
/// the worker answers its health pings), and a connection whose PING is not
/// acknowledged within `timeout` is closed, failing its calls (UNAVAILABLE). gRPC also
/// makes `timeout` the socket's `TCP_USER_TIMEOUT`, so data the peer's kernel does not
/// acknowledge for that long closes it too: a host that vanished without a reset is
/// noticed, instead of after the kernel's ~15 minutes of retransmissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence on the connection before a keepalive PING.
    pub time: Duration,
    /// How long a PING (or sent data) may go unacknowledged.
    pub timeout: Duration,
}

impl Keepalive {
    /// The keepalive of the orchestrator's worker connections for `--lost-after`.
    ///
    /// The timeout is `lost_after`: a frozen worker (its kernel still acknowledges, its
    /// process answers nothing) looks like a vanished host to HTTP/2, and must not be
    /// given up sooner by keepalive than by the health ticker. A PING goes out after a
    /// third of it without a byte received. A Go gRPC server's default policy (at most one PING every 5 minutes)
    /// counts a PING as a strike only when it wrote nothing since the previous one, and
    /// closes the connection at the third strike (GOAWAY `too_many_pings`): once a Go
    /// worker stops answering health pings in time, that comes about four PINGs, 4/3
    /// of `lost_after`, after its last answer, later than the give-up. While it answers,
    /// no PING is sent at all (`tests/keepalive.rs` checks this against grpc-go).
    pub fn for_lost_after(lost_after: Duration) -> Keepalive {
        Keepalive {
            time: (lost_after / 3).max(Duration::from_secs(1)),
            timeout: lost_after,
        }
    }
}

/// Opens a (lazily connecting) client of the `JobService` at `addr`.
pub fn job_client(
    env: Arc<Environment>,
    addr: &str,
    tls: Option<&Tls>,
    keepalive: Keepalive,
) -> JobServiceClient {
    let builder = ChannelBuilder::new(env)
        // A worker back from a restart is reachable again within a health round or two.
        .initial_reconnect_backoff(Duration::from_millis(200))
        .max_reconnect_backoff(Duration::from_secs(2))
        .keepalive_time(keepalive.time)
        .keepalive_timeout(keepalive.timeout)
        .keepalive_permit_without_calls(false)
        // No bandwidth-delay probes: their timers woke the C core's event engine about
        // once per job with 1,000 workers (issue 20); the default 64 KiB stream
        // window is plenty for a job's answer and its batched output lines.
        .http2_bdp_probe(false)
        .max_receive_message_len(MAX_MESSAGE_BYTES)
        .max_send_message_len(MAX_MESSAGE_BYTES);
    JobServiceClient::new(connect(builder, addr, tls))
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

/// Whether the call carries `authorization: Bearer <token>`.
pub fn authorized(ctx: &RpcContext, token: &Secret) -> bool {
    let expected = format!("Bearer {}", token.expose());
    ctx.request_headers()
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case("authorization"))
        .fold(false, |found, (_, value)| {
            found | constant_time_eq(value, expected.as_bytes())
        })
}

/// `sent == expected` in a time that depends on the length of `sent` only: neither the
/// bytes nor the length of `expected` (a token) show in how long a refusal takes.
pub fn constant_time_eq(sent: &[u8], expected: &[u8]) -> bool {
    if expected.is_empty() {
        return sent.is_empty();
    }
    let mut diff = u8::from(sent.len() != expected.len());
    for (i, byte) in sent.iter().enumerate() {
        diff |= byte ^ expected[i % expected.len()];
    }
    diff == 0
}

/// Refuses a call that lacks the right token when one is configured: answers it
/// UNAUTHENTICATED, logs the method and peer, and returns `None`; otherwise gives the
/// sink back.
pub fn admit<T: Send + 'static>(
    ctx: &RpcContext,
    sink: UnarySink<T>,
    token: Option<&Secret>,
) -> Option<UnarySink<T>> {
    match token {
        Some(token) if !authorized(ctx, token) => {
            fail(ctx, sink, unauthenticated(ctx));
            None
        }
        _ => Some(sink),
    }
}

/// The UNAUTHENTICATED answer to a call without the right token (logged).
pub fn unauthenticated(ctx: &RpcContext) -> RpcStatus {
    warn!(
        "refused a {} call from {}: missing or wrong registration token",
        String::from_utf8_lossy(ctx.method()),
        ctx.peer()
    );
    RpcStatus::with_message(
        RpcStatusCode::UNAUTHENTICATED,
        "missing or wrong registration token".to_string(),
    )
}

/// Answers a unary call with an error status without blocking grpcio's thread.
pub fn fail<T: Send + 'static>(ctx: &RpcContext, sink: UnarySink<T>, status: RpcStatus) {
    ctx.spawn(async move {
        if let Err(e) = sink.fail(status).await {
            debug!("could not answer a call: {e}");
        }
    });
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
