//! The Linux boot protocol's checks and tables on a real kernel: Debian's
//! stock bzImage, the one the AMD-V bed boots.

#[allow(dead_code)] // Shared helpers; this file uses only skip().
mod common;

use sidecore_vmm::vmm::loader::linux::*;

/// Debian's stock kernel, as scripts/hwkvm-vm.sh caches it for the AMD-V
/// bed (absent on a machine that never ran the bed: the test skips).
#[test]
fn debians_stock_kernel_parses_and_plans() {
    let dir = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/sidecore/hwkvm/kernel/boot"));
    let kernel = dir
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")));
    let Some(path) = kernel else {
        common::skip("no cached Debian kernel in ~/.cache/sidecore/hwkvm (scripts/hwkvm-test.sh fetches one)");
        return;
    };
    let img = std::fs::read(&path).expect("read the kernel");
    let h = parse_header(&img).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(h.version >= MIN_PROTOCOL && h.relocatable && h.cmdline_size >= 255, "{h:?}");
    let ram = 256u64 << 20;
    let load = h.load_address(ram).expect("fits 256 MiB");
    let region = (ram - (1 << 20), 0x3000);
    let map = e820_map(ram, &[region]).expect("map");
    let initrd = initrd_address(8 << 20, load + h.init_size, &map, &h).expect("initrd room");
    assert!(initrd >= load + h.init_size && initrd + (8 << 20) <= region.0, "{initrd:#x}");
    let cmdline = command_line("console=ttyS0 panic=-1", Some(region), &h).expect("cmdline");
    let plan = BootPlan { cmdline_addr: 0x2_0000, cmdline, initrd: Some((initrd, 8 << 20)), e820: map };
    let p = zero_page(&img, &plan).expect("zero page");
    let (v, x) = (p.hdr.version, p.hdr.xloadflags);
    assert_eq!((v, x & XLF_KERNEL_64), (h.version, XLF_KERNEL_64));
    // Too little RAM for it: a clear error.
    assert!(matches!(h.load_address(8 << 20), Err(LinuxBootError::KernelTooBig { .. })));
}

/// A minimal bzImage: a setup header of protocol 2.15 with a 64-bit entry,
/// `init_size` bytes needed at 16 MiB, a command line of at most
/// `cmdline_size` bytes, and 64 KiB of payload.
fn fake_bzimage(init_size: u32, cmdline_size: u32) -> Vec<u8> {
    let mut b = vec![0u8; 5 * 512 + (64 << 10)];
    b[0x1f1] = 4;
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = LOADED_HIGH;
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    b[0x234] = 1;
    b[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
    b[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
    b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    b[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    b
}

fn scratch(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    // One directory per test: the tests of this file run in parallel.
    let test = std::thread::current().name().unwrap_or("t").replace("::", "-");
    let dir = std::env::temp_dir().join(format!("sidecore-linux-boot-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("scratch file");
    p
}

/// `sidecore run ARGS`: exit code and stderr.
fn run(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidecore"))
        .arg("run")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run sidecore");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Each bad input is refused before anything runs, naming the file and
/// the limit it broke (the same on every backend: these checks come before
/// KVM is opened).
#[test]
fn bad_kernels_initrds_and_command_lines_are_refused_with_the_file_and_the_limit() {
    let not_bz = scratch("vmlinux.elf", b"\x7fELF not a bzImage at all, but long enough to hold a setup header? no");
    let (code, err) = run(&["--kernel", not_bz.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("vmlinux.elf") && err.contains("too short to be a bzImage"), "{err}");
    let mut elf = vec![0u8; 4096];
    elf[..4].copy_from_slice(b"\x7fELF");
    let elf = scratch("vmlinux", &elf);
    let (code, err) = run(&["--kernel", elf.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("vmlinux") && err.contains("not a bzImage"), "{err}");

    let big = scratch("big-bzImage", &fake_bzimage(64 << 20, 2047));
    let (code, err) = run(&["--kernel", big.to_str().unwrap(), "--mem", "64"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("big-bzImage") && err.contains("init_size") && err.contains("--mem"), "{err}");

    let small = scratch("bzImage", &fake_bzimage(8 << 20, 255));
    let initrd = scratch("initrd.img", &vec![0u8; 40 << 20]);
    let (code, err) = run(&["--kernel", small.to_str().unwrap(), "--initrd", initrd.to_str().unwrap(), "--mem", "48"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("initrd.img") && err.contains("41943040 bytes does not fit"), "{err}");

    let long = "x".repeat(300);
    let (code, err) = run(&["--kernel", small.to_str().unwrap(), "--cmdline", &long]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("command line") && err.contains("at most 256"), "{err}");
    let (code, err) = run(&["--kernel", small.to_str().unwrap(), "--cmdline", "console=ttyS0 sidecore.region=0x0,0x1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the VMM sets it"), "{err}");

    let (code, err) = run(&["--kernel", small.to_str().unwrap(), "--guest", "/bin/true"]);
    assert_eq!(code, 2, "--kernel with --guest is a usage error: {err}");
    let (code, err) = run(&["--kernel", small.to_str().unwrap(), "--vcpus", "2", "--mem", "16"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--mem 16") && err.contains("32 to 3072"), "{err}");
    let (code, err) = run(&["--kernel", "/nonexistent/bzImage"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot read kernel /nonexistent/bzImage"), "{err}");
    let (code, err) = run(&["--initrd", initrd.to_str().unwrap()]);
    assert_eq!(code, 2, "--initrd needs --kernel: {err}");
    let (code, err) = run(&["--mem", "512"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the guest-agent takes 4 to 256 MiB"), "{err}");
    let _ = std::fs::remove_dir_all(not_bz.parent().unwrap());
}

/// On PVM a stock kernel cannot run natively: the run says so, and what
/// would be needed, instead of booting it emulated or failing obscurely.
#[test]
fn pvm_refuses_a_stock_kernel_and_says_what_it_would_need() {
    if !common::kvm_available() {
        return;
    }
    let backend = sidecore_vmm::host::open_kvm().ok().and_then(|k| sidecore_vmm::host::detect_backend(&k).ok());
    if backend.map(|b| b.backend) != Some(shm_proto::boot::Backend::Pvm) {
        common::skip("this KVM is not PVM (scripts/linux-bed.sh boots the real kernel on hardware KVM)");
        return;
    }
    let k = scratch("pvm-bzImage", &fake_bzimage(8 << 20, 2047));
    let (code, err) = run(&["--kernel", k.to_str().unwrap(), "--sidecore", "0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("PVM backend") && err.contains("CONFIG_PVM_GUEST") && err.contains("hardware KVM"), "{err}");
    let _ = std::fs::remove_dir_all(k.parent().unwrap());
}
