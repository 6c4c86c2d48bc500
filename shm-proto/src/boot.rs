//! The boot-info page: everything the VMM tells the guest at start. One
//! guest image serves every backend because the trap instructions to use are
//! named here, not compiled in.

/// Magic of the boot-info page ("SCBOOT\0\1").
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"SCBOOT\x00\x01");

/// The KVM backend the VM runs on.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Hardware KVM on Intel VT-x (kvm_intel).
    Vmx = 1,
    /// Hardware KVM on AMD-V (kvm_amd).
    Svm = 2,
    /// The software PVM backend (kvm_pvm).
    Pvm = 3,
}

impl Backend {
    /// Decodes the boot-info value.
    pub const fn from_u32(v: u32) -> Option<Backend> {
        match v {
            1 => Some(Backend::Vmx),
            2 => Some(Backend::Svm),
            3 => Some(Backend::Pvm),
            _ => None,
        }
    }

    /// Lower-case name as `sidecore info` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Vmx => "vmx",
            Backend::Svm => "svm",
            Backend::Pvm => "pvm",
        }
    }

    /// The in-kernel hypercall instruction of this backend.
    pub const fn hypercall_insn(self) -> HypercallInsn {
        match self {
            Backend::Vmx => HypercallInsn::Vmcall,
            Backend::Svm => HypercallInsn::Vmmcall,
            Backend::Pvm => HypercallInsn::PvmInt1b,
        }
    }

    /// The instruction that reaches this KVM's CPUID table.
    pub const fn cpuid_insn(self) -> CpuidInsn {
        match self {
            Backend::Vmx | Backend::Svm => CpuidInsn::Cpuid,
            Backend::Pvm => CpuidInsn::PvmInt1a,
        }
    }
}

/// Instruction for the in-kernel hypercall (the null call's in-kernel trap
/// path). Number in RAX, arguments in RBX, RCX, RDX, result in RAX.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallInsn {
    /// `vmcall` (VT-x).
    Vmcall = 1,
    /// `vmmcall` (AMD-V).
    Vmmcall = 2,
    /// `int $0x1b` (PVM).
    PvmInt1b = 3,
}

impl HypercallInsn {
    /// Decodes the boot-info value.
    pub const fn from_u32(v: u32) -> Option<HypercallInsn> {
        match v {
            1 => Some(HypercallInsn::Vmcall),
            2 => Some(HypercallInsn::Vmmcall),
            3 => Some(HypercallInsn::PvmInt1b),
            _ => None,
        }
    }

    /// What KVM returns in RAX for a hypercall number it does not know.
    pub const fn unknown_result(self) -> i64 {
        match self {
            // -KVM_ENOSYS
            HypercallInsn::Vmcall | HypercallInsn::Vmmcall => -1000,
            // -ENOSYS
            HypercallInsn::PvmInt1b => -38,
        }
    }
}

/// Instruction that reaches the CPUID table the VMM gave KVM_SET_CPUID2.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidInsn {
    /// `cpuid` (hardware KVM).
    Cpuid = 1,
    /// `int $0x1a` (PVM; a raw `cpuid` is answered by the outer hypervisor).
    PvmInt1a = 2,
}

impl CpuidInsn {
    /// Decodes the boot-info value.
    pub const fn from_u32(v: u32) -> Option<CpuidInsn> {
        match v {
            1 => Some(CpuidInsn::Cpuid),
            2 => Some(CpuidInsn::PvmInt1a),
            _ => None,
        }
    }
}

