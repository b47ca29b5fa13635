//! The default exception table of raw guests: an IDT whose 32 exception gates lead to small stubs
//! that report the exception to the VMM through a port write, so that a fault ends the run with
//! a readable exit instead of a triple fault.
//!
//! Each stub pushes a zero where the CPU pushes no error code, then its vector, and jumps to a
//! common tail that writes AL to `FAULT_PORT`. The stubs change no register, and their bytes
//! mean the same in 32-bit and 64-bit code, so one set serves both modes; only the gates differ.
//! The VMM then finds, on the stack the CPU delivered the exception on, the vector, the error
//! code and the frame the CPU pushed (`Frame`), and puts the vCPU back at the faulting
//! instruction with the stack and flags it had.

use std::fmt;

use super::gdt::{CODE32_SELECTOR, CODE64_SELECTOR};

/// The long-mode IDT: 32 gates of 16 bytes, each taking its exception on the vCPU's own exception
/// stack (IST 1, see [`tss`]).
pub const IDT64_ADDR: u64 = 0x600;
/// The protected-mode IDT: 32 gates of 8 bytes.
pub const IDT32_ADDR: u64 = 0x800;
/// The first stub; stub `n` is at `STUBS_ADDR + n * STUB_SIZE`.
pub const STUBS_ADDR: u64 = 0x900;
/// The room each stub takes.
pub const STUB_SIZE: u64 = 16;
/// The common tail of the stubs: `out FAULT_PORT, al`, then `hlt` in a loop.
pub const TAIL_ADDR: u64 = STUBS_ADDR + VECTORS as u64 * STUB_SIZE;
/// A `hlt` in a loop, in the tail: where the report's `out` returns to, and the return address the
/// default stack holds, so that an entry function that returns halts the vCPU.
pub const HALT_ADDR: u64 = TAIL_ADDR + 2;
/// First address after the exception table's code.
pub const EXCEPTIONS_END: u64 = TAIL_ADDR + 16;
/// The long-mode IDT for the vCPUs that have no exception stack of their own (from the
/// [`IST_VCPUS`]th on): its gates take exceptions on the current stack.
pub const IDT64_PLAIN_ADDR: u64 = EXCEPTIONS_END;
/// The TSS and exception stack of each of the first [`IST_VCPUS`] vCPUs in long mode: a page
/// after the page tables, [`IST_SLOT_SIZE`] bytes each.
pub const IST_AREA_ADDR: u64 = 0xf000;
/// The room of one vCPU's TSS (at its start) and exception stack (growing down from its end).
pub const IST_SLOT_SIZE: u64 = 0x100;
/// How many vCPUs have an exception stack.
pub const IST_VCPUS: usize = 16;
/// A 64-bit TSS is 104 bytes.
const TSS_SIZE: u64 = 0x68;
/// Where IST 1 is in a 64-bit TSS.
const TSS_IST1: usize = 0x24;
/// Where the I/O permission bitmap's offset is in a TSS; pointing at the TSS's end means none.
const TSS_IOMAP_BASE: usize = 0x66;
/// The port the stubs write to report an exception. Nothing else in the guest should write it;
/// a device mapped there takes the writes instead (and the stubs then halt).
pub const FAULT_PORT: u16 = 0xef;
/// How many exception vectors the table covers (0-31, the ones the CPU reserves for exceptions).
pub const VECTORS: u8 = 32;

// The tables sit between the GDT and 0x1000, where raw code usually starts, one after the other.
const _: () = {
    assert!(super::layout::GDT_ADDR + 0x40 <= IDT64_ADDR);
    assert!(IDT64_ADDR + VECTORS as u64 * 16 == IDT32_ADDR);
    assert!(IDT32_ADDR + VECTORS as u64 * 8 == STUBS_ADDR);
    assert!(IDT64_PLAIN_ADDR + VECTORS as u64 * 16 <= 0x1000);
    assert!(super::layout::PAGE_TABLES_END <= IST_AREA_ADDR);
    assert!(IST_AREA_ADDR + IST_VCPUS as u64 * IST_SLOT_SIZE <= 0x1_0000);
    // The exception stack holds the CPU's frame, the error code and the vector.
    assert!(TSS_SIZE + 0x40 <= IST_SLOT_SIZE);
};

