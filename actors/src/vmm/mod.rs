//! VMM drivers. A VmActor drives its VMM through [`Driver`], which has two real
//! implementations sharing the same disks, kernel, command line and hybrid-vsock contract:
//!
//! - [`firecracker`]: the jailer (chroot with hard links, own uid/gid, per-VM cgroup)
//!   through the privileged helper, or Firecracker unjailed without one, then Firecracker's
//!   HTTP API on its Unix socket. Tested against [`firecracker::double`], a
//!   test double of the jailer+firecracker process that checks every request against
//!   Firecracker's published API spec.
//! - [`qemu`]: `qemu-system-x86_64 -M microvm` (KVM when usable, TCG otherwise), virtio
//!   block and net devices, the agent on a virtio-serial port behind a per-VM proxy
//!   (`bangerd --internal-agent-proxy`, which exposes the same hybrid vsock Unix socket as
//!   Firecracker), controlled through QMP.
//!
//! Which of the two a new VM gets is [`choose`]'s rule (`default_vmm = "auto"`: Firecracker
//! where it can run jailed on real KVM, else QEMU with KVM, else QEMU under TCG), resolved
//! once, at VM create; the record keeps the concrete VMM.
//!
//! Both spawn the VMM in its own process group with the serial console appended to the
//! VM's `console.log`, so a VM outlives a daemon restart (`kill -9` included) and keeps
//! logging; the daemon re-adopts it by pid + start time.

pub mod choose;
pub mod firecracker;
pub mod qemu;

use std::path::PathBuf;

use banger_api::{VmSpec, VmmKind};

use crate::vm::model::Runtime;

/// Everything a driver needs to launch one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    pub id: String,
    pub spec: VmSpec,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: PathBuf,
    pub overlay: PathBuf,
    pub work: PathBuf,
    pub cmdline: String,
    pub console: PathBuf,
    /// Emptied before launch; sockets and logs of the VMM processes.
    pub run_dir: PathBuf,
    /// Tap device and guest MAC, when the VM has a network.
    pub tap: Option<(String, String)>,
    /// The uid a jailed Firecracker runs as (the VM record's); None for QEMU.
    pub uid: Option<u32>,
    /// The saved state a restore loads is another VM's (a fork's): its NIC's tap is this
    /// VM's under another name (Firecracker: `network_overrides` on the load; QEMU opens
    /// the tap its device line names anyway).
    pub clone: bool,
}

/// Driver settings, resolved from config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmConfig {
    pub firecracker: firecracker::FirecrackerConfig,
    pub qemu: qemu::QemuConfig,
}

/// Errors of the drivers.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot run {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} exited during start-up: {detail}")]
    Died { what: String, detail: String },
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("firecracker refused {method} {path}: {status} {fault}")]
    Api {
        method: String,
        path: String,
        status: u16,
        fault: String,
    },
    #[error("talking to {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("{0}")]
    Setup(String),
}

/// The console lines of a Linux kernel that has powered off or halted (`kernel/reboot.c`:
/// `kernel_power_off` and `kernel_halt` print them at KERN_EMERG, so `quiet` keeps them):
/// the guest is gone, whether or not its VMM process is.
pub const GUEST_HALTED: [&str; 2] = ["reboot: Power down", "reboot: System halted"];

/// The driver of one VMM kind.
#[derive(Debug, Clone)]
pub enum Driver {
    Firecracker(firecracker::FirecrackerConfig),
    Qemu(qemu::QemuConfig),
}

/// What says a VMM binary is the file it was: its path on PATH, device, inode, length and
/// change time. None when it cannot be found (then it is asked every time).
fn version_stamp(bin: &std::path::Path) -> Option<(std::path::PathBuf, u64, u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let path = if bin.components().count() > 1 {
        bin.to_owned()
    } else {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())?
    };
    let m = std::fs::metadata(&path).ok()?;
    Some((path, m.dev(), m.ino(), m.len(), m.ctime(), m.ctime_nsec()))
}

type VersionCache = std::collections::HashMap<
    std::path::PathBuf,
    ((std::path::PathBuf, u64, u64, u64, i64, i64), String),
>;

fn versions() -> &'static std::sync::Mutex<VersionCache> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<VersionCache>> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

impl Driver {
    pub fn new(kind: VmmKind, config: &VmmConfig) -> Driver {
        match kind {
            VmmKind::Firecracker => Driver::Firecracker(config.firecracker.clone()),
            VmmKind::Qemu => Driver::Qemu(config.qemu.clone()),
        }
    }

    /// Launch and configure the VMM, and start the guest. `stage` is told each step,
    /// `spawned` the VMM's (pid, start time) as soon as the process exists. `host` starts
    /// the jailer through the privileged helper when there is one. A failed launch
    /// returns once its process is gone.
    pub async fn launch(
        &self,
        plan: &LaunchPlan,
        host: &crate::net::host::HostNet,
        stage: &(dyn Fn(&str) + Send + Sync),
        spawned: &(dyn Fn(i32, u64) + Send + Sync),
    ) -> Result<Runtime, VmmError> {
        match self {
            Driver::Firecracker(c) => firecracker::launch_with(c, plan, host, stage, spawned).await,
            Driver::Qemu(c) => qemu::launch_with(c, plan, stage, spawned).await,
        }
    }

