//! The shared region: a header, then one [`VcpuShared`] block per vCPU with its
//! ring of [`Slot`]s.
//!
//! # Slot protocol
//!
//! Each call takes a *ticket* from its vCPU's ring: tickets count up from 0
//! (modulo 2^60), the ticket `t` lives in slot `t % RING_SLOTS`, and
//! `t / RING_SLOTS` is its lap. A slot's `state` word holds
//! `ticket << 4 | state`, so the sidecore can tell a current request from one
//! of an earlier lap, or one whose ticket skipped ahead.
//!
//! ```text
//!   guest:    write head+words, then state = (t, POSTED)        [Release]
//!   sidecore: state == (t, POSTED) with t == expected            [Acquire]
//!             CAS (t, POSTED) -> (t, CLAIMED)  — it owns the slot now
//!             copy head+words out once, validate, act
//!             write reply head+words, then state = (t, DONE)      [Release]
//!   guest:    state == (t, DONE)                                 [Acquire], read reply
//!   guest, no reply in time: CAS (t, POSTED) -> (t, CANCELLED), then take the
//!             exit path; if the CAS fails the sidecore has claimed the call
//!             and the guest waits for its reply.
//!   sidecore: state == (t, CANCELLED) with t == expected:
//!             CAS (t, CANCELLED) -> (t, SKIPPED), expect t + 1
//! ```
//!
//! The compare-and-swap on both sides makes every call happen **at most
//! once**. A slot is written by one side at a time: the sidecore while it
//! holds the claim, the guest otherwise. Backpressure, resynchronisation and
//! batch order (ABI v2) are in [`crate::sidecall`].

use core::sync::atomic::{AtomicU64, Ordering};

use crate::op::WORDS;

/// Slots per vCPU ring (a power of two).
pub const RING_SLOTS: usize = 64;
/// [`RING_SLOTS`] in ticket distance: one lap.
const RING_LAP: i64 = 64;
const _: () = assert!(RING_LAP.unsigned_abs() == RING_SLOTS as u64);

/// Bits of a state word that hold the ticket.
pub const TICKET_BITS: u32 = 60;
/// Mask of a ticket.
pub const TICKET_MASK: u64 = (1 << TICKET_BITS) - 1;

/// The state part of a slot's state word.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Never used, or free for the guest.
    Empty = 0,
    /// The guest has published a request.
    Posted = 1,
    /// The sidecore owns the slot and is carrying the request out.
    Claimed = 2,
    /// The reply is published.
    Done = 3,
    /// The guest gave up waiting and withdrew the request before anyone
    /// claimed it.
    Cancelled = 4,
    /// The sidecore passed a cancelled ticket (ABI v2): a guest that meets
    /// its own ticket in this state knows the sidecore is past it.
    Skipped = 5,
}

impl SlotState {
    /// Decodes the low four bits of a state word; `None` for values no
    /// well-behaved party writes.
    pub const fn from_bits(v: u64) -> Option<SlotState> {
        match v & 0xf {
            0 => Some(SlotState::Empty),
            1 => Some(SlotState::Posted),
            2 => Some(SlotState::Claimed),
            3 => Some(SlotState::Done),
            4 => Some(SlotState::Cancelled),
            5 => Some(SlotState::Skipped),
            _ => None,
        }
    }
}

/// Packs a ticket and a state into a state word.
pub const fn state_word(ticket: u64, state: SlotState) -> u64 {
    ((ticket & TICKET_MASK) << 4) | state as u64
}

/// The ticket part of a state word.
pub const fn word_ticket(word: u64) -> u64 {
    word >> 4
}

/// The slot index of a ticket.
pub const fn slot_index(ticket: u64) -> usize {
    // RING_SLOTS is a power of two well below 2^32: the masked value fits.
    #[allow(clippy::cast_possible_truncation)]
    let i = (ticket as usize) & (RING_SLOTS - 1);
    i
}

/// The ticket after `t`, wrapping at 2^60.
pub const fn next_ticket(t: u64) -> u64 {
    t.wrapping_add(1) & TICKET_MASK
}

/// Signed distance from `expected` to `t` in ticket space (wrap-aware):
/// negative for a repeated (old) ticket, positive for one that skipped ahead.
pub const fn ticket_distance(expected: u64, t: u64) -> i64 {
    // Shift into the top bits so the subtraction wraps at 2^60.
    let d = (t.wrapping_sub(expected) << 4).cast_signed();
    d >> 4
}

