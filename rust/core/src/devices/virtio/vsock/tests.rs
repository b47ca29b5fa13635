//! Device tests: a mock driver plays the guest, real Unix sockets the host, and a real event
//! manager runs the back end the way the device event loop does.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};

use super::packet::{op, Header, HEADER_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::devices::virtio::testing::{Checkpoint, MockDriver, DATA_START, MEMORY_SIZE};
use crate::devices::virtio::{backend_data, F_VERSION_1};
use crate::snapshot::Persist;

const CID: u64 = 0x0102_0304;
/// rx buffers: each has room for a header and 4 KiB.
const RX_BASE: u64 = DATA_START;
const RX_SLOT: u64 = 0x2000;
const RX_LEN: u32 = HEADER_SIZE as u32 + 4096;
/// tx packets: the header at the slot's start, the payload 4 KiB in.
const TX_BASE: u64 = DATA_START + (1 << 20);
const TX_SLOT: u64 = 0x2_0000;
const FIRST_PORT: u32 = 1 << 30;
/// Event buffers, between the rx and tx buffers.
const EVENT_BASE: u64 = DATA_START + 0x8_0000;

/// A directory of its own for each test, removed afterwards.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("kvmkit-vsock-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Hands back-end events to the device as the device event loop does.
struct Worker(Arc<Mutex<Vsock>>);

impl MutEventSubscriber for Worker {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token, events) in self.0.lock().unwrap().backend_events() {
            ops.add(Events::with_data_raw(fd, backend_data(token), events)).unwrap();
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data() - backend_data(0);
        self.0.lock().unwrap().process_backend(token, events.event_set(), ops);
    }
}

/// A guest driver, the event loop, and the host's socket directory around one device.
struct Bench {
    guest: MockDriver<Vsock>,
    events: EventManager<Worker>,
    rx_addrs: HashMap<u32, u64>,
    rx_posted: u64,
    rx_seen: usize,
    tx_sent: u64,
    dir: TempDir,
}

impl Bench {
    /// A device with an active driver (queues of 16 entries) and no rx buffers yet.
    fn new() -> Self {
        let mut bench = Self::inactive();
        bench.guest.activate(0);
        bench
    }

    fn inactive() -> Self {
        let dir = TempDir::new();
        let guest = MockDriver::new(Vsock::new(CID, &dir.0.join("v.sock")).unwrap());
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(Worker(guest.device.clone()));
        Self { guest, events, rx_addrs: HashMap::new(), rx_posted: 0, rx_seen: 0, tx_sent: 0, dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.0.join("v.sock")
    }

    /// The same guest on a fresh device of its own (in another socket directory), not restored.
    fn fork(&self) -> Self {
        let dir = TempDir::new();
        let guest = self.guest.fork(Vsock::new(CID, &dir.0.join("v.sock")).unwrap());
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(Worker(guest.device.clone()));
        Self { guest, events, rx_addrs: self.rx_addrs.clone(), dir, ..*self }
    }

    /// Where the guest is, to go back to.
    fn checkpoint(&self) -> BenchCheckpoint {
        BenchCheckpoint {
            guest: self.guest.checkpoint(),
            rx_addrs: self.rx_addrs.clone(),
            rx_posted: self.rx_posted,
            rx_seen: self.rx_seen,
            tx_sent: self.tx_sent,
        }
    }

    /// Puts the guest back as it was at `checkpoint`; the device is left alone.
    fn rewind(&mut self, checkpoint: &BenchCheckpoint) {
        self.guest.rewind(&checkpoint.guest);
        self.rx_addrs.clone_from(&checkpoint.rx_addrs);
        (self.rx_posted, self.rx_seen, self.tx_sent) = (checkpoint.rx_posted, checkpoint.rx_seen, checkpoint.tx_sent);
    }

    /// Gives the device an event buffer of `len` bytes in slot `slot`, filled with 0xff;
    /// returns its head.
    fn post_event(&mut self, slot: u64, len: u32) -> u16 {
        let addr = EVENT_BASE + 0x100 * slot;
        self.guest.write_mem(addr, &vec![0xff; len as usize]);
        let head = self.guest.add_chain(EVENT, &[(addr, len, true)]);
        self.guest.notify(EVENT);
        head
    }

    /// Runs the event loop until nothing is ready (host socket I/O is immediate, so nothing
    /// further can become ready without the test acting).
    fn pump(&mut self) {
        for _ in 0..100 {
            if self.events.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle");
    }

    /// Gives the device `n` rx buffers.
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = RX_BASE + (self.rx_posted % 16) * RX_SLOT;
            self.rx_posted += 1;
            let head = self.guest.add_chain(RX, &[(addr, RX_LEN, true)]);
            self.rx_addrs.insert(head.into(), addr);
        }
        self.guest.notify(RX);
    }

