//! What workers report (the jobIds they run and those whose answer they hold, on
//! `Register`, every check-in and every ping answer), and adopting a redelivered job
//! on the worker that reports it.

use std::collections::HashSet;
use std::sync::Arc;

use super::{Claim, Registry};
use crate::agent::jobs::MAX_HELD;
use crate::grpc::cancel::CancelToken;
use crate::job::{is_plain_id, MAX_JOB_ID_LEN};

/// The jobIds a worker says (at registration and every check-in) it runs, and those
/// whose answer it holds: builds that may have outlived the orchestrator that started
/// them. Older workers report nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported {
    /// Running there: each takes a slot.
    pub running: HashSet<String>,
    /// Finished there, the answer held for the next `RunJob` of that jobId.
    pub held: HashSet<String>,
}

impl Reported {
    /// Checks what a worker reports: at most `capacity` running and [`MAX_HELD`] held
    /// jobIds, each a plain id. The reasons never quote an id.
    pub fn checked(running: &[String], held: &[String], capacity: u32) -> Result<Reported, String> {
        if running.len() > capacity as usize || held.len() > MAX_HELD {
            return Err(format!(
                "it reports more running jobs than its capacity or more than {MAX_HELD} held answers"
            ));
        }
        if !running.iter().chain(held).all(|id| is_plain_id(id)) {
            return Err(format!(
                "reported jobIds must be 1 to {MAX_JOB_ID_LEN} bytes with no control characters"
            ));
        }
        Ok(Reported {
            running: running.iter().cloned().collect(),
            held: held.iter().cloned().collect(),
        })
    }

    pub(super) fn contains(&self, job_id: &str) -> bool {
        self.running.contains(job_id) || self.held.contains(job_id)
    }

    /// Every jobId reported, running or held.
    pub(super) fn ids(&self) -> impl Iterator<Item = &String> {
        self.running.iter().chain(&self.held)
    }
}

impl Registry {
    /// Records what worker `id` reports (see [`Reported`]); its free slots follow.
    pub fn report(&self, id: &str, reported: Reported) {
        let mut workers = self.lock();
        let Some(id) = workers.get_key_value(id).map(|(id, _)| id.clone()) else {
            return;
        };
        let worker = workers.get_mut(&id).expect("found above");
        if worker.reported != reported {
            self.unindex(&id, worker.reported.ids());
            let mut index = self.reported_by.lock().expect("report index lock");
            for job_id in reported.ids() {
                index.insert(job_id.clone(), id.clone());
            }
            drop(index);
            worker.reported = reported;
            self.top_up(&id, worker);
        }
    }

    /// Takes the job `job_id` over on a healthy worker that reports it (running, or its
    /// answer held): a `RunJob` there attaches to it. Its slot is already taken.
    pub fn adopt(&self, job_id: &str, token: &CancelToken) -> Option<Claim> {
        let mut workers = self.lock();
        let id = self
            .reported_by
            .lock()
            .expect("report index lock")
            .get(job_id)?
            .clone();
        let worker = workers
            .get_mut(&id)
            .filter(|w| w.healthy && w.reported.contains(job_id))?;
        worker.started += 1;
        worker.running.insert(job_id.to_string(), token.clone());
        Some(Claim {
            worker: id,
            generation: worker.generation,
            client: worker.client.clone(),
        })
    }

    /// Drops the index entries of `job_ids` that point at worker `id`.
    pub(super) fn unindex<'a>(&self, id: &Arc<str>, job_ids: impl Iterator<Item = &'a String>) {
        let mut index = self.reported_by.lock().expect("report index lock");
        for job_id in job_ids {
            if index.get(job_id) == Some(id) {
                index.remove(job_id);
            }
        }
    }
}
