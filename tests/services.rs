//! The service files as an operator installs them (issue 16): the runit service
//! directory runs under a real `runsv` (as the unprivileged user `blacktree`, logs
//! through svlogd, `sv check` by the health service, `sv down` drains), and both systemd
//! units pass `systemd-analyze verify`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::build_env::TempDir;
use common::*;

const LONG: Duration = Duration::from_secs(60);

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

fn sv(args: &[&str], service: &Path) -> Output {
    Command::new("sv")
        .args(args)
        .arg(service)
        .output()
        .expect("running sv (runit)")
}

/// A copy of a service directory whose absolute paths point into `root`, with the
/// binary under test at `root/bin/blacktree` (readable by the service user).
fn install_service(name: &str, root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(binary(), bin.join("blacktree")).unwrap();
    for dir in [root, &bin] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let service = root.join(name);
    let copy = Command::new("cp")
        .arg("-r")
        .arg(scripts().join("runit").join(name))
        .arg(&service)
        .status()
        .unwrap();
    assert!(copy.success());
    let root = root.display().to_string();
    for script in ["run", "check", "log/run"] {
        let path = service.join(script);
        let text = std::fs::read_to_string(&path).unwrap();
        let moved = text
            .replace("/usr/local/bin/blacktree", &format!("{root}/bin/blacktree"))
            .replace("/var/lib/", &format!("{root}/var/lib/"))
            .replace("/var/log/", &format!("{root}/var/log/"))
            .replace("/run/", &format!("{root}/run/"));
        std::fs::write(&path, moved).unwrap();
    }
    service
}

#[test]
fn the_runit_orchestrator_runs_as_its_user_passes_sv_check_logs_through_svlogd_and_drains() {
    let dir = TempDir::new("runit");
    let root = dir.0.as_path();
    let service = install_service("blacktree-orchestrator", root);
    let names = Names::unique("runit");
    let _mq = Mq::connect(SHARED_BROKER, &names);
    let port = free_port();
    let env = service.join("env");
    let mut variables = vec![
        ("MQ_URL".to_string(), SHARED_BROKER.to_string()),
        ("BLACKTREE_GRPC_LISTEN".into(), format!("0.0.0.0:{port}")),
        ("BLACKTREE_METRICS_LISTEN".into(), "127.0.0.1:0".into()),
        (
            "BLACKTREE_LOCK_FILE".into(),
            format!("{}/run/blacktree/o.lock", root.display()),
        ),
        (
            "BLACKTREE_STATE_FILE".into(),
            format!(
                "{}/var/lib/blacktree-orchestrator/registry.json",
                root.display()
            ),
        ),
        ("BLACKTREE_DRAIN_TIMEOUT".into(), "2s".into()),
    ];
    let flags = names.args();
    for pair in flags.chunks(2) {
        let variable = format!(
            "BLACKTREE_{}",
            pair[0]
                .trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase()
        );
        variables.push((variable, pair[1].clone()));
    }
    for (variable, value) in &variables {
        std::fs::write(env.join(variable), format!("{value}\n")).unwrap();
    }
    let mut runsv = Command::new("runsv").arg(&service).spawn().expect("runsv");
    // `sv check` runs ./check: the orchestrator's health on the port the env file names.
    // Polled with runsv's pid of the service: both must say it runs.
    let pid: u32 = poll(LONG, "the service running and sv check passing", || {
        let running = text(&sv(&["status"], &service).stdout).starts_with("run:");
        let pid = std::fs::read_to_string(service.join("supervise/pid")).ok()?;
        let pid = pid.trim().parse().ok()?;
        (running && sv(&["check"], &service).status.success()).then_some(pid)
    });
    let user = Command::new("ps")
        .args(["-o", "user=", "-p", &pid.to_string()])
        .output()
        .unwrap();
    assert_eq!(text(&user.stdout).trim(), "blacktree", "the service's user");

    // svlogd stamps each line; the service leaves its own timestamp out.
    let log = root.join("var/log/blacktree/orchestrator/current");
    let started = poll(LONG, "the start in svlogd's log", || {
        let text = std::fs::read_to_string(&log).ok()?;
        let line = text
            .lines()
            .find(|l| l.contains("orchestrator starting"))?
            .to_string();
        Some(line)
    });
    let (stamp, rest) = started.split_once(' ').unwrap();
    assert!(
        stamp.contains('_') && stamp.contains(':'),
        "svlogd's stamp: {started}"
    );
    assert!(rest.starts_with("[INFO "), "no second timestamp: {started}");

    // `sv down` sends SIGTERM: the orchestrator drains and stops.
    let down = sv(&["down"], &service);
    assert!(down.status.success(), "{}", text(&down.stderr));
    poll(LONG, "the drain to end in the log", || {
        let text = std::fs::read_to_string(&log).ok()?;
        (text.contains("signal received: draining") && text.contains("orchestrator stopped"))
            .then_some(())
    });
    poll(LONG, "sv status to say down", || {
        text(&sv(&["status"], &service).stdout)
            .starts_with("down:")
            .then_some(())
    });
    let _ = sv(&["exit"], &service);
    let _ = sv(&["exit"], &service.join("log"));
    let _ = runsv.wait();
}

#[test]
fn the_systemd_units_verify_and_say_how_they_stop() {
    let units = scripts().join("systemd");
    let dir = TempDir::new("units");
    for unit in ["blacktree-orchestrator.service", "blacktree-worker.service"] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        for line in [
            "RestartPreventExitStatus=2 3",
            "User=blacktree",
            "LoadCredential=registration-token:/etc/blacktree/registration-token",
            "TimeoutStopSec=",
        ] {
            assert!(text.contains(line), "{unit} lacks {line}");
        }
        std::fs::write(
            dir.0.join(unit),
            text.replace("/usr/local/bin/blacktree", &binary()),
        )
        .unwrap();
    }
    let worker = std::fs::read_to_string(units.join("blacktree-worker.service")).unwrap();
    assert!(
        worker.contains("KillMode=mixed"),
        "the worker drains itself"
    );
    let sysusers = std::fs::read_to_string(units.join("blacktree.conf")).unwrap();
    assert!(sysusers.contains("u blacktree ") && sysusers.contains("m blacktree docker"));
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: units not verified");
        return;
    }
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.0.join("blacktree-orchestrator.service"))
        .arg(dir.0.join("blacktree-worker.service"))
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&verify.stderr)
    );
}
