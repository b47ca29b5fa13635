//! A vCPU's registers reached through its descriptor and its `kvm_run` mapping rather than through
//! the [`Vcpu`](crate::vstate::vcpu::Vcpu) value, so that the handler of an exit, which runs while the run
//! loop holds the vCPU, can read and change the registers of the vCPU whose access it serves.
//!
//! Where KVM has `KVM_CAP_SYNC_REGS`, the general registers live in `kvm_run` between runs: KVM
//! stores them there at every exit and takes them back at the next entry when they are marked
//! dirty, so reading or writing them costs no system call. Without it, each access is an ioctl.

use std::cell::Cell;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs, KVM_SYNC_X86_REGS};
use kvm_ioctls::{Cap, SyncReg, VcpuFd, VmFd};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use crate::error::{Error, Result};

/// The register ioctls, which kvm-ioctls offers only on its `VcpuFd`.
mod ioctls {
    use kvm_bindings::{kvm_regs, kvm_sregs, KVMIO};
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
}
use ioctls::{KVM_GET_REGS, KVM_GET_SREGS, KVM_SET_REGS, KVM_SET_SREGS};

/// One vCPU's register file: its descriptor and `kvm_run` mapping. A plain copyable handle; the
/// [`Vcpu`](crate::vstate::vcpu::Vcpu) it comes from must outlive every copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RegisterFile {
    fd: RawFd,
    run: NonNull<kvm_run>,
    /// Whether KVM keeps the general registers in `kvm_run` between runs.
    synced: bool,
}

// SAFETY: the handle points into the vCPU's `kvm_run` mapping, which lives as long as the vCPU;
// its owners use it only while the vCPU is out of `KVM_RUN`, from the one thread that holds the
// vCPU (or serves its exit), so no two threads touch the mapping at once.
unsafe impl Send for RegisterFile {}
// SAFETY: as for Send.
unsafe impl Sync for RegisterFile {}

impl RegisterFile {
    /// The register file of `fd`, asking KVM to keep the general registers in `kvm_run` when it
    /// can, and putting the current ones there.
    pub(crate) fn new(vm: &VmFd, fd: &mut VcpuFd) -> Result<Self> {
        let synced = vm.check_extension_int(Cap::SyncRegs) as u32 & KVM_SYNC_X86_REGS != 0;
        let run = NonNull::from(fd.get_kvm_run());
        let file = Self { fd: fd.as_raw_fd(), run, synced };
        if synced {
            fd.set_sync_valid_reg(SyncReg::Register);
            let regs = file.ioctl_regs()?;
            file.store(&regs);
        }
        Ok(file)
    }

    /// General-purpose registers, RIP and RFLAGS (with a write not yet taken by KVM included).
    pub fn regs(&self) -> Result<kvm_regs> {
        if !self.synced {
            return self.ioctl_regs();
        }
        // SAFETY: the mapping is live and not in `KVM_RUN` (see the type); the read goes through
        // a raw place, so it aliases no reference to other parts of `kvm_run`.
        Ok(unsafe { std::ptr::addr_of!((*self.run.as_ptr()).s.regs.regs).read() })
    }

