//! RootSupervisor: starts the tree, restarts failed children, and hands out [`Tree`], the
//! handle the RPC layer uses to reach the actors.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::store::{Store, StoreActor, StoreError, StoreInfo, StoreMsg};
use crate::vm_supervisor::{VmSupervisor, VmSupervisorMsg};

/// At most this many restarts of one child within [`RESTART_WINDOW`]...
pub const MAX_RESTARTS: usize = 5;
/// ...else the root stops and the daemon exits.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// How long a caller waits for an actor's answer before giving up.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors reaching the tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("failed to start the supervision tree")]
    Spawn(#[source] ractor::SpawnErr),
    #[error("the {0} actor did not answer")]
    Call(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Current references to the tree's actors. A restart replaces the reference in place,
/// so holders of a `Tree` always reach the live actor.
#[derive(Debug, Clone)]
pub struct Tree {
    root: ActorRef<RootMsg>,
    store: Slot<StoreMsg>,
    vms: Slot<VmSupervisorMsg>,
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
    Vms,
}

impl Child {
    fn name(self) -> &'static str {
        match self {
            Child::Store => "store",
            Child::Vms => "vm-supervisor",
        }
    }
}

/// Arguments of the root.
#[derive(Debug)]
pub struct RootArgs {
    store: Arc<Store>,
    store_ref: Slot<StoreMsg>,
    vms_ref: Slot<VmSupervisorMsg>,
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
            Child::Vms => {
                let (r, _) = Actor::spawn_linked(None, VmSupervisor, (), myself.get_cell()).await?;
                *state.args.vms_ref.write().expect("tree lock") = Some(r.clone());
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
            restarts: vec![
                (Child::Store, VecDeque::new()),
                (Child::Vms, VecDeque::new()),
            ],
        };
        Self::spawn_child(&myself, &mut state, Child::Store).await?;
        Self::spawn_child(&myself, &mut state, Child::Vms).await?;
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
    pub async fn start(store: Store) -> Result<(Tree, tokio::task::JoinHandle<()>), TreeError> {
        let store_ref = Arc::new(RwLock::new(None));
        let vms_ref = Arc::new(RwLock::new(None));
        let args = RootArgs {
            store: Arc::new(store),
            store_ref: Arc::clone(&store_ref),
            vms_ref: Arc::clone(&vms_ref),
        };
        let (root, join) = Actor::spawn(None, RootSupervisor, args)
            .await
            .map_err(TreeError::Spawn)?;
        let tree = Tree {
            root,
            store: store_ref,
            vms: vms_ref,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_store_actor_is_restarted_and_keeps_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (tree, _join) = Tree::start(store).await.unwrap();
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
