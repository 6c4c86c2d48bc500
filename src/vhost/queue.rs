//! The data plane of a vhost-user-blk device: its virtqueues, polled by a
//! sidecore in its sweep ([`BlkDevice`] is a [`Device`]).
//!
//! Each queue takes the chains the driver made available, checks each one
//! ([`super::blk::check_chain`]), and starts its I/O on the queue's own
//! io_uring: submitted without waiting, completions reaped from the
//! completion ring without a system call. Nothing on this path blocks.
//!
//! Notifications: while the sidecore sweeps, the queue tells the driver not
//! to kick (`VRING_USED_F_NO_NOTIFY`, or with `EVENT_IDX` an `avail_event`
//! left behind); when the sidecore parks, [`Device::park`] turns them back
//! on and re-checks the ring, so a chain made available in between is
//! either seen by that check or kicked, and the kick eventfds (with each
//! io_uring's completion eventfd, in one epoll set) wake the sidecore.
//! Interrupts go to the call eventfd only when the driver asks for them
//! (`used_event`, or `VRING_AVAIL_F_NO_INTERRUPT` clear).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};
use io_uring::{opcode, types, IoUring};
use sidecore_core::device::{Device, Kick};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::blk::{self, Kind, Refused, Request};

/// The disk behind a device: the image, opened once.
pub struct Disk {
    /// The image opened with `O_DIRECT`, when the file system allows it.
    pub direct: Option<File>,
    /// The image opened through the page cache (requests whose buffers are
    /// not sector aligned, and file systems without `O_DIRECT`).
    pub buffered: File,
    /// Size in sectors.
    pub capacity: u64,
    /// Writes are refused.
    pub readonly: bool,
    /// What `GET_ID` answers.
    pub id: Vec<u8>,
}

/// One queue's counters (read by status and metrics).
#[derive(Default, Debug)]
pub struct QueueCounters {
    /// Requests completed (any status).
    pub requests: AtomicU64,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes written from guest memory to the disk.
    pub written_bytes: AtomicU64,
    /// Kicks received (eventfd counts read while parked or at stop).
    pub kicks: AtomicU64,
    /// Interrupts sent through the call eventfd.
    pub interrupts: AtomicU64,
    /// Chains refused as malformed or invalid (IOERR / UNSUPP / none).
    pub bad_chains: AtomicU64,
    /// I/O that failed on the host (IOERR).
    pub io_errors: AtomicU64,
    /// The avail ring's index was impossible: the queue stopped.
    pub broken: AtomicU64,
}

impl QueueCounters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// A request in flight on the io_uring.
struct Slot {
    head: u16,
    kind: Kind,
    len: u32,
    status: vm_memory::GuestAddress,
    iov: Iov,
    /// The memory table the request's pointers are in: kept mapped until it
    /// completes, whatever the VMM sends meanwhile.
    mem: Option<Arc<GuestMemoryMmap>>,
}

/// Host pieces of one request's data.
struct Iov(Vec<libc::iovec>);
// SAFETY: the pointers are into a guest-memory mapping that the owning
// slot keeps alive (`Slot::mem`); they are only handed to the kernel.
unsafe impl Send for Iov {}

/// What the control side sends a device on its sidecore.
pub enum Command {
    /// Start polling this queue.
    Add(Box<PolledQueue>),
    /// Stop queue `index`: no new chains; once its I/O is done, send its
    /// next avail index and drop it.
    Stop {
        /// Queue index.
        index: u16,
        /// Where the index goes.
        reply: Sender<u16>,
    },
    /// A new memory table: chains from now on are read in it.
    Memory(Arc<GuestMemoryMmap>),
    /// Queue `index` interrupts through this call eventfd now (or none).
    Call {
        /// Queue index.
        index: u16,
        /// The new call fd's kick.
        call: Option<Kick>,
    },
    /// The VMM is gone: finish what is in flight, then the device is done.
    Close,
}

/// One virtqueue, polled.
pub struct PolledQueue {
    index: u16,
    queue: Queue,
    mem: Arc<GuestMemoryMmap>,
    kick: File,
    call: Option<Kick>,
    uring: IoUring,
    uring_done: File,
    disk: Arc<Disk>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    descs: Vec<Descriptor>,
    scratch: Iov,
    counters: Arc<QueueCounters>,
    broken: bool,
    stopping: Option<Sender<u16>>,
    notify_on: bool,
    /// The last poll found nothing but I/O in flight.
    waiting: bool,
}

