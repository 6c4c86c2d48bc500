//! A `sidecore daemon` child for the tests that attach VMs to one.
// Shared by several test binaries; not every one uses every item.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The daemon, killed (and its socket removed) when dropped.
pub struct Daemon(pub Child, PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// A socket path of its own for test `tag`.
pub fn socket(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sidecore-test-{tag}-{}.sock", std::process::id()))
}

/// Starts `sidecore daemon --cores 0` on `sock`; returns once it answers
/// `status` (not when its socket file appears), or panics, with the
/// daemon's log, when it exits first or after 60 s.
pub fn start_daemon(sock: &Path) -> Daemon {
    start_daemon_with(sock, &[])
}

/// [`start_daemon`] with `extra` arguments (e.g. `--metrics ADDR`).
pub fn start_daemon_with(sock: &Path, extra: &[&str]) -> Daemon {
    let bin = env!("CARGO_BIN_EXE_sidecore");
    let _ = std::fs::remove_file(sock);
    // Its log beside the socket, for the panic below (removed once it answers).
    let log = sock.with_extension("log");
    let log_file = std::fs::File::create(&log).expect("create the daemon's log");
    let child = Command::new(bin)
        .args(["daemon", "--cores", "0", "--idle-park-us", "1000"])
        .args(extra)
        .arg("--socket")
        .arg(sock)
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("start daemon");
    let mut d = Daemon(child, sock.to_path_buf());
    let t0 = Instant::now();
    while !Command::new(bin).args(["status", "--socket"]).arg(sock).output().is_ok_and(|o| o.status.success()) {
        let exited = d.0.try_wait().ok().flatten();
        if exited.is_some() || t0.elapsed() > Duration::from_secs(60) {
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            match exited {
                Some(st) => {
                    panic!("the daemon for {} exited ({st}) before answering; its log:\n{logged}", sock.display())
                }
                None => panic!("the daemon did not answer on {} within 60 s; its log:\n{logged}", sock.display()),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&log);
    d
}

/// A loopback TCP port free just now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("addr").port()
}
