//! Which VMM a new VM gets: the rule lives in `banger_host::choose` (shared with
//! `banger doctor`, which links no daemon code).

pub use banger_host::choose::*;
