//! Guest-physical memory map. The VMM lays guest memory out like this and
//! tells the guest the variable parts in the boot-info page.
//!
//! | GPA | what | guest access |
//! |---|---|---|
//! | `0x0000` | unmapped page (catches null pointers); also [`ZAP_ALIAS_GPA`] | none |
//! | [`BOOT_INFO_GPA`] | boot-info page | read |
//! | [`GDT_GPA`] | GDT (and later IDT, TSS) | read |
//! | [`VCPU_AREA_GPA`] + i × [`VCPU_AREA_STRIDE`] | vCPU i: VIF page, then its stack | read/write |
//! | [`PT_POOL_GPA`] .. + [`PT_POOL_SIZE`] | page-table pool (read-only memslot) | read |
//! | [`IMAGE_GPA`] | guest-agent image | per segment |
//! | after the image, 2 MiB aligned | shared region | read/write |
//! | the rest | free guest RAM | read/write |
//! | [`ZAP_GPA`], on PVM, for a moment | read-only alias of [`ZAP_ALIAS_GPA`] | read |

/// Size of a page; the only page size the guest's tables use.
pub const PAGE_SIZE: u64 = 0x1000;
/// The boot-info page ([`crate::boot::BootInfo`]). Also passed in RDI at entry.
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// The descriptor-table page: GDT at its start.
pub const GDT_GPA: u64 = 0x2000;
/// First per-vCPU area.
pub const VCPU_AREA_GPA: u64 = 0x10000;
/// Bytes per vCPU area: one VIF page, then the stack (the rest).
pub const VCPU_AREA_STRIDE: u64 = 0x8000;
/// Offset of the VIF page inside a vCPU area (page aligned, as PVM requires).
pub const VCPU_VIF_OFFSET: u64 = 0;
/// Most vCPUs a VM can have (bounded by the vCPU areas below the pool).
pub const MAX_VCPUS: u32 = 24;
/// The page-table pool: every table the guest uses. Read-only to the guest.
pub const PT_POOL_GPA: u64 = 0x10_0000;
/// Size of the page-table pool.
pub const PT_POOL_SIZE: u64 = 0x10_0000;
/// On hardware KVM: the page-table pool's trap view, a read-only memslot
/// over the pool's memory where a guest store exits to the VMM as MMIO (see
/// [`crate::boot::BootInfo::pt_trap_gpa`]). Past the largest RAM, so
/// `PTE_UPDATE` refuses to map it.
pub const PT_TRAP_GPA: u64 = 0xc000_0000;
/// On PVM: where the VMM adds, then at once deletes, a one-page memslot to
/// make KVM drop every shadow page after a host-side page-table change.
/// Past the largest RAM, so `PTE_UPDATE` refuses to map it; a guest that
/// maps it by tables of its own reads there, while the slot exists, only
/// [`ZAP_ALIAS_GPA`], read-only (its stores exit to the VMM as MMIO), and
/// otherwise takes MMIO exits.
pub const ZAP_GPA: u64 = 0x10_0000_0000;
/// The guest page that backs the [`ZAP_GPA`] slot: the unmapped null page,
/// the guest's own memory, which nothing else uses.
pub const ZAP_ALIAS_GPA: u64 = 0;
/// Where the guest-agent image is linked.
pub const IMAGE_GPA: u64 = 0x20_0000;
/// Alignment of the shared region.
pub const SHARED_ALIGN: u64 = 0x20_0000;
/// Most guest RAM: the initial identity map of all RAM must fit in the pool
/// with room to spare for the tables the guest's workloads build.
pub const MAX_RAM: u64 = 256 << 20;
/// Guest-physical end of the reserved low area (everything below the pool
/// that is not a vCPU area is reserved too).
pub const LOW_RESERVED_END: u64 = PT_POOL_GPA;

/// Guest-physical address of vCPU `i`'s VIF page.
pub const fn vcpu_vif_gpa(i: u32) -> u64 {
    VCPU_AREA_GPA + (i as u64) * VCPU_AREA_STRIDE + VCPU_VIF_OFFSET
}

/// Initial stack pointer of vCPU `i` (top of its area, 16-byte aligned).
pub const fn vcpu_stack_top(i: u32) -> u64 {
    VCPU_AREA_GPA + (i as u64 + 1) * VCPU_AREA_STRIDE
}

/// Rounds `x` up to a multiple of `align` (a power of two).
pub const fn align_up(x: u64, align: u64) -> u64 {
    (x + align - 1) & !(align - 1)
}

const _: () = assert!(vcpu_stack_top(MAX_VCPUS - 1) <= PT_POOL_GPA);
const _: () = assert!(PT_POOL_GPA + PT_POOL_SIZE <= IMAGE_GPA);
const _: () = assert!(VCPU_AREA_STRIDE.is_multiple_of(PAGE_SIZE));
const _: () = assert!(PT_TRAP_GPA >= MAX_RAM && PT_TRAP_GPA.is_multiple_of(PT_POOL_SIZE));
const _: () = assert!(ZAP_GPA >= MAX_RAM && ZAP_GPA >= PT_TRAP_GPA + PT_POOL_SIZE && ZAP_ALIAS_GPA < BOOT_INFO_GPA);

/// Free RAM the guest-agent uses per vCPU, after one shared sync page at
/// the start of free RAM: first the vCPUs' scratch areas, then their page
/// frames, then their benchmark blocks.
pub const GUEST_SCRATCH_PER_VCPU: u64 = 256 * 1024;
/// Page frames per vCPU the workloads map.
pub const GUEST_FRAMES_PER_VCPU: u64 = 256 * 1024;
/// Bytes per vCPU for its benchmark block.
pub const GUEST_BENCH_PER_VCPU: u64 = 64 * 1024;
/// Free RAM the guest-agent needs per vCPU.
pub const GUEST_FREE_PER_VCPU: u64 = GUEST_SCRATCH_PER_VCPU + GUEST_FRAMES_PER_VCPU + GUEST_BENCH_PER_VCPU;

/// vCPU `i`'s scratch area, given the start of free RAM and the vCPU count.
pub const fn guest_scratch(free_gpa: u64, nr_vcpus: u32, i: u32) -> u64 {
    let _ = nr_vcpus;
    free_gpa + PAGE_SIZE + (i as u64) * GUEST_SCRATCH_PER_VCPU
}

/// vCPU `i`'s page frames.
pub const fn guest_frames(free_gpa: u64, nr_vcpus: u32, i: u32) -> u64 {
    free_gpa + PAGE_SIZE + (nr_vcpus as u64) * GUEST_SCRATCH_PER_VCPU + (i as u64) * GUEST_FRAMES_PER_VCPU
}

/// vCPU `i`'s benchmark block.
pub const fn guest_bench_block(free_gpa: u64, nr_vcpus: u32, i: u32) -> u64 {
    free_gpa
        + PAGE_SIZE
        + (nr_vcpus as u64) * (GUEST_SCRATCH_PER_VCPU + GUEST_FRAMES_PER_VCPU)
        + (i as u64) * GUEST_BENCH_PER_VCPU
}

const _: () = assert!(core::mem::size_of::<crate::bench::BenchBlock>() as u64 <= GUEST_BENCH_PER_VCPU);
