//! banger's guest binaries as images get them: the static-ELF check lives with the guest
//! side (`banger_guest::binaries`), where `banger system install` uses it too without
//! linking the daemon.

pub use banger_guest::binaries::*;
