//! Guest memory content frozen at one point: a [`MemoryImage`].
//!
//! An image is, per region, a base file plus the pages that differ from it. The first capture of
//! a VM's memory moves its content into a memory file (a memfd) and maps the region privately
//! over that file, so the file is the base from then on and the capture copies nothing more.
//! From then on the pages the guest writes (KVM's dirty log), the VMM writes (vm-memory's
//! bitmap) or a loan allows to be written are collected at each capture and restore:
//!
//! - a later capture copies only the pages that differ from the base;
//! - a restore of the image memory last equalled copies back only the pages written since;
//! - a restore of another image of the same base copies the pages either side changed;
//! - a new VM from an image (a fork, or a memory file saved earlier) maps the base privately and
//!   copies in the image's own pages, so memory is shared copy-on-write and read lazily.
//!
//! All of it happens while no vCPU runs and no device touches memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::{lock, page_count, GuestMemory, GuestRegionMmap, Mapping, PageSet, MAP_FLAGS, MAP_PROT, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;

/// A memory image that cannot be made, saved or opened.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The host failed an operation on memory or on a file.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the host said.
        source: std::io::Error,
    },
    /// A memory file does not have the size of the memory it is for.
    #[error("memory file {path} holds {actual} bytes, but the VM's memory is {expected} bytes")]
    WrongSize {
        /// The file.
        path: String,
        /// Its size.
        actual: u64,
        /// The size of the VM's memory.
        expected: u64,
    },
    /// An image does not have the layout of the memory it is restored into.
    #[error("the snapshot's memory has regions {image:?}, this VM's {memory:?} (as (address, size))")]
    Layout {
        /// The image's regions.
        image: Vec<(u64, u64)>,
        /// The memory's regions.
        memory: Vec<(u64, u64)>,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// A file whose bytes are the base content of guest memory: a memfd made at a capture, or a
/// memory file opened for a restore. Read through a shared read-only mapping made when needed.
#[derive(Debug)]
pub struct BaseFile {
    file: File,
    len: u64,
    view: std::sync::OnceLock<Result<ReadMapping, i32>>,
}

#[derive(Debug)]
struct ReadMapping(*const u8, usize);

// SAFETY: the mapping is read-only memory owned by this value; reading it from any thread is fine.
unsafe impl Send for ReadMapping {}
// SAFETY: as for Send.
unsafe impl Sync for ReadMapping {}

impl Drop for ReadMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `BaseFile::bytes` and is unmapped only here.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
    }
}

impl BaseFile {
    fn new(file: File) -> Result<Self, ImageError> {
        let len = file.metadata().map_err(io("cannot read the size of a memory file"))?.len();
        Ok(Self { file, len, view: std::sync::OnceLock::new() })
    }

    /// A new memory file of `len` bytes, all zero.
    fn anonymous(len: u64) -> Result<Self, ImageError> {
        // SAFETY: the name is a NUL-terminated string; the call creates a new file descriptor.
        let fd = unsafe { libc::memfd_create(c"kvmkit-guest-memory".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io("cannot create a memory file")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len).map_err(io("cannot size a memory file"))?;
        Self::new(file)
    }

    /// The file's bytes.
    fn bytes(&self) -> Result<&[u8], ImageError> {
        let view = self.view.get_or_init(|| {
            let len = self.len as usize;
            // SAFETY: a new read-only shared mapping of the whole file, which this value owns.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len.max(1),
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    self.file.as_raw_fd(),
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
            } else {
                Ok(ReadMapping(addr as *const u8, len.max(1)))
            }
        });
        match view {
            // SAFETY: the mapping covers `len` readable bytes and lives as long as `self`. The file
            // is never written once it is a base, so the bytes do not change under the slice.
            Ok(mapping) => Ok(unsafe { std::slice::from_raw_parts(mapping.0, self.len as usize) }),
            Err(errno) => Err(io("cannot map a memory file")(std::io::Error::from_raw_os_error(*errno))),
        }
    }
}

/// One region of an image.
#[derive(Debug, Clone)]
struct RegionImage {
    guest_addr: u64,
    size: u64,
    base: Arc<BaseFile>,
    /// Where the region starts in the base file.
    offset: u64,
    /// Pages that differ from the base, in increasing order, and their bytes.
    pages: Vec<u32>,
    data: Vec<u8>,
}

