//! `sidecore run`: builds the VM, starts the sidecore(s) and one pinned
//! thread per vCPU, prints the guest's console, and collects each vCPU's
//! exit status.

pub mod console;
pub mod control;
pub mod devices;
pub mod kvm_stats;
pub mod linux;
pub mod loader;
pub mod sidecores;
pub mod vcpu;
pub mod vm;

pub use crate::vmm::sidecores::SidecoreSet;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::VcpuFd;
use shm_proto::boot::{CONTROL_START_SIDECORE, CONTROL_STOP_SIDECORE, MARKER_SIDECALL_BEGIN, MARKER_SIDECALL_END};
use sidecore_core::pin::pin_current_thread;
use sidecore_core::ring::RingRef;
use sidecore_core::service::Services;
use sidecore_core::stats::VmStats;

use crate::bench::FloorProbe;
use crate::vmm::control::{Controller, Want};
use crate::vmm::devices::{DeviceHost, EventDevice, EventPath};
use crate::vmm::kvm_stats::{StatsSample, VcpuStats};
use crate::vmm::vcpu::{describe_registers, Action, Exit, ExitHandler};
use crate::vmm::vm::{Vm, VmError, VmSpec};
use sidecore_core::hypercalls::vm_services;

/// Running the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Building it failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A CPU named on the command line is not online.
    #[error("{what} CPU {cpu} is not online (online CPUs: {online}) — pick CPUs from that list")]
    CpuNotOnline {
        /// Which option.
        what: &'static str,
        /// The CPU.
        cpu: usize,
        /// The online list.
        online: String,
    },
    /// Reading host facts failed.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// The VMM's hypercalls could not be registered.
    #[error("cannot register the VMM's hypercalls")]
    Registry(#[from] sidecore_core::service::RegistryError),
    /// A sidecore could not start.
    #[error(transparent)]
    Sidecore(#[from] sidecore_core::SidecoreError),
    /// A vCPU thread could not start.
    #[error("cannot start vCPU thread {0}")]
    Spawn(String, #[source] std::io::Error),
    /// A vCPU thread died.
    #[error("vCPU thread {0} died")]
    VcpuDied(u32),
    /// Attaching to the daemon failed.
    #[error("attaching to the daemon: {0}")]
    Attach(String),
    /// `--latency-phases` could not install its signal handler.
    #[error("cannot install the SIGUSR1 handler that splits the latency phases")]
    PhaseSignal(#[source] std::io::Error),
    /// The packet device or event poster could not be set up.
    #[error("device: {0}")]
    Device(String),
    /// The VM's device could not be wired in.
    #[error("wiring the VM's device")]
    Wire(#[from] crate::vmm::devices::WireError),
    /// The idle benchmark rings could not be made.
    #[error("cannot allocate the idle rings: {0}")]
    IdleRings(String),
}

/// Where the guest's console goes.
#[derive(Clone)]
pub enum ConsoleSink {
    /// This process's stdout.
    Stdout,
    /// A buffer (for probes and tests).
    Capture(Arc<Mutex<Vec<u8>>>),
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ConsoleSink::Stdout => std::io::stdout().lock().write_all(buf).map(|()| buf.len()),
            ConsoleSink::Capture(b) => {
                b.lock().map_err(|_| std::io::Error::other("console buffer poisoned"))?.extend_from_slice(buf);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ConsoleSink::Stdout => std::io::stdout().flush(),
            ConsoleSink::Capture(_) => Ok(()),
        }
    }
}

/// How to run.
pub struct RunOptions {
    /// The VM.
    pub spec: VmSpec,
    /// CPU of each vCPU (`None`: the default placement).
    pub vcpu_cpus: Option<Vec<usize>>,
    /// Sidecore CPUs (empty: no sidecore, exit paths only).
    pub sidecore_cpus: Vec<usize>,
    /// The console.
    pub console: ConsoleSink,
    /// Print `sidecall phase: N exits` lines.
    pub report_phases: bool,
    /// Where benchmark blocks go (bench and pagefault workloads).
    pub bench: Option<Arc<crate::bench::BenchCollector>>,
    /// Idle host-side rings added to sidecore 0 (bench only).
    pub idle_rings: u32,
    /// Have the sidecore daemon at this socket serve the rings.
    pub attach: Option<std::path::PathBuf>,
    /// The VM's name at the daemon (its metrics' `vm` label); `None`: the
    /// daemon's `vm<ID>`.
    pub vm_name: Option<String>,
    /// Park this VM's own sidecores after this long idle (`None`: spin).
    pub idle_park: Option<Duration>,
    /// Split the guest's call latencies into conditions A/B at each SIGUSR1
    /// and print them at the end ([`crate::bench::phases`]).
    pub latency_phases: bool,
    /// A device to wire up: the packet device, or the irq benchmark's
    /// poster ([`crate::vmm::devices`]).
    pub device: Option<crate::vmm::devices::EventDevice>,
}

impl RunOptions {
    /// Runs `spec` with the defaults: default placement, no sidecore, the
    /// console on stdout, no benchmark, no daemon, no device.
    pub fn new(spec: VmSpec) -> RunOptions {
        RunOptions {
            spec,
            vcpu_cpus: None,
            sidecore_cpus: Vec::new(),
            console: ConsoleSink::Stdout,
            report_phases: false,
            bench: None,
            idle_rings: 0,
            attach: None,
            vm_name: None,
            idle_park: None,
            latency_phases: false,
            device: None,
        }
    }
}

/// How one vCPU ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest reported this status.
    Status(u32),
    /// The guest faulted; the message has the registers.
    Fault(String),
}

/// What a run produced.
#[derive(Debug)]
pub struct RunReport {
    /// Per vCPU.
    pub ends: Vec<VcpuEnd>,
    /// Guest exits counted in each vCPU's sidecall phase, if it had one.
    pub phase_exits: Vec<Option<i64>>,
    /// Exit-path counters by op and status.
    pub exit_stats: sidecore_core::stats::StatsSnapshot,
    /// Sidecall counters by op and status.
    pub sidecall_stats: sidecore_core::stats::StatsSnapshot,
}

impl RunReport {
    /// The process exit code: 0 if every vCPU reported 0, else the first
    /// non-zero status (a fault counts as 1).
    pub fn exit_code(&self) -> u8 {
        for e in &self.ends {
            match e {
                VcpuEnd::Status(0) => {}
                VcpuEnd::Status(s) => return u8::try_from(*s).unwrap_or(1).max(1),
                VcpuEnd::Fault(_) => return 1,
            }
        }
        0
    }
}

/// Default placement: vCPU i on the i-th online CPU counted down from the
/// last, skipping sidecore CPUs where possible.
pub fn default_vcpu_cpus(online: &[usize], sidecores: &[usize], n: u32) -> Vec<usize> {
    let mut cands: Vec<usize> = online.iter().rev().copied().filter(|c| !sidecores.contains(c)).collect();
    if cands.is_empty() {
        cands = online.iter().rev().copied().collect();
    }
    if cands.is_empty() {
        return vec![0; n as usize];
    }
    (0..n as usize).map(|i| cands[i % cands.len()]).collect()
}

/// Checks that every CPU in `cpus` is online.
pub fn check_online(what: &'static str, cpus: &[usize], online: &[usize]) -> Result<(), RunError> {
    for &cpu in cpus {
        if !online.contains(&cpu) {
            return Err(RunError::CpuNotOnline { what, cpu, online: crate::host::format_cpu_list(online) });
        }
    }
    Ok(())
}

struct Shared {
    exit_device: Option<crate::vmm::devices::ExitPathDevice>,
    services: Arc<Services>,
    exit_stats: Arc<VmStats>,
    sidecores: Option<Arc<SidecoreSet>>,
    console: ConsoleSink,
    /// The guest's share of the console, for all its vCPUs.
    console_limit: Arc<Mutex<crate::vmm::console::ConsoleLimiter>>,
    report_phases: bool,
    bench: Option<Arc<crate::bench::BenchCollector>>,
    attachment: Option<Arc<crate::daemon::Attachment>>,
    /// Carries out the guest's stop/start writes (`None`: no service to
    /// stop, the writes are ignored).
    control: Option<Controller>,
}

/// What a daemon needs to serve this VM.
pub fn attach_request(vm: &Vm, packet_device: bool) -> crate::daemon::AttachRequest {
    crate::daemon::AttachRequest {
        packet_device,
        vcpus: vm.boot.nr_vcpus,
        backend: vm.backend.backend.name().into(),
        ram_size: vm.layout.ram_size,
        shared_gpa: vm.layout.shared_gpa,
        shared_size: vm.layout.shared_size,
        pool_gpa: shm_proto::layout::PT_POOL_GPA,
        pool_size: shm_proto::layout::PT_POOL_SIZE,
        image_gpa: shm_proto::layout::IMAGE_GPA,
        image_end: vm.layout.image_end,
        free_gpa: vm.layout.free_gpa,
        page_tables: true,
        cpuid: vm
            .cpuid
            .iter()
            .map(|t| t.entries().iter().map(sidecore_core::cpuid::CpuidEntry::words).collect())
            .collect(),
        name: None,
    }
}

/// Runs the VM to completion.
pub fn run(opts: RunOptions) -> Result<RunReport, RunError> {
    let online = crate::host::online_cpus()?;
    check_online("--sidecore", &opts.sidecore_cpus, &online)?;
    let vcpu_cpus = match &opts.vcpu_cpus {
        Some(list) => {
            check_online("--vcpu-cpus", list, &online)?;
            (0..opts.spec.vcpus as usize).map(|i| list[i % list.len().max(1)]).collect()
        }
        None => default_vcpu_cpus(&online, &opts.sidecore_cpus, opts.spec.vcpus),
    };
    let mut spec = opts.spec.clone();
    spec.sidecalls = !opts.sidecore_cpus.is_empty() || opts.attach.is_some();
    spec.shareable = opts.attach.is_some();
    let mut vm = Vm::build(&spec)?;
    // Before attaching: a script that waits for the attachment may signal
    // as soon as it sees it.
    let phases = if opts.latency_phases {
        Some(crate::bench::phases::PhaseSignal::install(vm.region.clone()).map_err(RunError::PhaseSignal)?)
    } else {
        None
    };
    // A daemon serves the packet device's posted path too: its socket and
    // vCPU 0's irqfd go along with the attach.
    let (daemon_device, device) = match (opts.attach.is_some(), opts.device) {
        (true, Some(EventDevice::Packet { socket, path: EventPath::Posted, .. })) => (Some(socket), None),
        (_, d) => (None, d),
    };
    let run_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attachment = match &opts.attach {
        Some(path) => {
            let host_fd = vm.host_memfd.as_ref().ok_or_else(|| RunError::Attach("no host-state memfd".into()))?;
            let irq0 = vm.irqfds.first().ok_or_else(|| RunError::Attach("the VM has no vCPU 0 interrupt".into()))?;
            let extra: Vec<std::os::fd::RawFd> = match &daemon_device {
                Some(sock) => vec![sock.as_raw_fd(), irq0.as_raw_fd()],
                None => Vec::new(),
            };
            let mut req = attach_request(&vm, daemon_device.is_some());
            req.name.clone_from(&opts.vm_name);
            let a = crate::daemon::Attachment::attach(path, req, &vm.memfd, host_fd, &vm.doorbell, &extra)
                .map_err(|e| RunError::Attach(crate::error_chain(&e)))?;
            tracing::info!(vm = a.vm, name = %a.name, cpu = ?a.sidecore_cpu, "attached to the sidecore daemon");
            let (region, over) = (vm.region.clone(), run_over.clone());
            a.watch(move || {
                // After the run the daemon may go whenever it likes.
                if !over.load(Ordering::Relaxed) {
                    tracing::warn!("the sidecore daemon hung up: the guest goes on by the exit paths");
                    mark_sidecore_lost(&region);
                }
            })
            .map_err(|e| RunError::Attach(crate::error_chain(&e)))?;
            Some(Arc::new(a))
        }
        None => None,
    };

    let services = Arc::new(vm_services(vm.cpuid.clone(), Some(vm.pte_service()?), vm.host.clone())?);
    let sidecall_stats = Arc::new(VmStats::default());
    let sidecores = start_sidecores_with_idle(
        &opts.sidecore_cpus,
        &vm.region,
        spec.vcpus,
        &services,
        &sidecall_stats,
        &vm.doorbell,
        opts.idle_rings,
        opts.idle_park,
    )?
    .map(Arc::new);
    let exit_device = match device {
        Some(d) => crate::vmm::devices::wire(d, &vm, sidecores.as_deref().map(|s| s as &dyn DeviceHost))?,
        None => None,
    };
    let control = controller(sidecores.clone(), attachment.clone(), &vm.region)?;
    let shared = Arc::new(Shared {
        control,
        exit_device,
        services,
        exit_stats: Arc::new(VmStats::default()),
        sidecores: sidecores.clone(),
        console: opts.console.clone(),
        console_limit: Arc::new(Mutex::new(crate::vmm::console::ConsoleLimiter::new(std::time::Instant::now()))),
        report_phases: opts.report_phases,
        bench: opts.bench.clone(),
        attachment,
    });

    let vcpus = std::mem::take(&mut vm.vcpus);
    let vm = Arc::new(vm);
    let mut threads = Vec::new();
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        let cpu = vcpu_cpus[i as usize];
        let (vm, shared) = (vm.clone(), shared.clone());
        let t = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || vcpu_thread(i, vcpu, cpu, &vm, &shared))
            .map_err(|e| RunError::Spawn(format!("vcpu{i}"), e))?;
        threads.push(t);
    }
    let mut ends = Vec::new();
    let mut phase_exits = Vec::new();
    for (i, t) in threads.into_iter().enumerate() {
        let (end, phase) = t.join().map_err(|_| RunError::VcpuDied(u32::try_from(i).unwrap_or(u32::MAX)))?;
        ends.push(end);
        phase_exits.push(phase);
    }
    run_over.store(true, Ordering::Relaxed);
    // Before the final stop: a late start must not bring them back.
    if let Some(c) = &shared.control {
        c.shutdown();
    }
    if let Some(s) = &sidecores {
        s.stop()?;
    }
    // Guest-written: summed saturating.
    let guest_sidecalls: u64 = (0..spec.vcpus)
        .filter_map(|i| vm.region.vcpu(i))
        .fold(0u64, |n, b| n.saturating_add(b.guest.sidecalls.load(Ordering::Relaxed)));
    if let Ok(mut l) = shared.console_limit.lock() {
        let dropped = l.report();
        let _ = shared.console.clone().write_all(&dropped);
    }
    let daemon_served = shared.attachment.as_ref().and_then(|a| a.served().ok());
    if let Some(served) = daemon_served {
        let mut c = shared.console.clone();
        let _ = writeln!(
            c,
            "attach: the guest got {guest_sidecalls} sidecall replies, the daemon counted {served} for this VM"
        );
    }
    if let Some(p) = phases {
        let mut c = shared.console.clone();
        let _ = c.write_all(crate::bench::phases::report(&p.finish(), vm.tsc_khz).as_bytes());
    }
    Ok(RunReport {
        ends,
        phase_exits,
        exit_stats: shared.exit_stats.snapshot(),
        sidecall_stats: sidecall_stats.snapshot(),
    })
}

