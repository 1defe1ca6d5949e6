//! banger-guest: what runs inside a VM, and the protocol the host speaks to it.
//!
//! - [`init`]: the pure parts of `banger-init` (PID 1 via `init=`): command-line parsing,
//!   disk discovery by filesystem label, module dependency order. The binary
//!   (`src/bin/banger-init.rs`) performs the mounts and execs the image's init.
//! - `banger-agent` and the versioned wire protocol come with the guest-agent issue.

pub mod init;

/// Version of the host↔agent protocol. The host refuses an agent with another major.
pub const PROTOCOL_VERSION: u32 = 1;
