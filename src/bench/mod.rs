//! `sidecore bench`: the guest times null calls, CPUID, page-table maps and
//! page faults on every path; the host merges the samples into HDR
//! histograms, measures the floor (a cache-line ping-pong between host
//! threads on the same two CPUs) in blocks interleaved with the sidecall
//! blocks, and reports percentiles and ratios measured in the same run.

pub mod compare;
pub mod example_block;
pub mod histogram_codec;
pub mod phases;
pub mod plot;
pub mod provenance;
pub mod selection;
pub mod vhost_blk;

use std::collections::BTreeMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use shm_proto::bench::{BenchOp, BenchPath, BENCH_BLOCK_SAMPLES};
use sidecore_core::tsc::TscRate;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use provenance::Provenance;

/// The bench JSON's `schema`. Version 2 added `schema`, `provenance`, and
/// each series' histogram (`histogram`, `floor_histogram`: base64 of
/// HdrHistogram's compressed V2 encoding, values in TSC cycles); files
/// without `schema` are version 1, which `--compare` cannot read.
pub const SCHEMA: &str = "sidecore-bench/2";

/// Reading a block or measuring the floor failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The guest announced a block the host cannot use.
    #[error("vCPU {vcpu}: bad benchmark block: {what}")]
    BadBlock {
        /// vCPU.
        vcpu: u32,
        /// What is wrong.
        what: String,
    },
}

/// Samples of one series, in TSC cycles.
struct Series {
    hist: Histogram<u64>,
    fallbacks: u64,
}

impl Series {
    fn new() -> Series {
        // 3 significant digits, auto-resizing: any latency fits.
        let mut hist = Histogram::new(3).unwrap_or_else(|_| unreachable_hist());
        hist.auto(true);
        Series { hist, fallbacks: 0 }
    }
}

fn unreachable_hist() -> Histogram<u64> {
    // Histogram::new(3) only fails for sigfig > 5; keep a usable fallback.
    Histogram::new_with_bounds(1, u64::MAX / 2, 2).unwrap_or_else(|_| Histogram::new(1).expect("sigfig 1 is valid"))
}

/// Collects what the guest hands over during a run.
/// A series: op, path label (`sidecall+64idle` for blocks measured with
/// idle rings in the sweep), vCPU (`None`: all vCPUs together).
type Key = (BenchOp, String, Option<u32>);

/// What the collector needs of a VM's sidecores to interleave floor blocks
/// with its sidecall blocks (the VMM's `SidecoreSet` implements it).
pub trait FloorProbe: Sync {
    /// CPUs the sidecores run on.
    fn cpus(&self) -> &[usize];
    /// Measures `samples.len()` floor round trips with sidecore 0; false if
    /// none is running.
    fn floor_block(&self, samples: &mut [u64]) -> bool;
    /// Sweeps the idle benchmark rings (`on`) or only the VM's own.
    fn set_idle_rings(&self, on: bool);
    /// Arms the sidecore serving vCPU `vcpu` for `rounds` guest floor round
    /// trips; false if none took it.
    fn guest_pong(&self, vcpu: u32, rounds: u32) -> bool;
}

pub struct BenchCollector {
    series: Mutex<BTreeMap<Key, Series>>,
    /// Per-vCPU series too (more than one vCPU).
    per_vcpu: bool,
    /// Idle rings the sidecore sweeps in every other sidecall block.
    idle_rings: u32,
    idle_on: std::sync::atomic::AtomicBool,
    floor: Mutex<(Series, Vec<u64>)>,
    /// The floor blocks interleaved with each op's sidecall blocks: the
    /// sidecall/floor ratio of an op uses the floor measured beside it.
    floor_by_op: Mutex<BTreeMap<BenchOp, Series>>,
    /// Series the host timed itself (`irq`, `echo`): op, path, samples.
    host_series: Mutex<Vec<(String, String, Series)>>,
    /// The floor measured beside each host-timed op.
    host_floor: Mutex<BTreeMap<String, Series>>,
    tsc: TscRate,
    progress: Option<ProgressFn>,
}

