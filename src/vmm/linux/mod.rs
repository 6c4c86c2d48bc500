//! `sidecore run --kernel`: a Linux guest by the x86 boot protocol.
//!
//! The kernel is loaded with linux-loader's `BzImage`, entered at its
//! 64-bit entry point with the zero page built by
//! [`crate::vmm::loader::linux`] (e820 with the shared region reserved, the
//! command line naming it as `sidecore.region=GPA,SIZE`, the initrd). The
//! machine: KVM's in-kernel irqchip and PIT, COM1 from vm-superio
//! ([`console`]), ACPI tables for the CPUs and for power-off ([`acpi`]).
//! The application processors start by INIT/SIPI from the guest, as on a
//! PC. The run ends when the guest powers off or resets (status 0), panics
//! (the console's last lines are reported), or a vCPU fails.
//!
//! Hardware KVM only: PVM runs a guest natively only if its kernel is built
//! for PVM, and a stock kernel is not.

pub mod acpi;
pub mod console;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use shm_proto::boot::Backend;
use shm_proto::layout::{align_up, MAX_VCPUS, PAGE_SIZE, SHARED_ALIGN};
use shm_proto::op;
use shm_proto::ring::{region_size, word_ticket, Body};
use sidecore_core::cpuid::{CpuidEntry, CpuidTable};
use sidecore_core::hostmem::HostShared;
use sidecore_core::ring::SharedRegion;
use sidecore_core::service::{CallCtx, Services};
use sidecore_core::stats::VmStats;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::host::{self, BackendInfo};
use crate::vmm::loader::linux::{self as boot, BootPlan, LinuxBootError};
use crate::vmm::vm::{self, Layout, VmError};
use crate::vmm::{ConsoleSink, RunError, SidecoreSet};

use self::acpi::PowerRequest;
use self::console::{Com1, ConsoleTail, IrqLine, PanicSeen, COM1, COM1_GSI, COM1_PORTS};

/// Least guest RAM for a Linux guest, in MiB.
pub const MIN_MEM_MIB: u64 = 32;
/// Most guest RAM, in MiB: RAM stays below the 32-bit MMIO hole (the
/// IOAPIC at 0xfec00000, the LAPIC at 0xfee00000).
pub const MAX_MEM_MIB: u64 = 3072;
/// The command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

/// The zero page (`boot_params`).
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// The boot stack's top.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The boot page tables: PML4, PDPT, PD (the first GiB, 2 MiB pages).
pub const PML4_GPA: u64 = 0x9000;
const PDPT_GPA: u64 = 0xa000;
const PD_GPA: u64 = 0xb000;
/// The boot GDT.
pub const BOOT_GDT_GPA: u64 = 0x500;
/// The command line.
pub const CMDLINE_GPA: u64 = 0x2_0000;
/// i8042's command port: 0xfe there pulses the reset line.
pub const I8042_COMMAND: u16 = 0x64;
/// i8042's reset command.
pub const I8042_RESET: u8 = 0xfe;

