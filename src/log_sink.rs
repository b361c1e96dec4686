//! Standard error for log lines, with the writes of concurrent lines combined, and in
//! the orchestrator held back briefly and written together.
//!
//! Writing each line to stderr under stderr's lock costs a `write` per line. Each write
//! also wakes the log collector's reader (journald, svlogd, a pipe). With 64 dispatch
//! threads logging, the other threads wait on that lock meanwhile. A profile put 9 % of
//! the orchestrator's CPU there (issue 20). Here a line is appended to a buffer. If no
//! thread is writing, the appending thread writes the buffer itself, before its `log`
//! call returns, and then whatever other threads appended meanwhile, until the buffer is
//! empty. If a thread is writing, the line is left to it. So a line is written at once
//! when the process logs little, and lines that come together go out in one `write`.
//! [`flush`] writes what is left and waits for the writing thread to finish: the CLI
//! calls it before the process exits, and a panic calls it before its message. At most
//! [`MAX_BUFFERED`] bytes wait: a thread that would add beyond that writes them, or
//! waits for the writer, so a collector that stops reading blocks logging as stderr
//! itself would.
//!
//! The orchestrator logs three lines per job, and writes them one at a time even so:
//! its threads seldom log at the same moment. It calls [`defer`]: a job's routine lines
//! (received, dispatched, ended: logged inside [`routine`]) are then only appended. The
//! status publisher calls [`flush`] before each message it publishes, so the lines
//! logged before a status was handed to it are on stderr before the status is on the
//! broker (an operator or a test reading the log after a status finds its job's lines),
//! and the lines of several jobs go out in one `write`. A thread of the sink's own
//! writes the lines no publish follows, at most [`LINGER`] after they came: it ticks
//! while lines come and sleeps once they stop. Every other line (a broker connection, a
//! worker's registration, a warning) is written at once, with the lines waiting before
//! it: its event may show elsewhere first (in `/healthz`, say), and it is rare.

use std::cell::Cell;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// The most bytes waiting to be written.
pub const MAX_BUFFERED: usize = 256 * 1024;

/// How long a line may wait, after [`defer`], for a publish to write it.
pub const LINGER: Duration = Duration::from_millis(10);

/// The combiner the logger writes to, once [`LogSink::start`] ran.
static SINK: OnceLock<Arc<Combiner<io::Stderr>>> = OnceLock::new();

thread_local! {
    /// The thread logs inside [`routine`].
    static ROUTINE: Cell<bool> = const { Cell::new(false) };
}

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

    /// Writes `line`, or leaves it to the thread writing (or, after [`defer`] and inside
    /// [`routine`], to the next [`flush`] or the lingering thread).
    pub fn write(&self, line: &[u8]) {
        self.0.write(line, ROUTINE.with(Cell::get));
    }
}

/// Runs `f`, whose log lines may wait after [`defer`]: the lines each job logs
/// (received, dispatched, ended), which its status's publish writes.
pub fn routine(f: impl FnOnce()) {
    let outer = ROUTINE.with(|routine| routine.replace(true));
    f();
    ROUTINE.with(|routine| routine.set(outer));
}

/// Writes every line logged so far and waits until it is written: before the process
/// exits, and in the orchestrator before each message it publishes.
pub fn flush() {
    if let Some(combiner) = SINK.get() {
        combiner.flush();
    }
}

/// From now on, lines wait for a [`flush`] or at most [`LINGER`] (the orchestrator,
/// whose publisher flushes). Does nothing before [`LogSink::start`] or when called again.
pub fn defer() {
    if let Some(combiner) = SINK.get() {
        combiner.defer();
    }
}

/// Combines the writes of lines that come while another is being written to `W`.
struct Combiner<W> {
    state: Mutex<State>,
    /// Signalled when a writing thread took the buffer or finished.
    progress: Condvar,
    /// Signalled when a line comes while the lingering thread waits for one.
    lines: Condvar,
    output: Mutex<W>,
}

struct State {
    /// Lines not taken by a writer yet.
    pending: Vec<u8>,
    /// A thread is writing (and writes `pending` before it stops).
    writing: bool,
    /// Threads waiting on `progress` (a notify is a system call: made only for them).
    waiters: usize,
    /// Lines wait for a flush or the lingering thread ([`defer`]).
    deferred: bool,
    /// A line came since the lingering thread's last tick.
    fresh: bool,
    /// The lingering thread waits on `lines` for a line.
    lingerer_idle: bool,
}

