//! The guest's control port, as one state machine per VM: the guest writes
//! "stop" or "start" as often and in whatever order it likes; the latest
//! write is what gets carried out, by one worker thread per VM (stops) or by
//! the writing vCPU itself (starts), so no sequence of writes spawns a
//! thread, and none leaves the service in a state the guest did not ask for
//! last.
//!
//! A stop is carried out [`STOP_DELAY`] after it is written, so that the
//! guest's selftest keeps calling while the sidecore goes away (the calls in
//! flight then fall back to the exit path); a start is carried out at once
//! and cancels a stop not carried out yet.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long after the guest's stop request the service goes away.
pub const STOP_DELAY: Duration = Duration::from_millis(2);

/// How long [`Controller::shutdown`] waits for a busy worker.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Serve its rings.
    Serve,
    /// Stop serving them.
    Stop,
}

/// What the worker should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do: what the guest wants is in place.
    Idle,
    /// Wait this long, then ask again.
    Wait(Duration),
    /// Put this in place, then report it with [`ControlState::applied`].
    Apply(Want),
}

/// The pure logic: what the guest wants, what is in place, and when the
/// wish is due.
#[derive(Clone, Debug)]
pub struct ControlState {
    desired: Want,
    applied: Want,
    due: Instant,
}

impl ControlState {
    /// A VM whose service runs, with no request pending.
    pub fn new(now: Instant) -> ControlState {
        ControlState { desired: Want::Serve, applied: Want::Serve, due: now }
    }

    /// The guest wrote `want` at `now`. A repeated stop keeps its first due
    /// time (a stream of stops cannot postpone the stop for ever).
    pub fn write(&mut self, want: Want, now: Instant) {
        match want {
            Want::Serve => self.due = now,
            Want::Stop if self.desired == Want::Stop => {}
            Want::Stop => self.due = now + STOP_DELAY,
        }
        self.desired = want;
    }

    /// What to do at `now`.
    pub fn next(&self, now: Instant) -> Step {
        if self.desired == self.applied {
            Step::Idle
        } else if now >= self.due {
            Step::Apply(self.desired)
        } else {
            Step::Wait(self.due - now)
        }
    }

    /// `want` is in place now (or failed, which the worker reported: it is
    /// not retried until the guest asks again).
    pub fn applied(&mut self, want: Want) {
        self.applied = want;
    }

    /// What is in place.
    pub fn current(&self) -> Want {
        self.applied
    }

    /// What the guest asked for last.
    pub fn desired(&self) -> Want {
        self.desired
    }
}

struct Inner {
    state: ControlState,
    shutdown: bool,
    /// Someone (the worker or a vCPU starting inline) is in `apply`.
    busy: bool,
}

type Apply = Box<dyn FnMut(Want) + Send>;

struct Shared {
    inner: Mutex<Inner>,
    wake: Condvar,
    /// Used by one caller at a time (`busy`): never contended.
    apply: Mutex<Apply>,
}

/// One VM's controller: the vCPUs [`Controller::write`], one worker thread
/// applies (a start is applied at once by the vCPU that writes it, as the
/// guest expects its service back when its write returns).
pub struct Controller {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these; if it did, the state is still
    // consistent (every field is written whole).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Applies `want` outside the state lock (stopping a sidecore or asking
/// the daemon takes a while, and vCPUs keep writing); returns the lock.
fn carry_out<'a>(sh: &'a Shared, mut g: MutexGuard<'a, Inner>, want: Want) -> MutexGuard<'a, Inner> {
    g.busy = true;
    drop(g);
    (lock(&sh.apply))(want);
    let mut g = lock(&sh.inner);
    g.busy = false;
    g.state.applied(want);
    // The worker may have waited for us, or have a newer wish to carry out.
    sh.wake.notify_all();
    g
}

impl Controller {
    /// Starts the worker thread `name`; `apply` puts a wish in place (and
    /// reports its own failures: the controller only records that it ran).
    pub fn spawn(name: &str, apply: impl FnMut(Want) + Send + 'static) -> std::io::Result<Controller> {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner { state: ControlState::new(Instant::now()), shutdown: false, busy: false }),
            wake: Condvar::new(),
            apply: Mutex::new(Box::new(apply)),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            let mut g = lock(&sh.inner);
            while !g.shutdown {
                match g.state.next(Instant::now()) {
                    Step::Apply(want) if !g.busy => g = carry_out(&sh, g, want),
                    Step::Idle | Step::Apply(_) => {
                        g = sh.wake.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                    Step::Wait(d) => {
                        g = sh.wake.wait_timeout(g, d).unwrap_or_else(std::sync::PoisonError::into_inner).0;
                    }
                }
            }
        })?;
        Ok(Controller { shared, thread: Mutex::new(Some(thread)) })
    }

    /// The guest wrote `want`. A start is carried out before this returns
    /// unless a stop or start is under way (then the worker does it next).
    pub fn write(&self, want: Want) {
        let sh = &*self.shared;
        let mut g = lock(&sh.inner);
        g.state.write(want, Instant::now());
        if want == Want::Serve && !g.busy && !g.shutdown && g.state.next(Instant::now()) == Step::Apply(Want::Serve) {
            drop(carry_out(sh, g, want));
        } else {
            drop(g);
            sh.wake.notify_all();
        }
    }

