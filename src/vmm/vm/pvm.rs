//! What only PVM needs: the VIF area registered per vCPU, and the shadow
//! zap a host-side change of a present page-table entry needs there.

#[allow(clippy::wildcard_imports)]
use super::*;

/// PVM: the VIF area MSR (this fork).
pub const MSR_PVM_VIF: u32 = 0x4b56_4d10;

/// Host writes of the VIF MSR need this bit.
pub(super) const PVM_VIF_HOST_WRITE: u64 = 0x400;

/// Drops all shadow pages of a PVM VM by creating and deleting a dummy
/// memslot (KVM_X86_QUIRK_SLOT_ZAP_ALL): ~30 µs on an idle VM, 110–145 µs
/// with shadow pages to drop (PVM.md §5), plus the guest's refaults.
///
/// The slot never maps memory that is not the guest's: it is a read-only
/// alias of the guest's own page at [`ZAP_ALIAS_GPA`]. A guest that maps
/// [`ZAP_GPA`] with tables of its own and races the zap reads there only its
/// own page, and its stores exit to the VMM as MMIO. The daemon never zaps
/// (it has no VM fd): it sends changes and unmaps to the exit path, which
/// runs here, in the guest's own VMM.
pub struct MemslotZap {
    // A slot left behind by a failed delete lives as long as the VM fd;
    // the guest memory it aliases outlives the VM fd as the RAM slots' does
    // (the VM holds both, and `_mem` keeps this mapping too).
    fd: Arc<VmFd>,
    /// Host address of the guest page at ZAP_ALIAS_GPA.
    alias: u64,
    /// Keeps the guest memory, and so `alias`, mapped.
    _mem: Arc<GuestMemoryMmap>,
    lock: std::sync::Mutex<()>,
}

/// Slot number of the dummy memslot.
pub(super) const ZAP_SLOT: u32 = 9;

impl MemslotZap {
    /// A zapper for this VM, whose memory is `mem`. `readonly_mem`: whether
    /// KVM offers read-only memslots (KVM_CAP_READONLY_MEM); without them
    /// there is no zap that shows the guest only its own memory.
    pub fn new(fd: Arc<VmFd>, mem: Arc<GuestMemoryMmap>, readonly_mem: bool) -> Result<MemslotZap, VmError> {
        if !readonly_mem {
            return Err(VmError::ZapNeedsReadonlyMem);
        }
        let alias = host_addr(&mem, ZAP_ALIAS_GPA)?;
        Ok(MemslotZap { fd, alias, _mem: mem, lock: std::sync::Mutex::new(()) })
    }

    fn set(&self, size: u64) -> Result<(), kvm_ioctls::Error> {
        let r = kvm_userspace_memory_region {
            slot: ZAP_SLOT,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: ZAP_GPA,
            memory_size: size,
            userspace_addr: self.alias,
        };
        // SAFETY: `alias` is the host mapping of the guest's own page at
        // ZAP_ALIAS_GPA, kept mapped by `_mem` for as long as self (and so
        // the VM fd) lives. The slot is read-only: through it the guest can
        // read only its own page (it may map ZAP_GPA with tables of its own
        // and race the zap), and its stores there exit to the VMM as MMIO.
        // No host memory outside the guest's is ever mapped.
        unsafe { self.fd.set_user_memory_region(r) }
    }
}

impl sidecore_core::pte::ShadowZap for MemslotZap {
    fn zap(&self) -> Result<(), String> {
        let _g = self.lock.lock().map_err(|_| "zap lock poisoned".to_string())?;
        self.set(PAGE_SIZE).map_err(|e| format!("creating the dummy memslot: {e}"))?;
        self.set(0).map_err(|e| format!("deleting the dummy memslot: {e}"))
    }
}

