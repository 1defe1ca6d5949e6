//! banger-guest: what runs inside a VM, and the protocol the host speaks to it.
//!
//! - [`init`]: the pure parts of `banger-init` (PID 1 via `init=`): command-line parsing,
//!   disk discovery by filesystem label, module dependency order. The binary
//!   (`src/bin/banger-init.rs`) performs the mounts and execs the image's init.
//! - [`proto`]: the versioned host↔agent wire protocol (framing, handshake, messages).
//! - [`agent`]: the agent's request handling (`src/bin/banger-agent.rs` serves it on
//!   vsock under Firecracker, on a virtio-serial port through [`mux`] under QEMU).
//! - [`mux`]: the agent channel over QEMU's virtio-serial port (yamux), both ends: the
//!   agent's and the host proxy's that keeps the hybrid-vsock contract.

pub mod agent;
/// The check that guest binaries are static (for the daemon's pulls and `system install`).
#[cfg(feature = "host")]
pub mod binaries;
#[cfg(feature = "host")]
pub mod host;
pub mod init;
#[cfg(feature = "mux")]
pub mod mux;
pub mod proto;

pub use proto::PROTOCOL_VERSION;

/// Revision of the guest side (banger-init + banger-agent) as the host needs it. Bumped
/// when a host needs something an older guest side does not do that the wire protocol's
/// version cannot say — 2: the agent listens on QEMU's virtio-serial port (revision 1,
/// which carries no mark, listened on vsock only, and QEMU VMs never heard it).
///
/// Each guest binary carries [`REVISION_MARK`], so a host reads the revision of the binaries
/// inside an image without running them, and an image with an older revision's binaries
/// gets the host's own before a VM starts from it — never the other way round
/// (`banger_actors::image::refresh_guest_side`).
pub const GUEST_REVISION: u32 = 2;

/// `\0banger-guest-revision=<GUEST_REVISION>\0`, kept in each guest binary by its `main`.
pub static REVISION_MARK: &str = "\0banger-guest-revision=2\0";

/// The revision marked in a guest binary's bytes ([`REVISION_MARK`]); 1 when it has no
/// mark (the guest side from before marks).
pub fn revision_of(binary: &[u8]) -> u32 {
    const PREFIX: &[u8] = b"\0banger-guest-revision=";
    binary
        .windows(PREFIX.len())
        .enumerate()
        .filter(|(_, w)| *w == PREFIX)
        .filter_map(|(at, _)| {
            let rest = &binary[at + PREFIX.len()..];
            let end = rest.iter().position(|&b| b == 0)?;
            std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
        })
        .max()
        .unwrap_or(1)
}

#[cfg(test)]
mod revision_tests {
    use super::*;

    #[test]
    fn the_mark_says_this_revision_and_is_read_back_from_binary_bytes() {
        assert_eq!(
            REVISION_MARK,
            format!("\0banger-guest-revision={GUEST_REVISION}\0")
        );
        let mut binary = b"\x7fELF some code".to_vec();
        binary.extend_from_slice(REVISION_MARK.as_bytes());
        binary.extend_from_slice(b"more");
        assert_eq!(revision_of(&binary), GUEST_REVISION);
        assert_eq!(revision_of(b"\x7fELF an old agent"), 1, "no mark");
        assert_eq!(
            revision_of(b"\0banger-guest-revision=x\0"),
            1,
            "a mark that is not a number"
        );
    }
}
