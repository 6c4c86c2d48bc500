//! virtio-blk, device side: the features, the configuration space and the
//! checking of one request's descriptor chain.
//!
//! Everything here reads memory another process controls (the VMM's, and
//! through it the guest's): a chain is checked whole before any I/O is
//! started — the header where it must be, every data buffer inside the
//! memory table and of the right direction, the total a whole number of
//! sectors inside the disk, at most [`SEG_MAX`] pieces — and what fails gets
//! `VIRTIO_BLK_S_IOERR` (or `UNSUPP`), never a write outside guest memory.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Sector size of the virtio-blk protocol (whatever the disk's block size).
pub const SECTOR: u64 = 512;
/// Most pieces (host-contiguous spans) the data of one request may have.
pub const SEG_MAX: usize = 128;
/// Largest descriptor the driver is told about (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Size of the request header: type, reserved, sector.
pub const HEADER: u32 = 16;
/// Size of the configuration space this device has (`struct
/// virtio_blk_config` up to `num_queues`).
pub const CONFIG_LEN: usize = 36;

/// Status byte: done.
pub const S_OK: u8 = 0;
/// I/O error (also: a malformed request).
pub const S_IOERR: u8 = 1;
/// Request type not supported.
pub const S_UNSUPP: u8 = 2;
const _: () = assert!(
    S_OK as u32 == VIRTIO_BLK_S_OK && S_IOERR as u32 == VIRTIO_BLK_S_IOERR && S_UNSUPP as u32 == VIRTIO_BLK_S_UNSUPP
);

/// The virtio-blk feature bits this device offers (device part; the ring
/// and transport bits are added by the backend).
pub fn device_features(readonly: bool, queues: u16) -> u64 {
    let mut f = (1u64 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_FLUSH);
    if queues > 1 {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// The configuration space, little endian, as the driver reads it.
pub fn config_space(capacity_sectors: u64, queues: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    // seg_max: what the driver may put in one request besides header and
    // status; our limit is on host pieces, which are never fewer.
    c[12..16].copy_from_slice(&u32::try_from(SEG_MAX - 2).unwrap_or(1).to_le_bytes());
    c[20..24].copy_from_slice(&u32::try_from(SECTOR).unwrap_or(512).to_le_bytes());
    c[34..36].copy_from_slice(&queues.to_le_bytes());
    c
}

/// What a checked request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes from `sector` into the guest's buffers.
    Read,
    /// Write `len` bytes from the guest's buffers at `sector`.
    Write,
    /// Make written data durable.
    Flush,
    /// Write the device's id string (up to 20 bytes) into the buffer.
    GetId,
}

/// A request that passed every check: the data pieces are in the caller's
/// iovec list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: Kind,
    /// First sector (read and write).
    pub sector: u64,
    /// Bytes of data (the sum of the pieces).
    pub len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The chain cannot be answered at all: it loops, runs outside the
    /// table, or has no device-writable byte for the status. It is handed
    /// back with nothing written.
    Malformed(&'static str),
    /// The status byte is known: it gets this status (IOERR or UNSUPP).
    Status {
        /// Where.
        status: GuestAddress,
        /// Which.
        code: u8,
        /// Why, for the counters' log.
        why: &'static str,
    },
}

/// Checks the chain `descs` (as read from the queue, in order; `complete`
/// false if the chain did not end with a descriptor without NEXT, i.e. it
/// was cut off by a loop, a bad index or an unreadable table) against
/// `mem`; fills `iov` with the host pieces of its data.
///
/// `capacity` is the disk's size in sectors.
pub fn check_chain(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    complete: bool,
    capacity: u64,
    readonly: bool,
    iov: &mut Vec<libc::iovec>,
) -> Result<Request, Refused> {
    iov.clear();
    if !complete {
        return Err(Refused::Malformed("chain loops or leaves the descriptor table"));
    }
    let (Some(head), Some(last)) = (descs.first(), descs.last()) else {
        return Err(Refused::Malformed("empty chain"));
    };
    if descs.len() < 2 {
        return Err(Refused::Malformed("a chain of one descriptor has no status byte"));
    }
    // The status is the last byte of the last descriptor, which must be
    // device-writable and inside guest memory.
    if !last.is_write_only() || last.len() == 0 {
        return Err(Refused::Malformed("the last descriptor is not device-writable"));
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len() - 1))
        .filter(|a| mem.get_slice(*a, 1).is_ok())
        .ok_or(Refused::Malformed("the status byte is outside guest memory"))?;
    let refuse = |code: u8, why: &'static str| Refused::Status { status, code, why };
    if head.is_write_only() || head.len() != HEADER {
        return Err(refuse(S_IOERR, "the header is not one readable 16-byte descriptor"));
    }
    let mut hdr = [0u8; 16];
    mem.read_slice(&mut hdr, head.addr()).map_err(|_| refuse(S_IOERR, "the header is outside guest memory"))?;
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
    let kind = match ty {
        VIRTIO_BLK_T_IN => Kind::Read,
        VIRTIO_BLK_T_OUT => Kind::Write,
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        _ => return Err(refuse(S_UNSUPP, "request type not supported")),
    };
    // The data: every descriptor between the header and the status, plus
    // the last one's bytes before the status.
    let n = descs.len();
    let mut len: u64 = 0;
    for (i, d) in descs.iter().enumerate().take(n - 1).skip(1).chain(std::iter::once((n - 1, last))) {
        let dlen = if i == n - 1 { u64::from(d.len() - 1) } else { u64::from(d.len()) };
        if dlen == 0 {
            continue;
        }
        let writable_wanted = matches!(kind, Kind::Read | Kind::GetId);
        if d.is_write_only() != writable_wanted {
            return Err(refuse(S_IOERR, "a data buffer has the wrong direction"));
        }
        if dlen > u64::from(SIZE_MAX) {
            return Err(refuse(S_IOERR, "a data buffer is over size_max"));
        }
        len += dlen;
        if matches!(kind, Kind::Flush) {
            continue;
        }
        let dlen = usize::try_from(dlen).map_err(|_| refuse(S_IOERR, "buffer too large"))?;
        for piece in mem.get_slices(d.addr(), dlen) {
            let piece = piece.map_err(|_| refuse(S_IOERR, "a data buffer is outside guest memory"))?;
            if iov.len() == SEG_MAX {
                return Err(refuse(S_IOERR, "more than seg_max data pieces"));
            }
            iov.push(libc::iovec { iov_base: piece.ptr_guard_mut().as_ptr().cast(), iov_len: piece.len() });
        }
    }
    let len = u32::try_from(len).map_err(|_| refuse(S_IOERR, "request over 4 GiB"))?;
    match kind {
        Kind::Read | Kind::Write => {
            if u64::from(len) % SECTOR != 0 || len == 0 {
                return Err(refuse(S_IOERR, "data is not a whole number of sectors"));
            }
            let end = sector.checked_add(u64::from(len) / SECTOR);
            if end.is_none_or(|e| e > capacity) {
                return Err(refuse(S_IOERR, "request beyond the end of the disk"));
            }
            if kind == Kind::Write && readonly {
                return Err(refuse(S_IOERR, "write to a read-only disk"));
            }
        }
        Kind::GetId => {
            if len == 0 {
                return Err(refuse(S_IOERR, "GET_ID without a buffer"));
            }
        }
        Kind::Flush => {}
    }
    Ok(Request { kind, sector, len, status })
}

