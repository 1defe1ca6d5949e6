//! Host processes of VMs: identity (pid + start time, so a reused pid is never mistaken
//! for our VMM), liveness, signals, and resource figures, all from /proc.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Fields of /proc/<pid>/stat after the command name.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The process's start time in clock ticks since boot (field 22).
pub fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Whether the process `pid` started at `start` still runs (a zombie has exited).
pub fn alive(pid: i32, start: u64) -> bool {
    stat_fields(pid).is_some_and(|f| {
        f.first().is_some_and(|s| s != "Z" && s != "X")
            && f.get(19).and_then(|t| t.parse().ok()) == Some(start)
    })
}

/// Send `signal` to the process if it is still the one we started.
pub fn signal(pid: i32, start: u64, signal: nix::sys::signal::Signal) -> bool {
    try_signal(pid, start, signal).unwrap_or(false)
}

/// As [`signal`], with the error when the kernel refused (EPERM: another uid's process).
/// Ok(false): the process is gone.
pub fn try_signal(
    pid: i32,
    start: u64,
    signal: nix::sys::signal::Signal,
) -> Result<bool, nix::errno::Errno> {
    if !alive(pid, start) {
        return Ok(false);
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Send `signal` to the process group `pid` leads, if its leader is still the process we
/// started (an image build's mmdebstrap and what it started). False: the leader is gone.
pub fn signal_group(pid: i32, start: u64, signal: nix::sys::signal::Signal) -> bool {
    alive(pid, start) && nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal).is_ok()
}

/// [`wait_gone`] for a blocking thread.
pub fn wait_gone_blocking(pid: i32, start: u64, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if !alive(pid, start) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Wait (polling) until the process is gone, up to `timeout`. True if it is gone.
pub async fn wait_gone(pid: i32, start: u64, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !alive(pid, start) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Resident set size in bytes and CPU time (user+system) in ms.
pub fn usage(pid: i32) -> Option<(u64, u64)> {
    let f = stat_fields(pid)?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    Some((rss_pages * page, (utime + stime) * 1000 / ticks))
}

/// Spawn a VMM-side process in its own process group (a Ctrl-C at the daemon's terminal
/// does not reach it, and it outlives a daemon restart), and reap it from a thread when it
/// exits while we are its parent. Returns (pid, start time).
pub fn spawn(cmd: &mut Command) -> std::io::Result<(i32, u64)> {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null()).process_group(0);
    let child: Child = cmd.spawn()?;
    let pid = child.id() as i32;
    let start = start_time(pid).unwrap_or(0);
    reap(child);
    Ok((pid, start))
}

fn reap(mut child: Child) {
    std::thread::Builder::new()
        .name(format!("reap-{}", child.id()))
        .spawn(move || {
            let _ = child.wait();
        })
        .map(drop)
        .unwrap_or_default();
}

/// Parse a signal name (`KILL`, `SIGTERM`, `9`).
pub fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    use std::str::FromStr;
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).map_err(|_| format!("unknown signal {s}"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&name).map_err(|_| format!("unknown signal {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn identity_signals_and_exit() {
        let (pid, start) = spawn(Command::new("sleep").arg("30")).unwrap();
        assert!(start > 0);
        assert!(alive(pid, start));
        assert!(
            !alive(pid, start + 1),
            "another start time is another process"
        );
        assert!(usage(pid).is_some());
        assert!(signal(pid, start, nix::sys::signal::Signal::SIGTERM));
        assert!(wait_gone(pid, start, Duration::from_secs(5)).await);
        assert!(!signal(pid, start, nix::sys::signal::Signal::SIGTERM));
    }

    #[test]
    fn signal_names() {
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("KILL").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("sigterm").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("15").unwrap(), Signal::SIGTERM);
        assert!(parse_signal("NOPE").is_err());
    }
}
