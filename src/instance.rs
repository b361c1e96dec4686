//! The orchestrator's instance id (`--instance-id`): its name among several
//! orchestrators on the same queues, shown in its logs, its metrics (label
//! `orchestrator_id`), `/healthz`, and its events and statuses (`orchestratorId`). A
//! leaf: the log format reads it, the orchestrator sets it.

use std::sync::OnceLock;

/// The id every log line of this process carries, once set.
static IN_LOGS: OnceLock<String> = OnceLock::new();

/// The machine's host name (`localhost` when it cannot be read).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The default instance id: the host name and the gRPC port, `HOST:PORT`.
pub fn default_id(grpc_port: u16) -> String {
    format!("{}:{grpc_port}", host_name())
}

/// Checks an `--instance-id`: 1 to 128 characters of letters, digits and `.:_@-`, so
/// it can go into a log line, a metric label and JSON as it is.
pub fn parse_id(text: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || ".:_@-".contains(c);
    if text.is_empty() || text.len() > 128 || !text.chars().all(allowed) {
        return Err(format!(
            "`{text}` is not an instance id: 1 to 128 letters, digits and .:_@-"
        ));
    }
    Ok(text.to_string())
}

/// Makes every later log line of this process carry `id` (the first call wins).
pub fn show_in_logs(id: &str) {
    let _ = IN_LOGS.set(id.to_string());
}

/// The id log lines carry, once [`show_in_logs`] was called.
pub fn in_logs() -> Option<&'static str> {
    IN_LOGS.get().map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_plain_names() {
        assert_eq!(parse_id("orch-1.eu:5051").unwrap(), "orch-1.eu:5051");
        for bad in ["", "a b", "a\"b", "a\nb", &"x".repeat(129)] {
            assert!(parse_id(bad).is_err(), "{bad:?}");
        }
        assert!(default_id(5051).ends_with(":5051"));
    }
}
