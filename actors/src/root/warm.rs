//! The tree's warm-snapshot calls (`image warm`, `image warm list|rm`, and the automatic
//! one after a first cold boot): see [`crate::vm::warm`] for what a warm snapshot is and
//! how a create restores from one.

use std::sync::Arc;

use banger_api::{CreateVm, VmInfo, WarmImage, WarmInfo};
use banger_error::error_chain;

use super::{Tree, TreeError};
use crate::store::{Store, now_secs};
use crate::vm::actor::{ProgressTx, VmError, VmMsg};
use crate::vm::warm::{self, WarmRecord};
use crate::vm_supervisor::VmSupervisorMsg;

/// Remove the warm snapshots whose image or kernel is gone or was replaced (see
/// [`warm::stale`]); answers what went. Blocking; errors are logged (a warm snapshot is
/// only ever an optimisation).
pub(super) fn prune_stale(db: &Store, base: &std::path::Path) -> Vec<WarmRecord> {
    let run = || -> Result<Vec<WarmRecord>, crate::store::StoreError> {
        let mut gone = Vec::new();
        for w in db.list_warm()? {
            let (image, kernel) = crate::vm::snapshot::stamps(db, w.image_name(), w.kernel_name())?;
            if let Some(why) = warm::stale(&w, image.as_deref(), kernel.as_deref()) {
                tracing::info!(warm = %w.id, "removing a stale warm snapshot: {why}");
                warm::remove(db, base, &w.id)?;
                gone.push(w);
            }
        }
        Ok(gone)
    };
    run().unwrap_or_else(|e| {
        tracing::warn!(error = %error_chain(&e), "pruning stale warm snapshots");
        Vec::new()
    })
}

impl Tree {
    fn warm_base(&self) -> std::path::PathBuf {
        warm::base(&self.data_dir)
    }

    /// `image warm`: boot the image once in a maker VM (its tap off the bridge, named
    /// `warm-<hex>`), save it once its agent answers, keep the save as the warm snapshot
    /// of its image, kernel, size, VMM and network (replacing an older one of the same),
    /// and delete the maker. Nothing of a failed one is left.
    pub async fn warm_image(
        &self,
        req: WarmImage,
        progress: Option<ProgressTx>,
    ) -> Result<WarmInfo, TreeError> {
        let id = crate::vm::model::new_id();
        let maker = format!("warm-{}", &id[..8]);
        let create = CreateVm {
            name: Some(maker.clone()),
            image: req.image,
            kernel: req.kernel,
            vcpu: req.vcpu,
            memory_mib: req.memory_mib,
            disk_bytes: req.disk_bytes,
            vmm: req.vmm,
            network: req.network,
            cold: true,
            ..Default::default()
        };
        crate::vm::spec::validate_given(create.vcpu, create.memory_mib, create.disk_bytes)
            .map_err(VmError::Invalid)?;
        self.auto_pull(&create, progress.as_ref()).await?;
        let made = ractor::call!(self.vms(), |reply| VmSupervisorMsg::Create {
            req: create,
            progress: progress.clone(),
            maker: true,
            reply
        })
        .map_err(|_| TreeError::Call("vm-supervisor"));
        let result = match made {
            Ok(Ok(vm)) => self.save_warm(&id, &vm, progress).await,
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(e),
        };
        // The maker goes, whatever happened (a create that failed may have left it).
        let _ = self
            .ask_vm(&maker, |reply| VmMsg::Delete { force: true, reply })
            .await;
        result
    }

