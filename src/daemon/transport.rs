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
