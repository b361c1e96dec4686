//! Opening a session: the consuming connection (topology declared, prefetch set) and
//! the publishing one beside it on the same node, whose channel goes to the publisher.

use amiquip::{Channel, Connection};
use crossbeam_channel::Receiver;
use log::info;

use super::super::{declare_instance_cancel_queue, declare_topology, queue_type_mismatch};
use super::{Channels, Consumer, EXIT_MISCONFIGURED};
use crate::pipeline::Connected;

impl Consumer {
    /// Opens the consuming connection (jobs and cancels) and the publishing one, whose
    /// channel goes to the publisher thread.
    pub(super) fn connect(&mut self) -> Result<(Connection, Channels, String), String> {
        let brokers = &self.config.brokers;
        let (mut connection, node) = brokers.connect_from(self.node)?;
        let url = brokers.url(node).masked().to_string();
        // Both connections go to the same node.
        let mut publishing = match brokers.url(node).connect() {
            Ok(publishing) => publishing,
            Err(e) => {
                let _ = connection.close();
                return Err(e.into());
            }
        };
        let mut setup =
            || -> Result<(Channels, Channel, Receiver<amiquip::Confirm>, _, String), amiquip::Error> {
                let jobs = connection.open_channel(None)?;
                let topology = &self.config.topology;
                declare_topology(&jobs, topology)?;
                let own = declare_instance_cancel_queue(&jobs, topology, &self.config.instance_id)?;
                jobs.qos(0, self.config.prefetch, false)?;
                let cancels = connection.open_channel(None)?;
                cancels.qos(0, self.config.prefetch, false)?;
                let blocked = publishing.listen_for_connection_blocked()?;
                let publish = publishing.open_channel(None)?;
                let confirms = publish.listen_for_publisher_confirms()?;
                publish.enable_publisher_confirms()?;
                Ok((Channels { jobs, cancels }, publish, confirms, blocked, own))
            };
        match setup() {
            Ok((channels, publish, confirms, blocked, own_cancels)) => {
                self.generation += 1;
                if self.generation > 1 {
                    self.links.metrics.broker_reconnects.inc();
                }
                self.node = node;
                self.links.metrics.set_broker_connected(true);
                self.links.metrics.set_broker_in_use(&url);
                info!(
                    "broker: connected to {url} (connection {})",
                    self.generation
                );
                let connected = Connected {
                    connection: publishing,
                    channel: publish,
                    blocked,
                    confirms,
                    generation: self.generation,
                };
                self.links
                    .connections
                    .send(connected)
                    .map_err(|_| "the status publisher has stopped".to_string())?;
                Ok((connection, channels, own_cancels))
            }
            Err(e) => {
                let _ = connection.close();
                let _ = publishing.close();
                if let Some(mismatch) = queue_type_mismatch(&e, self.config.topology.queue_type) {
                    // Retrying cannot help: the operator must change the flag or the queue.
                    log::error!("{mismatch}");
                    crate::log_sink::flush();
                    eprintln!("blacktree: {mismatch}");
                    std::process::exit(EXIT_MISCONFIGURED);
                }
                Err(format!("setting up {url}: {e}"))
            }
        }
    }
}
