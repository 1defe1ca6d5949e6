//! VmSupervisor: parent of one VmActor per VM. It creates VMs (validating the request and
//! writing the record) and routes callers to the VM's actor; it never waits for a VM's
//! own work, which happens in the VM's mailbox.
//!
//! Restart policy, one-for-one: a VmActor that fails is restarted with its state rebuilt
//! from the store and the host (its pre_start re-adopts a live VMM), at most
//! [`MAX_RESTARTS`] times in [`crate::root::RESTART_WINDOW`], after which that VM is left
//! without an actor and reported in the log; a VmActor that stops normally (its VM was
//! deleted) is dropped.
//!
//! The VMM of a new VM is resolved here, once: the request's `vmm`, else `default_vmm`,
//! with `auto` decided for this host by [`crate::vmm::choose::decide`] at that moment and
//! the concrete VMM written into the record. An emulated VM (QEMU under TCG) gets one
//! `warning` stage on the create's progress stream and a warning in the daemon log.
//!
//! A create's checks are repeated by [`crate::store::Store::create_vm`] in the transaction
//! that writes the record (name and address free, image and kernel there), so an `image
//! delete` cannot slip in between. `vm list` is every VM in the store: each VM's actor is
//! asked (all at once, each for at most [`INFO_TIMEOUT`]); a VM whose actor does not answer
//! is listed from its stored record with `busy: true`, never left out (the update gate
//! counts it as in flight, `vm prune` leaves it alone); so is a VM left without an actor
//! (it failed too often), which answers nothing either.
//!
//! Start-up: the supervisor lists the store once and spawns every VM's actor with its
//! record, without waiting for any re-adoption: each actor re-adopts its VM in its own
//! `post_start` (see [`crate::vm::actor::Adoption`]), at most [`ADOPT_CONCURRENCY`] at a
//! time, so the daemon serves at once. Until a VM is re-adopted, `vm list` and `vm show`
//! answer from its stored record with `adopting: true` (not asking its actor, whose
//! mailbox waits behind the re-adoption), an operation on it waits in its own mailbox, and
//! the update gate counts it as in flight. `adopting` is a flag on [`VmInfo`], not a
//! [`VmState`]: the stored state (`running`, typically) is still what the VM is believed
//! to be, and is shown with it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use banger_api::{CreateVm, SpecDefaults, VmInfo, VmState, VmmChoice};

use crate::not_found::NotFound;
use crate::store::now_secs;
use crate::vm::actor::{Adoption, ProgressTx, Reply, VmActor, VmArgs, VmEnv, VmError, VmMsg};
use crate::vm::model::{self, VmRecord};
use crate::vm::spec;

/// Restarts allowed per VM actor within the window.
pub const MAX_RESTARTS: usize = 3;

/// How many VMs are re-adopted at once after the daemon's start. Re-adopting is mostly
/// waiting on the host: a /proc read, a store write (redb commits one at a time anyway), for
/// QEMU an agent proxy to spawn and answer, and published ports to bind; with a few at once
/// the waits overlap, while hundreds at once would only queue on the store and the
/// blocking pool, spawn a burst of proxies on a small host, and starve the RPC calls served
/// meanwhile.
pub const ADOPT_CONCURRENCY: usize = 16;

/// How long `vm list` waits for a VM's actor before listing the VM as busy.
pub const INFO_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages of the VmSupervisor.
#[derive(Debug)]
pub enum VmSupervisorMsg {
    Create {
        req: CreateVm,
        progress: Option<ProgressTx>,
        /// A warm snapshot's maker (`image warm`, see `vm::warm`): never restored from one.
        maker: bool,
        reply: Reply<VmInfo>,
    },
    /// The actor of a VM, by name or id.
    Get {
        vm: String,
        reply: RpcReplyPort<Result<ActorRef<VmMsg>, VmError>>,
    },
    List(Reply<Vec<VmInfo>>),
    /// `vm show`: from the VM's actor, or from the store while it is being re-adopted.
    Show {
        vm: String,
        reply: Reply<VmInfo>,
    },
    Defaults(RpcReplyPort<SpecDefaults>),
    /// `vm fork`'s first step: `count` checked against `max_fork_count`, and an id and a
    /// free name (`<prefix>-<n>`) for each clone; with the VMs' directory. `exact`: one
    /// clone named `prefix` itself (generated when empty: `vm create --from-snapshot`).
    ForkPlan {
        count: u32,
        prefix: String,
        exact: bool,
        reply: Reply<ForkPlan>,
    },
    /// Write the records of `vm fork`'s clones of `from` (their directories are made
    /// already, see `vm::fork`) and spawn their actors, `suspended`: each `vm.start`s to
    /// a restore. All or none.
    CreateClones {
        from: Box<crate::vm::fork::ForkSource>,
        clones: Vec<(String, String)>,
        network: Option<bool>,
        nat: bool,
        reply: Reply<Vec<VmInfo>>,
    },
    /// Number of VM actors alive.
    Count(RpcReplyPort<usize>),
    /// Tests: how long `List` waits for each VM's actor.
    #[cfg(test)]
    TestInfoTimeout(Duration),
}

