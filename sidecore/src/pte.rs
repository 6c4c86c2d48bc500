//! The page-table service: validated updates of the guest's page tables,
//! which live in the page-table pool the guest maps read-only (Xen's
//! mmu_update). The sidecore and the VMM's write-protect trap path call the
//! same [`PteService::update`].
//!
//! Rules (DESIGN.md): the table must be a pool page whose level the host
//! knows (kept here, in host memory); the index below 512; the entry free of
//! PS and reserved bits; a leaf may point at free RAM or the image, or
//! read-only into the pool; a non-leaf entry only at a pool page that is free
//! (the update assigns it the level below) or already a table of that level;
//! nothing ever points at the boot pages, the vCPU areas or the shared
//! region. A and D (leaf) and U/S are preset in what is written.
//!
//! A map (not present -> present) is visible to the guest at once. A change
//! or unmap of a present entry needs a flush: on hardware KVM the guest's
//! invlpg; on PVM the host must drop the shadow pages, which the
//! [`ShadowZap`] given to the service does before the reply.

use std::any::Any;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shm_proto::op::{PteKind, Status};

use crate::hostmem::HostShared;

/// Present.
pub const PTE_P: u64 = 1 << 0;
/// Writable.
pub const PTE_RW: u64 = 1 << 1;
/// User/supervisor.
pub const PTE_US: u64 = 1 << 2;
/// Accessed.
pub const PTE_A: u64 = 1 << 5;
/// Dirty.
pub const PTE_D: u64 = 1 << 6;
/// Page size.
pub const PTE_PS: u64 = 1 << 7;
/// No-execute.
pub const PTE_NX: u64 = 1 << 63;
/// Address bits.
pub const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Flag bits a guest may set in a present entry; any other is refused.
pub const PTE_ALLOWED: u64 = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_NX | PTE_ADDR;

/// Drops the backend's shadow page tables so that a host-side change of a
/// present entry becomes visible (PVM). Called on the sidecore's thread.
pub trait ShadowZap: Send + Sync {
    /// Drops every shadow page; returns a description on failure.
    fn zap(&self) -> Result<(), String>;
}

/// How a change or unmap of a present entry is made visible.
#[derive(Clone)]
pub enum Visibility {
    /// The guest flushes its own TLB (hardware KVM: invlpg).
    GuestFlush,
    /// The host drops the shadow pages before the reply (PVM, in the VMM
    /// that owns the VM fd).
    Zap(Arc<dyn ShadowZap>),
    /// This server cannot make it visible (PVM, served by a daemon that
    /// does not own the VM fd): refuse with `UseExitPath` so the guest's own
    /// VMM applies it through the trap path.
    ExitPath,
}

/// Where things are in guest-physical memory, for validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PteLayout {
    /// RAM size.
    pub ram_size: u64,
    /// Pool start.
    pub pool_gpa: u64,
    /// Pool size.
    pub pool_size: u64,
    /// Image start.
    pub image_gpa: u64,
    /// Image end (exclusive).
    pub image_end: u64,
    /// First byte of free RAM (after the shared region).
    pub free_gpa: u64,
}

/// Counters of the page-table service.
#[derive(Default)]
pub struct PteCounters {
    /// Maps.
    pub maps: AtomicU64,
    /// Changes of present entries.
    pub changes: AtomicU64,
    /// Unmaps of present entries.
    pub unmaps: AtomicU64,
    /// Shadow zaps done for changes and unmaps.
    pub zaps: AtomicU64,
    /// Changes and unmaps sent to the exit path (this server cannot zap).
    pub to_exit_path: AtomicU64,
    /// Updates refused.
    pub refused: AtomicU64,
}

/// The service for one VM.
pub struct PteService {
    layout: PteLayout,
    host: Arc<HostShared>,
    pool: NonNull<u8>,
    _owner: Arc<dyn Any + Send + Sync>,
    visibility: Visibility,
    /// Counters.
    pub counters: PteCounters,
}

// SAFETY: `pool` points into memory kept mapped by `_owner` (Send + Sync);
// every access to it is an atomic u64 operation.
unsafe impl Send for PteService {}
// SAFETY: as above.
unsafe impl Sync for PteService {}

/// Building the service failed.
#[derive(Debug, thiserror::Error)]
pub enum PteSetupError {
    /// The level list does not cover the pool.
    #[error("page-table pool of {pool_pages} pages, but {levels} levels given")]
    Levels {
        /// Pool pages.
        pool_pages: u64,
        /// Levels given.
        levels: usize,
    },
    /// The pool mapping is not page aligned.
    #[error("page-table pool mapping is not page aligned")]
    Misaligned,
}

