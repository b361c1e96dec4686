//! The JSON messages of the wire contract: jobs read from `execute.queue` and the
//! statuses published on `status.queue`.
//!
//! Decoding is strict about what it needs and quiet about what it found: an error
//! names the field and what was expected, never the value (the value could be a
//! token a control plane put in the wrong field).

use std::fmt;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

use crate::labels::Labels;

/// The longest `jobId` accepted, in bytes; job ids end up in logs, message ids and gRPC
/// calls. A jobId is the AMQP `message_id` of its status and events, a short string of
/// at most 255 bytes: amiquip would write a longer one's length in a single, wrapped
/// byte and corrupt the message's header frame.
pub const MAX_JOB_ID_LEN: usize = 255;

/// Whether `id` can name a job or a worker everywhere (threads, workspaces, log lines,
/// message ids): 1 to [`MAX_JOB_ID_LEN`] bytes, not blank, no control characters.
pub fn is_plain_id(id: &str) -> bool {
    !id.trim().is_empty() && id.len() <= MAX_JOB_ID_LEN && !id.chars().any(char::is_control)
}

/// The most `timeoutSeconds` means; a larger value is lowered to it (it is 136 years
/// either way). The worker's `timeoutSeconds` is a uint32, and grpcio turns a deadline's
/// seconds into an `i64`: from 2^63 seconds on, the deadline would wrap into the past and
/// the job time out at once.
pub const MAX_TIMEOUT_SECONDS: u64 = u32::MAX as u64;

/// What a secret is replaced with.
const MARKER: &str = "***";

/// Secrets shorter than this are not redacted: no real token is that short, and replacing
/// every `t` of a text would mangle it (a job's `imageUrl`, its logs) while hiding nothing.
pub const MIN_REDACTED_LEN: usize = 8;

/// A secret string: its `Debug` prints `***`, never the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret itself, for the one place that must send it on.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether [`Secret::redact`] replaces it: it is at least [`MIN_REDACTED_LEN`] bytes
    /// long. (An empty secret is simply absent.)
    pub fn is_redacted(&self) -> bool {
        self.0.len() >= MIN_REDACTED_LEN
    }

    /// Says once per process, for the first secret too short to be redacted, that it is
    /// left as it is (`what` names it: "the job's githubToken").
    pub fn warn_if_short(&self, what: &str) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        if !self.0.is_empty() && !self.is_redacted() {
            WARNED.call_once(|| {
                log::warn!(
                    "{what} is shorter than {MIN_REDACTED_LEN} bytes, too short to be a real \
                     secret: it is not redacted from logs and statuses (said once)"
                );
            });
        }
    }

    /// `text` with every occurrence of this secret replaced by `***`, unless the secret
    /// is too short to be real ([`Secret::is_redacted`]).
    ///
    /// A secret with a `*` in it can be formed again by a replacement and its neighbours
    /// (`x*******` in `xx***********` gives `x*******`), so it is replaced until none is
    /// left: each pass removes a character that is not a `*`, or shortens the text.
    pub fn redact(&self, text: &str) -> String {
        if !self.is_redacted() {
            return text.to_string();
        }
        let mut redacted = text.replace(&self.0, MARKER);
        while redacted.contains(self.0.as_str()) {
            redacted = redacted.replace(&self.0, MARKER);
        }
        redacted
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { MARKER })
    }
}

/// Which control plane's words a job came in: its status answers in the same ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dialect {
    /// DESIGN.md's job: `jobId`, `repoUrl`, `dockerfilePath`, `githubToken`, …
    #[default]
    Blacktree,
    /// The deployed control plane's job: `deploymentId`, `repository`, `dockerFilePath`,
    /// `token`; its status carries `deploymentId` too.
    Deployment,
}

/// A build job, as the control plane publishes it on `execute.queue`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Job {
    /// The control plane's id of the job; statuses carry it back.
    pub job_id: String,
    /// `owner/name`, a URL or a path of the git repository to build.
    pub repo_url: String,
    /// Branch (or other ref) to check out.
    pub branch: String,
    /// Dockerfile path, relative to `context_dir`.
    pub dockerfile_path: String,
    /// Build context directory, relative to the checkout.
    pub context_dir: String,
    /// Name (and tag) of the image to build.
    pub image_name: String,
    /// Token that lets the worker clone a private repository.
    pub github_token: Secret,
    /// The job's own deadline, overriding `--job-timeout`; at most [`MAX_TIMEOUT_SECONDS`].
    pub timeout_seconds: Option<u64>,
    /// The labels a worker must have to run it (none: any worker).
    pub labels: Labels,
    /// The words it came in. A deployment without `imageName` gets
    /// `--derived-image-prefix` + its id as image name (see [`Job::derive_image_name`]).
    pub dialect: Dialect,
}

