//! What operators and their tools see of a daemon: the JSON-RPC 2.0
//! control socket (ids, pipelining, batches, events), the metrics endpoint
//! under `promtool check metrics` and a real Prometheus server, and scrapes
//! beside idle connections.

mod common;
use common::daemon::{free_port, socket, start_daemon, start_daemon_with};
use common::hostile::wait_for;
use common::{kvm_available, skip};

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sidecore")
}

/// A polite selftest VM attached to the daemon at `sock`, lingering
/// `linger_ms` after its checks (sidecalls all along).
fn lingering_vm(sock: &Path, linger_ms: u64, name: Option<&str>) -> Child {
    Command::new(bin())
        .args(["run", "--workload", "selftest", "--vcpu-cpus", "1", "--arg", "0", "--arg"])
        .arg(linger_ms.to_string())
        .args(["--arg", "1"])
        .args(name.map(|n| ["--name", n]).into_iter().flatten())
        .arg("--attach")
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a VMM")
}

/// One connection's JSON lines, read with a deadline.
struct Lines(BufReader<UnixStream>);

impl Lines {
    fn next(&mut self, limit: Duration) -> serde_json::Value {
        self.0.get_ref().set_read_timeout(Some(limit)).expect("timeout");
        let mut line = String::new();
        self.0.read_line(&mut line).expect("a line from the daemon");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }
}

fn status(sock: &Path) -> serde_json::Value {
    let o = Command::new(bin()).args(["status", "--json", "--socket"]).arg(sock).output().expect("status");
    assert!(o.status.success(), "status failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("status JSON")
}

#[test]
fn json_rpc_ids_pipelining_batches_and_an_event_subscriber() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("jsonrpc");
    let _d = start_daemon(&sock);

    // hello and status in one write: two replies, in order, ids echoed.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.write_all(
        b"{\"jsonrpc\":\"2.0\",\"id\":\"h\",\"method\":\"hello\"}\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"status\"}\n",
    )
    .expect("send");
    let mut r = Lines(BufReader::new(s.try_clone().expect("clone")));
    let hello = r.next(Duration::from_secs(10));
    assert_eq!((hello["jsonrpc"].as_str(), hello["id"].as_str()), (Some("2.0"), Some("h")), "{hello}");
    let h = &hello["result"];
    assert_eq!(h["protocol"], 1, "{hello}");
    assert_eq!(h["abi"], shm_proto::ABI_VERSION, "{hello}");
    assert_eq!(h["version"].as_str(), Some(env!("CARGO_PKG_VERSION")), "{hello}");
    assert!(h["capabilities"].as_array().is_some_and(|c| c.iter().any(|c| c == "events")), "{hello}");
    let st = r.next(Duration::from_secs(10));
    assert_eq!(st["id"], 2, "{st}");
    assert!(st["result"]["sidecores"].is_array(), "{st}");

    // A batch, with a notification (no reply) and a bad method in it.
    s.write_all(
        b"[{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"methods\"},{\"jsonrpc\":\"2.0\",\"method\":\"hello\"},\
          {\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"nope\"}]\n",
    )
    .expect("send batch");
    let batch = r.next(Duration::from_secs(10));
    let items = batch.as_array().unwrap_or_else(|| panic!("a batch reply: {batch}"));
    assert_eq!(items.len(), 2, "the notification gets no reply: {batch}");
    assert!(items[0]["result"].as_array().is_some_and(|m| m.iter().any(|m| m == "subscribe")), "{batch}");
    assert_eq!((items[1]["id"].as_i64(), items[1]["error"]["code"].as_i64()), (Some(4), Some(-32601)), "{batch}");

    // Subscribe, then a VM comes and goes: attach, then detach, with its
    // pid; the daemon's parked sidecore wakes for it and parks after.
    s.write_all(
        b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"subscribe\",\"params\":{\"events\":\
          [\"attach\",\"detach\",\"sidecore_park\",\"sidecore_unpark\"]}}\n",
    )
    .expect("subscribe");
    let mut sub = r.next(Duration::from_secs(10));
    while sub.get("id").is_none() {
        // A park event may come before the reply.
        sub = r.next(Duration::from_secs(10));
    }
    assert_eq!(sub["id"], 5, "{sub}");
    let vm = lingering_vm(&sock, 500, None);
    let pid = u64::from(vm.id());
    let mut events = Vec::new();
    let t0 = Instant::now();
    while !events.iter().any(|e: &serde_json::Value| e["params"]["event"] == "detach") {
        assert!(t0.elapsed() < Duration::from_secs(120), "no detach event: {events:?}");
        let e = r.next(Duration::from_secs(120));
        assert_eq!(e["method"], "event", "{e}");
        events.push(e);
    }
    let kind = |k: &str| events.iter().position(|e| e["params"]["event"] == k);
    let (a, d) = (kind("attach").expect("an attach event"), kind("detach").expect("detach"));
    assert!(a < d, "{events:?}");
    let (attach, detach) = (&events[a]["params"], &events[d]["params"]);
    assert_eq!(attach["pid"].as_u64(), Some(pid), "{attach}");
    assert!(attach["vm"].is_u64() && attach["name"].is_string() && attach["cpu"] == 0, "{attach}");
    assert_eq!(detach["vm"], attach["vm"], "{detach}");
    assert!(kind("sidecore_unpark").is_some(), "the sidecore served the VM unparked: {events:?}");
    // Parked at the end: the last park/unpark event is a park (where the
    // guest is slow, as in the emulated bed, the sidecore parks and wakes
    // during the VM's life too, and may be parked when it detaches).
    let last_is_park = |events: &[serde_json::Value]| {
        events
            .iter()
            .rev()
            .find_map(|e| e["params"]["event"].as_str().filter(|k| k.starts_with("sidecore_")))
            .is_some_and(|k| k == "sidecore_park")
    };
    if !last_is_park(&events) {
        events.push(r.next(Duration::from_secs(30)));
    }
    assert!(last_is_park(&events), "the sidecore did not park after the VM left: {events:?}");
    let out = vm.wait_with_output().expect("VMM");
    assert!(out.status.success(), "the VM failed");
    // The subscriber still gets answers.
    s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":6,\"method\":\"status\"}\n").expect("send");
    assert_eq!(r.next(Duration::from_secs(10))["id"], 6);
}

