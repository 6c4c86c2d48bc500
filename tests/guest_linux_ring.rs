//! The Linux client's slot protocol (guest-linux/sidecall_ring.h, the C the
//! kernel module runs) against a model sidecore in userspace that claims
//! late, answers late, pauses, hangs and vanishes while the guest scribbles
//! on its ring (guest-linux/tests/ring-test.c): every counter call must be
//! carried out exactly once. Built here with the C compiler that links the
//! project (`cc`), so it runs wherever `cargo test` does.

#[allow(dead_code)] // Shared helpers; this file uses only skip().
mod common;

#[test]
fn the_linux_clients_ring_protocol_runs_every_call_exactly_once() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("guest-linux/tests/ring-test.c");
    let out = std::env::temp_dir().join(format!("sidecore-ring-test-{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = std::process::Command::new(&cc)
        .args(["-O2", "-pthread", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-o"])
        .arg(&out)
        .arg(&src)
        .current_dir(root.join("guest-linux"))
        .output();
    let built = match built {
        Ok(b) => b,
        Err(e) => {
            common::skip(&format!("no C compiler `{cc}` ({e}): cannot build guest-linux/tests/ring-test.c"));
            return;
        }
    };
    assert!(built.status.success(), "{cc} failed:\n{}", String::from_utf8_lossy(&built.stderr));
    let run = std::process::Command::new(&out).output().expect("run ring-test");
    let _ = std::fs::remove_file(&out);
    let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "ring-test failed:\n{text}");
}
