//! Test support for pulls: a small HTTP file server on 127.0.0.1 that counts requests and
//! can misbehave (truncate, delay), bundle builders (honest and hostile), catalogs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a path is served.
#[derive(Debug, Clone)]
pub enum Serve {
    Body(Vec<u8>),
    /// Announce the full length, send only the first `at` bytes, close.
    Truncate(Vec<u8>, usize),
    /// Wait before answering (so concurrent requests overlap).
    Slow(Vec<u8>, Duration),
}

/// A file server on 127.0.0.1:<free port>, one thread per connection.
#[derive(Clone)]
pub struct FileServer {
    pub addr: std::net::SocketAddr,
    files: Arc<Mutex<HashMap<String, Serve>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl FileServer {
    pub fn start() -> FileServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = FileServer {
            addr: l.local_addr().unwrap(),
            files: Default::default(),
            hits: Default::default(),
        };
        let me = s.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let me = me.clone();
                std::thread::spawn(move || me.answer(c));
            }
        });
        s
    }

    pub fn put(&self, path: &str, how: Serve) -> String {
        self.files.lock().unwrap().insert(path.into(), how);
        format!("http://{}{path}", self.addr)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn answer(&self, c: TcpStream) {
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut line = String::new();
        if r.read_line(&mut line).is_err() {
            return;
        }
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                break;
            }
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        *self.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
        let how = self.files.lock().unwrap().get(&path).cloned();
        let mut c = c;
        let head = |len: usize| {
            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
        };
        let _ = match how {
            None => c.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
            Some(Serve::Body(b)) => c
                .write_all(head(b.len()).as_bytes())
                .and_then(|()| c.write_all(&b)),
            Some(Serve::Truncate(b, at)) => c
                .write_all(head(b.len()).as_bytes())
                .and_then(|()| c.write_all(&b[..at])),
            Some(Serve::Slow(b, d)) => {
                std::thread::sleep(d);
                c.write_all(head(b.len()).as_bytes())
                    .and_then(|()| c.write_all(&b))
            }
        };
        let _ = c.flush();
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
}

pub fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    banger_actors::pull::bundle::hex(&sha2::Sha256::digest(b))
}

/// A small real ext4 with one file.
pub fn small_ext4(dir: &Path) -> PathBuf {
    let tree = dir.join("ext4-tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hello"), b"hello from the bundle\n").unwrap();
    let img = dir.join("rootfs.ext4");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.ext4");
    img
}

/// An honest image bundle (rootfs.ext4 + manifest.json naming `kernel`).
pub fn image_bundle(dir: &Path, kernel: &str) -> Vec<u8> {
    let img = small_ext4(dir);
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::json!({"name": "test", "arch": "x86_64", "kernel_ref": kernel}).to_string(),
    )
    .unwrap();
    let mut out = Vec::new();
    banger_actors::pull::bundle::make_bundle(
        &[
            ("rootfs.ext4".into(), img),
            ("manifest.json".into(), manifest),
        ],
        &mut out,
    )
    .unwrap();
    out
}

/// An honest kernel bundle: vmlinux, initrd, modules/ with a symlink inside it.
pub fn kernel_bundle(dir: &Path) -> Vec<u8> {
    let k = dir.join("kernel-src");
    std::fs::create_dir_all(k.join("modules/6.1.0/kernel")).unwrap();
    std::fs::write(k.join("vmlinux"), vec![0x7fu8; 4096]).unwrap();
    std::fs::write(k.join("initrd"), b"initrd").unwrap();
    std::fs::write(k.join("modules/6.1.0/kernel/virtio.ko"), b"module").unwrap();
    std::os::unix::fs::symlink("kernel/virtio.ko", k.join("modules/6.1.0/alias.ko")).unwrap();
    let mut out = Vec::new();
    banger_actors::pull::bundle::make_bundle(
        &[
            ("vmlinux".into(), k.join("vmlinux")),
            ("initrd".into(), k.join("initrd")),
            ("modules".into(), k.join("modules")),
        ],
        &mut out,
    )
    .unwrap();
    out
}

/// A raw entry for a hand-made (possibly hostile) tar.
pub enum Raw<'a> {
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    Dir(&'a str),
    CharDev(&'a str),
}

/// A tar written byte by byte with the tar crate's headers, names set raw (so `../x` and
/// absolute names go in as they are).
pub fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (name, data): (&str, &[u8]) = match e {
            Raw::File(n, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                (n, d)
            }
            Raw::Symlink(n, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                set_raw(&mut h.as_old_mut().linkname, t);
                (n, &[])
            }
            Raw::HardLink(n, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                set_raw(&mut h.as_old_mut().linkname, t);
                (n, &[])
            }
            Raw::Dir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (n, &[])
            }
            Raw::CharDev(n) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o600);
                (n, &[])
            }
        };
        set_raw(&mut h.as_old_mut().name, name);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn set_raw(field: &mut [u8], s: &str) {
    field.fill(0);
    field[..s.len()].copy_from_slice(s.as_bytes());
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// Write catalogs naming `images` and `kernels` ((name, url, bytes, kernel_ref)) into `dir`;
/// returns (images.json, kernels.json).
pub fn catalogs(
    dir: &Path,
    images: &[(&str, &str, &[u8], &str)],
    kernels: &[(&str, &str, &[u8])],
) -> (PathBuf, PathBuf) {
    let entry = |name: &str, url: &str, b: &[u8], k: Option<&str>| {
        serde_json::json!({
            "name": name, "arch": "x86_64", "url": url, "sha256": sha256(b),
            "size": b.len(), "kernel_ref": k, "description": format!("test {name}")
        })
    };
    let i: Vec<_> = images
        .iter()
        .map(|(n, u, b, k)| entry(n, u, b, Some(k)))
        .collect();
    let k: Vec<_> = kernels
        .iter()
        .map(|(n, u, b)| entry(n, u, b, None))
        .collect();
    let ip = dir.join("images.json");
    let kp = dir.join("kernels.json");
    std::fs::write(
        &ip,
        serde_json::json!({"version": 1, "images": i}).to_string(),
    )
    .unwrap();
    std::fs::write(
        &kp,
        serde_json::json!({"version": 1, "kernels": k}).to_string(),
    )
    .unwrap();
    (ip, kp)
}

/// Names in `dir` that a failed pull must not leave behind.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".staging-") || n.ends_with(".partial"))
        .collect()
}

/// Read all of `r` (for the test's own checks).
pub fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}
