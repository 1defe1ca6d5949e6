//! Kernel files as banger takes them in: checked, and converted for the VMM that needs it,
//! when a kernel is imported, pulled or built, never at boot.
//!
//! Firecracker on x86_64 loads only an uncompressed ELF `vmlinux` (`linux-loader`'s ELF
//! loader; anything else gets `Invalid Elf magic number` at `InstanceStart`). Distributions
//! ship a bzImage (`/boot/vmlinuz-*`): real-mode setup code, then the protected-mode code,
//! which carries the ELF compressed. QEMU's microvm boots either. So a kernel file is one of:
//!
//! - **an ELF** (`\x7fELF`, 64-bit, little-endian, x86-64): kept as it is; it is also what
//!   Firecracker gets.
//! - **a bzImage** (`HdrS` at 0x202, boot protocol 2.08 or later): kept as it is (QEMU boots
//!   it, with its initrd), and its payload decompressed into an ELF beside it for
//!   Firecracker. The payload is found from the setup header (Linux's
//!   `Documentation/arch/x86/boot.rst`): `setup_sects` at 0x1f1 (0 means 4), the
//!   protected-mode code at `(setup_sects + 1) * 512`, and `payload_offset` (u32 at 0x248)
//!   and `payload_length` (u32 at 0x24c) relative to that. The compression is told by its
//!   magic, as Linux's `scripts/extract-vmlinux` does: an LZ4 legacy frame (Debian's 6.1
//!   kernels: magic 0x184C2102, then blocks of a u32-le compressed length and an LZ4 block of
//!   at most 8 MiB decompressed), gzip, xz (with the x86 BCJ filter the kernel's
//!   `xz_wrap.sh` uses) or zstd. The kernel's build ends every payload with the decompressed
//!   size as a u32-le (gzip's own trailer is that size; the others get it from
//!   `size_append`): the result must have that size and be an ELF, else the file is refused.
//! - **anything else** (random bytes, a truncated bzImage, bzip2/lzma/lzo payloads): refused,
//!   with an error that names the file and says what banger accepts.
//!
//! [`settle_in`] does this to a kernel directory: afterwards `vmlinux` there is always the
//! ELF, and `vmlinuz` the bzImage when one was given. [`config_options`] and [`fits`] read
//! the kernel's build config (Debian's `/boot/config-<version>`) to say which VMMs the
//! kernel suits and why.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use banger_api::{KernelFit, VmmKind};

/// How a bzImage's payload is compressed (the ones banger converts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    Lz4Legacy,
    Gzip,
    Xz,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Lz4Legacy => "LZ4 (legacy frame)",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }
}

/// What a kernel file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A bzImage whose payload is compressed with `compression`.
    BzImage { compression: Compression },
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelFormat::Elf => f.write_str("ELF vmlinux"),
            KernelFormat::BzImage { compression } => {
                write!(f, "bzImage ({} payload)", compression.as_str())
            }
        }
    }
}

/// Errors checking or converting a kernel file.
#[derive(Debug, thiserror::Error)]
pub enum KernelFormatError {
    #[error("cannot read the kernel {path}")]
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
    #[error("{path} is not a kernel banger can use: {detail}; {ACCEPTED}")]
    Refused { path: PathBuf, detail: String },
}

/// What banger accepts, for error messages.
pub const ACCEPTED: &str = "banger takes an uncompressed x86-64 ELF vmlinux, or a bzImage (vmlinuz) whose payload is LZ4, gzip, xz or zstd";

/// The largest ELF a bzImage may decompress to (a guard against a decompression bomb; real
/// kernels are tens of MiB).
pub const MAX_VMLINUX: u64 = 1 << 30;
/// The largest bzImage read into memory.
const MAX_BZIMAGE: u64 = 256 << 20;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELF_HEADER: usize = 64;
const EM_X86_64: u16 = 62;

// The x86 boot protocol's setup header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PROTOCOL_VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
const SETUP_HEADER_END: usize = 0x250;

const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// An LZ4 legacy frame's blocks decompress to at most 8 MiB each.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Why `header` (a file's first bytes) is not an ELF Firecracker's x86-64 loader takes, or
/// None when it is one.
pub fn elf_problem(header: &[u8]) -> Option<String> {
    if !header.starts_with(ELF_MAGIC) {
        return Some("no ELF magic (\\x7fELF)".into());
    }
    if header.len() < ELF_HEADER {
        return Some(format!(
            "a truncated ELF: {} bytes, shorter than its 64-byte header",
            header.len()
        ));
    }
    if header[4] != 2 {
        return Some("a 32-bit ELF; Firecracker boots a 64-bit vmlinux".into());
    }
    if header[5] != 1 {
        return Some("a big-endian ELF; Firecracker boots a little-endian vmlinux".into());
    }
    let machine = u16_at(header, 18);
    if machine != EM_X86_64 {
        return Some(format!(
            "an ELF for machine {machine}, not x86-64 ({EM_X86_64})"
        ));
    }
    None
}

