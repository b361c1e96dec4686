//! The small HTTP endpoint both services can serve (`tiny_http`, one thread): the
//! orchestrator's status page, JSON API, `/metrics`, `/healthz` and `/workers`, and
//! the worker's `/metrics`. A leaf: each service brings its own handler.

mod auth;

pub use auth::{is_loopback, HttpAuth};

/// The `Content-Type` of Prometheus' text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// What a handler sees of a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The path, without the query.
    pub path: &'a str,
    /// The query (after `?`; empty: none).
    pub query: &'a str,
    /// The `Authorization` header, if sent.
    pub authorization: Option<&'a str>,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
    /// Asks the client to log in (401 with `WWW-Authenticate: Basic`).
    pub challenge: bool,
}

impl Reply {
    /// An answer with `status`, `content_type` and `body`.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type,
            body: body.into(),
            challenge: false,
        }
    }

    /// Plain text.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply::new(status, "text/plain; charset=utf-8", body)
    }

    /// JSON.
    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply::new(status, "application/json", value.to_string())
    }

    /// 404.
    pub fn not_found() -> Reply {
        Reply::text(404, "not found\n")
    }

    /// 401: log in first.
    pub fn unauthorized() -> Reply {
        Reply {
            challenge: true,
            ..Reply::text(401, "authentication required (see --http-auth-file)\n")
        }
    }
}

/// Listens on `listen` (an address in use names `variable`, which sets it) and answers
/// every request with `handle` on a thread of its own; returns the bound port.
pub fn serve(
    listen: &str,
    variable: &str,
    handle: impl Fn(Request<'_>) -> Reply + Send + 'static,
) -> Result<u16, String> {
    crate::grpc::check_listen(listen, "--metrics-listen", variable)?;
    let server = tiny_http::Server::http(listen)
        .map_err(|e| format!("the HTTP endpoint cannot listen on {listen}: {e}"))?;
    let port = server.server_addr().to_ip().map_or(0, |a| a.port());
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let url = request.url();
                let (path, query) = url.split_once('?').unwrap_or((url, ""));
                let authorization = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"))
                    .map(|h| h.value.as_str());
                let reply = handle(Request {
                    path,
                    query,
                    authorization,
                });
                let mut response = tiny_http::Response::from_string(reply.body)
                    .with_status_code(reply.status)
                    .with_header(header("Content-Type", reply.content_type));
                if reply.challenge {
                    let realm = r#"Basic realm="blacktree", charset="UTF-8""#;
                    response.add_header(header("WWW-Authenticate", realm));
                }
                // A client that went away is its own problem.
                let _ = request.respond(response);
            }
        })
        .map_err(|e| format!("spawning the HTTP thread: {e}"))?;
    Ok(port)
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name, value).expect("valid header")
}
