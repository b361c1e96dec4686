//! A real grpc-go worker: `tests/fixtures/go-worker` (job.JobService's RunJob and Ping,
//! served by Debian's grpc-go with its default keepalive enforcement), built with `go`
//! once per test process, run as a child process whose log (grpc-go's transport log
//! included) the test reads; killed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::LoggedChild;

/// The fixture's source directory.
const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/go-worker");

/// Where Debian's `golang-google-grpc-dev` puts grpc-go (and its dependencies).
const GOPATH: &str = "/usr/share/gocode";

/// The fixture's binary, built on first use in this test process (under a second with a
/// warm Go build cache, `~/.cache/blacktree-go`; 6–8 s without).
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-worker");
        std::fs::create_dir_all(&dir).unwrap();
        let cache = std::env::var("HOME")
            .map(|home| PathBuf::from(home).join(".cache/blacktree-go"))
            .unwrap_or_else(|_| std::env::temp_dir().join("blacktree-go-cache"));
        // Built under a name of this process, then renamed: test binaries building it at
        // the same time never run a half-written file.
        let built = dir.join(format!("go-worker.{}", std::process::id()));
        let out = Command::new("go")
            .args(["build", "-o"])
            .arg(&built)
            .arg(".")
            .current_dir(SOURCE)
            .env("GO111MODULE", "off")
            .env("GOPATH", GOPATH)
            .env("GOCACHE", &cache)
            .env("GOFLAGS", "")
            .output()
            .expect(
                "running `go` (scripts/setup.sh installs golang-go and golang-google-grpc-dev)",
            );
        assert!(
            out.status.success(),
            "building {SOURCE} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let binary = dir.join("go-worker");
        std::fs::rename(&built, &binary).unwrap();
        binary
    })
}

/// A running `go-worker` process.
pub struct GoWorker {
    pub id: String,
    pub port: u16,
    process: LoggedChild,
}

impl GoWorker {
    /// Starts a Go worker `id` on a free loopback port whose `RunJob` takes `run_time`.
    pub fn start(id: &str, run_time: Duration) -> GoWorker {
        let mut command = Command::new(binary());
        command.args([
            "-listen",
            "127.0.0.1:0",
            "-id",
            id,
            "-run",
            &format!("{}ms", run_time.as_millis()),
        ]);
        let (process, ports) = LoggedChild::spawn_command(command, &[" listening on port "]);
        GoWorker {
            id: id.to_string(),
            port: ports[0],
            process,
        }
    }

    /// The orchestrator's `--worker` value naming it.
    pub fn static_worker(&self) -> String {
        format!("{}=127.0.0.1:{}", self.id, self.port)
    }

    /// Everything it logged so far (its own lines and grpc-go's).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits until its log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        self.process.wait_for_log(text, timeout)
    }
}