impl RegionImage {
    /// The image's bytes of `page`.
    fn page<'a>(&'a self, base: &'a [u8], page: usize) -> &'a [u8] {
        match self.pages.binary_search(&(page as u32)) {
            Ok(at) => &self.data[at * PAGE..(at + 1) * PAGE],
            Err(_) => {
                let start = self.offset as usize + page * PAGE;
                &base[start..start + PAGE]
            }
        }
    }

    fn own_pages(&self) -> PageSet {
        let mut set = PageSet::new(page_count(self.size));
        self.pages.iter().for_each(|&page| set.insert(page as usize));
        set
    }
}

/// Guest memory content at one point in time. Cheap to keep: pages are shared with the memory
/// file the VM is mapped over, and only those that differ from it are copies.
#[derive(Debug, Clone)]
pub struct MemoryImage {
    id: u64,
    regions: Vec<RegionImage>,
}

/// What a restore of memory did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Pages copied back.
    pub pages_copied: usize,
    /// Regions mapped anew over the image's base file.
    pub regions_remapped: usize,
}

fn next_image_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl MemoryImage {
    /// The regions as `(guest address, size)`, in address order.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.guest_addr, r.size)).collect()
    }

    /// Total bytes of memory the image describes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Bytes the image holds of its own (pages that differ from its base files).
    pub fn own_bytes(&self) -> usize {
        self.regions.iter().map(|r| r.data.len()).sum()
    }

    /// Copies the image's bytes at guest address `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let region = self
            .regions
            .iter()
            .find(|r| r.guest_addr <= addr && addr + buf.len() as u64 <= r.guest_addr + r.size)
            .ok_or_else(|| io("reading a memory image")(std::io::Error::from_raw_os_error(libc::EFAULT)))?;
        let base = region.base.bytes()?;
        let mut done = 0;
        while done < buf.len() {
            let offset = (addr - region.guest_addr) as usize + done;
            let (page, within) = (offset / PAGE, offset % PAGE);
            let take = (PAGE - within).min(buf.len() - done);
            buf[done..done + take].copy_from_slice(&region.page(base, page)[within..within + take]);
            done += take;
        }
        Ok(())
    }

    /// Writes the image as one flat file, the regions one after another, sparse where the base
    /// file has holes.
    pub fn save(&self, path: &Path) -> Result<(), ImageError> {
        let what = format!("cannot write memory file {}", path.display());
        let out = File::create(path).map_err(io(what.clone()))?;
        out.set_len(self.size()).map_err(io(what.clone()))?;
        let mut at = 0;
        for region in &self.regions {
            copy_data(&region.base, region.offset, &out, at, region.size)?;
            for (index, &page) in region.pages.iter().enumerate() {
                let bytes = &region.data[index * PAGE..(index + 1) * PAGE];
                out.write_all_at(bytes, at + page as u64 * PAGE_SIZE).map_err(io(what.clone()))?;
            }
            at += region.size;
        }
        out.sync_all().map_err(io(what))
    }

    /// Opens a memory file written by [`save`](Self::save) for memory of the layout `regions`
    /// (`(guest address, size)` in address order). Nothing is read yet: a VM made from the image
    /// maps the file and reads each page when the guest first touches it.
    pub fn open(path: &Path, regions: &[(u64, u64)]) -> Result<Self, ImageError> {
        let file = File::open(path).map_err(io(format!("cannot open memory file {}", path.display())))?;
        let base = Arc::new(BaseFile::new(file)?);
        let expected = regions.iter().map(|r| r.1).sum();
        if base.len != expected {
            return Err(ImageError::WrongSize { path: path.display().to_string(), actual: base.len, expected });
        }
        let mut offset = 0;
        let regions = regions
            .iter()
            .map(|&(guest_addr, size)| {
                let region =
                    RegionImage { guest_addr, size, base: base.clone(), offset, pages: Vec::new(), data: Vec::new() };
                offset += size;
                region
            })
            .collect();
        Ok(Self { id: next_image_id(), regions })
    }
}

