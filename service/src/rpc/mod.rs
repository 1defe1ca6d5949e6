//! The RPC layer is an adapter: one module per namespace turns each call into a message
//! to the tree, and every error becomes a JSON-RPC error here, in one place ([`RpcError`]
//! → [`ErrorObjectOwned`]).

#![allow(clippy::result_large_err)]

pub mod daemon;
pub mod image;
pub mod update;
pub mod vm;

use std::sync::Arc;
use std::time::Instant;

use jsonrpsee::RpcModule;
use jsonrpsee::server::Methods;
use jsonrpsee::types::ErrorObjectOwned;
use tokio::sync::Notify;

use banger_actors::updater::actor::UpdaterError;
use banger_actors::{Tree, TreeError};
use banger_api::codes;

use crate::paths::Paths;

/// What the handlers share.
#[derive(Debug)]
pub struct Ctx {
    pub tree: Tree,
    pub paths: Paths,
    /// banger's ssh key (reported by `daemon.status` for `vm ssh` and `ssh-config`).
    pub ssh_key: std::path::PathBuf,
    pub started: Instant,
    pub started_at: u64,
    /// Notified by `daemon.stop`.
    pub stop: Arc<Notify>,
    /// The VM network as configured (for `daemon.status`).
    pub network: banger_api::NetworkStatus,
    /// Whether the helper starts Firecracker's jailer (for `daemon.status`).
    pub jailing: banger_actors::vmm::choose::Jailing,
}

/// Every error a handler can return. (Large, as it carries the actors' errors by value;
/// it lives only on the error path of a request.)
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    NotFound(#[from] banger_actors::NotFound),
    #[error("{0}")]
    Invalid(String),
}

impl From<banger_actors::vm::actor::VmError> for RpcError {
    fn from(e: banger_actors::vm::actor::VmError) -> Self {
        RpcError::Tree(TreeError::Vm(e))
    }
}

impl From<RpcError> for ErrorObjectOwned {
    fn from(err: RpcError) -> Self {
        let code = match &err {
            RpcError::Tree(TreeError::Vm(e)) => e.code(),
            RpcError::Tree(TreeError::Image(banger_actors::image::ImageError::Name(_)))
            | RpcError::Tree(TreeError::Image(banger_actors::image::ImageError::NotExt4 {
                ..
            }))
            | RpcError::Tree(TreeError::Image(banger_actors::image::ImageError::NoKernel(_)))
            | RpcError::Tree(TreeError::Image(banger_actors::image::ImageError::NoElf(_)))
            | RpcError::Tree(TreeError::Image(banger_actors::image::ImageError::Format(
                banger_actors::kernel_format::KernelFormatError::Refused { .. },
            ))) => codes::INVALID_ARGUMENT,
            RpcError::Tree(TreeError::Image(banger_actors::image::ImageError::Missing {
                ..
            }))
            | RpcError::Tree(TreeError::NotFound(_)) => codes::NOT_FOUND,
            RpcError::Tree(TreeError::Image(banger_actors::image::ImageError::Read {
                source,
                ..
            })) if source.kind() == std::io::ErrorKind::PermissionDenied => {
                codes::PERMISSION_DENIED
            }
            RpcError::Tree(TreeError::Image(_)) => codes::INTERNAL_ERROR,
            RpcError::Tree(TreeError::Updater(UpdaterError::Busy(_))) => codes::CONFLICT,
            RpcError::Tree(TreeError::Updater(_)) => codes::INTERNAL_ERROR,
            RpcError::Tree(TreeError::Pull(e)) => e.code(),
            RpcError::Tree(TreeError::Store(e)) => e.code(),
            RpcError::NotFound(_) => codes::NOT_FOUND,
            RpcError::Invalid(_) => codes::INVALID_ARGUMENT,
            RpcError::Tree(TreeError::Call(_)) | RpcError::Tree(TreeError::Spawn(_)) => {
                codes::INTERNAL_ERROR
            }
            RpcError::ShuttingDown => codes::SHUTTING_DOWN,
        };
        let mut message = error_chain(&err);
        if disk_full(&message) {
            message.push_str(DISK_FULL_HINT);
        }
        if code == codes::INTERNAL_ERROR || code == codes::STORE {
            tracing::error!(error = %message, "request failed");
        }
        ErrorObjectOwned::owned(code, message, None::<()>)
    }
}

/// Appended to the message of an error caused by a full disk (or quota).
pub const DISK_FULL_HINT: &str = ": the disk is full: free space on the filesystem of banger's data dir (`banger vm prune`, `banger image cache prune`, or delete VMs and images you no longer need), then retry";

/// Whether an error chain says a write found no space: ENOSPC or EDQUOT, from an I/O error
/// of the daemon's own or in a tool's output (mkfs.ext4, cp).
fn disk_full(chain: &str) -> bool {
    ["No space left on device", "Disk quota exceeded"]
        .iter()
        .any(|s| chain.contains(s))
}

pub use banger_error::error_chain;

/// Methods that take no parameters; a call that sends some is refused with
/// `INVALID_PARAMS` (see [`crate::auth::Gate`]). Checked against the module by a test.
pub const NO_PARAMS: &[&str] = &[
    "daemon.ping",
    "daemon.status",
    "daemon.stop",
    "vm.defaults",
    "vm.list",
    "image.list",
    "kernel.list",
    "image.available",
    "image.cache_list",
    "image.cache_prune",
    "image.warm_list",
    "kernel.available",
];

/// All namespaces, merged.
pub fn methods(ctx: Arc<Ctx>) -> Methods {
    let mut module = RpcModule::new(());
    module
        .merge(daemon::into_rpc(Arc::clone(&ctx)))
        .expect("method names are unique across namespaces");
    module
        .merge(vm::into_rpc(Arc::clone(&ctx)))
        .expect("method names are unique across namespaces");
    module
        .merge(image::image_rpc(Arc::clone(&ctx)))
        .expect("method names are unique across namespaces");
    module
        .merge(update::into_rpc(Arc::clone(&ctx)))
        .expect("method names are unique across namespaces");
    module
        .merge(image::kernel_rpc(ctx))
        .expect("method names are unique across namespaces");
    module.into()
}
