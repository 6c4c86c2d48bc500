//! `gpascan`: a hostile guest against the guest-physical address space.
//!
//! Each vCPU builds page tables of its own in its scratch RAM — a copy of
//! the VMM's root plus two PML4 entries that map every GPA below 2^40 (or
//! the CPU's physical width) at [`SWEEP_VA`], with 1 GiB pages where CPUID
//! 0x8000_0001 EDX bit 26 offers them, else 2 MiB pages for a sample of
//! gigabytes — and loads its CR3 with them. Page-table updates through the
//! VMM's service never could map those GPAs; these tables do.
//!
//! vCPU 0 then changes and unmaps one of its pages `args[0]` times, by
//! sidecall and by the trap path: on PVM each such update makes the host
//! drop every shadow page by a memslot change at
//! [`shm_proto::layout::ZAP_GPA`]. Meanwhile every vCPU (vCPU 0 while it
//! waits for its sidecalls, the others all the time) reads `ZAP_GPA`,
//! writes a marker there, and sweeps GPAs up to the top. Every read must be
//! the guest's own memory — the page at `ZAP_ALIAS_GPA`, whose content the
//! guest sets, for `ZAP_GPA`; RAM below `ram_size`; the pool behind its trap
//! view — or the all-ones an MMIO exit answers; never the marker and never
//! anything else. Exit status 0 when so, 1 when a read saw memory that is
//! not the guest's, 2 when the test could not run as designed.

use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, Ordering};

use shm_proto::args::gpascan as args;
use shm_proto::layout::{guest_scratch, GUEST_SCRATCH_PER_VCPU, PAGE_SIZE, ZAP_ALIAS_GPA, ZAP_GPA};
use shm_proto::op::{Opcode, PteKind, Status};

use crate::client::Client;
use crate::console::Console;
use crate::idt::probe_read;
use crate::pagetable::{self, PageTables, PtPath, NX, P, RW};
use crate::{arch, ptcheck, Env};

/// Where the sweep mapping starts: VA = `SWEEP_VA` + GPA (PML4 entries 192
/// and 193, which nothing else uses).
pub const SWEEP_VA: u64 = SWEEP_PML4 << 39;
const SWEEP_PML4: u64 = 192;
/// The most the sweep maps: 2^40, two PML4 entries.
const SWEEP_TOP: u64 = 1 << 40;
const GIB: u64 = 1 << 30;
/// What an MMIO read returns: the VMM fills it with 0xff.
const MMIO: u64 = u64::MAX;
/// What the guest writes at ZAP_GPA; it must never read it back.
const MARKER: u64 = 0x6d61_726b_6572_2121;
/// US | A | D on top of P | RW: PVM needs U/S at every level.
const US: u64 = 1 << 2;
const AD: u64 = (1 << 5) | (1 << 6);
const PS: u64 = 1 << 7;
/// Pages of scratch RAM the tables may use: PML4, two PDPTs, the PDs.
const TABLE_PAGES: u64 = GUEST_SCRATCH_PER_VCPU / PAGE_SIZE;
const PDS: u64 = TABLE_PAGES - 3;

/// Set by vCPU 0 when its zaps are done: the other vCPUs stop scanning.
static DONE: AtomicBool = AtomicBool::new(false);

/// The alias page's word `i`, as the guest writes it.
fn pattern(i: u64) -> u64 {
    0xa11a_5000_0000_0000 | i
}

/// Counts of what the reads saw.
#[derive(Default)]
struct Tally {
    zap_reads: u64,
    own: u64,
    mmio: u64,
    marker: u64,
    foreign: u64,
    faults: u64,
    writes: u64,
    swept: u64,
    sweeps: u64,
    first_bad: Option<(u64, Option<u64>)>,
}

impl Tally {
    fn bad(&mut self, gpa: u64, v: Option<u64>) {
        if self.first_bad.is_none() {
            self.first_bad = Some((gpa, v));
        }
    }

    fn failed(&self) -> bool {
        self.marker + self.foreign + self.faults > 0
    }
}

/// The sweep mapping: which gigabytes of GPA it covers.
struct Sweep {
    top: u64,
    gib_pages: bool,
    stride: u64,
}

impl Sweep {
    fn mapped(&self, gib: u64) -> bool {
        let zap = ZAP_GPA / GIB;
        gib < self.top / GIB && (self.gib_pages || gib == 0 || gib == zap || (gib + 1).is_multiple_of(self.stride))
    }
}

fn write_u64(va: u64, v: u64) {
    // SAFETY: `va` is in this vCPU's scratch RAM (its tables, identity
    // mapped writable) or in the sweep mapping, where a store reaches guest
    // RAM the guest owns or exits to the VMM as MMIO.
    unsafe { core::ptr::write_volatile(va as *mut u64, v) };
}

fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reads CR3 (emulated on PVM); no side effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// # Safety
/// `root` is a PML4 that maps everything this vCPU touches at the same
/// addresses as the current one.
unsafe fn write_cr3(root: u64) {
    // SAFETY: the caller's promise; loading CR3 flushes this vCPU's TLB.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) };
}

/// Builds the tables at `base` (a PML4, two PDPTs, then PDs): a copy of the
/// VMM's root plus the sweep mapping.
fn build_tables(env: &Env, base: u64, sweep: &Sweep) {
    let page = |i: u64| base + i * PAGE_SIZE;
    let vmm = PageTables::new(env);
    for i in 0..512 {
        write_u64(page(0) + i * 8, vmm.leaf_entry_at(env.boot.pt_root, i));
    }
    let mut next_pd = 3;
    for k in 0..2u64 {
        let pdpt = page(1 + k);
        write_u64(page(0) + (SWEEP_PML4 + k) * 8, pdpt | P | RW | US | AD);
        for j in 0..512u64 {
            let gib = k * 512 + j;
            let gpa = gib * GIB;
            let e = if !sweep.mapped(gib) || next_pd >= TABLE_PAGES && !sweep.gib_pages {
                0
            } else if sweep.gib_pages {
                gpa | P | RW | US | AD | PS | NX
            } else {
                let pd = page(next_pd);
                next_pd += 1;
                for i in 0..512u64 {
                    write_u64(pd + i * 8, (gpa + (i << 21)) | P | RW | US | AD | PS | NX);
                }
                pd | P | RW | US | AD
            };
            write_u64(pdpt + j * 8, e);
        }
    }
}

/// Runs the workload on this vCPU.
pub fn run(env: &Env) -> u32 {
    let status = run_inner(env);
    if env.vcpu == 0 {
        DONE.store(true, Ordering::Release);
    }
    status
}

fn run_inner(env: &Env) -> u32 {
    let b = env.boot;
    let mut con = Console::new(env);
    let mut c = Client::new(env);
    let ext = c.kernel_cpuid(0x8000_0000, 0)[0];
    let gib_pages = ext >= 0x8000_0001 && c.kernel_cpuid(0x8000_0001, 0)[3] & (1 << 26) != 0;
    let phys = if ext >= 0x8000_0008 { c.kernel_cpuid(0x8000_0008, 0)[0] & 0xff } else { 36 };
    let gib_pages = gib_pages && b.args[args::SMALL_PAGES] != 1;
    let top = if phys >= 40 { SWEEP_TOP } else { 1 << phys };
    let sweep = Sweep { top, gib_pages, stride: (top / GIB).div_ceil(PDS - 2).max(1) };
    let tables = guest_scratch(b.free_gpa, b.nr_vcpus, env.vcpu);
    if tables + GUEST_SCRATCH_PER_VCPU > b.ram_size || top <= ZAP_GPA {
        let _ = writeln!(con, "gpascan: vCPU {}: cannot run (RAM for tables or {phys} physical bits)", env.vcpu);
        return 2;
    }
    // The VA the zaps change, its tables made now (maps only: no zap yet).
    let frames = ptcheck::frames_base(env);
    let va = ptcheck::region(env, 3);
    let slot = match PageTables::new(env).leaf_slot(&mut c, PtPath::Trap, va) {
        Ok(s) if frames + 2 * PAGE_SIZE <= b.ram_size => s,
        _ => {
            let _ = writeln!(con, "gpascan: vCPU {}: cannot build the tables for its zaps", env.vcpu);
            return 2;
        }
    };
    build_tables(env, tables, &sweep);
    let old_cr3 = read_cr3();
    // SAFETY: the new root is a copy of the VMM's (every address this vCPU
    // uses stays mapped) plus the sweep entries, which nothing else uses.
    unsafe { write_cr3(tables) };
    for i in 0..512 {
        write_u64(SWEEP_VA + ZAP_ALIAS_GPA + i * 8, pattern(i));
    }
    let mut t = Tally::default();
    let zaps = if env.vcpu == 0 {
        zap(env, &mut c, slot, frames, &sweep, &mut t)
    } else {
        scan_until_done(env, &sweep, &mut t)
    };
    sweep_once(env, &sweep, &mut t);
    // The alias page keeps what the guest wrote: its stores at ZAP_GPA
    // never reached it.
    for i in 0..512 {
        let v = probe_read(SWEEP_VA + ZAP_ALIAS_GPA + i * 8);
        if v != Some(pattern(i)) {
            t.foreign += 1;
            t.bad(ZAP_ALIAS_GPA + i * 8, v);
        }
    }
    // SAFETY: back to the VMM's own root, which this vCPU started with.
    unsafe { write_cr3(old_cr3) };
    report(&mut con, env, &t, &zaps, &sweep)
}

