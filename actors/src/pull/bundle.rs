//! Catalog bundles: a `.tar.zst` read once, through sha256 and zstd together, and unpacked
//! into a staging directory next to its destination.
//!
//! What a bundle may hold (anything else is refused, and the staging directory removed):
//! - image: exactly `rootfs.ext4` (an ext4 file) and `manifest.json` (a JSON object; its
//!   optional `kernel_ref` names the kernel), both regular files;
//! - kernel: `vmlinux` or `vmlinuz`, optional `initrd`, optional `config` (the kernel's
//!   build config), optional `modules/` tree of directories, regular files and symlinks that
//!   stay inside `modules/`. The kernel is checked and, for a bzImage, converted as
//!   `kernel import` does ([`crate::kernel_format::settle_in`]): `vmlinux` is then the ELF
//!   Firecracker boots, `vmlinuz` the bzImage as shipped; anything else refuses the bundle.
//!
//! Entries may start with `./`. Absolute paths, `..`, hard links, devices, fifos, links that
//! leave the bundle, duplicates and entries through a symlink are refused. Modes are reduced
//! to `0644`/`0755` (no setuid from a bundle). Runs of zero bytes in files are written as
//! holes, so `rootfs.ext4` stays sparse.
//!
//! Errors are reported in the order that explains them best: a short download first, then a
//! sha256 mismatch (the content cannot be trusted, whatever else is wrong), then the
//! content's own problem.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::PullError;

/// What a bundle holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    Image,
    Kernel,
}

impl BundleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BundleKind::Image => "image",
            BundleKind::Kernel => "kernel",
        }
    }
}

/// What the download should be.
#[derive(Debug, Clone)]
pub struct Expected {
    /// For messages.
    pub url: String,
    pub size: u64,
    pub sha256: String,
}

