//! `sidecore bench --vhost-user-blk`: a host-side vhost-user frontend (the
//! role QEMU plays) that drives a vhost-user-blk backend through its real
//! socket, with a split virtqueue of its own in sealed memfd memory, and
//! measures it: QD1 latency and QD32 IOPS of 4 KiB random reads and writes,
//! and the notifications each request costs (kicks sent, calls received).
//!
//! [`BlkDriver`] is the reusable part: connect, negotiate, set up queues,
//! then submit typed requests or raw descriptor chains (for hostile tests of
//! a backend). [`run`] is the benchmark: it starts each backend as a child
//! process pinned to the backend CPU, drives it from a thread pinned to the
//! frontend CPU, and kills and reaps the child whatever happens.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::EventFd;

use super::plot::Curve;
use super::provenance::Provenance;

/// VRING_DESC_F_NEXT, as the u16 the descriptor holds.
pub const DESC_F_NEXT: u16 = 1;
/// VRING_DESC_F_WRITE: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// VRING_USED_F_NO_NOTIFY: the device asks for no kicks (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;
/// VRING_AVAIL_F_NO_INTERRUPT: the driver asks for no calls (without EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
const _: () = assert!(DESC_F_NEXT as u32 == virtio_bindings::virtio_ring::VRING_DESC_F_NEXT);
const _: () = assert!(DESC_F_WRITE as u32 == virtio_bindings::virtio_ring::VRING_DESC_F_WRITE);
const _: () = assert!(USED_F_NO_NOTIFY as u32 == virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY);
const _: () = assert!(AVAIL_F_NO_INTERRUPT as u32 == virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT);

/// The JSON's `schema`.
pub const SCHEMA: &str = "sidecore-bench-vhost-blk/1";
/// Bit of VHOST_USER_F_PROTOCOL_FEATURES in the virtio feature word.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// A sector, as virtio-blk counts them.
pub const SECTOR: u64 = 512;
/// The virtio-blk request header: type, reserved, sector.
pub const BLK_HEADER_LEN: usize = 16;
/// [`BLK_HEADER_LEN`] as a descriptor length.
const BLK_HEADER_LEN_U32: u32 = 16;
const _: () = assert!(BLK_HEADER_LEN_U32 as usize == BLK_HEADER_LEN);
/// virtio-blk status: the request succeeded.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Descriptors per typed request: header, data, status.
pub const DESCS_PER_REQUEST: u16 = 3;
/// Largest data buffer of a typed request.
pub const SLOT_DATA: u64 = 64 * 1024;
/// Driver memory given to each queue: its rings, headers and data buffers.
pub const QUEUE_AREA: u64 = 8 << 20;
/// Bytes reserved at the start of a queue's area for its rings (size 256 needs 6670).
const RINGS_BYTES: u64 = 16 * 1024;
/// Offset of the data buffers in a queue's area; headers and status bytes sit between the rings and them.
const DATA_OFFSET: u64 = 64 * 1024;
/// Bytes per slot of the header area: the 16-byte header, the status byte at 16.
const HEADER_STRIDE: u64 = 32;
/// Memory past the queue areas left for raw chains' buffers ([`BlkDriver::scratch`]).
pub const SCRATCH_BYTES: u64 = 8 << 20;
/// Smallest driver memory, whatever the queues need.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest queue size the queue areas fit.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Bytes of the virtio-blk config space read: up to and including `num_queues`.
const CONFIG_LEN: u32 = 36;
/// No completion for this long: the backend is stuck or gone.
const STALL: Duration = Duration::from_secs(5);

const _: () = assert!(RingLayout::new(0, MAX_QUEUE_SIZE).end() <= RINGS_BYTES);
const _: () = assert!(RINGS_BYTES + (MAX_QUEUE_SIZE / DESCS_PER_REQUEST) as u64 * HEADER_STRIDE <= DATA_OFFSET);
const _: () = assert!(DATA_OFFSET + (MAX_QUEUE_SIZE / DESCS_PER_REQUEST) as u64 * SLOT_DATA <= QUEUE_AREA);

