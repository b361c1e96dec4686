//! Runs one job on the worker: clone, then `docker build` (and push), or the exec
//! command. Every step runs in a process group of its own, so a cancel kills the whole
//! step; output of all steps is kept (the tail, up to the log limit) with every secret
//! redacted.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use super::checks::{self, CheckedJob};
use super::live_log::LiveLog;
use super::workspace::{WorkDir, Workspace};
use crate::config::{ExecutorKind, WorkerConfig};
use crate::job::Secret;
use crate::proto::job::{JobRequest, JobResponse};

/// Lets another thread stop a running job: `cancel` kills the process group of the step
/// that runs, and every later step is skipped.
#[derive(Default)]
pub struct JobControl {
    state: Mutex<ControlState>,
}

#[derive(Default)]
struct ControlState {
    /// Why the job was stopped, once it was.
    reason: Option<String>,
    /// Process group of the running step.
    group: Option<i32>,
}

impl JobControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().expect("job control lock")
    }

    /// Stops the job (the first reason wins); returns false when it was already stopped.
    pub fn cancel(&self, reason: &str) -> bool {
        let mut state = self.lock();
        if state.reason.is_some() {
            return false;
        }
        state.reason = Some(reason.to_string());
        if let Some(group) = state.group {
            kill_group(group);
        }
        true
    }

    /// Why the job was stopped, if it was.
    pub fn reason(&self) -> Option<String> {
        self.lock().reason.clone()
    }

    /// Records the group of a step that just started; kills it if the job was stopped.
    fn started(&self, group: i32) {
        let mut state = self.lock();
        state.group = Some(group);
        if state.reason.is_some() {
            kill_group(group);
        }
    }

    fn finished(&self) {
        self.lock().group = None;
    }
}

