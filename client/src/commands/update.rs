//! `banger update [--check] [--to vX.Y.Z] [--dry-run] [--force]`.
//!
//! The steps (manifest, signature, hash, staging, `--check-migrations`, swap, restart,
//! check, rollback) are the `banger-update` crate's (`client/update/`); this module picks the release channel,
//! asks the daemon's UpdaterActor for the gate (no VM operation in flight), and provides
//! the restart and the post-restart check for the two kinds of daemon:
//! - the **system service** (the system socket exists): `systemctl restart bangerd.service`;
//! - a **user daemon**: `daemon.stop`, then the new `bangerd --background` on the same
//!   socket (if none was running, the new `bangerd --version` is checked instead).
//!
//! The check after a restart: the daemon answers `daemon.status` with the release's
//! version (and commit, when the manifest gives one), and the new `banger doctor` finds
//! no failing check that was not already failing before the update.
//!
//! The binaries replaced are the ones beside this executable (`/usr/local/bin` for the
//! system install). Staging happens under `/var/cache/banger/updates` (root) or
//! `$XDG_CACHE_HOME/banger/updates`, not /tmp, which may be `noexec`.
//!
//! **The release channel** (manifest URL and trusted key) is compiled in (see
//! `client/build.rs`); no config key changes it. Tests point a *debug* build elsewhere
//! with `BANGER_TEST_UPDATE_MANIFEST_URL` and `BANGER_TEST_UPDATE_KEY` (a PEM file);
//! release builds (`debug_assertions` off) do not read them at all.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_api::{DaemonRpcClient, UpdateGate, UpdateRpcClient};
use banger_error::error_chain;
use banger_update::{self as updater, Choice, Current, Release, ServiceControl, Source};
use serde::Serialize;

use crate::connect::{self, Target};
use crate::exit::{self, CliError};
use crate::render;

/// The compiled-in release channel.
pub const MANIFEST_URL: &str = env!("BANGER_RELEASE_MANIFEST_URL");
pub const RELEASE_KEY: &str = include_str!(env!("BANGER_RELEASE_KEY_FILE"));

#[derive(Debug)]
pub struct Opts {
    pub check: bool,
    pub to: Option<String>,
    pub dry_run: bool,
    pub force: bool,
    pub json: bool,
}

/// The channel: compiled in; in debug builds only, overridable for tests.
fn source() -> Result<Source, CliError> {
    let (mut url, mut key) = (MANIFEST_URL.to_owned(), RELEASE_KEY.to_owned());
    if cfg!(debug_assertions) {
        if let Ok(u) = std::env::var("BANGER_TEST_UPDATE_MANIFEST_URL") {
            url = u;
        }
        if let Ok(path) = std::env::var("BANGER_TEST_UPDATE_KEY") {
            key = std::fs::read_to_string(&path)
                .map_err(|e| CliError::Other(format!("cannot read {path}: {e}")))?;
        }
    }
    Source::new(&url, &key).map_err(CliError::Other)
}

fn err(e: updater::UpdateError) -> CliError {
    let text = error_chain(&e);
    match e {
        updater::UpdateError::Downgrade { .. } | updater::UpdateError::NoSuchVersion(_) => {
            CliError::Usage(text)
        }
        _ => CliError::Other(text),
    }
}

#[derive(Debug, Serialize)]
struct CheckOut {
    current: Current,
    latest: String,
    target: String,
    update_available: bool,
}

fn current() -> Current {
    Current {
        version: super::version::VERSION.into(),
        commit: super::version::COMMIT.into(),
    }
}

