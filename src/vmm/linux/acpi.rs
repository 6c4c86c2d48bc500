//! The ACPI tables a Linux guest finds its CPUs and its power button in,
//! built with rust-vmm's `acpi_tables`: an RSDP (in the BIOS area, where
//! Linux scans for it, and in the zero page), an XSDT, a MADT (one local
//! APIC per vCPU, the IOAPIC), a hardware-reduced FADT whose sleep-control
//! and reset registers are a PIO port of this VMM, and a DSDT naming `_S5`
//! (soft off), so that the guest's `poweroff` ends the run with one write.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};

/// Where the tables go: the BIOS read-only area, inside the range the e820
/// map reserves below 1 MiB, where Linux looks for the RSDP.
pub const ACPI_GPA: u64 = 0xe_0000;
/// Bytes the tables may take there.
pub const ACPI_MAX: usize = 0x1_0000;
/// The PIO port of the FADT's sleep-control register (and sleep status at
/// the next port).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The PIO port of the FADT's reset register.
pub const RESET_PORT: u16 = 0x602;
/// What the guest writes to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 0x1;
/// The sleep type `_S5` names (soft off).
pub const SLP_TYP_S5: u8 = 5;
/// SLEEP_CONTROL_REG.SLP_EN.
pub const SLP_EN: u8 = 1 << 5;
/// The local APIC's address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The IOAPIC's address (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

const OEM_ID: [u8; 6] = *b"SIDECR";
const OEM_TABLE: [u8; 8] = *b"SIDECORE";

/// What a write to one of the ACPI ports asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerRequest {
    /// Soft off (`_S5` with SLP_EN).
    Off,
    /// Reset.
    Reset,
}

/// Decodes a guest write of `value` to `port`: `Some` for a power-off or a
/// reset, `None` for anything else (other sleep states, which this VM does
/// not offer, or stray writes).
pub fn power_request(port: u16, value: u8) -> Option<PowerRequest> {
    match port {
        SLEEP_CONTROL_PORT if value & SLP_EN != 0 && (value >> 2) & 0x7 == SLP_TYP_S5 => Some(PowerRequest::Off),
        RESET_PORT if value == RESET_VALUE => Some(PowerRequest::Reset),
        _ => None,
    }
}

