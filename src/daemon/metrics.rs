//! Prometheus exposition of the daemon's counters: [`render`] turns a
//! [`MetricsSnapshot`] into OpenMetrics text ([`to_text_format`] into the
//! classic text format 0.0.4), and [`serve`] answers `GET /metrics` from
//! a background HTTP server (hyper on a single-threaded tokio runtime).
//!
//! A fresh registry is built from the snapshot on every scrape; every metric
//! is a constant (`ConstCounter`, `ConstGauge`, [`ConstHistogram`]) grouped
//! into label families that keep the snapshot's order.
//!
//! Conventions (those `promtool check metrics` checks, and the ones a fleet
//! needs): times in seconds, histograms with the same fixed bounds on every
//! host ([`sidecore_core::stats::FIXED_BOUNDS_NS`]), every bucket always
//! present, exact `_sum`; VMs labelled `vm` by name (the VMM's, or
//! `vm<ID>`), with id and pid only in `sidecore_vm_info`;
//! `sidecore_build_info`; the standard `process_*` metrics.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use super::process::ProcessSnapshot;
use super::status::{DeviceStatus, PteStatus, ServiceHistogram};

/// Content type of an OpenMetrics answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of a text-format (0.0.4) answer.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Time a client gets to send a request head (from its connection, or
/// the end of the previous answer on a kept-alive one).
pub const HEADER_DEADLINE: Duration = Duration::from_secs(5);
/// Longest life of one connection (kept-alive scrapes then reconnect).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 256;

