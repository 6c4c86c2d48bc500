//! CPUID answered the way KVM answers it from the table the VMM passed to
//! KVM_SET_CPUID2 (Linux `arch/x86/kvm/cpuid.c`, `kvm_cpuid`):
//!
//! * an entry matches a leaf when its function is equal and, if the entry is
//!   flagged index-significant, its index equals the subleaf (else the first
//!   entry for the function matches any subleaf);
//! * a leaf with no entry on an Intel-style vendor (not AMD or Hygon) and out
//!   of its class's range (basic, hypervisor `0x4000_xx00`, extended
//!   `0x8000_0000`, Centaur `0xc000_0000`) is answered from the highest basic
//!   leaf, with the original subleaf;
//! * otherwise a missing leaf reads all zeros, except leaves 0xB and 0x1F when
//!   their subleaf 1 exists: ECX = subleaf & 0xff and EDX = the x2APIC ID.
//!
//! Per-vCPU fields (the APIC IDs) are whatever that vCPU's table holds: the
//! VMM builds one table per vCPU ([`set_apic_id`]) and the sidecore answers
//! each vCPU from its own.
//!
//! KVM also rewrites some bits as the guest's state changes
//! (`kvm_update_cpuid_runtime`); the sidecore cannot read that state (the
//! guest never exits), so the guest passes it with each request
//! ([`GuestState`], [`CpuidTable::lookup_in`]):
//!
//! * leaf 1 ECX.OSXSAVE (bit 27) = CR4.OSXSAVE, when the host has XSAVE;
//! * leaf 1 EDX.APIC (bit 9) = IA32_APIC_BASE.EN (bit 11);
//! * leaf 7.0 ECX.OSPKE (bit 4) = CR4.PKE, when the host has PKU;
//! * leaf 0xD.0 EBX = the standard-form XSAVE size for XCR0;
//! * leaf 0xD.1 EBX = the compacted size for XCR0 | IA32_XSS, when the leaf
//!   has XSAVES or XSAVEC.
//!
//! "The host has XSAVE/PKU" is read off the table (leaf 1 ECX.XSAVE, leaf
//! 7.0 ECX.PKU): KVM only reports a feature the host has, and a guest whose
//! table lacks it cannot set the CR4 bit, so the bit stays as the table has
//! it (clear, in any table KVM handed back). Not tracked, because KVM leaves
//! them alone by default or this project's guests cannot change them: leaf 1
//! ECX.MONITOR from IA32_MISC_ENABLE (only with
//! KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT disabled), leaf 7.0 EBX.RTM/HLE from
//! IA32_TSX_CTRL.CPUID_CLEAR (Intel only), the Hyper-V invariant-TSC and Xen
//! TSC leaves (no Hyper-V or Xen emulation is enabled).

/// KVM_CPUID_FLAG_SIGNIFCANT_INDEX.
pub const FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// Most entries a CPUID table may have: KVM's `KVM_MAX_CPUID_ENTRIES`
/// (`arch/x86/include/asm/kvm_host.h`); KVM_SET_CPUID2 refuses a longer
/// table with E2BIG, so no VM that KVM runs has one. The daemon refuses a
/// longer table at attach, and [`CpuidTable::new`] keeps only this many.
pub const MAX_CPUID_ENTRIES: usize = 256;

/// One entry of a KVM CPUID table (the fields of `kvm_cpuid_entry2`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    /// Leaf (EAX in).
    pub function: u32,
    /// Subleaf (ECX in), when [`FLAG_SIGNIFICANT_INDEX`] is set.
    pub index: u32,
    /// KVM flags.
    pub flags: u32,
    /// EAX out.
    pub eax: u32,
    /// EBX out.
    pub ebx: u32,
    /// ECX out.
    pub ecx: u32,
    /// EDX out.
    pub edx: u32,
}

impl CpuidEntry {
    /// From the wire form `[function, index, flags, eax, ebx, ecx, edx]`
    /// (the daemon's attach message).
    pub fn from_words(w: [u32; 7]) -> CpuidEntry {
        CpuidEntry { function: w[0], index: w[1], flags: w[2], eax: w[3], ebx: w[4], ecx: w[5], edx: w[6] }
    }

    /// The wire form (see [`CpuidEntry::from_words`]).
    pub fn words(&self) -> [u32; 7] {
        [self.function, self.index, self.flags, self.eax, self.ebx, self.ecx, self.edx]
    }
}

/// One table per vCPU from their wire form. A table is cut to
/// [`MAX_CPUID_ENTRIES`] (the daemon's `validate_attach` has refused longer
/// ones before this: the cut only keeps the cost bounded).
pub fn tables_from_words(wire: &[Vec<[u32; 7]>]) -> Vec<CpuidTable> {
    wire.iter().map(|t| CpuidTable::for_this_host(t.iter().map(|w| CpuidEntry::from_words(*w)).collect())).collect()
}

/// The vCPU state KVM derives CPUID bits from, as the guest reports it in a
/// CPUID request. Any value is accepted: it only changes that guest's own
/// answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestState {
    /// CR4.
    pub cr4: u64,
    /// XCR0.
    pub xcr0: u64,
    /// IA32_XSS.
    pub xss: u64,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
}

