//! The daemon against a hostile VMM: memory that is not a sealed memfd,
//! fds that are not what they claim, wrong fd counts, oversized, malformed,
//! pipelined and half-sent messages, late attach failures, floods,
//! disconnects mid-attach, a filled irqfd. After each the daemon must be
//! alive, list no VM it should not, and hold no fd, mapping or thread it
//! should not; a well-behaved VM next to it passes its selftest.
//!
//! The raw client needs no KVM (the daemon maps memfds; no guest runs);
//! the neighbour VM does.

mod common;
use common::daemon::{socket, start_daemon};
use common::hostile::*;
use common::kvm_available;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A JSON-RPC error reply (the first of a batch's) saying `needle`.
fn refused(r: &str, needle: &str) {
    let v: serde_json::Value = serde_json::from_str(r).unwrap_or_else(|e| panic!("reply {r:?} is not JSON: {e}"));
    let v = if v.is_array() { v[0].clone() } else { v };
    assert_eq!(v["jsonrpc"], "2.0", "not a JSON-RPC reply: {r}");
    assert!(v["error"]["code"].is_i64(), "expected an error, got {r}");
    let e = v["error"]["message"].as_str().unwrap_or_default();
    assert!(e.contains(needle), "error {e:?} does not say {needle:?}");
}

fn vm_count(sock: &Path) -> usize {
    status(sock)["vms"].as_array().map_or(usize::MAX, Vec::len)
}

fn rings(sock: &Path) -> u64 {
    status(sock)["sidecores"].as_array().map_or(u64::MAX, |c| c.iter().filter_map(|c| c["rings"].as_u64()).sum())
}

/// Waits until the daemon's fds, memfd mappings and threads are back to
/// `base` (within 15 s); panics with the figures otherwise.
fn back_to(pid: u32, base: (usize, usize, usize), what: &str) {
    let mut now = footprint(pid);
    let ok = wait_for(Duration::from_secs(15), || {
        now = footprint(pid);
        now.0 <= base.0 && now.1 <= base.1 && now.2 <= base.2
    });
    if !ok {
        for e in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
            eprintln!("fd {:?} -> {:?}", e.file_name(), std::fs::read_link(e.path()));
        }
    }
    assert!(ok, "{what}: daemon holds (fds, memfd mappings, threads) {now:?}, was {base:?}");
}

#[test]
fn memory_that_could_shrink_under_the_daemon_is_refused() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("hostile-mem");
    let d = start_daemon(&sock);
    let pid = d.0.id();
    let base = footprint(pid);
    let host = sealed(host_size());
    let req = attach_request(false);

    // The case that killed the daemon with SIGBUS: an unsealed memfd,
    // truncated after the attach.
    let unsealed = memfd(RAM, 0);
    let (_s, r) = attach(&sock, &req, &[raw(&unsealed), raw(&host)]);
    refused(&r, "not sealed against resizing");
    unsealed.set_len(0).expect("the VMM may truncate its own unsealed memfd");

    // Sealed against shrinking only, or against writes.
    let (_s, r) = attach(&sock, &req, &[raw(&memfd(RAM, libc::F_SEAL_SHRINK)), raw(&host)]);
    refused(&r, "not sealed against resizing");
    let ro = memfd(RAM, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE);
    let (_s, r) = attach(&sock, &req, &[raw(&ro), raw(&host)]);
    refused(&r, "sealed against writes");

    // A regular file, then truncated; a pipe; a socket.
    let path = std::env::temp_dir().join(format!("sidecore-hostile-{}", std::process::id()));
    let file =
        std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).expect("file");
    file.set_len(RAM).expect("size");
    let (_s, r) = attach(&sock, &req, &[raw(&file), raw(&host)]);
    refused(&r, "not a memfd");
    file.set_len(0).expect("truncate");
    let _ = std::fs::remove_file(&path);
    // A file on tmpfs, which answers F_GET_SEALS like a memfd.
    let shm = std::path::PathBuf::from(format!("/dev/shm/sidecore-hostile-{}", std::process::id()));
    if let Ok(f) = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&shm) {
        f.set_len(RAM).expect("size");
        let (_s, r) = attach(&sock, &req, &[raw(&f), raw(&host)]);
        refused(&r, "not a memfd");
        let _ = std::fs::remove_file(&shm);
    }
    let (p, _w) = pipe();
    let (_s, r) = attach(&sock, &req, &[raw(&p), raw(&host)]);
    refused(&r, "not a memfd");
    let (a, _b) = UnixStream::pair().expect("socketpair");
    let (_s, r) = attach(&sock, &req, &[raw(&sealed(RAM)), raw(&a)]);
    refused(&r, "host state (fd 2): not a memfd");

    // Sealed but too small for what the request claims.
    let (_s, r) = attach(&sock, &req, &[raw(&sealed(RAM / 2)), raw(&host)]);
    refused(&r, "exceeds the guest memfd");
    let (_s, r) = attach(&sock, &req, &[raw(&sealed(RAM)), raw(&sealed(4096))]);
    refused(&r, "host-state memfd too small");

    assert_eq!(vm_count(&sock), 0);
    back_to(pid, base, "after refused memory");
}

