//! The daemon's vhost-user-blk devices: `--vhost-user-blk` at start and the
//! `vhost_user_blk_add` / `vhost_user_blk_remove` methods at run time.
//!
//! One manager thread, started before the control filter, opens images
//! and binds sockets; each device then has its own thread (under the vhost
//! filter, [`seccomp::ThreadKind::Vhost`]) that serves one VMM connection
//! at a time. Its queues go to the least-loaded sidecore at each connection.

#[allow(clippy::wildcard_imports)]
use super::*;

use crate::vhost::{BlkServer, BlkSpec, Notify, Place};
use crossbeam::channel::{Receiver, Sender};

/// A request to the manager thread.
pub(super) enum Request {
    Add(BlkSpec, Sender<Result<(), String>>),
}

/// The devices and the way to the manager.
#[derive(Default)]
pub(super) struct Devices {
    pub(super) servers: Mutex<Vec<Arc<BlkServer>>>,
    pub(super) manager: Mutex<Option<Sender<Request>>>,
}

/// One device's report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BlkStatus {
    /// The vhost-user socket.
    pub socket: String,
    /// The image.
    pub image: String,
    /// Size in bytes.
    pub capacity_bytes: u64,
    /// Writes refused.
    pub readonly: bool,
    /// Queues offered.
    pub queues_offered: u16,
    /// A VMM is connected.
    pub connected: bool,
    /// The sidecore its queues are on (none when no VMM is connected).
    pub sidecore: Option<usize>,
    /// VMM connections so far.
    pub connections: u64,
    /// Messages refused and connections ended by a protocol error.
    pub protocol_errors: u64,
    /// Queues running now.
    pub running_queues: u64,
    /// Per queue (those that have run).
    pub queues: Vec<BlkQueueStatus>,
}

/// One queue's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BlkQueueStatus {
    /// Its index.
    pub index: u16,
    /// Requests completed.
    pub requests: u64,
    /// Bytes read from the disk.
    pub read_bytes: u64,
    /// Bytes written to the disk.
    pub written_bytes: u64,
    /// Kicks received.
    pub kicks: u64,
    /// Interrupts sent.
    pub interrupts: u64,
    /// Chains refused (IOERR, UNSUPP or malformed).
    pub bad_chains: u64,
    /// Host I/O errors.
    pub io_errors: u64,
    /// Times the queue stopped on an impossible avail index.
    pub broken: u64,
}

impl BlkStatus {
    pub(super) fn of(s: &BlkServer) -> BlkStatus {
        let c = &s.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let core = s.sidecore.load(Ordering::Relaxed);
        BlkStatus {
            socket: s.spec.socket.display().to_string(),
            image: s.spec.path.display().to_string(),
            capacity_bytes: s.capacity * crate::vhost::blk::SECTOR,
            readonly: s.spec.readonly,
            queues_offered: s.spec.queues,
            connected: r(&c.connected) != 0,
            sidecore: (core != usize::MAX).then_some(core),
            connections: r(&c.connections),
            protocol_errors: r(&c.protocol_errors),
            running_queues: r(&c.running),
            queues: c
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| r(&q.requests) + r(&q.kicks) > 0)
                .map(|(i, q)| BlkQueueStatus {
                    index: u16::try_from(i).unwrap_or(u16::MAX),
                    requests: r(&q.requests),
                    read_bytes: r(&q.read_bytes),
                    written_bytes: r(&q.written_bytes),
                    kicks: r(&q.kicks),
                    interrupts: r(&q.interrupts),
                    bad_chains: r(&q.bad_chains),
                    io_errors: r(&q.io_errors),
                    broken: r(&q.broken),
                })
                .collect(),
        }
    }
}

