//! seccomp-bpf allow-lists for the daemon's threads (x86_64).
//!
//! The daemon maps the memory of every VM attached to it, so each of its
//! threads may make only the system calls its job needs:
//!
//! * [`ThreadKind::Sidecore`]: the pinned poll loop. Rings live in memory
//!   already mapped; it reads and writes eventfds (doorbells, kicks), moves
//!   UDP packets on sockets it was handed, naps, and unmaps a detached VM's
//!   memory. It creates no thread, opens nothing, makes no socket.
//! * [`ThreadKind::Control`]: the main thread's accept loop and the
//!   `sidecore-conn` threads it starts (they inherit its filter). It takes
//!   fds by SCM_RIGHTS, checks and maps them, answers on the socket, starts
//!   connection threads, and at the end removes its socket (only in the
//!   socket's directory, through a descriptor opened before the filter).
//! * [`ThreadKind::Metrics`]: accepts on its TCP listener, reads a request
//!   head, writes an answer.
//!
//! No filter allows `socket`, `connect`, `bind`, `open`/`openat`,
//! `execve`, `ptrace`, `fork`, `kill` (except `tgkill` to this process) or
//! an executable mapping: every socket and file the daemon uses is opened
//! before the filters go on.
//!
//! Anything else fails with EPERM, in every filter. Killing the thread (or
//! the process) would take down the daemon, and with it the service of
//! every attached VM, for what is most likely a missing entry here; EPERM
//! turns that into an ordinary error the code already reports (e.g.
//! `recvmsg: Operation not permitted`), while a refused call still does
//! nothing. `sidecore daemon --no-seccomp` runs without the filters, to
//! tell whether a failure comes from them.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A pinned sidecore poll loop.
    Sidecore,
    /// The accept loop (main thread) and its connection threads.
    Control,
    /// The Prometheus endpoint's thread.
    Metrics,
    /// The vhost-user manager and device threads.
    Vhost,
}

impl ThreadKind {
    /// Its name in errors.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Sidecore => "sidecore",
            ThreadKind::Control => "control",
            ThreadKind::Metrics => "metrics",
            ThreadKind::Vhost => "vhost",
        }
    }
}

/// `SO_RCVTIMEO_NEW` / `SO_SNDTIMEO_NEW` (asm-generic; a newer libc may
/// pick them for 64-bit time).
const SO_RCVTIMEO_NEW: u64 = 66;
const SO_SNDTIMEO_NEW: u64 = 67;

/// The rules of one filter, by syscall number.
struct Allow(BTreeMap<i64, Vec<SeccompRule>>);

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, Len::Qword, op, value).map_err(|e| format!("condition on arg {arg}: {e}"))
}

/// A rule whose conditions all hold.
fn all(conds: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conds).map_err(|e| format!("rule: {e}"))
}

/// Bits of `mask` clear in argument `arg`.
fn clear(arg: u8, mask: u64) -> Result<SeccompCondition, String> {
    cond(arg, Op::MaskedEq(mask), 0)
}

/// Argument `arg` equals one of `values`: one rule each.
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, String> {
    values.iter().map(|v| all(vec![cond(arg, Op::Eq, *v)?])).collect()
}

fn u(v: i32) -> u64 {
    u64::from(v.unsigned_abs())
}

impl Allow {
    /// Allowed with any arguments.
    fn any(&mut self, nrs: &[i64]) -> Result<&mut Self, String> {
        for nr in nrs {
            self.when(*nr, Vec::new())?;
        }
        Ok(self)
    }

    /// Allowed when one of `rules` holds.
    fn when(&mut self, nr: i64, rules: Vec<SeccompRule>) -> Result<&mut Self, String> {
        if self.0.insert(nr, rules).is_some() {
            return Err(format!("syscall {nr} listed twice"));
        }
        Ok(self)
    }

