//! `sidecore run`: one VM, its console and its exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use shm_proto::boot::Workload;
use sidecore_vmm::vmm::vm::VmSpec;
use sidecore_vmm::vmm::{self, ConsoleSink, RunOptions, VcpuEnd};

use crate::RunArgs;

use super::bench::bench_progress;

pub(crate) fn parse_workload(name: &str) -> Result<Workload, String> {
    Workload::ALL.iter().copied().find(|w| w.name() == name).ok_or_else(|| {
        let names: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
        format!("unknown workload '{name}' — choose one of: {}", names.join(", "))
    })
}

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

pub(crate) fn cmd_run(a: RunArgs) -> Result<ExitCode, String> {
    let workload = parse_workload(&a.workload)?;
    match workload {
        Workload::Echo => {
            return Err("the echo workload needs its packet device and a load generator: run `sidecore echo`".into())
        }
        Workload::Irq => {
            return Err("the irq workload answers the sidecore's test events: run `sidecore bench --ops irq`".into())
        }
        _ => {}
    }
    let (guest_path, guest_elf) = load_guest(&a.guest)?;
    let vcpu_cpus = match &a.vcpu_cpus {
        Some(s) => Some(sidecore_vmm::host::parse_cpu_list(s).map_err(|e| format!("--vcpu-cpus: {e}"))?),
        None => None,
    };
    if vcpu_cpus.as_ref().is_some_and(Vec::is_empty) {
        return Err("--vcpu-cpus: the list is empty".into());
    }
    if a.args.len() > 8 {
        return Err("--arg: at most 8 workload arguments".into());
    }
    let mut args = [0u64; 8];
    args[..a.args.len()].copy_from_slice(&a.args);
    let sidecore_cpu0 = a.sidecore.first().copied().unwrap_or(0);
    let vcpu_cpu0 = match &vcpu_cpus {
        Some(l) => l.first().copied().unwrap_or(0),
        None => sidecore_vmm::host::online_cpus()
            .ok()
            .and_then(|o| vmm::default_vcpu_cpus(&o, &a.sidecore, 1).first().copied())
            .unwrap_or(0),
    };
    let bench = matches!(workload, Workload::Bench | Workload::Pagefault).then(|| {
        let khz =
            sidecore_vmm::host::open_kvm().ok().and_then(|k| sidecore_vmm::host::tsc_khz(&k).ok()).map_or(1, |t| t.khz);
        std::sync::Arc::new(sidecore_vmm::bench::BenchCollector::new(khz, Some(bench_progress())))
    });
    let opts = RunOptions {
        spec: VmSpec {
            guest_path,
            guest_elf,
            mem_mib: a.mem,
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
        idle_park: (a.idle_park_us > 0).then(|| std::time::Duration::from_micros(a.idle_park_us)),
        latency_phases: a.latency_phases,
        device: None,
    };
    // Decided before the run: the probe boots a VM of its own.
    let execution = bench.as_ref().map(|_| sidecore_vmm::scenarios::info::probe_execution());
    let report = vmm::run(opts).map_err(|e| super::run_error(&e))?;
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
            VcpuEnd::Fault(m) => {
                eprintln!("sidecore: {m}");
                failed.push(format!("vCPU {i} faulted"));
            }
        }
    }
    if workload == Workload::Selftest {
        if failed.is_empty() {
            println!("selftest: ok");
        } else {
            println!("selftest: FAILED ({})", failed.join("; "));
        }
    } else if !failed.is_empty() {
        eprintln!("sidecore: {}", failed.join("; "));
    }
    let rejected = report.sidecall_stats.rejected() + report.exit_stats.rejected();
    if rejected > 0 {
        tracing::info!(rejected, "requests answered with an error status");
    }
    Ok(ExitCode::from(report.exit_code()))
}
