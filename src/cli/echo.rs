//! `sidecore echo`: the packet device under load.

use std::process::ExitCode;

use sidecore_vmm::error_chain;
use sidecore_vmm::scenarios::EventPath;
use sidecore_vmm::vmm;

use super::CliError;
use crate::{EchoArgs, EchoPath};

pub(crate) fn cmd_echo(a: EchoArgs) -> Result<ExitCode, CliError> {
    let (path, path_name) = match a.path {
        EchoPath::Sidecall => (EventPath::Posted, "sidecall"),
        EchoPath::Exit => (EventPath::Interrupt, "exit"),
    };
    let online = sidecore_vmm::host::online_cpus().map_err(|e| error_chain(&e))?;
    let side = a.sidecore.or(online.first().copied()).unwrap_or(0);
    let vcpu = a.vcpu_cpu.or(online.last().copied()).unwrap_or(0);
    vmm::check_online("--sidecore", &[side], &online).map_err(|e| CliError::Usage(error_chain(&e)))?;
    vmm::check_online("--vcpu-cpu", &[vcpu], &online).map_err(|e| CliError::Usage(error_chain(&e)))?;
    // The sidecall path's sidecore (this process's, or the daemon's started
    // for several VMs) runs on `side`; a named daemon's cores are its own.
    if a.path == EchoPath::Sidecall && a.attach.is_none() {
        super::warn_shared_cores(
            &[side],
            &[vcpu],
            if online.len() > 1 {
                "Pass --sidecore and --vcpu-cpu two different CPUs (by default the first and the last online)."
            } else {
                "This host has one online CPU, so they cannot be apart: expect slow echoes."
            },
        );
    }
    let khz =
        sidecore_vmm::host::open_kvm().and_then(|k| sidecore_vmm::host::tsc_khz(&k)).map_err(|e| error_chain(&e))?.khz;
    let cfg = sidecore_vmm::scenarios::EchoConfig {
        path,
        count: a.count,
        size: a.size,
        rate: a.rate,
        sidecore_cpu: side,
        vcpu_cpu: vcpu,
        spin_us: a.spin_us,
        toggle_every: a.toggle_every,
        vms: a.vms,
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
        path_name,
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
        let rate = sidecore_core::tsc::TscRate::from_khz(khz);
        let ns = |c: u64| rate.ns(c);
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
