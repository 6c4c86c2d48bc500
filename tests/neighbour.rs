//! A noisy neighbour on a shared daemon sidecore (issue 16 item 4): a
//! hostile VMM attaches a 24-vCPU VM with 256-entry CPUID tables (KVM's
//! cap) and floods all 24 rings with CPUID requests built to miss every
//! table lookup and take the out-of-range path with the XSAVE-size rewrite
//! (the most expensive request a VMM can make a sidecore answer). Beside
//! it, a well-behaved VM (`sidecore run --attach`, the polite selftest
//! lingering on null sidecalls) measures its own round trips.
//!
//! Asserted: the victim's selftest passes with the flood running all along,
//! and the flood adds to its guest-measured p99 and p99.9 no more than the
//! per-VM share allows. With several VMs on a sidecore each VM gets, per
//! sweep, at most `MAX_PER_SWEEP` requests over all its rings and only
//! while they take under `VM_QUANTUM` (1 µs): a call of the victim waits
//! for at most about one share of the attacker. Bounds: p99 with the flood
//! within 2x of without or at most 2 quanta more; p99.9 at most 25 µs more
//! (per-ring shares, 16 requests on each of the 24 rings, added about 130
//! µs there). The two conditions alternate in short phases (`run
//! --latency-phases`, SIGUSR1) so that both see the same host: absolute
//! figures move 2x between runs here. The best of up to three attempts
//! counts; every attempt's figures are printed.
//!
//! The attacker is a VMM, not a guest: it chooses its tables (a guest
//! cannot), and it writes its rings from this process, as its guest could
//! (the rings are guest memory, every word of which the sidecore treats as
//! hostile). This host has two CPUs: the daemon's sidecore is on CPU 0, and
//! the victim's vCPU and the flooding thread share CPU 1. The flooder tops
//! the rings up every 2 ms and sleeps between, so that it preempts the
//! victim rarely (a preempted call is one slow sample) while its rings stay
//! full: the sidecore takes longer than that to drain 24 x 64 requests.

mod common;
use common::daemon::{socket, start_daemon};
use common::kvm_available;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shm_proto::boot::Workload;
use shm_proto::op::{encode_head, Opcode};
use shm_proto::ring::{next_ticket, slot_index, ticket_distance, Body, RING_SLOTS};
use sidecore_core::cpuid::{FLAG_SIGNIFICANT_INDEX, MAX_CPUID_ENTRIES};
use sidecore_core::SharedRegion;
use sidecore_vmm::daemon::Attachment;
use sidecore_vmm::vmm::vm::{Vm, VmSpec};

const ATTACKER_VCPUS: u32 = shm_proto::layout::MAX_VCPUS;
/// Phases of each condition per attempt, and their length.
const PHASES: usize = 6;
const PHASE: Duration = Duration::from_millis(250);

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sidecore")
}

/// A 256-entry table in which the flood's leaves are found nowhere: 252
/// subleaves of leaf 4, then 0xD.0 and 0xD.1 with every XSAVE feature, and
/// the vendor leaf last (max basic leaf 0xD, GenuineIntel, so that a leaf
/// past every class range is answered from 0xD with the XSAVE sizes
/// rewritten). Before the index, every flood request scanned it four times.
fn attacker_table() -> Vec<[u32; 7]> {
    let sig = FLAG_SIGNIFICANT_INDEX;
    let mut t: Vec<[u32; 7]> = (0..252u32).map(|i| [4, 100 + i, sig, i, 0, 0, 0]).collect();
    t.push([0xd, 0, sig, 0x2e7, 0x240, 0x988, 0]);
    t.push([0xd, 1, sig, 0xf, 0x240, 0x1800, 0]);
    t.push([0xd, 2, sig, 0x100, 0x240, 0, 0]);
    let v = |s: &[u8; 4]| u32::from_le_bytes(*s);
    t.push([0, 0, 0, 0xd, v(b"Genu"), v(b"ntel"), v(b"ineI")]);
    assert_eq!(t.len(), MAX_CPUID_ENTRIES);
    t
}

/// The hostile VMM: its VM (never run) attached to the daemon.
struct Attacker {
    _vm: Vm,
    _attachment: Attachment,
    region: Arc<SharedRegion>,
}

fn attach_attacker(sock: &Path) -> Attacker {
    let mut spec = VmSpec::bundled(Workload::Hello, ATTACKER_VCPUS, 64, [0; 8]);
    spec.sidecalls = true;
    spec.shareable = true;
    let vm = Vm::build(&spec).expect("build the attacker's VM");
    let mut req = sidecore_vmm::vmm::attach_request(&vm, false);
    req.cpuid = (0..ATTACKER_VCPUS).map(|_| attacker_table()).collect();
    let host = vm.host_memfd.as_ref().expect("a shareable VM has a host-state memfd");
    let a = Attachment::attach(sock, req, &vm.memfd, host, &vm.doorbell, &[]).expect("attach the attacker");
    let region = vm.region.clone();
    Attacker { _vm: vm, _attachment: a, region }
}

