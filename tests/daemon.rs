//! The sidecore daemon serving several VMMs: attach, SIGKILL of one VMM,
//! status, idle CPU use, and guests surviving the daemon's death.

mod common;
use common::daemon::{socket, start_daemon};
use common::kvm_available;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sidecore")
}

/// Polls `done` every 50 ms until it holds or `limit` passes; whether it
/// held. Tests wait for conditions, never for a fixed time: VMs take much
/// longer to start in the emulated AMD-V bed than here.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if done() {
            return true;
        }
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pids of the VMs the daemon lists.
fn attached_pids(st: &serde_json::Value) -> Vec<u64> {
    st["vms"].as_array().map(|v| v.iter().filter_map(|v| v["pid"].as_u64()).collect()).unwrap_or_default()
}

/// Waits (up to 60 s) until every VMM in `pids` is attached; the last status.
fn wait_attached(sock: &Path, pids: &[u32]) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_for(Duration::from_secs(60), || {
        last = status(sock);
        let listed = attached_pids(&last);
        pids.iter().all(|p| listed.contains(&u64::from(*p)))
    });
    last
}

fn vmm(sock: &Path, linger_ms: u64) -> Child {
    vmm_paused(sock, linger_ms, 0)
}

/// A selftest VM whose fallback phase keeps the daemon's service paused for
/// at least `pause_ms`.
fn vmm_paused(sock: &Path, linger_ms: u64, pause_ms: u64) -> Child {
    Command::new(bin())
        .args([
            "run",
            "--workload",
            "selftest",
            "--vcpu-cpus",
            "1",
            "--arg",
            "0",
            "--arg",
            &linger_ms.to_string(),
            "--arg",
            "0",
            "--arg",
            &pause_ms.to_string(),
            "--attach",
        ])
        .arg(sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm")
}

fn status(sock: &Path) -> serde_json::Value {
    let o = Command::new(bin()).args(["status", "--json", "--socket"]).arg(sock).output().expect("status");
    assert!(o.status.success(), "status failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("status JSON")
}

fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// (utime + stime) in clock ticks of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
}

#[test]
fn daemon_serves_three_vmms_survives_a_sigkill_and_goes_idle() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("three");
    let d = start_daemon(&sock);
    let a = vmm(&sock, 5000);
    let b = vmm(&sock, 5000);
    let mut victim = vmm(&sock, 20_000);
    let before = wait_attached(&sock, &[a.id(), b.id(), victim.id()]);
    assert!(attached_pids(&before).contains(&u64::from(victim.id())), "victim not attached: {before}");
    victim.kill().expect("SIGKILL the victim");
    let _ = victim.wait();
    // The hang-up detaches it; the others are still lingering (5 s after
    // their selftests).
    let mut after = serde_json::Value::Null;
    let gone = wait_for(Duration::from_secs(10), || {
        after = status(&sock);
        !attached_pids(&after).contains(&u64::from(victim.id()))
    });
    assert!(gone, "killed VMM still attached: {after}");
    let listed = attached_pids(&after);
    assert!(listed.contains(&u64::from(a.id())) && listed.contains(&u64::from(b.id())), "{after}");
    for o in [a.wait_with_output().expect("vmm a"), b.wait_with_output().expect("vmm b")] {
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        assert!(t.contains("selftest: ok"), "{t}");
        // The daemon counted exactly the replies the guest received.
        let line = t.lines().find(|l| l.starts_with("attach: ")).unwrap_or_else(|| panic!("no attach line: {t}"));
        let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        assert_eq!(nums.len(), 2, "{line}");
        assert_eq!(nums[0], nums[1], "{line}");
        assert!(nums[0] > 0, "{line}");
    }
    // Still serving, nobody attached, and parked: a small fraction of a CPU
    // (spinning is 100%).
    let idle = status(&sock);
    assert_eq!(idle["vms"].as_array().map(Vec::len), Some(0), "{idle}");
    std::thread::sleep(Duration::from_millis(100));
    let t0 = cpu_ticks(d.0.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(d.0.id()) - t0;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    // Under 10% of a CPU natively, over 3 s (300 ticks: a bound at 5% over
    // 1 s failed now and then at exactly 5 ticks, the parked daemon's timed
    // naps cost 3-5% under PVM's nesting). On an emulated host (the AMD-V
    // bed) every timed wake-up costs far more: there it must still be
    // parked, not spinning (a spinning daemon uses ~100%).
    let emulated = sidecore_vmm::host::cpu_emulator(sidecore_vmm::host::hypervisor_signature().as_deref());
    let limit_pct = if emulated.is_some() { 50 } else { 10 };
    if let Some(e) = emulated {
        eprintln!("host CPU emulated by {e}: idle bound relaxed to {limit_pct}% (used {used} ticks of {hz})");
    }
    assert!(used * 100 < 3 * hz * limit_pct, "idle daemon used {used} ticks of {hz}/s in 3 s (limit {limit_pct}%)");
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn guests_finish_through_the_exit_paths_when_the_daemon_dies() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("dies");
    let mut d = start_daemon(&sock);
    let mut v = vmm(&sock, 3000);
    // Killed once the selftest's own checks are done (they need the daemon)
    // and the guest lingers, still calling: seen on the VMM's stdout, since
    // how long the checks take depends on the host (minutes in the AMD-V bed).
    let (rx, reader) = watch_for_linger(&mut v);
    let lingering = rx.recv_timeout(Duration::from_secs(900)).is_ok();
    d.0.kill().expect("kill daemon");
    let _ = d.0.wait();
    let o = v.wait_with_output().expect("vmm");
    let out = reader.join().unwrap_or_default();
    let t = format!("stdout:\n{out}\nstderr:\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(lingering, "the selftest never reached its fallback phase: {t}");
    assert!(o.status.success(), "{t}");
    assert!(t.contains("selftest: ok"), "{t}");
    // A restarted daemon accepts new attaches.
    let _d2 = start_daemon(&sock);
    let o = vmm(&sock, 0).wait_with_output().expect("vmm after restart");
    assert!(o.status.success() && text(&o).contains("selftest: ok"), "{}", text(&o));
    let _ = std::fs::remove_file(&sock);
}

/// Reads a selftest VMM's stdout in a thread: the receiver gets a message
/// once the selftest's own checks are done and the guest lingers, still
/// calling; the thread returns everything read.
fn watch_for_linger(v: &mut Child) -> (std::sync::mpsc::Receiver<()>, std::thread::JoinHandle<String>) {
    let stdout = v.stdout.take().expect("vmm stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if line.contains("fallback phase:") {
                let _ = tx.send(());
            }
            seen += &line;
            seen.push('\n');
        }
        seen
    });
    (rx, reader)
}

