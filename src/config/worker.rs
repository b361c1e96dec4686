//! Command-line and environment configuration of `blacktree worker`.

use std::time::Duration;

use clap::Args;

use super::{parse_duration, parse_host_port, parse_optional_host_port, TlsArgs};
use crate::labels::{parse_label, Label};

/// How the worker agent runs a job.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorKind {
    /// Clone, `docker build`, and push when a registry is configured.
    Docker,
    /// Clone (when `repoUrl` is set), then run `--exec-command` with `sh -c`.
    Exec,
}

/// Configuration of `blacktree worker`.
#[derive(Args, Debug, Clone)]
pub struct WorkerConfig {
    /// `HOST:PORT` of the orchestrator's gRPC server, or several, comma-separated (every
    /// orchestrator consuming the same queues): the worker registers and checks in with
    /// each.
    #[arg(
        long,
        env = "BLACKTREE_ORCHESTRATOR",
        default_value = "127.0.0.1:5051",
        value_delimiter = ',',
        required = true,
        value_parser = parse_host_port
    )]
    pub orchestrator: Vec<String>,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Address of the worker's `/metrics` (slots, jobs by outcome, step durations);
    /// empty: off.
    #[arg(long = "metrics-listen", env = "BLACKTREE_WORKER_METRICS_LISTEN", default_value = "",
          value_parser = parse_optional_host_port)]
    pub metrics_listen: String,

    /// Address the worker's JobService listens on.
    #[arg(long, env = "BLACKTREE_WORKER_LISTEN", default_value = "0.0.0.0:6000",
          value_parser = parse_host_port)]
    pub listen: String,

    /// `IP:PORT` the orchestrator reaches this worker at (default: the address of the
    /// interface that reaches the orchestrator, and the listening port).
    #[arg(long, env = "BLACKTREE_ADVERTISE", value_parser = parse_host_port)]
    pub advertise: Option<String>,

    /// Worker id (default: the hostname plus a random suffix).
    #[arg(long, env = "BLACKTREE_WORKER_ID")]
    pub id: Option<String>,

    /// Jobs this worker runs at once.
    #[arg(long, env = "BLACKTREE_CAPACITY", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub capacity: u32,

    /// Region reported at registration.
    #[arg(long, env = "BLACKTREE_REGION", default_value = "")]
    pub region: String,

    /// A label this worker offers, `KEY=VALUE` (repeatable; comma-separated in the
    /// environment). A job that requires labels goes only to a worker that has them
    /// all; the region is one too (`region=<region>`).
    #[arg(long = "label", env = "BLACKTREE_LABELS", value_delimiter = ',',
          value_parser = parse_label)]
    pub labels: Vec<Label>,

    /// How jobs are run.
    #[arg(long, env = "BLACKTREE_EXECUTOR", value_enum, default_value = "docker")]
    pub executor: ExecutorKind,

    /// Command run by the exec executor (`sh -c`), with the job in `BLACKTREE_*` variables.
    #[arg(
        long,
        env = "BLACKTREE_EXEC_COMMAND",
        required_if_eq("executor", "exec")
    )]
    pub exec_command: Option<String>,

    /// Base URL that `owner/name` repositories are cloned from.
    #[arg(
        long,
        env = "BLACKTREE_GIT_BASE_URL",
        default_value = "https://github.com"
    )]
    pub git_base_url: String,

    /// Accept jobs whose `repoUrl` is a local path or a `file://` URL (off: a job could
    /// read any repository on the worker's disk).
    #[arg(long, env = "BLACKTREE_ALLOW_LOCAL_REPOS")]
    pub allow_local_repos: bool,

    /// Registry that images are tagged for and pushed to (e.g. `registry.internal:5000`).
    #[arg(long, env = "BLACKTREE_REGISTRY")]
    pub registry: Option<String>,

    /// User for `docker login` to the registry.
    #[arg(
        long,
        env = "BLACKTREE_REGISTRY_USER",
        requires = "registry_password_file"
    )]
    pub registry_user: Option<String>,

    /// File holding the registry password (sent to `docker login` on stdin).
    #[arg(
        long,
        env = "BLACKTREE_REGISTRY_PASSWORD_FILE",
        requires = "registry_user"
    )]
    pub registry_password_file: Option<std::path::PathBuf>,

    /// Job logs are cut to their last this many bytes.
    #[arg(long, env = "BLACKTREE_MAX_LOG_BYTES", default_value_t = 1024 * 1024)]
    pub max_log_bytes: usize,

    /// Directory for job workspaces (each removed after its job) and the Docker config.
    #[arg(
        long,
        env = "BLACKTREE_WORK_DIR",
        default_value = "/var/lib/blacktree/worker"
    )]
    pub work_dir: std::path::PathBuf,

    /// The docker command.
    #[arg(long, env = "BLACKTREE_DOCKER", default_value = "docker")]
    pub docker: String,

    /// File holding the orchestrator's registration token, sent as `authorization: Bearer …`.
    #[arg(long, env = "BLACKTREE_REGISTRATION_TOKEN_FILE")]
    pub registration_token_file: Option<std::path::PathBuf>,

    /// Single-instance lock file (default: `/run/blacktree-worker-PORT.lock` as root; none
    /// when listening on port 0).
    #[arg(long, env = "BLACKTREE_LOCK_FILE")]
    pub lock_file: Option<std::path::PathBuf>,

    /// On SIGTERM/SIGINT, how long running jobs may take to finish before they are
    /// stopped (nothing new starts meanwhile; a second signal stops them at once).
    #[arg(long, env = "BLACKTREE_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How often the worker asks the orchestrator whether it still knows it.
    #[arg(long, env = "BLACKTREE_CHECK_IN_INTERVAL", default_value = "3s", value_parser = parse_duration)]
    pub check_in_interval: Duration,

    /// How long the answer of a job whose caller went away (an orchestrator restart) is
    /// kept for the next `RunJob` of that jobId (at most 1000 answers, 256 MiB).
    #[arg(long, env = "BLACKTREE_HOLD_RESULTS", default_value = "1h", value_parser = parse_duration)]
    pub hold_results: Duration,
}