/// The answer of [`VmSupervisorMsg::ForkPlan`].
#[derive(Debug, Clone)]
pub struct ForkPlan {
    /// (id, name) of each clone.
    pub clones: Vec<(String, String)>,
    pub vms_dir: std::path::PathBuf,
}

/// Settings of VM creation.
#[derive(Debug, Clone)]
pub struct VmSettings {
    pub defaults: spec::ConfigDefaults,
    pub host: spec::Host,
    /// `default_vmm`: what a request that names no VMM gets (`auto` resolved per create).
    pub default_vmm: VmmChoice,
    /// What `auto` looks at ([`crate::vmm::choose::RealProbe`] in the daemon).
    pub vmm_probe: Arc<dyn crate::vmm::choose::HostProbe>,
    pub default_image: Option<String>,
    pub subnet: crate::net::lease::Subnet,
    /// Whether VMs get a network unless the request says.
    pub network: bool,
    /// The most clones one `vm fork` makes (`[vm_defaults] max_fork_count`).
    pub max_fork_count: u32,
    /// `[vm_defaults] auto_warm`: after a create boots an image cold, make the warm
    /// snapshot of its image, kernel, size, VMM and network in the background.
    pub auto_warm: bool,
    /// The permits of re-adoption ([`ADOPT_CONCURRENCY`] in the daemon).
    pub adopt_permits: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug, Default)]
pub struct VmSupervisor;

#[derive(Debug)]
pub struct VmSupervisorArgs {
    pub env: Arc<VmEnv>,
    pub settings: VmSettings,
    /// The `.vm` names the resolver answers, kept in step with the VMs.
    pub dns: crate::net::dns::Table,
}

#[derive(Debug)]
pub struct VmSupervisorState {
    env: Arc<VmEnv>,
    settings: VmSettings,
    /// VM id → its actor.
    actors: HashMap<String, ActorRef<VmMsg>>,
    /// VM id → set while its actor re-adopts it.
    adopting: HashMap<String, Arc<AtomicBool>>,
    restarts: HashMap<String, VecDeque<Instant>>,
    dns: crate::net::dns::Table,
    /// VM id → (name, address), to update `dns` when a VM goes.
    names: HashMap<String, String>,
    /// [`INFO_TIMEOUT`], except in tests.
    info_timeout: Duration,
}

impl VmSupervisorState {
    fn publish(&mut self, rec: &VmRecord) {
        if let Some(ip) = rec.ip.as_deref().and_then(|ip| ip.parse().ok()) {
            self.dns
                .write()
                .expect("dns table lock")
                .insert(rec.name.clone(), ip);
        }
        self.names.insert(rec.id.clone(), rec.name.clone());
    }

    fn unpublish(&mut self, id: &str) {
        if let Some(name) = self.names.remove(id) {
            self.dns.write().expect("dns table lock").remove(&name);
        }
    }
}

impl VmSupervisorState {
    /// The VMM a VM asking for `choice` gets now.
    fn vmm_for(&self, choice: Option<VmmChoice>) -> crate::vmm::choose::Decision {
        crate::vmm::choose::decide(
            choice.unwrap_or(self.settings.default_vmm),
            self.env.vmm.qemu.accel,
            self.settings.vmm_probe.as_ref(),
        )
    }

    fn defaults(&self) -> SpecDefaults {
        let vmm = self.vmm_for(None);
        SpecDefaults {
            vmm_choice: self.settings.default_vmm,
            vmm_reason: vmm.reason,
            vmm_emulated: vmm.emulated,
            ..spec::defaults(&self.settings.defaults, &self.settings.host, vmm.vmm)
        }
    }

    fn id_of(&self, cell: &ractor::ActorCell) -> Option<String> {
        self.actors
            .iter()
            .find(|(_, a)| a.get_id() == cell.get_id())
            .map(|(id, _)| id.clone())
    }
}

