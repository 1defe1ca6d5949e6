//! The `image.*` and `kernel.*` namespaces: local registration, catalog and OCI pulls and
//! `image.promote` (subscriptions streaming [`PullEvent`]s), the catalogs and the layer
//! cache.

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

/// A kernel: the kernel file as given (an ELF `vmlinux`, or a bzImage `vmlinuz`), the ELF
/// Firecracker boots, optional initrd, modules and build config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub name: String,
    /// The kernel file as given; QEMU boots it.
    pub kernel: String,
    pub initrd: Option<String>,
    /// Directory of modules (`lib/modules/<version>`), if the kernel needs them.
    pub modules: Option<String>,
    pub registered_at: u64,
    /// What `kernel` is: `ELF vmlinux`, or `bzImage (<compression> payload)`; None for a
    /// kernel recorded before banger checked formats.
    #[serde(default)]
    pub format: Option<String>,
    /// The uncompressed ELF `vmlinux` Firecracker boots (`kernel` itself when that is an
    /// ELF, else converted from the bzImage at import). None: Firecracker cannot boot it.
    #[serde(default)]
    pub vmlinux: Option<String>,
    /// The kernel's build config (`config` in the import directory), if given.
    #[serde(default)]
    pub config: Option<String>,
    /// Which VMMs the kernel suits and why, one entry per VMM.
    #[serde(default)]
    pub fits: Vec<KernelFit>,
}

/// Whether a kernel suits one VMM, from its format and its build config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFit {
    pub vmm: crate::VmmKind,
    /// Some(true): it has what the VMM and banger's guest need; Some(false): it lacks
    /// something (see `reasons`); None: unknown (no config was given).
    pub fits: Option<bool>,
    /// What it has when it fits; what it lacks when it does not.
    pub reasons: Vec<String>,
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
/// `vmlinuz`, and optionally `initrd`, `modules/` and `config` (the kernel's build config).
/// A bzImage is kept and converted to an ELF for Firecracker; anything else is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportKernel {
    pub name: String,
    pub from: String,
}

/// Request of `image.pull`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    /// A catalog name (`banger image list --available`) or an OCI reference
    /// (`debian:bookworm`, `ghcr.io/org/img@sha256:…`, `127.0.0.1:5000/x:y`).
    pub source: String,
    /// The image's name in banger (default: the catalog name, or the reference's last path
    /// component and tag, e.g. `debian-bookworm`).
    #[serde(default)]
    pub name: Option<String>,
    /// The kernel VMs of this image boot by default (default: the catalog's `kernel_ref`;
    /// none for an OCI image).
    #[serde(default)]
    pub kernel_ref: Option<String>,
    /// Size of the built ext4 for an OCI pull or a recipe build (default: the content plus
    /// headroom).
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// Build a catalog image from its recipe even when it has a bundle.
    #[serde(default)]
    pub build: bool,
}

/// Request of `image.build`: an image (and its kernel) built locally from a Debian-family
/// mirror with mmdebstrap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildImage {
    /// The image's name.
    pub name: String,
    /// The distribution's suite (default `bookworm`).
    #[serde(default)]
    pub suite: Option<String>,
    /// The mirror (default: `[images] mirror`, else the host's own apt sources when the
    /// host is Debian, else `http://deb.debian.org/debian`).
    #[serde(default)]
    pub mirror: Option<String>,
    /// Packages installed on top of what banger's guest side needs.
    #[serde(default)]
    pub include: Vec<String>,
    /// Size of the built ext4 (default: the content plus headroom).
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// The kernel package installed into the tree (default `linux-image-cloud-amd64`).
    #[serde(default)]
    pub kernel_package: Option<String>,
    /// The name of the kernel record made from it (default: the image's name).
    #[serde(default)]
    pub kernel: Option<String>,
}

/// Request of `image.promote`: make a running VM's root filesystem a new image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteImage {
    /// The VM (running: its guest agent packs its root).
    pub vm: String,
    /// The new image's name.
    pub name: String,
    /// Size of the built ext4 (default: the content plus headroom).
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

/// Request of `kernel.pull`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullKernel {
    /// A kernel catalog name (`banger kernel list --available`).
    pub name: String,
}

/// An item of the `image.pull` and `kernel.pull` subscriptions. The stream always ends with
/// `image`, `kernel` or `failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum PullEvent {
    /// A stage began (`resolve`, `download`, `unpack`, `mkfs`, `publish`, …).
    Stage {
        stage: String,
        detail: Option<String>,
    },
    /// Bytes downloaded so far (of `total` when known), across the whole pull.
    Bytes {
        done: u64,
        total: Option<u64>,
    },
    /// Done: the image now in the store.
    Image {
        image: ImageInfo,
    },
    /// Done: the kernel now in the store.
    Kernel {
        kernel: KernelInfo,
    },
    Failed {
        code: i32,
        message: String,
    },
}