/// Whether the file at `path` is an ELF Firecracker's x86-64 loader takes (reads its first
/// 64 bytes).
pub fn is_elf(path: &Path) -> std::io::Result<bool> {
    let mut head = Vec::with_capacity(ELF_HEADER);
    std::fs::File::open(path)?
        .take(ELF_HEADER as u64)
        .read_to_end(&mut head)?;
    Ok(elf_problem(&head).is_none())
}

/// Where a bzImage's payload is, and how it is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Payload {
    start: usize,
    end: usize,
    compression: Compression,
}

/// Find the payload of the bzImage `data`, or say why it is not one banger converts.
fn bzimage_payload(data: &[u8]) -> Result<Payload, String> {
    if data.len() < HEADER_MAGIC + 4 || &data[HEADER_MAGIC..HEADER_MAGIC + 4] != b"HdrS" {
        return Err(format!(
            "neither an ELF vmlinux (no \\x7fELF at its start) nor a bzImage (no \"HdrS\" setup header at 0x{HEADER_MAGIC:x}); it has {} bytes",
            data.len()
        ));
    }
    if data.len() < SETUP_HEADER_END {
        return Err(format!(
            "a truncated bzImage: {} bytes end inside its setup header",
            data.len()
        ));
    }
    let version = u16_at(data, PROTOCOL_VERSION);
    if version < 0x208 {
        return Err(format!(
            "a bzImage of boot protocol {}.{:02}, older than 2.08, which gives no payload offset",
            version >> 8,
            version & 0xff
        ));
    }
    let sects = match data[SETUP_SECTS] {
        0 => 4,
        n => n as usize,
    };
    let protected_mode = (sects + 1) * 512;
    let offset = u32_at(data, PAYLOAD_OFFSET) as usize;
    let length = u32_at(data, PAYLOAD_LENGTH) as usize;
    let start = protected_mode + offset;
    let end = start + length;
    if end > data.len() {
        return Err(format!(
            "a truncated bzImage: its setup header puts the payload at bytes {start}..{end}, but the file has {} bytes",
            data.len()
        ));
    }
    let p = &data[start..end];
    if p.len() < 8 {
        return Err(format!(
            "a bzImage with a {}-byte payload, too short to hold a kernel",
            p.len()
        ));
    }
    let compression = if u32_at(p, 0) == LZ4_LEGACY_MAGIC {
        Compression::Lz4Legacy
    } else if p.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if p.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if p.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        let other = if p.starts_with(b"BZh") {
            "bzip2".to_owned()
        } else if p.starts_with(&[0x5d, 0, 0]) {
            "lzma".to_owned()
        } else if p.starts_with(b"\x89LZO") {
            "lzo".to_owned()
        } else {
            format!(
                "an unknown compression (it starts with {:02x} {:02x} {:02x} {:02x})",
                p[0], p[1], p[2], p[3]
            )
        };
        return Err(format!(
            "a bzImage whose payload is {other}, which banger does not decompress"
        ));
    };
    Ok(Payload {
        start,
        end,
        compression,
    })
}

/// Where decompressed bytes go: counts them, keeps the first 64 (to check the ELF header),
/// refuses more than [`MAX_VMLINUX`], and remembers a failure of the file itself (so it is
/// told apart from a corrupt payload).
struct Sink<W> {
    out: W,
    written: u64,
    head: Vec<u8>,
    failed: Option<std::io::Error>,
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > MAX_VMLINUX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the payload decompresses to more than {} MiB",
                    MAX_VMLINUX >> 20
                ),
            ));
        }
        if let Err(e) = self.out.write_all(buf) {
            let kind = e.kind();
            self.failed = Some(e);
            return Err(std::io::Error::new(kind, "writing the vmlinux failed"));
        }
        if self.head.len() < ELF_HEADER {
            let n = (ELF_HEADER - self.head.len()).min(buf.len());
            self.head.extend_from_slice(&buf[..n]);
        }
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Decompress an LZ4 legacy frame (`data` without its size trailer) into `out`.
fn unlz4_legacy(data: &[u8], out: &mut impl Write) -> std::io::Result<()> {
    let corrupt = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidData, msg);
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut pos = 0;
    while pos < data.len() {
        if data.len() - pos < 4 {
            return Err(corrupt(format!(
                "the LZ4 frame ends inside a block header at payload byte {pos}"
            )));
        }
        let word = u32_at(data, pos);
        pos += 4;
        // The magic again starts another frame (concatenated frames are legal).
        if word == LZ4_LEGACY_MAGIC {
            continue;
        }
        let n = word as usize;
        if n > data.len() - pos {
            return Err(corrupt(format!(
                "the LZ4 block at payload byte {pos} claims {n} bytes, but only {} remain",
                data.len() - pos
            )));
        }
        let got = lz4_flex::block::decompress_into(&data[pos..pos + n], &mut block)
            .map_err(|e| corrupt(format!("corrupt LZ4 block at payload byte {pos}: {e}")))?;
        out.write_all(&block[..got])?;
        pos += n;
    }
    Ok(())
}

