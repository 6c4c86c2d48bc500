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
    git_commit(&manifest_dir);
}

/// The commit this build comes from (`SIDECORE_GIT_COMMIT`, with `-dirty`
/// when the tree has changes), for `hello`, `build_info` and bench results;
/// nothing when git or the repository is missing (a source tarball).
fn git_commit(dir: &std::path::Path) {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if let Some(head) = git(&["rev-parse", "--git-dir"]) {
        let head = dir.join(head);
        println!("cargo:rerun-if-changed={}", head.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", head.join("index").display());
        // A commit moves the branch's ref, not HEAD (a worktree's refs live
        // in the common directory).
        if let (Some(r), Some(common)) = (git(&["symbolic-ref", "-q", "HEAD"]), git(&["rev-parse", "--git-common-dir"]))
        {
            println!("cargo:rerun-if-changed={}", dir.join(common).join(r).display());
        }
    }
    if let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) {
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        println!("cargo:rustc-env=SIDECORE_GIT_COMMIT={commit}{}", if dirty { "-dirty" } else { "" });
    }
}