/// What to boot.
#[derive(Clone, Debug)]
pub struct LinuxSpec {
    /// Where the kernel came from (for messages).
    pub kernel_path: String,
    /// The bzImage.
    pub kernel: Vec<u8>,
    /// The initrd: where it came from and its bytes.
    pub initrd: Option<(String, Vec<u8>)>,
    /// The user's command line (`None`: [`DEFAULT_CMDLINE`]).
    pub cmdline: Option<String>,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// Booting Linux failed before it ran.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// PVM cannot run a stock kernel natively.
    #[error("this host's KVM is the PVM backend, which runs a guest natively only if its kernel is built for PVM (CONFIG_PVM_GUEST, from the PVM patch set); a stock distribution kernel is not, and --kernel does not boot it here. Boot a stock kernel on hardware KVM (AMD-V or VT-x; the AMD-V test bed, scripts/hwkvm-vm.sh, is one), or run the bundled guest-agent here (leave out --kernel)")]
    Pvm,
    /// The vCPU count is out of range.
    #[error("--vcpus {0}: a Linux guest takes 1 to {max} vCPUs", max = MAX_VCPUS.min(254))]
    VcpuCount(u32),
    /// The RAM size is out of range.
    #[error("--mem {0}: a Linux guest takes {MIN_MEM_MIB} to {MAX_MEM_MIB} MiB")]
    MemSize(u64),
    /// The kernel, initrd or command line cannot be booted.
    #[error("{what} {path}: {source}")]
    Boot {
        /// Kernel, initrd or command line.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: LinuxBootError,
    },
    /// linux-loader refused the kernel.
    #[error("kernel {path}: linux-loader cannot load it: {detail}")]
    Load {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
    /// A KVM call failed.
    #[error("{what} failed")]
    Kvm {
        /// The call.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    GuestWrite(&'static str, #[source] vm_memory::GuestMemoryError),
    /// The ACPI tables cannot be built.
    #[error("ACPI tables: {0}")]
    Acpi(String),
    /// A part shared with the guest-agent's VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Running it failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> LinuxError {
    let what = what.into();
    move |e| LinuxError::Kvm { what, source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// `boot_params` as vm-memory writes it.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(linux_loader::loader::bootparam::boot_params);

// SAFETY: boot_params is a plain-old-data C struct (integers and arrays of
// them, packed as the kernel defines it): every bit pattern is valid and it
// has no padding that could leak host memory the struct does not own.
unsafe impl ByteValued for ZeroPage {}

/// Where the region goes: the top of RAM, 2 MiB aligned below its end;
/// returns (GPA, size the region needs, bytes reserved from the GPA).
pub fn region_place(ram: u64, vcpus: u32) -> (u64, u64, u64) {
    let size = align_up(region_size(vcpus), PAGE_SIZE);
    let gpa = (ram - size) & !(SHARED_ALIGN - 1);
    (gpa, size, ram - gpa)
}

/// The user's command line with what the VMM adds: `panic=-1` (a panic
/// resets at once, so the run ends) unless it sets `panic=`.
pub fn effective_cmdline(user: Option<&str>) -> String {
    let mut line = user.unwrap_or(DEFAULT_CMDLINE).trim().to_string();
    if !line.split_ascii_whitespace().any(|w| w.starts_with("panic=")) {
        if !line.is_empty() {
            line.push(' ');
        }
        line += "panic=-1";
    }
    line
}

/// Everything the zero page and the loader need, worked out from the
/// kernel's header, the initrd's length and the RAM: the pure part of the
/// boot, checked before KVM is touched.
pub fn plan(spec: &LinuxSpec) -> Result<(boot::KernelHeader, u64, BootPlan, Layout), LinuxError> {
    let kernel_err = |source| LinuxError::Boot { what: "kernel", path: spec.kernel_path.clone(), source };
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS.min(254) {
        return Err(LinuxError::VcpuCount(spec.vcpus));
    }
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&spec.mem_mib) {
        return Err(LinuxError::MemSize(spec.mem_mib));
    }
    let ram = spec.mem_mib << 20;
    let header = boot::parse_header(&spec.kernel).map_err(kernel_err)?;
    let (shared_gpa, shared_size, reserved) = region_place(ram, spec.vcpus);
    // The kernel and its decompression stay below the region.
    let load = header.load_address(shared_gpa).map_err(kernel_err)?;
    let kernel_end = load + header.init_size.max(header.payload_bytes);
    let e820 = boot::e820_map(ram, &[(shared_gpa, reserved)]).map_err(kernel_err)?;
    let cmdline =
        boot::command_line(&effective_cmdline(spec.cmdline.as_deref()), Some((shared_gpa, shared_size)), &header)
            .map_err(|source| LinuxError::Boot {
                what: "command line for kernel",
                path: spec.kernel_path.clone(),
                source,
            })?;
    let initrd = match &spec.initrd {
        Some((path, bytes)) => {
            let len = bytes.len() as u64;
            let at = boot::initrd_address(len, kernel_end, &e820, &header).map_err(|source| LinuxError::Boot {
                what: "initrd",
                path: path.clone(),
                source,
            })?;
            Some((at, len))
        }
        None => None,
    };
    let layout = Layout { ram_size: ram, image_end: kernel_end, shared_gpa, shared_size, free_gpa: ram };
    Ok((header, load, BootPlan { cmdline_addr: CMDLINE_GPA, cmdline, initrd, e820 }, layout))
}

/// A built Linux VM, ready to run.
pub struct LinuxVm {
    /// The backend.
    pub backend: BackendInfo,
    /// The VM.
    pub fd: VmFd,
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// Its memfd (for a daemon).
    pub memfd: std::fs::File,
    /// Layout (the region's place).
    pub layout: Layout,
    /// The shared region.
    pub region: Arc<SharedRegion>,
    /// Host-private state (the counter hypercall's counters).
    pub host: Arc<HostShared>,
    /// Its memfd, when shareable.
    pub host_memfd: Option<std::fs::File>,
    /// The doorbell.
    pub doorbell: Arc<std::os::fd::OwnedFd>,
    /// vCPUs.
    pub vcpus: Vec<VcpuFd>,
    /// Each vCPU's CPUID table as KVM holds it.
    pub cpuid: Vec<CpuidTable>,
    /// COM1.
    pub com1: Arc<Mutex<Com1>>,
    /// TSC kHz.
    pub tsc_khz: u64,
    /// The command line the guest got.
    pub cmdline: String,
}

impl LinuxVm {
    /// Builds the VM. `sidecalls`: a sidecore will serve the region (else
    /// every ring says the sidecore is lost, and the guest's client takes
    /// the exit paths at once); `shareable`: memory in memfds for a daemon.
    pub fn build(
        spec: &LinuxSpec,
        sidecalls: bool,
        shareable: bool,
        console: ConsoleSink,
    ) -> Result<LinuxVm, LinuxError> {
        let (header, load, plan, layout) = plan(spec)?;
        let kvm = host::open_kvm().map_err(VmError::from)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api).into());
        }
        let backend = host::detect_backend(&kvm).map_err(VmError::from)?;
        if backend.backend == Backend::Pvm {
            return Err(LinuxError::Pvm);
        }
        let tsc_khz = host::tsc_khz(&kvm).map_err(VmError::from)?.khz;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        if backend.backend == Backend::Vmx {
            // Real mode (the APs' trampoline) on VT-x needs these pages.
            fd.set_tss_address(0xfffb_d000).map_err(VmError::SetTss)?;
            fd.set_identity_map_address(0xfffb_c000).map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let (mem, memfd) = vm::guest_memory(layout.ram_size)?;
        vm::add_memslot(&fd, &mem, 0, 0, 0, layout.ram_size, 0, "guest RAM")?;
        write_boot(&mem, spec, &header, load, &plan, tsc_khz)?;

        let region = vm::init_region(&mem, &layout, spec.vcpus)?;
        if !sidecalls {
            for v in 0..spec.vcpus {
                if let Some(b) = region.vcpu(v) {
                    b.host.sidecore_lost.store(1, Ordering::Release);
                }
            }
        }
        let (host, host_memfd) = vm::host_shared(0, shareable)?;
        let doorbell = vm::doorbell(&fd)?;

        let irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| LinuxError::Kvm { what: "eventfd".into(), source })?;
        fd.register_irqfd(&irq, COM1_GSI).map_err(kvm_err("KVM_IRQFD (COM1)"))?;
        let com1 = Arc::new(Mutex::new(vm_superio::Serial::new(IrqLine(irq), ConsoleTail::new(console))));

        let mut vcpus = Vec::new();
        let mut cpuid = Vec::new();
        for i in 0..spec.vcpus {
            let (vcpu, table) = make_vcpu(&kvm, &fd, i, load)?;
            vcpus.push(vcpu);
            cpuid.push(table);
        }
        Ok(LinuxVm {
            backend,
            fd,
            mem: Arc::new(mem),
            memfd,
            layout,
            region,
            host,
            host_memfd,
            doorbell,
            vcpus,
            cpuid,
            com1,
            tsc_khz,
            cmdline: plan.cmdline,
        })
    }

