//! A worker as `blacktree workers`, `ListWorkers` and `/workers` show it.

use std::time::Duration;

use super::Registry;
use crate::labels::Labels;
use crate::metrics::Slots;
use crate::proto::worker::WorkerState;

/// A worker as `blacktree workers` and `/workers` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    /// Its id.
    pub id: String,
    /// `HOST:PORT` of its JobService.
    pub addr: String,
    /// Region it reported.
    pub region: String,
    /// The labels it offers, its region among them.
    pub labels: Labels,
    /// `free`, `busy`, `draining` or `unhealthy`.
    pub state: String,
    /// Jobs it runs at once.
    pub capacity: u32,
    /// Jobs of ours running on it.
    pub in_flight: u32,
    /// Time since it last answered a ping.
    pub last_ping: Option<Duration>,
    /// Healthy and not draining, but it said BUSY or refused a job: no job until a ping
    /// says FREE (it counts as `busy`).
    pub withheld: bool,
    /// How long it has not answered pings, while unhealthy.
    pub unhealthy_for: Option<Duration>,
    /// Our jobs that ended there since this orchestrator started, and those that failed
    /// (not known from `ListWorkers`: 0).
    pub jobs_run: u64,
    /// See `jobs_run`.
    pub jobs_failed: u64,
}

impl WorkerView {
    /// Whether it was drained and nothing runs on it (from any orchestrator): it can be
    /// stopped without losing a build.
    pub fn safe_to_stop(&self) -> bool {
        self.state == "draining" && self.in_flight == 0
    }

    /// The state as people read it: `unhealthy (silent 12s)` for a worker out of
    /// rotation that last answered 12 s ago (`never answered` when it never did); the
    /// state itself otherwise.
    pub fn state_text(&self) -> String {
        match self.last_ping {
            _ if self.state != "unhealthy" => self.state.clone(),
            Some(silent) => format!("unhealthy (silent {}s)", silent.as_secs()),
            None => "unhealthy (never answered)".into(),
        }
    }

    /// As `ListWorkers` sends it (`lastPingMsAgo` -1: never answered).
    pub fn to_proto(&self) -> WorkerState {
        WorkerState {
            id: self.id.clone(),
            address: self.addr.clone(),
            state: self.state.clone(),
            capacity: i32::try_from(self.capacity).unwrap_or(i32::MAX),
            inFlight: i32::try_from(self.in_flight).unwrap_or(i32::MAX),
            lastPingMsAgo: self
                .last_ping
                .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            region: self.region.clone(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..WorkerState::default()
        }
    }

    /// As `blacktree workers` reads it from `ListWorkers`.
    pub fn from_proto(state: &WorkerState) -> WorkerView {
        WorkerView {
            id: state.id.clone(),
            addr: state.address.clone(),
            region: state.region.clone(),
            // What an orchestrator sends is checked there; anything else shows as none.
            labels: Labels::new(state.labels.iter().map(|(k, v)| (k.clone(), v.clone())))
                .unwrap_or_default(),
            state: state.state.clone(),
            capacity: u32::try_from(state.capacity).unwrap_or(0),
            in_flight: u32::try_from(state.inFlight).unwrap_or(0),
            last_ping: u64::try_from(state.lastPingMsAgo)
                .ok()
                .map(Duration::from_millis),
            withheld: false,
            unhealthy_for: None,
            jobs_run: 0,
            jobs_failed: 0,
        }
    }

    /// The JSON of `blacktree workers --json` and `/workers`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "address": self.addr, "state": self.state, "capacity": self.capacity,
            "inFlight": self.in_flight, "region": self.region, "labels": self.labels.to_json(),
            "safeToStop": self.safe_to_stop(),
            "lastPingMsAgo": self.last_ping.map(|d| d.as_millis() as u64),
        })
    }

    /// The JSON of `/api/workers`: [`to_json`](WorkerView::to_json)'s fields, and what
    /// only the orchestrator that runs the jobs knows.
    pub fn to_api_json(&self) -> serde_json::Value {
        let mut value = self.to_json();
        value["withheld"] = self.withheld.into();
        value["unhealthyForMs"] = self.unhealthy_for.map(|d| d.as_millis() as u64).into();
        value["jobsRun"] = self.jobs_run.into();
        value["jobsFailed"] = self.jobs_failed.into();
        value
    }
}

impl Registry {
    /// What the registry knows of each worker, sorted by id.
    pub fn list(&self) -> Vec<WorkerView> {
        let mut list: Vec<WorkerView> = self
            .lock()
            .iter()
            .map(|(id, w)| WorkerView {
                id: id.to_string(),
                addr: w.addr.clone(),
                region: w.region.clone(),
                labels: w.labels.clone(),
                state: if !w.healthy {
                    "unhealthy"
                } else if w.draining {
                    "draining"
                } else if w.free_slots() == 0 {
                    "busy"
                } else {
                    "free"
                }
                .to_string(),
                capacity: w.capacity,
                in_flight: w.in_flight(),
                last_ping: w.last_seen.map(|t| t.elapsed()),
                withheld: w.healthy && !w.draining && w.busy,
                unhealthy_for: w
                    .unhealthy_since
                    .filter(|_| !w.healthy)
                    .map(|t| t.elapsed()),
                jobs_run: w.jobs_run,
                jobs_failed: w.jobs_failed,
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }
    /// Every worker's slots by state (`blacktree_worker_slots`).
    pub fn slots(&self) -> Slots {
        let mut slots = Slots::default();
        for worker in self.lock().values() {
            let capacity = u64::from(worker.capacity);
            let taken = u64::from(worker.in_flight()).min(capacity);
            if !worker.healthy {
                slots.unhealthy += capacity;
            } else if worker.busy || worker.draining {
                slots.busy += taken;
                slots.withheld += capacity - taken;
            } else {
                let free = u64::from(worker.free_slots());
                slots.free += free;
                slots.busy += capacity - free;
            }
        }
        slots
    }
}
