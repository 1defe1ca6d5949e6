//! `Boot`: wait until the guest has finished booting.
//!
//! banger-init starts the agent before it hands PID 1 to the image's init, so the agent
//! answers seconds before systemd has started the image's services (ssh, docker, a
//! network-online target): a command run at that moment sees a half-booted machine
//! (`systemctl` says "System has not been booted with systemd"). banger-init writes which
//! init it handed over to in [`BOOT_INIT_MARKER`] just before it does; this waits for that
//! file, then, under systemd, for its private socket and for `systemctl
//! is-system-running --wait`, which returns when the start-up jobs are done (`running`, or
//! `degraded` when a unit failed: the failed units are listed, the boot still counts as
//! finished). An init other than systemd is not waited for (`unknown`). When the time is
//! up the answer is `starting`, and the host goes on with a warning.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::proto::{BOOT_INIT_BANGER, BOOT_INIT_MARKER, BOOT_INIT_SYSTEMD, BootState};

/// How often the files are looked at (the guest is booting: cheap is enough).
const POLL: Duration = Duration::from_millis(50);

/// Where the probe looks: the guest's `/` and its `systemctl` (tests point both elsewhere).
#[derive(Debug, Clone)]
pub struct Probe {
    pub root: PathBuf,
    pub systemctl: PathBuf,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            root: PathBuf::from("/"),
            systemctl: PathBuf::from("systemctl"),
        }
    }
}

impl Probe {
    fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// Wait at most `timeout` for the boot to finish.
    pub fn wait(&self, timeout: Duration) -> BootState {
        let deadline = Instant::now() + timeout;
        let starting = |init: &str| BootState {
            init: init.to_owned(),
            state: "starting".into(),
            failed: Vec::new(),
        };
        // banger-init is still setting up until the marker exists.
        let marker = loop {
            // Empty: caught between its creation and its write (banger-init renames a
            // whole one into place now; an older one wrote it in place).
            if let Ok(m) = std::fs::read_to_string(self.path(BOOT_INIT_MARKER))
                && !m.trim().is_empty()
            {
                break m.trim().to_owned();
            }
            if Instant::now() >= deadline {
                return starting(BOOT_INIT_BANGER);
            }
            std::thread::sleep(POLL);
        };
        match marker.as_str() {
            BOOT_INIT_BANGER => BootState {
                init: marker,
                state: "running".into(),
                failed: Vec::new(),
            },
            BOOT_INIT_SYSTEMD => self.systemd(deadline),
            other => BootState {
                init: other.strip_prefix("other ").unwrap_or(other).to_owned(),
                state: "unknown".into(),
                failed: Vec::new(),
            },
        }
    }

    fn systemd(&self, deadline: Instant) -> BootState {
        let starting = || BootState {
            init: BOOT_INIT_SYSTEMD.into(),
            state: "starting".into(),
            failed: Vec::new(),
        };
        // Before its private socket exists, systemctl answers `offline` at once.
        while !self.path("/run/systemd/private").exists() {
            if Instant::now() >= deadline {
                return starting();
            }
            std::thread::sleep(POLL);
        }
        let Some(out) = run_until(
            Command::new(&self.systemctl).args(["is-system-running", "--wait"]),
            deadline,
        ) else {
            return starting();
        };
        let state = out.trim().to_owned();
        let failed = if state == "degraded" {
            run_until(
                Command::new(&self.systemctl).args([
                    "list-units",
                    "--failed",
                    "--plain",
                    "--no-legend",
                    "--no-pager",
                ]),
                deadline + Duration::from_secs(5),
            )
            .map(|o| failed_units(&o))
            .unwrap_or_default()
        } else {
            Vec::new()
        };
        BootState {
            init: BOOT_INIT_SYSTEMD.into(),
            state: if state.is_empty() {
                "unknown".into()
            } else {
                state
            },
            failed,
        }
    }
}

/// Run `cmd` and return its stdout, or None if it could not run or outlived `deadline`
/// (then it is killed).
fn run_until(cmd: &mut Command, deadline: Instant) -> Option<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut()?, &mut out).ok()?;
    Some(out)
}

