//! Unit tests of the executor: logs, steps, process groups.

use super::*;

#[test]
fn logs_keep_the_tail_and_redact_secrets_even_across_the_cut() {
    let live = LiveLog::default();
    let secret = Secret::new("s3cr3t-token".into());
    let mut log = JobLog::new(32, vec![secret.clone()], &live);
    log.push(&[b'a'; 100]);
    log.push(b"s3cr3t-token");
    log.push(b" end");
    let text = log.finish();
    assert!(text.ends_with("*** end"), "{text}");
    assert!(!text.contains("s3cr3t"), "{text}");
    assert!(text.starts_with("[... "), "{text}");
    // The live lines have all of it, redacted too.
    let streamed = live.read(&mut 0, usize::MAX, std::task::Waker::noop());
    let lines = streamed.expect("lines were streamed").lines;
    assert_eq!(lines, [format!("{}*** end", "a".repeat(100))]);

    // The last 32 bytes start inside the secret: cutting first would keep its end.
    let mut log = JobLog::new(32, vec![secret], &live);
    log.push(&[b'a'; 100]);
    log.push(b"s3cr3t-token");
    log.push(&[b'b'; 26]);
    let text = log.finish();
    assert!(!text.contains("token"), "{text}");
    assert!(text.ends_with(&format!("***{}", "b".repeat(26))), "{text}");

    let mut log = JobLog::new(1000, vec![], &live);
    log.note("short");
    assert_eq!(log.finish(), "short");
}

#[test]
fn cancelling_kills_the_running_step_and_skips_the_rest() {
    let live = LiveLog::default();
    let control = JobControl::default();
    let mut log = JobLog::new(1000, vec![], &live);
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

#[test]
fn the_token_is_offered_only_for_the_repositorys_protocol_and_host() {
    assert_eq!(
        credential_target("https://git.example:8443/acme/app.git"),
        Some(("https".into(), "git.example:8443".into()))
    );
    assert_eq!(
        credential_target("http://127.0.0.1/a.git"),
        Some(("http".into(), "127.0.0.1".into()))
    );
    for source in [
        "ssh://git@h/a.git",
        "file:///srv/a.git",
        "/srv/a.git",
        "git://h/a",
    ] {
        assert_eq!(credential_target(source), None, "{source}");
    }
    // The real git asks the helper as it would during a clone (or after a redirect).
    let fill = |request: &str| {
        let mut child = Command::new("git")
            .args(["-c", "credential.helper="])
            .args(["-c", &format!("credential.helper={CREDENTIAL_HELPER}")])
            .args(["credential", "fill"])
            .env("BLACKTREE_GIT_TOKEN", "ghp_HELPERTOKEN42")
            .env("BLACKTREE_GIT_PROTOCOL", "https")
            .env("BLACKTREE_GIT_HOST", "git.example:8443")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let own = fill("protocol=https\nhost=git.example:8443\n\n");
    assert!(own.contains("password=ghp_HELPERTOKEN42"), "{own}");
    for other in [
        "protocol=https\nhost=evil.example\n\n",
        "protocol=http\nhost=git.example:8443\n\n",
        "protocol=https\nhost=git.example\n\n",
    ] {
        let answer = fill(other);
        assert!(!answer.contains("HELPERTOKEN"), "{other:?} got {answer}");
    }
}