#[derive(Clone, Debug, EncodeLabelSet)]
struct CallLabels {
    vm: String,
    op: String,
    status: String,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct VmInfoLabels {
    vm: String,
    id: String,
    pid: String,
    sidecore_cpu: String,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct BlkLabels {
    socket: String,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct BlkQueueLabels {
    socket: String,
    queue: String,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
    abi: String,
    protocol: String,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct CpuLabels {
    cpu: usize,
}

/// A metric family whose members are fixed when it is built; unlike
/// `prometheus_client::metrics::family::Family` it needs no constructor and
/// encodes its members in insertion order.
#[derive(Debug)]
struct ConstFamily<S, M>(Vec<(S, M)>);

impl<S, M> EncodeMetric for ConstFamily<S, M>
where
    S: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (labels, metric) in &self.0 {
            metric.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A histogram whose buckets are known up front (prometheus-client's own
/// `Histogram` can only `observe`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConstHistogram {
    sum: f64,
    count: u64,
    /// (upper bound, count in this bucket alone), ascending, ending with
    /// `+Inf`: the text encoder accumulates the counts itself.
    buckets: Vec<(f64, u64)>,
}

impl ConstHistogram {
    /// Builds one from cumulative buckets `(upper bound, observations <=
    /// bound)`, as in [`ServiceHistogram::buckets`], plus the total count and
    /// sum. Buckets whose bound is NaN or not above the previous one are
    /// folded into the next bucket; a `+Inf` bucket holding `count` is
    /// added (`count` is raised to the largest cumulative count if lower).
    pub fn from_cumulative(cumulative: &[(f64, u64)], count: u64, sum: f64) -> Self {
        let mut buckets = Vec::with_capacity(cumulative.len() + 1);
        let mut prev_bound = f64::NEG_INFINITY;
        let mut prev_cum = 0u64;
        for &(bound, cum) in cumulative {
            if bound.is_nan() || bound <= prev_bound || bound == f64::INFINITY {
                continue;
            }
            let cum = cum.max(prev_cum);
            buckets.push((bound, cum - prev_cum));
            prev_bound = bound;
            prev_cum = cum;
        }
        let count = cumulative.iter().map(|&(_, c)| c).fold(count, u64::max);
        buckets.push((f64::INFINITY, count - prev_cum));
        Self { sum, count, buckets }
    }
}

impl TypedMetric for ConstHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One sidecore, for the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct CoreSnapshot {
    /// Its CPU.
    pub cpu: usize,
    /// Rings it sweeps.
    pub rings: u64,
    /// Requests served.
    pub served: u64,
    /// Sweeps.
    pub sweeps: u64,
    /// Sweeps that found work.
    pub busy_sweeps: u64,
    /// Parked now.
    pub parked: bool,
    /// Times it parked.
    pub parks: u64,
}

/// One attached VM, for the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct VmSnapshot {
    /// Daemon's id.
    pub vm: u64,
    /// Its name (the `vm` label).
    pub name: String,
    /// VMM's pid.
    pub pid: i32,
    /// vCPUs.
    pub vcpus: u32,
    /// Sidecore CPU.
    pub sidecore_cpu: usize,
    /// Paused by its VMM.
    pub paused: bool,
    /// (op, status, count) of every non-zero counter.
    pub calls: Vec<(String, String, u64)>,
    /// Requests answered.
    pub total: u64,
    /// Requests refused as malformed.
    pub rejected: u64,
    /// Requests sent back to the exit path.
    pub use_exit_path: u64,
    /// Requests the guest cancelled.
    pub cancelled: u64,
    /// Page-table service counters.
    pub pte: Option<PteStatus>,
    /// Packet device counters.
    pub device: Option<DeviceStatus>,
    /// Service-time histogram (seconds, fixed bounds).
    pub service: ServiceHistogram,
}

/// Everything the metrics endpoint exposes.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// Sidecores.
    pub cores: Vec<CoreSnapshot>,
    /// VMs.
    pub vms: Vec<VmSnapshot>,
    /// vhost-user-blk devices.
    pub blk: Vec<super::BlkStatus>,
    /// The daemon process, when it could be read.
    pub process: Option<ProcessSnapshot>,
}

fn gauge_family<S, T, F>(items: &[T], labels: impl Fn(&T) -> S, value: F) -> ConstFamily<S, ConstGauge<i64>>
where
    F: Fn(&T) -> i64,
{
    ConstFamily(items.iter().map(|i| (labels(i), ConstGauge::new(value(i)))).collect())
}

fn counter_family<S, T, F>(items: &[T], labels: impl Fn(&T) -> S, value: F) -> ConstFamily<S, ConstCounter<u64>>
where
    F: Fn(&T) -> u64,
{
    ConstFamily(items.iter().map(|i| (labels(i), ConstCounter::new(value(i)))).collect())
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The vhost-user-blk devices' families: per device, and per queue.
fn blk_families(reg: &mut Registry, blk: &[super::BlkStatus]) {
    let dl = |d: &super::BlkStatus| BlkLabels { socket: d.socket.clone() };
    reg.register(
        "sidecore_vhost_blk_connected",
        "1 while a VMM is connected to the vhost-user-blk device",
        gauge_family(blk, dl, |d| i64::from(d.connected)),
    );
    reg.register(
        "sidecore_vhost_blk_running_queues",
        "The device's queues a sidecore polls now",
        gauge_family(blk, dl, |d| gauge_i64(d.running_queues)),
    );
    reg.register(
        "sidecore_vhost_blk_connections",
        "VMM connections to the device",
        counter_family(blk, dl, |d| d.connections),
    );
    reg.register(
        "sidecore_vhost_blk_protocol_errors",
        "vhost-user messages refused and connections ended by a protocol error",
        counter_family(blk, dl, |d| d.protocol_errors),
    );
    let queues: Vec<(&super::BlkStatus, &super::BlkQueueStatus)> =
        blk.iter().flat_map(|d| d.queues.iter().map(move |q| (d, q))).collect();
    let ql = |(d, q): &(&super::BlkStatus, &super::BlkQueueStatus)| BlkQueueLabels {
        socket: d.socket.clone(),
        queue: q.index.to_string(),
    };
    type Q<'a> = (&'a super::BlkStatus, &'a super::BlkQueueStatus);
    type Family = (&'static str, &'static str, fn(&Q) -> u64);
    let families: [Family; 8] = [
        ("sidecore_vhost_blk_requests", "Requests completed, any status", |(_, q)| q.requests),
        ("sidecore_vhost_blk_read_bytes", "Bytes read from the disk into guest memory", |(_, q)| q.read_bytes),
        ("sidecore_vhost_blk_written_bytes", "Bytes written from guest memory to the disk", |(_, q)| q.written_bytes),
        ("sidecore_vhost_blk_kicks", "Kicks (guest notifications) received", |(_, q)| q.kicks),
        ("sidecore_vhost_blk_interrupts", "Interrupts sent to the guest", |(_, q)| q.interrupts),
        ("sidecore_vhost_blk_bad_chains", "Descriptor chains refused (IOERR, UNSUPP or none)", |(_, q)| q.bad_chains),
        ("sidecore_vhost_blk_io_errors", "Host I/O errors", |(_, q)| q.io_errors),
        ("sidecore_vhost_blk_broken", "Times a queue stopped on an impossible avail index", |(_, q)| q.broken),
    ];
    for (name, help, f) in families {
        reg.register(name, help, counter_family(&queues, ql, f));
    }
}

/// Renders a snapshot as OpenMetrics text (via
/// `prometheus_client::encoding::text::encode`, so it ends with `# EOF`).
///
/// Counters get the OpenMetrics `_total` suffix (`sidecore_calls_total`,
/// ...); families with no members (no VMs attached) are left out, but
/// `sidecore_build_info` and `sidecore_vms` are always there.
pub fn render(snap: &MetricsSnapshot) -> Result<String, fmt::Error> {
    let mut reg = Registry::default();
    let build = BuildLabels {
        version: env!("CARGO_PKG_VERSION").into(),
        commit: crate::build_commit().into(),
        abi: shm_proto::ABI_VERSION.to_string(),
        protocol: super::protocol::PROTOCOL_VERSION.to_string(),
    };
    reg.register(
        "sidecore_build_info",
        "The daemon's version, commit, ring ABI and control protocol (always 1)",
        ConstFamily(vec![(build, ConstGauge::new(1i64))]),
    );
    reg.register("sidecore_vms", "VMs attached", ConstGauge::new(i64::try_from(snap.vms.len()).unwrap_or(i64::MAX)));

    // Sum any duplicate (vm, op, status) so each series appears once.
    let mut calls: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
    for vm in &snap.vms {
        for (op, status, n) in &vm.calls {
            let c = calls.entry((vm.name.as_str(), op.as_str(), status.as_str())).or_insert(0);
            *c = c.saturating_add(*n);
        }
    }
    let calls = calls
        .into_iter()
        .map(|((vm, op, status), n)| {
            (CallLabels { vm: vm.to_owned(), op: op.to_owned(), status: status.to_owned() }, ConstCounter::new(n))
        })
        .collect();
    reg.register("sidecore_calls", "Requests served, by VM, operation and status", ConstFamily(calls));

    let vm = |v: &VmSnapshot| VmLabels { vm: v.name.clone() };
    let info = |v: &VmSnapshot| VmInfoLabels {
        vm: v.name.clone(),
        id: v.vm.to_string(),
        pid: v.pid.to_string(),
        sidecore_cpu: v.sidecore_cpu.to_string(),
    };
    reg.register(
        "sidecore_vm_info",
        "An attached VM: its daemon id, its VMM's pid and its sidecore's CPU (always 1)",
        gauge_family(&snap.vms, info, |_| 1),
    );
    reg.register("sidecore_vm_vcpus", "vCPUs of an attached VM", gauge_family(&snap.vms, vm, |v| i64::from(v.vcpus)));
    reg.register(
        "sidecore_vm_paused",
        "1 while the VMM has paused the VM's service",
        gauge_family(&snap.vms, vm, |v| i64::from(v.paused)),
    );
    reg.register(
        "sidecore_vm_exit_path_requests",
        "Requests the sidecore sent back to the VM's own exit path",
        counter_family(&snap.vms, vm, |v| v.use_exit_path),
    );
    reg.register(
        "sidecore_vm_rejected_requests",
        "Requests refused as malformed",
        counter_family(&snap.vms, vm, |v| v.rejected),
    );
    reg.register(
        "sidecore_vm_cancelled_requests",
        "Requests the guest cancelled before the sidecore took them",
        counter_family(&snap.vms, vm, |v| v.cancelled),
    );

    let pte: Vec<(&VmSnapshot, &PteStatus)> = snap.vms.iter().filter_map(|v| v.pte.as_ref().map(|p| (v, p))).collect();
    let pl = |(v, _): &(&VmSnapshot, &PteStatus)| VmLabels { vm: v.name.clone() };
    reg.register("sidecore_pte_maps", "Page-table maps applied", counter_family(&pte, pl, |(_, p)| p.maps));
    reg.register(
        "sidecore_pte_exit_path_updates",
        "Page-table changes and unmaps sent back to the VM's own exit path",
        counter_family(&pte, pl, |(_, p)| p.to_exit_path),
    );
    reg.register(
        "sidecore_pte_refused_updates",
        "Page-table updates refused",
        counter_family(&pte, pl, |(_, p)| p.refused),
    );

    let dev: Vec<(&VmSnapshot, &DeviceStatus)> =
        snap.vms.iter().filter_map(|v| v.device.as_ref().map(|d| (v, d))).collect();
    let dl = |(v, _): &(&VmSnapshot, &DeviceStatus)| VmLabels { vm: v.name.clone() };
    reg.register(
        "sidecore_device_rx_packets",
        "Packets delivered to the guest",
        counter_family(&dev, dl, |(_, d)| d.rx),
    );
    reg.register("sidecore_device_tx_packets", "Packets the guest sent", counter_family(&dev, dl, |(_, d)| d.tx));
    reg.register(
        "sidecore_device_rx_dropped_packets",
        "Packets dropped for want of a guest buffer",
        counter_family(&dev, dl, |(_, d)| d.rx_no_buffer),
    );
    reg.register(
        "sidecore_device_bad_descriptors",
        "Bad descriptors the guest posted",
        counter_family(&dev, dl, |(_, d)| d.bad_desc),
    );
    reg.register(
        "sidecore_device_interrupts",
        "Wake-up interrupts sent to the guest",
        counter_family(&dev, dl, |(_, d)| d.interrupts),
    );
    reg.register(
        "sidecore_device_blocked_kicks",
        "Wake-up kicks that would have blocked (the VMM filled its irqfd)",
        counter_family(&dev, dl, |(_, d)| d.kicks_blocked),
    );

    let cpu = |c: &CoreSnapshot| CpuLabels { cpu: c.cpu };
    reg.register(
        "sidecore_served_requests",
        "Requests a sidecore served",
        counter_family(&snap.cores, cpu, |c| c.served),
    );
    reg.register("sidecore_sweeps", "Ring sweeps a sidecore made", counter_family(&snap.cores, cpu, |c| c.sweeps));
    reg.register(
        "sidecore_busy_sweeps",
        "Ring sweeps that found work",
        counter_family(&snap.cores, cpu, |c| c.busy_sweeps),
    );
    reg.register("sidecore_parks", "Times a sidecore parked", counter_family(&snap.cores, cpu, |c| c.parks));
    reg.register("sidecore_rings", "Rings a sidecore sweeps", gauge_family(&snap.cores, cpu, |c| gauge_i64(c.rings)));
    reg.register(
        "sidecore_parked",
        "1 if the sidecore is parked",
        gauge_family(&snap.cores, cpu, |c| i64::from(c.parked)),
    );

    let service = snap
        .vms
        .iter()
        .map(|v| {
            let h = ConstHistogram::from_cumulative(&v.service.buckets, v.service.count, v.service.sum);
            (VmLabels { vm: v.name.clone() }, h)
        })
        .collect();
    reg.register_with_unit(
        "sidecore_service_time",
        "Time the sidecore took to serve a request, claim to reply",
        Unit::Seconds,
        ConstFamily(service),
    );

    blk_families(&mut reg, &snap.blk);

    if let Some(p) = &snap.process {
        reg.register_with_unit(
            "process_cpu",
            "Total user and system CPU time spent",
            Unit::Seconds,
            ConstCounter::new(p.cpu_seconds),
        );
        reg.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            Unit::Bytes,
            ConstGauge::new(gauge_i64(p.resident_bytes)),
        );
        reg.register_with_unit(
            "process_virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            ConstGauge::new(gauge_i64(p.virtual_bytes)),
        );
        reg.register("process_open_fds", "Open file descriptors", ConstGauge::new(gauge_i64(p.open_fds)));
        reg.register(
            "process_max_fds",
            "Maximum number of open file descriptors",
            ConstGauge::new(gauge_i64(p.max_fds)),
        );
        reg.register("process_threads", "Threads of the process", ConstGauge::new(gauge_i64(p.threads)));
        reg.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            ConstGauge::new(p.start_time_seconds),
        );
    }

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

/// OpenMetrics text as the classic Prometheus text format 0.0.4 (what
/// `promtool check metrics`, older scrapers and `curl` users get): no
/// `# UNIT` or `# EOF` lines, and a counter's `# HELP` / `# TYPE` name
/// carries its `_total` suffix, as its samples do.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut counters = std::collections::BTreeSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line.strip_prefix("# TYPE ").and_then(|r| r.strip_suffix(" counter")) {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or(line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out += &format!("{kind}{name}_total {tail}");
                } else {
                    out += line;
                }
            }
            None => out += line,
        }
        out.push('\n');
    }
    out
}

