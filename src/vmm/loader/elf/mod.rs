//! Loads the guest-agent's ELF image into guest memory.
//!
//! linux-loader trusts the image more than we want to: this module parses the
//! ELF64 header and program headers itself from the byte slice (every offset
//! and size is bounds- and overflow-checked, no `unsafe`), checks every
//! `PT_LOAD` segment against the guest memory map
//! ([`shm_proto::layout`]), and only then writes any byte into guest memory.
//!
//! The guest-agent is linked at a fixed address (`guest-agent/guest.ld`) and
//! identity mapped by the VMM, so segments are loaded at `p_paddr`, which must
//! equal `p_vaddr`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap};

/// Size of the ELF64 file header.
const EHDR_SIZE: usize = 64;
/// Size of one ELF64 program header.
const PHDR_SIZE: usize = 56;
/// `\x7fELF`.
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// `e_ident[EI_CLASS]` of a 64-bit file.
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]` of a little-endian file.
const ELFDATA2LSB: u8 = 1;
/// `e_type` of an executable linked at a fixed address.
const ET_EXEC: u16 = 2;
/// `e_type` of a shared object or position-independent executable.
const ET_DYN: u16 = 3;
/// `e_machine` of x86-64.
const EM_X86_64: u16 = 62;
/// `p_type` of a loadable segment.
const PT_LOAD: u32 = 1;
/// `p_flags` bit: executable.
const PF_X: u32 = 1;
/// `p_flags` bit: writable.
const PF_W: u32 = 2;

/// Where the image may go in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfLimits {
    /// Bytes of guest RAM (RAM spans GPA `0..ram_size`).
    pub ram_size: u64,
    /// Lowest GPA a segment may start at ([`shm_proto::layout::IMAGE_GPA`]);
    /// everything below holds the reserved low pages and the page-table pool.
    pub image_gpa: u64,
    /// Highest GPA (exclusive) a segment may end at: the VMM passes the start
    /// of the shared region, or `ram_size`.
    pub image_limit: u64,
}

/// One `PT_LOAD` segment of a checked image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical (and, identity mapped, virtual) address of its start.
    pub gpa: u64,
    /// Bytes it occupies in guest memory (file bytes plus zeroed bss).
    pub mem_size: u64,
    /// The guest may write it (`PF_W`).
    pub writable: bool,
    /// The guest may execute it (`PF_X`).
    pub executable: bool,
}

/// A checked (and, from [`load_elf`], loaded) image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedImage {
    /// Entry point (`e_entry`), inside an executable segment.
    pub entry: u64,
    /// Highest `p_paddr + p_memsz` over all segments (exclusive).
    pub image_end: u64,
    /// The `PT_LOAD` segments with a non-zero memory size, in file order.
    pub segments: Vec<Segment>,
}

/// The image was refused, or writing it into guest memory failed.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file is shorter than an ELF64 header.
    #[error(
        "guest image is too short ({len} bytes, an ELF64 header alone is 64) — \
         pass the guest-agent ELF, not a truncated or empty file"
    )]
    TooShort {
        /// File size in bytes.
        len: usize,
    },
    /// The file does not start with `\x7fELF`.
    #[error(
        "not an ELF file (bad magic) — pass a 64-bit x86-64 ELF built for \
         guest-agent's linker script"
    )]
    BadMagic,
    /// `e_ident[EI_CLASS]` is not `ELFCLASS64`.
    #[error(
        "guest image is not a 64-bit ELF (EI_CLASS = {class}, want 2) — build \
         the guest-agent for a 64-bit x86-64 target"
    )]
    Not64Bit {
        /// The class byte found.
        class: u8,
    },
    /// `e_ident[EI_DATA]` is not `ELFDATA2LSB`.
    #[error(
        "guest image is not little-endian (EI_DATA = {data}, want 1) — build \
         the guest-agent for x86-64"
    )]
    NotLittleEndian {
        /// The data-encoding byte found.
        data: u8,
    },
    /// `e_machine` is not `EM_X86_64`.
    #[error(
        "guest image is for machine {machine}, not x86-64 (62) — build the \
         guest-agent for an x86-64 target"
    )]
    WrongMachine {
        /// The `e_machine` found.
        machine: u16,
    },
    /// `e_type` is not `ET_EXEC` (for example a PIE).
    #[error(
        "guest image has e_type {e_type}{hint}, not ET_EXEC (2) — it must be \
         linked at a fixed address: link it with guest-agent's linker script \
         and without -pie"
    )]
    NotExecutable {
        /// The `e_type` found.
        e_type: u16,
        /// Names the type when it is a known wrong one.
        hint: &'static str,
    },
    /// `e_phentsize` is not the size of an ELF64 program header.
    #[error(
        "guest image has program headers of {size} bytes, want 56 — the file \
         is corrupt or not an ELF64 executable"
    )]
    BadPhentsize {
        /// The `e_phentsize` found.
        size: u16,
    },
    /// The program header table does not lie inside the file.
    #[error(
        "guest image's program header table (offset {offset:#x}, {count} \
         entries) runs past the end of the file ({len} bytes) — the file is \
         truncated or corrupt; rebuild the guest-agent"
    )]
    PhdrsOutOfBounds {
        /// `e_phoff`.
        offset: u64,
        /// `e_phnum`.
        count: u16,
        /// File size in bytes.
        len: usize,
    },
    /// There is no `PT_LOAD` segment at all.
    #[error(
        "guest image has no PT_LOAD segment, so there is nothing to load — \
         check that guest-agent's linker script was used"
    )]
    NoLoadSegment,
    /// A segment has more file bytes than memory bytes.
    #[error(
        "PT_LOAD segment {index} has p_filesz {filesz:#x} > p_memsz {memsz:#x} \
         — the file is corrupt; rebuild the guest-agent"
    )]
    FileSizeExceedsMemSize {
        /// Index of the program header.
        index: usize,
        /// `p_filesz`.
        filesz: u64,
        /// `p_memsz`.
        memsz: u64,
    },
    /// A segment's file bytes do not lie inside the file.
    #[error(
        "PT_LOAD segment {index}'s file bytes [{offset:#x}, +{filesz:#x}) run \
         past the end of the file ({len} bytes) — the file is truncated; \
         rebuild the guest-agent"
    )]
    FileRangeOutOfBounds {
        /// Index of the program header.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        filesz: u64,
        /// File size in bytes.
        len: usize,
    },
    /// A segment's virtual and physical addresses differ.
    #[error(
        "PT_LOAD segment {index} has p_vaddr {vaddr:#x} != p_paddr {paddr:#x}, \
         but the VMM identity maps the image — link it without AT() or a \
         separate load address"
    )]
    NotIdentityMapped {
        /// Index of the program header.
        index: usize,
        /// `p_vaddr`.
        vaddr: u64,
        /// `p_paddr`.
        paddr: u64,
    },
    /// A segment starts below the image area.
    #[error(
        "PT_LOAD segment {index} [{start:#x}, {end:#x}) starts below \
         {image_gpa:#x} and would overlap the reserved low pages / page-table \
         pool — link the guest-agent at {image_gpa:#x} (guest-agent's linker \
         script)"
    )]
    SegmentBelowImage {
        /// Index of the program header.
        index: usize,
        /// First GPA of the segment.
        start: u64,
        /// End GPA (exclusive) of the segment.
        end: u64,
        /// Lowest allowed GPA.
        image_gpa: u64,
    },
    /// A segment ends beyond guest RAM.
    #[error(
        "PT_LOAD segment {index} [{start:#x}, {end:#x}) does not fit in guest \
         RAM ({ram_size:#x} bytes) — give the guest more memory, or make the \
         guest-agent smaller"
    )]
    SegmentPastRam {
        /// Index of the program header.
        index: usize,
        /// First GPA of the segment.
        start: u64,
        /// End GPA (exclusive) of the segment.
        end: u64,
        /// Bytes of guest RAM.
        ram_size: u64,
    },
    /// A segment fits in RAM but ends beyond the image area.
    #[error(
        "PT_LOAD segment {index} [{start:#x}, {end:#x}) ends past \
         {image_limit:#x}, where the shared region starts — the image is too \
         large for its area; make the guest-agent smaller"
    )]
    SegmentPastLimit {
        /// Index of the program header.
        index: usize,
        /// First GPA of the segment.
        start: u64,
        /// End GPA (exclusive) of the segment.
        end: u64,
        /// Highest allowed end.
        image_limit: u64,
    },
    /// Two segments share guest memory.
    #[error(
        "PT_LOAD segments {first} [{first_start:#x}, {first_end:#x}) and \
         {second} [{second_start:#x}, {second_end:#x}) overlap — the file is \
         corrupt or badly linked; rebuild the guest-agent with its linker \
         script"
    )]
    OverlappingSegments {
        /// Index of the lower segment's program header.
        first: usize,
        /// Its first GPA.
        first_start: u64,
        /// Its end GPA (exclusive).
        first_end: u64,
        /// Index of the other segment's program header.
        second: usize,
        /// Its first GPA.
        second_start: u64,
        /// Its end GPA (exclusive).
        second_end: u64,
    },
    /// Some offset or address computation overflowed.
    #[error(
        "guest image has an out-of-range {what} (arithmetic overflow) — the \
         file is corrupt; rebuild the guest-agent"
    )]
    Overflow {
        /// What was being computed.
        what: &'static str,
    },
    /// The entry point is not inside an executable segment.
    #[error(
        "guest image's entry point {entry:#x} is not inside an executable \
         PT_LOAD segment — check that _start is in .text and the linker \
         script's ENTRY(_start)"
    )]
    EntryNotExecutable {
        /// `e_entry`.
        entry: u64,
    },
    /// A segment passed the checks but guest memory does not back it.
    #[error(
        "PT_LOAD segment at [{start:#x}, {end:#x}) is not backed by guest \
         memory — the limits passed to the loader disagree with the VMM's \
         memory map (a VMM bug)"
    )]
    NotBacked {
        /// First GPA of the segment.
        start: u64,
        /// End GPA (exclusive) of the segment.
        end: u64,
    },
    /// Writing into guest memory failed.
    #[error("cannot write the guest image at GPA {gpa:#x}")]
    Write {
        /// Where the failed write started.
        gpa: u64,
        /// What vm-memory reported.
        #[source]
        source: GuestMemoryError,
    },
}

/// Where a checked segment's bytes come from and go to.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Destination GPA.
    gpa: u64,
    /// First file byte.
    file_start: usize,
    /// File bytes to copy.
    file_len: usize,
    /// Bytes to zero after them.
    zero_len: u64,
    /// Total bytes in guest memory.
    mem_len: u64,
}

/// Reads `N` bytes at `off`, or `None` if they are not all inside `b`.
fn bytes_at<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    let end = off.checked_add(N)?;
    b.get(off..end)?.try_into().ok()
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    bytes_at(b, off).map(u16::from_le_bytes)
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    bytes_at(b, off).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    bytes_at(b, off).map(u64::from_le_bytes)
}

/// A field the caller already bounds-checked; `Overflow` keeps it panic-free.
fn field<T>(v: Option<T>, what: &'static str) -> Result<T, ElfError> {
    v.ok_or(ElfError::Overflow { what })
}

/// One parsed ELF64 program header.
struct Phdr {
    p_type: u32,
    p_flags: u32,
    p_offset: u64,
    p_vaddr: u64,
    p_paddr: u64,
    p_filesz: u64,
    p_memsz: u64,
}

fn parse_phdr(b: &[u8]) -> Result<Phdr, ElfError> {
    const W: &str = "program header field";
    Ok(Phdr {
        p_type: field(u32_at(b, 0), W)?,
        p_flags: field(u32_at(b, 4), W)?,
        p_offset: field(u64_at(b, 8), W)?,
        p_vaddr: field(u64_at(b, 16), W)?,
        p_paddr: field(u64_at(b, 24), W)?,
        p_filesz: field(u64_at(b, 32), W)?,
        p_memsz: field(u64_at(b, 40), W)?,
    })
}

/// Parses and checks everything; returns the image and how to load it.
fn plan(elf: &[u8], limits: &ElfLimits) -> Result<(LoadedImage, Vec<Plan>), ElfError> {
    const W: &str = "ELF header field";
    if elf.len() < EHDR_SIZE {
        return Err(ElfError::TooShort { len: elf.len() });
    }
    if elf.get(0..4) != Some(&ELF_MAGIC[..]) {
        return Err(ElfError::BadMagic);
    }
    let class = field(elf.get(4).copied(), W)?;
    if class != ELFCLASS64 {
        return Err(ElfError::Not64Bit { class });
    }
    let data = field(elf.get(5).copied(), W)?;
    if data != ELFDATA2LSB {
        return Err(ElfError::NotLittleEndian { data });
    }
    let e_type = field(u16_at(elf, 16), W)?;
    let machine = field(u16_at(elf, 18), W)?;
    let entry = field(u64_at(elf, 24), W)?;
    let phoff = field(u64_at(elf, 32), W)?;
    let phentsize = field(u16_at(elf, 54), W)?;
    let phnum = field(u16_at(elf, 56), W)?;
    if machine != EM_X86_64 {
        return Err(ElfError::WrongMachine { machine });
    }
    if e_type != ET_EXEC {
        let hint = if e_type == ET_DYN { " (ET_DYN: a PIE or shared object)" } else { "" };
        return Err(ElfError::NotExecutable { e_type, hint });
    }
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(ElfError::BadPhentsize { size: phentsize });
    }

    let phdrs_oob = || ElfError::PhdrsOutOfBounds { offset: phoff, count: phnum, len: elf.len() };
    let table_len =
        usize::from(phnum).checked_mul(PHDR_SIZE).ok_or(ElfError::Overflow { what: "program header table size" })?;
    let table_start = usize::try_from(phoff).map_err(|_| phdrs_oob())?;
    let table_end =
        table_start.checked_add(table_len).ok_or(ElfError::Overflow { what: "program header table offset" })?;
    let table = elf.get(table_start..table_end).ok_or_else(phdrs_oob)?;

    let mut segments = Vec::new();
    let mut plans = Vec::new();
    // (start, end, phdr index, executable) of every PT_LOAD, for the
    // overlap and entry checks.
    let mut ranges: Vec<(u64, u64, usize, bool)> = Vec::new();
    for (index, raw) in table.chunks_exact(PHDR_SIZE).enumerate() {
        let ph = parse_phdr(raw)?;
        if ph.p_type != PT_LOAD {
            continue;
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(ElfError::FileSizeExceedsMemSize { index, filesz: ph.p_filesz, memsz: ph.p_memsz });
        }
        let file_end = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .ok_or(ElfError::Overflow { what: "segment file range (p_offset + p_filesz)" })?;
        let file_len_u64 = u64::try_from(elf.len()).map_err(|_| ElfError::Overflow { what: "file size" })?;
        if file_end > file_len_u64 {
            return Err(ElfError::FileRangeOutOfBounds {
                index,
                offset: ph.p_offset,
                filesz: ph.p_filesz,
                len: elf.len(),
            });
        }
        // Both fit in usize: they are at most elf.len().
        let file_start =
            usize::try_from(ph.p_offset).map_err(|_| ElfError::Overflow { what: "segment file offset" })?;
        let file_len = usize::try_from(ph.p_filesz).map_err(|_| ElfError::Overflow { what: "segment file size" })?;

        let start = ph.p_paddr;
        let end = start
            .checked_add(ph.p_memsz)
            .ok_or(ElfError::Overflow { what: "segment address range (p_paddr + p_memsz)" })?;
        if ph.p_vaddr != ph.p_paddr {
            return Err(ElfError::NotIdentityMapped { index, vaddr: ph.p_vaddr, paddr: ph.p_paddr });
        }
        if start < limits.image_gpa {
            return Err(ElfError::SegmentBelowImage { index, start, end, image_gpa: limits.image_gpa });
        }
        if end > limits.ram_size {
            return Err(ElfError::SegmentPastRam { index, start, end, ram_size: limits.ram_size });
        }
        if end > limits.image_limit {
            return Err(ElfError::SegmentPastLimit { index, start, end, image_limit: limits.image_limit });
        }

        let executable = ph.p_flags & PF_X != 0;
        ranges.push((start, end, index, executable));
        if ph.p_memsz == 0 {
            continue;
        }
        segments.push(Segment { gpa: start, mem_size: ph.p_memsz, writable: ph.p_flags & PF_W != 0, executable });
        plans.push(Plan { gpa: start, file_start, file_len, zero_len: ph.p_memsz - ph.p_filesz, mem_len: ph.p_memsz });
    }
    if ranges.is_empty() {
        return Err(ElfError::NoLoadSegment);
    }

    let mut sorted: Vec<_> = ranges.iter().copied().filter(|r| r.0 < r.1).collect();
    sorted.sort_unstable();
    for pair in sorted.windows(2) {
        if let [a, b] = pair {
            if a.1 > b.0 {
                return Err(ElfError::OverlappingSegments {
                    first: a.2,
                    first_start: a.0,
                    first_end: a.1,
                    second: b.2,
                    second_start: b.0,
                    second_end: b.1,
                });
            }
        }
    }

    if !ranges.iter().any(|&(start, end, _, exec)| exec && start <= entry && entry < end) {
        return Err(ElfError::EntryNotExecutable { entry });
    }

    let image_end = ranges.iter().map(|r| r.1).max().unwrap_or(limits.image_gpa);
    Ok((LoadedImage { entry, image_end, segments }, plans))
}

/// Checks an ELF image against `limits` without touching guest memory.
///
/// Refuses anything but a 64-bit little-endian x86-64 `ET_EXEC` whose
/// `PT_LOAD` segments are well formed, identity mapped, inside
/// `[image_gpa, image_limit)` and in RAM, do not overlap, and one of which is
/// executable and holds the entry point.
///
/// # Errors
///
/// The [`ElfError`] variant of the first check that fails.
pub fn check_elf(elf: &[u8], limits: &ElfLimits) -> Result<LoadedImage, ElfError> {
    plan(elf, limits).map(|(image, _)| image)
}

/// Checks an ELF image (see [`check_elf`]), then loads it into `mem`.
///
/// Every check, including that guest memory backs every segment, happens
/// before the first byte is written. Each `PT_LOAD` segment gets its
/// `p_filesz` file bytes at `p_paddr` and zeros for the rest of `p_memsz`.
///
/// # Errors
///
/// Any error of [`check_elf`] (nothing is written then);
/// [`ElfError::NotBacked`] if `mem` does not cover a segment (nothing is
/// written then either); [`ElfError::Write`] if vm-memory fails a write.
pub fn load_elf(mem: &GuestMemoryMmap, elf: &[u8], limits: &ElfLimits) -> Result<LoadedImage, ElfError> {
    let (image, plans) = plan(elf, limits)?;
    for p in &plans {
        let backed = usize::try_from(p.mem_len).is_ok_and(|len| mem.check_range(GuestAddress(p.gpa), len));
        if !backed {
            return Err(ElfError::NotBacked { start: p.gpa, end: p.gpa.saturating_add(p.mem_len) });
        }
    }
    for p in &plans {
        write_segment(mem, elf, p)?;
    }
    Ok(image)
}

/// Copies one checked segment and zeroes its tail.
fn write_segment(mem: &GuestMemoryMmap, elf: &[u8], p: &Plan) -> Result<(), ElfError> {
    const ZERO_CHUNK: u64 = 4096;
    const ZEROS: [u8; 4096] = [0; 4096];
    let file_end = field(p.file_start.checked_add(p.file_len), "segment file range (p_offset + p_filesz)")?;
    let bytes = field(elf.get(p.file_start..file_end), "segment file range (p_offset + p_filesz)")?;
    mem.write_slice(bytes, GuestAddress(p.gpa)).map_err(|source| ElfError::Write { gpa: p.gpa, source })?;

    let file_len = field(u64::try_from(p.file_len).ok(), "segment file size")?;
    let mut gpa = field(p.gpa.checked_add(file_len), "segment address range")?;
    let mut left = p.zero_len;
    while left > 0 {
        let n = left.min(ZERO_CHUNK);
        let chunk = field(usize::try_from(n).ok().and_then(|n| ZEROS.get(..n)), "zeroing length")?;
        mem.write_slice(chunk, GuestAddress(gpa)).map_err(|source| ElfError::Write { gpa, source })?;
        gpa = field(gpa.checked_add(n), "segment address range")?;
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
