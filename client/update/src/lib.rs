//! Signed self-update: release manifest, signature check, staging, atomic swap, restart,
//! post-restart check, automatic rollback.
//!
//! A release is published (see `scripts/publish-release.sh`, `docs/release-process.md`)
//! as three files beside a manifest:
//!
//! ```text
//! manifest.json                      {"schema":1,"latest":"0.2.0","releases":[{
//!                                      "version":"0.2.0","commit":"…",
//!                                      "tarballs":{"x86_64":"v0.2.0/banger-0.2.0-x86_64-linux.tar.gz"},
//!                                      "sha256sums":"v0.2.0/SHA256SUMS",
//!                                      "signature":"v0.2.0/SHA256SUMS.sig"}]}
//! v0.2.0/banger-0.2.0-x86_64-linux.tar.gz   banger, bangerd, bangerd.service
//! v0.2.0/SHA256SUMS                  `sha256sum` output for the tarballs
//! v0.2.0/SHA256SUMS.sig              base64 of an ECDSA P-256 DER signature of SHA256SUMS
//!                                    (what `cosign sign-blob` and `openssl dgst -sha256 -sign` make)
//! ```
//!
//! URLs in the manifest are relative to the manifest's own URL. **Trust** rests on the
//! signature alone: the manifest is not signed, so nothing in it is believed that the
//! signed `SHA256SUMS` does not confirm — the tarball must appear there under its exact
//! file name, which carries the version (`banger-<version>-<arch>.tar.gz`), so a manifest
//! cannot pass an old signed release off as a new one; and a lower version than the one
//! running is refused unless asked for by name (`--to`).
//!
//! [`stage`] downloads `SHA256SUMS` and its signature, verifies the signature against
//! the trusted key (a parameter: the binaries embed the project's key at build time, the
//! tests pass their own), then streams the tarball to disk through SHA-256, compares, and
//! extracts exactly the expected regular files into a fresh staging directory. Nothing in
//! the installation is touched until all of that and the staged
//! `bangerd --check-migrations` have passed. [`apply`] then swaps the binaries one by one
//! with `rename(2)` (the old ones kept as hard links `.<name>.prev`), restarts the daemon
//! through [`ServiceControl`], checks the daemon answers as the new release and doctor
//! finds no new failure, and on any failure renames the old binaries back and restarts
//! again. Staging directories are removed on every path.
//!
//! Who runs it: the swap must outlive the daemon's restart (systemd stops the whole
//! service cgroup) and, for the system service, needs root; so `banger update` runs these
//! steps in the CLI process, and the daemon's `UpdaterActor` (`banger_actors::updater`)
//! is asked first whether a VM operation is in flight. This crate is that library: the
//! CLI links it, not the daemon's supervision tree.

pub mod http;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use p256::ecdsa::{Signature, VerifyingKey, signature::Verifier};
use serde::{Deserialize, Serialize};

pub use http::HttpError;

/// The binaries a release carries and an install has, in swap order.
pub const BINARIES: &[&str] = &["bangerd", "banger"];
/// Other files a release tarball may carry (staged, not swapped by `update`).
pub const EXTRA_FILES: &[&str] = &["bangerd.service"];

const MANIFEST_LIMIT: u64 = 1 << 20;
const SUMS_LIMIT: u64 = 64 << 10;
const SIG_LIMIT: u64 = 4 << 10;
const TARBALL_LIMIT: u64 = 1 << 30;

/// Errors of an update. Every variant before [`UpdateError::Restart`] leaves the
/// installation untouched.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("cannot fetch {what}")]
    Fetch {
        what: &'static str,
        #[source]
        source: HttpError,
    },
    #[error("the release manifest is not valid: {0}")]
    Manifest(String),
    #[error("release {0} is not in the manifest")]
    NoSuchVersion(String),
    #[error("release {version} has no tarball for this architecture ({arch})")]
    NoArch { version: String, arch: String },
    #[error(
        "the signature of SHA256SUMS does not verify against banger's release key: the release was not signed by the banger project, or was altered; nothing was installed"
    )]
    BadSignature,
    #[error("SHA256SUMS.sig is not a base64 DER ECDSA signature: {0}")]
    SignatureFormat(String),
    #[error("SHA256SUMS does not list {0}: the manifest points at a file the release did not sign")]
    NotListed(String),
    #[error(
        "{file}: SHA-256 is {actual} but the signed SHA256SUMS says {expected}: the download is corrupt or was tampered with; nothing was installed"
    )]
    HashMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("the release tarball is not valid: {0}")]
    Tarball(String),
    #[error(
        "the new bangerd refuses this store (`bangerd --check-migrations` failed): {0}; nothing was installed"
    )]
    Migrations(String),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to go from {current} down to {target}; name the version with `--to {target}` to downgrade on purpose"
    )]
    Downgrade { current: String, target: String },
    #[error("another `banger update` is replacing the binaries in {0}; wait for it to finish")]
    Busy(PathBuf),
    #[error("the daemon did not restart on the new binaries ({reason}); {rollback}")]
    Restart { reason: String, rollback: String },
    #[error("the new release failed its check after the restart ({reason}); {rollback}")]
    Verify { reason: String, rollback: String },
}