impl PteService {
    /// A service over the pool mapped at `pool` (host address of
    /// `layout.pool_gpa`), keeping the level of each pool page (0 = free) in
    /// `host`, which the caller has filled in.
    ///
    /// # Safety
    /// `pool .. pool + layout.pool_size` must stay mapped readable and
    /// writable while `owner` lives.
    pub unsafe fn new(
        layout: PteLayout,
        host: Arc<HostShared>,
        pool: NonNull<u8>,
        owner: Arc<dyn Any + Send + Sync>,
        visibility: Visibility,
    ) -> Result<PteService, PteSetupError> {
        let pool_pages = layout.pool_size / 4096;
        if host.levels().len() as u64 != pool_pages {
            return Err(PteSetupError::Levels { pool_pages, levels: host.levels().len() });
        }
        if !(pool.as_ptr() as usize).is_multiple_of(4096) {
            return Err(PteSetupError::Misaligned);
        }
        Ok(PteService { layout, host, pool, _owner: owner, visibility, counters: PteCounters::default() })
    }

    /// The layout it validates against.
    pub fn layout(&self) -> &PteLayout {
        &self.layout
    }

    fn pool_index(&self, gpa: u64) -> Option<usize> {
        if !gpa.is_multiple_of(4096)
            || gpa < self.layout.pool_gpa
            || gpa >= self.layout.pool_gpa + self.layout.pool_size
        {
            return None;
        }
        usize::try_from((gpa - self.layout.pool_gpa) / 4096).ok()
    }

    /// The level of the pool page at `gpa` (0 = not a table), or `None`
    /// outside the pool.
    pub fn level_of(&self, gpa: u64) -> Option<u8> {
        self.pool_index(gpa).map(|i| self.host.levels()[i].load(Ordering::Acquire))
    }

    fn entry(&self, pool_index: usize, index: usize) -> &AtomicU64 {
        // SAFETY: pool_index < pool pages and index < 512 (checked by the
        // caller), so the 8-byte entry lies inside the pool mapping, 8-byte
        // aligned (the mapping is page aligned).
        unsafe { &*self.pool.as_ptr().add(pool_index * 4096 + index * 8).cast::<AtomicU64>() }
    }

    /// Whether a leaf may point at the frame `pa` with `flags`.
    fn leaf_target_ok(&self, pa: u64, flags: u64) -> bool {
        let l = &self.layout;
        if pa >= l.ram_size {
            return false;
        }
        if (l.free_gpa..l.ram_size).contains(&pa) || (l.image_gpa..l.image_end).contains(&pa) {
            return true;
        }
        (l.pool_gpa..l.pool_gpa + l.pool_size).contains(&pa) && flags & PTE_RW == 0
    }

    /// Validates and applies `entry` at `index` of the table at `table`.
    pub fn update(&self, table: u64, index: u64, entry: u64) -> Result<(PteKind, u64), Status> {
        let r = self.apply(table, index, entry);
        if r.is_err() {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn apply(&self, table: u64, index: u64, entry: u64) -> Result<(PteKind, u64), Status> {
        let ti = self.pool_index(table).ok_or(Status::BadArgument)?;
        let level = self.host.levels()[ti].load(Ordering::Acquire);
        if level == 0 {
            return Err(Status::BadArgument);
        }
        let index = usize::try_from(index).ok().filter(|i| *i < 512).ok_or(Status::BadArgument)?;
        let new = if entry == 0 {
            0
        } else {
            if entry & PTE_P == 0 || entry & !PTE_ALLOWED != 0 || entry & PTE_PS != 0 {
                return Err(Status::ReservedBits);
            }
            let pa = entry & PTE_ADDR;
            if level == 1 {
                if !self.leaf_target_ok(pa, entry) {
                    return Err(Status::Denied);
                }
                entry | PTE_A | PTE_D | PTE_US
            } else {
                let child = self.pool_index(pa).ok_or(Status::Denied)?;
                let want = level - 1;
                match self.host.levels()[child].compare_exchange(0, want, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {}
                    Err(l) if l == want => {}
                    Err(_) => return Err(Status::Denied),
                }
                (entry & !PTE_D) | PTE_A | PTE_US
            }
        };
        let slot = self.entry(ti, index);
        let mut old = slot.load(Ordering::Acquire);
        loop {
            let kind = classify(old, new);
            let needs_flush = matches!(kind, PteKind::Change | PteKind::Unmap);
            if needs_flush && matches!(self.visibility, Visibility::ExitPath) {
                self.counters.to_exit_path.fetch_add(1, Ordering::Relaxed);
                return Err(Status::UseExitPath);
            }
            // A concurrent update of the same entry (another vCPU, the trap
            // path) makes the CAS fail: classify again against what is there.
            match slot.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.count(kind)?;
                    return Ok((kind, new));
                }
                Err(now) => old = now,
            }
        }
    }

