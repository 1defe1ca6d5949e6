//! End-to-end tests of `banger update` against a release server on 127.0.0.1.
//!
//! Each test installs the built `banger` + `bangerd` (stripped copies) into a prefix, runs
//! a user daemon from there, builds a release the way `scripts/publish-release.sh` lays
//! it out — tarball, `SHA256SUMS`, base64 DER ECDSA P-256 `SHA256SUMS.sig`, manifest —
//! signed with a key made by the test, serves it over HTTP from a thread, and runs the
//! installed `banger update` with the debug-only channel override
//! (`BANGER_TEST_UPDATE_MANIFEST_URL`, `BANGER_TEST_UPDATE_KEY`).
//!
//! The "new" release is the same build with its embedded commit rewritten in place (same
//! length), so the daemon that answers after the update provably runs the new bytes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use p256::ecdsa::{Signature, SigningKey, signature::Signer};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use sha2::{Digest, Sha256};

fn built(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_banger")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace",
        p.display()
    );
    p
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A static file server on 127.0.0.1 (HTTP/1.1, one request per connection).
struct Server {
    addr: std::net::SocketAddr,
}

impl Server {
    fn start(root: PathBuf) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let root = root.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let file = root.join(path.trim_start_matches('/'));
                    let mut conn = conn;
                    match std::fs::read(&file) {
                        Ok(body) if !path.contains("..") => {
                            let _ = write!(
                                conn,
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = conn.write_all(&body);
                        }
                        _ => {
                            let _ = conn.write_all(
                                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                            );
                        }
                    }
                });
            }
        });
        Server { addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }
}

/// The commit embedded in a build (`bangerd --version`: "… (commit X, built …)").
fn commit_of(bin: &Path) -> String {
    // `banger --version` prints "banger 0.1.0 (commit …", bangerd likewise.
    let out = Command::new(bin).arg("--version").output().unwrap();
    let t = text(&out.stdout);
    t.split("commit ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no commit in {t}"))
        .to_owned()
}

/// A stripped copy of `src` with `from` replaced by `to` (same length) everywhere.
fn patched_copy(src: &Path, dest: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let st = Command::new("strip")
        .arg("-o")
        .arg(dest)
        .arg(src)
        .status()
        .unwrap();
    assert!(st.success(), "strip {}", src.display());
    if from != to {
        // perl: fast on a 20 MB file where a debug-built loop is not.
        let st = Command::new("perl")
            .args(["-0777", "-pi", "-e", &format!("s/{from}/{to}/g")])
            .arg(dest)
            .status()
            .unwrap();
        assert!(st.success(), "patch {}", dest.display());
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        commit_of(dest) == to,
        "{} does not report commit {to}",
        dest.display()
    );
}

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32].into()).unwrap()
}

fn sign(k: &SigningKey, data: &[u8]) -> String {
    let sig: Signature = k.sign(data);
    base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes()) + "\n"
}

/// How to build (or spoil) a release.
#[derive(Default)]
struct Spec {
    /// Replace the release's bangerd with this shell script.
    bangerd_script: Option<String>,
    /// Flip a byte of the tarball after SHA256SUMS was made.
    tamper_tarball: bool,
    /// Change SHA256SUMS after it was signed.
    tamper_sums: bool,
    /// Sign with this key instead of the trusted one.
    signer: Option<u8>,
    /// Point the manifest at a file that is not there.
    missing_tarball: bool,
    /// The commit the manifest claims (default: the patched one).
    manifest_commit: Option<String>,
}

/// One test's world: prefix with the installed binaries, XDG home, daemon, server.
struct World {
    dir: tempfile::TempDir,
    server: Server,
    /// The commit each built binary carries (`banger` and `bangerd` may differ)...
    old: [String; 2],
    /// ...and the one its "new release" copy reports (the same for both).
    new: [String; 2],
    /// = old[1] and new[1]: bangerd's, what the daemon answers.
    old_commit: String,
    new_commit: String,
}