/// The release manifest. Unknown fields are ignored, on purpose: every banger ever shipped
/// reads this file, so additions must not break old clients; a change old clients must
/// not misread bumps `schema`, which they refuse with a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub latest: String,
    pub releases: Vec<Release>,
}

/// One release in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub version: String,
    /// The commit it was built from (what the new daemon must report after the restart).
    #[serde(default)]
    pub commit: Option<String>,
    /// Release date (RFC 3339), informational.
    #[serde(default)]
    pub date: Option<String>,
    /// Tarball per architecture (`x86_64`, `aarch64`), relative to the manifest.
    pub tarballs: BTreeMap<String, String>,
    pub sha256sums: String,
    pub signature: String,
}

/// Where releases come from and whom to trust.
#[derive(Debug, Clone)]
pub struct Source {
    pub manifest_url: url::Url,
    pub key: VerifyingKey,
}

impl Source {
    /// `key_pem` is a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`, what
    /// `cosign generate-key-pair` writes to cosign.pub and `openssl ec -pubout` prints).
    pub fn new(manifest_url: &str, key_pem: &str) -> Result<Source, String> {
        use p256::pkcs8::DecodePublicKey;
        let manifest_url = url::Url::parse(manifest_url)
            .map_err(|e| format!("bad manifest URL {manifest_url}: {e}"))?;
        let key = VerifyingKey::from_public_key_pem(key_pem.trim())
            .map_err(|e| format!("bad release public key: {e}"))?;
        Ok(Source { manifest_url, key })
    }
}

/// The build that runs now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Current {
    pub version: String,
    pub commit: String,
}

/// What [`choose`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    UpToDate(Release),
    Update(Release),
}

/// Fetch and parse the manifest.
pub async fn fetch_manifest(src: &Source) -> Result<Manifest, UpdateError> {
    let bytes = http::get_bytes(&src.manifest_url, MANIFEST_LIMIT)
        .await
        .map_err(|source| UpdateError::Fetch {
            what: "the release manifest",
            source,
        })?;
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| UpdateError::Manifest(e.to_string()))?;
    if m.schema != 1 {
        return Err(UpdateError::Manifest(format!(
            "schema {} is not understood by this banger (1); update by hand with scripts/install.sh",
            m.schema
        )));
    }
    Ok(m)
}

/// `1.2.3` (an optional leading `v` and a `-pre` suffix ignored) as numbers.
fn version_key(v: &str) -> Vec<u64> {
    v.trim_start_matches('v')
        .split(['-', '+'])
        .next()
        .unwrap_or_default()
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

/// Pick the release to install: `to` by name, else the manifest's latest. A lower version
/// than `current` is refused unless named; the same version and commit is up to date.
pub fn choose(m: &Manifest, to: Option<&str>, current: &Current) -> Result<Choice, UpdateError> {
    let want = to.unwrap_or(&m.latest).trim_start_matches('v');
    let rel = m
        .releases
        .iter()
        .find(|r| r.version.trim_start_matches('v') == want)
        .cloned()
        .ok_or_else(|| UpdateError::NoSuchVersion(want.to_owned()))?;
    let same_version = version_key(&rel.version) == version_key(&current.version);
    let same_commit = rel.commit.as_deref().is_none_or(|c| c == current.commit);
    if same_version && same_commit {
        return Ok(Choice::UpToDate(rel));
    }
    if to.is_none() && version_key(&rel.version) < version_key(&current.version) {
        return Err(UpdateError::Downgrade {
            current: current.version.clone(),
            target: rel.version,
        });
    }
    Ok(Choice::Update(rel))
}

/// A verified release unpacked in a staging directory (removed on drop).
#[derive(Debug)]
pub struct Staged {
    pub release: Release,
    pub tarball: String,
    pub sha256: String,
    dir: tempfile::TempDir,
}

impl Staged {
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join("files").join(name)
    }
}

