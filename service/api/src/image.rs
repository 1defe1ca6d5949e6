//! The `image.*` and `kernel.*` namespaces (registration of local files for now; catalog and
//! OCI pulls come with the images issue).

use serde::{Deserialize, Serialize};

/// An image: a read-only ext4 root filesystem shared by every VM made from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    /// The image's `rootfs.ext4`, inside banger's data directory.
    pub rootfs: String,
    pub size_bytes: u64,
    /// The kernel VMs of this image boot by default.
    pub kernel: Option<String>,
    pub registered_at: u64,
}

/// A kernel: `vmlinux` (or a bzImage for QEMU), optional initrd and modules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub name: String,
    pub kernel: String,
    pub initrd: Option<String>,
    /// Directory of modules (`lib/modules/<version>`), if the kernel needs them.
    pub modules: Option<String>,
    pub registered_at: u64,
}

/// Request of `image.register`: take a local ext4 file as an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterImage {
    pub name: String,
    /// Path of an ext4 file on the daemon's host; it is copied (reflinked when possible).
    pub rootfs: String,
    #[serde(default)]
    pub kernel: Option<String>,
}

/// Request of `kernel.import`: take a kernel from a directory holding `vmlinux` or
/// `vmlinuz`, and optionally `initrd` and `modules/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportKernel {
    pub name: String,
    pub from: String,
}

#[cfg(any(feature = "server", feature = "client"))]
mod rpc {
    use super::*;

    #[cfg_attr(
        all(feature = "server", feature = "client"),
        jsonrpsee::proc_macros::rpc(
            server,
            client,
            namespace = "image",
            namespace_separator = "."
        )
    )]
    #[cfg_attr(
        all(feature = "server", not(feature = "client")),
        jsonrpsee::proc_macros::rpc(server, namespace = "image", namespace_separator = ".")
    )]
    #[cfg_attr(
        all(feature = "client", not(feature = "server")),
        jsonrpsee::proc_macros::rpc(client, namespace = "image", namespace_separator = ".")
    )]
    pub trait ImageRpc {
        #[method(name = "register")]
        async fn register(&self, req: RegisterImage) -> jsonrpsee::core::RpcResult<ImageInfo>;
        #[method(name = "list")]
        async fn list(&self) -> jsonrpsee::core::RpcResult<Vec<ImageInfo>>;
        #[method(name = "show")]
        async fn show(&self, name: String) -> jsonrpsee::core::RpcResult<ImageInfo>;
        #[method(name = "delete")]
        async fn delete(&self, name: String) -> jsonrpsee::core::RpcResult<ImageInfo>;
    }

    #[cfg_attr(
        all(feature = "server", feature = "client"),
        jsonrpsee::proc_macros::rpc(
            server,
            client,
            namespace = "kernel",
            namespace_separator = "."
        )
    )]
    #[cfg_attr(
        all(feature = "server", not(feature = "client")),
        jsonrpsee::proc_macros::rpc(server, namespace = "kernel", namespace_separator = ".")
    )]
    #[cfg_attr(
        all(feature = "client", not(feature = "server")),
        jsonrpsee::proc_macros::rpc(client, namespace = "kernel", namespace_separator = ".")
    )]
    pub trait KernelRpc {
        #[method(name = "import")]
        async fn import(&self, req: ImportKernel) -> jsonrpsee::core::RpcResult<KernelInfo>;
        #[method(name = "list")]
        async fn list(&self) -> jsonrpsee::core::RpcResult<Vec<KernelInfo>>;
        #[method(name = "show")]
        async fn show(&self, name: String) -> jsonrpsee::core::RpcResult<KernelInfo>;
        #[method(name = "rm")]
        async fn rm(&self, name: String) -> jsonrpsee::core::RpcResult<KernelInfo>;
    }
}

#[cfg(feature = "client")]
pub use rpc::{ImageRpcClient, KernelRpcClient};
#[cfg(feature = "server")]
pub use rpc::{ImageRpcServer, KernelRpcServer};
