//! File and tar transfers: data in as `Stdin` frames until `StdinEof`, data out as
//! `Stdout` frames until `Exit`. A tar out holds directories, regular files, symlinks and
//! hard links; sockets, FIFOs and devices are left out. With its options it packs a whole
//! running root for `banger image promote`: named directories (/proc, /tmp, …) and other
//! filesystems packed empty, xattrs kept (see [`PackOptions`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::Conn;
use crate::proto::{self, ErrorMsg, ExitStatus, Kind, ProtoError, Response};

/// Reads the payloads of `Stdin` frames until `StdinEof`.
struct FrameReader<'a, C: Conn> {
    conn: &'a mut C,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
    pub total: u64,
}

impl<C: Conn> Read for FrameReader<'_, C> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            let f = proto::read_frame(self.conn).map_err(std::io::Error::other)?;
            match f.kind {
                Kind::Stdin => {
                    self.total += f.payload.len() as u64;
                    self.buf = f.payload;
                    self.pos = 0;
                }
                Kind::StdinEof => self.done = true,
                other => {
                    return Err(std::io::Error::other(format!(
                        "unexpected {other:?} frame in a data stream"
                    )));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Writes `Stdout` frames of up to 64 KiB.
struct FrameWriter<'a, C: Conn> {
    conn: &'a mut C,
    buf: Vec<u8>,
}

impl<C: Conn> Write for FrameWriter<'_, C> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            proto::write_frame(self.conn, Kind::Stdout, &self.buf)
                .map_err(std::io::Error::other)?;
            self.buf.clear();
        }
        Ok(())
    }
}

fn reader<C: Conn>(conn: &mut C) -> FrameReader<'_, C> {
    FrameReader {
        conn,
        buf: Vec::new(),
        pos: 0,
        done: false,
        total: 0,
    }
}

fn error<C: Conn>(conn: &mut C, message: String) -> Result<(), ProtoError> {
    proto::write_json(conn, Kind::Error, &ErrorMsg { message })
}

fn finish_stream<C: Conn>(conn: &mut C) -> Result<(), ProtoError> {
    proto::write_json(
        conn,
        Kind::Exit,
        &ExitStatus {
            code: Some(0),
            signal: None,
        },
    )
}

pub(super) fn put<C: Conn>(conn: &mut C, path: &str, mode: Option<u32>) -> Result<(), ProtoError> {
    use std::os::unix::fs::PermissionsExt;
    let path = Path::new(path);
    let tmp = path.with_file_name(format!(
        ".{}.banger-tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let result = (|| -> std::io::Result<u64> {
        let mut r = reader(conn);
        let mut f = std::fs::File::create(&tmp)?;
        std::io::copy(&mut r, &mut f)?;
        f.sync_all()?;
        if let Some(m) = mode {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m))?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(r.total)
    })();
    match result {
        Ok(bytes) => proto::write_json(conn, Kind::Response, &Response::Written { bytes }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            error(conn, format!("cannot write {}: {e}", path.display()))
        }
    }
}

pub(super) fn get<C: Conn>(conn: &mut C, path: &str) -> Result<(), ProtoError> {
    use std::os::unix::fs::MetadataExt;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return error(conn, format!("cannot read {path}: {e}")),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return error(conn, format!("{path} is not a regular file"));
    }
    proto::write_json(
        conn,
        Kind::Response,
        &Response::FileInfo {
            size: meta.len(),
            mode: meta.mode() & 0o7777,
        },
    )?;
    let mut w = FrameWriter {
        conn,
        buf: Vec::new(),
    };
    std::io::copy(&mut f, &mut w)?;
    w.flush()?;
    finish_stream(conn)
}