impl VmSupervisor {
    /// Spawn the actor of VM `id` (its record `rec` if just read); `adopt`: a VM that was
    /// there before, re-adopted by its actor after the spawn (see the module docs).
    async fn spawn_vm(
        myself: &ActorRef<VmSupervisorMsg>,
        state: &mut VmSupervisorState,
        id: &str,
        rec: Option<VmRecord>,
        adopt: bool,
    ) -> Result<ActorRef<VmMsg>, ActorProcessingErr> {
        let adoption = adopt.then(|| Adoption {
            permits: Arc::clone(&state.settings.adopt_permits),
            adopting: Arc::new(AtomicBool::new(true)),
        });
        let args = VmArgs {
            id: id.to_owned(),
            env: Arc::clone(&state.env),
            rec,
            adoption: adoption.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, VmActor, args, myself.get_cell()).await?;
        state.actors.insert(id.to_owned(), actor.clone());
        match adoption {
            Some(a) => state.adopting.insert(id.to_owned(), a.adopting),
            None => state.adopting.remove(id),
        };
        Ok(actor)
    }

    /// The records of a fork's clones (blocking: reads the store): see
    /// [`VmSupervisorMsg::CreateClones`] and `vm::fork` for what a clone inherits.
    fn clone_records(
        state: &VmSupervisorState,
        from: &crate::vm::fork::ForkSource,
        clones: &[(String, String)],
        network: Option<bool>,
        nat: bool,
    ) -> Result<Vec<VmRecord>, VmError> {
        let store = &state.env.store;
        let src = &from.source;
        let has = src.ip.is_some();
        let network = network.unwrap_or(has);
        // The clone restores its source's devices: a NIC the saved state has needs a tap,
        // and one it lacks cannot be added (QEMU refuses a device line that differs from
        // the state's; microvm has no hotplug).
        if network != has {
            return Err(VmError::Invalid(format!(
                "vm {} has {}: its clones restore its devices, so they have {} too; drop {}",
                src.name,
                if has { "a network" } else { "no network" },
                if has { "one" } else { "none" },
                if has { "--no-network" } else { "--network" },
            )));
        }
        if nat && !network {
            return Err(VmError::Invalid(
                "--nat needs a network: drop --no-network".into(),
            ));
        }
        let existing = store.list_vms()?;
        let mut ips: std::collections::HashSet<std::net::Ipv4Addr> = existing
            .iter()
            .filter_map(|v| v.ip.as_deref()?.parse().ok())
            .collect();
        let mut uids: std::collections::HashSet<u32> =
            existing.iter().filter_map(|v| v.uid).collect();
        let subnet = state.settings.subnet;
        let address = src
            .ip
            .as_deref()
            .map(|ip| format!("{ip}/{}", subnet.prefix));
        let mut out = Vec::new();
        for (id, name) in clones {
            model::validate_name(name).map_err(VmError::Invalid)?;
            if existing.iter().any(|v| &v.name == name) {
                return Err(VmError::Conflict(format!(
                    "a vm named {name} exists already; pick another --name for the clones"
                )));
            }
            let ip = if network {
                let ip = subnet.allocate(id, &ips).ok_or_else(|| {
                    VmError::Conflict(format!(
                        "no free address left in {subnet} for the clones ({} vms); delete some, or configure a larger [network] subnet",
                        subnet.capacity()
                    ))
                })?;
                ips.insert(ip);
                Some(ip.to_string())
            } else {
                None
            };
            let uid = if from.snap.vmm == banger_api::VmmKind::Firecracker {
                let range = state.env.vmm.firecracker.vm_uids;
                let uid = crate::vmm::firecracker::allocate_uid(range, id, &uids).ok_or_else(
                    || {
                        VmError::Conflict(format!(
                            "every VM uid of {range} is taken; delete some VMs, or configure a larger [firecracker] vm_uids"
                        ))
                    },
                )?;
                uids.insert(uid);
                Some(uid)
            } else {
                None
            };
            let (egress, isolate) = match (network, nat) {
                (false, _) => (banger_api::Egress::Subnet, false),
                (true, true) => (banger_api::Egress::All, src.isolate),
                (true, false) => (src.egress.clone(), src.isolate),
            };
            out.push(VmRecord {
                id: id.clone(),
                name: name.clone(),
                image: src.image.clone(),
                kernel: src.kernel.clone(),
                vmm: from.snap.vmm,
                spec: from.snap.spec,
                nat: egress.nat(),
                state: VmState::Suspended,
                error: None,
                created_at: now_secs(),
                // Its guest has run (it has the source's files: no `file_sync`).
                started_at: src.started_at,
                cmdline: None,
                runtime: None,
                ip,
                publish: Vec::new(),
                uid,
                egress,
                isolate,
                expires: None,
                spawned: None,
                snapshots: Vec::new(),
                clone_of: Some(model::CloneOf {
                    vm: src.name.clone(),
                    address: address.clone(),
                }),
                warm: None,
                warm_maker: false,
            });
        }
        Ok(out)
    }

