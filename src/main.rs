//! `sidecore`: run guests whose VMM services come from a pinned sidecore.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use shm_proto::layout::MAX_VCPUS;

mod cli;

use cli::{CliError, CpuList};

/// Sidecore: a KVM hypervisor runtime whose pinned host core (the sidecore)
/// serves guests' VMM requests through shared-memory rings — no VM exit —
/// with the classic exit paths kept beside it for comparison and fallback.
#[derive(Parser)]
#[command(name = "sidecore", version, about, long_about = None, after_help = MAIN_AFTER_HELP)]
struct Cli {
    /// Format of the log lines on stderr: text, or json (one JSON object per
    /// line, for a log collector).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "SIDECORE_LOG_FORMAT",
        value_name = "FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Command,
}

const MAIN_AFTER_HELP: &str = "\
Logs go to stderr. SIDECORE_LOG picks which: a tracing filter such as warn,
info, debug or sidecore_vmm::daemon=debug,warn (default: info for `daemon`, so
a journal shows every VM attach and detach; warn for the other commands).
Text logs are coloured only when stderr is a terminal and NO_COLOR is unset or
empty.

Exit status: 0 success; 1 the work failed (KVM, a file, the daemon unreachable,
a guest that could not boot, a failed check); 2 usage error (a bad option or
value). `sidecore run` adds 3 and 4 for a guest that failed: see
`sidecore run --help`.";

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, target, fields.
    Json,
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
    /// Print a shell completion script on stdout (e.g. `sidecore completions
    /// bash > /etc/bash_completion.d/sidecore`).
    Completions(CompletionsArgs),
    /// Write the manual pages: sidecore.1 and one per command
    /// (sidecore-run.1, ...) into --out, or sidecore.1 alone on stdout.
    Manpage(ManpageArgs),
}

#[derive(Args)]
struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum, value_name = "SHELL")]
    shell: clap_complete::Shell,
}

#[derive(Args)]
struct ManpageArgs {
    /// Directory to write sidecore.1 and the per-command pages into (created
    /// if missing); without it, sidecore.1 goes to stdout.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct DaemonArgs {
    /// Control socket (Unix domain); created 0600, or 0660 with --group.
    /// The default's directory is created if missing.
    #[arg(long, value_name = "PATH", default_value = sidecore_vmm::daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// CPUs to pin one sidecore each to (e.g. 0 or 2-3).
    #[arg(long, value_name = "LIST", value_parser = cli::parse_cpu_list_arg)]
    cores: CpuList,
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
    /// Serve a virtio-blk disk to a VMM over vhost-user, its queues polled
    /// by the sidecores: SOCKET,path=IMAGE[,readonly][,num-queues=N]
    /// (default 4 queues, at most 16). Repeatable. The daemon listens on
    /// SOCKET; e.g. QEMU: -chardev socket,id=c0,path=SOCKET,reconnect=1
    /// -device vhost-user-blk-pci,chardev=c0 with guest memory from
    /// -object memory-backend-memfd,share=on (sealed memfds only).
    #[arg(long, value_name = "SPEC", value_parser = clap::value_parser!(sidecore_vmm::vhost::BlkSpec))]
    vhost_user_blk: Vec<sidecore_vmm::vhost::BlkSpec>,
}

#[derive(Args)]
struct EchoArgs {
    /// The device's path.
    #[arg(long, value_enum, default_value_t = EchoPath::Sidecall, value_name = "PATH")]
    path: EchoPath,
    /// Packets to send per VM (at least 1).
    #[arg(long, default_value_t = 10_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    #[arg(
        long,
        default_value_t = 64,
        value_name = "BYTES",
        value_parser = packet_size_parser(),
        help = format!("Bytes per packet (8 to {})", shm_proto::event::PKT_MAX)
    )]
    size: usize,
    /// Open loop at this many packets per second (throughput and loss);
    /// default: closed loop, one packet in flight (latency). At least 1.
    #[arg(long, value_name = "PPS", value_parser = clap::value_parser!(u64).range(1..))]
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
    /// attached to a daemon (started here unless --attach names one). At
    /// least 1.
    #[arg(
        long,
        default_value_t = 1,
        value_name = "N",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    vms: usize,
    /// Serve the sidecall path from the daemon at this socket
    /// (`--attach` alone: the default socket, /run/sidecore/sidecore.sock).
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = sidecore_vmm::daemon::DEFAULT_SOCKET)]
    attach: Option<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = sidecore_vmm::daemon::DEFAULT_SOCKET)]
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
    /// Price each step of the slot protocol instead: host-to-host
    /// ping-pongs between --sidecore's CPU and --vcpu-cpus' first, one
    /// variant per step (the one-line floor, the claim by load then CAS, the
    /// claim by CAS alone, a 64-byte body, a read before the post, a new slot
    /// per call), with p50 and the ratio to the floor. Boots no guest.
    #[arg(long, conflicts_with_all = ["throughput", "compare", "render_readme", "vhost_user_blk"])]
    steps: bool,
    /// Measure a vhost-user-blk backend instead: this process is the
    /// frontend (QEMU's role), driving the sidecore daemon's backend and
    /// qemu-storage-daemon in turn on a tmpfs image: 4 KiB random reads and
    /// writes at QD1 (latency) and QD32 (IOPS), kicks and calls per request.
    /// The backend runs on --sidecore's CPU, the frontend on --vcpu-cpus'
    /// first. Boots no guest.
    #[arg(long, conflicts_with_all = ["throughput", "compare", "render_readme"])]
    vhost_user_blk: bool,
    /// With --vhost-user-blk: timed QD1 requests per op, 1 to 10000000.
    #[arg(long, default_value_t = 20_000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    vhost_blk_requests: u64,
    /// With --vhost-user-blk: seconds of each QD32 series, 1 to 600.
    #[arg(long, default_value_t = 2, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..=600))]
    vhost_blk_seconds: u64,
}

