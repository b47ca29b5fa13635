//! Minimal ACPI tables for a PC guest. A kernel built without MP table support (as the Debian
//! cloud kernel is) learns about its application processors and its I/O APIC only from the ACPI
//! MADT; without these tables it brings up the boot CPU alone.
//!
//! The tables describe a hardware-reduced ACPI platform: there is no ACPI power-management
//! hardware (PM timer, SCI, fixed-feature registers), so the guest needs none of it emulated. On
//! such a platform Linux leaves the 8259 PIC and the PIT alone and sets up no ISA interrupt of its
//! own accord: a legacy device gets its interrupt only if the DSDT describes it. So the DSDT
//! describes the PC devices kvmkit's Linux platform has: COM1, the i8042 and the CMOS RTC.
//!
//! The bytes are laid out as one block at `ACPI_TABLES_ADDR`, each table on a 16-byte boundary:
//! the RSDP, which the guest finds by scanning the BIOS area, then the XSDT it points at, the FADT
//! and the DSDT the FADT points at, and last the MADT, the only table whose size depends on the
//! CPU count.

use thiserror::Error;

use super::mptable::{APIC_ADDR, IOAPIC_ADDR, MAX_CPUS};
use super::table_checksum;
use crate::devices::{CMOS_PORT_BASE, CMOS_PORT_SIZE, I8042_PORT_BASE, SERIAL_PORT_SIZE};
use crate::linux::{COM1_GSI, COM1_PORT};

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
const FADT_CENTURY_OFFSET: usize = 108;
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

/// The CMOS register that holds the century, where kvmkit's RTC keeps it as PC firmware does;
/// Linux reads the year's century from the register the FADT names.
const CMOS_CENTURY_REGISTER: u8 = 0x32;

/// FADT flag: the reset register below is valid.
const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// FADT flag: no ACPI fixed hardware (PM timer, PM1 and GPE blocks, SCI); the guest ignores
/// every FADT field that would describe it.
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const FADT_FLAGS: u32 = FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI;

/// The reset register: writing 0xFE to the i8042's command port pulses the CPU reset line,
/// which kvmkit's i8042 turns into a reset exit. Linux's default reboot method writes it.
const RESET_PORT: u64 = 0x64;
const RESET_VALUE: u8 = 0xfe;

/// Generic Address Structure: its length, and the address space and access size used here.
const GAS_LEN: usize = 12;
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;
const BYTE_BITS: u8 = 8;

/// AML encodings used by the DSDT (ACPI 6.3, section 20).
const AML_ZERO_OP: u8 = 0x00;
const AML_ONE_OP: u8 = 0x01;
const AML_NAME_OP: u8 = 0x08;
const AML_BYTE_PREFIX: u8 = 0x0a;
const AML_WORD_PREFIX: u8 = 0x0b;
const AML_DWORD_PREFIX: u8 = 0x0c;
const AML_SCOPE_OP: u8 = 0x10;
const AML_BUFFER_OP: u8 = 0x11;
const AML_EXT_OP_PREFIX: u8 = 0x5b;
const AML_DEVICE_OP: u8 = 0x82;
const AML_ROOT_PREFIX: u8 = b'\\';

/// The system bus scope, where devices without a parent bus live.
const SYSTEM_BUS: [u8; 4] = *b"_SB_";
const HARDWARE_ID: [u8; 4] = *b"_HID";
const CURRENT_RESOURCES: [u8; 4] = *b"_CRS";

/// Small resource descriptors: a tag byte (type and length), then the data.
const RESOURCE_IRQ_NO_FLAGS: u8 = 0x22;
const RESOURCE_IO_PORT: u8 = 0x47;
/// The end tag; its checksum byte of zero means "not checksummed".
const RESOURCE_END_TAG: [u8; 2] = [0x79, 0];
/// I/O port descriptor flag: the device decodes all 16 address bits.
const IO_DECODE_16: u8 = 1;
/// The fixed port ranges here need no alignment beyond a byte.
const IO_ALIGNMENT: u8 = 1;

