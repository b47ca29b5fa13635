use super::layout::{IDENTITY_MAPPED_GIB, PDPT_ADDR, PD_ADDR, PML4_ADDR};

const PRESENT_WRITABLE: u64 = 0x3;
const HUGE_PAGE: u64 = 0x80;
const PAGE_2M: u64 = 2 << 20;

/// Page tables that identity-map the first [`IDENTITY_MAPPED_GIB`] GiB with 2 MiB pages, as
/// `(guest address, 4 KiB table)` pairs: one PML4, one PDPT and one page directory per GiB.
pub fn identity_map() -> Vec<(u64, Vec<u8>)> {
    let table = |entries: &mut dyn Iterator<Item = u64>| {
        let mut bytes = vec![0u8; 4096];
        for (slot, value) in bytes.chunks_exact_mut(8).zip(entries) {
            slot.copy_from_slice(&value.to_le_bytes());
        }
        bytes
    };
    let pd_addr = |gib: u64| PD_ADDR + gib * 0x1000;
    let mut tables = vec![
        (PML4_ADDR, table(&mut std::iter::once(PDPT_ADDR | PRESENT_WRITABLE))),
        (PDPT_ADDR, table(&mut (0..IDENTITY_MAPPED_GIB).map(|gib| pd_addr(gib) | PRESENT_WRITABLE))),
    ];
    for gib in 0..IDENTITY_MAPPED_GIB {
        let mut pages = (0..512).map(|i| ((gib * 512 + i) * PAGE_2M) | PRESENT_WRITABLE | HUGE_PAGE);
        tables.push((pd_addr(gib), table(&mut pages)));
    }
    tables
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::PAGE_TABLES_END;

    fn entry(tables: &[(u64, Vec<u8>)], table: u64, index: u64) -> u64 {
        let bytes = &tables.iter().find(|(addr, _)| *addr == table).unwrap().1;
        let at = (index * 8) as usize;
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// Walks the tables the way the MMU does for a 2 MiB page.
    fn translate(tables: &[(u64, Vec<u8>)], virt: u64) -> Option<u64> {
        let pml4e = entry(tables, PML4_ADDR, (virt >> 39) & 0x1ff);
        let pdpte = entry(tables, pml4e & !0xfff, (virt >> 30) & 0x1ff);
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = entry(tables, pdpte & !0xfff, (virt >> 21) & 0x1ff);
        assert_eq!(pde & HUGE_PAGE, HUGE_PAGE);
        (pde & 1 == 1).then_some((pde & !0x1f_ffff & !(1 << 63)) | (virt & 0x1f_ffff))
    }

    #[test]
    fn maps_every_address_below_the_limit_to_itself() {
        let tables = identity_map();
        assert_eq!(tables.len() as u64, 2 + IDENTITY_MAPPED_GIB);
        assert_eq!(tables.iter().map(|(a, _)| *a).max().unwrap() + 0x1000, PAGE_TABLES_END);
        for virt in [0, 0x1000, 0x1f_ffff, 0x20_0000, 0x1234_5678, 0xfee0_0000, (4 << 30) - 1] {
            assert_eq!(translate(&tables, virt), Some(virt), "{virt:#x}");
        }
        assert_eq!(translate(&tables, 4 << 30), None);
    }
}