/// What [`Slot::try_post`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryPost {
    /// The request is published.
    Posted,
    /// The sidecore holds the slot.
    Busy,
    /// The slot says the sidecore finished with this very ticket: it is
    /// past it.
    Passed,
    /// The slot says the sidecore last finished a lap of it other than the
    /// previous one: the guest should ask where the sidecore is.
    Foreign,
}

/// One 64-byte ring slot.
#[repr(C, align(64))]
pub struct Slot {
    /// `ticket << 4 | state` ([`state_word`]). Published with Release,
    /// read with Acquire.
    pub state: AtomicU64,
    /// Request head ([`crate::op::encode_head`]) or reply status
    /// ([`crate::op::encode_status`]).
    pub head: AtomicU64,
    /// Request arguments or reply results.
    pub words: [AtomicU64; WORDS],
}

const _: () = assert!(core::mem::size_of::<Slot>() == 64);
const _: () = assert!(core::mem::align_of::<Slot>() == 64);
const _: () = assert!(core::mem::offset_of!(Slot, state) == 0);
const _: () = assert!(core::mem::offset_of!(Slot, head) == 8);
const _: () = assert!(core::mem::offset_of!(Slot, words) == 16);

/// A request or reply body copied out of a slot: the head word and the six
/// words, each read exactly once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Body {
    /// Head word (request head or reply status).
    pub head: u64,
    /// The six argument or result words.
    pub words: [u64; WORDS],
}

impl Slot {
    /// Reads the body once. Relaxed loads: the caller has already ordered
    /// them after the state word with an Acquire load or a successful CAS.
    pub fn read_body(&self) -> Body {
        let mut words = [0u64; WORDS];
        for (w, a) in words.iter_mut().zip(self.words.iter()) {
            *w = a.load(Ordering::Relaxed);
        }
        Body { head: self.head.load(Ordering::Relaxed), words }
    }

    /// Writes the body. Relaxed stores: the caller publishes them with a
    /// Release store of the state word.
    pub fn write_body(&self, body: &Body) {
        self.head.store(body.head, Ordering::Relaxed);
        for (a, w) in self.words.iter().zip(body.words.iter()) {
            a.store(*w, Ordering::Relaxed);
        }
    }

    /// Publishes `body` as ticket `t` unconditionally: for a producer that
    /// knows it owns the slot (host-side benchmarks and tests). A guest posts
    /// with [`Slot::try_post`].
    pub fn post(&self, t: u64, body: &Body) {
        self.write_body(body);
        self.state.store(state_word(t, SlotState::Posted), Ordering::Release);
    }

    /// Guest side: publishes `body` as ticket `t` if the guest owns the slot
    /// ([`crate::sidecall`]). Nothing is written unless it returns
    /// [`TryPost::Posted`]. A finished word of `t` itself is
    /// [`TryPost::Passed`]; of another lap than `t - 64` (the sidecore
    /// followed some other lap here) [`TryPost::Foreign`], unless `trusted`:
    /// the sidecore said it expects `t`, so that word is the guest's.
    pub fn try_post(&self, t: u64, body: &Body, trusted: bool) -> TryPost {
        let mut w = self.state.load(Ordering::Acquire);
        loop {
            let x = word_ticket(w);
            match SlotState::from_bits(w) {
                Some(SlotState::Claimed) => return TryPost::Busy,
                Some(SlotState::Skipped | SlotState::Done) if slot_index(x) == slot_index(t) => {
                    let d = ticket_distance(t, x);
                    if d == 0 {
                        // Finished with this very ticket: the sidecore is
                        // past it (a garbage word of this kind at its slot
                        // it passes too).
                        return TryPost::Passed;
                    }
                    if d != -RING_LAP && !trusted {
                        return TryPost::Foreign;
                    }
                    break;
                }
                // The sidecore may claim a POSTED word or skip a CANCELLED
                // one at any moment: take it from under it by
                // compare-and-swap, to EMPTY while the body is written.
                Some(SlotState::Posted | SlotState::Cancelled) => {
                    match self.state.compare_exchange(
                        w,
                        state_word(t, SlotState::Empty),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => break,
                        Err(now) => w = now,
                    }
                }
                // Every other word is the guest's: the sidecore never writes it.
                _ => break,
            }
        }
        self.post(t, body);
        TryPost::Posted
    }