/// Plug and Play ids of the devices, as the guest's drivers match them.
const HID_16550_UART: u32 = eisa_id(*b"PNP0501");
const HID_PS2_KEYBOARD: u32 = eisa_id(*b"PNP0303");
const HID_CMOS_RTC: u32 = eisa_id(*b"PNP0B00");

/// The i8042's data and command ports, and the keyboard's ISA interrupt (which kvmkit's i8042
/// never raises; the driver still needs it to claim the device).
const I8042_DATA_PORT: u64 = I8042_PORT_BASE;
const I8042_COMMAND_PORT: u64 = I8042_PORT_BASE + 4;
const I8042_KEYBOARD_IRQ: u32 = 1;

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
/// even be harmful: Linux takes an override of the FADT's SCI interrupt, 0 on a hardware-reduced
/// platform, for the SCI's and gives the timer's pin the SCI's active-low polarity. With no SCI,
/// IRQ 9 needs no override either.
const MADT_ENTRIES_LEN: usize = IOAPIC_ENTRY_LEN + LOCAL_APIC_NMI_ENTRY_LEN;

/// Table offsets in the block. The RSDP must be 16-byte aligned to be found; the others are
/// aligned the same way for tidiness. The MADT comes last because its size varies.
const RSDP_OFFSET: usize = 0;
const XSDT_OFFSET: usize = align(RSDP_OFFSET + RSDP_LEN);
const FADT_OFFSET: usize = align(XSDT_OFFSET + XSDT_LEN);
const DSDT_OFFSET: usize = align(FADT_OFFSET + FADT_LEN);
/// The DSDT's length is not a constant: the MADT starts after the largest one it can be.
const DSDT_MAX_LEN: usize = 256;
const MADT_OFFSET: usize = align(DSDT_OFFSET + DSDT_MAX_LEN);

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
    let dsdt = dsdt();
    assert!(dsdt.len() <= DSDT_MAX_LEN, "the DSDT outgrew the room left for it");
    place(&mut bytes, DSDT_OFFSET, &dsdt);
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
    bytes[HEADER_CHECKSUM_OFFSET] = table_checksum(&bytes);
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
    bytes[RSDP_CHECKSUM_OFFSET] = table_checksum(&bytes[..RSDP_V1_LEN]);
    bytes[RSDP_EXTENDED_CHECKSUM_OFFSET] = table_checksum(&bytes);
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
    field(FADT_CENTURY_OFFSET, &[CMOS_CENTURY_REGISTER]);
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
    // Address space, register width in bits, bit offset, access size, then the address.
    bytes[..4].copy_from_slice(&[GAS_SYSTEM_IO, BYTE_BITS, 0, GAS_ACCESS_BYTE]);
    bytes[4..].copy_from_slice(&port.to_le_bytes());
    bytes
}

/// The DSDT: the legacy devices under the system bus, each with its Plug and Play id and the
/// ports and interrupt it uses, so the guest's drivers bind to them and route their interrupts
/// through the I/O APIC.
fn dsdt() -> Vec<u8> {
    let devices = [com1(), i8042(), rtc()].concat();
    table(DSDT_SIGNATURE, DSDT_REVISION, &aml_scope(&root_path(SYSTEM_BUS), &devices))
}

fn com1() -> Vec<u8> {
    let resources = resource_template(&[&io_port_descriptor(COM1_PORT, SERIAL_PORT_SIZE), &irq_descriptor(COM1_GSI)]);
    legacy_device(*b"COM1", HID_16550_UART, &resources)
}

fn i8042() -> Vec<u8> {
    let resources = resource_template(&[
        &io_port_descriptor(I8042_DATA_PORT, 1),
        &io_port_descriptor(I8042_COMMAND_PORT, 1),
        &irq_descriptor(I8042_KEYBOARD_IRQ),
    ]);
    legacy_device(*b"PS2K", HID_PS2_KEYBOARD, &resources)
}

/// The RTC without an interrupt: kvmkit's raises none, and without one Linux polls it instead of
/// waiting for update interrupts that never come.
fn rtc() -> Vec<u8> {
    let resources = resource_template(&[&io_port_descriptor(CMOS_PORT_BASE, CMOS_PORT_SIZE)]);
    legacy_device(*b"RTC_", HID_CMOS_RTC, &resources)
}

