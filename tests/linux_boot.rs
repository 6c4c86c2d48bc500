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
