//! Tests of the ELF checks: every refusal with its reason, and loads.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
use super::*;
use shm_proto::layout::IMAGE_GPA;

const MIB: u64 = 1 << 20;
const RAM: u64 = 4 * MIB;
const PF_R: u32 = 4;

/// One segment for [`build`]: its bytes follow the program headers.
struct Seg {
    paddr: u64,
    flags: u32,
    data: Vec<u8>,
    memsz: u64,
}

fn seg(paddr: u64, flags: u32, data: &[u8], memsz: u64) -> Seg {
    Seg { paddr, flags, data: data.to_vec(), memsz }
}

fn put16(v: &mut [u8], off: usize, x: u16) {
    v[off..off + 2].copy_from_slice(&x.to_le_bytes());
}

fn put32(v: &mut [u8], off: usize, x: u32) {
    v[off..off + 4].copy_from_slice(&x.to_le_bytes());
}

fn put64(v: &mut [u8], off: usize, x: u64) {
    v[off..off + 8].copy_from_slice(&x.to_le_bytes());
}

/// Offset of program header `i` in a [`build`] image.
fn ph(i: usize) -> usize {
    EHDR_SIZE + i * PHDR_SIZE
}

fn u64of(x: usize) -> u64 {
    u64::try_from(x).expect("fits")
}

/// A valid x86-64 ET_EXEC: header, program headers, then segment bytes.
fn build(entry: u64, segs: &[Seg]) -> Vec<u8> {
    let mut v = vec![0u8; EHDR_SIZE + segs.len() * PHDR_SIZE];
    v[0..4].copy_from_slice(&ELF_MAGIC);
    v[4] = ELFCLASS64;
    v[5] = ELFDATA2LSB;
    v[6] = 1; // EV_CURRENT
    put16(&mut v, 16, ET_EXEC);
    put16(&mut v, 18, EM_X86_64);
    put32(&mut v, 20, 1);
    put64(&mut v, 24, entry);
    put64(&mut v, 32, u64of(EHDR_SIZE));
    put16(&mut v, 52, u16::try_from(EHDR_SIZE).expect("fits"));
    put16(&mut v, 54, u16::try_from(PHDR_SIZE).expect("fits"));
    put16(&mut v, 56, u16::try_from(segs.len()).expect("fits"));
    for (i, s) in segs.iter().enumerate() {
        let offset = u64of(v.len());
        let o = ph(i);
        put32(&mut v, o, PT_LOAD);
        put32(&mut v, o + 4, s.flags);
        put64(&mut v, o + 8, offset);
        put64(&mut v, o + 16, s.paddr);
        put64(&mut v, o + 24, s.paddr);
        put64(&mut v, o + 32, u64of(s.data.len()));
        put64(&mut v, o + 40, s.memsz);
        put64(&mut v, o + 48, 0x1000);
        v.extend_from_slice(&s.data);
    }
    v
}

fn limits() -> ElfLimits {
    ElfLimits { ram_size: RAM, image_gpa: IMAGE_GPA, image_limit: RAM }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(RAM).expect("fits"))]).expect("guest memory")
}

/// Text at IMAGE_GPA, data + bss one page up.
fn good() -> Vec<u8> {
    build(
        IMAGE_GPA + 4,
        &[
            seg(IMAGE_GPA, PF_R | PF_X, &[0x90, 0x90, 0x90, 0x90, 0xf4], 5),
            seg(IMAGE_GPA + 0x1000, PF_R | PF_W, &[1, 2, 3, 4], 0x2100),
        ],
    )
}

#[test]
fn valid_image_loads_and_zeroes_bss() {
    let mem = memory();
    // Dirty the bss so zeroing is visible.
    mem.write_slice(&[0xaa; 0x2100], GuestAddress(IMAGE_GPA + 0x1000)).expect("prefill");
    let img = load_elf(&mem, &good(), &limits()).expect("loads");
    assert_eq!(img.entry, IMAGE_GPA + 4);
    assert_eq!(img.image_end, IMAGE_GPA + 0x1000 + 0x2100);
    assert_eq!(
        img.segments,
        vec![
            Segment { gpa: IMAGE_GPA, mem_size: 5, writable: false, executable: true },
            Segment { gpa: IMAGE_GPA + 0x1000, mem_size: 0x2100, writable: true, executable: false },
        ]
    );
    let mut text = [0u8; 5];
    mem.read_slice(&mut text, GuestAddress(IMAGE_GPA)).expect("read");
    assert_eq!(text, [0x90, 0x90, 0x90, 0x90, 0xf4]);
    let mut data = vec![0u8; 0x2100];
    mem.read_slice(&mut data, GuestAddress(IMAGE_GPA + 0x1000)).expect("read");
    assert_eq!(&data[..4], &[1, 2, 3, 4]);
    assert!(data[4..].iter().all(|&b| b == 0), "bss not zeroed");
    // The byte after the segment is untouched.
    let after: u8 = mem.read_obj(GuestAddress(IMAGE_GPA + 0x1000 + 0x2100)).expect("read");
    assert_eq!(after, 0);
}

