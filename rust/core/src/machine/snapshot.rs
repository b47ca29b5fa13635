//! Pause, resume, snapshot and restore of a [`Machine`].
//!
//! A snapshot is taken and restored with every vCPU out of `KVM_RUN` and the device event loop
//! parked, so nothing changes guest memory or device state meanwhile. Restoring copies back only
//! the memory pages written since the snapshot (or since the last restore of it), then puts back
//! the VM's, the vCPUs' and the devices' state.

use std::time::Instant;

use super::{Machine, State};
use crate::devices::virtio::Parked;
use crate::error::{Error, Result};
use crate::snapshot::{MachineSnapshot, MachineState, SavedDevice, SnapshotError, StateError};
use crate::vstate::exit::{AddressSpace, ExitReason};
use crate::vstate::memory::{GuestMemory, MemoryImage, RestoreStats};
use crate::vstate::vm::ClockRestore;

/// What a paused machine holds on to until it resumes.
pub(super) struct Pause {
    /// The guest's clock when it paused, put back on resume so that the guest sees no time pass;
    /// none once a restore has set the clock.
    clock: Option<crate::vstate::vm::ClockState>,
}

/// How long each part of a restore took.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreTimes {
    /// Reading the dirty logs and copying pages back.
    pub memory: std::time::Duration,
    /// The VM's state (irqchip, PIT, clock).
    pub vm: std::time::Duration,
    /// Every vCPU's state.
    pub vcpus: std::time::Duration,
    /// Every device's state.
    pub devices: std::time::Duration,
    /// What the memory restore did.
    pub memory_stats: RestoreStats,
}

impl Machine {
    /// Builds the VM `config` describes over memory with `image`'s content (a fork of a running
    /// VM, or a snapshot read from files), shared copy-on-write with whoever else maps it.
    pub fn from_image(config: &crate::MachineConfig, image: &MemoryImage) -> Result<Self> {
        let memory = GuestMemory::from_image(image).map_err(SnapshotError::from)?;
        Self::build(config, Some(memory))
    }

    /// Stops the run in progress, if any, with every vCPU's last instruction complete, and
    /// freezes the devices and the guest's clock until [`resume`](Self::resume). Pausing a paused
    /// VM does nothing.
    pub fn pause(&self) -> Result<()> {
        self.stop(ExitReason::Paused);
        if let Some(run) = self.lock().run.as_ref().map(|run| run.control.clone()) {
            run.wait(None);
        }
        let mut state = self.stopped_state()?;
        if state.pause.is_none() {
            let clock = self.vm.clock()?;
            // Parked until resumed, so that no device touches memory or raises an interrupt.
            if let Some(devices) = &state.device_loop {
                devices.park().map_err(Error::DeviceSetup)?;
            }
            state.pause = Some(Pause { clock: Some(clock) });
        }
        Ok(())
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.lock().pause.is_some()
    }

    /// Continues a paused VM: starts a run, as [`start`](Self::start) does (which also resumes).
    pub fn resume(&self) -> Result<()> {
        self.start()
    }

    /// Lets a paused VM's devices and clock go again; called when a run starts.
    pub(super) fn unpause(&self, state: &mut State) -> Result<()> {
        if let Some(pause) = state.pause.take() {
            if let Some(clock) = &pause.clock {
                self.vm.set_clock(clock)?;
            }
            if let Some(devices) = &state.device_loop {
                devices.unpark();
            }
        }
        Ok(())
    }

    /// Captures the whole state of the stopped or paused VM: its memory (as an image that shares
    /// pages with the VM), the VM's and each vCPU's KVM state, and every device that keeps state.
    /// Devices served by callbacks of the embedder keep their state there and are not saved.
    pub fn snapshot(&self) -> Result<MachineSnapshot> {
        let mut state = self.stopped_state()?;
        let guest_writes = self.guest_writes(&mut state)?;
        let _parked = park(&state)?;
        let vm = self.vm.save_state()?;
        let vcpus = state.vcpus.iter().map(|vcpu| vcpu.save_state()).collect::<Result<Vec<_>>>()?;
        let devices = state
            .io
            .devices()
            .filter_map(|(space, range, device)| {
                device.save_state().map(|state| SavedDevice { space, base: range.base(), len: range.len(), state })
            })
            .collect();
        let memory = self.memory().capture(guest_writes).map_err(SnapshotError::from)?;
        let state = MachineState { config: self.config.clone(), vm, vcpus, devices };
        Ok(MachineSnapshot { state, memory })
    }

