//! RabbitMQ: connecting, declaring the topology, and the two threads that own the
//! broker channels.
//!
//! * [`consumer`]: the AMQP consumer thread. It owns the connection (and reconnects it),
//!   the consuming channel, every unacknowledged delivery and the de-duplication window.
//! * [`publisher`]: the status publisher thread. It owns a channel with publisher
//!   confirms; once the broker confirms what it published for a delivery it tells the
//!   consumer thread, which acks that delivery.
//!
//! amiquip never sets `TCP_NODELAY`, which costs ~40 ms per lone publish (Nagle's
//! algorithm against delayed ACKs), so [`connect`] opens the socket itself and hands it
//! over; that is why the URL is parsed here rather than by amiquip.

pub mod consumer;
pub mod ledger;
pub mod publisher;

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use amiquip::{
    AmqpValue, Auth, Channel, Connection, ConnectionOptions, ConnectionTuning,
    ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions,
};

use crate::config::{mask_url, QueueType, Topology};

/// Heartbeat used when the URL does not set one: a dead broker is noticed in ~2× this.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// TCP connect and AMQP handshake timeout used when the URL does not set one.
const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed `amqp://` or `amqps://` URL.
#[derive(Debug, Clone)]
pub struct AmqpUrl {
    tls: bool,
    host: String,
    port: u16,
    options: ConnectionOptions<Auth>,
    connection_timeout: Duration,
    /// Extra CA certificate (PEM) to trust for `amqps://` (`cacertfile` parameter).
    ca_file: Option<std::path::PathBuf>,
    masked: String,
}

impl AmqpUrl {
    /// Parses a RabbitMQ URL (RabbitMQ's URI spec: `%2f` is the vhost `/`, an empty path
    /// is `/` too). Supported query parameters: `heartbeat` (s), `connection_timeout` (ms),
    /// `channel_max`, and for `amqps://` `cacertfile` (a PEM CA to trust besides the
    /// system's).
    pub fn parse(text: &str) -> Result<AmqpUrl, String> {
        let masked = mask_url(text);
        let url = url::Url::parse(text).map_err(|e| format!("invalid AMQP URL {masked}: {e}"))?;
        let (tls, default_port) = match url.scheme() {
            "amqp" => (false, 5672),
            "amqps" => (true, 5671),
            other => {
                return Err(format!(
                    "AMQP URL {masked} has scheme {other}, not amqp or amqps"
                ))
            }
        };
        let host = match url.host_str() {
            Some("") | None => "localhost".to_string(),
            Some(h) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let vhost = match url.path().trim_start_matches('/') {
            "" => "/".to_string(),
            path if path.contains('/') => {
                return Err(format!(
                    "AMQP URL {masked}: the vhost must be one path segment (write / as %2f)"
                ))
            }
            path => decode(path),
        };
        let mut options = ConnectionOptions::<Auth>::default()
            .virtual_host(vhost)
            .heartbeat(DEFAULT_HEARTBEAT_SECS);
        if !url.username().is_empty() || url.password().is_some() {
            options = options.auth(Auth::Plain {
                username: match url.username() {
                    "" => "guest".to_string(),
                    user => decode(user),
                },
                password: decode(url.password().unwrap_or("guest")),
            });
        }
        let mut connection_timeout = DEFAULT_CONNECTION_TIMEOUT;
        let mut ca_file = None;
        for (key, value) in url.query_pairs() {
            let bad = || format!("AMQP URL {masked}: `{key}={value}` is not a valid number");
            match key.as_ref() {
                "heartbeat" => options = options.heartbeat(value.parse().map_err(|_| bad())?),
                "channel_max" => options = options.channel_max(value.parse().map_err(|_| bad())?),
                "connection_timeout" => {
                    connection_timeout = Duration::from_millis(value.parse().map_err(|_| bad())?)
                }
                "cacertfile" if tls => ca_file = Some(std::path::PathBuf::from(value.as_ref())),
                other => {
                    return Err(format!(
                        "AMQP URL {masked}: unsupported parameter `{other}`"
                    ))
                }
            }
        }
        Ok(AmqpUrl {
            tls,
            host,
            port: url.port().unwrap_or(default_port),
            options: options.connection_timeout(Some(connection_timeout)),
            connection_timeout,
            ca_file,
            masked,
        })
    }

    /// The URL with its password masked, for logs and errors.
    pub fn masked(&self) -> &str {
        &self.masked
    }

    /// Opens a connection with `TCP_NODELAY` set, trying each address the host resolves to.
    pub fn connect(&self) -> Result<Connection, ConnectError> {
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| {
                ConnectError::Unreachable(format!("cannot resolve {}: {e}", self.masked))
            })?;
        let mut last_error = format!("{} resolves to no address", self.masked);
        for addr in addrs {
            match self.connect_to(addr) {
                Ok(connection) => return Ok(connection),
                Err(ConnectError::LoginRefused(_)) => {
                    return Err(ConnectError::LoginRefused(format!(
                        "the broker at {} refused the login: check the user and password \
                         in --amqp-url (MQ_URL)",
                        self.masked
                    )))
                }
                Err(e) => last_error = format!("cannot connect to {} ({addr}): {e}", self.masked),
            }
        }
        Err(ConnectError::Unreachable(last_error))
    }

