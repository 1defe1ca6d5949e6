//! banger-api: the JSON-RPC 2.0 contract of `bangerd`.
//!
//! This crate holds only the wire types (serde) and the rpc traits; the daemon implements
//! the generated `*RpcServer` traits (feature `server`), the CLI calls the generated
//! `*RpcClient` traits (feature `client`). It contains no logic.
//!
//! Transport: the daemon listens on a Unix socket and speaks JSON-RPC 2.0 over WebSocket
//! (what the CLI uses; needed for subscriptions) and over plain HTTP `POST /` on the same
//! socket, so `curl --unix-socket /run/user/$UID/banger/bangerd.sock -d '{...}' http://x/`
//! works for scripts.
//!
//! Methods are namespaced with a dot: `daemon.ping`, `daemon.status`, `daemon.stop`.
//! Error codes are listed in [`codes`]; every daemon error carries one of them.

pub mod codes;
pub mod daemon;
pub mod egress;
pub mod image;
pub mod publish;
pub mod socket;
pub mod tools;
pub mod units;
pub mod update;
pub mod vm;

pub use daemon::*;
pub use egress::{Egress, EgressRule};
pub use image::*;
pub use publish::{PortProto, PortRef, PortSpec, PublishedPort};
pub use update::*;
pub use vm::*;
