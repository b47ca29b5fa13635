use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::irq::IrqLine;
use crate::vstate::kvm::Kvm;
use crate::vstate::memory::{self, GuestMemory};

/// A KVM VM with its guest memory registered.
pub struct Vm {
    fd: VmFd,
    memory: Arc<GuestMemory>,
    /// Whether KVM logs the pages the guest writes (from the first snapshot on).
    dirty_logging: AtomicBool,
}

impl Vm {
    /// Creates the VM, maps and registers its memory, and creates the in-kernel irqchip and PIT
    /// when the configuration asks for them (both must exist before the first vCPU).
    pub fn new(kvm: &Kvm, config: &MachineConfig) -> Result<Self> {
        let memory = memory::create(&config.memory, kvm.max_memslots())?;
        Self::with_memory(kvm, config, memory)
    }

    /// Like [`new`](Self::new), over memory made already (from a snapshot's image, say). Such
    /// memory's content is tracked from the start, so KVM logs the pages the guest writes.
    pub fn with_memory(kvm: &Kvm, config: &MachineConfig, memory: GuestMemory) -> Result<Self> {
        if config.pit && !config.irqchip {
            return Err(Error::InvalidConfig("the in-kernel PIT needs the in-kernel irqchip (irqchip=True)".into()));
        }
        let memory = Arc::new(memory);
        let fd = kvm.create_vm()?;
        fd.set_tss_address(KVM_TSS_ADDR as usize).map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR).map_err(Error::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        let vm = Self { fd, memory, dirty_logging: AtomicBool::new(false) };
        vm.register_memory(vm.memory.is_tracked())?;
        if config.irqchip {
            kvm.require(Cap::Irqchip, "KVM_CAP_IRQCHIP")?;
            vm.fd.create_irq_chip().map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        }
        if config.pit {
            kvm.require(Cap::Pit2, "KVM_CAP_PIT2")?;
            let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            vm.fd.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
        }
        Ok(vm)
    }

    /// Registers every memory region as a KVM slot (slot numbers follow the regions' order), with
    /// the guest's writes logged when `log_dirty`. Registering a slot again changes its flags.
    fn register_memory(&self, log_dirty: bool) -> Result<()> {
        let flags = if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the slot describes a live mapping owned by `memory`, which this Vm keeps
            // alive for at least as long as the VM fd (fields drop in declaration order, so the fd
            // and its slots go first). The mapping stays at its address for the memory's life.
            unsafe { self.fd.set_user_memory_region(slot) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        self.dirty_logging.store(log_dirty, Ordering::Relaxed);
        Ok(())
    }

    /// The pages the guest wrote since the last call, per memory slot, as KVM's dirty log bitmaps;
    /// the first call starts the logging and reports nothing.
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>> {
        if !self.dirty_logging.load(Ordering::Relaxed) {
            self.register_memory(true)?;
            return Ok(Vec::new());
        }
        (0..self.memory.num_regions())
            .zip(self.memory.iter())
            .map(|(slot, region)| {
                self.fd.get_dirty_log(slot as u32, region.len() as usize).map_err(Error::kvm("KVM_GET_DIRTY_LOG"))
            })
            .collect()
    }

    /// An interrupt line into the in-kernel irqchip for `gsi`: writing to it injects the interrupt.
    pub fn irq_line(&self, gsi: u32) -> Result<IrqLine> {
        let event = new_eventfd()?;
        self.fd.register_irqfd(&event, gsi).map_err(Error::kvm("KVM_IRQFD"))?;
        Ok(IrqLine(event))
    }

    /// Has KVM signal `notifiers[i]`, without a VMM exit, when the guest writes the 32-bit value
    /// `i` to the MMIO address `addr` (ioeventfds). All or none are registered.
    pub fn register_queue_notifiers(&self, addr: u64, notifiers: &[EventFd]) -> Result<()> {
        let addr = IoEventAddress::Mmio(addr);
        for (index, notifier) in notifiers.iter().enumerate() {
            if let Err(e) = self.fd.register_ioevent(notifier, &addr, index as u32) {
                for (done, registered) in notifiers[..index].iter().enumerate() {
                    let _ = self.fd.unregister_ioevent(registered, &addr, done as u32);
                }
                return Err(Error::kvm("KVM_IOEVENTFD")(e));
            }
        }
        Ok(())
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory, shared with whoever needs to outlive a borrow of the VM.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }
}

/// A non-blocking eventfd.
pub fn new_eventfd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| Error::kvm("eventfd")(vmm_sys_util::errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO))))
}
