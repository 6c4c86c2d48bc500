//! memfd-backed memory that can be shared with another process (the
//! sidecore daemon) by passing the fd over a Unix socket.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// Creating or mapping failed.
#[derive(Debug, thiserror::Error)]
pub enum MemfdError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create memfd {name} of {size} bytes")]
    Create {
        /// Its name.
        name: &'static str,
        /// Its size.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map {len} bytes at offset {offset:#x} of a memfd")]
    Map {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The seals a memfd must carry before another process (the daemon) maps
/// it: its size can never change, so no mapping of it can start to fault
/// with SIGBUS. (A write seal added later cannot hurt a mapping that exists:
/// F_SEAL_WRITE is refused while one does, F_SEAL_FUTURE_WRITE spares it.)
pub const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// Seals that would stop the guest or the daemon from writing the memory.
pub const FORBIDDEN_SEALS: libc::c_int = libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE;

/// A new memfd of `size` bytes (zeroed), sealed against shrinking and
/// growing ([`REQUIRED_SEALS`]): a process it is passed to can map it
/// without fearing that it is truncated under the mapping.
pub fn create(name: &'static std::ffi::CStr, size: u64) -> Result<File, MemfdError> {
    let label = name.to_str().unwrap_or("memfd");
    let err = |source| MemfdError::Create { name: label, size, source };
    // SAFETY: `name` is NUL-terminated; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own from here on.
    let file: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    file.set_len(size).map_err(err)?;
    // SAFETY: F_ADD_SEALS takes an int argument and touches no memory of ours.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, REQUIRED_SEALS | libc::F_SEAL_SEAL) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// What is wrong with a file another process passed as memory, if anything;
/// else its size. It must be a memfd sealed with at least
/// [`REQUIRED_SEALS`] and none of [`FORBIDDEN_SEALS`]. The seals are read
/// before the size, so the size cannot change after it is read.
pub fn check_sealed(file: &File, what: &str) -> Result<u64, String> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory of ours.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    let make_it = "create it with memfd_create(MFD_ALLOW_SEALING), size it, then F_ADD_SEALS \
                   F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL";
    // A file on tmpfs answers F_GET_SEALS too (with F_SEAL_SEAL): what
    // /proc calls it tells a memfd from it.
    let kind = fd_kind(file);
    if seals < 0 || !kind.starts_with("/memfd:") {
        return Err(format!("{what}: not a memfd ({kind}): {make_it}"));
    }
    if seals & FORBIDDEN_SEALS != 0 {
        return Err(format!("{what}: the memfd is sealed against writes (seals {seals:#x}): the guest must write it"));
    }
    if seals & REQUIRED_SEALS != REQUIRED_SEALS {
        return Err(format!(
            "{what}: the memfd is not sealed against resizing (seals {seals:#x}, need {REQUIRED_SEALS:#x}): {make_it}"
        ));
    }
    file.metadata().map(|m| m.len()).map_err(|e| format!("{what}: fstat: {e}"))
}

/// What an fd is, as /proc names it (`anon_inode:[eventfd]`, `pipe:[..]`,
/// `socket:[..]`, `/memfd:name (deleted)`, a path), for checks and errors.
pub fn fd_kind(file: &impl AsRawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_or_else(|e| format!("unknown: {e}"), |l| l.to_string_lossy().into_owned())
}

/// Whether `file` is an eventfd.
pub fn is_eventfd(file: &impl AsRawFd) -> bool {
    fd_kind(file) == "anon_inode:[eventfd]"
}

/// A shared mapping of part of a file, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; users access it through atomics
// or while no other party touches it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` at `offset` (page aligned), shared,
    /// readable and writable.
    pub fn new(file: &File, offset: u64, len: usize) -> Result<Mapping, MemfdError> {
        let err = |source| MemfdError::Map { offset, len, source };
        let off =
            libc::off_t::try_from(offset).map_err(|_| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
        if len == 0 || !offset.is_multiple_of(4096) {
            return Err(err(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
        }
        // SAFETY: a fresh shared mapping of a file we hold open; no existing
        // memory is affected; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(err(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| err(std::io::Error::other("mmap returned null")))?;
        Ok(Mapping { ptr, len })
    }

    /// Start of the mapping.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mmap returned, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_of_one_memfd_see_each_other() {
        let f = create(c"test", 8192).unwrap();
        let a = Mapping::new(&f, 4096, 4096).unwrap();
        let b = Mapping::new(&f, 0, 8192).unwrap();
        // SAFETY: both ranges are mapped; single-threaded test.
        unsafe {
            a.ptr().as_ptr().write(7);
            assert_eq!(b.ptr().as_ptr().add(4096).read(), 7);
        }
        assert!(Mapping::new(&f, 1, 10).is_err());
    }

    #[test]
    fn memfds_are_made_sealed_and_others_are_refused() {
        let f = create(c"test", 8192).unwrap();
        assert_eq!(check_sealed(&f, "guest memory"), Ok(8192));
        assert!(f.set_len(0).is_err(), "sealed against shrinking");
        assert!(f.set_len(1 << 20).is_err(), "sealed against growing");

        let dir = std::env::temp_dir().join(format!("sidecore-memfd-{}", std::process::id()));
        std::fs::write(&dir, [0u8; 4096]).unwrap();
        let plain = File::open(&dir).unwrap();
        let e = check_sealed(&plain, "guest memory").unwrap_err();
        assert!(e.contains("not a memfd"), "{e}");
        let _ = std::fs::remove_file(&dir);
        // A file on tmpfs (where F_GET_SEALS answers), if there is one.
        if let Ok(shm) = std::fs::File::create(format!("/dev/shm/sidecore-memfd-{}", std::process::id())) {
            assert!(check_sealed(&shm, "g").unwrap_err().contains("not a memfd"));
            let _ = std::fs::remove_file(format!("/dev/shm/sidecore-memfd-{}", std::process::id()));
        }

        // SAFETY: a fresh memfd; the flags are valid.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        // SAFETY: fd is fresh and ours.
        let unsealed: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        unsealed.set_len(4096).unwrap();
        assert!(check_sealed(&unsealed, "g").unwrap_err().contains("not sealed against resizing"));
        // SAFETY: F_ADD_SEALS with an int argument.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) }, 0);
        assert!(check_sealed(&unsealed, "g").is_err(), "growing must be sealed too");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_GROW) }, 0);
        assert_eq!(check_sealed(&unsealed, "g"), Ok(4096));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE) }, 0);
        assert!(check_sealed(&unsealed, "g").unwrap_err().contains("against writes"));
        assert!(!is_eventfd(&unsealed));
    }
}
