//! `sidecore run --latency-phases`: splits the guest's own round-trip
//! histogram (shm-proto's `LatencyHist`, one per vCPU in the shared region)
//! into two alternating conditions, A and B, at each SIGUSR1.
//!
//! The guest never sends a sample out; the VMM snapshots the cumulative
//! buckets when told and charges the difference since the last snapshot to
//! the phase that just ended. `scripts/soak.sh` uses it to compare the
//! well-behaved VMs' p99 with and without a chaos VM, the two conditions
//! interleaved in short phases so both see the same floor levels.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use shm_proto::ring::{lat_bucket_end, LAT_BUCKETS};
use sidecore_core::SharedRegion;

/// Cumulative bucket counts.
pub type Buckets = [u64; LAT_BUCKETS];

/// The two conditions' histograms and the phase now open.
#[derive(Clone, Debug)]
pub struct PhaseSplit {
    last: Buckets,
    acc: [Buckets; 2],
    closed: [u32; 2],
    open: usize,
}

impl Default for PhaseSplit {
    fn default() -> Self {
        PhaseSplit { last: [0; LAT_BUCKETS], acc: [[0; LAT_BUCKETS]; 2], closed: [0; 2], open: 0 }
    }
}

impl PhaseSplit {
    /// Ends the open phase at cumulative counts `now`: the counts since the
    /// last snapshot go to it, and the other condition opens.
    pub fn close(&mut self, now: &Buckets) {
        for (i, (&n, last)) in now.iter().zip(self.last.iter_mut()).enumerate() {
            // The guest only adds; a smaller count is a guest rewriting its
            // own histogram, which costs it its samples, nothing else.
            let acc = &mut self.acc[self.open][i];
            *acc = acc.saturating_add(n.saturating_sub(*last));
            *last = n;
        }
        self.closed[self.open] = self.closed[self.open].saturating_add(1);
        self.open ^= 1;
    }

    /// Condition `c` (0 = A, 1 = B): its merged histogram and how many
    /// phases went into it.
    pub fn condition(&self, c: usize) -> (&Buckets, u32) {
        (&self.acc[c & 1], self.closed[c & 1])
    }
}

/// Samples in a histogram (saturating: the guest writes the counts).
pub fn total(h: &Buckets) -> u64 {
    h.iter().fold(0u64, |n, c| n.saturating_add(*c))
}

/// The `q` quantile (0..=1) in cycles, as the upper bound of the bucket
/// holding it (so at most 25% high); `None` for an empty histogram.
pub fn quantile_cycles(h: &Buckets, q: f64) -> Option<u64> {
    let n = total(h);
    if n == 0 {
        return None;
    }
    // Rank of the sample at quantile q, 1-based.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
    let mut seen = 0u64;
    for (i, &c) in h.iter().enumerate() {
        seen = c.saturating_add(seen);
        if seen >= rank {
            return Some(lat_bucket_end(i));
        }
    }
    None
}

/// The summed cumulative histograms of every vCPU of the region.
pub fn snapshot(region: &SharedRegion) -> Buckets {
    let mut out = [0u64; LAT_BUCKETS];
    for v in 0..region.nr_vcpus() {
        if let Some(b) = region.vcpu(v) {
            for (o, c) in out.iter_mut().zip(b.latency.buckets.iter()) {
                *o = o.saturating_add(c.load(Ordering::Relaxed));
            }
        }
    }
    out
}

/// One line per condition: phases, calls, p50/p99/p99.9 in ns.
pub fn report(split: &PhaseSplit, tsc_khz: u64) -> String {
    let ns = |c: Option<u64>| match c {
        Some(u64::MAX) => "overflow".to_string(),
        Some(c) => format!("{} ns", sidecore_core::tsc::TscRate::from_khz(tsc_khz).whole_ns(c)),
        None => "-".to_string(),
    };
    let mut s = String::new();
    for (c, name) in ["A", "B"].iter().enumerate() {
        let (h, phases) = split.condition(c);
        s.push_str(&format!(
            "latency: condition {name}: {phases} phases, {} calls, p50 {}, p99 {}, p99.9 {}\n",
            total(h),
            ns(quantile_cycles(h, 0.50)),
            ns(quantile_cycles(h, 0.99)),
            ns(quantile_cycles(h, 0.999)),
        ));
    }
    s
}