/// Which format a scraper asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (Prometheus asks for it first).
    OpenMetrics,
    /// Text format 0.0.4 (the default, e.g. for `curl`).
    Text,
}

/// The format an `Accept` header asks for: OpenMetrics when it lists
/// `application/openmetrics-text` with a q above that of `text/plain`,
/// else the text format.
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else { return Format::Text };
    let q_of = |media: &str| -> Option<f64> {
        accept
            .split(',')
            .filter_map(|part| {
                let mut it = part.split(';').map(str::trim);
                let ty = it.next()?;
                (ty.eq_ignore_ascii_case(media))
                    .then(|| it.find_map(|p| p.strip_prefix("q=").and_then(|q| q.parse::<f64>().ok())).unwrap_or(1.0))
            })
            .reduce(f64::max)
    };
    match (q_of("application/openmetrics-text"), q_of("text/plain")) {
        (Some(om), text) if om > 0.0 && om >= text.unwrap_or(0.0) => Format::OpenMetrics,
        _ => Format::Text,
    }
}

/// What the server answers one request with: status, content type, body.
fn answer(
    method: &hyper::Method,
    path: &str,
    accept: Option<&str>,
    render_fn: &dyn Fn() -> Result<String, fmt::Error>,
) -> (u16, &'static str, String) {
    if path != "/metrics" && path != "/" {
        return (404, "text/plain; charset=utf-8", "not found: the metrics are at /metrics\n".into());
    }
    if method != hyper::Method::GET && method != hyper::Method::HEAD {
        return (405, "text/plain; charset=utf-8", "method not allowed: use GET\n".into());
    }
    if path == "/" {
        return (200, "text/html; charset=utf-8", "<html><head><title>sidecore daemon</title></head><body><h1>sidecore daemon</h1><p><a href=\"/metrics\">Metrics</a></p></body></html>\n".into());
    }
    match (render_fn(), negotiate(accept)) {
        (Ok(body), Format::OpenMetrics) => (200, OPENMETRICS, body),
        (Ok(body), Format::Text) => (200, TEXT_FORMAT, to_text_format(&body)),
        (Err(fmt::Error), _) => (500, "text/plain; charset=utf-8", "cannot render the metrics\n".into()),
    }
}