/// What failed in the vhost-user-blk driver or bench.
#[derive(Debug, thiserror::Error)]
pub enum VubError {
    /// memfd_create, ftruncate or the seals failed.
    #[error("cannot create the driver's {bytes}-byte sealed memfd")]
    Memory {
        /// Its size.
        bytes: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mmap of the memfd failed.
    #[error("cannot map the driver's memory")]
    Map(#[source] std::io::Error),
    /// Connecting to the backend's socket failed.
    #[error("cannot connect to the vhost-user socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// A vhost-user message failed (the backend refused it or hung up).
    #[error("vhost-user {step} failed")]
    Protocol {
        /// The message.
        step: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks a feature the driver needs.
    #[error("the backend does not offer {0}")]
    MissingFeature(&'static str),
    /// More queues were asked for than the backend has.
    #[error("{wanted} queues wanted, the backend has {offered}")]
    Queues {
        /// Asked for.
        wanted: usize,
        /// The backend's count.
        offered: u64,
    },
    /// The driver's options are out of range.
    #[error("invalid driver options: {0}")]
    Options(String),
    /// An eventfd could not be made, written or read.
    #[error("eventfd {what} failed")]
    EventFd {
        /// create, kick or read.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An access to driver memory fell outside it.
    #[error("driver memory access {addr:#x}+{len} is outside its {size} bytes")]
    OutOfBounds {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
        /// Memory size.
        size: u64,
    },
    /// A queue or slot index out of range.
    #[error("{what} {index} out of range (limit {limit})")]
    Index {
        /// queue or slot.
        what: &'static str,
        /// The index.
        index: usize,
        /// The bound.
        limit: usize,
    },
    /// No used entry appeared in time.
    #[error("queue {queue}: no completion within {timeout:?} ({what}): the backend is stuck or gone")]
    Stalled {
        /// The queue.
        queue: usize,
        /// How long was waited.
        timeout: Duration,
        /// During what.
        what: String,
    },
    /// The backend completed a request with a bad status.
    #[error("queue {queue}: request at sector {sector} completed with status {status} (0 = OK)")]
    Status {
        /// The queue.
        queue: usize,
        /// Its sector.
        sector: u64,
        /// The status byte.
        status: u8,
    },
    /// The backend returned an id that is not in flight.
    #[error("queue {queue}: the backend returned descriptor id {id}, which is not an in-flight request head")]
    UnknownId {
        /// The queue.
        queue: usize,
        /// The id.
        id: u32,
    },
    /// The bench's image or socket directory could not be made.
    #[error("cannot prepare {}", path.display())]
    Scratch {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A backend process could not be started.
    #[error("cannot start `{command}`")]
    Spawn {
        /// Its command line.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A backend process exited before its socket appeared.
    #[error("`{command}` exited ({status}) before creating its socket; its stderr: {stderr}")]
    Exited {
        /// Its command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// A backend's socket did not appear in time.
    #[error("`{command}` did not create {} within {timeout:?}; its stderr: {stderr}", socket.display())]
    NoSocket {
        /// Its command line.
        command: String,
        /// The socket expected.
        socket: PathBuf,
        /// How long was waited.
        timeout: Duration,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// The frontend thread could not be pinned or started.
    #[error("frontend thread: {0}")]
    Thread(String),
}

/// Where one split virtqueue's parts sit (virtio 1.x split ring layout,
/// section 2.7): the descriptor table (16-byte aligned, 16 bytes an entry),
/// the available ring (2-byte aligned: flags, idx, ring, used_event) and the
/// used ring (4-byte aligned: flags, idx, ring of (id, len), avail_event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Entries.
    pub size: u16,
}

impl RingLayout {
    /// The rings of a queue of `size` entries packed from `base` (16-byte aligned).
    pub const fn new(base: u64, size: u16) -> RingLayout {
        let n = size as u64;
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        RingLayout { desc, avail, used, size }
    }
    /// Descriptor `i`.
    pub const fn desc_entry(&self, i: u16) -> u64 {
        self.desc + 16 * i as u64
    }
    /// `avail.flags`.
    pub const fn avail_flags(&self) -> u64 {
        self.avail
    }
    /// `avail.idx`.
    pub const fn avail_idx(&self) -> u64 {
        self.avail + 2
    }
    /// `avail.ring[i]`.
    pub const fn avail_ring(&self, i: u16) -> u64 {
        self.avail + 4 + 2 * i as u64
    }
    /// `avail.used_event` (with EVENT_IDX: the driver wants a call once the used index passes it).
    pub const fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * self.size as u64
    }
    /// `used.flags`.
    pub const fn used_flags(&self) -> u64 {
        self.used
    }
    /// `used.idx`.
    pub const fn used_idx(&self) -> u64 {
        self.used + 2
    }
    /// `used.ring[i]` (id at +0, len at +4).
    pub const fn used_elem(&self, i: u16) -> u64 {
        self.used + 4 + 8 * i as u64
    }
    /// `used.avail_event` (with EVENT_IDX: the device wants a kick once the avail index passes it).
    pub const fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * self.size as u64
    }
    /// One past the last byte.
    pub const fn end(&self) -> u64 {
        self.avail_event() + 2
    }
}

/// virtio's `vring_need_event`: whether moving an index from `old` to `new`
/// crossed `event` (the other side asked to be told once it passes `event`).
pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A virtio-blk request header: type (IN = read, OUT = write), reserved, sector; little-endian.
pub fn blk_header(kind: u32, sector: u64) -> [u8; BLK_HEADER_LEN] {
    let mut h = [0u8; BLK_HEADER_LEN];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A split-ring descriptor as it sits in the table: addr, len, flags, next; little-endian.
pub fn encode_desc(d: &RawDesc) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0..8].copy_from_slice(&d.addr.to_le_bytes());
    e[8..12].copy_from_slice(&d.len.to_le_bytes());
    e[12..14].copy_from_slice(&d.flags.to_le_bytes());
    e[14..16].copy_from_slice(&d.next.to_le_bytes());
    e
}

/// One descriptor of a raw chain (addresses are guest-physical: offsets in the driver's memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
    /// Next descriptor when `flags` has NEXT.
    pub next: u16,
}

/// A used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head of the chain the device finished.
    pub id: u32,
    /// Bytes it wrote into the chain's device-writable buffers.
    pub len: u32,
}

/// Where a typed request slot's buffers are (guest addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotAddrs {
    /// The 16-byte header.
    pub header: u64,
    /// The data buffer ([`SLOT_DATA`] bytes).
    pub data: u64,
    /// The status byte.
    pub status: u64,
    /// The slot's head descriptor (its chain is head, head+1, head+2).
    pub head: u16,
}

/// The driver's memory: a sealed memfd mapped shared in this process and sent to the backend.
struct DriverMemory {
    fd: OwnedFd,
    base: NonNull<u8>,
    size: u64,
    map_len: usize,
}

// SAFETY: the mapping is owned by this value and unmapped only in Drop; every access goes
// through raw pointers or atomics (the backend writes it concurrently anyway), so moving it
// to another thread adds no aliasing.
unsafe impl Send for DriverMemory {}

impl DriverMemory {
    fn new(size: u64, seal: bool) -> Result<DriverMemory, VubError> {
        let err = |source| VubError::Memory { bytes: size, source };
        // SAFETY: the name is a valid NUL-terminated string; the call only returns a new fd or -1.
        let raw = unsafe { libc::memfd_create(c"sidecore-vub".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if raw < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = libc::off_t::try_from(size).map_err(|_| err(std::io::Error::other("size too large")))?;
        // SAFETY: ftruncate on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // The sidecore daemon refuses memory whose size the frontend could change under it.
        if seal {
            // SAFETY: fcntl F_ADD_SEALS on an fd we own, with an int argument.
            let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) };
            if r != 0 {
                return Err(err(std::io::Error::last_os_error()));
            }
        }
        let map_len = usize::try_from(size).map_err(|_| err(std::io::Error::other("size too large")))?;
        // SAFETY: a new shared mapping of the whole memfd; nothing else refers to that range yet.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VubError::Map(std::io::Error::last_os_error()));
        }
        let base =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| VubError::Map(std::io::Error::other("mmap gave NULL")))?;
        Ok(DriverMemory { fd, base, size, map_len })
    }

    fn check(&self, addr: u64, len: u64) -> Result<usize, VubError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => {
                usize::try_from(addr).map_err(|_| VubError::OutOfBounds { addr, len, size: self.size })
            }
            _ => Err(VubError::OutOfBounds { addr, len, size: self.size }),
        }
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), VubError> {
        let off = self.check(addr, bytes.len() as u64)?;
        // SAFETY: `off + bytes.len()` is inside the mapping (checked); the destination is shared
        // memory reached only through raw pointers, so no Rust reference aliases it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.as_ptr().add(off), bytes.len()) };
        Ok(())
    }

    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), VubError> {
        let off = self.check(addr, out.len() as u64)?;
        // SAFETY: as in `write`, the source range is inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// The ring field at `addr`. Ring offsets come from [`RingLayout`] inside a queue area the
    /// constructor checked against the size, so they are in range and aligned.
    fn u16_at(&self, addr: u64) -> &AtomicU16 {
        let off = self.check(addr, 2).unwrap_or_else(|e| panic!("ring field: {e}"));
        assert_eq!(off % 2, 0, "ring field {addr:#x} misaligned");
        // SAFETY: in range and 2-aligned (checked just above), and the mapping lives as long as `self`.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU16>() }
    }

    fn u32_at(&self, addr: u64) -> &AtomicU32 {
        let off = self.check(addr, 4).unwrap_or_else(|e| panic!("ring field: {e}"));
        assert_eq!(off % 4, 0, "ring field {addr:#x} misaligned");
        // SAFETY: in range and 4-aligned (checked just above), and the mapping lives as long as `self`.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU32>() }
    }

    fn user_addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }
}

