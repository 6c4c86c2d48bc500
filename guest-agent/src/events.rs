//! Posted events and interrupts, guest side (shm-proto's `event` module).
//!
//! Interrupts are on only inside the small assembly routines below, never
//! in Rust code: an interrupt frame is pushed on the current stack, and
//! these routines are entered by `call` and use no red zone, so the frame
//! can never land on a leaf function's red zone (the agent is built for the
//! host target, which has one). That is why no IST stack is needed.
//!
//! On PVM "interrupts on" is VIF byte 0 = 1; an interrupt that came while
//! it was 0 is held with byte 1 set and is delivered by `out %al, $0x80`
//! (PVM.md §7). On hardware KVM it is `sti`/`cli`, and the handler EOIs
//! through the x2APIC EOI MSR (PVM EOIs at delivery, so it is skipped there).
//!
//! The handler counts every event interrupt in the vCPU's
//! `GuestEventLine::interrupts` (the routines keep its address in RSI) and,
//! if the interrupt landed between "interrupts on" and the `hlt`, moves the
//! return address past the `hlt`: the wake-up is never slept through. On
//! hardware KVM `sti`'s shadow already keeps the interrupt off the `hlt`;
//! the handler steps past that `hlt` too, for an emulator that loses the
//! shadow across a world switch (QEMU's TCG SVM in the AMD-V bed: KVM's trace
//! showed the vector injected with the `hlt` as RIP, and about 1 packet in
//! 10^4 then waited for the next one).

use core::sync::atomic::{fence, AtomicBool, Ordering};

use shm_proto::boot::Backend;
use shm_proto::event::GuestEventLine;

use crate::Env;

/// Set once at start on backends whose LAPIC needs an EOI.
#[no_mangle]
static SC_NEED_EOI: AtomicBool = AtomicBool::new(false);

core::arch::global_asm!(
    ".global sc_irq_code_begin",
    ".global sc_wait_irq_pvm",
    ".global sc_halt_pvm",
    ".global sc_wait_irq_hw",
    ".global sc_halt_hw",
    ".global sc_irq_event",
    ".global sc_irq_other",
    // rdi = VIF area, rsi = &GuestEventLine, rdx = interrupt count seen,
    // rcx = TSC deadline.
    "sc_irq_code_begin:",
    "sc_wait_irq_pvm:",
    "    mov byte ptr [rdi], 1",
    "    cmp byte ptr [rdi + 1], 0",
    "    je 1f",
    "    out 0x80, al",
    "1:  call sc_wait_loop",
    "    mov byte ptr [rdi], 0",
    "    ret",
    "sc_halt_pvm:",
    "    mov byte ptr [rdi], 1",
    "sc_halt_win:",
    "    cmp byte ptr [rdi + 1], 0",
    "    je 1f",
    "    out 0x80, al",
    "1:",
    "sc_halt_insn:",
    "    hlt",
    "sc_halt_done:",
    "    mov byte ptr [rdi], 0",
    "    ret",
    "sc_wait_irq_hw:",
    "    sti",
    "    call sc_wait_loop",
    "    cli",
    "    ret",
    // Spins until the handler's count moves past rdx or the TSC passes rcx.
    "sc_wait_loop:",
    "    mov r8, rdx",
    "1:  cmp [rsi + 16], r8",
    "    jne 2f",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    cmp rax, rcx",
    "    jae 2f",
    "    pause",
    "    jmp 1b",
    "2:  ret",
    // sti's one-instruction shadow: no interrupt between sti and hlt.
    "sc_halt_hw:",
    "    sti",
    "sc_halt_hw_insn:",
    "    hlt",
    "sc_halt_hw_done:",
    "    cli",
    "    ret",
    "sc_irq_code_end:",
    // The event vector's handler.
    "sc_irq_event:",
    "    push rax",
    "    push rdx",
    "    mov rax, [rsp + 16]",
    "    lea rdx, [rip + sc_irq_code_begin]",
    "    cmp rax, rdx",
    "    jb 9f",
    "    lea rdx, [rip + sc_irq_code_end]",
    "    cmp rax, rdx",
    "    jae 9f",
    "    lock inc qword ptr [rsi + 16]",
    // On hardware the shadow keeps the interrupt off the hlt; an emulator
    // that loses the shadow across a world switch (QEMU's TCG SVM) delivers
    // it with the hlt as return address, which would sleep through it.
    "    lea rdx, [rip + sc_halt_hw_insn]",
    "    cmp rax, rdx",
    "    jne 7f",
    "    lea rdx, [rip + sc_halt_hw_done]",
    "    mov [rsp + 16], rdx",
    "    jmp 9f",
    "7:  lea rdx, [rip + sc_halt_win]",
    "    cmp rax, rdx",
    "    jb 9f",
    "    lea rdx, [rip + sc_halt_insn]",
    "    cmp rax, rdx",
    "    ja 9f",
    "    lea rdx, [rip + sc_halt_done]",
    "    mov [rsp + 16], rdx",
    "9:  cmp byte ptr [rip + SC_NEED_EOI], 0",
    "    je 8f",
    "    push rcx",
    "    mov ecx, 0x80b",
    "    xor eax, eax",
    "    xor edx, edx",
    "    wrmsr",
    "    pop rcx",
    "8:  pop rdx",
    "    pop rax",
    "    iretq",
    // Any other external vector: ignored.
    "sc_irq_other:",
    "    iretq",
);

