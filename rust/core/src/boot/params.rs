use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::kernel::{EntryPoint, Kernel};
use super::BootError;
use crate::arch::x86_64::layout::{CMDLINE_ADDR, EBDA_START, HIGH_MEMORY_START, PVH_MEMMAP_ADDR, PVH_MODULES_ADDR};
use crate::vstate::memory::{GuestMemory, MemoryError};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id: the kernel accepts any loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Where a 64-bit kernel wants to be aligned, for kernels that carry no setup header.
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const MAX_E820_ENTRIES: usize = 128;

/// What the boot parameters describe.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo<'a> {
    /// Guest RAM regions, `(address, size)`, in address order; the first starts at 0.
    pub ram: &'a [(u64, u64)],
    /// Length of the command line at `CMDLINE_ADDR`, NUL included.
    pub cmdline_len: usize,
    /// Where the initrd is, `(address, size)`.
    pub initrd: Option<(u64, u64)>,
    /// Where the ACPI RSDP is, if the platform has ACPI tables.
    pub acpi_rsdp: Option<u64>,
}

/// The RAM map a guest is told about: low memory stops at the EBDA, and the 640 KiB–1 MiB
/// legacy hole is left out.
pub fn e820_map(ram: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut map = Vec::with_capacity(ram.len() + 1);
    for &(start, size) in ram {
        let end = start + size;
        if start < EBDA_START {
            map.push((start, end.min(EBDA_START) - start));
        }
        let high_start = start.max(HIGH_MEMORY_START);
        if end > high_start {
            map.push((high_start, end - high_start));
        }
    }
    map
}

/// Writes the boot parameters for `kernel` and returns its entry point.
pub fn write(memory: &GuestMemory, kernel: &Kernel, info: &BootInfo<'_>) -> Result<EntryPoint, BootError> {
    let entry = kernel.entry_point();
    match entry {
        EntryPoint::Linux64 { zero_page, .. } => put(memory, zero_page, &zero_page_for(kernel.setup_header(), info))?,
        EntryPoint::Pvh { start_info, .. } => write_pvh(memory, start_info, info)?,
    }
    Ok(entry)
}

/// The zero page: the kernel's own setup header (or a minimal one for an ELF kernel) with what the
/// boot loader fills in, and the e820 map.
pub fn zero_page_for(header: Option<setup_header>, info: &BootInfo<'_>) -> boot_params {
    let hdr = header.unwrap_or(setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        kernel_alignment: KERNEL_ALIGNMENT,
        ..Default::default()
    });
    let mut params = boot_params { hdr, acpi_rsdp_addr: info.acpi_rsdp.unwrap_or(0), ..Default::default() };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(info.ram);
    for (slot, &(addr, size)) in params.e820_table.iter_mut().zip(map.iter().take(MAX_E820_ENTRIES)) {
        *slot = boot_e820_entry { addr, size, r#type: E820_RAM };
    }
    params.e820_entries = map.len().min(MAX_E820_ENTRIES) as u8;
    params
}

/// The PVH start info, its memory map and module list (the initrd).
fn write_pvh(memory: &GuestMemory, start_info: u64, info: &BootInfo<'_>) -> Result<(), BootError> {
    let map = e820_map(info.ram);
    for (index, &(addr, size)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry { addr, size, type_: E820_RAM, reserved: 0 };
        put(memory, PVH_MEMMAP_ADDR + (index * std::mem::size_of_val(&entry)) as u64, &entry)?;
    }
    let mut header = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        rsdp_paddr: info.acpi_rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some((paddr, size)) = info.initrd {
        put(memory, PVH_MODULES_ADDR, &hvm_modlist_entry { paddr, size, ..Default::default() })?;
        header.nr_modules = 1;
        header.modlist_paddr = PVH_MODULES_ADDR;
    }
    put(memory, start_info, &header)
}

