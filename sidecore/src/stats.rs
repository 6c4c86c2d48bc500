//! Counters the sidecore and the exit path update, readable from any thread
//! at any time (Relaxed atomics: each counter is exact, a snapshot across
//! counters is not atomic).

use std::sync::atomic::{AtomicU64, Ordering};

use shm_proto::op::{Status, OP_CLASS_COUNT, OP_CLASS_NAMES, STATUS_COUNT};

/// Counters of one VM.
#[derive(Default)]
pub struct VmStats {
    /// Requests by op class and reply status.
    calls: [[AtomicU64; STATUS_COUNT]; OP_CLASS_COUNT],
    /// Slots the guest cancelled before the sidecore claimed them.
    pub cancelled: AtomicU64,
    /// Claims lost to a concurrent guest cancel.
    pub lost_claims: AtomicU64,
}

/// A copy of [`VmStats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// `calls[class][status]`.
    pub calls: [[u64; STATUS_COUNT]; OP_CLASS_COUNT],
    /// See [`VmStats::cancelled`].
    pub cancelled: u64,
    /// See [`VmStats::lost_claims`].
    pub lost_claims: u64,
}

impl VmStats {
    /// Counts one request of `class` answered with `status`.
    #[inline]
    pub fn count(&self, class: usize, status: Status) {
        if let Some(row) = self.calls.get(class) {
            row[status as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        for (row, src) in s.calls.iter_mut().zip(self.calls.iter()) {
            for (v, a) in row.iter_mut().zip(src.iter()) {
                *v = a.load(Ordering::Relaxed);
            }
        }
        s.cancelled = self.cancelled.load(Ordering::Relaxed);
        s.lost_claims = self.lost_claims.load(Ordering::Relaxed);
        s
    }
}

impl StatsSnapshot {
    /// All requests answered.
    pub fn total(&self) -> u64 {
        self.calls.iter().flatten().sum()
    }

    /// Requests answered with an error status.
    pub fn rejected(&self) -> u64 {
        self.calls.iter().map(|row| row[1..].iter().sum::<u64>()).sum()
    }

    /// Requests of `class` with `status`.
    pub fn get(&self, class: usize, status: Status) -> u64 {
        self.calls.get(class).map_or(0, |row| row[status as usize])
    }

    /// Non-zero counters as (op class name, status name, count).
    pub fn nonzero(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (c, row) in self.calls.iter().enumerate() {
            for (s, &n) in row.iter().enumerate() {
                if n > 0 {
                    out.push((OP_CLASS_NAMES[c], Status::ALL[s].name(), n));
                }
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_cell() {
        let s = VmStats::default();
        s.count(2, Status::Ok);
        s.count(2, Status::Ok);
        s.count(0, Status::UnknownOp);
        s.count(99, Status::Ok); // out of range: ignored, no panic
        let snap = s.snapshot();
        assert_eq!(snap.get(2, Status::Ok), 2);
        assert_eq!(snap.total(), 3);
        assert_eq!(snap.rejected(), 1);
        assert_eq!(snap.nonzero(), vec![("unknown", "unknown_op", 1), ("cpuid", "ok", 2)]);
    }
}
