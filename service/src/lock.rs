//! The instance lock: one daemon per data directory. Taken before the store is opened and
//! before the socket is touched, so a second daemon never removes the first one's socket.
//!
//! **A predecessor that is still dying.** When a multi-threaded bangerd is SIGKILLed, its
//! leader shows as a zombie at once, but the kernel releases its files (the lock, the
//! listening socket) only when its last thread has exited, which on a loaded host can take a
//! while. A daemon started in that window (`banger` autostarts one as soon as the old socket
//! stops answering) would find the lock held by a process that is already dead and give up
//! with "another bangerd is already running". So when the pid in the lock file is gone or a
//! zombie, acquiring waits (up to [`DYING_HOLDER_WAIT`]) for the kernel to let go; a live
//! holder is refused at once, as before.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

/// How long a daemon waits for the lock of a predecessor that is dead but not yet released.
pub const DYING_HOLDER_WAIT: Duration = Duration::from_secs(10);

/// Whether `pid` is gone or a zombie (dead, its resources being released).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

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
    /// Take the lock at `path`, and write our pid into it. A live holder is refused at once;
    /// a dead one that the kernel has not released yet is waited for (module docs).
    pub fn acquire(path: &Path) -> Result<InstanceLock, LockError> {
        let open_err = |source| LockError::Open {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        let mut waited_for: Option<Instant> = None;
        let mut file = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => break f,
                Err((mut held, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut text = String::new();
                    let _ = held.rewind();
                    let _ = held.read_to_string(&mut text);
                    let pid: Option<u32> = text.trim().parse().ok();
                    let since = *waited_for.get_or_insert_with(Instant::now);
                    let dying = pid.is_some_and(is_dead);
                    if !dying || since.elapsed() > DYING_HOLDER_WAIT {
                        return Err(LockError::Held {
                            dir: path.parent().unwrap_or(path).to_owned(),
                            pid,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    file = held;
                }
                Err((_, source)) => {
                    return Err(LockError::Flock {
                        path: path.to_owned(),
                        source,
                    });
                }
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

    /// The lock still held after the pid in it has died (a SIGKILLed daemon whose threads
    /// are still exiting; here: a shell that exited, its lock fd kept by a `sleep` it left
    /// behind): the next daemon waits for the release instead of refusing to start.
    #[test]
    fn a_lock_whose_holder_is_dead_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bangerd.lock");
        // The shell locks, writes its pid, leaves the fd to a short sleep, and exits; we do
        // not reap it, so it stays a zombie like a killed daemon's leader.
        let mut shell = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 9>>\"$1\"; flock -n 9 || exit 1; echo $$ >\"$1\"; sleep 0.6 & exit 0")
            .arg("sh")
            .arg(&path)
            .spawn()
            .unwrap();
        let pid = shell.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_dead(pid) {
            assert!(Instant::now() < deadline, "the shell did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        let t0 = Instant::now();
        let lock = InstanceLock::acquire(&path).unwrap();
        assert!(
            t0.elapsed() > Duration::from_millis(100),
            "it waited for the release"
        );
        let mut text = String::new();
        std::fs::File::open(lock.path())
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        shell.wait().unwrap();
    }

    /// A live holder is refused at once, even when it is not a daemon that is dying.
    #[test]
    fn a_live_holder_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bangerd.lock");
        let _first = InstanceLock::acquire(&path).unwrap();
        let t0 = Instant::now();
        assert!(matches!(
            InstanceLock::acquire(&path),
            Err(LockError::Held { .. })
        ));
        assert!(t0.elapsed() < DYING_HOLDER_WAIT / 2);
    }
}
