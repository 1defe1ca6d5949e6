//! Test support: a real daemon on a socket in a tempdir, and clients for it.
//! Shared by the integration tests and the benchmarks (`#[path]`-included).
#![allow(dead_code)]

pub mod fc;

use std::path::{Path, PathBuf};

use banger_api::DaemonMode;
use bangerd::config::Config;
use bangerd::paths::Paths;
use bangerd::{Daemon, Settings, server};
use jsonrpsee::async_client::{Client, ClientBuilder};
use jsonrpsee::client_transport::ws::WsTransportClientBuilder;
use tokio::sync::oneshot;

/// A daemon running in this process on a tempdir.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub paths: Paths,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), bangerd::ServiceError>>>,
    _reaper: Reaper,
    /// What it was started with, for [`TestDaemon::restart`].
    config: Config,
}

/// Ends, when a test panics, the processes its daemon started (VMMs outlive their daemon by
/// design, so a failed assertion would otherwise leave them running): every process whose
/// command line names the daemon's directory (the double as jailer: `--chroot-base-dir
/// <dir>/data/jail`; as Firecracker: `--api-sock <dir>/...`).
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        if std::thread::panicking() {
            kill_processes_naming(&self.0);
        }
    }
}

/// SIGKILL every process (other than this one) whose command line contains `dir`.
pub fn kill_processes_naming(dir: &Path) {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The default config, with the `.vm` resolver on a free port (tests run many daemons).
pub fn test_config() -> Config {
    let mut c = Config {
        dns_listen: "127.0.0.1:0".into(),
        ..Config::default()
    };
    // In-process daemons have no privileged helper: VMs without a network.
    c.vm_defaults.network = Some(false);
    // Their VMs run on the Firecracker double; `auto` would pick QEMU without a helper.
    c.default_vmm = "firecracker".into();
    c
}

/// Make the file `rootfs` (sized already) an ext4 with banger's guest side in place
/// (`/usr/lib/banger/banger-init` and `banger-agent`, stand-ins: the Firecracker double
/// boots no userland), so `image register` takes it as it is rather than adding the
/// daemon's guest binaries.
pub fn banger_rootfs(rootfs: &Path) {
    let tree = tempfile::tempdir().expect("tempdir");
    let dir = tree.path().join("usr/lib/banger");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for b in ["banger-init", "banger-agent"] {
        std::fs::write(dir.join(b), b"stand-in").expect("write");
    }
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(tree.path())
        .arg(rootfs)
        .status()
        .expect("mkfs.ext4")
        .success();
    assert!(ok, "mkfs.ext4 {}", rootfs.display());
}

/// Paths all under `root`.
pub fn paths_in(root: &Path) -> Paths {
    Paths {
        mode: DaemonMode::User,
        data_dir: root.join("data"),
        log_dir: root.join("log"),
        cache_dir: root.join("cache"),
        socket: root.join("run/bangerd.sock"),
    }
}

impl TestDaemon {
    pub async fn start() -> TestDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir).await
    }

    pub async fn start_in(dir: tempfile::TempDir) -> TestDaemon {
        Self::start_with(dir, test_config()).await
    }

    pub async fn start_with(dir: tempfile::TempDir, config: Config) -> TestDaemon {
        Self::start_privileged(dir, config, None).await
    }

    /// With a privileged helper running in the network namespace `netns` (root only):
    /// what `bangerd` does when started as root, with the host effects kept inside the
    /// namespace.
    pub async fn start_in_netns(dir: tempfile::TempDir, config: Config, netns: &str) -> TestDaemon {
        Self::start_privileged(dir, config, Some(netns)).await
    }

    async fn start_privileged(
        dir: tempfile::TempDir,
        config: Config,
        netns: Option<&str>,
    ) -> TestDaemon {
        let paths = paths_in(dir.path());
        let mut privileged = bangerd::Privileged::default();
        if let Some(ns) = netns {
            paths.create_dirs().expect("dirs");
            let owner = bangerd::privilege::Owner {
                uid: nix::unistd::geteuid(),
                gid: nix::unistd::getegid(),
            };
            let cfg = bangerd::privilege::helper_config(&config, &paths, owner);
            privileged.helper =
                Some(banger_policy::Helper::spawn(in_netns(ns), &cfg).expect("helper"));
            privileged.helper_jails = cfg.jailer.is_some();
        }
        let settings = Settings::new(config.clone(), paths.clone());
        let daemon = Daemon::start_with(settings, privileged)
            .await
            .expect("daemon starts");
        let (listener, socket_file) =
            server::bind(&paths.socket, &daemon.settings().access).expect("bind");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let r = daemon
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await;
            drop(socket_file);
            r
        });
        TestDaemon {
            socket: paths.socket.clone(),
            paths,
            _reaper: Reaper(dir.path().to_owned()),
            dir,
            stop: Some(tx),
            task: Some(task),
            config,
        }
    }

    /// The config it runs with.
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// Shut down and start again on the same directory and config (without a helper):
    /// the VMs it ran are re-adopted, as after `systemctl restart bangerd`.
    pub async fn restart(self) -> TestDaemon {
        let config = self.config.clone();
        let dir = self.shutdown_released().await;
        Self::start_with(dir, config).await
    }

    /// Shut down and wait until the store is free for the next daemon: the VM actors,
    /// stopped with the tree, drop their hold of it a moment after the root has stopped.
    pub async fn shutdown_released(self) -> tempfile::TempDir {
        let store = self.paths.store_file();
        let dir = self.shutdown().await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match banger_actors::store::Store::open(&store) {
                Ok(s) => {
                    drop(s);
                    return dir;
                }
                Err(banger_actors::store::StoreError::Locked { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("the store after shutdown: {e}"),
            }
        }
    }

    pub async fn client(&self) -> Client {
        client_for(&self.socket).await
    }

    /// Stop (as SIGTERM would) and wait until it has shut down.
    pub async fn shutdown(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("serve task").expect("clean shutdown");
        }
        self.dir
    }
}

