//! Named snapshots (`vm snapshot create|list|show|rm`) and `vm rollback`: the files and
//! the checks; the VM actor sequences them (`vm::actor::snapshots`).
//!
//! A snapshot is a directory `<vm>/snapshots/<id>/` holding what the VMM saved
//! (`state/`: QEMU's migration file, or Firecracker's state and memory files) and a copy
//! of the VM's two disks (`overlay.ext4`, `work.ext4`; the image's rootfs is shared and
//! read-only, so it is not copied), all taken while the guest's vCPUs are stopped, so
//! memory and disks are of one moment. The VM then runs on (a paused VM stays paused).
//! Copies keep holes ([`super::disks::copy_sparse`]): a snapshot costs what the guest
//! has in memory and on its disks, not their sizes.
//!
//! It is written into `<id>.tmp/` and renamed once whole, and recorded in the VM's record
//! only then: a daemon that dies mid-snapshot leaves a `.tmp` (or, between the rename and
//! the record, a directory no record names), and the next daemon removes both when it
//! re-adopts the VM ([`sweep`]).
//!
//! A rollback puts the VM back to that moment: it checks the snapshot first (its files
//! whole, the VMM and its version, the image, the kernel and the VM's size as they were;
//! any difference is refused and named, and nothing is changed), then ends the VM's VMM
//! (if it runs), replaces its disks with copies of the snapshot's, copies the saved state
//! in as a suspended VM's, and starts it: the start restores it (see `docs/snapshots.md`).
//! The snapshot stays as it was, so a VM can be rolled back to it again.

use std::path::{Path, PathBuf};

use banger_api::{SnapshotInfo, VmSpec, units::human_bytes};

use super::disks::{self, VmDir};
use super::model::{SnapshotRecord, VmRecord};

/// The saved VMM state inside a snapshot's directory.
pub const STATE: &str = "state";
/// The VM's disk files copied into a snapshot, by their names in the VM's directory.
pub const DISKS: [&str; 2] = ["overlay.ext4", "work.ext4"];

/// Snapshot names: like VM names plus `.` and `_` (`before-upgrade`, `v1.2`).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid snapshot name {name:?}: use 1-63 of a-z, 0-9, '-', '.' and '_', starting with a letter or digit"
        ))
    }
}

/// The first free `snap-N` of a VM.
pub fn generated_name(taken: &[SnapshotRecord]) -> String {
    (1..)
        .map(|n| format!("snap-{n}"))
        .find(|n| !taken.iter().any(|s| s.name == *n))
        .expect("a free name")
}

/// A VM's snapshot named (or with the id) `which`.
pub fn find<'a>(rec: &'a VmRecord, which: &str) -> Option<&'a SnapshotRecord> {
    rec.snapshots
        .iter()
        .find(|s| s.name == which)
        .or_else(|| rec.snapshots.iter().find(|s| s.id == which))
}

fn tmp_dir(vm: &VmDir, id: &str) -> PathBuf {
    vm.snapshots().join(format!("{id}.tmp"))
}

/// The wire view.
pub fn info(rec: &VmRecord, vm: &VmDir, s: &SnapshotRecord) -> SnapshotInfo {
    let dir = vm.snapshot(&s.id);
    SnapshotInfo {
        id: s.id.clone(),
        name: s.name.clone(),
        vm: rec.name.clone(),
        created_at: s.created_at,
        vmm: s.vmm,
        vmm_version: s.vmm_version.clone(),
        image: s.image.clone(),
        kernel: s.kernel.clone(),
        spec: s.spec,
        bytes: allocated(&dir, &s.files),
        dir: dir.display().to_string(),
    }
}

/// The disk space `files` (paths under `dir`, as a record keeps them) take: allocated
/// bytes. Blocking.
pub fn allocated(dir: &Path, files: &[(String, u64)]) -> u64 {
    files
        .iter()
        .map(|(f, _)| disks::allocated(&dir.join(f)))
        .sum()
}

/// What is wrong with `files` (paths under `dir`, each with the length it had when saved):
/// one line for each that is missing or of another length; none when they are whole.
/// Blocking.
pub fn damaged_files(dir: &Path, files: &[(String, u64)]) -> Vec<String> {
    files
        .iter()
        .filter_map(|(file, len)| match std::fs::metadata(dir.join(file)) {
            Ok(m) if m.len() == *len => None,
            Ok(m) => Some(format!(
                "its file {} is {} bytes, it was {len} when taken",
                dir.join(file).display(),
                m.len()
            )),
            Err(e) => Some(format!("its file {}: {e}", dir.join(file).display())),
        })
        .collect()
}

