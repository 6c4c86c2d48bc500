//! Replays the committed seed corpus of the `daemon_request` fuzz target
//! (sidecore/fuzz/corpus/daemon_request) through the same harness, so that
//! `cargo test` on stable keeps every input the fuzzer has found interesting
//! passing without cargo-fuzz.

include!("../sidecore/fuzz/harness_daemon.rs");
include!("../sidecore/fuzz/replay.rs");

#[test]
fn daemon_request_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecore/fuzz/corpus/daemon_request");
    replay_corpus(&dir, daemon_harness::run);
}
