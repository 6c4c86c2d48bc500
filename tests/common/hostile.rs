//! A raw control-socket client for tests that play a hostile VMM: it
//! builds attach requests and fds by hand (memfds sealed or not, pipes,
//! files, sockets) and sends them the way a VMM would, or worse.
// Shared by several test binaries; not every one uses every item.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Guest RAM of the hand-made VM.
pub const RAM: u64 = 64 << 20;
/// Its shared region.
pub const SHARED_GPA: u64 = 0x40_0000;
/// Its page-table pool.
pub const POOL_GPA: u64 = 0x10_0000;
/// Pool size (256 pages).
pub const POOL_SIZE: u64 = 0x10_0000;
/// First free byte (the packet device's buffers).
pub const FREE_GPA: u64 = 0x60_0000;

/// A memfd of `size` bytes with `seals` added (0: none).
pub fn memfd(size: u64, seals: libc::c_int) -> File {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("size the memfd");
    if seals != 0 {
        // SAFETY: F_ADD_SEALS takes an int and touches no memory of ours.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }, 0, "F_ADD_SEALS");
    }
    f
}

/// A memfd sealed the way the daemon asks.
pub fn sealed(size: u64) -> File {
    memfd(size, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL)
}

/// The host-state block's size for the pool.
pub fn host_size() -> u64 {
    sidecore_core::hostmem::HostShared::size(usize::try_from(POOL_SIZE / 4096).unwrap_or(0)) as u64
}

/// An eventfd with `flags`.
pub fn eventfd(flags: libc::c_int) -> File {
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, flags) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// A pipe's two ends.
pub fn pipe() -> (File, File) {
    let mut p = [-1; 2];
    // SAFETY: pipe writes two descriptors into `p`.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: both are fresh descriptors nothing else owns.
    unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) }
}

/// A well-formed attach request's params for one vCPU ([`attach`] wraps
/// them in the JSON-RPC request).
pub fn attach_request(packet_device: bool) -> serde_json::Value {
    serde_json::json!({
        "vcpus": 1, "backend": "svm", "ram_size": RAM,
        "shared_gpa": SHARED_GPA, "shared_size": shm_proto::ring::region_size(1),
        "pool_gpa": POOL_GPA, "pool_size": POOL_SIZE, "image_gpa": 0x20_0000, "image_end": 0x21_0000,
        "free_gpa": FREE_GPA, "cpuid": [[[0, 0, 0, 0xd, 0, 0, 0]]], "packet_device": packet_device,
    })
}

/// Connects and sends `bytes` with `fds` in one sendmsg (the daemon may
/// hang up before all of a long message is sent: its reply says why).
pub fn send(sock: &Path, bytes: &[u8], fds: &[RawFd]) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect to the daemon");
    if fds.is_empty() {
        let _ = (&s).write_all(bytes);
    } else {
        let n = s.send_with_fds(&[bytes], fds).expect("sendmsg with fds");
        let _ = (&s).write_all(&bytes[n..]);
    }
    s
}

/// The next reply line (without its newline), or what came before EOF or
/// `limit`.
pub fn reply(s: &UnixStream, limit: Duration) -> String {
    s.set_read_timeout(Some(limit)).expect("read timeout");
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while let Ok(1) = (&*s).read(&mut b) {
        if b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON-RPC 2.0 request line (with its newline).
pub fn rpc(id: u64, method: &str, params: Option<&serde_json::Value>) -> String {
    let mut v = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method});
    if let Some(p) = params {
        v["params"] = p.clone();
    }
    format!("{v}\n")
}

/// Sends an attach of `req` (its params) with `fds`; the daemon's answer.
pub fn attach(sock: &Path, req: &serde_json::Value, fds: &[RawFd]) -> (UnixStream, String) {
    let line = rpc(1, "attach", Some(req));
    let s = send(sock, line.as_bytes(), fds);
    let r = reply(&s, Duration::from_secs(20));
    (s, r)
}

/// The daemon's status (the reply's `result`), over a raw connection.
pub fn status(sock: &Path) -> serde_json::Value {
    let s = send(sock, rpc(1, "status", None).as_bytes(), &[]);
    let v: serde_json::Value = serde_json::from_str(&reply(&s, Duration::from_secs(20))).expect("status JSON");
    v["result"].clone()
}

/// Open fds, mappings of memfds, and threads of process `pid`.
pub fn footprint(pid: u32) -> (usize, usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.lines().filter(|l| l.contains("/memfd:")).count())
        .unwrap_or(0);
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0);
    (fds, maps, threads)
}

/// Waits up to `limit` for `done`; whether it held.
pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// The raw fd of a file, for [`send`].
pub fn raw(f: &impl AsRawFd) -> RawFd {
    f.as_raw_fd()
}
