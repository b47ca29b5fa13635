use kvm_bindings::kvm_segment;

/// Flags of a flat 64-bit code segment (G, L, present, code, read/execute, accessed).
pub const CODE64: u16 = 0xa09b;
/// Flags of a flat 32-bit code segment (G, D, present, code, read/execute, accessed).
pub const CODE32: u16 = 0xc09b;
/// Flags of a flat read/write data segment (G, B, present, data, read/write, accessed).
pub const DATA: u16 = 0xc093;
/// Flags of a busy 32/64-bit TSS (present, system, type 11).
pub const TSS: u16 = 0x008b;

/// The GDT kvmkit writes: (selector index, flags, limit). Index 0 is the null descriptor.
pub const BOOT_GDT: [(u16, u16, u32); 5] =
    [(0, 0, 0), (1, CODE32, 0xfffff), (2, DATA, 0xfffff), (3, CODE64, 0xfffff), (4, TSS, 0x67)];
/// Selector of the 32-bit code segment.
pub const CODE32_SELECTOR: u16 = 1 << 3;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 2 << 3;
/// Selector of the 64-bit code segment.
pub const CODE64_SELECTOR: u16 = 3 << 3;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 4 << 3;

/// Encodes a descriptor. `flags` holds the access byte in bits 0-7 and G/DB/L/AVL in bits 12-15;
/// `limit` is 20 bits, in pages when G is set.
pub const fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The descriptor table bytes of [`BOOT_GDT`], base 0, ready to write at the GDT address.
pub fn boot_gdt_bytes() -> Vec<u8> {
    BOOT_GDT.iter().flat_map(|&(_, flags, limit)| entry(flags, 0, limit).to_le_bytes()).collect()
}

/// The segment register state KVM expects for descriptor `raw` loaded with `selector`.
pub fn segment(raw: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((raw >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let limit = ((raw & 0xffff) | ((raw >> 32) & 0xf_0000)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((raw >> 16) & 0xff_ffff) | ((raw >> 32) & 0xff00_0000),
        limit: if granular { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((raw >> 40) & 0xf) as u8,
        present,
        dpl: ((raw >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The segment state of the [`BOOT_GDT`] entry behind `selector`.
pub fn boot_segment(selector: u16) -> kvm_segment {
    let (_, flags, limit) = BOOT_GDT[usize::from(selector >> 3)];
    segment(entry(flags, 0, limit), selector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_descriptors() {
        // Values every x86 manual lists for flat segments.
        assert_eq!(entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(entry(CODE32, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(entry(DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(entry(0x0093, 0x1234_5678, 0xabcde), 0x120a_9334_5678_bcde);
    }

    #[test]
    fn decodes_what_it_encodes() {
        let code = boot_segment(CODE64_SELECTOR);
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 0x18));
        assert_eq!((code.type_, code.present, code.s, code.l, code.db, code.g), (0xb, 1, 1, 1, 0, 1));
        let data = boot_segment(DATA_SELECTOR);
        assert_eq!((data.type_, data.db, data.l, data.unusable), (3, 1, 0, 0));
        let tss = boot_segment(TSS_SELECTOR);
        assert_eq!((tss.type_, tss.s, tss.limit, tss.g), (0xb, 0, 0x67, 0));
        let odd = segment(entry(0x0093, 0x1234_5678, 0xabcde), 0x10);
        assert_eq!((odd.base, odd.limit), (0x1234_5678, 0xabcde));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn gdt_bytes_hold_each_entry_at_its_selector() {
        let bytes = boot_gdt_bytes();
        assert_eq!(bytes.len(), 8 * BOOT_GDT.len());
        let at = |selector: u16| {
            let start = usize::from(selector);
            u64::from_le_bytes(bytes[start..start + 8].try_into().unwrap())
        };
        assert_eq!(at(0), 0);
        assert_eq!(at(CODE64_SELECTOR), 0x00af_9b00_0000_ffff);
        assert_eq!(at(CODE32_SELECTOR), 0x00cf_9b00_0000_ffff);
        assert_eq!(at(DATA_SELECTOR), 0x00cf_9300_0000_ffff);
    }
}
