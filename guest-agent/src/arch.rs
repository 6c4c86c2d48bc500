//! The instructions the guest uses to reach the hypervisor, in `asm!` so that
//! what is timed is exactly what runs.

use core::arch::asm;

use shm_proto::boot::{CpuidInsn, HypercallInsn};

/// Writes `value` to PIO `port`: an exit to the userspace VMM.
pub fn outl(port: u16, value: u32) {
    // SAFETY: a port write has no effect on guest memory; the VMM handles it.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
}

/// Reports `status` to the VMM, which stops this vCPU.
pub fn exit(port: u16, status: u32) -> ! {
    outl(port, status);
    loop {
        // SAFETY: hlt only waits; the VMM never resumes a vCPU that exited.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// Reads the TSC, ordered after earlier instructions (lfence; rdtsc).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: lfence and rdtsc only read the time-stamp counter.
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The backend's in-kernel hypercall: number `nr`, argument in RBX.
/// Returns RAX as KVM leaves it.
pub fn hypercall(insn: HypercallInsn, nr: u64, arg: u64) -> i64 {
    let ret: u64;
    // SAFETY: the hypercall instruction traps to KVM, which returns a value in
    // RAX and touches no guest memory for the numbers used here. RBX is
    // reserved by LLVM, so it is swapped through a scratch register.
    unsafe {
        match insn {
            HypercallInsn::PvmInt1b => asm!(
                "xchg {a}, rbx", "int 0x1b", "xchg {a}, rbx",
                a = inout(reg) arg => _, inout("rax") nr => ret,
                lateout("rcx") _, lateout("rdx") _, options(nostack)),
            HypercallInsn::Vmcall => asm!(
                "xchg {a}, rbx", "vmcall", "xchg {a}, rbx",
                a = inout(reg) arg => _, inout("rax") nr => ret,
                lateout("rcx") _, lateout("rdx") _, options(nostack)),
            HypercallInsn::Vmmcall => asm!(
                "xchg {a}, rbx", "vmmcall", "xchg {a}, rbx",
                a = inout(reg) arg => _, inout("rax") nr => ret,
                lateout("rcx") _, lateout("rdx") _, options(nostack)),
        }
    }
    ret.cast_signed()
}

/// CPUID through the instruction that reaches this KVM's table.
pub fn cpuid(insn: CpuidInsn, leaf: u32, subleaf: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: CPUID (or PVM's int $0x1a) only writes the four registers. RBX is
    // reserved by LLVM, so it is saved through a scratch register.
    unsafe {
        match insn {
            CpuidInsn::PvmInt1a => asm!(
                "mov {t:r}, rbx", "int 0x1a", "xchg {t:r}, rbx",
                t = out(reg) b, inout("eax") leaf => a, inout("ecx") subleaf => c, out("edx") d,
                options(nostack)),
            CpuidInsn::Cpuid => asm!(
                "mov {t:r}, rbx", "cpuid", "xchg {t:r}, rbx",
                t = out(reg) b, inout("eax") leaf => a, inout("ecx") subleaf => c, out("edx") d,
                options(nostack)),
        }
    }
    [a, b, c, d]
}

/// A register-only loop of `n` iterations (`dec; jnz`).
#[inline(always)]
pub fn spin_loop(n: u64) {
    if n == 0 {
        return;
    }
    // SAFETY: touches only RCX and flags.
    unsafe { asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) n => _, options(nomem, nostack)) };
}