    /// The warm snapshot a new VM (`rec`, as created) restores from, if one matches (see
    /// `vm::warm`), and the warnings of the ones that could not be used: damaged ones (their
    /// files gone or cut) and ones another VMM release saved are removed.
    async fn pick_warm(
        state: &VmSupervisorState,
        rec: &VmRecord,
    ) -> (Option<crate::vm::warm::WarmRecord>, Vec<String>) {
        use crate::vm::warm;
        let (store, base, r) = (
            Arc::clone(&state.env.store),
            state.env.warm_dir.clone(),
            rec.clone(),
        );
        let found = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
            let network = r.ip.is_some();
            let Some(key) = warm::key_now(&store, &r.image, &r.kernel, r.vmm, r.spec, network)?
            else {
                return Ok(Vec::new());
            };
            Ok(store
                .list_warm()?
                .into_iter()
                .rev()
                .filter(|w| w.key() == key && w.banger == warm::banger_version())
                .map(|w| {
                    let damaged = warm::damaged(&base, &w);
                    (w, damaged)
                })
                .collect::<Vec<_>>())
        })
        .await;
        let candidates = match found {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(error = %banger_error::error_chain(&e), "reading the warm snapshots; booting");
                return (None, Vec::new());
            }
            Err(_) => return (None, Vec::new()),
        };
        if candidates.is_empty() {
            return (None, Vec::new());
        }
        let version = match crate::vmm::Driver::new(rec.vmm, &state.env.vmm)
            .version()
            .await
        {
            Ok(v) => v,
            Err(e) => {
                // Not a reason to remove any: the VM boots, and they wait.
                tracing::warn!(error = %banger_error::error_chain(&e), "cannot tell the VMM's version; booting instead of a warm start");
                return (None, Vec::new());
            }
        };
        if rec.vmm == banger_api::VmmKind::Firecracker
            && rec.ip.is_some()
            && !crate::vmm::firecracker::loads_network_overrides(&version)
        {
            // Its tap is not the maker's, and only `network_overrides` says so at the load.
            tracing::info!(vm = %rec.name, %version, "no warm start: a VM with a network restores only under Firecracker 1.12 or newer");
            return (None, Vec::new());
        }
        let (mut pick, mut notes, mut gone) = (None, Vec::new(), Vec::new());
        for (w, damaged) in candidates {
            if let Some(why) = damaged {
                notes.push(format!(
                    "warm snapshot {} of image {} is damaged ({why}): removed it; booting instead",
                    w.id,
                    w.image_name()
                ));
                gone.push(w.id);
            } else if version != w.vmm_version {
                tracing::info!(warm = %w.id, saved_by = %w.vmm_version, now = ?version, "removing a warm snapshot another VMM release saved");
                gone.push(w.id);
            } else if pick.is_none() {
                pick = Some(w);
            }
        }
        for n in &notes {
            tracing::warn!(vm = %rec.name, "{n}");
        }
        if !gone.is_empty() {
            let (store, base) = (Arc::clone(&state.env.store), state.env.warm_dir.clone());
            let _ = tokio::task::spawn_blocking(move || {
                for id in gone {
                    if let Err(e) = warm::remove(&store, &base, &id) {
                        tracing::warn!(warm = %id, error = %banger_error::error_chain(&e), "removing a warm snapshot");
                    }
                }
            })
            .await;
        }
        (pick, notes)
    }

    /// Validate a create request into a record (blocking: reads the store), with the
    /// decision on its VMM.
    fn new_record(
        state: &VmSupervisorState,
        req: &CreateVm,
    ) -> Result<(VmRecord, crate::vmm::choose::Decision), VmError> {
        let store = &state.env.store;
        let id = model::new_id();
        let name = match &req.name {
            Some(n) => {
                model::validate_name(n).map_err(VmError::Invalid)?;
                n.clone()
            }
            None => model::generated_name(&id),
        };
        if store.find_vm(&name)?.is_some() {
            return Err(VmError::Conflict(format!(
                "a vm named {name} exists already; pick another --name, or delete it with `banger vm delete {name}`"
            )));
        }
        let image_name = req
            .image
            .clone()
            .or_else(|| state.settings.default_image.clone())
            .ok_or_else(|| {
                VmError::Invalid(
                    "no image given and no default_image configured: pass --image, or register one with `banger image register`".into(),
                )
            })?;
        let image = store
            .get_image(&image_name)?
            .ok_or_else(|| NotFound::image(&image_name))?;
        let kernel_name = req.kernel.clone().or(image.kernel.clone()).ok_or_else(|| {
            VmError::Invalid(format!(
                "image {image_name} names no kernel: pass --kernel (see `banger kernel list`)"
            ))
        })?;
        let Some(kernel) = store.get_kernel(&kernel_name)? else {
            return Err(NotFound::kernel(kernel_name).into());
        };
        let vmm = state.vmm_for(req.vmm);
        if vmm.vmm == banger_api::VmmKind::Firecracker {
            kernel
                .firecracker_kernel()
                .map_err(|e| VmError::Invalid(banger_error::error_chain(&e)))?;
        }
        let spec = spec::resolve(
            &spec::defaults(&state.settings.defaults, &state.settings.host, vmm.vmm),
            req.vcpu,
            req.memory_mib,
            req.disk_bytes,
        )
        .map_err(VmError::Invalid)?;
        // A taken host port is refused before anything is created.
        crate::vm::publish::probe(&name, &req.publish)?;
        let network = req.network.unwrap_or(state.settings.network);
        if req.nat && !network {
            return Err(VmError::Invalid(
                "--nat needs a network: drop --no-network".into(),
            ));
        }
        let egress = match (&req.egress, req.nat) {
            (None, nat) => {
                if nat {
                    banger_api::Egress::All
                } else {
                    banger_api::Egress::Subnet
                }
            }
            (Some(e), false) => e.clone(),
            (Some(banger_api::Egress::All), true) => banger_api::Egress::All,
            (Some(e), true) => {
                return Err(VmError::Invalid(format!(
                    "--nat is --egress all, and this VM asks for --egress {e}: drop one"
                )));
            }
        };
        if (egress != banger_api::Egress::Subnet || req.isolate) && !network {
            return Err(VmError::Invalid(
                "--egress and --isolate need a network: drop --no-network".into(),
            ));
        }
        let ip = if network {
            let used: std::collections::HashSet<std::net::Ipv4Addr> = store
                .list_vms()?
                .iter()
                .filter_map(|v| v.ip.as_deref()?.parse().ok())
                .collect();
            let subnet = state.settings.subnet;
            let ip = subnet.allocate(&id, &used).ok_or_else(|| {
                VmError::Conflict(format!(
                    "no free address left in {subnet} ({} vms); delete some, or configure a larger [network] subnet",
                    subnet.capacity()
                ))
            })?;
            Some(ip.to_string())
        } else {
            None
        };
        let uid = if vmm.vmm == banger_api::VmmKind::Firecracker {
            let used: std::collections::HashSet<u32> =
                store.list_vms()?.iter().filter_map(|v| v.uid).collect();
            let range = state.env.vmm.firecracker.vm_uids;
            Some(
                crate::vmm::firecracker::allocate_uid(range, &id, &used).ok_or_else(|| {
                    VmError::Conflict(format!(
                        "every VM uid of {range} is taken; delete some VMs, or configure a larger [firecracker] vm_uids"
                    ))
                })?,
            )
        } else {
            None
        };
        let record = VmRecord {
            id,
            name,
            image: image_name,
            kernel: kernel_name,
            vmm: vmm.vmm,
            spec,
            nat: egress.nat(),
            state: VmState::Created,
            error: None,
            created_at: now_secs(),
            started_at: None,
            cmdline: None,
            runtime: None,
            ip,
            publish: crate::vm::publish::records(&req.publish),
            uid,
            egress,
            isolate: req.isolate,
            expires: req.ttl.map(|t| banger_api::Expiry {
                at: now_secs().saturating_add(t.secs),
                delete: t.delete,
            }),
            spawned: None,
            snapshots: Vec::new(),
            clone_of: None,
            warm: None,
            warm_maker: false,
        };
        Ok((record, vmm))
    }
}

