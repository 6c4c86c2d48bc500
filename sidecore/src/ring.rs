//! The host side of a vCPU's ring: poll the expected slot, claim it, copy
//! the request out once, validate, dispatch, publish the reply.
//!
//! Nothing read from the ring is trusted. The host keeps the expected ticket
//! in its own memory and looks only at its slot. A request there with another
//! ticket gets a `BadSequence` reply and the ring then follows the guest's
//! lap; a CLAIMED word there (never the host's own at rest) is released; the
//! work per ring per sweep is bounded. The rules are in
//! [`shm_proto::sidecall`].

use std::any::Any;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use shm_proto::op::{self, Status};
use shm_proto::ring::{
    next_ticket, region_size, slot_index, ticket_distance, vcpu_offset, word_ticket, Body, RegionHeader, SlotState,
    VcpuShared,
};

use crate::service::{CallCtx, Services};
use crate::stats::VmStats;

/// Most requests one ring may have served in one sweep, so that a flooding
/// vCPU cannot starve the others. When several VMs share a sidecore it is
/// also the most one VM may have served in a sweep over all of its rings
/// there (rings that share a [`VmControl`] are one VM's), within a time
/// share too (`crate::poll::VM_QUANTUM`), so that a VM cannot starve its
/// neighbours however many vCPUs it has or whatever its requests cost.
pub const MAX_PER_SWEEP: usize = 16;

/// A VM's shared region as the host maps it.
pub struct SharedRegion {
    base: NonNull<u8>,
    len: usize,
    nr_vcpus: u32,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the region is plain shared memory accessed only through atomics
// (the shm-proto types); `owner` keeps the mapping alive and is Send + Sync.
unsafe impl Send for SharedRegion {}
// SAFETY: as above: all access is through atomics.
unsafe impl Sync for SharedRegion {}

/// The region is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// Too small for the vCPU count.
    #[error("shared region of {len} bytes is too small for {nr_vcpus} vCPUs ({need} bytes needed)")]
    TooSmall {
        /// Its length.
        len: usize,
        /// vCPUs asked for.
        nr_vcpus: u32,
        /// Bytes needed.
        need: u64,
    },
    /// Not page aligned.
    #[error("shared region at {0:#x} is not page aligned")]
    Misaligned(usize),
}

