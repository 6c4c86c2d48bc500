//! The Sidecore VMM: command line, VM construction, vCPU loop and exit
//! handling, backend detection. The service core itself is the
//! `sidecore-core` crate; the ABI is `shm-proto`.

pub mod bench;
pub mod elf;
pub mod host;
pub mod hypercalls;
pub mod info;
pub mod kvm_stats;
pub mod pagetable;
pub mod plot;
pub mod run;
pub mod vcpu;
pub mod vm;

/// The bundled guest-agent ELF, built by build.rs.
pub static BUNDLED_GUEST: &[u8] = include_bytes!(env!("SIDECORE_GUEST_ELF"));
