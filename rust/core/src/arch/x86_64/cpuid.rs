use std::str::FromStr;

use kvm_bindings::kvm_cpuid_entry2;
use thiserror::Error;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
/// KVM's signature leaf: EAX is the highest hypervisor leaf, EBX..EDX "KVMKVMKVM".
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
/// The timing leaf hypervisors agree on: EAX the TSC and EBX the LAPIC bus frequency, in kHz.
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
/// KVM's LAPIC timer counts at 1 GHz.
const KVM_APIC_BUS_KHZ: u32 = 1_000_000;
const EDX_HTT: u32 = 1 << 28;
/// "Running under a hypervisor": without it Linux never looks for KVM's leaves, so never uses
/// kvm-clock and cannot calibrate its TSC on a VM without HPET. KVM does not report it as
/// supported (some paravirtualized KVMs do).
const ECX_HYPERVISOR: u32 = 1 << 31;
/// The LAPIC timer's TSC-deadline mode: KVM emulates it with an in-kernel LAPIC, but leaves
/// announcing it to the VMM.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// One of the four output registers of a CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// An unknown register name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown CPUID register {0:?} (expected eax, ebx, ecx or edx)")]
pub struct UnknownRegister(pub String);

impl FromStr for CpuidRegister {
    type Err = UnknownRegister;

    fn from_str(name: &str) -> Result<Self, UnknownRegister> {
        match name.to_ascii_lowercase().as_str() {
            "eax" => Ok(Self::Eax),
            "ebx" => Ok(Self::Ebx),
            "ecx" => Ok(Self::Ecx),
            "edx" => Ok(Self::Edx),
            _ => Err(UnknownRegister(name.to_owned())),
        }
    }
}

/// A caller's change to the CPUID a vCPU reports: clear then set bits of one register of one leaf
/// (every subleaf, or only `subleaf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuidEdit {
    /// The leaf (EAX input).
    pub leaf: u32,
    /// The subleaf (ECX input), or `None` for all of them.
    pub subleaf: Option<u32>,
    /// The register to change.
    pub register: CpuidRegister,
    /// Bits to clear.
    pub clear: u32,
    /// Bits to set (after clearing).
    pub set: u32,
}

impl CpuidEdit {
    /// Applies the edit to every matching entry.
    pub fn apply(&self, entries: &mut [kvm_cpuid_entry2]) {
        let matching =
            entries.iter_mut().filter(|e| e.function == self.leaf && self.subleaf.is_none_or(|s| s == e.index));
        for entry in matching {
            let register = match self.register {
                CpuidRegister::Eax => &mut entry.eax,
                CpuidRegister::Ebx => &mut entry.ebx,
                CpuidRegister::Ecx => &mut entry.ecx,
                CpuidRegister::Edx => &mut entry.edx,
            };
            *register = (*register & !self.clear) | self.set;
        }
    }
}

/// What a vCPU's CPUID says beyond the host's supported set: who it is and what the VM has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuPlatform {
    /// The vCPU's index, which is also its APIC id.
    pub index: u32,
    /// How many vCPUs the VM has (one package of single-threaded cores).
    pub count: u32,
    /// The guest's TSC frequency, when KVM tells it.
    pub tsc_khz: Option<u32>,
    /// Whether the LAPIC is KVM's (and KVM has its TSC-deadline timer).
    pub tsc_deadline: bool,
}

