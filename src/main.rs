//! `sidecore`: run guests whose VMM services come from a pinned sidecore.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use shm_proto::boot::Workload;
use sidecore_vmm::run::{self, ConsoleSink, RunOptions, VcpuEnd};
use sidecore_vmm::vm::VmSpec;

/// Sidecore: a KVM hypervisor runtime whose pinned host core (the sidecore)
/// serves guests' VMM requests through shared-memory rings — no VM exit —
/// with the classic exit paths kept beside it for comparison and fallback.
#[derive(Parser)]
#[command(name = "sidecore", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (the bundled guest-agent unless --guest) and run a workload.
    Run(RunArgs),
    /// Show the KVM backend, CPUs, TSC frequency, and whether guests run natively.
    Info(InfoArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Guest ELF to run instead of the bundled guest-agent (64-bit x86-64,
    /// linked at 0x200000 like guest-agent).
    #[arg(long, value_name = "ELF")]
    guest: Option<PathBuf>,
    /// Number of vCPUs, each with its own ring.
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64, value_name = "MiB")]
    mem: u64,
    /// Serve sidecalls from a sidecore pinned to each of these CPUs (e.g. 0 or
    /// 0,2); without it the guest uses the exit paths only.
    #[arg(long, value_name = "CPU[,CPU..]", value_delimiter = ',')]
    sidecore: Vec<usize>,
    /// Pin vCPU i to the i-th CPU of this list (e.g. 1 or 2-3). Default:
    /// counting down from the last online CPU, skipping sidecore CPUs.
    #[arg(long, value_name = "LIST")]
    vcpu_cpus: Option<String>,
    /// Workload: hello (prints a computed value), spin (native-execution
    /// check: ns per loop iteration), selftest (every path, every answer).
    #[arg(long, default_value = "hello", value_name = "NAME")]
    workload: String,
    /// How long a sidecall waits for its reply before it falls back to the
    /// exit path, in µs.
    #[arg(long, default_value_t = 2000, value_name = "US")]
    sidecall_timeout_us: u64,
    /// Workload argument (repeatable; e.g. spin's iteration count).
    #[arg(long = "arg", value_name = "N")]
    args: Vec<u64>,
}

#[derive(Args)]
struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_workload(name: &str) -> Result<Workload, String> {
    Workload::ALL.iter().copied().find(|w| w.name() == name).ok_or_else(|| {
        let names: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
        format!("unknown workload '{name}' — choose one of: {}", names.join(", "))
    })
}

fn load_guest(path: &Option<PathBuf>) -> Result<(String, Vec<u8>), String> {
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

fn cmd_run(a: RunArgs) -> Result<ExitCode, String> {
    let workload = parse_workload(&a.workload)?;
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
        },
        vcpu_cpus,
        sidecore_cpus: a.sidecore,
        console: ConsoleSink::Stdout,
        report_phases: true,
    };
    let report = run::run(opts).map_err(|e| error_chain(&e))?;
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

/// "what failed: cause: cause" for an error and its sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SIDECORE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Command::Run(a) => cmd_run(a),
        Command::Info(a) => {
            sidecore_vmm::info::cmd_info(a.json).map(|()| ExitCode::SUCCESS).map_err(|e| error_chain(&*e))
        }
    };
    match r {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("sidecore: {msg}");
            ExitCode::from(2)
        }
    }
}
