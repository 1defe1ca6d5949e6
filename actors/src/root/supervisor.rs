//! RootSupervisor: starts the tree's children, restarts one that fails (one-for-one, within a
//! budget), and writes each child's current reference into its [`Slot`] so a [`Tree`]
//! always reaches the live actor.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

#[cfg(doc)]
use super::Tree;
use super::VmConfig;
use crate::net::dns::{DnsActor, DnsMsg};
use crate::net::host::{HelperActor, HostNet, NatActor, NetActor, SharedHelper};
use crate::pull::{PullActor, PullEnv, PullMsg};
use crate::store::{Store, StoreActor, StoreMsg};
use crate::updater::actor::{UpdaterActor, UpdaterMsg};
use crate::vm::actor::VmEnv;
use crate::vm_supervisor::{VmSupervisor, VmSupervisorArgs, VmSupervisorMsg};

/// At most this many restarts of one child within [`RESTART_WINDOW`]...
pub const MAX_RESTARTS: usize = 5;
/// ...else the root stops and the daemon exits.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The current reference to one child, written by the root whenever it (re)spawns it.
pub(super) type Slot<M> = Arc<RwLock<Option<ActorRef<M>>>>;

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
    pub(super) store: Arc<Store>,
    pub(super) vm: VmConfig,
    pub(super) store_ref: Slot<StoreMsg>,
    pub(super) vms_ref: Slot<VmSupervisorMsg>,
    pub(super) dns_ref: Slot<DnsMsg>,
    pub(super) net: HostNet,
    /// The privileged helper process (None: bangerd is not root).
    pub(super) helper: SharedHelper,
    pub(super) updater_ref: Slot<UpdaterMsg>,
    pub(super) pull_ref: Slot<PullMsg>,
    /// Kept here so a restarted PullActor shares the blob cache's locks with the tree.
    pub(super) pull_env: Arc<PullEnv>,
    /// The `.vm` names, shared by the VM supervisor and the DNS actor; kept here so a
    /// restart of either keeps it.
    pub(super) dns_table: crate::net::dns::Table,
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
                    warm_dir: crate::vm::warm::base(&vm.data_dir),
                    vmm: vm.vmm.clone(),
                    stop_timeout: vm.stop_timeout,
                    extra_cmdline: vm.extra_cmdline.clone(),
                    tsc_khz: vm.tsc_khz,
                    agent_timeout: vm.agent_timeout,
                    net: state.args.net.clone(),
                    subnet: vm.settings.subnet,
                    own_uid: nix::unistd::geteuid().as_raw(),
                    ssh_key: vm
                        .ssh_key
                        .clone()
                        .map(|p| Arc::new(crate::vm::sshkey::SshKey::new(p))),
                    file_sync: vm.file_sync.clone(),
                    guest_dir: Some(vm.pull.guest_binaries_dir.clone()),
                    guest_current: Default::default(),
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
                    Arc::clone(&state.args.net.egress),
                    Some(Arc::new(crate::net::egress::HelperVouch {
                        helper: Arc::clone(&state.args.net.helper),
                    }) as Arc<dyn crate::net::dns::Vouch>),
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

pub(super) fn live<M>(slot: &Slot<M>) -> ActorRef<M> {
    slot.read()
        .expect("tree lock")
        .clone()
        .expect("children are spawned in the root's pre_start")
}

#[cfg(test)]
mod tests {
    use super::super::Tree;
    use super::super::fixtures::test_vm_config;
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
}
