//! Waiting on a VM's host side without waking up while nothing happens: its VMM's exit
//! through a pidfd ([`exited`]), its console log's growth through inotify ([`FileWatch`]).
//! An idle VM costs its daemon no CPU (`cargo bench -p bangerd --bench idle`): before,
//! each VM polled `/proc` every 25 ms and its console every 50 ms.
//!
//! Both fall back to polling where the kernel has neither (pidfds are Linux 5.3+): the
//! same answers, later and dearer.

use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::proc;

/// How often the fallbacks look.
const POLL: Duration = Duration::from_millis(25);

/// Resolves once the process `pid` that started at `start` (clock ticks, as
/// [`proc::alive`]) is gone: exited (a zombie counts), or never there.
pub async fn exited(pid: i32, start: u64) {
    if let Some(fd) = pidfd(pid, start)
        && let Ok(fd) = register(fd)
    {
        // A pidfd polls readable once its process has terminated.
        let _ = fd.readable().await;
        return;
    }
    while proc::alive(pid, start) {
        tokio::time::sleep(POLL).await;
    }
}

/// `fd` in tokio's reactor, for readability. Tokio deprecated the safe constructors
/// because a borrowed descriptor could be closed under the reactor (its `register` is
/// `unsafe` for that); an `OwnedFd` moved into the `AsyncFd` is closed only by it, which is
/// that contract kept, so the safe one is used (this crate forbids `unsafe`).
#[allow(deprecated)]
fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(fd, Interest::READABLE)
}

/// A pidfd of the process, None when it is gone or pidfds are not to be had.
fn pidfd(pid: i32, start: u64) -> Option<OwnedFd> {
    let p = rustix::process::Pid::from_raw(pid)?;
    let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::NONBLOCK).ok()?;
    // The pid may have been reused before the open: the fd is the process we mean only if
    // the pid still has its start time now that the fd holds it.
    proc::alive(pid, start).then_some(fd)
}

/// Wakes when a file is written (or truncated), through inotify on it; where inotify
/// cannot watch it, every 50 ms. [`FileWatch::changed`] also returns every [`SLOW_TICK`]
/// (10 s: 50 idle VMs cost 0.1% of a core for it), a safety net should an event ever be
/// missed; the console follower's rotation check runs after each write anyway.
#[derive(Debug)]
pub struct FileWatch {
    inotify: Option<AsyncFd<OwnedFd>>,
    buf: Vec<MaybeUninit<u8>>,
    tick: Duration,
}

/// The longest [`FileWatch::changed`] waits.
pub const SLOW_TICK: Duration = Duration::from_secs(10);

impl FileWatch {
    pub fn new(path: &Path) -> FileWatch {
        Self::with_tick(path, SLOW_TICK)
    }

    /// With another slow tick than [`SLOW_TICK`].
    pub fn with_tick(path: &Path, tick: Duration) -> FileWatch {
        use rustix::fs::inotify;
        let inotify = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .ok()
            .filter(|fd| {
                inotify::add_watch(
                    fd,
                    path,
                    inotify::WatchFlags::MODIFY | inotify::WatchFlags::ATTRIB,
                )
                .is_ok()
            })
            .and_then(|fd| register(fd).ok());
        FileWatch {
            inotify,
            buf: vec![MaybeUninit::uninit(); 4096],
            tick,
        }
    }

    /// Whether inotify watches the file (else it is polled).
    pub fn is_notified(&self) -> bool {
        self.inotify.is_some()
    }

    /// Until the file changed since the last call (true), or the slow tick passed
    /// (false; polled: every 50 ms, true).
    pub async fn changed(&mut self) -> bool {
        let Some(fd) = &self.inotify else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return true;
        };
        let Ok(Ok(mut ready)) = tokio::time::timeout(self.tick, fd.readable()).await else {
            return false;
        };
        // Take every queued event: one wake-up for a burst of writes.
        let mut reader = rustix::fs::inotify::Reader::new(fd.get_ref(), &mut self.buf);
        while reader.next().is_ok() {}
        ready.clear_ready();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running process is waited for; once it is killed the wait ends (through its
    /// pidfd); a process that is gone, or a pid whose start time is another's, resolves at
    /// once.
    #[tokio::test]
    async fn exited_waits_for_the_process_and_not_for_another() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = proc::start_time(pid).unwrap();
        assert!(pidfd(pid, start).is_some(), "pidfds are to be had here");
        let wait = tokio::spawn(exited(pid, start));
        tokio::task::yield_now().await;
        assert!(!wait.is_finished(), "resolved while the process runs");
        child.kill().unwrap();
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("seen to exit")
            .unwrap();
        child.wait().unwrap();
        tokio::time::timeout(Duration::from_secs(30), exited(pid, start))
            .await
            .expect("reaped: at once");
        // Our own pid with a wrong start time is another process: not waited for.
        let me = std::process::id() as i32;
        tokio::time::timeout(Duration::from_secs(30), exited(me, 1))
            .await
            .expect("another process's start time");
    }

    /// A write wakes the watch (an event, not the slow tick); with none it is the tick.
    #[tokio::test]
    async fn a_file_watch_wakes_on_a_write_and_only_then() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"").unwrap();
        let mut w = FileWatch::with_tick(&path, Duration::from_millis(200));
        assert!(w.is_notified(), "inotify is to be had here");
        assert!(!w.changed().await, "no write: the slow tick");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"hello\n").unwrap();
        f.write_all(b"world\n").unwrap();
        assert!(w.changed().await, "the writes");
        assert!(!w.changed().await, "both taken by one wake-up");
        f.set_len(0).unwrap();
        assert!(w.changed().await, "a truncation (rotation)");
    }
}