/// Gate type: a present, DPL 0 interrupt gate (32-bit or, in long mode, 64-bit).
const INTERRUPT_GATE: u64 = 0x8e;

/// Whether the CPU pushes an error code for exception `vector`.
pub const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

/// The mnemonic (`#PF`) and name of exception `vector`.
pub fn vector_name(vector: u8) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        9 => ("#CSO", "coprocessor segment overrun"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point error"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point exception"),
        20 => ("#VE", "virtualization exception"),
        21 => ("#CP", "control protection"),
        28 => ("#HV", "hypervisor injection"),
        29 => ("#VC", "VMM communication"),
        30 => ("#SX", "security exception"),
        _ => ("#RES", "reserved"),
    }
}

/// The machine code of stub `vector`: `push 0` (when the CPU pushes no error code), `push
/// vector`, `jmp` to the tail.
fn stub(vector: u8) -> Vec<u8> {
    let mut code = Vec::with_capacity(STUB_SIZE as usize);
    if !has_error_code(vector) {
        code.extend([0x6a, 0x00]);
    }
    code.extend([0x6a, vector]);
    let after_jump = stub_addr(vector) + code.len() as u64 + 5;
    code.push(0xe9);
    code.extend(((TAIL_ADDR.wrapping_sub(after_jump)) as u32).to_le_bytes());
    code.resize(STUB_SIZE as usize, 0xcc);
    code
}

/// Where the stub of `vector` starts.
pub const fn stub_addr(vector: u8) -> u64 {
    STUBS_ADDR + vector as u64 * STUB_SIZE
}

/// The stubs and their tail, ready to write at [`STUBS_ADDR`].
pub fn code() -> Vec<u8> {
    let mut code: Vec<u8> = (0..VECTORS).flat_map(stub).collect();
    // out FAULT_PORT, al; hlt; jmp back to the hlt.
    code.extend([0xe6, FAULT_PORT as u8, 0xf4, 0xeb, 0xfd]);
    code.resize((EXCEPTIONS_END - STUBS_ADDR) as usize, 0xcc);
    code
}

/// A 16-byte long-mode interrupt gate to `offset` through `selector`, on interrupt stack `ist`
/// (0 for the current stack).
fn gate64(offset: u64, selector: u16, ist: u8) -> [u8; 16] {
    let low = (offset & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(ist) << 32)
        | (INTERRUPT_GATE << 40)
        | ((offset & 0xffff_0000) << 32);
    let high = offset >> 32;
    let mut gate = [0; 16];
    gate[..8].copy_from_slice(&low.to_le_bytes());
    gate[8..].copy_from_slice(&high.to_le_bytes());
    gate
}

/// An 8-byte 32-bit interrupt gate to `offset` through `selector`.
fn gate32(offset: u32, selector: u16) -> [u8; 8] {
    let offset = u64::from(offset);
    let gate =
        (offset & 0xffff) | (u64::from(selector) << 16) | (INTERRUPT_GATE << 40) | ((offset & 0xffff_0000) << 32);
    gate.to_le_bytes()
}

/// The IDT for long mode (`long`; with `ist` the one whose gates switch to the vCPU's exception
/// stack) or protected mode, its address and its limit: one gate per stub.
pub fn idt(long: bool, ist: bool) -> (u64, Vec<u8>, u16) {
    if long {
        let (addr, stack) = if ist { (IDT64_ADDR, 1) } else { (IDT64_PLAIN_ADDR, 0) };
        let bytes = (0..VECTORS).flat_map(|v| gate64(stub_addr(v), CODE64_SELECTOR, stack)).collect::<Vec<_>>();
        let limit = (bytes.len() - 1) as u16;
        (addr, bytes, limit)
    } else {
        let bytes = (0..VECTORS).flat_map(|v| gate32(stub_addr(v) as u32, CODE32_SELECTOR)).collect::<Vec<_>>();
        let limit = (bytes.len() - 1) as u16;
        (IDT32_ADDR, bytes, limit)
    }
}

