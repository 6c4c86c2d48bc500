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

/// A TSC rate: the one conversion between cycles and time that the VMM,
/// the daemon, the benchmark and the CLI use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscRate {
    khz: u64,
}

impl TscRate {
    /// The rate `khz` kHz (0 is taken as 1 kHz, so that nothing divides by 0).
    pub fn from_khz(khz: u64) -> TscRate {
        TscRate { khz: khz.max(1) }
    }

    /// The rate in kHz.
    pub fn khz(self) -> u64 {
        self.khz
    }

    /// The rate in GHz (cycles per ns).
    pub fn ghz(self) -> f64 {
        to_f64(self.khz) / 1e6
    }

    /// `cycles` in ns.
    pub fn ns(self, cycles: u64) -> f64 {
        to_f64(cycles) * 1e6 / to_f64(self.khz)
    }

    /// `cycles` in whole ns, rounded down, saturating.
    pub fn whole_ns(self, cycles: u64) -> u64 {
        u64::try_from(u128::from(cycles) * 1_000_000 / u128::from(self.khz)).unwrap_or(u64::MAX)
    }
}

/// A count as f64: precision loss past 2^53 is irrelevant for times.
#[allow(clippy::cast_precision_loss)]
fn to_f64(v: u64) -> f64 {
    v as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_become_ns_at_the_rate() {
        let r = TscRate::from_khz(2_500_000); // 2.5 GHz
        assert_eq!(r.khz(), 2_500_000);
        assert!((r.ghz() - 2.5).abs() < 1e-12);
        assert!((r.ns(2500) - 1000.0).abs() < 1e-9);
        assert_eq!(r.whole_ns(2499), 999);
        assert_eq!(TscRate::from_khz(0).khz(), 1);
        assert_eq!(TscRate::from_khz(1).whole_ns(u64::MAX), u64::MAX);
    }
}
