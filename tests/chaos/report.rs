//! Statuses collected and attributed (duplicates to faults, outcomes to workers), the
//! report printed, and what must hold checked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::common::{poll, try_queue_counts, Mq, PrivateBroker};

use crate::*;

/// Reads statuses until every job has one and the execute queue is empty: every
/// delivery acked, so every status confirmed and already in the status queue, and
/// nothing left that could still publish one (a late duplicate included).
pub fn collect_statuses(reader: &Mq, broker: &PrivateBroker, ids: &[String]) -> Vec<Value> {
    let names = &reader.names;
    let mut statuses: Vec<Value> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    poll(
        SETTLE,
        "every job's status, with the execute queue acked",
        || {
            let settled = try_queue_counts(Some(&broker.node), &names.execute) == Some((0, 0));
            let waiting = reader.depth(&names.status) as usize;
            let batch = reader.statuses(waiting, LONG);
            seen.extend(
                batch
                    .iter()
                    .filter_map(|s| s["jobId"].as_str().map(str::to_string)),
            );
            statuses.extend(batch);
            (settled && ids.iter().all(|id| seen.contains(id))).then_some(())
        },
    );
    statuses
}

/// A status, as far as the checks need it.
#[derive(Debug, Clone)]
pub struct StatusInfo {
    pub job: String,
    pub outcome: String,
    pub worker: String,
    pub started: Option<SystemTime>,
    pub finished: SystemTime,
}

impl StatusInfo {
    pub fn parse(status: &Value) -> StatusInfo {
        let time = |field: &str| {
            status[field]
                .as_str()
                .map(|t| humantime::parse_rfc3339(t).unwrap_or_else(|e| panic!("{field} {t}: {e}")))
        };
        StatusInfo {
            job: status["jobId"].as_str().expect("jobId").to_string(),
            outcome: status["outcome"].as_str().expect("outcome").to_string(),
            worker: status["workerId"].as_str().unwrap_or_default().to_string(),
            started: time("startedAt"),
            finished: time("finishedAt").expect("finishedAt"),
        }
    }

    /// Whether both are the same status (published twice), not two runs of the job.
    pub fn same_run(&self, other: &StatusInfo) -> bool {
        (&self.outcome, &self.worker, self.started, self.finished)
            == (&other.outcome, &other.worker, other.started, other.finished)
    }
}

/// Why a job has more than one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DuplicateCause {
    /// The same status, published again on a new connection after a broker fault cut
    /// the one it was published on before its confirm arrived.
    BrokerFault,
    /// The same build's answer, published by a second orchestrator: the job's delivery
    /// went to it when a fault cut the first one off (or restarted it), and it adopted
    /// the running build (or its held answer) rather than running it again.
    Adopted,
    /// The job ran again: the killed orchestrator had finished it but not yet acked its
    /// delivery, which the broker gave to its successor.
    OrchestratorKill,
    /// The test published the job twice (a batch whose confirms a broker fault cut off)
    /// and the copies reached orchestrators that did not share a dedupe window.
    TestRepublish,
    Unexplained,
}

impl DuplicateCause {
    /// Why `extra` (a later status of a job) exists, given the job's `earlier` ones.
    pub fn of(
        extra: &StatusInfo,
        earlier: &[StatusInfo],
        faults: &[Fault],
        republished: &HashSet<String>,
    ) -> DuplicateCause {
        let slack = ATTRIBUTION_SLACK;
        if earlier.iter().any(|e| e.same_run(extra)) {
            let cut = faults
                .iter()
                .any(|f| f.kind.cuts_broker() && f.around(extra.finished, slack, Duration::ZERO));
            return if cut {
                DuplicateCause::BrokerFault
            } else {
                DuplicateCause::Unexplained
            };
        }
        // One of the two statuses is the adoption: it started (was adopted) soon after a
        // fault that moved the job's delivery to another orchestrator.
        let adoption = |s: &StatusInfo| {
            faults.iter().any(|f| {
                (f.kind.cuts_broker() || f.kind.restarts_orchestrator())
                    && s.started
                        .is_some_and(|t| f.around(t, Duration::ZERO, slack + ADOPTION_DELAY))
            })
        };
        let adopted = earlier.iter().any(|e| {
            (&e.outcome, &e.worker) == (&extra.outcome, &extra.worker)
                && (adoption(e) || adoption(extra))
        });
        if adopted {
            return DuplicateCause::Adopted;
        }
        let across_kill = faults.iter().any(|f| {
            f.kind.restarts_orchestrator()
                && earlier.iter().any(|e| e.finished <= f.ended)
                && extra.started.is_some_and(|s| s >= f.began)
        });
        if across_kill {
            DuplicateCause::OrchestratorKill
        } else if republished.contains(&extra.job) {
            DuplicateCause::TestRepublish
        } else {
            DuplicateCause::Unexplained
        }
    }
}