#[test]
fn fds_that_are_not_what_they_claim_and_wrong_counts_are_refused() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("hostile-fds");
    let d = start_daemon(&sock);
    let pid = d.0.id();
    let base = footprint(pid);
    let (guest, host) = (sealed(RAM), sealed(host_size()));
    let plain = attach_request(false);
    let with_dev = attach_request(true);

    // A pipe as the doorbell (a blocking read of it would stall a sidecore).
    let (p, _w) = pipe();
    let (_s, r) = attach(&sock, &plain, &[raw(&guest), raw(&host), raw(&p)]);
    refused(&r, "doorbell (fd 3): not an eventfd");

    // Ten attaches that fail late: a pipe as the packet device's socket, a
    // TCP socket, a UDP socket with a pipe as irqfd. No ring may be left.
    let efd = eventfd(libc::EFD_NONBLOCK);
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    for i in 0..10 {
        let fds = match i % 3 {
            0 => [raw(&guest), raw(&host), raw(&efd), raw(&p), raw(&efd)],
            1 => [raw(&guest), raw(&host), raw(&efd), raw(&tcp), raw(&efd)],
            _ => [raw(&guest), raw(&host), raw(&efd), raw(&udp), raw(&p)],
        };
        let (_s, r) = attach(&sock, &with_dev, &fds);
        refused(&r, "packet_device");
    }
    assert_eq!(vm_count(&sock), 0, "a failed attach is listed");
    assert!(wait_for(Duration::from_secs(5), || rings(&sock) == 0), "orphan rings: {}", rings(&sock));

    // Wrong fd counts: none, one, four without a device, three with one,
    // and more than the five the protocol allows.
    for (req, n, needle) in [
        (&plain, 0, "needs 2 or 3 fds"),
        (&plain, 1, "needs 2 or 3 fds"),
        (&plain, 4, "needs 2 or 3 fds"),
        (&with_dev, 3, "needs 5 fds"),
        (&plain, 9, "more than 5 fds"),
    ] {
        let fds: Vec<_> = std::iter::repeat_n(raw(&efd), n).collect();
        let (_s, r) = attach(&sock, req, &fds);
        refused(&r, needle);
    }
    assert_eq!(vm_count(&sock), 0);
    back_to(pid, base, "after refused fds");
}

