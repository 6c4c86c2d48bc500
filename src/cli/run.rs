//! `sidecore run`: one VM, its console and its exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use shm_proto::boot::Workload;
use sidecore_vmm::vmm::linux::{self, LinuxEnd, LinuxError, LinuxOptions, LinuxSpec};
use sidecore_vmm::vmm::vm::VmSpec;
use sidecore_vmm::vmm::{self, ConsoleSink, RunOptions, VcpuEnd};

use crate::RunArgs;

use super::bench::bench_progress;
use super::CliError;

/// `run`'s exit status when a vCPU reported a non-zero status.
pub(crate) const EXIT_GUEST_STATUS: u8 = 3;
/// `run`'s exit status when a vCPU faulted.
pub(crate) const EXIT_GUEST_FAULT: u8 = 4;

/// Most workload arguments (`BootInfo::args`).
const MAX_ARGS: usize = 8;

pub(crate) fn load_guest(path: &Option<PathBuf>) -> Result<(String, Vec<u8>), String> {
    match path {
        None => Ok(("bundled guest-agent".into(), sidecore_vmm::BUNDLED_GUEST.to_vec())),
        Some(p) => std::fs::read(p).map(|b| (p.display().to_string(), b)).map_err(|e| {
            format!(
                "cannot read guest image {}: {e} — pass the path of a guest ELF, or omit --guest to run the bundled guest-agent",
                p.display()
            )
        }),
    }
}

/// The process's exit status for how the vCPUs ended (see `run --help`): a
/// fault outranks a status, as the worse failure; 0 only if every vCPU
/// reported 0. Kept apart from 1 and 2 so a script can tell a failing guest
/// from a failing host or command line.
pub(crate) fn guest_exit_status(ends: &[VcpuEnd]) -> u8 {
    if ends.iter().any(|e| matches!(e, VcpuEnd::Fault(_))) {
        EXIT_GUEST_FAULT
    } else if ends.iter().any(|e| !matches!(e, VcpuEnd::Status(0))) {
        EXIT_GUEST_STATUS
    } else {
        0
    }
}

/// The guest-agent's RAM bounds, in MiB.
const AGENT_MEM_MIB: std::ops::RangeInclusive<u64> = 4..=(shm_proto::layout::MAX_RAM >> 20);

