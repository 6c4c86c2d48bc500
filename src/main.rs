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
    #[arg(long, value_delimiter = ',', default_value = "null,cpuid,pte,pagefault,irq,echo", value_name = "OP[,OP..]")]
    ops: Vec<String>,
    /// Paths: kernel (the backend's in-kernel trap), user (exit to this
    /// VMM: PIO, or the MMIO write-protect trap for pte), sidecall.
    #[arg(long, value_delimiter = ',', default_value = "kernel,user,sidecall", value_name = "PATH[,PATH..]")]
    paths: Vec<String>,
    /// echo also with this many VMs at once (op `echo-Nvm`), each with its
    /// own device and load generator, served by a daemon on the sidecall
    /// path; 1: single-VM echo only.
    #[arg(long, default_value_t = 4, value_name = "N")]
    echo_vms: usize,
    /// Samples per op and path [default: 100000; 20000 for pte and
    /// pagefault, which are also bounded by the page-table pool].
    #[arg(long, value_name = "N")]
    iters: Option<u64>,
    /// Untimed calls before each op and path.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    warmup: u64,
    /// Samples per block: floor blocks of the same size are interleaved with
    /// the sidecall blocks.
    #[arg(long, default_value_t = 1000, value_name = "N")]
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
    /// (`sidecall+Ridle` rows).
    #[arg(long, default_value_t = 0, value_name = "R")]
    idle_rings: u32,
    /// CPU of the sidecore [default: the first online CPU].
    #[arg(long, value_name = "CPU")]
    sidecore: Option<usize>,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
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

/// The bench's progress on stderr: one updating line on a terminal, one
/// line per series in a log.
fn bench_progress() -> sidecore_vmm::bench::ProgressFn {
    use std::io::{IsTerminal, Write};
    Box::new(|p: sidecore_vmm::bench::BlockProgress<'_>| {
        let mut e = std::io::stderr().lock();
        let (vcpu, op, label, total) = (p.vcpu, p.op.name(), p.label, p.total);
        if e.is_terminal() {
            let _ = write!(e, "\r\x1b[2Kbench: vCPU {vcpu}: {op} / {label}: {total} samples");
        } else if total == p.block {
            let _ = writeln!(e, "bench: vCPU {vcpu}: {op} / {label} ...");
        }
        let _ = e.flush();
    })
}