    /// The packets the device put in rx buffers since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.guest.used(RX);
        let new = used[self.rx_seen..].to_vec();
        self.rx_seen = used.len();
        new.into_iter()
            .map(|(head, len)| {
                let addr = self.rx_addrs.remove(&head).expect("a used buffer the test did not post");
                assert!(len as usize >= HEADER_SIZE && len <= RX_LEN, "used length {len}");
                let bytes = self.guest.read_mem(addr, len as usize);
                let header = Header::from_bytes(bytes[..HEADER_SIZE].try_into().unwrap());
                assert_eq!(header.len as usize, bytes.len() - HEADER_SIZE);
                (header, bytes[HEADER_SIZE..].to_vec())
            })
            .collect()
    }

    /// Receives exactly one packet.
    fn recv_one(&mut self) -> (Header, Vec<u8>) {
        let mut packets = self.recv();
        assert_eq!(packets.len(), 1, "{packets:?}");
        packets.remove(0)
    }

    /// Sends a packet from the guest, its `len` set to the payload's.
    fn send(&mut self, header: Header, payload: &[u8]) {
        let header = Header { len: payload.len() as u32, ..header };
        self.send_chain(&header.to_bytes(), payload);
    }

    /// Sends `header` bytes and `payload` as a two-buffer chain on tx.
    fn send_chain(&mut self, header: &[u8], payload: &[u8]) {
        let addr = TX_BASE + (self.tx_sent % 8) * TX_SLOT;
        self.tx_sent += 1;
        self.guest.write_mem(addr, header);
        self.guest.write_mem(addr + 0x1000, payload);
        let mut buffers = vec![(addr, header.len() as u32, false)];
        if !payload.is_empty() {
            buffers.push((addr + 0x1000, payload.len() as u32, false));
        }
        self.guest.add_chain(TX, &buffers);
        self.guest.notify(TX);
    }

    fn errors(&self) -> u64 {
        self.guest.device.lock().unwrap().counters().snapshot().errors
    }

    /// A host process connects to guest `port` and the guest accepts; returns the stream and
    /// the device's port. Leaves one spare rx buffer.
    fn host_connection(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = host_stream(UnixStream::connect(self.path()).unwrap());
        host.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.pump();
        self.post_rx(2);
        let (request, _) = self.recv_one();
        assert_eq!((request.op, request.dst_port), (op::REQUEST, port));
        self.send(from_guest(op::RESPONSE, port, request.src_port), &[]);
        assert_eq!(read_line(&mut host), format!("OK {}", request.src_port));
        (host, request.src_port)
    }

    /// The guest connects to host port `port` from `guest_port` with `buf_alloc` of credit; a
    /// host listener at `<path>_<port>` accepts. Returns the host's end.
    fn guest_connection(&mut self, port: u32, guest_port: u32, buf_alloc: u32) -> (UnixListener, UnixStream) {
        let listener = UnixListener::bind(format!("{}_{port}", self.path().display())).unwrap();
        self.post_rx(1);
        self.send(Header { buf_alloc, ..from_guest(op::REQUEST, guest_port, port) }, &[]);
        let (response, _) = self.recv_one();
        assert_eq!(response, Header { buf_alloc: 256 << 10, ..to_guest(op::RESPONSE, port, guest_port) });
        self.pump();
        let (stream, _) = listener.accept().unwrap();
        (listener, host_stream(stream))
    }
}

