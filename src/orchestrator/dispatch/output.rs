//! A running job's output, from its `RunJob` call to the publisher (`--logs-key`),
//! within the [`LogBudget`]: lines that do not fit are dropped and counted, never
//! waited for, so a build printing at full speed slows neither this thread nor the
//! statuses.

use super::DispatchLinks;
use crate::job::{Dialect, Job};
use crate::pipeline::{LogLines, Publication};
use crate::proto::job::JobResponse;

/// The output of one `RunJob` call.
pub(super) struct Output<'a> {
    job: &'a Job,
    links: &'a DispatchLinks,
    /// Lines dropped since the last lines sent on (told with the next ones).
    dropped: u64,
}

impl<'a> Output<'a> {
    pub(super) fn new(job: &'a Job, links: &'a DispatchLinks) -> Output<'a> {
        Output {
            job,
            links,
            dropped: 0,
        }
    }

    /// Hands a message of output lines on to the publisher, or drops them.
    pub(super) fn forward(&mut self, message: JobResponse) {
        let metrics = &self.links.metrics;
        metrics.log_lines_dropped.inc_by(message.logLinesDropped);
        self.dropped += message.logLinesDropped;
        let lines = message.logLines.into_vec();
        let bytes: usize = lines.iter().map(String::len).sum();
        if lines.is_empty() {
            return;
        }
        metrics.board.lines(&self.job.job_id, &lines);
        if !self.links.log_budget.try_take(bytes) {
            metrics.log_lines_dropped.inc_by(lines.len() as u64);
            self.dropped += lines.len() as u64;
            return;
        }
        let logs = LogLines {
            job_id: self.job.job_id.clone(),
            deployment_id: (self.job.dialect == Dialect::Deployment)
                .then(|| self.job.job_id.clone()),
            lines,
            dropped: std::mem::take(&mut self.dropped),
            bytes,
        };
        // The publisher outlives the dispatch pool.
        let _ = self.links.publications.send(Publication::Logs(logs));
    }
}
