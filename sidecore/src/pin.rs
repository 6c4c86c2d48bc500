//! Pinning the calling thread to one CPU.
//!
//! `core_affinity` only returns a bool; the sidecore must say why pinning
//! failed, so this calls sched_setaffinity itself and reports the errno.

use std::io;

/// Pinning failed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The CPU number does not fit a cpu_set_t.
    #[error("CPU {0} is out of range (at most {max})", max = libc::CPU_SETSIZE - 1)]
    OutOfRange(usize),
    /// sched_setaffinity refused.
    #[error("cannot pin thread to CPU {cpu} (is it online and in this process's cpuset?)")]
    SetAffinity {
        /// The CPU.
        cpu: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<(), PinError> {
    if cpu >= usize::try_from(libc::CPU_SETSIZE).unwrap_or(1024) {
        return Err(PinError::OutOfRange(cpu));
    }
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is valid for its size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(PinError::SetAffinity { cpu, source: io::Error::last_os_error() });
    }
    Ok(())
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_cpu_is_refused() {
        assert!(matches!(pin_current_thread(1 << 20), Err(PinError::OutOfRange(_))));
    }

    #[test]
    fn offline_cpu_reports_errno() {
        // A CPU number that is in range but (almost surely) not present.
        let err =
            std::thread::spawn(|| pin_current_thread(1000)).join().map_err(|_| ()).and_then(|r| r.map_err(|_| ()));
        assert!(err.is_err());
    }

    #[test]
    fn pins_to_an_allowed_cpu() {
        let cpu = std::thread::spawn(|| pin_current_thread(0).map(|()| current_cpu())).join();
        if let Ok(Ok(c)) = cpu {
            assert_eq!(c, Some(0));
        }
    }
}
