//! `sidecore daemon`: one process owns dedicated cores and serves the
//! sidecalls of every VM on the host, whichever VMM process runs it.
//!
//! Control socket protocol (Unix stream, one JSON object per line, each
//! request answered by one line):
//!
//! * `{"op":"attach", ...layout..., "cpuid":[[...]]}` with two fds passed by
//!   SCM_RIGHTS (the guest memory memfd, the host-shared memfd): the daemon
//!   maps the shared region and the page-table pool, takes the VM's rings on
//!   the least-loaded sidecore and answers
//!   `{"ok":true,"vm":ID,"sidecore":K,"sidecore_cpu":CPU}`. The connection
//!   stays open for the VM's life; when it hangs up the VM is detached.
//! * on an attached connection: `{"op":"pause"}` / `{"op":"resume"}` stop and
//!   restart serving that VM (its calls fall back meanwhile).
//! * `{"op":"status"}` on a fresh connection: VMs, counters, service-time
//!   percentiles, sidecore busy fractions (`sidecore status`).
//!
//! Errors are `{"ok":false,"error":"..."}`, after which the connection is
//! closed; the daemon lives on.

mod attach;
pub mod client;
pub mod metrics;
pub mod protocol;
pub mod seccomp;
pub mod status;
mod systemd;
mod transport;

pub use attach::validate_attach;
use attach::*;
pub use client::{format_status, query_status, Attachment};
pub use protocol::{AttachRequest, Request, MAX_MESSAGE};
use transport::*;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shm_proto::layout::MAX_VCPUS;
use shm_proto::op::{Status, OP_CLASS_NAMES};
use shm_proto::ring::region_size;
use sidecore_core::hostmem::HostShared;
use sidecore_core::pte::{PteLayout, PteService, Visibility};
use sidecore_core::stats::VmStats;
use sidecore_core::{RingRef, Services, SharedRegion, Sidecore, SidecoreConfig, VmControl};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::daemon::metrics::{CoreSnapshot, MetricsSnapshot, VmSnapshot};
use crate::host::memfd::{check_sealed, fd_kind, is_eventfd, Mapping};
use sidecore_core::hypercalls::vm_services;
pub use status::{CallCount, CoreStatus, DeviceStatus, PteStatus, Quantiles, StatusReport, VmStatus};

