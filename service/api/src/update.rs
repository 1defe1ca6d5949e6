//! The `update.*` namespace: the daemon's side of `banger update`.

use serde::{Deserialize, Serialize};

/// Parameters of `update.gate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateGate {
    /// The version the caller is about to install.
    pub version: String,
    /// Proceed even while a VM operation is in flight.
    #[serde(default)]
    pub force: bool,
}

/// Answer to `update.gate`: the update may proceed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateGranted {
    /// VM operations that were in flight (non-empty only with `force`).
    pub in_flight: Vec<String>,
}

#[cfg(any(feature = "server", feature = "client"))]
mod rpc {
    use super::{GateGranted, UpdateGate};

    #[cfg_attr(
        all(feature = "server", feature = "client"),
        jsonrpsee::proc_macros::rpc(
            server,
            client,
            namespace = "update",
            namespace_separator = "."
        )
    )]
    #[cfg_attr(
        all(feature = "server", not(feature = "client")),
        jsonrpsee::proc_macros::rpc(server, namespace = "update", namespace_separator = ".")
    )]
    #[cfg_attr(
        all(feature = "client", not(feature = "server")),
        jsonrpsee::proc_macros::rpc(client, namespace = "update", namespace_separator = ".")
    )]
    pub trait UpdateRpc {
        /// May an update proceed now? Refused (CONFLICT) while a VM is starting or
        /// stopping, unless `force`.
        #[method(name = "gate")]
        async fn gate(&self, req: UpdateGate) -> jsonrpsee::core::RpcResult<GateGranted>;
    }
}

#[cfg(feature = "client")]
pub use rpc::UpdateRpcClient;
#[cfg(feature = "server")]
pub use rpc::UpdateRpcServer;