impl Drop for DriverMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and nothing refers to it past `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Queues to set up (1 to what the backend offers).
    pub queues: usize,
    /// Entries per queue (a power of two, at most [`MAX_QUEUE_SIZE`]).
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when the backend offers it.
    pub event_idx: bool,
    /// Ask for no calls (VRING_AVAIL_F_NO_INTERRUPT; with EVENT_IDX, used_event is left behind):
    /// a fully polling driver. Off: used_event follows the driver, as Linux's does with callbacks enabled.
    pub suppress_interrupts: bool,
    /// Seal the memory's size (F_SEAL_SHRINK | F_SEAL_GROW). Off only to check that a
    /// backend refuses unsealed memory.
    pub seal_memory: bool,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            queues: 1,
            queue_size: MAX_QUEUE_SIZE,
            event_idx: true,
            suppress_interrupts: false,
            seal_memory: true,
        }
    }
}

/// One queue, the driver's side.
struct DriverQueue {
    layout: RingLayout,
    area: u64,
    kick: EventFd,
    call: EventFd,
    /// The avail index the driver has published.
    avail_idx: u16,
    /// `avail_idx` at the last notify.
    notified_idx: u16,
    /// The next used entry to read.
    last_used: u16,
    kicks: u64,
}

/// A vhost-user-blk driver: the frontend's socket, the memory and the queues.
pub struct BlkDriver {
    frontend: Frontend,
    mem: DriverMemory,
    queues: Vec<DriverQueue>,
    event_idx: bool,
    suppress_interrupts: bool,
    acked_features: u64,
    capacity_sectors: u64,
    read_only: bool,
    backend_queues: u64,
}

/// The virtio feature bit `b`.
const fn bit(b: u32) -> u64 {
    1u64 << b
}

impl BlkDriver {
    /// Connects to the backend at `socket` and sets it up as QEMU does: owner, features,
    /// protocol features (MQ, CONFIG, REPLY_ACK when offered), config (capacity), memory
    /// table, then each queue (num, base, addr, kick, call, enable).
    pub fn connect(socket: &Path, opts: &DriverOptions) -> Result<BlkDriver, VubError> {
        let size = opts.queue_size;
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(VubError::Options(format!("queue size {size}: a power of two up to {MAX_QUEUE_SIZE}")));
        }
        if opts.queues == 0 {
            return Err(VubError::Options("at least one queue".into()));
        }
        let p = |step: &'static str| move |source| VubError::Protocol { step, source };
        let mut fe = Frontend::connect(socket, opts.queues as u64)
            .map_err(|source| VubError::Connect { path: socket.to_path_buf(), source })?;
        fe.set_owner().map_err(p("SET_OWNER"))?;
        let offered = fe.get_features().map_err(p("GET_FEATURES"))?;
        if offered & bit(VHOST_USER_F_PROTOCOL_FEATURES) == 0 {
            return Err(VubError::MissingFeature("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        if offered & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(VubError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let proto_offered = fe.get_protocol_features().map_err(p("GET_PROTOCOL_FEATURES"))?;
        let wanted =
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
        let proto = proto_offered & wanted;
        if !proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VubError::MissingFeature("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        fe.set_protocol_features(proto).map_err(p("SET_PROTOCOL_FEATURES"))?;
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later message is acknowledged: a refusal (say, of the memory table) is an
            // error here rather than a silent hang later.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_queues = if proto.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(p("GET_QUEUE_NUM"))?
        } else {
            1
        };
        if opts.queues as u64 > backend_queues {
            return Err(VubError::Queues { wanted: opts.queues, offered: backend_queues });
        }
        let zero = [0u8; CONFIG_LEN as usize];
        let (_, config) =
            fe.get_config(0, CONFIG_LEN, VhostUserConfigFlags::empty(), &zero).map_err(p("GET_CONFIG"))?;
        let capacity_sectors = config.get(0..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
        let event_idx = opts.event_idx && offered & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut features = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES);
        if event_idx {
            features |= bit(VIRTIO_RING_F_EVENT_IDX);
        }
        if opts.queues > 1 && offered & bit(VIRTIO_BLK_F_MQ) != 0 {
            features |= bit(VIRTIO_BLK_F_MQ);
        }
        let read_only = offered & bit(VIRTIO_BLK_F_RO) != 0;
        if read_only {
            features |= bit(VIRTIO_BLK_F_RO);
        }
        fe.set_features(features).map_err(p("SET_FEATURES"))?;

        let mem =
            DriverMemory::new((opts.queues as u64 * QUEUE_AREA + SCRATCH_BYTES).max(MIN_MEMORY), opts.seal_memory)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.size,
            userspace_addr: mem.user_addr(),
            mmap_offset: 0,
            mmap_handle: mem.fd.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).map_err(p("SET_MEM_TABLE"))?;

        let mut queues = Vec::with_capacity(opts.queues);
        for q in 0..opts.queues {
            let area = q as u64 * QUEUE_AREA;
            let layout = RingLayout::new(area, size);
            let efd = |what| move |source| VubError::EventFd { what, source };
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(efd("create"))?;
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(efd("create"))?;
            if opts.suppress_interrupts {
                mem.u16_at(layout.avail_flags()).store(AVAIL_F_NO_INTERRUPT, Ordering::Release);
            }
            fe.set_vring_num(q, size).map_err(p("SET_VRING_NUM"))?;
            fe.set_vring_base(q, 0).map_err(p("SET_VRING_BASE"))?;
            // vhost-user ring addresses are the frontend's virtual addresses.
            let va = mem.user_addr();
            let cfg = VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: va + layout.desc,
                used_ring_addr: va + layout.used,
                avail_ring_addr: va + layout.avail,
                log_addr: None,
            };
            fe.set_vring_addr(q, &cfg).map_err(p("SET_VRING_ADDR"))?;
            fe.set_vring_kick(q, &kick).map_err(p("SET_VRING_KICK"))?;
            fe.set_vring_call(q, &call).map_err(p("SET_VRING_CALL"))?;
            fe.set_vring_enable(q, true).map_err(p("SET_VRING_ENABLE"))?;
            queues.push(DriverQueue {
                layout,
                area,
                kick,
                call,
                avail_idx: 0,
                notified_idx: 0,
                last_used: 0,
                kicks: 0,
            });
        }
        // A request with a reply: the backend has handled everything before it when it answers.
        fe.get_features().map_err(p("GET_FEATURES (barrier)"))?;
        // libvhost-user signals a call fd as soon as it is set (for a driver reconnecting
        // after a hang): not a completion, so the counts start after it.
        for dq in &queues {
            let _ = dq.call.read();
        }
        Ok(BlkDriver {
            frontend: fe,
            mem,
            queues,
            event_idx,
            suppress_interrupts: opts.suppress_interrupts,
            acked_features: features,
            capacity_sectors,
            read_only,
            backend_queues,
        })
    }

    /// The device's capacity in 512-byte sectors (from its config space).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }
    /// Whether the device is read-only (VIRTIO_BLK_F_RO).
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// Whether EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }
    /// The virtio features acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
    /// Queues the backend offers.
    pub fn backend_queues(&self) -> u64 {
        self.backend_queues
    }
    /// Queues set up.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }
    /// Size of the driver's memory (guest addresses 0..size).
    pub fn memory_size(&self) -> u64 {
        self.mem.size
    }
    /// Typed-request slots per queue.
    pub fn slots(&self) -> usize {
        usize::from(self.queues.first().map_or(0, |q| q.layout.size) / DESCS_PER_REQUEST)
    }
    /// The queue's ring layout (guest addresses).
    pub fn layout(&self, q: usize) -> Result<RingLayout, VubError> {
        Ok(self.queue(q)?.layout)
    }
    /// A memory range no queue uses, for raw chains' buffers: (guest address, length).
    pub fn scratch(&self) -> (u64, u64) {
        let start = self.queues.len() as u64 * QUEUE_AREA;
        (start, self.mem.size - start)
    }
    /// The vhost-user connection, for messages this driver does not wrap.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    fn queue(&self, q: usize) -> Result<&DriverQueue, VubError> {
        self.queues.get(q).ok_or(VubError::Index { what: "queue", index: q, limit: self.queues.len() })
    }
    fn queue_mut(&mut self, q: usize) -> Result<&mut DriverQueue, VubError> {
        let limit = self.queues.len();
        self.queues.get_mut(q).ok_or(VubError::Index { what: "queue", index: q, limit })
    }

    /// Slot `s` of queue `q`: its buffers and head descriptor.
    pub fn slot(&self, q: usize, s: usize) -> Result<SlotAddrs, VubError> {
        let area = self.queue(q)?.area;
        if s >= self.slots() {
            return Err(VubError::Index { what: "slot", index: s, limit: self.slots() });
        }
        let header = area + RINGS_BYTES + s as u64 * HEADER_STRIDE;
        Ok(SlotAddrs {
            header,
            data: area + DATA_OFFSET + s as u64 * SLOT_DATA,
            status: header + BLK_HEADER_LEN as u64,
            // s < size / 3, so this fits.
            head: u16::try_from(s).unwrap_or(0) * DESCS_PER_REQUEST,
        })
    }

    /// Copies `bytes` into driver memory at guest address `addr`.
    pub fn write_mem(&self, addr: u64, bytes: &[u8]) -> Result<(), VubError> {
        self.mem.write(addr, bytes)
    }
    /// Copies driver memory at guest address `addr` into `out`.
    pub fn read_mem(&self, addr: u64, out: &mut [u8]) -> Result<(), VubError> {
        self.mem.read(addr, out)
    }
    /// The status byte of slot `s` of queue `q`.
    pub fn status(&self, q: usize, s: usize) -> Result<u8, VubError> {
        let mut b = [0u8; 1];
        self.mem.read(self.slot(q, s)?.status, &mut b)?;
        Ok(b[0])
    }

    /// Writes slot `s`'s chain for a read (`write` false) or write of `len` bytes at `sector`:
    /// header (device-readable), data (device-writable for a read), status (device-writable,
    /// set to 0xff so a backend that never writes it is caught). Not yet made available.
    pub fn prepare(&mut self, q: usize, s: usize, write: bool, sector: u64, len: u32) -> Result<u16, VubError> {
        if u64::from(len) > SLOT_DATA {
            return Err(VubError::Options(format!("request of {len} bytes: at most {SLOT_DATA}")));
        }
        let a = self.slot(q, s)?;
        let layout = self.queue(q)?.layout;
        let kind = if write { VIRTIO_BLK_T_OUT } else { VIRTIO_BLK_T_IN };
        self.mem.write(a.header, &blk_header(kind, sector))?;
        self.mem.write(a.status, &[0xff])?;
        let data_flags = if write { 0 } else { DESC_F_WRITE };
        let descs = [
            RawDesc { addr: a.header, len: BLK_HEADER_LEN_U32, flags: DESC_F_NEXT, next: a.head + 1 },
            RawDesc { addr: a.data, len, flags: data_flags | DESC_F_NEXT, next: a.head + 2 },
            RawDesc { addr: a.status, len: 1, flags: DESC_F_WRITE, next: 0 },
        ];
        for (i, d) in (a.head..).zip(descs.iter()) {
            self.mem.write(layout.desc_entry(i), &encode_desc(d))?;
        }
        Ok(a.head)
    }

    /// Puts `head` in the available ring and publishes the new index (no notification yet).
    /// `head` is not checked: a hostile test may pass one outside the table.
    pub fn make_available(&mut self, q: usize, head: u16) -> Result<(), VubError> {
        let (layout, idx) = {
            let dq = self.queue(q)?;
            (dq.layout, dq.avail_idx)
        };
        self.mem.u16_at(layout.avail_ring(idx % layout.size)).store(head, Ordering::Relaxed);
        let next = idx.wrapping_add(1);
        // Release: the descriptors and the ring entry are visible before the index that covers them.
        self.mem.u16_at(layout.avail_idx()).store(next, Ordering::Release);
        self.queue_mut(q)?.avail_idx = next;
        Ok(())
    }

    /// Kicks the backend if it asked for one (Linux's `virtqueue_kick_prepare` then notify):
    /// with EVENT_IDX when the published avail index passed `avail_event`, otherwise unless
    /// `used.flags` has VRING_USED_F_NO_NOTIFY. Returns whether it kicked.
    pub fn notify(&mut self, q: usize) -> Result<bool, VubError> {
        let event_idx = self.event_idx;
        let (layout, old, new) = {
            let dq = self.queue(q)?;
            (dq.layout, dq.notified_idx, dq.avail_idx)
        };
        // The index store must be ordered before the read of the device's suppression state,
        // or both sides can each decide the other needs no notification.
        fence(Ordering::SeqCst);
        let kick = if event_idx {
            need_event(self.mem.u16_at(layout.avail_event()).load(Ordering::Acquire), new, old)
        } else {
            self.mem.u16_at(layout.used_flags()).load(Ordering::Acquire) & USED_F_NO_NOTIFY == 0
        };
        let dq = self.queue_mut(q)?;
        dq.notified_idx = new;
        if kick {
            dq.kick.write(1).map_err(|source| VubError::EventFd { what: "kick", source })?;
            dq.kicks += 1;
        }
        Ok(kick)
    }

    /// The next used entry, if the backend has produced one. With EVENT_IDX and interrupts on,
    /// moves `used_event` up to it, as Linux's `virtqueue_get_buf` does.
    pub fn poll_used(&mut self, q: usize) -> Result<Option<UsedElem>, VubError> {
        let (layout, last) = {
            let dq = self.queue(q)?;
            (dq.layout, dq.last_used)
        };
        // Acquire: the entry and the buffers it covers are read after the index.
        if self.mem.u16_at(layout.used_idx()).load(Ordering::Acquire) == last {
            return Ok(None);
        }
        let slot = last % layout.size;
        let id = self.mem.u32_at(layout.used_elem(slot)).load(Ordering::Relaxed);
        let len = self.mem.u32_at(layout.used_elem(slot) + 4).load(Ordering::Relaxed);
        let next = last.wrapping_add(1);
        self.queue_mut(q)?.last_used = next;
        if self.event_idx && !self.suppress_interrupts {
            self.mem.u16_at(layout.used_event()).store(next, Ordering::SeqCst);
        }
        Ok(Some(UsedElem { id, len }))
    }

    /// Spins on the used ring until an entry appears or `timeout` passes.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Result<Option<UsedElem>, VubError> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(u) = self.poll_used(q)? {
                return Ok(Some(u));
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() >= timeout {
                return Ok(None);
            }
            std::hint::spin_loop();
        }
    }

    /// Writes `descs` into the descriptor table at indices 0.., makes `head` available and
    /// notifies as [`BlkDriver::notify`] does; returns whether it kicked. Nothing is checked,
    /// so chains may point outside memory, be oversized or loop. It overwrites the typed
    /// slots' descriptors: do not mix it with typed requests in flight on the same queue.
    pub fn submit_raw(&mut self, q: usize, descs: &[RawDesc], head: u16) -> Result<bool, VubError> {
        let layout = self.queue(q)?.layout;
        if descs.len() > usize::from(layout.size) {
            return Err(VubError::Index { what: "descriptor", index: descs.len(), limit: usize::from(layout.size) });
        }
        for (i, d) in (0u16..).zip(descs.iter()) {
            self.mem.write(layout.desc_entry(i), &encode_desc(d))?;
        }
        self.make_available(q, head)?;
        self.notify(q)
    }

    /// Publishes `idx` as the avail index as it is, whatever the ring holds (a hostile test's
    /// index far past the entries made available); later typed submissions continue from it.
    pub fn publish_avail_idx(&mut self, q: usize, idx: u16) -> Result<(), VubError> {
        let layout = self.queue(q)?.layout;
        self.mem.u16_at(layout.avail_idx()).store(idx, Ordering::Release);
        self.queue_mut(q)?.avail_idx = idx;
        Ok(())
    }

    /// Kicks queue `q` whether or not the backend asked for it.
    pub fn kick(&mut self, q: usize) -> Result<(), VubError> {
        let dq = self.queue_mut(q)?;
        dq.kick.write(1).map_err(|source| VubError::EventFd { what: "kick", source })?;
        dq.kicks += 1;
        Ok(())
    }

    /// The used index the backend has published on queue `q`.
    pub fn used_idx(&self, q: usize) -> Result<u16, VubError> {
        Ok(self.mem.u16_at(self.queue(q)?.layout.used_idx()).load(Ordering::Acquire))
    }

    /// Kicks sent on queue `q` so far.
    pub fn kicks(&self, q: usize) -> Result<u64, VubError> {
        Ok(self.queue(q)?.kicks)
    }

    /// Calls (interrupts) the backend signalled on queue `q` since the last take; does not block.
    pub fn take_interrupts(&mut self, q: usize) -> Result<u64, VubError> {
        match self.queue(q)?.call.read() {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(source) => Err(VubError::EventFd { what: "read", source }),
        }
    }

    /// One read or write through slot 0 of queue `q`, waited for: `data` is written to the
    /// device or filled from it. Returns the used entry; the status byte is checked.
    pub fn transfer(
        &mut self,
        q: usize,
        write: bool,
        sector: u64,
        data: &mut [u8],
        timeout: Duration,
    ) -> Result<UsedElem, VubError> {
        let len = u32::try_from(data.len()).map_err(|_| VubError::Options("transfer too large".into()))?;
        let a = self.slot(q, 0)?;
        if write {
            self.mem.write(a.data, data)?;
        }
        let head = self.prepare(q, 0, write, sector, len)?;
        self.make_available(q, head)?;
        self.notify(q)?;
        let u = self.wait_used(q, timeout)?.ok_or_else(|| VubError::Stalled {
            queue: q,
            timeout,
            what: format!("{} at sector {sector}", if write { "write" } else { "read" }),
        })?;
        if u.id != u32::from(head) {
            return Err(VubError::UnknownId { queue: q, id: u.id });
        }
        let status = self.status(q, 0)?;
        if status != VIRTIO_BLK_S_OK {
            return Err(VubError::Status { queue: q, sector, status });
        }
        if !write {
            self.mem.read(a.data, data)?;
        }
        Ok(u)
    }
}

/// xorshift64*: the random sectors, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A random block-aligned sector for blocks of `block` bytes on `sectors`.
    fn sector(&mut self, sectors: u64, block: u64) -> u64 {
        let per = (block / SECTOR).max(1);
        let blocks = (sectors / per).max(1);
        (self.next() % blocks) * per
    }
}

/// What the bench measures.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Timed QD1 requests per op.
    pub qd1_requests: u64,
    /// Untimed requests before each QD1 series.
    pub warmup: u64,
    /// How long each deep-queue series runs.
    pub deep_time: Duration,
    /// Requests in flight in the deep series.
    pub depth: usize,
    /// Request size in bytes (also the alignment).
    pub block: u32,
    /// Image size in MiB.
    pub image_mib: u64,
    /// CPU of the backend (the whole process).
    pub backend_cpu: usize,
    /// CPU of the frontend thread.
    pub frontend_cpu: usize,
    /// The driver's options.
    pub driver: DriverOptions,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            qd1_requests: 20_000,
            warmup: 1_000,
            deep_time: Duration::from_secs(2),
            depth: 32,
            block: 4096,
            image_mib: 256,
            backend_cpu: 0,
            frontend_cpu: 1,
            driver: DriverOptions::default(),
        }
    }
}

/// One series' result.
#[derive(Clone, Debug)]
pub struct WorkloadResult {
    /// `qd1 read` and so on.
    pub name: String,
    /// Requests in flight.
    pub depth: usize,
    /// Writes rather than reads.
    pub write: bool,
    /// Requests completed in the timed part.
    pub requests: u64,
    /// Its duration.
    pub seconds: f64,
    /// Kicks sent in it.
    pub kicks: u64,
    /// Calls received in it.
    pub irqs: u64,
    /// Per-request latency, submit to used entry seen, ns.
    pub hist: Histogram<u64>,
}

impl WorkloadResult {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
    /// Kicks per request.
    pub fn kicks_per_req(&self) -> f64 {
        self.kicks as f64 / self.requests.max(1) as f64
    }
    /// Calls per request.
    pub fn irqs_per_req(&self) -> f64 {
        self.irqs as f64 / self.requests.max(1) as f64
    }
}

/// A new latency histogram: 1 ns to 100 s, 3 significant digits.
fn latency_hist() -> Histogram<u64> {
    // These bounds are valid (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, 100_000_000_000, 3).unwrap_or_else(|e| panic!("histogram bounds: {e}"))
}

fn ns_of(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The error for a bad completion of slot `s`.
fn check_done(d: &BlkDriver, q: usize, u: UsedElem, slots: usize, sector: &[u64]) -> Result<usize, VubError> {
    let id = u.id;
    let s = usize::try_from(id).unwrap_or(usize::MAX) / usize::from(DESCS_PER_REQUEST);
    if !id.is_multiple_of(u32::from(DESCS_PER_REQUEST)) || s >= slots {
        return Err(VubError::UnknownId { queue: q, id });
    }
    let status = d.status(q, s)?;
    if status != VIRTIO_BLK_S_OK {
        return Err(VubError::Status { queue: q, sector: sector[s], status });
    }
    Ok(s)
}

/// QD1 on queue 0: `warmup` untimed then `n` timed requests, one at a time, spinning on the
/// used ring (as a polling guest would) while calls stay enabled and are counted.
pub fn run_qd1(
    d: &mut BlkDriver,
    write: bool,
    n: u64,
    warmup: u64,
    block: u32,
    rng_seed: u64,
) -> Result<WorkloadResult, VubError> {
    let q = 0;
    let sectors = d.capacity_sectors();
    let mut rng = Rng(rng_seed | 1);
    let mut hist = latency_hist();
    let fill: Vec<u8> = (0..block).map(|i| i.to_le_bytes()[0] ^ 0x5a).collect();
    d.write_mem(d.slot(q, 0)?.data, &fill)?;
    let mut kicks0 = 0;
    let mut start = Instant::now();
    for i in 0..warmup + n {
        if i == warmup {
            d.take_interrupts(q)?;
            kicks0 = d.kicks(q)?;
            start = Instant::now();
        }
        let sector = rng.sector(sectors, u64::from(block));
        let head = d.prepare(q, 0, write, sector, block)?;
        let t0 = Instant::now();
        d.make_available(q, head)?;
        d.notify(q)?;
        let mut spins = 0u32;
        let u = loop {
            if let Some(u) = d.poll_used(q)? {
                break u;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) && t0.elapsed() > STALL {
                return Err(VubError::Stalled { queue: q, timeout: STALL, what: format!("QD1 request {i}") });
            }
            std::hint::spin_loop();
        };
        let dt = t0.elapsed();
        check_done(d, q, u, 1, &[sector])?;
        if i >= warmup {
            hist.saturating_record(ns_of(dt).max(1));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(WorkloadResult {
        name: format!("qd1 {}", if write { "write" } else { "read" }),
        depth: 1,
        write,
        requests: n,
        seconds,
        kicks: d.kicks(q)? - kicks0,
        irqs: d.take_interrupts(q)?,
        hist,
    })
}

/// `depth` requests kept in flight on queue 0 for `time`: every completion is replaced at
/// once; the index is published per completion and the kick decided once per sweep of the
/// used ring, as a guest's request queue batches.
pub fn run_deep(
    d: &mut BlkDriver,
    write: bool,
    depth: usize,
    time: Duration,
    block: u32,
    rng_seed: u64,
) -> Result<WorkloadResult, VubError> {
    let q = 0;
    let slots = d.slots();
    if depth == 0 || depth > slots {
        return Err(VubError::Options(format!("depth {depth}: 1 to {slots}")));
    }
    let sectors = d.capacity_sectors();
    let mut rng = Rng(rng_seed | 1);
    let mut hist = latency_hist();
    let fill: Vec<u8> = (0..block).map(|i| i.to_le_bytes()[0] ^ 0xa5).collect();
    let mut sector = vec![0u64; depth];
    let mut t0 = vec![Instant::now(); depth];
    for s in 0..depth {
        d.write_mem(d.slot(q, s)?.data, &fill)?;
    }
    d.take_interrupts(q)?;
    let kicks0 = d.kicks(q)?;
    let start = Instant::now();
    let deadline = start + time;
    for s in 0..depth {
        sector[s] = rng.sector(sectors, u64::from(block));
        let head = d.prepare(q, s, write, sector[s], block)?;
        t0[s] = Instant::now();
        d.make_available(q, head)?;
    }
    d.notify(q)?;
    let (mut in_flight, mut done) = (depth, 0u64);
    let mut last_progress = Instant::now();
    while in_flight > 0 {
        let mut added = false;
        while let Some(u) = d.poll_used(q)? {
            let now = Instant::now();
            let s = check_done(d, q, u, depth, &sector)?;
            hist.saturating_record(ns_of(now - t0[s]).max(1));
            done += 1;
            last_progress = now;
            if now < deadline {
                sector[s] = rng.sector(sectors, u64::from(block));
                let head = d.prepare(q, s, write, sector[s], block)?;
                t0[s] = Instant::now();
                d.make_available(q, head)?;
                added = true;
            } else {
                in_flight -= 1;
            }
        }
        if added {
            d.notify(q)?;
        } else if last_progress.elapsed() > STALL {
            return Err(VubError::Stalled {
                queue: q,
                timeout: STALL,
                what: format!("QD{depth}, {in_flight} in flight"),
            });
        }
        std::hint::spin_loop();
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(WorkloadResult {
        name: format!("qd{depth} {}", if write { "write" } else { "read" }),
        depth,
        write,
        requests: done,
        seconds,
        kicks: d.kicks(q)? - kicks0,
        irqs: d.take_interrupts(q)?,
        hist,
    })
}

/// A backend child process: killed and reaped when dropped.
pub struct BackendProcess {
    child: Child,
    /// Its command line, for messages.
    pub command: String,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    stderr_path: PathBuf,
}

/// A command line as one string, for messages.
pub fn command_line(argv: &[OsString]) -> String {
    argv.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

impl BackendProcess {
    /// Starts `argv` with its whole process on `cpu` (None: unpinned), stderr into
    /// `stderr_path`, and waits up to `timeout` for `socket` to appear.
    pub fn spawn(
        argv: &[OsString],
        socket: &Path,
        cpu: Option<usize>,
        stderr_path: &Path,
        timeout: Duration,
    ) -> Result<BackendProcess, VubError> {
        let command = command_line(argv);
        let (prog, args) = argv.split_first().ok_or_else(|| VubError::Spawn {
            command: command.clone(),
            source: std::io::Error::other("empty command"),
        })?;
        let _ = std::fs::remove_file(socket);
        let stderr = std::fs::File::create(stderr_path)
            .map_err(|source| VubError::Scratch { path: stderr_path.to_path_buf(), source })?;
        let mut cmd = Command::new(prog);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and makes only two system
        // calls on the child itself (prctl, sched_setaffinity) with a set built on its stack:
        // async-signal-safe, no allocation, no lock.
        unsafe {
            cmd.pre_exec(move || {
                // The backend dies with the bench (killed mid-run, it cannot reap it) rather
                // than spin on its CPU forever.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(cpu) = cpu {
                    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| VubError::Spawn { command: command.clone(), source })?;
        let mut me =
            BackendProcess { child, command, socket: socket.to_path_buf(), stderr_path: stderr_path.to_path_buf() };
        let start = Instant::now();
        loop {
            if std::fs::metadata(socket).map(|m| m.file_type().is_socket()).unwrap_or(false) {
                return Ok(me);
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(VubError::Exited {
                    command: me.command.clone(),
                    status: status.to_string(),
                    stderr: me.stderr(),
                });
            }
            if start.elapsed() > timeout {
                return Err(VubError::NoSocket {
                    command: me.command.clone(),
                    socket: socket.to_path_buf(),
                    timeout,
                    stderr: me.stderr(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the process wrote to stderr so far, its lines joined with ` / ` (`(none)` when empty).
    pub fn stderr(&self) -> String {
        let t = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = t.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if lines.is_empty() {
            "(none)".into()
        } else {
            lines.join(" / ").chars().take(4000).collect()
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// THE sidecore backend's command line: the lead points the `sidecore` column at the real
/// daemon here. `exe` is this binary, `dir` the run's scratch directory, `cpu` the sidecore's.
pub fn sidecore_daemon_argv(exe: &Path, dir: &Path, cpu: usize, image: &Path, socket: &Path) -> Vec<OsString> {
    vec![
        exe.into(),
        "daemon".into(),
        "--socket".into(),
        dir.join("ctl.sock").into(),
        "--cores".into(),
        cpu.to_string().into(),
        "--vhost-user-blk".into(),
        format!("{},path={}", socket.display(), image.display()).into(),
    ]
}

/// qemu-storage-daemon exporting `image` as vhost-user-blk on `socket`, its I/O on one
/// iothread with `aio` (io_uring or threads), `queues` queues.
pub fn qsd_argv(image: &Path, socket: &Path, aio: &str, queues: usize) -> Vec<OsString> {
    vec![
        "qemu-storage-daemon".into(),
        "--blockdev".into(),
        format!("driver=file,node-name=d0,filename={},cache.direct=off,aio={aio}", image.display()).into(),
        "--object".into(),
        "iothread,id=io0".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=e0,node-name=d0,iothread=io0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            socket.display()
        )
        .into(),
    ]
}

/// Whether `prog` is on PATH.
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file())).unwrap_or(false)
}

/// The run's scratch: a socket directory in /tmp and the image in /dev/shm, removed on drop.
pub struct Scratch {
    /// Sockets and stderr logs.
    pub dir: PathBuf,
    /// The disk image.
    pub image: PathBuf,
}

impl Scratch {
    /// Makes the directory and an image of `mib` MiB filled with a pattern (so reads hit
    /// allocated tmpfs pages, not holes).
    pub fn new(mib: u64) -> Result<Scratch, VubError> {
        let tag = format!(
            "sidecore-vub-{}-{}",
            std::process::id(),
            ns_of(std::time::UNIX_EPOCH.elapsed().unwrap_or_default())
        );
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&dir).map_err(|source| VubError::Scratch { path: dir.clone(), source })?;
        let shm = Path::new("/dev/shm");
        let image = if shm.is_dir() { shm.join(format!("{tag}.img")) } else { dir.join("image.img") };
        let me = Scratch { dir, image };
        let err = |source| VubError::Scratch { path: me.image.clone(), source };
        let mut f = std::fs::File::create(&me.image).map_err(err)?;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let chunk: Vec<u8> = (0..1 << 20).map(|_| rng.next().to_le_bytes()[0]).collect();
        for _ in 0..mib {
            std::io::Write::write_all(&mut f, &chunk).map_err(err)?;
        }
        f.sync_all().map_err(err)?;
        Ok(me)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.image);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One backend's column.
#[derive(Clone, Debug)]
pub struct BackendRun {
    /// `sidecore` or `qemu-storage-daemon`.
    pub name: String,
    /// Its command line.
    pub command: String,
    /// What was negotiated and where it ran, one line.
    pub facts: String,
    /// Its results, or why there are none.
    pub outcome: Result<Vec<WorkloadResult>, String>,
}

/// The whole run.
#[derive(Clone, Debug)]
pub struct VubReport {
    /// What was run.
    pub config: BenchConfig,
    /// The columns: sidecore, then qemu-storage-daemon.
    pub runs: Vec<BackendRun>,
}

/// Drives `socket` from a thread pinned to `cfg.frontend_cpu`: the four series.
fn drive(
    socket: &Path,
    cfg: &BenchConfig,
    progress: &(dyn Fn(&str) + Sync),
    name: &str,
) -> Result<(String, Vec<WorkloadResult>), VubError> {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("vub-frontend".into())
            .spawn_scoped(s, || -> Result<(String, Vec<WorkloadResult>), VubError> {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: cfg.frontend_cpu }) {
                    return Err(VubError::Thread(format!("cannot pin to CPU {}", cfg.frontend_cpu)));
                }
                let mut d = BlkDriver::connect(socket, &cfg.driver)?;
                let facts = format!(
                    "capacity {} MiB, EVENT_IDX {}, {} queue(s) of {} (backend offers {}), {}",
                    (d.capacity_sectors() * SECTOR) >> 20,
                    if d.event_idx() { "on" } else { "off" },
                    d.queues(),
                    cfg.driver.queue_size,
                    d.backend_queues(),
                    if cfg.driver.suppress_interrupts { "calls suppressed" } else { "calls enabled, counted" },
                );
                let mut out = Vec::new();
                for write in [false, true] {
                    let op = if write { "write" } else { "read" };
                    progress(&format!("vhost-user-blk: {name}: qd1 {op}, {} requests", cfg.qd1_requests));
                    out.push(run_qd1(
                        &mut d,
                        write,
                        cfg.qd1_requests,
                        cfg.warmup,
                        cfg.block,
                        0x1234 + u64::from(write),
                    )?);
                }
                for write in [false, true] {
                    let op = if write { "write" } else { "read" };
                    progress(&format!("vhost-user-blk: {name}: qd{} {op}, {:?}", cfg.depth, cfg.deep_time));
                    out.push(run_deep(&mut d, write, cfg.depth, cfg.deep_time, cfg.block, 0x5678 + u64::from(write))?);
                }
                Ok((facts, out))
            })
            .map_err(|e| VubError::Thread(format!("cannot start: {e}")))?;
        h.join().map_err(|_| VubError::Thread("panicked".into()))?
    })
}

/// Starts one backend (the first of `argvs` that starts; its whole process on `pin`),
/// measures it, stops it.
fn run_backend(
    name: &str,
    argvs: &[Vec<OsString>],
    pin: Option<usize>,
    socket: &Path,
    scratch: &Scratch,
    cfg: &BenchConfig,
    progress: &(dyn Fn(&str) + Sync),
) -> BackendRun {
    let mut command = argvs.first().map(|a| command_line(a)).unwrap_or_default();
    let mut errors = Vec::new();
    for argv in argvs {
        command = command_line(argv);
        progress(&format!("vhost-user-blk: starting {name}: {command}"));
        let log = scratch.dir.join(format!("{}.stderr", name.replace(' ', "-")));
        let proc = match BackendProcess::spawn(argv, socket, pin, &log, Duration::from_secs(10)) {
            Ok(p) => p,
            Err(e) => {
                errors.push(crate::error_chain(&e));
                continue;
            }
        };
        let r = drive(socket, cfg, progress, name);
        let stderr = proc.stderr();
        drop(proc);
        return match r {
            Ok((facts, res)) => BackendRun {
                name: name.into(),
                command,
                facts: format!(
                    "{facts}; {}, frontend on CPU {}",
                    pin.map_or("process unpinned".to_string(), |c| format!("whole process on CPU {c}")),
                    cfg.frontend_cpu
                ),
                outcome: Ok(res),
            },
            Err(e) => BackendRun {
                name: name.into(),
                command,
                facts: String::new(),
                outcome: Err(format!("{}; its stderr: {stderr}", crate::error_chain(&e))),
            },
        };
    }
    BackendRun { name: name.into(), command, facts: String::new(), outcome: Err(errors.join("; then: ")) }
}

/// The bench: an image, then the sidecore daemon and qemu-storage-daemon in turn on the same
/// CPUs and the same image, each driven by the same frontend.
pub fn run(cfg: &BenchConfig, progress: &(dyn Fn(&str) + Sync)) -> Result<VubReport, VubError> {
    progress(&format!("vhost-user-blk: {} MiB image", cfg.image_mib));
    let scratch = Scratch::new(cfg.image_mib)?;
    let mut runs = Vec::new();
    let ours = scratch.dir.join("ours.sock");
    match std::env::current_exe() {
        Ok(exe) => {
            let argv = sidecore_daemon_argv(&exe, &scratch.dir, cfg.backend_cpu, &scratch.image, &ours);
            // Both backends get the one backend CPU for everything they run (the sidecore
            // daemon also pins its sidecore there with --cores).
            runs.push(run_backend("sidecore daemon", &[argv], Some(cfg.backend_cpu), &ours, &scratch, cfg, progress));
        }
        Err(e) => runs.push(BackendRun {
            name: "sidecore daemon".into(),
            command: String::new(),
            facts: String::new(),
            outcome: Err(format!("cannot find this executable: {e}")),
        }),
    }
    let theirs = scratch.dir.join("qsd.sock");
    if on_path("qemu-storage-daemon") {
        let q = cfg.driver.queues;
        let argvs = [qsd_argv(&scratch.image, &theirs, "io_uring", q), qsd_argv(&scratch.image, &theirs, "threads", q)];
        runs.push(run_backend("qemu-storage-daemon", &argvs, Some(cfg.backend_cpu), &theirs, &scratch, cfg, progress));
    } else {
        runs.push(BackendRun {
            name: "qemu-storage-daemon".into(),
            command: String::new(),
            facts: String::new(),
            outcome: Err("qemu-storage-daemon is not on PATH (Debian: apt-get install qemu-system-common)".into()),
        });
    }
    Ok(VubReport { config: cfg.clone(), runs })
}

/// A table row: label and one value per backend (None: no result).
type Row = (String, Vec<Option<f64>>);

impl VubReport {
    fn results(&self, i: usize) -> Option<&[WorkloadResult]> {
        self.runs.get(i).and_then(|r| r.outcome.as_ref().ok()).map(Vec::as_slice)
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = Vec::new();
        let names: Vec<String> = self
            .runs
            .iter()
            .find_map(|r| r.outcome.as_ref().ok())
            .map(|w| w.iter().map(|x| x.name.clone()).collect())
            .unwrap_or_default();
        let get = |i: usize, name: &str, f: &dyn Fn(&WorkloadResult) -> f64| {
            self.results(i).and_then(|w| w.iter().find(|x| x.name == name)).map(f)
        };
        let per = |label: String, name: &str, f: &dyn Fn(&WorkloadResult) -> f64| -> Row {
            (label, (0..self.runs.len()).map(|i| get(i, name, f)).collect())
        };
        for n in &names {
            if n.starts_with("qd1 ") {
                rows.push(per(format!("{n} p50 ns"), n, &|w| w.hist.value_at_quantile(0.5) as f64));
                rows.push(per(format!("{n} p99 ns"), n, &|w| w.hist.value_at_quantile(0.99) as f64));
            } else {
                rows.push(per(format!("{n} IOPS"), n, &|w| w.iops()));
                rows.push(per(format!("{n} p50 ns"), n, &|w| w.hist.value_at_quantile(0.5) as f64));
                rows.push(per(format!("{n} p99 ns"), n, &|w| w.hist.value_at_quantile(0.99) as f64));
            }
        }
        for n in &names {
            rows.push(per(format!("{n} kicks/req"), n, &|w| w.kicks_per_req()));
        }
        for n in &names {
            rows.push(per(format!("{n} irqs/req"), n, &|w| w.irqs_per_req()));
        }
        rows
    }

    /// The table for stdout: rows of figures, a column per backend, and sidecore / qemu-storage-daemon.
    pub fn table(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "sidecore bench --vhost-user-blk — backend (whole process) on CPU {}, frontend on CPU {}, {} B random requests on a {} MiB tmpfs image, QD1 {} requests, QD{} for {:?}\n",
            c.backend_cpu, c.frontend_cpu, c.block, c.image_mib, c.qd1_requests, c.depth, c.deep_time
        );
        for r in &self.runs {
            match &r.outcome {
                Ok(_) => s += &format!("{}: {}\n  {}\n", r.name, r.facts, r.command),
                Err(e) => s += &format!("{}: not available: {e}\n", r.name),
            }
        }
        s += &format!("\n{:<22}", "");
        for r in &self.runs {
            s += &format!(" {:>20}", r.name);
        }
        s += &format!(" {:>10}\n", "ratio");
        let fmt = |v: f64| if v.abs() < 10.0 { format!("{v:.3}") } else { format!("{v:.0}") };
        for (label, vals) in self.rows() {
            s += &format!("{label:<22}");
            for v in &vals {
                s += &format!(" {:>20}", v.map_or("-".to_string(), fmt));
            }
            let ratio = match (vals.first().copied().flatten(), vals.get(1).copied().flatten()) {
                (Some(a), Some(b)) if b != 0.0 => format!("{a_b:.2}", a_b = a / b),
                _ => "-".into(),
            };
            s += &format!(" {ratio:>10}\n");
        }
        s += "ratio = sidecore / qemu-storage-daemon (latency: lower is better; IOPS: higher is better)\n";
        s
    }

    /// The JSON (schema [`SCHEMA`]): provenance, config, and per backend its facts and every
    /// series with its HDR histogram.
    pub fn to_json(&self, provenance: &Provenance) -> serde_json::Value {
        let c = &self.config;
        let runs: Vec<serde_json::Value> = self
            .runs
            .iter()
            .map(|r| {
                let mut v = serde_json::json!({"name": r.name, "command": r.command});
                match &r.outcome {
                    Ok(ws) => {
                        v["facts"] = r.facts.clone().into();
                        v["series"] = ws
                            .iter()
                            .map(|w| {
                                serde_json::json!({
                                    "name": w.name,
                                    "depth": w.depth,
                                    "op": if w.write { "write" } else { "read" },
                                    "requests": w.requests,
                                    "seconds": w.seconds,
                                    "iops": w.iops(),
                                    "p50_ns": w.hist.value_at_quantile(0.5),
                                    "p90_ns": w.hist.value_at_quantile(0.9),
                                    "p99_ns": w.hist.value_at_quantile(0.99),
                                    "p999_ns": w.hist.value_at_quantile(0.999),
                                    "max_ns": w.hist.max(),
                                    "kicks": w.kicks,
                                    "irqs": w.irqs,
                                    "kicks_per_req": w.kicks_per_req(),
                                    "irqs_per_req": w.irqs_per_req(),
                                    "histogram": super::histogram_codec::encode(&w.hist).ok(),
                                })
                            })
                            .collect();
                    }
                    Err(e) => v["error"] = e.clone().into(),
                }
                v
            })
            .collect();
        serde_json::json!({
            "schema": SCHEMA,
            "provenance": provenance,
            "config": {
                "backend_cpu": c.backend_cpu,
                "frontend_cpu": c.frontend_cpu,
                "block_bytes": c.block,
                "image_mib": c.image_mib,
                "qd1_requests": c.qd1_requests,
                "warmup": c.warmup,
                "depth": c.depth,
                "deep_seconds": c.deep_time.as_secs_f64(),
                "queue_size": c.driver.queue_size,
                "event_idx_offered": c.driver.event_idx,
                "suppress_interrupts": c.driver.suppress_interrupts,
            },
            "backends": runs,
        })
    }

    /// Latency CDFs of every series of every backend that ran, for the plot.
    pub fn curves(&self) -> Vec<Curve> {
        self.runs
            .iter()
            .filter_map(|r| r.outcome.as_ref().ok().map(|ws| (r, ws)))
            .flat_map(|(r, ws)| {
                ws.iter().map(move |w| Curve {
                    label: format!("{} {}", r.name, w.name),
                    points: w
                        .hist
                        .iter_quantiles(16)
                        .map(|v| (v.value_iterated_to() as f64, v.quantile_iterated_to()))
                        .collect(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_layout_matches_the_split_ring_spec() {
        let l = RingLayout::new(0x1000, 256);
        assert_eq!(l.desc, 0x1000);
        assert_eq!(l.avail, 0x1000 + 16 * 256);
        assert_eq!(l.avail_idx(), l.avail + 2);
        assert_eq!(l.avail_ring(3), l.avail + 4 + 6);
        assert_eq!(l.used_event(), l.avail + 4 + 512);
        // used follows used_event (2 bytes), rounded up to 4.
        assert_eq!(l.used, (l.used_event() + 2 + 3) & !3);
        assert_eq!(l.used % 4, 0);
        assert_eq!(l.used_elem(1), l.used + 4 + 8);
        assert_eq!(l.avail_event(), l.used + 4 + 8 * 256);
        assert_eq!(l.end() - 0x1000, 4096 + 6 + 512 + 2 + 6 + 2048);
        // An even size leaves the avail ring 2 bytes short of used's 4-byte alignment.
        let s = RingLayout::new(0, 2);
        assert_eq!((s.avail, s.used_event(), s.used), (32, 40, 44));
        let s = RingLayout::new(0, 1);
        assert_eq!((s.avail, s.used_event(), s.used), (16, 22, 24));
    }

    #[test]
    fn need_event_follows_vring_need_event() {
        // The other side wants to hear once index 5 is passed.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 7, 4));
        assert!(!need_event(5, 5, 4));
        assert!(!need_event(5, 9, 6));
        // Across the wrap.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(!need_event(0xffff, 1, 0));
        assert!(!need_event(3, 3, 3));
    }

    #[test]
    fn request_header_and_descriptor_are_little_endian() {
        let h = blk_header(VIRTIO_BLK_T_OUT, 0x0102_0304_0506_0708);
        assert_eq!(h, [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(blk_header(VIRTIO_BLK_T_IN, 0)[0], 0);
        let d = encode_desc(&RawDesc { addr: 0x1122, len: 0x10, flags: 3, next: 0x0201 });
        assert_eq!(d, [0x22, 0x11, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 3, 0, 1, 2]);
    }

    #[test]
    fn sectors_are_block_aligned_and_in_range() {
        let mut r = Rng(7);
        for _ in 0..1000 {
            let s = r.sector(1 << 19, 4096);
            assert_eq!(s % 8, 0);
            assert!(s + 8 <= 1 << 19);
        }
    }

    #[test]
    fn driver_memory_is_sealed_and_bounds_checked() {
        let m = DriverMemory::new(1 << 20, true).unwrap();
        // SAFETY: F_GET_SEALS on an fd we own.
        let seals = unsafe { libc::fcntl(m.fd.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
        m.write((1 << 20) - 4, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        m.read((1 << 20) - 4, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(m.write((1 << 20) - 3, &[1, 2, 3, 4]).is_err());
        assert!(m.read(u64::MAX, &mut b).is_err());
    }

    #[test]
    fn sidecore_argv_names_socket_image_and_core() {
        let a =
            sidecore_daemon_argv(Path::new("/bin/sc"), Path::new("/d"), 3, Path::new("/i.img"), Path::new("/d/o.sock"));
        assert_eq!(
            command_line(&a),
            "/bin/sc daemon --socket /d/ctl.sock --cores 3 --vhost-user-blk /d/o.sock,path=/i.img"
        );
    }
}