/// `Device (name) { Name (_HID, hid) Name (_CRS, resources) }`. Without a `_STA` the device is
/// present and enabled; with one instance of each id no `_UID` is needed.
fn legacy_device(name: [u8; 4], hid: u32, resources: &[u8]) -> Vec<u8> {
    let body = [aml_name(HARDWARE_ID, &aml_integer(hid)), aml_name(CURRENT_RESOURCES, &aml_buffer(resources))].concat();
    aml_package(&[AML_EXT_OP_PREFIX, AML_DEVICE_OP], &[&name[..], &body].concat())
}

/// A compressed EISA id (`EisaId ("PNP0501")` in ASL): three letters in five bits each, then
/// four hex digits, stored so that the integer's bytes in memory read in that order.
const fn eisa_id(id: [u8; 7]) -> u32 {
    let (a, b, c) = (eisa_letter(id[0]), eisa_letter(id[1]), eisa_letter(id[2]));
    let digits = [hex_digit(id[3]), hex_digit(id[4]), hex_digit(id[5]), hex_digit(id[6])];
    u32::from_le_bytes([
        (a << 2) | (b >> 3),
        ((b & 0x7) << 5) | c,
        (digits[0] << 4) | digits[1],
        (digits[2] << 4) | digits[3],
    ])
}

/// A vendor letter of an EISA id as its 5-bit code: A is 1.
const fn eisa_letter(c: u8) -> u8 {
    assert!(c.is_ascii_uppercase(), "EISA id vendor letters are A-Z");
    c - b'A' + 1
}

const fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("EISA id product digits are upper-case hex"),
    }
}

/// A name resolved from the namespace root.
fn root_path(segment: [u8; 4]) -> Vec<u8> {
    [&[AML_ROOT_PREFIX][..], &segment].concat()
}

/// `Scope (path) { body }`.
fn aml_scope(path: &[u8], body: &[u8]) -> Vec<u8> {
    aml_package(&[AML_SCOPE_OP], &[path, body].concat())
}

/// `Name (name, value)`, with `value` already encoded.
fn aml_name(name: [u8; 4], value: &[u8]) -> Vec<u8> {
    [&[AML_NAME_OP][..], &name, value].concat()
}

/// `Buffer () { bytes }`.
fn aml_buffer(bytes: &[u8]) -> Vec<u8> {
    // The buffers here are resource templates of a few dozen bytes.
    aml_package(&[AML_BUFFER_OP], &[&aml_integer(bytes.len() as u32)[..], bytes].concat())
}

/// An integer in the shortest encoding that holds it.
fn aml_integer(value: u32) -> Vec<u8> {
    match value {
        0 => vec![AML_ZERO_OP],
        1 => vec![AML_ONE_OP],
        2..=0xff => vec![AML_BYTE_PREFIX, value as u8],
        0x100..=0xffff => [&[AML_WORD_PREFIX][..], &(value as u16).to_le_bytes()].concat(),
        _ => [&[AML_DWORD_PREFIX][..], &value.to_le_bytes()].concat(),
    }
}

/// `opcode`, then the package length of `contents`, then `contents`.
fn aml_package(opcode: &[u8], contents: &[u8]) -> Vec<u8> {
    [opcode, &pkg_length(contents.len()), contents].concat()
}

/// The package length of `len` bytes of contents. It counts its own bytes: one if the total fits
/// in 6 bits, else the low 4 bits in the first byte and 8 more bits in each following one.
fn pkg_length(len: usize) -> Vec<u8> {
    if len < 0x3f {
        return vec![(len + 1) as u8];
    }
    let extra = (1..=3).find(|&n| len + 1 + n < 1 << (4 + 8 * n)).expect("an AML package under 256 MiB");
    let total = len + 1 + extra;
    let mut bytes = vec![((extra as u8) << 6) | (total & 0xf) as u8];
    bytes.extend((0..extra).map(|i| (total >> (4 + 8 * i)) as u8));
    bytes
}