/// Making a queue failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// io_uring.
    #[error("io_uring for queue {0}: {1} (is io_uring disabled? see /proc/sys/kernel/io_uring_disabled)")]
    Uring(u16, std::io::Error),
    /// An eventfd.
    #[error("eventfd for queue {0}: {1}")]
    Eventfd(u16, std::io::Error),
    /// The ring is not inside the memory table.
    #[error("queue {0}: the descriptor table, avail or used ring is not inside the memory table")]
    Outside(u16),
}

impl PolledQueue {
    /// A queue over `queue` (set up and ready), with its kick eventfd and
    /// the call eventfd's kick.
    pub fn new(
        index: u16,
        queue: Queue,
        mem: Arc<GuestMemoryMmap>,
        kick: File,
        call: Option<Kick>,
        disk: Arc<Disk>,
        counters: Arc<QueueCounters>,
    ) -> Result<PolledQueue, QueueError> {
        if !queue.is_valid(&*mem) {
            return Err(QueueError::Outside(index));
        }
        let size = queue.size();
        let uring = IoUring::new(u32::from(size).max(8)).map_err(|e| QueueError::Uring(index, e))?;
        // SAFETY: eventfd takes no pointers; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(QueueError::Eventfd(index, std::io::Error::last_os_error()));
        }
        // SAFETY: efd is a new descriptor that nothing else owns.
        let uring_done = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(efd) };
        let slots = (0..size)
            .map(|_| Slot {
                head: 0,
                kind: Kind::Flush,
                len: 0,
                status: vm_memory::GuestAddress(0),
                iov: Iov(Vec::with_capacity(blk::SEG_MAX)),
                mem: None,
            })
            .collect();
        let mut q = PolledQueue {
            index,
            queue,
            mem,
            kick,
            call,
            uring,
            uring_done,
            disk,
            slots,
            free: (0..size).rev().collect(),
            descs: Vec::with_capacity(usize::from(size)),
            scratch: Iov(Vec::with_capacity(blk::SEG_MAX)),
            counters,
            broken: false,
            stopping: None,
            notify_on: true,
            waiting: false,
        };
        q.set_notify(false);
        Ok(q)
    }

    /// The queue's index.
    pub fn index(&self) -> u16 {
        self.index
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn set_notify(&mut self, on: bool) {
        if self.notify_on == on {
            return;
        }
        self.notify_on = on;
        // Completions signal the eventfd only while the sidecore may sleep:
        // the signal costs each completion about 2 µs here.
        let _ = if on {
            self.uring.submitter().register_eventfd(self.uring_done.as_raw_fd())
        } else {
            self.uring.submitter().unregister_eventfd()
        };
        let mem = &*self.mem;
        let _ = if on { self.queue.enable_notification(mem).map(|_| ()) } else { self.queue.disable_notification(mem) };
    }

    fn drain_fds(&mut self) {
        if let Some(n) = sidecore_core::nowait::read_u64_nowait(self.kick.as_raw_fd()) {
            QueueCounters::add(&self.counters.kicks, n);
        }
        let _ = sidecore_core::nowait::read_u64_nowait(self.uring_done.as_raw_fd());
    }

    /// Completes `head` with `used` bytes written to the driver.
    fn used(&mut self, head: u16, used: u32) -> bool {
        QueueCounters::add(&self.counters.requests, 1);
        self.queue.add_used(&*self.mem, head, used).is_ok()
    }

    /// Takes new chains while there are slots; returns how many.
    fn take(&mut self) -> usize {
        let mut n = 0;
        while !self.free.is_empty() {
            let mem = self.mem.clone();
            let chain = match self.queue.iter(&*mem) {
                Ok(mut it) => it.next(),
                Err(_) => {
                    // An avail index more than a ring ahead: the driver is
                    // broken or hostile; stop until the VMM resets the queue.
                    self.broken = true;
                    QueueCounters::add(&self.counters.broken, 1);
                    None
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            self.descs.clear();
            let mut complete = false;
            for d in chain {
                complete = !d.has_next();
                if self.descs.len() == self.descs.capacity() {
                    complete = false;
                    break;
                }
                self.descs.push(d);
            }
            n += 1;
            let (c, ro) = (self.disk.capacity, self.disk.readonly);
            match blk::check_chain(&mem, &self.descs, complete, c, ro, &mut self.scratch.0) {
                Err(Refused::Malformed(_)) => {
                    QueueCounters::add(&self.counters.bad_chains, 1);
                    self.used(head, 0);
                }
                Err(Refused::Status { status, code, .. }) => {
                    QueueCounters::add(&self.counters.bad_chains, 1);
                    blk::write_status(&mem, status, code);
                    self.used(head, 1);
                }
                Ok(Request { kind: Kind::GetId, status, .. }) => {
                    let w = blk::write_id(&self.scratch.0, &self.disk.id);
                    blk::write_status(&mem, status, blk::S_OK);
                    self.used(head, w + 1);
                }
                Ok(Request { kind: Kind::Flush, status, .. }) if self.disk.readonly => {
                    blk::write_status(&mem, status, blk::S_OK);
                    self.used(head, 1);
                }
                Ok(req) => self.submit(head, req, mem),
            }
        }
        n
    }

    /// Queues the I/O of a checked request on the io_uring.
    fn submit(&mut self, head: u16, req: Request, mem: Arc<GuestMemoryMmap>) {
        let Some(slot_no) = self.free.pop() else { return };
        let slot = &mut self.slots[usize::from(slot_no)];
        std::mem::swap(&mut slot.iov, &mut self.scratch);
        slot.head = head;
        slot.kind = req.kind;
        slot.len = req.len;
        slot.status = req.status;
        slot.mem = Some(mem);
        let aligned = slot.iov.0.iter().all(|v| (v.iov_base as usize | v.iov_len).is_multiple_of(512));
        let fd = match (&self.disk.direct, aligned) {
            (Some(d), true) => d.as_raw_fd(),
            _ => self.disk.buffered.as_raw_fd(),
        };
        let iovcnt = u32::try_from(slot.iov.0.len()).unwrap_or(0);
        let off = req.sector * blk::SECTOR;
        let entry = match req.kind {
            Kind::Read => opcode::Readv::new(types::Fd(fd), slot.iov.0.as_ptr(), iovcnt).offset(off).build(),
            Kind::Write => opcode::Writev::new(types::Fd(fd), slot.iov.0.as_ptr(), iovcnt).offset(off).build(),
            _ => {
                opcode::Fsync::new(types::Fd(self.disk.buffered.as_raw_fd())).flags(types::FsyncFlags::DATASYNC).build()
            }
        }
        .user_data(u64::from(slot_no));
        // SAFETY: the iovec array and the buffers it points to stay valid
        // until the completion: the slot keeps both (its Vec is not touched
        // and its memory table stays mapped until `reap` frees it).
        let pushed = unsafe { self.uring.submission().push(&entry) }.is_ok();
        if !pushed {
            // Cannot happen (the ring has a place per slot); fail the request.
            self.finish(slot_no, -libc::EBUSY);
        }
    }

    /// Completes slot `slot_no` with the io_uring result `res`.
    fn finish(&mut self, slot_no: u16, res: i32) {
        let Some(slot) = self.slots.get_mut(usize::from(slot_no)) else { return };
        let Some(mem) = slot.mem.take() else { return };
        let want = match slot.kind {
            Kind::Read | Kind::Write => i64::from(slot.len),
            _ => 0,
        };
        let ok = i64::from(res) == want;
        let (head, kind, len, status) = (slot.head, slot.kind, slot.len, slot.status);
        slot.iov.0.clear();
        if ok {
            match kind {
                Kind::Read => QueueCounters::add(&self.counters.read_bytes, u64::from(len)),
                Kind::Write => QueueCounters::add(&self.counters.written_bytes, u64::from(len)),
                _ => {}
            }
        } else {
            QueueCounters::add(&self.counters.io_errors, 1);
        }
        blk::write_status(&mem, status, if ok { blk::S_OK } else { blk::S_IOERR });
        let used = if kind == Kind::Read && ok { len + 1 } else { 1 };
        QueueCounters::add(&self.counters.requests, 1);
        // The used entry goes into the current table (the rings' addresses
        // are the same in every table the VMM sends).
        let _ = self.queue.add_used(&*self.mem, head, used);
        self.free.push(slot_no);
    }

    /// Reaps the io_uring's completions; returns how many.
    fn reap(&mut self) -> usize {
        let mut n = 0;
        loop {
            let next = self.uring.completion().next();
            let Some(cqe) = next else { break };
            if let Ok(slot) = u16::try_from(cqe.user_data()) {
                self.finish(slot, cqe.result());
            }
            n += 1;
        }
        n
    }

    /// One sweep's work on this queue.
    fn poll(&mut self, parked: bool) -> usize {
        if parked {
            self.drain_fds();
        }
        let used_before = self.queue.next_used();
        let mut n = 0;
        if !self.broken && self.stopping.is_none() {
            n += self.take();
        }
        if !self.uring.submission().is_empty() {
            // Never waits: min_complete is 0.
            let _ = self.uring.submit();
        }
        if self.in_flight() > 0 {
            n += self.reap();
        }
        self.waiting = n == 0 && self.in_flight() > 0;
        if self.queue.next_used() != used_before && self.call.is_some() {
            let mem = self.mem.clone();
            if self.queue.needs_notification(&*mem).unwrap_or(true) {
                if let Some(k) = &self.call {
                    k.kick();
                }
                QueueCounters::add(&self.counters.interrupts, 1);
            }
        }
        if let Some(reply) = &self.stopping {
            if self.in_flight() == 0 {
                let _ = reply.send(self.queue.next_avail());
            }
        }
        n
    }

    fn finished(&self) -> bool {
        self.stopping.is_some() && self.in_flight() == 0
    }
}

impl Drop for PolledQueue {
    fn drop(&mut self) {
        // The kernel may still write into guest memory for what is in
        // flight: wait for it (bounded) before the mappings can go.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.in_flight() > 0 && std::time::Instant::now() < deadline {
            let _ = self.uring.submit_and_wait(1);
            self.reap();
        }
        if self.in_flight() > 0 {
            // Leak the mappings rather than unmap under the kernel's feet.
            for s in &mut self.slots {
                if let Some(m) = s.mem.take() {
                    std::mem::forget(m);
                }
            }
        }
    }
}

/// The device a sidecore polls: every started queue of one vhost-user-blk
/// connection.
pub struct BlkDevice {
    queues: Vec<PolledQueue>,
    inbox: Receiver<Command>,
    epoll: vmm_sys_util::epoll::Epoll,
    parked: bool,
    closing: bool,
}

impl BlkDevice {
    /// A device with no queue yet, fed by `inbox`.
    pub fn new(inbox: Receiver<Command>) -> std::io::Result<BlkDevice> {
        Ok(BlkDevice {
            queues: Vec::new(),
            inbox,
            epoll: vmm_sys_util::epoll::Epoll::new()?,
            parked: false,
            closing: false,
        })
    }

    fn watch(&self, fd: RawFd) {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let ev = EpollEvent::new(EventSet::IN, u64::try_from(fd).unwrap_or(0));
        let _ = self.epoll.ctl(ControlOperation::Add, fd, ev);
    }

    fn commands(&mut self) {
        while let Ok(c) = self.inbox.try_recv() {
            match c {
                Command::Add(q) => {
                    self.watch(q.kick.as_raw_fd());
                    self.watch(q.uring_done.as_raw_fd());
                    let mut q = *q;
                    if self.parked {
                        q.set_notify(true);
                    }
                    // A queue restarted under the same index replaces the old one.
                    self.queues.retain(|o| o.index != q.index);
                    self.queues.push(q);
                }
                Command::Stop { index, reply } => match self.queues.iter_mut().find(|q| q.index == index) {
                    Some(q) => q.stopping = Some(reply),
                    None => {
                        let _ = reply.send(u16::MAX);
                    }
                },
                Command::Call { index, call } => {
                    if let Some(q) = self.queues.iter_mut().find(|q| q.index == index) {
                        q.call = call;
                    }
                }
                Command::Memory(m) => {
                    for q in &mut self.queues {
                        q.mem = m.clone();
                    }
                }
                Command::Close => {
                    self.closing = true;
                    for q in &mut self.queues {
                        let (tx, _rx) = crossbeam::channel::bounded(1);
                        q.stopping = Some(tx);
                    }
                }
            }
        }
    }
}

impl Device for BlkDevice {
    fn poll(&mut self) -> usize {
        if !self.inbox.is_empty() {
            self.commands();
        }
        let parked = self.parked;
        let mut n = 0;
        for q in &mut self.queues {
            n += q.poll(parked);
        }
        if self.queues.iter().any(PolledQueue::finished) {
            self.queues.retain(|q| !q.finished());
        }
        if n == 0 && self.queues.iter().any(|q| q.waiting) {
            // I/O the file system cannot do without blocking (tmpfs, and
            // buffered writes anywhere) runs on io_uring's kernel workers,
            // which inherit this sidecore's CPU: let one run now rather
            // than at the next tick. sched_yield never waits; with nothing
            // else runnable it returns at once.
            std::thread::yield_now();
        }
        n
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn done(&self) -> bool {
        self.closing && self.queues.is_empty()
    }

    fn park(&mut self) {
        self.parked = true;
        for q in &mut self.queues {
            q.drain_fds();
            q.set_notify(true);
        }
    }

    fn unpark(&mut self) {
        self.parked = false;
        for q in &mut self.queues {
            q.set_notify(false);
            q.drain_fds();
        }
    }
}
