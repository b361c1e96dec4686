//! Log lines on stderr (`RUST_LOG`, `info` by default): text, or one JSON object per
//! line (`--log-format json`: time, level, target, message, and jobId / workerId /
//! orchestratorId when the line names them). Timestamps are left out where the log
//! collector adds its own (`--log-timestamps auto`: under journald or runit's svlogd).

use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};

pub use crate::log_sink::flush;
use crate::log_sink::LogSink;

/// How log lines look.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// `text` (one line per event) or `json` (one object per line).
    #[arg(
        long,
        env = "BLACKTREE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Whether lines carry a timestamp: `auto` leaves it out under journald
    /// (`JOURNAL_STREAM`) or runit (a `runsv` parent, whose svlogd stamps lines).
    #[arg(
        long,
        env = "BLACKTREE_LOG_TIMESTAMPS",
        value_enum,
        default_value = "auto",
        global = true
    )]
    pub log_timestamps: LogTimestamps,
}

/// `--log-format`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--log-timestamps`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTimestamps {
    Auto,
    Always,
    Never,
}

/// Sets up the logger; once an orchestrator knows its instance id, every line carries it.
pub fn init(args: &LogArgs) {
    let stamped = match args.log_timestamps {
        LogTimestamps::Always => true,
        LogTimestamps::Never => false,
        LogTimestamps::Auto => !collector_stamps_lines(),
    };
    let filter =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    log::set_max_level(filter.filter());
    let logger = Logger {
        filter,
        json: args.log_format == LogFormat::Json,
        stamped,
        sink: LogSink::start(),
    };
    // Only fails when a logger is set already.
    let _ = log::set_boxed_logger(Box::new(logger));
}

/// The process's logger: env_logger's filter (`RUST_LOG`), this module's lines, and
/// [`LogSink`] to write them (env_logger's own writer holds a lock across each write).
struct Logger {
    filter: env_logger::Logger,
    json: bool,
    stamped: bool,
    sink: LogSink,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.filter.matches(record) {
            self.sink.write(self.line(record).as_bytes());
        }
    }

    fn flush(&self) {
        flush();
    }
}

impl Logger {
    /// The line of `record`, with its newline, built in one buffer (lines are written
    /// several times per job).
    fn line(&self, record: &log::Record<'_>) -> String {
        let id = crate::instance::in_logs();
        let time = self
            .stamped
            .then(|| humantime::format_rfc3339_seconds(std::time::SystemTime::now()));
        if self.json {
            let message = record.args().to_string();
            let time = time.map(|time| time.to_string());
            let line = json_line(time.as_deref(), record, &message, id);
            return format!("{line}\n");
        }
        text_line(time, record, id)
    }
}

/// One text log line, with its newline: `[TIME LEVEL ORCHESTRATOR TARGET] MESSAGE`,
/// without the time and orchestrator when there are none.
fn text_line(
    time: Option<humantime::Rfc3339Timestamp>,
    record: &log::Record<'_>,
    orchestrator: Option<&str>,
) -> String {
    use std::fmt::Write;
    let mut line = String::with_capacity(160);
    // Writing to a String cannot fail.
    line.push('[');
    if let Some(time) = time {
        let _ = write!(line, "{time} ");
    }
    let _ = write!(line, "{:<5} ", record.level());
    if let Some(id) = orchestrator {
        let _ = write!(line, "{id} ");
    }
    let _ = writeln!(line, "{}] {}", record.target(), record.args());
    line
}

/// One JSON log line.
fn json_line(
    time: Option<&str>,
    record: &log::Record<'_>,
    message: &str,
    orchestrator: Option<&str>,
) -> Value {
    let mut line = Map::new();
    if let Some(time) = time {
        line.insert("time".into(), json!(time));
    }
    line.insert("level".into(), json!(record.level().as_str()));
    line.insert("target".into(), json!(record.target()));
    line.insert("message".into(), json!(message));
    let (job_id, worker_id) = ids(message);
    if let Some(job_id) = job_id {
        line.insert("jobId".into(), json!(job_id));
    }
    if let Some(worker_id) = worker_id {
        line.insert("workerId".into(), json!(worker_id));
    }
    if let Some(id) = orchestrator {
        line.insert("orchestratorId".into(), json!(id));
    }
    Value::Object(line)
}

/// The jobId and workerId a log line is about, by the lines' conventions: a job's lines
/// start `job ID: …` (and name their worker as `… worker ID …`), a worker's start
/// `worker ID …`.
fn ids(message: &str) -> (Option<&str>, Option<&str>) {
    fn token(text: &str) -> Option<&str> {
        text.split([' ', ':', ',', ';', '(', ')'])
            .next()
            .filter(|id| !id.is_empty())
    }
    if let Some(rest) = message.strip_prefix("job ") {
        let job_id = rest
            .split_once(':')
            .map(|(id, _)| id)
            .filter(|id| !id.contains(' '));
        let worker_id = rest
            .split_once(" worker ")
            .and_then(|(_, after)| token(after));
        return (job_id, worker_id);
    }
    (None, message.strip_prefix("worker ").and_then(token))
}

/// Whether the log collector stamps lines itself: journald gives services
/// `JOURNAL_STREAM`; runit's log service (svlogd) reads a process run by `runsv`.
fn collector_stamps_lines() -> bool {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        return true;
    }
    let parent = std::os::unix::process::parent_id();
    std::fs::read_to_string(format!("/proc/{parent}/comm")).is_ok_and(|comm| comm.trim() == "runsv")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ids_a_line_is_about_are_found() {
        let ids = super::ids;
        assert_eq!(
            ids("job j-1: dispatched to worker w-7 (slot 2)"),
            (Some("j-1"), Some("w-7"))
        );
        assert_eq!(ids("job j-2: received"), (Some("j-2"), None));
        assert_eq!(
            ids("worker w-3 (127.0.0.1:1) failed 2 pings"),
            (None, Some("w-3"))
        );
        assert_eq!(ids("no job here, and no worker either"), (None, None));
        assert_eq!(ids("job queue empty: nothing"), (None, None));
    }

    #[test]
    fn a_text_line_has_its_parts_in_order() {
        let message = format_args!("job a: dispatched to worker b");
        let record = log::Record::builder()
            .level(log::Level::Info)
            .target("blacktree::x")
            .args(message)
            .build();
        let epoch = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH);
        assert_eq!(
            text_line(Some(epoch), &record, Some("o:1")),
            "[1970-01-01T00:00:00Z INFO  o:1 blacktree::x] job a: dispatched to worker b\n"
        );
        assert_eq!(
            text_line(None, &record, None),
            "[INFO  blacktree::x] job a: dispatched to worker b\n"
        );
    }

    #[test]
    fn a_json_line_has_the_fields_and_no_time_when_unstamped() {
        let record = log::Record::builder()
            .level(log::Level::Warn)
            .target("blacktree::x")
            .build();
        let line = json_line(None, &record, "job a: lost on worker b", Some("o:1"));
        assert_eq!(
            line,
            json!({"level": "WARN", "target": "blacktree::x", "message": "job a: lost on worker b",
                   "jobId": "a", "workerId": "b", "orchestratorId": "o:1"})
        );
        assert_eq!(json_line(Some("T"), &record, "m", None)["time"], "T");
    }
}
