//! The sidecore thread: pinned to one CPU, it sweeps its rings until told to
//! stop. Its hot loop does not log, allocate or lock: it loads one state word
//! per idle ring, and the only other shared traffic is a heartbeat store every
//! [`HEARTBEAT_SWEEPS`] sweeps and a Relaxed load of the stop flag.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{self, Receiver, Sender};

use crate::pin::{pin_current_thread, PinError};
use crate::ring::RingRef;

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
}

/// How to run a sidecore.
#[derive(Clone, Debug)]
pub struct SidecoreConfig {
    /// The CPU to pin to.
    pub cpu: usize,
    /// Thread name (e.g. `sidecore0`).
    pub name: String,
}

/// Counters of the sidecore thread itself.
#[derive(Default)]
pub struct CoreStats {
    /// Sweeps over all rings (published every [`HEARTBEAT_SWEEPS`]).
    pub sweeps: AtomicU64,
    /// Sweeps that found work.
    pub busy_sweeps: AtomicU64,
    /// Requests served (all rings).
    pub served: AtomicU64,
}

enum Command {
    Add(RingRef),
}

/// A running sidecore.
pub struct Sidecore {
    name: String,
    cpu: usize,
    stop: Arc<AtomicBool>,
    stats: Arc<CoreStats>,
    commands: Sender<Command>,
    thread: Option<JoinHandle<Vec<RingRef>>>,
}

impl Sidecore {
    /// Starts a sidecore serving `rings`; returns once it has pinned itself.
    pub fn spawn(cfg: SidecoreConfig, rings: Vec<RingRef>) -> Result<Sidecore, SidecoreError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(CoreStats::default());
        let (tx, rx) = channel::unbounded();
        let (ready_tx, ready_rx) = channel::bounded::<Result<(), PinError>>(1);
        let (stop2, stats2, cpu) = (stop.clone(), stats.clone(), cfg.cpu);
        let thread = std::thread::Builder::new()
            .name(cfg.name.clone())
            .spawn(move || {
                let pinned = pin_current_thread(cpu);
                let ok = pinned.is_ok();
                let _ = ready_tx.send(pinned);
                if !ok {
                    return rings;
                }
                run(rings, &stop2, &stats2, &rx)
            })
            .map_err(|source| SidecoreError::Spawn { name: cfg.name.clone(), source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                let _ = thread.join();
                return Err(SidecoreError::Pin { name: cfg.name, source });
            }
            Err(_) => return Err(SidecoreError::Died(cfg.name)),
        }
        Ok(Sidecore { name: cfg.name, cpu, stop, stats, commands: tx, thread: Some(thread) })
    }

    /// Adds a ring while running (picked up within [`HEARTBEAT_SWEEPS`] sweeps).
    pub fn add_ring(&self, ring: RingRef) -> Result<(), SidecoreError> {
        self.commands.send(Command::Add(ring)).map_err(|_| SidecoreError::Died(self.name.clone()))
    }

    /// The CPU it is pinned to.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<CoreStats> {
        &self.stats
    }

    /// Stops it after the request in hand (a claimed slot always gets its
    /// reply) and hands back its rings, with their expected tickets, so that
    /// another sidecore can take them over.
    pub fn stop(mut self) -> Result<Vec<RingRef>, SidecoreError> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().ok_or_else(|| SidecoreError::Died(self.name.clone()))?;
        t.join().map_err(|_| SidecoreError::Died(self.name.clone()))
    }
}

impl Drop for Sidecore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut rings: Vec<RingRef>, stop: &AtomicBool, stats: &CoreStats, commands: &Receiver<Command>) -> Vec<RingRef> {
    let (mut sweeps, mut busy, mut served) = (0u64, 0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let mut n = 0;
        for r in rings.iter_mut() {
            n += r.serve();
        }
        sweeps += 1;
        if n > 0 {
            busy += 1;
            served += n as u64;
        }
        if sweeps % HEARTBEAT_SWEEPS == 0 {
            for r in &rings {
                r.region().header().heartbeat.value.fetch_add(1, Ordering::Relaxed);
            }
            stats.sweeps.store(sweeps, Ordering::Relaxed);
            stats.busy_sweeps.store(busy, Ordering::Relaxed);
            stats.served.store(served, Ordering::Relaxed);
            while let Ok(Command::Add(r)) = commands.try_recv() {
                rings.push(r);
            }
        }
    }
    stats.sweeps.store(sweeps, Ordering::Relaxed);
    stats.busy_sweeps.store(busy, Ordering::Relaxed);
    stats.served.store(served, Ordering::Relaxed);
    rings
}