pub(crate) fn cmd_run(a: RunArgs) -> Result<ExitCode, CliError> {
    if a.kernel.is_some() {
        return cmd_run_linux(a);
    }
    let mem = a.mem.unwrap_or(64);
    if !AGENT_MEM_MIB.contains(&mem) {
        return Err(CliError::Usage(format!(
            "--mem {mem}: the guest-agent takes {} to {} MiB (a --kernel guest takes up to {})",
            AGENT_MEM_MIB.start(),
            AGENT_MEM_MIB.end(),
            linux::MAX_MEM_MIB
        )));
    }
    let workload = a.workload.workload();
    match workload {
        Workload::Echo => {
            return Err(CliError::Usage(
                "--workload echo needs its packet device and a load generator: run `sidecore echo`".into(),
            ))
        }
        Workload::Irq => {
            return Err(CliError::Usage(
                "--workload irq answers the sidecore's test events: run `sidecore bench --ops irq`".into(),
            ))
        }
        _ => {}
    }
    if a.args.len() > MAX_ARGS {
        return Err(CliError::Usage(format!("--arg: at most {MAX_ARGS} workload arguments, got {}", a.args.len())));
    }
    let vcpu_cpus = a.vcpu_cpus.map(|l| l.0);
    // What vmm::run will pin, for the warning and the bench header.
    let placed: Vec<usize> = match &vcpu_cpus {
        Some(l) => (0..a.vcpus as usize).map(|i| l[i % l.len()]).collect(),
        None => sidecore_vmm::host::online_cpus()
            .map(|o| vmm::default_vcpu_cpus(&o, &a.sidecore, a.vcpus))
            .unwrap_or_default(),
    };
    super::warn_shared_cores(
        &a.sidecore,
        &placed,
        if vcpu_cpus.is_some() {
            "Give --vcpu-cpus CPUs that --sidecore does not name (or leave it out: the default skips them)."
        } else {
            "Every online CPU runs a sidecore: name fewer with --sidecore, or pass --vcpu-cpus."
        },
    );
    let (guest_path, guest_elf) = load_guest(&a.guest)?;
    let mut args = [0u64; MAX_ARGS];
    args[..a.args.len()].copy_from_slice(&a.args);
    let sidecore_cpu0 = a.sidecore.first().copied().unwrap_or(0);
    let vcpu_cpu0 = placed.first().copied().unwrap_or(0);
    let bench = matches!(workload, Workload::Bench | Workload::Pagefault).then(|| {
        let khz =
            sidecore_vmm::host::open_kvm().ok().and_then(|k| sidecore_vmm::host::tsc_khz(&k).ok()).map_or(1, |t| t.khz);
        std::sync::Arc::new(sidecore_vmm::bench::BenchCollector::new(khz, Some(bench_progress())))
    });
    let opts = RunOptions {
        spec: VmSpec {
            guest_path,
            guest_elf,
            mem_mib: mem,
            vcpus: a.vcpus,
            workload,
            args,
            sidecalls: false,
            sidecall_timeout_us: a.sidecall_timeout_us,
            shareable: false,
        },
        vcpu_cpus,
        sidecore_cpus: a.sidecore,
        console: ConsoleSink::Stdout,
        report_phases: true,
        bench: bench.clone(),
        idle_rings: 0,
        attach: a.attach.clone(),
        vm_name: a.name.clone(),
        idle_park: (a.idle_park_us > 0).then(|| std::time::Duration::from_micros(a.idle_park_us)),
        latency_phases: a.latency_phases,
        device: None,
    };
    // Decided before the run: the probe boots a VM of its own.
    let execution = bench.as_ref().map(|_| sidecore_vmm::scenarios::info::probe_execution());
    let report = vmm::run(opts).map_err(|e| super::run_cli_error(&e))?;
    if let (Some(b), Some(execution)) = (bench, execution) {
        let backend = sidecore_vmm::host::open_kvm()
            .ok()
            .and_then(|k| sidecore_vmm::host::detect_backend(&k).ok())
            .map_or_else(|| "?".to_string(), |b| b.backend.name().to_string());
        let rep = b.report(sidecore_vmm::bench::ReportHeader {
            backend,
            vcpu_cpu: vcpu_cpu0,
            vcpu_cpus: vec![vcpu_cpu0],
            sidecore_cpu: sidecore_cpu0,
            timing_representative: execution.native,
            execution: execution.describe(),
        });
        eprintln!();
        print!("{}", rep.table());
    }
    let mut failed = Vec::new();
    for (i, end) in report.ends.iter().enumerate() {
        match end {
            VcpuEnd::Status(0) => {}
            VcpuEnd::Status(s) => failed.push(format!("vCPU {i} exited with status {s}")),
            VcpuEnd::Fault(m) => failed.push(format!("vCPU {i} faulted: {m}")),
        }
    }
    if workload == Workload::Selftest {
        if failed.is_empty() {
            println!("selftest: ok");
        } else {
            println!("selftest: FAILED ({})", failed.join("; "));
        }
    }
    if !failed.is_empty() {
        eprintln!("sidecore: guest failed: {}", failed.join("; "));
    }
    let rejected = report.sidecall_stats.rejected() + report.exit_stats.rejected();
    if rejected > 0 {
        tracing::info!(rejected, "requests answered with an error status");
    }
    Ok(ExitCode::from(guest_exit_status(&report.ends)))
}

fn read_file(what: &str, path: &std::path::Path, hint: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Runtime(format!("cannot read {what} {}: {e} — {hint}", path.display())))
}

/// Lines of the console a failure report repeats on stderr.
const REPORT_LINES: usize = 20;

