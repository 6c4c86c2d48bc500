//! The daemon's threads run under their seccomp filters, and the filters do
//! not break real work: an attached VM's selftest, status, a metrics scrape
//! and a clean SIGTERM stop (which removes the socket) all go through.

mod common;
use common::daemon::socket;
use common::kvm_available;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sidecore")
}

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("addr").port()
}

/// The daemon, killed if still running when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(sock: &Path, metrics: &str, extra: &[&str]) -> Guard {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(bin())
        .args(["daemon", "--cores", "0", "--idle-park-us", "1000", "--metrics", metrics, "--socket"])
        .arg(sock)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start daemon");
    let g = Guard(child);
    let t0 = Instant::now();
    while !Command::new(bin()).args(["status", "--socket"]).arg(sock).output().is_ok_and(|o| o.status.success()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "the daemon did not answer within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    g
}

/// (thread name, Seccomp mode, Seccomp_filters) of every thread of `pid`.
fn thread_modes(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir").flatten() {
        let Ok(st) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let field =
            |k: &str| st.lines().find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string())).unwrap_or_default();
        out.push((field("Name:"), field("Seccomp:"), field("Seccomp_filters:")));
    }
    out
}

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

#[test]
fn every_daemon_thread_is_filtered_and_a_vm_still_works() {
    if !kvm_available() {
        return;
    }
    let sock = socket("seccomp");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut d = start(&sock, &metrics, &[]);
    let vm = Command::new(bin())
        .args(["run", "--workload", "selftest", "--vcpu-cpus", "1", "--arg", "0", "--arg", "3000", "--attach"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the VMM");
    // While it is attached: a connection thread exists besides the main,
    // sidecore and metrics threads.
    let t0 = Instant::now();
    let mut threads = thread_modes(d.0.id());
    while !threads.iter().any(|t| t.0 == "sidecore-conn") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the VM never attached: {threads:?}");
        std::thread::sleep(Duration::from_millis(50));
        threads = thread_modes(d.0.id());
    }
    for name in ["sidecore", "sidecore0", "sidecore-metric", "sidecore-conn"] {
        assert!(threads.iter().any(|t| t.0 == name), "no {name} thread: {threads:?}");
    }
    for (name, mode, filters) in &threads {
        assert_eq!(mode, "2", "thread {name} is not under a seccomp filter: {threads:?}");
        assert_eq!(filters, "1", "thread {name} has {filters} filters: {threads:?}");
    }
    let st = Command::new(bin()).args(["status", "--json", "--socket"]).arg(&sock).output().expect("status");
    assert!(st.status.success(), "status under the filters: {}", String::from_utf8_lossy(&st.stderr));
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    assert_eq!(st["vms"].as_array().map(Vec::len), Some(1), "{st}");
    let m = scrape(&metrics);
    assert!(m.starts_with("HTTP/1.1 200 OK") && m.contains("sidecore_served_requests_total"), "{m}");
    let o = vm.wait_with_output().expect("VMM");
    let t = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && t.contains("selftest: ok"), "{t}");
    let line = t.lines().find(|l| l.starts_with("attach: ")).unwrap_or_else(|| panic!("no attach line: {t}"));
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(nums.len() == 2 && nums[0] == nums[1] && nums[0] > 0, "sidecalls served under the filters: {line}");
    // SIGTERM: the filtered main thread detaches, removes its socket (its
    // one unlinkat) and exits 0.
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(i32::try_from(d.0.id()).unwrap_or(0), libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = d.0.try_wait().expect("wait") {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = d.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "daemon exit {status}: {err}");
    assert!(!sock.exists(), "the daemon left its socket behind: {err}");
}

#[test]
fn no_seccomp_runs_the_threads_unfiltered() {
    let sock = socket("noseccomp");
    let metrics = format!("127.0.0.1:{}", free_port());
    let d = start(&sock, &metrics, &["--no-seccomp"]);
    let threads = thread_modes(d.0.id());
    assert!(threads.iter().all(|t| t.1 == "0"), "--no-seccomp: {threads:?}");
    drop(d);
    let _ = std::fs::remove_file(&sock);
}