fn cache_root() -> PathBuf {
    if nix::unistd::geteuid().is_root() && std::env::var_os("XDG_CACHE_HOME").is_none() {
        return PathBuf::from("/var/cache/banger/updates");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("banger/updates")
}

pub async fn run(target: &Target, opts: Opts) -> Result<u8, CliError> {
    let src = source()?;
    let manifest = updater::fetch_manifest(&src).await.map_err(err)?;
    let cur = current();
    let choice = updater::choose(&manifest, opts.to.as_deref(), &cur).map_err(err)?;
    let (release, available) = match choice {
        Choice::UpToDate(r) => (r, false),
        Choice::Update(r) => (r, true),
    };
    if opts.check || !available {
        let out = CheckOut {
            current: cur.clone(),
            latest: manifest.latest.clone(),
            target: release.version.clone(),
            update_available: available,
        };
        if opts.json {
            render::json(&out)?;
        } else if available {
            outln!(
                "banger {} is available (this is {} commit {}); install it with `banger update`{}",
                release.version,
                cur.version,
                cur.commit,
                if target.system { " under sudo" } else { "" }
            );
        } else {
            outln!(
                "banger {} (commit {}) is up to date",
                cur.version,
                cur.commit
            );
        }
        return Ok(exit::OK);
    }

    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.canonicalize().ok())
        .and_then(|e| e.parent().map(Path::to_owned))
        .ok_or_else(|| CliError::Other("cannot find where this banger is installed".into()))?;
    if nix::unistd::access(&bin_dir, nix::unistd::AccessFlags::W_OK).is_err() {
        return Err(CliError::Permission(format!(
            "cannot write {}: run `sudo banger update`",
            bin_dir.display()
        )));
    }

    // The gate: no VM operation in flight (the daemon's UpdaterActor decides).
    let daemon = connect::connect(target).await.ok();
    if let Some(client) = &daemon {
        let granted = client
            .gate(UpdateGate {
                version: release.version.clone(),
                force: opts.force,
            })
            .await?;
        if !granted.in_flight.is_empty() {
            eprintln!(
                "warning: updating while VM operations are in flight (--force): {}",
                granted.in_flight.join(", ")
            );
        }
    }

    let arch = std::env::consts::ARCH;
    let staged = updater::stage(&src, &release, arch, &cache_root())
        .await
        .map_err(err)?;
    let mut migration_args = Vec::new();
    if target.system {
        migration_args.push("--system".into());
    }
    let migrations = updater::check_migrations(&staged, &migration_args)
        .await
        .map_err(err)?;
    if opts.dry_run {
        if opts.json {
            render::json(&serde_json::json!({
                "version": release.version,
                "tarball": staged.tarball,
                "sha256": staged.sha256,
                "verified": true,
                "migrations": migrations,
                "installed": false,
            }))?;
        } else {
            outln!(
                "banger {}: signature and SHA-256 verified ({}), staged, migration check passed ({migrations}); nothing installed (--dry-run)",
                release.version,
                staged.sha256
            );
        }
        return Ok(exit::OK);
    }

    let baseline = doctor_failures(&bin_dir.join("banger"), target).await;
    let service = Restarter {
        systemctl: Box::new(crate::systemd::SystemctlCmd { root: None }),
        target: target.clone(),
        bin_dir: bin_dir.clone(),
        was_running: daemon.is_some(),
        baseline,
    };
    drop(daemon);
    updater::apply(&staged, &bin_dir, &service)
        .await
        .map_err(err)?;
    if opts.json {
        render::json(&serde_json::json!({
            "from": cur,
            "version": release.version,
            "commit": release.commit,
            "installed": true,
        }))?;
    } else {
        outln!(
            "updated banger {} -> {} in {}{}",
            cur.version,
            release.version,
            bin_dir.display(),
            if service.was_running {
                " and restarted the daemon"
            } else {
                ""
            }
        );
    }
    Ok(exit::OK)
}

