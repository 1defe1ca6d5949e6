//! The Firecracker driver end to end, as a real process, without a privileged helper:
//! `firecracker::launch` runs Firecracker unjailed (the jailer needs root), here
//! `banger-fc-double` under a Firecracker name (a hard link `firecracker-v1.13.1-x86_64`,
//! reached through the symlink `firecracker`, as a release is installed), configures and
//! boots it over the API socket, and shuts it down with Ctrl+Alt+Del. The double's record
//! of what it was sent (`<jail root>/double-record.json`) is the probe. The jailed path
//! (through the helper's launcher) is tested in bangerd's `vm_firecracker` and `helper`.
//!
//! Needs neither root nor KVM. The binary is built by `cargo test` because the self
//! dev-dependency turns on its required feature `test-double`.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use banger_actors::net::host::HostNet;
use banger_actors::vm::proc;
use banger_actors::vmm::firecracker::double::process::{FAIL_ENV, GUEST_RUNNING, RECORD_FILE};
use banger_actors::vmm::firecracker::{self, FirecrackerConfig};
use banger_actors::vmm::{LaunchPlan, VmmError};
use banger_api::VmSpec;
use serde_json::{Value, json};
use tempfile::TempDir;

const DOUBLE: &str = env!("CARGO_BIN_EXE_banger-fc-double");
const WAIT: Duration = Duration::from_secs(5);

/// A VM's files and a jailer configuration, in one temporary directory (one filesystem, so
/// the driver's hard links work).
struct Rig {
    dir: TempDir,
    config: FirecrackerConfig,
    plan: LaunchPlan,
}

fn rig(initrd: bool, tap: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    std::fs::write(
        path.join("vmlinux"),
        banger_actors::kernel_format::fixture::minimal_elf(4096),
    )
    .unwrap();
    for file in ["initrd", "rootfs.ext4", "overlay.ext4", "work.ext4"] {
        std::fs::write(path.join(file), file.as_bytes()).unwrap();
    }
    // Firecracker as a release installs it: a versioned file and a symlink to it.
    let versioned = path.join("firecracker-v1.13.1-x86_64");
    if std::fs::hard_link(DOUBLE, &versioned).is_err() {
        std::fs::copy(DOUBLE, &versioned).unwrap();
    }
    std::os::unix::fs::symlink(&versioned, path.join("firecracker")).unwrap();
    std::fs::create_dir(path.join("jail")).unwrap();
    let config = FirecrackerConfig {
        jailer: PathBuf::from("/nonexistent/jailer"),
        firecracker: path.join("firecracker"),
        chroot_base: path.join("jail"),
        vm_uids: banger_policy::UidRange {
            first: 2_000_000_000,
            count: 100,
        },
        socket_gid: None,
    };
    let plan = LaunchPlan {
        id: "0123456789ab".into(),
        spec: VmSpec {
            vcpu: 2,
            memory_mib: 384,
            disk_bytes: 1 << 30,
        },
        kernel: path.join("vmlinux"),
        initrd: initrd.then(|| path.join("initrd")),
        rootfs: path.join("rootfs.ext4"),
        overlay: path.join("overlay.ext4"),
        work: path.join("work.ext4"),
        cmdline: "console=ttyS0 reboot=k panic=1".into(),
        console: path.join("console.log"),
        run_dir: path.join("run"),
        tap: tap.then(|| ("bg-0123456789ab".into(), "06:00:ac:1e:00:05".into())),
        uid: Some(2_000_000_001),
        clone: false,
    };
    Rig { dir, config, plan }
}

impl Rig {
    fn root(&self) -> PathBuf {
        firecracker::jail_root(&self.config, &self.plan.id)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.plan.console).unwrap_or_default()
    }

    /// Make Firecracker a script that starts the double (under its own, Firecracker's,
    /// name) with `env` set (the test cannot set its own environment: that is unsafe, and
    /// unsafe code is forbidden).
    fn firecracker_with_env(&mut self, env: &str, value: &str) {
        let script = self.dir.path().join("firecracker.sh");
        std::fs::write(
            &script,
            format!("#!/bin/bash\n{env}='{value}' exec -a \"$0\" '{DOUBLE}' \"$@\"\n"),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        self.config.firecracker = script;
    }
}

async fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Launch, check the running VM, shut it down, check what the double was sent, clean up.
async fn launch_and_shut_down(initrd: bool, tap: bool) {
    let rig = rig(initrd, tap);
    let stages = Mutex::new(Vec::new());
    let stage = |s: &str| stages.lock().unwrap().push(s.to_owned());

    let rt = firecracker::launch(&rig.config, &rig.plan, &HostNet::default(), &stage)
        .await
        .unwrap_or_else(|e| panic!("launch: {e}; console: {}", rig.console()));
    assert_eq!(
        *stages.lock().unwrap(),
        ["jail", "launch", "configure", "boot"]
    );
    assert!(proc::alive(rt.pid, rt.start_time), "firecracker runs");

    // Unjailed: a plain child process in the VM's directory, named after the binary the
    // symlink points to (as the jailer names a jail); no jailer's pid file, no copy.
    let root = rig.root();
    assert_eq!(
        root,
        rig.config
            .chroot_base
            .join("firecracker-v1.13.1-x86_64")
            .join(&rig.plan.id)
            .join("root")
    );
    // Both sockets are reached through links beside root/ (as for a jailed VM, whose
    // root/ is closed to bangerd), mode 0660.
    let instance = root.parent().unwrap();
    assert_eq!(PathBuf::from(&rt.control_socket), instance.join("api.sock"));
    assert!(!root.join("firecracker-v1.13.1-x86_64.pid").exists());
    assert_eq!(rt.isolation.as_deref(), Some(firecracker::UNJAILED));
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", rt.pid)).unwrap();
    assert_eq!(cwd, root, "paths in requests resolve in the VM's directory");

    // The vsock device's host socket, bound by `PUT /vsock` in the jail.
    let vsock = Path::new(&rt.vsock_socket);
    assert_eq!(vsock, instance.join("vsock.sock"));
    for s in [vsock, Path::new(&rt.control_socket)] {
        let m = std::fs::metadata(s).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777,
            0o660,
            "{}",
            s.display()
        );
    }
    tokio::net::UnixStream::connect(vsock).await.unwrap();

    // The guest's serial console, on the process's stdout, appended to console.log.
    poll_until("the guest's console", || {
        rig.console().contains(GUEST_RUNNING)
    })
    .await;
    let console = rig.console();
    assert!(console.contains("Linux version"), "{console}");
    assert!(console.contains(&rig.plan.cmdline), "{console}");

    firecracker::request_shutdown(&rt).await.unwrap();
    assert!(
        proc::wait_gone(rt.pid, rt.start_time, WAIT).await,
        "firecracker exits after Ctrl+Alt+Del"
    );

    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(RECORD_FILE)).unwrap()).unwrap();
    assert_eq!(record["violations"], json!([]), "{record:#}");
    assert_eq!(record["state"], "Exited");
    let requests = record["requests"].as_array().unwrap();
    let sent: Vec<String> = requests
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["method"].as_str().unwrap(),
                r["path"].as_str().unwrap()
            )
        })
        .collect();
    let mut expected = vec![
        "PUT /logger",
        "PUT /metrics",
        "PUT /machine-config",
        "PUT /boot-source",
        "PUT /drives/rootfs",
        "PUT /drives/overlay",
        "PUT /drives/work",
    ];
    if tap {
        expected.push("PUT /network-interfaces/eth0");
    }
    expected.extend(["PUT /vsock", "PUT /actions", "PUT /actions"]);
    assert_eq!(sent, expected);
    assert!(requests.iter().all(|r| r["status"] == 204), "{record:#}");

    let body = |path: &str| requests.iter().find(|r| r["path"] == path).unwrap()["body"].clone();
    assert_eq!(
        body("/machine-config"),
        json!({"vcpu_count": rig.plan.spec.vcpu, "mem_size_mib": rig.plan.spec.memory_mib, "smt": false})
    );
    // Writable drives flush to the host (`Writeback`); the read-only root needs not.
    assert_eq!(body("/drives/overlay")["cache_type"], "Writeback");
    assert_eq!(body("/drives/work")["cache_type"], "Writeback");
    assert_eq!(body("/drives/rootfs").get("cache_type"), None);
    // Ctrl+Alt+Del rebooted the guest, which is what ends Firecracker.
    assert!(
        rig.console().contains("reboot: Restarting system"),
        "{}",
        rig.console()
    );
    let boot = body("/boot-source");
    assert_eq!(boot["boot_args"], rig.plan.cmdline.as_str());
    assert_eq!(boot.get("initrd_path").is_some(), initrd, "{boot}");
    if tap {
        assert_eq!(
            body("/network-interfaces/eth0"),
            json!({"iface_id": "eth0", "host_dev_name": "bg-0123456789ab", "guest_mac": "06:00:ac:1e:00:05"})
        );
    }
    let actions: Vec<&Value> = requests
        .iter()
        .filter(|r| r["path"] == "/actions")
        .map(|r| &r["body"]["action_type"])
        .collect();
    assert_eq!(actions, [&json!("InstanceStart"), &json!("SendCtrlAltDel")]);

    firecracker::cleanup(&rig.config, &rig.plan.id);
    assert!(!root.exists());
    assert!(root.parent().is_some_and(|p| !p.exists()));
}