    /// What a daemon needs to serve this VM: the region and the CPUID
    /// tables; no page-table pool (a Linux guest's tables are its own).
    pub fn attach_request(&self) -> crate::daemon::AttachRequest {
        crate::daemon::AttachRequest {
            packet_device: false,
            vcpus: u32::try_from(self.cpuid.len()).unwrap_or(u32::MAX),
            backend: self.backend.backend.name().into(),
            ram_size: self.layout.ram_size,
            shared_gpa: self.layout.shared_gpa,
            shared_size: self.layout.shared_size,
            pool_gpa: 0,
            pool_size: 0,
            image_gpa: 0,
            image_end: 0,
            free_gpa: self.layout.ram_size,
            cpuid: self.cpuid.iter().map(|t| t.entries().iter().map(CpuidEntry::words).collect()).collect(),
            name: None,
            page_tables: false,
        }
    }
}

/// Writes the kernel, initrd, command line, ACPI tables, zero page, boot
/// page tables and GDT.
fn write_boot(
    mem: &GuestMemoryMmap,
    spec: &LinuxSpec,
    header: &boot::KernelHeader,
    load: u64,
    plan: &BootPlan,
    _tsc_khz: u64,
) -> Result<(), LinuxError> {
    let mut image = std::io::Cursor::new(&spec.kernel);
    let loaded = BzImage::load(mem, Some(GuestAddress(load)), &mut image, None)
        .map_err(|e| LinuxError::Load { path: spec.kernel_path.clone(), detail: e.to_string() })?;
    debug_assert_eq!(loaded.kernel_load.0, load);
    debug_assert!(loaded.kernel_end <= load + header.init_size.max(header.payload_bytes));
    if let (Some((_, bytes)), Some((at, _))) = (&spec.initrd, plan.initrd) {
        mem.write_slice(bytes, GuestAddress(at)).map_err(|e| LinuxError::GuestWrite("initrd", e))?;
    }
    let mut line = plan.cmdline.clone().into_bytes();
    line.push(0);
    mem.write_slice(&line, GuestAddress(plan.cmdline_addr)).map_err(|e| LinuxError::GuestWrite("command line", e))?;
    let tables = acpi::tables(spec.vcpus).map_err(LinuxError::Acpi)?;
    mem.write_slice(&tables.bytes, GuestAddress(acpi::ACPI_GPA))
        .map_err(|e| LinuxError::GuestWrite("ACPI tables", e))?;
    let mut zp = boot::zero_page(&spec.kernel, plan).map_err(|source| LinuxError::Boot {
        what: "kernel",
        path: spec.kernel_path.clone(),
        source,
    })?;
    zp.acpi_rsdp_addr = tables.rsdp;
    mem.write_obj(ZeroPage(zp), GuestAddress(ZERO_PAGE_GPA)).map_err(|e| LinuxError::GuestWrite("zero page", e))?;
    // Identity map of the first GiB, 2 MiB pages: the kernel's 64-bit entry
    // needs its image, the zero page and the command line mapped.
    let pt = |e| LinuxError::GuestWrite("boot page tables", e);
    mem.write_obj(PDPT_GPA | 0x3, GuestAddress(PML4_GPA)).map_err(pt)?;
    mem.write_obj(PD_GPA | 0x3, GuestAddress(PDPT_GPA)).map_err(pt)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_GPA + i * 8)).map_err(pt)?;
    }
    for (i, d) in vm::GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT_GPA + 8 * i as u64)).map_err(|e| LinuxError::GuestWrite("GDT", e))?;
    }
    Ok(())
}

