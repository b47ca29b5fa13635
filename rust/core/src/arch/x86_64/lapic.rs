/// The local vector table entries for the LINT0 and LINT1 pins.
const LVT_LINT0: usize = 0x350;
const LVT_LINT1: usize = 0x360;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE_MASK: u32 = 0x7 << DELIVERY_MODE_SHIFT;
const DELIVERY_EXTINT: u32 = 0x7;
const DELIVERY_NMI: u32 = 0x4;

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI in a local APIC's register page, as the MP
/// table tells the guest and as PC firmware leaves them.
pub fn wire_lint_pins(regs: &mut [std::ffi::c_char; 1024]) {
    set_delivery_mode(regs, LVT_LINT0, DELIVERY_EXTINT);
    set_delivery_mode(regs, LVT_LINT1, DELIVERY_NMI);
}

fn set_delivery_mode(regs: &mut [std::ffi::c_char; 1024], offset: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !DELIVERY_MODE_MASK) | (mode << DELIVERY_MODE_SHIFT);
    for (slot, byte) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *slot = byte as std::ffi::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_pins_get_extint_and_nmi_keeping_other_bits() {
        let mut regs = [0 as std::ffi::c_char; 1024];
        regs[LVT_LINT0] = 0x30; // a vector that must survive
        regs[LVT_LINT1 + 2] = 0x01; // the mask bit (16)
        wire_lint_pins(&mut regs);
        let word = |at: usize| u32::from_le_bytes(std::array::from_fn(|i| regs[at + i] as u8));
        assert_eq!(word(LVT_LINT0), 0x730);
        assert_eq!(word(LVT_LINT1), 0x1_0400);
    }
}
