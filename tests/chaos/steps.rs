//! What the workers' steps files say: the steps of each worker incarnation, when each
//! started and ended or died, and the busiest moment.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::*;

/// One step of one worker incarnation, from the steps file.
#[derive(Debug, Clone)]
pub struct Step {
    pub job: String,
    pub start: u64,
    /// `None` when the step was killed (no `end` line).
    pub end: Option<u64>,
    /// When a killed step was seen to die (its `died` line), if it was.
    pub died: Option<u64>,
}

impl Step {
    /// Until when the step ran: its end, or its death; `None` when neither is known.
    pub fn until(&self) -> Option<u64> {
        self.end.or(self.died)
    }
}

/// Reads a worker's steps file: its steps by agent pid.
pub fn read_steps(path: &Path) -> BTreeMap<u32, Vec<Step>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<(u64, String, String, u32)> = text
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let [kind, job, agent, at] = fields[..] else {
                panic!("bad line in {}: {line:?}", path.display())
            };
            (
                at.parse().unwrap(),
                kind.to_string(),
                job.to_string(),
                agent.parse().unwrap(),
            )
        })
        .collect();
    lines.sort();
    let mut steps: BTreeMap<u32, Vec<Step>> = BTreeMap::new();
    // The open step of each (agent, job). A worker never runs a job twice at once (it
    // answers ALREADY_EXISTS), so an `end` or `died` closes the job's latest start, and
    // a start still open when the job starts again on the same incarnation was killed.
    let mut open: HashMap<(u32, String), usize> = HashMap::new();
    for (at, kind, job, agent) in lines {
        let incarnation = steps.entry(agent).or_default();
        if kind == "start" {
            open.insert((agent, job.clone()), incarnation.len());
            incarnation.push(Step {
                job,
                start: at,
                end: None,
                died: None,
            });
            continue;
        }
        let i = open
            .remove(&(agent, job.clone()))
            .unwrap_or_else(|| panic!("{}: {job} {kind} without a start", path.display()));
        match kind.as_str() {
            "end" => incarnation[i].end = Some(at),
            "died" => incarnation[i].died = Some(at),
            other => panic!("{}: unknown line kind {other:?}", path.display()),
        }
    }
    steps
}

/// The steps running at the busiest moment. The count peaks at some step's start, so
/// only starts are looked at. A killed step runs until its watcher saw it die; one
/// whose death was not seen (its watcher was killed as it started) counts at its start
/// only, which can miss an excess but never make one up.
pub fn peak(steps: &[Step]) -> Vec<Step> {
    let running_at = |t: u64| -> Vec<Step> {
        steps
            .iter()
            .filter(|s| s.start <= t && s.until().map_or(s.start == t, |until| until > t))
            .cloned()
            .collect()
    };
    steps
        .iter()
        .map(|s| running_at(s.start))
        .max_by_key(Vec::len)
        .unwrap_or_default()
}

/// A worker's figures, from its steps file.
#[derive(Debug)]
pub struct WorkerSteps {
    pub id: String,
    pub incarnations: usize,
    pub steps: usize,
    /// Steps killed, by the worker or with it (no `end` line).
    pub killed: usize,
    /// Killed steps whose death the watcher saw.
    pub died: usize,
    /// Steps that ended after their worker was SIGKILLed.
    pub orphaned: usize,
    /// The most steps one incarnation ran at once: that incarnation's agent pid, and
    /// the steps.
    pub peak: (u32, Vec<Step>),
    /// Agent pids in the file that are none of its incarnations'.
    pub unknown_pids: Vec<u32>,
    /// Jobs with a completed step.
    pub completed: HashSet<String>,
}

impl WorkerSteps {
    pub fn read(worker: &ChaosWorker) -> WorkerSteps {
        let by_agent = read_steps(&worker.steps);
        let killed_at: HashMap<u32, Option<SystemTime>> =
            worker.incarnations.iter().copied().collect();
        let ns = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        let all = || by_agent.values().flatten();
        WorkerSteps {
            id: worker.id.clone(),
            incarnations: worker.incarnations.len(),
            steps: all().count(),
            killed: all().filter(|s| s.end.is_none()).count(),
            died: all()
                .filter(|s| s.end.is_none() && s.died.is_some())
                .count(),
            orphaned: by_agent
                .iter()
                .map(
                    |(agent, steps)| match killed_at.get(agent).copied().flatten() {
                        Some(kill) => steps.iter().filter(|s| s.end > Some(ns(kill))).count(),
                        None => 0,
                    },
                )
                .sum(),
            peak: by_agent
                .iter()
                .map(|(agent, steps)| (*agent, peak(steps)))
                .max_by_key(|(_, steps)| steps.len())
                .unwrap_or_default(),
            unknown_pids: by_agent
                .keys()
                .filter(|pid| !killed_at.contains_key(pid))
                .copied()
                .collect(),
            completed: all()
                .filter(|s| s.end.is_some())
                .map(|s| s.job.clone())
                .collect(),
        }
    }
}
