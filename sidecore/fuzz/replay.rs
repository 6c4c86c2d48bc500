// Replays every file of a committed fuzz corpus through a harness. Included
// (`include!`) by the stable replay tests of both crates; not built by
// cargo-fuzz.

/// Runs `run` on each file of `dir`, in name order; at least 5 must exist.
fn replay_corpus(dir: &std::path::Path, run: fn(&[u8])) {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("replaying {}", path.display());
        run(&data);
    }
    assert!(files.len() >= 5, "only {} corpus files in {}", files.len(), dir.display());
}
