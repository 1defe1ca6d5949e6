//! Images and kernels as the daemon keeps them: files under `<data>/images/<name>/` and
//! `<data>/kernels/<name>/`, recorded in the store. This module registers local files;
//! catalog and OCI pulls build on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use banger_api::{ImageInfo, KernelInfo};

use crate::kernel_format::{KernelFormat, KernelFormatError};

/// A stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub rootfs: PathBuf,
    pub size_bytes: u64,
    pub kernel: Option<String>,
    pub registered_at: u64,
}

/// A stored kernel. Fields after `registered_at` came with the format checks
/// ([`crate::kernel_format`]); records written before them load with their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRecord {
    pub name: String,
    /// The kernel file as given (`vmlinux`, or `vmlinuz` for a bzImage); QEMU boots it.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub modules: Option<PathBuf>,
    pub registered_at: u64,
    /// The ELF Firecracker boots (`kernel` itself for an ELF). None in a record made before
    /// kernels were checked: see [`KernelRecord::firecracker_kernel`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmlinux: Option<PathBuf>,
    /// What `kernel` is; None in a record made before kernels were checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<KernelFormat>,
    /// The kernel's build config, kept beside it when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    /// The options of `config` that decide which VMMs it suits
    /// ([`crate::kernel_format::OPTIONS`]), read once at import.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

impl KernelRecord {
    /// The ELF vmlinux to hand Firecracker. A record from before the format checks has no
    /// `vmlinux`: its `kernel` is used when it is an ELF. Blocking (may read 64 bytes).
    pub fn firecracker_kernel(&self) -> Result<PathBuf, ImageError> {
        if let Some(v) = &self.vmlinux {
            return Ok(v.clone());
        }
        match crate::kernel_format::is_elf(&self.kernel) {
            Ok(true) => Ok(self.kernel.clone()),
            Ok(false) => Err(ImageError::NoElf(self.name.clone())),
            Err(source) => Err(ImageError::Read {
                path: self.kernel.clone(),
                source,
            }),
        }
    }

    /// Which VMMs this kernel suits, and why.
    pub fn fits(&self) -> Vec<banger_api::KernelFit> {
        let has_elf = self.vmlinux.is_some() || self.format == Some(KernelFormat::Elf);
        crate::kernel_format::fits(crate::kernel_format::FitInput {
            options: self.config.as_ref().map(|_| &self.options),
            format: self.format,
            has_elf,
            has_initrd: self.initrd.is_some(),
            has_modules: self.modules.is_some(),
        })
    }
}

impl From<&ImageRecord> for ImageInfo {
    fn from(r: &ImageRecord) -> Self {
        ImageInfo {
            name: r.name.clone(),
            rootfs: r.rootfs.display().to_string(),
            size_bytes: r.size_bytes,
            kernel: r.kernel.clone(),
            registered_at: r.registered_at,
        }
    }
}

impl From<&KernelRecord> for KernelInfo {
    fn from(r: &KernelRecord) -> Self {
        KernelInfo {
            name: r.name.clone(),
            kernel: r.kernel.display().to_string(),
            initrd: r.initrd.as_ref().map(|p| p.display().to_string()),
            modules: r.modules.as_ref().map(|p| p.display().to_string()),
            registered_at: r.registered_at,
            format: r.format.map(|f| f.to_string()),
            vmlinux: r.vmlinux.as_ref().map(|p| p.display().to_string()),
            config: r.config.as_ref().map(|p| p.display().to_string()),
            fits: r.fits(),
        }
    }
}

/// Errors registering images and kernels.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid name {0:?}: use 1-63 of a-z, 0-9, '-', '.', '_'")]
    Name(String),
    #[error("{path} is not an ext4 filesystem image")]
    NotExt4 { path: PathBuf },
    #[error("{0} has no vmlinux or vmlinuz")]
    NoKernel(PathBuf),
    /// A path the caller gave does not exist (not found: the CLI exits 4).
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error(
        "kernel {0} has no ELF vmlinux for Firecracker: re-import it (`banger kernel rm {0}`, then `banger kernel import`), or use --vmm qemu"
    )]
    NoElf(String),
    #[error(transparent)]
    Format(#[from] KernelFormatError),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A rootfs without banger's guest side, which the daemon cannot add.
    #[error(
        "{path} has no /usr/lib/banger/banger-init (banger's guest side), and the daemon cannot add it"
    )]
    NoGuestSide {
        path: PathBuf,
        #[source]
        source: crate::pull::guest::GuestBinaryError,
    },
    /// debugfs could not read or edit the image's ext4.
    #[error("cannot give {path} banger's guest binaries: {detail}")]
    GuestSide { path: PathBuf, detail: String },
}

