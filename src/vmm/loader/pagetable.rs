//! The guest's page tables, built by the VMM in the page-table pool.
//!
//! Every table lives in the pool, which the guest maps read-only; the host
//! keeps the level of every pool page in its own memory. Entries follow the
//! rules that hold on every backend: 4 KiB pages only, A and D preset (the
//! walker cannot set them in a read-only table), U/S at every level (PVM
//! needs it; harmless elsewhere).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use sidecore_core::pte::{PTE_A, PTE_ADDR, PTE_D, PTE_NX, PTE_P, PTE_PS, PTE_RW, PTE_US};

/// Flags of every non-leaf entry the host writes.
pub const TABLE_FLAGS: u64 = PTE_P | PTE_RW | PTE_US | PTE_A;
/// Flags every leaf entry the host writes carries.
pub const LEAF_BASE: u64 = PTE_P | PTE_US | PTE_A | PTE_D;

/// Building the tables failed.
#[derive(Debug, thiserror::Error)]
pub enum PageTableError {
    /// The pool has no free page left.
    #[error("the page-table pool ({pages} pages) is full — give the guest less memory")]
    PoolFull {
        /// Pool size in pages.
        pages: u64,
    },
    /// A virtual address is not canonical 4-level.
    #[error("virtual address {0:#x} is not canonical")]
    NonCanonical(u64),
    /// Writing guest memory failed.
    #[error("cannot write page table at {gpa:#x}")]
    Write {
        /// Where.
        gpa: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A mapping already exists.
    #[error("virtual address {0:#x} is already mapped")]
    AlreadyMapped(u64),
}

/// The pool: which pages are tables, and of which level (4 = PML4 .. 1 = PT).
#[derive(Clone, Debug)]
pub struct PtPool {
    base: u64,
    levels: Vec<u8>,
    next_free: usize,
}

impl PtPool {
    /// An empty pool of `size` bytes at `base`.
    pub fn new(base: u64, size: u64) -> PtPool {
        let pages = usize::try_from(size / 4096).unwrap_or(0);
        PtPool { base, levels: vec![0; pages], next_free: 0 }
    }

    /// First byte of the pool.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Pool size in pages.
    pub fn pages(&self) -> u64 {
        self.levels.len() as u64
    }

    /// Pages in use.
    pub fn used(&self) -> u64 {
        self.levels.iter().filter(|l| **l != 0).count() as u64
    }

    /// The level of the pool page at `gpa`, if it is a table.
    pub fn level_of(&self, gpa: u64) -> Option<u8> {
        let i = self.index_of(gpa)?;
        match self.levels[i] {
            0 => None,
            l => Some(l),
        }
    }

    /// Index of the page at `gpa` if it is inside the pool and page aligned.
    pub fn index_of(&self, gpa: u64) -> Option<usize> {
        if !gpa.is_multiple_of(4096) || gpa < self.base {
            return None;
        }
        let i = usize::try_from((gpa - self.base) / 4096).ok()?;
        (i < self.levels.len()).then_some(i)
    }

    /// The level of every pool page, in order (0 = not a table).
    pub fn levels(&self) -> &[u8] {
        &self.levels
    }

    /// GPA of the first pool page after the last one in use.
    pub fn first_free(&self) -> u64 {
        let used = self.levels.iter().rposition(|l| *l != 0).map_or(0, |i| i + 1);
        self.base + used as u64 * 4096
    }

    /// Takes a free page for a table of `level`; the caller zeroes it.
    pub fn alloc(&mut self, level: u8) -> Result<u64, PageTableError> {
        let start = self.next_free;
        let n = self.levels.len();
        for k in 0..n {
            let i = (start + k) % n;
            if self.levels[i] == 0 {
                self.levels[i] = level;
                self.next_free = i + 1;
                return Ok(self.base + (i as u64) * 4096);
            }
        }
        Err(PageTableError::PoolFull { pages: self.pages() })
    }
}

/// Index into the table of `level` for `va`.
pub fn table_index(va: u64, level: u8) -> usize {
    // Masked to 9 bits: fits.
    #[allow(clippy::cast_possible_truncation)]
    let i = ((va >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff) as usize;
    i
}

/// Whether `va` is canonical for 4-level paging.
pub fn is_canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == 0x1ffff
}

/// A set of tables rooted at a PML4 in the pool.
pub struct PageTables {
    /// The pool.
    pub pool: PtPool,
    /// GPA of the PML4.
    pub root: u64,
}

impl PageTables {
    /// A new, empty PML4 in `pool`.
    pub fn new(mem: &GuestMemoryMmap, mut pool: PtPool) -> Result<PageTables, PageTableError> {
        let root = pool.alloc(4)?;
        zero_page(mem, root)?;
        Ok(PageTables { pool, root })
    }

