//! `blacktree watch`: statuses (and events) as they are published, read from a queue of
//! its own so it never takes a message from the control plane; `--job ID` follows one
//! job to its status, `--logs ID` prints its build output live first. It exits 1 when a
//! status it showed is not `succeeded`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use amiquip::{Channel, ConsumerMessage, ConsumerOptions, FieldTable, QueueDeclareOptions};
use clap::{ArgGroup, Args};
use serde_json::Value;

use super::progress::Progress;
use super::tools::{BrokerArgs, CliError};
use crate::amqp::declare_exchange;
use crate::config::{parse_duration, Topology};

/// `blacktree watch`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("one_job").args(["job", "logs"])))]
pub struct WatchArgs {
    /// The broker and the routing keys; with `--events-key`, events are shown too.
    #[command(flatten)]
    broker: BrokerArgs,
    /// Print each message as one JSON object with a `type` (`status` or `event`).
    #[arg(long)]
    json: bool,
    /// Keep watching until interrupted.
    #[arg(long, conflicts_with = "job")]
    follow: bool,
    /// Stop after this many statuses.
    #[arg(long, conflicts_with = "job")]
    count: Option<usize>,
    /// Without --follow: stop after this long without a message.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    idle: Duration,
    /// Follow this job (submitted elsewhere) until its status: exit 0 only when it
    /// succeeded. Waits without an idle limit, up to `--timeout` when given.
    #[arg(long)]
    job: Option<String>,
    /// Print this job's build output live (published on `--logs-key` by the
    /// orchestrator), then its status: exit 0 only when it succeeded. Our workers send
    /// output; the Go workers do not (only the status comes).
    #[arg(long, value_name = "JOBID", conflicts_with_all = ["job", "follow", "count"])]
    logs: Option<String>,
    /// With `--job` or `--logs`: how long to wait for its status.
    #[arg(long, requires = "one_job", value_parser = parse_duration)]
    timeout: Option<Duration>,
}

/// How a job ended, for the exit code.
pub struct Verdict(String);

impl Verdict {
    /// The verdict of a status.
    pub fn of(status: &Value) -> Verdict {
        Verdict(status["outcome"].as_str().unwrap_or("").to_string())
    }

    /// `Ok` when the job succeeded; otherwise exit code 1 naming its outcome.
    pub fn exit(&self, job_id: &str) -> Result<(), CliError> {
        if self.0 == "succeeded" {
            Ok(())
        } else {
            Err(CliError::failed(format!("job {job_id} ended {}", self.0)))
        }
    }
}

/// Prints statuses (and events) as they come.
pub fn watch(args: WatchArgs) -> Result<(), CliError> {
    let topology = &args.broker.topology;
    if args.logs.is_some() && !topology.logs_on() {
        return Err(CliError::failed(
            "--logs needs the orchestrator's --logs-key (or BLACKTREE_LOGS_KEY)",
        ));
    }
    let (connection, channel) = args.broker.connect()?;
    if let Some(job_id) = &args.logs {
        let consumer = own_queue(&channel, topology, &[topology.logs_key.as_str()])?;
        eprintln!(
            "watching {} for the output of job {job_id}",
            topology.exchange
        );
        let deadline = args.timeout.map(|t| Instant::now() + t);
        let status = follow_logs(&consumer, topology, job_id, deadline);
        let _ = connection.close();
        let status = status?;
        print_message(&status, true, args.json);
        return Verdict::of(&status).exit(job_id);
    }
    if let Some(job_id) = &args.job {
        let consumer = own_queue(&channel, topology, &progress_keys(topology))?;
        eprintln!("watching {} for job {job_id}", topology.exchange);
        let deadline = args.timeout.map(|t| Instant::now() + t);
        let status = wait_for_status(&consumer, topology, job_id, deadline);
        let _ = connection.close();
        let status = status?;
        print_message(&status, true, args.json);
        return Verdict::of(&status).exit(job_id);
    }
    let consumer = own_queue(&channel, topology, &[topology.events_key.as_str()])?;
    eprintln!(
        "watching {} (statuses{})",
        topology.exchange,
        if topology.events_key.is_empty() {
            ""
        } else {
            " and events"
        }
    );
    let started = Instant::now();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut statuses = 0;
    while args.count.is_none_or(|n| statuses < n) {
        let message = if args.follow {
            consumer.receiver().recv().ok()
        } else {
            consumer.receiver().recv_timeout(args.idle).ok()
        };
        let Some(ConsumerMessage::Delivery(delivery)) = message else {
            break;
        };
        let value: Value = serde_json::from_slice(&delivery.body).unwrap_or(Value::Null);
        let is_status = delivery.routing_key == topology.status_key;
        print_message(&value, is_status, args.json);
        if is_status {
            statuses += 1;
            let outcome = value["outcome"].as_str().unwrap_or("").to_string();
            *outcomes.entry(outcome).or_default() += 1;
            if args.follow && statuses % 10 == 0 {
                eprintln!("{}", summary(statuses, &outcomes, started.elapsed()));
            }
        }
    }
    let _ = connection.close();
    eprintln!("{}", summary(statuses, &outcomes, started.elapsed()));
    let failed: usize = outcomes
        .iter()
        .filter(|(outcome, _)| *outcome != "succeeded")
        .map(|(_, n)| n)
        .sum();
    if failed > 0 {
        return Err(CliError::failed(format!(
            "{failed} of {statuses} watched jobs did not succeed"
        )));
    }
    Ok(())
}