/// The unit names of `systemctl list-units --failed --plain --no-legend`.
fn failed_units(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// What banger-init writes to [`BOOT_INIT_MARKER`] before handing over to `init` (None:
/// it stays PID 1).
pub fn marker_for(init: Option<&Path>) -> String {
    match init {
        None => BOOT_INIT_BANGER.to_owned(),
        Some(p) => {
            let real = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
            if real.file_name().is_some_and(|n| n == "systemd") {
                BOOT_INIT_SYSTEMD.to_owned()
            } else {
                format!("other {}", p.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn probe(dir: &Path, systemctl: &str) -> Probe {
        let bin = dir.join("systemctl");
        std::fs::write(&bin, format!("#!/bin/sh\n{systemctl}\n")).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(dir.join("run/banger")).unwrap();
        Probe {
            root: dir.to_owned(),
            systemctl: bin,
        }
    }

    fn write_marker(dir: &Path, m: &str) {
        std::fs::write(dir.join("run/banger/init"), m).unwrap();
    }

    #[test]
    fn no_marker_yet_is_starting_when_the_time_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe(dir.path(), "echo running");
        let b = p.wait(Duration::from_millis(120));
        assert_eq!(b.state, "starting");
        assert!(!b.finished());
    }

    /// A marker read between its creation and its write (empty) is not an answer: the
    /// probe waits for its content (it said init "" and state "unknown").
    #[test]
    fn an_empty_marker_is_not_yet_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe(dir.path(), "exit 1");
        write_marker(dir.path(), "");
        let b = p.wait(Duration::from_millis(120));
        assert_eq!(
            (b.init.as_str(), b.state.as_str()),
            ("banger-init", "starting")
        );
        write_marker(dir.path(), "banger-init");
        assert_eq!(p.wait(Duration::from_secs(5)).state, "running");
    }

    #[test]
    fn banger_init_staying_pid_1_is_booted_as_soon_as_it_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe(dir.path(), "exit 1");
        let root = dir.path().to_owned();
        // The marker appears while the probe waits.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            write_marker(&root, "banger-init\n");
        });
        let b = p.wait(Duration::from_secs(30));
        writer.join().unwrap();
        assert_eq!(
            (b.init.as_str(), b.state.as_str()),
            ("banger-init", "running")
        );
        assert!(b.finished());
    }

    #[test]
    fn under_systemd_it_waits_for_the_private_socket_then_for_the_start_up_jobs() {
        let dir = tempfile::tempdir().unwrap();
        // systemctl answers only once asked with --wait, after its jobs: here, a file.
        let p = probe(
            dir.path(),
            &format!(
                "[ \"$2\" = --wait ] || exit 3; while [ ! -e {0}/jobs-done ]; do sleep 0.05; done; echo running",
                dir.path().display()
            ),
        );
        write_marker(dir.path(), "systemd\n");
        // No private socket: still starting.
        assert_eq!(p.wait(Duration::from_millis(120)).state, "starting");
        std::fs::create_dir_all(dir.path().join("run/systemd")).unwrap();
        std::fs::write(dir.path().join("run/systemd/private"), "").unwrap();
        // Jobs not done within the time: starting (systemctl is killed).
        assert_eq!(p.wait(Duration::from_millis(200)).state, "starting");
        let root = dir.path().to_owned();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            std::fs::write(root.join("jobs-done"), "").unwrap();
        });
        let b = p.wait(Duration::from_secs(30));
        writer.join().unwrap();
        assert_eq!((b.init.as_str(), b.state.as_str()), ("systemd", "running"));
    }

    #[test]
    fn a_degraded_boot_has_finished_and_names_the_failed_units() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe(
            dir.path(),
            "case $1 in is-system-running) echo degraded ;; list-units) printf 'e2scrub_reap.service loaded failed failed Remove Stale\\nfoo.mount loaded failed failed Foo\\n' ;; esac",
        );
        write_marker(dir.path(), "systemd");
        std::fs::create_dir_all(dir.path().join("run/systemd")).unwrap();
        std::fs::write(dir.path().join("run/systemd/private"), "").unwrap();
        let b = p.wait(Duration::from_secs(30));
        assert_eq!(b.state, "degraded");
        assert!(b.finished());
        assert_eq!(b.failed, ["e2scrub_reap.service", "foo.mount"]);
    }

    #[test]
    fn another_init_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe(dir.path(), "exit 1");
        write_marker(dir.path(), "other /sbin/openrc-init");
        let b = p.wait(Duration::from_secs(30));
        assert_eq!(
            (b.init.as_str(), b.state.as_str()),
            ("/sbin/openrc-init", "unknown")
        );
        assert!(b.finished());
    }

    #[test]
    fn the_marker_names_systemd_through_the_init_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let systemd = dir.path().join("systemd");
        std::fs::write(&systemd, "").unwrap();
        let init = dir.path().join("init");
        std::os::unix::fs::symlink(&systemd, &init).unwrap();
        assert_eq!(marker_for(Some(&init)), "systemd");
        let other = dir.path().join("openrc-init");
        std::fs::write(&other, "").unwrap();
        assert_eq!(
            marker_for(Some(&other)),
            format!("other {}", other.display())
        );
        assert_eq!(marker_for(None), "banger-init");
    }
}
