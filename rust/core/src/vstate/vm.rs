use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_CLOCK_REALTIME,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
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
    /// Whether KVM emulates the PIC, IOAPIC and LAPICs.
    irqchip: bool,
    /// Whether KVM emulates the PIT.
    pit: bool,
    /// Whether `KVM_SET_CLOCK` can advance the clock by the host's real time itself.
    clock_realtime: bool,
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
        let clock_realtime = fd.check_extension_int(Cap::AdjustClock) as u32 & KVM_CLOCK_REALTIME != 0;
        let (irqchip, pit) = (config.irqchip, config.pit);
        let vm = Self { fd, memory, dirty_logging: AtomicBool::new(false), irqchip, pit, clock_realtime };
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

/// The VM-wide KVM state: interrupt controllers, PIT and clock. Plain data, for serde.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The PICs and the IOAPIC, when the VM has KVM's irqchip.
    pub irqchip: Option<IrqchipState>,
    /// The PIT, when the VM has KVM's.
    pub pit: Option<kvm_pit_state2>,
    /// The guest's clock.
    pub clock: ClockState,
}

/// The interrupt controllers of KVM's irqchip (the LAPICs are per vCPU).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
}

/// The guest's KVM clock at one moment, with the host's wall-clock time then.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClockState {
    /// What `KVM_GET_CLOCK` returned: the clock in nanoseconds and, with `KVM_CLOCK_REALTIME` in
    /// its flags, the host's `CLOCK_REALTIME` at the same instant.
    pub clock: kvm_clock_data,
    /// The host's `CLOCK_REALTIME` in nanoseconds, read right after the clock.
    pub realtime_ns: u64,
}

/// How a restore sets the guest's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockRestore {
    /// To the saved value: the guest sees no time pass between save and restore (pause and
    /// resume).
    AsSaved,
    /// To the saved value plus the host's real time elapsed since the save, so that the guest's
    /// wall clock is right afterwards (restoring a snapshot, forking).
    Advance,
}

/// Saving and restoring the VM-wide state.
impl Vm {
    /// Whether KVM emulates the PIC, IOAPIC and LAPICs.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Whether KVM emulates the PIT.
    pub fn has_pit(&self) -> bool {
        self.pit
    }

    /// Captures the interrupt controllers, the PIT and the clock. The vCPUs must be out of
    /// `KVM_RUN`.
    pub fn save_state(&self) -> Result<VmState> {
        let irqchip = if self.irqchip {
            Some(IrqchipState {
                pic_master: self.irqchip_state(KVM_IRQCHIP_PIC_MASTER)?,
                pic_slave: self.irqchip_state(KVM_IRQCHIP_PIC_SLAVE)?,
                ioapic: self.irqchip_state(KVM_IRQCHIP_IOAPIC)?,
            })
        } else {
            None
        };
        let pit = self.pit.then(|| self.fd.get_pit2().map_err(Error::kvm("KVM_GET_PIT2"))).transpose()?;
        Ok(VmState { irqchip, pit, clock: self.clock()? })
    }

    /// Puts back a state [`save_state`](Self::save_state) captured, from this VM or one built
    /// from the same configuration, and sets the clock as `clock` says. The vCPUs must be out of
    /// `KVM_RUN`; their state goes back after this.
    pub fn restore_state(&self, state: &VmState, clock: ClockRestore) -> Result<()> {
        let has = |what: &str, saved: bool, mine: bool| {
            let with = |present: bool| if present { "with" } else { "without" };
            if saved == mine {
                Ok(())
            } else {
                Err(Error::InvalidConfig(format!(
                    "the VM state is of a VM {} {what}, and this VM is {} it",
                    with(saved),
                    with(mine)
                )))
            }
        };
        has("KVM's irqchip (irqchip=True)", state.irqchip.is_some(), self.irqchip)?;
        has("KVM's PIT (pit=True)", state.pit.is_some(), self.pit)?;
        if let Some(chips) = &state.irqchip {
            for chip in [&chips.pic_master, &chips.pic_slave, &chips.ioapic] {
                self.fd.set_irqchip(chip).map_err(Error::kvm("KVM_SET_IRQCHIP"))?;
            }
        }
        if let Some(pit) = &state.pit {
            self.fd.set_pit2(pit).map_err(Error::kvm("KVM_SET_PIT2"))?;
        }
        match clock {
            ClockRestore::AsSaved => self.set_clock(&state.clock),
            ClockRestore::Advance => self.advance_clock(&state.clock),
        }
    }

