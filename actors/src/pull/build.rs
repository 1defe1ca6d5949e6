//! `banger image build` and the catalog's `recipe` entries: an image and its kernel built
//! locally from a Debian-family mirror with `mmdebstrap`, so the first `vm run` on a fresh
//! host needs no published artefact.
//!
//! The path, through the PullActor like an OCI pull (coalesced by the image's name, key
//! `image:build-><name>`, so `image build x`, `image pull x` of a recipe entry and the
//! auto-build of `vm run` share one build):
//!
//! 1. `mmdebstrap --mode=unshare --variant=apt --format=tar` writes the root filesystem as a
//!    tar on its stdout, with banger's guest packages ([`GUEST_PACKAGES`]), the recipe's
//!    packages and the kernel package (default [`DEFAULT_KERNEL_PACKAGE`], whose hooks make
//!    `/boot/initrd.img-*` inside the tree). Its stderr (`--verbose`) becomes the progress:
//!    a stage per phase (`update`, `download`, `extract`, `install`, `unpack`) and a bar
//!    from apt's `Need to get N MB` and each `Get:` line's size.
//! 2. The tar streams straight into the same replay as OCI layers and promotes
//!    ([`super::layers::Replay::apply_tree`]: the same refusals; owners, modes and xattrs
//!    kept) in a staging directory beside the images, so it never exists as a file.
//! 3. Per-image identity is removed as the golden image leaves it out
//!    ([`super::promote::strip_identity`]: ssh host keys, the contents of
//!    `/etc/machine-id`, systemd's random seed), and so are what mmdebstrap copies from the
//!    build host: `/etc/hostname` (banger-init names each VM) and the host's resolvers in
//!    `/etc/resolv.conf` (emptied; banger-init writes the guest's). banger-init and
//!    banger-agent go to `/usr/lib/banger/` as for OCI images.
//! 4. The kernel the recipe installed: `/boot/vmlinuz-<ver>`, `/boot/initrd.img-<ver>`
//!    and `/boot/config-<ver>`, with `/lib/modules/<ver>`, become a kernel record named
//!    after the image (or `--kernel`) through [`crate::image::import_kernel`] (which checks
//!    and converts kernels for each VMM); the modules also stay in the image, where
//!    banger-init loads virtio_net, vsock and overlay from.
//! 5. `mkfs.ext4 -d` ([`super::ext4`]), then publish: the kernel imported, the staging
//!    directory renamed into place, both records written. Any failure before that removes
//!    the staging directory (and a kernel already imported); no record is written.
//!
//! **Never as root.** mmdebstrap runs in its unshare mode as the daemon's own user, with
//! that user's subordinate uid/gid range (`/etc/subuid`, `/etc/subgid`, which `useradd`
//! gives every normal user) mapped through `newuidmap`/`newgidmap` (package `uidmap`):
//! inside its user namespace it is "root" over ids the host does not give to anyone, so
//! package scripts can chown and chroot without the build holding a real privilege. This
//! covers a user daemon (`bangerd` started by the CLI) and the system service, which drops
//! to its owner (a normal user) before any build; for that drop, bangerd's bounding set
//! keeps what the setuid `newuidmap` needs (CAP_SETUID, CAP_SETGID, CAP_DAC_OVERRIDE,
//! CAP_SYS_ADMIN; bangerd itself holds none, see `service/src/privilege.rs`), measured:
//! with an empty bounding set `newuidmap` fails ("open of uid_map failed") and so does
//! mmdebstrap ("failed to unshare the user namespace"). A bangerd running as uid 0 with its
//! capabilities dropped (started as root with no `owner` configured and no `SUDO_UID`) is
//! refused with [`BuildError::Root`]: measured with mmdebstrap 1.3.5, as uid 0 it does not
//! make a user namespace and fails with "unable to unshare the mount namespace" (no
//! CAP_SYS_ADMIN), and it could not map a uid range either (`newuidmap` needs CAP_SETUID,
//! gone from the bounding set). Building as real root would run every package's
//! maintainer scripts as root on the host's kernel, which is what this design avoids, so
//! the answer is to name a normal user as the daemon's `owner`; the tests do exactly that
//! (a dedicated `banger-build` user with a subuid range).
//!
//! **Package cache.** Downloaded `.deb`s are kept in `<cache_dir>/debs` across builds:
//! mmdebstrap's `sync-in` setup hook copies them into the tree's apt archive before apt
//! runs (apt checks each against the mirror's index and fetches only what is missing or
//! changed), `--skip=essential/unlink` keeps the essential set there, and the `sync-out`
//! customize hook copies the archive back before apt cleans it from the image. So a
//! rebuild downloads nothing new but the indexes.
//!
//! **Mirror.** The request's, else `[images] mirror`, else the host's own apt sources
//! when the host is Debian (the first `deb` source of the Debian archive for the host's
//! codename, from `/etc/apt/sources.list` and `/etc/apt/sources.list.d/*.{list,sources}`:
//! [`host_mirror`]), else [`PUBLIC_MIRROR`].

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use banger_api::{BuildImage, PullEvent, Recipe};