/// The workloads the guest-agent knows, by boot-info number.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Prints a line with a value it computed.
    Hello = 1,
    /// 10^8 register-only loop iterations, timed: shows native execution.
    Spin = 2,
    /// Runs every path and checks every answer.
    Selftest = 3,
    /// Times ops on paths and hands the samples to the VMM (`sidecore bench`).
    Bench = 4,
    /// Maps fresh pages one by one and touches each, by trap and by sidecall
    /// (the paper's page-fault case); the bench with only that op.
    Pagefault = 5,
    /// A hostile guest: writes garbage into its ring for `args[1]` ms and
    /// checks that every reply is a correct answer or an error status.
    Chaos = 6,
    /// Wake-up latency: `args[0]` rounds (default 50) of staying idle for
    /// `args[1]` µs (default 5000, long enough for a sidecore to park), then
    /// timing one null sidecall.
    Wake = 7,
    /// Packet echo: sets up the packet device's rx queue and sends back
    /// every packet it receives, `args[0]` packets (0: until `args[1]` ms
    /// pass with none). `args[2]` = 1: the exit path (interrupt for rx, PIO
    /// doorbell for tx); else posted events. `args[3]`: µs to spin before
    /// halting when idle (posted path; default 200).
    Echo = 8,
    /// Event responder for `sidecore bench --ops irq`: acknowledges every
    /// test event, `args[0]` of them; `args[2]` = 1: only by interrupt (spins
    /// with interrupts on), else by polling the posted events.
    Irq = 9,
    /// A hostile guest against the GPA space: loads its own CR3 with tables
    /// mapping every GPA up to 2^40, triggers `args[0]` shadow zaps (default
    /// 1000) by page-table changes, and checks that every read returns its
    /// own RAM or an MMIO exit's value, never a marker it wrote outside RAM.
    Gpascan = 10,
    /// A guest hammering the control port: `args[0]` stop/start writes
    /// (default 100,000) in a pseudo-random order, a final start, then a
    /// check that calls are answered by sidecall again and none was lost.
    Toggle = 11,
}

impl Workload {
    /// Every workload, for `--help` and lookups.
    pub const ALL: [Workload; 11] = [
        Workload::Hello,
        Workload::Spin,
        Workload::Selftest,
        Workload::Bench,
        Workload::Pagefault,
        Workload::Chaos,
        Workload::Wake,
        Workload::Echo,
        Workload::Irq,
        Workload::Gpascan,
        Workload::Toggle,
    ];

    /// Decodes the boot-info value.
    pub const fn from_u32(v: u32) -> Option<Workload> {
        match v {
            1 => Some(Workload::Hello),
            2 => Some(Workload::Spin),
            3 => Some(Workload::Selftest),
            4 => Some(Workload::Bench),
            5 => Some(Workload::Pagefault),
            6 => Some(Workload::Chaos),
            7 => Some(Workload::Wake),
            8 => Some(Workload::Echo),
            9 => Some(Workload::Irq),
            10 => Some(Workload::Gpascan),
            11 => Some(Workload::Toggle),
            _ => None,
        }
    }

    /// The name the command line uses.
    pub const fn name(self) -> &'static str {
        match self {
            Workload::Hello => "hello",
            Workload::Spin => "spin",
            Workload::Selftest => "selftest",
            Workload::Bench => "bench",
            Workload::Pagefault => "pagefault",
            Workload::Chaos => "chaos",
            Workload::Wake => "wake",
            Workload::Echo => "echo",
            Workload::Irq => "irq",
            Workload::Gpascan => "gpascan",
            Workload::Toggle => "toggle",
        }
    }
}

/// Sidecall reply bounds, one per counter class of [`crate::op::op_class`],
/// in TSC cycles.
pub const TIMEOUT_CLASSES: usize = crate::op::OP_CLASS_COUNT;

/// PIO port: console line. EAX = length of the line in the vCPU's console
/// buffer.
pub const PORT_CONSOLE: u16 = 0x3f0;
/// PIO port: the guest's exit status (EAX), after which the vCPU stops.
pub const PORT_EXIT: u16 = 0x3f1;
/// PIO port: the exit-path call; the request is in the vCPU's exit slot.
pub const PORT_CALL: u16 = 0x3f2;
/// PIO port: a phase marker ([`MARKER_SIDECALL_BEGIN`], …) in EAX.
pub const PORT_MARKER: u16 = 0x3f3;
/// PIO port: a request to the VMM's control plane ([`CONTROL_STOP_SIDECORE`], …).
pub const PORT_CONTROL: u16 = 0x3f4;
/// PIO port: the null call's userspace exit path (data ignored).
pub const PORT_NULL: u16 = 0x3f5;
/// PIO port: the doorbell that wakes a parked sidecore. The VMM registers
/// it as a KVM_IOEVENTFD, so ringing it stays in the kernel (~2.5 µs here)
/// and never reaches the VMM's run loop.
pub const PORT_DOORBELL: u16 = 0x3f7;
/// PIO port: a benchmark block is ready in the vCPU's
/// [`crate::bench::BenchBlock`].
pub const PORT_BENCH: u16 = 0x3f6;
/// PIO port the guest writes after queueing packets on the packet device's
/// tx queue, on the exit path (the VMM sends them).
pub const PORT_PKT_TX: u16 = 0x3e0;

