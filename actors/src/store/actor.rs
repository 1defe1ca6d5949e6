//! StoreActor: the tree's access point to the [`Store`]. Transactions run on tokio's
//! blocking pool (they fsync) and reply from there, so the mailbox never waits on disk.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::{Store, StoreError, StoreInfo};

/// Messages of the StoreActor.
#[derive(Debug)]
pub enum StoreMsg {
    /// The store's metadata.
    Info(RpcReplyPort<Result<StoreInfo, StoreError>>),
    /// Count a daemon start; answers the new count.
    RecordStart(RpcReplyPort<Result<u64, StoreError>>),
}

/// The StoreActor. Its argument is the open store, which the root keeps so a restarted
/// StoreActor gets the same database handle.
#[derive(Debug, Default)]
pub struct StoreActor;

impl Actor for StoreActor {
    type Msg = StoreMsg;
    type State = Arc<Store>;
    type Arguments = Arc<Store>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        store: Arc<Store>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(store)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        store: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let store = Arc::clone(store);
        match msg {
            StoreMsg::Info(reply) => blocking(reply, move || store.info()),
            StoreMsg::RecordStart(reply) => blocking(reply, move || store.record_start()),
        }
        Ok(())
    }
}

/// Run `work` on the blocking pool and send its result to `reply`. A caller that gave up
/// waiting is not an error of the store.
fn blocking<T: Send + 'static>(
    reply: RpcReplyPort<Result<T, StoreError>>,
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) {
    tokio::task::spawn_blocking(move || {
        let _ = reply.send(work());
    });
}
