//! TAP network devices (`/dev/net/tun`) with virtio-net headers, optionally attached to a
//! bridge. Modelled on Firecracker's `net/tap.rs`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Errors creating or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is not a valid interface name.
    #[error("tap name '{0}' is invalid (1 to 15 characters, no '/', ':' or white space)")]
    BadName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    /// An ioctl failed.
    #[error("tap '{name}': {what} failed: {source}")]
    Ioctl {
        /// Interface name.
        name: String,
        /// The operation.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_UP: i16 = 0x1;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const ARPHRD_ETHER: u16 = 1;

/// Size of the virtio-net header (`virtio_net_hdr_v1`) the tap prepends to every frame.
pub const VNET_HDR_LEN: usize = 12;

#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    // The ifreq union: flags (i16) or ifindex (i32) at its start.
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq::default();
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
    fn set_i16(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_i16(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_i32(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_i32(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

/// Checks an interface name as the kernel would.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// An open tap device.
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_with<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> std::io::Result<()> {
    // SAFETY: callers pass a request number matching the pointed-to type, which lives for the
    // duration of the call; the kernel writes at most size_of::<T>() bytes into it.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: the request takes its argument by value; no memory is shared with the kernel.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A socket for interface ioctls.
fn ctl_socket() -> std::io::Result<File> {
    // SAFETY: plain socket(2); the returned fd is checked and then owned by the File.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl Tap {
    /// Opens (creating it if absent) the tap `name` for a guest NIC with address `guest_mac`,
    /// non-blocking, with 12-byte virtio-net headers and no offloads, gives its host side the
    /// address `host_mac` derives, and brings it up.
    pub fn open(name: &str, guest_mac: [u8; 6]) -> Result<Tap, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::BadName(name.to_owned()));
        }
        let err = |what| move |source| TapError::Ioctl { name: name.to_owned(), what, source };
        let path = b"/dev/net/tun\0";
        // SAFETY: a NUL-terminated path; the returned fd is checked and owned by the File.
        let fd = unsafe {
            libc::open(path.as_ptr() as *const libc::c_char, libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC)
        };
        if fd < 0 {
            return Err(TapError::OpenTun(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq::new(name);
        req.set_i16(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        ioctl_with(fd, TUNSETIFF, &mut req).map_err(err("TUNSETIFF"))?;
        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl_with(fd, TUNSETVNETHDRSZ, &mut hdr_len).map_err(err("TUNSETVNETHDRSZ"))?;
        ioctl_val(fd, TUNSETOFFLOAD, 0).map_err(err("TUNSETOFFLOAD"))?;
        let tap = Tap { file, name: name.to_owned() };
        tap.set_mac(host_mac(guest_mac)).map_err(err("setting its MAC address"))?;
        tap.set_up().map_err(err("bringing the interface up"))?;
        Ok(tap)
    }

    fn set_mac(&self, mac: [u8; 6]) -> std::io::Result<()> {
        let sock = ctl_socket()?;
        let mut req = IfReq::new(&self.name);
        // A `struct sockaddr`: the family, then the address.
        req.data[..2].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        req.data[2..8].copy_from_slice(&mac);
        ioctl_with(sock.as_raw_fd(), SIOCSIFHWADDR, &mut req)
    }

    fn set_up(&self) -> std::io::Result<()> {
        let sock = ctl_socket()?;
        let mut req = IfReq::new(&self.name);
        ioctl_with(sock.as_raw_fd(), SIOCGIFFLAGS, &mut req)?;
        let flags = req.get_i16() | IFF_UP;
        req.set_i16(flags);
        ioctl_with(sock.as_raw_fd(), SIOCSIFFLAGS, &mut req)
    }

    /// Adds the tap to bridge `bridge`.
    pub fn attach_to_bridge(&self, bridge: &str) -> Result<(), TapError> {
        let err = |what| move |source| TapError::Ioctl { name: self.name.clone(), what, source };
        if !valid_ifname(bridge) {
            return Err(TapError::BadName(bridge.to_owned()));
        }
        let sock = ctl_socket().map_err(err("socket"))?;
        let mut idx = IfReq::new(&self.name);
        ioctl_with(sock.as_raw_fd(), SIOCGIFINDEX, &mut idx).map_err(err("SIOCGIFINDEX"))?;
        let mut req = IfReq::new(bridge);
        req.set_i32(idx.get_i32());
        match ioctl_with(sock.as_raw_fd(), SIOCBRADDIF, &mut req) {
            // Already a port of this bridge (a reused, persistent tap).
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            r => r.map_err(err("adding it to the bridge")),
        }
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another handle on the same tap queue (to inject frames from the VMM).
    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap { file: self.file.try_clone()?, name: self.name.clone() })
    }
}

/// The host side's address of the tap of a guest NIC with address `guest_mac`: the guest's
/// address with its first byte `0xfe` (`0xfa` for a guest whose own first byte is `0xfe`: the
/// two must differ, or the bridge drops the guest's frames as its own), as libvirt does. A
/// Linux bridge without a fixed address takes the lowest of its ports' addresses; a host NIC's
/// first byte is below `0xfa`, so adding or removing taps never changes the bridge's address,
/// and the ARP caches that know the host through it stay right. A locally administered unicast
/// address. (Two taps of one guest NIC, a migration between VMMs of one host, get the same
/// address, as with libvirt; they are never up on one bridge for long.)
fn host_mac(guest_mac: [u8; 6]) -> [u8; 6] {
    let mut m = guest_mac;
    m[0] = if guest_mac[0] == 0xfe { 0xfa } else { 0xfe };
    m
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(valid_ifname("tap0"));
        assert!(valid_ifname("vm1-eth0"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("a-name-that-is-too-long"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("a b"));
        assert!(matches!(Tap::open("bad/name", [0x52, 0x54, 0, 0, 0, 1]), Err(TapError::BadName(_))));
    }

    #[test]
    fn the_host_side_of_a_tap_has_a_high_locally_administered_address() {
        let m = host_mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(m, [0xfe, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(m[0] & 1, 0, "unicast");
        assert_eq!(m[0] & 2, 2, "locally administered");
        let fe_guest = [0xfe, 0x54, 0x00, 0x12, 0x34, 0x56];
        assert_eq!(host_mac(fe_guest), [0xfa, 0x54, 0x00, 0x12, 0x34, 0x56], "never the guest's own address");
    }
}