/// The guest's side of a [`Bench`] at one moment.
struct BenchCheckpoint {
    guest: Checkpoint,
    rx_addrs: HashMap<u32, u64>,
    rx_posted: u64,
    rx_seen: usize,
    tx_sent: u64,
}

/// A packet header from the guest to the host.
fn from_guest(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        kind: TYPE_STREAM,
        op,
        buf_alloc: 64 << 10,
        ..Header::default()
    }
}

/// A packet header from the host to the guest, with zero credit fields.
fn to_guest(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header { src_cid: HOST_CID, dst_cid: CID, src_port, dst_port, kind: TYPE_STREAM, op, ..Header::default() }
}

/// Waits at most a few seconds for any read on the stream.
fn host_stream(stream: UnixStream) -> UnixStream {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
}

fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() < 64 {
        stream.read_exact(&mut byte).unwrap();
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

fn read_exactly(stream: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    stream.read_exact(&mut data).unwrap();
    data
}

/// The device closed its end: the end of the stream, or a reset if it left bytes unread.
fn assert_closed(stream: &mut UnixStream) {
    let mut byte = [0u8];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the device should have closed the stream: {other:?}"),
    }
}

#[test]
fn offers_the_guest_cid_in_its_configuration() {
    let bench = Bench::inactive();
    let guest = &bench.guest;
    assert_eq!(guest.config(0, 8), [4, 3, 2, 1, 0, 0, 0, 0]);
    assert_eq!(guest.config(2, 4), [2, 1, 0, 0]);
    assert_eq!(guest.config(8, 4), [0; 4], "nothing past the CID");
    assert_eq!(guest.device_features(), F_VERSION_1 | F_EVENT_IDX, "stream sockets need no feature bits of their own");
    let device = guest.device.lock().unwrap();
    assert_eq!((device.device_type(), device.queue_max_sizes(), device.guest_cid()), (TYPE_VSOCK, &[256; 3][..], CID));
}

#[test]
fn rejects_reserved_cids_and_unusable_paths() {
    let dir = TempDir::new();
    let path = dir.0.join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
        let err = Vsock::new(cid, &path).err().unwrap();
        assert!(matches!(err, VsockError::InvalidCid(c) if c == cid));
        assert!(err.to_string().contains(&format!("guest CID {cid} ")), "{err}");
    }
    assert!(!path.exists(), "a refused device leaves no socket");

    let device = Vsock::new(3, &path).unwrap();
    let err = Vsock::new(4, &path).err().unwrap();
    assert!(matches!(err, VsockError::PathExists(_)));
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    drop(device);
    assert!(!path.exists(), "drop removes the socket");

    std::fs::write(&path, b"a file").unwrap();
    assert!(matches!(Vsock::new(3, &path), Err(VsockError::PathExists(_))));
    let missing = dir.0.join("missing").join("v.sock");
    let err = Vsock::new(3, &missing).err().unwrap();
    assert!(matches!(err, VsockError::NoDirectory(_)));
    assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
}

#[test]
fn host_connection_carries_bytes_both_ways() {
    let mut bench = Bench::new();
    let mut host = host_stream(UnixStream::connect(bench.path()).unwrap());
    // Bytes right after the line belong to the connection.
    host.write_all(b"CONNECT 52\nearly").unwrap();
    bench.pump();
    assert!(bench.recv().is_empty(), "no rx buffers yet");

    bench.post_rx(3);
    let (request, payload) = bench.recv_one();
    assert_eq!(request, Header { buf_alloc: 256 << 10, ..to_guest(op::REQUEST, FIRST_PORT, 52) });
    assert!(payload.is_empty());

    bench.send(from_guest(op::RESPONSE, 52, FIRST_PORT), &[]);
    assert_eq!(read_line(&mut host), format!("OK {FIRST_PORT}"));
    let (rw, payload) = bench.recv_one();
    assert_eq!((rw.op, rw.src_port, rw.dst_port, payload.as_slice()), (op::RW, FIRST_PORT, 52, &b"early"[..]));

    host.write_all(b"ping").unwrap();
    bench.pump();
    let (rw, payload) = bench.recv_one();
    assert_eq!((rw.op, rw.len, rw.ports()), (op::RW, 4, (FIRST_PORT, 52)));
    assert_eq!(payload, b"ping");

    bench.send(from_guest(op::RW, 52, FIRST_PORT), b"pong");
    assert_eq!(read_exactly(&mut host, 4), b"pong");

    // A second connection gets the next port.
    let (_second, port) = bench.host_connection(52);
    assert_eq!(port, FIRST_PORT + 1);
    assert_eq!(bench.errors(), 0);
    assert!(!bench.guest.needs_reset());
}

