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

pub mod metrics;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
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
use crate::host::memfd::Mapping;
use sidecore_core::hypercalls::register_vmm_hypercalls;

/// Largest request line.
pub const MAX_MESSAGE: usize = 1 << 20;

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
    #[error("a daemon is already listening on {0} — stop it first or pick another --socket")]
    InUse(PathBuf),
    /// A sidecore could not start.
    #[error(transparent)]
    Sidecore(#[from] sidecore_core::SidecoreError),
    /// --group names no group.
    #[error("--group {0}: no such group")]
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
    /// Signal handling could not be set up.
    #[error("cannot install the SIGTERM handler")]
    Signal(#[source] std::io::Error),
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

/// A request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Attach a VM (two fds come with it).
    Attach(AttachRequest),
    /// Stop serving this connection's VM.
    Pause,
    /// Serve it again.
    Resume,
    /// Report.
    Status,
}

/// What a VMM tells the daemon about its VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// vCPUs (rings).
    pub vcpus: u32,
    /// `pvm`, `vmx` or `svm`.
    pub backend: String,
    /// Guest RAM size (the guest memfd's size).
    pub ram_size: u64,
    /// Shared region GPA (= offset in the guest memfd).
    pub shared_gpa: u64,
    /// Shared region size.
    pub shared_size: u64,
    /// Page-table pool GPA.
    pub pool_gpa: u64,
    /// Page-table pool size.
    pub pool_size: u64,
    /// Image start.
    pub image_gpa: u64,
    /// Image end.
    pub image_end: u64,
    /// First byte of free RAM.
    pub free_gpa: u64,
    /// Per vCPU: its CPUID table as `[function, index, flags, eax, ebx, ecx, edx]`.
    pub cpuid: Vec<Vec<[u32; 7]>>,
    /// Serve vCPU 0's packet device too: the message then carries two more
    /// fds, the device's UDP socket and vCPU 0's irqfd (an eventfd), and the
    /// daemon maps the free RAM (`free_gpa` ..`ram_size`) for its buffers.
    #[serde(default)]
    pub packet_device: bool,
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
    /// The packet device's counters, when the daemon serves one.
    device: Option<Arc<sidecore_core::device::DeviceCounters>>,
}

/// The running daemon's state.
pub struct Daemon {
    cores: Vec<Sidecore>,
    cpus: Vec<usize>,
    vms: Mutex<BTreeMap<u64, VmEntry>>,
    next_id: AtomicU64,
    started: Instant,
    stop: Arc<AtomicBool>,
    /// The TSC rate in GHz, read once at start: reading it takes a VM and a
    /// vCPU, which status requests and scrapes must not create.
    tsc_ghz: f64,
}

fn reply_err(stream: &mut UnixStream, msg: &str) {
    let _ = writeln!(stream, "{}", serde_json::json!({"ok": false, "error": msg}));
}

fn peer_cred(stream: &UnixStream) -> Option<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred)
}

fn group_gid(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam takes a NUL-terminated name and returns a pointer to
    // static storage or null; we read one field right away.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    // SAFETY: non-null g points at a valid group struct.
    (!g.is_null()).then(|| unsafe { (*g).gr_gid })
}