/// What vCPU 0's zaps did.
#[derive(Default)]
struct Zaps {
    by_sidecall: u64,
    by_trap: u64,
    trap_cycles: u64,
    trap_min: u64,
    trap_max: u64,
    refused: u64,
}

/// vCPU 0: maps, changes and unmaps its page in turn, `args[0]` zaps,
/// alternating sidecall (scanning while it waits) and trap path.
fn zap(env: &Env, c: &mut Client, (table, idx): (u64, u64), frames: u64, sweep: &Sweep, t: &mut Tally) -> Zaps {
    let b = env.boot;
    let want = match b.args[args::ZAPS] {
        0 => 1000,
        n => n.min(1_000_000),
    };
    let mut z = Zaps { trap_min: u64::MAX, ..Zaps::default() };
    let mut i = 0u64;
    while z.by_sidecall + z.by_trap < want && z.refused < 16 {
        let entry = match i % 3 {
            0 => frames | P | RW | NX,
            1 => (frames + PAGE_SIZE) | P | NX,
            _ => 0,
        };
        let by_sidecall = b.sidecalls != 0 && (i / 3).is_multiple_of(2);
        i += 1;
        let mut r = None;
        if by_sidecall {
            r = c
                .sidecall_while(Opcode::PteUpdate as u16, [table, idx, entry, 0, 0, 0], || scan_zap_page(t))
                .map(|r| (r.status, PteKind::from_u64(r.words[0]).unwrap_or(PteKind::Noop)));
        }
        let mut via_trap = false;
        let (status, kind) = match r {
            Some((Status::UseExitPath | Status::BadSequence, _)) | None => {
                via_trap = true;
                let t0 = arch::rdtsc();
                let u = pagetable::update(c, PtPath::Trap, table, idx, entry);
                let dt = arch::rdtsc().wrapping_sub(t0);
                if u.status == Status::Ok && u.kind != PteKind::Map {
                    z.trap_cycles = z.trap_cycles.saturating_add(dt);
                    z.trap_min = z.trap_min.min(dt);
                    z.trap_max = z.trap_max.max(dt);
                }
                (u.status, u.kind)
            }
            Some(r) => r,
        };
        match (status, kind) {
            (Status::Ok, PteKind::Change | PteKind::Unmap) if via_trap => z.by_trap += 1,
            (Status::Ok, PteKind::Change | PteKind::Unmap) => z.by_sidecall += 1,
            (Status::Ok, _) => {}
            _ => z.refused += 1,
        }
        scan_zap_page(t);
        if i.is_multiple_of(128) {
            sweep_once(env, sweep, t);
        }
    }
    z
}

/// One read of ZAP_GPA (and its last word), checked, then the marker
/// written there.
fn scan_zap_page(t: &mut Tally) {
    for i in [0u64, 511] {
        let v = probe_read(SWEEP_VA + ZAP_GPA + i * 8);
        t.zap_reads += 1;
        match v {
            Some(MMIO) => t.mmio += 1,
            Some(v) if v == pattern(i) => t.own += 1,
            Some(MARKER) => {
                t.marker += 1;
                t.bad(ZAP_GPA + i * 8, v);
            }
            Some(_) => {
                t.foreign += 1;
                t.bad(ZAP_GPA + i * 8, v);
            }
            None => {
                t.faults += 1;
                t.bad(ZAP_GPA + i * 8, None);
            }
        }
    }
    write_u64(SWEEP_VA + ZAP_GPA, MARKER);
    write_u64(SWEEP_VA + ZAP_GPA + 511 * 8, MARKER);
    t.writes += 2;
}

/// The other vCPUs: scan until vCPU 0 is done (or a bound passes).
fn scan_until_done(env: &Env, sweep: &Sweep, t: &mut Tally) -> Zaps {
    let want = match env.boot.args[args::ZAPS] {
        0 => 1000,
        n => n.min(1_000_000),
    };
    // 20 ms per zap is far more than the slowest seen here; never forever.
    let bound = env.boot.tsc_khz.saturating_mul(20).saturating_mul(want).saturating_add(env.boot.tsc_khz * 10_000);
    let start = arch::rdtsc();
    let mut n = 0u64;
    while !DONE.load(Ordering::Acquire) && arch::rdtsc().wrapping_sub(start) < bound {
        scan_zap_page(t);
        n += 1;
        if n.is_multiple_of(4096) {
            sweep_once(env, sweep, t);
        }
    }
    Zaps::default()
}