/// Copies `len` bytes of `base` at `from_offset` to `to` at `to_offset`, skipping holes.
fn copy_data(base: &BaseFile, from_offset: u64, to: &File, to_offset: u64, len: u64) -> Result<(), ImageError> {
    let what = "cannot copy a memory file";
    let bytes = base.bytes()?;
    let end = from_offset + len;
    let mut at = from_offset;
    while at < end {
        let Some(data) = seek_data(&base.file, at, libc::SEEK_DATA).map_err(io(what))?.filter(|&d| d < end) else {
            break;
        };
        let hole = seek_data(&base.file, data, libc::SEEK_HOLE).map_err(io(what))?.unwrap_or(end).min(end);
        to.write_all_at(&bytes[data as usize..hole as usize], to_offset + data - from_offset).map_err(io(what))?;
        at = hole;
    }
    Ok(())
}

/// `lseek` with `SEEK_DATA` or `SEEK_HOLE`; `None` when there is no data past `offset`.
fn seek_data(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an open file descriptor.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        e => Err(e),
    }
}

impl GuestMemory {
    /// Collects the pages written since the last collection: `kvm_dirty` is KVM's dirty log per
    /// region (slot), the rest comes from vm-memory's bitmaps and live loans. Adds them to each
    /// region's diverged pages and returns them.
    fn collect_dirty(&self, kvm_dirty: Vec<Vec<u64>>) -> Vec<PageSet> {
        let loans = {
            let mut loans = lock(&self.loans);
            loans.retain(|loan| loan.token.strong_count() > 0);
            loans.iter().map(|loan| (loan.region, loan.pages.clone())).collect::<Vec<_>>()
        };
        let mut kvm_dirty = kvm_dirty.into_iter();
        let mut tracking = lock(&self.tracking);
        self.regions
            .iter()
            .zip(tracking.regions.iter_mut())
            .enumerate()
            .map(|(index, (region, track))| {
                let pages = page_count(region.len());
                let bitmap: &AtomicBitmap = MmapRegion::bitmap(region);
                let mut dirty = PageSet::from_words(bitmap.get_and_reset(), pages);
                dirty.union_with_words(&kvm_dirty.next().unwrap_or_default());
                for (_, range) in loans.iter().filter(|(i, _)| *i == index) {
                    dirty.insert_range(range.clone());
                }
                track.diverged.union_with(&dirty);
                dirty
            })
            .collect()
    }

    /// Captures the memory's content. The first capture of a region moves its content into a new
    /// memory file and maps the region over it; later ones copy the pages that differ from it.
    pub fn capture(&self, kvm_dirty: Vec<Vec<u64>>) -> Result<MemoryImage, ImageError> {
        self.collect_dirty(kvm_dirty);
        let mut tracking = lock(&self.tracking);
        let mut regions = Vec::with_capacity(self.regions.num_regions());
        for (index, region) in self.regions.iter().enumerate() {
            let track = &mut tracking.regions[index];
            if track.base.is_none() {
                let base = Arc::new(self.move_into_file(index)?);
                track.base = Some((base, 0));
                track.diverged = PageSet::new(page_count(region.len()));
            }
            let (base, offset) = track.base.clone().expect("set above");
            let pages: Vec<u32> = track.diverged.iter().map(|p| p as u32).collect();
            let mut data = vec![0u8; pages.len() * PAGE];
            let host = self.mappings[index].addr as *const u8;
            for (chunk, &page) in data.chunks_exact_mut(PAGE).zip(&pages) {
                // SAFETY: `page` is below the region's page count, so the page lies inside the
                // mapping; nothing writes guest memory during a capture.
                chunk.copy_from_slice(unsafe { std::slice::from_raw_parts(host.add(page as usize * PAGE), PAGE) });
            }
            regions.push(RegionImage {
                guest_addr: region.start_addr().0,
                size: region.len(),
                base,
                offset,
                pages,
                data,
            });
        }
        let image = MemoryImage { id: next_image_id(), regions };
        tracking.synced_with = Some(image.id);
        Ok(image)
    }