/// Duplicates the faults can explain at most:
/// * an orchestrator SIGKILL or SIGTERM: the deliveries it held unacked (at most the prefetch) go
///   to its successor, which runs them again; only those whose status had already been
///   published become duplicates;
/// * a lost broker connection (close_all_connections, stop_app): the statuses published
///   and not yet confirmed are published again. A status is unconfirmed only while its
///   job is pending: at most the prefetch of the connection plus the jobs still
///   running from an earlier one (at most the dispatch threads);
///   (each orchestrator's, on a cluster);
/// * a job the test published twice runs twice only when the copies reach different
///   orchestrators (a single one deduplicates): one extra status each.
pub fn duplicate_bound(faults: &[Fault], published: &Published, orchestrators: usize) -> usize {
    let kills = faults
        .iter()
        .filter(|f| f.kind.restarts_orchestrator())
        .count();
    let cuts = faults.iter().filter(|f| f.kind.cuts_broker()).count();
    kills * PREFETCH
        + cuts * orchestrators * (PREFETCH + DISPATCH_THREADS)
        + published.republished.len()
}

/// Counts the builds started again (a later step of a job that already had one) and
/// the jobs among them that nothing explains. What explains one: the earlier step's
/// worker incarnation was SIGKILLed after it started (the build, or its held answer,
/// died with it), or the test published the job twice and the copies reached two
/// orchestrators at once. Nothing else does: a build still running when its
/// orchestrator went (or lost its broker) is adopted, and a finished one's answer stays
/// held on its worker for the job's redelivery, wherever that lands.
fn reruns(
    cluster: &Cluster,
    duplicates: &BTreeMap<DuplicateCause, Vec<String>>,
) -> (BTreeMap<&'static str, usize>, Vec<String>) {
    let ns = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    // Each step with when its incarnation was SIGKILLed, if it was.
    let mut by_job: HashMap<String, Vec<(Step, Option<u64>)>> = HashMap::new();
    for worker in &cluster.workers {
        let killed: HashMap<u32, Option<u64>> = worker
            .incarnations
            .iter()
            .map(|(pid, kill)| (*pid, kill.map(ns)))
            .collect();
        for (agent, steps) in read_steps(&worker.steps) {
            let kill = killed.get(&agent).copied().flatten();
            for step in steps {
                by_job
                    .entry(step.job.clone())
                    .or_default()
                    .push((step, kill));
            }
        }
    }
    let published_twice = |job: &String| {
        duplicates
            .get(&DuplicateCause::TestRepublish)
            .is_some_and(|jobs| jobs.contains(job))
    };
    let mut count: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut unexplained = Vec::new();
    for (job, mut steps) in by_job {
        steps.sort_by_key(|(s, _)| s.start);
        for pair in steps.windows(2) {
            let (earlier, kill) = &pair[0];
            let lost_with_its_worker = kill.is_some_and(|kill| kill > earlier.start);
            let why = if lost_with_its_worker {
                "worker killed"
            } else if published_twice(&job) {
                "published twice"
            } else {
                unexplained.push(job.clone());
                "unexplained"
            };
            *count.entry(why).or_default() += 1;
        }
    }
    unexplained.sort();
    unexplained.dedup();
    (count, unexplained)
}

/// Everything the run produced, attributed and counted.
pub struct Report {
    pub jobs: usize,
    pub statuses: Vec<StatusInfo>,
    pub lost: Vec<String>,
    pub duplicates: BTreeMap<DuplicateCause, Vec<String>>,
    pub duplicate_bound: usize,
    pub faults: Vec<Fault>,
    pub published: Published,
    /// `worker_lost` statuses no worker fault explains, and other unexpected outcomes.
    pub odd_outcomes: Vec<StatusInfo>,
    /// Succeeded statuses without a completed step of their job on their worker.
    pub unbacked: Vec<StatusInfo>,
    pub workers: Vec<WorkerSteps>,
    /// Builds started again after an earlier start of the same job, by explanation.
    pub reruns: BTreeMap<&'static str, usize>,
    /// Jobs started again with no explanation (see [`reruns`]).
    pub unexplained_reruns: Vec<String>,
    /// Redelivered jobs an orchestrator adopted from the worker running them.
    pub adopted: usize,
}

