//! `sidecore info`.

use std::process::ExitCode;

use sidecore_vmm::error_chain;

use super::CliError;

pub(crate) fn cmd_info(json: bool) -> Result<ExitCode, CliError> {
    let i = sidecore_vmm::scenarios::info::gather().map_err(|e| error_chain(&*e))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&i).map_err(|e| format!("writing the JSON: {e}"))?);
    } else {
        print!("{}", sidecore_vmm::scenarios::info::text(&i));
    }
    Ok(ExitCode::SUCCESS)
}