#[test]
fn messages_oversized_malformed_pipelined_and_half_sent() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("hostile-msg");
    let d = start_daemon(&sock);
    let pid = d.0.id();
    let base = footprint(pid);

    // Two (three) requests in one write: each answered, in order.
    let three = format!("{}{}{}", rpc(1, "status", None), rpc(2, "status", None), rpc(3, "nuke", None));
    let s = send(&sock, three.as_bytes(), &[]);
    for id in 1..=2 {
        let r = reply(&s, Duration::from_secs(10));
        let v: serde_json::Value = serde_json::from_str(&r).expect("JSON");
        assert!(v["id"] == id && v["result"]["sidecores"].is_array(), "{r}");
    }
    refused(&reply(&s, Duration::from_secs(10)), "no method");

    // Malformed in many ways; each an error, never a crash.
    for msg in [
        &b"garbage\n"[..],
        b"\xff\xfe\n",
        b"{\"op\":\"status\"}\n",
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"attach\"}\n",
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"attach\",\"params\":{\"vcpus\":4294967295}}\n",
        b"{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"status\"}\n",
        b"[1,2,3]\n",
        b"[]\n",
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"resume\"}\n",
    ] {
        refused(&reply(&send(&sock, msg, &[]), Duration::from_secs(10)), "");
    }
    // Hostile numbers in a well-formed attach.
    let (guest, host) = (sealed(RAM), sealed(host_size()));
    for (field, value) in [
        ("vcpus", serde_json::json!(0)),
        ("vcpus", serde_json::json!(1000)),
        ("shared_gpa", serde_json::json!(u64::MAX - 4095)),
        ("pool_size", serde_json::json!(0)),
        ("ram_size", serde_json::json!(u64::MAX)),
        ("cpuid", serde_json::json!([vec![[0u32; 7]; 100_000]])),
        ("cpuid", serde_json::json!([vec![[0u32; 7]; sidecore_core::cpuid::MAX_CPUID_ENTRIES + 1]])),
    ] {
        let mut req = attach_request(false);
        req[field] = value;
        let (_s, r) = attach(&sock, &req, &[raw(&guest), raw(&host)]);
        refused(&r, "");
    }

    // Oversized: more than 1 MiB without a newline.
    let s = UnixStream::connect(&sock).expect("connect");
    let big = vec![b'x'; 1 << 20];
    let _ = (&s).write_all(&big);
    let _ = (&s).write_all(&big);
    refused(&reply(&s, Duration::from_secs(10)), "longer than");

    // Half-sent: the daemon gives up at the deadline, with an error.
    let s = send(&sock, b"{\"op\":\"sta", &[]);
    let t0 = Instant::now();
    refused(&reply(&s, Duration::from_secs(20)), "no complete request line within");
    assert!(t0.elapsed() < Duration::from_secs(15), "held {:?}", t0.elapsed());

    // Disconnect mid-attach, with the fds sent: nothing kept.
    for _ in 0..20 {
        let line = rpc(1, "attach", Some(&attach_request(false)));
        let s = send(&sock, &line.as_bytes()[..line.len() / 2], &[raw(&guest), raw(&host)]);
        drop(s);
    }
    assert_eq!(vm_count(&sock), 0);
    back_to(pid, base, "after bad messages");
}

#[test]
fn an_attach_flood_leaves_nothing_behind() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("hostile-flood");
    let d = start_daemon(&sock);
    let pid = d.0.id();
    let base = footprint(pid);
    let (guest, host, bell) = (sealed(RAM), sealed(host_size()), eventfd(libc::EFD_NONBLOCK));
    let req = attach_request(false);
    // 200 good attaches that hang up at once, and 200 that stay: each is a
    // VM; when they go, every ring, mapping and fd goes too.
    for _ in 0..200 {
        let (s, r) = attach(&sock, &req, &[raw(&guest), raw(&host), raw(&bell)]);
        assert!(r.contains("\"result\""), "{r}");
        drop(s);
    }
    let held: Vec<_> = (0..200)
        .map(|_| {
            let (s, r) = attach(&sock, &req, &[raw(&guest), raw(&host), raw(&bell)]);
            assert!(r.contains("\"result\""), "{r}");
            s
        })
        .collect();
    assert!(wait_for(Duration::from_secs(10), || vm_count(&sock) == 200), "{} VMs listed", vm_count(&sock));
    // The sealed memfd cannot be truncated under the daemon's mappings.
    assert!(guest.set_len(0).is_err());
    drop(held);
    assert!(wait_for(Duration::from_secs(15), || vm_count(&sock) == 0 && rings(&sock) == 0));
    back_to(pid, base, "after 400 attaches");
}

