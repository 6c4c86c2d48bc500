//! The Unix socket under the protocol: lines read with a bound, the
//! first message's fds, the peer's credentials, error replies.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A JSON-RPC error reply with a null id: for what is wrong with the
/// connection rather than with one request (refused peer, framing, too
/// many connections). Best effort: the peer may be gone.
pub(super) fn reply_error(stream: &mut UnixStream, code: i64, msg: &str) {
    let e = protocol::error_response(&serde_json::Value::Null, &protocol::RpcError::new(code, msg));
    let _ = writeln!(stream, "{e}");
}

pub(super) fn peer_cred(stream: &UnixStream) -> Option<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred)
}

/// The peer's supplementary groups as they were when it connected
/// (SO_PEERGROUPS, Linux 4.13+). The list may be longer than the first
/// guess: on ERANGE the kernel reports the size it needs, and we ask again.
pub(super) fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<libc::gid_t>> {
    let gid_size = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    // A few rounds: the peer's list is fixed at connect(), so the second
    // answer fits unless the kernel misreports.
    for _ in 0..4 {
        let mut len = libc::socklen_t::try_from(groups.len() * gid_size)
            .map_err(|_| std::io::Error::other("supplementary group list too large"))?;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`, which
        // has room for exactly `len` bytes of gid_t.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let len = usize::try_from(len).map_err(|_| std::io::Error::other("SO_PEERGROUPS length"))?;
        if rc == 0 {
            groups.truncate(len / gid_size);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
        // The kernel wrote the size it needs into `len`.
        groups.resize((len / gid_size).max(groups.len() * 2), 0);
    }
    Err(std::io::Error::other("SO_PEERGROUPS kept answering ERANGE"))
}

/// Whether a peer with credentials `cred` and supplementary groups `groups`
/// may use the daemon: root, the daemon's own effective user, or a member of
/// `group` (primary or supplementary).
pub(super) fn peer_may_connect(
    cred: &libc::ucred,
    groups: &[libc::gid_t],
    my_euid: libc::uid_t,
    group: Option<libc::gid_t>,
) -> Result<(), String> {
    if cred.uid == 0 || cred.uid == my_euid {
        return Ok(());
    }
    match group {
        Some(g) if cred.gid == g || groups.contains(&g) => Ok(()),
        Some(g) => Err(format!(
            "permission denied: uid {} is not the daemon's user (uid {my_euid}) and not in its group (gid {g}, \
             primary or supplementary)",
            cred.uid
        )),
        None => Err(format!(
            "permission denied: uid {} is not the daemon's user (uid {my_euid}); the daemon has no --group",
            cred.uid
        )),
    }
}

/// The whole access decision for a fresh connection: the peer's
/// credentials if it may use the daemon, else the error to send it.
/// Supplementary groups are read only when the uid and primary gid do not
/// already decide.
pub(super) fn peer_allowed(
    stream: &UnixStream,
    my_euid: libc::uid_t,
    group: Option<libc::gid_t>,
) -> Result<libc::ucred, String> {
    let cred = peer_cred(stream).ok_or("cannot read the peer's credentials")?;
    let by_uid_or_gid = peer_may_connect(&cred, &[], my_euid, group);
    if by_uid_or_gid.is_ok() || group.is_none() {
        return by_uid_or_gid.map(|()| cred);
    }
    let groups = peer_groups(stream).map_err(|e| format!("cannot read the peer's supplementary groups: {e}"))?;
    peer_may_connect(&cred, &groups, my_euid, group).map(|()| cred)
}

pub(super) fn group_gid(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam takes a NUL-terminated name and returns a pointer to
    // static storage or null; we read one field right away.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    // SAFETY: non-null g points at a valid group struct.
    (!g.is_null()).then(|| unsafe { (*g).gr_gid })
}

/// Most fds a connection may pass (an attach with a packet device).
pub const MAX_FDS: usize = 5;

/// How long an attached VM's connection has to finish a request line once
/// its first byte came (between requests it may stay idle for good).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// How long a reply may take to go out before the connection is dropped
/// (a client that does not read cannot hold a thread).
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);

/// How long [`Conn::next_line`] waits.
#[derive(Clone, Copy, Debug)]
pub(super) enum Wait {
    /// The whole line, from now.
    Within(Duration),
    /// Any time for the first byte, then this long for the rest.
    IdleThen(Duration),
}

/// A control connection: its socket, the bytes received but not yet
/// consumed (so that requests sent in one write are answered one by one,
/// in order), and the fds passed so far that no request has taken.
pub(super) struct Conn {
    pub stream: UnixStream,
    buf: Vec<u8>,
    files: Vec<File>,
    eof: bool,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Conn {
        let _ = stream.set_write_timeout(Some(WRITE_DEADLINE));
        Conn { stream, buf: Vec::new(), files: Vec::new(), eof: false }
    }

    /// The fds passed so far, handed over (to an attach).
    pub fn take_files(&mut self) -> Vec<File> {
        std::mem::take(&mut self.files)
    }

    /// The next request line, without its newline; `Ok(None)` once the peer
    /// has hung up with nothing pending. A last line without a newline
    /// before the hang-up counts. Errors: a line over [`MAX_MESSAGE`], more
    /// than [`MAX_FDS`] fds, the deadline, a socket error.
    pub fn next_line(&mut self, wait: Wait) -> Result<Option<Vec<u8>>, String> {
        let mut deadline = match wait {
            Wait::Within(d) => Some(Instant::now() + d),
            Wait::IdleThen(_) => None,
        };
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                if i > MAX_MESSAGE {
                    return Err(format!("message longer than {MAX_MESSAGE} bytes"));
                }
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                return Ok(Some(line));
            }
            if self.buf.len() > MAX_MESSAGE {
                return Err(format!("message longer than {MAX_MESSAGE} bytes"));
            }
            if self.eof {
                return Ok((!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf)));
            }
            if let (None, Wait::IdleThen(d), false) = (deadline, wait, self.buf.is_empty()) {
                deadline = Some(Instant::now() + d);
            }
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.late(wait));
                    }
                    Some(left.max(Duration::from_millis(1)))
                }
                None => None,
            };
            self.stream.set_read_timeout(timeout).map_err(|e| format!("setting the read deadline: {e}"))?;
            match self.fill() {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(self.late(wait))
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(format!("more than {MAX_FDS} fds in one message: the daemon closed them all"))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("recvmsg: {e}")),
            }
            if self.files.len() > MAX_FDS {
                return Err(format!("more than {MAX_FDS} fds passed on one connection"));
            }
        }
    }

    fn late(&self, wait: Wait) -> String {
        let d = match wait {
            Wait::Within(d) | Wait::IdleThen(d) => d,
        };
        format!("no complete request line within {} s: closing the connection", d.as_secs())
    }

    /// One recvmsg: bytes to the buffer, fds to the fds in hand.
    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        // An even count: the control buffer then has no alignment padding,
        // which would let the kernel install one fd more than
        // recv_with_fds looks at (and closes) when the message is truncated.
        let mut fds: [RawFd; MAX_FDS + 1] = [-1; MAX_FDS + 1];
        let mut iov = [libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: chunk.len() }];
        // SAFETY: the iovec points at `chunk`, which lives across the call
        // and may take any bytes; `fds` has room for MAX_FDS + 1 descriptors
        // (more are closed by recv_with_fds, which then fails with ENOBUFS).
        let (n, nfds) = unsafe { self.stream.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: the first `nfds` entries are fresh descriptors now owned
        // here (dropped, so closed, if there are too many).
        self.files.extend(fds[..nfds.min(fds.len())].iter().map(|fd| unsafe { File::from_raw_fd(*fd) }));
        if n == 0 && nfds == 0 {
            self.eof = true;
        }
        self.buf.extend_from_slice(&chunk[..n.min(chunk.len())]);
        Ok(())
    }

    /// Sends one reply line; false if the peer is gone or not reading.
    pub fn reply(&mut self, line: &str) -> bool {
        writeln!(self.stream, "{line}").is_ok()
    }

    /// Sends a connection-level error reply ([`reply_error`]).
    pub fn reply_error(&mut self, code: i64, msg: &str) {
        reply_error(&mut self.stream, code, msg);
    }

    /// Whether a whole line (or the peer's hang-up) is already buffered, so
    /// that [`Conn::next_line`] returns without reading.
    pub fn has_line(&self) -> bool {
        self.eof || self.buf.contains(&b'\n')
    }

    /// Waits until the socket has bytes (or hung up) or `wake` is
    /// readable; true if the socket is ready, false if only `wake` is.
    /// Errors: poll's.
    pub fn wait_readable(&self, wake: RawFd) -> std::io::Result<bool> {
        let mut fds = [
            libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 },
            libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
        ];
        loop {
            // SAFETY: two valid pollfds, the count given is 2; both fds stay
            // open across the call (the stream and the subscriber's eventfd
            // are owned by this connection).
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r >= 0 {
                return Ok(fds[0].revents != 0);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Drops fds passed where no request takes them (on an attached
    /// connection): they must not accumulate.
    pub fn drop_files(&mut self) {
        self.files.clear();
    }
}

/// Reads one reply line of at most [`MAX_MESSAGE`] bytes (the client's
/// side); `Ok(None)` at EOF.
pub(super) fn read_line(r: &mut std::io::BufReader<UnixStream>) -> Result<Option<String>, String> {
    use std::io::{BufRead, Read};
    let mut buf = Vec::new();
    let n = r.by_ref().take(MAX_MESSAGE as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > MAX_MESSAGE {
        return Err(format!("message longer than {MAX_MESSAGE} bytes"));
    }
    String::from_utf8(buf).map(Some).map_err(|_| "message is not UTF-8".into())
}
#[cfg(test)]
mod peer_tests {
    use super::*;

    fn cred(uid: u32, gid: u32) -> libc::ucred {
        libc::ucred { pid: 1, uid, gid }
    }

    #[test]
    fn root_the_daemons_user_and_group_members_may_connect() {
        let me = 1000;
        let kvm = Some(107);
        assert!(peer_may_connect(&cred(0, 0), &[], me, None).is_ok(), "root");
        assert!(peer_may_connect(&cred(me, 5), &[], me, None).is_ok(), "the daemon's own user");
        assert!(peer_may_connect(&cred(2000, 107), &[], me, kvm).is_ok(), "primary group");
        assert!(peer_may_connect(&cred(2000, 100), &[4, 107, 27], me, kvm).is_ok(), "supplementary group");
        let e = peer_may_connect(&cred(2000, 100), &[4, 27], me, kvm).unwrap_err();
        assert!(e.starts_with("permission denied") && e.contains("gid 107"), "{e}");
        let e = peer_may_connect(&cred(2000, 107), &[107], me, None).unwrap_err();
        assert!(e.contains("no --group"), "without --group a group means nothing: {e}");
    }

    #[test]
    fn peer_groups_reads_the_connecting_process_groups() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let mut got = peer_groups(&a).expect("SO_PEERGROUPS");
        // SAFETY: getgroups(0, null) only returns the count.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut mine = vec![0; usize::try_from(n).expect("group count")];
        // SAFETY: `mine` has room for `n` gids.
        let n = unsafe { libc::getgroups(n, mine.as_mut_ptr()) };
        mine.truncate(usize::try_from(n).expect("group count"));
        got.sort_unstable();
        mine.sort_unstable();
        assert_eq!(got, mine);
    }
}
