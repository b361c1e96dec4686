//! The real build environment for worker tests: Debian's Docker engine, a
//! `docker-registry` with htpasswd auth on 127.0.0.1, a busybox base image made with
//! `docker import`, git repositories made on the spot, and `blacktree worker` processes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{free_port, poll, LoggedChild};

/// The base image for `RUN` steps (no image can be pulled here).
pub const BASE_IMAGE: &str = "bt-busybox:test";
/// Registry credentials used by the tests.
pub const REGISTRY_USER: &str = "btuser";
pub const REGISTRY_PASSWORD: &str = "bt-REGISTRY-pass-42";

/// Runs a command, asserting it succeeds; returns its stdout.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("bt-{tag}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes sure the Docker engine answers and the base image exists (once per test binary).
pub fn docker_ready() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        assert!(
            Command::new("docker")
                .arg("info")
                .output()
                .is_ok_and(|o| o.status.success()),
            "the Docker engine must be running (scripts/setup.sh starts it)"
        );
        if sh(&format!("docker images -q {BASE_IMAGE}"))
            .trim()
            .is_empty()
        {
            let root = TempDir::new("rootfs");
            let bin = root.0.join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
            for tool in ["sh", "sleep", "echo", "cat", "ls", "true", "false", "env"] {
                std::os::unix::fs::symlink("busybox", bin.join(tool)).unwrap();
            }
            sh(&format!(
                "tar -C {} -c . | docker import - {BASE_IMAGE}",
                root.0.display()
            ));
        }
    });
}

