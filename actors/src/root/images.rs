//! The tree's image and kernel calls: pulls, builds and promotes through the PullActor, the
//! layer cache, and the store-side rules (register, import, and delete only what no VM
//! uses, each check-and-write one store transaction).

use std::sync::Arc;

use ractor::ActorRef;

use super::Tree;
use super::supervisor::live;
use super::tree::{CALL_MS, TreeError};
use crate::image::{ImageRecord, KernelRecord};
use crate::pull::{PullError, PullMsg};
use crate::store::{Named, Store};
use crate::vm::actor::{VmError, VmMsg};

impl Tree {
    pub(super) fn pulls(&self) -> ActorRef<PullMsg> {
        live(&self.pulls)
    }

    /// Pull an image (catalog or OCI) through the PullActor.
    pub async fn pull_image(
        &self,
        req: banger_api::PullImage,
        events: Option<crate::pull::EventTx>,
    ) -> Result<ImageRecord, TreeError> {
        ractor::call!(self.pulls(), |reply| PullMsg::Image { req, events, reply })
            .map_err(|_| TreeError::Call("pull"))?
            .map_err(TreeError::Pull)
    }

    /// `image promote`: make the running VM `req.vm`'s root filesystem image `req.name`
    /// (through the PullActor, which runs it like a pull: see [`crate::pull::promote`]). An
    /// unknown VM is not found; a VM that is not running is a conflict that says to start
    /// it (only the running guest sees its merged root).
    pub async fn promote_image(
        &self,
        req: banger_api::PromoteImage,
        events: Option<crate::pull::EventTx>,
    ) -> Result<ImageRecord, TreeError> {
        crate::image::validate_name(&req.name)?;
        if let Some(size) = req.size_bytes
            && size < crate::pull::ext4::MIN_SIZE
        {
            return Err(TreeError::Pull(Arc::new(PullError::Size(format!(
                "{size} bytes is below the minimum of {} MiB",
                crate::pull::ext4::MIN_SIZE >> 20
            )))));
        }
        let info = self.ask_vm(&req.vm, VmMsg::Info).await?;
        let socket = match (info.state, info.vsock_socket) {
            (banger_api::VmState::Running, Some(s)) => s,
            (banger_api::VmState::Paused, _) => {
                return Err(TreeError::Vm(VmError::Conflict(format!(
                    "{}: promote reads the running guest's root filesystem",
                    banger_api::paused_refusal(&info.name)
                ))));
            }
            (state, _) => {
                return Err(TreeError::Vm(VmError::Conflict(format!(
                    "vm {vm} is {state}: promote reads the running guest's root filesystem; start it with `banger vm start {vm}`",
                    vm = info.name,
                    state = state.as_str()
                ))));
            }
        };
        let plan = crate::pull::promote::PromotePlan {
            vm: info.name,
            vm_id: info.id,
            socket: socket.into(),
            kernel: info.kernel,
            name: req.name,
            size_bytes: req.size_bytes,
        };
        ractor::call!(self.pulls(), |reply| PullMsg::Promote {
            plan,
            events,
            reply
        })
        .map_err(|_| TreeError::Call("pull"))?
        .map_err(TreeError::Pull)
    }

    /// `image build`: an image and its kernel from a mirror, through the PullActor (see
    /// [`crate::pull::build`]).
    pub async fn build_image(
        &self,
        req: banger_api::BuildImage,
        events: Option<crate::pull::EventTx>,
    ) -> Result<ImageRecord, TreeError> {
        ractor::call!(self.pulls(), |reply| PullMsg::Build { req, events, reply })
            .map_err(|_| TreeError::Call("pull"))?
            .map_err(TreeError::Pull)
    }

    /// Pull a kernel from the kernel catalog through the PullActor.
    pub async fn pull_kernel(
        &self,
        name: String,
        events: Option<crate::pull::EventTx>,
    ) -> Result<KernelRecord, TreeError> {
        ractor::call!(self.pulls(), |reply| PullMsg::Kernel {
            name,
            events,
            reply
        })
        .map_err(|_| TreeError::Call("pull"))?
        .map_err(TreeError::Pull)
    }

    /// Keys of the pulls in flight.
    pub async fn pulls_in_flight(&self) -> Result<Vec<String>, TreeError> {
        ractor::call_t!(self.pulls(), PullMsg::InFlight, CALL_MS)
            .map_err(|_| TreeError::Call("pull"))
    }

    /// The image and kernel catalogs in use.
    pub fn catalogs(&self) -> Arc<crate::pull::catalog::Catalogs> {
        Arc::clone(&self.pull_env.config.catalogs)
    }

