//! Calls into the VMM: by sidecall through the vCPU's ring, or by the exit
//! path of each service. A sidecall that gets no reply in time is cancelled
//! and falls back to the exit path — at most once, by compare-and-swap.

use core::sync::atomic::Ordering;

use shm_proto::boot::{CpuidInsn, HypercallInsn};
use shm_proto::op::{self, encode_head, Opcode, Status, WORDS};
use shm_proto::ring::Body;
use shm_proto::sidecall::{ticket_add, GuestRing, Poll, Withdraw};

use crate::arch;
use crate::cpustate;
use crate::Env;

/// How a call was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// By the sidecore.
    Sidecall,
    /// By the exit path (never tried the sidecore, or fell back).
    Exit,
}

/// A reply: status, result words, and which path answered.
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    /// The status the server gave (or [`Status::HostError`] for an
    /// undecodable one).
    pub status: Status,
    /// Result words.
    pub words: [u64; WORDS],
    /// Which path answered.
    pub via: Via,
}

/// The per-vCPU client.
pub struct Client<'a> {
    env: &'a Env,
    hypercall_insn: HypercallInsn,
    cpuid_insn: CpuidInsn,
    ring: GuestRing,
    /// The sidecore is used at all (boot-info `sidecalls`).
    enabled: bool,
    /// Marked absent after a fallback: use the exit path until the back-off
    /// passes or the heartbeat moves.
    absent: bool,
    absent_since: u64,
    heartbeat_at_absent: u64,
    /// A batch is in flight (see [`Client::replied`]).
    in_batch: bool,
}

impl<'a> Client<'a> {
    /// A client for this vCPU.
    pub fn new(env: &'a Env) -> Client<'a> {
        let boot = env.boot;
        // check() has validated both enums.
        let hypercall_insn = HypercallInsn::from_u32(boot.hypercall_insn).unwrap_or(HypercallInsn::PvmInt1b);
        let cpuid_insn = CpuidInsn::from_u32(boot.cpuid_insn).unwrap_or(CpuidInsn::PvmInt1a);
        Client {
            env,
            hypercall_insn,
            cpuid_insn,
            // Wherever the sidecore is (a previous workload may have used the ring).
            ring: GuestRing::resume(env.shared),
            enabled: boot.sidecalls != 0,
            absent: false,
            absent_since: 0,
            heartbeat_at_absent: 0,
            in_batch: false,
        }
    }

    /// The environment.
    pub fn env(&self) -> &'a Env {
        self.env
    }

    /// Whether a sidecore serves this VM at all.
    pub fn sidecalls_enabled(&self) -> bool {
        self.enabled
    }

    /// Makes a call: by sidecall when a sidecore is present, else (or on
    /// time-out) by the op's exit path.
    pub fn call(&mut self, opcode: u16, args: [u64; WORDS]) -> Reply {
        if self.sidecore_usable() {
            match self.sidecall(opcode, args) {
                // A server that cannot carry this out (a daemon that does not
                // own the VM fd) sends it to the exit path, as does a refused
                // sequence; neither was applied.
                Some(r) if matches!(r.status, Status::UseExitPath | Status::BadSequence) => {}
                Some(r) => return r,
                None => {}
            }
        }
        self.exit_call(opcode, args)
    }

    fn sidecore_usable(&mut self) -> bool {
        let host = &self.env.shared.host;
        // A sidecore the VMM knows is gone for good is not probed again.
        if !self.enabled || host.sidecore_lost.load(Ordering::Relaxed) != 0 {
            return false;
        }
        // A paused ring is not probed either: straight to the exit path.
        if host.paused.load(Ordering::Relaxed) != 0 {
            bump(&self.env.shared.guest.paused_exits);
            return false;
        }
        if !self.absent {
            return true;
        }
        let hb = self.env.shared.host.beat.load(Ordering::Relaxed);
        let waited = arch::rdtsc().wrapping_sub(self.absent_since);
        if hb != self.heartbeat_at_absent || waited > self.env.boot.sidecall_backoff {
            self.absent = false;
            bump(&self.env.shared.guest.probes);
        }
        !self.absent
    }

    fn mark_absent(&mut self) {
        self.absent = true;
        self.absent_since = arch::rdtsc();
        self.heartbeat_at_absent = self.env.shared.host.beat.load(Ordering::Relaxed);
    }

    /// One sidecall; `None` if it was not carried out by the sidecore: the
    /// ring was busy, or the call timed out and was withdrawn, or the
    /// sidecore stopped answering a NULL or CPUID call it had claimed (the
    /// caller then takes the exit path).
    pub fn sidecall(&mut self, opcode: u16, args: [u64; WORDS]) -> Option<Reply> {
        self.sidecall_while(opcode, args, || {})
    }

