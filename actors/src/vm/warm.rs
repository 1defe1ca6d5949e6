//! Warm starts: a `vm create` / `vm run` that restores a saved, booted guest instead of
//! booting one (see `docs/warm.md`).
//!
//! A *warm snapshot* is an image booted once (`image warm`, or after a first cold boot
//! when `[vm_defaults] auto_warm` is on) by a *maker* VM whose tap never joins the bridge
//! and whose name (`warm-<hex>`) is its only identity, saved once its agent answers, as a
//! fork's snapshot is ([`crate::root::Tree::warm_image`]), and kept under
//! `<data>/warm/<id>/` with a [`WarmRecord`] in the store. The maker is then deleted.
//!
//! A create whose image and kernel (`<name>@<registered_at>`: a replaced image or kernel
//! has a new one), VMM, size and network ([`Key`]), this host's VMM release and this
//! banger's version all match a warm snapshot's is written `suspended` with `warm` (the
//! snapshot's id) and `clone_of` (the warm guest's address), and its start copies the
//! snapshot's files into its directory (`vm::snapshot::copy_in`) and restores them: the guest then
//! takes the new VM's identity through its agent and only then does its tap join the
//! bridge, exactly as for a fork's clone (`vm::fork`). Everything else of the create (its
//! name, lease, egress, published ports, deadline, `file_sync` at its first start) is the
//! create's own. `--cold` boots regardless.
//!
//! A warm snapshot whose files are missing or truncated is removed and the create boots
//! cold, with a warning. One whose image or kernel is gone or was replaced is stale: it is
//! removed when the image or kernel is deleted, and by any listing or lookup that finds it
//! ([`stale`]). Directories no record names (a `image warm` cut short) are swept at the
//! daemon's start (`vm::fork::sweep_unrecorded`).

use std::path::{Path, PathBuf};

use banger_api::{VmSpec, VmmKind, WarmInfo};
use serde::{Deserialize, Serialize};

use super::snapshot;

/// A stored warm snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmRecord {
    /// 12 hex digits, its directory's name under `<data>/warm/`.
    pub id: String,
    /// `<name>@<registered_at>` of the image and kernel it booted.
    pub image: String,
    pub kernel: String,
    pub vmm: VmmKind,
    /// The VMM's `--version` line: a saved state loads only into the release that saved it.
    pub vmm_version: String,
    pub spec: VmSpec,
    /// Whether it has a NIC (a restore brings back the devices that were saved).
    pub network: bool,
    /// The warm guest's address with its prefix (`172.30.0.9/24`), which a VM restored
    /// from it gives up for its own.
    pub address: Option<String>,
    /// The banger that made it: its guest agent is in the saved memory, so another
    /// banger's warm snapshot is not used.
    pub banger: String,
    pub created_at: u64,
    /// Each file (its path under the directory) with its length.
    pub files: Vec<(String, u64)>,
}

/// What a VM being created asks of a warm snapshot (with the VMM release, checked apart:
/// finding it out runs the VMM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub image: String,
    pub kernel: String,
    pub vmm: VmmKind,
    pub spec: VmSpec,
    pub network: bool,
}

/// Where a daemon with data directory `data_dir` keeps its warm snapshots.
pub fn base(data_dir: &Path) -> PathBuf {
    data_dir.join("warm")
}

/// The key a VM of `image`, `kernel`, `vmm`, `spec` and a network or not would ask for
/// now; None when its image or kernel is gone. Blocking (it reads the store).
pub fn key_now(
    store: &crate::store::Store,
    image: &str,
    kernel: &str,
    vmm: VmmKind,
    spec: VmSpec,
    network: bool,
) -> Result<Option<Key>, crate::store::StoreError> {
    let (image, kernel) = snapshot::stamps(store, image, kernel)?;
    Ok(image.zip(kernel).map(|(image, kernel)| Key {
        image,
        kernel,
        vmm,
        spec,
        network,
    }))
}

/// The banger version a warm snapshot made now records.
pub fn banger_version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

impl WarmRecord {
    pub fn key(&self) -> Key {
        Key {
            image: self.image.clone(),
            kernel: self.kernel.clone(),
            vmm: self.vmm,
            spec: self.spec,
            network: self.network,
        }
    }

    /// The image's name (without its `@registered_at`).
    pub fn image_name(&self) -> &str {
        banger_api::stamped_name(&self.image)
    }

    pub fn kernel_name(&self) -> &str {
        banger_api::stamped_name(&self.kernel)
    }

    /// What `image warm list` shows. Blocking (it sizes the files).
    pub fn info(&self, base: &Path) -> WarmInfo {
        let d = dir(base, &self.id);
        WarmInfo {
            id: self.id.clone(),
            image: self.image.clone(),
            kernel: self.kernel.clone(),
            vmm: self.vmm,
            vmm_version: self.vmm_version.clone(),
            spec: self.spec,
            network: self.network,
            created_at: self.created_at,
            bytes: snapshot::allocated(&d, &self.files),
            dir: d.display().to_string(),
        }
    }
}

/// The directory of warm snapshot `id`.
pub fn dir(base: &Path, id: &str) -> PathBuf {
    base.join(id)
}