    fn connect_to(&self, addr: std::net::SocketAddr) -> Result<Connection, ConnectError> {
        let io = |e: std::io::Error| ConnectError::Unreachable(e.to_string());
        let stream = TcpStream::connect_timeout(&addr, self.connection_timeout).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let stream = mio::net::TcpStream::from_stream(stream).map_err(io)?;
        let tuning = ConnectionTuning::default();
        let options = self.options.clone();
        if self.tls {
            let mut connector = native_tls::TlsConnector::builder();
            if let Some(file) = &self.ca_file {
                let pem = std::fs::read_to_string(file).map_err(|e| {
                    ConnectError::Unreachable(format!("reading cacertfile {}: {e}", file.display()))
                })?;
                let blocks = pem_certificates(&pem);
                if blocks.is_empty() {
                    return Err(ConnectError::Unreachable(format!(
                        "cacertfile {} holds no PEM certificate",
                        file.display()
                    )));
                }
                // A bundle: every certificate in it is trusted, not only the first.
                for (i, block) in blocks.iter().enumerate() {
                    let ca = native_tls::Certificate::from_pem(block.as_bytes()).map_err(|e| {
                        ConnectError::Unreachable(format!(
                            "cacertfile {}: certificate {} is not valid: {e}",
                            file.display(),
                            i + 1
                        ))
                    })?;
                    connector.add_root_certificate(ca);
                }
            }
            let connector = connector
                .build()
                .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
            Connection::open_tls_stream(connector, &self.host, stream, options, tuning)
        } else {
            Connection::insecure_open_stream(stream, options, tuning)
        }
        .map_err(|e| match e {
            amiquip::Error::InvalidCredentials => ConnectError::LoginRefused(e.to_string()),
            e => ConnectError::Unreachable(e.to_string()),
        })
    }
}

/// Why no connection to the broker was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// A broker answered and refused the login: the same credentials will not do.
    LoginRefused(String),
    /// Nothing usable answered (refused, timed out, TLS failed, unresolvable).
    Unreachable(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::LoginRefused(message) | ConnectError::Unreachable(message) => {
                f.write_str(message)
            }
        }
    }
}

impl From<ConnectError> for String {
    fn from(error: ConnectError) -> String {
        error.to_string()
    }
}

/// The broker's nodes, as `--amqp-url` / `MQ_URL` list them: one URL, or several
/// separated by commas (a cluster's nodes, each with its own credentials and TLS).
#[derive(Debug, Clone)]
pub struct Brokers {
    urls: Vec<AmqpUrl>,
}

impl Brokers {
    /// Parses a comma-separated list of `amqp://` or `amqps://` URLs (a comma inside
    /// a password is written `%2C`).
    pub fn parse(text: &str) -> Result<Brokers, String> {
        let urls = text
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(AmqpUrl::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Err("no AMQP URL given (set --amqp-url or MQ_URL)".to_string());
        }
        Ok(Brokers { urls })
    }

    /// How many URLs there are (at least one).
    pub fn count(&self) -> usize {
        self.urls.len()
    }

    /// The URL at `index` (taken modulo their number).
    pub fn url(&self, index: usize) -> &AmqpUrl {
        &self.urls[index % self.urls.len()]
    }

    /// Every URL, masked, comma-separated: for logs and errors.
    pub fn masked(&self) -> String {
        let masked: Vec<&str> = self.urls.iter().map(AmqpUrl::masked).collect();
        masked.join(",")
    }

    /// Connects to the first URL that answers, trying them in turn from `start`;
    /// returns the connection and the index of its URL, or every URL's error (a refused
    /// login when one of them refused it).
    pub fn connect_from(&self, start: usize) -> Result<(Connection, usize), ConnectError> {
        let mut errors = Vec::new();
        let mut refused = false;
        for offset in 0..self.urls.len() {
            let index = (start + offset) % self.urls.len();
            match self.urls[index].connect() {
                Ok(connection) => return Ok((connection, index)),
                Err(e) => {
                    refused |= matches!(e, ConnectError::LoginRefused(_));
                    errors.push(e.to_string());
                }
            }
        }
        let errors = errors.join("; ");
        Err(match refused {
            true => ConnectError::LoginRefused(errors),
            false => ConnectError::Unreachable(errors),
        })
    }
}