/// A WebSocket JSON-RPC client over the Unix socket, as the CLI makes it.
pub async fn client_for(socket: &Path) -> Client {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (tx, rx) = WsTransportClientBuilder::default()
        .max_request_size(64 * 1024 * 1024)
        .build_with_stream(url::Url::parse("ws://bangerd/").unwrap(), stream)
        .await
        .expect("ws handshake");
    ClientBuilder::default().build_with_tokio(tx, rx)
}

/// One raw HTTP/1.1 POST over the Unix socket; returns (status, body).
pub async fn http_post(socket: &Path, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let head = format!(
        "POST / HTTP/1.1\r\nHost: bangerd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    // The server may answer (413) before reading a huge body; a write error then is fine.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `bangerd` (to run as the helper) in the network namespace `ns` and nothing else: the
/// host's mount table stays, cgroups included, as for a bangerd started by systemd.
/// (`ip netns exec` would also give it a fresh sysfs without /sys/fs/cgroup: the case
/// `vm_firecracker`'s dropped-owner test covers.)
pub fn in_netns(ns: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_bangerd"));
    cmd
}

/// A network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("bgt-{tag}-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name}");
        Netns(name)
    }

    pub fn sh(&self, cmd: &str) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", cmd])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    pub fn helper(&self, cfg: &banger_policy::HelperConfig) -> banger_policy::Helper {
        banger_policy::Helper::spawn(in_netns(&self.0), cfg).expect("helper starts")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// What a progress subscription said: the stages it went through, in order, and its last
/// event (`done` or `snapshot`), or its `failed` as the call error a method would answer.
pub async fn follow(
    mut sub: jsonrpsee::core::client::Subscription<banger_api::Progress>,
) -> (
    Vec<String>,
    Result<banger_api::Progress, jsonrpsee::core::client::Error>,
) {
    use banger_api::Progress;
    let mut stages = Vec::new();
    while let Some(ev) = sub.next().await {
        match ev {
            Ok(Progress::Stage { stage, .. }) => stages.push(stage),
            Ok(Progress::Created { .. }) => {}
            Ok(Progress::Failed { code, message }) => {
                let e = jsonrpsee::types::ErrorObject::owned(code, message, None::<()>);
                return (stages, Err(jsonrpsee::core::client::Error::Call(e)));
            }
            Ok(last) => return (stages, Ok(last)),
            Err(e) => return (stages, Err(e.into())),
        }
    }
    let e = jsonrpsee::core::client::Error::Custom("the progress stream ended early".into());
    (stages, Err(e))
}

/// `vm.suspend`, `vm.snapshot_create` and `vm.rollback` followed to their answer, as
/// methods: the streams' ends (see [`follow`]).
#[allow(async_fn_in_trait)]
pub trait Streamed {
    async fn suspended(
        &self,
        vm: &str,
    ) -> Result<banger_api::VmInfo, jsonrpsee::core::client::Error>;
    async fn snapshotted(
        &self,
        vm: &str,
        name: Option<&str>,
    ) -> Result<banger_api::SnapshotInfo, jsonrpsee::core::client::Error>;
    async fn rolled_back(
        &self,
        vm: &str,
        snapshot: &str,
    ) -> Result<banger_api::VmInfo, jsonrpsee::core::client::Error>;
}

fn end_vm(
    last: Result<banger_api::Progress, jsonrpsee::core::client::Error>,
) -> Result<banger_api::VmInfo, jsonrpsee::core::client::Error> {
    match last? {
        banger_api::Progress::Done { vm } => Ok(vm),
        other => panic!("the stream ended with {other:?}"),
    }
}

impl Streamed for Client {
    async fn suspended(
        &self,
        vm: &str,
    ) -> Result<banger_api::VmInfo, jsonrpsee::core::client::Error> {
        use banger_api::VmRpcClient;
        end_vm(follow(self.suspend(vm.into()).await?).await.1)
    }

    async fn snapshotted(
        &self,
        vm: &str,
        name: Option<&str>,
    ) -> Result<banger_api::SnapshotInfo, jsonrpsee::core::client::Error> {
        use banger_api::VmRpcClient;
        let sub = self
            .snapshot_create(vm.into(), name.map(Into::into))
            .await?;
        match follow(sub).await.1? {
            banger_api::Progress::Snapshot { snapshot } => Ok(snapshot),
            other => panic!("the stream ended with {other:?}"),
        }
    }

    async fn rolled_back(
        &self,
        vm: &str,
        snapshot: &str,
    ) -> Result<banger_api::VmInfo, jsonrpsee::core::client::Error> {
        use banger_api::VmRpcClient;
        end_vm(
            follow(self.rollback(vm.into(), snapshot.into()).await?)
                .await
                .1,
        )
    }
}

/// Delete every VM of the daemon (`vm rm -f`): their VMMs outlive the daemon by design, so
/// a test that leaves one running leaks its process.
pub async fn delete_all(c: &Client) {
    use banger_api::VmRpcClient;
    for v in VmRpcClient::list(c).await.unwrap() {
        VmRpcClient::delete(c, v.name, true).await.unwrap();
    }
}
