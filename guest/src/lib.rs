//! banger-guest: what runs inside a VM, and the protocol the host speaks to it.
//!
//! Planned (issue "The guest side"): `banger-init` (PID 1 via `init=`: mounts, modules,
//! overlayfs root, network from the kernel command line, then the image's init) and
//! `banger-agent` (AF_VSOCK server: health, exec, ports, stats, files, tar, shutdown, host
//! keys), plus the versioned wire protocol shared with `banger-actors`.
//!
//! Only the protocol version lives here today, so the host and guest halves have one place
//! to agree on it.

/// Version of the host↔agent protocol. The host refuses an agent with another major.
pub const PROTOCOL_VERSION: u32 = 1;
