//! File and tar transfers: data in as `Stdin` frames until `StdinEof`, data out as
//! `Stdout` frames until `Exit`. A tar out holds directories, regular files and symlinks;
//! sockets, FIFOs and devices are left out.

use std::io::{Read, Write};
use std::path::Path;

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

/// Add `root/rel` recursively: directories, regular files and symlinks (as links), in
/// name order; sockets, FIFOs and devices are skipped (they cannot be shipped anyway).
fn append_tree<W: Write>(b: &mut tar::Builder<W>, root: &Path, rel: &Path) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let ft = e.file_type()?;
        let name = rel.join(e.file_name());
        if ft.is_dir() {
            b.append_dir(&name, e.path())?;
            append_tree(b, root, &name)?;
        } else if ft.is_file() || ft.is_symlink() {
            b.append_path_with_name(e.path(), &name)?;
        }
    }
    Ok(())
}

pub(super) fn tar_out<C: Conn>(conn: &mut C, dir: &str) -> Result<(), ProtoError> {
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
            append_tree(&mut b, Path::new(dir), Path::new("."))?;
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

        let mut s = request(&Request::TarOut { dir: into });
        let out = read_data(&mut s);
        let names: Vec<String> = tar::Archive::new(out.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.iter().any(|n| n.ends_with("a/b/c.txt")), "{names:?}");
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
