//! The start-up census of VM processes: every process on the host tied to this daemon's
//! directories that no VM record claims is an orphan (a daemon killed between a VMM's
//! spawn and the write of its pid, or a helper process whose VM is gone), and is killed,
//! through the privileged helper when it runs as another uid, before the VM actors
//! re-adopt or release what their records name.
//!
//! Tied to this daemon (never by uid alone: tests run many daemons on one host, and a
//! VM uid range may be shared):
//! - an argument of its command line names a path under the daemon's VM directory (an
//!   unjailed Firecracker's `--api-sock`, QEMU's drives and sockets, the agent proxy's run
//!   directory) or its jail base (the jailer's `--chroot-base-dir`, before its exec);
//! - or its root (`/proc/<pid>/root`, readable for our own uid's processes and by root) is
//!   under the jail base: a jailed Firecracker, whose command line after the jailer's exec
//!   names no banger path (`<base>/<exec name>/<id>/root`, possibly `(deleted)` once the
//!   jail is removed).
//!
//! - or it is a cut-short launch's jailed Firecracker that bangerd cannot see into (its root
//!   is another uid's): its command line is `--id <id>` of a record of ours in `starting`
//!   without a runtime, and it runs as that record's own VM uid (both stored before the
//!   spawn; ids are random, uids one per VM).
//!
//! The privileged helper itself (`bangerd __helper <config>`, whose config names the same
//! directories) and its launcher are not VM processes and are left alone.
//!
//! Claimed: the VMM and helper processes of a record's `runtime`, by pid and start time.
//! A record's `spawned` process (a launch cut short) is not: its VM is marked stopped by
//! its actor, so the process is killed here, by pid when nothing else finds it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model::VmRecord;
use super::proc;

/// Whether the fault-injection point `point` is armed: `BANGER_FAULT=<point>` in the
/// environment of a debug build (tests only; a release build never reads it). Points:
/// `after-spawn`, where bangerd SIGKILLs itself once a VMM is spawned and before its pid is
/// stored.
pub fn fault(point: &str) -> bool {
    cfg!(debug_assertions) && std::env::var_os("BANGER_FAULT").is_some_and(|v| v == point)
}

/// A process of the census.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProc {
    pub pid: i32,
    pub start_time: u64,
    /// Its arguments joined by spaces.
    pub cmdline: String,
}

/// Whether `arg` names `dir` or a path under it.
fn names(arg: &str, dir: &str) -> bool {
    arg.match_indices(dir).any(|(i, _)| {
        matches!(
            arg[i + dir.len()..].chars().next(),
            None | Some('/') | Some(',') | Some(':') | Some(' ')
        )
    })
}

/// The (id, uid) of launches cut short: records in `starting` with a VM uid and no runtime.
pub fn launches(records: &[VmRecord]) -> Vec<(String, u32)> {
    records
        .iter()
        .filter(|r| r.state == banger_api::VmState::Starting && r.runtime.is_none())
        .filter_map(|r| Some((r.id.clone(), r.uid?)))
        .collect()
}

fn uid_of(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The processes (other than this one) tied to `dirs` by their command line, by their
/// root under `jail_base`, or as the Firecracker of one of `launches` (see the module
/// docs).
pub fn census(dirs: &[PathBuf], jail_base: &Path, launches: &[(String, u32)]) -> Vec<HostProc> {
    let me = std::process::id() as i32;
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let base = jail_base.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let raw = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .get(1)
            .is_some_and(|a| a == banger_policy::helper::HELPER_ARG)
        {
            continue;
        }
        let by_args = args
            .iter()
            .any(|a| dirs.iter().chain([&base]).any(|d| names(a, d)));
        let by_root = !by_args
            && std::fs::read_link(e.path().join("root"))
                .is_ok_and(|r| names(&r.display().to_string(), &base));
        let by_launch = !(by_args || by_root)
            && args.windows(2).any(|w| {
                w[0] == "--id"
                    && launches
                        .iter()
                        .any(|(id, uid)| w[1] == *id && uid_of(pid) == Some(*uid))
            });
        if !(by_args || by_root || by_launch) {
            continue;
        }
        let Some(start_time) = proc::start_time(pid) else {
            continue;
        };
        if !proc::alive(pid, start_time) {
            continue;
        }
        found.push(HostProc {
            pid,
            start_time,
            cmdline: args.join(" "),
        });
    }
    found
}

/// The processes the records claim: each live VM's VMM and helper processes.
pub fn claimed(records: &[VmRecord]) -> Vec<(i32, u64)> {
    records
        .iter()
        .filter(|r| super::model::is_active(r.state))
        .filter_map(|r| r.runtime.as_ref())
        .flat_map(|rt| std::iter::once((rt.pid, rt.start_time)).chain(rt.helpers.clone()))
        .collect()
}

/// The orphans: processes of the census no record claims, and the `spawned` processes
/// of launches cut short that are still alive (found by pid even where the census cannot
/// see them).
pub fn orphans(records: &[VmRecord], census: Vec<HostProc>) -> Vec<HostProc> {
    let claimed = claimed(records);
    let mut out: Vec<HostProc> = census
        .into_iter()
        .filter(|p| !claimed.contains(&(p.pid, p.start_time)))
        .collect();
    for r in records {
        if let Some((pid, start_time)) = r.spawned
            && r.runtime.is_none()
            && proc::alive(pid, start_time)
            && !out.iter().any(|p| p.pid == pid)
        {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            out.push(HostProc {
                pid,
                start_time,
                cmdline: String::from_utf8_lossy(&raw).replace('\0', " "),
            });
        }
    }
    out
}