#[tokio::test]
async fn launch_with_a_tap_boots_and_shuts_down_unjailed() {
    launch_and_shut_down(false, true).await;
}

#[tokio::test]
async fn launch_with_an_initrd_and_no_network_boots_and_shuts_down() {
    launch_and_shut_down(true, false).await;
}

#[tokio::test]
async fn sigterm_stops_firecracker_and_leaves_the_record() {
    let rig = rig(false, false);
    let rt = firecracker::launch(&rig.config, &rig.plan, &HostNet::default(), &|_| {})
        .await
        .unwrap();
    assert!(proc::signal(
        rt.pid,
        rt.start_time,
        nix::sys::signal::Signal::SIGTERM
    ));
    assert!(proc::wait_gone(rt.pid, rt.start_time, WAIT).await);
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(rig.root().join(RECORD_FILE)).unwrap())
            .unwrap();
    assert_eq!(record["violations"], json!([]));
    assert_eq!(record["state"], "Running", "killed, not shut down");
    firecracker::cleanup(&rig.config, &rig.plan.id);
}

#[tokio::test]
async fn pause_and_resume_are_patch_vm_and_the_state_is_read_from_get_root() {
    let rig = rig(false, false);
    let rt = firecracker::launch(&rig.config, &rig.plan, &HostNet::default(), &|_| {})
        .await
        .unwrap();
    let driver = banger_actors::vmm::Driver::Firecracker(rig.config.clone());
    assert!(!driver.is_paused(&rt).await.unwrap());
    driver.pause(&rt).await.unwrap();
    driver.pause(&rt).await.unwrap();
    assert!(driver.is_paused(&rt).await.unwrap(), "GET / says Paused");
    // A paused guest sees Ctrl+Alt+Del only once it runs again: then it reboots, which
    // ends Firecracker.
    firecracker::request_shutdown(&rt).await.unwrap();
    assert!(
        proc::alive(rt.pid, rt.start_time),
        "paused: nothing happened"
    );
    driver.resume(&rt).await.unwrap();
    assert!(proc::wait_gone(rt.pid, rt.start_time, WAIT).await);

    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(rig.root().join(RECORD_FILE)).unwrap())
            .unwrap();
    assert_eq!(record["violations"], json!([]), "{record:#}");
    let requests = record["requests"].as_array().unwrap();
    let patches: Vec<(&Value, &Value)> = requests
        .iter()
        .filter(|r| r["method"] == "PATCH")
        .map(|r| (&r["path"], &r["body"]["state"]))
        .collect();
    let vm = json!("/vm");
    assert_eq!(
        patches,
        [
            (&vm, &json!("Paused")),
            (&vm, &json!("Paused")),
            (&vm, &json!("Resumed"))
        ]
    );
    let gets: Vec<&Value> = requests
        .iter()
        .filter(|r| r["method"] == "GET" && r["path"] == "/")
        .map(|r| &r["status"])
        .collect();
    assert_eq!(gets, [&json!(200), &json!(200)]);
    firecracker::cleanup(&rig.config, &rig.plan.id);
}

