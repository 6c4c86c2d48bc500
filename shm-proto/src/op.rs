//! Opcodes, flags, status codes, and how each request and reply is encoded in
//! a slot's words.
//!
//! A request is a head word plus six argument words:
//!
//! | head bits | meaning |
//! |---|---|
//! | 0..16 | opcode ([`Opcode`] or a registry hypercall, `0x100..=0x1ff`) |
//! | 16..32 | flags ([`FLAGS_KNOWN`]; any other bit set is refused) |
//! | 32..64 | reserved, must be zero |
//!
//! A reply overwrites the head word with the status ([`Status`], low 32 bits,
//! the high 32 bits zero) and the argument words with the results.

/// Built-in opcodes. Registry hypercalls use [`USER_OP_FIRST`]`..=`[`USER_OP_LAST`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// The null call: returns at once. Reply word 0 echoes request word 0.
    Null = 1,
    /// CPUID. Request (v2): word 0 = leaf, word 1 = subleaf (both < 2^32),
    /// then the calling vCPU's state that KVM derives CPUID bits from
    /// (`kvm_update_cpuid_runtime`): word 2 = CR4, word 3 = XCR0, word 4 =
    /// IA32_XSS, word 5 = IA32_APIC_BASE. They set leaf 1 ECX.OSXSAVE
    /// (CR4.OSXSAVE) and EDX.APIC (APIC_BASE.EN), leaf 7.0 ECX.OSPKE
    /// (CR4.PKE), leaf 0xD.0 EBX (XSAVE size for XCR0) and leaf 0xD.1 EBX
    /// (compacted size for XCR0 | XSS). Any values are accepted and change
    /// only the caller's answer; XCR0 and XSS bits the vCPU's table does not
    /// describe add nothing to a size. Word 3 = 0 (an XCR0 no CPU can hold)
    /// is a v1 request: words 2..6 are ignored and the answer is the table as
    /// the VMM read it back from KVM at build time.
    /// Reply: words 0..4 = EAX, EBX, ECX, EDX.
    Cpuid = 2,
    /// Page-table update, like Xen's mmu_update. Request: word 0 = GPA of a
    /// table in the page-table pool, word 1 = index (0..512), word 2 = the
    /// new entry (0 to unmap). Reply: word 0 = [`PteKind`], word 1 = the
    /// entry as written (A, D and U/S preset).
    PteUpdate = 3,
}

impl Opcode {
    /// Decodes a built-in opcode.
    pub const fn from_u16(v: u16) -> Option<Opcode> {
        match v {
            1 => Some(Opcode::Null),
            2 => Some(Opcode::Cpuid),
            3 => Some(Opcode::PteUpdate),
            _ => None,
        }
    }
}

/// What a page-table update did.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PteKind {
    /// Not present before, not present after.
    Noop = 0,
    /// Not present -> present: visible at once, no flush.
    Map = 1,
    /// Present -> present with other contents: needs a flush (hardware
    /// KVM: the guest's invlpg; PVM: the host drops the shadow pages).
    Change = 2,
    /// Present -> not present: as for a change.
    Unmap = 3,
}

impl PteKind {
    /// Decodes a reply word.
    pub const fn from_u64(v: u64) -> Option<PteKind> {
        match v {
            0 => Some(PteKind::Noop),
            1 => Some(PteKind::Map),
            2 => Some(PteKind::Change),
            3 => Some(PteKind::Unmap),
            _ => None,
        }
    }
}

/// First opcode of the hypercall registry.
pub const USER_OP_FIRST: u16 = 0x100;
/// Last opcode of the hypercall registry.
pub const USER_OP_LAST: u16 = 0x1ff;
/// Registry hypercall the VMM registers: host CLOCK_MONOTONIC in ns (word 0).
pub const HC_MONOTONIC_NS: u16 = 0x100;
/// Registry hypercall the VMM registers: adds word 0 to a per-vCPU counter
/// and returns the new value in word 0. It has a side effect, so the
/// selftest uses it to prove that no call is applied twice or lost.
pub const HC_COUNTER_ADD: u16 = 0x101;
/// Registry hypercall the VMM registers: returns `a * 3 + b ^ vcpu` for words
/// 0 and 1 — a pure function of the request and the caller, so every path must
/// agree on it.
pub const HC_MIX: u16 = 0x102;

/// Flag: the guest will not wait for this reply (asynchronous call).
pub const FLAG_NO_REPLY: u16 = 1 << 0;
/// Every flag bit this ABI version knows.
pub const FLAGS_KNOWN: u16 = FLAG_NO_REPLY;

/// Number of argument/result words in a slot.
pub const WORDS: usize = 6;

/// Reply status. 0 is success; everything else is an error the guest can
/// act on.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The request was carried out.
    Ok = 0,
    /// Opcode not known to this sidecore.
    UnknownOp = 1,
    /// Reserved bits set in the head word or the flags.
    ReservedBits = 2,
    /// The slot's ticket is not the one the sidecore expected (skipped,
    /// repeated, or not in the slot its lap says).
    BadSequence = 3,
    /// An argument is out of range (e.g. a CPUID leaf ≥ 2^32, an index
    /// past a table).
    BadArgument = 4,
    /// The request is well-formed but not allowed (e.g. a PTE that would map
    /// the shared region).
    Denied = 5,
    /// This server cannot carry out the request; use the exit path.
    UseExitPath = 6,
    /// The service failed on the host side.
    HostError = 7,
}