/// Reads one line of at most [`MAX_MESSAGE`] bytes; `Ok(None)` at EOF.
fn read_line(r: &mut BufReader<UnixStream>) -> Result<Option<String>, String> {
    let mut buf = Vec::new();
    let n = r.by_ref().take(MAX_MESSAGE as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > MAX_MESSAGE {
        return Err(format!("message longer than {MAX_MESSAGE} bytes"));
    }
    String::from_utf8(buf).map(Some).map_err(|_| "message is not UTF-8".into())
}

/// The packet device of an attaching VM: its UDP socket (checked to be
/// one), vCPU 0's irqfd (checked to be an eventfd), and a mapping of the
/// guest's free RAM for the buffers.
fn packet_device(
    req: &AttachRequest,
    guest: &File,
    guest_size: u64,
    sock: &File,
    irq: &File,
    region: Arc<SharedRegion>,
    control: Arc<VmControl>,
) -> Result<sidecore_core::device::PacketDevice, String> {
    use std::os::fd::OwnedFd;
    let is_eventfd = std::fs::read_link(format!("/proc/self/fd/{}", irq.as_raw_fd()))
        .is_ok_and(|l| l.to_string_lossy() == "anon_inode:[eventfd]");
    if !is_eventfd {
        return Err("packet_device: the fifth fd is not an eventfd (vCPU 0's irqfd)".into());
    }
    let mut ty: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, a c_int.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || ty != libc::SOCK_DGRAM {
        return Err("packet_device: the fourth fd is not a datagram socket".into());
    }
    if !req.free_gpa.is_multiple_of(4096) || req.free_gpa >= req.ram_size.min(guest_size) {
        return Err("packet_device: free RAM is empty or misaligned".into());
    }
    let len = req.ram_size.min(guest_size) - req.free_gpa;
    let map = Mapping::new(guest, req.free_gpa, usize::try_from(len).map_err(|_| "free RAM too large")?)
        .map_err(|e| e.to_string())?;
    let base = map.ptr();
    // SAFETY: the mapping is `len` bytes of the guest memfd from free_gpa and
    // lives as long as its owner, which the window holds.
    let window = unsafe { sidecore_core::device::GuestWindow::new(base, req.free_gpa, len, Arc::new(map)) };
    let socket = std::net::UdpSocket::from(OwnedFd::from(sock.try_clone().map_err(|e| format!("socket fd: {e}"))?));
    let kick =
        sidecore_core::device::Kick::new(Arc::new(OwnedFd::from(irq.try_clone().map_err(|e| format!("irqfd: {e}"))?)));
    let mut dev = sidecore_core::device::PacketDevice::new(
        region,
        0,
        window,
        socket,
        sidecore_core::device::Delivery::Posted(Some(kick)),
    )
    .map_err(|e| format!("packet_device: {e}"))?;
    dev.set_control(control);
    Ok(dev)
}

/// Receives the first message of a connection, with any fds passed along.
fn recv_first(stream: &UnixStream) -> Result<(Vec<u8>, Vec<File>), String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds: [RawFd; 5] = [-1; 5];
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
    // SAFETY: the iovec points at `buf`, which lives across the call and may
    // take any bytes.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }.map_err(|e| format!("recvmsg: {e}"))?;
    // SAFETY: the first `nfds` entries are fresh descriptors now owned here.
    let files = fds[..nfds.min(5)].iter().map(|fd| unsafe { File::from_raw_fd(*fd) }).collect();
    buf.truncate(n);
    Ok((buf, files))
}

