//! virtio-blk: a disk backed by a raw image file on the host.
//!
//! The device has one request queue. A request is a descriptor chain: a 16-byte header (type,
//! reserved, first sector) in device-readable buffers, then the data, then one status byte at the
//! very end of the chain, in a device-writable buffer. Buffers may be split or merged freely
//! (virtio 1.x drivers may lay requests out as they like), so the parser treats the readable
//! buffers and the writable buffers as two byte streams.
//!
//! Requests are served synchronously on the event-loop thread: data moves between the image file
//! and guest memory with positional vectored I/O (`preadv`/`pwritev`), without a bounce buffer.
//! A slow host disk therefore delays the VM's other devices while a request is in flight.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{serve_queue, ActiveQueues, DeviceCounters, ModelState, VirtioDevice, F_EVENT_IDX, TYPE_BLOCK};
use crate::ratelimit::guest_log;
use crate::vstate::memory::{GuestMemory, GuestSlice};

/// Bytes in a sector, the unit of the capacity and of request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request, offered in `seg_max`: a chain as long as the queue, less the
/// header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most bytes of a device id (`GET_ID` answers with at most this many, NUL-padded).
pub const ID_LEN: usize = virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Most descriptors in one request; longer chains are refused.
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Bytes of the request header.
pub const HEADER_LEN: usize = 16;

/// Feature bit: the device is read-only.
pub const F_RO: u64 = 1 << virtio_blk::VIRTIO_BLK_F_RO;
/// Feature bit: `seg_max` in the configuration is valid.
pub const F_SEG_MAX: u64 = 1 << virtio_blk::VIRTIO_BLK_F_SEG_MAX;
/// Feature bit: `blk_size` in the configuration is valid.
pub const F_BLK_SIZE: u64 = 1 << virtio_blk::VIRTIO_BLK_F_BLK_SIZE;
/// Feature bit: the device has a write cache and accepts `FLUSH`. A driver that does not accept it
/// expects every write to be durable when it completes, and gets that.
pub const F_FLUSH: u64 = 1 << virtio_blk::VIRTIO_BLK_F_FLUSH;

/// Request type: read sectors into the guest.
pub const T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
/// Request type: write sectors from the guest.
pub const T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
/// Request type: make earlier writes durable.
pub const T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
/// Request type: return the device id string.
pub const T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;

/// Status byte: the request succeeded.
pub const S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
/// Status byte: the request failed.
pub const S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// Status byte: the request type is not supported.
pub const S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Configuration space offset of `capacity` (u64, in sectors).
pub const CONFIG_CAPACITY: usize = 0;
/// Configuration space offset of `seg_max` (u32).
pub const CONFIG_SEG_MAX: usize = 12;
/// Configuration space offset of `blk_size` (u32, bytes).
pub const CONFIG_BLK_SIZE: usize = 20;
/// The configuration fields kvmkit fills end here; reads beyond return zeros.
const CONFIG_LEN: usize = 24;

/// At most this many buffers per vectored system call (the kernel's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image does not exist or cannot be opened or inspected.
    #[error("cannot open disk image {}: {source}", path.display())]
    Open {
        /// The image's path.
        path: PathBuf,
        /// What the host said.
        source: io::Error,
    },
    /// The path names a directory, device or other non-regular file.
    #[error("disk image {} is not a regular file", path.display())]
    NotRegularFile {
        /// The image's path.
        path: PathBuf,
    },
    /// The image has no sectors.
    #[error("disk image {} is empty (0 bytes)", path.display())]
    Empty {
        /// The image's path.
        path: PathBuf,
    },
    /// The image size is not a whole number of sectors.
    #[error("disk image {} is {size} bytes; its size must be a multiple of 512 bytes", path.display())]
    BadSize {
        /// The image's path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// Another disk (of this or another VM or program) holds the image's lock in a way that
    /// excludes this one: any user excludes a read-write disk, a read-write user any disk.
    #[error(
        "disk image {} is locked: another VM or program is using it{}",
        path.display(),
        if *read_only { " read-write" } else { "" }
    )]
    Locked {
        /// The image's path.
        path: PathBuf,
        /// Whether the disk that could not lock it was read-only.
        read_only: bool,
    },
    /// The id given for the device cannot be used.
    #[error("block device id {id:?} must be at most 20 bytes of ASCII without NUL")]
    BadId {
        /// The id given.
        id: String,
    },
}

/// A virtio block device backed by a raw image file.
pub struct Block {
    disk: Disk,
    path: PathBuf,
    config: [u8; CONFIG_LEN],
    counters: Arc<DeviceCounters>,
    active: Option<ActiveQueues>,
}

/// Takes `file`'s lock without waiting: shared when `read_only`, else exclusive. False when it is
/// held elsewhere in a way that excludes this one. The lock goes when the file is closed.
fn lock_image(file: &File, read_only: bool) -> io::Result<bool> {
    let operation = if read_only { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    loop {
        // SAFETY: the descriptor is open for the call (`file` owns it); flock touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(true);
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(error),
        }
    }
}

/// The back end: the image file and what requests need to know about it.
struct Disk {
    file: File,
    /// Size in bytes, a non-zero multiple of [`SECTOR_SIZE`].
    size: u64,
    read_only: bool,
    /// NUL-padded id string.
    id: [u8; ID_LEN],
    /// Whether each write must be durable before it completes (the driver did not accept
    /// [`F_FLUSH`], so it will never ask for a flush).
    write_through: bool,
}

impl Block {
    /// A block device on the raw image at `path`, opened read-write, or read-only when
    /// `read_only` (then the driver is told so and writes fail). Its id is derived from the file
    /// (device and inode numbers), so it stays the same across runs on the same image.
    /// The image is locked as [`open`](Self::open) describes.
    pub fn new(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        Self::open(path, read_only, None, true)
    }

    /// Like [`new`](Self::new), with the id `GET_ID` returns: at most [`ID_LEN`] ASCII bytes,
    /// without NUL.
    pub fn with_id(path: &Path, read_only: bool, id: &str) -> Result<Self, BlockError> {
        Self::open(path, read_only, Some(id), true)
    }

