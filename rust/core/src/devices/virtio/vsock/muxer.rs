//! The host side: the Unix listener host processes connect through, the table of connections,
//! and the routing of packets between the guest and them.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::ops::Bound;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{Connection, Line, State};
use super::packet::{op, Header, HOST_CID};
use super::VsockError;
use crate::devices::virtio::{backend_data, DeviceCounters};
use crate::ratelimit::guest_log;

/// At most this many connections, host- and guest-initiated, at a time.
const MAX_CONNECTIONS: usize = 1024;
/// RSTs waiting for rx buffers past which the device takes no more packets from the guest.
const MAX_BACKLOG: usize = 64;
/// Host-initiated connections get device ports counting up from here, clear of usual guest ports.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Connections accepted per listener wake-up; the listener is level-triggered, so more follow.
const ACCEPT_BATCH: usize = 16;

/// The host side of the device.
pub(super) struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    /// Device and inode of the socket file, so that drop removes only the file it made.
    identity: (u64, u64),
    listener: UnixListener,
    /// Wakes the event loop for work only it can do: watching new streams and forgetting closed ones.
    wake: EventFd,
    /// Connections by stream descriptor, which is also their event-loop token.
    conns: BTreeMap<RawFd, Connection>,
    /// Connections the guest knows of, by (host port, guest port).
    ports: BTreeMap<(u32, u32), RawFd>,
    /// RSTs for the guest whose connection is gone; they go before anything else.
    rsts: VecDeque<Header>,
    to_register: Vec<RawFd>,
    /// Closed streams, still open until the event loop stops watching them, so that their
    /// descriptor numbers cannot be reused under it.
    to_close: Vec<UnixStream>,
    next_port: u32,
    /// The connection served last, so that rx buffers go round the others first.
    cursor: RawFd,
    counters: Arc<DeviceCounters>,
}

impl Muxer {
    pub fn new(guest_cid: u64, path: &Path, counters: Arc<DeviceCounters>) -> Result<Self, VsockError> {
        if path.symlink_metadata().is_ok() {
            return Err(VsockError::PathExists(path.into()));
        }
        if path.parent().is_some_and(|dir| !dir.as_os_str().is_empty() && !dir.is_dir()) {
            return Err(VsockError::NoDirectory(path.into()));
        }
        let listen_error = |source| VsockError::Listen { path: path.into(), source };
        let listener = UnixListener::bind(path).map_err(listen_error)?;
        let metadata = path.symlink_metadata().map_err(|e| {
            let _ = std::fs::remove_file(path);
            listen_error(e)
        })?;
        let muxer = Self {
            guest_cid,
            path: path.into(),
            identity: (metadata.dev(), metadata.ino()),
            listener,
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            conns: BTreeMap::new(),
            ports: BTreeMap::new(),
            rsts: VecDeque::new(),
            to_register: Vec::new(),
            to_close: Vec::new(),
            next_port: FIRST_LOCAL_PORT,
            cursor: -1,
            counters,
        };
        // From here on, drop removes the socket file.
        muxer.listener.set_nonblocking(true).map_err(listen_error)?;
        Ok(muxer)
    }

    /// The listener and the wake-up eventfd, each with its descriptor as token.
    pub fn backend_events(&self) -> Vec<(RawFd, u32, EventSet)> {
        [self.listener.as_raw_fd(), self.wake.as_raw_fd()].map(|fd| (fd, fd as u32, EventSet::IN)).to_vec()
    }

    /// Whether so many RSTs wait for rx buffers that the guest's packets must wait too.
    pub fn backlog_full(&self) -> bool {
        self.rsts.len() >= MAX_BACKLOG
    }

    /// Wakes the event loop if streams are to be watched or forgotten.
    pub fn wake_if_needed(&self) {
        if !self.to_register.is_empty() || !self.to_close.is_empty() {
            self.wake();
        }
    }