    /// What is in place now.
    pub fn current(&self) -> Want {
        lock(&self.shared.inner).state.current()
    }

    /// Stops the worker and waits for it (a wish not yet carried out is
    /// dropped; later writes are ignored). A worker stuck in `apply` (a
    /// daemon that does not answer) is waited for at most
    /// [`SHUTDOWN_WAIT`], then left to end on its own: the run must end.
    pub fn shutdown(&self) {
        lock(&self.shared.inner).shutdown = true;
        self.shared.wake.notify_all();
        let t = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(t) = t else { return };
        let t0 = Instant::now();
        while !t.is_finished() && t0.elapsed() < SHUTDOWN_WAIT {
            std::thread::sleep(Duration::from_millis(1));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::warn!("the sidecore control worker is still busy after {SHUTDOWN_WAIT:?}: leaving it");
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs the worker's logic at `now` until it idles or waits; returns
    /// what it applied, checking each application against the latest write.
    fn drain(st: &mut ControlState, now: Instant, last: Option<(Want, Instant)>) -> Vec<Want> {
        let mut done = Vec::new();
        while let Step::Apply(w) = st.next(now) {
            let (lw, at) = last.expect("nothing applied before the first write");
            assert_eq!(w, lw, "applied {w:?} but the latest write was {lw:?}");
            if w == Want::Stop {
                assert!(now >= at, "a stop ran before it was written");
            }
            st.applied(w);
            done.push(w);
        }
        done
    }

    #[test]
    fn start_cancels_a_pending_stop() {
        let t0 = Instant::now();
        let mut st = ControlState::new(t0);
        st.write(Want::Stop, t0);
        assert_eq!(st.next(t0), Step::Wait(STOP_DELAY));
        st.write(Want::Serve, t0 + Duration::from_micros(500));
        assert_eq!(st.next(t0 + STOP_DELAY * 2), Step::Idle, "the stop must not land after the start");
    }

    #[test]
    fn stop_lands_after_its_delay_and_repeats_do_not_postpone_it() {
        let t0 = Instant::now();
        let mut st = ControlState::new(t0);
        st.write(Want::Stop, t0);
        st.write(Want::Stop, t0 + Duration::from_millis(1));
        assert_eq!(st.next(t0 + STOP_DELAY), Step::Apply(Want::Stop));
        st.applied(Want::Stop);
        st.write(Want::Stop, t0 + STOP_DELAY * 3);
        assert_eq!(st.next(t0 + STOP_DELAY * 3), Step::Idle, "stop while stopped is a no-op");
        st.write(Want::Serve, t0 + STOP_DELAY * 4);
        assert_eq!(st.next(t0 + STOP_DELAY * 4), Step::Apply(Want::Serve));
    }

    proptest! {
        /// Any interleaving of writes, time steps and worker runs: every
        /// application is the latest write (a stale stop never lands), and
        /// once the writes end and the delay has passed, what is in place is
        /// what the guest wrote last.
        #[test]
        fn latest_write_wins(events in prop::collection::vec((any::<bool>(), 0u64..3_000, any::<bool>()), 1..200)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut st = ControlState::new(t0);
            let mut last = None;
            for (stop, dt_us, run_worker) in events {
                now += Duration::from_micros(dt_us);
                let w = if stop { Want::Stop } else { Want::Serve };
                st.write(w, now);
                last = Some((w, now));
                if run_worker {
                    drain(&mut st, now, last);
                }
            }
            let end = now + STOP_DELAY;
            drain(&mut st, end, last);
            let (lw, _) = last.expect("at least one write");
            prop_assert_eq!(st.current(), lw);
            prop_assert_eq!(st.next(end), Step::Idle);
        }
    }

    #[test]
    fn the_worker_applies_the_latest_write_with_one_thread() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l2 = log.clone();
        let c = Controller::spawn("ctl-test", move |w| l2.lock().unwrap().push(w)).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut last = Want::Serve;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            last = if x & 1 == 1 { Want::Stop } else { Want::Serve };
            c.write(last);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.current() != last && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(c.current(), last);
        c.shutdown();
        let log = log.lock().unwrap();
        assert!(log.windows(2).all(|w| w[0] != w[1]), "the worker applied the same state twice in a row");
    }

    #[test]
    fn shutdown_does_not_hang_on_a_stuck_worker() {
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let stuck = Mutex::new(stuck);
        let c = Controller::spawn("ctl-stuck", move |_| {
            let _ = stuck.lock().unwrap().recv();
        })
        .unwrap();
        c.write(Want::Serve);
        c.write(Want::Stop);
        std::thread::sleep(STOP_DELAY * 5);
        let t0 = Instant::now();
        c.shutdown();
        assert!(t0.elapsed() < SHUTDOWN_WAIT * 2, "shutdown waited {:?}", t0.elapsed());
        drop(release);
    }
}
