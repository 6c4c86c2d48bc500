//! The benchmark protocol: the guest times each operation with the TSC and
//! hands its samples to the VMM a block at a time through a per-vCPU
//! [`BenchBlock`] (at the boot-info page's `bench_gpa`), with a PIO write to
//! [`crate::boot::PORT_BENCH`]. The VMM merges them into histograms and, after
//! every sidecall block, measures a block of the floor (a host cache-line
//! ping-pong on the same two CPUs), so the two are interleaved in time.
//!
//! After each sidecall block the guest also measures the floor from guest
//! mode: it asks the VMM to arm the sidecore ([`BENCH_ARM_FLOOR`]) for a
//! block of round trips on its vCPU's [`crate::ring::VcpuShared::pong`]
//! line, times them as it times its calls, and hands them over as a
//! [`BenchPath::GuestFloor`] block of the same op.

/// Samples in one block.
pub const BENCH_BLOCK_SAMPLES: usize = 4096;

/// Value of the PIO write that announces a block of samples.
pub const BENCH_BLOCK_READY: u32 = 1;
/// Value of the PIO write that asks the VMM to arm the sidecore for
/// `count` guest floor round trips (the block's `op`, `path` and `count` say
/// which); the VMM writes back in `count` how many it armed, 0 if none.
pub const BENCH_ARM_FLOOR: u32 = 2;
/// The most round trips one arming serves (a block and its warm-up).
#[allow(clippy::cast_possible_truncation)] // 4096 fits
pub const BENCH_FLOOR_MAX_ROUNDS: u32 = BENCH_BLOCK_SAMPLES as u32 + 64;

/// Workload argument slots of the bench workload (`BootInfo::args`).
pub mod arg {
    /// Bit mask of [`super::BenchOp`]s (0 = all).
    pub const OPS: usize = 0;
    /// Bit mask of [`super::BenchPath`]s (0 = all).
    pub const PATHS: usize = 1;
    /// Samples per (op, path) (0 = the default).
    pub const ITERS: usize = 2;
    /// Untimed warm-up calls per (op, path) (0 = the default).
    pub const WARMUP: usize = 3;
    /// Samples per block (0 = the default).
    pub const BLOCK: usize = 4;
}

/// An operation the bench times.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BenchOp {
    /// The null call.
    Null = 0,
    /// CPUID leaf 0.
    Cpuid = 1,
    /// One map of a fresh page-table entry, request to reply.
    Pte = 2,
    /// Map a fresh page, then touch it (the paper's page-fault case).
    Pagefault = 3,
    /// The same, 8 pages per batched sidecall, then touch them; one sample
    /// per page (the batch's time / 8).
    PagefaultBatch8 = 4,
    /// The same with 32 pages per batch.
    PagefaultBatch32 = 5,
}

impl BenchOp {
    /// Every op, in table order.
    pub const ALL: [BenchOp; 6] = [
        BenchOp::Null,
        BenchOp::Cpuid,
        BenchOp::Pte,
        BenchOp::Pagefault,
        BenchOp::PagefaultBatch8,
        BenchOp::PagefaultBatch32,
    ];

    /// Decodes.
    pub const fn from_u32(v: u32) -> Option<BenchOp> {
        match v {
            0 => Some(BenchOp::Null),
            1 => Some(BenchOp::Cpuid),
            2 => Some(BenchOp::Pte),
            3 => Some(BenchOp::Pagefault),
            4 => Some(BenchOp::PagefaultBatch8),
            5 => Some(BenchOp::PagefaultBatch32),
            _ => None,
        }
    }

