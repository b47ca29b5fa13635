use std::sync::{Arc, Mutex};

use kvm_bindings::{CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Cap;

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

    /// Creates an empty VM.
    pub fn create_vm(&self) -> Result<kvm_ioctls::VmFd> {
        self.fd.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))
    }
}