fn kill_group(group: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

/// How a step failed.
enum StepError {
    /// The job was stopped (cancel or deadline).
    Stopped(String),
    /// The step failed; the text says which and how.
    Failed(String),
}

/// A registry to push to.
struct RegistryLogin {
    host: String,
    credentials: Option<(String, Secret)>,
}

/// Runs jobs as the worker's configuration says.
pub struct Executor {
    kind: ExecutorKind,
    exec_command: String,
    git_base_url: String,
    allow_local_repos: bool,
    registry: Option<RegistryLogin>,
    max_log_bytes: usize,
    work_dir: WorkDir,
    docker: String,
    /// Seconds each step took, by step (the worker's `/metrics`).
    step_seconds: prometheus::HistogramVec,
}

impl Executor {
    /// Opens the work directory and reads the registry password file; step durations
    /// go to `step_seconds`.
    pub fn new(
        config: &WorkerConfig,
        step_seconds: prometheus::HistogramVec,
    ) -> Result<Executor, String> {
        let work_dir = WorkDir::open(&config.work_dir)?;
        let credentials = match (&config.registry_user, &config.registry_password_file) {
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(file).map_err(|e| {
                    format!("reading the registry password file {}: {e}", file.display())
                })?;
                Some((
                    user.clone(),
                    Secret::new(password.trim_end_matches(['\r', '\n']).to_string()),
                ))
            }
            _ => None,
        };
        Ok(Executor {
            kind: config.executor,
            exec_command: config.exec_command.clone().unwrap_or_default(),
            git_base_url: config.git_base_url.clone(),
            allow_local_repos: config.allow_local_repos,
            registry: config
                .registry
                .clone()
                .map(|host| RegistryLogin { host, credentials }),
            max_log_bytes: config.max_log_bytes,
            work_dir,
            docker: config.docker.clone(),
            step_seconds,
        })
    }

    /// Runs `job` to its end (or until `control` stops it) and returns the answer; its
    /// output goes to `live` too, line by line, as it is printed.
    pub fn run(&self, job: &JobRequest, control: &JobControl, live: &LiveLog) -> JobResponse {
        let mut response = JobResponse {
            jobId: job.jobId.clone(),
            ..JobResponse::default()
        };
        let sources = checks::Sources {
            git_base_url: &self.git_base_url,
            allow_local: self.allow_local_repos,
        };
        let checked = match checks::check(job, sources) {
            Ok(checked) => checked,
            Err(e) => {
                response.error = format!("invalid job: {e}");
                return response;
            }
        };
        let token = Secret::new(job.githubToken.clone());
        token.warn_if_short("a job's githubToken");
        let mut secrets = vec![token.clone()];
        secrets.extend(
            self.registry
                .iter()
                .filter_map(|r| r.credentials.as_ref().map(|c| c.1.clone())),
        );
        let mut log = JobLog::new(self.max_log_bytes, secrets, live);
        let workspace = match self.work_dir.workspace(&job.jobId) {
            Ok(w) => w,
            Err(e) => {
                response.error = e;
                return response;
            }
        };
        let result = self.steps(job, &checked, &token, &workspace, &mut log, control);
        match result {
            Ok(image_url) => {
                response.success = true;
                response.imageUrl = image_url;
            }
            Err(StepError::Stopped(reason)) => response.error = reason,
            Err(StepError::Failed(error)) => response.error = error,
        }
        response.error = log.redact(&response.error);
        response.logs = log.finish();
        response
    }

    fn steps(
        &self,
        job: &JobRequest,
        checked: &CheckedJob,
        token: &Secret,
        workspace: &Workspace,
        log: &mut JobLog<'_>,
        control: &JobControl,
    ) -> Result<String, StepError> {
        let checkout = workspace.path().join("src");
        if let Some(source) = &checked.source {
            self.clone_repo(source, &checked.branch, token, &checkout, log, control)?;
        }
        match self.kind {
            ExecutorKind::Exec => {
                let cwd = if checked.source.is_some() {
                    &checkout
                } else {
                    workspace.path()
                };
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(&self.exec_command).current_dir(cwd);
                for (name, value) in [
                    ("JOB_ID", &job.jobId),
                    ("REPO_URL", &job.repoUrl),
                    ("BRANCH", &job.branch),
                    ("DOCKERFILE_PATH", &job.dockerfilePath),
                    ("CONTEXT_DIR", &job.contextDir),
                    ("IMAGE_NAME", &job.imageName),
                    ("GITHUB_TOKEN", &job.githubToken),
                ] {
                    cmd.env(format!("BLACKTREE_{name}"), value);
                }
                cmd.env("BLACKTREE_WORKSPACE", workspace.path());
                self.step("exec command", cmd, None, log, control)?;
                Ok(String::new())
            }
            ExecutorKind::Docker => {
                if checked.source.is_none() {
                    return Err(StepError::Failed(
                        "invalid job: repoUrl is required to build an image".into(),
                    ));
                }
                if checked.image_name.is_empty() {
                    return Err(StepError::Failed(
                        "invalid job: imageName is required to build an image".into(),
                    ));
                }
                self.build_and_push(checked, &checkout, log, control)
            }
        }
    }

    fn clone_repo(
        &self,
        source: &str,
        branch: &str,
        token: &Secret,
        checkout: &Path,
        log: &mut JobLog<'_>,
        control: &JobControl,
    ) -> Result<(), StepError> {
        let mut cmd = Command::new("git");
        if let Some((protocol, host)) = credential_target(source) {
            if !token.expose().is_empty() {
                cmd.args(["-c", "credential.helper="])
                    .args(["-c", &format!("credential.helper={CREDENTIAL_HELPER}")])
                    .env("BLACKTREE_GIT_TOKEN", token.expose())
                    .env("BLACKTREE_GIT_PROTOCOL", protocol)
                    .env("BLACKTREE_GIT_HOST", host);
            }
        }
        cmd.args(["clone", "--depth", "1", "--single-branch"]);
        if !branch.is_empty() {
            cmd.args(["--branch", branch]);
        }
        cmd.arg("--")
            .arg(source)
            .arg(checkout)
            .env("GIT_TERMINAL_PROMPT", "0");
        self.step("git clone", cmd, None, log, control)
    }

    fn build_and_push(
        &self,
        checked: &CheckedJob,
        checkout: &Path,
        log: &mut JobLog<'_>,
        control: &JobControl,
    ) -> Result<String, StepError> {
        let context = inside(checkout, &checked.context_dir, "contextDir")?;
        let dockerfile = inside(
            checkout,
            &context.join(&checked.dockerfile),
            "dockerfilePath",
        )?;
        let tag = match &self.registry {
            Some(registry) => format!("{}/{}", registry.host, checked.image_name),
            None => checked.image_name.clone(),
        };
        let mut build = self.docker_command();
        build
            .arg("build")
            .arg("--force-rm")
            .arg("-f")
            .arg(&dockerfile)
            .arg("-t")
            .arg(&tag)
            .arg(&context);
        self.step("docker build", build, None, log, control)?;
        let Some(registry) = &self.registry else {
            return Ok(tag);
        };
        if let Some((user, password)) = &registry.credentials {
            let mut login = self.docker_command();
            login.args([
                "login",
                &registry.host,
                "--username",
                user,
                "--password-stdin",
            ]);
            self.step(
                "docker login",
                login,
                Some(password.expose().as_bytes()),
                log,
                control,
            )?;
        }
        let mut push = self.docker_command();
        push.arg("push").arg(&tag);
        self.step("docker push", push, None, log, control)?;
        Ok(tag)
    }

    fn docker_command(&self) -> Command {
        let mut cmd = Command::new(&self.docker);
        cmd.env("DOCKER_CONFIG", self.work_dir.docker_config());
        cmd
    }
}

