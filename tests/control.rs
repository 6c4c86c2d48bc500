//! The guest's control port cannot exhaust or wedge the host: a guest that
//! writes stop/start 100,000 times in a random order leaves its VMM with a
//! handful of threads (one control worker, not one thread per write), and
//! the sidecore serves it again after its final start — by the VMM's own
//! sidecore and by the daemon's.

mod common;
use common::daemon::start_daemon;
use common::kvm_available;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sidecore")
}

/// Threads of a process now (0 once it is gone).
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(Iterator::count).unwrap_or(0)
}

/// Runs `cmd` to its end, sampling its thread count every 5 ms; its exit
/// success, stdout + stderr, and the most threads seen.
fn run_counting_threads(cmd: &mut Command) -> (bool, String, usize) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start the VMM");
    let pid = child.id();
    let mut most = 0;
    let t0 = Instant::now();
    let status = loop {
        most = most.max(threads(pid));
        if let Some(s) = child.try_wait().expect("wait for the VMM") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            break child.wait().expect("wait for the killed VMM");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    out.push_str("\nstderr:\n");
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut out);
    }
    (status.success(), out, most)
}

/// main, the vCPU, the sidecore, the control worker and a few the VMM
/// keeps (daemon watcher, signal thread): one vCPU + one sidecore + 4.
const MOST_THREADS: usize = 1 + 1 + 4;

#[test]
fn a_hundred_thousand_control_writes_leave_a_handful_of_threads_own_sidecore() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (ok, out, most) = run_counting_threads(Command::new(bin()).args([
        "run",
        "--workload",
        "toggle",
        "--sidecore",
        "0",
        "--vcpu-cpus",
        "1",
    ]));
    assert!(ok, "{out}");
    assert!(out.contains("toggle: ok: 100000 writes"), "{out}");
    assert!(most <= MOST_THREADS, "the VMM had {most} threads (at most {MOST_THREADS} expected)\n{out}");
}

#[test]
fn a_hundred_thousand_control_writes_leave_a_handful_of_threads_daemon() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = std::env::temp_dir().join(format!("sidecore-test-control-{}.sock", std::process::id()));
    let d = start_daemon(&sock);
    let daemon_before = threads(d.0.id());
    let (ok, out, most) = run_counting_threads(
        Command::new(bin()).args(["run", "--workload", "toggle", "--vcpu-cpus", "1", "--attach"]).arg(&sock),
    );
    assert!(ok, "{out}");
    assert!(out.contains("toggle: ok: 100000 writes"), "{out}");
    assert!(most <= MOST_THREADS, "the VMM had {most} threads (at most {MOST_THREADS} expected)\n{out}");
    // Every pause and resume reached the daemon as a request, not as a
    // thread of its own.
    let daemon_after = threads(d.0.id());
    assert!(
        daemon_after <= daemon_before + 2,
        "the daemon went from {daemon_before} to {daemon_after} threads after the run\n{out}"
    );
}

/// A guest flooding its console with terminal escape sequences: no escape
/// byte reaches the VMM's stdout, the flood is cut to the rate limit, and
/// what was dropped is reported.
#[test]
fn a_console_flood_is_escaped_and_rate_limited() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    // 20,000 lines of about 200 raw bytes: 4 MB, far above the budget.
    let o = Command::new(bin())
        .args(["run", "--workload", "toggle", "--sidecore", "0", "--vcpu-cpus", "1", "--arg", "10", "--arg", "20000"])
        .output()
        .expect("run the VMM");
    let secs = t0.elapsed().as_secs() + 1;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\nstderr:\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("toggle: ok: 10 writes"), "{out}");
    assert!(
        !o.stdout.contains(&0x1b) && !o.stdout.contains(&0x07) && !o.stdout.contains(&b'\r'),
        "raw control bytes reached stdout"
    );
    assert!(out.contains("flood 0: \\x1b[2J"), "the flood's first lines should pass, escaped: {out}");
    assert!(out.contains(" bytes dropped]"), "no drop report: {out}");
    // 32 KiB burst + 4 KiB/s, the drop reports and the VMM's own lines.
    let most = 32 * 1024 + 4096 * secs + 64 * 1024;
    assert!((o.stdout.len() as u64) < most, "{} bytes of console in {secs} s", o.stdout.len());
}

/// The packet device lives on the sidecore: a guest that stops and restarts
/// its sidecore every 100 packets must get every packet back (the device
/// was once dropped by the first stop, and every later packet lost).
#[test]
fn the_packet_device_survives_sidecore_stops_and_restarts() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Killed after 300 s: a lost device makes the run hang, not fail.
    let (ok, t, _) = run_counting_threads(Command::new(bin()).args([
        "echo",
        "--path",
        "sidecall",
        "--count",
        "2000",
        "--toggle-every",
        "100",
    ]));
    assert!(ok, "{t}");
    assert!(t.contains("2000 sent, 2000 back intact, 0 corrupted, 0 out of order, 0 lost"), "{t}");
}
