//! [`FakeSystemd`]: systemd as PID 1 over a root directory, for the tests (see the docs of
//! [`super`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::Systemctl;

/// A stand-in for systemd as PID 1 over a root directory (see the module docs). Only the
/// tests have it (the binary always talks to the real systemctl).
#[derive(Debug)]
pub struct FakeSystemd {
    root: PathBuf,
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    /// Unit name → its text, as of the last daemon-reload.
    loaded: BTreeMap<String, String>,
    active: BTreeSet<String>,
    calls: Vec<String>,
    /// Make `restart` of these units fail (the service exits at once).
    failing: BTreeSet<String>,
}

impl FakeSystemd {
    pub fn new(root: &Path) -> FakeSystemd {
        FakeSystemd {
            root: root.to_owned(),
            state: Mutex::new(FakeState::default()),
        }
    }

    fn unit_dir(&self) -> PathBuf {
        self.root.join("etc/systemd/system")
    }

    /// Every call, in order (`enable bangerd.service`, …).
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().expect("fake lock").calls.clone()
    }

    /// Make restarts of `unit` fail from now on.
    pub fn fail_starts(&self, unit: &str) {
        self.state
            .lock()
            .expect("fake lock")
            .failing
            .insert(unit.into());
    }

    fn record(&self, call: String) -> std::sync::MutexGuard<'_, FakeState> {
        let mut s = self.state.lock().expect("fake lock");
        s.calls.push(call);
        s
    }

    fn wanted_by(text: &str) -> Option<String> {
        let mut in_install = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_install = line == "[Install]";
            } else if in_install && let Some(v) = line.strip_prefix("WantedBy=") {
                return Some(v.trim().to_owned());
            }
        }
        None
    }

    fn not_found(unit: &str) -> String {
        format!("Unit {unit} not found.")
    }
}

impl Systemctl for FakeSystemd {
    fn daemon_reload(&self) -> Result<(), String> {
        let mut s = self.record("daemon-reload".into());
        s.loaded.clear();
        if let Ok(dir) = std::fs::read_dir(self.unit_dir()) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".service")
                    && let Ok(text) = std::fs::read_to_string(e.path())
                {
                    s.loaded.insert(name, text);
                }
            }
        }
        let loaded = s.loaded.clone();
        s.active.retain(|u| loaded.contains_key(u));
        Ok(())
    }

    fn enable(&self, unit: &str) -> Result<(), String> {
        let s = self.record(format!("enable {unit}"));
        let text = s.loaded.get(unit).ok_or_else(|| Self::not_found(unit))?;
        let target = Self::wanted_by(text).ok_or_else(|| {
            format!("The unit files have no installation config (WantedBy=) for {unit}.")
        })?;
        let wants = self.unit_dir().join(format!("{target}.wants"));
        std::fs::create_dir_all(&wants).map_err(|e| e.to_string())?;
        let link = wants.join(unit);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), &link)
            .map_err(|e| e.to_string())
    }

    fn disable(&self, unit: &str) -> Result<(), String> {
        let s = self.record(format!("disable {unit}"));
        if !s.loaded.contains_key(unit) {
            return Err(Self::not_found(unit));
        }
        if let Ok(dir) = std::fs::read_dir(self.unit_dir()) {
            for e in dir.flatten() {
                let _ = std::fs::remove_file(e.path().join(unit));
            }
        }
        Ok(())
    }

    fn stop(&self, unit: &str) -> Result<(), String> {
        let mut s = self.record(format!("stop {unit}"));
        if !s.loaded.contains_key(unit) {
            return Err(Self::not_found(unit));
        }
        s.active.remove(unit);
        Ok(())
    }

    fn restart(&self, unit: &str) -> Result<(), String> {
        drop(self.record(format!("restart {unit}")));
        let mut s = self.state.lock().expect("fake lock");
        if !s.loaded.contains_key(unit) {
            return Err(Self::not_found(unit));
        }
        if s.failing.contains(unit) {
            s.active.remove(unit);
            return Err(format!(
                "Job for {unit} failed because the control process exited with error code."
            ));
        }
        s.active.insert(unit.into());
        Ok(())
    }

    fn is_active(&self, unit: &str) -> String {
        let s = self.state.lock().expect("fake lock");
        if s.active.contains(unit) {
            "active".into()
        } else {
            "inactive".into()
        }
    }

    fn is_enabled(&self, unit: &str) -> String {
        let s = self.state.lock().expect("fake lock");
        if !s.loaded.contains_key(unit) {
            return "not-found".into();
        }
        let enabled = std::fs::read_dir(self.unit_dir()).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.path().join(unit).symlink_metadata().is_ok())
        });
        if enabled { "enabled" } else { "disabled" }.into()
    }
}
