// Low memory below 0x500 holds the real-mode IVT and BIOS data area, so tables start above it.

/// Where `Machine::call` plants the few instructions a called function returns to: the last 16
/// bytes of the BIOS data area, which raw code has no use for.
pub const CALL_TRAMPOLINE_ADDR: u64 = 0x4f0;
/// Where the GDT is written for protected and long mode.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) IDT points: with limit 0 any exception triple-faults, which KVM reports as a
/// shutdown exit instead of running off into uninitialised memory.
pub const IDT_ADDR: u64 = 0x520;
/// The long-mode PML4; the PDPT and the page directories follow it page by page.
pub const PML4_ADDR: u64 = 0x9000;
/// The PDPT for the identity map.
pub const PDPT_ADDR: u64 = PML4_ADDR + 0x1000;
/// The first of the page directories, one per GiB identity mapped.
pub const PD_ADDR: u64 = PDPT_ADDR + 0x1000;
/// How many GiB the long-mode identity map covers (2 MiB pages).
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// First address after the page tables.
pub const PAGE_TABLES_END: u64 = PD_ADDR + IDENTITY_MAPPED_GIB * 0x1000;

/// The top of the default stack of raw guests' vCPU 0 (the first push writes below it), in
/// the free RAM between the page tables and 1 MiB; see [`default_stack`].
pub const DEFAULT_STACK: u64 = 0x8_0000;
/// The room each vCPU's default stack has: vCPU `n`'s starts `n` times this below
/// [`DEFAULT_STACK`].
pub const DEFAULT_STACK_SIZE: u64 = 0x4000;

/// The top of vCPU `index`'s default stack, or None when it would reach down into the page
/// tables (from the 28th vCPU on).
pub fn default_stack(index: usize) -> Option<u64> {
    let below = (index as u64).checked_add(1)?.checked_mul(DEFAULT_STACK_SIZE)?;
    DEFAULT_STACK
        .checked_sub(below)
        .filter(|bottom| *bottom >= PAGE_TABLES_END)
        .map(|bottom| bottom + DEFAULT_STACK_SIZE)
}

/// Where the PVH `hvm_start_info` goes.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// Where the PVH module list (the initrd) goes.
pub const PVH_MODULES_ADDR: u64 = 0x6040;
/// Where the PVH memory map goes.
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// Where the Linux zero page (`boot_params`) goes.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// The boot stack grows down from here, below the page tables.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Where the kernel command line goes.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The largest command line an x86 Linux kernel accepts, with its terminating NUL.
pub const CMDLINE_MAX: usize = 2048;
/// The extended BIOS data area: low RAM ends here (the MP table lives in it).
pub const EBDA_START: u64 = 0x9_fc00;
/// Kernels load at or above 1 MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Where the VM generation id's 16 bytes live: a page of their own at the end of the BIOS area's
/// lower half (0xE0000–0xEFFFF), after the ACPI tables at its start. Guest RAM backs it, but the
/// e820 map leaves all of 640 KiB–1 MiB out, so the guest never takes it for RAM: Linux maps it
/// only when the ACPI tables point it there. The upper half (0xF0000–0xFFFFF) is left alone
/// because Linux scans it for SMBIOS and MP table anchors, which random bytes could mimic; in the
/// lower half it looks only for the RSDP, which sits first at its start, and for option ROMs,
/// whose signature must also checksum.
pub const VMGENID_ADDR: u64 = 0xe_f000;

/// Start of the hole below 4 GiB kept free of RAM for MMIO devices (and KVM's private pages).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of that hole: RAM beyond what fits below the gap continues here.
pub const MMIO_GAP_END: u64 = 1 << 32;

/// Where the first virtio-mmio device's registers go, above the boot timer's page.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x10_0000;
/// The MMIO window of each virtio device.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The GSIs virtio devices use: the free ISA interrupts above COM1 (the RTC's 8 left out) and the
/// IOAPIC's pins above the ISA range.
const VIRTIO_GSIS: [u32; 18] = [5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];

/// The interrupt of the ACPI Generic Event Device, which tells the guest its VM generation id
/// changed: COM2's ISA interrupt, free since there is no COM2, so that every GSI above COM1's is
/// left to virtio devices.
pub const GED_GSI: u32 = 3;

// The event device's interrupt is its own.
const _: () = {
    let mut index = 0;
    while index < VIRTIO_GSIS.len() {
        assert!(VIRTIO_GSIS[index] != GED_GSI);
        index += 1;
    }
};

/// The MMIO base and GSI of the `index`th virtio device, or `None` when none are left.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    let gsi = *VIRTIO_GSIS.get(index)?;
    Some((VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE, gsi))
}

// KVM's private pages must sit in the gap, away from RAM.
const _: () = assert!(KVM_IDENTITY_MAP_ADDR >= MMIO_GAP_START && KVM_TSS_ADDR + 3 * 4096 <= MMIO_GAP_END);

/// The RAM regions, as `(guest address, size)`, of a guest with `size` bytes of memory: from 0 up
/// to the MMIO gap, and the rest from 4 GiB on.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// Three pages KVM needs for the TSS on Intel hosts (real-mode emulation), placed just below the
/// identity-map page and far above where small guests keep memory.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// One page KVM needs for the identity map of real-mode guests on Intel hosts.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_stacks_stay_above_the_page_tables() {
        assert_eq!(default_stack(0), Some(DEFAULT_STACK));
        assert_eq!(default_stack(1), Some(DEFAULT_STACK - DEFAULT_STACK_SIZE));
        assert!(default_stack(27).is_some_and(|top| top - DEFAULT_STACK_SIZE >= PAGE_TABLES_END));
        assert_eq!(default_stack(28), None);
        assert_eq!(default_stack(usize::MAX), None);
    }

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_regions(64 << 20), [(0, 64 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), [(0, MMIO_GAP_START)]);
        assert_eq!(ram_regions(8 << 30), [(0, MMIO_GAP_START), (1 << 32, (8 << 30) - MMIO_GAP_START)]);
    }
}
