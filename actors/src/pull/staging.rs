//! Where a pull writes before it publishes: the reservation of the name it makes, and a
//! staging directory next to the destination that is removed unless published; leftovers
//! of a crash are swept when the actor starts.
//!
//! A build's staging directory also names the process building into it
//! ([`Staging::record_builder`]: mmdebstrap's pid and start time, written as soon as it is
//! spawned): mmdebstrap outlives a daemon killed mid-build (measured: 30 s more of the
//! build, until it writes its tar to the closed pipe, leaving a gpg home in /tmp behind).
//! The sweep asks that process group to stop (SIGTERM, which mmdebstrap handles by
//! cleaning up its namespace's tree), waits for it, and only then removes the directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{PullEnv, PullError, blocking};
use crate::store::{Named, Reservation, StoreError};

/// A directory removed on drop unless [`Staging::publish`]ed.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    armed: bool,
}

pub const STAGING_PREFIX: &str = ".staging-";
/// In a staging directory: "<pid> <start time>" of the process group building into it.
const BUILDER: &str = "builder";
/// How long the sweep waits for a builder to end on SIGTERM before SIGKILL.
const BUILDER_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

impl Staging {
    /// A new empty staging directory in `parent`, for `name`.
    pub fn new(parent: &Path, name: &str) -> Result<Staging, PullError> {
        std::fs::create_dir_all(parent).map_err(PullError::io(parent))?;
        let path = parent.join(format!(
            "{STAGING_PREFIX}{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&path).map_err(PullError::io(&path))?;
        Ok(Staging { path, armed: true })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record the process (the leader of its own process group) that builds into this
    /// directory, for the sweep of a daemon that starts after this one died.
    pub fn record_builder(&self, pid: i32, start_time: u64) -> Result<(), PullError> {
        let path = self.path.join(BUILDER);
        std::fs::write(&path, format!("{pid} {start_time}\n")).map_err(PullError::io(&path))
    }

    /// Rename to `dest` (replacing a leftover directory that no record points at).
    pub fn publish(mut self, dest: &Path) -> Result<(), PullError> {
        if dest.exists() {
            std::fs::remove_dir_all(dest).map_err(PullError::io(dest))?;
        }
        std::fs::rename(&self.path, dest).map_err(PullError::io(dest))?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Remove staging directories and partial files a crash left in `dir`.
pub fn sweep(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(STAGING_PREFIX) || name.ends_with(".partial") {
            stop_builder(&e.path());
            tracing::info!(path = %e.path().display(), "removing a leftover of an interrupted pull");
            let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
        }
    }
}

/// End the process group a staging directory names as its builder, if it still runs:
/// SIGTERM to the group, then SIGKILL after [`BUILDER_GRACE`].
fn stop_builder(staging: &Path) {
    use crate::vm::proc;
    use nix::sys::signal::Signal;
    let Some((pid, start)) = std::fs::read_to_string(staging.join(BUILDER))
        .ok()
        .and_then(|t| {
            let (p, s) = t.trim().split_once(' ')?;
            Some((p.parse::<i32>().ok()?, s.parse::<u64>().ok()?))
        })
    else {
        return;
    };
    if pid <= 1 || !proc::signal_group(pid, start, Signal::SIGTERM) {
        return;
    }
    tracing::warn!(pid, path = %staging.display(), "a build outlived the daemon that ran it: stopping it");
    if !proc::wait_gone_blocking(pid, start, BUILDER_GRACE) {
        tracing::warn!(pid, "the build did not end on SIGTERM: killing it");
        proc::signal_group(pid, start, Signal::SIGKILL);
    }
}

/// Reserve `name` for the pull, build or promote about to make it (see
/// [`crate::store::Reservation`]): a record of that name is [`PullError::Exists`] with
/// `hint` after the message; a name something else is making is a conflict that says what.
/// `doing` is that clause for others (`being pulled from debian:bookworm`).
pub async fn reserve(
    env: &PullEnv,
    kind: Named,
    name: &str,
    doing: String,
    hint: String,
) -> Result<Reservation, PullError> {
    let store = Arc::clone(&env.store);
    let name = name.to_owned();
    blocking(move || {
        store.reserve(kind, &name, &doing).map_err(|e| match e {
            e @ StoreError::Exists { .. } => PullError::Exists(format!("{e}; {hint}")),
            e => e.into(),
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_is_removed_unless_published_and_sweep_clears_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let s = Staging::new(dir.path(), "img").unwrap();
        let p = s.path().to_owned();
        std::fs::write(p.join("f"), b"x").unwrap();
        drop(s);
        assert!(!p.exists(), "dropped staging is removed");
        let s = Staging::new(dir.path(), "img").unwrap();
        std::fs::write(s.path().join("f"), b"x").unwrap();
        s.publish(&dir.path().join("img")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("img/f")).unwrap(), b"x");

        // What a crash leaves: a staging dir and a partial blob; kept: everything else.
        std::fs::create_dir(dir.path().join(".staging-x-123")).unwrap();
        std::fs::write(dir.path().join(".abc-1.partial"), b"p").unwrap();
        sweep(dir.path());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["img"]);
    }

    /// A build that outlived its daemon (its process group recorded in the staging
    /// directory) is stopped by the sweep before the directory goes: the group's leader
    /// and what it started.
    #[test]
    fn the_sweep_stops_the_build_a_staging_directory_names() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let s = Staging::new(dir.path(), "img").unwrap();
        let child_pid = s.path().join("child");
        // A leader that ends on SIGTERM, with a child in its group that would not end on
        // its own.
        let script = format!(
            "sleep 1000 & echo $! > {}; trap 'exit 0' TERM; while :; do sleep 0.05; done",
            child_pid.display()
        );
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", &script]).process_group(0);
        let (pid, start) = crate::vm::proc::spawn(&mut cmd).unwrap();
        s.record_builder(pid, start).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let child = loop {
            if let Some(p) = std::fs::read_to_string(&child_pid)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            {
                break p;
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let child_start = crate::vm::proc::start_time(child).unwrap();
        let path = s.path().to_owned();
        std::mem::forget(s); // what a daemon killed mid-build leaves
        sweep(dir.path());
        assert!(!path.exists());
        assert!(!crate::vm::proc::alive(pid, start), "the builder ended");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while crate::vm::proc::alive(child, child_start) {
            assert!(
                std::time::Instant::now() < deadline,
                "its group's sleep ended too"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
