//! Minimal ACPI tables for a PC guest. A kernel built without MP table support (as the Debian
//! cloud kernel is) learns about its application processors and its I/O APIC only from the ACPI
//! MADT; without these tables it brings up the boot CPU alone.
//!
//! The tables describe a hardware-reduced ACPI platform: there is no ACPI power-management
//! hardware (PM timer, SCI, fixed-feature registers), so the guest needs none of it emulated.
//!
//! The bytes are laid out as one block at [`ACPI_TABLES_ADDR`], each table on a 16-byte boundary:
//! the RSDP, which the guest finds by scanning the BIOS area, then the XSDT it points at, the FADT
//! and the DSDT the FADT points at, and last the MADT, the only table whose size depends on the
//! CPU count.

use thiserror::Error;

use super::mptable::{APIC_ADDR, IOAPIC_ADDR, MAX_CPUS};

/// Where the tables go: the start of the BIOS area (0xE0000–0xFFFFF) that a guest without EFI
/// scans for the RSDP on 16-byte boundaries. Nothing else kvmkit writes lives there (the MP
/// table ends below 0xA1100), and the e820 map keeps the whole area out of RAM.
pub const ACPI_TABLES_ADDR: u64 = 0xe_0000;
/// The tables always end below this address: the guest only scans below 1 MiB for the RSDP,
/// and the tables must not reach the RAM where the kernel is loaded.
const ACPI_TABLES_LIMIT: u64 = 0x10_0000;

const RSDP_SIGNATURE: [u8; 8] = *b"RSD PTR ";
const XSDT_SIGNATURE: [u8; 4] = *b"XSDT";
const FADT_SIGNATURE: [u8; 4] = *b"FACP";
const DSDT_SIGNATURE: [u8; 4] = *b"DSDT";
const MADT_SIGNATURE: [u8; 4] = *b"APIC";

/// The table revisions of ACPI 6.3, the version whose fields these tables fill in.
const RSDP_REVISION: u8 = 2;
const XSDT_REVISION: u8 = 1;
const FADT_REVISION: u8 = 6;
const FADT_MINOR_REVISION: u8 = 3;
/// DSDT revision 2 and above make AML integers 64 bits wide.
const DSDT_REVISION: u8 = 2;
const MADT_REVISION: u8 = 5;

const OEM_ID: [u8; 6] = *b"KVMKIT";
/// The first half of every OEM table id; the table's signature is the second.
const OEM_TABLE_ID_PREFIX: [u8; 4] = *b"KVMK";
const OEM_REVISION: u32 = 1;
/// Vendor id and revision of the tool that built the tables, where a firmware names its
/// ASL compiler.
const CREATOR_ID: [u8; 4] = *b"KVMK";
const CREATOR_REVISION: u32 = 1;

const RSDP_LEN: usize = 36;
/// The RSDP checksum of ACPI 1.0 covers the first 20 bytes; the extended one covers all of it.
const RSDP_V1_LEN: usize = 20;
const RSDP_CHECKSUM_OFFSET: usize = 8;
const RSDP_EXTENDED_CHECKSUM_OFFSET: usize = 32;

const HEADER_LEN: usize = 36;
const HEADER_CHECKSUM_OFFSET: usize = 9;

/// The XSDT lists the FADT and the MADT; the DSDT is reached through the FADT.
const XSDT_ENTRIES: usize = 2;
const XSDT_LEN: usize = HEADER_LEN + XSDT_ENTRIES * 8;

/// Revision 6 of the FADT is 276 bytes long.
const FADT_LEN: usize = 276;
const FADT_DSDT_OFFSET: usize = 40;
const FADT_IAPC_BOOT_ARCH_OFFSET: usize = 109;
const FADT_FLAGS_OFFSET: usize = 112;
const FADT_RESET_REG_OFFSET: usize = 116;
const FADT_RESET_VALUE_OFFSET: usize = 128;
const FADT_MINOR_REVISION_OFFSET: usize = 131;
const FADT_X_DSDT_OFFSET: usize = 140;
const FADT_HYPERVISOR_ID_OFFSET: usize = 268;
const HYPERVISOR_ID: [u8; 8] = *b"KVMKIT  ";