    /// Brings the device back to the event loop.
    pub fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            log::warn!("vsock: cannot wake the event loop: {e}");
        }
    }

    /// A back-end descriptor registered with `token` is ready.
    pub fn handle_event(&mut self, token: u32, events: EventSet, ops: &mut EventOps) {
        let Ok(fd) = RawFd::try_from(token) else { return };
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if fd == self.wake.as_raw_fd() {
            let _ = self.wake.read();
        } else {
            self.stream_event(fd, events);
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => return log::warn!("vsock: cannot accept on {}: {e}", self.path.display()),
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                log::warn!("vsock: {MAX_CONNECTIONS} connections already, refusing another");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("vsock: cannot make a host connection non-blocking: {e}");
                continue;
            }
            if let Err(e) = ops.add(stream_events(fd)) {
                log::warn!("vsock: cannot watch a host connection: {e}");
                continue;
            }
            let mut conn = Connection::host_initiated(stream);
            conn.registered = true;
            self.conns.insert(fd, conn);
            // Its line may be there already.
            self.stream_event(fd, EventSet::IN);
        }
    }

    fn stream_event(&mut self, fd: RawFd, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&fd) else { return };
        match conn.state {
            State::AwaitingConnect(_) => match conn.read_connect_line() {
                Line::Incomplete => {}
                Line::Bad => {
                    log::debug!("vsock: a host connection sent no valid CONNECT line");
                    self.close(fd, false);
                }
                Line::Port(port) => match self.free_port() {
                    Some(local) => {
                        self.ports.insert((local, port), fd);
                        if let Some(conn) = self.conns.get_mut(&fd) {
                            conn.start_request(local, port);
                        }
                    }
                    None => self.close(fd, false),
                },
            },
            // Until the guest answers only a closed stream matters: its data waits in the socket.
            State::Requesting if events.intersects(EventSet::HANG_UP | EventSet::ERROR) => self.close(fd, true),
            State::Requesting => conn.set_readable(),
            State::Established => {
                if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
                    conn.set_readable();
                }
                if events.contains(EventSet::OUT) {
                    conn.flush();
                }
                self.settle(fd);
            }
        }
    }

    /// A device port no connection uses; there are fewer connections than tries.
    fn free_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if self.ports.range((port, 0)..=(port, u32::MAX)).next().is_none() {
                return Some(port);
            }
        }
        None
    }

    /// A well-formed stream packet from the guest.
    pub fn handle_packet(&mut self, header: &Header, payload: &[u8]) {
        if header.dst_cid != HOST_CID {
            return self.reply_rst(header);
        }
        let Some(&fd) = self.ports.get(&(header.dst_port, header.src_port)) else {
            return match header.op {
                op::REQUEST => self.connect_guest(header),
                _ => self.reply_rst(header),
            };
        };
        if header.op == op::REQUEST {
            // The guest reuses the ports of a live connection: one RST ends both.
            return self.close(fd, true);
        }
        let Some(conn) = self.conns.get_mut(&fd) else { return };
        conn.update_peer_credit(header);
        match (header.op, &conn.state) {
            (op::RST, _) => return self.close(fd, false),
            (op::RESPONSE, State::Requesting) => conn.establish(),
            (op::RW, State::Established) => {
                if let Err(why) = conn.receive(payload) {
                    guest_log!(log::Level::Debug, "vsock: guest port {}: {why}", header.src_port);
                    self.counters.count_error();
                    conn.failed = true;
                }
            }
            (op::SHUTDOWN, State::Established) => conn.shutdown_by_guest(header.flags),
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, State::Established) => conn.request_credit_update(),
            (op, state) => {
                guest_log!(
                    log::Level::Debug,
                    "vsock: guest port {}: op {op} unexpected in state {state:?}",
                    header.src_port
                );
                self.counters.count_error();
                conn.failed = true;
            }
        }
        self.settle(fd);
    }

    /// A packet that cannot be carried out: its connection, if it has one, ends.
    pub fn reset_for(&mut self, header: &Header) {
        match self.ports.get(&(header.dst_port, header.src_port)) {
            Some(&fd) if header.dst_cid == HOST_CID => self.close(fd, true),
            _ => self.reply_rst(header),
        }
    }

    /// Answers a packet with a RST, unless it is one.
    pub fn reply_rst(&mut self, header: &Header) {
        if header.op != op::RST {
            self.rsts.push_back(header.rst_reply());
        }
    }

    fn connect_guest(&mut self, request: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            guest_log!(log::Level::Warn, "vsock: {MAX_CONNECTIONS} connections already, refusing the guest another");
            return self.reply_rst(request);
        }
        let mut path = OsString::from(&self.path);
        path.push(format!("_{}", request.dst_port));
        match connect(Path::new(&path)) {
            Ok(stream) => {
                let fd = stream.as_raw_fd();
                self.conns.insert(fd, Connection::guest_initiated(stream, request));
                self.ports.insert((request.dst_port, request.src_port), fd);
                self.to_register.push(fd);
            }
            Err(e) => {
                guest_log!(log::Level::Debug, "vsock: guest connection to {} refused: {e}", Path::new(&path).display());
                self.reply_rst(request);
            }
        }
    }

    /// Ends the connection if it failed or is over in both directions.
    fn settle(&mut self, fd: RawFd) {
        if self.conns.get(&fd).is_some_and(|c| c.failed || c.finished()) {
            self.close(fd, true);
        }
    }

    /// Forgets a connection, telling the guest with a RST if `rst`.
    fn close(&mut self, fd: RawFd, rst: bool) {
        let Some(conn) = self.conns.remove(&fd) else { return };
        let key = (conn.local_port, conn.peer_port);
        if self.ports.get(&key) == Some(&fd) {
            self.ports.remove(&key);
        }
        if rst && !matches!(conn.state, State::AwaitingConnect(_)) {
            self.rsts.push_back(conn.header(self.guest_cid, op::RST));
        }
        if conn.registered {
            self.to_close.push(conn.into_stream());
        }
    }

    /// The next packet for the guest, with at most `room` payload bytes, if any is due.
    pub fn next_packet(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(rst) = self.rsts.pop_front() {
            return Some((rst, Vec::new()));
        }
        let mut fd = self.cursor;
        for _ in 0..self.conns.len() {
            let next =
                self.conns.range((Bound::Excluded(fd), Bound::Unbounded)).next().or(self.conns.first_key_value());
            let Some((&next, _)) = next else { break };
            fd = next;
            let packet = self.conns.get_mut(&fd).and_then(|conn| conn.next_packet(self.guest_cid, room));
            self.settle(fd);
            if packet.is_some() {
                self.cursor = fd;
                return packet;
            }
        }
        // RSTs of connections that just failed.
        self.rsts.pop_front().map(|rst| (rst, Vec::new()))
    }

    /// The driver reset the device: connections the guest knew of are gone.
    pub fn reset(&mut self) {
        let known: Vec<RawFd> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.state, State::AwaitingConnect(_)))
            .map(|(&fd, _)| fd)
            .collect();
        for fd in known {
            self.close(fd, false);
        }
        self.rsts.clear();
    }

    /// Ends every connection, host-initiated ones still awaiting their `CONNECT` line included,
    /// without RSTs: the driver learns of it from a transport reset event. The streams are shut
    /// down at once, so that host processes see them end now, not once the event loop has
    /// stopped watching them and closes them. The listener stays.
    pub fn drop_connections(&mut self) {
        let fds: Vec<RawFd> = self.conns.keys().copied().collect();
        for fd in fds {
            self.close(fd, false);
        }
        for stream in &self.to_close {
            if let Err(e) = stream.shutdown(Shutdown::Both) {
                log::debug!("vsock: cannot shut a host stream down: {e}");
            }
        }
        self.rsts.clear();
        self.wake_if_needed();
    }

    /// Watches new streams and forgets closed ones.
    pub fn apply_ops(&mut self, ops: &mut EventOps) {
        for fd in std::mem::take(&mut self.to_register) {
            let Some(conn) = self.conns.get_mut(&fd) else { continue };
            if conn.registered {
                continue;
            }
            match ops.add(stream_events(fd)) {
                Ok(()) => conn.registered = true,
                Err(e) => {
                    log::warn!("vsock: cannot watch a host stream: {e}");
                    conn.failed = true;
                    self.settle(fd);
                }
            }
        }
        for stream in std::mem::take(&mut self.to_close) {
            if let Err(e) = ops.remove(Events::empty(&stream)) {
                log::debug!("vsock: cannot stop watching a closed stream: {e}");
            }
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let ours = self.path.symlink_metadata().is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("vsock: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// What the event loop watches a stream for: edges, as the device reads and writes until the
/// stream would block and remembers where it stopped.
fn stream_events(fd: RawFd) -> Events {
    let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
    Events::with_data_raw(fd, backend_data(fd as u32), events)
}

/// Connects to a Unix stream listener without blocking: a full backlog fails rather than stalls.
fn connect(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, &from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = from as libc::c_char;
    }
    // SAFETY: socket takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and `len` is within its size.
    let done = unsafe { libc::connect(fd, (&raw const addr).cast(), len as libc::socklen_t) };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}
