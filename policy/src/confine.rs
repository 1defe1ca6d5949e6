//! The helper's confinement, applied before it reads its first request: fds and
//! environment cleaned, umask set, capabilities cut to the profile's, a landlock ruleset
//! over the profile's paths plus banger's state directories, and the seccomp filter. The
//! profiles are data: `profiles/helper.json` and `profiles/helper-seccomp.json`.
//!
//! Children of the helper (`nft`, `resolvectl`) inherit all of it; that is why the seccomp
//! profile is a deny-list of what no operation needs rather than an allow-list of the
//! helper's own calls (an allow-list would have to cover every child's calls too).

#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use caps::{CapSet, Capability};
use landlock::{
    ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    path_beneath_rules,
};
use serde::Deserialize;

use crate::request::Confinement;

/// The capability and landlock profile (`profiles/helper.json`).
pub const PROFILE: &str = include_str!("../profiles/helper.json");
/// The seccomp profiles, in seccompiler's JSON form (`profiles/helper-seccomp.json`):
/// `helper` and `launcher`.
pub const SECCOMP: &str = include_str!("../profiles/helper-seccomp.json");
/// The jailer launcher's capabilities (`profiles/launcher.json`); see [`crate::launcher`].
pub const LAUNCHER_PROFILE: &str = include_str!("../profiles/launcher.json");

/// The launcher's profile: capabilities only (landlock would forbid the jailer's mounts).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LauncherProfile {
    #[serde(default)]
    pub comment: String,
    pub capabilities: Vec<String>,
}

impl LauncherProfile {
    pub fn load() -> Result<LauncherProfile, ConfineError> {
        serde_json::from_str(LAUNCHER_PROFILE).map_err(ConfineError::Profile)
    }

    pub fn caps(&self) -> Result<Vec<Capability>, ConfineError> {
        parse_caps(&self.capabilities)
    }
}

fn parse_caps(names: &[String]) -> Result<Vec<Capability>, ConfineError> {
    names
        .iter()
        .map(|c| c.parse().map_err(|_| ConfineError::UnknownCap(c.clone())))
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default)]
    pub comment: String,
    pub capabilities: Vec<String>,
    pub landlock: LandlockPaths,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandlockPaths {
    pub read_exec: Vec<PathBuf>,
    pub read: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
}

