//! The closed set of things the helper does, and the checks every request passes before
//! the helper acts on it. Names must be banger's own (`bg-<id>` taps, the configured
//! bridge, the `banger` nft table), addresses must lie in banger's subnet, paths under
//! banger's state directories, pids must be banger's VMMs.

use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::is_banger_tap;

/// What the helper is told at start (on its command line, before any request): the
/// limits its requests are checked against. bangerd builds it from its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperConfig {
    /// The bridge (`banger0` by default).
    pub bridge: String,
    /// The bridge's address (the VMs' gateway) and the subnet's prefix length.
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// banger's state directories (data dir, runtime dir): the only paths it may touch
    /// besides the system paths in the landlock profile.
    pub state_dirs: Vec<PathBuf>,
    /// Where jails live (`<jail_base>/<exec name>/<vm-id>`, see [`crate::jail`]); under a
    /// state dir.
    pub jail_base: PathBuf,
    /// The uids a tap may be given to besides the VM uids of [`JailerConfig::vm_uids`]
    /// (the owner user, whose QEMU opens its taps).
    pub tap_uids: Vec<u32>,
    /// The VMM executables a signalled process must be running (absolute paths).
    pub vmm_binaries: Vec<PathBuf>,
    /// `resolvectl`, when systemd-resolved is there to route `.vm` (absolute path).
    #[serde(default)]
    pub resolvectl: Option<PathBuf>,
    /// `nft` (absolute path).
    pub nft: PathBuf,
    /// Firecracker's jailer, when VMs may use Firecracker: the helper's launcher spawns it
    /// (see [`crate::launcher`]). None: `spawn_jailer` is refused.
    #[serde(default)]
    pub jailer: Option<JailerConfig>,
}

/// What the launcher runs for `spawn_jailer`: everything on the jailer's command line
/// comes from here and the VM id, nothing from the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailerConfig {
    /// The jailer executable (absolute).
    pub jailer: PathBuf,
    /// The Firecracker executable the jailer copies into the jail (absolute).
    pub firecracker: PathBuf,
    /// bangerd's owner: the console is opened as this user, the VM's writable files are
    /// given back to it when the jail is cleaned, and the sockets exposed outside the jail
    /// are its.
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// The uids VMs run as, one of its own each (the jailer's `--uid`, `--gid` the same
    /// number). Never 0, never the owner's. banger's alone: a live process running as one
    /// of them is taken for a jailed Firecracker of banger's (`signal`).
    pub vm_uids: UidRange,
    /// The group of the sockets exposed outside the jail (mode 0660): the daemon's socket
    /// group when it exists, else the owner's, so whoever bangerd serves reaches the agent.
    pub socket_gid: u32,
}

/// `count` uids from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UidRange {
    pub first: u32,
    pub count: u32,
}

impl UidRange {
    pub fn contains(&self, uid: u32) -> bool {
        uid >= self.first && uid - self.first < self.count
    }

    /// The last uid of the range.
    pub fn last(&self) -> u32 {
        self.first.saturating_add(self.count.saturating_sub(1))
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last())
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;
    /// `FIRST-LAST` (inclusive). Refuses 0 and an empty or overflowing range.
    fn from_str(s: &str) -> Result<UidRange, String> {
        let bad = || format!("{s:?} is not a uid range like 2000000000-2000065535");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if last < first {
            return Err(bad());
        }
        if first == 0 {
            return Err(format!(
                "{s:?} includes uid 0: a VM's Firecracker never runs as root"
            ));
        }
        Ok(UidRange {
            first,
            count: last - first + 1,
        })
    }
}

impl JailerConfig {
    /// May a VM run as `uid`?
    pub fn vm_uid(&self, uid: u32) -> Result<(), Refusal> {
        if uid == 0 || uid == self.owner_uid || !self.vm_uids.contains(uid) {
            return Err(Refusal(format!(
                "uid {uid} is not a VM uid (allowed: {})",
                self.vm_uids
            )));
        }
        Ok(())
    }
}

impl HelperConfig {
    /// The subnet's network address.
    pub fn network(&self) -> Ipv4Addr {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(u32::from(self.gateway) & mask)
    }

