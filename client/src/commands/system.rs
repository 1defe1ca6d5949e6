//! `banger system install|status|restart|uninstall` (and the same under `banger daemon`):
//! the systemd service.
//!
//! Install copies `banger` and `bangerd` (the ones beside this executable) to
//! `/usr/local/bin` (each through a temporary file and `rename(2)`), the static guest
//! binaries `banger-init` and `banger-agent` to `/usr/local/lib/banger` (where the installed
//! bangerd looks: `<its dir>/../lib/banger`; see [`find_guest_binaries`]), writes
//! `/etc/systemd/system/bangerd.service` (embedded from `systemd/` at build time) and a
//! drop-in `bangerd.service.d/owner.conf` that names the owner user (`--owner`, else
//! `$SUDO_USER`) as `BANGER_OWNER`, creates the system group `banger` (members may use the
//! socket), reloads systemd, and enables and starts the service. It is idempotent: a second
//! install refreshes the files and restarts the service. Uninstall stops and disables the
//! service and removes exactly those files; the data (`/var/lib/banger`), logs, cache,
//! config and the group stay, and it prints where they are.
//!
//! Everything is relative to a root directory, `/` unless the hidden `--root <dir>` is
//! given (an image being built, or a test): then systemctl runs offline on that directory
//! (`systemctl --root`), and nothing is started. systemd is reached through
//! [`crate::systemd::Systemctl`], so tests inject its double.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::exit::{self, CliError};
use crate::render;
use crate::systemd::{Systemctl, SystemctlCmd};

/// The unit's name.
pub const UNIT: &str = "bangerd.service";
/// The unit file, as shipped in `systemd/`.
pub const UNIT_TEXT: &str = include_str!("../../../systemd/bangerd.service");
/// Binaries installed, in order.
pub const BINARIES: &[&str] = &["bangerd", "banger"];
/// The guest binaries, installed beside the host ones' `../lib/banger`.
pub const GUEST_BINARIES: [&str; 2] = banger_guest::binaries::NAMES;

/// Where an install puts things, under `root`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: Option<PathBuf>) -> Layout {
        Layout {
            root: root.unwrap_or_else(|| PathBuf::from("/")),
        }
    }

    fn at(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.at("/usr/local/bin")
    }

    /// Where the installed bangerd finds the guest binaries (`<bin_dir>/../lib/banger`).
    pub fn guest_dir(&self) -> PathBuf {
        self.at("/usr/local/lib/banger")
    }

    pub fn unit_file(&self) -> PathBuf {
        self.at("/etc/systemd/system").join(UNIT)
    }

    pub fn dropin_dir(&self) -> PathBuf {
        self.at("/etc/systemd/system").join(format!("{UNIT}.d"))
    }

    pub fn owner_dropin(&self) -> PathBuf {
        self.dropin_dir().join("owner.conf")
    }

    /// What uninstall keeps: (what, path).
    pub fn kept(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("data (store, images, disks)", self.at("/var/lib/banger")),
            ("logs", self.at("/var/log/banger")),
            ("cache", self.at("/var/cache/banger")),
            ("config", self.at("/etc/banger")),
        ]
    }

    fn offline(&self) -> bool {
        self.root != Path::new("/")
    }
}

/// Errors of install/uninstall.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("installing the system service needs root: run `sudo banger system {0}`")]
    NotRoot(&'static str),
    #[error(
        "no owner user: run this with sudo from your own account, or pass --owner <user> (the daemon drops to that user)"
    )]
    NoOwner,
    #[error("user {0} does not exist")]
    UnknownOwner(String),
    #[error(
        "cannot find {0} beside this banger: install from a build (target/release) or a release tarball"
    )]
    MissingBinary(PathBuf),
    #[error(
        "no static guest binaries (banger-init, banger-agent) to install: looked in {looked}; build them with `scripts/build-guest.sh release` (into target/guest/) or pass --guest-dir DIR"
    )]
    NoGuestBinaries { looked: String },
    #[error("{0}")]
    GuestBinary(#[from] banger_guest::binaries::GuestBinaryError),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the group `banger`: {0}")]
    Group(String),
    #[error("{0}")]
    Systemd(String),
}