/// A reader that hashes and counts what passes through it, and refuses to read past the
/// expected size. An error of the underlying stream ends it (EOF) and is kept, so the caller
/// can report a truncated download with its cause.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    cause: Option<String>,
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            cause: None,
            progress: None,
        }
    }

    /// Count bytes read into `counter` as well (for progress reports).
    pub fn with_progress(mut self, counter: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.progress = Some(counter);
        self
    }

    /// Read to the end, then return (bytes, sha256 hex, the stream's error if it failed).
    pub fn finish(mut self) -> (u64, String, Option<String>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    self.cause.get_or_insert(e.to_string());
                    break;
                }
            }
        }
        (self.count, hex(&self.hasher.finalize()), self.cause)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cause.is_some() {
            return Ok(0);
        }
        match self.inner.read(buf) {
            Ok(n) => {
                self.count += n as u64;
                if self.count > self.limit {
                    let msg = format!("more than the expected {} bytes", self.limit);
                    self.cause = Some(msg.clone());
                    return Err(std::io::Error::other(msg));
                }
                self.hasher.update(&buf[..n]);
                if let Some(p) = &self.progress {
                    p.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(n)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.cause = Some(e.to_string());
                Ok(0)
            }
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What was unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// Image: `rootfs.ext4`; kernel: `vmlinux` or `vmlinuz` (relative to staging).
    pub main: PathBuf,
    pub initrd: bool,
    pub modules: bool,
    /// Image: the manifest's `kernel_ref`.
    pub kernel_ref: Option<String>,
    /// Kernel: what the kernel file is (`main`); the ELF is always `vmlinux`.
    pub format: Option<crate::kernel_format::KernelFormat>,
    /// Kernel: the bundle has a `config`.
    pub config: bool,
}

/// Read the bundle from `input` and unpack it into `staging` (an empty directory). Blocking.
pub fn unpack(
    kind: BundleKind,
    input: impl Read,
    staging: &Path,
    expected: &Expected,
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) -> Result<Unpacked, PullError> {
    let mut reader = HashingReader::new(input, expected.size);
    if let Some(p) = progress {
        reader = reader.with_progress(p);
    }
    let content = unpack_entries(kind, &mut reader, staging);
    let (count, sha, cause) = reader.finish();
    if count < expected.size {
        return Err(PullError::Truncated {
            url: expected.url.clone(),
            got: count,
            expected: expected.size,
            cause: cause.unwrap_or_else(|| "the server closed the stream".into()),
        });
    }
    if let Some(cause) = cause {
        return Err(PullError::Download {
            url: expected.url.clone(),
            detail: cause,
        });
    }
    if sha != expected.sha256 {
        return Err(PullError::HashMismatch {
            url: expected.url.clone(),
            expected: expected.sha256.clone(),
            actual: sha,
        });
    }
    content
}

fn bad(kind: BundleKind, detail: impl Into<String>) -> PullError {
    PullError::Bundle {
        kind: kind.as_str(),
        detail: detail.into(),
    }
}

/// A bundle entry's path, relative and without `.` components; refuses `..` and absolute
/// paths. `None` for the archive's root (`./`).
fn clean_path(kind: BundleKind, raw: &Path) -> Result<Option<PathBuf>, PullError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(bad(
                    kind,
                    format!("entry {} escapes the bundle", raw.display()),
                ));
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

fn unpack_entries(
    kind: BundleKind,
    input: &mut impl Read,
    staging: &Path,
) -> Result<Unpacked, PullError> {
    let zst = zstd::stream::read::Decoder::new(input)
        .map_err(|e| bad(kind, format!("not a zstd stream: {e}")))?;
    let mut archive = tar::Archive::new(zst);
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(kind, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(kind, format!("unreadable entry: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| bad(kind, format!("entry with an unreadable path: {e}")))?
            .into_owned();
        let Some(path) = clean_path(kind, &raw)? else {
            continue;
        };
        let ty = entry.header().entry_type();
        // GNU sparse entries read back as their full contents.
        let is_file = ty.is_file() || ty.is_gnu_sparse();
        if !seen.insert(path.clone()) {
            return Err(bad(kind, format!("entry {} appears twice", path.display())));
        }
        let allowed = match kind {
            BundleKind::Image => {
                is_file && (path == Path::new("rootfs.ext4") || path == Path::new("manifest.json"))
            }
            BundleKind::Kernel => {
                let top = ["vmlinux", "vmlinuz", "initrd", "config"]
                    .iter()
                    .any(|f| path == Path::new(f));
                if top {
                    is_file
                } else if path.starts_with("modules") {
                    is_file || ty.is_dir() || ty.is_symlink()
                } else {
                    false
                }
            }
        };
        if !allowed {
            let what = match kind {
                BundleKind::Image => "only rootfs.ext4 and manifest.json",
                BundleKind::Kernel => {
                    "only vmlinux (or vmlinuz), initrd, config and a modules/ tree of files, directories and symlinks inside it"
                }
            };
            return Err(bad(
                kind,
                format!(
                    "unexpected entry {} ({}): the {} bundle may hold {what}",
                    path.display(),
                    type_name(ty),
                    kind.as_str()
                ),
            ));
        }
        // Parents must be real directories we made (never a symlink from the bundle).
        let dest = staging.join(&path);
        ensure_parents(kind, staging, &path)?;
        if ty.is_dir() {
            std::fs::create_dir(&dest)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists if is_real_dir(&dest) => Ok(()),
                    _ => Err(e),
                })
                .map_err(|e| bad(kind, format!("cannot create {}: {e}", path.display())))?;
        } else if ty.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| bad(kind, format!("unreadable link of {}: {e}", path.display())))?
                .ok_or_else(|| bad(kind, format!("symlink {} has no target", path.display())))?
                .into_owned();
            // Must resolve inside modules/.
            if !link_stays_within(&path, &target, Path::new("modules")) {
                return Err(bad(
                    kind,
                    format!(
                        "symlink {} -> {} leaves the modules/ tree",
                        path.display(),
                        target.display()
                    ),
                ));
            }
            std::os::unix::fs::symlink(&target, &dest)
                .map_err(|e| bad(kind, format!("cannot create {}: {e}", path.display())))?;
        } else {
            let exec = entry
                .header()
                .mode()
                .map(|m| m & 0o111 != 0)
                .unwrap_or(false);
            write_sparse(&mut entry, &dest, if exec { 0o755 } else { 0o644 })
                .map_err(|e| bad(kind, format!("cannot write {}: {e}", path.display())))?;
        }
    }
    // Read the zstd stream's end too, so the hash covers every byte of the download.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink())
        .map_err(|e| bad(kind, format!("corrupt zstd stream: {e}")))?;
    match kind {
        BundleKind::Image => {
            for f in ["rootfs.ext4", "manifest.json"] {
                if !seen.contains(Path::new(f)) {
                    return Err(bad(kind, format!("{f} is missing")));
                }
            }
            if !crate::image::is_ext4(&staging.join("rootfs.ext4")).unwrap_or(false) {
                return Err(bad(kind, "rootfs.ext4 is not an ext4 filesystem"));
            }
            let text = std::fs::read(staging.join("manifest.json"))
                .map_err(|e| bad(kind, format!("cannot read manifest.json: {e}")))?;
            let manifest: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| bad(kind, format!("manifest.json is not JSON: {e}")))?;
            if !manifest.is_object() {
                return Err(bad(kind, "manifest.json is not a JSON object"));
            }
            Ok(Unpacked {
                main: "rootfs.ext4".into(),
                initrd: false,
                modules: false,
                kernel_ref: manifest
                    .get("kernel_ref")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned),
                format: None,
                config: false,
            })
        }
        BundleKind::Kernel => {
            let main = ["vmlinux", "vmlinuz"]
                .iter()
                .filter(|f| seen.contains(Path::new(f)))
                .collect::<Vec<_>>();
            let main = match main.as_slice() {
                [one] => **one,
                [] => return Err(bad(kind, "vmlinux is missing")),
                _ => return Err(bad(kind, "holds both vmlinux and vmlinuz; keep one")),
            };
            use crate::kernel_format::KernelFormatError;
            let settled = crate::kernel_format::settle_in(staging, main).map_err(|e| match e {
                KernelFormatError::Refused { detail, .. } => bad(
                    kind,
                    format!(
                        "{main} is not a kernel banger can use: {detail}; {}",
                        crate::kernel_format::ACCEPTED
                    ),
                ),
                KernelFormatError::Read { path, source }
                | KernelFormatError::Write { path, source } => PullError::Io { path, source },
            })?;
            Ok(Unpacked {
                main: settled
                    .kernel
                    .strip_prefix(staging)
                    .unwrap_or(&settled.kernel)
                    .to_owned(),
                initrd: seen.contains(Path::new("initrd")),
                modules: seen.contains(Path::new("modules"))
                    || seen.iter().any(|p| p.starts_with("modules")),
                kernel_ref: None,
                format: Some(settled.format),
                config: seen.contains(Path::new("config")),
            })
        }
    }
}

