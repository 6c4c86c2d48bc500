//! `chaos`: a hostile guest. For `args[1]` ms (default 10 s) it writes
//! garbage into its own ring — random opcodes and flags, tickets that skip,
//! repeat and wrap, slots rewritten after posting, out-of-range arguments,
//! page-table updates aimed at the shared region, the boot pages, the pool
//! and past RAM, floods of posts without waiting — and checks that every
//! reply it gets is either a correct answer or an error status. It never
//! waits forever: every wait is bounded, and it resynchronises its ticket
//! from the sidecore's consumer counter.

// Random numbers are cut to field widths on purpose here.
#![allow(clippy::cast_possible_truncation)]

use core::fmt::Write as _;
use core::sync::atomic::Ordering;
use shm_proto::args;

use shm_proto::op::{self, encode_head, Opcode, Status, HC_MIX, WORDS};
use shm_proto::ring::{next_ticket, slot_index, Body, SlotState, RING_SLOTS, TICKET_MASK};

use crate::arch;
use crate::console::Console;
use crate::rng::Rng;
use crate::Env;

/// Counts of what happened.
#[derive(Default)]
struct Tally {
    posted: u64,
    replies: u64,
    errors: u64,
    correct: u64,
    wrong: u64,
    unanswered: u64,
}

/// Runs the chaos workload; 0 when every reply was right or an error.
pub fn run(env: &Env) -> u32 {
    let ms = if env.boot.args[args::chaos::MS] == 0 { 10_000 } else { env.boot.args[args::chaos::MS] };
    let end = env.boot.tsc_khz.saturating_mul(ms);
    let bound = env.boot.tsc_khz.saturating_mul(2); // 2 ms per wait
    let t0 = arch::rdtsc();
    let vs = env.shared;
    let mut rng = Rng(0x6a09_e667_f3bc_c909 ^ u64::from(env.vcpu));
    let mut t = vs.consumer.value.load(Ordering::Acquire);
    let mut tally = Tally::default();
    let b = env.boot;
    let targets = [b.shared_gpa, 0x1000, b.pt_pool_gpa, b.ram_size, b.ram_size + (1 << 30), !0xfff];
    while arch::rdtsc().wrapping_sub(t0) < end {
        let r = rng.next();
        let kind = r % 8;
        match kind {
            // A flood: a ring's worth of valid null calls, then collect.
            0 => {
                let n = 1 + (r >> 8) as usize % RING_SLOTS;
                let first = t;
                for i in 0..n {
                    vs.slots[slot_index(t)]
                        .post(t, &Body { head: encode_head(1, 0), words: [i as u64, 0, 0, 0, 0, 0] });
                    t = next_ticket(t);
                    tally.posted += 1;
                }
                let mut tk = first;
                for i in 0..n {
                    match wait(env, tk, bound) {
                        Some(rep) => check(&mut tally, rep, Some(i as u64)),
                        None => tally.unanswered += 1,
                    }
                    tk = next_ticket(tk);
                }
            }
            // Skipped, repeated or wrapped tickets in the expected slot.
            1 => {
                let bad = match (r >> 8) % 3 {
                    0 => t.wrapping_add(RING_SLOTS as u64) & TICKET_MASK,
                    1 => t.wrapping_sub(RING_SLOTS as u64) & TICKET_MASK,
                    _ => t ^ (1 << 59),
                };
                let slot = &vs.slots[slot_index(t)];
                slot.post(bad, &Body { head: encode_head(1, 0), words: [7; WORDS] });
                tally.posted += 1;
                let start = arch::rdtsc();
                let done = state_word_done(bad);
                while slot.state.load(Ordering::Acquire) != done && arch::rdtsc().wrapping_sub(start) < bound {}
                if slot.state.load(Ordering::Acquire) == done {
                    tally.replies += 1;
                    let st = op::decode_status(slot.head.load(Ordering::Relaxed));
                    if st == Ok(Status::BadSequence) {
                        tally.errors += 1;
                    } else {
                        tally.wrong += 1;
                    }
                } else {
                    tally.unanswered += 1;
                }
                // Leave the slot for the right ticket again.
                slot.state.store(0, Ordering::Release);
            }
            // Random opcodes, flags and arguments; torn rewrites after posting.
            _ => {
                let head = match kind {
                    2 => r,
                    3 => encode_head((r >> 8) as u16, 0),
                    4 => encode_head(Opcode::PteUpdate as u16, 0),
                    5 => encode_head(Opcode::Cpuid as u16, (r >> 40) as u16),
                    6 => encode_head(HC_MIX, 0),
                    _ => encode_head(Opcode::Null as u16, 0),
                };
                let mut words = [rng.next(), rng.next(), rng.next(), rng.next(), rng.next(), rng.next()];
                if kind == 4 {
                    words[0] = b.pt_pool_gpa + (rng.next() % 300) * 4096;
                    words[1] = rng.next() % 600;
                    words[2] =
                        targets[(rng.next() % targets.len() as u64) as usize] | (rng.next() & 0x8000_0000_0000_01e7);
                }
                let slot = &vs.slots[slot_index(t)];
                slot.post(t, &Body { head, words });
                tally.posted += 1;
                if kind == 7 {
                    // Rewrite the body while the sidecore may be reading it.
                    slot.head.store(rng.next(), Ordering::Relaxed);
                    slot.words[0].store(rng.next(), Ordering::Relaxed);
                }
                let want = (kind == 6).then(|| words[0].wrapping_mul(3).wrapping_add(words[1] ^ u64::from(env.vcpu)));
                match wait(env, t, bound) {
                    // The guest scribbled on this slot itself, possibly over
                    // the reply: any content is its own doing.
                    Some(_) if kind == 7 => {
                        tally.replies += 1;
                        tally.correct += 1;
                    }
                    Some(rep) => check(&mut tally, rep, want),
                    None => tally.unanswered += 1,
                }
                t = next_ticket(t);
            }
        }
        // Resynchronise with the sidecore (it never moves past a bad ticket).
        let c = vs.consumer.value.load(Ordering::Acquire);
        if c != t {
            let s = &vs.slots[slot_index(t)];
            if s.try_cancel(t) {
                tally.unanswered += 1;
            }
            t = vs.consumer.value.load(Ordering::Acquire);
        }
    }
    vs.producer.value.store(t, Ordering::Relaxed);
    let mut con = Console::new(env);
    let _ = writeln!(
        con,
        "chaos: vCPU {}: {} posted, {} replies ({} correct answers, {} error statuses, {} wrong), {} unanswered in {} ms",
        env.vcpu, tally.posted, tally.replies, tally.correct, tally.errors, tally.wrong, tally.unanswered, ms
    );
    u32::from(tally.wrong > 0)
}

