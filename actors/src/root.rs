//! RootSupervisor: starts the tree, restarts failed children, and hands out [`Tree`], the
//! handle the RPC layer uses to reach the actors.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use banger_api::{CreateVm, SpecDefaults, VmInfo};

use crate::image::{ImageError, ImageRecord, KernelRecord};
use crate::net::dns::{DnsActor, DnsMsg};
use crate::net::host::{
    HelperActor, HelperMsg, HostNet, NatActor, NatMsg, NetActor, NetMsg, SharedHelper,
};
use crate::pull::{PullActor, PullConfig, PullEnv, PullError, PullMsg};
use crate::store::{Named, Store, StoreActor, StoreError, StoreInfo, StoreMsg};
use crate::updater::actor::{UpdaterActor, UpdaterError, UpdaterMsg};
use crate::vm::actor::{ProgressTx, VmEnv, VmError, VmMsg};
use crate::vm_supervisor::{VmSettings, VmSupervisor, VmSupervisorArgs, VmSupervisorMsg};
use crate::vmm::VmmConfig;

/// At most this many restarts of one child within [`RESTART_WINDOW`]...
pub const MAX_RESTARTS: usize = 5;
/// ...else the root stops and the daemon exits.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// How long a caller waits for an actor's answer before giving up.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const CALL_MS: u64 = 30_000;

