//! Booting Linux: loading the kernel, the boot parameters it reads, and the initramfs.
//!
//! [`load`] puts a kernel (bzImage or ELF `vmlinux`), its command line and initrd into guest
//! memory and returns where and how to enter it; the caller sets up the boot vCPU accordingly.

/// newc-format cpio archives, the format of an initramfs.
pub mod initramfs;
/// Kernel images: bzImage and ELF, and their entry points.
pub mod kernel;
/// What the kernel reads at entry: the zero page with its e820 map, or the PVH start info.
pub mod params;

use thiserror::Error;

use crate::arch::x86_64::layout::{CMDLINE_ADDR, CMDLINE_MAX, HIGH_MEMORY_START};
use crate::vstate::memory::{self, GuestMemory, MemoryError, PAGE_SIZE};
pub use kernel::{EntryPoint, Kernel};

/// A Linux kernel to boot.
#[derive(Debug, Clone, Default)]
pub struct LinuxBoot {
    /// The kernel image: a bzImage or an uncompressed ELF `vmlinux`.
    pub kernel: Vec<u8>,
    /// An initramfs, if any.
    pub initrd: Option<Vec<u8>>,
    /// The command line.
    pub cmdline: String,
}

/// A kernel, command line or initrd that cannot be booted.
#[derive(Debug, Error)]
pub enum BootError {
    /// Neither a bzImage nor an ELF file.
    #[error("the kernel image is neither a bzImage nor an ELF vmlinux ({0})")]
    NotAKernel(&'static str),
    /// The image is damaged or does not fit guest memory.
    #[error("cannot load the kernel: {0}")]
    Load(String),
    /// A bzImage without the 64-bit entry point.
    #[error("the bzImage has no 64-bit entry point (boot protocol {0:#x}); kvmkit boots 64-bit kernels")]
    Not64Bit(u16),
    /// The command line is longer than the kernel takes.
    #[error("the kernel command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The most the kernel accepts, without the terminating NUL.
        max: usize,
    },
    /// The command line has a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// No room for the initrd between the kernel and the highest address the kernel can reach.
    #[error(
        "the initrd ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel (room: {room} bytes)"
    )]
    InitrdTooLarge {
        /// Its size.
        size: usize,
        /// The free bytes there are.
        room: u64,
        /// The highest address the kernel accepts for it.
        limit: u64,
    },
    /// Guest memory does not start at 0 or is too small for the kernel.
    #[error("guest memory must start at address 0 and reach past {HIGH_MEMORY_START:#x} to boot Linux")]
    NoLowMemory,
    /// Writing to guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Loads `boot` into `memory`: the kernel, the command line, the initrd and the boot parameters
/// (a zero page with an e820 map of `memory`, or the PVH start info), which point the kernel at
/// the ACPI tables at `acpi_rsdp` if given. Returns the entry point.
pub fn load(memory: &GuestMemory, boot: &LinuxBoot, acpi_rsdp: Option<u64>) -> Result<EntryPoint, BootError> {
    let ram = memory::regions(memory);
    if ram.first().is_none_or(|&(start, size)| start != 0 || size <= HIGH_MEMORY_START) {
        return Err(BootError::NoLowMemory);
    }
    let kernel = kernel::load(memory, &boot.kernel)?;
    let max = kernel.cmdline_max().min(CMDLINE_MAX) - 1;
    if boot.cmdline.len() > max {
        return Err(BootError::CmdlineTooLong { len: boot.cmdline.len(), max });
    }
    if boot.cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut cmdline = boot.cmdline.clone().into_bytes();
    cmdline.push(0);
    memory::write(memory, CMDLINE_ADDR, &cmdline)?;
    let initrd = match &boot.initrd {
        Some(image) => Some(place_initrd(memory, &kernel, ram[0], image)?),
        None => None,
    };
    let boot_info = params::BootInfo { ram: &ram, cmdline_len: cmdline.len(), initrd, acpi_rsdp };
    params::write(memory, &kernel, &boot_info)
}

/// Puts the initrd as high as the kernel allows in the first RAM region, above the kernel.
fn place_initrd(
    memory: &GuestMemory,
    kernel: &Kernel,
    (low_start, low_size): (u64, u64),
    image: &[u8],
) -> Result<(u64, u64), BootError> {
    let limit = kernel.initrd_addr_max().min(low_start + low_size - 1);
    let floor = kernel.end().next_multiple_of(PAGE_SIZE);
    let size = image.len() as u64;
    let top = (limit + 1) & !(PAGE_SIZE - 1);
    let room = top.saturating_sub(floor);
    if size > room {
        return Err(BootError::InitrdTooLarge { size: image.len(), room, limit });
    }
    let addr = (top - size) & !(PAGE_SIZE - 1);
    memory::write(memory, addr, image)?;
    Ok((addr, size))
}
