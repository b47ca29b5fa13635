use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::Cap;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;

use crate::error::{Error, Result};

/// Capabilities every VM needs, with the names users see in errors.
const REQUIRED: [(Cap, &str); 5] = [
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// An open `/dev/kvm` that passed kvmkit's checks, with what it reports cached.
pub struct Kvm {
    fd: kvm_ioctls::Kvm,
    supported_cpuid: CpuId,
    max_vcpus: usize,
    max_memslots: usize,
    /// `KVM_GET_MSR_INDEX_LIST`, asked on first use.
    msr_index_list: OnceLock<Vec<u32>>,
}

/// Ioctl numbers kvm-ioctls does not expose.
mod ioctl_numbers {
    use kvm_bindings::{kvm_msr_list, KVMIO};

    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
}

impl Kvm {
    /// Opens `/dev/kvm` and checks the API version and the capabilities every VM needs.
    pub fn open() -> Result<Self> {
        let fd = kvm_ioctls::Kvm::new().map_err(|e| Error::KvmUnavailable(e.into()))?;
        let version = fd.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(Error::KvmApiVersion(version));
        }
        let kvm = Self {
            supported_cpuid: fd
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?,
            max_vcpus: fd.get_max_vcpus(),
            max_memslots: fd.get_nr_memslots(),
            msr_index_list: OnceLock::new(),
            fd,
        };
        for (cap, name) in REQUIRED {
            kvm.require(cap, name)?;
        }
        Ok(kvm)
    }

    /// The process-wide handle, opened on first use. Every VM shares it, as it only creates VMs
    /// and answers queries.
    pub fn shared() -> Result<Arc<Self>> {
        static SHARED: Mutex<Option<Arc<Kvm>>> = Mutex::new(None);
        let mut shared = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(kvm) = shared.as_ref() {
            return Ok(kvm.clone());
        }
        let kvm = Arc::new(Self::open()?);
        *shared = Some(kvm.clone());
        Ok(kvm)
    }

    /// Fails with [`Error::MissingCapability`] unless KVM has `cap`.
    pub fn require(&self, cap: Cap, name: &'static str) -> Result<()> {
        if self.fd.check_extension(cap) {
            Ok(())
        } else {
            Err(Error::MissingCapability(name))
        }
    }

    /// The most vCPUs one VM may have.
    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    /// The most memory slots one VM may have.
    pub fn max_memslots(&self) -> usize {
        self.max_memslots
    }

    /// The CPUID KVM can present to guests, before per-vCPU normalization.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// The MSRs KVM saves and restores for a vCPU (`KVM_GET_MSR_INDEX_LIST`), in KVM's order.
    /// A vCPU may still refuse some of them, depending on its CPUID and the VM's devices.
    pub fn msr_index_list(&self) -> Result<&[u32]> {
        if let Some(list) = self.msr_index_list.get() {
            return Ok(list);
        }
        let list = read_msr_index_list(&self.fd).map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(self.msr_index_list.get_or_init(|| list))
    }

    /// Creates an empty VM.
    pub fn create_vm(&self) -> Result<kvm_ioctls::VmFd> {
        self.fd.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))
    }
}

/// Reads the whole MSR index list. kvm-ioctls' own call stops at `KVM_MAX_MSR_ENTRIES`; KVM says
/// how many it has when the buffer is short (`E2BIG`), so this asks again with room for all.
fn read_msr_index_list(kvm: &kvm_ioctls::Kvm) -> std::result::Result<Vec<u32>, errno::Error> {
    let mut room = KVM_MAX_MSR_ENTRIES;
    loop {
        // A `kvm_msr_list`: the count (`nmsrs`), then the indices.
        let mut list = vec![0u32; 1 + room];
        list[0] = room as u32;
        // SAFETY: `list` is a `kvm_msr_list` header followed by room for `nmsrs` indices; KVM
        // writes at most `nmsrs` of them and sets `nmsrs` to how many it has.
        let status = unsafe { ioctl_with_mut_ptr(kvm, ioctl_numbers::KVM_GET_MSR_INDEX_LIST(), list.as_mut_ptr()) };
        let count = list[0] as usize;
        if status < 0 {
            let error = errno::Error::last();
            if error.errno() == libc::E2BIG && count > room {
                room = count;
                continue;
            }
            return Err(error);
        }
        list.truncate(1 + count.min(room));
        list.remove(0);
        return Ok(list);
    }
}