/// vCPU `i`: its CPUID (KVM's, with its APIC ID), LINT0 as ExtINT and
/// LINT1 as NMI (a PC's wiring); the BSP in 64-bit mode at the kernel's
/// 64-bit entry, the others waiting for the guest's INIT/SIPI.
fn make_vcpu(kvm: &Kvm, fd: &VmFd, i: u32, load: u64) -> Result<(VcpuFd, CpuidTable), LinuxError> {
    let err = |what: &str| kvm_err(format!("vCPU {i}: {what}"));
    let vcpu = fd.create_vcpu(u64::from(i)).map_err(err("KVM_CREATE_VCPU"))?;
    let cpuid = vm::vcpu_cpuid(kvm, i, vm::CpuidFor::Linux)?;
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    let mut lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    for (reg, mode) in [(LVT_LINT0, 0x700u32), (LVT_LINT1, 0x400u32)] {
        let mut v = [0u8; 4];
        for (k, b) in v.iter_mut().enumerate() {
            *b = lapic.regs[reg + k].to_ne_bytes()[0];
        }
        let cur = u32::from_le_bytes(v);
        // Delivery mode (bits 8-10) set, the mask (bit 16) cleared.
        let new = (cur & !0x1_0700) | mode;
        for (k, b) in new.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + k] = libc::c_char::from_ne_bytes([*b]);
        }
    }
    vcpu.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
    if i == 0 {
        let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        sregs.cr0 = 0x8000_0011; // PG ET PE
        sregs.cr3 = PML4_GPA;
        sregs.cr4 = 0x20; // PAE
        sregs.efer = 0x500; // LMA LME
        sregs.cs = vm::code_segment();
        let ds = vm::data_segment();
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (ds, ds, ds, ds, ds);
        sregs.gdt.base = BOOT_GDT_GPA;
        sregs.gdt.limit = u16::try_from(vm::GDT.len() * 8 - 1).unwrap_or(23);
        vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
        let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: load + 0x200,
            rsi: ZERO_PAGE_GPA,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rflags: 0x2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    }
    let held = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(err("KVM_GET_CPUID2"))?;
    let table = CpuidTable::for_this_host(held.as_slice().iter().map(vm::entry_from_kvm).collect());
    Ok((vcpu, table))
}

