//! Pure helpers of banger-init, unit-tested on the host.

pub mod firstboot;
pub mod net;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Read a `key=value` parameter of the kernel command line.
/// Make `/etc/ssh/ssh_host_ed25519_key` with `ssh-keygen`: ed25519 only, since RSA key
/// generation takes seconds on a slow (emulated) CPU. Used by banger-init for an image
/// without a host key and by the agent for a clone's new one. Whether it worked.
pub fn make_host_key() -> std::io::Result<std::process::ExitStatus> {
    std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            "/etc/ssh/ssh_host_ed25519_key",
        ])
        .stdin(std::process::Stdio::null())
        .status()
}

pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The ext2/3/4 volume label of a block device or image, if it has one.
pub fn ext4_label(dev: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(dev).ok()?;
    let mut sb = [0u8; 256];
    f.seek(SeekFrom::Start(1024)).ok()?;
    f.read_exact(&mut sb).ok()?;
    // s_magic at offset 56 of the superblock, s_volume_name (16 bytes) at 120.
    if sb[56..58] != [0x53, 0xEF] {
        return None;
    }
    let name = &sb[120..136];
    let end = name.iter().position(|b| *b == 0).unwrap_or(16);
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Resolve `LABEL=x` (or a plain device path) among the block devices under `dev_dir`.
pub fn find_device(spec: &str, dev_dir: &Path, candidates: &[String]) -> Option<PathBuf> {
    match spec.strip_prefix("LABEL=") {
        Some(label) => candidates
            .iter()
            .map(|c| dev_dir.join(c))
            .find(|p| ext4_label(p).as_deref() == Some(label)),
        None => Some(PathBuf::from(spec)),
    }
}

/// Parse `modules.dep`: module path → its dependencies (paths relative to the modules dir).
pub fn parse_modules_dep(text: &str) -> HashMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| {
            let (m, deps) = l.split_once(':')?;
            Some((
                m.trim().to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            ))
        })
        .collect()
}

/// The module name of a path: `kernel/net/vmw_vsock/vsock.ko.xz` → `vsock`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The load order (dependencies first, each once) of the modules named `wanted`.
pub fn load_order(deps: &HashMap<String, Vec<String>>, wanted: &[&str]) -> Vec<String> {
    let by_name: HashMap<String, &String> = deps.keys().map(|p| (module_name(p), p)).collect();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        path: &str,
        deps: &HashMap<String, Vec<String>>,
        seen: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(path.to_owned()) {
            return;
        }
        // modules.dep lists all dependencies, deepest last; load them in reverse.
        for d in deps.get(path).into_iter().flatten().rev() {
            visit(d, deps, seen, out);
        }
        out.push(path.to_owned());
    }
    for w in wanted {
        if let Some(p) = by_name.get(&w.replace('-', "_")) {
            visit(p, deps, &mut seen, &mut out);
        }
    }
    out
}

/// Container engines that keep overlay mounts of their own under a state directory
/// (docker's overlay2, containerd's overlayfs snapshotter, podman's overlay driver): the
/// daemon binary that says the engine is installed, and its state directory, relative to
/// the root.
const CONTAINER_ENGINES: &[(&str, &str)] = &[
    ("dockerd", "var/lib/docker"),
    ("containerd", "var/lib/containerd"),
    ("podman", "var/lib/containers"),
];

/// The state directories (relative) of the container engines installed under `root`.
///
/// The guest's `/` is an overlayfs, and overlayfs refuses an upper directory on an
/// overlayfs, so docker inside a sandbox failed (`failed to mount overlay: invalid
/// argument`) until these are given a real filesystem: banger-init binds a directory of the
/// overlay disk (ext4) over each.
pub fn container_state_dirs(root: &Path) -> Vec<&'static str> {
    CONTAINER_ENGINES
        .iter()
        .filter(|(bin, _)| {
            ["usr/bin", "usr/sbin", "bin", "sbin"]
                .iter()
                .any(|d| root.join(d).join(bin).exists())
        })
        .map(|(_, dir)| *dir)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_engines_are_found_by_their_daemon_binary() {
        let root = tempfile::tempdir().unwrap();
        assert!(container_state_dirs(root.path()).is_empty());
        std::fs::create_dir_all(root.path().join("usr/sbin")).unwrap();
        std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        // Debian's docker.io installs /usr/sbin/dockerd; containerd is in /usr/bin.
        std::fs::write(root.path().join("usr/sbin/dockerd"), b"").unwrap();
        assert_eq!(container_state_dirs(root.path()), ["var/lib/docker"]);
        std::fs::write(root.path().join("usr/bin/containerd"), b"").unwrap();
        std::fs::write(root.path().join("usr/bin/podman"), b"").unwrap();
        assert_eq!(
            container_state_dirs(root.path()),
            ["var/lib/docker", "var/lib/containerd", "var/lib/containers"]
        );
    }

    #[test]
    fn params() {
        let c = "console=ttyS0 banger.name=dev banger.overlay=LABEL=bg-overlay ro";
        assert_eq!(param(c, "banger.name"), Some("dev"));
        assert_eq!(param(c, "banger.overlay"), Some("LABEL=bg-overlay"));
        assert_eq!(param(c, "banger.nope"), None);
        assert_eq!(param(c, "ro"), None);
    }

    #[test]
    fn labels_of_real_ext4_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.ext4");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "bg-work"])
            .arg(&img)
            .status()
            .unwrap();
        assert!(ok.success());
        std::fs::write(dir.path().join("b.raw"), vec![0u8; 4096]).unwrap();
        assert_eq!(ext4_label(&img).as_deref(), Some("bg-work"));
        assert_eq!(ext4_label(&dir.path().join("b.raw")), None);
        let cands = vec!["b.raw".to_owned(), "a.ext4".to_owned()];
        assert_eq!(find_device("LABEL=bg-work", dir.path(), &cands), Some(img));
        assert_eq!(find_device("LABEL=nope", dir.path(), &cands), None);
        assert_eq!(
            find_device("/dev/vdc", dir.path(), &cands),
            Some("/dev/vdc".into())
        );
    }

    #[test]
    fn module_order_puts_dependencies_first() {
        let dep = "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/net/vmw_vsock/vsock.ko.xz\nkernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz\nkernel/net/vmw_vsock/vsock.ko.xz:\nkernel/fs/overlayfs/overlay.ko.xz:\n";
        let deps = parse_modules_dep(dep);
        let order = load_order(&deps, &["vmw_vsock_virtio_transport", "overlay", "missing"]);
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "overlay"
            ]
        );
    }
}