    /// Name on the command line and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            BenchOp::Null => "null",
            BenchOp::Cpuid => "cpuid",
            BenchOp::Pte => "pte",
            BenchOp::Pagefault => "pagefault",
            BenchOp::PagefaultBatch8 => "pagefault-batch8",
            BenchOp::PagefaultBatch32 => "pagefault-batch32",
        }
    }

    /// Pages per batched sidecall (1 for unbatched ops).
    pub const fn batch(self) -> u64 {
        match self {
            BenchOp::PagefaultBatch8 => 8,
            BenchOp::PagefaultBatch32 => 32,
            _ => 1,
        }
    }

    /// Whether the op has this path.
    pub const fn has_path(self, p: BenchPath) -> bool {
        if matches!(p, BenchPath::GuestFloor) {
            return false;
        }
        match self {
            BenchOp::Null | BenchOp::Cpuid => true,
            BenchOp::Pte | BenchOp::Pagefault => !matches!(p, BenchPath::Kernel),
            // A trap takes one store at a time: only sidecalls batch.
            BenchOp::PagefaultBatch8 | BenchOp::PagefaultBatch32 => matches!(p, BenchPath::Sidecall),
        }
    }
}

/// How the op is served.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BenchPath {
    /// The backend's in-kernel trap (hypercall / CPUID instruction).
    Kernel = 0,
    /// An exit to the userspace VMM (PIO; MMIO write-protect trap for pte).
    User = 1,
    /// A sidecall.
    Sidecall = 2,
    /// Not a path of the op: the guest<->sidecore one-line floor measured
    /// beside the op's sidecall blocks (never in [`BenchPath::ALL`]).
    GuestFloor = 3,
}

impl BenchPath {
    /// Every path, in table order.
    pub const ALL: [BenchPath; 3] = [BenchPath::Kernel, BenchPath::User, BenchPath::Sidecall];

    /// Decodes.
    pub const fn from_u32(v: u32) -> Option<BenchPath> {
        match v {
            0 => Some(BenchPath::Kernel),
            1 => Some(BenchPath::User),
            2 => Some(BenchPath::Sidecall),
            3 => Some(BenchPath::GuestFloor),
            _ => None,
        }
    }

    /// Name on the command line and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            BenchPath::Kernel => "kernel",
            BenchPath::User => "user",
            BenchPath::Sidecall => "sidecall",
            BenchPath::GuestFloor => "guest-floor",
        }
    }
}

/// One block of samples, written by the guest, read by the VMM while the
/// vCPU is stopped in the PIO exit that announces it.
#[repr(C, align(4096))]
pub struct BenchBlock {
    /// [`BenchOp`].
    pub op: u32,
    /// [`BenchPath`].
    pub path: u32,
    /// Valid samples in `samples` (at most [`BENCH_BLOCK_SAMPLES`]).
    pub count: u32,
    /// Calls in this block that fell back from sidecall to the exit path.
    pub fallbacks: u32,
    _pad: [u64; 6],
    /// TSC cycles of each operation.
    pub samples: [u64; BENCH_BLOCK_SAMPLES],
}

/// Bytes of guest memory a block takes.
pub const BENCH_BLOCK_BYTES: u64 = core::mem::size_of::<BenchBlock>() as u64;

const _: () = assert!(core::mem::offset_of!(BenchBlock, count) == 8);
const _: () = assert!(core::mem::offset_of!(BenchBlock, samples) == 64);
const _: () = assert!(BENCH_BLOCK_BYTES == 36864);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        for op in BenchOp::ALL {
            assert_eq!(BenchOp::from_u32(op as u32), Some(op));
        }
        for p in BenchPath::ALL {
            assert_eq!(BenchPath::from_u32(p as u32), Some(p));
        }
        assert!(!BenchOp::Pte.has_path(BenchPath::Kernel));
        assert!(BenchOp::Null.has_path(BenchPath::Kernel));
        assert!(BenchOp::Pagefault.has_path(BenchPath::Sidecall));
        assert_eq!(BenchPath::from_u32(3), Some(BenchPath::GuestFloor));
        assert!(!BenchPath::ALL.contains(&BenchPath::GuestFloor));
    }
}
