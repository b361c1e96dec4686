//! Unit tests of the executor: logs, steps, process groups.

use super::*;

#[test]
fn logs_keep_the_tail_and_redact_secrets_even_across_the_cut() {
    let secret = Secret::new("s3cr3t-token".into());
    let mut log = JobLog::new(32, vec![secret.clone()]);
    log.push(&[b'a'; 100]);
    log.push(b"s3cr3t-token");
    log.push(b" end");
    let text = log.finish();
    assert!(text.ends_with("*** end"), "{text}");
    assert!(!text.contains("s3cr3t"), "{text}");
    assert!(text.starts_with("[... "), "{text}");

    // The last 32 bytes start inside the secret: cutting first would keep its end.
    let mut log = JobLog::new(32, vec![secret]);
    log.push(&[b'a'; 100]);
    log.push(b"s3cr3t-token");
    log.push(&[b'b'; 26]);
    let text = log.finish();
    assert!(!text.contains("token"), "{text}");
    assert!(text.ends_with(&format!("***{}", "b".repeat(26))), "{text}");

    let mut log = JobLog::new(1000, vec![]);
    log.note("short");
    assert_eq!(log.finish(), "short");
}

#[test]
fn cancelling_kills_the_running_step_and_skips_the_rest() {
    let control = JobControl::default();
    let mut log = JobLog::new(1000, vec![]);
    // A command line no other process has.
    let background = format!("sleep 300.{}", std::process::id());
    std::thread::scope(|s| {
        s.spawn(|| {
            while control.lock().group.is_none() {
                std::thread::yield_now();
            }
            assert!(control.cancel("cancelled"));
            assert!(!control.cancel("again"), "the first reason wins");
        });
        let mut cmd = Command::new("sh");
        // Neither sleep holds the log pipe: the step ends when its shell does.
        let script = format!("{background} >/dev/null 2>&1 & sleep 30 >/dev/null; echo never");
        cmd.args(["-c", &script]);
        let result = run_step("sleepers", cmd, None, &mut log, &control);
        assert!(matches!(result, Err(StepError::Stopped(r)) if r == "cancelled"));
    });
    let after = run_step("next", Command::new("true"), None, &mut log, &control);
    assert!(matches!(after, Err(StepError::Stopped(_))));
    assert!(!log.finish().contains("never"));
    // The whole group went, the shell's background child too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while running(&background) {
        assert!(
            std::time::Instant::now() < deadline,
            "{background} survived"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether a process with exactly this command line runs.
fn running(cmdline: &str) -> bool {
    let wanted = format!("{}\0", cmdline.replace(' ', "\0"));
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .any(|c| c == wanted.as_bytes())
}
