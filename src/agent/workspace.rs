//! The worker's work directory: `jobs/` holds one workspace per running job (removed when
//! the job ends), `docker-config/` the registry login. One worker per directory: a flock
//! on `<work-dir>/.lock` keeps a second one out, so the workspaces a killed worker left
//! behind can be removed at start without touching anyone's running job.

use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::lock::{self, InstanceLock, LockError};

/// An open work directory, held by this worker.
pub struct WorkDir {
    jobs: PathBuf,
    docker_config: PathBuf,
    _lock: InstanceLock,
}

impl WorkDir {
    /// Creates and locks `dir`, then removes the workspaces left in it.
    pub fn open(dir: &Path) -> Result<WorkDir, String> {
        let jobs = dir.join("jobs");
        let docker_config = dir.join("docker-config");
        for dir in [&jobs, &docker_config] {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let lock = lock::acquire(&dir.join(".lock")).map_err(|e| match e {
            LockError::Held(path) => format!(
                "the work directory {} is in use by another worker (lock {} is held); give each worker its own --work-dir",
                dir.display(),
                path.display()
            ),
            LockError::Io(message) => message,
        })?;
        let work_dir = WorkDir {
            jobs,
            docker_config,
            _lock: lock,
        };
        work_dir.remove_leftovers();
        Ok(work_dir)
    }

    /// Removes what is in `jobs/`: no job runs yet, so it is a killed worker's.
    fn remove_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.jobs) else {
            return;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let result = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match result {
                Ok(()) => removed += 1,
                Err(e) => warn!("could not remove the leftover {}: {e}", path.display()),
            }
        }
        if removed > 0 {
            info!(
                "removed {removed} workspace(s) an earlier worker left in {}",
                self.jobs.display()
            );
        }
    }

    /// The Docker client's configuration directory (the registry login).
    pub fn docker_config(&self) -> &Path {
        &self.docker_config
    }

    /// Creates a workspace for `job_id`.
    pub fn workspace(&self, job_id: &str) -> Result<Workspace, String> {
        let safe: String = job_id
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self
            .jobs
            .join(format!("{safe}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("creating the workspace {}: {e}", path.display()))?;
        Ok(Workspace { path })
    }
}

/// A job's own directory, removed when the job ends.
pub struct Workspace {
    path: PathBuf,
}

impl Workspace {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            info!(
                "could not remove the workspace {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_work_dir_is_one_workers_and_what_a_killed_worker_left_is_removed() {
        let dir = std::env::temp_dir().join(format!("bt-workdir-{}", uuid::Uuid::new_v4()));
        let leftover = dir.join("jobs").join("job-1-abc");
        std::fs::create_dir_all(leftover.join("src")).unwrap();
        std::fs::write(leftover.join("src/Dockerfile"), "FROM scratch\n").unwrap();
        let work_dir = WorkDir::open(&dir).unwrap();
        assert!(!leftover.exists(), "the leftover workspace was removed");
        let Err(e) = WorkDir::open(&dir) else {
            panic!("a second worker opened the same work directory");
        };
        assert!(e.contains("in use by another worker"), "{e}");
        let workspace = work_dir.workspace("job\u{1b}/../2").unwrap();
        assert!(workspace.path().starts_with(dir.join("jobs")));
        let path = workspace.path().to_path_buf();
        drop(workspace);
        assert!(!path.exists(), "a workspace goes with its job");
        drop(work_dir);
        assert!(
            WorkDir::open(&dir).is_ok(),
            "free again once the first is gone"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
