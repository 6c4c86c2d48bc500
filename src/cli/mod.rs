//! The command line's work: each subcommand's checks of its arguments, the
//! library calls, and what is printed (tables, progress, JSON). `main.rs`
//! holds the argument types and the dispatch.

pub(crate) mod bench;
pub(crate) mod daemon;
pub(crate) mod docs;
pub(crate) mod echo;
pub(crate) mod info;
pub(crate) mod run;

use sidecore_vmm::daemon::DaemonError;
use sidecore_vmm::error_chain;
use sidecore_vmm::vmm::loader::elf::ElfError;
use sidecore_vmm::vmm::loader::pagetable::PageTableError;
use sidecore_vmm::vmm::vm::VmError;
use sidecore_vmm::vmm::RunError;

/// Exit status of a usage error (clap's own, too).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit status of a failure doing the work.
pub(crate) const EXIT_RUNTIME: u8 = 1;

/// Why a command failed, which decides its exit status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The arguments are wrong (exit status 2): changing them fixes it.
    #[error("{0}")]
    Usage(String),
    /// Doing the work failed (exit status 1): KVM, I/O, the daemon.
    #[error("{0}")]
    Runtime(String),
}

impl CliError {
    pub(crate) fn exit_status(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Runtime(_) => EXIT_RUNTIME,
        }
    }
}

/// The library's and `cli::bench`'s messages: failures of the work.
impl From<String> for CliError {
    fn from(msg: String) -> Self {
        CliError::Runtime(msg)
    }
}

/// A CPU list option's value (`0`, `2-3`, `0,2`): sorted, unique, not empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CpuList(pub(crate) Vec<usize>);

/// Parses a CPU list option for clap, so a bad list is a usage error.
pub(crate) fn parse_cpu_list_arg(s: &str) -> Result<CpuList, String> {
    let cpus = sidecore_vmm::host::parse_cpu_list(s).map_err(|e| error_chain(&e))?;
    if cpus.is_empty() {
        return Err("the list is empty: name at least one CPU (e.g. 0 or 2-3)".into());
    }
    Ok(CpuList(cpus))
}

/// The flag to change for a run's error, if the arguments are to blame.
fn run_error_flag(e: &RunError) -> Option<&'static str> {
    match e {
        RunError::Vm(VmError::VcpuCount(_)) => Some("--vcpus"),
        RunError::Vm(
            VmError::MemSize { .. }
            | VmError::MemTooSmall { .. }
            | VmError::Elf { source: ElfError::SegmentPastRam { .. }, .. }
            | VmError::PageTables(PageTableError::PoolFull { .. }),
        ) => Some("--mem"),
        RunError::CpuNotOnline { what, .. } => Some(what),
        RunError::Attach(_) => Some("--attach"),
        RunError::PhaseSignal(_) => Some("--latency-phases"),
        _ => None,
    }
}

/// A run's error as the command line says it: the library says what failed;
/// this adds the flag to change, where one is to blame.
pub(crate) fn run_error(e: &RunError) -> String {
    match e {
        // The message names the option already.
        RunError::CpuNotOnline { .. } => error_chain(e),
        _ => with_flag(run_error_flag(e), &error_chain(e)),
    }
}

/// A run's error with its kind: a usage error when a CPU, vCPU count or
/// RAM size the arguments chose cannot work; else the work failed (an
/// unreachable daemon or an unreadable guest included).
pub(crate) fn run_cli_error(e: &RunError) -> CliError {
    let msg = run_error(e);
    match run_error_flag(e) {
        Some("--attach" | "--latency-phases") | None => CliError::Runtime(msg),
        Some(_) => CliError::Usage(msg),
    }
}

/// The daemon's error as the command line says it (all failures of the
/// work: a socket in use or a group that does not exist is the host's state).
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

/// The warning for vCPUs pinned where a sidecore runs, if any is: `vcpu_cpus[i]`
/// is vCPU i's CPU. Not an error (a one-CPU host has no choice), but the
/// sidecore polls its rings without pause, so a vCPU sharing its core gets
/// only the time the scheduler takes from the sidecore.
pub(crate) fn shared_core_warning(sidecores: &[usize], vcpu_cpus: &[usize], fix: &str) -> Option<String> {
    let shared: Vec<String> = vcpu_cpus
        .iter()
        .enumerate()
        .filter(|(_, c)| sidecores.contains(c))
        .map(|(i, c)| format!("vCPU {i} on CPU {c}"))
        .collect();
    if shared.is_empty() {
        return None;
    }
    Some(format!(
        "sharing a core with a sidecore: {} — the sidecore polls its rings without pause, so it steals the \
         vCPU's time (the guest and its calls run slower, and timings mean little). {fix}",
        shared.join(", ")
    ))
}

/// Logs [`shared_core_warning`]'s warning, if there is one.
pub(crate) fn warn_shared_cores(sidecores: &[usize], vcpu_cpus: &[usize], fix: &str) {
    if let Some(w) = shared_core_warning(sidecores, vcpu_cpus, fix) {
        tracing::warn!("{w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_cores_are_named_per_vcpu() {
        assert_eq!(shared_core_warning(&[0], &[1, 2], "fix"), None);
        assert_eq!(shared_core_warning(&[], &[0], "fix"), None);
        let w = shared_core_warning(&[0, 2], &[1, 2, 0], "Do X.").expect("vCPUs 1 and 2 share");
        assert!(w.starts_with("sharing a core with a sidecore: vCPU 1 on CPU 2, vCPU 2 on CPU 0 — "), "{w}");
        assert!(w.ends_with("Do X."), "{w}");
    }

    #[test]
    fn cpu_list_args_reject_empty_and_bad_lists() {
        assert_eq!(parse_cpu_list_arg("2-3"), Ok(CpuList(vec![2, 3])));
        assert!(parse_cpu_list_arg("").is_err());
        assert!(parse_cpu_list_arg(" ").is_err());
        assert!(parse_cpu_list_arg("3-1").is_err());
        assert!(parse_cpu_list_arg("x").is_err());
    }

    #[test]
    fn run_errors_blame_arguments_only_where_they_are_to_blame() {
        let usage = run_cli_error(&RunError::Vm(VmError::VcpuCount(99)));
        assert!(matches!(&usage, CliError::Usage(m) if m.starts_with("--vcpus: ")), "{usage:?}");
        let offline = run_cli_error(&RunError::CpuNotOnline { what: "--sidecore", cpu: 9, online: "0-1".into() });
        assert!(matches!(&offline, CliError::Usage(m) if m.starts_with("--sidecore CPU 9")), "{offline:?}");
        let attach = run_cli_error(&RunError::Attach("connection refused".into()));
        assert!(matches!(&attach, CliError::Runtime(m) if m.starts_with("--attach: ")), "{attach:?}");
        assert_eq!(attach.exit_status(), EXIT_RUNTIME);
        assert_eq!(usage.exit_status(), EXIT_USAGE);
        assert_eq!(CliError::from("x".to_string()).exit_status(), EXIT_RUNTIME);
    }
}
