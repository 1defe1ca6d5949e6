//! The jailer's conventions, shared by bangerd (which prepares a jail and talks to the
//! Firecracker inside it) and the launcher (which starts the jailer): one definition of
//! the command line and of where the jailer puts things.
//!
//! Jail layout (the jailer's own, `Env::new` and `validate_exec_file` in
//! `src/jailer/src/env.rs`): `<jail base>/<exec name>/<id>/root/`, the chroot, where the
//! exec name is the file name of the **canonicalised** `--exec-file`: with
//! `/usr/local/bin/firecracker -> firecracker-v1.13.1-x86_64` the jail is
//! `<jail base>/firecracker-v1.13.1-x86_64/<id>/root`. [`exec_name`] resolves the same way,
//! and clean-up looks under every exec name ([`instance_dirs`]), so a binary upgraded (its
//! symlink moved) while a VM ran does not leave that VM's jail behind.
//!
//! The jailer mknods `/dev/kvm` and `/dev/net/tun` in the jail, and Firecracker opens them:
//! a jail base on a `nodev` mount makes that open fail, so [`nodev_problem`] is checked at
//! launch and in `banger doctor`. The per-VM cgroup is [`crate::cgroup`]'s.

use std::path::{Path, PathBuf};

use crate::cgroup::{Layout, Limits};

/// The API socket inside the jail.
pub const API_SOCK: &str = "api.sock";
/// The hybrid vsock socket inside the jail.
pub const VSOCK_SOCK: &str = "vsock.sock";
/// The files in the jail Firecracker writes: they become the VM uid's for the VM's run
/// and the owner's again when the jail is cleaned.
pub const WRITABLE: [&str; 6] = [
    "overlay.ext4",
    "work.ext4",
    "firecracker.log",
    "metrics.json",
    RESTORE_STATE,
    RESTORE_MEMORY,
];
/// The files a save fills ([`SAVE_STATE`], [`SAVE_MEMORY`]): they stay the owner's, and
/// the VM's group (the jailer's `--gid`, the VM uid) may write them (mode 0660), so that
/// bangerd can read a save of a VM that runs on (`vm snapshot create`) without root.
pub const SAVED: [&str; 2] = [SAVE_STATE, SAVE_MEMORY];
/// Where a suspend's `PUT /snapshot/create` writes the VM state and the guest memory, in
/// the jail: hard links, made before Firecracker starts, of empty files in the VM's run
/// directory, so the files Firecracker fills are banger's to move (see the driver).
pub const SAVE_STATE: &str = "vm.snap";
pub const SAVE_MEMORY: &str = "vm.mem";
/// What a restore's `PUT /snapshot/load` reads, in the jail: hard links of the saved
/// state. Not the files a later suspend writes: Firecracker maps the memory file it
/// restored from for as long as it runs, and truncating that would fault the guest.
pub const RESTORE_STATE: &str = "restore.snap";
pub const RESTORE_MEMORY: &str = "restore.mem";
/// The files in the jail every VM of an image or kernel shares (hard links to banger's
/// own copy): the VM uid must not be able to write them.
pub const SHARED: [&str; 3] = ["vmlinux", "initrd", "rootfs.ext4"];

/// The Firecracker executable's file name as the jailer sees it: the last component of
/// its canonical path (`firecracker` if it cannot be resolved, which the jailer refuses).
pub fn exec_name(firecracker: &Path) -> String {
    let resolved = std::fs::canonicalize(firecracker).unwrap_or_else(|_| firecracker.to_owned());
    resolved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "firecracker".into())
}

/// `<jail base>/<exec name>/<id>`, the VM's jail instance directory.
pub fn instance_dir(jail_base: &Path, firecracker: &Path, id: &str) -> PathBuf {
    jail_base.join(exec_name(firecracker)).join(id)
}