/// Binds `addr` (e.g. `127.0.0.1:9464`; any address is accepted, the
/// operator chooses) and serves `GET /metrics` from a background thread
/// named `sidecore-metrics`. Returns the bound address once it serves.
///
/// Each scrape calls `snapshot`. The answer is OpenMetrics when the
/// scraper's `Accept` prefers it (Prometheus does), else text format 0.0.4;
/// `HEAD` gets the headers only, `/` a page that links to `/metrics`,
/// other paths `404`, other methods `405`. Connections are served
/// concurrently (at most [`MAX_CONNECTIONS`]); each has
/// [`HEADER_DEADLINE`] for each request head and lives at most
/// [`CONNECTION_LIFETIME`], so idle or slow clients cannot delay a scrape.
///
/// # Errors
///
/// The bind's or the thread's error if `addr` cannot be bound or the thread
/// cannot be started.
pub fn serve<F>(addr: &str, snapshot: F) -> io::Result<SocketAddr>
where
    F: Fn() -> MetricsSnapshot + Send + Sync + 'static,
{
    serve_with(addr, snapshot, None::<fn() -> Result<(), String>>).map_err(|e| match e {
        ServeError::Io(e) => e,
        ServeError::Start(reason) => io::Error::other(reason),
    })
}

/// Why [`serve_with`] failed.
#[derive(Debug)]
pub enum ServeError {
    /// The bind or the thread's creation.
    Io(io::Error),
    /// The thread's start hook (e.g. its seccomp filter).
    Start(String),
}

