//! The `sidecore` binary as an operator meets it: exit statuses, value
//! lists in --help and in errors, plain logs off a terminal, JSON logs,
//! completions, manual pages, and the warning for a vCPU on a sidecore's CPU.

mod common;

use std::process::{Command, Output, Stdio};

use common::kvm_available;

/// `sidecore args..` with stdin closed and stdout/stderr piped; the
/// caller's log settings do not leak in.
fn sidecore(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sidecore"));
    c.args(args).stdin(Stdio::null()).env_remove("SIDECORE_LOG").env_remove("SIDECORE_LOG_FORMAT");
    c.env_remove("NO_COLOR").env_remove("SIDECORE_VCPU_CPUS");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap_or_else(|e| panic!("cannot run sidecore {args:?}: {e}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The workloads `run` runs; echo and irq belong to `echo` and `bench`.
const RUN_WORKLOADS: [&str; 9] =
    ["hello", "spin", "selftest", "bench", "pagefault", "chaos", "wake", "gpascan", "toggle"];

#[test]
fn a_bad_workload_is_a_usage_error_that_lists_the_valid_ones() {
    let o = sidecore(&["run", "--workload", "nope"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("'nope'"), "{e}");
    for w in RUN_WORKLOADS {
        assert!(e.contains(w), "the error does not list {w}: {e}");
    }
}

#[test]
fn hand_checked_argument_errors_exit_2_too() {
    // A workload another command runs: rejected by sidecore, not by clap.
    let o = sidecore(&["run", "--workload", "echo"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("sidecore echo"), "{}", stderr(&o));
    let nine: Vec<&str> = (0..9).flat_map(|_| ["--arg", "1"]).collect();
    let o = sidecore(&[&["run"][..], &nine].concat(), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--arg"), "{}", stderr(&o));
    // A CPU that is not online (no host has 4096 CPUs online here).
    let o = sidecore(&["run", "--sidecore", "4000"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not online"), "{}", stderr(&o));
}

#[test]
fn ranges_are_enforced_and_shown() {
    for (args, shown) in [
        (&["run", "--vcpus", "0"][..], "1..="),
        (&["run", "--mem", "1"][..], "4..=3072"),
        (&["echo", "--size", "4"][..], "8..=2048"),
        (&["echo", "--vms", "0"][..], "1.."),
    ] {
        let o = sidecore(args, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(shown), "{args:?}: {}", stderr(&o));
    }
    let help = stdout(&sidecore(&["run", "--help"], &[]));
    assert!(help.contains("the guest-agent 4 to 256") && help.contains("32 to 3072"), "{help}");
    assert!(help.contains("(1 to "), "{help}");
}

#[test]
fn runtime_failures_exit_1() {
    let o = sidecore(&["status", "--socket", "/nonexistent/x.sock"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).starts_with("sidecore: "), "{}", stderr(&o));
    let o = sidecore(&["run", "--guest", "/nonexistent/guest.elf"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/guest.elf"), "{}", stderr(&o));
}

#[test]
fn run_help_lists_every_workload_and_the_exit_statuses() {
    let o = sidecore(&["run", "--help"], &[]);
    assert!(o.status.success());
    let help = stdout(&o);
    for w in RUN_WORKLOADS {
        assert!(help.contains(&format!("- {w}:")), "run --help does not describe {w}:\n{help}");
    }
    for line in ["Exit status:", "3 the", "4 a vCPU faulted", "2 usage error"] {
        assert!(help.replace('\n', " ").contains(line), "run --help lacks {line:?}:\n{help}");
    }
}

#[test]
fn main_help_documents_logs_and_the_new_commands() {
    let help = stdout(&sidecore(&["--help"], &[]));
    for s in ["SIDECORE_LOG", "NO_COLOR", "--log-format", "SIDECORE_LOG_FORMAT", "completions", "manpage"] {
        assert!(help.contains(s), "--help lacks {s}:\n{help}");
    }
}

#[test]
fn completions_print_a_script() {
    let o = sidecore(&["completions", "bash"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let script = stdout(&o);
    assert!(script.contains("sidecore"), "{script}");
    assert!(script.contains("complete"), "{script}");
    assert!(script.contains("--workload"), "{script}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let o = sidecore(&["completions", shell], &[]);
        assert!(o.status.success() && !o.stdout.is_empty(), "{shell}: {}", stderr(&o));
    }
    assert_eq!(sidecore(&["completions", "tcsh"], &[]).status.code(), Some(2));
}

#[test]
fn manpage_writes_a_page_per_command() {
    let dir = std::env::temp_dir().join(format!("sidecore-test-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = sidecore(&["manpage", "--out", dir.to_str().expect("utf-8 temp dir")], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let main = std::fs::read_to_string(dir.join("sidecore.1")).expect("sidecore.1 written");
    // Roff throughout; the title header comes after clap_mangen's quote-string setup.
    assert!(main.lines().take(5).any(|l| l.starts_with(".TH sidecore 1")), "no roff header:\n{main}");
    for cmd in ["run", "bench", "daemon", "status", "echo", "info", "completions", "manpage"] {
        let page = std::fs::read_to_string(dir.join(format!("sidecore-{cmd}.1")))
            .unwrap_or_else(|e| panic!("sidecore-{cmd}.1: {e}"));
        let th = format!(".TH sidecore-{cmd} 1");
        assert!(page.lines().take(5).any(|l| l.starts_with(&th)), "sidecore-{cmd}.1 has no {th}:\n{page}");
    }
    let run = std::fs::read_to_string(dir.join("sidecore-run.1")).unwrap_or_default();
    assert!(run.contains("gpascan"), "sidecore-run.1 lacks the workloads");
    let _ = std::fs::remove_dir_all(&dir);
    // Without --out: sidecore.1 on stdout.
    let o = sidecore(&["manpage"], &[]);
    assert!(o.status.success() && stdout(&o).contains(".TH"), "{}", stderr(&o));
}

/// A command that logs a warning without booting anything: the shared-core
/// warning comes before the guest is read, which then fails.
const LOGGING_RUN: [&str; 7] = ["run", "--sidecore", "0", "--vcpu-cpus", "0", "--guest", "/nonexistent/guest.elf"];

#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let o = sidecore(&LOGGING_RUN, &[("SIDECORE_LOG", "info")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("WARN"), "nothing logged: {}", stderr(&o));
    assert!(!o.stderr.contains(&0x1b), "an escape sequence in piped stderr: {:?}", stderr(&o));
    let o = sidecore(&["info"], &[("SIDECORE_LOG", "trace")]);
    assert!(!o.stderr.contains(&0x1b), "an escape sequence in piped stderr: {:?}", stderr(&o));
}

#[test]
fn json_logs_are_one_object_per_line() {
    for args in [&["--log-format", "json"][..], &[]] {
        let env: &[(&str, &str)] = if args.is_empty() { &[("SIDECORE_LOG_FORMAT", "json")] } else { &[] };
        let o = sidecore(&[args, &LOGGING_RUN[..]].concat(), env);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let e = stderr(&o);
        let lines: Vec<&str> = e.lines().collect();
        assert!(lines.len() >= 2, "expected the warning and the error: {e}");
        let levels: Vec<String> = lines
            .iter()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|err| panic!("not JSON ({err}): {l}"));
                v["level"].as_str().unwrap_or("").to_string()
            })
            .collect();
        assert_eq!(levels, ["WARN", "ERROR"], "{e}");
    }
    assert_eq!(sidecore(&["--log-format", "xml", "info"], &[]).status.code(), Some(2));
}

#[test]
fn a_vcpu_on_a_sidecore_cpu_is_warned_about() {
    if !kvm_available() {
        return;
    }
    let o = sidecore(&["run", "--sidecore", "0", "--vcpu-cpus", "0", "--workload", "hello"], &[]);
    let e = stderr(&o);
    assert!(o.status.success(), "the guest did not run: {e}");
    assert!(stdout(&o).contains("hello from vCPU 0"), "{}", stdout(&o));
    assert!(e.contains("WARN") && e.contains("vCPU 0 on CPU 0"), "no warning: {e}");
    assert!(e.contains("--vcpu-cpus"), "the warning does not say what to do: {e}");
    // Apart: no warning.
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    if online.trim() != "0" {
        let o = sidecore(&["run", "--sidecore", "0", "--workload", "hello"], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(!stderr(&o).contains("sharing a core"), "{}", stderr(&o));
    }
}

/// A minimal x86-64 guest ELF: one executable segment at the image address
/// holding `code`, entered at its first byte.
fn tiny_guest(code: &[u8]) -> Vec<u8> {
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    let (ehdr, phdr) = (usize::from(EHDR), usize::from(PHDR));
    let at = shm_proto::layout::IMAGE_GPA;
    let mut v = vec![0u8; ehdr + phdr];
    v[0..4].copy_from_slice(b"\x7fELF");
    v[4] = 2; // ELFCLASS64
    v[5] = 1; // little-endian
    v[6] = 1; // EV_CURRENT
    let put = |v: &mut Vec<u8>, off: usize, bytes: &[u8]| v[off..off + bytes.len()].copy_from_slice(bytes);
    put(&mut v, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut v, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut v, 20, &1u32.to_le_bytes());
    put(&mut v, 24, &at.to_le_bytes());
    put(&mut v, 32, &u64::from(EHDR).to_le_bytes());
    put(&mut v, 52, &EHDR.to_le_bytes());
    put(&mut v, 54, &PHDR.to_le_bytes());
    put(&mut v, 56, &1u16.to_le_bytes());
    let p = ehdr;
    put(&mut v, p, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut v, p + 4, &5u32.to_le_bytes()); // R + X
    put(&mut v, p + 8, &u64::from(EHDR + PHDR).to_le_bytes());
    put(&mut v, p + 16, &at.to_le_bytes());
    put(&mut v, p + 24, &at.to_le_bytes());
    put(&mut v, p + 32, &(code.len() as u64).to_le_bytes());
    put(&mut v, p + 40, &(code.len() as u64).to_le_bytes());
    put(&mut v, p + 48, &0x1000u64.to_le_bytes());
    v.extend_from_slice(code);
    v
}

#[test]
fn a_failing_guest_exits_apart_from_host_and_usage_failures() {
    if !kvm_available() {
        return;
    }
    let [lo, hi] = shm_proto::boot::PORT_EXIT.to_le_bytes();
    // mov dx, PORT_EXIT; mov eax, 101; out dx, eax; 1: hlt; jmp 1b
    let status = [0x66, 0xba, lo, hi, 0xb8, 101, 0, 0, 0, 0xef, 0xf4, 0xeb, 0xfd];
    // ud2 with no IDT: the guest crashes.
    let crash = [0x0f, 0x0b];
    for (name, code, exit, says) in
        [("status", &status[..], 3, "vCPU 0 exited with status 101"), ("crash", &crash[..], 4, "vCPU 0 faulted")]
    {
        let path = std::env::temp_dir().join(format!("sidecore-test-guest-{name}-{}", std::process::id()));
        std::fs::write(&path, tiny_guest(code)).expect("write the guest");
        let o = sidecore(&["run", "--guest", path.to_str().expect("utf-8 temp dir")], &[]);
        let _ = std::fs::remove_file(&path);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(exit), "{name}: {e}");
        assert!(e.contains(&format!("sidecore: guest failed: {says}")), "{name}: {e}");
    }
}