/// Errors reaching the tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("failed to start the supervision tree")]
    Spawn(#[source] ractor::SpawnErr),
    #[error("the {0} actor did not answer")]
    Call(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A name given with a request names nothing (`image register --kernel nope`).
    #[error(transparent)]
    NotFound(#[from] crate::not_found::NotFound),
    #[error(transparent)]
    Updater(#[from] UpdaterError),
    #[error(transparent)]
    Pull(#[from] Arc<PullError>),
}

/// Everything the VM side of the tree needs besides the store.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub data_dir: std::path::PathBuf,
    pub vmm: VmmConfig,
    pub stop_timeout: Duration,
    pub extra_cmdline: String,
    pub tsc_khz: Option<u64>,
    /// See [`crate::vm::actor::VmEnv::agent_timeout`].
    pub agent_timeout: Duration,
    /// banger's ssh key (private key path), installed into guests; None: no ssh.
    pub ssh_key: Option<std::path::PathBuf>,
    /// `[[file_sync]]`: copied into each new VM's /root at its first boot.
    pub file_sync: Vec<crate::vm::sshkey::FileSync>,
    /// Where the `.vm` resolver listens (None: off).
    pub dns_listen: Option<std::net::SocketAddr>,
    /// The guests' resolver on the bridge (bound by bangerd as root), if any.
    pub guest_dns: Option<crate::net::dns::GuestDns>,
    pub settings: VmSettings,
    /// Image and kernel pulls (catalogs, registries, caches).
    pub pull: PullConfig,
}

/// Current references to the tree's actors. A restart replaces the reference in place,
/// so holders of a `Tree` always reach the live actor.
#[derive(Debug, Clone)]
pub struct Tree {
    root: ActorRef<RootMsg>,
    db: Arc<Store>,
    data_dir: std::path::PathBuf,
    store: Slot<StoreMsg>,
    vms: Slot<VmSupervisorMsg>,
    dns: Slot<DnsMsg>,
    net: HostNet,
    updater: Slot<UpdaterMsg>,
    pulls: Slot<PullMsg>,
    pull_env: Arc<PullEnv>,
    default_image: Option<String>,
}

/// The current reference to one child, written by the root whenever it (re)spawns it.
type Slot<M> = Arc<RwLock<Option<ActorRef<M>>>>;

/// Messages of the root (none yet beyond supervision; kept for the tree's shape).
#[derive(Debug)]
pub enum RootMsg {}

#[derive(Debug, Default)]
pub struct RootSupervisor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Store,
    Helper,
    Net,
    Nat,
    Vms,
    Dns,
    Updater,
    Pull,
}

impl Child {
    fn name(self) -> &'static str {
        match self {
            Child::Store => "store",
            Child::Helper => "helper",
            Child::Net => "net",
            Child::Nat => "nat",
            Child::Vms => "vm-supervisor",
            Child::Dns => "dns",
            Child::Updater => "updater",
            Child::Pull => "pull",
        }
    }
}

/// Arguments of the root.
#[derive(Debug)]
pub struct RootArgs {
    store: Arc<Store>,
    vm: VmConfig,
    store_ref: Slot<StoreMsg>,
    vms_ref: Slot<VmSupervisorMsg>,
    dns_ref: Slot<DnsMsg>,
    net: HostNet,
    /// The privileged helper process (None: bangerd is not root).
    helper: SharedHelper,
    updater_ref: Slot<UpdaterMsg>,
    pull_ref: Slot<PullMsg>,
    /// Kept here so a restarted PullActor shares the blob cache's locks with the tree.
    pull_env: Arc<PullEnv>,
    /// The `.vm` names, shared by the VM supervisor and the DNS actor; kept here so a
    /// restart of either keeps it.
    dns_table: crate::net::dns::Table,
}

#[derive(Debug)]
pub struct RootState {
    args: RootArgs,
    children: Vec<(Child, ActorCell)>,
    restarts: Vec<(Child, VecDeque<Instant>)>,
}

impl RootSupervisor {
    async fn spawn_child(
        myself: &ActorRef<RootMsg>,
        state: &mut RootState,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        let cell = match child {
            Child::Store => {
                let (r, _) = Actor::spawn_linked(
                    None,
                    StoreActor,
                    Arc::clone(&state.args.store),
                    myself.get_cell(),
                )
                .await?;
                *state.args.store_ref.write().expect("tree lock") = Some(r.clone());
                r.get_cell()
            }
            Child::Helper => {
                let (r, _) = Actor::spawn_linked(
                    None,
                    HelperActor,
                    Arc::clone(&state.args.helper),
                    myself.get_cell(),
                )
                .await?;
                *state.args.net.helper.write().expect("tree lock") = Some(r.clone());
                r.get_cell()
            }
            Child::Net => {
                let helper = Arc::clone(&state.args.net.helper);
                let (r, _) = Actor::spawn_linked(None, NetActor, helper, myself.get_cell()).await?;
                *state.args.net.net.write().expect("tree lock") = Some(r.clone());
                r.get_cell()
            }
            Child::Nat => {
                let helper = Arc::clone(&state.args.net.helper);
                let (r, _) = Actor::spawn_linked(None, NatActor, helper, myself.get_cell()).await?;
                *state.args.net.nat.write().expect("tree lock") = Some(r.clone());
                r.get_cell()
            }
            Child::Vms => {
                let vm = &state.args.vm;
                let env = Arc::new(VmEnv {
                    store: Arc::clone(&state.args.store),
                    vms_dir: vm.data_dir.join("vms"),
                    vmm: vm.vmm.clone(),
                    stop_timeout: vm.stop_timeout,
                    extra_cmdline: vm.extra_cmdline.clone(),
                    tsc_khz: vm.tsc_khz,
                    agent_timeout: vm.agent_timeout,
                    net: state.args.net.clone(),
                    subnet: vm.settings.subnet,
                    qemu_tap_uid: nix::unistd::geteuid().as_raw(),
                    ssh_key: vm
                        .ssh_key
                        .clone()
                        .map(|p| Arc::new(crate::vm::sshkey::SshKey::new(p))),
                    file_sync: vm.file_sync.clone(),
                });
                let args = VmSupervisorArgs {
                    env,
                    settings: vm.settings.clone(),
                    dns: Arc::clone(&state.args.dns_table),
                };
                let (r, _) =
                    Actor::spawn_linked(None, VmSupervisor, args, myself.get_cell()).await?;
                *state.args.vms_ref.write().expect("tree lock") = Some(r.clone());
                r.get_cell()
            }
            Child::Dns => {
                let args = (
                    state.args.vm.dns_listen,
                    Arc::clone(&state.args.dns_table),
                    state.args.vm.guest_dns.clone(),
                );
                let (r, _) = Actor::spawn_linked(None, DnsActor, args, myself.get_cell()).await?;
                *state.args.dns_ref.write().expect("tree lock") = Some(r.clone());
                r.get_cell()
            }
            Child::Updater => {
                let vms = Arc::clone(&state.args.vms_ref);
                let (r, _) =
                    Actor::spawn_linked(None, UpdaterActor, vms, myself.get_cell()).await?;
                *state.args.updater_ref.write().expect("tree lock") = Some(r.clone());
                r.get_cell()
            }
            Child::Pull => {
                let env = Arc::clone(&state.args.pull_env);
                let (r, _) = Actor::spawn_linked(None, PullActor, env, myself.get_cell()).await?;
                *state.args.pull_ref.write().expect("tree lock") = Some(r.clone());
                r.get_cell()
            }
        };
        state.children.retain(|(c, _)| *c != child);
        state.children.push((child, cell));
        Ok(())
    }
}

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RootArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = RootState {
            args,
            children: Vec::new(),
            restarts: Vec::new(),
        };
        for child in [
            Child::Store,
            Child::Helper,
            Child::Net,
            Child::Nat,
            Child::Vms,
            Child::Dns,
            Child::Updater,
            Child::Pull,
        ] {
            state.restarts.push((child, VecDeque::new()));
            Self::spawn_child(&myself, &mut state, child).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A child only stops on its own during shutdown, and then the root is stopping too
        // and handles no more events: so any exit seen here is unexpected and restarted.
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, reason) => (cell, reason.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let Some(child) = state
            .children
            .iter()
            .find(|(_, c)| c.get_id() == cell.get_id())
            .map(|(c, _)| *c)
        else {
            return Ok(());
        };
        let now = Instant::now();
        let history = &mut state
            .restarts
            .iter_mut()
            .find(|(c, _)| *c == child)
            .expect("every child has a restart history")
            .1;
        while history
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            history.pop_front();
        }
        if history.len() >= MAX_RESTARTS {
            tracing::error!(child = child.name(), %reason, "child failed too often; stopping the tree");
            myself.stop(Some(format!(
                "{} failed {} times within {:?}: {reason}",
                child.name(),
                MAX_RESTARTS + 1,
                RESTART_WINDOW
            )));
            return Ok(());
        }
        history.push_back(now);
        tracing::warn!(child = child.name(), %reason, "child failed; restarting it");
        Self::spawn_child(&myself, state, child).await
    }
}

