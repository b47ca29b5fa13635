//! Helpers for tests that need a real tap: a private network namespace, and the host's side of
//! the tap (a packet socket on it).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread;

/// Runs `test` on a thread of its own that first moves into a new, empty network namespace, so
/// that the taps it creates and the frames it sends never reach the host's networking.
///
/// Namespaces belong to threads, not processes: `unshare(CLONE_NEWNET)` moves only the calling
/// thread, and sockets and taps are created in the namespace of the thread that opens them. libtest
/// already runs each test on a thread of its own, but a fresh thread here makes that hold under
/// any harness, and the namespace goes away with the thread and the descriptors opened in it.
/// Fails (never skips) when the namespace cannot be made, which needs `CAP_SYS_ADMIN`.
pub fn in_private_netns<T: Send>(test: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| {
        let thread = scope.spawn(|| {
            // SAFETY: unshare takes its flags by value; CLONE_NEWNET affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "unshare(CLONE_NEWNET) failed: {} (tap tests need CAP_SYS_ADMIN for a private network namespace)",
                    io::Error::last_os_error()
                );
            }
            // Without IPv6, an interface that comes up sends nothing on its own (no router or
            // neighbour solicitations, no MLD reports), so every frame a test sees is its own.
            // This sysctl is the new namespace's, because /proc/sys/net follows the calling thread.
            match std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1") {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    panic!("cannot disable IPv6 in the test namespace: {e}")
                }
                _ => {}
            }
            test()
        });
        thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Drops `CAP_NET_ADMIN` from the calling thread's effective capabilities (capabilities, too,
/// belong to threads).
pub fn drop_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget fills two Data records (version 3) for the calling thread (pid 0).
    assert_eq!(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) }, 0);
    data[0].effective &= !(1 << CAP_NET_ADMIN);
    // SAFETY: capset reads the header and two Data records, for the calling thread only.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
}

fn check(rc: libc::c_int, what: &str) {
    assert!(rc >= 0, "{what}: {}", io::Error::last_os_error());
}

/// The host's end of a tap: the interface brought up, and a packet socket bound to it that
/// sends frames into the tap (which the tap's reader then gets) and receives the frames written
/// to the tap.
pub struct HostSide {
    socket: OwnedFd,
    name: String,
}

impl HostSide {
    /// Brings interface `name` up and binds a packet socket for every protocol to it.
    pub fn attach(name: &str) -> Self {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket takes its arguments by value; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol.into()) };
        check(fd, "packet socket");
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let host = Self { socket, name: name.to_owned() };
        let mut req = host.ifreq();
        // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq it is given.
        check(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) }, "SIOCGIFFLAGS");
        // SAFETY: SIOCGIFFLAGS set the flags member; setting IFF_UP keeps it initialised.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads the ifreq it is given.
        check(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) }, "SIOCSIFFLAGS");
        match std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6")) {
            Ok(disabled) => assert_eq!(disabled.trim(), "1", "IPv6 would send frames of its own on {name}"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}"),
        }
        let c_name = CString::new(name).unwrap();
        // SAFETY: if_nametoindex reads the NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {name}");
        // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        let len = std::mem::size_of_val(&addr) as libc::socklen_t;
        // SAFETY: bind reads `len` bytes of the sockaddr_ll.
        check(unsafe { libc::bind(fd, (&raw const addr).cast(), len) }, "bind packet socket");
        host
    }

    fn ifreq(&self) -> libc::ifreq {
        // SAFETY: ifreq is plain old data; all zeroes is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in req.ifr_name.iter_mut().zip(self.name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        req
    }

    /// Sends one Ethernet frame out of the interface, into the tap.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: send reads `frame.len()` bytes from the slice.
        let sent = unsafe { libc::send(self.socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(sent, frame.len() as isize, "send: {}", io::Error::last_os_error());
    }

    /// The next frame the interface received, or `None` after `timeout_ms`.
    pub fn recv(&self, timeout_ms: i32) -> Option<Vec<u8>> {
        if !wait_readable(self.socket.as_raw_fd(), timeout_ms) {
            return None;
        }
        let mut buf = vec![0u8; 70_000];
        // SAFETY: recv writes at most `buf.len()` bytes into the buffer.
        let got = unsafe { libc::recv(self.socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(got >= 0, "recv: {}", io::Error::last_os_error());
        buf.truncate(got as usize);
        Some(buf)
    }

    /// The interface's offload state from a legacy ethtool get command (`ETHTOOL_GTXCSUM`, ...).
    pub fn ethtool(&self, cmd: u32) -> bool {
        let mut value = [cmd, 0u32];
        let mut req = self.ifreq();
        req.ifr_ifru.ifru_data = value.as_mut_ptr().cast();
        // SAFETY: SIOCETHTOOL reads the command from, and writes the value to, the
        // `struct ethtool_value` (two u32) that ifr_data points to, which outlives the call.
        check(unsafe { libc::ioctl(self.socket.as_raw_fd(), libc::SIOCETHTOOL, &mut req) }, "SIOCETHTOOL");
        value[1] != 0
    }
}

/// `ETHTOOL_GTXCSUM`: whether the interface hands out frames with partial checksums.
pub const ETHTOOL_GTXCSUM: u32 = 0x16;
/// `ETHTOOL_GTSO`: whether it hands out TCP segments larger than the MTU.
pub const ETHTOOL_GTSO: u32 = 0x1e;

/// Whether `fd` becomes readable within `timeout_ms`.
pub fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll reads and writes the one pollfd it is given.
    let ready = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
    assert!(ready >= 0, "poll: {}", io::Error::last_os_error());
    ready == 1
}

/// An Ethernet frame of `len` bytes (at least 14) of an experimental EtherType, its payload
/// numbered from `seed`.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x88, 0xb5];
    frame.extend((0..len.saturating_sub(14)).map(|i| seed.wrapping_add(i as u8)));
    frame.truncate(len);
    frame
}
