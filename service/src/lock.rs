//! The instance lock: one daemon per data directory. Taken before the store is opened and
//! before the socket is touched, so a second daemon never removes the first one's socket.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Errors taking the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another bangerd{} is already running on {dir}; use it, or stop it with `banger daemon stop`",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("cannot open the lock file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path}")]
    Flock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Held for the daemon's lifetime; released by the kernel when the process exits.
#[derive(Debug)]
pub struct InstanceLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl InstanceLock {
    /// Take the lock at `path` without waiting, and write our pid into it.
    pub fn acquire(path: &Path) -> Result<InstanceLock, LockError> {
        let open_err = |source| LockError::Open {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    dir: path.parent().unwrap_or(path).to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err((_, source)) => {
                return Err(LockError::Flock {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        file.set_len(0).map_err(open_err)?;
        file.rewind().map_err(open_err)?;
        writeln!(file, "{}", std::process::id()).map_err(open_err)?;
        Ok(InstanceLock {
            _file: file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bangerd.lock");
        let first = InstanceLock::acquire(&path).unwrap();
        let err = InstanceLock::acquire(&path).unwrap_err();
        match &err {
            LockError::Held { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("already running"), "{err}");
        drop(first);
        InstanceLock::acquire(&path).unwrap();
    }
}