/// GET `path` from `addr` over HTTP/1.0 (so no chunked answer): status
/// line and body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut c = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// Time of the quickest of three scrapes.
fn quickest_scrape(addr: &str) -> Duration {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let (st, body) = http_get(addr, "/metrics");
            assert!(st.contains(" 200 ") && body.contains("sidecore_build_info"), "{st}\n{body}");
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Percent-encodes a query for a URL.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus, killed when dropped.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn promtool_is_clean_with_two_vms_and_a_real_prometheus_scrapes_the_daemon() {
    if !kvm_available() {
        return;
    }
    let promtool_ok = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    let prometheus_ok = Command::new("prometheus").arg("--version").output().is_ok_and(|o| o.status.success());
    if !promtool_ok || !prometheus_ok {
        skip("promtool or prometheus is not installed (apt-get install prometheus; .ci/run installs it)");
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("prom");
    let metrics = format!("127.0.0.1:{}", free_port());
    let _d = start_daemon_with(&sock, &["--metrics", &metrics]);
    // Two VMs making sidecalls for the whole of the scrape window.
    let mut vms = [lingering_vm(&sock, 40_000, Some("web-1")), lingering_vm(&sock, 40_000, Some("db.2"))];
    let both = wait_for(Duration::from_secs(120), || {
        let st = status(&sock);
        st["vms"].as_array().is_some_and(|v| v.len() == 2 && v.iter().all(|v| v["total"].as_u64() > Some(0)))
    });
    assert!(both, "two VMs did not attach and call: {}", status(&sock));

    // promtool on the classic text format (what it reads).
    let (st, body) = http_get(&metrics, "/metrics");
    assert!(st.contains(" 200 "), "{st}");
    assert_eq!(body.matches("sidecore_vm_info{").count(), 2, "{body}");
    for name in ["web-1", "db.2"] {
        assert!(body.contains(&format!("sidecore_vm_info{{vm=\"{name}\"")), "no VM named {name}: {body}");
    }
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("feed promtool");
    let out = check.wait_with_output().expect("promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\n{body}");

    // A real Prometheus scraping it every second for 20 s.
    let dir = std::env::temp_dir().join(format!("sidecore-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: sidecore\n    \
             static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .expect("config");
    let web = format!("127.0.0.1:{}", free_port());
    let _p = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let ready = wait_for(Duration::from_secs(60), || http_get_ok(&web, "/-/ready"));
    assert!(ready, "prometheus did not get ready on {web}");
    std::thread::sleep(Duration::from_secs(20));
    let (_, targets) = http_get(&web, "/api/v1/targets");
    let t: serde_json::Value = serde_json::from_str(&targets).expect("targets JSON");
    let active = t["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
    assert!(
        active.len() == 1 && active[0]["health"] == "up",
        "the daemon's target is not up: {}",
        serde_json::to_string_pretty(&active).unwrap_or_default()
    );
    let q = "histogram_quantile(0.99, sum by (le, vm) (rate(sidecore_service_time_seconds_bucket[10s])))";
    let (_, answer) = http_get(&web, &format!("/api/v1/query?query={}", urlencode(q)));
    let a: serde_json::Value = serde_json::from_str(&answer).expect("query JSON");
    let result = a["data"]["result"].as_array().cloned().unwrap_or_default();
    assert_eq!(result.len(), 2, "one p99 per VM: {answer}");
    for r in &result {
        let v: f64 = r["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0 && v < 0.1, "p99 service time {v} s: {answer}");
    }
    // Scraped every second: at least 15 samples of `up` in 20 s.
    let (_, up) = http_get(&web, &format!("/api/v1/query?query={}", urlencode("count_over_time(up[20s])")));
    let n: f64 = serde_json::from_str::<serde_json::Value>(&up)
        .ok()
        .and_then(|v| v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0.0);
    assert!(n >= 15.0, "only {n} scrapes in 20 s: {up}");
    for vm in &mut vms {
        let _ = vm.kill();
        let _ = vm.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn http_get_ok(addr: &str, path: &str) -> bool {
    std::net::TcpStream::connect(addr).is_ok() && http_get(addr, path).0.contains(" 200 ")
}

#[test]
fn five_idle_tcp_connections_do_not_delay_a_scrape() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("idle-scrape");
    let metrics = format!("127.0.0.1:{}", free_port());
    let _d = start_daemon_with(&sock, &["--metrics", &metrics]);
    let alone = quickest_scrape(&metrics);
    let idle: Vec<_> = (0..5).map(|_| std::net::TcpStream::connect(&metrics).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(100));
    let beside = quickest_scrape(&metrics);
    assert!(
        beside < alone + Duration::from_millis(100),
        "5 idle connections delayed a scrape from {alone:?} to {beside:?}"
    );
    drop(idle);
}

#[test]
fn status_and_run_attach_find_the_default_socket() {
    if !kvm_available() {
        return;
    }
    let default = Path::new(sidecore_vmm::daemon::DEFAULT_SOCKET);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("not root: cannot create /run/sidecore for the default socket");
        return;
    }
    if UnixStream::connect(default).is_ok() {
        skip("a daemon already listens on the default socket: not starting another");
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut d = Command::new(bin())
        .args(["daemon", "--cores", "0"])
        .stderr(Stdio::null())
        .spawn()
        .expect("start the daemon on the default socket");
    let up = wait_for(Duration::from_secs(60), || {
        Command::new(bin()).arg("status").output().is_ok_and(|o| o.status.success())
    });
    let run = up.then(|| {
        Command::new(bin()).args(["run", "--workload", "hello", "--vcpu-cpus", "1", "--attach"]).output().expect("run")
    });
    // SAFETY: kill with a pid we own and a valid signal.
    unsafe { libc::kill(i32::try_from(d.id()).unwrap_or(0), libc::SIGTERM) };
    let _ = d.wait();
    let _ = std::fs::remove_file(default);
    assert!(up, "`sidecore status` with no --socket did not find the daemon on {}", default.display());
    let run = run.expect("ran");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "run --attach (default socket) failed: {err}");
}
