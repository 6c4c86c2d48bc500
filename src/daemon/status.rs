//! The daemon's report, one typed value: `sidecore status` renders it as
//! text, `status --json` and the control socket send it as JSON, and the
//! metrics endpoint takes its numbers from it.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Everything the daemon reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReport {
    /// Always true in a report (an error reply has `ok: false`).
    pub ok: bool,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    /// Names of the op classes the call counters are kept by.
    pub ops: Vec<String>,
    /// Its sidecores.
    pub sidecores: Vec<CoreStatus>,
    /// The attached VMs.
    pub vms: Vec<VmStatus>,
    /// The vhost-user-blk devices.
    pub vhost_user_blk: Vec<BlkStatus>,
}

/// One sidecore.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CoreStatus {
    /// Its CPU.
    pub cpu: usize,
    /// Rings it sweeps.
    pub rings: u64,
    /// Requests served.
    pub served: u64,
    /// Sweeps made.
    pub sweeps: u64,
    /// Sweeps that found work.
    pub busy_sweeps: u64,
    /// `busy_sweeps / sweeps` (0 before the first sweep).
    pub busy_fraction: f64,
    /// Parked now.
    pub parked: bool,
    /// Times it parked.
    pub parks: u64,
}

/// One (op, status) call counter.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CallCount {
    /// Op class.
    pub op: String,
    /// Status.
    pub status: String,
    /// Calls.
    pub count: u64,
}

/// The page-table service's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PteStatus {
    /// Maps applied.
    pub maps: u64,
    /// Changes and unmaps sent back to the VM's own exit path.
    pub to_exit_path: u64,
    /// Updates refused.
    pub refused: u64,
}

/// The packet device's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceStatus {
    /// Packets delivered to the guest.
    pub rx: u64,
    /// Packets the guest sent.
    pub tx: u64,
    /// Packets dropped for want of a guest buffer.
    pub rx_no_buffer: u64,
    /// Bad descriptors.
    pub bad_desc: u64,
    /// Wake-up interrupts.
    pub interrupts: u64,
    /// Wake-up kicks that would have blocked (the VMM filled its irqfd):
    /// after the first, the device stops kicking.
    pub kicks_blocked: u64,
}

/// Service-time quantiles, ns (none before the first timed request).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Quantiles {
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// 99.9th percentile.
    pub p999: Option<f64>,
}

/// One attached VM.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct VmStatus {
    /// The daemon's id for it.
    pub vm: u64,
    /// Its name (the VMM's, or `vm<ID>`).
    pub name: String,
    /// Its VMM's pid.
    pub pid: i32,
    /// Its VMM's uid.
    pub uid: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Index of the sidecore serving it.
    pub sidecore: usize,
    /// That sidecore's CPU.
    pub sidecore_cpu: Option<usize>,
    /// Seconds since it attached.
    pub attached_s: f64,
    /// Paused by its VMM.
    pub paused: bool,
    /// Requests answered.
    pub total: u64,
    /// Requests refused as malformed.
    pub rejected: u64,
    /// Requests sent back to the exit path.
    pub use_exit_path: u64,
    /// Requests the guest cancelled.
    pub cancelled: u64,
    /// Every non-zero call counter.
    pub calls: Vec<CallCount>,
    /// The page-table service, if it has one.
    pub pte: Option<PteStatus>,
    /// The packet device, if it has one.
    pub device: Option<DeviceStatus>,
    /// Service-time quantiles.
    pub service_ns: Quantiles,
    /// Service-time histogram in seconds, fixed bounds.
    pub service_seconds: ServiceHistogram,
}

/// A service-time histogram with the fixed bounds of
/// [`sidecore_core::stats::FIXED_BOUNDS_NS`], in seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceHistogram {
    /// (upper bound in seconds, requests at most that long), every bound,
    /// ascending; `count` is the `+Inf` bucket.
    pub buckets: Vec<(f64, u64)>,
    /// Requests timed.
    pub count: u64,
    /// Sum of their service times, seconds (exact, at the TSC rate the
    /// daemon measured).
    pub sum: f64,
}

impl From<&StatusReport> for MetricsSnapshot {
    fn from(r: &StatusReport) -> MetricsSnapshot {
        MetricsSnapshot {
            cores: r
                .sidecores
                .iter()
                .map(|c| CoreSnapshot {
                    cpu: c.cpu,
                    rings: c.rings,
                    served: c.served,
                    sweeps: c.sweeps,
                    busy_sweeps: c.busy_sweeps,
                    parked: c.parked,
                    parks: c.parks,
                })
                .collect(),
            vms: r
                .vms
                .iter()
                .map(|v| VmSnapshot {
                    vm: v.vm,
                    name: v.name.clone(),
                    pid: v.pid,
                    vcpus: v.vcpus,
                    sidecore_cpu: v.sidecore_cpu.unwrap_or(0),
                    calls: v.calls.iter().map(|c| (c.op.clone(), c.status.clone(), c.count)).collect(),
                    service: v.service_seconds.clone(),
                    paused: v.paused,
                    total: v.total,
                    use_exit_path: v.use_exit_path,
                    rejected: v.rejected,
                    cancelled: v.cancelled,
                    pte: v.pte.clone(),
                    device: v.device.clone(),
                })
                .collect(),
            blk: r.vhost_user_blk.clone(),
            process: None,
        }
    }
}