    fn count(&self, kind: PteKind) -> Result<(), Status> {
        let c = &self.counters;
        match kind {
            PteKind::Map => c.maps.fetch_add(1, Ordering::Relaxed),
            PteKind::Change => c.changes.fetch_add(1, Ordering::Relaxed),
            PteKind::Unmap => c.unmaps.fetch_add(1, Ordering::Relaxed),
            PteKind::Noop => return Ok(()),
        };
        if kind != PteKind::Map {
            if let Visibility::Zap(z) = &self.visibility {
                z.zap().map_err(|_| Status::HostError)?;
                c.zaps.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// What replacing `old` by `new` is.
pub fn classify(old: u64, new: u64) -> PteKind {
    match (old & PTE_P != 0, new & PTE_P != 0) {
        (false, false) => PteKind::Noop,
        (false, true) => PteKind::Map,
        (true, true) if old == new => PteKind::Noop,
        (true, true) => PteKind::Change,
        (true, false) => PteKind::Unmap,
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    const POOL: u64 = 0x10_0000;
    const POOL_SIZE: u64 = 0x1_0000; // 16 pages
    const LAYOUT: PteLayout = PteLayout {
        ram_size: 0x100_0000,
        pool_gpa: POOL,
        pool_size: POOL_SIZE,
        image_gpa: 0x20_0000,
        image_end: 0x21_0000,
        free_gpa: 0x60_0000,
    };
    const SHARED: u64 = 0x40_0000;

    struct Block(NonNull<u8>, std::alloc::Layout);
    // SAFETY: test-only plain memory.
    unsafe impl Send for Block {}
    // SAFETY: test-only plain memory.
    unsafe impl Sync for Block {}
    impl Drop for Block {
        fn drop(&mut self) {
            // SAFETY: allocated with this layout in service().
            unsafe { std::alloc::dealloc(self.0.as_ptr(), self.1) };
        }
    }

    struct CountZap(AtomicUsize);
    impl ShadowZap for CountZap {
        fn zap(&self) -> Result<(), String> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Pool page 0 = PML4, 1 = PDPT, 2 = PD, 3 = PT; the rest free.
    fn service(vis: Visibility) -> PteService {
        let layout = std::alloc::Layout::from_size_align(POOL_SIZE as usize, 4096).unwrap();
        // SAFETY: non-zero size.
        let p = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).unwrap();
        let owner = Arc::new(Block(p, layout));
        let host = HostShared::alloc((POOL_SIZE / 4096) as usize).unwrap();
        for (i, l) in [4u8, 3, 2, 1].iter().enumerate() {
            host.levels()[i].store(*l, Ordering::Relaxed);
        }
        // SAFETY: the block is POOL_SIZE bytes and lives as long as owner.
        unsafe { PteService::new(LAYOUT, host, p, owner, vis) }.unwrap()
    }

    fn page(i: u64) -> u64 {
        POOL + i * 4096
    }

    fn raw(s: &PteService, table_page: usize, index: usize) -> u64 {
        s.entry(table_page, index).load(Ordering::Relaxed)
    }

    #[test]
    fn map_change_unmap_with_preset_bits_and_zaps() {
        let z = Arc::new(CountZap(AtomicUsize::new(0)));
        let s = service(Visibility::Zap(z.clone()));
        let (k, e) = s.update(page(3), 5, 0x60_0000 | PTE_P | PTE_RW).unwrap();
        assert_eq!(k, PteKind::Map);
        assert_eq!(e, 0x60_0000 | PTE_P | PTE_RW | PTE_A | PTE_D | PTE_US);
        assert_eq!(raw(&s, 3, 5), e);
        assert_eq!(z.0.load(Ordering::Relaxed), 0, "a map needs no zap");
        assert_eq!(s.update(page(3), 5, 0x60_1000 | PTE_P).unwrap().0, PteKind::Change);
        assert_eq!(s.update(page(3), 5, 0).unwrap().0, PteKind::Unmap);
        assert_eq!(s.update(page(3), 5, 0).unwrap().0, PteKind::Noop);
        assert_eq!(raw(&s, 3, 5), 0);
        assert_eq!(z.0.load(Ordering::Relaxed), 2);
        assert_eq!(s.counters.zaps.load(Ordering::Relaxed), 2);
        assert_eq!(s.counters.maps.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn leaf_may_map_image_and_pool_read_only() {
        let s = service(Visibility::GuestFlush);
        assert!(s.update(page(3), 0, 0x20_1000 | PTE_P).is_ok());
        assert!(s.update(page(3), 1, page(0) | PTE_P).is_ok());
        assert_eq!(s.update(page(3), 2, page(0) | PTE_P | PTE_RW), Err(Status::Denied));
    }

    #[test]
    fn forbidden_targets_are_refused_and_nothing_written() {
        let s = service(Visibility::GuestFlush);
        for pa in [0x1000, 0x2000, 0x1_0000, SHARED, SHARED + 0x1000, 0x100_0000, 0xf_0000_0000] {
            assert_eq!(s.update(page(3), 7, pa | PTE_P), Err(Status::Denied), "pa {pa:#x}");
        }
        assert_eq!(raw(&s, 3, 7), 0);
        assert_eq!(s.counters.refused.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn bad_tables_and_indices_are_refused() {
        let s = service(Visibility::GuestFlush);
        let e = 0x60_0000 | PTE_P;
        assert_eq!(s.update(0x60_0000, 0, e), Err(Status::BadArgument), "not in the pool");
        assert_eq!(s.update(page(3) + 8, 0, e), Err(Status::BadArgument), "misaligned");
        assert_eq!(s.update(page(9), 0, e), Err(Status::BadArgument), "pool page that is no table");
        assert_eq!(s.update(POOL + POOL_SIZE, 0, e), Err(Status::BadArgument), "past the pool");
        assert_eq!(s.update(page(3), 512, e), Err(Status::BadArgument));
        assert_eq!(s.update(page(3), u64::MAX, e), Err(Status::BadArgument));
    }

    #[test]
    fn reserved_and_ps_bits_are_refused() {
        let s = service(Visibility::GuestFlush);
        for bad in [PTE_PS, 1 << 8, 1 << 52, 1 << 62, 1 << 3, 1 << 4, 1 << 9] {
            assert_eq!(s.update(page(3), 1, 0x60_0000 | PTE_P | bad), Err(Status::ReservedBits), "{bad:#x}");
        }
        // Not present but not zero.
        assert_eq!(s.update(page(3), 1, 0x60_0000), Err(Status::ReservedBits));
        assert_eq!(s.update(page(2), 1, page(5) | PTE_P | PTE_PS), Err(Status::ReservedBits));
    }

    #[test]
    fn non_leaf_assigns_levels_and_refuses_wrong_ones() {
        let s = service(Visibility::GuestFlush);
        // PD entry -> free pool page 5 becomes a PT.
        assert_eq!(s.update(page(2), 1, page(5) | PTE_P | PTE_RW).unwrap().0, PteKind::Map);
        assert_eq!(s.level_of(page(5)), Some(1));
        // Linking page 5 again from a PD is fine (same level)...
        assert!(s.update(page(2), 2, page(5) | PTE_P | PTE_RW).is_ok());
        // ...from a PDPT it is not (it is a PT now).
        assert_eq!(s.update(page(1), 3, page(5) | PTE_P), Err(Status::Denied));
        // A non-leaf entry may not point outside the pool or at the root.
        assert_eq!(s.update(page(2), 4, 0x60_0000 | PTE_P), Err(Status::Denied));
        assert_eq!(s.update(page(0), 1, page(0) | PTE_P), Err(Status::Denied), "self-reference");
        // The leaf written through the new table lands in page 5.
        assert!(s.update(page(5), 9, 0x60_2000 | PTE_P).is_ok());
        assert_eq!(raw(&s, 5, 9) & PTE_ADDR, 0x60_2000);
    }

    #[test]
    fn without_a_zap_changes_go_to_the_exit_path_unapplied() {
        let s = service(Visibility::ExitPath);
        let (_, e) = s.update(page(3), 5, 0x60_0000 | PTE_P).unwrap();
        assert_eq!(s.update(page(3), 5, 0x60_1000 | PTE_P), Err(Status::UseExitPath));
        assert_eq!(s.update(page(3), 5, 0), Err(Status::UseExitPath));
        assert_eq!(raw(&s, 3, 5), e, "nothing written");
        assert_eq!(s.counters.to_exit_path.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn hostile_inputs_never_panic() {
        let s = service(Visibility::GuestFlush);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let table = POOL + (x % (POOL_SIZE + 0x3000)) / 8 * 8;
            let _ = s.update(table, x >> 50, x.rotate_left(17));
        }
    }
}