#[derive(Args)]
#[command(after_help = RUN_AFTER_HELP)]
struct RunArgs {
    /// Guest ELF to run instead of the bundled guest-agent (64-bit x86-64,
    /// linked at 0x200000 like guest-agent).
    #[arg(long, value_name = "ELF")]
    guest: Option<PathBuf>,
    /// Boot this Linux kernel (a bzImage, e.g. /boot/vmlinuz-*) instead of
    /// the guest-agent, by the x86 boot protocol: COM1 is its console
    /// (stdout, and stdin to the guest), ACPI gives it its CPUs and its
    /// power-off. The shared region is reserved in its e820 map and named
    /// on its command line (`sidecore.region=GPA,SIZE`) for the sidecall
    /// client module (guest-linux/). Hardware KVM only (AMD-V, VT-x): on
    /// PVM a stock kernel cannot run natively.
    #[arg(long, value_name = "BZIMAGE", conflicts_with_all = ["guest", "workload", "args", "latency_phases"])]
    kernel: Option<PathBuf>,
    /// The initrd (initramfs) for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The kernel command line for --kernel [default: console=ttyS0]; the
    /// VMM appends `sidecore.region=...` and, unless it sets panic=,
    /// `panic=-1` (a panic then ends the run).
    #[arg(long, value_name = "STR", requires = "kernel")]
    cmdline: Option<String>,
    // The bounds come from the VMM's, so the help says them.
    #[arg(
        long,
        default_value_t = 1,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_VCPUS)),
        help = format!("Number of vCPUs, each with its own ring (1 to {MAX_VCPUS})")
    )]
    vcpus: u32,
    #[arg(
        long,
        value_name = "MiB",
        value_parser = clap::value_parser!(u64).range(MIN_MEM_MIB..=LINUX_MAX_MEM_MIB),
        help = format!(
            "Guest RAM in MiB: the guest-agent {MIN_MEM_MIB} to {MAX_MEM_MIB} [default: 64], a --kernel guest {} to {LINUX_MAX_MEM_MIB} [default: 256]",
            sidecore_vmm::vmm::linux::MIN_MEM_MIB
        )
    )]
    mem: Option<u64>,
    /// Serve sidecalls from a sidecore pinned to each of these CPUs (e.g. 0 or
    /// 0,2); without it the guest uses the exit paths only.
    #[arg(long, value_name = "CPU[,CPU..]", value_delimiter = ',')]
    sidecore: Vec<usize>,
    /// Pin vCPU i to the i-th CPU of this list (e.g. 1 or 2-3). Default:
    /// counting down from the last online CPU, skipping sidecore CPUs.
    #[arg(long, value_name = "LIST", env = "SIDECORE_VCPU_CPUS", value_parser = cli::parse_cpu_list_arg)]
    vcpu_cpus: Option<CpuList>,
    /// The guest-agent's workload (a --guest ELF reads it from its boot info).
    #[arg(long, value_enum, default_value_t = RunWorkload::Hello, value_name = "NAME")]
    workload: RunWorkload,
    /// How long a sidecall waits for its reply before it falls back to the
    /// exit path, in µs.
    #[arg(long, default_value_t = 2000, value_name = "US")]
    sidecall_timeout_us: u64,
    /// Park this VM's sidecores after this many µs with every ring idle (the
    /// guest's doorbell wakes them); 0 keeps them spinning.
    #[arg(long, default_value_t = 0, value_name = "US")]
    idle_park_us: u64,
    /// Have the sidecore daemon listening at this socket serve the rings
    /// (instead of a sidecore of this process); `--attach` alone: the
    /// default socket, /run/sidecore/sidecore.sock.
    #[arg(
        long,
        value_name = "SOCKET",
        conflicts_with = "sidecore",
        num_args = 0..=1,
        default_missing_value = sidecore_vmm::daemon::DEFAULT_SOCKET
    )]
    attach: Option<PathBuf>,
    /// The VM's name at the daemon (with --attach): its metrics' `vm`
    /// label and its events' `name`; letters, digits, '-', '_', '.', at
    /// most 64, unique among attached VMs [default: the daemon's vm<ID>].
    #[arg(long, value_name = "NAME", requires = "attach", value_parser = parse_vm_name)]
    name: Option<String>,
    /// Workload argument, in slot order (repeatable, at most 8; 0 is the
    /// slot's default; e.g. spin's iteration count).
    #[arg(long = "arg", value_name = "N")]
    args: Vec<u64>,
    /// Split the guest's own call round-trip histogram (kept by selftest's
    /// linger phase) into conditions A and B, alternating at each SIGUSR1
    /// (A first), and print p50/p99/p99.9 of each at the end. scripts/soak.sh
    /// uses it to compare latency with and without a noisy neighbour.
    #[arg(long)]
    latency_phases: bool,
}

