//! xorshift64: reproducible pseudo-random numbers for the workloads.

/// The generator's state.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// 32 random bits.
    pub fn u32(&mut self) -> u32 {
        self.next().to_le_bytes()[0..4].iter().rev().fold(0u32, |a, b| (a << 8) | u32::from(*b))
    }
}
