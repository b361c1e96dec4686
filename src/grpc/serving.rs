//! What grpc.health.v1 answers (grpc_health_probe's conventions): SERVING only while
//! every condition of the role holds, for the overall service `""` and for the role's
//! named service ([`ORCHESTRATOR_SERVICE`], [`WORKER_SERVICE`]), so a probe can tell an
//! orchestrator from a worker. The orchestrator's conditions: connected to the broker,
//! not blocked by it, not draining; the worker's: registered with an orchestrator, not
//! draining.

use std::collections::BTreeSet;
use std::sync::Mutex;

use grpcio_health::{HealthService, ServingStatus};
use log::info;

/// The orchestrator's named health service.
pub const ORCHESTRATOR_SERVICE: &str = "blacktree.Orchestrator";
/// The worker's named health service.
pub const WORKER_SERVICE: &str = "blacktree.Worker";

/// A health service whose status follows a set of conditions.
pub struct Serving {
    health: HealthService,
    name: &'static str,
    /// The conditions that do not hold now.
    unmet: Mutex<BTreeSet<&'static str>>,
}

impl Serving {
    /// A health service for the role's `name`, with the conditions in `unmet` not met
    /// yet (NOT_SERVING until they are).
    pub fn new(name: &'static str, unmet: &[&'static str]) -> Serving {
        let serving = Serving {
            health: HealthService::default(),
            name,
            unmet: Mutex::new(unmet.iter().copied().collect()),
        };
        serving.publish(&serving.unmet.lock().expect("health lock"));
        serving
    }

    /// The grpc.health.v1 service to register on the server.
    pub fn service(&self) -> HealthService {
        self.health.clone()
    }

    /// Records whether `condition` holds, and answers accordingly from now on.
    pub fn set(&self, condition: &'static str, holds: bool) {
        let mut unmet = self.unmet.lock().expect("health lock");
        let changed = if holds {
            unmet.remove(condition)
        } else {
            unmet.insert(condition)
        };
        if changed {
            self.publish(&unmet);
        }
    }

    /// Whether every condition holds.
    pub fn is_serving(&self) -> bool {
        self.unmet.lock().expect("health lock").is_empty()
    }

    fn publish(&self, unmet: &BTreeSet<&'static str>) {
        let status = if unmet.is_empty() {
            info!("health: SERVING");
            ServingStatus::Serving
        } else {
            let unmet: Vec<&str> = unmet.iter().copied().collect();
            info!("health: NOT_SERVING until {}", unmet.join(" and "));
            ServingStatus::NotServing
        };
        for service in ["", self.name] {
            self.health.set_serving_status(service, status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_only_while_every_condition_holds() {
        let registered = "registered with an orchestrator";
        let serving = Serving::new(WORKER_SERVICE, &[registered]);
        assert!(!serving.is_serving());
        serving.set(registered, true);
        assert!(serving.is_serving());
        serving.set("not draining", false);
        serving.set(registered, false);
        serving.set("not draining", true);
        assert!(!serving.is_serving(), "still unregistered");
        serving.set(registered, true);
        assert!(serving.is_serving());
    }
}
