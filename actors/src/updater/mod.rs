//! The daemon's side of `banger update`: the update gate ([`actor::UpdaterActor`]).
//!
//! The update engine itself (release manifest, signature check, staging, atomic swap,
//! restart, post-restart check, rollback) is the `banger-update` crate
//! (`client/update/`), which the CLI runs: the swap must outlive the daemon's restart.

pub mod actor;
