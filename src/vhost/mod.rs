//! vhost-user devices served by the daemon's sidecores: the virtio devices
//! of VMMs the daemon did not start (QEMU, Cloud Hypervisor), polled in the
//! same sweep as the sidecall rings.
//!
//! * [`blk`]: virtio-blk requests and their checks (pure).
//! * [`queue`]: the polled virtqueues and their io_uring ([`queue::BlkDevice`]
//!   is what a sidecore sweeps).
//! * [`backend`]: the vhost-user messages of one VMM connection.
//!
//! [`BlkServer`] owns one device's socket: it accepts a VMM, serves its
//! messages on its own thread until the VMM goes, stops its queues (their
//! I/O finished, so a VMM that reconnects finds the used ring final), and
//! waits for the next one (QEMU's `reconnect=` after a restart of either).

pub mod backend;
pub mod blk;
pub mod queue;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backend::{BlkBackend, DeviceCounters};
use queue::{BlkDevice, Command, Disk, QueueCounters};

/// Most queues a device may offer.
pub const MAX_QUEUES: u16 = 16;
/// Queues offered when `num-queues` is not given.
pub const DEFAULT_QUEUES: u16 = 4;

/// `--vhost-user-blk SOCKET,path=IMAGE[,readonly][,num-queues=N]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlkSpec {
    /// The vhost-user socket the daemon listens on (the VMM connects).
    pub socket: PathBuf,
    /// The disk image (a file or a block device).
    pub path: PathBuf,
    /// Refuse writes (and open the image read-only).
    #[serde(default)]
    pub readonly: bool,
    /// Queues offered (the VMM may use fewer).
    #[serde(default = "default_queues")]
    pub queues: u16,
}

fn default_queues() -> u16 {
    DEFAULT_QUEUES
}

impl FromStr for BlkSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<BlkSpec, String> {
        let mut parts = s.split(',');
        let socket = parts.next().filter(|p| !p.is_empty() && !p.contains('=')).ok_or_else(|| {
            format!("{s:?}: expected SOCKET,path=IMAGE[,readonly][,num-queues=N] (the socket path comes first)")
        })?;
        let mut spec = BlkSpec { socket: socket.into(), path: PathBuf::new(), readonly: false, queues: DEFAULT_QUEUES };
        for p in parts {
            match p.split_once('=') {
                Some(("path", v)) if !v.is_empty() => spec.path = v.into(),
                Some(("num-queues", v)) => {
                    spec.queues = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUES).contains(n))
                        .ok_or_else(|| format!("num-queues={v}: give 1 to {MAX_QUEUES}"))?;
                }
                None if p == "readonly" => spec.readonly = true,
                _ => return Err(format!("{p:?}: unknown option (path=IMAGE, readonly, num-queues=N)")),
            }
        }
        if spec.path.as_os_str().is_empty() {
            return Err(format!("{s:?}: path=IMAGE is missing"));
        }
        Ok(spec)
    }
}

/// Opens the image: `O_DIRECT` beside a buffered descriptor when the file
/// system allows it. The size is whole sectors (a tail is not served).
pub fn open_disk(spec: &BlkSpec) -> Result<Disk, String> {
    let open = |direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(!spec.readonly);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(&spec.path)
    };
    let buffered = open(false).map_err(|e| {
        format!("disk image {}: {e} (give an existing file or block device{})", spec.path.display(), {
            if spec.readonly {
                ""
            } else {
                ", writable, or add ,readonly"
            }
        })
    })?;
    let meta = buffered.metadata().map_err(|e| format!("disk image {}: {e}", spec.path.display()))?;
    let bytes = if meta.file_type().is_block_device() {
        use std::io::Seek;
        (&buffered).seek(std::io::SeekFrom::End(0)).map_err(|e| format!("{}: size: {e}", spec.path.display()))?
    } else if meta.is_file() {
        meta.len()
    } else {
        return Err(format!("disk image {}: not a regular file or block device", spec.path.display()));
    };
    let capacity = bytes / blk::SECTOR;
    if capacity == 0 {
        return Err(format!("disk image {}: smaller than one 512-byte sector", spec.path.display()));
    }
    // One writer per image (shared among read-only users), as QEMU locks
    // its images: two devices writing one file would corrupt it.
    let how = if spec.readonly { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&buffered), how | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "disk image {}: locked by another user (another device or VMM has it open{}): {}",
            spec.path.display(),
            if spec.readonly { " for writing" } else { "" },
            std::io::Error::last_os_error()
        ));
    }
    let direct = open(true).ok();
    let name = spec.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut id = format!("sidecore:{name}").into_bytes();
    id.truncate(20);
    Ok(Disk { direct, buffered, capacity, readonly: spec.readonly, id })
}

