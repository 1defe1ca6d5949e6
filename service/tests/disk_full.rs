//! A full disk under the daemon's data dir (a small tmpfs mounted for the test, unmounted
//! when it ends): a `vm create` whose disks cannot be made, an image pull that cannot be
//! unpacked, and a store write that fails, leave the VMs, the images and the store as they
//! were, and the error says the disk is full and what to do; nothing half-written stays.
//! Root only (the mount).

mod pulls;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use banger_api::{CreateVm, Progress, VmRpcClient, codes};
use jsonrpsee::async_client::Client;
use support::Streamed;

/// A tmpfs of `size` mounted on a directory of its own; unmounted (and the directory
/// removed) when dropped, whatever the test did.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs on {}", dir.path().display());
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Take all but `leave` bytes of the free space with a file; returns it.
    fn fill(&self, leave: u64) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        // Less than all of it (tmpfs rounds to pages), then the rest a page at a time.
        let len = self.available().saturating_sub(leave + (64 << 10));
        let ok = Command::new("fallocate")
            .args(["-l", &len.to_string()])
            .arg(&filler)
            .status()
            .unwrap()
            .success();
        assert!(ok, "fallocate {len}");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&filler)
            .unwrap();
        while self.available() > leave {
            if f.write_all(&[0; 4096]).is_err() {
                break;
            }
        }
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a daemon of a failed test may still hold files on it.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A daemon whose data dir is on `fs` (its `data` a link to it), with the Firecracker
/// double's image `img` registered.
async fn setup(fs: &Tmpfs) -> (support::TestDaemon, Client, tempfile::TempDir) {
    let (d, c, files, _) = setup_with(fs, support::test_config()).await;
    (d, c, files)
}

async fn setup_with(
    fs: &Tmpfs,
    mut config: bangerd::config::Config,
) -> (
    support::TestDaemon,
    Client,
    tempfile::TempDir,
    bangerd::config::Config,
) {
    let files = tempfile::tempdir().unwrap();
    let fx = support::fc::Files::new(files.path(), support::fc::Exec::Double);
    let home = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(fs.path(), home.path().join("data")).unwrap();
    config.firecracker.jailer = support::fc::double_bin();
    config.firecracker.binary = fx.firecracker.clone();
    config.agent_timeout_secs = 0;
    let d = support::TestDaemon::start_with(home, config.clone()).await;
    let c = d.client().await;
    fx.register(&c).await;
    (d, c, files, config)
}