use super::layers::{Owners, Replay};
use super::oci::{GUEST_BINARIES, GUEST_DIR};
use super::{PullConfig, PullEnv, PullError, Reporter, Staging, blocking};
use crate::image::{ImageRecord, KernelRecord};
use crate::store::{Named, Reservation};

/// The suite built when none is given.
pub const DEFAULT_SUITE: &str = "bookworm";
/// The kernel package installed when none is given: Debian's cloud kernel (virtio, no
/// hardware drivers).
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// The mirror used when neither the request, the config nor the host names one.
pub const PUBLIC_MIRROR: &str = "http://deb.debian.org/debian";
/// What banger's guest side needs in every built image: `kmod` (module dependencies),
/// `iproute2` and `procps` (the agent's ports and stats), `openssh-server` (`vm ssh`) and
/// `ca-certificates`.
pub const GUEST_PACKAGES: [&str; 5] = [
    "kmod",
    "iproute2",
    "procps",
    "openssh-server",
    "ca-certificates",
];

/// Errors of local image builds.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "bangerd runs as root with its capabilities dropped, and mmdebstrap builds images only as a normal user (unshare mode with a subordinate id range); set `owner = \"<user>\"` in bangerd's config (a normal user with ranges in /etc/subuid and /etc/subgid, as useradd gives) and restart it, or run bangerd as that user"
    )]
    Root,
    #[error(
        "user {user} has no subordinate id range in {file}, which mmdebstrap needs to build unprivileged: add one with `sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`"
    )]
    NoSubids { user: String, file: &'static str },
    #[error("cannot run {tool}: install it (`apt-get install mmdebstrap uidmap`)")]
    Tool {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid suite {0:?}: a Debian suite or codename, e.g. bookworm")]
    Suite(String),
    #[error("invalid package name {0:?}")]
    Package(String),
    #[error("invalid mirror {0:?}: an http:// or https:// URL, e.g. {PUBLIC_MIRROR}")]
    MirrorUrl(String),
    #[error(
        "the suite {suite:?} is not on {mirror} (no Release file for it): check --suite (e.g. bookworm) and --mirror"
    )]
    UnknownSuite { suite: String, mirror: String },
    #[error(
        "the mirror {mirror} does not answer ({detail}): check --mirror or [images] mirror, and the network"
    )]
    Unreachable { mirror: String, detail: String },
    #[error(
        "there is no package {package:?} in {suite} on {mirror}: check --include and --kernel-package"
    )]
    UnknownPackage {
        package: String,
        suite: String,
        mirror: String,
    },
    #[error(
        "a package download from {mirror} failed ({detail}); nothing was kept, try again (the mirror may be syncing, or the connection was cut)"
    )]
    Download { mirror: String, detail: String },
    #[error(
        "no space left on the disk holding {path} while building the image; free some there and try again (nothing was kept)"
    )]
    DiskFull { path: PathBuf },
    #[error("mmdebstrap failed ({status}): {detail}")]
    Failed { status: String, detail: String },
    #[error(
        "the tree has no {what}: the kernel package {package} installed none; pass a kernel image package with --kernel-package"
    )]
    Kernel { what: String, package: String },
}

impl BuildError {
    /// Whether the request itself is wrong (an invalid argument), not the host or mirror.
    pub fn is_invalid_argument(&self) -> bool {
        matches!(
            self,
            BuildError::Suite(_)
                | BuildError::Package(_)
                | BuildError::MirrorUrl(_)
                | BuildError::UnknownSuite { .. }
                | BuildError::UnknownPackage { .. }
        )
    }
}

/// A resolved build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    pub name: String,
    /// The kernel record made from the tree's kernel.
    pub kernel_name: String,
    pub suite: String,
    pub mirror: String,
    /// Where the mirror came from, for the stage line.
    pub mirror_from: &'static str,
    /// The recipe's packages (the guest's and the kernel's are added).
    pub packages: Vec<String>,
    pub kernel_package: String,
    pub size_bytes: Option<u64>,
}

impl BuildPlan {
    /// Builds of one image name share the work.
    pub fn key(&self) -> String {
        format!("image:build->{}", self.name)
    }

    /// Every package given to mmdebstrap: the guest's, the recipe's, the kernel.
    pub fn all_packages(&self) -> Vec<String> {
        let mut all: Vec<String> = GUEST_PACKAGES.iter().map(|s| (*s).to_owned()).collect();
        for p in self.packages.iter().chain([&self.kernel_package]) {
            if !all.contains(p) {
                all.push(p.clone());
            }
        }
        all
    }
}

fn valid_suite(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
}

/// Debian package names: `[a-z0-9][a-z0-9+.-]+` (an optional `:arch` is not accepted).
fn valid_package(p: &str) -> bool {
    p.len() >= 2
        && p.len() <= 128
        && p.as_bytes()[0].is_ascii_alphanumeric()
        && p.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
        })
}

fn valid_mirror(m: &str) -> bool {
    let rest = m
        .strip_prefix("http://")
        .or_else(|| m.strip_prefix("https://"));
    rest.is_some_and(|r| {
        !r.is_empty()
            && !r.starts_with('/')
            && m.bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'"' | b'\'' | b'\\'))
    })
}