    /// What every thread needs from the runtime (allocator, locks, time,
    /// signals, its own end), whatever its job.
    fn base(pid: u32) -> Result<Allow, String> {
        let mut a = Allow(BTreeMap::new());
        use libc::*;
        a.any(&[
            // Allocator: heap growth, arenas, large blocks, giving memory
            // back; munmap also drops a detached VM's mappings.
            SYS_brk,
            SYS_munmap,
            SYS_mremap,
            SYS_madvise,
            // Locks, channels, parking (std, crossbeam), thread joins.
            SYS_futex,
            SYS_sched_yield,
            // Time: vDSO normally; the syscall when the clock source has
            // no vDSO path. Sleeps (std::thread::sleep, naps).
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            // A signal (SIGTERM, SIGINT, the sidecore's timer) may land on
            // any thread: its handler returns through rt_sigreturn, and an
            // interrupted call restarts.
            SYS_rt_sigreturn,
            SYS_restart_syscall,
            SYS_rt_sigprocmask,
            // Rust's per-thread alternate signal stack, set up and torn
            // down at thread start and exit.
            SYS_sigaltstack,
            // std's HashMap keys.
            SYS_getrandom,
            // Logs and replies on fds already open; eventfd kicks.
            SYS_write,
            SYS_close,
            // abort() (a panic under panic=abort) raises SIGABRT at itself
            // with getpid + gettid + tgkill; the timer signal too.
            SYS_getpid,
            SYS_gettid,
            // Thread and process end.
            SYS_exit,
            SYS_exit_group,
        ])?;
        // Memory, never executable: no new code can be mapped in.
        a.when(SYS_mmap, vec![all(vec![clear(2, u(PROT_EXEC))?])?])?;
        a.when(SYS_mprotect, vec![all(vec![clear(2, u(PROT_EXEC))?])?])?;
        // Signals only to this process's own threads.
        a.when(SYS_tgkill, vec![all(vec![cond(0, Op::Eq, u64::from(pid))?])?])?;
        Ok(a)
    }
}

/// What a filter needs to know about this daemon.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// This process (tgkill's target).
    pub pid: u32,
    /// The socket directory's descriptor ([`SocketRemover`]), for the
    /// control filter's `unlinkat`.
    pub socket_dir: Option<i32>,
}

impl Context {
    /// For this process.
    pub fn here(socket_dir: Option<i32>) -> Context {
        Context { pid: std::process::id(), socket_dir }
    }
}

