//! Intel MultiProcessor Specification 1.4 tables. A guest booted without ACPI finds its
//! application processors, its I/O APIC and the routing of ISA interrupts only here; without the
//! table Linux brings up the boot CPU alone and drives interrupts through the 8259 PIC.
//!
//! The bytes are laid out as one block: the 16-byte floating pointer structure, which the guest
//! finds by scanning the EBDA, immediately followed by the configuration table it points at.

use thiserror::Error;

use super::table_checksum;

/// Where the table goes: the start of the EBDA, the last KiB of base memory, one of the places a
/// guest scans for the floating pointer. The boot code keeps it out of the e820 RAM map.
pub const MPTABLE_START: u64 = 0x9fc00;
/// The table always ends below this address: the end of the legacy area under 1 MiB that no PC
/// guest uses as RAM. Only tables of more than 40 CPUs run past the EBDA into it.
pub const MPTABLE_LIMIT: u64 = 0x10_0000;
/// Guest-physical address of the I/O APIC's registers, where PC chipsets put it.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Guest-physical address of every CPU's local APIC registers after reset.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// The most CPUs a table can describe: APIC ids are 8 bits, 0xff means "all", and the I/O APIC
/// takes the id after the last CPU.
pub const MAX_CPUS: u32 = 254;

const FLOATING_SIGNATURE: [u8; 4] = *b"_MP_";
const CONFIG_SIGNATURE: [u8; 4] = *b"PCMP";
/// Version 1.4 of the specification, encoded as its minor number.
const SPEC_REVISION: u8 = 4;
const OEM_ID: [u8; 8] = *b"KVMKIT  ";
const PRODUCT_ID: [u8; 12] = *b"KVMKIT VM   ";

const FLOATING_LEN: usize = 16;
/// The floating pointer's length field counts 16-byte paragraphs.
const FLOATING_PARAGRAPHS: u8 = (FLOATING_LEN / 16) as u8;
const FLOATING_CHECKSUM_OFFSET: usize = 10;
const HEADER_LEN: usize = 44;
const HEADER_LENGTH_OFFSET: usize = 4;
const HEADER_CHECKSUM_OFFSET: usize = 7;
const HEADER_COUNT_OFFSET: usize = 34;
const PROCESSOR_ENTRY_LEN: usize = 20;
/// Every entry type but the processor entry is this long.
const SHORT_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// An interrupt delivered through the APIC with the vector programmed in its redirection entry.
const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
/// An interrupt whose vector the 8259 PIC supplies (virtual wire mode).
const INTERRUPT_EXTINT: u8 = 3;
/// Polarity and trigger mode as the source bus defines them: for ISA, active high and edge.
const CONFORMS_TO_BUS: u16 = 0;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOT_PROCESSOR: u8 = 1 << 1;
const IOAPIC_USABLE: u8 = 1 << 0;
/// An integrated local APIC, as KVM's reports in its version register.
const LOCAL_APIC_VERSION: u8 = 0x14;
/// An 82093AA-compatible I/O APIC, as KVM's reports in its version register.
const IOAPIC_VERSION: u8 = 0x11;

/// The signature fields hold 4 bits each, too few for extended models, so the table describes a
/// generic family 6 CPU; guests take the real identity from CPUID.
const CPU_FAMILY: u32 = 6;
const CPU_MODEL: u32 = 0xf;
const CPU_STEPPING: u32 = 1;
/// CPUID leaf 1 EDX bits: on-chip x87 FPU.
const FEATURE_FPU: u32 = 1 << 0;
/// CPUID leaf 1 EDX bits: on-chip local APIC.
const FEATURE_APIC: u32 = 1 << 9;

const ISA_BUS_ID: u8 = 0;
const ISA_BUS_TYPE: [u8; 6] = *b"ISA   ";
const ISA_IRQS: u8 = 16;
/// A local interrupt entry with this destination applies to every local APIC.
const ALL_LOCAL_APICS: u8 = 0xff;
const LINT0: u8 = 0;
const LINT1: u8 = 1;

