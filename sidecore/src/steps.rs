//! Ping-pong variants, one per step of the slot protocol, between two pinned
//! host threads (`sidecore bench --steps`). Each adds one step to the one
//! before, so the differences say what each step costs in cache-line
//! transfers: the floor, a claim by load then compare-and-swap (the ring's),
//! a claim by compare-and-swap alone (an alternative, measured beside it),
//! then on the ring's claim a full 64-byte body, a read of the slot before
//! the post, and a new slot per call as the ring uses them.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::pin::pin_current_thread;
use crate::tsc::rdtsc;

/// One protocol step's variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// One word, one line: the caller stores, the server answers with a
    /// store (the floor).
    Line,
    /// The server claims with a load, then a compare-and-swap, then answers
    /// (the claim the ring uses today).
    LoadCas,
    /// The server polls with the compare-and-swap itself, so its first
    /// touch of the posted line takes it exclusive (a candidate claim).
    CasPoll,
    /// As `LoadCas` with the whole 64-byte slot: the caller writes head and
    /// six words before the state word, the server reads them and writes a
    /// reply body.
    Body,
    /// As `Body`, the caller first reading the state word to see that it
    /// owns the slot (the post the ring uses today).
    ReadBeforePost,
    /// As `Body`, each call in the next of 64 slots, as the ring does.
    Ring,
}

impl Step {
    /// Every step, in the order they build on each other.
    pub const ALL: [Step; 6] = [Step::Line, Step::LoadCas, Step::CasPoll, Step::Body, Step::ReadBeforePost, Step::Ring];

    /// Whether the call carries the 64-byte body each way.
    fn has_body(self) -> bool {
        matches!(self, Step::Body | Step::ReadBeforePost | Step::Ring)
    }

    /// Name in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Step::Line => "line",
            Step::LoadCas => "claim: load, then CAS",
            Step::CasPoll => "claim: CAS as the poll",
            Step::Body => "load, CAS + 64-byte body each way",
            Step::ReadBeforePost => "+ caller reads state before posting",
            Step::Ring => "+ next slot per call (64 slots)",
        }
    }
}

const SLOTS: usize = 64;
const POSTED: u64 = 1;
const CLAIMED: u64 = 2;
const DONE: u64 = 3;
const STOP: u64 = u64::MAX;

#[repr(C, align(128))]
struct Slot {
    state: AtomicU64,
    words: [AtomicU64; 7],
}

/// Measures `n` round trips of `step`, the caller on `caller_cpu`, the
/// server on `server_cpu`. Returns the TSC cycles of each.
pub fn measure(step: Step, caller_cpu: usize, server_cpu: usize, n: usize) -> Result<Vec<u64>, crate::pin::PinError> {
    let slots: Vec<Slot> = (0..SLOTS).map(|_| Slot { state: AtomicU64::new(0), words: Default::default() }).collect();
    let nslots = if step == Step::Ring { SLOTS } else { 1 };
    let mut samples = vec![0u64; n];
    std::thread::scope(|s| {
        let server = s.spawn(|| -> Result<(), crate::pin::PinError> {
            pin_current_thread(server_cpu)?;
            serve(step, &slots[..nslots]);
            Ok(())
        });
        let r = pin_current_thread(caller_cpu).map(|()| call(step, &slots[..nslots], &mut samples));
        // Stop the server whatever happened here (it spins on slot 0's
        // successor ticket).
        stop(&slots[..nslots]);
        server.join().unwrap_or(Ok(())).and(r)
    })?;
    Ok(samples)
}

/// The state word of ticket `t` in state `s`.
fn word(t: u64, s: u64) -> u64 {
    t << 4 | s
}

fn stop(slots: &[Slot]) {
    for s in slots {
        s.state.store(STOP, Ordering::Release);
    }
}

fn call(step: Step, slots: &[Slot], samples: &mut [u64]) {
    // Two untimed laps first, so both threads run and every line is warm.
    let warm = 2 * slots.len();
    for (i, t) in (0..warm + samples.len()).zip(0u64..) {
        let slot = &slots[i % slots.len()];
        let t0 = rdtsc();
        let body = step.has_body();
        if step == Step::ReadBeforePost {
            // The guest's ownership check; its outcome is always "ours" here
            // (the server answers every claim before the caller posts again).
            std::hint::black_box(slot.state.load(Ordering::Acquire));
        }
        if body {
            for (a, k) in slot.words.iter().zip(0u64..) {
                a.store(t + k, Ordering::Relaxed);
            }
        }
        slot.state.store(word(t, POSTED), Ordering::Release);
        while slot.state.load(Ordering::Acquire) != word(t, DONE) {
            core::hint::black_box(());
        }
        if body {
            let sum = slot.words.iter().fold(0u64, |s, a| s.wrapping_add(a.load(Ordering::Relaxed)));
            std::hint::black_box(sum);
        }
        let dt = rdtsc().wrapping_sub(t0);
        if let Some(s) = i.checked_sub(warm).and_then(|j| samples.get_mut(j)) {
            *s = dt;
        }
    }
}

fn serve(step: Step, slots: &[Slot]) {
    for (i, t) in (0usize..).zip(0u64..) {
        let slot = &slots[i % slots.len()];
        let posted = word(t, POSTED);
        match step {
            Step::Line => loop {
                let w = slot.state.load(Ordering::Acquire);
                if w == posted {
                    break;
                }
                if w == STOP {
                    return;
                }
                core::hint::black_box(());
            },
            Step::LoadCas | Step::Body | Step::ReadBeforePost | Step::Ring => loop {
                let w = slot.state.load(Ordering::Acquire);
                if w == posted
                    && slot.state.compare_exchange(w, word(t, CLAIMED), Ordering::AcqRel, Ordering::Relaxed).is_ok()
                {
                    break;
                }
                if w == STOP {
                    return;
                }
                core::hint::black_box(());
            },
            Step::CasPoll => loop {
                match slot.state.compare_exchange(posted, word(t, CLAIMED), Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(STOP) => return,
                    Err(_) => {}
                }
            },
        }
        if step.has_body() {
            let mut body = [0u64; 7];
            for (b, a) in body.iter_mut().zip(&slot.words) {
                *b = a.load(Ordering::Relaxed);
            }
            for (a, b) in slot.words.iter().zip(body) {
                a.store(b ^ 1, Ordering::Relaxed);
            }
        }
        slot.state.store(word(t, DONE), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_completes_its_round_trips() {
        // The two threads may share one CPU here; the protocol still
        // completes, just slowly.
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let other = usize::from(cpus > 1);
        for step in Step::ALL {
            let s = measure(step, 0, other, 50).expect("pin");
            assert_eq!(s.len(), 50);
            assert!(s.iter().all(|&c| c > 0), "{}: a round trip took no time", step.name());
        }
    }
}