/// Why a message on `execute.queue` is not a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Human-readable reason; it never quotes the message's values.
    pub reason: String,
    /// The message's `jobId` (or `deploymentId`), when one could be read.
    pub job_id: Option<String>,
    /// The words the message came in, for its `rejected` status.
    pub dialect: Dialect,
}

impl Job {
    /// Decodes a job message, enforcing the size limit first.
    pub fn decode(body: &[u8], max_bytes: usize) -> Result<Job, Rejection> {
        if body.len() > max_bytes {
            let (id, dialect) = scan_job_id(body);
            return Err(Rejection {
                reason: format!(
                    "message is {} bytes, above the limit of {max_bytes}",
                    body.len()
                ),
                job_id: id.and_then(|id| check_job_id(Some(&id), "jobId").ok()),
                dialect,
            });
        }
        let value: Value = serde_json::from_slice(body).map_err(|e| Rejection {
            reason: format!("not JSON ({})", syntax_position(&e)),
            job_id: None,
            dialect: Dialect::Blacktree,
        })?;
        let Value::Object(fields) = value else {
            return Err(Rejection {
                reason: "not a JSON object".to_string(),
                job_id: None,
                dialect: Dialect::Blacktree,
            });
        };
        let (job_id, dialect) = read_id(&fields);
        // A deployment whose two ids differ is answered by its `deploymentId`.
        let readable_id = job_id.as_ref().ok().cloned().or_else(|| {
            let deployment_id = fields.get("deploymentId");
            (dialect == Dialect::Deployment)
                .then(|| check_job_id(deployment_id, "deploymentId").ok())
                .flatten()
        });
        let reject = |reason: String| Rejection {
            reason,
            job_id: readable_id.clone(),
            dialect,
        };
        let job_id = job_id.map_err(&reject)?;
        // A field by its name in either dialect (ours first when both are there).
        let text = |name: &str| -> Result<String, Rejection> {
            let alias = ALIASES.iter().find(|(ours, _)| *ours == name).map(|a| a.1);
            let found = [Some(name), alias]
                .into_iter()
                .flatten()
                .find_map(|n| Some((n, fields.get(n)?)));
            match found {
                None | Some((_, Value::Null)) => Ok(String::new()),
                Some((_, Value::String(s))) => Ok(s.clone()),
                Some((n, _)) => Err(reject(format!("`{n}` must be a string"))),
            }
        };
        let timeout_seconds = match fields.get("timeoutSeconds") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(s) if s > 0 => Some(s.min(MAX_TIMEOUT_SECONDS)),
                _ => {
                    return Err(reject(
                        "`timeoutSeconds` must be a positive whole number".to_string(),
                    ))
                }
            },
        };
        let labels = Labels::from_json(fields.get("labels").unwrap_or(&Value::Null));
        Ok(Job {
            labels: labels.map_err(reject)?,
            repo_url: text("repoUrl")?,
            branch: text("branch")?,
            dockerfile_path: text("dockerfilePath")?,
            context_dir: text("contextDir")?,
            image_name: text("imageName")?,
            github_token: Secret::new(text("githubToken")?),
            timeout_seconds,
            job_id,
            dialect,
        })
    }

    /// Gives a deployment without `imageName` the name `prefix` + its id, as the deployed
    /// orchestrator did (`blacktree/<deploymentId>`).
    pub fn derive_image_name(&mut self, prefix: &str) {
        if self.dialect == Dialect::Deployment && self.image_name.is_empty() {
            self.image_name = format!("{prefix}{}", self.job_id);
        }
    }

    /// Encodes the job as the JSON message of the wire contract (used by `submit` and tests).
    pub fn to_json(&self) -> Value {
        let mut fields = serde_json::json!({
            "jobId": self.job_id,
            "repoUrl": self.repo_url,
            "branch": self.branch,
            "dockerfilePath": self.dockerfile_path,
            "contextDir": self.context_dir,
            "imageName": self.image_name,
            "githubToken": self.github_token.expose(),
        });
        if let Some(t) = self.timeout_seconds {
            fields["timeoutSeconds"] = t.into();
        }
        if !self.labels.is_empty() {
            fields["labels"] = self.labels.to_json();
        }
        fields
    }
}

