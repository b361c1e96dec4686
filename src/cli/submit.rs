//! `blacktree submit` and `blacktree cancel`: a job or a cancel published through the
//! broker, confirmed and routed to a queue (a message no queue takes is an error, not a
//! silent loss); with `--wait`, `submit` follows the job to its status.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use super::tools::{BrokerArgs, CliError};
use super::watch::{own_queue, progress_keys, status_line, wait_for_status, Verdict};
use crate::config::read_secret_file;
use crate::job::{Dialect, Job, Secret, FIELDS};
use crate::labels::{parse_label, Label, Labels};

/// `blacktree submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// A whole job message (JSON) from a file, or `-` for standard input. Its keys must
    /// be fields of a job (a misspelt one is refused with the nearest field).
    #[arg(long, conflicts_with_all = ["repo", "image"])]
    json: Option<String>,
    /// Repository: `owner/name`, a URL or a path.
    #[arg(long, required_unless_present = "json")]
    repo: Option<String>,
    /// Branch to build.
    #[arg(long, default_value = "main")]
    branch: String,
    /// Image name (and tag) to build.
    #[arg(long, required_unless_present = "json")]
    image: Option<String>,
    /// Dockerfile, relative to the context.
    #[arg(long, default_value = "Dockerfile")]
    dockerfile: String,
    /// Build context, relative to the repository.
    #[arg(long, default_value = ".")]
    context: String,
    /// File holding the token for a private repository.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The job's deadline (`30m`; a bare number is seconds); with `--wait`, also how
    /// long to wait for its status.
    #[arg(long, value_parser = parse_timeout)]
    timeout: Option<Duration>,
    /// The job's id (default: a new UUID).
    #[arg(long)]
    job_id: Option<String>,
    /// A label the worker must have, `KEY=VALUE` (repeatable).
    #[arg(long = "label", value_parser = parse_label, conflicts_with = "json")]
    labels: Vec<Label>,
    /// Wait for the job's status and print it: exit 0 only when it succeeded, 1 when it
    /// did not (or no status came within `--timeout`), 4 when the broker is unreachable.
    #[arg(long)]
    wait: bool,
    /// With `--wait`: print the status as `text` (one line) or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"], requires = "wait")]
    output: String,
}

/// A duration like every other flag's (`5m`), or a bare number of seconds (as older
/// versions took it).
fn parse_timeout(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => crate::config::parse_duration(text),
    }
}

/// Publishes a job; prints its jobId, or with `--wait` its status.
pub fn submit(args: SubmitArgs) -> Result<(), CliError> {
    let (body, job) = job_message(&args)?;
    let (connection, channel) = args.broker.connect()?;
    let topology = &args.broker.topology;
    // Listening before publishing: the status cannot come before we look for it.
    let statuses = if args.wait {
        Some(own_queue(&channel, topology, &progress_keys(topology))?)
    } else {
        None
    };
    let key = &topology.execute_key;
    args.broker
        .publish_confirmed(&channel, key, &body, &job.job_id)?;
    let Some(statuses) = statuses else {
        let _ = connection.close();
        println!("{}", job.job_id);
        return Ok(());
    };
    eprintln!("submitted {}; waiting for its status", job.job_id);
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let status = wait_for_status(&statuses, topology, &job.job_id, deadline);
    let _ = connection.close();
    let status = status?;
    if args.output == "json" {
        println!("{status}");
    } else {
        println!("{}", status_line(&status));
    }
    Verdict::of(&status).exit(&job.job_id)
}

/// The job message to publish (from `--json` or the flags, with a jobId) and the job it
/// decodes to.
fn job_message(args: &SubmitArgs) -> Result<(Vec<u8>, Job), CliError> {
    let mut message = match &args.json {
        Some(source) => read_job(source)?,
        None => {
            let token = read_secret_file(args.token_file.as_deref(), "token")
                .map_err(CliError::failed)?
                .unwrap_or_else(|| Secret::new(String::new()));
            let job = Job {
                job_id: String::new(),
                repo_url: args.repo.clone().unwrap_or_default(),
                branch: args.branch.clone(),
                dockerfile_path: args.dockerfile.clone(),
                context_dir: args.context.clone(),
                image_name: args.image.clone().unwrap_or_default(),
                github_token: token,
                timeout_seconds: None,
                labels: Labels::new(args.labels.clone()).map_err(CliError::failed)?,
                dialect: Dialect::Blacktree,
            };
            job.to_json()
        }
    };
    let Value::Object(fields) = &mut message else {
        return Err(CliError::failed("a job must be a JSON object"));
    };
    if let Some(timeout) = args.timeout {
        fields.insert("timeoutSeconds".into(), json!(timeout.as_secs().max(1)));
    }
    let missing_id = fields
        .get("jobId")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    if let Some(id) = &args.job_id {
        fields.insert("jobId".into(), json!(id));
    } else if missing_id && !fields.contains_key("deploymentId") {
        fields.insert("jobId".into(), json!(uuid::Uuid::new_v4().to_string()));
    }
    let body = serde_json::to_vec(&message).expect("JSON serialises");
    let job = Job::decode(&body, usize::MAX)
        .map_err(|r| CliError::failed(format!("not a valid job: {}", r.reason)))?;
    Ok((body, job))
}

/// Reads a job message from a file (or `-`: standard input); every key must be a job
/// field.
fn read_job(source: &str) -> Result<Value, CliError> {
    let mut text = String::new();
    let read = if source == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(source).map(|t| text = t)
    };
    read.map_err(|e| CliError::failed(format!("reading the job from {source}: {e}")))?;
    let value = serde_json::from_str::<Value>(&text).map_err(|e| {
        CliError::failed(format!(
            "the job in {source} is not JSON: line {} column {}",
            e.line(),
            e.column()
        ))
    })?;
    if let Value::Object(fields) = &value {
        if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            let shown: String = unknown.chars().take(64).collect();
            return Err(CliError::failed(format!(
                "the job in {source} has an unknown field {shown:?}: did you mean {:?}? \
                 (fields: {})",
                nearest(unknown),
                FIELDS.join(", ")
            )));
        }
    }
    Ok(value)
}

/// The job field closest to `name`: the same but for case, or the fewest edits.
fn nearest(name: &str) -> &'static str {
    let lower = name.to_lowercase();
    FIELDS
        .iter()
        .min_by_key(|field| {
            let field = field.to_lowercase();
            (field != lower, edit_distance(&field, &lower))
        })
        .copied()
        .expect("fields are listed")
}

/// Levenshtein distance (by characters).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// `blacktree cancel`.
#[derive(Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The job to cancel.
    job_id: String,
}

/// Publishes a cancel request.
pub fn cancel(args: CancelArgs) -> Result<(), CliError> {
    let body = serde_json::to_vec(&json!({ "jobId": args.job_id })).expect("JSON serialises");
    let (connection, channel) = args.broker.connect()?;
    let key = &args.broker.topology.cancel_key;
    let published = args
        .broker
        .publish_confirmed(&channel, key, &body, &args.job_id);
    let _ = connection.close();
    published?;
    println!("cancel requested for {}", args.job_id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_field_is_answered_with_the_nearest_one() {
        assert_eq!(nearest("repoURL"), "repoUrl");
        assert_eq!(nearest("dockerfilepath"), "dockerfilePath");
        assert_eq!(nearest("imagename"), "imageName");
        assert_eq!(nearest("brnch"), "branch");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn timeouts_are_durations_or_seconds() {
        assert_eq!(parse_timeout("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_timeout("900"), Ok(Duration::from_secs(900)));
        assert!(parse_timeout("soon").is_err());
    }
}