/// Tops every ring of `region` up to full while `on`, every 2 ms, from
/// CPU 1; counts the requests posted.
fn flooder(region: Arc<SharedRegion>, on: Arc<AtomicBool>, stop: Arc<AtomicBool>, posted: Arc<AtomicU64>) {
    let _ = sidecore_core::pin::pin_current_thread(1);
    let mut next = vec![0u64; region.nr_vcpus() as usize];
    let mut leaf = 0u32;
    while !stop.load(Ordering::Relaxed) {
        if on.load(Ordering::Relaxed) {
            for (v, t) in next.iter_mut().enumerate() {
                let Some(vs) = region.vcpu(u32::try_from(v).unwrap_or(0)) else { continue };
                let consumer = vs.consumer.value.load(Ordering::Acquire);
                while ticket_distance(consumer, *t) < i64::try_from(RING_SLOTS).unwrap_or(64) {
                    // Past every class's range: out of range, answered from
                    // 0xD.0 or 0xD.1 with both XSAVE sizes computed for
                    // every component (XCR0 and XSS all ones).
                    leaf = leaf.wrapping_add(1);
                    let words =
                        [u64::from(0x8000_1000 + (leaf & 0xfff)), u64::from(leaf & 1), 0, u64::MAX, u64::MAX, 0];
                    vs.slots[slot_index(*t)].post(*t, &Body { head: encode_head(Opcode::Cpuid as u16, 0), words });
                    *t = next_ticket(*t);
                    posted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether every ring of the attacker is drained (waits up to 1 s).
fn drained(region: &SharedRegion) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(1) {
        let busy = (0..region.nr_vcpus()).any(|v| {
            region.vcpu(v).is_some_and(|vs| {
                let c = vs.consumer.value.load(Ordering::Acquire);
                let s = vs.slots[slot_index(c)].state.load(Ordering::Acquire);
                shm_proto::ring::SlotState::from_bits(s) == Some(shm_proto::ring::SlotState::Posted)
            })
        });
        if !busy {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn victim(sock: &Path, linger_ms: u64) -> Child {
    Command::new(bin())
        .args(["run", "--workload", "selftest", "--vcpu-cpus", "1", "--latency-phases"])
        .args(["--arg", "0", "--arg", &linger_ms.to_string(), "--arg", "1", "--attach"])
        .arg(sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the victim's VMM")
}

fn sigusr1(c: &Child) {
    let pid = libc::pid_t::try_from(c.id()).expect("pid");
    // SAFETY: kill(2) with a pid this test spawned and a valid signal.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0, "SIGUSR1 the victim's VMM");
}

/// `(calls, p99 ns, p99.9 ns)` of condition `name` from the VMM's
/// `latency:` line.
fn condition(out: &str, name: &str) -> Option<(u64, u64, u64)> {
    let line = out.lines().find(|l| l.starts_with(&format!("latency: condition {name}:")))?;
    let num_before = |tag: &str| -> Option<u64> {
        let i = line.find(tag)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    let after = |tag: &str| -> Option<u64> { line.split(tag).nth(1)?.split_whitespace().next()?.parse().ok() };
    Some((num_before(" calls")?, after("p99 ")?, after("p99.9 ")?))
}

/// What the flood may add to the victim's p99: 2x, or 2 time shares.
fn p99_bound(without: u64) -> u64 {
    let quanta = u64::try_from(2 * sidecore_core::poll::VM_QUANTUM.as_nanos()).unwrap_or(u64::MAX);
    (2 * without).max(without + quanta)
}

/// What the flood may add to the victim's p99.9.
const P999_SLACK_NS: u64 = 25_000;

struct Attempt {
    with: (u64, u64, u64),
    without: (u64, u64, u64),
    posted: u64,
}

/// One victim run beside the attacker: the flood runs through its selftest
/// and the A phases of its linger, and stops (drained) for the B phases.
fn attempt(sock: &Path, attacker: &Attacker) -> Result<Attempt, String> {
    let on = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));
    let posted = Arc::new(AtomicU64::new(0));
    let f = {
        let (r, on, stop, posted) = (attacker.region.clone(), on.clone(), stop.clone(), posted.clone());
        std::thread::spawn(move || flooder(r, on, stop, posted))
    };
    let linger_ms = u64::try_from(PHASE.as_millis()).unwrap_or(250) * 2 * PHASES as u64 + 1500;
    let mut v = victim(sock, linger_ms);
    let stdout = v.stdout.take().expect("victim stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("fallback phase:") {
                let _ = tx.send(());
            }
            seen += &line;
            seen.push('\n');
        }
        seen
    });
    // The linger (and with it the histogram) starts after the fallback
    // phase; condition A (flooded) is open from the start.
    let lingering = rx.recv_timeout(Duration::from_secs(300)).is_ok();
    let mut phases_ok = lingering;
    if lingering {
        for _ in 0..PHASES {
            std::thread::sleep(PHASE);
            on.store(false, Ordering::Relaxed);
            phases_ok &= drained(&attacker.region);
            sigusr1(&v); // A ends, B (quiet) begins
            std::thread::sleep(PHASE);
            sigusr1(&v); // B ends, A begins
            on.store(true, Ordering::Relaxed);
        }
    }
    let o = v.wait_with_output().map_err(|e| format!("victim: {e}"))?;
    stop.store(true, Ordering::Relaxed);
    let _ = f.join();
    let out =
        format!("stdout:\n{}\nstderr:\n{}", reader.join().unwrap_or_default(), String::from_utf8_lossy(&o.stderr));
    if !lingering {
        return Err(format!("the victim never reached its linger phase: {out}"));
    }
    if !o.status.success() || !out.contains("selftest: ok") {
        return Err(format!("the victim's selftest failed beside the flood: {out}"));
    }
    if !phases_ok {
        return Err(format!("the attacker's rings did not drain within 1 s of the flood's stop: {out}"));
    }
    let with = condition(&out, "A").ok_or_else(|| format!("no condition A line: {out}"))?;
    let without = condition(&out, "B").ok_or_else(|| format!("no condition B line: {out}"))?;
    eprintln!("{}", out.lines().filter(|l| l.starts_with("latency:")).collect::<Vec<_>>().join("\n"));
    Ok(Attempt { with, without, posted: posted.load(Ordering::Relaxed) })
}

#[test]
fn a_flooding_24_vcpu_vm_adds_at_most_its_share_to_a_neighbours_calls() {
    if !kvm_available() {
        return;
    }
    // Under an emulated CPU (the AMD-V bed: TCG translates every
    // instruction) times mean nothing, and the flood can starve the victim's
    // phases past their deadline: the test is this machine's.
    if let Some(e) = sidecore_vmm::host::cpu_emulator(sidecore_vmm::host::hypervisor_signature().as_deref()) {
        common::skip(&format!("a timed bound: host CPU emulated by {e}, where timing is not representative"));
        return;
    }
    let online = sidecore_vmm::host::online_cpus().unwrap_or_default();
    if !online.contains(&0) || !online.contains(&1) {
        common::skip("needs CPUs 0 and 1 online (the daemon's sidecore on 0, the vCPUs on 1)");
        return;
    }
    let sock = socket("neighbour");
    let _d = start_daemon(&sock);
    let attacker = attach_attacker(&sock);
    let mut held = false;
    let mut report = Vec::new();
    for i in 1..=3 {
        let a = attempt(&sock, &attacker).unwrap_or_else(|e| panic!("attempt {i}: {e}"));
        // Enough samples in both conditions for a p99.9 (a bucket's worth
        // of calls past the 99.9th percentile at least).
        assert!(
            a.with.0 >= 100_000 && a.without.0 >= 100_000,
            "too few calls: {} with, {} without",
            a.with.0,
            a.without.0
        );
        assert!(a.posted > 100_000, "the flood posted only {} requests", a.posted);
        let (p99_ok, p999_ok) = (a.with.1 <= p99_bound(a.without.1), a.with.2 <= a.without.2 + P999_SLACK_NS);
        let line = format!(
            "attempt {i}: with the flood p99 {} ns, p99.9 {} ns ({} calls); without p99 {} ns, p99.9 {} ns ({} calls); \
             bounds p99 {} ns ({}), p99.9 {} ns ({}); {} flood requests posted",
            a.with.1,
            a.with.2,
            a.with.0,
            a.without.1,
            a.without.2,
            a.without.0,
            p99_bound(a.without.1),
            if p99_ok { "held" } else { "broken" },
            a.without.2 + P999_SLACK_NS,
            if p999_ok { "held" } else { "broken" },
            a.posted
        );
        eprintln!("{line}");
        report.push(line);
        if p99_ok && p999_ok {
            held = true;
            break;
        }
    }
    // The daemon still serves, and counted the flood as the attacker's.
    let o = Command::new(bin()).args(["status", "--json", "--socket"]).arg(&sock).output().expect("status");
    assert!(o.status.success(), "status: {}", String::from_utf8_lossy(&o.stderr));
    assert!(held, "the flood pushed the victim past its bounds in every attempt:\n{}", report.join("\n"));
    let _ = std::fs::remove_file(&sock);
}
