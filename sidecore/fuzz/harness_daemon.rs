// The `daemon_request` fuzz harness: the daemon's control-message parser
// (JSON-RPC 2.0, `sidecore_vmm::daemon::protocol::parse_message`) and the validation of
// an attach request against the sizes of the memfds that came with it
// (`validate_attach`).
//
// Shared, through `include!`, by the cargo-fuzz target
// (sidecore/fuzz/fuzz_targets/daemon_request.rs) and the corpus replay test
// that `cargo test` runs (tests/fuzz_corpus.rs). It uses only std,
// `serde_json`, `shm_proto`, `sidecore_core` and `sidecore_vmm`.
//
// The input is the message itself (a corpus file is one JSON-RPC request
// or batch, as a VMM writes it on the socket). The memfd sizes are derived from the input:
// the sizes the request needs, those off by a byte or a page, and a few
// from a hash of the input bytes. For each pair, a request that validates
// must satisfy everything the daemon relies on afterwards; when its ranges
// are small, the harness goes on as the daemon's attach does (shared
// region, host-shared block, CPUID tables, page-table service, one ring per
// vCPU) over heap blocks, and each of those must accept it.

mod daemon_harness {
    use std::any::Any;
    use std::ptr::NonNull;
    use std::sync::Arc;

    use shm_proto::layout::MAX_VCPUS;
    use shm_proto::op::{encode_head, Opcode, Status, WORDS};
    use shm_proto::ring::{region_size, Body};

    use sidecore_core::hostmem::HostShared;
    use sidecore_core::pte::{PteLayout, PteService, Visibility};
    use sidecore_core::{RingRef, Services, SharedRegion, VmControl, VmStats};
    use sidecore_vmm::daemon::protocol::{parse_message, Message, Method};
    use sidecore_vmm::daemon::{validate_attach, AttachRequest};

    /// Largest shared region / pool the harness allocates to go on as the
    /// daemon does (larger ones are only validated).
    const MAX_BLOCK: u64 = 1 << 20;

    /// A zeroed, page-aligned heap block.
    struct Block {
        ptr: NonNull<u8>,
        layout: std::alloc::Layout,
    }

    // SAFETY: plain heap memory owned by this struct; shared only through
    // the sidecore types, which access it atomically.
    unsafe impl Send for Block {}
    // SAFETY: as above.
    unsafe impl Sync for Block {}

    impl Drop for Block {
        fn drop(&mut self) {
            // SAFETY: allocated in Block::new with this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
        }
    }