/// CR4.OSXSAVE.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.PKE.
pub const CR4_PKE: u64 = 1 << 22;
/// IA32_APIC_BASE.EN.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_EDX_APIC: u32 = 1 << 9;
const LEAF7_ECX_PKU: u32 = 1 << 3;
const LEAF7_ECX_OSPKE: u32 = 1 << 4;
const LEAFD1_EAX_XSAVEC: u32 = 1 << 1;
const LEAFD1_EAX_XSAVES: u32 = 1 << 3;
/// The legacy area (512 bytes) and the XSAVE header (64): where component 2
/// may start.
const XSAVE_LEGACY_AND_HEADER: u32 = 512 + 64;

/// One XSAVE state component as its leaf 0xD subleaf describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct XstateComponent {
    /// EAX: size in bytes.
    size: u32,
    /// EBX: offset in the standard form.
    offset: u32,
    /// ECX bit 1: 64-byte aligned in the compacted form.
    align64: bool,
}

/// A vCPU's CPUID table.
///
/// Looked up through an index built once, so that a lookup costs a few
/// binary searches over at most [`MAX_CPUID_ENTRIES`] keys whatever the
/// table holds (a VMM chooses the table: a linear scan let it set the cost
/// of every CPUID request its guest makes of a shared sidecore).
#[derive(Clone, Debug, Default)]
pub struct CpuidTable {
    entries: Vec<CpuidEntry>,
    /// One per function, sorted by function.
    functions: Vec<FunctionKey>,
    /// The first index-significant entry of each (function, index), sorted.
    indexed: Vec<IndexKey>,
    /// Index in `entries` of the entries KVM rewrites at run time.
    leaf1: Option<usize>,
    leaf7: Option<usize>,
    leafd0: Option<usize>,
    leafd1: Option<usize>,
    /// Components 0..64 from the table's leaf 0xD subleaves (absent ones
    /// are all zero and add nothing to a size).
    xstate: Vec<XstateComponent>,
}

/// Where a function's entries are in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FunctionKey {
    function: u32,
    /// The first entry with this function (KVM_CPUID_INDEX_NOT_SIGNIFICANT).
    first: u16,
    /// The first entry with this function that is not index-significant
    /// (it matches any subleaf), or `u16::MAX`.
    any_index: u16,
}

/// An index-significant entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IndexKey {
    function: u32,
    index: u32,
    /// Its position in the table.
    at: u16,
}

/// No entry.
const NONE: u16 = u16::MAX;
const _: () = assert!(MAX_CPUID_ENTRIES < NONE as usize);

fn is_amd_or_hygon(e: &CpuidEntry) -> bool {
    let v = [e.ebx, e.edx, e.ecx];
    let amd = [u32::from_le_bytes(*b"Auth"), u32::from_le_bytes(*b"enti"), u32::from_le_bytes(*b"cAMD")];
    let amd2 = [u32::from_le_bytes(*b"AMDi"), u32::from_le_bytes(*b"sbet"), u32::from_le_bytes(*b"ter!")];
    let hygon = [u32::from_le_bytes(*b"Hygo"), u32::from_le_bytes(*b"nGen"), u32::from_le_bytes(*b"uine")];
    v == amd || v == amd2 || v == hygon
}

impl CpuidTable {
    /// A table of these entries, in KVM's order (the first match wins).
    /// As [`CpuidTable::new`], with the XSAVE component sizes and offsets of
    /// the CPU this runs on, which is what KVM sizes leaf 0xD by
    /// (`xstate_required_size` executes CPUID on the host): the sidecore
    /// and the VMM run on the host whose KVM runs the guest. The table's own
    /// 0xD subleaves usually say the same; an emulated host (QEMU TCG, the
    /// AMD-V bed) can differ, and there KVM's answers follow the host.
    pub fn for_this_host(entries: Vec<CpuidEntry>) -> CpuidTable {
        let mut t = CpuidTable::new(entries);
        t.xstate = host_xstate();
        t
    }

    /// A table of these entries, in KVM's order (the first match wins),
    /// sizing leaf 0xD from its own 0xD subleaves. Only the first
    /// [`MAX_CPUID_ENTRIES`] entries are kept (KVM takes no more).
    pub fn new(mut entries: Vec<CpuidEntry>) -> CpuidTable {
        entries.truncate(MAX_CPUID_ENTRIES);
        let mut t = CpuidTable { entries, ..CpuidTable::default() };
        t.build_index();
        // KVM's cpuid_entry2_find: leaf 1 with KVM_CPUID_INDEX_NOT_SIGNIFICANT,
        // the others with subleaf 0 or 1.
        t.leaf1 = t.first_of(1);
        t.leaf7 = t.position(7, 0);
        t.leafd0 = t.position(0xd, 0);
        t.leafd1 = t.position(0xd, 1);
        // Component i's own subleaf only: a table whose leaf 0xD is not
        // index-significant describes no component.
        t.xstate = (0..64u32)
            .map(|i| {
                t.indexed_at(0xd, i).and_then(|at| t.entries.get(at)).map_or_else(XstateComponent::default, |e| {
                    XstateComponent { size: e.eax, offset: e.ebx, align64: e.ecx & 2 != 0 }
                })
            })
            .collect();
        t
    }