impl Vm {
    /// The page-table service for this VM: validates against its layout,
    /// knows the level of every pool page, and on PVM zaps shadow pages after
    /// a change or unmap.
    pub fn pte_service(&self) -> Result<sidecore_core::pte::PteService, VmError> {
        use sidecore_core::pte::{PteLayout, PteService, Visibility};
        let layout = PteLayout {
            ram_size: self.layout.ram_size,
            pool_gpa: PT_POOL_GPA,
            pool_size: PT_POOL_SIZE,
            image_gpa: IMAGE_GPA,
            image_end: self.layout.image_end,
            free_gpa: self.layout.free_gpa,
        };
        let pool = self.mem.get_host_address(GuestAddress(PT_POOL_GPA)).map_err(|e| VmError::GuestWrite("pool", e))?;
        let pool = std::ptr::NonNull::new(pool).ok_or(VmError::GuestWrite(
            "pool",
            vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(PT_POOL_GPA)),
        ))?;
        let visibility = if self.backend.backend == Backend::Pvm {
            let readonly_mem = self.kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem);
            Visibility::Zap(Arc::new(MemslotZap::new(self.fd.clone(), self.mem.clone(), readonly_mem)?))
        } else {
            Visibility::GuestFlush
        };
        let owner: Arc<dyn std::any::Any + Send + Sync> = self.mem.clone();
        // SAFETY: the pool is PT_POOL_SIZE bytes of guest memory mapped for as
        // long as `owner` (the guest memory) lives.
        unsafe { PteService::new(layout, self.host.clone(), pool, owner, visibility) }.map_err(VmError::PteSetup)
    }
}

pub(super) fn register_vif(vcpu: &VcpuFd, i: u32) -> Result<(), VmError> {
    let gpa = vcpu_vif_gpa(i);
    let vif_err = |detail: String| VmError::Vif { vcpu: i, gpa, detail };
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_PVM_VIF,
        data: gpa | PVM_VIF_HOST_WRITE,
        ..Default::default()
    }])
    .map_err(|e| vif_err(format!("{e:?}")))?;
    let n = vcpu.set_msrs(&msrs).map_err(|e| vif_err(format!("KVM_SET_MSRS: {e}")))?;
    if n != 1 {
        return Err(vif_err(format!("KVM_SET_MSRS set {n} of 1 MSRs")));
    }
    let mut back = Msrs::from_entries(&[kvm_msr_entry { index: MSR_PVM_VIF, ..Default::default() }])
        .map_err(|e| vif_err(format!("{e:?}")))?;
    let n = vcpu.get_msrs(&mut back).map_err(|e| vif_err(format!("KVM_GET_MSRS: {e}")))?;
    let got = back.as_slice().first().map_or(0, |e| e.data);
    if n != 1 || got & !0xfff != gpa {
        return Err(vif_err(format!("MSR reads back {got:#x}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidecore_core::pte::ShadowZap;

    #[test]
    fn zap_needs_read_only_memslots_and_leaves_zap_gpa_free() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipping: /dev/kvm not present (this test makes a VM)");
            return;
        }
        let vm = Vm::build(&VmSpec::bundled(Workload::Hello, 1, 16, [0; 8])).expect("build a VM");
        let no_ro = MemslotZap::new(vm.fd.clone(), vm.mem.clone(), false);
        assert!(matches!(no_ro, Err(VmError::ZapNeedsReadonlyMem)));
        assert!(VmError::ZapNeedsReadonlyMem.to_string().contains("KVM_CAP_READONLY_MEM"));
        let z = MemslotZap::new(vm.fd.clone(), vm.mem.clone(), true).expect("zapper");
        // Through the alias the slot shows the guest's own page.
        assert_eq!(z.alias, host_addr(&vm.mem, ZAP_ALIAS_GPA).expect("alias"));
        let mut us: Vec<u128> = (0..200)
            .map(|_| {
                let t = std::time::Instant::now();
                z.zap().expect("zap");
                t.elapsed().as_micros()
            })
            .collect();
        us.sort_unstable();
        eprintln!("zap on {}: median {} us, p90 {} us", vm.backend.backend.name(), us[100], us[180]);
        // The slot is gone after each zap: a slot of our own fits at ZAP_GPA.
        let r = kvm_userspace_memory_region {
            slot: ZAP_SLOT + 1,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: ZAP_GPA,
            memory_size: PAGE_SIZE,
            userspace_addr: z.alias,
        };
        // SAFETY: a read-only view of the VM's own page, kept mapped by `vm`;
        // no vCPU runs.
        unsafe { vm.fd.set_user_memory_region(r) }.expect("ZAP_GPA is free after the zap");
    }
}