impl Report {
    pub fn new(
        ids: &[String],
        statuses: &[Value],
        faults: &[Fault],
        published: &Published,
        cluster: &Cluster,
    ) -> Report {
        let statuses: Vec<StatusInfo> = statuses.iter().map(StatusInfo::parse).collect();
        let mut by_job: HashMap<&str, Vec<StatusInfo>> = HashMap::new();
        for status in &statuses {
            by_job.entry(&status.job).or_default().push(status.clone());
        }
        let lost = ids
            .iter()
            .filter(|id| !by_job.contains_key(id.as_str()))
            .cloned()
            .collect();
        let mut duplicates: BTreeMap<DuplicateCause, Vec<String>> = BTreeMap::new();
        for (job, mut runs) in by_job {
            runs.sort_by_key(|s| s.finished);
            for i in 1..runs.len() {
                let cause =
                    DuplicateCause::of(&runs[i], &runs[..i], faults, &published.republished);
                duplicates.entry(cause).or_default().push(job.to_string());
            }
        }
        let lost_worker_explained = |s: &StatusInfo| {
            faults.iter().any(|f| {
                f.kind.loses_worker()
                    && f.worker.as_deref() == Some(s.worker.as_str())
                    && f.around(s.finished, Duration::ZERO, ATTRIBUTION_SLACK)
            })
        };
        let odd_outcomes = statuses
            .iter()
            .filter(|s| match s.outcome.as_str() {
                "succeeded" => false,
                "worker_lost" => !lost_worker_explained(s),
                _ => true,
            })
            .cloned()
            .collect();
        let workers: Vec<WorkerSteps> = cluster.workers.iter().map(WorkerSteps::read).collect();
        let unbacked = statuses
            .iter()
            .filter(|s| s.outcome == "succeeded")
            .filter(|s| {
                !workers
                    .iter()
                    .any(|w| w.id == s.worker && w.completed.contains(&s.job))
            })
            .cloned()
            .collect();
        let (reruns, unexplained_reruns) = reruns(cluster, &duplicates);
        let adopted = cluster
            .orchestrator_logs()
            .iter()
            .map(|log| log.matches("adopted from worker").count())
            .sum();
        Report {
            reruns,
            unexplained_reruns,
            adopted,
            jobs: ids.len(),
            lost,
            duplicates,
            duplicate_bound: duplicate_bound(faults, published, cluster.orchestrators.len()),
            faults: faults.to_vec(),
            published: published.clone(),
            odd_outcomes,
            unbacked,
            workers,
            statuses,
        }
    }

    pub fn duplicate_count(&self) -> usize {
        self.duplicates.values().map(Vec::len).sum()
    }