#[test]
fn a_filled_blocking_irqfd_cannot_stall_the_sidecore() {
    use sidecore_core::SharedRegion;
    use sidecore_vmm::host::memfd::Mapping;
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("hostile-irq");
    let _d = start_daemon(&sock);
    let (guest, host, bell) = (sealed(RAM), sealed(host_size()), eventfd(libc::EFD_NONBLOCK));
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    // The VMM's worst: a blocking irqfd whose counter is full, and a
    // socket it will set blocking again after the attach.
    let irq = eventfd(0);
    (&irq).write_all(&(u64::MAX - 1).to_ne_bytes()).expect("fill the irqfd");
    let (_conn, r) = attach(&sock, &attach_request(true), &[raw(&guest), raw(&host), raw(&bell), raw(&udp), raw(&irq)]);
    assert!(r.contains("\"result\""), "{r}");
    udp.set_nonblocking(false).expect("clear O_NONBLOCK on the shared socket");
    // Make the device kick: the vCPU halts with an rx buffer posted, and a
    // packet comes.
    let len = usize::try_from(shm_proto::ring::region_size(1)).unwrap_or(0);
    let map = Mapping::new(&guest, SHARED_GPA, len).expect("map the region");
    let p = map.ptr();
    // SAFETY: the mapping covers the region and is kept alive by the region.
    let region = unsafe { SharedRegion::new(p, len, 1, Arc::new(map)) }.expect("region");
    let v = region.vcpu(0).expect("vcpu 0");
    let d = &v.pkt.rx.desc[0];
    d.addr.store(FREE_GPA, Ordering::Relaxed);
    d.len.store(2048, Ordering::Relaxed);
    d.state.store(shm_proto::event::DESC_AVAIL, Ordering::Release);
    v.guest_events.halting.store(1, Ordering::SeqCst);
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let to = udp.local_addr().expect("addr");
    let blocked = wait_for(Duration::from_secs(20), || {
        let _ = tx.send_to(b"ping", to);
        let st = status(&sock);
        st["vms"][0]["device"]["kicks_blocked"].as_u64().unwrap_or(0) > 0
    });
    assert!(blocked, "the kick never reported blocking: {}", status(&sock));
    assert_eq!(d.state.load(Ordering::Acquire), shm_proto::event::DESC_USED, "the packet was delivered");
    // The sidecore goes on: status answers and a later attach is served.
    let (_c2, r) = attach(&sock, &attach_request(false), &[raw(&sealed(RAM)), raw(&host), raw(&bell)]);
    assert!(r.contains("\"result\""), "{r}");
    assert_eq!(vm_count(&sock), 2);
}

#[test]
fn a_well_behaved_vm_passes_its_selftest_after_the_attacks() {
    if !kvm_available() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket("hostile-neighbour");
    let _d = start_daemon(&sock);
    // Hold a few hostile connections open while the VM runs: half-sent
    // lines, fds passed and never used, an idle attached VM.
    let (guest, host, bell) = (sealed(RAM), sealed(host_size()), eventfd(libc::EFD_NONBLOCK));
    let _half = send(&sock, b"{\"jsonrpc\":\"2.0\",\"method\":\"attach\",", &[raw(&guest), raw(&host)]);
    let (_idle, r) = attach(&sock, &attach_request(false), &[raw(&guest), raw(&host), raw(&bell)]);
    assert!(r.contains("\"result\""), "{r}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidecore"))
        .args(["run", "--workload", "selftest", "--vcpu-cpus", "1", "--attach"])
        .arg(&sock)
        .output()
        .expect("run the neighbour VM");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "neighbour VM failed:\n{text}");
    assert!(text.contains("selftest") && text.contains("ok"), "{text}");
}
