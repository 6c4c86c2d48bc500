//! Whole-VM runs of the device workloads: the UDP load generator and the
//! echo run (`sidecore echo`, `sidecore bench --ops echo`), and the `irq`
//! benchmark's run (`sidecore bench --ops irq`).

pub mod info;

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shm_proto::event::PKT_STOP;
use sidecore_core::tsc::rdtsc;

pub use crate::vmm::devices::EventPath;
use crate::vmm::devices::{xorshift, EventDevice, IrqBenchState};

/// How long the closed loop waits for one packet's echo before it counts the
/// packet lost: far past any round trip (a missed wake-up never recovers by
/// itself, so it still shows as a loss), but long enough for a stall of the
/// host; the emulated AMD-V bed has shown single round trips over 500 ms.
const ECHO_WAIT: Duration = Duration::from_secs(5);

/// What the load generator saw.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EchoStats {
    /// Packets sent (not counting the readiness probes).
    pub sent: u64,
    /// Echoes received byte-for-byte identical to what was sent.
    pub intact: u64,
    /// Echoes that differed from what was sent.
    pub corrupted: u64,
    /// Echoes that came back out of order (or twice).
    pub out_of_order: u64,
    /// Packets with no echo (closed loop: within the timeout).
    pub lost: u64,
    /// Receive errors other than a timeout, retried (closed loop).
    pub recv_errors: u64,
    /// Seconds the measured part took.
    pub seconds: f64,
    /// Round trips (closed loop), TSC cycles.
    #[serde(skip)]
    pub rtt_cycles: Vec<u64>,
}

impl EchoStats {
    /// Adds another load generator's counts (seconds: the longest).
    pub fn merge(&mut self, o: &EchoStats) {
        self.sent += o.sent;
        self.intact += o.intact;
        self.corrupted += o.corrupted;
        self.out_of_order += o.out_of_order;
        self.lost += o.lost;
        self.recv_errors += o.recv_errors;
        self.seconds = self.seconds.max(o.seconds);
        self.rtt_cycles.extend_from_slice(&o.rtt_cycles);
    }

    /// Every packet came back intact and in order.
    pub fn perfect(&self) -> bool {
        self.sent > 0 && self.intact == self.sent && self.corrupted == 0 && self.out_of_order == 0 && self.lost == 0
    }
}

/// The packet for sequence number `seq`: the number, then bytes derived
/// from it, `size` bytes in all (at least 8).
pub fn packet(seq: u64, size: usize) -> Vec<u8> {
    let mut p = seq.to_le_bytes().to_vec();
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while p.len() < size.max(8) {
        p.push(xorshift(&mut x).to_le_bytes()[0]);
    }
    p
}

/// The sequence number a packet starts with.
fn seq_of(p: &[u8]) -> Option<u64> {
    p.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
}

/// The load generator's socket, and the device address it talks to.
pub struct LoadGen {
    socket: UdpSocket,
    target: SocketAddr,
}