/// Where a device's queues run: the daemon picks a sidecore and adds the
/// device to it; returns the sidecore's index.
pub type Place = Arc<dyn Fn(Box<dyn sidecore_core::device::Device>) -> Result<usize, String> + Send + Sync>;

/// Told of a VMM connecting (`Some(sidecore)`) and going (`None`).
pub type Notify = Arc<dyn Fn(&BlkSpec, Option<usize>) + Send + Sync>;

/// One device's socket and its state, shared with status and metrics.
pub struct BlkServer {
    /// What was asked for.
    pub spec: BlkSpec,
    /// The disk's size in sectors.
    pub capacity: u64,
    /// Counters over every connection.
    pub counters: Arc<DeviceCounters>,
    /// The sidecore of the current connection's queues (usize::MAX: none).
    pub sidecore: AtomicUsize,
    stop: AtomicBool,
    disk: Arc<Disk>,
    /// The connection now being served, to cut it at removal.
    current: Mutex<Option<UnixStream>>,
    /// The serving thread has ended (its socket removed).
    ended: AtomicBool,
}

impl BlkServer {
    /// Opens the image and binds the socket (a stale socket file there is
    /// replaced; any other file is an error).
    pub fn bind(spec: BlkSpec) -> Result<(Arc<BlkServer>, UnixListener), String> {
        let disk = open_disk(&spec)?;
        let sock = &spec.socket;
        if let Ok(m) = std::fs::symlink_metadata(sock) {
            if !m.file_type().is_socket() {
                return Err(format!("{}: exists and is not a socket; remove it or pick another path", sock.display()));
            }
            // A stale socket: nobody may be listening on it any more.
            if UnixStream::connect(sock).is_ok() {
                return Err(format!("{}: another process is listening on it", sock.display()));
            }
            let _ = std::fs::remove_file(sock);
        }
        let listener = UnixListener::bind(sock).map_err(|e| format!("vhost-user socket {}: {e}", sock.display()))?;
        listener.set_nonblocking(true).map_err(|e| format!("{}: {e}", sock.display()))?;
        let counters = DeviceCounters {
            queues: (0..spec.queues).map(|_| Arc::new(QueueCounters::default())).collect(),
            ..Default::default()
        };
        let server = Arc::new(BlkServer {
            capacity: disk.capacity,
            spec,
            counters: Arc::new(counters),
            sidecore: AtomicUsize::new(usize::MAX),
            stop: AtomicBool::new(false),
            disk: Arc::new(disk),
            current: Mutex::new(None),
            ended: AtomicBool::new(false),
        });
        Ok((server, listener))
    }

    /// Serves VMMs on `listener` one after the other until [`BlkServer::remove`].
    pub fn serve(self: &Arc<BlkServer>, listener: &UnixListener, place: &Place, notify: &Notify) {
        while !self.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = self.connection(stream, place, notify) {
                        tracing::warn!(socket = %self.spec.socket.display(), error = %e, "vhost-user-blk: connection failed");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_readable(listener, Duration::from_millis(200))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "vhost-user-blk: accept");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let _ = std::fs::remove_file(&self.spec.socket);
        self.ended.store(true, Ordering::Release);
    }