/// Check a catalog recipe (suite and package names).
pub fn validate_recipe(r: &Recipe) -> Result<(), BuildError> {
    if !valid_suite(&r.suite) {
        return Err(BuildError::Suite(r.suite.clone()));
    }
    for p in r.packages.iter().chain(r.kernel_package.as_ref()) {
        if !valid_package(p) {
            return Err(BuildError::Package(p.clone()));
        }
    }
    Ok(())
}

/// The first `deb` source of the Debian archive for the host's codename, when the host
/// (`root`, `/` on a real host) is Debian: from `etc/apt/sources.list` and
/// `etc/apt/sources.list.d/*.list` (one-line style) and `*.sources` (deb822). Security,
/// backports and third-party repositories do not match (their suites are not the bare
/// codename or `-updates`).
pub fn host_mirror(root: &Path) -> Option<String> {
    let os = std::fs::read_to_string(root.join("etc/os-release")).ok()?;
    let field = |k: &str| {
        os.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_owned())
    };
    if field("ID").as_deref() != Some("debian") {
        return None;
    }
    let codename = field("VERSION_CODENAME")?;
    let suite_ok = |s: &str| s == codename || s == format!("{codename}-updates");
    let mut files = vec![root.join("etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir(root.join("etc/apt/sources.list.d")) {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
        let found = if f.ends_with("sources.list") || ext == "list" {
            text.lines().find_map(|l| {
                let l = l.split('#').next()?.trim();
                let mut words = l.split_whitespace();
                if words.next()? != "deb" {
                    return None;
                }
                let mut uri = words.next()?;
                if uri.starts_with('[') {
                    // Options: `[arch=amd64 signed-by=…]`, possibly several words.
                    while !uri.ends_with(']') {
                        uri = words.next()?;
                    }
                    uri = words.next()?;
                }
                let suite = words.next()?;
                (suite_ok(suite) && valid_mirror(uri)).then(|| uri.to_owned())
            })
        } else if ext == "sources" {
            text.split("\n\n").find_map(|stanza| {
                let get = |k: &str| {
                    stanza.lines().find_map(|l| {
                        let (key, v) = l.split_once(':')?;
                        key.trim()
                            .eq_ignore_ascii_case(k)
                            .then(|| v.trim().to_owned())
                    })
                };
                if get("Enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
                    return None;
                }
                if !get("Types")?.split_whitespace().any(|t| t == "deb") {
                    return None;
                }
                if !get("Suites")?.split_whitespace().any(suite_ok) {
                    return None;
                }
                get("URIs")?
                    .split_whitespace()
                    .find(|u| valid_mirror(u))
                    .map(str::to_owned)
            })
        } else {
            None
        };
        if found.is_some() {
            return found.map(|u| u.trim_end_matches('/').to_owned());
        }
    }
    None
}

/// The mirror a build without `--mirror` uses, and where it comes from.
pub fn default_mirror(config: &PullConfig) -> (String, &'static str) {
    if let Some(m) = &config.mirror {
        return (m.clone(), "[images] mirror");
    }
    if let Some(m) = host_mirror(Path::new("/")) {
        return (m, "the host's apt sources");
    }
    (PUBLIC_MIRROR.to_owned(), "Debian's public mirror")
}

/// Resolve `image build`.
pub fn plan(config: &PullConfig, req: &BuildImage) -> Result<BuildPlan, PullError> {
    let recipe = Recipe {
        suite: req.suite.clone().unwrap_or_else(|| DEFAULT_SUITE.into()),
        packages: req.include.clone(),
        kernel_package: req.kernel_package.clone(),
    };
    plan_recipe(
        config,
        &req.name,
        &recipe,
        req.mirror.clone(),
        req.kernel.clone(),
        req.size_bytes,
    )
}

/// Resolve a build of `recipe` into image `name`.
pub fn plan_recipe(
    config: &PullConfig,
    name: &str,
    recipe: &Recipe,
    mirror: Option<String>,
    kernel: Option<String>,
    size_bytes: Option<u64>,
) -> Result<BuildPlan, PullError> {
    crate::image::validate_name(name)?;
    let kernel_name = kernel.unwrap_or_else(|| name.to_owned());
    crate::image::validate_name(&kernel_name)?;
    validate_recipe(recipe)?;
    let (mirror, mirror_from) = match mirror {
        Some(m) => (m, "--mirror"),
        None => default_mirror(config),
    };
    if !valid_mirror(&mirror) {
        return Err(BuildError::MirrorUrl(mirror).into());
    }
    if let Some(size) = size_bytes
        && size < super::ext4::MIN_SIZE
    {
        return Err(PullError::Size(format!(
            "{size} bytes is below the minimum of {} MiB",
            super::ext4::MIN_SIZE >> 20
        )));
    }
    Ok(BuildPlan {
        name: name.to_owned(),
        kernel_name,
        suite: recipe.suite.clone(),
        mirror: mirror.trim_end_matches('/').to_owned(),
        mirror_from,
        packages: recipe.packages.clone(),
        kernel_package: recipe
            .kernel_package
            .clone()
            .unwrap_or_else(|| DEFAULT_KERNEL_PACKAGE.into()),
        size_bytes,
    })
}