impl<W: Write + Send + 'static> Combiner<W> {
    fn new(output: W) -> Combiner<W> {
        Combiner {
            state: Mutex::new(State {
                pending: Vec::new(),
                writing: false,
                waiters: 0,
                deferred: false,
                fresh: false,
                lingerer_idle: false,
            }),
            progress: Condvar::new(),
            lines: Condvar::new(),
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

    /// Appends `line`, and writes it unless another thread is writing or it `may_wait`
    /// (after [`defer`]).
    fn write(&self, line: &[u8], may_wait: bool) {
        let mut state = self.state();
        while state.writing && state.pending.len() + line.len() > MAX_BUFFERED {
            state = self.wait(state);
        }
        state.pending.extend_from_slice(line);
        if may_wait && state.deferred && state.pending.len() <= MAX_BUFFERED {
            state.fresh = true;
            if state.lingerer_idle {
                state.lingerer_idle = false;
                drop(state);
                self.lines.notify_one();
            }
            return;
        }
        if !state.writing {
            self.write_pending(state);
        }
    }

    /// Writes `pending` until it stays empty (no other thread is writing).
    fn write_pending<'a>(&'a self, mut state: MutexGuard<'a, State>) {
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
        if !state.pending.is_empty() {
            self.write_pending(state);
        }
    }

    /// Turns on deferral, with the lingering thread (once).
    fn defer(self: &Arc<Self>) {
        let mut state = self.state();
        if state.deferred {
            return;
        }
        state.deferred = true;
        let combiner = self.clone();
        std::thread::Builder::new()
            .name("log-linger".into())
            .spawn(move || combiner.linger())
            .expect("spawning the log-lingering thread");
    }

    /// The lingering thread: while lines come, writes what is pending every [`LINGER`];
    /// once a tick found none, waits for the next line.
    fn linger(&self) {
        let mut state = self.state();
        loop {
            if !state.fresh && state.pending.is_empty() {
                state.lingerer_idle = true;
                while state.lingerer_idle {
                    state = self.lines.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                continue;
            }
            state.fresh = false;
            drop(state);
            std::thread::sleep(LINGER);
            state = self.state();
            if !state.writing && !state.pending.is_empty() {
                self.write_pending(state);
                state = self.state();
            }
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
                        combiner.write(format!("thread {t} line {i}\n").as_bytes(), false);
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
            std::thread::spawn(move || combiner.write(b"first\n", false))
        };
        let wait = std::time::Duration::from_secs(10);
        entered
            .recv_timeout(wait)
            .expect("the first line is being written");
        // Returns at once: the writing thread takes the line.
        combiner.write(b"second\n", false);
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
        combiner.write(b"alone\n", false);
        assert_eq!(recorder.0.lock().unwrap().concat(), b"alone\n");
    }

    /// Polls `done` until it holds, for at most 10 s.
    fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn deferred_lines_wait_for_a_flush_and_go_out_in_one_write() {
        let recorder = Recorder::default();
        let combiner = Combiner::new(recorder.clone());
        // Deferred without the lingering thread: only the flush writes.
        combiner.state().deferred = true;
        combiner.write(b"one\n", true);
        combiner.write(b"two\n", true);
        assert!(recorder.0.lock().unwrap().is_empty(), "held back");
        combiner.flush();
        assert_eq!(*recorder.0.lock().unwrap(), [b"one\ntwo\n".to_vec()]);
    }

    #[test]
    fn a_line_outside_routine_is_written_at_once_after_the_lines_waiting() {
        let recorder = Recorder::default();
        let combiner = Combiner::new(recorder.clone());
        combiner.state().deferred = true;
        combiner.write(b"routine\n", true);
        assert!(recorder.0.lock().unwrap().is_empty(), "held back");
        combiner.write(b"connected\n", false);
        assert_eq!(recorder.0.lock().unwrap().concat(), b"routine\nconnected\n");
    }

    #[test]
    fn routine_marks_only_the_lines_logged_inside_it() {
        let inside = std::cell::Cell::new(false);
        routine(|| inside.set(ROUTINE.with(Cell::get)));
        assert!(inside.get());
        assert!(!ROUTINE.with(Cell::get), "unmarked after");
    }

    #[test]
    fn a_deferred_line_no_flush_follows_is_written_by_the_lingering_thread() {
        let recorder = Recorder::default();
        let combiner = Arc::new(Combiner::new(recorder.clone()));
        combiner.defer();
        combiner.write(b"first\n", true);
        let written = || recorder.0.lock().unwrap().concat();
        eventually("the first line written", || written() == b"first\n");
        // Once the thread waits for lines again, a line wakes it.
        eventually("the lingering thread idle", || {
            combiner.state().lingerer_idle
        });
        combiner.write(b"second\n", true);
        eventually("the second line written", || {
            written() == b"first\nsecond\n"
        });
    }

    #[test]
    fn deferred_lines_beyond_the_bound_are_written_by_the_thread_that_adds_them() {
        let recorder = Recorder::default();
        let combiner = Combiner::new(recorder.clone());
        combiner.state().deferred = true;
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        let lines = MAX_BUFFERED / line.len() + 1;
        for _ in 0..lines {
            combiner.write(&line, true);
        }
        let written = recorder.0.lock().unwrap().concat();
        assert_eq!(written.len(), lines * line.len(), "all written, no flush");
        assert!(combiner.state().pending.is_empty());
    }
}
