//! The sidecore thread: pinned to one CPU, it sweeps its rings until told to
//! stop. Its hot loop does not log, allocate or lock: it loads one state word
//! per idle ring, and the only other shared traffic is a heartbeat store every
//! [`HEARTBEAT_SWEEPS`] sweeps and a Relaxed load of the stop flag.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{self, Receiver, Sender};

use crate::device::Device;
use crate::pin::{pin_current_thread, PinError};
use crate::ring::RingRef;
use crate::tsc::rdtsc;

/// Sweeps between heartbeat stores and command checks.
pub const HEARTBEAT_SWEEPS: u64 = 1024;

/// Starting or stopping a sidecore failed.
#[derive(Debug, thiserror::Error)]
pub enum SidecoreError {
    /// The OS would not create the thread.
    #[error("cannot start sidecore thread {name}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The thread could not pin itself.
    #[error("sidecore thread {name} could not pin itself")]
    Pin {
        /// Thread name.
        name: String,
        /// Why.
        #[source]
        source: PinError,
    },
    /// The thread died (a bug: it never panics on guest input).
    #[error("sidecore thread {0} died")]
    Died(String),
    /// The thread's start hook ([`SidecoreConfig::on_start`]) failed.
    #[error("sidecore thread {name} could not start: {reason}")]
    Hook {
        /// Thread name.
        name: String,
        /// What the hook said.
        reason: String,
    },
}

/// Code a sidecore thread runs once it has pinned itself and before it
/// serves anything (e.g. the daemon installs its seccomp filter there); an
/// error stops the thread and makes [`Sidecore::spawn_with`] fail.
#[derive(Clone)]
pub struct StartHook(Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl StartHook {
    /// Wraps `f`.
    pub fn new(f: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> StartHook {
        StartHook(Arc::new(f))
    }
}

impl std::fmt::Debug for StartHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartHook")
    }
}

/// How to run a sidecore.
#[derive(Clone, Debug)]
pub struct SidecoreConfig {
    /// The CPU to pin to.
    pub cpu: usize,
    /// Thread name (e.g. `sidecore0`).
    pub name: String,
    /// Park after this long with every ring idle: sleep [`PARK_NAP`]
    /// between sweeps until a ring has work again (`None`: always spin).
    pub idle_park: Option<std::time::Duration>,
    /// Run in the thread right after pinning, before serving (`None`: nothing).
    pub on_start: Option<StartHook>,
}

/// How long a parked sidecore sleeps between sweeps at first; each idle nap
/// doubles it up to [`PARK_NAP_MAX`].
pub const PARK_NAP: std::time::Duration = std::time::Duration::from_micros(100);
/// The longest nap: the worst-case extra latency of the first call after a
/// long idle period, kept under the guest's default sidecall bound (2 ms) so
/// that the call is served, not sent to the exit path; about 1,000 wake-ups a
/// second, a few percent of a CPU at most.
pub const PARK_NAP_MAX: std::time::Duration = std::time::Duration::from_micros(1000);

/// Counters of the sidecore thread itself.
#[derive(Default)]
pub struct CoreStats {
    /// Sweeps over all rings (published every [`HEARTBEAT_SWEEPS`]).
    pub sweeps: AtomicU64,
    /// Sweeps that found work.
    pub busy_sweeps: AtomicU64,
    /// Requests served (all rings).
    pub served: AtomicU64,
    /// Rings it holds (published every [`HEARTBEAT_SWEEPS`]).
    pub rings: AtomicUsize,
    /// Times it parked.
    pub parks: AtomicU64,
    /// 1 while parked.
    pub parked: AtomicU64,
}

enum Command {
    Add(RingRef),
    AddDevice(Box<dyn Device>),
    AddParts(Parts),
}

/// Serve the rings.
const MODE_SERVE: u8 = 0;
/// Leave the loop.
const MODE_STOP: u8 = 1;
/// Answer the floor ping-pong instead of the rings.
const MODE_PONG: u8 = 2;

/// The cache line of the floor measurement: the measuring thread stores an
/// odd value, the sidecore answers with the next even one. Same traffic as a
/// sidecall (one line, each way once), no ring protocol.
#[repr(C, align(128))]
#[derive(Default)]
pub struct PongLine {
    value: AtomicU64,
}