/// The rules of `kind`'s filter.
fn rules(kind: ThreadKind, ctx: &Context) -> Result<Allow, String> {
    use libc::*;
    let mut a = Allow::base(ctx.pid)?;
    match kind {
        ThreadKind::Sidecore => {
            a.any(&[
                // Doorbell eventfds: read (and preadv2 with RWF_NOWAIT).
                SYS_read,
                SYS_preadv2,
                // The packet device's UDP socket (handed over at attach).
                SYS_recvfrom,
                SYS_sendto,
                // Parked: wait for a doorbell or the nap's end.
                SYS_ppoll,
                // The per-thread timer whose signal interrupts a write that
                // blocks, and its handler.
                SYS_timer_create,
                SYS_timer_settime,
                SYS_timer_delete,
                SYS_rt_sigaction,
                // vhost-user-blk queues: submitting to their io_uring (never
                // waiting: min_complete 0), watching a new queue's kick fd.
                SYS_io_uring_enter,
                SYS_epoll_ctl,
                // Parking: a queue's io_uring signals its eventfd only then.
                SYS_io_uring_register,
            ])?;
            // Drop-time check that an fd is still open (debug builds).
            a.when(SYS_fcntl, one_of(1, &[u(F_GETFD)])?)?;
        }
        ThreadKind::Control => {
            a.any(&[
                // Accept loop on the already-bound listener.
                SYS_accept4,
                // Requests and SCM_RIGHTS fds; BufReader on the stream.
                SYS_recvmsg,
                SYS_recvfrom,
                SYS_read,
                SYS_poll,
                SYS_ppoll,
                // The peer's credentials; an fd's socket type (attach).
                SYS_getsockopt,
                SYS_geteuid,
                // The size of the passed memfds (File::metadata: statx,
                // or fstat as its fallback); metadata only, never contents.
                SYS_statx,
                SYS_fstat,
                SYS_newfstatat,
                // What a passed fd is (/proc/self/fd/N names an eventfd).
                SYS_readlink,
                // A connection thread's start (glibc + std): its robust
                // futex list, rseq, its stack's affinity probe.
                SYS_set_robust_list,
                SYS_rseq,
                SYS_sched_getaffinity,
                // Starting a connection thread. clone3's flags sit behind a
                // pointer a filter cannot read; see clone below.
                SYS_clone3,
                // An event subscriber's wake-up eventfd.
                SYS_eventfd2,
            ])?;
            // Replies on the connected stream: never to an address (the
            // UDP socket a VMM hands over cannot be used from here).
            a.when(SYS_sendto, vec![all(vec![cond(4, Op::Eq, 0)?])?])?;
            // glibc falls back to clone when clone3 is missing: threads
            // only, never a new process.
            a.when(SYS_clone, vec![all(vec![cond(0, Op::MaskedEq(u(CLONE_THREAD)), u(CLONE_THREAD))?])?])?;
            // Naming the new thread.
            a.when(SYS_prctl, one_of(0, &[u(PR_SET_NAME)])?)?;
            // try_clone, the drop-time fd check, the memfd's seals.
            a.when(SYS_fcntl, one_of(1, &[u(F_DUPFD_CLOEXEC), u(F_GETFD), u(F_GET_SEALS)])?)?;
            // set_nonblocking (accepted streams, the packet device's socket).
            a.when(SYS_ioctl, one_of(1, &[FIONBIO])?)?;
            // Read deadlines and write timeouts, nothing else.
            a.when(SYS_setsockopt, sockopt_timeouts()?)?;
            // Removing the control socket at the end: only in its own
            // directory, never a directory.
            if let Some(dir) = ctx.socket_dir {
                a.when(SYS_unlinkat, vec![all(vec![cond(0, Op::Eq, u(dir))?, cond(2, Op::Eq, 0)?])?])?;
            }
        }
        ThreadKind::Vhost => {
            a.any(&[
                // Opening a device: its image (by path: devices may be added
                // at run time), its socket bound, a stale one probed and removed.
                SYS_openat,
                SYS_socket,
                SYS_bind,
                SYS_listen,
                SYS_connect,
                SYS_unlink,
                SYS_lseek,
                // One writer per image.
                SYS_flock,
                // A VMM's connection: messages and their fds (SCM_RIGHTS).
                SYS_accept4,
                SYS_recvmsg,
                SYS_sendmsg,
                SYS_recvfrom,
                SYS_read,
                SYS_poll,
                SYS_ppoll,
                SYS_shutdown,
                SYS_getsockopt,
                // What a passed fd is, and a memfd's size.
                SYS_readlink,
                SYS_statx,
                SYS_fstat,
                SYS_newfstatat,
                // A queue: its io_uring, its eventfds, the device's epoll set.
                SYS_io_uring_setup,
                SYS_io_uring_register,
                SYS_io_uring_enter,
                SYS_eventfd2,
                SYS_epoll_create1,
                SYS_epoll_ctl,
                // Starting a device thread.
                SYS_set_robust_list,
                SYS_rseq,
                SYS_sched_getaffinity,
                SYS_clone3,
            ])?;
            a.when(SYS_sendto, vec![all(vec![cond(4, Op::Eq, 0)?])?])?;
            a.when(SYS_clone, vec![all(vec![cond(0, Op::MaskedEq(u(CLONE_THREAD)), u(CLONE_THREAD))?])?])?;
            a.when(SYS_prctl, one_of(0, &[u(PR_SET_NAME)])?)?;
            a.when(SYS_fcntl, one_of(1, &[u(F_DUPFD_CLOEXEC), u(F_GETFD), u(F_GET_SEALS), u(F_GETFL), u(F_SETFL)])?)?;
            a.when(SYS_ioctl, one_of(1, &[FIONBIO])?)?;
            a.when(SYS_setsockopt, sockopt_timeouts()?)?;
        }
        ThreadKind::Metrics => {
            a.any(&[
                // Scrapes on the already-bound TCP listener (tokio: epoll
                // and its waker's eventfd, both made before the filter).
                SYS_accept4,
                SYS_recvfrom,
                SYS_read,
                SYS_writev,
                SYS_shutdown,
                SYS_epoll_wait,
                SYS_epoll_pwait,
                SYS_epoll_pwait2,
                SYS_epoll_ctl,
                // The process metrics: /proc/self/stat and /proc/self/fd,
                // opened before the filter, read again at each scrape.
                SYS_pread64,
                SYS_lseek,
                SYS_getdents64,
                // Peer address of an accepted connection.
                SYS_getpeername,
                SYS_getsockname,
            ])?;
            // Answers on the connected stream, never to an address.
            a.when(SYS_sendto, vec![all(vec![cond(4, Op::Eq, 0)?])?])?;
            a.when(SYS_fcntl, one_of(1, &[u(F_GETFD), u(F_GETFL), u(F_SETFL)])?)?;
            a.when(SYS_setsockopt, sockopt_timeouts()?)?;
            // Accepted sockets made non-blocking.
            a.when(SYS_ioctl, one_of(1, &[FIONBIO])?)?;
        }
    }
    Ok(a)
}

