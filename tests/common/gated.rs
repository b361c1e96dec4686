//! Gated builds for `blacktree worker`s with the exec executor: each build records its
//! run and waits until the test lets it finish, so a test or bench decides when builds
//! end (an orchestrator restart in between, for instance) without sleeping.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::build_env::{TempDir, WorkerProcess};

/// Builds that record their runs and wait for a gate: `runs/<jobId>` gets a line per
/// run, `load/<worker>` a `+` when a build starts there and a `-` when it ends, a build
/// ends once `gates/<jobId>` exists, and `ends/<jobId>` holds when it ended (ns since
/// the epoch).
pub struct Builds {
    dir: TempDir,
}

impl Builds {
    pub fn start() -> Builds {
        let dir = TempDir::new("builds");
        for sub in ["runs", "load", "gates", "ends"] {
            std::fs::create_dir_all(dir.0.join(sub)).unwrap();
        }
        Builds { dir }
    }

    fn path(&self, sub: &str, name: &str) -> PathBuf {
        self.dir.0.join(sub).join(name)
    }

    /// A worker of `capacity` that runs these builds; `extra` flags after.
    pub fn worker(
        &self,
        id: &str,
        orchestrator_port: u16,
        capacity: u32,
        extra: &[&str],
    ) -> WorkerProcess {
        let d = self.dir.0.display();
        let command = format!(
            "echo + >> {d}/load/{id}; echo run >> {d}/runs/$BLACKTREE_JOB_ID; \
             while [ ! -e {d}/gates/$BLACKTREE_JOB_ID ]; do sleep 0.05; done; \
             echo - >> {d}/load/{id}; date +%s%N > {d}/ends/$BLACKTREE_JOB_ID; \
             echo built $BLACKTREE_JOB_ID"
        );
        let capacity = capacity.to_string();
        let mut args = vec![
            "--executor",
            "exec",
            "--exec-command",
            command.as_str(),
            "--capacity",
            capacity.as_str(),
        ];
        args.extend(extra);
        WorkerProcess::start(id, orchestrator_port, &args)
    }

    /// How many times `job_id` started.
    pub fn runs(&self, job_id: &str) -> usize {
        std::fs::read_to_string(self.path("runs", job_id)).map_or(0, |text| text.lines().count())
    }

    /// How many jobIds started at least once.
    pub fn started(&self) -> usize {
        std::fs::read_dir(self.dir.0.join("runs")).unwrap().count()
    }

    /// Lets `job_id`'s build finish.
    pub fn open(&self, job_id: &str) {
        std::fs::write(self.path("gates", job_id), b"").unwrap();
    }

    /// The most builds that ran at once on `worker`.
    pub fn peak_load(&self, worker: &str) -> i32 {
        let text = std::fs::read_to_string(self.path("load", worker)).unwrap_or_default();
        let mut load = 0;
        let mut peak = 0;
        for line in text.lines() {
            load += if line == "+" { 1 } else { -1 };
            peak = peak.max(load);
        }
        peak
    }

    /// When `job_id`'s last build ended, if it did.
    pub fn ended(&self, job_id: &str) -> Option<SystemTime> {
        let text = std::fs::read_to_string(self.path("ends", job_id)).ok()?;
        let ns: u64 = text.trim().parse().ok()?;
        Some(UNIX_EPOCH + Duration::from_nanos(ns))
    }
}
