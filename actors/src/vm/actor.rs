//! VmActor: one per VM. It owns the VM's record, its VMM process (through the driver),
//! its disks and its console stream. Every operation on the VM goes through its mailbox;
//! slow work (making disks, launching and configuring the VMM, waiting for a guest to shut
//! down) runs in tasks that report back by message, so `stop` is never queued behind a
//! launch. Store writes are short (one redb transaction) and are awaited on the blocking
//! pool, so the state is persisted before a caller hears about it.
//!
//! Exactly one task watches a live VMM process (by pid + start time) and sends
//! [`VmMsg::Exited`]; every way a VM stops (guest poweroff, `stop`, `kill`, a crash) ends
//! there, where resources are released and waiters answered. Progress senders get
//! `stage` events only; the caller turns the final answer into `done`/`failed`. Messages carry the start
//! generation, so news about an earlier run is ignored.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{broadcast, mpsc, watch};

use banger_api::{LogEvent, Progress, SetVm, SnapshotInfo, VmInfo, VmState, VmStats, codes};
use banger_error::error_chain;

use super::cmdline::{self, CmdlineInputs};
use super::disks::{self, DiskError, VmDir};
use super::model::{self, Op, Runtime, VmRecord};
use super::proc;
use crate::store::{Store, StoreError, now_secs};
use crate::vmm::{Driver, LaunchPlan, VmmConfig, VmmError};

mod snapshots;

/// What every VM actor shares.
#[derive(Debug)]
pub struct VmEnv {
    pub store: Arc<Store>,
    pub vms_dir: PathBuf,
    /// Where warm snapshots are kept (`<data>/warm`, see [`crate::vm::warm`]).
    pub warm_dir: PathBuf,
    pub vmm: VmmConfig,
    /// How long `stop` waits for the guest before SIGKILL, unless the caller says.
    pub stop_timeout: Duration,
    pub extra_cmdline: String,
    pub tsc_khz: Option<u64>,
    /// How long a start waits for the guest agent to answer before giving up on it; zero
    /// reports the VM running as soon as the VMM runs the guest.
    pub agent_timeout: Duration,
    /// Taps and NAT, through the privileged helper.
    pub net: crate::net::host::HostNet,
    pub subnet: crate::net::lease::Subnet,
    /// The daemon's own uid: who owns the tap of a VMM that runs as the daemon (QEMU, an
    /// unjailed Firecracker).
    pub own_uid: u32,
    /// banger's ssh key, put into each guest's authorized_keys once its agent answers.
    pub ssh_key: Option<Arc<super::sshkey::SshKey>>,
    /// `[[file_sync]]`, copied into /root at a VM's first boot.
    pub file_sync: Vec<super::sshkey::FileSync>,
    /// This banger's guest binaries: an image whose banger-init or banger-agent are of an
    /// older revision is given them before a VM starts from it ([`crate::image::refresh_guest_side`]).
    pub guest_dir: Option<PathBuf>,
    /// Images (file identity and the guest binaries' mtimes) found current already.
    pub guest_current: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Give the image file `rootfs` this banger's guest binaries if it has others (see
/// [`VmEnv::guest_dir`]); checked once per image file. A failure is logged and the VM
/// starts with the image as it is. Blocking.
fn refresh_guest_side(env: &VmEnv, image: &str, rootfs: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = &env.guest_dir else { return };
    if crate::pull::guest::check_dir(dir).is_err() {
        return;
    }
    let key = |rootfs: &std::path::Path| -> Option<String> {
        let m = std::fs::metadata(rootfs).ok()?;
        let mut key = format!("{}:{}:{}", m.dev(), m.ino(), m.mtime_nsec());
        for n in crate::pull::guest::NAMES {
            key.push_str(&format!(
                ":{}",
                std::fs::metadata(dir.join(n)).ok()?.mtime_nsec()
            ));
        }
        Some(key)
    };
    let Some(before) = key(rootfs) else { return };
    if env
        .guest_current
        .lock()
        .expect("guest lock")
        .contains(&before)
    {
        return;
    }
    match crate::image::refresh_guest_side(rootfs, dir) {
        Ok(refreshed) => {
            if refreshed {
                tracing::info!(
                    image,
                    "gave the image this banger's guest binaries (it had older ones)"
                );
            }
            if let Some(after) = key(rootfs) {
                env.guest_current.lock().expect("guest lock").insert(after);
            }
        }
        Err(e) => {
            tracing::warn!(image, error = %banger_error::error_chain(&e), "cannot refresh the image's guest binaries; starting with them as they are")
        }
    }
}

/// Errors of VM operations, each mapped to an RPC code by [`VmError::code`].
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A VM, or the image or kernel a create names, does not exist.
    #[error(transparent)]
    NotFound(#[from] crate::not_found::NotFound),
    #[error("{0}")]
    Conflict(String),
    /// A snapshot name the VM does not have; `elsewhere`: the VM that has one by that name.
    #[error("vm {vm} has no snapshot named {name}{}; see `banger vm snapshot list {vm}`", elsewhere.as_ref().map(|o| format!(" (vm {o} has one: a vm rolls back only to its own snapshots)")).unwrap_or_default())]
    NoSnapshot {
        vm: String,
        name: String,
        elsewhere: Option<String>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("vm {vm} failed to start; its console log is {log}")]
    Start {
        vm: String,
        log: String,
        #[source]
        source: VmmError,
    },
    /// A save (`vm suspend`) failed part-way: nothing was kept, the VM runs on.
    #[error("vm {vm}: saving its state failed, so it runs on (nothing was saved)")]
    Save {
        vm: String,
        #[source]
        source: VmmError,
    },
    #[error("vm {0} was stopped while it was starting")]
    StoppedWhileStarting(String),
    #[error(
        "vm {vm} runs, but its guest agent did not answer within {secs}s ({reason}); it is left running: see `banger vm logs {vm}`"
    )]
    AgentUnreachable {
        vm: String,
        secs: u64,
        reason: String,
    },
    /// The guest's console says it has no banger-init.
    #[error(
        "vm {vm} cannot boot: its image has no banger init (the console says \"{line}\"); register the rootfs again with `banger image register`, which adds banger's guest binaries, or use an image from `banger image pull`"
    )]
    NoInit { vm: String, line: String },
    /// `said`: the console's last lines of this boot (the guest kernel's, or the VMM's own
    /// stderr).
    #[error("vm {vm} exited while it was booting ({said}); see `banger vm logs {vm}`")]
    ExitedDuringBoot { vm: String, said: String },
    #[error("vm {vm}: the guest agent: {reason}")]
    Agent { vm: String, reason: String },
    #[error("the vm actor for {0} is gone")]
    Gone(String),
    #[error("vm {vm}: cannot {what} it")]
    PauseResume {
        vm: String,
        what: &'static str,
        #[source]
        source: VmmError,
    },
    /// The VM's actor failed while this operation was under way (a store write that
    /// failed, typically); it is restarted from the VM's last stored record.
    #[error("vm {vm}: {reason}; the vm is left as it was last recorded")]
    Failed { vm: String, reason: String },
    #[error("vm {vm}: {source}")]
    Net {
        vm: String,
        #[source]
        source: crate::net::host::NetError,
    },
}

impl VmError {
    pub fn code(&self) -> i32 {
        match self {
            VmError::NotFound(_) | VmError::NoSnapshot { .. } => codes::NOT_FOUND,
            VmError::Conflict(_) | VmError::StoppedWhileStarting(_) => codes::CONFLICT,
            VmError::Invalid(_) => codes::INVALID_ARGUMENT,
            VmError::Store(e) => e.code(),
            VmError::Disk(DiskError::Shrink { .. }) => codes::INVALID_ARGUMENT,
            VmError::Disk(_)
            | VmError::Start { .. }
            | VmError::Save { .. }
            | VmError::Gone(_)
            | VmError::PauseResume { .. }
            | VmError::Failed { .. }
            | VmError::AgentUnreachable { .. }
            | VmError::ExitedDuringBoot { .. }
            | VmError::NoInit { .. }
            | VmError::Agent { .. } => codes::INTERNAL_ERROR,
            VmError::Net {
                source: crate::net::host::NetError::Unprivileged(_),
                ..
            } => codes::PERMISSION_DENIED,
            VmError::Net { .. } => codes::INTERNAL_ERROR,
        }
    }
}

impl From<model::Refused> for VmError {
    fn from(r: model::Refused) -> Self {
        VmError::Conflict(r.0)
    }
}

pub type Reply<T> = RpcReplyPort<Result<T, VmError>>;
pub type ProgressTx = mpsc::UnboundedSender<Progress>;

/// Messages of a VmActor.
#[derive(Debug)]
pub enum VmMsg {
    Start {
        progress: Option<ProgressTx>,
        reply: Reply<VmInfo>,
    },
    /// Make the disks without starting (`vm create --no-start`).
    Prepare {
        reply: Reply<VmInfo>,
    },
    Stop {
        timeout: Option<Duration>,
        reply: Reply<VmInfo>,
    },
    Kill {
        signal: nix::sys::signal::Signal,
        reply: Reply<VmInfo>,
    },
    /// Freeze a running VM's vCPUs (see [`Self::Resume`] and `model::transition`).
    Pause {
        reply: Reply<VmInfo>,
    },
    Resume {
        reply: Reply<VmInfo>,
    },
    /// Save the running VM to its directory and end its VMM (`vm suspend`).
    Suspend {
        progress: Option<ProgressTx>,
        reply: Reply<VmInfo>,
    },
    /// Internal: the save of a suspend is done (its state is in place) or failed (the VM
    /// runs on, nothing saved).
    Saved {
        generation: u64,
        result: Result<(), VmError>,
    },
    Delete {
        force: bool,
        reply: Reply<VmInfo>,
    },
    /// `vm snapshot create` (see [`super::snapshot`]): named, or `snap-N`.
    SnapshotCreate {
        name: Option<String>,
        progress: Option<ProgressTx>,
        reply: Reply<SnapshotInfo>,
    },
    /// `vm fork`'s snapshot, of which `copies` clones will be made (see `vm::fork`).
    ForkSnapshot {
        copies: u32,
        progress: Option<ProgressTx>,
        reply: Reply<super::fork::ForkSource>,
    },
    /// `vm create --from-snapshot`: one of this VM's snapshots (by name or id), checked,
    /// as the source of a new VM (see `vm::fork`).
    SnapshotSource {
        snapshot: String,
        reply: Reply<super::fork::ForkSource>,
    },
    /// `vm snapshot rm`, by name or id.
    SnapshotRemove {
        snapshot: String,
        reply: Reply<SnapshotInfo>,
    },
    /// `vm rollback`: answered once the VM runs again from the snapshot.
    Rollback {
        snapshot: String,
        progress: Option<ProgressTx>,
        reply: Reply<VmInfo>,
    },
    /// Internal: a snapshot's save and copies are done (or failed, the VM running on).
    Snapshotted {
        generation: u64,
        result: Result<super::model::SnapshotRecord, VmError>,
    },
    /// Internal: a rollback's checks are done.
    RollbackChecked {
        result: Result<(), VmError>,
    },
    /// Internal: a rollback's files are in place (or could not be).
    RollbackPrepared {
        result: Result<(), VmError>,
    },
    Set {
        req: SetVm,
        reply: Reply<VmInfo>,
    },
    /// The deadline `at` (see [`banger_api::Expiry`]) is reached; ignored when the VM's
    /// deadline has changed since.
    Expired {
        at: u64,
    },
    Info(Reply<VmInfo>),
    Stats(Reply<VmStats>),
    /// What the VM's egress policy refused lately (`vm logs --egress`).
    EgressLog(Reply<banger_api::EgressLog>),
    /// The console so far (last 64 KiB) and, while the VM runs, a live stream.
    Follow(RpcReplyPort<(String, Option<broadcast::Receiver<LogEvent>>)>),
    // Internal, from the actor's own tasks.
    /// The launch's VMM process exists (stored before it is configured).
    Spawned {
        generation: u64,
        pid: i32,
        start_time: u64,
    },
    Launched {
        generation: u64,
        result: Result<(Runtime, String), VmError>,
    },
    Prepared {
        result: Result<(), VmError>,
        reply: Reply<VmInfo>,
    },
    Exited {
        generation: u64,
    },
    /// The console says the guest has no banger-init (see
    /// [`super::cmdline::init_missing`]): a start of this generation fails now.
    InitMissing {
        generation: u64,
        line: String,
    },
    /// The guest's kernel said it powered off or halted, under a VMM that lives on after
    /// that (Firecracker): end the process.
    GuestHalted {
        generation: u64,
    },
    AgentReady {
        generation: u64,
        result: Result<(), String>,
    },
    /// A re-adopted clone whose identity the daemon's death cut short took it now (see
    /// `VmActor::finish_identity`).
    IdentityTaken {
        generation: u64,
        result: Result<(), String>,
    },
    /// Listening ports, from the agent.
    Ports(Reply<Vec<banger_api::Port>>),
    /// `vm port add|rm|list` (see [`super::publish`]).
    Port {
        op: super::publish::PortOp,
        reply: Reply<super::publish::PortAnswer>,
    },
    /// Tests: keep the mailbox busy until the sender answers or goes (an operation that
    /// takes long, without a guest).
    #[cfg(test)]
    TestHold(tokio::sync::oneshot::Receiver<()>),
}