    /// Builds `functions` and `indexed` from `entries` (at most
    /// [`MAX_CPUID_ENTRIES`], so every position fits a u16 below [`NONE`]).
    fn build_index(&mut self) {
        let mut functions: Vec<FunctionKey> = Vec::new();
        let mut indexed: Vec<IndexKey> = Vec::new();
        for (at, e) in self.entries.iter().enumerate() {
            let Ok(at) = u16::try_from(at) else { break };
            if e.flags & FLAG_SIGNIFICANT_INDEX != 0 {
                indexed.push(IndexKey { function: e.function, index: e.index, at });
            }
            let any_index = if e.flags & FLAG_SIGNIFICANT_INDEX == 0 { at } else { NONE };
            functions.push(FunctionKey { function: e.function, first: at, any_index });
        }
        // Stable sorts: among equal keys, table order stays, and the first
        // in table order is the one kept.
        functions.sort_by_key(|k| k.function);
        functions.dedup_by(|later, first| {
            if later.function != first.function {
                return false;
            }
            first.any_index = first.any_index.min(later.any_index);
            true
        });
        indexed.sort_by_key(|k| (k.function, k.index));
        indexed.dedup_by_key(|k| (k.function, k.index));
        self.functions = functions;
        self.indexed = indexed;
    }

    /// The function's key, if the table has an entry for it.
    fn function_key(&self, function: u32) -> Option<&FunctionKey> {
        self.functions.binary_search_by_key(&function, |k| k.function).ok().and_then(|i| self.functions.get(i))
    }

    /// Position of the first index-significant entry for (function, index).
    fn indexed_at(&self, function: u32, index: u32) -> Option<usize> {
        let i = self.indexed.binary_search_by_key(&(function, index), |k| (k.function, k.index)).ok()?;
        self.indexed.get(i).map(|k| usize::from(k.at))
    }

    /// Position of KVM's match for `function`/`index`: the first entry in
    /// table order with this function that is either not index-significant
    /// or has this index.
    fn position(&self, function: u32, index: u32) -> Option<usize> {
        let key = self.function_key(function)?;
        let any = (key.any_index != NONE).then_some(usize::from(key.any_index));
        match (any, self.indexed_at(function, index)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Position of the first entry for `function`, whatever its index.
    fn first_of(&self, function: u32) -> Option<usize> {
        self.function_key(function).map(|k| usize::from(k.first))
    }

    /// The entries.
    pub fn entries(&self) -> &[CpuidEntry] {
        &self.entries
    }

    fn find(&self, function: u32, index: u32) -> Option<&CpuidEntry> {
        self.position(function, index).and_then(|i| self.entries.get(i))
    }

    /// The first entry for `function`, whatever its index (KVM's lookup with
    /// KVM_CPUID_INDEX_NOT_SIGNIFICANT).
    fn find_any(&self, function: u32) -> Option<&CpuidEntry> {
        self.first_of(function).and_then(|i| self.entries.get(i))
    }

    /// KVM's `get_out_of_range_cpuid_entry`.
    fn out_of_range(&self, function: u32, index: u32) -> Option<&CpuidEntry> {
        let basic = self.find_any(0)?;
        if is_amd_or_hygon(basic) {
            return None;
        }
        let class = if (0x4000_0000..=0x4fff_ffff).contains(&function) {
            self.find_any(function & 0xffff_ff00)
        } else if function >= 0xc000_0000 {
            self.find_any(0xc000_0000)
        } else {
            self.find_any(function & 0x8000_0000)
        };
        if class.is_some_and(|c| function <= c.eax) {
            return None;
        }
        self.find(basic.eax, index)
    }

    /// EAX, EBX, ECX, EDX for `leaf`/`subleaf` as the table holds them (KVM's
    /// answer in the state the table was read back in).
    pub fn lookup(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.answer(leaf, subleaf, None)
    }

    /// EAX, EBX, ECX, EDX for `leaf`/`subleaf`, as KVM answers a vCPU in
    /// `state`. Costs at most eight binary searches over at most
    /// [`MAX_CPUID_ENTRIES`] keys and one pass over 61 components, whatever
    /// the table holds.
    pub fn lookup_in(&self, leaf: u32, subleaf: u32, state: &GuestState) -> [u32; 4] {
        self.answer(leaf, subleaf, Some(state))
    }

    fn answer(&self, leaf: u32, subleaf: u32, state: Option<&GuestState>) -> [u32; 4] {
        if let Some(e) = self.find(leaf, subleaf).or_else(|| self.out_of_range(leaf, subleaf)) {
            let r = [e.eax, e.ebx, e.ecx, e.edx];
            return match state {
                // KVM rewrites the entries themselves, so an out-of-range leaf
                // answered from one of them carries the rewrite too.
                Some(s) => self.runtime(e, r, s),
                None => r,
            };
        }
        if leaf == 0xb || leaf == 0x1f {
            if let Some(e) = self.find(leaf, 1) {
                return [0, 0, subleaf & 0xff, e.edx];
            }
        }
        [0; 4]
    }
}

impl CpuidTable {
    /// KVM's `kvm_update_cpuid_runtime`, applied to the answer `r` from entry
    /// `e`.
    fn runtime(&self, e: &CpuidEntry, mut r: [u32; 4], s: &GuestState) -> [u32; 4] {
        let is = |i: Option<usize>| i.and_then(|i| self.entries.get(i)).is_some_and(|d| core::ptr::eq(d, e));
        if is(self.leaf1) {
            if r[2] & LEAF1_ECX_XSAVE != 0 {
                r[2] = with_bit(r[2], LEAF1_ECX_OSXSAVE, s.cr4 & CR4_OSXSAVE != 0);
            }
            r[3] = with_bit(r[3], LEAF1_EDX_APIC, s.apic_base & APIC_BASE_ENABLE != 0);
        }
        if is(self.leaf7) && r[2] & LEAF7_ECX_PKU != 0 {
            r[2] = with_bit(r[2], LEAF7_ECX_OSPKE, s.cr4 & CR4_PKE != 0);
        }
        // One entry may be both 0xD.0 and 0xD.1 (a table whose leaf 0xD is
        // not index-significant): KVM rewrites it twice, in this order.
        if is(self.leafd0) {
            r[1] = self.xstate_size(s.xcr0, false);
        }
        if is(self.leafd1) && r[0] & (LEAFD1_EAX_XSAVES | LEAFD1_EAX_XSAVEC) != 0 {
            r[1] = self.xstate_size(s.xcr0 | s.xss, true);
        }
        r
    }

    /// KVM's `xstate_required_size`: the XSAVE area for the components in
    /// `mask`, standard or compacted. x87 and SSE live in the legacy area;
    /// bit 63 and components the table does not describe add nothing.
    fn xstate_size(&self, mask: u64, compacted: bool) -> u32 {
        let mut size = XSAVE_LEGACY_AND_HEADER;
        for (i, c) in self.xstate.iter().enumerate().take(63).skip(2) {
            if mask & (1u64 << i) == 0 {
                continue;
            }
            let offset = if !compacted {
                c.offset
            } else if c.align64 {
                size.saturating_add(63) & !63
            } else {
                size
            };
            size = size.max(offset.saturating_add(c.size));
        }
        size
    }
}

/// XSAVE components 0..64 as this CPU's CPUID leaf 0xD describes them
/// (all zero without XSAVE).
fn host_xstate() -> Vec<XstateComponent> {
    use std::arch::x86_64::__cpuid_count;
    let none = vec![XstateComponent::default(); 64];
    if __cpuid_count(0, 0).eax < 0xd || __cpuid_count(1, 0).ecx & (1 << 26) == 0 {
        return none;
    }
    (0..64u32)
        .map(|i| {
            let r = __cpuid_count(0xd, i);
            XstateComponent { size: r.eax, offset: r.ebx, align64: r.ecx & 2 != 0 }
        })
        .collect()
}

fn with_bit(v: u32, bit: u32, on: bool) -> u32 {
    if on {
        v | bit
    } else {
        v & !bit
    }
}

/// Writes a vCPU's APIC ID into the fields that carry it, as a VMM does
/// before KVM_SET_CPUID2: CPUID.1:EBX[31:24], and EDX of every 0xB and 0x1F
/// subleaf (the x2APIC ID).
pub fn set_apic_id(entries: &mut [CpuidEntry], apic_id: u32) {
    for e in entries.iter_mut() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((apic_id & 0xff) << 24),
            0xb | 0x1f => e.edx = apic_id,
            _ => {}
        }
    }
}

