//! Sidecore's guest-agent: a freestanding 64-bit guest.
//!
//! The VMM identity-maps guest RAM, loads this image at
//! `shm_proto::layout::IMAGE_GPA` and enters `_start` with RDI = the
//! boot-info page, RSI = the vCPU index and RSP = the vCPU's stack. The agent
//! reads the boot-info page, runs the workload it names, prints through the
//! console port and reports its status through the exit port.
#![no_std]
#![no_main]

mod arch;
mod bench;
mod chaos;
mod client;
mod console;
mod cpuidstate;
mod cpustate;
mod echo;
mod events;
mod gpascan;
mod idt;
mod mem;
mod pagetable;
mod ptcheck;
mod rng;
mod selftest;
mod toggle;
mod workload;

use shm_proto::boot::{BootInfo, Workload};
use shm_proto::ring::{RegionHeader, VcpuShared};

core::arch::global_asm!(
    ".section .text.boot, \"ax\"",
    ".global _start",
    "_start:",
    "    cld",
    "    call {main}",
    "2:  hlt",
    "    jmp 2b",
    main = sym guest_main,
);

/// Everything a workload needs about its VM and vCPU.
pub struct Env {
    /// The boot-info page.
    pub boot: &'static BootInfo,
    /// This vCPU's index.
    pub vcpu: u32,
    /// The shared region's header.
    pub header: &'static RegionHeader,
    /// This vCPU's shared block.
    pub shared: &'static VcpuShared,
}

/// Exit status for a boot-info page the agent cannot use.
const STATUS_BAD_BOOT_INFO: u32 = 90;
/// Exit status for an unknown workload number.
const STATUS_BAD_WORKLOAD: u32 = 91;
/// Exit status after a panic.
pub const STATUS_PANIC: u32 = 101;

/// The boot-info page, at its fixed GPA.
pub fn boot_info() -> &'static BootInfo {
    // SAFETY: the VMM identity-maps the boot-info page read-only at
    // BOOT_INFO_GPA and never changes it while the guest runs.
    unsafe { &*(shm_proto::layout::BOOT_INFO_GPA as *const BootInfo) }
}

impl Env {
    /// The environment of vCPU `vcpu`, if the boot-info page is sound.
    pub fn for_vcpu(boot: &'static BootInfo, vcpu: u32) -> Option<Env> {
        if boot.check().is_err()
            || vcpu >= boot.nr_vcpus
            || boot.shared_size < shm_proto::ring::region_size(boot.nr_vcpus)
        {
            return None;
        }
        // SAFETY: the region lies in identity-mapped RAM at the GPA the
        // boot-info page names (checked large enough for nr_vcpus above); its
        // layout is the shm-proto ABI and every shared field is atomic.
        let header: &'static RegionHeader = unsafe { &*(boot.shared_gpa as *const RegionHeader) };
        // SAFETY: as above; vcpu < nr_vcpus so the block is inside the region.
        let shared: &'static VcpuShared =
            unsafe { &*((boot.shared_gpa + shm_proto::ring::vcpu_offset(vcpu)) as *const VcpuShared) };
        Some(Env { boot, vcpu, header, shared })
    }
}

extern "C" fn guest_main(boot_gpa: u64, vcpu: u64) -> ! {
    let boot = boot_info();
    let env = match u32::try_from(vcpu) {
        Ok(v) if boot_gpa == shm_proto::layout::BOOT_INFO_GPA => Env::for_vcpu(boot, v),
        _ => None,
    };
    let Some(env) = env else { arch::exit(shm_proto::boot::PORT_EXIT, STATUS_BAD_BOOT_INFO) };
    idt::load(&env);
    cpustate::init(env.vcpu);
    events::init(&env);
    let status = match Workload::from_u32(boot.workload) {
        Some(Workload::Hello) => workload::hello(&env),
        Some(Workload::Spin) => workload::spin(&env),
        Some(Workload::Selftest) => selftest::run(&env),
        Some(Workload::Bench) => bench::run(&env, false),
        Some(Workload::Pagefault) => bench::run(&env, true),
        Some(Workload::Chaos) => chaos::run(&env),
        Some(Workload::Wake) => workload::wake(&env),
        Some(Workload::Echo) => echo::echo(&env),
        Some(Workload::Irq) => echo::irq(&env),
        Some(Workload::Gpascan) => gpascan::run(&env),
        Some(Workload::Toggle) => toggle::run(&env),
        None => STATUS_BAD_WORKLOAD,
    };
    arch::exit(boot.exit_port, status)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::print_panic(info);
    arch::exit(shm_proto::boot::PORT_EXIT, STATUS_PANIC)
}

/// The prebuilt `core` is compiled with unwinding; a panic=abort debug build
/// still references this symbol.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
