//! Throughput through one sidecore, measured with host-side synthetic
//! producers (a thread posting into R rings, K requests in flight per ring),
//! and the capacity model built from it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shm_proto::op::{encode_head, Opcode};
use shm_proto::ring::{next_ticket, slot_index, Body, RING_SLOTS};

use crate::cpuid::CpuidTable;
use crate::pin::pin_current_thread;
use crate::poll::{Sidecore, SidecoreConfig, SidecoreError};
use crate::ring::{RingRef, SharedRegion};
use crate::service::Services;
use crate::stats::VmStats;

/// One measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throughput {
    /// Rings the producer posts into.
    pub rings: u32,
    /// Requests in flight per ring (posted together, then waited for).
    pub batch: u32,
    /// Calls answered per second.
    pub calls_per_s: f64,
    /// Calls answered.
    pub calls: u64,
    /// Median service time at the sidecore (claim to reply), TSC cycles.
    pub service_p50_cycles: u64,
}

/// Measuring failed.
#[derive(Debug, thiserror::Error)]
pub enum ThroughputError {
    /// The sidecore could not start.
    #[error(transparent)]
    Sidecore(#[from] SidecoreError),
    /// The rings could not be allocated.
    #[error("cannot allocate {0} rings")]
    Alloc(u32),
    /// The producer could not pin itself.
    #[error(transparent)]
    Pin(#[from] crate::pin::PinError),
    /// A reply did not come within a second.
    #[error("the sidecore stopped answering (ring {ring}, ticket {ticket})")]
    Stalled {
        /// Ring.
        ring: u32,
        /// Ticket.
        ticket: u64,
    },
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn to_f64(v: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let f = v as f64;
    f
}

/// Null calls per second through a sidecore on `sidecore_cpu`, from a
/// producer thread on `producer_cpu` keeping `batch` calls in flight on each
/// of `rings` rings, for `duration`. With `timed`, the sidecore also times
/// each request (two TSC reads, which lower the rate) for
/// [`Throughput::service_p50_cycles`].
pub fn measure(
    sidecore_cpu: usize,
    producer_cpu: usize,
    rings: u32,
    batch: u32,
    duration: Duration,
    timed: bool,
) -> Result<Throughput, ThroughputError> {
    let batch = batch.clamp(1, u32::try_from(RING_SLOTS).unwrap_or(64));
    let region = SharedRegion::alloc(rings).map_err(|_| ThroughputError::Alloc(rings))?;
    let services = Arc::new(Services::new(vec![CpuidTable::default()]));
    let stats = Arc::new(VmStats::default());
    // One VM's rings (one control): the plain sweep, 16 per ring.
    let control = Arc::new(crate::ring::VmControl::default());
    let refs = (0..rings)
        .filter_map(|v| {
            let mut r = RingRef::with_control(region.clone(), v, services.clone(), stats.clone(), control.clone())?;
            r.set_timed(timed);
            Some(r)
        })
        .collect();
    let sc = Sidecore::spawn(
        SidecoreConfig { cpu: sidecore_cpu, name: "sidecore-tput".into(), idle_park: None, on_start: None },
        refs,
    )?;
    let result = std::thread::scope(|s| {
        s.spawn(|| -> Result<Throughput, ThroughputError> {
            pin_current_thread(producer_cpu)?;
            produce(&region, rings, batch, duration)
        })
        .join()
        .unwrap_or(Err(ThroughputError::Alloc(rings)))
    });
    let _ = sc.stop();
    result.map(|mut t| {
        t.service_p50_cycles = stats.snapshot().service_quantile(0.5).unwrap_or(0);
        t
    })
}

fn produce(region: &SharedRegion, rings: u32, batch: u32, duration: Duration) -> Result<Throughput, ThroughputError> {
    let blocks: Vec<_> = (0..rings).filter_map(|v| region.vcpu(v)).collect();
    let mut tickets = vec![0u64; blocks.len()];
    let req = Body { head: encode_head(Opcode::Null as u16, 0), words: [1, 0, 0, 0, 0, 0] };
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < duration {
        for _ in 0..64 {
            for (b, t) in blocks.iter().zip(tickets.iter()) {
                let mut tk = *t;
                for _ in 0..batch {
                    b.slots[slot_index(tk)].post(tk, &req);
                    tk = next_ticket(tk);
                }
            }
            for (r, (b, t)) in blocks.iter().zip(tickets.iter_mut()).enumerate() {
                for _ in 0..batch {
                    let slot = &b.slots[slot_index(*t)];
                    let t0 = Instant::now();
                    while slot.poll_reply(*t).is_none() {
                        if t0.elapsed() > Duration::from_secs(1) {
                            return Err(ThroughputError::Stalled { ring: u32::try_from(r).unwrap_or(0), ticket: *t });
                        }
                        std::hint::spin_loop();
                    }
                    *t = next_ticket(*t);
                    calls += 1;
                }
            }
        }
    }
    Ok(Throughput { rings, batch, calls_per_s: to_f64(calls) / secs(start.elapsed()), calls, service_p50_cycles: 0 })
}

/// What one idle ring adds to a sweep, in ns: a sidecore sweeps `idle`
/// rings nobody posts to for `duration`.
pub fn sweep_cost_per_ring(cpu: usize, idle: u32, duration: Duration) -> Result<f64, ThroughputError> {
    let region = SharedRegion::alloc(idle).map_err(|_| ThroughputError::Alloc(idle))?;
    let services = Arc::new(Services::new(Vec::new()));
    let stats = Arc::new(VmStats::default());
    // One VM's rings: the plain sweep.
    let control = Arc::new(crate::ring::VmControl::default());
    let refs = (0..idle)
        .filter_map(|v| RingRef::with_control(region.clone(), v, services.clone(), stats.clone(), control.clone()))
        .collect();
    let sc =
        Sidecore::spawn(SidecoreConfig { cpu, name: "sidecore-sweep".into(), idle_park: None, on_start: None }, refs)?;
    let t0 = Instant::now();
    std::thread::sleep(duration);
    let core_stats = sc.stats().clone();
    let _ = sc.stop();
    let sweeps = core_stats.sweeps.load(Ordering::Relaxed).max(1);
    Ok(secs(t0.elapsed()) * 1e9 / to_f64(sweeps) / f64::from(idle.max(1)))
}

/// The capacity model: how many vCPUs, each making `rate` sidecalls per
/// second, one sidecore serves before a call's p99 passes `2 × floor`.
///
/// A call costs the floor (the cache-line round trip) plus the service time
/// `service_ns`, plus waiting: for the sweep to reach its ring (up to one
/// sweep of `n` rings at `ring_ns` each; p99 ≈ the whole sweep) and behind
/// other rings' requests (M/D/1 queue at utilisation ρ = n·rate·service;
/// mean wait ρ·s / 2(1−ρ), p99 ≈ 4.6 × the mean for an exponential tail).
pub fn capacity(floor_ns: f64, service_ns: f64, ring_ns: f64, rate: f64) -> u32 {
    let mut best = 0;
    for n in 1..=4096u32 {
        let nf = f64::from(n);
        let rho = nf * rate * service_ns * 1e-9;
        if rho >= 1.0 {
            break;
        }
        let queue99 = 4.6 * rho * service_ns / (2.0 * (1.0 - rho));
        let p99 = floor_ns + service_ns + nf * ring_ns + queue99;
        if p99 > 2.0 * floor_ns {
            break;
        }
        best = n;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_shrinks_with_rate_and_sweep_cost() {
        let low = capacity(120.0, 25.0, 1.3, 1_000.0);
        let high = capacity(120.0, 25.0, 1.3, 1_000_000.0);
        assert!(low > high, "{low} {high}");
        assert!(low > 50 && low < 100, "{low}");
        assert!(capacity(120.0, 25.0, 10.0, 1_000.0) < low);
        // Service alone above the budget: nobody fits.
        assert_eq!(capacity(50.0, 60.0, 1.0, 1.0), 0);
        // Saturation: 40 M calls/s at 25 ns each is one core's worth.
        assert_eq!(capacity(1e9, 25.0, 0.0, 40e6), 0);
    }

    #[test]
    fn batched_producer_measures_calls() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let t = measure(0, cpus - 1, 2, 8, Duration::from_millis(50), true).expect("measure");
        assert!(t.service_p50_cycles > 0);
        assert_eq!((t.rings, t.batch), (2, 8));
        assert!(t.calls > 0 && t.calls.is_multiple_of(16), "{t:?}");
        assert!(t.calls_per_s > 0.0);
    }
}
