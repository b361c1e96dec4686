//! The orchestrator's small HTTP endpoint (`tiny_http`, one thread): the status page
//! (`/`, `/jobs/ID`) and its JSON (`/api/…`, see `page`), `/metrics` (Prometheus text),
//! `/healthz` (200 only while the broker is connected and does not block our
//! publishing; the gRPC server is up whenever the process serves this; the body names
//! the broker node in use and the instance id), `/workers` (JSON).
//!
//! Who may read it: with `--http-auth-file`, everything but `/healthz` asks for the
//! token. Without one, everything is open on a loopback address; on any other address,
//! `/metrics`, `/healthz` and `/workers` stay open as they always were, and the page
//! and `/api/` are refused (they show job ids and errors).

use log::warn;
use serde_json::Value;

use super::page::{self, Sources};
use crate::web::{is_loopback, HttpAuth, Reply, Request, PROMETHEUS_TEXT};

/// Starts the HTTP endpoint on `listen`; returns the bound port.
pub fn serve(listen: &str, sources: Sources, auth: Option<HttpAuth>) -> Result<u16, String> {
    let local = is_loopback(listen);
    if auth.is_none() && !local {
        warn!(
            "the HTTP endpoint listens on {listen} without --http-auth-file: the status page \
             and /api/ are refused there; /metrics, /healthz and /workers are open"
        );
    }
    let instance = format!("orchestrator: {}\n", sources.instance_id);
    crate::web::serve(listen, "BLACKTREE_METRICS_LISTEN", move |request| {
        if request.path == "/healthz" {
            return healthz(&sources, &instance);
        }
        let page = request.path == "/"
            || request.path.starts_with("/jobs/")
            || request.path.starts_with("/api/");
        match &auth {
            Some(auth) if !auth.admits(request.authorization) => return Reply::unauthorized(),
            None if page && !local => {
                return Reply::text(
                    403,
                    "the status page and /api/ are served on a loopback address only, \
                     unless --http-auth-file is set\n",
                )
            }
            _ => {}
        }
        route(&sources, request)
    })
}

fn route(sources: &Sources, request: Request<'_>) -> Reply {
    let path = request.path;
    match path {
        "/" => page::index(sources),
        "/metrics" => {
            let workers = &sources.registry;
            let slots = workers.slots();
            let list = workers.list();
            let states = list.iter().map(|w| w.state.as_str());
            let text = sources.metrics.render(states, slots);
            Reply::new(200, PROMETHEUS_TEXT, text)
        }
        "/workers" => {
            let list: Vec<Value> = sources
                .registry
                .list()
                .iter()
                .map(|w| w.to_json())
                .collect();
            Reply::json(200, &Value::Array(list))
        }
        _ if path.starts_with("/api/") => page::api(sources, path, request.query),
        _ => match path.strip_prefix("/jobs/") {
            Some(id) => page::job(sources, &page::decode(id)),
            None => Reply::not_found(),
        },
    }
}

fn healthz(sources: &Sources, instance: &str) -> Reply {
    let metrics = &sources.metrics;
    if metrics.broker_connected.get() != 1 {
        return Reply::text(503, format!("not connected to the broker\n{instance}"));
    }
    let broker = format!("broker: {}\n", metrics.broker_in_use());
    if metrics.broker_blocked.get() == 1 {
        let blocked = "the broker blocks publishing (memory or disk alarm)";
        Reply::text(503, format!("{blocked}\n{broker}{instance}"))
    } else {
        Reply::text(200, format!("ok\n{broker}{instance}"))
    }
}
