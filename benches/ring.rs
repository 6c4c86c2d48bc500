//! Host-side microbenchmarks of the ring protocol and the dispatcher (no
//! guest, no second thread): what one request costs the sidecore itself.
//! Guest-side latency lives in `sidecore bench`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use shm_proto::op::{encode_head, Opcode};
use shm_proto::ring::{next_ticket, slot_index, Body};
use sidecore_core::cpuid::{CpuidEntry, CpuidTable};
use sidecore_core::service::CallCtx;
use sidecore_core::{RingRef, Services, SharedRegion, VmStats};

fn services() -> Arc<Services> {
    let entries =
        (0..32u32).map(|f| CpuidEntry { function: f, eax: f, ebx: 1, ecx: 2, edx: 3, ..Default::default() }).collect();
    Arc::new(Services::new(vec![CpuidTable::new(entries)]))
}

fn bench(c: &mut Criterion) {
    let s = services();
    let ctx = CallCtx { vcpu: 0 };
    c.bench_function("dispatch null", |b| {
        b.iter(|| s.dispatch(&ctx, black_box(encode_head(Opcode::Null as u16, 0)), &[1, 0, 0, 0, 0, 0]))
    });
    c.bench_function("dispatch cpuid leaf 0x1f", |b| {
        b.iter(|| s.dispatch(&ctx, black_box(encode_head(Opcode::Cpuid as u16, 0)), &[0x1f, 0, 0, 0, 0, 0]))
    });

    let region = SharedRegion::alloc(1).expect("region");
    let mut ring = RingRef::new(region.clone(), 0, s.clone(), Arc::new(VmStats::default())).expect("ring");
    let vs = region.vcpu(0).expect("block");
    let mut t = 0u64;
    let req = Body { head: encode_head(Opcode::Null as u16, 0), words: [7, 0, 0, 0, 0, 0] };
    c.bench_function("post + serve + reply, one thread", |b| {
        b.iter(|| {
            let slot = &vs.slots[slot_index(t)];
            slot.post(t, &req);
            ring.serve();
            let r = slot.poll_reply(t);
            t = next_ticket(t);
            black_box(r)
        })
    });
    let mut idle_rings: Vec<RingRef> = (0..64)
        .map(|_| {
            RingRef::new(SharedRegion::alloc(1).expect("region"), 0, s.clone(), Arc::new(VmStats::default()))
                .expect("ring")
        })
        .collect();
    c.bench_function("sweep 64 idle rings", |b| b.iter(|| idle_rings.iter_mut().map(RingRef::serve).sum::<usize>()));
}

criterion_group!(benches, bench);
criterion_main!(benches);
