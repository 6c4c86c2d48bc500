// The `dispatch` fuzz harness: the request decoder and validator
// (`Services::dispatch`) and the host side of a ring (`RingRef::serve`), fed
// with hostile requests and hostile slot contents.
//
// Shared, through `include!`, by the cargo-fuzz target
// (sidecore/fuzz/fuzz_targets/dispatch.rs) and the corpus replay test that
// `cargo test` runs (sidecore/tests/fuzz_corpus.rs), so that both run the
// same checks. It uses only std, `shm_proto` and `sidecore_core`.
//
// Every input builds a fresh VM (deterministic: a crash reproduces from its
// input alone): two identical `Services` (A and B), each with one CPUID
// table, registry hypercalls 0x100 (echo word 0) and 0x1ff (always
// `Denied`), and a `PteService` over its own 16-page heap pool with guard
// pages on both sides; and a one-vCPU `SharedRegion` whose ring is served by
// a `RingRef` over A. Direct calls go to both A and B and must agree; what
// the ring serves is predicted by a model of the slot protocol that
// dispatches on B, and the ring's replies must match it. So A and B must end
// with identical pools.
//
// Input format (all integers little-endian; a read past the end yields 0):
//
//   config: u8    bits 0-1: PTE visibility (0/1 GuestFlush, 2 ExitPath,
//                 3 Zap with a counting zapper); bit 2: AMD vendor (else
//                 Intel) in CPUID leaf 0
//   then up to MAX_COMMANDS commands, each a tag byte, by `tag % 8`:
//     0, 1  direct dispatch: vcpu, head, 6 words
//     2     post to the ring: u8 ticket delta (i8, from the expected
//           ticket), u8 state (< 0x80: POSTED, else the low nibble as the
//           state), head, 6 words
//     3     raw slot write: u8 slot (% 64), u64 state word, head, 6 words
//     4, 5  serve the ring once
//     6     burst: u8 n (n % 40 + 1 requests posted at consecutive tickets
//           from the expected one), each a head and 6 words
//     7     switches: u8 (bit 0: ring paused, bit 1: service timing on)
//   At the end the ring is resumed and served until idle.
//
//   vcpu:  u8 b: b < 0xe0 -> 0; b < 0xff -> b & 0x1f; 0xff -> u32
//   head:  u8 s: bit 7 -> u64 raw head (nothing else read); else the opcode
//          is OPS[s & 7], or a u16 if bit 3; flags by bits 4-5: 0, NO_REPLY,
//          u16, 1 << (u8 & 15); bit 6 -> high half = u32
//   word:  u8 s, by s & 7: 0 -> 0; 1 -> u8; 2 -> u64; 3 -> a table GPA from
//          u8 p (pool page p % 21 - 2, +8 if p >= 0xf0); 4 -> a PTE from
//          u8 target and u8 flags (see `pte_word`); 5 -> u16 % 640 (an
//          index); 6 -> u32; 7 -> LEAVES[u8 % len] (a CPUID leaf)

mod dispatch_harness {
    use std::any::Any;
    use std::ptr::NonNull;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    use shm_proto::op::{
        decode_head, decode_status, encode_head, encode_status, op_class, Opcode, Status, FLAG_NO_REPLY,
        OP_CLASS_COUNT, OP_CLASS_UNKNOWN, STATUS_COUNT, WORDS,
    };
    use shm_proto::ring::{next_ticket, slot_index, state_word, ticket_distance, word_ticket, Body, SlotState, RING_SLOTS, TICKET_MASK};
    use sidecore_core::cpuid::{CpuidEntry, CpuidTable, GuestState, FLAG_SIGNIFICANT_INDEX};
    use sidecore_core::hostmem::HostShared;
    use sidecore_core::pte::{
        classify, PteLayout, PteService, ShadowZap, Visibility, PTE_A, PTE_ADDR, PTE_ALLOWED, PTE_D, PTE_NX, PTE_P,
        PTE_PS, PTE_RW, PTE_US,
    };
    use sidecore_core::ring::MAX_PER_SWEEP;
    use sidecore_core::{CallCtx, RingRef, Services, SharedRegion, VmControl, VmStats};

    /// Commands per input at most (bounds the time of one input).
    pub const MAX_COMMANDS: usize = 64;