/// Decompress `payload` (with its size trailer) into `out`.
fn decompress(
    compression: Compression,
    payload: &[u8],
    out: &mut impl Write,
) -> std::io::Result<()> {
    // gzip's own trailer is the size: the member ends there. The others end before it.
    let body = &payload[..payload.len() - 4];
    match compression {
        Compression::Lz4Legacy => unlz4_legacy(&body[4..], out),
        Compression::Gzip => {
            std::io::copy(&mut flate2::read::GzDecoder::new(payload), out).map(drop)
        }
        Compression::Xz => {
            std::io::copy(&mut lzma_rust2::XzReader::new(body, false), out).map(drop)
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(body)?.single_frame();
            std::io::copy(&mut d, out).map(drop)
        }
    }
}

/// Decompress the bzImage `data`'s payload into `out` and check the result: the size the
/// payload's trailer gives, and an ELF. `Ok(Err(detail))` when the payload is refused.
fn extract<W: Write>(data: &[u8], out: W) -> Result<Result<Compression, String>, std::io::Error> {
    let payload = match bzimage_payload(data) {
        Ok(p) => p,
        Err(detail) => return Ok(Err(detail)),
    };
    let bytes = &data[payload.start..payload.end];
    let expected = u32_at(bytes, bytes.len() - 4);
    let mut sink = Sink {
        out,
        written: 0,
        head: Vec::new(),
        failed: None,
    };
    let what = payload.compression.as_str();
    if let Err(e) = decompress(payload.compression, bytes, &mut sink) {
        if let Some(failed) = sink.failed.take() {
            return Err(failed);
        }
        return Ok(Err(format!(
            "a bzImage whose {what} payload is corrupt ({e})"
        )));
    }
    if let Err(e) = sink.flush() {
        return Err(sink.failed.take().unwrap_or(e));
    }
    if sink.written as u32 != expected {
        return Ok(Err(format!(
            "a bzImage whose {what} payload decompressed to {} bytes, not the {expected} its trailer gives (corrupt or truncated)",
            sink.written
        )));
    }
    if let Some(problem) = elf_problem(&sink.head) {
        return Ok(Err(format!(
            "a bzImage whose {what} payload is not an ELF vmlinux ({problem})"
        )));
    }
    Ok(Ok(payload.compression))
}

/// Decompress the bzImage in `data` to the ELF it carries (in memory; for callers that have
/// the bytes). `Err(detail)` says why it is refused.
pub fn vmlinux_of(data: &[u8]) -> Result<(Compression, Vec<u8>), String> {
    let mut out = Vec::new();
    match extract(data, &mut out) {
        Ok(Ok(c)) => Ok((c, out)),
        Ok(Err(detail)) => Err(detail),
        Err(e) => Err(e.to_string()),
    }
}

/// Check the kernel file `kernel`; for a bzImage, write the ELF it carries to `elf_out`
/// (through a temporary name beside it, so a failure leaves nothing). Blocking.
pub fn convert(kernel: &Path, elf_out: &Path) -> Result<KernelFormat, KernelFormatError> {
    let read_err = |source| KernelFormatError::Read {
        path: kernel.to_owned(),
        source,
    };
    let refused = |detail: String| KernelFormatError::Refused {
        path: kernel.to_owned(),
        detail,
    };
    let mut f = std::fs::File::open(kernel).map_err(read_err)?;
    let len = f.metadata().map_err(read_err)?.len();
    let mut head = Vec::with_capacity(ELF_HEADER);
    (&mut f)
        .take(ELF_HEADER as u64)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    if head.starts_with(ELF_MAGIC) {
        return match elf_problem(&head) {
            None => Ok(KernelFormat::Elf),
            Some(problem) => Err(refused(problem)),
        };
    }
    if len > MAX_BZIMAGE {
        return Err(refused(format!(
            "not an ELF, and at {} MiB too large for a bzImage",
            len >> 20
        )));
    }
    let mut data = head;
    f.read_to_end(&mut data).map_err(read_err)?;
    // Refuse what is not a bzImage before creating anything.
    bzimage_payload(&data).map_err(refused)?;
    let tmp = elf_out.with_extension("partial");
    let write_err = |source| KernelFormatError::Write {
        path: tmp.clone(),
        source,
    };
    let file = std::fs::File::create(&tmp).map_err(write_err)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let result = extract(&data, &mut out);
    drop(out);
    let compression = match result {
        Ok(Ok(c)) => c,
        Ok(Err(detail)) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(refused(detail));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
    };
    std::fs::rename(&tmp, elf_out).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        KernelFormatError::Write {
            path: elf_out.to_owned(),
            source,
        }
    })?;
    Ok(KernelFormat::BzImage { compression })
}