/// What a stopped sidecore hands back: its rings (with their expected
/// tickets) and its devices, ready for [`Sidecore::spawn_with`].
#[derive(Default)]
pub struct Parts {
    /// Its rings.
    pub rings: Vec<RingRef>,
    /// Its devices, including any added just before the stop.
    pub devices: Vec<Box<dyn Device>>,
}

/// A running sidecore.
pub struct Sidecore {
    name: String,
    cpu: usize,
    mode: Arc<AtomicU8>,
    pong: Arc<PongLine>,
    active: Arc<AtomicUsize>,
    stats: Arc<CoreStats>,
    commands: Sender<Command>,
    thread: Option<JoinHandle<Parts>>,
}

impl Sidecore {
    /// Starts a sidecore serving `rings`; returns once it has pinned itself.
    pub fn spawn(cfg: SidecoreConfig, rings: Vec<RingRef>) -> Result<Sidecore, SidecoreError> {
        Sidecore::spawn_with(cfg, Parts { rings, devices: Vec::new() })
    }

    /// Starts a sidecore serving the rings and devices of `parts` (those a
    /// stopped sidecore handed back); returns once it has pinned itself.
    pub fn spawn_with(cfg: SidecoreConfig, parts: Parts) -> Result<Sidecore, SidecoreError> {
        let mode = Arc::new(AtomicU8::new(MODE_SERVE));
        let active = Arc::new(AtomicUsize::new(usize::MAX));
        let pong = Arc::new(PongLine::default());
        let stats = Arc::new(CoreStats::default());
        let (tx, rx) = channel::unbounded();
        let (ready_tx, ready_rx) = channel::bounded::<Result<(), SidecoreError>>(1);
        let (mode2, pong2, stats2, active2, cpu) = (mode.clone(), pong.clone(), stats.clone(), active.clone(), cfg.cpu);
        let cfg2_park = cfg.idle_park;
        let (hook, name2) = (cfg.on_start.clone(), cfg.name.clone());
        let thread = std::thread::Builder::new()
            .name(cfg.name.clone())
            .spawn(move || {
                let started = pin_current_thread(cpu)
                    .map_err(|source| SidecoreError::Pin { name: name2.clone(), source })
                    .and_then(|()| match &hook {
                        Some(h) => (h.0)().map_err(|reason| SidecoreError::Hook { name: name2, reason }),
                        None => Ok(()),
                    });
                let ok = started.is_ok();
                let _ = ready_tx.send(started);
                if !ok {
                    return parts;
                }
                run(parts, &Control { mode: &mode2, pong: &pong2, active: &active2, park: cfg2_park }, &stats2, &rx)
            })
            .map_err(|source| SidecoreError::Spawn { name: cfg.name.clone(), source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => return Err(SidecoreError::Died(cfg.name)),
        }
        Ok(Sidecore { name: cfg.name, cpu, mode, pong, active, stats, commands: tx, thread: Some(thread) })
    }

    /// Adds a ring while running (picked up within [`HEARTBEAT_SWEEPS`] sweeps).
    pub fn add_ring(&self, ring: RingRef) -> Result<(), SidecoreError> {
        self.commands.send(Command::Add(ring)).map_err(|_| SidecoreError::Died(self.name.clone()))
    }

    /// Adds a VM's rings and devices in one step: the sidecore takes all of
    /// them at the same sweep, or (if it died) none.
    pub fn add_parts(&self, parts: Parts) -> Result<(), SidecoreError> {
        self.commands.send(Command::AddParts(parts)).map_err(|_| SidecoreError::Died(self.name.clone()))
    }

    /// Adds a device, polled every sweep after the rings.
    pub fn add_device(&self, dev: Box<dyn Device>) -> Result<(), SidecoreError> {
        self.commands.send(Command::AddDevice(dev)).map_err(|_| SidecoreError::Died(self.name.clone()))
    }

    /// The CPU it is pinned to.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Measures the floor: `samples.len()` cache-line round trips between
    /// the calling thread and this sidecore's thread (which stops serving its
    /// rings meanwhile), each in TSC cycles. Call it from a thread pinned
    /// where the guest's vCPU runs, so that the floor pairs the same CPUs.
    pub fn floor_block(&self, samples: &mut [u64]) {
        let line = &self.pong;
        self.mode.store(MODE_PONG, Ordering::Release);
        // One untimed round trip: it waits for the sidecore to switch over
        // (the mode is only read between sweeps).
        let mut v = line.value.load(Ordering::Relaxed) & !1;
        line.value.store(v + 1, Ordering::Release);
        while line.value.load(Ordering::Acquire) != v + 2 {}
        v += 2;
        for s in samples.iter_mut() {
            let t0 = rdtsc();
            line.value.store(v + 1, Ordering::Release);
            while line.value.load(Ordering::Acquire) != v + 2 {}
            *s = rdtsc().wrapping_sub(t0);
            v += 2;
        }
        self.mode.store(MODE_SERVE, Ordering::Release);
    }

    /// Rings it serves now, by VM id (for least-loaded placement).
    pub fn ring_count(&self) -> usize {
        self.stats.rings.load(Ordering::Relaxed)
    }

    /// Sweeps only the first `n` of its rings from now on (`usize::MAX`: all).
    /// `sidecore bench --idle-rings` uses it to measure, block by block,
    /// with and without idle rings in the sweep.
    pub fn set_active_rings(&self, n: usize) {
        self.active.store(n, Ordering::Relaxed);
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<CoreStats> {
        &self.stats
    }

    /// Stops it after the request in hand (a claimed slot always gets its
    /// reply) and hands back its rings, with their expected tickets, and its
    /// devices, so that another sidecore can take them over.
    pub fn stop(mut self) -> Result<Parts, SidecoreError> {
        self.mode.store(MODE_STOP, Ordering::Relaxed);
        let t = self.thread.take().ok_or_else(|| SidecoreError::Died(self.name.clone()))?;
        t.join().map_err(|_| SidecoreError::Died(self.name.clone()))
    }
}

impl Drop for Sidecore {
    fn drop(&mut self) {
        self.mode.store(MODE_STOP, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the poll loop reads besides its rings.
struct Control<'a> {
    mode: &'a AtomicU8,
    pong: &'a PongLine,
    active: &'a AtomicUsize,
    park: Option<std::time::Duration>,
}

fn run(parts: Parts, ctl: &Control, stats: &CoreStats, commands: &Receiver<Command>) -> Parts {
    let Parts { mut rings, mut devices } = parts;
    let (mut sweeps, mut busy, mut served) = (0u64, 0u64, 0u64);
    let mut idle_since: Option<std::time::Instant> = None;
    let mut parked = false;
    let mut nap = PARK_NAP;
    loop {
        match ctl.mode.load(Ordering::Relaxed) {
            MODE_SERVE => {}
            MODE_PONG => {
                serve_pong(ctl.mode, ctl.pong);
                continue;
            }
            _ => break,
        }
        let active = ctl.active.load(Ordering::Relaxed).min(rings.len());
        let mut n = 0;
        for r in rings[..active].iter_mut() {
            n += r.serve();
        }
        for d in devices.iter_mut() {
            n += d.poll();
        }
        sweeps += 1;
        if n > 0 {
            busy += 1;
            served += n as u64;
            idle_since = None;
            if parked {
                parked = false;
                nap = PARK_NAP;
                stats.parked.store(0, Ordering::Relaxed);
                set_parked(&rings, false);
            }
        } else if let Some(limit) = ctl.park {
            // Idle: look at the clock only every 256 idle sweeps.
            if parked {
                wait_doorbells(&rings, &devices, nap);
                nap = (nap * 2).min(PARK_NAP_MAX);
            } else if sweeps.is_multiple_of(256) {
                let now = std::time::Instant::now();
                match idle_since {
                    None => idle_since = Some(now),
                    Some(t) if now.duration_since(t) >= limit => {
                        parked = true;
                        stats.parks.fetch_add(1, Ordering::Relaxed);
                        stats.parked.store(1, Ordering::Relaxed);
                        set_parked(&rings, true);
                        // A guest that posted before it could see the flag
                        // is caught by this sweep.
                        continue;
                    }
                    Some(_) => {}
                }
            }
        }
        if sweeps.is_multiple_of(HEARTBEAT_SWEEPS) || parked {
            for r in &rings {
                r.heartbeat();
            }
            stats.sweeps.store(sweeps, Ordering::Relaxed);
            stats.busy_sweeps.store(busy, Ordering::Relaxed);
            stats.served.store(served, Ordering::Relaxed);
            while let Ok(c) = commands.try_recv() {
                take(c, &mut rings, &mut devices);
            }
            // Drop detached VMs' rings (and, with the last one, the mapping).
            rings.retain(|r| !r.control().detached.load(Ordering::Relaxed));
            devices.retain(|d| !d.done());
            stats.rings.store(rings.len(), Ordering::Relaxed);
        }
    }
    stats.sweeps.store(sweeps, Ordering::Relaxed);
    stats.busy_sweeps.store(busy, Ordering::Relaxed);
    stats.served.store(served, Ordering::Relaxed);
    // What was sent but not yet picked up goes back too: a device added
    // just before the stop survives it.
    while let Ok(c) = commands.try_recv() {
        take(c, &mut rings, &mut devices);
    }
    // Nobody serves them until they are handed to a sidecore again: their
    // guests go to the exit path without waiting out a bound.
    for r in &mut rings {
        r.show_paused(true);
    }
    Parts { rings, devices }
}

/// Takes in what a command brings.
fn take(c: Command, rings: &mut Vec<RingRef>, devices: &mut Vec<Box<dyn Device>>) {
    match c {
        Command::Add(r) => rings.push(r),
        Command::AddDevice(d) => devices.push(d),
        Command::AddParts(p) => {
            rings.extend(p.rings);
            devices.extend(p.devices);
        }
    }
}

/// Tells the guests of these rings whether to ring the doorbell.
fn set_parked(rings: &[RingRef], on: bool) {
    for r in rings {
        r.region().header().parked.value.store(u64::from(on), Ordering::Release);
    }
}

/// Sleeps up to `nap`, or until a guest rings one of the rings' doorbells.
fn wait_doorbells(rings: &[RingRef], devices: &[Box<dyn Device>], nap: std::time::Duration) {
    use std::os::fd::AsRawFd;
    let mut fds: Vec<libc::pollfd> = Vec::new();
    for r in rings {
        if let Some(d) = r.doorbell() {
            let fd = d.as_raw_fd();
            if !fds.iter().any(|p| p.fd == fd) {
                fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
            }
        }
    }
    // A device's descriptor is only waited on, never read here: its poll()
    // takes what is ready.
    let doorbells = fds.len();
    for fd in devices.iter().filter_map(|d| d.wake_fd()) {
        fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    }
    if fds.is_empty() {
        std::thread::sleep(nap);
        return;
    }
    let ts = libc::timespec { tv_sec: 0, tv_nsec: libc::c_long::try_from(nap.as_nanos()).unwrap_or(1_000_000) };
    let n = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    // SAFETY: `fds` is a valid array of `n` pollfds that lives across the
    // call; the timeout is a valid timespec; no signal mask is changed.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), n, &ts, std::ptr::null()) };
    if rc > 0 {
        for p in fds[..doorbells].iter().filter(|p| p.revents & libc::POLLIN != 0) {
            // RWF_NOWAIT, not the fd's flags: a VMM shares the file
            // description and may clear O_NONBLOCK, or read the count first.
            let _ = crate::nowait::read_u64_nowait(p.fd);
        }
    }
}

/// The partner side of [`Sidecore::floor_block`].
fn serve_pong(mode: &AtomicU8, pong: &PongLine) {
    let mut k = 0u32;
    loop {
        let v = pong.value.load(Ordering::Acquire);
        if v & 1 == 1 {
            pong.value.store(v + 1, Ordering::Release);
        }
        k = k.wrapping_add(1);
        if k.is_multiple_of(1024) && mode.load(Ordering::Relaxed) != MODE_PONG {
            return;
        }
    }
}
