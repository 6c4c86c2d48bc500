//! Facts about the host, for `sidecore info` and for building VMs: which KVM
//! backend serves /dev/kvm, the online and isolated CPUs, and the TSC
//! frequency. Everything that can be decided without KVM is a pure function
//! so that the hardware-KVM paths are unit-tested on the PVM machines too.

pub mod memfd;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use shm_proto::boot::Backend;

/// Where the kernel lists loaded modules.
pub const SYS_MODULE: &str = "/sys/module";
/// The CPUs the kernel has online.
pub const CPU_ONLINE: &str = "/sys/devices/system/cpu/online";
/// The CPUs isolated from the scheduler (`isolcpus=`); empty when none.
pub const CPU_ISOLATED: &str = "/sys/devices/system/cpu/isolated";
/// Where the fallback TSC frequency and the CPU flags come from.
pub const PROC_CPUINFO: &str = "/proc/cpuinfo";

/// PVM: reads [`PVM_SIGNATURE`] on the PVM backend; absent on hardware KVM.
pub const MSR_PVM_SIGNATURE: u32 = 0x4b56_4d11;
/// PVM: feature bits (`0x1ff` when native execution is allowed).
pub const MSR_PVM_FEATURES: u32 = 0x4b56_4d12;
/// PVM: the TSC frequency in kHz.
pub const MSR_PVM_TSC_KHZ: u32 = 0x4b56_4d13;
/// What [`MSR_PVM_SIGNATURE`] reads on PVM ("PVM").
pub const PVM_SIGNATURE: u64 = 0x4d_5650;

/// Highest CPU count Linux can be built for (`CONFIG_NR_CPUS` ≤ 8192); a
/// larger number in a CPU list is a typo, and bounding it keeps a range like
/// `0-99999999999` from allocating gigabytes.
const MAX_CPUS: usize = 8192;

/// [`TscFreq::source`] when KVM_GET_TSC_KHZ answered.
pub const TSC_FROM_KVM: &str = "KVM_GET_TSC_KHZ";
/// [`TscFreq::source`] when the PVM MSR answered.
pub const TSC_FROM_PVM_MSR: &str = "PVM MSR 0x4b564d13";
/// [`TscFreq::source`] when only /proc/cpuinfo had a value (approximate: it
/// is the current core clock, which equals the TSC only without scaling).
pub const TSC_FROM_CPUINFO: &str = "/proc/cpuinfo cpu MHz";
/// [`TscFreq::source`] when CPUID leaf 0x15 gave the crystal clock and the
/// TSC/crystal ratio (with leaf 0x16's base clock when the crystal is not
/// listed), as the kernel computes it.
pub const TSC_FROM_CPUID_15H: &str = "CPUID leaf 0x15";
/// [`TscFreq::source`] when the hypervisor's timing leaf 0x40000010 gave it.
pub const TSC_FROM_CPUID_HV: &str = "CPUID leaf 0x40000010 (hypervisor timing)";
/// [`TscFreq::source`] when it was measured against CLOCK_MONOTONIC.
pub const TSC_FROM_CALIBRATION: &str = "rdtsc calibrated against CLOCK_MONOTONIC over 20 ms";

/// Finding out about the host failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// /dev/kvm is absent.
    #[error("/dev/kvm does not exist — load kvm_intel, kvm_amd or kvm_pvm, or run on a host with virtualization")]
    KvmMissing,
    /// /dev/kvm exists but this user may not open it.
    #[error("/dev/kvm: permission denied — add your user to group kvm (sudo usermod -aG kvm $USER) and log in again")]
    KvmPermission,
    /// Opening /dev/kvm failed for another reason.
    #[error("cannot open /dev/kvm read-write: {strerror} (errno {errno}) — check that a KVM module is loaded (lsmod | grep kvm) and dmesg")]
    KvmOpen {
        /// The errno of open(2).
        errno: i32,
        /// Its strerror text.
        strerror: String,
    },
    /// A sysfs or procfs file could not be read.
    #[error("cannot read {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A CPU list has an entry that is not a CPU number or range.
    #[error("CPU list entry \"{token}\": {reason} — expected a list like \"0-3,8\"")]
    CpuList {
        /// The offending entry, as written.
        token: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A kernel CPU-list file holds something [`parse_cpu_list`] rejects.
    #[error("{path} does not hold a CPU list")]
    CpuListFile {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: Box<HostError>,
    },
    /// KVM_CREATE_VM for a probe VM failed.
    #[error("cannot create a probe VM (KVM_CREATE_VM) — check dmesg and free memory")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VCPU for a probe vCPU failed.
    #[error("cannot create a probe vCPU (KVM_CREATE_VCPU) — check dmesg")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    /// The KVM_GET_MSRS buffer could not be built.
    #[error("cannot build the KVM_GET_MSRS buffer for MSR {index:#x}")]
    MsrBuffer {
        /// The MSR.
        index: u32,
        /// Why.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// The KVM_GET_MSRS ioctl itself failed (an unknown MSR is not a failure:
    /// KVM then reads zero MSRs).
    #[error("KVM_GET_MSRS of MSR {index:#x} failed")]
    GetMsrs {
        /// The MSR.
        index: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// No backend could be identified.
    #[error(
        "cannot tell which KVM backend serves /dev/kvm: none of kvm_pvm, kvm_intel, kvm_amd is in {SYS_MODULE}, \
         MSR 0x4b564d11 does not read the PVM signature and /proc/cpuinfo has neither vmx nor svm — \
         load the module for this CPU (modprobe kvm_intel / kvm_amd / kvm_pvm)"
    )]
    NoBackend,
    /// Every source of the TSC frequency failed.
    #[error("cannot determine the TSC frequency ({tried}) — the host TSC may be unstable; check dmesg for \"tsc\"")]
    TscUnknown {
        /// What each source said, in the order tried.
        tried: String,
    },
}

