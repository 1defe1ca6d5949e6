//! Started as root, bangerd forks its privileged helper (banger-policy) and then drops to
//! the owner user with no capabilities at all; everything privileged afterwards goes
//! through the helper. Started as anyone else, it has no helper, and operations that
//! need one (a VM's tap, NAT) fail with an error that says how to get one.
//!
//! The owner is `owner` in the config (a name or uid), else the user that ran `sudo`
//! (`SUDO_UID`/`SUDO_GID`), else root itself, still with every capability dropped (from
//! the bounding set too, so programs it runs cannot regain them). A normal owner's
//! bounding set keeps CAP_SETUID, CAP_SETGID, CAP_DAC_OVERRIDE and CAP_SYS_ADMIN only
//! (no other set holds them), for the setuid `newuidmap` and `newgidmap` of unprivileged
//! image builds (mmdebstrap's unshare mode); see [`drop_to`].

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_policy::{Helper, HelperConfig};
use nix::unistd::{Gid, Uid, User};

use crate::config::Config;
use crate::paths::Paths;

/// Errors of the privilege split.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("owner {0:?} is neither a user on this host nor a uid")]
    UnknownOwner(String),
    #[error("cannot find this executable to start the helper")]
    Exe(#[source] std::io::Error),
    #[error(transparent)]
    Helper(#[from] banger_policy::HelperError),
    #[error("the helper's configuration is invalid: {0}")]
    HelperConfig(banger_policy::Refusal),
    #[error("cannot hand {path} to the owner")]
    Chown {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dropping privileges: {0}")]
    Drop(String),
}

/// Who bangerd becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: Uid,
    pub gid: Gid,
}

/// Resolve the owner (see the module docs).
pub fn owner(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Owner, PrivilegeError> {
    if let Some(o) = &config.owner {
        if let Ok(Some(u)) = User::from_name(o) {
            return Ok(Owner {
                uid: u.uid,
                gid: u.gid,
            });
        }
        let uid: u32 = o
            .parse()
            .map_err(|_| PrivilegeError::UnknownOwner(o.clone()))?;
        let gid = User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.gid)
            .unwrap_or(Gid::from_raw(uid));
        return Ok(Owner {
            uid: Uid::from_raw(uid),
            gid,
        });
    }
    let sudo = |k: &str| env(k).and_then(|v| v.parse::<u32>().ok());
    if let (Some(uid), Some(gid)) = (sudo("SUDO_UID"), sudo("SUDO_GID")) {
        return Ok(Owner {
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
        });
    }
    Ok(Owner {
        uid: Uid::from_raw(0),
        gid: Gid::from_raw(0),
    })
}

/// An executable by name on PATH (or as given, when it is a path).
pub fn find_program(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The helper's limits, from the config and paths.
pub fn helper_config(config: &Config, paths: &Paths, owner: Owner) -> HelperConfig {
    let subnet: banger_actors::net::lease::Subnet = config
        .network
        .subnet
        .parse()
        .expect("validated when the config was loaded");
    let tap_uids = vec![owner.uid.as_raw()];
    let vmm_binaries = [&config.firecracker.binary, &config.qemu.binary]
        .into_iter()
        .filter_map(|b| find_program(b))
        .collect();
    let resolvectl = Path::new("/run/systemd/resolve")
        .exists()
        .then(|| find_program(Path::new("resolvectl")))
        .flatten();
    // The launcher runs the jailer as root; Firecracker then runs as the VM's own uid, and
    // the launcher exposes its sockets to the owner and the socket group.
    let jailer = match (
        find_program(&config.firecracker.jailer),
        find_program(&config.firecracker.binary),
    ) {
        (Some(jailer), Some(firecracker)) => Some(banger_policy::JailerConfig {
            jailer,
            firecracker,
            owner_uid: owner.uid.as_raw(),
            owner_gid: owner.gid.as_raw(),
            vm_uids: config.firecracker.vm_uids(),
            socket_gid: nix::unistd::Group::from_name(&config.socket_group)
                .ok()
                .flatten()
                .map_or(owner.gid.as_raw(), |g| g.gid.as_raw()),
        }),
        _ => None,
    };
    let mut state_dirs = vec![paths.data_dir.clone()];
    if let Some(run) = paths.socket.parent() {
        state_dirs.push(run.to_owned());
    }
    HelperConfig {
        bridge: config.network.bridge.clone(),
        gateway: subnet.gateway(),
        prefix: subnet.prefix,
        state_dirs,
        jail_base: paths.data_dir.join("jail"),
        tap_uids,
        vmm_binaries,
        resolvectl,
        nft: find_program(Path::new("nft")).unwrap_or_else(|| "/usr/sbin/nft".into()),
        jailer,
    }
}

/// Start the helper: this executable, `__helper`, the config.
pub fn start_helper(cfg: &HelperConfig) -> Result<Helper, PrivilegeError> {
    cfg.validate().map_err(PrivilegeError::HelperConfig)?;
    let exe = std::env::current_exe().map_err(PrivilegeError::Exe)?;
    Ok(Helper::spawn(Command::new(exe), cfg)?)
}

/// Give banger's directories to the owner, then become the owner with no capabilities.
/// Must run before any thread is started.
pub fn drop_to(owner: Owner, paths: &Paths) -> Result<(), PrivilegeError> {
    let dirs = [
        Some(paths.data_dir.as_path()),
        Some(paths.log_dir.as_path()),
        Some(paths.cache_dir.as_path()),
        paths.socket.parent(),
    ];
    // The bounding set first, while CAP_SETPCAP is still held. A normal owner keeps
    // CAP_SETUID, CAP_SETGID, CAP_DAC_OVERRIDE and CAP_SYS_ADMIN there, held by bangerd in
    // no other set (so it has no capability itself): they are what the setuid-root
    // `newuidmap`/`newgidmap` need (measured: without any one of them the map write is
    // refused) to map the owner's subordinate ids for `image build` (mmdebstrap's unshare
    // mode, see banger_actors::pull::build). A setuid program bangerd runs can then gain
    // no more than it could in any login session of the owner. Root keeps nothing: a root
    // bangerd refuses builds.
    let keep = |cap: caps::Capability| {
        use caps::Capability::*;
        !owner.uid.is_root()
            && matches!(
                cap,
                CAP_SETUID | CAP_SETGID | CAP_DAC_OVERRIDE | CAP_SYS_ADMIN
            )
    };
    for cap in caps::all() {
        if !keep(cap) && caps::has_cap(None, caps::CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, caps::CapSet::Bounding, cap)
                .map_err(|e| PrivilegeError::Drop(format!("bounding set: {e}")))?;
        }
    }
    if !owner.uid.is_root() {
        for dir in dirs.into_iter().flatten() {
            chown(dir, Some(owner.uid.as_raw()), Some(owner.gid.as_raw())).map_err(|source| {
                PrivilegeError::Chown {
                    path: dir.to_owned(),
                    source,
                }
            })?;
        }
        let log = paths.log_file();
        if log.exists() {
            let _ = chown(&log, Some(owner.uid.as_raw()), Some(owner.gid.as_raw()));
        }
        let err = |what: &str, e: nix::Error| PrivilegeError::Drop(format!("{what}: {e}"));
        let groups = User::from_uid(owner.uid)
            .ok()
            .flatten()
            .and_then(|u| {
                let name = std::ffi::CString::new(u.name).ok()?;
                nix::unistd::getgrouplist(&name, owner.gid).ok()
            })
            .unwrap_or_else(|| vec![owner.gid]);
        nix::unistd::setgroups(&groups).map_err(|e| err("setgroups", e))?;
        nix::unistd::setresgid(owner.gid, owner.gid, owner.gid).map_err(|e| err("setgid", e))?;
        nix::unistd::setresuid(owner.uid, owner.uid, owner.uid).map_err(|e| err("setuid", e))?;
    }
    // Whatever the uid: no capabilities, now or after any exec.
    let none = caps::CapsHashSet::new();
    for set in [
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::set(None, set, &none).map_err(|e| PrivilegeError::Drop(format!("{set:?}: {e}")))?;
    }
    Ok(())
}

/// Bind the guests' resolver on the bridge address, port 53 (only root may), with
/// IP_FREEBIND: the bridge itself is made later, by the first VM that needs a network, so a
/// daemon that never runs a networked VM changes nothing on the host. A failure is logged
/// to stderr and the daemon goes on (guests then have no resolver; doctor says so).
pub fn bind_guest_dns(cfg: &HelperConfig) -> Option<banger_actors::net::dns::GuestDns> {
    #![allow(clippy::print_stderr)]
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
    };
    let bound = (|| -> nix::Result<std::net::UdpSocket> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::IpFreebind, &true)?;
        let addr = SockaddrIn::from(std::net::SocketAddrV4::new(cfg.gateway, 53));
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
        Ok(std::net::UdpSocket::from(fd))
    })();
    let udp = match bound {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "bangerd: cannot listen on {}:53 for guests' DNS: {e}",
                cfg.gateway
            );
            return None;
        }
    };
    // The same address over TCP, for answers that do not fit a UDP datagram.
    let tcp = (|| -> nix::Result<std::net::TcpListener> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::IpFreebind, &true)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        let addr = SockaddrIn::from(std::net::SocketAddrV4::new(cfg.gateway, 53));
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(128)?)?;
        Ok(std::net::TcpListener::from(fd))
    })()
    .map_err(|e| {
        eprintln!(
            "bangerd: cannot listen on {}:53/tcp for guests' DNS: {e}",
            cfg.gateway
        );
    })
    .ok();
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let upstreams = banger_actors::net::dns::upstreams(&resolv)
        .into_iter()
        .filter(|u| u.ip() != std::net::IpAddr::V4(cfg.gateway))
        .collect();
    Some(banger_actors::net::dns::GuestDns {
        socket: std::sync::Arc::new(udp),
        tcp: tcp.map(std::sync::Arc::new),
        upstreams,
    })
}
