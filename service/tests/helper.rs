//! The privileged helper, for real: `bangerd __helper` started as root inside a network
//! namespace this test creates (never the host's own), driven through banger-policy's
//! client. Needs root (tests are named `root_*`); run by scripts/test.sh.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_policy::helper::SelfTest;
use banger_policy::{Helper, HelperConfig, Reply, Request};

mod support;
use support::Netns;

fn config(state: &Path) -> HelperConfig {
    HelperConfig {
        bridge: "banger0".into(),
        gateway: Ipv4Addr::new(172, 30, 0, 1),
        prefix: 24,
        state_dirs: vec![state.to_owned()],
        jail_base: state.join("jail"),
        tap_uids: vec![1000],
        vmm_binaries: vec!["/bin/sh".into()],
        resolvectl: None,
        nft: "/usr/sbin/nft".into(),
        jailer: None,
    }
}

fn done(h: &mut Helper, r: Request) {
    let what = format!("{r:?}");
    assert_eq!(h.call(&r).unwrap(), Reply::Done, "{what}");
}

fn refused(h: &mut Helper, r: Request) -> String {
    match h.call(&r).unwrap() {
        Reply::Refused { reason } => reason,
        other => panic!("{r:?} was not refused: {other:?}"),
    }
}

#[test]
fn root_helper_builds_and_removes_bridge_taps_and_nat_in_a_netns() {
    let ns = Netns::new("ops");
    let dir = tempfile::tempdir().unwrap();
    let mut h = ns.helper(&config(dir.path()));
    assert_eq!(ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "0");

    done(&mut h, Request::EnsureBridge);
    done(&mut h, Request::EnsureBridge); // idempotent
    let bridge = ns.sh("ip -o addr show dev banger0; ip -o link show banger0");
    assert!(bridge.contains("inet 172.30.0.1/24"), "{bridge}");
    assert!(
        bridge.contains("state UP") || bridge.contains(",UP"),
        "{bridge}"
    );

    let (tap1, tap2) = ("bg-0123456789ab", "bg-0123456789ac");
    for tap in [tap1, tap2] {
        done(
            &mut h,
            Request::CreateTap {
                name: tap.into(),
                uid: 1000,
            },
        );
        done(&mut h, Request::AttachTap { name: tap.into() });
    }
    let link = ns.sh(&format!("ip -d link show {tap1}"));
    assert!(link.contains("master banger0"), "{link}");
    assert!(link.contains("tun type tap"), "{link}");
    assert_eq!(
        ns.sh(&format!("cat /sys/class/net/{tap1}/owner")).trim(),
        "1000"
    );
    assert!(link.contains("persist on"), "{link}");

    let (vm1, vm2) = ("0123456789ab", "0123456789ac");
    done(
        &mut h,
        Request::NatAdd {
            vm: vm1.into(),
            ip: Ipv4Addr::new(172, 30, 0, 5),
        },
    );
    done(
        &mut h,
        Request::NatAdd {
            vm: vm1.into(),
            ip: Ipv4Addr::new(172, 30, 0, 5),
        },
    );
    done(
        &mut h,
        Request::NatAdd {
            vm: vm2.into(),
            ip: Ipv4Addr::new(172, 30, 0, 6),
        },
    );
    let rules = ns.sh("nft list table ip banger");
    assert_eq!(
        rules.matches("masquerade").count(),
        2,
        "one rule per vm: {rules}"
    );
    assert!(
        rules.contains("ip saddr 172.30.0.5 ip daddr != 172.30.0.0/24 masquerade"),
        "{rules}"
    );
    assert_eq!(ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");

    done(&mut h, Request::NatRemove { vm: vm1.into() });
    let rules = ns.sh("nft list table ip banger");
    assert!(
        !rules.contains("172.30.0.5") && rules.contains("172.30.0.6"),
        "{rules}"
    );
    assert_eq!(ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
    done(&mut h, Request::NatRemove { vm: vm2.into() });
    done(&mut h, Request::NatRemove { vm: vm2.into() }); // absent is fine
    assert_eq!(
        ns.sh("nft list ruleset").trim(),
        "",
        "banger's table is gone"
    );
    assert_eq!(
        ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(),
        "0",
        "forwarding back off"
    );

    for tap in [tap1, tap2] {
        done(&mut h, Request::DeleteTap { name: tap.into() });
        done(&mut h, Request::DeleteTap { name: tap.into() });
    }
    let links = ns.sh("ip -o link");
    assert!(!links.contains("bg-"), "{links}");
}

#[test]
fn root_helper_refuses_what_is_not_bangers() {
    let ns = Netns::new("refuse");
    let dir = tempfile::tempdir().unwrap();
    let mut h = ns.helper(&config(dir.path()));
    // A link that is not banger's, in the helper's own namespace.
    ns.sh("ip link add eth9 type veth peer name eth9p");
    let r = refused(
        &mut h,
        Request::DeleteTap {
            name: "eth9".into(),
        },
    );
    assert!(r.contains("not a banger tap"), "{r}");
    assert!(ns.sh("ip -o link").contains("eth9"), "eth9 is still there");
    let r = refused(
        &mut h,
        Request::CreateTap {
            name: "bg-1".into(),
            uid: 0,
        },
    );
    assert!(r.contains("may not own a tap"), "{r}");
    let r = refused(
        &mut h,
        Request::CleanJail {
            vm: "../../etc".into(),
        },
    );
    assert!(r.contains("not a banger vm id"), "{r}");
    let r = refused(
        &mut h,
        Request::NatAdd {
            vm: "0123456789ab".into(),
            ip: Ipv4Addr::new(8, 8, 8, 8),
        },
    );
    assert!(r.contains("not a VM address"), "{r}");
    // A process that is not one of banger's VMs survives a signal request.
    let mut victim = Command::new("/bin/sh")
        .args(["-c", "while :; do sleep 1; done"])
        .spawn()
        .unwrap();
    let pid = victim.id() as i32;
    let r = refused(
        &mut h,
        Request::Signal {
            pid,
            start_time: start_time(pid),
            signal: 9,
        },
    );
    assert!(r.contains("not as a VM user"), "{r}");
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the process was not signalled"
    );
    // One running as a VM user whose command line names the state dir is signalled.
    let mut vmm = std::os::unix::process::CommandExt::uid(
        Command::new("/bin/sh")
            .args(["-c", "while :; do sleep 1; done"])
            .arg(dir.path()),
        1000,
    )
    .spawn()
    .unwrap();
    let vpid = vmm.id() as i32;
    done(
        &mut h,
        Request::Signal {
            pid: vpid,
            start_time: start_time(vpid),
            signal: 9,
        },
    );
    assert!(vmm.wait().unwrap().code().is_none(), "killed by a signal");
    victim.kill().unwrap();
    victim.wait().unwrap();
    // A jail dir outside the jail base cannot be named; one inside is removed.
    let jail = dir.path().join("jail/firecracker/0123456789ab/root");
    std::fs::create_dir_all(&jail).unwrap();
    done(
        &mut h,
        Request::CleanJail {
            vm: "0123456789ab".into(),
        },
    );
    assert!(!jail.exists());
}

fn start_time(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

fn status_field(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')
                .map(|v| v.trim().to_owned())
        })
        .unwrap()
}