impl LoadGen {
    /// A socket on loopback aimed at `target`.
    pub fn new(target: SocketAddr) -> std::io::Result<LoadGen> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        Ok(LoadGen { socket, target })
    }

    /// Sends probes until one comes back (the guest has posted its rx
    /// buffers), for at most `limit`.
    pub fn wait_ready(&self, limit: Duration) -> bool {
        let probe = packet(u64::MAX, 16);
        let t0 = Instant::now();
        let _ = self.socket.set_read_timeout(Some(Duration::from_millis(20)));
        let mut buf = [0u8; 64];
        while t0.elapsed() < limit {
            if self.socket.send_to(&probe, self.target).is_err() {
                return false;
            }
            while let Ok(n) = self.socket.recv(&mut buf) {
                if buf[..n] == probe[..] {
                    // Drain late echoes of earlier probes.
                    while self.socket.recv(&mut buf).is_ok() {}
                    return true;
                }
            }
        }
        false
    }

    /// One packet in flight at a time: `n` packets of `size` bytes, each
    /// timed from send to echo; a packet with no echo in `timeout` is lost.
    pub fn closed_loop(&self, n: u64, size: usize, timeout: Duration, mut progress: impl FnMut(u64)) -> EchoStats {
        let mut st =
            EchoStats { rtt_cycles: Vec::with_capacity(usize::try_from(n).unwrap_or(0)), ..Default::default() };
        let _ = self.socket.set_read_timeout(Some(timeout));
        let mut buf = vec![0u8; 65536];
        let t_start = Instant::now();
        for seq in 0..n {
            let p = packet(seq, size);
            let t0 = rdtsc();
            if self.socket.send_to(&p, self.target).is_err() {
                st.lost += 1;
                continue;
            }
            st.sent += 1;
            // Only a timeout is a loss: any other error (an ICMP error queued
            // on the socket, an interrupted call) is retried until the
            // packet's own deadline.
            let deadline = Instant::now() + timeout;
            loop {
                match self.socket.recv(&mut buf) {
                    Ok(k) => {
                        let got = &buf[..k];
                        let got_seq = seq_of(got);
                        if got_seq == Some(u64::MAX) {
                            continue; // a late readiness probe
                        }
                        if got_seq != Some(seq) {
                            st.out_of_order += 1;
                            continue;
                        }
                        st.rtt_cycles.push(rdtsc().wrapping_sub(t0));
                        if got == &p[..] {
                            st.intact += 1;
                        } else {
                            st.corrupted += 1;
                        }
                        break;
                    }
                    Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        st.recv_errors += 1;
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            st.lost += 1;
                            break;
                        }
                        let _ = self.socket.set_read_timeout(Some(left));
                    }
                    Err(_) => {
                        st.lost += 1;
                        break;
                    }
                }
            }
            let _ = self.socket.set_read_timeout(Some(timeout));
            if seq % 1000 == 999 {
                progress(seq + 1);
            }
        }
        st.seconds = t_start.elapsed().as_secs_f64();
        st
    }

    /// Open loop: `n` packets of `size` bytes at `rate` per second from a
    /// sender thread; counts what comes back (in order, intact) until
    /// `drain` passes with nothing more.
    pub fn open_loop(&self, n: u64, size: usize, rate: u64, drain: Duration) -> std::io::Result<EchoStats> {
        let tx = self.socket.try_clone()?;
        let target = self.target;
        let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
        let t_start = Instant::now();
        let sender = std::thread::spawn(move || {
            // Sleep, never spin, between sends: this thread shares its CPU
            // with the sidecore. Whatever fell due meanwhile goes at once
            // (short bursts, well within the 32-descriptor rx queue at the
            // rates a loopback socket sustains).
            let mut sent = 0u64;
            let mut seq = 0u64;
            while seq < n {
                let now = Instant::now();
                while seq < n && t_start + interval.mul_f64(seq as f64) <= now {
                    if tx.send_to(&packet(seq, size), target).is_ok() {
                        sent += 1;
                    }
                    seq += 1;
                }
                let next = t_start + interval.mul_f64(seq as f64);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            sent
        });
        self.socket.set_read_timeout(Some(drain))?;
        let mut st = EchoStats::default();
        let mut buf = vec![0u8; 65536];
        let mut expect = 0u64;
        while let Ok(k) = self.socket.recv(&mut buf) {
            let got = &buf[..k];
            let Some(seq) = seq_of(got) else {
                st.corrupted += 1;
                continue;
            };
            if seq == u64::MAX {
                continue;
            }
            if seq < expect {
                st.out_of_order += 1;
                continue;
            }
            // A gap is packets lost (counted at the end), not disorder.
            expect = seq + 1;
            if got == &packet(seq, size)[..] {
                st.intact += 1;
            } else {
                st.corrupted += 1;
            }
        }
        st.sent = sender.join().unwrap_or(0);
        st.lost = st.sent.saturating_sub(st.intact + st.corrupted);
        st.seconds = t_start.elapsed().as_secs_f64() - drain.as_secs_f64();
        Ok(st)
    }

    /// Tells the guest to stop (it echoes the stop packet and exits).
    pub fn stop_guest(&self) {
        let mut p = PKT_STOP.to_vec();
        p.resize(32, 0);
        let _ = self.socket.send_to(&p, self.target);
    }
}

/// One `sidecore echo` run: an echo guest, its packet device on one path,
/// and the load generator.
#[derive(Clone, Debug)]
pub struct EchoConfig {
    /// The sidecore's posted events, or the exit path (interrupt + PIO).
    pub path: EventPath,
    /// Packets to send.
    pub count: u64,
    /// Bytes per packet (8..=2048).
    pub size: usize,
    /// Open loop at this many packets per second (`None`: closed loop).
    pub rate: Option<u64>,
    /// The sidecore's CPU (posted path).
    pub sidecore_cpu: usize,
    /// The vCPU's CPU.
    pub vcpu_cpu: usize,
    /// µs the guest spins with nothing to do before it halts (posted path).
    pub spin_us: u64,
    /// VMs, each with its own device and load generator.
    pub vms: usize,
    /// The guest stops and restarts its sidecore every this many packets
    /// (0: never).
    pub toggle_every: u64,
    /// The daemon whose sidecore serves the devices (sidecall path); `None`:
    /// the VM's own sidecore for one VM, a daemon started for the run for
    /// several.
    pub attach: Option<std::path::PathBuf>,
}

