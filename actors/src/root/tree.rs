//! [`Tree`]: the handle the RPC layer uses to reach the actors, and [`TreeError`]. This
//! file has the tree's start and its store, VM and update-gate calls; the image and kernel
//! calls are in `images.rs`, the image and kernel pulled for a `vm create` in
//! `auto_pull.rs`.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorRef};

use banger_api::{CreateVm, SpecDefaults, VmInfo};

use super::VmConfig;
use super::supervisor::{RootArgs, RootMsg, RootSupervisor, Slot, live};
use crate::image::ImageError;
use crate::net::dns::DnsMsg;
use crate::net::host::{HelperMsg, HostNet, NatMsg, NetMsg};
use crate::pull::{PullEnv, PullError, PullMsg};
use crate::store::{Store, StoreError, StoreInfo, StoreMsg};
use crate::updater::actor::{UpdaterError, UpdaterMsg};
use crate::vm::actor::{ProgressTx, VmError, VmMsg};
use crate::vm_supervisor::VmSupervisorMsg;

/// How long a caller waits for an actor's answer before giving up.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const CALL_MS: u64 = 30_000;

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

/// Current references to the tree's actors. A restart replaces the reference in place,
/// so holders of a `Tree` always reach the live actor.
#[derive(Debug, Clone)]
pub struct Tree {
    root: ActorRef<RootMsg>,
    pub(super) db: Arc<Store>,
    pub(super) data_dir: std::path::PathBuf,
    store: Slot<StoreMsg>,
    vms: Slot<VmSupervisorMsg>,
    dns: Slot<DnsMsg>,
    net: HostNet,
    updater: Slot<UpdaterMsg>,
    pub(super) pulls: Slot<PullMsg>,
    pub(super) pull_env: Arc<PullEnv>,
    pub(super) default_image: Option<String>,
    /// `[vm_defaults] auto_warm`: make a warm snapshot after a first cold boot.
    pub(super) auto_warm: bool,
    /// The keys whose warm snapshot `auto_warm` is making now.
    pub(super) warming: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    pub(super) subnet_prefix: u8,
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
            egress: Default::default(),
        };
        let store_ref = Arc::new(RwLock::new(None));
        let vms_ref = Arc::new(RwLock::new(None));
        let dns_ref = Arc::new(RwLock::new(None));
        let updater_ref = Arc::new(RwLock::new(None));
        let pull_ref = Arc::new(RwLock::new(None));
        let db = Arc::new(store);
        let data_dir = vm.data_dir.clone();
        let default_image = vm.settings.default_image.clone();
        let (auto_warm, subnet_prefix) = (vm.settings.auto_warm, vm.settings.subnet.prefix);
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
            auto_warm,
            warming: Default::default(),
            subnet_prefix,
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

    pub(super) fn vms(&self) -> ActorRef<VmSupervisorMsg> {
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
        if req.from_snapshot.is_some() {
            return self.create_from_snapshot(req, progress).await;
        }
        // A size the VM could never have is refused before minutes of pulling for it.
        crate::vm::spec::validate_given(req.vcpu, req.memory_mib, req.disk_bytes)
            .map_err(VmError::Invalid)?;
        self.auto_pull(&req, progress.as_ref()).await?;
        let boots = !req.no_start;
        let vm = ractor::call!(self.vms(), |reply| VmSupervisorMsg::Create {
            req,
            progress,
            maker: false,
            reply
        })
        .map_err(|_| TreeError::Call("vm-supervisor"))?
        .map_err(TreeError::Vm)?;
        if self.auto_warm && boots && vm.error.is_none() {
            // Unless one exists (this VM may have been restored from it).
            self.warm_later(&vm);
        }
        Ok(vm)
    }

    /// `vm fork` (see [`crate::vm::fork`] for the steps): the clones once they all run.
    /// Nothing of a fork that fails is left: its snapshot, copies, records and VMs go.
    pub async fn fork_vm(
        &self,
        req: banger_api::ForkVm,
        progress: Option<ProgressTx>,
    ) -> Result<Vec<VmInfo>, TreeError> {
        let count = req.count.unwrap_or(1);
        let source = self.show_vm(&req.vm).await?;
        let prefix = req.name.clone().unwrap_or_else(|| source.name.clone());
        let plan = ractor::call!(self.vms(), |reply| VmSupervisorMsg::ForkPlan {
            count,
            prefix,
            exact: false,
            reply
        })
        .map_err(|_| TreeError::Call("vm-supervisor"))??;
        let from = self
            .ask_vm(&source.name, |reply| VmMsg::ForkSnapshot {
                copies: count,
                progress: progress.clone(),
                reply,
            })
            .await?;
        self.clone_vms(from, plan, req.network, req.nat, false, progress)
            .await
    }

    /// `vm create --from-snapshot <vm>/<snapshot>`: one clone of a stored snapshot (which
    /// stays), running.
    async fn create_from_snapshot(
        &self,
        req: CreateVm,
        progress: Option<ProgressTx>,
    ) -> Result<VmInfo, TreeError> {
        let from = req.from_snapshot.clone().unwrap_or_default();
        let Some((vm, snap)) = from
            .split_once('/')
            .filter(|(v, s)| !v.is_empty() && !s.is_empty())
        else {
            return Err(VmError::Invalid(format!(
                "--from-snapshot {from}: expected <vm>/<snapshot> (see `banger vm snapshot list`)"
            ))
            .into());
        };
        let given: Vec<&str> = [
            ("--image", req.image.is_some()),
            ("--kernel", req.kernel.is_some()),
            ("--vcpu", req.vcpu.is_some()),
            ("--memory", req.memory_mib.is_some()),
            ("--disk-size", req.disk_bytes.is_some()),
            ("--vmm", req.vmm.is_some()),
            ("--no-start", req.no_start),
            ("--publish", !req.publish.is_empty()),
            ("--egress", req.egress.is_some()),
            ("--isolate", req.isolate),
            ("--ttl", req.ttl.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        if !given.is_empty() {
            return Err(VmError::Invalid(format!(
                "--from-snapshot takes the image, kernel, size, VMM and network policy of the snapshot's vm: drop {}",
                given.join(", ")
            ))
            .into());
        }
        let source = self
            .ask_vm(vm, |reply| VmMsg::SnapshotSource {
                snapshot: snap.to_owned(),
                reply,
            })
            .await?;
        let plan = ractor::call!(self.vms(), |reply| VmSupervisorMsg::ForkPlan {
            count: 1,
            prefix: req.name.clone().unwrap_or_default(),
            exact: true,
            reply
        })
        .map_err(|_| TreeError::Call("vm-supervisor"))??;
        let mut vms = self
            .clone_vms(source, plan, req.network, req.nat, true, progress)
            .await?;
        Ok(vms.remove(0))
    }

    /// Make `plan`'s clones of `from` and start them (see [`crate::vm::fork`]): copies of
    /// the snapshot (the last one takes the snapshot itself unless `keep`), their records,
    /// their restores. A clone that fails deletes them all.
    async fn clone_vms(
        &self,
        from: crate::vm::fork::ForkSource,
        plan: crate::vm_supervisor::ForkPlan,
        network: Option<bool>,
        nat: bool,
        keep: bool,
        progress: Option<ProgressTx>,
    ) -> Result<Vec<VmInfo>, TreeError> {
        use crate::vm::disks::VmDir;
        use crate::vm::fork;
        let stage = |stage: &str, detail: String| crate::vm::actor::tell(&progress, stage, detail);
        let source = from.source.name.clone();
        let names: Vec<String> = plan.clones.iter().map(|(_, n)| n.clone()).collect();
        stage(
            "clone",
            format!(
                "{} from vm {source}'s snapshot {}",
                names.join(", "),
                if keep { from.snap.name.as_str() } else { "" }
            )
            .trim_end()
            .to_owned(),
        );
        let dirs: Vec<VmDir> = plan
            .clones
            .iter()
            .map(|(id, _)| VmDir::new(&plan.vms_dir, id))
            .collect();
        let (snap_dir, to_fill) = (from.dir.clone(), dirs.clone());
        let copied = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let (last, rest) = to_fill.split_last().expect("at least one clone");
            for d in rest {
                fork::copy_into(&snap_dir, d)?;
            }
            if keep {
                fork::copy_into(&snap_dir, last)
            } else {
                fork::take_into(&snap_dir, last)
            }
        })
        .await
        .expect("copies do not panic");
        // What a failed fork leaves: no clone directory, and no fork snapshot.
        let snapshot = (!keep).then(|| from.dir.clone());
        let remove = |dirs: Vec<VmDir>| async move {
            let _ = tokio::task::spawn_blocking(move || {
                for d in dirs {
                    let _ = std::fs::remove_dir_all(&d.dir);
                }
                if let Some(s) = snapshot {
                    let _ = std::fs::remove_dir_all(s);
                }
            })
            .await;
        };
        if let Err(e) = copied {
            remove(dirs).await;
            return Err(VmError::Disk(crate::vm::disks::DiskError::Io {
                path: plan.vms_dir.clone(),
                source: e,
            })
            .into());
        }
        // Tests: the copies made, no record of the clones yet.
        crate::vm::actor::die_at("mid-fork");
        let clones = plan.clones.clone();
        let made = ractor::call!(self.vms(), |reply| VmSupervisorMsg::CreateClones {
            from: Box::new(from),
            clones,
            network,
            nat,
            reply
        })
        .map_err(|_| TreeError::Call("vm-supervisor"))?;
        if let Err(e) = made {
            remove(dirs).await;
            return Err(e.into());
        }
        stage("restore", names.join(", "));
        let starts = names.iter().map(|n| {
            self.ask_vm(n, |reply| VmMsg::Start {
                progress: None,
                reply,
            })
        });
        let results = futures::future::join_all(starts).await;
        if let Some((name, e)) = names.iter().zip(&results).find_map(|(n, r)| {
            r.as_ref()
                .err()
                .map(|e| (n.clone(), banger_error::error_chain(e)))
        }) {
            tracing::warn!(vm = %source, clone = %name, error = %e, "a clone failed; undoing it");
            for n in &names {
                let _ = self
                    .ask_vm(n, |reply| VmMsg::Delete { force: true, reply })
                    .await;
            }
            return Err(VmError::Conflict(if keep {
                format!("vm {name} from vm {source}'s snapshot did not come up ({e}); it was deleted")
            } else {
                format!(
                    "forking vm {source}: clone {name} did not come up ({e}); every clone was deleted, vm {source} runs on"
                )
            })
            .into());
        }
        Ok(results.into_iter().map(|r| r.expect("checked")).collect())
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

    /// `vm show`: the VM's actor's view, or its stored record with `adopting` while the
    /// daemon re-adopts it (without waiting for that).
    pub async fn show_vm(&self, name: &str) -> Result<VmInfo, TreeError> {
        let vm = name.to_owned();
        ractor::call!(self.vms(), |reply| VmSupervisorMsg::Show { vm, reply })
            .map_err(|_| TreeError::Call("vm-supervisor"))?
            .map_err(TreeError::Vm)
    }

    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, TreeError> {
        ractor::call!(self.vms(), VmSupervisorMsg::List)
            .map_err(|_| TreeError::Call("vm-supervisor"))?
            .map_err(TreeError::Vm)
    }

    /// Stop the whole tree (children first, by ractor's linking).
    pub fn stop(&self) {
        // Builds run in blocking tasks the runtime waits for at exit: stopped first, so
        // the daemon's exit does not wait for the rest of an mmdebstrap run.
        self.pull_env.builds.stop_all();
        self.root.stop(Some("daemon shutting down".into()));
    }

    #[doc(hidden)]
    /// Test support: the live StoreActor's cell, to make it fail.
    pub fn store_cell(&self) -> ActorCell {
        self.store().get_cell()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{stored_vm, test_vm_config};
    use super::*;

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

    /// The tree is up (and answers) while VMs are still being re-adopted: the re-adoption
    /// is held here (no permits), and meanwhile `vm list`/`vm show` answer from the store
    /// with `adopting`, the update gate counts the VM as in flight, another VM answers, and
    /// an operation on the held VM waits for its actor, answering once its re-adoption is
    /// done. (Before: `Tree::start` re-adopted every VM before it returned.)
    #[tokio::test]
    async fn the_tree_serves_while_vms_are_re_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        // A VM recorded running whose process is gone: its re-adoption marks it stopped.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let up = crate::vm::model::VmRecord {
            state: banger_api::VmState::Running,
            runtime: Some(crate::vm::model::Runtime {
                pid: gone.id() as i32,
                start_time: 1,
                helpers: Vec::new(),
                control_socket: dir.path().join("qmp").display().to_string(),
                vsock_socket: dir.path().join("vsock").display().to_string(),
                isolation: None,
            }),
            ..stored_vm("aaa", "up", 1)
        };
        store.put_vm(&up).unwrap();
        store.put_vm(&stored_vm("bbb", "idle", 2)).unwrap();
        let mut config = test_vm_config(dir.path());
        let permits = Arc::new(tokio::sync::Semaphore::new(0));
        config.settings.adopt_permits = Arc::clone(&permits);
        let (tree, _join) = Tree::start(store, config, None).await.unwrap();

        use banger_api::VmState::{Created, Running, Stopped};
        let seen = |vms: Vec<VmInfo>| -> Vec<(String, banger_api::VmState, bool)> {
            vms.into_iter()
                .map(|v| (v.name, v.state, v.adopting))
                .collect()
        };
        assert_eq!(
            seen(tree.list_vms().await.unwrap()),
            [
                ("up".into(), Running, true),
                ("idle".into(), Created, false)
            ]
        );
        let shown = tree.show_vm("up").await.unwrap();
        assert!(shown.adopting && shown.state == Running, "{shown:?}");
        let e = tree.update_gate("9.9.9".into(), false).await.unwrap_err();
        assert!(
            matches!(&e, TreeError::Updater(UpdaterError::Busy(m)) if m == "up adopting (last stored state running)"),
            "{e}"
        );
        // Another VM answers from its actor meanwhile.
        let idle = tree.ask_vm("idle", VmMsg::Info).await.unwrap();
        assert!(!idle.adopting && idle.state == Created, "{idle:?}");
        // An operation on the held VM waits in its mailbox: it answers after the re-adoption.
        let asked = {
            let tree = tree.clone();
            tokio::spawn(async move { tree.ask_vm("up", VmMsg::Info).await })
        };

        permits.add_permits(1);
        let after = asked.await.unwrap().unwrap();
        assert!(!after.adopting && after.state == Stopped, "{after:?}");
        assert_eq!(
            seen(tree.list_vms().await.unwrap()),
            [
                ("up".into(), Stopped, false),
                ("idle".into(), Created, false)
            ]
        );
        assert!(!tree.show_vm("up").await.unwrap().adopting);
        assert!(
            tree.update_gate("9.9.9".into(), false)
                .await
                .unwrap()
                .is_empty()
        );
        tree.stop();
    }
}