/// [`serve`], with `on_start` run in the metrics thread once its runtime
/// and listener are set up and before it serves (the daemon installs its
/// seccomp filter there); returns once it has run, with its error if it
/// failed (the thread then serves nothing). The process metrics are read
/// through files opened before `on_start`.
pub fn serve_with<F, S>(addr: &str, snapshot: F, on_start: Option<S>) -> Result<SocketAddr, ServeError>
where
    F: Fn() -> MetricsSnapshot + Send + Sync + 'static,
    S: FnOnce() -> Result<(), String> + Send + 'static,
{
    let listener = TcpListener::bind(addr).map_err(ServeError::Io)?;
    let bound = listener.local_addr().map_err(ServeError::Io)?;
    listener.set_nonblocking(true).map_err(ServeError::Io)?;
    let process = super::process::ProcessReader::open().ok();
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("sidecore-metrics".to_owned())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start the metrics runtime: {e}")));
                    return;
                }
            };
            let listener = match rt.block_on(async { tokio::net::TcpListener::from_std(listener) }) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot use the metrics socket: {e}")));
                    return;
                }
            };
            let started = on_start.map_or(Ok(()), |f| f());
            let ok = started.is_ok();
            let _ = ready_tx.send(started);
            if ok {
                let snapshot = move || {
                    let mut s = snapshot();
                    s.process = process.as_ref().map(super::process::ProcessReader::read);
                    s
                };
                rt.block_on(accept_loop(listener, Arc::new(snapshot)));
            }
        })
        .map_err(ServeError::Io)?;
    ready_rx
        .recv()
        .map_err(|_| ServeError::Start("the metrics thread died at its start".into()))?
        .map_err(ServeError::Start)?;
    tracing::info!(addr = %bound, "serving metrics");
    Ok(bound)
}