/// Entries besides the processors: the ISA bus, the I/O APIC, its 16 ISA interrupts, LINT0, LINT1.
const FIXED_ENTRIES: usize = 1 + 1 + ISA_IRQS as usize + 2;

/// The address the floating pointer holds: the configuration table right behind it.
const CONFIG_TABLE_ADDR: u64 = MPTABLE_START + FLOATING_LEN as u64;

// The largest table must stay inside the area the guest leaves alone, and its address must fit
// the floating pointer's 32-bit field.
const _: () = assert!(MPTABLE_START + table_len(MAX_CPUS as usize) as u64 <= MPTABLE_LIMIT);
const _: () = assert!(CONFIG_TABLE_ADDR <= u32::MAX as u64);

/// Why no table can be built for a CPU count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MpTableError {
    /// The VM has no CPU to describe.
    #[error("the MP table needs at least one vCPU; configure cpus >= 1")]
    NoCpus,
    /// More CPUs than APIC ids can name.
    #[error("the MP table can describe at most {MAX_CPUS} vCPUs (8-bit APIC ids, one taken by the I/O APIC), not {0}; configure fewer vCPUs")]
    TooManyCpus(u32),
}

/// The bytes to write at [`MPTABLE_START`] for a VM of `cpus` CPUs with APIC ids `0..cpus`, CPU 0
/// booting, and one I/O APIC at [`IOAPIC_ADDR`] with id `cpus`.
pub fn mptable(cpus: u32) -> Result<Vec<u8>, MpTableError> {
    let cpus = cpu_count(cpus)?;
    let config = config_table(cpus);
    let mut table = floating_pointer();
    table.extend_from_slice(&config);
    Ok(table)
}

/// How many bytes the table of `cpus` CPUs takes, floating pointer included.
pub const fn table_len(cpus: usize) -> usize {
    FLOATING_LEN + HEADER_LEN + cpus * PROCESSOR_ENTRY_LEN + FIXED_ENTRIES * SHORT_ENTRY_LEN
}

fn cpu_count(cpus: u32) -> Result<u8, MpTableError> {
    match cpus {
        0 => Err(MpTableError::NoCpus),
        1..=MAX_CPUS => Ok(cpus as u8),
        _ => Err(MpTableError::TooManyCpus(cpus)),
    }
}

fn floating_pointer() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FLOATING_LEN);
    bytes.extend_from_slice(&FLOATING_SIGNATURE);
    bytes.extend_from_slice(&(CONFIG_TABLE_ADDR as u32).to_le_bytes());
    bytes.push(FLOATING_PARAGRAPHS);
    bytes.push(SPEC_REVISION);
    bytes.push(0); // checksum, filled in below

    // Feature byte 1 zero: a configuration table is present (no default configuration).
    // Feature byte 2 zero: IMCR absent, so the guest assumes virtual wire mode, which KVM's
    // in-kernel PIC and APICs provide. Bytes 3-5 are reserved.
    bytes.extend_from_slice(&[0; 5]);
    bytes[FLOATING_CHECKSUM_OFFSET] = table_checksum(&bytes);
    bytes
}

fn config_table(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries = Vec::with_capacity(table_len(usize::from(cpus)) - FLOATING_LEN - HEADER_LEN);
    for apic_id in 0..cpus {
        entries.extend_from_slice(&processor_entry(apic_id));
    }
    entries.extend_from_slice(&isa_bus_entry());
    entries.extend_from_slice(&ioapic_entry(ioapic_id));
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&io_interrupt_entry(irq, ioapic_id));
    }
    entries.extend_from_slice(&local_interrupt_entry(INTERRUPT_EXTINT, LINT0));
    entries.extend_from_slice(&local_interrupt_entry(INTERRUPT_NMI, LINT1));

    let count = usize::from(cpus) + FIXED_ENTRIES;
    let mut table = header(HEADER_LEN + entries.len(), count);
    table.extend_from_slice(&entries);
    table[HEADER_CHECKSUM_OFFSET] = table_checksum(&table);
    table
}

