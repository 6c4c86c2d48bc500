//! What only PVM needs: the VIF area registered per vCPU, and the shadow
//! zap a host-side change of a present page-table entry needs there.

#[allow(clippy::wildcard_imports)]
use super::*;

/// PVM: the VIF area MSR (this fork).
pub const MSR_PVM_VIF: u32 = 0x4b56_4d10;

/// Host writes of the VIF MSR need this bit.
pub(super) const PVM_VIF_HOST_WRITE: u64 = 0x400;

/// Drops all shadow pages of a PVM VM by creating and deleting a dummy
/// memslot (KVM_X86_QUIRK_SLOT_ZAP_ALL): ~110–145 µs here (PVM.md §5).
pub struct MemslotZap {
    fd: Arc<VmFd>,
    page: Box<Page>,
    lock: std::sync::Mutex<()>,
}

#[repr(C, align(4096))]
pub(super) struct Page([u8; 4096]);

/// Slot number of the dummy memslot.
pub(super) const ZAP_SLOT: u32 = 9;

/// Its GPA: far above any RAM this VMM gives a guest.
pub(super) const ZAP_GPA: u64 = 0x10_0000_0000;

impl MemslotZap {
    /// A zapper for this VM.
    pub fn new(fd: Arc<VmFd>) -> MemslotZap {
        MemslotZap { fd, page: Box::new(Page([0; 4096])), lock: std::sync::Mutex::new(()) }
    }

    fn set(&self, size: u64) -> Result<(), kvm_ioctls::Error> {
        let r = kvm_userspace_memory_region {
            slot: ZAP_SLOT,
            flags: 0,
            guest_phys_addr: ZAP_GPA,
            memory_size: size,
            userspace_addr: self.page.0.as_ptr() as u64,
        };
        // SAFETY: the page is owned by self and outlives the slot, which is
        // deleted again before set() returns to zap(); the guest never maps
        // ZAP_GPA (it is past RAM, so PTE_UPDATE refuses it).
        unsafe { self.fd.set_user_memory_region(r) }
    }
}

impl sidecore_core::pte::ShadowZap for MemslotZap {
    fn zap(&self) -> Result<(), String> {
        let _g = self.lock.lock().map_err(|_| "zap lock poisoned".to_string())?;
        self.set(4096).map_err(|e| format!("creating the dummy memslot: {e}"))?;
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
            Visibility::Zap(Arc::new(MemslotZap::new(self.fd.clone())))
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
