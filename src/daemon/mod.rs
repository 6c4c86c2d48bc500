//! `sidecore daemon`: one process owns dedicated cores and serves the
//! sidecalls of every VM on the host, whichever VMM process runs it.
//!
//! Control socket: JSON-RPC 2.0, one message per line ([`protocol`]).
//!
//! * `attach` (params: the VM's layout and CPUID tables, [`AttachRequest`])
//!   with the guest memory memfd, the host-state memfd and the doorbell
//!   passed by SCM_RIGHTS: the daemon maps the shared region and the
//!   page-table pool, takes the VM's rings on the least-loaded sidecore and
//!   returns `{"vm":ID,"name":..,"sidecore":K,"sidecore_cpu":CPU}`. The
//!   connection stays open for the VM's life; its hang-up detaches the VM.
//! * `pause` / `resume` on that connection stop and restart serving the VM
//!   (its calls fall back meanwhile).
//! * `hello` (versions, capabilities), `methods`, `status` (VMs, counters,
//!   service times, sidecores: `sidecore status`), `subscribe` /
//!   `unsubscribe` (events, [`events`]), on any connection, many per
//!   connection, pipelined or batched.
//!
//! A bad request gets a JSON-RPC error under its id and the connection
//! lives on; a connection that breaks the framing (a line over
//! [`MAX_MESSAGE`], too many fds, a request not whole in time) gets an
//! error with a null id and is closed. The daemon lives on either way.

mod attach;
pub mod client;
pub mod events;
pub mod metrics;
pub mod process;
pub mod protocol;
pub mod seccomp;
pub mod status;
mod systemd;
mod transport;
mod vhost;

pub use attach::validate_attach;
use attach::*;
pub use client::{format_status, query_hello, query_status, Attachment, Client};
pub use protocol::{AttachRequest, MAX_MESSAGE};
use transport::*;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
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
pub use status::{CallCount, CoreStatus, DeviceStatus, PteStatus, Quantiles, ServiceHistogram, StatusReport, VmStatus};
pub use vhost::{BlkQueueStatus, BlkStatus};

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
    /// A vhost-user device could not be set up.
    #[error("--vhost-user-blk: {0}")]
    Vhost(String),
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

/// The control socket when `--socket` is not given (`daemon`, `status`,
/// `run --attach`): the systemd unit's RuntimeDirectory.
pub const DEFAULT_SOCKET: &str = "/run/sidecore/sidecore.sock";

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
    /// vhost-user-blk devices to serve from the start.
    pub vhost_blk: Vec<crate::vhost::BlkSpec>,
}

struct VmEntry {
    /// The name metrics and events label it with.
    name: String,
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
    /// Event subscribers.
    events: events::Events,
    /// vhost-user devices.
    vhost: vhost::Devices,
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
            events: events::Events::default(),
            vhost: vhost::Devices::default(),
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

