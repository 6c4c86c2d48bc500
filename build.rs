//! Builds the guest-agent and bundles it into the `sidecore` binary, so that
//! `cargo run --release -- run` works on a fresh clone.
//!
//! A binary crate cannot be a dependency, so this runs a nested
//! `cargo build --release -p guest-agent` with its own target directory (the
//! outer build holds the lock on the usual one) and hands the ELF's path to
//! the VMM through `SIDECORE_GUEST_ELF`.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for dir in [
        "guest-agent/src",
        "guest-agent/build.rs",
        "guest-agent/guest.ld",
        "guest-agent/Cargo.toml",
        "shm-proto/src",
        "shm-proto/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={dir}");
    }
    let target_dir = out_dir.join("guest");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&manifest_dir)
        .args(["build", "--release", "--offline", "-p", "guest-agent", "--target-dir"])
        .arg(&target_dir)
        // Flags meant for the host build (coverage, sanitizers) must not
        // reach the freestanding guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        // `cargo clippy` wraps rustc; the nested build is not what is linted.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CLIPPY_ARGS");
    if let Ok(rustc) = std::env::var("RUSTC") {
        cmd.env("RUSTC", rustc);
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cargo} to build the guest-agent: {e}"));
    assert!(
        status.success(),
        "building the guest-agent failed ({status}); run `cargo build --release -p guest-agent` to see why"
    );
    let elf = target_dir.join("release").join("guest-agent");
    println!("cargo:rustc-env=SIDECORE_GUEST_ELF={}", elf.display());
    println!("cargo:rustc-env=SIDECORE_GIT_COMMIT={}", git_commit(&manifest_dir));
}

/// The checkout's commit for bench provenance: `git rev-parse --short HEAD`,
/// `-dirty` when tracked files differ from it, `unknown` outside a git
/// checkout (a source tarball). Cargo reruns this when HEAD, the branch it
/// names or the index moves, or when `src` changes (so `-dirty` follows
/// edits to the VMM).
fn git_commit(dir: &std::path::Path) -> String {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").current_dir(dir).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]).filter(|c| !c.is_empty()) else {
        return "unknown".into();
    };
    let mut watch = vec!["HEAD".to_string(), "index".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]).filter(|b| !b.is_empty()) {
        watch.push(branch);
    }
    for name in watch {
        // A path that does not exist would rerun this on every build.
        let path = git(&["rev-parse", "--path-format=absolute", "--git-path", &name]);
        if let Some(p) = path.filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-changed=src");
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}
