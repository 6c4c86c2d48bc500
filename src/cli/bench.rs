//! `sidecore bench`: the guest-timed ops in one VM, the host-timed ones
//! (irq, echo) in VMs of their own, the table, JSON and plot; and
//! `--throughput`.

use std::process::ExitCode;

use shm_proto::boot::Workload;
use sidecore_vmm::error_chain;
use sidecore_vmm::scenarios::EventPath;
use sidecore_vmm::vmm::vm::VmSpec;
use sidecore_vmm::vmm::{self, ConsoleSink, RunOptions};

use crate::BenchArgs;

/// The bench's progress on stderr: one updating line on a terminal, one
/// line per series in a log.
pub(crate) fn bench_progress() -> sidecore_vmm::bench::ProgressFn {
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

pub(crate) fn cmd_throughput(a: &BenchArgs) -> Result<ExitCode, String> {
    use sidecore_core::throughput::{capacity, measure, sweep_cost_per_ring};
    let online = sidecore_vmm::host::online_cpus().map_err(|e| error_chain(&e))?;
    let side_cpu = a.sidecore.or(online.first().copied()).unwrap_or(0);
    let prod_cpu = vmm::default_vcpu_cpus(&online, &[side_cpu], 1).first().copied().unwrap_or(0);
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
    let rate = sidecore_core::tsc::TscRate::from_khz(khz);
    let cyc_ns = |c: u64| rate.ns(c);
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

pub(crate) fn parse_mask<T: Copy>(
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

/// The host-timed ops: `irq` (event delivery: the sidecore posts, the guest
/// acknowledges; sidecall = posted event to a polling vCPU, kernel = an
/// interrupt through the in-kernel LAPIC) and `echo` (a packet's round trip
/// from the load generator through the guest and back; sidecall = the
/// sidecore's device, user = the exit-path device). Each path in a VM of its
/// own, with floor blocks measured before and after it.
pub(crate) fn bench_host_ops(
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
        let variants: Vec<(BenchPath, EventPath)> = match op.as_str() {
            "irq" => vec![(BenchPath::Sidecall, EventPath::Posted), (BenchPath::Kernel, EventPath::Interrupt)],
            _ => vec![(BenchPath::Sidecall, EventPath::Posted), (BenchPath::User, EventPath::Interrupt)],
        };
        // echo also with several VMs at once, attached to a daemon.
        let vm_counts: Vec<usize> = if op == "echo" && a.echo_vms > 1 { vec![1, a.echo_vms] } else { vec![1] };
        for vms in vm_counts {
            let label = if vms > 1 { format!("{op}-{vms}vm") } else { op.clone() };
            for (path, events) in variants.iter().copied().filter(|(p, _)| want(*p)) {
                eprintln!("bench: {label} / {} ...", path.name());
                floor(&label)?;
                let samples = if op == "irq" {
                    let (s, lost, _) = sidecore_vmm::scenarios::run_irq(events, n, side, vcpu)?;
                    if lost > 0 {
                        eprintln!("bench: irq / {}: {lost} events got no acknowledgement within 50 ms", path.name());
                    }
                    s
                } else {
                    let cfg = sidecore_vmm::scenarios::EchoConfig {
                        path: events,
                        count: n as u64,
                        size: 64,
                        rate: None,
                        sidecore_cpu: side,
                        vcpu_cpu: vcpu,
                        spin_us: 200,
                        toggle_every: 0,
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

pub(crate) fn cmd_bench(a: BenchArgs) -> Result<ExitCode, String> {
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
        None => vmm::default_vcpu_cpus(&online, &[side_cpu], a.vcpus.max(1)),
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
    let execution = sidecore_vmm::scenarios::info::probe_execution();
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
        vm_name: None,
        idle_park: None,
        latency_phases: false,
        device: None,
    };
    if ops != 0 {
        let report = vmm::run(opts).map_err(|e| super::run_error(&e))?;
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
        let curves: Vec<sidecore_vmm::bench::plot::Curve> = rep
            .curves
            .iter()
            .map(|(label, points)| sidecore_vmm::bench::plot::Curve { label: label.clone(), points: points.clone() })
            .collect();
        let title = format!(
            "sidecore bench: latency CDFs ({} backend, vCPU on CPU {vcpu_cpu}, sidecore on CPU {side_cpu})",
            rep.backend
        );
        sidecore_vmm::bench::plot::write_cdf_svg(path, &title, &curves).map_err(|e| error_chain(&e))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
