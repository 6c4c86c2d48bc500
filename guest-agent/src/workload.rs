//! The small workloads: `hello` and `spin`.

use shm_proto::args::{spin, wake};
use shm_proto::boot::Backend;

use crate::{arch, gprintln, Env};

/// Prints a line with a value the guest computed: the number of primes below
/// 10,000 (1229), counted by trial division.
pub fn hello(env: &Env) -> u32 {
    let mut count = 0u32;
    for n in 2u32..10_000 {
        if (2..).take_while(|d| d * d <= n).all(|d| n % d != 0) {
            count += 1;
        }
    }
    let backend = Backend::from_u32(env.boot.backend).map_or("?", Backend::name);
    gprintln!(env, "hello from vCPU {} on {backend}: {count} primes below 10000", env.vcpu);
    0
}

/// 10^8 (or `args[spin::ITERS]`) iterations of a register-only loop, timed with the TSC.
/// Only vCPU 0 runs it, so the run prints one line.
pub fn spin(env: &Env) -> u32 {
    if env.vcpu != 0 {
        return 0;
    }
    let iters = if env.boot.args[spin::ITERS] == 0 { 100_000_000 } else { env.boot.args[spin::ITERS] };
    let t0 = arch::rdtsc();
    arch::spin_loop(iters);
    let cycles = arch::rdtsc().wrapping_sub(t0);
    let khz = env.boot.tsc_khz.max(1);
    // Precision loss is fine for a printed figure.
    #[allow(clippy::cast_precision_loss)]
    let ns = cycles as f64 * 1e6 / khz as f64 / iters as f64;
    gprintln!(env, "spin: {ns:.3} ns/iteration");
    0
}

/// Wake-up latency of a parked sidecore: rounds of idling (no calls) long
/// enough for it to park, then one timed null sidecall each.
pub fn wake(env: &Env) -> u32 {
    use crate::client::{Client, Via};
    use shm_proto::op::{Opcode, WORDS};
    let rounds = usize::try_from(if env.boot.args[wake::ROUNDS] == 0 { 50 } else { env.boot.args[wake::ROUNDS] })
        .unwrap_or(50)
        .min(1000);
    let idle_us = if env.boot.args[wake::IDLE_US] == 0 { 5000 } else { env.boot.args[wake::IDLE_US] };
    let mut c = Client::new(env);
    let mut samples = [0u64; 1000];
    let mut by_side = 0;
    for s in samples[..rounds].iter_mut() {
        let t = arch::rdtsc();
        while arch::rdtsc().wrapping_sub(t) < env.boot.tsc_khz.saturating_mul(idle_us) / 1000 {}
        let t0 = arch::rdtsc();
        let r = c.call(Opcode::Null as u16, [0; WORDS]);
        *s = arch::rdtsc().wrapping_sub(t0);
        by_side += usize::from(r.via == Via::Sidecall);
    }
    let v = &mut samples[..rounds];
    v.sort_unstable();
    let khz = env.boot.tsc_khz.max(1);
    let us = |c: u64| c * 1000 / khz;
    gprintln!(
        env,
        "wake: {rounds} calls after {idle_us} us idle: p50 {} us, p90 {} us, max {} us; {by_side} by sidecall",
        us(v[rounds / 2]),
        us(v[rounds * 9 / 10]),
        us(v[rounds - 1])
    );
    0
}