    /// As [`Client::sidecall`], running `idle` between polls while the
    /// reply is awaited (a hostile test reads memory while the sidecore
    /// works). Generic, so the no-op of `sidecall` costs nothing.
    pub fn sidecall_while(&mut self, opcode: u16, args: [u64; WORDS], mut idle: impl FnMut()) -> Option<Reply> {
        let vs = self.env.shared;
        let words = cpustate::request_words(self.env.vcpu, opcode, args);
        let Some(t) = self.ring.post(vs, &Body { head: encode_head(opcode, 0), words }) else {
            // Both slots busy: the sidecore holds a call it has not answered.
            bump(&vs.guest.fallbacks);
            self.mark_absent();
            return None;
        };
        vs.producer.value.store(self.ring.ticket(), Ordering::Relaxed);
        self.ring_doorbell_if_parked();
        let bound = self.env.boot.sidecall_timeout[op::op_class(opcode)];
        let start = arch::rdtsc();
        loop {
            if let Poll::Done(body) = self.ring.poll_mine(vs, t) {
                return Some(self.replied(&body));
            }
            if arch::rdtsc().wrapping_sub(start) > bound {
                break;
            }
            idle();
        }
        match self.ring.withdraw(vs, t) {
            Withdraw::Withdrawn => {
                bump(&vs.guest.fallbacks);
                self.mark_absent();
                None
            }
            Withdraw::Done(body) => Some(self.replied(&body)),
            // The sidecore claimed the call before the withdrawal: it will
            // answer, and the call must not be made again.
            Withdraw::Claimed => {
                bump(&vs.guest.late_replies);
                self.wait_claimed(t, opcode)
            }
            Withdraw::Gone => self.lost(opcode),
        }
    }

    /// A reply that came. A `BadSequence` one (the sidecore followed the
    /// lap of a ticket the guest should not have used) resynchronises, unless
    /// a batch is in flight (it does so once the batch is answered).
    fn replied(&mut self, body: &Body) -> Reply {
        bump(&self.env.shared.guest.sidecalls);
        let r = reply_of(body, Via::Sidecall);
        if r.status == Status::BadSequence && !self.in_batch {
            self.ring.resync(self.env.shared);
        }
        r
    }

    /// A claimed call nobody will answer: whether it was carried out is
    /// unknown. A NULL or CPUID call, which changes nothing, is `None` (the
    /// caller takes the exit path); any other gets [`Status::HostError`].
    fn lost(&mut self, opcode: u16) -> Option<Reply> {
        self.ring.resync(self.env.shared);
        self.mark_absent();
        if opcode == Opcode::Null as u16 || opcode == Opcode::Cpuid as u16 {
            None
        } else {
            Some(Reply { status: Status::HostError, words: [0; WORDS], via: Via::Sidecall })
        }
    }

    /// Waits for the reply to a call the sidecore claimed, until it comes,
    /// the VMM says the sidecore is gone for good (its daemon died), or the
    /// heartbeat stands still for the liveness bound (a stopped or hung
    /// sidecore); in the last two cases the call is [`Client::lost`].
    fn wait_claimed(&mut self, t: u64, opcode: u16) -> Option<Reply> {
        let vs = self.env.shared;
        let hb = &self.env.shared.host.beat;
        let (mut beat, mut since) = (hb.load(Ordering::Relaxed), arch::rdtsc());
        loop {
            match GuestRing::poll(vs, t) {
                Poll::Done(body) => return Some(self.replied(&body)),
                Poll::Claimed => {}
                // Posted again (only a guest write does that): if it can be
                // withdrawn it was never carried out.
                Poll::Pending if vs.slots[shm_proto::ring::slot_index(t)].try_cancel(t) => {
                    self.ring.resync(vs);
                    return None;
                }
                Poll::Pending | Poll::Gone => return self.lost(opcode),
            }
            if vs.host.sidecore_lost.load(Ordering::Acquire) != 0 {
                return self.lost(opcode);
            }
            let now = arch::rdtsc();
            let b = hb.load(Ordering::Relaxed);
            if b != beat {
                (beat, since) = (b, now);
            } else if now.wrapping_sub(since) > self.env.boot.sidecore_liveness {
                bump(&vs.guest.abandoned);
                return self.lost(opcode);
            }
            core::hint::spin_loop();
        }
    }