/// The hypervisor signature this host's CPU reports at CPUID 0x4000_0000
/// (12 bytes, e.g. `KVMKVMKVM` under an outer KVM), if it reports one.
pub fn hypervisor_signature() -> Option<String> {
    let hv = core::arch::x86_64::__cpuid(1).ecx & (1 << 31) != 0;
    if !hv {
        return None;
    }
    // Leaf 0x4000_0000 is defined whenever the hypervisor bit is set.
    let r = core::arch::x86_64::__cpuid(0x4000_0000);
    let mut sig = Vec::with_capacity(12);
    for w in [r.ebx, r.ecx, r.edx] {
        sig.extend_from_slice(&w.to_le_bytes());
    }
    Some(String::from_utf8_lossy(&sig).trim_end_matches('\0').to_string())
}

/// The emulator that translates this host's own instructions, if the host is
/// one (then no guest of it runs natively, whatever KVM does), from the
/// hypervisor signature.
pub fn cpu_emulator(signature: Option<&str>) -> Option<&'static str> {
    match signature {
        Some("TCGTCGTCGTCG") => Some("QEMU TCG"),
        _ => None,
    }
}

/// Which KVM backend is loaded, from `sys_module` (normally `/sys/module`):
/// `kvm_pvm`, `kvm_intel`, `kvm_amd`, in that order (pvm wins if present).
pub fn detect_backend_module(sys_module: &Path) -> Option<Backend> {
    [("kvm_pvm", Backend::Pvm), ("kvm_intel", Backend::Vmx), ("kvm_amd", Backend::Svm)]
        .into_iter()
        .find(|(name, _)| sys_module.join(name).is_dir())
        .map(|(_, backend)| backend)
}

/// Parses a Linux CPU list like `"0-3,8,10-11"` into sorted, unique CPU
/// numbers. Surrounding whitespace and a trailing newline are ignored; `""`
/// and `"\n"` give an empty list. Errors name the bad entry.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, HostError> {
    let mut cpus = Vec::new();
    let list = s.trim();
    if list.is_empty() {
        return Ok(cpus);
    }
    for raw in list.split(',') {
        let token = raw.trim();
        let (first, last) = match token.split_once('-') {
            None => {
                let cpu = parse_cpu_number(token, token)?;
                (cpu, cpu)
            }
            Some((start, end)) => {
                let first = parse_cpu_number(start.trim(), token)?;
                let last = parse_cpu_number(end.trim(), token)?;
                if last < first {
                    return Err(cpu_list_error(token, "range ends below its start"));
                }
                (first, last)
            }
        };
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// One CPU number of `token`; digits only (no sign), below [`MAX_CPUS`].
fn parse_cpu_number(number: &str, token: &str) -> Result<usize, HostError> {
    if number.is_empty() {
        return Err(cpu_list_error(token, "missing CPU number"));
    }
    if !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(cpu_list_error(token, "not a CPU number or range"));
    }
    match number.parse::<usize>() {
        Ok(cpu) if cpu < MAX_CPUS => Ok(cpu),
        _ => Err(cpu_list_error(token, "CPU number beyond Linux's limit of 8191")),
    }
}

fn cpu_list_error(token: &str, reason: &'static str) -> HostError {
    HostError::CpuList { token: token.to_owned(), reason }
}