impl Daemon {
    /// Starts the sidecores.
    pub fn new(cfg: &DaemonConfig) -> Result<Arc<Daemon>, DaemonError> {
        let mut cores = Vec::new();
        for (k, cpu) in cfg.cores.iter().enumerate() {
            cores.push(Sidecore::spawn(
                SidecoreConfig { cpu: *cpu, name: format!("sidecore{k}"), idle_park: cfg.idle_park },
                Vec::new(),
            )?);
        }
        let tsc_ghz = crate::host::open_kvm()
            .ok()
            .and_then(|k| crate::host::tsc_khz(&k).ok())
            .map_or(1.0, |t| tsc_f64(t.khz) / 1e6);
        Ok(Arc::new(Daemon {
            cores,
            cpus: cfg.cores.clone(),
            vms: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            stop: Arc::new(AtomicBool::new(false)),
            tsc_ghz,
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
        let doorbell = match doorbell {
            Some(d) => {
                Some(Arc::new(std::os::fd::OwnedFd::from(d.try_clone().map_err(|e| format!("doorbell fd: {e}"))?)))
            }
            None => None,
        };
        let guest_size = guest.metadata().map_err(|e| format!("guest memfd: {e}"))?.len();
        let host_size = host.metadata().map_err(|e| format!("host memfd: {e}"))?.len();
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
        let mut services = Services::new(tables);
        register_vmm_hypercalls(&mut services, host_state.clone()).map_err(|e| e.to_string())?;
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
        let pte = unsafe { PteService::new(layout, host_state, pp, Arc::new(pool_map), visibility) }
            .map_err(|e| e.to_string())?;
        services.set_pte(pte);
        let services = Arc::new(services);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(VmControl { id, ..Default::default() });
        let stats = Arc::new(VmStats::default());
        let core = self.least_loaded();
        for v in 0..req.vcpus {
            let mut ring = RingRef::with_control(region.clone(), v, services.clone(), stats.clone(), control.clone())
                .ok_or("ring outside the region")?;
            ring.set_timed(true);
            if let Some(d) = &doorbell {
                ring.set_doorbell(d.clone());
            }
            self.cores[core].add_ring(ring).map_err(|e| e.to_string())?;
        }
        let device = match device {
            Some((sock, irq)) => {
                let dev = packet_device(req, guest, guest_size, sock, irq, region.clone(), control.clone())?;
                let counters = dev.counters.clone();
                self.cores[core].add_device(Box::new(dev)).map_err(|e| e.to_string())?;
                Some(counters)
            }
            None => None,
        };
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
        let tsc_ghz = self.tsc_ghz;
        let cores = self
            .cores
            .iter()
            .zip(&self.cpus)
            .map(|(c, cpu)| {
                let s = c.stats();
                CoreSnapshot {
                    cpu: *cpu,
                    rings: s.rings.load(Ordering::Relaxed) as u64,
                    served: s.served.load(Ordering::Relaxed),
                    sweeps: s.sweeps.load(Ordering::Relaxed),
                    busy_sweeps: s.busy_sweeps.load(Ordering::Relaxed),
                    parked: s.parked.load(Ordering::Relaxed) == 1,
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
                            let upper_ns = tsc_f64(sidecore_core::stats::bucket_floor(b + 1)) / tsc_ghz;
                            sum_ns += tsc_f64(*n) * tsc_f64(sidecore_core::stats::bucket_floor(b)) / tsc_ghz;
                            if *n > 0 {
                                buckets.push((upper_ns, cumulative));
                            }
                        }
                        VmSnapshot {
                            vm: *id,
                            pid: vm.pid,
                            vcpus: vm.vcpus,
                            sidecore_cpu: self.cpus.get(vm.core).copied().unwrap_or(0),
                            calls: snap
                                .nonzero()
                                .into_iter()
                                .map(|(o, st, n)| (o.to_string(), st.to_string(), n))
                                .collect(),
                            service_buckets: buckets,
                            service_count: cumulative,
                            service_sum_ns: sum_ns,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        MetricsSnapshot { cores, vms }
    }

    /// The status report.
    pub fn status(&self) -> serde_json::Value {
        let tsc_ghz = self.tsc_ghz;
        let cores: Vec<_> = self
            .cores
            .iter()
            .zip(&self.cpus)
            .map(|(c, cpu)| {
                let s = c.stats();
                let sweeps = s.sweeps.load(Ordering::Relaxed);
                let busy = s.busy_sweeps.load(Ordering::Relaxed);
                serde_json::json!({
                    "cpu": cpu,
                    "rings": s.rings.load(Ordering::Relaxed),
                    "served": s.served.load(Ordering::Relaxed),
                    "sweeps": sweeps,
                    "busy_fraction": if sweeps > 0 { tsc_f64(busy) / tsc_f64(sweeps) } else { 0.0 },
                    "parked": s.parked.load(Ordering::Relaxed) == 1,
                    "parks": s.parks.load(Ordering::Relaxed),
                })
            })
            .collect();
        let vms: Vec<_> = self
            .vms
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(id, vm)| {
                        let snap = vm.stats.snapshot();
                        let calls: Vec<_> = snap
                            .nonzero()
                            .into_iter()
                            .map(|(op, st, n)| serde_json::json!({"op": op, "status": st, "count": n}))
                            .collect();
                        let q = |p: f64| snap.service_quantile(p).map(|c| tsc_f64(c) / tsc_ghz);
                        let pte = vm.services.pte().map(|p| {
                            serde_json::json!({
                                "maps": p.counters.maps.load(Ordering::Relaxed),
                                "to_exit_path": p.counters.to_exit_path.load(Ordering::Relaxed),
                                "refused": p.counters.refused.load(Ordering::Relaxed),
                            })
                        });
                        let device = vm.device.as_ref().map(|d| {
                            serde_json::json!({
                                "rx": d.rx.load(Ordering::Relaxed),
                                "tx": d.tx.load(Ordering::Relaxed),
                                "rx_no_buffer": d.rx_no_buffer.load(Ordering::Relaxed),
                                "bad_desc": d.bad_desc.load(Ordering::Relaxed),
                                "interrupts": d.interrupts.load(Ordering::Relaxed),
                            })
                        });
                        serde_json::json!({
                            "vm": id,
                            "pid": vm.pid,
                            "uid": vm.uid,
                            "vcpus": vm.vcpus,
                            "sidecore": vm.core,
                            "sidecore_cpu": self.cpus.get(vm.core),
                            "attached_s": vm.attached.elapsed().as_secs_f64(),
                            "paused": vm.control.paused.load(Ordering::Relaxed),
                            "total": snap.total(),
                            "rejected": snap.rejected(),
                            "use_exit_path": snap.calls.iter().map(|row| row[Status::UseExitPath as usize]).sum::<u64>(),
                            "cancelled": snap.cancelled,
                            "calls": calls,
                            "pte": pte,
                            "device": device,
                            "service_ns": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999)},
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({
            "ok": true,
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "ops": OP_CLASS_NAMES,
            "sidecores": cores,
            "vms": vms,
        })
    }

    fn serve_connection(self: &Arc<Daemon>, mut stream: UnixStream, group: Option<u32>) {
        let Some(cred) = peer_cred(&stream) else {
            reply_err(&mut stream, "cannot read the peer's credentials");
            return;
        };
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if cred.uid != 0 && cred.uid != me && group != Some(cred.gid) {
            reply_err(&mut stream, "permission denied: not the daemon's user or group");
            return;
        }
        let (first, files) = match recv_first(&stream) {
            Ok(x) => x,
            Err(e) => {
                reply_err(&mut stream, &e);
                return;
            }
        };
        let Ok(reader_stream) = stream.try_clone() else { return };
        let mut reader = BufReader::new(reader_stream);
        // The first recvmsg may have stopped before the end of the line.
        let mut line = first;
        if !line.contains(&b'\n') && !line.is_empty() {
            match read_line(&mut reader) {
                Ok(Some(rest)) => line.extend_from_slice(rest.as_bytes()),
                Ok(None) => {}
                Err(e) => {
                    reply_err(&mut stream, &e);
                    return;
                }
            }
        }
        if line.is_empty() {
            return;
        }
        if line.len() > MAX_MESSAGE {
            reply_err(&mut stream, "message too long");
            return;
        }
        let req: Request = match serde_json::from_slice(line.trim_ascii_end()) {
            Ok(r) => r,
            Err(e) => {
                reply_err(&mut stream, &format!("malformed request: {e}"));
                return;
            }
        };
        match req {
            Request::Status => {
                let _ = writeln!(stream, "{}", self.status());
            }
            Request::Pause | Request::Resume => {
                reply_err(&mut stream, "pause/resume need an attached VM on this connection")
            }
            Request::Attach(a) => {
                let (id, core) = match self.attach(&a, &files, &cred) {
                    Ok(x) => x,
                    Err(e) => {
                        reply_err(&mut stream, &format!("attach refused: {e}"));
                        return;
                    }
                };
                drop(files);
                let _ = writeln!(
                    stream,
                    "{}",
                    serde_json::json!({"ok": true, "vm": id, "sidecore": core, "sidecore_cpu": self.cpus.get(core)})
                );
                self.attached_loop(id, &mut stream, &mut reader);
                self.detach(id);
            }
        }
    }

    /// Serves an attached VM's connection until it hangs up.
    fn attached_loop(&self, id: u64, stream: &mut UnixStream, reader: &mut BufReader<UnixStream>) {
        loop {
            let line = match read_line(reader) {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    reply_err(stream, &e);
                    return;
                }
            };
            let control = self.vms.lock().ok().and_then(|m| m.get(&id).map(|v| v.control.clone()));
            let Some(control) = control else { return };
            match serde_json::from_str::<Request>(line.trim_end()) {
                Ok(Request::Pause) => {
                    control.paused.store(true, Ordering::Relaxed);
                    let _ = writeln!(stream, "{}", serde_json::json!({"ok": true}));
                }
                Ok(Request::Resume) => {
                    control.paused.store(false, Ordering::Relaxed);
                    let _ = writeln!(stream, "{}", serde_json::json!({"ok": true}));
                }
                Ok(Request::Status) => {
                    let _ = writeln!(stream, "{}", self.status());
                }
                Ok(Request::Attach(_)) => {
                    reply_err(stream, "this connection already has a VM attached");
                    return;
                }
                Err(e) => {
                    reply_err(stream, &format!("malformed request: {e}"));
                    return;
                }
            }
        }
    }
}

fn tsc_f64(v: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let f = v as f64;
    f
}

/// Checks an attach request against the sizes of the two memfds that came
/// with it; returns the pool's page count and the host block's length.
/// Everything here comes from another process and is treated as hostile.
pub fn validate_attach(req: &AttachRequest, guest_size: u64, host_size: u64) -> Result<(usize, usize), String> {
    if req.vcpus == 0 || req.vcpus > MAX_VCPUS {
        return Err(format!("vcpus {} out of range 1..={MAX_VCPUS}", req.vcpus));
    }
    if req.cpuid.len() != req.vcpus as usize {
        return Err(format!("{} CPUID tables for {} vCPUs", req.cpuid.len(), req.vcpus));
    }
    if req.cpuid.iter().any(|t| t.len() > 4096) {
        return Err("a CPUID table has more than 4096 entries".into());
    }
    let inside = |gpa: u64, len: u64| {
        gpa.checked_add(len).is_some_and(|e| e <= req.ram_size) && gpa.is_multiple_of(4096) && len > 0
    };
    if req.ram_size > guest_size {
        return Err(format!("ram_size {:#x} exceeds the guest memfd ({guest_size:#x} bytes)", req.ram_size));
    }
    if !inside(req.shared_gpa, req.shared_size) || req.shared_size < region_size(req.vcpus) {
        return Err("shared region outside RAM, misaligned or too small".into());
    }
    if !inside(req.pool_gpa, req.pool_size) || !req.pool_size.is_multiple_of(4096) {
        return Err("page-table pool outside RAM or misaligned".into());
    }
    let overlap = req.shared_gpa < req.pool_gpa + req.pool_size && req.pool_gpa < req.shared_gpa + req.shared_size;
    if overlap {
        return Err("shared region overlaps the page-table pool".into());
    }
    if req.image_gpa > req.image_end || req.image_end > req.ram_size || req.free_gpa > req.ram_size {
        return Err("image or free RAM range outside RAM".into());
    }
    let pool_pages = usize::try_from(req.pool_size / 4096).map_err(|_| "pool too large")?;
    let host_len = HostShared::size(pool_pages);
    if host_size < host_len as u64 {
        return Err("host-state memfd too small".into());
    }
    Ok((pool_pages, host_len))
}

/// Runs the daemon until SIGTERM or SIGINT; `listening` is called once the
/// socket accepts connections.
pub fn run_daemon(cfg: &DaemonConfig, listening: impl FnOnce(&DaemonConfig)) -> Result<(), DaemonError> {
    if cfg.socket.exists() {
        if UnixStream::connect(&cfg.socket).is_ok() {
            return Err(DaemonError::InUse(cfg.socket.clone()));
        }
        let _ = std::fs::remove_file(&cfg.socket);
    }
    let group = match &cfg.group {
        Some(g) => Some(group_gid(g).ok_or_else(|| DaemonError::Group(g.clone()))?),
        None => None,
    };
    let listener =
        UnixListener::bind(&cfg.socket).map_err(|source| DaemonError::Bind { path: cfg.socket.clone(), source })?;
    let chmod = |mode| {
        std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(mode))
            .map_err(|source| DaemonError::Chmod { path: cfg.socket.clone(), source })
    };
    match group {
        Some(gid) => {
            std::os::unix::fs::chown(&cfg.socket, None, Some(gid))
                .map_err(|source| DaemonError::Chmod { path: cfg.socket.clone(), source })?;
            chmod(0o660)?;
        }
        None => chmod(0o600)?,
    }
    let daemon = Daemon::new(cfg)?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, daemon.stop.clone()).map_err(DaemonError::Signal)?;
    }
    if let Some(addr) = &cfg.metrics {
        let d = daemon.clone();
        crate::daemon::metrics::serve(addr, move || d.metrics_snapshot())
            .map_err(|source| DaemonError::Metrics { addr: addr.clone(), source })?;
    }
    listener.set_nonblocking(true).map_err(|source| DaemonError::Bind { path: cfg.socket.clone(), source })?;
    listening(cfg);
    while !daemon.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let d = daemon.clone();
                let _ = std::thread::Builder::new()
                    .name("sidecore-conn".into())
                    .spawn(move || d.serve_connection(stream, group));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
    // Drain: detach everyone (their guests fall back to the exit paths), stop
    // the sidecores, remove the socket.
    let ids: Vec<u64> = daemon.vms.lock().map(|m| m.keys().copied().collect()).unwrap_or_default();
    for id in ids {
        daemon.detach(id);
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// A VMM's connection to the daemon, kept open while its VM runs.
pub struct Attachment {
    stream: Mutex<UnixStream>,
    reader: Mutex<BufReader<UnixStream>>,
    /// The daemon's id for the VM.
    pub vm: u64,
    /// The CPU of the sidecore serving it.
    pub sidecore_cpu: Option<usize>,
}

fn call(
    stream: &mut UnixStream,
    reader: &mut BufReader<UnixStream>,
    req: &Request,
) -> Result<serde_json::Value, DaemonError> {
    let line = serde_json::to_string(req).map_err(|e| DaemonError::Protocol(e.to_string()))?;
    writeln!(stream, "{line}").map_err(|e| DaemonError::Protocol(e.to_string()))?;
    let reply = read_line(reader)
        .map_err(DaemonError::Protocol)?
        .ok_or_else(|| DaemonError::Protocol("the daemon hung up".into()))?;
    let v: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| DaemonError::Protocol(format!("bad reply: {e}")))?;
    if v["ok"] != serde_json::Value::Bool(true) {
        return Err(DaemonError::Protocol(v["error"].as_str().unwrap_or("error").to_string()));
    }
    Ok(v)
}

impl Attachment {
    /// Attaches a VM: sends the layout and CPUID tables with the two memfds,
    /// the doorbell, and `extra` fds (the packet device's socket and irqfd
    /// when the request asks for it).
    pub fn attach(
        socket: &Path,
        req: AttachRequest,
        guest: &File,
        host: &File,
        doorbell: &std::os::fd::OwnedFd,
        extra: &[RawFd],
    ) -> Result<Attachment, DaemonError> {
        let stream = UnixStream::connect(socket)
            .map_err(|source| DaemonError::Connect { path: socket.to_path_buf(), source })?;
        let mut line = serde_json::to_vec(&Request::Attach(req)).map_err(|e| DaemonError::Protocol(e.to_string()))?;
        line.push(b'\n');
        stream
            .send_with_fds(
                &[&line[..]],
                &[&[guest.as_raw_fd(), host.as_raw_fd(), doorbell.as_raw_fd()][..], extra].concat(),
            )
            .map_err(|e| DaemonError::Protocol(format!("sendmsg: {e}")))?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| DaemonError::Protocol(e.to_string()))?);
        let reply = read_line(&mut reader)
            .map_err(DaemonError::Protocol)?
            .ok_or_else(|| DaemonError::Protocol("the daemon hung up".into()))?;
        let v: serde_json::Value =
            serde_json::from_str(&reply).map_err(|e| DaemonError::Protocol(format!("bad reply: {e}")))?;
        if v["ok"] != serde_json::Value::Bool(true) {
            return Err(DaemonError::Protocol(v["error"].as_str().unwrap_or("attach refused").to_string()));
        }
        Ok(Attachment {
            stream: Mutex::new(stream),
            reader: Mutex::new(reader),
            vm: v["vm"].as_u64().unwrap_or(0),
            sidecore_cpu: v["sidecore_cpu"].as_u64().and_then(|c| usize::try_from(c).ok()),
        })
    }

    /// One request and its reply on this VM's connection.
    fn request(&self, req: &Request) -> Result<serde_json::Value, DaemonError> {
        let mut s = self.stream.lock().map_err(|_| DaemonError::Protocol("poisoned".into()))?;
        let mut r = self.reader.lock().map_err(|_| DaemonError::Protocol("poisoned".into()))?;
        call(&mut s, &mut r, req)
    }

    /// The number of requests the daemon has answered for this VM.
    pub fn served(&self) -> Result<u64, DaemonError> {
        let v = self.request(&Request::Status)?;
        v["vms"]
            .as_array()
            .and_then(|vms| vms.iter().find(|vm| vm["vm"].as_u64() == Some(self.vm)))
            .and_then(|vm| vm["total"].as_u64())
            .ok_or_else(|| DaemonError::Protocol("the daemon does not list this VM".into()))
    }

    /// Calls `on_lost` once, from a thread of its own, when the daemon
    /// closes this VM's connection: it died or shut down, and a call its
    /// sidecore had claimed will never be answered. The thread only polls
    /// for the hang-up (never reads), so it does not race [`Self::request`].
    pub fn watch(&self, on_lost: impl FnOnce() + Send + 'static) -> Result<(), DaemonError> {
        let stream = self
            .stream
            .lock()
            .map_err(|_| DaemonError::Protocol("poisoned".into()))?
            .try_clone()
            .map_err(|e| DaemonError::Protocol(format!("cannot watch the daemon connection: {e}")))?;
        std::thread::Builder::new()
            .name("daemon-watch".into())
            .spawn(move || {
                let mut p = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
                loop {
                    // SAFETY: one valid pollfd, the count given is 1; the fd
                    // stays open while `stream` lives in this thread.
                    let r = unsafe { libc::poll(&mut p, 1, -1) };
                    if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    if r < 0 || p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                        on_lost();
                        return;
                    }
                }
            })
            .map(|_| ())
            .map_err(|e| DaemonError::Protocol(format!("cannot start the daemon watch thread: {e}")))
    }

    /// Asks the daemon to stop (`true`) or resume serving this VM.
    pub fn set_paused(&self, paused: bool) -> Result<(), DaemonError> {
        self.request(if paused { &Request::Pause } else { &Request::Resume }).map(|_| ())
    }
}

/// `sidecore status`: asks the daemon for its report.
pub fn query_status(socket: &Path) -> Result<serde_json::Value, DaemonError> {
    let mut stream =
        UnixStream::connect(socket).map_err(|source| DaemonError::Connect { path: socket.to_path_buf(), source })?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| DaemonError::Protocol(e.to_string()))?);
    call(&mut stream, &mut reader, &Request::Status)
}

