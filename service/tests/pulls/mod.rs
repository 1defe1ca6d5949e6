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

/// The ELF inside [`kernel_bundle`]'s bzImage.
pub fn kernel_elf() -> Vec<u8> {
    banger_actors::kernel_format::fixture::minimal_elf(64 << 10)
}

/// An honest kernel bundle: vmlinuz (a bzImage whose LZ4 payload is [`kernel_elf`], as
/// Debian's), initrd, modules/ with a symlink inside it.
pub fn kernel_bundle(dir: &Path) -> Vec<u8> {
    use banger_actors::kernel_format::fixture::{bzimage, lz4_legacy};
    let k = dir.join("kernel-src");
    std::fs::create_dir_all(k.join("modules/6.1.0/kernel")).unwrap();
    std::fs::write(k.join("vmlinuz"), bzimage(&lz4_legacy(&kernel_elf()))).unwrap();
    std::fs::write(k.join("initrd"), b"initrd").unwrap();
    std::fs::write(k.join("modules/6.1.0/kernel/virtio.ko"), b"module").unwrap();
    std::os::unix::fs::symlink("kernel/virtio.ko", k.join("modules/6.1.0/alias.ko")).unwrap();
    let mut out = Vec::new();
    banger_actors::pull::bundle::make_bundle(
        &[
            ("vmlinuz".into(), k.join("vmlinuz")),
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

/// An entry of a hand-made OCI layer.
#[derive(Debug, Clone)]
pub struct E {
    pub name: String,
    pub kind: K,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub xattr: Option<(String, Vec<u8>)>,
}

#[derive(Debug, Clone)]
pub enum K {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    Hard(String),
    Char,
}

impl E {
    fn new(name: &str, kind: K, mode: u32) -> E {
        E {
            name: name.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            xattr: None,
        }
    }
    pub fn file(name: &str, data: &[u8]) -> E {
        E::new(name, K::File(data.to_vec()), 0o644)
    }
    pub fn dir(name: &str) -> E {
        E::new(name, K::Dir, 0o755)
    }
    pub fn symlink(name: &str, target: &str) -> E {
        E::new(name, K::Symlink(target.into()), 0o777)
    }
    pub fn hard(name: &str, target: &str) -> E {
        E::new(name, K::Hard(target.into()), 0o644)
    }
    pub fn chardev(name: &str) -> E {
        E::new(name, K::Char, 0o666)
    }
    pub fn mode(mut self, m: u32) -> E {
        self.mode = m;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> E {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn xattr(mut self, k: &str, v: &[u8]) -> E {
        self.xattr = Some((k.into(), v.to_vec()));
        self
    }
}

/// An uncompressed layer tar of `entries`, names and link targets written raw.
pub fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if let Some((k, v)) = &e.xattr {
            let key = format!("SCHILY.xattr.{k}");
            b.append_pax_extensions([(key.as_str(), v.as_slice())])
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        let data: &[u8] = match &e.kind {
            K::File(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                d
            }
            K::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                &[]
            }
            K::Symlink(t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                set_raw(&mut h.as_old_mut().linkname, t);
                &[]
            }
            K::Hard(t) => {
                h.set_entry_type(tar::EntryType::Link);
                set_raw(&mut h.as_old_mut().linkname, t);
                &[]
            }
            K::Char => {
                h.set_entry_type(tar::EntryType::Char);
                &[]
            }
        };
        set_raw(&mut h.as_old_mut().name, &e.name);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Debian's `docker-registry`, run as a plain process on 127.0.0.1:<free port> with its
/// own config and storage; killed when dropped. Its access log is kept to count requests.
pub struct Registry {
    child: std::process::Child,
    pub addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("docker-registry (apt install docker-registry; scripts/rig/install-deps.sh)");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the registry did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// GETs of blobs of `repo` so far.
    pub fn blob_gets(&self, repo: &str) -> usize {
        self.count(&format!("\"GET /v2/{repo}/blobs/sha256:"))
    }

    /// GETs of manifests of `repo` so far.
    pub fn manifest_gets(&self, repo: &str) -> usize {
        self.count(&format!("\"GET /v2/{repo}/manifests/"))
    }

    /// Build an image of `layers` (uncompressed tars) with umoci and push it with skopeo to
    /// `repo:tag` (`v2s2`: as a Docker v2 schema 2 manifest). Returns the reference.
    pub fn push(
        &self,
        work: &Path,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        arch: &str,
        v2s2: bool,
    ) -> String {
        let layout = work.join(format!("layout-{}", uuid_like()));
        run("umoci", &["init", "--layout", layout.to_str().unwrap()]);
        let image = format!("{}:t", layout.display());
        run("umoci", &["new", "--image", &image]);
        run(
            "umoci",
            &[
                "config",
                "--image",
                &image,
                "--architecture",
                arch,
                "--os",
                "linux",
            ],
        );
        for (i, l) in layers.iter().enumerate() {
            let f = work.join(format!("layer-{}-{i}.tar", uuid_like()));
            std::fs::write(&f, l).unwrap();
            run(
                "umoci",
                &["raw", "add-layer", "--image", &image, f.to_str().unwrap()],
            );
        }
        let reference = format!("{}/{repo}:{tag}", self.addr);
        let mut args = vec![
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ];
        if v2s2 {
            args.extend(["--format", "v2s2"]);
        }
        let src = format!("oci:{image}");
        let dst = format!("docker://{reference}");
        args.extend([src.as_str(), dst.as_str()]);
        run("skopeo", &args);
        reference
    }

    /// The raw manifest of `reference` (digest, size, bytes).
    pub fn manifest(&self, reference: &str) -> (String, usize, Vec<u8>) {
        let o = std::process::Command::new("skopeo")
            .args([
                "--insecure-policy",
                "inspect",
                "--tls-verify=false",
                "--raw",
            ])
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            format!("sha256:{}", sha256(&o.stdout)),
            o.stdout.len(),
            o.stdout,
        )
    }

    /// PUT an OCI image index of `platforms` ((reference, arch)) as `repo:tag`.
    pub fn push_index(&self, repo: &str, tag: &str, platforms: &[(&str, &str)]) -> String {
        let manifests: Vec<_> = platforms
            .iter()
            .map(|(r, arch)| {
                let (digest, size, _) = self.manifest(r);
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest, "size": size,
                    "platform": {"architecture": arch, "os": "linux"}
                })
            })
            .collect();
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests
        })
        .to_string();
        let mut s = TcpStream::connect(&self.addr).unwrap();
        write!(
            s,
            "PUT /v2/{repo}/manifests/{tag} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/vnd.oci.image.index.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
        format!("{}/{repo}:{tag}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn run(cmd: &str, args: &[&str]) {
    let o = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// One inode of an ext4 as debugfs reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub inode: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The whole tree of `image` (path → node), read with debugfs `ls -p`, lost+found left out.
pub fn ext4_tree(image: &Path) -> std::collections::BTreeMap<String, Node> {
    let mut out = std::collections::BTreeMap::new();
    let mut dirs = vec![String::new()];
    while let Some(dir) = dirs.pop() {
        let o = std::process::Command::new("debugfs")
            .arg("-R")
            .arg(format!("ls -p \"/{dir}\""))
            .arg(image)
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            // /inode/mode/uid/gid/name/size/
            let f: Vec<&str> = line.split('/').collect();
            if f.len() < 7 || f[5] == "." || f[5] == ".." || f[5].is_empty() {
                continue;
            }
            let path = if dir.is_empty() {
                f[5].to_owned()
            } else {
                format!("{dir}/{}", f[5])
            };
            if path == "lost+found" {
                continue;
            }
            let node = Node {
                inode: f[1].parse().unwrap(),
                mode: u32::from_str_radix(f[2], 8).unwrap(),
                uid: f[3].parse().unwrap(),
                gid: f[4].parse().unwrap(),
            };
            if node.mode & 0o170000 == 0o040000 {
                dirs.push(path.clone());
            }
            out.insert(path, node);
        }
    }
    out
}

/// debugfs `cat` of a file in `image`.
pub fn ext4_cat(image: &Path, path: &str) -> Vec<u8> {
    std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat \"{path}\""))
        .arg(image)
        .output()
        .unwrap()
        .stdout
}

/// debugfs output of one request (e.g. `stat /x`, `ea_get /x user.k`).
pub fn debugfs(image: &Path, request: &str) -> String {
    let o = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A reverse proxy in front of a registry that cuts every blob response after `cut` bytes
/// of body (a download that dies half-way). One request per connection.
pub struct CuttingProxy {
    pub addr: String,
}

impl CuttingProxy {
    pub fn start(upstream: &str, cut: usize) -> CuttingProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let upstream = upstream.clone();
                std::thread::spawn(move || {
                    let _ = proxy_one(c, &upstream, cut);
                });
            }
        });
        CuttingProxy { addr }
    }
}

