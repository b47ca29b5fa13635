use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::errno;

use crate::arch::x86_64::cpuid::{self, CpuidEdit, VcpuPlatform};
use crate::arch::x86_64::lapic;
use crate::error::{Error, Result};
use crate::vstate::exit::InternalError;

/// Where MXCSR sits in the XSAVE area, in 32-bit words (byte 24 of the legacy region).
const XSAVE_MXCSR_WORD: usize = 6;
/// XSTATE_BV, the bitmap of components present in the area (byte 512), low word.
const XSAVE_XSTATE_BV_WORD: usize = 128;
/// The x87 and SSE components of XSTATE_BV: the legacy region holds both.
const XSTATE_X87_SSE: u32 = 0b11;
/// Size of the fixed `kvm_xsave` structure.
const KVM_XSAVE_SIZE: i32 = 4096;

/// One vCPU of a VM. Its registers can be read and written while it is not running.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    /// Whether MXCSR can be carried through `KVM_GET/SET_XSAVE`, which `KVM_GET/SET_FPU` ignore
    /// it in: true when KVM has XSAVE and its state fits the fixed 4 KiB structure.
    mxcsr_via_xsave: bool,
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and gives it the host's supported CPUID, normalized for
    /// its APIC id, the topology and the platform (`irqchip`: KVM's LAPIC), then `edits`.
    pub fn new(
        vm: &VmFd,
        index: u32,
        count: u32,
        irqchip: bool,
        supported: &CpuId,
        edits: &[CpuidEdit],
    ) -> Result<Self> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let xsave_size = vm.check_extension_int(Cap::Xsave2);
        let mxcsr_via_xsave = vm.check_extension(Cap::Xsave) && xsave_size <= KVM_XSAVE_SIZE;
        let tsc_khz = if vm.check_extension(Cap::GetTscKhz) { fd.get_tsc_khz().ok() } else { None };
        let platform = VcpuPlatform {
            index,
            count,
            tsc_khz: tsc_khz.filter(|&khz| khz > 0),
            tsc_deadline: irqchip && vm.check_extension(Cap::TscDeadlineTimer),
        };
        let vcpu = Self { index, fd, mxcsr_via_xsave };
        let mut entries = supported.as_slice().to_vec();
        cpuid::normalize(&mut entries, &platform);
        for edit in edits {
            edit.apply(&mut entries);
        }
        vcpu.set_cpuid(&entries)?;
        Ok(vcpu)
    }

    /// Its index, which is also its APIC id.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The file descriptor, for the run loop.
    pub(crate) fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Enters the guest until its next exit. For a port I/O exit, also the size of one element
    /// (a string instruction moves several in one exit); 0 for other exits.
    pub(crate) fn run(&mut self) -> (std::result::Result<VcpuExit<'_>, errno::Error>, usize) {
        let run: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        let exit = self.fd.run();
        let pio_size = match exit {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => {
                // SAFETY: `run` points to the vCPU's `kvm_run` mapping, which lives as long as
                // `fd`; KVM filled the `io` member of the exit union for this exit. The exit's
                // data, which `exit` borrows, lies past the structure (at `io.data_offset`), so
                // this read does not alias it.
                usize::from(unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read() })
            }
            _ => 0,
        };
        (exit, pio_size)
    }

    /// General-purpose registers, RIP and RFLAGS.
    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))
    }

    /// Sets general-purpose registers, RIP and RFLAGS.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).map_err(Error::kvm("KVM_SET_REGS"))
    }

    /// Segment, control and descriptor-table registers.
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))
    }

    /// Sets segment, control and descriptor-table registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(Error::kvm("KVM_SET_SREGS"))
    }

    /// x87 and SSE state, MXCSR included.
    pub fn fpu(&self) -> Result<kvm_fpu> {
        let mut fpu = self.fd.get_fpu().map_err(Error::kvm("KVM_GET_FPU"))?;
        if self.mxcsr_via_xsave {
            fpu.mxcsr = self.xsave()?.region[XSAVE_MXCSR_WORD];
        }
        Ok(fpu)
    }

    /// Sets x87 and SSE state, MXCSR included.
    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        if !self.mxcsr_via_xsave {
            return self.fd.set_fpu(fpu).map_err(Error::kvm("KVM_SET_FPU"));
        }
        let mut xsave = self.xsave()?;
        write_legacy_area(&mut xsave, fpu);
        // SAFETY: `mxcsr_via_xsave` holds only when KVM's XSAVE state fits `kvm_xsave`, so the
        // kernel reads no further than the structure passed.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))
    }

    fn xsave(&self) -> Result<kvm_xsave> {
        self.fd.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))
    }

    /// Reads the MSRs at `indices`, failing on the first one KVM does not know.
    pub fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<_> = indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| too_many_msrs(indices.len()))?;
        let read = self.fd.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
        let entries = msrs.as_slice();
        if read < entries.len() {
            return Err(Error::InvalidConfig(format!("KVM cannot read MSR {:#x}", entries[read].index)));
        }
        Ok(entries.iter().map(|e| (e.index, e.data)).collect())
    }

    /// Writes MSRs, failing on the first one KVM refuses.
    pub fn set_msrs(&self, values: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<_> =
            values.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| too_many_msrs(values.len()))?;
        let written = self.fd.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        match values.get(written) {
            Some((index, data)) => Err(Error::InvalidConfig(format!("KVM refused to set MSR {index:#x} to {data:#x}"))),
            None => Ok(()),
        }
    }

    /// Wires the local APIC's LINT0 to ExtINT and LINT1 to NMI (needs the in-kernel irqchip).
    pub fn wire_lapic_lint_pins(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
        lapic::wire_lint_pins(&mut lapic.regs);
        self.fd.set_lapic(&lapic).map_err(Error::kvm("KVM_SET_LAPIC"))
    }

    /// The CPUID the vCPU reports.
    pub fn cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        let cpuid = self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_CPUID2"))?;
        Ok(cpuid.as_slice().to_vec())
    }

    /// Replaces the CPUID the vCPU reports (KVM accepts this only before the vCPU first runs).
    pub fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<()> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| {
            Error::InvalidConfig(format!(
                "{} CPUID entries are more than KVM takes ({KVM_MAX_CPUID_ENTRIES})",
                entries.len()
            ))
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))
    }

    /// Details of the `KVM_EXIT_INTERNAL_ERROR` the vCPU last stopped with.
    pub(crate) fn internal_error(&mut self) -> InternalError {
        // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so the kernel
        // filled the `internal` member of the exit union.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let count = (internal.ndata as usize).min(internal.data.len());
        InternalError::new(internal.suberror, internal.data[..count].to_vec())
    }
}