    /// Like [`new`](Self::new), with an id when `id` is given, and with `lock`, an advisory
    /// lock on the image for as long as the device lives (`flock`, which other programs such as
    /// QEMU's users of the same file can see): shared for a read-only disk, exclusive for a
    /// read-write one, so that nothing writes an image another disk uses. A lock held elsewhere
    /// fails with [`BlockError::Locked`].
    pub fn open(path: &Path, read_only: bool, id: Option<&str>, lock: bool) -> Result<Self, BlockError> {
        let open_error = |source| BlockError::Open { path: path.to_owned(), source };
        let not_regular = || BlockError::NotRegularFile { path: path.to_owned() };
        // Checked before opening: opening a FIFO would block, and a directory cannot be opened
        // for writing, which would hide the real problem behind an OS error.
        if !std::fs::metadata(path).map_err(open_error)?.is_file() {
            return Err(not_regular());
        }
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_error)?;
        // Checked again on what was opened, in case the path changed in between.
        let metadata = file.metadata().map_err(open_error)?;
        if !metadata.is_file() {
            return Err(not_regular());
        }
        if lock && !lock_image(&file, read_only).map_err(open_error)? {
            return Err(BlockError::Locked { path: path.to_owned(), read_only });
        }
        let size = metadata.len();
        if size == 0 {
            return Err(BlockError::Empty { path: path.to_owned() });
        }
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::BadSize { path: path.to_owned(), size });
        }
        let id = match id {
            Some(id) => id.to_owned(),
            // 13 hex digits (52 bits) of the file's identity make the id exactly 20 bytes.
            None => format!("kvmkit-{:013x}", (metadata.dev().rotate_left(32) ^ metadata.ino()) & ((1 << 52) - 1)),
        };
        if id.len() > ID_LEN || !id.is_ascii() || id.contains('\0') {
            return Err(BlockError::BadId { id });
        }
        let mut id_bytes = [0u8; ID_LEN];
        id_bytes[..id.len()].copy_from_slice(id.as_bytes());

        let mut config = [0u8; CONFIG_LEN];
        config[CONFIG_CAPACITY..CONFIG_CAPACITY + 8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
        config[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[CONFIG_BLK_SIZE..CONFIG_BLK_SIZE + 4].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Self {
            disk: Disk { file, size, read_only, id: id_bytes, write_through: false },
            path: path.to_owned(),
            config,
            counters: Arc::default(),
            active: None,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The capacity in sectors of [`SECTOR_SIZE`] bytes.
    pub fn capacity(&self) -> u64 {
        self.disk.size / SECTOR_SIZE
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    /// The id `GET_ID` returns.
    pub fn id(&self) -> &str {
        let len = self.disk.id.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
        // Only ASCII is ever stored.
        std::str::from_utf8(&self.disk.id[..len]).unwrap_or_default()
    }

    /// Serves one request made of `descriptors` in `memory`, as the device does for each chain
    /// the driver makes available: parses it ([`parse_request`]), does the I/O, writes the status
    /// byte and updates the counters. Returns the length for the used ring: the bytes written
    /// into guest buffers, status included, or 0 when the chain has nowhere to put a status.
    ///
    /// Any descriptors and any memory contents are fine (this is the entry point for fuzzing):
    /// a bad request fails with a status, never with a panic or an access outside `memory`.
    pub fn serve_request(&mut self, memory: &GuestMemory, descriptors: impl IntoIterator<Item = Descriptor>) -> u32 {
        self.disk.serve(memory, descriptors, &self.counters)
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Write the device id into the data buffers.
    GetId,
    /// A type the device does not support; it completes with [`S_UNSUPP`].
    Unsupported(u32),
}

/// A well-formed request: what it asks for and where its buffers are. Every buffer it names lies
/// inside the guest memory it was parsed against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What the request asks for.
    pub request_type: RequestType,
    /// First sector, for [`RequestType::In`] and [`RequestType::Out`].
    pub sector: u64,
    /// The data buffers, in order, as (address, length): read for `Out`, written for `In` and
    /// `GetId`, empty otherwise. Their total length is a multiple of [`SECTOR_SIZE`] for `In`
    /// and `Out`.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total length of the data buffers.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|&(_, len)| u64::from(len)).sum()
    }
}

/// Why a descriptor chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain is longer than [`MAX_DESCRIPTORS`].
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// The chain does not end in a device-writable byte for the status.
    #[error("the chain does not end with a device-writable byte for the status")]
    NoStatus,
    /// The status byte is not in guest memory.
    #[error("the status byte is outside guest memory")]
    StatusOutsideMemory,
    /// A device-readable buffer follows a device-writable one.
    #[error("a device-readable buffer follows a device-writable one")]
    ReadableAfterWritable,
    /// A buffer is not (entirely) in guest memory.
    #[error("the {len}-byte buffer at {addr:#x} is outside guest memory")]
    OutsideMemory {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The readable buffers hold less than a whole header.
    #[error("the request header has {0} bytes instead of 16")]
    ShortHeader(usize),
    /// An `In` or `Out` request's data is not a whole number of sectors.
    #[error("the data length {0} is not a multiple of 512 bytes")]
    UnalignedData(u64),
    /// A read request has device-readable data after its header.
    #[error("a read request has device-readable data buffers")]
    ReadableData,
    /// A write request has device-writable buffers besides the status byte.
    #[error("a write request has device-writable data buffers")]
    WritableData,
}

/// A descriptor chain that is not a valid request, and where to report that.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidRequest {
    /// What is wrong.
    pub reason: RequestError,
    /// Where the `S_IOERR` status goes; `None` when the chain has nowhere to put one.
    pub status: Option<GuestAddress>,
}

/// Parses the request made of `descriptors` (a chain, in order) in `memory`, without doing it.
///
/// The status is the last byte of the last descriptor, which must be device-writable. The
/// header is the first 16 bytes of the device-readable buffers; for `Out` the rest of them is
/// the data. For `In` and `GetId` the data is the device-writable bytes before the status.
/// Zero-length buffers are ignored. Reads guest memory for the header only, and at most
/// [`MAX_DESCRIPTORS`] + 1 items of `descriptors`, so any input is safe.
pub fn parse_request(
    memory: &GuestMemory,
    descriptors: impl IntoIterator<Item = Descriptor>,
) -> Result<Request, InvalidRequest> {
    let fail = |reason, status| InvalidRequest { reason, status };
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut misplaced = false;
    let mut last = None;
    for (count, desc) in descriptors.into_iter().enumerate() {
        if count == MAX_DESCRIPTORS {
            return Err(fail(RequestError::TooManyDescriptors, None));
        }
        last = Some(desc);
        if desc.len() == 0 {
            continue;
        }
        let buffer = (desc.addr(), desc.len());
        if desc.is_write_only() {
            writable.push(buffer);
        } else if writable.is_empty() {
            readable.push(buffer);
        } else {
            misplaced = true;
        }
    }

    let Some(last) = last.filter(|d| d.is_write_only() && d.len() > 0) else {
        return Err(fail(RequestError::NoStatus, None));
    };
    let status = last.addr().0.checked_add(u64::from(last.len()) - 1).map(GuestAddress);
    let Some(status) = status.filter(|&addr| memory.check_range(addr, 1)) else {
        return Err(fail(RequestError::StatusOutsideMemory, None));
    };
    // The last writable buffer is `last`: take the status byte off it.
    if let Some(end) = writable.last_mut() {
        end.1 -= 1;
        if end.1 == 0 {
            writable.pop();
        }
    }
    let fail = |reason| fail(reason, Some(status));

    if misplaced {
        return Err(fail(RequestError::ReadableAfterWritable));
    }
    for &(addr, len) in readable.iter().chain(&writable) {
        if !memory.check_range(addr, len as usize) {
            return Err(fail(RequestError::OutsideMemory { addr: addr.0, len }));
        }
    }
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    for &(addr, len) in &readable {
        let take = (len as usize).min(HEADER_LEN - filled);
        if take == 0 {
            break;
        }
        // In range: checked above.
        if memory.read_slice(&mut header[filled..filled + take], addr).is_err() {
            return Err(fail(RequestError::OutsideMemory { addr: addr.0, len }));
        }
        filled += take;
    }
    if filled < HEADER_LEN {
        return Err(fail(RequestError::ShortHeader(filled)));
    }
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let body = skip_bytes(&readable, HEADER_LEN);

    let (request_type, data) = match request_type {
        T_IN if !body.is_empty() => return Err(fail(RequestError::ReadableData)),
        T_IN => (RequestType::In, writable),
        T_OUT if !writable.is_empty() => return Err(fail(RequestError::WritableData)),
        T_OUT => (RequestType::Out, body),
        // Data sent with a flush is allowed (though pointless) and ignored.
        T_FLUSH => (RequestType::Flush, Vec::new()),
        T_GET_ID => (RequestType::GetId, writable),
        other => (RequestType::Unsupported(other), Vec::new()),
    };
    let request = Request { request_type, sector, data, status };
    if matches!(request_type, RequestType::In | RequestType::Out) && request.data_len() % SECTOR_SIZE != 0 {
        return Err(fail(RequestError::UnalignedData(request.data_len())));
    }
    Ok(request)
}

/// `buffers` without their first `count` bytes.
fn skip_bytes(buffers: &[(GuestAddress, u32)], count: usize) -> Vec<(GuestAddress, u32)> {
    let mut left = count as u64;
    let mut rest = Vec::new();
    for &(addr, len) in buffers {
        let len = u64::from(len);
        if left >= len {
            left -= len;
            continue;
        }
        // `left` < `len` <= u32::MAX, and `addr + len` did not overflow when it was checked.
        rest.push((GuestAddress(addr.0 + left), (len - left) as u32));
        left = 0;
    }
    rest
}

/// Why a parsed request failed.
enum Failure {
    Unsupported(u32),
    Io(String),
}

/// What a request moved, for the counters.
#[derive(Default)]
struct Moved {
    to_guest: u64,
    from_guest: u64,
}

impl Disk {
    fn serve(
        &mut self,
        memory: &GuestMemory,
        descriptors: impl IntoIterator<Item = Descriptor>,
        counters: &DeviceCounters,
    ) -> u32 {
        let (status, moved, addr) = match parse_request(memory, descriptors) {
            Ok(request) => match self.execute(memory, &request) {
                Ok(moved) => (S_OK, moved, Some(request.status)),
                Err(Failure::Unsupported(kind)) => {
                    guest_log!(log::Level::Debug, "virtio-blk: unsupported request type {kind}");
                    (S_UNSUPP, Moved::default(), Some(request.status))
                }
                Err(Failure::Io(why)) => {
                    guest_log!(log::Level::Debug, "virtio-blk: request failed: {why}");
                    (S_IOERR, Moved::default(), Some(request.status))
                }
            },
            Err(invalid) => {
                guest_log!(log::Level::Debug, "virtio-blk: bad request: {invalid}");
                (S_IOERR, Moved::default(), invalid.status)
            }
        };
        counters.count_request(moved.to_guest, moved.from_guest);
        if status != S_OK {
            counters.count_error();
        }
        let Some(addr) = addr else {
            return 0; // nowhere to report: the driver gets the chain back with nothing written
        };
        if memory.write_obj(status, addr).is_err() {
            // Not expected: the parser checked the address.
            if status == S_OK {
                counters.count_error();
            }
            return 0;
        }
        u32::try_from(moved.to_guest.saturating_add(1)).unwrap_or(u32::MAX)
    }

    fn execute(&self, memory: &GuestMemory, request: &Request) -> Result<Moved, Failure> {
        match request.request_type {
            RequestType::In => {
                let len = request.data_len();
                let offset = self.offset_of(request.sector, len)?;
                transfer(&self.file, offset, &slices(memory, &request.data)?, Direction::ToGuest)
                    .map_err(|e| self.host_error("read", e))?;
                Ok(Moved { to_guest: len, from_guest: 0 })
            }
            RequestType::Out => {
                if self.read_only {
                    return Err(Failure::Io("write to a read-only device".into()));
                }
                let len = request.data_len();
                let offset = self.offset_of(request.sector, len)?;
                transfer(&self.file, offset, &slices(memory, &request.data)?, Direction::FromGuest)
                    .map_err(|e| self.host_error("write", e))?;
                if self.write_through {
                    self.file.sync_data().map_err(|e| self.host_error("sync", e))?;
                }
                Ok(Moved { to_guest: 0, from_guest: len })
            }
            RequestType::Flush => {
                // A read-only image has nothing to make durable.
                if !self.read_only {
                    self.file.sync_data().map_err(|e| self.host_error("sync", e))?;
                }
                Ok(Moved::default())
            }
            RequestType::GetId => {
                let mut written = 0;
                for &(addr, len) in &request.data {
                    let take = (len as usize).min(ID_LEN - written);
                    if take == 0 {
                        break;
                    }
                    memory
                        .write_slice(&self.id[written..written + take], addr)
                        .map_err(|e| Failure::Io(format!("cannot write the id: {e}")))?;
                    written += take;
                }
                Ok(Moved { to_guest: written as u64, from_guest: 0 })
            }
            RequestType::Unsupported(kind) => Err(Failure::Unsupported(kind)),
        }
    }

    /// The byte offset of `len` bytes from `sector`, if they lie within the disk.
    fn offset_of(&self, sector: u64, len: u64) -> Result<u64, Failure> {
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|offset| offset.checked_add(len).is_some_and(|end| end <= self.size))
            .ok_or_else(|| Failure::Io(format!("{len} bytes from sector {sector} are past the end of the disk")))
    }

    fn host_error(&self, what: &str, error: io::Error) -> Failure {
        // The host failed, not the driver: worth a warning.
        guest_log!(log::Level::Warn, "virtio-blk: {what} of the disk image failed: {error}");
        Failure::Io(format!("host {what} failed: {error}"))
    }
}

