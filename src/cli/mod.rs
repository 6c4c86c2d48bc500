//! The command line's work: each subcommand's checks of its arguments, the
//! library calls, and what is printed (tables, progress, JSON). `main.rs`
//! holds the argument types and the dispatch.

pub(crate) mod bench;
pub(crate) mod daemon;
pub(crate) mod echo;
pub(crate) mod info;
pub(crate) mod run;

use sidecore_vmm::daemon::DaemonError;
use sidecore_vmm::error_chain;
use sidecore_vmm::vmm::loader::elf::ElfError;
use sidecore_vmm::vmm::loader::pagetable::PageTableError;
use sidecore_vmm::vmm::vm::VmError;
use sidecore_vmm::vmm::RunError;

/// A run's error as the command line says it: the library says what failed;
/// this adds the flag to change, where one is to blame.
pub(crate) fn run_error(e: &RunError) -> String {
    let flag = match e {
        RunError::Vm(VmError::VcpuCount(_)) => Some("--vcpus"),
        RunError::Vm(
            VmError::MemSize { .. }
            | VmError::MemTooSmall { .. }
            | VmError::Elf { source: ElfError::SegmentPastRam { .. }, .. }
            | VmError::PageTables(PageTableError::PoolFull { .. }),
        ) => Some("--mem"),
        RunError::Attach(_) => Some("--attach"),
        RunError::PhaseSignal(_) => Some("--latency-phases"),
        _ => None,
    };
    with_flag(flag, &error_chain(e))
}

/// The daemon's error as the command line says it.
pub(crate) fn daemon_error(e: &DaemonError) -> String {
    let flag = match e {
        DaemonError::InUse(_) | DaemonError::Bind { .. } | DaemonError::NotASocket(_) => Some("--socket"),
        DaemonError::Group(_) => Some("--group"),
        DaemonError::Metrics { .. } => Some("--metrics"),
        _ => None,
    };
    with_flag(flag, &error_chain(e))
}

fn with_flag(flag: Option<&str>, msg: &str) -> String {
    match flag {
        Some(f) => format!("{f}: {msg}"),
        None => msg.to_string(),
    }
}