/// Number of [`Status`] values (for counter arrays).
pub const STATUS_COUNT: usize = 8;

impl Status {
    /// Decodes a status word.
    pub const fn from_u32(v: u32) -> Option<Status> {
        match v {
            0 => Some(Status::Ok),
            1 => Some(Status::UnknownOp),
            2 => Some(Status::ReservedBits),
            3 => Some(Status::BadSequence),
            4 => Some(Status::BadArgument),
            5 => Some(Status::Denied),
            6 => Some(Status::UseExitPath),
            7 => Some(Status::HostError),
            _ => None,
        }
    }

    /// Short lower-case name, for counters and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::UnknownOp => "unknown_op",
            Status::ReservedBits => "reserved_bits",
            Status::BadSequence => "bad_sequence",
            Status::BadArgument => "bad_argument",
            Status::Denied => "denied",
            Status::UseExitPath => "use_exit_path",
            Status::HostError => "host_error",
        }
    }

    /// Every status, in numeric order.
    pub const ALL: [Status; STATUS_COUNT] = [
        Status::Ok,
        Status::UnknownOp,
        Status::ReservedBits,
        Status::BadSequence,
        Status::BadArgument,
        Status::Denied,
        Status::UseExitPath,
        Status::HostError,
    ];
}

/// Encodes a request head word.
pub const fn encode_head(opcode: u16, flags: u16) -> u64 {
    (opcode as u64) | ((flags as u64) << 16)
}

/// A request head word, decoded and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// The opcode.
    pub opcode: u16,
    /// The flags (only known bits).
    pub flags: u16,
}

/// Decodes a request head word; refuses reserved bits.
pub const fn decode_head(word: u64) -> Result<Head, Status> {
    if word >> 32 != 0 {
        return Err(Status::ReservedBits);
    }
    let opcode = (word & 0xffff) as u16;
    let flags = ((word >> 16) & 0xffff) as u16;
    if flags & !FLAGS_KNOWN != 0 {
        return Err(Status::ReservedBits);
    }
    Ok(Head { opcode, flags })
}

/// Encodes a reply head word.
pub const fn encode_status(status: Status) -> u64 {
    status as u32 as u64
}

/// Decodes a reply head word; an unknown value is reported as `Err(raw)`.
pub const fn decode_status(word: u64) -> Result<Status, u64> {
    if word >> 32 != 0 {
        return Err(word);
    }
    // The high half is zero (checked above): the value fits.
    #[allow(clippy::cast_possible_truncation)]
    let low = word as u32;
    match Status::from_u32(low) {
        Some(s) => Ok(s),
        None => Err(word),
    }
}

/// Counter class of an opcode: built-ins by their number, every registry
/// hypercall in [`OP_CLASS_USER`], anything else in [`OP_CLASS_UNKNOWN`].
pub const fn op_class(opcode: u16) -> usize {
    match opcode {
        1..=3 => opcode as usize,
        USER_OP_FIRST..=USER_OP_LAST => OP_CLASS_USER,
        _ => OP_CLASS_UNKNOWN,
    }
}
/// Counter class of an unknown opcode.
pub const OP_CLASS_UNKNOWN: usize = 0;
/// Counter class of all registry hypercalls.
pub const OP_CLASS_USER: usize = 4;
/// Number of counter classes.
pub const OP_CLASS_COUNT: usize = 5;
/// Names of the counter classes, indexed by class.
pub const OP_CLASS_NAMES: [&str; OP_CLASS_COUNT] = ["unknown", "null", "cpuid", "pte", "hypercall"];

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn head_refuses_reserved_bits() {
        assert_eq!(decode_head(1 << 32), Err(Status::ReservedBits));
        assert_eq!(decode_head(encode_head(1, 1 << 5)), Err(Status::ReservedBits));
        assert_eq!(decode_head(encode_head(2, FLAG_NO_REPLY)), Ok(Head { opcode: 2, flags: FLAG_NO_REPLY }));
    }

    #[test]
    fn status_names_cover_all() {
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
            assert_eq!(Status::from_u32(i as u32), Some(*s));
            assert!(!s.name().is_empty());
        }
        assert_eq!(Status::from_u32(STATUS_COUNT as u32), None);
    }

    proptest! {
        #[test]
        fn head_roundtrip(op in any::<u16>(), flags in 0u16..=FLAGS_KNOWN) {
            prop_assert_eq!(decode_head(encode_head(op, flags)), Ok(Head { opcode: op, flags }));
        }

        #[test]
        fn head_decode_never_accepts_unknown_bits(word in any::<u64>()) {
            if let Ok(h) = decode_head(word) {
                prop_assert_eq!(encode_head(h.opcode, h.flags), word);
            }
        }

        #[test]
        fn status_roundtrip(i in 0usize..STATUS_COUNT) {
            let s = Status::ALL[i];
            prop_assert_eq!(decode_status(encode_status(s)), Ok(s));
        }

        #[test]
        fn op_class_in_range(op in any::<u16>()) {
            prop_assert!(op_class(op) < OP_CLASS_COUNT);
        }
    }
}
