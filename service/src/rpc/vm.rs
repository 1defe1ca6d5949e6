//! `vm.*`: each call becomes a message to the VmSupervisor or to the VM's own actor.

use std::sync::Arc;
use std::time::Duration;

use jsonrpsee::core::{RpcResult, SubscriptionResult, async_trait};
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::{PendingSubscriptionSink, RpcModule, SubscriptionSink};
use tokio::sync::mpsc;

use banger_actors::TreeError;
use banger_actors::vm::actor::{VmError, VmMsg};
use banger_actors::vm::proc::parse_signal;
use banger_actors::vm::publish::{PortAnswer, PortOp};
use banger_api::{
    CreateVm, ForkVm, LogEvent, Progress, Pruned, SetVm, SnapshotInfo, SpecDefaults, VmInfo,
    VmRpcServer, VmState, VmStats,
};

use super::{Ctx, RpcError};

struct VmApi {
    ctx: Arc<Ctx>,
}

impl VmApi {
    /// A snapshot the VM does not have: say which VM has one by that name, if any (a
    /// rollback to another VM's snapshot is the likely mistake).
    async fn elsewhere<T>(&self, answer: Result<T, TreeError>, asked: &str) -> Result<T, RpcError> {
        match answer {
            Err(TreeError::Vm(VmError::NoSnapshot { vm, name, .. })) => {
                let vms = self.ctx.tree.list_vms().await.unwrap_or_default();
                let elsewhere = vms
                    .into_iter()
                    .find(|v| {
                        v.name != vm && v.snapshots.iter().any(|s| s.name == asked || s.id == asked)
                    })
                    .map(|v| v.name);
                Err(RpcError::from(TreeError::Vm(VmError::NoSnapshot {
                    vm,
                    name,
                    elsewhere,
                })))
            }
            other => other.map_err(RpcError::from),
        }
    }
}

pub(super) fn into_rpc(ctx: Arc<Ctx>) -> RpcModule<impl Send + Sync + 'static> {
    VmApi { ctx }.into_rpc()
}

async fn send<T: serde::Serialize>(sink: &SubscriptionSink, item: &T) -> bool {
    match serde_json::value::to_raw_value(item) {
        Ok(raw) => sink.send(raw).await.is_ok(),
        Err(_) => false,
    }
}

/// Run a start-like operation, streaming its stages, and end the stream explicitly with
/// `done` or `failed`.
async fn progress_stream<F, Fut>(pending: PendingSubscriptionSink, op: F) -> SubscriptionResult
where
    F: FnOnce(mpsc::UnboundedSender<Progress>) -> Fut,
    Fut: std::future::Future<Output = Result<VmInfo, TreeError>>,
{
    stream(pending, |tx| async move {
        op(tx)
            .await
            .map(|vm| Progress::Done { vm })
            .map_err(RpcError::from)
    })
    .await
}

/// Run an operation, streaming its stages, and end the stream with the event it answers
/// (`done`, or `snapshot` for `vm.snapshot_create`) or `failed`.
pub(super) async fn stream<F, Fut>(pending: PendingSubscriptionSink, op: F) -> SubscriptionResult
where
    F: FnOnce(mpsc::UnboundedSender<Progress>) -> Fut,
    Fut: std::future::Future<Output = Result<Progress, RpcError>>,
{
    let sink = pending.accept().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let fut = op(tx);
    tokio::pin!(fut);
    let result = loop {
        tokio::select! {
            biased;
            Some(ev) = rx.recv() => { send(&sink, &ev).await; }
            r = &mut fut => break r,
        }
    };
    while let Ok(ev) = rx.try_recv() {
        send(&sink, &ev).await;
    }
    let last = match result {
        Ok(last) => last,
        Err(e) => {
            let obj: ErrorObjectOwned = e.into();
            Progress::Failed {
                code: obj.code(),
                message: obj.message().to_owned(),
            }
        }
    };
    send(&sink, &last).await;
    Ok(())
}

impl VmApi {
    /// `vm port …`: one message to the VM's actor.
    async fn port(&self, vm: &str, op: PortOp) -> Result<PortAnswer, RpcError> {
        Ok(self
            .ctx
            .tree
            .ask_vm(vm, |reply| VmMsg::Port { op, reply })
            .await?)
    }

