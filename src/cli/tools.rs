//! What the operator's commands share: each command fails with a [`CliError`] that
//! names what it tried to reach and a hint, and an exit code scripts can test;
//! [`BrokerArgs`] connects and publishes (`submit`, `cancel` and `watch` are in
//! [`super::submit`] and [`super::watch`], `healthcheck` in [`super::health`],
//! `workers` in [`super::workers`]).

use std::time::Duration;

use amiquip::{AmqpProperties, Channel, Confirm, Connection, Publish};
use clap::Args;

use crate::amqp::{Brokers, ConnectError};
use crate::config::{BrokerUrl, Topology};

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