    impl Block {
        fn new(len: usize) -> Arc<Block> {
            let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).expect("block layout");
            // SAFETY: the layout has a non-zero size.
            let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).expect("block allocation");
            Arc::new(Block { ptr, layout })
        }
    }

    fn fnv1a(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
    }

    /// Runs one fuzz input. Panics on a broken invariant.
    pub fn run(data: &[u8]) {
        let calls = match parse_message(data) {
            Message::One(c) => vec![c],
            Message::Batch(cs) => cs,
        };
        for call in calls {
            match call {
                Ok(c) => {
                    if let Method::Attach(a) = c.method {
                        attach_params(&a);
                    }
                }
                // A bad request is answered under its own id, or a null one.
                Err(bad) => assert!(bad.id.as_ref().is_none_or(|id| id.is_null() || id.is_number() || id.is_string())),
            }
        }
    }

    fn attach_params(a: &AttachRequest) {
        // What the daemon parsed, it can write back and parse again alike.
        let text = serde_json::to_string(a).expect("parsed params serialize");
        let again = serde_json::from_str::<AttachRequest>(&text).expect("serialized params parse");
        assert_eq!(serde_json::to_string(&again).expect("serializes"), text, "JSON round trip");
        let data = text.as_bytes();
        let h = fnv1a(data);
        let pages = usize::try_from(a.pool_size / 4096).unwrap_or(usize::MAX);
        let host_need = u64::try_from(HostShared::size(pages.min(1 << 40))).unwrap_or(u64::MAX);
        let guests = [a.ram_size, a.ram_size.wrapping_sub(1), a.ram_size.saturating_add(4096), h, h >> 20];
        let hosts = [host_need, host_need.wrapping_sub(1), host_need.saturating_add(4096), h.rotate_left(32) >> 40];
        let mut validated = None;
        for guest_size in guests {
            for host_size in hosts {
                if let Some(pages) = check(a, guest_size, host_size) {
                    validated = Some(pages);
                }
            }
        }
        if let Some(pool_pages) = validated {
            if a.shared_size <= MAX_BLOCK && a.pool_size <= MAX_BLOCK {
                attach_like_the_daemon(a, pool_pages);
            }
        }
    }

    /// Validates `a` against these memfd sizes; if it passes, checks what
    /// validation promises and returns the pool's page count.
    fn check(a: &AttachRequest, guest_size: u64, host_size: u64) -> Option<usize> {
        let (pool_pages, host_len) = validate_attach(a, guest_size, host_size).ok()?;
        // What validate_attach promises (the daemon maps and indexes by it).
        assert!((1..=MAX_VCPUS).contains(&a.vcpus), "vcpus {}", a.vcpus);
        assert_eq!(u32::try_from(a.cpuid.len()).ok(), Some(a.vcpus));
        assert!(a.cpuid.iter().all(|t| t.len() <= 4096));
        assert!(a.ram_size <= guest_size);
        let inside = |gpa: u64, len: u64| {
            len > 0 && gpa.is_multiple_of(4096) && gpa.checked_add(len).is_some_and(|e| e <= a.ram_size)
        };
        assert!(inside(a.shared_gpa, a.shared_size), "shared region {:#x}+{:#x}", a.shared_gpa, a.shared_size);
        assert!(a.shared_size >= region_size(a.vcpus));
        assert!(
            inside(a.pool_gpa, a.pool_size) && a.pool_size.is_multiple_of(4096),
            "pool {:#x}+{:#x}",
            a.pool_gpa,
            a.pool_size
        );
        assert!(
            a.shared_gpa + a.shared_size <= a.pool_gpa || a.pool_gpa + a.pool_size <= a.shared_gpa,
            "shared region and pool overlap"
        );
        assert!(a.image_gpa <= a.image_end && a.image_end <= a.ram_size && a.free_gpa <= a.ram_size);
        assert_eq!(u64::try_from(pool_pages).ok(), Some(a.pool_size / 4096));
        assert_eq!(host_len, HostShared::size(pool_pages));
        assert!(u64::try_from(host_len).is_ok_and(|l| l <= host_size));
        Some(pool_pages)
    }

    /// What the daemon's attach builds from a validated request, over heap
    /// blocks instead of the memfd mappings: each step must accept it.
    fn attach_like_the_daemon(a: &AttachRequest, pool_pages: usize) {
        let shared_len = usize::try_from(a.shared_size).expect("small shared region");
        let pool_len = usize::try_from(a.pool_size).expect("small pool");
        let shared = Block::new(shared_len);
        let pool = Block::new(pool_len);
        let sp = shared.ptr;
        // SAFETY: the block is shared_len bytes, page aligned, and lives as
        // long as its owner, which the region holds.
        let region = unsafe { SharedRegion::new(sp, shared_len, a.vcpus, shared) }.expect("validated shared region");
        let host = HostShared::alloc(pool_pages).expect("host-shared block");
        let tables = sidecore_core::cpuid::tables_from_words(&a.cpuid);
        let mut services = Services::new(tables);
        let layout = PteLayout {
            ram_size: a.ram_size,
            pool_gpa: a.pool_gpa,
            pool_size: a.pool_size,
            image_gpa: a.image_gpa,
            image_end: a.image_end,
            free_gpa: a.free_gpa,
        };
        let visibility = if a.backend == "pvm" { Visibility::ExitPath } else { Visibility::GuestFlush };
        let pp = pool.ptr;
        let owner: Arc<dyn Any + Send + Sync> = pool;
        // SAFETY: the block is pool_len = pool_size bytes and lives as long
        // as its owner, which the service holds.
        let pte = unsafe { PteService::new(layout, host, pp, owner, visibility) }.expect("validated page-table pool");
        services.set_pte(pte);
        assert_eq!(services.vcpus(), a.cpuid.len());
        let services = Arc::new(services);
        let region = Arc::new(region);
        let stats = Arc::new(VmStats::default());
        let control = Arc::new(VmControl::default());
        for v in 0..a.vcpus {
            let mut ring = RingRef::with_control(region.clone(), v, services.clone(), stats.clone(), control.clone())
                .expect("a ring for every validated vCPU");
            // One call of each kind through the ring, answered from the
            // request's own tables and pool.
            let vs = region.vcpu(v).expect("vCPU block");
            let calls: [(Opcode, [u64; WORDS]); 3] = [
                (Opcode::Null, [7, 0, 0, 0, 0, 0]),
                (Opcode::Cpuid, [0, 0, 0, 0, 0, 0]),
                (Opcode::PteUpdate, [a.pool_gpa, 0, 0, 0, 0, 0]),
            ];
            for (t, (op, words)) in (0u64..).zip(calls) {
                let slot = &vs.slots[usize::try_from(t).expect("small")];
                slot.post(t, &Body { head: encode_head(op as u16, 0), words });
                assert_eq!(ring.serve(), 1);
                let reply = slot.poll_reply(t).expect("a reply");
                let status = shm_proto::op::decode_status(reply.head).expect("a status");
                match op {
                    Opcode::Null => assert_eq!((status, reply.words[0]), (Status::Ok, 7)),
                    Opcode::Cpuid => assert_eq!(status, Status::Ok),
                    // Every pool page is free (level 0): not a table.
                    Opcode::PteUpdate => assert_eq!(status, Status::BadArgument),
                }
            }
        }
    }
}
