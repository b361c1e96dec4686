//! What the orchestrator remembers across restarts, in one JSON state file: the workers
//! it knows (id, address, region, capacity, static or not), so that workers that register
//! once and never again (the Go workers of older deployments) keep getting jobs after a
//! restart; and the cancels of jobs not consumed yet (until their `--cancel-ttl` ends), so
//! that a cancel acked before a restart still stops its job. The file is rewritten after every change of that set, atomically: a temp file
//! beside it is written and fsynced, renamed over it, and the directory is fsynced; a
//! reader (or a crash at any instant) sees the old file or the new one, never a mix. A
//! `<file>.lock` flock keeps two orchestrators from sharing one file.
//!
//! What happens when the file cannot be used depends on who chose it: a path given with
//! `--state-file` must work (a clear error naming the file stops the start); with the
//! default path the orchestrator warns and goes on (a corrupt file is moved aside to
//! `<file>.corrupt` and the registry starts empty; an unusable directory leaves the
//! registry unremembered). An empty `--state-file` turns remembering off.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::labels::Labels;
use crate::lock::{self, InstanceLock, LockError};

/// Where the state file is kept unless `--state-file` says otherwise; the systemd unit's
/// `StateDirectory=blacktree-orchestrator` and the runit run script create its directory.
pub const DEFAULT_PATH: &str = "/var/lib/blacktree-orchestrator/registry.json";

/// The version written in the file; a file of another version is refused as unreadable.
const VERSION: u32 = 1;

/// A worker as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// Its id.
    pub id: String,
    /// `HOST:PORT` of its JobService.
    pub address: String,
    /// The region it reported.
    #[serde(default)]
    pub region: String,
    /// The labels it offered (its region among them); files of older versions have none.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Jobs it runs at once.
    pub capacity: u32,
    /// Named by `--worker` rather than registered.
    #[serde(rename = "static", default)]
    pub is_static: bool,
}

/// A cancel of a job not consumed yet, as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyCancel {
    /// The job it cancels.
    #[serde(rename = "jobId")]
    pub job_id: String,
    /// When it is forgotten, in seconds since the Unix epoch (wall-clock time, the only
    /// clock that survives a restart).
    pub until: u64,
}

impl EarlyCancel {
    /// A cancel of `job_id` remembered until `until`.
    pub fn new(job_id: String, until: SystemTime) -> EarlyCancel {
        let until = until
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        EarlyCancel { job_id, until }
    }

    /// When it is forgotten.
    pub fn until(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.until)
    }
}

/// What a state file holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Remembrance {
    /// The workers.
    pub workers: Vec<Remembered>,
    /// Cancels of jobs not consumed yet, not expired.
    pub cancels: Vec<EarlyCancel>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Contents {
    version: u32,
    workers: Vec<Remembered>,
    /// Left out when empty, so that a file without early cancels stays readable by
    /// orchestrators that predate them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cancels: Vec<EarlyCancel>,
}

/// An open state file: its lock is held and it was found writable.
pub struct StateFile {
    path: PathBuf,
    _lock: InstanceLock,
    /// What was last written, and its bytes; writers take turns here.
    written: Mutex<(Remembrance, Vec<u8>)>,
}

/// Opens the state file `--state-file` names (`None`: the default path) and reads what
/// it remembers. `Ok(None)`: nothing is remembered.
pub fn open(flag: Option<&Path>) -> Result<Option<(StateFile, Remembrance)>, String> {
    match flag {
        Some(path) if path.as_os_str().is_empty() => {
            info!("--state-file is empty: registrations and early cancels are not remembered across restarts");
            Ok(None)
        }
        Some(path) => StateFile::open(path, false).map(Some),
        None => match StateFile::open(Path::new(DEFAULT_PATH), true) {
            Ok(opened) => Ok(Some(opened)),
            Err(e) => {
                warn!("{e}; registrations and early cancels are NOT remembered across restarts (set --state-file to a writable path)");
                Ok(None)
            }
        },
    }
}

