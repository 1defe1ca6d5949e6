//! RootSupervisor: starts the tree, restarts failed children, and hands out [`Tree`], the
//! handle the RPC layer uses to reach the actors.
//!
//! - `supervisor.rs`: [`RootSupervisor`], its children and their restart budget.
//! - `tree.rs`: [`Tree`] and [`TreeError`]: the tree's start, its store, VM and update-gate
//!   calls.
//! - `images.rs`: the image and kernel calls (pulls through the PullActor, the store-side
//!   register/import/delete rules).
//! - `auto_pull.rs`: what `vm create` pulls before the VM is made.
//! - `warm.rs`: warm snapshots (`image warm`, `image warm list|rm`, `auto_warm`).
//! - `config.rs`: [`VmConfig`], what the tree is started with.

mod auto_pull;
mod config;
mod images;
mod supervisor;
mod tree;
mod warm;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod race_tests;

pub use config::VmConfig;
pub use supervisor::{MAX_RESTARTS, RESTART_WINDOW, RootArgs, RootMsg, RootState, RootSupervisor};
pub use tree::{Tree, TreeError};
