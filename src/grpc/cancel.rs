//! Blocking on a grpcio call without an async runtime, cancellable from another thread.
//!
//! grpcio completes calls on its own completion-queue threads; [`wait`] parks the
//! calling thread until the call's future is ready or its [`CancelToken`] fires, so a
//! dispatch thread can block on `RunJob` and still be cancelled from another thread.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

use grpcio::ClientUnaryReceiver;

/// Why the orchestrator stopped a job's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The worker has not answered health pings for this long (`--lost-after`) while
    /// running the call.
    WorkerLost(std::time::Duration),
    /// The control plane cancelled the job.
    Cancelled,
}

/// Stops a job from another thread: a thread blocked in [`block_on`] with this token
/// wakes up, and [`CancelToken::fired`] becomes ready for `select!`. It also tells
/// whether the job may still start: a job released before its first attempt (its
/// delivery died) may not.
#[derive(Clone)]
pub struct CancelToken(Arc<TokenInner>);

struct TokenInner {
    state: Mutex<TokenState>,
    fired: crossbeam_channel::Receiver<()>,
}

struct TokenState {
    reason: Option<CancelReason>,
    /// A `RunJob` for the job was sent to a worker (or the job was adopted), and was
    /// not refused: the job is this orchestrator's to finish.
    attempt: bool,
    /// Its delivery died before an attempt: it must not start here.
    released: bool,
    /// Dropped on cancel, which disconnects `fired`.
    fire: Option<crossbeam_channel::Sender<()>>,
    /// The thread waiting in `block_on`, to unpark.
    waiter: Option<Thread>,
}

impl Default for CancelToken {
    fn default() -> CancelToken {
        let (fire, fired) = crossbeam_channel::bounded(0);
        CancelToken(Arc::new(TokenInner {
            state: Mutex::new(TokenState {
                reason: None,
                attempt: false,
                released: false,
                fire: Some(fire),
                waiter: None,
            }),
            fired,
        }))
    }
}

impl CancelToken {
    fn state(&self) -> std::sync::MutexGuard<'_, TokenState> {
        self.0.state.lock().expect("cancel token lock")
    }

    /// Cancels (the first reason wins; returns whether this call was first) and wakes
    /// the waiter.
    pub fn cancel(&self, reason: CancelReason) -> bool {
        let mut state = self.state();
        if state.reason.is_some() {
            return false;
        }
        state.reason = Some(reason);
        state.fire = None;
        if let Some(waiter) = &state.waiter {
            waiter.unpark();
        }
        true
    }

    /// The reason it was cancelled, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        self.state().reason
    }

    /// Marks the start of an attempt on a worker (a `RunJob` that may start the build,
    /// or attach to it); false when the job was released first ([`CancelToken::release`]).
    pub fn begin_attempt(&self) -> bool {
        let mut state = self.state();
        state.attempt = !state.released;
        state.attempt
    }

    /// The worker refused the attempt without starting anything.
    pub fn attempt_refused(&self) {
        self.state().attempt = false;
    }

    /// Releases a job whose delivery died with its broker connection, unless an attempt
    /// runs or ran (the job is then this orchestrator's to finish) or it was cancelled:
    /// it must not start here any more, since the broker redelivers it (maybe to another
    /// orchestrator). Wakes the thread waiting with it, like a cancel. Returns whether
    /// it was released.
    pub fn release(&self) -> bool {
        let mut state = self.state();
        if state.attempt || state.released || state.reason.is_some() {
            return false;
        }
        state.released = true;
        state.fire = None;
        true
    }

    /// Whether [`CancelToken::release`] released it.
    pub fn released(&self) -> bool {
        self.state().released
    }

    /// Ready (disconnected) once cancelled: select on it while waiting for something else.
    pub fn fired(&self) -> &crossbeam_channel::Receiver<()> {
        &self.0.fired
    }
}

/// How a call ended without an answer.
#[derive(Debug)]
pub enum CallError {
    /// gRPC failed the call (status, connection, codec).
    Grpc(grpcio::Error),
    /// The orchestrator cancelled it.
    Cancelled(CancelReason),
}

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Blocks the current thread until `future` (a grpcio future, which grpcio's own threads
/// complete) is ready, or `token` (made on this thread) is cancelled.
pub fn block_on<F: Future>(
    future: F,
    token: Option<&CancelToken>,
) -> Result<F::Output, CancelReason> {
    let mut future = std::pin::pin!(future);
    if let Some(token) = token {
        token.state().waiter = Some(thread::current());
    }
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Some(reason) = token.and_then(CancelToken::reason) {
            return Err(reason);
        }
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return Ok(output);
        }
        thread::park();
    }
}

/// Waits for a unary call's answer. When `token` fires first, the call is left running:
/// the caller decides what to tell the peer before it cancels (or drops) the call.
pub fn wait<T: Unpin>(
    call: &mut ClientUnaryReceiver<T>,
    token: Option<&CancelToken>,
) -> Result<T, CallError> {
    match block_on(call, token) {
        Ok(answer) => answer.map_err(CallError::Grpc),
        Err(reason) => Err(CallError::Cancelled(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_cancel_from_another_thread_ends_the_wait() {
        let token = CancelToken::default();
        let canceller = token.clone();
        let (tid_tx, tid_rx) = crossbeam_channel::bounded(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            // SAFETY: gettid(2) has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_tx.send(block_on(std::future::pending::<()>(), Some(&token)));
        });
        // Cancelled only once the waiter has registered and sleeps in `park`, so the
        // wake-up (not the check before parking) is what ends the wait.
        let stat = format!("/proc/self/task/{}/stat", tid_rx.recv().unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let registered = canceller.state().waiter.is_some();
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            let sleeping = state
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('S'));
            if registered && sleeping {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the waiter never parked"
            );
            std::thread::yield_now();
        }
        assert!(canceller.cancel(CancelReason::Cancelled));
        assert_eq!(
            done.recv_timeout(Duration::from_secs(10)),
            Ok(Err(CancelReason::Cancelled)),
            "the cancel woke the waiter"
        );
        assert!(canceller.fired().recv().is_err(), "fired is disconnected");
    }

    #[test]
    fn a_job_is_released_only_before_an_attempt_that_a_worker_did_not_refuse() {
        let token = CancelToken::default();
        assert!(token.begin_attempt());
        assert!(
            !token.release(),
            "an attempt runs: the job is ours to finish"
        );
        token.attempt_refused();
        assert!(token.release(), "refused, so nothing started: released");
        assert!(token.released() && token.fired().recv().is_err());
        assert!(!token.begin_attempt(), "a released job never starts");
        let cancelled = CancelToken::default();
        assert!(cancelled.cancel(CancelReason::Cancelled));
        assert!(!cancelled.release(), "a cancelled job ends with its status");
    }
}
