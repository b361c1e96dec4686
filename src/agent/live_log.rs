//! A running job's output as it is printed, for the `RunJob` calls that stream it
//! (`JobRequest.streamLogs`): lines (secrets already redacted by the job's log), each
//! with a number, in a buffer of bounded size. A build that prints faster than its
//! callers read never waits: the oldest lines go, and a reader that falls behind them is
//! told how many it missed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::Waker;

/// The most bytes of lines kept for the readers.
pub const MAX_BUFFERED_BYTES: usize = 1 << 20;

/// The longest line sent as one; a longer one is cut into pieces of this size.
pub const MAX_LINE_BYTES: usize = 4096;

/// The lines of one job, shared by its job thread (writer) and its calls (readers).
#[derive(Default)]
pub struct LiveLog {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    lines: VecDeque<String>,
    /// The number of `lines[0]`: lines before it were dropped.
    first: u64,
    bytes: usize,
    /// No more lines will come.
    closed: bool,
    /// Readers waiting for a line, woken at the next one.
    wakers: Vec<Waker>,
}

/// What a reader got.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Lines from its cursor on.
    pub lines: Vec<String>,
    /// Lines it missed: dropped before it read them.
    pub missed: u64,
}

impl LiveLog {
    /// Appends lines; drops the oldest beyond [`MAX_BUFFERED_BYTES`]; wakes the readers.
    pub fn push(&self, lines: impl IntoIterator<Item = String>) {
        let mut inner = self.inner.lock().expect("live log lock");
        let mut any = false;
        for line in lines {
            inner.bytes += line.len();
            inner.lines.push_back(line);
            any = true;
        }
        while inner.bytes > MAX_BUFFERED_BYTES {
            let Some(line) = inner.lines.pop_front() else {
                break;
            };
            inner.bytes -= line.len();
            inner.first += 1;
        }
        if any {
            for waker in inner.wakers.drain(..) {
                waker.wake();
            }
        }
    }

    /// No more lines: readers waiting for one are woken (to see the answer).
    pub fn close(&self) {
        let mut inner = self.inner.lock().expect("live log lock");
        inner.closed = true;
        for waker in inner.wakers.drain(..) {
            waker.wake();
        }
    }

    /// The lines from `*cursor` on, at most about `max_bytes` of them (at least one),
    /// moving the cursor past them; `None` when there are none yet, `waker` then being
    /// woken at the next line.
    pub fn read(&self, cursor: &mut u64, max_bytes: usize, waker: &Waker) -> Option<Batch> {
        let mut inner = self.inner.lock().expect("live log lock");
        let missed = inner.first.saturating_sub(*cursor);
        let start = (*cursor).max(inner.first);
        let skip = (start - inner.first) as usize;
        if skip >= inner.lines.len() {
            if !inner.closed && !inner.wakers.iter().any(|w| w.will_wake(waker)) {
                inner.wakers.push(waker.clone());
            }
            return None;
        }
        let mut batch = Batch {
            lines: Vec::new(),
            missed,
        };
        let mut bytes = 0;
        for line in inner.lines.iter().skip(skip) {
            if !batch.lines.is_empty() && bytes + line.len() > max_bytes {
                break;
            }
            bytes += line.len();
            batch.lines.push(line.clone());
        }
        *cursor = start + batch.lines.len() as u64;
        Some(batch)
    }
}

/// Cuts a step's output (read in chunks of any size) into lines of at most
/// [`MAX_LINE_BYTES`], each redacted by `redact` as a whole: a secret is never cut in two
/// by a chunk's end or a long line's cut (the text kept back is longer than any secret).
#[derive(Default)]
pub struct Lines {
    partial: String,
}

