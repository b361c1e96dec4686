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

/// The default lock file of a service listening on `listen`: one per role and port, in a
/// directory only its owner can write (a world-writable one like `/run/lock` would let
/// any local user take the lock first and keep the service from starting): `/run` for
/// root, else `$XDG_RUNTIME_DIR`, else the temp directory. None for an ephemeral port
/// (`:0`).
pub fn default_path(role: &str, listen: &str) -> Option<PathBuf> {
    let port = listen
        .rsplit(':')
        .next()?
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    let dir = if root && Path::new("/run").is_dir() {
        PathBuf::from("/run")
    } else if let Some(dir) = runtime.filter(|d| d.is_dir()) {
        dir
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

/// The pid the holder of the lock at `path` wrote into it, if it did.
pub fn holder(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_default_lock_is_per_role_and_port_and_not_in_a_world_writable_directory() {
        assert_eq!(default_path("worker", "127.0.0.1:0"), None);
        let path = default_path("orchestrator", "0.0.0.0:5051").unwrap();
        assert!(path.ends_with("blacktree-orchestrator-5051.lock"));
        // SAFETY: as above.
        if unsafe { libc::geteuid() } == 0 {
            let dir = path.parent().unwrap();
            let mode = std::fs::metadata(dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o002, 0, "{} is world-writable", dir.display());
        }
    }
}
