//! The daemon's vhost-user-blk devices as an operator sees them: two disks
//! on a daemon with two sidecores go to different sidecores, events tell of
//! each VMM connecting and leaving, and a device added on the control
//! socket at run time serves and can be removed again.

#[allow(dead_code)] // Shared helpers; this file uses only skip().
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sidecore_vmm::bench::vhost_blk::{BlkDriver, DriverOptions};

const TIMEOUT: Duration = Duration::from_secs(10);

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(t.elapsed() < TIMEOUT, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![0u8; 4 << 20]).expect("image");
    p
}

fn start(name: &str, cores: &str, disks: &[&str]) -> Daemon {
    let dir = std::env::temp_dir().join(format!("sidecore-vubd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sidecore"));
    cmd.arg("daemon").arg("--socket").arg(dir.join("ctl.sock")).args(["--cores", cores]);
    for d in disks {
        let img = image(&dir, &format!("{d}.img"));
        cmd.arg("--vhost-user-blk").arg(format!("{},path={}", dir.join(format!("{d}.sock")).display(), img.display()));
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("daemon");
    let d = Daemon { child, dir };
    wait_for(&d.dir.join("ctl.sock"));
    d
}

fn rpc(ctl: &Path, method: &str, params: serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(ctl).expect("control socket");
    let req = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(s, "{req}").expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).expect("JSON reply")
}

fn connect(sock: &Path) -> BlkDriver {
    BlkDriver::connect(sock, &DriverOptions::default()).unwrap_or_else(|e| panic!("{}", sidecore_vmm::error_chain(&e)))
}

fn round_trip(d: &mut BlkDriver) {
    let mut data = vec![0x5au8; 4096];
    d.transfer(0, true, 8, &mut data, TIMEOUT).expect("write");
    let mut back = vec![0u8; 4096];
    d.transfer(0, false, 8, &mut back, TIMEOUT).expect("read");
    assert_eq!(back, vec![0x5au8; 4096]);
}

#[test]
fn two_disks_go_to_two_sidecores_and_events_tell_of_their_vmms() {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    if online < 2 {
        common::skip("one CPU, one sidecore: nothing to spread over");
        return;
    }
    let daemon = start("spread", "0,1", &["a", "b"]);
    let ctl = daemon.dir.join("ctl.sock");
    // A subscriber, before the VMMs come.
    let mut sub = UnixStream::connect(&ctl).expect("subscriber");
    writeln!(
        sub,
        r#"{{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{{"events":["vhost_connect","vhost_disconnect"]}}}}"#
    )
    .expect("subscribe");
    sub.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut events = BufReader::new(sub.try_clone().expect("clone"));
    let mut line = String::new();
    events.read_line(&mut line).expect("subscribe reply");
    let mut a = connect(&daemon.dir.join("a.sock"));
    let mut b = connect(&daemon.dir.join("b.sock"));
    round_trip(&mut a);
    round_trip(&mut b);
    let st = sidecore_vmm::daemon::query_status(&ctl).expect("status");
    let cores: Vec<Option<usize>> = st.vhost_user_blk.iter().map(|d| d.sidecore).collect();
    assert_eq!(cores.len(), 2);
    assert!(cores.iter().all(Option::is_some) && cores[0] != cores[1], "the two disks share a sidecore: {cores:?}");
    drop(a);
    drop(b);
    let mut seen = Vec::new();
    while seen.len() < 4 {
        line.clear();
        events.read_line(&mut line).unwrap_or_else(|e| panic!("events so far {seen:?}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&line).expect("event JSON");
        let p = &v["params"];
        seen.push((p["event"].as_str().unwrap_or("").to_string(), p["device"].as_str().unwrap_or("").to_string()));
    }
    for d in ["a.sock", "b.sock"] {
        for kind in ["vhost_connect", "vhost_disconnect"] {
            assert!(seen.iter().any(|(k, dev)| k == kind && dev.ends_with(d)), "no {kind} for {d}: {seen:?}");
        }
    }
}

#[test]
fn a_device_added_at_run_time_serves_and_is_removed() {
    let daemon = start("runtime", "0", &[]);
    let ctl = daemon.dir.join("ctl.sock");
    let img = image(&daemon.dir, "late.img");
    let sock = daemon.dir.join("late.sock");
    let r = rpc(&ctl, "vhost_user_blk_add", serde_json::json!({"socket": sock, "path": img, "queues": 2}));
    assert!(r["result"]["socket"].is_string(), "{r}");
    let again = rpc(&ctl, "vhost_user_blk_add", serde_json::json!({"socket": sock, "path": img}));
    assert_eq!(again["error"]["code"], -32006, "{again}");
    let missing = rpc(
        &ctl,
        "vhost_user_blk_add",
        serde_json::json!({"socket": daemon.dir.join("x.sock"), "path": "/nonexistent"}),
    );
    assert!(missing["error"]["message"].as_str().unwrap_or("").contains("/nonexistent"), "{missing}");
    let mut d = connect(&sock);
    assert_eq!(d.backend_queues(), 2);
    round_trip(&mut d);
    drop(d);
    let r = rpc(&ctl, "vhost_user_blk_remove", serde_json::json!({"socket": sock}));
    assert!(r["result"]["removed"].is_string(), "{r}");
    let t = Instant::now();
    while sock.exists() {
        assert!(t.elapsed() < TIMEOUT, "the socket stayed after removal");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = sidecore_vmm::daemon::query_status(&ctl).expect("status");
    assert!(st.vhost_user_blk.is_empty(), "{:?}", st.vhost_user_blk);
}
