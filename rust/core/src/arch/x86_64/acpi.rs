//! Minimal ACPI tables for a PC guest. A kernel built without MP table support (as the Debian
//! cloud kernel is) learns about its application processors and its I/O APIC only from the ACPI
//! MADT; without these tables it brings up the boot CPU alone.
//!
//! The tables describe a hardware-reduced ACPI platform: there is no ACPI power-management
//! hardware (PM timer, SCI, fixed-feature registers), so the guest needs none of it emulated. The
//! one exception is the pair of sleep registers such a platform has instead, which the guest
//! writes to enter S5, that is, to power off. On a hardware-reduced platform Linux leaves the
//! 8259 PIC and the PIT alone and sets up no ISA interrupt of its own accord: a legacy device gets
//! its interrupt only if the DSDT describes it. So the DSDT describes the PC devices kvmkit's
//! Linux platform has: COM1 and the CMOS RTC (not the i8042, see `IAPC_BOOT_ARCH`), the VM
//! generation id, and any virtio-mmio devices, which a kernel without virtio-mmio command-line
//! support finds nowhere else.
//!
//! Without an SCI there are no general-purpose events either, so the interrupt that announces a
//! new generation id goes to a Generic Event Device (`ACPI0013`), the hardware-reduced way to run
//! AML on an interrupt: the guest calls its `_EVT` method with the interrupt's number, which
//! notifies the generation id's device.
//!
//! The bytes are laid out as one block at `ACPI_TABLES_ADDR`, each table on a 16-byte boundary:
//! the RSDP, which the guest finds by scanning the BIOS area, then the XSDT it points at, the FADT
//! and the DSDT the FADT points at, whose size depends on the virtio devices, and last the MADT,
//! whose size depends on the CPU count.

use thiserror::Error;

use super::layout::{GED_GSI, VMGENID_ADDR};
use super::mptable::{APIC_ADDR, IOAPIC_ADDR, MAX_CPUS};
use super::table_checksum;
use crate::devices::{ACPI_SLEEP_PORT, CMOS_PORT_BASE, CMOS_PORT_SIZE, S5_SLEEP_TYPE, SERIAL_PORT_SIZE};
use crate::linux::{COM1_GSI, COM1_PORT};

/// Where the tables go: the start of the BIOS area (0xE0000–0xFFFFF) that a guest without EFI
/// scans for the RSDP on 16-byte boundaries. Nothing else kvmkit writes lives there (the MP
/// table ends below 0xA1100), and the e820 map keeps the whole area out of RAM.
pub const ACPI_TABLES_ADDR: u64 = 0xe_0000;
/// The tables always end below this address: the guest only scans below 1 MiB for the RSDP,
/// the tables must not reach the RAM where the kernel is loaded, and the generation id's page
/// follows them.
const ACPI_TABLES_LIMIT: u64 = VMGENID_ADDR;

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
const FADT_SLEEP_CONTROL_REG_OFFSET: usize = 244;
const FADT_SLEEP_STATUS_REG_OFFSET: usize = 256;
const FADT_HYPERVISOR_ID_OFFSET: usize = 268;
const HYPERVISOR_ID: [u8; 8] = *b"KVMKIT  ";

/// IA-PC boot architecture flag: the platform has devices on an ISA/LPC bus (COM1, the RTC).
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// IA-PC boot architecture flag (bit 1, "8042"), left clear on purpose: kvmkit's i8042 only takes
/// the reset command, and with an FADT of revision 2 or later Linux takes the flag's absence to
/// mean there is no keyboard controller, so it skips a probe that would time out (about 1.5 s).
/// Its reboot still writes the reset command to port 0x64.
/// IA-PC boot architecture flag: there is no VGA hardware to probe.
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// The CMOS RTC at port 0x70 is present, so "CMOS RTC not present" (bit 5) stays clear, and
/// MSI and PCIe ASPM (bits 3 and 4) are left for a future PCI bus to use.
const IAPC_BOOT_ARCH: u16 = BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_VGA_NOT_PRESENT;

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
const AML_STRING_PREFIX: u8 = 0x0d;
const AML_SCOPE_OP: u8 = 0x10;
const AML_BUFFER_OP: u8 = 0x11;
const AML_PACKAGE_OP: u8 = 0x12;
const AML_METHOD_OP: u8 = 0x14;
const AML_DUAL_NAME_PREFIX: u8 = 0x2e;
const AML_MULTI_NAME_PREFIX: u8 = 0x2f;
const AML_EXT_OP_PREFIX: u8 = 0x5b;
const AML_ROOT_PREFIX: u8 = b'\\';
const AML_ARG0_OP: u8 = 0x68;
const AML_DEVICE_OP: u8 = 0x82;
const AML_NOTIFY_OP: u8 = 0x86;
const AML_LEQUAL_OP: u8 = 0x93;
const AML_IF_OP: u8 = 0xa0;
/// A method takes at most seven arguments, `Arg0` to `Arg6`.
const AML_MAX_ARGS: u8 = 7;

/// The system bus scope, where devices without a parent bus live.
const SYSTEM_BUS: [u8; 4] = *b"_SB_";
const HARDWARE_ID: [u8; 4] = *b"_HID";
const COMPATIBLE_ID: [u8; 4] = *b"_CID";
const DOS_DEVICE_NAME: [u8; 4] = *b"_DDN";
const UNIQUE_ID: [u8; 4] = *b"_UID";
const CURRENT_RESOURCES: [u8; 4] = *b"_CRS";
/// The Generic Event Device's method the guest calls, with the interrupt's number, when one of
/// the device's interrupts fires.
const EVENT_METHOD: [u8; 4] = *b"_EVT";
/// The object, in the namespace root, that gives the sleep type values of S5 (soft off).
const SOFT_OFF: [u8; 4] = *b"_S5_";

/// Small resource descriptors: a tag byte (type and length), then the data.
const RESOURCE_IRQ_NO_FLAGS: u8 = 0x22;
const RESOURCE_IO_PORT: u8 = 0x47;
/// The end tag; its checksum byte of zero means "not checksummed".
const RESOURCE_END_TAG: [u8; 2] = [0x79, 0];
/// I/O port descriptor flag: the device decodes all 16 address bits.
const IO_DECODE_16: u8 = 1;
/// The fixed port ranges here need no alignment beyond a byte.
const IO_ALIGNMENT: u8 = 1;
/// Large resource descriptors: a tag byte, a 16-bit length, then the data.
const RESOURCE_MEMORY32_FIXED: u8 = 0x86;
const RESOURCE_EXTENDED_IRQ: u8 = 0x89;
/// Memory32Fixed flag: the range is writable as well as readable.
const MEMORY_READ_WRITE: u8 = 1;
/// Extended interrupt flags: the device consumes the interrupt, which is edge-triggered. Bits left
/// clear make it active-high, exclusive and unable to wake the system.
const EXTENDED_IRQ_CONSUMER: u8 = 1 << 0;
const EXTENDED_IRQ_EDGE: u8 = 1 << 1;

