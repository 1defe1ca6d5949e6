//! `Identity`: a guest restored from another VM's saved state (a fork, a create from a
//! snapshot) is that VM's guest, name, machine id, ssh host key, address and all. Before
//! the host attaches its network it makes the guest its own machine:
//!
//! - the hostname (`sethostname`, `/etc/hostname`, and the old name's `/etc/hosts` lines
//!   renamed, so nothing resolves the old name to this guest);
//! - a fresh `/etc/machine-id` (and `/var/lib/dbus/machine-id` where it is a file of its
//!   own, not a link), from the RNG the host's `Restored` reseeded just before;
//! - a new ed25519 ssh host key, every old `ssh_host_*` key removed (ed25519 alone: RSA
//!   generation takes seconds on an emulated CPU), and sshd sent SIGHUP, which makes it
//!   re-execute and load the new key (its pid from `/run/sshd.pid`, written by Debian's
//!   sshd whether systemd or banger-init started it); open sessions keep running;
//! - with a network, the NIC moved to its own MAC and address (see
//!   [`crate::init::net::readdress`]: down first, so no neighbour entry or route of the old
//!   address survives) and `/etc/resolv.conf` rewritten.
//!
//! Each step that fails fails the request with what failed: the host then does not run
//! the clone (a guest answering for another's address or host key is worse than none).

use std::path::Path;

use crate::init::net::{self, NetConfig};
use crate::proto::{HostKey, IdentityNet, Response};

/// Take `name` and `net` (see the module docs).
pub fn take(
    name: &str,
    net_cfg: Option<&IdentityNet>,
    host_key: Option<&HostKey>,
) -> Result<Response, String> {
    let old = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    nix::unistd::sethostname(name).map_err(|e| format!("setting the hostname: {e}"))?;
    write("/etc/hostname", &format!("{name}\n"))?;
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    write("/etc/hosts", &hosts_renamed(&hosts, &old, name))?;

    let machine_id = new_machine_id()?;
    write_through("/etc/machine-id", &format!("{machine_id}\n"))?;
    let dbus = Path::new("/var/lib/dbus/machine-id");
    if dbus
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_file())
    {
        write("/var/lib/dbus/machine-id", &format!("{machine_id}\n"))?;
    }

    new_host_key(host_key)?;
    let host_keys = super::sys::host_keys();

    if let Some(n) = net_cfg {
        readdress(n)?;
    }
    Ok(Response::Identity {
        machine_id,
        host_keys,
    })
}

/// `hosts` with every name field equal to `old` replaced by `new` (and a `127.0.1.1 new`
/// line added when no line names `new`), comments and other lines as they were.
pub fn hosts_renamed(hosts: &str, old: &str, new: &str) -> String {
    let mut out = String::with_capacity(hosts.len() + new.len());
    let mut named = false;
    for line in hosts.lines() {
        let (body, comment) = match line.find('#') {
            Some(i) => line.split_at(i),
            None => (line, ""),
        };
        let mut fields = body.split_whitespace();
        match fields.next() {
            Some(addr) if !old.is_empty() && body.split_whitespace().skip(1).any(|h| h == old) => {
                let names: Vec<&str> = fields.map(|h| if h == old { new } else { h }).collect();
                named |= names.contains(&new);
                out.push_str(&format!("{addr}\t{}", names.join(" ")));
                if !comment.is_empty() {
                    out.push(' ');
                    out.push_str(comment);
                }
            }
            _ => {
                named |= body.split_whitespace().skip(1).any(|h| h == new);
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    if !named {
        out.push_str(&format!("127.0.1.1\t{new}\n"));
    }
    out
}

/// 32 lowercase hex digits from the kernel's RNG (`machine-id(5)`).
fn new_machine_id() -> Result<String, String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    // Version 4, as systemd makes them (`sd_id128_randomize`).
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn new_host_key(given: Option<&HostKey>) -> Result<(), String> {
    let dir = Path::new("/etc/ssh");
    if !dir.is_dir() {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading /etc/ssh: {e}"))?;
    let mut had = false;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("ssh_host_") && (n.ends_with("_key") || n.ends_with("_key.pub")) {
            had = true;
            std::fs::remove_file(e.path()).map_err(|err| format!("removing {n}: {err}"))?;
        }
    }
    if !had && !Path::new("/usr/sbin/sshd").exists() {
        return Ok(());
    }
    match given {
        Some(k) => write_key(Path::new(HOST_KEY), k)?,
        None => {
            let ok =
                crate::init::make_host_key().map_err(|e| format!("running ssh-keygen: {e}"))?;
            if !ok.success() {
                return Err(format!("ssh-keygen failed ({ok})"));
            }
        }
    }
    // sshd re-executes on SIGHUP and loads the new key; none running is fine.
    if let Some(pid) = std::fs::read_to_string("/run/sshd.pid")
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        );
    }
    Ok(())
}

/// Where sshd finds its ed25519 host key (and `.pub` beside it).
const HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key";

/// Write a given key pair: the private half 0600 (sshd refuses a readable one), the
/// public 0644; each a new file renamed into place.
fn write_key(private: &Path, k: &HostKey) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let public = private.with_extension("pub");
    for (path, text, mode) in [(private, &k.private, 0o600), (&*public, &k.public, 0o644)] {
        let tmp = path.with_extension("banger-tmp");
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("writing {}: {e}", path.display())
            })?;
    }
    Ok(())
}

