//! A host that vanishes without a reset, on loopback: `iptables` drops every TCP packet
//! to and from one port, as a cable pulled out or a powered-off host would (no RST, no
//! FIN; the peer's data goes unacknowledged). Needs root (the tests run as root, and
//! `scripts/setup.sh` installs iptables).

use std::process::Command;

/// The rules dropping a port's traffic on `lo`; removed when dropped.
pub struct Partition {
    port: u16,
}

impl Partition {
    /// Drops every TCP packet to or from `port` on loopback from now on.
    pub fn cut(port: u16) -> Partition {
        let partition = Partition { port };
        for rule in partition.rules() {
            iptables("-I", &rule);
        }
        partition
    }

    /// The established TCP connections to `port` (from the client side), as the local
    /// `address:port` of each.
    pub fn established_to(port: u16) -> Vec<String> {
        let filter = format!("( dport = :{port} )");
        let out = Command::new("ss")
            .args(["-Htn", "state", "established", &filter])
            .output()
            .expect("running ss (iproute2)");
        assert!(out.status.success(), "ss failed: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().nth(2).map(str::to_string))
            .collect()
    }

    fn rules(&self) -> [Vec<String>; 2] {
        let rule = |direction: &str| {
            [
                "INPUT",
                "-i",
                "lo",
                "-p",
                "tcp",
                direction,
                &self.port.to_string(),
                "-j",
                "DROP",
            ]
            .map(str::to_string)
            .to_vec()
        };
        [rule("--dport"), rule("--sport")]
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for rule in self.rules() {
            iptables("-D", &rule);
        }
    }
}

fn iptables(action: &str, rule: &[String]) {
    let status = Command::new("iptables")
        .arg("-w")
        .arg(action)
        .args(rule)
        .status()
        .expect("running iptables (scripts/setup.sh installs it; the tests run as root)");
    assert!(status.success(), "iptables {action} {rule:?} failed");
}