/// Formats CPU numbers in the compact kernel form (`"0-3,8"`); runs of two
/// or more consecutive CPUs become ranges. Order and duplicates in `cpus` do
/// not matter; an empty slice gives `""`.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut rest = sorted.as_slice();
    while let Some((&first, tail)) = rest.split_first() {
        // `sorted` is strictly increasing, so `tail[k] > first + k` and
        // neither `first + k` nor `prev + 1` can overflow.
        let run = tail.iter().zip(first..).take_while(|&(&cpu, prev)| cpu == prev + 1).count();
        let last = if run == 0 { first } else { tail[run - 1] };
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&first.to_string());
        if run > 0 {
            out.push('-');
            out.push_str(&last.to_string());
        }
        rest = &tail[run..];
    }
    out
}

/// The online CPUs ([`CPU_ONLINE`]).
pub fn online_cpus() -> Result<Vec<usize>, HostError> {
    read_cpu_list_file(Path::new(CPU_ONLINE))
}

/// The CPUs isolated from the scheduler ([`CPU_ISOLATED`]); empty when the
/// kernel was booted without `isolcpus=`.
pub fn isolated_cpus() -> Result<Vec<usize>, HostError> {
    read_cpu_list_file(Path::new(CPU_ISOLATED))
}

fn read_cpu_list_file(path: &Path) -> Result<Vec<usize>, HostError> {
    let text = read_file(path)?;
    parse_cpu_list(&text).map_err(|e| HostError::CpuListFile { path: path.to_owned(), source: Box::new(e) })
}

fn read_file(path: &Path) -> Result<String, HostError> {
    fs::read_to_string(path).map_err(|source| HostError::ReadFile { path: path.to_owned(), source })
}

/// Opens /dev/kvm read-write (close-on-exec), turning the usual failures
/// into errors that say what to do.
pub fn open_kvm() -> Result<Kvm, HostError> {
    Kvm::new().map_err(|e| kvm_open_error(e.errno()))
}

/// Maps the errno of opening /dev/kvm to a [`HostError`]: `ENOENT` →
/// [`HostError::KvmMissing`], `EACCES`/`EPERM` → [`HostError::KvmPermission`],
/// anything else → [`HostError::KvmOpen`] with its strerror.
pub fn kvm_open_error(errno: i32) -> HostError {
    match errno {
        libc::ENOENT => HostError::KvmMissing,
        libc::EACCES | libc::EPERM => HostError::KvmPermission,
        _ => HostError::KvmOpen { errno, strerror: strerror(errno) },
    }
}

/// The strerror text of `errno`, without the " (os error N)" that
/// `io::Error`'s Display appends.
fn strerror(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// The PVM detection MSRs as a probe vCPU reads them; `None` where
/// KVM_GET_MSRS read nothing (always so on hardware KVM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvmMsrs {
    /// [`MSR_PVM_SIGNATURE`]; [`PVM_SIGNATURE`] on PVM.
    pub signature: Option<u64>,
    /// [`MSR_PVM_FEATURES`].
    pub features: Option<u64>,
    /// [`MSR_PVM_TSC_KHZ`].
    pub tsc_khz: Option<u64>,
}

impl PvmMsrs {
    /// Whether the signature MSR reads "PVM".
    pub fn signature_ok(&self) -> bool {
        self.signature == Some(PVM_SIGNATURE)
    }
}

/// Creates a throwaway VM and vCPU. The VmFd is returned so that the caller
/// keeps it open for as long as it uses the vCPU.
fn probe_vcpu(kvm: &Kvm) -> Result<(VmFd, VcpuFd), HostError> {
    let vm = kvm.create_vm().map_err(HostError::CreateVm)?;
    let vcpu = vm.create_vcpu(0).map_err(HostError::CreateVcpu)?;
    Ok((vm, vcpu))
}

/// Reads one MSR; `Ok(None)` when KVM does not know it. Each MSR is read on
/// its own because KVM_GET_MSRS stops at the first unknown one.
fn read_msr(vcpu: &VcpuFd, index: u32) -> Result<Option<u64>, HostError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
        .map_err(|source| HostError::MsrBuffer { index, source })?;
    let read = vcpu.get_msrs(&mut msrs).map_err(|source| HostError::GetMsrs { index, source })?;
    if read == 1 {
        Ok(msrs.as_slice().first().map(|e| e.data))
    } else {
        Ok(None)
    }
}

