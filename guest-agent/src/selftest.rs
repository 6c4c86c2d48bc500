//! `selftest`: runs every path that exists and checks every answer.
//!
//! 1. The in-kernel hypercall returns the backend's unknown-hypercall code.
//! 2. CPUID through the backend's instruction carries the VMM's signature.
//! 3. PIO calls round-trip values through the userspace VMM.
//! 4. CPUID for pseudo-random leaves/subleaves: KVM's answer (instruction)
//!    equals the VMM's handler's answer (PIO mailbox); then the leaves KVM
//!    rewrites from CR4, XCR0 and XSS, by all paths, as the selftest changes
//!    them (`cpuidstate`).
//! 5. With a sidecore: a phase bracketed by markers in which the same leaves,
//!    null calls and registry hypercalls go by sidecall and must cause no
//!    exit; then a phase in which the VMM stops the sidecore while the guest
//!    keeps calling a counter hypercall: every call is answered, none twice.

use core::fmt::{self, Write as _};
use core::sync::atomic::{AtomicU64, Ordering};

use shm_proto::args;
use shm_proto::boot::{
    HypercallInsn, CONTROL_START_SIDECORE, CONTROL_STOP_SIDECORE, CPUID_SIGNATURE, CPUID_SIGNATURE_LEAF,
    MARKER_SIDECALL_BEGIN, MARKER_SIDECALL_END,
};
use shm_proto::op::{Opcode, Status, HC_COUNTER_ADD, HC_MIX, HC_MONOTONIC_NS, WORDS};
use shm_proto::ring::lat_bucket;

use crate::arch;
use crate::client::{Client, Reply, Via};
use crate::console::Console;
use crate::pagetable::{PageTables, PtPath, NX, P, RW};
use crate::ptcheck::{self, SCRATCH_PER_VCPU};
use crate::rng::Rng;
use crate::Env;

/// Default number of CPUID pairs.
const DEFAULT_CPUID_PAIRS: u64 = 10_000;
/// Calls per kind in the sidecall phase.
const CALLS_PER_KIND: u64 = 1_000;
/// Most calls in the fallback phase before it gives up waiting for the
/// sidecore to stop.
const FALLBACK_PHASE_LIMIT: u64 = 2_000_000;

struct Check<'a> {
    env: &'a Env,
    failures: u32,
}

impl Check<'_> {
    fn fail(&mut self, args: fmt::Arguments) {
        self.failures += 1;
        if self.failures <= 8 {
            let mut c = Console::new(self.env);
            let _ = writeln!(c, "selftest: FAIL on vCPU {}: {}", self.env.vcpu, args);
        }
    }

    fn expect_reply(&mut self, what: &str, r: &Reply, want: &[u64]) {
        if r.status != Status::Ok {
            self.fail(format_args!("{what}: status {:?} via {:?}", r.status, r.via));
        } else if r.words[..want.len()] != *want {
            self.fail(format_args!("{what}: got {:x?} via {:?}, want {want:x?}", &r.words[..want.len()], r.via));
        }
    }
}

/// A CPUID leaf and subleaf that exercise KVM's rules: basic, hypervisor and
/// extended leaves in and just past range, indexed leaves with any subleaf,
/// and anything at all.
fn pick_leaf(rng: &mut Rng, max_basic: u32, max_ext: u32) -> (u32, u32) {
    let r = rng.below(10);
    let span = |lo: u32, hi: u32, rng: &mut Rng| -> u32 {
        let n = u64::from(hi.wrapping_sub(lo)) + 3;
        lo.wrapping_add(u32::try_from(rng.below(n)).unwrap_or(0))
    };
    let leaf = match r {
        0..=2 => span(0, max_basic, rng),
        3 => span(0x4000_0000, 0x4000_0010, rng),
        4 | 5 => span(0x8000_0000, max_ext, rng),
        6 => rng.u32(),
        7 => [4u32, 7, 0xb, 0xd, 0xf, 0x10, 0x12, 0x14, 0x1f, 0x8000_001d][usize::try_from(rng.below(10)).unwrap_or(0)],
        8 => span(0xc000_0000, 0xc000_0004, rng),
        _ => span(0x4000_0100, 0x4000_0110, rng),
    };
    let sub = if rng.below(4) == 0 { rng.u32() } else { u32::try_from(rng.below(70)).unwrap_or(0) };
    (leaf, sub)
}