/// Kill every orphan of `records` on this host (see the module docs) and wait until it is
/// gone; each is logged with its pid and command line. The number killed.
pub async fn reap(env: &super::actor::VmEnv, records: &[VmRecord]) -> usize {
    let dirs = vec![env.vms_dir.clone(), env.vmm.firecracker.chroot_base.clone()];
    let base = env.vmm.firecracker.chroot_base.clone();
    let cut_short = launches(records);
    let found = tokio::task::spawn_blocking(move || census(&dirs, &base, &cut_short))
        .await
        .unwrap_or_default();
    let orphans = orphans(records, found);
    for p in &orphans {
        tracing::warn!(pid = p.pid, cmdline = %p.cmdline, "killing an orphaned VM process that no VM record claims");
        env.net
            .signal(p.pid, p.start_time, nix::sys::signal::Signal::SIGKILL)
            .await;
    }
    for p in &orphans {
        if !proc::wait_gone(p.pid, p.start_time, Duration::from_secs(5)).await {
            tracing::error!(pid = p.pid, cmdline = %p.cmdline, "an orphaned VM process did not end");
        }
    }
    orphans.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_path_is_named_only_as_itself_or_a_parent() {
        assert!(names("/s/vms", "/s/vms"));
        assert!(names("--api-sock=/s/vms/a/api.sock", "/s/vms"));
        assert!(names("file=/s/vms/a/o.ext4,format=raw", "/s/vms"));
        assert!(names("/s/jail/fc/a/root (deleted)", "/s/jail"));
        assert!(!names("/s/vms2/a", "/s/vms"), "another daemon's");
        assert!(!names("/x/s/vmsa", "/s/vms"));
    }

    /// Processes naming our directory are found and, unless a record claims them, are
    /// orphans; one naming another directory is neither.
    #[tokio::test]
    async fn the_census_finds_what_names_our_dirs_and_spares_the_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("vms");
        let theirs = dir.path().join("vms-other");
        std::fs::create_dir_all(ours.join("a")).unwrap();
        let spawn = |path: &Path| {
            // `exec -a`: the path in argv[0] of a process that never forks (a shell that
            // forked its `sleep` would show a copy of its own command line to a census
            // between the fork and the exec).
            let (pid, start) = proc::spawn(
                Command::new("bash")
                    .arg("-c")
                    .arg("exec -a \"sleep $0\" sleep 30")
                    .arg(path),
            )
            .unwrap();
            // Until bash's exec is done the command line is bash's (and empty during it).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"sleep "))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{pid} never became sleep"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            (pid, start)
        };
        let orphan = spawn(&ours.join("a/api.sock"));
        let adopted = spawn(&ours.join("b/api.sock"));
        let other = spawn(&theirs.join("a/api.sock"));
        let found = census(std::slice::from_ref(&ours), &dir.path().join("jail"), &[]);
        let pids: Vec<i32> = found.iter().map(|p| p.pid).collect();
        assert!(
            pids.contains(&orphan.0) && pids.contains(&adopted.0),
            "{found:?}"
        );
        assert!(!pids.contains(&other.0), "{found:?}");

        let rec = VmRecord {
            id: "bbbbbbbbbbbb".into(),
            name: "b".into(),
            image: "img".into(),
            kernel: "k".into(),
            vmm: banger_api::VmmKind::Firecracker,
            spec: banger_api::VmSpec {
                vcpu: 1,
                memory_mib: 128,
                disk_bytes: 1 << 30,
            },
            nat: false,
            state: banger_api::VmState::Running,
            error: None,
            created_at: 1,
            started_at: None,
            cmdline: None,
            runtime: Some(super::super::model::Runtime {
                pid: adopted.0,
                start_time: adopted.1,
                helpers: Vec::new(),
                control_socket: String::new(),
                vsock_socket: String::new(),
                isolation: None,
            }),
            ip: None,
            publish: Vec::new(),
            uid: None,
            egress: Default::default(),
            isolate: false,
            expires: None,
            spawned: None,
            snapshots: Vec::new(),
            clone_of: None,
            warm: None,
            warm_maker: false,
        };
        let left = orphans(&[rec], found);
        assert_eq!(
            left.iter().map(|p| p.pid).collect::<Vec<_>>(),
            vec![orphan.0]
        );
        assert!(left[0].cmdline.contains("a/api.sock"), "{left:?}");
        // A cut-short launch's process, found by `--id <id>` and its VM uid (ours here).
        let me = nix::unistd::geteuid().as_raw();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let launched = proc::spawn(
            // A builtin `read` on a FIFO opened read-write blocks without forking, with
            // `--id <id>` as two arguments of its own.
            Command::new("bash")
                .arg("-c")
                .arg(format!("read -t 30 <> {}", fifo.display()))
                .args(["--id", "cccccccccccc"]),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{}/cmdline", launched.0))
            .is_ok_and(|c| c.contains("--id\0cccccccccccc"))
        {
            assert!(std::time::Instant::now() < deadline, "bash never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        let jail = dir.path().join("jail");
        let found = census(&[], &jail, &[("cccccccccccc".into(), me)]);
        assert!(
            found.iter().any(|p| p.pid == launched.0),
            "{found:?}, {:?}",
            std::fs::read_to_string(format!("/proc/{}/status", launched.0))
        );
        let found = census(&[], &jail, &[("cccccccccccc".into(), me + 1)]);
        assert!(!found.iter().any(|p| p.pid == launched.0), "another uid's");
        for (pid, start) in [orphan, adopted, other, launched] {
            proc::signal(pid, start, nix::sys::signal::Signal::SIGKILL);
            assert!(proc::wait_gone(pid, start, Duration::from_secs(5)).await);
        }
    }
}
