//! Guest RAM: regions, validation, bounds-checked access, and tracking of the pages written since
//! the last snapshot (see [`image`](crate::vstate::memory::image)).

pub mod image;
mod pages;

use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

pub use image::{BaseFile, ImageError, MemoryImage, RestoreStats};
pub use pages::PageSet;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::config::MemoryRegionConfig;

/// The size of a transparent huge page, and the alignment of guest RAM in the host.
const HUGE_PAGE_SIZE: usize = 2 << 20;
/// Regions at least this large are backed by transparent huge pages. Smaller VMs (bare-metal
/// guests, tests, VM churn) touch a few pages each, of which a huge page would clear 2 MiB.
const HUGE_PAGE_MIN_REGION: u64 = 32 << 20;
const MAP_PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const MAP_FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// A region of guest memory whose writes by the VMM (through vm-memory) are tracked per page.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// A piece of guest memory as vm-memory hands it out, with its part of the dirty bitmap.
pub type GuestSlice<'a> = vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, AtomicBitmap>>;

/// Guest RAM: one host mapping per region, owned here and unmapped when the last user drops it.
/// A region starts as anonymous memory; once its content has been captured in a [`MemoryImage`]
/// it is a private (copy-on-write) mapping of the image's base file, and the pages that may differ
/// from that file are tracked, so that a later capture or restore touches only those.
///
/// Regions of 32 MiB (`HUGE_PAGE_MIN_REGION`) or more start at a 2 MiB-aligned host address (so host
/// and guest addresses agree modulo 2 MiB) and are advised for transparent huge pages, as QEMU
/// does with guest RAM: the host then backs them with 2 MiB pages where it can, and KVM maps the
/// guest with 2 MiB nested page table entries, so a booting guest takes a fraction of the nested
/// page faults (each an exit into the host kernel) it would with 4 KiB pages.
#[derive(Debug)]
pub struct GuestMemory {
    // Fields drop in order: the regions (which do not own their memory) before the mappings.
    regions: GuestMemoryMmap,
    mappings: Vec<Mapping>,
    /// Per region, in address order; changed only while nothing runs (see [`MemoryImage`]).
    tracking: Mutex<Tracking>,
    /// Ranges handed out for direct writes (views from other languages), by region: their pages
    /// count as written for as long as the loan lives.
    loans: Mutex<Vec<Loan>>,
}

/// Pages of region `region` lent out for direct writes while `token` lives.
#[derive(Debug)]
struct Loan {
    region: usize,
    pages: Range<usize>,
    token: Weak<()>,
}

/// What is known about the content of each region.
#[derive(Debug, Default)]
struct Tracking {
    regions: Vec<RegionTracking>,
    /// The image memory equalled when dirty pages were last collected, if any.
    synced_with: Option<u64>,
}

#[derive(Debug)]
struct RegionTracking {
    /// The file the region is a private mapping of, and where in it the region starts.
    base: Option<(Arc<BaseFile>, u64)>,
    /// Pages that may differ from the base (a superset): those written since the base was made.
    diverged: PageSet,
}

impl GuestMemoryBackend for GuestMemory {
    type R = GuestRegionMmap;

    fn num_regions(&self) -> usize {
        self.regions.num_regions()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&GuestRegionMmap> {
        self.regions.find_region(addr)
    }

    fn iter(&self) -> impl Iterator<Item = &GuestRegionMmap> {
        self.regions.iter()
    }
}

impl GuestMemory {
    /// Anonymous memory for `ranges` (`(guest address, size)`, sorted, non-overlapping, sizes page
    /// multiples), without the checks of [`create`].
    pub fn from_ranges(ranges: &[(GuestAddress, usize)]) -> std::io::Result<Self> {
        let mut mappings = Vec::with_capacity(ranges.len());
        let mut regions = Vec::with_capacity(ranges.len());
        for &(guest_addr, size) in ranges {
            let mapping = Mapping::new(size, size as u64 >= HUGE_PAGE_MIN_REGION)?;
            // SAFETY: the mapping is `size` bytes, readable and writable, mapped with MAP_FLAGS,
            // and lives as long as the region: both are kept in this struct, the regions dropped
            // first.
            let region = unsafe { MmapRegion::build_raw(mapping.addr.cast(), size, MAP_PROT, MAP_FLAGS) }
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            mappings.push(mapping);
            regions.push(
                GuestRegionMmap::new(region, guest_addr)
                    .ok_or_else(|| std::io::Error::other("a memory region wraps around the address space"))?,
            );
        }
        Self::from_parts(regions, mappings)
    }