/// A git repository with one commit on `main` holding `files`.
pub fn git_repo(files: &[(&str, &str)]) -> TempDir {
    let repo = TempDir::new("repo");
    for (name, content) in files {
        let path = repo.0.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let dir = repo.0.display();
    sh(&format!(
        "cd {dir} && git init -q -b main && git add -A && \
         git -c user.name=t -c user.email=t@t commit -qm init"
    ));
    repo
}

/// `docker-registry` on 127.0.0.1 with htpasswd auth, stopped on drop.
pub struct Registry {
    pub addr: String,
    child: Child,
    _dir: TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = TempDir::new("registry");
        let port = free_port();
        let htpasswd = dir.0.join("htpasswd");
        sh(&format!(
            "htpasswd -Bbn {REGISTRY_USER} {REGISTRY_PASSWORD} > {}",
            htpasswd.display()
        ));
        let config = dir.0.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.0.join("data").display(),
                htpasswd.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry");
        let addr = format!("127.0.0.1:{port}");
        poll(Duration::from_secs(30), "the registry to listen", || {
            std::net::TcpStream::connect(&addr).ok()
        });
        Registry {
            addr,
            child,
            _dir: dir,
        }
    }

    /// Pushes local `image` as `reference` (`repository:tag`), so that its layers are
    /// in `repository` before workers push images built on it: docker-registry can
    /// answer 500 to two concurrent uploads of one layer to one repository.
    pub fn seed(&self, image: &str, reference: &str) {
        let config = TempDir::new("seed-docker-config");
        let (addr, dir) = (&self.addr, config.0.display());
        sh(&format!(
            "echo {REGISTRY_PASSWORD} | DOCKER_CONFIG={dir} docker login {addr} -u {REGISTRY_USER} \
             --password-stdin >/dev/null 2>&1 && docker tag {image} {addr}/{reference} && \
             DOCKER_CONFIG={dir} docker push -q {addr}/{reference} >/dev/null && \
             docker rmi {addr}/{reference} >/dev/null"
        ));
    }

    /// The tags of `repository`, read from the registry's HTTP API.
    pub fn tags(&self, repository: &str) -> String {
        sh(&format!(
            "curl -sf -u {REGISTRY_USER}:{REGISTRY_PASSWORD} http://{}/v2/{repository}/tags/list",
            self.addr
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An orchestrator port nobody listens on (port 1 is never handed out as a free port),
/// for worker tests that call `RunJob` directly: check-ins are refused at once.
pub const NO_ORCHESTRATOR: u16 = 1;

/// The environment variable that marks a worker's processes (it and everything it
/// starts inherit it), so a test looks at its own worker's processes only.
const SCOPE_VAR: &str = "BLACKTREE_TEST_SCOPE";

/// Programs whose every invocation a worker's PATH shims record (argv, one per line).
const RECORDED: [&str; 2] = ["git", "docker"];

/// A `blacktree worker` child process.
pub struct WorkerProcess {
    pub id: String,
    pub port: u16,
    pub work_dir: TempDir,
    /// The value of [`SCOPE_VAR`] in its environment.
    scope: String,
    process: LoggedChild,
}

impl WorkerProcess {
    /// An exec worker whose builds sleep `$BLACKTREE_IMAGE_NAME` seconds (the job picks;
    /// a leading `s` is dropped: `s60` or `60`).
    pub fn sleeper(id: &str, orchestrator_port: u16) -> WorkerProcess {
        let command = "echo started; sleep ${BLACKTREE_IMAGE_NAME#s}";
        Self::start(
            id,
            orchestrator_port,
            &["--executor", "exec", "--exec-command", command],
        )
    }

    /// Starts a worker with `args` (executor, registry…) that registers with the
    /// orchestrator at `127.0.0.1:orchestrator_port`. Its `git` and `docker` are PATH
    /// shims that record their argv (see [`WorkerProcess::invocations`]) and `exec` the
    /// real program, so the process a step starts is still `git` or `docker` itself. The
    /// tests' repositories are local: it accepts those (`--allow-local-repos`).
    pub fn start(id: &str, orchestrator_port: u16, args: &[&str]) -> WorkerProcess {
        Self::spawn(
            id,
            orchestrator_port,
            &[&["--allow-local-repos"], args].concat(),
        )
    }

    /// [`WorkerProcess::start`] as deployed: local repositories refused.
    pub fn start_refusing_local_repos(
        id: &str,
        orchestrator_port: u16,
        args: &[&str],
    ) -> WorkerProcess {
        Self::spawn(id, orchestrator_port, args)
    }

    fn spawn(id: &str, orchestrator_port: u16, args: &[&str]) -> WorkerProcess {
        let work_dir = TempDir::new("worker");
        let mut all: Vec<String> = ["worker", "--id", id, "--listen", "127.0.0.1:0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if !args.contains(&"--check-in-interval") {
            all.extend(["--check-in-interval".to_string(), "500ms".to_string()]);
        }
        all.extend([
            "--orchestrator".to_string(),
            format!("127.0.0.1:{orchestrator_port}"),
            "--work-dir".to_string(),
            work_dir.0.display().to_string(),
        ]);
        all.extend(args.iter().map(|s| s.to_string()));
        let scope = uuid::Uuid::new_v4().simple().to_string();
        let shims = record_argv_shims(&work_dir.0);
        let path = format!(
            "{}:{}",
            shims.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let env = [
            (SCOPE_VAR.to_string(), scope.clone()),
            ("PATH".to_string(), path),
        ];
        let (process, ports) = LoggedChild::spawn_with_env(&all, &env, &[" listening on port "]);
        WorkerProcess {
            id: id.to_string(),
            port: ports[0],
            work_dir,
            scope,
            process,
        }
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Job workspaces currently on disk.
    pub fn workspaces(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.work_dir.0.join("jobs"))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends a signal to the worker agent.
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal)
    }

    /// Waits until its log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        self.process.wait_for_log(text, timeout)
    }

    /// Waits for the worker agent to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.process.wait_exit(timeout)
    }

    /// Command lines of the processes this worker started (and their children), also
    /// those that outlived it.
    pub fn processes(&self) -> Vec<String> {
        let mark = format!("{SCOPE_VAR}={}", self.scope);
        processes()
            .into_iter()
            .filter(|(_, environ)| environ.split('\0').any(|v| v == mark))
            .map(|(cmdline, _)| cmdline)
            .filter(|cmdline| !cmdline.starts_with(env!("CARGO_BIN_EXE_blacktree")))
            .collect()
    }

    /// Whether one of this worker's processes has `needle` in its command line.
    pub fn runs(&self, needle: &str) -> bool {
        self.processes().iter().any(|c| c.contains(needle))
    }

    /// The argv of every `git` and `docker` the worker ran so far, one string each.
    pub fn invocations(&self) -> Vec<String> {
        std::fs::read_to_string(self.work_dir.0.join("shims").join("argv.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Writes `DIR/shims/{git,docker}`: each appends its argv to `DIR/shims/argv.log` and
/// `exec`s the real program. Returns the shims' directory.
fn record_argv_shims(dir: &Path) -> PathBuf {
    let shims = dir.join("shims");
    std::fs::create_dir_all(&shims).unwrap();
    let log = shims.join("argv.log");
    for program in RECORDED {
        let Ok(real) = which(program) else { continue };
        let shim = shims.join(program);
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\necho \"{program} $*\" >> '{}'\nexec '{}' \"$@\"\n",
                log.display(),
                real.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    shims
}

/// The path of `program` on this process's PATH.
fn which(program: &str) -> Result<PathBuf, String> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{program} is not on PATH"))
}

/// Every process on the machine: its command line and its environment (NUL-separated).
fn processes() -> Vec<(String, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
            Some((
                String::from_utf8_lossy(&cmdline).replace('\0', " "),
                String::from_utf8_lossy(&environ).into_owned(),
            ))
        })
        .collect()
}

/// Command lines of every process on the machine.
pub fn all_command_lines() -> Vec<String> {
    processes()
        .into_iter()
        .map(|(cmdline, _)| cmdline)
        .collect()
}

/// Whether any process on the machine has `needle` in its command line: only for
/// processes no test scope reaches (a `docker build` step runs under the engine, not
/// under the worker), so `needle` must be unique to the test.
pub fn process_running(needle: &str) -> bool {
    all_command_lines().iter().any(|c| c.contains(needle))
}

/// Reads every file under `dir` (recursively) and returns whether any contains `needle`.
pub fn tree_contains(dir: &Path, needle: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        let path = e.path();
        if path.is_dir() && !path.is_symlink() {
            tree_contains(&path, needle)
        } else {
            std::fs::read(&path).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle))
        }
    })
}

