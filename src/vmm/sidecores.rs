//! The VMM's own sidecores of one VM, which the guest may ask to stop and
//! start (through [`crate::vmm::control`]): stopping keeps the rings, with
//! their expected tickets, and the devices; starting again hands both to new
//! sidecore threads. Stop when stopped and start when running do nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sidecore_core::device::Device;
use sidecore_core::ring::RingRef;
use sidecore_core::service::Services;
use sidecore_core::stats::VmStats;
use sidecore_core::{Parts, Sidecore, SidecoreConfig};

use crate::bench::FloorProbe;
use crate::vmm::devices::DeviceHost;
use crate::vmm::RunError;

/// The sidecores of one VM.
pub struct SidecoreSet {
    cpus: Vec<usize>,
    state: Mutex<SetState>,
    /// Rings of the VM on sidecore 0 (idle benchmark rings come after them).
    base_rings: usize,
    /// Park after this long idle.
    park: Option<Duration>,
}

enum SetState {
    Running(Vec<Sidecore>),
    /// Rings sorted by vCPU; devices in the order they were added.
    Stopped(Parts),
}

impl DeviceHost for SidecoreSet {
    fn add_device(&self, dev: Box<dyn Device>) -> Result<(), String> {
        SidecoreSet::add_device(self, dev).map_err(|e| crate::error_chain(&e))
    }
}

impl FloorProbe for SidecoreSet {
    fn cpus(&self) -> &[usize] {
        SidecoreSet::cpus(self)
    }
    fn floor_block(&self, samples: &mut [u64]) -> bool {
        SidecoreSet::floor_block(self, samples)
    }
    fn set_idle_rings(&self, on: bool) {
        SidecoreSet::set_idle_rings(self, on);
    }
    fn guest_pong(&self, vcpu: u32, rounds: u32) -> bool {
        SidecoreSet::guest_pong(self, vcpu, rounds)
    }
}

fn poisoned() -> RunError {
    RunError::Device("the sidecore set's lock is poisoned (a sidecore call panicked): restart the VM".into())
}

impl SidecoreSet {
    /// Starts one sidecore per CPU; ring i goes to sidecore i mod n.
    pub fn start(cpus: Vec<usize>, rings: Vec<RingRef>) -> Result<SidecoreSet, RunError> {
        SidecoreSet::start_with_idle(cpus, rings, 0, None)
    }

    /// As [`SidecoreSet::start`], plus `idle` host-side rings that nobody
    /// posts to, swept by sidecore 0 after the VM's rings (to measure what
    /// idle rings cost a busy one). Each is a VM of its own (its own
    /// control), as a daemon's idle VMs are. They start switched off: see
    /// [`SidecoreSet::set_idle_rings`].
    pub fn start_with_idle(
        cpus: Vec<usize>,
        rings: Vec<RingRef>,
        idle: u32,
        park: Option<Duration>,
    ) -> Result<SidecoreSet, RunError> {
        let base_rings = rings.len().div_ceil(cpus.len().max(1));
        let cores = spawn_sharded(&cpus, &mut Parts { rings, devices: Vec::new() }, park)?;
        if idle > 0 {
            let region = sidecore_core::SharedRegion::alloc(idle).map_err(|e| RunError::IdleRings(e.to_string()))?;
            let services = Arc::new(Services::new(Vec::new()));
            let stats = Arc::new(VmStats::default());
            if let Some(c0) = cores.first() {
                c0.set_active_rings(base_rings);
                for v in 0..idle {
                    if let Some(r) = RingRef::new(region.clone(), v, services.clone(), stats.clone()) {
                        c0.add_ring(r)?;
                    }
                }
            }
        }
        Ok(SidecoreSet { cpus, state: Mutex::new(SetState::Running(cores)), base_rings, park })
    }

    /// The sidecores' CPUs.
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// True while the sidecores run.
    pub fn running(&self) -> bool {
        self.state.lock().is_ok_and(|st| matches!(&*st, SetState::Running(_)))
    }

    /// Sweeps the idle benchmark rings (`on`) or only the VM's rings.
    pub fn set_idle_rings(&self, on: bool) {
        if let Ok(st) = self.state.lock() {
            if let SetState::Running(cores) = &*st {
                if let Some(c0) = cores.first() {
                    c0.set_active_rings(if on { usize::MAX } else { self.base_rings });
                }
            }
        }
    }

    /// Adds a device to sidecore 0 (polled every sweep after its rings);
    /// while stopped, it is kept for the restart.
    pub fn add_device(&self, dev: Box<dyn Device>) -> Result<(), RunError> {
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        match &mut *st {
            SetState::Running(cores) => match cores.first() {
                Some(c0) => Ok(c0.add_device(dev)?),
                None => Err(RunError::Device("no sidecore is running".into())),
            },
            SetState::Stopped(parts) => {
                parts.devices.push(dev);
                Ok(())
            }
        }
    }

