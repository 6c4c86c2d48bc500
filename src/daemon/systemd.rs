//! The daemon under systemd: readiness and stop notices (sd_notify; a no-op
//! without NOTIFY_SOCKET), and the listening socket systemd may pass instead
//! of the daemon binding its own (socket activation: LISTEN_PID, LISTEN_FDS,
//! fd 3).

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Whether fd 3 has been made a listener already: it has one owner.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The service manager's notification socket (NOTIFY_SOCKET), connected
/// at start-up: the control thread's seccomp filter forbids creating
/// sockets and sending to an address, so the notices later go out with a
/// plain send on this one. Empty without NOTIFY_SOCKET.
pub(super) struct Notifier(Option<std::os::unix::net::UnixDatagram>);

impl Notifier {
    /// Connects to NOTIFY_SOCKET (a path, or `@name` for an abstract one).
    pub fn connect() -> Notifier {
        let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else { return Notifier(None) };
        let connected = (|| -> std::io::Result<std::os::unix::net::UnixDatagram> {
            use std::os::unix::ffi::OsStrExt;
            let sock = std::os::unix::net::UnixDatagram::unbound()?;
            let bytes = addr.as_bytes();
            match bytes.strip_prefix(b"@") {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    sock.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?;
                }
                None => sock.connect(Path::new(&addr))?,
            }
            Ok(sock)
        })();
        match connected {
            Ok(s) => Notifier(Some(s)),
            Err(e) => {
                // Not fatal: systemd then times the start out, which says why.
                tracing::warn!("cannot reach the service manager at NOTIFY_SOCKET={}: {e}", addr.to_string_lossy());
                Notifier(None)
            }
        }
    }

    /// Tells the service manager the socket accepts connections
    /// (Type=notify), with a one-line status for `systemctl status`.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"), "READY=1");
    }

    /// Tells the service manager the daemon is draining after SIGTERM/SIGINT.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining: detaching VMs\n", "STOPPING=1");
    }

    fn send(&self, msg: &str, what: &str) {
        if let Some(s) = &self.0 {
            if let Err(e) = s.send(msg.as_bytes()) {
                tracing::warn!("cannot send {what} to the service manager: {e}");
            }
        }
    }
}

/// The listening socket systemd passed, if it passed one to this process;
/// `Ok(None)` when the daemon is to bind `--socket` itself. Refuses more
/// than one fd, and an fd that is not a listening AF_UNIX stream socket.
/// `socket` is the `--socket` path: a passed socket bound elsewhere is used,
/// with a warning (clients follow the unit's path).
pub(super) fn activated_listener(socket: &Path) -> Result<Option<UnixListener>, String> {
    let fds = sd_notify::listen_fds().map_err(|e| format!("reading LISTEN_PID/LISTEN_FDS: {e}"))?;
    match fds.len() {
        0 => return Ok(None),
        1 => {}
        n => {
            return Err(format!(
                "systemd passed {n} sockets (LISTEN_FDS={n}); the daemon takes exactly one: give the .socket unit \
                 one ListenStream="
            ))
        }
    }
    let fd = LISTEN_FDS_START;
    check_listening_unix_stream(fd)?;
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(format!("the socket systemd passed (fd {fd}) is already in use by this process"));
    }
    // SAFETY: LISTEN_PID names this process, so systemd passed fd 3 to it
    // alone; it is an open listening socket (checked above), nothing else in
    // the process opened or owns it, and TAKEN makes this the only owner.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    let bound = listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf));
    match bound {
        Some(p) if p == socket => {}
        Some(p) => tracing::warn!(
            "the socket systemd passed is bound to {}, not --socket {}: clients must use {}",
            p.display(),
            socket.display(),
            p.display()
        ),
        None => tracing::warn!("the socket systemd passed has no path (abstract or unnamed)"),
    }
    tracing::info!(fd, "using the listening socket passed by systemd (socket activation)");
    Ok(Some(listener))
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| std::io::Error::other("socklen_t"))?;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, an int; an fd
    // that is not a socket makes it fail with ENOTSOCK, nothing worse.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, std::ptr::addr_of_mut!(v).cast(), &mut len) };
    if rc == 0 {
        Ok(v)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Refuses `fd` unless it is a listening AF_UNIX SOCK_STREAM socket.
fn check_listening_unix_stream(fd: RawFd) -> Result<(), String> {
    let what = format!("the fd systemd passed (fd {fd}, LISTEN_FDS=1)");
    // SAFETY: libc::stat is plain integers: all zeros is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, a valid stat; a closed fd fails with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(format!(
            "{what} is not a socket: the .socket unit must use ListenStream=/run/sidecore/sidecore.sock"
        ));
    }
    let opt = |o, name: &str| sockopt_int(fd, o).map_err(|e| format!("{what}: getsockopt {name}: {e}"));
    let domain = opt(libc::SO_DOMAIN, "SO_DOMAIN")?;
    if domain != libc::AF_UNIX {
        return Err(format!(
            "{what} is not a Unix socket (address family {domain}): use ListenStream= with a path, not an address"
        ));
    }
    if opt(libc::SO_TYPE, "SO_TYPE")? != libc::SOCK_STREAM {
        return Err(format!(
            "{what} is not a stream socket: use ListenStream=, not ListenDatagram= or ListenSequentialPacket="
        ));
    }
    if opt(libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? == 0 {
        return Err(format!("{what} is not listening: the .socket unit must have Accept=no"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn only_a_listening_unix_stream_socket_passes() {
        let dir = std::env::temp_dir().join(format!("sidecore-systemd-unit-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        assert_eq!(check_listening_unix_stream(listener.as_raw_fd()), Ok(()));
        let conn = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        let e = check_listening_unix_stream(conn.as_raw_fd()).unwrap_err();
        assert!(e.contains("not listening"), "{e}");
        let dgram = std::os::unix::net::UnixDatagram::unbound().expect("datagram socket");
        let e = check_listening_unix_stream(dgram.as_raw_fd()).unwrap_err();
        assert!(e.contains("not a stream socket"), "{e}");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp listener");
        let e = check_listening_unix_stream(tcp.as_raw_fd()).unwrap_err();
        assert!(e.contains("not a Unix socket"), "{e}");
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let e = check_listening_unix_stream(file.as_raw_fd()).unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
