//! `sidecore`: run guests whose VMM services come from a pinned sidecore.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod cli;

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
    /// Microbenchmark null call, CPUID, page-table map and page fault:
    /// sidecall against every exit path and the floor, in one run.
    Bench(BenchArgs),
    /// Serve the sidecalls of many VMs from pinned cores (VMMs attach with
    /// `run --attach`).
    Daemon(DaemonArgs),
    /// Ask a running daemon what it serves.
    Status(StatusArgs),
    /// Run the packet device: an echo guest on one path (posted events from
    /// the sidecore, or the exit path: interrupt for rx, PIO for tx) and a
    /// UDP load generator on loopback that checks every packet comes back
    /// intact and in order.
    Echo(EchoArgs),
    /// Show the KVM backend, CPUs, TSC frequency, and whether guests run natively.
    Info(InfoArgs),
}

#[derive(Args)]
struct DaemonArgs {
    /// Control socket (Unix domain); created 0600, or 0660 with --group.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// CPUs to pin one sidecore each to (e.g. 0 or 2-3).
    #[arg(long, value_name = "LIST")]
    cores: String,
    /// Serve Prometheus metrics over HTTP at this address (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Park a sidecore whose rings have all been idle this long (µs); 0 never parks.
    #[arg(long, default_value_t = 1000, value_name = "US")]
    idle_park_us: u64,
    /// Let this group use the socket too.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Debugging aid: run without the per-thread seccomp filters (by default
    /// each thread may make only the system calls its job needs; others fail
    /// with EPERM).
    #[arg(long)]
    no_seccomp: bool,
}

