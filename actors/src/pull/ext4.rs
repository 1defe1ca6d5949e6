//! Building the image's ext4 from a tree: `mkfs.ext4 -d`, sized from the content, and
//! `debugfs` to set owners when the daemon could not `chown` (it is not root).
//!
//! Size: the tree's allocated bytes plus 256 bytes per inode, plus a quarter, plus 64 MiB,
//! rounded up to a MiB (`--size` overrides it; too small a size fails with what to pass).
//! The filesystem has no journal: the image is attached read-only and every VM writes to
//! its own overlay disk. Label `bg-rootfs`.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The smallest image `--size` accepts.
pub const MIN_SIZE: u64 = 16 << 20;

/// (allocated bytes, inodes) of a tree, hard links counted once.
pub fn content_size(root: &Path) -> std::io::Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut inodes = 1u64;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        bytes += 4096;
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let m = e.metadata()?;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            inodes += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                // Apparent size rounded to blocks: sparse files become dense in mkfs -d
                // only where they have data, but plan for the worst.
                bytes += m.len().div_ceil(4096) * 4096;
            }
        }
    }
    Ok((bytes, inodes))
}

/// The size to give an image of this content.
pub fn auto_size(bytes: u64, inodes: u64) -> u64 {
    let need = bytes + inodes * 256;
    let size = need + need / 4 + (64 << 20);
    size.div_ceil(1 << 20) << 20
}

/// Build `out` (a new file of `size` bytes) from `tree`. Blocking.
pub fn mkfs(tree: &Path, out: &Path, size: u64, inodes: u64) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    f.set_len(size)
        .map_err(|e| format!("cannot size {}: {e}", out.display()))?;
    drop(f);
    let inodes = (inodes + inodes / 4 + 1024).to_string();
    let o = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-L",
            "bg-rootfs",
            "-N",
            &inodes,
            "-d",
        ])
        .arg(tree)
        .arg(out)
        .output()
        .map_err(|e| format!("cannot run mkfs.ext4 (install e2fsprogs): {e}"))?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let full = ["No space left", "Could not allocate", "not enough space"]
            .iter()
            .any(|s| err.contains(s));
        return Err(if full {
            format!(
                "the image does not fit in {} MiB; pass a larger --size",
                size >> 20
            )
        } else {
            format!("mkfs.ext4 failed: {}", err.trim())
        });
    }
    Ok(())
}

/// Set owners inside the ext4 `image` with debugfs (`sif PATH uid N`, `gid N`). Paths are
/// relative to the image's root. Blocking.
pub fn set_owners(image: &Path, owners: &[(PathBuf, u64, u64)]) -> Result<(), String> {
    let mut script = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    let mut text = String::from("sif / uid 0\nsif / gid 0\n");
    for (rel, uid, gid) in owners {
        let p = rel.to_str().ok_or_else(|| {
            format!(
                "cannot set the owner of /{} (not UTF-8) without root",
                rel.display()
            )
        })?;
        // debugfs's parser takes a backslash literally (systemd's unit names carry `\x2d`
        // escapes, so every image with systemd has them); only a quote or a newline cannot
        // be said inside its quotes.
        if p.contains(['"', '\n']) {
            return Err(format!(
                "cannot set the owner of /{p:?} (quote or newline in the name) without root; run the daemon as root"
            ));
        }
        text.push_str(&format!("sif \"/{p}\" uid {uid}\nsif \"/{p}\" gid {gid}\n"));
    }
    script
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let o = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(script.path())
        .arg(image)
        .output()
        .map_err(|e| format!("cannot run debugfs (install e2fsprogs): {e}"))?;
    let err = String::from_utf8_lossy(&o.stderr);
    // debugfs prints its banner on stderr and exits 0 even when a command fails.
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    if !o.status.success() || !problems.is_empty() {
        return Err(format!(
            "debugfs could not set owners: {}",
            problems.join("; ")
        ));
    }
    Ok(())
}

/// `tree` → `rootfs` (sized from the content with headroom unless `size`), then the
/// recorded owners set with debugfs (the `owners` stage) when there are any, then `tree`
/// removed. Shared by OCI pulls and promotes. Answers the image's size.
pub fn build(
    tree: &Path,
    rootfs: &Path,
    size: Option<u64>,
    owners: &[(PathBuf, u64, u64)],
    rep: &super::Reporter,
) -> Result<u64, super::PullError> {
    use super::PullError;
    let (bytes, inodes) = content_size(tree).map_err(PullError::io(tree))?;
    let size = size.unwrap_or_else(|| auto_size(bytes, inodes));
    mkfs(tree, rootfs, size, inodes).map_err(PullError::Build)?;
    if !owners.is_empty() {
        rep.stage("owners", Some("debugfs".into()));
        set_owners(rootfs, owners).map_err(PullError::Build)?;
    }
    std::fs::remove_dir_all(tree).map_err(PullError::io(tree))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// systemd's escaped unit names (`system-systemd\x2dcryptsetup.slice`) get their owner.
    #[test]
    fn owners_are_set_on_names_with_a_backslash() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let name = "system-systemd\\x2dcryptsetup.slice";
        std::fs::write(tree.join(name), b"").unwrap();
        let image = dir.path().join("img.ext4");
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&image)
            .arg("8M")
            .status()
            .unwrap();
        assert!(ok.success());
        set_owners(&image, &[(PathBuf::from(name), 1234, 2345)]).unwrap();
        let stat = Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat \"/{name}\""))
            .arg(&image)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&stat.stdout);
        assert!(
            text.contains("User:  1234") && text.contains("Group:  2345"),
            "{text}"
        );
        assert!(set_owners(&image, &[(PathBuf::from("a\"b"), 1, 1)]).is_err());
    }
}