fn type_name(ty: tar::EntryType) -> &'static str {
    match ty {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => "file",
        tar::EntryType::Directory => "directory",
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "fifo",
        _ => "special entry",
    }
}

fn is_real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_dir())
}

/// Create the parents of `rel` under `root` as directories; refuse one that exists as
/// anything else (a symlink in particular).
fn ensure_parents(kind: BundleKind, root: &Path, rel: &Path) -> Result<(), PullError> {
    let mut cur = root.to_owned();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(bad(
                    kind,
                    format!(
                        "entry {} goes through {}, which is not a directory",
                        rel.display(),
                        cur.strip_prefix(root).unwrap_or(&cur).display()
                    ),
                ));
            }
            Err(_) => std::fs::create_dir(&cur)
                .map_err(|e| bad(kind, format!("cannot create {}: {e}", cur.display())))?,
        }
    }
    Ok(())
}

/// Whether symlink `link` (relative path in the tree) pointing at `target` resolves, lexically,
/// inside `within` (also a relative path in the tree). Absolute targets never do.
pub fn link_stays_within(link: &Path, target: &Path, within: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut parts: Vec<&std::ffi::OsStr> = link
        .parent()
        .map(|p| p.components().filter_map(normal).collect())
        .unwrap_or_default();
    for c in target.components() {
        match c {
            Component::Normal(n) => parts.push(n),
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return false;
                }
            }
            Component::CurDir => {}
            _ => return false,
        }
    }
    let resolved: PathBuf = parts.iter().collect();
    resolved.starts_with(within)
}

