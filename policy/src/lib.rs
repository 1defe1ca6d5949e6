//! banger-policy: the privileged helper.
//!
//! bangerd, started as root, re-executes itself as this helper (`bangerd __helper`) over a
//! socketpair, then drops to the owner user with no capabilities. The helper cleans its
//! process, keeps only the capabilities its operations need, applies landlock and seccomp
//! profiles kept as data in `profiles/`, and accepts only the closed, validated
//! [`Request`] enum; each request runs in a fresh forked worker. See [`helper`] for the
//! process, [`request`] for the checks, [`confine`] for the confinement, [`ops`] for what
//! each request does, [`launcher`] for the jailer's separately confined launcher.
//!
//! Names the helper will accept are banger's own; the rules live here so every crate that
//! makes names agrees with the one that checks them.

pub mod cgroup;
pub mod client;
pub mod confine;
pub mod egress;
pub mod helper;
pub mod jail;
pub mod launcher;
pub mod ops;
pub mod request;
pub mod wire;

pub use client::{Helper, HelperError};
pub use request::{Confinement, HelperConfig, JailerConfig, Refusal, Reply, Request, UidRange};

/// Prefix of every tap device banger creates (`bg-<vmid>`), within IFNAMSIZ.
pub const TAP_PREFIX: &str = "bg-";
/// The bridge banger owns.
pub const BRIDGE: &str = "banger0";
/// banger's nftables table.
pub const NFT_TABLE: &str = "banger";

/// Whether `name` is a tap name banger may create or delete: `bg-` then 1–12 of
/// `[a-z0-9]` (Linux interface names are at most 15 bytes).
pub fn is_banger_tap(name: &str) -> bool {
    name.strip_prefix(TAP_PREFIX).is_some_and(|id| {
        (1..=12).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names() {
        assert!(is_banger_tap("bg-abc123"));
        assert!(is_banger_tap("bg-0123456789ab"));
        assert!(
            !is_banger_tap("bg-0123456789abc"),
            "16 bytes exceeds IFNAMSIZ"
        );
        assert!(!is_banger_tap("eth0"));
        assert!(!is_banger_tap("bg-"));
        assert!(!is_banger_tap("bg-../x"));
        assert!(!is_banger_tap("bg-ABC"));
    }
}