    /// Puts the stopped or paused VM back to `snapshot`, which must come from a VM of the same
    /// configuration (this one, a fork of it, or one saved to files) with the same devices that
    /// keep state. Memory is made equal to the snapshot's, copying only what may differ. The
    /// guest's clock moves on by the time passed since the snapshot, so that its wall clock is
    /// right. A paused VM stays paused. Then the hooks added with [`on_restore`](Self::on_restore)
    /// run.
    pub fn restore(&self, snapshot: &MachineSnapshot) -> Result<RestoreTimes> {
        let times = self.restore_state(snapshot)?;
        // With the state unlocked and the interrupt controllers back: the hooks may raise
        // interrupts (a new VM generation id, say).
        self.run_restore_hooks();
        Ok(times)
    }

    fn restore_state(&self, snapshot: &MachineSnapshot) -> Result<RestoreTimes> {
        let mut state = self.stopped_state()?;
        let saved = &snapshot.state;
        self.check_shape(saved)?;
        let devices = Self::match_devices(&state, saved)?;
        if let Some(pause) = state.pause.as_mut() {
            pause.clock = None; // the restore sets the clock
        }
        let mut phase = Instant::now();
        let guest_writes = self.guest_writes(&mut state)?;
        let _parked = park(&state)?;
        let mut times = RestoreTimes::default();
        let mut lap = |slot: &mut std::time::Duration| {
            let now = Instant::now();
            *slot = now - phase;
            phase = now;
        };
        times.memory_stats = self.memory().restore(&snapshot.memory, guest_writes).map_err(SnapshotError::from)?;
        lap(&mut times.memory);
        self.vm.restore_state(&saved.vm, ClockRestore::Advance)?;
        lap(&mut times.vm);
        for (vcpu, saved) in state.vcpus.iter().zip(&saved.vcpus) {
            vcpu.restore_state(saved)?;
        }
        lap(&mut times.vcpus);
        for (device, saved) in devices {
            device.restore_state(&saved.state).map_err(|e| restore_error(saved, e))?;
        }
        lap(&mut times.devices);
        Ok(times)
    }

    /// KVM's log of the pages the guest wrote since the last call. Skipped when no vCPU ran since
    /// (a VM just made from a snapshot, or restored again without running): KVM writes guest
    /// memory only for running vCPUs, and reading the log costs a scan of all of memory.
    fn guest_writes(&self, state: &mut State) -> Result<Vec<Vec<u64>>> {
        if !std::mem::take(&mut state.ran_since_dirty_log) && self.memory().is_tracked() {
            return Ok(Vec::new());
        }
        self.vm.take_dirty_log()
    }

    /// Fails unless `saved` comes from a VM of this one's shape.
    fn check_shape(&self, saved: &MachineState) -> Result<()> {
        let (mine, theirs) = (&self.config, &saved.config);
        let mismatch = |what: &str, theirs: String, mine: String| {
            let what = if what.is_empty() { String::new() } else { format!("{what} ") };
            Err(SnapshotError::Mismatch(format!(
                "the snapshot is of a VM with {what}{theirs}, this one has {what}{mine}"
            ))
            .into())
        };
        if theirs.vcpus != mine.vcpus || saved.vcpus.len() != self.vcpu_count {
            return mismatch("vCPUs", saved.vcpus.len().to_string(), self.vcpu_count.to_string());
        }
        if theirs.memory != mine.memory {
            return mismatch("memory", format!("{:x?}", theirs.memory), format!("{:x?}", mine.memory));
        }
        if (theirs.irqchip, theirs.pit) != (mine.irqchip, mine.pit) {
            let shape = |c: &crate::MachineConfig| format!("irqchip={} pit={}", c.irqchip, c.pit);
            return mismatch("", shape(theirs), shape(mine));
        }
        Ok(())
    }

    /// Pairs each saved device with the device at its place on this VM's buses.
    fn match_devices<'a>(
        state: &State,
        saved: &'a MachineState,
    ) -> Result<Vec<(std::sync::Arc<dyn crate::BusDevice>, &'a SavedDevice)>> {
        saved
            .devices
            .iter()
            .map(|saved| match state.io.device_at(saved.space, saved.base) {
                Some((range, device)) if range.len() == saved.len => Ok((device, saved)),
                _ => Err(restore_error(
                    saved,
                    StateError::new(format!("this VM has no such device at {} {:#x}", saved.space, saved.base)),
                )),
            })
            .collect()
    }
}

/// Keeps the device event loop, if any, parked while the guard lives (a paused VM's stays parked).
fn park(state: &State) -> Result<Option<Parked<'_>>> {
    state.device_loop.as_ref().map(|devices| devices.parked()).transpose().map_err(Error::DeviceSetup)
}

fn restore_error(saved: &SavedDevice, error: StateError) -> Error {
    let space = match saved.space {
        AddressSpace::Pio => "port",
        AddressSpace::Mmio => "MMIO",
    };
    SnapshotError::DeviceState(format!("the {} at {space} {:#x}: {error}", saved.state.kind(), saved.base)).into()
}
