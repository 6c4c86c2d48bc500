//! Helpers shared by the integration tests.

use std::io::Write;

pub mod daemon;
pub mod hostile;

/// Records that the running test skips, and why: printed, and appended to
/// the file `SIDECORE_TEST_SKIPS` names (the test runners count these as
/// skipped, not passed). The caller returns right after.
pub fn skip(why: &str) {
    let name = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("skipping {name}: {why}");
    if let Some(path) = std::env::var_os("SIDECORE_TEST_SKIPS") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{name}: {why}");
        }
    }
}

/// Whether /dev/kvm is here; records the skip when it is not.
pub fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        true
    } else {
        skip("/dev/kvm not present on this machine (these tests boot guests under KVM)");
        false
    }
}