impl From<SystemError> for CliError {
    fn from(e: SystemError) -> Self {
        match e {
            SystemError::NotRoot(_) => CliError::Permission(e.to_string()),
            SystemError::NoOwner | SystemError::UnknownOwner(_) => CliError::Usage(e.to_string()),
            other => CliError::Other(other.to_string()),
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SystemError {
    let path = path.to_owned();
    move |source| SystemError::Io { what, path, source }
}

/// Write `bytes` to `path` through a temporary file in the same directory and a rename.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SystemError> {
    let dir = path.parent().expect("absolute path");
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = dir.join(format!(
        ".{}.new",
        path.file_name().expect("a file name").to_string_lossy()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io("write", path))
}

/// The drop-in naming the owner.
pub fn owner_dropin(owner: &str) -> String {
    format!(
        "# Written by `banger system install`: the user bangerd drops to after forking the helper.\n[Service]\nEnvironment=BANGER_OWNER={owner}\n"
    )
}

/// Does `user` exist on the system under `root`?
fn user_exists(layout: &Layout, user: &str) -> bool {
    if !layout.offline() && nix::unistd::User::from_name(user).ok().flatten().is_some() {
        return true;
    }
    std::fs::read_to_string(layout.at("/etc/passwd"))
        .is_ok_and(|p| p.lines().any(|l| l.split(':').next() == Some(user)))
}

fn group_exists(layout: &Layout) -> bool {
    std::fs::read_to_string(layout.at("/etc/group"))
        .is_ok_and(|g| g.lines().any(|l| l.starts_with("banger:")))
}

fn ensure_group(layout: &Layout) -> Result<bool, SystemError> {
    if group_exists(layout) {
        return Ok(false);
    }
    let mut cmd = std::process::Command::new("groupadd");
    if layout.offline() {
        cmd.arg("--prefix").arg(&layout.root);
    }
    let out = cmd
        .args(["--system", "banger"])
        .output()
        .map_err(|e| SystemError::Group(format!("cannot run groupadd: {e}")))?;
    if !out.status.success() {
        return Err(SystemError::Group(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(true)
}

/// Where install takes the static guest binaries from: `given` (`--guest-dir`), which must
/// hold them, else the first of `from` (a release tarball's layout), `from/../lib/banger`
/// (an installed prefix) and `from/../guest` (a checkout: `target/release` beside the
/// `target/guest` that `scripts/build-guest.sh` fills) that holds static ones. A plain
/// `cargo build` leaves dynamically linked ones beside banger: those are skipped, never
/// installed.
pub fn find_guest_binaries(from: &Path, given: Option<&Path>) -> Result<PathBuf, SystemError> {
    use banger_guest::binaries as guest;
    if let Some(d) = given {
        guest::check_dir(d)?;
        return Ok(d.to_owned());
    }
    let candidates = [
        from.to_owned(),
        from.join("../lib/banger"),
        from.join("../guest"),
    ];
    for d in &candidates {
        if guest::check_dir(d).is_ok() {
            return Ok(d.clone());
        }
    }
    Err(SystemError::NoGuestBinaries {
        looked: candidates
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// What install did.
#[derive(Debug, Serialize)]
pub struct Installed {
    pub binaries: Vec<String>,
    /// The guest binaries installed (none when static ones are already in
    /// /usr/lib/banger and none were at hand), and where from (or where they already are).
    pub guest_binaries: Vec<String>,
    pub guest_binaries_from: String,
    pub unit: String,
    pub owner: String,
    pub group_created: bool,
    pub started: bool,
}

/// Install from the binaries in `from` (a directory holding `banger` and `bangerd`).
pub fn install(
    layout: &Layout,
    systemctl: &dyn Systemctl,
    from: &Path,
    guest_from: Option<&Path>,
    owner: &str,
) -> Result<Installed, SystemError> {
    if !user_exists(layout, owner) {
        return Err(SystemError::UnknownOwner(owner.into()));
    }
    // Checked before anything is written: an install without them would give a service
    // that cannot make an image. Static ones already in /usr/lib/banger (a distribution
    // package, scripts/quickstart.sh) serve when none are at hand.
    let system_guest = layout.at("/usr/lib/banger");
    let guest_from = match find_guest_binaries(from, guest_from) {
        Ok(d) => Some(d),
        Err(SystemError::NoGuestBinaries { .. })
            if guest_from.is_none() && banger_guest::binaries::check_dir(&system_guest).is_ok() =>
        {
            None
        }
        Err(e) => return Err(e),
    };
    let bin_dir = layout.bin_dir();
    let mut binaries = Vec::new();
    for name in BINARIES {
        let src = from.join(name);
        if !src.is_file() {
            return Err(SystemError::MissingBinary(src));
        }
        let dest = bin_dir.join(name);
        let same = std::fs::canonicalize(&src).ok() == std::fs::canonicalize(&dest).ok();
        if !same {
            let bytes = std::fs::read(&src).map_err(io("read", &src))?;
            write_atomic(&dest, &bytes, 0o755)?;
        }
        binaries.push(dest.display().to_string());
    }
    let mut guest_binaries = Vec::new();
    for name in GUEST_BINARIES.iter().filter(|_| guest_from.is_some()) {
        let guest_from = guest_from.as_deref().expect("filtered");
        let (src, dest) = (guest_from.join(name), layout.guest_dir().join(name));
        let bytes = std::fs::read(&src).map_err(io("read", &src))?;
        if std::fs::read(&dest).ok().as_deref() != Some(&bytes[..]) {
            write_atomic(&dest, &bytes, 0o755)?;
        }
        guest_binaries.push(dest.display().to_string());
    }
    write_atomic(&layout.unit_file(), UNIT_TEXT.as_bytes(), 0o644)?;
    write_atomic(
        &layout.owner_dropin(),
        owner_dropin(owner).as_bytes(),
        0o644,
    )?;
    let group_created = ensure_group(layout)?;
    systemctl.daemon_reload().map_err(SystemError::Systemd)?;
    systemctl.enable(UNIT).map_err(SystemError::Systemd)?;
    // `restart` starts a stopped unit and picks up new binaries on a re-install.
    let started = !layout.offline();
    if started {
        systemctl.restart(UNIT).map_err(SystemError::Systemd)?;
    }
    Ok(Installed {
        binaries,
        guest_binaries,
        guest_binaries_from: guest_from.unwrap_or(system_guest).display().to_string(),
        unit: layout.unit_file().display().to_string(),
        owner: owner.into(),
        group_created,
        started,
    })
}

/// What uninstall removed and kept.
#[derive(Debug, Serialize)]
pub struct Uninstalled {
    pub removed: Vec<String>,
    pub kept: Vec<(String, String)>,
}

/// Stop, disable and remove the service and the binaries; keep data, logs, cache, config.
pub fn uninstall(layout: &Layout, systemctl: &dyn Systemctl) -> Result<Uninstalled, SystemError> {
    let unit = layout.unit_file();
    if unit.exists() {
        // Make sure systemd knows the unit before asking it to stop (a hand-edited file).
        systemctl.daemon_reload().map_err(SystemError::Systemd)?;
        systemctl.stop(UNIT).map_err(SystemError::Systemd)?;
        systemctl.disable(UNIT).map_err(SystemError::Systemd)?;
    }
    let mut removed = Vec::new();
    let mut paths = vec![layout.owner_dropin(), unit];
    paths.extend(BINARIES.iter().map(|b| layout.bin_dir().join(b)));
    paths.extend(GUEST_BINARIES.iter().map(|b| layout.guest_dir().join(b)));
    for p in paths {
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &p)(e)),
        }
    }
    let _ = std::fs::remove_dir(layout.dropin_dir());
    let _ = std::fs::remove_dir(layout.guest_dir());
    systemctl.daemon_reload().map_err(SystemError::Systemd)?;
    let kept = layout
        .kept()
        .into_iter()
        .filter(|(_, p)| p.exists())
        .map(|(w, p)| (w.to_owned(), p.display().to_string()))
        .collect();
    Ok(Uninstalled { removed, kept })
}

/// The install's state.
#[derive(Debug, Serialize)]
pub struct Status {
    pub installed: bool,
    pub unit: String,
    pub unit_current: bool,
    pub owner: Option<String>,
    pub enabled: String,
    pub active: String,
    pub bangerd: Option<String>,
    pub socket: String,
    pub socket_present: bool,
}

pub fn status(layout: &Layout, systemctl: &dyn Systemctl) -> Status {
    let unit = layout.unit_file();
    let text = std::fs::read_to_string(&unit).ok();
    let owner = std::fs::read_to_string(layout.owner_dropin())
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Environment=BANGER_OWNER="))
                .map(str::to_owned)
        });
    let bangerd = layout.bin_dir().join("bangerd");
    let version = std::process::Command::new(&bangerd)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let socket = layout.at(banger_api::socket::SYSTEM_SOCKET);
    Status {
        installed: text.is_some(),
        unit: unit.display().to_string(),
        unit_current: text.as_deref() == Some(UNIT_TEXT),
        owner,
        enabled: systemctl.is_enabled(UNIT),
        active: systemctl.is_active(UNIT),
        bangerd: version,
        socket_present: socket.exists(),
        socket: socket.display().to_string(),
    }
}

/// `banger doctor`'s line about the system service: not installed (fine: a user daemon
/// is used), installed but stale, disabled, or not running, with what to do.
pub fn doctor_check(layout: &Layout, systemctl: &dyn Systemctl) -> super::doctor::Check {
    use super::doctor::{Check, Level};
    let c = |status, detail: String, hint: Option<&str>| Check {
        name: "system-service".into(),
        status,
        detail,
        hint: hint.map(str::to_owned),
    };
    let s = status(layout, systemctl);
    if !s.installed {
        return c(
            Level::Ok,
            "not installed: the CLI starts a user daemon".into(),
            None,
        );
    }
    let owner = s.owner.as_deref().unwrap_or("(no owner drop-in)");
    if s.bangerd.is_none() {
        return c(
            Level::Fail,
            format!(
                "{} is installed but {}/bangerd is missing",
                s.unit,
                layout.bin_dir().display()
            ),
            Some(
                "re-run `sudo banger system install`, or remove it with `sudo banger system uninstall`",
            ),
        );
    }
    if !s.unit_current {
        return c(
            Level::Warn,
            format!("{} differs from the unit this banger ships", s.unit),
            Some("re-run `sudo banger system install` to refresh it"),
        );
    }
    if s.enabled != "enabled" {
        return c(
            Level::Warn,
            format!(
                "installed (owner {owner}) but {}: it will not start at boot",
                s.enabled
            ),
            Some("`sudo systemctl enable bangerd.service`"),
        );
    }
    match s.active.as_str() {
        "active" => c(
            Level::Ok,
            format!(
                "installed, enabled and running (owner {owner}, {})",
                s.bangerd.unwrap_or_default()
            ),
            None,
        ),
        "unknown" => c(
            Level::Warn,
            format!(
                "installed and enabled (owner {owner}); its state cannot be read (is systemd PID 1 here?)"
            ),
            Some("`systemctl status bangerd.service`"),
        ),
        other => c(
            Level::Fail,
            format!("installed and enabled (owner {owner}) but {other}"),
            Some("see `journalctl -u bangerd.service`, then `sudo banger system restart`"),
        ),
    }
}

/// Parsed `system` subcommands (see `cli::SystemCmd`).
pub async fn run(cmd: crate::cli::SystemCmd) -> Result<u8, CliError> {
    use crate::cli::SystemCmd;
    let root_of = |r: &Option<PathBuf>| Layout::new(r.clone());
    let is_root = nix::unistd::geteuid().is_root();
    match cmd {
        SystemCmd::Install(crate::cli::InstallArgs {
            owner,
            guest_dir,
            root: crate::cli::RootArgs { root, json },
        }) => {
            let layout = root_of(&root);
            if !is_root && !layout.offline() {
                return Err(SystemError::NotRoot("install").into());
            }
            let owner = owner
                .or_else(|| std::env::var("SUDO_USER").ok().filter(|u| u != "root"))
                .ok_or(SystemError::NoOwner)?;
            let from = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_owned))
                .unwrap_or_default();
            let systemctl = SystemctlCmd { root: root.clone() };
            let done = install(&layout, &systemctl, &from, guest_dir.as_deref(), &owner)?;
            if json {
                render::json(&done)?;
            } else {
                for b in &done.binaries {
                    outln!("installed {b}");
                }
                for b in &done.guest_binaries {
                    outln!("installed {b} (from {})", done.guest_binaries_from);
                }
                if done.guest_binaries.is_empty() {
                    outln!(
                        "guest binaries: using those in {}",
                        done.guest_binaries_from
                    );
                }
                outln!("installed {} (owner {})", done.unit, done.owner);
                if done.group_created {
                    outln!(
                        "created the group `banger`: add users with `sudo usermod -aG banger <user>`"
                    );
                }
                if done.started {
                    outln!(
                        "bangerd.service is enabled and running; check it with `banger system status`"
                    );
                } else {
                    outln!(
                        "bangerd.service is enabled in {} (not started: offline root)",
                        layout.root.display()
                    );
                }
            }
            Ok(exit::OK)
        }
        SystemCmd::Uninstall(crate::cli::RootArgs { root, json }) => {
            let layout = root_of(&root);
            if !is_root && !layout.offline() {
                return Err(SystemError::NotRoot("uninstall").into());
            }
            let systemctl = SystemctlCmd { root: root.clone() };
            let done = uninstall(&layout, &systemctl)?;
            if json {
                render::json(&done)?;
            } else {
                if done.removed.is_empty() {
                    outln!("the system service was not installed; nothing removed");
                }
                for r in &done.removed {
                    outln!("removed {r}");
                }
                if !done.kept.is_empty() {
                    outln!("kept your data; delete it by hand if you no longer want it:");
                    for (what, path) in &done.kept {
                        outln!("  {path:<24} {what}");
                    }
                }
            }
            Ok(exit::OK)
        }
        SystemCmd::Status(crate::cli::RootArgs { root, json }) => {
            let layout = root_of(&root);
            let systemctl = SystemctlCmd { root: root.clone() };
            let s = status(&layout, &systemctl);
            if json {
                render::json(&s)?;
            } else {
                if !s.installed {
                    outln!(
                        "the system service is not installed; install it with `sudo banger system install`"
                    );
                    return Ok(exit::UNAVAILABLE);
                }
                outln!(
                    "unit:    {}{}",
                    s.unit,
                    if s.unit_current {
                        ""
                    } else {
                        " (differs from this banger's: re-run `sudo banger system install`)"
                    }
                );
                outln!("owner:   {}", s.owner.as_deref().unwrap_or("(none)"));
                outln!("state:   {}, {}", s.enabled, s.active);
                outln!("bangerd: {}", s.bangerd.as_deref().unwrap_or("(missing)"));
                outln!(
                    "socket:  {}{}",
                    s.socket,
                    if s.socket_present { "" } else { " (absent)" }
                );
            }
            Ok(if s.installed {
                exit::OK
            } else {
                exit::UNAVAILABLE
            })
        }
        SystemCmd::Restart => {
            if !is_root {
                return Err(SystemError::NotRoot("restart").into());
            }
            let systemctl = SystemctlCmd { root: None };
            systemctl.restart(UNIT).map_err(SystemError::Systemd)?;
            // Answering on the socket, not just "started" by systemd.
            let target = crate::connect::Target {
                socket: PathBuf::from(banger_api::socket::SYSTEM_SOCKET),
                system: true,
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                if let Ok(c) = crate::connect::connect(&target).await
                    && let Ok(s) = banger_api::DaemonRpcClient::status(&c).await
                {
                    outln!(
                        "bangerd.service restarted: bangerd {} (pid {}) answers",
                        s.version,
                        s.pid
                    );
                    return Ok(exit::OK);
                }
                if std::time::Instant::now() > deadline {
                    return Err(CliError::Other(format!(
                        "bangerd.service was restarted but does not answer on {} after 30s; see `journalctl -u bangerd.service`",
                        target.socket.display()
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::systemd::FakeSystemd;

    const BUSYBOX: &str = "/bin/busybox";

    /// A root with an owner account and the binaries to install in `src/`.
    fn root() -> (tempfile::TempDir, Layout, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(etc.join("group"), "root:x:0:\n").unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        for b in BINARIES {
            std::fs::write(src.join(b), format!("#!/bin/sh\necho {b} 9.9.9\n")).unwrap();
            std::fs::set_permissions(src.join(b), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // Static guest binaries: busybox-static's (the rig installs it) passes the check.
        for b in GUEST_BINARIES {
            std::fs::copy(BUSYBOX, src.join(b)).unwrap();
        }
        let layout = Layout::new(Some(dir.path().join("")));
        (dir, layout, src)
    }

    #[test]
    fn install_puts_binaries_unit_owner_and_group_in_place_and_enables() {
        let (dir, layout, src) = root();
        let sd = FakeSystemd::new(dir.path());
        let done = install(&layout, &sd, &src, None, "alice").unwrap();
        for b in BINARIES {
            let p = layout.bin_dir().join(b);
            assert_eq!(
                std::fs::read(&p).unwrap(),
                std::fs::read(src.join(b)).unwrap()
            );
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o755
            );
        }
        assert_eq!(
            std::fs::read_to_string(layout.unit_file()).unwrap(),
            UNIT_TEXT
        );
        assert!(
            std::fs::read_to_string(layout.owner_dropin())
                .unwrap()
                .contains("BANGER_OWNER=alice")
        );
        for b in GUEST_BINARIES {
            let p = layout.guest_dir().join(b);
            assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(BUSYBOX).unwrap());
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o755
            );
        }
        assert!(done.group_created);
        assert!(group_exists(&layout));
        // Reload before enable (else systemd does not know the unit), and enabled for boot.
        assert_eq!(sd.calls(), vec!["daemon-reload", "enable bangerd.service"]);
        assert_eq!(sd.is_enabled(UNIT), "enabled");
        assert!(
            dir.path()
                .join("etc/systemd/system/multi-user.target.wants/bangerd.service")
                .symlink_metadata()
                .is_ok()
        );
        let st = status(&layout, &sd);
        assert!(st.installed && st.unit_current);
        assert_eq!(st.owner.as_deref(), Some("alice"));
        assert_eq!(st.bangerd.as_deref(), Some("bangerd 9.9.9"));
        // Idempotent: a second install keeps the group and succeeds.
        let again = install(&layout, &sd, &src, None, "alice").unwrap();
        assert!(!again.group_created);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/group"))
                .unwrap()
                .matches("banger:")
                .count(),
            1
        );
    }

    #[test]
    fn install_refuses_an_unknown_owner_and_missing_binaries_without_writing() {
        let (dir, layout, src) = root();
        let sd = FakeSystemd::new(dir.path());
        let e = install(&layout, &sd, &src, None, "mallory").unwrap_err();
        assert!(e.to_string().contains("mallory"), "{e}");
        std::fs::remove_file(src.join("banger")).unwrap();
        let e = install(&layout, &sd, &src, None, "alice").unwrap_err();
        assert!(matches!(e, SystemError::MissingBinary(_)), "{e}");
        assert!(!layout.unit_file().exists());
        assert!(sd.calls().is_empty());
    }

    #[test]
    fn install_takes_only_static_guest_binaries_and_refuses_without_any() {
        let (dir, layout, src) = root();
        let sd = FakeSystemd::new(dir.path());
        // Dynamically linked ones beside banger (a plain `cargo build`) are skipped, and a
        // checkout's target/guest (beside target/release) is taken instead.
        for b in GUEST_BINARIES {
            std::fs::copy("/bin/true", src.join(b)).unwrap();
        }
        let none = install(&layout, &sd, &src, None, "alice").unwrap_err();
        assert!(
            matches!(none, SystemError::NoGuestBinaries { .. }),
            "{none}"
        );
        assert!(
            none.to_string().contains("scripts/build-guest.sh"),
            "{none}"
        );
        assert!(!layout.unit_file().exists() && !layout.bin_dir().exists());
        assert!(sd.calls().is_empty());
        let checkout = dir.path().join("guest");
        std::fs::create_dir_all(&checkout).unwrap();
        for b in GUEST_BINARIES {
            std::fs::copy(BUSYBOX, checkout.join(b)).unwrap();
        }
        let done = install(&layout, &sd, &src, None, "alice").unwrap();
        assert_eq!(Path::new(&done.guest_binaries_from), src.join("../guest"));
        assert_eq!(
            std::fs::read(layout.guest_dir().join("banger-agent")).unwrap(),
            std::fs::read(BUSYBOX).unwrap()
        );
        // --guest-dir is taken as given: dynamic ones there are an error naming the file.
        let e = install(&layout, &sd, &src, Some(&src), "alice").unwrap_err();
        assert!(e.to_string().contains("dynamically linked"), "{e}");
        // None at hand, but static ones already in /usr/lib/banger: those serve.
        std::fs::remove_dir_all(&checkout).unwrap();
        std::fs::remove_dir_all(layout.guest_dir()).unwrap();
        let system = dir.path().join("usr/lib/banger");
        std::fs::create_dir_all(&system).unwrap();
        for b in GUEST_BINARIES {
            std::fs::copy(BUSYBOX, system.join(b)).unwrap();
        }
        let done = install(&layout, &sd, &src, None, "alice").unwrap();
        assert!(done.guest_binaries.is_empty());
        assert_eq!(Path::new(&done.guest_binaries_from), system);
        assert!(!layout.guest_dir().exists());
    }

    #[test]
    fn uninstall_removes_what_install_wrote_and_keeps_data() {
        let (dir, layout, src) = root();
        let sd = FakeSystemd::new(dir.path());
        install(&layout, &sd, &src, None, "alice").unwrap();
        sd.restart(UNIT).unwrap();
        let data = dir.path().join("var/lib/banger");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("banger.redb"), b"store").unwrap();
        let done = uninstall(&layout, &sd).unwrap();
        assert_eq!(done.removed.len(), 6, "{:?}", done.removed);
        for b in BINARIES {
            assert!(!layout.bin_dir().join(b).exists());
        }
        assert!(!layout.guest_dir().exists());
        assert!(!layout.unit_file().exists());
        assert!(!layout.dropin_dir().exists());
        assert!(
            dir.path()
                .join("etc/systemd/system/multi-user.target.wants")
                .read_dir()
                .unwrap()
                .next()
                .is_none()
        );
        assert_eq!(std::fs::read(data.join("banger.redb")).unwrap(), b"store");
        assert_eq!(
            done.kept,
            vec![(
                "data (store, images, disks)".to_owned(),
                data.display().to_string()
            )]
        );
        assert_eq!(sd.is_active(UNIT), "inactive");
        let calls = sd.calls();
        let stop = calls
            .iter()
            .position(|c| c == "stop bangerd.service")
            .unwrap();
        let disable = calls
            .iter()
            .position(|c| c == "disable bangerd.service")
            .unwrap();
        assert!(stop < disable, "{calls:?}");
        // Uninstalling again is a no-op, not an error.
        assert!(uninstall(&layout, &sd).unwrap().removed.is_empty());
    }

    #[test]
    fn doctor_reports_the_service_state_with_what_to_do() {
        use crate::commands::doctor::Level;
        let (dir, layout, src) = root();
        let sd = FakeSystemd::new(dir.path());
        let ck = doctor_check(&layout, &sd);
        assert_eq!(
            (ck.status, ck.detail.contains("not installed")),
            (Level::Ok, true)
        );
        install(&layout, &sd, &src, None, "alice").unwrap();
        // Enabled but not running (PID 1 has not started it): a failure, with the way out.
        let ck = doctor_check(&layout, &sd);
        assert_eq!(ck.status, Level::Fail, "{ck:?}");
        assert!(ck.detail.contains("inactive") && ck.hint.unwrap().contains("journalctl"));
        sd.restart(UNIT).unwrap();
        let ck = doctor_check(&layout, &sd);
        assert_eq!(ck.status, Level::Ok, "{ck:?}");
        assert!(ck.detail.contains("owner alice") && ck.detail.contains("bangerd 9.9.9"));
        sd.disable(UNIT).unwrap();
        assert_eq!(doctor_check(&layout, &sd).status, Level::Warn);
        sd.enable(UNIT).unwrap();
        std::fs::write(
            layout.unit_file(),
            "[Service]\nExecStart=/x\n[Install]\nWantedBy=multi-user.target\n",
        )
        .unwrap();
        let ck = doctor_check(&layout, &sd);
        assert_eq!(ck.status, Level::Warn);
        assert!(ck.hint.unwrap().contains("system install"));
        std::fs::remove_file(layout.bin_dir().join("bangerd")).unwrap();
        assert_eq!(doctor_check(&layout, &sd).status, Level::Fail);
    }

    #[test]
    fn the_double_refuses_what_systemd_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let sd = FakeSystemd::new(dir.path());
        // Written but not reloaded: unknown to PID 1.
        let units = dir.path().join("etc/systemd/system");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::write(units.join(UNIT), UNIT_TEXT).unwrap();
        assert!(sd.restart(UNIT).unwrap_err().contains("not found"));
        sd.daemon_reload().unwrap();
        sd.restart(UNIT).unwrap();
        assert_eq!(sd.is_active(UNIT), "active");
        sd.fail_starts(UNIT);
        assert!(sd.restart(UNIT).unwrap_err().contains("failed"));
        assert_eq!(sd.is_active(UNIT), "inactive");
        std::fs::write(units.join("x.service"), "[Service]\nExecStart=/bin/true\n").unwrap();
        sd.daemon_reload().unwrap();
        assert!(sd.enable("x.service").unwrap_err().contains("WantedBy"));
    }
}