/// Declares the exchange, the queues and their bindings, idempotently and with exactly
/// the flags older deployments used (durable, no arguments), so existing queues match.
pub fn declare_topology(channel: &Channel, topology: &Topology) -> Result<(), amiquip::Error> {
    declare_exchange(channel, &topology.exchange)?;
    let events = topology.events_on().then_some(&topology.events_key);
    for (queue, key) in [
        (&topology.execute_queue, Some(&topology.execute_key)),
        (&topology.status_queue, Some(&topology.status_key)),
        (&topology.cancel_queue, Some(&topology.cancel_key)),
        (&topology.rejected_queue, None),
    ]
    .into_iter()
    .chain(events.map(|key| (&topology.events_queue, Some(key))))
    {
        declare_durable_queue(channel, queue, topology.queue_type)?;
        if let Some(key) = key {
            channel.queue_bind(
                queue.as_str(),
                topology.exchange.as_str(),
                key.as_str(),
                FieldTable::new(),
            )?;
        }
    }
    Ok(())
}

/// Declares the durable direct exchange (no arguments, as older deployments did).
pub fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), amiquip::Error> {
    channel.exchange_declare(
        ExchangeType::Direct,
        exchange,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
    )?;
    Ok(())
}

/// Declares a durable, non-exclusive, non-auto-delete queue: without arguments when
/// classic (as older deployments did), with `x-queue-type: quorum` when quorum.
pub fn declare_durable_queue(
    channel: &Channel,
    queue: &str,
    queue_type: QueueType,
) -> Result<(), amiquip::Error> {
    declare_queue_with(channel, queue, queue_type, FieldTable::new())
}

/// How long the broker keeps an orchestrator's own cancel queue once no orchestrator
/// consumes or declares it (its instance is gone for good): a day, in milliseconds.
const INSTANCE_QUEUE_EXPIRES_MS: i32 = 24 * 60 * 60 * 1000;

/// The cancel queue of one orchestrator, `<cancel-queue>.<instance-id>`.
pub fn instance_cancel_queue(topology: &Topology, instance_id: &str) -> String {
    format!("{}.{instance_id}", topology.cancel_queue)
}

/// Declares this orchestrator's own cancel queue and binds it to the cancel key beside
/// the shared cancel queue, so that every orchestrator gets a copy of every cancel
/// (ARCHITECTURE.md, "Several orchestrators"). Durable, so cancels published while it
/// restarts wait for it; `x-expires` removes it a day after its instance is gone.
pub fn declare_instance_cancel_queue(
    channel: &Channel,
    topology: &Topology,
    instance_id: &str,
) -> Result<String, amiquip::Error> {
    let queue = instance_cancel_queue(topology, instance_id);
    let mut arguments = FieldTable::new();
    arguments.insert(
        "x-expires".into(),
        AmqpValue::LongInt(INSTANCE_QUEUE_EXPIRES_MS),
    );
    declare_queue_with(channel, &queue, topology.queue_type, arguments)?;
    channel.queue_bind(
        queue.as_str(),
        topology.exchange.as_str(),
        topology.cancel_key.as_str(),
        FieldTable::new(),
    )?;
    Ok(queue)
}

fn declare_queue_with(
    channel: &Channel,
    queue: &str,
    queue_type: QueueType,
    mut arguments: FieldTable,
) -> Result<(), amiquip::Error> {
    if queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AmqpValue::LongString(queue_type.name().into()),
        );
    }
    channel.queue_declare(
        queue,
        QueueDeclareOptions {
            durable: true,
            arguments,
            ..QueueDeclareOptions::default()
        },
    )?;
    Ok(())
}