/// Image and kernel names: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(ImageError::Name(name.into()))
    }
}

/// Whether `path` starts with an ext2/3/4 superblock (magic 0xEF53 at offset 1080).
pub fn is_ext4(path: &Path) -> Result<bool, ImageError> {
    use std::io::{Read, Seek, SeekFrom};
    let read_err = |source| ImageError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(read_err)?;
    let mut magic = [0u8; 2];
    f.seek(SeekFrom::Start(1080)).map_err(read_err)?;
    if f.read_exact(&mut magic).is_err() {
        return Ok(false);
    }
    Ok(magic == [0x53, 0xEF])
}

/// Copy `from` to `to` through a temporary name, keeping holes (sparse files stay sparse).
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), ImageError> {
    let tmp = to.with_extension("partial");
    let status = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg("--reflink=auto")
        .arg(from)
        .arg(&tmp)
        .status()
        .map_err(|source| ImageError::Write {
            path: tmp.clone(),
            source,
        })?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImageError::Write {
            path: tmp,
            source: std::io::Error::other(format!("cp exited with {status}")),
        });
    }
    std::fs::rename(&tmp, to).map_err(|source| ImageError::Write {
        path: to.to_owned(),
        source,
    })
}

/// Register `rootfs` as image `name` under `images_dir` (blocking). The image is banger's
/// own copy of the file; when the rootfs lacks banger's guest side (`banger-init`, which
/// the kernel runs as PID 1, and `banger-agent`, in `/usr/lib/banger`), the copy is given
/// them from `guest_dir` ([`give_guest_side`]), as pulled and built images are, so any
/// ext4 of a Linux userland (a debootstrap tree, a container's filesystem) boots. The
/// user's file is never changed. Without usable guest binaries such a rootfs is refused
/// ([`ImageError::NoGuestSide`], saying how to get them) rather than registered to hang at
/// boot.
pub fn register_image(
    images_dir: &Path,
    name: &str,
    rootfs: &Path,
    kernel: Option<String>,
    guest_dir: &Path,
) -> Result<ImageRecord, ImageError> {
    validate_name(name)?;
    if !rootfs.exists() {
        return Err(ImageError::Missing {
            what: "the rootfs",
            path: rootfs.to_owned(),
        });
    }
    if !is_ext4(rootfs)? {
        return Err(ImageError::NotExt4 {
            path: rootfs.to_owned(),
        });
    }
    let dir = images_dir.join(name);
    std::fs::create_dir_all(&dir).map_err(|source| ImageError::Write {
        path: dir.clone(),
        source,
    })?;
    let dest = dir.join("rootfs.ext4");
    let missing = missing_guest_side(rootfs)?;
    if !missing.is_empty() {
        crate::pull::guest::check_dir(guest_dir).map_err(|source| ImageError::NoGuestSide {
            path: rootfs.to_owned(),
            source,
        })?;
    }
    copy_sparse(rootfs, &dest)?;
    if !missing.is_empty() {
        if let Err(e) = give_guest_side(&dest, guest_dir, &missing) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        tracing::info!(image = name, added = ?missing, "gave the image banger's guest binaries");
    }
    let size_bytes = std::fs::metadata(&dest)
        .map_err(|source| ImageError::Read {
            path: dest.clone(),
            source,
        })?
        .len();
    Ok(ImageRecord {
        name: name.into(),
        rootfs: dest,
        size_bytes,
        kernel,
        registered_at: crate::store::now_secs(),
    })
}

/// Where banger's guest binaries live in an image (see [`crate::pull::oci::GUEST_DIR`]).
const GUEST_SIDE: &str = "/usr/lib/banger";

