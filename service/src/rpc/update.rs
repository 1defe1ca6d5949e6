//! `update.*`: the update gate (see `banger_actors::updater::actor`).

use std::sync::Arc;

use jsonrpsee::RpcModule;
use jsonrpsee::core::{RpcResult, async_trait};

use banger_api::{GateGranted, UpdateGate, UpdateRpcServer};

use super::{Ctx, RpcError};

struct UpdateApi {
    ctx: Arc<Ctx>,
}

pub(super) fn into_rpc(ctx: Arc<Ctx>) -> RpcModule<impl Send + Sync + 'static> {
    UpdateApi { ctx }.into_rpc()
}

#[async_trait]
impl UpdateRpcServer for UpdateApi {
    #[tracing::instrument(skip(self))]
    async fn gate(&self, req: UpdateGate) -> RpcResult<GateGranted> {
        let in_flight = self
            .ctx
            .tree
            .update_gate(req.version, req.force)
            .await
            .map_err(RpcError::from)?;
        Ok(GateGranted { in_flight })
    }
}