/// Our field names and their names in the deployed control plane's jobs.
const ALIASES: [(&str, &str); 3] = [
    ("repoUrl", "repository"),
    ("dockerfilePath", "dockerFilePath"),
    ("githubToken", "token"),
];

/// Every field of a job message in either dialect (`createdAt` is read by nothing).
pub const FIELDS: [&str; 14] = [
    "jobId",
    "repoUrl",
    "branch",
    "dockerfilePath",
    "contextDir",
    "imageName",
    "githubToken",
    "timeoutSeconds",
    "labels",
    "deploymentId",
    "repository",
    "dockerFilePath",
    "token",
    "createdAt",
];

/// The job's id and dialect: `jobId`, or `deploymentId` when there is no `jobId`; both
/// must agree when both are there.
fn read_id(fields: &serde_json::Map<String, Value>) -> (Result<String, String>, Dialect) {
    match (fields.get("jobId"), fields.get("deploymentId")) {
        (None | Some(Value::Null), Some(id)) if !id.is_null() => {
            (check_job_id(Some(id), "deploymentId"), Dialect::Deployment)
        }
        (job_id, None | Some(Value::Null)) => (check_job_id(job_id, "jobId"), Dialect::Blacktree),
        (job_id, deployment_id) => {
            let id = check_job_id(job_id, "jobId");
            if id.is_ok() && job_id != deployment_id {
                let differ = "`jobId` and `deploymentId` differ".to_string();
                return (Err(differ), Dialect::Deployment);
            }
            (id, Dialect::Deployment)
        }
    }
}

/// The id of an oversized message, read the way a full decode reads it (only from a
/// JSON object; when a key repeats, the last one counts; `jobId` before
/// `deploymentId`), without keeping the rest of the message.
fn scan_job_id(body: &[u8]) -> (Option<Value>, Dialect) {
    use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

    struct JobIdOnly(Option<Value>, Option<Value>);

    impl<'de> Deserialize<'de> for JobIdOnly {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_map(JobIdOnlyVisitor)
        }
    }

    struct JobIdOnlyVisitor;

    impl<'de> Visitor<'de> for JobIdOnlyVisitor {
        type Value = JobIdOnly;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut fields: A) -> Result<JobIdOnly, A::Error> {
            let (mut job_id, mut deployment_id) = (None, None);
            while let Some(name) = fields.next_key::<String>()? {
                match name.as_str() {
                    "jobId" => job_id = Some(fields.next_value::<Value>()?),
                    "deploymentId" => deployment_id = Some(fields.next_value::<Value>()?),
                    _ => {
                        fields.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(JobIdOnly(job_id, deployment_id))
        }
    }

    match serde_json::from_slice::<JobIdOnly>(body) {
        Ok(JobIdOnly(Some(id), _)) => (Some(id), Dialect::Blacktree),
        Ok(JobIdOnly(None, Some(id))) => (Some(id), Dialect::Deployment),
        _ => (None, Dialect::Blacktree),
    }
}

/// Checks an id read from field `name`.
fn check_job_id(value: Option<&Value>, name: &str) -> Result<String, String> {
    match value {
        None | Some(Value::Null) => Err(format!("`{name}` is missing")),
        Some(Value::String(id)) if id.trim().is_empty() => Err(format!("`{name}` is empty")),
        Some(Value::String(id)) if id.len() > MAX_JOB_ID_LEN => {
            Err(format!("`{name}` is longer than {MAX_JOB_ID_LEN} bytes"))
        }
        Some(Value::String(id)) if id.chars().any(char::is_control) => {
            Err(format!("`{name}` contains control characters"))
        }
        Some(Value::String(id)) => Ok(id.clone()),
        Some(_) => Err(format!("`{name}` must be a string")),
    }
}

/// Where a JSON syntax error is, without quoting the input.
fn syntax_position(e: &serde_json::Error) -> String {
    format!("syntax error at line {} column {}", e.line(), e.column())
}

/// `at` as statuses and events spell times (RFC 3339, milliseconds, UTC).
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Decodes a cancel message (`{"jobId": "…"}` or `{"deploymentId": "…"}`); returns the id.
pub fn decode_cancel(body: &[u8]) -> Result<String, Rejection> {
    let rejection = |reason| Rejection {
        reason,
        job_id: None,
        dialect: Dialect::Blacktree,
    };
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        rejection(format!(
            "cancel message is not JSON ({})",
            syntax_position(&e)
        ))
    })?;
    let Value::Object(fields) = value else {
        return Err(rejection("cancel message: not a JSON object".to_string()));
    };
    read_id(&fields)
        .0
        .map_err(|reason| rejection(format!("cancel message: {reason}")))
}

