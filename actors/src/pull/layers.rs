//! Replaying OCI layers into a directory tree, oldest first, the way a container runtime's
//! overlay would see them, without ever following a link out of the tree.
//!
//! - Whiteouts: `.wh.<name>` removes `<name>` from the layers below; `.wh..wh..opq` in a
//!   directory hides everything the layers below put there (entries of the same layer
//!   stay, in whatever order the tar lists them).
//! - Refused (the whole pull fails with the entry named): absolute or `..` paths, an entry
//!   whose parent is a symlink (or a file) — "a symlink, then a file through it" —, a relative
//!   symlink that resolves above the root, a hard link to a path outside the tree or to
//!   something that is not a regular file in it. Absolute symlinks are kept as they are:
//!   they are resolved inside the guest.
//! - Kept: modes (setuid/setgid/sticky included), uid/gid, xattrs (PAX `SCHILY.xattr.*`).
//!   Owners are set with `lchown` when the daemon is root ([`Owners::Chown`]); otherwise
//!   they are recorded and applied to the ext4 afterwards with debugfs
//!   ([`Owners::Record`], see [`super::ext4::set_owners`]). Directory modes are applied at
//!   the end, so a read-only directory of a lower layer can still be written by the next.
//! - Skipped: device nodes, fifos and sockets (the guest's devtmpfs provides devices).
//!   Modification times are not kept (the files get the time of the pull).

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// How file owners are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners {
    /// `lchown` in the tree (the daemon is root).
    Chown,
    /// Record them, for debugfs on the finished ext4.
    Record,
}

impl Owners {
    /// `Chown` when the process may chown (CAP_CHOWN in force: root that kept its
    /// capabilities). A root bangerd drops every capability after forking its helper, so
    /// it records owners like any unprivileged daemon.
    pub fn detect() -> Owners {
        let cap_eff = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .unwrap_or(0);
        // CAP_CHOWN is capability 0.
        if cap_eff & 1 != 0 {
            Owners::Chown
        } else {
            Owners::Record
        }
    }
}

/// A tree being built from layers.
#[derive(Debug)]
pub struct Replay {
    root: PathBuf,
    owners: Owners,
    /// Relative path → (uid, gid), with [`Owners::Record`].
    recorded: HashMap<PathBuf, (u64, u64)>,
    /// Relative path → mode, applied in [`Replay::finish`].
    dir_modes: HashMap<PathBuf, u32>,
    /// Entries skipped (devices, fifos, …).
    pub skipped: u64,
    /// xattrs that could not be set (e.g. `security.*` when not root).
    pub xattr_failures: u64,
}

impl Replay {
    /// Replay into `root`, an empty directory.
    pub fn new(root: &Path, owners: Owners) -> Replay {
        Replay {
            root: root.to_owned(),
            owners,
            recorded: HashMap::new(),
            dir_modes: HashMap::new(),
            skipped: 0,
            xattr_failures: 0,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Apply one uncompressed layer tar.
    pub fn apply(&mut self, layer: impl Read) -> Result<(), String> {
        self.apply_inner(layer, true)
    }

    /// Apply a plain tar of a whole tree (a running guest's root, for `image promote`):
    /// the same checks and what is kept, but `.wh.` names are files like any other, not
    /// whiteouts (a merged root has none left).
    pub fn apply_tree(&mut self, tree: impl Read) -> Result<(), String> {
        self.apply_inner(tree, false)
    }

    fn apply_inner(&mut self, layer: impl Read, whiteouts: bool) -> Result<(), String> {
        let mut archive = tar::Archive::new(layer);
        let mut this_layer: HashSet<PathBuf> = HashSet::new();
        let mut opaque: Vec<PathBuf> = Vec::new();
        let entries = archive
            .entries()
            .map_err(|e| format!("not a tar archive: {e}"))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| format!("unreadable entry: {e}"))?;
            let raw = entry
                .path()
                .map_err(|e| format!("entry with an unreadable path: {e}"))?
                .into_owned();
            let Some(rel) = clean(&raw)? else {
                continue;
            };
            let file_name = rel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parent = rel.parent().unwrap_or(Path::new("")).to_owned();
            if whiteouts && file_name == ".wh..wh..opq" {
                self.check_parents(&rel, false)?;
                opaque.push(parent);
                continue;
            }
            if whiteouts && let Some(hidden) = file_name.strip_prefix(".wh.") {
                self.check_parents(&rel, false)?;
                self.remove(&parent.join(hidden))?;
                continue;
            }
            self.add(&mut entry, &rel)?;
            this_layer.insert(rel);
        }
        // Opaque directories: drop what the layers below put there.
        for dir in opaque {
            let abs = self.root.join(&dir);
            let Ok(rd) = std::fs::read_dir(&abs) else {
                continue;
            };
            for child in rd.flatten() {
                let rel = dir.join(child.file_name());
                if !this_layer.contains(&rel) {
                    self.remove(&rel)?;
                }
            }
        }
        Ok(())
    }