/// Fills in what the host's supported CPUID cannot know: the vCPU's APIC id, the topology, the
/// hypervisor-present bit, the TSC-deadline timer and the TSC frequency (leaf 0x4000_0010, added
/// after KVM's own leaves when KVM reports them).
pub fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, platform: &VcpuPlatform) {
    let VcpuPlatform { index: apic_id, count, tsc_khz, tsc_deadline } = *platform;
    // Bits of the APIC id that number the cores.
    let core_bits = u32::BITS - (count.max(1) - 1).leading_zeros();
    let mut kvm_leaves = false;
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                } else {
                    entry.ecx &= !ECX_TSC_DEADLINE;
                }
            }
            LEAF_HYPERVISOR if tsc_khz.is_some() => {
                entry.eax = entry.eax.max(LEAF_HYPERVISOR_TIMING);
                kvm_leaves = true;
            }
            LEAF_CACHE => {
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level == 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | ((count - 1) << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                let (shift, processors, level) = match entry.index {
                    0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                    1 => (core_bits, count, TOPOLOGY_LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = processors;
                entry.ecx = (level << 8) | entry.index;
                entry.edx = apic_id;
            }
            LEAF_AMD_SIZES => entry.ecx = (entry.ecx & !0xff) | (count - 1),
            _ => {}
        }
    }
    if let (true, Some(khz)) = (kvm_leaves, tsc_khz) {
        entries.retain(|entry| entry.function != LEAF_HYPERVISOR_TIMING);
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR_TIMING,
            eax: khz,
            ebx: KVM_APIC_BUS_KHZ,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn platform(index: u32, count: u32) -> VcpuPlatform {
        VcpuPlatform { index, count, tsc_khz: None, tsc_deadline: false }
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_topology() {
        let mut entries = vec![leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2), leaf(0x8000_0008, 0)];
        normalize(&mut entries, &platform(3, 4));
        assert_eq!(entries[0].ebx >> 24, 3);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_eq!(entries[0].edx & EDX_HTT, EDX_HTT);
        assert_eq!((entries[1].eax, entries[1].ebx, entries[1].ecx, entries[1].edx), (0, 1, 0x100, 3));
        assert_eq!((entries[2].eax, entries[2].ebx, entries[2].ecx, entries[2].edx), (2, 4, 0x201, 3));
        assert_eq!((entries[3].ebx, entries[3].ecx >> 8), (0, 0));
        assert_eq!(entries[4].ecx & 0xff, 3);
    }

    #[test]
    fn a_single_vcpu_has_no_htt_and_zero_core_bits() {
        let mut entries = vec![leaf(1, 0), leaf(0xb, 1)];
        normalize(&mut entries, &platform(0, 1));
        assert_eq!((entries[0].ebx >> 24, entries[0].edx & EDX_HTT), (0, 0));
        assert_eq!((entries[1].eax, entries[1].ebx), (0, 1));
    }

    #[test]
    fn the_guest_learns_it_runs_on_a_hypervisor_and_its_timers() {
        let mut features = leaf(1, 0);
        features.ecx = 0;
        let mut entries = vec![features, leaf(LEAF_HYPERVISOR, 0)];
        entries[1].eax = 0x4000_0001;
        let with_lapic = VcpuPlatform { tsc_khz: Some(2_450_000), tsc_deadline: true, ..platform(0, 1) };
        normalize(&mut entries, &with_lapic);
        assert_eq!(entries[0].ecx, ECX_HYPERVISOR | ECX_TSC_DEADLINE);
        assert_eq!(entries[1].eax, LEAF_HYPERVISOR_TIMING);
        let timing = entries.iter().find(|e| e.function == LEAF_HYPERVISOR_TIMING).expect("timing leaf");
        assert_eq!((timing.eax, timing.ebx, timing.ecx, timing.edx), (2_450_000, KVM_APIC_BUS_KHZ, 0, 0));
        // Normalizing again (a later set_cpuid) keeps one timing leaf.
        normalize(&mut entries, &with_lapic);
        assert_eq!(entries.iter().filter(|e| e.function == LEAF_HYPERVISOR_TIMING).count(), 1);
    }

    #[test]
    fn no_timing_leaf_without_kvm_leaves_or_a_known_frequency() {
        let mut entries = vec![leaf(1, 0)];
        normalize(&mut entries, &VcpuPlatform { tsc_khz: Some(1000), ..platform(0, 1) });
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].ecx & (ECX_HYPERVISOR | ECX_TSC_DEADLINE), ECX_HYPERVISOR);
        let mut entries = vec![leaf(LEAF_HYPERVISOR, 0)];
        entries[0].eax = 0x4000_0001;
        normalize(&mut entries, &platform(0, 1));
        assert_eq!((entries.len(), entries[0].eax), (1, 0x4000_0001));
    }

    #[test]
    fn edits_clear_then_set_matching_entries() {
        let mut entries = [leaf(1, 0), leaf(7, 0), leaf(7, 1)];
        let edit = |subleaf| CpuidEdit { leaf: 7, subleaf, register: CpuidRegister::Ecx, clear: 0xff, set: 0x1 };
        edit(Some(1)).apply(&mut entries);
        assert_eq!((entries[1].ecx, entries[2].ecx), (0xffff_ffff, 0xffff_ff01));
        edit(None).apply(&mut entries);
        assert_eq!((entries[0].ecx, entries[1].ecx), (0xffff_ffff, 0xffff_ff01));
        assert_eq!("EDX".parse(), Ok(CpuidRegister::Edx));
        assert!("rax".parse::<CpuidRegister>().is_err());
    }
}
