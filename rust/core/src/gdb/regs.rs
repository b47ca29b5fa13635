//! The x86-64 register file as gdb sees it: the general registers, x87 and SSE state, the segment
//! bases, and a system feature with the control registers and EFER, described to gdb by a target
//! description of kvmkit's own.

use gdbstub::arch::{Arch, Registers};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

/// The architecture the gdb server speaks: 64-bit x86 with the registers of [`X86Registers`].
pub enum KvmX86_64 {}

impl Arch for KvmX86_64 {
    type Usize = u64;
    type Registers = X86Registers;
    type BreakpointKind = usize;
    type RegId = ();

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// Every register gdb reads and writes, in the order of the target description (which is the
/// order of the `g` packet).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct X86Registers {
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8-r15 (gdb's order, not KVM's).
    pub gpr: [u64; 16],
    /// The instruction pointer.
    pub rip: u64,
    /// RFLAGS' low half.
    pub eflags: u32,
    /// Selectors of cs, ss, ds, es, fs, gs.
    pub selectors: [u32; 6],
    /// st0-st7, 80 bits each.
    pub st: [[u8; 10]; 8],
    /// fctrl, fstat, ftag, fiseg, fioff, foseg, fooff, fop.
    pub x87: [u32; 8],
    /// xmm0-xmm15.
    pub xmm: [[u8; 16]; 16],
    /// The SSE control and status register.
    pub mxcsr: u32,
    /// The fs segment's base.
    pub fs_base: u64,
    /// The gs segment's base.
    pub gs_base: u64,
    /// cr0, cr2, cr3, cr4, cr8.
    pub cr: [u64; 5],
    /// The EFER MSR.
    pub efer: u64,
}

/// Bytes of a `g` packet's register block.
pub const REGISTER_BYTES: usize = 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 2 * 8 + 5 * 8 + 8;

impl X86Registers {
    /// The registers of a vCPU, from what KVM reports of it.
    pub fn from_kvm(regs: &kvm_regs, sregs: &kvm_sregs, fpu: &kvm_fpu) -> Self {
        let gpr = [
            regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp, regs.rsp, regs.r8, regs.r9, regs.r10,
            regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ];
        let selectors = [sregs.cs, sregs.ss, sregs.ds, sregs.es, sregs.fs, sregs.gs].map(|s| u32::from(s.selector));
        let mut st = [[0; 10]; 8];
        for (st, fpr) in st.iter_mut().zip(&fpu.fpr) {
            st.copy_from_slice(&fpr[..10]);
        }
        let x87 = [
            u32::from(fpu.fcw),
            u32::from(fpu.fsw),
            full_tag_word(fpu.ftwx),
            0,
            fpu.last_ip as u32,
            0,
            fpu.last_dp as u32,
            u32::from(fpu.last_opcode),
        ];
        Self {
            gpr,
            rip: regs.rip,
            eflags: regs.rflags as u32,
            selectors,
            st,
            x87,
            xmm: fpu.xmm,
            mxcsr: fpu.mxcsr,
            fs_base: sregs.fs.base,
            gs_base: sregs.gs.base,
            cr: [sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8],
            efer: sregs.efer,
        }
    }