const RUN_AFTER_HELP: &str = "\
The echo and irq workloads are run by `sidecore echo` and by
`sidecore bench --ops irq`, which give them their device and their load.

Exit status: 0 every vCPU reported status 0; 1 the run failed on the host (KVM,
the guest file, the daemon, a guest that could not boot); 2 usage error; 3 the
guest reported a non-zero status; 4 a vCPU faulted (the guest crashed). With 3
or 4, stderr says which vCPU and its exact status or fault, in the line
`sidecore: guest failed: ...`.

With --kernel (a Linux guest): 0 the guest powered off or reset itself; 3 its
kernel panicked; 4 a vCPU failed (a triple fault, a KVM error); stderr then
repeats the console's last lines. On PVM --kernel fails with 1 and says why.";

/// The smallest guest RAM `Vm::build` accepts, in MiB.
const MIN_MEM_MIB: u64 = 4;
/// The largest guest RAM, in MiB (the guest's layout maps RAM up to `MAX_RAM`).
const MAX_MEM_MIB: u64 = shm_proto::layout::MAX_RAM >> 20;
/// The largest RAM of a --kernel guest, in MiB.
const LINUX_MAX_MEM_MIB: u64 = sidecore_vmm::vmm::linux::MAX_MEM_MIB;

/// Bytes per packet: 8 (the sequence number) to the device's largest.
fn packet_size_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(8..=u64::from(shm_proto::event::PKT_MAX))
}

/// `sidecore echo --path`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EchoPath {
    /// The sidecore moves packets and posts events to the guest.
    Sidecall,
    /// A VMM thread interrupts the vCPU per packet; tx by PIO doorbell.
    Exit,
}

/// `sidecore run --workload`: the guest-agent's workloads
/// (`shm_proto::boot::Workload`), with the same names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RunWorkload {
    /// Prints a line with a value it computed.
    Hello,
    /// Native-execution check: times register-only loop iterations (--arg:
    /// iterations, default 10^8) and prints ns per iteration.
    Spin,
    /// Runs every path and checks every answer; prints `selftest: ok` or
    /// what failed (--arg: CPUID leaves, linger ms, polite, pause ms).
    Selftest,
    /// Times every op on every path and prints the table (what `sidecore
    /// bench` runs, here in one VM).
    Bench,
    /// The bench's page-fault case only: maps fresh pages and touches each,
    /// by trap and by sidecall.
    Pagefault,
    /// A hostile guest: writes garbage into its ring (for the second --arg
    /// ms, default 10,000) and checks that every reply is a correct answer
    /// or an error status.
    Chaos,
    /// Wake-up latency of a parked sidecore: rounds (--arg, default 50) of
    /// idling (second --arg µs, default 5000), then one timed null sidecall.
    Wake,
    /// The packet device's echo guest: run by `sidecore echo`.
    #[value(hide = true)]
    Echo,
    /// The event responder: run by `sidecore bench --ops irq`.
    #[value(hide = true)]
    Irq,
    /// A hostile guest against the GPA space: maps every GPA up to 2^40,
    /// triggers shadow zaps (--arg, default 1000) and checks no read returns
    /// memory outside its RAM.
    Gpascan,
    /// Hammers the control port with stop/start writes (--arg, default
    /// 100,000), then checks calls are answered by sidecall again and none
    /// was lost.
    Toggle,
}