    /// Stops them, keeping rings and devices for a restart; does nothing if
    /// they are stopped already.
    pub fn stop(&self) -> Result<(), RunError> {
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        let SetState::Running(cores) = &mut *st else { return Ok(()) };
        let cores = std::mem::take(cores);
        let mut kept = Parts::default();
        let mut failed = None;
        for c in cores {
            match c.stop() {
                Ok(p) => {
                    kept.rings.extend(p.rings);
                    kept.devices.extend(p.devices);
                }
                // Its thread died: what it held is gone, the rest is kept.
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        kept.rings.sort_by_key(RingRef::vcpu);
        *st = SetState::Stopped(kept);
        failed.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Measures a block of the floor against the first sidecore (which
    /// pauses its rings meanwhile); `false` if none is running.
    pub fn floor_block(&self, samples: &mut [u64]) -> bool {
        let Ok(st) = self.state.lock() else { return false };
        match &*st {
            SetState::Running(cores) if !cores.is_empty() => {
                cores[0].floor_block(samples);
                true
            }
            _ => false,
        }
    }

    /// Arms the guest floor of vCPU `vcpu` on the sidecore that serves its
    /// ring ([`Sidecore::guest_pong`]); `false` if none is running or took it.
    pub fn guest_pong(&self, vcpu: u32, rounds: u32) -> bool {
        let Ok(st) = self.state.lock() else { return false };
        match &*st {
            // The others refuse at their next sweep: they hold no ring of it.
            SetState::Running(cores) => cores.iter().any(|c| c.guest_pong(vcpu, rounds, Duration::from_millis(100))),
            SetState::Stopped(_) => false,
        }
    }

    /// Starts them again after [`SidecoreSet::stop`]; does nothing if they
    /// run. If a sidecore cannot start, they stay stopped with rings and
    /// devices kept, and a later restart may try again.
    pub fn restart(&self) -> Result<(), RunError> {
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        let SetState::Stopped(parts) = &mut *st else { return Ok(()) };
        let cores = spawn_sharded(&self.cpus, parts, self.park)?;
        *st = SetState::Running(cores);
        Ok(())
    }
}

/// Starts one sidecore per CPU, then hands ring i of `parts` to sidecore
/// i mod n and every device to sidecore 0. The threads start empty so that,
/// if one cannot start, nothing has been handed over: `parts` is left as it
/// was (and emptied on success).
fn spawn_sharded(cpus: &[usize], parts: &mut Parts, park: Option<Duration>) -> Result<Vec<Sidecore>, RunError> {
    let mut cores = Vec::new();
    for (k, cpu) in cpus.iter().enumerate() {
        cores.push(Sidecore::spawn(
            SidecoreConfig { cpu: *cpu, name: format!("sidecore{k}"), idle_park: park, on_start: None },
            Vec::new(),
        )?);
    }
    if cores.is_empty() {
        return Err(RunError::Device("no sidecore CPU to start a sidecore on".into()));
    }
    let n = cores.len();
    for (i, r) in std::mem::take(&mut parts.rings).into_iter().enumerate() {
        // A send fails only if that thread died; it reports it at stop.
        let _ = cores[i % n].add_ring(r);
    }
    for d in std::mem::take(&mut parts.devices) {
        let _ = cores[0].add_device(d);
    }
    Ok(cores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

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

    /// Rings kept by a stopped set (`None` while it runs).
    fn kept_rings(set: &SidecoreSet) -> Option<usize> {
        match &*set.state.lock().unwrap() {
            SetState::Running(_) => None,
            SetState::Stopped(p) => Some(p.rings.len()),
        }
    }

    /// Stop twice, start twice, in any order: the rings and the device are
    /// never lost, and the device is polled again after each start.
    #[test]
    fn repeated_stops_and_starts_keep_rings_and_devices() {
        let region = sidecore_core::SharedRegion::alloc(2).unwrap();
        let services = Arc::new(Services::new(Vec::new()));
        let stats = Arc::new(VmStats::default());
        let rs = (0..2).filter_map(|v| RingRef::new(region.clone(), v, services.clone(), stats.clone())).collect();
        let set = SidecoreSet::start(vec![0], rs).unwrap();
        let polls = Arc::new(AtomicU64::new(0));
        set.add_device(Box::new(Counting(polls.clone()))).unwrap();
        assert!(polled_again(&polls));
        for round in 0..3 {
            set.stop().unwrap();
            set.stop().unwrap();
            assert!(!set.running());
            assert_eq!(kept_rings(&set), Some(2), "round {round}: rings lost by a double stop");
            set.restart().unwrap();
            set.restart().unwrap();
            assert!(set.running());
            assert!(polled_again(&polls), "round {round}: the device was lost by stop/restart");
        }
        // A device added while stopped is kept for the restart.
        set.stop().unwrap();
        let late = Arc::new(AtomicU64::new(0));
        set.add_device(Box::new(Counting(late.clone()))).unwrap();
        set.restart().unwrap();
        assert!(polled_again(&late), "a device added while stopped never ran");
        set.stop().unwrap();
        assert_eq!(kept_rings(&set), Some(2));
    }
}