    /// Remove `rel` (a file, link or whole directory) if it exists.
    fn remove(&mut self, rel: &Path) -> Result<(), String> {
        let abs = self.root.join(rel);
        match std::fs::symlink_metadata(&abs) {
            Ok(m) if m.file_type().is_dir() => std::fs::remove_dir_all(&abs),
            Ok(_) => std::fs::remove_file(&abs),
            Err(_) => return Ok(()),
        }
        .map_err(|e| format!("cannot remove {}: {e}", rel.display()))?;
        self.recorded.retain(|p, _| !p.starts_with(rel));
        self.dir_modes.retain(|p, _| !p.starts_with(rel));
        Ok(())
    }

    /// Every parent of `rel` must be a real directory; missing ones are created (0755, root).
    fn check_parents(&mut self, rel: &Path, create: bool) -> Result<(), String> {
        let mut cur = PathBuf::new();
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        for c in parent.components() {
            cur.push(c);
            let abs = self.root.join(&cur);
            match std::fs::symlink_metadata(&abs) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "entry /{} goes through the symlink /{}",
                        rel.display(),
                        cur.display()
                    ));
                }
                Ok(_) => {
                    return Err(format!(
                        "entry /{} goes through /{}, which is not a directory",
                        rel.display(),
                        cur.display()
                    ));
                }
                Err(_) if create => {
                    std::fs::create_dir(&abs)
                        .map_err(|e| format!("cannot create /{}: {e}", cur.display()))?;
                    self.own(&cur, 0, 0)?;
                }
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    fn own(&mut self, rel: &Path, uid: u64, gid: u64) -> Result<(), String> {
        match self.owners {
            Owners::Chown => {
                let abs = self.root.join(rel);
                nix::unistd::fchownat(
                    nix::fcntl::AT_FDCWD,
                    &abs,
                    Some(nix::unistd::Uid::from_raw(uid as u32)),
                    Some(nix::unistd::Gid::from_raw(gid as u32)),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| format!("cannot chown /{}: {e}", rel.display()))
            }
            Owners::Record => {
                self.recorded.insert(rel.to_owned(), (uid, gid));
                Ok(())
            }
        }
    }

    fn add<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, rel: &Path) -> Result<(), String> {
        let header = entry.header();
        let ty = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let uid = header.uid().unwrap_or(0);
        let gid = header.gid().unwrap_or(0);
        if matches!(
            ty,
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo
        ) {
            self.skipped += 1;
            return Ok(());
        }
        self.check_parents(rel, true)?;
        let abs = self.root.join(rel);
        let existing = std::fs::symlink_metadata(&abs).ok();
        if let Some(m) = &existing
            && !(m.file_type().is_dir() && ty.is_dir())
        {
            self.remove(rel)?;
        }
        let shown = format!("/{}", rel.display());
        match ty {
            tar::EntryType::Directory => {
                if existing.as_ref().is_none_or(|m| !m.file_type().is_dir()) {
                    std::fs::create_dir(&abs).map_err(|e| format!("cannot create {shown}: {e}"))?;
                }
                self.own(rel, uid, gid)?;
                self.dir_modes.insert(rel.to_owned(), mode);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("unreadable link of {shown}: {e}"))?
                    .ok_or_else(|| format!("symlink {shown} has no target"))?
                    .into_owned();
                if !target.is_absolute() && escapes(rel, &target) {
                    return Err(format!(
                        "symlink {shown} -> {} escapes the image root",
                        target.display()
                    ));
                }
                std::os::unix::fs::symlink(&target, &abs)
                    .map_err(|e| format!("cannot create {shown}: {e}"))?;
                self.own(rel, uid, gid)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("unreadable link of {shown}: {e}"))?
                    .ok_or_else(|| format!("hard link {shown} has no target"))?
                    .into_owned();
                let outside = || {
                    format!(
                        "hard link {shown} -> {} points outside the image",
                        target.display()
                    )
                };
                let target_rel = clean(&target).map_err(|_| outside())?.ok_or_else(outside)?;
                self.check_parents(&target_rel, false)
                    .map_err(|_| outside())?;
                let target_abs = self.root.join(&target_rel);
                match std::fs::symlink_metadata(&target_abs) {
                    Ok(m) if m.file_type().is_file() => {}
                    _ => {
                        return Err(format!(
                            "hard link {shown} -> {} does not point at a file of the image",
                            target.display()
                        ));
                    }
                }
                std::fs::hard_link(&target_abs, &abs)
                    .map_err(|e| format!("cannot create {shown}: {e}"))?;
                // One inode, one owner: debugfs sets it through every name, so every name
                // must carry the file's (or the last one written would reset it to root).
                if let Some(o) = self.recorded.get(&target_rel).copied() {
                    self.recorded.insert(rel.to_owned(), o);
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                super::bundle::write_sparse(entry, &abs, 0o600)
                    .map_err(|e| format!("cannot write {shown}: {e}"))?;
                self.own(rel, uid, gid)?;
                // After chown, which clears setuid.
                std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("cannot chmod {shown}: {e}"))?;
            }
            _ => {
                self.skipped += 1;
                return Ok(());
            }
        }
        if !ty.is_symlink()
            && let Ok(Some(exts)) = entry.pax_extensions()
        {
            for ext in exts.flatten() {
                let Ok(key) = ext.key() else { continue };
                if let Some(name) = key.strip_prefix("SCHILY.xattr.")
                    && xattr::set(&abs, name, ext.value_bytes()).is_err()
                {
                    self.xattr_failures += 1;
                    tracing::debug!(path = %shown, xattr = name, "cannot set xattr");
                }
            }
        }
        Ok(())
    }

    /// Add a file from the host (banger's guest binaries), owned by root.
    pub fn inject(&mut self, rel: &Path, from: &Path, mode: u32) -> Result<(), String> {
        self.check_parents(rel, true)?;
        self.remove(rel)?;
        let abs = self.root.join(rel);
        let mut src = std::fs::File::open(from)
            .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
        super::bundle::write_sparse(&mut src, &abs, 0o600)
            .map_err(|e| format!("cannot write /{}: {e}", rel.display()))?;
        self.own(rel, 0, 0)?;
        std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot chmod /{}: {e}", rel.display()))
    }

    /// Remove a path if present (e.g. `/.dockerenv`).
    pub fn delete(&mut self, rel: &Path) -> Result<(), String> {
        self.remove(rel)
    }

    /// Apply directory modes (deepest first) and return the owners to set with debugfs:
    /// every path of the tree with its (uid, gid), root-owned unless recorded otherwise.
    /// Empty with [`Owners::Chown`].
    pub fn finish(self) -> Result<Vec<(PathBuf, u64, u64)>, String> {
        let mut dirs: Vec<_> = self.dir_modes.into_iter().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, mode) in dirs {
            let abs = self.root.join(&rel);
            std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot chmod /{}: {e}", rel.display()))?;
        }
        if self.owners == Owners::Chown {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        walk(&self.root, Path::new(""), &mut |rel| {
            let (u, g) = self.recorded.get(rel).copied().unwrap_or((0, 0));
            out.push((rel.to_owned(), u, g));
        })
        .map_err(|e| format!("cannot walk the tree: {e}"))?;
        Ok(out)
    }
}

