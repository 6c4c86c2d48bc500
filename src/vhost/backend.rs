//! The vhost-user side of a blk device: the protocol messages of one VMM
//! connection ([`VhostUserBackendReqHandlerMut`] for the `vhost` crate's
//! request loop), turned into queues for the device on a sidecore.
//!
//! The VMM is hostile: every memory-table fd must be a memfd sealed against
//! shrinking and growing (a truncated mapping would kill the daemon with
//! SIGBUS) and cover its region; every kick and call fd must be an eventfd;
//! ring addresses must fall inside the table; queue sizes are powers of two
//! up to [`MAX_QUEUE_SIZE`]. A refused message gets an error reply (or the
//! connection closes) and a counter; the daemon lives on.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::Sender;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::blk;
use super::queue::{Command, Disk, PolledQueue, QueueCounters};
use crate::host::memfd::{check_sealed, fd_kind, is_eventfd};

/// Largest queue a driver may ask for.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most memory regions in a table.
pub const MAX_REGIONS: usize = 32;
/// How long a stopping queue may take to finish its I/O.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Counters of one device, over its connections.
#[derive(Default, Debug)]
pub struct DeviceCounters {
    /// Per queue (index = queue index), made at start.
    pub queues: Vec<Arc<QueueCounters>>,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Messages refused (bad fds, sizes, addresses) and connections closed
    /// on a protocol error.
    pub protocol_errors: AtomicU64,
    /// A VMM is connected now (0 or 1).
    pub connected: AtomicU64,
    /// Queues running now.
    pub running: AtomicU64,
}

/// One vring as the VMM describes it.
#[derive(Default)]
struct Vring {
    size: u16,
    desc: Option<u64>,
    avail: Option<u64>,
    used: Option<u64>,
    base: u16,
    kick: Option<File>,
    call: Option<Arc<std::os::fd::OwnedFd>>,
    enabled: bool,
    started: bool,
}

/// One region of the memory table, for translating the VMM's addresses.
#[derive(Clone, Copy)]
struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
}

/// The state of one VMM connection.
pub struct BlkBackend {
    disk: Arc<Disk>,
    queues: u16,
    counters: Arc<DeviceCounters>,
    acked: u64,
    protocol: u64,
    mem: Option<Arc<GuestMemoryMmap>>,
    table: Vec<Region>,
    vrings: Vec<Vring>,
    device: Sender<Command>,
}

fn refuse(counters: &DeviceCounters, why: &str) -> VuError {
    counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(why, "vhost-user-blk: refused a message");
    VuError::InvalidParam
}

impl BlkBackend {
    /// A connection's state; `device` feeds the device on the sidecore.
    pub fn new(disk: Arc<Disk>, queues: u16, counters: Arc<DeviceCounters>, device: Sender<Command>) -> BlkBackend {
        BlkBackend {
            disk,
            queues,
            counters,
            acked: 0,
            protocol: 0,
            mem: None,
            table: Vec::new(),
            vrings: (0..queues).map(|_| Vring::default()).collect(),
            device,
        }
    }

