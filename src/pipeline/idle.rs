//! How idle dispatch threads wait for the `jobs` channel.
//!
//! With many receivers blocked on one crossbeam channel, a send wakes one of them while
//! it holds the channel's waker lock; the woken thread then finds that lock taken, sleeps
//! on it and is woken a second time (an off-CPU profile counted 0.7 extra sleeps per
//! job with 64 dispatch threads). Here the idle threads only poll the channel
//! (`try_recv`) and sleep in `thread::park`, listed under a lock of their own that no
//! one holds while waking them: the consumer calls [`IdleThreads::wake_one`] after each
//! send.
//!
//! No job is left in the channel while threads sleep: a thread lists itself before it
//! polls the channel a last time and parks, so a send either finds it listed (and wakes
//! it) or comes before that last poll. A woken thread that took a job in that last
//! poll instead (the wake-up was meant for a later one) passes the wake-up on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, Thread};

use crossbeam_channel::{Receiver, TryRecvError};

/// The idle threads of a pool that takes its work from one channel.
#[derive(Default)]
pub struct IdleThreads {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Parked (or about to park), the most recently idle last.
    parked: Vec<Arc<Sleeper>>,
    /// The pool stops: [`IdleThreads::next`] returns `None`.
    closed: bool,
}

/// One thread's entry, made once per thread by [`IdleThreads::waiter`].
pub struct Waiter(Arc<Sleeper>);

struct Sleeper {
    thread: Thread,
    /// Taken off the list by a wake-up (read and written under the state lock).
    woken: AtomicBool,
}