/// IA-PC boot architecture flag: the platform has devices on an ISA/LPC bus (COM1, the RTC).
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// IA-PC boot architecture flag: an 8042 keyboard controller answers at ports 0x60 and 0x64.
/// With an FADT of revision 2 or later, Linux takes the flag's absence to mean there is none.
const BOOT_ARCH_8042: u16 = 1 << 1;
/// IA-PC boot architecture flag: there is no VGA hardware to probe.
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// The CMOS RTC at port 0x70 is present, so "CMOS RTC not present" (bit 5) stays clear, and
/// MSI and PCIe ASPM (bits 3 and 4) are left for a future PCI bus to use.
const IAPC_BOOT_ARCH: u16 = BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042 | BOOT_ARCH_VGA_NOT_PRESENT;

/// FADT flag: the reset register below is valid.
const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// FADT flag: no ACPI fixed hardware (PM timer, PM1 and GPE blocks, SCI); the guest ignores
/// every FADT field that would describe it.
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const FADT_FLAGS: u32 = FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI;

/// The reset register: writing 0xFE to the i8042's command port pulses the CPU reset line,
/// which kvmkit's i8042 turns into a reset exit. Linux tries the ACPI reset register first.
const RESET_PORT: u64 = 0x64;
const RESET_VALUE: u8 = 0xfe;

/// Generic Address Structure: address spaces and access sizes used here.
const GAS_LEN: usize = 12;
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;

/// The DSDT's AML: empty. The guest needs no namespace objects to bring up its CPUs.
const DSDT_AML: [u8; 0] = [];
const DSDT_LEN: usize = HEADER_LEN + DSDT_AML.len();

/// The MADT's fixed part: the header, the local APIC address and the flags.
const MADT_FIXED_LEN: usize = HEADER_LEN + 8;
/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel PIC), which the guest must
/// mask before it uses the APICs.
const MADT_PCAT_COMPAT: u32 = 1 << 0;

const ENTRY_LOCAL_APIC: u8 = 0;
const ENTRY_IOAPIC: u8 = 1;
const ENTRY_LOCAL_APIC_NMI: u8 = 4;
const LOCAL_APIC_ENTRY_LEN: usize = 8;
const IOAPIC_ENTRY_LEN: usize = 12;
const LOCAL_APIC_NMI_ENTRY_LEN: usize = 6;

/// Local APIC flag: the processor is usable from boot.
const LOCAL_APIC_ENABLED: u32 = 1 << 0;
/// The first global system interrupt the I/O APIC's pins receive.
const IOAPIC_GSI_BASE: u32 = 0;
/// A local APIC NMI entry with this processor UID applies to every processor.
const ALL_PROCESSORS: u8 = 0xff;
/// MPS INTI flags: polarity and trigger mode as the bus defines them.
const CONFORMS_TO_BUS: u16 = 0;
const LINT1: u8 = 1;

/// Entries besides the processors: the I/O APIC and the LINT1 NMI.
///
/// There are no interrupt source overrides. KVM's in-kernel irqchip, with the default routing
/// kvmkit keeps, wires every ISA IRQ n (the in-kernel PIT's IRQ 0 included) to I/O APIC pin n,
/// which is what a guest assumes when no override says otherwise. An override for IRQ 0 would
/// even be harmful: Linux takes an override for the FADT's SCI interrupt, 0 on a hardware-reduced
/// platform, to be the SCI's and makes that pin level-triggered and active-low. With no SCI,
/// IRQ 9 needs no override either.
const MADT_ENTRIES_LEN: usize = IOAPIC_ENTRY_LEN + LOCAL_APIC_NMI_ENTRY_LEN;

/// Table offsets in the block. The RSDP must be 16-byte aligned to be found; the others are
/// aligned the same way for tidiness. The MADT comes last because its size varies.
const RSDP_OFFSET: usize = 0;
const XSDT_OFFSET: usize = align(RSDP_OFFSET + RSDP_LEN);
const FADT_OFFSET: usize = align(XSDT_OFFSET + XSDT_LEN);
const DSDT_OFFSET: usize = align(FADT_OFFSET + FADT_LEN);
const MADT_OFFSET: usize = align(DSDT_OFFSET + DSDT_LEN);

// The RSDP must sit where the guest scans, the tables for the most CPUs must end below 1 MiB,
// and every address must fit the tables' 32-bit fields.
const _: () = assert!(ACPI_TABLES_ADDR >= 0xe_0000 && ACPI_TABLES_ADDR % 16 == 0);
const _: () = assert!(ACPI_TABLES_ADDR + tables_len(MAX_CPUS as usize) as u64 <= ACPI_TABLES_LIMIT);
const _: () = assert!(ACPI_TABLES_LIMIT <= u32::MAX as u64);