    /// Puts these registers into KVM's structures (read from the vCPU first, so that what gdb
    /// does not see stays). A selector is only written when it changed, with the segment's
    /// cached descriptor left as it is.
    pub fn to_kvm(&self, regs: &mut kvm_regs, sregs: &mut kvm_sregs, fpu: &mut kvm_fpu) {
        let g = &self.gpr;
        (regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp, regs.rsp) =
            (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15) =
            (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        regs.rip = self.rip;
        regs.rflags = regs.rflags & !0xffff_ffff | u64::from(self.eflags);
        let segments = [&mut sregs.cs, &mut sregs.ss, &mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs];
        for (segment, &selector) in segments.into_iter().zip(&self.selectors) {
            if u32::from(segment.selector) != selector {
                segment.selector = selector as u16;
            }
        }
        sregs.fs.base = self.fs_base;
        sregs.gs.base = self.gs_base;
        [sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8] = self.cr;
        sregs.efer = self.efer;
        for (fpr, st) in fpu.fpr.iter_mut().zip(&self.st) {
            fpr[..10].copy_from_slice(st);
        }
        fpu.fcw = self.x87[0] as u16;
        fpu.fsw = self.x87[1] as u16;
        fpu.ftwx = abridged_tag_word(self.x87[2]);
        fpu.last_ip = u64::from(self.x87[4]);
        fpu.last_dp = u64::from(self.x87[6]);
        fpu.last_opcode = self.x87[7] as u16;
        fpu.xmm = self.xmm;
        fpu.mxcsr = self.mxcsr;
    }
}

/// The x87 tag word (two bits per register, 0b11 empty) from the FXSAVE form KVM keeps (one bit
/// per register, set when not empty). A register in use is shown as valid.
fn full_tag_word(abridged: u8) -> u32 {
    (0..8).filter(|i| abridged & 1 << i == 0).fold(0, |tags, i| tags | 0b11 << (2 * i))
}

/// The FXSAVE form of an x87 tag word.
fn abridged_tag_word(full: u32) -> u8 {
    (0..8).filter(|i| (full >> (2 * i)) & 0b11 != 0b11).fold(0, |tags, i| tags | 1 << i)
}

impl Registers for X86Registers {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        let mut put = |bytes: &[u8]| bytes.iter().for_each(|&b| write_byte(Some(b)));
        self.gpr.iter().for_each(|r| put(&r.to_le_bytes()));
        put(&self.rip.to_le_bytes());
        put(&self.eflags.to_le_bytes());
        self.selectors.iter().for_each(|r| put(&r.to_le_bytes()));
        self.st.iter().for_each(|r| put(r));
        self.x87.iter().for_each(|r| put(&r.to_le_bytes()));
        self.xmm.iter().for_each(|r| put(r));
        put(&self.mxcsr.to_le_bytes());
        put(&self.fs_base.to_le_bytes());
        put(&self.gs_base.to_le_bytes());
        self.cr.iter().for_each(|r| put(&r.to_le_bytes()));
        put(&self.efer.to_le_bytes());
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() != REGISTER_BYTES {
            return Err(());
        }
        let mut rest = bytes;
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        };
        let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let mut next = Self::default();
        next.gpr.iter_mut().for_each(|r| *r = u64_at(take(8)));
        next.rip = u64_at(take(8));
        next.eflags = u32_at(take(4));
        next.selectors.iter_mut().for_each(|r| *r = u32_at(take(4)));
        next.st.iter_mut().for_each(|r| r.copy_from_slice(take(10)));
        next.x87.iter_mut().for_each(|r| *r = u32_at(take(4)));
        next.xmm.iter_mut().for_each(|r| r.copy_from_slice(take(16)));
        next.mxcsr = u32_at(take(4));
        next.fs_base = u64_at(take(8));
        next.gs_base = u64_at(take(8));
        next.cr.iter_mut().for_each(|r| *r = u64_at(take(8)));
        next.efer = u64_at(take(8));
        *self = next;
        Ok(())
    }
}

