//! The `vm.*` namespace: the lifecycle of VMs.

use serde::{Deserialize, Serialize};

/// What the guest agent reports (types of the host↔agent protocol).
pub use banger_guest::proto::{GuestStats, Port};

/// Where a VM is in its life. Persisted; see `banger_actors::vm::state` for the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Disks made, never started.
    Created,
    /// The VMM is being launched and configured, the guest is booting.
    Starting,
    Running,
    /// Its vCPUs are frozen in memory (`vm pause`): the VMM process lives, the guest does
    /// not run, so its agent does not answer until `vm resume`.
    Paused,
    /// Asked to shut down; waiting for the guest to exit.
    Stopping,
    Stopped,
    /// Start failed or the VMM died unexpectedly; `error` says why.
    Error,
    /// Saved to disk (`vm suspend`): memory and device state in the VM's directory, no
    /// VMM process; `vm start` restores it where it was.
    Suspended,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
            VmState::Suspended => "suspended",
        }
    }
}

/// Why the guest of a paused VM cannot be reached (`vm exec`, ssh, cp, ports…), with
/// the way out.
pub fn paused_refusal(vm: &str) -> String {
    format!("vm {vm} is paused; `banger vm resume {vm}`")
}

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// Firecracker under the jailer (the default).
    Firecracker,
    /// QEMU `-M microvm` (KVM when it works, TCG otherwise), for hosts without Firecracker.
    Qemu,
}

impl VmmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Firecracker => "firecracker",
            VmmKind::Qemu => "qemu",
        }
    }
}

impl std::str::FromStr for VmmKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "firecracker" | "fc" => Ok(VmmKind::Firecracker),
            "qemu" => Ok(VmmKind::Qemu),
            other => Err(format!("unknown vmm {other:?} (use firecracker or qemu)")),
        }
    }
}

/// Which VMM a VM should get, as asked (`--vmm`, `default_vmm`): a concrete one, or
/// `auto`, which the daemon resolves for its host when the VM is created (the VM's record
/// stores the [`VmmKind`] chosen, so a VM never changes VMM afterwards). Serialised like
/// [`VmmKind`] plus `"auto"`, so a request naming a concrete VMM reads the same as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmChoice {
    /// Firecracker when it, its jailer, KVM for stock guests and the privileged helper are
    /// all there; else QEMU with KVM; else QEMU under TCG (emulated, slow).
    #[default]
    Auto,
    Firecracker,
    Qemu,
}

impl VmmChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            VmmChoice::Auto => "auto",
            VmmChoice::Firecracker => "firecracker",
            VmmChoice::Qemu => "qemu",
        }
    }

    /// The concrete VMM asked for, if one was.
    pub fn kind(self) -> Option<VmmKind> {
        match self {
            VmmChoice::Auto => None,
            VmmChoice::Firecracker => Some(VmmKind::Firecracker),
            VmmChoice::Qemu => Some(VmmKind::Qemu),
        }
    }
}

impl From<VmmKind> for VmmChoice {
    fn from(k: VmmKind) -> VmmChoice {
        match k {
            VmmKind::Firecracker => VmmChoice::Firecracker,
            VmmKind::Qemu => VmmChoice::Qemu,
        }
    }
}

impl std::str::FromStr for VmmChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(VmmChoice::Auto),
            other => other
                .parse::<VmmKind>()
                .map(VmmChoice::from)
                .map_err(|_| format!("unknown vmm {other:?} (use auto, firecracker or qemu)")),
        }
    }
}

/// The size of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vcpu: u32,
    pub memory_mib: u32,
    /// Size of the persistent work disk mounted at /root (sparse on the host).
    pub disk_bytes: u64,
}

/// Where a default came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpecSource {
    /// A command-line flag / request field.
    Flag,
    /// `[vm_defaults]` in the config.
    Config,
    /// Derived from the host (cpus/4 capped at 4, ram/8 capped at 8 GiB).
    Host,
    /// banger's built-in default.
    Builtin,
}