    async fn start_vm(
        ctx: &Ctx,
        vm: &str,
        progress: mpsc::UnboundedSender<Progress>,
    ) -> Result<VmInfo, TreeError> {
        ctx.tree
            .ask_vm(vm, |reply| VmMsg::Start {
                progress: Some(progress),
                reply,
            })
            .await
    }
}

#[async_trait]
impl VmRpcServer for VmApi {
    async fn defaults(&self) -> RpcResult<SpecDefaults> {
        Ok(self.ctx.tree.vm_defaults().await.map_err(RpcError::from)?)
    }

    #[tracing::instrument(skip(self, pending), fields(vm = req.name.as_deref().unwrap_or("-")))]
    async fn create(&self, pending: PendingSubscriptionSink, req: CreateVm) -> SubscriptionResult {
        let tree = self.ctx.tree.clone();
        progress_stream(
            pending,
            |tx| async move { tree.create_vm(req, Some(tx)).await },
        )
        .await
    }

    #[tracing::instrument(skip(self, pending))]
    async fn start(&self, pending: PendingSubscriptionSink, vm: String) -> SubscriptionResult {
        let ctx = Arc::clone(&self.ctx);
        progress_stream(
            pending,
            |tx| async move { Self::start_vm(&ctx, &vm, tx).await },
        )
        .await
    }

    #[tracing::instrument(skip(self, pending))]
    async fn restart(&self, pending: PendingSubscriptionSink, vm: String) -> SubscriptionResult {
        let ctx = Arc::clone(&self.ctx);
        progress_stream(pending, |tx| async move {
            // The VM first: an unknown one is an error with no stage before it.
            let info = ctx.tree.ask_vm(&vm, VmMsg::Info).await?;
            if banger_actors::vm::model::is_active(info.state) {
                let _ = tx.send(Progress::Stage {
                    stage: "stop".into(),
                    detail: None,
                });
                ctx.tree
                    .ask_vm(&vm, |reply| VmMsg::Stop {
                        timeout: None,
                        reply,
                    })
                    .await?;
            }
            Self::start_vm(&ctx, &vm, tx).await
        })
        .await
    }

    #[tracing::instrument(skip(self))]
    async fn stop(&self, vm: String, timeout_secs: Option<u64>) -> RpcResult<VmInfo> {
        let timeout = timeout_secs.map(Duration::from_secs);
        Ok(self
            .ctx
            .tree
            .ask_vm(&vm, |reply| VmMsg::Stop { timeout, reply })
            .await
            .map_err(RpcError::from)?)
    }

    #[tracing::instrument(skip(self))]
    async fn pause(&self, vm: String) -> RpcResult<VmInfo> {
        Ok(self
            .ctx
            .tree
            .ask_vm(&vm, |reply| VmMsg::Pause { reply })
            .await
            .map_err(RpcError::from)?)
    }

    #[tracing::instrument(skip(self))]
    async fn resume(&self, vm: String) -> RpcResult<VmInfo> {
        Ok(self
            .ctx
            .tree
            .ask_vm(&vm, |reply| VmMsg::Resume { reply })
            .await
            .map_err(RpcError::from)?)
    }

    #[tracing::instrument(skip(self, pending))]
    async fn suspend(&self, pending: PendingSubscriptionSink, vm: String) -> SubscriptionResult {
        let ctx = Arc::clone(&self.ctx);
        progress_stream(pending, |tx| async move {
            ctx.tree
                .ask_vm(&vm, |reply| VmMsg::Suspend {
                    progress: Some(tx),
                    reply,
                })
                .await
        })
        .await
    }

    #[tracing::instrument(skip(self))]
    async fn kill(&self, vm: String, signal: Option<String>) -> RpcResult<VmInfo> {
        let signal = match signal {
            Some(s) => parse_signal(&s).map_err(RpcError::Invalid)?,
            None => nix::sys::signal::Signal::SIGKILL,
        };
        Ok(self
            .ctx
            .tree
            .ask_vm(&vm, |reply| VmMsg::Kill { signal, reply })
            .await
            .map_err(RpcError::from)?)
    }

