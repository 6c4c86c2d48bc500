//! `echo` (the packet device) and `irq` (the event-delivery responder of
//! `sidecore bench --ops irq`).

use core::sync::atomic::Ordering;

use shm_proto::args;
use shm_proto::event::{PktDesc, DESC_AVAIL, DESC_ERROR, DESC_USED, EV_TEST, PKT_MAX, PKT_QUEUE, PKT_STOP};

use crate::{arch, events, gprintln, Env};

/// Default idle deadline (ms): `echo` gives up after this long without a
/// packet (checked whenever it wakes), `irq` after this long without an event.
const DEFAULT_IDLE_MS: u64 = 10_000;

fn buf_gpa(env: &Env, tx: bool, i: usize) -> u64 {
    let base = shm_proto::layout::guest_scratch(env.boot.free_gpa, env.boot.nr_vcpus, env.vcpu);
    base + u64::from(tx) * (PKT_QUEUE as u64 * u64::from(PKT_MAX)) + i as u64 * u64::from(PKT_MAX)
}

fn post_rx(env: &Env, d: &PktDesc, i: usize) {
    d.addr.store(buf_gpa(env, false, i), Ordering::Relaxed);
    d.len.store(PKT_MAX, Ordering::Relaxed);
    d.state.store(DESC_AVAIL, Ordering::Release);
}

/// Echoes packets from the rx queue back through tx (see
/// `shm_proto::boot::Workload::Echo` for the arguments) until `PKT_STOP`
/// comes, `args[0]` packets were echoed, or nothing came for `args[1]` ms.
/// Only vCPU 0 has the device.
pub fn echo(env: &Env) -> u32 {
    if env.vcpu != 0 {
        return 0;
    }
    let a = &env.boot.args;
    let count = a[args::echo::COUNT];
    let idle_ms = if a[args::echo::IDLE_MS] == 0 { DEFAULT_IDLE_MS } else { a[args::echo::IDLE_MS] };
    let exit_path = a[args::echo::EXIT_PATH] == 1;
    let spin_us = if a[args::echo::SPIN_US] == 0 { 200 } else { a[args::echo::SPIN_US] };
    let spin = env.boot.tsc_khz.saturating_mul(spin_us) / 1000;
    let toggle_every = a[args::echo::TOGGLE_EVERY];
    let idle_limit = env.boot.tsc_khz.saturating_mul(idle_ms);
    let q = &env.shared.pkt;
    for (i, d) in q.rx.desc.iter().enumerate() {
        post_rx(env, d, i);
    }
    let (mut rx_i, mut tx_i) = (0usize, 0usize);
    let (mut echoed, mut bad, mut timed_out, mut stopped) = (0u64, 0u64, false, false);
    let mut last = arch::rdtsc();
    let mut idle_since: Option<u64> = None;
    gprintln!(env, "echo: ready, {} path", if exit_path { "exit" } else { "posted-event" });
    while count == 0 || echoed < count {
        let d = &q.rx.desc[rx_i];
        match d.state.load(Ordering::Acquire) {
            DESC_USED => {
                idle_since = None;
                let len = d.len.load(Ordering::Relaxed).min(PKT_MAX);
                let t = &q.tx.desc[tx_i];
                // The device hands tx descriptors back in order; on the exit
                // path each doorbell drains them at once.
                while t.state.load(Ordering::Acquire) == DESC_AVAIL {
                    core::hint::spin_loop();
                }
                bad += u64::from(t.state.load(Ordering::Relaxed) == DESC_ERROR);
                let (src, dst) = (buf_gpa(env, false, rx_i), buf_gpa(env, true, tx_i));
                // SAFETY: both buffers are PKT_MAX bytes of this vCPU's
                // identity-mapped scratch area; len <= PKT_MAX.
                unsafe { core::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len as usize) };
                t.addr.store(dst, Ordering::Relaxed);
                t.len.store(len, Ordering::Relaxed);
                t.state.store(DESC_AVAIL, Ordering::Release);
                if exit_path {
                    arch::outl(shm_proto::boot::PORT_PKT_TX, 0);
                }
                tx_i = (tx_i + 1) % PKT_QUEUE;
                // SAFETY: the rx buffer is PKT_MAX bytes of identity-mapped
                // scratch, at least PKT_STOP's length.
                let stop = len as usize >= PKT_STOP.len()
                    && unsafe { core::slice::from_raw_parts(src as *const u8, PKT_STOP.len()) } == PKT_STOP;
                post_rx(env, d, rx_i);
                rx_i = (rx_i + 1) % PKT_QUEUE;
                last = arch::rdtsc();
                if stop {
                    stopped = true;
                    break;
                }
                echoed += 1;
                if toggle_every != 0 && echoed % toggle_every == 0 {
                    toggle_sidecore(env);
                }
            }
            DESC_ERROR => {
                bad += 1;
                post_rx(env, d, rx_i);
                rx_i = (rx_i + 1) % PKT_QUEUE;
            }
            _ => {
                let now = arch::rdtsc();
                if now.wrapping_sub(last) > idle_limit {
                    timed_out = true;
                    break;
                }
                if exit_path {
                    // Learn of packets only by interrupt.
                    events::take(env);
                    events::halt(env);
                } else {
                    let since = *idle_since.get_or_insert(now);
                    if now.wrapping_sub(since) > spin {
                        events::idle(env);
                        idle_since = None;
                    } else {
                        events::take(env);
                        core::hint::spin_loop();
                    }
                }
            }
        }
    }
    let g = &env.shared.guest_events;
    gprintln!(
        env,
        "echo: {echoed} packets echoed by the {} path, {bad} bad descriptors, {} halts, {} interrupts{}",
        if exit_path { "exit" } else { "posted-event" },
        g.halts.load(Ordering::Relaxed),
        g.interrupts.load(Ordering::Relaxed),
        if timed_out { ", stopped: idle too long" } else { "" }
    );
    u32::from(timed_out || (count != 0 && !stopped && echoed < count))
}

