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

use std::future::Future;
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

/// Where the guest binaries are: the config's directory, else beside this executable when
/// they are there, else `/usr/lib/banger`.
fn guest_binaries_dir(config: &Config) -> std::path::PathBuf {
    if let Some(d) = &config.images.guest_binaries_dir {
        return d.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_owned()))
        .filter(|d| d.join("banger-init").is_file())
        .unwrap_or_else(|| "/usr/lib/banger".into())
}

/// banger's ssh key: the config's `ssh_key_path`, else `<data_dir>/ssh/id_ed25519`.
pub fn ssh_key_path(settings: &Settings) -> std::path::PathBuf {
    settings
        .config
        .ssh_key_path
        .clone()
        .unwrap_or_else(|| settings.paths.data_dir.join("ssh/id_ed25519"))
}

/// The VM side of the tree, from config and host.
fn vm_config(settings: &Settings) -> Result<banger_actors::root::VmConfig, config::ConfigError> {
    use banger_actors::vm::spec::Host;
    use banger_actors::vm_supervisor::VmSettings;
    use banger_actors::vmm::{VmmConfig, firecracker::FirecrackerConfig, qemu};
    let c = &settings.config;
    let accel = match c.qemu.accel.as_str() {
        "kvm" => qemu::Accel::Kvm,
        "tcg" => qemu::Accel::Tcg,
        _ => qemu::Accel::Auto,
    };
    let catalogs = std::sync::Arc::new(c.catalogs()?);
    Ok(banger_actors::root::VmConfig {
        data_dir: settings.paths.data_dir.clone(),
        vmm: VmmConfig {
            firecracker: FirecrackerConfig {
                jailer: c.firecracker.jailer.clone(),
                firecracker: c.firecracker.binary.clone(),
                chroot_base: settings.paths.data_dir.join("jail"),
                uid: c
                    .firecracker
                    .uid
                    .unwrap_or_else(|| nix::unistd::geteuid().as_raw()),
                gid: c
                    .firecracker
                    .gid
                    .unwrap_or_else(|| nix::unistd::getegid().as_raw()),
            },
            qemu: qemu::QemuConfig {
                qemu: c.qemu.binary.clone(),
                vhost_vsock: c.qemu.vhost_vsock.clone(),
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
            default_vmm: c
                .default_vmm
                .parse()
                .unwrap_or(banger_api::VmmKind::Firecracker),
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
        let lock = InstanceLock::acquire(&settings.paths.lock_file())?;
        let store_path = settings.paths.store_file();
        let store = tokio::task::spawn_blocking(move || Store::open(&store_path))
            .await
            .expect("store open does not panic")?;
        for w in settings.config.warnings() {
            tracing::warn!("{w}");
        }
        let mut vm = vm_config(&settings)?;
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
