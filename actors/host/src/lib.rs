//! banger-host: what the daemon and the CLI both need to know about this host, without the
//! supervision tree (so `banger doctor` says what `vm create` will do, from the same code,
//! and the CLI links none of the daemon).
//!
//! - [`choose`]: which VMM a new VM gets (`default_vmm = "auto"`), a pure rule over a
//!   [`choose::HostProbe`], with the real probe and a fake side by side.

pub mod choose;
