//! A VM's virtual devices, VMM side: wiring its packet device into its
//! sidecore (the posted-event path) or its exit path (a VMM thread that
//! interrupts the vCPU per packet), and the `irq` benchmark's poster.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shm_proto::event::EV_TEST;
use sidecore_core::device::{post, Delivery, Device, GuestWindow, Kick, PacketDevice};
use sidecore_core::tsc::rdtsc;
use sidecore_core::SharedRegion;

use crate::vmm::vm::Vm;

/// Where a device that a sidecore polls is handed over (the VMM's set of
/// sidecores).
pub trait DeviceHost {
    /// Adds `dev` to the first sidecore's sweep.
    fn add_device(&self, dev: Box<dyn Device>) -> Result<(), String>;
}

/// Wiring a device failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// KVM gave the VM no interrupt route for vCPU 0.
    #[error("the VM has no vCPU 0 interrupt")]
    NoInterrupt,
    /// The posted-event path and the irq poster run on a sidecore.
    #[error("the posted-event path needs a sidecore")]
    NeedsSidecore,
    /// The guest's free RAM could not be mapped for the device.
    #[error("cannot map the guest's free RAM")]
    NoWindow,
    /// The packet device's socket or thread.
    #[error("packet device")]
    Packet(#[source] std::io::Error),
    /// The sidecore did not take the device.
    #[error("handing the device to the sidecore: {0}")]
    Host(String),
}

/// Which way a device's events reach the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventPath {
    /// The sidecore posts them in shared memory; an interrupt only wakes a
    /// halted guest.
    Posted,
    /// The classic exit path: a VMM thread interrupts the vCPU for each one
    /// (and the guest's tx is a PIO exit).
    Interrupt,
}

/// Which device a run wires up, and how.
pub enum EventDevice {
    /// The packet device on this socket. [`EventPath::Interrupt`]: rx by
    /// interrupt from a VMM thread, tx by the guest's PIO doorbell;
    /// [`EventPath::Posted`]: the sidecore polls the socket and the queues
    /// and posts events.
    Packet {
        /// The device's end (bound; the load generator sends to it).
        socket: UdpSocket,
        /// The way its events go.
        path: EventPath,
        /// Pin the exit path's receiver thread here (the CPU a sidecore
        /// would have), so that both paths do their host work on one CPU.
        host_cpu: Option<usize>,
    },
    /// The `irq` benchmark: the sidecore posts test events and times the
    /// guest's acknowledgement.
    IrqBench {
        /// Where the samples go.
        state: Arc<IrqBenchState>,
        /// Post the events, or interrupt for every one (the exit path).
        path: EventPath,
    },
}

/// Wires `d` into the VM: onto sidecore 0 of `sidecores` (the posted path,
/// the irq poster), or as an exit-path device, returned for the vCPU loop.
pub fn wire(d: EventDevice, vm: &Vm, sidecores: Option<&dyn DeviceHost>) -> Result<Option<ExitPathDevice>, WireError> {
    let irq0 = vm.irqfds.first().cloned().ok_or(WireError::NoInterrupt)?;
    let kick = Kick::new(irq0);
    let sidecore = || sidecores.ok_or(WireError::NeedsSidecore);
    let window = || free_ram_window(vm).ok_or(WireError::NoWindow);
    let dev_err = WireError::Packet;
    match d {
        EventDevice::Packet { socket, path: EventPath::Interrupt, host_cpu } => {
            Ok(Some(ExitPathDevice::start(vm.region.clone(), window()?, socket, kick, host_cpu).map_err(dev_err)?))
        }
        EventDevice::Packet { socket, path: EventPath::Posted, .. } => {
            let dev = PacketDevice::new(vm.region.clone(), 0, window()?, socket, Delivery::Posted(Some(kick)))
                .map_err(dev_err)?;
            sidecore()?.add_device(Box::new(dev)).map_err(WireError::Host)?;
            Ok(None)
        }
        EventDevice::IrqBench { state, path } => {
            let dev = IrqBenchDevice::new(state, vm.region.clone(), kick, path, vm.tsc_khz);
            sidecore()?.add_device(Box::new(dev)).map_err(WireError::Host)?;
            Ok(None)
        }
    }
}

/// The guest RAM after the shared region (where guests keep packet
/// buffers), as a window the device may copy into and out of.
pub fn free_ram_window(vm: &Vm) -> Option<GuestWindow> {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let gpa = vm.layout.free_gpa;
    let len = vm.layout.ram_size.checked_sub(gpa)?;
    let host = vm.mem.get_host_address(GuestAddress(gpa)).ok()?;
    let base = std::ptr::NonNull::new(host)?;
    // SAFETY: guest memory is one mapping of ram_size bytes from GPA 0 (see
    // vm::guest_memory), so gpa .. ram_size is mapped at `host`; `vm.mem`,
    // held by the window, keeps it mapped.
    Some(unsafe { GuestWindow::new(base, gpa, len, vm.mem.clone()) })
}

/// The exit-path packet device: a thread that blocks on the socket and
/// interrupts the vCPU for each packet; the vCPU thread sends tx on PIO.
pub struct ExitPathDevice {
    dev: Arc<Mutex<PacketDevice>>,
    stop: Arc<AtomicBool>,
    rx: Option<std::thread::JoinHandle<()>>,
}