pub(super) fn tar_in<C: Conn>(conn: &mut C, dir: &str) -> Result<(), ProtoError> {
    let result = (|| -> std::io::Result<u64> {
        std::fs::create_dir_all(dir)?;
        let mut r = reader(conn);
        {
            let mut archive = tar::Archive::new(&mut r);
            archive.set_preserve_permissions(true);
            archive.set_overwrite(true);
            // unpack() refuses absolute paths, `..` and writes through symlinks that would
            // leave `dir`.
            archive.unpack(dir)?;
        }
        // Drain what the archive did not read (its end padding), so the stream ends cleanly.
        std::io::copy(&mut r, &mut std::io::sink())?;
        Ok(r.total)
    })();
    match result {
        Ok(bytes) => proto::write_json(conn, Kind::Response, &Response::Written { bytes }),
        Err(e) => error(conn, format!("cannot unpack into {dir}: {e}")),
    }
}

/// How [`tar_out`] packs a tree (the options of `TarOut`).
#[derive(Debug, Clone, Default)]
pub struct PackOptions {
    /// Absolute paths whose contents are left out (the directory itself is packed).
    pub exclude: Vec<PathBuf>,
    /// Directories on another filesystem than the root are packed empty.
    pub one_file_system: bool,
    /// Extended attributes as PAX `SCHILY.xattr.*` records.
    pub xattrs: bool,
}

/// Packs a tree: directories, regular files, symlinks (as links) and hard links (as links
/// to the first name packed), in name order, with their modes (setuid/setgid/sticky
/// included), owners and modification times. Sockets, FIFOs and devices are left out
/// (they cannot be shipped anyway; a guest's /dev is devtmpfs). An entry that disappears
/// while the tree is walked (a live system) is skipped; a file that grows or shrinks
/// meanwhile is packed at the size it had when it was listed, so the archive stays valid.
struct Packer<'a, W: Write> {
    b: &'a mut tar::Builder<W>,
    /// The tree's root, as the guest names it.
    root: PathBuf,
    root_dev: u64,
    opts: &'a PackOptions,
    /// (dev, ino) of files with several links → the name they were packed under.
    links: HashMap<(u64, u64), PathBuf>,
}

fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

