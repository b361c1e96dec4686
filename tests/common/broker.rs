//! The broker side of the harness: per-test queue names, the test's own connection
//! (declares, publishes, reads, counts with `rabbitmqctl`), and private broker nodes.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Channel, Connection, ExchangeDeclareOptions, ExchangeType, FieldTable, Publish,
    QueueDeclareOptions, QueueDeleteOptions,
};
use serde_json::Value;

use super::{free_port, poll, TOKEN};

/// The machine's shared broker.
pub const SHARED_BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Per-test names for the exchange and queues, so tests never see each other's messages.
#[derive(Debug, Clone)]
pub struct Names {
    pub exchange: String,
    pub execute: String,
    pub status: String,
    pub rejected: String,
    pub cancel: String,
    pub events: String,
}

impl Names {
    pub fn unique(test: &str) -> Names {
        let tag = format!(
            "{test}.{}.{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        Names {
            exchange: format!("bt.{tag}.direct"),
            execute: format!("bt.{tag}.execute"),
            status: format!("bt.{tag}.status"),
            rejected: format!("bt.{tag}.rejected"),
            cancel: format!("bt.{tag}.cancel"),
            events: format!("bt.{tag}.events"),
        }
    }

    /// The orchestrator flags that select these names.
    pub fn args(&self) -> Vec<String> {
        [
            ("--exchange", &self.exchange),
            ("--execute-queue", &self.execute),
            ("--status-queue", &self.status),
            ("--rejected-queue", &self.rejected),
            ("--cancel-queue", &self.cancel),
            ("--events-queue", &self.events),
        ]
        .iter()
        .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
        .collect()
    }
}

/// A test's own AMQP connection: declares the topology, publishes jobs, reads statuses.
pub struct Mq {
    pub names: Names,
    /// The broker node (`rabbitmqctl -n`), `None` for the machine's shared broker.
    node: Option<String>,
    connection: Option<Connection>,
    channel: Channel,
}

impl Mq {
    /// Connects to the machine's shared broker at `url` (or another URL of it).
    pub fn connect(url: &str, names: &Names) -> Mq {
        Self::connect_node(url, None, names)
    }

    /// Connects to a private broker node.
    pub fn on(broker: &PrivateBroker, names: &Names) -> Mq {
        Self::connect_node(&broker.url(), Some(broker.node.clone()), names)
    }

    /// Connects to a private broker node (of a cluster) and declares the test's queues
    /// as quorum queues, as `--queue-type quorum` does.
    pub fn on_quorum(broker: &PrivateBroker, names: &Names) -> Mq {
        Self::declare(&broker.url(), Some(broker.node.clone()), names, true)
    }

    /// Connects to the shared broker at `url` without declaring anything: the
    /// orchestrator declared the queues (of another type than the test's own, say).
    pub fn without_declaring(url: &str, names: &Names) -> Mq {
        let (connection, channel) = Self::open(url);
        Mq {
            names: names.clone(),
            node: None,
            connection: Some(connection),
            channel,
        }
    }

    fn open(url: &str) -> (Connection, Channel) {
        // Through blacktree's own connect: TCP_NODELAY, so a lone publish is not delayed.
        let mut connection = blacktree::amqp::AmqpUrl::parse(url)
            .and_then(|u| u.connect().map_err(String::from))
            .expect("test connection to RabbitMQ");
        let channel = connection.open_channel(None).unwrap();
        (connection, channel)
    }

    fn connect_node(url: &str, node: Option<String>, names: &Names) -> Mq {
        Self::declare(url, node, names, false)
    }

    fn declare(url: &str, node: Option<String>, names: &Names, quorum: bool) -> Mq {
        let (connection, channel) = Self::open(url);
        channel
            .exchange_declare(
                ExchangeType::Direct,
                names.exchange.as_str(),
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
            )
            .unwrap();
        for (queue, key) in [
            (&names.execute, Some("worker.execute")),
            (&names.status, Some("api.result")),
            (&names.cancel, Some("worker.cancel")),
            (&names.events, Some("api.event")),
            (&names.rejected, None),
        ] {
            let mut arguments = FieldTable::new();
            if quorum {
                arguments.insert(
                    "x-queue-type".into(),
                    amiquip::AmqpValue::LongString("quorum".into()),
                );
            }
            let opts = QueueDeclareOptions {
                durable: true,
                arguments,
                ..Default::default()
            };
            channel.queue_declare(queue.as_str(), opts).unwrap();
            if let Some(key) = key {
                channel
                    .queue_bind(
                        queue.as_str(),
                        names.exchange.as_str(),
                        key,
                        FieldTable::new(),
                    )
                    .unwrap();
            }
        }
        Mq {
            names: names.clone(),
            node,
            connection: Some(connection),
            channel,
        }
    }