/// The image's and kernel's `<name>@<registered_at>` now, as a snapshot (or a warm
/// snapshot) records them and must still match: a deleted and remade one has another.
/// None for one that is gone. Blocking.
pub fn stamps(
    store: &crate::store::Store,
    image: &str,
    kernel: &str,
) -> Result<(Option<String>, Option<String>), crate::store::StoreError> {
    Ok((
        store
            .get_image(image)?
            .map(|r| format!("{image}@{}", r.registered_at)),
        store
            .get_kernel(kernel)?
            .map(|r| format!("{kernel}@{}", r.registered_at)),
    ))
}

/// The disk space a VMM's save of the VM may need (a suspend's, a snapshot's `state/`):
/// the guest's memory in use (zero pages are holes), so at most its size, plus device
/// state.
pub fn state_space(rec: &VmRecord) -> u64 {
    (u64::from(rec.spec.memory_mib) << 20) + (16 << 20)
}

/// The disk space a snapshot of the VM may need: its [`state_space`] and the data of its
/// disks.
pub fn space_needed(rec: &VmRecord, vm: &VmDir) -> u64 {
    state_space(rec) + disks::allocated(&vm.overlay()) + disks::allocated(&vm.work())
}

/// Make the snapshot's directory (as `<id>.tmp`) with its `state/` for the VMM to save
/// into. Blocking. Answers `state/`.
pub fn begin(vm: &VmDir, id: &str) -> std::io::Result<PathBuf> {
    let tmp = tmp_dir(vm, id);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join(STATE))?;
    Ok(tmp.join(STATE))
}

/// With the VMM's state saved into [`begin`]'s `state/` and the vCPUs still stopped: copy
/// the disks in, rename the directory to its final name, and answer its files with their
/// lengths. Blocking.
pub fn finish(vm: &VmDir, id: &str) -> std::io::Result<Vec<(String, u64)>> {
    let tmp = tmp_dir(vm, id);
    for name in DISKS {
        disks::copy_sparse(&vm.dir.join(name), &tmp.join(name), 0o600)?;
    }
    let files = files_of(&tmp)?;
    std::fs::rename(&tmp, vm.snapshot(id))?;
    Ok(files)
}

/// Remove what a snapshot that failed left. Blocking.
pub fn abandon(vm: &VmDir, id: &str) {
    let _ = std::fs::remove_dir_all(tmp_dir(vm, id));
}