    /// The guest's clock now, with the host's wall-clock time.
    pub fn clock(&self) -> Result<ClockState> {
        let clock = self.fd.get_clock().map_err(Error::kvm("KVM_GET_CLOCK"))?;
        Ok(ClockState { clock, realtime_ns: realtime_ns() })
    }

    /// Sets the guest's clock back to `saved`, as if no time had passed since.
    pub fn set_clock(&self, saved: &ClockState) -> Result<()> {
        let data = kvm_clock_data { clock: saved.clock.clock, ..Default::default() };
        self.fd.set_clock(&data).map_err(Error::kvm("KVM_SET_CLOCK"))
    }

    /// Sets the guest's clock to `saved` plus the host's real time elapsed since then (never
    /// less than `saved`: the host's wall clock may have stepped back).
    pub fn advance_clock(&self, saved: &ClockState) -> Result<()> {
        let data = advanced_clock(saved, self.clock_realtime, realtime_ns());
        self.fd.set_clock(&data).map_err(Error::kvm("KVM_SET_CLOCK"))
    }

    fn irqchip_state(&self, chip_id: u32) -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        self.fd.get_irqchip(&mut chip).map_err(Error::kvm("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }
}

/// What to give `KVM_SET_CLOCK` so that the guest's clock is `saved` advanced by the real time
/// elapsed since, given the host's `CLOCK_REALTIME` now (`now_ns`).
fn advanced_clock(saved: &ClockState, kvm_adds_realtime: bool, now_ns: u64) -> kvm_clock_data {
    if kvm_adds_realtime && saved.clock.flags & KVM_CLOCK_REALTIME != 0 {
        // KVM adds the time elapsed since `realtime` itself, at the instant it sets the clock,
        // and from a reading of the host's time taken together with the saved clock.
        kvm_clock_data {
            clock: saved.clock.clock,
            realtime: saved.clock.realtime,
            flags: KVM_CLOCK_REALTIME,
            ..Default::default()
        }
    } else {
        let elapsed = now_ns.saturating_sub(saved.realtime_ns);
        kvm_clock_data { clock: saved.clock.clock.saturating_add(elapsed), ..Default::default() }
    }
}

/// The host's `CLOCK_REALTIME` in nanoseconds since the epoch.
fn realtime_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos() as u64)
}