fn debugfs(image: &Path, write: bool, script: &str) -> Result<(String, String), ImageError> {
    use std::io::Write;
    let fail = |detail: String| ImageError::GuestSide {
        path: image.to_owned(),
        detail,
    };
    let mut f = tempfile::NamedTempFile::new().map_err(|e| fail(e.to_string()))?;
    f.write_all(script.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let mut cmd = std::process::Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    let o = cmd
        .arg("-f")
        .arg(f.path())
        .arg(image)
        .output()
        .map_err(|e| fail(format!("cannot run debugfs (install e2fsprogs): {e}")))?;
    if !o.status.success() {
        return Err(fail(String::from_utf8_lossy(&o.stderr).trim().to_owned()));
    }
    Ok((
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    ))
}

/// Which of banger's guest binaries the ext4 `image` lacks (as regular files in
/// `/usr/lib/banger`), read with debugfs without mounting it. Blocking.
pub fn missing_guest_side(image: &Path) -> Result<Vec<&'static str>, ImageError> {
    let names = crate::pull::guest::NAMES;
    let script: String = names
        .iter()
        .map(|n| format!("stat {GUEST_SIDE}/{n}\n"))
        .collect();
    let (out, _) = debugfs(image, false, &script)?;
    // One `Inode: … Type: regular` block per file found, in the order asked; a missing
    // one prints only its error (on stderr).
    let found = |n: &str| {
        out.split("debugfs: stat ")
            .any(|b| b.starts_with(&format!("{GUEST_SIDE}/{n}\n")) && b.contains("Type: regular"))
    };
    Ok(names.into_iter().filter(|n| !found(n)).collect())
}

