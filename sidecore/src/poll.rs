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
use crate::ring::{RingRef, MAX_PER_SWEEP};
use crate::tsc::{rdtsc, TscRate};

/// Each VM's time share of a sweep when several VMs share a sidecore: once
/// a VM's requests in this sweep have taken this long, the sweep moves on
/// to the next VM (a VM always gets at least one request a sweep). It bounds
/// what a VM's flood adds to a neighbour's call, whatever its requests
/// cost: about one share per busy VM ahead of it.
pub const VM_QUANTUM: std::time::Duration = std::time::Duration::from_micros(1);

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
/// Asked to answer a guest's floor ping-pong ([`Sidecore::guest_pong`]).
const MODE_GUEST_PONG: u8 = 3;
/// Answering it.
const MODE_GUEST_PONG_ON: u8 = 4;

/// How long an armed guest floor waits for the guest's next odd value
/// before the sidecore goes back to its rings: a guest that stops pinging
/// (or never starts) holds its sidecore this long at most.
pub const GUEST_PONG_IDLE: std::time::Duration = std::time::Duration::from_millis(1);

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
    /// The armed guest floor: `vcpu << 32 | rounds`.
    guest_pong: Arc<AtomicU64>,
    /// Guest floors the thread has taken up, so that an arming that was
    /// served and finished before its caller looked still counts.
    guest_pong_taken: Arc<AtomicU64>,
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
        let guest_pong = Arc::new(AtomicU64::new(0));
        let guest_pong_taken = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(CoreStats::default());
        let (tx, rx) = channel::unbounded();
        let (ready_tx, ready_rx) = channel::bounded::<Result<(), SidecoreError>>(1);
        let (mode2, pong2, stats2, active2, cpu) = (mode.clone(), pong.clone(), stats.clone(), active.clone(), cfg.cpu);
        let (guest_pong2, taken2) = (guest_pong.clone(), guest_pong_taken.clone());
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
                let ctl = Control {
                    mode: &mode2,
                    pong: &pong2,
                    guest_pong: &guest_pong2,
                    guest_pong_taken: &taken2,
                    active: &active2,
                    park: cfg2_park,
                };
                run(parts, &ctl, &stats2, &rx)
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
        Ok(Sidecore {
            name: cfg.name,
            cpu,
            mode,
            pong,
            guest_pong,
            guest_pong_taken,
            active,
            stats,
            commands: tx,
            thread: Some(thread),
        })
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

    /// Arms the guest floor: the sidecore leaves its rings and answers
    /// `rounds` round trips (at most [`shm_proto::bench::BENCH_FLOOR_MAX_ROUNDS`])
    /// on the [`shm_proto::ring::VcpuShared::pong`] line of the ring it serves
    /// for vCPU `vcpu`, then goes back to them; it goes back sooner once
    /// the guest has left it idle for [`GUEST_PONG_IDLE`]. Returns once the
    /// sidecore has taken the request (it may be over already when a short
    /// floor is served before the caller looks): `false` if it serves no ring of that vCPU,
    /// is not serving (stopped, measuring the host floor), or did not take
    /// the request within `wait`. Only the VMM that owns the VM arms it (the
    /// bench's guest asks with a PIO exit); a guest can hold its sidecore
    /// no longer than that.
    pub fn guest_pong(&self, vcpu: u32, rounds: u32, wait: std::time::Duration) -> bool {
        let rounds = rounds.min(shm_proto::bench::BENCH_FLOOR_MAX_ROUNDS);
        if rounds == 0 {
            return false;
        }
        let before = self.guest_pong_taken.load(Ordering::Acquire);
        self.guest_pong.store((u64::from(vcpu) << 32) | u64::from(rounds), Ordering::Relaxed);
        if self.mode.compare_exchange(MODE_SERVE, MODE_GUEST_PONG, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return false;
        }
        let start = std::time::Instant::now();
        while self.mode.load(Ordering::Acquire) == MODE_GUEST_PONG {
            if start.elapsed() >= wait {
                // Not taken in time: withdrawn (unless it is taken just now).
                let _ = self.mode.compare_exchange(MODE_GUEST_PONG, MODE_SERVE, Ordering::AcqRel, Ordering::Relaxed);
                break;
            }
            std::thread::yield_now();
        }
        // Taken (and maybe already over), or refused: it has no such ring.
        self.guest_pong_taken.load(Ordering::Acquire) != before
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
    guest_pong: &'a AtomicU64,
    guest_pong_taken: &'a AtomicU64,
    active: &'a AtomicUsize,
    park: Option<std::time::Duration>,
}

