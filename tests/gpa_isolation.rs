//! No host memory in the guest's physical address space, not even for a
//! moment: the `gpascan` guest loads its own CR3 with tables that map every
//! GPA up to 2^40, makes the host zap PVM's shadow pages again and again (by
//! sidecall and by the trap path) and, while the zaps run, reads `ZAP_GPA`,
//! writes a marker there and sweeps the other GPAs. It passes only if every
//! read was its own memory or an MMIO exit's all-ones. With the old zap (a
//! VMM heap page behind the dummy memslot) it reads its marker back.

mod common;
use common::daemon::start_daemon;
use common::kvm_available;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn sidecore(args: &[&str]) -> Output {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    Command::new(env!("CARGO_BIN_EXE_sidecore")).args(args).output().expect("run sidecore")
}

/// The number after `label` in `line` (e.g. "12 own page" for label
/// " own page").
fn count_before(line: &str, label: &str) -> Option<u64> {
    let head = &line[..line.find(label)?];
    head.rsplit(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Runs the guest on `vcpus` vCPUs, served by a sidecore of its own on CPU
/// 0, or (`attach`) by the daemon at that socket, and checks it passed.
fn run_gpascan(vcpus: u32, attach: Option<&Path>) {
    let v = vcpus.to_string();
    let mut args = vec!["run", "--workload", "gpascan", "--vcpus", &v, "--arg", "600"];
    let sock;
    match attach {
        // The daemon holds CPU 0: the vCPUs share CPU 1.
        Some(p) => {
            sock = p.display().to_string();
            args.extend(["--vcpu-cpus", "1", "--attach", &sock]);
        }
        None => args.extend(["--sidecore", "0"]),
    }
    let o = sidecore(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    let ctx = format!("{vcpus} vCPUs\nstdout:\n{out}\nstderr (last 2000 bytes):\n{}", tail(&err, 2000));
    assert!(o.status.success(), "gpascan failed: {ctx}");
    for i in 0..vcpus {
        assert!(out.contains(&format!("gpascan: vCPU {i}: ok")), "vCPU {i} did not pass: {ctx}");
    }
    assert!(!out.contains("FAILED"), "{ctx}");
    let zaps = out
        .lines()
        .find(|l| l.starts_with("gpascan: vCPU 0: ") && l.contains(" zaps ("))
        .and_then(|l| count_before(l, " zaps ("))
        .unwrap_or(0);
    assert_eq!(zaps, 600, "vCPU 0 did not make its zaps: {ctx}");
    let reads: Vec<&str> = out.lines().filter(|l| l.contains("ZAP_GPA read")).collect();
    assert_eq!(reads.len(), vcpus as usize, "{ctx}");
    // On PVM the zap is a memslot change at ZAP_GPA: the guest must have
    // raced it, reading there while the slot existed, or the test showed
    // nothing. What it read then was its own page. (With a daemon and one
    // vCPU every zap runs on the exit path, while that vCPU waits in it.)
    if Path::new("/sys/module/kvm_pvm").is_dir() && (attach.is_none() || vcpus > 1) {
        let own: u64 = reads.iter().filter_map(|l| count_before(l, " own page")).sum();
        assert!(own > 0, "no read of ZAP_GPA fell inside a zap: the race was never run: {ctx}");
        eprintln!("{vcpus} vCPUs: {own} reads of ZAP_GPA inside a zap, all of the guest's own page");
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[test]
fn a_guest_with_its_own_tables_reads_only_its_memory_while_zaps_run_on_one_vcpu() {
    if !kvm_available() {
        return;
    }
    run_gpascan(1, None);
}

#[test]
fn a_guest_with_its_own_tables_reads_only_its_memory_while_zaps_run_on_two_vcpus() {
    if !kvm_available() {
        return;
    }
    run_gpascan(2, None);
}

/// Attached to a daemon, the guest's own VMM still zaps its VM (the daemon
/// has no VM fd and sends changes and unmaps to the exit path): the same
/// zapper, the same guarantee.
#[test]
fn a_guest_attached_to_a_daemon_reads_only_its_memory_while_its_vmm_zaps() {
    if !kvm_available() {
        return;
    }
    let sock: PathBuf = std::env::temp_dir().join(format!("sidecore-gpa-{}.sock", std::process::id()));
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let _daemon = start_daemon(&sock);
    drop(_guard);
    for vcpus in [1, 2] {
        run_gpascan(vcpus, Some(&sock));
    }
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn count_before_reads_the_number_ahead_of_a_label() {
    let l = "gpascan: vCPU 1: ZAP_GPA read 120 times: 37 own page, 83 MMIO";
    assert_eq!(count_before(l, " own page"), Some(37));
    assert_eq!(count_before(l, " MMIO"), Some(83));
    assert_eq!(count_before(l, " nothing"), None);
}
