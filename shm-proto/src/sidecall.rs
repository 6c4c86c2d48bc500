//! The guest's side of the slot protocol (ABI v2), without clocks or port
//! I/O, so that the host's tests can drive it step by step against the real
//! sidecore ring in any interleaving.
//!
//! # The rules both sides follow
//!
//! **Ownership.** The sidecore owns a slot only while it holds the slot's
//! claim: from its successful compare-and-swap `(t, POSTED) -> (t, CLAIMED)`
//! to its Release store of `(t, DONE)`. The only other write the sidecore
//! ever makes to a slot is a compare-and-swap, so the guest never loses a
//! write it made to a slot it owns. Every other state word (EMPTY, DONE,
//! CANCELLED, garbage) belongs to the guest.
//!
//! **Backpressure.** The guest posts only into a slot it owns: a CLAIMED slot
//! is busy and never written. A POSTED or CANCELLED word, which the sidecore
//! may claim or skip at any moment, is first taken by compare-and-swap (to
//! EMPTY while the body is written; if the swap fails the guest looks again).
//! On a busy slot the guest moves to the sidecore's position (below) and, if
//! that slot is busy too, takes the exit path without posting.
//!
//! **Resynchronisation, no lapping.** The sidecore publishes the ticket it
//! expects next in `consumer` (on every advance, and again with every
//! heartbeat, so a guest that scribbled on it gets the true value back within
//! a heartbeat). After any call that did not get its reply — withdrawn after
//! its bound, refused as [`crate::op::Status::BadSequence`], lost, or that
//! found its slot busy — the guest's next ticket is `consumer`. While the
//! sidecore is paused or slow that is the withdrawn ticket itself, posted
//! again in the same slot: the guest stays in step instead of lapping it.
//! The sidecore passes a CANCELLED ticket with a compare-and-swap to
//! SKIPPED, so a guest that meets its own ticket SKIPPED or DONE knows the
//! sidecore is past it and walks on to the next ticket (and to `consumer`
//! when the slot shows a later lap).
//!
//! **The sidecore follows the guest's lap.** The sidecore only ever looks at
//! the slot of the ticket it expects. A POSTED request there with another
//! ticket (the guest skipped ahead or lapped: only a guest that broke the
//! rules does that) is claimed and refused with `BadSequence`, and the
//! sidecore then expects the ticket after it: slot and lap agree again. A
//! CLAIMED word there is garbage (the sidecore finishes its own claims before
//! it looks again) and is released to CANCELLED by compare-and-swap.
//!
//! With these rules no sequence of guest writes and no pause stops a ring for
//! longer than one call's bound: the first call of a well-behaved guest
//! after them either lands where the sidecore looks or, once it is refused or
//! times out, is followed by one that does.
//!
//! **Order.** The sidecore serves a ring in ticket order, one slot at a time.
//! A batch ([`GuestRing::post_batch`]) that loses a call to its bound
//! withdraws the rest of the batch *from the end* ([`GuestRing::withdraw_tail`]):
//! the first withdrawal that fails marks a call the sidecore already holds,
//! and every call before it is the sidecore's too. The guest waits for those
//! and then runs the withdrawn ones by exit path, in order. A batch is
//! carried out in its order unless a call is refused with `BadSequence`,
//! which only a guest that broke the rules sees.

use core::sync::atomic::Ordering;

use crate::ring::{next_ticket, slot_index, state_word, Body, SlotState, TryPost, VcpuShared, RING_SLOTS, TICKET_MASK};

/// A call's slot, as the guest sees it while it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// The reply, read once after the Acquire load of DONE.
    Done(Body),
    /// Posted, not yet claimed.
    Pending,
    /// The sidecore holds the call and will answer it.
    Claimed,
    /// The slot no longer holds the call (someone overwrote it): whether it
    /// was carried out is unknown.
    Gone,
}

/// The outcome of withdrawing a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Withdraw {
    /// Withdrawn before anyone claimed it: it will never be carried out by
    /// the sidecore, and the guest owns the call (exit path).
    Withdrawn,
    /// The sidecore claimed it first: its reply will come.
    Claimed,
    /// The reply came meanwhile.
    Done(Body),
    /// The slot no longer holds the call.
    Gone,
}

/// Where the guest is in its vCPU's ring: the ticket of its next call. Lives
/// in the guest's own memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRing {
    ticket: u64,
    /// `ticket` came from `consumer`: the sidecore expects it, whatever its
    /// slot says.
    from_consumer: bool,
    /// Bit `i`: slot `i` holds the reply to the guest's last call there,
    /// which the guest has read ([`GuestRing::poll_mine`]), and the guest
    /// has written nothing there and moved its ticket only one call at a
    /// time since. Such a slot is the guest's (the sidecore writes only
    /// slots it claimed, and claims only what the guest posts), and the next
    /// ticket of that slot is the one after that reply's lap: the post
    /// needs no look at it first, which saves a cache-line transfer.
    read_done: u64,
}

impl GuestRing {
    /// Starts at the sidecore's position.
    pub fn resume(vs: &VcpuShared) -> GuestRing {
        GuestRing { ticket: consumer(vs), from_consumer: true, read_done: 0 }
    }

    /// The ticket the next call will try first.
    pub fn ticket(&self) -> u64 {
        self.ticket
    }

    /// Moves to the sidecore's position: after any call that did not get its
    /// reply.
    pub fn resync(&mut self, vs: &VcpuShared) {
        self.ticket = consumer(vs);
        self.from_consumer = true;
        self.read_done = 0;
    }