/// `run --kernel`: a Linux guest, to its power-off.
fn cmd_run_linux(a: RunArgs) -> Result<ExitCode, CliError> {
    let Some(kernel_path) = a.kernel.clone() else {
        return Err(CliError::Usage("--kernel: no kernel given".into()));
    };
    let kernel = read_file("kernel", &kernel_path, "pass the path of a bzImage, e.g. /boot/vmlinuz-*")?;
    let initrd = match &a.initrd {
        Some(p) => {
            Some((p.display().to_string(), read_file("initrd", p, "pass the path of an initramfs (cpio) file")?))
        }
        None => None,
    };
    let vcpu_cpus = a.vcpu_cpus.map(|l| l.0);
    let placed: Vec<usize> = match &vcpu_cpus {
        Some(l) => (0..a.vcpus as usize).map(|i| l[i % l.len()]).collect(),
        None => sidecore_vmm::host::online_cpus()
            .map(|o| vmm::default_vcpu_cpus(&o, &a.sidecore, a.vcpus))
            .unwrap_or_default(),
    };
    super::warn_shared_cores(&a.sidecore, &placed, "Give --vcpu-cpus CPUs that --sidecore does not name.");
    let opts = LinuxOptions {
        spec: LinuxSpec {
            kernel_path: kernel_path.display().to_string(),
            kernel,
            initrd,
            cmdline: a.cmdline.clone(),
            mem_mib: a.mem.unwrap_or(256),
            vcpus: a.vcpus,
        },
        vcpu_cpus,
        sidecore_cpus: a.sidecore.clone(),
        console: ConsoleSink::Stdout,
        stdin: true,
        attach: a.attach.clone(),
        vm_name: a.name.clone(),
        idle_park: (a.idle_park_us > 0).then(|| std::time::Duration::from_micros(a.idle_park_us)),
    };
    let report = linux::run(opts).map_err(|e| match &e {
        LinuxError::VcpuCount(_) | LinuxError::MemSize(_) => CliError::Usage(sidecore_vmm::error_chain(&e)),
        LinuxError::Run(r) => super::run_cli_error(r),
        _ => CliError::Runtime(sidecore_vmm::error_chain(&e)),
    })?;
    if let Some(served) = report.daemon_served {
        println!(
            "attach: the guest got {} sidecall replies, the daemon counted {served} for this VM",
            report.guest_sidecalls
        );
    }
    let tail = |lines: &[String]| {
        let from = lines.len().saturating_sub(REPORT_LINES);
        lines[from..].iter().map(|l| format!("\n  | {l}")).collect::<String>()
    };
    match &report.end {
        LinuxEnd::PowerOff => tracing::info!("the guest powered off"),
        LinuxEnd::Reset => tracing::info!("the guest reset itself: the run ends"),
        LinuxEnd::Panic(lines) => {
            eprintln!("sidecore: guest failed: the kernel panicked; the console's last lines:{}", tail(lines));
            return Ok(ExitCode::from(EXIT_GUEST_STATUS));
        }
        LinuxEnd::Fault(msg, lines) => {
            eprintln!("sidecore: guest failed: {msg}; the console's last lines:{}", tail(lines));
            return Ok(ExitCode::from(EXIT_GUEST_FAULT));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_failures_exit_apart_from_host_and_usage_failures() {
        let ok = VcpuEnd::Status(0);
        let fault = VcpuEnd::Fault("triple fault".into());
        assert_eq!(guest_exit_status(&[ok.clone(), ok.clone()]), 0);
        assert_eq!(guest_exit_status(&[]), 0);
        for s in [1, 2, 3, 101, 256, u32::MAX] {
            assert_eq!(guest_exit_status(&[ok.clone(), VcpuEnd::Status(s)]), EXIT_GUEST_STATUS, "status {s}");
        }
        assert_eq!(guest_exit_status(&[VcpuEnd::Status(1), fault.clone()]), EXIT_GUEST_FAULT);
        assert_eq!(guest_exit_status(&[fault]), EXIT_GUEST_FAULT);
        for code in [EXIT_GUEST_STATUS, EXIT_GUEST_FAULT] {
            assert!(code != super::super::EXIT_RUNTIME && code != super::super::EXIT_USAGE);
        }
    }
}