/// The defaults a new VM gets, with where each came from (`vm.defaults`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecDefaults {
    pub spec: VmSpec,
    pub vcpu_from: SpecSource,
    pub memory_from: SpecSource,
    pub disk_from: SpecSource,
    /// The VMM a VM created now gets (`auto` resolved for this host).
    pub vmm: VmmKind,
    /// What was asked for (`default_vmm`), before `auto` was resolved.
    #[serde(default)]
    pub vmm_choice: VmmChoice,
    /// Why that VMM, in a sentence (e.g. "auto: /dev/kvm is PVM ..., so QEMU under TCG").
    #[serde(default)]
    pub vmm_reason: String,
    /// Whether such a VM is emulated (QEMU under TCG): it works, slowly.
    #[serde(default)]
    pub vmm_emulated: bool,
}

/// Request of `vm.fork`: `count` new VMs restored from one snapshot of the running (or
/// paused) `vm`, each its own machine (see `docs/forks.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkVm {
    pub vm: String,
    /// How many clones (default 1; at most `[vm_defaults] max_fork_count`).
    #[serde(default)]
    pub count: Option<u32>,
    /// The clones are `<name>-1` … `<name>-N` (the first free numbers); default the
    /// source's name.
    #[serde(default)]
    pub name: Option<String>,
    /// NAT for the clones (`--nat`); default the source's egress (and isolation).
    #[serde(default)]
    pub nat: bool,
    /// A network for the clones: they restore the source's devices, so it must be what
    /// the source has (the default); anything else is refused.
    #[serde(default)]
    pub network: Option<bool>,
}

/// Request of `vm.create`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Name (`[a-z0-9][a-z0-9-]{0,62}`); generated when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Image name; the config's default image when absent.
    #[serde(default)]
    pub image: Option<String>,
    /// Kernel name; the image's kernel when absent.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub vcpu: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// The VMM (`auto` resolved by the daemon for its host); the config's default_vmm
    /// when absent.
    #[serde(default)]
    pub vmm: Option<VmmChoice>,
    #[serde(default)]
    pub nat: bool,
    /// A network (tap, address, `<vm>.vm`): the daemon's default when absent.
    #[serde(default)]
    pub network: Option<bool>,
    /// Create only, do not start (`vm create --no-start`).
    #[serde(default)]
    pub no_start: bool,
    /// Published ports (`--publish`): host listeners spliced to guest ports, bound while
    /// the VM runs (see [`crate::publish`]). Left out when empty, so such a request reads
    /// as before to an older daemon.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<crate::PortSpec>,
    /// The egress policy (`--egress`, see [`crate::egress`]): `all` when `nat`, else
    /// `subnet`, when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<crate::Egress>,
    /// Cut the VM off from the other VMs on the bridge (`--isolate`); DNS and the host stay.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolate: bool,
    /// A deadline (`--ttl`): the VM is stopped (or deleted) that long after its create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Ttl>,
    /// `<vm>/<snapshot>` (a name or id of one of that VM's snapshots): restore the new VM
    /// from it instead of booting, as a clone of the moment it was taken (see
    /// `docs/forks.md`). Its image, kernel, size and VMM are the snapshot's; only `name`,
    /// `nat` and `network` may be given with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// Boot, even when a warm snapshot of this image, kernel, size and VMM could restore
    /// the VM instead (`--cold`; see [`WarmInfo`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold: bool,
}

/// Request of `image.warm`: make the warm snapshot that `vm create` / `vm run` with these
/// settings restore from (the same defaults as a create's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmImage {
    /// Image name; the config's default image when absent.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub vcpu: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    #[serde(default)]
    pub vmm: Option<VmmChoice>,
    /// For VMs with a network (the daemon's default when absent) or without one: a
    /// restore brings back the devices that were saved, NIC included.
    #[serde(default)]
    pub network: Option<bool>,
}

/// A warm snapshot (`image warm list`): an image booted once, its agent ready, with no
/// network on the bridge and a neutral identity, saved; a `vm create` or `vm run` whose
/// image, kernel, size, VMM (and its release) and network match restores from it and
/// takes its own identity, as a fork's clone does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmInfo {
    /// 12 hex digits, its directory's name.
    pub id: String,
    /// The image and kernel as `<name>@<registered_at>`.
    pub image: String,
    pub kernel: String,
    pub vmm: VmmKind,
    pub vmm_version: String,
    pub spec: VmSpec,
    pub network: bool,
    pub created_at: u64,
    /// Disk space it takes (allocated bytes).
    pub bytes: u64,
    pub dir: String,
}

impl WarmInfo {
    /// The image's name (without its `@registered_at`).
    pub fn image_name(&self) -> &str {
        stamped_name(&self.image)
    }