fn read_pvm_msrs_on(vcpu: &VcpuFd) -> Result<PvmMsrs, HostError> {
    Ok(PvmMsrs {
        signature: read_msr(vcpu, MSR_PVM_SIGNATURE)?,
        features: read_msr(vcpu, MSR_PVM_FEATURES)?,
        tsc_khz: read_msr(vcpu, MSR_PVM_TSC_KHZ)?,
    })
}

/// Reads the PVM signature, feature and TSC MSRs on a throwaway VM and vCPU.
/// Fields are `None` where KVM does not know the MSR (hardware KVM); only a
/// failing VM/vCPU creation or ioctl is an error.
pub fn read_pvm_msrs(kvm: &Kvm) -> Result<PvmMsrs, HostError> {
    let (_vm, vcpu) = probe_vcpu(kvm)?;
    read_pvm_msrs_on(&vcpu)
}

/// The KVM backend serving /dev/kvm, and how sure we are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// The backend.
    pub backend: Backend,
    /// Whether MSR 0x4b564d11 reads the PVM signature.
    pub pvm_signature_ok: bool,
    /// Doubts to show the user (`sidecore info`, logs); empty when the
    /// module list and the signature MSR agree.
    pub warnings: Vec<String>,
}

/// Identifies the backend: the module in /sys/module (pvm wins), confirmed
/// for PVM by the signature MSR. kvm_pvm loaded without the signature is
/// still PVM, with a warning. Without any module, the signature MSR and then
/// the vmx/svm CPU flags decide, with a warning.
pub fn detect_backend(kvm: &Kvm) -> Result<BackendInfo, HostError> {
    let module = detect_backend_module(Path::new(SYS_MODULE));
    let msrs = read_pvm_msrs(kvm)?;
    // The CPU flags only matter when no module is listed; an unreadable
    // /proc/cpuinfo then just means "no flags".
    let cpuinfo = if module.is_none() { fs::read_to_string(PROC_CPUINFO).unwrap_or_default() } else { String::new() };
    decide_backend(module, msrs.signature, &cpuinfo)
}

/// The decision of [`detect_backend`], from what it read.
fn decide_backend(module: Option<Backend>, signature: Option<u64>, cpuinfo: &str) -> Result<BackendInfo, HostError> {
    let pvm_signature_ok = signature == Some(PVM_SIGNATURE);
    let mut warnings = Vec::new();
    let backend = match module {
        Some(Backend::Pvm) => {
            if !pvm_signature_ok {
                warnings.push(match signature {
                    Some(v) => format!(
                        "kvm_pvm is loaded but MSR 0x4b564d11 reads {v:#x}, not {PVM_SIGNATURE:#x} (\"PVM\"): \
                         /dev/kvm may be served by another backend and the guest's PVM trap instructions may fault"
                    ),
                    None => "kvm_pvm is loaded but MSR 0x4b564d11 (PVM signature) cannot be read: \
                             /dev/kvm may be served by another backend and the guest's PVM trap instructions may fault"
                        .to_owned(),
                });
            }
            Backend::Pvm
        }
        Some(hw) => {
            // The PVM MSRs do not exist on hardware KVM, so a signature means
            // /dev/kvm is PVM whatever else is loaded.
            if pvm_signature_ok {
                warnings.push(format!(
                    "{} is loaded but MSR 0x4b564d11 reads the PVM signature: using pvm",
                    module_name(hw)
                ));
                Backend::Pvm
            } else {
                hw
            }
        }
        None if pvm_signature_ok => {
            warnings
                .push(format!("kvm_pvm is not in {SYS_MODULE} but MSR 0x4b564d11 reads the PVM signature: using pvm"));
            Backend::Pvm
        }
        None if cpu_has_flag(cpuinfo, "vmx") => {
            warnings
                .push(format!("kvm_intel is not in {SYS_MODULE} (built into the kernel?); the CPU has vmx: using vmx"));
            Backend::Vmx
        }
        None if cpu_has_flag(cpuinfo, "svm") => {
            warnings
                .push(format!("kvm_amd is not in {SYS_MODULE} (built into the kernel?); the CPU has svm: using svm"));
            Backend::Svm
        }
        None => return Err(HostError::NoBackend),
    };
    Ok(BackendInfo { backend, pvm_signature_ok, warnings })
}

fn module_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Vmx => "kvm_intel",
        Backend::Svm => "kvm_amd",
        Backend::Pvm => "kvm_pvm",
    }
}

/// Whether the first `flags` line of /proc/cpuinfo text lists `flag`.
fn cpu_has_flag(cpuinfo: &str, flag: &str) -> bool {
    cpuinfo_field(cpuinfo, "flags").is_some_and(|flags| flags.split_whitespace().any(|f| f == flag))
}