/// The GPAs one sweep reads: one page per mapped gigabyte (its offset
/// varying with the gigabyte), and the edges of RAM, ZAP_GPA and the trap
/// view.
fn sweep_once(env: &Env, sweep: &Sweep, t: &mut Tally) {
    let b = env.boot;
    let edges = [
        ZAP_GPA + 8,
        ZAP_GPA + PAGE_SIZE,
        ZAP_GPA - PAGE_SIZE,
        ZAP_GPA + (2 << 20),
        b.ram_size,
        b.ram_size + PAGE_SIZE,
        shm_proto::layout::PT_TRAP_GPA,
        sweep.top - PAGE_SIZE,
    ];
    let per_gib = (0..sweep.top / GIB).map(|k| k * GIB + ((k * 0x3_5000) & (GIB - PAGE_SIZE)));
    for gpa in per_gib.chain(edges) {
        if gpa >= sweep.top || !sweep.mapped(gpa / GIB) {
            continue;
        }
        check_gpa(env, gpa, t);
    }
    t.sweeps += 1;
}

/// Reads `gpa` through the sweep mapping and checks it is the guest's own.
fn check_gpa(env: &Env, gpa: u64, t: &mut Tally) {
    let b = env.boot;
    t.swept += 1;
    let read = |g: u64| probe_read(SWEEP_VA + g);
    let trap = b.pt_trap_gpa;
    let ok = if gpa < b.ram_size {
        read(gpa).is_some()
    } else if (ZAP_GPA..ZAP_GPA + PAGE_SIZE).contains(&gpa) {
        let v = read(gpa);
        v == Some(MMIO) || v == Some(pattern((gpa - ZAP_GPA) / 8))
    } else if trap != 0 && (trap..trap + b.pt_pool_size).contains(&gpa) {
        // The pool's trap view shows the pool: compare with it, read on
        // either side (the pool may change meanwhile).
        let pool = gpa - trap + b.pt_pool_gpa;
        let before = read(pool);
        let v = read(gpa);
        v.is_some() && (v == before || v == read(pool))
    } else {
        read(gpa) == Some(MMIO)
    };
    if !ok {
        let v = read(gpa);
        match v {
            None => t.faults += 1,
            Some(MARKER) => t.marker += 1,
            Some(_) => t.foreign += 1,
        }
        t.bad(gpa, v);
    }
}

fn report(con: &mut Console, env: &Env, t: &Tally, z: &Zaps, sweep: &Sweep) -> u32 {
    let khz = env.boot.tsc_khz.max(1);
    let us = |c: u64| c.saturating_mul(1000) / khz;
    let avg = us(z.trap_cycles / z.by_trap.max(1));
    let min = if z.by_trap == 0 { 0 } else { us(z.trap_min) };
    let pages = if sweep.gib_pages { "1 GiB" } else { "2 MiB" };
    if env.vcpu == 0 {
        let _ = writeln!(
        con,
        "gpascan: vCPU {}: {} zaps ({} by sidecall, {} by trap, {avg} us avg, {min} us min, {} us max per trap-path change), {} refused",
        env.vcpu,
        z.by_sidecall + z.by_trap,
        z.by_sidecall,
        z.by_trap,
        us(z.trap_max),
        z.refused
    );
    }
    let _ = writeln!(
        con,
        "gpascan: vCPU {}: ZAP_GPA read {} times: {} own page, {} MMIO, {} marker, {} foreign, {} faults; {} marker writes; {} sweeps of {:#x} with {pages} pages, {} GPAs read",
        env.vcpu, t.zap_reads, t.own, t.mmio, t.marker, t.foreign, t.faults, t.writes, t.sweeps, sweep.top, t.swept
    );
    if t.failed() {
        let _ = match t.first_bad {
            Some((gpa, Some(v))) => writeln!(con, "gpascan: vCPU {}: FAILED: GPA {gpa:#x} read {v:#x}", env.vcpu),
            Some((gpa, None)) => writeln!(con, "gpascan: vCPU {}: FAILED: GPA {gpa:#x} faulted", env.vcpu),
            None => writeln!(con, "gpascan: vCPU {}: FAILED", env.vcpu),
        };
        return 1;
    }
    if z.refused >= 16 {
        let _ = writeln!(con, "gpascan: vCPU {}: FAILED: the page-table service refused its updates", env.vcpu);
        return 2;
    }
    let _ = writeln!(con, "gpascan: vCPU {}: ok", env.vcpu);
    0
}
