//! `image.*` and `kernel.*`: local registration for now.

use std::sync::Arc;

use jsonrpsee::RpcModule;
use jsonrpsee::core::{RpcResult, async_trait};

use banger_api::{
    ImageInfo, ImageRpcServer, ImportKernel, KernelInfo, KernelRpcServer, RegisterImage,
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

#[async_trait]
impl ImageRpcServer for ImageApi {
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
            None => Err(
                RpcError::NotFound(format!("image named {name}; see `banger image list`")).into(),
            ),
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
            None => Err(
                RpcError::NotFound(format!("image named {name}; see `banger image list`")).into(),
            ),
        }
    }
}

#[async_trait]
impl KernelRpcServer for KernelApi {
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
            None => Err(RpcError::NotFound(format!(
                "kernel named {name}; see `banger kernel list`"
            ))
            .into()),
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
            None => Err(RpcError::NotFound(format!(
                "kernel named {name}; see `banger kernel list`"
            ))
            .into()),
        }
    }
}