fn state_word_done(t: u64) -> u64 {
    shm_proto::ring::state_word(t, SlotState::Done)
}

/// Waits (bounded) for ticket `t`'s reply; cancels it if none came.
fn wait(env: &Env, t: u64, bound: u64) -> Option<Body> {
    let slot = &env.shared.slots[slot_index(t)];
    let start = arch::rdtsc();
    while arch::rdtsc().wrapping_sub(start) < bound {
        if let Some(b) = slot.poll_reply(t) {
            return Some(b);
        }
    }
    if slot.try_cancel(t) {
        return None;
    }
    let start = arch::rdtsc();
    while arch::rdtsc().wrapping_sub(start) < bound.saturating_mul(50) {
        if let Some(b) = slot.poll_reply(t) {
            return Some(b);
        }
    }
    None
}

/// A reply must be an error status, or Ok with the right answer when the
/// answer is known (`want`).
fn check(tally: &mut Tally, rep: Body, want: Option<u64>) {
    tally.replies += 1;
    match op::decode_status(rep.head) {
        Ok(Status::Ok) => match want {
            Some(w) if rep.words[0] != w => tally.wrong += 1,
            _ => tally.correct += 1,
        },
        Ok(_) => tally.errors += 1,
        Err(_) => tally.wrong += 1,
    }
}
