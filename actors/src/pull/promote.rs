//! `banger image promote <vm> <name>`: a running VM's root filesystem becomes a new image
//! (like `docker commit`), with the VM's kernel as its kernel.
//!
//! Why the running guest, not the disks on the host: a VM's `/` is an overlayfs that
//! banger-init builds in the guest (the image's read-only ext4 below, the VM's overlay disk
//! above); only the guest sees the merged tree, and replaying an overlay's upper layer on
//! the host would mean reimplementing overlayfs (whiteouts as character devices, opaque and
//! redirect xattrs, metacopy). So the guest agent packs its own `/` (`TarOut` with options,
//! see [`banger_guest::agent::files::PackOptions`]) and the daemon replays the stream
//! exactly as it replays an OCI layer ([`super::layers::Replay::apply_tree`]: the same
//! refusals of `..`, escaping links and foreign hard links; modes with setuid, owners,
//! xattrs, symlinks and hard links kept; owners recorded for debugfs when the daemon cannot
//! chown), then builds the ext4 like an OCI pull ([`super::ext4`]) and publishes it
//! atomically (staging directory beside the images, renamed into place, then recorded).
//!
//! What is left out of the image:
//! - The contents of [`EXCLUDE`]: the kernel's and banger-init's mounts (`/proc`, `/sys`,
//!   `/dev`, `/run`), `/tmp`, `/lost+found`, and `/root`, which is the VM's **work disk**,
//!   not part of its root filesystem: a VM made from the image gets its own work disk
//!   mounted there, which would hide anything baked in. The directories themselves are
//!   kept (empty, with their modes) as mount points. Put what the image should carry
//!   elsewhere (`/opt`, `/usr/local`, `/etc`), or use `[[file_sync]]` for files in /root.
//! - Any other mounted filesystem (`tar --one-file-system`): the merged root is one
//!   overlay mount, so anything mounted below it (a tmpfs, a disk) is packed as an empty
//!   directory.
//! - Sockets, FIFOs and device nodes (the guest's /dev is devtmpfs).
//! - Per-VM identity ([`strip_identity`]), as the golden image leaves it out: the ssh host
//!   keys (banger-init makes an ed25519 key on the new VM's first boot, the golden image's
//!   unit makes them all), the contents of `/etc/machine-id` (emptied: systemd's "not yet
//!   initialised", so each VM gets its own), a `/var/lib/dbus/machine-id` file, systemd's
//!   random seed, and the VM's name where banger-init wrote it (`/etc/hostname`, its
//!   `127.0.1.1` line in `/etc/hosts`).
//!
//! Kept on purpose: banger's first-boot marker (`/var/lib/banger/firstboot-sshd`). It says
//! "sshd was installed on this root", which is as true of the promoted image, so its VMs do
//! not install it again. banger-init and banger-agent are replaced by the daemon's own (as
//! a pull adds them), so the image's agent matches the daemon; when the daemon has none
//! (`[images] guest_binaries_dir`), the VM's own are kept — they booted it.
//!
//! The copy is of a live system: files written while it is packed may be caught half-way
//! (each file is packed at the size it had when listed). Quiesce what matters first, or
//! stop and start the VM.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use banger_guest::host::{self, HostError};
use banger_guest::proto::{ProtoError, Request};

use super::layers::{Owners, Replay};
use super::oci::{GUEST_BINARIES, GUEST_DIR};
use super::{PullEnv, PullError, Reporter, Staging, blocking};
use crate::image::ImageRecord;
use crate::store::Named;

/// Directories of the guest's root whose contents are not part of an image.
pub const EXCLUDE: [&str; 7] = [
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/root",
    "/lost+found",
];

/// A resolved promote: which VM (running, reachable at `socket`) becomes which image.
#[derive(Debug, Clone)]
pub struct PromotePlan {
    pub vm: String,
    pub vm_id: String,
    /// The VM's hybrid vsock socket (the agent).
    pub socket: PathBuf,
    /// The VM's kernel: the image's kernel.
    pub kernel: String,
    pub name: String,
    pub size_bytes: Option<u64>,
}

impl PromotePlan {
    /// Concurrent promotes of one VM into one name share the work.
    pub fn key(&self) -> String {
        format!("image:vm:{}->{}", self.vm_id, self.name)
    }
}