    pub fn kernel_name(&self) -> &str {
        stamped_name(&self.kernel)
    }
}

/// The name in a `<name>@<registered_at>` stamp (a snapshot's or warm snapshot's image or
/// kernel).
pub fn stamped_name(stamp: &str) -> &str {
    stamp.rsplit_once('@').map_or(stamp, |(n, _)| n)
}

/// `--ttl`: how long a VM may live, and what happens when that time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ttl {
    pub secs: u64,
    /// Delete the VM (`vm run --rm --ttl`), not only stop it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete: bool,
}

/// A VM's deadline: at `at` (Unix seconds) the daemon stops it, or deletes it when
/// `delete`. It fires once: a VM started again after it runs without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    pub at: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete: bool,
}

/// Request of `vm.set` (only while stopped, except `nat`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetVm {
    pub vm: String,
    #[serde(default)]
    pub vcpu: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Grow the work disk (never shrinks).
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    #[serde(default)]
    pub nat: Option<bool>,
    /// A new egress policy (applied at once to a running VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<crate::Egress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolate: Option<bool>,
    /// A new deadline that many seconds from now (`vm set --ttl`; what happens then stays
    /// as it was, a stop by default); 0 removes the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// A VM as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub state: VmState,
    /// Why the VM is in `error`, or why its last start failed.
    pub error: Option<String>,
    pub vmm: VmmKind,
    pub spec: VmSpec,
    pub image: String,
    pub kernel: String,
    pub nat: bool,
    pub created_at: u64,
    pub started_at: Option<u64>,
    /// The VMM's pid while it runs.
    pub pid: Option<i32>,
    /// The VM's directory (disks, sockets, console log).
    pub dir: String,
    pub console_log: String,
    /// The kernel command line of the current/last boot.
    pub cmdline: Option<String>,
    /// The hybrid vsock Unix socket while the VM runs (`CONNECT <port>\n`); `vm exec`
    /// talks to the guest agent through it directly.
    #[serde(default)]
    pub vsock_socket: Option<String>,
    /// The VM's IPv4 address (its lease), and the name `<name>.vm` resolves to it.
    #[serde(default)]
    pub ip: Option<String>,
    /// How the running VMM is confined: for Firecracker, `jailed ...` with its cgroup, or
    /// `unjailed: <why>`. None for QEMU and for a VM that is not running.
    #[serde(default)]
    pub isolation: Option<String>,
    /// Published ports, with the host port bound while the VM runs.
    #[serde(default)]
    pub published: Vec<crate::PublishedPort>,
    /// The egress policy (`subnet` from daemons that predate the field).
    #[serde(default)]
    pub egress: crate::Egress,
    /// Cut off from the other VMs on the bridge.
    #[serde(default)]
    pub isolate: bool,
    /// Packets the egress policy dropped while the VM runs (None: no filter, or unknown).
    #[serde(default)]
    pub egress_dropped: Option<u64>,
    /// DNS queries the bridge resolver refused for the policy since the VM started.
    #[serde(default)]
    pub dns_refused: Option<u64>,
    /// The VM's actor did not answer in time (it is busy with an operation): the fields
    /// above are the VM's last stored record, so `state` may be behind, and the update gate
    /// counts the VM as in flight. False from daemons that predate the field.
    #[serde(default)]
    pub busy: bool,
    /// Whose saved guest this VM runs until it takes its own identity (a fork's source, or
    /// `warm-<id>` for a warm start): set only between its restore and its identity, which
    /// its tap waits for before it joins the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<String>,
    /// The daemon has not re-adopted the VM yet since it started (its VMM probed, its
    /// agent proxy and published ports restored): the fields above are its last stored
    /// record, operations on it wait until its re-adoption is done, and the update gate
    /// counts it as in flight. A flag rather than a [`VmState`]: the stored state is still
    /// what the VM was, and is shown with it. False from daemons that predate the field.
    #[serde(default)]
    pub adopting: bool,
    /// When the VM is stopped or deleted (`--ttl`), if it has a deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Expiry>,
    /// A suspended VM: the disk space its saved memory and device state take (allocated
    /// bytes; the memory file is sparse), freed by `vm start` or `vm stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_bytes: Option<u64>,
    /// The VM's snapshots (`vm snapshot create`), oldest first. Empty from daemons that
    /// predate them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
}

