//! Jobs held back because no healthy worker has the labels they require: they wait
//! here, on the consumer thread, rather than in a dispatch thread, so that the jobs
//! behind them run (no head-of-line blocking). They stay unacked; the consumer keeps
//! them out of its prefetch window by consuming afresh (see `super::super::consumer`),
//! which is what `window` counts for.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::{cancelled, was_cancelled, Action, Ledger};
use crate::job::{Outcome, Status};
use crate::labels::Labels;
use crate::pipeline::{Assignment, Publication, Router};

/// A job held back.
struct ParkedJob {
    assignment: Assignment,
    /// Since when no worker could take it.
    since: Instant,
    /// The consumer window its delivery came in.
    window: u64,
}

/// The jobs held back, oldest first.
#[derive(Default)]
pub struct Parked {
    jobs: VecDeque<ParkedJob>,
    /// The current consumer window, and how many held jobs came in it.
    window: u64,
    in_window: usize,
}

impl Parked {
    /// Holds `assignment` back; its delivery came in consumer window `window`.
    pub fn park(&mut self, assignment: Assignment, window: u64) {
        if window == self.window {
            self.in_window += 1;
        }
        self.jobs.push_back(ParkedJob {
            assignment,
            since: Instant::now(),
            window,
        });
    }

    /// How many are held back.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// How many held jobs came in the current consumer window (they take its room).
    pub fn in_window(&self) -> usize {
        self.in_window
    }

    /// The consumer consumes afresh: the held jobs no longer take room in its window.
    pub fn new_window(&mut self, window: u64) {
        self.window = window;
        self.in_window = 0;
    }

    fn left(&mut self, job: ParkedJob) -> Assignment {
        if job.window == self.window {
            self.in_window -= 1;
        }
        job.assignment
    }

    /// Takes out, oldest first, as many jobs of each label set as `room` says dispatch
    /// has room for (asking once per label set).
    pub fn take_ready(&mut self, room: impl Fn(&Labels) -> usize) -> Vec<Assignment> {
        let mut rooms: HashMap<Labels, usize> = HashMap::new();
        let (ready, held): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(&mut self.jobs).into_iter().partition(|job| {
                let labels = &job.assignment.job.labels;
                let left = rooms.entry(labels.clone()).or_insert_with(|| room(labels));
                let take = *left > 0;
                *left = left.saturating_sub(1);
                take
            });
        self.jobs = held;
        ready.into_iter().map(|job| self.left(job)).collect()
    }

    /// Takes out the job `job_id`, if it is held.
    pub fn take(&mut self, job_id: &str) -> Option<Assignment> {
        let i = self
            .jobs
            .iter()
            .position(|job| job.assignment.job.job_id == job_id)?;
        let job = self.jobs.remove(i).expect("found above");
        Some(self.left(job))
    }

    /// Takes out the jobs held for `after` or longer, with how long each was held.
    pub fn expired(&mut self, after: Duration) -> Vec<(Assignment, Duration)> {
        let mut expired = Vec::new();
        // Oldest first: the first one held for less ends the search.
        while let Some(job) = self.jobs.front() {
            let held = job.since.elapsed();
            if held < after {
                break;
            }
            let job = self.jobs.pop_front().expect("looked at above");
            expired.push((self.left(job), held));
        }
        expired
    }

    /// When the oldest held job will have been held for `after`.
    pub fn next_expiry(&self, after: Duration) -> Option<Instant> {
        self.jobs.front().map(|job| job.since + after)
    }

    /// Takes out every held job (drain, lost connection).
    pub fn take_all(&mut self) -> Vec<Assignment> {
        self.in_window = 0;
        self.jobs.drain(..).map(|job| job.assignment).collect()
    }
}

