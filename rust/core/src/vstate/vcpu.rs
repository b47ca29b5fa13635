use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::arch::x86_64::cpuid::{self, CpuidEdit};
use crate::error::{Error, Result};
use crate::vstate::exit::InternalError;

/// One vCPU of a VM. Its registers can be read and written while it is not running.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and gives it the host's supported CPUID, normalized for
    /// its APIC id and the topology, then `edits`.
    pub fn new(vm: &VmFd, index: u32, count: u32, supported: &CpuId, edits: &[CpuidEdit]) -> Result<Self> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let vcpu = Self { index, fd };
        let mut entries = supported.as_slice().to_vec();
        cpuid::normalize(&mut entries, index, count);
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

    /// x87 and SSE state.
    pub fn fpu(&self) -> Result<kvm_fpu> {
        self.fd.get_fpu().map_err(Error::kvm("KVM_GET_FPU"))
    }

    /// Sets x87 and SSE state.
    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        self.fd.set_fpu(fpu).map_err(Error::kvm("KVM_SET_FPU"))
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
        let entries: Vec<_> = values.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| too_many_msrs(values.len()))?;
        let written = self.fd.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        match values.get(written) {
            Some((index, data)) => Err(Error::InvalidConfig(format!("KVM refused to set MSR {index:#x} to {data:#x}"))),
            None => Ok(()),
        }
    }

    /// The CPUID the vCPU reports.
    pub fn cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        let cpuid = self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_CPUID2"))?;
        Ok(cpuid.as_slice().to_vec())
    }

    /// Replaces the CPUID the vCPU reports (KVM accepts this only before the vCPU first runs).
    pub fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<()> {
        let cpuid = CpuId::from_entries(entries)
            .map_err(|_| Error::InvalidConfig(format!("{} CPUID entries are more than KVM takes ({KVM_MAX_CPUID_ENTRIES})", entries.len())))?;
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

fn too_many_msrs(count: usize) -> Error {
    Error::InvalidConfig(format!("{count} MSRs are more than one KVM call takes"))
}
