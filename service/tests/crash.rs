//! Crash consistency: a `bangerd` process killed in the middle of a VM's launch leaves no
//! VMM process that no record claims. Root only (`root_*`): a real `bangerd` as root, in a
//! network namespace this test makes, its helper's launcher starting the jailer (the
//! Firecracker double), as `banger system install` runs it.

mod support;

use std::path::{Path, PathBuf};

use banger_api::{CreateVm, Progress, VmRpcClient, VmState};
use jsonrpsee::async_client::Client;

use support::Streamed;
use support::fc::{EXEC_NAME, Exec, Home, double_bin};

const OWNER: u32 = 65534;

/// A root home: files registered as `img`, a config for jailed Firecracker VMs (the
/// double) with networks.
fn home(h: &Path) -> (Home, support::fc::Files) {
    let files = h.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let fx = support::fc::Files::new(&files, Exec::Script);
    fx.chown(OWNER);
    let config = format!(
        "owner = \"{OWNER}\"\ndefault_vmm = \"firecracker\"\nagent_timeout_secs = 0\n\
         stop_timeout_secs = 5\ndns_listen = \"127.0.0.1:0\"\n\
         [firecracker]\njailer = \"{}\"\nbinary = \"{}\"\n[vm_defaults]\nnetwork = true\n",
        double_bin().display(),
        fx.firecracker.display()
    );
    (Home::new(h, OWNER, &config), fx)
}

/// `bangerd` in `ns`, with `env` added to its environment.
async fn bangerd(home: &Home, ns: &str, env: &[&str]) -> support::fc::Daemon {
    // A killed daemon leaves its socket file: wait for the new one's.
    let _ = std::fs::remove_file(home.socket());
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns, "env"])
        .args(env)
        .arg(env!("CARGO_BIN_EXE_bangerd"));
    home.spawn(cmd, &std::env::var_os("PATH").unwrap_or_default())
        .await
}

/// The processes whose command line names `dir` (but for the helper's, whose config names
/// it): (pid, command line).
fn naming(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let raw = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z'));
        if cmdline.contains(&needle) && !cmdline.contains(" __helper ") && !zombie {
            out.push((pid, cmdline));
        }
    }
    out
}

/// `bangerd.log` of the home (JSON lines).
fn log_of(h: &Path) -> String {
    let out = std::process::Command::new("find")
        .arg(h)
        .args(["-name", "bangerd.log"])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(PathBuf::from)
        .expect("a bangerd.log");
    std::fs::read_to_string(path).unwrap()
}

async fn create(c: &Client, name: &str) -> Result<(), String> {
    let req = CreateVm {
        name: Some(name.into()),
        image: Some("img".into()),
        ..Default::default()
    };
    let mut sub = c.create(req).await.map_err(|e| e.to_string())?;
    while let Some(ev) = sub.next().await {
        match ev.map_err(|e| e.to_string())? {
            Progress::Done { .. } => return Ok(()),
            Progress::Failed { message, .. } => return Err(message),
            _ => {}
        }
    }
    Err("the create's stream ended without an answer".into())
}