/// A named snapshot of a VM (`vm snapshot create`): its memory and device state and a
/// copy of its disks at one moment, to which `vm rollback` returns it. A snapshot belongs
/// to its VM and is deleted with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    /// The VM's name.
    pub vm: String,
    pub created_at: u64,
    pub vmm: VmmKind,
    /// The VMM's `--version` line when the snapshot was taken: a snapshot restores only
    /// under the same one.
    pub vmm_version: String,
    /// The image and kernel as `<name>@<registered_at>`.
    pub image: String,
    pub kernel: String,
    /// The VM's size when the snapshot was taken: its memory state is for that size.
    pub spec: VmSpec,
    /// Disk space the snapshot takes (allocated bytes).
    pub bytes: u64,
    /// The snapshot's directory.
    pub dir: String,
}

/// Host-side figures of a VM (`vm.stats`); guest figures come from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    pub vm: String,
    pub state: VmState,
    pub pid: Option<i32>,
    /// Resident memory of the VMM process.
    pub vmm_rss_bytes: Option<u64>,
    /// CPU time used by the VMM process (user + system).
    pub vmm_cpu_ms: Option<u64>,
    pub uptime_secs: Option<u64>,
    /// Bytes actually allocated on the host for the overlay and work disks (sparse files).
    pub overlay_allocated_bytes: u64,
    pub work_allocated_bytes: u64,
    /// The guest's own figures, from its agent (absent when it does not answer).
    #[serde(default)]
    pub guest: Option<GuestStats>,
    /// Packets the egress policy dropped (None: no filter, or not running).
    #[serde(default)]
    pub egress_dropped: Option<u64>,
    /// DNS queries the bridge resolver refused for the policy since the VM started.
    #[serde(default)]
    pub dns_refused: Option<u64>,
}

/// What a VM's egress policy refused lately (`vm.egress_log`, `vm logs --egress`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressLog {
    pub vm: String,
    /// The policy in force.
    pub egress: crate::Egress,
    /// Names the bridge resolver refused since the policy was set, the latest first (the
    /// newest 256).
    pub names: Vec<RefusedName>,
    /// Flows the host's filter dropped in the last hour, the latest first (the newest 256
    /// TCP/UDP ones and 256 of other protocols).
    pub flows: Vec<RefusedFlow>,
}

/// A name the resolver refused for the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedName {
    pub name: String,
    pub queries: u64,
    /// Seconds since the last refused query.
    pub last_secs: u64,
}

/// A flow the host's filter dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedFlow {
    pub addr: String,
    /// `tcp`, `udp`, `icmp`, … (a number for a protocol without a name).
    pub proto: String,
    /// The destination port (TCP and UDP).
    pub port: Option<u16>,
    pub packets: u64,
    /// Seconds since its last dropped packet.
    pub last_secs: u64,
}

/// A progress event of `vm.create`, `vm.start`, `vm.restart`, `vm.suspend`,
/// `vm.snapshot_create`, `vm.rollback` and `vm.fork` (subscriptions). The stream always
/// ends with `done` (`snapshot` for `vm.snapshot_create`, `forked` for `vm.fork`) or
/// `failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Progress {
    /// The VM exists (first event of `vm.create`): its name and resolved spec.
    Created {
        vm: VmInfo,
    },
    /// A stage began (`disks`, `launch`, `configure`, `boot`, …).
    Stage {
        stage: String,
        detail: Option<String>,
    },
    Done {
        vm: VmInfo,
    },
    /// The snapshot taken: the last event of `vm.snapshot_create` (in place of `done`).
    Snapshot {
        snapshot: SnapshotInfo,
    },
    /// The clones made, running: the last event of `vm.fork` (in place of `done`).
    Forked {
        vms: Vec<VmInfo>,
    },
    /// The warm snapshot made: the last event of `image.warm` (in place of `done`).
    Warmed {
        warm: WarmInfo,
    },
    Failed {
        code: i32,
        message: String,
    },
}

/// An item of `vm.logs_follow`: console output, then `end` when the VM stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum LogEvent {
    Data { text: String },
    End { state: VmState },
}

/// Answer of `vm.prune`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    pub deleted: Vec<String>,
}

#[cfg(any(feature = "server", feature = "client"))]
mod rpc {
    use super::*;

