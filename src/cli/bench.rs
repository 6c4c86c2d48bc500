//! `sidecore bench`: the guest-timed ops in one VM, the host-timed ones
//! (irq, echo) in VMs of their own, the table, JSON and plot; and
//! `--throughput`.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use shm_proto::boot::Workload;
use sidecore_vmm::error_chain;
use sidecore_vmm::scenarios::EventPath;
use sidecore_vmm::vmm::vm::VmSpec;
use sidecore_vmm::vmm::{self, ConsoleSink, RunOptions};

use sidecore_vmm::bench::example_block;
use sidecore_vmm::bench::selection::{OpChoice, Selection};
use sidecore_vmm::bench::BenchReport;

use crate::BenchArgs;

/// The bench's progress on stderr: a bar with the samples taken and an ETA
/// on a terminal; in a log, one line as each series starts.
#[derive(Clone)]
pub(crate) struct BenchProgress {
    bar: ProgressBar,
    tty: bool,
}

impl BenchProgress {
    /// `total` samples expected (`None`: unknown, a spinner).
    pub(crate) fn new(total: Option<u64>) -> BenchProgress {
        let tty = std::io::stderr().is_terminal();
        let bar = if !tty {
            ProgressBar::hidden()
        } else if let Some(total) = total {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("bench: {msg:<28} [{bar:30}] {human_pos}/{human_len} samples, ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar
        } else {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("bench: {spinner} {msg} {human_pos} samples")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            bar.set_style(style);
            bar
        };
        BenchProgress { bar, tty }
    }

    /// A series starts.
    fn series(&self, what: &str) {
        if self.tty {
            self.bar.set_message(what.to_string());
        } else {
            eprintln!("bench: {what} ...");
        }
    }

    /// A line that is not progress (a warning), above the bar.
    fn note(&self, line: &str) {
        if self.tty {
            self.bar.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    /// `n` samples taken.
    fn taken(&self, n: u64) {
        self.bar.inc(n);
    }

    /// The run is over: the bar goes.
    fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// The collector's callback: told of every block of the guest.
    pub(crate) fn callback(&self) -> sidecore_vmm::bench::ProgressFn {
        let me = self.clone();
        Box::new(move |p: sidecore_vmm::bench::BlockProgress<'_>| {
            if p.total == p.block {
                me.series(&format!("vCPU {}: {} / {}", p.vcpu, p.op.name(), p.label));
            }
            me.taken(p.block);
        })
    }
}

/// Progress for a run of the bench workload whose length is not known
/// (`sidecore run --workload bench`).
pub(crate) fn bench_progress() -> sidecore_vmm::bench::ProgressFn {
    BenchProgress::new(None).callback()
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

/// The sidecore's CPU (--sidecore, else the first online) and its
/// partner's (the first of --vcpu-cpus, else the first other online CPU),
/// for the benches that boot no guest.
fn two_cpus(a: &BenchArgs) -> Result<(usize, usize), String> {
    let online = sidecore_vmm::host::online_cpus().map_err(|e| error_chain(&e))?;
    let side_cpu = a.sidecore.or(online.first().copied()).unwrap_or(0);
    let other = match &a.vcpu_cpus {
        Some(s) => sidecore_vmm::host::parse_cpu_list(s).map_err(|e| format!("--vcpu-cpus: {e}"))?.first().copied(),
        None => vmm::default_vcpu_cpus(&online, &[side_cpu], 1).first().copied(),
    }
    .ok_or("--vcpu-cpus: the list is empty")?;
    Ok((side_cpu, other))
}

/// `--steps`: what each step of the slot protocol costs, as host-to-host
/// ping-pongs on the sidecore's and the vCPU's CPUs.
pub(crate) fn cmd_steps(a: &BenchArgs) -> Result<ExitCode, String> {
    use sidecore_core::steps::{measure, Step};
    let (side_cpu, caller_cpu) = two_cpus(a)?;
    if caller_cpu == side_cpu {
        return Err(format!("--steps needs two CPUs: the caller and the server are both on CPU {side_cpu}; pass --sidecore and --vcpu-cpus"));
    }
    let khz = match sidecore_vmm::host::open_kvm() {
        Ok(kvm) => sidecore_vmm::host::tsc_khz(&kvm).map_err(|e| error_chain(&e))?.khz,
        Err(_) => {
            sidecore_vmm::host::tsc_khz_without_kvm()
                .ok_or("cannot tell the TSC rate: no /dev/kvm and no tsc frequency from the kernel")?
                .khz
        }
    };
    let rate = sidecore_core::tsc::TscRate::from_khz(khz);
    const N: usize = 200_000;
    // Three rounds, interleaved, so that a slow moment hits every step; the
    // median of each step's three medians is reported.
    let mut p50 = vec![Vec::new(); Step::ALL.len()];
    for round in 1..=3 {
        eprintln!("steps: round {round} of 3 ...");
        for (i, step) in Step::ALL.iter().enumerate() {
            let mut s = measure(*step, caller_cpu, side_cpu, N).map_err(|e| error_chain(&e))?;
            s.sort_unstable();
            p50[i].push(rate.ns(s[s.len() / 2]));
        }
    }
    let med: Vec<f64> = p50
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    println!("slot protocol, step by step — host-to-host ping-pong, caller on CPU {caller_cpu}, server on CPU {side_cpu}, {N} round trips x 3 rounds");
    println!("\n{:<40} {:>10} {:>8}", "step", "p50 ns", "/line");
    for (step, ns) in Step::ALL.iter().zip(&med) {
        println!("{:<40} {:>10.1} {:>8.2}", step.name(), ns, ns / med[0]);
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "caller_cpu": caller_cpu,
            "server_cpu": side_cpu,
            "round_trips": N,
            "steps": Step::ALL.iter().zip(&med).map(|(s, ns)| serde_json::json!({"step": s.name(), "p50_ns": ns, "per_line": ns / med[0]})).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&v).map_err(|e| e.to_string())? + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `--vhost-user-blk`: the sidecore daemon's vhost-user-blk backend beside
/// qemu-storage-daemon, driven by this process as the frontend.
pub(crate) fn cmd_vhost_blk(a: &BenchArgs) -> Result<ExitCode, String> {
    use sidecore_vmm::bench::vhost_blk::{run, BenchConfig};
    let (backend_cpu, frontend_cpu) = two_cpus(a)?;
    if frontend_cpu == backend_cpu {
        eprintln!("sidecore: warning: the frontend shares CPU {backend_cpu} with the backend: a polling backend and a spinning frontend take turns");
    }
    let cfg = BenchConfig {
        qd1_requests: a.vhost_blk_requests,
        deep_time: std::time::Duration::from_secs(a.vhost_blk_seconds),
        backend_cpu,
        frontend_cpu,
        ..BenchConfig::default()
    };
    let rep = run(&cfg, &|line: &str| eprintln!("{line}")).map_err(|e| error_chain(&e))?;
    print!("{}", rep.table());
    if let Some(path) = &a.json {
        // KVM facts are provenance only: this bench runs no guest.
        let (backend, khz) = match sidecore_vmm::host::open_kvm() {
            Ok(kvm) => (
                sidecore_vmm::host::detect_backend(&kvm)
                    .map(|b| b.backend.name().to_string())
                    .unwrap_or_else(|_| "unknown".into()),
                sidecore_vmm::host::tsc_khz(&kvm).map(|t| t.khz).unwrap_or(0),
            ),
            Err(_) => ("none".into(), sidecore_vmm::host::tsc_khz_without_kvm().map_or(0, |t| t.khz)),
        };
        let prov =
            sidecore_vmm::bench::provenance::Provenance::collect(&backend, khz, backend_cpu, &[frontend_cpu], true);
        let text = serde_json::to_string_pretty(&rep.to_json(&prov))
            .map_err(|e| format!("cannot encode the JSON report: {e}"))?;
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        let title = format!(
            "sidecore bench --vhost-user-blk: request latency CDFs (backend on CPU {backend_cpu}, frontend on CPU {frontend_cpu})"
        );
        sidecore_vmm::bench::plot::write_cdf_svg(path, &title, &rep.curves()).map_err(|e| error_chain(&e))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The host-timed ops: `irq` (event delivery: the sidecore posts, the guest
/// acknowledges; sidecall = posted event to a polling vCPU, kernel = an
/// interrupt through the in-kernel LAPIC) and `echo` (a packet's round trip
/// from the load generator through the guest and back; sidecall = the
/// sidecore's device, user = the exit-path device). Each path in a VM of its
/// own, with floor blocks measured before and after it.
pub(crate) fn bench_host_ops(
    sel: &Selection,
    side: usize,
    vcpu: usize,
    collector: &sidecore_vmm::bench::BenchCollector,
    progress: &BenchProgress,
) -> Result<(), String> {
    use shm_proto::bench::BenchPath;
    let n = sel.host_iters();
    let floor = |op: &str| -> Result<(), String> {
        collector.add_host_floor(op, &sidecore_vmm::bench::measure_floor(side, vcpu, 2000)?);
        Ok(())
    };
    for (label, vms, paths) in sel.host_series() {
        let irq = label == OpChoice::Irq.name();
        for path in paths {
            // The exit paths take interrupts; the sidecall path, posted events.
            let events = if path == BenchPath::Sidecall { EventPath::Posted } else { EventPath::Interrupt };
            progress.series(&format!("{label} / {}", path.name()));
            floor(&label)?;
            let samples = if irq {
                let (s, lost, _) = sidecore_vmm::scenarios::run_irq(events, n, side, vcpu)?;
                if lost > 0 {
                    progress.note(&format!(
                        "bench: irq / {}: {lost} events got no acknowledgement within 50 ms",
                        path.name()
                    ));
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
            progress.taken(n as u64);
            floor(&label)?;
        }
    }
    Ok(())
}

/// `--compare A B`: both results' series side by side.
fn cmd_compare(a: &Path, b: &Path) -> Result<ExitCode, String> {
    let ra = BenchReport::load(a).map_err(|e| error_chain(&e))?;
    let rb = BenchReport::load(b).map_err(|e| error_chain(&e))?;
    let c = sidecore_vmm::bench::compare::compare(&ra, &rb).map_err(|e| error_chain(&e))?;
    print!("{}", c.table((&a.display().to_string(), &b.display().to_string())));
    Ok(ExitCode::SUCCESS)
}

/// `--render-readme FILE.json`: the README's example block for it, with
/// the plot beside it (same name, `.svg`) when there is one.
fn cmd_render_readme(json: &Path) -> Result<ExitCode, String> {
    let rep = BenchReport::load(json).map_err(|e| error_chain(&e))?;
    let svg = json.with_extension("svg");
    let svg = svg.exists().then(|| svg.display().to_string());
    print!("{}", example_block::render(&rep, &json.display().to_string(), svg.as_deref()));
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn cmd_bench(a: BenchArgs) -> Result<ExitCode, String> {
    use shm_proto::bench::BenchPath;
    if let Some(files) = &a.compare {
        return match files.as_slice() {
            [x, y] => cmd_compare(x, y),
            // clap takes exactly two.
            _ => Err("--compare takes two files: A.json B.json".into()),
        };
    }
    if let Some(json) = &a.render_readme {
        return cmd_render_readme(json);
    }
    if a.steps {
        return cmd_steps(&a);
    }
    if a.throughput {
        return cmd_throughput(&a);
    }
    if a.vhost_user_blk {
        return cmd_vhost_blk(&a);
    }
    // irq and echo are timed by the host, each in VMs of their own.
    let sel = Selection::new(&a.ops, &a.paths, a.echo_vms, a.idle_rings, a.iters);
    let (ops, paths) = (sel.guest_ops, sel.paths);
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
    args[shm_proto::bench::arg::WARMUP] = a.warmup;
    args[shm_proto::bench::arg::BLOCK] = a.block;
    let kvm = sidecore_vmm::host::open_kvm().map_err(|e| error_chain(&e))?;
    let tsc = sidecore_vmm::host::tsc_khz(&kvm).map_err(|e| error_chain(&e))?;
    let backend = sidecore_vmm::host::detect_backend(&kvm).map_err(|e| error_chain(&e))?;
    drop(kvm);
    let execution = sidecore_vmm::scenarios::info::probe_execution();
    if !execution.native {
        eprintln!("sidecore: warning: guests do not run natively here: {}", execution.describe());
    }
    let progress = BenchProgress::new(Some(sel.expected_samples(a.vcpus)));
    let collector = std::sync::Arc::new(sidecore_vmm::bench::BenchCollector::with_options(
        tsc.khz,
        Some(progress.callback()),
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
        let report = vmm::run(opts).map_err(|e| {
            progress.finish();
            super::run_error(&e)
        })?;
        if report.exit_code() != 0 {
            progress.finish();
            return Err(format!("the benchmark guest failed: {:?}", report.ends));
        }
    }
    let host = bench_host_ops(&sel, side_cpu, vcpu_cpu, &collector, &progress);
    progress.finish();
    host?;
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