/// The replies the guest got and the calls the daemon counted, from the
/// VMM's `attach:` line.
fn attach_counts(t: &str) -> (u64, u64) {
    let line = t.lines().find(|l| l.starts_with("attach: ")).unwrap_or_else(|| panic!("no attach line: {t}"));
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 2, "{line}");
    (nums[0], nums[1])
}

#[test]
fn a_vm_paused_for_a_second_mid_selftest_gets_every_call_answered_once() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("pause");
    let _d = start_daemon(&sock);
    // The fallback phase pauses the VM at the daemon (its VMM asks) and keeps
    // calling a counter hypercall for at least 1 s: under ABI v1 a pause of
    // ~130 ms wedged the ring for good. The guest checks the counter (no call
    // lost or doubled) and that the sidecore answers again after the resume.
    let o = vmm_paused(&sock, 200, 1000).wait_with_output().expect("vmm");
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("selftest: ok"), "{t}");
    assert!(t.contains("fallback phase:") && t.contains("none lost or doubled"), "{t}");
    // Every reply the guest took is one the daemon counted, and no more.
    let (got, counted) = attach_counts(&t);
    assert!(got > 0 && got == counted, "guest got {got} replies, the daemon counted {counted}: {t}");
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn guests_finish_through_the_exit_paths_when_the_daemon_is_stopped() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("sigstop");
    let d = start_daemon(&sock);
    let mut v = vmm(&sock, 3000);
    let (rx, reader) = watch_for_linger(&mut v);
    let lingering = rx.recv_timeout(Duration::from_secs(900)).is_ok();
    // Stopped, not dead: its socket stays open, so nobody tells the guest;
    // the guest must see the heartbeat stand still and go by exit path.
    let pid = libc::pid_t::try_from(d.0.id()).expect("pid");
    // SAFETY: kill(2) with a pid this test spawned and a valid signal.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP the daemon");
    let o = v.wait_with_output().expect("vmm");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = reader.join().unwrap_or_default();
    let t = format!("stdout:\n{out}\nstderr:\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(lingering, "the selftest never reached its fallback phase: {t}");
    assert!(o.status.success(), "{t}");
    assert!(t.contains("selftest: ok"), "{t}");
    let linger = t.lines().find(|l| l.contains("linger:")).unwrap_or_else(|| panic!("no linger line: {t}"));
    let nums: Vec<u64> = linger.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(nums.len() >= 3 && nums[2] < nums[0], "some linger calls must go by exit path: {linger}");
    drop(d);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn the_daemon_removes_only_a_stale_socket() {
    // No KVM needed: the daemon checks its socket path before anything else.
    let path = socket("not-a-socket");
    std::fs::write(&path, b"somebody's file\n").expect("write a regular file");
    let o = Command::new(bin()).args(["daemon", "--cores", "0", "--socket"]).arg(&path).output().expect("daemon");
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("exists and is not a socket"), "{t}");
    assert_eq!(std::fs::read(&path).ok().as_deref(), Some(&b"somebody's file\n"[..]), "the file was touched");
    let _ = std::fs::remove_file(&path);
    if !kvm_available() {
        return;
    }
    // A stale socket (nobody listening) is replaced.
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let stale = socket("stale");
    let _ = std::fs::remove_file(&stale);
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind a socket and drop it"));
    assert!(stale.exists());
    let _d = start_daemon(&stale);
    assert!(status(&stale)["vms"].is_array());
}