impl<W: Write> Packer<'_, W> {
    /// Whether the contents of directory `abs` (metadata `meta`) are packed.
    fn descend(&self, abs: &Path, meta: &std::fs::Metadata) -> bool {
        descend(abs, meta.dev(), self.root_dev, self.opts)
    }

    fn header(meta: &std::fs::Metadata, ty: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
        h.set_entry_type(ty);
        h.set_size(0);
        h
    }

    /// A PAX extended header carrying the xattrs of `abs`, before its entry.
    fn xattrs(&mut self, abs: &Path) -> std::io::Result<()> {
        if !self.opts.xattrs {
            return Ok(());
        }
        let Ok(names) = xattr::list(abs) else {
            // Not supported by this filesystem, or gone: nothing to keep.
            return Ok(());
        };
        let mut records = Vec::new();
        for name in names {
            let Some(key) = name.to_str() else { continue };
            if let Ok(Some(value)) = xattr::get(abs, &name) {
                records.extend(pax_record(&format!("SCHILY.xattr.{key}"), &value));
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut h = tar::Header::new_ustar();
        h.set_path("././@PaxHeader")?;
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(records.len() as u64);
        h.set_cksum();
        self.b.append(&h, records.as_slice())
    }

    /// Pack the entries of directory `rel` (relative to the root), recursively.
    fn dir(&mut self, rel: &Path) -> std::io::Result<()> {
        let rd = match std::fs::read_dir(self.root.join(rel)) {
            Ok(rd) => rd,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut entries = Vec::new();
        for e in rd {
            match e {
                Ok(e) => entries.push(e),
                Err(e) if gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = rel.join(e.file_name());
            let abs = self.root.join(&name);
            let meta = match std::fs::symlink_metadata(&abs) {
                Ok(m) => m,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                self.xattrs(&abs)?;
                let h = Self::header(&meta, tar::EntryType::Directory);
                self.b
                    .append_data(&mut h.clone(), &name, std::io::empty())?;
                if self.descend(&abs, &meta) {
                    self.dir(&name)?;
                }
            } else if ft.is_symlink() {
                let target = match std::fs::read_link(&abs) {
                    Ok(t) => t,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(e),
                };
                let mut h = Self::header(&meta, tar::EntryType::Symlink);
                self.b.append_link(&mut h, &name, &target)?;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    let key = (meta.dev(), meta.ino());
                    if let Some(first) = self.links.get(&key) {
                        let mut h = Self::header(&meta, tar::EntryType::Link);
                        let first = first.clone();
                        self.b.append_link(&mut h, &name, &first)?;
                        continue;
                    }
                    self.links.insert(key, name.clone());
                }
                let f = match std::fs::File::open(&abs) {
                    Ok(f) => f,
                    Err(e) if gone(&e) => {
                        self.links.retain(|_, v| *v != name);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                self.xattrs(&abs)?;
                let mut h = Self::header(&meta, tar::EntryType::Regular);
                h.set_size(meta.len());
                // Exactly the listed size: cut what was appended since, pad what was cut.
                let data = f
                    .take(meta.len())
                    .chain(std::io::repeat(0))
                    .take(meta.len());
                self.b.append_data(&mut h, &name, data)?;
            }
        }
        Ok(())
    }
}

/// Whether the contents of the directory `abs`, on device `dev`, are packed.
fn descend(abs: &Path, dev: u64, root_dev: u64, opts: &PackOptions) -> bool {
    !(opts.exclude.iter().any(|x| x == abs) || (opts.one_file_system && dev != root_dev))
}

/// One PAX record: `<len> <key>=<value>\n`, where `len` counts the whole record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// Pack `dir` into `b` (see [`Packer`]); entries are named relative to it.
pub fn pack<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    opts: &PackOptions,
) -> std::io::Result<()> {
    let root_dev = std::fs::metadata(dir)?.dev();
    let mut p = Packer {
        b,
        root: dir.to_owned(),
        root_dev,
        opts,
        links: HashMap::new(),
    };
    p.dir(Path::new(""))
}

pub(super) fn tar_out<C: Conn>(
    conn: &mut C,
    dir: &str,
    opts: &PackOptions,
) -> Result<(), ProtoError> {
    if !Path::new(dir).is_dir() {
        return error(conn, format!("{dir} is not a directory"));
    }
    let result = (|| -> std::io::Result<()> {
        let mut w = FrameWriter {
            conn: &mut *conn,
            buf: Vec::new(),
        };
        {
            let mut b = tar::Builder::new(&mut w);
            b.follow_symlinks(false);
            pack(&mut b, Path::new(dir), opts)?;
            b.finish()?;
        }
        w.flush()
    })();
    match result {
        Ok(()) => finish_stream(conn),
        Err(e) => error(conn, format!("cannot pack {dir}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_support::request;
    use crate::proto::{self, ExitStatus, Kind, Request, Response};
    use std::os::unix::net::UnixStream;

    fn send_data(s: &mut UnixStream, data: &[u8]) {
        for chunk in data.chunks(1000) {
            proto::write_frame(s, Kind::Stdin, chunk).unwrap();
        }
        proto::write_frame(s, Kind::StdinEof, &[]).unwrap();
    }

    fn read_data(s: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let f = proto::read_frame(s).unwrap();
            match f.kind {
                Kind::Stdout => out.extend(f.payload),
                Kind::Exit => {
                    let e: ExitStatus = proto::expect_json(&f, Kind::Exit).unwrap();
                    assert_eq!(e.code, Some(0));
                    return out;
                }
                other => panic!("{other:?}: {}", String::from_utf8_lossy(&f.payload)),
            }
        }
    }

    #[test]
    fn files_round_trip_with_their_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin").display().to_string();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut s = request(&Request::FilePut {
            path: path.clone(),
            mode: Some(0o640),
        });
        send_data(&mut s, &data);
        let r: Response =
            proto::expect_json(&proto::read_frame(&mut s).unwrap(), Kind::Response).unwrap();
        assert_eq!(r, Response::Written { bytes: 200_000 });
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );

        let mut s = request(&Request::FileGet { path: path.clone() });
        let r: Response =
            proto::expect_json(&proto::read_frame(&mut s).unwrap(), Kind::Response).unwrap();
        assert_eq!(
            r,
            Response::FileInfo {
                size: 200_000,
                mode: 0o640
            }
        );
        assert!(read_data(&mut s) == data);

        let mut s = request(&Request::FileGet {
            path: "/no/such".into(),
        });
        let err =
            proto::expect_json::<Response>(&proto::read_frame(&mut s).unwrap(), Kind::Response)
                .unwrap_err();
        assert!(err.to_string().contains("cannot read /no/such"), "{err}");
    }

    #[test]
    fn a_tree_goes_in_and_comes_back_out() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/c.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("b/c.txt", src.path().join("a/link")).unwrap();
        let mut archive = Vec::new();
        {
            let mut b = tar::Builder::new(&mut archive);
            b.follow_symlinks(false);
            b.append_dir_all(".", src.path()).unwrap();
            b.finish().unwrap();
        }
        let dst = tempfile::tempdir().unwrap();
        let into = dst.path().join("repo").display().to_string();
        let mut s = request(&Request::TarIn { dir: into.clone() });
        send_data(&mut s, &archive);
        let r: Response =
            proto::expect_json(&proto::read_frame(&mut s).unwrap(), Kind::Response).unwrap();
        assert!(matches!(r, Response::Written { .. }));
        assert_eq!(
            std::fs::read(dst.path().join("repo/a/b/c.txt")).unwrap(),
            b"hello"
        );
        assert_eq!(
            std::fs::read_link(dst.path().join("repo/a/link"))
                .unwrap()
                .to_str(),
            Some("b/c.txt")
        );

        let mut s = request(&Request::TarOut {
            dir: into,
            exclude: Vec::new(),
            one_file_system: false,
            xattrs: false,
        });
        let out = read_data(&mut s);
        let names: Vec<String> = tar::Archive::new(out.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.iter().any(|n| n.ends_with("a/b/c.txt")), "{names:?}");
    }

    /// A tree like a guest's root: a /proc-like and a /tmp to leave out, a setuid file and
    /// a hard link to it, a symlink, a fifo, an xattr.
    fn root_like() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let p = root.path();
        for d in ["proc/self", "tmp", "opt/app", "usr/bin"] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        std::fs::write(p.join("proc/self/status"), b"Name: agent").unwrap();
        std::fs::write(p.join("tmp/scratch"), b"junk").unwrap();
        std::fs::set_permissions(p.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::write(p.join("opt/app/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            p.join("opt/app/tool"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::hard_link(p.join("opt/app/tool"), p.join("usr/bin/tool")).unwrap();
        std::os::unix::fs::symlink("usr/bin", p.join("bin")).unwrap();
        nix::unistd::mkfifo(&p.join("opt/app/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        root
    }

    fn pack_to_vec(dir: &std::path::Path, opts: &super::PackOptions) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut b = tar::Builder::new(&mut out);
            super::pack(&mut b, dir, opts).unwrap();
            b.finish().unwrap();
        }
        out
    }

    #[test]
    fn a_root_is_packed_without_the_excluded_contents_with_modes_and_hard_links() {
        let root = root_like();
        let p = root.path();
        let has_xattr = xattr::set(p.join("opt/app/tool"), "user.banger", b"kept").is_ok();
        let opts = super::PackOptions {
            exclude: vec![p.join("proc"), p.join("tmp")],
            one_file_system: true,
            xattrs: true,
        };
        let archive = pack_to_vec(p, &opts);
        let mut seen = std::collections::BTreeMap::new();
        let mut ar = tar::Archive::new(archive.as_slice());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let h = e.header().clone();
            let link = e.link_name().unwrap().map(|l| l.display().to_string());
            let xattr = e.pax_extensions().unwrap().and_then(|exts| {
                exts.flatten()
                    .find(|x| x.key() == Ok("SCHILY.xattr.user.banger"))
                    .map(|x| x.value_bytes().to_vec())
            });
            seen.insert(name, (h.entry_type(), h.mode().unwrap(), link, xattr));
        }
        let names: Vec<&str> = seen.keys().map(String::as_str).collect();
        // Excluded directories are there, empty, with their mode; the fifo is left out.
        assert_eq!(
            names,
            [
                "bin",
                "opt",
                "opt/app",
                "opt/app/tool",
                "proc",
                "tmp",
                "usr",
                "usr/bin",
                "usr/bin/tool"
            ]
        );
        assert_eq!(seen["tmp"].1 & 0o7777, 0o1777);
        let tool = &seen["opt/app/tool"];
        assert_eq!(tool.0, tar::EntryType::Regular);
        assert_eq!(tool.1 & 0o7777, 0o4755, "setuid kept");
        if has_xattr {
            assert_eq!(tool.3.as_deref(), Some(&b"kept"[..]));
        }
        let linked = &seen["usr/bin/tool"];
        assert_eq!(linked.0, tar::EntryType::Link);
        assert_eq!(linked.2.as_deref(), Some("opt/app/tool"));
        assert_eq!(seen["bin"].0, tar::EntryType::Symlink);
        assert_eq!(seen["bin"].2.as_deref(), Some("usr/bin"));

        // Without the options: everything but the fifo, no xattrs.
        let archive = pack_to_vec(p, &super::PackOptions::default());
        let names: Vec<String> = tar::Archive::new(archive.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"proc/self/status".to_owned()), "{names:?}");
        assert!(names.contains(&"tmp/scratch".to_owned()), "{names:?}");
    }

    #[test]
    fn other_filesystems_are_not_entered_with_one_file_system() {
        let opts = super::PackOptions {
            exclude: vec!["/tmp".into()],
            one_file_system: true,
            xattrs: false,
        };
        let dir = std::path::Path::new("/srv");
        assert!(super::descend(dir, 7, 7, &opts));
        assert!(!super::descend(dir, 8, 7, &opts), "another filesystem");
        assert!(!super::descend(std::path::Path::new("/tmp"), 7, 7, &opts));
        let off = super::PackOptions::default();
        assert!(super::descend(dir, 8, 7, &off));
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for value in [&b""[..], b"x", &[7u8; 90], &[0u8; 995]] {
            let r = super::pax_record("SCHILY.xattr.user.k", value);
            let (len, _) = std::str::from_utf8(&r[..r.iter().position(|b| *b == b' ').unwrap()])
                .map(|l| (l.parse::<usize>().unwrap(), ()))
                .unwrap();
            assert_eq!(len, r.len(), "{value:?}");
        }
    }

    #[test]
    fn a_hostile_tar_cannot_escape_the_directory() {
        // An entry named ../escaped, written by hand (the tar crate refuses to build one).
        let mut header = tar::Header::new_gnu();
        header.set_size(4);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        let name = b"../escaped";
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_cksum();
        let mut archive = header.as_bytes().to_vec();
        archive.extend_from_slice(b"evil");
        archive.resize(archive.len() + 508 + 1024, 0);
        let root = tempfile::tempdir().unwrap();
        let into = root.path().join("in").display().to_string();
        let mut s = request(&Request::TarIn { dir: into });
        send_data(&mut s, &archive);
        let _ = proto::read_frame(&mut s).unwrap();
        assert!(
            !root.path().join("escaped").exists(),
            "nothing written outside"
        );
    }
}
