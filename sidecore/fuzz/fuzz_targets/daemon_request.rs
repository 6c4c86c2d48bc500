//! Fuzz target: the daemon's control-message parser and attach validation.
//! The harness is shared with the replay test `tests/fuzz_corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../harness_daemon.rs");

fuzz_target!(|data: &[u8]| daemon_harness::run(data));