/// Plug and Play ids of the devices, as the guest's drivers match them.
const HID_16550_UART: u32 = eisa_id(*b"PNP0501");
const HID_CMOS_RTC: u32 = eisa_id(*b"PNP0B00");
/// The id Linux's virtio-mmio driver matches; it has no EISA form, so it is a string.
const HID_VIRTIO_MMIO: &[u8] = b"LNRO0005";
/// The VM generation id's device. The specification leaves its `_HID` to the vendor and asks for
/// this `_CID` and `_DDN`; Linux's `vmgenid` driver matches the `_CID` (which ACPICA upper-cases)
/// and, as a `_HID`, exactly `VMGENCTR`, which is what kvmkit uses. ASL compilers reject that
/// `_HID`, whose last four characters are not hex digits, but the guest takes it as it is.
const VGEN: [u8; 4] = *b"VGEN";
const HID_VMGENID: &[u8] = b"VMGENCTR";
const CID_VMGENID: &[u8] = b"VM_Gen_Counter";
/// The object of the generation id's device that gives the id's address: a package of its low and
/// high 32 bits.
const VMGENID_ADDRESS: [u8; 4] = *b"ADDR";
/// The notification that tells the generation id's driver the id changed.
const VMGENID_CHANGED: u32 = 0x80;
/// The Generic Event Device.
const GED: [u8; 4] = *b"GED_";
const HID_GENERIC_EVENT_DEVICE: &[u8] = b"ACPI0013";
/// Virtio-mmio devices are named `VR00` to `VRFF`, by their index in hex.
pub const MAX_VIRTIO_SLOTS: usize = 256;
/// Memory32Fixed descriptors hold 32-bit addresses.
const MEMORY32_LIMIT: u64 = 1 << 32;

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
/// Bounds on the DSDT's length: without virtio devices, and what each one adds. The MADT
/// follows the DSDT, so these bound where the tables end.
const DSDT_BASE_MAX_LEN: usize = 512;
const VIRTIO_DEVICE_MAX_LEN: usize = 64;
const DSDT_MAX_LEN: usize = DSDT_BASE_MAX_LEN + MAX_VIRTIO_SLOTS * VIRTIO_DEVICE_MAX_LEN;

// The RSDP must sit where the guest scans, the largest tables must end below 1 MiB, and every
// address must fit the tables' 32-bit fields.
const _: () = assert!(ACPI_TABLES_ADDR >= 0xe_0000 && ACPI_TABLES_ADDR % 16 == 0);
const _: () = assert!(ACPI_TABLES_ADDR + tables_len(MAX_CPUS as usize, DSDT_MAX_LEN) as u64 <= ACPI_TABLES_LIMIT);
const _: () = assert!(ACPI_TABLES_LIMIT <= u32::MAX as u64);
// The generation id has a page of its own after the tables, below the BIOS area's upper half.
const _: () = assert!(VMGENID_ADDR % 0x1000 == 0 && VMGENID_ADDR + 0x1000 <= 0xf_0000);

/// Why no tables can be built for a CPU count or a set of virtio-mmio devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AcpiError {
    /// The VM has no CPU to describe.
    #[error("the ACPI tables need at least one vCPU; configure cpus >= 1")]
    NoCpus,
    /// More CPUs than APIC ids can name.
    #[error("the ACPI tables can describe at most {MAX_CPUS} vCPUs (8-bit APIC ids, one taken by the I/O APIC), not {0}; configure fewer vCPUs")]
    TooManyCpus(u32),
    /// More virtio-mmio devices than the DSDT has names for.
    #[error("the DSDT can describe at most {MAX_VIRTIO_SLOTS} virtio-mmio devices, not {0}")]
    TooManyVirtioDevices(usize),
    /// A virtio-mmio slot the DSDT's 32-bit memory descriptor cannot hold.
    #[error("the virtio-mmio slot at {base:#x} of {size:#x} bytes must be non-empty and end at or below 4 GiB to be described in the DSDT")]
    VirtioSlotOutOfRange {
        /// The slot's first address.
        base: u64,
        /// Its size in bytes.
        size: u64,
    },
}

/// Where a virtio-mmio device's registers are and which interrupt it raises, for the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// The guest-physical address of its registers.
    pub base: u64,
    /// The size of its register window in bytes.
    pub size: u64,
    /// The global system interrupt (I/O APIC pin) it raises.
    pub gsi: u32,
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

/// The ACPI tables of a VM of `cpus` CPUs with APIC ids `0..cpus`, one I/O APIC at
/// [`IOAPIC_ADDR`] with id `cpus` receiving GSIs from 0, and the virtio-mmio devices `virtio`.
pub fn acpi_tables(cpus: u32, virtio: &[VirtioMmioSlot]) -> Result<AcpiTables, AcpiError> {
    let cpus = cpu_count(cpus)?;
    check_virtio_slots(virtio)?;
    let dsdt = dsdt(virtio);
    assert!(dsdt.len() <= DSDT_MAX_LEN, "the DSDT outgrew the room left for it");
    let madt_offset = madt_offset(dsdt.len());
    let mut bytes = vec![0; tables_len(usize::from(cpus), dsdt.len())];
    place(&mut bytes, RSDP_OFFSET, &rsdp());
    place(&mut bytes, XSDT_OFFSET, &xsdt(madt_offset));
    place(&mut bytes, FADT_OFFSET, &fadt());
    place(&mut bytes, DSDT_OFFSET, &dsdt);
    place(&mut bytes, madt_offset, &madt(cpus));
    Ok(AcpiTables { rsdp_addr: table_addr(RSDP_OFFSET), bytes })
}

/// How many bytes the tables of `cpus` CPUs take, padding included, with a DSDT of `dsdt_len`.
const fn tables_len(cpus: usize, dsdt_len: usize) -> usize {
    madt_offset(dsdt_len) + madt_len(cpus)
}