/// The host memory behind guest buffers `data`, in order, without empty pieces.
fn slices<'m>(memory: &'m GuestMemory, data: &[(GuestAddress, u32)]) -> Result<Vec<GuestSlice<'m>>, Failure> {
    let mut slices = Vec::with_capacity(data.len());
    for &(addr, len) in data {
        for slice in memory.get_slices(addr, len as usize) {
            let slice = slice.map_err(|e| Failure::Io(format!("guest buffer at {:#x}: {e}", addr.0)))?;
            if !slice.is_empty() {
                slices.push(slice);
            }
        }
    }
    Ok(slices)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToGuest,
    FromGuest,
}

/// Moves data between the file from byte `offset` and `slices` (none empty), as few system calls
/// as the kernel allows: each call takes up to [`MAX_IOVECS`] buffers and may move less than
/// asked, so this goes on from where the last one stopped until all is done.
fn transfer(file: &File, mut offset: u64, slices: &[GuestSlice<'_>], direction: Direction) -> io::Result<()> {
    if direction == Direction::ToGuest {
        // The kernel writes these through raw pointers, which vm-memory's dirty bitmap cannot see.
        slices.iter().for_each(|slice| slice.bitmap().mark_dirty(0, slice.len()));
    }
    let mut first = 0; // the first slice not entirely done
    let mut done_in_first = 0; // bytes of it already done
    while first < slices.len() {
        let end = slices.len().min(first + MAX_IOVECS);
        let batch: Vec<GuestSlice<'_>> = std::iter::once(slices[first].offset(done_in_first))
            .chain(slices[first + 1..end].iter().map(|s| Ok(*s)))
            .collect::<Result<_, _>>()
            .map_err(io::Error::other)?;
        // The guards keep the memory mapped until the call returns.
        let guards: Vec<_> = batch.iter().map(|s| s.ptr_guard_mut()).collect();
        let iovecs: Vec<libc::iovec> = batch
            .iter()
            .zip(&guards)
            .map(|(slice, guard)| libc::iovec { iov_base: guard.as_ptr().cast(), iov_len: slice.len() })
            .collect();
        let position = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // At most MAX_IOVECS, which fits.
        let count = iovecs.len() as libc::c_int;
        let fd = file.as_raw_fd();
        let result = match direction {
            // SAFETY: each iovec covers one guest memory slice, which stays mapped while its
            // guard lives; the kernel writes at most those bytes. `fd` is the open image file.
            Direction::ToGuest => unsafe { libc::preadv(fd, iovecs.as_ptr(), count, position) },
            // SAFETY: as above; the kernel only reads the buffers.
            Direction::FromGuest => unsafe { libc::pwritev(fd, iovecs.as_ptr(), count, position) },
        };
        drop(guards);
        let mut moved = match usize::try_from(result) {
            Ok(0) => {
                // The file shrank under the device (a read at its end), or the write went
                // nowhere: either way the request cannot finish.
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the disk image ended early"));
            }
            Ok(moved) => moved,
            Err(_) => {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
        };
        offset += moved as u64;
        // Each step finishes a slice or uses up `moved`, so this ends.
        while moved > 0 && first < slices.len() {
            let left = slices[first].len() - done_in_first;
            if moved >= left {
                moved -= left;
                first += 1;
                done_in_first = 0;
            } else {
                done_in_first += moved;
                moved = 0;
            }
        }
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_FLUSH | F_SEG_MAX | F_BLK_SIZE | F_EVENT_IDX | if self.disk.read_only { F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.checked_add(i as u64).and_then(|at| usize::try_from(at).ok());
            *byte = at.and_then(|at| self.config.get(at)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), String> {
        if active.queues.len() != 1 {
            return Err(format!("virtio-blk has 1 queue, got {}", active.queues.len()));
        }
        self.disk.write_through = active.features & F_FLUSH == 0;
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, index: usize) {
        let Some(ActiveQueues { memory, queues, interrupt, .. }) = &mut self.active else { return };
        let Some(queue) = queues.get_mut(index) else { return };
        let (disk, counters) = (&mut self.disk, &self.counters);
        serve_queue(queue, memory, interrupt, |chain| Some(disk.serve(memory, chain, counters)));
    }

    fn counters(&self) -> &Arc<DeviceCounters> {
        &self.counters
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|active| &active.queues[..])
    }

    fn save_state(&self) -> ModelState {
        ModelState::Block
    }

    fn restore_state(&mut self, _state: &ModelState) {}
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use virtio_queue::desc::RawDescriptor;

    use super::*;
    use crate::devices::virtio::testing::{MockDriver, DATA_START, MEMORY_SIZE, NEXT, WRITE};
    use crate::devices::virtio::{CounterSnapshot, F_VERSION_1};
    use crate::snapshot::Persist;

    /// A file (or directory) in the temporary directory, removed when dropped.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new() -> Self {
            static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            Self(std::env::temp_dir().join(format!("kvmkit-block-test-{}-{id}", std::process::id())))
        }

        fn image(contents: &[u8]) -> Self {
            let path = Self::new();
            std::fs::write(&path.0, contents).unwrap();
            path
        }

        fn contents(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0).or_else(|_| std::fs::remove_dir(&self.0));
        }
    }

    /// Disk contents in which every sector differs from the others.
    fn pattern(sectors: usize) -> Vec<u8> {
        (0..sectors * 512).map(|i| (i % 251) as u8 ^ (i / 512) as u8).collect()
    }

    const HEADER: u64 = DATA_START;
    const STATUS: u64 = DATA_START + 0x800;
    const DATA: u64 = DATA_START + 0x1000;
    const DATA2: u64 = DATA_START + 0x10_0000;
    const SECTORS: usize = 16;

    struct Setup {
        image: TempPath,
        driver: MockDriver<Block>,
    }

    fn setup(read_only: bool, features: u64) -> Setup {
        let image = TempPath::image(&pattern(SECTORS));
        let mut driver = MockDriver::new(Block::new(&image.0, read_only).unwrap());
        driver.activate(features);
        Setup { image, driver }
    }

    fn write_header(driver: &MockDriver<Block>, addr: u64, kind: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        driver.write_mem(addr, &header);
    }

    /// Submits a request with the usual layout (header, `data`, status), notifies, and returns
    /// its used length and status byte (0xff if the device did not write it).
    fn request(driver: &mut MockDriver<Block>, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u32, u8) {
        write_header(driver, HEADER, kind, sector);
        let mut chain = vec![(HEADER, 16, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        submit(driver, &chain)
    }

    /// Submits `chain`, notifies, and returns its used length and the byte at STATUS.
    fn submit(driver: &mut MockDriver<Block>, chain: &[(u64, u32, bool)]) -> (u32, u8) {
        driver.write_mem(STATUS, &[0xff]);
        let before = driver.used(0).len();
        let head = driver.add_chain(0, chain);
        driver.notify(0);
        let used = driver.used(0);
        assert_eq!(used.len(), before + 1, "the request must complete");
        assert_eq!(used[before].0, head as u32);
        assert!(!driver.needs_reset(), "a bad request must not break the device");
        (used[before].1, driver.read_mem(STATUS, 1)[0])
    }

    fn counters(driver: &MockDriver<Block>) -> CounterSnapshot {
        driver.device.lock().unwrap().counters().snapshot()
    }

    #[test]
    fn reads_sectors_into_scattered_buffers() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        driver.write_mem(DATA, &[0xee; 512]);
        driver.write_mem(DATA2, &[0xee; 1024]);
        let (len, status) = request(&mut driver, T_IN, 2, &[(DATA, 512, true), (DATA2, 1024, true)]);
        assert_eq!((len, status), (1536 + 1, S_OK));
        let file = image.contents();
        assert_eq!(driver.read_mem(DATA, 512), file[1024..1536]);
        assert_eq!(driver.read_mem(DATA2, 1024), file[1536..2560]);
        assert!(driver.take_interrupt());
        let c = counters(&driver);
        assert_eq!((c.requests, c.bytes_to_guest, c.bytes_from_guest, c.errors), (1, 1536, 0, 0));
    }

    #[test]
    fn writes_sectors_to_the_image() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        let data: Vec<u8> = (0..1536).map(|i| (i * 13 % 256) as u8).collect();
        driver.write_mem(DATA, &data[..1024]);
        driver.write_mem(DATA2, &data[1024..]);
        let (len, status) = request(&mut driver, T_OUT, 5, &[(DATA, 1024, false), (DATA2, 512, false)]);
        assert_eq!((len, status), (1, S_OK));
        let mut expected = pattern(SECTORS);
        expected[5 * 512..8 * 512].copy_from_slice(&data);
        assert_eq!(image.contents(), expected);
        let c = counters(&driver);
        assert_eq!((c.requests, c.bytes_to_guest, c.bytes_from_guest, c.errors), (1, 0, 1536, 0));

        // What was written reads back, here into one buffer.
        let (len, status) = request(&mut driver, T_IN, 5, &[(DATA + 0x4000, 1536, true)]);
        assert_eq!((len, status), (1537, S_OK));
        assert_eq!(driver.read_mem(DATA + 0x4000, 1536), data);
    }

    #[test]
    fn writes_through_when_the_driver_takes_no_flush() {
        let Setup { image, mut driver } = setup(false, 0);
        driver.write_mem(DATA, &[0x5a; 512]);
        assert_eq!(request(&mut driver, T_OUT, 0, &[(DATA, 512, false)]), (1, S_OK));
        assert_eq!(image.contents()[..512], [0x5a; 512]);
    }

    #[test]
    fn many_requests_in_one_notification_interrupt_once() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        write_header(&driver, HEADER, T_IN, 0);
        write_header(&driver, HEADER + 16, T_IN, 15);
        let first = driver.add_chain(0, &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        let second = driver.add_chain(0, &[(HEADER + 16, 16, false), (DATA2, 512, true), (STATUS + 1, 1, true)]);
        driver.notify(0);
        assert_eq!(driver.used(0), [(first as u32, 513), (second as u32, 513)]);
        assert_eq!(driver.read_mem(STATUS, 2), [S_OK, S_OK]);
        let file = image.contents();
        assert_eq!(driver.read_mem(DATA, 512), file[..512]);
        assert_eq!(driver.read_mem(DATA2, 512), file[15 * 512..]);
        assert!(driver.take_interrupt());
        assert!(!driver.take_interrupt());
        assert_eq!(counters(&driver).interrupts, 1);
    }

    #[test]
    fn flush_succeeds() {
        let Setup { mut driver, .. } = setup(false, F_FLUSH);
        assert_eq!(request(&mut driver, T_FLUSH, 0, &[]), (1, S_OK));
        let Setup { mut driver, .. } = setup(true, F_FLUSH | F_RO);
        assert_eq!(request(&mut driver, T_FLUSH, 0, &[]), (1, S_OK));
        assert_eq!(counters(&driver).errors, 0);
    }

    #[test]
    fn get_id_returns_the_given_or_a_stable_default_id() {
        let image = TempPath::image(&pattern(1));
        let mut driver = MockDriver::new(Block::with_id(&image.0, false, "disk-7").unwrap());
        driver.activate(F_FLUSH);
        driver.write_mem(DATA, &[0xee; 32]);
        assert_eq!(request(&mut driver, T_GET_ID, 0, &[(DATA, 20, true)]), (21, S_OK));
        let mut expected = b"disk-7".to_vec();
        expected.resize(20, 0);
        expected.extend([0xee; 12]);
        assert_eq!(driver.read_mem(DATA, 32), expected, "NUL-padded to 20 bytes, nothing beyond");
        assert_eq!(counters(&driver).bytes_to_guest, 20);

        // A short buffer gets what fits.
        assert_eq!(request(&mut driver, T_GET_ID, 0, &[(DATA2, 4, true)]), (5, S_OK));
        assert_eq!(driver.read_mem(DATA2, 4), b"disk");

        drop(driver); // which holds the image's lock
        let default = Block::new(&image.0, false).unwrap();
        assert!(default.id().starts_with("kvmkit-") && default.id().len() == ID_LEN, "{}", default.id());
        let again = Block::open(&image.0, true, None, false).unwrap();
        assert_eq!(default.id(), again.id(), "the default id is stable");
        let mut driver = MockDriver::new(default);
        driver.activate(F_FLUSH);
        assert_eq!(request(&mut driver, T_GET_ID, 0, &[(DATA, 20, true)]), (21, S_OK));
        let id = driver.device.lock().unwrap().id().to_owned();
        assert_eq!(driver.read_mem(DATA, 20), id.as_bytes());
    }

    #[test]
    fn read_only_device_offers_ro_and_refuses_writes() {
        let Setup { image, mut driver } = setup(true, F_FLUSH | F_RO);
        assert!(driver.device.lock().unwrap().read_only());
        assert_eq!(driver.device_features(), F_VERSION_1 | F_FLUSH | F_SEG_MAX | F_BLK_SIZE | F_EVENT_IDX | F_RO);
        driver.write_mem(DATA, &[0x11; 512]);
        assert_eq!(request(&mut driver, T_OUT, 0, &[(DATA, 512, false)]), (1, S_IOERR));
        assert_eq!(image.contents(), pattern(SECTORS), "the image is unchanged");
        assert_eq!(request(&mut driver, T_IN, 1, &[(DATA, 512, true)]), (513, S_OK));
        assert_eq!(driver.read_mem(DATA, 512), pattern(SECTORS)[512..1024]);
        let c = counters(&driver);
        assert_eq!((c.requests, c.errors, c.bytes_from_guest, c.bytes_to_guest), (2, 1, 0, 512));
    }

    #[test]
    fn offers_flush_seg_max_and_blk_size_but_not_ro_when_writable() {
        let Setup { driver, .. } = setup(false, F_FLUSH);
        assert_eq!(driver.device_features(), F_VERSION_1 | F_FLUSH | F_SEG_MAX | F_BLK_SIZE | F_EVENT_IDX);
        assert_eq!(driver.read(0x08), TYPE_BLOCK);
        driver.write(0x30, 0);
        assert_eq!(driver.read(0x34), 256, "queue size");
    }

    #[test]
    fn config_space_has_capacity_seg_max_and_blk_size() {
        let Setup { driver, .. } = setup(false, F_FLUSH);
        assert_eq!(driver.config(CONFIG_CAPACITY as u64, 8), (SECTORS as u64).to_le_bytes());
        assert_eq!(driver.config(8, 4), [0; 4], "no size_max");
        assert_eq!(driver.config(CONFIG_SEG_MAX as u64, 4), 254u32.to_le_bytes());
        assert_eq!(driver.config(16, 4), [0; 4], "no geometry");
        assert_eq!(driver.config(CONFIG_BLK_SIZE as u64, 4), 512u32.to_le_bytes());
        // Any offset and width: a byte-wise read agrees with the whole, bytes past the end are 0.
        let whole = driver.config(0, 64);
        assert!(whole[24..].iter().all(|&b| b == 0));
        for offset in 0..64 {
            assert_eq!(driver.config(offset, 1)[0], whole[offset as usize]);
        }
        assert_eq!(driver.config(1, 3), whole[1..4]);
        let mut far = [0xffu8; 8];
        driver.device.lock().unwrap().read_config(u64::MAX - 3, &mut far);
        assert_eq!(far, [0; 8]);
        assert_eq!(driver.device.lock().unwrap().capacity(), SECTORS as u64);
    }

    #[test]
    fn requests_past_the_end_fail() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        let last = SECTORS as u64 - 1;
        driver.write_mem(DATA, &[0xee; 1024]);
        // The last sector reads; two sectors from it do not, and nothing is read.
        assert_eq!(request(&mut driver, T_IN, last, &[(DATA, 512, true)]), (513, S_OK));
        driver.write_mem(DATA, &[0xee; 1024]);
        assert_eq!(request(&mut driver, T_IN, last, &[(DATA, 1024, true)]), (1, S_IOERR));
        assert_eq!(driver.read_mem(DATA, 1024), [0xee; 1024]);
        assert_eq!(request(&mut driver, T_OUT, last, &[(DATA, 1024, false)]), (1, S_IOERR));
        assert_eq!(request(&mut driver, T_IN, SECTORS as u64 + 1, &[]), (1, S_IOERR));
        // sector * 512 overflows u64, or the end does.
        for sector in [u64::MAX, u64::MAX / 512 + 1, u64::MAX / 512] {
            assert_eq!(request(&mut driver, T_OUT, sector, &[(DATA, 512, false)]), (1, S_IOERR));
            assert_eq!(request(&mut driver, T_IN, sector, &[(DATA, 512, true)]), (1, S_IOERR));
        }
        assert_eq!(image.contents(), pattern(SECTORS));
        assert_eq!(image.contents().len(), SECTORS * 512, "the image did not grow");
        assert_eq!(counters(&driver).errors, 9);
    }

    #[test]
    fn header_and_data_may_be_split_or_merged_across_descriptors() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        // Header in two pieces, far apart.
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&T_IN.to_le_bytes());
        header[8..].copy_from_slice(&3u64.to_le_bytes());
        driver.write_mem(HEADER, &header[..5]);
        driver.write_mem(DATA2, &header[5..]);
        let chain = [(HEADER, 5, false), (DATA2, 11, false), (DATA, 512, true), (STATUS, 1, true)];
        assert_eq!(submit(&mut driver, &chain), (513, S_OK));
        assert_eq!(driver.read_mem(DATA, 512), image.contents()[3 * 512..4 * 512]);

        // Header and data in one readable buffer; data and status in one writable buffer.
        write_header(&driver, DATA, T_OUT, 1);
        driver.write_mem(DATA + 16, &[0x77; 512]);
        let status = DATA2 + 0x2000;
        driver.write_mem(status, &[0xff]);
        let head = driver.add_chain(0, &[(DATA, 16 + 512, false), (status, 1, true)]);
        driver.notify(0);
        assert_eq!(*driver.used(0).last().unwrap(), (head as u32, 1));
        assert_eq!(driver.read_mem(status, 1), [S_OK]);
        assert_eq!(image.contents()[512..1024], [0x77; 512]);

        write_header(&driver, HEADER, T_IN, 1);
        let head = driver.add_chain(0, &[(HEADER, 16, false), (DATA2, 513, true)]);
        driver.notify(0);
        assert_eq!(*driver.used(0).last().unwrap(), (head as u32, 513));
        assert_eq!(driver.read_mem(DATA2, 513), [[0x77; 512].as_slice(), &[S_OK]].concat());

        // Zero-length descriptors are skipped.
        let chain = [(HEADER, 0, false), (HEADER, 16, false), (DATA, 0, true), (DATA, 512, true), (STATUS, 1, true)];
        assert_eq!(submit(&mut driver, &chain), (513, S_OK));
    }

    #[test]
    fn data_must_be_whole_sectors() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        driver.write_mem(DATA, &[0xee; 1024]);
        assert_eq!(request(&mut driver, T_IN, 0, &[(DATA, 100, true)]), (1, S_IOERR));
        assert_eq!(request(&mut driver, T_IN, 0, &[(DATA, 512, true), (DATA2, 511, true)]), (1, S_IOERR));
        assert_eq!(driver.read_mem(DATA, 1024), [0xee; 1024]);
        assert_eq!(request(&mut driver, T_OUT, 0, &[(DATA, 700, false)]), (1, S_IOERR));
        assert_eq!(image.contents(), pattern(SECTORS));
        // No data at all is a valid, empty transfer.
        assert_eq!(request(&mut driver, T_IN, 0, &[]), (1, S_OK));
    }

    #[test]
    fn a_chain_without_a_status_byte_completes_with_nothing_written() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        driver.write_mem(DATA, &[0x33; 512]);
        // Header and data only.
        write_header(&driver, HEADER, T_OUT, 0);
        assert_eq!(submit(&mut driver, &[(HEADER, 16, false), (DATA, 512, false)]), (0, 0xff));
        // The status descriptor is device-readable.
        write_header(&driver, HEADER, T_IN, 0);
        driver.write_mem(DATA, &[0xee; 512]);
        assert_eq!(submit(&mut driver, &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, false)]), (0, 0xff));
        assert_eq!(driver.read_mem(DATA, 512), [0xee; 512], "nothing read into the data buffer");
        // The last descriptor is writable but empty.
        assert_eq!(submit(&mut driver, &[(HEADER, 16, false), (STATUS, 0, true)]), (0, 0xff));
        // The status byte lies outside guest memory.
        assert_eq!(submit(&mut driver, &[(HEADER, 16, false), (MEMORY_SIZE, 1, true)]), (0, 0xff));
        assert_eq!(submit(&mut driver, &[(HEADER, 16, false), (u64::MAX, 2, true)]), (0, 0xff));
        assert_eq!(image.contents(), pattern(SECTORS));
        let c = counters(&driver);
        assert_eq!((c.requests, c.errors), (5, 5));
    }

    #[test]
    fn buffers_outside_guest_memory_fail_the_request() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        assert_eq!(request(&mut driver, T_IN, 0, &[(MEMORY_SIZE, 512, true)]), (1, S_IOERR));
        assert_eq!(request(&mut driver, T_IN, 0, &[(MEMORY_SIZE - 256, 512, true)]), (1, S_IOERR));
        assert_eq!(request(&mut driver, T_IN, 0, &[(u64::MAX - 100, 512, true)]), (1, S_IOERR));
        assert_eq!(request(&mut driver, T_OUT, 0, &[(MEMORY_SIZE + 0x1000, 512, false)]), (1, S_IOERR));
        assert_eq!(request(&mut driver, T_OUT, 0, &[(DATA, 512, false), (u64::MAX - 1, 512, false)]), (1, S_IOERR));
        // The header outside memory.
        assert_eq!(submit(&mut driver, &[(MEMORY_SIZE - 8, 16, false), (STATUS, 1, true)]), (1, S_IOERR));
        assert_eq!(image.contents(), pattern(SECTORS));
        assert_eq!(counters(&driver).errors, 6);
    }

    #[test]
    fn data_buffers_in_the_wrong_direction_fail_the_request() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        driver.write_mem(DATA, &[0xee; 512]);
        // A read into a device-readable buffer.
        assert_eq!(request(&mut driver, T_IN, 0, &[(DATA, 512, false)]), (1, S_IOERR));
        assert_eq!(driver.read_mem(DATA, 512), [0xee; 512]);
        // A write from a device-writable buffer.
        assert_eq!(request(&mut driver, T_OUT, 0, &[(DATA, 512, true)]), (1, S_IOERR));
        assert_eq!(image.contents(), pattern(SECTORS));
        // A readable buffer after a writable one.
        write_header(&driver, HEADER, T_IN, 0);
        let chain = [(HEADER, 16, false), (DATA, 512, true), (DATA2, 512, false), (STATUS, 1, true)];
        assert_eq!(submit(&mut driver, &chain), (1, S_IOERR));
        assert_eq!(driver.read_mem(DATA, 512), [0xee; 512]);
        // A header in a device-writable buffer: no header at all.
        write_header(&driver, HEADER, T_IN, 0);
        assert_eq!(submit(&mut driver, &[(HEADER, 16, true), (STATUS, 1, true)]), (1, S_IOERR));
    }

    #[test]
    fn a_short_header_fails_the_request() {
        let Setup { mut driver, .. } = setup(false, F_FLUSH);
        write_header(&driver, HEADER, T_FLUSH, 0);
        assert_eq!(submit(&mut driver, &[(HEADER, 15, false), (STATUS, 1, true)]), (1, S_IOERR));
        assert_eq!(submit(&mut driver, &[(STATUS, 1, true)]), (1, S_IOERR));
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        driver.write_mem(DATA, &[0x44; 512]);
        // SCSI, discard, write zeroes (not offered), and nonsense.
        for kind in [2, 11, 13, 0x1234_5678, u32::MAX] {
            assert_eq!(request(&mut driver, kind, 0, &[(DATA, 512, false)]), (1, S_UNSUPP), "type {kind}");
        }
        assert_eq!(image.contents(), pattern(SECTORS));
        assert_eq!(counters(&driver).errors, 5);
    }

    #[test]
    fn requests_before_activation_or_after_reset_are_not_served() {
        let image = TempPath::image(&pattern(SECTORS));
        let mut driver = MockDriver::new(Block::new(&image.0, false).unwrap());
        driver.notify(0);
        assert!(driver.used(0).is_empty());
        assert!(!driver.needs_reset());

        driver.activate(F_FLUSH);
        driver.write(0x70, 0); // reset
        write_header(&driver, HEADER, T_OUT, 0);
        driver.write_mem(DATA, &[0x99; 512]);
        driver.add_chain(0, &[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        driver.notify(0);
        assert!(driver.used(0).is_empty());
        assert_eq!(image.contents(), pattern(SECTORS));
        assert_eq!(counters(&driver).requests, 0);

        // Set up again, it serves.
        drop(driver);
        let mut driver = MockDriver::new(Block::new(&image.0, false).unwrap());
        driver.activate(F_FLUSH);
        assert_eq!(request(&mut driver, T_IN, 0, &[(DATA, 512, true)]), (513, S_OK));
    }

    #[test]
    fn a_descriptor_loop_ends() {
        let Setup { mut driver, .. } = setup(false, F_FLUSH);
        write_header(&driver, HEADER, T_IN, 0);
        let head = driver.add_raw_chain(
            0,
            &[
                RawDescriptor::from(Descriptor::new(HEADER, 16, NEXT, 1)),
                RawDescriptor::from(Descriptor::new(DATA, 512, NEXT | WRITE, 2)),
                RawDescriptor::from(Descriptor::new(STATUS, 1, NEXT | WRITE, 1)),
            ],
        );
        driver.notify(0);
        let used = driver.used(0);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, head as u32);
        assert!(!driver.needs_reset());
    }

    #[test]
    fn parse_request_describes_the_request() {
        let image = TempPath::image(&pattern(SECTORS));
        let mut block = Block::new(&image.0, false).unwrap();
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&T_OUT.to_le_bytes());
        header[8..].copy_from_slice(&7u64.to_le_bytes());
        memory.write_slice(&header, GuestAddress(0x100)).unwrap();
        let desc = |addr, len, writable: bool| Descriptor::new(addr, len, if writable { WRITE } else { 0 }, 0);
        let request = parse_request(&memory, [desc(0x100, 16 + 512, false), desc(0x2000, 1, true)]).unwrap();
        assert_eq!(
            request,
            Request {
                request_type: RequestType::Out,
                sector: 7,
                data: vec![(GuestAddress(0x110), 512)],
                status: GuestAddress(0x2000)
            }
        );
        assert_eq!(request.data_len(), 512);

        let too_long = std::iter::repeat_n(desc(0x100, 16, false), MAX_DESCRIPTORS + 1);
        let error = parse_request(&memory, too_long).unwrap_err();
        assert_eq!((error.reason, error.status), (RequestError::TooManyDescriptors, None));
        // An endless chain is cut off too.
        let endless = std::iter::repeat(desc(0x100, 16, false));
        assert_eq!(block.serve_request(&memory, endless), 0);

        let error = parse_request(&memory, [desc(0x100, 16, false), desc(0x200, 4, true), desc(0x300, 1, true)]);
        assert_eq!(error.unwrap_err().reason, RequestError::WritableData);
        let error = parse_request(&memory, [desc(0x100, 16, false), desc(0x300, 1, true), desc(0x400, 1, false)]);
        assert_eq!(error.unwrap_err(), InvalidRequest { reason: RequestError::NoStatus, status: None });
        let error = parse_request(&memory, [desc(0x100, 8, false), desc(0x300, 1, true)]).unwrap_err();
        assert_eq!((error.reason, error.status), (RequestError::ShortHeader(8), Some(GuestAddress(0x300))));

        // serve_request runs the same path as the queue.
        memory.write_slice(&[0x42; 512], GuestAddress(0x110)).unwrap();
        assert_eq!(block.serve_request(&memory, [desc(0x100, 16 + 512, false), desc(0x2000, 1, true)]), 1);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), S_OK);
        assert_eq!(image.contents()[7 * 512..8 * 512], [0x42; 512]);
    }

    #[test]
    fn transfers_more_buffers_than_one_system_call_takes() {
        let image = TempPath::image(&pattern(8));
        let file = File::open(&image.0).unwrap();
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // 2048 two-byte buffers in reverse order of address: more than MAX_IOVECS.
        let data: Vec<(GuestAddress, u32)> = (0..2048u64).map(|i| (GuestAddress(0x10_000 - 2 * (i + 1)), 2)).collect();
        let slices = slices(&memory, &data).ok().unwrap();
        transfer(&file, 0, &slices, Direction::ToGuest).unwrap();
        let file_bytes = image.contents();
        for (i, &(addr, _)) in data.iter().enumerate() {
            let mut got = [0u8; 2];
            memory.read_slice(&mut got, addr).unwrap();
            assert_eq!(got, file_bytes[2 * i..2 * i + 2], "buffer {i}");
        }
        // Reading past the end of the file fails instead of looping.
        let error = transfer(&file, 4096 - 2, &slices[..2], Direction::ToGuest).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn images_are_locked_shared_for_readers_and_exclusive_for_a_writer() {
        let image = TempPath::image(&pattern(8));
        let locked = |result: Result<Block, BlockError>| match result {
            Err(BlockError::Locked { path, .. }) => path == image.0,
            Err(other) => panic!("{other}"),
            Ok(_) => false,
        };
        let readers = [Block::new(&image.0, true).unwrap(), Block::new(&image.0, true).unwrap()];
        assert!(locked(Block::new(&image.0, false)), "a writer while readers have it");
        drop(readers);
        let writer = Block::new(&image.0, false).unwrap();
        assert!(locked(Block::new(&image.0, true)), "a reader while a writer has it");
        assert!(locked(Block::new(&image.0, false)), "a second writer");
        let unlocked = Block::open(&image.0, false, None, false).expect("opting out ignores the lock");
        drop((writer, unlocked));
        Block::new(&image.0, false).expect("the lock goes with the device");
    }

    #[test]
    fn constructor_errors_name_the_problem() {
        let missing = TempPath::new();
        let error = Block::new(&missing.0, false).err().unwrap();
        assert!(matches!(&error, BlockError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound));
        let message = error.to_string();
        assert!(message.contains(&*missing.0.to_string_lossy()) && message.contains("No such file"), "{message}");

        let directory = TempPath::new();
        std::fs::create_dir(&directory.0).unwrap();
        for read_only in [false, true] {
            let error = Block::new(&directory.0, read_only).err().unwrap();
            assert!(matches!(error, BlockError::NotRegularFile { .. }), "{error}");
            assert!(error.to_string().contains("not a regular file"), "{error}");
        }

        let odd = TempPath::image(&[0; 1000]);
        let error = Block::new(&odd.0, false).err().unwrap();
        assert!(matches!(error, BlockError::BadSize { size: 1000, .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains("1000 bytes") && message.contains("multiple of 512 bytes"), "{message}");

        let empty = TempPath::image(&[]);
        let error = Block::new(&empty.0, true).err().unwrap();
        assert!(matches!(error, BlockError::Empty { .. }), "{error}");
        assert!(error.to_string().contains("empty"), "{error}");

        let good = TempPath::image(&[0; 512]);
        for id in ["123456789012345678901", "caf\u{e9}", "a\0b"] {
            let error = Block::with_id(&good.0, false, id).err().unwrap();
            assert!(matches!(error, BlockError::BadId { .. }), "{error}");
        }
        let block = Block::with_id(&good.0, false, "12345678901234567890").unwrap();
        assert_eq!((block.id(), block.capacity(), block.read_only()), ("12345678901234567890", 1, false));
        assert_eq!(block.path(), good.0);
    }

    #[test]
    fn restored_into_a_fresh_device_it_serves_where_the_original_left_off() {
        let Setup { image, mut driver } = setup(false, F_FLUSH | F_EVENT_IDX);
        let written: Vec<u8> = (0..512).map(|i| (i * 7 % 256) as u8).collect();
        driver.write_mem(DATA, &written);
        assert_eq!(request(&mut driver, T_OUT, 3, &[(DATA, 512, false)]), (1, S_OK));
        assert_eq!(request(&mut driver, T_IN, 0, &[(DATA2, 512, true)]), (513, S_OK));
        let state = driver.save();
        assert_eq!(state.model, ModelState::Block);
        assert!(state.queues[0].event_idx);
        assert_eq!((state.queues[0].next_avail, state.queues[0].next_used), (2, 2));

        // Another device on the same image, as another process would open it.
        let mut restored = driver.fork(Block::open(&image.0, false, None, false).unwrap());
        restored.transport.restore(&state).unwrap();
        restored.write_mem(DATA2, &[0; 512]);
        assert_eq!(request(&mut restored, T_IN, 3, &[(DATA2, 512, true)]), (513, S_OK));
        assert_eq!(restored.read_mem(DATA2, 512), written);
        let used = restored.used(0);
        assert_eq!((&used[..2], used.len()), (&driver.used(0)[..], 3), "the used ring goes on after the snapshot");
        assert_eq!(restored.save().queues[0].next_used, 3);
        assert_eq!(counters(&restored).requests, 1, "requests before the snapshot served again");
    }

    #[test]
    fn restored_in_place_it_goes_back_to_the_snapshot_point() {
        let Setup { image, mut driver } = setup(false, F_FLUSH);
        let file = image.contents();
        assert_eq!(request(&mut driver, T_IN, 1, &[(DATA, 512, true)]), (513, S_OK));
        let (checkpoint, state, used) = (driver.checkpoint(), driver.save(), driver.used(0));
        for sector in 2..5 {
            assert_eq!(request(&mut driver, T_IN, sector, &[(DATA, 512, true)]), (513, S_OK));
        }
        assert_eq!(driver.read_mem(DATA, 512), file[2048..2560]);

        driver.rewind(&checkpoint);
        driver.transport.restore(&state).unwrap();
        assert_eq!(driver.read_mem(DATA, 512), file[512..1024]);
        assert_eq!(request(&mut driver, T_IN, 5, &[(DATA2, 512, true)]), (513, S_OK));
        assert_eq!(driver.read_mem(DATA2, 512), file[2560..3072]);
        assert_eq!(driver.used(0).len(), 2, "the used ring goes on from the snapshot");
        assert_eq!(driver.used(0)[0], used[0]);
        assert_eq!(driver.read_mem(DATA, 512), file[512..1024], "a request after the snapshot served again");
    }
}
