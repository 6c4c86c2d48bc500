//! A sidecore's devices survive a stop: `stop` hands them back beside the
//! rings (also one added just before the stop, still in the command queue),
//! and a sidecore started with them polls them again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sidecore_core::device::Device;
use sidecore_core::{Parts, RingRef, Services, SharedRegion, Sidecore, SidecoreConfig, VmStats};

/// Counts its polls.
struct Counting(Arc<AtomicU64>);

impl Device for Counting {
    fn poll(&mut self) -> usize {
        self.0.fetch_add(1, Ordering::Relaxed);
        0
    }
}

fn polled_again(c: &AtomicU64) -> bool {
    let before = c.load(Ordering::Relaxed);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if c.load(Ordering::Relaxed) > before {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn cfg() -> SidecoreConfig {
    SidecoreConfig { cpu: 0, name: "sidecore-dev-test".into(), idle_park: None, on_start: None }
}

#[test]
fn devices_and_rings_come_back_from_stop_and_run_again() {
    let region = SharedRegion::alloc(1).expect("region");
    let ring =
        RingRef::new(region, 0, Arc::new(Services::new(Vec::new())), Arc::new(VmStats::default())).expect("ring");
    let a = Arc::new(AtomicU64::new(0));
    let b = Arc::new(AtomicU64::new(0));
    let sc = Sidecore::spawn(cfg(), vec![ring]).expect("sidecore");
    sc.add_device(Box::new(Counting(a.clone()))).expect("add device a");
    assert!(polled_again(&a), "device a never polled");
    // Added and stopped at once: it may still sit in the command queue.
    sc.add_device(Box::new(Counting(b.clone()))).expect("add device b");
    let parts = sc.stop().expect("stop");
    assert_eq!(parts.rings.len(), 1, "the ring must come back");
    assert_eq!(parts.devices.len(), 2, "both devices must come back");
    let sc = Sidecore::spawn_with(cfg(), parts).expect("restart");
    assert!(polled_again(&a), "device a not polled after the restart");
    assert!(polled_again(&b), "device b not polled after the restart");
    let Parts { rings, devices } = sc.stop().expect("stop again");
    assert_eq!((rings.len(), devices.len()), (1, 2));
}
