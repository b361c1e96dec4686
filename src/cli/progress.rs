//! One job's progress for `submit --wait` and `watch --job`: waiting → running on W:
//! step → outcome, with the time since it was followed. On a terminal (stderr) it is
//! one line that updates itself (indicatif's spinner); otherwise each change is a plain
//! line of its own, so logs and pipes get no control characters.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// How often the terminal line is redrawn (the spinner and the elapsed time).
const TICK: Duration = Duration::from_millis(120);

/// A followed job's progress line.
pub struct Progress {
    job_id: String,
    /// The updating line, on a terminal.
    bar: Option<ProgressBar>,
    state: String,
    worker: String,
    started: Instant,
}

impl Progress {
    /// Starts following `job_id` (waiting: nothing heard of it yet).
    pub fn new(job_id: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            let style = ProgressStyle::with_template("{spinner} job {prefix}: {msg} ({elapsed})")
                .expect("a valid progress template");
            bar.set_style(style);
            bar.set_prefix(job_id.to_string());
            bar
        });
        let mut progress = Progress {
            job_id: job_id.to_string(),
            bar,
            state: String::new(),
            worker: String::new(),
            started: Instant::now(),
        };
        progress.show("waiting");
        if let Some(bar) = &progress.bar {
            bar.enable_steady_tick(TICK);
        }
        progress
    }

    fn show(&mut self, state: &str) {
        if state == self.state {
            return;
        }
        state.clone_into(&mut self.state);
        match &self.bar {
            Some(bar) => bar.set_message(state.to_string()),
            None => eprintln!(
                "job {}: {state} ({:.1}s)",
                self.job_id,
                self.started.elapsed().as_secs_f64()
            ),
        }
    }

    /// A lifecycle event of the job (`--events-key`).
    pub fn event(&mut self, event: &Value) {
        let worker = event["workerId"].as_str().unwrap_or("");
        match event["event"].as_str() {
            Some("received") => self.show("waiting for a worker"),
            Some("dispatched" | "adopted") => {
                worker.clone_into(&mut self.worker);
                self.show(&format!("running on {worker}"));
            }
            _ => {}
        }
    }

    /// A message of the job's live output (`--logs-key`): a step it announces
    /// (`$ docker build`) shows.
    pub fn output(&mut self, logs: &Value) {
        let lines = logs["lines"].as_array().into_iter().flatten();
        let step = lines
            .filter_map(Value::as_str)
            .rev()
            .find_map(|l| l.strip_prefix("$ "));
        if let Some(step) = step {
            let on = if self.worker.is_empty() {
                "running".to_string()
            } else {
                format!("running on {}", self.worker)
            };
            self.show(&format!("{on}: {}", step.trim_end()));
        }
    }

    /// The job ended with `status`: the line says how, and stays.
    pub fn finish(mut self, status: &Value) {
        let outcome = status["outcome"].as_str().unwrap_or("ended");
        let worker = status["workerId"].as_str().unwrap_or("");
        let text = if worker.is_empty() {
            outcome.to_string()
        } else {
            format!("{outcome} on {worker}")
        };
        match self.bar.take() {
            Some(bar) => {
                bar.finish_with_message(text);
                // The line stays; what is printed next goes below it.
                eprintln!();
            }
            None => self.show(&text),
        }
    }

    /// The job was not followed to its end (a timeout, a lost connection): the line
    /// stays as it was.
    pub fn abandon(mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
            eprintln!();
        }
    }
}
