//! `image.*` and `kernel.*`: local registration, pulls and promotes (subscriptions that
//! stream [`PullEvent`]s and end with the result), the catalogs and the layer cache.

use std::sync::Arc;

use jsonrpsee::core::{RpcResult, SubscriptionResult, async_trait};
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::{PendingSubscriptionSink, RpcModule};
use tokio::sync::mpsc;

use banger_actors::{NotFound, TreeError};
use banger_api::{
    BuildImage, CachePruned, CachedBlob, CatalogEntry, ImageInfo, ImageRpcServer, ImportKernel,
    KernelInfo, KernelRpcServer, PromoteImage, PullEvent, PullImage, PullKernel, RegisterImage,
};

use super::{Ctx, RpcError};

struct ImageApi {
    ctx: Arc<Ctx>,
}

struct KernelApi {
    ctx: Arc<Ctx>,
}

pub(super) fn image_rpc(ctx: Arc<Ctx>) -> RpcModule<impl Send + Sync + 'static> {
    ImageApi { ctx }.into_rpc()
}

pub(super) fn kernel_rpc(ctx: Arc<Ctx>) -> RpcModule<impl Send + Sync + 'static> {
    KernelApi { ctx }.into_rpc()
}

fn absolute(path: &str) -> Result<std::path::PathBuf, RpcError> {
    let p = std::path::PathBuf::from(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(RpcError::Invalid(format!(
            "{path} is not an absolute path (the daemon does not share your working directory)"
        )))
    }
}

/// Run a pull, streaming its events, and end the stream explicitly with the result (the
/// last item is `image`, `kernel` or `failed`). A caller that goes away does not stop the
/// pull: others may be waiting on it.
async fn pull_stream<F, Fut>(pending: PendingSubscriptionSink, op: F) -> SubscriptionResult
where
    F: FnOnce(mpsc::UnboundedSender<PullEvent>) -> Fut,
    Fut: std::future::Future<Output = Result<PullEvent, TreeError>>,
{
    let sink = pending.accept().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let fut = op(tx);
    tokio::pin!(fut);
    let send = |ev: PullEvent| {
        let sink = &sink;
        async move {
            if let Ok(raw) = serde_json::value::to_raw_value(&ev) {
                let _ = sink.send(raw).await;
            }
        }
    };
    let result = loop {
        tokio::select! {
            biased;
            Some(ev) = rx.recv() => send(ev).await,
            r = &mut fut => break r,
        }
    };
    while let Ok(ev) = rx.try_recv() {
        send(ev).await;
    }
    let last = result.unwrap_or_else(|e| {
        let obj: ErrorObjectOwned = RpcError::from(e).into();
        PullEvent::Failed {
            code: obj.code(),
            message: obj.message().to_owned(),
        }
    });
    send(last).await;
    Ok(())
}

#[async_trait]
impl ImageRpcServer for ImageApi {
    #[tracing::instrument(skip(self, pending), fields(source = %req.source))]
    async fn pull(&self, pending: PendingSubscriptionSink, req: PullImage) -> SubscriptionResult {
        let tree = self.ctx.tree.clone();
        pull_stream(pending, |tx| async move {
            let rec = tree.pull_image(req, Some(tx)).await?;
            Ok(PullEvent::Image {
                image: (&rec).into(),
            })
        })
        .await
    }

    #[tracing::instrument(skip(self, pending), fields(image = %req.name))]
    async fn build(&self, pending: PendingSubscriptionSink, req: BuildImage) -> SubscriptionResult {
        let tree = self.ctx.tree.clone();
        pull_stream(pending, |tx| async move {
            let rec = tree.build_image(req, Some(tx)).await?;
            Ok(PullEvent::Image {
                image: (&rec).into(),
            })
        })
        .await
    }

    #[tracing::instrument(skip(self, pending), fields(vm = %req.vm, image = %req.name))]
    async fn promote(
        &self,
        pending: PendingSubscriptionSink,
        req: PromoteImage,
    ) -> SubscriptionResult {
        let tree = self.ctx.tree.clone();
        pull_stream(pending, |tx| async move {
            let rec = tree.promote_image(req, Some(tx)).await?;
            Ok(PullEvent::Image {
                image: (&rec).into(),
            })
        })
        .await
    }

    async fn available(&self) -> RpcResult<Vec<CatalogEntry>> {
        Ok(self.ctx.tree.catalogs().images.clone())
    }

    async fn cache_list(&self) -> RpcResult<Vec<CachedBlob>> {
        Ok(self
            .ctx
            .tree
            .blob_cache_list()
            .await
            .map_err(RpcError::from)?)
    }

