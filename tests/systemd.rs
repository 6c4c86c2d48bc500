//! The daemon under systemd and without privilege: the shipped unit's
//! `systemd-analyze` rating and verification, READY=1/STOPPING=1 over
//! NOTIFY_SOCKET, socket activation (and refusing a passed fd that is not a
//! listening Unix stream socket), and a daemon running as nobody that lets
//! in a peer by its supplementary group only.
//!
//! None of this needs KVM: the daemon reads the TSC rate without /dev/kvm
//! when it cannot open it.

#[allow(dead_code)] // not every helper is used here
mod common;
use common::skip;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sidecore")
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A directory of the test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("sidecore-systemd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create a temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child killed and reaped when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

fn status(sock: &Path) -> Output {
    Command::new(bin()).args(["status", "--json", "--socket"]).arg(sock).output().expect("run sidecore status")
}

/// Waits up to 60 s for `sidecore status` on `sock` to succeed.
fn wait_status(sock: &Path, child: &mut Child) {
    let t0 = Instant::now();
    loop {
        if status(sock).status.success() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the daemon exited ({st}) before answering on {}", sock.display());
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no status answer on {} within 60 s", sock.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill has no memory effects; the pid is our own unreaped child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM to the daemon");
}

/// Waits up to 30 s for `child` to exit.
fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait for the daemon") {
            return st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the daemon did not exit within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Overall exposure level for NAME: 1.2 OK` → 1.2.
fn exposure(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("Overall exposure level for"))?;
    line.rsplit_once(": ")?.1.split_whitespace().next()?.parse().ok()
}

/// The value of `key=` in a unit file's text (the first assignment).
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn the_shipped_unit_is_rated_3_or_lower_and_verifies_clean() {
    if !have("systemd-analyze") {
        skip("systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let service = scripts().join("sidecore.service");
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&service)
        .output()
        .expect("systemd-analyze security");
    let t = text(&o);
    let level = exposure(&t).unwrap_or_else(|| panic!("no exposure level in:\n{t}"));
    eprintln!("systemd-analyze security --offline=yes: exposure {level}");
    assert!(level <= 3.0, "the unit is rated {level}, above 3.0:\n{t}");

    // verify checks that ExecStart's binary exists, so the units are
    // verified as they are, under a root that has the built binary at the
    // unit's path and the system's own units (the targets they refer to).
    let unit = std::fs::read_to_string(&service).expect("read the service unit");
    let exec = unit_value(&unit, "ExecStart").expect("ExecStart=");
    let exe = exec.split_whitespace().next().expect("ExecStart's binary").trim_start_matches(['-', '@', ':', '+', '!']);
    assert!(exe.starts_with('/'), "ExecStart's binary is an absolute path: {exe}");
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists());
    let Some(system_units) = system_units else {
        skip("no system unit directory with sysinit.target: systemd-analyze verify cannot resolve the targets");
        return;
    };
    let root = TempDir::new("verify-root");
    let bin_at = root.0.join(exe.trim_start_matches('/'));
    std::fs::create_dir_all(bin_at.parent().expect("a directory")).expect("mkdir for the binary");
    if std::fs::hard_link(bin(), &bin_at).is_err() {
        std::fs::copy(bin(), &bin_at).expect("copy the binary into the verify root");
    }
    let etc = root.0.join("etc/systemd/system");
    std::fs::create_dir_all(&etc).expect("mkdir etc/systemd/system");
    for u in ["sidecore.service", "sidecore.socket"] {
        std::fs::copy(scripts().join(u), etc.join(u)).expect("copy a unit");
    }
    let lib = root.0.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&lib).expect("mkdir usr/lib/systemd/system");
    for e in std::fs::read_dir(system_units).expect("list the system units").flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::copy(e.path(), lib.join(e.file_name()));
        }
    }
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.0.display()))
        .args(["sidecore.service", "sidecore.socket"])
        .output()
        .expect("systemd-analyze verify");
    let t = text(&o);
    assert!(o.status.success() && t.trim().is_empty(), "systemd-analyze verify is not clean:\n{t}");

    // The two units name the same socket, and its group is the daemon's.
    let socket = std::fs::read_to_string(scripts().join("sidecore.socket")).expect("read the socket unit");
    let listen = unit_value(&socket, "ListenStream").expect("ListenStream=");
    assert!(exec.contains(&format!("--socket {listen} ")), "ExecStart's --socket is not {listen}: {exec}");
    let group = unit_value(&socket, "SocketGroup").expect("SocketGroup=");
    assert!(exec.contains(&format!("--group {group}")), "ExecStart's --group is not {group}: {exec}");
    assert_eq!(unit_value(&unit, "Group"), Some(group), "the service's Group= is the socket's group");
    assert_eq!(unit_value(&unit, "Type"), Some("notify"));
}

#[test]
fn the_daemon_says_ready_once_it_answers_and_stopping_on_sigterm() {
    let dir = TempDir::new("notify");
    let notify = dir.0.join("notify.sock");
    let sock = dir.0.join("d.sock");
    let rx = UnixDatagram::bind(&notify).expect("bind the notify socket");
    rx.set_read_timeout(Some(Duration::from_secs(60))).expect("read timeout");
    let child = Command::new(bin())
        .args(["daemon", "--cores", "0", "--socket"])
        .arg(&sock)
        .env("NOTIFY_SOCKET", &notify)
        .stderr(Stdio::null())
        .spawn()
        .expect("start the daemon");
    let mut d = Killed(child);
    let mut buf = [0u8; 4096];
    let n = rx.recv(&mut buf).expect("a notification from the daemon within 60 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "first notification: {msg:?}");
    assert!(msg.contains("STATUS="), "a status line for systemctl status: {msg:?}");
    // Ready means ready: the first status request is answered, no retries.
    let o = status(&sock);
    assert!(o.status.success(), "status right after READY=1: {}", text(&o));
    sigterm(&d.0);
    let n = rx.recv(&mut buf).expect("STOPPING=1 within 60 s of SIGTERM");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "after SIGTERM: {msg:?}");
    assert!(wait_exit(&mut d.0).success());
}

/// `systemd-socket-activate [extra] -l SOCK sidecore daemon --cores 0
/// --socket SOCK`, once its socket exists (the daemon starts on the first
/// connection or datagram).
fn socket_activate(extra: &[&str], sock: &Path, stdio: fn() -> Stdio) -> Killed {
    let child = Command::new("systemd-socket-activate")
        .args(extra)
        .arg("-l")
        .arg(sock)
        .arg(bin())
        .args(["daemon", "--cores", "0", "--socket"])
        .arg(sock)
        .stdout(stdio())
        .stderr(stdio())
        .spawn()
        .expect("start systemd-socket-activate");
    let d = Killed(child);
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "systemd-socket-activate made no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

#[test]
fn a_socket_passed_by_systemd_is_used_and_left_alone() {
    if !have("systemd-socket-activate") {
        skip("systemd-socket-activate is not installed (apt-get install systemd)");
        return;
    }
    let dir = TempDir::new("activate");
    let sock = dir.0.join("act.sock");
    // It listens on the path at once and execs the daemon (same pid, fd 3)
    // on the first connection.
    let mut d = socket_activate(&[], &sock, Stdio::null);
    let before = std::fs::metadata(&sock).expect("stat the socket");
    // Binding --socket itself would find it in use and refuse: that status
    // answers shows the passed fd is served.
    wait_status(&sock, &mut d.0);
    let after = std::fs::metadata(&sock).expect("the socket is still there");
    assert_eq!((after.ino(), after.mode()), (before.ino(), before.mode()), "the daemon replaced or chmod-ed it");
    sigterm(&d.0);
    assert!(wait_exit(&mut d.0).success());
    assert!(sock.exists(), "the daemon removed the socket systemd owns");
}

#[test]
fn a_passed_fd_that_is_not_a_listening_unix_stream_socket_is_refused() {
    // fd 3 is /dev/null, passed the way systemd passes sockets. Bounded: a
    // daemon that ignored fd 3 would bind and serve on.
    let child = Command::new("sh")
        .args(["-c", "export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" daemon --cores 0 --socket \"$1\" 3</dev/null"])
        .arg(bin())
        .arg(std::env::temp_dir().join(format!("sidecore-never-{}.sock", std::process::id())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the daemon");
    let mut d = Killed(child);
    assert!(!wait_exit(&mut d.0).success(), "the daemon took /dev/null as its socket");
    let mut t = String::new();
    if let Some(mut e) = d.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut t);
    }
    assert!(t.contains("socket activation") && t.contains("fd 3") && t.contains("is not a socket"), "{t}");
    drop(d);

    if !have("systemd-socket-activate") {
        skip("systemd-socket-activate is not installed: the datagram-socket case is not run");
        return;
    }
    let dir = TempDir::new("dgram");
    let sock = dir.0.join("dgram.sock");
    let mut d = socket_activate(&["--datagram"], &sock, Stdio::piped);
    // A datagram wakes it: it execs the daemon with the datagram socket.
    UnixDatagram::unbound().expect("datagram socket").send_to(b"x", &sock).expect("send a datagram");
    assert!(!wait_exit(&mut d.0).success(), "the daemon took a datagram socket");
    let mut err = String::new();
    if let Some(mut e) = d.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(err.contains("not a stream socket"), "{err}");
}

/// A group that is neither root's nor nobody's, by name and gid.
fn some_group() -> Option<(String, u32)> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let gid: u32 = f.nth(1)?.parse().ok()?;
        (gid != 0 && gid < 65534 && !name.is_empty()).then(|| (name.to_string(), gid))
    })
}