/// Arguments: the VM's id and the shared environment.
#[derive(Debug)]
pub struct VmArgs {
    pub id: String,
    pub env: Arc<VmEnv>,
    /// The VM's record when the caller has just read it (the daemon's start lists them all
    /// once); else it is read from the store.
    pub rec: Option<VmRecord>,
    /// Re-adoption after the daemon's start (see [`Adoption`]); None for a new VM.
    pub adoption: Option<Adoption>,
}

/// Re-adoption of a VM that was there before the actor: it runs in the actor's
/// `post_start`, after the actor is spawned, so the daemon serves while VMs are being
/// re-adopted, and a caller of this VM waits in its mailbox (behind the re-adoption) while
/// every other VM answers. At most as many VMs as `permits` has are re-adopted at once;
/// `adopting` is set until this VM's re-adoption is done (`vm list`/`vm show` read it
/// without waiting for the actor, and list the VM from its stored record with
/// `adopting`).
#[derive(Debug, Clone)]
pub struct Adoption {
    pub permits: Arc<tokio::sync::Semaphore>,
    pub adopting: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, Default)]
pub struct VmActor;

/// The console stream: a broadcast of new bytes and how far it has read.
#[derive(Debug)]
struct Console {
    /// Made by the first follower: a VM nobody follows holds no buffer (256 slots for each
    /// of 1000 VMs were a sixth of the daemon's memory).
    tx: Arc<std::sync::OnceLock<broadcast::Sender<LogEvent>>>,
    /// Bytes of console.log already broadcast; locked while broadcasting so a new follower
    /// gets each byte exactly once (from the backlog or from the stream).
    offset: Arc<Mutex<u64>>,
    stop: Option<watch::Sender<Option<VmState>>>,
    /// Where console.log ended when the current start began: its boot's first byte.
    boot_from: u64,
}

#[derive(Debug)]
pub struct VmActorState {
    rec: VmRecord,
    env: Arc<VmEnv>,
    dir: VmDir,
    generation: u64,
    start_waiters: Vec<(Reply<VmInfo>, Option<ProgressTx>)>,
    stop_waiters: Vec<Reply<VmInfo>>,
    delete_after_exit: Option<Reply<VmInfo>>,
    /// The caller of a suspend in progress; with `suspend_saved`, once its state is saved
    /// and the VMM is being ended (its exit makes the VM `suspended`).
    suspend_waiter: Option<Reply<VmInfo>>,
    suspend_saved: bool,
    /// The start in progress restores saved state (a failure leaves the VM suspended).
    restoring: bool,
    /// The caller of a snapshot being taken.
    snapshotting: Option<snapshots::SnapshotWaiter>,
    /// A rollback in progress (see [`snapshots`]).
    rollback: Option<snapshots::PendingRollback>,
    console: Console,
    /// Why the boot being ended failed (its start waiters get it once the VMM is gone).
    boot_failure: Option<VmError>,
    /// Listeners of the published ports, while the VM runs.
    published: super::publish::Published,
    /// The timer of the VM's deadline (`--ttl`), while it has one.
    expiry: Option<ExpiryTimer>,
    /// Until `post_start` has re-adopted the VM.
    adoption: Option<Adoption>,
    /// The last store write that failed: what the waiters hear if the actor fails on it.
    store_failure: Mutex<Option<String>>,
}

/// An actor that fails (a store write that failed, typically) answers whoever waits on it
/// with why, rather than leaving them with a dropped reply.
impl Drop for VmActorState {
    fn drop(&mut self) {
        if self.start_waiters.is_empty()
            && self.stop_waiters.is_empty()
            && self.delete_after_exit.is_none()
        {
            return;
        }
        let reason = self
            .store_failure
            .lock()
            .expect("store failure lock")
            .take()
            .unwrap_or_else(|| "its actor failed (see the daemon log)".into());
        let err = || VmError::Failed {
            vm: self.rec.name.clone(),
            reason: reason.clone(),
        };
        for (w, _) in self.start_waiters.drain(..) {
            let _ = w.send(Err(err()));
        }
        for w in self.stop_waiters.drain(..) {
            let _ = w.send(Err(err()));
        }
        if let Some(w) = self.delete_after_exit.take() {
            let _ = w.send(Err(err()));
        }
    }
}

/// How often a deadline that passed while the VM was starting looks again.
const EXPIRY_RECHECK: Duration = Duration::from_millis(200);

/// The task that sends [`VmMsg::Expired`] at the VM's deadline; aborted when replaced, or
/// when the actor (and so its state) goes.
#[derive(Debug)]
struct ExpiryTimer(tokio::task::AbortHandle);

impl ExpiryTimer {
    /// Send `Expired { at }` to `me` after `wait`.
    fn after(me: ActorRef<VmMsg>, wait: Duration, at: u64) -> ExpiryTimer {
        ExpiryTimer(
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = me.cast(VmMsg::Expired { at });
            })
            .abort_handle(),
        )
    }
}

impl Drop for ExpiryTimer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl VmActorState {
    fn driver(&self) -> Driver {
        Driver::new(self.rec.vmm, &self.env.vmm)
    }

    fn info(&self) -> VmInfo {
        VmInfo {
            published: self.published.view(&self.rec.publish),
            ..info_of(&self.rec, &self.dir)
        }
    }

    async fn persist(&self) -> Result<(), VmError> {
        let (store, rec) = (Arc::clone(&self.env.store), self.rec.clone());
        let written = tokio::task::spawn_blocking(move || store.put_vm(&rec))
            .await
            .expect("store write does not panic");
        if let Err(e) = &written {
            *self.store_failure.lock().expect("store failure lock") = Some(error_chain(e));
        }
        Ok(written?)
    }

    /// The lease of a running VM whose egress is filtered or isolated (counters to read).
    fn running_policy_ip(&self) -> Option<std::net::Ipv4Addr> {
        let filtered = crate::net::egress::needs_rules(&self.rec.egress(), self.rec.isolate);
        (filtered && self.rec.runtime.is_some())
            .then(|| self.rec.ip.as_deref()?.parse().ok())
            .flatten()
    }

