//! Three private RabbitMQ nodes joined into one cluster on loopback (real quorum
//! queues, real node loss), for tests and benchmarks of several orchestrators.

use std::time::Duration;

use super::{poll, PrivateBroker};

/// Nodes of one cluster; dropping it stops them all.
pub struct BrokerCluster {
    pub nodes: Vec<PrivateBroker>,
}

impl BrokerCluster {
    /// Starts three nodes at once, then joins the second and third to the first
    /// (`stop_app`, `join_cluster`, `start_app`); returns once `cluster_status` lists
    /// all three running.
    pub fn start() -> BrokerCluster {
        let starting: Vec<_> = (0..3)
            .map(|_| std::thread::spawn(PrivateBroker::start))
            .collect();
        let nodes: Vec<PrivateBroker> = starting
            .into_iter()
            .map(|node| node.join().expect("a node start panicked"))
            .collect();
        let first = nodes[0].node.clone();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]);
            node.ctl(&["join_cluster", &first]);
            node.ctl(&["start_app"]);
        }
        let cluster = BrokerCluster { nodes };
        poll(Duration::from_secs(120), "three running nodes", || {
            (cluster.running_nodes() == 3).then_some(())
        });
        for node in &cluster.nodes {
            node.wait_accepting();
        }
        cluster
    }

    /// How many nodes `cluster_status` on the first node lists as running.
    pub fn running_nodes(&self) -> usize {
        let out = self.nodes[0].ctl_output(&["cluster_status", "--formatter", "json"]);
        let status: serde_json::Value = match serde_json::from_str(&out) {
            Ok(status) => status,
            Err(_) => return 0,
        };
        status["running_nodes"].as_array().map_or(0, Vec::len)
    }

    /// Every node's URL, comma-separated, starting with node `first` (what
    /// `--amqp-url` takes).
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|i| self.nodes[(first + i) % n].url())
            .collect::<Vec<_>>()
            .join(",")
    }
}
