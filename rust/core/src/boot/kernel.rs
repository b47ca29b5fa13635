use std::io::Cursor;

use linux_loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::GuestAddress;

use super::{BootError, Image};
use crate::arch::x86_64::layout::{HIGH_MEMORY_START, PVH_INFO_ADDR, ZERO_PAGE_ADDR};
use crate::vstate::memory::GuestMemory;

/// Offset of the setup header's "HdrS" magic in a bzImage.
const HDRS_OFFSET: usize = 0x202;
const HDRS: &[u8; 4] = b"HdrS";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// `xloadflags` bit: the kernel has a 64-bit entry point 0x200 bytes into the protected-mode code.
const XLF_KERNEL_64: u16 = 1 << 0;
const STARTUP_64_OFFSET: u64 = 0x200;
/// Boot protocol 2.06 added `cmdline_size`; older kernels take 255 bytes plus NUL.
const OLD_CMDLINE_MAX: usize = 256;
/// Where kernels without `initrd_addr_max` (protocol < 2.03) accept an initrd.
const OLD_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// The 64-bit Linux boot protocol: long mode at `addr`, RSI pointing at the zero page.
    Linux64 {
        /// The 64-bit entry point.
        addr: u64,
        /// The zero page (`boot_params`).
        zero_page: u64,
    },
    /// PVH: 32-bit protected mode with paging off at `addr`, EBX pointing at the start info.
    Pvh {
        /// The PVH entry point from the ELF note.
        addr: u64,
        /// The `hvm_start_info` structure.
        start_info: u64,
    },
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    loaded: KernelLoaderResult,
    format: Format,
}

#[derive(Debug, Clone, Copy)]
enum Format {
    BzImage,
    Elf,
}

impl Kernel {
    /// The setup header a bzImage carries, which the zero page must repeat.
    pub fn setup_header(&self) -> Option<setup_header> {
        self.loaded.setup_header
    }

    /// The first address after the kernel.
    pub fn end(&self) -> u64 {
        self.loaded.kernel_end
    }

    /// How the kernel is entered: PVH when an ELF kernel has the note for it, else 64-bit Linux.
    pub fn entry_point(&self) -> EntryPoint {
        match (self.format, self.loaded.pvh_boot_cap) {
            (Format::Elf, PvhBootCapability::PvhEntryPresent(addr)) => {
                EntryPoint::Pvh { addr: addr.0, start_info: PVH_INFO_ADDR }
            }
            (Format::Elf, _) => EntryPoint::Linux64 { addr: self.loaded.kernel_load.0, zero_page: ZERO_PAGE_ADDR },
            (Format::BzImage, _) => {
                EntryPoint::Linux64 { addr: self.loaded.kernel_load.0 + STARTUP_64_OFFSET, zero_page: ZERO_PAGE_ADDR }
            }
        }
    }

    /// The longest command line the kernel accepts, with its NUL.
    pub fn cmdline_max(&self) -> usize {
        match self.setup_header() {
            Some(hdr) if hdr.version >= 0x0206 => hdr.cmdline_size as usize + 1,
            Some(_) => OLD_CMDLINE_MAX,
            None => usize::MAX,
        }
    }

    /// The highest address the initrd may occupy.
    pub fn initrd_addr_max(&self) -> u64 {
        match self.setup_header() {
            Some(hdr) if hdr.version >= 0x0203 => u64::from(hdr.initrd_addr_max),
            _ => OLD_INITRD_ADDR_MAX,
        }
    }
}

/// How much of an image's start tells its format and, for a bzImage, its setup header.
const HEAD_SIZE: usize = 0x1000;