/// One block taken, for a progress display: vCPU, op, path label (with
/// `+Ridle` for blocks with idle rings), samples in the series so far, and
/// samples in this block.
#[derive(Clone, Copy, Debug)]
pub struct BlockProgress<'a> {
    /// The vCPU that timed it.
    pub vcpu: u32,
    /// Its op.
    pub op: BenchOp,
    /// Its path's label.
    pub label: &'a str,
    /// Samples of the series so far.
    pub total: u64,
    /// Samples of this block.
    pub block: u64,
}

/// Called after each block (on the vCPU's thread).
pub type ProgressFn = Box<dyn Fn(BlockProgress<'_>) + Send + Sync>;

impl BenchCollector {
    /// A collector; `progress` is told of every block.
    pub fn new(tsc_khz: u64, progress: Option<ProgressFn>) -> BenchCollector {
        BenchCollector::with_options(tsc_khz, progress, false, 0)
    }

    /// A collector that also keeps per-vCPU series, and alternates sidecall
    /// blocks with and without `idle_rings` idle rings in the sweep.
    pub fn with_options(tsc_khz: u64, progress: Option<ProgressFn>, per_vcpu: bool, idle_rings: u32) -> BenchCollector {
        BenchCollector {
            series: Mutex::new(BTreeMap::new()),
            per_vcpu,
            idle_rings,
            idle_on: std::sync::atomic::AtomicBool::new(false),
            floor: Mutex::new((Series::new(), Vec::new())),
            floor_by_op: Mutex::new(BTreeMap::new()),
            host_series: Mutex::new(Vec::new()),
            host_floor: Mutex::new(BTreeMap::new()),
            tsc: TscRate::from_khz(tsc_khz),
            progress,
        }
    }

    /// Adds a series the host timed itself (op `irq` or `echo`), in TSC
    /// cycles.
    pub fn add_host_series(&self, op: &str, path: &str, cycles: &[u64]) {
        let mut s = Series::new();
        for &c in cycles {
            let _ = s.hist.record(c.max(1));
        }
        if let Ok(mut v) = self.host_series.lock() {
            v.push((op.to_string(), path.to_string(), s));
        }
    }

    /// Adds floor samples measured beside host-timed op `op` (they count in
    /// the run's floor too).
    pub fn add_host_floor(&self, op: &str, cycles: &[u64]) {
        if let Ok(mut m) = self.host_floor.lock() {
            let s = m.entry(op.to_string()).or_insert_with(Series::new);
            for &c in cycles {
                let _ = s.hist.record(c.max(1));
            }
        }
        if let Ok(mut f) = self.floor.lock() {
            for &c in cycles {
                let _ = f.0.hist.record(c.max(1));
            }
            let mut sorted = cycles.to_vec();
            sorted.sort_unstable();
            if let Some(m) = sorted.get(sorted.len() / 2) {
                f.1.push(*m);
            }
        }
    }

    /// The guest asks for a block of guest floor round trips (its block at
    /// `gpa` says how many): arms the sidecore serving it, and writes back
    /// in the block's `count` how many it armed (0: none, and the guest
    /// measures no guest floor this time).
    pub fn arm_guest_floor(
        &self,
        vcpu: u32,
        mem: &GuestMemoryMmap,
        gpa: u64,
        sidecores: Option<&dyn FloorProbe>,
    ) -> Result<(), BenchError> {
        let bad = |what: String| BenchError::BadBlock { vcpu, what };
        let count = mem.read_obj::<u32>(GuestAddress(gpa + 8)).map_err(|e| bad(e.to_string()))?;
        let rounds = count.min(shm_proto::bench::BENCH_FLOOR_MAX_ROUNDS);
        // Two spinning parties on one CPU measure the scheduler: no guest
        // floor for a vCPU that shares a sidecore's CPU.
        let cpu = sidecore_core::pin::current_cpu();
        let armed = match sidecores {
            Some(set) if cpu.is_some_and(|c| !set.cpus().contains(&c)) && set.guest_pong(vcpu, rounds) => rounds,
            _ => 0,
        };
        mem.write_obj::<u32>(armed, GuestAddress(gpa + 8)).map_err(|e| bad(e.to_string()))
    }

    /// Takes the block vCPU `vcpu` announced at `gpa`; after a sidecall
    /// block, measures as many floor samples on this (the vCPU's) thread.
    pub fn on_block(
        &self,
        vcpu: u32,
        mem: &GuestMemoryMmap,
        gpa: u64,
        sidecores: Option<&dyn FloorProbe>,
    ) -> Result<(), BenchError> {
        let bad = |what: String| BenchError::BadBlock { vcpu, what };
        let word = |off: u64| mem.read_obj::<u32>(GuestAddress(gpa + off)).map_err(|e| bad(e.to_string()));
        let (op, path, count, fallbacks) = (word(0)?, word(4)?, word(8)?, word(12)?);
        let op = BenchOp::from_u32(op).ok_or_else(|| bad(format!("op {op}")))?;
        let path = BenchPath::from_u32(path).ok_or_else(|| bad(format!("path {path}")))?;
        let n = usize::try_from(count)
            .ok()
            .filter(|n| *n <= BENCH_BLOCK_SAMPLES)
            .ok_or_else(|| bad(format!("count {count}")))?;
        let mut raw = vec![0u8; n * 8];
        mem.read_slice(&mut raw, GuestAddress(gpa + 64)).map_err(|e| bad(e.to_string()))?;
        let idle_on = self.idle_on.load(std::sync::atomic::Ordering::Relaxed);
        let label = if path == BenchPath::Sidecall && idle_on {
            format!("sidecall+{}idle", self.idle_rings)
        } else {
            path.name().to_string()
        };
        let total = {
            let mut m = self.series.lock().map_err(|_| bad("collector poisoned".into()))?;
            let mut keys = vec![(op, label.clone(), None)];
            if self.per_vcpu {
                keys.push((op, label.clone(), Some(vcpu)));
            }
            let mut total = 0;
            for key in keys {
                let s = m.entry(key).or_insert_with(Series::new);
                for c in raw.chunks_exact(8) {
                    let v = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
                    let _ = s.hist.record(v.max(1));
                }
                s.fallbacks = s.fallbacks.saturating_add(u64::from(fallbacks));
                total = total.max(s.hist.len());
            }
            total
        };
        if path == BenchPath::Sidecall {
            if let Some(set) = sidecores {
                let mut floor = vec![0u64; n];
                // A fresh host thread on this CPU, not the vCPU thread itself:
                // right after KVM_RUN the vCPU thread measures about twice the
                // round trip a plain thread does on PVM (seen here).
                let cpu = sidecore_core::pin::current_cpu();
                // Two spinning threads on one CPU measure the scheduler, not a
                // cache line: no floor for a vCPU that shares the sidecore's CPU.
                let shared_cpu = cpu.is_some_and(|c| set.cpus().contains(&c));
                let ok = !shared_cpu
                    && std::thread::scope(|sc| {
                        sc.spawn(|| {
                            if let Some(c) = cpu {
                                let _ = sidecore_core::pin::pin_current_thread(c);
                            }
                            set.floor_block(&mut floor)
                        })
                        .join()
                        .unwrap_or(false)
                    });
                if self.idle_rings > 0 {
                    self.idle_on.store(!idle_on, std::sync::atomic::Ordering::Relaxed);
                    set.set_idle_rings(!idle_on);
                }
                if ok && !idle_on {
                    let mut f = self.floor.lock().map_err(|_| bad("collector poisoned".into()))?;
                    let mut sorted = floor.clone();
                    sorted.sort_unstable();
                    if let Some(m) = sorted.get(sorted.len() / 2) {
                        f.1.push(*m);
                    }
                    let mut by_op = self.floor_by_op.lock().map_err(|_| bad("collector poisoned".into()))?;
                    let per_op = by_op.entry(op).or_insert_with(Series::new);
                    for v in floor {
                        let _ = f.0.hist.record(v.max(1));
                        let _ = per_op.hist.record(v.max(1));
                    }
                }
            }
        }
        if let Some(p) = &self.progress {
            p(BlockProgress { vcpu, op, label: &label, total, block: n as u64 });
        }
        Ok(())
    }

    fn ns(&self, cycles: u64) -> f64 {
        self.tsc.ns(cycles)
    }

    fn stat(&self, h: &Histogram<u64>) -> Stat {
        Stat {
            p50_ns: self.ns(h.value_at_quantile(0.5)),
            p90_ns: self.ns(h.value_at_quantile(0.9)),
            p99_ns: self.ns(h.value_at_quantile(0.99)),
            p999_ns: self.ns(h.value_at_quantile(0.999)),
            max_ns: self.ns(h.max()),
            samples: h.len(),
            p50_cycles: h.value_at_quantile(0.5),
        }
    }

    /// CDF points (ns, fraction) of a histogram, for the plot.
    fn cdf(&self, h: &Histogram<u64>) -> Vec<(f64, f64)> {
        h.iter_quantiles(16).map(|v| (self.ns(v.value_iterated_to()), v.quantile_iterated_to())).collect()
    }

    /// `h` for the JSON; empty (and a warning) in the unlikely case the
    /// encoder fails, which `--compare` then reports for that series.
    fn encoded(h: &Histogram<u64>) -> String {
        histogram_codec::encode(h).unwrap_or_else(|e| {
            tracing::warn!("bench: {}", crate::error_chain(&e));
            String::new()
        })
    }

    /// The report of everything collected.
    pub fn report(&self, header: ReportHeader) -> BenchReport {
        let series = self.series.lock().map(|m| {
            m.iter()
                .map(|((op, path, vcpu), s)| {
                    let hist = Self::encoded(&s.hist);
                    (*op, path.clone(), *vcpu, self.stat(&s.hist), s.fallbacks, self.cdf(&s.hist), hist)
                })
                .collect::<Vec<_>>()
        });
        let series = series.unwrap_or_default();
        let (floor, floor_cdf, blocks, floor_histogram) = match self.floor.lock() {
            Ok(f) => (
                self.stat(&f.0.hist),
                self.cdf(&f.0.hist),
                f.1.iter().map(|c| self.ns(*c)).collect::<Vec<_>>(),
                Self::encoded(&f.0.hist),
            ),
            Err(_) => (Stat::default(), Vec::new(), Vec::new(), String::new()),
        };
        let mut levels: BTreeMap<&'static str, usize> = BTreeMap::new();
        for b in &blocks {
            *levels.entry(floor_level(*b)).or_default() += 1;
        }
        let mut results = Vec::new();
        let mut curves = Vec::new();
        // Aggregate rows first, in op and path order, then per-vCPU rows.
        let mut order: Vec<_> = series.iter().collect();
        order.sort_by_key(|(op, path, vcpu, ..)| (vcpu.is_some(), *vcpu, *op, path_rank(path), path.clone()));
        for (op, path, vcpu, stat, fallbacks, cdf, hist) in order {
            results.push(ResultRow {
                op: op.name().into(),
                path: path.clone(),
                vcpu: *vcpu,
                stat: stat.clone(),
                fallbacks: *fallbacks,
                histogram: hist.clone(),
            });
            if vcpu.is_none() {
                curves.push((format!("{} {}", op.name(), path), cdf.clone()));
            }
        }
        if let Ok(host) = self.host_series.lock() {
            let mut host: Vec<_> = host.iter().collect();
            host.sort_by_key(|(op, path, _)| (op.clone(), path_rank(path)));
            for (op, path, s) in host {
                results.push(ResultRow {
                    op: op.clone(),
                    path: path.clone(),
                    vcpu: None,
                    stat: self.stat(&s.hist),
                    fallbacks: 0,
                    histogram: Self::encoded(&s.hist),
                });
                curves.push((format!("{op} {path}"), self.cdf(&s.hist)));
            }
        }
        if floor.samples > 0 {
            curves.push(("floor (host ping-pong)".into(), floor_cdf));
        }
        let mut floor_by_op: BTreeMap<String, Stat> = self
            .floor_by_op
            .lock()
            .map(|m| m.iter().map(|(op, s)| (op.name().to_string(), self.stat(&s.hist))).collect())
            .unwrap_or_default();
        if let Ok(m) = self.host_floor.lock() {
            floor_by_op.extend(m.iter().map(|(op, s)| (op.clone(), self.stat(&s.hist))));
        }
        let ratios = ratios(&results, &floor_by_op);
        let provenance = Provenance::collect(
            &header.backend,
            self.tsc.khz(),
            header.sidecore_cpu,
            &header.vcpu_cpus,
            header.timing_representative,
        );
        BenchReport {
            schema: SCHEMA.into(),
            provenance,
            backend: header.backend,
            tsc_khz: self.tsc.khz(),
            vcpu_cpu: header.vcpu_cpu,
            vcpu_cpus: header.vcpu_cpus,
            sidecore_cpu: header.sidecore_cpu,
            timing_representative: header.timing_representative,
            execution: header.execution,
            floor_level: if floor.samples > 0 { floor_level(floor.p50_ns).into() } else { "none".into() },
            floor_blocks_by_level: levels.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            floor,
            floor_histogram,
            floor_by_op,
            results,
            ratios,
            curves,
        }
    }
}

/// The level of the floor a latency belongs to (the outer hypervisor moves
/// this machine's CPUs between three: ~60, ~120 and ~530 ns).
pub fn floor_level(p50_ns: f64) -> &'static str {
    if p50_ns < 90.0 {
        "fast"
    } else if p50_ns < 300.0 {
        "middle"
    } else {
        "slow"
    }
}