    /// Maps the 4 KiB page at `va` to `pa` with leaf `flags` (added to
    /// [`LEAF_BASE`]), creating the tables on the way.
    pub fn map(&mut self, mem: &GuestMemoryMmap, va: u64, pa: u64, flags: u64) -> Result<(), PageTableError> {
        if !is_canonical(va) {
            return Err(PageTableError::NonCanonical(va));
        }
        let mut table = self.root;
        for level in (2..=4u8).rev() {
            let slot = table + 8 * table_index(va, level) as u64;
            let e: u64 =
                mem.read_obj(GuestAddress(slot)).map_err(|source| PageTableError::Write { gpa: slot, source })?;
            table = if e & PTE_P != 0 {
                e & PTE_ADDR
            } else {
                let t = self.pool.alloc(level - 1)?;
                zero_page(mem, t)?;
                write_entry(mem, slot, t | TABLE_FLAGS)?;
                t
            };
        }
        let slot = table + 8 * table_index(va, 1) as u64;
        let e: u64 = mem.read_obj(GuestAddress(slot)).map_err(|source| PageTableError::Write { gpa: slot, source })?;
        if e & PTE_P != 0 {
            return Err(PageTableError::AlreadyMapped(va));
        }
        write_entry(mem, slot, (pa & PTE_ADDR) | LEAF_BASE | flags)
    }
}

fn zero_page(mem: &GuestMemoryMmap, gpa: u64) -> Result<(), PageTableError> {
    mem.write_slice(&[0u8; 4096], GuestAddress(gpa)).map_err(|source| PageTableError::Write { gpa, source })
}

fn write_entry(mem: &GuestMemoryMmap, gpa: u64, e: u64) -> Result<(), PageTableError> {
    mem.write_obj(e, GuestAddress(gpa)).map_err(|source| PageTableError::Write { gpa, source })
}

/// Walks the tables for `va` in software: the leaf entry, if mapped.
pub fn translate(mem: &GuestMemoryMmap, root: u64, va: u64) -> Option<u64> {
    let mut table = root;
    for level in (1..=4u8).rev() {
        let e: u64 = mem.read_obj(GuestAddress(table + 8 * table_index(va, level) as u64)).ok()?;
        if e & PTE_P == 0 {
            return None;
        }
        if level == 1 {
            return Some(e);
        }
        table = e & PTE_ADDR;
    }
    None
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn maps_and_translates_with_preset_bits() {
        let m = mem();
        let mut pt = PageTables::new(&m, PtPool::new(0x10_0000, 0x1_0000)).unwrap();
        pt.map(&m, 0x20_3000, 0x20_3000, PTE_RW).unwrap();
        pt.map(&m, 0x7f_ffff_f000, 0x30_0000, PTE_NX).unwrap();
        let e = translate(&m, pt.root, 0x20_3000).unwrap();
        assert_eq!(e & PTE_ADDR, 0x20_3000);
        assert_eq!(e & (LEAF_BASE | PTE_RW), LEAF_BASE | PTE_RW);
        assert_eq!(translate(&m, pt.root, 0x7f_ffff_f000).unwrap(), 0x30_0000 | LEAF_BASE | PTE_NX);
        assert!(translate(&m, pt.root, 0x20_4000).is_none());
        // PML4, one PDPT, then a PD and a PT for each of two 1 GiB regions.
        assert_eq!(pt.pool.used(), 6);
        assert_eq!(pt.pool.level_of(pt.root), Some(4));
        // Every non-leaf entry has U/S.
        let pml4e: u64 = m.read_obj(GuestAddress(pt.root)).unwrap();
        assert_eq!(pml4e & TABLE_FLAGS, TABLE_FLAGS);
    }

    #[test]
    fn refuses_double_map_and_noncanonical() {
        let m = mem();
        let mut pt = PageTables::new(&m, PtPool::new(0x10_0000, 0x1_0000)).unwrap();
        pt.map(&m, 0x5000, 0x5000, 0).unwrap();
        assert!(matches!(pt.map(&m, 0x5000, 0x6000, 0), Err(PageTableError::AlreadyMapped(_))));
        assert!(matches!(pt.map(&m, 1 << 47, 0, 0), Err(PageTableError::NonCanonical(_))));
    }

    #[test]
    fn pool_fills_up() {
        let m = mem();
        let mut pt = PageTables::new(&m, PtPool::new(0x10_0000, 0x4000)).unwrap();
        pt.map(&m, 0x1000, 0x1000, 0).unwrap();
        assert!(matches!(pt.map(&m, 1 << 40, 0, 0), Err(PageTableError::PoolFull { .. })));
        assert_eq!(pt.pool.index_of(0x10_0001), None);
        assert_eq!(pt.pool.index_of(0x10_4000), None);
        assert_eq!(pt.pool.index_of(0x10_3000), Some(3));
    }

    #[test]
    fn indices_and_canonical() {
        assert_eq!(table_index(0x20_3000, 1), 3);
        assert_eq!(table_index(0x20_3000, 2), 1);
        assert_eq!(table_index(0xffff_8000_0000_0000, 4), 256);
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(!is_canonical(0x0000_8000_0000_0000));
    }
}