/// Prints a status or an event: one line, or one JSON object with its `type`.
fn print_message(value: &Value, is_status: bool, json: bool) {
    if !json {
        println!("{}", watch_line(value, is_status));
        return;
    }
    let mut value = value.clone();
    if let Value::Object(fields) = &mut value {
        let kind = if is_status { "status" } else { "event" };
        fields.insert("type".into(), Value::String(kind.into()));
    }
    println!("{value}");
}

/// The routing keys that tell a followed job's progress (events, and live output for
/// its steps), for [`own_queue`]; empty ones are skipped there.
pub fn progress_keys(topology: &Topology) -> [&str; 2] {
    [topology.events_key.as_str(), topology.logs_key.as_str()]
}

/// Reads `consumer` until `job_id`'s status, showing its progress on stderr (see
/// `progress`); an error when `deadline` passes first or the connection ends.
pub fn wait_for_status(
    consumer: &amiquip::Consumer<'_>,
    topology: &Topology,
    job_id: &str,
    deadline: Option<Instant>,
) -> Result<Value, CliError> {
    let mut progress = Progress::new(job_id);
    let status = follow(consumer, job_id, deadline, |delivery, value| {
        if delivery.routing_key == topology.logs_key {
            progress.output(value);
        } else {
            progress.event(value);
        }
    });
    match &status {
        Ok(status) => progress.finish(status),
        Err(_) => progress.abandon(),
    }
    status
}

/// Prints the lines of `job_id`'s output messages in `seq` order (a message seen twice,
/// republished after a lost channel, once) until its status.
fn follow_logs(
    consumer: &amiquip::Consumer<'_>,
    topology: &Topology,
    job_id: &str,
    deadline: Option<Instant>,
) -> Result<Value, CliError> {
    let mut next_seq = None;
    follow(consumer, job_id, deadline, |delivery, value| {
        if delivery.routing_key != topology.logs_key {
            return;
        }
        let seq = value["seq"].as_u64().unwrap_or(0);
        if next_seq.is_some_and(|next| seq < next) {
            return;
        }
        next_seq = Some(seq + 1);
        if let Some(dropped) = value["dropped"].as_u64() {
            eprintln!(
                "[... {dropped} lines dropped: the build printed faster than they were read ...]"
            );
        }
        for line in value["lines"].as_array().into_iter().flatten() {
            println!("{}", line.as_str().unwrap_or(""));
        }
    })
}

/// Reads `consumer` until `job_id`'s status, handing every message of that job before
/// it (and its JSON) to `each`; an error when `deadline` passes first or the connection
/// ends.
fn follow(
    consumer: &amiquip::Consumer<'_>,
    job_id: &str,
    deadline: Option<Instant>,
    mut each: impl FnMut(&amiquip::Delivery, &Value),
) -> Result<Value, CliError> {
    loop {
        let message = match deadline {
            Some(deadline) => consumer.receiver().recv_deadline(deadline),
            None => consumer
                .receiver()
                .recv()
                .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
        };
        match message {
            Ok(ConsumerMessage::Delivery(delivery)) => {
                let value: Value = serde_json::from_slice(&delivery.body).unwrap_or(Value::Null);
                if value["jobId"] != job_id {
                    continue;
                }
                if value.get("outcome").is_some() {
                    return Ok(value);
                }
                each(&delivery, &value);
            }
            Ok(_) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(CliError::failed(format!(
                    "the broker connection ended before job {job_id}'s status came"
                )))
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                return Err(CliError::failed(format!(
                    "no status for job {job_id} within the timeout"
                )))
            }
        }
    }
}

/// Consumes an exclusive, auto-deleted queue of its own bound to the status key and to
/// the non-empty keys of `also` (events, logs), so `watch` never takes a message from the
/// control plane's queues.
pub fn own_queue<'a>(
    channel: &'a Channel,
    topology: &Topology,
    also: &[&str],
) -> Result<amiquip::Consumer<'a>, CliError> {
    let amqp = |e: amiquip::Error| CliError::failed(format!("watching {}: {e}", topology.exchange));
    declare_exchange(channel, &topology.exchange).map_err(amqp)?;
    let queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
        )
        .map_err(amqp)?;
    for key in std::iter::once(topology.status_key.as_str()).chain(also.iter().copied()) {
        if key.is_empty() {
            continue;
        }
        channel
            .queue_bind(
                queue.name(),
                topology.exchange.as_str(),
                key,
                FieldTable::new(),
            )
            .map_err(amqp)?;
    }
    channel
        .basic_consume(
            queue.name(),
            ConsumerOptions {
                no_ack: true,
                ..ConsumerOptions::default()
            },
        )
        .map_err(amqp)
}

/// One status as a line: `jobId outcome worker=ID NNNms [error=…]`.
pub fn status_line(value: &Value) -> String {
    watch_line(value, true)
}

/// One line of `watch`: `jobId outcome worker=ID NNNms [error=…]` for a status,
/// `jobId event worker=ID` for an event.
fn watch_line(value: &Value, is_status: bool) -> String {
    let text = |key: &str| value[key].as_str().unwrap_or("");
    if !is_status {
        return format!(
            "{} {} worker={}",
            text("jobId"),
            text("event"),
            text("workerId")
        );
    }
    let error = text("error");
    format!(
        "{} {} worker={} {}ms{}",
        text("jobId"),
        text("outcome"),
        text("workerId"),
        value["durationMs"].as_u64().unwrap_or(0),
        if error.is_empty() {
            String::new()
        } else {
            format!(" error={error}")
        }
    )
}

fn summary(statuses: usize, outcomes: &BTreeMap<String, usize>, elapsed: Duration) -> String {
    let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{n} {o}")).collect();
    format!(
        "summary: {statuses} jobs in {:.1}s ({})",
        elapsed.as_secs_f64(),
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    )
}