/// The value of the first `name : value` line of /proc/cpuinfo text.
fn cpuinfo_field<'a>(cpuinfo: &'a str, name: &str) -> Option<&'a str> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == name).then(|| value.trim())
    })
}

/// The first `cpu MHz` of /proc/cpuinfo text, in kHz (`"2399.998"` →
/// 2_399_998). Parsed as decimal digits to stay exact and cast-free.
fn cpuinfo_khz(cpuinfo: &str) -> Option<u64> {
    let mhz = cpuinfo_field(cpuinfo, "cpu MHz")?;
    let (int, frac) = mhz.split_once('.').unwrap_or((mhz, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut khz = int.parse::<u64>().ok()?.checked_mul(1000)?;
    // The first three fractional digits are kHz; the rest is below 1 kHz.
    for (digit, scale) in frac.bytes().zip([100, 10, 1]) {
        khz = khz.checked_add(u64::from(digit - b'0') * scale)?;
    }
    (khz > 0).then_some(khz)
}

/// The TSC frequency and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscFreq {
    /// kHz; never 0.
    pub khz: u64,
    /// [`TSC_FROM_KVM`], [`TSC_FROM_PVM_MSR`] or [`TSC_FROM_CPUINFO`].
    pub source: &'static str,
}

/// The TSC frequency: KVM_GET_TSC_KHZ on a throwaway vCPU, else the PVM TSC
/// MSR, else `cpu MHz` of /proc/cpuinfo (approximate).
pub fn tsc_khz(kvm: &Kvm) -> Result<TscFreq, HostError> {
    let (_vm, vcpu) = probe_vcpu(kvm)?;
    let mut tried = Vec::new();
    match vcpu.get_tsc_khz() {
        Ok(khz) if khz > 0 => return Ok(TscFreq { khz: u64::from(khz), source: TSC_FROM_KVM }),
        Ok(_) => tried.push("KVM_GET_TSC_KHZ returned 0".to_owned()),
        // kvm-ioctls 0.25 reports this ioctl's errno as -1, so there is no
        // cause worth keeping.
        Err(_) => tried.push("KVM_GET_TSC_KHZ failed".to_owned()),
    }
    match read_msr(&vcpu, MSR_PVM_TSC_KHZ) {
        Ok(Some(khz)) if khz > 0 => return Ok(TscFreq { khz, source: TSC_FROM_PVM_MSR }),
        Ok(Some(_)) => tried.push("MSR 0x4b564d13 reads 0".to_owned()),
        Ok(None) => tried.push("no MSR 0x4b564d13 (not PVM)".to_owned()),
        Err(e) => tried.push(e.to_string()),
    }
    match fs::read_to_string(PROC_CPUINFO) {
        Ok(text) => match cpuinfo_khz(&text) {
            Some(khz) => return Ok(TscFreq { khz, source: TSC_FROM_CPUINFO }),
            None => tried.push(format!("no usable \"cpu MHz\" in {PROC_CPUINFO}")),
        },
        Err(e) => tried.push(format!("cannot read {PROC_CPUINFO}: {e}")),
    }
    Err(HostError::TscUnknown { tried: tried.join("; ") })
}

/// TSC kHz from CPUID leaf 0x15 (`eax` denominator, `ebx` numerator, `ecx`
/// crystal Hz) as the kernel's `native_calibrate_tsc` computes it (without
/// its per-model crystal table); when the crystal is not listed, leaf 0x16's
/// base MHz, which is then the TSC rate.
fn cpuid15_khz(eax: u32, ebx: u32, ecx: u32, base_mhz: Option<u32>) -> Option<u64> {
    if eax == 0 || ebx == 0 {
        return None;
    }
    let khz = if ecx != 0 {
        u64::from(ecx) * u64::from(ebx) / u64::from(eax) / 1000
    } else {
        // The crystal is base × eax / ebx, so the TSC is the base clock.
        u64::from(base_mhz?) * 1000
    };
    (khz > 0).then_some(khz)
}

/// kHz from `cycles` counted over `ns` nanoseconds.
fn calibrated_khz(cycles: u64, ns: u64) -> Option<u64> {
    if ns == 0 {
        return None;
    }
    let khz = u64::try_from(u128::from(cycles) * 1_000_000 / u128::from(ns)).ok()?;
    (khz > 0).then_some(khz)
}

/// The TSC and CLOCK_MONOTONIC read together: of a few tries, the one with
/// the shortest gap between the two TSC reads around the clock read (an
/// interrupt in between would skew the pair). Returns (TSC midpoint, ns).
fn tsc_with_monotonic() -> (u64, u64) {
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..8 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        let t0 = sidecore_core::tsc::rdtsc();
        // SAFETY: ts is a valid timespec to write; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let t1 = sidecore_core::tsc::rdtsc();
        let ns = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0);
        let gap = t1.wrapping_sub(t0);
        if gap < best.0 {
            best = (gap, t0 + gap / 2, ns);
        }
    }
    (best.1, best.2)
}