/// Whether `user` (name or uid) has a range of at least 65536 ids in `file`'s text.
fn has_subids(text: &str, user: &str, uid: u32) -> bool {
    text.lines().any(|l| {
        let mut f = l.trim().split(':');
        let (Some(who), Some(_start), Some(count)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        (who == user || who == uid.to_string())
            && count.trim().parse::<u64>().is_ok_and(|c| c >= 65536)
    })
}

/// Check that this process can run mmdebstrap unprivileged (see the module docs).
pub fn check_unprivileged(etc: &Path) -> Result<(), BuildError> {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return Err(BuildError::Root);
    }
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    for (file, name) in [("subuid", "/etc/subuid"), ("subgid", "/etc/subgid")] {
        let text = std::fs::read_to_string(etc.join(file)).unwrap_or_default();
        if !has_subids(&text, &user, uid.as_raw()) {
            return Err(BuildError::NoSubids { user, file: name });
        }
    }
    for tool in ["mmdebstrap", "newuidmap"] {
        if find_in_path(tool).is_none() {
            return Err(BuildError::Tool {
                tool: if tool == "mmdebstrap" {
                    "mmdebstrap"
                } else {
                    "newuidmap"
                },
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not in PATH"),
            });
        }
    }
    Ok(())
}

/// `tool` in `PATH` (or the usual system directories when `PATH` is unset).
fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// What mmdebstrap's stderr said, kept for the error.
#[derive(Debug, Default)]
struct Said {
    errors: Vec<String>,
    tail: std::collections::VecDeque<String>,
}

/// Follow mmdebstrap's `--verbose` stderr: stages, the download bar, the lines an error
/// is made of.
fn follow_stderr(stderr: impl Read, rep: &Reporter, said: &Mutex<Said>) {
    let mut total = 0u64;
    let mut done = 0u64;
    for line in BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).trim_end().to_owned();
        if let Some(msg) = line.strip_prefix("I: ") {
            let stage = [
                ("running apt-get update", "update"),
                ("downloading packages", "download"),
                ("extracting archives", "extract"),
                ("installing essential packages", "install"),
                ("installing remaining packages", "install"),
                ("creating tarball", "unpack"),
            ]
            .iter()
            .find(|(p, _)| msg.starts_with(p));
            if let Some((_, stage)) = stage {
                rep.stage(stage, Some(msg.trim_end_matches("...").to_owned()));
            }
        } else if let Some(rest) = line.strip_prefix("Need to get ") {
            // `Need to get 56.7 MB of archives.` or `Need to get 1 kB/56.7 MB of archives.`
            let amount = rest.split(" of archives").next().unwrap_or("");
            let need = amount.split('/').next().unwrap_or("");
            if let Some(b) = parse_apt_size(need) {
                total += b;
                rep.send(PullEvent::Bytes {
                    done,
                    total: Some(total),
                });
            }
        } else if line.starts_with("Get:")
            && line.ends_with(']')
            && let Some(b) = line
                .rsplit_once('[')
                .and_then(|(_, s)| parse_apt_size(s.trim_end_matches(']')))
        {
            done += b;
            rep.send(PullEvent::Bytes {
                done: done.min(total.max(done)),
                total: (total > 0).then_some(total.max(done)),
            });
        }
        let mut s = said.lock().expect("said lock");
        if line.starts_with("E: ") || line.starts_with("Err:") || line.starts_with("W: Failed") {
            s.errors.push(line.clone());
        }
        s.tail.push_back(line);
        if s.tail.len() > 30 {
            s.tail.pop_front();
        }
    }
}

/// `123 kB`, `8790 kB`, `56.7 MB`, `1 B` → bytes (apt's decimal units).
fn parse_apt_size(s: &str) -> Option<u64> {
    let (num, unit) = s.trim().split_once(' ')?;
    let n: f64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    };
    Some((n * mult) as u64)
}

/// Turn mmdebstrap's failure into the error that names its cause.
fn classify(plan: &BuildPlan, status: &str, said: &Said) -> BuildError {
    let all: Vec<&String> = said.errors.iter().chain(said.tail.iter()).collect();
    let find = |pat: &str| all.iter().find(|l| l.contains(pat)).map(|l| l.to_string());
    if find("No space left on device").is_some() {
        return BuildError::DiskFull {
            path: std::env::temp_dir(),
        };
    }
    for pat in [
        "Could not connect",
        "Connection refused",
        "Could not resolve",
        "Temporary failure resolving",
        "Connection timed out",
        "Unable to connect",
    ] {
        if let Some(l) = find(pat) {
            return BuildError::Unreachable {
                mirror: plan.mirror.clone(),
                detail: l.trim_start_matches("E: ").trim().to_owned(),
            };
        }
    }
    if find("does not have a Release file").is_some()
        || find("404  Not Found").is_some_and(|l| l.contains("Release"))
    {
        return BuildError::UnknownSuite {
            suite: plan.suite.clone(),
            mirror: plan.mirror.clone(),
        };
    }
    for pat in ["Unable to locate package ", "has no installation candidate"] {
        if let Some(l) = find(pat) {
            let package = match l.split_once("Unable to locate package ") {
                Some((_, p)) => p.trim().to_owned(),
                None => l
                    .split('\'')
                    .nth(1)
                    .map(str::to_owned)
                    .unwrap_or_else(|| l.clone()),
            };
            return BuildError::UnknownPackage {
                package,
                suite: plan.suite.clone(),
                mirror: plan.mirror.clone(),
            };
        }
    }
    for pat in [
        "File has unexpected size",
        "Hash Sum mismatch",
        "Failed to fetch",
        "Undetermined Error",
    ] {
        if let Some(l) = find(pat) {
            return BuildError::Download {
                mirror: plan.mirror.clone(),
                detail: l.trim_start_matches("E: ").trim().to_owned(),
            };
        }
    }
    let detail = if said.errors.is_empty() {
        said.tail
            .iter()
            .rev()
            .take(5)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    } else {
        said.errors.join(" | ")
    };
    BuildError::Failed {
        status: status.to_owned(),
        detail,
    }
}