/// How to run a Linux guest.
pub struct LinuxOptions {
    /// The guest.
    pub spec: LinuxSpec,
    /// CPU of each vCPU (`None`: the default placement).
    pub vcpu_cpus: Option<Vec<usize>>,
    /// Sidecore CPUs (empty: none).
    pub sidecore_cpus: Vec<usize>,
    /// The console.
    pub console: ConsoleSink,
    /// Feed this process's stdin to the guest's console.
    pub stdin: bool,
    /// Have the daemon at this socket serve the rings.
    pub attach: Option<PathBuf>,
    /// The VM's name at the daemon.
    pub vm_name: Option<String>,
    /// Park this VM's own sidecores after this long idle.
    pub idle_park: Option<Duration>,
}

/// How a Linux run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinuxEnd {
    /// The guest powered off (ACPI soft off).
    PowerOff,
    /// The guest reset (ACPI reset register, or the i8042's reset line).
    Reset,
    /// The kernel panicked; the console's last lines.
    Panic(Vec<String>),
    /// A vCPU failed; what and the console's last lines.
    Fault(String, Vec<String>),
}

impl LinuxEnd {
    /// Whether the guest ended as it meant to.
    pub fn clean(&self) -> bool {
        matches!(self, LinuxEnd::PowerOff | LinuxEnd::Reset)
    }
}

/// What a Linux run produced.
#[derive(Debug)]
pub struct LinuxReport {
    /// How it ended.
    pub end: LinuxEnd,
    /// The command line the guest got.
    pub cmdline: String,
    /// Sidecall counters by op and status (this VMM's sidecores).
    pub sidecall_stats: sidecore_core::stats::StatsSnapshot,
    /// Exit-path (mailbox) counters by op and status.
    pub exit_stats: sidecore_core::stats::StatsSnapshot,
    /// Sidecall replies the guest counted, summed over its vCPUs.
    pub guest_sidecalls: u64,
    /// What the daemon counted for this VM, if one served it.
    pub daemon_served: Option<u64>,
}

/// What one exit asks of the run loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinuxAction {
    /// Go on.
    Resume,
    /// The guest asked for power off or reset.
    End(LinuxEnd),
    /// The exit-path mailbox holds a call.
    Mailbox,
    /// The vCPU cannot go on.
    Fault(String),
}

/// What a PIO write asks for, COM1 aside (pure: unit-tested with
/// fabricated exits).
pub fn port_write(port: u16, value: u8) -> LinuxAction {
    if let Some(r) = acpi::power_request(port, value) {
        return LinuxAction::End(match r {
            PowerRequest::Off => LinuxEnd::PowerOff,
            PowerRequest::Reset => LinuxEnd::Reset,
        });
    }
    match (port, value) {
        (I8042_COMMAND, I8042_RESET) => LinuxAction::End(LinuxEnd::Reset),
        (shm_proto::boot::PORT_CALL, _) => LinuxAction::Mailbox,
        // Everything else (the PIC's and PIT's are in the kernel; PCI
        // configuration, CMOS, the POST port) has no device here.
        _ => LinuxAction::Resume,
    }
}