/// CPUID leaf whose EBX, ECX, EDX the VMM sets to [`CPUID_SIGNATURE`] in the
/// table it gives KVM_SET_CPUID2: only an answer from that table carries it.
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// "SidecoreVMM\0" as EBX, ECX, EDX.
pub const CPUID_SIGNATURE: [u32; 3] =
    [u32::from_le_bytes(*b"Side"), u32::from_le_bytes(*b"core"), u32::from_le_bytes(*b"VMM\0")];

/// Marker: a phase that must cause no exit begins.
pub const MARKER_SIDECALL_BEGIN: u32 = 1;
/// Marker: that phase ends.
pub const MARKER_SIDECALL_END: u32 = 2;
/// Control: stop this VM's sidecore(s) a short while (2 ms) from now, while
/// the guest keeps calling (tests the fallback). The VMM carries out the
/// latest write only: a start before the stop lands cancels it, and a stop
/// while stopped does nothing.
pub const CONTROL_STOP_SIDECORE: u32 = 1;
/// Control: start the sidecore(s) again (at once; nothing if running).
pub const CONTROL_START_SIDECORE: u32 = 2;

/// The boot-info page at [`crate::layout::BOOT_INFO_GPA`]. Written by the
/// VMM before the first KVM_RUN, read-only to the guest.
#[repr(C, align(4096))]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`crate::ABI_VERSION`].
    pub abi_version: u32,
    /// [`Backend`].
    pub backend: u32,
    /// [`HypercallInsn`] for the in-kernel null call.
    pub hypercall_insn: u32,
    /// [`CpuidInsn`] for CPUID.
    pub cpuid_insn: u32,
    /// Number of vCPUs.
    pub nr_vcpus: u32,
    /// [`Workload`] to run.
    pub workload: u32,
    /// TSC frequency in kHz (guest TSC = host TSC on every backend here).
    pub tsc_khz: u64,
    /// Workload arguments (their meaning depends on the workload; 0 means
    /// the workload's default).
    pub args: [u64; 8],
    /// Guest RAM size in bytes (RAM is `[0, ram_size)`).
    pub ram_size: u64,
    /// The page-table pool's GPA.
    pub pt_pool_gpa: u64,
    /// The page-table pool's size in bytes.
    pub pt_pool_size: u64,
    /// End of the image (exclusive).
    pub image_end: u64,
    /// The shared region's GPA ([`crate::ring::RegionHeader`] first).
    pub shared_gpa: u64,
    /// The shared region's size.
    pub shared_size: u64,
    /// First byte of free RAM.
    pub free_gpa: u64,
    /// 1 when a sidecore serves this VM's rings and the guest should use
    /// sidecalls; 0 to use the exit paths only.
    pub sidecalls: u32,
    /// PIO port for the console ([`PORT_CONSOLE`]).
    pub console_port: u16,
    /// PIO port for the exit status ([`PORT_EXIT`]).
    pub exit_port: u16,
    /// PIO port for exit-path calls ([`PORT_CALL`]).
    pub call_port: u16,
    /// PIO port for phase markers ([`PORT_MARKER`]).
    pub marker_port: u16,
    /// PIO port for control requests ([`PORT_CONTROL`]).
    pub control_port: u16,
    /// PIO port of the null call's userspace exit path ([`PORT_NULL`]).
    pub null_port: u16,
    /// How long a sidecall waits for its reply before it falls back to the
    /// exit path, per op class, in TSC cycles.
    pub sidecall_timeout: [u64; TIMEOUT_CLASSES],
    /// After a fallback, how long (TSC cycles) the guest uses the exit path
    /// before it probes the sidecore again (unless the heartbeat moves).
    pub sidecall_backoff: u64,
    /// GPA of the PML4 (CR3) the VMM built.
    pub pt_root: u64,
    /// First pool page the VMM left free: the guest takes new table pages
    /// from here (the host checks every one).
    pub pt_pool_free: u64,
    /// Where the guest stores a page-table entry to take the page-table
    /// service's trap path: the entry at pool GPA `t` is stored at
    /// `pt_trap_gpa + (t - pt_pool_gpa)`, a read-only view of the pool that
    /// exits to the VMM as MMIO. 0 means the pool itself (PVM: the pool is a
    /// read-only memslot). On hardware KVM the pool is ordinary memory that
    /// the guest maps read-only, because the nested page walker may need
    /// write access to the guest's tables (EPT A/D bits, AMD's walker), and
    /// the trap view is [`crate::layout::PT_TRAP_GPA`].
    pub pt_trap_gpa: u64,
    /// How long (TSC cycles) the guest waits for a claimed call while the
    /// heartbeat stands still before it gives the call up: the sidecore is
    /// stopped or hung. A NULL or CPUID call then takes the exit path, any
    /// other reports [`crate::op::Status::HostError`].
    pub sidecore_liveness: u64,
}