/// A kernel directory after [`settle_in`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub format: KernelFormat,
    /// The kernel as given (QEMU boots it): `vmlinuz` for a bzImage, else `vmlinux`.
    pub kernel: PathBuf,
    /// The ELF Firecracker boots: always `vmlinux`.
    pub vmlinux: PathBuf,
}

/// Check and convert the kernel file `dir/name` (`name` as given: `vmlinux` or `vmlinuz`,
/// whatever it really is). Afterwards `dir/vmlinux` is its ELF, and for a bzImage
/// `dir/vmlinuz` is the bzImage as given. On a refusal the file is left as it was. Blocking.
pub fn settle_in(dir: &Path, name: &str) -> Result<Settled, KernelFormatError> {
    let given = dir.join(name);
    let vmlinux = dir.join("vmlinux");
    let vmlinuz = dir.join("vmlinuz");
    let format = if name == "vmlinux" {
        // A bzImage named vmlinux: its ELF takes the name, so the bzImage moves first.
        if is_elf(&given).map_err(|source| KernelFormatError::Read {
            path: given.clone(),
            source,
        })? {
            KernelFormat::Elf
        } else {
            let moved = dir.join(".vmlinux.given");
            std::fs::rename(&given, &moved).map_err(|source| KernelFormatError::Write {
                path: moved.clone(),
                source,
            })?;
            match convert(&moved, &vmlinux) {
                Ok(f) => {
                    std::fs::rename(&moved, &vmlinuz).map_err(|source| {
                        KernelFormatError::Write {
                            path: vmlinuz.clone(),
                            source,
                        }
                    })?;
                    f
                }
                Err(e) => {
                    let _ = std::fs::rename(&moved, &given);
                    return Err(match e {
                        KernelFormatError::Refused { detail, .. } => KernelFormatError::Refused {
                            path: given,
                            detail,
                        },
                        other => other,
                    });
                }
            }
        }
    } else {
        let f = convert(&given, &vmlinux)?;
        if f == KernelFormat::Elf && given != vmlinux {
            // An ELF under another name: it is the vmlinux.
            std::fs::rename(&given, &vmlinux).map_err(|source| KernelFormatError::Write {
                path: vmlinux.clone(),
                source,
            })?;
        }
        f
    };
    Ok(Settled {
        format,
        kernel: match format {
            KernelFormat::Elf => vmlinux.clone(),
            KernelFormat::BzImage { .. } => vmlinuz,
        },
        vmlinux,
    })
}

/// The config options that decide which VMMs a kernel suits.
pub const OPTIONS: &[&str] = &[
    "CONFIG_VIRTIO_MMIO",
    "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
    "CONFIG_ACPI",
    "CONFIG_PCI",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_VIRTIO_BLK",
    "CONFIG_VIRTIO_NET",
    "CONFIG_VIRTIO_VSOCKETS",
    "CONFIG_OVERLAY_FS",
];

/// The values of [`OPTIONS`] in a kernel build config (`CONFIG_X=y|m|...`; an option that
/// is `# ... is not set` or absent is left out).
pub fn config_options(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once('='))
        .filter(|(k, _)| OPTIONS.contains(k))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// What [`fits`] needs to know about a kernel.
#[derive(Debug, Clone, Copy)]
pub struct FitInput<'a> {
    /// `None`: no config was given.
    pub options: Option<&'a BTreeMap<String, String>>,
    /// What the kernel file as given (the one QEMU boots) is; None when not recorded.
    pub format: Option<KernelFormat>,
    /// There is an ELF vmlinux for Firecracker.
    pub has_elf: bool,
    pub has_initrd: bool,
    pub has_modules: bool,
}

