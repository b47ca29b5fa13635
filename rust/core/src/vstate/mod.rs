//! The only part of kvmkit that talks to KVM.

/// Single-step and hardware breakpoints: what `KVM_SET_GUEST_DEBUG` gets, what its exits mean.
pub mod debug;
/// What a vCPU exit means for the run, as a pure function of the exit.
pub mod exit;
/// Guest exceptions reported by kvmkit's exception table, and the notes an exit carries about
/// the vCPU that ended the run.
pub mod fault;
/// The `/dev/kvm` system handle and the capabilities kvmkit needs.
pub mod kvm;
/// Guest RAM: regions, validation, bounds-checked access.
pub mod memory;
/// A vCPU's registers without a system call where KVM allows it, also from the handler of its exit.
pub mod regs;
/// The vCPU run loop on its own thread, and how other threads kick it out of `KVM_RUN`.
pub mod runner;
#[cfg(test)]
pub(crate) mod test_util;
/// One vCPU: its file descriptor and register state.
pub mod vcpu;
/// The VM file descriptor with its memory slots and optional in-kernel devices.
pub mod vm;