impl RunWorkload {
    fn workload(self) -> shm_proto::boot::Workload {
        use shm_proto::boot::Workload;
        match self {
            RunWorkload::Hello => Workload::Hello,
            RunWorkload::Spin => Workload::Spin,
            RunWorkload::Selftest => Workload::Selftest,
            RunWorkload::Bench => Workload::Bench,
            RunWorkload::Pagefault => Workload::Pagefault,
            RunWorkload::Chaos => Workload::Chaos,
            RunWorkload::Wake => Workload::Wake,
            RunWorkload::Echo => Workload::Echo,
            RunWorkload::Irq => Workload::Irq,
            RunWorkload::Gpascan => Workload::Gpascan,
            RunWorkload::Toggle => Workload::Toggle,
        }
    }
}

#[derive(Args)]
struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Logs on stderr: the `SIDECORE_LOG` filter (else `default_filter`), in
/// `format`; text is coloured only on a terminal and without `NO_COLOR`.
fn init_logs(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let (filter, bad) = match std::env::var("SIDECORE_LOG") {
        Ok(s) if !s.trim().is_empty() => match EnvFilter::try_new(&s) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(default_filter), Some((s, e))),
        },
        _ => (EnvFilter::new(default_filter), None),
    };
    // https://no-color.org: set and not empty turns colour off.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(ansi).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    if let Some((s, e)) = bad {
        tracing::warn!("SIDECORE_LOG={s:?} is not a log filter ({e}); logging at {default_filter} — use e.g. info or sidecore_vmm::daemon=debug");
    }
}

fn parse_vm_name(s: &str) -> Result<String, String> {
    sidecore_vmm::daemon::protocol::check_name(s)?;
    Ok(s.to_owned())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    // A journal must show VMs attaching and detaching; a one-shot command
    // stays quiet unless something is wrong.
    let default_filter = if matches!(cli.cmd, Command::Daemon(_)) { "info" } else { "warn" };
    init_logs(log_format, default_filter);
    let r = match cli.cmd {
        Command::Run(a) => cli::run::cmd_run(a),
        Command::Bench(a) => cli::bench::cmd_bench(a).map_err(CliError::from),
        Command::Daemon(a) => cli::daemon::cmd_daemon(a),
        Command::Status(a) => cli::daemon::cmd_status(a),
        Command::Echo(a) => cli::echo::cmd_echo(a),
        Command::Info(a) => cli::info::cmd_info(a.json),
        Command::Completions(a) => cli::docs::cmd_completions(a.shell, Cli::command()),
        Command::Manpage(a) => cli::docs::cmd_manpage(a.out.as_deref(), Cli::command()),
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            if log_format == LogFormat::Json {
                tracing::error!(exit_status = e.exit_status(), "{e}");
            } else {
                eprintln!("sidecore: {e}");
            }
            ExitCode::from(e.exit_status())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shm_proto::boot::Workload;
    use sidecore_vmm::vmm::vm::{Vm, VmError, VmSpec};

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_workload_is_a_run_value_of_the_same_name() {
        for w in Workload::ALL {
            let v = RunWorkload::value_variants()
                .iter()
                .find(|v| v.workload() == w)
                .unwrap_or_else(|| panic!("{} has no --workload value", w.name()));
            let pv = v.to_possible_value().expect("a value");
            assert_eq!(pv.get_name(), w.name());
            // Hidden only where another command runs it.
            assert_eq!(pv.is_hide_set(), matches!(w, Workload::Echo | Workload::Irq), "{}", w.name());
        }
        assert_eq!(RunWorkload::value_variants().len(), Workload::ALL.len());
    }

    #[test]
    fn run_ranges_are_the_vmms() {
        let build = |vcpus, mem| Vm::build(&VmSpec::bundled(Workload::Hello, vcpus, mem, [0; 8])).err();
        match build(1, MIN_MEM_MIB - 1) {
            Some(VmError::MemSize { min, max, .. }) => assert_eq!((min, max), (MIN_MEM_MIB, MAX_MEM_MIB)),
            e => panic!("{e:?}"),
        }
        assert!(matches!(build(MAX_VCPUS + 1, 64), Some(VmError::VcpuCount(_))));
        let parse = |args: &[&str]| Cli::try_parse_from([&["sidecore", "run"], args].concat());
        assert!(parse(&["--vcpus", &MAX_VCPUS.to_string(), "--mem", &MAX_MEM_MIB.to_string()]).is_ok());
        for bad in [["--vcpus", "0"], ["--mem", "3"], ["--mem", "3073"], ["--workload", "nope"]] {
            let e = parse(&bad).err().expect("rejected");
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }
}
