//! The small HTTP endpoint both services can serve (`tiny_http`, one thread): the
//! orchestrator's `/metrics`, `/healthz`, `/workers`, and the worker's `/metrics`. A
//! leaf: each service brings its own handler.

/// An answer: status code, content type, body.
pub type Reply = (u16, &'static str, String);

/// Listens on `listen` (an address in use names `variable`, which sets it) and answers
/// every request with `handle(path)` on a thread of its own; returns the bound port.
pub fn serve(
    listen: &str,
    variable: &str,
    handle: impl Fn(&str) -> Reply + Send + 'static,
) -> Result<u16, String> {
    crate::grpc::check_listen(listen, "--metrics-listen", variable)?;
    let server = tiny_http::Server::http(listen)
        .map_err(|e| format!("the HTTP endpoint cannot listen on {listen}: {e}"))?;
    let port = server.server_addr().to_ip().map_or(0, |a| a.port());
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (status, content_type, body) = handle(request.url());
                let header = tiny_http::Header::from_bytes("Content-Type", content_type)
                    .expect("valid header");
                let response = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                // A client that went away is its own problem.
                let _ = request.respond(response);
            }
        })
        .map_err(|e| format!("spawning the HTTP thread: {e}"))?;
    Ok(port)
}