    /// Sets up an attached VM; returns its id, sidecore index and name.
    fn attach(&self, req: &AttachRequest, files: &[File], cred: &libc::ucred) -> Result<(u64, usize, String), String> {
        if let Some(n) = &req.name {
            protocol::check_name(n)?;
            if n.strip_prefix("vm").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
                return Err(format!("VM name {n:?}: names vm<number> are the daemon's defaults; pick another"));
            }
        }
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
        let pte = if req.page_tables {
            let pool_map = Mapping::new(guest, req.pool_gpa, usize::try_from(req.pool_size).map_err(too_big)?)
                .map_err(|e| e.to_string())?;
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
            Some(
                unsafe { PteService::new(layout, host_state.clone(), pp, Arc::new(pool_map), visibility) }
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let services = Arc::new(vm_services(tables, pte, host_state).map_err(|e| e.to_string())?);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(VmControl { id, ..Default::default() });
        let stats = Arc::new(VmStats::with_tsc(self.tsc));
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
        let name = req.name.clone().unwrap_or_else(|| format!("vm{id}"));
        let entry = VmEntry {
            name: name.clone(),
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
        {
            let mut vms = self.vms.lock().map_err(|_| "daemon state poisoned")?;
            if vms.values().any(|v| v.name == name) {
                return Err(format!("a VM named {name:?} is attached already: names must be unique"));
            }
            vms.insert(id, entry);
        }
        if let Err(e) = self.cores[core].add_parts(parts) {
            // Nothing reached the sidecore: undo the entry.
            self.detach(id);
            return Err(e.to_string());
        }
        let cpu = self.cpus.get(core).copied();
        tracing::info!(vm = id, name = %name, pid = cred.pid, vcpus = req.vcpus, cpu, "attached");
        self.events.publish(protocol::Event {
            event: "attach".into(),
            vm: Some(id),
            pid: Some(cred.pid),
            name: Some(name.clone()),
            cpu,
            ..events::now()
        });
        Ok((id, core, name))
    }

    fn detach(&self, id: u64) {
        let gone = self.vms.lock().ok().and_then(|mut m| m.remove(&id));
        if let Some(vm) = gone {
            vm.control.detached.store(true, Ordering::Relaxed);
            tracing::info!(vm = id, name = %vm.name, pid = vm.pid, "detached");
            self.events.publish(protocol::Event {
                event: "detach".into(),
                vm: Some(id),
                pid: Some(vm.pid),
                name: Some(vm.name),
                ..events::now()
            });
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
                        let (buckets, count, sum) = snap.fixed_seconds();
                        let q = |p: f64| snap.service_quantile(p).map(|c| tsc.ns(c));
                        VmStatus {
                            vm: *id,
                            name: vm.name.clone(),
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
                            service_seconds: ServiceHistogram { buckets, count, sum },
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
            vhost_user_blk: self.vhost_status(),
        }
    }

    fn serve_connection(self: &Arc<Daemon>, mut stream: UnixStream, group: Option<u32>, slot: PendingSlot) {
        // SAFETY: geteuid has no preconditions.
        let cred = match peer_allowed(&stream, unsafe { libc::geteuid() }, group) {
            Ok(c) => c,
            Err(e) => {
                reply_error(&mut stream, protocol::code::PERMISSION_DENIED, &e);
                return;
            }
        };
        let mut session = Session { conn: Conn::new(stream), cred, vm: None, sub: None, slot };
        self.session_loop(&mut session);
        if let Some(id) = session.vm {
            self.detach(id);
        }
        if let Some(sub) = session.sub {
            self.events.remove(&sub);
        }
    }

    /// Answers a connection's requests, and sends it the events it
    /// subscribed to, until it hangs up or breaks the framing. Until it
    /// attaches a VM or subscribes, each request must arrive whole within
    /// [`FIRST_REQUEST_DEADLINE`]; after, it may idle as long as it likes
    /// between requests, and has [`REQUEST_DEADLINE`] for each line.
    fn session_loop(&self, s: &mut Session) {
        loop {
            if let Some(sub) = &s.sub {
                if !sub.flush(&mut s.conn) {
                    return;
                }
                if !s.conn.has_line() {
                    match s.conn.wait_readable(sub.wake_fd()) {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::debug!("poll on a subscriber: {e}");
                            return;
                        }
                    }
                }
            }
            let wait = match s.vm.is_some() || s.sub.is_some() {
                true => Wait::IdleThen(REQUEST_DEADLINE),
                false => Wait::Within(FIRST_REQUEST_DEADLINE),
            };
            let line = match s.conn.next_line(wait) {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    s.conn.reply_error(protocol::code::FRAMING, &e);
                    return;
                }
            };
            if s.vm.is_some() {
                // fds no request takes must not accumulate.
                s.conn.drop_files();
            }
            if line.trim_ascii().is_empty() {
                continue;
            }
            let reply = match protocol::parse_message(line.trim_ascii()) {
                protocol::Message::One(call) => self.handle(s, call, false),
                protocol::Message::Batch(calls) => {
                    let replies: Vec<_> = calls.into_iter().filter_map(|c| self.handle(s, c, true)).collect();
                    (!replies.is_empty()).then_some(serde_json::Value::Array(replies))
                }
            };
            if let Some(r) = reply {
                if !s.conn.reply(&r.to_string()) {
                    return;
                }
            }
        }
    }

    /// Carries out one call; its reply, unless it is a notification.
    fn handle(
        &self,
        s: &mut Session,
        call: Result<protocol::Call, protocol::BadCall>,
        in_batch: bool,
    ) -> Option<serde_json::Value> {
        use protocol::{code, Method, RpcError};
        let (id, result) = match call {
            Err(bad) => (bad.id, Err(bad.error)),
            Ok(protocol::Call { id, method }) => {
                let r = match method {
                    Method::Hello => serde_json::to_value(protocol::Hello::here())
                        .map_err(|e| RpcError::new(code::INTERNAL_ERROR, e.to_string())),
                    Method::Methods => Ok(serde_json::json!(protocol::METHODS)),
                    Method::Status => serde_json::to_value(self.status_report())
                        .map_err(|e| RpcError::new(code::INTERNAL_ERROR, format!("status report: {e}"))),
                    Method::Attach(_) if in_batch => Err(RpcError::new(
                        code::INVALID_REQUEST,
                        "attach cannot be part of a batch: send it alone, with its fds",
                    )),
                    Method::Attach(_) if s.vm.is_some() => {
                        Err(RpcError::new(code::ALREADY_ATTACHED, "this connection already has a VM attached"))
                    }
                    Method::Attach(a) => self.attach_call(s, &a),
                    Method::Pause | Method::Resume => self.set_paused(s, matches!(method, Method::Pause)),
                    Method::Subscribe(p) => self.subscribe(s, p),
                    Method::VhostBlkAdd(_) | Method::VhostBlkRemove(_) if !device_admin(&s.cred) => Err(RpcError::new(
                        code::PERMISSION_DENIED,
                        "only the daemon's own user (or root) may add or remove devices: the daemon opens \
                             their images with its rights",
                    )),
                    Method::VhostBlkAdd(spec) => {
                        let socket = spec.socket.display().to_string();
                        self.add_vhost_blk(spec)
                            .map(|()| serde_json::json!({"socket": socket}))
                            .map_err(|e| RpcError::new(code::DEVICE_REFUSED, e))
                    }
                    Method::VhostBlkRemove(p) => self
                        .remove_vhost_blk(&p)
                        .map(|()| serde_json::json!({"removed": p.display().to_string()}))
                        .map_err(|e| RpcError::new(code::DEVICE_REFUSED, e)),
                    Method::Unsubscribe => {
                        if let Some(sub) = &s.sub {
                            sub.set_kinds(Some(Vec::new()));
                        }
                        Ok(serde_json::json!({"events": []}))
                    }
                };
                (id, r)
            }
        };
        let id = id?;
        Some(match result {
            Ok(v) => protocol::response(&id, v),
            Err(e) => protocol::error_response(&id, &e),
        })
    }

    fn attach_call(&self, s: &mut Session, a: &AttachRequest) -> Result<serde_json::Value, protocol::RpcError> {
        let files = s.conn.take_files();
        let (id, core, name) = self.attach(a, &files, &s.cred).map_err(|e| {
            tracing::warn!(pid = s.cred.pid, uid = s.cred.uid, "attach refused: {e}");
            protocol::RpcError::new(protocol::code::ATTACH_REFUSED, format!("attach refused: {e}"))
        })?;
        // The daemon keeps its own mappings and duplicates.
        drop(files);
        // Attached: the connection lives as long as the VM.
        s.vm = Some(id);
        s.slot.release();
        Ok(serde_json::json!({"vm": id, "name": name, "sidecore": core, "sidecore_cpu": self.cpus.get(core)}))
    }

    fn set_paused(&self, s: &Session, paused: bool) -> Result<serde_json::Value, protocol::RpcError> {
        let not_attached = || {
            protocol::RpcError::new(protocol::code::NOT_ATTACHED, "pause/resume need a VM attached on this connection")
        };
        let id = s.vm.ok_or_else(not_attached)?;
        let (control, pid, name) = self
            .vms
            .lock()
            .ok()
            .and_then(|m| m.get(&id).map(|v| (v.control.clone(), v.pid, v.name.clone())))
            .ok_or_else(not_attached)?;
        let was = control.paused.swap(paused, Ordering::Relaxed);
        if was != paused {
            tracing::info!(vm = id, pid, name = %name, "{}", if paused { "paused" } else { "resumed" });
            self.events.publish(protocol::Event {
                event: if paused { "pause" } else { "resume" }.into(),
                vm: Some(id),
                pid: Some(pid),
                name: Some(name),
                ..events::now()
            });
        }
        Ok(serde_json::json!({"paused": paused}))
    }

    fn subscribe(
        &self,
        s: &mut Session,
        p: protocol::SubscribeParams,
    ) -> Result<serde_json::Value, protocol::RpcError> {
        use protocol::{code, RpcError};
        if let Some(kinds) = &p.events {
            if let Some(bad) = kinds.iter().find(|k| !protocol::EVENT_KINDS.contains(&k.as_str())) {
                return Err(RpcError::new(
                    code::INVALID_PARAMS,
                    format!("no event {bad:?}: the daemon has {}", protocol::EVENT_KINDS.join(", ")),
                ));
            }
        }
        let listed = p.events.clone().unwrap_or_else(|| protocol::EVENT_KINDS.iter().map(|k| (*k).into()).collect());
        match &s.sub {
            Some(sub) => sub.set_kinds(p.events),
            None => {
                let sub = self.events.add(p.events).map_err(|e| RpcError::new(code::BUSY, e))?;
                s.sub = Some(sub);
                // A subscriber holds a subscriber's place, not a pending one.
                s.slot.release();
            }
        }
        Ok(serde_json::json!({"events": listed}))
    }
}

/// One control connection's state.
struct Session {
    conn: Conn,
    cred: libc::ucred,
    /// The VM it attached.
    vm: Option<u64>,
    /// Its event subscription.
    sub: Option<Arc<events::Subscriber>>,
    slot: PendingSlot,
}

/// Whether the peer may add and remove devices: the daemon's own user or
/// root, never only a member of `--group`.
fn device_admin(cred: &libc::ucred) -> bool {
    // SAFETY: geteuid has no preconditions.
    cred.uid == 0 || cred.uid == unsafe { libc::geteuid() }
}

/// Calls per second a VM's sidecore sends to its exit path before that is
/// a `fallback_storm` event (and `fallback_calm` once it drops below a
/// tenth of it).
pub const FALLBACK_STORM_RATE: f64 = 1000.0;

/// Watches, from the accept loop, what no request reports: sidecores
/// parking and unparking, and VMs whose calls fall back in storms.
#[derive(Default)]
struct Monitor {
    parked: Vec<bool>,
    last: Option<Instant>,
    /// Per VM: exit-path count at the last look, and whether it storms.
    vms: BTreeMap<u64, (u64, bool)>,
}

impl Monitor {
    /// Park changes every call (a load per sidecore); fallback rates once a
    /// second.
    fn tick(&mut self, d: &Daemon) {
        self.parked.resize(d.cores.len(), false);
        for (k, (core, was)) in d.cores.iter().zip(self.parked.iter_mut()).enumerate() {
            let now = core.stats().parked.load(Ordering::Relaxed) == 1;
            if now != *was {
                *was = now;
                let cpu = d.cpus.get(k).copied();
                tracing::debug!(cpu, "sidecore {}", if now { "parked" } else { "unparked" });
                d.events.publish(protocol::Event {
                    event: if now { "sidecore_park" } else { "sidecore_unpark" }.into(),
                    cpu,
                    ..events::now()
                });
            }
        }
        let due = self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if !due {
            return;
        }
        let dt = self.last.map_or(1.0, |t| t.elapsed().as_secs_f64()).max(1e-3);
        self.last = Some(Instant::now());
        let vms: Vec<(u64, u64, i32, String)> = d
            .vms
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(id, v)| {
                        let snap = v.stats.snapshot();
                        let exits = snap.calls.iter().map(|row| row[Status::UseExitPath as usize]).sum();
                        (*id, exits, v.pid, v.name.clone())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut seen = BTreeMap::new();
        for (id, exits, pid, name) in vms {
            let (before, storming) = self.vms.get(&id).copied().unwrap_or((exits, false));
            let rate = tsc_f64(exits.saturating_sub(before)) / dt;
            let now_storming = if storming { rate >= FALLBACK_STORM_RATE / 10.0 } else { rate >= FALLBACK_STORM_RATE };
            if now_storming != storming {
                let kind = if now_storming { "fallback_storm" } else { "fallback_calm" };
                if now_storming {
                    tracing::warn!(vm = id, name = %name, rate, "calls falling back to the exit path");
                } else {
                    tracing::info!(vm = id, name = %name, rate, "fallbacks calmed");
                }
                d.events.publish(protocol::Event {
                    event: kind.into(),
                    vm: Some(id),
                    pid: Some(pid),
                    name: Some(name),
                    rate: Some(rate),
                    ..events::now()
                });
            }
            seen.insert(id, (exits, now_storming));
        }
        self.vms = seen;
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
    // Before the control filter: the vhost threads have their own.
    daemon.start_vhost_manager(cfg.seccomp)?;
    for spec in &cfg.vhost_blk {
        daemon.add_vhost_blk(spec.clone()).map_err(DaemonError::Vhost)?;
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
    let mut monitor = Monitor::default();
    while !daemon.stop.load(Ordering::Relaxed) {
        monitor.tick(&daemon);
        match listener.accept() {
            Ok((mut stream, _)) => {
                if daemon.pending.load(Ordering::Relaxed) >= MAX_PENDING_CONNECTIONS {
                    // A short line into a fresh socket's empty buffer: it
                    // does not block.
                    reply_error(
                        &mut stream,
                        protocol::code::BUSY,
                        "too many connections waiting to be served: try again later",
                    );
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
    daemon.remove_all_vhost();
    if let Some(r) = remover {
        r.remove();
    }
    Ok(())
}

/// Binds `--socket`, 0600 or 0660 for `group`. Only a stale socket at the
/// path is removed: never a file, directory or symlink.
fn bind_socket(cfg: &DaemonConfig, group: Option<u32>) -> Result<UnixListener, DaemonError> {
    if cfg.socket == Path::new(DEFAULT_SOCKET) {
        if let Some(dir) = cfg.socket.parent().filter(|d| !d.exists()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|source| DaemonError::Bind { path: cfg.socket.clone(), source })?;
        }
    }
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
            page_tables: true,
            cpuid: vec![vec![[0; 7]]],
            packet_device: false,
            name: None,
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

    /// A guest whose page tables are its own (Linux) attaches without a
    /// pool, and may not sneak one in; an old VMM's request (no field) is a
    /// guest-agent's.
    #[test]
    fn attach_without_page_tables_needs_no_pool_and_takes_none() {
        let linux = || AttachRequest { page_tables: false, pool_gpa: 0, pool_size: 0, ..good() };
        let host = HostShared::size(0) as u64;
        assert_eq!(validate_attach(&linux(), 64 << 20, host), Ok((0, HostShared::size(0))));
        let sneaky = AttachRequest { pool_gpa: 0x10_0000, pool_size: 0x1000, ..linux() };
        assert!(validate_attach(&sneaky, 64 << 20, host).unwrap_err().contains("page_tables false"));
        let mut v = serde_json::to_value(good()).unwrap();
        v.as_object_mut().unwrap().remove("page_tables");
        assert!(serde_json::from_value::<AttachRequest>(v).unwrap().page_tables);
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
                name: "db".into(),
                sidecore_cpu: Some(3),
                calls: vec![CallCount { op: "null".into(), status: "ok".into(), count: 5 }],
                service_seconds: ServiceHistogram { count: 5, ..ServiceHistogram::default() },
                ..VmStatus::default()
            }],
            ..StatusReport::default()
        };
        let m = MetricsSnapshot::from(&r);
        assert_eq!((m.cores[0].cpu, m.cores[0].served, m.cores[0].busy_sweeps), (3, 7, 2));
        assert_eq!(
            (m.vms[0].vm, m.vms[0].name.as_str(), m.vms[0].sidecore_cpu, m.vms[0].service.count),
            (9, "db", 3, 5)
        );
        assert_eq!(m.vms[0].calls, vec![("null".to_string(), "ok".to_string(), 5)]);
    }
}