/// Whether a replay or write error is a full disk.
fn disk_full(detail: &str) -> bool {
    detail.contains("No space left on device") || detail.contains("os error 28")
}

/// The mmdebstrap command line of `plan`, with its package cache in `debs`.
pub fn command(plan: &BuildPlan, debs: Option<&Path>) -> Command {
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--mode=unshare",
        "--variant=apt",
        "--format=tar",
        "--verbose",
        "--aptopt=Acquire::Retries \"1\"",
        "--aptopt=Acquire::http::Timeout \"30\"",
    ])
    .arg(format!("--include={}", plan.all_packages().join(",")));
    if let Some(debs) = debs {
        let d = debs.display();
        cmd.arg("--skip=essential/unlink")
            .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
            .arg(format!("--setup-hook=sync-in {d} /var/cache/apt/archives/"))
            .arg(format!(
                "--customize-hook=sync-out /var/cache/apt/archives {d}"
            ));
    }
    cmd.arg(&plan.suite).arg("-").arg(&plan.mirror);
    cmd
}

/// Whether `debs` can be named in a hook (hooks split on whitespace).
fn hookable(p: &Path) -> bool {
    p.to_str().is_some_and(|s| {
        s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'\'' && b != b'"')
    })
}

/// The kernel files mmdebstrap left in the tree: (version, vmlinuz, initrd, config,
/// modules directory).
fn find_kernel(
    tree: &Path,
    package: &str,
) -> Result<(String, PathBuf, PathBuf, PathBuf, PathBuf), BuildError> {
    let missing = |what: String| BuildError::Kernel {
        what,
        package: package.to_owned(),
    };
    let boot = tree.join("boot");
    let mut versions: Vec<String> = std::fs::read_dir(&boot)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("vmlinuz-")
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    let Some(ver) = versions.pop() else {
        return Err(missing("/boot/vmlinuz-*".into()));
    };
    let file = |name: String| {
        let p = boot.join(&name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_file() => Ok(p),
            _ => Err(missing(format!("/boot/{name}"))),
        }
    };
    let vmlinuz = file(format!("vmlinuz-{ver}"))?;
    let initrd = file(format!("initrd.img-{ver}"))?;
    let config = file(format!("config-{ver}"))?;
    // Merged /usr: /lib is a link to usr/lib; look at the real directory.
    let modules = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| tree.join(d).join(&ver))
        .find(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_dir()))
        .ok_or_else(|| missing(format!("/lib/modules/{ver}")))?;
    Ok((ver, vmlinuz, initrd, config, modules))
}