/// The target description: gdb's x86-64 core and SSE features, the segment bases, and the
/// control registers with EFER in a feature of kvmkit's own. Registers are numbered in order.
const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
  <architecture>i386:x86-64</architecture>
  <feature name="org.gnu.gdb.i386.core">
    <flags id="i386_eflags" size="4">
      <field name="CF" start="0" end="0"/>
      <field name="" start="1" end="1"/>
      <field name="PF" start="2" end="2"/>
      <field name="AF" start="4" end="4"/>
      <field name="ZF" start="6" end="6"/>
      <field name="SF" start="7" end="7"/>
      <field name="TF" start="8" end="8"/>
      <field name="IF" start="9" end="9"/>
      <field name="DF" start="10" end="10"/>
      <field name="OF" start="11" end="11"/>
      <field name="NT" start="14" end="14"/>
      <field name="RF" start="16" end="16"/>
      <field name="VM" start="17" end="17"/>
      <field name="AC" start="18" end="18"/>
      <field name="VIF" start="19" end="19"/>
      <field name="VIP" start="20" end="20"/>
      <field name="ID" start="21" end="21"/>
    </flags>
    <reg name="rax" bitsize="64" type="int64"/>
    <reg name="rbx" bitsize="64" type="int64"/>
    <reg name="rcx" bitsize="64" type="int64"/>
    <reg name="rdx" bitsize="64" type="int64"/>
    <reg name="rsi" bitsize="64" type="int64"/>
    <reg name="rdi" bitsize="64" type="int64"/>
    <reg name="rbp" bitsize="64" type="data_ptr"/>
    <reg name="rsp" bitsize="64" type="data_ptr"/>
    <reg name="r8" bitsize="64" type="int64"/>
    <reg name="r9" bitsize="64" type="int64"/>
    <reg name="r10" bitsize="64" type="int64"/>
    <reg name="r11" bitsize="64" type="int64"/>
    <reg name="r12" bitsize="64" type="int64"/>
    <reg name="r13" bitsize="64" type="int64"/>
    <reg name="r14" bitsize="64" type="int64"/>
    <reg name="r15" bitsize="64" type="int64"/>
    <reg name="rip" bitsize="64" type="code_ptr"/>
    <reg name="eflags" bitsize="32" type="i386_eflags"/>
    <reg name="cs" bitsize="32" type="int32"/>
    <reg name="ss" bitsize="32" type="int32"/>
    <reg name="ds" bitsize="32" type="int32"/>
    <reg name="es" bitsize="32" type="int32"/>
    <reg name="fs" bitsize="32" type="int32"/>
    <reg name="gs" bitsize="32" type="int32"/>
    <reg name="st0" bitsize="80" type="i387_ext"/>
    <reg name="st1" bitsize="80" type="i387_ext"/>
    <reg name="st2" bitsize="80" type="i387_ext"/>
    <reg name="st3" bitsize="80" type="i387_ext"/>
    <reg name="st4" bitsize="80" type="i387_ext"/>
    <reg name="st5" bitsize="80" type="i387_ext"/>
    <reg name="st6" bitsize="80" type="i387_ext"/>
    <reg name="st7" bitsize="80" type="i387_ext"/>
    <reg name="fctrl" bitsize="32" type="int" group="float"/>
    <reg name="fstat" bitsize="32" type="int" group="float"/>
    <reg name="ftag" bitsize="32" type="int" group="float"/>
    <reg name="fiseg" bitsize="32" type="int" group="float"/>
    <reg name="fioff" bitsize="32" type="int" group="float"/>
    <reg name="foseg" bitsize="32" type="int" group="float"/>
    <reg name="fooff" bitsize="32" type="int" group="float"/>
    <reg name="fop" bitsize="32" type="int" group="float"/>
  </feature>
  <feature name="org.gnu.gdb.i386.sse">
    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v16i8" type="int8" count="16"/>
    <vector id="v8i16" type="int16" count="8"/>
    <vector id="v4i32" type="int32" count="4"/>
    <vector id="v2i64" type="int64" count="2"/>
    <union id="vec128">
      <field name="v4_float" type="v4f"/>
      <field name="v2_double" type="v2d"/>
      <field name="v16_int8" type="v16i8"/>
      <field name="v8_int16" type="v8i16"/>
      <field name="v4_int32" type="v4i32"/>
      <field name="v2_int64" type="v2i64"/>
      <field name="uint128" type="uint128"/>
    </union>
    <flags id="i386_mxcsr" size="4">
      <field name="IE" start="0" end="0"/>
      <field name="DE" start="1" end="1"/>
      <field name="ZE" start="2" end="2"/>
      <field name="OE" start="3" end="3"/>
      <field name="UE" start="4" end="4"/>
      <field name="PE" start="5" end="5"/>
      <field name="DAZ" start="6" end="6"/>
      <field name="IM" start="7" end="7"/>
      <field name="DM" start="8" end="8"/>
      <field name="ZM" start="9" end="9"/>
      <field name="OM" start="10" end="10"/>
      <field name="UM" start="11" end="11"/>
      <field name="PM" start="12" end="12"/>
      <field name="FZ" start="15" end="15"/>
    </flags>
    <reg name="xmm0" bitsize="128" type="vec128"/>
    <reg name="xmm1" bitsize="128" type="vec128"/>
    <reg name="xmm2" bitsize="128" type="vec128"/>
    <reg name="xmm3" bitsize="128" type="vec128"/>
    <reg name="xmm4" bitsize="128" type="vec128"/>
    <reg name="xmm5" bitsize="128" type="vec128"/>
    <reg name="xmm6" bitsize="128" type="vec128"/>
    <reg name="xmm7" bitsize="128" type="vec128"/>
    <reg name="xmm8" bitsize="128" type="vec128"/>
    <reg name="xmm9" bitsize="128" type="vec128"/>
    <reg name="xmm10" bitsize="128" type="vec128"/>
    <reg name="xmm11" bitsize="128" type="vec128"/>
    <reg name="xmm12" bitsize="128" type="vec128"/>
    <reg name="xmm13" bitsize="128" type="vec128"/>
    <reg name="xmm14" bitsize="128" type="vec128"/>
    <reg name="xmm15" bitsize="128" type="vec128"/>
    <reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>
  </feature>
  <feature name="org.gnu.gdb.i386.segments">
    <reg name="fs_base" bitsize="64" type="int"/>
    <reg name="gs_base" bitsize="64" type="int"/>
  </feature>
  <feature name="org.kvmkit.gdb.x86-64.system">
    <reg name="cr0" bitsize="64" type="int"/>
    <reg name="cr2" bitsize="64" type="int"/>
    <reg name="cr3" bitsize="64" type="int"/>
    <reg name="cr4" bitsize="64" type="int"/>
    <reg name="cr8" bitsize="64" type="int"/>
    <reg name="efer" bitsize="64" type="int"/>
  </feature>
