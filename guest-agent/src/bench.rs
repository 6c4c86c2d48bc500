//! The `bench` and `pagefault` workloads: time each (op, path) with the TSC,
//! one sample per call, and hand the samples to the VMM a block at a time.

use core::sync::atomic::Ordering;

use shm_proto::bench::{arg, BenchBlock, BenchOp, BenchPath, BENCH_ARM_FLOOR, BENCH_BLOCK_READY, BENCH_BLOCK_SAMPLES};
use shm_proto::op::{self, Opcode, Status, WORDS};

use crate::arch;
use crate::client::{Client, Via};
use crate::idt::probe_read;
use crate::pagetable::{self, PageTables, PtPath, NX, P, RW};
use crate::ptcheck;
use crate::{gprintln, Env};

/// Default samples per (op, path).
const DEFAULT_ITERS: u64 = 100_000;
/// Default samples for the page-table ops (bounded by the pool anyway).
const DEFAULT_PT_ITERS: u64 = 10_000;
/// Default warm-up calls.
const DEFAULT_WARMUP: u64 = 2_000;
/// Exit status when the sidecore never answered.
const STATUS_NO_SIDECORE: u32 = 3;
/// Untimed round trips before each guest floor block.
const FLOOR_WARMUP: usize = 16;
/// Guest floor blocks that may go unanswered before the bench stops
/// measuring it.
const FLOOR_MISSES: u32 = 3;

/// What one timed call needs beyond the client.
struct PtState<'a> {
    tables: PageTables<'a>,
    base: u64,
    next: u64,
    frame: u64,
}

/// TSC read that waits for earlier instructions (start of a sample).
#[inline(always)]
fn t_start() -> u64 {
    arch::rdtsc()
}

