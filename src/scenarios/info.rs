//! `sidecore info`: what this host offers a Sidecore user.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use shm_proto::boot::Workload;

use crate::host;
use crate::vmm::vm::VmSpec;
use crate::vmm::{self, ConsoleSink, RunOptions};

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
    /// Whether guests run natively.
    pub guest_native: bool,
    /// The probe's ns per loop iteration.
    pub probe_ns_per_iteration: Option<f64>,
    /// How guests execute, and why not natively.
    pub execution: Execution,
    /// Warnings and tuning advice.
    pub notes: Vec<String>,
}

/// How guests execute on this host, decided once from the host's CPU and a
/// probe guest.
#[derive(Clone, Debug, Serialize)]
pub struct Execution {
    /// Whether guests run natively (timings mean something).
    pub native: bool,
    /// The probe guest's ns per loop iteration, if it ran.
    pub probe_ns_per_iteration: Option<f64>,
    /// What translates this host's own instructions (`QEMU TCG`), if any.
    pub host_emulator: Option<String>,
    /// Why guests are not native, or why the probe could not tell.
    pub why_not: Option<String>,
}

impl Execution {
    /// One line for `info` and for bench headers.
    pub fn describe(&self) -> String {
        let ns = self.probe_ns_per_iteration.map(|ns| format!(" ({ns:.2} ns per loop iteration)")).unwrap_or_default();
        match (&self.why_not, self.native) {
            (None, true) => format!("yes{ns}"),
            (Some(why), _) => format!("no{ns}: {why}"),
            (None, false) => format!("no{ns}"),
        }
    }
}

/// Decides [`Execution`]: native only if the probe guest ran at native speed
/// and nothing translates the host's own instructions (under QEMU TCG a
/// guest's loop runs at a few ns per iteration: far slower than native, far
/// faster than KVM's instruction emulator, so the probe alone cannot tell).
pub fn probe_execution() -> Execution {
    let host_emulator = host::cpu_emulator(host::hypervisor_signature().as_deref());
    let probe = native_probe();
    let ns = probe.as_ref().ok().copied();
    let why_not = match (host_emulator, &probe) {
        (Some(e), _) => Some(format!(
            "this host's CPU is emulated by {e} (every instruction, the guest's included, is translated): timings here are not representative"
        )),
        (None, Err(e)) => Some(format!("the native-execution probe failed: {e}")),
        (None, Ok(ns)) if *ns >= NATIVE_NS => {
            Some("every guest instruction is emulated by KVM (~2 µs each): timings here are not representative".into())
        }
        (None, Ok(_)) => None,
    };
    Execution {
        native: why_not.is_none(),
        probe_ns_per_iteration: ns,
        host_emulator: host_emulator.map(Into::into),
        why_not,
    }
}

/// Runs the spin workload briefly and returns its ns per iteration.
pub fn native_probe() -> Result<f64, Box<dyn std::error::Error>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let mut args = [0u64; 8];
    args[shm_proto::args::spin::ITERS] = PROBE_ITERS;
    let report = vmm::run(RunOptions {
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
    let execution = probe_execution();
    if isolated.is_empty() {
        notes.push("no isolated CPUs: for stable latency boot with isolcpus=/nohz_full= on the sidecore CPU".into());
    }
    if online.len() < 2 {
        notes.push("one online CPU: the sidecore and the vCPU will share it and sidecalls will time out".into());
    }

    Ok(HostInfo {
        backend: b.backend.name().into(),
        pvm_signature_ok: (b.backend == shm_proto::boot::Backend::Pvm).then_some(b.pvm_signature_ok),
        kvm_api_version: kvm.get_api_version(),
        online_cpus: online,
        isolated_cpus: isolated,
        tsc_khz: tsc.khz,
        tsc_source: tsc.source.into(),
        guest_native: execution.native,
        probe_ns_per_iteration: execution.probe_ns_per_iteration,
        execution,
        notes,
    })
}

/// The report as `sidecore info` prints it, one fact per line.
pub fn text(i: &HostInfo) -> String {
    let mut s = format!(
        "backend          {}{}\n",
        i.backend,
        match i.pvm_signature_ok {
            Some(true) => " (PVM signature MSR confirmed)",
            Some(false) => " (PVM signature MSR did NOT confirm)",
            None => "",
        }
    );
    s += &format!("KVM API version  {}\n", i.kvm_api_version);
    s += &format!("online CPUs      {}\n", host::format_cpu_list(&i.online_cpus));
    s += &format!(
        "isolated CPUs    {}\n",
        if i.isolated_cpus.is_empty() { "none".into() } else { host::format_cpu_list(&i.isolated_cpus) }
    );
    s += &format!("TSC              {} kHz (from {})\n", i.tsc_khz, i.tsc_source);
    s += &format!("guest native     {}\n", i.execution.describe());
    for n in &i.notes {
        s += &format!("note: {n}\n");
    }
    s
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn execution_says_why_not() {
        let e = Execution { native: true, probe_ns_per_iteration: Some(0.31), host_emulator: None, why_not: None };
        assert_eq!(e.describe(), "yes (0.31 ns per loop iteration)");
        let e = Execution {
            native: false,
            probe_ns_per_iteration: Some(2.46),
            host_emulator: Some("QEMU TCG".into()),
            why_not: Some("emulated".into()),
        };
        assert_eq!(e.describe(), "no (2.46 ns per loop iteration): emulated");
    }

    #[test]
    fn spin_line_parses() {
        assert_eq!(parse_spin_line("x\nspin: 0.312 ns/iteration\n"), Some(0.312));
        assert_eq!(parse_spin_line("spin: abc ns/iteration"), None);
        assert_eq!(parse_spin_line(""), None);
    }
}
