//! `daemon.*`: ping, status, stop.

use std::sync::Arc;

use jsonrpsee::RpcModule;
use jsonrpsee::core::{RpcResult, async_trait};

use banger_api::{DaemonRpcServer, DaemonStatus, Pong, StopAck, StoreStatus};

use super::{Ctx, RpcError};

struct DaemonApi {
    ctx: Arc<Ctx>,
}

pub(super) fn into_rpc(ctx: Arc<Ctx>) -> RpcModule<impl Send + Sync + 'static> {
    DaemonApi { ctx }.into_rpc()
}

#[async_trait]
impl DaemonRpcServer for DaemonApi {
    async fn ping(&self) -> RpcResult<Pong> {
        Ok(Pong {
            version: crate::VERSION.into(),
        })
    }

    #[tracing::instrument(skip(self))]
    async fn status(&self) -> RpcResult<DaemonStatus> {
        let store = self.ctx.tree.store_info().await.map_err(RpcError::from)?;
        let paths = &self.ctx.paths;
        let helper = self.ctx.tree.helper_confinement().await;
        let jail_base = paths.data_dir.join("jail");
        let cgroups = banger_policy::cgroup::detect_host();
        use banger_actors::vmm::{choose::Jailing, firecracker as fc};
        let firecracker = banger_api::FirecrackerStatus {
            jailed: self.ctx.jailing == Jailing::Ready,
            isolation: match self.ctx.jailing {
                Jailing::Ready => fc::jailed(&cgroups, None),
                Jailing::NoHelper => fc::UNJAILED.to_owned(),
                Jailing::HelperWithoutJailer => "none: the helper found no jailer when bangerd started, so Firecracker VMs are refused; install Firecracker's release (jailer included) and restart bangerd".to_owned(),
            },
            cgroups: cgroups.describe(),
            nodev: banger_policy::jail::nodev_problem(&jail_base),
            jail_base: jail_base.display().to_string(),
        };
        Ok(DaemonStatus {
            pid: std::process::id(),
            version: crate::VERSION.into(),
            commit: crate::COMMIT.into(),
            build_time: crate::BUILD_TIME.into(),
            mode: paths.mode,
            socket: paths.socket.display().to_string(),
            log_path: paths.log_file().display().to_string(),
            uptime_secs: self.ctx.started.elapsed().as_secs(),
            started_at: self.ctx.started_at,
            dns: self.ctx.tree.dns_addr().await.map(|a| a.to_string()),
            firecracker: Some(firecracker),
            helper: helper.map(|c| banger_api::HelperStatus {
                uid: c.uid,
                seccomp_mode: c.seccomp_mode,
                no_new_privs: c.no_new_privs,
                caps_effective: c.caps_effective,
                landlock: c.landlock,
            }),
            network: Some(self.ctx.network.clone()),
            ssh_key: Some(self.ctx.ssh_key.display().to_string()),
            store: StoreStatus {
                path: store.path.display().to_string(),
                schema_version: store.schema_version,
                instance_id: store.instance_id,
                starts: store.starts,
            },
        })
    }

    #[tracing::instrument(skip(self))]
    async fn stop(&self) -> RpcResult<StopAck> {
        tracing::info!("stop requested over RPC");
        // Graceful shutdown lets this very request finish: the answer is sent first.
        self.ctx.stop.notify_one();
        Ok(StopAck {
            pid: std::process::id(),
        })
    }
}