    /// Sets the general registers; where they are synchronized, KVM takes them at the next entry.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        if !self.synced {
            return self.ioctl_set_regs(regs);
        }
        self.store(regs);
        self.mark_dirty(true);
        Ok(())
    }

    /// Sets the general registers at once, through the ioctl (whose place among other state
    /// writes matters: it drops a pending exception, say).
    pub fn set_regs_now(&self, regs: &kvm_regs) -> Result<()> {
        self.ioctl_set_regs(regs)?;
        if self.synced {
            self.store(regs);
            self.mark_dirty(false);
        }
        Ok(())
    }

    /// Hands KVM a register write it has not taken yet, before state it interacts with is read or
    /// written by ioctl; says whether there was one.
    pub fn flush(&self) -> Result<bool> {
        if !(self.synced && self.dirty()) {
            return Ok(false);
        }
        self.set_regs_now(&self.regs()?)?;
        Ok(true)
    }

    /// Segment, control and descriptor-table registers.
    pub fn sregs(&self) -> Result<kvm_sregs> {
        let mut sregs = kvm_sregs::default();
        // SAFETY: the descriptor is a vCPU's, and KVM writes exactly one `kvm_sregs`.
        let status = unsafe { ioctl_with_mut_ref(&self.borrow_fd(), KVM_GET_SREGS(), &mut sregs) };
        check(status, "KVM_GET_SREGS").map(|()| sregs)
    }

    /// Sets segment, control and descriptor-table registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        // SAFETY: the descriptor is a vCPU's, and KVM reads exactly one `kvm_sregs`.
        let status = unsafe { ioctl_with_ref(&self.borrow_fd(), KVM_SET_SREGS(), sregs) };
        check(status, "KVM_SET_SREGS")
    }

    fn ioctl_regs(&self) -> Result<kvm_regs> {
        let mut regs = kvm_regs::default();
        // SAFETY: the descriptor is a vCPU's, and KVM writes exactly one `kvm_regs`.
        let status = unsafe { ioctl_with_mut_ref(&self.borrow_fd(), KVM_GET_REGS(), &mut regs) };
        check(status, "KVM_GET_REGS").map(|()| regs)
    }

    fn ioctl_set_regs(&self, regs: &kvm_regs) -> Result<()> {
        // SAFETY: the descriptor is a vCPU's, and KVM reads exactly one `kvm_regs`.
        let status = unsafe { ioctl_with_ref(&self.borrow_fd(), KVM_SET_REGS(), regs) };
        check(status, "KVM_SET_REGS")
    }

    fn borrow_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the vCPU, which owns the descriptor, outlives this handle (see the type).
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }

    fn store(&self, regs: &kvm_regs) {
        // SAFETY: as in `regs`.
        unsafe { std::ptr::addr_of_mut!((*self.run.as_ptr()).s.regs.regs).write(*regs) }
    }

    fn dirty(&self) -> bool {
        // SAFETY: as in `regs`.
        let dirty = unsafe { std::ptr::addr_of!((*self.run.as_ptr()).kvm_dirty_regs).read() };
        dirty & u64::from(KVM_SYNC_X86_REGS) != 0
    }

    fn mark_dirty(&self, dirty: bool) {
        // SAFETY: as in `regs`.
        unsafe {
            let flags = std::ptr::addr_of_mut!((*self.run.as_ptr()).kvm_dirty_regs);
            let others = flags.read() & !u64::from(KVM_SYNC_X86_REGS);
            flags.write(if dirty { others | u64::from(KVM_SYNC_X86_REGS) } else { others });
        }
    }
}

fn check(status: i32, ioctl: &'static str) -> Result<()> {
    if status < 0 {
        return Err(Error::kvm(ioctl)(errno::Error::last()));
    }
    Ok(())
}

thread_local! {
    /// The vCPU this thread runs, whose exits it serves: its index and register file.
    static SERVING: Cell<Option<(u32, RegisterFile)>> = const { Cell::new(None) };
}

/// Marks the calling thread as running vCPU `index` until the guard drops, so that the handlers
/// of its exits can reach that vCPU's registers through [`serving`].
pub(crate) fn serve_exit(index: u32, file: RegisterFile) -> ServingGuard {
    SERVING.with(|cell| cell.set(Some((index, file))));
    ServingGuard
}

/// The register file of vCPU `index`, if the calling thread runs it (and so serves its exits).
pub(crate) fn serving(index: u32) -> Option<RegisterFile> {
    SERVING.with(Cell::get).filter(|(serving, _)| *serving == index).map(|(_, file)| file)
}

/// The index of the vCPU the calling thread runs, if any.
pub(crate) fn serving_vcpu() -> Option<u32> {
    SERVING.with(Cell::get).map(|(index, _)| index)
}

/// Ends what [`serve_exit`] began.
pub(crate) struct ServingGuard;

impl Drop for ServingGuard {
    fn drop(&mut self) {
        SERVING.with(|cell| cell.set(None));
    }
}
