//! The standard `process_*` metrics of the daemon itself (CPU time,
//! memory, fds, threads, start time), as Prometheus client libraries
//! export them.
//!
//! The metrics thread runs under a seccomp filter that opens nothing, so
//! the `/proc` files are opened once, before it goes on, and read again
//! with `pread` / `getdents64` at each scrape.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// The process's numbers at one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSnapshot {
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident memory, bytes.
    pub resident_bytes: u64,
    /// Virtual memory, bytes.
    pub virtual_bytes: u64,
    /// Open fds.
    pub open_fds: u64,
    /// The fd limit (RLIMIT_NOFILE, soft).
    pub max_fds: u64,
    /// Threads.
    pub threads: u64,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// Open handles on this process's `/proc` files.
pub struct ProcessReader {
    stat: File,
    fd_dir: File,
    max_fds: u64,
    start_time_seconds: f64,
    page_size: u64,
    ticks: f64,
}

impl ProcessReader {
    /// Opens `/proc/self/stat` and `/proc/self/fd`, and reads what does not
    /// change (fd limit, start time). Call before any seccomp filter.
    pub fn open() -> std::io::Result<ProcessReader> {
        let stat = File::open("/proc/self/stat")?;
        let fd_dir = File::open("/proc/self/fd")?;
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one rlimit into `lim`.
        let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur } else { 0 };
        let ticks = if ticks > 0 { to_f64(u64::try_from(ticks).unwrap_or(100)) } else { 100.0 };
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok())));
        let mut r = ProcessReader {
            stat,
            fd_dir,
            max_fds,
            start_time_seconds: 0.0,
            page_size: u64::try_from(page).unwrap_or(4096),
            ticks,
        };
        let start_ticks = r.stat_fields().and_then(|f| f.get(19).and_then(|v| v.parse::<u64>().ok()));
        r.start_time_seconds = match (btime, start_ticks) {
            (Some(b), Some(t)) => to_f64(b) + to_f64(t) / ticks,
            _ => 0.0,
        };
        Ok(r)
    }

    /// The fields of `/proc/self/stat` after the command name (field 3,
    /// the state, is index 0).
    fn stat_fields(&self) -> Option<Vec<String>> {
        let mut buf = vec![0u8; 4096];
        let n = self.stat.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(buf.get(..n)?).ok()?;
        // The name is in parentheses and may itself hold spaces or ')'.
        let rest = &text[text.rfind(')')? + 1..];
        Some(rest.split_ascii_whitespace().map(str::to_owned).collect())
    }

    /// Reads the numbers now; fields that cannot be read are 0.
    pub fn read(&self) -> ProcessSnapshot {
        let f = self.stat_fields().unwrap_or_default();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // utime 14, stime 15, num_threads 20, vsize 23, rss 24 (1-based,
        // man 5 proc), i.e. 11, 12, 17, 20, 21 here.
        ProcessSnapshot {
            cpu_seconds: to_f64(field(11).saturating_add(field(12))) / self.ticks,
            resident_bytes: field(21).saturating_mul(self.page_size),
            virtual_bytes: field(20),
            open_fds: self.count_fds(),
            max_fds: self.max_fds,
            threads: field(17),
            start_time_seconds: self.start_time_seconds,
        }
    }

    /// Entries of `/proc/self/fd` but `.` and `..` (and the directory's own
    /// fd, which is open only for this count).
    fn count_fds(&self) -> u64 {
        let fd = self.fd_dir.as_raw_fd();
        // SAFETY: lseek on our own open directory fd.
        if unsafe { libc::lseek(fd, 0, libc::SEEK_SET) } < 0 {
            return 0;
        }
        let mut buf = vec![0u8; 32 * 1024];
        let mut count = 0u64;
        loop {
            // SAFETY: getdents64 writes at most buf.len() bytes into buf.
            let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
            let Ok(n) = usize::try_from(n) else { return 0 };
            if n == 0 {
                break;
            }
            let mut off = 0;
            // struct linux_dirent64: d_ino u64, d_off i64, d_reclen u16,
            // d_type u8, d_name NUL-terminated.
            while off + 19 <= n {
                let reclen = usize::from(u16::from_ne_bytes([buf[off + 16], buf[off + 17]]));
                if reclen == 0 || off + reclen > n {
                    break;
                }
                let name = &buf[off + 19..off + reclen];
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                if name != b"." && name != b".." {
                    count += 1;
                }
                off += reclen;
            }
        }
        count.saturating_sub(1)
    }
}

#[allow(clippy::cast_precision_loss)]
fn to_f64(v: u64) -> f64 {
    v as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_reads_sanely() {
        let r = ProcessReader::open().expect("/proc");
        let a = r.read();
        assert!(a.threads >= 1 && a.resident_bytes > 0 && a.virtual_bytes >= a.resident_bytes, "{a:?}");
        assert!(a.open_fds >= 3 && a.max_fds >= a.open_fds, "{a:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
        assert!(a.start_time_seconds > now - 86_400.0 * 30.0 && a.start_time_seconds <= now + 1.0, "{a:?}");
        let extra: Vec<File> = (0..5).map(|_| File::open("/proc/self/stat").expect("open")).collect();
        let b = r.read();
        assert!(b.open_fds >= 8, "the 5 opened are counted: {a:?} then {b:?}");
        drop(extra);
        // Burn some CPU: the time goes up.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(r.read().cpu_seconds >= a.cpu_seconds, "{x}");
    }
}