/// Write the guest binaries `names` from `guest_dir` into the ext4 `image` (banger's own
/// copy) at `/usr/lib/banger`, mode 0755, owned by root, with debugfs; the filesystem is
/// grown first when it has no room for them. Blocking.
pub fn give_guest_side(image: &Path, guest_dir: &Path, names: &[&str]) -> Result<(), ImageError> {
    let fail = |detail: String| ImageError::GuestSide {
        path: image.to_owned(),
        detail,
    };
    let mut need = 4u64 << 20;
    for n in names {
        need += std::fs::metadata(guest_dir.join(n))
            .map_err(|source| ImageError::Read {
                path: guest_dir.join(n),
                source,
            })?
            .len();
    }
    if free_bytes(image)? < need {
        let len = std::fs::metadata(image)
            .map_err(|source| ImageError::Read {
                path: image.to_owned(),
                source,
            })?
            .len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(image)
            .map_err(|source| ImageError::Write {
                path: image.to_owned(),
                source,
            })?;
        f.set_len(len + need + (16 << 20))
            .map_err(|source| ImageError::Write {
                path: image.to_owned(),
                source,
            })?;
        let o = std::process::Command::new("resize2fs")
            .arg("-f")
            .arg(image)
            .output()
            .map_err(|e| fail(format!("cannot run resize2fs (install e2fsprogs): {e}")))?;
        if !o.status.success() {
            return Err(fail(format!(
                "resize2fs: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
    }
    let mut script = String::new();
    // mkdir of a directory that exists fails harmlessly; each level, as debugfs has no -p.
    for d in ["/usr", "/usr/lib", GUEST_SIDE] {
        script.push_str(&format!("mkdir {d}\n"));
    }
    script.push_str(&format!("cd {GUEST_SIDE}\n"));
    for n in names {
        let from = guest_dir.join(n);
        let from = from
            .to_str()
            .filter(|p| !p.contains(['"', '\n']))
            .ok_or_else(|| fail(format!("{} cannot be named to debugfs", from.display())))?;
        script.push_str(&format!(
            "rm {n}\nwrite \"{from}\" {n}\nsif {n} mode 0100755\nsif {n} uid 0\nsif {n} gid 0\n"
        ));
    }
    debugfs(image, true, &script)?;
    // debugfs exits 0 whatever its commands did: read the result back.
    let still = missing_guest_side(image)?;
    if !still.is_empty() {
        return Err(fail(format!(
            "{} still missing after writing",
            still.join(", ")
        )));
    }
    Ok(())
}

/// The guest binary `name` as the ext4 `image` holds it (`/usr/lib/banger/<name>`), read
/// with debugfs without mounting it; None when the image has none. Blocking.
pub fn guest_binary_in(image: &Path, name: &str) -> Result<Option<Vec<u8>>, ImageError> {
    let dir = tempfile::tempdir().map_err(|source| ImageError::Write {
        path: std::env::temp_dir(),
        source,
    })?;
    let out = dir.path().join(name);
    let to = out
        .to_str()
        .filter(|p| !p.contains(['"', '\n']))
        .ok_or_else(|| ImageError::GuestSide {
            path: image.to_owned(),
            detail: format!("{} cannot be named to debugfs", out.display()),
        })?;
    debugfs(
        image,
        false,
        &format!("dump {GUEST_SIDE}/{name} \"{to}\"\n"),
    )?;
    match std::fs::read(&out) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ImageError::Read { path: out, source }),
    }
}

/// Bring the guest binaries of the image file `rootfs` up to this banger's (`guest_dir`):
/// an image pulled, built or registered by an older banger carries that banger's
/// banger-init and banger-agent, which may not speak this daemon's agent channel. When
/// one is of an older revision ([`banger_guest::revision_of`]) than ours, a copy of the
/// image gets the current ones and is renamed over `rootfs`: VMs running from the image
/// keep the inode they opened (or hard-linked into their jail), and only VMs started from
/// now on see the new file. A binary the image lacks is not added. Never a downgrade: binaries of our revision or a newer one
/// (a daemon older than the image) are left alone. Whether it was refreshed. Blocking.
pub fn refresh_guest_side(rootfs: &Path, guest_dir: &Path) -> Result<bool, ImageError> {
    let mut stale = Vec::new();
    for name in crate::pull::guest::NAMES {
        let ours = std::fs::read(guest_dir.join(name)).map_err(|source| ImageError::Read {
            path: guest_dir.join(name),
            source,
        })?;
        let ours = banger_guest::revision_of(&ours);
        // One the image lacks stays missing: its start fails and says so, as before.
        let theirs = guest_binary_in(rootfs, name)?.map(|b| banger_guest::revision_of(&b));
        if theirs.is_some_and(|theirs| theirs < ours) {
            stale.push(name);
        }
    }
    if stale.is_empty() {
        return Ok(false);
    }
    let file_name = rootfs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // One name per refresh (copy_sparse's own `.partial` derives from it), so two VMs
    // starting from the image at once do not share a temporary file.
    let tmp = rootfs.with_file_name(format!(
        ".{}-refresh-{}-{}.ext4",
        file_name.replace('.', "_"),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let result = copy_sparse(rootfs, &tmp)
        .and_then(|()| give_guest_side(&tmp, guest_dir, &stale))
        .and_then(|()| {
            std::fs::rename(&tmp, rootfs).map_err(|source| ImageError::Write {
                path: rootfs.to_owned(),
                source,
            })
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| true)
}

/// Free bytes of the ext4 `image` (its superblock's free blocks × block size).
fn free_bytes(image: &Path) -> Result<u64, ImageError> {
    let (out, _) = debugfs(image, false, "stats\n")?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim_start_matches(':').trim().parse::<u64>().ok())
    };
    match (field("Free blocks"), field("Block size")) {
        (Some(free), Some(size)) => Ok(free * size),
        _ => Err(ImageError::GuestSide {
            path: image.to_owned(),
            detail: "debugfs did not say how much room it has".into(),
        }),
    }
}

/// The files a kernel is made of, wherever they are: a `kernel import` directory, or the
/// `/boot` and `/lib/modules` of a tree an image build made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelFiles {
    /// An ELF vmlinux or a bzImage (`/boot/vmlinuz-<version>`).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The modules tree (`lib/modules/<version>`).
    pub modules: Option<PathBuf>,
    /// The kernel's build config (`/boot/config-<version>`).
    pub config: Option<PathBuf>,
}

/// Import a kernel from `from` (holding `vmlinux` or `vmlinuz`, optional `initrd`,
/// `modules/` and `config`) as `name` under `kernels_dir` (blocking). See [`add_kernel`].
pub fn import_kernel(
    kernels_dir: &Path,
    name: &str,
    from: &Path,
) -> Result<KernelRecord, ImageError> {
    if !from.exists() {
        return Err(ImageError::Missing {
            what: "the kernel directory",
            path: from.to_owned(),
        });
    }
    let kernel = ["vmlinux", "vmlinuz"]
        .iter()
        .map(|f| from.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::NoKernel(from.to_owned()))?;
    let file = |name: &str| Some(from.join(name)).filter(|p| p.is_file());
    add_kernel(
        kernels_dir,
        name,
        &KernelFiles {
            kernel,
            initrd: file("initrd"),
            modules: Some(from.join("modules")).filter(|p| p.is_dir()),
            config: file("config"),
        },
    )
}

/// Make kernel `name` under `kernels_dir` from `files` (blocking): copied into
/// `<kernels_dir>/<name>/` (`initrd`, `modules/`, `config`), the kernel checked and, for a
/// bzImage, converted ([`crate::kernel_format::settle_in`]): `vmlinux` is then the ELF
/// Firecracker boots and `vmlinuz` the bzImage as given. A file that is neither is refused
/// and nothing is left. `kernel import` and image builds (with `/boot/vmlinuz-*`, its
/// initrd, `/lib/modules/<version>` and `/boot/config-*`) both come through here.
pub fn add_kernel(
    kernels_dir: &Path,
    name: &str,
    files: &KernelFiles,
) -> Result<KernelRecord, ImageError> {
    validate_name(name)?;
    let dir = kernels_dir.join(name);
    let tmp = kernels_dir.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = fill_kernel_dir(&tmp, files);
    let (settled, has_initrd, has_modules, options) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Write { path, source }
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(write_err(&dir))?;
    let in_dir = |p: &Path| dir.join(p.file_name().expect("a file in the kernel dir"));
    Ok(KernelRecord {
        name: name.into(),
        kernel: in_dir(&settled.kernel),
        initrd: has_initrd.then(|| dir.join("initrd")),
        modules: has_modules.then(|| dir.join("modules")),
        registered_at: crate::store::now_secs(),
        vmlinux: Some(in_dir(&settled.vmlinux)),
        format: Some(settled.format),
        config: options.is_some().then(|| dir.join("config")),
        options: options.unwrap_or_default(),
    })
}

type Filled = (
    crate::kernel_format::Settled,
    bool,
    bool,
    Option<BTreeMap<String, String>>,
);

/// Copy `files` into the new directory `tmp` and settle the kernel there.
fn fill_kernel_dir(tmp: &Path, files: &KernelFiles) -> Result<Filled, ImageError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Write { path, source }
    };
    std::fs::create_dir_all(tmp).map_err(write_err(tmp))?;
    // The name says what it should be; settle_in finds out what it is.
    let given = match files.kernel.file_name().and_then(|n| n.to_str()) {
        Some("vmlinux") => "vmlinux",
        _ => "vmlinuz",
    };
    copy_sparse(&files.kernel, &tmp.join(given))?;
    let settled = crate::kernel_format::settle_in(tmp, given).map_err(|e| match e {
        // Name the file the user gave, not banger's copy.
        KernelFormatError::Refused { detail, .. } => {
            ImageError::Format(KernelFormatError::Refused {
                path: files.kernel.clone(),
                detail,
            })
        }
        other => ImageError::Format(other),
    })?;
    if let Some(initrd) = &files.initrd {
        copy_sparse(initrd, &tmp.join("initrd"))?;
    }
    let options = match &files.config {
        Some(config) => {
            let text = std::fs::read_to_string(config).map_err(|source| ImageError::Read {
                path: config.clone(),
                source,
            })?;
            std::fs::write(tmp.join("config"), &text).map_err(write_err(&tmp.join("config")))?;
            Some(crate::kernel_format::config_options(&text))
        }
        None => None,
    };
    if let Some(modules) = &files.modules {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(modules)
            .arg(tmp.join("modules"))
            .status()
            .map_err(write_err(tmp))?;
        if !status.success() {
            return Err(ImageError::Write {
                path: tmp.to_owned(),
                source: std::io::Error::other("copying modules failed"),
            });
        }
    }
    Ok((
        settled,
        files.initrd.is_some(),
        files.modules.is_some(),
        options,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_format::fixture::{bzimage, lz4_legacy, minimal_elf};

    /// An ext4 with banger's guest side as `init` and `agent` (the contents of each).
    fn image_with_guest_side(path: &Path, init: &[u8], agent: &[u8]) {
        let tree = tempfile::tempdir().unwrap();
        let dir = tree.path().join("usr/lib/banger");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("banger-init"), init).unwrap();
        std::fs::write(dir.join("banger-agent"), agent).unwrap();
        std::fs::File::create(path)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(tree.path())
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mkfs.ext4");
    }

    /// An image with an older banger's guest binaries gets this banger's, as a new file
    /// renamed over the image: a VM running from the old one (a hard link in its jail, or
    /// an open file) keeps what it booted; an image already current is left alone.
    #[test]
    fn an_image_with_older_guest_binaries_gets_ours_and_running_vms_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs.ext4");
        // Binaries without a mark: revision 1, from before marks.
        image_with_guest_side(&rootfs, b"old init", b"old agent");
        let running = dir.path().join("jail-rootfs.ext4");
        std::fs::hard_link(&rootfs, &running).unwrap();
        let guest = dir.path().join("guest");
        std::fs::create_dir(&guest).unwrap();
        let new_init = marked(b"new init");
        let new_agent = marked(b"new agent, longer than the old");
        std::fs::write(guest.join("banger-init"), &new_init).unwrap();
        std::fs::write(guest.join("banger-agent"), &new_agent).unwrap();

        assert!(refresh_guest_side(&rootfs, &guest).unwrap(), "refreshed");
        let got = |image: &Path, name: &str| guest_binary_in(image, name).unwrap().unwrap();
        assert_eq!(got(&rootfs, "banger-init"), new_init);
        assert_eq!(got(&rootfs, "banger-agent"), new_agent);
        assert_eq!(
            got(&running, "banger-agent"),
            b"old agent",
            "the running VM's file"
        );
        assert!(
            !refresh_guest_side(&rootfs, &guest).unwrap(),
            "current: left alone"
        );
        // Nothing left beside the image but it and the running VM's link.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["guest", "jail-rootfs.ext4", "rootfs.ext4"]);
        assert_eq!(guest_binary_in(&rootfs, "nope").unwrap(), None);
    }

    /// `bytes` with this banger's guest revision mark, as the guest binaries carry it.
    fn marked(bytes: &[u8]) -> Vec<u8> {
        [bytes, banger_guest::REVISION_MARK.as_bytes()].concat()
    }

    /// A daemon whose guest binaries are older than an image's (or of the same revision,
    /// built differently) leaves the image as it is: a refresh never downgrades.
    #[test]
    fn an_image_with_newer_or_same_revision_guest_binaries_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs.ext4");
        let (init, agent) = (marked(b"image init"), marked(b"image agent"));
        image_with_guest_side(&rootfs, &init, &agent);
        let before = std::fs::metadata(&rootfs).unwrap();
        let guest = dir.path().join("guest");
        std::fs::create_dir(&guest).unwrap();
        for (daemon, what) in [
            (
                [b"old init".to_vec(), b"old agent".to_vec()],
                "older daemon",
            ),
            (
                [marked(b"other init"), marked(b"other agent")],
                "same revision",
            ),
        ] {
            std::fs::write(guest.join("banger-init"), &daemon[0]).unwrap();
            std::fs::write(guest.join("banger-agent"), &daemon[1]).unwrap();
            assert!(!refresh_guest_side(&rootfs, &guest).unwrap(), "{what}");
        }
        let got = |name: &str| guest_binary_in(&rootfs, name).unwrap().unwrap();
        assert_eq!((got("banger-init"), got("banger-agent")), (init, agent));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&rootfs).unwrap().ino(),
            before.ino(),
            "not rewritten"
        );
    }

    /// What an image build hands over: `/boot/vmlinuz-<v>`, its initrd, `/boot/config-<v>`
    /// and `/lib/modules/<v>`, names and all.
    #[test]
    fn a_kernel_from_a_built_tree_is_converted_and_its_config_read() {
        let t = tempfile::tempdir().unwrap();
        let boot = t.path().join("root/boot");
        let modules = t.path().join("root/lib/modules/6.1.0-1-cloud-amd64");
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::create_dir_all(modules.join("kernel")).unwrap();
        std::fs::write(modules.join("kernel/virtio_net.ko"), b"ko").unwrap();
        let elf = minimal_elf(100_000);
        let bz = bzimage(&lz4_legacy(&elf));
        std::fs::write(boot.join("vmlinuz-6.1.0-1-cloud-amd64"), &bz).unwrap();
        std::fs::write(boot.join("initrd.img-6.1.0-1-cloud-amd64"), b"initrd").unwrap();
        std::fs::write(
            boot.join("config-6.1.0-1-cloud-amd64"),
            "CONFIG_VIRTIO_NET=m\nCONFIG_OVERLAY_FS=m\nCONFIG_UNRELATED=y\n",
        )
        .unwrap();
        let kernels = t.path().join("kernels");
        std::fs::create_dir_all(&kernels).unwrap();
        let rec = add_kernel(
            &kernels,
            "bookworm",
            &KernelFiles {
                kernel: boot.join("vmlinuz-6.1.0-1-cloud-amd64"),
                initrd: Some(boot.join("initrd.img-6.1.0-1-cloud-amd64")),
                modules: Some(modules),
                config: Some(boot.join("config-6.1.0-1-cloud-amd64")),
            },
        )
        .unwrap();
        let dir = kernels.join("bookworm");
        assert_eq!(rec.kernel, dir.join("vmlinuz"));
        assert_eq!(std::fs::read(&rec.kernel).unwrap(), bz);
        assert_eq!(rec.vmlinux.as_deref(), Some(dir.join("vmlinux").as_path()));
        assert_eq!(std::fs::read(dir.join("vmlinux")).unwrap(), elf);
        assert_eq!(rec.firecracker_kernel().unwrap(), dir.join("vmlinux"));
        assert_eq!(
            std::fs::read(dir.join("modules/kernel/virtio_net.ko")).unwrap(),
            b"ko"
        );
        assert_eq!(rec.config.as_deref(), Some(dir.join("config").as_path()));
        assert_eq!(
            rec.options.keys().collect::<Vec<_>>(),
            ["CONFIG_OVERLAY_FS", "CONFIG_VIRTIO_NET"]
        );
        let info = KernelInfo::from(&rec);
        assert_eq!(
            info.fits[0].fits,
            Some(false),
            "no virtio-mmio in that config"
        );
        // A refused kernel leaves nothing, not even the staging directory.
        std::fs::write(boot.join("vmlinuz-bad"), b"nope").unwrap();
        let e = add_kernel(
            &kernels,
            "bad",
            &KernelFiles {
                kernel: boot.join("vmlinuz-bad"),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&boot.join("vmlinuz-bad").display().to_string()),
            "{e}"
        );
        let left: Vec<_> = std::fs::read_dir(&kernels)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["bookworm"]);
    }

    /// A record the store kept from before the format checks (the fields it had then) still
    /// loads; Firecracker gets its kernel when that is an ELF, and a clear refusal when it is
    /// a bzImage.
    #[test]
    fn an_old_kernel_record_loads_and_says_whether_firecracker_can_boot_it() {
        let t = tempfile::tempdir().unwrap();
        let elf = t.path().join("vmlinux");
        std::fs::write(&elf, minimal_elf(4096)).unwrap();
        let bz = t.path().join("vmlinuz");
        std::fs::write(&bz, bzimage(&lz4_legacy(&minimal_elf(4096)))).unwrap();
        let old = |name: &str, kernel: &Path| {
            let json = format!(
                r#"{{"name":"{name}","kernel":"{}","initrd":null,"modules":null,"registered_at":1}}"#,
                kernel.display()
            );
            serde_json::from_str::<KernelRecord>(&json).unwrap()
        };
        let e = old("e", &elf);
        assert_eq!(
            (e.vmlinux.clone(), e.format, e.config.clone()),
            (None, None, None)
        );
        assert_eq!(e.firecracker_kernel().unwrap(), elf);
        let b = old("b", &bz);
        let err = b.firecracker_kernel().unwrap_err().to_string();
        assert_eq!(
            err,
            "kernel b has no ELF vmlinux for Firecracker: re-import it (`banger kernel rm b`, then `banger kernel import`), or use --vmm qemu"
        );
        let info = KernelInfo::from(&b);
        assert_eq!(info.fits[0].fits, Some(false));
        assert_eq!(info.fits[1].reasons, ["unknown (no config)"]);
        // And what is written now reads back whole.
        let mut now = b.clone();
        now.vmlinux = Some(elf.clone());
        now.format = Some(KernelFormat::Elf);
        let back: KernelRecord =
            serde_json::from_slice(&serde_json::to_vec(&now).unwrap()).unwrap();
        assert_eq!(back, now);
    }
}