impl Ledger {
    /// Holds a job back until a worker has its labels and there is room for it.
    pub(super) fn park(&mut self, assignment: Assignment) {
        let Some(pending) = self.pending.get(&assignment.job.job_id) else {
            return;
        };
        let job = &assignment.job;
        if self.router.routable(&job.labels) {
            info!(
                "job {}: the workers with the labels {} have as many jobs waiting as slots; \
                 held back until one goes",
                job.job_id, job.labels
            );
        } else {
            info!(
                "job {}: no healthy worker has the labels {}; held back until one has",
                job.job_id, job.labels
            );
        }
        let window = pending.window;
        self.parked.park(assignment, window);
    }

    /// A dispatch thread gives back a job whose labels no healthy worker has any more, or
    /// whose workers have as many jobs waiting as slots: held back (or dispatched again,
    /// if there is room by now). One its delivery's loss
    /// released is dropped; one cancelled meanwhile ends `cancelled`; during a drain it
    /// goes back to the queue.
    pub fn unroutable(&mut self, assignment: Assignment) -> Vec<Action> {
        if assignment.token.released() || !self.pending.contains_key(&assignment.job.job_id) {
            return Vec::new();
        }
        if was_cancelled(&assignment) {
            return vec![cancelled(&assignment.job)];
        }
        if self.drain_deadline.is_some() {
            return self.requeue(&assignment.job.job_id);
        }
        self.dispatch_or_park(assignment);
        Vec::new()
    }

    /// Sends a job on to dispatch if there is room for its labels, else holds it back.
    pub(super) fn dispatch_or_park(&mut self, assignment: Assignment) {
        if self.router.room(&assignment.job.labels) > 0 {
            self.backlog.push_back(assignment);
        } else {
            self.park(assignment);
        }
    }

    /// Workers or their slots changed: the jobs held back that dispatch has room for now
    /// go to it, before the backlog (they are older).
    pub fn routing_changed(&mut self) {
        let router = &self.router;
        let ready = self.parked.take_ready(|labels| router.room(labels));
        for assignment in ready.into_iter().rev() {
            debug!(
                "job {}: room on a worker with the labels {}",
                assignment.job.job_id, assignment.job.labels
            );
            self.backlog.push_front(assignment);
        }
    }

    /// The jobs held back for `--unroutable-after` while no worker had their labels end
    /// `rejected`; those that have a worker now (waiting for room) wait on, anew.
    pub fn expire_unroutable(&mut self) -> Vec<Action> {
        let Some(after) = self.config.unroutable_after else {
            return Vec::new();
        };
        let (waiting, expired): (Vec<_>, Vec<_>) = self
            .parked
            .expired(after)
            .into_iter()
            .partition(|(assignment, _)| self.router.routable(&assignment.job.labels));
        for (assignment, _) in waiting {
            self.park(assignment);
        }
        expired
            .into_iter()
            .map(|(assignment, held)| {
                let job = &assignment.job;
                let reason = format!(
                    "rejected: no registered worker had the labels {} for {}",
                    job.labels,
                    humantime::format_duration(Duration::from_secs(held.as_secs()))
                );
                warn!("job {}: {reason}", job.job_id);
                self.metrics.jobs_unroutable.inc();
                let status = Status::without_answer(&job.job_id, Outcome::Rejected, "", reason);
                Action::Publish(Publication::Status(status.in_dialect(job.dialect)))
            })
            .collect()
    }

    /// When the job held back longest reaches `--unroutable-after`.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.parked.next_expiry(self.config.unroutable_after?)
    }

    /// The consumer consumes afresh (window `window`): the jobs held back no longer take
    /// room in its prefetch window.
    pub fn new_window(&mut self, window: u64) {
        self.window = window;
        self.parked.new_window(window);
    }

    /// How many jobs are held back, and how many of them came in the current window.
    pub fn parked(&self) -> (usize, usize) {
        (self.parked.len(), self.parked.in_window())
    }
}

/// The router until one is set: every job is routable.
pub(super) struct EveryLabel;

impl Router for EveryLabel {
    fn routable(&self, _: &Labels) -> bool {
        true
    }

    fn room(&self, _: &Labels) -> usize {
        usize::MAX
    }
}

#[cfg(test)]
mod tests;