    pub fn print(&self, cluster: &Cluster, rss_end: &[u64], wall: Duration) {
        let count_by = |items: Vec<String>| {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for item in items {
                *counts.entry(item).or_default() += 1;
            }
            counts
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let faults = count_by(
            self.faults
                .iter()
                .map(|f| f.kind.label().to_string())
                .collect(),
        );
        let duplicates = count_by(
            self.duplicates
                .iter()
                .flat_map(|(cause, jobs)| jobs.iter().map(move |_| format!("{cause:?}")))
                .collect(),
        );
        let concurrency = self
            .workers
            .iter()
            .map(|w| {
                format!(
                    "{} {}/{CAPACITY} ({} incarnations)",
                    w.id,
                    w.peak.1.len(),
                    w.incarnations
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let steps = self.workers.iter().fold((0, 0, 0, 0), |acc, w| {
            (
                acc.0 + w.steps,
                acc.1 + w.killed,
                acc.2 + w.died,
                acc.3 + w.orphaned,
            )
        });
        let memory = cluster
            .orchestrators
            .iter()
            .zip(rss_end)
            .map(|(o, end)| {
                let baselines: Vec<String> = o.baselines.iter().map(|kib| mib(*kib)).collect();
                format!(
                    "baseline {}; end {} (limit {})",
                    baselines.join(", restarted "),
                    mib(*end),
                    mib(o.baselines.last().unwrap() + RSS_TOLERANCE_KIB)
                )
            })
            .collect::<Vec<_>>()
            .join(" | ");
        let rows = [
            (
                "jobs published",
                format!(
                    "{} ({} published twice by the test, {} publisher reconnects)",
                    self.jobs,
                    self.published.republished.len(),
                    self.published.reconnects
                ),
            ),
            ("statuses", self.statuses.len().to_string()),
            ("lost", self.lost.len().to_string()),
            (
                "duplicates",
                format!(
                    "{} (bound {}){}",
                    self.duplicate_count(),
                    self.duplicate_bound,
                    if duplicates.is_empty() {
                        String::new()
                    } else {
                        format!(": {duplicates}")
                    }
                ),
            ),
            ("faults", format!("{}: {faults}", self.faults.len())),
            (
                "outcomes",
                count_by(self.statuses.iter().map(|s| s.outcome.clone()).collect()),
            ),
            ("unexplained outcomes", self.odd_outcomes.len().to_string()),
            (
                "steps",
                format!(
                    "{} started, {} killed ({} seen to die), {} orphaned by a SIGKILL",
                    steps.0, steps.1, steps.2, steps.3
                ),
            ),
            ("max steps at once", concurrency),
            (
                "builds re-run",
                format!(
                    "{} ({}); {} adopted after an orchestrator restart",
                    self.reruns.values().sum::<usize>(),
                    self.reruns
                        .iter()
                        .map(|(why, n)| format!("{why} {n}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.adopted
                ),
            ),
            ("orchestrator RSS", memory),
            ("wall time", format!("{:.1} s", wall.as_secs_f64())),
        ];
        let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
        println!("chaos: results");
        for (name, value) in rows {
            println!("  {name:<width$}  {value}");
        }
    }

    /// Asserts what must hold; the evidence (log lines) goes with a failure.
    pub fn check(&self, cluster: &Cluster, rss_end: &[u64]) {
        assert!(
            self.lost.is_empty(),
            "jobs without a status: {:?}",
            self.lost
        );
        for kind in cluster.shape.faults() {
            assert!(
                self.faults.iter().any(|f| f.kind == kind),
                "no {} was injected",
                kind.label()
            );
        }
        if let Some(jobs) = self.duplicates.get(&DuplicateCause::Unexplained) {
            panic!(
                "{} duplicates that no fault explains; statuses and orchestrator logs:\n{}\n{}",
                jobs.len(),
                self.statuses_of(jobs),
                evidence(cluster, jobs)
            );
        }
        assert!(
            self.duplicate_count() <= self.duplicate_bound,
            "{} duplicates, more than the faults explain ({})",
            self.duplicate_count(),
            self.duplicate_bound
        );
        assert!(
            self.odd_outcomes.is_empty(),
            "unexpected outcomes: {:?}\n{}",
            self.odd_outcomes,
            evidence(
                cluster,
                &self
                    .odd_outcomes
                    .iter()
                    .map(|s| s.job.clone())
                    .collect::<Vec<_>>()
            )
        );
        assert!(
            self.unexplained_reruns.is_empty(),
            "builds run again though their worker lived on and no status explains it: {:?}\n{}",
            self.unexplained_reruns,
            evidence(cluster, &self.unexplained_reruns)
        );
        if self.faults.iter().any(|f| f.hit_long_build) {
            assert!(
                self.adopted > 0,
                "an orchestrator went while a long build ran, and no build was adopted"
            );
        }
        assert!(
            self.unbacked.is_empty(),
            "succeeded without a completed step on their worker: {:?}",
            self.unbacked
        );
        for worker in &self.workers {
            assert!(
                worker.unknown_pids.is_empty(),
                "{}: steps under agent pids {:?}, none of its incarnations",
                worker.id,
                worker.unknown_pids
            );
            // PR_SET_PDEATHSIG: a step dies with its SIGKILLed agent.
            assert_eq!(
                worker.orphaned, 0,
                "{}: steps ended after their agent was SIGKILLed",
                worker.id
            );
            let (agent, steps) = &worker.peak;
            assert!(
                steps.len() <= CAPACITY,
                "{} (agent pid {agent}) ran {} steps at once, capacity {CAPACITY}: {steps:?}\n{}",
                worker.id,
                steps.len(),
                evidence(
                    cluster,
                    &steps.iter().map(|s| s.job.clone()).collect::<Vec<_>>()
                )
            );
        }
        for (member, &end) in cluster.orchestrators.iter().zip(rss_end) {
            let baseline = *member.baselines.last().unwrap();
            assert!(
                end <= baseline + RSS_TOLERANCE_KIB,
                "an orchestrator's RSS did not come back: {} idle after the run, baseline {}",
                mib(end),
                mib(baseline)
            );
        }
    }

    /// The statuses of `jobs`, one per line.
    pub fn statuses_of(&self, jobs: &[String]) -> String {
        self.statuses
            .iter()
            .filter(|s| jobs.contains(&s.job))
            .map(|s| format!("  {s:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// What the orchestrators logged about (the first few of) `jobs`.
pub fn evidence(cluster: &Cluster, jobs: &[String]) -> String {
    jobs.iter()
        .take(5)
        .map(|job| format!("{job}:\n  {}", cluster.log_lines_about(job).join("\n  ")))
        .collect::<Vec<_>>()
        .join("\n")
}
