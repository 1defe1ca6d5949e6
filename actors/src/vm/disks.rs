//! A VM's directory and disks. No device-mapper: the image's `rootfs.ext4` is attached
//! read-only and shared; each VM gets two sparse ext4 files made by `mkfs.ext4` (about 10
//! ms each, no root needed): the overlay (the upper layer of `/`, labelled `bg-overlay`)
//! and the work disk (mounted at `/root`, labelled `bg-work`). Stop keeps both; delete
//! removes the directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use banger_api::units::human_bytes;

use super::cmdline::{OVERLAY_LABEL, WORK_LABEL};

/// Size of the overlay disk: sparse, so it costs only what the guest writes to `/`.
pub const OVERLAY_BYTES: u64 = 16 << 30;

/// Errors making or changing disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed on {path}: {output}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        output: String,
    },
    #[error(
        "the work disk is {}; it can only grow (asked for {})",
        human_bytes(*current),
        human_bytes(*asked)
    )]
    Shrink { current: u64, asked: u64 },
}

/// The files of one VM under `<data>/vms/<id>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir {
    pub dir: PathBuf,
}

impl VmDir {
    pub fn new(vms_dir: &Path, id: &str) -> VmDir {
        VmDir {
            dir: vms_dir.join(id),
        }
    }
    pub fn overlay(&self) -> PathBuf {
        self.dir.join("overlay.ext4")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work.ext4")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The previous console generation (see [`rotate_console`]).
    pub fn console_old(&self) -> PathBuf {
        self.dir.join("console.log.1")
    }
    /// The saved state of a suspended VM (`vm suspend`): what the VMM wrote, restored and
    /// then removed by the next `vm start`.
    pub fn saved_state(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// Where a save in progress writes; renamed to [`Self::saved_state`] once complete, so
    /// a save that fails (or a daemon that dies mid-save) leaves no half-written state.
    pub fn saved_state_tmp(&self) -> PathBuf {
        self.dir.join("state.tmp")
    }
    /// The VM's named snapshots (`vm snapshot create`), one directory each, named by the
    /// snapshot's id (see [`super::snapshot`]).
    pub fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }
    pub fn snapshot(&self, id: &str) -> PathBuf {
        self.snapshots().join(id)
    }
    /// Runtime files (sockets, pid files) live in `run/`, emptied on every start.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.to_owned();
    move |source| DiskError::Io { path, source }
}

fn run(tool: &'static str, cmd: &mut Command, path: &Path) -> Result<(), DiskError> {
    let out = cmd.output().map_err(io(path))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DiskError::Tool {
            tool,
            path: path.to_owned(),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn mkfs_command(path: &Path, label: &str) -> Command {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args([
        "-q",
        "-F",
        "-L",
        label,
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
    ])
    .arg(path);
    cmd
}

/// Make a sparse file of `bytes` and an empty ext4 on it.
fn make_disk(path: &Path, bytes: u64, label: &str) -> Result<std::process::Child, DiskError> {
    let f = std::fs::File::create(path).map_err(io(path))?;
    f.set_len(bytes).map_err(io(path))?;
    mkfs_command(path, label)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(io(path))
}

/// Create the VM directory with its two disks (both mkfs run in parallel). Blocking.
/// If either mkfs fails, both disk files are removed, so a later start makes them afresh
/// instead of booting half-made disks.
pub fn create(vm: &VmDir, work_bytes: u64) -> Result<(), DiskError> {
    std::fs::create_dir_all(vm.run_dir()).map_err(io(&vm.dir))?;
    std::fs::File::create(vm.console()).map_err(io(&vm.console()))?;
    let result = (|| {
        let overlay = make_disk(&vm.overlay(), OVERLAY_BYTES, OVERLAY_LABEL)?;
        let mut children = vec![(overlay, vm.overlay())];
        // If the second cannot start, the first is still waited for (and reaped).
        let mut err = match make_disk(&vm.work(), work_bytes, WORK_LABEL) {
            Ok(w) => {
                children.push((w, vm.work()));
                None
            }
            Err(e) => Some(e),
        };
        for (child, path) in children {
            let out = child.wait_with_output().map_err(io(&path))?;
            if !out.status.success() && err.is_none() {
                err = Some(DiskError::Tool {
                    tool: "mkfs.ext4",
                    path,
                    output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
        }
        err.map_or(Ok(()), Err)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(vm.overlay());
        let _ = std::fs::remove_file(vm.work());
    }
    result
}

/// Grow the work disk to `bytes` (the VM must be stopped). Blocking.
pub fn grow_work(vm: &VmDir, bytes: u64) -> Result<(), DiskError> {
    let path = vm.work();
    let current = std::fs::metadata(&path).map_err(io(&path))?.len();
    if bytes < current {
        return Err(DiskError::Shrink {
            current,
            asked: bytes,
        });
    }
    // The same size is done only when the filesystem fills the file: a resize cut after
    // the file grew (the daemon killed before resize2fs ended) is finished by asking again.
    if bytes == current && fs_bytes(&path)? >= current {
        return Ok(());
    }
    // resize2fs insists on a freshly checked filesystem.
    let out = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(&path)
        .output()
        .map_err(io(&path))?;
    // e2fsck: 0 clean, 1 errors corrected; anything else is a real problem.
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(DiskError::Tool {
            tool: "e2fsck",
            path,
            output: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        });
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(bytes))
        .map_err(io(&path))?;
    super::actor::die_at("mid-resize");
    run("resize2fs", Command::new("resize2fs").arg(&path), &path)
}

/// The size of the ext4 filesystem on `path` (block count × block size, from its
/// superblock as `dumpe2fs -h` prints it).
pub fn fs_bytes(path: &Path) -> Result<u64, DiskError> {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(path)
        .output()
        .map_err(io(path))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(n), Some(size)) if out.status.success() => Ok(n * size),
        _ => Err(DiskError::Tool {
            tool: "dumpe2fs",
            path: path.to_owned(),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

/// Largest console.log before it is rotated.
pub const CONSOLE_MAX: u64 = 8 << 20;

/// Copy-truncate rotation: when `console` is over `max`, copy it to `old` and empty it.
/// The VMM keeps writing through its O_APPEND descriptor, so its next bytes land at the new
/// start of the file. As with logrotate's copytruncate, bytes the VMM writes between the
/// copy and the truncation are lost (a window of one file copy). Returns whether it rotated.
pub fn rotate_console(console: &Path, old: &Path, max: u64) -> std::io::Result<bool> {
    if std::fs::metadata(console)?.len() <= max {
        return Ok(false);
    }
    std::fs::copy(console, old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(console)?
        .set_len(0)?;
    Ok(true)
}

/// Bytes actually allocated on the host for `path` (sparse files report their size in
/// `len`, their cost in blocks).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Copy `from` to a new file `to` (mode `mode`) of the same length, copying only its
/// data: the holes of a sparse file (a VM disk, a saved memory file) are found with
/// `SEEK_DATA`/`SEEK_HOLE` and stay holes, and each data extent is copied in the kernel
/// with `copy_file_range` (a reflink where the filesystem shares extents, an in-kernel
/// copy otherwise). Never reads a hole. Blocking. Returns the bytes of data copied. A
/// failed copy removes `to`.
pub fn copy_sparse(from: &Path, to: &Path, mode: u32) -> std::io::Result<u64> {
    use nix::unistd::{Whence, lseek};
    use std::os::unix::fs::OpenOptionsExt;
    let src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)?;
    let copy = || -> std::io::Result<u64> {
        dst.set_len(len)?;
        let (mut copied, mut pos) = (0u64, 0i64);
        let end = len as i64;
        while pos < end {
            let data = match lseek(&src, pos, Whence::SeekData) {
                Ok(d) => d,
                // No data after pos: the rest is a hole.
                Err(nix::errno::Errno::ENXIO) => break,
                Err(e) => return Err(e.into()),
            };
            let hole = lseek(&src, data, Whence::SeekHole)?.min(end);
            let (mut off_in, mut off_out) = (data, data);
            while off_in < hole {
                let want = usize::try_from(hole - off_in)
                    .unwrap_or(usize::MAX)
                    .min(1 << 30);
                let n = nix::fcntl::copy_file_range(
                    &src,
                    Some(&mut off_in),
                    &dst,
                    Some(&mut off_out),
                    want,
                )?;
                if n == 0 {
                    // The source shrank under us.
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} changed while it was copied", from.display()),
                    ));
                }
                copied += n as u64;
            }
            pos = hole;
        }
        dst.sync_all()?;
        Ok(copied)
    };
    copy().inspect_err(|_| {
        let _ = std::fs::remove_file(to);
    })
}

/// Bytes free for an unprivileged writer on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Remove everything of a VM. Blocking.
pub fn remove(vm: &VmDir) -> Result<(), DiskError> {
    match std::fs::remove_dir_all(&vm.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DiskError::Io {
            path: vm.dir.clone(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(path: &Path) -> String {
        let out = Command::new("e2label").arg(path).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn a_sparse_copy_keeps_the_data_the_holes_and_the_length() {
        use std::io::{Seek, SeekFrom, Write};
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (from, to) = (tmp.path().join("a"), tmp.path().join("b"));
        let mut f = std::fs::File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(32 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        let copied = copy_sparse(&from, &to, 0o600).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        // Only the extents with data: 3 of them, each at most a few blocks.
        assert!(
            (4 + 8192 + 3..=3 * (64 << 10)).contains(&copied),
            "{copied}"
        );
        assert!(allocated(&to) <= 1 << 20, "{}", allocated(&to));
        let meta = std::fs::metadata(&to).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // A file with no data at all: all hole.
        let (empty, empty_copy) = (tmp.path().join("e"), tmp.path().join("f"));
        std::fs::File::create(&empty)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        assert_eq!(copy_sparse(&empty, &empty_copy, 0o600).unwrap(), 0);
        assert_eq!(std::fs::metadata(&empty_copy).unwrap().len(), 1 << 30);
        // An existing target is refused, not overwritten.
        assert!(copy_sparse(&from, &to, 0o600).is_err());
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
    }

    #[test]
    fn a_failed_mkfs_leaves_no_half_made_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = VmDir::new(tmp.path(), "abc");
        // 4 KiB is too small for an ext4 filesystem: mkfs refuses it.
        let err = create(&vm, 4096).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::Tool {
                    tool: "mkfs.ext4",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!vm.work().exists() && !vm.overlay().exists());
        create(&vm, 64 << 20).unwrap();
        assert!(crate::image::is_ext4(&vm.work()).unwrap());
    }

    #[test]
    fn the_console_rotates_and_the_writer_carries_on_at_the_start() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let vm = VmDir::new(tmp.path(), "abc");
        std::fs::create_dir_all(&vm.dir).unwrap();
        // The VMM's side: an O_APPEND descriptor that stays open.
        let mut vmm = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(vm.console())
            .unwrap();
        vmm.write_all(&[b'a'; 1000]).unwrap();
        assert!(!rotate_console(&vm.console(), &vm.console_old(), 4096).unwrap());
        vmm.write_all(&[b'b'; 4000]).unwrap();
        assert!(rotate_console(&vm.console(), &vm.console_old(), 4096).unwrap());
        assert_eq!(std::fs::metadata(vm.console_old()).unwrap().len(), 5000);
        assert_eq!(std::fs::metadata(vm.console()).unwrap().len(), 0);
        vmm.write_all(b"next line\n").unwrap();
        assert_eq!(
            std::fs::read(vm.console()).unwrap(),
            b"next line\n",
            "no hole, no old bytes"
        );
    }

    #[test]
    fn disks_are_sparse_labelled_ext4_and_grow() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = VmDir::new(tmp.path(), "abc");
        create(&vm, 2 << 30).unwrap();
        assert_eq!(std::fs::metadata(vm.work()).unwrap().len(), 2 << 30);
        assert_eq!(
            std::fs::metadata(vm.overlay()).unwrap().len(),
            OVERLAY_BYTES
        );
        assert!(
            allocated(&vm.work()) < 64 << 20,
            "sparse: {}",
            allocated(&vm.work())
        );
        assert!(allocated(&vm.overlay()) < 256 << 20, "sparse");
        assert!(crate::image::is_ext4(&vm.work()).unwrap());
        assert_eq!(label(&vm.work()), WORK_LABEL);
        assert_eq!(label(&vm.overlay()), OVERLAY_LABEL);
        assert!(vm.console().exists() && vm.run_dir().is_dir());

        grow_work(&vm, 3 << 30).unwrap();
        assert_eq!(std::fs::metadata(vm.work()).unwrap().len(), 3 << 30);
        assert_eq!(
            fs_bytes(&vm.work()).unwrap(),
            3 << 30,
            "the filesystem grew too"
        );
        // A resize cut after the file grew: asking again for the file's size finishes it.
        std::fs::OpenOptions::new()
            .write(true)
            .open(vm.work())
            .unwrap()
            .set_len(4 << 30)
            .unwrap();
        assert_eq!(fs_bytes(&vm.work()).unwrap(), 3 << 30);
        grow_work(&vm, 4 << 30).unwrap();
        assert_eq!(fs_bytes(&vm.work()).unwrap(), 4 << 30);
        assert!(matches!(
            grow_work(&vm, 1 << 30),
            Err(DiskError::Shrink { .. })
        ));

        remove(&vm).unwrap();
        assert!(!vm.dir.exists());
        remove(&vm).unwrap();
    }
}