    /// Copies region `index` into a new memory file (only the pages the host has backed: the
    /// rest are zero) and maps the region privately over the file instead.
    fn move_into_file(&self, index: usize) -> Result<BaseFile, ImageError> {
        let mapping = &self.mappings[index];
        let base = BaseFile::anonymous(mapping.len as u64)?;
        let host = mapping.addr as *const u8;
        let present = present_pages(host as usize, mapping.len);
        for run in present.chunk_by(|a, b| *b == *a + 1) {
            let (first, count) = (run[0], run.len());
            // SAFETY: the run's pages lie inside the mapping; nothing writes it meanwhile.
            let bytes = unsafe { std::slice::from_raw_parts(host.add(first * PAGE), count * PAGE) };
            base.file.write_all_at(bytes, (first * PAGE) as u64).map_err(io("cannot fill a memory file"))?;
        }
        mapping.remap_private_of(base.file.as_fd(), 0).map_err(io("cannot map guest memory over its memory file"))?;
        Ok(base)
    }

    /// Puts the memory back to `image`'s content, copying only pages that may differ, or mapping
    /// a region anew over the image's base when it is not the region's base already.
    pub fn restore(&self, image: &MemoryImage, kvm_dirty: Vec<Vec<u64>>) -> Result<RestoreStats, ImageError> {
        let layout = super::regions(self);
        if image.regions() != layout {
            return Err(ImageError::Layout { image: image.regions(), memory: layout });
        }
        let dirty = self.collect_dirty(kvm_dirty);
        let mut tracking = lock(&self.tracking);
        let in_sync = tracking.synced_with == Some(image.id);
        let mut stats = RestoreStats::default();
        for (index, (region, dirty)) in image.regions.iter().zip(dirty).enumerate() {
            let track = &mut tracking.regions[index];
            let same_base =
                track.base.as_ref().is_some_and(|(b, o)| Arc::ptr_eq(b, &region.base) && *o == region.offset);
            let to_copy = if !same_base {
                self.mappings[index]
                    .remap_private_of(region.base.file.as_fd(), region.offset)
                    .map_err(io("cannot map guest memory over a snapshot's memory file"))?;
                track.base = Some((region.base.clone(), region.offset));
                track.diverged = region.own_pages();
                stats.regions_remapped += 1;
                region.own_pages()
            } else if in_sync {
                dirty
            } else {
                let mut pages = track.diverged.clone();
                pages.union_with(&region.own_pages());
                track.diverged.union_with(&pages);
                pages
            };
            stats.pages_copied += self.copy_pages_from(index, region, &to_copy)?;
        }
        tracking.synced_with = Some(image.id);
        Ok(stats)
    }

    fn copy_pages_from(&self, index: usize, region: &RegionImage, pages: &PageSet) -> Result<usize, ImageError> {
        if pages.is_empty() {
            return Ok(0);
        }
        let base = region.base.bytes()?;
        let host = self.mappings[index].addr as *mut u8;
        let mut copied = 0;
        for page in pages.iter() {
            let bytes = region.page(base, page);
            // SAFETY: `page` is below the region's page count, so the destination lies inside the
            // mapping, and the source is a separate buffer or file mapping; no vCPU runs.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), host.add(page * PAGE), PAGE) };
            copied += 1;
        }
        Ok(copied)
    }

    /// New memory with `image`'s content: each region a private mapping of the image's base file
    /// (shared copy-on-write with every other user of it, read lazily) with the image's own pages
    /// copied in.
    pub fn from_image(image: &MemoryImage) -> Result<Self, ImageError> {
        let mut mappings = Vec::with_capacity(image.regions.len());
        let mut regions = Vec::with_capacity(image.regions.len());
        for region in &image.regions {
            let size = region.size as usize;
            let mapping = Mapping::private_of(region.base.file.as_fd(), region.offset, size)
                .map_err(io("cannot map a snapshot's memory file"))?;
            // SAFETY: the mapping is `size` bytes, readable and writable, and lives as long as the
            // region: both are kept in the new memory, the regions dropped first.
            let mmap = unsafe { MmapRegion::build_raw(mapping.addr.cast(), size, MAP_PROT, MAP_FLAGS) }
                .map_err(|e| io("cannot use a snapshot's memory")(std::io::Error::other(e.to_string())))?;
            mappings.push(mapping);
            regions.push(
                GuestRegionMmap::new(mmap, GuestAddress(region.guest_addr)).ok_or_else(|| {
                    io("cannot use a snapshot's memory")(std::io::Error::other("a region wraps around"))
                })?,
            );
        }
        let memory = Self::from_parts(regions, mappings).map_err(io("cannot use a snapshot's memory"))?;
        {
            let mut tracking = lock(&memory.tracking);
            for (index, region) in image.regions.iter().enumerate() {
                tracking.regions[index] = super::RegionTracking {
                    base: Some((region.base.clone(), region.offset)),
                    diverged: region.own_pages(),
                };
                memory.copy_pages_from(index, region, &region.own_pages())?;
            }
            tracking.synced_with = Some(image.id);
        }
        Ok(memory)
    }
}

