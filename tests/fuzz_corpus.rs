//! Replays the committed seed corpus of the `daemon_request` fuzz target
//! (sidecore/fuzz/corpus/daemon_request) through the same harness, so that
//! `cargo test` on stable keeps every input the fuzzer has found interesting
//! passing without cargo-fuzz.

include!("../sidecore/fuzz/harness_daemon.rs");

#[test]
fn daemon_request_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecore/fuzz/corpus/daemon_request");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("replaying {}", path.display());
        daemon_harness::run(&data);
    }
    assert!(files.len() >= 5, "only {} corpus files in {}", files.len(), dir.display());
}
