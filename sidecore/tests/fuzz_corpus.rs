//! Replays the committed seed corpus of the `dispatch` fuzz target
//! (sidecore/fuzz/corpus/dispatch) through the same harness, so that
//! `cargo test` on stable keeps every input the fuzzer has found interesting
//! passing without cargo-fuzz.

include!("../fuzz/harness_dispatch.rs");

#[test]
fn dispatch_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dispatch");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("replaying {}", path.display());
        dispatch_harness::run(&data);
    }
    assert!(files.len() >= 5, "only {} corpus files in {}", files.len(), dir.display());
}

#[test]
fn empty_and_tiny_inputs_run() {
    for data in [&[][..], &[0], &[3, 0], &[0xff; 3]] {
        dispatch_harness::run(data);
    }
}
