//! `vm fork`: N new VMs from one snapshot of a running VM, each its own machine.
//!
//! The fork, step by step ([`crate::root::Tree::fork_vm`] runs it):
//! 1. The source's actor takes a snapshot exactly as `vm snapshot create` does (vCPUs
//!    stopped while memory, device state and disks are saved; it runs on), but keeps no
//!    record of it ([`ForkSource`]): its directory is removed once the clones have their
//!    copies, or by the source's next re-adoption if the daemon dies first (the sweep of
//!    unrecorded snapshot directories).
//! 2. Each clone's directory gets its own copies of the disks and of the saved state
//!    ([`copy_into`]: sparse; QEMU loads a private copy of memory anyway), before any
//!    record names it.
//! 3. The supervisor writes the clones' records, `suspended`, each with [`CloneOf`]: new id,
//!    name, lease, MAC and VM uid; the image, kernel, VMM and spec of the snapshot.
//! 4. Each clone's start restores it (see `VmActor::begin_start`) with its tap made but off
//!    the bridge; once the guest's agent answers, it steps the clock and reseeds the RNG,
//!    then takes the clone's identity (hostname, machine id, ssh host key, address and
//!    MAC: `banger_guest::agent::identity`), and only then does the tap join the bridge,
//!    so no two guests ever answer for one address.
//! 5. A clone that fails to come up fails the fork: every clone made is deleted.
//!
//! What a clone inherits (decided here, documented in `docs/forks.md`): the guest's whole
//! state (memory, processes, disks, the workspace files), the spec, image, kernel and VMM;
//! the source's network shape (egress policy and isolation) unless `--nat` or
//! `--no-network` say otherwise. Not inherited: published ports (the host ports are the
//! source's), the deadline (`--ttl`), the source's snapshots, and `file_sync` (the clone
//! has the source's files already).
//!
//! [`CloneOf`]: super::model::CloneOf

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::disks::VmDir;
use super::model::{SnapshotRecord, VmRecord};

/// The default of `[vm_defaults] max_fork_count`.
pub const MAX_FORK_COUNT: u32 = 16;

/// A snapshot taken for a fork: the source as it was, what the snapshot holds, and its
/// directory (the source's `snapshots/<id>/`, in no record).
#[derive(Debug, Clone)]
pub struct ForkSource {
    pub source: VmRecord,
    pub snap: SnapshotRecord,
    pub dir: PathBuf,
}

/// `count` clone names `<prefix>-<n>`, the first free numbers from 1.
pub fn names(prefix: &str, count: u32, taken: &HashSet<String>) -> Vec<String> {
    (1..)
        .map(|n| format!("{prefix}-{n}"))
        .filter(|n| !taken.contains(n))
        .take(count as usize)
        .collect()
}

/// Copy a fork's snapshot into a clone's (new) directory: the disks, and the saved state
/// where a suspended VM's is, so its start restores it ([`super::snapshot::copy_in`]:
/// sparse, never a read of a hole). A copy that fails removes the directory. Blocking.
pub fn copy_into(snapshot: &Path, clone: &VmDir) -> std::io::Result<()> {
    super::snapshot::copy_in(snapshot, clone, true).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&clone.dir);
    })
}

/// Move a fork's snapshot into the last clone's (new) directory: a rename on the same
/// filesystem, so one clone costs no copy. The disks get a VM's own mode. Blocking.
pub fn take_into(snapshot: &Path, clone: &VmDir) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = clone.dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::rename(snapshot, &clone.dir)?;
    for disk in super::snapshot::DISKS {
        std::fs::set_permissions(clone.dir.join(disk), std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// The disk space `count` clones of a VM take: each a copy of its snapshot (the last
/// one the snapshot itself).
pub fn space_needed(rec: &VmRecord, vm: &VmDir, count: u32) -> u64 {
    super::snapshot::space_needed(rec, vm).saturating_mul(u64::from(count))
}

/// Remove the VM directories under `vms_dir` that no record names (`known`): a fork's
/// clones copied before a daemon's death cut it short, ahead of their records (and, under
/// the warm snapshots' directory, an `image warm` cut short: `vm::warm`). Only names
/// shaped like ids are touched. Blocking; answers what it removed.
pub fn sweep_unrecorded(vms_dir: &Path, known: &HashSet<String>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(vms_dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_id = name.len() == 12
            && name
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if is_id && !known.contains(&name) && std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_names_take_the_first_free_numbers() {
        let taken: HashSet<String> = ["a", "a-1", "a-3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(names("a", 3, &taken), ["a-2", "a-4", "a-5"]);
        assert_eq!(names("b", 1, &taken), ["b-1"]);
    }

    #[test]
    fn only_unrecorded_vm_directories_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        for d in [
            "0123456789ab",
            "ba9876543210",
            "not-a-vm-dir",
            "0123456789AB",
        ] {
            std::fs::create_dir_all(tmp.path().join(d).join("state")).unwrap();
        }
        let known: HashSet<String> = ["0123456789ab".to_owned()].into();
        assert_eq!(sweep_unrecorded(tmp.path(), &known), ["ba9876543210"]);
        for d in ["0123456789ab", "not-a-vm-dir", "0123456789AB"] {
            assert!(tmp.path().join(d).exists(), "{d}");
        }
    }

    #[test]
    fn a_clone_gets_copies_of_the_disks_and_the_state_as_saved_state() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = tmp.path().join("snap");
        std::fs::create_dir_all(snap.join("state")).unwrap();
        for (f, body) in [
            ("overlay.ext4", &b"overlay"[..]),
            ("work.ext4", b"work"),
            ("state/vm.state", b"memory"),
        ] {
            std::fs::write(snap.join(f), body).unwrap();
        }
        let clone = VmDir::new(&tmp.path().join("vms"), "0123456789ab");
        copy_into(&snap, &clone).unwrap();
        assert_eq!(std::fs::read(clone.overlay()).unwrap(), b"overlay");
        assert_eq!(std::fs::read(clone.work()).unwrap(), b"work");
        assert_eq!(
            std::fs::read(clone.saved_state().join("vm.state")).unwrap(),
            b"memory"
        );
        // A snapshot missing a file: nothing of the clone is left.
        std::fs::remove_file(snap.join("work.ext4")).unwrap();
        let other = VmDir::new(&tmp.path().join("vms"), "ba9876543210");
        assert!(copy_into(&snap, &other).is_err());
        assert!(!other.dir.exists());
    }
}