    #[tracing::instrument(skip(self))]
    async fn delete(&self, vm: String, force: bool) -> RpcResult<VmInfo> {
        Ok(self
            .ctx
            .tree
            .ask_vm(&vm, |reply| VmMsg::Delete { force, reply })
            .await
            .map_err(RpcError::from)?)
    }

    #[tracing::instrument(skip(self))]
    async fn set(&self, req: SetVm) -> RpcResult<VmInfo> {
        let vm = req.vm.clone();
        Ok(self
            .ctx
            .tree
            .ask_vm(&vm, |reply| VmMsg::Set { req, reply })
            .await
            .map_err(RpcError::from)?)
    }

    async fn list(&self) -> RpcResult<Vec<VmInfo>> {
        Ok(self.ctx.tree.list_vms().await.map_err(RpcError::from)?)
    }

    async fn show(&self, vm: String) -> RpcResult<VmInfo> {
        Ok(self.ctx.tree.show_vm(&vm).await.map_err(RpcError::from)?)
    }

    async fn stats(&self, vm: String) -> RpcResult<VmStats> {
        Ok(self
            .ctx
            .tree
            .ask_vm(&vm, VmMsg::Stats)
            .await
            .map_err(RpcError::from)?)
    }

    async fn egress_log(&self, vm: String) -> RpcResult<banger_api::EgressLog> {
        Ok(self
            .ctx
            .tree
            .ask_vm(&vm, VmMsg::EgressLog)
            .await
            .map_err(RpcError::from)?)
    }

    async fn ports(&self, vm: String) -> RpcResult<Vec<banger_api::Port>> {
        Ok(self
            .ctx
            .tree
            .ask_vm(&vm, VmMsg::Ports)
            .await
            .map_err(RpcError::from)?)
    }

    async fn logs(&self, vm: String, tail_bytes: Option<u64>) -> RpcResult<String> {
        let info = self
            .ctx
            .tree
            .ask_vm(&vm, VmMsg::Info)
            .await
            .map_err(RpcError::from)?;
        // The previous generation (console.log.1, after a rotation) first, then the current.
        let old = format!("{}.1", info.console_log);
        let mut bytes = tokio::fs::read(&old).await.unwrap_or_default();
        bytes.extend(tokio::fs::read(&info.console_log).await.unwrap_or_default());
        let from = match tail_bytes {
            Some(n) => bytes.len().saturating_sub(n as usize),
            None => 0,
        };
        Ok(String::from_utf8_lossy(&bytes[from..]).into_owned())
    }