/// Names of failing doctor checks, as the `banger` at `bin` sees them.
async fn doctor_failures(bin: &Path, target: &Target) -> Result<BTreeSet<String>, String> {
    let out = tokio::process::Command::new(bin)
        .args(["doctor", "--json", "--socket"])
        .arg(&target.socket)
        .env("BANGER_NO_AUTOSTART", "1")
        .output()
        .await
        .map_err(|e| format!("cannot run {} doctor: {e}", bin.display()))?;
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{} doctor --json printed no JSON ({e}): {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    Ok(checks
        .iter()
        .filter(|c| c["status"] == "fail")
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect())
}

/// Restart and check, for the system service or a user daemon.
#[derive(Debug)]
struct Restarter {
    /// How the system service is restarted (the real `systemctl` in the binary).
    systemctl: Box<dyn crate::systemd::Systemctl>,
    target: Target,
    bin_dir: PathBuf,
    was_running: bool,
    baseline: Result<BTreeSet<String>, String>,
}

const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

impl Restarter {
    async fn wait_answer(&self) -> Result<banger_api::DaemonStatus, String> {
        let deadline = Instant::now() + RESTART_TIMEOUT;
        loop {
            if let Ok(c) = connect::connect(&self.target).await
                && let Ok(s) = c.status().await
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the daemon did not answer on {} within {RESTART_TIMEOUT:?}",
                    self.target.socket.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop_user_daemon(&self) -> Result<(), String> {
        let Ok(client) = connect::connect(&self.target).await else {
            return Ok(());
        };
        let pid = client
            .status()
            .await
            .map_err(|e| format!("daemon.status failed: {e}"))?
            .pid;
        // The answer can lose the race with the daemon closing connections as it shuts
        // down; whether it stopped is judged by its pid and socket below.
        let _ = client.stop().await;
        drop(client);
        let deadline = Instant::now() + RESTART_TIMEOUT;
        while self.target.socket.exists()
            || std::path::Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        {
            if Instant::now() > deadline {
                return Err(format!("the old daemon (pid {pid}) did not stop"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl ServiceControl for Restarter {
    async fn restart(&self) -> Result<(), String> {
        if self.target.system {
            self.systemctl.restart(super::system::UNIT)?;
            return self.wait_answer().await.map(drop);
        }
        if !self.was_running {
            return Ok(());
        }
        self.stop_user_daemon().await?;
        let bangerd = self.bin_dir.join("bangerd");
        let mut child = std::process::Command::new(&bangerd)
            .arg("--background")
            .arg("--socket")
            .arg(&self.target.socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bangerd.display()))?;
        let deadline = Instant::now() + RESTART_TIMEOUT;
        loop {
            if let Ok(c) = connect::connect(&self.target).await
                && c.ping().await.is_ok()
            {
                // Reap it when it exits later (it left our session).
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut text = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut text);
                }
                let last = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                return Err(format!("the new bangerd exited with {status}: {last}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the new bangerd did not answer within {RESTART_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn verify(&self, release: &Release) -> Result<(), String> {
        let want_version = release.version.trim_start_matches('v');
        if !self.target.system && !self.was_running {
            let bangerd = self.bin_dir.join("bangerd");
            let out = std::process::Command::new(&bangerd)
                .arg("--version")
                .output()
                .map_err(|e| format!("cannot run {}: {e}", bangerd.display()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let ok = text.contains(want_version)
                && release.commit.as_deref().is_none_or(|c| text.contains(c));
            return if ok {
                Ok(())
            } else {
                Err(format!("the new bangerd reports `{}`", text.trim()))
            };
        }
        let s = self.wait_answer().await?;
        if s.version != want_version {
            return Err(format!(
                "the daemon reports version {}, not {want_version}",
                s.version
            ));
        }
        if let Some(c) = &release.commit
            && &s.commit != c
        {
            return Err(format!(
                "the daemon reports commit {}, not {c} as the manifest says",
                s.commit
            ));
        }
        let after = doctor_failures(&self.bin_dir.join("banger"), &self.target).await?;
        let before = self.baseline.clone().unwrap_or_default();
        let new: Vec<&String> = after.difference(&before).collect();
        if !new.is_empty() {
            return Err(format!(
                "`banger doctor` fails checks it passed before: {}",
                new.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::systemd::{FakeSystemd, Systemctl};

    /// The system service is restarted through the injected Systemctl; a unit that fails
    /// to start is reported with systemd's words (and `apply` then rolls back).
    #[tokio::test]
    async fn the_system_service_restart_goes_through_systemctl() {
        let dir = tempfile::tempdir().unwrap();
        let units = dir.path().join("etc/systemd/system");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::write(
            units.join(super::super::system::UNIT),
            super::super::system::UNIT_TEXT,
        )
        .unwrap();
        let fake = FakeSystemd::new(dir.path());
        fake.daemon_reload().unwrap();
        fake.fail_starts(super::super::system::UNIT);
        let r = Restarter {
            systemctl: Box::new(fake),
            target: Target {
                socket: dir.path().join("no.sock"),
                system: true,
            },
            bin_dir: dir.path().to_owned(),
            was_running: true,
            baseline: Ok(BTreeSet::new()),
        };
        let err = r.restart().await.unwrap_err();
        assert!(err.contains("bangerd.service failed"), "{err}");
    }
}