/// Make the directory `import_kernel` takes (`vmlinuz`, `initrd`, `config`, `modules/`)
/// from the tree's kernel, with hard links (no copy; the tree is removed after mkfs).
fn kernel_dir(
    dir: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    config: &Path,
    modules: &Path,
) -> Result<(), PullError> {
    std::fs::create_dir(dir).map_err(PullError::io(dir))?;
    for (from, to) in [(vmlinuz, "vmlinuz"), (initrd, "initrd"), (config, "config")] {
        let dest = dir.join(to);
        std::fs::hard_link(from, &dest).map_err(PullError::io(&dest))?;
    }
    let dest = dir.join("modules");
    let o = Command::new("cp")
        .arg("-al")
        .arg(modules)
        .arg(&dest)
        .output()
        .map_err(PullError::io(&dest))?;
    if !o.status.success() {
        return Err(PullError::Build(format!(
            "cannot link the kernel's modules into {}: {}",
            dest.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

/// Build image `plan.name` and its kernel (see the module docs).
pub async fn build(
    env: &Arc<PullEnv>,
    plan: BuildPlan,
    rep: &Reporter,
) -> Result<ImageRecord, PullError> {
    let guest_dir = env.config.guest_binaries_dir.clone();
    for b in GUEST_BINARIES {
        let p = guest_dir.join(b);
        if !p.is_file() {
            return Err(PullError::GuestBinaries { path: p });
        }
    }
    let (name, kname) = (plan.name.clone(), plan.kernel_name.clone());
    let image_res = super::reserve(
        env,
        Named::Image,
        &name,
        "being built".into(),
        format!("choose another name, or delete it with `banger image delete {name}`"),
    )
    .await?;
    let kernel_res = super::reserve(
        env,
        Named::Kernel,
        &kname,
        format!("being built with image {name}"),
        format!("pass --kernel NAME, or remove it with `banger kernel rm {kname}`"),
    )
    .await?;
    blocking(move || check_unprivileged(Path::new("/etc")).map_err(PullError::from)).await?;
    rep.stage(
        "build",
        Some(format!(
            "{} from {} ({}), suite {}",
            plan.name, plan.mirror, plan.mirror_from, plan.suite
        )),
    );
    let images = env.config.images_dir();
    let debs = env.config.debs_dir();
    let rep2 = rep.clone();
    let kernels = env.config.kernels_dir();
    let env2 = Arc::clone(env);
    blocking(move || {
        let rep = rep2;
        let builds = &env2.builds;
        let staging = Staging::new(&images, &plan.name)?;
        let tree = staging.path().join("tree");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir(&tree).map_err(PullError::io(&tree))?;
            std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(0o755))
                .map_err(PullError::io(&tree))?;
        }
        let debs = match std::fs::create_dir_all(&debs) {
            Ok(()) if hookable(&debs) => Some(debs),
            Ok(()) => {
                tracing::warn!(path = %debs.display(), "package cache path has spaces or quotes: builds download every package");
                None
            }
            Err(e) => {
                tracing::warn!(path = %debs.display(), error = %e, "no package cache: builds download every package");
                None
            }
        };
        let mut cmd = command(&plan, debs.as_deref());
        // Its own process group: when writing its tar fails (we closed the pipe: a full
        // disk, a refused entry), mmdebstrap tears down its helpers with SIGHUP to its
        // whole process group, which would otherwise be bangerd's own (the daemon died
        // on a full disk).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tracing::info!(image = plan.name, cmd = ?cmd, "running mmdebstrap");
        let mut child = cmd.spawn().map_err(|source| BuildError::Tool {
            tool: "mmdebstrap",
            source,
        })?;
        // For the sweep of a daemon that starts after this one died mid-build, and for this
        // one's stop.
        let pid = child.id() as i32;
        if let Some(start) = crate::vm::proc::start_time(pid) {
            let _ = staging.record_builder(pid, start);
            builds.add(pid, start);
            if builds.stopping() {
                builds.stop_all();
            }
        }
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let said = Arc::new(Mutex::new(Said::default()));
        let follower = {
            let (rep, said) = (rep.clone(), Arc::clone(&said));
            std::thread::spawn(move || follow_stderr(stderr, &rep, &said))
        };
        let mut replay = Replay::new(&tree, Owners::detect());
        let replayed = {
            let mut out = stdout;
            let r = replay.apply_tree(&mut out);
            if r.is_ok() {
                // The end-of-archive padding, so mmdebstrap ends cleanly.
                let _ = std::io::copy(&mut out, &mut std::io::sink());
            }
            r
        };
        // On a refused entry or a full disk the tar's pipe is closed above: mmdebstrap's
        // tar gets EPIPE and mmdebstrap removes its own tree. Not a kill: its namespace's
        // processes would outlive it, holding stderr open, with their tree left behind.
        let status = child.wait();
        builds.remove(pid);
        let status = status.map_err(PullError::io(Path::new("mmdebstrap")))?;
        let _ = follower.join();
        if builds.stopping() {
            return Err(cancelled());
        }
        let said = said.lock().expect("said lock");
        match replayed {
            Err(d) if disk_full(&d) => return Err(BuildError::DiskFull { path: images.clone() }.into()),
            Err(d) if status.success() => {
                return Err(PullError::Build(format!("unpacking the built tree: {d}")));
            }
            _ if !status.success() => {
                return Err(classify(&plan, &status.to_string(), &said).into());
            }
            Err(d) => return Err(PullError::Build(format!("unpacking the built tree: {d}"))),
            Ok(()) => {}
        }
        drop(said);
        let build = |d: String| {
            if disk_full(&d) {
                PullError::from(BuildError::DiskFull { path: images.clone() })
            } else {
                PullError::Build(format!("preparing the image: {d}"))
            }
        };
        let mut stripped = super::promote::strip_identity(&mut replay, "").map_err(build)?;
        if super::promote::regular(&tree, "etc/hostname").is_some() {
            replay.delete(Path::new("etc/hostname")).map_err(build)?;
            stripped.push("/etc/hostname".into());
        }
        if let Some(p) = super::promote::regular(&tree, "etc/resolv.conf") {
            super::promote::rewrite(&p, "").map_err(build)?;
            stripped.push("/etc/resolv.conf (emptied)".into());
        }
        rep.stage("identity", Some(format!("removed {}", stripped.join(", "))));
        for b in GUEST_BINARIES {
            replay
                .inject(&Path::new(GUEST_DIR).join(b), &guest_dir.join(b), 0o755)
                .map_err(build)?;
        }
        let (version, vmlinuz, initrd, config, modules) =
            find_kernel(&tree, &plan.kernel_package)?;
        rep.stage("kernel", Some(format!("{version} from {}", plan.kernel_package)));
        let kdir = staging.path().join("kernel");
        kernel_dir(&kdir, &vmlinuz, &initrd, &config, &modules).map_err(|e| match e {
            PullError::Io { source, .. } if source.raw_os_error() == Some(28) => {
                BuildError::DiskFull { path: images.clone() }.into()
            }
            e => e,
        })?;
        if replay.xattr_failures > 0 {
            tracing::info!(image = plan.name, xattr_failures = replay.xattr_failures, "xattrs not kept (the daemon is not root)");
        }
        let owners = replay.finish().map_err(build)?;
        rep.stage("mkfs", None);
        let rootfs = staging.path().join("rootfs.ext4");
        let size = super::ext4::build(&tree, &rootfs, plan.size_bytes, &owners, &rep).map_err(
            |e| match e {
                PullError::Build(d) if disk_full(&d) => {
                    BuildError::DiskFull { path: images.clone() }.into()
                }
                PullError::Io { source, .. } if source.raw_os_error() == Some(28) => {
                    BuildError::DiskFull { path: images.clone() }.into()
                }
                e => e,
            },
        )?;
        let manifest = serde_json::json!({
            "name": plan.name,
            "arch": "x86_64",
            "source": "recipe",
            "suite": plan.suite,
            "mirror": plan.mirror,
            "packages": plan.all_packages(),
            "kernel_package": plan.kernel_package,
            "kernel_version": version,
            "kernel_ref": plan.kernel_name,
        });
        let mpath = staging.path().join("manifest.json");
        std::fs::write(&mpath, serde_json::to_vec_pretty(&manifest).expect("json"))
            .map_err(PullError::io(&mpath))?;
        if builds.stopping() {
            return Err(cancelled());
        }
        rep.stage("publish", Some(format!("image {}, kernel {}", plan.name, plan.kernel_name)));
        let reserved = (image_res, kernel_res);
        publish(reserved, &images, &kernels, staging, &kdir, &plan, size)
    })
    .await
}

/// The builds of one daemon in flight: each one's mmdebstrap process group (pid, start
/// time), and whether the daemon is stopping, after which no build publishes.
#[derive(Debug, Default)]
pub struct Builds {
    running: std::sync::Mutex<Vec<(i32, u64)>>,
    stopping: std::sync::atomic::AtomicBool,
}

impl Builds {
    fn add(&self, pid: i32, start: u64) {
        self.running.lock().expect("builds lock").push((pid, start));
    }

    fn remove(&self, pid: i32) {
        self.running
            .lock()
            .expect("builds lock")
            .retain(|(p, _)| *p != pid);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stop every build: SIGTERM to each mmdebstrap's process group (it cleans up its tree
    /// and exits), and no build publishes from here on.
    pub fn stop_all(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        for &(pid, start) in self.running.lock().expect("builds lock").iter() {
            if crate::vm::proc::signal_group(pid, start, nix::sys::signal::Signal::SIGTERM) {
                tracing::info!(pid, "the daemon is stopping: stopping an image build");
            }
        }
    }
}

fn cancelled() -> PullError {
    PullError::Build("the daemon stopped during the build; nothing was published".into())
}

/// Import the kernel, move the image into place, record both (one transaction); undo the
/// files if they cannot be recorded.
fn publish(
    (image_res, kernel_res): (Reservation, Reservation),
    images: &Path,
    kernels: &Path,
    staging: Staging,
    kdir: &Path,
    plan: &BuildPlan,
    size: u64,
) -> Result<ImageRecord, PullError> {
    std::fs::create_dir_all(kernels).map_err(PullError::io(kernels))?;
    let krec: KernelRecord = crate::image::import_kernel(kernels, &plan.kernel_name, kdir)?;
    let dest = images.join(&plan.name);
    let result = (|| {
        let _ = std::fs::remove_dir_all(kdir);
        staging.publish(&dest)?;
        let rec = ImageRecord {
            name: plan.name.clone(),
            rootfs: dest.join("rootfs.ext4"),
            size_bytes: size,
            kernel: Some(plan.kernel_name.clone()),
            registered_at: crate::store::now_secs(),
        };
        if let Err(e) = image_res.publish_image_and_kernel(&rec, kernel_res, &krec) {
            let _ = std::fs::remove_dir_all(&dest);
            return Err(e.into());
        }
        Ok(rec)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(kernels.join(&plan.kernel_name));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mirror_reads_deb822_and_one_line_sources_of_the_debian_archive_only() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("etc/apt/sources.list.d")).unwrap();
        std::fs::write(
            r.join("etc/os-release"),
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_CODENAME=bookworm\n",
        )
        .unwrap();
        assert_eq!(host_mirror(r), None, "no sources at all");
        std::fs::write(
            r.join("etc/apt/sources.list.d/a-nodesource.sources"),
            "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n",
        )
        .unwrap();
        std::fs::write(
            r.join("etc/apt/sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://security.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb deb-src\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n",
        )
        .unwrap();
        assert_eq!(
            host_mirror(r).as_deref(),
            Some("http://mirror.example/debian")
        );
        std::fs::write(
            r.join("etc/apt/sources.list"),
            "# comment\ndeb-src http://src.example/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n",
        )
        .unwrap();
        assert_eq!(
            host_mirror(r).as_deref(),
            Some("http://one.example/debian"),
            "sources.list is read first"
        );
        std::fs::write(
            r.join("etc/os-release"),
            "ID=ubuntu\nVERSION_CODENAME=noble\n",
        )
        .unwrap();
        assert_eq!(host_mirror(r), None, "not a Debian host");
    }

    #[test]
    fn names_suites_and_mirrors_are_checked_before_anything_runs() {
        assert!(valid_package("linux-image-cloud-amd64") && valid_package("g++"));
        assert!(!valid_package("a") && !valid_package("x,y") && !valid_package("--force"));
        assert!(!valid_package("Pkg") && !valid_package("a b"));
        assert!(valid_suite("bookworm") && valid_suite("bookworm-backports"));
        assert!(!valid_suite("") && !valid_suite("-x") && !valid_suite("a/b"));
        assert!(valid_mirror("http://deb.debian.org/debian"));
        assert!(valid_mirror("http://127.0.0.1:8080/debian"));
        assert!(!valid_mirror("ftp://x/debian") && !valid_mirror("http://"));
        assert!(!valid_mirror("http://a b") && !valid_mirror("http://x/a,b"));
    }

    #[test]
    fn the_package_list_adds_the_guest_and_kernel_packages_once() {
        let p = BuildPlan {
            name: "x".into(),
            kernel_name: "x".into(),
            suite: "bookworm".into(),
            mirror: PUBLIC_MIRROR.into(),
            mirror_from: "--mirror",
            packages: vec!["git".into(), "kmod".into()],
            kernel_package: DEFAULT_KERNEL_PACKAGE.into(),
            size_bytes: None,
        };
        let all = p.all_packages();
        assert_eq!(all.iter().filter(|p| *p == "kmod").count(), 1);
        assert_eq!(&all[..5], GUEST_PACKAGES);
        assert_eq!(all[5..], ["git", DEFAULT_KERNEL_PACKAGE]);
        let args: Vec<String> = command(&p, Some(Path::new("/c/debs")))
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(&"--mode=unshare".to_owned()), "{args:?}");
        assert!(
            args.contains(&"--customize-hook=sync-out /var/cache/apt/archives /c/debs".to_owned())
        );
        assert_eq!(args[args.len() - 3..], ["bookworm", "-", PUBLIC_MIRROR]);
    }

    #[test]
    fn subordinate_ranges_are_found_by_name_or_uid_and_must_be_whole() {
        assert!(has_subids("me:100000:65536\n", "me", 1000));
        assert!(has_subids("1000:100000:65536\n", "me", 1000));
        assert!(!has_subids("me:100000:1000\n", "me", 1000));
        assert!(!has_subids("other:100000:65536\n", "me", 1000));
    }

    #[test]
    fn apt_sizes_and_mmdebstrap_failures_are_read() {
        assert_eq!(parse_apt_size("56.7 MB"), Some(56_700_000));
        assert_eq!(parse_apt_size("151 kB"), Some(151_000));
        assert_eq!(parse_apt_size("0 B"), Some(0));
        let plan = BuildPlan {
            name: "x".into(),
            kernel_name: "x".into(),
            suite: "nosuch".into(),
            mirror: "http://127.0.0.1:1/debian".into(),
            mirror_from: "--mirror",
            packages: vec![],
            kernel_package: DEFAULT_KERNEL_PACKAGE.into(),
            size_bytes: None,
        };
        let said = |lines: &[&str]| Said {
            errors: lines.iter().map(|s| s.to_string()).collect(),
            tail: Default::default(),
        };
        let e = classify(
            &plan,
            "exit status: 1",
            &said(&["E: Unable to locate package nosuchpkg"]),
        );
        assert!(
            matches!(&e, BuildError::UnknownPackage { package, .. } if package == "nosuchpkg"),
            "{e}"
        );
        let e = classify(
            &plan,
            "1",
            &said(&[
                "E: The repository 'http://127.0.0.1:1/debian nosuch Release' does not have a Release file.",
            ]),
        );
        assert!(matches!(e, BuildError::UnknownSuite { .. }), "{e}");
        let e = classify(
            &plan,
            "1",
            &said(&[
                "E: Failed to fetch http://x/pool/l/less.deb  File has unexpected size (10 != 20). Mirror sync in progress?",
            ]),
        );
        assert!(matches!(e, BuildError::Download { .. }), "{e}");
        let e = classify(
            &plan,
            "1",
            &said(&[
                "Err:1 http://127.0.0.1:1/debian nosuch InRelease",
                "  Could not connect to 127.0.0.1:1 (127.0.0.1). - connect (111: Connection refused)",
            ]),
        );
        assert!(matches!(e, BuildError::Unreachable { .. }), "{e}");
        let e = classify(&plan, "1", &said(&["E: something else"]));
        assert!(e.to_string().contains("something else"), "{e}");
    }
}