/// Percentiles of one series.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stat {
    /// Median.
    pub p50_ns: f64,
    /// 90th percentile.
    pub p90_ns: f64,
    /// 99th percentile.
    pub p99_ns: f64,
    /// 99.9th percentile.
    pub p999_ns: f64,
    /// Largest sample.
    pub max_ns: f64,
    /// Number of samples.
    pub samples: u64,
    /// Median in TSC cycles.
    pub p50_cycles: u64,
}

/// One (op, path) row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResultRow {
    /// Op name.
    pub op: String,
    /// Path name (`sidecall+Nidle`: sidecall blocks measured with N idle
    /// rings in the sidecore's sweep).
    pub path: String,
    /// The vCPU (absent: all vCPUs together).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    /// Its percentiles.
    #[serde(flatten)]
    pub stat: Stat,
    /// Sidecalls that fell back to the exit path (counted in the samples).
    pub fallbacks: u64,
    /// Every sample, in TSC cycles ([`histogram_codec`]).
    pub histogram: String,
}

/// A ratio of medians measured in the same run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ratio {
    /// Op name.
    pub op: String,
    /// `sidecall/floor`, `kernel/sidecall` (speed-up), `user/sidecall`.
    pub name: String,
    /// The value.
    pub value: f64,
}

/// What the run was.
pub struct ReportHeader {
    /// Backend name.
    pub backend: String,
    /// vCPU 0's CPU.
    pub vcpu_cpu: usize,
    /// Every vCPU's CPU.
    pub vcpu_cpus: Vec<usize>,
    /// Sidecore CPU.
    pub sidecore_cpu: usize,
    /// Whether guests ran natively, so that the figures mean something.
    pub timing_representative: bool,
    /// How guests executed ([`crate::scenarios::info::Execution::describe`]).
    pub execution: String,
}