    fn from_parts(regions: Vec<GuestRegionMmap>, mappings: Vec<Mapping>) -> std::io::Result<Self> {
        let regions = GuestMemoryMmap::from_regions(regions).map_err(|e| std::io::Error::other(e.to_string()))?;
        let tracking = regions
            .iter()
            .map(|region| RegionTracking { base: None, diverged: PageSet::new(page_count(region.len())) })
            .collect();
        Ok(Self {
            regions,
            mappings,
            tracking: Mutex::new(Tracking { regions: tracking, synced_with: None }),
            loans: Mutex::new(Vec::new()),
        })
    }

    /// The host address of `[addr, addr + len)` for writing to directly (a buffer handed to another
    /// language): its pages count as written, for snapshots, as long as the returned loan lives.
    pub fn lend(&self, addr: u64, len: usize) -> Result<(*mut u8, Arc<()>), MemoryError> {
        let host = host_range(self, addr, len)?;
        let index = self.region_index(addr).ok_or(MemoryError::OutOfRange { addr, len })?;
        let offset = (addr - self.region_start(index)) as usize;
        let pages = offset / PAGE_SIZE as usize..(offset + len).div_ceil(PAGE_SIZE as usize);
        let loan = Arc::new(());
        let mut loans = lock(&self.loans);
        loans.retain(|loan| loan.token.strong_count() > 0);
        loans.push(Loan { region: index, pages, token: Arc::downgrade(&loan) });
        Ok((host, loan))
    }

    /// Whether the content is tracked against an image (after a capture, or when made from one),
    /// so the VM must log the pages the guest writes.
    pub fn is_tracked(&self) -> bool {
        lock(&self.tracking).synced_with.is_some()
    }

    fn region_index(&self, addr: u64) -> Option<usize> {
        self.regions.iter().position(|r| r.start_addr().0 <= addr && addr - r.start_addr().0 < r.len())
    }

    fn region_start(&self, index: usize) -> u64 {
        self.region(index).start_addr().0
    }

    fn region(&self, index: usize) -> &GuestRegionMmap {
        self.regions.iter().nth(index).expect("region indexes come from the regions")
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Tracking is only changed by whole assignments; a panic elsewhere leaves it usable.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn page_count(len: u64) -> usize {
    len.div_ceil(PAGE_SIZE) as usize
}

/// A mapping of guest memory, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory; who may access it, and how, is up to its users (guest
// memory is shared by design between vCPUs, devices and the host).
unsafe impl Send for Mapping {}
// SAFETY: as for Send.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes; with `huge`, at a 2 MiB-aligned address and advised for huge pages.
    fn new(len: usize, huge: bool) -> std::io::Result<Self> {
        let pad = if huge { HUGE_PAGE_SIZE } else { 0 };
        let total = len.checked_add(pad).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a new anonymous mapping at an address the kernel picks; nothing else is touched.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), total, MAP_PROT, MAP_FLAGS, -1, 0) };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        if !huge {
            return Ok(Self { addr: raw, len });
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE_SIZE);
        let (head, tail) = (aligned - start, start + total - (aligned + len));
        // SAFETY: the head and tail are parts of the mapping just made that nothing uses; what is
        // kept is `[aligned, aligned + len)`. madvise only advises on that range.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
            // Hosts without transparent huge pages refuse the advice; the memory works the same.
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Ok(Self { addr: aligned as *mut libc::c_void, len })
    }

    /// Maps `len` bytes of `file` from `offset`, private: reads come from the file until a page is
    /// written, which then gets a copy of its own.
    fn private_of(file: BorrowedFd<'_>, offset: u64, len: usize) -> std::io::Result<Self> {
        let addr = map_file(std::ptr::null_mut(), file, offset, len, 0)?;
        Ok(Self { addr, len })
    }

    /// Replaces this mapping, at the same address, with a private mapping of `file` from `offset`:
    /// its current pages are dropped. Whoever uses the address (KVM, vm-memory) sees the new pages.
    fn remap_private_of(&self, file: BorrowedFd<'_>, offset: u64) -> std::io::Result<()> {
        map_file(self.addr, file, offset, self.len, libc::MAP_FIXED).map(drop)
    }
}