/// The 64-bit TSS of vCPU `index` and its address, when the vCPU has an exception stack: IST 1
/// points at the end of its slot, and there is no I/O permission bitmap. The TSS's other stack
/// pointers are unused, as the guest runs at CPL 0.
pub fn tss(index: usize) -> Option<(u64, Vec<u8>)> {
    if index >= IST_VCPUS {
        return None;
    }
    let addr = IST_AREA_ADDR + index as u64 * IST_SLOT_SIZE;
    let mut bytes = vec![0; TSS_SIZE as usize];
    bytes[TSS_IST1..TSS_IST1 + 8].copy_from_slice(&(addr + IST_SLOT_SIZE).to_le_bytes());
    bytes[TSS_IOMAP_BASE..TSS_IOMAP_BASE + 2].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    Some((addr, bytes))
}

/// The limit of a 64-bit TSS.
pub const TSS_LIMIT: u32 = TSS_SIZE as u32 - 1;

/// What the stubs leave on the stack: the vector and error code they pushed (or the CPU did),
/// then what the CPU pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The exception vector.
    pub vector: u8,
    /// The error code, for vectors that have one.
    pub error_code: Option<u64>,
    /// The instruction pointer the CPU saved: the faulting instruction for faults, the next one
    /// for traps (`#BP`, `#OF`, most `#DB`).
    pub rip: u64,
    /// RFLAGS at the exception.
    pub rflags: u64,
    /// The stack pointer at the exception.
    pub rsp: u64,
}

impl Frame {
    /// How many bytes of stack the frame takes in long mode (`long`) or protected mode.
    pub const fn size(long: bool) -> usize {
        if long {
            7 * 8
        } else {
            5 * 4
        }
    }

    /// Decodes the frame from the stack bytes at `rsp` (at least [`size`](Self::size)). In long
    /// mode the CPU saved the old stack pointer; in protected mode (no privilege change) it is
    /// where the frame ends. `None` when the vector is not one of the stubs'.
    pub fn decode(long: bool, rsp: u64, bytes: &[u8]) -> Option<Self> {
        let word = |index: usize| -> u64 {
            if long {
                u64::from_le_bytes(bytes[index * 8..index * 8 + 8].try_into().expect("8 bytes"))
            } else {
                u64::from(u32::from_le_bytes(bytes[index * 4..index * 4 + 4].try_into().expect("4 bytes")))
            }
        };
        let vector = u8::try_from(word(0)).ok().filter(|v| *v < VECTORS)?;
        let error_code = has_error_code(vector).then(|| word(1));
        let (rip, rflags) = (word(2), word(4));
        let rsp = if long { word(5) } else { (rsp + Self::size(false) as u64) & 0xffff_ffff };
        Some(Self { vector, error_code, rip, rflags, rsp })
    }
}

/// An exception of a raw guest, caught by kvmkit's exception table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestFault {
    /// The exception vector (0-31).
    pub vector: u8,
    /// The error code, for the vectors the CPU pushes one for.
    pub error_code: Option<u64>,
    /// Where the exception happened: the faulting instruction, or for a trap the next one.
    pub rip: u64,
    /// The address that faulted, for a page fault.
    pub cr2: Option<u64>,
    /// Whether `rip` (as a linear address, through the vCPU's page tables) lands in guest RAM.
    pub rip_in_memory: bool,
}