/// The TSC frequency without /dev/kvm (for the daemon, which runs without
/// devices): CPUID leaf 0x15 when the CPU lists its TSC ratio, else the
/// hypervisor's timing leaf, else rdtsc measured against CLOCK_MONOTONIC
/// over 20 ms (the kernel's clock, itself calibrated at boot). Takes up to
/// 20 ms; `None` only if the clocks do not advance.
pub fn tsc_khz_without_kvm() -> Option<TscFreq> {
    use core::arch::x86_64::__cpuid;
    let max = __cpuid(0).eax;
    if max >= 0x15 {
        let l15 = __cpuid(0x15);
        let base = (max >= 0x16).then(|| __cpuid(0x16).eax & 0xffff);
        if let Some(khz) = cpuid15_khz(l15.eax, l15.ebx, l15.ecx, base) {
            return Some(TscFreq { khz, source: TSC_FROM_CPUID_15H });
        }
    }
    // Leaf 0x40000000 and up mean something only under a hypervisor.
    if __cpuid(1).ecx & (1 << 31) != 0 {
        let hv_max = __cpuid(0x4000_0000).eax;
        if (0x4000_0010..0x4001_0000).contains(&hv_max) {
            let khz = u64::from(__cpuid(0x4000_0010).eax);
            if khz > 0 {
                return Some(TscFreq { khz, source: TSC_FROM_CPUID_HV });
            }
        }
    }
    let (t0, ns0) = tsc_with_monotonic();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (t1, ns1) = tsc_with_monotonic();
    calibrated_khz(t1.wrapping_sub(t0), ns1.saturating_sub(ns0))
        .map(|khz| TscFreq { khz, source: TSC_FROM_CALIBRATION })
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    fn bad_token(s: &str) -> (String, &'static str) {
        match parse_cpu_list(s) {
            Err(HostError::CpuList { token, reason }) => (token, reason),
            other => panic!("{s:?}: expected a CpuList error, got {other:?}"),
        }
    }

    #[test]
    fn tsc_rate_from_cpuid_leaf_15_and_calibration() {
        // A 24 MHz crystal with ratio 176/2: 2.112 GHz.
        assert_eq!(cpuid15_khz(2, 176, 24_000_000, None), Some(2_112_000));
        // Crystal not listed: derived from a 2100 MHz base clock.
        assert_eq!(cpuid15_khz(2, 176, 0, Some(2100)), Some(2_100_000));
        assert_eq!(cpuid15_khz(0, 176, 24_000_000, None), None, "no ratio");
        assert_eq!(cpuid15_khz(2, 0, 24_000_000, None), None, "no ratio");
        assert_eq!(cpuid15_khz(2, 176, 0, None), None, "no crystal, no base clock");
        assert_eq!(cpuid15_khz(2, 176, 0, Some(0)), None);
        assert_eq!(calibrated_khz(46_000_000, 20_000_000), Some(2_300_000));
        assert_eq!(calibrated_khz(1, 0), None);
        assert_eq!(calibrated_khz(0, 20_000_000), None);
    }

    #[test]
    fn the_tsc_rate_without_kvm_is_near_the_measured_one() {
        let f = tsc_khz_without_kvm().expect("a TSC rate without KVM");
        let (t0, ns0) = tsc_with_monotonic();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (t1, ns1) = tsc_with_monotonic();
        let measured = calibrated_khz(t1 - t0, ns1 - ns0).expect("clocks advance");
        let off = f.khz.abs_diff(measured);
        assert!(off * 100 < measured, "{} kHz from {} vs {measured} kHz measured", f.khz, f.source);
    }

    #[test]
    fn only_tcg_counts_as_an_emulated_host_cpu() {
        assert_eq!(cpu_emulator(Some("TCGTCGTCGTCG")), Some("QEMU TCG"));
        assert_eq!(cpu_emulator(Some("KVMKVMKVM")), None);
        assert_eq!(cpu_emulator(Some("Microsoft Hv")), None);
        assert_eq!(cpu_emulator(None), None);
    }

    #[test]
    fn parse_cpu_list_ranges_and_singles() {
        assert_eq!(parse_cpu_list("0-3,8,10-11").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("5").unwrap(), vec![5]);
        assert_eq!(parse_cpu_list("2-2").unwrap(), vec![2]);
        assert_eq!(parse_cpu_list("8,0-1,1,3-4").unwrap(), vec![0, 1, 3, 4, 8]);
        assert_eq!(parse_cpu_list("8191").unwrap(), vec![8191]);
    }

    #[test]
    fn parse_cpu_list_whitespace_and_empty() {
        assert_eq!(parse_cpu_list("0-1\n").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpu_list("  1 , 3 - 4 \n").unwrap(), vec![1, 3, 4]);
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("\n").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpu_list(" \t\n").unwrap(), Vec::<usize>::new());
    }

    #[test]
    fn parse_cpu_list_bad_tokens() {
        assert_eq!(bad_token("a"), ("a".to_owned(), "not a CPU number or range"));
        assert_eq!(bad_token("0-1,a"), ("a".to_owned(), "not a CPU number or range"));
        assert_eq!(bad_token("3-1"), ("3-1".to_owned(), "range ends below its start"));
        assert_eq!(bad_token("1-"), ("1-".to_owned(), "missing CPU number"));
        assert_eq!(bad_token("-1"), ("-1".to_owned(), "missing CPU number"));
        assert_eq!(bad_token("1,,2"), (String::new(), "missing CPU number"));
        assert_eq!(bad_token("+3"), ("+3".to_owned(), "not a CPU number or range"));
        assert_eq!(bad_token("0-3:2/4"), ("0-3:2/4".to_owned(), "not a CPU number or range"));
        assert_eq!(bad_token("1-2-3"), ("1-2-3".to_owned(), "not a CPU number or range"));
        let (token, reason) = bad_token("99999999999999999999999");
        assert_eq!(token, "99999999999999999999999");
        assert_eq!(reason, "CPU number beyond Linux's limit of 8191");
        assert_eq!(bad_token("0-18446744073709551615").0, "0-18446744073709551615");
        assert_eq!(bad_token("8192").1, "CPU number beyond Linux's limit of 8191");
        let msg = parse_cpu_list("3-1").unwrap_err().to_string();
        assert!(msg.contains("\"3-1\""), "{msg}");
    }

    #[test]
    fn format_cpu_list_compacts() {
        assert_eq!(format_cpu_list(&[]), "");
        assert_eq!(format_cpu_list(&[4]), "4");
        assert_eq!(format_cpu_list(&[0, 1]), "0-1");
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[11, 3, 3, 0, 1, 2, 10, 8]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[usize::MAX - 1, usize::MAX]), format!("{}-{}", usize::MAX - 1, usize::MAX));
    }

    #[test]
    fn format_cpu_list_roundtrips() {
        for s in ["", "0", "0-1", "0-3,8,10-11", "1,3,5,7", "0-8191", "2-4,6-7,100"] {
            assert_eq!(format_cpu_list(&parse_cpu_list(s).unwrap()), s);
        }
        let cpus = vec![0, 2, 3, 4, 9, 10, 63, 64, 65, 200];
        assert_eq!(parse_cpu_list(&format_cpu_list(&cpus)).unwrap(), cpus);
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            let path = std::env::temp_dir().join(format!("sidecore-host-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn detect_backend_module_from_tree() {
        let dir = TempDir::new("modules");
        let sys = dir.0.as_path();
        fs::create_dir(sys.join("kvm")).unwrap();
        assert_eq!(detect_backend_module(sys), None);
        // A file of that name is not a module directory.
        fs::write(sys.join("kvm_amd"), b"").unwrap();
        assert_eq!(detect_backend_module(sys), None);
        fs::remove_file(sys.join("kvm_amd")).unwrap();
        fs::create_dir(sys.join("kvm_amd")).unwrap();
        assert_eq!(detect_backend_module(sys), Some(Backend::Svm));
        fs::remove_dir(sys.join("kvm_amd")).unwrap();
        fs::create_dir(sys.join("kvm_intel")).unwrap();
        assert_eq!(detect_backend_module(sys), Some(Backend::Vmx));
        fs::create_dir(sys.join("kvm_pvm")).unwrap();
        assert_eq!(detect_backend_module(sys), Some(Backend::Pvm));
        fs::create_dir(sys.join("kvm_amd")).unwrap();
        assert_eq!(detect_backend_module(sys), Some(Backend::Pvm));
        assert_eq!(detect_backend_module(&sys.join("absent")), None);
    }

    #[test]
    fn kvm_open_error_maps_errno() {
        assert!(matches!(kvm_open_error(libc::ENOENT), HostError::KvmMissing));
        assert!(matches!(kvm_open_error(libc::EACCES), HostError::KvmPermission));
        assert!(matches!(kvm_open_error(libc::EPERM), HostError::KvmPermission));
        match kvm_open_error(libc::EIO) {
            HostError::KvmOpen { errno, strerror } => {
                assert_eq!(errno, libc::EIO);
                assert_eq!(strerror, "Input/output error");
            }
            other => panic!("EIO: expected KvmOpen, got {other:?}"),
        }
        let msg = kvm_open_error(libc::EIO).to_string();
        assert!(msg.contains("/dev/kvm") && msg.contains("Input/output error") && msg.contains("errno 5"), "{msg}");
        assert!(kvm_open_error(libc::ENOENT).to_string().contains("does not exist"));
        assert!(kvm_open_error(libc::EACCES).to_string().contains("usermod -aG kvm"));
    }

    const CPUINFO_INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu MHz\t\t: 2399.998\n\
                                 flags\t\t: fpu vme de pse tsc msr vmx sse2\n\nprocessor\t: 1\ncpu MHz\t\t: 1200.000\n";

    #[test]
    fn decide_backend_cases() {
        let pvm = decide_backend(Some(Backend::Pvm), Some(PVM_SIGNATURE), "").unwrap();
        assert_eq!(pvm, BackendInfo { backend: Backend::Pvm, pvm_signature_ok: true, warnings: vec![] });

        let unconfirmed = decide_backend(Some(Backend::Pvm), None, "").unwrap();
        assert_eq!(unconfirmed.backend, Backend::Pvm);
        assert!(!unconfirmed.pvm_signature_ok);
        assert_eq!(unconfirmed.warnings.len(), 1);
        let wrong = decide_backend(Some(Backend::Pvm), Some(0x1234), "").unwrap();
        assert_eq!(wrong.backend, Backend::Pvm);
        assert!(wrong.warnings[0].contains("0x1234"), "{:?}", wrong.warnings);

        let vmx = decide_backend(Some(Backend::Vmx), None, "").unwrap();
        assert_eq!(vmx, BackendInfo { backend: Backend::Vmx, pvm_signature_ok: false, warnings: vec![] });
        let svm = decide_backend(Some(Backend::Svm), None, "").unwrap();
        assert_eq!(svm.backend, Backend::Svm);
        let vmx_but_pvm = decide_backend(Some(Backend::Vmx), Some(PVM_SIGNATURE), "").unwrap();
        assert_eq!(vmx_but_pvm.backend, Backend::Pvm);
        assert_eq!(vmx_but_pvm.warnings.len(), 1);

        let sig_only = decide_backend(None, Some(PVM_SIGNATURE), "").unwrap();
        assert_eq!(sig_only.backend, Backend::Pvm);
        assert_eq!(sig_only.warnings.len(), 1);
        let builtin_intel = decide_backend(None, None, CPUINFO_INTEL).unwrap();
        assert_eq!(builtin_intel.backend, Backend::Vmx);
        assert_eq!(builtin_intel.warnings.len(), 1);
        let builtin_amd = decide_backend(None, None, "flags : fpu svm lm\n").unwrap();
        assert_eq!(builtin_amd.backend, Backend::Svm);
        assert!(matches!(decide_backend(None, None, "flags : fpu vmxx lm\n"), Err(HostError::NoBackend)));
        assert!(matches!(decide_backend(None, Some(0), ""), Err(HostError::NoBackend)));
    }

    #[test]
    fn cpuinfo_khz_parses_first_cpu_mhz() {
        assert_eq!(cpuinfo_khz(CPUINFO_INTEL), Some(2_399_998));
        assert_eq!(cpuinfo_khz("cpu MHz : 3000\n"), Some(3_000_000));
        assert_eq!(cpuinfo_khz("cpu MHz : 2.5\n"), Some(2_500));
        assert_eq!(cpuinfo_khz("cpu MHz : 1999.99987\n"), Some(1_999_999));
        assert_eq!(cpuinfo_khz("cpu MHz : 0.000\n"), None);
        assert_eq!(cpuinfo_khz("cpu MHz : -5\n"), None);
        assert_eq!(cpuinfo_khz("cpu MHz : .5\n"), None);
        assert_eq!(cpuinfo_khz("cpu MHz : 99999999999999999999\n"), None);
        assert_eq!(cpuinfo_khz("processor : 0\n"), None);
        assert_eq!(cpuinfo_khz(""), None);
    }
}
