//! What a VM is made of, as plain data: the builder turns a [`MachineConfig`] into a
//! [`Machine`](crate::Machine).

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::cpuid::CpuidEdit;

/// One range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionConfig {
    /// Guest physical address of the first byte; page aligned.
    pub guest_addr: u64,
    /// Size in bytes; a non-zero multiple of the page size.
    pub size: u64,
}

/// What happens to port I/O or MMIO that reaches no device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnhandledIo {
    /// Reads return all ones (as on a bus with nothing behind it), writes are dropped; both are
    /// counted and logged at debug level.
    #[default]
    Ignore,
    /// The run ends with [`ExitReason::UnhandledIo`](crate::ExitReason::UnhandledIo).
    Stop,
}

/// The configuration of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Guest RAM, one or more non-overlapping regions.
    pub memory: Vec<MemoryRegionConfig>,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Whether KVM emulates the PIC, IOAPIC and local APICs.
    pub irqchip: bool,
    /// Whether KVM emulates the i8254 PIT (needs `irqchip`).
    pub pit: bool,
    /// The policy for accesses that reach no device.
    pub unhandled_io: UnhandledIo,
    /// Changes to the CPUID every vCPU reports, applied after kvmkit's own.
    pub cpuid_edits: Vec<CpuidEdit>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            memory: vec![MemoryRegionConfig { guest_addr: 0, size: 64 << 20 }],
            vcpus: 1,
            irqchip: false,
            pit: false,
            unhandled_io: UnhandledIo::default(),
            cpuid_edits: Vec::new(),
        }
    }
}