/// Starting the daemon or talking to it failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon answers on that socket.
    #[error("a daemon is already listening on {0} — stop it first or pick another socket path")]
    InUse(PathBuf),
    /// Something that is not a socket is at the socket path.
    #[error("{0} exists and is not a socket: refusing to remove it — pick another --socket path, or remove it yourself if it is yours")]
    NotASocket(PathBuf),
    /// A sidecore could not start.
    #[error(transparent)]
    Sidecore(#[from] sidecore_core::SidecoreError),
    /// The socket's group does not exist.
    #[error("group {0}: no such group")]
    Group(String),
    /// Setting socket permissions failed.
    #[error("cannot set permissions of {path}")]
    Chmod {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the daemon failed.
    #[error("cannot connect to the sidecore daemon at {path} (is `sidecore daemon --socket {path}` running?)")]
    Connect {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The conversation failed.
    #[error("talking to the sidecore daemon: {0}")]
    Protocol(String),
    /// The daemon answered, and refused.
    #[error("the sidecore daemon refused: {0}")]
    Refused(String),
    /// Signal handling could not be set up.
    #[error("cannot install the SIGTERM handler")]
    Signal(#[source] std::io::Error),
    /// The socket systemd passed (socket activation) cannot be used.
    #[error("socket activation: {0}")]
    Activation(String),
    /// A thread's seccomp filter could not be built or installed.
    #[error("{0} (`sidecore daemon --no-seccomp` runs without the filters)")]
    Seccomp(String),
    /// The metrics endpoint could not be bound.
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        /// Address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// One sidecore per CPU.
    pub cores: Vec<usize>,
    /// Park idle sidecores after this long.
    pub idle_park: Option<Duration>,
    /// Group that may use the socket (else owner only).
    pub group: Option<String>,
    /// Prometheus endpoint.
    pub metrics: Option<String>,
    /// Run each thread under its seccomp filter ([`seccomp`]).
    pub seccomp: bool,
}

struct VmEntry {
    pid: i32,
    uid: u32,
    vcpus: u32,
    core: usize,
    control: Arc<VmControl>,
    stats: Arc<VmStats>,
    services: Arc<Services>,
    attached: Instant,
    /// The packet device's counters and its kicks that would have blocked,
    /// when the daemon serves one.
    device: Option<(Arc<sidecore_core::device::DeviceCounters>, Arc<AtomicU64>)>,
}

/// The running daemon's state.
pub struct Daemon {
    cores: Vec<Sidecore>,
    cpus: Vec<usize>,
    vms: Mutex<BTreeMap<u64, VmEntry>>,
    next_id: AtomicU64,
    started: Instant,
    stop: Arc<AtomicBool>,
    /// The TSC rate, read once at start: reading it takes a VM and a
    /// vCPU, which status requests and scrapes must not create.
    tsc: sidecore_core::tsc::TscRate,
    /// Connections that have not attached a VM (each has a thread until its
    /// request is answered or its deadline passes).
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

/// Most connections at once that have not attached a VM: more are answered
/// with an error and closed, so idle or slow clients cannot pile up threads.
pub const MAX_PENDING_CONNECTIONS: usize = 64;

/// How long a connection has to send its first whole request.
pub const FIRST_REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// A connection's place among the pending ones, given back once it attaches
/// or ends.
struct PendingSlot(Option<Arc<std::sync::atomic::AtomicUsize>>);

impl PendingSlot {
    fn release(&mut self) {
        if let Some(p) = self.0.take() {
            p.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.release();
    }
}

impl Daemon {
    /// Starts the sidecores.
    pub fn new(cfg: &DaemonConfig) -> Result<Arc<Daemon>, DaemonError> {
        let mut cores = Vec::new();
        let on_start = if cfg.seccomp {
            let prog = seccomp::program(seccomp::ThreadKind::Sidecore, &seccomp::Context::here(None))
                .map_err(DaemonError::Seccomp)?;
            Some(sidecore_core::StartHook::new(move || seccomp::install(seccomp::ThreadKind::Sidecore, &prog)))
        } else {
            None
        };
        for (k, cpu) in cfg.cores.iter().enumerate() {
            cores.push(Sidecore::spawn(
                SidecoreConfig {
                    cpu: *cpu,
                    name: format!("sidecore{k}"),
                    idle_park: cfg.idle_park,
                    on_start: on_start.clone(),
                },
                Vec::new(),
            )?);
        }
        // /dev/kvm only here, and only if usable: unprivileged, without
        // devices, the rate comes from CPUID or a 20 ms calibration.
        let freq = crate::host::open_kvm()
            .and_then(|k| crate::host::tsc_khz(&k))
            .ok()
            .or_else(crate::host::tsc_khz_without_kvm)
            .unwrap_or(crate::host::TscFreq { khz: 1_000_000, source: "nowhere (assumed 1 GHz: times are wrong)" });
        tracing::info!(khz = freq.khz, source = freq.source, "TSC rate");
        let tsc = sidecore_core::tsc::TscRate::from_khz(freq.khz);
        Ok(Arc::new(Daemon {
            cores,
            cpus: cfg.cores.clone(),
            vms: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            stop: Arc::new(AtomicBool::new(false)),
            tsc,
            pending: Arc::default(),
        }))
    }

    fn least_loaded(&self) -> usize {
        let vms =
            self.vms.lock().map(|m| m.values().map(|v| (v.core, v.vcpus)).collect::<Vec<_>>()).unwrap_or_default();
        let mut load = vec![0u32; self.cores.len()];
        for (c, n) in vms {
            if let Some(l) = load.get_mut(c) {
                *l += n;
            }
        }
        load.iter().enumerate().min_by_key(|(_, l)| **l).map_or(0, |(i, _)| i)
    }

    /// Sets up an attached VM; returns its id and sidecore index.
    fn attach(&self, req: &AttachRequest, files: &[File], cred: &libc::ucred) -> Result<(u64, usize), String> {
        let (guest, host, doorbell, device) = match (files, req.packet_device) {
            ([g, h], false) => (g, h, None, None),
            ([g, h, d], false) => (g, h, Some(d), None),
            ([g, h, d, sock, irq], true) => (g, h, Some(d), Some((sock, irq))),
            (_, false) => {
                return Err(format!(
                    "attach needs 2 or 3 fds (guest memory, host state, doorbell), got {}",
                    files.len()
                ))
            }
            (_, true) => {
                return Err(format!(
                "attach with packet_device needs 5 fds (guest memory, host state, doorbell, UDP socket, irqfd), got {}",
                files.len()
            ))
            }
        };
        // Every fd is checked for what it must be before anything is built:
        // memory must be a memfd that can never shrink under a mapping (a
        // truncated mapping would kill the daemon with SIGBUS).
        let guest_size = check_sealed(guest, "guest memory (fd 1)")?;
        let host_size = check_sealed(host, "host state (fd 2)")?;
        let doorbell = match doorbell {
            Some(d) if !is_eventfd(d) => {
                return Err(format!("doorbell (fd 3): not an eventfd ({}): pass the doorbell eventfd", fd_kind(d)))
            }
            Some(d) => {
                Some(Arc::new(std::os::fd::OwnedFd::from(d.try_clone().map_err(|e| format!("doorbell fd: {e}"))?)))
            }
            None => None,
        };
        let (pool_pages, host_len) = validate_attach(req, guest_size, host_size)?;
        let too_big = |_| "range too large".to_string();
        let shared_map = Mapping::new(guest, req.shared_gpa, usize::try_from(req.shared_size).map_err(too_big)?)
            .map_err(|e| e.to_string())?;
        let pool_map = Mapping::new(guest, req.pool_gpa, usize::try_from(req.pool_size).map_err(too_big)?)
            .map_err(|e| e.to_string())?;
        let host_map = Mapping::new(host, 0, host_len).map_err(|e| e.to_string())?;
        let (sp, sl) = (shared_map.ptr(), shared_map.len());
        // SAFETY: the mapping covers the region and lives as long as its owner.
        let region =
            Arc::new(unsafe { SharedRegion::new(sp, sl, req.vcpus, Arc::new(shared_map)) }.map_err(|e| e.to_string())?);
        let hp = host_map.ptr();
        // SAFETY: the mapping is host_len bytes and lives as long as its owner.
        let host_state = unsafe { HostShared::from_mapping(hp, host_len, pool_pages, Arc::new(host_map)) }
            .map_err(|e| e.to_string())?;
        let tables = sidecore_core::cpuid::tables_from_words(&req.cpuid);
        let layout = PteLayout {
            ram_size: req.ram_size,
            pool_gpa: req.pool_gpa,
            pool_size: req.pool_size,
            image_gpa: req.image_gpa,
            image_end: req.image_end,
            free_gpa: req.free_gpa,
        };
        // The daemon does not own the VM fd, so it cannot drop PVM's shadow
        // pages: changes and unmaps go back to the guest's own VMM.
        let visibility = if req.backend == "pvm" { Visibility::ExitPath } else { Visibility::GuestFlush };
        let pp = pool_map.ptr();
        // SAFETY: the pool mapping is pool_size bytes and lives as long as its owner.
        let pte = unsafe { PteService::new(layout, host_state.clone(), pp, Arc::new(pool_map), visibility) }
            .map_err(|e| e.to_string())?;
        let services = Arc::new(vm_services(tables, pte, host_state).map_err(|e| e.to_string())?);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(VmControl { id, ..Default::default() });
        let stats = Arc::new(VmStats::default());
        // All or nothing: every ring and the device are built before any
        // reaches a sidecore, which then takes them in one step.
        let mut parts = sidecore_core::Parts::default();
        for v in 0..req.vcpus {
            let mut ring = RingRef::with_control(region.clone(), v, services.clone(), stats.clone(), control.clone())
                .ok_or("ring outside the region")?;
            ring.set_timed(true);
            if let Some(d) = &doorbell {
                ring.set_doorbell(d.clone());
            }
            parts.rings.push(ring);
        }
        let device = match device {
            Some((sock, irq)) => {
                let (dev, kicks_blocked) =
                    packet_device(req, guest, guest_size, sock, irq, region.clone(), control.clone())?;
                let counters = dev.counters.clone();
                parts.devices.push(Box::new(dev));
                Some((counters, kicks_blocked))
            }
            None => None,
        };
        let core = self.least_loaded();
        let entry = VmEntry {
            pid: cred.pid,
            uid: cred.uid,
            vcpus: req.vcpus,
            core,
            control,
            stats,
            services,
            attached: Instant::now(),
            device,
        };
        self.vms.lock().map_err(|_| "daemon state poisoned")?.insert(id, entry);
        if let Err(e) = self.cores[core].add_parts(parts) {
            // Nothing reached the sidecore: undo the entry.
            self.detach(id);
            return Err(e.to_string());
        }
        tracing::info!(vm = id, pid = cred.pid, vcpus = req.vcpus, core, "attached");
        Ok((id, core))
    }

    fn detach(&self, id: u64) {
        if let Ok(mut m) = self.vms.lock() {
            if let Some(vm) = m.remove(&id) {
                vm.control.detached.store(true, Ordering::Relaxed);
                tracing::info!(vm = id, pid = vm.pid, "detached");
            }
        }
    }

    /// Plain numbers for the metrics endpoint.
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot::from(&self.status_report())
    }

    /// The status report as the control socket sends it: one JSON line.
    pub fn status(&self) -> String {
        serde_json::to_string(&self.status_report())
            .unwrap_or_else(|e| serde_json::json!({"ok": false, "error": format!("status report: {e}")}).to_string())
    }

    /// The status report.
    pub fn status_report(&self) -> StatusReport {
        let tsc = self.tsc;
        let sidecores = self
            .cores
            .iter()
            .zip(&self.cpus)
            .map(|(c, cpu)| {
                let s = c.stats();
                let sweeps = s.sweeps.load(Ordering::Relaxed);
                let busy = s.busy_sweeps.load(Ordering::Relaxed);
                CoreStatus {
                    cpu: *cpu,
                    rings: s.rings.load(Ordering::Relaxed) as u64,
                    served: s.served.load(Ordering::Relaxed),
                    sweeps,
                    busy_sweeps: busy,
                    busy_fraction: if sweeps > 0 { tsc_f64(busy) / tsc_f64(sweeps) } else { 0.0 },
                    parked: s.parked.load(Ordering::Relaxed) == 1,
                    parks: s.parks.load(Ordering::Relaxed),
                }
            })
            .collect();
        let vms = self
            .vms
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(id, vm)| {
                        let snap = vm.stats.snapshot();
                        let mut cumulative = 0;
                        let mut buckets = Vec::new();
                        let mut sum_ns = 0.0;
                        for (b, n) in snap.service.iter().enumerate() {
                            cumulative += n;
                            let upper_ns = tsc.ns(sidecore_core::stats::bucket_floor(b + 1));
                            sum_ns += tsc_f64(*n) * tsc.ns(sidecore_core::stats::bucket_floor(b));
                            if *n > 0 {
                                buckets.push((upper_ns, cumulative));
                            }
                        }
                        let q = |p: f64| snap.service_quantile(p).map(|c| tsc.ns(c));
                        VmStatus {
                            vm: *id,
                            pid: vm.pid,
                            uid: vm.uid,
                            vcpus: vm.vcpus,
                            sidecore: vm.core,
                            sidecore_cpu: self.cpus.get(vm.core).copied(),
                            attached_s: vm.attached.elapsed().as_secs_f64(),
                            paused: vm.control.paused.load(Ordering::Relaxed),
                            total: snap.total(),
                            rejected: snap.rejected(),
                            use_exit_path: snap.calls.iter().map(|row| row[Status::UseExitPath as usize]).sum(),
                            cancelled: snap.cancelled,
                            calls: snap
                                .nonzero()
                                .into_iter()
                                .map(|(op, st, n)| CallCount { op: op.to_string(), status: st.to_string(), count: n })
                                .collect(),
                            pte: vm.services.pte().map(|p| PteStatus {
                                maps: p.counters.maps.load(Ordering::Relaxed),
                                to_exit_path: p.counters.to_exit_path.load(Ordering::Relaxed),
                                refused: p.counters.refused.load(Ordering::Relaxed),
                            }),
                            device: vm.device.as_ref().map(|(d, kicks_blocked)| DeviceStatus {
                                rx: d.rx.load(Ordering::Relaxed),
                                tx: d.tx.load(Ordering::Relaxed),
                                rx_no_buffer: d.rx_no_buffer.load(Ordering::Relaxed),
                                bad_desc: d.bad_desc.load(Ordering::Relaxed),
                                interrupts: d.interrupts.load(Ordering::Relaxed),
                                kicks_blocked: kicks_blocked.load(Ordering::Relaxed),
                            }),
                            service_ns: Quantiles { p50: q(0.5), p90: q(0.9), p99: q(0.99), p999: q(0.999) },
                            service_buckets: buckets,
                            service_count: cumulative,
                            service_sum_ns: sum_ns,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        StatusReport {
            ok: true,
            uptime_s: self.started.elapsed().as_secs_f64(),
            ops: OP_CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
            sidecores,
            vms,
        }
    }

    fn serve_connection(self: &Arc<Daemon>, mut stream: UnixStream, group: Option<u32>, mut slot: PendingSlot) {
        // SAFETY: geteuid has no preconditions.
        let cred = match peer_allowed(&stream, unsafe { libc::geteuid() }, group) {
            Ok(c) => c,
            Err(e) => {
                reply_err(&mut stream, &e);
                return;
            }
        };
        let mut conn = Conn::new(stream);
        // Until it attaches, each request must arrive whole within the
        // deadline; requests sent in one write are answered in order.
        loop {
            let line = match conn.next_line(Wait::Within(FIRST_REQUEST_DEADLINE)) {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    conn.reply_err(&e);
                    return;
                }
            };
            if line.trim_ascii().is_empty() {
                continue;
            }
            let req: Request = match serde_json::from_slice(line.trim_ascii()) {
                Ok(r) => r,
                Err(e) => {
                    conn.reply_err(&format!("malformed request: {e}"));
                    return;
                }
            };
            match req {
                Request::Status => {
                    if !conn.reply(&self.status()) {
                        return;
                    }
                }
                Request::Pause | Request::Resume => {
                    conn.reply_err("pause/resume need an attached VM on this connection");
                    return;
                }
                Request::Attach(a) => {
                    let files = conn.take_files();
                    let (id, core) = match self.attach(&a, &files, &cred) {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(pid = cred.pid, uid = cred.uid, "attach refused: {e}");
                            conn.reply_err(&format!("attach refused: {e}"));
                            return;
                        }
                    };
                    // The daemon keeps its own mappings and duplicates.
                    drop(files);
                    // Attached: the connection lives as long as the VM.
                    slot.release();
                    let ok = serde_json::json!({"ok": true, "vm": id, "sidecore": core, "sidecore_cpu": self.cpus.get(core)});
                    if conn.reply(&ok.to_string()) {
                        self.attached_loop(id, &mut conn);
                    }
                    self.detach(id);
                    return;
                }
            }
        }
    }

    /// Serves an attached VM's connection until it hangs up: idle as long
    /// as it likes between requests, [`REQUEST_DEADLINE`] for each line.
    fn attached_loop(&self, id: u64, conn: &mut Conn) {
        loop {
            let line = match conn.next_line(Wait::IdleThen(REQUEST_DEADLINE)) {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    conn.reply_err(&e);
                    return;
                }
            };
            conn.drop_files();
            if line.trim_ascii().is_empty() {
                continue;
            }
            let control = self.vms.lock().ok().and_then(|m| m.get(&id).map(|v| v.control.clone()));
            let Some(control) = control else { return };
            let sent = match serde_json::from_slice::<Request>(line.trim_ascii()) {
                Ok(Request::Pause) => {
                    control.paused.store(true, Ordering::Relaxed);
                    conn.reply(&serde_json::json!({"ok": true}).to_string())
                }
                Ok(Request::Resume) => {
                    control.paused.store(false, Ordering::Relaxed);
                    conn.reply(&serde_json::json!({"ok": true}).to_string())
                }
                Ok(Request::Status) => conn.reply(&self.status()),
                Ok(Request::Attach(_)) => {
                    conn.reply_err("this connection already has a VM attached");
                    return;
                }
                Err(e) => {
                    conn.reply_err(&format!("malformed request: {e}"));
                    return;
                }
            };
            if !sent {
                return;
            }
        }
    }
}

fn tsc_f64(v: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let f = v as f64;
    f
}

/// Runs the daemon until SIGTERM or SIGINT; `listening` is called once the
/// socket accepts connections.
pub fn run_daemon(cfg: &DaemonConfig, listening: impl FnOnce(&DaemonConfig)) -> Result<(), DaemonError> {
    // A socket passed by systemd is its to own: not chmod-ed, chown-ed or
    // removed here.
    let activated = systemd::activated_listener(&cfg.socket).map_err(DaemonError::Activation)?;
    let group = match &cfg.group {
        Some(g) => Some(group_gid(g).ok_or_else(|| DaemonError::Group(g.clone()))?),
        None => None,
    };
    let owns_socket = activated.is_none();
    let listener = match activated {
        Some(l) => l,
        None => bind_socket(cfg, group)?,
    };
    let remover = match owns_socket {
        true => Some(seccomp::SocketRemover::new(&cfg.socket).map_err(DaemonError::Seccomp)?),
        false => None,
    };
    // The signal that bounds a sidecore's write to a VMM's irqfd: its
    // handler is installed now, before the filters forbid rt_sigaction.
    sidecore_core::nowait::install_handler().map_err(DaemonError::Signal)?;
    let daemon = Daemon::new(cfg)?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, daemon.stop.clone()).map_err(DaemonError::Signal)?;
    }
    if let Some(addr) = &cfg.metrics {
        let d = daemon.clone();
        let filter = match cfg.seccomp {
            true => Some(
                seccomp::program(seccomp::ThreadKind::Metrics, &seccomp::Context::here(None))
                    .map_err(DaemonError::Seccomp)?,
            ),
            false => None,
        };
        let on_start = filter.map(|p| move || seccomp::install(seccomp::ThreadKind::Metrics, &p));
        crate::daemon::metrics::serve_with(addr, move || d.metrics_snapshot(), on_start).map_err(|e| match e {
            metrics::ServeError::Io(source) => DaemonError::Metrics { addr: addr.clone(), source },
            metrics::ServeError::Start(reason) => DaemonError::Seccomp(reason),
        })?;
    }
    listener.set_nonblocking(true).map_err(|source| DaemonError::Bind { path: cfg.socket.clone(), source })?;
    // From here on the main thread (and every connection thread it starts)
    // runs under the control filter.
    let notifier = systemd::Notifier::connect();
    if cfg.seccomp {
        let prog = seccomp::program(
            seccomp::ThreadKind::Control,
            &seccomp::Context::here(remover.as_ref().map(seccomp::SocketRemover::dir_fd)),
        )
        .map_err(DaemonError::Seccomp)?;
        seccomp::install(seccomp::ThreadKind::Control, &prog).map_err(DaemonError::Seccomp)?;
    }
    listening(cfg);
    notifier.ready(&format!(
        "serving on {} with sidecores on CPU {}",
        cfg.socket.display(),
        crate::host::format_cpu_list(&cfg.cores)
    ));
    while !daemon.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                if daemon.pending.load(Ordering::Relaxed) >= MAX_PENDING_CONNECTIONS {
                    // A short line into a fresh socket's empty buffer: it
                    // does not block.
                    reply_err(&mut stream, "too many connections waiting to be served: try again later");
                    continue;
                }
                daemon.pending.fetch_add(1, Ordering::Relaxed);
                let slot = PendingSlot(Some(daemon.pending.clone()));
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(FIRST_REQUEST_DEADLINE));
                let d = daemon.clone();
                let _ = std::thread::Builder::new()
                    .name("sidecore-conn".into())
                    .spawn(move || d.serve_connection(stream, group, slot));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
    // Drain: detach everyone (their guests fall back to the exit paths), stop
    // the sidecores, remove the socket (unless systemd owns it).
    notifier.stopping();
    let ids: Vec<u64> = daemon.vms.lock().map(|m| m.keys().copied().collect()).unwrap_or_default();
    for id in ids {
        daemon.detach(id);
    }
    if let Some(r) = remover {
        r.remove();
    }
    Ok(())
}

