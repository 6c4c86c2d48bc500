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

/// A new memfd of `size` bytes (zeroed).
pub fn create(name: &'static std::ffi::CStr, size: u64) -> Result<File, MemfdError> {
    let label = name.to_str().unwrap_or("memfd");
    // SAFETY: `name` is NUL-terminated; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemfdError::Create { name: label, size, source: std::io::Error::last_os_error() });
    }
    // SAFETY: fd is a fresh descriptor we own from here on.
    let file: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    file.set_len(size).map_err(|source| MemfdError::Create { name: label, size, source })?;
    Ok(file)
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
}
