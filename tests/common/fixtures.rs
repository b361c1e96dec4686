//! The setup most end-to-end tests share.

use super::{Behaviour, Mq, Names, Orchestrator, PrivateBroker, TestWorker, SHARED_BROKER};

/// What most end-to-end tests start with: their own queue names, their own connection
/// to the broker, and an orchestrator for those queues. Fields drop in order: the
/// orchestrator is stopped before the queues are deleted.
pub struct Setup {
    pub orch: Orchestrator,
    pub mq: Mq,
    pub names: Names,
}

impl Setup {
    /// On the shared broker with the test orchestrator's defaults.
    pub fn new(test: &str) -> Setup {
        Self::with_flags(test, &[])
    }

    /// On the shared broker, with `extra` orchestrator flags.
    pub fn with_flags(test: &str, extra: &[&str]) -> Setup {
        let names = Names::unique(test);
        let mq = Mq::connect(SHARED_BROKER, &names);
        let orch = Orchestrator::start(SHARED_BROKER, &names, extra);
        Setup { orch, mq, names }
    }

    /// On the shared broker, with `extra` flags and a state file of its own that
    /// [`Orchestrator::restart`] keeps; returns the state file's path too.
    pub fn remembering(test: &str, extra: &[&str]) -> (Setup, String) {
        let state = super::own_state_file();
        let flags = [&["--state-file", state.as_str()], extra].concat();
        (Self::with_flags(test, &flags), state)
    }

    /// On a private broker node, with `extra` orchestrator flags.
    pub fn on(broker: &PrivateBroker, test: &str, extra: &[&str]) -> Setup {
        let names = Names::unique(test);
        let mq = Mq::on(broker, &names);
        let orch = Orchestrator::start(&broker.url(), &names, extra);
        Setup { orch, mq, names }
    }

    /// Starts a test worker and registers it with the orchestrator.
    pub fn worker(&self, id: &str, behaviour: Behaviour) -> TestWorker {
        self.orch.worker(id, behaviour)
    }
}
