//! Standard error for log lines, with the writes of concurrent lines combined.
//!
//! Writing each line to stderr under stderr's lock costs a `write` per line. Each write
//! also wakes the log collector's reader (journald, svlogd, a pipe). With 64 dispatch
//! threads logging, the other threads wait on that lock meanwhile. A profile put 9 % of
//! the orchestrator's CPU there (issue 20). Here a line is appended to a buffer. If no
//! thread is writing, the appending thread writes the buffer itself, before its `log`
//! call returns, and then whatever other threads appended meanwhile, until the buffer is
//! empty. If a thread is writing, the line is left to it. So a line is written at once
//! when the process logs little, and lines that come together go out in one `write`.
//! Nothing waits for a timer. [`flush`] waits for the writing thread to finish: the CLI
//! calls it before the process exits, and a panic calls it before its message. At most
//! [`MAX_BUFFERED`] bytes wait: a thread that would add beyond that waits for the
//! writer, so a collector that stops reading blocks logging as stderr itself would.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

/// The most bytes waiting to be written.
pub const MAX_BUFFERED: usize = 256 * 1024;

/// The combiner the logger writes to, once [`LogSink::start`] ran.
static SINK: OnceLock<Arc<Combiner<io::Stderr>>> = OnceLock::new();

/// Where the logger writes: standard error, combined.
pub struct LogSink(Arc<Combiner<io::Stderr>>);

impl LogSink {
    /// The sink (one per process), and [`flush`] on a panic before its message.
    pub fn start() -> LogSink {
        let combiner = SINK.get_or_init(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                flush();
                previous(info);
            }));
            Arc::new(Combiner::new(io::stderr()))
        });
        LogSink(combiner.clone())
    }

    /// Writes `line`, or leaves it to the thread writing.
    pub fn write(&self, line: &[u8]) {
        self.0.write(line);
    }
}

/// Waits until every line logged so far is written (before the process exits).
pub fn flush() {
    if let Some(combiner) = SINK.get() {
        combiner.flush();
    }
}

/// Combines the writes of lines that come while another is being written to `W`.
struct Combiner<W> {
    state: Mutex<State>,
    /// Signalled when a writing thread took the buffer or finished.
    progress: Condvar,
    output: Mutex<W>,
}

struct State {
    /// Lines not taken by a writer yet.
    pending: Vec<u8>,
    /// A thread is writing (and writes `pending` before it stops).
    writing: bool,
    /// Threads waiting on `progress` (a notify is a system call: made only for them).
    waiters: usize,
}

impl<W: Write> Combiner<W> {
    fn new(output: W) -> Combiner<W> {
        Combiner {
            state: Mutex::new(State {
                pending: Vec::new(),
                writing: false,
                waiters: 0,
            }),
            progress: Condvar::new(),
            output: Mutex::new(output),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        state.waiters += 1;
        let mut state = self.progress.wait(state).unwrap_or_else(|e| e.into_inner());
        state.waiters -= 1;
        state
    }

    /// Wakes the threads waiting for room or for the end of the writing (`state` is
    /// released first).
    fn notify(&self, state: MutexGuard<'_, State>) {
        let waiters = state.waiters > 0;
        drop(state);
        if waiters {
            self.progress.notify_all();
        }
    }

    fn write(&self, line: &[u8]) {
        let mut state = self.state();
        while state.writing && state.pending.len() + line.len() > MAX_BUFFERED {
            state = self.wait(state);
        }
        state.pending.extend_from_slice(line);
        if state.writing {
            return;
        }
        state.writing = true;
        let mut batch = Vec::new();
        while !state.pending.is_empty() {
            std::mem::swap(&mut batch, &mut state.pending);
            self.notify(state);
            {
                let mut output = self.output.lock().unwrap_or_else(|e| e.into_inner());
                // Nowhere to report a failed write to stderr.
                let _ = output.write_all(&batch);
            }
            batch.clear();
            state = self.state();
        }
        state.writing = false;
        self.notify(state);
    }

    fn flush(&self) {
        let mut state = self.state();
        while state.writing {
            state = self.wait(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that records what reached it, each `write_all` apart.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(bytes.to_vec());
            // A slow collector: lines pile up meanwhile.
            std::thread::yield_now();
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_whole_and_in_each_threads_order_in_fewer_writes() {
        let recorder = Recorder::default();
        let combiner = Arc::new(Combiner::new(recorder.clone()));
        let (threads, lines) = (8, 2_000);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let combiner = combiner.clone();
                std::thread::spawn(move || {
                    for i in 0..lines {
                        combiner.write(format!("thread {t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        combiner.flush();
        let writes = recorder.0.lock().unwrap().clone();
        let text = String::from_utf8(writes.concat()).unwrap();
        let mut next = vec![0; threads];
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            assert_eq!(words.len(), 4, "a line cut or mixed with another: {line:?}");
            let (t, i): (usize, usize) = (words[1].parse().unwrap(), words[3].parse().unwrap());
            assert_eq!(i, next[t], "thread {t}'s lines out of order");
            next[t] += 1;
        }
        assert_eq!(next, vec![lines; threads], "every line arrived");
        assert!(
            writes.len() < threads * lines,
            "lines that came together went out together ({} writes)",
            writes.len()
        );
    }

    /// An output whose every write waits for the test's go.
    struct Gated {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        entered: crossbeam_channel::Sender<()>,
        go: crossbeam_channel::Receiver<()>,
    }

    impl Write for Gated {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.writes.lock().unwrap().push(bytes.to_vec());
            self.entered.send(()).unwrap();
            self.go.recv().unwrap();
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_logged_while_another_thread_writes_is_written_by_that_thread() {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let (entered_tx, entered) = crossbeam_channel::unbounded();
        let (go, go_rx) = crossbeam_channel::unbounded();
        let combiner = Arc::new(Combiner::new(Gated {
            writes: writes.clone(),
            entered: entered_tx,
            go: go_rx,
        }));
        let writer = {
            let combiner = combiner.clone();
            std::thread::spawn(move || combiner.write(b"first\n"))
        };
        let wait = std::time::Duration::from_secs(10);
        entered
            .recv_timeout(wait)
            .expect("the first line is being written");
        // Returns at once: the writing thread takes the line.
        combiner.write(b"second\n");
        go.send(()).unwrap();
        entered
            .recv_timeout(wait)
            .expect("the writing thread wrote the second line as well");
        go.send(()).unwrap();
        writer.join().unwrap();
        combiner.flush();
        assert_eq!(
            *writes.lock().unwrap(),
            [b"first\n".to_vec(), b"second\n".to_vec()]
        );
    }

    #[test]
    fn a_line_is_written_before_its_write_returns_when_no_other_thread_writes() {
        let recorder = Recorder::default();
        let combiner = Combiner::new(recorder.clone());
        combiner.write(b"alone\n");
        assert_eq!(recorder.0.lock().unwrap().concat(), b"alone\n");
    }
}