#[test]
fn check_matches_load() {
    let mem = memory();
    let checked = check_elf(&good(), &limits()).expect("valid");
    let loaded = load_elf(&mem, &good(), &limits()).expect("loads");
    assert_eq!(checked, loaded);
}

#[test]
fn non_load_headers_are_ignored() {
    let mut v = good();
    // Make segment 1 a PT_NOTE-like header pointing at junk: ignored.
    put32(&mut v, ph(1), 4);
    put64(&mut v, ph(1) + 24, 0);
    let img = check_elf(&v, &limits()).expect("valid");
    assert_eq!(img.segments.len(), 1);
    assert_eq!(img.image_end, IMAGE_GPA + 5);
}

#[test]
fn too_short() {
    let v = good();
    let r = check_elf(&v[..63], &limits());
    assert!(matches!(r, Err(ElfError::TooShort { len: 63 })), "{r:?}");
    let r = check_elf(&[], &limits());
    assert!(matches!(r, Err(ElfError::TooShort { len: 0 })), "{r:?}");
}

#[test]
fn bad_magic() {
    let mut v = good();
    v[1] = b'X';
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::BadMagic)), "{r:?}");
}

#[test]
fn class_32_bit() {
    let mut v = good();
    v[4] = 1;
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::Not64Bit { class: 1 })), "{r:?}");
}

#[test]
fn big_endian() {
    let mut v = good();
    v[5] = 2;
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::NotLittleEndian { data: 2 })), "{r:?}");
}

#[test]
fn wrong_machine() {
    let mut v = good();
    put16(&mut v, 18, 183); // EM_AARCH64
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::WrongMachine { machine: 183 })), "{r:?}");
}

#[test]
fn pie_is_refused() {
    let mut v = good();
    put16(&mut v, 16, ET_DYN);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::NotExecutable { e_type: ET_DYN, .. })), "{r:?}");
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("ET_DYN") && msg.contains("fixed address"), "{msg}");
}

#[test]
fn bad_phentsize() {
    let mut v = good();
    put16(&mut v, 54, 32);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::BadPhentsize { size: 32 })), "{r:?}");
}

#[test]
fn phdr_table_out_of_bounds() {
    let mut v = good();
    let near_end = u64of(v.len()) - 10;
    put64(&mut v, 32, near_end);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::PhdrsOutOfBounds { .. })), "{r:?}");

    let mut v = good();
    put16(&mut v, 56, 1000);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::PhdrsOutOfBounds { .. })), "{r:?}");
}

#[test]
fn phdr_offset_overflow() {
    let mut v = good();
    put64(&mut v, 32, u64::MAX - 8);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::Overflow { .. } | ElfError::PhdrsOutOfBounds { .. })), "{r:?}");
}

#[test]
fn no_load_segment() {
    let mut v = good();
    put32(&mut v, ph(0), 4);
    put32(&mut v, ph(1), 4);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::NoLoadSegment)), "{r:?}");
    let v = build(IMAGE_GPA, &[]);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::NoLoadSegment)), "{r:?}");
}

#[test]
fn filesz_exceeds_memsz() {
    let v = build(IMAGE_GPA, &[seg(IMAGE_GPA, PF_R | PF_X, &[0x90; 16], 8)]);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::FileSizeExceedsMemSize { index: 0, filesz: 16, memsz: 8 })), "{r:?}");
}

#[test]
fn truncated_segment_data() {
    let v = good();
    let r = check_elf(&v[..v.len() - 1], &limits());
    assert!(matches!(r, Err(ElfError::FileRangeOutOfBounds { index: 1, .. })), "{r:?}");
}

#[test]
fn file_offset_overflow() {
    let mut v = good();
    put64(&mut v, ph(0) + 8, u64::MAX - 2);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::Overflow { .. })), "{r:?}");
}