/// Closes a phase at every SIGUSR1 until dropped.
pub struct PhaseSignal {
    split: Arc<Mutex<PhaseSplit>>,
    region: Arc<SharedRegion>,
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PhaseSignal {
    /// Installs the SIGUSR1 handler (before the VM starts, so that a signal
    /// sent once the VM is attached never hits the default action, which
    /// kills the process).
    pub fn install(region: Arc<SharedRegion>) -> std::io::Result<PhaseSignal> {
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])?;
        let handle = signals.handle();
        let split = Arc::new(Mutex::new(PhaseSplit::default()));
        let (s, r) = (split.clone(), region.clone());
        let thread = std::thread::Builder::new().name("latency-phases".into()).spawn(move || {
            for _ in signals.forever() {
                let now = snapshot(&r);
                if let Ok(mut g) = s.lock() {
                    g.close(&now);
                }
            }
        })?;
        Ok(PhaseSignal { split, region, handle, thread: Some(thread) })
    }

    /// Closes the open phase, stops listening and returns the split.
    pub fn finish(mut self) -> PhaseSplit {
        self.stop();
        let now = snapshot(&self.region);
        let mut g = self.split.lock().map(|g| g.clone()).unwrap_or_default();
        g.close(&now);
        g
    }

    fn stop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PhaseSignal {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shm_proto::ring::lat_bucket;

    fn hist(samples: &[u64]) -> Buckets {
        let mut h = [0; LAT_BUCKETS];
        for &s in samples {
            h[lat_bucket(s)] += 1;
        }
        h
    }

    #[test]
    fn phases_alternate_and_get_only_their_own_counts() {
        let mut p = PhaseSplit::default();
        let a1 = hist(&[100, 100, 100]);
        p.close(&a1);
        let mut b1 = a1;
        b1[lat_bucket(1000)] += 2;
        p.close(&b1);
        let mut a2 = b1;
        a2[lat_bucket(100)] += 1;
        p.close(&a2);
        let (a, na) = p.condition(0);
        let (b, nb) = p.condition(1);
        assert_eq!((total(a), na, total(b), nb), (4, 2, 2, 1));
        assert_eq!(a[lat_bucket(100)], 4);
        assert_eq!(b[lat_bucket(1000)], 2);
    }

    #[test]
    fn a_shrinking_count_charges_nothing() {
        let mut p = PhaseSplit::default();
        p.close(&hist(&[100; 10]));
        p.close(&hist(&[100; 3]));
        assert_eq!(total(p.condition(1).0), 0);
    }

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let mut s = vec![300u64; 990];
        s.extend([5000u64; 10]);
        let h = hist(&s);
        let p50 = quantile_cycles(&h, 0.5).unwrap_or(0);
        assert!(p50 > 300 && p50 <= 375, "{p50}");
        let p99 = quantile_cycles(&h, 0.99).unwrap_or(0);
        assert!(p99 > 300 && p99 <= 375, "{p99}");
        let p999 = quantile_cycles(&h, 0.999).unwrap_or(0);
        assert!(p999 > 5000 && p999 <= 6250, "{p999}");
        assert_eq!(quantile_cycles(&[0; LAT_BUCKETS], 0.5), None);
    }

    /// A guest may write any count into its histogram: sums and quantiles
    /// saturate instead of overflowing (a panic in debug, nonsense in
    /// release).
    #[test]
    fn huge_guest_counts_saturate() {
        let h = [u64::MAX; LAT_BUCKETS];
        assert_eq!(total(&h), u64::MAX);
        assert!(quantile_cycles(&h, 0.5).is_some());
        let mut p = PhaseSplit::default();
        p.close(&h);
        p.close(&[0; LAT_BUCKETS]);
        p.close(&h);
        p.close(&[0; LAT_BUCKETS]);
        p.close(&h);
        let (a, _) = p.condition(0);
        assert_eq!(total(a), u64::MAX);
        assert!(report(&p, 1_000_000).contains("condition A"));
    }
}