/// TSC read after the timed work has completed (end of a sample).
#[inline(always)]
fn t_end() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtscp and lfence only read the TSC (and TSC_AUX into ECX).
    unsafe {
        core::arch::asm!("rdtscp", "lfence", out("eax") lo, out("edx") hi, out("ecx") _, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Runs the bench workload (or, for `pagefault`, only that op).
pub fn run(env: &Env, only_pagefault: bool) -> u32 {
    let a = env.boot.args;
    let pagefaults = (1 << BenchOp::Pagefault as u32)
        | (1 << BenchOp::PagefaultBatch8 as u32)
        | (1 << BenchOp::PagefaultBatch32 as u32);
    let mut ops = if only_pagefault {
        pagefaults
    } else if a[arg::OPS] == 0 {
        0b0111
    } else {
        a[arg::OPS]
    };
    // The batched variants come with the page-fault op.
    if ops & (1 << BenchOp::Pagefault as u32) != 0 {
        ops |= pagefaults;
    }
    let paths = if a[arg::PATHS] == 0 { 0b111 } else { a[arg::PATHS] };
    let warmup = if a[arg::WARMUP] == 0 { DEFAULT_WARMUP } else { a[arg::WARMUP] };
    let block = usize::try_from(a[arg::BLOCK]).unwrap_or(0);
    let block = if block == 0 { 1000 } else { block.min(BENCH_BLOCK_SAMPLES) };
    let gpa = shm_proto::layout::guest_bench_block(env.boot.free_gpa, env.boot.nr_vcpus, env.vcpu);
    if gpa + shm_proto::bench::BENCH_BLOCK_BYTES > env.boot.ram_size {
        gprintln!(env, "bench: no room for the sample block: give the VM more --mem");
        return 2;
    }
    // SAFETY: this vCPU's bench block lies in free RAM (checked above),
    // identity mapped writable, used by this vCPU alone; the VMM reads it
    // (and writes its `count` when arming the guest floor) only while this
    // vCPU is stopped in the PIO exit that announces a block or asks.
    let blk: &mut BenchBlock = unsafe { &mut *(gpa as *mut BenchBlock) };
    let mut c = Client::new(env);
    if c.sidecalls_enabled() && paths & (1 << BenchPath::Sidecall as u32) != 0 && !sidecore_answers(&mut c) {
        gprintln!(env, "bench: the sidecore does not answer");
        return STATUS_NO_SIDECORE;
    }
    let mut tables = PageTables::new(env);
    let frames = ptcheck::frames_base(env);
    // Measured beside every sidecall block until blocks go unanswered
    // (then the VMM's sidecore is not there to ping).
    let mut floor_misses = 0;
    for op in BenchOp::ALL {
        if ops & (1 << op as u32) == 0 {
            continue;
        }
        for path in BenchPath::ALL {
            if paths & (1 << path as u32) == 0 || !op.has_path(path) {
                continue;
            }
            if path == BenchPath::Sidecall && !c.sidecalls_enabled() {
                continue;
            }
            let pt_op = !matches!(op, BenchOp::Null | BenchOp::Cpuid);
            let mut iters = match a[arg::ITERS] {
                0 if pt_op => DEFAULT_PT_ITERS,
                0 => DEFAULT_ITERS,
                n => n,
            };
            let mut pt = None;
            if pt_op {
                // Each sample maps a fresh entry; one table page holds 512, and
                // one more page may be needed per 1 GiB (a new page directory).
                let left = tables.pages_left().saturating_sub(2);
                let cap = left.saturating_sub(left / 512 + 1) * 512;
                iters = iters.min(cap.saturating_sub(warmup.min(512)));
                let slot = 8 + op as u64 * 3 + path as u64;
                pt = Some(PtState {
                    tables: PageTables::new(env),
                    base: ptcheck::region(env, slot),
                    next: 0,
                    frame: frames,
                });
            }
            let mut st = pt;
            let warm = if pt_op { warmup.min(512) } else { warmup };
            let k_batch = usize::try_from(op.batch()).unwrap_or(1);
            for _ in 0..warm.div_ceil(op.batch()) {
                let _ = timed_batch(&mut c, op, path, st.as_mut(), &mut [0; 32]);
            }
            let block = block / k_batch * k_batch;
            let mut done = 0;
            while done < iters {
                let n = usize::try_from((iters - done).min(block as u64)).unwrap_or(block);
                let n = n.div_ceil(k_batch) * k_batch;
                let mut fallbacks = 0u32;
                let mut k = 0;
                while k < n {
                    let (got, via) = timed_batch(&mut c, op, path, st.as_mut(), &mut blk.samples[k..k + k_batch]);
                    if path == BenchPath::Sidecall && via != Via::Sidecall {
                        fallbacks += 1;
                    }
                    k += got.max(1);
                }
                blk.op = op as u32;
                blk.path = path as u32;
                blk.count = u32::try_from(n).unwrap_or(0);
                blk.fallbacks = fallbacks;
                arch::outl(env.boot.bench_port(), BENCH_BLOCK_READY);
                done += n as u64;
                if path == BenchPath::Sidecall && floor_misses < FLOOR_MISSES && !guest_floor_block(env, blk, op, n) {
                    floor_misses += 1;
                    if floor_misses == FLOOR_MISSES {
                        gprintln!(
                            env,
                            "bench: the guest floor went unanswered {FLOOR_MISSES} times; measuring no more of it"
                        );
                    }
                }
            }
        }
        let _ = &mut tables;
    }
    0
}

/// Measures `n` round trips of the guest<->sidecore floor beside `op`'s
/// sidecall block and hands them over as its [`BenchPath::GuestFloor`]
/// block: one cache line each way between guest mode and the sidecore, timed
/// as the calls are, with no ring protocol. The VMM arms the sidecore for
/// them first ([`BENCH_ARM_FLOOR`]); when it arms none, no block is sent.
/// `false` when a round trip went unanswered for a sidecall's bound (the
/// block is dropped: the vCPU may have run too late for the sidecore,
/// which waits 1 ms for a ping).
fn guest_floor_block(env: &Env, blk: &mut BenchBlock, op: BenchOp, n: usize) -> bool {
    let n = n.min(BENCH_BLOCK_SAMPLES);
    let rounds = n + FLOOR_WARMUP;
    blk.op = op as u32;
    blk.path = BenchPath::GuestFloor as u32;
    blk.count = u32::try_from(rounds).unwrap_or(0);
    arch::outl(env.boot.bench_port(), BENCH_ARM_FLOOR);
    // SAFETY: reading a field of our own block, which the VMM has just
    // written while this vCPU was stopped in the exit above.
    let armed = unsafe { core::ptr::read_volatile(&raw const blk.count) };
    if usize::try_from(armed).map_or(true, |a| a < rounds) {
        // Not armed this time (no sidecore of this VMM, or a shared CPU).
        return true;
    }
    let line = &env.shared.pong.value;
    let bound = env.boot.sidecall_timeout[op::op_class(Opcode::Null as u16)];
    // The sidecore cleared the line before it acknowledged the arming.
    let mut v = line.load(Ordering::Relaxed) & !1;
    for i in 0..rounds {
        let t0 = t_start();
        line.store(v + 1, Ordering::Release);
        let mut spins = 0u32;
        while line.load(Ordering::Acquire) != v + 2 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && arch::rdtsc().wrapping_sub(t0) > bound {
                return false;
            }
        }
        let dt = t_end().wrapping_sub(t0);
        if let Some(s) = i.checked_sub(FLOOR_WARMUP).and_then(|k| blk.samples.get_mut(k)) {
            *s = dt;
        }
        v += 2;
    }
    blk.count = u32::try_from(n).unwrap_or(0);
    blk.fallbacks = 0;
    arch::outl(env.boot.bench_port(), BENCH_BLOCK_READY);
    true
}

fn sidecore_answers(c: &mut Client) -> bool {
    (0..1000).any(|_| c.sidecall(Opcode::Null as u16, [0; WORDS]).is_some())
}

/// One timed call, or for the batched ops one batch of `op.batch()` page
/// maps (one batched sidecall) and touches, each page's sample being the
/// batch's time divided by its size. Returns the samples written.
fn timed_batch(
    c: &mut Client,
    op: BenchOp,
    path: BenchPath,
    pt: Option<&mut PtState>,
    out: &mut [u64],
) -> (usize, Via) {
    let k = usize::try_from(op.batch()).unwrap_or(1).min(out.len()).min(32);
    if k <= 1 {
        let (cycles, via) = timed(c, op, path, pt);
        if let Some(o) = out.first_mut() {
            *o = cycles;
        }
        return (1, via);
    }
    let Some(st) = pt else { return (0, Via::Exit) };
    let mut reqs = [(Opcode::PteUpdate as u16, [0u64; WORDS]); 32];
    let mut vas = [0u64; 32];
    for i in 0..k {
        let va = st.base + st.next * 4096;
        st.next += 1;
        let Ok((table, idx)) = st.tables.leaf_slot(c, PtPath::Sidecall, va) else { return (0, Via::Exit) };
        vas[i] = va;
        reqs[i].1 = [table, idx, st.frame | P | RW | NX, 0, 0, 0];
    }
    let mut replies = [crate::client::Reply { status: Status::Ok, words: [0; WORDS], via: Via::Sidecall }; 32];
    let t0 = t_start();
    c.call_batch(&reqs[..k], &mut replies[..k]);
    for (va, r) in vas[..k].iter().zip(&replies[..k]) {
        if r.status == Status::Ok {
            let _ = probe_read(*va);
        }
    }
    let per = t_end().wrapping_sub(t0) / k as u64;
    for o in out[..k].iter_mut() {
        *o = per;
    }
    let via = if replies[..k].iter().all(|r| r.via == Via::Sidecall) { Via::Sidecall } else { Via::Exit };
    (k, via)
}

/// One timed call: cycles, and which path answered.
#[inline(always)]
fn timed(c: &mut Client, op: BenchOp, path: BenchPath, pt: Option<&mut PtState>) -> (u64, Via) {
    if path == BenchPath::GuestFloor {
        // Not a path of any op (guest_floor_block measures it).
        return (0, Via::Exit);
    }
    match (op, pt) {
        (BenchOp::Null, _) => {
            let t0 = t_start();
            let via = match path {
                BenchPath::Kernel => {
                    let _ = c.kernel_hypercall(0x7fff_0000);
                    Via::Exit
                }
                BenchPath::User => {
                    c.pio_null();
                    Via::Exit
                }
                BenchPath::Sidecall | BenchPath::GuestFloor => c.call(Opcode::Null as u16, [0; WORDS]).via,
            };
            (t_end().wrapping_sub(t0), via)
        }
        (BenchOp::Cpuid, _) => {
            let t0 = t_start();
            let via = match path {
                BenchPath::Kernel => {
                    let _ = c.kernel_cpuid(0, 0);
                    Via::Exit
                }
                BenchPath::User => c.pio_call(Opcode::Cpuid as u16, [0; WORDS]).via,
                BenchPath::Sidecall | BenchPath::GuestFloor => c.call(Opcode::Cpuid as u16, [0; WORDS]).via,
            };
            (t_end().wrapping_sub(t0), via)
        }
        (BenchOp::Pte | BenchOp::Pagefault, Some(st)) => {
            let va = st.base + st.next * 4096;
            st.next += 1;
            let tpath = if path == BenchPath::Sidecall { PtPath::Sidecall } else { PtPath::Trap };
            // Reaching the leaf table (creating it every 512 pages) is not timed.
            let Ok((table, idx)) = st.tables.leaf_slot(c, tpath, va) else { return (0, Via::Exit) };
            let entry = st.frame | P | RW | NX;
            let t0 = t_start();
            let u = pagetable::update(c, tpath, table, idx, entry);
            if op == BenchOp::Pagefault && u.status == Status::Ok {
                let _ = probe_read(va);
            }
            (t_end().wrapping_sub(t0), u.via)
        }
        _ => (0, Via::Exit),
    }
}