    /// DNS queries the guests' resolver refused for this VM since it started.
    fn dns_refused(&self, ip: std::net::Ipv4Addr) -> Option<u64> {
        let policies = self.env.net.egress.read().expect("egress policies lock");
        let p = policies.get(&ip).filter(|p| p.vm == self.rec.id)?;
        Some(p.refused.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The names the guests' resolver refused for this VM, the latest first.
    fn refused_names(&self, ip: std::net::Ipv4Addr) -> Vec<banger_api::RefusedName> {
        let policies = self.env.net.egress.read().expect("egress policies lock");
        policies
            .get(&ip)
            .filter(|p| p.vm == self.rec.id)
            .map(|p| p.refused_names())
            .unwrap_or_default()
    }

    fn check(&self, op: Op) -> Result<(), VmError> {
        if !matches!(op, Op::Kill | Op::Delete { force: true })
            && let Some(why) = self.busy()
        {
            return Err(VmError::Conflict(why));
        }
        Ok(model::check(&self.rec.name, self.rec.state, op)?)
    }

    /// Why the VM takes no other change now: a snapshot or a rollback is under way.
    fn busy(&self) -> Option<String> {
        let name = &self.rec.name;
        if self.snapshotting.is_some() {
            Some(format!(
                "vm {name} is being snapshotted; try again once that is done"
            ))
        } else if self.rollback.is_some() {
            Some(format!(
                "vm {name} is being rolled back; try again once that is done"
            ))
        } else {
            None
        }
    }
}

/// The disk space the files in `dir` take (allocated, not apparent: a saved memory file
/// is sparse).
fn saved_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The wire view of a VM.
pub fn info_of(rec: &VmRecord, dir: &VmDir) -> VmInfo {
    VmInfo {
        id: rec.id.clone(),
        name: rec.name.clone(),
        state: rec.state,
        error: rec.error.clone(),
        vmm: rec.vmm,
        spec: rec.spec,
        image: rec.image.clone(),
        kernel: rec.kernel.clone(),
        nat: rec.nat,
        created_at: rec.created_at,
        started_at: rec.started_at,
        pid: rec.runtime.as_ref().map(|r| r.pid),
        dir: dir.dir.display().to_string(),
        console_log: dir.console().display().to_string(),
        cmdline: rec.cmdline.clone(),
        vsock_socket: rec.runtime.as_ref().map(|r| r.vsock_socket.clone()),
        ip: rec.ip.clone(),
        isolation: rec.runtime.as_ref().and_then(|r| r.isolation.clone()),
        published: super::publish::unbound(&rec.publish),
        egress: rec.egress(),
        isolate: rec.isolate,
        egress_dropped: None,
        dns_refused: None,
        busy: false,
        adopting: false,
        clone_of: rec.clone_of.as_ref().map(|c| c.vm.clone()),
        expires: rec.expires,
        saved_bytes: (rec.state == VmState::Suspended).then(|| saved_bytes(&dir.saved_state())),
        snapshots: rec
            .snapshots
            .iter()
            .map(|s| super::snapshot::info(rec, dir, s))
            .collect(),
    }
}

/// The guest's side of its network: address, gateway, resolver (the bridge address,
/// where banger's resolver answers `.vm` and forwards the rest).
fn guest_net(env: &VmEnv, rec: &VmRecord) -> Option<cmdline::GuestNet> {
    let ip: std::net::Ipv4Addr = rec.ip.as_deref()?.parse().ok()?;
    let gw = env.subnet.gateway();
    Some(cmdline::GuestNet {
        address_cidr: format!("{ip}/{}", env.subnet.prefix),
        gateway: gw.to_string(),
        dns: gw.to_string(),
    })
}

/// Build the launch plan (image and kernel from the store). Blocking.
fn plan(
    env: &VmEnv,
    rec: &VmRecord,
    dir: &VmDir,
    tap: Option<String>,
) -> Result<LaunchPlan, VmError> {
    let image = env.store.get_image(&rec.image)?.ok_or_else(|| {
        VmError::Invalid(format!(
            "the image {} of vm {} is gone",
            rec.image, rec.name
        ))
    })?;
    refresh_guest_side(env, &rec.image, &image.rootfs);
    let kernel = env.store.get_kernel(&rec.kernel)?.ok_or_else(|| {
        VmError::Invalid(format!(
            "the kernel {} of vm {} is gone",
            rec.kernel, rec.name
        ))
    })?;
    let cmdline = cmdline::build(&CmdlineInputs {
        vmm: rec.vmm,
        id: &rec.id,
        name: &rec.name,
        net: guest_net(env, rec).as_ref(),
        tsc_khz: env.tsc_khz,
        extra: &env.extra_cmdline,
    });
    // Firecracker boots only the ELF; QEMU the kernel as given (a bzImage boots with its
    // initrd as on real hardware).
    let kernel_file = match rec.vmm {
        banger_api::VmmKind::Firecracker => kernel
            .firecracker_kernel()
            .map_err(|e| VmError::Invalid(crate::vm::actor::error_chain(&e)))?,
        banger_api::VmmKind::Qemu => kernel.kernel,
    };
    Ok(LaunchPlan {
        id: rec.id.clone(),
        spec: rec.spec,
        kernel: kernel_file,
        initrd: kernel.initrd,
        rootfs: image.rootfs,
        overlay: dir.overlay(),
        work: dir.work(),
        cmdline,
        console: dir.console(),
        run_dir: dir.run_dir(),
        tap: tap.zip(
            rec.ip
                .as_deref()
                .and_then(|ip| ip.parse().ok())
                .map(crate::net::lease::mac_for),
        ),
        uid: rec.uid,
        clone: false,
    })
}

/// Make the disks if this VM has none yet. Blocking.
fn ensure_disks(dir: &VmDir, work_bytes: u64) -> Result<(), VmError> {
    if dir.overlay().exists() && dir.work().exists() {
        return Ok(());
    }
    disks::create(dir, work_bytes)?;
    Ok(())
}

/// Give a Firecracker VM created before VMs had uids of their own one (at create, the
/// VM supervisor allocates it with the record).
async fn ensure_uid(env: &Arc<VmEnv>, rec: &mut VmRecord) -> Result<(), VmError> {
    if rec.vmm != banger_api::VmmKind::Firecracker || rec.uid.is_some() {
        return Ok(());
    }
    let store = Arc::clone(&env.store);
    let used: std::collections::HashSet<u32> =
        tokio::task::spawn_blocking(move || store.list_vms())
            .await
            .map_err(|e| VmError::Invalid(e.to_string()))??
            .iter()
            .filter_map(|v| v.uid)
            .collect();
    let range = env.vmm.firecracker.vm_uids;
    rec.uid = Some(
        crate::vmm::firecracker::allocate_uid(range, &rec.id, &used).ok_or_else(|| {
            VmError::Conflict(format!(
                "every VM uid of {range} is taken; delete some VMs, or configure a larger [firecracker] vm_uids"
            ))
        })?,
    );
    Ok(())
}

/// Make the VM's tap (and NAT) when it has a network; the tap's name.
async fn setup_net(
    env: &VmEnv,
    rec: &VmRecord,
    progress: &[ProgressTx],
    bridge: bool,
) -> Result<Option<String>, VmError> {
    let Some(ip) = rec.ip.as_deref().and_then(|ip| ip.parse().ok()) else {
        return Ok(None);
    };
    send_stage(progress, "network");
    // A jailed Firecracker opens its tap as the VM's own uid.
    let uid = match (rec.vmm, rec.uid) {
        (banger_api::VmmKind::Firecracker, Some(uid)) if env.net.privileged().await => uid,
        _ => env.own_uid,
    };
    let net_err = |source| VmError::Net {
        vm: rec.name.clone(),
        source,
    };
    let tap = if bridge {
        env.net.attach(&rec.id, uid).await
    } else {
        env.net.detached(&rec.id, uid).await
    }
    .map_err(net_err)?;
    if rec.nat
        && let Err(e) = env.net.nat(&rec.id, Some(ip)).await
    {
        let _ = env.net.detach(&rec.id).await;
        return Err(net_err(e));
    }
    if let Err(e) = apply_egress(env, rec, ip, false).await {
        let _ = env.net.detach(&rec.id).await;
        if rec.nat {
            let _ = env.net.nat(&rec.id, None).await;
        }
        return Err(net_err(e));
    }
    Ok(Some(tap))
}

/// Change a running VM's NAT and egress rules from `from`'s to `to`'s (lease `ip`): NAT
/// first, then the filter; when the filter cannot be set, NAT is put back as it was, so a
/// failed `vm set` leaves the VM's network as it found it.
async fn change_net(
    env: &VmEnv,
    from: &VmRecord,
    to: &VmRecord,
    ip: std::net::Ipv4Addr,
) -> Result<(), crate::net::host::NetError> {
    let nat_changes = from.egress().nat() != to.egress().nat();
    if nat_changes {
        env.net.nat(&to.id, to.egress().nat().then_some(ip)).await?;
    }
    let had = crate::net::egress::needs_rules(&from.egress(), from.isolate);
    if let Err(e) = apply_egress(env, to, ip, had).await {
        if nat_changes
            && let Err(undo) = env
                .net
                .nat(&from.id, from.egress().nat().then_some(ip))
                .await
        {
            tracing::warn!(vm = %from.name, error = %error_chain(&undo), "putting NAT back after a failed egress change");
        }
        return Err(e);
    }
    Ok(())
}

/// Put the VM's egress filter and isolation on its tap (or take them off, when it `had`
/// some and its policy needs none), and tell the guests' resolver the VM's policy.
async fn apply_egress(
    env: &VmEnv,
    rec: &VmRecord,
    ip: std::net::Ipv4Addr,
    had: bool,
) -> Result<(), crate::net::host::NetError> {
    let egress = rec.egress();
    if crate::net::egress::needs_rules(&egress, rec.isolate) {
        let filter = crate::net::egress::filter(&egress, rec.isolate);
        env.net.egress_set(&rec.id, ip, filter).await?;
    } else if had {
        env.net.egress_remove(&rec.id).await?;
    }
    let policy = crate::net::dns::GuestPolicy::new(&rec.id, &rec.name, egress);
    env.net
        .egress
        .write()
        .expect("egress policies lock")
        .insert(ip, Arc::new(policy));
    Ok(())
}

/// Remove the VM's tap and NAT (after its VMM is gone). Failures are logged: a tap left
/// behind is removed by the next start or by delete.
async fn release_net(env: &VmEnv, rec: &VmRecord) {
    if rec.ip.is_none() {
        return;
    }
    if let Err(e) = env.net.detach(&rec.id).await {
        tracing::warn!(vm = %rec.name, error = %error_chain(&e), "removing the tap");
    }
    if rec.nat
        && let Err(e) = env.net.nat(&rec.id, None).await
    {
        tracing::warn!(vm = %rec.name, error = %error_chain(&e), "removing NAT");
    }
    if let Some(ip) = rec.ip.as_deref().and_then(|ip| ip.parse().ok()) {
        env.net
            .egress
            .write()
            .expect("egress policies lock")
            .remove(&ip);
    }
    if crate::net::egress::needs_rules(&rec.egress(), rec.isolate)
        && let Err(e) = env.net.egress_remove(&rec.id).await
    {
        tracing::warn!(vm = %rec.name, error = %error_chain(&e), "removing the egress filter");
    }
}

/// Tell a restored guest's agent the host's time and give it fresh entropy (its clock
/// stood still while it was saved, and its RNG state is the saved one). Not fatal: an
/// older agent without the op answers an error, which is logged.
/// The `Identity` a restored clone's guest takes: the clone's name, and its own address
/// and MAC in place of its source's.
fn identity_request(
    env: &VmEnv,
    rec: &VmRecord,
    from: &super::model::CloneOf,
) -> banger_guest::proto::Request {
    let net = guest_net(env, rec).and_then(|n| {
        let ip: std::net::Ipv4Addr = rec.ip.as_deref()?.parse().ok()?;
        Some(banger_guest::proto::IdentityNet {
            mac: crate::net::lease::mac_for(ip),
            old_address: from.address.clone(),
            address: n.address_cidr,
            gateway: n.gateway.parse().ok(),
            dns: n.dns.parse().ok(),
        })
    });
    banger_guest::proto::Request::Identity {
        name: rec.name.clone(),
        net,
        // Made by the task that sends it (`sshkey::host_key_pair`).
        host_key: None,
    }
}

/// Ask a restored clone's agent to take its identity (`req`). A refusal fails its start:
/// a guest that answers for its source's address and host key must not join the bridge.
async fn take_identity(
    sock: &std::path::Path,
    req: &banger_guest::proto::Request,
    vm: &str,
) -> Result<(), String> {
    let mut answer = banger_guest::host::call(sock, req, Duration::from_secs(30)).await;
    if let (
        Err(e),
        banger_guest::proto::Request::Identity {
            name,
            net,
            host_key: Some(_),
        },
    ) = (&answer, req)
        && error_chain(e).contains("host_key")
    {
        // An agent from before host-made keys refuses the field: it makes its own.
        let older = banger_guest::proto::Request::Identity {
            name: name.clone(),
            net: net.clone(),
            host_key: None,
        };
        answer = banger_guest::host::call(sock, &older, Duration::from_secs(30)).await;
    }
    match answer {
        Ok(banger_guest::proto::Response::Identity { machine_id, .. }) => {
            tracing::info!(vm, %machine_id, "the clone took its own identity");
            Ok(())
        }
        Ok(other) => Err(format!(
            "the clone's agent answered {other:?} to its new identity"
        )),
        Err(e) => Err(format!(
            "the clone's agent could not take its own identity (an agent older than forks?): {}",
            error_chain(&e)
        )),
    }
}

/// A restored clone becomes its own machine: its identity (`req`, given a host key made
/// here), then, for `bridge` (the VM's id), its tap on the bridge.
async fn become_own(
    sock: &std::path::Path,
    mut req: banger_guest::proto::Request,
    vm: &str,
    net: &crate::net::host::HostNet,
    bridge: Option<&str>,
) -> Result<(), String> {
    if let banger_guest::proto::Request::Identity { host_key, .. } = &mut req {
        *host_key = super::sshkey::host_key_pair(vm).await;
    }
    take_identity(sock, &req, vm).await?;
    if let Some(id) = bridge {
        net.bridge(id)
            .await
            .map_err(|e| format!("putting its tap on the bridge: {}", error_chain(&e)))?;
    }
    Ok(())
}

/// Wait for a restored guest's agent with the restore notice itself (the host's time, as
/// it is sent, and host entropy: one round trip less than a `health` first, which counts
/// in a warm start): its clock is stepped and its RNG reseeded. An agent that answers but
/// refuses the notice (older than it) is ready all the same; one that does not answer in
/// `timeout` is the error.
async fn wait_restored(
    sock: &std::path::Path,
    vm: &str,
    timeout: Duration,
) -> Result<(), banger_guest::host::HostError> {
    use std::io::Read;
    let mut entropy = vec![0u8; 64];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut entropy))
    {
        tracing::warn!(vm, error = %e, "reading host entropy for the restored guest");
        entropy.clear();
    }
    let req = || {
        let unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        banger_guest::proto::Request::Restored {
            unix_nanos,
            entropy: entropy.clone(),
        }
    };
    match banger_guest::host::wait_answer(sock, timeout, req).await {
        Ok(banger_guest::proto::Response::Restored {
            clock_step_ms,
            reseeded,
        }) => tracing::info!(
            vm,
            clock_step_ms,
            reseeded,
            "restored: the guest's clock stepped to the host's"
        ),
        Ok(other) => tracing::warn!(vm, answer = ?other, "unexpected answer to the restore notice"),
        Err(
            e @ banger_guest::host::HostError::Proto(banger_guest::proto::ProtoError::Remote(_)),
        ) => {
            tracing::warn!(vm, error = %error_chain(&e), "the guest's agent did not take the restore notice (an older agent?): its clock and RNG are as saved")
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

async fn install_ssh_key(
    key: &Arc<super::sshkey::SshKey>,
    sock: &std::path::Path,
) -> Result<(), super::sshkey::SshKeyError> {
    let k = Arc::clone(key);
    let public = tokio::task::spawn_blocking(move || k.public_key())
        .await
        .map_err(|e| super::sshkey::SshKeyError::Spawn(std::io::Error::other(e)))??;
    super::sshkey::install(sock, &public).await
}

/// Release what the VMM left behind (its helper processes, sockets, jail) once it is gone;
/// a Firecracker jail holds what the jailer made as root, which the helper removes.
async fn release_vmm(state: &VmActorState, rt: Option<Runtime>) {
    let driver = state.driver();
    let (id, run) = (state.rec.id.clone(), state.dir.run_dir());
    let firecracker = matches!(driver, Driver::Firecracker(_));
    let _ = tokio::task::spawn_blocking(move || driver.cleanup(&id, rt.as_ref(), &run)).await;
    if firecracker && let Err(e) = state.env.net.clean_jail(&state.rec.id).await {
        tracing::warn!(vm = %state.rec.name, error = %e, "the helper did not clean the jail");
    }
}

/// How long a restored clone's start waits for its agent when `agent_timeout_secs` is 0.
const CLONE_AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// One stage, with what it does, to a caller that follows the progress (if any).
pub(crate) fn tell(progress: &Option<ProgressTx>, stage: &str, detail: impl Into<String>) {
    if let Some(tx) = progress {
        let _ = tx.send(Progress::Stage {
            stage: stage.into(),
            detail: Some(detail.into()),
        });
    }
}

fn send_stage(progress: &[ProgressTx], stage: &str) {
    for tx in progress {
        let _ = tx.send(Progress::Stage {
            stage: stage.into(),
            detail: None,
        });
    }
}

impl VmActor {
    /// Start the task that sends `Exited` once the VMM process is gone.
    fn watch_exit(myself: &ActorRef<VmMsg>, state: &VmActorState) {
        let Some(rt) = state.rec.runtime.clone() else {
            return;
        };
        let generation = state.generation;
        let me = myself.clone();
        tokio::spawn(async move {
            super::watch::exited(rt.pid, rt.start_time).await;
            let _ = me.cast(VmMsg::Exited { generation });
        });
    }

    /// Start following console.log from its current end. Under a VMM that outlives its
    /// guest's power-off (Firecracker), the follower also watches for the kernel's
    /// power-off line ([`crate::vmm::GUEST_HALTED`]) and tells the actor
    /// ([`VmMsg::GuestHalted`]), which ends the process: else a guest `poweroff` would
    /// leave a halted VM shown as running.
    fn start_console(myself: &ActorRef<VmMsg>, state: &mut VmActorState) {
        if state.console.stop.is_some() {
            return;
        }
        let halt_watch =
            (!state.driver().guest_halt_ends_vmm()).then(|| (myself.clone(), state.generation));
        // While it boots: a guest without banger-init never answers; say so at once.
        let init_watch =
            (state.rec.state == VmState::Starting).then(|| (myself.clone(), state.generation));
        let path = state.dir.console();
        let old = state.dir.console_old();
        let start = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        *state.console.offset.lock().expect("console lock") = start;
        // What this boot printed before the follower started (a fast initramfs, or the
        // VMM's own words) is read first.
        let mut init_told = false;
        if let Some((me, generation)) = &init_watch {
            let early = read_range(&path, state.console.boot_from.min(start), start);
            if let Some(line) = missing_init_line(&early) {
                init_told = true;
                let _ = me.cast(VmMsg::InitMissing {
                    generation: *generation,
                    line,
                });
            }
        }
        let (stop_tx, mut stop_rx) = watch::channel(None);
        state.console.stop = Some(stop_tx);
        let (tx, offset) = (
            Arc::clone(&state.console.tx),
            Arc::clone(&state.console.offset),
        );
        tokio::spawn(async move {
            // Woken by the console's writes (inotify), not a timer.
            let mut watch = super::watch::FileWatch::new(&path);
            // The end of the last read that was not a whole line yet, so a halt line split
            // across two reads is still seen.
            let mut partial = String::new();
            let mut halted = false;
            let mut drain = |final_state: Option<VmState>| {
                let mut off = offset.lock().expect("console lock");
                if let Ok(bytes) = read_from(&path, *off)
                    && !bytes.is_empty()
                {
                    *off += bytes.len() as u64;
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    let halt_open = halt_watch.is_some() && !halted;
                    let init_open = init_watch.is_some() && !init_told;
                    if halt_open || init_open {
                        partial.push_str(&text);
                        if let Some((me, generation)) = &halt_watch
                            && !halted
                            && crate::vmm::GUEST_HALTED.iter().any(|l| partial.contains(l))
                        {
                            halted = true;
                            let _ = me.cast(VmMsg::GuestHalted {
                                generation: *generation,
                            });
                        }
                        // Keep only the unfinished last line (bounded).
                        let keep = partial.rfind('\n').map_or(0, |i| i + 1);
                        if let Some((me, generation)) = &init_watch
                            && !init_told
                            && let Some(line) = missing_init_line(&partial[..keep])
                        {
                            init_told = true;
                            let _ = me.cast(VmMsg::InitMissing {
                                generation: *generation,
                                line,
                            });
                        }
                        partial.drain(..keep);
                        if partial.len() > 256 {
                            partial.clear();
                        }
                    }
                    if let Some(tx) = tx.get() {
                        let _ = tx.send(LogEvent::Data { text });
                    }
                }
                // Keep the console bounded: a chatty guest must not fill the disk.
                if disks::rotate_console(&path, &old, disks::CONSOLE_MAX).unwrap_or(false) {
                    *off = 0;
                }
                if let Some(state) = final_state
                    && let Some(tx) = tx.get()
                {
                    let _ = tx.send(LogEvent::End { state });
                }
            };
            loop {
                tokio::select! {
                    changed = stop_rx.changed() => {
                        let end = if changed.is_ok() { *stop_rx.borrow() } else { None };
                        drain(Some(end.unwrap_or(VmState::Stopped)));
                        break;
                    }
                    _ = watch.changed() => drain(None),
                }
            }
        });
    }

    fn stop_console(state: &mut VmActorState) {
        if let Some(stop) = state.console.stop.take() {
            let _ = stop.send(Some(state.rec.state));
        }
    }

    /// The VMM is gone: release everything, settle the state, answer waiters.
    async fn on_exited(
        myself: &ActorRef<VmMsg>,
        state: &mut VmActorState,
    ) -> Result<(), ActorProcessingErr> {
        let rt = state.rec.runtime.take();
        state.rec.spawned = None;
        state.published.unbind_all().await;
        release_vmm(state, rt).await;
        release_net(&state.env, &state.rec).await;
        let was = state.rec.state;
        let suspended = std::mem::take(&mut state.suspend_saved);
        state.rec.state = if suspended {
            VmState::Suspended
        } else {
            VmState::Stopped
        };
        if suspended {
            tracing::info!(vm = %state.rec.name, "suspended");
        } else if was == VmState::Running && state.stop_waiters.is_empty() {
            tracing::info!(vm = %state.rec.name, "the guest shut down");
        }
        state.generation += 1;
        state.persist().await?;
        Self::stop_console(state);
        let info = state.info();
        let mut failure = state.boot_failure.take();
        if !state.start_waiters.is_empty() {
            let said = crate::vmm::tail_since(&state.dir.console(), state.console.boot_from, 5);
            let said = if said.is_empty() {
                "its console is empty".to_owned()
            } else {
                format!("the console's last lines: {said}")
            };
            for (reply, _) in state.start_waiters.drain(..) {
                let _ = reply.send(Err(failure.take().unwrap_or_else(|| {
                    if was == VmState::Stopping {
                        VmError::StoppedWhileStarting(info.name.clone())
                    } else {
                        VmError::ExitedDuringBoot {
                            vm: info.name.clone(),
                            said: said.clone(),
                        }
                    }
                })));
            }
        }
        for w in state.stop_waiters.drain(..) {
            let _ = w.send(Ok(info.clone()));
        }
        if let Some(w) = state.suspend_waiter.take() {
            let _ = w.send(if suspended {
                Ok(info.clone())
            } else {
                Err(VmError::Conflict(format!(
                    "vm {} exited while it was being suspended",
                    info.name
                )))
            });
        }
        if state.rollback.as_ref().is_some_and(|r| r.after_exit) {
            Self::rollback_after_exit(myself, state);
        }
        if let Some(reply) = state.delete_after_exit.take() {
            Self::delete_now(myself, state, reply).await?;
        }
        Ok(())
    }

    /// Start (or, for a suspended VM, restore) the VM: checks, then the launch in a task
    /// that reports [`VmMsg::Launched`]; `reply` is answered once its guest runs.
    pub(super) async fn begin_start(
        myself: &ActorRef<VmMsg>,
        state: &mut VmActorState,
        progress: Option<ProgressTx>,
        reply: Reply<VmInfo>,
    ) -> Result<(), ActorProcessingErr> {
        if let Err(e) = state.check(Op::Start) {
            let _ = reply.send(Err(e));
            return Ok(());
        }
        // Published ports first: a taken one fails the start before anything runs.
        if let Err(e) = state.published.bind_all(&mut state.rec.publish).await {
            let _ = reply.send(Err(e.into()));
            return Ok(());
        }
        if let Err(e) = ensure_uid(&state.env, &mut state.rec).await {
            let _ = reply.send(Err(e));
            return Ok(());
        }
        state.generation += 1;
        let (was, was_error) = (state.rec.state, state.rec.error.take());
        let restore = state.rec.state == VmState::Suspended;
        state.restoring = restore;
        if !restore {
            // A clone that boots (its saved state discarded) is its own machine from its
            // command line on.
            state.rec.clone_of = None;
            state.rec.warm = None;
        }
        let is_clone = state.rec.clone_of.is_some();
        // A warm snapshot's maker never joins the bridge (see `vm::warm`).
        let bridge = !is_clone && !state.rec.warm_maker;
        state.rec.state = VmState::Starting;
        state.console.boot_from = std::fs::metadata(state.dir.console()).map_or(0, |m| m.len());
        // A store that cannot write (a full disk) fails this start, not the actor:
        // the VM stays as it was, and the caller hears why.
        if let Err(e) = state.persist().await {
            state.rec.state = was;
            state.rec.error = was_error;
            state.restoring = false;
            state.published.unbind_all().await;
            tracing::warn!(vm = %state.rec.name, error = %error_chain(&e), "cannot record the start; the vm is left as it was");
            let _ = reply.send(Err(e));
            return Ok(());
        }
        let generation = state.generation;
        let senders: Vec<ProgressTx> = progress.iter().cloned().collect();
        state.start_waiters.push((reply, progress));
        let (env, rec, dir, me) = (
            Arc::clone(&state.env),
            state.rec.clone(),
            state.dir.clone(),
            myself.clone(),
        );
        let driver = state.driver();
        tracing::info!(vm = %rec.name, vmm = rec.vmm.as_str(), restore, "starting");
        tokio::spawn(async move {
            let result = async {
                // A clone's tap joins the bridge once its guest has its own address.
                let tap = setup_net(&env, &rec, &senders, bridge).await?;
                send_stage(&senders, "disks");
                let (plan, saved) = {
                    let (env, rec, dir) = (Arc::clone(&env), rec.clone(), dir.clone());
                    tokio::task::spawn_blocking(move || {
                        let mut saved = dir.saved_state();
                        if let Some(w) = rec.warm.as_deref().filter(|_| restore)
                            && !saved.is_dir()
                        {
                            // A first start from a warm snapshot: its disks copied (the
                            // snapshot stays for the next VM), and its saved state too for
                            // Firecracker, whose memory file backs the guest's memory for
                            // as long as it runs; QEMU reads it into the guest's own memory
                            // as it loads, so it loads the snapshot's in place.
                            let from = super::warm::dir(&env.warm_dir, w);
                            let qemu = rec.vmm == banger_api::VmmKind::Qemu;
                            super::snapshot::copy_in(&from, &dir, !qemu).map_err(|source| {
                                VmError::Disk(super::disks::DiskError::Io {
                                    path: from.clone(),
                                    source,
                                })
                            })?;
                            if qemu {
                                saved = from.join(super::snapshot::STATE);
                            }
                        }
                        ensure_disks(&dir, rec.spec.disk_bytes)?;
                        if !restore {
                            // Left by a save the daemon did not finish: a cold boot
                            // moves the disks on, so it can never be restored.
                            discard_saved_state(&dir);
                        }
                        let mut plan = plan(&env, &rec, &dir, tap)?;
                        plan.clone = is_clone;
                        Ok::<_, VmError>((plan, saved))
                    })
                    .await
                    .expect("plan does not panic")?
                };
                let stage = |s: &str| send_stage(&senders, s);
                let spawned = |pid: i32, start_time: u64| {
                    if super::orphans::fault("after-spawn") {
                        tracing::error!(vm = %rec.name, pid, "fault injected: killed after the VMM's spawn");
                        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                    }
                    let _ = me.cast(VmMsg::Spawned {
                        generation,
                        pid,
                        start_time,
                    });
                };
                                        let launched = if restore {
                    driver
                        .launch_restored(&plan, &saved, &env.net, &stage, &spawned)
                        .await
                } else {
                    driver.launch(&plan, &env.net, &stage, &spawned).await
                };
                let rt = launched.map_err(|source| VmError::Start {
                    vm: rec.name.clone(),
                    log: plan.console.display().to_string(),
                    source,
                })?;
                if restore {
                    // The guest runs on from it and its disks move on: it can
                    // never be loaded again.
                    let dir = dir.clone();
                    let _ = tokio::task::spawn_blocking(move || discard_saved_state(&dir))
                        .await;
                }
                Ok((rt, plan.cmdline))
            }
            .await;
            if result.is_err() {
                release_net(&env, &rec).await;
            }
            let _ = me.cast(VmMsg::Launched { generation, result });
        });
        Ok(())
    }

    /// Check a suspend can start (running, not already saving, room for the state) and
    /// start the save in a task that reports [`VmMsg::Saved`]; the mailbox stays free
    /// (`vm show` answers while it runs).
    fn begin_suspend(
        myself: &ActorRef<VmMsg>,
        state: &VmActorState,
        progress: Option<ProgressTx>,
    ) -> Result<(), VmError> {
        state.check(Op::Suspend)?;
        let name = &state.rec.name;
        if state.suspend_waiter.is_some() {
            return Err(VmError::Conflict(format!(
                "vm {name} is already being suspended"
            )));
        }
        let Some(rt) = state.rec.runtime.clone() else {
            return Err(VmError::Conflict(format!("vm {name} is not running")));
        };
        let need = super::snapshot::state_space(&state.rec);
        let free = disks::free_bytes(&state.dir.dir).map_err(|source| {
            VmError::Disk(DiskError::Io {
                path: state.dir.dir.clone(),
                source,
            })
        })?;
        if free < need {
            return Err(VmError::Conflict(format!(
                "not enough disk space to suspend vm {name}: its state needs up to {} MiB (its memory), {} has {} MiB free",
                need >> 20,
                state.dir.dir.display(),
                free >> 20
            )));
        }
        let (name, driver, dir, me, generation) = (
            name.clone(),
            state.driver(),
            state.dir.clone(),
            myself.clone(),
            state.generation,
        );
        tracing::info!(vm = %name, "suspending");
        let name = name.clone();
        let memory = state.rec.spec.memory_mib;
        tokio::spawn(async move {
            let tmp = dir.saved_state_tmp();
            let result = async {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || {
                    discard_saved_state(&d);
                    std::fs::create_dir_all(d.saved_state_tmp())
                })
                .await
                .expect("mkdir does not panic")
                .map_err(|source| DiskError::Io {
                    path: tmp.clone(),
                    source,
                })?;
                tell(
                    &progress,
                    "save",
                    format!("memory ({memory} MiB) and device state"),
                );
                driver
                    .save_state(&rt, &dir.run_dir(), &tmp, false)
                    .await
                    .map_err(|source| VmError::Save { vm: name, source })?;
                die_at("mid-save");
                let d = dir.clone();
                tokio::task::spawn_blocking(move || {
                    std::fs::rename(d.saved_state_tmp(), d.saved_state())
                })
                .await
                .expect("rename does not panic")
                .map_err(|source| DiskError::Io {
                    path: dir.saved_state(),
                    source,
                })?;
                die_at("after-save");
                tell(
                    &progress,
                    "stop",
                    "saved; ending the VMM to free its memory",
                );
                Ok::<(), VmError>(())
            }
            .await;
            if result.is_err() {
                let d = dir.clone();
                let _ = tokio::task::spawn_blocking(move || discard_saved_state(&d)).await;
                if let Err(e) = driver.resume(&rt).await {
                    tracing::warn!(error = %error_chain(&e), "resuming the vm after a failed save");
                }
            }
            let _ = me.cast(VmMsg::Saved { generation, result });
        });
        Ok(())
    }

    /// The guest is up (or the agent gave up: `agent_error`): report running.
    async fn now_running(
        state: &mut VmActorState,
        agent_error: Option<String>,
    ) -> Result<(), ActorProcessingErr> {
        state.rec.state = VmState::Running;
        state.rec.started_at = Some(now_secs());
        if agent_error.is_none() {
            // A clone's guest has taken its own identity (see `take_identity`), and a VM
            // restored from a warm snapshot is its own from now on.
            state.rec.clone_of = None;
            state.rec.warm = None;
        }
        state.rec.error = agent_error
            .as_ref()
            .map(|e| format!("the guest agent did not answer: {e}"));
        state.persist().await?;
        let info = state.info();
        tracing::info!(vm = %info.name, pid = info.pid, agent = agent_error.is_none(), "running");
        let secs = state.env.agent_timeout.as_secs();
        for (reply, _progress) in state.start_waiters.drain(..) {
            let _ = reply.send(match &agent_error {
                None => Ok(info.clone()),
                Some(reason) => Err(VmError::AgentUnreachable {
                    vm: info.name.clone(),
                    secs,
                    reason: reason.clone(),
                }),
            });
        }
        Ok(())
    }

    async fn delete_now(
        myself: &ActorRef<VmMsg>,
        state: &mut VmActorState,
        reply: Reply<VmInfo>,
    ) -> Result<(), ActorProcessingErr> {
        // Kill before forgetting: no process of the VM outlives its record.
        if let Err(e) = Self::ensure_gone(state).await {
            let _ = reply.send(Err(e));
            return Ok(());
        }
        // And its tap and NAT rule, whatever a start cut short by a daemon or helper kill
        // left (idempotent): the record is kept while they cannot be removed.
        if state.rec.ip.is_some() && state.env.net.privileged().await {
            let net = &state.env.net;
            let id = &state.rec.id;
            let removed = async {
                net.detach(id).await?;
                net.nat(id, None).await?;
                if crate::net::egress::needs_rules(&state.rec.egress(), state.rec.isolate) {
                    net.egress_remove(id).await?;
                }
                Ok(())
            }
            .await;
            if let Err(source) = removed {
                let _ = reply.send(Err(VmError::Net {
                    vm: state.rec.name.clone(),
                    source,
                }));
                return Ok(());
            }
        }
        let (dir, store, id) = (
            state.dir.clone(),
            Arc::clone(&state.env.store),
            state.rec.id.clone(),
        );
        let result = tokio::task::spawn_blocking(move || -> Result<(), VmError> {
            disks::remove(&dir)?;
            store.delete_vm(&id)?;
            Ok(())
        })
        .await
        .expect("delete does not panic");
        match result {
            Ok(()) => {
                tracing::info!(vm = %state.rec.name, "deleted");
                let _ = reply.send(Ok(state.info()));
                myself.stop(Some("deleted".into()));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
        Ok(())
    }

    /// (Re)start the timer of the VM's deadline, or drop it when the VM has none.
    fn arm_expiry(myself: &ActorRef<VmMsg>, state: &mut VmActorState) {
        state.expiry = state.rec.expires.map(|e| {
            let wait = Duration::from_secs(e.at.saturating_sub(now_secs()));
            ExpiryTimer::after(myself.clone(), wait, e.at)
        });
    }

    /// Make sure no process the record names still runs (a launch's VMM whose failure
    /// left it behind, a helper process): each is killed and waited for.
    async fn ensure_gone(state: &VmActorState) -> Result<(), VmError> {
        let rt = state.rec.runtime.as_ref();
        let procs: Vec<(i32, u64)> = rt
            .map(|r| (r.pid, r.start_time))
            .into_iter()
            .chain(rt.map(|r| r.helpers.clone()).unwrap_or_default())
            .chain(state.rec.spawned)
            .filter(|(pid, start)| proc::alive(*pid, *start))
            .collect();
        for (pid, start) in &procs {
            tracing::warn!(vm = %state.rec.name, pid, "killing a process of the vm before deleting it");
            let sig = nix::sys::signal::Signal::SIGKILL;
            state.env.net.signal(*pid, *start, sig).await;
        }
        for (pid, start) in procs {
            if !proc::wait_gone(pid, start, Duration::from_secs(5)).await {
                return Err(VmError::Conflict(format!(
                    "vm {} still has a process (pid {pid}) that did not end on SIGKILL; it is kept until it does",
                    state.rec.name
                )));
            }
        }
        Ok(())
    }

    async fn kill_now(state: &VmActorState, signal: nix::sys::signal::Signal) {
        if let Some(rt) = &state.rec.runtime {
            state.env.net.signal(rt.pid, rt.start_time, signal).await;
        }
    }
}

// Pause and resume (`vm pause`, `vm resume`).
impl VmActor {
    /// Pause or resume through the VMM, inline: the VMM answers in milliseconds (bounded
    /// by the driver), and a stop, kill or delete queued behind it then sees the VM as it
    /// really is. The record follows only a VMM that said yes.
    async fn pause_resume(state: &mut VmActorState, op: Op) -> Result<VmInfo, VmError> {
        if let Some(why) = state.busy() {
            return Err(VmError::Conflict(why));
        }
        let name = state.rec.name.clone();
        if model::transition(&name, state.rec.state, op)? == model::Transition::AlreadyThere {
            return Ok(state.info());
        }
        let rt = state
            .rec
            .runtime
            .clone()
            .ok_or_else(|| VmError::Conflict(format!("vm {name} has no VMM process")))?;
        let driver = state.driver();
        let (result, next) = match op {
            Op::Pause => (driver.pause(&rt).await, VmState::Paused),
            _ => (driver.resume(&rt).await, VmState::Running),
        };
        result.map_err(|source| VmError::PauseResume {
            vm: name.clone(),
            what: if op == Op::Pause { "pause" } else { "resume" },
            source,
        })?;
        state.rec.state = next;
        state.persist().await?;
        tracing::info!(vm = %name, state = next.as_str(), "vcpus {}", if op == Op::Pause { "paused" } else { "resumed" });
        Ok(state.info())
    }

    /// Resume a paused VM that is being stopped, so its guest can shut down. False when
    /// the VMM would not: it is then killed (its stop waiters hear of it on exit).
    async fn resume_to_stop(state: &VmActorState, rt: &Runtime) -> bool {
        match state.driver().resume(rt).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(vm = %state.rec.name, error = %error_chain(&e), "cannot resume the paused vm to shut it down; killing it");
                Self::kill_now(state, nix::sys::signal::Signal::SIGKILL).await;
                false
            }
        }
    }

    /// A re-adopted VM whose `vm suspend` a daemon's death cut short. The save is renamed
    /// to `state/` only once the VMM wrote all of it, so: with `state/` and the VM paused
    /// (a save leaves the vCPUs stopped), the suspend is finished (the VMM ended, the VM
    /// then `suspended`); a `state.tmp/` is a save that did not finish, discarded, and the
    /// VM stays paused (`vm resume` it, or suspend it again). A `state/` beside a VM that
    /// runs (a restore cut before it removed it) is stale: discarded, so that no later
    /// start restores it.
    async fn settle_cut_suspend(state: &mut VmActorState) {
        let (saved, tmp) = (state.dir.saved_state(), state.dir.saved_state_tmp());
        if saved.is_dir() && state.rec.state == VmState::Paused {
            tracing::warn!(vm = %state.rec.name, "a suspend was cut short after its save was written: finishing it");
            state.suspend_saved = true;
            Self::kill_now(state, nix::sys::signal::Signal::SIGKILL).await;
            return;
        }
        if saved.exists() || tmp.exists() {
            tracing::warn!(vm = %state.rec.name, state = ?state.rec.state, "discarding a saved state a cut-short suspend or restore left");
            let d = state.dir.clone();
            let _ = tokio::task::spawn_blocking(move || discard_saved_state(&d)).await;
        }
    }

    /// A `vm set --disk-size` cut by the daemon's death (`mid-resize`): the work disk's
    /// file is larger than the record says, its filesystem perhaps not grown yet. The
    /// resize is finished (the VM is stopped: a resize needs it) and the record takes the
    /// file's size, as the `vm set` that was cut would have; if it cannot be finished the
    /// record keeps its size and a later `vm set` to the file's size finishes it.
    async fn settle_cut_resize(state: &mut VmActorState) {
        if model::is_active(state.rec.state) {
            return;
        }
        let work = state.dir.work();
        let Ok(len) = std::fs::metadata(&work).map(|m| m.len()) else {
            return;
        };
        if len <= state.rec.spec.disk_bytes {
            return;
        }
        tracing::warn!(vm = %state.rec.name, from = state.rec.spec.disk_bytes, to = len, "a disk resize was cut short: finishing it");
        let dir = state.dir.clone();
        let grown = tokio::task::spawn_blocking(move || disks::grow_work(&dir, len))
            .await
            .expect("resize does not panic");
        match grown {
            Ok(()) => {
                state.rec.spec.disk_bytes = len;
                if let Err(e) = state.persist().await {
                    tracing::warn!(vm = %state.rec.name, error = %error_chain(&e), "recording the finished resize");
                }
            }
            Err(e) => {
                tracing::warn!(vm = %state.rec.name, error = %error_chain(&e), "finishing a cut disk resize; `banger vm set --disk-size` again finishes it")
            }
        }
    }

    /// A clone re-adopted with its identity not taken (the daemon died between its restore
    /// and `take_identity`): its guest still answers for its source, its tap off the
    /// bridge. Take it now, in a task that reports [`VmMsg::IdentityTaken`]; until then
    /// (and if it fails: logged) it stays off the bridge.
    fn finish_identity(myself: &ActorRef<VmMsg>, state: &VmActorState) {
        let (Some(from), Some(rt)) = (state.rec.clone_of.as_ref(), state.rec.runtime.as_ref())
        else {
            return;
        };
        tracing::warn!(vm = %state.rec.name, "a clone re-adopted before it took its own identity: taking it now");
        let req = identity_request(&state.env, &state.rec, from);
        let sock = PathBuf::from(&rt.vsock_socket);
        let (net, id, name) = (
            state.env.net.clone(),
            state.rec.id.clone(),
            state.rec.name.clone(),
        );
        let bridged = state.rec.ip.is_some();
        let (me, generation) = (myself.clone(), state.generation);
        tokio::spawn(async move {
            let result = match banger_guest::host::wait_ready(&sock, CLONE_AGENT_TIMEOUT).await {
                Ok(_) => become_own(&sock, req, &name, &net, bridged.then_some(id.as_str())).await,
                Err(e) => Err(error_chain(&e)),
            };
            let _ = me.cast(VmMsg::IdentityTaken { generation, result });
        });
    }

    /// The state of a re-adopted VMM: paused when the VMM says so, else running (a VMM
    /// that does not answer is taken as running, as before pause existed).
    async fn adopted_state(state: &VmActorState) -> VmState {
        let Some(rt) = state.rec.runtime.as_ref() else {
            return VmState::Running;
        };
        match state.driver().is_paused(rt).await {
            Ok(true) => {
                tracing::info!(vm = %state.rec.name, "the re-adopted vm is paused");
                VmState::Paused
            }
            Ok(false) => VmState::Running,
            Err(e) => {
                tracing::warn!(vm = %state.rec.name, error = %error_chain(&e), "cannot ask the vmm whether it is paused; taking it as running");
                VmState::Running
            }
        }
    }
}

/// The fault-injection points of a suspend, a snapshot and a fork (debug builds,
/// `BANGER_FAULT`, see [`super::orphans::fault`]): bangerd SIGKILLs itself there.
pub(crate) fn die_at(point: &str) {
    if super::orphans::fault(point) {
        tracing::error!(point, "fault injected: killed");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Remove a VM's saved state, and what a save that did not finish left. Blocking.
fn discard_saved_state(dir: &VmDir) {
    for d in [dir.saved_state(), dir.saved_state_tmp()] {
        match std::fs::remove_dir_all(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(dir = %d.display(), error = %e, "removing saved state"),
        }
    }
}

/// Bytes of `path` from `offset` to its end.
fn read_from(path: &std::path::Path, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len <= offset {
        return Ok(Vec::new());
    }
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity((len - offset) as usize);
    f.take(len - offset).read_to_end(&mut buf)?;
    Ok(buf)
}

/// How much console history a new follower gets.
const BACKLOG: u64 = 64 * 1024;

impl Actor for VmActor {
    type Msg = VmMsg;
    type State = VmActorState;
    type Arguments = VmArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<VmMsg>,
        args: VmArgs,
    ) -> Result<VmActorState, ActorProcessingErr> {
        let rec = match args.rec {
            Some(rec) => rec,
            None => {
                let (store, id) = (Arc::clone(&args.env.store), args.id.clone());
                tokio::task::spawn_blocking(move || store.find_vm(&id))
                    .await??
                    .ok_or_else(|| format!("vm {} is not in the store", args.id))?
            }
        };
        let dir = VmDir::new(&args.env.vms_dir, &rec.id);
        let published = super::publish::Published::new(&rec.name);
        Ok(VmActorState {
            rec,
            env: args.env,
            dir,
            generation: 0,
            start_waiters: Vec::new(),
            stop_waiters: Vec::new(),
            delete_after_exit: None,
            suspend_waiter: None,
            suspend_saved: false,
            restoring: false,
            snapshotting: None,
            rollback: None,
            boot_failure: None,
            console: Console {
                tx: Arc::new(std::sync::OnceLock::new()),
                offset: Arc::new(Mutex::new(0)),
                stop: None,
                boot_from: 0,
            },
            published,
            expiry: None,
            adoption: args.adoption,
            store_failure: Mutex::new(None),
        })
    }

    /// Re-adoption (see [`Adoption`]): after the spawn, before the first message.
    async fn post_start(
        &self,
        myself: ActorRef<VmMsg>,
        state: &mut VmActorState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(adoption) = state.adoption.take() else {
            Self::arm_expiry(&myself, state);
            return Ok(());
        };
        // Cleared however this ends: a failed re-adoption fails the actor, whose restart
        // sets it again.
        struct Done(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        let _done = Done(adoption.adopting);
        let snapshot_cut = Self::sweep_snapshots(state).await;
        Self::settle_cut_resize(state).await;
        let _permit = match model::is_active(state.rec.state) {
            true => Some(adoption.permits.acquire_owned().await?),
            false => None,
        };
        // Re-adopt a VM that was running when the daemon stopped, or release what it left.
        if model::is_active(state.rec.state) {
            let adopted = state
                .rec
                .runtime
                .as_ref()
                .is_some_and(|rt| proc::alive(rt.pid, rt.start_time));
            if adopted {
                let stored = state.rec.clone();
                tracing::info!(vm = %state.rec.name, pid = state.rec.runtime.as_ref().map(|r| r.pid), "re-adopted a running vm");
                let driver = state.driver();
                if let Some(rt) = state.rec.runtime.as_mut() {
                    match driver.readopt(rt).await {
                        Ok(true) => {
                            tracing::info!(vm = %state.rec.name, helpers = ?rt.helpers, "restarted the vm's agent proxy");
                        }
                        Ok(false) => {}
                        // The VM runs; its agent is unreachable until it is restarted.
                        Err(e) => {
                            tracing::warn!(vm = %state.rec.name, error = %e, "cannot restart the vm's agent proxy");
                        }
                    }
                }
                state.rec.state = Self::adopted_state(state).await;
                if snapshot_cut {
                    Self::resume_cut_snapshot(state, stored.state).await;
                }
                state.published.rebind_all(&mut state.rec.publish).await;
                let sock = state.rec.runtime.as_ref().map(|r| r.vsock_socket.clone());
                state.published.set_target(sock.map(PathBuf::from));
                // Its filter lives on in nftables; the resolver learns its policy again.
                if let Some(ip) = state.rec.ip.as_deref().and_then(|ip| ip.parse().ok()) {
                    let policy = crate::net::dns::GuestPolicy::new(
                        &state.rec.id,
                        &state.rec.name,
                        state.rec.egress(),
                    );
                    state
                        .env
                        .net
                        .egress
                        .write()
                        .expect("egress policies lock")
                        .insert(ip, Arc::new(policy));
                }
                // Written only if re-adopting changed it: 1000 VMs are not 1000 commits.
                if state.rec != stored {
                    state.persist().await?;
                }
                Self::watch_exit(&myself, state);
                Self::start_console(&myself, state);
                Self::settle_cut_suspend(state).await;
                if state.rec.clone_of.is_some() && state.rec.state == VmState::Running {
                    Self::finish_identity(&myself, state);
                }
            } else {
                tracing::info!(vm = %state.rec.name, "the vm's process is gone; marking it stopped");
                let rt = state.rec.runtime.take();
                // A launch cut short: its process was killed by the start-up census.
                state.rec.spawned = None;
                release_vmm(state, rt).await;
                release_net(&state.env, &state.rec).await;
                state.rec.state = VmState::Stopped;
                // A clone (or warm start) cut before its identity: its next start boots, so
                // it is its own machine then; nothing is pending.
                state.rec.clone_of = None;
                state.rec.warm = None;
                state.persist().await?;
            }
        }
        // A deadline that passed while the daemon was down fires at once.
        Self::arm_expiry(&myself, state);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<VmMsg>,
        msg: VmMsg,
        state: &mut VmActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VmMsg::Info(reply) => {
                let mut info = state.info();
                let Some(ip) = state.running_policy_ip() else {
                    let _ = reply.send(Ok(info));
                    return Ok(());
                };
                info.dns_refused = state.dns_refused(ip);
                let (net, id) = (state.env.net.clone(), state.rec.id.clone());
                tokio::spawn(async move {
                    info.egress_dropped = net.egress_dropped(&id).await;
                    let _ = reply.send(Ok(info));
                });
            }
            VmMsg::Start { progress, reply } => {
                Self::begin_start(&myself, state, progress, reply).await?;
            }
            VmMsg::Spawned {
                generation,
                pid,
                start_time,
            } => {
                if generation == state.generation && state.rec.runtime.is_none() {
                    state.rec.spawned = Some((pid, start_time));
                    state.persist().await?;
                }
            }
            VmMsg::Launched { generation, result } => {
                if generation != state.generation {
                    // A stale launch: make sure its process does not outlive it.
                    if let Ok((rt, _)) = result {
                        let sig = nix::sys::signal::Signal::SIGKILL;
                        state.env.net.signal(rt.pid, rt.start_time, sig).await;
                    }
                    return Ok(());
                }
                match (state.rec.state, result) {
                    (VmState::Starting, Ok((rt, cmdline))) => {
                        state
                            .published
                            .set_target(Some(PathBuf::from(&rt.vsock_socket)));
                        state.rec.runtime = Some(rt);
                        state.rec.spawned = None;
                        state.rec.cmdline = Some(cmdline);
                        state.persist().await?;
                        Self::watch_exit(&myself, state);
                        Self::start_console(&myself, state);
                        let mut timeout = state.env.agent_timeout;
                        if timeout.is_zero()
                            && (state.rec.warm_maker
                                || (state.restoring && state.rec.clone_of.is_some()))
                        {
                            // A clone needs its agent for its identity (and its tap for
                            // the bridge), whatever `agent_timeout_secs` says.
                            timeout = CLONE_AGENT_TIMEOUT;
                        }
                        if timeout.is_zero() {
                            Self::now_running(state, None).await?;
                        } else {
                            for p in state.start_waiters.iter().filter_map(|(_, p)| p.as_ref()) {
                                let _ = p.send(Progress::Stage {
                                    stage: "agent".into(),
                                    detail: None,
                                });
                            }
                            let sock = state
                                .rec
                                .runtime
                                .as_ref()
                                .map(|r| r.vsock_socket.clone())
                                .unwrap_or_default();
                            let me = myself.clone();
                            let ssh_key = state.env.ssh_key.clone();
                            let vm_name = state.rec.name.clone();
                            let restored = state.restoring;
                            // A restored clone takes its own identity, then joins the bridge.
                            let identity = state
                                .rec
                                .clone_of
                                .as_ref()
                                .filter(|_| restored)
                                .map(|c| identity_request(&state.env, &state.rec, c));
                            let (net, id) = (state.env.net.clone(), state.rec.id.clone());
                            let bridged = state.rec.ip.is_some();
                            // started_at is set once running: None means the first start, a
                            // boot or a restore from a warm snapshot (a fork's clone has its
                            // source's: it has their files already). A warm snapshot's maker
                            // gets none: the VMs restored from it get theirs.
                            let file_sync =
                                if state.rec.started_at.is_none() && !state.rec.warm_maker {
                                    state.env.file_sync.clone()
                                } else {
                                    Vec::new()
                                };
                            tokio::spawn(async move {
                                let sock = std::path::Path::new(&sock);
                                let ready = if restored {
                                    wait_restored(sock, &vm_name, timeout).await
                                } else {
                                    banger_guest::host::wait_ready(sock, timeout)
                                        .await
                                        .map(drop)
                                }
                                .map_err(|e| error_chain(&e));
                                // The ssh key goes in beside the identity (other files): a
                                // round trip less for a clone's start.
                                let key = async {
                                    if let Some(key) = &ssh_key
                                        // Not fatal: the VM works without ssh (vm exec).
                                        && let Err(e) = install_ssh_key(key, sock).await
                                    {
                                        tracing::warn!(vm = %vm_name, error = %error_chain(&e), "installing the ssh key");
                                    }
                                };
                                let result = match (ready, identity) {
                                    (Ok(()), Some(req)) => {
                                        let own = become_own(
                                            sock,
                                            req,
                                            &vm_name,
                                            &net,
                                            bridged.then_some(id.as_str()),
                                        );
                                        tokio::join!(own, key).0
                                    }
                                    (Ok(()), None) => {
                                        key.await;
                                        Ok(())
                                    }
                                    (Err(e), _) => Err(e),
                                };
                                if result.is_ok() && !file_sync.is_empty() {
                                    for (what, e) in
                                        super::sshkey::sync_files(sock, file_sync).await
                                    {
                                        tracing::warn!(vm = %vm_name, file = %what, error = %e, "file_sync");
                                    }
                                }
                                let _ = me.cast(VmMsg::AgentReady { generation, result });
                            });
                        }
                    }
                    (VmState::Stopping, Ok((rt, cmdline))) => {
                        // Stopped while starting: it never ran for the caller.
                        state.rec.runtime = Some(rt);
                        state.rec.spawned = None;
                        state.rec.cmdline = Some(cmdline);
                        Self::watch_exit(&myself, state);
                        Self::kill_now(state, nix::sys::signal::Signal::SIGKILL).await;
                        let name = state.rec.name.clone();
                        for (reply, _) in state.start_waiters.drain(..) {
                            let _ = reply.send(Err(VmError::StoppedWhileStarting(name.clone())));
                        }
                    }
                    (was, Err(e)) => {
                        let stopped = was == VmState::Stopping;
                        state.rec.state = if stopped {
                            VmState::Stopped
                        } else if state.restoring && state.dir.saved_state().is_dir() {
                            // Its saved state is intact: it can be started again (or
                            // stopped, which discards it).
                            VmState::Suspended
                        } else {
                            VmState::Error
                        };
                        if stopped && state.restoring {
                            let dir = state.dir.clone();
                            let _ = tokio::task::spawn_blocking(move || discard_saved_state(&dir))
                                .await;
                        }
                        state.rec.error = (!stopped).then(|| error_chain(&e));
                        // The driver returns once a failed launch's process is gone.
                        state.rec.spawned = state
                            .rec
                            .spawned
                            .filter(|(pid, start)| proc::alive(*pid, *start));
                        state.generation += 1;
                        state.published.unbind_all().await;
                        release_vmm(state, None).await;
                        state.persist().await?;
                        tracing::warn!(vm = %state.rec.name, error = %error_chain(&e), "start failed");
                        let message = error_chain(&e);
                        let mut original = Some(e);
                        for (reply, _progress) in state.start_waiters.drain(..) {
                            let err = original
                                .take()
                                .unwrap_or_else(|| VmError::Conflict(message.clone()));
                            let _ = reply.send(Err(err));
                        }
                        let info = state.info();
                        for w in state.stop_waiters.drain(..) {
                            let _ = w.send(Ok(info.clone()));
                        }
                        if let Some(reply) = state.delete_after_exit.take() {
                            Self::delete_now(&myself, state, reply).await?;
                        }
                    }
                    (_, Ok((rt, _))) => {
                        let sig = nix::sys::signal::Signal::SIGKILL;
                        state.env.net.signal(rt.pid, rt.start_time, sig).await;
                    }
                }
            }
            VmMsg::IdentityTaken { generation, result } => {
                if generation != state.generation {
                    return Ok(());
                }
                match result {
                    Ok(()) => {
                        state.rec.clone_of = None;
                        state.rec.warm = None;
                        state.persist().await?;
                        tracing::info!(vm = %state.rec.name, "the re-adopted clone took its own identity");
                    }
                    Err(e) => {
                        tracing::warn!(vm = %state.rec.name, error = %e, "the re-adopted clone could not take its own identity; it stays off the bridge");
                    }
                }
            }
            VmMsg::Prepare { reply } => {
                let (dir, bytes, me) =
                    (state.dir.clone(), state.rec.spec.disk_bytes, myself.clone());
                tokio::spawn(async move {
                    let result = tokio::task::spawn_blocking(move || ensure_disks(&dir, bytes))
                        .await
                        .expect("disks do not panic");
                    let _ = me.cast(VmMsg::Prepared { result, reply });
                });
            }
            VmMsg::Prepared { result, reply } => {
                let _ = reply.send(result.map(|()| state.info()));
            }
            VmMsg::Stop { timeout, reply } => {
                if let Err(e) = state.check(Op::Stop) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                if state.rec.state == VmState::Suspended {
                    // Nothing runs: the saved state is discarded (its next start boots).
                    let dir = state.dir.clone();
                    let _ = tokio::task::spawn_blocking(move || discard_saved_state(&dir)).await;
                    state.rec.state = VmState::Stopped;
                    state.rec.error = None;
                    state.persist().await?;
                    tracing::info!(vm = %state.rec.name, "stopped; its saved state is discarded");
                    let _ = reply.send(Ok(state.info()));
                    return Ok(());
                }
                if state.suspend_waiter.is_some() {
                    let _ = reply.send(Err(VmError::Conflict(format!(
                        "vm {} is being suspended; wait for it, or `banger vm kill {}`",
                        state.rec.name, state.rec.name
                    ))));
                    return Ok(());
                }
                state.stop_waiters.push(reply);
                let was = state.rec.state;
                if was == VmState::Starting || was == VmState::Stopping {
                    state.rec.state = VmState::Stopping;
                    state.persist().await?;
                }
                let Some(rt) = state
                    .rec
                    .runtime
                    .clone()
                    .filter(|_| was != VmState::Stopping)
                else {
                    // Still launching: the launch finishes and is killed (see Launched).
                    // Already stopping: on its way.
                    return Ok(());
                };
                // Running, or launched and waiting for its agent: shut it down.
                state.rec.state = VmState::Stopping;
                state.persist().await?;
                // A paused guest handles no shutdown request: let it run first, or, if the
                // VMM will not, end it (nothing else can stop it).
                if was == VmState::Paused && !Self::resume_to_stop(state, &rt).await {
                    return Ok(());
                }
                let driver = state.driver();
                let timeout = timeout.unwrap_or(state.env.stop_timeout);
                let name = state.rec.name.clone();
                let host = state.env.net.clone();
                // A VMM that outlives its guest's power-off (Firecracker) is stopped by a
                // guest reboot, which ends it (see `Driver::guest_halt_ends_vmm`).
                let reboot = !driver.guest_halt_ends_vmm();
                tokio::spawn(async move {
                    // The agent first (a clean shutdown from inside, for any image), then
                    // the VMM's own way (Ctrl-Alt-Del, or the ACPI power button).
                    let via_agent = banger_guest::host::call(
                        std::path::Path::new(&rt.vsock_socket),
                        &banger_guest::proto::Request::Shutdown { reboot },
                        Duration::from_secs(3),
                    )
                    .await
                    .is_ok();
                    if via_agent {
                        if proc::wait_gone(rt.pid, rt.start_time, timeout).await {
                            return;
                        }
                        tracing::warn!(vm = %name, ?timeout, "the guest did not power off in time; killing");
                    } else if let Err(e) = driver.request_shutdown(&rt).await {
                        tracing::warn!(vm = %name, error = %error_chain(&e), "graceful shutdown request failed; killing");
                    } else if proc::wait_gone(rt.pid, rt.start_time, timeout).await {
                        return;
                    } else {
                        tracing::warn!(vm = %name, ?timeout, "the guest did not shut down in time; killing");
                    }
                    host.signal(rt.pid, rt.start_time, nix::sys::signal::Signal::SIGKILL)
                        .await;
                });
            }
            VmMsg::Suspend { progress, reply } => {
                if let Err(e) = Self::begin_suspend(&myself, state, progress) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                state.suspend_waiter = Some(reply);
            }
            VmMsg::Saved { generation, result } => {
                if generation != state.generation || state.suspend_waiter.is_none() {
                    // The VM exited during the save (its waiter was answered then): what
                    // was saved is of a guest that is gone.
                    if state.rec.state != VmState::Suspended {
                        let dir = state.dir.clone();
                        let _ =
                            tokio::task::spawn_blocking(move || discard_saved_state(&dir)).await;
                    }
                    return Ok(());
                }
                match result {
                    Ok(()) => {
                        // Saved and its vCPUs stopped: end the VMM; its exit
                        // (`on_exited`) makes the VM suspended and answers the caller.
                        state.suspend_saved = true;
                        Self::kill_now(state, nix::sys::signal::Signal::SIGKILL).await;
                    }
                    Err(e) => {
                        tracing::warn!(vm = %state.rec.name, error = %error_chain(&e), "suspend failed; the vm runs on");
                        if let Some(w) = state.suspend_waiter.take() {
                            let _ = w.send(Err(e));
                        }
                    }
                }
            }
            VmMsg::Kill { signal, reply } => {
                if let Err(e) = state.check(Op::Kill) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                if state.rec.state == VmState::Starting && state.rec.runtime.is_none() {
                    // Still launching: the launch finishes and is killed (see Launched).
                    state.rec.state = VmState::Stopping;
                    state.persist().await?;
                    state.stop_waiters.push(reply);
                    return Ok(());
                }
                Self::kill_now(state, signal).await;
                if signal == nix::sys::signal::Signal::SIGKILL {
                    state.stop_waiters.push(reply);
                } else {
                    let _ = reply.send(Ok(state.info()));
                }
            }
            VmMsg::Pause { reply } => {
                let _ = reply.send(Self::pause_resume(state, Op::Pause).await);
            }
            VmMsg::Resume { reply } => {
                let _ = reply.send(Self::pause_resume(state, Op::Resume).await);
            }
            VmMsg::Delete { force, reply } => {
                if let Err(e) = state.check(Op::Delete { force }) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                if model::is_active(state.rec.state) {
                    state.delete_after_exit = Some(reply);
                    if state.rec.state == VmState::Starting {
                        state.rec.state = VmState::Stopping;
                    }
                    Self::kill_now(state, nix::sys::signal::Signal::SIGKILL).await;
                    return Ok(());
                }
                Self::delete_now(&myself, state, reply).await?;
            }
            VmMsg::SnapshotCreate {
                name,
                progress,
                reply,
            } => {
                let what = snapshots::SnapshotFor::Named { name, reply };
                Self::begin_snapshot(&myself, state, what, progress);
            }
            VmMsg::ForkSnapshot {
                copies,
                progress,
                reply,
            } => {
                let what = snapshots::SnapshotFor::Fork { copies, reply };
                Self::begin_snapshot(&myself, state, what, progress);
            }
            VmMsg::Snapshotted { generation, result } => {
                Self::on_snapshotted(state, generation, result).await;
            }
            VmMsg::SnapshotSource { snapshot, reply } => {
                Self::snapshot_source(state, &snapshot, reply);
            }
            VmMsg::SnapshotRemove { snapshot, reply } => {
                let _ = reply.send(Self::remove_snapshot(state, &snapshot).await);
            }
            VmMsg::Rollback {
                snapshot,
                progress,
                reply,
            } => {
                Self::begin_rollback(&myself, state, &snapshot, progress, reply);
            }
            VmMsg::RollbackChecked { result } => {
                Self::on_rollback_checked(&myself, state, result).await;
            }
            VmMsg::RollbackPrepared { result } => {
                Self::on_rollback_prepared(&myself, state, result).await?;
            }
            VmMsg::Expired { at } => {
                let Some(expiry) = state.rec.expires.filter(|e| e.at == at) else {
                    return Ok(());
                };
                // A deadline that passes while the VM starts waits for the start to end: a
                // create or start never fails for its own ttl. The VM is stopped (or
                // deleted) once it is up; a start that fails leaves it stopped, and the
                // deadline is then spent below.
                if state.rec.state == VmState::Starting {
                    state.expiry = Some(ExpiryTimer::after(myself.clone(), EXPIRY_RECHECK, at));
                    return Ok(());
                }
                // Once: a VM started again afterwards runs without a deadline.
                state.rec.expires = None;
                state.expiry = None;
                state.persist().await?;
                let (tx, rx) = ractor::concurrency::oneshot();
                let (what, msg) = if expiry.delete {
                    let msg = VmMsg::Delete {
                        force: true,
                        reply: tx.into(),
                    };
                    ("deleting", msg)
                } else if model::is_active(state.rec.state) {
                    let msg = VmMsg::Stop {
                        timeout: None,
                        reply: tx.into(),
                    };
                    ("stopping", msg)
                } else {
                    tracing::info!(vm = %state.rec.name, "its ttl is up; it is not running");
                    return Ok(());
                };
                tracing::info!(vm = %state.rec.name, "its ttl is up; {what} it");
                let _ = myself.cast(msg);
                let name = state.rec.name.clone();
                tokio::spawn(async move {
                    if let Ok(Err(e)) = rx.await {
                        tracing::warn!(vm = %name, error = %error_chain(&e), "{what} the vm at the end of its ttl");
                    }
                });
            }
            VmMsg::Set { req, reply } => {
                // Persisted with the rest of the change below, or put back if it fails.
                let expires_before = state.rec.expires;
                if let Some(secs) = req.ttl_secs {
                    state.rec.expires = (secs > 0).then(|| banger_api::Expiry {
                        at: now_secs().saturating_add(secs),
                        delete: state.rec.expires.is_some_and(|e| e.delete),
                    });
                }
                let result = async {
                    let resizing =
                        req.vcpu.is_some() || req.memory_mib.is_some() || req.disk_bytes.is_some();
                    if resizing {
                        state.check(Op::Set)?;
                    }
                    let mut spec = state.rec.spec;
                    spec.vcpu = req.vcpu.unwrap_or(spec.vcpu);
                    spec.memory_mib = req.memory_mib.unwrap_or(spec.memory_mib);
                    spec.disk_bytes = req.disk_bytes.unwrap_or(spec.disk_bytes);
                    super::spec::validate(&spec).map_err(VmError::Invalid)?;
                    let old_egress = state.rec.egress();
                    let egress = match (&req.egress, req.nat) {
                        (Some(e), _) => e.clone(),
                        (None, Some(true)) => banger_api::Egress::All,
                        (None, Some(false)) if old_egress.nat() => banger_api::Egress::Subnet,
                        (None, _) => old_egress.clone(),
                    };
                    let isolate = req.isolate.unwrap_or(state.rec.isolate);
                    let mut next = state.rec.clone();
                    next.egress = egress.clone();
                    next.nat = egress.nat();
                    next.isolate = isolate;
                    let ip: Option<std::net::Ipv4Addr> =
                        state.rec.ip.as_deref().and_then(|ip| ip.parse().ok());
                    let net_changes = egress != old_egress || isolate != state.rec.isolate;
                    if net_changes && ip.is_none() && (egress != banger_api::Egress::Subnet || isolate)
                    {
                        return Err(VmError::Invalid(format!(
                            "vm {} has no network (created with --no-network), so no NAT, egress policy or isolation",
                            state.rec.name
                        )));
                    }
                    // A resize needs the VM stopped (Op::Set above), so the disk and a
                    // running VM's rules never change in one call.
                    if let Some(bytes) = req.disk_bytes
                        && state.dir.work().exists()
                    {
                        let dir = state.dir.clone();
                        tokio::task::spawn_blocking(move || disks::grow_work(&dir, bytes))
                            .await
                            .expect("resize does not panic")?;
                    }
                    // Running (or starting): the rules change now, all or nothing; stopped:
                    // at start.
                    if let Some(ip) = ip
                        && net_changes
                        && state.rec.runtime.is_some()
                    {
                        change_net(&state.env, &state.rec, &next, ip)
                            .await
                            .map_err(|source| VmError::Net {
                                vm: state.rec.name.clone(),
                                source,
                            })?;
                    }
                    state.rec.spec = spec;
                    state.rec.nat = next.nat;
                    state.rec.egress = next.egress;
                    state.rec.isolate = next.isolate;
                    state.persist().await?;
                    Ok(state.info())
                }
                .await;
                if result.is_err() {
                    state.rec.expires = expires_before;
                } else if req.ttl_secs.is_some() {
                    Self::arm_expiry(&myself, state);
                }
                let _ = reply.send(result);
            }
            VmMsg::EgressLog(reply) => {
                let mut log = banger_api::EgressLog {
                    vm: state.rec.name.clone(),
                    egress: state.rec.egress(),
                    names: Vec::new(),
                    flows: Vec::new(),
                };
                let Some(ip) = state.running_policy_ip() else {
                    let _ = reply.send(Ok(log));
                    return Ok(());
                };
                log.names = state.refused_names(ip);
                let (net, vm) = (state.env.net.clone(), state.rec.name.clone());
                let id = state.rec.id.clone();
                tokio::spawn(async move {
                    let flows = net
                        .egress_refused(&id)
                        .await
                        .map_err(|source| VmError::Net { vm, source });
                    let _ = reply.send(flows.map(|flows| {
                        log.flows = flows
                            .into_iter()
                            .map(|f| banger_api::RefusedFlow {
                                addr: f.addr.to_string(),
                                proto: f.proto,
                                port: f.port,
                                packets: f.packets,
                                last_secs: f.last_secs.into(),
                            })
                            .collect();
                        log
                    }));
                });
            }
            VmMsg::Stats(reply) => {
                let rt = state.rec.runtime.as_ref();
                let usage = rt.and_then(|r| proc::usage(r.pid));
                let sock = rt
                    .filter(|_| state.rec.state == VmState::Running)
                    .map(|r| r.vsock_socket.clone());
                let mut stats = VmStats {
                    vm: state.rec.name.clone(),
                    state: state.rec.state,
                    pid: rt.map(|r| r.pid),
                    vmm_rss_bytes: usage.map(|u| u.0),
                    vmm_cpu_ms: usage.map(|u| u.1),
                    uptime_secs: (state.rec.state == VmState::Running)
                        .then(|| state.rec.started_at.map(|s| now_secs().saturating_sub(s)))
                        .flatten(),
                    overlay_allocated_bytes: disks::allocated(&state.dir.overlay()),
                    work_allocated_bytes: disks::allocated(&state.dir.work()),
                    guest: None,
                    egress_dropped: None,
                    dns_refused: None,
                };
                let counters = state.running_policy_ip().map(|ip| {
                    stats.dns_refused = state.dns_refused(ip);
                    (state.env.net.clone(), state.rec.id.clone())
                });
                tokio::spawn(async move {
                    if let Some((net, id)) = counters {
                        stats.egress_dropped = net.egress_dropped(&id).await;
                    }
                    if let Some(sock) = sock
                        && let Ok(banger_guest::proto::Response::Stats { stats: g }) =
                            banger_guest::host::call(
                                std::path::Path::new(&sock),
                                &banger_guest::proto::Request::Stats,
                                Duration::from_secs(5),
                            )
                            .await
                    {
                        stats.guest = Some(g);
                    }
                    let _ = reply.send(Ok(stats));
                });
            }
            VmMsg::Follow(reply) => {
                let path = state.dir.console();
                if state.console.stop.is_some() {
                    let off = state.console.offset.lock().expect("console lock");
                    let rx = state
                        .console
                        .tx
                        .get_or_init(|| broadcast::channel(256).0)
                        .subscribe();
                    let from = off.saturating_sub(BACKLOG);
                    let backlog = read_range(&path, from, *off);
                    drop(off);
                    let _ = reply.send((backlog, Some(rx)));
                } else {
                    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    let _ = reply.send((read_range(&path, len.saturating_sub(BACKLOG), len), None));
                }
            }
            VmMsg::AgentReady { generation, result } => {
                if generation == state.generation && state.rec.state == VmState::Starting {
                    Self::now_running(state, result.err()).await?;
                }
            }
            #[cfg(test)]
            VmMsg::TestHold(release) => {
                let _ = release.await;
            }
            VmMsg::Ports(reply) => {
                let running = state.rec.state == VmState::Running;
                let Some(rt) = state.rec.runtime.clone().filter(|_| running) else {
                    let name = &state.rec.name;
                    let _ = reply.send(Err(VmError::Conflict(
                        if state.rec.state == VmState::Paused {
                            banger_api::paused_refusal(name)
                        } else {
                            format!("vm {name} is not running")
                        },
                    )));
                    return Ok(());
                };
                let vm = state.rec.name.clone();
                tokio::spawn(async move {
                    let r = banger_guest::host::call(
                        std::path::Path::new(&rt.vsock_socket),
                        &banger_guest::proto::Request::Ports,
                        Duration::from_secs(10),
                    )
                    .await;
                    let _ = reply.send(match r {
                        Ok(banger_guest::proto::Response::Ports { ports }) => Ok(ports),
                        Ok(other) => Err(VmError::Agent {
                            vm,
                            reason: format!("unexpected answer {other:?}"),
                        }),
                        Err(e) => Err(VmError::Agent {
                            vm,
                            reason: error_chain(&e),
                        }),
                    });
                });
            }
            VmMsg::Port { op, reply } => {
                let result = state.published.apply(&mut state.rec.publish, op).await;
                if matches!(
                    result,
                    Ok(super::publish::PortAnswer::Added(_)
                        | super::publish::PortAnswer::Removed(_))
                ) {
                    state.persist().await?;
                }
                let _ = reply.send(result.map_err(VmError::from));
            }
            VmMsg::Exited { generation } => {
                if generation == state.generation && state.rec.runtime.is_some() {
                    Self::on_exited(&myself, state).await?;
                }
            }
            VmMsg::InitMissing { generation, line } => {
                if generation == state.generation
                    && state.rec.state == VmState::Starting
                    && state.rec.runtime.is_some()
                {
                    let e = VmError::NoInit {
                        vm: state.rec.name.clone(),
                        line,
                    };
                    tracing::warn!(vm = %state.rec.name, error = %e, "start failed");
                    state.rec.error = Some(e.to_string());
                    // It would wait in a rescue shell forever: end it. The start's callers
                    // are answered once it is gone (`on_exited`), so they find it stopped.
                    state.boot_failure = Some(e);
                    Self::kill_now(state, nix::sys::signal::Signal::SIGKILL).await;
                }
            }
            VmMsg::GuestHalted { generation } => {
                if generation == state.generation && state.rec.runtime.is_some() {
                    // Nothing is lost: the guest synced and halted; only the process is
                    // left, and it would never exit by itself.
                    tracing::info!(vm = %state.rec.name, "the guest powered off; ending its VMM, which outlives a guest power-off");
                    Self::kill_now(state, nix::sys::signal::Signal::SIGKILL).await;
                }
            }
        }
        Ok(())
    }
}

/// The first whole line of console `text` that says the init is missing, if any.
fn missing_init_line(text: &str) -> Option<String> {
    text.lines()
        .map(|l| l.trim_matches(['\r', ' ']))
        .find(|l| super::cmdline::init_missing(l))
        .map(str::to_owned)
}

fn read_range(path: &std::path::Path, from: u64, to: u64) -> String {
    let bytes = read_from(path, from).unwrap_or_default();
    let n = (to.saturating_sub(from) as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[..n]).into_owned()
}