    /// The features offered.
    pub fn features(readonly: bool, queues: u16) -> u64 {
        blk::device_features(readonly, queues)
            | (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        let c = self.counters.clone();
        usize::try_from(index)
            .ok()
            .and_then(|i| self.vrings.get_mut(i))
            .ok_or_else(|| refuse(&c, "queue index out of range"))
    }

    /// The guest-physical address of `len` bytes at the VMM's address `va`.
    fn to_gpa(&self, va: u64, len: u64) -> Option<u64> {
        self.table.iter().find_map(|r| {
            let off = va.checked_sub(r.uaddr)?;
            (off.checked_add(len)? <= r.size).then(|| r.gpa + off)
        })
    }

    /// Starts queue `i` if everything it needs has come.
    fn try_start(&mut self, i: usize) -> VuResult<()> {
        let protocol_features = self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let event_idx = self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let Some(mem) = self.mem.clone() else { return Ok(()) };
        let counters = self.counters.clone();
        let disk = self.disk.clone();
        let Some(v) = self.vrings.get_mut(i) else { return Ok(()) };
        if v.started || v.size == 0 || v.kick.is_none() || (protocol_features && !v.enabled) {
            return Ok(());
        }
        let (Some(desc), Some(avail), Some(used)) = (v.desc, v.avail, v.used) else { return Ok(()) };
        let mut q = Queue::new(MAX_QUEUE_SIZE).map_err(|_| VuError::BackendInternalError)?;
        q.set_size(v.size);
        #[allow(clippy::cast_possible_truncation)] // both halves masked to 32 bits
        let split = |a: u64| (Some((a & 0xffff_ffff) as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(used);
        q.set_used_ring_address(lo, hi);
        q.set_event_idx(event_idx);
        q.set_next_avail(v.base);
        q.set_next_used(v.base);
        q.set_ready(true);
        let kick = v.kick.as_ref().and_then(|k| k.try_clone().ok()).ok_or(VuError::BackendInternalError)?;
        let call = v.call.clone().map(sidecore_core::device::Kick::new);
        let index = u16::try_from(i).map_err(|_| VuError::InvalidParam)?;
        let qc = counters.queues.get(i).cloned().unwrap_or_default();
        let pq = PolledQueue::new(index, q, mem, kick, call, disk, qc).map_err(|e| {
            let why = e.to_string();
            refuse(&counters, &why)
        })?;
        self.device.send(Command::Add(Box::new(pq))).map_err(|_| VuError::BackendInternalError)?;
        v.started = true;
        counters.running.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Stops queue `i` (its I/O finished); returns its next avail index.
    fn stop(&mut self, i: usize) -> VuResult<u16> {
        let counters = self.counters.clone();
        let Some(v) = self.vrings.get_mut(i) else { return Err(VuError::InvalidParam) };
        if !v.started {
            return Ok(v.base);
        }
        let (tx, rx) = crossbeam::channel::bounded(1);
        let index = u16::try_from(i).map_err(|_| VuError::InvalidParam)?;
        self.device.send(Command::Stop { index, reply: tx }).map_err(|_| VuError::BackendInternalError)?;
        v.started = false;
        counters.running.fetch_sub(1, Ordering::Relaxed);
        match rx.recv_timeout(STOP_WAIT) {
            // The device did not have it (it had ended): the base stands.
            Ok(u16::MAX) => Ok(v.base),
            Ok(base) => {
                v.base = base;
                Ok(base)
            }
            Err(_) => {
                tracing::error!(queue = i, "vhost-user-blk: a queue did not stop in time");
                Err(VuError::BackendInternalError)
            }
        }
    }

    /// Stops every queue (the connection ends).
    pub fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            let _ = self.stop(i);
        }
    }
}

fn checked_eventfd(counters: &DeviceCounters, fd: Option<File>, what: &str) -> VuResult<Option<File>> {
    match fd {
        Some(f) if !is_eventfd(&f) => {
            let kind = fd_kind(&f);
            Err(refuse(counters, &format!("{what} is not an eventfd ({kind})")))
        }
        other => Ok(other),
    }
}

impl VhostUserBackendReqHandlerMut for BlkBackend {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_all();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(BlkBackend::features(self.disk.readonly, self.queues))
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = BlkBackend::features(self.disk.readonly, self.queues);
        if features & !offered != 0 {
            return Err(refuse(&self.counters, "features not offered"));
        }
        self.acked = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<vhost::VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() || ctx.is_empty() || ctx.len() > MAX_REGIONS {
            return Err(refuse(&self.counters, "memory table: one fd per region, 1 to 32 regions"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut table = Vec::with_capacity(ctx.len());
        for (r, f) in ctx.iter().zip(files) {
            let size = check_sealed(&f, "vhost-user memory region").map_err(|e| refuse(&self.counters, &e))?;
            let end = r.mmap_offset.checked_add(r.memory_size);
            if r.memory_size == 0
                || end.is_none_or(|e| e > size)
                || r.guest_phys_addr.checked_add(r.memory_size).is_none()
            {
                return Err(refuse(&self.counters, "memory region empty or beyond its memfd"));
            }
            let len = usize::try_from(r.memory_size).map_err(|_| refuse(&self.counters, "memory region too large"))?;
            let mapping = MmapRegion::from_file(FileOffset::new(f, r.mmap_offset), len)
                .map_err(|e| refuse(&self.counters, &format!("mapping a memory region: {e}")))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_phys_addr))
                .ok_or_else(|| refuse(&self.counters, "memory region wraps"))?;
            regions.push(region);
            table.push(Region { gpa: r.guest_phys_addr, size: r.memory_size, uaddr: r.user_addr });
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| refuse(&self.counters, &format!("memory table: {e}")))?;
        let mem = Arc::new(mem);
        self.mem = Some(mem.clone());
        self.table = table;
        self.device.send(Command::Memory(mem)).map_err(|_| VuError::BackendInternalError)?;
        for i in 0..self.vrings.len() {
            self.try_start(i)?;
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let c = self.counters.clone();
        let v = self.vring(index)?;
        let ok = num.is_power_of_two() && num <= u32::from(MAX_QUEUE_SIZE);
        if !ok || v.started {
            return Err(refuse(&c, "queue size not a power of two up to 1024, or the queue runs"));
        }
        v.size = u16::try_from(num).map_err(|_| VuError::InvalidParam)?;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let size = u64::from(self.vring(index)?.size.max(1));
        let d = self.to_gpa(descriptor, 16 * size);
        let a = self.to_gpa(available, 6 + 2 * size);
        let u = self.to_gpa(used, 6 + 8 * size);
        let c = self.counters.clone();
        let (Some(d), Some(a), Some(u)) = (d, a, u) else {
            return Err(refuse(&c, "a ring address is outside the memory table"));
        };
        let v = self.vring(index)?;
        if v.started {
            return Err(refuse(&c, "SET_VRING_ADDR on a running queue"));
        }
        v.desc = Some(d);
        v.avail = Some(a);
        v.used = Some(u);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let c = self.counters.clone();
        let v = self.vring(index)?;
        if v.started {
            return Err(refuse(&c, "SET_VRING_BASE on a running queue"));
        }
        v.base = u16::try_from(base).map_err(|_| refuse(&c, "vring base over 65535"))?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let i = usize::try_from(index).map_err(|_| VuError::InvalidParam)?;
        let base = self.stop(i)?;
        // The ring is stopped; a restart needs a new kick fd (the spec).
        if let Some(v) = self.vrings.get_mut(i) {
            v.kick = None;
        }
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let fd = checked_eventfd(&self.counters, fd, "kick fd")?;
        let fd = match fd {
            Some(f) => f,
            // Polling frontends may send none: an eventfd nobody writes
            // (the parked sidecore's nap still finds the work).
            None => {
                // SAFETY: eventfd takes no pointers; the result is checked.
                let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                if raw < 0 {
                    return Err(VuError::BackendInternalError);
                }
                // SAFETY: a new descriptor nothing else owns.
                unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(raw) }
            }
        };
        let v = self.vring(u32::from(index))?;
        v.kick = Some(fd);
        self.try_start(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let fd = checked_eventfd(&self.counters, fd, "call fd")?;
        let v = self.vring(u32::from(index))?;
        v.call = fd.map(|f| Arc::new(std::os::fd::OwnedFd::from(f)));
        let call = v.call.clone().map(sidecore_core::device::Kick::new);
        if v.started {
            let _ = self.device.send(Command::Call { index: u16::from(index), call });
        }
        Ok(())
    }

    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let v = self.vring(index)?;
        v.enabled = enable;
        let i = usize::try_from(index).map_err(|_| VuError::InvalidParam)?;
        if enable {
            self.try_start(i)
        } else {
            self.stop(i).map(|_| ())
        }
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let cfg = blk::config_space(self.disk.capacity, self.queues);
        let (off, len) = (offset as usize, size as usize);
        if off.checked_add(len).is_none_or(|e| e > 256) {
            return Err(refuse(&self.counters, "config read beyond the config space"));
        }
        // Fields past ours read as zero (features we do not offer).
        Ok((off..off + len).map(|i| cfg.get(i).copied().unwrap_or(0)).collect())
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        Err(VuError::InvalidOperation("the configuration space is read-only"))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&mut self, _inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        Err(VuError::InvalidOperation("no inflight tracking"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("no inflight tracking"))
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<vhost::VhostUserMemoryRegionBase>> {
        Err(VuError::InvalidOperation("memory slots are not offered"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(VuError::InvalidOperation("memory slots are not offered"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("no device state transfer"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("no dirty logging (migration) support"))
    }
}