/// This VMM's own sidecores for a VM's `vcpus` rings (`None` when `cpus`
/// is empty: no sidecore), one control for all of them (they are one VM's
/// to the sweep).
pub(crate) fn start_sidecores(
    cpus: &[usize],
    region: &Arc<sidecore_core::SharedRegion>,
    vcpus: u32,
    services: &Arc<Services>,
    stats: &Arc<VmStats>,
    doorbell: &Arc<std::os::fd::OwnedFd>,
    park: Option<Duration>,
) -> Result<Option<SidecoreSet>, RunError> {
    start_sidecores_with_idle(cpus, region, vcpus, services, stats, doorbell, 0, park)
}

#[allow(clippy::too_many_arguments)]
fn start_sidecores_with_idle(
    cpus: &[usize],
    region: &Arc<sidecore_core::SharedRegion>,
    vcpus: u32,
    services: &Arc<Services>,
    stats: &Arc<VmStats>,
    doorbell: &Arc<std::os::fd::OwnedFd>,
    idle_rings: u32,
    park: Option<Duration>,
) -> Result<Option<SidecoreSet>, RunError> {
    if cpus.is_empty() {
        return Ok(None);
    }
    let control = Arc::new(sidecore_core::VmControl::default());
    let rings = (0..vcpus)
        .filter_map(|i| {
            let mut r = RingRef::with_control(region.clone(), i, services.clone(), stats.clone(), control.clone())?;
            r.set_doorbell(doorbell.clone());
            Some(r)
        })
        .collect();
    Ok(Some(SidecoreSet::start_with_idle(cpus.to_vec(), rings, idle_rings, park)?))
}