    /// Check the config itself (bangerd does, before it spawns the helper).
    pub fn validate(&self) -> Result<(), Refusal> {
        if !(8..=30).contains(&self.prefix) {
            return Err(Refusal(format!(
                "subnet prefix /{} must be between /8 and /30",
                self.prefix
            )));
        }
        if !valid_ifname(&self.bridge) || is_banger_tap(&self.bridge) {
            return Err(Refusal(format!(
                "{:?} is not a usable bridge name",
                self.bridge
            )));
        }
        for p in self
            .state_dirs
            .iter()
            .chain([&self.jail_base, &self.nft])
            .chain(&self.vmm_binaries)
            .chain(self.resolvectl.as_ref())
            .chain(self.jailer.iter().flat_map(|j| [&j.jailer, &j.firecracker]))
        {
            if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
                return Err(Refusal(format!(
                    "{} must be an absolute path without `..`",
                    p.display()
                )));
            }
        }
        if self.state_dirs.iter().any(|d| d == Path::new("/")) {
            return Err(Refusal("a state directory cannot be /".into()));
        }
        if !self
            .state_dirs
            .iter()
            .any(|d| self.jail_base.starts_with(d))
        {
            return Err(Refusal(format!(
                "the jail base {} is not under a state directory",
                self.jail_base.display()
            )));
        }
        if let Some(j) = &self.jailer
            && (j.vm_uids.count == 0
                || j.vm_uids.contains(0)
                || j.vm_uids.contains(j.owner_uid)
                || j.vm_uids.first.checked_add(j.vm_uids.count - 1).is_none())
        {
            return Err(Refusal(format!(
                "the VM uids {} must be a non-empty range without 0 or the owner's uid {}",
                j.vm_uids, j.owner_uid
            )));
        }
        Ok(())
    }

    /// May a tap (or a signalled VMM) belong to `uid`: the owner's, or a VM uid.
    pub fn vm_user(&self, uid: u32) -> bool {
        self.tap_uids.contains(&uid)
            || self
                .jailer
                .as_ref()
                .is_some_and(|j| uid != 0 && j.vm_uids.contains(uid))
    }
}

/// A request to the helper. Closed: there is no "run this" variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Create the bridge if missing, give it the gateway address, bring it up.
    EnsureBridge,
    /// Create a persistent tap owned by `uid` (so the VMM opens it unprivileged).
    CreateTap { name: String, uid: u32 },
    /// Put a tap on the bridge and bring it up.
    AttachTap { name: String },
    /// Delete a tap (absent is fine).
    DeleteTap { name: String },
    /// Masquerade one VM's traffic leaving the subnet; enables IPv4 forwarding.
    NatAdd { vm: String, ip: Ipv4Addr },
    /// Remove one VM's NAT; disables forwarding again if banger enabled it and no VM is
    /// left with NAT.
    NatRemove { vm: String },
    /// Signal a VMM process of banger's (identified by pid and start time).
    Signal {
        pid: i32,
        start_time: u64,
        signal: i32,
    },
    /// Remove a VM's jail directory (and the cgroup the jailer made for it), after giving
    /// its writable disks back to the owner.
    CleanJail { vm: String },
    /// Make the jailed Firecracker's hybrid vsock socket reachable outside the jail, as
    /// [`SpawnJailer`](Request::SpawnJailer) does the API socket (see
    /// [`crate::launcher`]); sent once `PUT /vsock` has made it.
    ExposeVsock { vm: String },
    /// Start the jailer for a VM (its jail prepared by bangerd under `jail_base`), with
    /// stdout and stderr appended to `console`, a file under a state directory opened with
    /// the owner's permissions, and the VM's cgroup limited to `vcpu` CPUs and
    /// `memory_mib` of guest RAM (see [`crate::cgroup::Limits`]). Answered with
    /// [`Reply::Spawned`] once the API socket is reachable outside the jail. Firecracker
    /// runs as `uid` (one of [`JailerConfig::vm_uids`]), which gets the VM's writable
    /// files in the jail.
    SpawnJailer {
        vm: String,
        console: PathBuf,
        vcpu: u32,
        memory_mib: u32,
        uid: u32,
    },
    /// Point systemd-resolved at banger's resolver for `.vm` names on the bridge.
    ResolvedRoute { port: u16 },
    /// The helper's confinement as the kernel reports it (for `banger doctor`).
    Status,
    /// Set one VM's egress filter and isolation on its tap, for its lease `ip` (replacing
    /// what it had; see [`crate::egress`]).
    EgressSet {
        vm: String,
        ip: Ipv4Addr,
        filter: crate::egress::EgressFilter,
    },
    /// Let the VM reach addresses the bridge resolver answered, each for its record's TTL
    /// in seconds (the element's timeout; a repeated address gets the new TTL).
    EgressVouch {
        vm: String,
        addrs: Vec<(Ipv4Addr, u32)>,
    },
    /// Remove the VM's filter, isolation, set and counter (absent is fine); the table goes
    /// with the last VM's.
    EgressRemove { vm: String },
    /// The VM's dropped-packet counter, answered with [`Reply::Counter`].
    EgressCounter { vm: String },
    /// The flows the VM's filter refused lately, answered with [`Reply::RefusedFlows`].
    EgressRefused { vm: String },
}

