//! `scripts/publish-release.sh` and `scripts/install.sh`: publish a release of the built
//! binaries into a tempdir with a key made by the test (openssl, as a maintainer without
//! cosign would), check the result is what `banger update` reads (manifest schema, the
//! signature verifies with banger's own verifier), install it with install.sh into a
//! temporary prefix over `file://`, and show install.sh refuses tampered files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use banger_update::{self as updater, Manifest};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn built(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger")).with_file_name(name)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

/// A static executable standing in for the guest binaries (busybox-static, a rig
/// dependency), and a dynamically linked one.
const STATIC_ELF: &str = "/bin/busybox";
const DYNAMIC_ELF: &str = "/bin/true";

/// Run publish-release.sh on the key and binaries under `d`, with guest binaries copied
/// from `guest_from` into `d/guest-<name>`.
fn publish(d: &Path, guest_from: &str) -> Output {
    let guest = d.join(format!(
        "guest-{}",
        Path::new(guest_from).file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&guest).unwrap();
    for b in ["banger-init", "banger-agent"] {
        std::fs::copy(guest_from, guest.join(b)).unwrap();
    }
    sh(Command::new(repo().join("scripts/publish-release.sh"))
        .args(["--version", env!("CARGO_PKG_VERSION"), "--key"])
        .arg(d.join("k.pem"))
        .arg("--pubkey")
        .arg(d.join("k.pub"))
        .arg("--out")
        .arg(d.join("out"))
        .arg("--bin-dir")
        .arg(d.join("bin"))
        .arg("--guest-dir")
        .arg(guest))
}

/// A key pair, stripped binaries, and a published release under `dir`.
struct Published {
    dir: tempfile::TempDir,
    version: String,
}

impl Published {
    fn new() -> Published {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(
            sh(Command::new("openssl")
                .args([
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out"
                ])
                .arg(d.join("k.pem")))
            .status
            .success()
        );
        assert!(
            sh(Command::new("openssl")
                .args(["ec", "-pubout", "-in"])
                .arg(d.join("k.pem"))
                .arg("-out")
                .arg(d.join("k.pub")))
            .status
            .success()
        );
        std::fs::create_dir_all(d.join("bin")).unwrap();
        for b in ["banger", "bangerd"] {
            let st = Command::new("strip")
                .arg("-o")
                .arg(d.join("bin").join(b))
                .arg(built(b))
                .status()
                .unwrap();
            assert!(st.success());
        }
        let version = env!("CARGO_PKG_VERSION").to_owned();
        let out = publish(d, STATIC_ELF);
        assert!(
            out.status.success(),
            "publish-release: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        Published { dir, version }
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn tarball(&self) -> PathBuf {
        self.out().join(format!(
            "v{v}/banger-{v}-{}-linux.tar.gz",
            std::env::consts::ARCH,
            v = self.version
        ))
    }

    fn install(&self, prefix: &Path, key: bool) -> Output {
        let mut cmd = Command::new("sh");
        cmd.arg(repo().join("scripts/install.sh"))
            .arg("--url")
            .arg(format!("file://{}/manifest.json", self.out().display()))
            .arg("--prefix")
            .arg(prefix);
        if key {
            cmd.arg("--key").arg(self.dir.path().join("k.pub"));
        }
        sh(&mut cmd)
    }
}

#[test]
fn a_published_release_is_what_update_reads_and_install_sh_installs_it() {
    let p = Published::new();
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(p.out().join("manifest.json")).unwrap())
            .expect("manifest.json is banger's manifest schema");
    assert_eq!(manifest.latest, p.version);
    let rel = &manifest.releases[0];
    assert_eq!(
        rel.tarballs[std::env::consts::ARCH],
        format!(
            "v{v}/banger-{v}-{}-linux.tar.gz",
            std::env::consts::ARCH,
            v = p.version
        )
    );
    // openssl's signature is what banger's verifier (p256) accepts, with the right key only.
    let sums = std::fs::read(p.out().join(&rel.sha256sums)).unwrap();
    let sig = std::fs::read(p.out().join(&rel.signature)).unwrap();
    let pem = std::fs::read_to_string(p.dir.path().join("k.pub")).unwrap();
    let src = updater::Source::new("http://x/manifest.json", &pem).unwrap();
    updater::verify_signature(&src.key, &sums, &sig).unwrap();
    let project = updater::Source::new(
        "http://x/manifest.json",
        &std::fs::read_to_string(repo().join("scripts/release-key.pub")).unwrap(),
    )
    .unwrap();
    assert!(updater::verify_signature(&project.key, &sums, &sig).is_err());
    let name = p
        .tarball()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(updater::listed_hash(&String::from_utf8_lossy(&sums), &name).is_some());

    let prefix = p.dir.path().join("prefix");
    let out = p.install(&prefix, true);
    assert!(
        out.status.success(),
        "install.sh: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for b in ["banger", "bangerd"] {
        assert_eq!(
            std::fs::read(prefix.join("bin").join(b)).unwrap(),
            std::fs::read(p.dir.path().join("bin").join(b)).unwrap()
        );
    }
    let v = sh(Command::new(prefix.join("bin/bangerd")).arg("--version"));
    assert!(text(&v.stdout).starts_with(&format!("bangerd {}", p.version)));
    // The static guest binaries, where bangerd looks beside <prefix>/bin/bangerd.
    for b in ["banger-init", "banger-agent"] {
        assert_eq!(
            std::fs::read(prefix.join("lib/banger").join(b)).unwrap(),
            std::fs::read(STATIC_ELF).unwrap(),
            "{b}"
        );
    }
}

#[test]
fn publish_release_refuses_dynamically_linked_guest_binaries() {
    let p = Published::new();
    let out = publish(p.dir.path(), DYNAMIC_ELF);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("banger-init is dynamically linked") && err.contains("build-guest.sh"),
        "{err}"
    );
}

#[test]
fn install_sh_refuses_tampered_files_and_foreign_signatures() {
    let p = Published::new();
    // Signed by a key that is not banger's (the embedded key is trusted by default).
    let prefix = p.dir.path().join("p1");
    let out = p.install(&prefix, false);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not verify"),
        "{}",
        text(&out.stderr)
    );
    assert!(!prefix.exists(), "something was installed");

    // A tarball changed after signing.
    let tarball = p.tarball();
    let good = std::fs::read(&tarball).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&tarball, &bad).unwrap();
    let prefix = p.dir.path().join("p2");
    let out = p.install(&prefix, true);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not match the signed"),
        "{}",
        text(&out.stderr)
    );
    assert!(!prefix.join("bin").exists());
    std::fs::write(&tarball, &good).unwrap();

    // SHA256SUMS changed after signing.
    let sums = p.out().join(format!("v{}/SHA256SUMS", p.version));
    let text_sums = std::fs::read_to_string(&sums).unwrap();
    std::fs::write(&sums, text_sums.replacen(&text_sums[..8], "00000000", 1)).unwrap();
    let out = p.install(&prefix, true);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not verify"),
        "{}",
        text(&out.stderr)
    );
    assert!(!prefix.join("bin").exists());
}

#[test]
fn install_sh_embeds_the_release_key_the_binaries_embed() {
    let script = std::fs::read_to_string(repo().join("scripts/install.sh")).unwrap();
    let key = std::fs::read_to_string(repo().join("scripts/release-key.pub")).unwrap();
    assert!(
        script.contains(key.trim()),
        "scripts/install.sh's RELEASE_KEY differs from scripts/release-key.pub"
    );
    let url_line = format!("MANIFEST_URL=\"{}\"", banger_default_manifest_url());
    assert!(
        script.contains(&url_line),
        "install.sh's MANIFEST_URL differs from the CLI's default"
    );
}

fn banger_default_manifest_url() -> String {
    // What this build embeds (`banger version --json`: release_manifest).
    let out = sh(Command::new(built("banger"))
        .args(["version", "--json"])
        .env("BANGER_SOCKET", "/nonexistent/s"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["release_manifest"]
        .as_str()
        .expect("release_manifest in version --json")
        .to_owned()
}