impl Daemon {
    /// Starts the manager thread (before the control filter: it and the
    /// device threads it starts run under the vhost filter).
    pub(super) fn start_vhost_manager(self: &Arc<Daemon>, seccomp_on: bool) -> Result<(), DaemonError> {
        let prog = match seccomp_on {
            true => Some(
                seccomp::program(seccomp::ThreadKind::Vhost, &seccomp::Context::here(None))
                    .map_err(DaemonError::Seccomp)?,
            ),
            false => None,
        };
        let (tx, rx) = crossbeam::channel::unbounded();
        let (ready_tx, ready_rx) = crossbeam::channel::bounded(1);
        let d = self.clone();
        std::thread::Builder::new()
            .name("sidecore-vhost".into())
            .spawn(move || {
                if let Some(p) = &prog {
                    if let Err(e) = seccomp::install(seccomp::ThreadKind::Vhost, p) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(()));
                d.manage(&rx);
            })
            .map_err(|e| DaemonError::Seccomp(format!("starting the vhost thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| DaemonError::Seccomp("the vhost thread ended at start".into()))?
            .map_err(DaemonError::Seccomp)?;
        if let Ok(mut m) = self.vhost.manager.lock() {
            *m = Some(tx);
        }
        Ok(())
    }

    fn manage(self: &Arc<Daemon>, rx: &Receiver<Request>) {
        while let Ok(r) = rx.recv() {
            match r {
                Request::Add(spec, reply) => {
                    let _ = reply.send(self.start_blk(spec));
                }
            }
        }
    }

    fn start_blk(self: &Arc<Daemon>, spec: BlkSpec) -> Result<(), String> {
        let taken = self.vhost.servers.lock().is_ok_and(|s| s.iter().any(|o| o.spec.socket == spec.socket));
        if taken {
            return Err(format!("{}: the daemon serves a device there already", spec.socket.display()));
        }
        let (server, listener) = BlkServer::bind(spec)?;
        let d = self.clone();
        let place: Place = Arc::new(move |dev| d.place_device(dev));
        let d = self.clone();
        let notify: Notify = Arc::new(move |spec: &BlkSpec, core: Option<usize>| {
            d.events.publish(protocol::Event {
                event: if core.is_some() { "vhost_connect" } else { "vhost_disconnect" }.into(),
                cpu: core.and_then(|k| d.cpus.get(k).copied()),
                device: Some(spec.socket.display().to_string()),
                ..events::now()
            });
        });
        let s = server.clone();
        std::thread::Builder::new()
            .name("sidecore-vub".into())
            .spawn(move || s.serve(&listener, &place, &notify))
            .map_err(|e| format!("starting the device thread: {e}"))?;
        tracing::info!(socket = %server.spec.socket.display(), image = %server.spec.path.display(),
            sectors = server.capacity, "vhost-user-blk: serving");
        if let Ok(mut s) = self.vhost.servers.lock() {
            s.push(server);
        }
        Ok(())
    }

    /// Adds a device (at start or from the control socket).
    pub fn add_vhost_blk(&self, spec: BlkSpec) -> Result<(), String> {
        let tx = self.vhost.manager.lock().ok().and_then(|m| m.clone()).ok_or("the vhost thread is not running")?;
        let (rtx, rrx) = crossbeam::channel::bounded(1);
        tx.send(Request::Add(spec, rtx)).map_err(|_| "the vhost thread has ended")?;
        rrx.recv_timeout(Duration::from_secs(10)).map_err(|_| "the vhost thread did not answer".to_string())?
    }

    /// Removes the device on `socket`: its VMM is cut off (its queues stop
    /// after their I/O), the socket goes.
    pub fn remove_vhost_blk(&self, socket: &Path) -> Result<(), String> {
        let mut servers = self.vhost.servers.lock().map_err(|_| "device list poisoned")?;
        let i = servers
            .iter()
            .position(|s| s.spec.socket == socket)
            .ok_or_else(|| format!("{}: no vhost-user-blk device there", socket.display()))?;
        servers.remove(i).remove();
        Ok(())
    }

    /// Removes every device (the daemon stops).
    pub(super) fn remove_all_vhost(&self) {
        let all: Vec<Arc<BlkServer>> = self.vhost.servers.lock().map(|mut s| s.drain(..).collect()).unwrap_or_default();
        for d in &all {
            d.remove();
        }
        // Their threads remove the sockets (each looks every 200 ms).
        let deadline = Instant::now() + Duration::from_secs(3);
        while all.iter().any(|d| !d.ended()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The least-loaded sidecore takes the device: load = vCPUs of attached
    /// VMs + running device queues.
    fn place_device(&self, dev: Box<dyn sidecore_core::device::Device>) -> Result<usize, String> {
        let mut load = vec![0u64; self.cores.len()];
        if let Ok(m) = self.vms.lock() {
            for v in m.values() {
                if let Some(l) = load.get_mut(v.core) {
                    *l += u64::from(v.vcpus);
                }
            }
        }
        if let Ok(s) = self.vhost.servers.lock() {
            for d in s.iter() {
                if let Some(l) = load.get_mut(d.sidecore.load(Ordering::Relaxed)) {
                    *l += d.counters.running.load(Ordering::Relaxed).max(1);
                }
            }
        }
        let k = load.iter().enumerate().min_by_key(|(_, l)| **l).map(|(i, _)| i).ok_or("no sidecore")?;
        self.cores[k].add_device(dev).map_err(|e| format!("sidecore {k}: {e}"))?;
        Ok(k)
    }

    /// Every device's report.
    pub fn vhost_status(&self) -> Vec<BlkStatus> {
        self.vhost.servers.lock().map(|s| s.iter().map(|d| BlkStatus::of(d)).collect()).unwrap_or_default()
    }
}