/// Verify `sums` with the base64 DER signature `sig_b64`.
pub fn verify_signature(
    key: &VerifyingKey,
    sums: &[u8],
    sig_b64: &[u8],
) -> Result<(), UpdateError> {
    use base64::Engine;
    let text: Vec<u8> = sig_b64
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(&text)
        .map_err(|e| UpdateError::SignatureFormat(e.to_string()))?;
    let sig = Signature::from_der(&der).map_err(|e| UpdateError::SignatureFormat(e.to_string()))?;
    key.verify(sums, &sig)
        .map_err(|_| UpdateError::BadSignature)
}

/// The hash `SHA256SUMS` gives for `file` (`<hex>  <name>` or `<hex> *<name>` lines).
pub fn listed_hash(sums: &str, file: &str) -> Option<String> {
    sums.lines().find_map(|l| {
        let (hash, name) = l.split_once(char::is_whitespace)?;
        let name = name.trim_start().trim_start_matches('*');
        (name == file && hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| hash.to_ascii_lowercase())
    })
}

/// Download, verify and unpack `rel` for `arch` into a new directory under `staging_root`.
pub async fn stage(
    src: &Source,
    rel: &Release,
    arch: &str,
    staging_root: &Path,
) -> Result<Staged, UpdateError> {
    let tar_rel = rel.tarballs.get(arch).ok_or_else(|| UpdateError::NoArch {
        version: rel.version.clone(),
        arch: arch.to_owned(),
    })?;
    let join = |rel_url: &str| {
        src.manifest_url
            .join(rel_url)
            .map_err(|e| UpdateError::Manifest(format!("bad URL {rel_url}: {e}")))
    };
    let (tar_url, sums_url, sig_url) = (
        join(tar_rel)?,
        join(&rel.sha256sums)?,
        join(&rel.signature)?,
    );
    let tar_name = tar_url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| UpdateError::Manifest(format!("no file name in {tar_url}")))?
        .to_owned();
    let expected_name = format!(
        "banger-{}-{arch}-linux.tar.gz",
        rel.version.trim_start_matches('v')
    );
    if tar_name != expected_name {
        return Err(UpdateError::Manifest(format!(
            "the tarball of {} must be named {expected_name}, not {tar_name}",
            rel.version
        )));
    }

    let sums = http::get_bytes(&sums_url, SUMS_LIMIT)
        .await
        .map_err(|source| UpdateError::Fetch {
            what: "SHA256SUMS",
            source,
        })?;
    let sig = http::get_bytes(&sig_url, SIG_LIMIT)
        .await
        .map_err(|source| UpdateError::Fetch {
            what: "SHA256SUMS.sig",
            source,
        })?;
    verify_signature(&src.key, &sums, &sig)?;
    let sums = String::from_utf8_lossy(&sums);
    let expected =
        listed_hash(&sums, &tar_name).ok_or_else(|| UpdateError::NotListed(tar_name.clone()))?;

    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| UpdateError::Io { what, path, source }
    };
    std::fs::create_dir_all(staging_root).map_err(io("create", staging_root))?;
    let dir = tempfile::Builder::new()
        .prefix("update-")
        .tempdir_in(staging_root)
        .map_err(io("create a staging directory in", staging_root))?;
    let tar_path = dir.path().join(&tar_name);
    let (_, actual) = http::download(&tar_url, &tar_path, TARBALL_LIMIT)
        .await
        .map_err(|source| UpdateError::Fetch {
            what: "the release tarball",
            source,
        })?;
    if actual != expected {
        return Err(UpdateError::HashMismatch {
            file: tar_name,
            expected,
            actual,
        });
    }
    let files = dir.path().join("files");
    let (tp, fp) = (tar_path.clone(), files.clone());
    tokio::task::spawn_blocking(move || unpack(&tp, &fp))
        .await
        .expect("unpacking does not panic")?;
    Ok(Staged {
        release: rel.clone(),
        tarball: tar_name,
        sha256: actual,
        dir,
    })
}