impl SharedRegion {
    /// Wraps a mapping of a VM's shared region.
    ///
    /// # Safety
    /// `base .. base + len` must stay mapped readable and writable for as long
    /// as `owner` lives, and be accessed by others only through the shm-proto
    /// atomics (guest writes are fine: every read of it is validated).
    pub unsafe fn new(
        base: NonNull<u8>,
        len: usize,
        nr_vcpus: u32,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<SharedRegion, RegionError> {
        let need = region_size(nr_vcpus);
        if u64::try_from(len).map_or(true, |l| l < need) {
            return Err(RegionError::TooSmall { len, nr_vcpus, need });
        }
        if !(base.as_ptr() as usize).is_multiple_of(4096) {
            return Err(RegionError::Misaligned(base.as_ptr() as usize));
        }
        Ok(SharedRegion { base, len, nr_vcpus, _owner: owner })
    }

    /// A region in host memory of its own, zeroed, for host-side rings
    /// (benchmarks, tests, synthetic producers).
    pub fn alloc(nr_vcpus: u32) -> Result<Arc<SharedRegion>, RegionError> {
        let need = region_size(nr_vcpus);
        let len = usize::try_from(need).map_err(|_| RegionError::TooSmall { len: 0, nr_vcpus, need })?;
        let owner = Arc::new(HeapBlock::new(len).ok_or(RegionError::TooSmall { len: 0, nr_vcpus, need })?);
        let base = owner.ptr;
        // SAFETY: the block is `len` bytes, page aligned, zeroed, and lives as
        // long as `owner`, which the region holds.
        unsafe { SharedRegion::new(base, len, nr_vcpus, owner) }.map(Arc::new)
    }

    /// The header.
    pub fn header(&self) -> &RegionHeader {
        // SAFETY: the region is at least one page (region_size) and page
        // aligned; RegionHeader is one page of atomics and plain integers,
        // valid for any bit pattern.
        unsafe { &*self.base.as_ptr().cast::<RegionHeader>() }
    }

    /// vCPU `i`'s block, if `i` is one of the region's vCPUs.
    pub fn vcpu(&self, i: u32) -> Option<&VcpuShared> {
        if i >= self.nr_vcpus {
            return None;
        }
        let off = usize::try_from(vcpu_offset(i)).ok()?;
        // SAFETY: i < nr_vcpus and the length was checked against
        // region_size(nr_vcpus) in new(), so the block is inside the mapping;
        // its offset is page aligned; VcpuShared is atomics and bytes, valid
        // for any bit pattern.
        Some(unsafe { &*self.base.as_ptr().add(off).cast::<VcpuShared>() })
    }

    /// Number of vCPU blocks.
    pub fn nr_vcpus(&self) -> u32 {
        self.nr_vcpus
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: new() refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A zeroed, page-aligned heap block that frees itself.
struct HeapBlock {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the block is plain memory owned by this struct; access goes through
// atomics in SharedRegion.
unsafe impl Send for HeapBlock {}
// SAFETY: as above.
unsafe impl Sync for HeapBlock {}

impl HeapBlock {
    fn new(len: usize) -> Option<HeapBlock> {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(HeapBlock { ptr, layout })
    }
}

impl Drop for HeapBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Host-side switches of one VM's rings, shared by all of them. It is also
/// what makes rings one VM's for the sweep's per-VM shares
/// ([`MAX_PER_SWEEP`]): a ring made with [`RingRef::new`] has one of its own.
#[derive(Debug, Default)]
pub struct VmControl {
    /// Who it is (the daemon's VM id; 0 for a VMM's own sidecore).
    pub id: u64,
    /// While set, the rings are not served (the guest's calls time out and
    /// take the exit path): the selftest's fallback phase under a daemon.
    pub paused: std::sync::atomic::AtomicBool,
    /// Once set, the sidecore drops the rings (and with them its mapping of
    /// the VM's memory) at its next command check.
    pub detached: std::sync::atomic::AtomicBool,
}

/// One vCPU's ring, as a sidecore serves it.
pub struct RingRef {
    control: Arc<VmControl>,
    region: Arc<SharedRegion>,
    shared: NonNull<VcpuShared>,
    ctx: CallCtx,
    services: Arc<Services>,
    stats: Arc<VmStats>,
    /// The ticket the host expects next (host memory: never read back from
    /// the guest).
    next: u64,
    /// Time each request (two TSC reads) into the service-time histogram.
    timed: bool,
    /// The VM's doorbell eventfd, which a parked sidecore waits on.
    doorbell: Option<Arc<std::os::fd::OwnedFd>>,
    /// What the guest was last told in `host.paused`.
    shown_paused: bool,
}

// SAFETY: `shared` points into `region`, which is Send + Sync and kept alive
// by the Arc; everything else is Send.
unsafe impl Send for RingRef {}

impl RingRef {
    /// The ring of vCPU `vcpu` in `region`, or `None` if the region has no
    /// such vCPU. It gets a [`VmControl`] of its own, so the sweep counts it
    /// as a VM of its own: a VM's rings share one ([`RingRef::with_control`]).
    pub fn new(region: Arc<SharedRegion>, vcpu: u32, services: Arc<Services>, stats: Arc<VmStats>) -> Option<RingRef> {
        RingRef::with_control(region, vcpu, services, stats, Arc::new(VmControl::default()))
    }

    /// As [`RingRef::new`], with the VM's host-side switches.
    pub fn with_control(
        region: Arc<SharedRegion>,
        vcpu: u32,
        services: Arc<Services>,
        stats: Arc<VmStats>,
        control: Arc<VmControl>,
    ) -> Option<RingRef> {
        let shared = NonNull::from(region.vcpu(vcpu)?);
        Some(RingRef {
            control,
            region,
            shared,
            ctx: CallCtx { vcpu },
            services,
            stats,
            next: 0,
            timed: false,
            doorbell: None,
            shown_paused: false,
        })
    }

    /// Times every request's service into the VM's stats (costs two TSC
    /// reads per request; the daemon's `status` reports the percentiles).
    pub fn set_timed(&mut self, on: bool) {
        self.timed = on;
    }

    /// The eventfd the guest's doorbell signals (KVM_IOEVENTFD).
    pub fn set_doorbell(&mut self, fd: Arc<std::os::fd::OwnedFd>) {
        self.doorbell = Some(fd);
    }

    /// The doorbell, if any.
    pub fn doorbell(&self) -> Option<&Arc<std::os::fd::OwnedFd>> {
        self.doorbell.as_ref()
    }

    /// The VM's switches.
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// The vCPU this ring belongs to.
    pub fn vcpu(&self) -> u32 {
        self.ctx.vcpu
    }

    /// The region.
    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    /// The stats this ring counts into.
    pub fn stats(&self) -> &Arc<VmStats> {
        &self.stats
    }

    /// The vCPU's guest floor line ([`crate::Sidecore::guest_pong`]).
    pub fn pong_line(&self) -> &shm_proto::ring::Line {
        &self.shared().pong
    }

    fn shared(&self) -> &VcpuShared {
        // SAFETY: points into `self.region`, which this struct keeps alive.
        unsafe { self.shared.as_ref() }
    }

    /// Serves what is posted, at most [`MAX_PER_SWEEP`] slots. Returns the
    /// number of slots handled (0 when the ring is idle: one load of the
    /// expected slot's state word).
    #[inline]
    pub fn serve(&mut self) -> usize {
        if self.paused() {
            return 0;
        }
        let mut handled = 0;
        while handled < MAX_PER_SWEEP {
            if !self.serve_slot() {
                break;
            }
            handled += 1;
        }
        handled
    }

    /// As [`RingRef::serve`], at most `max` slots (what is left of its VM's
    /// share of the sweep), and stops early once `quantum` TSC cycles have
    /// passed since `start`: its VM's time share of a sweep when several
    /// VMs share this sidecore. `now` is the sweep's clock: it
    /// is read after each request served here, so that an idle ring costs
    /// no clock read.
    #[inline(always)]
    pub fn serve_for(&mut self, max: usize, start: u64, quantum: u64, now: &mut u64) -> usize {
        if self.paused() {
            return 0;
        }
        let mut handled = 0;
        while handled < max {
            if !self.serve_slot() {
                break;
            }
            handled += 1;
            *now = crate::tsc::rdtsc();
            if now.wrapping_sub(start) >= quantum {
                break;
            }
        }
        handled
    }

    /// Whether its VM is paused, shown to the guest once it changes.
    #[inline(always)]
    fn paused(&mut self) -> bool {
        let paused = self.control.paused.load(Ordering::Relaxed);
        if paused != self.shown_paused {
            self.show_paused(paused);
        }
        paused
    }

    /// Handles the slot of the expected ticket if it holds work, paused or
    /// not. `false` if it is idle (nothing posted there). [`RingRef::serve`]
    /// is what a sidecore calls; this single step lets tests interleave the
    /// two sides slot by slot.
    pub fn serve_slot(&mut self) -> bool {
        // Re-borrow through the pointer so that `self` stays mutable.
        // SAFETY: as in shared().
        let shared = unsafe { self.shared.as_ref() };
        let slot = &shared.slots[slot_index(self.next)];
        let seen = slot.state.load(Ordering::Acquire);
        let ticket = word_ticket(seen);
        match SlotState::from_bits(seen) {
            Some(SlotState::Posted) => {
                if !slot.try_claim(seen) {
                    // The guest cancelled (or rewrote) it meanwhile; look again next time.
                    self.stats.lost_claims.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                let req = slot.read_body();
                if ticket != self.next {
                    // Refused. A later lap of this slot (the guest skipped
                    // ahead): follow the guest's lap, so that its next call
                    // lands where the host looks. An earlier lap or a ticket
                    // of another slot is garbage: keep expecting `next`.
                    self.stats.count(op::OP_CLASS_UNKNOWN, Status::BadSequence);
                    slot.publish_reply(ticket, &Body { head: op::encode_status(Status::BadSequence), words: [0; 6] });
                    if slot_index(ticket) == slot_index(self.next) && ticket_distance(self.next, ticket) > 0 {
                        self.next = ticket;
                        self.advance();
                    }
                    return true;
                }
                let t0 = if self.timed { crate::tsc::rdtsc() } else { 0 };
                let (status, words) = self.services.dispatch(&self.ctx, req.head, &req.words);
                if self.timed {
                    self.stats.record_service(crate::tsc::rdtsc().wrapping_sub(t0));
                }
                slot.publish_reply(ticket, &Body { head: op::encode_status(status), words });
                // Counted after the reply is out: off the caller's path.
                self.stats.count(op::op_class((req.head & 0xffff) as u16), status);
                self.advance();
                true
            }
            Some(SlotState::Cancelled) if ticket == self.next => {
                // Passed by compare-and-swap: the guest may be taking the
                // slot back for a new call with this ticket.
                let skipped = shm_proto::ring::state_word(ticket, SlotState::Skipped);
                if slot.state.compare_exchange(seen, skipped, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                    return false;
                }
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                self.advance();
                true
            }
            Some(SlotState::Done | SlotState::Skipped) if ticket == self.next => {
                // The host never leaves its own finished word at the ticket
                // it expects (it moves on as it writes one): the guest wrote
                // this, and a guest that meets its own ticket finished walks
                // on, so the host does too.
                self.stats.count(op::OP_CLASS_UNKNOWN, Status::BadSequence);
                self.advance();
                true
            }
            Some(SlotState::Claimed) => {
                // Not ours: the host finishes its claims before it looks
                // again. The guest wrote it; release it so that the guest may
                // post here (it never writes over a claim).
                let released = shm_proto::ring::state_word(ticket, SlotState::Cancelled);
                if slot.state.compare_exchange(seen, released, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    self.stats.count(op::OP_CLASS_UNKNOWN, Status::BadSequence);
                }
                false
            }
            _ => false,
        }
    }

    fn advance(&mut self) {
        self.next = next_ticket(self.next);
        self.shared().consumer.value.store(self.next, Ordering::Release);
    }

    /// Tells the guest whether this ring is served (`host.paused`).
    pub fn show_paused(&mut self, paused: bool) {
        self.shared().host.paused.store(u64::from(paused), Ordering::Release);
        self.shown_paused = paused;
    }

    /// The sidecore's periodic word to the guest: bumps the region's
    /// heartbeat unless the ring is paused, and publishes the expected ticket
    /// again (a guest may have scribbled on it). Touches the consumer line
    /// only when it differs.
    pub fn heartbeat(&self) {
        if self.control.paused.load(Ordering::Relaxed) {
            return;
        }
        self.region.header().heartbeat.value.fetch_add(1, Ordering::Relaxed);
        self.shared().host.beat.fetch_add(1, Ordering::Relaxed);
        let c = &self.shared().consumer.value;
        if c.load(Ordering::Relaxed) != self.next {
            c.store(self.next, Ordering::Release);
        }
    }

    /// The ticket this ring expects next.
    pub fn expected(&self) -> u64 {
        self.next
    }
}

impl Drop for RingRef {
    /// A ring nobody will serve again (its VM detached, its sidecore gone)
    /// says so to its guest.
    fn drop(&mut self) {
        self.show_paused(true);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;
    use crate::cpuid::{CpuidEntry, CpuidTable};
    use proptest::prelude::*;
    use shm_proto::op::{encode_head, Opcode, FLAGS_KNOWN};
    use shm_proto::ring::{next_ticket, state_word, Slot, SlotState, RING_SLOTS, TICKET_MASK};

    fn setup() -> (Arc<SharedRegion>, RingRef, Arc<VmStats>) {
        let region = SharedRegion::alloc(1).unwrap();
        let table =
            CpuidTable::new(vec![CpuidEntry { function: 0, eax: 5, ebx: 6, ecx: 7, edx: 8, ..Default::default() }]);
        let services = Arc::new(Services::new(vec![table]));
        let stats = Arc::new(VmStats::default());
        let ring = RingRef::new(region.clone(), 0, services, stats.clone()).unwrap();
        (region, ring, stats)
    }

    fn slot(region: &SharedRegion, t: u64) -> &Slot {
        &region.vcpu(0).unwrap().slots[slot_index(t)]
    }

    fn null(x: u64) -> Body {
        Body { head: encode_head(Opcode::Null as u16, 0), words: [x, 0, 0, 0, 0, 0] }
    }

    fn status_of(b: &Body) -> Status {
        op::decode_status(b.head).unwrap()
    }

    #[test]
    fn idle_ring_does_nothing() {
        let (_r, mut ring, stats) = setup();
        assert_eq!(ring.serve(), 0);
        assert_eq!(stats.snapshot().total(), 0);
    }

    #[test]
    fn a_reply_read_lets_the_next_lap_post_without_a_look_until_a_resync() {
        use shm_proto::sidecall::{GuestRing, Poll};
        let (r, mut ring, _stats) = setup();
        let vs = r.vcpu(0).unwrap();
        let mut g = GuestRing::resume(vs);
        for i in 0..RING_SLOTS as u64 {
            let t = g.post(vs, &null(i)).unwrap();
            assert!(ring.serve_slot());
            assert!(matches!(g.poll_mine(vs, t), Poll::Done(b) if b.words[0] == i));
        }
        // Only a guest's own stray write could put a word there now: the
        // post trusts its knowledge of the slot and does not look at it.
        let garbage = state_word(5, SlotState::Claimed);
        slot(&r, 0).state.store(garbage, Ordering::Relaxed);
        assert_eq!(g.post(vs, &null(64)), Some(64));
        assert!(ring.serve_slot());
        assert!(matches!(g.poll_mine(vs, 64), Poll::Done(b) if b.words[0] == 64));
        // A resync forgets what it knew: the post looks, and a claimed slot
        // is busy.
        slot(&r, 1).state.store(garbage, Ordering::Relaxed);
        g.resync(vs);
        assert_eq!(g.post(vs, &null(65)), None);
    }

    #[test]
    fn posted_call_is_answered_in_place() {
        let (r, mut ring, stats) = setup();
        slot(&r, 0).post(0, &null(99));
        assert_eq!(ring.serve(), 1);
        let reply = slot(&r, 0).poll_reply(0).unwrap();
        assert_eq!((status_of(&reply), reply.words[0]), (Status::Ok, 99));
        assert_eq!(ring.expected(), 1);
        assert_eq!(r.vcpu(0).unwrap().consumer.value.load(Ordering::Relaxed), 1);
        assert_eq!(stats.snapshot().get(op::op_class(1), Status::Ok), 1);
    }

    #[test]
    fn unknown_opcodes_and_reserved_bits_get_errors() {
        let (r, mut ring, stats) = setup();
        let reqs = [
            Body { head: encode_head(0, 0), words: [0; 6] },
            Body { head: encode_head(0x7777, 0), words: [0; 6] },
            Body { head: encode_head(1, !FLAGS_KNOWN), words: [0; 6] },
            Body { head: u64::MAX, words: [u64::MAX; 6] },
            Body { head: encode_head(Opcode::Cpuid as u16, 0), words: [u64::MAX, 0, 0, 0, 0, 0] },
        ];
        let want =
            [Status::UnknownOp, Status::UnknownOp, Status::ReservedBits, Status::ReservedBits, Status::BadArgument];
        for (t, (req, want)) in reqs.iter().zip(want).enumerate() {
            let t = t as u64;
            slot(&r, t).post(t, req);
            assert_eq!(ring.serve(), 1);
            assert_eq!(status_of(&slot(&r, t).poll_reply(t).unwrap()), want);
        }
        assert_eq!(stats.snapshot().rejected(), 5);
    }

    #[test]
    fn a_later_lap_is_refused_and_the_ring_follows_it() {
        let (r, mut ring, stats) = setup();
        // Ticket RING_SLOTS lands in slot 0 but is a lap ahead of 0.
        let t = RING_SLOTS as u64;
        slot(&r, t).post(t, &null(1));
        assert_eq!(ring.serve(), 1);
        assert_eq!(status_of(&slot(&r, t).poll_reply(t).unwrap()), Status::BadSequence);
        assert_eq!(stats.snapshot().get(op::OP_CLASS_UNKNOWN, Status::BadSequence), 1);
        // The host follows the guest's lap and says so.
        assert_eq!(ring.expected(), t + 1);
        assert_eq!(r.vcpu(0).unwrap().consumer.value.load(Ordering::Relaxed), t + 1);
        slot(&r, t + 1).post(t + 1, &null(2));
        assert_eq!(ring.serve(), 1);
        assert_eq!(slot(&r, t + 1).poll_reply(t + 1).unwrap().words[0], 2);
    }

    #[test]
    fn a_ticket_of_another_slot_is_refused_and_does_not_move_the_ring() {
        let (r, mut ring, _stats) = setup();
        slot(&r, 0).post(5, &null(1));
        assert_eq!(ring.serve(), 1);
        assert_eq!(status_of(&slot(&r, 0).poll_reply(5).unwrap()), Status::BadSequence);
        assert_eq!(ring.expected(), 0);
    }

    #[test]
    fn repeated_sequence_is_refused() {
        let (r, mut ring, _stats) = setup();
        slot(&r, 0).post(0, &null(1));
        ring.serve();
        // Re-post ticket 0 (an old lap) into slot 0 while the ring expects 1:
        // slot 0 is not the one polled, so nothing happens...
        slot(&r, 0).post(0, &null(1));
        assert_eq!(ring.serve(), 0);
        // ...and an old ticket in the polled slot is refused.
        let old = TICKET_MASK - RING_SLOTS as u64 + 2; // slot 1, far behind (wraps)
        assert_eq!(slot_index(old), 1);
        slot(&r, 1).post(old, &null(1));
        assert_eq!(ring.serve(), 1);
        assert_eq!(status_of(&slot(&r, 1).poll_reply(old).unwrap()), Status::BadSequence);
        assert_eq!(ring.expected(), 1);
    }

    #[test]
    fn cancelled_slot_is_skipped_once() {
        let (r, mut ring, stats) = setup();
        slot(&r, 0).post(0, &null(1));
        assert!(slot(&r, 0).try_cancel(0));
        slot(&r, 1).post(1, &null(7));
        assert_eq!(ring.serve(), 2);
        assert_eq!(slot(&r, 1).poll_reply(1).unwrap().words[0], 7);
        assert_eq!(stats.snapshot().cancelled, 1);
        assert_eq!(stats.snapshot().total(), 1, "the cancelled call was never applied");
    }

    #[test]
    fn cancel_after_claim_loses_and_the_reply_still_comes() {
        let (r, _ring, _stats) = setup();
        let s = slot(&r, 0);
        s.post(0, &null(5));
        let seen = s.state.load(Ordering::Acquire);
        assert!(s.try_claim(seen));
        assert!(!s.try_cancel(0));
        s.publish_reply(0, &Body { head: 0, words: [5, 0, 0, 0, 0, 0] });
        assert_eq!(s.poll_reply(0).unwrap().words[0], 5);
    }

    #[test]
    fn garbage_state_words_are_ignored() {
        let (r, mut ring, stats) = setup();
        // Finished words of an earlier lap (what the slot holds between laps),
        // undecodable states, other garbage: nothing to do.
        let prev = TICKET_MASK - RING_SLOTS as u64 + 1; // slot 0, one lap back
        for w in [
            state_word(prev, SlotState::Done),
            0xf,
            0xdead_beef_0000_000d,
            u64::MAX,
            state_word(prev, SlotState::Skipped),
        ] {
            slot(&r, 0).state.store(w, Ordering::Release);
            assert_eq!(ring.serve(), 0, "state word {w:#x}");
        }
        assert_eq!(stats.snapshot().total(), 0);
        assert_eq!(ring.expected(), 0);
    }

    #[test]
    fn a_finished_word_at_the_expected_ticket_is_passed() {
        // The host never leaves one there: a guest wrote it, and a guest that
        // meets its own ticket finished walks on, so the host does too.
        let (r, mut ring, _stats) = setup();
        for st in [SlotState::Done, SlotState::Skipped] {
            let t = ring.expected();
            slot(&r, t).state.store(state_word(t, st), Ordering::Release);
            assert_eq!(ring.serve(), 1);
            assert_eq!(ring.expected(), t + 1);
        }
    }

    #[test]
    fn a_claim_the_host_does_not_hold_is_released() {
        let (r, mut ring, stats) = setup();
        slot(&r, 0).state.store(state_word(7, SlotState::Claimed), Ordering::Release);
        assert_eq!(ring.serve(), 0);
        assert_eq!(slot(&r, 0).state.load(Ordering::Acquire), state_word(7, SlotState::Cancelled));
        assert_eq!(stats.snapshot().get(op::OP_CLASS_UNKNOWN, Status::BadSequence), 1);
        // The guest can post there again.
        assert_eq!(slot(&r, 0).try_post(0, &null(3), false), shm_proto::ring::TryPost::Posted);
        assert_eq!(ring.serve(), 1);
        assert_eq!(slot(&r, 0).poll_reply(0).unwrap().words[0], 3);
    }

    #[test]
    fn paused_rings_say_so_and_do_not_beat() {
        let (r, mut ring, _stats) = setup();
        let hb = || r.header().heartbeat.value.load(Ordering::Relaxed);
        ring.heartbeat();
        assert_eq!(hb(), 1);
        ring.control().paused.store(true, Ordering::Relaxed);
        slot(&r, 0).post(0, &null(1));
        assert_eq!(ring.serve(), 0);
        assert_eq!(r.vcpu(0).unwrap().host.paused.load(Ordering::Relaxed), 1);
        ring.heartbeat();
        assert_eq!(hb(), 1, "a paused ring does not beat");
        ring.control().paused.store(false, Ordering::Relaxed);
        assert_eq!(ring.serve(), 1);
        assert_eq!(r.vcpu(0).unwrap().host.paused.load(Ordering::Relaxed), 0);
        drop(ring);
        assert_eq!(r.vcpu(0).unwrap().host.paused.load(Ordering::Relaxed), 1, "a dropped ring is nobody's");
    }

    #[test]
    fn the_heartbeat_puts_back_a_scribbled_consumer() {
        let (r, ring, _stats) = setup();
        let c = &r.vcpu(0).unwrap().consumer.value;
        c.store(12345, Ordering::Relaxed);
        ring.heartbeat();
        assert_eq!(c.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_flood_is_bounded_per_sweep() {
        let (r, mut ring, _stats) = setup();
        for t in 0..RING_SLOTS as u64 {
            slot(&r, t).post(t, &null(t));
        }
        assert_eq!(ring.serve(), MAX_PER_SWEEP);
        let mut total = MAX_PER_SWEEP;
        while total < RING_SLOTS {
            total += ring.serve();
        }
        assert_eq!(ring.expected(), RING_SLOTS as u64);
    }

    #[test]
    fn body_rewritten_after_claim_is_read_once() {
        // The request is copied out once after the claim; whatever the guest
        // writes afterwards cannot change what is validated and executed.
        let (r, mut ring, _stats) = setup();
        let s = slot(&r, 0);
        s.post(0, &null(1));
        ring.serve();
        s.words[0].store(999, Ordering::Relaxed); // too late: reply already written
        let reply = s.poll_reply(0).unwrap();
        assert_eq!(reply.words[0], 999, "the guest may scribble on its own reply");
        assert_eq!(ring.expected(), 1);
    }

    #[test]
    fn torn_slots_from_a_racing_writer_never_panic() {
        let (r, mut ring, stats) = setup();
        let r2 = r.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut x = 0x1234_5678_9abc_def1u64;
            let vs = r2.vcpu(0).unwrap();
            while !stop2.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let s = &vs.slots[(x as usize) % RING_SLOTS];
                s.head.store(x, Ordering::Relaxed);
                s.words[(x % 6) as usize].store(x, Ordering::Relaxed);
                s.state.store(x.rotate_left(7) & (0xff_ffff_fff1 | 1), Ordering::Release);
            }
        });
        for _ in 0..200_000 {
            ring.serve();
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let snap = stats.snapshot();
        assert_eq!(
            snap.get(op::op_class(Opcode::Null as u16), Status::Ok) + snap.rejected() + snap.get(2, Status::Ok),
            snap.total()
        );
    }

    proptest! {
        #[test]
        fn wraparound_keeps_order(start in (TICKET_MASK - 200)..=TICKET_MASK, n in 1u64..300) {
            let (r, mut ring, _stats) = setup();
            ring.next = start;
            let mut t = start;
            for i in 0..n {
                slot(&r, t).post(t, &null(i));
                prop_assert_eq!(ring.serve(), 1);
                let reply = slot(&r, t).poll_reply(t).unwrap();
                prop_assert_eq!(reply.words[0], i);
                t = next_ticket(t);
            }
            prop_assert_eq!(ring.expected(), t);
        }

        #[test]
        fn any_slot_content_gets_a_reply_or_is_ignored(state in any::<u64>(), head in any::<u64>(), w in any::<[u64; 6]>()) {
            let (r, mut ring, stats) = setup();
            let s = slot(&r, 0);
            s.write_body(&Body { head, words: w });
            s.state.store(state, Ordering::Release);
            let n = ring.serve();
            prop_assert!(n <= 1);
            if n == 1 && SlotState::from_bits(state) == Some(SlotState::Posted) {
                let after = s.state.load(Ordering::Acquire);
                prop_assert_eq!(SlotState::from_bits(after), Some(SlotState::Done));
                prop_assert_eq!(stats.snapshot().total(), 1);
            }
        }
    }
}
