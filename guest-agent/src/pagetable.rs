//! The guest's page-table API. The tables live in the pool, which the guest
//! may read but not change except through the VMM: by sidecall
//! (`PTE_UPDATE`, with the exit path as fallback) or by the trap path (a
//! store into the pool, which exits to the VMM as MMIO).

use core::sync::atomic::{AtomicU64, Ordering};

use shm_proto::boot::Backend;
use shm_proto::op::{Opcode, PteKind, Status};

use crate::client::{Client, Via};
use crate::Env;

/// Present.
pub const P: u64 = 1;
/// Writable.
pub const RW: u64 = 2;
/// No-execute.
pub const NX: u64 = 1 << 63;
/// Address bits.
pub const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Which path an update takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtPath {
    /// `PTE_UPDATE` by sidecall (exit path if no reply in time).
    Sidecall,
    /// A store into the pool: MMIO exit to the VMM.
    Trap,
}

/// Outcome of one update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update {
    /// Status.
    pub status: Status,
    /// What it did.
    pub kind: PteKind,
    /// Which path answered.
    pub via: Via,
}

/// Does one raw update: `entry` at `index` of the table at `table`.
pub fn update(c: &mut Client, path: PtPath, table: u64, index: u64, entry: u64) -> Update {
    match path {
        PtPath::Sidecall => {
            let r = c.call(Opcode::PteUpdate as u16, [table, index, entry, 0, 0, 0]);
            Update { status: r.status, kind: PteKind::from_u64(r.words[0]).unwrap_or(PteKind::Noop), via: r.via }
        }
        PtPath::Trap => {
            let (status, kind) = c.pte_trap(table, index, entry);
            Update { status, kind, via: Via::Exit }
        }
    }
}

/// Index into the table of `level` (4 = PML4) for `va`.
pub fn index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * (level - 1))) & 0x1ff
}

fn read_entry(table: u64, i: u64) -> u64 {
    // SAFETY: `table` is a pool page (the walk only follows present entries,
    // which the host guarantees point into the pool), identity mapped and
    // readable; i < 512.
    unsafe { core::ptr::read_volatile((table + i * 8) as *const u64) }
}

/// Pool pages each vCPU has used so far (its share is fixed; this is how
/// far into it the vCPU has got, across every editor it makes).
static USED_PAGES: [AtomicU64; shm_proto::layout::MAX_VCPUS as usize] =
    [const { AtomicU64::new(0) }; shm_proto::layout::MAX_VCPUS as usize];

/// A vCPU's page-table editor: walks from the root, takes new table pages
/// from its own share of the pool's free pages.
pub struct PageTables<'a> {
    env: &'a Env,
    start: u64,
    pages: u64,
}

impl<'a> PageTables<'a> {
    /// The editor of this vCPU.
    pub fn new(env: &'a Env) -> PageTables<'a> {
        let b = env.boot;
        let pool_end = b.pt_pool_gpa + b.pt_pool_size;
        let free = b.pt_pool_free.max(b.pt_pool_gpa);
        let pages = pool_end.saturating_sub(free) / 4096 / u64::from(b.nr_vcpus.max(1));
        PageTables { env, start: free + pages * 4096 * u64::from(env.vcpu), pages }
    }

    fn used(&self) -> &'static AtomicU64 {
        &USED_PAGES[usize::try_from(self.env.vcpu).unwrap_or(0) % USED_PAGES.len()]
    }

    /// Free table pages left in this vCPU's share.
    pub fn pages_left(&self) -> u64 {
        self.pages.saturating_sub(self.used().load(Ordering::Relaxed))
    }

    /// The table and index of `va`'s leaf entry, creating missing tables
    /// through `path`.
    pub fn leaf_slot(&mut self, c: &mut Client, path: PtPath, va: u64) -> Result<(u64, u64), Status> {
        let mut table = self.env.boot.pt_root;
        for level in (2..=4).rev() {
            let i = index(va, level);
            let e = read_entry(table, i);
            table = if e & P != 0 {
                e & ADDR
            } else {
                let used = self.used().load(Ordering::Relaxed);
                if used >= self.pages {
                    return Err(Status::Denied);
                }
                self.used().store(used + 1, Ordering::Relaxed);
                let t = self.start + used * 4096;
                let u = update(c, path, table, i, t | P | RW);
                if u.status != Status::Ok {
                    return Err(u.status);
                }
                t
            };
        }
        Ok((table, index(va, 1)))
    }

    /// Sets `va`'s leaf entry to `entry` (0 unmaps), then makes the change
    /// visible as the backend needs: nothing for a map; for a change or
    /// unmap, invlpg on hardware KVM (on PVM the host already dropped its
    /// shadow pages before replying).
    pub fn set(&mut self, c: &mut Client, path: PtPath, va: u64, entry: u64) -> Update {
        let (table, i) = match self.leaf_slot(c, path, va) {
            Ok(s) => s,
            Err(status) => return Update { status, kind: PteKind::Noop, via: Via::Exit },
        };
        let u = update(c, path, table, i, entry);
        if u.status == Status::Ok
            && matches!(u.kind, PteKind::Change | PteKind::Unmap)
            && Backend::from_u32(self.env.boot.backend) != Some(Backend::Pvm)
        {
            // SAFETY: invlpg only drops a TLB entry.
            unsafe { core::arch::asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
        }
        u
    }

    /// Entry `i` of the table at `table` (a pool page).
    pub fn leaf_entry_at(&self, table: u64, i: u64) -> u64 {
        read_entry(table, i & 0x1ff)
    }

    /// The leaf entry of `va` as the tables hold it now (0 if unmapped).
    pub fn leaf(&self, va: u64) -> u64 {
        let mut table = self.env.boot.pt_root;
        for level in (2..=4).rev() {
            let e = read_entry(table, index(va, level));
            if e & P == 0 {
                return 0;
            }
            table = e & ADDR;
        }
        read_entry(table, index(va, 1))
    }
}

impl Client<'_> {
    /// The trap path: store `entry` into the pool (an MMIO exit, handled by
    /// the VMM with the same validation), then read the status the VMM left.
    pub fn pte_trap(&mut self, table: u64, index: u64, entry: u64) -> (Status, PteKind) {
        let b = self.env().boot;
        let in_pool = table.is_multiple_of(4096) && table >= b.pt_pool_gpa && table < b.pt_pool_gpa + b.pt_pool_size;
        if !in_pool || index >= 512 {
            // A store cannot express it: the same answer the handler gives.
            return (Status::BadArgument, PteKind::Noop);
        }
        let host = &self.env().shared.host;
        host.pte_status.store(u64::MAX, Ordering::Relaxed);
        // SAFETY: the trap view (the pool itself on PVM) is identity mapped
        // writable in the guest's tables and read-only in the memslot: this
        // store exits to the VMM, which validates it; it never changes memory
        // behind the VMM's back.
        unsafe { core::ptr::write_volatile(b.pt_trap_addr(table + index * 8) as *mut u64, entry) };
        let status = shm_proto::op::decode_status(host.pte_status.load(Ordering::Acquire)).unwrap_or(Status::HostError);
        (status, PteKind::from_u64(host.pte_kind.load(Ordering::Relaxed)).unwrap_or(PteKind::Noop))
    }
}