fn cpuid_args(leaf: u32, sub: u32) -> [u64; WORDS] {
    [u64::from(leaf), u64::from(sub), 0, 0, 0, 0]
}

/// What HC_MIX must return (the VMM computes the same).
fn mix(a: u64, b: u64, vcpu: u32) -> u64 {
    a.wrapping_mul(3).wrapping_add(b ^ u64::from(vcpu))
}

/// A barrier across all vCPUs in the shared sync page. `false` if the others
/// did not arrive within ~10 s.
fn barrier(env: &Env, round: u64) -> bool {
    // SAFETY: the first page of free RAM is the vCPUs' sync page (identity
    // mapped, guest-owned); only atomics touch it.
    let count = unsafe { &*(env.boot.free_gpa as *const AtomicU64) };
    count.fetch_add(1, Ordering::AcqRel);
    let target = round * u64::from(env.boot.nr_vcpus);
    let limit = env.boot.tsc_khz.saturating_mul(10_000);
    let t0 = arch::rdtsc();
    while count.load(Ordering::Acquire) < target {
        if arch::rdtsc().wrapping_sub(t0) > limit {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Runs the selftest; 0 when everything agreed.
pub fn run(env: &Env) -> u32 {
    let mut ck = Check { env, failures: 0 };
    let mut c = Client::new(env);
    let boot = env.boot;
    let v = env.vcpu;

    // 1. In-kernel hypercall with a number KVM does not know.
    let insn = HypercallInsn::from_u32(boot.hypercall_insn).unwrap_or(HypercallInsn::PvmInt1b);
    let got = c.kernel_hypercall(0x7fff_0000);
    if got != insn.unknown_result() {
        ck.fail(format_args!("in-kernel hypercall returned {got}, want {}", insn.unknown_result()));
    }

    // 2. The VMM's CPUID table answers the backend's instruction.
    let sig = c.kernel_cpuid(CPUID_SIGNATURE_LEAF, 0);
    if sig[1..] != CPUID_SIGNATURE {
        ck.fail(format_args!("CPUID 0x40000000 signature {:x?}: not the VMM's table", &sig[1..]));
    }

    // 3. PIO round trips through the userspace VMM.
    c.pio_null();
    let r = c.pio_call(HC_MIX, [0x1234_5678_9abc, 77, 0, 0, 0, 0]);
    ck.expect_reply("PIO hypercall mix", &r, &[mix(0x1234_5678_9abc, 77, v)]);
    let r = c.pio_call(Opcode::Null as u16, [0xfeed_f00d ^ u64::from(v), 0, 0, 0, 0, 0]);
    ck.expect_reply("PIO null", &r, &[0xfeed_f00d ^ u64::from(v)]);
    let t1 = c.pio_call(HC_MONOTONIC_NS, [0; WORDS]);
    let t2 = c.pio_call(HC_MONOTONIC_NS, [0; WORDS]);
    if t1.status != Status::Ok || t2.status != Status::Ok || t2.words[0] < t1.words[0] || t1.words[0] == 0 {
        ck.fail(format_args!("PIO monotonic time went {} -> {}", t1.words[0], t2.words[0]));
    }
    let r = c.pio_call(0x1ff, [0; WORDS]);
    if r.status != Status::UnknownOp {
        ck.fail(format_args!("unregistered hypercall 0x1ff gave {:?}, want UnknownOp", r.status));
    }

    // 4. CPUID: KVM's answer against the VMM handler's, pseudo-random leaves.
    let pairs = if boot.args[args::selftest::CPUID_PAIRS] == 0 {
        DEFAULT_CPUID_PAIRS
    } else {
        boot.args[args::selftest::CPUID_PAIRS]
    };
    let scratch = shm_proto::layout::guest_scratch(boot.free_gpa, boot.nr_vcpus, v);
    let pairs = pairs.min(SCRATCH_PER_VCPU / 16);
    if scratch + SCRATCH_PER_VCPU > boot.ram_size {
        ck.fail(format_args!("not enough free RAM for the selftest's scratch area: give the VM more --mem"));
        return finish(env, ck);
    }
    // SAFETY: [scratch, scratch + SCRATCH_PER_VCPU) is this vCPU's own part of
    // free RAM (checked inside RAM above), identity mapped and writable.
    let answers =
        unsafe { core::slice::from_raw_parts_mut(scratch as *mut [u32; 4], usize::try_from(pairs).unwrap_or(0)) };
    let max_basic = c.kernel_cpuid(0, 0)[0].min(0x100);
    let max_ext = c.kernel_cpuid(0x8000_0000, 0)[0].clamp(0x8000_0000, 0x8000_0100);
    let seed = 0x9e37_79b9_7f4a_7c15 ^ (u64::from(v) << 32);
    let mut rng = Rng(seed);
    for slot in answers.iter_mut() {
        let (leaf, sub) = pick_leaf(&mut rng, max_basic, max_ext);
        let k = c.kernel_cpuid(leaf, sub);
        *slot = k;
        let u = c.pio_call(Opcode::Cpuid as u16, cpuid_args(leaf, sub));
        let want = k.map(u64::from);
        ck.expect_reply(&format_name(leaf, sub, "PIO handler vs KVM"), &u, &want);
    }
    let r = c.pio_call(Opcode::Cpuid as u16, [1 << 32, 0, 0, 0, 0, 0]);
    if r.status != Status::BadArgument {
        ck.fail(format_args!("CPUID leaf 2^32 gave {:?}, want BadArgument", r.status));
    }

    // 4b. CPUID bits KVM derives from CR4, XCR0 and XSS: every path alike
    // after each change.
    crate::cpuidstate::run(env, &mut c, &mut |a| ck.fail(a));

    // 5. Page tables: the same sequence by trap and by sidecall (which falls
    // back to the trap without a sidecore) must leave the same tables and
    // refuse the same invalid updates.
    let trap = ptcheck::run(env, &mut c, PtPath::Trap, 0, &mut |a| ck.fail(a));
    let side = ptcheck::run(env, &mut c, PtPath::Sidecall, 1, &mut |a| ck.fail(a));
    if trap.leaves != side.leaves {
        ck.fail(format_args!("page tables differ between paths: trap {:x?} sidecall {:x?}", trap.leaves, side.leaves));
    }
    let polite = boot.args[args::selftest::POLITE] == 1;
    if trap.invalid != side.invalid && !polite {
        ck.fail(format_args!("invalid updates: trap said {:?}, sidecall said {:?}", trap.invalid, side.invalid));
    }
    let want = [
        Status::Denied,
        Status::Denied,
        Status::Denied,
        Status::Denied,
        Status::ReservedBits,
        Status::Denied,
        Status::Denied,
    ];
    if trap.invalid != want {
        ck.fail(format_args!("invalid updates gave {:?}, want {want:?}", trap.invalid));
    }
    {
        let mut con = Console::new(env);
        let _ = writeln!(
            con,
            "selftest: vCPU {v}: page tables: {n} maps, {n} changes, {n} unmaps by trap and by sidecall{}, same tables; {} invalid updates refused alike",
            if c.sidecalls_enabled() { "" } else { " (falling back to the trap: no sidecore)" },
            want.len(),
            n = ptcheck::PAGES,
        );
    }

    if c.sidecalls_enabled() {
        sidecall_phase(env, &mut c, &mut ck, answers, seed, max_basic, max_ext);
        fallback_phase(env, &mut c, &mut ck);
    }
    linger(env, &mut c, &mut ck);
    finish(env, ck)
}

fn format_name(leaf: u32, sub: u32, what: &str) -> Name {
    let mut n = Name { buf: [0; 64], len: 0 };
    let _ = write!(n, "CPUID {leaf:#x}.{sub:#x} {what}");
    n
}

/// A short formatted name on the stack.
struct Name {
    buf: [u8; 64],
    len: usize,
}

impl fmt::Write for Name {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

impl core::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

/// Everything by sidecall, bracketed by markers: the VMM counts the exits
/// in between and expects none.
fn sidecall_phase(
    env: &Env,
    c: &mut Client,
    ck: &mut Check,
    answers: &[[u32; 4]],
    seed: u64,
    max_basic: u32,
    max_ext: u32,
) {
    let v = env.vcpu;
    let marker = env.boot.marker_port;
    // Wait until the sidecore answers (it may still be starting), outside the
    // phase.
    for _ in 0..1000 {
        if c.sidecall(Opcode::Null as u16, [0; WORDS]).is_some() {
            break;
        }
    }
    arch::outl(marker, MARKER_SIDECALL_BEGIN);
    let mut bad = 0u64;
    let mut not_sidecall = 0u64;
    let mut first_bad: Option<(u32, u32, [u64; 4], [u32; 4])> = None;
    let mut rng = Rng(seed);
    for want in answers {
        let (leaf, sub) = pick_leaf(&mut rng, max_basic, max_ext);
        let r = c.call(Opcode::Cpuid as u16, cpuid_args(leaf, sub));
        if r.via != Via::Sidecall {
            not_sidecall += 1;
        }
        let got = [r.words[0], r.words[1], r.words[2], r.words[3]];
        if r.status != Status::Ok || got != want.map(u64::from) {
            bad += 1;
            first_bad.get_or_insert((leaf, sub, got, *want));
        }
    }
    let mut last_time = 0;
    for i in 0..CALLS_PER_KIND {
        let r = c.call(Opcode::Null as u16, [i ^ 0x5a5a, 0, 0, 0, 0, 0]);
        bad += u64::from(r.status != Status::Ok || r.words[0] != i ^ 0x5a5a);
        not_sidecall += u64::from(r.via != Via::Sidecall);
        let r = pure_call(env, c, HC_MIX, [i, i * 7, 0, 0, 0, 0]);
        bad += u64::from(r.status != Status::Ok || r.words[0] != mix(i, i * 7, v));
        not_sidecall += u64::from(r.via != Via::Sidecall);
        let r = pure_call(env, c, HC_MONOTONIC_NS, [0; WORDS]);
        bad += u64::from(r.status != Status::Ok || r.words[0] < last_time);
        last_time = r.words[0];
        not_sidecall += u64::from(r.via != Via::Sidecall);
    }
    // Page-table maps by sidecall, each page touched at once: the touch
    // takes the shadow fault any first touch takes, which is no exit of the
    // sidecall path.
    let mut pt = PageTables::new(env);
    let base = ptcheck::region(env, 2);
    let frames = ptcheck::frames_base(env) + 32 * 4096;
    for i in 0..16u64 {
        let r = pt.set(c, PtPath::Sidecall, base + i * 4096, (frames + i * 4096) | P | RW | NX);
        not_sidecall += u64::from(r.via != Via::Sidecall);
        if r.status != Status::Ok || crate::idt::probe_read(base + i * 4096).is_none() {
            bad += 1;
        }
    }
    arch::outl(marker, MARKER_SIDECALL_END);
    if let Some((leaf, sub, got, want)) = first_bad {
        ck.fail(format_args!("sidecall CPUID {leaf:#x}.{sub:#x} = {got:x?}, KVM said {want:x?}"));
    }
    if bad > 0 {
        ck.fail(format_args!("{bad} sidecall answers differ from the exit paths'"));
    }
    if not_sidecall > 0 {
        let mut con = Console::new(env);
        let _ =
            writeln!(con, "selftest: note: vCPU {v}: {not_sidecall} calls of the sidecall phase fell back to exits");
    }
}

/// The VMM stops the sidecore while the guest keeps calling a hypercall with
/// a side effect (a per-vCPU counter): every call must be answered exactly
/// once, first by sidecall, then by the exit path, then by sidecall again
/// once the sidecore is back.
fn fallback_phase(env: &Env, c: &mut Client, ck: &mut Check) {
    let g = &env.shared.guest;
    let control = env.boot.control_port;
    if !barrier(env, 1) {
        ck.fail(format_args!("other vCPUs did not reach the fallback phase"));
        return;
    }
    let base = c.pio_call(HC_COUNTER_ADD, [0; WORDS]);
    if base.status != Status::Ok {
        ck.fail(format_args!("counter read gave {:?}", base.status));
        return;
    }
    let mut sum = base.words[0];
    // A call the stopped sidecore did not answer either fell back after its
    // bound or went straight to the exit path because the ring said paused.
    let missed = || g.fallbacks.load(Ordering::Relaxed) + g.paused_exits.load(Ordering::Relaxed);
    let missed0 = missed();
    let pause = env.boot.tsc_khz.saturating_mul(env.boot.args[args::selftest::PAUSE_MS]);
    let paused_at = arch::rdtsc();
    if env.vcpu == 0 {
        arch::outl(control, CONTROL_STOP_SIDECORE);
    }
    let (mut by_side, mut by_exit) = (0u64, 0u64);
    let mut i = 0u64;
    while i < FALLBACK_PHASE_LIMIT {
        i += 1;
        let r = c.call(HC_COUNTER_ADD, [i, 0, 0, 0, 0, 0]);
        sum = sum.wrapping_add(i);
        if lost_in_flight(env, &r) {
            // Carried out or not, nobody can say: start counting afresh.
            sum = c.pio_call(HC_COUNTER_ADD, [0; WORDS]).words[0];
            continue;
        }
        if r.status != Status::Ok || r.words[0] != sum {
            ck.fail(format_args!(
                "counter call {i} returned {} ({:?} via {:?}), want {sum}",
                r.words[0], r.status, r.via
            ));
            return;
        }
        match r.via {
            Via::Sidecall => by_side += 1,
            Via::Exit => by_exit += 1,
        }
        if by_exit >= 50 && missed() > missed0 && arch::rdtsc().wrapping_sub(paused_at) >= pause {
            break;
        }
    }
    if missed() == missed0 {
        ck.fail(format_args!("the sidecore was stopped but no sidecall fell back ({i} calls)"));
    }
    if !barrier(env, 2) {
        ck.fail(format_args!("other vCPUs did not finish the fallback phase"));
        return;
    }
    if env.vcpu == 0 {
        arch::outl(control, CONTROL_START_SIDECORE);
    }
    // The sidecore is back: the guest must find it again (heartbeat or
    // back-off) within a few seconds, and the counter must still agree.
    let deadline = env.boot.tsc_khz.saturating_mul(5_000);
    let t0 = arch::rdtsc();
    let mut back = false;
    while arch::rdtsc().wrapping_sub(t0) < deadline && env.shared.host.sidecore_lost.load(Ordering::Relaxed) == 0 {
        i += 1;
        let r = c.call(HC_COUNTER_ADD, [i, 0, 0, 0, 0, 0]);
        sum = sum.wrapping_add(i);
        if lost_in_flight(env, &r) {
            sum = c.pio_call(HC_COUNTER_ADD, [0; WORDS]).words[0];
            continue;
        }
        if r.status != Status::Ok || r.words[0] != sum {
            ck.fail(format_args!("counter call {i} after restart returned {}, want {sum}", r.words[0]));
            return;
        }
        if r.via == Via::Sidecall {
            back = true;
            break;
        }
    }
    if !back && env.shared.host.sidecore_lost.load(Ordering::Relaxed) == 0 {
        ck.fail(format_args!("the restarted sidecore was not used again within 5 s"));
    }
    let end = c.pio_call(HC_COUNTER_ADD, [0; WORDS]);
    if end.words[0] != sum {
        ck.fail(format_args!(
            "counter is {} after {i} calls, want {sum}: a call was lost or applied twice",
            end.words[0]
        ));
    }
    let mut con = Console::new(env);
    let _ = writeln!(
        con,
        "selftest: vCPU {}: fallback phase: {i} counter calls, {by_side} by sidecall, {by_exit} by exit, {} cancelled or sent straight to the exit path, {} late replies, {} abandoned, none lost or doubled",
        env.vcpu,
        missed().wrapping_sub(missed0),
        g.late_replies.load(Ordering::Relaxed),
        g.abandoned.load(Ordering::Relaxed),
    );
}

/// A call the sidecore claimed and never answered because it was lost (the
/// daemon serving the VM died): the client cannot tell whether it was
/// carried out (`Client::wait_claimed`).
fn lost_in_flight(env: &Env, r: &Reply) -> bool {
    r.status == Status::HostError
        && r.via == Via::Sidecall
        && env.shared.host.sidecore_lost.load(Ordering::Relaxed) != 0
}

/// A call of a hypercall without side effects: one lost in flight is simply
/// made again by the exit path.
fn pure_call(env: &Env, c: &mut Client, op: u16, args: [u64; WORDS]) -> Reply {
    let r = c.call(op, args);
    if lost_in_flight(env, &r) {
        c.exit_call(op, args)
    } else {
        r
    }
}

/// `args[selftest::LINGER_MS]` ms of null calls (by sidecall when there is a sidecore), each
/// answer checked: keeps a VM busy long enough for tests to act on it
/// mid-run (kill its VMM, kill the daemon serving it). Each call's round
/// trip goes into the vCPU's shared latency histogram, which the VMM can
/// split into phases (`sidecore run --latency-phases`, `scripts/soak.sh`).
fn linger(env: &Env, c: &mut Client, ck: &mut Check) {
    let ms = env.boot.args[args::selftest::LINGER_MS];
    if ms == 0 {
        return;
    }
    let end = env.boot.tsc_khz.saturating_mul(ms);
    let t0 = arch::rdtsc();
    let (mut n, mut side) = (0u64, 0u64);
    let hist = &env.shared.latency.buckets;
    while arch::rdtsc().wrapping_sub(t0) < end {
        let t = arch::rdtsc();
        let r = c.call(Opcode::Null as u16, [n, 0, 0, 0, 0, 0]);
        let dt = arch::rdtsc().wrapping_sub(t);
        // Only the guest writes its histogram: a plain add, no lock prefix.
        let b = &hist[lat_bucket(dt)];
        b.store(b.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        if r.status != Status::Ok || r.words[0] != n {
            ck.fail(format_args!("linger call {n}: {:?} {:#x}", r.status, r.words[0]));
            return;
        }
        side += u64::from(r.via == Via::Sidecall);
        n += 1;
    }
    let mut con = Console::new(env);
    let _ = writeln!(con, "selftest: vCPU {}: linger: {n} null calls in {ms} ms, {side} by sidecall", env.vcpu);
}

fn finish(env: &Env, ck: Check) -> u32 {
    if ck.failures > 0 {
        let mut c = Console::new(env);
        let _ = writeln!(c, "selftest: vCPU {}: {} checks failed", env.vcpu, ck.failures);
        1
    } else {
        0
    }
}