/// The configuration table header with a zero checksum; `len` covers header and entries.
fn header(len: usize, count: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(&CONFIG_SIGNATURE);
    bytes.extend_from_slice(&[0; 2]); // base table length, filled in below
    bytes.push(SPEC_REVISION);
    bytes.push(0); // checksum, filled in by the caller once the entries follow
    bytes.extend_from_slice(&OEM_ID);
    bytes.extend_from_slice(&PRODUCT_ID);
    bytes.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    bytes.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    bytes.extend_from_slice(&[0; 2]); // entry count, filled in below
    bytes.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes()); // no extended table
    bytes.push(0); // extended table checksum
    bytes.push(0); // reserved

    // Both values fit: the largest table is a few KiB (see the assertion on MAX_CPUS).
    bytes[HEADER_LENGTH_OFFSET..][..2].copy_from_slice(&(len as u16).to_le_bytes());
    bytes[HEADER_COUNT_OFFSET..][..2].copy_from_slice(&(count as u16).to_le_bytes());
    bytes
}

/// The CPU signature as CPUID leaf 1 EAX lays it out: stepping, model, family.
const fn cpu_signature() -> u32 {
    (CPU_FAMILY << 8) | (CPU_MODEL << 4) | CPU_STEPPING
}

fn processor_entry(apic_id: u8) -> [u8; PROCESSOR_ENTRY_LEN] {
    let boot = if apic_id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
    let mut bytes = [0; PROCESSOR_ENTRY_LEN];
    bytes[..4].copy_from_slice(&[ENTRY_PROCESSOR, apic_id, LOCAL_APIC_VERSION, CPU_ENABLED | boot]);
    bytes[4..8].copy_from_slice(&cpu_signature().to_le_bytes());
    bytes[8..12].copy_from_slice(&(FEATURE_FPU | FEATURE_APIC).to_le_bytes());
    // Bytes 12-19 are reserved.
    bytes
}

fn isa_bus_entry() -> [u8; SHORT_ENTRY_LEN] {
    let mut bytes = [0; SHORT_ENTRY_LEN];
    bytes[0] = ENTRY_BUS;
    bytes[1] = ISA_BUS_ID;
    bytes[2..].copy_from_slice(&ISA_BUS_TYPE);
    bytes
}

fn ioapic_entry(id: u8) -> [u8; SHORT_ENTRY_LEN] {
    let mut bytes = [0; SHORT_ENTRY_LEN];
    bytes[..4].copy_from_slice(&[ENTRY_IOAPIC, id, IOAPIC_VERSION, IOAPIC_USABLE]);
    bytes[4..].copy_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    bytes
}

/// ISA IRQ `irq` wired to I/O APIC pin `irq`, as a vectored interrupt.
///
/// The specification's default configurations wire the 8259's output to pin 0 as ExtINT and the
/// timer (IRQ 0) to pin 2. KVM's in-kernel I/O APIC does not: its default routing sends every ISA
/// IRQ n, the PIT's IRQ 0 included, to pin n. The table describes that identity wiring with INT
/// entries only, so the guest programs pin 0 for its timer; the 8259 stays reachable as ExtINT
/// through LINT0 of the local APICs (virtual wire mode), the one place the table uses ExtINT.
fn io_interrupt_entry(irq: u8, ioapic_id: u8) -> [u8; SHORT_ENTRY_LEN] {
    let [flags_low, flags_high] = CONFORMS_TO_BUS.to_le_bytes();
    [ENTRY_IO_INTERRUPT, INTERRUPT_INT, flags_low, flags_high, ISA_BUS_ID, irq, ioapic_id, irq]
}