    /// Guest side: `Some(reply)` once ticket `t` is done.
    pub fn poll_reply(&self, t: u64) -> Option<Body> {
        if self.state.load(Ordering::Acquire) == state_word(t, SlotState::Done) {
            Some(self.read_body())
        } else {
            None
        }
    }

    /// Guest side: withdraws ticket `t` if nobody has claimed it. `true`
    /// means the guest now owns the call and must take the exit path.
    pub fn try_cancel(&self, t: u64) -> bool {
        self.state
            .compare_exchange(
                state_word(t, SlotState::Posted),
                state_word(t, SlotState::Cancelled),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Sidecore side: claims the posted state word `seen`. `true` means the
    /// sidecore owns the slot.
    pub fn try_claim(&self, seen: u64) -> bool {
        self.state
            .compare_exchange(seen, (seen & !0xf) | SlotState::Claimed as u64, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Sidecore side: publishes the reply for the claimed ticket `t`.
    pub fn publish_reply(&self, t: u64, reply: &Body) {
        self.write_body(reply);
        self.state.store(state_word(t, SlotState::Done), Ordering::Release);
    }
}

/// A 128-byte line holding one counter, so that counters written by
/// different parties never share a line (adjacent-line prefetch pairs 64-byte
/// lines).
#[repr(C, align(128))]
pub struct Line {
    /// The counter.
    pub value: AtomicU64,
    _pad: [u64; 15],
}

const _: () = assert!(core::mem::size_of::<Line>() == 128);

/// Per-vCPU words the guest writes for the VMM to read (statistics and the
/// outcome of its selftest).
#[repr(C, align(128))]
pub struct GuestCounters {
    /// Sidecalls that got a reply.
    pub sidecalls: AtomicU64,
    /// Sidecalls that timed out and went to the exit path instead.
    pub fallbacks: AtomicU64,
    /// Sidecalls whose cancel lost the race (the sidecore had claimed them):
    /// the guest waited for their reply.
    pub late_replies: AtomicU64,
    /// Times the guest probed a sidecore it had marked absent.
    pub probes: AtomicU64,
    /// Calls that went straight to the exit path because the host said the
    /// ring is paused ([`HostStatus::paused`]).
    pub paused_exits: AtomicU64,
    /// Claimed calls the guest stopped waiting for because the heartbeat
    /// stood still for [`crate::boot::BootInfo::sidecore_liveness`] (a
    /// stopped or hung sidecore).
    pub abandoned: AtomicU64,
    _pad: [u64; 10],
}

const _: () = assert!(core::mem::size_of::<GuestCounters>() == 128);

/// Per-vCPU words the host writes for the guest to read.
#[repr(C, align(128))]
pub struct HostStatus {
    /// Status ([`crate::op::Status`]) of the guest's last page-table store
    /// that trapped to the VMM (the trap path has no reply slot).
    pub pte_status: AtomicU64,
    /// Kind ([`crate::op::PteKind`]) of that store.
    pub pte_kind: AtomicU64,
    /// 1 once the VMM knows the sidecore serving this VM is gone for good
    /// (the daemon died): the guest stops expecting it back.
    pub sidecore_lost: AtomicU64,
    /// 1 while no sidecore serves this ring on purpose (stopped, paused,
    /// detached): the guest takes the exit path at once, without a probe.
    /// Written by the sidecore that holds the ring, on the line the guest
    /// already reads for `sidecore_lost`.
    pub paused: AtomicU64,
    /// This ring's heartbeat: bumped by the sidecore serving it, with the
    /// region's, every so many sweeps while it is not paused. A VM's rings
    /// may be spread over several sidecores, so liveness is per ring.
    pub beat: AtomicU64,
    _pad: [u64; 11],
}

const _: () = assert!(core::mem::size_of::<HostStatus>() == 128);

/// Bytes in a vCPU's console buffer.
pub const CONSOLE_BYTES: usize = 256;

/// Everything shared per vCPU: its ring, its counters, the exit-path mailbox
/// and the console buffer. Two pages, page aligned.
#[repr(C, align(4096))]
pub struct VcpuShared {
    /// The ring.
    pub slots: [Slot; RING_SLOTS],
    /// Next ticket the sidecore expects (written by the host only, on every
    /// advance and every heartbeat): where a guest resynchronises
    /// ([`crate::sidecall`]).
    pub consumer: Line,
    /// Next ticket the guest will use (written by the guest only;
    /// informational, never read by the host).
    pub producer: Line,
    /// Mailbox of the exit path: the guest writes a request here in the slot
    /// encoding and exits with PIO to [`crate::boot::BootInfo::call_port`];
    /// the VMM writes the reply and sets the state word to DONE.
    pub exit_slot: Slot,
    _pad_exit: [u64; 8],
    /// Counters the guest keeps.
    pub guest: GuestCounters,
    /// Console line buffer: the guest fills it and exits with PIO to
    /// [`crate::boot::BootInfo::console_port`], the length in EAX.
    pub console: [u8; CONSOLE_BYTES],
    /// Words the host writes for the guest.
    pub host: HostStatus,
    /// Round-trip times of the guest's calls, as the guest measured them
    /// (written by the guest only, read by its own VMM; never trusted).
    pub latency: LatencyHist,
    /// Posted events (host-written).
    pub events: crate::event::EventLine,
    /// The guest's side of event delivery (guest-written).
    pub guest_events: crate::event::GuestEventLine,
    /// The packet device's queues.
    pub pkt: crate::event::PktQueues,
    /// The guest<->sidecore floor's line (`sidecore bench`): the guest stores
    /// an odd value, and a sidecore its VMM has armed for a block of round
    /// trips answers with the next even one. Unarmed, nobody reads it.
    pub pong: Line,
}

/// Offset of vCPU blocks in the region.
pub const VCPU_SHARED_OFFSET: u64 = 4096;
/// Bytes per vCPU block.
pub const VCPU_SHARED_SIZE: u64 = core::mem::size_of::<VcpuShared>() as u64;

const _: () = assert!(core::mem::size_of::<VcpuShared>() == 8192);
const _: () = assert!(core::mem::offset_of!(VcpuShared, slots) == 0);
const _: () = assert!(core::mem::offset_of!(VcpuShared, consumer) == 4096);
const _: () = assert!(core::mem::offset_of!(VcpuShared, producer) == 4224);
const _: () = assert!(core::mem::offset_of!(VcpuShared, exit_slot) == 4352);
const _: () = assert!(core::mem::offset_of!(VcpuShared, guest) == 4480);
const _: () = assert!(core::mem::offset_of!(VcpuShared, console) == 4608);
const _: () = assert!(core::mem::offset_of!(VcpuShared, host) == 4864);
const _: () = assert!(core::mem::offset_of!(VcpuShared, latency) == 4992);
const _: () = assert!(core::mem::offset_of!(VcpuShared, events) == 5504);
const _: () = assert!(core::mem::offset_of!(VcpuShared, guest_events) == 5632);
const _: () = assert!(core::mem::offset_of!(VcpuShared, pkt) == 5760);
const _: () = assert!(core::mem::offset_of!(VcpuShared, pong) == 6784);

/// Buckets in a [`LatencyHist`].
pub const LAT_BUCKETS: usize = 64;

/// A log-linear histogram of TSC cycles the guest keeps of its own calls, so
/// that its VMM can split it into phases (`sidecore run --latency-phases`)
/// without a sample ever leaving the guest. Buckets 0-3 are 16 cycles wide;
/// above that each power of two has four buckets (at most 25% wide); the last
/// bucket holds everything from 7 * 2^18 cycles (~0.7 ms) up.
#[repr(C, align(128))]
pub struct LatencyHist {
    /// Cumulative count per bucket ([`lat_bucket`]).
    pub buckets: [AtomicU64; LAT_BUCKETS],
}

const _: () = assert!(core::mem::size_of::<LatencyHist>() == 512);

/// The bucket of a round trip of `cycles`.
#[allow(clippy::cast_possible_truncation)] // every index cast is < LAT_BUCKETS
pub const fn lat_bucket(cycles: u64) -> usize {
    if cycles < 64 {
        return (cycles / 16) as usize;
    }
    let octave = 63 - cycles.leading_zeros() as u64; // >= 6
    let sub = (cycles >> (octave - 2)) & 3;
    let idx = 4 + (octave - 6) * 4 + sub;
    if idx >= LAT_BUCKETS as u64 {
        LAT_BUCKETS - 1
    } else {
        idx as usize
    }
}

/// The smallest cycle count past bucket `idx` (its exclusive upper bound;
/// `u64::MAX` for the last bucket).
pub const fn lat_bucket_end(idx: usize) -> u64 {
    if idx < 4 {
        return (idx as u64 + 1) * 16;
    }
    if idx >= LAT_BUCKETS - 1 {
        return u64::MAX;
    }
    let octave = 6 + (idx as u64 - 4) / 4;
    let sub = (idx as u64 - 4) % 4;
    (4 + sub + 1) << (octave - 2)
}

/// Magic of the region header ("SIDECORE").
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"SIDECORE");

/// Feature bit: the NULL, CPUID and registry services are served.
pub const FEATURE_CALLS: u64 = 1 << 0;
/// Feature bit: the page-table service is served.
pub const FEATURE_PTE: u64 = 1 << 1;

/// The region header, at the start of the shared region (one page).
#[repr(C, align(4096))]
pub struct RegionHeader {
    /// [`REGION_MAGIC`].
    pub magic: u64,
    /// [`crate::ABI_VERSION`].
    pub abi_version: u32,
    /// Number of vCPU blocks that follow.
    pub nr_vcpus: u32,
    /// Feature bits ([`FEATURE_CALLS`], …) the host serves.
    pub features: u64,
    /// Slots per ring ([`RING_SLOTS`]).
    pub ring_slots: u32,
    /// Bytes per slot (64).
    pub slot_size: u32,
    /// Offset of vCPU block 0 from the region start.
    pub vcpu_offset: u64,
    /// Bytes per vCPU block.
    pub vcpu_stride: u64,
    _pad: [u64; 10],
    /// Incremented by a running sidecore every so many sweeps for each ring
    /// it serves and does not hold paused; a guest that marked the sidecore
    /// absent probes it again when this moves, and a guest waiting for a
    /// claimed call stops waiting when it stands still for
    /// [`crate::boot::BootInfo::sidecore_liveness`].
    pub heartbeat: Line,
    /// 1 while the sidecore serving this region is parked: a guest that has
    /// just posted then rings the doorbell ([`crate::boot::PORT_DOORBELL`]).
    /// Best effort: a parked sidecore also wakes by itself within a nap.
    pub parked: Line,
}

const _: () = assert!(core::mem::size_of::<RegionHeader>() == 4096);
const _: () = assert!(core::mem::offset_of!(RegionHeader, heartbeat) == 128);
const _: () = assert!(core::mem::offset_of!(RegionHeader, parked) == 256);

/// Bytes of a shared region for `nr_vcpus` vCPUs.
pub const fn region_size(nr_vcpus: u32) -> u64 {
    VCPU_SHARED_OFFSET + (nr_vcpus as u64) * VCPU_SHARED_SIZE
}

/// Offset of vCPU `i`'s block in the region.
pub const fn vcpu_offset(i: u32) -> u64 {
    VCPU_SHARED_OFFSET + (i as u64) * VCPU_SHARED_SIZE
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn latency_buckets_bracket_their_values(c in 0u64..(1 << 24)) {
            let i = lat_bucket(c);
            prop_assert!(c < lat_bucket_end(i));
            if i > 0 {
                prop_assert!(c >= lat_bucket_end(i - 1));
            }
        }
    }

    #[test]
    fn latency_buckets_are_contiguous_and_at_most_a_quarter_wide() {
        assert_eq!(lat_bucket(0), 0);
        assert_eq!(lat_bucket(u64::MAX), LAT_BUCKETS - 1);
        for i in 1..LAT_BUCKETS - 1 {
            let (lo, hi) = (lat_bucket_end(i - 1), lat_bucket_end(i));
            assert_eq!(lat_bucket(lo), i);
            assert_eq!(lat_bucket(hi - 1), i);
            assert!(lo >= 64 || hi - lo == 16);
            assert!(lo < 64 || (hi - lo) * 4 <= lo, "bucket {i}: {lo}..{hi}");
        }
    }

    #[test]
    fn slot_protocol_happy_path() {
        let s = Slot { state: AtomicU64::new(0), head: AtomicU64::new(0), words: Default::default() };
        let req = Body { head: 1, words: [7, 0, 0, 0, 0, 0] };
        s.post(5, &req);
        let seen = s.state.load(Ordering::Acquire);
        assert_eq!(word_ticket(seen), 5);
        assert_eq!(SlotState::from_bits(seen), Some(SlotState::Posted));
        assert!(s.try_claim(seen));
        assert!(!s.try_cancel(5), "cancel must lose after the claim");
        assert_eq!(s.read_body(), req);
        assert!(s.poll_reply(5).is_none());
        s.publish_reply(5, &Body { head: 0, words: [7; WORDS] });
        assert_eq!(s.poll_reply(5).map(|b| b.words[0]), Some(7));
    }

    fn fresh() -> Slot {
        Slot { state: AtomicU64::new(0), head: AtomicU64::new(0), words: Default::default() }
    }

    #[test]
    fn try_post_never_writes_over_a_claim_and_takes_stale_posts() {
        let s = fresh();
        s.state.store(state_word(3, SlotState::Claimed), Ordering::Relaxed);
        s.head.store(42, Ordering::Relaxed);
        assert_eq!(s.try_post(3, &Body::default(), true), TryPost::Busy);
        assert_eq!(s.head.load(Ordering::Relaxed), 42, "nothing written");
        s.state.store(state_word(9, SlotState::Posted), Ordering::Relaxed);
        assert_eq!(s.try_post(3, &Body { head: 7, words: [1; WORDS] }, false), TryPost::Posted);
        assert_eq!(s.state.load(Ordering::Relaxed), state_word(3, SlotState::Posted));
        assert_eq!(s.head.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn try_post_knows_a_finished_ticket_and_a_foreign_lap() {
        let s = fresh();
        let t = 70; // slot 6
        for st in [SlotState::Done, SlotState::Skipped] {
            s.state.store(state_word(t, st), Ordering::Relaxed);
            assert_eq!(s.try_post(t, &Body::default(), false), TryPost::Passed);
            s.state.store(state_word(t + 64, st), Ordering::Relaxed);
            assert_eq!(s.try_post(t, &Body::default(), false), TryPost::Foreign);
            s.state.store(state_word(t - 64, st), Ordering::Relaxed);
            assert_eq!(s.try_post(t, &Body::default(), false), TryPost::Posted, "the previous lap: free");
        }
        // A finished word of another slot is garbage, the guest's.
        s.state.store(state_word(5, SlotState::Done), Ordering::Relaxed);
        assert_eq!(s.try_post(t, &Body::default(), false), TryPost::Posted);
        s.state.store(state_word(t + 64, SlotState::Done), Ordering::Relaxed);
        assert_eq!(s.try_post(t, &Body::default(), true), TryPost::Posted);
    }

    #[test]
    fn cancel_beats_late_claim() {
        let s = Slot { state: AtomicU64::new(0), head: AtomicU64::new(0), words: Default::default() };
        s.post(9, &Body::default());
        let seen = s.state.load(Ordering::Acquire);
        assert!(s.try_cancel(9));
        assert!(!s.try_claim(seen), "claim must lose after the cancel");
    }

    proptest! {
        #[test]
        fn state_word_roundtrip(t in 0u64..=TICKET_MASK, st in 0u64..5) {
            let state = SlotState::from_bits(st).unwrap();
            let w = state_word(t, state);
            prop_assert_eq!(word_ticket(w), t);
            prop_assert_eq!(SlotState::from_bits(w), Some(state));
        }

        #[test]
        fn tickets_wrap_and_keep_slots_in_order(start in (TICKET_MASK - 300)..=TICKET_MASK, n in 1usize..600) {
            let mut t = start;
            for _ in 0..n {
                let nt = next_ticket(t);
                prop_assert_eq!(slot_index(nt), (slot_index(t) + 1) % RING_SLOTS);
                prop_assert_eq!(ticket_distance(t, nt), 1);
                prop_assert_eq!(ticket_distance(nt, t), -1);
                t = nt;
            }
        }

        #[test]
        fn distance_detects_skip_and_repeat(e in 0u64..=TICKET_MASK, d in -100_000i64..100_000) {
            let t = (e as i64).wrapping_add(d) as u64 & TICKET_MASK;
            prop_assert_eq!(ticket_distance(e, t), d);
        }
    }
}