</target>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip_through_the_g_packet() {
        let mut regs = X86Registers { rip: 0x10_0000, eflags: 0x202, efer: 0x500, ..Default::default() };
        regs.gpr[7] = 0x8_0000;
        regs.cr = [0x8000_0011, 2, 0x9000, 0x20, 8];
        regs.xmm[15] = [0xab; 16];
        regs.fs_base = 0xffff_8000_0000_1000;
        let mut bytes = Vec::new();
        regs.gdb_serialize(|b| bytes.push(b.expect("every register is known")));
        assert_eq!(bytes.len(), REGISTER_BYTES);
        assert_eq!(&bytes[128..136], &0x10_0000u64.to_le_bytes(), "rip follows the 16 general registers");
        assert_eq!(&bytes[REGISTER_BYTES - 8..], &0x500u64.to_le_bytes(), "efer comes last");
        let mut back = X86Registers::default();
        back.gdb_deserialize(&bytes).unwrap();
        assert_eq!(back, regs);
        assert!(back.gdb_deserialize(&bytes[1..]).is_err());
    }

    #[test]
    fn the_description_numbers_registers_as_the_packet_orders_them() {
        let names: Vec<&str> = TARGET_XML.split("<reg name=\"").skip(1).map(|s| &s[..s.find('"').unwrap()]).collect();
        assert_eq!(names.len(), 16 + 1 + 1 + 6 + 8 + 8 + 16 + 1 + 2 + 6);
        assert_eq!((names[16], names[17], names[24]), ("rip", "eflags", "st0"));
        assert_eq!(&names[names.len() - 8..], ["fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"]);
        let bits: usize =
            TARGET_XML.split("bitsize=\"").skip(1).map(|s| s[..s.find('"').unwrap()].parse::<usize>().unwrap()).sum();
        assert_eq!(bits / 8, REGISTER_BYTES);
    }

    #[test]
    fn tag_words_convert_both_ways() {
        assert_eq!(full_tag_word(0), 0xffff);
        assert_eq!(full_tag_word(0b1000_0001), 0x3ffc);
        assert_eq!(abridged_tag_word(0x3ffc), 0b1000_0001);
    }
}
