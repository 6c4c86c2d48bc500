//! Host-private state that the VMM and a sidecore daemon share about one VM:
//! the level of every page-table pool page, and the per-vCPU counters of the
//! VMM's counter hypercall. It lives in host memory the guest never maps
//! (a heap block, or a memfd the VMM passes to the daemon), so that both
//! processes validate and count against the same state.

use std::any::Any;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::Arc;

/// Counter slots (one per vCPU; at least `MAX_VCPUS`).
pub const COUNTERS: usize = 32;
/// Offset of the level table.
const LEVELS_OFFSET: usize = 4096;

/// The shared block.
pub struct HostShared {
    base: NonNull<u8>,
    pool_pages: usize,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the block is plain memory accessed only through atomics; `_owner`
// keeps it mapped and is Send + Sync.
unsafe impl Send for HostShared {}
// SAFETY: as above.
unsafe impl Sync for HostShared {}

struct Heap(NonNull<u8>, std::alloc::Layout);
// SAFETY: plain memory owned by this struct.
unsafe impl Send for Heap {}
// SAFETY: as above.
unsafe impl Sync for Heap {}
impl Drop for Heap {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in HostShared::alloc.
        unsafe { std::alloc::dealloc(self.0.as_ptr(), self.1) };
    }
}

/// The block is unusable.
#[derive(Debug, thiserror::Error)]
pub enum HostSharedError {
    /// Too small.
    #[error("host-shared block of {len} bytes is too small ({need} needed for {pool_pages} pool pages)")]
    TooSmall {
        /// Its size.
        len: usize,
        /// Needed.
        need: usize,
        /// Pool pages.
        pool_pages: usize,
    },
    /// Allocation failed.
    #[error("cannot allocate the host-shared block")]
    Alloc,
}

impl HostShared {
    /// Bytes needed for a pool of `pool_pages` pages.
    pub fn size(pool_pages: usize) -> usize {
        LEVELS_OFFSET + pool_pages.div_ceil(4096) * 4096
    }

    /// A zeroed block on the heap (a VMM with no daemon).
    pub fn alloc(pool_pages: usize) -> Result<Arc<HostShared>, HostSharedError> {
        let layout = std::alloc::Layout::from_size_align(HostShared::size(pool_pages), 4096)
            .map_err(|_| HostSharedError::Alloc)?;
        // SAFETY: the layout has a non-zero size.
        let p = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(HostSharedError::Alloc)?;
        Ok(Arc::new(HostShared { base: p, pool_pages, _owner: Arc::new(Heap(p, layout)) }))
    }

    /// A block in a mapping.
    ///
    /// # Safety
    /// `base .. base + len` must stay mapped readable and writable while
    /// `owner` lives, be page aligned, and be accessed by others only
    /// through atomics.
    pub unsafe fn from_mapping(
        base: NonNull<u8>,
        len: usize,
        pool_pages: usize,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<Arc<HostShared>, HostSharedError> {
        let need = HostShared::size(pool_pages);
        if len < need {
            return Err(HostSharedError::TooSmall { len, need, pool_pages });
        }
        Ok(Arc::new(HostShared { base, pool_pages, _owner: owner }))
    }

    /// The counter of vCPU `i`.
    pub fn counter(&self, i: u32) -> Option<&AtomicU64> {
        let i = usize::try_from(i).ok().filter(|i| *i < COUNTERS)?;
        // SAFETY: i < COUNTERS and COUNTERS * 8 <= LEVELS_OFFSET: inside the
        // block, 8-byte aligned (the block is page aligned).
        Some(unsafe { &*self.base.as_ptr().add(i * 8).cast::<AtomicU64>() })
    }

    /// The level of every pool page (0 = not a table).
    pub fn levels(&self) -> &[AtomicU8] {
        // SAFETY: size() reserves pool_pages bytes at LEVELS_OFFSET; AtomicU8
        // has the layout of u8.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(LEVELS_OFFSET).cast::<AtomicU8>(), self.pool_pages) }
    }
}

const _: () = assert!(COUNTERS * 8 <= LEVELS_OFFSET);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn counters_and_levels_are_bounded() {
        let h = HostShared::alloc(256).unwrap();
        assert_eq!(h.levels().len(), 256);
        h.levels()[3].store(2, Ordering::Relaxed);
        assert_eq!(h.levels()[3].load(Ordering::Relaxed), 2);
        assert!(h.counter(31).is_some());
        assert!(h.counter(32).is_none());
        assert!(h.counter(u32::MAX).is_none());
        assert_eq!(HostShared::size(256), 8192);
        assert_eq!(HostShared::size(4097), 4096 + 8192);
    }
}