/// Every `<jail base>/<name>/<id>` that exists, whatever the exec name was when the VM
/// started (clean-up). `id` must already be a checked VM id.
pub fn instance_dirs(jail_base: &Path, id: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(jail_base) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path().join(id))
        .filter(|d| std::fs::symlink_metadata(d).is_ok())
        .collect()
}

/// Why device nodes made under `dir` (or, while it does not exist yet, its nearest
/// existing ancestor) could not be opened: the mount it is on is `nodev`. None when fine.
pub fn nodev_problem(dir: &Path) -> Option<String> {
    let mut probe = dir;
    while std::fs::symlink_metadata(probe).is_err() {
        probe = probe.parent()?;
    }
    let stat = nix::sys::statvfs::statvfs(probe).ok()?;
    stat.flags()
        .contains(nix::sys::statvfs::FsFlags::ST_NODEV)
        .then(|| {
            format!(
                "the jail base {} is on a nodev mount: the jailer makes /dev/kvm and /dev/net/tun in each jail, and Firecracker cannot open device nodes there. Move banger's data directory (XDG_DATA_HOME, or the system service's /var/lib/banger) to a mount without nodev, or remount it with `mount -o remount,dev`",
                dir.display()
            )
        })
}

/// Ownership of a jailed VM, done by root (the launcher) around the jailer's run.
///
/// The jailer makes `root/` mode 0700 and the VM uid's, so nothing outside the VM uid
/// can reach into it. Before the jailer runs, [`hand_over`] gives the VM uid the files it
/// writes ([`WRITABLE`]) and checks that it cannot write the shared ones ([`SHARED`]);
/// after Firecracker made a socket in `root/`, [`expose`] hard-links it to the instance
/// directory beside `root/` (a socket is reached through any of its links, and its
/// inode's mode is what `connect` checks), owned by the owner and the socket group, mode
/// 0660: bangerd and the users it serves connect there, nobody else can. [`give_back`]
/// returns the writable files to the owner when the jail is cleaned. Every path is
/// checked with `lstat` and changed without following symlinks: the jail is the VM uid's
/// and a compromised VMM may have replaced what is in it.
pub mod owner {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::Path;