#[test]
fn root_the_running_helper_is_confined() {
    let ns = Netns::new("conf");
    let dir = tempfile::tempdir().unwrap();
    let h = ns.helper(&config(dir.path()));
    // Read by the test from /proc, not from the helper's own report. `ip netns exec`
    // execs the helper in place, so the child's pid is the helper's.
    let pid = h.pid();
    assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter mode");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let want: u64 = [12u32, 5, 1, 3] // NET_ADMIN, KILL, DAC_OVERRIDE, FOWNER
        .iter()
        .map(|b| 1u64 << b)
        .sum();
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let got = u64::from_str_radix(&status_field(pid, set), 16).unwrap();
        assert_eq!(got, want, "{set} of the helper");
    }
    assert_eq!(status_field(pid, "CapInh"), "0000000000000000");
    let c = h.confinement();
    assert_eq!(c.landlock, "fully enforced");
    // Its environment is empty.
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(env.is_empty(), "{}", String::from_utf8_lossy(&env));
}

#[test]
fn root_inside_the_helper_confinement_paths_and_syscalls_are_denied() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let outside = dir.path().join("outside.txt");
    std::fs::write(&outside, "not for the helper").unwrap();
    let cfg = serde_json::to_string(&config(&state)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bangerd"))
        .arg(banger_policy::helper::SELFTEST_ARG)
        .arg(cfg)
        .arg(&outside)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: SelfTest = serde_json::from_slice(&out.stdout).unwrap();
    // Root could read that file and make that call: only the confinement stops them.
    assert_eq!(
        t.open_outside, "EACCES",
        "landlock denies a path outside its rules"
    );
    assert_eq!(t.denied_syscall, "EPERM", "seccomp denies keyctl");
    assert_eq!(t.write_state_dir, "ok", "the state dir stays usable");
    assert_eq!(t.confinement.seccomp_mode, 2);
}

