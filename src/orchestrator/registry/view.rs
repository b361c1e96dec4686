//! A worker as `blacktree workers`, `ListWorkers` and `/workers` show it.

use std::time::Duration;

use super::Registry;
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
    /// `free`, `busy` or `unhealthy`.
    pub state: String,
    /// Jobs it runs at once.
    pub capacity: u32,
    /// Jobs of ours running on it.
    pub in_flight: u32,
    /// Time since it last answered a ping.
    pub last_ping: Option<Duration>,
}

impl WorkerView {
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
            ..WorkerState::default()
        }
    }

    /// As `blacktree workers` reads it from `ListWorkers`.
    pub fn from_proto(state: &WorkerState) -> WorkerView {
        WorkerView {
            id: state.id.clone(),
            addr: state.address.clone(),
            region: state.region.clone(),
            state: state.state.clone(),
            capacity: u32::try_from(state.capacity).unwrap_or(0),
            in_flight: u32::try_from(state.inFlight).unwrap_or(0),
            last_ping: u64::try_from(state.lastPingMsAgo)
                .ok()
                .map(Duration::from_millis),
        }
    }

    /// The JSON of `blacktree workers --json` and `/workers`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "address": self.addr, "state": self.state, "capacity": self.capacity,
            "inFlight": self.in_flight, "region": self.region,
            "lastPingMsAgo": self.last_ping.map(|d| d.as_millis() as u64),
        })
    }
}

impl Registry {
    /// Every worker's slots by state (`blacktree_worker_slots`).
    pub fn slots(&self) -> Slots {
        let mut slots = Slots::default();
        for worker in self.lock().values() {
            let capacity = u64::from(worker.capacity);
            let taken = u64::from(worker.in_flight()).min(capacity);
            if !worker.healthy {
                slots.unhealthy += capacity;
            } else if worker.busy {
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