/// Why no tables can be built for a CPU count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AcpiError {
    /// The VM has no CPU to describe.
    #[error("the ACPI tables need at least one vCPU; configure cpus >= 1")]
    NoCpus,
    /// More CPUs than APIC ids can name.
    #[error("the ACPI tables can describe at most {MAX_CPUS} vCPUs (8-bit APIC ids, one taken by the I/O APIC), not {0}; configure fewer vCPUs")]
    TooManyCpus(u32),
}

/// A VM's ACPI tables, ready to be written to guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// The guest-physical address of the RSDP, the root a guest starts from. Boot protocols that
    /// can pass it (the zero page's `acpi_rsdp_addr`, PVH's `rsdp_paddr`) spare the guest the scan.
    pub rsdp_addr: u64,
    /// The tables, to be written at [`ACPI_TABLES_ADDR`], the RSDP first.
    pub bytes: Vec<u8>,
}

/// The ACPI tables of a VM of `cpus` CPUs with APIC ids `0..cpus`, and one I/O APIC at
/// [`IOAPIC_ADDR`] with id `cpus` receiving GSIs from 0.
pub fn acpi_tables(cpus: u32) -> Result<AcpiTables, AcpiError> {
    let cpus = cpu_count(cpus)?;
    let mut bytes = vec![0; tables_len(usize::from(cpus))];
    place(&mut bytes, RSDP_OFFSET, &rsdp());
    place(&mut bytes, XSDT_OFFSET, &xsdt());
    place(&mut bytes, FADT_OFFSET, &fadt());
    place(&mut bytes, DSDT_OFFSET, &dsdt());
    place(&mut bytes, MADT_OFFSET, &madt(cpus));
    Ok(AcpiTables { rsdp_addr: table_addr(RSDP_OFFSET), bytes })
}

/// How many bytes the tables of `cpus` CPUs take, padding included.
const fn tables_len(cpus: usize) -> usize {
    MADT_OFFSET + madt_len(cpus)
}

const fn madt_len(cpus: usize) -> usize {
    MADT_FIXED_LEN + cpus * LOCAL_APIC_ENTRY_LEN + MADT_ENTRIES_LEN
}

/// `offset` rounded up to the next 16-byte boundary.
const fn align(offset: usize) -> usize {
    offset.next_multiple_of(16)
}

/// The guest-physical address of the table at `offset` in the block.
const fn table_addr(offset: usize) -> u64 {
    ACPI_TABLES_ADDR + offset as u64
}

fn cpu_count(cpus: u32) -> Result<u8, AcpiError> {
    match cpus {
        0 => Err(AcpiError::NoCpus),
        1..=MAX_CPUS => Ok(cpus as u8),
        _ => Err(AcpiError::TooManyCpus(cpus)),
    }
}

fn place(bytes: &mut [u8], offset: usize, table: &[u8]) {
    bytes[offset..offset + table.len()].copy_from_slice(table);
}

/// The byte that makes `bytes` sum to zero modulo 256, which is how the guest validates a table.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &byte| sum.wrapping_sub(byte))
}

/// The OEM table id of the table with `signature`, so each table is told apart in a dump.
const fn oem_table_id(signature: [u8; 4]) -> [u8; 8] {
    let [k, v, m, i] = OEM_TABLE_ID_PREFIX;
    let [a, b, c, d] = signature;
    [k, v, m, i, a, b, c, d]
}

