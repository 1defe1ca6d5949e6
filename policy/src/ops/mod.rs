//! The privileged operations, one per [`Request`] variant. Each runs only after
//! [`Request::validate`] accepted the request.

pub mod egress;
pub mod link;
pub mod nat;
pub mod tap;

use std::io;
use std::process::Command;

use crate::request::{HelperConfig, Reply, Request};

/// Run a validated request.
pub fn execute(cfg: &HelperConfig, req: &Request) -> Reply {
    let result = match req {
        Request::EnsureBridge => ensure_bridge(cfg),
        Request::CreateTap { name, uid } => tap::create(name, *uid),
        Request::AttachTap { name } => attach(cfg, name),
        Request::DeleteTap { name } => delete_link(name),
        Request::NatAdd { vm, ip } => nat(cfg).add(vm, *ip, cfg.network(), cfg.prefix),
        Request::NatRemove { vm } => nat(cfg).remove(vm),
        Request::Signal { pid, signal, .. } => signal_vm(*pid, *signal),
        Request::CleanJail { vm } => clean_jail(cfg, vm),
        // Forwarded to the launcher by the helper; never run in a helper worker.
        Request::SpawnJailer { .. } | Request::ExposeVsock { .. } => {
            Err(io::Error::other(format!("{} is the launcher's", req.op())))
        }
        Request::ResolvedRoute { port } => resolved_route(cfg, *port),
        Request::Status => return Reply::Status(crate::confine::report()),
        Request::EgressSet { vm, ip, filter } => egress(cfg).set(vm, *ip, filter),
        Request::EgressVouch { vm, addrs } => egress(cfg).vouch(vm, addrs),
        Request::EgressRemove { vm } => egress(cfg).remove(vm),
        Request::EgressCounter { vm } => {
            return match egress(cfg).counter(vm) {
                Ok(packets) => Reply::Counter { packets },
                Err(e) => Reply::Failed {
                    reason: e.to_string(),
                },
            };
        }
        Request::EgressRefused { vm } => {
            return match egress(cfg).refused(vm) {
                Ok(flows) => Reply::RefusedFlows { flows },
                Err(e) => Reply::Failed {
                    reason: e.to_string(),
                },
            };
        }
    };
    match result {
        Ok(()) => Reply::Done,
        Err(e) => Reply::Failed {
            reason: e.to_string(),
        },
    }
}

fn nat(cfg: &HelperConfig) -> nat::Nat<'_> {
    nat::Nat {
        nft: &cfg.nft,
        marker: cfg.state_dirs[0].join("nat-enabled-forwarding"),
    }
}

fn egress(cfg: &HelperConfig) -> egress::Egress<'_> {
    egress::Egress {
        nft: &cfg.nft,
        gateway: cfg.gateway,
        network: cfg.network(),
        prefix: cfg.prefix,
    }
}

fn ensure_bridge(cfg: &HelperConfig) -> io::Result<()> {
    let mut rtnl = link::Rtnl::connect()?;
    if link::index(&cfg.bridge).is_none() {
        match rtnl.create_bridge(&cfg.bridge) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }
    let index = link::index(&cfg.bridge)
        .ok_or_else(|| io::Error::other(format!("bridge {} vanished", cfg.bridge)))?;
    match rtnl.add_address(index, cfg.gateway, cfg.prefix) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        other => other?,
    }
    rtnl.set_up(index)
}

fn attach(cfg: &HelperConfig, name: &str) -> io::Result<()> {
    let tap = link::index(name).ok_or_else(|| io::Error::other(format!("no tap {name}")))?;
    let bridge = link::index(&cfg.bridge)
        .ok_or_else(|| io::Error::other(format!("no bridge {}: ensure it first", cfg.bridge)))?;
    let mut rtnl = link::Rtnl::connect()?;
    rtnl.set_master(tap, bridge)?;
    rtnl.set_up(tap)
}

fn delete_link(name: &str) -> io::Result<()> {
    match link::index(name) {
        None => Ok(()),
        Some(i) => match link::Rtnl::connect()?.delete(i) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    }
}

fn signal_vm(pid: i32, signal: i32) -> io::Result<()> {
    let signal = nix::sys::signal::Signal::try_from(signal).map_err(io::Error::other)?;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(io::Error::other(format!("kill {pid}: {e}"))),
    }
}

fn clean_jail(cfg: &HelperConfig, vm: &str) -> io::Result<()> {
    for dir in crate::jail::instance_dirs(&cfg.jail_base, vm) {
        remove_jail_dir(&dir)?;
    }
    Ok(())
}

/// Remove a jail instance directory (absent is fine; a non-directory is left alone).
pub fn remove_jail_dir(dir: &std::path::Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if !m.is_dir() => Err(io::Error::other(format!(
            "{} is not a directory; left alone",
            dir.display()
        ))),
        // remove_dir_all does not follow symlinks inside the tree.
        Ok(_) => std::fs::remove_dir_all(dir),
    }
}

fn resolved_route(cfg: &HelperConfig, port: u16) -> io::Result<()> {
    let resolvectl = cfg
        .resolvectl
        .as_ref()
        .ok_or_else(|| io::Error::other("no resolvectl"))?;
    let server = format!("{}:{port}", cfg.gateway);
    for args in [
        vec!["dns", cfg.bridge.as_str(), server.as_str()],
        vec!["domain", cfg.bridge.as_str(), "~vm"],
    ] {
        let out = Command::new(resolvectl)
            .args(&args)
            .env_clear()
            .output()
            .map_err(|e| io::Error::other(format!("run {}: {e}", resolvectl.display())))?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "resolvectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}
