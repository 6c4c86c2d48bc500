//! Named argument slots of every workload: `BootInfo::args[slot]`, which the
//! VMM fills (from `sidecore run --arg`, in order, or from its own runs) and
//! the guest reads. 0 in a slot means that slot's default.

/// `spin`: the native-execution check.
pub mod spin {
    /// Loop iterations (default 10^8).
    pub const ITERS: usize = 0;
}

/// `selftest`: every path, every answer.
pub mod selftest {
    /// CPUID leaves checked against KVM (default 10,000).
    pub const CPUID_PAIRS: usize = 0;
    /// Milliseconds of null calls at the end, to keep the VM busy (default 0).
    pub const LINGER_MS: usize = 1;
    /// 1: polite, no deliberately invalid sidecalls (a good VM beside a
    /// hostile one).
    pub const POLITE: usize = 2;
    /// Milliseconds, at least, that the fallback phase keeps the sidecore
    /// stopped (paused under a daemon) while the guest keeps calling
    /// (default 0: until 50 calls went by exit path).
    pub const PAUSE_MS: usize = 3;
}

/// `chaos`: hostile requests on the ring.
pub mod chaos {
    /// Milliseconds to run (default 10,000).
    pub const MS: usize = 1;
}

/// `wake`: the wake-up latency of a parked sidecore.
pub mod wake {
    /// Rounds (default 50, at most 1000).
    pub const ROUNDS: usize = 0;
    /// Microseconds idle before each timed call (default 5000).
    pub const IDLE_US: usize = 1;
}

/// `echo`: the packet device's guest.
pub mod echo {
    /// Packets to echo before stopping (0: until the stop packet).
    pub const COUNT: usize = 0;
    /// Milliseconds with no packet after which the guest gives up.
    pub const IDLE_MS: usize = 1;
    /// 1: the exit path (interrupt per packet, PIO doorbell for tx).
    pub const EXIT_PATH: usize = 2;
    /// Microseconds the guest spins idle before it halts (default 200).
    pub const SPIN_US: usize = 3;
    /// Every this many packets, stop the sidecore for a few ms and start it
    /// again (0: never): the device must survive it.
    pub const TOGGLE_EVERY: usize = 4;
}

/// `irq`: the event-delivery benchmark's responder.
pub mod irq {
    /// Events to acknowledge (default 10,000).
    pub const EVENTS: usize = 0;
    /// Milliseconds with no event after which the guest gives up.
    pub const IDLE_MS: usize = 1;
    /// 1: events come as interrupts (the exit path), else posted.
    pub const BY_INTERRUPT: usize = 2;
}

pub use crate::bench::arg as bench;

/// `gpascan`: a hostile guest's own page tables against the shadow zap.
pub mod gpascan {
    /// Shadow zaps vCPU 0 triggers (default 1000, at most 10^6).
    pub const ZAPS: usize = 0;
    /// 1: map the sweep with 2 MiB pages even where 1 GiB pages exist.
    pub const SMALL_PAGES: usize = 1;
}

/// `toggle`: stop/start writes to the control port, then the sidecall check.
pub mod toggle {
    /// Control writes in a pseudo-random order (default 100,000).
    pub const WRITES: usize = 0;
    /// Console lines of escape sequences to write after the check, to flood
    /// the VMM's console (default 0).
    pub const FLOOD_LINES: usize = 1;
    /// 1: the calls made between the writes go by the exit path; by default
    /// they go by the ring, which a stopped sidecore leaves to time out (the
    /// hard case for the ring protocol).
    pub const EXIT_DURING: usize = 2;
}