#[derive(Args)]
struct EchoArgs {
    /// sidecall (the sidecore moves packets and posts events) or exit
    /// (a VMM thread interrupts the vCPU per packet; tx by PIO doorbell).
    #[arg(long, default_value = "sidecall", value_name = "PATH")]
    path: String,
    /// Packets to send.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    count: u64,
    /// Bytes per packet (8 to 2048).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    size: usize,
    /// Open loop at this many packets per second (throughput and loss);
    /// default: closed loop, one packet in flight (latency).
    #[arg(long, value_name = "PPS")]
    rate: Option<u64>,
    /// The sidecore's CPU (default: the first online CPU).
    #[arg(long, value_name = "CPU")]
    sidecore: Option<usize>,
    /// The vCPU's CPU (default: the last online CPU).
    #[arg(long, value_name = "CPU")]
    vcpu_cpu: Option<usize>,
    /// µs the guest spins idle before it halts (sidecall path); a halted
    /// guest is woken by the sidecore's interrupt.
    #[arg(long, default_value_t = 200, value_name = "US")]
    spin_us: u64,
    /// The guest stops and restarts its sidecore every N packets (a test
    /// that the device survives it; 0: never).
    #[arg(long, default_value_t = 0, value_name = "N")]
    toggle_every: u64,
    /// Run this many echo VMs at once, each with its own device and load
    /// generator (--count packets each). On the sidecall path they are
    /// attached to a daemon (started here unless --attach names one).
    #[arg(long, default_value_t = 1, value_name = "N")]
    vms: usize,
    /// Serve the sidecall path from the daemon at this socket.
    #[arg(long, value_name = "SOCKET")]
    attach: Option<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Ops to time: null, cpuid, pte (one map of a fresh entry), pagefault
    /// (map a fresh page, then touch it), irq (event delivery: posted by
    /// the sidecore to a polling vCPU = sidecall, or an interrupt = kernel),
    /// echo (a UDP packet's round trip through the guest's packet device:
    /// the sidecore's = sidecall, the exit-path device = user).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "OP[,OP..]",
          default_values_t = sidecore_vmm::bench::selection::DEFAULT_OPS)]
    ops: Vec<sidecore_vmm::bench::selection::OpChoice>,
    /// Paths: kernel (the backend's in-kernel trap), user (exit to this
    /// VMM: PIO, or the MMIO write-protect trap for pte), sidecall.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "PATH[,PATH..]",
          default_values_t = sidecore_vmm::bench::selection::DEFAULT_PATHS)]
    paths: Vec<sidecore_vmm::bench::selection::PathChoice>,
    /// echo also with this many VMs at once (op `echo-Nvm`), each with its
    /// own device and load generator, served by a daemon on the sidecall
    /// path; 1: single-VM echo only.
    #[arg(long, default_value_t = sidecore_vmm::bench::selection::DEFAULT_ECHO_VMS, value_name = "N")]
    echo_vms: usize,
    /// Samples per op and path, 1 to 10000000 [default: 100000; 10000 for
    /// the page-table ops, which the page-table pool also bounds; 10000 for
    /// irq and echo, which take at least 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    iters: Option<u64>,
    /// Untimed calls before each op and path, 1 to 1000000 (page-table ops
    /// warm up with at most 512).
    #[arg(long, default_value_t = 2000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    warmup: u64,
    /// Samples per block, 1 to 4096: floor blocks of the same size are
    /// interleaved with the sidecall blocks.
    #[arg(long, default_value_t = 1000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=sidecore_vmm::bench::selection::MAX_BLOCK))]
    block: u64,
    /// vCPUs, each timing on its own ring; results per vCPU and together.
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,
    /// CPUs of the vCPUs (vCPU i on the i-th) [default: counting down from
    /// the last online CPU].
    #[arg(long, value_name = "LIST", env = "SIDECORE_VCPU_CPUS")]
    vcpu_cpus: Option<String>,
    /// Add R idle host-side rings to the sidecore's sweep in every other
    /// sidecall block, to measure what idle rings cost a busy one
    /// (`sidecall+Ridle` rows). Each is a VM of its own, as a daemon's idle
    /// VMs are, so the sweep is the one with per-VM shares.
    #[arg(long, default_value_t = 0, value_name = "R")]
    idle_rings: u32,
    /// CPU of the sidecore [default: the first online CPU].
    #[arg(long, value_name = "CPU")]
    sidecore: Option<usize>,
    /// Write the results as JSON (schema `sidecore-bench/2`: provenance and
    /// every series' HDR histogram, for --compare and merging).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Compare two --json results instead of running: p50 and p99 of every
    /// series in both, recomputed from their histograms, with B/A ratios,
    /// and how the runs' provenance differs. Boots no guest.
    #[arg(long, num_args = 2, value_names = ["A.json", "B.json"],
          conflicts_with_all = ["throughput", "json", "plot", "render_readme"])]
    compare: Option<Vec<PathBuf>>,
    /// Print the README's example block for this --json result
    /// (scripts/bench-example.sh splices it in); boots no guest.
    #[arg(long, value_name = "FILE.json", hide = true, conflicts_with_all = ["throughput", "json", "plot"])]
    render_readme: Option<PathBuf>,
    /// Write the latency CDFs as an SVG plot.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64, value_name = "MiB")]
    mem: u64,
    /// How long a sidecall waits before it falls back, in µs.
    #[arg(long, default_value_t = 2000, value_name = "US")]
    sidecall_timeout_us: u64,
    /// Measure throughput instead: calls per second through one sidecore
    /// from host-side synthetic producers, 1 to 64 rings, batches of 1, 8
    /// and 32, and the capacity model built from it.
    #[arg(long)]
    throughput: bool,
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
    #[arg(long, value_name = "LIST", env = "SIDECORE_VCPU_CPUS")]
    vcpu_cpus: Option<String>,
    /// Workload: hello (prints a computed value), spin (native-execution
    /// check: ns per loop iteration), selftest (every path, every answer).
    #[arg(long, default_value = "hello", value_name = "NAME")]
    workload: String,
    /// How long a sidecall waits for its reply before it falls back to the
    /// exit path, in µs.
    #[arg(long, default_value_t = 2000, value_name = "US")]
    sidecall_timeout_us: u64,
    /// Park this VM's sidecores after this many µs with every ring idle (the
    /// guest's doorbell wakes them); 0 keeps them spinning.
    #[arg(long, default_value_t = 0, value_name = "US")]
    idle_park_us: u64,
    /// Have the sidecore daemon listening at this socket serve the rings
    /// (instead of a sidecore of this process).
    #[arg(long, value_name = "SOCKET", conflicts_with = "sidecore")]
    attach: Option<PathBuf>,
    /// Workload argument (repeatable; e.g. spin's iteration count).
    #[arg(long = "arg", value_name = "N")]
    args: Vec<u64>,
    /// Split the guest's own call round-trip histogram (kept by selftest's
    /// linger phase) into conditions A and B, alternating at each SIGUSR1
    /// (A first), and print p50/p99/p99.9 of each at the end. scripts/soak.sh
    /// uses it to compare latency with and without a noisy neighbour.
    #[arg(long)]
    latency_phases: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SIDECORE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Command::Run(a) => cli::run::cmd_run(a),
        Command::Bench(a) => cli::bench::cmd_bench(a),
        Command::Daemon(a) => cli::daemon::cmd_daemon(a),
        Command::Status(a) => cli::daemon::cmd_status(a),
        Command::Echo(a) => cli::echo::cmd_echo(a),
        Command::Info(a) => cli::info::cmd_info(a.json),
    };
    match r {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("sidecore: {msg}");
            ExitCode::from(2)
        }
    }
}