fn cmd_info(json: bool) -> Result<ExitCode, String> {
    let i = sidecore_vmm::info::gather().map_err(|e| error_chain(&*e))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&i).map_err(|e| format!("writing the JSON: {e}"))?);
    } else {
        print!("{}", sidecore_vmm::info::text(&i));
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_throughput(a: &BenchArgs) -> Result<ExitCode, String> {
    use sidecore_core::throughput::{capacity, measure, sweep_cost_per_ring};
    let online = sidecore_vmm::host::online_cpus().map_err(|e| error_chain(&e))?;
    let side_cpu = a.sidecore.or(online.first().copied()).unwrap_or(0);
    let prod_cpu = run::default_vcpu_cpus(&online, &[side_cpu], 1).first().copied().unwrap_or(0);
    let d = std::time::Duration::from_millis(250);
    let mut rows = Vec::new();
    for rings in [1u32, 4, 16, 64] {
        for batch in [1u32, 8, 32] {
            eprintln!("throughput: {rings} ring(s), batch {batch} ...");
            let t = measure(side_cpu, prod_cpu, rings, batch, d, false).map_err(|e| error_chain(&e))?;
            rows.push(t);
        }
    }
    let ring_ns = sweep_cost_per_ring(side_cpu, 64, d).map_err(|e| error_chain(&e))?;
    let kvm = sidecore_vmm::host::open_kvm().map_err(|e| error_chain(&e))?;
    let khz = sidecore_vmm::host::tsc_khz(&kvm).map_err(|e| error_chain(&e))?.khz;
    #[allow(clippy::cast_precision_loss)]
    let cyc_ns = |c: u64| c as f64 * 1e6 / khz.max(1) as f64;
    // The floor, host to host, on the same two CPUs.
    let floor_ns = {
        let mut samples = sidecore_vmm::bench::measure_floor(side_cpu, prod_cpu, 20_000)?;
        samples.sort_unstable();
        cyc_ns(samples[samples.len() / 2])
    };
    // Service time: the sidecore's own median claim-to-reply time, in a
    // separate timed run (the TSC reads would lower the rates above).
    let timed = measure(side_cpu, prod_cpu, 16, 8, d, true).map_err(|e| error_chain(&e))?;
    let service_ns = cyc_ns(timed.service_p50_cycles);
    println!(
        "sidecore throughput — host-side synthetic producer on CPU {prod_cpu}, sidecore on CPU {side_cpu}, null calls"
    );
    println!("\n{:>6} {:>6} {:>14}", "rings", "batch", "calls/s");
    for t in &rows {
        println!("{:>6} {:>6} {:>14.0}", t.rings, t.batch, t.calls_per_s);
    }
    println!("\nmeasured: floor p50 {floor_ns:.0} ns, service time at the sidecore p50 {service_ns:.1} ns (claim to reply), sweep cost {ring_ns:.2} ns per idle ring (64 idle rings)");
    let mut cap = Vec::new();
    for rate in [1_000.0, 10_000.0, 100_000.0, 1_000_000.0] {
        let n = capacity(floor_ns, service_ns, ring_ns, rate);
        println!("capacity: at {rate:>9.0} sidecalls/s per vCPU, one sidecore serves up to {n} vCPUs with p99 < 2 x floor (model; inputs from host-side synthetic producers on 1-64 rings)");
        cap.push(serde_json::json!({"rate_per_vcpu": rate, "vcpus": n}));
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "sidecore_cpu": side_cpu,
            "producer_cpu": prod_cpu,
            "floor_p50_ns": floor_ns,
            "service_p50_ns": service_ns,
            "sweep_ns_per_ring": ring_ns,
            "throughput": rows.iter().map(|t| serde_json::json!({"rings": t.rings, "batch": t.batch, "calls_per_s": t.calls_per_s})).collect::<Vec<_>>(),
            "capacity": cap,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v).map_err(|e| e.to_string())? + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_mask<T: Copy>(
    what: &str,
    names: &[String],
    all: &[T],
    name: fn(T) -> &'static str,
    bit: fn(T) -> u32,
) -> Result<u64, String> {
    let mut mask = 0u64;
    for n in names {
        let n = n.trim();
        let t = all.iter().copied().find(|t| name(*t) == n).ok_or_else(|| {
            let valid: Vec<_> = all.iter().map(|t| name(*t)).collect();
            format!("--{what}: unknown '{n}' — choose from {}", valid.join(", "))
        })?;
        mask |= 1 << bit(t);
    }
    Ok(mask)
}

fn cmd_daemon(a: DaemonArgs) -> Result<ExitCode, String> {
    let cores = sidecore_vmm::host::parse_cpu_list(&a.cores).map_err(|e| format!("--cores: {e}"))?;
    if cores.is_empty() {
        return Err("--cores: the list is empty".into());
    }
    let online = sidecore_vmm::host::online_cpus().map_err(|e| error_chain(&e))?;
    run::check_online("--cores", &cores, &online).map_err(|e| error_chain(&e))?;
    let cfg = sidecore_vmm::daemon::DaemonConfig {
        socket: a.socket,
        cores,
        idle_park: (a.idle_park_us > 0).then(|| std::time::Duration::from_micros(a.idle_park_us)),
        group: a.group,
        metrics: a.metrics,
    };
    let listening = |cfg: &sidecore_vmm::daemon::DaemonConfig| {
        eprintln!(
            "sidecore daemon: listening on {} with sidecores on CPU {}",
            cfg.socket.display(),
            sidecore_vmm::host::format_cpu_list(&cfg.cores)
        );
    };
    sidecore_vmm::daemon::run_daemon(&cfg, listening).map_err(|e| error_chain(&e))?;
    eprintln!("sidecore daemon: stopped");
    Ok(ExitCode::SUCCESS)
}

/// The host-timed ops: `irq` (event delivery: the sidecore posts, the guest
/// acknowledges; sidecall = posted event to a polling vCPU, kernel = an
/// interrupt through the in-kernel LAPIC) and `echo` (a packet's round trip
/// from the load generator through the guest and back; sidecall = the
/// sidecore's device, user = the exit-path device). Each path in a VM of its
/// own, with floor blocks measured before and after it.
fn bench_host_ops(
    ops: &[String],
    paths: u64,
    a: &BenchArgs,
    side: usize,
    vcpu: usize,
    collector: &sidecore_vmm::bench::BenchCollector,
) -> Result<(), String> {
    use shm_proto::bench::BenchPath;
    let want = |p: BenchPath| paths & (1 << p as u32) != 0;
    let n = usize::try_from(a.iters.unwrap_or(10_000).clamp(100, 1_000_000)).unwrap_or(10_000);
    let floor = |op: &str| -> Result<(), String> {
        collector.add_host_floor(op, &sidecore_vmm::bench::measure_floor(side, vcpu, 2000)?);
        Ok(())
    };
    for op in ops {
        let variants: Vec<(BenchPath, bool)> = match op.as_str() {
            "irq" => vec![(BenchPath::Sidecall, false), (BenchPath::Kernel, true)],
            _ => vec![(BenchPath::Sidecall, false), (BenchPath::User, true)],
        };
        // echo also with several VMs at once, attached to a daemon.
        let vm_counts: Vec<usize> = if op == "echo" && a.echo_vms > 1 { vec![1, a.echo_vms] } else { vec![1] };
        for vms in vm_counts {
            let label = if vms > 1 { format!("{op}-{vms}vm") } else { op.clone() };
            for (path, exit_path) in variants.iter().copied().filter(|(p, _)| want(*p)) {
                eprintln!("bench: {label} / {} ...", path.name());
                floor(&label)?;
                let samples = if op == "irq" {
                    let (s, lost, _) = sidecore_vmm::scenarios::run_irq(exit_path, n, side, vcpu)?;
                    if lost > 0 {
                        eprintln!("bench: irq / {}: {lost} events got no acknowledgement within 50 ms", path.name());
                    }
                    s
                } else {
                    let cfg = sidecore_vmm::scenarios::EchoConfig {
                        exit_path,
                        count: n as u64,
                        size: 64,
                        rate: None,
                        sidecore_cpu: side,
                        vcpu_cpu: vcpu,
                        spin_us: 200,
                        vms,
                        attach: None,
                    };
                    let r = sidecore_vmm::scenarios::run_echo(&cfg, |_| {})?;
                    if !r.stats.perfect() {
                        return Err(format!(
                            "{label} / {}: not every packet came back intact and in order: {:?}",
                            path.name(),
                            r.stats
                        ));
                    }
                    r.stats.rtt_cycles
                };
                collector.add_host_series(&label, path.name(), &samples);
                floor(&label)?;
            }
        }
    }
    Ok(())
}

fn cmd_echo(a: EchoArgs) -> Result<ExitCode, String> {
    let exit_path = match a.path.as_str() {
        "sidecall" => false,
        "exit" => true,
        p => return Err(format!("--path: unknown '{p}' — choose sidecall or exit")),
    };
    let online = sidecore_vmm::host::online_cpus().map_err(|e| error_chain(&e))?;
    let side = a.sidecore.or(online.first().copied()).unwrap_or(0);
    let vcpu = a.vcpu_cpu.or(online.last().copied()).unwrap_or(0);
    run::check_online("--sidecore", &[side], &online).map_err(|e| error_chain(&e))?;
    run::check_online("--vcpu-cpu", &[vcpu], &online).map_err(|e| error_chain(&e))?;
    let khz =
        sidecore_vmm::host::open_kvm().and_then(|k| sidecore_vmm::host::tsc_khz(&k)).map_err(|e| error_chain(&e))?.khz;
    let cfg = sidecore_vmm::scenarios::EchoConfig {
        exit_path,
        count: a.count,
        size: a.size,
        rate: a.rate,
        sidecore_cpu: side,
        vcpu_cpu: vcpu,
        spin_us: a.spin_us,
        vms: a.vms.max(1),
        attach: a.attach.clone(),
    };

    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let r = sidecore_vmm::scenarios::run_echo(&cfg, |n| {
        if tty {
            eprint!("\r\x1b[2Kecho: {n} / {} packets", a.count * cfg.vms as u64);
        }
    })?;
    if tty {
        eprintln!();
    }
    print!("{}", r.console);
    let st = &r.stats;
    println!(
        "echo: {} path, {} sent, {} back intact, {} corrupted, {} out of order, {} lost, {:.0} packets/s",
        a.path,
        st.sent,
        st.intact,
        st.corrupted,
        st.out_of_order,
        st.lost,
        st.sent as f64 / st.seconds.max(1e-9)
    );
    if st.recv_errors > 0 {
        println!("echo: {} receive errors other than a time-out, retried", st.recv_errors);
    }
    if !st.rtt_cycles.is_empty() {
        let mut v = st.rtt_cycles.clone();
        v.sort_unstable();
        let ns = |c: u64| c as f64 * 1e6 / khz.max(1) as f64;
        // Per mille.
        let q = |pm: usize| ns(v[(v.len() - 1) * pm / 1000]);
        println!(
            "echo: round trip p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us",
            q(500) / 1000.0,
            q(900) / 1000.0,
            q(990) / 1000.0,
            q(1000) / 1000.0
        );
    }
    if st.perfect() {
        println!("echo: ok — every packet came back intact and in order");
        Ok(ExitCode::SUCCESS)
    } else if a.rate.is_some() && st.corrupted == 0 && st.out_of_order == 0 && st.intact > 0 {
        // Open loop measures loss: what came back is intact and in order.
        #[allow(clippy::cast_precision_loss)]
        let pct = st.lost as f64 * 100.0 / st.sent.max(1) as f64;
        println!(
            "echo: ok — {pct:.2}% lost at {} packets/s offered; every echo intact and in order",
            a.rate.unwrap_or(0)
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("echo: FAILED");
        Ok(ExitCode::from(1))
    }
}

fn cmd_status(a: StatusArgs) -> Result<ExitCode, String> {
    let v = sidecore_vmm::daemon::query_status(&a.socket).map_err(|e| error_chain(&e))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?);
    } else {
        print!("{}", sidecore_vmm::daemon::format_status(&v));
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_bench(a: BenchArgs) -> Result<ExitCode, String> {
    use shm_proto::bench::{BenchOp, BenchPath};
    if a.throughput {
        return cmd_throughput(&a);
    }
    // irq and echo are timed by the host, each in VMs of their own.
    let (host_ops, guest_ops): (Vec<String>, Vec<String>) =
        a.ops.iter().map(|o| o.trim().to_string()).partition(|o| o == "irq" || o == "echo");
    let ops = if guest_ops.is_empty() {
        0
    } else {
        parse_mask("ops", &guest_ops, &BenchOp::ALL, BenchOp::name, |o| o as u32)
            .map_err(|e| format!("{e}, irq, echo"))?
    };
    let paths = parse_mask("paths", &a.paths, &BenchPath::ALL, BenchPath::name, |p| p as u32)?;
    let online = sidecore_vmm::host::online_cpus().map_err(|e| error_chain(&e))?;
    let side_cpu = a.sidecore.or(online.first().copied()).unwrap_or(0);
    let vcpu_list = match &a.vcpu_cpus {
        Some(s) => sidecore_vmm::host::parse_cpu_list(s).map_err(|e| format!("--vcpu-cpus: {e}"))?,
        None => run::default_vcpu_cpus(&online, &[side_cpu], a.vcpus.max(1)),
    };
    if vcpu_list.is_empty() {
        return Err("--vcpu-cpus: the list is empty".into());
    }
    let vcpu_cpu = vcpu_list[0];
    let want_sidecall = paths & (1 << BenchPath::Sidecall as u32) != 0;
    if want_sidecall && vcpu_list.iter().take(a.vcpus as usize).any(|c| *c == side_cpu) {
        eprintln!("sidecore: warning: a vCPU shares CPU {side_cpu} with the sidecore: its sidecalls wait for the scheduler and its floor is skipped");
    }
    let mut args = [0u64; 8];
    args[shm_proto::bench::arg::OPS] = ops;
    args[shm_proto::bench::arg::PATHS] = paths;
    args[shm_proto::bench::arg::ITERS] = a.iters.unwrap_or(0);
    args[shm_proto::bench::arg::WARMUP] = a.warmup.max(1);
    args[shm_proto::bench::arg::BLOCK] = a.block.clamp(1, shm_proto::bench::BENCH_BLOCK_SAMPLES as u64);
    let kvm = sidecore_vmm::host::open_kvm().map_err(|e| error_chain(&e))?;
    let tsc = sidecore_vmm::host::tsc_khz(&kvm).map_err(|e| error_chain(&e))?;
    let backend = sidecore_vmm::host::detect_backend(&kvm).map_err(|e| error_chain(&e))?;
    drop(kvm);
    let execution = sidecore_vmm::info::probe_execution();
    if !execution.native {
        eprintln!("sidecore: warning: guests do not run natively here: {}", execution.describe());
    }
    let collector = std::sync::Arc::new(sidecore_vmm::bench::BenchCollector::with_options(
        tsc.khz,
        Some(bench_progress()),
        a.vcpus > 1,
        a.idle_rings,
    ));
    let opts = RunOptions {
        spec: VmSpec {
            guest_path: "bundled guest-agent".into(),
            guest_elf: sidecore_vmm::BUNDLED_GUEST.to_vec(),
            mem_mib: a.mem,
            vcpus: a.vcpus,
            workload: Workload::Bench,
            args,
            sidecalls: false,
            sidecall_timeout_us: a.sidecall_timeout_us,
            shareable: false,
        },
        vcpu_cpus: Some(vcpu_list.clone()),
        sidecore_cpus: if want_sidecall { vec![side_cpu] } else { Vec::new() },
        console: ConsoleSink::Stdout,
        report_phases: false,
        bench: Some(collector.clone()),
        idle_rings: a.idle_rings,
        attach: None,
        idle_park: None,
        latency_phases: false,
        device: None,
    };
    if ops != 0 {
        let report = run::run(opts).map_err(|e| error_chain(&e))?;
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!();
        }
        if report.exit_code() != 0 {
            return Err(format!("the benchmark guest failed: {:?}", report.ends));
        }
    }
    bench_host_ops(&host_ops, paths, &a, side_cpu, vcpu_cpu, &collector)?;
    let rep = collector.report(sidecore_vmm::bench::ReportHeader {
        backend: backend.backend.name().into(),
        vcpu_cpu,
        vcpu_cpus: vcpu_list.iter().copied().cycle().take(a.vcpus.max(1) as usize).collect(),
        sidecore_cpu: side_cpu,
        timing_representative: execution.native,
        execution: execution.describe(),
    });
    print!("{}", rep.table());
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&rep).map_err(|e| format!("cannot encode the JSON report: {e}"))?;
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        let curves: Vec<sidecore_vmm::plot::Curve> = rep
            .curves
            .iter()
            .map(|(label, points)| sidecore_vmm::plot::Curve { label: label.clone(), points: points.clone() })
            .collect();
        let title = format!(
            "sidecore bench: latency CDFs ({} backend, vCPU on CPU {vcpu_cpu}, sidecore on CPU {side_cpu})",
            rep.backend
        );
        sidecore_vmm::plot::write_cdf_svg(path, &title, &curves).map_err(|e| error_chain(&e))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
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
            .and_then(|o| run::default_vcpu_cpus(&o, &a.sidecore, 1).first().copied())
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
    let execution = bench.as_ref().map(|_| sidecore_vmm::info::probe_execution());
    let report = run::run(opts).map_err(|e| error_chain(&e))?;
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

use sidecore_vmm::error_chain;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SIDECORE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Command::Run(a) => cmd_run(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Daemon(a) => cmd_daemon(a),
        Command::Status(a) => cmd_status(a),
        Command::Echo(a) => cmd_echo(a),
        Command::Info(a) => cmd_info(a.json),
    };
    match r {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("sidecore: {msg}");
            ExitCode::from(2)
        }
    }
}
