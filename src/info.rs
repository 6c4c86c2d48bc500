//! `sidecore info`: what this host offers a Sidecore user.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use shm_proto::boot::Workload;

use crate::host;
use crate::run::{self, ConsoleSink, RunOptions};
use crate::vm::VmSpec;

/// Iterations of the native-execution probe: ~30 µs when native, ~0.2 s
/// when every instruction is emulated.
const PROBE_ITERS: u64 = 100_000;
/// Below this many ns per iteration the guest runs natively (native is
/// ~0.3 ns, emulated ~2,000 ns).
const NATIVE_NS: f64 = 20.0;

/// Everything `info` reports.
#[derive(Debug, Serialize)]
pub struct HostInfo {
    /// `pvm`, `vmx` or `svm`.
    pub backend: String,
    /// Whether the PVM signature MSR confirmed the backend (PVM only).
    pub pvm_signature_ok: Option<bool>,
    /// KVM_GET_API_VERSION.
    pub kvm_api_version: i32,
    /// Online CPUs.
    pub online_cpus: Vec<usize>,
    /// Isolated CPUs (isolcpus=).
    pub isolated_cpus: Vec<usize>,
    /// TSC frequency.
    pub tsc_khz: u64,
    /// Where the TSC frequency came from.
    pub tsc_source: String,
    /// Whether a probe guest ran natively.
    pub guest_native: bool,
    /// The probe's ns per loop iteration.
    pub probe_ns_per_iteration: Option<f64>,
    /// Warnings and tuning advice.
    pub notes: Vec<String>,
}

/// Runs the spin workload briefly and returns its ns per iteration.
pub fn native_probe() -> Result<f64, Box<dyn std::error::Error>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let mut args = [0u64; 8];
    args[0] = PROBE_ITERS;
    let report = run::run(RunOptions {
        console: ConsoleSink::Capture(buf.clone()),
        ..RunOptions::new(VmSpec { sidecall_timeout_us: 1000, ..VmSpec::bundled(Workload::Spin, 1, 16, args) })
    })?;
    if report.exit_code() != 0 {
        return Err(format!("the probe guest failed: {:?}", report.ends).into());
    }
    let out = String::from_utf8_lossy(&buf.lock().map_err(|_| "probe console poisoned")?).into_owned();
    parse_spin_line(&out).ok_or_else(|| format!("the probe guest printed no spin line: {out:?}").into())
}

/// The number in a `spin: X ns/iteration` line.
pub fn parse_spin_line(out: &str) -> Option<f64> {
    out.lines().find_map(|l| l.strip_prefix("spin: ")?.strip_suffix(" ns/iteration")?.trim().parse().ok())
}

/// Gathers [`HostInfo`].
pub fn gather() -> Result<HostInfo, Box<dyn std::error::Error>> {
    let kvm = host::open_kvm()?;
    let b = host::detect_backend(&kvm)?;
    let tsc = host::tsc_khz(&kvm)?;
    let online = host::online_cpus()?;
    let isolated = host::isolated_cpus().unwrap_or_default();
    let mut notes = b.warnings.clone();
    let probe = native_probe();
    let (native, ns) = match probe {
        Ok(ns) => (ns < NATIVE_NS, Some(ns)),
        Err(e) => {
            notes.push(format!("native-execution probe failed: {e}"));
            (false, None)
        }
    };
    if isolated.is_empty() {
        notes.push("no isolated CPUs: for stable latency boot with isolcpus=/nohz_full= on the sidecore CPU".into());
    }
    if online.len() < 2 {
        notes.push("one online CPU: the sidecore and the vCPU will share it and sidecalls will time out".into());
    }
    if !native {
        notes.push("guests do not run natively here: every guest instruction is emulated (~2 µs each)".into());
    }
    Ok(HostInfo {
        backend: b.backend.name().into(),
        pvm_signature_ok: (b.backend == shm_proto::boot::Backend::Pvm).then_some(b.pvm_signature_ok),
        kvm_api_version: kvm.get_api_version(),
        online_cpus: online,
        isolated_cpus: isolated,
        tsc_khz: tsc.khz,
        tsc_source: tsc.source.into(),
        guest_native: native,
        probe_ns_per_iteration: ns,
        notes,
    })
}

/// `sidecore info [--json]`.
pub fn cmd_info(json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let i = gather()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&i)?);
        return Ok(());
    }
    println!(
        "backend          {}{}",
        i.backend,
        match i.pvm_signature_ok {
            Some(true) => " (PVM signature MSR confirmed)",
            Some(false) => " (PVM signature MSR did NOT confirm)",
            None => "",
        }
    );
    println!("KVM API version  {}", i.kvm_api_version);
    println!("online CPUs      {}", host::format_cpu_list(&i.online_cpus));
    println!(
        "isolated CPUs    {}",
        if i.isolated_cpus.is_empty() { "none".into() } else { host::format_cpu_list(&i.isolated_cpus) }
    );
    println!("TSC              {} kHz (from {})", i.tsc_khz, i.tsc_source);
    match i.probe_ns_per_iteration {
        Some(ns) => {
            println!("guest native     {} ({ns:.2} ns per loop iteration)", if i.guest_native { "yes" } else { "NO" })
        }
        None => println!("guest native     unknown"),
    }
    for n in &i.notes {
        println!("note: {n}");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn spin_line_parses() {
        assert_eq!(parse_spin_line("x\nspin: 0.312 ns/iteration\n"), Some(0.312));
        assert_eq!(parse_spin_line("spin: abc ns/iteration"), None);
        assert_eq!(parse_spin_line(""), None);
    }
}