/// Threads of a process.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn idle_and_half_sent_connections_are_capped_and_time_out() {
    use std::io::{Read, Write};
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("conns");
    let d = start_daemon(&sock);
    let base = threads(d.0.id());
    // A request without its newline, and 99 connections that send nothing.
    let mut half = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    half.write_all(br#"{"op":"status""#).expect("write");
    let idle: Vec<_> = (0..99).map(|_| std::os::unix::net::UnixStream::connect(&sock).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let most = threads(d.0.id());
    assert!(most <= base + 64 + 2, "{most} daemon threads for 100 idle connections (base {base}, cap 64)");
    // Past the cap: an error at once, then the hang-up.
    let mut refused = 0;
    for mut c in idle.iter().skip(64) {
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = String::new();
        let _ = c.read_to_string(&mut buf);
        refused += usize::from(buf.contains("too many connections"));
    }
    assert!(refused >= 30, "only {refused} of the connections past the cap were refused");
    // The half-sent request and the idle ones are dropped at the deadline.
    half.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut buf = Vec::new();
    let t0 = Instant::now();
    let _ = half.read_to_end(&mut buf);
    assert!(t0.elapsed() < Duration::from_secs(15), "a request without its newline held the connection");
    let back = wait_for(Duration::from_secs(20), || threads(d.0.id()) <= base + 1);
    assert!(back, "daemon threads stayed at {} (base {base})", threads(d.0.id()));
    // And it still serves.
    assert!(status(&sock)["vms"].is_array());
    drop(idle);
}

#[test]
fn bad_messages_get_errors_and_the_daemon_lives_on() {
    if !kvm_available() {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("bad");
    let _d = start_daemon(&sock);
    for msg in [
        "garbage\n",
        "{\"op\":\"status\"}\n",
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"nuke\"}\n",
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"pause\"}\n",
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"attach\",\"params\":{\"vcpus\":1}}\n",
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        s.write_all(msg.as_bytes()).expect("write");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("reply");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON reply");
        assert!(v["error"]["code"].is_i64() && v["jsonrpc"] == "2.0", "{msg} -> {line}");
    }
    // Oversized: more than 1 MiB without a newline.
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    let big = vec![b'x'; 1 << 20];
    let _ = s.write_all(&big);
    let _ = s.write_all(&big);
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    assert!(line.contains("\"error\"") && line.contains("longer than"), "{line}");
    assert_eq!(status(&sock)["ok"], serde_json::Value::Bool(true));
    let mode = std::fs::metadata(&sock).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.ok(), Some(0o600));
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_chaos_vm_cannot_hurt_its_neighbour() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("chaos");
    let d = start_daemon(&sock);
    let chaos = Command::new(bin())
        .args(["run", "--workload", "chaos", "--vcpu-cpus", "1", "--arg", "0", "--arg", "11000", "--attach"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chaos vmm");
    // A polite selftest (no deliberately invalid sidecalls) that lingers
    // for as long as the chaos runs.
    let good = Command::new(bin())
        .args([
            "run",
            "--workload",
            "selftest",
            "--vcpu-cpus",
            "1",
            "--arg",
            "0",
            "--arg",
            "10000",
            "--arg",
            "1",
            "--attach",
        ])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("selftest vmm");
    // Both attached and the chaos VM's garbage refused (it runs 11 s, the
    // selftest lingers 10 s: both are still attached while this waits).
    let mut st = serde_json::Value::Null;
    wait_for(Duration::from_secs(60), || {
        st = status(&sock);
        let listed = attached_pids(&st);
        let chaos_rejected =
            st["vms"].as_array().into_iter().flatten().any(|v| {
                v["pid"].as_u64() == Some(u64::from(chaos.id())) && v["rejected"].as_u64().is_some_and(|n| n > 0)
            });
        listed.contains(&u64::from(good.id())) && chaos_rejected
    });
    let vms = st["vms"].as_array().expect("vms").clone();
    let by_pid = |pid: u32| vms.iter().find(|v| v["pid"].as_u64() == Some(u64::from(pid))).cloned();
    let c = by_pid(chaos.id()).unwrap_or_else(|| panic!("chaos VM not listed: {st}"));
    let g = by_pid(good.id()).unwrap_or_else(|| panic!("selftest VM not listed: {st}"));
    assert!(c["rejected"].as_u64().is_some_and(|n| n > 0), "chaos VM shows no rejections: {c}");
    assert_eq!(g["rejected"].as_u64(), Some(0), "the well-behaved VM shows rejections: {g}");
    let o = good.wait_with_output().expect("selftest");
    assert!(o.status.success() && text(&o).contains("selftest: ok"), "{}", text(&o));
    let o = chaos.wait_with_output().expect("chaos");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(", 0 wrong)"), "{}", text(&o));
    // The daemon is alive and serving.
    assert_eq!(status(&sock)["ok"], serde_json::Value::Bool(true));
    drop(d);
    let _ = std::fs::remove_file(&sock);
}
