//! A VM's interrupt plumbing: each vCPU's LAPIC enabled (x2APIC on hardware
//! KVM), the per-vCPU MSI routes with an irqfd each, and the doorbell.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Software-enables the vCPU's LAPIC (SVR = 0x1ff: enabled, spurious vector
/// 0xff); with the reset SVR an MSI is silently dropped (PVM.md §7). With an
/// in-kernel irqchip only the BSP starts runnable: the others are made
/// runnable here, since the VMM sets their registers itself (no INIT/SIPI).
///
/// On hardware KVM the LAPIC also goes to x2APIC mode, so that the guest's
/// handler can EOI with one `wrmsr` (0x80b); PVM EOIs at delivery, and its
/// guest sends none.
pub(super) fn enable_lapic(vcpu: &VcpuFd, i: u32, x2apic: bool) -> Result<(), VmError> {
    const APIC_SVR: usize = 0xf0;
    const MSR_APIC_BASE: u32 = 0x1b;
    if x2apic {
        let msr = |data: u64| {
            Msrs::from_entries(&[kvm_msr_entry { index: MSR_APIC_BASE, data, ..Default::default() }])
                .map_err(|_| irq_err(format!("vCPU {i}: APIC_BASE"))(kvm_ioctls::Error::new(libc::EINVAL)))
        };
        let mut base = msr(0)?;
        vcpu.get_msrs(&mut base).map_err(irq_err(format!("vCPU {i}: KVM_GET_MSRS(APIC_BASE)")))?;
        let cur = base.as_slice().first().map_or(0xfee0_0900, |e| e.data);
        // EN (bit 11) and EXTD (bit 10): xAPIC -> x2APIC.
        vcpu.set_msrs(&msr(cur | 0xc00)?).map_err(irq_err(format!("vCPU {i}: KVM_SET_MSRS(APIC_BASE x2APIC)")))?;
    }
    let mut lapic = vcpu.get_lapic().map_err(irq_err(format!("vCPU {i}: KVM_GET_LAPIC")))?;
    for (k, b) in 0x1ffu32.to_le_bytes().iter().enumerate() {
        lapic.regs[APIC_SVR + k] = libc::c_char::from_ne_bytes([*b]);
    }
    vcpu.set_lapic(&lapic).map_err(irq_err(format!("vCPU {i}: KVM_SET_LAPIC")))?;
    if i > 0 {
        let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
        vcpu.set_mp_state(runnable).map_err(irq_err(format!("vCPU {i}: KVM_SET_MP_STATE")))?;
    }
    Ok(())
}

/// First GSI of the per-vCPU event routes (past the IOAPIC's 24 pins).
pub(super) const EVENT_GSI_BASE: u32 = 24;

/// One MSI route per vCPU (GSI 24 + i -> APIC ID i, `EVENT_VECTOR`, fixed,
/// edge) and an irqfd on each.
pub(super) fn event_irqfds(vm: &VmFd, vcpus: u32) -> Result<Vec<Arc<std::os::fd::OwnedFd>>, VmError> {
    let entries: Vec<kvm_bindings::kvm_irq_routing_entry> = (0..vcpus)
        .map(|i| {
            let mut e = kvm_bindings::kvm_irq_routing_entry {
                gsi: EVENT_GSI_BASE + i,
                type_: kvm_bindings::KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi = kvm_bindings::kvm_irq_routing_msi {
                address_lo: 0xfee0_0000 | (i << 12),
                data: u32::from(shm_proto::event::EVENT_VECTOR),
                ..Default::default()
            };
            e
        })
        .collect();
    let routing = kvm_bindings::KvmIrqRouting::from_entries(&entries).map_err(|_| VmError::Irq {
        what: "building the MSI routing table".into(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    vm.set_gsi_routing(&routing).map_err(irq_err("KVM_SET_GSI_ROUTING"))?;
    let mut out = Vec::new();
    for i in 0..vcpus {
        let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|source| VmError::Irq { what: format!("vCPU {i}: eventfd"), source })?;
        vm.register_irqfd(&efd, EVENT_GSI_BASE + i).map_err(irq_err(format!("vCPU {i}: KVM_IRQFD")))?;
        out.push(owned(efd));
    }
    Ok(out)
}

/// An eventfd that the guest's PIO write to `PORT_DOORBELL` signals inside
/// the kernel (no exit to this VMM).
pub(crate) fn doorbell(vm: &VmFd) -> Result<Arc<std::os::fd::OwnedFd>, VmError> {
    let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Doorbell)?;
    vm.register_ioevent(
        &efd,
        &kvm_ioctls::IoEventAddress::Pio(u64::from(shm_proto::boot::PORT_DOORBELL)),
        kvm_ioctls::NoDatamatch,
    )
    .map_err(|e| VmError::Doorbell(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(owned(efd))
}

/// An eventfd registered with KVM (which holds its own reference), as the
/// descriptor the host side keeps: the sidecore's doorbell, a vCPU's irqfd.
pub(crate) fn owned(efd: vmm_sys_util::eventfd::EventFd) -> Arc<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: into_raw_fd hands over the descriptor EventFd owned; nothing
    // else closes it.
    Arc::new(unsafe { std::os::fd::OwnedFd::from_raw_fd(efd.into_raw_fd()) })
}