impl Request {
    /// The request's name, for logs and errors.
    pub fn op(&self) -> &'static str {
        match self {
            Request::EnsureBridge => "ensure_bridge",
            Request::CreateTap { .. } => "create_tap",
            Request::AttachTap { .. } => "attach_tap",
            Request::DeleteTap { .. } => "delete_tap",
            Request::NatAdd { .. } => "nat_add",
            Request::NatRemove { .. } => "nat_remove",
            Request::Signal { .. } => "signal",
            Request::CleanJail { .. } => "clean_jail",
            Request::ExposeVsock { .. } => "expose_vsock",
            Request::SpawnJailer { .. } => "spawn_jailer",
            Request::ResolvedRoute { .. } => "resolved_route",
            Request::Status => "status",
            Request::EgressSet { .. } => "egress_set",
            Request::EgressVouch { .. } => "egress_vouch",
            Request::EgressRemove { .. } => "egress_remove",
            Request::EgressCounter { .. } => "egress_counter",
            Request::EgressRefused { .. } => "egress_refused",
        }
    }

    /// Check the request against the helper's limits; nothing is touched here except
    /// `/proc` reads for pid checks.
    pub fn validate(&self, cfg: &HelperConfig) -> Result<(), Refusal> {
        match self {
            Request::EnsureBridge | Request::Status => Ok(()),
            Request::CreateTap { name, uid } => {
                tap(name)?;
                if !cfg.vm_user(*uid) {
                    return Err(Refusal(format!(
                        "uid {uid} may not own a tap (allowed: {:?}{})",
                        cfg.tap_uids,
                        cfg.jailer
                            .as_ref()
                            .map(|j| format!(" and the VM uids {}", j.vm_uids))
                            .unwrap_or_default()
                    )));
                }
                Ok(())
            }
            Request::AttachTap { name } | Request::DeleteTap { name } => tap(name),
            Request::NatAdd { vm, ip } => {
                vm_id(vm)?;
                crate::egress::vm_address(cfg, *ip)
            }
            Request::EgressSet { vm, ip, filter } => {
                crate::egress::validate_set(cfg, vm, *ip, filter)
            }
            Request::EgressVouch { vm, addrs } => crate::egress::validate_vouch(vm, addrs),
            Request::EgressRemove { vm }
            | Request::EgressCounter { vm }
            | Request::EgressRefused { vm } => vm_id(vm),
            Request::NatRemove { vm } | Request::CleanJail { vm } => vm_id(vm),
            Request::ExposeVsock { vm } => {
                vm_id(vm)?;
                jailer(cfg).map(drop)
            }
            Request::SpawnJailer {
                vm,
                console,
                vcpu,
                memory_mib,
                uid,
            } => {
                vm_id(vm)?;
                // Firecracker's own bounds: 1 to 32 vCPUs; memory at least 1 MiB, and no
                // more than a host could have (1 TiB keeps the byte count in range).
                if !(1..=32).contains(vcpu) || !(1..=1 << 20).contains(memory_mib) {
                    return Err(Refusal(format!(
                        "{vcpu} vCPUs and {memory_mib} MiB are not limits of a VM"
                    )));
                }
                jailer(cfg)?.vm_uid(*uid)?;
                under_state_dir(cfg, console)
            }
            Request::Signal {
                pid,
                start_time,
                signal,
            } => {
                if nix::sys::signal::Signal::try_from(*signal).is_err() {
                    return Err(Refusal(format!("{signal} is not a signal")));
                }
                banger_vmm_process(cfg, *pid, *start_time)
            }
            Request::ResolvedRoute { port } => {
                if cfg.resolvectl.is_none() {
                    return Err(Refusal(
                        "systemd-resolved is not in use on this host; nothing to route".into(),
                    ));
                }
                if *port == 0 {
                    return Err(Refusal("port 0 is not a resolver port".into()));
                }
                Ok(())
            }
        }
    }
}