/// `ResourceTemplate () { descriptors }`: the descriptors and the end tag.
fn resource_template(descriptors: &[&[u8]]) -> Vec<u8> {
    let mut bytes = descriptors.concat();
    bytes.extend_from_slice(&RESOURCE_END_TAG);
    bytes
}

/// `IO (Decode16, base, base, 1, len)`: a fixed range of `len` ports (I/O ports are 16-bit, and
/// no legacy device has more than 255).
fn io_port_descriptor(base: u64, len: u64) -> [u8; 8] {
    let [base_low, base_high] = (base as u16).to_le_bytes();
    [RESOURCE_IO_PORT, IO_DECODE_16, base_low, base_high, base_low, base_high, IO_ALIGNMENT, len as u8]
}

/// `IRQNoFlags () { irq }`: an ISA interrupt, edge-triggered, active high, not shared.
fn irq_descriptor(irq: u32) -> [u8; 3] {
    assert!(irq < 16, "ISA interrupts are 0-15, not {irq}");
    let [mask_low, mask_high] = (1u16 << irq).to_le_bytes();
    [RESOURCE_IRQ_NO_FLAGS, mask_low, mask_high]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::mptable;

    /// A system description table as the guest finds it: its header fields and its body.
    #[derive(Clone, Copy)]
    struct Table<'a> {
        signature: [u8; 4],
        revision: u8,
        body: &'a [u8],
    }

    /// What a guest learns by following the pointers from the RSDP.
    struct Parsed<'a> {
        xsdt_entries: Vec<[u8; 4]>,
        fadt: Table<'a>,
        madt: Table<'a>,
        dsdt: Table<'a>,
    }

    /// The entries of a MADT, decoded field by field.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum MadtEntry {
        LocalApic { uid: u8, apic_id: u8, flags: u32 },
        IoApic { id: u8, addr: u32, gsi_base: u32 },
        LocalApicNmi { uid: u8, flags: u16, lint: u8 },
    }

    /// The subset of AML the DSDT uses, decoded.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Aml {
        Scope { path: Vec<u8>, body: Vec<Aml> },
        Device { name: [u8; 4], body: Vec<Aml> },
        Name { name: [u8; 4], value: AmlValue },
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum AmlValue {
        Integer(u64),
        Buffer(Vec<u8>),
    }

    /// Small resource descriptors, decoded.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Resource {
        Io { decode16: bool, min: u16, max: u16, align: u8, len: u8 },
        Irq { mask: u16 },
    }

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)) == 0
    }

    /// The bytes at guest address `addr` onwards, given the block written at ACPI_TABLES_ADDR.
    fn memory_at(block: &[u8], addr: u64) -> &[u8] {
        assert!(addr >= ACPI_TABLES_ADDR, "{addr:#x} points below the tables");
        let offset = usize::try_from(addr - ACPI_TABLES_ADDR).unwrap();
        assert!(offset < block.len(), "{addr:#x} points past the tables");
        &block[offset..]
    }

    /// Reads the table at `addr` as a guest would: the length from the header, then the checksum
    /// over that length, then the identification every kvmkit table carries.
    fn read_table(block: &[u8], addr: u64) -> Table<'_> {
        assert_eq!(addr % 16, 0, "tables are 16-byte aligned");
        let memory = memory_at(block, addr);
        let len = u32_at(memory, 4) as usize;
        assert!(len >= 36 && len <= memory.len(), "length {len} of the table at {addr:#x}");
        let table = &memory[..len];
        let signature: [u8; 4] = table[..4].try_into().unwrap();
        assert!(sums_to_zero(table), "checksum of {}", String::from_utf8_lossy(&signature));
        assert_eq!(&table[10..16], b"KVMKIT", "OEM id");
        assert_eq!(&table[16..20], b"KVMK", "OEM table id prefix");
        assert_eq!(table[20..24], signature, "OEM table id names the table");
        assert_eq!(u32_at(table, 24), 1, "OEM revision");
        assert_eq!(&table[28..32], b"KVMK", "creator id");
        assert_eq!(u32_at(table, 32), 1, "creator revision");
        Table { signature, revision: table[8], body: &table[36..] }
    }

    /// Follows RSDP -> XSDT -> FADT and MADT, FADT -> DSDT, validating each step.
    fn parse(tables: &AcpiTables) -> Parsed<'_> {
        let block = tables.bytes.as_slice();
        let rsdp = &memory_at(block, tables.rsdp_addr)[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]), "ACPI 1.0 checksum of the RSDP");
        assert_eq!(&rsdp[9..15], b"KVMKIT", "RSDP OEM id");
        assert_eq!(rsdp[15], 2, "RSDP revision (ACPI 2.0 and later)");
        assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
        assert!(sums_to_zero(rsdp), "extended checksum of the RSDP");
        assert_eq!(&rsdp[33..], &[0; 3], "reserved bytes of the RSDP");

        let xsdt = read_table(block, u64_at(rsdp, 24));
        assert_eq!((&xsdt.signature, xsdt.revision), (b"XSDT", 1));
        assert_eq!(xsdt.body.len() % 8, 0, "XSDT entries are 64-bit addresses");
        let listed: Vec<Table<'_>> = xsdt.body.chunks(8).map(|e| read_table(block, u64_at(e, 0))).collect();
        let fadt = only(&listed, b"FACP");
        let madt = only(&listed, b"APIC");
        assert_eq!(fadt.revision, 6);

        // X_DSDT is the address a 64-bit guest uses; the 32-bit field must agree with it.
        let x_dsdt = u64_at(fadt.body, 140 - 36);
        assert_eq!(u64::from(u32_at(fadt.body, 40 - 36)), x_dsdt, "DSDT and X_DSDT agree");
        let dsdt = read_table(block, x_dsdt);
        assert_eq!((&dsdt.signature, dsdt.revision), (b"DSDT", 2));
        Parsed { xsdt_entries: listed.iter().map(|t| t.signature).collect(), fadt, madt, dsdt }
    }

    /// The one table among `tables` with `signature`.
    fn only<'a>(tables: &[Table<'a>], signature: &[u8; 4]) -> Table<'a> {
        let mut found = tables.iter().filter(|t| &t.signature == signature);
        let name = String::from_utf8_lossy(signature);
        let table = *found.next().unwrap_or_else(|| panic!("the XSDT lists no {name}"));
        assert!(found.next().is_none(), "the XSDT lists more than one {name}");
        table
    }

    /// The MADT's local APIC address, flags and entries, each entry walked by its length.
    fn madt_entries(madt: &Table<'_>) -> (u32, u32, Vec<MadtEntry>) {
        assert_eq!(madt.revision, 5);
        let body = madt.body;
        let mut entries = Vec::new();
        let mut at = 8;
        while at < body.len() {
            let (kind, len) = (body[at], usize::from(body[at + 1]));
            let e = &body[at..at + len];
            let entry = match (kind, len) {
                (0, 8) => MadtEntry::LocalApic { uid: e[2], apic_id: e[3], flags: u32_at(e, 4) },
                (1, 12) => {
                    assert_eq!(e[3], 0, "reserved byte of an I/O APIC entry");
                    MadtEntry::IoApic { id: e[2], addr: u32_at(e, 4), gsi_base: u32_at(e, 8) }
                }
                (4, 6) => MadtEntry::LocalApicNmi { uid: e[2], flags: u16_at(e, 3), lint: e[5] },
                _ => panic!("unexpected MADT entry type {kind} of length {len} at offset {at}"),
            };
            entries.push(entry);
            at += len;
        }
        assert_eq!(at, body.len(), "entries fill the MADT exactly");
        (u32_at(body, 0), u32_at(body, 4), entries)
    }

    /// A package length: the contents' length and how many bytes the encoding took.
    fn read_pkg_length(bytes: &[u8]) -> (usize, usize) {
        let extra = usize::from(bytes[0] >> 6);
        if extra == 0 {
            return (usize::from(bytes[0] & 0x3f) - 1, 1);
        }
        assert_eq!(bytes[0] & 0x30, 0, "bits 4-5 of a multi-byte package length are zero");
        let total =
            (1..=extra).fold(usize::from(bytes[0] & 0xf), |t, i| t | usize::from(bytes[i]) << (4 + 8 * (i - 1)));
        (total - 1 - extra, 1 + extra)
    }

    fn read_name_seg(bytes: &[u8]) -> [u8; 4] {
        let seg: [u8; 4] = bytes[..4].try_into().unwrap();
        assert!(seg[0].is_ascii_uppercase() || seg[0] == b'_', "name segment {seg:?}");
        assert!(seg[1..].iter().all(|&c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_'), "{seg:?}");
        seg
    }

    /// A data object: an integer or a buffer, and its encoded length.
    fn read_data(bytes: &[u8]) -> (AmlValue, usize) {
        match bytes[0] {
            0x00 => (AmlValue::Integer(0), 1),
            0x01 => (AmlValue::Integer(1), 1),
            0x0a => (AmlValue::Integer(u64::from(bytes[1])), 2),
            0x0b => (AmlValue::Integer(u64::from(u16_at(bytes, 1))), 3),
            0x0c => (AmlValue::Integer(u64::from(u32_at(bytes, 1))), 5),
            0x11 => {
                let (len, pkg) = read_pkg_length(&bytes[1..]);
                let contents = &bytes[1 + pkg..1 + pkg + len];
                let (AmlValue::Integer(size), size_len) = read_data(contents) else { panic!("buffer size") };
                assert_eq!(size as usize, contents.len() - size_len, "buffer size matches its bytes");
                (AmlValue::Buffer(contents[size_len..].to_vec()), 1 + pkg + len)
            }
            op => panic!("unexpected data opcode {op:#x}"),
        }
    }

    /// Decodes a term list made of scopes, devices and names, as an AML interpreter loads it.
    fn parse_aml(mut bytes: &[u8]) -> Vec<Aml> {
        let mut terms = Vec::new();
        while !bytes.is_empty() {
            let (term, len) = match bytes {
                [0x10, rest @ ..] => {
                    let (len, pkg) = read_pkg_length(rest);
                    let contents = &rest[pkg..pkg + len];
                    let path_len = if contents[0] == b'\\' { 5 } else { 4 };
                    read_name_seg(&contents[path_len - 4..]);
                    let body = parse_aml(&contents[path_len..]);
                    (Aml::Scope { path: contents[..path_len].to_vec(), body }, 1 + pkg + len)
                }
                [0x5b, 0x82, rest @ ..] => {
                    let (len, pkg) = read_pkg_length(rest);
                    let contents = &rest[pkg..pkg + len];
                    (Aml::Device { name: read_name_seg(contents), body: parse_aml(&contents[4..]) }, 2 + pkg + len)
                }
                [0x08, rest @ ..] => {
                    let (value, len) = read_data(&rest[4..]);
                    (Aml::Name { name: read_name_seg(rest), value }, 5 + len)
                }
                _ => panic!("unexpected AML opcode {:#x}", bytes[0]),
            };
            terms.push(term);
            bytes = &bytes[len..];
        }
        terms
    }

    /// Decodes a resource template: small descriptors up to the end tag, which must come last.
    fn parse_resources(bytes: &[u8]) -> Vec<Resource> {
        let mut resources = Vec::new();
        let mut at = 0;
        loop {
            let tag = bytes[at];
            assert_eq!(tag & 0x80, 0, "only small resource descriptors");
            let len = usize::from(tag & 0x7);
            let data = &bytes[at + 1..at + 1 + len];
            match tag >> 3 {
                0x4 => resources.push(Resource::Irq { mask: u16_at(data, 0) }),
                0x8 => resources.push(Resource::Io {
                    decode16: data[0] & 1 == 1,
                    min: u16_at(data, 1),
                    max: u16_at(data, 3),
                    align: data[5],
                    len: data[6],
                }),
                0xf => {
                    assert_eq!(at + 2, bytes.len(), "the end tag ends the template");
                    return resources;
                }
                kind => panic!("unexpected resource descriptor type {kind:#x}"),
            }
            at += 1 + len;
        }
    }

    /// The devices of the DSDT: name, _HID and decoded _CRS.
    fn dsdt_devices(dsdt: &Table<'_>) -> Vec<([u8; 4], u64, Vec<Resource>)> {
        let terms = parse_aml(dsdt.body);
        let [Aml::Scope { path, body }] = terms.as_slice() else { panic!("one scope, not {terms:?}") };
        assert_eq!(path, b"\\_SB_");
        let device = |term: &Aml| {
            let Aml::Device { name, body } = term else { panic!("a device, not {term:?}") };
            let [Aml::Name { name: hid_name, value: AmlValue::Integer(hid) }, Aml::Name { name: crs_name, value: AmlValue::Buffer(crs) }] =
                body.as_slice()
            else {
                panic!("_HID and _CRS, not {body:?}")
            };
            assert_eq!((hid_name, crs_name), (b"_HID", b"_CRS"));
            (*name, *hid, parse_resources(crs))
        };
        body.iter().map(device).collect()
    }

    const fn io(min: u16, len: u8) -> Resource {
        Resource::Io { decode16: true, min, max: min, align: 1, len }
    }

    #[test]
    fn rsdp_comes_first_where_the_guest_scans() {
        let tables = acpi_tables(1).unwrap();
        assert_eq!(tables.rsdp_addr, ACPI_TABLES_ADDR);
        assert_eq!(tables.rsdp_addr % 16, 0);
        assert!((0xe_0000..0x10_0000).contains(&tables.rsdp_addr), "in the BIOS area Linux scans");
        assert_eq!(&tables.bytes[..8], b"RSD PTR ");
    }

    #[test]
    fn every_table_is_reached_and_valid() {
        for cpus in [1, 2, 4, 254] {
            let tables = acpi_tables(cpus).unwrap();
            assert_eq!(tables.bytes.len(), tables_len(cpus as usize));
            let parsed = parse(&tables);
            assert_eq!(parsed.xsdt_entries, [*b"FACP", *b"APIC"], "{cpus} CPUs");
            assert_eq!(parsed.fadt.body.len() + 36, 276);
        }
    }

    #[test]
    fn madt_lists_every_cpu_the_ioapic_and_the_nmi_wiring() {
        for cpus in [1u8, 2, 4, 254] {
            let tables = acpi_tables(u32::from(cpus)).unwrap();
            let (local_apic_addr, flags, entries) = madt_entries(&parse(&tables).madt);
            assert_eq!(local_apic_addr, 0xfee0_0000);
            assert_eq!(flags, 1, "PC-AT compatible: dual 8259s present");
            let mut expected: Vec<MadtEntry> =
                (0..cpus).map(|i| MadtEntry::LocalApic { uid: i, apic_id: i, flags: 1 }).collect();
            expected.push(MadtEntry::IoApic { id: cpus, addr: 0xfec0_0000, gsi_base: 0 });
            expected.push(MadtEntry::LocalApicNmi { uid: 0xff, flags: 0, lint: 1 });
            assert_eq!(entries, expected, "{cpus} CPUs");
        }
    }

    #[test]
    fn fadt_describes_a_hardware_reduced_pc() {
        let tables = acpi_tables(2).unwrap();
        let fadt = parse(&tables).fadt.body;
        let field = |offset: usize| &fadt[offset - 36..];
        assert_eq!(u32_at(field(112), 0), (1 << 20) | (1 << 10), "HW_REDUCED_ACPI and RESET_REG_SUP");
        assert_eq!(u16_at(field(109), 0), 0b111, "legacy devices, 8042, no VGA; CMOS RTC present");
        assert_eq!(field(131)[0], 3, "FADT minor revision");
        assert_eq!(&field(268)[..8], b"KVMKIT  ", "hypervisor vendor identity");
        assert_eq!(field(108)[0], 0x32, "CMOS century register");
        assert_eq!(&field(116)[..12], &[1, 8, 0, 1, 0x64, 0, 0, 0, 0, 0, 0, 0], "reset register: port 0x64");
        assert_eq!(field(128)[0], 0xfe, "reset value");
        assert_eq!(u32_at(field(36), 0), 0, "no FACS");
        assert_eq!(u64_at(field(132), 0), 0, "no X_FACS");
        assert_eq!(u16_at(field(46), 0), 0, "no SCI");
        assert!(field(48)[..108 - 48].iter().all(|&b| b == 0), "no SMI command, PM blocks or GPE blocks");
        assert!(field(148)[..268 - 148].iter().all(|&b| b == 0), "no extended PM, GPE or sleep registers");
    }

    #[test]
    fn dsdt_describes_com1_the_i8042_and_the_rtc() {
        let tables = acpi_tables(1).unwrap();
        let devices = dsdt_devices(&parse(&tables).dsdt);
        let expected = vec![
            (*b"COM1", 0x0105_d041, vec![io(0x3f8, 8), Resource::Irq { mask: 1 << 4 }]),
            (*b"PS2K", 0x0303_d041, vec![io(0x60, 1), io(0x64, 1), Resource::Irq { mask: 1 << 1 }]),
            (*b"RTC_", 0x000b_d041, vec![io(0x70, 2)]),
        ];
        assert_eq!(devices, expected);
    }

    #[test]
    fn eisa_ids_compress_as_the_specification_says() {
        // The values ASL compilers produce for EisaId ("PNP0501") and friends.
        assert_eq!(eisa_id(*b"PNP0501"), 0x0105_d041);
        assert_eq!(eisa_id(*b"PNP0303"), 0x0303_d041);
        assert_eq!(eisa_id(*b"PNP0B00"), 0x000b_d041);
        assert_eq!(eisa_id(*b"ZZZFFFF"), 0xffff_5a6b);
    }

    #[test]
    fn package_lengths_grow_a_byte_at_each_boundary() {
        assert_eq!(pkg_length(0), [1]);
        assert_eq!(pkg_length(62), [63]);
        assert_eq!(pkg_length(63), [0x41, 0x04]);
        for (len, bytes) in [(62, 1), (63, 2), (4093, 2), (4094, 3), (0xf_fffc, 3), (0xf_fffd, 4), (0xfff_fffb, 4)] {
            let encoded = pkg_length(len);
            assert_eq!(encoded.len(), bytes, "length {len}");
            assert_eq!(read_pkg_length(&encoded), (len, bytes), "length {len} reads back");
        }
    }

    #[test]
    fn integers_take_the_shortest_encoding() {
        for value in [0, 1, 2, 0xff, 0x100, 0xffff, 0x1_0000, 0xffff_ffff] {
            let encoded = aml_integer(value);
            assert_eq!(read_data(&encoded), (AmlValue::Integer(u64::from(value)), encoded.len()), "{value:#x}");
        }
        assert_eq!(aml_integer(0x100).len(), 3);
    }

    #[test]
    fn tables_stay_below_1_mib_and_clear_of_the_mp_table() {
        let largest = acpi_tables(MAX_CPUS).unwrap();
        assert!(ACPI_TABLES_ADDR + largest.bytes.len() as u64 <= 0x10_0000);
        assert!(mptable::MPTABLE_START + mptable::table_len(MAX_CPUS as usize) as u64 <= ACPI_TABLES_ADDR);
        assert!(dsdt().len() <= DSDT_MAX_LEN, "the DSDT fits the room before the MADT");
        for offset in [RSDP_OFFSET, XSDT_OFFSET, FADT_OFFSET, DSDT_OFFSET, MADT_OFFSET] {
            assert_eq!(offset % 16, 0);
        }
    }

    #[test]
    fn rejects_cpu_counts_it_cannot_describe() {
        assert_eq!(acpi_tables(0), Err(AcpiError::NoCpus));
        assert_eq!(acpi_tables(255), Err(AcpiError::TooManyCpus(255)));
        assert_eq!(acpi_tables(u32::MAX), Err(AcpiError::TooManyCpus(u32::MAX)));
        assert!(AcpiError::TooManyCpus(300).to_string().contains("at most 254"));
        assert!(AcpiError::NoCpus.to_string().contains("cpus >= 1"));
    }
}
