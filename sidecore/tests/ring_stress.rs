//! Two threads, one ring, 10^6 calls: a producer thread posts each call,
//! a pinned sidecore answers; every reply must match its request, and the
//! counters must account for every call exactly once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use shm_proto::op::{encode_head, Opcode, Status, WORDS};
use shm_proto::ring::{next_ticket, slot_index, Body};
use sidecore_core::cpuid::{CpuidEntry, CpuidTable};
use sidecore_core::{RingRef, Services, SharedRegion, Sidecore, SidecoreConfig, VmStats};

const CALLS: u64 = 1_000_000;

#[test]
fn million_calls_through_one_ring() {
    let region = SharedRegion::alloc(1).expect("region");
    let table =
        CpuidTable::new(vec![CpuidEntry { function: 0, eax: 0x10, ebx: 1, ecx: 2, edx: 3, ..Default::default() }]);
    let mut services = Services::new(vec![table]);
    services
        .register(0x100, Box::new(|_, w: &[u64; WORDS]| Ok([w[0].wrapping_mul(31) ^ w[1], 0, 0, 0, 0, 0])))
        .expect("register");
    let stats = Arc::new(VmStats::default());
    let ring = RingRef::new(region.clone(), 0, Arc::new(services), stats.clone()).expect("ring");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sc = Sidecore::spawn(
        SidecoreConfig { cpu: 0, name: "sidecore-test".into(), idle_park: None, on_start: None },
        vec![ring],
    )
    .expect("sidecore");
    if cpus > 1 {
        sidecore_core::pin::pin_current_thread(cpus - 1).expect("pin producer");
    }
    let vs = region.vcpu(0).expect("vcpu block");
    let mut t = 0u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..CALLS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (body, want): (Body, [u64; 4]) = match i % 3 {
            0 => (Body { head: encode_head(Opcode::Null as u16, 0), words: [x, 0, 0, 0, 0, 0] }, [x, 0, 0, 0]),
            1 => (Body { head: encode_head(0x100, 0), words: [x, i, 0, 0, 0, 0] }, [x.wrapping_mul(31) ^ i, 0, 0, 0]),
            _ => {
                (Body { head: encode_head(Opcode::Cpuid as u16, 0), words: [0, i & 0xff, 0, 0, 0, 0] }, [0x10, 1, 2, 3])
            }
        };
        let slot = &vs.slots[slot_index(t)];
        slot.post(t, &body);
        let reply = loop {
            if let Some(r) = slot.poll_reply(t) {
                break r;
            }
            std::hint::spin_loop();
        };
        assert_eq!(reply.head, Status::Ok as u64, "call {i}");
        assert_eq!(reply.words[..4], want, "call {i}");
        t = next_ticket(t);
    }
    let rings = sc.stop().expect("stop").rings;
    assert_eq!(rings.len(), 1);
    assert_eq!(rings[0].expected(), CALLS);
    assert_eq!(vs.consumer.value.load(Ordering::Relaxed), CALLS);
    let snap = stats.snapshot();
    assert_eq!(snap.total(), CALLS);
    assert_eq!(snap.rejected(), 0);
}
