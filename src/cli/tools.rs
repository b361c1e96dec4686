//! What the operator's commands share, and `workers`: each command fails with a
//! [`CliError`] that names what it tried to reach and a hint, and an exit code scripts
//! can test; [`BrokerArgs`] connects and publishes (`submit`, `cancel` and `watch` are
//! in [`super::submit`] and [`super::watch`], `healthcheck` in [`super::health`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use amiquip::{AmqpProperties, Channel, Confirm, Connection, Publish};
use clap::Args;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};
use serde_json::Value;

use crate::amqp::{Brokers, ConnectError};
use crate::config::{read_secret_file, BrokerUrl, TlsArgs, Topology};
use crate::grpc::{self, Tls};
use crate::orchestrator::registry::WorkerView;
use crate::proto::worker::ListWorkersRequest;
use crate::proto::worker_grpc::WorkerServiceClient;

/// Exit code: something failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: another instance holds the lock.
pub const EXIT_ALREADY_RUNNING: u8 = 3;
/// Exit code: the broker or the orchestrator could not be reached.
pub const EXIT_UNREACHABLE: u8 = 4;

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    /// Process exit code.
    pub code: u8,
    /// One-line message (address tried, hint).
    pub message: String,
}

impl CliError {
    /// An [`EXIT_FAILURE`] error.
    pub fn failed(message: impl Into<String>) -> CliError {
        CliError {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }
}

/// How to reach the broker, and the exchange and routing keys: the orchestrator's own
/// flags, with the same defaults and environment variables.
#[derive(Args, Debug, Clone)]
pub struct BrokerArgs {
    #[command(flatten)]
    pub broker: BrokerUrl,
    #[command(flatten)]
    pub topology: Topology,
}

impl BrokerArgs {
    /// Connects to the first broker URL that answers; exit code 4 when none does.
    pub fn connect(&self) -> Result<(Connection, Channel), CliError> {
        let brokers = Brokers::parse(&self.broker.amqp_url).map_err(CliError::failed)?;
        let unreachable = |e: String| CliError {
            code: EXIT_UNREACHABLE,
            message: format!("{e} (is RabbitMQ running there? set --amqp-url or MQ_URL)"),
        };
        // The first node that answers; the others when one is down.
        let (mut connection, node) = brokers.connect_from(0).map_err(|e| match e {
            // It answered: not a broker that is down, but credentials to fix.
            ConnectError::LoginRefused(message) => CliError::failed(message),
            ConnectError::Unreachable(message) => unreachable(message),
        })?;
        let url = brokers.url(node).masked();
        let channel = connection
            .open_channel(None)
            .map_err(|e| unreachable(format!("opening a channel on {url}: {e}")))?;
        Ok((connection, channel))
    }

    /// Publishes `body` with `routing_key` on `channel`, `mandatory`, and waits for the
    /// broker's confirm. A missing exchange, or a key that no queue is bound to (the
    /// broker returns the message), is an error saying what is missing.
    pub fn publish_confirmed(
        &self,
        channel: &Channel,
        routing_key: &str,
        body: &[u8],
        message_id: &str,
    ) -> Result<(), CliError> {
        let exchange = &self.topology.exchange;
        let amqp = |e: amiquip::Error| CliError::failed(format!("publishing to {exchange}: {e}"));
        if let Err(e) = channel.exchange_declare_passive(exchange.as_str()) {
            return Err(CliError::failed(match e {
                amiquip::Error::ServerClosedChannel { code: 404, .. } => format!(
                    "the exchange {exchange} does not exist: start the orchestrator once (it \
                     declares its exchange, queues and bindings), or set --exchange \
                     (BLACKTREE_EXCHANGE) to the one it uses"
                ),
                e => format!("publishing to {exchange}: {e}"),
            }));
        }
        let returns = channel.listen_for_returns().map_err(amqp)?;
        let confirms = channel.listen_for_publisher_confirms().map_err(amqp)?;
        channel.enable_publisher_confirms().map_err(amqp)?;
        let properties = AmqpProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message_id.to_string());
        let mut publish = Publish::with_properties(body, routing_key, properties);
        publish.mandatory = true;
        channel
            .basic_publish(exchange.as_str(), publish)
            .map_err(amqp)?;
        let confirm = confirms.recv_timeout(Duration::from_secs(10));
        // The broker returns an unroutable message before it confirms it.
        if returns.try_recv().is_ok() {
            return Err(CliError::failed(format!(
                "no queue is bound to the exchange {exchange} with the routing key \
                 {routing_key}: the message was not queued. Check the key (--execute-key / \
                 --cancel-key, BLACKTREE_EXECUTE_KEY / BLACKTREE_CANCEL_KEY) against the \
                 orchestrator's, or start the orchestrator once to declare its bindings"
            )));
        }
        match confirm {
            Ok(Confirm::Ack(_)) => Ok(()),
            Ok(Confirm::Nack(_)) => Err(CliError::failed("the broker refused the message")),
            Err(_) => Err(CliError::failed(
                "the broker did not confirm the message within 10 s",
            )),
        }
    }
}

/// `blacktree workers`.
#[derive(Args, Debug)]
pub struct WorkersArgs {
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

/// Lists the orchestrator's workers.
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
    let options = grpc::with_token(
        CallOption::default().timeout(Duration::from_secs(5)),
        token.as_ref(),
    );
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
        "{:<24} {:<22} {:<10} {:>8} {:>9} {:>10}",
        "ID", "ADDRESS", "STATE", "CAPACITY", "IN FLIGHT", "LAST PING"
    );
    for w in &views {
        let last = w
            .last_ping
            .map_or("never".to_string(), |d| format!("{}ms ago", d.as_millis()));
        println!(
            "{:<24} {:<22} {:<10} {:>8} {:>9} {:>10}",
            w.id, w.addr, w.state, w.capacity, w.in_flight, last
        );
    }
    Ok(())
}

/// A failed call to the orchestrator: refused (wrong token) or unreachable.
fn orchestrator_error(addr: &str, e: grpcio::Error) -> CliError {
    match e {
        grpcio::Error::RpcFailure(s) if s.code() == grpcio::RpcStatusCode::UNAUTHENTICATED => {
            CliError::failed(format!(
                "the orchestrator at {addr} refused the call: {} (set --registration-token-file)",
                s.message()
            ))
        }
        grpcio::Error::RpcFailure(s) if s.code() == grpcio::RpcStatusCode::UNIMPLEMENTED => {
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
