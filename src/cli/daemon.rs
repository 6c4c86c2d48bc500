//! `sidecore daemon` and `sidecore status`.

use std::process::ExitCode;

use sidecore_vmm::error_chain;
use sidecore_vmm::vmm;

use super::CliError;
use crate::{DaemonArgs, StatusArgs};

pub(crate) fn cmd_daemon(a: DaemonArgs) -> Result<ExitCode, CliError> {
    let cores = a.cores.0;
    let online = sidecore_vmm::host::online_cpus().map_err(|e| error_chain(&e))?;
    vmm::check_online("--cores", &cores, &online).map_err(|e| CliError::Usage(error_chain(&e)))?;
    let cfg = sidecore_vmm::daemon::DaemonConfig {
        socket: a.socket,
        cores,
        idle_park: (a.idle_park_us > 0).then(|| std::time::Duration::from_micros(a.idle_park_us)),
        group: a.group,
        metrics: a.metrics,
        seccomp: !a.no_seccomp,
        vhost_blk: a.vhost_user_blk,
    };
    let listening = |cfg: &sidecore_vmm::daemon::DaemonConfig| {
        tracing::info!(
            socket = %cfg.socket.display(),
            cpus = %sidecore_vmm::host::format_cpu_list(&cfg.cores),
            protocol = sidecore_vmm::daemon::protocol::PROTOCOL_VERSION,
            "listening"
        );
    };
    sidecore_vmm::daemon::run_daemon(&cfg, listening).map_err(|e| super::daemon_error(&e))?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn cmd_status(a: StatusArgs) -> Result<ExitCode, CliError> {
    let r = sidecore_vmm::daemon::query_status(&a.socket).map_err(|e| error_chain(&e))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).map_err(|e| format!("writing the JSON: {e}"))?);
    } else {
        print!("{}", sidecore_vmm::daemon::format_status(&r));
    }
    Ok(ExitCode::SUCCESS)
}
