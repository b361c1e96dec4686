//! The orchestrator's small HTTP endpoint (`tiny_http`, one thread): `/metrics`
//! (Prometheus text), `/healthz` (200 only while the broker is connected and does not
//! block our publishing; the gRPC server is up whenever the process serves this; the
//! body names the broker node in use and the instance id), `/workers` (JSON).

use std::sync::Arc;

use serde_json::Value;

use super::registry::Registry;
use crate::metrics::Metrics;

/// Starts the HTTP endpoint on `listen`; returns the bound port.
pub fn serve(
    listen: &str,
    instance_id: &str,
    metrics: Arc<Metrics>,
    workers: Arc<Registry>,
) -> Result<u16, String> {
    let instance = format!("orchestrator: {instance_id}\n");
    crate::web::serve(listen, "BLACKTREE_METRICS_LISTEN", move |path| match path {
        "/metrics" => {
            let slots = workers.slots();
            let workers = workers.list();
            let states = workers.iter().map(|w| w.state.as_str());
            (
                200,
                "text/plain; version=0.0.4",
                metrics.render(states, slots),
            )
        }
        "/healthz" if metrics.broker_connected.get() != 1 => (
            503,
            "text/plain",
            format!("not connected to the broker\n{instance}"),
        ),
        "/healthz" => {
            let broker = format!("broker: {}\n", metrics.broker_in_use());
            if metrics.broker_blocked.get() == 1 {
                let blocked = "the broker blocks publishing (memory or disk alarm)";
                (503, "text/plain", format!("{blocked}\n{broker}{instance}"))
            } else {
                (200, "text/plain", format!("ok\n{broker}{instance}"))
            }
        }
        "/workers" => {
            let list: Vec<Value> = workers.list().iter().map(|w| w.to_json()).collect();
            (200, "application/json", Value::Array(list).to_string())
        }
        _ => (404, "text/plain", "not found\n".to_string()),
    })
}
