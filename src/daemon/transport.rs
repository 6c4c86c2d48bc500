//! The Unix socket under the protocol: lines read with a bound, the
//! first message's fds, the peer's credentials, error replies.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) fn reply_err(stream: &mut UnixStream, msg: &str) {
    let _ = writeln!(stream, "{}", serde_json::json!({"ok": false, "error": msg}));
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

/// Reads one line of at most [`MAX_MESSAGE`] bytes; `Ok(None)` at EOF.
pub(super) fn read_line(r: &mut BufReader<UnixStream>) -> Result<Option<String>, String> {
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

/// Receives the first message of a connection, with any fds passed along.
pub(super) fn recv_first(stream: &UnixStream) -> Result<(Vec<u8>, Vec<File>), String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds: [RawFd; 5] = [-1; 5];
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
    // SAFETY: the iovec points at `buf`, which lives across the call and may
    // take any bytes.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }.map_err(|e| format!("recvmsg: {e}"))?;
    // SAFETY: the first `nfds` entries are fresh descriptors now owned here.
    let files = fds[..nfds.min(5)].iter().map(|fd| unsafe { File::from_raw_fd(*fd) }).collect();
    buf.truncate(n);
    Ok((buf, files))
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
