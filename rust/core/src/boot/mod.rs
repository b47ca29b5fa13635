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

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{CMDLINE_ADDR, CMDLINE_MAX, HIGH_MEMORY_START};
use crate::vstate::memory::{self, GuestMemory, MemoryError, PAGE_SIZE};
pub use kernel::{EntryPoint, Kernel};

/// A kernel or initrd image: bytes in memory, or an open file that loading reads straight into
/// guest memory (one copy, from the page cache, with no buffer in between). Cloning shares it.
#[derive(Debug, Clone)]
pub enum Image {
    /// The image's bytes.
    Bytes(Arc<[u8]>),
    /// A file and its length.
    File {
        /// The open file (read with explicit offsets or after seeking to its start).
        file: Arc<File>,
        /// Its length in bytes.
        len: u64,
    },
}

impl Default for Image {
    fn default() -> Self {
        Self::Bytes(Arc::from(Vec::new()))
    }
}

impl From<Vec<u8>> for Image {
    fn from(bytes: Vec<u8>) -> Self {
        Self::Bytes(bytes.into())
    }
}

impl Image {
    /// Opens the file at `path`; [`BootError::Read`] when it cannot be opened or is not a regular
    /// file (a FIFO or a device has no length to check against guest memory, and may never end).
    pub fn open(path: &Path) -> Result<Self, BootError> {
        let failed = |e: std::io::Error| BootError::Read { path: path.display().to_string(), reason: e.to_string() };
        // Non-blocking, so that opening a FIFO with no writer returns at once and is refused below.
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(failed)?;
        let metadata = file.metadata().map_err(failed)?;
        if !metadata.is_file() {
            return Err(failed(std::io::Error::other("not a regular file")));
        }
        Ok(Self::File { file: Arc::new(file), len: metadata.len() })
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(bytes) => bytes.len() as u64,
            Self::File { len, .. } => *len,
        }
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` bytes from its start (fewer when it is shorter).
    pub fn head(&self, max: usize) -> Result<Vec<u8>, BootError> {
        let len = usize::try_from(self.len()).unwrap_or(usize::MAX).min(max);
        match self {
            Self::Bytes(bytes) => Ok(bytes[..len].to_vec()),
            Self::File { file, .. } => {
                let mut head = vec![0; len];
                file.read_exact_at(&mut head, 0).map_err(|e| BootError::Load(format!("cannot read the image: {e}")))?;
                Ok(head)
            }
        }
    }

    /// Copies the whole image into guest memory at `addr`.
    pub fn copy_to(&self, memory: &GuestMemory, addr: u64) -> Result<(), BootError> {
        match self {
            Self::Bytes(bytes) => Ok(memory::write(memory, addr, bytes)?),
            Self::File { file, len } => {
                let len = usize::try_from(*len).map_err(|_| MemoryError::OutOfRange { addr, len: usize::MAX })?;
                let mut reader = &**file;
                reader.seek(SeekFrom::Start(0)).map_err(|e| BootError::Load(format!("cannot read the image: {e}")))?;
                memory.read_exact_volatile_from(GuestAddress(addr), &mut reader, len).map_err(|e| match e {
                    vm_memory::GuestMemoryError::IOError(e) => BootError::Load(format!("cannot read the image: {e}")),
                    _ => BootError::Memory(MemoryError::OutOfRange { addr, len }),
                })
            }
        }
    }
}

/// A Linux kernel to boot.
#[derive(Debug, Clone, Default)]
pub struct LinuxBoot {
    /// The kernel image: a bzImage or an uncompressed ELF `vmlinux`.
    pub kernel: Image,
    /// An initramfs, if any.
    pub initrd: Option<Image>,
    /// The command line.
    pub cmdline: String,
}

/// A kernel, command line or initrd that cannot be booted.
#[derive(Debug, Error)]
pub enum BootError {
    /// The image file cannot be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// What the host said.
        reason: String,
    },
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
    // Checked before reading any of it (the initrd's room is checked before it is read, too).
    let total: u64 = ram.iter().map(|&(_, size)| size).sum();
    if boot.kernel.len() > total {
        return Err(BootError::Load(format!(
            "the kernel is {} bytes, more than the {total} bytes of guest memory",
            boot.kernel.len()
        )));
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
    image: &Image,
) -> Result<(u64, u64), BootError> {
    let limit = kernel.initrd_addr_max().min(low_start + low_size - 1);
    let floor = kernel.end().next_multiple_of(PAGE_SIZE);
    let size = image.len();
    let top = (limit + 1) & !(PAGE_SIZE - 1);
    let room = top.saturating_sub(floor);
    if size > room {
        return Err(BootError::InitrdTooLarge { size: image.len() as usize, room, limit });
    }
    let addr = (top - size) & !(PAGE_SIZE - 1);
    image.copy_to(memory, addr)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::kernel::tests::{fake_bzimage, guest_memory};

    #[test]
    fn a_file_loads_as_its_bytes_do() {
        let dir = std::env::temp_dir().join(format!("kvmkit-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (kernel_path, initrd_path) = (dir.join("kernel"), dir.join("initrd"));
        let (kernel, initrd) = (fake_bzimage(0x2000, 1), (0..5000u32).map(|i| i as u8).collect::<Vec<_>>());
        std::fs::write(&kernel_path, &kernel).unwrap();
        std::fs::write(&initrd_path, &initrd).unwrap();
        let cmdline = "console=ttyS0".to_string();
        let from_bytes = LinuxBoot { kernel: kernel.into(), initrd: Some(initrd.into()), cmdline: cmdline.clone() };
        let from_files = LinuxBoot {
            kernel: Image::open(&kernel_path).unwrap(),
            initrd: Some(Image::open(&initrd_path).unwrap()),
            cmdline,
        };
        let (a, b) = (guest_memory(64 << 20), guest_memory(64 << 20));
        assert_eq!(load(&a, &from_bytes, None).unwrap(), load(&b, &from_files, None).unwrap());
        let (mut left, mut right) = (vec![0u8; 64 << 20], vec![0u8; 64 << 20]);
        memory::read(&a, 0, &mut left).unwrap();
        memory::read(&b, 0, &mut right).unwrap();
        assert!(left == right, "guest memory differs");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_file_is_a_read_error() {
        let error = Image::open(Path::new("/nonexistent/kvmkit/vmlinux")).unwrap_err();
        assert!(matches!(&error, BootError::Read { path, .. } if path == "/nonexistent/kvmkit/vmlinux"));
        assert!(error.to_string().starts_with("cannot read /nonexistent/kvmkit/vmlinux: "));
        assert!(matches!(Image::open(Path::new("/")), Err(BootError::Read { .. })));
        assert!(
            matches!(Image::open(Path::new("/dev/zero")), Err(BootError::Read { reason, .. }) if reason == "not a regular file")
        );
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let fifo = std::env::temp_dir().join(format!("kvmkit-fifo-test-{}", std::process::id()));
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let result = Image::open(&fifo);
        std::fs::remove_file(&fifo).unwrap();
        assert!(matches!(result, Err(BootError::Read { reason, .. }) if reason == "not a regular file"));
    }

    #[test]
    fn images_larger_than_guest_memory_are_refused() {
        let memory = guest_memory(4 << 20);
        let big = Image::Bytes(vec![0u8; 5 << 20].into());
        let kernel = LinuxBoot { kernel: big.clone(), ..LinuxBoot::default() };
        let error = load(&memory, &kernel, None).unwrap_err();
        assert!(error.to_string().contains("the kernel is 5242880 bytes, more than the 4194304 bytes"), "{error}");
        let initrd = LinuxBoot { kernel: fake_bzimage(0x1000, 1).into(), initrd: Some(big), ..LinuxBoot::default() };
        assert!(matches!(load(&memory, &initrd, None), Err(BootError::InitrdTooLarge { .. })));
    }
}
