//! Cancels of jobs not consumed yet: each is kept until its job arrives (which then ends
//! `cancelled` without running) or until `--cancel-ttl` has passed. Their expiry is
//! wall-clock time so that the state file can carry them across a restart.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use log::warn;

use crate::orchestrator::state_file::EarlyCancel;

/// How many early cancels are kept at most; beyond it, the one closest to expiry goes.
/// Each is written to the state file, so this also bounds the file.
pub const CAPACITY: usize = 10_000;

/// The early cancels, by jobId, with when each is forgotten.
#[derive(Debug)]
pub struct EarlyCancels {
    ttl: Duration,
    until: HashMap<String, SystemTime>,
}

impl EarlyCancels {
    /// Early cancels kept for `ttl`, starting with `remembered` (from the state file).
    pub fn new(ttl: Duration, remembered: Vec<EarlyCancel>) -> EarlyCancels {
        let mut cancels = EarlyCancels {
            ttl,
            until: HashMap::new(),
        };
        for cancel in remembered {
            let until = cancel.until();
            cancels.until.insert(cancel.job_id, until);
        }
        cancels.expire();
        cancels
    }

    /// Remembers a cancel of `job_id` for the ttl from now.
    pub fn insert(&mut self, job_id: String) {
        self.expire();
        let now = SystemTime::now();
        self.until.insert(job_id, now + self.ttl);
        if self.until.len() > CAPACITY {
            let soonest = self
                .until
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(id, _)| id.clone())
                .expect("over capacity");
            warn!("more than {CAPACITY} early cancels: the one for job {soonest} is forgotten");
            self.until.remove(&soonest);
        }
    }

    /// Takes the cancel of `job_id`; returns whether there was one (not expired).
    pub fn take(&mut self, job_id: &str) -> bool {
        self.until
            .remove(job_id)
            .is_some_and(|until| until > SystemTime::now())
    }

    /// Every early cancel, for the state file.
    pub fn snapshot(&self) -> Vec<EarlyCancel> {
        self.until
            .iter()
            .map(|(job_id, until)| EarlyCancel::new(job_id.clone(), *until))
            .collect()
    }

    /// How many are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }

    fn expire(&mut self) {
        let now = SystemTime::now();
        self.until.retain(|_, until| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_is_taken_once_and_remembered_ones_come_back_unless_expired() {
        let hour = Duration::from_secs(3600);
        let remembered = vec![
            EarlyCancel::new("kept".into(), SystemTime::now() + hour),
            EarlyCancel::new("expired".into(), SystemTime::now() - hour),
        ];
        let mut cancels = EarlyCancels::new(hour, remembered);
        assert_eq!(cancels.len(), 1);
        cancels.insert("new".into());
        let mut ids: Vec<_> = cancels.snapshot().into_iter().map(|c| c.job_id).collect();
        ids.sort();
        assert_eq!(ids, ["kept", "new"]);
        assert!(cancels.take("kept"));
        assert!(!cancels.take("kept"), "a cancel is taken once");
        assert!(!cancels.take("expired"));
        assert!(cancels.take("new"));
        assert_eq!(cancels.len(), 0);
    }

    #[test]
    fn an_expired_cancel_is_not_taken() {
        let mut cancels = EarlyCancels::new(Duration::ZERO, Vec::new());
        cancels.insert("a".into());
        assert!(!cancels.take("a"));
    }

    #[test]
    fn the_number_kept_is_bounded() {
        let mut cancels = EarlyCancels::new(Duration::from_secs(3600), Vec::new());
        for i in 0..CAPACITY + 5 {
            cancels.insert(format!("job-{i}"));
        }
        assert_eq!(cancels.len(), CAPACITY);
        assert!(
            cancels.take(&format!("job-{}", CAPACITY + 4)),
            "the newest is kept"
        );
    }
}