/// Unpack only the expected regular files (no paths, links or devices) into `to`.
fn unpack(tarball: &Path, to: &Path) -> Result<(), UpdateError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |m: String| UpdateError::Tarball(m);
    std::fs::create_dir_all(to).map_err(|source| UpdateError::Io {
        what: "create",
        path: to.to_owned(),
        source,
    })?;
    let file = std::fs::File::open(tarball).map_err(|source| UpdateError::Io {
        what: "open",
        path: tarball.to_owned(),
        source,
    })?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut seen = Vec::new();
    for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let name = path.to_string_lossy().trim_start_matches("./").to_owned();
        if name.is_empty() && entry.header().entry_type().is_dir() {
            continue;
        }
        let known = BINARIES.contains(&name.as_str()) || EXTRA_FILES.contains(&name.as_str());
        if !known || !entry.header().entry_type().is_file() || seen.contains(&name) {
            return Err(bad(format!(
                "unexpected entry {name:?}: a release holds only the regular files {}",
                [BINARIES, EXTRA_FILES].concat().join(", ")
            )));
        }
        let dest = to.join(&name);
        let mut out = std::fs::File::create(&dest).map_err(|source| UpdateError::Io {
            what: "create",
            path: dest.clone(),
            source,
        })?;
        std::io::copy(&mut entry, &mut out).map_err(|e| bad(format!("{name}: {e}")))?;
        let mode = if BINARIES.contains(&name.as_str()) {
            0o755
        } else {
            0o644
        };
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).map_err(
            |source| UpdateError::Io {
                what: "chmod",
                path: dest.clone(),
                source,
            },
        )?;
        seen.push(name);
    }
    for b in BINARIES {
        if !seen.iter().any(|s| s == b) {
            return Err(bad(format!("{b} is missing")));
        }
    }
    Ok(())
}

/// Run the staged `bangerd --check-migrations` with `args` (e.g. `--system`, `--config`).
pub async fn check_migrations(
    staged: &Staged,
    args: &[std::ffi::OsString],
) -> Result<String, UpdateError> {
    let bin = staged.file("bangerd");
    let out = tokio::process::Command::new(&bin)
        .arg("--check-migrations")
        .args(args)
        .output()
        .await
        .map_err(|source| UpdateError::Io {
            what: "run",
            path: bin.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() {
        let last = text
            .lines()
            .last()
            .unwrap_or("no message")
            .trim_start_matches("bangerd: ");
        return Err(UpdateError::Migrations(format!(
            "{} ({})",
            last, out.status
        )));
    }
    Ok(text)
}

/// Binaries swapped into `bin_dir`, their predecessors kept as `.<name>.prev`.
#[derive(Debug)]
pub struct Swap {
    bin_dir: PathBuf,
    swapped: Vec<&'static str>,
}

fn prev(bin_dir: &Path, name: &str) -> PathBuf {
    bin_dir.join(format!(".{name}.prev"))
}

/// Put the staged binaries in place, one `rename(2)` each (atomic per file). If one fails,
/// those already swapped are put back before returning the error.
pub fn swap(staged: &Staged, bin_dir: &Path) -> Result<Swap, UpdateError> {
    use std::os::unix::fs::PermissionsExt;
    let mut done = Swap {
        bin_dir: bin_dir.to_owned(),
        swapped: Vec::new(),
    };
    for name in BINARIES {
        let step = || -> Result<(), UpdateError> {
            let io = |what, path: &Path| {
                let path = path.to_owned();
                move |source| UpdateError::Io { what, path, source }
            };
            let target = bin_dir.join(name);
            let new = bin_dir.join(format!(".{name}.new"));
            let backup = prev(bin_dir, name);
            // Same directory, so the final rename stays on one file system.
            std::fs::copy(staged.file(name), &new).map_err(io("copy into", &new))?;
            std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755))
                .map_err(io("chmod", &new))?;
            std::fs::File::open(&new)
                .and_then(|f| f.sync_all())
                .map_err(io("sync", &new))?;
            let _ = std::fs::remove_file(&backup);
            if target.exists() {
                std::fs::hard_link(&target, &backup).map_err(io("back up", &target))?;
            }
            std::fs::rename(&new, &target).map_err(|e| {
                let _ = std::fs::remove_file(&new);
                UpdateError::Io {
                    what: "replace",
                    path: target.clone(),
                    source: e,
                }
            })?;
            Ok(())
        };
        if let Err(e) = step() {
            let _ = done.rollback();
            return Err(e);
        }
        done.swapped.push(name);
    }
    Ok(done)
}