/// The jailer's config, or the refusal of a request that needs it.
fn jailer(cfg: &HelperConfig) -> Result<&JailerConfig, Refusal> {
    cfg.jailer.as_ref().ok_or_else(|| {
        Refusal(
            "bangerd found no Firecracker jailer when it started (`[firecracker] jailer` and `binary`): install Firecracker's release (jailer included) and restart bangerd, or use `--vmm qemu`".into(),
        )
    })
}

/// Why the helper refused a request (validation), as opposed to failing at it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{0}")]
pub struct Refusal(pub String);

/// The helper's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Done,
    /// The request was refused by validation: nothing was touched.
    Refused {
        reason: String,
    },
    /// The operation failed part way (its own clean-up ran).
    Failed {
        reason: String,
    },
    /// The worker handling the request died or hung; a fresh one takes the next request.
    WorkerDied {
        reason: String,
    },
    Status(Confinement),
    /// `spawn_jailer`: the jailer runs (it execs Firecracker in place, so this is
    /// Firecracker's pid), identified by pid and start time.
    Spawned {
        pid: i32,
        start_time: u64,
    },
    /// `egress_counter`: packets dropped (None: the VM has no counter).
    Counter {
        packets: Option<u64>,
    },
    /// `egress_refused`: the refused flows, the latest first (none: the VM has no filter).
    RefusedFlows {
        flows: Vec<crate::egress::RefusedFlow>,
    },
}

/// The confinement in force in the helper, read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    pub uid: u32,
    /// `Seccomp:` of /proc/self/status (2 = filter).
    pub seccomp_mode: u32,
    pub no_new_privs: bool,
    /// Effective and bounding capabilities, by name.
    pub caps_effective: Vec<String>,
    pub caps_bounding: Vec<String>,
    /// `fully enforced`, `partially enforced`, or `not enforced` (kernel without landlock).
    pub landlock: String,
}

fn tap(name: &str) -> Result<(), Refusal> {
    if is_banger_tap(name) {
        Ok(())
    } else {
        Err(Refusal(format!(
            "{name:?} is not a banger tap (bg-<vm id>)"
        )))
    }
}

/// VM ids are 12 lowercase hex digits.
pub fn vm_id(id: &str) -> Result<(), Refusal> {
    if id.len() == 12
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Refusal(format!("{id:?} is not a banger vm id")))
    }
}

/// An absolute path without `..` beneath one of the state directories (not one of them).
fn under_state_dir(cfg: &HelperConfig, path: &Path) -> Result<(), Refusal> {
    let clean = path.is_absolute() && !path.components().any(|c| c == Component::ParentDir);
    if clean
        && cfg
            .state_dirs
            .iter()
            .any(|d| path.starts_with(d) && path != d)
    {
        Ok(())
    } else {
        Err(Refusal(format!(
            "{} is not a path under banger's state directories",
            path.display()
        )))
    }
}

fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A pid is banger's when it is alive with that start time, runs as a VM user (the owner,
/// whose QEMU and unjailed Firecracker run as it, or a VM uid of the range), its command line names a path under a state directory
/// (its VM's sockets and disks live there), and, where the helper may read it (it keeps
/// no CAP_SYS_PTRACE, so only for its own uid), its executable is a configured VMM.
fn banger_vmm_process(cfg: &HelperConfig, pid: i32, start_time: u64) -> Result<(), Refusal> {
    let refuse = |why: &str| Err(Refusal(format!("pid {pid} {why}")));
    if pid <= 1 {
        return refuse("is not a VM process");
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return refuse("does not exist");
    };
    // The comm field may hold spaces and parentheses: fields restart after the last ')'.
    let started = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|s| s.parse::<u64>().ok());
    if started != Some(start_time) {
        return refuse("is not the process banger started (start time differs)");
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    match uid {
        // A VM uid of the range: a jailed Firecracker, whose command line is Firecracker's
        // own after the jailer's exec in the chroot (`/<exec name> --id <id> ...
        // --api-sock /api.sock`, no banger path) and whose executable the helper may not
        // read. The range is banger's alone (see `JailerConfig::vm_uids`), and the start
        // time was checked above.
        Some(uid)
            if uid != 0
                && cfg
                    .jailer
                    .as_ref()
                    .is_some_and(|j| j.vm_uids.contains(uid) && uid != j.owner_uid) =>
        {
            return Ok(());
        }
        Some(uid) if cfg.vm_user(uid) => {}
        // The jailer runs as root until it execs Firecracker as the VM user; a launch that
        // fails in between must still be stoppable. Only root can start a root process
        // whose command line is the configured jailer on banger's jail base.
        Some(0) if is_our_jailer(cfg, &args) => return Ok(()),
        Some(uid) => return refuse(&format!("runs as uid {uid}, not as a VM user")),
        None => return refuse("has no readable status"),
    }
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe"))
        && !cfg
            .vmm_binaries
            .iter()
            .any(|b| *b == exe || std::fs::canonicalize(b).is_ok_and(|c| c == exe))
    {
        return refuse(&format!("runs {}, not a VMM banger uses", exe.display()));
    }
    let mentions_state = args.iter().any(|arg| {
        cfg.state_dirs.iter().any(|d| {
            let d = d.to_string_lossy();
            arg.contains(d.as_ref())
        })
    });
    if !mentions_state {
        return refuse("is not one of banger's VMs (its command line names no banger path)");
    }
    Ok(())
}

