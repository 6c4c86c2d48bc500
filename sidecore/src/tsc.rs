//! The time-stamp counter: the one clock of the fast path (the sidecore
//! loop, the ring's service timing, the floor ping-pong).

/// Reads the TSC, ordered after earlier loads (lfence; rdtsc).
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: lfence and rdtsc have no preconditions on x86-64.
    unsafe {
        std::arch::x86_64::_mm_lfence();
        std::arch::x86_64::_rdtsc()
    }
}