/// `base/relative`, resolved through symlinks, must stay inside `base`.
fn inside(base: &Path, relative: &Path, field: &str) -> Result<PathBuf, StepError> {
    let fail = |why: &str| StepError::Failed(format!("invalid job: {field} {why}"));
    let base = base
        .canonicalize()
        .map_err(|_| fail("has no checkout to resolve in"))?;
    let path = base
        .join(relative)
        .canonicalize()
        .map_err(|_| fail("does not exist in the repository"))?;
    if path.starts_with(&base) {
        Ok(path)
    } else {
        Err(fail("must stay inside the repository"))
    }
}

impl Executor {
    /// [`run_step`], timed into `step_seconds` under the step's kind (the last word of
    /// its title: `clone`, `build`, `login`, `push`, or `exec` for the exec command).
    fn step(
        &self,
        title: &str,
        cmd: Command,
        stdin: Option<&[u8]>,
        log: &mut JobLog<'_>,
        control: &JobControl,
    ) -> Result<(), StepError> {
        let started = std::time::Instant::now();
        let result = run_step(title, cmd, stdin, log, control);
        let kind = match title {
            "exec command" => "exec",
            title => title.rsplit(' ').next().unwrap_or(title),
        };
        self.step_seconds
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

/// Runs one step in a process group of its own, its stdout and stderr into `log`.
fn run_step(
    title: &str,
    mut cmd: Command,
    stdin: Option<&[u8]>,
    log: &mut JobLog<'_>,
    control: &JobControl,
) -> Result<(), StepError> {
    if let Some(reason) = control.reason() {
        return Err(StepError::Stopped(reason));
    }
    log.note(&format!("$ {title}\n"));
    let failed = |e: std::io::Error| StepError::Failed(format!("{title} could not start: {e}"));
    let (mut reader, writer) = std::io::pipe().map_err(failed)?;
    die_with_agent(&mut cmd);
    cmd.process_group(0)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(writer.try_clone().map_err(failed)?)
        .stderr(writer);
    let mut child = cmd.spawn().map_err(failed)?;
    // Our copies of the pipe's write end must go, or reading never ends.
    drop(cmd);
    control.started(child.id() as i32);
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A step that exits without reading its input fails on its own.
        let _ = pipe.write_all(input);
    }
    let mut chunk = [0u8; 8192];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => log.push(&chunk[..n]),
        }
    }
    let status = child.wait();
    control.finished();
    if let Some(reason) = control.reason() {
        return Err(StepError::Stopped(reason));
    }
    match status {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(StepError::Failed(format!("{title} failed ({status})"))),
        Err(e) => Err(StepError::Failed(format!("{title}: {e}"))),
    }
}

/// The credential helper that gives git the job's token. It answers only a `get` for
/// the protocol and host of the job's repository, so a redirect to another host (or from
/// https to plain http) gets nothing; it reads the token from the environment, so the
/// token is never in argv, in a URL or in the checkout's .git/config.
pub const CREDENTIAL_HELPER: &str = r#"!f() { [ "$1" = get ] || exit 0; p=; h=; while read -r l; do [ -z "$l" ] && break; case "$l" in protocol=*) p=${l#protocol=};; host=*) h=${l#host=};; esac; done; [ "$p" = "$BLACKTREE_GIT_PROTOCOL" ] && [ "$h" = "$BLACKTREE_GIT_HOST" ] || exit 0; echo username=x-access-token; echo "password=$BLACKTREE_GIT_TOKEN"; }; f"#;

/// The protocol and host (with its port, as git names it) a token may be given to: those
/// of an `https://` or `http://` repository URL; none for other sources.
fn credential_target(source: &str) -> Option<(String, String)> {
    let url = url::Url::parse(source).ok()?;
    if !matches!(url.scheme(), "https" | "http") {
        return None;
    }
    let host = url.host_str()?;
    let host = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    Some((url.scheme().to_string(), host))
}

/// Makes the step's process get SIGKILL when the agent dies: a SIGKILLed agent cannot
/// stop its steps itself, and a restarted one would otherwise run beside them. Only the
/// step's own process gets the signal: `git` and the `docker` client (whose build the
/// engine cancels when the client goes), or the exec executor's `sh`, whose children
/// live on unless the command `exec`s them.
fn die_with_agent(cmd: &mut Command) {
    let agent = std::process::id();
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent may have died before the signal was armed.
            if libc::getppid() as u32 != agent {
                return Err(std::io::Error::other("the worker agent is gone"));
            }
            Ok(())
        });
    }
}

mod job_log;

use job_log::JobLog;

#[cfg(test)]
mod tests;