impl StateFile {
    /// Locks and reads `path` (missing: nothing remembered) and writes it back once to
    /// prove it writable. With `lenient`, a corrupt file is moved aside instead of
    /// stopping the start.
    fn open(path: &Path, lenient: bool) -> Result<(StateFile, Remembrance), String> {
        let shown = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| {
                format!(
                    "state file {shown}: cannot create its directory {}: {e}",
                    dir.display()
                )
            })?;
        }
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock = lock::acquire(Path::new(&lock_path)).map_err(|e| match e {
            LockError::Held(held) => format!(
                "state file {shown} is in use by another orchestrator (lock {} is held)",
                held.display()
            ),
            LockError::Io(message) => format!("state file {shown}: {message}"),
        })?;
        let remembered = match read(path) {
            Ok(remembered) => remembered,
            Err(e) if lenient && path.exists() => {
                let mut aside = path.as_os_str().to_owned();
                aside.push(".corrupt");
                fs::rename(path, &aside)
                    .map_err(|r| format!("{e}; moving it aside failed: {r}"))?;
                warn!(
                    "{e}; moved it to {} and starting with an empty registry",
                    Path::new(&aside).display()
                );
                Remembrance::default()
            }
            Err(e) => return Err(e),
        };
        let file = StateFile {
            path: path.to_path_buf(),
            _lock: lock,
            written: Mutex::new((Remembrance::default(), Vec::new())),
        };
        file.update(|state| *state = remembered.clone())?;
        info!(
            "state file {shown}: {}, {}",
            crate::plural::count(remembered.workers.len(), "remembered worker"),
            crate::plural::count(remembered.cancels.len(), "early cancel")
        );
        Ok((file, remembered))
    }

    /// Writes the workers `snapshot` returns (sorted by id) unless the file already holds
    /// exactly that. Writers take turns and each takes its snapshot in its turn, so an
    /// older snapshot never overwrites a newer one.
    pub fn save(&self, snapshot: impl FnOnce() -> Vec<Remembered>) -> Result<(), String> {
        self.update(|state| state.workers = snapshot())
    }

    /// Writes `cancels` as the early cancels, unless the file already holds exactly them.
    pub fn save_cancels(&self, cancels: Vec<EarlyCancel>) -> Result<(), String> {
        self.update(|state| state.cancels = cancels)
    }

    /// Changes what was last written with `change` (in the writers' turn) and writes the
    /// result, sorted, unless it is what the file holds.
    fn update(&self, change: impl FnOnce(&mut Remembrance)) -> Result<(), String> {
        let mut written = self.written.lock().expect("state file lock");
        let mut state = written.0.clone();
        change(&mut state);
        state.workers.sort_by(|a, b| a.id.cmp(&b.id));
        state.cancels.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        let contents = Contents {
            version: VERSION,
            workers: state.workers.clone(),
            cancels: state.cancels.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&contents).expect("the state serializes");
        bytes.push(b'\n');
        if written.1 == bytes {
            return Ok(());
        }
        write_atomically(&self.path, &bytes)
            .map_err(|e| format!("writing the state file {}: {e}", self.path.display()))?;
        *written = (state, bytes);
        Ok(())
    }
}

/// Reads what a state file remembers (expired cancels left out); a missing file
/// remembers nothing.
fn read(path: &Path) -> Result<Remembrance, String> {
    let shown = path.display();
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Remembrance::default()),
        Err(e) => return Err(format!("cannot read the state file {shown}: {e}")),
    };
    let contents: Contents = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the state file {shown} is corrupt: {e}"))?;
    if contents.version != VERSION {
        return Err(format!(
            "the state file {shown} has version {}; this orchestrator reads version {VERSION}",
            contents.version
        ));
    }
    let now = SystemTime::now();
    Ok(Remembrance {
        workers: contents.workers,
        cancels: contents
            .cancels
            .into_iter()
            .filter(|cancel| cancel.until() > now)
            .collect(),
    })
}

/// Replaces `path` with `bytes`: temp file, fsync, rename, fsync of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let mut file = File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, path)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests;