    #[tracing::instrument(skip(self))]
    async fn cache_prune(&self) -> RpcResult<CachePruned> {
        Ok(self
            .ctx
            .tree
            .blob_cache_prune()
            .await
            .map_err(RpcError::from)?)
    }

    #[tracing::instrument(skip(self, pending))]
    async fn warm(
        &self,
        pending: PendingSubscriptionSink,
        req: banger_api::WarmImage,
    ) -> SubscriptionResult {
        let ctx = Arc::clone(&self.ctx);
        super::vm::stream(pending, |tx| async move {
            ctx.tree
                .warm_image(req, Some(tx))
                .await
                .map(|warm| banger_api::Progress::Warmed { warm })
                .map_err(RpcError::from)
        })
        .await
    }

    async fn warm_list(&self) -> RpcResult<Vec<banger_api::WarmInfo>> {
        Ok(self.ctx.tree.warm_list().await.map_err(RpcError::from)?)
    }

    #[tracing::instrument(skip(self))]
    async fn warm_rm(&self, which: String) -> RpcResult<Vec<banger_api::WarmInfo>> {
        Ok(self.ctx.tree.warm_rm(which).await.map_err(RpcError::from)?)
    }

    #[tracing::instrument(skip(self))]
    async fn register(&self, req: RegisterImage) -> RpcResult<ImageInfo> {
        let rootfs = absolute(&req.rootfs)?;
        let rec = self
            .ctx
            .tree
            .register_image(req.name, rootfs, req.kernel)
            .await
            .map_err(RpcError::from)?;
        Ok((&rec).into())
    }

    async fn list(&self) -> RpcResult<Vec<ImageInfo>> {
        let mut all: Vec<ImageInfo> = self
            .ctx
            .tree
            .images()
            .await
            .map_err(RpcError::from)?
            .iter()
            .map(Into::into)
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    async fn show(&self, name: String) -> RpcResult<ImageInfo> {
        match self
            .ctx
            .tree
            .image(name.clone())
            .await
            .map_err(RpcError::from)?
        {
            Some(rec) => Ok((&rec).into()),
            None => Err(RpcError::from(NotFound::image(name)).into()),
        }
    }

    #[tracing::instrument(skip(self))]
    async fn delete(&self, name: String) -> RpcResult<ImageInfo> {
        match self
            .ctx
            .tree
            .delete_image(name.clone())
            .await
            .map_err(RpcError::from)?
        {
            Some(rec) => Ok((&rec).into()),
            None => Err(RpcError::from(NotFound::image(name)).into()),
        }
    }
}

#[async_trait]
impl KernelRpcServer for KernelApi {
    #[tracing::instrument(skip(self, pending), fields(kernel = %req.name))]
    async fn pull(&self, pending: PendingSubscriptionSink, req: PullKernel) -> SubscriptionResult {
        let tree = self.ctx.tree.clone();
        pull_stream(pending, |tx| async move {
            let rec = tree.pull_kernel(req.name, Some(tx)).await?;
            Ok(PullEvent::Kernel {
                kernel: (&rec).into(),
            })
        })
        .await
    }

    async fn available(&self) -> RpcResult<Vec<CatalogEntry>> {
        Ok(self.ctx.tree.catalogs().kernels.clone())
    }

    #[tracing::instrument(skip(self))]
    async fn import(&self, req: ImportKernel) -> RpcResult<KernelInfo> {
        let from = absolute(&req.from)?;
        let rec = self
            .ctx
            .tree
            .import_kernel(req.name, from)
            .await
            .map_err(RpcError::from)?;
        Ok((&rec).into())
    }

    async fn list(&self) -> RpcResult<Vec<KernelInfo>> {
        let mut all: Vec<KernelInfo> = self
            .ctx
            .tree
            .kernels()
            .await
            .map_err(RpcError::from)?
            .iter()
            .map(Into::into)
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    async fn show(&self, name: String) -> RpcResult<KernelInfo> {
        match self
            .ctx
            .tree
            .kernel(name.clone())
            .await
            .map_err(RpcError::from)?
        {
            Some(rec) => Ok((&rec).into()),
            None => Err(RpcError::from(NotFound::kernel(name)).into()),
        }
    }

    #[tracing::instrument(skip(self))]
    async fn rm(&self, name: String) -> RpcResult<KernelInfo> {
        match self
            .ctx
            .tree
            .remove_kernel(name.clone())
            .await
            .map_err(RpcError::from)?
        {
            Some(rec) => Ok((&rec).into()),
            None => Err(RpcError::from(NotFound::kernel(name)).into()),
        }
    }
}