#[test]
fn root_a_dead_worker_fails_only_its_request() {
    let ns = Netns::new("worker");
    let dir = tempfile::tempdir().unwrap();
    // resolvectl stands in for a privileged operation that hangs.
    let hang = dir.path().join("resolvectl");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cfg = config(dir.path());
    cfg.resolvectl = Some(hang.clone());
    let mut h = ns.helper(&cfg);
    let helper_pid = h.pid();
    let killer = std::thread::spawn(move || {
        // Find the worker (the helper's child) once its `sleep` runs, and kill it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no worker appeared");
            let children =
                std::fs::read_to_string(format!("/proc/{helper_pid}/task/{helper_pid}/children"))
                    .unwrap_or_default();
            if let Some(worker) = children.split_whitespace().next() {
                let grandchildren =
                    std::fs::read_to_string(format!("/proc/{worker}/task/{worker}/children"))
                        .unwrap_or_default();
                if !grandchildren.trim().is_empty() {
                    let w: i32 = worker.parse().unwrap();
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(w),
                        nix::sys::signal::Signal::SIGKILL,
                    )
                    .unwrap();
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let reply = h.call(&Request::ResolvedRoute { port: 42069 }).unwrap();
    killer.join().unwrap();
    match reply {
        Reply::WorkerDied { reason } => assert!(reason.contains("killed by SIGKILL"), "{reason}"),
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    // The helper itself lives on and serves the next request.
    assert!(h.alive());
    assert!(matches!(
        h.call(&Request::Status).unwrap(),
        Reply::Status(_)
    ));
    done(&mut h, Request::EnsureBridge);
}

/// Permission bits, uid and gid of `path` (not following a symlink).
fn mode_owner(path: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// Connect to the Unix socket `path` as `uid`/`gid` (no supplementary groups): this test
/// binary's [`connect_probe`] run as that user, so that the kernel checks the path as it
/// would for that user (this test runs as root, which it would not check).
fn connect_as(path: &Path, uid: u32, gid: u32) -> Result<(), nix::errno::Errno> {
    use std::os::unix::process::CommandExt;
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "connect_probe",
            "--ignored",
            "--test-threads=1",
            "-q",
        ])
        .env(PROBE_ENV, path)
        .uid(uid)
        .gid(gid)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    match status.code() {
        Some(0) => Ok(()),
        Some(PROBE_FAILED) | None => panic!("the connect probe did not run as {uid}: {status}"),
        Some(errno) => Err(nix::errno::Errno::from_raw(errno)),
    }
}

const PROBE_ENV: &str = "BANGER_TEST_CONNECT_PROBE";
const PROBE_FAILED: i32 = 255;

/// Not a test: what [`connect_as`] runs as another user. Exits 0 when it could connect
/// to the socket named by `BANGER_TEST_CONNECT_PROBE`, else with the errno.
#[test]
#[ignore = "run by connect_as as another uid"]
fn connect_probe() {
    let Some(path) = std::env::var_os(PROBE_ENV) else {
        std::process::exit(PROBE_FAILED);
    };
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => std::process::exit(0),
        Err(e) => std::process::exit(e.raw_os_error().unwrap_or(PROBE_FAILED)),
    }
}

/// One HTTP/1.1 PUT with a JSON body over the Unix socket `path`: the raw answer.
fn http_put(path: &Path, uri: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "PUT {uri} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn double_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("banger-fc-double");
    assert!(
        p.exists(),
        "{} is missing: run the workspace's tests",
        p.display()
    );
    p
}

/// The helper's jailer launcher: the jailer (the Firecracker double, which models the
/// jailer's drop to `--uid` when root) starts with exactly the launcher's bounding set
/// and seccomp filter, becomes the VM user, logs to the console file opened as that user;
/// the jail it made as root is removed through the helper; foreign paths are refused.
#[test]
fn root_the_launcher_starts_the_jailer_confined_and_cleans_its_jail() {
    use std::os::unix::fs::PermissionsExt;
    // bangerd's owner (and the socket group: nogroup), and the VM's own uid.
    const OWNER: u32 = 65534;
    const VM_UID: u32 = 2_000_000_007;
    let ns = Netns::new("jail");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let vm_dir = state.join("vms/0123456789ab");
    std::fs::create_dir_all(&vm_dir).unwrap();
    std::os::unix::fs::chown(&vm_dir, Some(OWNER), Some(OWNER)).unwrap();
    // Installed as a release is: a versioned file, and `firecracker` linking to it. The
    // jailer names the jail after the link's target.
    let firecracker = state.join("bin/firecracker");
    std::fs::create_dir_all(firecracker.parent().unwrap()).unwrap();
    std::fs::write(state.join("bin/firecracker-v1.13.1-x86_64"), b"").unwrap();
    std::os::unix::fs::symlink("firecracker-v1.13.1-x86_64", &firecracker).unwrap();
    std::fs::create_dir_all(state.join("jail")).unwrap();
    // The jail as bangerd prepares it (as the owner): a writable disk and the shared rootfs
    // hard-linked from the VM's and the image's files.
    let jail = state.join("jail/firecracker-v1.13.1-x86_64/0123456789ab");
    std::fs::create_dir_all(jail.join("root")).unwrap();
    let (overlay, rootfs) = (vm_dir.join("overlay.ext4"), state.join("rootfs.ext4"));
    for f in [&overlay, &rootfs] {
        std::fs::write(f, b"disk").unwrap();
        std::os::unix::fs::chown(f, Some(OWNER), Some(OWNER)).unwrap();
    }
    std::fs::hard_link(&overlay, jail.join("root/overlay.ext4")).unwrap();
    std::fs::hard_link(&rootfs, jail.join("root/rootfs.ext4")).unwrap();
    let mut cfg = config(&state);
    cfg.tap_uids = vec![OWNER];
    cfg.jailer = Some(banger_policy::JailerConfig {
        jailer: double_bin(),
        firecracker: firecracker.clone(),
        owner_uid: OWNER,
        owner_gid: OWNER,
        vm_uids: banger_policy::UidRange {
            first: 2_000_000_000,
            count: 100,
        },
        socket_gid: OWNER,
    });
    let mut h = ns.helper(&cfg);
    let console = vm_dir.join("console.log");
    // The launcher is the helper's child; it holds none of the helper's standard fds (its
    // stdin is the helper's socket to bangerd, which must close when the helper dies).
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", h.pid())).unwrap();
    let launcher: u32 = children
        .split_whitespace()
        .next()
        .expect("a launcher")
        .parse()
        .unwrap();
    for fd in 0..=2 {
        let target = std::fs::read_link(format!("/proc/{launcher}/fd/{fd}")).unwrap();
        assert_eq!(target, Path::new("/dev/null"), "launcher fd {fd}");
    }
    let fds = std::fs::read_dir(format!("/proc/{launcher}/fd"))
        .unwrap()
        .count();
    assert_eq!(fds, 4, "0-2 and its socket to the helper");

    let reply = h
        .call(&Request::SpawnJailer {
            vm: "0123456789ab".into(),
            console: console.clone(),
            vcpu: 2,
            memory_mib: 256,
            uid: VM_UID,
        })
        .unwrap();
    let Reply::Spawned {
        pid,
        start_time: started,
    } = reply
    else {
        panic!(
            "not spawned: {reply:?}; console: {:?}",
            std::fs::read_to_string(&console)
        );
    };
    assert_eq!(start_time(pid), started);
    assert!(
        !state.join("jail/firecracker").exists(),
        "not named after the link"
    );
    // Answered once the API socket is exposed beside the jail's private root/.
    assert_eq!(mode_owner(&jail.join("root")), (0o700, VM_UID, VM_UID));
    let api = jail.join("api.sock");
    assert_eq!(mode_owner(&api), (0o660, OWNER, OWNER));
    assert!(jail.join("root/api.sock").exists());
    // The owner reaches the API through the link (the jail's root/ is closed to it); a
    // uid outside the socket group is refused.
    assert_eq!(
        connect_as(&jail.join("root/api.sock"), OWNER, OWNER),
        Err(nix::errno::Errno::EACCES)
    );
    assert_eq!(connect_as(&api, OWNER, OWNER), Ok(()));
    assert_eq!(
        connect_as(&api, 4242, OWNER),
        Ok(()),
        "a member of the socket group"
    );
    assert_eq!(connect_as(&api, 4242, 4242), Err(nix::errno::Errno::EACCES));
    // The VM's disk is its uid's; the shared rootfs stays the owner's, unwritable to it.
    assert_eq!(std::fs::metadata(&overlay).unwrap().uid(), VM_UID);
    assert_eq!(mode_owner(&rootfs), (0o644, OWNER, OWNER));
    // The vsock socket is Firecracker's once `PUT /vsock` bound it: not before.
    let r = h
        .call(&Request::ExposeVsock {
            vm: "0123456789ab".into(),
        })
        .unwrap();
    assert!(
        matches!(&r, Reply::Failed { reason } if reason.contains("made no vsock.sock")),
        "{r:?}"
    );
    let answer = http_put(&api, "/vsock", r#"{"guest_cid":3,"uds_path":"vsock.sock"}"#);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    done(
        &mut h,
        Request::ExposeVsock {
            vm: "0123456789ab".into(),
        },
    );
    let vsock = jail.join("vsock.sock");
    assert_eq!(mode_owner(&vsock), (0o660, OWNER, OWNER));
    assert_eq!(
        connect_as(&vsock, 4242, OWNER),
        Ok(()),
        "the agent, for a group member"
    );
    assert_eq!(
        connect_as(&vsock, 4242, 4242),
        Err(nix::errno::Errno::EACCES)
    );
    let pid_u = pid as u32;
    // Read from /proc: what the jailer (then Firecracker) inherited from the launcher.
    assert_eq!(status_field(pid_u, "Seccomp"), "2", "seccomp filter mode");
    assert_eq!(status_field(pid_u, "NoNewPrivs"), "1");
    // CHOWN, DAC_OVERRIDE, FOWNER, MKNOD, SETGID, SETUID, SYS_ADMIN, SYS_CHROOT.
    let want: u64 = [0u32, 1, 3, 27, 6, 7, 21, 18]
        .iter()
        .map(|b| 1u64 << b)
        .sum();
    let bounding = u64::from_str_radix(&status_field(pid_u, "CapBnd"), 16).unwrap();
    assert_eq!(bounding, want, "bounding set of the jailer: {bounding:x}");
    assert_eq!(
        status_field(pid_u, "Uid").split_whitespace().next(),
        Some(VM_UID.to_string().as_str()),
        "Firecracker runs as the VM's own uid"
    );
    assert_eq!(status_field(pid_u, "CapEff"), "0000000000000000");
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    assert!(env.is_empty(), "{}", String::from_utf8_lossy(&env));
    // Its own session, so nothing that ends the helper's worker reaches it.
    let sid = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let sid: i32 = sid
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(sid, pid, "the jailer leads its own session");
    // The VM's own cgroup, in the version this host has (v1 memory and cpu on a hybrid
    // host), with the limits of its spec, holding Firecracker.
    let cgroups = banger_policy::cgroup::detect_host();
    let dirs = cgroups.vm_dirs("0123456789ab");
    for d in &dirs {
        let tasks = std::fs::read_to_string(d.join("tasks"))
            .or_else(|_| std::fs::read_to_string(d.join("cgroup.procs")))
            .unwrap_or_else(|e| panic!("{}: {e} ({cgroups:?})", d.display()));
        assert!(
            tasks.lines().any(|l| l == pid.to_string()),
            "{}: {tasks}",
            d.display()
        );
    }
    let limits = banger_policy::cgroup::Limits {
        vcpu: 2,
        memory_mib: 256,
    };
    match &cgroups {
        banger_policy::cgroup::Layout::V1 { memory, cpu } => {
            let read = |p: PathBuf| std::fs::read_to_string(p).unwrap().trim().to_owned();
            let vm = |h: &Path| h.join("banger/0123456789ab");
            assert_eq!(
                read(vm(memory).join("memory.limit_in_bytes")),
                limits.memory_bytes().to_string()
            );
            assert_eq!(
                read(vm(cpu).join("cpu.cfs_quota_us")),
                limits.cpu_quota_us().to_string()
            );
        }
        banger_policy::cgroup::Layout::V2 { root } => {
            let max = std::fs::read_to_string(root.join("banger/0123456789ab/memory.max")).unwrap();
            assert_eq!(max.trim(), limits.memory_bytes().to_string());
        }
        banger_policy::cgroup::Layout::None { .. } => assert!(dirs.is_empty()),
    }
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&console).unwrap().uid(),
        OWNER,
        "console made as the owner"
    );

    // A console the VM user may not open, one outside the state dirs, a bad id.
    let foreign = state.join("root-only");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
    match h
        .call(&Request::SpawnJailer {
            vm: "0123456789ac".into(),
            console: foreign.join("console.log"),
            vcpu: 1,
            memory_mib: 128,
            uid: VM_UID + 1,
        })
        .unwrap()
    {
        Reply::Failed { reason } => assert!(reason.contains("as the owner"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(!foreign.join("console.log").exists());
    assert!(
        !state
            .join("jail/firecracker-v1.13.1-x86_64/0123456789ac")
            .exists(),
        "no jailer ran"
    );
    let r = refused(
        &mut h,
        Request::SpawnJailer {
            vm: "0123456789ab".into(),
            console: "/etc/banger-console".into(),
            vcpu: 1,
            memory_mib: 128,
            uid: VM_UID,
        },
    );
    assert!(r.contains("not a path under banger's state"), "{r}");
    let r = refused(
        &mut h,
        Request::SpawnJailer {
            vm: "../../etc".into(),
            console: console.clone(),
            vcpu: 1,
            memory_mib: 128,
            uid: VM_UID,
        },
    );
    assert!(r.contains("not a banger vm id"), "{r}");
    // Never as root or the owner.
    for uid in [0, OWNER] {
        let r = refused(
            &mut h,
            Request::SpawnJailer {
                vm: "0123456789ad".into(),
                console: console.clone(),
                vcpu: 1,
                memory_mib: 128,
                uid,
            },
        );
        assert!(r.contains("is not a VM uid"), "{uid}: {r}");
    }
    // A shared file the VM's uid could write is refused before any process runs.
    let other = state.join("jail/firecracker-v1.13.1-x86_64/0123456789ae/root");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::hard_link(&rootfs, other.join("rootfs.ext4")).unwrap();
    std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o666)).unwrap();
    match h
        .call(&Request::SpawnJailer {
            vm: "0123456789ae".into(),
            console: console.clone(),
            vcpu: 1,
            memory_mib: 128,
            uid: VM_UID + 2,
        })
        .unwrap()
    {
        Reply::Failed { reason } => {
            assert!(reason.contains("is writable by the VM's uid"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(!other.join("api.sock").exists(), "no jailer ran");
    done(
        &mut h,
        Request::CleanJail {
            vm: "0123456789ae".into(),
        },
    );

    // Stopped through the helper, then its jail (made by the jailer as root) is removed.
    done(
        &mut h,
        Request::Signal {
            pid,
            start_time: started,
            signal: 15,
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
        assert!(Instant::now() < deadline, "the jailer did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(jail.exists());
    done(
        &mut h,
        Request::CleanJail {
            vm: "0123456789ab".into(),
        },
    );
    assert!(!jail.exists(), "the jail is gone");
    // Its disk is the owner's again.
    assert_eq!(std::fs::metadata(&overlay).unwrap().uid(), OWNER);
    for d in &dirs {
        assert!(!d.exists(), "the VM's cgroup {} is gone", d.display());
    }
}

/// A jail base on a `nodev` mount cannot hold the jailer's /dev/kvm and /dev/net/tun:
/// the launcher refuses to start the jailer, naming the path and what to do, before any
/// process runs. (The mount is a tmpfs of the test's, unmounted on drop.)
#[test]
fn root_the_launcher_refuses_a_jail_base_on_a_nodev_mount() {
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let ns = Netns::new("nodev");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let jail = state.join("jail");
    std::fs::create_dir_all(&jail).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "nodev,size=8m", "tmpfs"])
        .arg(&jail)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount a nodev tmpfs");
    let _mounted = Unmount(jail.clone());
    let firecracker = state.join("bin/firecracker");
    std::fs::create_dir_all(firecracker.parent().unwrap()).unwrap();
    std::fs::write(&firecracker, b"").unwrap();
    let uid = nix::unistd::getuid().as_raw();
    let mut cfg = config(&state);
    cfg.tap_uids = vec![uid];
    cfg.jailer = Some(banger_policy::JailerConfig {
        jailer: double_bin(),
        firecracker,
        owner_uid: uid,
        owner_gid: uid,
        vm_uids: banger_policy::UidRange {
            first: 2_000_000_000,
            count: 100,
        },
        socket_gid: uid,
    });
    let mut h = ns.helper(&cfg);
    let console = state.join("console.log");
    match h
        .call(&Request::SpawnJailer {
            vm: "0123456789ab".into(),
            console: console.clone(),
            vcpu: 1,
            memory_mib: 128,
            uid: 2_000_000_001,
        })
        .unwrap()
    {
        Reply::Failed { reason } => assert!(
            reason.contains(&format!(
                "the jail base {} is on a nodev mount",
                jail.display()
            )) && reason.contains("remount"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(!console.exists(), "no jailer ran");
    assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0, "no jail made");
}