    /// The test's channel, for benchmarks that consume directly.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes a raw body on the execute routing key.
    pub fn publish_raw(&self, body: &[u8]) {
        let props = AmqpProperties::default().with_delivery_mode(2);
        self.channel
            .basic_publish(
                self.names.exchange.as_str(),
                Publish::with_properties(body, "worker.execute", props),
            )
            .unwrap();
    }

    /// Publishes a job as the deployed control plane does (`deploymentId`, `token`,
    /// `repository`, `dockerFilePath`, `createdAt`; persistent, no content type), with
    /// `extra` fields on top.
    pub fn publish_deployment(&self, deployment_id: &str, extra: Value) {
        let mut job = serde_json::json!({
            "deploymentId": deployment_id, "token": TOKEN, "repository": "acme/app",
            "branch": "main", "dockerFilePath": "docker/Dockerfile", "contextDir": ".",
            "createdAt": "2026-12-01T10:00:00.000Z",
        });
        if let Value::Object(extra) = extra {
            job.as_object_mut().unwrap().extend(extra);
        }
        self.publish_raw(&serde_json::to_vec(&job).unwrap());
    }

    /// Unbinds (`bound: false`) or binds again the status queue: without a binding, the
    /// broker has nowhere to route a status.
    pub fn bind_status_queue(&self, bound: bool) {
        let (queue, exchange) = (self.names.status.as_str(), self.names.exchange.as_str());
        let done = if bound {
            self.channel
                .queue_bind(queue, exchange, "api.result", FieldTable::new())
        } else {
            self.channel
                .queue_unbind(queue, exchange, "api.result", FieldTable::new())
        };
        done.unwrap();
    }

    /// Declares the deployed control plane's own result queue (`{status}.api`, bound
    /// with `api.result` like the status queue) and returns its name.
    pub fn api_result_queue(&self) -> String {
        let queue = format!("{}.api", self.names.status);
        let opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel.queue_declare(queue.as_str(), opts).unwrap();
        self.channel
            .queue_bind(
                queue.as_str(),
                self.names.exchange.as_str(),
                "api.result",
                FieldTable::new(),
            )
            .unwrap();
        queue
    }

    /// Publishes a cancel request as the deployed control plane would (`deploymentId`).
    pub fn publish_cancel_deployment(&self, deployment_id: &str) {
        let body = serde_json::to_vec(&serde_json::json!({ "deploymentId": deployment_id }));
        self.channel
            .basic_publish(
                self.names.exchange.as_str(),
                Publish::new(&body.unwrap(), "worker.cancel"),
            )
            .unwrap();
    }

    /// Publishes a cancel request for `job_id`.
    pub fn publish_cancel(&self, job_id: &str) {
        let body = serde_json::to_vec(&serde_json::json!({ "jobId": job_id })).unwrap();
        self.publish_raw_cancel(&body);
    }

    /// Publishes `body` as it is on the cancel routing key.
    pub fn publish_raw_cancel(&self, body: &[u8]) {
        self.channel
            .basic_publish(
                self.names.exchange.as_str(),
                Publish::new(body, "worker.cancel"),
            )
            .unwrap();
    }

    /// Reads lifecycle events until `done` or `timeout`.
    pub fn events_until(
        &self,
        timeout: Duration,
        done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        self.read_until(&self.names.events, timeout, done)
            .into_iter()
            .map(|(body, _)| serde_json::from_slice(&body).expect("event is JSON"))
            .collect()
    }

    /// Publishes a job with the test token.
    pub fn publish_job(&self, job_id: &str, extra: Value) {
        let mut job = serde_json::json!({
            "jobId": job_id, "repoUrl": "acme/app", "branch": "main",
            "dockerfilePath": "Dockerfile", "contextDir": ".", "imageName": "acme/app:1",
            "githubToken": TOKEN,
        });
        if let Value::Object(extra) = extra {
            job.as_object_mut().unwrap().extend(extra);
        }
        self.publish_raw(&serde_json::to_vec(&job).unwrap());
    }

