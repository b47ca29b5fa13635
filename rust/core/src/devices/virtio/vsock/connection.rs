//! One stream connection: its Unix stream on the host side, where it is in its life, and the
//! credit each side has given the other.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// The receive buffer the device offers each connection: guest data the host has not taken yet.
pub(super) const BUF_ALLOC: u32 = 256 << 10;
/// The largest payload of a packet to the guest.
const MAX_PAYLOAD: usize = 64 << 10;
/// The longest first line (`CONNECT <port>\n`) a host process may send.
const MAX_LINE: usize = 32;

/// Where a connection is in its life.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum State {
    /// A host process connected and is sending its `CONNECT <port>` line, gathered here.
    AwaitingConnect(Vec<u8>),
    /// The guest is (about to be) asked to accept a host-initiated connection.
    Requesting,
    /// Data flows.
    Established,
}

/// What a host process's first line said so far.
pub(super) enum Line {
    Incomplete,
    Port(u32),
    Bad,
}

/// A stream between a guest port and a host Unix stream.
pub(super) struct Connection {
    stream: UnixStream,
    pub state: State,
    /// The host-side port (the guest's destination or, for host-initiated ones, the device's pick).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Whether the event loop watches the stream.
    pub registered: bool,
    /// An I/O error or a protocol violation: the connection ends with a RST.
    pub failed: bool,
    // Control packets owed to the guest.
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    // Host to guest.
    /// An edge said the stream has bytes, and no read has come back empty since.
    readable: bool,
    /// The host closed its sending side (and the guest is told so).
    host_eof: bool,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    // Guest to host.
    /// Bytes waiting for the stream to take them: the first `control_bytes` are the device's own
    /// (`OK <port>\n`), the rest guest data.
    out: VecDeque<u8>,
    control_bytes: usize,
    rx_cnt: u32,
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_told: u32,
    /// The SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// The stream's sending side is shut: the guest will send no more and all of it was written.
    write_closed: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            registered: false,
            failed: false,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            readable: false,
            host_eof: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            out: VecDeque::new(),
            control_bytes: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_shutdown: 0,
            write_closed: false,
        }
    }

    /// A stream a host process opened, which has yet to say where it goes.
    pub fn host_initiated(stream: UnixStream) -> Self {
        Self::new(stream, State::AwaitingConnect(Vec::new()), 0, 0)
    }

    /// The stream to a host listener for the guest's `request`, accepted once the guest hears so.
    pub fn guest_initiated(stream: UnixStream, request: &Header) -> Self {
        let mut conn = Self::new(stream, State::Established, request.dst_port, request.src_port);
        conn.send_response = true;
        conn.update_peer_credit(request);
        conn
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Reads the host's first line, a byte at a time so that data after it stays in the stream.
    pub fn read_connect_line(&mut self) -> Line {
        let State::AwaitingConnect(line) = &mut self.state else { return Line::Incomplete };
        // Each pass either returns or grows the line, which may not outgrow MAX_LINE.
        loop {
            let mut byte = [0u8];
            match (&self.stream).read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => return parse_connect(line),
                Ok(1) if line.len() + 1 < MAX_LINE => line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Line::Incomplete,
                // Too long, end of stream before the newline, or a failed stream.
                _ => return Line::Bad,
            }
        }
    }

    /// The host asked for guest port `peer`; the device speaks for it from port `local`.
    pub fn start_request(&mut self, local: u32, peer: u32) {
        self.state = State::Requesting;
        self.local_port = local;
        self.peer_port = peer;
        self.send_request = true;
        // Bytes the host sent after its line may already wait in the stream.
        self.readable = true;
    }

    /// Takes the guest's view of its receive buffer from any packet it sends.
    pub fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// How many more bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// The guest accepted a host-initiated connection: the host learns its port.
    pub fn establish(&mut self) {
        self.state = State::Established;
        let line = format!("OK {}\n", self.local_port);
        self.control_bytes += line.len();
        self.out.extend(line.as_bytes());
        self.flush();
    }

    /// The stream may have bytes (or an end) to read.
    pub fn set_readable(&mut self) {
        self.readable = true;
    }

    /// Guest data for the host, which must fit in the credit the device gave.
    pub fn receive(&mut self, data: &[u8]) -> Result<(), &'static str> {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err("data after the guest shut down sending");
        }
        let buffered = self.rx_cnt.wrapping_sub(self.fwd_cnt) as usize;
        if buffered + data.len() > BUF_ALLOC as usize {
            return Err("data beyond the credit the device gave");
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
        self.out.extend(data);
        self.flush();
        Ok(())
    }

    /// The guest will receive and/or send no more.
    pub fn shutdown_by_guest(&mut self, flags: u32) {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        self.flush();
    }

    /// The guest asked how much room the device has.
    pub fn request_credit_update(&mut self) {
        self.send_credit_update = true;
    }

    /// Writes what the stream takes of the pending bytes; shuts its sending side once the guest
    /// will send no more and all was written.
    pub fn flush(&mut self) {
        while !self.failed && !self.out.is_empty() {
            let (front, _) = self.out.as_slices();
            match send(&self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.out.drain(..n);
                    let ours = n.min(self.control_bytes);
                    self.control_bytes -= ours;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("vsock: writing to the host stream of port {} failed: {e}", self.local_port);
                    self.failed = true;
                }
            }
        }
        if self.out.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_closed {
            // The host may already have closed its end; then there is nothing left to shut.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.write_closed = true;
        }
        // Tell the guest about freed room before it can run out of credit it does not know it has.
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= BUF_ALLOC / 2 {
            self.send_credit_update = true;
        }
    }

    /// Both directions are over, so the connection ends.
    pub fn finished(&self) -> bool {
        self.write_closed && (self.host_eof || self.peer_shutdown & SHUTDOWN_RCV != 0)
    }

    /// A header from the device's side of this connection.
    pub fn header(&self, guest_cid: u64, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet for the guest, with at most `room` payload bytes, if any is due.
    pub fn next_packet(&mut self, guest_cid: u64, room: usize) -> Option<(Header, Vec<u8>)> {
        let control = |conn: &Self, op| Some((conn.header(guest_cid, op), Vec::new()));
        let packet = if std::mem::take(&mut self.send_request) {
            control(self, op::REQUEST)
        } else if std::mem::take(&mut self.send_response) {
            control(self, op::RESPONSE)
        } else if let Some(data) = self.read_stream(guest_cid, room) {
            Some(data)
        } else if std::mem::take(&mut self.send_credit_update) {
            control(self, op::CREDIT_UPDATE)
        } else {
            None
        };
        if packet.is_some() {
            self.fwd_cnt_told = self.fwd_cnt;
        }
        packet
    }

    /// Host bytes for the guest as far as its credit and `room` go, or the news of their end.
    fn read_stream(&mut self, guest_cid: u64, room: usize) -> Option<(Header, Vec<u8>)> {
        let open = self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0;
        let want = (self.peer_credit() as usize).min(room).min(MAX_PAYLOAD);
        if !open || !self.readable || self.failed || want == 0 {
            return None;
        }
        let mut data = vec![0u8; want];
        match (&self.stream).read(&mut data) {
            Ok(0) => {
                self.host_eof = true;
                let header = Header { flags: SHUTDOWN_SEND, ..self.header(guest_cid, op::SHUTDOWN) };
                Some((header, Vec::new()))
            }
            Ok(n) => {
                data.truncate(n);
                self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                Some((Header { len: n as u32, ..self.header(guest_cid, op::RW) }, data))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.readable = false;
                None
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => None,
            Err(e) => {
                log::debug!("vsock: reading the host stream of port {} failed: {e}", self.local_port);
                self.failed = true;
                None
            }
        }
    }
}

/// `CONNECT <port>` (without its newline) to the port, anything else to `Bad`.
fn parse_connect(line: &[u8]) -> Line {
    let port = line.strip_prefix(b"CONNECT ").filter(|p| !p.is_empty() && p.iter().all(u8::is_ascii_digit));
    match port.and_then(|p| std::str::from_utf8(p).ok()).and_then(|p| p.parse().ok()) {
        Some(port) => Line::Port(port),
        None => Line::Bad,
    }
}

/// Writes to the stream without raising SIGPIPE when the host has closed it.
fn send(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `data`, which outlives the call; send only reads it.
    let sent = unsafe { libc::send(stream.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}
