//! Building a VM: guest memory, memslots, the ELF image, the page tables in
//! the read-only pool, the boot-info page, the shared region, and vCPUs set
//! up for 64-bit mode on the detected backend.

use std::fs::File;
use std::sync::Arc;

use kvm_bindings::{
    kvm_msr_entry, kvm_segment, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use shm_proto::boot::{Backend, BootInfo, Workload, CPUID_SIGNATURE, CPUID_SIGNATURE_LEAF, TIMEOUT_CLASSES};
use shm_proto::layout::{
    align_up, vcpu_stack_top, vcpu_vif_gpa, BOOT_INFO_GPA, GDT_GPA, IMAGE_GPA, MAX_RAM, MAX_VCPUS, PAGE_SIZE,
    PT_POOL_GPA, PT_POOL_SIZE, PT_TRAP_GPA, SHARED_ALIGN, VCPU_AREA_GPA, VCPU_AREA_STRIDE, ZAP_ALIAS_GPA, ZAP_GPA,
};
use shm_proto::op::OP_CLASS_COUNT;
use shm_proto::ring::{
    region_size, RegionHeader, FEATURE_CALLS, REGION_MAGIC, RING_SLOTS, VCPU_SHARED_OFFSET, VCPU_SHARED_SIZE,
};
use sidecore_core::cpuid::{set_apic_id, set_signature, CpuidEntry, CpuidTable};
use sidecore_core::hostmem::HostShared;
use sidecore_core::ring::SharedRegion;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::host::{self, BackendInfo};
use crate::vmm::loader::elf::{self, ElfLimits, LoadedImage};
use crate::vmm::loader::pagetable::{PageTables, PtPool, PTE_NX, PTE_RW};

mod cpu;
mod interrupts;
mod memory;
mod pvm;

pub use cpu::GDT;
use cpu::*;
use interrupts::*;
use memory::*;
use pvm::*;
pub use pvm::{MemslotZap, MSR_PVM_VIF};
// For the Linux boot path (crate::vmm::linux), which builds its VM from the
// same parts.
pub(crate) use cpu::{code_segment, data_segment, entry_from_kvm};
pub(crate) use interrupts::doorbell;
pub(crate) use memory::{add_memslot, guest_memory, host_shared, init_region};

/// Scratch free RAM the guest-agent's workloads need, per vCPU, plus one
/// shared page.
pub const FREE_RAM_PER_VCPU: u64 = shm_proto::layout::GUEST_FREE_PER_VCPU;
/// Smallest amount of free RAM a VM gets.
pub const MIN_FREE_RAM: u64 = 1 << 20;

/// Building the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Talking to /dev/kvm failed.
    #[error(transparent)]
    Host(#[from] host::HostError),
    /// KVM speaks another API.
    #[error("KVM API version {0}, expected 12 — this kernel's KVM is not supported")]
    ApiVersion(i32),
    /// KVM_CREATE_VM failed.
    #[error("cannot create a VM (KVM_CREATE_VM)")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("cannot set the TSS address (KVM_SET_TSS_ADDR)")]
    SetTss(#[source] kvm_ioctls::Error),
    /// The vCPU count is out of range.
    #[error("{0} vCPUs: must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u32),
    /// The RAM size is out of range.
    #[error("{mib} MiB of guest RAM: must be between {min} and {max} MiB")]
    MemSize {
        /// Asked for.
        mib: u64,
        /// Least.
        min: u64,
        /// Most.
        max: u64,
    },
    /// Not enough RAM for image + shared region + free RAM.
    #[error("{mib} MiB of guest RAM is too small for this guest: it needs at least {need_mib} MiB (image ends at {image_end:#x}, shared region and {vcpus} vCPUs' scratch follow)")]
    MemTooSmall {
        /// Asked for.
        mib: u64,
        /// Needed.
        need_mib: u64,
        /// End of the image.
        image_end: u64,
        /// vCPU count.
        vcpus: u32,
    },
    /// Creating or mapping the guest memory failed.
    #[error("cannot create guest memory of {0} bytes")]
    Memory(u64, #[source] std::io::Error),
    /// vm-memory refused the mapping.
    #[error("cannot map guest memory")]
    MemoryMap(#[source] vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the region list.
    #[error("cannot set up guest memory regions")]
    MemoryRegions(#[source] vm_memory::GuestRegionCollectionError),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register memslot {slot} ({what})")]
    Memslot {
        /// Slot number.
        slot: u32,
        /// What it holds.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The ELF is unusable.
    #[error("guest image {path}")]
    Elf {
        /// Where it came from.
        path: String,
        /// Why.
        #[source]
        source: elf::ElfError,
    },
    /// Building the page tables failed.
    #[error("cannot build the guest's page tables")]
    PageTables(#[source] crate::vmm::loader::pagetable::PageTableError),
    /// Writing guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    GuestWrite(&'static str, #[source] vm_memory::GuestMemoryError),
    /// A vCPU ioctl failed.
    #[error("vCPU {vcpu}: {what} failed")]
    Vcpu {
        /// vCPU index.
        vcpu: u32,
        /// The ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The PVM VIF area was not taken.
    #[error(
        "vCPU {vcpu}: PVM refused the VIF area at {gpa:#x} ({detail}) — the guest would run emulated, ~1000x slower"
    )]
    Vif {
        /// vCPU index.
        vcpu: u32,
        /// The area.
        gpa: u64,
        /// What went wrong.
        detail: String,
    },
    /// The page-table service could not be set up.
    #[error("page-table service")]
    PteSetup(#[source] sidecore_core::pte::PteSetupError),
    /// PVM's shadow zap needs read-only memslots.
    #[error(
        "this KVM has no read-only memslots (KVM_CAP_READONLY_MEM), which the PVM shadow zap needs so that it maps only the guest's own memory, read-only — use a kvm_pvm build that offers them"
    )]
    ZapNeedsReadonlyMem,
    /// The shared region is unusable.
    #[error("shared region")]
    Region(#[source] sidecore_core::ring::RegionError),
    /// The doorbell eventfd could not be set up.
    #[error("cannot set up the sidecore doorbell (eventfd / KVM_IOEVENTFD)")]
    Doorbell(#[source] std::io::Error),
    /// A memfd could not be made.
    #[error(transparent)]
    Memfd(crate::host::memfd::MemfdError),
    /// The host-shared block could not be made.
    #[error("host-shared state")]
    HostShared(#[source] sidecore_core::hostmem::HostSharedError),
    /// The in-kernel irqchip, MSI routes or irqfds could not be set up.
    #[error("cannot set up interrupts: {what}")]
    Irq {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn irq_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |e| VmError::Irq { what, source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Where the image came from (for messages).
    pub guest_path: String,
    /// The ELF bytes.
    pub guest_elf: Vec<u8>,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Workload to run.
    pub workload: Workload,
    /// Workload arguments.
    pub args: [u64; 8],
    /// Whether the guest should use sidecalls.
    pub sidecalls: bool,
    /// Sidecall reply bound, in µs.
    pub sidecall_timeout_us: u64,
    /// Keep guest memory and host-shared state in memfds a daemon can map
    /// (`run --attach`).
    pub shareable: bool,
}

impl VmSpec {
    /// The bundled guest-agent running `workload` on `vcpus` vCPUs in
    /// `mem_mib` MiB, exit paths only, the default 2 ms sidecall bound.
    pub fn bundled(workload: Workload, vcpus: u32, mem_mib: u64, args: [u64; 8]) -> VmSpec {
        VmSpec {
            guest_path: "bundled guest-agent".into(),
            guest_elf: crate::BUNDLED_GUEST.to_vec(),
            mem_mib,
            vcpus,
            workload,
            args,
            sidecalls: false,
            sidecall_timeout_us: 2000,
            shareable: false,
        }
    }
}

/// Where things are in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// RAM size.
    pub ram_size: u64,
    /// End of the image.
    pub image_end: u64,
    /// Shared region GPA.
    pub shared_gpa: u64,
    /// Shared region size.
    pub shared_size: u64,
    /// First free byte.
    pub free_gpa: u64,
}

/// Computes the layout after the image, or says how much RAM is missing.
pub fn compute_layout(ram_size: u64, image_end: u64, vcpus: u32) -> Result<Layout, u64> {
    let shared_gpa = align_up(image_end, SHARED_ALIGN);
    let shared_size = align_up(region_size(vcpus), PAGE_SIZE);
    let free_gpa = shared_gpa + align_up(shared_size, SHARED_ALIGN);
    let need = free_gpa + (PAGE_SIZE + u64::from(vcpus) * FREE_RAM_PER_VCPU).max(MIN_FREE_RAM);
    if need > ram_size {
        return Err(align_up(need, 1 << 20) >> 20);
    }
    Ok(Layout { ram_size, image_end, shared_gpa, shared_size, free_gpa })
}

/// A built VM, ready to run.
pub struct Vm {
    /// The backend.
    pub backend: BackendInfo,
    /// /dev/kvm.
    pub kvm: Kvm,
    /// The VM (shared with the page-table service's shadow zap).
    pub fd: Arc<VmFd>,
    /// Guest memory (memfd-backed).
    pub mem: Arc<GuestMemoryMmap>,
    /// Layout.
    pub layout: Layout,
    /// The loaded image.
    pub image: LoadedImage,
    /// vCPUs, ready for their first KVM_RUN.
    pub vcpus: Vec<VcpuFd>,
    /// Each vCPU's CPUID table as KVM holds it.
    pub cpuid: Vec<CpuidTable>,
    /// The guest's page tables.
    pub tables: PageTables,
    /// TSC kHz.
    pub tsc_khz: u64,
    /// The shared region, as the host maps it.
    pub region: Arc<SharedRegion>,
    /// The boot-info page as written.
    pub boot: BootInfo,
    /// The guest memory's memfd.
    pub memfd: File,
    /// Host-private state (pool levels, counters).
    pub host: Arc<HostShared>,
    /// Its memfd, when shareable.
    pub host_memfd: Option<File>,
    /// The doorbell eventfd (KVM_IOEVENTFD on `PORT_DOORBELL`) that wakes a
    /// parked sidecore.
    pub doorbell: Arc<std::os::fd::OwnedFd>,
    /// Per vCPU, an eventfd (KVM_IRQFD) whose write interrupts that vCPU
    /// with `EVENT_VECTOR` through the in-kernel LAPIC.
    pub irqfds: Vec<Arc<std::os::fd::OwnedFd>>,
}

/// The pool's trap view for `backend` ([`BootInfo::pt_trap_gpa`]): none on
/// PVM, whose shadow MMU reads guest tables in a read-only memslot; on
/// hardware KVM a separate read-only alias, because the nested page walker
/// may need write access to the guest's tables (VT-x with EPT A/D bits
/// treats every guest paging-structure access as a write; QEMU's emulated
/// AMD walker probes them for write too), so tables in a read-only memslot
/// fault on every walk and KVM emulates every instruction.
pub fn pt_trap_gpa(backend: Backend) -> u64 {
    if backend == Backend::Pvm {
        0
    } else {
        PT_TRAP_GPA
    }
}

/// The boot-info page for this VM.
pub fn boot_info(spec: &VmSpec, backend: Backend, layout: &Layout, tsc_khz: u64) -> BootInfo {
    let mut b = BootInfo::new(backend);
    b.nr_vcpus = spec.vcpus;
    b.workload = spec.workload as u32;
    b.tsc_khz = tsc_khz;
    b.args = spec.args;
    b.ram_size = layout.ram_size;
    b.image_end = layout.image_end;
    b.shared_gpa = layout.shared_gpa;
    b.shared_size = layout.shared_size;
    b.free_gpa = layout.free_gpa;
    b.sidecalls = u32::from(spec.sidecalls);
    b.pt_trap_gpa = pt_trap_gpa(backend);
    let cycles = spec.sidecall_timeout_us.saturating_mul(tsc_khz) / 1000;
    b.sidecall_timeout = [cycles; TIMEOUT_CLASSES];
    debug_assert_eq!(TIMEOUT_CLASSES, OP_CLASS_COUNT);
    b.sidecall_backoff = cycles.saturating_mul(10);
    // A claimed call is given up after 100 ms of a still heartbeat (at least
    // 50 bounds): far past any service's worst case here (a PVM zap is
    // ~150 µs), short enough that a stopped daemon costs a guest little.
    b.sidecore_liveness = cycles.saturating_mul(50).max(tsc_khz.saturating_mul(100));
    b
}

/// Whose CPUID table [`vcpu_cpuid`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CpuidFor {
    /// The guest-agent: the VMM's signature at [`CPUID_SIGNATURE_LEAF`]
    /// (it checks that its answers come from this table).
    Agent,
    /// A Linux guest: KVM's own signature kept and the hypervisor bit
    /// (leaf 1 ECX bit 31) set, so that it finds KVM's paravirtual clock.
    Linux,
}

/// vCPU `i`'s CPUID table: what KVM supports, with the vCPU's APIC ID, for
/// `guest`.
pub(crate) fn vcpu_cpuid(kvm: &Kvm, i: u32, guest: CpuidFor) -> Result<kvm_bindings::CpuId, VmError> {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| VmError::Vcpu {
        vcpu: i,
        what: "KVM_GET_SUPPORTED_CPUID",
        source: e,
    })?;
    let mut entries: Vec<CpuidEntry> = supported.as_slice().iter().map(entry_from_kvm).collect();
    match guest {
        CpuidFor::Agent => set_signature(&mut entries, CPUID_SIGNATURE_LEAF, CPUID_SIGNATURE),
        CpuidFor::Linux => {
            for e in entries.iter_mut().filter(|e| e.function == 1) {
                e.ecx |= 1 << 31;
            }
        }
    }
    set_apic_id(&mut entries, i);
    let kvm_entries: Vec<kvm_bindings::kvm_cpuid_entry2> = entries.iter().map(entry_to_kvm).collect();
    kvm_bindings::CpuId::from_entries(&kvm_entries).map_err(|_| VmError::Vcpu {
        vcpu: i,
        what: "building the CPUID table",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

impl Vm {
    /// Builds the VM.
    pub fn build(spec: &VmSpec) -> Result<Vm, VmError> {
        if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(spec.vcpus));
        }
        let (min_mib, max_mib) = (4, MAX_RAM >> 20);
        if spec.mem_mib < min_mib || spec.mem_mib > max_mib {
            return Err(VmError::MemSize { mib: spec.mem_mib, min: min_mib, max: max_mib });
        }
        let ram = spec.mem_mib << 20;
        let image =
            elf::check_elf(&spec.guest_elf, &ElfLimits { ram_size: ram, image_gpa: IMAGE_GPA, image_limit: ram })
                .map_err(|source| VmError::Elf { path: spec.guest_path.clone(), source })?;
        let layout = compute_layout(ram, image.image_end, spec.vcpus).map_err(|need_mib| VmError::MemTooSmall {
            mib: spec.mem_mib,
            need_mib,
            image_end: image.image_end,
            vcpus: spec.vcpus,
        })?;

        let kvm = host::open_kvm()?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        let backend = host::detect_backend(&kvm)?;
        let tsc_khz = host::tsc_khz(&kvm)?.khz;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        if backend.backend == Backend::Vmx {
            fd.set_tss_address(0xfffb_d000).map_err(VmError::SetTss)?;
        }
        // Before any vCPU: the LAPICs are made with them.
        fd.create_irq_chip().map_err(irq_err("KVM_CREATE_IRQCHIP"))?;

        let (mem, memfd) = guest_memory(ram)?;
        let pool_end = PT_POOL_GPA + PT_POOL_SIZE;
        let trap_gpa = pt_trap_gpa(backend.backend);
        add_memslot(&fd, &mem, 0, 0, 0, PT_POOL_GPA, 0, "low memory")?;
        // The pool is its own trap path (read-only) unless a trap view is.
        let pool_flags = if trap_gpa == 0 { KVM_MEM_READONLY } else { 0 };
        add_memslot(&fd, &mem, 1, PT_POOL_GPA, PT_POOL_GPA, PT_POOL_SIZE, pool_flags, "page-table pool")?;
        if trap_gpa != 0 {
            let what = "page-table pool's trap view";
            add_memslot(&fd, &mem, 3, trap_gpa, PT_POOL_GPA, PT_POOL_SIZE, KVM_MEM_READONLY, what)?;
        }
        add_memslot(&fd, &mem, 2, pool_end, pool_end, ram - pool_end, 0, "image, shared region and free RAM")?;

        let image =
            elf::load_elf(&mem, &spec.guest_elf, &ElfLimits { ram_size: ram, image_gpa: IMAGE_GPA, image_limit: ram })
                .map_err(|source| VmError::Elf { path: spec.guest_path.clone(), source })?;

        let mut tables = PageTables::new(&mem, PtPool::new(PT_POOL_GPA, PT_POOL_SIZE)).map_err(VmError::PageTables)?;
        let mut gpa = PAGE_SIZE;
        while gpa < ram {
            if let Some(flags) = identity_flags(gpa, spec.vcpus, &image, &layout, trap_gpa) {
                tables.map(&mem, gpa, gpa, flags).map_err(VmError::PageTables)?;
            }
            gpa += PAGE_SIZE;
        }
        if trap_gpa != 0 {
            for off in (0..PT_POOL_SIZE).step_by(4096) {
                tables.map(&mem, trap_gpa + off, trap_gpa + off, PTE_RW | PTE_NX).map_err(VmError::PageTables)?;
            }
        }

        let mut boot = boot_info(spec, backend.backend, &layout, tsc_khz);
        boot.pt_root = tables.root;
        boot.pt_pool_free = tables.pool.first_free();
        let boot_ptr =
            mem.get_host_address(GuestAddress(BOOT_INFO_GPA)).map_err(|e| VmError::GuestWrite("boot-info page", e))?;
        // SAFETY: the boot-info page is a page-aligned page inside guest memory
        // (BOOT_INFO_GPA is below the smallest RAM size) and no vCPU runs yet,
        // so nothing else accesses it.
        unsafe { boot_ptr.cast::<BootInfo>().write(boot) };
        for (i, d) in GDT.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(GDT_GPA + 8 * i as u64)).map_err(|e| VmError::GuestWrite("GDT", e))?;
        }
        let region = init_region(&mem, &layout, spec.vcpus)?;
        let (host, host_memfd) = host_shared(tables.pool.levels().len(), spec.shareable)?;
        for (slot, l) in host.levels().iter().zip(tables.pool.levels()) {
            slot.store(*l, std::sync::atomic::Ordering::Relaxed);
        }

        let doorbell = doorbell(&fd)?;
        let mut vm = Vm {
            doorbell,
            backend,
            kvm,
            fd: Arc::new(fd),
            mem: Arc::new(mem),
            layout,
            image,
            vcpus: Vec::new(),
            cpuid: Vec::new(),
            tables,
            tsc_khz,
            region,
            boot,
            memfd,
            host,
            host_memfd,
            irqfds: Vec::new(),
        };
        for i in 0..spec.vcpus {
            vm.add_vcpu(i)?;
        }
        vm.irqfds = event_irqfds(&vm.fd, spec.vcpus)?;
        Ok(vm)
    }

    fn add_vcpu(&mut self, i: u32) -> Result<(), VmError> {
        let err = |what| move |source| VmError::Vcpu { vcpu: i, what, source };
        let vcpu = self.fd.create_vcpu(u64::from(i)).map_err(err("KVM_CREATE_VCPU"))?;

        let cpuid = vcpu_cpuid(&self.kvm, i, CpuidFor::Agent)?;
        vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;

        let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        sregs.cr0 = 0x8005_0033; // PG AM WP NE ET MP PE
        sregs.cr3 = self.tables.root;
        sregs.cr4 = 0x620; // PAE OSFXSR OSXMMEXCPT: no SMEP/SMAP/LA57 (PVM triple-faults)
        sregs.efer = 0xd01; // NXE LMA LME SCE
        sregs.cs = code_segment();
        let ds = data_segment();
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (ds, ds, ds, ds, ds);
        sregs.gdt.base = GDT_GPA;
        sregs.gdt.limit = u16::try_from(GDT.len() * 8 - 1).unwrap_or(23);
        sregs.idt.base = GDT_GPA + 0x800;
        sregs.idt.limit = 0;
        vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;

        let regs = kvm_bindings::kvm_regs {
            rip: self.image.entry,
            rsp: vcpu_stack_top(i),
            rdi: BOOT_INFO_GPA,
            rsi: u64::from(i),
            rflags: 0x2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;

        if self.backend.backend == Backend::Pvm {
            register_vif(&vcpu, i)?;
        }
        enable_lapic(&vcpu, i, self.backend.backend != Backend::Pvm)?;
        // What KVM holds now (it may have adjusted dynamic bits) is what the
        // sidecore must answer.
        let held = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(err("KVM_GET_CPUID2"))?;
        self.cpuid.push(CpuidTable::for_this_host(held.as_slice().iter().map(entry_from_kvm).collect()));
        self.vcpus.push(vcpu);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_shared_region_after_image_and_checks_ram() {
        let l = compute_layout(64 << 20, 0x21_0000, 2).unwrap();
        assert_eq!(l.shared_gpa, 0x40_0000);
        assert_eq!(l.free_gpa, 0x60_0000);
        assert!(l.shared_size >= region_size(2));
        assert_eq!(compute_layout(6 << 20, 0x21_0000, 2), Err(8));
        assert_eq!(compute_layout(8 << 20, 0x21_0000, 2).map(|l| l.free_gpa), Ok(0x60_0000));
    }

    #[test]
    fn boot_info_names_backend_instructions_and_timeouts() {
        let spec = VmSpec {
            guest_path: "x".into(),
            guest_elf: vec![],
            mem_mib: 64,
            vcpus: 2,
            workload: Workload::Selftest,
            args: [0; 8],
            sidecalls: true,
            sidecall_timeout_us: 1000,
            shareable: false,
        };
        let l = compute_layout(64 << 20, 0x21_0000, 2).unwrap();
        let b = boot_info(&spec, Backend::Vmx, &l, 2_000_000);
        assert_eq!(b.check(), Ok(()));
        assert_eq!(b.hypercall_insn, shm_proto::boot::HypercallInsn::Vmcall as u32);
        assert_eq!(b.sidecall_timeout[1], 2_000_000);
        assert_eq!(b.sidecalls, 1);
        assert_eq!(b.nr_vcpus, 2);
        assert_eq!(b.pt_trap_gpa, PT_TRAP_GPA);
    }

    /// VT-x has no test bed: its choices are checked here. On both hardware
    /// backends the guest's tables live in ordinary memory it maps read-only
    /// and the trap path goes through the read-only alias (EPT with A/D bits
    /// treats every guest paging-structure access as a write); on PVM the
    /// pool is its own trap path.
    #[test]
    fn hardware_backends_walk_tables_in_writable_memory_and_trap_through_the_alias() {
        let l = compute_layout(64 << 20, 0x21_0000, 1).unwrap();
        let image = crate::vmm::loader::elf::LoadedImage {
            entry: 0x20_0000,
            image_end: 0x21_0000,
            segments: vec![crate::vmm::loader::elf::Segment {
                gpa: 0x20_0000,
                mem_size: 0x1_0000,
                writable: false,
                executable: true,
            }],
        };
        let pool_page = PT_POOL_GPA + 0x3000;
        for hw in [Backend::Vmx, Backend::Svm] {
            let trap = pt_trap_gpa(hw);
            assert_eq!(trap, PT_TRAP_GPA, "{hw:?}");
            let f = identity_flags(pool_page, 1, &image, &l, trap).unwrap();
            assert_eq!(f & PTE_RW, 0, "{hw:?}: the pool must be read-only in the guest's tables");
        }
        assert_eq!(pt_trap_gpa(Backend::Pvm), 0);
        let f = identity_flags(pool_page, 1, &image, &l, 0).unwrap();
        assert_ne!(f & PTE_RW, 0, "PVM: a store into the pool is the trap path");
        // The alias is past RAM: PTE_UPDATE can never map it.
        assert!(PT_TRAP_GPA >= l.ram_size);
    }
}
