//! banger-actors: the daemon's supervision tree.
//!
//! ```text
//! RootSupervisor                       restarts a failed child (see below); stops the
//!  │                                   daemon when a child fails too often
//!  ├─ StoreActor                       the redb store; restarted with the same open
//!  │                                   database handle, which the root keeps (every
//!  │                                   check-and-write is one transaction of `Store`)
//!  ├─ VmSupervisor                     restarted empty; it rebuilds its VmActors from
//!  │   └─ VmActor × N                  the store and from the host (pid + start time)
//!  ├─ DnsActor                         the `.vm` resolver; restarted with the same name
//!  │                                   table (kept by the root, written by VmSupervisor)
//!  ├─ HelperActor                      the only path to the privileged helper process;
//!  │                                   restarted with the same process (kept by the root)
//!  ├─ NetActor                         the bridge and one tap per VM, via HelperActor;
//!  │                                   restarted empty (taps live on the host)
//!  ├─ NatActor                         per-VM masquerade rules, via HelperActor; stateless
//!  ├─ UpdaterActor                     the update gate (no VM operation in flight);
//!  │                                   restarted empty (see `updater` for the rest)
//!  └─ PullActor                        image and kernel pulls and image promotes, coalesced
//!                                      by key; restarted empty (pulls in flight fail; their
//!                                      staging dirs are swept), with the same blob cache
//!                                      (kept by the root)
//! ```
//!
//! Restart policy (one-for-one, every supervisor overrides `handle_supervisor_evt`; ractor's
//! default would stop the supervisor when any child exits):
//! - Root: a child that fails (panics, returns `Err` from a handler) or stops on its own is
//!   restarted alone, at most [`root::MAX_RESTARTS`] times within [`root::RESTART_WINDOW`];
//!   past that the root stops with the reason, and bangerd exits non-zero so systemd (or
//!   the CLI's next call) starts it afresh from the store. During shutdown the root stops
//!   first and takes its children with it, so nothing is restarted then.
//! - VmSupervisor: one-for-one; a failed VmActor is restarted with its state rebuilt from
//!   the store and the host; a VmActor that stops normally (its VM was deleted) is not.
//!
//! Actors return `Err` from `handle` only when their own state is broken and a restart is
//! the cure; request failures travel back to the caller in the `RpcReplyPort` as the
//! actor's `XxxError`. Blocking work (store transactions, which fsync) never runs inside
//! `handle`: it runs on tokio's blocking pool and replies from there.

// VmError carries the driver's error (with its context) by value; requests are rare and
// not on a hot path, so boxing it would only add noise.
#![allow(clippy::result_large_err)]

pub mod image;
pub mod kernel_format;
pub mod net;
pub mod not_found;
pub mod pull;
pub mod root;
pub mod store;
pub mod updater;
pub mod vm;
pub mod vm_supervisor;
pub mod vmm;

pub use not_found::NotFound;
pub use root::{RootSupervisor, Tree, TreeError};
pub use store::{Store, StoreError, StoreInfo};