#[tokio::test]
async fn a_refused_api_request_fails_the_launch_and_kills_firecracker() {
    let mut rig = rig(false, true);
    rig.firecracker_with_env(FAIL_ENV, "/drives/work:400:Drive error");

    let error = firecracker::launch(&rig.config, &rig.plan, &HostNet::default(), &|_| {})
        .await
        .unwrap_err();
    match &error {
        VmmError::Api {
            method,
            path,
            status,
            fault,
        } => {
            assert_eq!((method.as_str(), path.as_str()), ("PUT", "/drives/work"));
            assert_eq!((*status, fault.as_str()), (400, "Drive error"));
        }
        other => panic!("not an API error: {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains("/drives/work") && message.contains("Drive error"),
        "{message}"
    );

    // The process the driver spawned was killed: nothing serves the API socket.
    poll_until("firecracker killed", || {
        std::os::unix::net::UnixStream::connect(rig.root().join("api.sock")).is_err()
    })
    .await;
    assert!(
        !rig.console().contains(GUEST_RUNNING),
        "the guest never booted"
    );
    firecracker::cleanup(&rig.config, &rig.plan.id);
}

/// The driver never hands Firecracker a kernel that is not an ELF vmlinux: a bzImage in the
/// plan is refused before the jail is made or the jailer runs. (Were it passed on, the
/// double, like Firecracker, would refuse InstanceStart: `Invalid Elf magic number`.)
#[tokio::test]
async fn a_kernel_that_is_not_an_elf_is_refused_before_firecracker_runs() {
    use banger_actors::kernel_format::fixture::{bzimage, lz4_legacy, minimal_elf};
    let mut rig = rig(false, false);
    let bz = rig.dir.path().join("vmlinuz");
    std::fs::write(&bz, bzimage(&lz4_legacy(&minimal_elf(4096)))).unwrap();
    rig.plan.kernel = bz.clone();
    let stages = Mutex::new(Vec::new());
    let stage = |s: &str| stages.lock().unwrap().push(s.to_owned());
    let error = firecracker::launch(&rig.config, &rig.plan, &HostNet::default(), &stage)
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&format!(
            "the kernel {} is not an ELF vmlinux (no ELF magic",
            bz.display()
        )) && message.contains("re-import the kernel"),
        "{message}"
    );
    assert_eq!(*stages.lock().unwrap(), ["jail"]);
    assert!(!rig.root().exists(), "no jail made");
    assert!(rig.console().is_empty(), "the jailer never ran");
}

#[tokio::test]
async fn firecracker_refusing_its_arguments_fails_the_launch_with_its_message() {
    let mut rig = rig(false, false);
    // An id Firecracker refuses: it exits before making the API socket, and its message
    // (stderr, appended to console.log) is in the driver's error.
    rig.plan.id = "vm_1".into();
    let error = firecracker::launch(&rig.config, &rig.plan, &HostNet::default(), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(error, VmmError::Died { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("Invalid instance ID: invalid char (_) at position 2"),
        "{error}"
    );
    firecracker::cleanup(&rig.config, &rig.plan.id);
}

/// Run the binary with a jailer command line; (exit code, stdout, stderr).
fn jailer(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(DOUBLE).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_jailer_refuses_a_bad_command_line_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let (exec, base) = (dir.path().join("firecracker"), dir.path().join("jail"));
    std::fs::write(&exec, b"").unwrap();
    std::fs::create_dir(&base).unwrap();
    let (exec, base) = (exec.to_str().unwrap(), base.to_str().unwrap());
    // The driver's command line, with `head` first and `fc` after Firecracker's arguments.
    let with = |head: &[&str], exec: &str, fc: &[&str]| -> Vec<String> {
        let mut args: Vec<&str> = head.to_vec();
        args.extend(["--exec-file", exec, "--uid", "1", "--gid", "1"]);
        args.extend(["--chroot-base-dir", base, "--cgroup-version", "2"]);
        args.extend(["--", "--api-sock", "/api.sock"]);
        args.extend(fc);
        args.into_iter().map(str::to_owned).collect()
    };
    let cases: [(Vec<String>, i32, &str); 5] = [
        (
            with(&[], exec, &[]),
            1,
            "Failed to parse arguments: Argument 'id' required, but not found.",
        ),
        (
            with(&["--id", "vm-1", "--bogus", "1"], exec, &[]),
            1,
            "Found argument 'bogus' which wasn't expected",
        ),
        (
            with(&["--id", "vm_1"], exec, &[]),
            1,
            "Invalid instance ID: invalid char (_) at position 2",
        ),
        (
            with(&["--id", "vm-1"], "/nonexistent/firecracker", &[]),
            1,
            "Failed to canonicalize path /nonexistent/firecracker: No such file or directory",
        ),
        (
            // The jailer passes `--id` to Firecracker itself.
            with(&["--id", "vm-1"], exec, &["--id", "x"]),
            153,
            "Arguments parsing error: The argument 'id' was provided more than once.",
        ),
    ];
    for (args, code, message) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, stdout, stderr) = jailer(&args);
        assert_eq!(status, Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}: nothing on the console");
    }
}