    async fn logs_follow(
        &self,
        pending: PendingSubscriptionSink,
        vm: String,
    ) -> SubscriptionResult {
        let actor = match self.ctx.tree.vm(&vm).await {
            Ok(a) => a,
            Err(e) => {
                let obj: ErrorObjectOwned = RpcError::from(e).into();
                pending.reject(obj).await;
                return Ok(());
            }
        };
        let Ok((backlog, rx)) = ractor::call!(actor, VmMsg::Follow) else {
            pending
                .reject(ErrorObjectOwned::from(RpcError::from(VmError::Gone(vm))))
                .await;
            return Ok(());
        };
        let sink = pending.accept().await?;
        if !backlog.is_empty() && !send(&sink, &LogEvent::Data { text: backlog }).await {
            return Ok(());
        }
        let Some(mut rx) = rx else {
            let state = ractor::call!(actor, VmMsg::Info)
                .ok()
                .and_then(Result::ok)
                .map(|i| i.state)
                .unwrap_or(VmState::Stopped);
            send(&sink, &LogEvent::End { state }).await;
            return Ok(());
        };
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        let end = matches!(ev, LogEvent::End { .. });
                        if !send(&sink, &ev).await || end {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let note = format!("\n[banger: {n} console chunks dropped: this follower was too slow]\n");
                        if !send(&sink, &LogEvent::Data { text: note }).await {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        send(&sink, &LogEvent::End { state: VmState::Stopped }).await;
                        break;
                    }
                },
                () = sink.closed() => break,
            }
        }
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn port_add(
        &self,
        vm: String,
        spec: banger_api::PortSpec,
    ) -> RpcResult<banger_api::PublishedPort> {
        match self.port(&vm, PortOp::Add(spec)).await? {
            PortAnswer::Added(p) => Ok(p),
            _ => Err(RpcError::from(TreeError::Call("vm")).into()),
        }
    }

    #[tracing::instrument(skip(self, pending))]
    async fn snapshot_create(
        &self,
        pending: PendingSubscriptionSink,
        vm: String,
        name: Option<String>,
    ) -> SubscriptionResult {
        let ctx = Arc::clone(&self.ctx);
        stream(pending, |tx| async move {
            ctx.tree
                .ask_vm(&vm, |reply| VmMsg::SnapshotCreate {
                    name,
                    progress: Some(tx),
                    reply,
                })
                .await
                .map(|snapshot| Progress::Snapshot { snapshot })
                .map_err(RpcError::from)
        })
        .await
    }

    async fn snapshot_list(&self, vm: Option<String>) -> RpcResult<Vec<SnapshotInfo>> {
        let tree = &self.ctx.tree;
        let vms = match vm {
            Some(vm) => vec![tree.show_vm(&vm).await.map_err(RpcError::from)?],
            None => tree.list_vms().await.map_err(RpcError::from)?,
        };
        Ok(vms.into_iter().flat_map(|v| v.snapshots).collect())
    }

    #[tracing::instrument(skip(self))]
    async fn snapshot_rm(&self, vm: String, snapshot: String) -> RpcResult<SnapshotInfo> {
        let asked = snapshot.clone();
        let answer = self
            .ctx
            .tree
            .ask_vm(&vm, |reply| VmMsg::SnapshotRemove { snapshot, reply })
            .await;
        Ok(self.elsewhere(answer, &asked).await?)
    }

    #[tracing::instrument(skip(self, pending))]
    async fn rollback(
        &self,
        pending: PendingSubscriptionSink,
        vm: String,
        snapshot: String,
    ) -> SubscriptionResult {
        let asked = snapshot.clone();
        stream(pending, |tx| async move {
            let answer = self
                .ctx
                .tree
                .ask_vm(&vm, |reply| VmMsg::Rollback {
                    snapshot,
                    progress: Some(tx),
                    reply,
                })
                .await;
            self.elsewhere(answer, &asked)
                .await
                .map(|vm| Progress::Done { vm })
        })
        .await
    }

    #[tracing::instrument(skip(self, pending), fields(vm = %req.vm))]
    async fn fork(&self, pending: PendingSubscriptionSink, req: ForkVm) -> SubscriptionResult {
        let ctx = Arc::clone(&self.ctx);
        stream(pending, |tx| async move {
            ctx.tree
                .fork_vm(req, Some(tx))
                .await
                .map(|vms| Progress::Forked { vms })
                .map_err(RpcError::from)
        })
        .await
    }

    #[tracing::instrument(skip(self))]
    async fn port_rm(&self, vm: String, port: String) -> RpcResult<Vec<banger_api::PublishedPort>> {
        match self.port(&vm, PortOp::Remove(port)).await? {
            PortAnswer::Removed(p) => Ok(p),
            _ => Err(RpcError::from(TreeError::Call("vm")).into()),
        }
    }

    async fn port_list(&self, vm: String) -> RpcResult<Vec<banger_api::PublishedPort>> {
        match self.port(&vm, PortOp::List).await? {
            PortAnswer::List(p) => Ok(p),
            _ => Err(RpcError::from(TreeError::Call("vm")).into()),
        }
    }

    #[tracing::instrument(skip(self))]
    async fn prune(&self, dry_run: bool) -> RpcResult<Pruned> {
        let vms = self.ctx.tree.list_vms().await.map_err(RpcError::from)?;
        let mut deleted = Vec::new();
        // A busy VM's state is only its last stored one: leave it alone.
        for vm in vms
            .into_iter()
            .filter(|v| !v.busy && !v.adopting && !banger_actors::vm::model::is_active(v.state))
        {
            if !dry_run {
                self.ctx
                    .tree
                    .ask_vm(&vm.id, |reply| VmMsg::Delete {
                        force: false,
                        reply,
                    })
                    .await
                    .map_err(RpcError::from)?;
            }
            deleted.push(vm.name);
        }
        Ok(Pruned { deleted })
    }
}