fn run(parts: Parts, ctl: &Control, stats: &CoreStats, commands: &Receiver<Command>) -> Parts {
    let Parts { mut rings, mut devices } = parts;
    let (mut sweeps, mut busy, mut served) = (0u64, 0u64, 0u64);
    let mut idle_since: Option<std::time::Instant> = None;
    let mut parked = false;
    let mut nap = PARK_NAP;
    let mut plan = Plan::group(&mut rings);
    let rate = measure_tsc_rate();
    let quantum = quantum_cycles(rate);
    let idle_cycles = cycles_of(GUEST_PONG_IDLE, rate);
    loop {
        match ctl.mode.load(Ordering::Relaxed) {
            MODE_SERVE => {}
            MODE_PONG => {
                serve_pong(ctl.mode, ctl.pong);
                continue;
            }
            MODE_GUEST_PONG => {
                serve_guest_pong(&rings, ctl, idle_cycles);
                continue;
            }
            _ => break,
        }
        let active = ctl.active.load(Ordering::Relaxed).min(rings.len());
        let mut n = 0;
        if plan.shared {
            n += sweep_shared(&mut rings, &mut plan.groups, active, quantum);
        } else {
            // One VM here: nobody to share with but its own vCPUs.
            for r in rings[..active].iter_mut() {
                n += r.serve();
            }
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
                for d in devices.iter_mut() {
                    d.unpark();
                }
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
                        for d in devices.iter_mut() {
                            d.park();
                        }
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
            let before = rings.len();
            let mut added = false;
            while let Ok(c) = commands.try_recv() {
                take(c, &mut rings, &mut devices);
                added = true;
            }
            // Drop detached VMs' rings (and, with the last one, the mapping).
            rings.retain(|r| !r.control().detached.load(Ordering::Relaxed));
            if added || rings.len() != before {
                plan = Plan::group(&mut rings);
            }
            if added && parked {
                // New devices must know they have to make themselves heard.
                for d in devices.iter_mut() {
                    d.park();
                }
            }
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

/// Which rings are one VM's, so that each VM gets one share of a sweep
/// ([`MAX_PER_SWEEP`] requests over all its rings, within [`VM_QUANTUM`]),
/// not one per ring. Worked out when the ring set changes, never in the
/// sweep.
struct Plan {
    /// Each VM's rings: a run of the (regrouped) ring list.
    groups: Vec<Group>,
    /// Several VMs share this sidecore; else there is nobody to be fair to
    /// and the sweep is the plain loop, [`MAX_PER_SWEEP`] per ring.
    shared: bool,
}

/// One VM's run of rings, `start..end`, and the ring its share starts at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Group {
    start: usize,
    end: usize,
    turn: usize,
}

impl Plan {
    /// Reorders `rings` so that each VM's rings are next to each other (VMs
    /// in the order their first ring came, a VM's rings in their order) and
    /// maps the runs.
    fn group(rings: &mut [RingRef]) -> Plan {
        let mut first: std::collections::HashMap<*const crate::ring::VmControl, usize> =
            std::collections::HashMap::new();
        for (i, r) in rings.iter().enumerate() {
            first.entry(Arc::as_ptr(r.control())).or_insert(i);
        }
        // Stable: a VM's rings keep their order.
        rings.sort_by_key(|r| first.get(&Arc::as_ptr(r.control())).copied().unwrap_or(usize::MAX));
        let mut groups: Vec<Group> = Vec::new();
        for (i, r) in rings.iter().enumerate() {
            let same = i > 0 && Arc::ptr_eq(rings[i - 1].control(), r.control());
            match groups.last_mut() {
                Some(g) if same => g.end = i + 1,
                _ => groups.push(Group { start: i, end: i + 1, turn: 0 }),
            }
        }
        let shared = groups.len() > 1;
        Plan { groups, shared }
    }
}

/// One sweep of the rings `..active` when several VMs share the sidecore:
/// each VM gets at most [`MAX_PER_SWEEP`] requests over all its rings and,
/// past its first, only while its requests of this sweep have taken under
/// `quantum` TSC cycles. The next sweep starts at the ring after the one its
/// share ran out on, so that none of a VM's rings waits behind the others
/// for good.
fn sweep_shared(rings: &mut [RingRef], groups: &mut [Group], active: usize, quantum: u64) -> usize {
    let mut n = 0;
    // The sweep's clock: read here and after each request served, never
    // for an idle ring.
    let mut now = rdtsc();
    for g in groups.iter_mut() {
        if g.start >= active {
            break;
        }
        let end = g.end.min(active);
        let len = end - g.start;
        let start = now;
        if len == 1 {
            // A VM with one ring here (the common case, and every idle VM's
            // cost): no turn to keep.
            n += rings[g.start].serve_for(MAX_PER_SWEEP, start, quantum, &mut now);
            continue;
        }
        let first = if g.turn < len { g.turn } else { 0 };
        let mut left = MAX_PER_SWEEP;
        let mut next = first + 1;
        for i in 0..len {
            let k = if first + i < len { first + i } else { first + i - len };
            left -= rings[g.start + k].serve_for(left, start, quantum, &mut now);
            if left == 0 || now.wrapping_sub(start) >= quantum {
                // The share ran out here: the next sweep starts after.
                next = k + 1;
                break;
            }
        }
        if left < MAX_PER_SWEEP {
            n += MAX_PER_SWEEP - left;
            g.turn = next;
        }
    }
    n
}

/// [`VM_QUANTUM`] in TSC cycles at `rate`.
fn quantum_cycles(rate: TscRate) -> u64 {
    cycles_of(VM_QUANTUM, rate)
}

/// `d` in TSC cycles at `rate`.
fn cycles_of(d: std::time::Duration, rate: TscRate) -> u64 {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    ns.saturating_mul(rate.khz()) / 1_000_000
}

/// The TSC rate measured against the monotonic clock over 200 µs, once
/// per sidecore thread (to within a fraction of a percent, which is plenty
/// for a time share): no `/dev/kvm`, no sysfs.
fn measure_tsc_rate() -> TscRate {
    let over = std::time::Duration::from_micros(200);
    let (t0, c0) = (std::time::Instant::now(), rdtsc());
    let mut t = t0.elapsed();
    while t < over {
        std::hint::spin_loop();
        t = t0.elapsed();
    }
    let cycles = rdtsc().wrapping_sub(c0);
    let us = u64::try_from(t.as_micros()).unwrap_or(u64::MAX).max(1);
    TscRate::from_khz(cycles.saturating_mul(1000) / us)
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

/// The partner side of a guest floor ([`Sidecore::guest_pong`]): answers
/// every odd value on the vCPU's pong line with the next even one, until it
/// has answered the rounds asked for, the guest has been idle for
/// `idle_cycles`, or the sidecore is told to stop. The line is guest
/// memory: any value may appear there, and the only write made is to that
/// line.
fn serve_guest_pong(rings: &[RingRef], ctl: &Control, idle_cycles: u64) {
    let req = ctl.guest_pong.load(Ordering::Relaxed);
    // The two halves of the packed request.
    #[allow(clippy::cast_possible_truncation)]
    let (vcpu, rounds) = ((req >> 32) as u32, req as u32);
    // Only guest_pong writes the request, and it caps the rounds.
    let Some(ring) = rings.iter().find(|r| r.vcpu() == vcpu) else {
        let _ = ctl.mode.compare_exchange(MODE_GUEST_PONG, MODE_SERVE, Ordering::AcqRel, Ordering::Relaxed);
        return;
    };
    if ctl.mode.compare_exchange(MODE_GUEST_PONG, MODE_GUEST_PONG_ON, Ordering::AcqRel, Ordering::Relaxed).is_err() {
        return;
    }
    let line = &ring.pong_line().value;
    // A fresh start, before the arming is acknowledged (the guest pings only
    // after that): an odd value a stopped block left is not taken for a ping.
    line.store(0, Ordering::Relaxed);
    ctl.guest_pong_taken.fetch_add(1, Ordering::Release);
    let (mut answered, mut k) = (0u32, 0u32);
    let mut last = rdtsc();
    while answered < rounds {
        let v = line.load(Ordering::Acquire);
        if v & 1 == 1 {
            line.store(v.wrapping_add(1), Ordering::Release);
            answered += 1;
            k = 0;
            continue;
        }
        k = k.wrapping_add(1);
        if k.is_multiple_of(256) {
            if rdtsc().wrapping_sub(last) > idle_cycles || ctl.mode.load(Ordering::Relaxed) != MODE_GUEST_PONG_ON {
                break;
            }
        } else if k == 1 {
            last = rdtsc();
        }
    }
    let _ = ctl.mode.compare_exchange(MODE_GUEST_PONG_ON, MODE_SERVE, Ordering::AcqRel, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{SharedRegion, VmControl};
    use crate::service::Services;
    use crate::stats::VmStats;
    use proptest::prelude::*;
    use shm_proto::op::{encode_head, Opcode};
    use shm_proto::ring::{slot_index, Body, RING_SLOTS};

    /// A VM with `vcpus` rings, all sharing one control, as the daemon makes them.
    fn vm(id: u64, vcpus: u32) -> (Arc<SharedRegion>, Vec<RingRef>) {
        let region = SharedRegion::alloc(vcpus).unwrap();
        let services = Arc::new(Services::new(Vec::new()));
        let stats = Arc::new(VmStats::default());
        let control = Arc::new(VmControl { id, ..Default::default() });
        let rings = (0..vcpus)
            .map(|v| {
                RingRef::with_control(region.clone(), v, services.clone(), stats.clone(), control.clone()).unwrap()
            })
            .collect();
        (region, rings)
    }

    /// Posts `n` null calls on vCPU `v`'s ring, as a guest would.
    fn flood(region: &SharedRegion, v: u32, n: u64) {
        let vs = region.vcpu(v).unwrap();
        for t in 0..n {
            let body = Body { head: encode_head(Opcode::Null as u16, 0), words: [t, 0, 0, 0, 0, 0] };
            vs.slots[slot_index(t)].post(t, &body);
        }
    }

    fn served_by(rings: &[RingRef], id: u64) -> u64 {
        rings.iter().filter(|r| r.control().id == id).map(RingRef::expected).sum()
    }

    /// Plays the guest of a guest floor: `n` round trips on vCPU `v`'s
    /// pong line; how many were answered within 50 ms each.
    fn ping(region: &SharedRegion, v: u32, n: u32) -> u32 {
        let line = &region.vcpu(v).unwrap().pong.value;
        let mut x = line.load(Ordering::Relaxed) & !1;
        for k in 0..n {
            line.store(x + 1, Ordering::Release);
            let start = std::time::Instant::now();
            while line.load(Ordering::Acquire) != x + 2 {
                if start.elapsed() > std::time::Duration::from_millis(50) {
                    return k;
                }
                std::hint::spin_loop();
            }
            x += 2;
        }
        n
    }

    #[test]
    fn an_armed_guest_floor_answers_its_rounds_then_the_rings_again() {
        // Other tests' sidecores spin on this CPU too: be patient.
        const WAIT: std::time::Duration = std::time::Duration::from_secs(20);
        // Two parties spinning on one CPU do not ping-pong: the guest's side
        // runs on another (the sidecore leaves an idle floor within 1 ms).
        if pin_current_thread(1).is_err() {
            eprintln!("skipped: the guest floor needs a second CPU");
            return;
        }
        let (region, rings) = vm(1, 2);
        let cfg = SidecoreConfig { cpu: 0, name: "pong-test".into(), idle_park: None, on_start: None };
        let sc = Sidecore::spawn(cfg, rings).unwrap();
        // The rings are handed over by command, picked up within a heartbeat.
        let start = std::time::Instant::now();
        while sc.ring_count() < 2 {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "the sidecore never took its rings");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!sc.guest_pong(9, 10, WAIT), "no ring of vCPU 9 here");
        assert!(!sc.guest_pong(1, 0, WAIT), "no rounds");
        // A ping that comes later than GUEST_PONG_IDLE after the arming (this
        // thread shares its CPU with other tests) finds it gone: try again.
        assert!((0..50).any(|_| sc.guest_pong(1, 20, WAIT) && ping(&region, 1, 20) == 20));
        // Done: one more is not answered, the rings are.
        assert_eq!(ping(&region, 1, 1), 0);
        flood(&region, 0, 1);
        let start = std::time::Instant::now();
        while region.vcpu(0).unwrap().slots[0].poll_reply(0).is_none() {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "the rings are not served after the floor");
            std::hint::spin_loop();
        }
        // A guest that never pings holds the sidecore GUEST_PONG_IDLE only.
        assert!(sc.guest_pong(1, 1000, WAIT));
        std::thread::sleep(GUEST_PONG_IDLE * 20);
        assert_eq!(ping(&region, 1, 1), 0, "the sidecore left an idle floor");
        flood(&region, 1, 1);
        let start = std::time::Instant::now();
        while region.vcpu(1).unwrap().slots[0].poll_reply(0).is_none() {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "an idle floor kept the sidecore");
            std::hint::spin_loop();
        }
        sc.stop().unwrap();
    }

    #[test]
    fn a_vm_with_many_rings_gets_one_share_of_a_sweep() {
        // VM 1 (8 vCPUs) floods every ring; VM 2 (1 vCPU) floods its one.
        // Per ring, VM 1 would get 8 shares to VM 2's one.
        let (big_region, big) = vm(1, 8);
        let (small_region, small) = vm(2, 1);
        for v in 0..8 {
            flood(&big_region, v, RING_SLOTS as u64);
        }
        flood(&small_region, 0, RING_SLOTS as u64);
        let mut rings: Vec<RingRef> = big.into_iter().chain(small).collect();
        let mut plan = Plan::group(&mut rings);
        assert!(plan.shared);
        let all = rings.len();
        let n = sweep_shared(&mut rings, &mut plan.groups, all, u64::MAX);
        assert_eq!(n, 2 * MAX_PER_SWEEP);
        assert_eq!(served_by(&rings, 1), MAX_PER_SWEEP as u64);
        assert_eq!(served_by(&rings, 2), MAX_PER_SWEEP as u64);
        // Round after round, the shares stay equal until the small VM is done.
        for _ in 1..RING_SLOTS / MAX_PER_SWEEP {
            sweep_shared(&mut rings, &mut plan.groups, all, u64::MAX);
        }
        assert_eq!(served_by(&rings, 2), RING_SLOTS as u64);
        assert_eq!(served_by(&rings, 1), RING_SLOTS as u64);
        // The share moves round the big VM's rings: in as many sweeps as it
        // has rings, every one of them is served once.
        for _ in RING_SLOTS / MAX_PER_SWEEP..8 {
            assert_eq!(sweep_shared(&mut rings, &mut plan.groups, all, u64::MAX), MAX_PER_SWEEP);
        }
        assert!(
            rings.iter().filter(|r| r.control().id == 1).all(|r| r.expected() == MAX_PER_SWEEP as u64),
            "no ring of a VM waits for good"
        );
        while served_by(&rings, 1) < 8 * RING_SLOTS as u64 {
            assert_eq!(sweep_shared(&mut rings, &mut plan.groups, all, u64::MAX), MAX_PER_SWEEP);
        }
        assert_eq!(sweep_shared(&mut rings, &mut plan.groups, all, u64::MAX), 0);
    }

    #[test]
    fn one_vm_alone_keeps_the_plain_sweep_and_two_share() {
        let (_a, a) = vm(1, 4);
        let mut alone = a;
        let plan = Plan::group(&mut alone);
        assert!(!plan.shared, "one VM, however many rings: per-ring shares");
        assert_eq!(plan.groups.len(), 1);
        let (_b, b) = vm(2, 1);
        let (_c, c) = vm(3, 1);
        let mut two: Vec<RingRef> = b.into_iter().chain(c).collect();
        let plan = Plan::group(&mut two);
        assert!(plan.shared, "two VMs, one ring each: per-VM shares");
        assert_eq!(plan.groups.len(), 2);
    }

    #[test]
    fn a_vm_whose_time_share_ran_out_yields_after_one_request() {
        // A quantum already spent after one request: every VM gets exactly
        // one request a sweep, however much it has posted, and the share
        // still moves round its rings.
        let (big_region, big) = vm(1, 3);
        let (small_region, small) = vm(2, 1);
        for v in 0..3 {
            flood(&big_region, v, 8);
        }
        flood(&small_region, 0, 8);
        let mut rings: Vec<RingRef> = big.into_iter().chain(small).collect();
        let mut plan = Plan::group(&mut rings);
        for sweep in 1..=3u64 {
            assert_eq!(sweep_shared(&mut rings, &mut plan.groups, 4, 0), 2);
            assert_eq!(served_by(&rings, 1), sweep);
            assert_eq!(served_by(&rings, 2), sweep);
        }
        assert!(rings[..3].iter().all(|r| r.expected() == 1), "one request on each of the big VM's rings");
    }

    #[test]
    fn the_quantum_is_the_share_in_tsc_cycles() {
        assert_eq!(quantum_cycles(TscRate::from_khz(2_500_000)), 2_500);
        let measured = measure_tsc_rate().khz();
        assert!(measured > 100_000, "a TSC of {measured} kHz: the measurement is broken");
    }

    #[test]
    fn only_the_active_rings_are_swept() {
        let (region, a) = vm(1, 4);
        for v in 0..4 {
            flood(&region, v, 4);
        }
        let mut rings = a;
        let mut plan = Plan::group(&mut rings);
        assert_eq!(sweep_shared(&mut rings, &mut plan.groups, 2, u64::MAX), 8);
        assert_eq!(rings[2].expected() + rings[3].expected(), 0);
    }

    proptest! {
        /// Grouping keeps every ring, puts each VM's rings in one run in
        /// their order, and orders VMs by their first ring.
        #[test]
        fn grouping_is_a_stable_partition(owners in proptest::collection::vec(0u64..5, 0..24)) {
            let controls: Vec<Arc<VmControl>> = (0..5).map(|id| Arc::new(VmControl { id, ..Default::default() })).collect();
            let region = SharedRegion::alloc(24).unwrap();
            let services = Arc::new(Services::new(Vec::new()));
            let stats = Arc::new(VmStats::default());
            let mut rings: Vec<RingRef> = (0u32..)
                .zip(owners.iter())
                .map(|(v, &o)| {
                    let c = controls.iter().find(|c| c.id == o).unwrap().clone();
                    RingRef::with_control(region.clone(), v, services.clone(), stats.clone(), c).unwrap()
                })
                .collect();
            let plan = Plan::group(&mut rings);
            let mut order: Vec<u64> = Vec::new();
            for &o in &owners {
                if !order.contains(&o) {
                    order.push(o);
                }
            }
            let expect: Vec<(u64, u32)> = order
                .iter()
                .flat_map(|&o| (0u32..).zip(owners.iter()).filter(move |(_, &x)| x == o).map(move |(v, _)| (o, v)))
                .collect();
            let got: Vec<(u64, u32)> = rings.iter().map(|r| (r.control().id, r.vcpu())).collect();
            prop_assert_eq!(got, expect);
            prop_assert_eq!(plan.groups.len(), order.len());
            let mut at = 0;
            for g in &plan.groups {
                prop_assert_eq!(g.start, at);
                prop_assert!(g.end > g.start);
                prop_assert!(rings[g.start..g.end].iter().all(|r| Arc::ptr_eq(r.control(), rings[g.start].control())));
                at = g.end;
            }
            prop_assert_eq!(at, rings.len());
            prop_assert_eq!(plan.shared, plan.groups.len() > 1);
        }
    }
}