impl IdleThreads {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("idle threads lock")
    }

    /// The calling thread's entry, for [`IdleThreads::next`].
    pub fn waiter(&self) -> Waiter {
        Waiter(Arc::new(Sleeper {
            thread: thread::current(),
            woken: AtomicBool::new(false),
        }))
    }

    /// Wakes the most recently idle thread, if one sleeps (after a send on the channel).
    pub fn wake_one(&self) {
        let sleeper = {
            let mut state = self.lock();
            let Some(sleeper) = state.parked.pop() else {
                return;
            };
            sleeper.woken.store(true, Ordering::Relaxed);
            sleeper
        };
        // Outside the lock: the woken thread does not find it taken.
        sleeper.thread.unpark();
    }

    /// Stops the pool: every idle thread wakes, and [`IdleThreads::next`] returns `None`.
    pub fn close(&self) {
        let parked = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.parked)
        };
        for sleeper in parked {
            sleeper.thread.unpark();
        }
    }

    /// The next message of `channel`, waiting for one; `None` once closed or the
    /// channel is disconnected. `waiter` is the calling thread's own.
    pub fn next<T>(&self, waiter: &Waiter, channel: &Receiver<T>) -> Option<T> {
        let me = &waiter.0;
        loop {
            match channel.try_recv() {
                Ok(message) => return Some(message),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            if !self.list(me) {
                return None;
            }
            // The last poll, listed: a send from now on wakes this thread (or another).
            match channel.try_recv() {
                Err(TryRecvError::Empty) => thread::park(),
                taken => {
                    self.leave(me);
                    return taken.ok();
                }
            }
            // Woken, or a spurious wake-up (still listed).
            self.unlist(me);
        }
    }

    /// Lists `me` as idle; false once closed.
    fn list(&self, me: &Arc<Sleeper>) -> bool {
        let mut state = self.lock();
        if !state.closed {
            state.parked.push(me.clone());
        }
        !state.closed
    }

    /// `me` took a message after it listed itself: it is no longer idle. A send's
    /// wake-up that reached it meanwhile was meant for another message: passed on.
    fn leave(&self, me: &Arc<Sleeper>) {
        if self.unlist(me) {
            self.wake_one();
        }
    }

    /// Takes `me` off the list; true when a wake-up had taken it off already.
    fn unlist(&self, me: &Arc<Sleeper>) -> bool {
        let mut state = self.lock();
        if me.woken.swap(false, Ordering::Relaxed) {
            return true;
        }
        if let Some(i) = state.parked.iter().rposition(|s| Arc::ptr_eq(s, me)) {
            state.parked.remove(i);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Sends as soon as the previous messages were taken (spinning, not sleeping, to
    /// hit the moment a thread turns idle), one or two at a time, to `threads` threads;
    /// a lost wake-up leaves a message in the channel while every thread sleeps.
    fn hand_off(threads: usize, messages: u32) {
        let idle = Arc::new(IdleThreads::default());
        let (tx, rx) = crossbeam_channel::bounded::<u32>(4);
        let (done_tx, done) = crossbeam_channel::unbounded();
        let pool: Vec<_> = (0..threads)
            .map(|_| {
                let (idle, rx, done_tx) = (idle.clone(), rx.clone(), done_tx.clone());
                thread::spawn(move || {
                    let waiter = idle.waiter();
                    while let Some(n) = idle.next(&waiter, &rx) {
                        done_tx.send(n).unwrap();
                        // A varying pause sweeps the next send across this thread's
                        // way to sleep.
                        for _ in 0..n.wrapping_mul(7919) % 256 {
                            std::hint::spin_loop();
                        }
                    }
                })
            })
            .collect();
        let mut sent = 0;
        while sent < messages {
            let burst = sent % 2 + 1;
            for i in 0..burst {
                tx.send(sent + i).unwrap();
                idle.wake_one();
            }
            sent += burst;
            for _ in 0..burst {
                let deadline = Instant::now() + Duration::from_secs(10);
                while done.try_recv().is_err() {
                    assert!(
                        Instant::now() < deadline,
                        "a message was left in the channel while the threads slept \
                         ({sent} sent)"
                    );
                    std::hint::spin_loop();
                }
            }
        }
        idle.close();
        for thread in pool {
            thread.join().unwrap();
        }
        assert!(
            idle.lock().parked.is_empty(),
            "no thread left listed after close"
        );
    }

    #[test]
    fn a_wake_up_that_reached_a_thread_which_took_another_message_is_passed_on() {
        let idle = Arc::new(IdleThreads::default());
        let (tx, rx) = crossbeam_channel::bounded::<u32>(4);
        let (done_tx, done) = crossbeam_channel::unbounded();
        let (tid_tx, tid) = crossbeam_channel::bounded(1);
        // Another thread, idle: listed and asleep.
        let other = {
            let (idle, rx) = (idle.clone(), rx.clone());
            thread::spawn(move || {
                // SAFETY: gettid(2) has no preconditions.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                let waiter = idle.waiter();
                while let Some(n) = idle.next(&waiter, &rx) {
                    done_tx.send(n).unwrap();
                }
            })
        };
        let stat = format!("/proc/self/task/{}/stat", tid.recv().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            let asleep = state
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('S'));
            if asleep && idle.lock().parked.len() == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the other thread never slept");
            thread::yield_now();
        }
        // This thread lists itself; a first message comes (its send found no thread
        // listed), and this thread's last poll takes it.
        let me = idle.waiter();
        assert!(idle.list(&me.0));
        tx.send(1).unwrap();
        assert_eq!(rx.try_recv(), Ok(1));
        // A second message's wake-up reaches this thread, the most recently listed.
        tx.send(2).unwrap();
        idle.wake_one();
        idle.leave(&me.0);
        assert_eq!(
            done.recv_timeout(Duration::from_secs(10)),
            Ok(2),
            "the other thread was woken for the second message"
        );
        idle.close();
        other.join().unwrap();
    }

    #[test]
    fn every_message_reaches_one_of_one_idle_thread() {
        hand_off(1, 50_000);
    }

    #[test]
    fn every_message_reaches_one_of_several_idle_threads() {
        hand_off(4, 50_000);
    }
}