fn readdress(n: &IdentityNet) -> Result<(), String> {
    let cidr = |s: &str| -> Result<(std::net::Ipv4Addr, u8), String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s}: expected <address>/<prefix>"))?;
        Ok((
            a.parse().map_err(|e| format!("{s}: {e}"))?,
            p.parse().map_err(|e| format!("{s}: {e}"))?,
        ))
    };
    let (address, prefix) = cidr(&n.address)?;
    let old = n.old_address.as_deref().map(cidr).transpose()?;
    let mac = net::parse_mac(&n.mac)?;
    let cfg = NetConfig {
        address,
        prefix,
        gateway: n.gateway,
        dns: n.dns,
    };
    let nic = net::first_nic().ok_or("the guest has no network link")?;
    net::readdress(&nic, old, &cfg, Some(mac)).map_err(|e| format!("{nic}: {e}"))?;
    if let Some(dns) = cfg.dns {
        write("/etc/resolv.conf", &net::resolv_conf(dns))?;
    }
    Ok(())
}

/// Replace `path` (a temporary file renamed over it).
fn write(path: &str, text: &str) -> Result<(), String> {
    let tmp = format!("{path}.banger-tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("writing {path}: {e}")
        })
}

/// Write `path` where it points (a machine-id may be a link into /run, which the link's
/// owner expects kept).
fn write_through(path: &str, text: &str) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))
        }
        _ => write(path, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_name_is_renamed_and_nothing_else_changes() {
        let hosts =
            "127.0.0.1\tlocalhost\n127.0.1.1 a a.local # the vm\n::1 localhost ip6-localhost\n";
        assert_eq!(
            hosts_renamed(hosts, "a", "a-1"),
            "127.0.0.1\tlocalhost\n127.0.1.1\ta-1 a.local # the vm\n::1 localhost ip6-localhost\n"
        );
        // No line with the old name: one for the new is added, once.
        let once = hosts_renamed("127.0.0.1 localhost\n", "gone", "b");
        assert_eq!(once, "127.0.0.1 localhost\n127.0.1.1\tb\n");
        assert_eq!(hosts_renamed(&once, "gone", "b"), once);
        // An old name that is a prefix of another is left alone.
        assert_eq!(
            hosts_renamed("127.0.1.1 ab\n", "a", "c"),
            "127.0.1.1 ab\n127.0.1.1\tc\n"
        );
    }

    #[test]
    fn a_given_host_key_is_written_private_and_public_with_their_modes() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let private = tmp.path().join("ssh_host_ed25519_key");
        std::fs::write(&private, "old").unwrap();
        let k = HostKey {
            private: "-----BEGIN OPENSSH PRIVATE KEY-----\n...\n".into(),
            public: "ssh-ed25519 AAAA\n".into(),
        };
        write_key(&private, &k).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(std::fs::read_to_string(&private).unwrap(), k.private);
        assert_eq!(mode(&private), 0o600);
        let public = tmp.path().join("ssh_host_ed25519_key.pub");
        assert_eq!(std::fs::read_to_string(&public).unwrap(), k.public);
        assert_eq!(mode(&public), 0o644);
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            2,
            "no temporary left"
        );
        // Its Debug never shows the private half.
        assert!(!format!("{k:?}").contains("PRIVATE"));
    }

    #[test]
    fn machine_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_machine_id().unwrap(), new_machine_id().unwrap());
        assert_eq!(a.len(), 32);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }
}
