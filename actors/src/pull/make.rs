//! Making catalog bundles (`banger internal make-bundle`): the publishing side of
//! [`super::bundle`]. Blocking; runs in the CLI, not in the daemon.
//!
//! - image: a root filesystem tar (e.g. `docker export` of the golden image; plain, gzip or
//!   zstd) is replayed like a one-layer OCI image ([`super::layers`]: refusals, owners,
//!   modes, xattrs), `/.dockerenv` removed, `banger-init` and `banger-agent` added, the ext4
//!   built with `mkfs.ext4 -d`, and bundled with a `manifest.json` naming the kernel.
//! - kernel: `vmlinux` (or `vmlinuz`), optional `initrd` and `modules/` from a directory;
//!   symlinks that leave `modules/` (a distribution's `build` and `source` links) are left
//!   out, since a pull would refuse them.
//!
//! The bundle is written to `<out>.partial` and renamed when complete.

use std::path::{Path, PathBuf};

use super::PullError;
use super::layers::{Owners, Replay};

/// A finished bundle: what a catalog entry needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// Paths left out (kernel: escaping symlinks).
    pub skipped: Vec<String>,
}

fn build(detail: impl Into<String>) -> PullError {
    PullError::Build(detail.into())
}

fn write_bundle(files: &[(String, PathBuf)], out: &Path) -> Result<(u64, String), PullError> {
    let partial = out.with_extension("partial");
    let result = (|| {
        let mut f = std::fs::File::create(&partial).map_err(PullError::io(&partial))?;
        let r = super::bundle::make_bundle(files, &mut f).map_err(PullError::io(&partial))?;
        f.sync_all().map_err(PullError::io(&partial))?;
        std::fs::rename(&partial, out).map_err(PullError::io(out))?;
        Ok(r)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Build an image bundle from a root filesystem tar.
pub fn image_bundle(
    rootfs_tar: &Path,
    out: &Path,
    name: &str,
    kernel_ref: Option<&str>,
    guest_dir: &Path,
    size: Option<u64>,
) -> Result<Made, PullError> {
    crate::image::validate_name(name)?;
    super::guest::check_dir(guest_dir)?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let work = tempfile::Builder::new()
        .prefix(".make-bundle-")
        .tempdir_in(parent)
        .map_err(PullError::io(parent))?;
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).map_err(PullError::io(&tree))?;
    let mut replay = Replay::new(&tree, Owners::detect());
    let reader = super::layers::open_layer(rootfs_tar).map_err(PullError::io(rootfs_tar))?;
    replay
        .apply(reader)
        .map_err(|e| build(format!("{}: {e}", rootfs_tar.display())))?;
    replay.delete(Path::new(".dockerenv")).map_err(build)?;
    for b in super::oci::GUEST_BINARIES {
        replay
            .inject(
                &Path::new(super::oci::GUEST_DIR).join(b),
                &guest_dir.join(b),
                0o755,
            )
            .map_err(build)?;
    }
    let owners = replay.finish().map_err(build)?;
    let (bytes, inodes) = super::ext4::content_size(&tree).map_err(PullError::io(&tree))?;
    let img = work.path().join("rootfs.ext4");
    let size = size.unwrap_or_else(|| super::ext4::auto_size(bytes, inodes));
    super::ext4::mkfs(&tree, &img, size, inodes).map_err(build)?;
    if !owners.is_empty() {
        super::ext4::set_owners(&img, &owners).map_err(build)?;
    }
    let manifest = work.path().join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec_pretty(&serde_json::json!({
            "name": name,
            "arch": "x86_64",
            "kernel_ref": kernel_ref,
            "built_at": crate::store::now_secs(),
        }))
        .expect("json"),
    )
    .map_err(PullError::io(&manifest))?;
    let (size, sha256) = write_bundle(
        &[
            ("rootfs.ext4".into(), img),
            ("manifest.json".into(), manifest),
        ],
        out,
    )?;
    Ok(Made {
        path: out.to_owned(),
        size,
        sha256,
        skipped: Vec::new(),
    })
}

/// Build a kernel bundle from a directory with `vmlinux` or `vmlinuz`, and optionally
/// `initrd`, `config` and `modules/`.
pub fn kernel_bundle(from: &Path, out: &Path) -> Result<Made, PullError> {
    let main: Vec<&str> = ["vmlinux", "vmlinuz"]
        .into_iter()
        .filter(|f| from.join(f).is_file())
        .collect();
    let main = match main.as_slice() {
        [one] => *one,
        [] => {
            return Err(build(format!(
                "{} has no vmlinux or vmlinuz",
                from.display()
            )));
        }
        _ => {
            return Err(build(format!(
                "{} has both vmlinux and vmlinuz; keep one",
                from.display()
            )));
        }
    };
    let mut files = vec![(main.to_owned(), from.join(main))];
    for extra in ["initrd", "config"] {
        if from.join(extra).is_file() {
            files.push((extra.into(), from.join(extra)));
        }
    }
    let mut skipped = Vec::new();
    let modules = from.join("modules");
    if modules.is_dir() {
        // A directory entry (empty path), then the entries below it one by one, so escaping
        // symlinks can be left out.
        files.push(("modules".into(), PathBuf::new()));
        let mut stack = vec![PathBuf::from("modules")];
        let mut listed = Vec::new();
        while let Some(rel) = stack.pop() {
            for e in std::fs::read_dir(from.join(&rel)).map_err(PullError::io(&rel))? {
                let e = e.map_err(PullError::io(&rel))?;
                let child = rel.join(e.file_name());
                let ft = e.file_type().map_err(PullError::io(&child))?;
                if ft.is_symlink() {
                    let target = std::fs::read_link(e.path()).map_err(PullError::io(&child))?;
                    if !super::bundle::link_stays_within(&child, &target, Path::new("modules")) {
                        skipped.push(child.display().to_string());
                        continue;
                    }
                } else if ft.is_dir() {
                    stack.push(child.clone());
                } else if !ft.is_file() {
                    skipped.push(child.display().to_string());
                    continue;
                }
                listed.push(child);
            }
        }
        files.extend(listed.into_iter().map(|rel| {
            let abs = from.join(&rel);
            (rel.display().to_string(), abs)
        }));
    }
    let (size, sha256) = write_kernel(&files, out)?;
    Ok(Made {
        path: out.to_owned(),
        size,
        sha256,
        skipped,
    })
}

/// Like [`write_bundle`], but directories are added as entries only (their contents are
/// listed by the caller); an empty path is a directory entry of that name.
fn write_kernel(files: &[(String, PathBuf)], out: &Path) -> Result<(u64, String), PullError> {
    use sha2::Digest;
    use std::io::Write;
    let partial = out.with_extension("partial");
    let result = (|| -> std::io::Result<(u64, String)> {
        struct Tee<W> {
            w: W,
            h: sha2::Sha256,
            n: u64,
        }
        impl<W: Write> Write for Tee<W> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let n = self.w.write(b)?;
                self.h.update(&b[..n]);
                self.n += n as u64;
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.w.flush()
            }
        }
        let mut tee = Tee {
            w: std::fs::File::create(&partial)?,
            h: sha2::Sha256::new(),
            n: 0,
        };
        {
            let enc = zstd::stream::write::Encoder::new(&mut tee, 3)?;
            let mut tar = tar::Builder::new(enc);
            tar.follow_symlinks(false);
            for (name, path) in files {
                if path.as_os_str().is_empty() || std::fs::symlink_metadata(path)?.is_dir() {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    tar.append_data(&mut h, name, std::io::empty())?;
                } else {
                    tar.append_path_with_name(path, name)?;
                }
            }
            tar.into_inner()?.finish()?;
        }
        tee.flush()?;
        tee.w.sync_all()?;
        let sha = super::bundle::hex(&tee.h.finalize());
        std::fs::rename(&partial, out)?;
        Ok((tee.n, sha))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result.map_err(PullError::io(out))
}