/// When `error` is the broker refusing a queue declaration because the queue exists
/// with another type, what to tell the operator: the queue, its type and the flag.
pub fn queue_type_mismatch(error: &amiquip::Error, declared: QueueType) -> Option<String> {
    let amiquip::Error::ServerClosedChannel {
        code: 406, message, ..
    } = error
    else {
        return None;
    };
    if !message.contains("inequivalent arg 'x-queue-type'") {
        return None;
    }
    let queue = message
        .split("for queue '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or("?");
    let existing = match message.rsplit("but current is").next() {
        Some(current) if current.contains("quorum") => "quorum",
        Some(current) if current.contains("stream") => "stream",
        _ => "classic",
    };
    Some(format!(
        "queue {queue} exists as a {existing} queue, but --queue-type (BLACKTREE_QUEUE_TYPE) is {}: \
         set --queue-type {existing}, or see README \"Quorum queues\" to move to {} queues",
        declared.name(),
        declared.name()
    ))
}

/// The PEM certificate blocks of a bundle, in order (text outside them is ignored).
fn pem_certificates(pem: &str) -> Vec<&str> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        blocks.push(&rest[start..end]);
        rest = &rest[end..];
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_of_another_type_is_told_apart_from_other_channel_errors() {
        let refused = |message: &str| amiquip::Error::ServerClosedChannel {
            channel_id: 1,
            code: 406,
            message: message.to_string(),
        };
        let classic = refused(
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'execute.queue' \
             in vhost '/': received the value 'quorum' of type 'longstr' but current is none",
        );
        let told = queue_type_mismatch(&classic, QueueType::Quorum).unwrap();
        assert!(
            told.contains("queue execute.queue exists as a classic queue")
                && told.contains("--queue-type (BLACKTREE_QUEUE_TYPE) is quorum"),
            "{told}"
        );
        let quorum = refused(
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'status.queue' \
             in vhost '/': received none but current is the value 'quorum' of type 'longstr'",
        );
        let told = queue_type_mismatch(&quorum, QueueType::Classic).unwrap();
        assert!(
            told.contains("status.queue exists as a quorum queue"),
            "{told}"
        );
        let other = refused("PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q'");
        assert_eq!(queue_type_mismatch(&other, QueueType::Quorum), None);
    }

    #[test]
    fn urls_parse_like_rabbitmq_uris() {
        let url = AmqpUrl::parse(
            "amqp://user:p%40ss@broker:5673/%2f?heartbeat=5&connection_timeout=2000",
        )
        .unwrap();
        assert!(!url.tls);
        assert_eq!((url.host.as_str(), url.port), ("broker", 5673));
        assert_eq!(url.connection_timeout, Duration::from_secs(2));
        let expected = ConnectionOptions::<Auth>::default()
            .virtual_host("/")
            .heartbeat(5)
            .auth(Auth::Plain {
                username: "user".into(),
                password: "p@ss".into(),
            })
            .connection_timeout(Some(Duration::from_secs(2)));
        assert_eq!(url.options, expected);
        assert!(!url.masked().contains("p%40ss"));

        let url = AmqpUrl::parse("amqps://h/prod").unwrap();
        assert!(url.tls);
        assert_eq!(url.port, 5671);
        assert_eq!(
            url.options,
            ConnectionOptions::<Auth>::default()
                .virtual_host("prod")
                .heartbeat(DEFAULT_HEARTBEAT_SECS)
                .connection_timeout(Some(DEFAULT_CONNECTION_TIMEOUT))
        );
        assert!(AmqpUrl::parse("http://h/").is_err());
        assert!(AmqpUrl::parse("amqp://h/a/b").is_err());
        assert!(AmqpUrl::parse("amqp://h/?heartbeat=soon").is_err());
        assert!(AmqpUrl::parse("amqp://h/?frobnicate=1").is_err());
    }

    #[test]
    fn a_comma_separated_list_names_every_node() {
        let brokers = Brokers::parse(
            "amqp://u:secret@node1:5672/%2f, amqps://u:other@node2/prod,amqp://node3",
        )
        .unwrap();
        assert_eq!(brokers.count(), 3);
        assert_eq!(brokers.url(1).host, "node2");
        assert!(brokers.url(1).tls);
        assert_eq!(brokers.url(5).host, "node3");
        let masked = brokers.masked();
        assert!(
            masked.contains("node1") && masked.contains("node3") && !masked.contains("secret"),
            "{masked}"
        );
        assert!(Brokers::parse(" , ").unwrap_err().contains("no AMQP URL"));
        let bad = Brokers::parse("amqp://node1,http://node2").unwrap_err();
        assert!(bad.contains("http"), "{bad}");
    }

    #[test]
    fn every_certificate_of_a_bundle_is_read() {
        let cert =
            |n: u8| format!("-----BEGIN CERTIFICATE-----\nQ{n}==\n-----END CERTIFICATE-----");
        let bundle = format!("# first\n{}\ntext\n{}\n", cert(1), cert(2));
        assert_eq!(pem_certificates(&bundle), [cert(1), cert(2)]);
        assert!(pem_certificates("no certificate").is_empty());
        assert_eq!(
            pem_certificates(&format!("{}\n-----BEGIN CERTIFICATE-----\nx", cert(3))),
            [cert(3)]
        );
    }
}
