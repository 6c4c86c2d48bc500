//! `sidecore completions` and `sidecore manpage`: the shell completion
//! scripts and roff manual pages, generated from the argument definitions
//! so they cannot fall behind them.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use super::CliError;

/// Writes `bytes` to stdout; a closed pipe or full disk is the work failing.
fn write_stdout(bytes: &[u8], what: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::Runtime(format!("writing the {what} to stdout: {e}")))
}

pub(crate) fn cmd_completions(shell: clap_complete::Shell, mut cmd: clap::Command) -> Result<ExitCode, CliError> {
    // Into a buffer: clap_complete panics on a write error, this reports it.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "sidecore", &mut script);
    write_stdout(&script, &format!("{shell} completion script"))?;
    Ok(ExitCode::SUCCESS)
}

/// The roff page of `cmd` (already built, so subcommands carry their full
/// names: `sidecore-run`, usage `sidecore run ...`).
fn render_page(cmd: &clap::Command) -> Result<Vec<u8>, CliError> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .source(concat!("sidecore ", env!("CARGO_PKG_VERSION")))
        .render(&mut page)
        .map_err(|e| CliError::Runtime(format!("rendering the manual page of {}: {e}", cmd.get_name())))?;
    Ok(page)
}

/// The pages: `sidecore.1`, then `sidecore-<command>.1` for every command
/// but clap's `help`.
pub(crate) fn manual_pages(mut cmd: clap::Command) -> Result<Vec<(String, Vec<u8>)>, CliError> {
    cmd.build();
    let mut pages = vec![("sidecore.1".to_string(), render_page(&cmd)?)];
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = sub.get_display_name().map_or_else(|| format!("sidecore-{}", sub.get_name()), str::to_string);
        pages.push((format!("{name}.1"), render_page(sub)?));
    }
    Ok(pages)
}

pub(crate) fn cmd_manpage(out: Option<&Path>, cmd: clap::Command) -> Result<ExitCode, CliError> {
    let Some(dir) = out else {
        let mut cmd = cmd;
        cmd.build();
        write_stdout(&render_page(&cmd)?, "manual page")?;
        return Ok(ExitCode::SUCCESS);
    };
    std::fs::create_dir_all(dir).map_err(|e| {
        CliError::Runtime(format!("cannot create the --out directory {}: {e} — pick a writable one", dir.display()))
    })?;
    let pages = manual_pages(cmd)?;
    for (name, page) in &pages {
        let path = dir.join(name);
        std::fs::write(&path, page).map_err(|e| CliError::Runtime(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(ExitCode::SUCCESS)
}