impl Tree {
    /// Start the tree on an open store. Returns the tree handle and the root's join handle
    /// (which completes when the tree stops).
    pub async fn start(
        store: Store,
        vm: VmConfig,
        helper: Option<banger_policy::Helper>,
    ) -> Result<(Tree, tokio::task::JoinHandle<()>), TreeError> {
        let net = HostNet {
            net: Arc::new(RwLock::new(None::<ActorRef<NetMsg>>)),
            nat: Arc::new(RwLock::new(None::<ActorRef<NatMsg>>)),
            helper: Arc::new(RwLock::new(None::<ActorRef<HelperMsg>>)),
        };
        let store_ref = Arc::new(RwLock::new(None));
        let vms_ref = Arc::new(RwLock::new(None));
        let dns_ref = Arc::new(RwLock::new(None));
        let updater_ref = Arc::new(RwLock::new(None));
        let pull_ref = Arc::new(RwLock::new(None));
        let db = Arc::new(store);
        let data_dir = vm.data_dir.clone();
        let default_image = vm.settings.default_image.clone();
        let pull_env = PullEnv::new(vm.pull.clone(), Arc::clone(&db));
        let args = RootArgs {
            store: Arc::clone(&db),
            vm,
            store_ref: Arc::clone(&store_ref),
            vms_ref: Arc::clone(&vms_ref),
            dns_ref: Arc::clone(&dns_ref),
            net: net.clone(),
            helper: Arc::new(std::sync::Mutex::new(helper)),
            updater_ref: Arc::clone(&updater_ref),
            pull_ref: Arc::clone(&pull_ref),
            pull_env: Arc::clone(&pull_env),
            dns_table: Default::default(),
        };
        let (root, join) = Actor::spawn(None, RootSupervisor, args)
            .await
            .map_err(TreeError::Spawn)?;
        let tree = Tree {
            root,
            db,
            data_dir,
            store: store_ref,
            vms: vms_ref,
            dns: dns_ref,
            net,
            updater: updater_ref,
            pulls: pull_ref,
            pull_env,
            default_image,
        };
        Ok((tree, join))
    }

    fn store(&self) -> ActorRef<StoreMsg> {
        live(&self.store)
    }