fn normal(c: Component<'_>) -> Option<&std::ffi::OsStr> {
    match c {
        Component::Normal(n) => Some(n),
        _ => None,
    }
}

/// Copy `from` to a new file `dest` (never an existing one), turning all-zero blocks into
/// holes.
pub fn write_sparse(from: &mut impl Read, dest: &Path, mode: u32) -> std::io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(dest)?;
    const BLOCK: usize = 64 * 1024;
    let mut buf = vec![0u8; BLOCK];
    let mut len = 0u64;
    loop {
        let mut filled = 0;
        while filled < BLOCK {
            let n = from.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().all(|b| *b == 0) {
            f.seek(SeekFrom::Current(filled as i64))?;
        } else {
            f.write_all(&buf[..filled])?;
        }
        len += filled as u64;
        if filled < BLOCK {
            break;
        }
    }
    f.set_len(len)?;
    Ok(len)
}

/// Build a bundle: a tar of `files` (name in the bundle → path on disk; directories are
/// added recursively) compressed with zstd into `out`. Returns (size, sha256). Used by
/// `banger internal make-bundle` and the tests.
pub fn make_bundle(
    files: &[(String, PathBuf)],
    out: &mut impl Write,
) -> std::io::Result<(u64, String)> {
    struct Counting<W> {
        inner: W,
        hasher: Sha256,
        count: u64,
    }
    impl<W: Write> Write for Counting<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.hasher.update(&buf[..n]);
            self.count += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let mut counting = Counting {
        inner: out,
        hasher: Sha256::new(),
        count: 0,
    };
    {
        let enc = zstd::stream::write::Encoder::new(&mut counting, 3)?;
        let mut tar = tar::Builder::new(enc);
        tar.follow_symlinks(false);
        tar.sparse(true);
        for (name, path) in files {
            if path.is_dir() {
                tar.append_dir_all(name, path)?;
            } else {
                tar.append_path_with_name(path, name)?;
            }
        }
        tar.into_inner()?.finish()?;
    }
    counting.flush()?;
    Ok((counting.count, hex(&counting.hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_inside_and_outside() {
        let m = Path::new("modules");
        assert!(link_stays_within(
            Path::new("modules/6.1/a"),
            Path::new("b"),
            m
        ));
        assert!(link_stays_within(
            Path::new("modules/6.1/kernel/a"),
            Path::new("../x"),
            m
        ));
        assert!(!link_stays_within(
            Path::new("modules/6.1/build"),
            Path::new("../../../etc"),
            m
        ));
        assert!(!link_stays_within(
            Path::new("modules/6.1/build"),
            Path::new("/usr/src/linux"),
            m
        ));
    }

    #[test]
    fn sparse_copy_keeps_holes_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 1 << 20];
        data[5] = 1;
        data.extend_from_slice(&[7u8; 100]);
        let dest = dir.path().join("f");
        let n = write_sparse(&mut data.as_slice(), &dest, 0o644).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&dest).unwrap().blocks();
        assert!(blocks * 512 < 512 * 1024, "holes kept: {blocks} blocks");
    }

    #[test]
    fn hashing_reader_counts_and_limits() {
        let data = vec![1u8; 1000];
        let (n, sha, cause) = HashingReader::new(data.as_slice(), 1000).finish();
        assert_eq!(n, 1000);
        assert_eq!(sha, hex(&Sha256::digest(&data)));
        assert!(cause.is_none());
        let (_, _, cause) = HashingReader::new(data.as_slice(), 10).finish();
        assert!(cause.unwrap().contains("more than the expected 10 bytes"));
    }
}
