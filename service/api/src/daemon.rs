//! The `daemon.*` namespace: liveness, status and shutdown of bangerd itself.

use serde::{Deserialize, Serialize};

/// Answer to `daemon.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pong {
    /// The daemon's version (`CARGO_PKG_VERSION` of bangerd).
    pub version: String,
}

/// How the daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DaemonMode {
    /// Started by a user (or by the CLI on first use), with XDG paths.
    User,
    /// Started by systemd as the system service, with `/var/lib/banger` and `/run/banger`.
    System,
}

/// Answer to `daemon.status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub commit: String,
    pub build_time: String,
    pub mode: DaemonMode,
    /// The Unix socket the daemon listens on.
    pub socket: String,
    /// The structured (JSON lines) log file.
    pub log_path: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// When the daemon started, as seconds since the Unix epoch.
    pub started_at: u64,
    pub store: StoreStatus,
    /// Where the `.vm` resolver listens (None: disabled, or its port was taken).
    #[serde(default)]
    pub dns: Option<String>,
    /// banger's ssh private key (`.pub` beside it); made when the first VM needs it.
    #[serde(default)]
    pub ssh_key: Option<String>,
    /// The privileged helper's confinement (None: bangerd was not started as root).
    #[serde(default)]
    pub helper: Option<HelperStatus>,
    /// The VM network's settings.
    #[serde(default)]
    pub network: Option<NetworkStatus>,
    /// How Firecracker VMs run on this host, as the daemon sees it.
    #[serde(default)]
    pub firecracker: Option<FirecrackerStatus>,
}

/// How Firecracker VMs run: jailed (through the helper) or not, the cgroup each gets, and
/// whether the jail base can hold the device nodes the jailer makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerStatus {
    /// Whether the privileged helper starts the jailer (else Firecracker runs unjailed).
    pub jailed: bool,
    /// What `vm show` says of a Firecracker VM started now.
    pub isolation: String,
    /// The host's cgroup layout as the jailer would find it, and what a jailed VM gets.
    pub cgroups: String,
    /// Where jails are made.
    pub jail_base: String,
    /// Why device nodes cannot work there (a `nodev` mount), with what to do.
    #[serde(default)]
    pub nodev: Option<String>,
}

/// The confinement the privileged helper reported, as the kernel showed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperStatus {
    pub uid: u32,
    /// 2 = a seccomp filter is installed.
    pub seccomp_mode: u32,
    pub no_new_privs: bool,
    pub caps_effective: Vec<String>,
    /// `fully enforced`, `partially enforced` or `not enforced`.
    pub landlock: String,
}

/// The VM network as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub bridge: String,
    pub subnet: String,
    /// Where guests' DNS is answered (the bridge address, port 53), when it is.
    #[serde(default)]
    pub guest_dns: Option<String>,
}

/// The daemon's store, as reported by `daemon.status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub path: String,
    /// Schema version of the database file.
    pub schema_version: u32,
    /// Random id written when the store was created; stable across restarts.
    pub instance_id: String,
    /// How many times a daemon has started on this store.
    pub starts: u64,
}

/// Answer to `daemon.stop`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopAck {
    pub pid: u32,
}

#[cfg(any(feature = "server", feature = "client"))]
mod rpc {
    use super::{DaemonStatus, Pong, StopAck};

    #[cfg_attr(
        all(feature = "server", feature = "client"),
        jsonrpsee::proc_macros::rpc(
            server,
            client,
            namespace = "daemon",
            namespace_separator = "."
        )
    )]
    #[cfg_attr(
        all(feature = "server", not(feature = "client")),
        jsonrpsee::proc_macros::rpc(server, namespace = "daemon", namespace_separator = ".")
    )]
    #[cfg_attr(
        all(feature = "client", not(feature = "server")),
        jsonrpsee::proc_macros::rpc(client, namespace = "daemon", namespace_separator = ".")
    )]
    pub trait DaemonRpc {
        /// Liveness check; answers with the daemon's version.
        #[method(name = "ping")]
        async fn ping(&self) -> jsonrpsee::core::RpcResult<Pong>;

        /// Pid, version, socket, log path, uptime and store of the running daemon.
        #[method(name = "status")]
        async fn status(&self) -> jsonrpsee::core::RpcResult<DaemonStatus>;

        /// Ask the daemon to shut down gracefully: in-flight requests finish, the socket
        /// file is removed. Answers before the daemon exits.
        #[method(name = "stop")]
        async fn stop(&self) -> jsonrpsee::core::RpcResult<StopAck>;
    }
}

#[cfg(feature = "client")]
pub use rpc::DaemonRpcClient;
#[cfg(feature = "server")]
pub use rpc::DaemonRpcServer;
