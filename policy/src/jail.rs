//! The jailer's conventions, shared by bangerd (which prepares a jail and talks to the
//! Firecracker inside it) and the launcher (which starts the jailer): one definition of
//! the command line and of where the jailer puts things.
//!
//! Jail layout (the jailer's own): `<jail base>/<exec name>/<id>/root/`, the chroot. With
//! `--cgroup-version 2` the jailer puts Firecracker in `<cgroup root>/<exec name>/<id>`
//! (parent cgroup: the exec file's name) and leaves it there when Firecracker exits: the
//! launcher removes it with the jail.

use std::path::{Path, PathBuf};

/// The API socket inside the jail.
pub const API_SOCK: &str = "api.sock";
/// Where cgroup v2 is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The Firecracker executable's file name (`firecracker` unless renamed).
pub fn exec_name(firecracker: &Path) -> String {
    firecracker
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "firecracker".into())
}

/// `<jail base>/<exec name>/<id>`, the VM's jail instance directory.
pub fn instance_dir(jail_base: &Path, firecracker: &Path, id: &str) -> PathBuf {
    jail_base.join(exec_name(firecracker)).join(id)
}

/// The cgroup the jailer makes for the VM.
pub fn cgroup_dir(firecracker: &Path, id: &str) -> PathBuf {
    Path::new(CGROUP_ROOT).join(exec_name(firecracker)).join(id)
}

/// The jailer's arguments (after argv[0]) for VM `id`.
pub fn jailer_args(
    firecracker: &Path,
    uid: u32,
    gid: u32,
    jail_base: &Path,
    id: &str,
) -> Vec<String> {
    vec![
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
        "--cgroup-version".into(),
        "2".into(),
        "--".into(),
        "--api-sock".into(),
        format!("/{API_SOCK}"),
    ]
}