fn put<T: ByteValued>(memory: &GuestMemory, addr: u64, value: &T) -> Result<(), BootError> {
    let len = std::mem::size_of::<T>();
    memory.write_obj(*value, GuestAddress(addr)).map_err(|_| BootError::Memory(MemoryError::OutOfRange { addr, len }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::kernel::tests::{fake_bzimage, guest_memory};
    use crate::boot::{load, LinuxBoot};

    #[test]
    fn e820_skips_the_legacy_hole_and_keeps_high_ram() {
        assert_eq!(e820_map(&[(0, 64 << 20)]), [(0, EBDA_START), (HIGH_MEMORY_START, (64 << 20) - HIGH_MEMORY_START)]);
        let split = [(0, 0xd000_0000), (1 << 32, 1 << 30)];
        assert_eq!(
            e820_map(&split),
            [(0, EBDA_START), (HIGH_MEMORY_START, 0xd000_0000 - HIGH_MEMORY_START), (1 << 32, 1 << 30)]
        );
    }

    #[test]
    fn e820_keeps_the_acpi_tables_and_the_generation_id_out_of_ram() {
        use crate::arch::x86_64::acpi::ACPI_TABLES_ADDR;
        use crate::arch::x86_64::layout::VMGENID_ADDR;

        for ram in [&[(0, 64 << 20)][..], &[(0, 0xd000_0000), (1 << 32, 1 << 30)]] {
            for (start, size) in e820_map(ram) {
                let end = start + size;
                assert!(end <= ACPI_TABLES_ADDR || start >= VMGENID_ADDR + 0x1000, "{start:#x}..{end:#x}");
            }
        }
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_memory_map() {
        let info = BootInfo {
            ram: &[(0, 128 << 20)],
            cmdline_len: 12,
            initrd: Some((0x700_0000, 0x1000)),
            acpi_rsdp: Some(0xe_0000),
        };
        let params = zero_page_for(None, &info);
        let hdr = params.hdr;
        assert_eq!((hdr.boot_flag, hdr.header, hdr.type_of_loader), (BOOT_FLAG, HDRS_MAGIC, 0xff));
        assert_eq!((hdr.cmd_line_ptr, hdr.cmdline_size), (CMDLINE_ADDR as u32, 12));
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (0x700_0000, 0x1000));
        assert_eq!(params.e820_entries, 2);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
        let high = params.e820_table[1];
        assert_eq!((high.addr, high.size, high.r#type), (HIGH_MEMORY_START, (128 << 20) - HIGH_MEMORY_START, E820_RAM));
    }

    #[test]
    fn loading_a_bzimage_writes_cmdline_initrd_and_zero_page() {
        let memory = guest_memory(64 << 20);
        let boot = LinuxBoot {
            kernel: fake_bzimage(0x2000, 1).into(),
            initrd: Some(vec![0x5a; 5000].into()),
            cmdline: "console=ttyS0 panic=-1".into(),
        };
        let entry = load(&memory, &boot, None).unwrap();
        let EntryPoint::Linux64 { zero_page, .. } = entry else {
            panic!("expected the 64-bit protocol, got {entry:?}")
        };
        let params: boot_params = memory.read_obj(GuestAddress(zero_page)).unwrap();
        let hdr = params.hdr;
        let mut cmdline = vec![0u8; hdr.cmdline_size as usize];
        memory.read_slice(&mut cmdline, GuestAddress(u64::from(hdr.cmd_line_ptr))).unwrap();
        assert_eq!(cmdline, b"console=ttyS0 panic=-1\0");
        let (addr, size) = (u64::from(hdr.ramdisk_image), hdr.ramdisk_size as usize);
        assert_eq!(size, 5000);
        assert!(addr % 4096 == 0 && addr >= 0x10_2000 && addr + 5000 <= 64 << 20, "initrd at {addr:#x}");
        let mut initrd = vec![0u8; size];
        memory.read_slice(&mut initrd, GuestAddress(addr)).unwrap();
        assert_eq!(initrd, vec![0x5a; 5000]);
    }

    #[test]
    fn bad_boot_inputs_are_typed_errors() {
        let memory = guest_memory(4 << 20);
        let boot = |cmdline: &str, initrd: usize| LinuxBoot {
            kernel: fake_bzimage(0x2000, 1).into(),
            initrd: Some(vec![0; initrd].into()),
            cmdline: cmdline.into(),
        };
        assert!(matches!(
            load(&memory, &boot(&"x".repeat(2048), 1), None),
            Err(BootError::CmdlineTooLong { max: 2047, .. })
        ));
        assert!(matches!(load(&memory, &boot("a\0b", 1), None), Err(BootError::CmdlineNul)));
        assert!(matches!(load(&memory, &boot("", 8 << 20), None), Err(BootError::InitrdTooLarge { .. })));
        assert!(matches!(load(&guest_memory(1 << 20), &boot("", 1), None), Err(BootError::NoLowMemory)));
    }
}