    /// Save the running VM's memory and device state into `dir` (an empty directory the
    /// caller made, on the VM's filesystem), leaving its vCPUs stopped: the caller then
    /// ends the VMM (`vm suspend`) or [`Self::resume`]s it (a failed save; a snapshot).
    /// `run_dir`: the VM's run directory (Firecracker's save files are made there at
    /// launch, see [`firecracker::save_state`]). `run_on`: the VMM goes on running after
    /// the save (a snapshot), so what it saved into must stay its own.
    pub async fn save_state(
        &self,
        rt: &Runtime,
        run_dir: &std::path::Path,
        dir: &std::path::Path,
        run_on: bool,
    ) -> Result<(), VmmError> {
        match self {
            Driver::Firecracker(_) => firecracker::save_state(rt, run_dir, dir, run_on).await,
            Driver::Qemu(_) => qemu::save_state(rt, dir).await,
        }
    }

    /// The first line of the VMM's `--version` (`QEMU emulator version 10.0.2 (…)`,
    /// `Firecracker v1.13.1`): a snapshot records it and restores only under the same.
    pub async fn version(&self) -> Result<String, VmmError> {
        let bin = match self {
            Driver::Firecracker(c) => c.firecracker.clone(),
            Driver::Qemu(c) => c.qemu.clone(),
        };
        // Asked on every create that a warm snapshot could serve: remembered per binary
        // file, as long as it is the same file (an upgrade replaces it).
        let stamp = version_stamp(&bin);
        if let Some(stamp) = &stamp
            && let Some((s, v)) = versions().lock().expect("version cache").get(&bin)
            && s == stamp
        {
            return Ok(v.clone());
        }
        let line = Self::ask_version(&bin).await?;
        if let Some(stamp) = stamp {
            versions()
                .lock()
                .expect("version cache")
                .insert(bin, (stamp, line.clone()));
        }
        Ok(line)
    }

