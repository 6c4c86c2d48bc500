//! The vhost-user-blk bench's driver against a real backend,
//! qemu-storage-daemon: data written through one queue reads back through
//! it and another, lands in the image at the right offset, and the image's
//! own bytes read back; with and without EVENT_IDX; and a raw chain built by
//! hand completes as a typed one does. Skips (saying why) without
//! qemu-storage-daemon.

#[allow(dead_code)] // Shared helpers; this file uses skip() and hostile::wait_for().
mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use sidecore_vmm::bench::vhost_blk::{
    blk_header, qsd_argv, BackendProcess, BlkDriver, DriverOptions, RawDesc, Scratch, DESC_F_NEXT, DESC_F_WRITE,
    SECTOR, VIRTIO_BLK_S_OK,
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// qemu-storage-daemon with `queues` queues on a fresh 16 MiB image, or None (printed) when it is not installed.
fn qsd(queues: usize) -> Option<(Scratch, BackendProcess)> {
    if !sidecore_vmm::bench::vhost_blk::on_path("qemu-storage-daemon") {
        common::skip("qemu-storage-daemon is not installed (Debian: qemu-system-common)");
        return None;
    }
    let scratch = Scratch::new(16).expect("scratch image");
    let sock = scratch.dir.join("qsd.sock");
    let log = scratch.dir.join("qsd.stderr");
    let p = BackendProcess::spawn(&qsd_argv(&scratch.image, &sock, "threads", queues), &sock, None, &log, TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", sidecore_vmm::error_chain(&e)));
    Some((scratch, p))
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32).map(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed)).collect()
}

fn write_read_back(event_idx: bool) {
    let Some((scratch, p)) = qsd(2) else { return };
    let opts = DriverOptions { queues: 2, queue_size: 128, event_idx, ..DriverOptions::default() };
    let mut d = BlkDriver::connect(&p.socket, &opts).unwrap_or_else(|e| panic!("{}", sidecore_vmm::error_chain(&e)));
    assert_eq!(d.capacity_sectors() * SECTOR, 16 << 20);
    assert_eq!(d.event_idx(), event_idx);
    assert!(!d.read_only());

    // Through queue 0, read back through both queues.
    let sector = 1000 * 8;
    let mut data = pattern(7);
    d.transfer(0, true, sector, &mut data, TIMEOUT).expect("write");
    for q in 0..2 {
        let mut back = vec![0u8; 4096];
        let u = d.transfer(q, false, sector, &mut back, TIMEOUT).expect("read");
        assert_eq!(back, pattern(7), "queue {q}");
        // The data and the status byte.
        assert!(u.len >= 4097, "used len {}", u.len);
    }
    // It is in the image where the sector says.
    let mut f = std::fs::File::open(&scratch.image).expect("image");
    f.seek(SeekFrom::Start(sector * SECTOR)).expect("seek");
    let mut on_disk = vec![0u8; 4096];
    f.read_exact(&mut on_disk).expect("read image");
    assert_eq!(on_disk, pattern(7));

    // Bytes put in the image behind the backend's back read back (no cache in between: cache.direct=off
    // uses the page cache the file write went to).
    let mut f = std::fs::OpenOptions::new().write(true).open(&scratch.image).expect("image");
    f.seek(SeekFrom::Start(8 * SECTOR)).expect("seek");
    f.write_all(&pattern(99)).expect("write image");
    drop(f);
    let mut back = vec![0u8; 4096];
    d.transfer(1, false, 8, &mut back, TIMEOUT).expect("read");
    assert_eq!(back, pattern(99));

    // Each queue's first request needs a kick (avail_event starts at 0); the second may not,
    // since qemu-storage-daemon polls a queue for a while after it served one (with EVENT_IDX it
    // leaves avail_event behind while it polls, and under a slow CPU the read comes within that
    // window). Never more kicks than requests.
    for q in 0..2 {
        let k = d.kicks(q).unwrap();
        assert!((1..=2).contains(&k), "queue {q}: {k} kicks for 2 requests");
    }
    // Calls: wait (up to 2 s) for one per completion, then allow qemu-storage-daemon to have
    // folded the second into the first: in the AMD-V bed (TCG) it was seen sending one call for
    // queue 0's two completions with EVENT_IDX. At least one, never more than completions.
    let mut calls = [0u64; 2];
    common::hostile::wait_for(Duration::from_secs(2), || {
        for (q, c) in calls.iter_mut().enumerate() {
            *c += d.take_interrupts(q).unwrap();
        }
        calls == [2, 2]
    });
    for (q, c) in calls.iter().enumerate() {
        assert!((1..=2).contains(c), "queue {q}: {c} calls for 2 completions");
    }
}

#[test]
fn write_then_read_back_with_event_idx() {
    write_read_back(true);
}

#[test]
fn write_then_read_back_without_event_idx() {
    write_read_back(false);
}