    /// Reads statuses until `done` says so or `timeout` passes; returns them all.
    pub fn statuses_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        self.read_until(&self.names.status, timeout, |msgs| done(msgs))
            .into_iter()
            .map(|(body, _)| serde_json::from_slice(&body).expect("status is JSON"))
            .collect()
    }

    /// Reads `n` statuses (asserting they arrive within `timeout`).
    pub fn statuses(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let statuses = self.statuses_until(timeout, |s| s.len() >= n);
        assert!(
            statuses.len() >= n,
            "only {} of {n} statuses arrived: {statuses:?}",
            statuses.len()
        );
        statuses
    }

    /// Reads messages (body, headers) from `queue` until `done` or `timeout`.
    pub fn read_until(
        &self,
        queue: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<(Vec<u8>, FieldTable)> {
        // basic.get takes exactly one message at a time: nothing read ahead is lost
        // when the test stops reading.
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut parsed = Vec::new();
        while !done(&parsed) && Instant::now() < deadline {
            match self.channel.basic_get(queue, true).expect("basic.get") {
                Some(get) => {
                    let d = get.delivery;
                    parsed.push(serde_json::from_slice(&d.body).unwrap_or(Value::Null));
                    out.push((d.body, d.properties.headers().clone().unwrap_or_default()));
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        out
    }

    /// Messages waiting in `queue`.
    pub fn depth(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare_passive(queue)
            .unwrap()
            .declared_message_count()
            .unwrap_or(0)
    }
}

/// Messages of `queue` on broker `node` (`None`: the shared broker) that are ready and
/// that are delivered but not acked yet. AMQP cannot ask the second (a passive declare
/// counts ready messages only); `rabbitmqctl list_queues` can.
pub fn queue_counts(node: Option<&str>, queue: &str) -> (u64, u64) {
    try_queue_counts(node, queue)
        .unwrap_or_else(|| panic!("rabbitmqctl does not list {queue} on {node:?}"))
}

/// [`queue_counts`], or `None` when the node does not answer or lists no such queue.
pub fn try_queue_counts(node: Option<&str>, queue: &str) -> Option<(u64, u64)> {
    let mut ctl = Command::new("rabbitmqctl");
    if let Some(node) = node {
        ctl.args(["-n", node]);
    }
    let out = ctl
        .args(["list_queues", "-q", "--no-table-headers"])
        .args(["name", "messages_ready", "messages_unacknowledged"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            if fields.next()? != queue {
                return None;
            }
            Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
        })
}

impl Mq {
    /// `(ready, unacked)` messages of `queue`, see [`queue_counts`].
    pub fn counts(&self, queue: &str) -> (u64, u64) {
        queue_counts(self.node.as_deref(), queue)
    }

    /// Waits until `queue` holds no message, ready or unacked: every delivery was acked.
    pub fn wait_all_acked(&self, queue: &str) {
        poll(SETTLE, &format!("every message of {queue} acked"), || {
            (self.counts(queue) == (0, 0)).then_some(())
        });
    }

    /// Asserts that no job has a status the test has not read: waits until every job
    /// was acked (a job is acked only after its status was confirmed, so every status
    /// is in the status queue by then, and nothing can be redelivered), then asserts
    /// that the status queue is empty.
    pub fn assert_no_more_statuses(&self) {
        self.wait_all_acked(&self.names.execute);
        let left = self.depth(&self.names.status) as usize;
        if left > 0 {
            let extra = self.statuses_until(SETTLE, |s| s.len() >= left);
            panic!("{left} statuses beyond one per job: {extra:?}");
        }
    }
}

/// How long a test waits for the broker to settle (every delivery acked).
pub const SETTLE: Duration = Duration::from_secs(60);

/// Deletes the test's queues and exchange, also when the test failed.
impl Drop for Mq {
    fn drop(&mut self) {
        let n = &self.names;
        let api = format!("{}.api", n.status);
        for q in [
            &n.execute,
            &n.status,
            &n.rejected,
            &n.cancel,
            &n.events,
            &api,
        ] {
            let _ = self
                .channel
                .queue_delete(q.as_str(), QueueDeleteOptions::default());
        }
        let _ = self.channel.exchange_delete(n.exchange.as_str(), false);
        if let Some(connection) = self.connection.take() {
            let _ = connection.close();
        }
    }
}

/// Counts statuses per jobId.
pub fn count_by_job(statuses: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for s in statuses {
        *counts
            .entry(s["jobId"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

/// A RabbitMQ node of a test's own, for tests that cut off or stop the broker.
pub struct PrivateBroker {
    pub node: String,
    pub port: u16,
    /// The `amqps://` port, when started with TLS.
    pub tls_port: u16,
    dir: std::path::PathBuf,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        Self::start_with_tls(None)
    }

    /// A node whose rabbitmq.conf also has `conf` (lines such as
    /// `max_message_size = 1048576`).
    pub fn start_with_conf(conf: &str) -> PrivateBroker {
        Self::start_with(None, conf)
    }

    /// With `tls = Some((ca, cert, key))` PEM files, also listens for `amqps://` on
    /// `tls_port`. A node that does not come up (several starting at once on a loaded
    /// machine can time out, or lose a port to another process) is stopped, its log
    /// printed, and one more is started on fresh ports.
    pub fn start_with_tls(tls: Option<(String, String, String)>) -> PrivateBroker {
        Self::start_with(tls, "")
    }

    fn start_with(tls: Option<(String, String, String)>, conf: &str) -> PrivateBroker {
        match Self::try_start(tls.as_ref(), conf) {
            Ok(broker) => broker,
            Err(failed) => {
                eprintln!(
                    "private broker {} did not start; trying once more on fresh ports. Its log:\n{}",
                    failed.node,
                    failed.log()
                );
                drop(failed);
                Self::try_start(tls.as_ref(), conf).unwrap_or_else(|failed| {
                    panic!(
                        "private broker {} did not start either. Its log:\n{}",
                        failed.node,
                        failed.log()
                    )
                })
            }
        }
    }

    /// The node's log files, for a failure message.
    fn log(&self) -> String {
        let logs = std::fs::read_dir(self.dir.join("log"))
            .into_iter()
            .flatten();
        logs.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts a node and waits until it accepts AMQP; the node that did not is `Err`.
    fn try_start(
        tls: Option<&(String, String, String)>,
        extra_conf: &str,
    ) -> Result<PrivateBroker, PrivateBroker> {
        let port = free_port();
        let tls_port = free_port();
        let dist_port = free_port();
        let node = format!("bttest{}x{port}@localhost", std::process::id());
        let dir = std::env::temp_dir().join(format!("bt-broker-{port}"));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // Our own config file: the machine's may pin the listener to 5672.
        let config = dir.join("rabbitmq.conf");
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{port}\n{extra_conf}\n");
        if let Some((ca, cert, key)) = tls {
            for (name, file) in [("ca.pem", ca), ("server.pem", cert), ("server.key", key)] {
                std::fs::copy(file, dir.join(name)).unwrap();
            }
            let d = dir.display();
            conf.push_str(&format!(
                "listeners.ssl.local = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {d}/ca.pem\nssl_options.certfile = {d}/server.pem\n\
                 ssl_options.keyfile = {d}/server.key\nssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n"
            ));
        }
        std::fs::write(&config, conf).unwrap();
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "chown of the private broker directory");
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_CONFIG_FILE", &config)
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("plugins"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", dir.join("ff"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmq-server");
        let broker = PrivateBroker {
            node,
            port,
            tls_port,
            dir,
        };
        if !status.success() {
            return Err(broker);
        }
        let url = broker.url();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(connection) = Connection::insecure_open(&url) {
                let _ = connection.close();
                return Ok(broker);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(broker)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl -n NODE args…`.
    pub fn ctl(&self, args: &[&str]) {
        self.ctl_output(args);
    }

    /// Runs `rabbitmqctl -n NODE args…`; its standard output.
    pub fn ctl_output(&self, args: &[&str]) -> String {
        let out = Command::new("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the node accepts AMQP connections (after `start_app`).
    pub fn wait_accepting(&self) {
        let url = self.url();
        poll(
            Duration::from_secs(120),
            "the node to accept connections",
            || {
                Connection::insecure_open(&url).ok().map(|c| {
                    let _ = c.close();
                })
            },
        );
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
