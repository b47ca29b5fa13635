//! The VMM core of kvmkit: KVM virtual machines with guest memory, vCPUs that run on their own
//! threads, and an I/O bus that serves the guest's port I/O and MMIO from devices.
//!
//! The crate has no Python in it; `kvmkit-python` is a thin binding on top. The layout follows the
//! architecture:
//!
//! - [`arch`]: x86-64 boot structures (layout, GDT, page tables, CPU modes, CPUID).
//! - [`boot`]: loading a Linux kernel, its boot parameters and initramfs.
//! - [`vstate`]: the only place that talks to KVM (system handle, VM, vCPU, exit handling).
//! - [`bus`]: one address-range bus type for port I/O and for MMIO.
//! - [`devices`]: devices that sit on a bus, and the virtio devices (`devices::virtio`) whose
//!   queues are served on an event-loop thread.
//! - [`linux`]: the PC platform a Linux guest boots on.
//! - [`machine`]: a VM assembled from a [`MachineConfig`], with its run lifecycle.
//! - [`gdb`]: a gdb server for a machine.
//! - [`snapshot`]: how each part of a VM saves and restores its own state.
//! - [`ratelimit`]: keeps messages the guest can cause from flooding the host's log.

pub mod arch;
pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod error;
pub mod gdb;
pub mod io;
pub mod irq;
pub mod linux;
pub mod machine;
pub mod ratelimit;
pub mod size;
pub mod snapshot;
pub mod vstate;

pub use bus::{Bus, BusDevice, BusRange, DeviceError};
pub use config::{MachineConfig, MemoryRegionConfig, UnhandledIo};
pub use error::{Error, Result};
pub use machine::Machine;
pub use vstate::exit::{Exit, ExitReason};
