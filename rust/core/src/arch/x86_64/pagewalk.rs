use kvm_bindings::kvm_sregs;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
/// Page size bit of a directory entry: the entry maps a large page.
const PAGE_SIZE: u64 = 1 << 7;
/// The physical address bits of a 64-bit entry (up to 52-bit physical addresses; the bits above
/// hold NX and protection keys).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The registers that decide how a virtual (linear) address is translated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagingRegs {
    /// CR0 (PG turns paging on).
    pub cr0: u64,
    /// CR3: the top-level table.
    pub cr3: u64,
    /// CR4 (PSE, PAE, LA57).
    pub cr4: u64,
    /// EFER (LMA: long mode is active).
    pub efer: u64,
}

impl From<&kvm_sregs> for PagingRegs {
    fn from(sregs: &kvm_sregs) -> Self {
        Self { cr0: sregs.cr0, cr3: sregs.cr3, cr4: sregs.cr4, efer: sregs.efer }
    }
}

/// Where a 4 KiB page of virtual addresses starts, and the bytes from `vaddr` to its end.
pub fn page_rest(vaddr: u64) -> u64 {
    0x1000 - (vaddr & 0xfff)
}

/// Translates the virtual address `vaddr` to a guest-physical one by walking the page tables
/// `regs` select: none (paging off: the address itself), 32-bit (4 KiB and, with PSE, 4 MiB
/// pages), PAE, or 4- and 5-level long mode (4 KiB, 2 MiB and 1 GiB pages). `read` fills a
/// buffer from guest-physical memory and says whether it could. Returns None when the address is
/// not mapped (or not canonical, or a table lies outside memory). Access rights are not checked.
pub fn translate(regs: &PagingRegs, vaddr: u64, read: &mut dyn FnMut(u64, &mut [u8]) -> bool) -> Option<u64> {
    if regs.cr0 & CR0_PG == 0 {
        return Some(vaddr);
    }
    let mut read64 = |addr: u64| {
        let mut bytes = [0; 8];
        read(addr, &mut bytes).then(|| u64::from_le_bytes(bytes))
    };
    if regs.efer & EFER_LMA != 0 {
        let levels = if regs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        // Canonical: the bits above the top one translated copy it.
        let width = 12 + 9 * levels;
        let high = (vaddr as i64) >> (width - 1);
        if high != 0 && high != -1 {
            return None;
        }
        walk(regs.cr3 & ADDR_MASK, vaddr, levels, &mut read64)
    } else if regs.cr4 & CR4_PAE != 0 {
        // Four 8-byte entries at the 32-byte aligned CR3, each a page directory of 2 MiB or 4 KiB
        // pages.
        let vaddr = vaddr & 0xffff_ffff;
        let pdpte = read64((regs.cr3 & 0xffff_ffe0) + ((vaddr >> 30) & 3) * 8)?;
        if pdpte & PRESENT == 0 {
            return None;
        }
        walk(pdpte & ADDR_MASK, vaddr, 2, &mut read64)
    } else {
        let vaddr = vaddr & 0xffff_ffff;
        let mut read32 = |addr: u64| {
            let mut bytes = [0; 4];
            read(addr, &mut bytes).then(|| u64::from(u32::from_le_bytes(bytes)))
        };
        let pde = read32((regs.cr3 & 0xffff_f000) + (vaddr >> 22) * 4)?;
        if pde & PRESENT == 0 {
            return None;
        }
        if pde & PAGE_SIZE != 0 && regs.cr4 & CR4_PSE != 0 {
            // PSE-36: bits 13-20 of the entry are physical address bits 32-39.
            let base = (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32;
            return Some(base | (vaddr & 0x3f_ffff));
        }
        let pte = read32((pde & 0xffff_f000) + ((vaddr >> 12) & 0x3ff) * 4)?;
        (pte & PRESENT != 0).then_some((pte & 0xffff_f000) | (vaddr & 0xfff))
    }
}

/// Walks `levels` levels of 512 8-byte entries from the table at `table`; levels 2 and 3 may
/// map large pages.
fn walk(mut table: u64, vaddr: u64, levels: u32, read64: &mut dyn FnMut(u64) -> Option<u64>) -> Option<u64> {
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let entry = read64(table + ((vaddr >> shift) & 0x1ff) * 8)?;
        if entry & PRESENT == 0 {
            return None;
        }
        let page = 1u64 << shift;
        if level == 1 || (level <= 3 && entry & PAGE_SIZE != 0) {
            return Some((entry & ADDR_MASK & !(page - 1)) | (vaddr & (page - 1)));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 MiB of guest memory holding hand-built tables.
    struct Memory(Vec<u8>);

    impl Memory {
        fn new() -> Self {
            Self(vec![0; 1 << 20])
        }
        fn set64(&mut self, addr: u64, value: u64) {
            self.0[addr as usize..][..8].copy_from_slice(&value.to_le_bytes());
        }
        fn set32(&mut self, addr: u64, value: u32) {
            self.0[addr as usize..][..4].copy_from_slice(&value.to_le_bytes());
        }
        fn translate(&self, regs: &PagingRegs, vaddr: u64) -> Option<u64> {
            translate(regs, vaddr, &mut |addr, buf| match self.0.get(addr as usize..addr as usize + buf.len()) {
                Some(bytes) => {
                    buf.copy_from_slice(bytes);
                    true
                }
                None => false,
            })
        }
    }

    const LONG: PagingRegs = PagingRegs { cr0: CR0_PG | 1, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LMA | 1 << 8 };

    #[test]
    fn paging_off_is_identity() {
        let memory = Memory::new();
        assert_eq!(memory.translate(&PagingRegs::default(), 0x1234_5678), Some(0x1234_5678));
    }

    #[test]
    fn four_level_4k_2m_and_1g_pages() {
        let mut m = Memory::new();
        // 0x7f_c020_3456 -> PML4[0], PDPT[0x1ff], PD[1], PT[3]
        let vaddr = 0x7f_c020_3456u64;
        assert_eq!(
            ((vaddr >> 39) & 0x1ff, (vaddr >> 30) & 0x1ff, (vaddr >> 21) & 0x1ff, (vaddr >> 12) & 0x1ff),
            (0, 0x1ff, 1, 3)
        );
        m.set64(0x1000, 0x2000 | 3);
        m.set64(0x2000 + 0x1ff * 8, 0x3000 | 3);
        m.set64(0x3000 + 8, 0x4000 | 3);
        // NX set: it is not part of the address.
        m.set64(0x4000 + 3 * 8, 0x8_7654_3000 | 1 << 63 | 3);
        assert_eq!(m.translate(&LONG, vaddr), Some(0x8_7654_3456));
        // The neighbouring page is not present.
        assert_eq!(m.translate(&LONG, vaddr + 0x1000), None);
        // A 2 MiB page at PD[2] and a 1 GiB page at PDPT[5].
        m.set64(0x3000 + 2 * 8, 0x1_2340_0000 | PAGE_SIZE | 3);
        assert_eq!(m.translate(&LONG, 0x7f_c041_2345), Some(0x1_2341_2345));
        m.set64(0x2000 + 5 * 8, 0x40_0000_0000 | PAGE_SIZE | 3);
        assert_eq!(m.translate(&LONG, 0x1_4abc_def0), Some(0x40_0abc_def0));
        // Non-canonical addresses are never mapped.
        assert_eq!(m.translate(&LONG, 0x8000_0000_0000), None);
    }

    #[test]
    fn higher_half_and_five_levels() {
        let mut m = Memory::new();
        // -2 GiB: PML4[511], PDPT[510], PD[0], 2 MiB page.
        m.set64(0x1000 + 511 * 8, 0x2000 | 3);
        m.set64(0x2000 + 510 * 8, 0x3000 | 3);
        m.set64(0x3000, 0x20_0000 | PAGE_SIZE | 3);
        assert_eq!(m.translate(&LONG, 0xffff_ffff_8000_1234), Some(0x20_1234));
        // Five levels: PML5[1] covers 0x1_0000_0000_0000_0000 >> ... (bit 48 set).
        let five = PagingRegs { cr4: CR4_PAE | CR4_LA57, cr3: 0x5000, ..LONG };
        let vaddr = 1u64 << 48 | 0x5678;
        m.set64(0x5000 + 8, 0x6000 | 3);
        m.set64(0x6000, 0x7000 | 3);
        m.set64(0x7000, 0x8000 | 3);
        m.set64(0x8000, 0x9000 | 3);
        m.set64(0x9000 + 5 * 8, 0xab000 | 3);
        assert_eq!(m.translate(&five, vaddr), Some(0xab678));
        // With four levels the same address is not canonical.
        assert_eq!(m.translate(&LONG, vaddr), None);
    }

    #[test]
    fn pae_and_32_bit_paging() {
        let mut m = Memory::new();
        let pae = PagingRegs { cr0: CR0_PG | 1, cr3: 0x1020, cr4: CR4_PAE, efer: 0 };
        // 0xc040_1234: PDPT[3], PD[2], PT[1].
        m.set64(0x1020 + 3 * 8, 0x2000 | 1);
        m.set64(0x2000 + 2 * 8, 0x3000 | 3);
        m.set64(0x3000 + 8, 0x5_0000_0000 | 3);
        assert_eq!(m.translate(&pae, 0xc040_1234), Some(0x5_0000_0234));
        m.set64(0x2000 + 3 * 8, 0x60_0000 | PAGE_SIZE | 3);
        assert_eq!(m.translate(&pae, 0xc060_0042), Some(0x60_0042));

        let legacy = PagingRegs { cr0: CR0_PG | 1, cr3: 0x4000, cr4: CR4_PSE, efer: 0 };
        // 0x0040_3abc: PD[1], PT[3]; 0x0080_0000: PD[2], a 4 MiB page.
        m.set32(0x4000 + 4, 0x6000 | 3);
        m.set32(0x6000 + 3 * 4, 0x7_7000 | 3);
        assert_eq!(m.translate(&legacy, 0x0040_3abc), Some(0x7_7abc));
        m.set32(0x4000 + 8, 0x0c00_0000 | PAGE_SIZE as u32 | 3);
        assert_eq!(m.translate(&legacy, 0x0081_2345), Some(0x0c01_2345));
        assert_eq!(m.translate(&legacy, 0x00c0_0000), None);
    }

    #[test]
    fn tables_outside_memory_are_unmapped() {
        let mut m = Memory::new();
        m.set64(0x1000, 0x4000_0000 | 3);
        assert_eq!(m.translate(&LONG, 0x1000), None);
    }
}
