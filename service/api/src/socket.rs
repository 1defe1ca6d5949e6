//! Where the daemon's socket is: part of the contract, so the CLI and the daemon agree
//! without sharing a config file.

use std::path::PathBuf;

/// The socket of the system service (`sudo banger system install`).
pub const SYSTEM_SOCKET: &str = "/run/banger/bangerd.sock";

/// The socket of a user daemon: `$XDG_RUNTIME_DIR/banger/bangerd.sock`, or
/// `/tmp/banger-<uid>/bangerd.sock` when `XDG_RUNTIME_DIR` is unset or relative.
/// `env` looks up an environment variable (injected so callers and tests agree); `uid` is
/// the caller's real uid.
pub fn user_socket(env: &dyn Fn(&str) -> Option<String>, uid: u32) -> PathBuf {
    match env("XDG_RUNTIME_DIR").filter(|d| d.starts_with('/')) {
        Some(dir) => PathBuf::from(dir).join("banger/bangerd.sock"),
        None => PathBuf::from(format!("/tmp/banger-{uid}/bangerd.sock")),
    }
}