    fn regular(path: &Path) -> Result<Option<std::fs::Metadata>, String> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
            Ok(m) if m.file_type().is_file() => Ok(Some(m)),
            Ok(_) => Err(format!("{} is not a regular file", path.display())),
        }
    }

    /// Give `uid` the writable files in `root`; refuse a shared file it could write.
    pub fn hand_over(root: &Path, uid: u32) -> Result<(), String> {
        for name in super::SHARED {
            let path = root.join(name);
            if let Some(m) = regular(&path)?
                && (m.uid() == uid
                    || m.mode() & 0o002 != 0
                    || (m.gid() == uid && m.mode() & 0o020 != 0))
            {
                return Err(format!(
                    "{} is writable by the VM's uid {uid}: banger keeps images and kernels read-only to VMs (chmod o-w it)",
                    path.display()
                ));
            }
        }
        for name in super::WRITABLE {
            let path = root.join(name);
            if regular(&path)?.is_some() {
                std::os::unix::fs::lchown(&path, Some(uid), Some(uid))
                    .map_err(|e| format!("cannot give {} to uid {uid}: {e}", path.display()))?;
            }
        }
        for name in super::SAVED {
            let path = root.join(name);
            if regular(&path)?.is_some() {
                std::os::unix::fs::lchown(&path, None, Some(uid)).map_err(|e| {
                    format!("cannot give {} to the group {uid}: {e}", path.display())
                })?;
                // A regular file (lstat above) in a jail the VM has not run in yet.
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
                    .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Give the writable files in `root` that belong to a VM uid back to the owner.
    pub fn give_back(
        root: &Path,
        is_vm_uid: impl Fn(u32) -> bool,
        owner: (u32, u32),
    ) -> Result<(), String> {
        for name in super::WRITABLE {
            let path = root.join(name);
            match regular(&path) {
                Ok(Some(m)) if is_vm_uid(m.uid()) => {
                    std::os::unix::fs::lchown(&path, Some(owner.0), Some(owner.1)).map_err(|e| {
                        format!("cannot give {} back to the owner: {e}", path.display())
                    })?
                }
                // Not the VM's (never handed over, or already back), gone, or replaced
                // by something that is not a file: nothing of the owner's to restore.
                _ => {}
            }
        }
        Ok(())
    }

    /// Hard-link the socket `name` in `<instance>/root` to `<instance>/<name>`, give it to
    /// `owner` and `gid`, mode 0660. False while the socket does not exist yet.
    pub fn expose(instance: &Path, name: &str, owner: u32, gid: u32) -> Result<bool, String> {
        let inside = instance.join("root").join(name);
        let outside = instance.join(name);
        match std::fs::symlink_metadata(&inside) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(format!("{}: {e}", inside.display())),
            Ok(_) => {}
        }
        let _ = std::fs::remove_file(&outside);
        // std's hard_link is linkat(2) without AT_SYMLINK_FOLLOW: a symlink planted in
        // the jail is linked as itself, and refused below.
        std::fs::hard_link(&inside, &outside)
            .map_err(|e| format!("cannot link {} out of the jail: {e}", inside.display()))?;
        let fail = |why: String| {
            let _ = std::fs::remove_file(&outside);
            Err(why)
        };
        match std::fs::symlink_metadata(&outside) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => return fail(format!("{} is not a socket", inside.display())),
            Err(e) => return fail(format!("{}: {e}", outside.display())),
        }
        if let Err(e) = std::os::unix::fs::lchown(&outside, Some(owner), Some(gid)) {
            return fail(format!(
                "cannot give {} to the owner: {e}",
                outside.display()
            ));
        }
        // Not a symlink (checked above, and the link is in a directory the VM cannot
        // reach), so this changes the socket itself.
        if let Err(e) = std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o660)) {
            return fail(format!("cannot chmod {}: {e}", outside.display()));
        }
        Ok(true)
    }
}

