//! Where a pull writes before it publishes: the reservation of the name it makes, and a
//! staging directory next to the destination that is removed unless published; leftovers
//! of a crash are swept when the actor starts.

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
            tracing::info!(path = %e.path().display(), "removing a leftover of an interrupted pull");
            let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
        }
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
}