    /// Save maker `vm` as warm snapshot `id` (see [`Tree::warm_image`]).
    async fn save_warm(
        &self,
        id: &str,
        vm: &VmInfo,
        progress: Option<ProgressTx>,
    ) -> Result<WarmInfo, TreeError> {
        if let Some(e) = &vm.error {
            return Err(VmError::Conflict(format!(
                "the image booted but its agent did not answer ({e}); a warm snapshot needs it"
            ))
            .into());
        }
        let from = self
            .ask_vm(&vm.name, |reply| VmMsg::ForkSnapshot {
                copies: 1,
                progress,
                reply,
            })
            .await?;
        let (db, base, id) = (Arc::clone(&self.db), self.warm_base(), id.to_owned());
        let prefix = self.subnet_prefix;
        self.blocking(move |_, _| {
            let dir = warm::dir(&base, &id);
            // Its files are the fork snapshot's, which the record of it lists already.
            let moved = std::fs::create_dir_all(&base).and_then(|()| std::fs::rename(&from.dir, &dir));
            match moved {
                Ok(()) => {}
                Err(source) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    let _ = std::fs::remove_dir_all(&from.dir);
                    return Err(VmError::Disk(crate::vm::disks::DiskError::Io {
                        path: dir,
                        source,
                    })
                    .into());
                }
            }
            let rec = WarmRecord {
                id: id.clone(),
                image: from.snap.image.clone(),
                kernel: from.snap.kernel.clone(),
                vmm: from.snap.vmm,
                vmm_version: from.snap.vmm_version.clone(),
                spec: from.snap.spec,
                network: from.source.ip.is_some(),
                address: from.source.ip.as_ref().map(|ip| format!("{ip}/{prefix}")),
                banger: warm::banger_version(),
                created_at: now_secs(),
                files: from.snap.files.clone(),
            };
            if let Err(e) = db.put_warm(&rec) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
            // One warm snapshot per key: the older ones of it go.
            for old in db.list_warm()? {
                if old.id != rec.id && old.key() == rec.key() {
                    warm::remove(&db, &base, &old.id)?;
                }
            }
            tracing::info!(warm = %rec.id, image = %rec.image, vmm = rec.vmm.as_str(), "warm snapshot made");
            Ok(rec.info(&base))
        })
        .await
    }

    /// `image warm list`: the warm snapshots, stale ones removed first.
    pub async fn warm_list(&self) -> Result<Vec<WarmInfo>, TreeError> {
        let base = self.warm_base();
        self.blocking(move |db, _| {
            prune_stale(db, &base);
            Ok(db.list_warm()?.iter().map(|w| w.info(&base)).collect())
        })
        .await
    }

    /// `image warm rm <id|image>`: one warm snapshot by id, or every one of an image.
    pub async fn warm_rm(&self, which: String) -> Result<Vec<WarmInfo>, TreeError> {
        let base = self.warm_base();
        self.blocking(move |db, _| {
            let all = db.list_warm()?;
            let chosen: Vec<&WarmRecord> = all
                .iter()
                .filter(|w| w.id == which || w.image_name() == which)
                .collect();
            if chosen.is_empty() {
                return Err(crate::not_found::NotFound::warm(which).into());
            }
            let mut gone = Vec::new();
            for w in chosen {
                let info = w.info(&base);
                warm::remove(db, &base, &w.id)?;
                gone.push(info);
            }
            Ok(gone)
        })
        .await
    }

    /// After a create that booted (`auto_warm`): make the warm snapshot of its key in the
    /// background, unless one exists or is being made. Failures are logged.
    pub(super) fn warm_later(&self, vm: &VmInfo) {
        let key = format!(
            "{}|{}|{}|{:?}|{}",
            vm.image,
            vm.kernel,
            vm.vmm.as_str(),
            vm.spec,
            vm.ip.is_some()
        );
        if !self
            .warming
            .lock()
            .expect("warming lock")
            .insert(key.clone())
        {
            return;
        }
        let (tree, vm) = (self.clone(), vm.clone());
        tokio::spawn(async move {
            let (image, kernel, spec, network) = (vm.image, vm.kernel, vm.spec, vm.ip.is_some());
            let (i, k) = (image.clone(), kernel.clone());
            let base = tree.warm_base();
            let exists = tree
                .blocking(move |db, _| {
                    let key = warm::key_now(db, &i, &k, vm.vmm, spec, network)?;
                    Ok(db
                        .list_warm()?
                        .iter()
                        .any(|w| Some(w.key()) == key && warm::damaged(&base, w).is_none()))
                })
                .await
                .unwrap_or(true);
            if !exists {
                let req = WarmImage {
                    image: Some(image.clone()),
                    kernel: Some(kernel),
                    vcpu: Some(spec.vcpu),
                    memory_mib: Some(spec.memory_mib),
                    disk_bytes: Some(spec.disk_bytes),
                    vmm: Some(vm.vmm.into()),
                    network: Some(network),
                };
                match tree.warm_image(req, None).await {
                    Ok(w) => {
                        tracing::info!(warm = %w.id, %image, "auto_warm: warm snapshot made")
                    }
                    Err(e) => {
                        tracing::warn!(%image, error = %error_chain(&e), "auto_warm: no warm snapshot")
                    }
                }
            }
            tree.warming.lock().expect("warming lock").remove(&key);
        });
    }
}
