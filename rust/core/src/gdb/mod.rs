//! A gdb server (the GDB Remote Serial Protocol over TCP, by the `gdbstub` crate) for a
//! [`Machine`].
//!
//! The server has a thread of its own, which accepts one client at a time. A client that connects
//! takes the VM over: a run in progress is stopped (it ends with [`ExitReason::Stopped`] for
//! whoever waits on it), and from then on the VM runs only when the client continues or steps it,
//! every vCPU a gdb thread. Ctrl-C in gdb stops it again. A malformed packet gets an error reply.
//! When the client detaches or disconnects the session ends: the client's breakpoints and
//! watchpoints go, and the VM is started again in the background (as [`Machine::start`] does)
//! unless it ended for good while the client watched (every vCPU halted, a power-off) or the
//! client asked for a kill.

mod regs;
mod replay;
mod target;

pub use regs::{KvmX86_64, X86Registers};

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use gdbstub::stub::{DisconnectReason, GdbStub, GdbStubError};

use crate::machine::Machine;
use crate::vstate::exit::ExitReason;
use target::{EventLoop, Session};

/// How the server carries out gdb's (software) breakpoints, the `break` command's Z0 packets.
/// `hbreak` always takes a debug register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BreakpointMode {
    /// A debug register while one is free, else an `int3`.
    #[default]
    Auto,
    /// Only debug registers (four, shared with watchpoints): for KVMs that keep `int3` to the
    /// guest, such as a paravirtualized one.
    Hardware,
    /// Always an `int3` patched over the instruction.
    Software,
}

impl std::str::FromStr for BreakpointMode {
    type Err = crate::Error;

    fn from_str(text: &str) -> crate::Result<Self> {
        match text {
            "auto" => Ok(Self::Auto),
            "hardware" => Ok(Self::Hardware),
            "software" => Ok(Self::Software),
            other => Err(crate::Error::InvalidConfig(format!(
                "breakpoints is \"auto\", \"hardware\" or \"software\", not {other:?}"
            ))),
        }
    }
}

/// What the server thread shares with its handle.
struct Shared {
    mode: BreakpointMode,
    /// Whether sessions record for reverse execution.
    reverse: bool,
    closing: AtomicBool,
    status: Mutex<Status>,
    changed: Condvar,
}

#[derive(Default)]
struct Status {
    /// Whether a client is attached.
    attached: bool,
    /// How many clients have attached so far.
    sessions: u64,
    /// The attached client's connection, to cut it when the server closes.
    client: Option<TcpStream>,
}

impl Shared {
    fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_client(&self, client: Option<TcpStream>) {
        let mut status = self.status();
        status.attached = client.is_some();
        if client.is_some() {
            status.sessions += 1;
        }
        status.client = client;
        self.changed.notify_all();
    }

    /// Waits until `done` holds, at most `timeout`; whether it does.
    fn wait_until(&self, timeout: Option<Duration>, done: impl Fn(&Status) -> bool) -> bool {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut status = self.status();
        while !done(&status) {
            let left = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return false,
                },
                None => Duration::from_secs(3600),
            };
            status = self.changed.wait_timeout(status, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}

/// A gdb server for one machine, serving until it is closed or dropped.
pub struct GdbServer {
    shared: Arc<Shared>,
    address: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

/// How often the idle server looks for a new client and for its own closing.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

impl GdbServer {
    /// Listens on `address` (`"host:port"`, port 0 for any free one) and serves gdb clients there
    /// on a thread of its own. With `reverse`, a session on a VM of one vCPU records what it runs
    /// (single-stepping every instruction, continues included), so that gdb can go back
    /// (`reverse-stepi`, `reverse-continue`).
    pub fn start(machine: Arc<Machine>, address: &str, mode: BreakpointMode, reverse: bool) -> io::Result<Self> {
        let addresses: Vec<SocketAddr> = address.to_socket_addrs()?.collect();
        let listener = TcpListener::bind(&addresses[..])?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            mode,
            reverse,
            closing: AtomicBool::new(false),
            status: Mutex::new(Status::default()),
            changed: Condvar::new(),
        });
        let serving = shared.clone();
        let thread =
            thread::Builder::new().name("kvmkit-gdb".into()).spawn(move || serve(&machine, &serving, &listener))?;
        Ok(Self { shared, address, thread: Some(thread) })
    }

    /// Where the server listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Whether a client is attached.
    pub fn is_attached(&self) -> bool {
        self.shared.status().attached
    }

    /// How many clients have attached so far.
    pub fn sessions(&self) -> u64 {
        self.shared.status().sessions
    }

