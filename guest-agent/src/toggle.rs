//! `toggle`: a guest that hammers the control port. vCPU 0 writes stop and
//! start in a pseudo-random order (`args[toggle::WRITES]` times, default
//! 100,000), calling a counter hypercall now and then, ends with a start,
//! and then checks that the sidecore is back: 1,000 calls are answered by
//! sidecall within 5 s and the counter agrees (no call lost, none run
//! twice). Then, with `args[toggle::FLOOD_LINES]`, it floods the console
//! with lines of terminal escape sequences, which the VMM must escape and
//! rate-limit.

use core::sync::atomic::Ordering;

use shm_proto::args::toggle;
use shm_proto::boot::{CONTROL_START_SIDECORE, CONTROL_STOP_SIDECORE};
use shm_proto::op::{Status, HC_COUNTER_ADD, WORDS};

use crate::arch;
use crate::client::{Client, Reply, Via};
use crate::rng::Rng;
use crate::{gprintln, Env};

/// Calls that must be answered by sidecall within 5 s of the final start.
const CHECK_CALLS: u64 = 1_000;

/// Carried out or not, nobody can say (the sidecore went away with it).
fn lost_in_flight(env: &Env, r: &Reply) -> bool {
    r.status == Status::HostError
        && r.via == Via::Sidecall
        && env.shared.host.sidecore_lost.load(Ordering::Relaxed) != 0
}

/// The counter, read by the exit path.
fn counter(c: &mut Client) -> Option<u64> {
    let r = c.pio_call(HC_COUNTER_ADD, [0; WORDS]);
    (r.status == Status::Ok).then_some(r.words[0])
}

/// One counter call adding `i` to `sum`, by the ring (`ring`) or the exit
/// path; `None` if the answer is wrong.
fn add(env: &Env, c: &mut Client, ring: bool, i: u64, sum: &mut u64) -> Option<Via> {
    let args = [i, 0, 0, 0, 0, 0];
    let r = if ring { c.call(HC_COUNTER_ADD, args) } else { c.pio_call(HC_COUNTER_ADD, args) };
    *sum = sum.wrapping_add(i);
    if lost_in_flight(env, &r) {
        *sum = counter(c)?;
        return Some(Via::Exit);
    }
    if r.status != Status::Ok || r.words[0] != *sum {
        gprintln!(
            env,
            "toggle: FAIL: counter call {i} returned {} ({:?} via {:?}), want {sum}",
            r.words[0],
            r.status,
            r.via
        );
        return None;
    }
    Some(r.via)
}

/// Runs the workload; 0 if the sidecore came back and every call agreed.
pub fn run(env: &Env) -> u32 {
    if env.vcpu != 0 {
        return 0;
    }
    let writes = match env.boot.args[toggle::WRITES] {
        0 => 100_000,
        n => n,
    };
    let control = env.boot.control_port;
    // Ring calls while the sidecore comes and goes time out by the dozen:
    // ABI v2 must keep the ring from wedging (under v1 it could be lapped).
    let ring_during = env.boot.args[toggle::EXIT_DURING] != 1;
    let mut c = Client::new(env);
    let Some(mut sum) = counter(&mut c) else {
        gprintln!(env, "toggle: FAIL: the counter hypercall does not answer by the exit path");
        return 1;
    };
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ env.boot.tsc_khz);
    let (mut stops, mut calls) = (0u64, 0u64);
    for k in 0..writes {
        if rng.below(2) == 0 {
            arch::outl(control, CONTROL_STOP_SIDECORE);
            stops += 1;
        } else {
            arch::outl(control, CONTROL_START_SIDECORE);
        }
        if k % 256 == 0 {
            calls += 1;
            if add(env, &mut c, ring_during, calls, &mut sum).is_none() {
                return 1;
            }
        }
    }
    arch::outl(control, CONTROL_START_SIDECORE);
    // Give the restart a moment without posting (see `ring_during`).
    let t = arch::rdtsc();
    while arch::rdtsc().wrapping_sub(t) < env.boot.tsc_khz.saturating_mul(20) {}
    // Back within a few seconds (its threads restart, the guest finds it by
    // heartbeat or back-off): CHECK_CALLS answers by sidecall. Not just the
    // first: that one may come from a sidecore a late stop then takes away.
    let t0 = arch::rdtsc();
    let deadline = env.boot.tsc_khz.saturating_mul(5_000);
    let (mut by_side, mut by_exit) = (0u64, 0u64);
    while by_side < CHECK_CALLS && arch::rdtsc().wrapping_sub(t0) < deadline {
        calls += 1;
        match add(env, &mut c, true, calls, &mut sum) {
            None => return 1,
            Some(Via::Sidecall) => by_side += 1,
            Some(Via::Exit) => by_exit += 1,
        }
    }
    let back_ms = arch::rdtsc().wrapping_sub(t0) / env.boot.tsc_khz.max(1);
    if by_side < CHECK_CALLS || env.shared.host.sidecore_lost.load(Ordering::Relaxed) != 0 {
        gprintln!(
            env,
            "toggle: FAIL: {writes} writes ({stops} stops): after the final start only {by_side} calls went by sidecall in 5 s ({by_exit} by exit)"
        );
        return 1;
    }
    gprintln!(
        env,
        "toggle: ok: {writes} writes ({stops} stops), {calls} counter calls, {CHECK_CALLS} by sidecall within {back_ms} ms of the final start ({by_exit} by exit)"
    );
    flood(env, env.boot.args[toggle::FLOOD_LINES]);
    0
}

/// `lines` console lines of escape sequences: clear screen, set the window
/// title, ring the bell, carriage returns, a C1 CSI.
fn flood(env: &Env, lines: u64) {
    use core::fmt::Write as _;
    for i in 0..lines {
        let mut c = crate::console::Console::new(env);
        let _ = write!(c, "flood {i}: \x1b[2J\x1b[H\x1b]0;pwned\x07\r\u{9b}31m");
        for _ in 0..8 {
            let _ = c.write_str("\x1b[5m\x1b[?1049h");
        }
        let _ = c.write_str("\n");
    }
}