impl Swap {
    /// Put the previous binaries back (rename, atomic per file).
    pub fn rollback(&mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        for name in self.swapped.drain(..).rev() {
            let backup = prev(&self.bin_dir, name);
            if let Err(e) = std::fs::rename(&backup, self.bin_dir.join(name)) {
                errors.push(format!("{}: {e}", backup.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Keep the new binaries: drop the backups.
    pub fn commit(mut self) {
        for name in self.swapped.drain(..) {
            let _ = std::fs::remove_file(prev(&self.bin_dir, name));
        }
    }
}

/// Restarting the daemon and checking it afterwards; the CLI implements it for the
/// systemd service (through its `Systemctl`) and for a user daemon.
pub trait ServiceControl {
    /// Restart the daemon so it runs the binaries now in place.
    fn restart(&self) -> impl Future<Output = Result<(), String>>;
    /// After a restart: the daemon answers as `release` and doctor finds no new failure.
    fn verify(&self, release: &Release) -> impl Future<Output = Result<(), String>>;
}

/// An exclusive `flock` on the directory itself (no lock file left in a bin directory):
/// two `banger update` runs never swap the same binaries at once.
pub fn lock_bin_dir(bin_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, UpdateError> {
    use nix::fcntl::{Flock, FlockArg};
    let dir = std::fs::File::open(bin_dir).map_err(|source| UpdateError::Io {
        what: "open",
        path: bin_dir.to_owned(),
        source,
    })?;
    Flock::lock(dir, FlockArg::LockExclusiveNonblock)
        .map_err(|_| UpdateError::Busy(bin_dir.to_owned()))
}

/// Swap in `staged`, restart, verify; roll back and restart again on failure.
pub async fn apply<S: ServiceControl>(
    staged: &Staged,
    bin_dir: &Path,
    service: &S,
) -> Result<(), UpdateError> {
    let _lock = lock_bin_dir(bin_dir)?;
    let mut swapped = swap(staged, bin_dir)?;
    let failure = match service.restart().await {
        Err(reason) => Some((true, reason)),
        Ok(()) => service
            .verify(&staged.release)
            .await
            .err()
            .map(|reason| (false, reason)),
    };
    let Some((at_restart, reason)) = failure else {
        swapped.commit();
        return Ok(());
    };
    tracing::warn!(%reason, "update failed after the swap; rolling back");
    let rollback = match swapped.rollback() {
        Err(e) => format!("rolling back FAILED ({e}); reinstall with scripts/install.sh"),
        Ok(()) => match service.restart().await {
            Ok(()) => "rolled back to the previous binaries, and the daemon runs them again".into(),
            Err(e) => format!(
                "rolled back to the previous binaries, but the daemon did not restart ({e}); see `banger doctor`"
            ),
        },
    };
    Err(if at_restart {
        UpdateError::Restart { reason, rollback }
    } else {
        UpdateError::Verify { reason, rollback }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(v: &str, commit: Option<&str>) -> Release {
        Release {
            version: v.into(),
            commit: commit.map(Into::into),
            date: None,
            tarballs: BTreeMap::new(),
            sha256sums: "SHA256SUMS".into(),
            signature: "SHA256SUMS.sig".into(),
        }
    }

    fn manifest(latest: &str, rels: Vec<Release>) -> Manifest {
        Manifest {
            schema: 1,
            latest: latest.into(),
            releases: rels,
        }
    }

    #[test]
    fn choose_latest_named_up_to_date_and_downgrades() {
        let cur = Current {
            version: "0.2.0".into(),
            commit: "abc".into(),
        };
        let m = manifest(
            "0.3.0",
            vec![
                rel("0.1.0", None),
                rel("0.2.0", Some("abc")),
                rel("0.3.0", None),
            ],
        );
        assert_eq!(
            choose(&m, None, &cur).unwrap(),
            Choice::Update(rel("0.3.0", None))
        );
        assert_eq!(
            choose(&m, Some("v0.2.0"), &cur).unwrap(),
            Choice::UpToDate(rel("0.2.0", Some("abc")))
        );
        assert_eq!(
            choose(&m, Some("0.1.0"), &cur).unwrap(),
            Choice::Update(rel("0.1.0", None))
        );
        assert!(matches!(
            choose(&m, Some("9.9.9"), &cur),
            Err(UpdateError::NoSuchVersion(_))
        ));
        let old = manifest("0.1.0", vec![rel("0.1.0", None)]);
        let err = choose(&old, None, &cur).unwrap_err();
        assert!(err.to_string().contains("--to 0.1.0"), "{err}");
        // Same version, another commit: a rebuild is an update.
        let m = manifest("0.2.0", vec![rel("0.2.0", Some("def"))]);
        assert!(matches!(choose(&m, None, &cur).unwrap(), Choice::Update(_)));
    }

    #[test]
    fn manifests_with_new_fields_still_parse() {
        let m: Manifest = serde_json::from_str(
            r#"{"schema":1,"latest":"0.2.0","mirrors":["x"],"releases":[{"version":"0.2.0",
            "tarballs":{"x86_64":"a"},"sha256sums":"s","signature":"g","notes":"n"}]}"#,
        )
        .unwrap();
        assert_eq!(m.releases[0].version, "0.2.0");
    }

    #[test]
    fn listed_hash_reads_sha256sum_output() {
        let h = "a".repeat(64);
        let sums = format!(
            "{h}  banger-0.2.0-x86_64-linux.tar.gz\n{}  *other\n",
            "b".repeat(64)
        );
        assert_eq!(
            listed_hash(&sums, "banger-0.2.0-x86_64-linux.tar.gz"),
            Some(h)
        );
        assert_eq!(listed_hash(&sums, "other"), Some("b".repeat(64)));
        assert_eq!(listed_hash(&sums, "banger-0.2.0"), None);
        assert_eq!(listed_hash("zz  x\n", "x"), None);
    }

    /// A .tar.gz at `path` with (name, kind) entries: 'f' file, 'l' symlink to /etc/passwd.
    fn tarball(path: &Path, entries: &[(&str, char)]) {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut t = tar::Builder::new(gz);
        for (name, kind) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            if *kind == 'l' {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                t.append_link(&mut h, name, "/etc/passwd").unwrap();
            } else {
                h.set_size(2);
                h.set_cksum();
                // `append_data` refuses `..`; write the raw name for the hostile cases.
                h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
                h.set_cksum();
                t.append(&h, &b"ok"[..]).unwrap();
            }
        }
        t.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn unpack_takes_exactly_the_expected_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let tgz = dir.path().join("r.tar.gz");
        tarball(
            &tgz,
            &[("banger", 'f'), ("bangerd", 'f'), ("bangerd.service", 'f')],
        );
        let out = dir.path().join("ok");
        unpack(&tgz, &out).unwrap();
        assert_eq!(std::fs::read(out.join("banger")).unwrap(), b"ok");
        for (case, entries) in [
            (
                "traversal",
                vec![("banger", 'f'), ("bangerd", 'f'), ("../evil", 'f')],
            ),
            (
                "extra file",
                vec![("banger", 'f'), ("bangerd", 'f'), ("hook.sh", 'f')],
            ),
            ("symlink", vec![("banger", 'f'), ("bangerd", 'l')]),
            ("missing bangerd", vec![("banger", 'f')]),
            (
                "duplicate",
                vec![("banger", 'f'), ("banger", 'f'), ("bangerd", 'f')],
            ),
        ] {
            tarball(&tgz, &entries);
            let to = dir.path().join(case);
            let err = unpack(&tgz, &to).unwrap_err();
            assert!(matches!(err, UpdateError::Tarball(_)), "{case}: {err}");
            assert!(!dir.path().join("evil").exists(), "{case}");
        }
    }

    #[test]
    fn a_second_update_of_the_same_bin_dir_is_refused_while_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_bin_dir(dir.path()).unwrap();
        let err = lock_bin_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("another `banger update`"), "{err}");
        drop(held);
        lock_bin_dir(dir.path()).unwrap();
        // Nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn signatures_verify_only_with_the_right_key_and_content() {
        use base64::Engine;
        use p256::ecdsa::{SigningKey, signature::Signer};
        let key = SigningKey::from_bytes(&[7u8; 32].into()).unwrap();
        let other = SigningKey::from_bytes(&[9u8; 32].into()).unwrap();
        let sums = b"abc  file\n";
        let sig: Signature = key.sign(sums);
        let b64 = base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes());
        verify_signature(key.verifying_key(), sums, b64.as_bytes()).unwrap();
        assert!(matches!(
            verify_signature(other.verifying_key(), sums, b64.as_bytes()),
            Err(UpdateError::BadSignature)
        ));
        assert!(matches!(
            verify_signature(key.verifying_key(), b"abd  file\n", b64.as_bytes()),
            Err(UpdateError::BadSignature)
        ));
        assert!(matches!(
            verify_signature(key.verifying_key(), sums, b"not base64!"),
            Err(UpdateError::SignatureFormat(_))
        ));
    }
}