#[test]
fn vaddr_differs_from_paddr() {
    let mut v = good();
    put64(&mut v, ph(0) + 16, 0xffff_ffff_8000_0000);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::NotIdentityMapped { index: 0, .. })), "{r:?}");
}

#[test]
fn segment_below_image_gpa() {
    let start = IMAGE_GPA - 0x1000;
    let v = build(start, &[seg(start, PF_R | PF_X, &[0x90], 0x2000)]);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::SegmentBelowImage { index: 0, .. })), "{r:?}");
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("page-table pool"), "{msg}");
}

#[test]
fn segment_past_ram() {
    let v = build(IMAGE_GPA, &[seg(IMAGE_GPA, PF_R | PF_X | PF_W, &[0x90], RAM)]);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::SegmentPastRam { index: 0, .. })), "{r:?}");
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("more memory"), "{msg}");
}

#[test]
fn segment_past_image_limit() {
    let lim = ElfLimits { image_limit: IMAGE_GPA + MIB, ..limits() };
    let v = build(IMAGE_GPA, &[seg(IMAGE_GPA, PF_R | PF_X, &[0x90], MIB + 1)]);
    let r = check_elf(&v, &lim);
    assert!(matches!(r, Err(ElfError::SegmentPastLimit { index: 0, .. })), "{r:?}");
    // Exactly up to the limit is fine.
    let v = build(IMAGE_GPA, &[seg(IMAGE_GPA, PF_R | PF_X, &[0x90], MIB)]);
    assert!(check_elf(&v, &lim).is_ok());
}

#[test]
fn paddr_plus_memsz_overflows() {
    let mut v = good();
    put64(&mut v, ph(1) + 16, u64::MAX - 0x10);
    put64(&mut v, ph(1) + 24, u64::MAX - 0x10);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::Overflow { .. })), "{r:?}");
}

#[test]
fn overlapping_segments() {
    let v = build(
        IMAGE_GPA,
        &[seg(IMAGE_GPA, PF_R | PF_X, &[0x90; 8], 0x1000), seg(IMAGE_GPA + 0xfff, PF_R | PF_W, &[1], 0x10)],
    );
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::OverlappingSegments { first: 0, second: 1, .. })), "{r:?}");
    // Out of file order too.
    let v = build(
        IMAGE_GPA + 0x1000,
        &[seg(IMAGE_GPA + 0x1000, PF_R | PF_X, &[0x90; 8], 0x1000), seg(IMAGE_GPA, PF_R | PF_W, &[1], 0x1001)],
    );
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::OverlappingSegments { first: 1, second: 0, .. })), "{r:?}");
}

#[test]
fn entry_outside_executable_segment() {
    // Entry in the data segment.
    let mut v = good();
    put64(&mut v, 24, IMAGE_GPA + 0x1000);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::EntryNotExecutable { .. })), "{r:?}");
    // Entry one past the text segment's end.
    let mut v = good();
    put64(&mut v, 24, IMAGE_GPA + 5);
    let r = check_elf(&v, &limits());
    assert!(matches!(r, Err(ElfError::EntryNotExecutable { .. })), "{r:?}");
}

#[test]
fn nothing_written_when_a_check_fails() {
    let mem = memory();
    let mut v = good();
    // Second segment past RAM: the first must not have been written.
    put64(&mut v, ph(1) + 40, RAM);
    let r = load_elf(&mem, &v, &limits());
    assert!(matches!(r, Err(ElfError::SegmentPastRam { .. })), "{r:?}");
    let first: u8 = mem.read_obj(GuestAddress(IMAGE_GPA)).expect("read");
    assert_eq!(first, 0);
}

#[test]
fn limits_beyond_backed_memory() {
    // Limits claim 8 MiB but only 4 MiB is mapped.
    let mem = memory();
    let lim = ElfLimits { ram_size: 2 * RAM, image_gpa: IMAGE_GPA, image_limit: 2 * RAM };
    let v =
        build(IMAGE_GPA, &[seg(IMAGE_GPA, PF_R | PF_X, &[0x90], 0x1000), seg(RAM - 0x1000, PF_R | PF_W, &[7], 0x2000)]);
    let r = load_elf(&mem, &v, &lim);
    assert!(matches!(r, Err(ElfError::NotBacked { .. })), "{r:?}");
    let first: u8 = mem.read_obj(GuestAddress(IMAGE_GPA)).expect("read");
    assert_eq!(first, 0);
}