/// The exit-path mailbox of the sidecall client: as the guest-agent's
/// ([`crate::vmm::vcpu`]), the request read once, the reply in the slot.
fn mailbox_call(region: &SharedRegion, services: &Services, stats: &VmStats, vcpu: u32) {
    let Some(shared) = region.vcpu(vcpu) else { return };
    let slot = &shared.exit_slot;
    let state = slot.state.load(Ordering::Acquire);
    let req = slot.read_body();
    let (status, words) = services.dispatch(&CallCtx { vcpu }, req.head, &req.words);
    // Masked to 16 bits.
    #[allow(clippy::cast_possible_truncation)]
    stats.count(op::op_class((req.head & 0xffff) as u16), status);
    slot.publish_reply(word_ticket(state), &Body { head: op::encode_status(status), words });
}

struct Shared {
    com1: Arc<Mutex<Com1>>,
    region: Arc<SharedRegion>,
    services: Arc<Services>,
    exit_stats: Arc<VmStats>,
    end: Mutex<Option<LinuxEnd>>,
    stop: AtomicBool,
}

impl Shared {
    fn finish(&self, end: LinuxEnd) {
        if let Ok(mut e) = self.end.lock() {
            if e.is_none() {
                *e = Some(end);
            }
        }
        self.stop.store(true, Ordering::Release);
    }

    fn last_lines(&self) -> Vec<String> {
        self.com1.lock().map(|s| s.writer().last_lines()).unwrap_or_default()
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN at the end.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn vcpu_loop(i: u32, mut vcpu: VcpuFd, cpu: usize, sh: &Shared) {
    if let Err(e) = sidecore_core::pin::pin_current_thread(cpu) {
        sh.finish(LinuxEnd::Fault(format!("vCPU {i}: {e}"), Vec::new()));
        return;
    }
    while !sh.stop.load(Ordering::Acquire) {
        let action = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if (COM1..COM1 + COM1_PORTS).contains(&port) {
                    let off = u8::try_from(port - COM1).unwrap_or(0);
                    let panic = match sh.com1.lock() {
                        Ok(mut s) => {
                            let _ = s.write(off, data.first().copied().unwrap_or(0));
                            s.writer().panic()
                        }
                        Err(_) => PanicSeen::None,
                    };
                    if panic == PanicSeen::Ended {
                        LinuxAction::End(LinuxEnd::Panic(Vec::new()))
                    } else {
                        LinuxAction::Resume
                    }
                } else {
                    port_write(port, data.first().copied().unwrap_or(0))
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if (COM1..COM1 + COM1_PORTS).contains(&port) {
                    let off = u8::try_from(port - COM1).unwrap_or(0);
                    let v = sh.com1.lock().map(|mut s| s.read(off)).unwrap_or(0xff);
                    data.fill(0);
                    if let Some(b) = data.first_mut() {
                        *b = v;
                    }
                } else if port == acpi::SLEEP_CONTROL_PORT + 1 {
                    data.fill(0);
                } else {
                    data.fill(0xff);
                }
                LinuxAction::Resume
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                LinuxAction::Resume
            }
            Ok(VcpuExit::MmioWrite(..) | VcpuExit::Hlt) => LinuxAction::Resume,
            Ok(VcpuExit::Shutdown) => LinuxAction::Fault("the guest shut down (triple fault)".into()),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => LinuxAction::End(LinuxEnd::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => LinuxAction::End(LinuxEnd::Reset),
                k => LinuxAction::Fault(format!("system event {k}")),
            },
            Ok(VcpuExit::InternalError) => LinuxAction::Fault("KVM internal error (emulation failure)".into()),
            Ok(VcpuExit::FailEntry(r, _)) => LinuxAction::Fault(format!("VM entry failed, hardware reason {r:#x}")),
            Ok(other) => LinuxAction::Fault(format!("unexpected exit: {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => LinuxAction::Resume,
            Err(e) => LinuxAction::Fault(format!("KVM_RUN failed: {e}")),
        };
        match action {
            LinuxAction::Resume => {}
            LinuxAction::Mailbox => mailbox_call(&sh.region, &sh.services, &sh.exit_stats, i),
            LinuxAction::End(LinuxEnd::Panic(_)) => {
                sh.finish(LinuxEnd::Panic(sh.last_lines()));
                return;
            }
            LinuxAction::End(end) => {
                // A panic that resets (panic=-1) is a panic, not a reset.
                let panicked = sh.com1.lock().map(|s| s.writer().panic() != PanicSeen::None).unwrap_or(false);
                sh.finish(if panicked { LinuxEnd::Panic(sh.last_lines()) } else { end });
                return;
            }
            LinuxAction::Fault(msg) => {
                let regs = crate::vmm::vcpu::describe_registers(&vcpu);
                sh.finish(LinuxEnd::Fault(format!("vCPU {i}: {msg}\n  {regs}"), sh.last_lines()));
                return;
            }
        }
    }
}

/// Feeds stdin to COM1 until EOF (a detached thread: it may outlive the run
/// blocked in read, which is harmless in the CLI).
fn feed_stdin(com1: Arc<Mutex<Com1>>) {
    let _ = std::thread::Builder::new().name("console-in".into()).spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                return;
            }
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let took = com1.lock().ok().and_then(|mut s| s.enqueue_raw_bytes(rest).ok()).unwrap_or(0);
                rest = &rest[took..];
                if took == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    });
}

