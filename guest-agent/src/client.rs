//! Calls into the VMM: by sidecall through the vCPU's ring, or by the exit
//! path of each service. A sidecall that gets no reply in time is cancelled
//! and falls back to the exit path — at most once, by compare-and-swap.

use core::sync::atomic::Ordering;

use shm_proto::boot::{CpuidInsn, HypercallInsn};
use shm_proto::op::{self, encode_head, Opcode, Status, WORDS};
use shm_proto::ring::{next_ticket, slot_index, Body};

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
    ticket: u64,
    /// The sidecore is used at all (boot-info `sidecalls`).
    enabled: bool,
    /// Marked absent after a fallback: use the exit path until the back-off
    /// passes or the heartbeat moves.
    absent: bool,
    absent_since: u64,
    heartbeat_at_absent: u64,
}

impl<'a> Client<'a> {
    /// A client for this vCPU.
    pub fn new(env: &'a Env) -> Client<'a> {
        let boot = env.boot;
        // check() has validated both enums.
        let hypercall_insn = HypercallInsn::from_u32(boot.hypercall_insn).unwrap_or(HypercallInsn::PvmInt1b);
        let cpuid_insn = CpuidInsn::from_u32(boot.cpuid_insn).unwrap_or(CpuidInsn::PvmInt1a);
        // Continue from wherever the ring is (a previous workload may have used it).
        let ticket = env.shared.producer.value.load(Ordering::Relaxed);
        Client {
            env,
            hypercall_insn,
            cpuid_insn,
            ticket,
            enabled: boot.sidecalls != 0,
            absent: false,
            absent_since: 0,
            heartbeat_at_absent: 0,
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
                // own the VM fd) sends it to the exit path; it was not applied.
                Some(r) if r.status == Status::UseExitPath => {}
                Some(r) => return r,
                None => {}
            }
        }
        self.exit_call(opcode, args)
    }

    fn sidecore_usable(&mut self) -> bool {
        // A sidecore the VMM knows is gone for good is not probed again.
        if !self.enabled || self.env.shared.host.sidecore_lost.load(Ordering::Relaxed) != 0 {
            return false;
        }
        if !self.absent {
            return true;
        }
        let hb = self.env.header.heartbeat.value.load(Ordering::Relaxed);
        let waited = arch::rdtsc().wrapping_sub(self.absent_since);
        if hb != self.heartbeat_at_absent || waited > self.env.boot.sidecall_backoff {
            self.absent = false;
            bump(&self.env.shared.guest.probes);
        }
        !self.absent
    }

    /// One sidecall; `None` if it timed out and was cancelled (the caller then
    /// takes the exit path).
    pub fn sidecall(&mut self, opcode: u16, args: [u64; WORDS]) -> Option<Reply> {
        let t = self.ticket;
        let slot = &self.env.shared.slots[slot_index(t)];
        let words = cpustate::request_words(self.env.vcpu, opcode, args);
        slot.post(t, &Body { head: encode_head(opcode, 0), words });
        self.ticket = next_ticket(t);
        self.env.shared.producer.value.store(self.ticket, Ordering::Relaxed);
        self.ring_doorbell_if_parked();
        let bound = self.env.boot.sidecall_timeout[op::op_class(opcode)];
        let start = arch::rdtsc();
        let g = &self.env.shared.guest;
        loop {
            if let Some(body) = slot.poll_reply(t) {
                bump(&g.sidecalls);
                return Some(reply_of(&body, Via::Sidecall));
            }
            if arch::rdtsc().wrapping_sub(start) > bound {
                break;
            }
        }
        if slot.try_cancel(t) {
            bump(&g.fallbacks);
            self.absent = true;
            self.absent_since = arch::rdtsc();
            self.heartbeat_at_absent = self.env.header.heartbeat.value.load(Ordering::Relaxed);
            return None;
        }
        // The sidecore claimed the call before the cancel: it will answer, and
        // the call must not be made again.
        bump(&g.late_replies);
        self.wait_claimed(slot, t, opcode)
    }

    /// Waits for the reply to a call the sidecore claimed, until it comes or
    /// the VMM says the sidecore is gone for good (its daemon died). Then
    /// nobody will answer and whether the call was carried out is unknown:
    /// a NULL or CPUID call, which changes nothing, is `None` (the caller
    /// takes the exit path); any other gets [`Status::HostError`].
    fn wait_claimed(&self, slot: &shm_proto::ring::Slot, t: u64, opcode: u16) -> Option<Reply> {
        let g = &self.env.shared.guest;
        loop {
            if let Some(body) = slot.poll_reply(t) {
                bump(&g.sidecalls);
                return Some(reply_of(&body, Via::Sidecall));
            }
            if self.env.shared.host.sidecore_lost.load(Ordering::Acquire) != 0 {
                return if opcode == Opcode::Null as u16 || opcode == Opcode::Cpuid as u16 {
                    None
                } else {
                    Some(Reply { status: Status::HostError, words: [0; WORDS], via: Via::Sidecall })
                };
            }
            core::hint::spin_loop();
        }
    }

    /// Posts every request of `reqs` (at most a ring's worth) in consecutive
    /// slots, then waits for all of them once: the sidecore streams through
    /// them instead of paying a round trip each. Each request keeps the
    /// at-most-once rule: one that gets no reply in time is cancelled and
    /// taken by the exit path; one whose cancel loses is waited for.
    pub fn call_batch(&mut self, reqs: &[(u16, [u64; WORDS])], out: &mut [Reply]) {
        let n = reqs.len().min(out.len()).min(shm_proto::ring::RING_SLOTS);
        if !self.sidecore_usable() {
            for (r, o) in reqs[..n].iter().zip(out.iter_mut()) {
                *o = self.exit_call(r.0, r.1);
            }
            return;
        }
        let first = self.ticket;
        let mut t = first;
        for (op, args) in &reqs[..n] {
            let words = cpustate::request_words(self.env.vcpu, *op, *args);
            self.env.shared.slots[slot_index(t)].post(t, &Body { head: encode_head(*op, 0), words });
            t = next_ticket(t);
        }
        self.ticket = t;
        self.env.shared.producer.value.store(t, Ordering::Relaxed);
        self.ring_doorbell_if_parked();
        let g = &self.env.shared.guest;
        let start = arch::rdtsc();
        let mut t = first;
        for (i, (op, args)) in reqs[..n].iter().enumerate() {
            // The bound covers the whole batch: each call may wait for the
            // ones before it.
            let bound = self.env.boot.sidecall_timeout[op::op_class(*op)].saturating_mul(1 + i as u64 / 8);
            let slot = &self.env.shared.slots[slot_index(t)];
            let mut reply = None;
            while reply.is_none() && arch::rdtsc().wrapping_sub(start) <= bound {
                reply = slot.poll_reply(t);
            }
            out[i] = match reply {
                Some(body) => {
                    bump(&g.sidecalls);
                    reply_of(&body, Via::Sidecall)
                }
                None if slot.try_cancel(t) => {
                    bump(&g.fallbacks);
                    self.absent = true;
                    self.absent_since = arch::rdtsc();
                    self.heartbeat_at_absent = self.env.header.heartbeat.value.load(Ordering::Relaxed);
                    self.exit_call(*op, *args)
                }
                None => {
                    bump(&g.late_replies);
                    match self.wait_claimed(slot, t, *op) {
                        Some(r) => r,
                        None => self.exit_call(*op, *args),
                    }
                }
            };
            if out[i].via == Via::Sidecall && out[i].status == Status::UseExitPath {
                out[i] = self.exit_call(*op, *args);
            }
            t = next_ticket(t);
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