/// `BANGER_FAULT=after-spawn` makes bangerd die (SIGKILL, as a crash or the OOM killer
/// would) right after the helper's launcher spawned the jailer and before the VM's record
/// holds its pid. The next bangerd finds that process by the jail base in its command line,
/// kills it (through the helper: it runs as the VM's uid) and logs it with pid and command
/// line; the VM is stopped, deletable, and nothing of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_vmm_spawned_before_its_record_is_found_and_killed_by_the_next_daemon() {
    let ns = support::Netns::new("crash");
    let tmp = tempfile::tempdir().unwrap();
    let h = tmp.path();
    let (home, fx) = home(h);
    let jail_base = h.join("data/banger/jail");

    let first = bangerd(&home, &ns.0, &[]).await;
    let c = support::client_for(&home.socket()).await;
    fx.register(&c).await;
    drop(c);
    first.stop();

    let mut faulty = bangerd(&home, &ns.0, &["BANGER_FAULT=after-spawn"]).await;
    let c = support::client_for(&home.socket()).await;
    let answer = create(&c, "a").await;
    assert!(answer.is_err(), "the daemon died during the create");
    killed(&mut faulty);
    drop(c);
    // The jailer (the double) runs on, its pid in no record.
    let orphans = naming(&jail_base);
    let vmm: Vec<_> = orphans
        .iter()
        .filter(|(_, cmd)| cmd.contains("--chroot-base-dir"))
        .collect();
    assert_eq!(vmm.len(), 1, "{orphans:?}");
    let (orphan, orphan_cmd) = vmm[0].clone();

    let daemon = bangerd(&home, &ns.0, &[]).await;
    let c = support::client_for(&home.socket()).await;
    // The daemon answers before it has re-adopted its VMs (#20): wait for this one.
    let vm = settled(&c, "a").await;
    assert_eq!(vm.state, VmState::Stopped, "{vm:?}");
    assert_eq!(vm.pid, None);
    assert!(
        naming(&jail_base).iter().all(|(p, _)| *p != orphan),
        "the orphan {orphan} still runs: {orphan_cmd}"
    );
    let log = log_of(h);
    let line = log
        .lines()
        .find(|l| l.contains("orphaned VM process") && l.contains(&format!("\"pid\":{orphan}")))
        .unwrap_or_else(|| panic!("no log line for pid {orphan}: {log}"));
    assert!(line.contains("--chroot-base-dir"), "{line}");
    assert!(
        !jail_base.join(EXEC_NAME).join(&vm.id).exists(),
        "jail left"
    );

    // The VM starts again and is deleted with nothing left.
    start(&c, "a").await;
    VmRpcClient::delete(&c, "a".into(), true).await.unwrap();
    assert_eq!(naming(&jail_base), Vec::new());
    let links = ns.sh("ip -o link");
    assert!(!links.contains("bg-"), "{links}");
    drop(c);
    daemon.stop();
}

/// `vm start` of `name`, which must end running.
async fn start(c: &Client, name: &str) {
    let mut sub = c.start(name.into()).await.unwrap();
    loop {
        match sub.next().await.unwrap().unwrap() {
            Progress::Done { vm } => {
                assert_eq!(vm.state, VmState::Running, "{:?}", vm.error);
                break;
            }
            Progress::Failed { message, .. } => panic!("start: {message}"),
            _ => {}
        }
    }
}