/// A jail base and an exec file for the jailer double, usable by uid `owner`.
fn jailer_dirs(owner: u32) -> (TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (exec, base) = (dir.path().join("firecracker"), dir.path().join("jail"));
    std::fs::write(&exec, b"").unwrap();
    std::fs::create_dir(&base).unwrap();
    std::os::unix::fs::chown(&base, Some(owner), Some(owner)).unwrap();
    (dir, exec, base)
}

fn jailer_line(id: &str, exec: &Path, base: &Path, uid: u32, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--id", id, "--exec-file"].map(str::to_owned).to_vec();
    args.push(exec.display().to_string());
    args.extend(["--uid", &uid.to_string(), "--gid", &uid.to_string()].map(str::to_owned));
    args.push("--chroot-base-dir".into());
    args.push(base.display().to_string());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.extend(["--", "--api-sock", "/api.sock"].map(str::to_owned));
    args
}

/// The jailer needs root (it unshares a mount namespace, pivots, mknods): run by a user it
/// fails as the real one does, before Firecracker runs. (As root, the test becomes
/// `nobody` for the child.)
#[test]
fn root_the_jailer_refuses_to_run_unprivileged_as_the_real_one_fails() {
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    let (dir, exec, base) = jailer_dirs(NOBODY);
    let out = Command::new(DOUBLE)
        .args(jailer_line("vm-1", &exec, &base, NOBODY, &[]))
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Failed to unshare into new mount namespace: Operation not permitted"),
        "{stderr}"
    );
    assert!(
        !base.join("firecracker/vm-1/root/api.sock").exists(),
        "no API"
    );
    drop(dir);
}

/// As root the jailer double mknods the jail's /dev/kvm and /dev/net/tun for the VM user,
/// and Firecracker's open of /dev/kvm fails on a `nodev` mount.
#[test]
fn root_the_jailer_makes_device_nodes_that_a_nodev_jail_base_cannot_open() {
    use std::os::unix::fs::FileTypeExt;
    let uid = 65534;
    let (dir, exec, base) = jailer_dirs(uid);
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "nodev,size=8m", "tmpfs"])
        .arg(&base)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount a nodev tmpfs (needs root)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _mounted = Unmount(base.clone());
    let out = Command::new(DOUBLE)
        .args(jailer_line("vm-1", &exec, &base, uid, &[]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let kvm = base.join("firecracker/vm-1/root/dev/kvm");
    assert!(
        // The path Firecracker sees, inside its root.
        stderr.contains("Failed to open the jail's device node /dev/kvm")
            && stderr.contains("Permission denied"),
        "{stderr}"
    );
    let meta = std::fs::metadata(&kvm).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid);
    let tun = base.join("firecracker/vm-1/root/dev/net/tun");
    assert!(
        std::fs::metadata(&tun)
            .unwrap()
            .file_type()
            .is_char_device()
    );
    drop(_mounted);
    drop(dir);
}
