//! bangerd: the banger daemon.
//!
//! [`Daemon::start`] takes the instance lock, opens (and migrates) the store and starts the
//! supervision tree; [`Daemon::serve`] serves JSON-RPC on an injected listener until an
//! injected shutdown future completes (or `daemon.stop` is called), then drains and stops
//! the tree. `main.rs` only parses arguments, loads config, starts tracing and wires
//! signals to the shutdown future, so tests run a real daemon on a socket in a tempdir.

pub mod auth;
pub mod config;
pub mod lock;
pub mod logging;
pub mod paths;
pub mod privilege;
pub mod rpc;
pub mod server;
pub mod tools;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UnixListener;
use tokio::sync::Notify;

use banger_actors::{Store, StoreError, Tree, TreeError};

use crate::auth::Access;
use crate::config::Config;
use crate::lock::{InstanceLock, LockError};
use crate::paths::{Paths, PathsError};

/// The daemon's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit it was built from.
pub const COMMIT: &str = env!("BANGER_COMMIT");
/// When it was built (RFC 3339, UTC).
pub const BUILD_TIME: &str = env!("BANGER_BUILD_TIME");
/// The image of VMs created without `--image` when the config names none
/// (`default_image_name`): the catalog's lean recipe, built locally on first use.
pub const DEFAULT_IMAGE: &str = "debian-bookworm";

/// Errors starting or running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Paths(#[from] PathsError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("the supervision tree stopped unexpectedly")]
    TreeStopped,
}

/// Everything [`Daemon::start`] needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub paths: Paths,
    pub access: Access,
}

impl Settings {
    /// Settings for a daemon owned by the current user.
    pub fn new(config: Config, paths: Paths) -> Settings {
        let access = Access::new(nix::unistd::geteuid().as_raw(), &config.socket_group);
        Settings {
            config,
            paths,
            access,
        }
    }
}

/// Where the guest binaries (`banger-init`, `banger-agent`) are taken from, in order:
///
/// 1. `[images] guest_binaries_dir` when set — as given: the user named it, so wrong files
///    there are an error when an image needs them, never skipped;
/// 2. beside the bangerd executable;
/// 3. `<bangerd's dir>/../lib/banger` (where `scripts/install.sh` puts them beside
///    `<prefix>/bin/bangerd`);
/// 4. `/usr/lib/banger`.
///
/// Guest binaries must be static (see `banger_actors::pull::guest`). A location of 2–3
/// that holds `banger-init` but not two static binaries is skipped with a warning in the
/// log, and the lookup goes on: a plain `cargo build` leaves dynamically linked ones beside
/// bangerd, and a user who installed the static ones elsewhere expects those to be used
/// rather than an error. When no location has them, the last one is used, so the error a
/// pull then reports names it and says how to get static ones.
fn guest_binaries_dir(config: &Config) -> PathBuf {
    let exe = std::env::current_exe().ok();
    find_guest_binaries(config, exe.as_deref(), Path::new(SYSTEM_GUEST_DIR))
}

/// The system-wide guest binaries directory.
pub const SYSTEM_GUEST_DIR: &str = "/usr/lib/banger";

/// [`guest_binaries_dir`] for an executable at `exe` and a system directory `system`.
fn find_guest_binaries(config: &Config, exe: Option<&Path>, system: &Path) -> PathBuf {
    use banger_actors::pull::guest;
    if let Some(d) = &config.images.guest_binaries_dir {
        return d.clone();
    }
    let beside = exe.and_then(Path::parent);
    let candidates = beside
        .map(|d| vec![d.to_owned(), d.join("../lib/banger")])
        .unwrap_or_default();
    for dir in candidates {
        if !dir.join(guest::NAMES[0]).exists() {
            continue;
        }
        match guest::check_dir(&dir) {
            Ok(()) => return dir,
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                "skipping these guest binaries: {e}"
            ),
        }
    }
    system.to_owned()
}

/// banger's ssh key: the config's `ssh_key_path`, else `<data_dir>/ssh/id_ed25519`.
pub fn ssh_key_path(settings: &Settings) -> PathBuf {
    settings
        .config
        .ssh_key_path
        .clone()
        .unwrap_or_else(|| settings.paths.data_dir.join("ssh/id_ed25519"))
}