    /// Posts `body` as the next call: at the guest's own ticket, walking
    /// past tickets the sidecore finished, else at the sidecore's position.
    /// `None`: the slot is busy; nothing was posted (take the exit path).
    pub fn post(&mut self, vs: &VcpuShared, body: &Body) -> Option<u64> {
        let t = self.ticket;
        let bit = 1u64 << slot_index(t);
        if self.read_done & bit != 0 && !self.from_consumer {
            // The guest's own slot, one lap on (see `read_done`): what
            // try_post would find there is the finished word of `t - 64`.
            self.read_done &= !bit;
            vs.slots[slot_index(t)].post(t, body);
            self.ticket = next_ticket(t);
            return Some(t);
        }
        if let Some(t) = self.post_from(vs, self.ticket, self.from_consumer, body) {
            return Some(t);
        }
        if !self.from_consumer {
            let c = consumer(vs);
            if let Some(t) = self.post_from(vs, c, true, body) {
                return Some(t);
            }
        }
        self.resync(vs);
        None
    }

    /// Posts at `t`, or after it past the tickets the sidecore finished, or
    /// where the sidecore says it is when the slot shows another lap. A
    /// ticket `trusted` to be the sidecore's position (read from `consumer`)
    /// is posted whatever finished word its slot holds.
    fn post_from(&mut self, vs: &VcpuShared, mut t: u64, mut trusted: bool, body: &Body) -> Option<u64> {
        if t != self.ticket {
            self.read_done = 0;
        }
        for _ in 0..=RING_SLOTS {
            let slot = slot_index(t);
            match vs.slots[slot].try_post(t, body, trusted) {
                TryPost::Posted => {
                    if t != self.ticket {
                        // Walked: the slots' laps are no longer one apart.
                        self.read_done = 0;
                    }
                    self.read_done &= !(1u64 << slot);
                    self.ticket = next_ticket(t);
                    self.from_consumer = false;
                    return Some(t);
                }
                TryPost::Passed => t = next_ticket(t),
                TryPost::Foreign => {
                    t = consumer(vs);
                    trusted = true;
                }
                TryPost::Busy => return None,
            }
        }
        None
    }

    /// Posts `bodies` (at most a ring's worth) as consecutive calls; the first
    /// as [`GuestRing::post`] does, each next one only into its own slot.
    /// Returns the first ticket and how many were posted (a prefix).
    pub fn post_batch(&mut self, vs: &VcpuShared, bodies: &[Body]) -> (u64, usize) {
        let Some((first, rest)) = bodies.split_first() else { return (self.ticket, 0) };
        let Some(t0) = self.post(vs, first) else { return (self.ticket, 0) };
        let mut n = 1;
        for b in rest.iter().take(RING_SLOTS - 1) {
            let t = self.ticket;
            if vs.slots[slot_index(t)].try_post(t, b, false) != TryPost::Posted {
                break;
            }
            self.read_done &= !(1u64 << slot_index(t));
            self.ticket = next_ticket(t);
            n += 1;
        }
        (t0, n)
    }

    /// What ticket `t`'s slot says now.
    pub fn poll(vs: &VcpuShared, t: u64) -> Poll {
        let slot = &vs.slots[slot_index(t)];
        let w = slot.state.load(Ordering::Acquire);
        if w == state_word(t, SlotState::Done) {
            Poll::Done(slot.read_body())
        } else if w == state_word(t, SlotState::Posted) {
            Poll::Pending
        } else if w == state_word(t, SlotState::Claimed) {
            Poll::Claimed
        } else {
            Poll::Gone
        }
    }

    /// As [`GuestRing::poll`] for the guest's own call `t`: a reply read
    /// here lets the next post into that slot skip its look
    /// ([`GuestRing::post`]).
    pub fn poll_mine(&mut self, vs: &VcpuShared, t: u64) -> Poll {
        let p = GuestRing::poll(vs, t);
        if matches!(p, Poll::Done(_)) {
            self.read_done |= 1u64 << slot_index(t);
        }
        p
    }

    /// Withdraws ticket `t` (its bound passed). On [`Withdraw::Withdrawn`]
    /// the guest moves to the sidecore's position: `t` itself while the
    /// sidecore is not moving.
    pub fn withdraw(&mut self, vs: &VcpuShared, t: u64) -> Withdraw {
        if vs.slots[slot_index(t)].try_cancel(t) {
            self.resync(vs);
            return Withdraw::Withdrawn;
        }
        match GuestRing::poll(vs, t) {
            Poll::Done(b) => Withdraw::Done(b),
            Poll::Claimed => Withdraw::Claimed,
            Poll::Pending | Poll::Gone => Withdraw::Gone,
        }
    }

    /// Withdraws the calls `first + from .. first + n` of a batch, last
    /// first, stopping at the first one the sidecore holds. Returns `k`: the
    /// calls `first + from .. first + k` are the sidecore's (wait for them),
    /// the calls from `first + k` on are withdrawn (run them by exit path, in
    /// order). If any was withdrawn the guest moves to the sidecore's
    /// position.
    pub fn withdraw_tail(&mut self, vs: &VcpuShared, first: u64, from: usize, n: usize) -> usize {
        let mut k = n;
        while k > from {
            let t = ticket_add(first, k - 1);
            if !vs.slots[slot_index(t)].try_cancel(t) {
                break;
            }
            k -= 1;
        }
        if k < n {
            self.resync(vs);
        }
        k
    }
}

/// `t + i` in ticket space.
pub fn ticket_add(t: u64, i: usize) -> u64 {
    t.wrapping_add(i as u64) & TICKET_MASK
}

/// The sidecore's position, as it last published it.
fn consumer(vs: &VcpuShared) -> u64 {
    vs.consumer.value.load(Ordering::Acquire) & TICKET_MASK
}