/// The whole report (the JSON file).
#[derive(Debug, Serialize, Deserialize)]
pub struct BenchReport {
    /// [`SCHEMA`].
    pub schema: String,
    /// Where, when and by what build it was measured.
    pub provenance: Provenance,
    /// Backend.
    pub backend: String,
    /// TSC frequency used for ns.
    pub tsc_khz: u64,
    /// vCPU 0's CPU.
    pub vcpu_cpu: usize,
    /// Every vCPU's CPU.
    pub vcpu_cpus: Vec<usize>,
    /// Sidecore CPU.
    pub sidecore_cpu: usize,
    /// False when guests did not run natively (an emulated host such as
    /// the AMD-V bed, or KVM emulating every instruction): then no figure
    /// of the run is representative of anything.
    pub timing_representative: bool,
    /// How guests executed, in words.
    pub execution: String,
    /// The floor.
    pub floor: Stat,
    /// The floor's samples, in TSC cycles ([`histogram_codec`]; empty when
    /// no floor was measured).
    pub floor_histogram: String,
    /// The floor's level in this run (by its p50).
    pub floor_level: String,
    /// How many floor blocks fell into each level (the level can change
    /// within a run).
    pub floor_blocks_by_level: Vec<(String, usize)>,
    /// The floor blocks interleaved with each op's sidecall blocks.
    pub floor_by_op: BTreeMap<String, Stat>,
    /// One row per (op, path).
    pub results: Vec<ResultRow>,
    /// Ratios of medians.
    pub ratios: Vec<Ratio>,
    /// CDFs for the plot.
    #[serde(skip, default)]
    pub curves: Vec<(String, Vec<(f64, f64)>)>,
}

