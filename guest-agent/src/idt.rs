//! The guest's IDT: a #PF handler that lets the selftest probe an address
//! and see the fault it expects after an unmap, a fatal handler for every
//! other exception that prints the vector and RIP, the event vector's
//! handler (`events`), and an `iretq` for any other external vector.
//!
//! Exceptions push their frame on the current stack. Only `probe_read` is
//! expected to fault, and it is a leaf called with `call`, so nobody's red
//! zone lies below its RSP.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::{arch, gprintln, Env};

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Gate {
    lo: u64,
    hi: u64,
}

#[repr(C, align(4096))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate { lo: 0, hi: 0 }; 256]);
static LOADED: AtomicBool = AtomicBool::new(false);

core::arch::global_asm!(
    ".global probe_read_asm",
    ".global probe_insn",
    ".global probe_done",
    // rdi = address; returns rax = value, rdx = 0, or rdx = 1 if it faulted.
    "probe_read_asm:",
    "    xor edx, edx",
    "probe_insn:",
    "    mov rax, [rdi]",
    "probe_done:",
    "    ret",
    // #PF: error code on the stack. A fault at probe_insn resumes at
    // probe_done with rdx = 1; anything else is fatal.
    "pf_entry:",
    "    push rax",
    "    lea rax, [rip + probe_insn]",
    "    cmp [rsp + 16], rax",
    "    jne 2f",
    "    lea rax, [rip + probe_done]",
    "    mov [rsp + 16], rax",
    "    mov edx, 1",
    "    pop rax",
    "    add rsp, 8",
    "    iretq",
    "2:  pop rax",
    "    mov rdi, 14",
    "    pop rsi",
    "    mov rdx, [rsp]",
    "    and rsp, -16",
    "    call {fatal}",
    // Other exceptions: vector in rdi, the word on top (error code or RIP) in
    // rsi, the next in rdx.
    ".macro exc_stub n",
    "exc_\\n:",
    "    mov rsi, [rsp]",
    "    mov rdx, [rsp + 8]",
    "    mov rdi, \\n",
    "    and rsp, -16",
    "    call {fatal}",
    ".endm",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "exc_stub \\n",
    ".endr",
    ".section .rodata",
    ".balign 8",
    "exc_table:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13",
    ".quad exc_\\n",
    ".endr",
    ".quad pf_entry",
    ".irp n, 15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".quad exc_\\n",
    ".endr",
    ".global exc_table",
    ".text",
    fatal = sym exception_fatal,
);

extern "C" {
    fn probe_read_asm(addr: u64) -> ProbeResult;
    static exc_table: [u64; 32];
    fn sc_irq_event();
    fn sc_irq_other();
}

/// A 64-bit interrupt gate to `h`: selector 0x08, present, DPL 0, type 0xE,
/// IST 0.
fn gate(h: u64) -> Gate {
    Gate { lo: (h & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((h >> 16) & 0xffff) << 48, hi: h >> 32 }
}

#[repr(C)]
struct ProbeResult {
    value: u64,
    faulted: u64,
}

extern "C" fn exception_fatal(vector: u64, a: u64, b: u64) -> ! {
    let boot = crate::boot_info();
    let vcpu = crate::console::current_vcpu().unwrap_or(0);
    if let Some(env) = crate::Env::for_vcpu(boot, vcpu) {
        gprintln!(&env, "guest exception {vector} on vCPU {vcpu} (stack words {a:#x} {b:#x}); cr2 {:#x}", read_cr2());
    }
    arch::exit(boot.exit_port, 100 + u32::try_from(vector).unwrap_or(0));
}

fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reads CR2 (emulated on PVM); no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Loads the IDT (built once, shared by every vCPU).
#[allow(clippy::cast_possible_truncation)]
pub fn load(_env: &Env) {
    if !LOADED.swap(true, Ordering::AcqRel) {
        // SAFETY: the first caller builds the table before any vCPU loads it;
        // the others spin below until it is marked built.
        let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
        for (i, g) in idt.0.iter_mut().enumerate() {
            let h = match i {
                // SAFETY: exc_table is a 32-entry table of handler addresses in rodata.
                0..32 => unsafe { exc_table[i] },
                v if v == usize::from(shm_proto::event::EVENT_VECTOR) => sc_irq_event as *const () as u64,
                _ => sc_irq_other as *const () as u64,
            };
            *g = gate(h);
        }
        BUILT.store(true, Ordering::Release);
    }
    while !BUILT.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let base = core::ptr::addr_of!(IDT) as u64;
    let desc: [u16; 5] = [
        256 * 16 - 1,
        (base & 0xffff) as u16,
        ((base >> 16) & 0xffff) as u16,
        ((base >> 32) & 0xffff) as u16,
        (base >> 48) as u16,
    ];
    // SAFETY: desc is a valid 10-byte IDT descriptor for a table that lives
    // for the whole run.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) desc.as_ptr(), options(readonly, nostack, preserves_flags)) };
}

static BUILT: AtomicBool = AtomicBool::new(false);

/// Reads the u64 at `va`, or `None` if that takes a page fault.
pub fn probe_read(va: u64) -> Option<u64> {
    // SAFETY: the probe either reads `va` or faults and is resumed by the #PF
    // handler with `faulted` set; it touches nothing else.
    let r = unsafe { probe_read_asm(va) };
    (r.faulted == 0).then_some(r.value)
}