const _: () = assert!(core::mem::size_of::<BootInfo>() == 4096);
const _: () = assert!(core::mem::offset_of!(BootInfo, magic) == 0);
const _: () = assert!(core::mem::offset_of!(BootInfo, abi_version) == 8);
const _: () = assert!(core::mem::offset_of!(BootInfo, backend) == 12);
const _: () = assert!(core::mem::offset_of!(BootInfo, hypercall_insn) == 16);
const _: () = assert!(core::mem::offset_of!(BootInfo, cpuid_insn) == 20);
const _: () = assert!(core::mem::offset_of!(BootInfo, nr_vcpus) == 24);
const _: () = assert!(core::mem::offset_of!(BootInfo, workload) == 28);
const _: () = assert!(core::mem::offset_of!(BootInfo, tsc_khz) == 32);
const _: () = assert!(core::mem::offset_of!(BootInfo, args) == 40);
const _: () = assert!(core::mem::offset_of!(BootInfo, ram_size) == 104);
const _: () = assert!(core::mem::offset_of!(BootInfo, free_gpa) == 152);
const _: () = assert!(core::mem::offset_of!(BootInfo, sidecalls) == 160);
const _: () = assert!(core::mem::offset_of!(BootInfo, console_port) == 164);
const _: () = assert!(core::mem::offset_of!(BootInfo, null_port) == 174);
const _: () = assert!(core::mem::offset_of!(BootInfo, sidecall_timeout) == 176);
const _: () = assert!(core::mem::offset_of!(BootInfo, sidecall_backoff) == 216);
const _: () = assert!(core::mem::offset_of!(BootInfo, pt_root) == 224);
const _: () = assert!(core::mem::offset_of!(BootInfo, pt_pool_free) == 232);
const _: () = assert!(core::mem::offset_of!(BootInfo, pt_trap_gpa) == 240);
const _: () = assert!(core::mem::offset_of!(BootInfo, sidecore_liveness) == 248);

impl BootInfo {
    /// A boot-info page for `backend` with every field but the layout filled
    /// with its default.
    pub const fn new(backend: Backend) -> BootInfo {
        BootInfo {
            magic: BOOT_MAGIC,
            abi_version: crate::ABI_VERSION,
            backend: backend as u32,
            hypercall_insn: backend.hypercall_insn() as u32,
            cpuid_insn: backend.cpuid_insn() as u32,
            nr_vcpus: 1,
            workload: Workload::Hello as u32,
            tsc_khz: 0,
            args: [0; 8],
            ram_size: 0,
            pt_pool_gpa: crate::layout::PT_POOL_GPA,
            pt_pool_size: crate::layout::PT_POOL_SIZE,
            image_end: 0,
            shared_gpa: 0,
            shared_size: 0,
            free_gpa: 0,
            sidecalls: 0,
            console_port: PORT_CONSOLE,
            exit_port: PORT_EXIT,
            call_port: PORT_CALL,
            marker_port: PORT_MARKER,
            control_port: PORT_CONTROL,
            null_port: PORT_NULL,
            sidecall_timeout: [0; TIMEOUT_CLASSES],
            sidecall_backoff: 0,
            pt_root: 0,
            pt_pool_free: 0,
            pt_trap_gpa: 0,
            sidecore_liveness: 0,
        }
    }

    /// GPA at which the entry at pool GPA `entry_gpa` is stored to take the
    /// trap path.
    pub const fn pt_trap_addr(&self, entry_gpa: u64) -> u64 {
        if self.pt_trap_gpa == 0 {
            entry_gpa
        } else {
            entry_gpa - self.pt_pool_gpa + self.pt_trap_gpa
        }
    }

