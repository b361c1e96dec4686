//! The orchestrator's small HTTP endpoint (`tiny_http`, one thread): `/metrics`
//! (Prometheus text), `/healthz` (200 only while the broker is connected and does not
//! block our publishing; the gRPC server is up whenever the process serves this; the
//! body names the broker node in use and the instance id), `/workers` (JSON).

use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::Value;

use super::registry::Registry;
use crate::metrics::Metrics;

/// Starts the HTTP endpoint on `listen`; returns the bound port.
pub fn serve(
    listen: &str,
    instance_id: &str,
    metrics: Arc<Metrics>,
    workers: Arc<Registry>,
) -> Result<(u16, JoinHandle<()>), String> {
    crate::grpc::check_listen(listen, "--metrics-listen", "BLACKTREE_METRICS_LISTEN")?;
    let server = tiny_http::Server::http(listen)
        .map_err(|e| format!("metrics endpoint cannot listen on {listen}: {e}"))?;
    let port = server.server_addr().to_ip().map_or(0, |a| a.port());
    let instance = format!("orchestrator: {instance_id}\n");
    let thread = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (status, content_type, body) = match request.url() {
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
                };
                let header = tiny_http::Header::from_bytes("Content-Type", content_type)
                    .expect("valid header");
                let response = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                // A client that went away is its own problem.
                let _ = request.respond(response);
            }
        })
        .map_err(|e| format!("spawning the metrics thread: {e}"))?;
    Ok((port, thread))
}