    /// The store's metadata.
    pub async fn store_info(&self) -> Result<StoreInfo, TreeError> {
        ractor::call_t!(
            self.store(),
            StoreMsg::Info,
            CALL_TIMEOUT.as_millis() as u64
        )
        .map_err(|_| TreeError::Call("store"))?
        .map_err(TreeError::Store)
    }

    /// Count a daemon start on the store.
    pub async fn record_start(&self) -> Result<u64, TreeError> {
        ractor::call_t!(
            self.store(),
            StoreMsg::RecordStart,
            CALL_TIMEOUT.as_millis() as u64
        )
        .map_err(|_| TreeError::Call("store"))?
        .map_err(TreeError::Store)
    }

    /// Number of VM actors alive.
    pub async fn vm_count(&self) -> Result<usize, TreeError> {
        let vms = live(&self.vms);
        ractor::call_t!(vms, VmSupervisorMsg::Count, CALL_TIMEOUT.as_millis() as u64)
            .map_err(|_| TreeError::Call("vm-supervisor"))
    }

    /// Where the `.vm` resolver listens, if it does.
    pub async fn dns_addr(&self) -> Option<std::net::SocketAddr> {
        ractor::call_t!(live(&self.dns), DnsMsg::Addr, CALL_MS)
            .ok()
            .flatten()
    }

    /// The privileged helper's confinement, when bangerd has a helper.
    pub async fn helper_confinement(&self) -> Option<banger_policy::Confinement> {
        self.net.confinement().await
    }

    /// The update gate: may `banger update` to `version` proceed now? Refused while a VM
    /// operation is in flight unless `force`; answers the VMs that were in flight.
    pub async fn update_gate(
        &self,
        version: String,
        force: bool,
    ) -> Result<Vec<String>, TreeError> {
        ractor::call!(live(&self.updater), |reply| UpdaterMsg::Gate {
            version,
            force,
            reply
        })
        .map_err(|_| TreeError::Call("updater"))?
        .map_err(TreeError::Updater)
    }

    fn vms(&self) -> ActorRef<VmSupervisorMsg> {
        live(&self.vms)
    }

    /// Defaults a new VM would get.
    pub async fn vm_defaults(&self) -> Result<SpecDefaults, TreeError> {
        ractor::call_t!(self.vms(), VmSupervisorMsg::Defaults, CALL_MS)
            .map_err(|_| TreeError::Call("vm-supervisor"))
    }

    /// Create (and start) a VM; progress goes to `progress` while it boots. A missing image
    /// that the catalog has (the default image, typically) is pulled first, and then the
    /// kernel its record names if that is missing and in the kernel catalog: both show as a
    /// `pull` stage.
    pub async fn create_vm(
        &self,
        req: CreateVm,
        progress: Option<ProgressTx>,
    ) -> Result<VmInfo, TreeError> {
        // A size the VM could never have is refused before minutes of pulling for it.
        crate::vm::spec::validate_given(req.vcpu, req.memory_mib, req.disk_bytes)
            .map_err(VmError::Invalid)?;
        self.auto_pull(&req, progress.as_ref()).await?;
        ractor::call!(self.vms(), |reply| VmSupervisorMsg::Create {
            req,
            progress,
            reply
        })
        .map_err(|_| TreeError::Call("vm-supervisor"))?
        .map_err(TreeError::Vm)
    }

