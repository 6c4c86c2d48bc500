//! Shadows of the vCPU state KVM derives CPUID bits from (CR4, XCR0,
//! IA32_XSS, IA32_APIC_BASE), so that a CPUID sidecall can tell the sidecore
//! what the vCPU's state is (`shm_proto::op::Opcode::Cpuid`, request v2)
//! without reading CR4 or an MSR on every call, which traps on PVM.
//!
//! Every write the agent makes to these registers goes through this module,
//! which keeps the shadow; [`init`] reads the registers once at boot.

use core::sync::atomic::{AtomicU64, Ordering};

use shm_proto::layout::MAX_VCPUS;
use shm_proto::op::{Opcode, WORDS};

use crate::arch;

/// CR4.OSXSAVE.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.PKE.
pub const CR4_PKE: u64 = 1 << 22;
/// IA32_APIC_BASE.
const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_XSS.
const MSR_XSS: u32 = 0xda0;

/// One vCPU's shadows. Only that vCPU writes them; atomics because the
/// array is a shared static.
struct Shadow {
    cr4: AtomicU64,
    xcr0: AtomicU64,
    xss: AtomicU64,
    apic_base: AtomicU64,
}

static SHADOWS: [Shadow; MAX_VCPUS as usize] = [const {
    Shadow { cr4: AtomicU64::new(0), xcr0: AtomicU64::new(1), xss: AtomicU64::new(0), apic_base: AtomicU64::new(0) }
}; MAX_VCPUS as usize];

fn shadow(vcpu: u32) -> Option<&'static Shadow> {
    SHADOWS.get(usize::try_from(vcpu).ok()?)
}

/// Reads this vCPU's registers into its shadow (once, at boot: each read
/// traps on PVM). IA32_XSS is taken at its reset value 0: the VMM never sets
/// it, and reading it faults on a CPU without XSAVES.
pub fn init(vcpu: u32) {
    let Some(s) = shadow(vcpu) else { return };
    let cr4 = arch::read_cr4();
    s.cr4.store(cr4, Ordering::Relaxed);
    s.xcr0.store(if cr4 & CR4_OSXSAVE != 0 { arch::xgetbv0() } else { 1 }, Ordering::Relaxed);
    s.xss.store(0, Ordering::Relaxed);
    s.apic_base.store(arch::rdmsr(MSR_APIC_BASE), Ordering::Relaxed);
}

/// The shadowed CR4.
pub fn cr4(vcpu: u32) -> u64 {
    shadow(vcpu).map_or(0, |s| s.cr4.load(Ordering::Relaxed))
}

/// The shadowed XCR0.
pub fn xcr0(vcpu: u32) -> u64 {
    shadow(vcpu).map_or(1, |s| s.xcr0.load(Ordering::Relaxed))
}

/// Writes CR4 and its shadow; returns what CR4 reads back (one more trap on
/// PVM), so a caller can tell a write the hypervisor refused or masked.
pub fn set_cr4(vcpu: u32, v: u64) -> u64 {
    arch::write_cr4(v);
    let back = arch::read_cr4();
    if let Some(s) = shadow(vcpu) {
        s.cr4.store(back, Ordering::Relaxed);
    }
    back
}

/// Writes XCR0 and its shadow (needs CR4.OSXSAVE); returns what XGETBV
/// reads back. The shadow is the value written, which is what KVM holds
/// after an XSETBV it accepted (it refuses others with #GP): XGETBV is not
/// intercepted and reads the hardware register, which a backend need not
/// load with the guest's value.
pub fn set_xcr0(vcpu: u32, v: u64) -> u64 {
    arch::xsetbv0(v);
    if let Some(s) = shadow(vcpu) {
        s.xcr0.store(v, Ordering::Relaxed);
    }
    arch::xgetbv0()
}

/// Writes IA32_XSS and its shadow (needs XSAVES); returns what it reads back.
pub fn set_xss(vcpu: u32, v: u64) -> u64 {
    arch::wrmsr(MSR_XSS, v);
    let back = arch::rdmsr(MSR_XSS);
    if let Some(s) = shadow(vcpu) {
        s.xss.store(back, Ordering::Relaxed);
    }
    back
}

/// A request's words with the vCPU state filled in when it is a CPUID
/// request (words 2..6 of the v2 request); any other request unchanged.
pub fn request_words(vcpu: u32, opcode: u16, mut words: [u64; WORDS]) -> [u64; WORDS] {
    if opcode == Opcode::Cpuid as u16 {
        if let Some(s) = shadow(vcpu) {
            words[2] = s.cr4.load(Ordering::Relaxed);
            words[3] = s.xcr0.load(Ordering::Relaxed);
            words[4] = s.xss.load(Ordering::Relaxed);
            words[5] = s.apic_base.load(Ordering::Relaxed);
        }
    }
    words
}