/// The tables, laid out from [`ACPI_GPA`]: the bytes to write there and
/// the RSDP's address.
#[derive(Debug)]
pub struct Tables {
    /// Bytes from [`ACPI_GPA`].
    pub bytes: Vec<u8>,
    /// The RSDP's GPA (for the zero page's `acpi_rsdp_addr`).
    pub rsdp: u64,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Builds the tables for `vcpus` vCPUs (APIC IDs 0..vcpus).
pub fn tables(vcpus: u32) -> Result<Tables, String> {
    let apic_ids: Vec<u8> = (0..vcpus)
        .map(|i| {
            u8::try_from(i).map_err(|_| format!("{vcpus} vCPUs: the MADT's local APIC entries hold APIC IDs < 255"))
        })
        .collect::<Result<_, _>>()?;
    // The DSDT: `Name (_S5, Package () { 5 })`: the sleep type the guest
    // writes for soft off.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&SLP_TYP_S5]));
    s5.to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    let dsdt = dsdt.as_slice().to_vec();

    let mut madt = MADT::new(OEM_ID, OEM_TABLE, 1, LocalInterruptController::Address(LAPIC_ADDR));
    for &id in &apic_ids {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let madt = bytes_of(&madt);

    // Tables after the RSDP (36 bytes), each 16-byte aligned.
    let mut out = vec![0u8; 64];
    let place = |out: &mut Vec<u8>, t: &[u8]| -> u64 {
        let at = out.len().next_multiple_of(16);
        out.resize(at, 0);
        out.extend_from_slice(t);
        ACPI_GPA + at as u64
    };
    let dsdt_gpa = place(&mut out, &dsdt);
    let io = |port: u16, width: u8| {
        let access = if width == 8 { AccessSize::ByteAccess } else { AccessSize::WordAccess };
        GAS::new(AddressSpace::SystemIo, width, 0, access, u64::from(port))
    };
    let mut fadt =
        FADTBuilder::new(OEM_ID, OEM_TABLE, 1).dsdt_64(dsdt_gpa).flag(Flags::HwReducedAcpi).flag(Flags::ResetRegSup);
    fadt.sleep_control_reg = io(SLEEP_CONTROL_PORT, 8);
    fadt.sleep_status_reg = io(SLEEP_CONTROL_PORT + 1, 8);
    fadt.reset_reg = io(RESET_PORT, 8);
    fadt.reset_value = RESET_VALUE;
    let fadt = bytes_of(&fadt.finalize());
    let fadt_gpa = place(&mut out, &fadt);
    let madt_gpa = place(&mut out, &madt);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_gpa);
    xsdt.add_entry(madt_gpa);
    let xsdt_gpa = place(&mut out, &bytes_of(&xsdt));
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_gpa));
    out[..rsdp.len()].copy_from_slice(&rsdp);
    if out.len() > ACPI_MAX {
        return Err(format!("the ACPI tables take {} bytes, more than the {ACPI_MAX} reserved for them", out.len()));
    }
    Ok(Tables { bytes: out, rsdp: ACPI_GPA })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_at(t: &Tables, gpa: u64) -> &[u8] {
        let at = usize::try_from(gpa - ACPI_GPA).unwrap();
        let len = u32::from_le_bytes(t.bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        &t.bytes[at..at + len]
    }

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Walks the tables as Linux does: RSDP -> XSDT -> FADT -> DSDT, and
    /// the MADT; every checksum holds and every pointer lands on its table.
    #[test]
    fn linux_finds_every_table_and_every_checksum_holds() {
        let t = tables(2).unwrap();
        let rsdp = &t.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]), "RSDP v1 checksum");
        assert!(sums_to_zero(rsdp), "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP (has the XSDT)");
        let xsdt = table_at(&t, le64(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(sums_to_zero(xsdt));
        let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|o| le64(xsdt, o)).collect();
        assert_eq!(entries.len(), 2);
        let fadt = table_at(&t, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(sums_to_zero(fadt));
        // Flags at 112: HW_REDUCED_ACPI (bit 20), RESET_REG_SUP (bit 10).
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
        // RESET_REG at 116 (GAS: space 1 = I/O, address at +4), value at 128.
        assert_eq!(fadt[116], 1);
        assert_eq!(le64(fadt, 120), u64::from(RESET_PORT));
        assert_eq!(fadt[128], RESET_VALUE);
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(fadt[244], 1);
        assert_eq!(le64(fadt, 248), u64::from(SLEEP_CONTROL_PORT));
        assert_eq!(le64(fadt, 260), u64::from(SLEEP_CONTROL_PORT + 1));
        let dsdt = table_at(&t, le64(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(sums_to_zero(dsdt));
        // NameOp "_S5_" PackageOp: the AML Linux evaluates for soft off.
        let body = &dsdt[36..];
        assert_eq!(&body[..5], &[0x08, b'_', b'S', b'5', b'_']);
        assert_eq!(body[5], 0x12, "a Package");
        let madt = table_at(&t, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(sums_to_zero(madt));
        assert_eq!(u32::from_le_bytes(madt[36..40].try_into().unwrap()), LAPIC_ADDR);
        // Two local APICs (type 0, length 8) with IDs 0 and 1, enabled; then the IOAPIC.
        let s = &madt[44..];
        assert_eq!(&s[..8], &[0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&s[8..16], &[0, 8, 1, 1, 1, 0, 0, 0]);
        assert_eq!(s[16], 1, "IOAPIC entry");
        assert_eq!(u32::from_le_bytes(s[20..24].try_into().unwrap()), IOAPIC_ADDR);
        assert_eq!(t.rsdp, ACPI_GPA);
        assert!(t.bytes.len() <= ACPI_MAX);
    }

    #[test]
    fn one_local_apic_per_vcpu_and_apic_ids_must_fit_a_byte() {
        for n in [1u32, 4, 64] {
            let t = tables(n).unwrap();
            let xsdt = table_at(&t, le64(&t.bytes, 24));
            let madt = table_at(&t, le64(xsdt, 44));
            let lapics = madt[44..].chunks(8).take_while(|c| c[0] == 0).count();
            assert_eq!(lapics, n as usize);
        }
        assert!(tables(256).unwrap_err().contains("APIC IDs"));
    }

    #[test]
    fn only_soft_off_and_the_reset_value_end_the_run() {
        assert_eq!(power_request(SLEEP_CONTROL_PORT, SLP_TYP_S5 << 2 | SLP_EN), Some(PowerRequest::Off));
        assert_eq!(power_request(SLEEP_CONTROL_PORT, SLP_TYP_S5 << 2), None, "SLP_EN clear");
        assert_eq!(power_request(SLEEP_CONTROL_PORT, 3 << 2 | SLP_EN), None, "S3 is not offered");
        assert_eq!(power_request(RESET_PORT, RESET_VALUE), Some(PowerRequest::Reset));
        assert_eq!(power_request(RESET_PORT, 0), None);
        assert_eq!(power_request(0x3f8, SLP_TYP_S5 << 2 | SLP_EN), None);
    }
}