    /// Posts every request of `reqs` (at most a ring's worth) in consecutive
    /// slots, then waits for all of them once: the sidecore streams through
    /// them instead of paying a round trip each. Each request keeps the
    /// at-most-once rule, and the batch keeps its order: when one gets no
    /// reply in time, the rest are withdrawn from the end
    /// ([`GuestRing::withdraw_tail`]), the ones the sidecore holds are waited
    /// for, and the withdrawn ones run by exit path in order.
    pub fn call_batch(&mut self, reqs: &[(u16, [u64; WORDS])], out: &mut [Reply]) {
        let n = reqs.len().min(out.len()).min(shm_proto::ring::RING_SLOTS);
        let mut bodies = [Body::default(); shm_proto::ring::RING_SLOTS];
        for (b, (op, args)) in bodies.iter_mut().zip(&reqs[..n]) {
            *b = Body { head: encode_head(*op, 0), words: cpustate::request_words(self.env.vcpu, *op, *args) };
        }
        let vs = self.env.shared;
        let (first, posted) = if self.sidecore_usable() { self.ring.post_batch(vs, &bodies[..n]) } else { (0, 0) };
        if posted > 0 {
            vs.producer.value.store(self.ring.ticket(), Ordering::Relaxed);
            self.ring_doorbell_if_parked();
        }
        // Calls [i, held) are posted and the sidecore's until withdrawn.
        let mut held = posted;
        self.in_batch = true;
        let mut refused = false;
        let (mut start, mut base) = (arch::rdtsc(), 0usize);
        let mut i = 0;
        while i < held {
            let t = ticket_add(first, i);
            let (op, args) = reqs[i];
            // The bound covers the batch: each call may wait for the ones
            // before it.
            let bound = self.env.boot.sidecall_timeout[op::op_class(op)].saturating_mul(1 + (i - base) as u64 / 8);
            let mut reply = None;
            loop {
                if let Poll::Done(body) = self.ring.poll_mine(vs, t) {
                    reply = Some(self.replied(&body));
                    break;
                }
                if arch::rdtsc().wrapping_sub(start) > bound {
                    break;
                }
            }
            if reply.is_none() {
                // Its bound passed: withdraw the rest of the batch, last
                // first; what the sidecore already holds is waited for.
                held = self.ring.withdraw_tail(vs, first, i, held);
                if held == i {
                    bump(&vs.guest.fallbacks);
                    self.mark_absent();
                    break;
                }
                bump(&vs.guest.late_replies);
                reply = self.wait_claimed(t, op);
                (start, base) = (arch::rdtsc(), i + 1);
            }
            out[i] = match reply {
                Some(r) if matches!(r.status, Status::UseExitPath | Status::BadSequence) => {
                    refused |= r.status == Status::BadSequence;
                    self.exit_call(op, args)
                }
                Some(r) => r,
                None => self.exit_call(op, args),
            };
            i += 1;
        }
        self.in_batch = false;
        if refused {
            self.ring.resync(vs);
        }
        // What was never posted or was withdrawn, in order.
        for j in i..n {
            out[j] = self.exit_call(reqs[j].0, reqs[j].1);
        }
    }

    /// Wakes a parked sidecore: one load of a line the sidecore rarely
    /// writes, and only when it is set a PIO write that KVM turns into an
    /// eventfd signal without leaving the kernel. No fence: if the sidecore
    /// parks just as the guest posts, its own nap (at most 1 ms) serves the
    /// call, well within the sidecall bound.
    fn ring_doorbell_if_parked(&self) {
        if self.env.header.parked.value.load(Ordering::Relaxed) != 0 {
            arch::outl(shm_proto::boot::PORT_DOORBELL, 0);
        }
    }

    /// The op's exit path: CPUID by the backend's instruction (answered by
    /// KVM), a page-table update by a store into the pool (MMIO), everything
    /// else by the PIO mailbox (answered by the VMM).
    pub fn exit_call(&mut self, opcode: u16, args: [u64; WORDS]) -> Reply {
        if opcode == Opcode::PteUpdate as u16 {
            let (status, kind) = self.pte_trap(args[0], args[1], args[2]);
            return Reply { status, words: [kind as u64, 0, 0, 0, 0, 0], via: Via::Exit };
        }
        if opcode == Opcode::Cpuid as u16 {
            if let (Ok(leaf), Ok(sub)) = (u32::try_from(args[0]), u32::try_from(args[1])) {
                let r = arch::cpuid(self.cpuid_insn, leaf, sub);
                let mut words = [0u64; WORDS];
                for (w, v) in words.iter_mut().zip(r) {
                    *w = u64::from(v);
                }
                return Reply { status: Status::Ok, words, via: Via::Exit };
            }
        }
        self.pio_call(opcode, args)
    }

    /// A call through the PIO mailbox: the userspace VMM answers it with the
    /// same handler the sidecore uses.
    pub fn pio_call(&mut self, opcode: u16, args: [u64; WORDS]) -> Reply {
        let slot = &self.env.shared.exit_slot;
        let words = cpustate::request_words(self.env.vcpu, opcode, args);
        slot.post(0, &Body { head: encode_head(opcode, 0), words });
        arch::outl(self.env.boot.call_port, 0);
        match slot.poll_reply(0) {
            Some(body) => reply_of(&body, Via::Exit),
            None => Reply { status: Status::HostError, words: [0; WORDS], via: Via::Exit },
        }
    }

    /// The in-kernel hypercall (the null call's in-kernel path).
    pub fn kernel_hypercall(&self, nr: u64) -> i64 {
        arch::hypercall(self.hypercall_insn, nr, 0)
    }

    /// CPUID by the backend's instruction.
    pub fn kernel_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        arch::cpuid(self.cpuid_insn, leaf, subleaf)
    }

    /// The null call's userspace exit path: a bare PIO write.
    pub fn pio_null(&self) {
        arch::outl(self.env.boot.null_port, 0);
    }
}

/// Adds one to a counter only this vCPU writes: a plain load and store, not
/// a locked read-modify-write, on the sidecall's fast path.
fn bump(c: &core::sync::atomic::AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

fn reply_of(body: &Body, via: Via) -> Reply {
    let status = op::decode_status(body.head).unwrap_or(Status::HostError);
    Reply { status, words: body.words, via }
}
