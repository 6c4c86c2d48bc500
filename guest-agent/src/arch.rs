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

/// Reads CR4. On PVM this traps and is emulated: callers keep a shadow
/// (`cpustate`) and read it only to set the shadow up or check a write.
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effect (the agent runs at CPL0).
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR4. Only `cpustate::set_cr4` calls it, which keeps the shadow.
pub fn write_cr4(v: u64) {
    // SAFETY: the callers only toggle OSXSAVE and PKE, which change which
    // instructions and CPUID bits the guest has, not its memory or paging.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Reads XCR0 (needs CR4.OSXSAVE).
pub fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: xgetbv only reads the register; callers check CR4.OSXSAVE.
    unsafe { asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes XCR0 (needs CR4.OSXSAVE and a value the CPU accepts). Only
/// `cpustate::set_xcr0` calls it.
pub fn xsetbv0(v: u64) {
    // SAFETY: the agent is built without SSE/AVX state in use (soft-float
    // target), so which components XCR0 enables changes no live state; the
    // callers only pass masks CPUID leaf 0xD reports as supported.
    unsafe {
        asm!("xsetbv", in("ecx") 0u32, in("eax") halves(v).0, in("edx") halves(v).1,
            options(nomem, nostack, preserves_flags));
    }
}

/// Reads MSR `msr`.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the callers only read MSRs that exist (IA32_APIC_BASE always;
    // IA32_XSS only when CPUID 0xD.1 reports XSAVES); a read has no side
    // effect.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes MSR `msr`. Only `cpustate` calls it, for IA32_XSS.
pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the callers only write IA32_XSS with bits CPUID 0xD.1 reports
    // as supported; it changes which components XSAVES saves, which the
    // agent never uses.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") halves(v).0, in("edx") halves(v).1,
            options(nomem, nostack, preserves_flags));
    }
}

/// The low and high halves of `v`, for EDX:EAX operands.
#[allow(clippy::cast_possible_truncation)] // the truncation is the point
fn halves(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}