/// An entry of an embedded (or configured) catalog: a published `bundle`, a `recipe` to
/// build it from (images only), or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub name: String,
    /// `x86_64`.
    pub arch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<Bundle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<Recipe>,
    /// For images with a bundle: the kernel catalog entry VMs of this image boot (an image
    /// built from its recipe boots the kernel the recipe installed).
    #[serde(default)]
    pub kernel_ref: Option<String>,
    pub description: String,
}

/// A published `.tar.zst` bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Where the bundle is downloaded from.
    pub url: String,
    /// The bundle's sha256 (hex).
    pub sha256: String,
    /// The bundle's size in bytes (compressed, as downloaded).
    pub size: u64,
}

/// How to build an image locally (`banger image build` with these arguments).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The distribution's suite, e.g. `bookworm`.
    pub suite: String,
    /// Packages installed on top of what banger's guest side needs.
    pub packages: Vec<String>,
    /// The kernel package (default `linux-image-cloud-amd64`).
    #[serde(default)]
    pub kernel_package: Option<String>,
}

/// A layer blob in the digest-addressed cache (`image cache list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedBlob {
    /// `sha256:…`.
    pub digest: String,
    pub size_bytes: u64,
    /// Last time a pull used it (seconds since the epoch).
    pub used_at: u64,
}

/// Answer of `image.cache_prune`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePruned {
    pub removed: Vec<String>,
    pub freed_bytes: u64,
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

        /// Pull a catalog image or an OCI image, streaming progress; ends with `image` or
        /// `failed`. Concurrent pulls of the same source share one download.
        #[subscription(name = "pull" => "pull.progress", unsubscribe = "pull.unsubscribe", item = PullEvent)]
        async fn pull(&self, req: PullImage) -> jsonrpsee::core::SubscriptionResult;

        /// Build an image and its kernel from a Debian-family mirror (mmdebstrap), streaming
        /// progress like a pull; ends with `image` or `failed`. Concurrent builds of one
        /// name share the work.
        #[subscription(name = "build" => "build.progress", unsubscribe = "build.unsubscribe", item = PullEvent)]
        async fn build(&self, req: BuildImage) -> jsonrpsee::core::SubscriptionResult;

        /// Make a running VM's root filesystem a new image (its kernel: the VM's), streaming
        /// progress like a pull; ends with `image` or `failed`.
        #[subscription(name = "promote" => "promote.progress", unsubscribe = "promote.unsubscribe", item = PullEvent)]
        async fn promote(&self, req: PromoteImage) -> jsonrpsee::core::SubscriptionResult;

        /// The image catalog.
        #[method(name = "available")]
        async fn available(&self) -> jsonrpsee::core::RpcResult<Vec<CatalogEntry>>;

        /// Layer blobs in the cache.
        #[method(name = "cache_list")]
        async fn cache_list(&self) -> jsonrpsee::core::RpcResult<Vec<CachedBlob>>;

        /// Remove cached layer blobs (all of them; pulls in flight keep theirs).
        #[method(name = "cache_prune")]
        async fn cache_prune(&self) -> jsonrpsee::core::RpcResult<CachePruned>;

        /// Make (or remake) the warm snapshot of an image for a size and VMM: it boots once
        /// and is saved. Streams a VM's progress; ends with `warmed` or `failed`.
        #[subscription(name = "warm" => "warm.progress", unsubscribe = "warm.unsubscribe", item = crate::Progress)]
        async fn warm(&self, req: crate::WarmImage) -> jsonrpsee::core::SubscriptionResult;

        /// The warm snapshots (stale ones, whose image or kernel went or changed, are
        /// removed first).
        #[method(name = "warm_list")]
        async fn warm_list(&self) -> jsonrpsee::core::RpcResult<Vec<crate::WarmInfo>>;

        /// Remove warm snapshots: one by id, or every one of an image (by name); answers
        /// what went.
        #[method(name = "warm_rm")]
        async fn warm_rm(&self, which: String) -> jsonrpsee::core::RpcResult<Vec<crate::WarmInfo>>;
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

        /// Pull a kernel from the kernel catalog, streaming progress; ends with `kernel` or
        /// `failed`.
        #[subscription(name = "pull" => "pull.progress", unsubscribe = "pull.unsubscribe", item = PullEvent)]
        async fn pull(&self, req: PullKernel) -> jsonrpsee::core::SubscriptionResult;

        /// The kernel catalog.
        #[method(name = "available")]
        async fn available(&self) -> jsonrpsee::core::RpcResult<Vec<CatalogEntry>>;
    }
}

#[cfg(feature = "client")]
pub use rpc::{ImageRpcClient, KernelRpcClient};
#[cfg(feature = "server")]
pub use rpc::{ImageRpcServer, KernelRpcServer};