fn path_rank(p: &str) -> usize {
    BenchPath::ALL.iter().position(|x| x.name() == p).unwrap_or(BenchPath::ALL.len())
}

/// The floor on its own: `n` cache-line round trips between a thread pinned
/// to `other_cpu` and an idle sidecore pinned to `side_cpu`, in TSC cycles.
pub fn measure_floor(side_cpu: usize, other_cpu: usize, n: usize) -> Result<Vec<u64>, String> {
    let sc = sidecore_core::Sidecore::spawn(
        sidecore_core::SidecoreConfig { cpu: side_cpu, name: "sidecore-floor".into(), idle_park: None, on_start: None },
        Vec::new(),
    )
    .map_err(|e| crate::error_chain(&e))?;
    let mut samples = vec![0u64; n];
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = sidecore_core::pin::pin_current_thread(other_cpu);
            for chunk in samples.chunks_mut(1000) {
                sc.floor_block(chunk);
            }
        });
    });
    Ok(samples)
}

fn ratios(results: &[ResultRow], floor_by_op: &BTreeMap<String, Stat>) -> Vec<Ratio> {
    let mut out = Vec::new();
    let results: Vec<&ResultRow> = results.iter().filter(|r| r.vcpu.is_none()).collect();
    for side in results.iter().filter(|r| r.path == "sidecall") {
        let s = side.stat.p50_ns;
        if s <= 0.0 {
            continue;
        }
        if let Some(floor) = floor_by_op.get(&side.op).filter(|f| f.samples > 0 && f.p50_ns > 0.0) {
            out.push(Ratio { op: side.op.clone(), name: "sidecall/floor".into(), value: s / floor.p50_ns });
        }
        let guest_floor = BenchPath::GuestFloor.name();
        if let Some(g) = results.iter().find(|r| r.op == side.op && r.path == guest_floor && r.stat.p50_ns > 0.0) {
            out.push(Ratio { op: side.op.clone(), name: "sidecall/guest-floor".into(), value: s / g.stat.p50_ns });
        }
        for other in results.iter().filter(|r| r.op == side.op && r.path != "sidecall" && r.path != guest_floor) {
            out.push(Ratio {
                op: side.op.clone(),
                name: format!("{}/sidecall", other.path),
                value: other.stat.p50_ns / s,
            });
        }
    }
    out
}