/// Which VMMs the kernel suits, and why: Firecracker needs the ELF; both need virtio-mmio
/// devices they can find (from the command line, or ACPI, which Firecracker since 1.8 and
/// QEMU's microvm both describe them in), a serial console, and virtio-blk, virtio-net,
/// vsock and overlayfs. A module (`=m`) counts when the modules tree is there (banger-init
/// loads it), and for the drivers the root disk needs (virtio-mmio, virtio-blk) only when an
/// initrd is there too, which loads them before the root disk is mounted.
pub fn fits(k: FitInput<'_>) -> Vec<KernelFit> {
    [VmmKind::Firecracker, VmmKind::Qemu]
        .into_iter()
        .map(|vmm| fit_for(vmm, k))
        .collect()
}

fn fit_for(vmm: VmmKind, k: FitInput<'_>) -> KernelFit {
    let mut ok = Vec::new();
    let mut missing = Vec::new();
    match vmm {
        VmmKind::Firecracker if k.has_elf => ok.push("ELF vmlinux".to_owned()),
        VmmKind::Firecracker => missing
            .push("no ELF vmlinux (Firecracker boots no bzImage): re-import the kernel".to_owned()),
        VmmKind::Qemu => ok.push(match k.format {
            Some(KernelFormat::BzImage { .. }) => "bzImage".to_owned(),
            Some(KernelFormat::Elf) => "ELF vmlinux".to_owned(),
            None => "the kernel as given".to_owned(),
        }),
    }
    let Some(opts) = k.options else {
        return KernelFit {
            vmm,
            fits: if missing.is_empty() {
                None
            } else {
                Some(false)
            },
            reasons: if missing.is_empty() {
                vec!["unknown (no config)".to_owned()]
            } else {
                missing.push("the rest unknown (no config)".to_owned());
                missing
            },
        };
    };
    let get = |o: &str| opts.get(o).map(String::as_str);
    // (built in, a module that is usable here, a module that is not)
    let state = |o: &str, root_path: bool| -> Result<&'static str, String> {
        match get(o) {
            Some("y") => Ok(""),
            Some("m") if k.has_modules && (!root_path || k.has_initrd) => Ok(" (module)"),
            Some("m") if !k.has_modules => Err(format!("{o}=m but there is no modules tree")),
            Some("m") => Err(format!(
                "{o}=m but there is no initrd to load it before the root disk mounts"
            )),
            _ => Err(format!("{o} is not set")),
        }
    };
    let mut check = |what: &str, result: Result<String, String>| match result {
        Ok(detail) => ok.push(format!("{what}{detail}")),
        Err(why) => missing.push(format!("{what}: {why}")),
    };
    let discovery = match state("CONFIG_VIRTIO_MMIO", true) {
        Err(e) => Err(e),
        Ok(m) => {
            if get("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES") == Some("y") {
                Ok(format!("{m}, devices from the command line"))
            } else if get("CONFIG_ACPI") == Some("y") && get("CONFIG_PCI") == Some("y") {
                Ok(format!("{m}, devices from ACPI"))
            } else {
                Err("neither CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES nor CONFIG_ACPI with CONFIG_PCI is set: the guest cannot find its devices".into())
            }
        }
    };
    check("virtio-mmio", discovery);
    check(
        "serial console",
        match get("CONFIG_SERIAL_8250_CONSOLE") {
            Some("y") => Ok(String::new()),
            _ => Err("CONFIG_SERIAL_8250_CONSOLE is not set".into()),
        },
    );
    for (what, option, root_path) in [
        ("virtio-blk", "CONFIG_VIRTIO_BLK", true),
        ("virtio-net", "CONFIG_VIRTIO_NET", false),
        ("vsock transport", "CONFIG_VIRTIO_VSOCKETS", false),
        ("overlayfs", "CONFIG_OVERLAY_FS", false),
    ] {
        check(what, state(option, root_path).map(str::to_owned));
    }
    KernelFit {
        vmm,
        fits: Some(missing.is_empty()),
        reasons: if missing.is_empty() { ok } else { missing },
    }
}

/// Real kernel formats, made small, for tests of the paths that take kernels in (the
/// Firecracker double, the daemon's import): no bypass, the same checks run on them.
pub mod fixture {
    /// The entry point and load address of [`minimal_elf`] (16 MiB, above the 1 MiB
    /// Firecracker's loader requires).
    pub const ENTRY: u64 = 0x100_0000;