impl fmt::Display for GuestFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mnemonic, name) = vector_name(self.vector);
        write!(f, "guest exception {mnemonic} ({name}) at rip {:#x}", self.rip)?;
        if let Some(code) = self.error_code {
            write!(f, ", error code {code:#x}")?;
        }
        if let Some(cr2) = self.cr2 {
            write!(f, ", address {cr2:#x}")?;
        }
        if !self.rip_in_memory {
            f.write_str(": rip is outside guest memory (a jump, call or return to a wrong address?)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_fills_its_area() {
        assert_eq!(code().len() as u64, EXCEPTIONS_END - STUBS_ADDR);
    }

    #[test]
    fn stubs_push_a_uniform_frame_and_jump_to_the_tail() {
        let code = code();
        let at = |addr: u64| &code[(addr - STUBS_ADDR) as usize..];
        // #DE has no error code: push 0, push 0, jmp.
        assert_eq!(&at(stub_addr(0))[..4], [0x6a, 0, 0x6a, 0]);
        // #PF has one: push 14, jmp.
        assert_eq!(&at(stub_addr(14))[..3], [0x6a, 14, 0xe9]);
        for vector in 0..VECTORS {
            let stub = at(stub_addr(vector));
            let jump = if has_error_code(vector) { 2 } else { 4 };
            assert_eq!(stub[jump], 0xe9);
            let rel = i32::from_le_bytes(stub[jump + 1..jump + 5].try_into().unwrap());
            let target = (stub_addr(vector) + jump as u64 + 5).wrapping_add(rel as i64 as u64);
            assert_eq!(target, TAIL_ADDR, "vector {vector}");
        }
        assert_eq!(&at(TAIL_ADDR)[..5], [0xe6, FAULT_PORT as u8, 0xf4, 0xeb, 0xfd]);
        assert_eq!(at(HALT_ADDR)[0], 0xf4);
    }

    #[test]
    fn gates_point_at_the_stubs() {
        for (ist, table) in [(true, IDT64_ADDR), (false, IDT64_PLAIN_ADDR)] {
            let (addr, bytes, limit) = idt(true, ist);
            assert_eq!((addr, bytes.len(), limit), (table, 512, 511));
            let gate = u64::from_le_bytes(bytes[14 * 16..14 * 16 + 8].try_into().unwrap());
            let offset = (gate & 0xffff) | ((gate >> 32) & 0xffff_0000);
            assert_eq!((offset, (gate >> 16) & 0xffff, (gate >> 40) & 0xff), (stub_addr(14), 0x18, 0x8e));
            assert_eq!((gate >> 32) & 0x7, u64::from(ist));
        }
        let (addr, bytes, limit) = idt(false, true);
        assert_eq!((addr, bytes.len(), limit), (IDT32_ADDR, 256, 255));
        let gate = u64::from_le_bytes(bytes[6 * 8..6 * 8 + 8].try_into().unwrap());
        let offset = (gate & 0xffff) | ((gate >> 32) & 0xffff_0000);
        assert_eq!((offset, (gate >> 16) & 0xffff), (stub_addr(6), 0x08));
    }

    #[test]
    fn each_vcpu_has_its_exception_stack() {
        let (first, tss0) = tss(0).unwrap();
        let (second, _) = tss(1).unwrap();
        assert_eq!((first, second - first, tss0.len()), (IST_AREA_ADDR, IST_SLOT_SIZE, 0x68));
        let ist1 = u64::from_le_bytes(tss0[0x24..0x2c].try_into().unwrap());
        assert_eq!(ist1, IST_AREA_ADDR + IST_SLOT_SIZE);
        assert_eq!(ist1 % 16, 0);
        assert_eq!(tss(IST_VCPUS), None);
    }

    #[test]
    fn frames_decode_in_both_widths() {
        let words64: Vec<u8> =
            [14u64, 2, 0x1234, 0x18, 0x10046, 0x7ff8, 0x10].iter().flat_map(|w| w.to_le_bytes()).collect();
        let frame = Frame::decode(true, 0x7fc0, &words64).unwrap();
        assert_eq!(frame, Frame { vector: 14, error_code: Some(2), rip: 0x1234, rflags: 0x10046, rsp: 0x7ff8 });
        let words32: Vec<u8> = [6u32, 0, 0x1000, 8, 0x2].iter().flat_map(|w| w.to_le_bytes()).collect();
        let frame = Frame::decode(false, 0x8fe0, &words32).unwrap();
        assert_eq!(frame, Frame { vector: 6, error_code: None, rip: 0x1000, rflags: 2, rsp: 0x8ff4 });
        let bad: Vec<u8> = [40u32, 0, 0, 0, 0].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(Frame::decode(false, 0, &bad), None);
    }

    #[test]
    fn faults_describe_themselves() {
        let fault =
            GuestFault { vector: 14, error_code: Some(2), rip: 0x1000, cr2: Some(1 << 33), rip_in_memory: true };
        assert_eq!(
            fault.to_string(),
            "guest exception #PF (page fault) at rip 0x1000, error code 0x2, address 0x200000000"
        );
        let lost = GuestFault { vector: 6, rip: 1 << 40, ..Default::default() };
        assert!(lost.to_string().contains("#UD (invalid opcode)") && lost.to_string().contains("outside guest memory"));
    }
}
