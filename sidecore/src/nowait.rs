//! I/O on descriptors another process shares, done so that nothing that
//! process does to the file description can make a sidecore block.
//!
//! A VMM that passed an fd keeps its own copy of the same open file
//! description, so it can clear `O_NONBLOCK` on it at any moment. Reads use
//! `RWF_NOWAIT` (eventfd honours it), socket I/O uses `MSG_DONTWAIT`; both
//! are per call. An eventfd write has no per-call non-blocking flag (it
//! refuses `RWF_NOWAIT`), and it blocks when the counter is full, which the
//! other process controls. [`bounded_write_u64`] therefore arms a periodic
//! per-thread timer before the write: if the write blocks, the timer's
//! signal interrupts it (the handler is installed without `SA_RESTART`)
//! within about [`WRITE_BOUND`] (two periods if the first signal came before
//! the write began), and the caller hears that the fd is hostile.

use std::cell::Cell;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::Duration;

/// The longest a write on a foreign eventfd may hold a sidecore (twice
/// this at worst). Longer than a scheduler tick on purpose: a timer that is
/// never the CPU's earliest hrtimer is armed and disarmed without
/// reprogramming the clock event device, whereas a 200 µs one wrote the
/// TSC-deadline MSR twice per write, which under virtualization cost about
/// 12 µs per interrupt sent.
pub const WRITE_BOUND: Duration = Duration::from_millis(5);

/// The signal that interrupts a blocked write: one of the real-time ones,
/// which nothing else in the process uses.
fn watchdog_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

extern "C" fn on_watchdog(_: libc::c_int) {}

static HANDLER: Once = Once::new();
static HANDLER_OK: AtomicBool = AtomicBool::new(false);

/// Installs the (empty) handler of the watchdog signal, once per process.
/// Without `SA_RESTART`, a blocked write it interrupts returns `EINTR`.
pub fn install_handler() -> std::io::Result<()> {
    HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler
        // is an extern "C" fn that does nothing (async-signal-safe); the
        // mask is emptied with sigemptyset.
        let ok = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_watchdog as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(watchdog_signal(), &sa, std::ptr::null_mut()) == 0
        };
        HANDLER_OK.store(ok, Ordering::Release);
    });
    if HANDLER_OK.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(std::io::Error::other("cannot install the write-watchdog signal handler"))
    }
}

/// This thread's watchdog timer, created on first use and deleted when the
/// thread exits.
struct Watchdog(Cell<Option<libc::timer_t>>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(t) = self.0.get() {
            // SAFETY: `t` is a timer this thread created and nothing else
            // holds; deleted once.
            unsafe { libc::timer_delete(t) };
        }
    }
}

thread_local! {
    static WATCHDOG: Watchdog = const { Watchdog(Cell::new(None)) };
}

fn thread_timer() -> Option<libc::timer_t> {
    WATCHDOG.with(|w| {
        if let Some(t) = w.0.get() {
            return Some(t);
        }
        // SAFETY: a zeroed sigevent is valid; the fields set below ask for
        // the signal to be sent to this very thread.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = watchdog_signal();
        // SAFETY: gettid has no preconditions.
        ev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut t: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `ev` and `t` are valid for the call; the kernel writes the
        // new timer's id into `t`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut t) } != 0 {
            return None;
        }
        w.0.set(Some(t));
        Some(t)
    })
}

fn arm(t: libc::timer_t, after: Duration) {
    let nanos = libc::c_long::from(after.subsec_nanos());
    let secs = libc::time_t::try_from(after.as_secs()).unwrap_or(0);
    // Periodic, not one-shot: if the thread is preempted between arming and
    // the write for longer than `after`, the first signal lands before the
    // write starts, and only a later one can interrupt it.
    let every = libc::timespec { tv_sec: secs, tv_nsec: nanos };
    let spec = libc::itimerspec { it_interval: every, it_value: every };
    // SAFETY: `t` is this thread's timer; `spec` is a valid itimerspec.
    unsafe { libc::timer_settime(t, 0, &spec, std::ptr::null_mut()) };
}

/// What became of a bounded write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written.
    Done,
    /// The fd would have blocked (it was interrupted after [`WRITE_BOUND`],
    /// or said EAGAIN): its owner filled it on purpose or is not reading.
    Blocked,
    /// Another error (a bad fd, no timer): nothing was written.
    Failed,
}

/// Writes `value` to the eventfd `fd`, never holding the thread longer than
/// about [`WRITE_BOUND`] whatever the fd's owner does to it. Needs
/// [`install_handler`] to have succeeded (else: [`WriteOutcome::Failed`]).
pub fn bounded_write_u64(fd: RawFd, value: u64) -> WriteOutcome {
    if install_handler().is_err() {
        return WriteOutcome::Failed;
    }
    let Some(t) = thread_timer() else { return WriteOutcome::Failed };
    let bytes = value.to_ne_bytes();
    arm(t, WRITE_BOUND);
    // SAFETY: writes 8 bytes from a live buffer to `fd`; an eventfd write has
    // no other effect, and on any other fd the caller's checks apply.
    let rc = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    let err = std::io::Error::last_os_error().raw_os_error();
    arm(t, Duration::ZERO);
    match (rc, err) {
        (8, _) => WriteOutcome::Done,
        (_, Some(libc::EINTR | libc::EAGAIN)) if rc < 0 => WriteOutcome::Blocked,
        _ => WriteOutcome::Failed,
    }
}

/// Reads and clears an eventfd's counter without blocking, whatever its
/// flags: `None` if it was zero (or the read failed).
pub fn read_u64_nowait(fd: RawFd) -> Option<u64> {
    let mut buf = [0u8; 8];
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: one iovec over `buf`, which lives across the call; offset -1
    // means the current position (an eventfd has none).
    let n = unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
    (n == 8).then(|| u64::from_ne_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Instant;

    fn blocking_eventfd() -> OwnedFd {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn a_full_blocking_eventfd_cannot_hold_the_writer() {
        let fd = blocking_eventfd();
        assert_eq!(bounded_write_u64(fd.as_raw_fd(), 1), WriteOutcome::Done);
        assert_eq!(read_u64_nowait(fd.as_raw_fd()), Some(1));
        assert_eq!(read_u64_nowait(fd.as_raw_fd()), None, "empty, and the blocking fd did not block the read");
        // What a hostile owner does: fill the counter (max is 2^64 - 2).
        assert_eq!(bounded_write_u64(fd.as_raw_fd(), u64::MAX - 1), WriteOutcome::Done);
        let t0 = Instant::now();
        assert_eq!(bounded_write_u64(fd.as_raw_fd(), 1), WriteOutcome::Blocked);
        assert!(t0.elapsed() < Duration::from_secs(1), "held {:?}", t0.elapsed());
        // The thread goes on working, and later writes are bounded too.
        assert_eq!(bounded_write_u64(fd.as_raw_fd(), 1), WriteOutcome::Blocked);
        assert_eq!(read_u64_nowait(fd.as_raw_fd()), Some(u64::MAX - 1));
        assert_eq!(bounded_write_u64(fd.as_raw_fd(), 1), WriteOutcome::Done);
        // No stray signal is left to interrupt a later sleep early.
        let t1 = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        assert!(t1.elapsed() >= Duration::from_millis(5));
    }

    #[test]
    fn a_bad_fd_fails_without_blocking() {
        assert_eq!(bounded_write_u64(-1, 1), WriteOutcome::Failed);
        assert_eq!(read_u64_nowait(-1), None);
    }
}
