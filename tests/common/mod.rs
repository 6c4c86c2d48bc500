//! Helpers shared by the integration tests.

/// Whether /dev/kvm is here; says why the test skips when it is not.
pub fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("skipping: /dev/kvm not present on this machine (these tests boot guests under KVM)");
        false
    }
}