/// The VM's one control worker: it stops and starts this VMM's sidecores,
/// or pauses and resumes the daemon's service of the VM. If that fails, the
/// guest is told its sidecore is lost and goes on by the exit paths.
fn controller(
    sidecores: Option<Arc<SidecoreSet>>,
    attachment: Option<Arc<crate::daemon::Attachment>>,
    region: &Arc<sidecore_core::SharedRegion>,
) -> Result<Option<Controller>, RunError> {
    let region = region.clone();
    let apply: Box<dyn FnMut(Want) + Send> = match (attachment, sidecores) {
        (Some(a), _) => Box::new(move |w| {
            if let Err(e) = a.set_paused(w == Want::Stop) {
                tracing::warn!(
                    "asking the daemon to {} this VM's service: {e}",
                    if w == Want::Stop { "pause" } else { "resume" }
                );
                mark_sidecore_lost(&region);
            }
        }),
        (None, Some(set)) => Box::new(move |w| {
            let r = if w == Want::Stop { set.stop() } else { set.restart() };
            if let Err(e) = r {
                tracing::warn!(
                    "{} the sidecores: {}",
                    if w == Want::Stop { "stopping" } else { "restarting" },
                    crate::error_chain(&e)
                );
                mark_sidecore_lost(&region);
            }
        }),
        (None, None) => return Ok(None),
    };
    Controller::spawn("sidecore-ctl", apply).map(Some).map_err(|e| RunError::Spawn("sidecore-ctl".into(), e))
}