/// setsockopt(SOL_SOCKET, SO_RCVTIMEO / SO_SNDTIMEO) only.
fn sockopt_timeouts() -> Result<Vec<SeccompRule>, String> {
    let sol = u(libc::SOL_SOCKET);
    [u(libc::SO_RCVTIMEO), u(libc::SO_SNDTIMEO), SO_RCVTIMEO_NEW, SO_SNDTIMEO_NEW]
        .iter()
        .map(|opt| all(vec![cond(1, Op::Eq, sol)?, cond(2, Op::Eq, *opt)?]))
        .collect()
}

/// The compiled filter of `kind`.
pub fn program(kind: ThreadKind, ctx: &Context) -> Result<BpfProgram, String> {
    let what = |e: String| format!("the {} seccomp filter: {e}", kind.name());
    let a = rules(kind, ctx).map_err(what)?;
    let errno = u32::try_from(libc::EPERM).unwrap_or(1);
    let f = SeccompFilter::new(a.0, SeccompAction::Errno(errno), SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| what(e.to_string()))?;
    f.try_into().map_err(|e: seccompiler::BackendError| what(e.to_string()))
}

/// Puts `prog` (the filter of `kind`) on the calling thread, for good; the
/// threads it starts inherit it.
pub fn install(kind: ThreadKind, prog: &BpfProgram) -> Result<(), String> {
    seccompiler::apply_filter(prog).map_err(|e| format!("cannot install the {} seccomp filter: {e}", kind.name()))
}

/// Removes the control socket through a descriptor of its directory opened
/// before the filter: the control filter allows `unlinkat` on that
/// directory only.
pub struct SocketRemover {
    dir: OwnedFd,
    name: CString,
}

impl SocketRemover {
    /// For the socket at `path`.
    pub fn new(path: &Path) -> Result<SocketRemover, String> {
        use std::os::unix::ffi::OsStrExt;
        let bad = || format!("{}: not a socket path with a file name", path.display());
        let name = CString::new(path.file_name().ok_or_else(bad)?.as_bytes()).map_err(|_| bad())?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let c = CString::new(parent.as_os_str().as_bytes()).map_err(|_| bad())?;
        // SAFETY: `c` is NUL-terminated; O_PATH opens no file contents; the
        // result is checked.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(format!("cannot open {}: {}", parent.display(), std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor owned from here on.
        Ok(SocketRemover { dir: unsafe { OwnedFd::from_raw_fd(fd) }, name })
    }

    /// The directory's descriptor ([`Context::socket_dir`]).
    pub fn dir_fd(&self) -> i32 {
        self.dir.as_raw_fd()
    }