/// Sets EBX, ECX, EDX of `leaf` (adding the entry if the table lacks it) to a
/// signature, so the guest can tell the VMM's table from anyone else's.
pub fn set_signature(entries: &mut Vec<CpuidEntry>, leaf: u32, sig: [u32; 3]) {
    if let Some(e) = entries.iter_mut().find(|e| e.function == leaf) {
        e.ebx = sig[0];
        e.ecx = sig[1];
        e.edx = sig[2];
    } else {
        entries.push(CpuidEntry {
            function: leaf,
            eax: leaf,
            ebx: sig[0],
            ecx: sig[1],
            edx: sig[2],
            ..Default::default()
        });
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn e(function: u32, index: u32, flags: u32, r: [u32; 4]) -> CpuidEntry {
        CpuidEntry { function, index, flags, eax: r[0], ebx: r[1], ecx: r[2], edx: r[3] }
    }

    fn intel_table() -> CpuidTable {
        let vendor = [0xd, u32::from_le_bytes(*b"Genu"), u32::from_le_bytes(*b"ntel"), u32::from_le_bytes(*b"ineI")];
        CpuidTable::new(vec![
            e(0, 0, 0, vendor),
            e(1, 0, 0, [0x906ea, 0x0080_0800, 0x7ffa_fbff, 0xbfeb_fbff]),
            e(4, 0, 1, [0x121, 1, 2, 3]),
            e(4, 1, 1, [0x122, 4, 5, 6]),
            e(0xb, 0, 1, [1, 1, 0x100, 7]),
            e(0xb, 1, 1, [4, 2, 0x201, 7]),
            e(0xd, 0, 1, [7, 0x340, 0x340, 0]),
            e(0xd, 1, 1, [0xf, 0, 0, 0]),
            e(0x4000_0000, 0, 0, [0x4000_0001, 1, 2, 3]),
            e(0x4000_0001, 0, 0, [9, 0, 0, 0]),
            e(0x8000_0000, 0, 0, [0x8000_0008, 0, 0, 0]),
            e(0x8000_0008, 0, 0, [0x3027, 0, 0, 0]),
        ])
    }

    #[test]
    fn exact_and_indexed_leaves() {
        let t = intel_table();
        assert_eq!(t.lookup(1, 55), [0x906ea, 0x0080_0800, 0x7ffa_fbff, 0xbfeb_fbff], "index not significant");
        assert_eq!(t.lookup(4, 1), [0x122, 4, 5, 6]);
        assert_eq!(t.lookup(0xd, 1), [0xf, 0, 0, 0]);
    }

    #[test]
    fn missing_subleaf_of_indexed_leaf_in_range_is_zero() {
        let t = intel_table();
        // Leaf 4 is within the basic range (max 0xd), subleaf 9 has no entry.
        assert_eq!(t.lookup(4, 9), [0; 4]);
        // Leaf 2 is in range but absent.
        assert_eq!(t.lookup(2, 0), [0; 4]);
    }

    #[test]
    fn topology_leaf_passes_cl_and_x2apic_id() {
        let t = intel_table();
        assert_eq!(t.lookup(0xb, 5), [0, 0, 5, 7]);
        assert_eq!(t.lookup(0xb, 0x1234), [0, 0, 0x34, 7]);
    }

    #[test]
    fn out_of_range_leaf_reads_max_basic_with_same_subleaf() {
        let t = intel_table();
        // 0xe > max basic 0xd: answered from 0xd with subleaf 1.
        assert_eq!(t.lookup(0xe, 1), [0xf, 0, 0, 0]);
        assert_eq!(t.lookup(0x8000_0009, 0), [7, 0x340, 0x340, 0]);
        // Hypervisor class 0x4000_0000 covers up to 0x4000_0001.
        assert_eq!(t.lookup(0x4000_0002, 0), [7, 0x340, 0x340, 0]);
        // A hypervisor class with no base entry (0x4000_0100) is out of range too.
        assert_eq!(t.lookup(0x4000_0105, 0), [7, 0x340, 0x340, 0]);
        // 0xc000_0000 class absent.
        assert_eq!(t.lookup(0xc000_0001, 1), [0xf, 0, 0, 0]);
        // max basic leaf with a subleaf that has no entry: zeros.
        assert_eq!(t.lookup(0x9000_0000, 5), [0; 4]);
    }

    #[test]
    fn amd_vendor_never_redirects() {
        let vendor = [0x10, u32::from_le_bytes(*b"Auth"), u32::from_le_bytes(*b"cAMD"), u32::from_le_bytes(*b"enti")];
        let t = CpuidTable::new(vec![e(0, 0, 0, vendor), e(0x10, 0, 0, [1, 2, 3, 4])]);
        assert_eq!(t.lookup(0x11, 0), [0; 4]);
    }

    #[test]
    fn empty_table_answers_zero() {
        assert_eq!(CpuidTable::default().lookup(0, 0), [0; 4]);
    }

    /// Leaf 0xD of an AMD EPYC (Zen 4) as KVM reports it: x87, SSE, AVX,
    /// AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM), PKRU; CET user/supervisor in
    /// IA32_XSS.
    fn epyc_table() -> CpuidTable {
        let vendor = [0x10, u32::from_le_bytes(*b"Auth"), u32::from_le_bytes(*b"cAMD"), u32::from_le_bytes(*b"enti")];
        CpuidTable::new(vec![
            e(0, 0, 0, vendor),
            e(1, 0, 0, [0xa10f11, 0x0080_0800, 0xfef8_3203 | LEAF1_ECX_XSAVE, 0x178b_fbff]),
            e(7, 0, 1, [1, 0xf1bf_97a9, 0x0040_5fce, 0x1000_0010]),
            e(0xd, 0, 1, [0x2e7, 0x240, 0x988, 0]),
            e(0xd, 1, 1, [0xf, 0x240, 0x1800, 0]),
            e(0xd, 2, 1, [0x100, 0x240, 0, 0]),
            e(0xd, 5, 1, [0x40, 0x340, 0, 0]),
            e(0xd, 6, 1, [0x200, 0x380, 0, 0]),
            e(0xd, 7, 1, [0x400, 0x580, 0, 0]),
            e(0xd, 9, 1, [8, 0x980, 0, 0]),
            e(0xd, 11, 1, [0x10, 0, 1, 0]),
            e(0xd, 12, 1, [0x18, 0, 1, 0]),
            e(0x8000_0000, 0, 0, [0x8000_0028, 0, 0, 0]),
        ])
    }

    fn st(cr4: u64, xcr0: u64, xss: u64, apic_base: u64) -> GuestState {
        GuestState { cr4, xcr0, xss, apic_base }
    }

    #[test]
    fn leaf1_follows_cr4_osxsave_and_apic_enable() {
        let t = epyc_table();
        let base = t.lookup(1, 0);
        let on = t.lookup_in(1, 0, &st(0x620 | CR4_OSXSAVE, 1, 0, 0xfee0_0900));
        assert_eq!(on[2], base[2] | LEAF1_ECX_OSXSAVE);
        assert_eq!(on[3], base[3] | LEAF1_EDX_APIC);
        assert_eq!([on[0], on[1]], [base[0], base[1]]);
        let off = t.lookup_in(1, 7, &st(0x620, 1, 0, 0xfee0_0100));
        assert_eq!(off[2], base[2] & !LEAF1_ECX_OSXSAVE);
        assert_eq!(off[3], base[3] & !LEAF1_EDX_APIC);
        // A table without XSAVE keeps OSXSAVE as it is, whatever CR4 says.
        let mut v = t.entries().to_vec();
        v[1].ecx = (v[1].ecx & !LEAF1_ECX_XSAVE) | LEAF1_ECX_OSXSAVE;
        let no_xsave = CpuidTable::new(v);
        assert_ne!(no_xsave.lookup_in(1, 0, &st(0, 1, 0, 0))[2] & LEAF1_ECX_OSXSAVE, 0);
    }

    #[test]
    fn leaf7_ospke_follows_cr4_pke_only_with_pku() {
        let t = epyc_table();
        let base = t.lookup(7, 0);
        assert_ne!(base[2] & LEAF7_ECX_PKU, 0);
        assert_eq!(t.lookup_in(7, 0, &st(CR4_PKE, 1, 0, 0))[2], base[2] | LEAF7_ECX_OSPKE);
        assert_eq!(t.lookup_in(7, 0, &st(!CR4_PKE, 1, 0, 0))[2], base[2] & !LEAF7_ECX_OSPKE);
        // Subleaf 1 is another entry: untouched.
        assert_eq!(t.lookup_in(7, 1, &st(CR4_PKE, 1, 0, 0)), t.lookup(7, 1));
        let mut v = t.entries().to_vec();
        v[2].ecx &= !LEAF7_ECX_PKU;
        let no_pku = CpuidTable::new(v);
        assert_eq!(no_pku.lookup_in(7, 0, &st(CR4_PKE, 1, 0, 0))[2] & LEAF7_ECX_OSPKE, 0);
    }

    #[test]
    fn leaf_d0_ebx_is_the_standard_size_for_xcr0() {
        let t = epyc_table();
        let size = |xcr0| t.lookup_in(0xd, 0, &st(CR4_OSXSAVE, xcr0, 0, 0))[1];
        assert_eq!(size(1), 576);
        assert_eq!(size(3), 576);
        assert_eq!(size(7), 0x340);
        assert_eq!(size(0xe7), 0x980);
        assert_eq!(size(0x2e7), 0x988, "the CPU's own maximum (ECX)");
        // Standard form keeps the holes: PKRU alone sits at its fixed offset.
        assert_eq!(size(0x207), 0x988);
        // Bits the table does not describe, and bit 63, add nothing.
        assert_eq!(size(u64::MAX), 0x988);
        assert_eq!(size(0x8000_0000_0000_0007 | 0x0010_0000), 0x340);
        // The rest of the entry is the table's.
        let r = t.lookup_in(0xd, 0, &st(0, 7, 0, 0));
        assert_eq!([r[0], r[2], r[3]], [0x2e7, 0x988, 0]);
    }

    #[test]
    fn leaf_d1_ebx_is_the_compacted_size_for_xcr0_and_xss() {
        let t = epyc_table();
        let size = |xcr0, xss| t.lookup_in(0xd, 1, &st(CR4_OSXSAVE, xcr0, xss, 0))[1];
        assert_eq!(size(3, 0), 576);
        assert_eq!(size(7, 0), 0x340);
        assert_eq!(size(0x207, 0), 0x348, "compacted: PKRU right after AVX");
        assert_eq!(size(0x2e7, 0), 0x988);
        assert_eq!(size(7, 0x1800), 0x340 + 0x10 + 0x18);
        assert_eq!(size(7, 0x800), 0x350);
        // XSS bits KVM would refuse still size only what the table describes.
        assert_eq!(size(7, u64::MAX), 0x988 + 0x10 + 0x18);
        // Without XSAVES and XSAVEC the entry is the table's.
        let mut v = t.entries().to_vec();
        v[4].eax = 0x5;
        let plain = CpuidTable::new(v);
        assert_eq!(plain.lookup_in(0xd, 1, &st(CR4_OSXSAVE, 7, 0, 0))[1], 0x240);
    }

    #[test]
    fn compacted_size_aligns_components_that_ask_for_it() {
        // AMX tile config and data (Intel), both 64-byte aligned when compacted.
        let t = CpuidTable::new(vec![
            e(0xd, 0, 1, [0x6_0207, 0, 0, 0]),
            e(0xd, 1, 1, [0x1f, 0, 0, 0]),
            e(0xd, 2, 1, [0x100, 0x240, 0, 0]),
            e(0xd, 9, 1, [8, 0xa80, 0, 0]),
            e(0xd, 17, 1, [0x40, 0xac0, 2, 0]),
            e(0xd, 18, 1, [0x2000, 0xb00, 2, 0]),
        ]);
        let s = st(CR4_OSXSAVE, 0x6_0207, 0, 0);
        // 576 + 256 (AVX) + 8 (PKRU) = 840, aligned to 896, + 64 = 960, + 8192.
        assert_eq!(t.lookup_in(0xd, 1, &s)[1], 960 + 0x2000);
        assert_eq!(t.lookup_in(0xd, 0, &s)[1], 0xb00 + 0x2000);
    }

    #[test]
    fn runtime_bits_reach_out_of_range_leaves_answered_from_them() {
        let t = intel_table();
        let s = st(0, 7, 0, 0);
        // 0xe is past max basic 0xd: KVM answers from the 0xD.0 entry, rewritten.
        assert_eq!(t.lookup_in(0xe, 0, &s), t.lookup_in(0xd, 0, &s));
        assert_eq!(t.lookup_in(0xe, 0, &s)[1], 576, "no component of XCR0 7 is described in this table");
    }

    #[test]
    fn tables_without_runtime_leaves_answer_as_before() {
        let s = st(u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(CpuidTable::default().lookup_in(0xd, 0, &s), [0; 4]);
        let t = intel_table();
        for (leaf, sub) in [(0, 0), (4, 1), (0xb, 5), (0x4000_0000, 0), (0x8000_0008, 0)] {
            assert_eq!(t.lookup_in(leaf, sub, &s), t.lookup(leaf, sub), "{leaf:#x}.{sub}");
        }
        // Leaf 0xD not index-significant: one entry is 0xD.0 and 0xD.1, and
        // describes no component.
        let flat = CpuidTable::new(vec![e(0xd, 0, 0, [7, 0x340, 0x340, 0xf])]);
        assert_eq!(flat.lookup_in(0xd, 3, &st(0, 7, 0, 0)), [7, 576, 0x340, 0xf]);
    }

    /// The lookup as it was before the index: linear scans in table order,
    /// KVM's code read literally. The indexed table must answer the same.
    mod linear {
        use super::super::*;

        fn find(t: &[CpuidEntry], function: u32, index: u32) -> Option<usize> {
            t.iter().position(|e| e.function == function && (e.flags & FLAG_SIGNIFICANT_INDEX == 0 || e.index == index))
        }

        fn find_any(t: &[CpuidEntry], function: u32) -> Option<usize> {
            t.iter().position(|e| e.function == function)
        }

        fn out_of_range(t: &[CpuidEntry], function: u32, index: u32) -> Option<usize> {
            let basic = &t[find_any(t, 0)?];
            if is_amd_or_hygon(basic) {
                return None;
            }
            let class = if (0x4000_0000..=0x4fff_ffff).contains(&function) {
                find_any(t, function & 0xffff_ff00)
            } else if function >= 0xc000_0000 {
                find_any(t, 0xc000_0000)
            } else {
                find_any(t, function & 0x8000_0000)
            };
            if class.is_some_and(|c| function <= t[c].eax) {
                return None;
            }
            find(t, basic.eax, index)
        }

        /// The old `CpuidTable::new` and `answer`, with the runtime rewrite
        /// of `CpuidTable` (which only reads the positions computed here).
        pub fn answer(entries: &[CpuidEntry], leaf: u32, sub: u32, state: Option<&GuestState>) -> [u32; 4] {
            let t = entries;
            let mut table = CpuidTable::new(entries.to_vec());
            table.leaf1 = t.iter().position(|e| e.function == 1);
            table.leaf7 = find(t, 7, 0);
            table.leafd0 = find(t, 0xd, 0);
            table.leafd1 = find(t, 0xd, 1);
            table.xstate = (0..64u32)
                .map(|i| {
                    t.iter()
                        .find(|e| e.function == 0xd && e.index == i && e.flags & FLAG_SIGNIFICANT_INDEX != 0)
                        .map_or_else(XstateComponent::default, |e| XstateComponent {
                            size: e.eax,
                            offset: e.ebx,
                            align64: e.ecx & 2 != 0,
                        })
                })
                .collect();
            if let Some(i) = find(t, leaf, sub).or_else(|| out_of_range(t, leaf, sub)) {
                let e = &table.entries()[i];
                let r = [e.eax, e.ebx, e.ecx, e.edx];
                return match state {
                    Some(s) => table.runtime(e, r, s),
                    None => r,
                };
            }
            if leaf == 0xb || leaf == 0x1f {
                if let Some(i) = find(t, leaf, 1) {
                    return [0, 0, sub & 0xff, t[i].edx];
                }
            }
            [0; 4]
        }
    }

    #[test]
    fn the_index_answers_the_fixed_tables_as_the_linear_lookup() {
        let s = st(CR4_OSXSAVE | CR4_PKE, 0x2e7, 0x1800, APIC_BASE_ENABLE);
        for t in [intel_table(), epyc_table()] {
            for leaf in [0, 1, 2, 4, 7, 0xb, 0xd, 0xe, 0x1f, 0x4000_0000, 0x4000_0002, 0x8000_0000, 0x8000_0009] {
                for sub in [0, 1, 2, 5, 9, 0x1234] {
                    assert_eq!(t.lookup(leaf, sub), linear::answer(t.entries(), leaf, sub, None), "{leaf:#x}.{sub}");
                    assert_eq!(t.lookup_in(leaf, sub, &s), linear::answer(t.entries(), leaf, sub, Some(&s)));
                }
            }
        }
    }

    #[test]
    fn duplicates_answer_from_the_first_in_table_order() {
        // A significant entry before a non-significant one of the same
        // function wins for its own subleaf; the non-significant one takes
        // every other subleaf; a later duplicate never answers.
        let t = CpuidTable::new(vec![
            e(4, 3, 1, [1, 0, 0, 0]),
            e(4, 0, 0, [2, 0, 0, 0]),
            e(4, 3, 1, [3, 0, 0, 0]),
            e(4, 5, 1, [4, 0, 0, 0]),
            e(4, 0, 0, [5, 0, 0, 0]),
        ]);
        assert_eq!(t.lookup(4, 3)[0], 1);
        assert_eq!(t.lookup(4, 5)[0], 2, "the non-significant entry comes first");
        assert_eq!(t.lookup(4, 77)[0], 2);
    }

    #[test]
    fn tables_are_capped_at_kvms_limit() {
        let big: Vec<CpuidEntry> = (0..4096u32).map(|i| e(0x100 + i, 0, 0, [i, 0, 0, 0])).collect();
        let t = CpuidTable::new(big);
        assert_eq!(t.entries().len(), MAX_CPUID_ENTRIES);
        assert_eq!(t.lookup(0x100 + 255, 0)[0], 255);
        assert_eq!(t.lookup(0x100 + 256, 0), [0; 4], "past the cap: not in the table");
        let wire: Vec<Vec<[u32; 7]>> = vec![(0..1000u32).map(|i| [i, 0, 0, i, 0, 0, 0]).collect()];
        assert_eq!(tables_from_words(&wire)[0].entries().len(), MAX_CPUID_ENTRIES);
    }

    fn arb_entry() -> impl Strategy<Value = CpuidEntry> {
        // Few functions and indexes, so that duplicates, classes and the
        // max-basic redirect are all common; values are anything.
        let function = prop_oneof![
            0u32..16,
            Just(0xb),
            Just(0xd),
            Just(0x1f),
            (0u32..4).prop_map(|i| 0x4000_0000 + i),
            (0u32..3).prop_map(|i| 0x4000_0100 + i),
            (0u32..10).prop_map(|i| 0x8000_0000 + i),
            (0u32..3).prop_map(|i| 0xc000_0000 + i),
            any::<u32>(),
        ];
        let eax = prop_oneof![0u32..20, (0u32..12).prop_map(|i| 0x8000_0000 + i), any::<u32>()];
        (function, 0u32..6, 0u32..4, eax, any::<[u32; 3]>()).prop_map(|(function, index, flags, eax, r)| CpuidEntry {
            function,
            index,
            flags,
            eax,
            ebx: r[0],
            ecx: r[1],
            edx: r[2],
        })
    }

    fn arb_table() -> impl Strategy<Value = Vec<CpuidEntry>> {
        let vendor = prop_oneof![
            Just(None),
            Just(Some(*b"GenuineIntel")),
            Just(Some(*b"AuthenticAMD")),
            Just(Some(*b"HygonGenuine"))
        ];
        (proptest::collection::vec(arb_entry(), 0..80), vendor, 0u32..20, any::<prop::sample::Index>()).prop_map(
            |(mut v, vendor, max, at)| {
                if let Some(name) = vendor {
                    let w = |i: usize| u32::from_le_bytes([name[i], name[i + 1], name[i + 2], name[i + 3]]);
                    let leaf0 = e(0, 0, 0, [max, w(0), w(8), w(4)]);
                    let at = at.index(v.len() + 1);
                    v.insert(at, leaf0);
                }
                v
            },
        )
    }

    fn arb_leaf() -> impl Strategy<Value = u32> {
        prop_oneof![
            0u32..24,
            (0u32..6).prop_map(|i| 0x4000_0000 + i),
            (0u32..6).prop_map(|i| 0x4000_0100 + i),
            (0u32..14).prop_map(|i| 0x8000_0000 + i),
            (0u32..4).prop_map(|i| 0xc000_0000 + i),
            any::<u32>(),
        ]
    }

    proptest! {
        #[test]
        fn the_index_answers_as_the_linear_lookup(
            entries in arb_table(),
            queries in proptest::collection::vec((arb_leaf(), prop_oneof![0u32..8, any::<u32>()]), 1..40),
            state in any::<[u64; 4]>(),
        ) {
            let t = CpuidTable::new(entries.clone());
            let s = GuestState { cr4: state[0], xcr0: state[1] | 1, xss: state[2], apic_base: state[3] };
            for (leaf, sub) in queries {
                prop_assert_eq!(t.lookup(leaf, sub), linear::answer(&entries, leaf, sub, None), "{:#x}.{}", leaf, sub);
                prop_assert_eq!(t.lookup_in(leaf, sub, &s), linear::answer(&entries, leaf, sub, Some(&s)), "{:#x}.{} in state", leaf, sub);
            }
        }
    }

    #[test]
    fn apic_id_and_signature() {
        let mut v = intel_table().entries().to_vec();
        set_apic_id(&mut v, 3);
        set_signature(&mut v, 0x4000_0000, [7, 8, 9]);
        set_signature(&mut v, 0x4000_0100, [1, 2, 3]);
        let t = CpuidTable::new(v);
        assert_eq!(t.lookup(1, 0)[1] >> 24, 3);
        assert_eq!(t.lookup(0xb, 0)[3], 3);
        assert_eq!(t.lookup(0xb, 9)[3], 3);
        assert_eq!(&t.lookup(0x4000_0000, 0)[1..], &[7, 8, 9]);
        assert_eq!(t.lookup(0x4000_0100, 0), [0x4000_0100, 1, 2, 3]);
    }
}