/// The VM side of the tree, from config and host. `jailing`: whether the privileged
/// helper can start Firecracker's jailer (what `default_vmm = "auto"` needs).
fn vm_config(
    settings: &Settings,
    jailing: banger_actors::vmm::choose::Jailing,
) -> Result<banger_actors::root::VmConfig, config::ConfigError> {
    use banger_actors::vm::spec::Host;
    use banger_actors::vm_supervisor::VmSettings;
    use banger_actors::vmm::{VmmConfig, firecracker::FirecrackerConfig, qemu};
    let c = &settings.config;
    let accel = c.qemu_accel();
    let catalogs = std::sync::Arc::new(c.catalogs()?);
    Ok(banger_actors::root::VmConfig {
        data_dir: settings.paths.data_dir.clone(),
        vmm: VmmConfig {
            firecracker: FirecrackerConfig {
                jailer: c.firecracker.jailer.clone(),
                firecracker: c.firecracker.binary.clone(),
                chroot_base: settings.paths.data_dir.join("jail"),
                vm_uids: c.firecracker.vm_uids(),
                socket_gid: nix::unistd::Group::from_name(&c.socket_group)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw()),
            },
            qemu: qemu::QemuConfig {
                qemu: c.qemu.binary.clone(),
                // The agent proxy is this very binary (see banger_guest::mux).
                agent_proxy: std::env::current_exe().unwrap_or_else(|_| "bangerd".into()),
                accel,
            },
        },
        stop_timeout: Duration::from_secs(c.stop_timeout_secs),
        extra_cmdline: c.kernel_cmdline_extra.clone(),
        tsc_khz: qemu::host_tsc_khz(),
        agent_timeout: Duration::from_secs(c.agent_timeout_secs),
        ssh_key: Some(ssh_key_path(settings)),
        file_sync: c
            .file_sync
            .iter()
            .filter_map(|f| {
                Some(banger_actors::vm::sshkey::FileSync {
                    host: f.host.clone(),
                    guest: f.guest_relative()?.to_owned(),
                    mode: f.mode,
                })
            })
            .collect(),
        dns_listen: c.dns_listen.parse().ok(),
        guest_dns: None,
        settings: VmSettings {
            defaults: c.vm_spec_defaults(),
            host: Host::detect(),
            default_vmm: c.vmm_choice(),
            vmm_probe: std::sync::Arc::new(banger_actors::vmm::choose::RealProbe {
                firecracker: c.firecracker.binary.clone(),
                jailer: c.firecracker.jailer.clone(),
                jailing,
            }),
            // Unset: the catalog's lean recipe image, built on first use; `""` means none.
            default_image: match c.default_image_name.as_deref() {
                None => Some(DEFAULT_IMAGE.to_owned()),
                Some("") => None,
                Some(name) => Some(name.to_owned()),
            },
            subnet: c
                .network
                .subnet
                .parse()
                .expect("validated when the config was loaded"),
            network: c.vm_defaults.network.unwrap_or(true),
            max_fork_count: c
                .vm_defaults
                .max_fork_count
                .unwrap_or(banger_actors::vm::fork::MAX_FORK_COUNT),
            auto_warm: c.vm_defaults.auto_warm.unwrap_or(false),
            adopt_permits: std::sync::Arc::new(tokio::sync::Semaphore::new(
                banger_actors::vm_supervisor::ADOPT_CONCURRENCY,
            )),
        },
        pull: banger_actors::pull::PullConfig {
            data_dir: settings.paths.data_dir.clone(),
            cache_dir: settings.paths.cache_dir.clone(),
            catalogs,
            insecure_registries: c.images.insecure_registries.clone(),
            guest_binaries_dir: guest_binaries_dir(c),
            mirror: c.images.mirror.clone(),
        },
    })
}

/// What bangerd prepares as root before it drops privileges.
#[derive(Debug, Default)]
pub struct Privileged {
    /// The confined helper (see [`privilege`]).
    pub helper: Option<banger_policy::Helper>,
    /// The guests' resolver socket on the bridge address, port 53.
    pub guest_dns: Option<banger_actors::net::dns::GuestDns>,
    /// Whether the helper was given Firecracker's jailer (it and firecracker were found
    /// when it started): only then can Firecracker VMs run jailed.
    pub helper_jails: bool,
}

/// A started daemon: lock held, store open, tree running.
#[derive(Debug)]
pub struct Daemon {
    settings: Settings,
    ctx: Arc<rpc::Ctx>,
    tree_join: tokio::task::JoinHandle<()>,
    _lock: InstanceLock,
}

impl Daemon {
    /// Take the lock, open the store, start the tree (without a privileged helper).
    pub async fn start(settings: Settings) -> Result<Daemon, ServiceError> {
        Self::start_with(settings, Privileged::default()).await
    }

