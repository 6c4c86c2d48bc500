//! The selftest's page-table part: the same maps, changes and unmaps on one
//! path, with every result read back through the new mapping (or the #PF an
//! unmap must cause), and invalid updates that must be refused.

use shm_proto::op::{PteKind, Status};

use crate::client::Client;
use crate::idt::probe_read;
use crate::pagetable::{self, PageTables, PtPath, ADDR, NX, P, RW};
use crate::Env;

/// Pages each sequence maps.
pub const PAGES: usize = 8;
/// Number of invalid updates tried.
pub const INVALID: usize = 7;
pub use shm_proto::layout::{GUEST_FRAMES_PER_VCPU as FRAMES_PER_VCPU, GUEST_SCRATCH_PER_VCPU as SCRATCH_PER_VCPU};

/// What a sequence left behind, to compare between paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Leaf entries after the maps, the changes, the unmaps.
    pub leaves: [[u64; PAGES]; 3],
    /// Statuses of the invalid updates.
    pub invalid: [Status; INVALID],
}

/// First frame of this vCPU's frame area.
pub fn frames_base(env: &Env) -> u64 {
    shm_proto::layout::guest_frames(env.boot.free_gpa, env.boot.nr_vcpus, env.vcpu)
}

/// A region of virtual addresses of its own for (vCPU, slot): a PML4 entry
/// no one else uses, so its tables are built through the service too.
pub fn region(env: &Env, slot: u64) -> u64 {
    (8 + u64::from(env.vcpu) * 4 + slot) << 39
}

fn marker(v: u32, set: u64, i: usize) -> u64 {
    0x5eed_0000_0000_0000 | (u64::from(v) << 32) | (set << 16) | i as u64
}

fn write_frame(pa: u64, value: u64) {
    // SAFETY: pa is a frame in this vCPU's frame area of free RAM (checked
    // inside RAM by the caller), identity mapped writable.
    unsafe { core::ptr::write_volatile(pa as *mut u64, value) };
}

/// Runs the sequence on `path` in region `slot`. Failures are reported
/// through `fail`.
pub fn run(env: &Env, c: &mut Client, path: PtPath, slot: u64, fail: &mut dyn FnMut(core::fmt::Arguments)) -> Record {
    let mut rec = Record { leaves: [[0; PAGES]; 3], invalid: [Status::Ok; INVALID] };
    let b = env.boot;
    let frames = frames_base(env);
    if frames + FRAMES_PER_VCPU > b.ram_size {
        fail(format_args!("{path:?}: no room for page frames: give the VM more --mem"));
        return rec;
    }
    let mut pt = PageTables::new(env);
    let base = region(env, slot);
    let va = |i: usize| base + (i as u64) * 4096;
    let fa = |i: usize| frames + (i as u64) * 4096;
    let fb = |i: usize| frames + ((PAGES + i) as u64) * 4096;
    for i in 0..PAGES {
        write_frame(fa(i), marker(env.vcpu, 0xa, i));
        write_frame(fb(i), marker(env.vcpu, 0xb, i));
    }
    let steps: [(&str, PteKind); 3] = [("map", PteKind::Map), ("change", PteKind::Change), ("unmap", PteKind::Unmap)];
    for (step, (name, want_kind)) in steps.iter().enumerate() {
        for i in 0..PAGES {
            let entry = match step {
                0 => fa(i) | P | RW | NX,
                1 => fb(i) | P | NX,
                _ => 0,
            };
            let u = pt.set(c, path, va(i), entry);
            if u.status != Status::Ok || u.kind != *want_kind {
                fail(format_args!("{path:?} {name} of {:#x}: {:?} {:?} via {:?}", va(i), u.status, u.kind, u.via));
                continue;
            }
            let want = match step {
                0 => Some(marker(env.vcpu, 0xa, i)),
                1 => Some(marker(env.vcpu, 0xb, i)),
                _ => None,
            };
            let got = probe_read(va(i));
            if got != want {
                fail(format_args!("{path:?} after {name} of {:#x}: read {got:x?}, want {want:x?}", va(i)));
            }
            rec.leaves[step][i] = pt.leaf(va(i));
        }
    }

    // Invalid updates (not in polite mode, `args[selftest::POLITE]` = 1, where only the
    // trap path tries them: a well-behaved VM beside a hostile one must show
    // no rejected sidecalls)...
    if path == PtPath::Sidecall && b.args[shm_proto::args::selftest::POLITE] == 1 {
        return rec;
    }
    let spare = va(PAGES);
    let (table, idx) = match pt.leaf_slot(c, path, spare) {
        Ok(s) => s,
        Err(s) => {
            fail(format_args!("{path:?}: cannot reach the leaf table: {s:?}"));
            return rec;
        }
    };
    let bad = [
        b.shared_gpa | P,                     // the shared region
        shm_proto::layout::VCPU_AREA_GPA | P, // a vCPU area
        shm_proto::layout::BOOT_INFO_GPA | P, // the boot-info page
        b.pt_pool_gpa | P | RW,               // the pool, writable
        fa(0) | P | 0x80,                     // PS
        b.ram_size | P,                       // past RAM
    ];
    for (k, e) in bad.iter().enumerate() {
        rec.invalid[k] = pagetable::update(c, path, table, idx, *e).status;
    }
    // ...and a non-leaf entry pointing at the root (a level-4 page) from a PD.
    let pml4e = pt.leaf_entry_at(b.pt_root, pagetable::index(spare, 4));
    let pdpte = pt.leaf_entry_at(pml4e & ADDR, pagetable::index(spare, 3));
    rec.invalid[INVALID - 1] = pagetable::update(c, path, pdpte & ADDR, 200, b.pt_root | P | RW).status;
    if pt.leaf(spare) != 0 {
        fail(format_args!("{path:?}: a refused update changed the tables"));
    }
    rec
}