/// `tests/fixtures/git_http_server.py`: bare repositories over smart HTTP, behind Basic
/// auth that accepts only `token` as the password. Stopped on drop.
pub struct GitHttpServer {
    pub port: u16,
    pub root: TempDir,
    child: Child,
}

impl GitHttpServer {
    pub fn start(token: &str) -> GitHttpServer {
        let root = TempDir::new("git-http");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/git_http_server.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .arg(&root.0)
            .arg(token)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 git server");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let port = first
            .trim()
            .parse()
            .expect("the git server prints its port");
        GitHttpServer { port, root, child }
    }

    /// Publishes `repo` as `NAME.git`; returns its clone URL.
    pub fn publish(&self, repo: &TempDir, name: &str) -> String {
        sh(&format!(
            "git clone -q --bare {} {}/{name}.git",
            repo.0.display(),
            self.root.0.display()
        ));
        format!("http://127.0.0.1:{}/{name}.git", self.port)
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway certificate authority made with the `openssl` command.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = TempDir::new(&format!("pki-{name}"));
        sh(&format!(
            "cd {} && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem \
             -days 2 -subj /CN={name}-ca 2>/dev/null",
            dir.0.display()
        ));
        Pki { dir }
    }

    pub fn ca(&self) -> String {
        self.dir.0.join("ca.pem").display().to_string()
    }

    /// Issues a certificate for 127.0.0.1 / localhost (server and client use); returns
    /// the `--tls-cert/--tls-key/--tls-ca` flags for it.
    pub fn issue(&self, name: &str) -> Vec<String> {
        let d = self.dir.0.display();
        sh(&format!(
            "cd {d} && openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr \
             -subj /CN={name} 2>/dev/null && \
             printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth,clientAuth\\n' > {name}.ext && \
             openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
             -out {name}.pem -days 2 -extfile {name}.ext 2>/dev/null"
        ));
        vec![
            "--tls-cert".into(),
            format!("{d}/{name}.pem"),
            "--tls-key".into(),
            format!("{d}/{name}.key"),
            "--tls-ca".into(),
            self.ca(),
        ]
    }
}