    /// As [`Daemon::start`], with what bangerd set up as root before dropping privileges.
    pub async fn start_with(
        settings: Settings,
        privileged: Privileged,
    ) -> Result<Daemon, ServiceError> {
        settings.paths.create_dirs()?;
        // Blocking: it may wait for a dying predecessor's lock (lock.rs).
        let lock_file = settings.paths.lock_file();
        let lock = tokio::task::spawn_blocking(move || InstanceLock::acquire(&lock_file))
            .await
            .expect("lock acquire does not panic")?;
        let store_path = settings.paths.store_file();
        let store = tokio::task::spawn_blocking(move || Store::open(&store_path))
            .await
            .expect("store open does not panic")?;
        for w in settings.config.warnings() {
            tracing::warn!("{w}");
        }
        use banger_actors::vmm::choose::Jailing;
        let jailing = match (&privileged.helper, privileged.helper_jails) {
            (None, _) => Jailing::NoHelper,
            (Some(_), false) => Jailing::HelperWithoutJailer,
            (Some(_), true) => Jailing::Ready,
        };
        let mut vm = vm_config(&settings, jailing)?;
        let network = banger_api::NetworkStatus {
            bridge: settings.config.network.bridge.clone(),
            subnet: settings.config.network.subnet.clone(),
            guest_dns: privileged
                .guest_dns
                .as_ref()
                .and_then(|g| g.socket.local_addr().ok())
                .map(|a| a.to_string()),
        };
        vm.guest_dns = privileged.guest_dns;
        let (tree, tree_join) = Tree::start(store, vm, privileged.helper).await?;
        let starts = tree.record_start().await?;
        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        tracing::info!(
            version = VERSION,
            commit = COMMIT,
            pid = std::process::id(),
            starts,
            data_dir = %settings.paths.data_dir.display(),
            "bangerd started"
        );
        let ctx = Arc::new(rpc::Ctx {
            tree,
            paths: settings.paths.clone(),
            ssh_key: ssh_key_path(&settings),
            started: Instant::now(),
            started_at,
            stop: Arc::new(Notify::new()),
            network,
            jailing,
        });
        Ok(Daemon {
            settings,
            ctx,
            tree_join,
            _lock: lock,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Serve on `listener` until `shutdown` completes, `daemon.stop` is called, or the
    /// tree stops; then drain connections and stop the tree.
    pub async fn serve(
        mut self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServiceError> {
        let methods = rpc::methods(Arc::clone(&self.ctx));
        let stop = Arc::clone(&self.ctx.stop);
        let mut tree_died = false;
        {
            let tree_join = &mut self.tree_join;
            let trigger = async {
                tokio::select! {
                    () = shutdown => {}
                    () = stop.notified() => {}
                    _ = tree_join => { tree_died = true; }
                }
            };
            server::serve(
                listener,
                methods,
                rpc::NO_PARAMS,
                self.settings.access.clone(),
                trigger,
            )
            .await;
        }
        tracing::info!("shutting down");
        self.ctx.tree.stop();
        if !tree_died {
            let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.tree_join).await;
        }
        if tree_died {
            return Err(ServiceError::TreeStopped);
        }
        Ok(())
    }
}

/// `bangerd --internal-agent-proxy <serial socket> <vsock socket>`: a QEMU VM's agent
/// proxy (see [`banger_guest::mux`]), spawned by the QEMU driver in its own process group
/// so it outlives a daemon restart, as QEMU does. One thread: it carries a few streams.
/// Exits when QEMU is gone; its stderr is the VM's `run/agent-proxy.log`.
#[allow(clippy::print_stderr)]
pub fn agent_proxy(serial: &std::path::Path, listen: &std::path::Path) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bangerd agent proxy: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(banger_guest::mux::host::main(serial, listen)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "bangerd agent proxy ({} to {}): {e}",
                listen.display(),
                serial.display()
            );
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `<root>/bin/bangerd` with the guest binaries `beside` it (copies of `beside_from`)
    /// and in `<root>/lib/banger` (copies of `lib_from`), when given.
    fn layout(beside_from: Option<&str>, lib_from: Option<&str>) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        let lib = root.path().join("lib/banger");
        for (dir, from) in [(&bin, beside_from), (&lib, lib_from)] {
            std::fs::create_dir_all(dir).unwrap();
            if let Some(from) = from {
                for n in banger_actors::pull::guest::NAMES {
                    std::fs::copy(from, dir.join(n)).unwrap();
                }
            }
        }
        let exe = bin.join("bangerd");
        (root, exe)
    }

    // /bin/busybox is static (busybox-static, a rig dependency), /bin/true dynamic.
    const STATIC: &str = "/bin/busybox";
    const DYNAMIC: &str = "/bin/true";

    #[test]
    fn static_guest_binaries_beside_bangerd_are_used() {
        let (root, exe) = layout(Some(STATIC), Some(STATIC));
        let system = root.path().join("system");
        let got = find_guest_binaries(&Config::default(), Some(&exe), &system);
        assert_eq!(got, exe.parent().unwrap());
    }

    #[test]
    fn dynamic_guest_binaries_beside_bangerd_are_skipped_for_the_installed_ones() {
        // What `cargo build --release` leaves, with install.sh's static ones in ../lib/banger.
        let (root, exe) = layout(Some(DYNAMIC), Some(STATIC));
        let system = root.path().join("system");
        let got = find_guest_binaries(&Config::default(), Some(&exe), &system);
        assert_eq!(got, exe.parent().unwrap().join("../lib/banger"));
        // Nothing static anywhere: the system directory, whose error a pull then reports.
        let (root, exe) = layout(Some(DYNAMIC), None);
        let system = root.path().join("system");
        assert_eq!(
            find_guest_binaries(&Config::default(), Some(&exe), &system),
            system
        );
    }

    #[test]
    fn a_configured_guest_binaries_dir_is_taken_as_given() {
        let (root, exe) = layout(Some(STATIC), None);
        let mut config = Config::default();
        let mine = root.path().join("mine");
        config.images.guest_binaries_dir = Some(mine.clone());
        assert_eq!(
            find_guest_binaries(&config, Some(&exe), Path::new("/nonexistent")),
            mine
        );
    }
}