/// A system description table: the common header, then `body`, with length and checksum set.
fn table(signature: [u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(&signature);
    // Every table is at most a few KiB (see the assertion on MAX_CPUS).
    bytes.extend_from_slice(&(len as u32).to_le_bytes());
    bytes.push(revision);
    bytes.push(0); // checksum, filled in below
    bytes.extend_from_slice(&OEM_ID);
    bytes.extend_from_slice(&oem_table_id(signature));
    bytes.extend_from_slice(&OEM_REVISION.to_le_bytes());
    bytes.extend_from_slice(&CREATOR_ID);
    bytes.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    bytes.extend_from_slice(body);
    bytes[HEADER_CHECKSUM_OFFSET] = checksum(&bytes);
    bytes
}

/// The root pointer. It names only the XSDT: a guest that reads the ACPI 2.0 fields ignores the
/// RSDT, and an RSDT address of zero tells an older one there is none.
fn rsdp() -> [u8; RSDP_LEN] {
    let mut bytes = [0; RSDP_LEN];
    bytes[..8].copy_from_slice(&RSDP_SIGNATURE);
    bytes[9..15].copy_from_slice(&OEM_ID);
    bytes[15] = RSDP_REVISION;
    // Bytes 16-19: no RSDT.
    bytes[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    bytes[24..32].copy_from_slice(&table_addr(XSDT_OFFSET).to_le_bytes());
    // Bytes 33-35 are reserved.
    bytes[RSDP_CHECKSUM_OFFSET] = checksum(&bytes[..RSDP_V1_LEN]);
    bytes[RSDP_EXTENDED_CHECKSUM_OFFSET] = checksum(&bytes);
    bytes
}

fn xsdt() -> Vec<u8> {
    let mut entries = Vec::with_capacity(XSDT_ENTRIES * 8);
    for offset in [FADT_OFFSET, MADT_OFFSET] {
        entries.extend_from_slice(&table_addr(offset).to_le_bytes());
    }
    table(XSDT_SIGNATURE, XSDT_REVISION, &entries)
}

/// The FADT of a hardware-reduced platform: every power-management block, the SCI interrupt and
/// the FACS stay zero, which the flags allow.
fn fadt() -> Vec<u8> {
    let mut body = [0; FADT_LEN - HEADER_LEN];
    let mut field = |offset: usize, value: &[u8]| {
        body[offset - HEADER_LEN..][..value.len()].copy_from_slice(value);
    };
    // Both DSDT fields hold the same address: a guest that reads X_DSDT ignores the other.
    field(FADT_DSDT_OFFSET, &(table_addr(DSDT_OFFSET) as u32).to_le_bytes());
    field(FADT_IAPC_BOOT_ARCH_OFFSET, &IAPC_BOOT_ARCH.to_le_bytes());
    field(FADT_FLAGS_OFFSET, &FADT_FLAGS.to_le_bytes());
    field(FADT_RESET_REG_OFFSET, &io_port_register(RESET_PORT));
    field(FADT_RESET_VALUE_OFFSET, &[RESET_VALUE]);
    field(FADT_MINOR_REVISION_OFFSET, &[FADT_MINOR_REVISION]);
    field(FADT_X_DSDT_OFFSET, &table_addr(DSDT_OFFSET).to_le_bytes());
    field(FADT_HYPERVISOR_ID_OFFSET, &HYPERVISOR_ID);
    table(FADT_SIGNATURE, FADT_REVISION, &body)
}

/// A Generic Address Structure for the one-byte I/O port `port`.
fn io_port_register(port: u64) -> [u8; GAS_LEN] {
    let mut bytes = [0; GAS_LEN];
    bytes[..4].copy_from_slice(&[GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE]); // space, bit width, bit offset, access
    bytes[4..].copy_from_slice(&port.to_le_bytes());
    bytes
}

fn dsdt() -> Vec<u8> {
    table(DSDT_SIGNATURE, DSDT_REVISION, &DSDT_AML)
}

fn madt(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut body = Vec::with_capacity(madt_len(usize::from(cpus)) - HEADER_LEN);
    body.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for apic_id in 0..cpus {
        body.extend_from_slice(&local_apic_entry(apic_id));
    }
    body.extend_from_slice(&ioapic_entry(ioapic_id));
    body.extend_from_slice(&local_apic_nmi_entry(ALL_PROCESSORS, LINT1));
    table(MADT_SIGNATURE, MADT_REVISION, &body)
}

/// An enabled processor whose ACPI processor UID is its APIC id.
fn local_apic_entry(apic_id: u8) -> [u8; LOCAL_APIC_ENTRY_LEN] {
    let mut bytes = [0; LOCAL_APIC_ENTRY_LEN];
    bytes[..4].copy_from_slice(&[ENTRY_LOCAL_APIC, LOCAL_APIC_ENTRY_LEN as u8, apic_id, apic_id]);
    bytes[4..].copy_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
    bytes
}

fn ioapic_entry(id: u8) -> [u8; IOAPIC_ENTRY_LEN] {
    let mut bytes = [0; IOAPIC_ENTRY_LEN];
    bytes[..4].copy_from_slice(&[ENTRY_IOAPIC, IOAPIC_ENTRY_LEN as u8, id, 0]);
    bytes[4..8].copy_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    bytes[8..].copy_from_slice(&IOAPIC_GSI_BASE.to_le_bytes());
    bytes
}

/// Local APIC input `lint` of processor `uid` receives NMIs.
fn local_apic_nmi_entry(uid: u8, lint: u8) -> [u8; LOCAL_APIC_NMI_ENTRY_LEN] {
    let [flags_low, flags_high] = CONFORMS_TO_BUS.to_le_bytes();
    [ENTRY_LOCAL_APIC_NMI, LOCAL_APIC_NMI_ENTRY_LEN as u8, uid, flags_low, flags_high, lint]
}