impl Header {
    /// (source port, destination port).
    fn ports(&self) -> (u32, u32) {
        (self.src_port, self.dst_port)
    }
}

#[test]
fn guest_connections_reach_host_listeners() {
    let mut bench = Bench::new();
    let (_listener, mut host) = bench.guest_connection(1234, 5000, 64 << 10);

    bench.send(from_guest(op::RW, 5000, 1234), b"hello");
    assert_eq!(read_exactly(&mut host, 5), b"hello");
    bench.post_rx(1);
    host.write_all(b"world").unwrap();
    bench.pump();
    let (rw, payload) = bench.recv_one();
    assert_eq!((rw.op, rw.ports(), payload.as_slice()), (op::RW, (1234, 5000), &b"world"[..]));

    // No listener on port 999, and CID 7 is not the host: both refused.
    bench.post_rx(2);
    bench.send(from_guest(op::REQUEST, 5001, 999), &[]);
    bench.send(Header { dst_cid: 7, ..from_guest(op::REQUEST, 5002, 1234) }, &[]);
    let packets = bench.recv();
    assert_eq!(packets[0].0, to_guest(op::RST, 999, 5001));
    assert_eq!(packets[1].0, Header { src_cid: 7, ..to_guest(op::RST, 1234, 5002) });

    // A request reusing the ports of the live connection ends it.
    bench.post_rx(1);
    bench.send(from_guest(op::REQUEST, 5000, 1234), &[]);
    let (rst, _) = bench.recv_one();
    assert_eq!((rst.op, rst.ports()), (op::RST, (1234, 5000)));
    bench.pump();
    assert_closed(&mut host);
    assert_eq!(bench.errors(), 0);
}

#[test]
fn guest_refusing_a_host_connection_closes_the_stream() {
    let mut bench = Bench::new();
    let mut host = host_stream(UnixStream::connect(bench.path()).unwrap());
    host.write_all(b"CONNECT 52\n").unwrap();
    bench.pump();
    bench.post_rx(1);
    let (request, _) = bench.recv_one();
    bench.send(from_guest(op::RST, 52, request.src_port), &[]);
    bench.pump();
    assert_closed(&mut host);
    assert_eq!(bench.errors(), 0);
}

#[test]
fn tx_waits_while_too_many_resets_wait_for_rx_buffers() {
    let mut bench = Bench::new();
    for port in 10_000..10_065 {
        bench.send(from_guest(op::RW, port, 7), b"x");
    }
    assert_eq!(bench.guest.used(TX).len(), 64, "the last packet waits for the device's answers to leave");
    let mut answered = Vec::new();
    for _ in 0..8 {
        bench.post_rx(16);
        answered.extend(bench.recv().into_iter().map(|(h, _)| (h.op, h.dst_port)));
        if answered.len() >= 65 {
            break;
        }
    }
    assert_eq!(bench.guest.used(TX).len(), 65);
    assert_eq!(answered, (10_000..10_065).map(|port| (op::RST, port)).collect::<Vec<_>>());
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mut bench = Bench::new();
    let (_listener, mut host) = bench.guest_connection(80, 6000, 10);
    let data: Vec<u8> = (0..25).collect();
    host.write_all(&data).unwrap();
    bench.post_rx(3);
    bench.pump();
    let (rw, first) = bench.recv_one();
    assert_eq!((rw.op, first.as_slice()), (op::RW, &data[..10]));
    bench.pump();
    assert!(bench.recv().is_empty(), "the guest's 10 bytes of credit are used up");

    bench.send(Header { buf_alloc: 10, fwd_cnt: 10, ..from_guest(op::CREDIT_UPDATE, 6000, 80) }, &[]);
    let (_, second) = bench.recv_one();
    assert_eq!(second, &data[10..20]);
    // A bigger buffer gives room for the rest.
    bench.send(Header { buf_alloc: 100, fwd_cnt: 20, ..from_guest(op::CREDIT_UPDATE, 6000, 80) }, &[]);
    let (_, third) = bench.recv_one();
    assert_eq!(third, &data[20..]);
}