/// Until the VM `name` is re-adopted by the daemon `c` serves.
async fn settled(c: &Client, name: &str) -> banger_api::VmInfo {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let vm = VmRpcClient::show(c, name.into()).await.unwrap();
        if !vm.adopting {
            return vm;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still adopting: {vm:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A `vm suspend` cut by the daemon's death (`BANGER_FAULT`, SIGKILL): at `mid-save` (the
/// VMM wrote its state into `state.tmp/`, not yet renamed) the next daemon discards the
/// half save and re-adopts the VM paused under the same VMM, and `vm resume` runs it; at
/// `after-save` (`state/` complete, the VMM not yet ended) it finishes the suspend: the
/// VMM is ended, the VM is suspended, and `vm start` restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_suspend_cut_by_the_daemons_death_is_discarded_or_finished() {
    let ns = support::Netns::new("cutsave");
    let tmp = tempfile::tempdir().unwrap();
    let h = tmp.path();
    let (home, fx) = home(h);
    let first = bangerd(&home, &ns.0, &[]).await;
    let c = support::client_for(&home.socket()).await;
    fx.register(&c).await;
    drop(c);
    first.stop();

    for (point, vm) in [("mid-save", "m"), ("after-save", "s")] {
        let mut faulty = bangerd(&home, &ns.0, &[&format!("BANGER_FAULT={point}")]).await;
        let c = support::client_for(&home.socket()).await;
        create(&c, vm).await.unwrap();
        let before = VmRpcClient::show(&c, vm.into()).await.unwrap();
        assert!(c.suspended(vm).await.is_err(), "{point}: the daemon died");
        killed(&mut faulty);
        drop(c);

        let daemon = bangerd(&home, &ns.0, &[]).await;
        let c = support::client_for(&home.socket()).await;
        let after = settled(&c, vm).await;
        let dir = PathBuf::from(&after.dir);
        if point == "mid-save" {
            assert_eq!(after.state, VmState::Paused, "{after:?}");
            assert_eq!(after.pid, before.pid, "the same VMM");
            assert!(!dir.join("state.tmp").exists() && !dir.join("state").exists());
            let resumed = c.resume(vm.into()).await.unwrap();
            assert_eq!(resumed.state, VmState::Running);
        } else {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let after = loop {
                let v = VmRpcClient::show(&c, vm.into()).await.unwrap();
                if v.state == VmState::Suspended {
                    break v;
                }
                assert!(std::time::Instant::now() < deadline, "not suspended: {v:?}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            };
            assert_eq!(after.pid, None);
            assert!(dir.join("state/vm.mem").is_file());
            start(&c, vm).await;
            let console = std::fs::read_to_string(dir.join("console.log")).unwrap();
            assert!(
                console.contains("banger-fc-double: guest restored"),
                "{console}"
            );
        }
        VmRpcClient::delete(&c, vm.into(), true).await.unwrap();
        drop(c);
        daemon.stop();
    }
    let links = ns.sh("ip -o link");
    assert!(!links.contains("bg-"), "{links}");
}

/// A `vm snapshot create` cut by the daemon's death after the snapshot's files were
/// written and before it was recorded (`BANGER_FAULT=mid-snapshot`, the vCPUs still
/// stopped by the save): the next daemon removes the files no snapshot names and lets
/// the VM run again (it was running, not paused by its user), under the same VMM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_snapshot_cut_by_the_daemons_death_leaves_no_files_and_the_vm_running() {
    let Cut {
        ns,
        _tmp,
        home,
        mut faulty,
        c,
    } = cut_at("cutsnap", "mid-snapshot", "cs").await;
    let before = VmRpcClient::show(&c, "cs".into()).await.unwrap();
    assert!(
        c.snapshotted("cs", Some("x")).await.is_err(),
        "the daemon died"
    );
    killed(&mut faulty);
    drop(c);
    let snapshots = PathBuf::from(&before.dir).join("snapshots");
    let left = || -> Vec<String> {
        std::fs::read_dir(&snapshots)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(left().len(), 1, "the cut snapshot's directory");

    let daemon = bangerd(&home, &ns.0, &[]).await;
    let c = support::client_for(&home.socket()).await;
    let after = settled(&c, "cs").await;
    assert_eq!(after.state, VmState::Running, "{after:?}");
    assert_eq!(after.pid, before.pid, "the same VMM");
    assert!(after.snapshots.is_empty(), "{:?}", after.snapshots);
    assert!(left().is_empty(), "{:?}", left());
    // And snapshots work on.
    let s = c.snapshotted("cs", Some("x")).await.unwrap();
    assert_eq!(s.name, "x");
    VmRpcClient::delete(&c, "cs".into(), true).await.unwrap();
    drop(c);
    daemon.stop();
    let links = ns.sh("ip -o link");
    assert!(!links.contains("bg-"), "{links}");
}

/// A `vm fork` cut by the daemon's death once the clones' directories are copied and
/// before any record names them (`BANGER_FAULT=mid-fork`): the next daemon removes the
/// directories no record names, and the source runs on under the same VMM with no
/// snapshot left (the fork's became the last clone's directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_fork_cut_by_the_daemons_death_leaves_no_clone() {
    let Cut {
        ns,
        _tmp,
        home,
        mut faulty,
        c,
    } = cut_at("cutfork", "mid-fork", "cf").await;
    let before = VmRpcClient::show(&c, "cf".into()).await.unwrap();
    let req = banger_api::ForkVm {
        vm: "cf".into(),
        count: Some(2),
        ..Default::default()
    };
    let (_, last) = support::follow(c.fork(req).await.unwrap()).await;
    assert!(last.is_err(), "the daemon died: {last:?}");
    killed(&mut faulty);
    drop(c);
    let vms_dir = PathBuf::from(&before.dir).parent().unwrap().to_owned();
    let dirs = || std::fs::read_dir(&vms_dir).unwrap().count();
    assert_eq!(dirs(), 3, "the source's and the two clones' copies");

    let daemon = bangerd(&home, &ns.0, &[]).await;
    let c = support::client_for(&home.socket()).await;
    let after = settled(&c, "cf").await;
    assert_eq!((after.state, after.pid), (VmState::Running, before.pid));
    assert_eq!(VmRpcClient::list(&c).await.unwrap().len(), 1);
    assert_eq!(dirs(), 1, "no clone directory left");
    let snaps = PathBuf::from(&before.dir).join("snapshots");
    assert_eq!(
        std::fs::read_dir(&snaps).map(|d| d.count()).unwrap_or(0),
        0,
        "no fork snapshot left"
    );
    VmRpcClient::delete(&c, "cf".into(), true).await.unwrap();
    drop(c);
    daemon.stop();
    let links = ns.sh("ip -o link");
    assert!(!links.contains("bg-"), "{links}");
}

/// A `vm set --disk-size` cut by the daemon's death after the work disk's file grew and
/// before resize2fs ran (`BANGER_FAULT=mid-resize`): the next daemon finishes it, so the
/// record, the file and the filesystem all have the new size (before, the record kept the
/// old size, the filesystem too, and asking again for the new size did nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_disk_resize_cut_by_the_daemons_death_is_finished() {
    let Cut {
        ns,
        _tmp,
        home,
        mut faulty,
        c,
    } = cut_at("cutrsz", "mid-resize", "rz").await;
    let stopped = c.stop("rz".into(), None).await.unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    let work = PathBuf::from(&stopped.dir).join("work.ext4");
    let fs_bytes = || banger_actors::vm::disks::fs_bytes(&work).unwrap();
    let old = stopped.spec.disk_bytes;
    assert_eq!(fs_bytes(), old);
    let new = old + (256 << 20);
    let cut = VmRpcClient::set(
        &c,
        banger_api::SetVm {
            vm: "rz".into(),
            disk_bytes: Some(new),
            ..Default::default()
        },
    )
    .await;
    assert!(cut.is_err(), "the daemon died: {cut:?}");
    killed(&mut faulty);
    drop(c);
    assert_eq!(
        std::fs::metadata(&work).unwrap().len(),
        new,
        "the file grew"
    );
    assert_eq!(fs_bytes(), old, "its filesystem did not yet");

    let daemon = bangerd(&home, &ns.0, &[]).await;
    let c = support::client_for(&home.socket()).await;
    let after = settled(&c, "rz").await;
    assert_eq!(after.spec.disk_bytes, new);
    assert_eq!(fs_bytes(), new, "the resize was finished");
    VmRpcClient::delete(&c, "rz".into(), true).await.unwrap();
    drop(c);
    daemon.stop();
    let links = ns.sh("ip -o link");
    assert!(!links.contains("bg-"), "{links}");
}

/// A daemon that dies at `BANGER_FAULT=fault`, with one VM `vm` created under it, in a
/// namespace and home of their own (the image registered by a first, clean daemon).
struct Cut {
    ns: support::Netns,
    _tmp: tempfile::TempDir,
    home: Home,
    faulty: support::fc::Daemon,
    c: Client,
}

async fn cut_at(tag: &str, fault: &str, vm: &str) -> Cut {
    let ns = support::Netns::new(tag);
    let tmp = tempfile::tempdir().unwrap();
    let (home, fx) = home(tmp.path());
    let first = bangerd(&home, &ns.0, &[]).await;
    let c = support::client_for(&home.socket()).await;
    fx.register(&c).await;
    drop(c);
    first.stop();
    let faulty = bangerd(&home, &ns.0, &[&format!("BANGER_FAULT={fault}")]).await;
    let c = support::client_for(&home.socket()).await;
    create(&c, vm).await.unwrap();
    Cut {
        ns,
        _tmp: tmp,
        home,
        faulty,
        c,
    }
}

/// The daemon `d` ended by the SIGKILL its fault sent it.
fn killed(d: &mut support::fc::Daemon) {
    use std::os::unix::process::ExitStatusExt;
    let status = d.child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status}");
}