const BINS: [&str; 2] = ["banger", "bangerd"];

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        for d in ["prefix/bin", "run", "www"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let old = BINS.map(|b| commit_of(&built(b)));
        // One commit for the whole new release, as a real release has: bangerd's with
        // every character changed (same length as both old ones: they are built alike).
        let one: String = old[1]
            .chars()
            .map(|c| if c == 'f' { 'e' } else { 'f' })
            .collect();
        let new = [one.clone(), one];
        // The installed build: one commit for both binaries (bangerd's), as a real
        // install has (a workspace build may stamp them with different commits).
        for (i, b) in BINS.iter().enumerate() {
            let dest = dir.path().join("prefix/bin").join(b);
            patched_copy(&built(b), &dest, &old[i], &old[1]);
        }
        let (old_commit, new_commit) = (old[1].clone(), new[1].clone());
        let key_pem = key(1)
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        std::fs::write(dir.path().join("trusted.pub"), key_pem).unwrap();
        let server = Server::start(dir.path().join("www"));
        World {
            dir,
            server,
            old,
            new,
            old_commit,
            new_commit,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.path().join("prefix/bin").join(name)
    }

    fn socket(&self) -> PathBuf {
        self.path().join("run/banger/bangerd.sock")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_of(&self.bin("banger"), args)
    }

    fn cmd_of(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        for (k, _) in std::env::vars() {
            if k.starts_with("BANGER_") || k.starts_with("XDG_") {
                cmd.env_remove(k);
            }
        }
        let p = self.path();
        cmd.env("HOME", p)
            .env("XDG_RUNTIME_DIR", p.join("run"))
            .env("XDG_DATA_HOME", p.join("data"))
            .env("XDG_STATE_HOME", p.join("state"))
            .env("XDG_CACHE_HOME", p.join("cache"))
            .env("XDG_CONFIG_HOME", p.join("config"))
            .env("BANGER_SOCKET", self.socket())
            .env("BANGER_DNS_LISTEN", "127.0.0.1:0")
            .env(
                "BANGER_TEST_UPDATE_MANIFEST_URL",
                self.server.url("releases/manifest.json"),
            )
            .env("BANGER_TEST_UPDATE_KEY", p.join("trusted.pub"))
            .args(args);
        cmd
    }

    fn banger(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn status(&self) -> serde_json::Value {
        let out = self.banger(&["daemon", "status", "--json"]);
        assert!(out.status.success(), "daemon status: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.path().join("data/banger/bangerd.lock"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Publish release `version` into www/releases as `spec` says.
    fn publish(&self, version: &str, spec: Spec) {
        let rel = self.path().join("www/releases");
        let vdir = rel.join(format!("v{version}"));
        std::fs::create_dir_all(&vdir).unwrap();
        let stage = self.path().join("build");
        std::fs::create_dir_all(&stage).unwrap();
        for (i, b) in BINS.iter().enumerate() {
            patched_copy(&built(b), &stage.join(b), &self.old[i], &self.new[i]);
        }
        if let Some(script) = &spec.bangerd_script {
            std::fs::write(stage.join("bangerd"), script).unwrap();
        }
        std::fs::write(
            stage.join("bangerd.service"),
            include_str!("../../systemd/bangerd.service"),
        )
        .unwrap();
        let name = format!("banger-{version}-{}-linux.tar.gz", std::env::consts::ARCH);
        let tarball = vdir.join(&name);
        {
            let gz = flate2::write::GzEncoder::new(
                std::fs::File::create(&tarball).unwrap(),
                flate2::Compression::none(),
            );
            let mut tar = tar::Builder::new(gz);
            for f in ["banger", "bangerd", "bangerd.service"] {
                tar.append_path_with_name(stage.join(f), f).unwrap();
            }
            tar.into_inner().unwrap().finish().unwrap();
        }
        let bytes = std::fs::read(&tarball).unwrap();
        let mut sums = format!("{}  {name}\n", hex(&Sha256::digest(&bytes)));
        let sig = sign(&key(spec.signer.unwrap_or(1)), sums.as_bytes());
        if spec.tamper_sums {
            sums = format!("{}  {name}\n", "0".repeat(64));
        }
        std::fs::write(vdir.join("SHA256SUMS"), &sums).unwrap();
        std::fs::write(vdir.join("SHA256SUMS.sig"), sig).unwrap();
        if spec.tamper_tarball {
            let mut b = bytes.clone();
            let mid = b.len() / 2;
            b[mid] ^= 0xff;
            std::fs::write(&tarball, b).unwrap();
        }
        let tar_path = if spec.missing_tarball {
            format!("v{version}/gone/{name}")
        } else {
            format!("v{version}/{name}")
        };
        let manifest = serde_json::json!({
            "schema": 1,
            "latest": version,
            "releases": [{
                "version": version,
                "commit": spec.manifest_commit.clone().unwrap_or_else(|| self.new_commit.clone()),
                "tarballs": { std::env::consts::ARCH: tar_path },
                "sha256sums": format!("v{version}/SHA256SUMS"),
                "signature": format!("v{version}/SHA256SUMS.sig"),
            }],
        });
        std::fs::write(rel.join("manifest.json"), manifest.to_string()).unwrap();
    }

    fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(self.path().join("prefix/bin"))
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn staging_left(&self) -> Vec<String> {
        std::fs::read_dir(self.path().join("cache/banger/updates"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Start the daemon from the prefix; returns its pid.
    fn start_daemon(&self) -> i64 {
        let out = self.banger(&["daemon", "start"]);
        assert!(out.status.success(), "daemon start: {}", text(&out.stderr));
        let s = self.status();
        assert_eq!(s["commit"], self.old_commit.as_str());
        s["pid"].as_i64().unwrap()
    }

    /// `banger update` fails with `needle` in its message, and nothing changed.
    fn refused(&self, needle: &str) {
        let before = self.snapshot();
        let pid = self.start_daemon();
        let out = self.banger(&["update"]);
        let err = text(&out.stderr);
        assert!(
            !out.status.success(),
            "update succeeded: {}",
            text(&out.stdout)
        );
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
        assert_eq!(self.snapshot(), before, "the installation changed");
        let s = self.status();
        assert_eq!(s["pid"].as_i64().unwrap(), pid, "the daemon was restarted");
        assert_eq!(s["commit"], self.old_commit.as_str());
        assert!(
            self.staging_left().is_empty(),
            "staging left: {:?}",
            self.staging_left()
        );
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(pid) = self.daemon_pid() {
            let is_ours = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "bangerd");
            if is_ours {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

#[test]
fn a_good_release_installs_and_the_new_version_answers() {
    let w = World::new();
    w.publish("0.1.0", Spec::default());
    let old_pid = w.start_daemon();
    // `banger version` shows the daemon's build when it differs (the new CLI, old daemon)...
    let v = w
        .cmd_of(&w.path().join("build/banger"), &["version"])
        .output()
        .unwrap();
    let said = text(&v.stdout);
    assert!(
        said.contains(&format!("commit {}", w.old_commit)) && said.contains("another build"),
        "{said}"
    );
    // ...and not when it is the same.
    let said = text(&w.banger(&["version"]).stdout);
    assert!(said.contains("bangerd same build"), "{said}");

    let check = w.banger(&["update", "--check", "--json"]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    let c: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(c["update_available"], true);

    // --dry-run verifies and stages but installs nothing.
    let before = w.snapshot();
    let dry = w.banger(&["update", "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(
        text(&dry.stdout).contains("verified"),
        "{}",
        text(&dry.stdout)
    );
    assert_eq!(w.snapshot(), before);
    assert!(w.staging_left().is_empty());

    let out = w.banger(&["update"]);
    assert!(
        out.status.success(),
        "update failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let s = w.status();
    assert_eq!(s["commit"], w.new_commit.as_str(), "the new daemon answers");
    assert_ne!(s["pid"].as_i64().unwrap(), old_pid);
    let v: serde_json::Value =
        serde_json::from_slice(&w.banger(&["version", "--json"]).stdout).unwrap();
    assert_eq!(v["client"]["commit"], w.new[0].as_str());
    // Only the two binaries are left: no backups, no temporary files, no staging.
    let names: Vec<String> = w.snapshot().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["banger", "bangerd"]);
    assert!(w.staging_left().is_empty());
    // Now it is up to date.
    let again = w.banger(&["update"]);
    assert!(again.status.success());
    assert!(
        text(&again.stdout).contains("up to date"),
        "{}",
        text(&again.stdout)
    );
}

#[test]
fn a_tampered_tarball_is_refused() {
    let w = World::new();
    w.publish(
        "0.1.0",
        Spec {
            tamper_tarball: true,
            ..Spec::default()
        },
    );
    w.refused("tampered with; nothing was installed");
}

#[test]
fn a_tampered_sha256sums_is_refused() {
    let w = World::new();
    w.publish(
        "0.1.0",
        Spec {
            tamper_sums: true,
            ..Spec::default()
        },
    );
    w.refused("signature of SHA256SUMS does not verify");
}

#[test]
fn a_signature_by_another_key_is_refused() {
    let w = World::new();
    w.publish(
        "0.1.0",
        Spec {
            signer: Some(2),
            ..Spec::default()
        },
    );
    w.refused("signature of SHA256SUMS does not verify");
}

#[test]
fn a_manifest_pointing_at_a_missing_file_is_refused() {
    let w = World::new();
    w.publish(
        "0.1.0",
        Spec {
            missing_tarball: true,
            ..Spec::default()
        },
    );
    w.refused("cannot fetch the release tarball");
}

#[test]
fn a_staged_bangerd_whose_migration_check_fails_is_not_installed() {
    let w = World::new();
    w.publish(
        "0.1.0",
        Spec {
            bangerd_script: Some(
                "#!/bin/sh\necho 'bangerd: the store has schema version 99, newer than this bangerd' >&2\nexit 1\n"
                    .into(),
            ),
            ..Spec::default()
        },
    );
    w.refused("`bangerd --check-migrations` failed): the store has schema version 99");
}

#[test]
fn a_daemon_that_does_not_restart_is_rolled_back() {
    let w = World::new();
    w.publish(
        "0.1.0",
        Spec {
            bangerd_script: Some(
                "#!/bin/sh\n[ \"$1\" = --check-migrations ] && exit 0\necho 'bangerd: boom' >&2\nexit 1\n"
                    .into(),
            ),
            ..Spec::default()
        },
    );
    let before = w.snapshot();
    w.start_daemon();
    let out = w.banger(&["update"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("did not restart") && err.contains("boom"),
        "{err}"
    );
    assert!(err.contains("rolled back"), "{err}");
    assert_eq!(w.snapshot(), before);
    assert_eq!(w.status()["commit"], w.old_commit.as_str());
    assert!(w.staging_left().is_empty());
}

#[test]
fn a_release_failing_its_check_after_the_restart_is_rolled_back() {
    let w = World::new();
    // The daemon comes up, but not as the release the manifest describes.
    let wrong: String = w.old_commit.chars().map(|_| '0').collect();
    w.publish(
        "0.1.0",
        Spec {
            manifest_commit: Some(wrong.clone()),
            ..Spec::default()
        },
    );
    let before = w.snapshot();
    let pid = w.start_daemon();
    let out = w.banger(&["update"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("failed its check after the restart"), "{err}");
    assert!(err.contains(&wrong) && err.contains("rolled back"), "{err}");
    assert_eq!(w.snapshot(), before);
    let s = w.status();
    assert_eq!(
        s["commit"],
        w.old_commit.as_str(),
        "the old build runs again"
    );
    assert_ne!(s["pid"].as_i64().unwrap(), pid);
}

/// Run `openssl` with `args` in `dir`, asserting success.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        text(&out.stderr)
    );
}

/// `openssl s_server -WWW` serving `root` over TLS on 127.0.0.1; killed on drop.
struct TlsServer {
    child: std::process::Child,
    port: u16,
}

impl TlsServer {
    /// A CA and a leaf for localhost/127.0.0.1 in `dir` (`ca.pem`, `leaf.pem`, `leaf.key`).
    fn start(dir: &Path, root: &Path) -> TlsServer {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=banger test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(dir.join("leaf.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n").unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "leaf.pem",
                "-days",
                "1",
                "-extfile",
                "leaf.ext",
            ],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(dir.join("leaf.pem"))
            .arg("-key")
            .arg(dir.join("leaf.key"))
            .current_dir(root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "s_server did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        TlsServer { child, port }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn releases_come_over_https_trusting_the_hosts_ca_store_only() {
    let w = World::new();
    w.publish("0.1.0", Spec::default());
    let pki = w.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let tls = TlsServer::start(&pki, &w.path().join("www"));
    let url = format!("https://localhost:{}/releases/manifest.json", tls.port);
    let before = w.snapshot();
    // The host's CA store (rustls-native-certs honours SSL_CERT_FILE) trusts the test CA:
    // the release downloads and verifies over TLS.
    let out = w
        .cmd(&["update", "--dry-run"])
        .env("BANGER_TEST_UPDATE_MANIFEST_URL", &url)
        .env("SSL_CERT_FILE", pki.join("ca.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "update over https: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("verified"),
        "{}",
        text(&out.stdout)
    );
    // A server whose certificate the host does not trust is refused.
    let out = w
        .cmd(&["update", "--check"])
        .env("BANGER_TEST_UPDATE_MANIFEST_URL", &url)
        .env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("TLS failed") && err.contains("UnknownIssuer"),
        "{err}"
    );
    assert_eq!(w.snapshot(), before);
    assert!(w.staging_left().is_empty());
}