/// `argv` is the configured jailer's, with banger's jail base as its chroot base.
fn is_our_jailer(cfg: &HelperConfig, argv: &[String]) -> bool {
    let Some(j) = &cfg.jailer else {
        return false;
    };
    let base = cfg.jail_base.display().to_string();
    argv.first().is_some_and(|a| Path::new(a) == j.jailer)
        && argv
            .windows(2)
            .any(|w| w[0] == "--chroot-base-dir" && w[1] == base)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn config(dir: &Path) -> HelperConfig {
        HelperConfig {
            bridge: "banger0".into(),
            gateway: Ipv4Addr::new(172, 30, 0, 1),
            prefix: 24,
            state_dirs: vec![dir.to_owned()],
            jail_base: dir.join("jail"),
            tap_uids: vec![1000],
            vmm_binaries: vec!["/bin/sleep".into()],
            resolvectl: None,
            nft: "/usr/sbin/nft".into(),
            jailer: None,
        }
    }

    #[test]
    fn taps_must_be_banger_names_and_owned_by_allowed_uids() {
        let cfg = config(Path::new("/var/lib/banger"));
        let ok = Request::CreateTap {
            name: "bg-0123456789ab".into(),
            uid: 1000,
        };
        assert_eq!(ok.validate(&cfg), Ok(()));
        for name in ["eth0", "banger0", "bg-../../x", "bg-0123456789abcd"] {
            let r = Request::DeleteTap { name: name.into() }.validate(&cfg);
            assert!(r.unwrap_err().0.contains("not a banger tap"), "{name}");
        }
        let r = Request::CreateTap {
            name: "bg-1".into(),
            uid: 0,
        }
        .validate(&cfg);
        assert!(r.unwrap_err().0.contains("may not own a tap"));
    }

    #[test]
    fn nat_only_for_vm_addresses_in_the_subnet() {
        let cfg = config(Path::new("/var/lib/banger"));
        let vm = "0123456789ab".to_string();
        let nat = |ip: [u8; 4]| Request::NatAdd {
            vm: vm.clone(),
            ip: ip.into(),
        };
        assert_eq!(nat([172, 30, 0, 5]).validate(&cfg), Ok(()));
        for bad in [
            [172, 30, 0, 1],
            [172, 30, 0, 0],
            [172, 30, 0, 255],
            [10, 0, 0, 5],
        ] {
            assert!(nat(bad).validate(&cfg).is_err(), "{bad:?}");
        }
        let r = Request::NatAdd {
            vm: "../../etc".into(),
            ip: [172, 30, 0, 5].into(),
        };
        assert!(
            r.validate(&cfg)
                .unwrap_err()
                .0
                .contains("not a banger vm id")
        );
    }

    fn start_time(pid: i32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        rest.split_whitespace().nth(19).unwrap().parse().unwrap()
    }

    #[test]
    fn signals_only_reach_banger_vmm_processes() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        // /bin/sh stands in for a VMM binary: it keeps running with any arguments.
        cfg.vmm_binaries = vec!["/bin/sh".into()];
        cfg.tap_uids = vec![nix::unistd::getuid().as_raw()];
        let spawn = |extra: Option<&Path>| {
            let mut c = std::process::Command::new("/bin/sh");
            c.args(["-c", "while :; do sleep 1; done"]);
            c.args(extra);
            c.spawn().unwrap()
        };
        let mut ours = spawn(Some(dir.path()));
        let mut foreign = spawn(None);
        let mut other_binary = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let sig = |pid: u32, start_time: u64| Request::Signal {
            pid: pid as i32,
            start_time,
            signal: 15,
        };
        let (p, f, o) = (ours.id(), foreign.id(), other_binary.id());
        assert_eq!(sig(p, start_time(p as i32)).validate(&cfg), Ok(()));
        let refused = |r: Request| r.validate(&cfg).unwrap_err().0;
        assert!(refused(sig(p, start_time(p as i32) + 1)).contains("start time"));
        assert!(refused(sig(f, start_time(f as i32))).contains("no banger path"));
        assert!(refused(sig(o, start_time(o as i32))).contains("not a VMM"));
        assert!(refused(sig(1, 0)).contains("not a VM process"));
        let mut other_uid = cfg.clone();
        other_uid.tap_uids = vec![4242];
        let r = sig(p, start_time(p as i32))
            .validate(&other_uid)
            .unwrap_err()
            .0;
        assert!(r.contains("not as a VM user"), "{r}");
        assert!(
            refused(Request::Signal {
                pid: p as i32,
                start_time: 0,
                signal: 999
            })
            .contains("not a signal")
        );
        for c in [&mut ours, &mut foreign, &mut other_binary] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    #[test]
    fn config_paths_must_be_absolute_and_jail_under_state() {
        let mut cfg = config(Path::new("/var/lib/banger"));
        assert_eq!(cfg.validate(), Ok(()));
        cfg.jail_base = "/srv/jail".into();
        assert!(cfg.validate().is_err());
        let mut cfg = config(Path::new("/var/lib/banger"));
        cfg.state_dirs.push("relative".into());
        assert!(cfg.validate().is_err());
        let mut cfg = config(Path::new("/var/lib/banger"));
        cfg.state_dirs = vec!["/".into()];
        cfg.jail_base = "/jail".into();
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn spawn_jailer_needs_a_jailer_a_vm_id_and_a_console_under_state() {
        let mut cfg = config(Path::new("/var/lib/banger"));
        let spawn = |vm: &str, console: &str| Request::SpawnJailer {
            vm: vm.into(),
            console: console.into(),
            vcpu: 2,
            memory_mib: 512,
            uid: 2_000_000_001,
        };
        let ok = spawn(
            "0123456789ab",
            "/var/lib/banger/vms/0123456789ab/console.log",
        );
        assert!(
            ok.validate(&cfg)
                .unwrap_err()
                .0
                .contains("found no Firecracker jailer")
        );
        cfg.jailer = Some(jailer_config());
        assert_eq!(ok.validate(&cfg), Ok(()));
        for bad in [
            "/etc/passwd",
            "/var/lib/banger",
            "/var/lib/banger/../../etc/passwd",
            "relative/console.log",
            "/var/lib/bangerx/console.log",
        ] {
            let r = spawn("0123456789ab", bad).validate(&cfg).unwrap_err().0;
            assert!(r.contains("not a path under"), "{bad}: {r}");
        }
        let r = spawn("x/../y", "/var/lib/banger/c")
            .validate(&cfg)
            .unwrap_err()
            .0;
        assert!(r.contains("not a banger vm id"), "{r}");
        for (vcpu, memory_mib) in [(0, 512), (33, 512), (1, 0)] {
            let r = Request::SpawnJailer {
                vm: "0123456789ab".into(),
                console: "/var/lib/banger/c".into(),
                vcpu,
                memory_mib,
                uid: 2_000_000_001,
            }
            .validate(&cfg)
            .unwrap_err()
            .0;
            assert!(r.contains("not limits of a VM"), "{r}");
        }
        // Firecracker runs as a VM uid of the range: never root, the owner, or outside.
        for uid in [0, 1000, 4242, 2_000_000_000 + 65536] {
            let r = Request::SpawnJailer {
                vm: "0123456789ab".into(),
                console: "/var/lib/banger/c".into(),
                vcpu: 1,
                memory_mib: 128,
                uid,
            }
            .validate(&cfg)
            .unwrap_err()
            .0;
            assert!(r.contains("is not a VM uid"), "{uid}: {r}");
        }
        // A range holding 0 or the owner is refused with the config.
        for (first, count) in [(0, 10), (995, 10), (1, 0)] {
            cfg.jailer.as_mut().unwrap().vm_uids = UidRange { first, count };
            let r = cfg.validate().unwrap_err().0;
            assert!(r.contains("non-empty range"), "{first}+{count}: {r}");
        }
    }

    fn jailer_config() -> JailerConfig {
        JailerConfig {
            jailer: "/usr/bin/jailer".into(),
            firecracker: "/usr/bin/firecracker".into(),
            owner_uid: 1000,
            owner_gid: 1000,
            vm_uids: UidRange {
                first: 2_000_000_000,
                count: 65536,
            },
            socket_gid: 1000,
        }
    }

    #[test]
    fn uid_ranges_parse_and_refuse_root() {
        let r: UidRange = "2000000000-2000065535".parse().unwrap();
        assert_eq!((r.first, r.count), (2_000_000_000, 65536));
        assert_eq!(r.to_string(), "2000000000-2000065535");
        assert!(r.contains(2_000_065_535) && !r.contains(2_000_065_536));
        assert!("0-100".parse::<UidRange>().unwrap_err().contains("uid 0"));
        for bad in ["", "5", "9-5", "a-b", "1-99999999999"] {
            assert!(bad.parse::<UidRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn taps_may_belong_to_vm_uids_of_the_range() {
        let mut cfg = config(Path::new("/var/lib/banger"));
        let tap = |uid| Request::CreateTap {
            name: "bg-0123456789ab".into(),
            uid,
        };
        assert!(tap(2_000_000_005).validate(&cfg).is_err(), "no jailer");
        cfg.jailer = Some(jailer_config());
        assert_eq!(tap(2_000_000_005).validate(&cfg), Ok(()));
        assert_eq!(tap(1000).validate(&cfg), Ok(()), "the owner's QEMU");
        assert!(tap(0).validate(&cfg).is_err());
        assert!(tap(1_999_999_999).validate(&cfg).is_err());
        let expose = Request::ExposeVsock { vm: "../x".into() };
        assert!(
            expose
                .validate(&cfg)
                .unwrap_err()
                .0
                .contains("not a banger vm id")
        );
    }

    #[test]
    fn a_root_process_is_ours_only_as_the_configured_jailer_on_our_jail_base() {
        let mut cfg = config(Path::new("/var/lib/banger"));
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let jailer = argv(&[
            "/usr/bin/jailer",
            "--id",
            "0123456789ab",
            "--chroot-base-dir",
            "/var/lib/banger/jail",
        ]);
        assert!(!is_our_jailer(&cfg, &jailer), "no jailer configured");
        cfg.jailer = Some(jailer_config());
        assert!(is_our_jailer(&cfg, &jailer));
        let mut other_base = jailer.clone();
        other_base[4] = "/srv/jailer".into();
        assert!(!is_our_jailer(&cfg, &other_base));
        let mut other_prog = jailer.clone();
        other_prog[0] = "/usr/bin/sleep".into();
        assert!(!is_our_jailer(&cfg, &other_prog));
    }
}