/// Boots the Linux guest and runs it to its end.
pub fn run(opts: LinuxOptions) -> Result<LinuxReport, LinuxError> {
    let online = host::online_cpus().map_err(RunError::from)?;
    crate::vmm::check_online("--sidecore", &opts.sidecore_cpus, &online)?;
    let vcpu_cpus = match &opts.vcpu_cpus {
        Some(list) => {
            crate::vmm::check_online("--vcpu-cpus", list, &online)?;
            (0..opts.spec.vcpus as usize).map(|i| list[i % list.len().max(1)]).collect::<Vec<_>>()
        }
        None => crate::vmm::default_vcpu_cpus(&online, &opts.sidecore_cpus, opts.spec.vcpus),
    };
    let sidecalls = !opts.sidecore_cpus.is_empty() || opts.attach.is_some();
    let mut vm = LinuxVm::build(&opts.spec, sidecalls, opts.attach.is_some(), opts.console.clone())?;
    let run_over = Arc::new(AtomicBool::new(false));
    let attachment = match &opts.attach {
        Some(path) => {
            let host_fd = vm.host_memfd.as_ref().ok_or_else(|| RunError::Attach("no host-state memfd".into()))?;
            let mut req = vm.attach_request();
            req.name.clone_from(&opts.vm_name);
            let a = crate::daemon::Attachment::attach(path, req, &vm.memfd, host_fd, &vm.doorbell, &[])
                .map_err(|e| RunError::Attach(crate::error_chain(&e)))?;
            tracing::info!(vm = a.vm, name = %a.name, cpu = ?a.sidecore_cpu, "attached to the sidecore daemon");
            let (region, over) = (vm.region.clone(), run_over.clone());
            a.watch(move || {
                if !over.load(Ordering::Relaxed) {
                    tracing::warn!("the sidecore daemon hung up: the guest goes on by the exit paths");
                    crate::vmm::mark_sidecore_lost(&region);
                }
            })
            .map_err(|e| RunError::Attach(crate::error_chain(&e)))?;
            Some(a)
        }
        None => None,
    };
    let mut services = Services::new(vm.cpuid.clone());
    sidecore_core::hypercalls::register_vmm_hypercalls(&mut services, vm.host.clone()).map_err(RunError::from)?;
    let services = Arc::new(services);
    let sidecall_stats = Arc::new(VmStats::default());
    let sidecores: Option<SidecoreSet> = crate::vmm::start_sidecores(
        &opts.sidecore_cpus,
        &vm.region,
        opts.spec.vcpus,
        &services,
        &sidecall_stats,
        &vm.doorbell,
        opts.idle_park,
    )?;
    if opts.stdin {
        feed_stdin(vm.com1.clone());
    }
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| LinuxError::Kvm { what: "installing the vCPU kick signal handler".into(), source: e.into() })?;
    let shared = Arc::new(Shared {
        com1: vm.com1.clone(),
        region: vm.region.clone(),
        services,
        exit_stats: Arc::new(VmStats::default()),
        end: Mutex::new(None),
        stop: AtomicBool::new(false),
    });
    let mut threads = Vec::new();
    for (i, vcpu) in std::mem::take(&mut vm.vcpus).into_iter().enumerate() {
        let idx = u32::try_from(i).unwrap_or(u32::MAX);
        let (cpu, sh) = (vcpu_cpus[i], shared.clone());
        let t = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || vcpu_loop(idx, vcpu, cpu, &sh))
            .map_err(|e| RunError::Spawn(format!("vcpu{i}"), e))?;
        threads.push(t);
    }
    // Until every vCPU thread is done: once the run is over, the ones still
    // in KVM_RUN (an AP halted, a vCPU spinning) are kicked out, again and
    // again (a kick that lands just before KVM_RUN is lost).
    use vmm_sys_util::signal::Killable;
    loop {
        if threads.iter().all(std::thread::JoinHandle::is_finished) {
            break;
        }
        if shared.stop.load(Ordering::Acquire) {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(kick_signal());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for (i, t) in threads.into_iter().enumerate() {
        t.join().map_err(|_| RunError::VcpuDied(u32::try_from(i).unwrap_or(u32::MAX)))?;
    }
    run_over.store(true, Ordering::Relaxed);
    if let Some(s) = &sidecores {
        s.stop()?;
    }
    let guest_sidecalls = (0..opts.spec.vcpus)
        .filter_map(|i| vm.region.vcpu(i))
        .fold(0u64, |n, b| n.saturating_add(b.guest.sidecalls.load(Ordering::Relaxed)));
    let daemon_served = attachment.as_ref().and_then(|a| a.served().ok());
    let _ = vm.com1.lock().map(|mut s| s.writer_mut().flush());
    let end = shared
        .end
        .lock()
        .ok()
        .and_then(|e| e.clone())
        .unwrap_or_else(|| LinuxEnd::Fault("every vCPU thread ended without an end of the run".into(), Vec::new()));
    let _ = std::io::stdout().flush();
    Ok(LinuxReport {
        end,
        cmdline: vm.cmdline.clone(),
        sidecall_stats: sidecall_stats.snapshot(),
        exit_stats: shared.exit_stats.snapshot(),
        guest_sidecalls,
        daemon_served,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_and_reset_writes_end_the_run_and_the_mailbox_is_served() {
        use acpi::{RESET_PORT, RESET_VALUE, SLEEP_CONTROL_PORT, SLP_EN, SLP_TYP_S5};
        assert_eq!(port_write(SLEEP_CONTROL_PORT, SLP_TYP_S5 << 2 | SLP_EN), LinuxAction::End(LinuxEnd::PowerOff));
        assert_eq!(port_write(RESET_PORT, RESET_VALUE), LinuxAction::End(LinuxEnd::Reset));
        assert_eq!(port_write(I8042_COMMAND, I8042_RESET), LinuxAction::End(LinuxEnd::Reset));
        assert_eq!(port_write(I8042_COMMAND, 0x60), LinuxAction::Resume);
        assert_eq!(port_write(shm_proto::boot::PORT_CALL, 0), LinuxAction::Mailbox);
        assert_eq!(port_write(0x80, 0x12), LinuxAction::Resume, "POST codes are ignored");
        assert_eq!(port_write(0xcf8, 0), LinuxAction::Resume, "no PCI");
        assert!(LinuxEnd::PowerOff.clean() && LinuxEnd::Reset.clean());
        assert!(!LinuxEnd::Panic(vec![]).clean());
    }

    #[test]
    fn the_vmm_adds_panic_reset_unless_the_user_chose() {
        assert_eq!(effective_cmdline(None), "console=ttyS0 panic=-1");
        assert_eq!(effective_cmdline(Some("console=ttyS0 panic=5")), "console=ttyS0 panic=5");
        assert_eq!(effective_cmdline(Some("  quiet ")), "quiet panic=-1");
        assert_eq!(effective_cmdline(Some("")), "panic=-1");
    }

    #[test]
    fn the_region_sits_reserved_at_the_top_of_ram() {
        let (gpa, size, reserved) = region_place(256 << 20, 2);
        assert_eq!(gpa % SHARED_ALIGN, 0);
        assert!(size >= region_size(2));
        assert_eq!(gpa + reserved, 256 << 20);
        assert!(reserved >= size);
    }
}
