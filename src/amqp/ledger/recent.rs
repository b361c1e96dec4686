//! The de-duplication window: jobIds whose status was confirmed recently.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The jobIds seen within a time window, bounded in number.
#[derive(Debug)]
pub(super) struct RecentJobs {
    window: Duration,
    capacity: usize,
    /// Insertions, oldest first; an entry whose id was removed (or inserted again since)
    /// no longer matches `ids` and is skipped.
    order: VecDeque<(Instant, String)>,
    ids: HashMap<String, Instant>,
}

impl RecentJobs {
    pub(super) fn new(window: Duration, capacity: usize) -> RecentJobs {
        RecentJobs {
            window,
            capacity,
            order: VecDeque::new(),
            ids: HashMap::new(),
        }
    }

    pub(super) fn insert(&mut self, job_id: String) {
        self.expire();
        if self.ids.contains_key(&job_id) {
            return;
        }
        let now = Instant::now();
        self.ids.insert(job_id.clone(), now);
        self.order.push_back((now, job_id));
        while self.ids.len() > self.capacity {
            self.pop_oldest();
        }
    }

    pub(super) fn contains(&mut self, job_id: &str) -> bool {
        self.expire();
        self.ids.contains_key(job_id)
    }

    fn expire(&mut self) {
        while let Some((at, _)) = self.order.front() {
            if at.elapsed() < self.window {
                break;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        let Some((at, id)) = self.order.pop_front() else {
            return;
        };
        if self.ids.get(&id) == Some(&at) {
            self.ids.remove(&id);
        }
    }
}