    /// The pool GPA that a trap-path store at `gpa` stands for, if `gpa` is
    /// 8-byte aligned and inside the trap view.
    pub const fn pt_trap_target(&self, gpa: u64) -> Option<u64> {
        let base = if self.pt_trap_gpa == 0 { self.pt_pool_gpa } else { self.pt_trap_gpa };
        if !gpa.is_multiple_of(8) || gpa < base || gpa - base >= self.pt_pool_size {
            return None;
        }
        Some(gpa - base + self.pt_pool_gpa)
    }

    /// The PIO port for benchmark blocks.
    pub const fn bench_port(&self) -> u16 {
        PORT_BENCH
    }

    /// Checks what the guest must be able to trust before it uses anything
    /// else: magic, version, and that the enums decode.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.magic != BOOT_MAGIC {
            return Err("boot-info magic");
        }
        if self.abi_version != crate::ABI_VERSION {
            return Err("boot-info ABI version");
        }
        if Backend::from_u32(self.backend).is_none() {
            return Err("boot-info backend");
        }
        if HypercallInsn::from_u32(self.hypercall_insn).is_none() {
            return Err("boot-info hypercall instruction");
        }
        if CpuidInsn::from_u32(self.cpuid_insn).is_none() {
            return Err("boot-info cpuid instruction");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn new_boot_info_checks() {
        for b in [Backend::Vmx, Backend::Svm, Backend::Pvm] {
            let bi = BootInfo::new(b);
            assert_eq!(bi.check(), Ok(()));
            assert_eq!(Backend::from_u32(bi.backend), Some(b));
        }
    }

    #[test]
    fn pvm_uses_its_own_trap_instructions() {
        let bi = BootInfo::new(Backend::Pvm);
        assert_eq!(HypercallInsn::from_u32(bi.hypercall_insn), Some(HypercallInsn::PvmInt1b));
        assert_eq!(CpuidInsn::from_u32(bi.cpuid_insn), Some(CpuidInsn::PvmInt1a));
        assert_eq!(HypercallInsn::PvmInt1b.unknown_result(), -38);
        assert_eq!(HypercallInsn::Vmcall.unknown_result(), -1000);
        assert_eq!(Backend::Svm.hypercall_insn(), HypercallInsn::Vmmcall);
    }

    #[test]
    fn trap_view_maps_to_the_pool_and_back() {
        let pvm = BootInfo::new(Backend::Pvm);
        let e = pvm.pt_pool_gpa + 0x1008;
        assert_eq!(pvm.pt_trap_addr(e), e);
        assert_eq!(pvm.pt_trap_target(e), Some(e));
        let mut hw = BootInfo::new(Backend::Svm);
        hw.pt_trap_gpa = crate::layout::PT_TRAP_GPA;
        let t = hw.pt_trap_addr(e);
        assert_eq!(t, crate::layout::PT_TRAP_GPA + 0x1008);
        assert_eq!(hw.pt_trap_target(t), Some(e));
        // The pool itself, misaligned stores and the end of the view are not
        // trap-path stores on hardware.
        assert_eq!(hw.pt_trap_target(e), None);
        assert_eq!(hw.pt_trap_target(t + 1), None);
        assert_eq!(hw.pt_trap_target(crate::layout::PT_TRAP_GPA + hw.pt_pool_size), None);
        assert_eq!(
            hw.pt_trap_target(crate::layout::PT_TRAP_GPA + hw.pt_pool_size - 8),
            Some(hw.pt_pool_gpa + hw.pt_pool_size - 8)
        );
        assert_eq!(pvm.pt_trap_target(pvm.pt_pool_gpa - 8), None);
    }

    #[test]
    fn bad_boot_info_is_refused() {
        let mut bi = BootInfo::new(Backend::Pvm);
        bi.magic = 0;
        assert!(bi.check().is_err());
        let mut bi = BootInfo::new(Backend::Pvm);
        bi.abi_version += 1;
        assert!(bi.check().is_err());
        let mut bi = BootInfo::new(Backend::Pvm);
        bi.cpuid_insn = 9;
        assert!(bi.check().is_err());
    }

    #[test]
    fn workload_names_are_unique() {
        for (i, a) in Workload::ALL.iter().enumerate() {
            assert_eq!(Workload::from_u32(*a as u32), Some(*a));
            for b in &Workload::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