#[test]
fn an_unprivileged_daemon_admits_root_and_a_supplementary_group_member_only() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("not root: cannot start processes as other users");
        return;
    }
    if !have("setpriv") {
        skip("setpriv (util-linux) is not installed");
        return;
    }
    let Some((group, gid)) = some_group() else {
        skip("/etc/group has no group besides root and nobody");
        return;
    };
    const NOBODY: u32 = 65534;
    const CLIENT: u32 = 65533;
    let dir = TempDir::new("unpriv");
    std::os::unix::fs::chown(&dir.0, Some(NOBODY), Some(gid)).expect("chown the temp dir");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod the temp dir");
    let sock = dir.0.join("d.sock");
    let log = dir.0.join("daemon.log");
    let log_file = std::fs::File::create(&log).expect("create the daemon log");
    // The daemon as nobody, primary group `group`, no supplementary groups
    // (std clears them when it sets the uid), from a directory it owns.
    let child = Command::new(bin())
        .args(["daemon", "--cores", "0", "--group", &group, "--socket"])
        .arg(&sock)
        .env("SIDECORE_LOG", "info")
        .current_dir(&dir.0)
        .uid(NOBODY)
        .gid(gid)
        .stderr(log_file)
        .spawn()
        .expect("start the daemon as nobody");
    let mut d = Killed(child);
    wait_status(&sock, &mut d.0);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("TSC rate"), "the TSC rate and its source are logged at info:\n{logged}");
    let kvm = std::fs::metadata("/dev/kvm");
    if kvm.as_ref().is_ok_and(|m| m.mode() & 0o066 == 0) {
        assert!(!logged.contains("KVM_GET_TSC_KHZ"), "nobody cannot open /dev/kvm, yet:\n{logged}");
    }
    let st = std::fs::metadata(&sock).expect("stat the socket");
    assert_eq!((st.uid(), st.gid(), st.mode() & 0o777), (NOBODY, gid, 0o660), "socket owner and mode");
    // Let anyone connect, so that the daemon's own check decides.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod the socket");

    let as_client = |groups: Option<u32>| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", &CLIENT.to_string(), "--regid", &CLIENT.to_string()]);
        match groups {
            Some(g) => c.args(["--groups", &g.to_string()]),
            None => c.arg("--clear-groups"),
        };
        c.args(["--", bin(), "status", "--socket"]).arg(&sock).output().expect("run setpriv")
    };
    let o = as_client(Some(gid));
    assert!(o.status.success(), "uid {CLIENT} with supplementary group {group} ({gid}) refused: {}", text(&o));
    let o = as_client(None);
    let t = text(&o);
    assert!(!o.status.success(), "uid {CLIENT} without the group was let in: {t}");
    assert!(t.contains("permission denied") && t.contains("not in its group"), "{t}");
    let o = status(&sock);
    assert!(o.status.success(), "root: {}", text(&o));
    sigterm(&d.0);
    assert!(wait_exit(&mut d.0).success());
    assert!(!sock.exists(), "the daemon removes the socket it made");
}