impl BenchReport {
    /// The table for stdout.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "sidecore bench — backend {}, TSC {} kHz ({:.3} GHz), vCPU{} on CPU {}, sidecore on CPU {}\n",
            self.backend,
            self.tsc_khz,
            TscRate::from_khz(self.tsc_khz).ghz(),
            if self.vcpu_cpus.len() > 1 { "s" } else { "" },
            self.vcpu_cpus.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            self.sidecore_cpu
        );
        if !self.timing_representative {
            s += &format!(
                "NOT REPRESENTATIVE: guests did not run natively ({}); use these figures for nothing but correctness\n",
                self.execution
            );
        }
        if self.floor.samples > 0 {
            let levels: Vec<String> = self.floor_blocks_by_level.iter().map(|(l, n)| format!("{l} {n}")).collect();
            s += &format!(
                "floor (host<->host cache-line ping-pong, interleaved): p50 {:.0} ns — {} level; blocks by level: {}\n",
                self.floor.p50_ns,
                self.floor_level,
                levels.join(", ")
            );
        }
        s += &format!(
            "\n{:<18} {:<17} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8} {:>9}\n",
            "op", "path", "p50 ns", "p90 ns", "p99 ns", "p99.9 ns", "max ns", "p50 cyc", "samples", "fallback"
        );
        let rows = self.results.iter().map(|r| {
            let path = match r.vcpu {
                Some(v) => format!("{} v{v}", r.path),
                None => r.path.clone(),
            };
            (r.op.as_str(), path, &r.stat, r.fallbacks)
        });
        let floor = (self.floor.samples > 0).then(|| ("floor", "host".to_string(), &self.floor, 0));
        for (op, path, st, fb) in rows.chain(floor) {
            s += &format!(
                "{:<18} {:<17} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>9} {:>8} {:>9}\n",
                op, path, st.p50_ns, st.p90_ns, st.p99_ns, st.p999_ns, st.max_ns, st.p50_cycles, st.samples, fb
            );
        }
        if !self.ratios.is_empty() {
            s += "\nratios of medians, same run (x/sidecall = sidecall speed-up):\n";
            let mut by_op: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for r in &self.ratios {
                by_op.entry(r.op.as_str()).or_default().push(format!("{} {:.2}", r.name, r.value));
            }
            for (op, rs) in by_op {
                let floor =
                    self.floor_by_op.get(op).map(|f| format!("  (host floor beside it: p50 {:.0} ns)", f.p50_ns));
                s += &format!("  {:<18} {}{}\n", op, rs.join("   "), floor.unwrap_or_default());
            }
        }
        s
    }
}