/// Has the VMM stop the sidecore (it goes 2 ms after the write), waits
/// until it surely has, and starts it again: packets that come meanwhile
/// wait in the device's socket.
fn toggle_sidecore(env: &Env) {
    use shm_proto::boot::{CONTROL_START_SIDECORE, CONTROL_STOP_SIDECORE};
    arch::outl(env.boot.control_port, CONTROL_STOP_SIDECORE);
    let t0 = arch::rdtsc();
    while arch::rdtsc().wrapping_sub(t0) < env.boot.tsc_khz.saturating_mul(5) {
        core::hint::spin_loop();
    }
    arch::outl(env.boot.control_port, CONTROL_START_SIDECORE);
}

/// Acknowledges test events (see `shm_proto::boot::Workload::Irq`): writes
/// each event's payload to `GuestEventLine::ack` as soon as it sees it, by
/// polling the posted events or (args[2] = 1) only by taking an interrupt.
pub fn irq(env: &Env) -> u32 {
    if env.vcpu != 0 {
        return 0;
    }
    let a = &env.boot.args;
    let n = if a[args::irq::EVENTS] == 0 { 10_000 } else { a[args::irq::EVENTS] };
    let by_interrupt = a[args::irq::BY_INTERRUPT] == 1;
    let idle_ms = if a[args::irq::IDLE_MS] == 0 { DEFAULT_IDLE_MS } else { a[args::irq::IDLE_MS] };
    let limit = env.boot.tsc_khz.saturating_mul(idle_ms);
    let g = &env.shared.guest_events;
    let ev = &env.shared.events;
    let mut seen = events::interrupts(env);
    let mut acked = 0;
    // Ready: the host waits for this before its first event.
    g.ack.store(u64::MAX, Ordering::Release);
    while acked < n {
        let t0 = arch::rdtsc();
        if by_interrupt {
            let now = events::wait_interrupt(env, seen, t0.wrapping_add(limit));
            if now == seen {
                break;
            }
            seen = now;
            events::take(env);
        } else {
            let got = loop {
                if events::take(env) & EV_TEST != 0 {
                    break true;
                }
                if arch::rdtsc().wrapping_sub(t0) > limit {
                    break false;
                }
                core::hint::spin_loop();
            };
            if !got {
                break;
            }
        }
        g.ack.store(ev.payload.load(Ordering::Acquire), Ordering::Release);
        acked += 1;
    }
    gprintln!(
        env,
        "irq: {acked} of {n} events acknowledged by {}, {} interrupts",
        if by_interrupt { "interrupt" } else { "polling" },
        g.interrupts.load(Ordering::Relaxed)
    );
    u32::from(acked < n)
}