    /// Waits until a client is attached, at most `timeout`; whether one is.
    pub fn wait_attached(&self, timeout: Option<Duration>) -> bool {
        self.shared.wait_until(timeout, |status| status.attached)
    }

    /// Waits until no client is attached (a session that ended has left the VM as it leaves it),
    /// at most `timeout`; whether none is.
    pub fn wait_detached(&self, timeout: Option<Duration>) -> bool {
        self.shared.wait_until(timeout, |status| !status.attached)
    }

    /// Stops serving: a client still attached is cut off and its session ends as a disconnect
    /// does. Closing again does nothing.
    pub fn close(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        if let Some(client) = &self.shared.status().client {
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the gdb server thread panicked");
            }
        }
    }
}

impl Drop for GdbServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// The server thread: one session per client until the server closes.
fn serve(machine: &Arc<Machine>, shared: &Arc<Shared>, listener: &TcpListener) {
    while !shared.closing() {
        let stream = match listener.accept() {
            Ok((stream, peer)) => {
                log::info!("gdb: client {peer} attached");
                stream
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(listener.as_raw_fd(), ACCEPT_POLL);
                continue;
            }
            Err(e) => {
                log::warn!("gdb: accepting a client failed: {e}");
                thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        if let Err(e) = stream.set_nonblocking(false) {
            log::warn!("gdb: cannot use the client's connection: {e}");
            continue;
        }
        shared.set_client(stream.try_clone().ok());
        let outcome = catch_unwind(AssertUnwindSafe(|| session(machine, shared, stream)));
        if outcome.is_err() {
            log::error!("gdb: the session panicked; the client is cut off");
        }
        shared.set_client(None);
    }
}

/// One client's session, from its connection to leaving the VM as a detach leaves it.
fn session(machine: &Arc<Machine>, shared: &Arc<Shared>, stream: TcpStream) {
    if machine.is_running() {
        machine.stop(ExitReason::Stopped);
        let _ = machine.wait(None);
    }
    let mut target = Session::new(machine.clone(), shared.clone());
    let ended = loop {
        let connection = match stream.try_clone() {
            Ok(connection) => connection,
            Err(e) => break Err(e.to_string()),
        };
        match GdbStub::new(connection).run_blocking::<EventLoop>(&mut target) {
            Ok(reason) => break Ok(reason),
            Err(e) => match bad_packet_reply(&e) {
                // A bad packet while the VM is stopped: answered with an error, and the session
                // goes on, with the protocol state of a new connection.
                Some(reply) if !target.is_running() && !shared.closing() => {
                    log::info!("gdb: a bad packet: {e}");
                    if let Err(e) = (&stream).write_all(reply) {
                        break Err(e.to_string());
                    }
                }
                _ => break Err(e.to_string()),
            },
        }
    };
    let resume = match &ended {
        Ok(DisconnectReason::Disconnect) => {
            log::info!("gdb: the client detached");
            true
        }
        Ok(DisconnectReason::Kill) => {
            log::info!("gdb: the client killed the VM; it stays stopped");
            false
        }
        Ok(DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_)) => false,
        Err(e) => {
            log::info!("gdb: the session ended: {e}");
            true
        }
    };
    target.clean_up();
    if resume && !target.exited {
        if let Err(e) = machine.start() {
            log::warn!("gdb: cannot resume the VM after the session: {e}");
        }
    }
}

/// What to answer the packet `error` was about, if the session can go on after it: nothing for
/// stray bytes between packets or a stray negative acknowledgement, a negative acknowledgement
/// (asking for it again) for a packet whose checksum is wrong, and an error reply for a malformed
/// or oversized packet or one that does not fit the target. `gdbstub` shows the kind of its
/// errors only in their debug form.
fn bad_packet_reply<T: std::fmt::Debug, C: std::fmt::Debug>(error: &GdbStubError<T, C>) -> Option<&'static [u8]> {
    if error.is_connection_error() || error.is_target_error() {
        return None;
    }
    let kind = format!("{error:?}");
    let has = |names: &[&str]| names.iter().any(|name| kind.contains(name));
    if has(&["UnexpectedHeader", "ClientSentNack"]) {
        Some(b"")
    } else if has(&["ChecksumMismatched"]) {
        Some(b"-")
    } else if has(&["PacketParse", "PacketUnexpected", "PacketBufferOverflow", "TargetMismatch"]) {
        // "E01" with its checksum.
        Some(b"$E01#a6")
    } else {
        None
    }
}

/// Waits until `fd` is readable (or closed), at most `timeout`; whether it is.
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) > 0 }
}