    /// The smallest file that banger's check and Firecracker's ELF loader both accept: a
    /// 64-bit little-endian x86-64 ELF header, one PT_LOAD program header, and a `hlt; jmp`
    /// loop. `len` pads it (the bytes after the segment stand for the relocations a real
    /// vmlinux.bin carries); at least 136 bytes are written.
    pub fn minimal_elf(len: usize) -> Vec<u8> {
        let code: &[u8] = &[0xf4, 0xeb, 0xfd, 0x90, 0x90, 0x90, 0x90, 0x90];
        let phoff = 64u64;
        let code_at = phoff + 56;
        let mut e = Vec::with_capacity(len.max(136));
        e.extend_from_slice(b"\x7fELF");
        e.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
        e.extend_from_slice(&[0; 8]);
        e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&ENTRY.to_le_bytes());
        e.extend_from_slice(&phoff.to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes()); // no section headers
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
        e.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
        // PT_LOAD, R+X.
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&5u32.to_le_bytes());
        e.extend_from_slice(&code_at.to_le_bytes());
        e.extend_from_slice(&ENTRY.to_le_bytes());
        e.extend_from_slice(&ENTRY.to_le_bytes());
        e.extend_from_slice(&(code.len() as u64).to_le_bytes());
        e.extend_from_slice(&(code.len() as u64).to_le_bytes());
        e.extend_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(code);
        // Padding that compresses like code does, not like zeros.
        let mut x = 0x2545_f491_u32;
        while e.len() < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            e.push(if x.is_multiple_of(4) {
                (x >> 8) as u8
            } else {
                0x90
            });
        }
        e
    }

    /// A bzImage around an already compressed `payload` (which, as the kernel's build makes
    /// it, ends with the decompressed size as a u32-le): boot sector with `setup_sects`
    /// (4 setup sectors after it), the setup header (`HdrS`, protocol 2.15, payload offset
    /// and length), the protected-mode code (a stand-in decompressor stub), then the payload.
    pub fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 4u8;
        let protected_mode = (setup_sects as usize + 1) * 512;
        let stub = 0x3c0usize; // where the payload starts in the protected-mode code
        let mut b = vec![0u8; protected_mode + stub];
        b[0x1f1] = setup_sects;
        b[0x1fe] = 0x55;
        b[0x1ff] = 0xaa;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&(stub as u32).to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        for (i, byte) in b[protected_mode..].iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        b.extend_from_slice(payload);
        // What follows the payload in a real bzImage (the rest of the decompressor).
        b.extend_from_slice(&[0xcc; 512]);
        b
    }

    /// `data` as the kernel's build compresses it for `CONFIG_KERNEL_LZ4` (`lz4 -l`): the
    /// legacy frame magic, blocks of 8 MiB each as a u32-le length and an LZ4 block, then
    /// the decompressed size.
    pub fn lz4_legacy(data: &[u8]) -> Vec<u8> {
        let mut out = super::LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(super::LZ4_LEGACY_BLOCK) {
            let block = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::{bzimage, lz4_legacy, minimal_elf};
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        // As the kernel's build: `gzip -n -9`, whose trailer is the size.
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn with_size(mut v: Vec<u8>, data: &[u8]) -> Vec<u8> {
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        // As the kernel's xz_wrap.sh for x86: `xz --check=crc32 --x86 --lzma2=...`.
        let mut opts = lzma_rust2::XzOptions::with_preset(1);
        opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
        opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
        let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
        w.write_all(data).unwrap();
        with_size(w.finish().unwrap(), data)
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        with_size(zstd::stream::encode_all(data, 3).unwrap(), data)
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn each_compression_converts_to_the_exact_elf() {
        let dir = tempfile::tempdir().unwrap();
        // Over 8 MiB for LZ4, so its frame has several blocks and a short last one.
        let big = minimal_elf((8 << 20) * 2 + 12345);
        let small = minimal_elf(300_000);
        let cases: [(&str, Compression, &Vec<u8>, Vec<u8>); 4] = [
            ("lz4", Compression::Lz4Legacy, &big, lz4_legacy(&big)),
            ("gz", Compression::Gzip, &small, gzip(&small)),
            ("xz", Compression::Xz, &small, xz(&small)),
            ("zst", Compression::Zstd, &small, zstd(&small)),
        ];
        for (name, compression, elf, payload) in cases {
            let kernel = write(dir.path(), name, &bzimage(&payload));
            let out = dir.path().join(format!("{name}.vmlinux"));
            let format = convert(&kernel, &out).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(format, KernelFormat::BzImage { compression }, "{name}");
            assert!(std::fs::read(&out).unwrap() == *elf, "{name}: not the ELF");
            assert!(is_elf(&out).unwrap());
        }
    }

    #[test]
    fn an_elf_is_kept_and_a_bad_elf_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elf = write(dir.path(), "vmlinux", &minimal_elf(4096));
        let out = dir.path().join("out");
        assert_eq!(convert(&elf, &out).unwrap(), KernelFormat::Elf);
        assert!(!out.exists(), "nothing written for an ELF");
        let mut arm = minimal_elf(4096);
        arm[18] = 183; // EM_AARCH64
        let arm = write(dir.path(), "arm", &arm);
        let e = convert(&arm, &out).unwrap_err().to_string();
        assert!(e.contains("machine 183, not x86-64"), "{e}");
    }

    #[test]
    fn random_bytes_are_refused_naming_the_file_and_what_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = 7u32;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        let f = write(dir.path(), "vmlinuz", &noise);
        let out = dir.path().join("vmlinux");
        let e = convert(&f, &out).unwrap_err();
        assert!(matches!(e, KernelFormatError::Refused { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&f.display().to_string()), "{msg}");
        assert!(msg.contains("neither an ELF vmlinux"), "{msg}");
        assert!(msg.contains(ACCEPTED), "{msg}");
        assert!(!out.exists() && !out.with_extension("partial").exists());
    }

    #[test]
    fn a_truncated_bzimage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elf = minimal_elf(1 << 20);
        let whole = bzimage(&lz4_legacy(&elf));
        let out = dir.path().join("vmlinux");
        // Cut inside the payload, and inside the setup header.
        for (cut, want) in [
            (
                whole.len() - 4096,
                "a truncated bzImage: its setup header puts the payload",
            ),
            (0x230, "bytes end inside its setup header"),
        ] {
            let f = write(dir.path(), "vmlinuz", &whole[..cut]);
            let e = convert(&f, &out).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!out.exists());
        }
        // A payload whose length field was made to fit the cut file: its blocks are short.
        let start = 5 * 512 + 0x3c0;
        let half = lz4_legacy(&elf).len() / 2;
        let mut lied = whole[..start + half].to_vec();
        lied[0x24c..0x250].copy_from_slice(&(half as u32).to_le_bytes());
        let f = write(dir.path(), "vmlinuz", &lied);
        let e = convert(&f, &out).unwrap_err().to_string();
        assert!(e.contains("LZ4 (legacy frame) payload is corrupt"), "{e}");
        assert!(!out.exists() && !out.with_extension("partial").exists());
    }

    #[test]
    fn a_payload_that_is_not_an_elf_or_has_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let not_elf = vec![0x42u8; 100_000];
        let f = write(dir.path(), "a", &bzimage(&lz4_legacy(&not_elf)));
        let e = convert(&f, &dir.path().join("o")).unwrap_err().to_string();
        assert!(e.contains("is not an ELF vmlinux (no ELF magic"), "{e}");
        let elf = minimal_elf(100_000);
        let mut payload = zstd(&elf);
        let n = payload.len();
        payload[n - 4..].copy_from_slice(&99u32.to_le_bytes());
        let f = write(dir.path(), "b", &bzimage(&payload));
        let e = convert(&f, &dir.path().join("o")).unwrap_err().to_string();
        assert!(e.contains("not the 99 its trailer gives"), "{e}");
        let f = write(dir.path(), "c", &bzimage(b"BZh91AY&SY_rest_of_it"));
        let e = convert(&f, &dir.path().join("o")).unwrap_err().to_string();
        assert!(e.contains("payload is bzip2"), "{e}");
    }

    #[test]
    fn settle_keeps_the_bzimage_as_vmlinuz_and_writes_the_elf_as_vmlinux() {
        let elf = minimal_elf(200_000);
        let bz = bzimage(&gzip(&elf));
        for given in ["vmlinuz", "vmlinux"] {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), given, &bz);
            let s = settle_in(dir.path(), given).unwrap();
            assert_eq!(s.kernel, dir.path().join("vmlinuz"), "{given}");
            assert_eq!(s.vmlinux, dir.path().join("vmlinux"));
            assert_eq!(std::fs::read(&s.kernel).unwrap(), bz);
            assert_eq!(std::fs::read(&s.vmlinux).unwrap(), elf);
            let mut names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["vmlinux", "vmlinuz"], "{given}");
        }
        // An ELF named vmlinuz is the vmlinux; a refused file is left as it was.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "vmlinuz", &elf);
        let s = settle_in(dir.path(), "vmlinuz").unwrap();
        assert_eq!((s.format, s.kernel.clone()), (KernelFormat::Elf, s.vmlinux));
        assert!(!dir.path().join("vmlinuz").exists());
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "vmlinux", b"junk");
        let e = settle_in(dir.path(), "vmlinux").unwrap_err().to_string();
        assert!(
            e.contains(&dir.path().join("vmlinux").display().to_string()),
            "{e}"
        );
        assert_eq!(std::fs::read(dir.path().join("vmlinux")).unwrap(), b"junk");
    }

    /// The real Debian cloud kernel the rig installs (scripts/rig/setup.sh). Fails, never
    /// skips, when it is missing.
    #[test]
    fn the_real_debian_cloud_kernel_converts_to_its_elf_vmlinux() {
        let cached = Path::new("/var/cache/banger-rig/kernel/vmlinuz");
        let boot = std::fs::read_dir("/boot").ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy().into_owned();
                    n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
                })
                .max()
        });
        let kernel = boot
            .or_else(|| cached.exists().then(|| cached.to_owned()))
            .expect(
                "no /boot/vmlinuz-*-cloud-amd64 nor /var/cache/banger-rig/kernel/vmlinuz: run scripts/rig/setup.sh (it installs linux-image-cloud-amd64)",
            );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vmlinux");
        let t = std::time::Instant::now();
        let format = convert(&kernel, &out).unwrap();
        // The time is worth seeing in the test's output (`--nocapture`).
        #[allow(clippy::print_stderr)]
        {
            eprintln!("{} converted in {:?}", kernel.display(), t.elapsed());
        }
        assert_eq!(
            format,
            KernelFormat::BzImage {
                compression: Compression::Lz4Legacy
            }
        );
        let elf = std::fs::read(&out).unwrap();
        assert!(elf.starts_with(b"\x7fELF\x02\x01"));
        assert!(elf_problem(&elf).is_none());
        assert!(
            (40 << 20..80 << 20).contains(&elf.len()),
            "{} bytes",
            elf.len()
        );
    }

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn config_options_read_values_and_skip_unset() {
        let text = "# comment\nCONFIG_VIRTIO_MMIO=m\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\nCONFIG_ACPI=y\nCONFIG_OTHER=y\n";
        assert_eq!(
            config_options(text),
            opts(&[("CONFIG_ACPI", "y"), ("CONFIG_VIRTIO_MMIO", "m")])
        );
    }

    /// Debian's 6.1 cloud kernel: virtio-mmio a module found through ACPI, the drivers
    /// modules: fine for both with its initrd and modules, not without them.
    #[test]
    fn fits_follow_the_config_the_elf_and_the_modules() {
        let debian = opts(&[
            ("CONFIG_VIRTIO_MMIO", "m"),
            ("CONFIG_ACPI", "y"),
            ("CONFIG_PCI", "y"),
            ("CONFIG_SERIAL_8250_CONSOLE", "y"),
            ("CONFIG_VIRTIO_BLK", "m"),
            ("CONFIG_VIRTIO_NET", "m"),
            ("CONFIG_VIRTIO_VSOCKETS", "m"),
            ("CONFIG_OVERLAY_FS", "m"),
        ]);
        let full = FitInput {
            options: Some(&debian),
            format: Some(KernelFormat::BzImage {
                compression: Compression::Lz4Legacy,
            }),
            has_elf: true,
            has_initrd: true,
            has_modules: true,
        };
        let f = fits(full);
        assert_eq!(f[0].vmm, VmmKind::Firecracker);
        assert_eq!(f[0].fits, Some(true), "{:?}", f[0].reasons);
        assert!(
            f[0].reasons
                .contains(&"virtio-mmio (module), devices from ACPI".to_owned())
        );
        assert!(
            f[0].reasons
                .contains(&"vsock transport (module)".to_owned())
        );
        assert_eq!(f[1].fits, Some(true));

        let f = fits(FitInput {
            has_elf: false,
            ..full
        });
        assert_eq!(f[0].fits, Some(false));
        assert!(
            f[0].reasons[0].contains("no ELF vmlinux"),
            "{:?}",
            f[0].reasons
        );
        assert_eq!(f[1].fits, Some(true), "QEMU boots the bzImage");

        let f = fits(FitInput {
            has_initrd: false,
            ..full
        });
        assert_eq!(f[1].fits, Some(false));
        assert!(
            f[1].reasons
                .iter()
                .any(|r| r.starts_with("virtio-blk: CONFIG_VIRTIO_BLK=m but there is no initrd")),
            "{:?}",
            f[1].reasons
        );

        let mut no_acpi = debian.clone();
        no_acpi.remove("CONFIG_ACPI");
        let f = fits(FitInput {
            options: Some(&no_acpi),
            ..full
        });
        assert!(
            f[0].reasons[0].contains("cannot find its devices"),
            "{:?}",
            f[0].reasons
        );
        let mut cmdline = no_acpi.clone();
        cmdline.insert("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES".into(), "y".into());
        assert_eq!(
            fits(FitInput {
                options: Some(&cmdline),
                ..full
            })[0]
                .fits,
            Some(true)
        );

        let unknown = fits(FitInput {
            options: None,
            ..full
        });
        assert_eq!(unknown[0].fits, None);
        assert_eq!(unknown[0].reasons, ["unknown (no config)"]);
    }
}