/// A non-blocking eventfd.
pub fn new_eventfd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| Error::kvm("eventfd")(vmm_sys_util::errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO))))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::vstate::test_util::{kvm, Guest};

    const MS: u64 = 1_000_000;

    /// The PIT channels as they can be compared: without the host time each count was loaded at,
    /// which KVM sets anew when it loads one.
    fn pit_channels(pit: &kvm_pit_state2) -> Vec<kvm_bindings::kvm_pit_channel_state> {
        pit.channels
            .iter()
            .map(|channel| kvm_bindings::kvm_pit_channel_state { count_load_time: 0, ..*channel })
            .collect()
    }

    #[test]
    fn advancing_adds_the_real_time_elapsed_or_has_kvm_add_it() {
        let clock =
            kvm_clock_data { clock: 5_000, realtime: 1_000_000, flags: KVM_CLOCK_REALTIME, ..Default::default() };
        let saved = ClockState { clock, realtime_ns: 1_000_100 };
        let by_kvm = advanced_clock(&saved, true, 9_000_000);
        assert_eq!((by_kvm.clock, by_kvm.realtime, by_kvm.flags), (5_000, 1_000_000, KVM_CLOCK_REALTIME));
        let by_us = advanced_clock(&saved, false, 1_500_100);
        assert_eq!((by_us.clock, by_us.flags), (505_000, 0));
        let without_flag = ClockState { clock: kvm_clock_data { flags: 0, ..clock }, ..saved };
        assert_eq!(advanced_clock(&without_flag, true, 1_500_100).clock, 505_000);
        assert_eq!(advanced_clock(&saved, false, 900_000).clock, 5_000, "a host clock stepped back moves nothing");
    }

    #[test]
    fn irqchip_and_pit_state_round_trip() {
        let Some(kvm) = kvm() else { return };
        let guest = Guest::new(&kvm, true, &[0xf4]);
        let vm = &guest.vm;
        let saved = vm.save_state().unwrap();
        let chips = saved.irqchip.as_ref().expect("the VM has KVM's irqchip");
        assert_eq!(
            [chips.pic_master.chip_id, chips.pic_slave.chip_id, chips.ioapic.chip_id],
            [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC]
        );
        let saved_pit = saved.pit.expect("the VM has KVM's PIT");

        // Change every part.
        let mut pic = chips.pic_master;
        pic.chip.pic.imr = 0x5a;
        vm.fd().set_irqchip(&pic).unwrap();
        let mut ioapic = chips.ioapic;
        // SAFETY: the IOAPIC's member of the union is the one KVM filled (chip id 2), all plain
        // integers; this writes one of them.
        unsafe { ioapic.chip.ioapic.redirtbl[3].bits = 0x1_0035 };
        ioapic.chip.ioapic.id = 7;
        vm.fd().set_irqchip(&ioapic).unwrap();
        let mut pit = saved_pit;
        pit.channels[0].count = 0x1234;
        pit.channels[0].mode = 2;
        vm.fd().set_pit2(&pit).unwrap();
        let changed = vm.save_state().unwrap();
        let changed_chips = changed.irqchip.as_ref().unwrap();
        // SAFETY: the chip ids say which member KVM filled; both are plain integers.
        let (imr, redirection, id) = unsafe {
            (
                changed_chips.pic_master.chip.pic.imr,
                changed_chips.ioapic.chip.ioapic.redirtbl[3].bits,
                changed_chips.ioapic.chip.ioapic.id,
            )
        };
        assert_eq!((imr, redirection, id), (0x5a, 0x1_0035, 7));
        assert_eq!((changed.pit.unwrap().channels[0].count, changed.pit.unwrap().channels[0].mode), (0x1234, 2));

        // Back, from the state as it comes out of a state file.
        let decoded: VmState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        vm.restore_state(&decoded, ClockRestore::AsSaved).unwrap();
        let restored = vm.save_state().unwrap();
        let json = |value: &VmState| serde_json::to_value(&value.irqchip).unwrap();
        assert_eq!(json(&restored), json(&saved));
        assert_eq!(pit_channels(&restored.pit.unwrap()), pit_channels(&saved_pit));
        assert_eq!(restored.pit.unwrap().flags, saved_pit.flags);
    }

    #[test]
    fn a_state_from_a_vm_of_another_shape_is_refused() {
        let Some(kvm) = kvm() else { return };
        let plain = Guest::new(&kvm, false, &[0xf4]);
        let full = Guest::new(&kvm, true, &[0xf4]);
        let error = full.vm.restore_state(&plain.vm.save_state().unwrap(), ClockRestore::AsSaved).unwrap_err();
        assert!(error.to_string().contains("of a VM without KVM's irqchip"), "{error}");
        let error = plain.vm.restore_state(&full.vm.save_state().unwrap(), ClockRestore::AsSaved).unwrap_err();
        assert!(error.to_string().contains("of a VM with KVM's irqchip"), "{error}");
        assert!(plain.vm.save_state().unwrap().pit.is_none());
    }

    #[test]
    fn the_clock_stands_still_as_saved_and_catches_up_when_advanced() {
        let Some(kvm) = kvm() else { return };
        let guest = Guest::new(&kvm, false, &[0xf4]);
        let vm = &guest.vm;
        let saved = vm.save_state().unwrap();
        let guest_ns = |vm: &Vm| vm.fd().get_clock().unwrap().clock;
        std::thread::sleep(Duration::from_millis(300));
        assert!(guest_ns(vm) >= saved.clock.clock.clock + 300 * MS, "the guest clock runs meanwhile");

        vm.restore_state(&saved, ClockRestore::AsSaved).unwrap();
        let stood = guest_ns(vm) - saved.clock.clock.clock;
        assert!(stood < 50 * MS, "as saved, the guest saw {stood} ns pass");

        let before = realtime_ns() - saved.clock.realtime_ns;
        vm.restore_state(&saved, ClockRestore::Advance).unwrap();
        let advanced = guest_ns(vm) - saved.clock.clock.clock;
        let after = realtime_ns() - saved.clock.realtime_ns;
        assert!(before >= 300 * MS);
        assert!(
            (before..after + 5 * MS).contains(&advanced),
            "advanced by {advanced} ns, while {before}..{after} ns of real time passed"
        );
    }
}