    const PAGE: u64 = 4096;
    const RAM: u64 = 0x100_0000;
    const POOL_GPA: u64 = 0x10_0000;
    const POOL_PAGES: usize = 16;
    const POOL_SIZE: u64 = 0x1_0000;
    const IMAGE_GPA: u64 = 0x20_0000;
    const IMAGE_END: u64 = 0x21_0000;
    /// The shared region's GPA in the VM the PTE layout describes: nothing
    /// may point at it (it lies between the image and free RAM).
    const SHARED_GPA: u64 = 0x40_0000;
    const FREE_GPA: u64 = 0x60_0000;
    const LAYOUT: PteLayout = PteLayout {
        ram_size: RAM,
        pool_gpa: POOL_GPA,
        pool_size: POOL_SIZE,
        image_gpa: IMAGE_GPA,
        image_end: IMAGE_END,
        free_gpa: FREE_GPA,
    };
    /// Initial levels: page 0 = PML4, 1 = PDPT, 2 = PD, 3 = PT; the rest free.
    const INITIAL_LEVELS: [u8; 4] = [4, 3, 2, 1];
    /// Guard pages on each side of the pool, filled with GUARD_BYTE.
    const GUARD_PAGES: usize = 2;
    const GUARD_BYTE: u8 = 0xa5;
    const WORDS_PER_PAGE: usize = 512;
    const BLOCK_PAGES: usize = POOL_PAGES + 2 * GUARD_PAGES;
    const BLOCK_WORDS: usize = BLOCK_PAGES * WORDS_PER_PAGE;

    /// Opcodes a structured head picks from.
    const OPS: [u16; 8] = [1, 2, 3, 0x100, 0x1ff, 0x101, 0, 0x200];
    /// CPUID leaves a structured word picks from.
    const LEAVES: [u32; 16] = [
        0,
        1,
        4,
        0xb,
        0xd,
        0xe,
        0x1f,
        0x4000_0000,
        0x4000_0001,
        0x4000_0105,
        0x8000_0000,
        0x8000_0008,
        0x8000_0009,
        0xc000_0000,
        0xc000_0001,
        u32::MAX,
    ];

