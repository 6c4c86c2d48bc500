//! Counters the sidecore and the exit path update, readable from any thread
//! at any time (Relaxed atomics: each counter is exact, a snapshot across
//! counters is not atomic).

use std::sync::atomic::{AtomicU64, Ordering};

use shm_proto::op::{Status, OP_CLASS_COUNT, OP_CLASS_NAMES, STATUS_COUNT};

/// Buckets of the service-time histogram: four per power of two of TSC
/// cycles (about 19% wide), up to 2^32 cycles.
pub const SERVICE_BUCKETS: usize = 128;

/// The bucket of a service time of `cycles`.
pub fn service_bucket(cycles: u64) -> usize {
    if cycles < 4 {
        return usize::try_from(cycles).unwrap_or(0);
    }
    let log = 63 - cycles.leading_zeros() as usize;
    let frac = usize::try_from((cycles >> (log - 2)) & 3).unwrap_or(0);
    (log * 4 + frac).min(SERVICE_BUCKETS - 1)
}

/// The smallest service time (cycles) that falls in bucket `b`.
pub fn bucket_floor(b: usize) -> u64 {
    if b < 8 {
        // Buckets 4..8 are never used (4 cycles is bucket 8).
        return b.min(4) as u64;
    }
    let (log, frac) = (b / 4, (b % 4) as u64);
    (4 + frac) << (log - 2)
}

/// Upper bounds of the fixed service-time buckets, ns: powers of two from
/// 32 ns to about 16.8 ms. They are the same on every host (the TSC rate
/// only decides which cycle counts fall under each), so histograms of
/// different hosts can be summed; a last bucket holds everything above.
pub const FIXED_BOUNDS_NS: [u64; 20] = {
    let mut b = [0u64; 20];
    let mut i = 0;
    while i < b.len() {
        b[i] = 32 << i;
        i += 1;
    }
    b
};

/// Counters of one VM.
pub struct VmStats {
    /// Service time (claim to reply) of each request, by bucket.
    service: ServiceHist,
    /// The same times in the fixed buckets ([`FIXED_BOUNDS_NS`] and one
    /// above them).
    fixed: [AtomicU64; FIXED_BOUNDS_NS.len() + 1],
    /// [`FIXED_BOUNDS_NS`] in cycles at this VM's TSC rate: a time of `c`
    /// cycles is at most bound `i` iff `c <= fixed_bounds[i]`.
    fixed_bounds: [u64; FIXED_BOUNDS_NS.len()],
    /// Sum of the service times, cycles (exact).
    service_sum: AtomicU64,
    /// The TSC rate the times are in, kHz.
    tsc_khz: u64,
    /// Requests by op class and reply status.
    calls: [[AtomicU64; STATUS_COUNT]; OP_CLASS_COUNT],
    /// Slots the guest cancelled before the sidecore claimed them.
    pub cancelled: AtomicU64,
    /// Claims lost to a concurrent guest cancel.
    pub lost_claims: AtomicU64,
}

impl Default for VmStats {
    /// Counters at an assumed 1 GHz TSC (1 cycle = 1 ns): for rings whose
    /// times nobody converts (use [`VmStats::with_tsc`] otherwise).
    fn default() -> Self {
        VmStats::with_tsc(crate::tsc::TscRate::from_khz(1_000_000))
    }
}

/// The service-time histogram's buckets.
pub struct ServiceHist([AtomicU64; SERVICE_BUCKETS]);

impl Default for ServiceHist {
    fn default() -> Self {
        ServiceHist(std::array::from_fn(|_| AtomicU64::new(0)))
    }
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
    /// Service-time buckets.
    pub service: Vec<u64>,
    /// Fixed service-time buckets, non-cumulative: `fixed[i]` for
    /// `FIXED_BOUNDS_NS[i]`, the last one above them all.
    pub fixed: Vec<u64>,
    /// Sum of the service times, cycles.
    pub service_sum_cycles: u64,
    /// The TSC rate of the times, kHz.
    pub tsc_khz: u64,
}

impl VmStats {
    /// Counters whose service times are TSC cycles at `rate`.
    pub fn with_tsc(rate: crate::tsc::TscRate) -> VmStats {
        let khz = u128::from(rate.khz());
        let fixed_bounds =
            FIXED_BOUNDS_NS.map(|ns| u64::try_from(u128::from(ns) * khz / 1_000_000).unwrap_or(u64::MAX));
        VmStats {
            service: ServiceHist::default(),
            fixed: std::array::from_fn(|_| AtomicU64::new(0)),
            fixed_bounds,
            service_sum: AtomicU64::new(0),
            tsc_khz: rate.khz(),
            calls: Default::default(),
            cancelled: AtomicU64::new(0),
            lost_claims: AtomicU64::new(0),
        }
    }

