//! The vCPU's starting state: the GDT and its segments, and CPUID entries
//! between KVM's form and the core's.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(crate) fn code_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

pub(crate) fn data_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 3,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

/// The GDT: null, 64-bit code (0x08), data (0x10).
pub const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

pub(crate) fn entry_from_kvm(e: &kvm_bindings::kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry { function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx }
}

pub(crate) fn entry_to_kvm(e: &CpuidEntry) -> kvm_bindings::kvm_cpuid_entry2 {
    kvm_bindings::kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}