/// Writes `fpu` into the legacy (FXSAVE-format) region of an XSAVE area and marks the x87 and SSE
/// components present, so KVM loads them rather than their initial state.
fn write_legacy_area(xsave: &mut kvm_xsave, fpu: &kvm_fpu) {
    let mut legacy = [0u8; 416];
    for (word, chunk) in xsave.region.iter().zip(legacy.chunks_exact_mut(4)) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    legacy[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    legacy[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    legacy[4] = fpu.ftwx;
    legacy[6..8].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    legacy[8..16].copy_from_slice(&fpu.last_ip.to_le_bytes());
    legacy[16..24].copy_from_slice(&fpu.last_dp.to_le_bytes());
    legacy[24..28].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    for (slot, value) in legacy[32..].chunks_exact_mut(16).zip(fpu.fpr.iter().chain(fpu.xmm.iter())) {
        slot.copy_from_slice(value);
    }
    for (word, chunk) in xsave.region.iter_mut().zip(legacy.chunks_exact(4)) {
        *word = u32::from_le_bytes(chunk.try_into().expect("chunks of four bytes"));
    }
    xsave.region[XSAVE_XSTATE_BV_WORD] |= XSTATE_X87_SSE;
}

fn too_many_msrs(count: usize) -> Error {
    Error::InvalidConfig(format!("{count} MSRs are more than one KVM call takes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_area_has_the_fxsave_layout() {
        let mut xsave = kvm_xsave::default();
        xsave.region[200] = 0xdead_beef;
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            fsw: 0x1234,
            ftwx: 0x81,
            last_opcode: 0x7ff,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 0x99,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.fpr[7] = [0xaa; 16];
        fpu.xmm[15] = [0xbb; 16];
        write_legacy_area(&mut xsave, &fpu);
        let bytes: Vec<u8> = xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&bytes[0..8], &[0x7f, 0x03, 0x34, 0x12, 0x81, 0, 0xff, 0x07]);
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 0x1122_3344_5566_7788);
        assert_eq!(u32::from_le_bytes(bytes[24..28].try_into().unwrap()), 0x1f80);
        assert_eq!(&bytes[32 + 7 * 16..32 + 8 * 16], &[0xaa; 16]);
        assert_eq!(&bytes[160 + 15 * 16..416], &[0xbb; 16]);
        assert_eq!(bytes[512] & 0b11, 0b11);
        assert_eq!(xsave.region[200], 0xdead_beef, "words past the legacy region are kept");
    }
}
