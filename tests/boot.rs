//! Integration tests: boot the bundled guest-agent under /dev/kvm through the
//! `sidecore` binary. They run one at a time (a shared lock): on a 2-CPU
//! machine, parallel VMs pile onto the same CPUs and sidecalls time out.

mod common;
use common::kvm_available;

use std::process::{Command, Output};
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn sidecore(args: &[&str]) -> Output {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    Command::new(env!("CARGO_BIN_EXE_sidecore")).args(args).output().expect("run sidecore")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn hello_prints_a_computed_value() {
    if !kvm_available() {
        return;
    }
    let o = sidecore(&["run", "--workload", "hello"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("hello from vCPU 0"), "{out}");
    assert!(out.contains("1229 primes below 10000"), "{out}");
}

#[test]
fn spin_runs_natively() {
    if !kvm_available() {
        return;
    }
    let o = sidecore(&["run", "--workload", "spin", "--vcpu-cpus", "1"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    let lines: Vec<_> = out.lines().filter(|l| l.starts_with("spin: ")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    let ns: f64 = lines[0]
        .strip_prefix("spin: ")
        .and_then(|s| s.strip_suffix(" ns/iteration"))
        .and_then(|s| s.parse().ok())
        .expect("spin line format");
    // Native is ~0.3 ns, emulated ~2,000 ns: this tells the two apart, it is
    // not a performance target.
    assert!(ns < 100.0, "guest is not running natively: {ns} ns/iteration");
}

#[test]
fn selftest_passes_on_exit_paths_with_one_and_two_vcpus() {
    if !kvm_available() {
        return;
    }
    for vcpus in ["1", "2"] {
        let o = sidecore(&["run", "--workload", "selftest", "--vcpus", vcpus]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{vcpus} vCPUs\nstdout:\n{out}\nstderr:\n{err}");
        assert_eq!(out.matches("selftest: ok").count(), 1, "{out}");
    }
}

#[test]
fn selftest_passes_with_a_sidecore_and_its_phase_has_no_exits() {
    if !kvm_available() {
        return;
    }
    // A generous bound: "0 exits" must not depend on how fast the host is
    // (an emulated host stalls a CPU now and then for milliseconds).
    let o = sidecore(&[
        "run",
        "--sidecore",
        "0",
        "--vcpu-cpus",
        "1",
        "--sidecall-timeout-us",
        "200000",
        "--workload",
        "selftest",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(out.matches("selftest: ok").count(), 1, "{out}");
    let phase: Vec<_> = out.lines().filter(|l| l.starts_with("sidecall phase: ")).collect();
    assert_eq!(phase.len(), 1, "{out}");
    assert!(phase[0].starts_with("sidecall phase: 0 exits"), "{out}");
    assert!(out.contains("none lost or doubled"), "{out}");
    // The CPUID state check ran (or says why not) and compared by sidecall.
    assert!(out.contains("CPUID state:") && (out.contains("and sidecall (") || out.contains("skipped")), "{out}");
}

#[test]
fn info_reports_the_backend() {
    if !kvm_available() {
        return;
    }
    let o = sidecore(&["info", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("info --json is JSON");
    let backend = v["backend"].as_str().expect("backend field");
    assert!(["pvm", "vmx", "svm"].contains(&backend), "{backend}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(backend, "pvm");
    }
    // Native here (PVM) and on real hardware; not on a host whose own CPU
    // is emulated (the AMD-V bed), where info must say why.
    let emulated = sidecore_vmm::host::cpu_emulator(sidecore_vmm::host::hypervisor_signature().as_deref());
    assert_eq!(v["guest_native"], serde_json::Value::Bool(emulated.is_none()), "{out}");
    if let Some(e) = emulated {
        let why = v["execution"]["why_not"].as_str().unwrap_or("");
        assert!(why.contains(e), "info must say the host is emulated: {out}");
    }
}

fn assert_clean_failure(args: &[&str], needle: &str) {
    let o = sidecore(args);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{args:?} should fail\nstdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains(needle), "{args:?}: stderr lacks {needle:?}:\n{err}");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

#[test]
fn bad_input_gets_clear_errors() {
    assert_clean_failure(&["run", "--guest", "/nonexistent"], "/nonexistent");
    assert_clean_failure(&["run", "--workload", "nope"], "invalid value 'nope' for '--workload");
    let not_elf = std::env::temp_dir().join(format!("sidecore-not-elf-{}", std::process::id()));
    std::fs::write(&not_elf, b"#!/bin/sh\necho this is not an ELF\n").expect("write temp file");
    let p = not_elf.display().to_string();
    assert_clean_failure(&["run", "--guest", &p], &p);
    let _ = std::fs::remove_file(&not_elf);
    assert_clean_failure(&["run", "--mem", "2"], "2 is not in 4..=3072");
    assert_clean_failure(&["run", "--vcpus", "0"], "0 is not in 1..=");
    if kvm_available() {
        assert_clean_failure(&["run", "--vcpu-cpus", "4095"], "--vcpu-cpus CPU 4095 is not online");
        assert_clean_failure(&["run", "--sidecore", "4095"], "--sidecore CPU 4095 is not online");
        assert_clean_failure(&["run", "--mem", "5"], "too small");
    }
}

#[test]
fn bench_writes_table_json_and_plot() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir();
    let json = dir.join(format!("sidecore-bench-{}.json", std::process::id()));
    let svg = dir.join(format!("sidecore-bench-{}.svg", std::process::id()));
    let (j, s) = (json.display().to_string(), svg.display().to_string());
    let o = sidecore(&["bench", "--iters", "2000", "--warmup", "100", "--json", &j, "--plot", &s]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    for op in ["null", "cpuid", "pte", "pagefault", "pagefault-batch8", "pagefault-batch32"] {
        assert!(out.lines().any(|l| l.starts_with(&format!("{op} "))), "no {op} row:\n{out}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("JSON");
    assert_eq!(v["backend"].as_str().map(str::len).map(|n| n > 0), Some(true));
    assert!(v["tsc_khz"].as_u64().is_some_and(|k| k > 0));
    assert!(v["floor"]["samples"].as_u64().is_some_and(|n| n > 0), "{v}");
    let results = v["results"].as_array().expect("results");
    let has = |op: &str, path: &str| results.iter().any(|r| r["op"] == op && r["path"] == path);
    for (op, path) in [
        ("null", "kernel"),
        ("null", "user"),
        ("null", "sidecall"),
        ("cpuid", "kernel"),
        ("cpuid", "sidecall"),
        ("pte", "user"),
        ("pte", "sidecall"),
    ] {
        assert!(has(op, path), "missing {op}/{path}");
    }
    for r in results {
        for k in ["p50_ns", "p90_ns", "p99_ns", "p999_ns", "max_ns"] {
            assert!(r[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {r}");
        }
        assert!(r["samples"].as_u64().is_some_and(|n| n > 0));
        assert!(r["p50_ns"].as_f64() <= r["p99_ns"].as_f64());
    }
    let plot = std::fs::read_to_string(&svg).expect("svg written");
    assert!(plot.starts_with("<svg") && plot.contains("null sidecall") && plot.contains("floor"));
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&svg);
}

#[test]
fn pagefault_workload_reports_both_paths() {
    if !kvm_available() {
        return;
    }
    let o =
        sidecore(&["run", "--workload", "pagefault", "--sidecore", "0", "--arg", "0", "--arg", "0", "--arg", "1000"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.lines().any(|l| l.starts_with("pagefault") && l.contains("user")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("pagefault") && l.contains("sidecall")), "{out}");
}

#[test]
fn two_vcpus_share_one_sidecore() {
    if !kvm_available() {
        return;
    }
    let o = sidecore(&["run", "--vcpus", "2", "--sidecore", "0", "--workload", "selftest"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(out.matches("selftest: ok").count(), 1, "{out}");
    assert_eq!(out.matches("none lost or doubled").count(), 2, "{out}");
}

#[test]
fn bench_reports_per_vcpu_and_idle_ring_rows() {
    if !kvm_available() {
        return;
    }
    let json = std::env::temp_dir().join(format!("sidecore-bench-v2-{}.json", std::process::id()));
    let j = json.display().to_string();
    let o = sidecore(&["bench", "--ops", "null", "--vcpus", "2", "--idle-rings", "8", "--iters", "2000", "--json", &j]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("JSON");
    let results = v["results"].as_array().expect("results");
    for vcpu in [0, 1] {
        assert!(results.iter().any(|r| r["vcpu"] == vcpu && r["path"] == "sidecall"), "no vCPU {vcpu} row: {v}");
    }
    assert!(results.iter().any(|r| r["vcpu"].is_null() && r["path"] == "sidecall+8idle"), "{v}");
    assert!(v["ratios"].as_array().expect("ratios").iter().any(|r| r["name"] == "sidecall+8idle/sidecall"));
    let _ = std::fs::remove_file(&json);
}

#[test]
fn throughput_table_json_and_capacity() {
    if !kvm_available() {
        return;
    }
    let json = std::env::temp_dir().join(format!("sidecore-tput-{}.json", std::process::id()));
    let j = json.display().to_string();
    let o = sidecore(&["bench", "--throughput", "--json", &j]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("capacity: at"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("JSON");
    let rows = v["throughput"].as_array().expect("throughput");
    for (rings, batch) in [(1, 1), (1, 8), (1, 32), (64, 32)] {
        let r = rows.iter().find(|r| r["rings"] == rings && r["batch"] == batch).expect("row");
        assert!(r["calls_per_s"].as_f64().is_some_and(|x| x > 0.0), "{r}");
    }
    assert!(v["capacity"].as_array().is_some_and(|c| !c.is_empty()));
    let _ = std::fs::remove_file(&json);
}

#[test]
fn a_parked_sidecore_is_woken_by_the_doorbell() {
    if !kvm_available() {
        return;
    }
    let o = sidecore(&[
        "run",
        "--sidecore",
        "0",
        "--idle-park-us",
        "500",
        // Generous: the assertion is that the doorbell wakes the sidecore,
        // not how fast this host wakes an idle CPU (1 ms p50 on bad days).
        "--sidecall-timeout-us",
        "200000",
        "--workload",
        "wake",
        "--arg",
        "10",
        "--arg",
        "3000",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    // Every call after an idle period was answered by the (woken) sidecore,
    // none timed out to the exit path.
    assert!(out.contains("10 by sidecall"), "{out}");
}