    /// Whether [`BlkServer::serve`] has returned.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Ends the server: the connection is cut, the socket removed.
    pub fn remove(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(Some(s)) = self.current.lock().as_deref().map(|c| c.as_ref().and_then(|s| s.try_clone().ok())) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn connection(self: &Arc<BlkServer>, stream: UnixStream, place: &Place, notify: &Notify) -> Result<(), String> {
        use vhost::vhost_user::BackendReqHandler;
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        let c = &self.counters;
        c.connections.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam::channel::unbounded();
        let dev = BlkDevice::new(rx).map_err(|e| format!("epoll: {e}"))?;
        let core = place(Box::new(dev))?;
        self.sidecore.store(core, Ordering::Relaxed);
        if let Ok(mut cur) = self.current.lock() {
            *cur = stream.try_clone().ok();
        }
        c.connected.store(1, Ordering::Relaxed);
        tracing::info!(socket = %self.spec.socket.display(), sidecore = core, "vhost-user-blk: a VMM connected");
        notify(&self.spec, Some(core));
        let backend = Arc::new(Mutex::new(BlkBackend::new(self.disk.clone(), self.spec.queues, c.clone(), tx.clone())));
        let mut handler = BackendReqHandler::from_stream(stream, backend.clone());
        let end = loop {
            if self.stop.load(Ordering::Relaxed) {
                break "removed".to_string();
            }
            match handler.handle_request() {
                Ok(()) => {}
                Err(vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage) => {
                    break "the VMM closed the connection".to_string();
                }
                Err(e) => {
                    c.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    break format!("protocol error: {e}");
                }
            }
        };
        tracing::info!(socket = %self.spec.socket.display(), why = %end, "vhost-user-blk: the VMM is gone");
        // Every queue stops after its I/O: only then may a new connection
        // read the used ring as final.
        if let Ok(mut b) = backend.lock() {
            b.stop_all();
        }
        let _ = tx.send(Command::Close);
        if let Ok(mut cur) = self.current.lock() {
            *cur = None;
        }
        c.connected.store(0, Ordering::Relaxed);
        self.sidecore.store(usize::MAX, Ordering::Relaxed);
        notify(&self.spec, None);
        Ok(())
    }
}

fn wait_readable(l: &UnixListener, t: Duration) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(t.as_millis()).unwrap_or(200);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// The kick/call eventfds and the memory of a frontend (tests and the
/// benchmark make these).
pub fn eventfd() -> std::io::Result<File> {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Whether `p` names a path under which a socket could be bound.
pub fn socket_dir_exists(p: &Path) -> bool {
    p.parent().is_none_or(|d| d.as_os_str().is_empty() || d.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let s: BlkSpec = "/run/vub.sock,path=/img,readonly,num-queues=2".parse().unwrap();
        assert_eq!(s, BlkSpec { socket: "/run/vub.sock".into(), path: "/img".into(), readonly: true, queues: 2 });
        let s: BlkSpec = "a.sock,path=b".parse().unwrap();
        assert_eq!(s.queues, DEFAULT_QUEUES);
        assert!(!s.readonly);
        for (bad, says) in [
            ("path=/img", "socket path comes first"),
            ("a.sock", "path=IMAGE is missing"),
            ("a.sock,path=b,num-queues=0", "give 1 to"),
            ("a.sock,path=b,num-queues=99", "give 1 to"),
            ("a.sock,path=b,cache=none", "unknown option"),
        ] {
            let e = bad.parse::<BlkSpec>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_missing_image_and_an_empty_one_are_refused() {
        let dir = std::env::temp_dir().join(format!("sidecore-vub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = |p: &Path| BlkSpec { socket: dir.join("s"), path: p.into(), readonly: false, queues: 1 };
        let e = open_disk(&spec(&dir.join("nope"))).err().unwrap();
        assert!(e.contains("nope") && e.contains("existing file"), "{e}");
        let empty = dir.join("empty");
        File::create(&empty).unwrap();
        assert!(open_disk(&spec(&empty)).err().unwrap().contains("smaller than one"));
        std::fs::write(&empty, vec![0u8; 4096 + 100]).unwrap();
        assert_eq!(open_disk(&spec(&empty)).unwrap().capacity, 8);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