#[test]
fn answers_credit_requests_with_what_it_forwarded() {
    let mut bench = Bench::new();
    let (_listener, mut host) = bench.guest_connection(80, 6000, 64 << 10);
    bench.send(from_guest(op::RW, 6000, 80), b"12345");
    assert_eq!(read_exactly(&mut host, 5), b"12345");
    bench.post_rx(1);
    bench.send(from_guest(op::CREDIT_REQUEST, 6000, 80), &[]);
    let (update, _) = bench.recv_one();
    assert_eq!(update, Header { buf_alloc: 256 << 10, fwd_cnt: 5, ..to_guest(op::CREDIT_UPDATE, 80, 6000) });
}

#[test]
fn buffers_guest_data_the_host_is_slow_to_take() {
    let mut bench = Bench::new();
    let (_listener, mut host) = bench.guest_connection(80, 6000, 64 << 10);
    // All the credit the device gives, more than a Unix socket holds.
    let data: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8).collect();
    for chunk in data.chunks(64 << 10) {
        bench.send(from_guest(op::RW, 6000, 80), chunk);
    }
    bench.post_rx(4);
    host.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    for _ in 0..1000 {
        let mut buf = vec![0u8; 64 << 10];
        match host.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        bench.pump();
        if got.len() >= data.len() {
            break;
        }
    }
    assert!(got == data, "the host got {} bytes, not the {} the guest sent", got.len(), data.len());
    // Room freed for the guest is announced without its asking.
    let packets = bench.recv();
    assert!(!packets.is_empty() && packets.iter().all(|(h, _)| h.op == op::CREDIT_UPDATE), "{packets:?}");
    bench.post_rx(1);
    bench.send(from_guest(op::CREDIT_REQUEST, 6000, 80), &[]);
    let (update, _) = bench.recv_one();
    assert_eq!((update.op, update.fwd_cnt), (op::CREDIT_UPDATE, 256 << 10));
    assert_eq!(bench.errors(), 0);
}

#[test]
fn data_beyond_the_credit_resets_the_connection() {
    let mut bench = Bench::new();
    let (_listener, mut host) = bench.guest_connection(80, 6000, 64 << 10);
    bench.post_rx(2);
    // The host reads nothing: the device's buffer fills up once the socket's has.
    let chunk = vec![7u8; 64 << 10];
    for _ in 0..16 {
        bench.send(from_guest(op::RW, 6000, 80), &chunk);
        if bench.errors() > 0 {
            break;
        }
    }
    assert_eq!(bench.errors(), 1);
    // Maybe a credit update for what the socket took, then the reset.
    let (rst, _) = bench.recv().pop().unwrap();
    assert_eq!((rst.op, rst.ports()), (op::RST, (80, 6000)));
    bench.pump();
    host.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match host.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("the stream should end after the reset: {e}"),
        }
    }
    assert!(total <= 512 << 10);
}

#[test]
fn end_of_stream_becomes_shutdown_and_both_ends_close_the_connection() {
    let mut bench = Bench::new();
    let (mut host, port) = bench.host_connection(52);

    // The guest will send no more: the host reads the end, the connection stays.
    bench.send(Header { flags: SHUTDOWN_SEND, ..from_guest(op::SHUTDOWN, 52, port) }, &[]);
    assert_closed(&mut host);
    bench.pump();
    assert!(bench.recv().is_empty());

    host.write_all(b"last").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    bench.post_rx(1);
    bench.pump();
    let packets = bench.recv();
    let summary: Vec<_> = packets.iter().map(|(h, p)| (h.op, h.flags, p.clone())).collect();
    assert_eq!(summary, [(op::RW, 0, b"last".to_vec()), (op::SHUTDOWN, SHUTDOWN_SEND, vec![])]);
    // Both directions are over: the device resets the connection.
    bench.post_rx(1);
    let (rst, _) = bench.recv_one();
    assert_eq!((rst.op, rst.ports()), (op::RST, (port, 52)));
}