extern "C" {
    fn sc_wait_irq_pvm(vif: *mut u8, ev: *const GuestEventLine, seen: u64, deadline: u64);
    fn sc_halt_pvm(vif: *mut u8, ev: *const GuestEventLine);
    fn sc_wait_irq_hw(vif: *mut u8, ev: *const GuestEventLine, seen: u64, deadline: u64);
    fn sc_halt_hw(vif: *mut u8, ev: *const GuestEventLine);
}

const _: () = assert!(core::mem::offset_of!(GuestEventLine, interrupts) == 16);

/// Per-backend setup; call once per vCPU before using the rest.
pub fn init(env: &Env) {
    if env.boot.backend != Backend::Pvm as u32 {
        SC_NEED_EOI.store(true, Ordering::Relaxed);
    }
}

fn vif(env: &Env) -> *mut u8 {
    shm_proto::layout::vcpu_vif_gpa(env.vcpu) as *mut u8
}

fn pvm(env: &Env) -> bool {
    env.boot.backend == Backend::Pvm as u32
}

/// Takes the pending posted events.
pub fn take(env: &Env) -> u64 {
    if env.shared.events.pending.load(Ordering::Relaxed) == 0 {
        return 0;
    }
    env.shared.events.pending.swap(0, Ordering::AcqRel)
}

/// Halts until an interrupt, unless an event is already pending: the guest
/// half of the Dekker protocol (shm-proto's `event` module). Returns the
/// pending events it found instead of halting (0 if it halted).
pub fn idle(env: &Env) -> u64 {
    let g = &env.shared.guest_events;
    g.halting.store(1, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    let p = env.shared.events.pending.swap(0, Ordering::SeqCst);
    if p != 0 {
        g.halting.store(0, Ordering::Relaxed);
        return p;
    }
    halt(env);
    g.halting.store(0, Ordering::Relaxed);
    0
}

/// Halts with interrupts on until one comes (or one already held is
/// delivered).
pub fn halt(env: &Env) {
    let g = &env.shared.guest_events;
    g.halts.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the routines only touch the vCPU's VIF page (identity mapped,
    // writable) and the counter in `g`; interrupts are on only inside them.
    unsafe {
        if pvm(env) {
            sc_halt_pvm(vif(env), g);
        } else {
            sc_halt_hw(vif(env), g);
        }
    }
}

/// Spins with interrupts on until the handler has counted more event
/// interrupts than `seen` or the TSC passes `deadline`; returns the count.
pub fn wait_interrupt(env: &Env, seen: u64, deadline: u64) -> u64 {
    let g = &env.shared.guest_events;
    // SAFETY: as in halt(); the routine also clobbers rax, rdx, r8, which
    // the C ABI lets it.
    unsafe {
        if pvm(env) {
            sc_wait_irq_pvm(vif(env), g, seen, deadline);
        } else {
            sc_wait_irq_hw(vif(env), g, seen, deadline);
        }
    }
    g.interrupts.load(Ordering::Acquire)
}

/// Interrupts taken so far.
pub fn interrupts(env: &Env) -> u64 {
    env.shared.guest_events.interrupts.load(Ordering::Acquire)
}
