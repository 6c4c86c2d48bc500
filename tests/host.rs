//! The host facts the VMM reads, against the real /dev/kvm: the backend,
//! its PVM MSRs, the TSC rate and the CPU lists.

mod common;

use std::path::Path;

use common::kvm_available;
use shm_proto::boot::Backend;
use sidecore_vmm::host::{
    detect_backend, detect_backend_module, format_cpu_list, isolated_cpus, online_cpus, open_kvm, read_pvm_msrs,
    tsc_khz, SYS_MODULE,
};

#[test]
fn real_kvm_backend_and_tsc() {
    if !kvm_available() {
        return;
    }
    let kvm = open_kvm().unwrap();
    let msrs = read_pvm_msrs(&kvm).unwrap();
    let info = detect_backend(&kvm).unwrap();
    let tsc = tsc_khz(&kvm).unwrap();
    let facts = format!(
        "module: {:?}; msrs: {msrs:x?}; backend: {} (signature ok: {}, warnings: {:?}); tsc: {} kHz from {}; online: {}; isolated: {:?}",
        detect_backend_module(Path::new(SYS_MODULE)),
        info.backend.name(),
        info.pvm_signature_ok,
        info.warnings,
        tsc.khz,
        tsc.source,
        format_cpu_list(&online_cpus().unwrap()),
        isolated_cpus().unwrap()
    );
    assert!(tsc.khz > 0, "{facts}");
    // The development and CI machines are PVM (docs/PVM.md).
    if detect_backend_module(Path::new(SYS_MODULE)) == Some(Backend::Pvm) {
        assert_eq!(info.backend, Backend::Pvm, "{facts}");
        assert!(info.pvm_signature_ok, "{facts}");
        assert!(info.warnings.is_empty(), "{facts}");
    }
    assert!(!online_cpus().unwrap().is_empty(), "{facts}");
}
