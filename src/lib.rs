//! The Sidecore VMM: command line, VM construction, vCPU loop and exit
//! handling, backend detection. The service core itself is the
//! `sidecore-core` crate; the ABI is `shm-proto`.

pub mod bench;
pub mod daemon;
pub mod devices;
pub mod elf;
pub mod host;
pub mod hypercalls;
pub mod info;
pub mod kvm_stats;
pub mod memfd;
pub mod metrics;
pub mod pagetable;
pub mod phases;
pub mod plot;
pub mod run;
pub mod scenarios;
pub mod vcpu;
pub mod vm;

/// The bundled guest-agent ELF, built by build.rs.
pub static BUNDLED_GUEST: &[u8] = include_bytes!(env!("SIDECORE_GUEST_ELF"));

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
