//! Firecracker fixtures shared by `vm_firecracker` and the `vm_create` benchmark: the files
//! a Firecracker VM needs (an ELF kernel the double loads at InstanceStart, a small ext4
//! root, the Firecracker binary under its release name), registered as kernel `k` and image
//! `img`; and a `bangerd` *process* in a home of its own, for the tests that need the real
//! binary (its privilege drop, its helper, a user's daemon without one).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use banger_api::{ImageRpcClient, ImportKernel, KernelRpcClient, RegisterImage};
use jsonrpsee::async_client::Client;

/// The exec name every jail is made under: the file `firecracker` links to, as a release
/// is installed (`firecracker -> firecracker-v1.13.1-x86_64`), and as the jailer names it.
pub const EXEC_NAME: &str = "firecracker-v1.13.1-x86_64";

/// The double's binary (built with banger-actors' `test-double` feature; the workspace's
/// tests build it), next to the test binary's deps dir, release build first.
pub fn double_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe
        .ancestors()
        .find(|p| p.join("debug").is_dir() || p.join("release").is_dir())
        .unwrap_or_else(|| exe.parent().unwrap().parent().unwrap())
        .to_owned();
    // A test runs in `<target>/<profile>/deps`: its own profile's double first.
    let own = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("banger-fc-double"));
    let candidates = own
        .into_iter()
        .chain(["release", "debug"].map(|p| target.join(p).join("banger-fc-double")));
    for p in candidates {
        if p.exists() {
            return p;
        }
    }
    panic!(
        "banger-fc-double is missing: cargo build -p banger-actors --features test-double --bin banger-fc-double (cargo test --workspace builds it)"
    );
}

/// What `firecracker` is in a fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    /// A small script that runs the double as Firecracker (so `firecracker --version`
    /// answers, as bangerd asks it for a snapshot's VMM version): only the exec file the
    /// jailer (the double) copies into each jail, which is why it is not the double
    /// itself (150 MB a jail).
    Script,
    /// The double itself under Firecracker's release name (a hard link, else a copy): what
    /// runs when there is no jailer.
    Double,
}

/// The files of a Firecracker VM, under `dir`.
#[derive(Debug, Clone)]
pub struct Files {
    pub dir: PathBuf,
    /// `dir/kernel` (holding `vmlinux`), for `kernel import --from`.
    pub kernel_dir: PathBuf,
    pub rootfs: PathBuf,
    /// `dir/firecracker`, a symlink to [`EXEC_NAME`].
    pub firecracker: PathBuf,
    /// `dir/`[`EXEC_NAME`].
    pub versioned: PathBuf,
}

impl Files {
    pub fn new(dir: &Path, exec: Exec) -> Files {
        let kernel_dir = dir.join("kernel");
        std::fs::create_dir_all(&kernel_dir).unwrap();
        std::fs::write(
            kernel_dir.join("vmlinux"),
            banger_actors::kernel_format::fixture::minimal_elf(4096),
        )
        .unwrap();
        let versioned = dir.join(EXEC_NAME);
        match exec {
            Exec::Script => {
                use std::os::unix::fs::PermissionsExt;
                let script = format!(
                    "#!/bin/bash\nexec -a firecracker '{}' \"$@\"\n",
                    double_bin().display()
                );
                std::fs::write(&versioned, script).unwrap();
                std::fs::set_permissions(&versioned, std::fs::Permissions::from_mode(0o755))
                    .unwrap();
            }
            Exec::Double => {
                if std::fs::hard_link(double_bin(), &versioned).is_err() {
                    std::fs::copy(double_bin(), &versioned).unwrap();
                }
            }
        }
        let firecracker = dir.join("firecracker");
        std::os::unix::fs::symlink(&versioned, &firecracker).unwrap();
        let rootfs = dir.join("rootfs.ext4");
        std::fs::File::create(&rootfs)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        // With banger's guest side (stand-ins): `image register` refuses nothing here.
        super::banger_rootfs(&rootfs);
        Files {
            dir: dir.to_owned(),
            kernel_dir,
            rootfs,
            firecracker,
            versioned,
        }
    }

    /// Give the files to `uid` (a daemon running as that user registers them).
    pub fn chown(&self, uid: u32) {
        for p in [
            &self.dir,
            &self.kernel_dir,
            &self.kernel_dir.join("vmlinux"),
            &self.rootfs,
            &self.versioned,
        ] {
            std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
        }
    }

    /// Import the kernel as `k` and register the root as image `img` (kernel `k`).
    pub async fn register(&self, c: &Client) {
        c.import(ImportKernel {
            name: "k".into(),
            from: self.kernel_dir.display().to_string(),
        })
        .await
        .unwrap();
        c.register(RegisterImage {
            name: "img".into(),
            rootfs: self.rootfs.display().to_string(),
            kernel: Some("k".into()),
        })
        .await
        .unwrap();
    }
}

/// A home for a `bangerd` process: the XDG directories of a user (owned by `uid`) and its
/// config file.
pub struct Home {
    pub dir: PathBuf,
}

impl Home {
    pub fn new(dir: &Path, uid: u32, config: &str) -> Home {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for d in ["run", "data", "state", "cache", "config"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
            std::os::unix::fs::chown(dir.join(d), Some(uid), Some(uid)).unwrap();
        }
        std::fs::create_dir_all(dir.join("config/banger")).unwrap();
        std::fs::write(dir.join("config/banger/config.toml"), config).unwrap();
        Home {
            dir: dir.to_owned(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/banger/bangerd.sock")
    }

    /// Run `cmd` (which execs `bangerd` in the end: `setpriv ... bangerd`, `ip netns exec
    /// ... bangerd`) with this home's environment and nothing else but `path`, and wait until
    /// its socket answers.
    pub async fn spawn(&self, mut cmd: Command, path: &std::ffi::OsStr) -> Daemon {
        let h = &self.dir;
        let err = h.join("bangerd.err");
        let child = cmd
            .env_clear()
            .env("PATH", path)
            .env("HOME", h)
            .env("XDG_RUNTIME_DIR", h.join("run"))
            .env("XDG_DATA_HOME", h.join("data"))
            .env("XDG_STATE_HOME", h.join("state"))
            .env("XDG_CACHE_HOME", h.join("cache"))
            .env("XDG_CONFIG_HOME", h.join("config"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let mut daemon = Daemon {
            child,
            home: h.clone(),
        };
        let socket = self.socket();
        let deadline = Instant::now() + Duration::from_secs(20);
        // Answering, not merely bound (a daemon killed earlier leaves its socket file, and
        // a connect between bind and listen is refused).
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline && daemon.child.try_wait().unwrap().is_none(),
                "bangerd did not start: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        daemon
    }
}

/// A `bangerd` process. Dropped while it still runs (a failed assertion), it is killed,
/// and so is every process whose command line names its home (its VMMs: the double run as
/// jailer or as Firecracker), so a failing test leaves no process behind.
pub struct Daemon {
    pub child: Child,
    home: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and its exit status is success.
    pub fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "bangerd exited with {status}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            super::kill_processes_naming(&self.home);
        }
    }
}