#[test]
fn guest_close_resets_the_connection_and_closes_the_stream() {
    let mut bench = Bench::new();
    let (mut host, port) = bench.host_connection(52);
    bench.send(Header { flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..from_guest(op::SHUTDOWN, 52, port) }, &[]);
    let (rst, _) = bench.recv_one();
    assert_eq!((rst.op, rst.ports()), (op::RST, (port, 52)));
    bench.pump();
    assert_closed(&mut host);

    // A guest RST closes the stream too, and later packets for it are refused.
    let (mut host, port) = bench.host_connection(53);
    bench.send(from_guest(op::RST, 53, port), &[]);
    bench.pump();
    assert_closed(&mut host);
    bench.send(from_guest(op::RW, 53, port), b"late");
    let (rst, _) = bench.recv_one();
    assert_eq!(rst, to_guest(op::RST, port, 53));
    assert_eq!(bench.errors(), 0);
}

#[test]
fn host_hanging_up_before_the_guest_answers_cancels_the_request() {
    let mut bench = Bench::new();
    let host = UnixStream::connect(bench.path()).unwrap();
    (&host).write_all(b"CONNECT 52\n").unwrap();
    bench.pump();
    bench.post_rx(2);
    let (request, _) = bench.recv_one();
    drop(host);
    bench.pump();
    let (rst, _) = bench.recv_one();
    assert_eq!(rst, Header { buf_alloc: 256 << 10, ..to_guest(op::RST, request.src_port, 52) });
    // The guest's late answer finds no connection.
    bench.post_rx(1);
    bench.send(from_guest(op::RESPONSE, 52, request.src_port), &[]);
    assert_eq!(bench.recv_one().0.op, op::RST);
}

#[test]
fn bad_connect_lines_close_the_stream() {
    let mut bench = Bench::new();
    bench.post_rx(2);
    let long = [b'A'; 40];
    let lines: [&[u8]; 7] =
        [b"HELLO\n", b"CONNECT abc\n", b"CONNECT \n", b"CONNECT 99999999999\n", b"CONNECT +5\n", b"connect 5\n", &long];
    for line in lines {
        let mut host = host_stream(UnixStream::connect(bench.path()).unwrap());
        host.write_all(line).unwrap();
        bench.pump();
        assert_closed(&mut host);
    }
    // The end of the stream before a newline.
    let mut host = host_stream(UnixStream::connect(bench.path()).unwrap());
    host.write_all(b"CONNECT 5").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    bench.pump();
    assert_closed(&mut host);
    assert!(bench.recv().is_empty(), "the guest hears of none of them");

    // A line in pieces is fine, and the listener still serves.
    let host = UnixStream::connect(bench.path()).unwrap();
    (&host).write_all(b"CONN").unwrap();
    bench.pump();
    (&host).write_all(b"ECT 7\n").unwrap();
    bench.pump();
    assert_eq!(bench.recv_one().0.dst_port, 7);
}

