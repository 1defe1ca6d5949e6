//! Talking to systemd: the [`Systemctl`] trait, its real implementation ([`SystemctlCmd`],
//! the `systemctl` program) and a test double ([`FakeSystemd`]) beside it.
//!
//! The double models what `system install|restart|uninstall` rely on from PID 1: unit
//! files are read from `<root>/etc/systemd/system` only on `daemon-reload` (so starting a
//! unit that was written but not reloaded fails as it does under systemd, with "Unit …
//! not found"), `enable` needs a loaded unit with an `[Install]` section and makes the
//! `WantedBy=` symlink, `start`/`restart` need a loaded unit, `stop`/`disable` of an
//! unknown unit fail, and every call is recorded. It is injected explicitly by the tests
//! of `commands::system` (systemd as PID 1 does not exist on the test machines), and
//! compiled only into them (`systemd/fake.rs`, `#[cfg(test)]`): the release CLI carries no
//! test machinery.
//!
//! With a root prefix (`--root`, installing into an image or a test directory) the real
//! implementation runs `systemctl --root=<dir>` for enable/disable/is-enabled, which
//! works offline on the directory; reload, start, stop, restart and is-active concern a
//! running system and are skipped (reported as such).

use std::path::PathBuf;
use std::process::Command;

#[cfg(test)]
mod fake;
#[cfg(test)]
pub use fake::FakeSystemd;

/// What the installer asks of systemd.
pub trait Systemctl: std::fmt::Debug {
    fn daemon_reload(&self) -> Result<(), String>;
    fn enable(&self, unit: &str) -> Result<(), String>;
    fn disable(&self, unit: &str) -> Result<(), String>;
    fn stop(&self, unit: &str) -> Result<(), String>;
    fn restart(&self, unit: &str) -> Result<(), String>;
    /// `active`, `inactive`, `failed`, … or `unknown` when it cannot be asked (offline root).
    fn is_active(&self, unit: &str) -> String;
    /// `enabled`, `disabled`, `not-found`, …
    fn is_enabled(&self, unit: &str) -> String;
}

/// The `systemctl` program.
#[derive(Debug, Clone)]
pub struct SystemctlCmd {
    /// Operate offline on this root directory instead of the running system.
    pub root: Option<PathBuf>,
}

impl SystemctlCmd {
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("systemctl");
        if let Some(root) = &self.root {
            cmd.arg(format!("--root={}", root.display()));
        }
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("cannot run systemctl: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            Err(format!(
                "systemctl {} failed: {}",
                args.join(" "),
                if stderr.is_empty() { &stdout } else { &stderr }
            ))
        }
    }

    fn online(&self) -> bool {
        self.root.is_none()
    }
}

impl Systemctl for SystemctlCmd {
    fn daemon_reload(&self) -> Result<(), String> {
        if self.online() {
            self.run(&["daemon-reload"]).map(drop)
        } else {
            Ok(())
        }
    }
    fn enable(&self, unit: &str) -> Result<(), String> {
        self.run(&["enable", unit]).map(drop)
    }
    fn disable(&self, unit: &str) -> Result<(), String> {
        self.run(&["disable", unit]).map(drop)
    }
    fn stop(&self, unit: &str) -> Result<(), String> {
        if self.online() {
            self.run(&["stop", unit]).map(drop)
        } else {
            Ok(())
        }
    }
    fn restart(&self, unit: &str) -> Result<(), String> {
        if self.online() {
            self.run(&["restart", unit]).map(drop)
        } else {
            Ok(())
        }
    }
    fn is_active(&self, unit: &str) -> String {
        if !self.online() {
            return "unknown".into();
        }
        // Non-zero exit for anything but active; the state is on stdout either way.
        Command::new("systemctl")
            .args(["is-active", unit])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into())
    }
    fn is_enabled(&self, unit: &str) -> String {
        let mut cmd = Command::new("systemctl");
        if let Some(root) = &self.root {
            cmd.arg(format!("--root={}", root.display()));
        }
        cmd.args(["is-enabled", unit])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "not-found".into())
    }
}