impl ExitPathDevice {
    /// Starts its receiver thread. Nothing else wakes a halted guest: only
    /// packets do.
    pub fn start(
        region: Arc<SharedRegion>,
        window: GuestWindow,
        socket: UdpSocket,
        kick: Kick,
        host_cpu: Option<usize>,
    ) -> std::io::Result<Self> {
        let rx_socket = socket.try_clone()?;
        // A timeout, so that the thread notices a stop.
        rx_socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let dev = Arc::new(Mutex::new(PacketDevice::new(region, 0, window, socket, Delivery::Interrupt(kick))?));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (dev.clone(), stop.clone());
        let rx = std::thread::Builder::new().name("pktdev-rx".into()).spawn(move || {
            if let Some(cpu) = host_cpu {
                let _ = sidecore_core::pin::pin_current_thread(cpu);
            }
            let mut buf = vec![0u8; shm_proto::event::PKT_MAX as usize];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = rx_socket.recv_from(&mut buf) {
                    if let Ok(mut g) = d.lock() {
                        g.set_peer(from);
                        g.deliver(&buf[..n]);
                    }
                }
            }
        })?;
        Ok(ExitPathDevice { dev, stop, rx: Some(rx) })
    }

    /// The guest rang the tx doorbell.
    pub fn on_tx(&self) {
        if let Ok(mut g) = self.dev.lock() {
            g.drain_tx();
        }
    }
}

impl Drop for ExitPathDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.rx.take() {
            let _ = t.join();
        }
    }
}

/// Samples of the `irq` benchmark, filled by the sidecore.
pub struct IrqBenchState {
    samples: Vec<AtomicU64>,
    count: AtomicUsize,
    lost: AtomicU64,
}

impl IrqBenchState {
    /// Room for `n` samples.
    pub fn new(n: usize) -> Arc<IrqBenchState> {
        Arc::new(IrqBenchState {
            samples: (0..n).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicUsize::new(0),
            lost: AtomicU64::new(0),
        })
    }

    /// Post-to-acknowledgement times so far, in TSC cycles.
    pub fn samples(&self) -> Vec<u64> {
        let n = self.count.load(Ordering::Acquire).min(self.samples.len());
        self.samples[..n].iter().map(|s| s.load(Ordering::Relaxed)).collect()
    }

    /// Events that got no acknowledgement within 50 ms (re-posted).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// All samples taken.
    pub fn done(&self) -> bool {
        self.count.load(Ordering::Acquire) >= self.samples.len()
    }
}

/// The `irq` benchmark's poster, run by the sidecore every sweep: posts a
/// test event with a fresh sequence number (and, on the exit path,
/// interrupts the vCPU), then times until the guest writes that number back.
pub struct IrqBenchDevice {
    state: Arc<IrqBenchState>,
    region: Arc<SharedRegion>,
    kick: Kick,
    path: EventPath,
    seq: u64,
    t0: u64,
    waiting: bool,
    started: bool,
    next_at: u64,
    gap: u64,
    timeout: u64,
    rng: u64,
}

impl IrqBenchDevice {
    /// A poster for vCPU 0 of `region`; `tsc_khz` sets its 5–15 µs gaps
    /// between events and its 50 ms loss timeout.
    pub fn new(
        state: Arc<IrqBenchState>,
        region: Arc<SharedRegion>,
        kick: Kick,
        path: EventPath,
        tsc_khz: u64,
    ) -> Self {
        IrqBenchDevice {
            state,
            region,
            kick,
            path,
            seq: 0,
            t0: 0,
            waiting: false,
            started: false,
            next_at: 0,
            gap: tsc_khz / 100,
            timeout: tsc_khz.saturating_mul(50),
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn jitter(&mut self) -> u64 {
        self.gap / 2 + xorshift(&mut self.rng) % self.gap.max(1)
    }
}

impl Device for IrqBenchDevice {
    fn poll(&mut self) -> usize {
        if self.state.done() {
            return 0;
        }
        let Some(v) = self.region.vcpu(0) else { return 0 };
        let ack = v.guest_events.ack.load(Ordering::Acquire);
        if self.waiting {
            let now = rdtsc();
            if ack == self.seq {
                let i = self.state.count.load(Ordering::Relaxed);
                if let Some(s) = self.state.samples.get(i) {
                    s.store(now.wrapping_sub(self.t0), Ordering::Relaxed);
                    self.state.count.store(i + 1, Ordering::Release);
                }
                self.waiting = false;
                self.next_at = now.wrapping_add(self.jitter());
                return 1;
            }
            if now.wrapping_sub(self.t0) > self.timeout {
                self.state.lost.fetch_add(1, Ordering::Relaxed);
                self.waiting = false;
            }
            return 0;
        }
        if !self.started {
            // The guest writes u64::MAX once it is ready to acknowledge.
            if ack != u64::MAX {
                return 0;
            }
            self.started = true;
        }
        if rdtsc() < self.next_at {
            return 0;
        }
        self.seq += 1;
        v.events.payload.store(self.seq, Ordering::Release);
        self.t0 = rdtsc();
        if self.path == EventPath::Interrupt {
            post(v, EV_TEST, None);
            self.kick.kick();
        } else {
            post(v, EV_TEST, Some(&self.kick));
        }
        self.waiting = true;
        1
    }
}

/// xorshift64: the next value of `x` (never 0 if `x` was not).
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}