/// Tells every vCPU of the VM that its sidecore will not come back.
pub(crate) fn mark_sidecore_lost(region: &sidecore_core::SharedRegion) {
    for v in 0..region.nr_vcpus() {
        if let Some(b) = region.vcpu(v) {
            b.host.sidecore_lost.store(1, Ordering::Release);
        }
    }
}

struct Phase {
    stats: Option<StatsSample>,
    runs: u64,
    fallbacks: u64,
}

fn vcpu_thread(i: u32, mut vcpu: VcpuFd, cpu: usize, vm: &Vm, shared: &Shared) -> (VcpuEnd, Option<i64>) {
    if let Err(e) = pin_current_thread(cpu) {
        return (VcpuEnd::Fault(format!("vCPU {i}: {e}")), None);
    }
    let Some(vs) = vm.region.vcpu(i) else {
        return (VcpuEnd::Fault(format!("vCPU {i}: no shared block")), None);
    };
    let kstats = VcpuStats::open(&vcpu).ok();
    let mut handler = ExitHandler {
        vcpu: i,
        shared: vs,
        services: &shared.services,
        stats: &shared.exit_stats,
        boot: &vm.boot,
        console: crate::vmm::console::GuardedConsole::new(shared.console.clone(), shared.console_limit.clone()),
        counts: Default::default(),
    };
    let mut runs = 0u64;
    let mut phase: Option<Phase> = None;
    let mut phase_exits = None;
    loop {
        let action = match vcpu.run() {
            Ok(exit) => {
                runs += 1;
                handler.handle(Exit::from(exit))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Action::Resume,
            Err(e) => Action::Fault(format!("KVM_RUN failed: {e}")),
        };
        match action {
            Action::Resume => {}
            Action::Exited(status) => return (VcpuEnd::Status(status), phase_exits),
            Action::Fault(msg) => {
                let regs = describe_registers(&vcpu);
                return (VcpuEnd::Fault(format!("vCPU {i}: {msg}\n  {regs}")), phase_exits);
            }
            Action::Marker(MARKER_SIDECALL_BEGIN) => {
                phase = Some(Phase {
                    stats: kstats.as_ref().and_then(|s| s.read().ok()),
                    runs,
                    fallbacks: vs.guest.fallbacks.load(Ordering::Relaxed),
                });
            }
            Action::Marker(MARKER_SIDECALL_END) => {
                if let Some(p) = phase.take() {
                    let after = kstats.as_ref().and_then(|s| s.read().ok());
                    let kernel = match (&p.stats, &after) {
                        (Some(a), Some(b)) => a.guest_exits_until(b),
                        _ => 0,
                    };
                    // The end marker is itself one KVM_RUN return and one
                    // exit: it closes the phase, it is not part of it.
                    let returns = i64::try_from(runs.saturating_sub(p.runs)).unwrap_or(i64::MAX).saturating_sub(1);
                    let kernel = kernel.saturating_sub(1);
                    // The guest writes its fallback counter: it may go
                    // backwards or jump to anything.
                    let fallbacks =
                        i64::try_from(vs.guest.fallbacks.load(Ordering::Relaxed).saturating_sub(p.fallbacks))
                            .unwrap_or(i64::MAX);
                    let n = kernel.max(0).saturating_add(returns).saturating_add(fallbacks);
                    phase_exits = Some(n);
                    if shared.report_phases {
                        let mut c = shared.console.clone();
                        let _ = writeln!(c, "sidecall phase: {n} exits (vCPU {i}: {kernel} in-kernel, {returns} to userspace, {fallbacks} fallbacks)");
                    }
                }
            }
            Action::Marker(_) => {}
            Action::PacketTx => {
                if let Some(d) = &shared.exit_device {
                    d.on_tx();
                }
            }
            Action::Bench(what) => {
                let gpa = shm_proto::layout::guest_bench_block(vm.layout.free_gpa, vm.boot.nr_vcpus, i);
                if let Some(b) = &shared.bench {
                    let probe = shared.sidecores.as_deref().map(|s| s as &dyn FloorProbe);
                    let done = if what == shm_proto::bench::BENCH_ARM_FLOOR {
                        b.arm_guest_floor(i, &vm.mem, gpa, probe)
                    } else {
                        b.on_block(i, &vm.mem, gpa, probe)
                    };
                    if let Err(e) = done {
                        return (VcpuEnd::Fault(e.to_string()), phase_exits);
                    }
                }
            }
            Action::Control(CONTROL_STOP_SIDECORE) => {
                if let Some(c) = &shared.control {
                    c.write(Want::Stop);
                }
            }
            Action::Control(CONTROL_START_SIDECORE) => {
                if let Some(c) = &shared.control {
                    c.write(Want::Serve);
                }
            }
            Action::Control(_) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn default_placement_counts_down_and_skips_sidecores() {
        assert_eq!(default_vcpu_cpus(&[0, 1], &[0], 1), vec![1]);
        assert_eq!(default_vcpu_cpus(&[0, 1], &[], 2), vec![1, 0]);
        assert_eq!(default_vcpu_cpus(&[0, 1], &[0], 2), vec![1, 1]);
        assert_eq!(default_vcpu_cpus(&[0], &[0], 2), vec![0, 0]);
        assert_eq!(default_vcpu_cpus(&[0, 1, 2, 3], &[0, 1], 3), vec![3, 2, 3]);
    }

    #[test]
    fn offline_cpu_is_named() {
        let e = check_online("--vcpu-cpus", &[5], &[0, 1]).unwrap_err().to_string();
        assert!(e.contains("--vcpu-cpus CPU 5 is not online"), "{e}");
        assert!(e.contains("0-1"), "{e}");
    }

    #[test]
    fn exit_code_follows_the_first_failure() {
        let r = |ends| RunReport {
            ends,
            phase_exits: vec![],
            exit_stats: Default::default(),
            sidecall_stats: Default::default(),
        };
        assert_eq!(r(vec![VcpuEnd::Status(0), VcpuEnd::Status(0)]).exit_code(), 0);
        assert_eq!(r(vec![VcpuEnd::Status(0), VcpuEnd::Status(3)]).exit_code(), 3);
        assert_eq!(r(vec![VcpuEnd::Fault("x".into())]).exit_code(), 1);
        assert_eq!(r(vec![VcpuEnd::Status(256)]).exit_code(), 1);
    }
}
