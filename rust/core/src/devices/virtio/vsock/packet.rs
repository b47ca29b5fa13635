//! The virtio-vsock packet header, and moving packets between descriptor chains and the device.

use std::fmt;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::vstate::memory::GuestMemory;

/// Size of the header that starts every packet.
pub(super) const HEADER_SIZE: usize = 44;
/// The well-known CID of the host.
pub(super) const HOST_CID: u64 = 2;
/// The only socket type this device carries.
pub(super) const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub(super) mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub(super) const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub(super) const SHUTDOWN_SEND: u32 = 2;

/// A packet header, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the little-endian wire format.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the little-endian wire format.
    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A RST answering `self`, for a packet that has no connection to go to.
    pub fn rst_reply(&self) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            kind: TYPE_STREAM,
            op: op::RST,
            ..Self::default()
        }
    }
}

/// Why a packet from the driver was dropped.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BadPacket {
    /// The chain's readable buffers hold fewer bytes than a header.
    ShortHeader(u64),
    /// The header announces more payload than the chain holds, or than any packet may carry.
    Length { len: u32, available: u64 },
    /// A buffer lies outside guest memory.
    OutsideMemory,
}

impl fmt::Display for BadPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShortHeader(n) => write!(f, "{n} readable bytes cannot hold a {HEADER_SIZE}-byte header"),
            Self::Length { len, available } => write!(f, "payload length {len} with {available} bytes available"),
            Self::OutsideMemory => write!(f, "a buffer lies outside guest memory"),
        }
    }
}

/// The buffers of one direction of a chain, as (address, length) pairs.
pub(super) struct Buffers {
    parts: Vec<(GuestAddress, u32)>,
    total: u64,
}

impl Buffers {
    /// The chain's buffers the device reads (`writable` false) or writes (`writable` true).
    pub fn of(chain: &DescriptorChain<&GuestMemory>, writable: bool) -> Self {
        // The chain iterator stops at a loop or a bad index, so this is bounded by the queue.
        let parts: Vec<_> =
            chain.clone().filter(|d| d.is_write_only() == writable).map(|d| (d.addr(), d.len())).collect();
        let total = parts.iter().map(|&(_, len)| u64::from(len)).sum();
        Self { parts, total }
    }

    /// Their total length.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether every buffer lies entirely in guest memory.
    pub fn in_memory(&self, memory: &GuestMemory) -> bool {
        self.parts.iter().all(|&(addr, len)| GuestMemoryBackend::check_range(memory, addr, len as usize))
    }

    /// Fills `out` from the bytes starting `offset` bytes into the buffers.
    pub fn read_at(&self, memory: &GuestMemory, mut offset: u64, out: &mut [u8]) -> Result<(), BadPacket> {
        let mut done = 0;
        for &(addr, len) in &self.parts {
            if done == out.len() {
                break;
            }
            let len = u64::from(len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(out.len() - done);
            let at = addr.0.checked_add(offset).ok_or(BadPacket::OutsideMemory)?;
            memory.read_slice(&mut out[done..done + n], GuestAddress(at)).map_err(|_| BadPacket::OutsideMemory)?;
            done += n;
            offset = 0;
        }
        if done < out.len() {
            return Err(BadPacket::Length { len: out.len() as u32, available: done as u64 });
        }
        Ok(())
    }

    /// Writes `data` across the buffers from their start; the caller checks it fits.
    pub fn write(&self, memory: &GuestMemory, mut data: &[u8]) -> Result<(), BadPacket> {
        for &(addr, len) in &self.parts {
            if data.is_empty() {
                break;
            }
            let n = (len as usize).min(data.len());
            if n == 0 {
                continue;
            }
            memory.write_slice(&data[..n], addr).map_err(|_| BadPacket::OutsideMemory)?;
            data = &data[n..];
        }
        Ok(())
    }
}

/// Reads a packet's header from the readable buffers.
pub(super) fn read_header(buffers: &Buffers, memory: &GuestMemory) -> Result<Header, BadPacket> {
    if buffers.len() < HEADER_SIZE as u64 {
        return Err(BadPacket::ShortHeader(buffers.len()));
    }
    let mut bytes = [0u8; HEADER_SIZE];
    buffers.read_at(memory, 0, &mut bytes)?;
    Ok(Header::from_bytes(&bytes))
}

/// Reads the `header.len` payload bytes after the header, at most `max` of them.
pub(super) fn read_payload(
    buffers: &Buffers,
    memory: &GuestMemory,
    header: &Header,
    max: usize,
) -> Result<Vec<u8>, BadPacket> {
    let available = buffers.len().saturating_sub(HEADER_SIZE as u64);
    if u64::from(header.len) > available || header.len as usize > max {
        return Err(BadPacket::Length { len: header.len, available });
    }
    let mut payload = vec![0u8; header.len as usize];
    buffers.read_at(memory, HEADER_SIZE as u64, &mut payload)?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_little_endian() {
        let header = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x0102_0304,
            dst_port: 5,
            len: 6,
            kind: TYPE_STREAM,
            op: op::RW,
            flags: 7,
            buf_alloc: 8,
            fwd_cnt: 9,
        };
        let bytes = header.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[16..20], &[4, 3, 2, 1]);
        assert_eq!(&bytes[28..32], &[1, 0, 5, 0]);
        assert_eq!(&bytes[40..44], &9u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), header);
    }
}
