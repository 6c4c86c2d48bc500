//! Posted events and the packet device (shm-proto's `event` module), host
//! side.
//!
//! [`post`] is the host half of the halt/wake protocol. [`PacketDevice`]
//! moves packets between a UDP socket and a vCPU's rx/tx queues. It runs in
//! one of two modes:
//!
//! * [`Delivery::Posted`] — the sidecore calls [`PacketDevice::poll`] every
//!   sweep (it is a [`Device`]): it sends whatever the guest
//!   queued on tx, receives from the socket without blocking, and posts
//!   [`EV_RX`]; an interrupt only if the vCPU is halted.
//! * [`Delivery::Interrupt`] — the classic path: a VMM thread blocks on the
//!   socket, hands each packet to [`PacketDevice::deliver`], which
//!   interrupts the vCPU; the guest's PIO doorbell makes the VMM call
//!   [`PacketDevice::drain_tx`].
//!
//! The guest is hostile: descriptor states other than `DESC_AVAIL` are
//! skipped, every buffer is checked against the guest RAM window before it
//! is touched, and a bad descriptor is handed back as `DESC_ERROR` and
//! counted. The device never reads an index from the guest.

use std::any::Any;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use shm_proto::event::{PktQueue, DESC_AVAIL, DESC_ERROR, DESC_FREE, DESC_USED, EV_RX, PKT_MAX, PKT_QUEUE};
use shm_proto::ring::VcpuShared;

use crate::ring::SharedRegion;

/// Writes 1 to an eventfd that KVM_IRQFD turns into the vCPU's interrupt.
///
/// The eventfd may come from another process (a VMM attached to the
/// daemon), which can fill its counter and clear `O_NONBLOCK` on it: the
/// write is bounded ([`crate::nowait::bounded_write_u64`]), and after one
/// that would have blocked the kick stops writing (counted in
/// [`Kick::blocked`]): that VM loses its wake-ups, no one else loses time.
#[derive(Clone)]
pub struct Kick {
    fd: Arc<OwnedFd>,
    blocked: Arc<AtomicU64>,
}

impl Kick {
    /// A kick through this irqfd eventfd.
    pub fn new(fd: Arc<OwnedFd>) -> Kick {
        // A failure shows as a failed kick, never as a blocked sidecore.
        let _ = crate::nowait::install_handler();
        Kick { fd, blocked: Arc::default() }
    }

    /// Raises the interrupt; false if it could not (the fd would block, or
    /// did once before).
    pub fn kick(&self) -> bool {
        if self.blocked.load(Ordering::Relaxed) > 0 {
            return false;
        }
        match crate::nowait::bounded_write_u64(self.fd.as_raw_fd(), 1) {
            crate::nowait::WriteOutcome::Done => true,
            crate::nowait::WriteOutcome::Blocked => {
                self.blocked.fetch_add(1, Ordering::Relaxed);
                false
            }
            crate::nowait::WriteOutcome::Failed => false,
        }
    }

    /// Kicks that would have blocked (at most 1: the kick stops then).
    pub fn blocked(&self) -> Arc<AtomicU64> {
        self.blocked.clone()
    }
}

/// Work a sidecore does each sweep besides its rings: a virtual device's
/// queues. It must not block, log or allocate in `poll`.
pub trait Device: Send {
    /// Does what is ready; returns how many items it moved (0 = idle).
    fn poll(&mut self) -> usize;
    /// A descriptor that becomes readable when the device has work, for a
    /// parked sidecore to wait on (beside the guests' doorbells).
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// True once the device's VM is gone: the sidecore drops it.
    fn done(&self) -> bool {
        false
    }
    /// The sidecore is about to park: from now on work must make
    /// [`Device::wake_fd`] readable (e.g. turn a driver's notifications back
    /// on). The sidecore sweeps once more after this call, so work that
    /// arrived before the switch is found by that sweep.
    fn park(&mut self) {}
    /// The sidecore polls again: notifications may go off.
    fn unpark(&mut self) {}
}

/// Posts `bits` to the vCPU; kicks it if it is halted (or about to halt).
/// Returns whether it kicked. The full fence pairs with the guest's between
/// its `halting` store and its re-check of `pending`.
pub fn post(v: &VcpuShared, bits: u64, kick: Option<&Kick>) -> bool {
    v.events.pending.fetch_or(bits, Ordering::SeqCst);
    v.events.posted.fetch_add(1, Ordering::Relaxed);
    fence(Ordering::SeqCst);
    match kick {
        Some(k) if v.guest_events.halting.load(Ordering::SeqCst) != 0 => {
            v.events.kicks.fetch_add(1, Ordering::Relaxed);
            k.kick()
        }
        _ => false,
    }
}