/// The MADT comes right after the DSDT.
const fn madt_offset(dsdt_len: usize) -> usize {
    align(DSDT_OFFSET + dsdt_len)
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

fn check_virtio_slots(slots: &[VirtioMmioSlot]) -> Result<(), AcpiError> {
    if slots.len() > MAX_VIRTIO_SLOTS {
        return Err(AcpiError::TooManyVirtioDevices(slots.len()));
    }
    let fits = |s: &VirtioMmioSlot| s.size > 0 && s.base.checked_add(s.size).is_some_and(|end| end <= MEMORY32_LIMIT);
    match slots.iter().find(|s| !fits(s)) {
        Some(s) => Err(AcpiError::VirtioSlotOutOfRange { base: s.base, size: s.size }),
        None => Ok(()),
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

fn xsdt(madt_offset: usize) -> Vec<u8> {
    let mut entries = Vec::with_capacity(XSDT_ENTRIES * 8);
    for offset in [FADT_OFFSET, madt_offset] {
        entries.extend_from_slice(&table_addr(offset).to_le_bytes());
    }
    table(XSDT_SIGNATURE, XSDT_REVISION, &entries)
}

/// The FADT of a hardware-reduced platform: every power-management block, the SCI interrupt and
/// the FACS stay zero, which the flags allow. The sleep registers, which Linux needs before it
/// offers ACPI power-off, share one port: writes go to the control register, reads come from
/// the status register.
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
    field(FADT_SLEEP_CONTROL_REG_OFFSET, &io_port_register(ACPI_SLEEP_PORT));
    field(FADT_SLEEP_STATUS_REG_OFFSET, &io_port_register(ACPI_SLEEP_PORT));
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

/// The DSDT: the S5 sleep type, then the legacy devices, the VM generation id with its event
/// device, and the virtio-mmio devices under the system bus, each with its Plug and Play id and the
/// resources it uses, so the guest's drivers bind to them and route their interrupts through the
/// I/O APIC.
fn dsdt(virtio: &[VirtioMmioSlot]) -> Vec<u8> {
    let mut devices = [com1(), rtc(), vmgenid_device(VMGENID_ADDR), generic_event_device(GED_GSI)].concat();
    for (index, slot) in virtio.iter().enumerate() {
        devices.extend(virtio_mmio_device(index, slot));
    }
    let body = [soft_off(), aml_scope(&root_path(&[SYSTEM_BUS]), &devices)].concat();
    table(DSDT_SIGNATURE, DSDT_REVISION, &body)
}

/// `Name (_S5_, Package () { SLP_TYPa, SLP_TYPb })`: the sleep type the guest writes to the
/// sleep control register to power off. SLP_TYPb belongs to a second PM1 control block, which a
/// hardware-reduced platform does not have.
fn soft_off() -> Vec<u8> {
    aml_name(SOFT_OFF, &aml_package(&[&aml_integer(u32::from(S5_SLEEP_TYPE)), &aml_integer(0)]))
}

fn com1() -> Vec<u8> {
    let resources = resource_template(&[&io_port_descriptor(COM1_PORT, SERIAL_PORT_SIZE), &irq_descriptor(COM1_GSI)]);
    legacy_device(*b"COM1", HID_16550_UART, &resources)
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
    aml_device(name, &body)
}

/// `Device (VRnn) { Name (_HID, "LNRO0005") Name (_UID, n) Name (_CRS, resources) }` for the
/// virtio-mmio device at `index`: its register window and its interrupt.
fn virtio_mmio_device(index: usize, slot: &VirtioMmioSlot) -> Vec<u8> {
    let resources =
        resource_template(&[&memory32_fixed_descriptor(slot.base, slot.size), &extended_irq_descriptor(slot.gsi)]);
    let body = [
        aml_name(HARDWARE_ID, &aml_string(HID_VIRTIO_MMIO)),
        // The index is below MAX_VIRTIO_SLOTS.
        aml_name(UNIQUE_ID, &aml_integer(index as u32)),
        aml_name(CURRENT_RESOURCES, &aml_buffer(&resources)),
    ]
    .concat();
    let device = aml_device(virtio_device_name(index), &body);
    debug_assert!(device.len() <= VIRTIO_DEVICE_MAX_LEN, "a virtio device outgrew its room in the DSDT");
    device
}

/// `Device (VGEN) { Name (_HID, "VMGENCTR") Name (_CID, "VM_Gen_Counter")
/// Name (_DDN, "VM_Gen_Counter") Name (ADDR, Package () { low, high }) }`: the VM generation id
/// at guest address `addr`. It uses no resources the guest would have to reserve, so it has no
/// `_CRS`.
fn vmgenid_device(addr: u64) -> Vec<u8> {
    let (low, high) = (addr as u32, (addr >> 32) as u32);
    let body = [
        aml_name(HARDWARE_ID, &aml_string(HID_VMGENID)),
        aml_name(COMPATIBLE_ID, &aml_string(CID_VMGENID)),
        aml_name(DOS_DEVICE_NAME, &aml_string(CID_VMGENID)),
        aml_name(VMGENID_ADDRESS, &aml_package(&[&aml_integer(low), &aml_integer(high)])),
    ]
    .concat();
    aml_device(VGEN, &body)
}

/// `Device (GED_) { Name (_HID, "ACPI0013") Name (_CRS, ResourceTemplate () { Interrupt (...)
/// { gsi } }) Method (_EVT, 1) { If (LEqual (Arg0, gsi)) { Notify (\_SB_.VGEN, 0x80) } } }`:
/// the Generic Event Device, whose interrupt `gsi` announces a new generation id. The guest calls
/// `_EVT` with the number of the interrupt that fired, which is checked so that more events can
/// share the device.
fn generic_event_device(gsi: u32) -> Vec<u8> {
    let resources = resource_template(&[&extended_irq_descriptor(gsi)]);
    let notify = aml_notify(&root_path(&[SYSTEM_BUS, VGEN]), VMGENID_CHANGED);
    let on_event = aml_if(&aml_lequal(&aml_arg(0), &aml_integer(gsi)), &notify);
    let body = [
        aml_name(HARDWARE_ID, &aml_string(HID_GENERIC_EVENT_DEVICE)),
        aml_name(CURRENT_RESOURCES, &aml_buffer(&resources)),
        aml_method(EVENT_METHOD, 1, &on_event),
    ]
    .concat();
    aml_device(GED, &body)
}

/// `VR` and the index as two hex digits.
fn virtio_device_name(index: usize) -> [u8; 4] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    [b'V', b'R', HEX[(index >> 4) & 0xf], HEX[index & 0xf]]
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

/// A name resolved from the namespace root, `\A.B.C` for segments `A`, `B` and `C`.
fn root_path(segments: &[[u8; 4]]) -> Vec<u8> {
    let prefix = match segments.len() {
        0 => panic!("a path names at least one segment"),
        1 => vec![AML_ROOT_PREFIX],
        2 => vec![AML_ROOT_PREFIX, AML_DUAL_NAME_PREFIX],
        count => {
            let count = u8::try_from(count).expect("a path of at most 255 segments");
            vec![AML_ROOT_PREFIX, AML_MULTI_NAME_PREFIX, count]
        }
    };
    [prefix, segments.concat()].concat()
}

/// `Scope (path) { body }`.
fn aml_scope(path: &[u8], body: &[u8]) -> Vec<u8> {
    aml_with_length(&[AML_SCOPE_OP], &[path, body].concat())
}

/// `Device (name) { body }`.
fn aml_device(name: [u8; 4], body: &[u8]) -> Vec<u8> {
    aml_with_length(&[AML_EXT_OP_PREFIX, AML_DEVICE_OP], &[&name[..], body].concat())
}

/// `Method (name, args) { body }`: not serialized, at synchronization level 0.
fn aml_method(name: [u8; 4], args: u8, body: &[u8]) -> Vec<u8> {
    assert!(args <= AML_MAX_ARGS, "a method takes at most {AML_MAX_ARGS} arguments, not {args}");
    // The flags byte: the argument count in bits 0-2; bit 3 (serialized) and the sync level clear.
    aml_with_length(&[AML_METHOD_OP], &[&name[..], &[args], body].concat())
}

/// `If (predicate) { body }`, with both already encoded.
fn aml_if(predicate: &[u8], body: &[u8]) -> Vec<u8> {
    aml_with_length(&[AML_IF_OP], &[predicate, body].concat())
}

/// `LEqual (left, right)`: whether two integers are equal.
fn aml_lequal(left: &[u8], right: &[u8]) -> Vec<u8> {
    [&[AML_LEQUAL_OP][..], left, right].concat()
}

/// `Notify (object, value)`: sends notification `value` to the object at path `object`.
fn aml_notify(object: &[u8], value: u32) -> Vec<u8> {
    [&[AML_NOTIFY_OP][..], object, &aml_integer(value)].concat()
}

/// `ArgN`: the method's argument `index`.
fn aml_arg(index: u8) -> [u8; 1] {
    assert!(index < AML_MAX_ARGS, "methods have arguments 0 to {}, not {index}", AML_MAX_ARGS - 1);
    [AML_ARG0_OP + index]
}

/// `Name (name, value)`, with `value` already encoded.
fn aml_name(name: [u8; 4], value: &[u8]) -> Vec<u8> {
    [&[AML_NAME_OP][..], &name, value].concat()
}

/// `Buffer () { bytes }`.
fn aml_buffer(bytes: &[u8]) -> Vec<u8> {
    // The buffers here are resource templates of a few dozen bytes.
    aml_with_length(&[AML_BUFFER_OP], &[&aml_integer(bytes.len() as u32)[..], bytes].concat())
}

/// `Package () { elements }`, with each element already encoded.
fn aml_package(elements: &[&[u8]]) -> Vec<u8> {
    // The packages here have a couple of elements.
    let count = u8::try_from(elements.len()).expect("an AML package of at most 255 elements");
    aml_with_length(&[AML_PACKAGE_OP], &[&[count][..], &elements.concat()].concat())
}

/// A string constant: ASCII characters, then a NUL.
fn aml_string(text: &[u8]) -> Vec<u8> {
    assert!(text.iter().all(|&c| (1..0x80).contains(&c)), "AML strings are ASCII without NULs");
    [&[AML_STRING_PREFIX][..], text, &[0]].concat()
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
fn aml_with_length(opcode: &[u8], contents: &[u8]) -> Vec<u8> {
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

/// `Memory32Fixed (ReadWrite, base, size)`, for a range already checked to lie below 4 GiB.
fn memory32_fixed_descriptor(base: u64, size: u64) -> Vec<u8> {
    let data = [&[MEMORY_READ_WRITE][..], &(base as u32).to_le_bytes(), &(size as u32).to_le_bytes()].concat();
    large_resource_descriptor(RESOURCE_MEMORY32_FIXED, &data)
}

/// `Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`: one global system
/// interrupt, with no resource source.
fn extended_irq_descriptor(gsi: u32) -> Vec<u8> {
    let interrupt_count = 1;
    let data = [&[EXTENDED_IRQ_CONSUMER | EXTENDED_IRQ_EDGE, interrupt_count][..], &gsi.to_le_bytes()].concat();
    large_resource_descriptor(RESOURCE_EXTENDED_IRQ, &data)
}

/// A large resource descriptor: `tag`, the length of `data` (a few bytes here), then `data`.
fn large_resource_descriptor(tag: u8, data: &[u8]) -> Vec<u8> {
    [&[tag][..], &(data.len() as u16).to_le_bytes(), data].concat()
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
    use crate::bus::{BusDevice, DeviceError};
    use crate::devices::AcpiSleepControl;

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
        Method { name: [u8; 4], args: u8, serialized: bool, body: Vec<Statement> },
    }

    /// The statements a method body here may hold.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Statement {
        /// `If (LEqual (left, right)) { body }`.
        IfEqual { left: Operand, right: Operand, body: Vec<Statement> },
        /// `Notify (object, value)`, with the object's path written out (`\_SB_.VGEN`).
        Notify { object: String, value: u64 },
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Operand {
        Arg(u8),
        Integer(u64),
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum AmlValue {
        Integer(u64),
        String(String),
        Buffer(Vec<u8>),
        Package(Vec<AmlValue>),
    }

    /// Resource descriptors, decoded.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Resource {
        Io { decode16: bool, min: u16, max: u16, align: u8, len: u8 },
        Irq { mask: u16 },
        Memory32Fixed { writable: bool, base: u32, len: u32 },
        Interrupt { consumer: bool, edge: bool, active_low: bool, shared: bool, wake: bool, gsis: Vec<u32> },
    }

    /// A device of the DSDT: its name, `_HID`, `_UID` if it has one, decoded `_CRS` (if any), its
    /// other named objects and its methods.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Device {
        name: [u8; 4],
        hid: AmlValue,
        uid: Option<u64>,
        resources: Vec<Resource>,
        names: Vec<([u8; 4], AmlValue)>,
        methods: Vec<Aml>,
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

    /// A data object: an integer, a string, a buffer or a package, and its encoded length.
    fn read_data(bytes: &[u8]) -> (AmlValue, usize) {
        match bytes[0] {
            0x00 => (AmlValue::Integer(0), 1),
            0x01 => (AmlValue::Integer(1), 1),
            0x0a => (AmlValue::Integer(u64::from(bytes[1])), 2),
            0x0b => (AmlValue::Integer(u64::from(u16_at(bytes, 1))), 3),
            0x0c => (AmlValue::Integer(u64::from(u32_at(bytes, 1))), 5),
            0x0d => {
                let len = bytes[1..].iter().position(|&c| c == 0).expect("a NUL ends the string");
                let text = &bytes[1..1 + len];
                assert!(text.iter().all(|&c| (1..0x80).contains(&c)), "ASCII string {text:?}");
                (AmlValue::String(String::from_utf8(text.to_vec()).unwrap()), 1 + len + 1)
            }
            0x11 => {
                let (len, pkg) = read_pkg_length(&bytes[1..]);
                let contents = &bytes[1 + pkg..1 + pkg + len];
                let (AmlValue::Integer(size), size_len) = read_data(contents) else { panic!("buffer size") };
                assert_eq!(size as usize, contents.len() - size_len, "buffer size matches its bytes");
                (AmlValue::Buffer(contents[size_len..].to_vec()), 1 + pkg + len)
            }
            0x12 => {
                let (len, pkg) = read_pkg_length(&bytes[1..]);
                let contents = &bytes[1 + pkg..1 + pkg + len];
                let mut elements = Vec::new();
                let mut at = 1;
                while at < contents.len() {
                    let (element, element_len) = read_data(&contents[at..]);
                    elements.push(element);
                    at += element_len;
                }
                assert_eq!(at, contents.len(), "the elements fill the package");
                assert_eq!(usize::from(contents[0]), elements.len(), "NumElements counts every element");
                (AmlValue::Package(elements), 1 + pkg + len)
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
                [0x14, rest @ ..] => {
                    let (len, pkg) = read_pkg_length(rest);
                    let contents = &rest[pkg..pkg + len];
                    let flags = contents[4];
                    assert_eq!(flags >> 4, 0, "synchronization level 0");
                    let (args, serialized) = (flags & 0x7, flags & 0x8 != 0);
                    let body = parse_statements(&contents[5..]);
                    (Aml::Method { name: read_name_seg(contents), args, serialized, body }, 1 + pkg + len)
                }
                _ => panic!("unexpected AML opcode {:#x}", bytes[0]),
            };
            terms.push(term);
            bytes = &bytes[len..];
        }
        terms
    }

    /// Decodes a method body made of `If (LEqual (..))` and `Notify` statements.
    fn parse_statements(mut bytes: &[u8]) -> Vec<Statement> {
        let mut statements = Vec::new();
        while !bytes.is_empty() {
            let (statement, len) = match bytes {
                [0xa0, rest @ ..] => {
                    let (len, pkg) = read_pkg_length(rest);
                    let contents = &rest[pkg..pkg + len];
                    assert_eq!(contents[0], 0x93, "an LEqual predicate");
                    let (left, left_len) = read_operand(&contents[1..]);
                    let (right, right_len) = read_operand(&contents[1 + left_len..]);
                    let body = parse_statements(&contents[1 + left_len + right_len..]);
                    (Statement::IfEqual { left, right, body }, 1 + pkg + len)
                }
                [0x86, rest @ ..] => {
                    let (object, path_len) = read_name_string(rest);
                    let (AmlValue::Integer(value), value_len) = read_data(&rest[path_len..]) else {
                        panic!("a notification value")
                    };
                    (Statement::Notify { object, value }, 1 + path_len + value_len)
                }
                _ => panic!("unexpected statement opcode {:#x}", bytes[0]),
            };
            statements.push(statement);
            bytes = &bytes[len..];
        }
        statements
    }

    /// An argument (`Arg0` to `Arg6`) or an integer constant, and its encoded length.
    fn read_operand(bytes: &[u8]) -> (Operand, usize) {
        match bytes[0] {
            arg @ 0x68..=0x6e => (Operand::Arg(arg - 0x68), 1),
            _ => match read_data(bytes) {
                (AmlValue::Integer(value), len) => (Operand::Integer(value), len),
                (other, _) => panic!("an integer operand, not {other:?}"),
            },
        }
    }

    /// A name string (a path) as dotted text, and its encoded length.
    fn read_name_string(bytes: &[u8]) -> (String, usize) {
        let root = usize::from(bytes[0] == b'\\');
        let (count, prefix) = match bytes[root] {
            0x2e => (2, 1),
            0x2f => (usize::from(bytes[root + 1]), 2),
            _ => (1, 0),
        };
        let start = root + prefix;
        let segments: Vec<String> =
            (0..count).map(|i| String::from_utf8(read_name_seg(&bytes[start + 4 * i..]).to_vec()).unwrap()).collect();
        let path = format!("{}{}", if root == 1 { "\\" } else { "" }, segments.join("."));
        (path, start + 4 * count)
    }

    /// Decodes a resource template: descriptors up to the end tag, which must come last.
    fn parse_resources(bytes: &[u8]) -> Vec<Resource> {
        let mut resources = Vec::new();
        let mut at = 0;
        loop {
            let tag = bytes[at];
            if tag & 0x80 != 0 {
                // A large descriptor: the item name in bits 0-6, then a 16-bit data length.
                let len = usize::from(u16_at(bytes, at + 1));
                let data = &bytes[at + 3..at + 3 + len];
                resources.push(parse_large_resource(tag & 0x7f, data));
                at += 3 + len;
                continue;
            }
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

    fn parse_large_resource(name: u8, data: &[u8]) -> Resource {
        match name {
            0x06 => {
                assert_eq!(data.len(), 9, "Memory32Fixed length");
                assert_eq!(data[0] & !1, 0, "reserved information bits");
                Resource::Memory32Fixed { writable: data[0] & 1 == 1, base: u32_at(data, 1), len: u32_at(data, 5) }
            }
            0x09 => {
                let (flags, count) = (data[0], usize::from(data[1]));
                assert_eq!(flags & 0xe0, 0, "reserved interrupt flag bits");
                // No resource source index or string after the interrupts.
                assert_eq!(data.len(), 2 + 4 * count, "extended interrupt length");
                Resource::Interrupt {
                    consumer: flags & 1 != 0,
                    edge: flags & 2 != 0,
                    active_low: flags & 4 != 0,
                    shared: flags & 8 != 0,
                    wake: flags & 0x10 != 0,
                    gsis: (0..count).map(|i| u32_at(data, 2 + 4 * i)).collect(),
                }
            }
            _ => panic!("unexpected large resource descriptor {name:#x}"),
        }
    }

    /// The DSDT's objects in the namespace root, and the devices in the system bus scope.
    fn dsdt_contents(dsdt: &Table<'_>) -> (Vec<([u8; 4], AmlValue)>, Vec<Device>) {
        let terms = parse_aml(dsdt.body);
        let mut names = Vec::new();
        let mut devices = None;
        for term in terms {
            match term {
                Aml::Name { name, value } => names.push((name, value)),
                Aml::Scope { path, body } => {
                    assert_eq!(path, b"\\_SB_");
                    assert!(devices.replace(body.iter().map(read_device).collect()).is_none(), "one \\_SB_ scope");
                }
                Aml::Device { .. } | Aml::Method { .. } => panic!("a device or method outside \\_SB_: {term:?}"),
            }
        }
        (names, devices.expect("a \\_SB_ scope"))
    }

    /// A device made of `_HID` first, then other names (among them an optional `_UID` and
    /// `_CRS`) and methods.
    fn read_device(term: &Aml) -> Device {
        let Aml::Device { name, body } = term else { panic!("a device, not {term:?}") };
        let [Aml::Name { name: first, value: hid }, rest @ ..] = body.as_slice() else {
            panic!("a device starts with a name, not {body:?}")
        };
        assert_eq!(first, b"_HID", "_HID comes first");
        let mut device = Device {
            name: *name,
            hid: hid.clone(),
            uid: None,
            resources: Vec::new(),
            names: Vec::new(),
            methods: Vec::new(),
        };
        for term in rest {
            match term {
                Aml::Name { name: [b'_', b'U', b'I', b'D'], value: AmlValue::Integer(uid) } => {
                    assert!(device.uid.replace(*uid).is_none(), "one _UID")
                }
                Aml::Name { name: [b'_', b'C', b'R', b'S'], value: AmlValue::Buffer(crs) } => {
                    device.resources = parse_resources(crs)
                }
                Aml::Name { name, value } => device.names.push((*name, value.clone())),
                Aml::Method { .. } => device.methods.push(term.clone()),
                _ => panic!("names and methods in a device, not {term:?}"),
            }
        }
        device
    }

    fn dsdt_devices(tables: &AcpiTables) -> Vec<Device> {
        dsdt_contents(&parse(tables).dsdt).1
    }

    const fn io(min: u16, len: u8) -> Resource {
        Resource::Io { decode16: true, min, max: min, align: 1, len }
    }

    fn legacy(name: &[u8; 4], eisa_id: u64, resources: Vec<Resource>) -> Device {
        Device {
            name: *name,
            hid: AmlValue::Integer(eisa_id),
            uid: None,
            resources,
            names: Vec::new(),
            methods: Vec::new(),
        }
    }

    /// The generation id's device, with the id at `addr`.
    fn vmgenid(addr: u64) -> Device {
        let id = |text: &str| AmlValue::String(text.into());
        let address = AmlValue::Package(vec![AmlValue::Integer(addr & 0xffff_ffff), AmlValue::Integer(addr >> 32)]);
        Device {
            name: *b"VGEN",
            hid: id("VMGENCTR"),
            uid: None,
            resources: Vec::new(),
            names: vec![(*b"_CID", id("VM_Gen_Counter")), (*b"_DDN", id("VM_Gen_Counter")), (*b"ADDR", address)],
            methods: Vec::new(),
        }
    }

    /// The Generic Event Device, whose interrupt `gsi` notifies the generation id's device.
    fn generic_event_device_on(gsi: u32) -> Device {
        let notify = Statement::Notify { object: "\\_SB_.VGEN".into(), value: 0x80 };
        let on_gsi =
            Statement::IfEqual { left: Operand::Arg(0), right: Operand::Integer(gsi.into()), body: vec![notify] };
        Device {
            name: *b"GED_",
            hid: AmlValue::String("ACPI0013".into()),
            uid: None,
            resources: vec![Resource::Interrupt {
                consumer: true,
                edge: true,
                active_low: false,
                shared: false,
                wake: false,
                gsis: vec![gsi],
            }],
            names: Vec::new(),
            methods: vec![Aml::Method { name: *b"_EVT", args: 1, serialized: false, body: vec![on_gsi] }],
        }
    }

    fn virtio_device(index: u64, name: &[u8; 4], slot: VirtioMmioSlot) -> Device {
        let interrupt = Resource::Interrupt {
            consumer: true,
            edge: true,
            active_low: false,
            shared: false,
            wake: false,
            gsis: vec![slot.gsi],
        };
        Device {
            name: *name,
            hid: AmlValue::String("LNRO0005".into()),
            uid: Some(index),
            resources: vec![
                Resource::Memory32Fixed { writable: true, base: slot.base as u32, len: slot.size as u32 },
                interrupt,
            ],
            names: Vec::new(),
            methods: Vec::new(),
        }
    }

    /// `count` virtio slots: 4 KiB windows in the MMIO gap, GSIs from 5.
    fn virtio_slots(count: u32) -> Vec<VirtioMmioSlot> {
        (0..count)
            .map(|i| VirtioMmioSlot { base: 0xd000_1000 + u64::from(i) * 0x1000, size: 0x1000, gsi: 5 + i })
            .collect()
    }

    #[test]
    fn rsdp_comes_first_where_the_guest_scans() {
        let tables = acpi_tables(1, &[]).unwrap();
        assert_eq!(tables.rsdp_addr, ACPI_TABLES_ADDR);
        assert_eq!(tables.rsdp_addr % 16, 0);
        assert!((0xe_0000..0x10_0000).contains(&tables.rsdp_addr), "in the BIOS area Linux scans");
        assert_eq!(&tables.bytes[..8], b"RSD PTR ");
    }

    #[test]
    fn every_table_is_reached_and_valid() {
        for cpus in [1, 2, 4, 254] {
            for slots in [0, 1, 3] {
                let virtio = virtio_slots(slots);
                let tables = acpi_tables(cpus, &virtio).unwrap();
                assert_eq!(tables.bytes.len(), tables_len(cpus as usize, dsdt(&virtio).len()));
                let parsed = parse(&tables);
                assert_eq!(parsed.xsdt_entries, [*b"FACP", *b"APIC"], "{cpus} CPUs, {slots} virtio devices");
                assert_eq!(parsed.fadt.body.len() + 36, 276);
            }
        }
    }

    #[test]
    fn madt_lists_every_cpu_the_ioapic_and_the_nmi_wiring() {
        for cpus in [1u8, 2, 4, 254] {
            for slots in [0, 3] {
                let tables = acpi_tables(u32::from(cpus), &virtio_slots(slots)).unwrap();
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
    }

    #[test]
    fn fadt_describes_a_hardware_reduced_pc() {
        let tables = acpi_tables(2, &[]).unwrap();
        let fadt = parse(&tables).fadt.body;
        let field = |offset: usize| &fadt[offset - 36..];
        assert_eq!(u32_at(field(112), 0), (1 << 20) | (1 << 10), "HW_REDUCED_ACPI and RESET_REG_SUP");
        assert_eq!(u16_at(field(109), 0), 0b101, "legacy devices, no 8042 to probe, no VGA; CMOS RTC present");
        assert_eq!(field(131)[0], 3, "FADT minor revision");
        assert_eq!(&field(268)[..8], b"KVMKIT  ", "hypervisor vendor identity");
        assert_eq!(field(108)[0], 0x32, "CMOS century register");
        assert_eq!(&field(116)[..12], &[1, 8, 0, 1, 0x64, 0, 0, 0, 0, 0, 0, 0], "reset register: port 0x64");
        assert_eq!(field(128)[0], 0xfe, "reset value");
        // System I/O space, 8 bits wide at bit 0, byte access, port 0x3c0.
        let sleep_register = [1, 8, 0, 1, 0xc0, 0x03, 0, 0, 0, 0, 0, 0];
        assert_eq!(&field(244)[..12], &sleep_register, "sleep control register");
        assert_eq!(&field(256)[..12], &sleep_register, "sleep status register");
        assert_eq!(u32_at(field(36), 0), 0, "no FACS");
        assert_eq!(u64_at(field(132), 0), 0, "no X_FACS");
        assert_eq!(u16_at(field(46), 0), 0, "no SCI");
        assert!(field(48)[..108 - 48].iter().all(|&b| b == 0), "no SMI command, PM blocks or GPE blocks");
        assert!(field(148)[..244 - 148].iter().all(|&b| b == 0), "no extended PM or GPE blocks");
    }

    /// COM1, the RTC, the generation id and its event device.
    const PLATFORM_DEVICES: usize = 4;

    #[test]
    fn dsdt_describes_com1_the_rtc_and_the_generation_id() {
        let expected = vec![
            legacy(b"COM1", 0x0105_d041, vec![io(0x3f8, 8), Resource::Irq { mask: 1 << 4 }]),
            legacy(b"RTC_", 0x000b_d041, vec![io(0x70, 2)]),
            vmgenid(0xe_f000),
            generic_event_device_on(3),
        ];
        assert_eq!(dsdt_devices(&acpi_tables(1, &[]).unwrap()), expected);
    }

    #[test]
    fn the_event_method_notifies_a_device_of_the_dsdt_on_the_event_devices_interrupt() {
        let devices = dsdt_devices(&acpi_tables(1, &virtio_slots(2)).unwrap());
        let ged = devices.iter().find(|d| d.hid == AmlValue::String("ACPI0013".into())).unwrap();
        let [Resource::Interrupt { gsis, .. }] = ged.resources.as_slice() else { panic!("{ged:?}") };
        let [Aml::Method { body, .. }] = ged.methods.as_slice() else { panic!("{ged:?}") };
        let [Statement::IfEqual { right: Operand::Integer(gsi), body, .. }] = body.as_slice() else { panic!() };
        assert_eq!(gsis, &[*gsi as u32], "_EVT checks for the interrupt the device has");
        let [Statement::Notify { object, .. }] = body.as_slice() else { panic!() };
        let target = object.strip_prefix("\\_SB_.").expect("a path from the root through \\_SB_");
        assert!(devices.iter().any(|d| d.name == target.as_bytes()), "{object} names a device of the DSDT");
        let virtio_gsis: Vec<_> = virtio_slots(18).iter().map(|s| s.gsi).collect();
        assert!(!virtio_gsis.contains(&(*gsi as u32)) && *gsi != 4, "the event device's interrupt is its own");
    }

    #[test]
    fn a_generation_id_device_is_encoded_as_the_specification_says() {
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            // DeviceOp, package length 0x4d (two bytes: 0xd, then 0x4 << 4), the name.
            &[0x5b, 0x82, 0x4d, 0x04, b'V', b'G', b'E', b'N'][..],
            // Name (_HID, "VMGENCTR"), Name (_CID, "VM_Gen_Counter"), Name (_DDN, "VM_Gen_Counter").
            &[0x08, b'_', b'H', b'I', b'D', 0x0d], b"VMGENCTR", &[0x00],
            &[0x08, b'_', b'C', b'I', b'D', 0x0d], b"VM_Gen_Counter", &[0x00],
            &[0x08, b'_', b'D', b'D', b'N', 0x0d], b"VM_Gen_Counter", &[0x00],
            // Name (ADDR, Package () { 0xef000, 0 }): PackageOp, package length 8, 2 elements,
            // DWordPrefix 0x000ef000, ZeroOp.
            &[0x08, b'A', b'D', b'D', b'R', 0x12, 0x08, 0x02, 0x0c, 0x00, 0xf0, 0x0e, 0x00, 0x00],
        ]
        .concat();
        // What iasl compiles from the ASL in `vmgenid_device`'s comment (it rejects the _HID, so
        // that was compiled with another of the same length and put back).
        assert_eq!(vmgenid_device(0xe_f000), expected);
        let [device] = parse_aml(&expected).iter().map(read_device).collect::<Vec<_>>().try_into().unwrap();
        assert_eq!(device, vmgenid(0xe_f000));
        let high = vmgenid_device(0x1_2345_6000);
        assert_eq!(read_device(&parse_aml(&high)[0]), vmgenid(0x1_2345_6000), "the high half in the second element");
    }

    #[test]
    fn the_generic_event_device_is_encoded_as_iasl_compiles_it() {
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            // DeviceOp, package length 0x43 (two bytes), the name.
            &[0x5b, 0x82, 0x43, 0x04, b'G', b'E', b'D', b'_'][..],
            // Name (_HID, "ACPI0013").
            &[0x08, b'_', b'H', b'I', b'D', 0x0d], b"ACPI0013", &[0x00],
            // Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh,
            // Exclusive) { 3 } }): a buffer of 11 bytes.
            &[0x08, b'_', b'C', b'R', b'S', 0x11, 0x0e, 0x0a, 0x0b],
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x03, 0x00, 0x00, 0x00, 0x79, 0x00],
            // Method (_EVT, 1): MethodOp, package length 0x19, the name, flags (one argument).
            &[0x14, 0x19, b'_', b'E', b'V', b'T', 0x01],
            // If (LEqual (Arg0, 3)): IfOp, package length 0x12, LEqualOp, Arg0Op, BytePrefix 3.
            &[0xa0, 0x12, 0x93, 0x68, 0x0a, 0x03],
            // Notify (\_SB_.VGEN, 0x80): NotifyOp, RootChar, DualNamePrefix, the two segments,
            // BytePrefix 0x80.
            &[0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'V', b'G', b'E', b'N', 0x0a, 0x80],
        ]
        .concat();
        assert_eq!(generic_event_device(3), expected);
        let [device] = parse_aml(&expected).iter().map(read_device).collect::<Vec<_>>().try_into().unwrap();
        assert_eq!(device, generic_event_device_on(3));
    }

    #[test]
    fn control_flow_encodings() {
        assert_eq!(aml_method(*b"_EVT", 0, &[]), [0x14, 0x06, b'_', b'E', b'V', b'T', 0x00]);
        assert_eq!(aml_method(*b"MTH7", 7, &[0xa3]), [0x14, 0x07, b'M', b'T', b'H', b'7', 0x07, 0xa3]);
        assert_eq!(aml_if(&[0xff], &[0xa3]), [0xa0, 0x03, 0xff, 0xa3]);
        assert_eq!(aml_lequal(&aml_arg(1), &aml_integer(0x1234)), [0x93, 0x69, 0x0b, 0x34, 0x12]);
        assert_eq!((0..7).map(|i| aml_arg(i)[0]).collect::<Vec<_>>(), [0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e]);
        assert_eq!(aml_notify(&root_path(&[*b"DEV0"]), 0x81), [0x86, b'\\', b'D', b'E', b'V', b'0', 0x0a, 0x81]);
        assert_eq!(root_path(&[*b"_SB_"]), b"\\_SB_");
        assert_eq!(root_path(&[*b"_SB_", *b"VGEN"]), b"\\\x2e_SB_VGEN");
        assert_eq!(root_path(&[*b"_SB_", *b"PCI0", *b"ISA_"]), b"\\\x2f\x03_SB_PCI0ISA_");
        for path in [&[*b"_SB_"][..], &[*b"_SB_", *b"VGEN"], &[*b"_SB_", *b"PCI0", *b"ISA_"]] {
            let encoded = root_path(path);
            let text = path.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect::<Vec<_>>().join(".");
            assert_eq!(read_name_string(&encoded), (format!("\\{text}"), encoded.len()));
        }
    }

    #[test]
    #[should_panic(expected = "at most 7 arguments")]
    fn a_method_takes_at_most_seven_arguments() {
        aml_method(*b"MTH8", 8, &[]);
    }

    #[test]
    fn dsdt_gives_the_s5_sleep_type() {
        let tables = acpi_tables(1, &[]).unwrap();
        let (names, _) = dsdt_contents(&parse(&tables).dsdt);
        let s5 = AmlValue::Package(vec![AmlValue::Integer(5), AmlValue::Integer(0)]);
        assert_eq!(names, [(*b"_S5_", s5)], "the only object in the namespace root besides \\_SB_");
        // Name (_S5_, Package () { 5, 0 }): NameOp, the name, PackageOp, a package length of
        // 5 (itself, NumElements and 3 bytes of elements), 2 elements, BytePrefix 5, ZeroOp.
        let encoded = [0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00];
        assert!(parse(&tables).dsdt.body.starts_with(&encoded), "_S5_ comes first, encoded as the spec says");
    }

    #[test]
    fn the_guest_powers_off_with_what_the_tables_say() {
        // What an OSPM does for S5 on a hardware-reduced platform: SLP_TYPa from _S5_ in bits
        // 2-4 and SLP_EN (bit 5), written to the FADT's sleep control register.
        let tables = acpi_tables(1, &[]).unwrap();
        let parsed = parse(&tables);
        let (names, _) = dsdt_contents(&parsed.dsdt);
        let [(_, AmlValue::Package(s5))] = names.as_slice() else { panic!("{names:?}") };
        let AmlValue::Integer(sleep_type) = s5[0] else { panic!("{s5:?}") };
        let control = &parsed.fadt.body[244 - 36..];
        assert_eq!((control[0], control[1]), (1, 8), "an 8-bit I/O port");
        assert_eq!(u64_at(control, 4), ACPI_SLEEP_PORT);
        let value = ((sleep_type as u8) << 2) | (1 << 5);
        let sleep = AcpiSleepControl::default();
        assert_eq!(sleep.write(ACPI_SLEEP_PORT, 0, &[value]), Err(DeviceError::PowerOff));
    }

    #[test]
    fn dsdt_describes_virtio_mmio_devices() {
        for slots in [0, 1, 3] {
            let virtio = virtio_slots(slots);
            let devices = dsdt_devices(&acpi_tables(2, &virtio).unwrap());
            assert_eq!(devices.len(), PLATFORM_DEVICES + slots as usize);
            let names = [b"VR00", b"VR01", b"VR02"];
            let expected: Vec<Device> =
                virtio.iter().enumerate().map(|(i, slot)| virtio_device(i as u64, names[i], *slot)).collect();
            assert_eq!(devices[PLATFORM_DEVICES..], expected, "{slots} virtio devices");
        }
    }

    #[test]
    fn a_virtio_device_is_encoded_as_the_specification_says() {
        let slot = VirtioMmioSlot { base: 0xd000_2000, size: 0x200, gsi: 10 };
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            // DeviceOp, package length 0x3b (itself and 58 bytes), the name.
            &[0x5b, 0x82, 0x3b, b'V', b'R', b'0', b'2'][..],
            // Name (_HID, "LNRO0005"): StringPrefix, the characters, NUL.
            &[0x08, b'_', b'H', b'I', b'D', 0x0d], b"LNRO0005", &[0x00],
            // Name (_UID, 2): BytePrefix 2.
            &[0x08, b'_', b'U', b'I', b'D', 0x0a, 0x02],
            // Name (_CRS, Buffer (23) { ... }): BufferOp, package length 0x1a, BytePrefix 23.
            &[0x08, b'_', b'C', b'R', b'S', 0x11, 0x1a, 0x0a, 0x17],
            // Memory32Fixed: tag 0x86, length 9, read-write, base, length.
            &[0x86, 0x09, 0x00, 0x01, 0x00, 0x20, 0x00, 0xd0, 0x00, 0x02, 0x00, 0x00],
            // Extended interrupt: tag 0x89, length 6, consumer and edge-triggered (active-high,
            // exclusive), one interrupt, GSI 10.
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x0a, 0x00, 0x00, 0x00],
            // End tag, no checksum.
            &[0x79, 0x00],
        ]
        .concat();
        assert_eq!(virtio_mmio_device(2, &slot), expected);
        let [device] = parse_aml(&expected).iter().map(read_device).collect::<Vec<_>>().try_into().unwrap();
        assert_eq!(device, virtio_device(2, b"VR02", slot));
    }

    #[test]
    fn virtio_devices_are_named_by_their_index_in_hex() {
        assert_eq!(virtio_device_name(0), *b"VR00");
        assert_eq!(virtio_device_name(9), *b"VR09");
        assert_eq!(virtio_device_name(10), *b"VR0A");
        assert_eq!(virtio_device_name(255), *b"VRFF");
    }

    #[test]
    fn rejects_virtio_slots_it_cannot_describe() {
        let slot = |base, size| VirtioMmioSlot { base, size, gsi: 5 };
        let out_of_range = |base, size| Err(AcpiError::VirtioSlotOutOfRange { base, size });
        assert_eq!(acpi_tables(1, &[slot(0xd000_0000, 0)]), out_of_range(0xd000_0000, 0));
        assert_eq!(acpi_tables(1, &[slot(0xffff_f000, 0x2000)]), out_of_range(0xffff_f000, 0x2000));
        assert_eq!(acpi_tables(1, &[slot(1 << 32, 0x1000)]), out_of_range(1 << 32, 0x1000));
        assert_eq!(acpi_tables(1, &[slot(u64::MAX, 2)]), out_of_range(u64::MAX, 2));
        assert!(acpi_tables(1, &[slot(0xffff_f000, 0x1000)]).is_ok(), "a slot may end at 4 GiB");
        assert_eq!(acpi_tables(1, &virtio_slots(257)), Err(AcpiError::TooManyVirtioDevices(257)));
        assert!(AcpiError::TooManyVirtioDevices(257).to_string().contains("at most 256"));
        assert!(AcpiError::VirtioSlotOutOfRange { base: 1 << 32, size: 1 }.to_string().contains("0x100000000"));
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
        let most_virtio = virtio_slots(MAX_VIRTIO_SLOTS as u32);
        let largest = acpi_tables(MAX_CPUS, &most_virtio).unwrap();
        assert!(ACPI_TABLES_ADDR + largest.bytes.len() as u64 <= VMGENID_ADDR, "clear of the generation id");
        assert!(mptable::MPTABLE_START + mptable::table_len(MAX_CPUS as usize) as u64 <= ACPI_TABLES_ADDR);
        assert!(dsdt(&[]).len() <= DSDT_BASE_MAX_LEN, "the DSDT without virtio devices fits its bound");
        assert!(dsdt(&most_virtio).len() <= DSDT_MAX_LEN, "the DSDT fits the room before the MADT");
        let parsed = parse(&largest);
        assert_eq!(dsdt_contents(&parsed.dsdt).1.len(), PLATFORM_DEVICES + MAX_VIRTIO_SLOTS);
        assert_eq!(madt_entries(&parsed.madt).2.len(), MAX_CPUS as usize + 2);
        for offset in [RSDP_OFFSET, XSDT_OFFSET, FADT_OFFSET, DSDT_OFFSET, madt_offset(dsdt(&most_virtio).len())] {
            assert_eq!(offset % 16, 0);
        }
    }

    #[test]
    fn rejects_cpu_counts_it_cannot_describe() {
        assert_eq!(acpi_tables(0, &[]), Err(AcpiError::NoCpus));
        assert_eq!(acpi_tables(255, &[]), Err(AcpiError::TooManyCpus(255)));
        assert_eq!(acpi_tables(u32::MAX, &[]), Err(AcpiError::TooManyCpus(u32::MAX)));
        assert!(AcpiError::TooManyCpus(300).to_string().contains("at most 254"));
        assert!(AcpiError::NoCpus.to_string().contains("cpus >= 1"));
    }
}
