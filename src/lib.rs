//! The Sidecore VMM. Each folder uses only those listed after it:
//!
//! * [`scenarios`]: whole-VM runs (echo, irq, the native-execution probe).
//! * [`vmm`]: one VM's life: construction, the vCPU loop and its exit
//!   path, its devices and its sidecores; the loader of the guest image.
//! * [`daemon`]: one process whose sidecores serve many VMs, its client
//!   (`run --attach`) and its metrics endpoint.
//! * [`bench`]: measuring: the block collector, the floor, reports, plots.
//! * [`host`]: facts about the host: backend, CPUs, TSC; memfd mappings.
//!
//! The service core is the `sidecore-core` crate (folder `sidecore/`), the
//! ABI `shm-proto`; the command line is `main.rs` and `cli/`.

pub mod bench;
pub mod daemon;
pub mod host;
pub mod scenarios;
pub mod vhost;
pub mod vmm;

/// The bundled guest-agent ELF, built by build.rs.
pub static BUNDLED_GUEST: &[u8] = include_bytes!(env!("SIDECORE_GUEST_ELF"));

/// The commit this binary was built from (build.rs: `git rev-parse
/// --short HEAD`, `-dirty` if tracked files had changes, `unknown` outside
/// a git checkout).
pub fn build_commit() -> &'static str {
    env!("SIDECORE_GIT_COMMIT")
}

/// "what failed: cause: cause" for an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}