/// A window of guest RAM the host may copy packets into and out of.
pub struct GuestWindow {
    base: NonNull<u8>,
    gpa: u64,
    len: u64,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: `base` points into a mapping kept alive by `_owner` (Send + Sync);
// the window is only read and written by byte copies through raw pointers.
unsafe impl Send for GuestWindow {}
// SAFETY: as above.
unsafe impl Sync for GuestWindow {}

impl GuestWindow {
    /// The guest-physical range `gpa .. gpa + len`, mapped at `base`.
    ///
    /// # Safety
    /// `base .. base + len` must stay mapped readable and writable while
    /// `owner` lives.
    pub unsafe fn new(base: NonNull<u8>, gpa: u64, len: u64, owner: Arc<dyn Any + Send + Sync>) -> GuestWindow {
        GuestWindow { base, gpa, len, _owner: owner }
    }

    /// Host pointer to `gpa .. gpa + len`, if all of it is in the window.
    pub fn range(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let off = gpa.checked_sub(self.gpa)?;
        if off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: off + len <= self.len, so the result stays in the mapping.
        Some(unsafe { self.base.as_ptr().add(usize::try_from(off).ok()?) })
    }
}

/// How the device tells the guest a packet came.
#[derive(Clone)]
pub enum Delivery {
    /// Post [`EV_RX`]; interrupt only a halted vCPU (the sidecore path).
    Posted(Option<Kick>),
    /// Post [`EV_RX`] and always interrupt (the exit path).
    Interrupt(Kick),
}

/// The device's counters.
#[derive(Default)]
pub struct DeviceCounters {
    /// Packets put on rx.
    pub rx: AtomicU64,
    /// Packets sent from tx.
    pub tx: AtomicU64,
    /// Packets dropped because no rx buffer was available.
    pub rx_no_buffer: AtomicU64,
    /// Descriptors refused (bad buffer or length).
    pub bad_desc: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
}

/// What became of one received packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// In the guest's buffer.
    Delivered,
    /// No buffer available: dropped.
    NoBuffer,
    /// The next buffer was bad: handed back as `DESC_ERROR`, packet dropped.
    BadDesc,
}

/// Sweeps [`Device::poll`] leaves the socket alone after
/// finding it empty: a receive is a system call, while a sweep of the rings
/// takes tens of nanoseconds, and the rings of every VM on the sidecore
/// wait for it.
const IDLE_RECV_SKIP: u32 = 8;

/// One vCPU's packet device.
pub struct PacketDevice {
    region: Arc<SharedRegion>,
    vcpu: u32,
    window: GuestWindow,
    socket: UdpSocket,
    peer: Option<SocketAddr>,
    delivery: Delivery,
    control: Option<Arc<crate::ring::VmControl>>,
    rx_next: usize,
    tx_next: usize,
    recv_skip: u32,
    buf: Vec<u8>,
    /// Counters.
    pub counters: Arc<DeviceCounters>,
}