#[test]
fn malformed_packets_are_dropped_and_counted() {
    let mut bench = Bench::new();
    let (mut host, port) = bench.host_connection(52);
    bench.post_rx(4);
    let tx_used = |bench: &Bench| bench.guest.used(TX).len();

    // A header too short, and one in a device-writable buffer.
    let used = tx_used(&bench);
    bench.send_chain(&from_guest(op::RW, 52, port).to_bytes()[..20], &[]);
    bench.guest.add_chain(TX, &[(TX_BASE, HEADER_SIZE as u32, true)]);
    bench.guest.notify(TX);
    // A header outside guest memory.
    bench.guest.add_chain(TX, &[(MEMORY_SIZE - 8, HEADER_SIZE as u32, false)]);
    bench.guest.notify(TX);
    // Not from the guest's CID.
    bench.send(Header { src_cid: 99, ..from_guest(op::RW, 52, port) }, b"x");
    assert_eq!(bench.errors(), 4);
    assert_eq!(tx_used(&bench), used + 4, "dropped packets still return their buffers");
    assert!(bench.guest.used(TX)[used..].iter().all(|&(_, len)| len == 0));
    assert!(bench.recv().is_empty(), "none of them can be answered");

    // A datagram is refused.
    bench.send(Header { kind: 2, ..from_guest(op::RW, 52, port) }, b"x");
    assert_eq!(bench.recv_one().0, to_guest(op::RST, port, 52));
    assert_eq!(bench.errors(), 5);

    // More payload announced than the chain holds: the connection is reset.
    let header = Header { len: 100, ..from_guest(op::RW, 52, port) };
    bench.send_chain(&header.to_bytes(), b"only ten..");
    let (rst, _) = bench.recv_one();
    assert_eq!((rst.op, rst.ports()), (op::RST, (port, 52)));
    assert_eq!(bench.errors(), 6);
    bench.pump();
    assert_closed(&mut host);

    // An unknown operation on a live connection resets it.
    let (mut host, port) = bench.host_connection(53);
    bench.send(from_guest(99, 53, port), &[]);
    assert_eq!(bench.recv_one().0.op, op::RST);
    assert_eq!(bench.errors(), 7);
    bench.pump();
    assert_closed(&mut host);
    assert!(!bench.guest.needs_reset());
}

#[test]
fn bad_rx_buffers_are_returned_empty_and_the_packet_waits() {
    let mut bench = Bench::new();
    bench.guest.add_chain(RX, &[(RX_BASE + 0x10_0000, 10, true)]);
    bench.guest.add_chain(RX, &[(MEMORY_SIZE - 16, RX_LEN, true)]);
    bench.guest.add_chain(RX, &[(RX_BASE + 0x10_0000, RX_LEN, false)]);
    bench.guest.notify(RX);
    let mut host = UnixStream::connect(bench.path()).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    bench.pump();
    assert_eq!(bench.guest.used(RX).iter().map(|&(_, len)| len).collect::<Vec<_>>(), [0, 0, 0]);
    assert_eq!(bench.errors(), 3);
    bench.rx_seen = 3;
    bench.post_rx(1);
    assert_eq!(bench.recv_one().0.op, op::REQUEST);
}

#[test]
fn works_only_once_active_and_forgets_connections_on_reset() {
    let mut bench = Bench::inactive();
    for queue in [RX, TX, EVENT] {
        bench.guest.device.lock().unwrap().process_queue(queue);
    }
    // A host process may connect before the driver is up: the request waits for it.
    let host = UnixStream::connect(bench.path()).unwrap();
    (&host).write_all(b"CONNECT 52\n").unwrap();
    bench.pump();
    bench.guest.activate(0);
    bench.post_rx(1);
    let (request, _) = bench.recv_one();
    assert_eq!(request.dst_port, 52);
    // The event queue's buffers are for a restore only.
    bench.post_event(0, 8);
    assert!(bench.guest.used(EVENT).is_empty());

    bench.send(from_guest(op::RESPONSE, 52, request.src_port), &[]);
    let mut host = host_stream(host);
    assert_eq!(read_line(&mut host), format!("OK {}", request.src_port));
    bench.guest.write(0x70, 0);
    bench.pump();
    assert_closed(&mut host);
    assert_eq!(bench.errors(), 0);
}

/// The transport reset event, as it lands in an 8-byte event buffer filled with 0xff.
const RESET_EVENT: [u8; 8] = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];