#[test]
fn raw_chain_completes_like_a_typed_one() {
    let Some((_scratch, p)) = qsd(1) else { return };
    let mut d = BlkDriver::connect(&p.socket, &DriverOptions::default())
        .unwrap_or_else(|e| panic!("{}", sidecore_vmm::error_chain(&e)));
    let mut data = pattern(3);
    d.transfer(0, true, 64, &mut data, TIMEOUT).expect("write");
    // A read of the same block built by hand in scratch memory, head at descriptor 2.
    let (base, len) = d.scratch();
    assert!(len >= 8192);
    let (hdr, buf, status) = (base, base + 4096, base + 64);
    d.write_mem(hdr, &blk_header(0, 64)).unwrap();
    d.write_mem(status, &[0xff]).unwrap();
    let descs = [
        RawDesc { addr: buf, len: 4096, flags: DESC_F_WRITE | DESC_F_NEXT, next: 1 },
        RawDesc { addr: status, len: 1, flags: DESC_F_WRITE, next: 0 },
        RawDesc { addr: hdr, len: 16, flags: DESC_F_NEXT, next: 0 },
    ];
    d.submit_raw(0, &descs, 2).expect("submit");
    let u = d.wait_used(0, TIMEOUT).expect("poll").expect("no completion");
    assert_eq!(u.id, 2);
    let mut st = [0u8; 1];
    d.read_mem(status, &mut st).unwrap();
    assert_eq!(st[0], VIRTIO_BLK_S_OK);
    let mut back = vec![0u8; 4096];
    d.read_mem(buf, &mut back).unwrap();
    assert_eq!(back, pattern(3));
    // Out of the driver's memory is refused on our side.
    assert!(d.write_mem(d.memory_size() - 1, &[0, 0]).is_err());
}

#[test]
fn unsealed_memory_is_only_sent_when_asked() {
    let Some((_scratch, p)) = qsd(1) else { return };
    // qemu-storage-daemon takes unsealed memory; the option exists for backends that must not.
    let opts = DriverOptions { seal_memory: false, ..DriverOptions::default() };
    let mut d = BlkDriver::connect(&p.socket, &opts).unwrap_or_else(|e| panic!("{}", sidecore_vmm::error_chain(&e)));
    let mut data = pattern(5);
    d.transfer(0, true, 0, &mut data, TIMEOUT).expect("write");
}

/// The CLI end to end with small counts: the table, the JSON with qemu-storage-daemon's
/// series (and the sidecore daemon's, or why it is missing), the SVG.
#[test]
fn cli_writes_table_json_and_plot() {
    if !sidecore_vmm::bench::vhost_blk::on_path("qemu-storage-daemon") {
        common::skip("qemu-storage-daemon is not installed (Debian: qemu-system-common)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("sidecore-vub-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("r.json"), dir.join("r.svg"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidecore"))
        .args(["bench", "--vhost-user-blk", "--vhost-blk-requests", "300", "--vhost-blk-seconds", "1", "--json"])
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .expect("run sidecore");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("qd32 read IOPS"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["schema"], sidecore_vmm::bench::vhost_blk::SCHEMA);
    let backends = v["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    let qsd = &backends[1];
    assert_eq!(qsd["name"], "qemu-storage-daemon");
    let series = qsd["series"].as_array().unwrap_or_else(|| panic!("no series: {qsd}"));
    assert_eq!(series.len(), 4);
    assert_eq!(series[0]["requests"], 300);
    assert!(series[2]["iops"].as_f64().unwrap() > 0.0);
    assert!(backends[0]["series"].is_array() || backends[0]["error"].is_string(), "{}", backends[0]);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The sidecore daemon's own backend, from this build, on a fresh 16 MiB image.
fn sidecore_daemon() -> (Scratch, BackendProcess) {
    let scratch = Scratch::new(16).expect("scratch image");
    let sock = scratch.dir.join("ours.sock");
    let log = scratch.dir.join("ours.stderr");
    let argv = sidecore_vmm::bench::vhost_blk::sidecore_daemon_argv(
        std::path::Path::new(env!("CARGO_BIN_EXE_sidecore")),
        &scratch.dir,
        0,
        &scratch.image,
        &sock,
    );
    let p = BackendProcess::spawn(&argv, &sock, None, &log, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}", sidecore_vmm::error_chain(&e)));
    (scratch, p)
}

#[test]
fn sidecore_daemon_write_then_read_back() {
    let (scratch, p) = sidecore_daemon();
    let opts = DriverOptions { queues: 2, ..DriverOptions::default() };
    let mut d = BlkDriver::connect(&p.socket, &opts)
        .unwrap_or_else(|e| panic!("{}; daemon stderr: {}", sidecore_vmm::error_chain(&e), p.stderr()));
    assert_eq!(d.capacity_sectors() * SECTOR, 16 << 20);
    let mut data = pattern(11);
    d.transfer(1, true, 4096, &mut data, TIMEOUT).expect("write");
    let mut back = vec![0u8; 4096];
    d.transfer(0, false, 4096, &mut back, TIMEOUT).expect("read");
    assert_eq!(back, pattern(11));
    let mut f = std::fs::File::open(&scratch.image).expect("image");
    f.seek(SeekFrom::Start(4096 * SECTOR)).expect("seek");
    let mut on_disk = vec![0u8; 4096];
    f.read_exact(&mut on_disk).expect("read image");
    assert_eq!(on_disk, pattern(11));
}

#[test]
fn sidecore_daemon_refuses_unsealed_memory() {
    let (_scratch, p) = sidecore_daemon();
    let opts = DriverOptions { seal_memory: false, ..DriverOptions::default() };
    // The daemon acknowledges every message (REPLY_ACK), so the refusal is the memory table's.
    match BlkDriver::connect(&p.socket, &opts) {
        Err(e) => {
            let why = sidecore_vmm::error_chain(&e);
            assert!(why.contains("SET_MEM_TABLE"), "refused, but not at the memory table: {why}");
        }
        Ok(_) => panic!("the daemon took unsealed memory"),
    }
}
