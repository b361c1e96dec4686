//! The single-instance lock: a service takes an exclusive `flock` on its lock file at
//! start. A second instance (say, started by cron while one runs) finds it taken and
//! exits at once, touching nothing; a lock left by a killed process is released by the
//! kernel, so a restart is never blocked. The orchestrator's state file is guarded the
//! same way, so that two orchestrators never write one file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use fs2::FileExt;

/// A held lock; released when dropped (or when the process dies).
pub struct InstanceLock {
    _file: File,
}

/// Why the lock was not taken.
pub enum LockError {
    /// Another process holds it.
    Held(PathBuf),
    /// The file could not be opened.
    Io(String),
}

/// The default lock file of a service listening on `listen`: one per role and port in
/// `/run/lock` (or the temp directory); none for an ephemeral port (`:0`).
pub fn default_path(role: &str, listen: &str) -> Option<PathBuf> {
    let port = listen
        .rsplit(':')
        .next()?
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)?;
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    Some(dir.join(format!("blacktree-{role}-{port}.lock")))
}

/// Takes the lock at `path`, writing our pid into the file for whoever looks.
pub fn acquire(path: &Path) -> Result<InstanceLock, LockError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| LockError::Io(format!("cannot open the lock file {}: {e}", path.display())))?;
    if file.try_lock_exclusive().is_err() {
        return Err(LockError::Held(path.to_path_buf()));
    }
    // Informational only: the flock is the truth.
    let _ = file
        .set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    Ok(InstanceLock { _file: file })
}