impl PacketDevice {
    /// A device for `vcpu`'s queues, its buffers in `window`, talking over
    /// `socket`. Packets go back to whoever sent the last one. The socket's
    /// flags are left alone (its file description may be another process's
    /// too): the device sends and, with [`Delivery::Posted`], receives with
    /// `MSG_DONTWAIT`; otherwise the caller receives on it.
    pub fn new(
        region: Arc<SharedRegion>,
        vcpu: u32,
        window: GuestWindow,
        socket: UdpSocket,
        delivery: Delivery,
    ) -> std::io::Result<PacketDevice> {
        if region.vcpu(vcpu).is_none() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no vCPU {vcpu} in the region")));
        }
        Ok(PacketDevice {
            region,
            vcpu,
            window,
            socket,
            peer: None,
            delivery,
            control: None,
            rx_next: 0,
            tx_next: 0,
            recv_skip: 0,
            buf: vec![0; PKT_MAX as usize],
            counters: Arc::new(DeviceCounters::default()),
        })
    }

    fn shared(&self) -> &VcpuShared {
        // new() checked the vCPU exists.
        match self.region.vcpu(self.vcpu) {
            Some(v) => v,
            None => unreachable!("vCPU checked in new()"),
        }
    }

    /// Ties the device to a VM's control block (a daemon's VM): it is idle
    /// while the VM is paused and dropped once it is detached.
    pub fn set_control(&mut self, control: Arc<crate::ring::VmControl>) {
        self.control = Some(control);
    }

    /// Where tx packets go from now on.
    pub fn set_peer(&mut self, peer: SocketAddr) {
        self.peer = Some(peer);
    }

    /// Puts `pkt` in the next rx buffer and tells the guest.
    pub fn deliver(&mut self, pkt: &[u8]) -> RxOutcome {
        let out = place(&self.shared().pkt.rx, self.rx_next, &self.window, pkt);
        match out {
            RxOutcome::Delivered => {
                self.rx_next = (self.rx_next + 1) % PKT_QUEUE;
                self.counters.rx.fetch_add(1, Ordering::Relaxed);
                let kicked = match &self.delivery {
                    Delivery::Posted(k) => post(self.shared(), EV_RX, k.as_ref()),
                    Delivery::Interrupt(k) => {
                        post(self.shared(), EV_RX, None);
                        k.kick();
                        true
                    }
                };
                if kicked {
                    self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
                }
            }
            RxOutcome::BadDesc => {
                self.rx_next = (self.rx_next + 1) % PKT_QUEUE;
                self.counters.bad_desc.fetch_add(1, Ordering::Relaxed);
            }
            RxOutcome::NoBuffer => {
                self.counters.rx_no_buffer.fetch_add(1, Ordering::Relaxed);
            }
        }
        out
    }

    /// Sends every packet the guest queued on tx; returns how many
    /// descriptors it handled.
    pub fn drain_tx(&mut self) -> usize {
        // Field by field: `v` borrows the region while `buf` is written.
        let Some(v) = self.region.vcpu(self.vcpu) else { return 0 };
        let mut n = 0;
        while n < PKT_QUEUE {
            let d = &v.pkt.tx.desc[self.tx_next];
            if d.state.load(Ordering::Acquire) != DESC_AVAIL {
                break;
            }
            let (addr, len) = (d.addr.load(Ordering::Relaxed), d.len.load(Ordering::Relaxed));
            let ptr = if len <= PKT_MAX { self.window.range(addr, u64::from(len)) } else { None };
            match ptr {
                Some(p) => {
                    let len = len as usize;
                    // SAFETY: `p .. p + len` is inside the guest RAM window
                    // (checked by range()); `buf` holds PKT_MAX >= len bytes.
                    // The guest may write the buffer meanwhile: it can only
                    // garble its own packet.
                    unsafe { std::ptr::copy_nonoverlapping(p, self.buf.as_mut_ptr(), len) };
                    if let Some(peer) = self.peer {
                        let to = socket2::SockAddr::from(peer);
                        let sent = socket2::SockRef::from(&self.socket).send_to_with_flags(
                            &self.buf[..len],
                            &to,
                            libc::MSG_DONTWAIT,
                        );
                        if sent.is_ok() {
                            self.counters.tx.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    d.state.store(DESC_FREE, Ordering::Release);
                }
                None => {
                    self.counters.bad_desc.fetch_add(1, Ordering::Relaxed);
                    d.state.store(DESC_ERROR, Ordering::Release);
                }
            }
            self.tx_next = (self.tx_next + 1) % PKT_QUEUE;
            n += 1;
        }
        n
    }

    /// Receives one packet without blocking and delivers it; `false` if
    /// none was waiting.
    fn recv_one(&mut self) -> bool {
        // SAFETY: u8 and MaybeUninit<u8> have the same layout, and every
        // byte of `buf` is initialised already: the kernel only writes.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(), self.buf.len())
        };
        match socket2::SockRef::from(&self.socket).recv_from_with_flags(buf, libc::MSG_DONTWAIT) {
            Ok((n, from)) => {
                if let Some(from) = from.as_socket() {
                    self.peer = Some(from);
                }
                let pkt = std::mem::take(&mut self.buf);
                self.deliver(&pkt[..n]);
                self.buf = pkt;
                true
            }
            Err(_) => false,
        }
    }
}

impl Device for PacketDevice {
    fn poll(&mut self) -> usize {
        if self.control.as_ref().is_some_and(|c| c.paused.load(Ordering::Relaxed)) {
            return 0;
        }
        let mut n = self.drain_tx();
        if self.recv_skip > 0 {
            self.recv_skip -= 1;
            return n;
        }
        // A few packets per sweep at most: the rings come first.
        for _ in 0..4 {
            if !self.recv_one() {
                self.recv_skip = IDLE_RECV_SKIP;
                break;
            }
            n += 1;
        }
        n
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.socket.as_raw_fd())
    }

    fn done(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.detached.load(Ordering::Relaxed))
    }
}

