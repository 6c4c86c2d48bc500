//! Replays the committed seed corpus of the `dispatch` fuzz target
//! (sidecore/fuzz/corpus/dispatch) through the same harness, so that
//! `cargo test` on stable keeps every input the fuzzer has found interesting
//! passing without cargo-fuzz.

include!("../fuzz/harness_dispatch.rs");
include!("../fuzz/replay.rs");

#[test]
fn dispatch_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dispatch");
    replay_corpus(&dir, dispatch_harness::run);
}

#[test]
fn empty_and_tiny_inputs_run() {
    for data in [&[][..], &[0], &[3, 0], &[0xff; 3]] {
        dispatch_harness::run(data);
    }
}