/// What an echo run produced.
#[derive(Debug)]
pub struct EchoRun {
    /// The load generators' view, all VMs together.
    pub stats: EchoStats,
    /// Each VM's.
    pub per_vm: Vec<EchoStats>,
    /// The guest's console.
    pub console: String,
}

/// Boots the echo guest with the packet device on `cfg`'s path, waits for
/// it to post its buffers, runs the load, stops the guest.
pub fn run_echo(cfg: &EchoConfig, mut progress: impl FnMut(u64)) -> Result<EchoRun, String> {
    if !(8..=shm_proto::event::PKT_MAX as usize).contains(&cfg.size) {
        return Err(format!("--size {}: a packet is 8 to {} bytes", cfg.size, shm_proto::event::PKT_MAX));
    }
    let vms = cfg.vms.max(1);
    // Several VMs on the sidecall path share a daemon's sidecore: start one
    // for the run unless the caller named theirs.
    let mut daemon = None;
    let exit_path = cfg.path == EventPath::Interrupt;
    let attach = match (&cfg.attach, exit_path) {
        (_, true) => None,
        (Some(sock), false) => Some(sock.clone()),
        (None, false) if vms > 1 => Some(daemon.insert(DaemonChild::start(cfg.sidecore_cpu)?).socket.clone()),
        (None, false) => None,
    };
    let mut args = [0u64; 8];
    // Idle deadline, ms; a halted guest only checks it when a packet wakes it.
    args[shm_proto::args::echo::IDLE_MS] = 30_000;
    args[shm_proto::args::echo::EXIT_PATH] = u64::from(exit_path);
    args[shm_proto::args::echo::SPIN_US] = cfg.spin_us;
    args[shm_proto::args::echo::TOGGLE_EVERY] = cfg.toggle_every;
    let mut guests = Vec::new();
    for i in 0..vms {
        let socket = UdpSocket::bind("127.0.0.1:0")
            .map_err(|e| format!("cannot bind the device's UDP socket on 127.0.0.1: {e}"))?;
        let target = socket.local_addr().map_err(|e| format!("device socket: {e}"))?;
        let buf = Arc::new(Mutex::new(Vec::new()));
        let opts = crate::vmm::RunOptions {
            vcpu_cpus: Some(vec![cfg.vcpu_cpu]),
            sidecore_cpus: if exit_path || attach.is_some() { Vec::new() } else { vec![cfg.sidecore_cpu] },
            console: crate::vmm::ConsoleSink::Capture(buf.clone()),
            attach: attach.clone(),
            device: Some(EventDevice::Packet { socket, path: cfg.path, host_cpu: Some(cfg.sidecore_cpu) }),
            ..crate::vmm::RunOptions::new(crate::vmm::vm::VmSpec::bundled(shm_proto::boot::Workload::Echo, 1, 64, args))
        };
        let vm = std::thread::Builder::new()
            .name(format!("echo-vm{i}"))
            .spawn(move || crate::vmm::run(opts))
            .map_err(|e| format!("cannot start the VM thread: {e}"))?;
        let lg = Arc::new(LoadGen::new(target).map_err(|e| format!("load generator socket: {e}"))?);
        guests.push((vm, buf, lg));
    }
    let console = |b: &Arc<Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&b.lock().map(|g| g.clone()).unwrap_or_default()).into_owned()
    };
    // One load generator per VM, all on the sidecore's CPU (on a 2-CPU host
    // there is no other): left to float, one lands on the vCPUs' CPU
    // whenever a guest halts and keeps it from running.
    let (ptx, prx) = std::sync::mpsc::channel::<u64>();
    let mut loads = Vec::new();
    for (i, (_, _, lg)) in guests.iter().enumerate() {
        let (cfg2, lg2, ptx) = (cfg.clone(), lg.clone(), ptx.clone());
        let load = std::thread::Builder::new()
            .name(format!("echo-load{i}"))
            .spawn(move || -> Result<Option<EchoStats>, String> {
                let _ = sidecore_core::pin::pin_current_thread(cfg2.sidecore_cpu);
                if !lg2.wait_ready(Duration::from_secs(10)) {
                    return Ok(None);
                }
                Ok(Some(match cfg2.rate {
                    None => lg2.closed_loop(cfg2.count, cfg2.size, ECHO_WAIT, |_| {
                        let _ = ptx.send(1000);
                    }),
                    Some(r) => lg2
                        .open_loop(cfg2.count, cfg2.size, r, Duration::from_millis(300))
                        .map_err(|e| format!("open loop: {e}"))?,
                }))
            })
            .map_err(|e| format!("cannot start the load generator thread: {e}"))?;
        loads.push(load);
    }
    drop(ptx);
    let mut done = 0;
    while loads.iter().any(|l| !l.is_finished()) {
        if let Ok(n) = prx.recv_timeout(Duration::from_millis(50)) {
            done += n;
            progress(done);
        }
    }
    let mut per_vm = Vec::new();
    for l in loads {
        per_vm.push(l.join().map_err(|_| "the load generator panicked".to_string())??);
    }
    let t0 = Instant::now();
    while guests.iter().any(|g| !g.0.is_finished()) && t0.elapsed() < Duration::from_secs(10) {
        for g in guests.iter().filter(|g| !g.0.is_finished()) {
            g.2.stop_guest();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    let mut stats = EchoStats::default();
    for (i, ((vm, buf, _), st)) in guests.into_iter().zip(per_vm.iter()).enumerate() {
        if !vm.is_finished() {
            return Err(format!("echo guest {i} did not stop; its console:\n{}", console(&buf)));
        }
        let report =
            vm.join().map_err(|_| "the VM thread panicked".to_string())?.map_err(|e| crate::error_chain(&e))?;
        let text = console(&buf);
        if report.exit_code() != 0 {
            return Err(format!("echo guest {i} failed ({:?}); its console:\n{text}", report.ends));
        }
        let st = st
            .as_ref()
            .ok_or_else(|| format!("echo guest {i} never answered a probe within 10 s; its console:\n{text}"))?;
        out += &text;
        stats.merge(st);
    }
    Ok(EchoRun { stats, per_vm: per_vm.into_iter().flatten().collect(), console: out })
}

/// A `sidecore daemon` child process on a private socket, killed on drop.
pub struct DaemonChild {
    child: std::process::Child,
    /// Its control socket.
    pub socket: std::path::PathBuf,
}

impl DaemonChild {
    /// Starts this executable as `sidecore daemon --cores CPU` (never
    /// parking) and waits for its socket.
    pub fn start(cpu: usize) -> Result<DaemonChild, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable to start a daemon: {e}"))?;
        let socket = std::env::temp_dir().join(format!("sidecore-echo-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let child = std::process::Command::new(exe)
            .args(["daemon", "--idle-park-us", "0", "--cores", &cpu.to_string(), "--socket"])
            .arg(&socket)
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the daemon: {e}"))?;
        let d = DaemonChild { child, socket };
        let t0 = Instant::now();
        while !d.socket.exists() {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err("the daemon did not open its socket within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One `irq` benchmark run: the responder guest and the sidecore's poster.
pub fn run_irq(
    path: EventPath,
    n: usize,
    sidecore_cpu: usize,
    vcpu_cpu: usize,
) -> Result<(Vec<u64>, u64, String), String> {
    let state = IrqBenchState::new(n);
    let buf = Arc::new(Mutex::new(Vec::new()));
    let mut args = [0u64; 8];
    args[shm_proto::args::irq::EVENTS] = n as u64;
    args[shm_proto::args::irq::IDLE_MS] = 10_000;
    args[shm_proto::args::irq::BY_INTERRUPT] = u64::from(path == EventPath::Interrupt);
    let opts = crate::vmm::RunOptions {
        vcpu_cpus: Some(vec![vcpu_cpu]),
        sidecore_cpus: vec![sidecore_cpu],
        console: crate::vmm::ConsoleSink::Capture(buf.clone()),
        device: Some(EventDevice::IrqBench { state: state.clone(), path }),
        ..crate::vmm::RunOptions::new(crate::vmm::vm::VmSpec::bundled(shm_proto::boot::Workload::Irq, 1, 64, args))
    };
    let report = crate::vmm::run(opts).map_err(|e| crate::error_chain(&e))?;
    let out = String::from_utf8_lossy(&buf.lock().map(|g| g.clone()).unwrap_or_default()).into_owned();
    if report.exit_code() != 0 {
        return Err(format!("the irq guest failed ({:?}); its console:\n{out}", report.ends));
    }
    Ok((state.samples(), state.lost(), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_carry_their_sequence_and_differ() {
        let a = packet(7, 64);
        assert_eq!(a.len(), 64);
        assert_eq!(u64::from_le_bytes(a[..8].try_into().unwrap_or([0; 8])), 7);
        assert_ne!(a, packet(8, 64));
        assert_eq!(a, packet(7, 64));
        assert_eq!(packet(1, 0).len(), 8);
    }

    #[test]
    fn only_a_clean_run_is_perfect() {
        let mut s = EchoStats { sent: 10, intact: 10, ..Default::default() };
        assert!(s.perfect());
        s.out_of_order = 1;
        assert!(!s.perfect());
        assert!(!EchoStats::default().perfect());
    }
}