/// Why `rec` is stale given the image's and kernel's `<name>@<registered_at>` now (None
/// for a record that is gone): its image or kernel was deleted or replaced.
pub fn stale(
    rec: &WarmRecord,
    image_now: Option<&str>,
    kernel_now: Option<&str>,
) -> Option<String> {
    match (image_now, kernel_now) {
        (None, _) => Some(format!("its image {} is gone", rec.image_name())),
        (_, None) => Some(format!("its kernel {} is gone", rec.kernel_name())),
        (Some(i), _) if i != rec.image => {
            Some(format!("its image was {}, it is now {i}", rec.image))
        }
        (_, Some(k)) if k != rec.kernel => {
            Some(format!("its kernel was {}, it is now {k}", rec.kernel))
        }
        _ => None,
    }
}

/// Forget warm snapshot `id`, then remove its files.
pub fn remove(
    db: &crate::store::Store,
    base: &std::path::Path,
    id: &str,
) -> Result<(), crate::store::StoreError> {
    db.delete_warm(id)?;
    match std::fs::remove_dir_all(dir(base, id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(warm = %id, error = %e, "removing a warm snapshot's files");
        }
        _ => {}
    }
    Ok(())
}

/// What is wrong with the warm snapshot's files (missing or not the length saved), None
/// when they are whole. Blocking.
pub fn damaged(base: &Path, rec: &WarmRecord) -> Option<String> {
    let why = snapshot::damaged_files(&dir(base, &rec.id), &rec.files);
    (!why.is_empty()).then(|| why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::disks::VmDir;
    use crate::vm::snapshot::STATE;

    fn rec() -> WarmRecord {
        WarmRecord {
            id: "0123456789ab".into(),
            image: "debian@10".into(),
            kernel: "k@7".into(),
            vmm: VmmKind::Qemu,
            vmm_version: "QEMU emulator version 10.0.2".into(),
            spec: VmSpec {
                vcpu: 1,
                memory_mib: 512,
                disk_bytes: 1 << 30,
            },
            network: true,
            address: Some("172.30.0.9/24".into()),
            banger: banger_version(),
            created_at: 1,
            files: Vec::new(),
        }
    }

    #[test]
    fn a_replaced_or_deleted_image_or_kernel_makes_it_stale() {
        let r = rec();
        assert_eq!(stale(&r, Some("debian@10"), Some("k@7")), None);
        assert!(
            stale(&r, None, Some("k@7"))
                .unwrap()
                .contains("image debian is gone")
        );
        assert!(
            stale(&r, Some("debian@10"), None)
                .unwrap()
                .contains("kernel k is gone")
        );
        assert!(
            stale(&r, Some("debian@11"), Some("k@7"))
                .unwrap()
                .contains("now debian@11")
        );
        assert!(
            stale(&r, Some("debian@10"), Some("k@8"))
                .unwrap()
                .contains("now k@8")
        );
        assert_eq!(r.image_name(), "debian");
    }

    #[test]
    fn a_copy_lands_whole_and_a_damaged_snapshot_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("warm");
        let w = dir(&base, "0123456789ab");
        std::fs::create_dir_all(w.join(STATE)).unwrap();
        for (f, body) in [
            ("overlay.ext4", &b"overlay"[..]),
            ("work.ext4", b"work"),
            ("state/vm.state", b"memory"),
        ] {
            std::fs::write(w.join(f), body).unwrap();
        }
        let mut r = rec();
        r.files = [("overlay.ext4", 7), ("state/vm.state", 6), ("work.ext4", 4)]
            .map(|(f, len)| (f.to_owned(), len))
            .to_vec();
        assert_eq!(damaged(&base, &r), None);
        let vm = VmDir::new(&tmp.path().join("vms"), "ba9876543210");
        snapshot::copy_in(&w, &vm, true).unwrap();
        assert_eq!(std::fs::read(vm.overlay()).unwrap(), b"overlay");
        assert_eq!(std::fs::read(vm.work()).unwrap(), b"work");
        assert_eq!(
            std::fs::read(vm.saved_state().join("vm.state")).unwrap(),
            b"memory"
        );
        assert!(!vm.saved_state_tmp().exists());
        // The snapshot stays as it was, for the next VM.
        assert_eq!(damaged(&base, &r), None);
        // The disks alone (QEMU loads the snapshot's saved state in place).
        let disks_only = VmDir::new(&tmp.path().join("vms"), "bbbbbbbbbbbb");
        snapshot::copy_in(&w, &disks_only, false).unwrap();
        assert_eq!(std::fs::read(disks_only.work()).unwrap(), b"work");
        assert!(!disks_only.saved_state().exists());

        // A state file gone: named; a copy of it leaves no saved state that looks whole.
        std::fs::remove_file(w.join("state/vm.state")).unwrap();
        std::fs::write(w.join("work.ext4"), b"wor").unwrap();
        let why = damaged(&base, &r).unwrap();
        assert!(
            why.contains("vm.state") && why.contains("work.ext4 is 3 bytes"),
            "{why}"
        );
        std::fs::remove_dir_all(w.join(STATE)).unwrap();
        let other = VmDir::new(&tmp.path().join("vms"), "aaaaaaaaaaaa");
        assert!(snapshot::copy_in(&w, &other, true).is_err());
        assert!(!other.saved_state().exists() && !other.saved_state_tmp().exists());
        assert!(!other.overlay().exists() && !other.work().exists());
    }
}