    /// The fuzz bytes, read front to back; zeros once they run out.
    struct Input<'a>(&'a [u8]);

    impl Input<'_> {
        fn is_empty(&self) -> bool {
            self.0.is_empty()
        }

        fn u8(&mut self) -> u8 {
            match self.0.split_first() {
                Some((b, rest)) => {
                    self.0 = rest;
                    *b
                }
                None => 0,
            }
        }

        fn u16(&mut self) -> u16 {
            u16::from_le_bytes([self.u8(), self.u8()])
        }

        fn u32(&mut self) -> u32 {
            u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
        }

        fn u64(&mut self) -> u64 {
            u64::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8(), self.u8(), self.u8(), self.u8(), self.u8()])
        }

        fn vcpu(&mut self) -> u32 {
            match self.u8() {
                0..=0xdf => 0,
                b @ 0xe0..=0xfe => u32::from(b & 0x1f),
                0xff => self.u32(),
            }
        }

        fn head(&mut self) -> u64 {
            let s = self.u8();
            if s & 0x80 != 0 {
                return self.u64();
            }
            let opcode = if s & 8 != 0 { self.u16() } else { OPS[usize::from(s & 7)] };
            let flags = match (s >> 4) & 3 {
                0 => 0,
                1 => FLAG_NO_REPLY,
                2 => self.u16(),
                _ => 1 << (self.u8() & 15),
            };
            let high = if s & 0x40 != 0 { u64::from(self.u32()) << 32 } else { 0 };
            encode_head(opcode, flags) | high
        }

        fn word(&mut self) -> u64 {
            let s = self.u8();
            match s & 7 {
                0 => 0,
                1 => u64::from(self.u8()),
                2 => self.u64(),
                3 => {
                    let p = self.u8();
                    let misalign = if p >= 0xf0 { 8 } else { 0 };
                    POOL_GPA - 2 * PAGE + u64::from(p % 21) * PAGE + misalign
                }
                4 => self.pte_word(),
                5 => u64::from(self.u16() % 640),
                6 => u64::from(self.u32()),
                _ => u64::from(LEAVES[usize::from(self.u8()) % LEAVES.len()]),
            }
        }

        /// A page-table entry: u8 t picks the target (t & 7: pool, free RAM,
        /// image, shared region, boot pages, end of RAM, beyond RAM, raw u64)
        /// and the page in it (t >> 3); u8 f the flags (bit 0 clear: P;
        /// bit 1 RW, 2 US, 3 A, 4 D, 5 NX, 6 PS; bit 7: one more bit from u8).
        fn pte_word(&mut self) -> u64 {
            let t = self.u8();
            let page = u64::from(t >> 3) * PAGE;
            let addr = match t & 7 {
                0 => POOL_GPA + (page % (POOL_SIZE + 2 * PAGE)),
                1 => FREE_GPA + page,
                2 => IMAGE_GPA + page,
                3 => SHARED_GPA + page,
                4 => page,
                5 => RAM - 2 * PAGE + page,
                6 => (1 << 40) + page,
                _ => self.u64() & PTE_ADDR,
            };
            let f = self.u8();
            let mut e = addr;
            for (bit, flag) in [(1u8, PTE_RW), (2, PTE_US), (3, PTE_A), (4, PTE_D), (5, PTE_NX), (6, PTE_PS)] {
                if f & (1 << bit) != 0 {
                    e |= flag;
                }
            }
            if f & 1 == 0 {
                e |= PTE_P;
            }
            if f & 0x80 != 0 {
                e |= 1 << (self.u8() % 64);
            }
            e
        }

        fn words(&mut self) -> [u64; WORDS] {
            std::array::from_fn(|_| self.word())
        }
    }

    /// The pool (16 pages) between guard pages, zeroed, page aligned.
    struct PoolBlock {
        base: NonNull<u8>,
        layout: std::alloc::Layout,
    }

    // SAFETY: plain heap memory owned by this struct; every access to it
    // while it is shared (PteService, this harness) is an atomic u64
    // operation.
    unsafe impl Send for PoolBlock {}
    // SAFETY: as above.
    unsafe impl Sync for PoolBlock {}

    impl Drop for PoolBlock {
        fn drop(&mut self) {
            // SAFETY: allocated in PoolBlock::new with this layout, freed once.
            unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) };
        }
    }

    impl PoolBlock {
        fn new() -> Arc<PoolBlock> {
            let layout = std::alloc::Layout::from_size_align(BLOCK_WORDS * 8, 4096).expect("pool layout");
            // SAFETY: the layout has a non-zero size.
            let base = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).expect("pool allocation");
            let guard = GUARD_PAGES * 4096;
            // SAFETY: both guard ranges lie inside the block just allocated,
            // which nobody else sees yet.
            unsafe {
                std::ptr::write_bytes(base.as_ptr(), GUARD_BYTE, guard);
                std::ptr::write_bytes(base.as_ptr().add(guard + POOL_PAGES * 4096), GUARD_BYTE, guard);
            }
            Arc::new(PoolBlock { base, layout })
        }

        /// The host address of the pool's first page.
        fn pool(&self) -> NonNull<u8> {
            // SAFETY: the offset is inside the block (GUARD_PAGES pages of
            // a BLOCK_PAGES-page block), so the result is non-null and in
            // bounds.
            unsafe { NonNull::new_unchecked(self.base.as_ptr().add(GUARD_PAGES * 4096)) }
        }

        /// Word `i` of the whole block (guards included).
        fn word(&self, i: usize) -> u64 {
            assert!(i < BLOCK_WORDS);
            // SAFETY: i < BLOCK_WORDS, so the 8 bytes are inside the block,
            // 8-byte aligned (the block is page aligned); every access to
            // the block while it is shared is atomic.
            unsafe { &*self.base.as_ptr().add(i * 8).cast::<AtomicU64>() }.load(Ordering::Relaxed)
        }

        /// A copy of the whole block (guards included). One memcpy rather
        /// than a loop of loads: the final checks compare whole pages, and
        /// a loop of compares would be traced compare by compare.
        fn snapshot(&self) -> Vec<u8> {
            let mut v = vec![0u8; BLOCK_WORDS * 8];
            // SAFETY: the block is BLOCK_WORDS * 8 bytes and readable; the
            // harness is single-threaded and no service call runs during
            // the copy, so nothing writes the block meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr(), v.as_mut_ptr(), v.len()) };
            v
        }

        /// Entry `index` of pool page `page`.
        fn entry(&self, page: usize, index: usize) -> u64 {
            assert!(page < POOL_PAGES && index < WORDS_PER_PAGE);
            self.word((GUARD_PAGES + page) * WORDS_PER_PAGE + index)
        }
    }

    struct CountZap(AtomicUsize);

    impl ShadowZap for CountZap {
        fn zap(&self) -> Result<(), String> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// What the PTE service's counters should say.
    #[derive(Default)]
    struct PteTally {
        maps: u64,
        changes: u64,
        unmaps: u64,
        refused: u64,
        to_exit_path: u64,
    }

    /// One copy of the VM's services, with what the harness knows of it.
    struct Side {
        services: Arc<Services>,
        block: Arc<PoolBlock>,
        host: Arc<HostShared>,
        zap: Arc<CountZap>,
        exit_path: bool,
        zapping: bool,
        tally: PteTally,
    }

    fn cpuid_table(amd: bool) -> CpuidTable {
        let e = |function: u32, index: u32, flags: u32, r: [u32; 4]| CpuidEntry {
            function,
            index,
            flags,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
        };
        let le = |s: &[u8; 4]| u32::from_le_bytes(*s);
        let vendor = if amd {
            [0xd, le(b"Auth"), le(b"cAMD"), le(b"enti")]
        } else {
            [0xd, le(b"Genu"), le(b"ntel"), le(b"ineI")]
        };
        CpuidTable::new(vec![
            e(0, 0, 0, vendor),
            e(1, 0, 0, [0x906ea, 0x0080_0800, 0x7ffa_fbff, 0xbfeb_fbff]),
            e(4, 0, FLAG_SIGNIFICANT_INDEX, [0x121, 1, 2, 3]),
            e(4, 1, FLAG_SIGNIFICANT_INDEX, [0x122, 4, 5, 6]),
            e(0xb, 0, FLAG_SIGNIFICANT_INDEX, [1, 1, 0x100, 7]),
            e(0xb, 1, FLAG_SIGNIFICANT_INDEX, [4, 2, 0x201, 7]),
            e(7, 0, FLAG_SIGNIFICANT_INDEX, [0, 0, 1 << 3, 0]),
            e(0xd, 0, FLAG_SIGNIFICANT_INDEX, [0x207, 0x340, 0x988, 0]),
            e(0xd, 1, FLAG_SIGNIFICANT_INDEX, [0xf, 0, 0x1800, 0]),
            e(0xd, 2, FLAG_SIGNIFICANT_INDEX, [0x100, 0x240, 0, 0]),
            e(0xd, 9, FLAG_SIGNIFICANT_INDEX, [8, 0x980, 0, 0]),
            e(0xd, 11, FLAG_SIGNIFICANT_INDEX, [0x10, 0, 3, 0]),
            e(0x4000_0000, 0, 0, [0x4000_0001, 1, 2, 3]),
            e(0x8000_0000, 0, 0, [0x8000_0008, 0, 0, 0]),
            e(0x8000_0008, 0, 0, [0x3027, 0, 0, 0]),
        ])
    }

    impl Side {
        fn new(config: u8, table: &CpuidTable) -> Side {
            let mut services = Services::new(vec![table.clone()]);
            services
                .register(0x100, Box::new(|_: &CallCtx, w: &[u64; WORDS]| Ok([w[0], 0, 0, 0, 0, 0])))
                .expect("0x100");
            services.register(0x1ff, Box::new(|_: &CallCtx, _: &[u64; WORDS]| Err(Status::Denied))).expect("0x1ff");
            let block = PoolBlock::new();
            let host = HostShared::alloc(POOL_PAGES).expect("host-shared block");
            for (l, level) in host.levels().iter().zip(INITIAL_LEVELS) {
                l.store(level, Ordering::Relaxed);
            }
            let zap = Arc::new(CountZap(AtomicUsize::new(0)));
            let visibility = match config & 3 {
                2 => Visibility::ExitPath,
                3 => Visibility::Zap(zap.clone()),
                _ => Visibility::GuestFlush,
            };
            let owner: Arc<dyn Any + Send + Sync> = block.clone();
            // SAFETY: the pool is POOL_SIZE bytes inside the block, which
            // `owner` keeps alive and which is only accessed atomically.
            let pte = unsafe { PteService::new(LAYOUT, host.clone(), block.pool(), owner, visibility) }.expect("pte");
            services.set_pte(pte);
            Side {
                services: Arc::new(services),
                block,
                host,
                zap,
                exit_path: config & 3 == 2,
                zapping: config & 3 == 3,
                tally: PteTally::default(),
            }
        }

        fn levels(&self) -> [u8; POOL_PAGES] {
            let mut out = [0; POOL_PAGES];
            for (o, l) in out.iter_mut().zip(self.host.levels()) {
                *o = l.load(Ordering::Relaxed);
            }
            out
        }

        /// Dispatches one request and checks the reply against the rules.
        fn dispatch(
            &mut self,
            table: &CpuidTable,
            vcpu: u32,
            head: u64,
            words: &[u64; WORDS],
        ) -> (Status, [u64; WORDS]) {
            let levels_before = self.levels();
            let pte_slot = pool_page(words[0])
                .filter(|p| levels_before[*p] != 0)
                .zip(usize::try_from(words[1]).ok().filter(|i| *i < WORDS_PER_PAGE));
            let old = pte_slot.map(|(p, i)| self.block.entry(p, i));
            let (status, out) = self.services.dispatch(&CallCtx { vcpu }, head, words);
            assert_eq!(decode_status(encode_status(status)), Ok(status));
            if status != Status::Ok {
                assert_eq!(out, [0; WORDS], "an error reply carries no data");
            }
            let levels_after = self.levels();
            let Ok(h) = decode_head(head) else {
                assert_eq!(status, Status::ReservedBits, "head {head:#x}");
                assert_eq!(levels_after, levels_before);
                return (status, out);
            };
            match Opcode::from_u16(h.opcode) {
                Some(Opcode::Null) => assert_eq!((status, out), (Status::Ok, [words[0], 0, 0, 0, 0, 0])),
                Some(Opcode::Cpuid) => check_cpuid(table, vcpu, words, status, out),
                Some(Opcode::PteUpdate) => {
                    self.check_pte(words, status, out, pte_slot, old, &levels_before, &levels_after);
                }
                None => match h.opcode {
                    0x100 => assert_eq!((status, out), (Status::Ok, [words[0], 0, 0, 0, 0, 0])),
                    0x1ff => assert_eq!(status, Status::Denied),
                    _ => assert_eq!(status, Status::UnknownOp, "opcode {:#x}", h.opcode),
                },
            }
            if h.opcode != Opcode::PteUpdate as u16 {
                assert_eq!(levels_after, levels_before, "only a PTE update assigns levels");
            }
            (status, out)
        }

        /// Checks a page-table update against the rules of sidecore/src/pte.rs.
        #[allow(clippy::too_many_arguments)]
        fn check_pte(
            &mut self,
            words: &[u64; WORDS],
            status: Status,
            out: [u64; WORDS],
            pte_slot: Option<(usize, usize)>,
            old: Option<u64>,
            before: &[u8; POOL_PAGES],
            after: &[u8; POOL_PAGES],
        ) {
            let entry = words[2];
            // Levels only ever go from free to a table level below 4, and
            // only for the page a non-leaf entry points at.
            let mut assigned = None;
            for (i, (b, a)) in before.iter().zip(after).enumerate() {
                if b != a {
                    assert!(*b == 0 && (1..=3).contains(a), "level of page {i} went {b} -> {a}");
                    assert!(assigned.is_none(), "two levels assigned by one update");
                    assigned = Some(i);
                }
            }
            if let Some(child) = assigned {
                assert_eq!(pool_page(entry & PTE_ADDR), Some(child), "assigned a level to a page not linked");
                let (p, _) = pte_slot.expect("a level assigned by a refused table");
                assert_eq!(after[child] + 1, before[p]);
            }
            let Some((page, index)) = pte_slot else {
                assert_eq!(status, Status::BadArgument, "table {:#x} index {:#x}", words[0], words[1]);
                self.tally.refused += 1;
                return;
            };
            let old = old.expect("old entry read");
            let level = before[page];
            let now = self.block.entry(page, index);
            if status != Status::Ok {
                self.tally.refused += 1;
                assert_eq!(now, old, "a refused update wrote the entry");
                if status == Status::UseExitPath {
                    self.tally.to_exit_path += 1;
                    assert!(self.exit_path, "UseExitPath without ExitPath visibility");
                } else {
                    assert!(assigned.is_none(), "a refused update assigned a level");
                }
                let bad_bits = entry != 0 && (entry & PTE_P == 0 || entry & !PTE_ALLOWED != 0 || entry & PTE_PS != 0);
                if bad_bits {
                    assert_eq!(status, Status::ReservedBits, "entry {entry:#x}");
                } else {
                    assert!(
                        matches!(status, Status::Denied | Status::UseExitPath),
                        "entry {entry:#x} at level {level}: {status:?}"
                    );
                }
                return;
            }
            let new = out[1];
            assert_eq!(out[2..], [0; WORDS - 2]);
            assert_eq!(now, new, "the entry written is not the one replied");
            let kind = classify(old, new);
            assert_eq!(out[0], kind as u64);
            match kind {
                shm_proto::op::PteKind::Map => self.tally.maps += 1,
                shm_proto::op::PteKind::Change => self.tally.changes += 1,
                shm_proto::op::PteKind::Unmap => self.tally.unmaps += 1,
                shm_proto::op::PteKind::Noop => {}
            }
            if matches!(kind, shm_proto::op::PteKind::Change | shm_proto::op::PteKind::Unmap) {
                assert!(!self.exit_path, "a change applied although only the exit path can flush");
            }
            if entry == 0 {
                assert_eq!(new, 0);
                return;
            }
            assert!(entry & PTE_P != 0 && entry & !PTE_ALLOWED == 0 && entry & PTE_PS == 0, "entry {entry:#x}");
            assert_eq!(new & !PTE_ALLOWED, 0);
            let pa = entry & PTE_ADDR;
            if level == 1 {
                assert_eq!(new, entry | PTE_A | PTE_D | PTE_US);
                let pool = (POOL_GPA..POOL_GPA + POOL_SIZE).contains(&pa);
                let allowed = pa < RAM
                    && ((FREE_GPA..RAM).contains(&pa)
                        || (IMAGE_GPA..IMAGE_END).contains(&pa)
                        || (pool && entry & PTE_RW == 0));
                assert!(allowed, "a leaf maps {pa:#x} (entry {entry:#x})");
            } else {
                assert_eq!(new, (entry & !PTE_D) | PTE_A | PTE_US);
                let child = pool_page(pa).unwrap_or_else(|| panic!("a non-leaf entry points at {pa:#x}"));
                assert_eq!(after[child] + 1, level, "a level-{level} entry points at a level-{} page", after[child]);
            }
        }

        /// Checks the pool against the guards and the counters, at the end.
        fn check_final(&self) {
            let levels = self.levels();
            for (i, l) in levels.iter().enumerate() {
                assert!(*l <= 4, "level {l} of page {i}");
            }
            static GUARD: [u8; 4096] = [GUARD_BYTE; 4096];
            static ZERO: [u8; 4096] = [0; 4096];
            let block = self.block.snapshot();
            for (page, bytes) in block.chunks_exact(4096).enumerate() {
                match page.checked_sub(GUARD_PAGES).filter(|p| *p < POOL_PAGES) {
                    None => assert!(bytes == GUARD, "guard page {page} of the block overwritten"),
                    Some(p) if levels[p] == 0 => assert!(bytes == ZERO, "a write into free pool page {p}"),
                    Some(_) => {}
                }
            }
            let c = &self.services.pte().expect("pte service").counters;
            let t = &self.tally;
            assert_eq!(c.maps.load(Ordering::Relaxed), t.maps);
            assert_eq!(c.changes.load(Ordering::Relaxed), t.changes);
            assert_eq!(c.unmaps.load(Ordering::Relaxed), t.unmaps);
            assert_eq!(c.refused.load(Ordering::Relaxed), t.refused);
            assert_eq!(c.to_exit_path.load(Ordering::Relaxed), t.to_exit_path);
            let zaps = if self.zapping { t.changes + t.unmaps } else { 0 };
            assert_eq!(c.zaps.load(Ordering::Relaxed), zaps);
            assert_eq!(u64::try_from(self.zap.0.load(Ordering::Relaxed)).ok(), Some(zaps));
        }
    }

    /// The pool page at `gpa`, if it is page aligned and in the pool.
    fn pool_page(gpa: u64) -> Option<usize> {
        if !gpa.is_multiple_of(PAGE) || !(POOL_GPA..POOL_GPA + POOL_SIZE).contains(&gpa) {
            return None;
        }
        usize::try_from((gpa - POOL_GPA) / PAGE).ok()
    }

    fn check_cpuid(table: &CpuidTable, vcpu: u32, words: &[u64; WORDS], status: Status, out: [u64; WORDS]) {
        let (Ok(leaf), Ok(sub)) = (u32::try_from(words[0]), u32::try_from(words[1])) else {
            assert_eq!(status, Status::BadArgument);
            return;
        };
        if vcpu != 0 {
            assert_eq!(status, Status::HostError, "vCPU {vcpu} has no table");
            return;
        }
        assert_eq!(status, Status::Ok);
        let r = table.lookup(leaf, sub);
        if words[3] != 0 {
            // v2: the vCPU state in words 2..6 rewrites only the bits KVM
            // rewrites (OSXSAVE, OSPKE, APIC, the XSAVE sizes in EBX).
            let state = GuestState { cr4: words[2], xcr0: words[3], xss: words[4], apic_base: words[5] };
            let d = table.lookup_in(leaf, sub, &state);
            assert_eq!(out, [u64::from(d[0]), u64::from(d[1]), u64::from(d[2]), u64::from(d[3]), 0, 0]);
            assert_eq!(d[0], r[0]);
            assert_eq!(d[2] & !((1 << 27) | (1 << 4)), r[2] & !((1 << 27) | (1 << 4)));
            assert_eq!(d[3] & !(1 << 9), r[3] & !(1 << 9));
            return;
        }
        assert_eq!(out, [u64::from(r[0]), u64::from(r[1]), u64::from(r[2]), u64::from(r[3]), 0, 0]);
        let exact = table
            .entries()
            .iter()
            .find(|e| e.function == leaf && (e.flags & FLAG_SIGNIFICANT_INDEX == 0 || e.index == sub));
        if let Some(e) = exact {
            assert_eq!(r, [e.eax, e.ebx, e.ecx, e.edx], "leaf {leaf:#x}/{sub:#x}");
        }
    }

    /// The whole fuzzed VM.
    struct Vm {
        table: CpuidTable,
        a: Side,
        b: Side,
        region: Arc<SharedRegion>,
        control: Arc<VmControl>,
        stats: Arc<VmStats>,
        ring: RingRef,
        timed: bool,
        /// Expected stats of the ring.
        calls: [[u64; STATUS_COUNT]; OP_CLASS_COUNT],
        cancelled: u64,
        timed_calls: u64,
    }

    impl Vm {
        fn new(config: u8) -> Vm {
            let table = cpuid_table(config & 4 != 0);
            let a = Side::new(config, &table);
            let b = Side::new(config, &table);
            let region = SharedRegion::alloc(1).expect("shared region");
            let control = Arc::new(VmControl::default());
            let stats = Arc::new(VmStats::default());
            let ring = RingRef::with_control(region.clone(), 0, a.services.clone(), stats.clone(), control.clone())
                .expect("ring of vCPU 0");
            assert!(RingRef::new(region.clone(), 1, a.services.clone(), stats.clone()).is_none());
            Vm {
                table,
                a,
                b,
                region,
                control,
                stats,
                ring,
                timed: false,
                calls: [[0; STATUS_COUNT]; OP_CLASS_COUNT],
                cancelled: 0,
                timed_calls: 0,
            }
        }

        fn direct(&mut self, vcpu: u32, head: u64, words: &[u64; WORDS]) {
            let ra = self.a.dispatch(&self.table, vcpu, head, words);
            let rb = self.b.dispatch(&self.table, vcpu, head, words);
            assert_eq!(ra, rb, "two identical VMs disagree");
        }

        fn write_slot(&self, i: usize, state: u64, body: &Body) {
            let slot = &self.region.vcpu(0).expect("vCPU 0").slots[i % RING_SLOTS];
            slot.write_body(body);
            slot.state.store(state, Ordering::Release);
        }

        /// Serves the ring once and checks it against the model.
        fn serve(&mut self) -> usize {
            let vs = self.region.vcpu(0).expect("vCPU 0");
            let mut state: [u64; RING_SLOTS] = std::array::from_fn(|i| vs.slots[i].state.load(Ordering::Acquire));
            let mut body: [Body; RING_SLOTS] = std::array::from_fn(|i| vs.slots[i].read_body());
            let consumer = vs.consumer.value.load(Ordering::Relaxed);
            let start = self.ring.expected();

            let n = self.ring.serve();

            let mut next = start;
            let mut handled = 0;
            let mut answered = [false; RING_SLOTS];
            while !self.control.paused.load(Ordering::Relaxed) && handled < MAX_PER_SWEEP {
                let i = slot_index(next);
                let seen = state[i];
                let ticket = word_ticket(seen);
                match SlotState::from_bits(seen) {
                    Some(SlotState::Posted) => {
                        let req = body[i];
                        let (status, words) = if ticket == next {
                            next = next_ticket(next);
                            let (status, words) = self.b.dispatch(&self.table, 0, req.head, &req.words);
                            // The ring dispatched the same request on A.
                            self.a.tally_like(req.head, status, &words);
                            self.calls[op_class(low16(req.head))][status as usize] += 1;
                            if self.timed {
                                self.timed_calls += 1;
                            }
                            (status, words)
                        } else {
                            self.calls[OP_CLASS_UNKNOWN][Status::BadSequence as usize] += 1;
                            // ABI v2: a later lap of the expected slot is
                            // followed; anything else keeps `next`.
                            if slot_index(ticket) == i && ticket_distance(next, ticket) > 0 {
                                next = next_ticket(ticket);
                            }
                            (Status::BadSequence, [0; WORDS])
                        };
                        state[i] = state_word(ticket, SlotState::Done);
                        assert_eq!(state[i], (seen & !0xf) | SlotState::Done as u64);
                        body[i] = Body { head: encode_status(status), words };
                        answered[i] = true;
                    }
                    Some(SlotState::Cancelled) if ticket == next => {
                        // Passed by CAS to SKIPPED (ABI v2).
                        state[i] = state_word(ticket, SlotState::Skipped);
                        next = next_ticket(next);
                        self.cancelled += 1;
                    }
                    Some(SlotState::Done | SlotState::Skipped) if ticket == next => {
                        // A finished word at the expected ticket is the
                        // guest's: passed.
                        next = next_ticket(next);
                        self.calls[OP_CLASS_UNKNOWN][Status::BadSequence as usize] += 1;
                    }
                    Some(SlotState::Claimed) => {
                        // A claim the host does not hold is released.
                        state[i] = state_word(ticket, SlotState::Cancelled);
                        self.calls[OP_CLASS_UNKNOWN][Status::BadSequence as usize] += 1;
                        break;
                    }
                    _ => break,
                }
                handled += 1;
            }
            assert_eq!(n, handled, "slots handled");
            assert_eq!(self.ring.expected(), next, "expected ticket");
            for (i, slot) in vs.slots.iter().enumerate() {
                assert_eq!(slot.state.load(Ordering::Acquire), state[i], "state of slot {i}");
                let got = slot.read_body();
                assert_eq!(got, body[i], "body of slot {i}");
                if answered[i] {
                    assert_eq!(SlotState::from_bits(slot.state.load(Ordering::Acquire)), Some(SlotState::Done));
                    assert!(decode_status(got.head).is_ok(), "slot {i} answered with status word {:#x}", got.head);
                }
            }
            let want_consumer = if next == start { consumer } else { next };
            assert_eq!(vs.consumer.value.load(Ordering::Relaxed), want_consumer);
            let snap = self.stats.snapshot();
            assert_eq!(snap.calls, self.calls, "call counters");
            assert_eq!(snap.cancelled, self.cancelled);
            assert_eq!(snap.lost_claims, 0);
            assert_eq!(snap.service.iter().sum::<u64>(), self.timed_calls);
            n
        }

        fn check_final(&self) {
            self.a.check_final();
            self.b.check_final();
            assert_eq!(self.a.levels(), self.b.levels(), "levels of A and B differ");
            let (a, b) = (self.a.block.snapshot(), self.b.block.snapshot());
            if a != b {
                let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
                panic!("the pools of A and B differ at byte {i} of the block");
            }
        }
    }

    impl Side {
        /// Counts what a request the ring served on this side did (the
        /// harness saw the reply only).
        fn tally_like(&mut self, head: u64, status: Status, words: &[u64; WORDS]) {
            if decode_head(head).map(|h| h.opcode) != Ok(Opcode::PteUpdate as u16) {
                return;
            }
            if status != Status::Ok {
                self.tally.refused += 1;
                if status == Status::UseExitPath {
                    self.tally.to_exit_path += 1;
                }
                return;
            }
            match shm_proto::op::PteKind::from_u64(words[0]) {
                Some(shm_proto::op::PteKind::Map) => self.tally.maps += 1,
                Some(shm_proto::op::PteKind::Change) => self.tally.changes += 1,
                Some(shm_proto::op::PteKind::Unmap) => self.tally.unmaps += 1,
                Some(shm_proto::op::PteKind::Noop) => {}
                None => panic!("PTE reply kind {:#x}", words[0]),
            }
        }
    }

    fn low16(head: u64) -> u16 {
        u16::try_from(head & 0xffff).unwrap_or(0)
    }

    /// Runs one fuzz input. Panics on a broken invariant.
    pub fn run(data: &[u8]) {
        let mut inp = Input(data);
        let mut vm = Vm::new(inp.u8());
        let mut commands = 0;
        while !inp.is_empty() && commands < MAX_COMMANDS {
            commands += 1;
            match inp.u8() % 8 {
                0 | 1 => {
                    let vcpu = inp.vcpu();
                    let head = inp.head();
                    let words = inp.words();
                    vm.direct(vcpu, head, &words);
                }
                2 => {
                    let delta = i64::from(i8::from_le_bytes([inp.u8()]));
                    let st = inp.u8();
                    let nibble = if st < 0x80 { SlotState::Posted as u64 } else { u64::from(st & 0xf) };
                    let ticket = vm.ring.expected().wrapping_add_signed(delta) & TICKET_MASK;
                    let body = Body { head: inp.head(), words: inp.words() };
                    vm.write_slot(slot_index(ticket), (ticket << 4) | nibble, &body);
                }
                3 => {
                    let slot = usize::from(inp.u8());
                    let state = inp.u64();
                    let body = Body { head: inp.head(), words: inp.words() };
                    vm.write_slot(slot, state, &body);
                }
                4 | 5 => {
                    vm.serve();
                }
                6 => {
                    let n = inp.u8() % 40 + 1;
                    let mut t = vm.ring.expected();
                    for _ in 0..n {
                        let body = Body { head: inp.head(), words: inp.words() };
                        vm.write_slot(slot_index(t), state_word(t, SlotState::Posted), &body);
                        t = next_ticket(t);
                    }
                }
                _ => {
                    let b = inp.u8();
                    vm.control.paused.store(b & 1 != 0, Ordering::Relaxed);
                    vm.timed = b & 2 != 0;
                    vm.ring.set_timed(vm.timed);
                }
            }
        }
        vm.control.paused.store(false, Ordering::Relaxed);
        for _ in 0..8 {
            if vm.serve() == 0 {
                break;
            }
        }
        vm.check_final();
    }
}