/// Binds `--socket`, 0600 or 0660 for `group`. Only a stale socket at the
/// path is removed: never a file, directory or symlink.
fn bind_socket(cfg: &DaemonConfig, group: Option<u32>) -> Result<UnixListener, DaemonError> {
    if let Ok(meta) = std::fs::symlink_metadata(&cfg.socket) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(DaemonError::NotASocket(cfg.socket.clone()));
        }
        if UnixStream::connect(&cfg.socket).is_ok() {
            return Err(DaemonError::InUse(cfg.socket.clone()));
        }
        let _ = std::fs::remove_file(&cfg.socket);
    }
    let listener =
        UnixListener::bind(&cfg.socket).map_err(|source| DaemonError::Bind { path: cfg.socket.clone(), source })?;
    let chmod = |mode| {
        std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(mode))
            .map_err(|source| DaemonError::Chmod { path: cfg.socket.clone(), source })
    };
    match group {
        Some(gid) => {
            // Created with the daemon's gid: when that is the group already
            // (the systemd unit's Group=), no chown, which its system call
            // filter does not allow.
            let created = std::fs::metadata(&cfg.socket)
                .map_err(|source| DaemonError::Chmod { path: cfg.socket.clone(), source })?;
            if std::os::unix::fs::MetadataExt::gid(&created) != gid {
                std::os::unix::fs::chown(&cfg.socket, None, Some(gid))
                    .map_err(|source| DaemonError::Chmod { path: cfg.socket.clone(), source })?;
            }
            chmod(0o660)?;
        }
        None => chmod(0o600)?,
    }
    Ok(listener)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert!(matches!(serde_json::from_str::<Request>(r#"{"op":"status"}"#), Ok(Request::Status)));
        assert!(matches!(serde_json::from_str::<Request>(r#"{"op":"pause"}"#), Ok(Request::Pause)));
        assert!(serde_json::from_str::<Request>(r#"{"op":"nuke"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"attach","vcpus":1}"#).is_err());
        assert!(serde_json::from_str::<Request>("[]").is_err());
    }

    fn good() -> AttachRequest {
        AttachRequest {
            vcpus: 1,
            backend: "pvm".into(),
            ram_size: 64 << 20,
            shared_gpa: 0x40_0000,
            shared_size: 0x3000,
            pool_gpa: 0x10_0000,
            pool_size: 0x10_0000,
            image_gpa: 0x20_0000,
            image_end: 0x21_0000,
            free_gpa: 0x60_0000,
            cpuid: vec![vec![[0; 7]]],
            packet_device: false,
        }
    }

    #[test]
    fn attach_validation_refuses_hostile_layouts() {
        assert_eq!(validate_attach(&good(), 64 << 20, 8192), Ok((256, 8192)));
        type Mutation = Box<dyn Fn(&mut AttachRequest)>;
        let bad: Vec<Mutation> = vec![
            Box::new(|r| r.vcpus = 0),
            Box::new(|r| r.vcpus = 99),
            Box::new(|r| r.cpuid.clear()),
            Box::new(|r| r.ram_size = 1 << 40),
            Box::new(|r| r.shared_gpa = u64::MAX - 10),
            Box::new(|r| r.shared_gpa = 0x40_0001),
            Box::new(|r| r.shared_size = 0x1000),
            Box::new(|r| r.pool_size = 0),
            Box::new(|r| r.pool_gpa = 0x40_0000),
            Box::new(|r| r.image_end = 1),
            Box::new(|r| r.free_gpa = u64::MAX),
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut r = good();
            f(&mut r);
            assert!(validate_attach(&r, 64 << 20, 8192).is_err(), "case {i}");
        }
        assert!(validate_attach(&good(), 64 << 20, 100).is_err());
    }

    #[test]
    fn status_text_survives_odd_json() {
        let parse = |v: serde_json::Value| serde_json::from_value::<StatusReport>(v);
        let r =
            parse(serde_json::json!({"uptime_s": 3.0, "sidecores": [{"cpu": 0}], "vms": [{"vm": 1, "calls": [{}]}]}))
                .expect("missing fields take their defaults");
        assert!(format_status(&r).contains("1 VM(s) attached"));
        assert!(parse(serde_json::json!(null)).is_err(), "not a report: an error, not a panic");
        assert!(parse(serde_json::json!({"vms": 3})).is_err());
        let r = parse(serde_json::json!({"vms": [{"vm": 2, "device": {"rx": 5, "tx": 4, "rx_no_buffer": 1,
            "bad_desc": 0, "interrupts": 3}}]}))
        .expect("report");
        let t = format_status(&r);
        assert!(
            t.contains("packet device: 5 rx, 4 tx, 1 dropped (no buffer), 0 bad descriptors, 3 wake-up interrupts"),
            "{t}"
        );
    }

    #[test]
    fn the_metrics_snapshot_is_read_from_the_status_report() {
        let r = StatusReport {
            sidecores: vec![CoreStatus { cpu: 3, served: 7, busy_sweeps: 2, ..CoreStatus::default() }],
            vms: vec![VmStatus {
                vm: 9,
                sidecore_cpu: Some(3),
                calls: vec![CallCount { op: "null".into(), status: "ok".into(), count: 5 }],
                service_count: 5,
                ..VmStatus::default()
            }],
            ..StatusReport::default()
        };
        let m = MetricsSnapshot::from(&r);
        assert_eq!((m.cores[0].cpu, m.cores[0].served, m.cores[0].busy_sweeps), (3, 7, 2));
        assert_eq!((m.vms[0].vm, m.vms[0].sidecore_cpu, m.vms[0].service_count), (9, 3, 5));
        assert_eq!(m.vms[0].calls, vec![("null".to_string(), "ok".to_string(), 5)]);
    }
}
