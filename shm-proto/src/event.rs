//! Posted events and the packet device's queues, per vCPU in the shared
//! region ([`crate::ring::VcpuShared`]).
//!
//! **Posted events.** The host sets bits in [`EventLine::pending`] while the
//! vCPU runs; the guest takes them (`swap(0)`) at its safe points. A real
//! interrupt is needed only to wake a halted vCPU, and the halt/wake race is
//! closed Dekker-style, with a full fence on both sides:
//!
//! ```text
//! guest                                  host (sidecore)
//! halting = 1                            pending |= bit      (fetch_or)
//! mfence                                 mfence
//! if pending != 0 { halting = 0; run }   if halting == 1 { kick (irqfd) }
//! halt (interrupts on)
//! halting = 0
//! ```
//!
//! Either the guest's re-check sees the bit, or the host's check sees
//! `halting` and kicks; an interrupt that lands between the re-check and
//! the halt instruction is not lost: the guest's handler moves the return
//! address past the halt.
//!
//! **Packet device.** One rx and one tx queue of [`PKT_QUEUE`] descriptors.
//! A descriptor's `state` word says who owns it ([`DESC_FREE`] …): the guest
//! hands it to the device with [`DESC_AVAIL`], the device hands it back with
//! [`DESC_USED`] (rx: a packet is in the buffer) or [`DESC_FREE`] (tx: sent)
//! or [`DESC_ERROR`] (refused). The device keeps its own cursors and never
//! reads an index from the guest; it validates every buffer against the
//! guest RAM it was given before touching it.

use core::sync::atomic::{AtomicU32, AtomicU64};

/// Event bit: a packet is waiting in the rx queue.
pub const EV_RX: u64 = 1 << 0;
/// Event bit: a test event (`sidecore bench --ops irq`); its sequence number
/// is in [`EventLine::payload`].
pub const EV_TEST: u64 = 1 << 1;

/// The MSI vector of the wake-up / exit-path interrupt.
pub const EVENT_VECTOR: u8 = 0x40;

/// Host-written event words of one vCPU.
#[repr(C, align(128))]
pub struct EventLine {
    /// Pending event bits ([`EV_RX`], …): the host ORs, the guest swaps to 0.
    pub pending: AtomicU64,
    /// Payload of the last [`EV_TEST`] (a sequence number).
    pub payload: AtomicU64,
    /// Events posted (informational).
    pub posted: AtomicU64,
    /// Interrupts sent to wake the vCPU (informational).
    pub kicks: AtomicU64,
    _pad: [u64; 12],
}

/// Guest-written event words of one vCPU (never trusted by the host).
#[repr(C, align(128))]
pub struct GuestEventLine {
    /// 1 while the vCPU is about to halt or halted, with interrupts on.
    pub halting: AtomicU64,
    /// The last [`EV_TEST`] payload the guest saw (the benchmark's ack).
    pub ack: AtomicU64,
    /// Interrupts the guest took.
    pub interrupts: AtomicU64,
    /// Halts the guest entered.
    pub halts: AtomicU64,
    _pad: [u64; 12],
}

const _: () = assert!(core::mem::size_of::<EventLine>() == 128);
const _: () = assert!(core::mem::size_of::<GuestEventLine>() == 128);

/// A packet that starts with these bytes ends the `echo` workload (after
/// it is echoed like any other).
pub const PKT_STOP: &[u8; 16] = b"sidecore:stop\0\0\0";

/// Descriptors per packet queue.
pub const PKT_QUEUE: usize = 32;
/// Largest packet (and buffer) in bytes.
pub const PKT_MAX: u32 = 2048;

/// Descriptor state: owned by the guest, nothing in it.
pub const DESC_FREE: u32 = 0;
/// Owned by the device: rx, an empty buffer of `len` bytes; tx, a packet of
/// `len` bytes to send.
pub const DESC_AVAIL: u32 = 1;
/// rx only: owned by the guest again, a packet of `len` bytes in the buffer.
pub const DESC_USED: u32 = 2;
/// Owned by the guest again: the device refused the descriptor (buffer
/// outside guest RAM, length over [`PKT_MAX`]).
pub const DESC_ERROR: u32 = 3;

/// One descriptor.
#[repr(C)]
pub struct PktDesc {
    /// Guest-physical address of the buffer.
    pub addr: AtomicU64,
    /// rx: buffer size (guest) then packet length (device); tx: packet length.
    pub len: AtomicU32,
    /// [`DESC_FREE`], [`DESC_AVAIL`], [`DESC_USED`] or [`DESC_ERROR`];
    /// written last (Release) by whoever hands the descriptor over.
    pub state: AtomicU32,
}

/// A queue of descriptors, used in order by both sides.
#[repr(C, align(128))]
pub struct PktQueue {
    /// The descriptors.
    pub desc: [PktDesc; PKT_QUEUE],
}

const _: () = assert!(core::mem::size_of::<PktDesc>() == 16);
const _: () = assert!(core::mem::size_of::<PktQueue>() == 512);

/// The packet device's queue pair of one vCPU.
#[repr(C, align(128))]
pub struct PktQueues {
    /// Host to guest.
    pub rx: PktQueue,
    /// Guest to host.
    pub tx: PktQueue,
}

const _: () = assert!(core::mem::size_of::<PktQueues>() == 1024);