/// Whether the VM `id` is being re-adopted.
fn is_adopting(adopting: &HashMap<String, Arc<AtomicBool>>, id: &str) -> bool {
    adopting.get(id).is_some_and(|a| a.load(Ordering::Acquire))
}

/// The wire view of a stored VM that is being re-adopted.
fn adopting_info(env: &VmEnv, rec: &VmRecord) -> VmInfo {
    let dir = crate::vm::disks::VmDir::new(&env.vms_dir, &rec.id);
    VmInfo {
        adopting: true,
        ..crate::vm::actor::info_of(rec, &dir)
    }
}

/// `vm list` (see the module docs): every stored VM, from its actor when it answers within
/// `timeout`, else (no answer, or no actor) from the store with `busy` set; one being
/// re-adopted from the store with `adopting` set, without asking.
async fn list(
    env: &Arc<VmEnv>,
    actors: HashMap<String, ActorRef<VmMsg>>,
    adopting: HashMap<String, Arc<AtomicBool>>,
    timeout: Duration,
) -> Result<Vec<VmInfo>, VmError> {
    let store = Arc::clone(&env.store);
    let recs = tokio::task::spawn_blocking(move || store.list_vms())
        .await
        .expect("store reads do not panic")?;
    let ms = timeout.as_millis() as u64;
    let mut out = Vec::new();
    let (adopting, recs): (Vec<_>, Vec<_>) = recs
        .into_iter()
        .partition(|rec| is_adopting(&adopting, &rec.id));
    out.extend(adopting.iter().map(|rec| adopting_info(env, rec)));
    let asks = recs.into_iter().map(|rec| {
        let actor = actors.get(&rec.id).cloned();
        async move {
            let answer = match &actor {
                Some(a) => ractor::call_t!(a, VmMsg::Info, ms)
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            (rec.id, answer)
        }
    });
    let mut busy = Vec::new();
    for (id, answer) in futures::future::join_all(asks).await {
        match answer {
            Some(info) => out.push(info),
            None => busy.push(id),
        }
    }
    if !busy.is_empty() {
        // The latest stored record of each; one deleted meanwhile is gone, not busy.
        let store = Arc::clone(&env.store);
        let recs = tokio::task::spawn_blocking(move || {
            busy.iter()
                .filter_map(|id| store.find_vm(id).transpose())
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .expect("store reads do not panic")?;
        for rec in recs {
            tracing::info!(vm = %rec.name, "vm list: its actor did not answer; listed as busy");
            let dir = crate::vm::disks::VmDir::new(&env.vms_dir, &rec.id);
            out.push(VmInfo {
                busy: true,
                ..crate::vm::actor::info_of(&rec, &dir)
            });
        }
    }
    out.sort_by(|a: &VmInfo, b: &VmInfo| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    Ok(out)
}

impl Actor for VmSupervisor {
    type Msg = VmSupervisorMsg;
    type State = VmSupervisorState;
    type Arguments = VmSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: VmSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = VmSupervisorState {
            env: args.env,
            settings: args.settings,
            actors: HashMap::new(),
            adopting: HashMap::new(),
            restarts: HashMap::new(),
            dns: args.dns,
            names: HashMap::new(),
            info_timeout: INFO_TIMEOUT,
        };
        let store = Arc::clone(&state.env.store);
        let vms = tokio::task::spawn_blocking(move || store.list_vms()).await??;
        // Before any actor re-adopts or releases: no VM process without a record.
        crate::vm::orphans::reap(&state.env, &vms).await;
        // And no VM directory without one (a fork's copies cut short by a daemon's death).
        let (dir, known) = (
            state.env.vms_dir.clone(),
            vms.iter().map(|v| v.id.clone()).collect(),
        );
        let swept =
            tokio::task::spawn_blocking(move || crate::vm::fork::sweep_unrecorded(&dir, &known))
                .await?;
        if !swept.is_empty() {
            tracing::warn!(
                ?swept,
                "removed vm directories no record names (a fork cut short)"
            );
        }
        // Warm snapshots: no directory without a record (an `image warm` cut short), and
        // no maker left running (a daemon's death cut its save short): deleted below.
        let (store, base) = (Arc::clone(&state.env.store), state.env.warm_dir.clone());
        let swept = tokio::task::spawn_blocking(
            move || -> Result<Vec<String>, crate::store::StoreError> {
                let known = store.list_warm()?.into_iter().map(|w| w.id).collect();
                Ok(crate::vm::fork::sweep_unrecorded(&base, &known))
            },
        )
        .await??;
        if !swept.is_empty() {
            tracing::warn!(?swept, "removed warm snapshot directories no record names");
        }
        let makers: Vec<String> = vms
            .iter()
            .filter(|v| v.warm_maker)
            .map(|v| v.id.clone())
            .collect();
        let (count, t0) = (vms.len(), Instant::now());
        for vm in vms {
            state.publish(&vm);
            let (id, name) = (vm.id.clone(), vm.name.clone());
            if let Err(e) = Self::spawn_vm(&myself, &mut state, &id, Some(vm), true).await {
                tracing::error!(vm = %name, error = %e, "cannot start the vm's actor");
            }
        }
        for id in makers {
            if let Some(actor) = state.actors.get(&id) {
                tracing::warn!(vm = %id, "deleting a warm snapshot's maker a daemon's death left");
                let (tx, _rx) = tokio::sync::oneshot::channel();
                let _ = actor.cast(VmMsg::Delete {
                    force: true,
                    reply: tx.into(),
                });
            }
        }
        tracing::info!(
            vms = count,
            concurrency = ADOPT_CONCURRENCY,
            ms = t0.elapsed().as_millis() as u64,
            "vm actors spawned; re-adopting the vms in the background"
        );
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VmSupervisorMsg::Count(reply) => {
                let _ = reply.send(state.actors.len());
            }
            VmSupervisorMsg::Defaults(reply) => {
                let _ = reply.send(state.defaults());
            }
            VmSupervisorMsg::List(reply) => {
                let actors = state.actors.clone();
                let adopting = state.adopting.clone();
                let env = Arc::clone(&state.env);
                let timeout = state.info_timeout;
                tokio::spawn(async move {
                    let _ = reply.send(list(&env, actors, adopting, timeout).await);
                });
            }
            VmSupervisorMsg::Show { vm, reply } => {
                let store = Arc::clone(&state.env.store);
                let key = vm.clone();
                let found = tokio::task::spawn_blocking(move || store.find_vm(&key)).await?;
                let rec = match found {
                    Ok(Some(rec)) => rec,
                    Ok(None) => {
                        let _ = reply.send(Err(NotFound::vm(vm).into()));
                        return Ok(());
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        return Ok(());
                    }
                };
                if is_adopting(&state.adopting, &rec.id) {
                    let _ = reply.send(Ok(adopting_info(&state.env, &rec)));
                    return Ok(());
                }
                let Some(actor) = state.actors.get(&rec.id).cloned() else {
                    let _ = reply.send(Err(VmError::Gone(rec.name)));
                    return Ok(());
                };
                tokio::spawn(async move {
                    let answer = ractor::call!(actor, VmMsg::Info)
                        .unwrap_or_else(|_| Err(VmError::Gone(rec.name)));
                    let _ = reply.send(answer);
                });
            }
            #[cfg(test)]
            VmSupervisorMsg::TestInfoTimeout(t) => state.info_timeout = t,
            VmSupervisorMsg::Get { vm, reply } => {
                let store = Arc::clone(&state.env.store);
                let key = vm.clone();
                let found = tokio::task::spawn_blocking(move || store.find_vm(&key)).await?;
                let result = match found {
                    Ok(Some(rec)) => state
                        .actors
                        .get(&rec.id)
                        .cloned()
                        .ok_or_else(|| VmError::Gone(rec.name)),
                    Ok(None) => Err(NotFound::vm(vm).into()),
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(result);
            }
            VmSupervisorMsg::ForkPlan {
                count,
                prefix,
                exact: true,
                reply,
            } => {
                let id = model::new_id();
                let name = if prefix.is_empty() {
                    model::generated_name(&id)
                } else {
                    prefix
                };
                let store = Arc::clone(&state.env.store);
                let key = name.clone();
                let found = tokio::task::spawn_blocking(move || store.find_vm(&key)).await?;
                let answer = match (model::validate_name(&name), found, count) {
                    (_, _, n) if n != 1 => Err(VmError::Invalid("one vm at a time".into())),
                    (Err(e), _, _) => Err(VmError::Invalid(e)),
                    (_, Err(e), _) => Err(e.into()),
                    (_, Ok(Some(_)), _) => Err(VmError::Conflict(format!(
                        "a vm named {name} exists already; pick another --name, or delete it with `banger vm delete {name}`"
                    ))),
                    (Ok(()), Ok(None), _) => Ok(ForkPlan {
                        clones: vec![(id, name)],
                        vms_dir: state.env.vms_dir.clone(),
                    }),
                };
                let _ = reply.send(answer);
            }
            VmSupervisorMsg::ForkPlan {
                count,
                prefix,
                exact: false,
                reply,
            } => {
                let max = state.settings.max_fork_count;
                if count == 0 || count > max {
                    let _ = reply.send(Err(VmError::Invalid(format!(
                        "--count {count}: a fork makes 1 to {max} clones ([vm_defaults] max_fork_count)"
                    ))));
                    return Ok(());
                }
                if let Err(e) = model::validate_name(&format!("{prefix}-{max}")) {
                    let _ = reply.send(Err(VmError::Invalid(e)));
                    return Ok(());
                }
                let store = Arc::clone(&state.env.store);
                let taken = tokio::task::spawn_blocking(move || store.list_vms()).await?;
                let taken: std::collections::HashSet<String> = match taken {
                    Ok(vms) => vms.into_iter().map(|v| v.name).collect(),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        return Ok(());
                    }
                };
                let clones = crate::vm::fork::names(&prefix, count, &taken)
                    .into_iter()
                    .map(|n| (model::new_id(), n))
                    .collect();
                let _ = reply.send(Ok(ForkPlan {
                    clones,
                    vms_dir: state.env.vms_dir.clone(),
                }));
            }
            VmSupervisorMsg::CreateClones {
                from,
                clones,
                network,
                nat,
                reply,
            } => {
                let recs = match Self::clone_records(state, &from, &clones, network, nat) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                };
                let store = Arc::clone(&state.env.store);
                let to_store = recs.clone();
                let written = tokio::task::spawn_blocking(move || {
                    let mut done: Vec<String> = Vec::new();
                    for rec in &to_store {
                        if let Err(e) = store.create_vm(rec) {
                            for id in &done {
                                let _ = store.delete_vm(id);
                            }
                            return Err(e);
                        }
                        done.push(rec.id.clone());
                    }
                    Ok(())
                })
                .await?;
                if let Err(e) = written {
                    let _ = reply.send(Err(e.into()));
                    return Ok(());
                }
                let mut infos = Vec::new();
                for rec in recs {
                    tracing::info!(vm = %rec.name, id = %rec.id, ip = rec.ip.as_deref(), from = %from.source.name, "created a clone");
                    state.publish(&rec);
                    let dir = crate::vm::disks::VmDir::new(&state.env.vms_dir, &rec.id);
                    infos.push(crate::vm::actor::info_of(&rec, &dir));
                    Self::spawn_vm(&myself, state, &rec.id.clone(), Some(rec), false).await?;
                }
                let _ = reply.send(Ok(infos));
            }
            VmSupervisorMsg::Create {
                req,
                progress,
                maker,
                reply,
            } => {
                let (mut rec, vmm) = {
                    // Reads only; quick. The supervisor's mailbox serialises name checks.
                    match Self::new_record(state, &req) {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return Ok(());
                        }
                    }
                };
                rec.warm_maker = maker;
                let mut warm_notes = Vec::new();
                if !maker && !req.cold && !req.no_start {
                    let (warm, notes) = Self::pick_warm(state, &rec).await;
                    warm_notes = notes;
                    if let Some(w) = warm {
                        // Restored, not booted: its start copies the snapshot's files and
                        // the guest takes this VM's identity (see `vm::warm`).
                        rec.state = VmState::Suspended;
                        rec.clone_of = Some(model::CloneOf {
                            vm: format!("warm-{}", w.id),
                            address: w.address.clone(),
                        });
                        rec.warm = Some(w.id);
                    }
                }
                let store = Arc::clone(&state.env.store);
                let to_store = rec.clone();
                // The checks again, and the write, in one transaction (see the module docs).
                if let Err(e) =
                    tokio::task::spawn_blocking(move || store.create_vm(&to_store)).await?
                {
                    let _ = reply.send(Err(e.into()));
                    return Ok(());
                }
                tracing::info!(vm = %rec.name, id = %rec.id, ip = rec.ip.as_deref(), vmm = rec.vmm.as_str(), reason = %vmm.reason, "created");
                let warning = vmm.warning();
                if let Some(w) = &warning {
                    tracing::warn!(vm = %rec.name, "{w}");
                }
                if !maker {
                    state.publish(&rec);
                }
                if let Some(p) = &progress {
                    let dir = crate::vm::disks::VmDir::new(&state.env.vms_dir, &rec.id);
                    let _ = p.send(banger_api::Progress::Created {
                        vm: crate::vm::actor::info_of(&rec, &dir),
                    });
                    for w in &warm_notes {
                        let _ = p.send(banger_api::Progress::Stage {
                            stage: "warning".into(),
                            detail: Some(w.clone()),
                        });
                    }
                    if let Some(w) = &rec.warm {
                        let _ = p.send(banger_api::Progress::Stage {
                            stage: "warm".into(),
                            detail: Some(format!(
                                "restoring from warm snapshot {w} (--cold boots instead)"
                            )),
                        });
                    }
                    if let Some(w) = warning {
                        let _ = p.send(banger_api::Progress::Stage {
                            stage: "warning".into(),
                            detail: Some(w),
                        });
                    }
                }
                let actor =
                    Self::spawn_vm(&myself, state, &rec.id, Some(rec.clone()), false).await?;
                let msg = if req.no_start {
                    VmMsg::Prepare { reply }
                } else {
                    VmMsg::Start { progress, reply }
                };
                let _ = actor.cast(msg);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                // Deleted: forget it (never stop ourselves, as ractor's default would).
                if let Some(id) = state.id_of(&cell) {
                    state.actors.remove(&id);
                    state.adopting.remove(&id);
                    state.restarts.remove(&id);
                    state.unpublish(&id);
                }
            }
            SupervisionEvent::ActorFailed(cell, reason) => {
                let Some(id) = state.id_of(&cell) else {
                    return Ok(());
                };
                state.actors.remove(&id);
                state.adopting.remove(&id);
                let now = Instant::now();
                let history = state.restarts.entry(id.clone()).or_default();
                history.retain(|t| now.duration_since(*t) < crate::root::RESTART_WINDOW);
                if history.len() >= MAX_RESTARTS {
                    tracing::error!(vm = %id, %reason, "vm actor failed too often; leaving it stopped");
                    return Ok(());
                }
                history.push_back(now);
                tracing::warn!(vm = %id, %reason, "vm actor failed; restarting it from the store");
                // Rebuilt from the store and the host: re-adopted as at the daemon's start.
                Self::spawn_vm(&myself, state, &id, None, true).await?;
            }
            _ => {}
        }
        Ok(())
    }
}