    /// Counts one request of `class` answered with `status`.
    #[inline]
    pub fn count(&self, class: usize, status: Status) {
        if let Some(row) = self.calls.get(class) {
            row[status as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records one request's service time.
    #[inline]
    pub fn record_service(&self, cycles: u64) {
        self.service.0[service_bucket(cycles)].fetch_add(1, Ordering::Relaxed);
        let i = self.fixed_bounds.partition_point(|b| *b < cycles);
        if let Some(f) = self.fixed.get(i) {
            f.fetch_add(1, Ordering::Relaxed);
        }
        self.service_sum.fetch_add(cycles, Ordering::Relaxed);
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
        s.service = self.service.0.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        s.fixed = self.fixed.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        s.service_sum_cycles = self.service_sum.load(Ordering::Relaxed);
        s.tsc_khz = self.tsc_khz;
        s
    }
}

impl StatsSnapshot {
    /// All requests answered.
    pub fn total(&self) -> u64 {
        self.calls.iter().flatten().sum()
    }

    /// Requests refused with an error status (not counting `UseExitPath`,
    /// which redirects a valid request to the guest's own VMM).
    pub fn rejected(&self) -> u64 {
        self.calls
            .iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .filter(|(s, _)| *s != Status::Ok as usize && *s != Status::UseExitPath as usize)
                    .map(|(_, n)| n)
                    .sum::<u64>()
            })
            .sum()
    }

    /// Requests of `class` with `status`.
    pub fn get(&self, class: usize, status: Status) -> u64 {
        self.calls.get(class).map_or(0, |row| row[status as usize])
    }

    /// The service time (cycles, lower edge of its bucket) below which a
    /// fraction `q` of the timed requests fall; `None` if none was timed.
    pub fn service_quantile(&self, q: f64) -> Option<u64> {
        let total: u64 = self.service.iter().sum();
        if total == 0 {
            return None;
        }
        // Rounding is fine for a rank.
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, n) in self.service.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_floor(b));
            }
        }
        None
    }

    /// The fixed buckets as Prometheus wants them: (upper bound in
    /// seconds, cumulative count) for every bound of [`FIXED_BOUNDS_NS`],
    /// then the total count and the exact sum in seconds. Reads of
    /// different buckets are not one atomic snapshot, so the total is the
    /// sum of the buckets read, never less than any cumulative count.
    pub fn fixed_seconds(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut cum = 0u64;
        let mut out = Vec::with_capacity(FIXED_BOUNDS_NS.len());
        for (ns, n) in FIXED_BOUNDS_NS.iter().zip(&self.fixed) {
            cum = cum.saturating_add(*n);
            out.push((to_f64(*ns) / 1e9, cum));
        }
        let count = self.fixed.iter().fold(0u64, |a, n| a.saturating_add(*n));
        let rate = crate::tsc::TscRate::from_khz(self.tsc_khz);
        (out, count, rate.ns(self.service_sum_cycles) / 1e9)
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

#[allow(clippy::cast_precision_loss)]
fn to_f64(v: u64) -> f64 {
    v as f64
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
        assert_eq!(snap.service_quantile(0.5), None);
    }

    #[test]
    fn service_buckets_are_monotonic_and_quantiles_land_in_them() {
        let mut last = 0;
        for c in [0u64, 1, 3, 4, 5, 7, 8, 100, 1000, 1 << 20, u64::MAX] {
            let b = service_bucket(c);
            assert!(b >= last && b < SERVICE_BUCKETS);
            if c < 1 << 30 {
                assert!(bucket_floor(b) <= c && c < bucket_floor(b + 1).max(c + 1), "{c}");
            }
            last = b;
        }
        let s = VmStats::default();
        for c in 1..=1000u64 {
            s.record_service(c);
        }
        let snap = s.snapshot();
        let p50 = snap.service_quantile(0.5).unwrap();
        assert!((400..=500).contains(&p50), "{p50}");
        assert!(snap.service_quantile(1.0).unwrap() <= 1000);
    }

    #[test]
    fn fixed_buckets_are_in_ns_whatever_the_tsc_and_the_sum_is_exact() {
        // 2.5 GHz: 32 ns = 80 cycles, 64 ns = 160.
        let s = VmStats::with_tsc(crate::tsc::TscRate::from_khz(2_500_000));
        for c in [1u64, 80, 81, 160, 161, 1 << 40] {
            s.record_service(c);
        }
        let (buckets, count, sum) = s.snapshot().fixed_seconds();
        assert_eq!(buckets.len(), FIXED_BOUNDS_NS.len());
        assert!((buckets[0].0 - 32e-9).abs() < 1e-18 && (buckets[1].0 - 64e-9).abs() < 1e-18);
        assert_eq!((buckets[0].1, buckets[1].1, buckets[2].1), (2, 4, 5), "<= 32 ns, <= 64 ns, <= 128 ns");
        assert_eq!(buckets.last().map(|b| b.1), Some(5), "the huge one is only in +Inf");
        assert_eq!(count, 6);
        let want = (1 + 80 + 81 + 160 + 161 + (1u64 << 40)) as f64 / 2.5e9;
        assert!((sum - want).abs() < want * 1e-12, "{sum} vs {want}");
        // Bounds are the same at another rate.
        let (b2, _, _) = VmStats::with_tsc(crate::tsc::TscRate::from_khz(3_100_123)).snapshot().fixed_seconds();
        assert_eq!(b2.iter().map(|b| b.0).collect::<Vec<_>>(), buckets.iter().map(|b| b.0).collect::<Vec<_>>());
    }
}