/// Puts `pkt` into descriptor `i` of `q` if the guest made it available
/// with a valid buffer that is large enough.
pub fn place(q: &PktQueue, i: usize, window: &GuestWindow, pkt: &[u8]) -> RxOutcome {
    let d = &q.desc[i % PKT_QUEUE];
    if d.state.load(Ordering::Acquire) != DESC_AVAIL {
        return RxOutcome::NoBuffer;
    }
    let (addr, cap) = (d.addr.load(Ordering::Relaxed), d.len.load(Ordering::Relaxed));
    let len = u32::try_from(pkt.len()).unwrap_or(u32::MAX);
    // The whole buffer the guest declared must be guest RAM, not just the
    // bytes this packet needs.
    let ptr = if cap <= PKT_MAX && len <= cap { window.range(addr, u64::from(cap)) } else { None };
    let Some(p) = ptr else {
        d.state.store(DESC_ERROR, Ordering::Release);
        return RxOutcome::BadDesc;
    };
    // SAFETY: `p .. p + pkt.len()` is inside the guest RAM window (checked
    // by range()); the source is a host buffer of that length.
    unsafe { std::ptr::copy_nonoverlapping(pkt.as_ptr(), p, pkt.len()) };
    d.len.store(len, Ordering::Relaxed);
    d.state.store(DESC_USED, Ordering::Release);
    RxOutcome::Delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Heap(Vec<u8>);

    fn window(gpa: u64, len: usize) -> (GuestWindow, Arc<std::sync::Mutex<Heap>>) {
        let h = Arc::new(std::sync::Mutex::new(Heap(vec![0u8; len])));
        let base = {
            let mut g = h.lock().unwrap_or_else(|e| e.into_inner());
            NonNull::new(g.0.as_mut_ptr()).unwrap_or(NonNull::dangling())
        };
        // SAFETY: the Vec's buffer is `len` bytes and lives (never resized)
        // as long as `h`, which the window holds.
        let w = unsafe { GuestWindow::new(base, gpa, len as u64, h.clone()) };
        (w, h)
    }

    #[test]
    fn window_ranges_are_checked() {
        let (w, _h) = window(0x10_0000, 4096);
        assert!(w.range(0x10_0000, 4096).is_some());
        assert!(w.range(0x10_0800, 2048).is_some());
        assert!(w.range(0x10_0801, 2048).is_none());
        assert!(w.range(0xf_ffff, 1).is_none());
        assert!(w.range(u64::MAX, 2).is_none());
        assert!(w.range(0x10_0000, u64::MAX).is_none());
    }

    #[test]
    fn rx_place_validates_the_descriptor() {
        let region = SharedRegion::alloc(1).unwrap_or_else(|e| panic!("{e}"));
        let v = region.vcpu(0).unwrap_or_else(|| panic!("vcpu"));
        let (w, h) = window(0x10_0000, 8192);
        let q = &v.pkt.rx;
        // Not available: no buffer.
        assert_eq!(place(q, 0, &w, b"abc"), RxOutcome::NoBuffer);
        // Good buffer.
        q.desc[0].addr.store(0x10_0100, Ordering::Relaxed);
        q.desc[0].len.store(2048, Ordering::Relaxed);
        q.desc[0].state.store(DESC_AVAIL, Ordering::Release);
        assert_eq!(place(q, 0, &w, b"hello"), RxOutcome::Delivered);
        assert_eq!(q.desc[0].state.load(Ordering::Acquire), DESC_USED);
        assert_eq!(q.desc[0].len.load(Ordering::Relaxed), 5);
        assert_eq!(&h.lock().unwrap_or_else(|e| e.into_inner()).0[0x100..0x105], b"hello");
        // Outside guest RAM, too long, buffer too small: refused.
        for (addr, cap) in [(0x20_0000u64, 2048u32), (0x10_0000, 4096), (0x10_1f00, 2048), (0x10_0000, 2)] {
            q.desc[1].addr.store(addr, Ordering::Relaxed);
            q.desc[1].len.store(cap, Ordering::Relaxed);
            q.desc[1].state.store(DESC_AVAIL, Ordering::Release);
            assert_eq!(place(q, 1, &w, b"hello"), RxOutcome::BadDesc, "{addr:#x} {cap}");
            assert_eq!(q.desc[1].state.load(Ordering::Acquire), DESC_ERROR);
        }
    }

    #[test]
    fn post_kicks_only_a_halting_vcpu() {
        let region = SharedRegion::alloc(1).unwrap_or_else(|e| panic!("{e}"));
        let v = region.vcpu(0).unwrap_or_else(|| panic!("vcpu"));
        let efd = vmm_eventfd();
        let k = Kick::new(efd.clone());
        assert!(!post(v, EV_RX, Some(&k)));
        v.guest_events.halting.store(1, Ordering::SeqCst);
        assert!(post(v, EV_RX, Some(&k)));
        assert_eq!(v.events.pending.load(Ordering::SeqCst), EV_RX);
        assert_eq!(v.events.kicks.load(Ordering::Relaxed), 1);
        let mut b = [0u8; 8];
        // SAFETY: reads 8 bytes into `b` from the eventfd we created.
        let n = unsafe { libc::read(efd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        assert_eq!((n, u64::from_ne_bytes(b)), (8, 1));
    }

    fn vmm_eventfd() -> Arc<OwnedFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}