/// The `TarOut` request that packs a guest's root for an image.
pub fn pack_request() -> Request {
    Request::TarOut {
        dir: "/".into(),
        exclude: EXCLUDE.iter().map(|s| (*s).to_owned()).collect(),
        one_file_system: true,
        xattrs: true,
    }
}

/// Whether every parent of `rel` inside `root` is a real directory (no symlink): what
/// [`strip_identity`] checks before it touches a path, so it never writes through a link
/// out of the tree (the tree's links point into the guest, not the host).
fn real_parents(root: &Path, rel: &Path) -> bool {
    let mut cur = root.to_owned();
    for c in rel.parent().into_iter().flat_map(Path::components) {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// `rel` as a regular file of the tree (not a link), if it is one.
pub(super) fn regular(root: &Path, rel: &str) -> Option<PathBuf> {
    let rel = Path::new(rel);
    if !real_parents(root, rel) {
        return None;
    }
    let abs = root.join(rel);
    std::fs::symlink_metadata(&abs)
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|_| abs)
}

/// Rewrite a regular file in place (same inode: its mode and recorded owner stay).
pub(super) fn rewrite(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("cannot rewrite {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("cannot rewrite {}: {e}", path.display()))
}

/// Remove the per-VM identity of `vm` from the tree `replay` holds (see the module docs).
/// Returns what was removed or emptied, as guest paths.
pub fn strip_identity(replay: &mut Replay, vm: &str) -> Result<Vec<String>, String> {
    let root = replay.root().to_owned();
    let mut done = Vec::new();
    if real_parents(&root, Path::new("etc/ssh/x"))
        && let Ok(rd) = std::fs::read_dir(root.join("etc/ssh"))
    {
        let mut keys: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ssh_host_"))
            .collect();
        keys.sort();
        for k in keys {
            replay.delete(&Path::new("etc/ssh").join(&k))?;
            done.push(format!("/etc/ssh/{k}"));
        }
    }
    if let Some(p) = regular(&root, "etc/machine-id")
        && std::fs::metadata(&p).is_ok_and(|m| m.len() > 0)
    {
        rewrite(&p, "")?;
        done.push("/etc/machine-id (emptied)".into());
    }
    for rel in ["var/lib/dbus/machine-id", "var/lib/systemd/random-seed"] {
        if regular(&root, rel).is_some() {
            replay.delete(Path::new(rel))?;
            done.push(format!("/{rel}"));
        }
    }
    if let Some(p) = regular(&root, "etc/hostname")
        && std::fs::read_to_string(&p).is_ok_and(|t| t.trim() == vm)
    {
        replay.delete(Path::new("etc/hostname"))?;
        done.push("/etc/hostname".into());
    }
    if let Some(p) = regular(&root, "etc/hosts")
        && let Ok(text) = std::fs::read_to_string(&p)
    {
        let ours = format!("127.0.1.1 {vm}");
        if text.lines().any(|l| l.trim() == ours) {
            let kept: String = text
                .lines()
                .filter(|l| l.trim() != ours)
                .map(|l| format!("{l}\n"))
                .collect();
            rewrite(&p, &kept)?;
            done.push(format!("/etc/hosts ({ours})"));
        }
    }
    Ok(done)
}

/// A blocking reader over an async one, for the replay on the blocking pool; counts bytes.
struct BlockingReader<R> {
    rt: tokio::runtime::Handle,
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: tokio::io::AsyncRead + Unpin> Read for BlockingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt;
        let n = self.rt.block_on(self.inner.read(buf))?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn guest_err(vm: &str, e: &HostError) -> PullError {
    let mut detail = banger_error::error_chain(e);
    if detail.contains("unknown field") {
        detail.push_str(
            "; the VM's banger-agent predates image promote: it comes from its image, so make the VM from an image pulled or registered with this banger",
        );
    }
    PullError::Guest {
        vm: vm.to_owned(),
        detail,
    }
}

/// Pack the VM's root through its agent, replay it into `tree`, strip its identity and add
/// the guest binaries. Returns the replay, finished: the owners to set with debugfs.
async fn unpack(
    plan: &PromotePlan,
    tree: PathBuf,
    guest_dir: Option<PathBuf>,
    rep: &Reporter,
) -> Result<Vec<(PathBuf, u64, u64)>, PullError> {
    let (mut w, r) = tokio::io::duplex(1 << 20);
    let counter = Arc::new(AtomicU64::new(0));
    let ticker = rep.ticker(Arc::clone(&counter), None);
    let reader = BlockingReader {
        rt: tokio::runtime::Handle::current(),
        inner: r,
        count: counter,
    };
    let owners = Owners::detect();
    let vm = plan.vm.clone();
    let replay = blocking(move || {
        let mut reader = reader;
        let mut replay = Replay::new(&tree, owners);
        replay
            .apply_tree(&mut reader)
            .map_err(|d| PullError::Build(format!("unpacking vm {vm}'s root: {d}")))?;
        // The end-of-archive padding the tar reader leaves, so the sender ends cleanly.
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(PullError::io(&tree))?;
        Ok(replay)
    });
    let pack = async {
        let r = host::tar_out_with(&plan.socket, &pack_request(), &mut w).await;
        drop(w);
        r
    };
    let (packed, replayed) = tokio::join!(pack, replay);
    drop(ticker);
    let mut replay = match (packed, replayed) {
        (Ok(_), Ok(r)) => r,
        // The replay stopped reading (a refused entry): that is the cause, not the pipe.
        (Err(HostError::Proto(ProtoError::Io(_))), Err(e)) => return Err(e),
        (Err(e), _) => return Err(guest_err(&plan.vm, &e)),
        (Ok(_), Err(e)) => return Err(e),
    };
    let vm = plan.vm.clone();
    let rep2 = rep.clone();
    blocking(move || {
        let build = |d: String| PullError::Build(format!("preparing the image: {d}"));
        let stripped = strip_identity(&mut replay, &vm).map_err(build)?;
        rep2.stage(
            "identity",
            Some(if stripped.is_empty() {
                "nothing per-VM found".into()
            } else {
                format!("removed {}", stripped.join(", "))
            }),
        );
        match &guest_dir {
            Some(dir) => {
                for b in GUEST_BINARIES {
                    replay
                        .inject(&Path::new(GUEST_DIR).join(b), &dir.join(b), 0o755)
                        .map_err(build)?;
                }
            }
            None => tracing::info!(
                vm,
                "no guest binaries beside the daemon: the image keeps the VM's own"
            ),
        }
        if replay.skipped > 0 || replay.xattr_failures > 0 {
            tracing::info!(
                vm,
                skipped = replay.skipped,
                xattr_failures = replay.xattr_failures,
                "entries skipped, xattrs not kept"
            );
        }
        replay.finish().map_err(build)
    })
    .await
}

/// Build image `plan.name` from the running VM `plan.vm` (see the module docs).
pub async fn promote(
    env: &Arc<PullEnv>,
    plan: PromotePlan,
    rep: &Reporter,
) -> Result<ImageRecord, PullError> {
    let images = env.config.images_dir();
    let name = plan.name.clone();
    let reservation = super::reserve(
        env,
        Named::Image,
        &name,
        format!("being promoted from vm {}", plan.vm),
        format!("choose another name, or delete it with `banger image delete {name}`"),
    )
    .await?;
    let staging = blocking(move || Staging::new(&images, &name)).await?;
    let guest_dir = env.config.guest_binaries_dir.clone();
    // Only static ones replace the VM's own (see `super::guest`); else the VM's are kept.
    let checked = {
        let dir = guest_dir.clone();
        blocking(move || Ok(super::guest::check_dir(&dir))).await?
    };
    let guest_dir = match checked {
        Ok(()) => Some(guest_dir),
        Err(e) => {
            tracing::info!(vm = %plan.vm, "keeping the vm's own guest binaries: {e}");
            None
        }
    };
    let tree = staging.path().join("tree");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(&tree).map_err(PullError::io(&tree))?;
        std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(0o755))
            .map_err(PullError::io(&tree))?;
    }
    rep.stage(
        "pack",
        Some(format!("vm {}: / through its guest agent", plan.vm)),
    );
    let owner_list = match unpack(&plan, tree.clone(), guest_dir, rep).await {
        Ok(o) => o,
        Err(e) => {
            // Removing a half-replayed root is blocking work.
            let _ = blocking(move || {
                drop(staging);
                Ok(())
            })
            .await;
            return Err(e);
        }
    };
    let images = env.config.images_dir();
    let rep2 = rep.clone();
    blocking(move || {
        rep2.stage("mkfs", None);
        let rootfs = staging.path().join("rootfs.ext4");
        let size = super::ext4::build(&tree, &rootfs, plan.size_bytes, &owner_list, &rep2)?;
        let manifest = serde_json::json!({
            "name": plan.name,
            "arch": "x86_64",
            "source": format!("vm:{}", plan.vm),
            "vm_id": plan.vm_id,
            "kernel_ref": plan.kernel,
        });
        let mpath = staging.path().join("manifest.json");
        std::fs::write(&mpath, serde_json::to_vec_pretty(&manifest).expect("json"))
            .map_err(PullError::io(&mpath))?;
        rep2.stage("publish", Some(plan.name.clone()));
        let dest = images.join(&plan.name);
        staging.publish(&dest)?;
        let rec = ImageRecord {
            name: plan.name,
            size_bytes: size,
            rootfs: dest.join("rootfs.ext4"),
            kernel: Some(plan.kernel),
            registered_at: crate::store::now_secs(),
        };
        reservation.publish_image(&rec)?;
        Ok(rec)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A guest root as `vm` left it: its identity, and what must stay.
    fn guest_root(vm: &str) -> tempfile::TempDir {
        let g = tempfile::tempdir().unwrap();
        let p = g.path();
        write(p, "etc/ssh/ssh_host_ed25519_key", "PRIVATE");
        write(p, "etc/ssh/ssh_host_ed25519_key.pub", "ssh-ed25519 AAAA");
        write(p, "etc/ssh/sshd_config", "Port 22\n");
        write(p, "etc/machine-id", "0123456789abcdef0123456789abcdef\n");
        write(p, "var/lib/systemd/random-seed", "seed");
        write(p, "etc/hostname", &format!("{vm}\n"));
        write(
            p,
            "etc/hosts",
            &format!("127.0.0.1 localhost\n127.0.1.1 {vm}\n::1 ip6-localhost\n"),
        );
        write(p, "var/lib/banger/firstboot-sshd", "");
        std::fs::create_dir_all(p.join("var/lib/dbus")).unwrap();
        std::os::unix::fs::symlink("/etc/machine-id", p.join("var/lib/dbus/machine-id")).unwrap();
        write(p, "opt/app/bin", "#!/bin/sh\n");
        std::fs::set_permissions(
            p.join("opt/app/bin"),
            std::fs::Permissions::from_mode(0o4750),
        )
        .unwrap();
        if nix::unistd::geteuid().is_root() {
            // Not root's: so a hard link that lost its owner would show.
            std::os::unix::fs::lchown(p.join("opt/app/bin"), Some(1234), Some(1234)).unwrap();
            std::fs::set_permissions(
                p.join("opt/app/bin"),
                std::fs::Permissions::from_mode(0o4750),
            )
            .unwrap();
        }
        std::fs::hard_link(p.join("opt/app/bin"), p.join("opt/app/bin2")).unwrap();
        // Their contents must not be packed; the directories stay.
        write(p, "tmp/scratch", "junk");
        write(p, "root/.bash_history", "ls");
        write(p, "proc/1/status", "Name: init");
        g
    }

    /// Pack `guest` as the agent does for a promote, and replay it like the daemon.
    fn pack_and_replay(guest: &Path, tree: &Path) -> Replay {
        let opts = banger_guest::agent::files::PackOptions {
            exclude: EXCLUDE
                .iter()
                .map(|x| guest.join(x.trim_start_matches('/')))
                .collect(),
            one_file_system: true,
            xattrs: true,
        };
        let mut archive = Vec::new();
        {
            let mut b = tar::Builder::new(&mut archive);
            banger_guest::agent::files::pack(&mut b, guest, &opts).unwrap();
            b.finish().unwrap();
        }
        let mut replay = Replay::new(tree, Owners::Record);
        replay.apply_tree(archive.as_slice()).unwrap();
        replay
    }

    #[test]
    fn the_pack_request_leaves_out_mounts_tmp_and_the_work_disk() {
        match pack_request() {
            Request::TarOut {
                dir,
                exclude,
                one_file_system,
                xattrs,
            } => {
                assert_eq!(dir, "/");
                for x in ["/proc", "/sys", "/dev", "/run", "/tmp", "/root"] {
                    assert!(exclude.iter().any(|e| e == x), "{x} excluded");
                }
                assert!(one_file_system && xattrs);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_guest_root_round_trips_without_its_identity() {
        let guest = guest_root("dev");
        let out = tempfile::tempdir().unwrap();
        let mut replay = pack_and_replay(guest.path(), out.path());
        let removed = strip_identity(&mut replay, "dev").unwrap();
        assert_eq!(
            removed,
            [
                "/etc/ssh/ssh_host_ed25519_key",
                "/etc/ssh/ssh_host_ed25519_key.pub",
                "/etc/machine-id (emptied)",
                "/var/lib/systemd/random-seed",
                "/etc/hostname",
                "/etc/hosts (127.0.1.1 dev)",
            ]
        );
        let t = out.path();
        let owners = replay.finish().unwrap();
        assert!(!t.join("etc/ssh/ssh_host_ed25519_key").exists());
        assert_eq!(
            std::fs::read_to_string(t.join("etc/ssh/sshd_config")).unwrap(),
            "Port 22\n"
        );
        assert_eq!(std::fs::read(t.join("etc/machine-id")).unwrap(), b"");
        assert_eq!(
            std::fs::read_to_string(t.join("etc/hosts")).unwrap(),
            "127.0.0.1 localhost\n::1 ip6-localhost\n"
        );
        assert!(!t.join("etc/hostname").exists());
        // Kept: the first-boot marker, the dbus symlink, the setuid file and its hard link.
        assert!(t.join("var/lib/banger/firstboot-sshd").is_file());
        assert_eq!(
            std::fs::read_link(t.join("var/lib/dbus/machine-id")).unwrap(),
            Path::new("/etc/machine-id")
        );
        let m = std::fs::metadata(t.join("opt/app/bin")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o4750);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.nlink(), 2, "the hard link is a link, not a copy");
        // Excluded: contents gone, directories kept.
        for d in ["tmp", "root", "proc"] {
            assert!(t.join(d).is_dir(), "{d}");
            assert_eq!(std::fs::read_dir(t.join(d)).unwrap().count(), 0, "{d}");
        }
        // Owners to set with debugfs: every path with the guest's owner (never root's).
        let uid = std::fs::metadata(guest.path().join("opt/app/bin"))
            .unwrap()
            .uid() as u64;
        assert_ne!(uid, 0);
        for name in ["opt/app/bin", "opt/app/bin2"] {
            let o = owners
                .iter()
                .find(|(p, _, _)| p == Path::new(name))
                .unwrap();
            assert_eq!(
                (o.1, o.2 != 0),
                (uid, true),
                "{name}: a hard link carries its file's owner"
            );
        }
    }

    #[test]
    fn identity_of_another_name_and_links_out_of_the_tree_are_left_alone() {
        let guest = guest_root("dev");
        let out = tempfile::tempdir().unwrap();
        let mut replay = pack_and_replay(guest.path(), out.path());
        let t = out.path().to_owned();
        // /etc/hosts as a link (into the guest: absolute): never followed on the host.
        std::fs::remove_file(t.join("etc/hosts")).unwrap();
        std::os::unix::fs::symlink("/etc/hosts", t.join("etc/hosts")).unwrap();
        let removed = strip_identity(&mut replay, "other").unwrap();
        assert!(
            !removed
                .iter()
                .any(|r| r.contains("hostname") || r.contains("hosts"))
        );
        assert_eq!(
            std::fs::read_to_string(t.join("etc/hostname")).unwrap(),
            "dev\n"
        );
        // A root whose /etc is a link: nothing under it is touched.
        let out2 = tempfile::tempdir().unwrap();
        let mut replay2 = Replay::new(out2.path(), Owners::Record);
        let elsewhere = tempfile::tempdir().unwrap();
        write(elsewhere.path(), "machine-id", "keep");
        std::os::unix::fs::symlink(elsewhere.path(), out2.path().join("etc")).unwrap();
        assert!(strip_identity(&mut replay2, "dev").unwrap().is_empty());
        assert_eq!(
            std::fs::read_to_string(elsewhere.path().join("machine-id")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn whiteout_names_are_plain_files_in_a_promoted_tree() {
        let guest = tempfile::tempdir().unwrap();
        write(guest.path(), "data/keep", "x");
        write(guest.path(), "data/.wh.keep", "a file with an unlucky name");
        let out = tempfile::tempdir().unwrap();
        let replay = pack_and_replay(guest.path(), out.path());
        replay.finish().unwrap();
        assert!(out.path().join("data/keep").is_file());
        assert!(out.path().join("data/.wh.keep").is_file());
    }
}