fn read_head(r: &mut impl BufRead) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 || l.trim().is_empty() {
            return Ok(lines);
        }
        lines.push(l.trim_end().to_owned());
    }
}

fn proxy_one(client: TcpStream, upstream: &str, cut: usize) -> std::io::Result<()> {
    let mut cr = BufReader::new(client.try_clone()?);
    let head = read_head(&mut cr)?;
    let Some(first) = head.first() else {
        return Ok(());
    };
    let is_blob = first.starts_with("GET ") && first.contains("/blobs/sha256:");
    let mut up = TcpStream::connect(upstream)?;
    let mut req = String::new();
    for l in &head {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            req.push_str(l);
            req.push_str("\r\n");
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes())?;
    let mut ur = BufReader::new(up);
    let resp = read_head(&mut ur)?;
    let mut client = client;
    let mut out = String::new();
    for l in &resp {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(l);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    client.write_all(out.as_bytes())?;
    if is_blob && resp.first().is_some_and(|s| s.contains(" 200")) {
        let mut buf = vec![0u8; cut];
        let n = ur.read(&mut buf)?;
        client.write_all(&buf[..n])?;
    } else {
        std::io::copy(&mut ur, &mut client)?;
    }
    client.flush()?;
    client.shutdown(std::net::Shutdown::Both)
}