impl Lines {
    /// The complete lines `data` ends, redacted; `longest_secret` bytes (or more) of an
    /// unfinished line are kept back for the next call.
    pub fn feed(
        &mut self,
        data: &[u8],
        longest_secret: usize,
        redact: impl Fn(&str) -> String,
    ) -> Vec<String> {
        self.partial.push_str(&String::from_utf8_lossy(data));
        let mut lines = Vec::new();
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            cut(&redact(line.trim_end_matches(['\n', '\r'])), &mut lines);
        }
        // A line longer than the cut goes out in pieces, all but the tail that could
        // still be the start of a secret.
        let keep = longest_secret.max(1);
        if self.partial.len() > MAX_LINE_BYTES + keep {
            let redacted = redact(&self.partial);
            let mut at = redacted.len() - keep;
            while !redacted.is_char_boundary(at) {
                at -= 1;
            }
            cut(&redacted[..at], &mut lines);
            self.partial = redacted[at..].to_string();
        }
        lines
    }

    /// The unfinished line, if any (the step ended).
    pub fn finish(&mut self, redact: impl Fn(&str) -> String) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.partial.is_empty() {
            cut(&redact(&std::mem::take(&mut self.partial)), &mut lines);
        }
        lines
    }
}

/// `line` in pieces of at most [`MAX_LINE_BYTES`] (on character boundaries).
fn cut(mut line: &str, into: &mut Vec<String>) {
    loop {
        if line.len() <= MAX_LINE_BYTES {
            into.push(line.to_string());
            return;
        }
        let mut at = MAX_LINE_BYTES;
        while !line.is_char_boundary(at) {
            at -= 1;
        }
        into.push(line[..at].to_string());
        line = &line[at..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);

    impl Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn waker() -> (std::sync::Arc<Flag>, Waker) {
        let flag = std::sync::Arc::new(Flag(false.into()));
        (flag.clone(), Waker::from(flag))
    }

    #[test]
    fn readers_get_every_line_in_order_and_are_woken_for_the_next() {
        let log = LiveLog::default();
        let (woken, w) = waker();
        let mut cursor = 0;
        assert_eq!(log.read(&mut cursor, 100, &w), None);
        log.push(["a".to_string(), "b".to_string()]);
        assert!(woken.0.load(std::sync::atomic::Ordering::SeqCst));
        let batch = log.read(&mut cursor, 100, &w).unwrap();
        assert_eq!(
            (batch.lines, batch.missed, cursor),
            (vec!["a".into(), "b".into()], 0, 2)
        );
        let mut late = 0;
        assert_eq!(
            log.read(&mut late, 1, &w).unwrap().lines,
            ["a"],
            "at least one line"
        );
        assert_eq!(log.read(&mut late, 1, &w).unwrap().lines, ["b"]);
    }

    #[test]
    fn a_flood_keeps_the_buffer_bounded_and_tells_a_slow_reader_what_it_missed() {
        let log = LiveLog::default();
        let (_, w) = waker();
        let line = "x".repeat(1000);
        for _ in 0..5000 {
            log.push([line.clone()]);
        }
        let inner = log.inner.lock().unwrap();
        assert!(inner.bytes <= MAX_BUFFERED_BYTES);
        let kept = inner.lines.len() as u64;
        drop(inner);
        let mut cursor = 0;
        let batch = log.read(&mut cursor, usize::MAX, &w).unwrap();
        assert_eq!(batch.missed, 5000 - kept);
        assert_eq!(batch.lines.len() as u64, kept);
        assert_eq!(cursor, 5000);
    }

    #[test]
    fn lines_are_cut_and_redacted_whole_whatever_the_chunks() {
        let secret = "ghp_SECRETSECRET";
        let redact = |text: &str| text.replace(secret, "***");
        let output = format!(
            "one {secret}\ntwo\n{}{secret}{}\nlast",
            "a".repeat(5000),
            "b".repeat(10)
        );
        // Every chunking gives the same lines, none with the secret or a piece of it.
        for size in [1, 3, 7, 4096, 100_000] {
            let mut lines = Lines::default();
            let mut out = Vec::new();
            for chunk in output.as_bytes().chunks(size) {
                out.extend(lines.feed(chunk, secret.len(), redact));
            }
            out.extend(lines.finish(redact));
            let joined = out.concat();
            assert!(!joined.contains("SECRET"), "chunks of {size}: {out:?}");
            assert_eq!(out[0], "one ***");
            assert_eq!(out[1], "two");
            assert_eq!(out.last().unwrap(), "last");
            assert!(out.iter().all(|l| l.len() <= MAX_LINE_BYTES));
            assert_eq!(joined.matches('a').count(), 5001, "chunks of {size}");
        }
    }
}