    /// Removes the socket (best effort: it may be gone already).
    pub fn remove(&self) {
        // SAFETY: a valid directory fd and a NUL-terminated name; flags 0
        // removes a non-directory only.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a fresh thread under `kind`'s filter; its result.
    fn under<T: Send + 'static>(kind: ThreadKind, ctx: Context, f: impl FnOnce() -> T + Send + 'static) -> T {
        let prog = program(kind, &ctx).expect("the filter compiles");
        std::thread::spawn(move || {
            install(kind, &prog).expect("the filter installs");
            f()
        })
        .join()
        .expect("the filtered thread ran to its end")
    }

    /// A raw syscall's result: Ok(return value) or Err(errno).
    fn sys(r: libc::c_long) -> Result<libc::c_long, i32> {
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(r)
        }
    }

    /// What every filter must refuse, and a few things it must allow.
    /// Each entry: (name, result).
    fn probes() -> Vec<(&'static str, Result<libc::c_long, i32>)> {
        let path = c"/proc/self/status";
        // SAFETY: every call below takes valid pointers or none; those that
        // would succeed act only on this thread or fds made here.
        unsafe {
            let open = sys(libc::syscall(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY));
            if let Ok(fd) = open {
                libc::close(i32::try_from(fd).unwrap_or(-1));
            }
            let inet = sys(libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0));
            let unix = sys(libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0));
            // A null path: EFAULT if execve were allowed, never a new image.
            let exec = sys(libc::syscall(libc::SYS_execve, 0usize, 0usize, 0usize));
            // PTRACE_PEEKDATA of pid 0: ESRCH if ptrace were allowed.
            let ptrace = sys(libc::syscall(libc::SYS_ptrace, libc::PTRACE_PEEKDATA, 0, 0usize, 0usize));
            let exec_map = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            let exec_map = if exec_map == libc::MAP_FAILED {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            } else {
                libc::munmap(exec_map, 4096);
                Ok(0)
            };
            let data_map = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            let data_map = if data_map == libc::MAP_FAILED {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            } else {
                libc::munmap(data_map, 4096);
                Ok(0)
            };
            // Signal 0 to pid 1 (init): only this process may be signalled.
            let other = sys(libc::syscall(libc::SYS_tgkill, 1, 1, 0));
            let pid = sys(libc::syscall(libc::SYS_getpid));
            let boxed = Box::new([7u8; 100_000]);
            let alloc = Ok(libc::c_long::from(boxed[99_999]));
            vec![
                ("openat", open),
                ("socket(AF_INET)", inet),
                ("socket(AF_UNIX)", unix),
                ("execve", exec),
                ("ptrace", ptrace),
                ("mmap(PROT_EXEC)", exec_map),
                ("mmap(RW)", data_map),
                ("tgkill(other process)", other),
                ("getpid", pid),
                ("alloc", alloc),
            ]
        }
    }

    fn check(kind: ThreadKind, refused: &[&str], allowed: &[&str]) {
        let got = under(kind, Context::here(None), probes);
        for (name, r) in &got {
            if refused.contains(name) {
                assert_eq!(*r, Err(libc::EPERM), "{}: {name} must be refused with EPERM", kind.name());
            }
            if allowed.contains(name) {
                assert!(r.is_ok(), "{}: {name} must work, got errno {r:?}", kind.name());
            }
        }
        // The same probes without a filter: the refusals above are the
        // filter's doing (openat and socket work here).
        let free: Vec<_> = std::thread::spawn(probes).join().expect("unfiltered probes");
        for (name, r) in free {
            if ["openat", "socket(AF_INET)", "mmap(RW)", "getpid"].contains(&name) {
                assert!(r.is_ok(), "without a filter {name} works: {r:?}");
            }
        }
    }

    const REFUSED: [&str; 7] = [
        "openat",
        "socket(AF_INET)",
        "socket(AF_UNIX)",
        "execve",
        "ptrace",
        "mmap(PROT_EXEC)",
        "tgkill(other process)",
    ];
    const ALLOWED: [&str; 3] = ["mmap(RW)", "getpid", "alloc"];

    #[test]
    fn the_sidecore_filter_refuses_what_a_poll_loop_never_does() {
        check(ThreadKind::Sidecore, &REFUSED, &ALLOWED);
        // It cannot start a thread.
        let spawn = under(ThreadKind::Sidecore, Context::here(None), || {
            std::thread::Builder::new().spawn(|| ()).map(|h| h.join().is_ok()).map_err(|e| e.raw_os_error())
        });
        assert_eq!(spawn, Err(Some(libc::EPERM)), "a sidecore thread must not start threads");
    }

    #[test]
    fn a_sidecore_thread_reads_and_kicks_an_eventfd() {
        // SAFETY: a fresh eventfd, owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: fd is fresh and owned from here on.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = efd.as_raw_fd();
        let got = under(ThreadKind::Sidecore, Context::here(None), move || {
            let one = 1u64.to_ne_bytes();
            let mut buf = [0u8; 8];
            // SAFETY: 8-byte buffers on an eventfd the test holds open.
            unsafe {
                let w = libc::write(raw, one.as_ptr().cast(), 8);
                let r = libc::read(raw, buf.as_mut_ptr().cast(), 8);
                (w, r, u64::from_ne_bytes(buf))
            }
        });
        assert_eq!(got, (8, 8, 1));
        drop(efd);
    }

    #[test]
    fn the_control_filter_refuses_new_files_sockets_and_programs() {
        check(ThreadKind::Control, &REFUSED, &ALLOWED);
        // Connection threads start under it, and inherit it.
        let inherited = under(ThreadKind::Control, Context::here(None), || {
            std::thread::Builder::new()
                .name("sidecore-conn".into())
                .spawn(|| {
                    // SAFETY: a NUL-terminated path; an fd, if one came, is leaked by a failing test only.
                    let r = unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), 0) };
                    (r, std::io::Error::last_os_error().raw_os_error())
                })
                .map(|h| h.join().ok())
                .map_err(|e| e.to_string())
        });
        assert_eq!(inherited, Ok(Some((-1, Some(libc::EPERM)))), "a connection thread starts and is filtered");
    }

    #[test]
    fn the_control_filter_removes_only_its_socket_directory_entries() {
        let dir = std::env::temp_dir().join(format!("sidecore-seccomp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("d.sock");
        let other = std::env::temp_dir().join(format!("sidecore-seccomp-other-{}", std::process::id()));
        std::fs::write(&sock, b"").expect("socket stand-in");
        std::fs::write(&other, b"").expect("other file");
        let remover = SocketRemover::new(&sock).expect("open the directory");
        let ctx = Context::here(Some(remover.dir_fd()));
        let prog = program(ThreadKind::Control, &ctx).expect("compiles");
        let other2 = other.clone();
        let other_removed = std::thread::spawn(move || {
            install(ThreadKind::Control, &prog).expect("installs");
            remover.remove();
            std::fs::remove_file(&other2).map_err(|e| e.raw_os_error())
        })
        .join()
        .expect("thread");
        assert!(!sock.exists(), "the socket is removed through its directory's fd");
        assert_eq!(other_removed, Err(Some(libc::EPERM)), "any other path is refused");
        assert!(other.exists());
        let _ = std::fs::remove_file(&other);
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn the_metrics_filter_serves_tcp_and_nothing_else() {
        check(ThreadKind::Metrics, &REFUSED, &ALLOWED);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            std::io::Write::write_all(&mut s, b"ping").expect("send");
            let mut back = String::new();
            std::io::Read::read_to_string(&mut s, &mut back).expect("read");
            back
        });
        let served = under(ThreadKind::Metrics, Context::here(None), move || {
            let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(5))).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            std::io::Read::read_exact(&mut s, &mut buf).map_err(|e| e.to_string())?;
            std::io::Write::write_all(&mut s, b"pong").map_err(|e| e.to_string())?;
            s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
            Ok::<_, String>(buf)
        });
        assert_eq!(served, Ok(*b"ping"));
        assert_eq!(client.join().expect("client"), "pong");
    }
}