    async fn ask_version(bin: &std::path::Path) -> Result<String, VmmError> {
        let out = tokio::process::Command::new(bin)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| VmmError::Io {
                what: format!("{} --version", bin.display()),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().map(str::trim).find(|l| !l.is_empty()) {
            Some(line) if out.status.success() => Ok(line.to_owned()),
            _ => Err(VmmError::Setup(format!(
                "{} --version said nothing ({}): {}",
                bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }

    /// Launch the VMM for `plan` (the same VM, disks and devices as when it was saved) from
    /// the state [`Self::save_state`] wrote into `dir`, instead of booting: the guest runs
    /// on where it was. `dir` is left as it is (the caller decides what to keep).
    pub async fn launch_restored(
        &self,
        plan: &LaunchPlan,
        dir: &std::path::Path,
        host: &crate::net::host::HostNet,
        stage: &(dyn Fn(&str) + Send + Sync),
        spawned: &(dyn Fn(i32, u64) + Send + Sync),
    ) -> Result<Runtime, VmmError> {
        match self {
            Driver::Firecracker(c) => {
                firecracker::launch_restored(c, plan, dir, host, stage, spawned).await
            }
            Driver::Qemu(c) => qemu::launch_restored(c, plan, dir, stage, spawned).await,
        }
    }

    /// Ask the guest to shut down (Ctrl-Alt-Del); the caller waits and kills on timeout.
    /// Whether the VMM process ends when its guest powers off or halts. QEMU's does (ACPI
    /// power-off). Firecracker's does not: it has no power-management device, and a guest
    /// that powers off halts its vCPUs while the process "lives on" (Firecracker's
    /// `FAQ.md`); only a guest reboot (`reboot=k`) ends it. So a Firecracker VM is stopped
    /// by asking its guest to reboot, and a guest that halted by itself is ended by the VM
    /// actor once the kernel says so on the console (see [`GUEST_HALTED`]).
    pub fn guest_halt_ends_vmm(&self) -> bool {
        match self {
            Driver::Firecracker(_) => false,
            Driver::Qemu(_) => true,
        }
    }

    pub async fn request_shutdown(&self, rt: &Runtime) -> Result<(), VmmError> {
        match self {
            Driver::Firecracker(_) => firecracker::request_shutdown(rt).await,
            Driver::Qemu(_) => qemu::request_shutdown(rt).await,
        }
    }

    /// What a re-adopted VM needs restarted beside its VMM: QEMU's agent proxy when it is
    /// gone. Ok(true) when `rt` changed (to be persisted).
    pub async fn readopt(&self, rt: &mut Runtime) -> Result<bool, VmmError> {
        match self {
            Driver::Firecracker(_) => Ok(false),
            Driver::Qemu(c) => qemu::ensure_proxy(c, rt).await,
        }
    }

    /// Release what the VMM leaves behind once it is gone: helper processes, sockets, jail.
    pub fn cleanup(&self, id: &str, rt: Option<&Runtime>, run_dir: &std::path::Path) {
        if let Some(rt) = rt {
            for (pid, start) in &rt.helpers {
                crate::vm::proc::signal(*pid, *start, nix::sys::signal::Signal::SIGKILL);
            }
        }
        if let Driver::Firecracker(c) = self {
            firecracker::cleanup(c, id);
        }
        if let Ok(entries) = std::fs::read_dir(run_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// How long a pause, resume or state query may take before the VMM counts as hung.
const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

// Pause and resume: the vCPUs frozen in memory, the process and its devices kept.
impl Driver {
    /// Freeze the guest's vCPUs (QMP `stop`; Firecracker `PATCH /vm {"state":"Paused"}`).
    /// Both are idempotent: pausing a paused VM succeeds.
    pub async fn pause(&self, rt: &Runtime) -> Result<(), VmmError> {
        let work = async {
            match self {
                Driver::Firecracker(_) => firecracker::set_paused(rt, true).await,
                Driver::Qemu(_) => qemu::set_paused(rt, true).await,
            }
        };
        bounded("pausing the vm", work).await
    }

    /// Let the vCPUs run again (QMP `cont`; Firecracker `PATCH /vm {"state":"Resumed"}`).
    pub async fn resume(&self, rt: &Runtime) -> Result<(), VmmError> {
        let work = async {
            match self {
                Driver::Firecracker(_) => firecracker::set_paused(rt, false).await,
                Driver::Qemu(_) => qemu::set_paused(rt, false).await,
            }
        };
        bounded("resuming the vm", work).await
    }

    /// Whether the VMM has the guest paused, as the VMM itself says (QMP `query-status`
    /// "paused"; Firecracker `GET /` state "Paused"): a re-adopted VM takes its state
    /// from here, not from the record.
    pub async fn is_paused(&self, rt: &Runtime) -> Result<bool, VmmError> {
        let work = async {
            match self {
                Driver::Firecracker(_) => firecracker::is_paused(rt).await,
                Driver::Qemu(_) => qemu::is_paused(rt).await,
            }
        };
        bounded("asking the vmm whether it is paused", work).await
    }
}

async fn bounded<T>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, VmmError>>,
) -> Result<T, VmmError> {
    tokio::time::timeout(PAUSE_TIMEOUT, work)
        .await
        .map_err(|_| VmmError::Timeout(format!("{what} (the vmm did not answer)")))?
}

/// Poll until `path` exists, `alive` stays true, up to `timeout`.
pub(crate) async fn wait_for_path(
    path: &std::path::Path,
    what: &str,
    timeout: std::time::Duration,
    alive: impl Fn() -> bool,
    died_detail: impl Fn() -> String,
) -> Result<(), VmmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if path.exists() {
            return Ok(());
        }
        if !alive() {
            return Err(VmmError::Died {
                what: what.into(),
                detail: died_detail(),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(VmmError::Timeout(format!("{what} ({})", path.display())));
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Run `connect` until it stops failing with "connection refused": a server's socket path
/// appears at bind(2), a moment before listen(2), and a connect in between is refused.
/// Gives up when `alive` turns false or after `timeout`.
pub(crate) async fn connect_when_listening<T, F, Fut>(
    timeout: std::time::Duration,
    alive: impl Fn() -> bool,
    mut connect: F,
) -> Result<T, VmmError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, VmmError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match connect().await {
            Err(VmmError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused
                    && alive()
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            other => return other,
        }
    }
}

/// The last lines of a log file, for error messages.
pub(crate) fn tail(path: &std::path::Path, lines: usize) -> String {
    tail_since(path, 0, lines)
}

/// The last non-empty lines (trimmed) of what a log file holds from byte `from` on (what
/// one launch wrote to a log that outlives it), joined by ` | `; empty if none.
pub(crate) fn tail_since(path: &std::path::Path, from: u64, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(SeekFrom::Start(from)).is_ok()
    {
        let _ = f.read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn connect(path: &std::path::Path) -> Result<tokio::net::UnixStream, VmmError> {
        tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| VmmError::Io {
                what: "test".into(),
                source,
            })
    }

    #[tokio::test]
    async fn a_socket_that_is_not_listening_yet_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        // A socket path nobody listens on: connects are refused, as between bind and listen.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let later = path.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::fs::remove_file(&later).unwrap();
            let l = tokio::net::UnixListener::bind(&later).unwrap();
            l.accept().await.unwrap();
        });
        connect_when_listening(Duration::from_secs(5), || true, || connect(&path))
            .await
            .expect("connected once it listened");
        server.await.unwrap();

        // While the process is gone, a refusal is final.
        let gone = dir.path().join("gone.sock");
        drop(std::os::unix::net::UnixListener::bind(&gone).unwrap());
        let err = connect_when_listening(Duration::from_secs(5), || false, || connect(&gone))
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::Io { .. }));
    }
}