fn walk(root: &Path, rel: &Path, f: &mut dyn FnMut(&Path)) -> std::io::Result<()> {
    for e in std::fs::read_dir(root.join(rel))? {
        let e = e?;
        let child = rel.join(e.file_name());
        f(&child);
        if e.file_type()?.is_dir() {
            walk(root, &child, f)?;
        }
    }
    Ok(())
}

/// A layer entry's path relative to the root, without `.`; `..` is refused. `None` for the
/// root itself.
fn clean(raw: &Path) -> Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::CurDir | Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!(
                    "entry {} escapes the image root (path traversal)",
                    raw.display()
                ));
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Whether relative symlink `link` → `target` resolves above the root.
fn escapes(link: &Path, target: &Path) -> bool {
    let mut depth = link.parent().map(|p| p.components().count()).unwrap_or(0) as i64;
    for c in target.components() {
        match c {
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    false
}

/// Open a layer blob, decompressing gzip or zstd by its magic bytes (plain tar otherwise).
pub fn open_layer(path: &Path) -> std::io::Result<Box<dyn Read + Send>> {
    use std::io::{BufRead, BufReader};
    let mut f = BufReader::with_capacity(256 * 1024, std::fs::File::open(path)?);
    let magic = f
        .fill_buf()?
        .get(..4)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(f))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::stream::read::Decoder::with_buffer(f)?)
    } else {
        Box::new(f)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_links() {
        assert!(!escapes(Path::new("a/b/link"), Path::new("../c")));
        assert!(!escapes(Path::new("a/link"), Path::new("../c")));
        assert!(escapes(Path::new("a/link"), Path::new("../../etc")));
        assert!(escapes(Path::new("link"), Path::new("../x")));
        assert!(!escapes(Path::new("a/link"), Path::new("b/../../c")));
    }

    #[test]
    fn clean_paths() {
        assert_eq!(
            clean(Path::new("./a/b")).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(clean(Path::new("/a")).unwrap(), Some(PathBuf::from("a")));
        assert_eq!(clean(Path::new("./")).unwrap(), None);
        assert!(clean(Path::new("a/../../b")).is_err());
    }
}