/// The pages of `[addr, addr + len)` the host has backed (present or swapped out), from
/// `/proc/self/pagemap`; every page when that cannot be read.
fn present_pages(addr: usize, len: usize) -> Vec<usize> {
    let pages = len / PAGE;
    let all = || (0..pages).collect();
    let Ok(mut pagemap) = File::open("/proc/self/pagemap") else { return all() };
    if pagemap.seek(SeekFrom::Start((addr / PAGE * 8) as u64)).is_err() {
        return all();
    }
    const PRESENT_OR_SWAPPED: u64 = (1 << 63) | (1 << 62);
    let mut present = Vec::new();
    let mut entries = vec![0u8; 8 * 4096];
    let mut page = 0;
    while page < pages {
        let want = (pages - page).min(4096) * 8;
        if pagemap.read_exact(&mut entries[..want]).is_err() {
            return all();
        }
        for entry in entries[..want].chunks_exact(8) {
            if u64::from_le_bytes(entry.try_into().expect("8 bytes")) & PRESENT_OR_SWAPPED != 0 {
                present.push(page);
            }
            page += 1;
        }
    }
    present
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{create, read, write};
    use crate::MemoryRegionConfig;

    const LAYOUT: [MemoryRegionConfig; 2] = [
        MemoryRegionConfig { guest_addr: 0, size: 0x10000 },
        MemoryRegionConfig { guest_addr: 0x100000, size: 0x4000 },
    ];

    fn bytes_at(memory: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        read(memory, addr, &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_restore_copies_back_only_what_was_written_since() {
        let memory = create(&LAYOUT, 4).unwrap();
        write(&memory, 0x1000, b"before").unwrap();
        write(&memory, 0x100ffc, b"edge").unwrap();
        let image = memory.capture(Vec::new()).unwrap();
        assert_eq!(image.own_bytes(), 0, "the first capture moves memory into its base file");
        assert_eq!(bytes_at(&memory, 0x1000, 6), b"before", "the VM sees the same bytes over its base");

        for round in 0..3u8 {
            write(&memory, 0x1000, b"after!").unwrap();
            write(&memory, 0x3000 + u64::from(round), &[round + 1]).unwrap();
            let stats = memory.restore(&image, Vec::new()).unwrap();
            assert_eq!(stats, RestoreStats { pages_copied: 2, regions_remapped: 0 });
            assert_eq!(bytes_at(&memory, 0x1000, 6), b"before");
            assert_eq!(bytes_at(&memory, 0x3000, 4), [0; 4]);
            assert_eq!(bytes_at(&memory, 0x100ffc, 4), b"edge");
        }
        // Pages KVM reports as written by the guest are copied back too.
        let mut kvm_dirty = vec![vec![0u64; 1], vec![0u64; 1]];
        kvm_dirty[0][0] = 1 << 5;
        kvm_dirty[1][0] = 1 << 2;
        assert_eq!(memory.restore(&image, kvm_dirty).unwrap().pages_copied, 2);
    }

    #[test]
    fn later_captures_hold_the_pages_that_differ_and_older_images_come_back() {
        let memory = create(&LAYOUT, 4).unwrap();
        write(&memory, 0x2000, b"one").unwrap();
        let first = memory.capture(Vec::new()).unwrap();
        write(&memory, 0x2000, b"two").unwrap();
        write(&memory, 0x101000, b"far").unwrap();
        let second = memory.capture(Vec::new()).unwrap();
        assert_eq!(second.own_bytes(), 2 * PAGE);
        write(&memory, 0x5000, b"three").unwrap();

        memory.restore(&first, Vec::new()).unwrap();
        assert_eq!(bytes_at(&memory, 0x2000, 3), b"one");
        assert_eq!(bytes_at(&memory, 0x101000, 3), [0; 3]);
        assert_eq!(bytes_at(&memory, 0x5000, 5), [0; 5]);
        memory.restore(&second, Vec::new()).unwrap();
        assert_eq!(bytes_at(&memory, 0x2000, 3), b"two");
        assert_eq!(bytes_at(&memory, 0x101000, 3), b"far");
        assert_eq!(bytes_at(&memory, 0x5000, 5), [0; 5]);
        let mut buf = [0; 3];
        first.read(0x2000, &mut buf).unwrap();
        assert_eq!(&buf, b"one", "an image keeps its content whatever the VM does");
    }

    #[test]
    fn memory_made_from_an_image_is_a_private_copy() {
        let parent = create(&LAYOUT, 4).unwrap();
        write(&parent, 0x1000, b"shared").unwrap();
        let _ = parent.capture(Vec::new()).unwrap();
        write(&parent, 0x2000, b"own").unwrap();
        let image = parent.capture(Vec::new()).unwrap();

        let child = GuestMemory::from_image(&image).unwrap();
        assert_eq!(bytes_at(&child, 0x1000, 6), b"shared");
        assert_eq!(bytes_at(&child, 0x2000, 3), b"own");
        write(&child, 0x1000, b"child!").unwrap();
        write(&parent, 0x2000, b"PAR").unwrap();
        assert_eq!(bytes_at(&parent, 0x1000, 6), b"shared");
        assert_eq!(bytes_at(&child, 0x2000, 3), b"own");
        assert!(child.is_tracked());
        child.restore(&image, Vec::new()).unwrap();
        assert_eq!(bytes_at(&child, 0x1000, 6), b"shared");
    }

    #[test]
    fn saved_files_restore_the_same_content_and_wrong_sizes_are_refused() {
        let dir = std::env::temp_dir().join(format!("kvmkit-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let memory = create(&LAYOUT, 4).unwrap();
        write(&memory, 0x1000, b"base").unwrap();
        let _ = memory.capture(Vec::new()).unwrap();
        write(&memory, 0x100000, b"overlay").unwrap();
        let image = memory.capture(Vec::new()).unwrap();
        image.save(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0x14000);

        let opened = MemoryImage::open(&path, &image.regions()).unwrap();
        let restored = GuestMemory::from_image(&opened).unwrap();
        assert_eq!(bytes_at(&restored, 0x1000, 4), b"base");
        assert_eq!(bytes_at(&restored, 0x100000, 7), b"overlay");
        // Restoring the file's image into the first memory maps it over the new base.
        write(&memory, 0x1000, b"gone").unwrap();
        assert_eq!(memory.restore(&opened, Vec::new()).unwrap().regions_remapped, 2);
        assert_eq!(bytes_at(&memory, 0x1000, 4), b"base");

        let err = MemoryImage::open(&path, &[(0, 0x10000)]).unwrap_err();
        assert!(matches!(err, ImageError::WrongSize { actual: 0x14000, expected: 0x10000, .. }), "{err}");
        let err = memory.restore(&MemoryImage::open(&path, &[(0, 0x14000)]).unwrap(), Vec::new()).unwrap_err();
        assert!(matches!(err, ImageError::Layout { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loaned_ranges_count_as_written() {
        let memory = create(&LAYOUT, 4).unwrap();
        let image = memory.capture(Vec::new()).unwrap();
        let (host, loan) = memory.lend(0x7000, 2).unwrap();
        // SAFETY: the loan covers two bytes of guest memory at `host`.
        unsafe { host.copy_from_nonoverlapping([9u8, 9].as_ptr(), 2) };
        assert_eq!(memory.restore(&image, Vec::new()).unwrap().pages_copied, 1);
        assert_eq!(bytes_at(&memory, 0x7000, 2), [0, 0]);
        drop(loan);
        assert_eq!(memory.restore(&image, Vec::new()).unwrap().pages_copied, 0);
    }
}