/// Loads a bzImage or an ELF `vmlinux` into `memory`. An image in a file is read from it straight
/// into guest memory, segment by segment.
pub fn load(memory: &GuestMemory, image: &Image) -> Result<Kernel, BootError> {
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    let head = image.head(HEAD_SIZE)?;
    let format = if head.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(HDRS) {
        check_bzimage(&head, image.len())?;
        Format::BzImage
    } else if head.starts_with(ELF_MAGIC) {
        Format::Elf
    } else {
        return Err(BootError::NotAKernel("no bzImage setup header and no ELF magic"));
    };
    let loaded = match image {
        Image::Bytes(bytes) => load_from(memory, format, &mut Cursor::new(&bytes[..]), highmem),
        Image::File { file, .. } => load_from(memory, format, &mut &**file, highmem),
    }
    .map_err(|e| BootError::Load(e.to_string()))?;
    Ok(Kernel { loaded, format })
}

fn load_from<F>(
    memory: &GuestMemory,
    format: Format,
    image: &mut F,
    highmem: Option<GuestAddress>,
) -> linux_loader::loader::Result<KernelLoaderResult>
where
    F: std::io::Read + vm_memory::ReadVolatile + std::io::Seek,
{
    match format {
        Format::BzImage => BzImage::load(memory, None, image, highmem),
        Format::Elf => Elf::load(memory, None, image, highmem),
    }
}

/// Rejects bzImages that are cut short or lack the 64-bit entry point, which the loader would
/// otherwise accept and leave to fail inside the guest. `head` is the image's start, `len` its
/// length.
fn check_bzimage(head: &[u8], len: u64) -> Result<(), BootError> {
    let u16_at = |at: usize| head.get(at..at + 2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| head.get(at..at + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let version = u16_at(0x206);
    let setup_sects = match head.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => u64::from(n),
    };
    let protected_mode_size = u64::from(u32_at(0x1f4)) * 16;
    let expected = (setup_sects + 1) * 512 + protected_mode_size;
    if len < expected {
        return Err(BootError::Load(format!("the bzImage is truncated: {len} bytes, its header says {expected}")));
    }
    if version < 0x020c || u16_at(0x236) & XLF_KERNEL_64 == 0 {
        return Err(BootError::Not64Bit(version));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vstate::memory::{self};
    use crate::MemoryRegionConfig;

    /// A bzImage-shaped image: `setup_sects` sectors of setup, then `payload` bytes.
    pub(crate) fn fake_bzimage(payload: usize, xloadflags: u16) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512 + payload];
        image[0x1f1] = setup_sects;
        image[0x1f4..0x1f8].copy_from_slice(&((payload / 16) as u32).to_le_bytes());
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(HDRS);
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = 0x1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        image[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        image[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        image
    }

    pub(crate) fn guest_memory(size: u64) -> GuestMemory {
        memory::create(&[MemoryRegionConfig { guest_addr: 0, size }], 4).unwrap()
    }

    #[test]
    fn bzimage_enters_at_startup_64() {
        let memory = guest_memory(32 << 20);
        let kernel = load(&memory, &fake_bzimage(0x1000, XLF_KERNEL_64).into()).unwrap();
        assert_eq!(kernel.entry_point(), EntryPoint::Linux64 { addr: 0x10_0200, zero_page: ZERO_PAGE_ADDR });
        assert_eq!((kernel.end(), kernel.cmdline_max(), kernel.initrd_addr_max()), (0x10_1000, 2048, 0x7fff_ffff));
    }

    #[test]
    fn bad_images_are_refused_with_a_reason() {
        let memory = guest_memory(32 << 20);
        let mut truncated = fake_bzimage(0x1000, XLF_KERNEL_64);
        truncated.truncate(truncated.len() - 1);
        assert!(matches!(load(&memory, &truncated.into()), Err(BootError::Load(m)) if m.contains("truncated")));
        assert!(matches!(load(&memory, &fake_bzimage(0x1000, 0).into()), Err(BootError::Not64Bit(0x020f))));
        assert!(matches!(load(&memory, &b"just some text\n".to_vec().into()), Err(BootError::NotAKernel(_))));
        assert!(matches!(load(&memory, &b"\x7fELF broken".to_vec().into()), Err(BootError::Load(_))));
    }
}
