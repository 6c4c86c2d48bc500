//! A hostile frontend against the daemon's vhost-user-blk backend: chains
//! that point outside guest memory, are oversized, run past the disk,
//! loop, go through a bad indirect table, or have no status byte; an avail
//! index far ahead. Each gets IOERR (or, with no status byte to write,
//! nothing), the daemon counts it, and the daemon serves the next good
//! request — on the same queue, or on the other one after a queue broke.

use std::time::Duration;

use sidecore_vmm::bench::vhost_blk::{
    blk_header, sidecore_daemon_argv, BackendProcess, BlkDriver, DriverOptions, RawDesc, Scratch, DESC_F_NEXT,
    DESC_F_WRITE, SECTOR, VIRTIO_BLK_S_OK,
};

const TIMEOUT: Duration = Duration::from_secs(5);
const DESC_F_INDIRECT: u16 = 4;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

struct Daemon {
    scratch: Scratch,
    process: BackendProcess,
}

impl Daemon {
    fn start() -> Daemon {
        let scratch = Scratch::new(16).expect("scratch image");
        let sock = scratch.dir.join("ours.sock");
        let log = scratch.dir.join("ours.stderr");
        let argv = sidecore_daemon_argv(
            std::path::Path::new(env!("CARGO_BIN_EXE_sidecore")),
            &scratch.dir,
            0,
            &scratch.image,
            &sock,
        );
        let process = BackendProcess::spawn(&argv, &sock, None, &log, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{}", sidecore_vmm::error_chain(&e)));
        Daemon { scratch, process }
    }

    fn driver(&self, queues: usize) -> BlkDriver {
        let opts = DriverOptions { queues, ..DriverOptions::default() };
        BlkDriver::connect(&self.process.socket, &opts)
            .unwrap_or_else(|e| panic!("{}; daemon stderr: {}", sidecore_vmm::error_chain(&e), self.process.stderr()))
    }

    /// The device's queue counters: (bad chains, broken, requests) summed.
    fn counters(&self) -> (u64, u64, u64) {
        let r = sidecore_vmm::daemon::query_status(&self.scratch.dir.join("ctl.sock"))
            .unwrap_or_else(|e| panic!("status: {e}; daemon stderr: {}", self.process.stderr()));
        let d = r.vhost_user_blk.first().expect("one device in status");
        let s = |f: fn(&sidecore_vmm::daemon::BlkQueueStatus) -> u64| d.queues.iter().map(f).sum();
        (s(|q| q.bad_chains), s(|q| q.broken), s(|q| q.requests))
    }
}

/// Submits `descs` (head at `head`) on queue 0 with the status byte at
/// `status` preset to 0xff; returns (used len, status byte).
fn raw(d: &mut BlkDriver, descs: &[RawDesc], head: u16, status: u64, daemon: &Daemon) -> (u32, u8) {
    d.write_mem(status, &[0xff]).expect("status preset");
    d.submit_raw(0, descs, head).expect("submit");
    let u = d
        .wait_used(0, TIMEOUT)
        .expect("poll")
        .unwrap_or_else(|| panic!("no completion for a bad chain: {}", daemon.process.stderr()));
    assert_eq!(u32::from(head), u.id, "the completion names the chain's head");
    let mut st = [0u8; 1];
    d.read_mem(status, &mut st).expect("status");
    (u.len, st[0])
}

fn good_round_trip(d: &mut BlkDriver, q: usize, seed: u8) {
    let mut data: Vec<u8> = (0..4096u32).map(|i| i.to_le_bytes()[0] ^ seed).collect();
    let want = data.clone();
    d.transfer(q, true, 128, &mut data, TIMEOUT).expect("a good write after the bad chains");
    let mut back = vec![0u8; 4096];
    d.transfer(q, false, 128, &mut back, TIMEOUT).expect("a good read after the bad chains");
    assert_eq!(back, want, "the daemon serves good requests correctly after bad ones");
}

#[test]
fn bad_chains_get_ioerr_and_counters_and_the_daemon_serves_on() {
    let daemon = Daemon::start();
    let mut d = daemon.driver(1);
    let (base, len) = d.scratch();
    assert!(len >= 64 * 1024);
    let mem = d.memory_size();
    let (hdr, buf, status) = (base, base + 8192, base + 64);
    let w = DESC_F_WRITE;
    let n = DESC_F_NEXT;
    let read_hdr = |d: &mut BlkDriver, sector: u64| d.write_mem(hdr, &blk_header(0, sector)).expect("header");

    // 1. A data buffer outside guest memory.
    read_hdr(&mut d, 0);
    let outside = [
        RawDesc { addr: hdr, len: 16, flags: n, next: 1 },
        RawDesc { addr: mem + (1 << 20), len: 4096, flags: w | n, next: 2 },
        RawDesc { addr: status, len: 1, flags: w, next: 0 },
    ];
    assert_eq!(raw(&mut d, &outside, 0, status, &daemon), (1, IOERR), "buffer outside memory");
    // 2. One that starts inside and runs off the end.
    let straddle = [
        RawDesc { addr: hdr, len: 16, flags: n, next: 1 },
        RawDesc { addr: mem - 512, len: 4096, flags: w | n, next: 2 },
        RawDesc { addr: status, len: 1, flags: w, next: 0 },
    ];
    assert_eq!(raw(&mut d, &straddle, 0, status, &daemon), (1, IOERR), "buffer across the end of memory");
    // 3. Oversized (over size_max, 1 MiB).
    let big = [
        RawDesc { addr: hdr, len: 16, flags: n, next: 1 },
        RawDesc { addr: buf, len: 2 << 20, flags: w | n, next: 2 },
        RawDesc { addr: status, len: 1, flags: w, next: 0 },
    ];
    assert_eq!(raw(&mut d, &big, 0, status, &daemon), (1, IOERR), "oversized buffer");
    // 4. Past the end of the disk, and a sector number that would wrap.
    for sector in [d.capacity_sectors() - 1, u64::MAX - 1] {
        read_hdr(&mut d, sector);
        let past = [
            RawDesc { addr: hdr, len: 16, flags: n, next: 1 },
            RawDesc { addr: buf, len: 4096, flags: w | n, next: 2 },
            RawDesc { addr: status, len: 1, flags: w, next: 0 },
        ];
        assert_eq!(raw(&mut d, &past, 0, status, &daemon), (1, IOERR), "sector {sector}");
    }
    // 5. A read whose buffer is device-readable (wrong direction), and an unknown type.
    read_hdr(&mut d, 0);
    let wrong = [
        RawDesc { addr: hdr, len: 16, flags: n, next: 1 },
        RawDesc { addr: buf, len: 4096, flags: n, next: 2 },
        RawDesc { addr: status, len: 1, flags: w, next: 0 },
    ];
    assert_eq!(raw(&mut d, &wrong, 0, status, &daemon), (1, IOERR), "wrong direction");
    d.write_mem(hdr, &blk_header(77, 0)).expect("header");
    let unknown =
        [RawDesc { addr: hdr, len: 16, flags: n, next: 1 }, RawDesc { addr: status, len: 1, flags: w, next: 0 }];
    assert_eq!(raw(&mut d, &unknown, 0, status, &daemon), (1, UNSUPP), "unknown request type");
    // 6. A loop: nothing to answer, handed back with nothing written.
    read_hdr(&mut d, 0);
    let looping = [
        RawDesc { addr: hdr, len: 16, flags: n, next: 1 },
        RawDesc { addr: buf, len: 512, flags: w | n, next: 2 },
        RawDesc { addr: status, len: 1, flags: w | n, next: 1 },
    ];
    assert_eq!(raw(&mut d, &looping, 0, status, &daemon), (0, 0xff), "looping chain");
    // 7. A next index outside the table.
    let off_table =
        [RawDesc { addr: hdr, len: 16, flags: n, next: 9999 }, RawDesc { addr: status, len: 1, flags: w, next: 0 }];
    assert_eq!(raw(&mut d, &off_table, 0, status, &daemon), (0, 0xff), "next outside the table");
    // 8. An indirect table outside memory, and one whose entries loop.
    let ind_out = [RawDesc { addr: mem + 4096, len: 48, flags: DESC_F_INDIRECT, next: 0 }];
    assert_eq!(raw(&mut d, &ind_out, 0, status, &daemon), (0, 0xff), "indirect table outside memory");
    let table = base + 16384;
    let entries =
        [RawDesc { addr: hdr, len: 16, flags: n, next: 1 }, RawDesc { addr: buf, len: 512, flags: w | n, next: 0 }];
    for (i, e) in entries.iter().enumerate() {
        d.write_mem(table + 16 * i as u64, &sidecore_vmm::bench::vhost_blk::encode_desc(e)).expect("table");
    }
    let ind_loop = [RawDesc { addr: table, len: 32, flags: DESC_F_INDIRECT, next: 0 }];
    assert_eq!(raw(&mut d, &ind_loop, 0, status, &daemon), (0, 0xff), "looping indirect table");
    // 9. The status byte outside memory.
    let status_out =
        [RawDesc { addr: hdr, len: 16, flags: n, next: 1 }, RawDesc { addr: mem + 100, len: 1, flags: w, next: 0 }];
    assert_eq!(raw(&mut d, &status_out, 0, status, &daemon), (0, 0xff), "status outside memory");

    let (bad, broken, _) = daemon.counters();
    assert_eq!(bad, 12, "every bad chain counted once");
    assert_eq!(broken, 0);
    // A good request still works, on the same queue, and the data is right.
    good_round_trip(&mut d, 0, 0x3c);
    let mut st = [0u8; 1];
    d.read_mem(d.slot(0, 0).expect("slot").status, &mut st).expect("status");
    assert_eq!(st[0], VIRTIO_BLK_S_OK);
}

#[test]
fn an_avail_index_far_ahead_stops_only_that_queue() {
    let daemon = Daemon::start();
    let mut d = daemon.driver(2);
    good_round_trip(&mut d, 0, 1);
    // 1000 entries "available" on a ring of 256: impossible.
    let idx = d.used_idx(0).expect("used idx").wrapping_add(1000);
    d.publish_avail_idx(0, idx).expect("publish");
    d.kick(0).expect("kick");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while daemon.counters().1 == 0 {
        assert!(std::time::Instant::now() < deadline, "the queue was not stopped: {}", daemon.process.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The other queue, and the daemon, go on.
    good_round_trip(&mut d, 1, 2);
    let (_, broken, requests) = daemon.counters();
    assert_eq!(broken, 1);
    assert!(requests >= 4, "{requests} requests");
    assert_eq!(d.capacity_sectors() * SECTOR, 16 << 20, "the device is the same size after the broken queue");
}

#[test]
fn a_frontend_that_vanishes_mid_io_leaves_the_daemon_serving_the_next() {
    let daemon = Daemon::start();
    {
        let mut d = daemon.driver(1);
        // Requests made available and the connection dropped at once.
        for s in 0..8 {
            let head = d.prepare(0, s, false, s as u64 * 8, 4096).expect("prepare");
            d.make_available(0, head).expect("avail");
        }
        d.kick(0).expect("kick");
    }
    // The next VMM connects and is served.
    let mut d = daemon.driver(1);
    good_round_trip(&mut d, 0, 9);
}