async fn accept_loop(listener: tokio::net::TcpListener, snapshot: Arc<dyn Fn() -> MetricsSnapshot + Send + Sync>) {
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // E.g. out of fds: do not spin.
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if live.load(std::sync::atomic::Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::debug!("metrics: {MAX_CONNECTIONS} connections open already: closing a new one");
            drop(stream);
            continue;
        }
        live.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (live, snapshot) = (live.clone(), snapshot.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let snapshot = snapshot.clone();
                async move {
                    let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
                    let (status, ctype, body) = answer(req.method(), req.uri().path(), accept, &|| render(&snapshot()));
                    let body = if req.method() == hyper::Method::HEAD { String::new() } else { body };
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
                    resp.headers_mut()
                        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
                    if status == 405 {
                        resp.headers_mut()
                            .insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .max_buf_size(16 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A lifetime past its end just drops the connection.
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                tracing::debug!(error = %e, "metrics connection failed");
            }
            live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    fn hist() -> ServiceHistogram {
        let bounds = sidecore_core::stats::FIXED_BOUNDS_NS;
        let buckets =
            bounds.iter().enumerate().map(|(i, ns)| (*ns as f64 / 1e9, if i < 3 { 10 } else { 900 })).collect();
        ServiceHistogram { buckets, count: 1005, sum: 0.000612 }
    }

    fn snapshot() -> MetricsSnapshot {
        MetricsSnapshot {
            cores: vec![CoreSnapshot {
                cpu: 3,
                rings: 2,
                served: 1500,
                sweeps: 90_000,
                busy_sweeps: 1200,
                parked: true,
                parks: 4,
            }],
            vms: vec![VmSnapshot {
                vm: 7,
                name: "web-1".into(),
                pid: 4242,
                vcpus: 4,
                sidecore_cpu: 3,
                calls: vec![("read".to_owned(), "ok".to_owned(), 1000), ("write".to_owned(), "eio".to_owned(), 5)],
                pte: Some(PteStatus { maps: 3, to_exit_path: 1, refused: 0 }),
                device: Some(DeviceStatus { rx: 9, ..DeviceStatus::default() }),
                service: hist(),
                ..VmSnapshot::default()
            }],
            blk: vec![super::super::BlkStatus {
                socket: "/run/vub.sock".into(),
                connected: true,
                running_queues: 2,
                connections: 3,
                queues: vec![super::super::BlkQueueStatus { index: 1, requests: 40, kicks: 2, ..Default::default() }],
                ..Default::default()
            }],
            process: Some(ProcessSnapshot { cpu_seconds: 1.5, threads: 6, ..ProcessSnapshot::default() }),
        }
    }

    #[test]
    fn render_snapshot() {
        let text = render(&snapshot()).unwrap();
        for want in [
            "# TYPE sidecore_calls counter\n",
            "sidecore_calls_total{vm=\"web-1\",op=\"read\",status=\"ok\"} 1000\n",
            "sidecore_calls_total{vm=\"web-1\",op=\"write\",status=\"eio\"} 5\n",
            "sidecore_vm_info{vm=\"web-1\",id=\"7\",pid=\"4242\",sidecore_cpu=\"3\"} 1\n",
            "sidecore_vm_vcpus{vm=\"web-1\"} 4\n",
            "sidecore_served_requests_total{cpu=\"3\"} 1500\n",
            "sidecore_parks_total{cpu=\"3\"} 4\n",
            "sidecore_rings{cpu=\"3\"} 2\n",
            "sidecore_parked{cpu=\"3\"} 1\n",
            "sidecore_pte_maps_total{vm=\"web-1\"} 3\n",
            "sidecore_device_rx_packets_total{vm=\"web-1\"} 9\n",
            "# TYPE sidecore_service_time_seconds histogram\n",
            "sidecore_service_time_seconds_sum{vm=\"web-1\"} 0.000612\n",
            "sidecore_service_time_seconds_count{vm=\"web-1\"} 1005\n",
            "sidecore_service_time_seconds_bucket{le=\"3.2e-8\",vm=\"web-1\"} 10\n",
            "sidecore_service_time_seconds_bucket{le=\"+Inf\",vm=\"web-1\"} 1005\n",
            "process_cpu_seconds_total 1.5\n",
            "process_threads 6\n",
            "sidecore_vms 1\n",
            "sidecore_vhost_blk_connected{socket=\"/run/vub.sock\"} 1\n",
            "sidecore_vhost_blk_connections_total{socket=\"/run/vub.sock\"} 3\n",
            "sidecore_vhost_blk_requests_total{socket=\"/run/vub.sock\",queue=\"1\"} 40\n",
            "sidecore_vhost_blk_kicks_total{socket=\"/run/vub.sock\",queue=\"1\"} 2\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(text.contains("sidecore_build_info{version=\""), "{text}");
        // Every bucket, even the empty ones past the last observation.
        assert_eq!(text.matches("sidecore_service_time_seconds_bucket{").count(), hist().buckets.len() + 1);
        assert!(!text.contains("pid=\"4242\"} 4"), "the pid is only in the info series");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn render_empty_and_parked_zero() {
        let text = render(&MetricsSnapshot::default()).unwrap();
        assert!(text.contains("sidecore_build_info{") && text.contains("sidecore_vms 0\n"), "{text}");
        assert!(!text.contains("sidecore_calls"), "{text}");
        let snap =
            MetricsSnapshot { cores: vec![CoreSnapshot { cpu: 0, ..CoreSnapshot::default() }], ..Default::default() };
        assert!(render(&snap).unwrap().contains("sidecore_parked{cpu=\"0\"} 0\n"));
    }

    #[test]
    fn render_escapes_and_merges_calls() {
        let mut snap = snapshot();
        if let Some(vm) = snap.vms.first_mut() {
            vm.calls = vec![
                ("a\"b".to_owned(), "ok".to_owned(), 1),
                ("x".to_owned(), "ok".to_owned(), 2),
                ("x".to_owned(), "ok".to_owned(), 3),
            ];
        }
        let text = render(&snap).unwrap();
        assert!(text.contains("op=\"a\\\"b\""), "{text}");
        assert!(text.contains("sidecore_calls_total{vm=\"web-1\",op=\"x\",status=\"ok\"} 5\n"), "{text}");
    }

    #[test]
    fn text_format_names_counters_with_total_and_drops_openmetrics_lines() {
        let t = to_text_format(&render(&snapshot()).unwrap());
        assert!(t.contains("# TYPE sidecore_calls_total counter\n"), "{t}");
        assert!(t.contains("# HELP sidecore_calls_total Requests served"), "{t}");
        assert!(t.contains("# TYPE sidecore_service_time_seconds histogram\n"), "{t}");
        assert!(t.contains("# TYPE process_cpu_seconds_total counter\n"), "{t}");
        assert!(!t.contains("# EOF") && !t.contains("# UNIT"), "{t}");
    }

    #[test]
    fn the_grafana_dashboard_asks_only_for_series_the_daemon_exports() {
        let dash: serde_json::Value =
            serde_json::from_str(include_str!("../../scripts/grafana-dashboard.json")).expect("dashboard JSON");
        let text = to_text_format(&render(&snapshot()).unwrap());
        let mut checked = 0;
        for panel in dash["panels"].as_array().expect("panels") {
            for t in panel["targets"].as_array().expect("targets") {
                let expr = t["expr"].as_str().expect("expr");
                let names = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("sidecore_") || w.starts_with("process_"));
                for name in names {
                    assert!(text.contains(&format!("\n{name}{{")) || text.contains(&format!("\n{name} ")), "{name}");
                    checked += 1;
                }
            }
        }
        assert!(checked >= 15, "{checked}");
    }

    #[test]
    fn accept_headers_pick_the_format() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(negotiate(Some("text/plain;version=0.0.4")), Format::Text);
        assert_eq!(negotiate(Some("text/plain, application/openmetrics-text;q=0.2")), Format::Text);
        assert_eq!(negotiate(Some("application/openmetrics-text;q=0")), Format::Text);
    }

    #[test]
    fn histogram_from_cumulative() {
        let h = ConstHistogram::from_cumulative(&[(1.0, 2), (2.0, 5), (4.0, 5)], 6, 9.0);
        assert_eq!(h.buckets, vec![(1.0, 2), (2.0, 3), (4.0, 0), (f64::INFINITY, 1)]);
        assert_eq!(h.count, 6);
        // NaN, out-of-order and infinite bounds are folded; a count lower
        // than the buckets is raised; decreasing counts do not underflow.
        let h = ConstHistogram::from_cumulative(
            &[(f64::NAN, 1), (2.0, 4), (1.0, 5), (3.0, 3), (f64::INFINITY, 9)],
            0,
            f64::NAN,
        );
        assert_eq!(h.buckets, vec![(2.0, 4), (3.0, 0), (f64::INFINITY, 5)]);
        assert_eq!(h.count, 9);
        let h = ConstHistogram::from_cumulative(&[], 0, 0.0);
        assert_eq!(h.buckets, vec![(f64::INFINITY, 0)]);
    }

    /// One HTTP/1.0 request to `addr`; the whole answer.
    fn get(addr: SocketAddr, request: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        answer
    }

    #[test]
    fn the_server_answers_by_path_method_and_accept() {
        let addr = serve("127.0.0.1:0", snapshot).expect("serve");
        let text = get(addr, "GET /metrics HTTP/1.0\r\n\r\n");
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert!(text.to_lowercase().contains(&format!("content-type: {TEXT_FORMAT}")), "{text}");
        assert!(text.contains("# TYPE sidecore_calls_total counter"), "{text}");
        let om = get(addr, "GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n");
        assert!(om.to_lowercase().contains(&format!("content-type: {OPENMETRICS}")) && om.ends_with("# EOF\n"), "{om}");
        let head = get(addr, "HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n") && head.ends_with("\r\n\r\n"), "{head}");
        assert!(get(addr, "GET / HTTP/1.0\r\n\r\n").contains("href=\"/metrics\""));
        assert!(get(addr, "GET /nope HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
        let post = get(addr, "POST /metrics HTTP/1.0\r\n\r\n");
        assert!(post.starts_with("HTTP/1.0 405") && post.to_lowercase().contains("allow: get, head"), "{post}");
        assert!(get(addr, "\x00\x7fgarbage\r\n\r\n").starts_with("HTTP/1.1 400"), "garbage is a 400");
    }

    #[test]
    fn idle_and_slow_connections_do_not_delay_a_scrape() {
        let addr = serve("127.0.0.1:0", snapshot).expect("serve");
        let quickest = || {
            (0..3)
                .map(|_| {
                    let t = Instant::now();
                    let answer = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
                    t.elapsed()
                })
                .min()
                .unwrap_or_default()
        };
        let alone = quickest();
        // Five idle connections, and two that send half a request head.
        let mut idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /metr").unwrap();
            idle.push(c);
        }
        std::thread::sleep(Duration::from_millis(50));
        let beside = quickest();
        assert!(
            beside < alone + Duration::from_millis(100),
            "idle connections delayed a scrape: {alone:?} -> {beside:?}"
        );
        // The half-sent heads are cut off at the deadline.
        let mut c = idle.pop().unwrap();
        c.set_read_timeout(Some(HEADER_DEADLINE * 3)).unwrap();
        let t = Instant::now();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert!(t.elapsed() < HEADER_DEADLINE * 2, "the deadline closes a slow head: {:?}", t.elapsed());
    }
}