/// `mmap` of `len` bytes of `file` at `offset`, private and writable, at `addr` with `MAP_FIXED`.
fn map_file(
    addr: *mut libc::c_void,
    file: BorrowedFd<'_>,
    offset: u64,
    len: usize,
    extra_flags: libc::c_int,
) -> std::io::Result<*mut libc::c_void> {
    let offset = libc::off_t::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE | extra_flags;
    // SAFETY: maps a file the caller holds open. With MAP_FIXED, `addr..addr + len` is a mapping
    // this module owns (a `Mapping`), replaced atomically by the kernel; without it the kernel
    // picks a free address.
    let mapped = unsafe { libc::mmap(addr, len, MAP_PROT, flags, file.as_raw_fd(), offset) };
    if mapped == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(mapped)
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` and is unmapped only here, after every region
        // over it has gone (see `GuestMemory`).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Guest RAM is mapped in pages of this size.
pub const PAGE_SIZE: u64 = 4096;
/// Guest-physical addresses KVM keeps for itself on Intel hosts (TSS and identity map).
const KVM_PRIVATE_END: u64 = KVM_TSS_ADDR + 3 * PAGE_SIZE;
const KVM_PRIVATE: Range<u64> = KVM_IDENTITY_MAP_ADDR..KVM_PRIVATE_END;
/// x86-64 guests address at most 52 bits of physical memory.
const PHYS_ADDR_LIMIT: u64 = 1 << 52;

/// Guest memory that cannot be created or an access it cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MemoryError {
    /// No region was given.
    #[error("a VM needs at least one memory region")]
    NoRegions,
    /// A region has no bytes.
    #[error("memory region at {0:#x} has size 0")]
    Empty(u64),
    /// A region's address or size is not page aligned.
    #[error("memory region {addr:#x}+{size:#x} is not aligned to {PAGE_SIZE:#x}-byte pages")]
    Unaligned {
        /// Region start.
        addr: u64,
        /// Region size.
        size: u64,
    },
    /// A region ends beyond what a guest can address.
    #[error("memory region {addr:#x}+{size:#x} ends beyond the 52-bit guest physical address space")]
    TooHigh {
        /// Region start.
        addr: u64,
        /// Region size.
        size: u64,
    },
    /// Two regions share addresses.
    #[error("memory regions at {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
    /// A region covers the pages KVM reserves for itself.
    #[error("memory region at {0:#x} covers {KVM_IDENTITY_MAP_ADDR:#x}..{KVM_PRIVATE_END:#x}, which KVM reserves")]
    Reserved(u64),
    /// More regions than KVM has slots.
    #[error("{given} memory regions, but KVM offers {max} slots")]
    TooMany {
        /// Regions given.
        given: usize,
        /// Slots available.
        max: usize,
    },
    /// The host could not map the memory.
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map {
        /// Total bytes asked for.
        size: u64,
        /// What the host said.
        reason: String,
    },
    /// An access is not entirely inside one guest memory region.
    #[error("guest memory access of {len} bytes at {addr:#x} is outside guest memory")]
    OutOfRange {
        /// First address of the access.
        addr: u64,
        /// Its length.
        len: usize,
    },
}

/// Checks the regions and maps anonymous memory for them.
pub fn create(regions: &[MemoryRegionConfig], max_slots: usize) -> Result<GuestMemory, MemoryError> {
    validate(regions, max_slots)?;
    let ranges: Vec<_> = regions.iter().map(|r| (GuestAddress(r.guest_addr), r.size as usize)).collect();
    GuestMemory::from_ranges(&ranges)
        .map_err(|e| MemoryError::Map { size: regions.iter().map(|r| r.size).sum(), reason: e.to_string() })
}

/// The checks [`create`] makes, without mapping anything.
pub fn validate(regions: &[MemoryRegionConfig], max_slots: usize) -> Result<(), MemoryError> {
    if regions.is_empty() {
        return Err(MemoryError::NoRegions);
    }
    if regions.len() > max_slots {
        return Err(MemoryError::TooMany { given: regions.len(), max: max_slots });
    }
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.guest_addr);
    for r in &sorted {
        let (addr, size) = (r.guest_addr, r.size);
        if size == 0 {
            return Err(MemoryError::Empty(addr));
        }
        if addr % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
            return Err(MemoryError::Unaligned { addr, size });
        }
        if addr.checked_add(size).is_none_or(|end| end > PHYS_ADDR_LIMIT) {
            return Err(MemoryError::TooHigh { addr, size });
        }
        if addr < KVM_PRIVATE.end && KVM_PRIVATE.start < addr + size {
            return Err(MemoryError::Reserved(addr));
        }
    }
    for pair in sorted.windows(2) {
        if pair[0].guest_addr + pair[0].size > pair[1].guest_addr {
            return Err(MemoryError::Overlap(pair[0].guest_addr, pair[1].guest_addr));
        }
    }
    Ok(())
}

/// Whether all of `[addr, addr + len)` is guest memory; checked before allocating a buffer for it.
pub fn check_range(memory: &GuestMemory, addr: u64, len: usize) -> Result<(), MemoryError> {
    if GuestMemoryBackend::check_range(memory, GuestAddress(addr), len) {
        Ok(())
    } else {
        Err(MemoryError::OutOfRange { addr, len })
    }
}

/// Copies guest memory at `addr` into `buf`.
pub fn read(memory: &GuestMemory, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
    let out_of_range = MemoryError::OutOfRange { addr, len: buf.len() };
    memory.read_slice(buf, GuestAddress(addr)).map_err(|_| out_of_range)
}

/// Copies `data` into guest memory at `addr`.
pub fn write(memory: &GuestMemory, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
    let out_of_range = MemoryError::OutOfRange { addr, len: data.len() };
    memory.write_slice(data, GuestAddress(addr)).map_err(|_| out_of_range)
}

/// The host address of `[addr, addr + len)`, which must lie inside one region (so it is one
/// contiguous host mapping, valid as long as `memory` is).
pub fn host_range(memory: &GuestMemory, addr: u64, len: usize) -> Result<*mut u8, MemoryError> {
    let out_of_range = MemoryError::OutOfRange { addr, len };
    let region = memory.find_region(GuestAddress(addr)).ok_or(out_of_range.clone())?;
    let offset = addr - region.start_addr().0;
    if (len as u64) > region.len() - offset {
        return Err(out_of_range);
    }
    memory.get_host_address(GuestAddress(addr)).map_err(|_| out_of_range)
}

/// The regions as `(guest address, size)`, in address order.
pub fn regions(memory: &GuestMemory) -> Vec<(u64, u64)> {
    let mut regions: Vec<_> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort_unstable();
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(guest_addr: u64, size: u64) -> MemoryRegionConfig {
        MemoryRegionConfig { guest_addr, size }
    }

    #[test]
    fn validation_explains_each_bad_layout() {
        let check = |regions: &[MemoryRegionConfig]| validate(regions, 4);
        assert_eq!(check(&[]), Err(MemoryError::NoRegions));
        assert_eq!(check(&[region(0, 0)]), Err(MemoryError::Empty(0)));
        assert_eq!(check(&[region(0x800, 0x1000)]), Err(MemoryError::Unaligned { addr: 0x800, size: 0x1000 }));
        assert_eq!(check(&[region(0, 0x1800)]), Err(MemoryError::Unaligned { addr: 0, size: 0x1800 }));
        assert_eq!(check(&[region(0x2000, 0x2000), region(0, 0x3000)]), Err(MemoryError::Overlap(0, 0x2000)));
        assert_eq!(check(&[region(0, 5 << 30)]), Err(MemoryError::Reserved(0)));
        assert!(matches!(check(&[region(!0xfff, 0x2000)]), Err(MemoryError::TooHigh { .. })));
        assert_eq!(
            validate(&[region(0, 0x1000), region(0x1000, 0x1000)], 1),
            Err(MemoryError::TooMany { given: 2, max: 1 })
        );
        assert_eq!(check(&[region(0x1_0000_0000, 0x1000), region(0, 0x1000)]), Ok(()));
    }

    #[test]
    fn accesses_are_bounds_checked_per_region() {
        let memory = create(&[region(0, 0x2000), region(0x10000, 0x1000)], 4).unwrap();
        write(&memory, 0x1ffe, &[1, 2]).unwrap();
        let mut buf = [0; 2];
        read(&memory, 0x1ffe, &mut buf).unwrap();
        assert_eq!(buf, [1, 2]);
        assert_eq!(write(&memory, 0x1fff, &[1, 2]), Err(MemoryError::OutOfRange { addr: 0x1fff, len: 2 }));
        assert!(read(&memory, 0x11000, &mut buf).is_err());
        assert!(host_range(&memory, 0x10000, 0x1000).is_ok());
        assert!(host_range(&memory, 0x10001, 0x1000).is_err());
        assert!(host_range(&memory, 0x5000, 1).is_err());
        assert_eq!(regions(&memory), [(0, 0x2000), (0x10000, 0x1000)]);
    }
}