/// The jailer's arguments (after argv[0]) for VM `id`: `cgroups` is the host's layout
/// (see [`crate::cgroup`]), `limits` the VM's.
pub fn jailer_args(
    firecracker: &Path,
    uid: u32,
    gid: u32,
    jail_base: &Path,
    id: &str,
    cgroups: &Layout,
    limits: Limits,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--id".into(),
        id.into(),
        "--exec-file".into(),
        firecracker.display().to_string(),
        "--uid".into(),
        uid.to_string(),
        "--gid".into(),
        gid.to_string(),
        "--chroot-base-dir".into(),
        jail_base.display().to_string(),
    ];
    args.extend(cgroups.jailer_args(limits));
    args.extend(["--".into(), "--api-sock".into(), format!("/{API_SOCK}")]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_hand_over_gives_the_vm_its_files_and_its_group_the_save_files() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for name in WRITABLE.iter().chain(&SAVED).chain(&SHARED) {
            std::fs::write(root.join(name), b"").unwrap();
            std::fs::set_permissions(root.join(name), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        let owner = nix::unistd::geteuid().as_raw();
        owner::hand_over(root, 60_123).unwrap();
        let meta = |name: &str| std::fs::metadata(root.join(name)).unwrap();
        for name in WRITABLE {
            assert_eq!(
                (meta(name).uid(), meta(name).gid()),
                (60_123, 60_123),
                "{name}"
            );
        }
        for name in SAVED {
            let m = meta(name);
            assert_eq!(
                (m.uid(), m.gid(), m.mode() & 0o777),
                (owner, 60_123, 0o660),
                "{name}"
            );
        }
        for name in SHARED {
            assert_eq!(meta(name).uid(), owner, "{name}");
        }
        // Cleaned: the VM's files are the owner's again; the save files were never its.
        owner::give_back(root, |u| u == 60_123, (owner, owner)).unwrap();
        for name in WRITABLE.iter().chain(&SAVED) {
            assert_eq!(meta(name).uid(), owner, "{name}");
        }
    }

    #[test]
    fn a_symlinked_binary_names_the_jail_after_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("firecracker-v1.13.1-x86_64");
        std::fs::write(&real, b"").unwrap();
        let link = dir.path().join("firecracker");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(exec_name(&link), "firecracker-v1.13.1-x86_64");
        assert_eq!(
            instance_dir(Path::new("/j"), &link, "abc"),
            PathBuf::from("/j/firecracker-v1.13.1-x86_64/abc")
        );
        // A path that does not resolve keeps its own name.
        assert_eq!(
            exec_name(Path::new("/nonexistent/firecracker")),
            "firecracker"
        );
    }

    #[test]
    fn clean_up_finds_a_jail_under_any_exec_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["firecracker", "firecracker-v1.13.1-x86_64"] {
            std::fs::create_dir_all(dir.path().join(name).join("abc/root")).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("other/xyz")).unwrap();
        let mut found = instance_dirs(dir.path(), "abc");
        found.sort();
        assert_eq!(
            found,
            [
                dir.path().join("firecracker/abc"),
                dir.path().join("firecracker-v1.13.1-x86_64/abc")
            ]
        );
        assert!(instance_dirs(&dir.path().join("missing"), "abc").is_empty());
    }

    #[test]
    fn the_command_line_carries_the_cgroup_of_the_layout() {
        let layout = Layout::V1 {
            memory: "/sys/fs/cgroup/memory".into(),
            cpu: "/sys/fs/cgroup/cpu".into(),
        };
        let limits = Limits {
            vcpu: 1,
            memory_mib: 128,
        };
        let args = jailer_args(
            Path::new("/usr/bin/firecracker"),
            900,
            901,
            Path::new("/j"),
            "abc",
            &layout,
            limits,
        );
        assert_eq!(
            args.join(" "),
            "--id abc --exec-file /usr/bin/firecracker --uid 900 --gid 901 --chroot-base-dir /j \
             --cgroup-version 1 --parent-cgroup banger --cgroup memory.limit_in_bytes=201326592 \
             --cgroup cpu.cfs_period_us=100000 --cgroup cpu.cfs_quota_us=125000 -- --api-sock /api.sock"
        );
        let none = Layout::None { why: "x".into() };
        let args = jailer_args(
            Path::new("/usr/bin/firecracker"),
            900,
            901,
            Path::new("/j"),
            "abc",
            &none,
            limits,
        );
        assert!(!args.iter().any(|a| a.starts_with("--cgroup")), "{args:?}");
    }

    /// A tmpfs mounted for a test, unmounted when dropped (even when the test fails).
    pub(crate) struct TmpMount(pub PathBuf);

    impl TmpMount {
        pub(crate) fn new(dir: &Path, options: &str) -> TmpMount {
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", options, "tmpfs"])
                .arg(dir)
                .status()
                .unwrap()
                .success();
            assert!(
                ok,
                "mount -t tmpfs -o {options} {} (needs root)",
                dir.display()
            );
            TmpMount(dir.to_owned())
        }
    }

    impl Drop for TmpMount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn root_a_jail_base_on_a_nodev_mount_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let (nodev, dev) = (dir.path().join("nodev"), dir.path().join("dev"));
        std::fs::create_dir(&nodev).unwrap();
        std::fs::create_dir(&dev).unwrap();
        let _a = TmpMount::new(&nodev, "nodev,size=1m");
        let _b = TmpMount::new(&dev, "dev,size=1m");
        // The jail base need not exist yet: its nearest ancestor's mount decides.
        let base = nodev.join("banger/jail");
        let problem = nodev_problem(&base).expect("nodev is seen");
        assert!(
            problem.contains(&base.display().to_string())
                && problem.contains("nodev")
                && problem.contains("remount"),
            "{problem}"
        );
        assert_eq!(nodev_problem(&dev.join("banger/jail")), None);
    }
}
