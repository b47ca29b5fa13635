//! A Linux tap interface: whole Ethernet frames, each behind a virtio-net header, through a
//! non-blocking file descriptor.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use thiserror::Error;

/// Size of the virtio-net header (virtio 1.x, with `num_buffers`) in front of every frame.
pub const VNET_HDR_LEN: usize = 12;

/// Where the kernel's tun/tap driver is.
const TUN_PATH: &str = "/dev/net/tun";

/// Offload sets tried, best first, to learn what the tap accepts (`TUN_F_*` bits).
const OFFLOAD_PROBES: [u32; 3] = [libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6, libc::TUN_F_CSUM, 0];

/// A tap that cannot be opened or configured.
#[derive(Debug, Error)]
pub enum NetError {
    /// The tun/tap driver is not available.
    #[error("cannot open {path}: the tun/tap driver is missing (load the `tun` kernel module): {source}")]
    NoTunDevice {
        /// The path tried.
        path: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// The process may neither create the tap nor attach to it.
    #[error(
        "permission denied for tap {name:?}: creating a tap needs CAP_NET_ADMIN; without it, \
         attach to an existing tap owned by this user (ip tuntap add dev {name} mode tap user $USER)"
    )]
    PermissionDenied {
        /// The interface name asked for.
        name: String,
    },
    /// The interface name cannot name a tap.
    #[error("invalid tap name {name:?}: {reason}")]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The tap exists and another process has it open.
    #[error("tap {name:?} is busy: another process has it open")]
    Busy {
        /// The interface name asked for.
        name: String,
    },
    /// The name belongs to an interface that is not a single-queue tap.
    #[error("interface {name:?} exists and is not a single-queue tap")]
    NotATap {
        /// The interface name asked for.
        name: String,
    },
    /// Another system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The operation, with the interface it was for.
        op: String,
        /// What the kernel said.
        source: io::Error,
    },
}

/// An open tap interface. Reads and writes move one frame each, with a 12-byte
/// virtio-net header in front.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    offloads: u32,
}

/// Checks `name` the way the kernel will, so that a typo gets a clear error instead of `EINVAL`.
fn check_name(name: &str) -> Result<(), NetError> {
    let bad = |reason| Err(NetError::BadName { name: name.to_owned(), reason });
    if name.is_empty() {
        bad("it is empty")
    } else if name.len() >= libc::IFNAMSIZ {
        bad("longer than 15 bytes")
    } else if name == "." || name == ".." {
        bad("'.' and '..' are reserved")
    } else if name.contains(['/', ':', '\0']) {
        bad("it contains '/', ':' or a NUL byte")
    } else if name.chars().any(char::is_whitespace) {
        bad("it contains whitespace")
    } else {
        Ok(())
    }
}

/// An `ifreq` naming `name`, which [`check_name`] accepted (so it fits with its terminating NUL).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a byte array and a union of integers, arrays, `sockaddr`s
    // and a pointer); all zeroes is a valid value of each.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

impl Tap {
    /// Attaches to the tap `name`, creating it if it does not exist and the process may
    /// (`CAP_NET_ADMIN`). A `%d` in the name lets the kernel pick a free number; [`name`](Self::name)
    /// tells which. Offloads start off; see [`set_offload`](Self::set_offload).
    pub fn open(name: &str) -> Result<Tap, NetError> {
        Self::open_at(Path::new(TUN_PATH), name)
    }

