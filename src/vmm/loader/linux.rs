//! The Linux x86 boot protocol's pure part (Documentation/arch/x86/boot.rst):
//! what a bzImage's setup header says, checked before anything is loaded;
//! the e820 map with the sidecore's shared region reserved; the command
//! line that names the region to the guest; where the initrd goes; and the
//! zero page (`boot_params`) built from all of it.
//!
//! Loading the kernel itself is linux-loader's `BzImage`; writing the zero
//! page and entering the kernel belong to the VMM. Everything here works on
//! bytes and numbers, so every bad input is an error with the limit it
//! broke, and every rule is unit-tested.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE};

/// `HdrS`, the setup header's magic at offset 0x202.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// The oldest boot protocol accepted: 2.12 has `xloadflags` (the 64-bit
/// entry point) and `cmdline_size`.
pub const MIN_PROTOCOL: u16 = 0x020c;
/// `xloadflags`: the kernel has a 64-bit entry at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `loadflags`: the protected-mode code loads at 0x100000.
pub const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags`: `heap_end_ptr` is valid.
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// The lowest load address of the protected-mode kernel (1 MiB, the
/// protocol's default); the kernel's `pref_address` when that is higher.
pub const HIGH_LOAD: u64 = 0x10_0000;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// End of the low RAM the real-mode area may use (the EBDA starts here).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// `type_of_loader` for a boot loader without an assigned id.
pub const LOADER_UNDEFINED: u8 = 0xff;
/// The command-line key that names the shared region to the guest.
pub const REGION_PARAM: &str = "sidecore.region";

/// Why a kernel, initrd or command line cannot be booted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinuxBootError {
    /// Shorter than a setup header.
    #[error(
        "{bytes} bytes: too short to be a bzImage (a setup header needs {need}) — pass a bzImage, e.g. /boot/vmlinuz-*"
    )]
    TooShort {
        /// Its size.
        bytes: usize,
        /// The least a header needs.
        need: usize,
    },
    /// No `HdrS` magic.
    #[error("not a bzImage: no \"HdrS\" setup header at 0x202 (an ELF vmlinux or a compressed file?) — pass a bzImage, e.g. /boot/vmlinuz-*")]
    NotBzImage,
    /// Too old a boot protocol.
    #[error("boot protocol {}.{} is older than {}.{}, the first with a 64-bit entry point", .found >> 8, .found & 0xff, MIN_PROTOCOL >> 8, MIN_PROTOCOL & 0xff)]
    OldProtocol {
        /// The kernel's.
        found: u16,
    },
    /// No 64-bit entry point.
    #[error("the kernel has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64): boot a 64-bit x86 kernel")]
    Not64Bit,
    /// A setup size that is not inside the file.
    #[error("setup of {setup} bytes but the file has {bytes}: a truncated or corrupt bzImage")]
    Truncated {
        /// Setup bytes claimed.
        setup: u64,
        /// File size.
        bytes: u64,
    },
    /// The kernel does not fit the guest's RAM.
    #[error("the kernel needs {need} bytes from {load:#x} (init_size) but guest RAM ends at {ram:#x}: give the guest more --mem")]
    KernelTooBig {
        /// Where it loads.
        load: u64,
        /// How much it needs there.
        need: u64,
        /// RAM size.
        ram: u64,
    },
    /// The command line is over the kernel's limit.
    #[error("the command line is {len} bytes with the region parameter; the kernel takes at most {max}")]
    CmdlineTooLong {
        /// Its length (with the NUL).
        len: usize,
        /// The kernel's `cmdline_size` + 1.
        max: usize,
    },
    /// The command line holds a byte the protocol cannot carry.
    #[error("the command line holds a NUL or non-ASCII byte at {at}: pass plain ASCII")]
    CmdlineByte {
        /// Offset.
        at: usize,
    },
    /// The user's command line names a region already.
    #[error("the command line already has {REGION_PARAM}=: the VMM sets it (remove it)")]
    RegionGiven,
    /// No room for the initrd.
    #[error("an initrd of {len} bytes does not fit between the kernel's end ({low:#x}) and {high:#x} (RAM or the kernel's initrd_addr_max, less reserved ranges): give the guest more --mem or a smaller initrd")]
    InitrdTooBig {
        /// Its size.
        len: u64,
        /// Lowest address allowed.
        low: u64,
        /// Highest end allowed.
        high: u64,
    },
    /// A reserved range that is not inside RAM above 1 MiB.
    #[error("reserved range {start:#x}+{len:#x} is not inside guest RAM above 1 MiB (ends {ram:#x})")]
    BadReserved {
        /// Start.
        start: u64,
        /// Length.
        len: u64,
        /// RAM size.
        ram: u64,
    },
    /// An address the 32-bit header fields cannot hold.
    #[error("the {what} at {addr:#x} is above 4 GiB, which the setup header cannot name")]
    Above4G {
        /// What.
        what: &'static str,
        /// Its address.
        addr: u64,
    },
    /// More e820 entries than the zero page holds.
    #[error("{0} e820 entries: the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")]
    TooManyE820(usize),
}

/// What a bzImage's setup header says (the fields the VMM uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelHeader {
    /// Boot protocol version (e.g. 0x020f).
    pub version: u16,
    /// Bytes of real-mode setup before the protected-mode kernel.
    pub setup_bytes: u64,
    /// Bytes of protected-mode kernel after it.
    pub payload_bytes: u64,
    /// Memory the kernel needs from its load address while it decompresses
    /// and runs (`init_size`).
    pub init_size: u64,
    /// Where it would like to be loaded (`pref_address`).
    pub pref_address: u64,
    /// Alignment a relocatable kernel needs.
    pub kernel_alignment: u64,
    /// Whether it may be loaded elsewhere than `pref_address`.
    pub relocatable: bool,
    /// Highest address the initrd's last byte may have.
    pub initrd_addr_max: u64,
    /// Longest command line, without its NUL.
    pub cmdline_size: u64,
    /// `loadflags`.
    pub loadflags: u8,
    /// `xloadflags`.
    pub xloadflags: u16,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

/// Bytes a setup header of protocol 2.12+ reaches (through `init_size`).
pub const HEADER_END: usize = 0x264;

/// Reads and checks a bzImage's setup header.
pub fn parse_header(image: &[u8]) -> Result<KernelHeader, LinuxBootError> {
    if image.len() < HEADER_END {
        return Err(LinuxBootError::TooShort { bytes: image.len(), need: HEADER_END });
    }
    if le32(image, 0x202) != HDRS_MAGIC {
        return Err(LinuxBootError::NotBzImage);
    }
    let version = le16(image, 0x206);
    if version < MIN_PROTOCOL {
        return Err(LinuxBootError::OldProtocol { found: version });
    }
    let xloadflags = le16(image, 0x236);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxBootError::Not64Bit);
    }
    let sects = match image[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let setup_bytes = (sects + 1) * 512;
    let bytes = image.len() as u64;
    if setup_bytes >= bytes {
        return Err(LinuxBootError::Truncated { setup: setup_bytes, bytes });
    }
    Ok(KernelHeader {
        version,
        setup_bytes,
        payload_bytes: bytes - setup_bytes,
        init_size: u64::from(le32(image, 0x260)),
        pref_address: le64(image, 0x258),
        kernel_alignment: u64::from(le32(image, 0x230)),
        relocatable: image[0x234] != 0,
        initrd_addr_max: u64::from(le32(image, 0x22c)),
        cmdline_size: u64::from(le32(image, 0x238)),
        loadflags: image[0x211],
        xloadflags,
    })
}

impl KernelHeader {
    /// Where the protected-mode kernel goes: its preferred address (at
    /// least 1 MiB), checked against guest RAM with `init_size`.
    pub fn load_address(&self, ram_size: u64) -> Result<u64, LinuxBootError> {
        let load = self.pref_address.max(HIGH_LOAD);
        let need = self.init_size.max(self.payload_bytes);
        match load.checked_add(need) {
            Some(end) if end <= ram_size => Ok(load),
            _ => Err(LinuxBootError::KernelTooBig { load, need, ram: ram_size }),
        }
    }
}

/// The guest's command line: the user's, then `sidecore.region=GPA,SIZE`
/// when the VM has a shared region; checked against the kernel's limit
/// (its NUL included) and for bytes the protocol cannot carry.
pub fn command_line(user: &str, region: Option<(u64, u64)>, header: &KernelHeader) -> Result<String, LinuxBootError> {
    if let Some(at) = user.bytes().position(|b| b == 0 || !b.is_ascii()) {
        return Err(LinuxBootError::CmdlineByte { at });
    }
    if user.split_ascii_whitespace().any(|w| w.starts_with(&format!("{REGION_PARAM}="))) {
        return Err(LinuxBootError::RegionGiven);
    }
    let mut line = user.trim().to_string();
    if let Some((gpa, size)) = region {
        if !line.is_empty() {
            line.push(' ');
        }
        line += &format!("{REGION_PARAM}={gpa:#x},{size:#x}");
    }
    let max = usize::try_from(header.cmdline_size).unwrap_or(usize::MAX).saturating_add(1);
    if line.len() + 1 > max {
        return Err(LinuxBootError::CmdlineTooLong { len: line.len() + 1, max });
    }
    Ok(line)
}

/// One e820 entry: start, length, type.
pub type E820 = (u64, u64, u32);

/// The guest's memory map: low RAM below the EBDA, the legacy hole
/// reserved, RAM from 1 MiB to `ram_size` less the `reserved` ranges
/// (each inside RAM above 1 MiB; sorted and merged here), which are
/// reported reserved.
pub fn e820_map(ram_size: u64, reserved: &[(u64, u64)]) -> Result<Vec<E820>, LinuxBootError> {
    let mut holes: Vec<(u64, u64)> = Vec::new();
    for &(start, len) in reserved {
        let end = start.checked_add(len).filter(|e| *e <= ram_size && start >= HIGH_LOAD && len > 0);
        let Some(end) = end else {
            return Err(LinuxBootError::BadReserved { start, len, ram: ram_size });
        };
        holes.push((start, end));
    }
    holes.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in holes {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut map = vec![(0, LOW_RAM_END, E820_RAM), (LOW_RAM_END, HIGH_LOAD - LOW_RAM_END, E820_RESERVED)];
    let mut at = HIGH_LOAD;
    for (s, e) in merged {
        if s > at {
            map.push((at, s - at, E820_RAM));
        }
        map.push((s, e - s, E820_RESERVED));
        at = e;
    }
    if ram_size > at {
        map.push((at, ram_size - at, E820_RAM));
    }
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(LinuxBootError::TooManyE820(map.len()));
    }
    Ok(map)
}

/// Where an initrd of `len` bytes goes: as high as it may (page-aligned,
/// its last byte at most the kernel's `initrd_addr_max` and inside RAM),
/// above `kernel_end`, and in RAM the e820 map calls usable.
pub fn initrd_address(len: u64, kernel_end: u64, map: &[E820], header: &KernelHeader) -> Result<u64, LinuxBootError> {
    let limit = header.initrd_addr_max.saturating_add(1);
    let ram_top = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.0 + e.1).max().unwrap_or(0);
    let high = limit.min(ram_top);
    let too_big = LinuxBootError::InitrdTooBig { len, low: kernel_end, high };
    // Usable ranges from the top down; the first that holds it wins.
    let mut ram: Vec<&E820> = map.iter().filter(|e| e.2 == E820_RAM).collect();
    ram.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
    for &(start, rlen, _) in ram {
        let top = (start + rlen).min(high);
        let Some(at) = top.checked_sub(len).map(|a| a & !0xfff) else { continue };
        if at >= start.max(kernel_end) && len > 0 {
            return Ok(at);
        }
    }
    Err(too_big)
}

/// Everything the zero page needs.
#[derive(Clone, Debug)]
pub struct BootPlan {
    /// Where the command line is written (NUL-terminated).
    pub cmdline_addr: u64,
    /// Its bytes, without the NUL.
    pub cmdline: String,
    /// The initrd's address and length, if there is one.
    pub initrd: Option<(u64, u64)>,
    /// The memory map.
    pub e820: Vec<E820>,
}

/// The zero page: the kernel's own setup header (the bytes from 0x1f1 of
/// `image`, as the protocol asks), with the loader's fields set.
pub fn zero_page(image: &[u8], plan: &BootPlan) -> Result<boot_params, LinuxBootError> {
    let h = parse_header(image)?;
    let mut p = boot_params::default();
    let hdr = &mut p.hdr;
    // The fields read from the image: the loader passes them back as they are.
    hdr.setup_sects = image[0x1f1];
    hdr.boot_flag = le16(image, 0x1fe);
    hdr.header = HDRS_MAGIC;
    hdr.version = h.version;
    hdr.kernel_version = le16(image, 0x20e);
    hdr.kernel_alignment = le32(image, 0x230);
    hdr.relocatable_kernel = image[0x234];
    hdr.min_alignment = image[0x235];
    hdr.xloadflags = h.xloadflags;
    hdr.cmdline_size = le32(image, 0x238);
    hdr.initrd_addr_max = le32(image, 0x22c);
    hdr.pref_address = h.pref_address;
    hdr.init_size = le32(image, 0x260);
    hdr.code32_start = le32(image, 0x214);
    // The loader's.
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.loadflags = h.loadflags | LOADED_HIGH | CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    let low32 = |v: u64| u32::try_from(v).ok();
    hdr.cmd_line_ptr =
        low32(plan.cmdline_addr).ok_or(LinuxBootError::Above4G { what: "command line", addr: plan.cmdline_addr })?;
    p.ext_cmd_line_ptr = 0;
    if let Some((addr, len)) = plan.initrd {
        let (a, l) = (low32(addr), low32(len));
        let (Some(a), Some(l)) = (a, l) else {
            return Err(LinuxBootError::Above4G { what: "initrd", addr });
        };
        hdr.ramdisk_image = a;
        hdr.ramdisk_size = l;
    }
    if plan.e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(LinuxBootError::TooManyE820(plan.e820.len()));
    }
    for (slot, &(addr, size, kind)) in p.e820_table.iter_mut().zip(&plan.e820) {
        *slot = boot_e820_entry { addr, size, r#type: kind };
    }
    p.e820_entries = u8::try_from(plan.e820.len()).unwrap_or(u8::MAX);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake bzImage: a setup header of protocol `version`, 64-bit entry,
    /// 2 setup sectors after the boot sector, a payload of `payload` bytes.
    fn image(version: u16, payload: usize) -> Vec<u8> {
        let mut b = vec![0u8; 3 * 512 + payload];
        b[0x1f1] = 2;
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        b[0x211] = LOADED_HIGH;
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        b[0x234] = 1;
        b[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes());
        b
    }

    #[test]
    fn a_header_is_read_and_bad_ones_are_refused() {
        let h = parse_header(&image(0x020f, 4096)).expect("header");
        assert_eq!((h.version, h.setup_bytes, h.payload_bytes), (0x020f, 1536, 4096));
        assert_eq!((h.pref_address, h.init_size, h.cmdline_size), (0x100_0000, 0x80_0000, 2047));
        assert!(h.relocatable);
        assert!(matches!(parse_header(&[0; 100]), Err(LinuxBootError::TooShort { bytes: 100, .. })));
        let mut elf = image(0x020f, 4096);
        elf[0x202] = b'X';
        assert_eq!(parse_header(&elf), Err(LinuxBootError::NotBzImage));
        assert_eq!(parse_header(&image(0x020b, 4096)), Err(LinuxBootError::OldProtocol { found: 0x020b }));
        let mut no64 = image(0x020f, 4096);
        no64[0x236] = 0;
        assert_eq!(parse_header(&no64), Err(LinuxBootError::Not64Bit));
        let mut cut = image(0x020f, 0);
        cut[0x1f1] = 200;
        assert!(matches!(parse_header(&cut), Err(LinuxBootError::Truncated { .. })));
        let msg = LinuxBootError::OldProtocol { found: 0x020b }.to_string();
        assert!(msg.contains("2.11") && msg.contains("2.12"), "{msg}");
    }

    #[test]
    fn the_kernel_must_fit_from_its_load_address() {
        let h = parse_header(&image(0x020f, 4096)).expect("header");
        assert_eq!(h.load_address(64 << 20), Ok(0x100_0000));
        assert!(matches!(h.load_address(16 << 20), Err(LinuxBootError::KernelTooBig { need: 0x80_0000, .. })));
    }

    #[test]
    fn the_command_line_names_the_region_and_keeps_to_the_limit() {
        let h = parse_header(&image(0x020f, 4096)).expect("header");
        let c = command_line(" console=ttyS0 ", Some((0x3f0_0000, 0x3000)), &h).expect("cmdline");
        assert_eq!(c, "console=ttyS0 sidecore.region=0x3f00000,0x3000");
        assert_eq!(command_line("quiet", None, &h).as_deref(), Ok("quiet"));
        assert_eq!(command_line("", Some((0x1000, 0x2000)), &h).as_deref(), Ok("sidecore.region=0x1000,0x2000"));
        assert_eq!(command_line("a sidecore.region=1,2", None, &h), Err(LinuxBootError::RegionGiven));
        assert_eq!(command_line("a\u{e9}", None, &h), Err(LinuxBootError::CmdlineByte { at: 1 }));
        assert_eq!(command_line(&"x".repeat(2047), None, &h).map(|c| c.len()), Ok(2047));
        assert_eq!(
            command_line(&"x".repeat(2048), None, &h),
            Err(LinuxBootError::CmdlineTooLong { len: 2049, max: 2048 })
        );
    }

    #[test]
    fn the_e820_map_reserves_the_region_and_covers_ram() {
        let ram = 64 << 20;
        let map = e820_map(ram, &[(0x3f0_0000, 0x3000)]).expect("map");
        assert_eq!(
            map,
            vec![
                (0, LOW_RAM_END, E820_RAM),
                (LOW_RAM_END, HIGH_LOAD - LOW_RAM_END, E820_RESERVED),
                (HIGH_LOAD, 0x3f0_0000 - HIGH_LOAD, E820_RAM),
                (0x3f0_0000, 0x3000, E820_RESERVED),
                (0x3f0_3000, ram - 0x3f0_3000, E820_RAM),
            ]
        );
        // Entries tile [0, ram) with no gap or overlap.
        let mut at = 0;
        for e in &map {
            assert_eq!(e.0, at);
            at += e.1;
        }
        assert_eq!(at, ram);
        // Overlapping ranges merge; one at the very top leaves no empty RAM entry.
        let m = e820_map(ram, &[(ram - 0x2000, 0x2000), (ram - 0x3000, 0x2000)]).expect("map");
        assert_eq!(m.last(), Some(&(ram - 0x3000, 0x3000, E820_RESERVED)));
        for bad in [(0x1000, 0x1000), (ram - 0x1000, 0x2000), (u64::MAX, 2), (0x20_0000, 0)] {
            assert!(matches!(e820_map(ram, &[bad]), Err(LinuxBootError::BadReserved { .. })), "{bad:?}");
        }
    }

    #[test]
    fn the_initrd_goes_high_in_usable_ram_below_its_limit() {
        let ram = 64u64 << 20;
        let mut h = parse_header(&image(0x020f, 4096)).expect("header");
        let map = e820_map(ram, &[(ram - 0x10_0000, 0x3000)]).expect("map");
        // The top RAM range (after the region) is too small for 2 MiB: it
        // goes below the region, page-aligned.
        let at = initrd_address(2 << 20, 0x180_0000, &map, &h).expect("room");
        assert_eq!(at, (ram - 0x10_0000 - (2 << 20)) & !0xfff);
        let small = initrd_address(0x1000, 0x180_0000, &map, &h).expect("room");
        assert!(small >= ram - 0x10_0000 + 0x3000 && small + 0x1000 <= ram, "{small:#x}");
        // initrd_addr_max caps it.
        h.initrd_addr_max = 0x1ff_ffff;
        assert_eq!(initrd_address(0x1000, 0x180_0000, &map, &h), Ok(0x1ff_f000));
        assert!(matches!(initrd_address(60 << 20, 0x180_0000, &map, &h), Err(LinuxBootError::InitrdTooBig { .. })));
    }

    #[test]
    fn the_zero_page_carries_the_header_the_cmdline_the_initrd_and_the_map() {
        let img = image(0x020f, 4096);
        let e820 = e820_map(64 << 20, &[(0x3f0_0000, 0x3000)]).expect("map");
        let plan = BootPlan {
            cmdline_addr: 0x2_0000,
            cmdline: "console=ttyS0".into(),
            initrd: Some((0x300_0000, 0x1234)),
            e820,
        };
        let p = zero_page(&img, &plan).expect("zero page");
        let (magic, ver, loader, cmd) = (p.hdr.header, p.hdr.version, p.hdr.type_of_loader, p.hdr.cmd_line_ptr);
        assert_eq!((magic, ver, loader, cmd), (HDRS_MAGIC, 0x020f, LOADER_UNDEFINED, 0x2_0000));
        let (ri, rs, flags, boot_flag) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size, p.hdr.loadflags, p.hdr.boot_flag);
        assert_eq!((ri, rs, boot_flag), (0x300_0000, 0x1234, 0xaa55));
        assert_eq!(flags & (LOADED_HIGH | CAN_USE_HEAP), LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!(p.e820_entries, 5);
        let e3 = p.e820_table[3];
        let (a, s, t) = (e3.addr, e3.size, e3.r#type);
        assert_eq!((a, s, t), (0x3f0_0000, 0x3000, E820_RESERVED));
        let high = BootPlan { initrd: Some((1 << 32, 1)), ..plan };
        assert!(zero_page(&img, &high).is_err(), "an initrd above 4 GiB cannot be named in the header");
    }
}
