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