    async fn auto_pull(
        &self,
        req: &CreateVm,
        progress: Option<&ProgressTx>,
    ) -> Result<(), TreeError> {
        let Some(image) = req.image.clone().or_else(|| self.default_image.clone()) else {
            return Ok(());
        };
        let catalogs = Arc::clone(&self.pull_env.config.catalogs);
        let stage = |detail: String| {
            if let Some(p) = progress {
                let _ = p.send(banger_api::Progress::Stage {
                    stage: "pull".into(),
                    detail: Some(detail),
                });
            }
        };
        let record = match self.image(image.clone()).await? {
            Some(r) => r,
            None if catalogs.image(&image).is_some() => {
                let entry = catalogs.image(&image).expect("just checked");
                let events = if entry.bundle.is_none() && entry.recipe.is_some() {
                    let (mirror, _) = crate::pull::build::default_mirror(&self.pull_env.config);
                    stage(format!("building {image} from {mirror}, once"));
                    // The build's own stages, as `pull` stages of the create.
                    progress.cloned().map(|p| {
                        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                        tokio::spawn(async move {
                            while let Some(ev) = rx.recv().await {
                                if let banger_api::PullEvent::Stage { stage, detail } = ev {
                                    let detail = match detail {
                                        Some(d) => format!("{stage}: {d}"),
                                        None => stage,
                                    };
                                    let _ = p.send(banger_api::Progress::Stage {
                                        stage: "pull".into(),
                                        detail: Some(detail),
                                    });
                                }
                            }
                        });
                        tx
                    })
                } else {
                    stage(format!("image {image} (not here yet; from the catalog)"));
                    None
                };
                let req = banger_api::PullImage {
                    source: image.clone(),
                    ..Default::default()
                };
                match self.pull_image(req, events).await {
                    Ok(r) => r,
                    // Pulled meanwhile by someone else: fine.
                    Err(TreeError::Pull(e)) if matches!(*e, PullError::Exists(_)) => {
                        match self.image(image.clone()).await? {
                            Some(r) => r,
                            None => return Err(TreeError::Pull(e)),
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            None => return Ok(()),
        };
        let Some(kernel) = req.kernel.clone().or(record.kernel) else {
            return Ok(());
        };
        if self.kernel(kernel.clone()).await?.is_none() && catalogs.kernel(&kernel).is_some() {
            stage(format!("kernel {kernel} (not here yet; from the catalog)"));
            match self.pull_kernel(kernel, None).await {
                Ok(_) => {}
                Err(TreeError::Pull(e)) if matches!(*e, PullError::Exists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn pulls(&self) -> ActorRef<PullMsg> {
        live(&self.pulls)
    }

    /// Pull an image (catalog or OCI) through the PullActor.
    pub async fn pull_image(
        &self,
        req: banger_api::PullImage,
        events: Option<crate::pull::EventTx>,
    ) -> Result<ImageRecord, TreeError> {
        ractor::call!(self.pulls(), |reply| PullMsg::Image { req, events, reply })
            .map_err(|_| TreeError::Call("pull"))?
            .map_err(TreeError::Pull)
    }

    /// `image promote`: make the running VM `req.vm`'s root filesystem image `req.name`
    /// (through the PullActor, which runs it like a pull: see [`crate::pull::promote`]). An
    /// unknown VM is not found; a VM that is not running is a conflict that says to start
    /// it (only the running guest sees its merged root).
    pub async fn promote_image(
        &self,
        req: banger_api::PromoteImage,
        events: Option<crate::pull::EventTx>,
    ) -> Result<ImageRecord, TreeError> {
        crate::image::validate_name(&req.name)?;
        if let Some(size) = req.size_bytes
            && size < crate::pull::ext4::MIN_SIZE
        {
            return Err(TreeError::Pull(Arc::new(PullError::Size(format!(
                "{size} bytes is below the minimum of {} MiB",
                crate::pull::ext4::MIN_SIZE >> 20
            )))));
        }
        let info = self.ask_vm(&req.vm, VmMsg::Info).await?;
        let socket = match (info.state, info.vsock_socket) {
            (banger_api::VmState::Running, Some(s)) => s,
            (state, _) => {
                return Err(TreeError::Vm(VmError::Conflict(format!(
                    "vm {vm} is {state}: promote reads the running guest's root filesystem; start it with `banger vm start {vm}`",
                    vm = info.name,
                    state = state.as_str()
                ))));
            }
        };
        let plan = crate::pull::promote::PromotePlan {
            vm: info.name,
            vm_id: info.id,
            socket: socket.into(),
            kernel: info.kernel,
            name: req.name,
            size_bytes: req.size_bytes,
        };
        ractor::call!(self.pulls(), |reply| PullMsg::Promote {
            plan,
            events,
            reply
        })
        .map_err(|_| TreeError::Call("pull"))?
        .map_err(TreeError::Pull)
    }

    /// `image build`: an image and its kernel from a mirror, through the PullActor (see
    /// [`crate::pull::build`]).
    pub async fn build_image(
        &self,
        req: banger_api::BuildImage,
        events: Option<crate::pull::EventTx>,
    ) -> Result<ImageRecord, TreeError> {
        ractor::call!(self.pulls(), |reply| PullMsg::Build { req, events, reply })
            .map_err(|_| TreeError::Call("pull"))?
            .map_err(TreeError::Pull)
    }

    /// Pull a kernel from the kernel catalog through the PullActor.
    pub async fn pull_kernel(
        &self,
        name: String,
        events: Option<crate::pull::EventTx>,
    ) -> Result<KernelRecord, TreeError> {
        ractor::call!(self.pulls(), |reply| PullMsg::Kernel {
            name,
            events,
            reply
        })
        .map_err(|_| TreeError::Call("pull"))?
        .map_err(TreeError::Pull)
    }

    /// Keys of the pulls in flight.
    pub async fn pulls_in_flight(&self) -> Result<Vec<String>, TreeError> {
        ractor::call_t!(self.pulls(), PullMsg::InFlight, CALL_MS)
            .map_err(|_| TreeError::Call("pull"))
    }

    /// The image and kernel catalogs in use.
    pub fn catalogs(&self) -> Arc<crate::pull::catalog::Catalogs> {
        Arc::clone(&self.pull_env.config.catalogs)
    }

    /// Layer blobs in the cache.
    pub async fn blob_cache_list(&self) -> Result<Vec<banger_api::CachedBlob>, TreeError> {
        let env = Arc::clone(&self.pull_env);
        tokio::task::spawn_blocking(move || env.blobs.list())
            .await
            .map_err(|_| TreeError::Call("pull"))?
            .map_err(|e| TreeError::Pull(Arc::new(e)))
    }

    /// Empty the layer cache (blobs being fetched stay).
    pub async fn blob_cache_prune(&self) -> Result<banger_api::CachePruned, TreeError> {
        let env = Arc::clone(&self.pull_env);
        tokio::task::spawn_blocking(move || env.blobs.prune())
            .await
            .map_err(|_| TreeError::Call("pull"))?
            .map_err(|e| TreeError::Pull(Arc::new(e)))
    }

    /// The actor of a VM.
    pub async fn vm(&self, name: &str) -> Result<ActorRef<VmMsg>, TreeError> {
        let vm = name.to_owned();
        ractor::call_t!(
            self.vms(),
            |reply| VmSupervisorMsg::Get { vm, reply },
            CALL_MS
        )
        .map_err(|_| TreeError::Call("vm-supervisor"))?
        .map_err(TreeError::Vm)
    }

    /// Ask a VM something and wait for the answer (no timeout: a start or stop can be long).
    pub async fn ask_vm<T>(
        &self,
        name: &str,
        msg: impl FnOnce(ractor::RpcReplyPort<Result<T, VmError>>) -> VmMsg,
    ) -> Result<T, TreeError>
    where
        T: Send + 'static,
    {
        let actor = self.vm(name).await?;
        ractor::call!(actor, msg)
            .map_err(|_| TreeError::Vm(VmError::Gone(name.into())))?
            .map_err(TreeError::Vm)
    }

    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, TreeError> {
        ractor::call!(self.vms(), VmSupervisorMsg::List)
            .map_err(|_| TreeError::Call("vm-supervisor"))?
            .map_err(TreeError::Vm)
    }

    /// Run blocking store work on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store, &std::path::Path) -> Result<T, TreeError> + Send + 'static,
    ) -> Result<T, TreeError> {
        let (db, dir) = (Arc::clone(&self.db), self.data_dir.clone());
        tokio::task::spawn_blocking(move || f(&db, &dir))
            .await
            .expect("store work does not panic")
    }

    /// Register a local ext4 file as an image (under a reservation of its name: see
    /// [`crate::store::Reservation`]).
    pub async fn register_image(
        &self,
        name: String,
        rootfs: std::path::PathBuf,
        kernel: Option<String>,
    ) -> Result<ImageRecord, TreeError> {
        let db = Arc::clone(&self.db);
        let guest_dir = self.pull_env.config.guest_binaries_dir.clone();
        self.blocking(move |_, dir| {
            crate::image::validate_name(&name)?;
            let reservation = db.reserve(Named::Image, &name, "being registered")?;
            if let Some(k) = &kernel
                && db.get_kernel(k)?.is_none()
            {
                return Err(crate::not_found::NotFound::kernel(k).into());
            }
            let rec = crate::image::register_image(
                &dir.join("images"),
                &name,
                &rootfs,
                kernel,
                &guest_dir,
            )?;
            reservation.publish_image(&rec)?;
            Ok(rec)
        })
        .await
    }

    pub async fn images(&self) -> Result<Vec<ImageRecord>, TreeError> {
        self.blocking(|db, _| Ok(db.list_images()?)).await
    }

    pub async fn image(&self, name: String) -> Result<Option<ImageRecord>, TreeError> {
        self.blocking(move |db, _| Ok(db.get_image(&name)?)).await
    }

    /// Delete an image no VM uses: the check and the delete are one store transaction, so a
    /// `vm create` naming it either is seen (and the delete refused, naming the VMs) or is
    /// refused itself.
    pub async fn delete_image(&self, name: String) -> Result<Option<ImageRecord>, TreeError> {
        let db = Arc::clone(&self.db);
        self.blocking(move |_, dir| {
            let Some((rec, deleting)) = db.delete_image_unused(&name)? else {
                return Ok(None);
            };
            let _ = std::fs::remove_dir_all(dir.join("images").join(&name));
            drop(deleting);
            Ok(Some(rec))
        })
        .await
    }

    /// Import a kernel from a directory (under a reservation of its name).
    pub async fn import_kernel(
        &self,
        name: String,
        from: std::path::PathBuf,
    ) -> Result<KernelRecord, TreeError> {
        let db = Arc::clone(&self.db);
        self.blocking(move |_, dir| {
            crate::image::validate_name(&name)?;
            let reservation = db.reserve(Named::Kernel, &name, "being imported")?;
            let rec = crate::image::import_kernel(&dir.join("kernels"), &name, &from)?;
            reservation.publish_kernel(&rec)?;
            Ok(rec)
        })
        .await
    }

    pub async fn kernels(&self) -> Result<Vec<KernelRecord>, TreeError> {
        self.blocking(|db, _| Ok(db.list_kernels()?)).await
    }

    pub async fn kernel(&self, name: String) -> Result<Option<KernelRecord>, TreeError> {
        self.blocking(move |db, _| Ok(db.get_kernel(&name)?)).await
    }

    /// Remove a kernel no VM uses (check and delete in one transaction, as for images).
    pub async fn remove_kernel(&self, name: String) -> Result<Option<KernelRecord>, TreeError> {
        let db = Arc::clone(&self.db);
        self.blocking(move |_, dir| {
            let Some((rec, deleting)) = db.delete_kernel_unused(&name)? else {
                return Ok(None);
            };
            let _ = std::fs::remove_dir_all(dir.join("kernels").join(&name));
            drop(deleting);
            Ok(Some(rec))
        })
        .await
    }

    /// Stop the whole tree (children first, by ractor's linking).
    pub fn stop(&self) {
        self.root.stop(Some("daemon shutting down".into()));
    }

    #[doc(hidden)]
    /// Test support: the live StoreActor's cell, to make it fail.
    pub fn store_cell(&self) -> ActorCell {
        self.store().get_cell()
    }
}

fn live<M>(slot: &Slot<M>) -> ActorRef<M> {
    slot.read()
        .expect("tree lock")
        .clone()
        .expect("children are spawned in the root's pre_start")
}

/// A VM config for tests: everything under `dir`, QEMU by default, no default image.
#[doc(hidden)]
pub fn test_vm_config(dir: &std::path::Path) -> VmConfig {
    use crate::vmm::{
        firecracker::FirecrackerConfig,
        qemu::{Accel, QemuConfig},
    };
    VmConfig {
        data_dir: dir.to_owned(),
        vmm: VmmConfig {
            firecracker: FirecrackerConfig {
                jailer: "jailer".into(),
                firecracker: "firecracker".into(),
                chroot_base: dir.join("jail"),
                uid: 0,
                gid: 0,
            },
            qemu: QemuConfig {
                qemu: "qemu-system-x86_64".into(),
                agent_proxy: "bangerd".into(),
                accel: Accel::Tcg,
            },
        },
        stop_timeout: Duration::from_secs(30),
        extra_cmdline: String::new(),
        tsc_khz: None,
        agent_timeout: Duration::ZERO,
        ssh_key: None,
        file_sync: Vec::new(),
        dns_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        guest_dns: None,
        settings: VmSettings {
            defaults: Default::default(),
            host: crate::vm::spec::Host::detect(),
            default_vmm: banger_api::VmmChoice::Qemu,
            vmm_probe: Arc::new(crate::vmm::choose::FakeProbe {
                firecracker: false,
                jailer: false,
                kvm: crate::vmm::choose::Kvm::Missing,
                jailing: crate::vmm::choose::Jailing::NoHelper,
            }),
            default_image: None,
            subnet: "172.30.0.0/24".parse().expect("valid subnet"),
            network: false,
        },
        pull: PullConfig {
            data_dir: dir.to_owned(),
            cache_dir: dir.join("cache"),
            catalogs: Arc::new(
                crate::pull::catalog::Catalogs::embedded()
                    .expect("the embedded catalogs are valid"),
            ),
            insecure_registries: Vec::new(),
            guest_binaries_dir: dir.join("guest"),
            mirror: None,
        },
    }
}

#[cfg(test)]
mod race_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_store_actor_is_restarted_and_keeps_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (tree, _join) = Tree::start(store, test_vm_config(dir.path()), None)
            .await
            .unwrap();
        let before = tree.store_info().await.unwrap();
        let old = tree.store_cell();
        old.kill();
        // The root restarts it; the handle follows.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if tree.store_cell().get_id() != old.get_id() {
                break;
            }
            assert!(Instant::now() < deadline, "store actor was not restarted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tree.store_info().await.unwrap(), before);
        assert_eq!(tree.vm_count().await.unwrap(), 0);
        tree.stop();
    }

    fn stored_vm(id: &str, name: &str, created_at: u64) -> crate::vm::model::VmRecord {
        crate::vm::model::VmRecord {
            id: id.into(),
            name: name.into(),
            image: "img".into(),
            kernel: "k".into(),
            vmm: banger_api::VmmKind::Qemu,
            spec: banger_api::VmSpec {
                vcpu: 1,
                memory_mib: 256,
                disk_bytes: 1 << 30,
            },
            nat: false,
            state: banger_api::VmState::Created,
            error: None,
            created_at,
            started_at: None,
            cmdline: None,
            runtime: None,
            ip: None,
            publish: Vec::new(),
        }
    }

    /// A VM whose actor does not answer (held busy by a test message, as a long operation
    /// would) is listed from the store with `busy`, and the update gate counts it as in
    /// flight; once it answers again it is listed from its actor and the gate opens.
    /// (Before: it was left out of `vm list`, so the gate let an update through.)
    #[tokio::test]
    async fn a_vm_that_does_not_answer_is_listed_busy_and_holds_the_update_gate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        store.put_vm(&stored_vm("aaa", "slow", 1)).unwrap();
        store.put_vm(&stored_vm("bbb", "idle", 2)).unwrap();
        let (tree, _join) = Tree::start(store, test_vm_config(dir.path()), None)
            .await
            .unwrap();
        let (release, hold) = tokio::sync::oneshot::channel::<()>();
        tree.vm("slow")
            .await
            .unwrap()
            .cast(VmMsg::TestHold(hold))
            .unwrap();
        // The held actor never answers while `release` lives, so any timeout ends the wait.
        tree.vms()
            .cast(VmSupervisorMsg::TestInfoTimeout(Duration::from_millis(50)))
            .unwrap();
        let vms = tree.list_vms().await.unwrap();
        let seen: Vec<_> = vms
            .iter()
            .map(|v| (v.name.as_str(), v.state, v.busy))
            .collect();
        use banger_api::VmState::Created;
        assert_eq!(seen, [("slow", Created, true), ("idle", Created, false)]);

        let e = tree.update_gate("9.9.9".into(), false).await.unwrap_err();
        assert!(
            matches!(&e, TreeError::Updater(UpdaterError::Busy(m)) if m.contains("slow busy") && !m.contains("idle")),
            "{e}"
        );
        assert_eq!(
            tree.update_gate("9.9.9".into(), true).await.unwrap(),
            ["slow busy (last stored state created)"]
        );

        drop(release);
        tree.vms()
            .cast(VmSupervisorMsg::TestInfoTimeout(CALL_TIMEOUT))
            .unwrap();
        let vms = tree.list_vms().await.unwrap();
        assert!(vms.iter().all(|v| !v.busy), "{vms:?}");
        assert_eq!(vms.len(), 2);
        assert!(
            tree.update_gate("9.9.9".into(), false)
                .await
                .unwrap()
                .is_empty()
        );
        tree.stop();
    }
}