async fn create(c: &Client, name: &str) -> Result<(), (i32, String)> {
    let mut sub = c
        .create(CreateVm {
            name: Some(name.into()),
            image: Some("img".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    while let Some(ev) = sub.next().await {
        match ev.unwrap() {
            Progress::Done { .. } => return Ok(()),
            Progress::Failed { code, message } => return Err((code, message)),
            _ => {}
        }
    }
    panic!("the create stream ended without a result");
}

/// Every file under `dir`, relative.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn says_disk_full(message: &str) {
    assert!(
        message.contains("No space left on device") && message.contains("the disk is full"),
        "{message}"
    );
    assert!(message.contains("free space"), "{message}");
}

/// The VM's disks cannot be made (a few hundred KiB free): the create fails saying the disk
/// is full and what to do, the VM is left stopped with that error and no disk file, and
/// once there is room again it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_create_on_a_full_disk_leaves_no_disk_and_says_so() {
    let fs = Tmpfs::mount("64m");
    let (d, c, _files) = setup(&fs).await;
    let filler = fs.fill(512 << 10);
    let (code, message) = create(&c, "full").await.unwrap_err();
    assert_eq!(code, codes::INTERNAL_ERROR, "{message}");
    says_disk_full(&message);
    let vm = VmRpcClient::show(&c, "full".into()).await.unwrap();
    assert!(
        !banger_actors::vm::model::is_active(vm.state),
        "{:?}",
        vm.state
    );
    let left: Vec<_> = files_under(Path::new(&vm.dir))
        .into_iter()
        .filter(|f| f.ends_with(".ext4") || f.ends_with(".img") || f.contains("disk"))
        .collect();
    assert!(left.is_empty(), "half-made disks left: {left:?}");

    std::fs::remove_file(filler).unwrap();
    let mut sub = c.start("full".into()).await.unwrap();
    loop {
        match sub.next().await.unwrap().unwrap() {
            Progress::Done { vm } => {
                assert_eq!(vm.state, banger_api::VmState::Running);
                break;
            }
            Progress::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    drop(sub);
    VmRpcClient::delete(&c, "full".into(), true).await.unwrap();
    drop(c);
    d.shutdown().await;
}

/// The store cannot write (no byte free, and the store file has to grow): the create is
/// refused saying the disk is full, the store holds what it held (the VMs listed before,
/// nothing of the refused one), and once there is room again the same daemon writes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_store_write_on_a_full_disk_changes_nothing_and_says_so() {
    let fs = Tmpfs::mount("64m");
    let (d, c, _files, config) = setup_with(&fs, support::test_config()).await;
    create(&c, "before").await.unwrap();
    let filler = fs.fill(0);
    // Each create's disks fail, but its record is written (in the store file's free
    // pages) until the store file has to grow: that write fails.
    let mut refused = None;
    for i in 0..2000 {
        let before = VmRpcClient::list(&c).await.unwrap();
        let name = format!("full{i}");
        let (_, message) = create(&c, &name).await.unwrap_err();
        says_disk_full(&message);
        let after = VmRpcClient::list(&c).await.unwrap();
        if after.iter().all(|v| v.name != name) {
            let names = |v: &[banger_api::VmInfo]| -> Vec<(String, banger_api::VmState)> {
                v.iter().map(|v| (v.name.clone(), v.state)).collect()
            };
            assert_eq!(names(&after), names(&before));
            assert!(message.contains("store"), "{message}");
            refused = Some(after.len());
            break;
        }
    }
    let listed = refused.expect("a store write failed");

    std::fs::remove_file(filler).unwrap();
    create(&c, "after").await.unwrap();
    let now = VmRpcClient::list(&c).await.unwrap();
    assert_eq!(now.len(), listed + 1);
    // And after a restart (the store closed cleanly) every VM is there and deletable.
    drop(c);
    let home = d.shutdown_released().await;
    let d = support::TestDaemon::start_with(home, config).await;
    let c = d.client().await;
    let again = VmRpcClient::list(&c).await.unwrap();
    assert_eq!(again.len(), listed + 1);
    for vm in again {
        VmRpcClient::delete(&c, vm.name, true).await.unwrap();
    }
    drop(c);
    d.shutdown().await;
}

async fn pull_deb(c: &Client) -> Result<(), (i32, String)> {
    use banger_api::{ImageRpcClient, PullEvent, PullImage};
    let mut sub = ImageRpcClient::pull(
        c,
        PullImage {
            source: "deb".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    while let Some(ev) = sub.next().await {
        match ev.unwrap() {
            PullEvent::Failed { code, message } => return Err((code, message)),
            PullEvent::Image { .. } => return Ok(()),
            _ => {}
        }
    }
    panic!("the pull stream ended without a result");
}

/// An image pull whose bundle cannot be unpacked (a few hundred KiB free): it fails saying
/// the disk is full, no image is recorded, no staging dir or partial file stays; once there
/// is room again the same pull succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_pull_on_a_full_disk_leaves_nothing_and_says_so() {
    use banger_api::ImageRpcClient;
    let fs = Tmpfs::mount("64m");
    let tmp = tempfile::tempdir().unwrap();
    let img = pulls::image_bundle(tmp.path(), "k1");
    let server = pulls::FileServer::start();
    let url = server.put("/deb.tar.zst", pulls::Serve::Body(img.clone()));
    let ker = pulls::kernel_bundle(tmp.path());
    let kurl = server.put("/k1.tar.zst", pulls::Serve::Body(ker.clone()));
    let (ip, kp) = pulls::catalogs(
        tmp.path(),
        &[("deb", &url, &img, "k1")],
        &[("k1", &kurl, &ker)],
    );
    let mut config = support::test_config();
    config.images.catalog = Some(ip);
    config.images.kernel_catalog = Some(kp);
    let (d, c, _files, _) = setup_with(&fs, config).await;
    let before = ImageRpcClient::list(&c).await.unwrap();
    let filler = fs.fill(256 << 10);
    let (_, message) = pull_deb(&c).await.unwrap_err();
    says_disk_full(&message);
    assert_eq!(ImageRpcClient::list(&c).await.unwrap(), before);
    let left = pulls::leftovers(&d.paths.data_dir.join("images"));
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!d.paths.data_dir.join("images/deb").exists());

    std::fs::remove_file(filler).unwrap();
    pull_deb(&c).await.unwrap();
    assert!(d.paths.data_dir.join("images/deb").is_dir());
    drop(c);
    d.shutdown().await;
}

/// A snapshot that would not fit (a 128 MiB guest, a 64 MiB filesystem): refused before
/// anything is saved, saying how much it needs and what to do; the VM runs on, unpaused,
/// and no snapshot file is left. (The check: the double's memory file is sparse, so the
/// save itself would have "fit" and left a snapshot that cannot be whole.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_snapshot_that_does_not_fit_is_refused_and_the_vm_runs_on() {
    let fs = Tmpfs::mount("64m");
    let (d, c, _files) = setup(&fs).await;
    let mut sub = c
        .create(CreateVm {
            name: Some("big".into()),
            image: Some("img".into()),
            memory_mib: Some(128),
            ..Default::default()
        })
        .await
        .unwrap();
    while let Some(ev) = sub.next().await {
        match ev.unwrap() {
            Progress::Done { .. } => break,
            Progress::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    drop(sub);
    let before = VmRpcClient::show(&c, "big".into()).await.unwrap();
    let e = c.snapshotted("big", None).await.unwrap_err();
    let jsonrpsee::core::client::Error::Call(o) = e else {
        panic!("{e:?}")
    };
    assert_eq!(o.code(), codes::CONFLICT, "{}", o.message());
    assert!(
        o.message()
            .contains("not enough disk space to snapshot vm big")
            && o.message().contains("snapshot rm"),
        "{}",
        o.message()
    );
    let after = VmRpcClient::show(&c, "big".into()).await.unwrap();
    assert_eq!(after.state, banger_api::VmState::Running);
    assert_eq!(after.pid, before.pid);
    assert!(after.snapshots.is_empty());
    let left: Vec<_> = files_under(Path::new(&after.dir))
        .into_iter()
        .filter(|f| f.starts_with("snapshots"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    VmRpcClient::delete(&c, "big".into(), true).await.unwrap();
    drop(c);
    d.shutdown().await;
}
