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

/// KVM_CPUID_FLAG_SIGNIFCANT_INDEX.
pub const FLAG_SIGNIFICANT_INDEX: u32 = 1;

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

/// One table per vCPU from their wire form.
pub fn tables_from_words(wire: &[Vec<[u32; 7]>]) -> Vec<CpuidTable> {
    wire.iter().map(|t| CpuidTable::new(t.iter().map(|w| CpuidEntry::from_words(*w)).collect())).collect()
}

/// A vCPU's CPUID table.
#[derive(Clone, Debug, Default)]
pub struct CpuidTable {
    entries: Vec<CpuidEntry>,
}

fn is_amd_or_hygon(e: &CpuidEntry) -> bool {
    let v = [e.ebx, e.edx, e.ecx];
    let amd = [u32::from_le_bytes(*b"Auth"), u32::from_le_bytes(*b"enti"), u32::from_le_bytes(*b"cAMD")];
    let amd2 = [u32::from_le_bytes(*b"AMDi"), u32::from_le_bytes(*b"sbet"), u32::from_le_bytes(*b"ter!")];
    let hygon = [u32::from_le_bytes(*b"Hygo"), u32::from_le_bytes(*b"nGen"), u32::from_le_bytes(*b"uine")];
    v == amd || v == amd2 || v == hygon
}

impl CpuidTable {
    /// A table of these entries, in KVM's order (the first match wins).
    pub fn new(entries: Vec<CpuidEntry>) -> CpuidTable {
        CpuidTable { entries }
    }

    /// The entries.
    pub fn entries(&self) -> &[CpuidEntry] {
        &self.entries
    }

    fn find(&self, function: u32, index: u32) -> Option<&CpuidEntry> {
        self.entries
            .iter()
            .find(|e| e.function == function && (e.flags & FLAG_SIGNIFICANT_INDEX == 0 || e.index == index))
    }

    /// The first entry for `function`, whatever its index (KVM's lookup with
    /// KVM_CPUID_INDEX_NOT_SIGNIFICANT).
    fn find_any(&self, function: u32) -> Option<&CpuidEntry> {
        self.entries.iter().find(|e| e.function == function)
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

    /// EAX, EBX, ECX, EDX for `leaf`/`subleaf`, as KVM answers.
    pub fn lookup(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        if let Some(e) = self.find(leaf, subleaf).or_else(|| self.out_of_range(leaf, subleaf)) {
            return [e.eax, e.ebx, e.ecx, e.edx];
        }
        if leaf == 0xb || leaf == 0x1f {
            if let Some(e) = self.find(leaf, 1) {
                return [0, 0, subleaf & 0xff, e.edx];
            }
        }
        [0; 4]
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