    #[cfg_attr(
        all(feature = "server", feature = "client"),
        jsonrpsee::proc_macros::rpc(server, client, namespace = "vm", namespace_separator = ".")
    )]
    #[cfg_attr(
        all(feature = "server", not(feature = "client")),
        jsonrpsee::proc_macros::rpc(server, namespace = "vm", namespace_separator = ".")
    )]
    #[cfg_attr(
        all(feature = "client", not(feature = "server")),
        jsonrpsee::proc_macros::rpc(client, namespace = "vm", namespace_separator = ".")
    )]
    pub trait VmRpc {
        /// The defaults a VM created now would get, with their sources.
        #[method(name = "defaults")]
        async fn defaults(&self) -> jsonrpsee::core::RpcResult<SpecDefaults>;

        /// Create (and, unless `no_start`, start) a VM, streaming progress.
        #[subscription(name = "create" => "create.progress", unsubscribe = "create.unsubscribe", item = Progress)]
        async fn create(&self, req: CreateVm) -> jsonrpsee::core::SubscriptionResult;

        #[subscription(name = "start" => "start.progress", unsubscribe = "start.unsubscribe", item = Progress)]
        async fn start(&self, vm: String) -> jsonrpsee::core::SubscriptionResult;

        #[subscription(name = "restart" => "restart.progress", unsubscribe = "restart.unsubscribe", item = Progress)]
        async fn restart(&self, vm: String) -> jsonrpsee::core::SubscriptionResult;

        /// Graceful stop: Ctrl-Alt-Del to the guest, SIGKILL after `timeout_secs`.
        #[method(name = "stop")]
        async fn stop(
            &self,
            vm: String,
            timeout_secs: Option<u64>,
        ) -> jsonrpsee::core::RpcResult<VmInfo>;

        /// Freeze a running VM's vCPUs in memory (QMP `stop`, Firecracker `PATCH /vm`);
        /// a paused VM is a no-op success.
        #[method(name = "pause")]
        async fn pause(&self, vm: String) -> jsonrpsee::core::RpcResult<VmInfo>;

        /// Let a paused VM run again; a running VM is a no-op success.
        #[method(name = "resume")]
        async fn resume(&self, vm: String) -> jsonrpsee::core::RpcResult<VmInfo>;

        /// Save a running VM to disk (memory and device state, in its directory), then stop
        /// its VMM: it shows `suspended`, and `vm.start` restores it where it was.
        /// Streams its stages (`save`, `stop`).
        #[subscription(name = "suspend" => "suspend.progress", unsubscribe = "suspend.unsubscribe", item = Progress)]
        async fn suspend(&self, vm: String) -> jsonrpsee::core::SubscriptionResult;

        /// Send a signal (default SIGKILL) to the VMM.
        #[method(name = "kill")]
        async fn kill(
            &self,
            vm: String,
            signal: Option<String>,
        ) -> jsonrpsee::core::RpcResult<VmInfo>;

        /// Delete a VM and its disks. A running VM needs `force` (it is killed first).
        #[method(name = "delete")]
        async fn delete(&self, vm: String, force: bool) -> jsonrpsee::core::RpcResult<VmInfo>;

        #[method(name = "set")]
        async fn set(&self, req: SetVm) -> jsonrpsee::core::RpcResult<VmInfo>;

        #[method(name = "list")]
        async fn list(&self) -> jsonrpsee::core::RpcResult<Vec<VmInfo>>;

        #[method(name = "show")]
        async fn show(&self, vm: String) -> jsonrpsee::core::RpcResult<VmInfo>;

        #[method(name = "stats")]
        async fn stats(&self, vm: String) -> jsonrpsee::core::RpcResult<VmStats>;

        /// What the VM's egress policy refused lately: names and dropped flows.
        #[method(name = "egress_log")]
        async fn egress_log(&self, vm: String) -> jsonrpsee::core::RpcResult<EgressLog>;

        /// Listening TCP/UDP sockets in the guest, with their processes (from the agent).
        #[method(name = "ports")]
        async fn ports(&self, vm: String) -> jsonrpsee::core::RpcResult<Vec<Port>>;

        /// The console log (the last `tail_bytes` of it when given).
        #[method(name = "logs")]
        async fn logs(
            &self,
            vm: String,
            tail_bytes: Option<u64>,
        ) -> jsonrpsee::core::RpcResult<String>;

        /// Follow the console live; ends with `end` when the VM stops.
        #[subscription(name = "logs_follow" => "logs_follow.data", unsubscribe = "logs_follow.unsubscribe", item = LogEvent)]
        async fn logs_follow(&self, vm: String) -> jsonrpsee::core::SubscriptionResult;

        /// Delete every stopped (or created, or failed) VM; `dry_run` only lists them.
        #[method(name = "prune")]
        async fn prune(&self, dry_run: bool) -> jsonrpsee::core::RpcResult<Pruned>;

        /// Publish a port (bound now if the VM runs, else when it starts); answers it, with
        /// the host port bound.
        #[method(name = "port_add")]
        async fn port_add(
            &self,
            vm: String,
            spec: crate::PortSpec,
        ) -> jsonrpsee::core::RpcResult<crate::PublishedPort>;

        /// Unpublish the ports `port` names (`HOSTPORT` or a spec, see
        /// [`crate::PortRef`]); answers what was removed.
        #[method(name = "port_rm")]
        async fn port_rm(
            &self,
            vm: String,
            port: String,
        ) -> jsonrpsee::core::RpcResult<Vec<crate::PublishedPort>>;

        /// Snapshot a running or paused VM under `name` (generated when None): it is
        /// paused while its memory and device state are saved and its disks copied, then
        /// runs on as it was. Streams its stages (`save`, `copy`, `resume`) and ends with
        /// `snapshot`.
        #[subscription(name = "snapshot_create" => "snapshot_create.progress", unsubscribe = "snapshot_create.unsubscribe", item = Progress)]
        async fn snapshot_create(
            &self,
            vm: String,
            name: Option<String>,
        ) -> jsonrpsee::core::SubscriptionResult;

        /// The snapshots of `vm`, or of every VM when None, oldest first.
        #[method(name = "snapshot_list")]
        async fn snapshot_list(
            &self,
            vm: Option<String>,
        ) -> jsonrpsee::core::RpcResult<Vec<SnapshotInfo>>;

        /// Delete a snapshot of `vm` (by name or id); answers what was deleted.
        #[method(name = "snapshot_rm")]
        async fn snapshot_rm(
            &self,
            vm: String,
            snapshot: String,
        ) -> jsonrpsee::core::RpcResult<SnapshotInfo>;

        /// Put `vm` back to its snapshot `snapshot`, memory included: its VMM (if any) is
        /// ended, its disks replaced by the snapshot's and its state restored. Streams
        /// its stages (`check`, `stop`, `copy`, then the restore's) and ends with `done`
        /// once its guest runs again.
        #[subscription(name = "rollback" => "rollback.progress", unsubscribe = "rollback.unsubscribe", item = Progress)]
        async fn rollback(
            &self,
            vm: String,
            snapshot: String,
        ) -> jsonrpsee::core::SubscriptionResult;

        /// Clone a running or paused VM `count` times: it is snapshotted (and runs on), and
        /// each clone restored from the snapshot takes its own name, machine id, ssh host
        /// key, address and MAC before its tap joins the bridge. Streams stages and ends
        /// with `forked`; a clone that fails undoes the whole fork.
        #[subscription(name = "fork" => "fork.progress", unsubscribe = "fork.unsubscribe", item = Progress)]
        async fn fork(&self, req: ForkVm) -> jsonrpsee::core::SubscriptionResult;

        /// The VM's published ports.
        #[method(name = "port_list")]
        async fn port_list(
            &self,
            vm: String,
        ) -> jsonrpsee::core::RpcResult<Vec<crate::PublishedPort>>;
    }
}

#[cfg(feature = "client")]
pub use rpc::VmRpcClient;
#[cfg(feature = "server")]
pub use rpc::VmRpcServer;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_info_from_a_daemon_without_busy_parses_as_not_busy() {
        let old = serde_json::json!({
            "id": "a", "name": "n", "state": "running", "error": null, "vmm": "qemu",
            "spec": {"vcpu": 1, "memory_mib": 256, "disk_bytes": 1073741824u64},
            "image": "i", "kernel": "k", "nat": false, "created_at": 1, "started_at": null,
            "pid": null, "dir": "/d", "console_log": "/d/console.log", "cmdline": null
        });
        let info: VmInfo = serde_json::from_value(old).unwrap();
        assert!(!info.busy);
        let mut busy = info.clone();
        busy.busy = true;
        let back: VmInfo = serde_json::from_value(serde_json::to_value(&busy).unwrap()).unwrap();
        assert!(back.busy);
    }
}
