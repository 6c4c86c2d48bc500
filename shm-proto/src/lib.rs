//! The shared-memory ABI of Sidecore, used by both sides: the VMM and its
//! sidecores on the host, and the guest-agent inside the VM.
//!
//! Everything here is `#![no_std]` with no dependencies. Every structure that
//! crosses the guest boundary is `#[repr(C)]` and its size, alignment and field
//! offsets are fixed by `const` assertions, so a change that moves a field
//! fails to compile instead of silently breaking the ABI.
//!
//! * [`layout`]: the guest-physical memory map.
//! * [`boot`]: the boot-info page the VMM writes for the guest.
//! * [`ring`]: the shared region — header, per-vCPU rings of 64-byte slots,
//!   the lap-counted slot state word.
//! * [`sidecall`]: the guest's side of the slot protocol — backpressure,
//!   resynchronisation, ordered batches.
//! * [`event`]: posted events, the halt/wake protocol, the packet device's
//!   queues.
//! * [`bench`]: how the guest hands benchmark samples to the VMM.
//! * [`op`]: opcodes, flags, status codes and request/reply encodings.
#![no_std]

pub mod args;
pub mod bench;
pub mod boot;
pub mod event;
pub mod layout;
pub mod op;
pub mod ring;
pub mod sidecall;

/// Version of the whole ABI (boot-info page and shared region). Bumped on any
/// incompatible change; both sides refuse a mismatch.
pub const ABI_VERSION: u32 = 2;