#[test]
fn restore_drops_every_connection_and_sends_a_transport_reset() {
    let mut bench = Bench::new();
    let event = bench.post_event(0, 8);
    bench.post_event(1, 8);
    let (mut host, _) = bench.host_connection(52);
    let (_listener, mut listening) = bench.guest_connection(1234, 5000, 64 << 10);
    // A host process that has yet to send its CONNECT line.
    let mut connecting = host_stream(UnixStream::connect(bench.path()).unwrap());
    bench.pump();
    let state = bench.guest.save();
    assert_eq!(state.model, ModelState::Vsock);
    bench.guest.take_interrupt();

    bench.guest.transport.restore(&state).unwrap();
    // The host side ends at once, before the event loop runs again.
    for stream in [&mut host, &mut listening, &mut connecting] {
        assert_closed(stream);
    }
    assert!(bench.guest.used(EVENT).is_empty(), "the restore itself wrote guest memory");
    bench.pump();
    assert_eq!(bench.guest.used(EVENT), [(event as u32, 4)], "one transport reset event");
    assert_eq!(bench.guest.read_mem(EVENT_BASE, 8), RESET_EVENT);
    assert!(bench.guest.take_interrupt());
    assert_eq!(bench.recv(), [], "RSTs for connections the driver drops itself");
    // The listener stays: host processes connect as before.
    let (mut again, port) = bench.host_connection(53);
    again.write_all(b"after").unwrap();
    bench.pump();
    let (header, payload) = bench.recv_one();
    assert_eq!((header.op, header.src_port, payload), (op::RW, port, b"after".to_vec()));
    assert_eq!(bench.guest.used(EVENT).len(), 1, "a single event");
}

#[test]
fn restored_into_a_fresh_device_it_serves_where_the_original_left_off() {
    let mut bench = Bench::new();
    let (mut host, port) = bench.host_connection(52);
    host.write_all(b"ping").unwrap();
    bench.pump();
    assert_eq!(bench.recv_one().1, b"ping");
    let state = bench.guest.save();

    let mut restored = bench.fork();
    restored.guest.transport.restore(&state).unwrap();
    restored.pump();
    // A host process connects to the restored device: its request takes the guest's next rx buffer.
    let (mut again, again_port) = restored.host_connection(60);
    let used = restored.guest.used(RX);
    assert_eq!((&used[..2], used.len()), (&bench.guest.used(RX)[..], 3), "the rx used ring goes on");
    again.write_all(b"hello").unwrap();
    restored.pump();
    let (header, payload) = restored.recv_one();
    assert_eq!((header.op, header.src_port, payload), (op::RW, again_port, b"hello".to_vec()));
    // The guest's packets for the connection that did not come along get a RST.
    restored.post_rx(1);
    restored.send(from_guest(op::RW, 52, port), b"lost");
    assert_eq!(restored.recv_one().0, to_guest(op::RST, port, 52));
    // The reset event waits for the driver's first event buffer, and takes only that one.
    let event = restored.post_event(0, 8);
    restored.post_event(1, 8);
    assert_eq!(restored.guest.used(EVENT), [(event as u32, 4)]);
    assert_eq!(restored.guest.read_mem(EVENT_BASE, 8), RESET_EVENT);
    // The original is left alone.
    host.write_all(b"pong").unwrap();
    bench.pump();
    bench.post_rx(1);
    assert_eq!(bench.recv_one().1, b"pong");
}

#[test]
fn restored_in_place_it_goes_back_to_the_snapshot_point() {
    let mut bench = Bench::new();
    let (_first, _) = bench.host_connection(52);
    let (checkpoint, state, used) = (bench.checkpoint(), bench.guest.save(), bench.guest.used(RX));
    let request = bench.guest.read_mem(RX_BASE, RX_LEN as usize);
    let _later: Vec<_> = (53..56).map(|port| bench.host_connection(port)).collect();
    assert_eq!(bench.guest.used(RX).len(), 4);

    bench.rewind(&checkpoint);
    bench.guest.transport.restore(&state).unwrap();
    bench.pump();
    let (_host, _) = bench.host_connection(60);
    assert_eq!(bench.guest.used(RX)[..1], used);
    assert_eq!(bench.guest.used(RX).len(), 2, "the rx used ring goes on from the snapshot");
    assert_eq!(bench.guest.read_mem(RX_BASE, RX_LEN as usize), request, "the packet before the snapshot overwritten");
    // A transport reset is owed, for the connections made after the snapshot too.
    let event = bench.post_event(0, 8);
    assert_eq!(bench.guest.used(EVENT), [(event as u32, 4)]);
}
