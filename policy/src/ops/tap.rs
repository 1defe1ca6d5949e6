//! Tap devices: netlink cannot make one, so TUNSETIFF on /dev/net/tun, then
//! TUNSETOWNER (the VMM opens it without privilege) and TUNSETPERSIST (it outlives this fd).

#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

use nix::libc;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags of the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

// The kernel defines these as _IOW('T', n, int) even though TUNSETIFF takes an ifreq.
nix::ioctl_write_ptr!(tun_set_iff, b'T', 202, libc::c_int);
nix::ioctl_write_int!(tun_set_persist, b'T', 203);
nix::ioctl_write_int!(tun_set_owner, b'T', 204);

fn ifreq(name: &str) -> io::Result<IfReq> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        // Same flags Firecracker and QEMU open it with, so their TUNSETIFF matches.
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad tap name"));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    Ok(req)
}

/// Open the existing tap `name` through the tun device at `tun`, as a VMM does (the
/// Firecracker double, to fail where Firecracker would): refused unless the caller owns
/// the tap (or is privileged); EBUSY when another process holds it.
pub fn open(tun: &std::path::Path, name: &str) -> io::Result<std::fs::File> {
    let mut req = ifreq(name)?;
    let file = OpenOptions::new().read(true).write(true).open(tun)?;
    // SAFETY: `file` is an open tun device; `req` is a live, properly sized ifreq the
    // kernel reads (and writes the final name into) during the call only.
    unsafe { tun_set_iff(file.as_raw_fd(), (&raw mut req).cast::<libc::c_int>()) }
        .map_err(io::Error::from)?;
    Ok(file)
}

/// Create a persistent tap `name` owned by `uid`. EBUSY/EEXIST-style errors when a
/// different device has that name.
pub fn create(name: &str, uid: u32) -> io::Result<()> {
    let mut req = ifreq(name)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("open /dev/net/tun: {e}")))?;
    let fd = tun.as_raw_fd();
    // SAFETY: `fd` is an open /dev/net/tun; `req` is a live, properly sized ifreq the
    // kernel reads (and writes the final name into) during the call only.
    unsafe { tun_set_iff(fd, (&raw mut req).cast::<libc::c_int>()) }
        .map_err(|e| io::Error::other(format!("TUNSETIFF {name}: {e}")))?;
    // SAFETY: integer-argument ioctls on the tap fd just configured.
    unsafe { tun_set_owner(fd, libc::c_ulong::from(uid)) }
        .map_err(|e| io::Error::other(format!("TUNSETOWNER {name}: {e}")))?;
    // SAFETY: as above.
    unsafe { tun_set_persist(fd, 1) }
        .map_err(|e| io::Error::other(format!("TUNSETPERSIST {name}: {e}")))?;
    Ok(())
}