/// A copy of a rejected message for the rejected queue: a JSON object's token fields
/// (`githubToken`, `token`) are replaced by `***`; anything else is kept unchanged.
pub fn without_secrets(body: Vec<u8>) -> Vec<u8> {
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    let mut changed = false;
    for name in ["githubToken", "token"] {
        if let Some(value @ Value::String(_)) = fields.get_mut(name) {
            *value = Value::String(MARKER.to_string());
            changed = true;
        }
    }
    if changed {
        serde_json::to_vec(&fields).expect("JSON serialises")
    } else {
        body
    }
}

/// How a job ended, as the `outcome` field of its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The worker built the job and reported success.
    Succeeded,
    /// The worker ran the job and reported failure, or refused it as invalid.
    Failed,
    /// The worker went away (connection lost, killed, stopped answering) while running it.
    WorkerLost,
    /// The job's deadline passed before the worker answered.
    TimedOut,
    /// The message was not a valid job; it was moved to the rejected queue.
    Rejected,
    /// The control plane cancelled the job (before or while it ran).
    Cancelled,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 6] = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::WorkerLost,
        Outcome::TimedOut,
        Outcome::Rejected,
        Outcome::Cancelled,
    ];

    /// The outcome as statuses and logs spell it (`succeeded`, `worker_lost`, …).
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::WorkerLost => "worker_lost",
            Outcome::TimedOut => "timed_out",
            Outcome::Rejected => "rejected",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A job's final status, published on `status.queue`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The job's id.
    pub job_id: String,
    /// The same id, for a job that came as a deployment (the deployed control plane
    /// reads its results by it); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    /// True only for [`Outcome::Succeeded`].
    pub success: bool,
    /// The worker's build logs (secrets redacted).
    pub logs: String,
    /// The pushed image reference, on success.
    pub image_url: String,
    /// Why the job failed; empty on success.
    pub error: String,
    /// The worker that ran (or was running) the job; empty when none did.
    pub worker_id: String,
    /// How the job ended.
    pub outcome: Outcome,
    /// When the job was sent to its worker (RFC 3339); `null` when it never was.
    pub started_at: Option<String>,
    /// When the job ended (RFC 3339).
    pub finished_at: String,
    /// Milliseconds from `startedAt` to `finishedAt` (0 when it never started).
    pub duration_ms: u64,
    /// The orchestrator that published it (`--instance-id`; set by its publisher).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub orchestrator_id: String,
}

impl Status {
    /// A status for a job that ended without a worker's answer.
    pub fn without_answer(
        job_id: &str,
        outcome: Outcome,
        worker_id: &str,
        error: String,
    ) -> Status {
        Status {
            job_id: job_id.to_string(),
            deployment_id: None,
            success: false,
            logs: String::new(),
            image_url: String::new(),
            error,
            worker_id: worker_id.to_string(),
            outcome,
            started_at: None,
            finished_at: rfc3339(SystemTime::now()),
            duration_ms: 0,
            orchestrator_id: String::new(),
        }
    }

    /// Speaks the job's dialect: a deployment's status carries `deploymentId` too.
    pub fn in_dialect(mut self, dialect: Dialect) -> Status {
        if dialect == Dialect::Deployment {
            self.deployment_id = Some(self.job_id.clone());
        }
        self
    }

    /// Sets the timings of a job that was sent to a worker at `started` and ends now.
    pub fn started(mut self, started: SystemTime) -> Status {
        let now = SystemTime::now();
        self.started_at = Some(rfc3339(started));
        self.finished_at = rfc3339(now);
        self.duration_ms = now
            .duration_since(started)
            .map_or(0, |d| d.as_millis() as u64);
        self
    }

    /// The JSON body of the status message.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a status always serialises")
    }
}

mod event;
mod fit;

pub use event::{Event, EventKind};
pub use fit::status_without_logs;

#[cfg(test)]
mod tests;