/// Delete a snapshot's directory. Blocking.
pub fn remove(vm: &VmDir, id: &str) -> std::io::Result<()> {
    match std::fs::remove_dir_all(vm.snapshot(id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every regular file under `dir`, as (path relative to it, length), sorted.
fn files_of(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let path = rel.join(e.file_name());
            let meta = e.metadata()?;
            if meta.is_dir() {
                todo.push(path);
            } else if meta.is_file() {
                out.push((path.display().to_string(), meta.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Remove from the VM's `snapshots/` what no snapshot of the record is: a `.tmp` of a
/// snapshot a daemon's death cut short, or one renamed but never recorded. Blocking.
/// Answers what it removed.
pub fn sweep(rec: &VmRecord, vm: &VmDir) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(vm.snapshots()) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if rec.snapshots.iter().any(|s| s.id == name) {
            continue;
        }
        if std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// What a snapshot must still match to be restored into its VM now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub vmm_version: String,
    pub image: String,
    pub kernel: String,
}

fn spec_text(s: &VmSpec) -> String {
    format!(
        "{} vCPU, {} MiB, work disk {}",
        s.vcpu,
        s.memory_mib,
        human_bytes(s.disk_bytes)
    )
}

/// Why snapshot `s` cannot be restored into `rec` now, each difference named; None when
/// it can. Blocking (it checks the snapshot's files).
pub fn mismatch(rec: &VmRecord, vm: &VmDir, s: &SnapshotRecord, now: &Current) -> Option<String> {
    let mut why = Vec::new();
    if s.vmm != rec.vmm {
        why.push(format!(
            "it was taken under {}, the vm now runs under {}",
            s.vmm.as_str(),
            rec.vmm.as_str()
        ));
    } else if s.vmm_version != now.vmm_version {
        why.push(format!(
            "it was taken by {:?}, this host's VMM is {:?} (a saved state loads only into the release that saved it)",
            s.vmm_version, now.vmm_version
        ));
    }
    if s.image != now.image {
        why.push(format!(
            "its image was {}, it is now {}",
            s.image, now.image
        ));
    }
    if s.kernel != now.kernel {
        why.push(format!(
            "its kernel was {}, it is now {}",
            s.kernel, now.kernel
        ));
    }
    if s.spec != rec.spec {
        why.push(format!(
            "the vm was {} then and is {} now (`banger vm set {}` it back first)",
            spec_text(&s.spec),
            spec_text(&rec.spec),
            rec.name
        ));
    }
    why.extend(damaged_files(&vm.snapshot(&s.id), &s.files));
    (!why.is_empty()).then(|| why.join("; "))
}

/// Put the snapshot's disks and saved state in the VM's place, as a suspended VM's (its
/// next start restores it): a rollback. See [`copy_in`]. Blocking.
pub fn restore_files(vm: &VmDir, id: &str) -> std::io::Result<()> {
    copy_in(&vm.snapshot(id), vm, true)
}

/// Put the disks and, with `state`, the saved state of the snapshot directory `from` in
/// the VM's place, as a suspended VM's: a rollback (its own snapshot), a fork's clone and a
/// warm start (a new VM's directory, made here). Copies (`from` stays as it was), all into
/// temporary names first and then renamed, the saved state last, so a copy that fails (a
/// full disk, a daemon's death) leaves the VM's files as they were, and a saved state
/// that is there is whole. The VMM must be gone. Blocking.
pub fn copy_in(from: &Path, vm: &VmDir, state: bool) -> std::io::Result<()> {
    let state_tmp = vm.saved_state_tmp();
    let remove = |d: &Path| match std::fs::remove_dir_all(d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    std::fs::create_dir_all(&vm.dir)?;
    // A suspended VM's own saved state is replaced only once the copies are whole.
    remove(&state_tmp)?;
    let staged: Vec<(PathBuf, PathBuf)> = DISKS
        .iter()
        .map(|d| (vm.dir.join(format!("{d}.incoming")), vm.dir.join(d)))
        .collect();
    let copy = || -> std::io::Result<()> {
        if state {
            std::fs::create_dir_all(&state_tmp)?;
            for e in std::fs::read_dir(from.join(STATE))? {
                let e = e?;
                disks::copy_sparse(&e.path(), &state_tmp.join(e.file_name()), 0o600)?;
            }
        }
        for (name, (tmp, _)) in DISKS.iter().zip(&staged) {
            let _ = std::fs::remove_file(tmp);
            disks::copy_sparse(&from.join(name), tmp, 0o644)?;
        }
        Ok(())
    };
    if let Err(e) = copy() {
        let _ = std::fs::remove_dir_all(&state_tmp);
        for (tmp, _) in &staged {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }
    for (tmp, disk) in &staged {
        std::fs::rename(tmp, disk)?;
    }
    if state {
        remove(&vm.saved_state())?;
        std::fs::rename(&state_tmp, vm.saved_state())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::VmmKind;

    fn rec() -> VmRecord {
        let json = serde_json::json!({
            "id": "abc", "name": "a", "image": "img", "kernel": "k", "vmm": "qemu",
            "spec": {"vcpu": 1, "memory_mib": 256, "disk_bytes": 1u64 << 30},
            "nat": false, "state": "running", "error": null, "created_at": 1,
            "started_at": null, "cmdline": null, "runtime": null
        });
        serde_json::from_value(json).unwrap()
    }

    fn snap(rec: &VmRecord, files: Vec<(String, u64)>) -> SnapshotRecord {
        SnapshotRecord {
            id: "s1".into(),
            name: "one".into(),
            created_at: 2,
            vmm: VmmKind::Qemu,
            vmm_version: "QEMU emulator version 10.0.2".into(),
            image: "img@1".into(),
            kernel: "k@1".into(),
            spec: rec.spec,
            files,
        }
    }

    fn now() -> Current {
        Current {
            vmm_version: "QEMU emulator version 10.0.2".into(),
            image: "img@1".into(),
            kernel: "k@1".into(),
        }
    }

    #[test]
    fn names_are_checked_and_generated_names_are_free() {
        for ok in ["snap-1", "before.upgrade", "a_b", "9"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-a", ".a", "A", "a b", "a/b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        let r = rec();
        let mut taken = vec![snap(&r, vec![])];
        taken[0].name = "snap-1".into();
        assert_eq!(generated_name(&taken), "snap-2");
        assert_eq!(generated_name(&[]), "snap-1");
    }

    #[test]
    fn a_snapshot_is_taken_renamed_whole_and_restored_as_a_suspended_vms_state() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = VmDir::new(tmp.path(), "abc");
        std::fs::create_dir_all(&vm.dir).unwrap();
        std::fs::write(vm.overlay(), b"overlay then").unwrap();
        std::fs::write(vm.work(), b"work then").unwrap();
        let state = begin(&vm, "s1").unwrap();
        std::fs::write(state.join("vm.state"), b"memory").unwrap();
        let files = finish(&vm, "s1").unwrap();
        assert_eq!(
            files,
            vec![
                ("overlay.ext4".to_owned(), 12),
                ("state/vm.state".to_owned(), 6),
                ("work.ext4".to_owned(), 9)
            ]
        );
        assert!(!tmp_dir(&vm, "s1").exists());
        let mut r = rec();
        r.snapshots.push(snap(&r, files));
        let s = r.snapshots[0].clone();
        assert_eq!(mismatch(&r, &vm, &s, &now()), None);

        // The VM moves on, then is put back.
        std::fs::write(vm.overlay(), b"overlay later, longer").unwrap();
        std::fs::write(vm.work(), b"work later").unwrap();
        restore_files(&vm, "s1").unwrap();
        assert_eq!(std::fs::read(vm.overlay()).unwrap(), b"overlay then");
        assert_eq!(std::fs::read(vm.work()).unwrap(), b"work then");
        assert_eq!(
            std::fs::read(vm.saved_state().join("vm.state")).unwrap(),
            b"memory"
        );
        // The snapshot is kept as it was: a second rollback finds it whole.
        assert_eq!(mismatch(&r, &vm, &s, &now()), None);
        let info = info(&r, &vm, &s);
        assert_eq!((info.name.as_str(), info.vm.as_str()), ("one", "a"));
        assert!(info.bytes > 0);
    }

    #[test]
    fn a_restore_that_cannot_copy_leaves_the_vms_files_as_they_were() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = VmDir::new(tmp.path(), "abc");
        std::fs::create_dir_all(&vm.dir).unwrap();
        std::fs::write(vm.overlay(), b"o").unwrap();
        std::fs::write(vm.work(), b"w").unwrap();
        begin(&vm, "s1").unwrap();
        finish(&vm, "s1").unwrap();
        std::fs::write(vm.overlay(), b"overlay now").unwrap();
        // Suspended: its own saved state must survive a rollback that fails.
        std::fs::create_dir_all(vm.saved_state()).unwrap();
        std::fs::write(vm.saved_state().join("vm.state"), b"its own").unwrap();
        // The snapshot's work disk is gone: the copy fails after the overlay's.
        std::fs::remove_file(vm.snapshot("s1").join("work.ext4")).unwrap();
        assert!(restore_files(&vm, "s1").is_err());
        assert_eq!(std::fs::read(vm.overlay()).unwrap(), b"overlay now");
        assert_eq!(
            std::fs::read(vm.saved_state().join("vm.state")).unwrap(),
            b"its own"
        );
        assert!(!vm.saved_state_tmp().exists());
        let left: Vec<_> = std::fs::read_dir(&vm.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".incoming"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn every_difference_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = VmDir::new(tmp.path(), "abc");
        std::fs::create_dir_all(vm.snapshot("s1")).unwrap();
        std::fs::write(vm.snapshot("s1").join("overlay.ext4"), b"short").unwrap();
        let mut r = rec();
        let s = snap(
            &r,
            vec![("overlay.ext4".into(), 99), ("work.ext4".into(), 1)],
        );
        r.spec.memory_mib = 512;
        let later = Current {
            vmm_version: "QEMU emulator version 10.1.0".into(),
            image: "img@7".into(),
            kernel: "k@1".into(),
        };
        let why = mismatch(&r, &vm, &s, &later).unwrap();
        for part in [
            "10.1.0",
            "its image was img@1, it is now img@7",
            "1 vCPU, 256 MiB",
            "1 vCPU, 512 MiB",
            "banger vm set a",
            "overlay.ext4 is 5 bytes, it was 99",
            "work.ext4",
        ] {
            assert!(why.contains(part), "{part:?} not in {why}");
        }
        assert!(!why.contains("kernel"), "{why}");
        r.vmm = VmmKind::Firecracker;
        let why = mismatch(&r, &vm, &s, &later).unwrap();
        assert!(
            why.contains("under qemu, the vm now runs under firecracker"),
            "{why}"
        );
        assert!(!why.contains("10.1.0"), "{why}");
    }

    #[test]
    fn a_sweep_removes_what_no_record_names() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = VmDir::new(tmp.path(), "abc");
        for d in ["s1", "s2", "s3.tmp"] {
            std::fs::create_dir_all(vm.snapshot(d)).unwrap();
        }
        let mut r = rec();
        r.snapshots.push(snap(&r, vec![]));
        let mut removed = sweep(&r, &vm);
        removed.sort();
        assert_eq!(removed, vec!["s2", "s3.tmp"]);
        assert!(vm.snapshot("s1").is_dir());
    }
}