/// Copies up to [`VIRTIO_BLK_ID_BYTES`] of `id` into the pieces; returns
/// the bytes written.
pub fn write_id(iov: &[libc::iovec], id: &[u8]) -> u32 {
    let mut id = &id[..id.len().min(VIRTIO_BLK_ID_BYTES as usize)];
    let mut done = 0u32;
    for v in iov {
        if id.is_empty() {
            break;
        }
        let n = v.iov_len.min(id.len());
        // SAFETY: the piece was checked to be inside guest memory (mapped
        // for as long as the request holds its memory table) and is at
        // least `n` bytes; `id` is our own buffer and does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(id.as_ptr(), v.iov_base.cast::<u8>(), n) };
        id = &id[n..];
        done += u32::try_from(n).unwrap_or(0);
    }
    done
}

/// Writes the status byte (its address was checked to be in `mem`).
pub fn write_status(mem: &GuestMemoryMmap, at: GuestAddress, code: u8) -> bool {
    mem.write_obj(code, at).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const W: u16 = 2;
    const N: u16 = 1;
    const _: () = assert!(W as u32 == VRING_DESC_F_WRITE && N as u32 == VRING_DESC_F_NEXT);

    fn mem() -> GuestMemoryMmap {
        // Two regions with a hole between them: 0..1 MiB and 2..3 MiB.
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(2 << 20), 1 << 20)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn check(m: &GuestMemoryMmap, descs: &[Descriptor]) -> (Result<Request, Refused>, usize) {
        let mut iov = Vec::with_capacity(SEG_MAX);
        let r = check_chain(m, descs, true, 2048, false, &mut iov);
        (r, iov.len())
    }

    #[test]
    fn a_read_and_a_write_pass() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 8);
        let (r, pieces) = check(&m, &[d(0x1000, 16, N), d(0x2000, 4096, W | N), d(0x3000, 1, W)]);
        assert_eq!(r, Ok(Request { kind: Kind::Read, sector: 8, len: 4096, status: GuestAddress(0x3000) }));
        assert_eq!(pieces, 1);
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 2047);
        let (r, _) = check(&m, &[d(0x1000, 16, N), d(0x2000, 512, N), d(0x3000, 1, W)]);
        assert_eq!(r.map(|r| r.kind), Ok(Kind::Write));
    }

    #[test]
    fn the_status_may_share_the_last_data_descriptor() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let (r, _) = check(&m, &[d(0x1000, 16, N), d(0x2000, 513, W)]);
        assert_eq!(r, Ok(Request { kind: Kind::Read, sector: 0, len: 512, status: GuestAddress(0x2200) }));
    }

    #[test]
    fn a_buffer_across_two_regions_is_two_pieces_and_one_across_the_hole_fails() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        // Ends exactly at the first region's end: one piece.
        let (r, pieces) = check(&m, &[d(0x1000, 16, N), d((1 << 20) - 4096, 4096, W | N), d(0x3000, 1, W)]);
        assert!(r.is_ok());
        assert_eq!(pieces, 1);
        // Into the hole.
        let (r, _) = check(&m, &[d(0x1000, 16, N), d((1 << 20) - 512, 4096, W | N), d(0x3000, 1, W)]);
        assert!(matches!(r, Err(Refused::Status { code: S_IOERR, .. })), "{r:?}");
    }

    #[test]
    fn bad_chains_get_ioerr_or_nothing() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let ioerr = |r: Result<Request, Refused>| matches!(r, Err(Refused::Status { code: S_IOERR, .. }));
        // Wrong direction, odd length, past the end, outside memory, oversized.
        assert!(ioerr(check(&m, &[d(0x1000, 16, N), d(0x2000, 4096, N), d(0x3000, 1, W)]).0));
        assert!(ioerr(check(&m, &[d(0x1000, 16, N), d(0x2000, 100, W | N), d(0x3000, 1, W)]).0));
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 2047);
        assert!(ioerr(check(&m, &[d(0x1000, 16, N), d(0x2000, 1024, W | N), d(0x3000, 1, W)]).0));
        header(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
        assert!(ioerr(check(&m, &[d(0x1000, 16, N), d(0x2000, 512, W | N), d(0x3000, 1, W)]).0));
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert!(ioerr(check(&m, &[d(0x1000, 16, N), d(64 << 20, 512, W | N), d(0x3000, 1, W)]).0));
        assert!(ioerr(check(&m, &[d(0x1000, 16, N), d(0x2000, SIZE_MAX + 512, W | N), d(0x3000, 1, W)]).0));
        // Header too short, or writable.
        assert!(ioerr(check(&m, &[d(0x1000, 8, N), d(0x2000, 512, W | N), d(0x3000, 1, W)]).0));
        assert!(ioerr(check(&m, &[d(0x1000, 16, W | N), d(0x2000, 512, W | N), d(0x3000, 1, W)]).0));
        // More pieces than SEG_MAX.
        let mut many = vec![d(0x1000, 16, N)];
        many.extend((0..SEG_MAX as u64 + 1).map(|i| d(0x4000 + i * 512, 512, W | N)));
        many.push(d(0x3000, 1, W));
        assert!(ioerr(check(&m, &many).0));
        // Unknown type: UNSUPP.
        header(&m, 0x1000, 99, 0);
        let r = check(&m, &[d(0x1000, 16, N), d(0x3000, 1, W)]).0;
        assert!(matches!(r, Err(Refused::Status { code: S_UNSUPP, .. })));
        // A write to a read-only disk.
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let mut iov = Vec::new();
        let r = check_chain(&m, &[d(0x1000, 16, N), d(0x2000, 512, N), d(0x3000, 1, W)], true, 2048, true, &mut iov);
        assert!(ioerr(r));
        // No status at all, or the status outside memory, or a cut chain: nothing written.
        let malformed = |r: Result<Request, Refused>| matches!(r, Err(Refused::Malformed(_)));
        assert!(malformed(check(&m, &[d(0x1000, 16, N), d(0x2000, 512, N)]).0));
        assert!(malformed(check(&m, &[d(0x1000, 16, N), d(64 << 20, 1, W)]).0));
        assert!(malformed(check(&m, &[d(0x1000, 16, 0)]).0));
        assert!(malformed(check_chain(&m, &[d(0x1000, 16, N), d(0x3000, 1, W | N)], false, 2048, false, &mut iov)));
        assert!(iov.is_empty());
    }

    #[test]
    fn flush_and_get_id() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(check(&m, &[d(0x1000, 16, N), d(0x3000, 1, W)]).0.map(|r| r.kind), Ok(Kind::Flush));
        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let mut iov = Vec::new();
        let r = check_chain(&m, &[d(0x1000, 16, N), d(0x2000, 20, W | N), d(0x3000, 1, W)], true, 1, false, &mut iov);
        assert_eq!(r.map(|r| r.kind), Ok(Kind::GetId));
        assert_eq!(write_id(&iov, b"sidecore-disk-0-and-more-than-twenty"), 20);
        let mut got = [0u8; 20];
        m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got, b"sidecore-disk-0-and-");
    }

    #[test]
    fn config_space_fields() {
        let c = config_space(1 << 21, 2);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 1 << 21);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_ne!(device_features(true, 1) & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(device_features(false, 1) & (1 << VIRTIO_BLK_F_MQ), 0);
    }
}