/// Errors applying the confinement; the helper refuses to serve if any occurs.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("the helper profile is invalid")]
    Profile(#[source] serde_json::Error),
    #[error("unknown capability {0} in the helper profile")]
    UnknownCap(String),
    #[error("dropping capabilities")]
    Caps(#[source] caps::errors::CapsError),
    #[error("applying the landlock ruleset")]
    Landlock(#[source] landlock::RulesetError),
    #[error("compiling the seccomp profile")]
    SeccompCompile(#[source] seccompiler::Error),
    #[error("installing the seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
    #[error("closing inherited file descriptors")]
    Fds(#[source] std::io::Error),
}

static LANDLOCK: OnceLock<String> = OnceLock::new();

impl Profile {
    pub fn load() -> Result<Profile, ConfineError> {
        serde_json::from_str(PROFILE).map_err(ConfineError::Profile)
    }

    pub fn caps(&self) -> Result<Vec<Capability>, ConfineError> {
        parse_caps(&self.capabilities)
    }
}

/// Close every fd above stderr except those in `keep` (the helper's sockets).
pub fn close_inherited_fds(keep: &[i32]) -> Result<(), ConfineError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|k| u32::try_from(*k).ok())
        .filter(|k| *k >= 3)
        .collect();
    keep.sort_unstable();
    let mut first = 3u32;
    let mut ranges = Vec::new();
    for k in keep {
        if k > first {
            ranges.push((first, k - 1));
        }
        first = k + 1;
    }
    ranges.push((first, u32::MAX));
    for (first, last) in ranges {
        // SAFETY: close_range only closes descriptors; nothing in this single-threaded
        // process holds a descriptor in these ranges that it will use again.
        let rc = unsafe { nix::libc::close_range(first, last, 0) };
        if rc != 0 {
            return Err(ConfineError::Fds(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Keep only `keep` in every capability set, the bounding set included.
pub fn drop_caps(keep: &[Capability]) -> Result<(), ConfineError> {
    let keep: caps::CapsHashSet = keep.iter().copied().collect();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(ConfineError::Caps)?;
        }
    }
    caps::set(None, CapSet::Inheritable, &caps::CapsHashSet::new()).map_err(ConfineError::Caps)?;
    caps::set(None, CapSet::Effective, &keep).map_err(ConfineError::Caps)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(ConfineError::Caps)?;
    // Nothing ambient either.
    caps::clear(None, CapSet::Ambient).map_err(ConfineError::Caps)?;
    Ok(())
}

/// Apply landlock: read+exec, read, and read+write paths from the profile, plus full
/// access beneath `state_dirs`. Paths that do not exist are skipped.
pub fn landlock(profile: &Profile, state_dirs: &[PathBuf]) -> Result<String, ConfineError> {
    let abi = ABI::V5;
    let existing =
        |ps: &[PathBuf]| -> Vec<PathBuf> { ps.iter().filter(|p| p.exists()).cloned().collect() };
    let read = AccessFs::from_read(abi);
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(ConfineError::Landlock)?
        .create()
        .map_err(ConfineError::Landlock)?
        .add_rules(path_beneath_rules(
            existing(&profile.landlock.read_exec),
            read,
        ))
        .map_err(ConfineError::Landlock)?
        .add_rules(path_beneath_rules(
            existing(&profile.landlock.read),
            read & !AccessFs::Execute,
        ))
        .map_err(ConfineError::Landlock)?
        .add_rules(path_beneath_rules(
            existing(&profile.landlock.read_write),
            AccessFs::from_all(abi),
        ))
        .map_err(ConfineError::Landlock)?
        .add_rules(path_beneath_rules(
            existing(state_dirs),
            AccessFs::from_all(abi),
        ))
        .map_err(ConfineError::Landlock)?
        .restrict_self()
        .map_err(ConfineError::Landlock)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced",
        RulesetStatus::NotEnforced => "not enforced",
    }
    .to_owned())
}

/// Install the seccomp filter `name` (`helper` or `launcher`) from [`SECCOMP`].
pub fn seccomp(name: &str) -> Result<(), ConfineError> {
    let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| ConfineError::SeccompCompile(seccompiler::Error::Backend(e)))?;
    let mut filters = seccompiler::compile_from_json(SECCOMP.as_bytes(), arch)
        .map_err(ConfineError::SeccompCompile)?;
    let filter = filters
        .remove(name)
        .unwrap_or_else(|| panic!("the seccomp profile defines `{name}`"));
    seccompiler::apply_filter(&filter).map_err(ConfineError::Seccomp)
}

/// Everything, in order. After this the process serves requests only.
pub fn apply(state_dirs: &[PathBuf], keep_fds: &[i32]) -> Result<(), ConfineError> {
    close_inherited_fds(keep_fds)?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let profile = Profile::load()?;
    drop_caps(&profile.caps()?)?;
    let status = landlock(&profile, state_dirs)?;
    let _ = LANDLOCK.set(status);
    seccomp("helper")
}

/// The launcher's confinement (see [`crate::launcher`]): fds, umask, its capabilities in
/// every set, its seccomp filter. No landlock, on purpose: the jailer it starts must mount.
/// The umask is the conventional 022, which the jailer expects: the directories it makes
/// above the jail (`<base>/<exec name>/<id>`) must stay traversable for Firecracker's
/// user and bangerd; the jail itself it makes 0700 and hands to the VM user.
pub fn apply_launcher(keep_fd: i32) -> Result<(), ConfineError> {
    close_inherited_fds(&[keep_fd])?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    drop_caps(&LauncherProfile::load()?.caps()?)?;
    let _ = LANDLOCK.set("not applied (the jailer must mount)".into());
    seccomp("launcher")
}

/// The confinement in force, read back from the kernel (`/proc/self/status`).
pub fn report() -> Confinement {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let cap_names = |hex: String| -> Vec<String> {
        let bits = u64::from_str_radix(&hex, 16).unwrap_or(0);
        let mut names: Vec<String> = caps::all()
            .into_iter()
            .filter(|c| bits & c.bitmask() != 0)
            .map(|c| c.to_string())
            .collect();
        names.sort();
        names
    };
    Confinement {
        uid: field("Uid")
            .split_whitespace()
            .nth(1)
            .and_then(|u| u.parse().ok())
            .unwrap_or(u32::MAX),
        seccomp_mode: field("Seccomp").parse().unwrap_or(0),
        no_new_privs: field("NoNewPrivs") == "1",
        caps_effective: cap_names(field("CapEff")),
        caps_bounding: cap_names(field("CapBnd")),
        landlock: LANDLOCK
            .get()
            .cloned()
            .unwrap_or_else(|| "not applied".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_and_name_real_things() {
        let p = Profile::load().unwrap();
        assert!(p.caps().unwrap().contains(&Capability::CAP_NET_ADMIN));
        let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH).unwrap();
        let f = seccompiler::compile_from_json(SECCOMP.as_bytes(), arch).unwrap();
        assert!(f.contains_key("helper"));
        assert!(f.contains_key("launcher"));
        let l = LauncherProfile::load().unwrap().caps().unwrap();
        assert!(l.contains(&Capability::CAP_SYS_ADMIN));
        assert!(
            !l.contains(&Capability::CAP_NET_ADMIN),
            "no network from the launcher"
        );
    }
}