/// The status report as text.
pub fn format_status(v: &serde_json::Value) -> String {
    let mut s = format!("sidecore daemon, up {:.0} s\n", v["uptime_s"].as_f64().unwrap_or(0.0));
    for c in v["sidecores"].as_array().into_iter().flatten() {
        s += &format!(
            "  sidecore on CPU {}: {} rings, {} served, busy {:.1}%{}\n",
            c["cpu"],
            c["rings"],
            c["served"],
            c["busy_fraction"].as_f64().unwrap_or(0.0) * 100.0,
            if c["parked"] == serde_json::Value::Bool(true) { ", parked" } else { "" }
        );
    }
    let vms = v["vms"].as_array().cloned().unwrap_or_default();
    s += &format!("{} VM(s) attached\n", vms.len());
    for vm in vms {
        s += &format!(
            "  vm {} pid {} vCPUs {} on CPU {}: {} calls, {} rejected, {} sent to the exit path; service p50 {} ns p99 {} ns\n",
            vm["vm"],
            vm["pid"],
            vm["vcpus"],
            vm["sidecore_cpu"],
            vm["total"],
            vm["rejected"],
            vm["use_exit_path"],
            vm["service_ns"]["p50"].as_f64().map_or("-".into(), |x| format!("{x:.0}")),
            vm["service_ns"]["p99"].as_f64().map_or("-".into(), |x| format!("{x:.0}")),
        );
        for c in vm["calls"].as_array().into_iter().flatten() {
            s += &format!(
                "      {:<10} {:<14} {}\n",
                c["op"].as_str().unwrap_or("?"),
                c["status"].as_str().unwrap_or("?"),
                c["count"]
            );
        }
        let d = &vm["device"];
        if d.is_object() {
            s += &format!(
                "      packet device: {} rx, {} tx, {} dropped (no buffer), {} bad descriptors, {} wake-up interrupts\n",
                d["rx"], d["tx"], d["rx_no_buffer"], d["bad_desc"], d["interrupts"]
            );
        }
    }
    s
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
        let t = format_status(
            &serde_json::json!({"uptime_s": 3.0, "sidecores": [{"cpu": 0}], "vms": [{"vm": 1, "calls": [{}]}]}),
        );
        assert!(t.contains("1 VM(s) attached"));
        let t = format_status(&serde_json::json!(null));
        assert!(t.contains("0 VM(s)"));
        let t = format_status(&serde_json::json!({"vms": [{"vm": 2, "device": {"rx": 5, "tx": 4, "rx_no_buffer": 1,
            "bad_desc": 0, "interrupts": 3}}]}));
        assert!(
            t.contains("packet device: 5 rx, 4 tx, 1 dropped (no buffer), 0 bad descriptors, 3 wake-up interrupts"),
            "{t}"
        );
    }
}
