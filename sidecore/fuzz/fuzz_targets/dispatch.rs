//! Fuzz target: `Services::dispatch` and `RingRef::serve` on hostile
//! requests and slot contents. The harness (input format, invariants) is
//! shared with the replay test `sidecore/tests/fuzz_corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../harness_dispatch.rs");

fuzz_target!(|data: &[u8]| dispatch_harness::run(data));
