//! Images and kernels as the daemon keeps them: files under `<data>/images/<name>/` and
//! `<data>/kernels/<name>/`, recorded in the store. This module registers local files;
//! catalog and OCI pulls build on it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use banger_api::{ImageInfo, KernelInfo};

/// A stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub rootfs: PathBuf,
    pub size_bytes: u64,
    pub kernel: Option<String>,
    pub registered_at: u64,
}

/// A stored kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRecord {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub modules: Option<PathBuf>,
    pub registered_at: u64,
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

/// Register `rootfs` as image `name` under `images_dir` (blocking).
pub fn register_image(
    images_dir: &Path,
    name: &str,
    rootfs: &Path,
    kernel: Option<String>,
) -> Result<ImageRecord, ImageError> {
    validate_name(name)?;
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
    copy_sparse(rootfs, &dest)?;
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

/// Import a kernel from `from` (holding `vmlinux` or `vmlinuz`, optional `initrd` and
/// `modules/`) as `name` under `kernels_dir` (blocking).
pub fn import_kernel(
    kernels_dir: &Path,
    name: &str,
    from: &Path,
) -> Result<KernelRecord, ImageError> {
    validate_name(name)?;
    let image = ["vmlinux", "vmlinuz"]
        .iter()
        .map(|f| from.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::NoKernel(from.to_owned()))?;
    let dir = kernels_dir.join(name);
    let tmp = kernels_dir.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Write { path, source }
    };
    std::fs::create_dir_all(&tmp).map_err(write_err(&tmp))?;
    let kernel_name = image.file_name().expect("joined a file name").to_owned();
    copy_sparse(&image, &tmp.join(&kernel_name))?;
    let initrd = from.join("initrd");
    let has_initrd = initrd.is_file();
    if has_initrd {
        copy_sparse(&initrd, &tmp.join("initrd"))?;
    }
    let modules = from.join("modules");
    let has_modules = modules.is_dir();
    if has_modules {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&modules)
            .arg(tmp.join("modules"))
            .status()
            .map_err(write_err(&tmp))?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(ImageError::Write {
                path: tmp,
                source: std::io::Error::other("copying modules failed"),
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(write_err(&dir))?;
    Ok(KernelRecord {
        name: name.into(),
        kernel: dir.join(kernel_name),
        initrd: has_initrd.then(|| dir.join("initrd")),
        modules: has_modules.then(|| dir.join("modules")),
        registered_at: crate::store::now_secs(),
    })
}