/// Reading a bench result file failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Failed to read the file.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{} is not JSON (not a `sidecore bench --json` result)", path.display())]
    Json {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// JSON, but not a bench result.
    #[error("{} is not a sidecore bench result (it has no \"schema\": \"{SCHEMA}\")", path.display())]
    NotBench {
        /// The file.
        path: std::path::PathBuf,
    },
    /// A bench result of another schema.
    #[error(
        "{} is a sidecore bench result of schema {found}; this build reads {SCHEMA}: re-run `sidecore bench --json` with it",
        path.display()
    )]
    Schema {
        /// The file.
        path: std::path::PathBuf,
        /// Its schema (`sidecore-bench/1` for files without one).
        found: String,
    },
    /// The schema is right but a field is wrong.
    #[error("{} says it is {SCHEMA} but does not match it", path.display())]
    Malformed {
        /// The file.
        path: std::path::PathBuf,
        /// Which field.
        #[source]
        source: serde_json::Error,
    },
}

impl BenchReport {
    /// Parses a `sidecore bench --json` result of the current [`SCHEMA`]
    /// (`path` names it in errors).
    pub fn from_json(path: &std::path::Path, text: &str) -> Result<BenchReport, LoadError> {
        let path_buf = || path.to_path_buf();
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|source| LoadError::Json { path: path_buf(), source })?;
        match v.get("schema").and_then(serde_json::Value::as_str) {
            Some(SCHEMA) => {}
            Some(found) if found.starts_with("sidecore-bench/") => {
                return Err(LoadError::Schema { path: path_buf(), found: found.into() })
            }
            // Schema 1 had none, but had these.
            None if v.get("results").is_some() && v.get("floor").is_some() && v.get("tsc_khz").is_some() => {
                return Err(LoadError::Schema { path: path_buf(), found: "sidecore-bench/1".into() })
            }
            _ => return Err(LoadError::NotBench { path: path_buf() }),
        }
        serde_json::from_value(v).map_err(|source| LoadError::Malformed { path: path_buf(), source })
    }

    /// Reads and parses a bench result file.
    pub fn load(path: &std::path::Path) -> Result<BenchReport, LoadError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
        BenchReport::from_json(path, &text)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    fn row(op: &str, path: &str, p50: f64) -> ResultRow {
        ResultRow {
            op: op.into(),
            path: path.into(),
            vcpu: None,
            stat: Stat { p50_ns: p50, samples: 10, ..Default::default() },
            fallbacks: 0,
            histogram: String::new(),
        }
    }

    #[test]
    fn ratios_compare_medians_of_the_same_op() {
        let results = vec![
            row("null", "kernel", 1200.0),
            row("null", "user", 25000.0),
            row("null", "sidecall", 100.0),
            row("pte", "user", 30000.0),
        ];
        let floor = Stat { p50_ns: 50.0, samples: 10, ..Default::default() };
        let r = ratios(&results, &BTreeMap::from([("null".to_string(), floor)]));
        let get = |name: &str| r.iter().find(|x| x.op == "null" && x.name == name).map(|x| x.value);
        assert_eq!(get("sidecall/floor"), Some(2.0));
        assert_eq!(get("kernel/sidecall"), Some(12.0));
        assert_eq!(get("user/sidecall"), Some(250.0));
        assert!(r.iter().all(|x| x.op == "null"), "pte has no sidecall row");
    }

    #[test]
    fn floor_levels() {
        assert_eq!(floor_level(60.0), "fast");
        assert_eq!(floor_level(120.0), "middle");
        assert_eq!(floor_level(530.0), "slow");
    }

    /// A native PVM run on CPUs 0 and 1.
    fn header() -> ReportHeader {
        ReportHeader {
            backend: "pvm".into(),
            vcpu_cpu: 1,
            vcpu_cpus: vec![1],
            sidecore_cpu: 0,
            timing_representative: true,
            execution: "yes".into(),
        }
    }

    #[test]
    fn collector_reads_blocks_and_refuses_bad_ones() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let c = BenchCollector::new(1_000_000, None); // 1 GHz: 1 cycle = 1 ns
        let gpa = 0x1_0000;
        for (off, v) in [(0u64, 0u32), (4, 2), (8, 3), (12, 1)] {
            mem.write_obj(v, GuestAddress(gpa + off)).unwrap();
        }
        for (i, v) in [100u64, 200, 300].iter().enumerate() {
            mem.write_obj(*v, GuestAddress(gpa + 64 + 8 * i as u64)).unwrap();
        }
        c.on_block(0, &mem, gpa, None).unwrap();
        let rep = c.report(header());
        assert_eq!(rep.results.len(), 1);
        assert_eq!(rep.results[0].op, "null");
        assert_eq!(rep.results[0].path, "sidecall");
        assert_eq!(rep.results[0].stat.samples, 3);
        assert_eq!(rep.results[0].fallbacks, 1);
        assert!((rep.results[0].stat.p50_ns - 200.0).abs() < 1.0);
        assert!(rep.table().contains("null"));
        // A hostile count is refused, not read.
        mem.write_obj(100_000u32, GuestAddress(gpa + 8)).unwrap();
        assert!(c.on_block(0, &mem, gpa, None).is_err());
        mem.write_obj(3u32, GuestAddress(gpa + 8)).unwrap();
        mem.write_obj(9u32, GuestAddress(gpa)).unwrap();
        assert!(c.on_block(0, &mem, gpa, None).is_err());
    }

    /// Sidecores that arm whatever they are asked for, on no CPU a vCPU has.
    struct Arms(std::sync::atomic::AtomicU32);

    impl FloorProbe for Arms {
        fn cpus(&self) -> &[usize] {
            &[usize::MAX]
        }
        fn floor_block(&self, _: &mut [u64]) -> bool {
            false
        }
        fn set_idle_rings(&self, _: bool) {}
        fn guest_pong(&self, _vcpu: u32, rounds: u32) -> bool {
            self.0.store(rounds, std::sync::atomic::Ordering::Relaxed);
            true
        }
    }

    #[test]
    fn guest_floor_blocks_are_armed_bounded_and_give_their_ratio() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let c = BenchCollector::new(1_000_000, None);
        let gpa = 0x1_0000;
        // No sidecores: nothing armed, the guest is told 0.
        mem.write_obj(1016u32, GuestAddress(gpa + 8)).unwrap();
        c.arm_guest_floor(0, &mem, gpa, None).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(gpa + 8)).unwrap(), 0);
        // A hostile count is cut to one block and its warm-up.
        let probe = Arms(std::sync::atomic::AtomicU32::new(0));
        mem.write_obj(u32::MAX, GuestAddress(gpa + 8)).unwrap();
        c.arm_guest_floor(0, &mem, gpa, Some(&probe)).unwrap();
        let armed = mem.read_obj::<u32>(GuestAddress(gpa + 8)).unwrap();
        if sidecore_core::pin::current_cpu().is_some() {
            assert_eq!(armed, shm_proto::bench::BENCH_FLOOR_MAX_ROUNDS);
            assert_eq!(probe.0.load(std::sync::atomic::Ordering::Relaxed), armed);
        }
        // A sidecall block and its guest floor block: the ratio of the two.
        for (path, v) in [(BenchPath::Sidecall, 300u64), (BenchPath::GuestFloor, 200)] {
            for (off, w) in [(0u64, 0u32), (4, path as u32), (8, 1), (12, 0)] {
                mem.write_obj(w, GuestAddress(gpa + off)).unwrap();
            }
            mem.write_obj(v, GuestAddress(gpa + 64)).unwrap();
            c.on_block(0, &mem, gpa, None).unwrap();
        }
        let rep = c.report(header());
        assert!(rep.results.iter().any(|r| r.op == "null" && r.path == "guest-floor"));
        let r = rep.ratios.iter().find(|r| r.name == "sidecall/guest-floor").unwrap();
        assert!((r.value - 1.5).abs() < 0.01, "{}", r.value);
        assert!(!rep.ratios.iter().any(|r| r.name == "guest-floor/sidecall"));
    }
}