/// Local APIC input `lint` of every CPU, delivering interrupts of type `kind`.
fn local_interrupt_entry(kind: u8, lint: u8) -> [u8; SHORT_ENTRY_LEN] {
    let [flags_low, flags_high] = CONFORMS_TO_BUS.to_le_bytes();
    [ENTRY_LOCAL_INTERRUPT, kind, flags_low, flags_high, ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries of a configuration table, decoded field by field.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Entry {
        Processor { apic_id: u8, version: u8, flags: u8, signature: u32, features: u32 },
        Bus { id: u8, kind: [u8; 6] },
        IoApic { id: u8, version: u8, flags: u8, addr: u32 },
        IoInterrupt { kind: u8, flags: u16, bus: u8, irq: u8, ioapic: u8, pin: u8 },
        LocalInterrupt { kind: u8, flags: u16, bus: u8, irq: u8, apic: u8, lint: u8 },
    }

    /// What a guest learns from the table: where the header claims things are, and the entries.
    struct Parsed {
        oem_id: [u8; 8],
        local_apic: u32,
        entries: Vec<Entry>,
    }

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)) == 0
    }

    /// Reads `memory` (the bytes at MPTABLE_START) as a guest would: validate the floating
    /// pointer, follow it, validate the header, then walk entries by their type's length.
    fn parse(memory: &[u8]) -> Parsed {
        let floating = &memory[..16];
        assert_eq!(&floating[..4], b"_MP_");
        assert_eq!(floating[8], 1, "floating pointer length in paragraphs");
        assert_eq!(floating[9], 4, "spec revision 1.4");
        assert!(sums_to_zero(floating), "floating pointer checksum");
        assert_eq!(&floating[11..], &[0; 5], "no default configuration, no IMCR");

        let config_addr = u64::from(u32_at(floating, 4));
        assert!(config_addr >= MPTABLE_START);
        let config = &memory[(config_addr - MPTABLE_START) as usize..];
        assert_eq!(&config[..4], b"PCMP");
        let len = usize::from(u16_at(config, 4));
        assert_eq!(config[6], 4, "spec revision 1.4");
        let config = &config[..len];
        assert!(sums_to_zero(config), "configuration table checksum");
        assert_eq!(u32_at(config, 28), 0, "no OEM table");
        assert_eq!(u16_at(config, 40), 0, "no extended table");

        let count = usize::from(u16_at(config, 34));
        let mut at = 44;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let e = &config[at..];
            let (entry, size) = match e[0] {
                0 => {
                    assert_eq!(&e[12..20], &[0; 8], "reserved bytes of a processor entry");
                    let (apic_id, version, flags) = (e[1], e[2], e[3]);
                    (Entry::Processor { apic_id, version, flags, signature: u32_at(e, 4), features: u32_at(e, 8) }, 20)
                }
                1 => (Entry::Bus { id: e[1], kind: e[2..8].try_into().unwrap() }, 8),
                2 => (Entry::IoApic { id: e[1], version: e[2], flags: e[3], addr: u32_at(e, 4) }, 8),
                3 => {
                    let (bus, irq, ioapic, pin) = (e[4], e[5], e[6], e[7]);
                    (Entry::IoInterrupt { kind: e[1], flags: u16_at(e, 2), bus, irq, ioapic, pin }, 8)
                }
                4 => {
                    let (bus, irq, apic, lint) = (e[4], e[5], e[6], e[7]);
                    (Entry::LocalInterrupt { kind: e[1], flags: u16_at(e, 2), bus, irq, apic, lint }, 8)
                }
                other => panic!("unknown entry type {other} at offset {at}"),
            };
            entries.push(entry);
            at += size;
        }
        assert_eq!(at, len, "entries fill the base table exactly");
        Parsed { oem_id: config[8..16].try_into().unwrap(), local_apic: u32_at(config, 36), entries }
    }

    fn processors(parsed: &Parsed) -> Vec<(u8, u8)> {
        let cpus = parsed.entries.iter().filter_map(|e| match e {
            Entry::Processor { apic_id, flags, .. } => Some((*apic_id, *flags)),
            _ => None,
        });
        cpus.collect()
    }

    #[test]
    fn checksums_sum_to_zero() {
        for cpus in [1, 2, 3, 17, 254] {
            let table = mptable(cpus).unwrap();
            assert!(sums_to_zero(&table[..16]));
            let len = usize::from(u16_at(&table, 16 + 4));
            assert!(sums_to_zero(&table[16..16 + len]));
        }
    }

    #[test]
    fn floating_pointer_points_at_the_header_behind_it() {
        let table = mptable(1).unwrap();
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(u64::from(u32_at(&table, 4)), MPTABLE_START + 16);
        assert_eq!(&table[16..20], b"PCMP");
        let parsed = parse(&table);
        assert_eq!(u64::from(parsed.local_apic), APIC_ADDR);
        assert_eq!(&parsed.oem_id, b"KVMKIT  ");
    }

    #[test]
    fn entry_counts_and_lengths_follow_the_cpu_count() {
        for cpus in [1u32, 2, 4, 254] {
            let table = mptable(cpus).unwrap();
            assert_eq!(table.len(), table_len(cpus as usize));
            let parsed = parse(&table);
            assert_eq!(parsed.entries.len(), cpus as usize + 20, "{cpus} CPUs");
            assert_eq!(u16_at(&table, 16 + 34) as u32, cpus + 20);
            assert_eq!(processors(&parsed).len(), cpus as usize);
            assert!(MPTABLE_START + table.len() as u64 <= MPTABLE_LIMIT);
        }
        // The EBDA's single KiB holds up to 40 CPUs.
        assert!(MPTABLE_START + table_len(40) as u64 <= 0xa0000);
    }

    #[test]
    fn processors_have_their_index_as_apic_id_and_only_cpu_0_boots() {
        let parsed = parse(&mptable(4).unwrap());
        assert_eq!(processors(&parsed), [(0, 0b11), (1, 0b01), (2, 0b01), (3, 0b01)]);
        let Entry::Processor { version, signature, features, .. } = parsed.entries[2] else { panic!() };
        assert_eq!(version, 0x14);
        assert_eq!((signature >> 8) & 0xf, 6, "family 6");
        assert_eq!(features & 1, 1, "FPU");
        assert_eq!(features & (1 << 9), 1 << 9, "APIC");
    }

    #[test]
    fn describes_the_isa_bus_ioapic_and_interrupt_routing() {
        let cpus = 2u8;
        let parsed = parse(&mptable(u32::from(cpus)).unwrap());
        let rest = &parsed.entries[usize::from(cpus)..];
        assert_eq!(rest[0], Entry::Bus { id: 0, kind: *b"ISA   " });
        assert_eq!(rest[1], Entry::IoApic { id: cpus, version: 0x11, flags: 1, addr: IOAPIC_ADDR as u32 });
        for irq in 0..16u8 {
            let expected = Entry::IoInterrupt { kind: 0, flags: 0, bus: 0, irq, ioapic: cpus, pin: irq };
            assert_eq!(rest[2 + usize::from(irq)], expected);
        }
        assert_eq!(rest[18], Entry::LocalInterrupt { kind: 3, flags: 0, bus: 0, irq: 0, apic: 0xff, lint: 0 });
        assert_eq!(rest[19], Entry::LocalInterrupt { kind: 1, flags: 0, bus: 0, irq: 0, apic: 0xff, lint: 1 });
    }

    #[test]
    fn ioapic_id_follows_the_last_cpu_even_at_the_limit() {
        let parsed = parse(&mptable(254).unwrap());
        assert_eq!(processors(&parsed).last(), Some(&(253, 1)));
        assert!(parsed.entries.iter().any(|e| matches!(e, Entry::IoApic { id: 254, .. })));
    }

    #[test]
    fn rejects_cpu_counts_it_cannot_describe() {
        assert_eq!(mptable(0), Err(MpTableError::NoCpus));
        assert_eq!(mptable(255), Err(MpTableError::TooManyCpus(255)));
        assert_eq!(mptable(u32::MAX), Err(MpTableError::TooManyCpus(u32::MAX)));
        assert!(MpTableError::TooManyCpus(300).to_string().contains("at most 254"));
    }
}
