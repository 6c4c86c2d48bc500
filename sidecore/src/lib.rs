//! The sidecore: a host thread pinned to a dedicated CPU that serves guests'
//! sidecalls by polling their shared-memory rings.
//!
//! * [`service`]: the service handlers (null, CPUID, the hypercall registry)
//!   that both the sidecore and the VMM's exit path call.
//! * [`device`]: the [`device::Device`] a sidecore polls besides its rings,
//!   posted events (the host half of the halt/wake protocol) and the packet
//!   device.
//! * [`pte`]: validated page-table updates.
//! * [`hypercalls`]: the hypercalls every VMM registers (the VMM and the
//!   daemon both serve them).
//! * [`cpuid`]: KVM's rules for answering CPUID from a KVM_SET_CPUID2 table.
//! * [`ring`]: the host side of one vCPU's ring: poll, claim, validate,
//!   dispatch, reply.
//! * [`poll`]: the pinned thread that sweeps its rings, and its handle.
//! * [`stats`]: per-op and per-status counters readable from any thread.
//! * [`hostmem`]: host-private state a VMM and a daemon share.
//! * [`steps`]: ping-pong variants that price each step of the slot
//!   protocol.
//! * [`throughput`]: calls per second with synthetic producers, and the
//!   capacity model.
//! * [`nowait`]: I/O on fds a VMM shares that cannot block a sidecore.
//! * [`pin`]: pinning a thread to a CPU, with the errno on failure.
//! * [`tsc`]: the time-stamp counter the fast path times itself with.

pub mod cpuid;
pub mod device;
pub mod hostmem;
pub mod hypercalls;
pub mod nowait;
pub mod pin;
pub mod poll;
pub mod pte;
pub mod ring;
pub mod service;
pub mod stats;
pub mod steps;
pub mod throughput;
pub mod tsc;

pub use crate::poll::{Parts, Sidecore, SidecoreConfig, SidecoreError, StartHook};
pub use crate::ring::{RingRef, SharedRegion, VmControl};
pub use crate::service::{CallCtx, Services};
pub use crate::stats::VmStats;
