//! banger's guest binaries (`banger-init`, `banger-agent`) as images get them: they must be
//! statically linked, because they run inside any guest userland (and `banger-init` runs
//! as PID 1 before the root filesystem is even mounted). A plain `cargo build` makes
//! dynamically linked ones that need the host's glibc loader; injected, they would fail in
//! the guest with an obscure "not found". So every directory they are taken from is
//! checked first ([`check_dir`]): each file must be an ELF executable with no
//! interpreter (no `PT_INTERP` program header), else the pull is refused with an error
//! naming the file and saying how to get the static ones (`scripts/build-guest.sh
//! release`).
//!
//! The program headers are read by hand (about 40 lines): an ELF parsing crate would be
//! more code in the build than this whole check.

use std::path::{Path, PathBuf};

/// The guest binaries, as they are named in a guest binaries directory.
pub const NAMES: [&str; 2] = ["banger-init", "banger-agent"];

const HOW: &str = "build the static ones with `scripts/build-guest.sh release` (into target/guest/) and install them to /usr/lib/banger, or point `[images] guest_binaries_dir` at them";

/// Why a guest binary cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GuestBinaryError {
    #[error("the guest binary {path} is missing: {HOW}")]
    Missing { path: PathBuf },
    #[error(
        "the guest binary {path} is dynamically linked (it asks for the ELF interpreter {interpreter}), so it would not run inside a guest: {HOW}"
    )]
    Dynamic { path: PathBuf, interpreter: String },
    #[error("the guest binary {path} is not an ELF executable ({detail}): {HOW}")]
    NotElf { path: PathBuf, detail: &'static str },
    #[error("cannot read the guest binary {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Check `dir` holds both guest binaries, each a static ELF executable.
pub fn check_dir(dir: &Path) -> Result<(), GuestBinaryError> {
    NAMES.iter().try_for_each(|n| check_file(&dir.join(n)))
}

/// Check one guest binary is a static ELF executable.
pub fn check_file(path: &Path) -> Result<(), GuestBinaryError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(GuestBinaryError::Missing {
                path: path.to_owned(),
            });
        }
        Err(source) => {
            return Err(GuestBinaryError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    match interpreter(&bytes) {
        Ok(None) => Ok(()),
        Ok(Some(interpreter)) => Err(GuestBinaryError::Dynamic {
            path: path.to_owned(),
            interpreter,
        }),
        Err(detail) => Err(GuestBinaryError::NotElf {
            path: path.to_owned(),
            detail,
        }),
    }
}

/// The ELF interpreter an executable asks for (its `PT_INTERP`), if any. 32- and 64-bit,
/// either byte order.
pub fn interpreter(b: &[u8]) -> Result<Option<String>, &'static str> {
    const PT_INTERP: u32 = 3;
    if b.len() < 52 || &b[..4] != b"\x7fELF" {
        return Err("no ELF header");
    }
    let (wide, big) = match (b[4], b[5]) {
        (c @ (1 | 2), d @ (1 | 2)) => (c == 2, d == 2),
        _ => return Err("unknown ELF class or byte order"),
    };
    let uint = |at: usize, len: usize| -> Result<u64, &'static str> {
        let s = b
            .get(at..at.checked_add(len).ok_or("truncated")?)
            .ok_or("truncated")?;
        Ok(s.iter().enumerate().fold(0u64, |acc, (i, &x)| {
            let shift = 8 * if big { len - 1 - i } else { i };
            acc | (u64::from(x) << shift)
        }))
    };
    let word = if wide { 8 } else { 4 };
    let as_usize = |v: u64| usize::try_from(v).map_err(|_| "offset out of range");
    let (phoff, phentsize, phnum) = if wide {
        (uint(32, 8)?, uint(54, 2)?, uint(56, 2)?)
    } else {
        (uint(28, 4)?, uint(42, 2)?, uint(44, 2)?)
    };
    for i in 0..phnum {
        let at = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or("offset out of range")?;
        let at = as_usize(at)?;
        if uint(at, 4)? != u64::from(PT_INTERP) {
            continue;
        }
        // p_offset and p_filesz: after p_type (+ p_flags on 64-bit).
        let field = |rel: usize| uint(at.checked_add(rel).ok_or("truncated")?, word);
        let (off, size) = if wide {
            (field(8)?, field(32)?)
        } else {
            (field(4)?, field(16)?)
        };
        let (off, size) = (as_usize(off)?, as_usize(size)?);
        let end = off.checked_add(size).ok_or("truncated")?;
        let path = b.get(off..end).ok_or("truncated")?;
        let path = path.split(|&c| c == 0).next().unwrap_or_default();
        return Ok(Some(String::from_utf8_lossy(path).into_owned()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 little-endian header with one program header of type `p_type`
    /// pointing at `interp` right after it.
    fn elf64(p_type: u32, interp: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&p_type.to_le_bytes());
        b[72..80].copy_from_slice(&120u64.to_le_bytes());
        b[96..104].copy_from_slice(&(interp.len() as u64).to_le_bytes());
        b.extend_from_slice(interp);
        b
    }

    /// The same in ELF32 big-endian.
    fn elf32_be(p_type: u32, interp: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 52 + 32];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 1;
        b[5] = 2;
        b[28..32].copy_from_slice(&52u32.to_be_bytes());
        b[42..44].copy_from_slice(&32u16.to_be_bytes());
        b[44..46].copy_from_slice(&1u16.to_be_bytes());
        b[52..56].copy_from_slice(&p_type.to_be_bytes());
        b[56..60].copy_from_slice(&84u32.to_be_bytes());
        b[68..72].copy_from_slice(&(interp.len() as u32).to_be_bytes());
        b.extend_from_slice(interp);
        b
    }

    #[test]
    fn the_interpreter_is_read_from_the_program_headers() {
        let ld = b"/lib64/ld-linux-x86-64.so.2\0";
        assert_eq!(
            interpreter(&elf64(3, ld)).unwrap().as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(
            interpreter(&elf32_be(3, b"/lib/ld.so.1\0"))
                .unwrap()
                .as_deref(),
            Some("/lib/ld.so.1")
        );
        // PT_LOAD only: static.
        assert_eq!(interpreter(&elf64(1, b"")).unwrap(), None);
        assert_eq!(interpreter(&elf32_be(1, b"")).unwrap(), None);
    }

    #[test]
    fn what_is_not_an_elf_is_refused_without_panicking() {
        assert!(interpreter(b"#!/bin/sh\necho hi\n").is_err());
        assert!(interpreter(&[]).is_err());
        let mut truncated = elf64(3, b"/lib64/ld-linux-x86-64.so.2\0");
        truncated.truncate(100);
        assert_eq!(interpreter(&truncated), Err("truncated"));
        let mut huge = elf64(3, b"x");
        huge[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(interpreter(&huge).is_err());
    }

    #[test]
    fn a_dynamic_binary_is_refused_naming_the_file_and_the_fix() {
        // /bin/true is dynamically linked on every distribution banger targets.
        let e = check_file(Path::new("/bin/true")).unwrap_err();
        assert!(matches!(e, GuestBinaryError::Dynamic { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("/bin/true")
                && msg.contains("dynamically linked")
                && msg.contains("scripts/build-guest.sh release"),
            "{msg}"
        );
    }

    #[test]
    fn a_static_binary_is_accepted() {
        // busybox-static (a dependency of the test rig) installs a static /bin/busybox.
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "this test needs busybox-static (apt-get install busybox-static)"
        );
        check_file(busybox).unwrap();
    }

    #[test]
    fn a_directory_needs_both_binaries_static() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_dir(dir.path()).unwrap_err();
        assert!(matches!(e, GuestBinaryError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("banger-init"), "{e}");
        std::fs::copy("/bin/busybox", dir.path().join("banger-init")).unwrap();
        std::fs::copy("/bin/true", dir.path().join("banger-agent")).unwrap();
        let e = check_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains("banger-agent"), "{e}");
        std::fs::copy("/bin/busybox", dir.path().join("banger-agent")).unwrap();
        check_dir(dir.path()).unwrap();
        std::fs::write(dir.path().join("banger-agent"), b"#!/bin/sh\n").unwrap();
        let e = check_dir(dir.path()).unwrap_err();
        assert!(matches!(e, GuestBinaryError::NotElf { .. }), "{e}");
    }
}