    /// Layer blobs in the cache.
    pub async fn blob_cache_list(&self) -> Result<Vec<banger_api::CachedBlob>, TreeError> {
        let env = Arc::clone(&self.pull_env);
        tokio::task::spawn_blocking(move || env.blobs.list())
            .await
            .map_err(|_| TreeError::Call("pull"))?
            .map_err(|e| TreeError::Pull(Arc::new(e)))
    }

    /// Empty the layer cache (blobs being fetched stay).
    pub async fn blob_cache_prune(&self) -> Result<banger_api::CachePruned, TreeError> {
        let env = Arc::clone(&self.pull_env);
        tokio::task::spawn_blocking(move || env.blobs.prune())
            .await
            .map_err(|_| TreeError::Call("pull"))?
            .map_err(|e| TreeError::Pull(Arc::new(e)))
    }

    /// Run blocking store work on the blocking pool.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store, &std::path::Path) -> Result<T, TreeError> + Send + 'static,
    ) -> Result<T, TreeError> {
        let (db, dir) = (Arc::clone(&self.db), self.data_dir.clone());
        tokio::task::spawn_blocking(move || f(&db, &dir))
            .await
            .expect("store work does not panic")
    }

    /// Register a local ext4 file as an image (under a reservation of its name: see
    /// [`crate::store::Reservation`]).
    pub async fn register_image(
        &self,
        name: String,
        rootfs: std::path::PathBuf,
        kernel: Option<String>,
    ) -> Result<ImageRecord, TreeError> {
        let db = Arc::clone(&self.db);
        let guest_dir = self.pull_env.config.guest_binaries_dir.clone();
        self.blocking(move |_, dir| {
            crate::image::validate_name(&name)?;
            let reservation = db.reserve(Named::Image, &name, "being registered")?;
            if let Some(k) = &kernel
                && db.get_kernel(k)?.is_none()
            {
                return Err(crate::not_found::NotFound::kernel(k).into());
            }
            let rec = crate::image::register_image(
                &dir.join("images"),
                &name,
                &rootfs,
                kernel,
                &guest_dir,
            )?;
            reservation.publish_image(&rec)?;
            Ok(rec)
        })
        .await
    }

    pub async fn images(&self) -> Result<Vec<ImageRecord>, TreeError> {
        self.blocking(|db, _| Ok(db.list_images()?)).await
    }

    pub async fn image(&self, name: String) -> Result<Option<ImageRecord>, TreeError> {
        self.blocking(move |db, _| Ok(db.get_image(&name)?)).await
    }

    /// Delete an image no VM uses: the check and the delete are one store transaction, so a
    /// `vm create` naming it either is seen (and the delete refused, naming the VMs) or is
    /// refused itself.
    pub async fn delete_image(&self, name: String) -> Result<Option<ImageRecord>, TreeError> {
        let db = Arc::clone(&self.db);
        self.blocking(move |_, dir| {
            let Some((rec, deleting)) = db.delete_image_unused(&name)? else {
                return Ok(None);
            };
            let _ = std::fs::remove_dir_all(dir.join("images").join(&name));
            drop(deleting);
            // Its warm snapshots can never be restored again.
            super::warm::prune_stale(&db, &crate::vm::warm::base(dir));
            Ok(Some(rec))
        })
        .await
    }

    /// Import a kernel from a directory (under a reservation of its name).
    pub async fn import_kernel(
        &self,
        name: String,
        from: std::path::PathBuf,
    ) -> Result<KernelRecord, TreeError> {
        let db = Arc::clone(&self.db);
        self.blocking(move |_, dir| {
            crate::image::validate_name(&name)?;
            let reservation = db.reserve(Named::Kernel, &name, "being imported")?;
            let rec = crate::image::import_kernel(&dir.join("kernels"), &name, &from)?;
            reservation.publish_kernel(&rec)?;
            Ok(rec)
        })
        .await
    }

    pub async fn kernels(&self) -> Result<Vec<KernelRecord>, TreeError> {
        self.blocking(|db, _| Ok(db.list_kernels()?)).await
    }

    pub async fn kernel(&self, name: String) -> Result<Option<KernelRecord>, TreeError> {
        self.blocking(move |db, _| Ok(db.get_kernel(&name)?)).await
    }

    /// Remove a kernel no VM uses (check and delete in one transaction, as for images).
    pub async fn remove_kernel(&self, name: String) -> Result<Option<KernelRecord>, TreeError> {
        let db = Arc::clone(&self.db);
        self.blocking(move |_, dir| {
            let Some((rec, deleting)) = db.delete_kernel_unused(&name)? else {
                return Ok(None);
            };
            let _ = std::fs::remove_dir_all(dir.join("kernels").join(&name));
            drop(deleting);
            // Its warm snapshots can never be restored again.
            super::warm::prune_stale(&db, &crate::vm::warm::base(dir));
            Ok(Some(rec))
        })
        .await
    }
}