    fn open_at(path: &Path, name: &str) -> Result<Tap, NetError> {
        check_name(name)?;
        // std opens with O_CLOEXEC.
        let file =
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|source| {
                match source.raw_os_error() {
                    Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => {
                        NetError::NoTunDevice { path: path.display().to_string(), source }
                    }
                    _ => NetError::Os { op: format!("opening {}", path.display()), source },
                }
            })?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes back one ifreq, which `req` is, on a tun file we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_owned();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => NetError::PermissionDenied { name },
                Some(libc::EBUSY) => NetError::Busy { name },
                Some(libc::EINVAL) => NetError::NotATap { name },
                _ => NetError::Os { op: format!("TUNSETIFF for tap {name:?}"), source },
            });
        }
        // The kernel fills in the name it used (it expands a `%d`).
        let name: Vec<u8> = req.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        let mut tap = Tap { file, name: String::from_utf8_lossy(&name).into_owned(), offloads: 0 };
        tap.int_ioctl("TUNSETVNETHDRSZ", libc::TUNSETVNETHDRSZ, VNET_HDR_LEN as libc::c_int)?;
        // virtio 1.x headers are little-endian whatever the host's byte order.
        tap.int_ioctl("TUNSETVNETLE", libc::TUNSETVNETLE, 1)?;
        tap.offloads = OFFLOAD_PROBES.into_iter().find(|&flags| tap.set_offload(flags).is_ok()).unwrap_or(0);
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// An ioctl that reads one `int` through a pointer.
    fn int_ioctl(&self, what: &str, request: libc::Ioctl, value: libc::c_int) -> Result<(), NetError> {
        // SAFETY: `request` is a tun ioctl that reads one int from the pointer, which points at
        // a live local int.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), request, &value) } < 0 {
            let source = io::Error::last_os_error();
            return Err(NetError::Os { op: format!("{what} on tap {:?}", self.name), source });
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offloads (`TUN_F_*` bits) this tap accepts in [`set_offload`](Self::set_offload).
    pub fn supported_offloads(&self) -> u32 {
        self.offloads
    }

    /// Sets which offloads (`TUN_F_*` bits) the frames the tap hands over may use: with
    /// `TUN_F_CSUM` they may carry partial checksums, with `TUN_F_TSO4`/`TSO6` they may be TCP
    /// segments larger than the MTU.
    pub fn set_offload(&self, flags: u32) -> Result<(), NetError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
            let source = io::Error::last_os_error();
            return Err(NetError::Os { op: format!("TUNSETOFFLOAD {flags:#x} on tap {:?}", self.name), source });
        }
        Ok(())
    }

    /// Reads one frame (header first) into `buf`; `WouldBlock` when there is none.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one whole frame (header first); `WouldBlock` when the tap cannot take it now.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{drop_net_admin, in_private_netns};
    use super::*;

    fn bad_name(name: &str) -> &'static str {
        match Tap::open(name) {
            Err(NetError::BadName { name: got, reason }) if got == name => reason,
            other => panic!("{name:?}: expected a bad name error, got {other:?}"),
        }
    }

    #[test]
    fn bad_names_are_refused_before_touching_the_system() {
        assert_eq!(bad_name(""), "it is empty");
        assert_eq!(bad_name("0123456789abcdef"), "longer than 15 bytes");
        assert_eq!(bad_name("a-very-long-tap-name"), "longer than 15 bytes");
        assert_eq!(bad_name("tap/0"), "it contains '/', ':' or a NUL byte");
        assert_eq!(bad_name("tap:0"), "it contains '/', ':' or a NUL byte");
        assert_eq!(bad_name("tap\0x"), "it contains '/', ':' or a NUL byte");
        assert_eq!(bad_name("tap 0"), "it contains whitespace");
        assert_eq!(bad_name("tap\t"), "it contains whitespace");
        assert_eq!(bad_name(".."), "'.' and '..' are reserved");
        let message = Tap::open("0123456789abcdef").unwrap_err().to_string();
        assert_eq!(message, "invalid tap name \"0123456789abcdef\": longer than 15 bytes");
    }

    #[test]
    fn a_missing_tun_device_says_so() {
        let err = Tap::open_at(Path::new("/nonexistent/net/tun"), "tap0").unwrap_err();
        assert!(matches!(&err, NetError::NoTunDevice { source, .. } if source.kind() == io::ErrorKind::NotFound));
        assert!(err.to_string().contains("load the `tun` kernel module"), "{err}");
    }

    #[test]
    fn opens_a_tap_with_vnet_headers_non_blocking_and_close_on_exec() {
        in_private_netns(|| {
            let tap = Tap::open("fifteen-bytes-x").unwrap();
            assert_eq!(tap.name(), "fifteen-bytes-x");
            let fd = tap.as_raw_fd();
            // SAFETY: F_GETFL and F_GETFD read flags of a descriptor we own.
            let (status, fd_flags) = unsafe { (libc::fcntl(fd, libc::F_GETFL), libc::fcntl(fd, libc::F_GETFD)) };
            assert_ne!(status & libc::O_NONBLOCK, 0);
            assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
            let mut hdr_len: libc::c_int = 0;
            // SAFETY: TUNGETVNETHDRSZ writes one int into the local.
            assert_eq!(unsafe { libc::ioctl(fd, libc::TUNGETVNETHDRSZ, &mut hdr_len) }, 0);
            assert_eq!(hdr_len, VNET_HDR_LEN as libc::c_int);
            let mut req = ifreq("");
            // SAFETY: TUNGETIFF writes one ifreq into the local.
            assert_eq!(unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) }, 0);
            // SAFETY: TUNGETIFF filled in the flags member.
            let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
            let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            assert_eq!(flags & wanted, wanted);
            // Every kernel since 2.6.27 takes checksum and TCP segmentation offload.
            let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
            assert_eq!(tap.supported_offloads(), all);
            tap.set_offload(all).unwrap();
            assert!(matches!(tap.set_offload(libc::TUN_F_TSO4), Err(NetError::Os { .. })), "TSO needs CSUM");
            let err = tap.read(&mut [0; 64]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        });
    }

    #[test]
    fn a_percent_d_name_gets_a_number() {
        in_private_netns(|| {
            let first = Tap::open("kvmkit%d").unwrap();
            let second = Tap::open("kvmkit%d").unwrap();
            assert_eq!((first.name(), second.name()), ("kvmkit0", "kvmkit1"));
        });
    }

    #[test]
    fn a_tap_in_use_is_busy() {
        in_private_netns(|| {
            let _first = Tap::open("busy0").unwrap();
            assert!(matches!(Tap::open("busy0"), Err(NetError::Busy { name }) if name == "busy0"));
        });
    }

    #[test]
    fn another_kind_of_interface_is_not_a_tap() {
        in_private_netns(|| {
            let err = Tap::open("lo").unwrap_err();
            assert!(matches!(&err, NetError::NotATap { name } if name == "lo"), "{err:?}");
        });
    }

    #[test]
    fn creating_a_tap_without_cap_net_admin_is_denied_with_advice() {
        in_private_netns(|| {
            drop_net_admin();
            let err = Tap::open("denied0").unwrap_err();
            assert!(matches!(&err, NetError::PermissionDenied { name } if name == "denied0"), "{err:?}");
            let message = err.to_string();
            assert!(message.contains("CAP_NET_ADMIN") && message.contains("existing tap owned by this user"));
        });
    }
}
