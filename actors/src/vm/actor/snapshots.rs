//! The VM actor's side of snapshots and rollback (the files and checks are
//! [`crate::vm::snapshot`]'s). Both run their slow work (saves, copies) in tasks that
//! report back, so the mailbox stays free (`vm show` answers while a snapshot is taken),
//! and both keep the VM [`VmActorState::busy`] until they are done: other changes are
//! refused meanwhile, except a kill and a forced delete.

use std::sync::Arc;

use banger_api::{SnapshotInfo, VmInfo, VmState};
use banger_error::error_chain;
use ractor::ActorRef;

use super::{ProgressTx, Reply, VmActor, VmActorState, VmError, VmMsg, tell};
use crate::store::now_secs;
use crate::vm::disks::{self, DiskError};
use crate::vm::fork::{self, ForkSource};
use crate::vm::model::{self, SnapshotRecord};
use crate::vm::snapshot::{self, Current};

/// What a snapshot being taken is for, with its caller: a named snapshot of the VM's, or
/// a fork's (`copies` clones will be made of it; no record keeps it).
#[derive(Debug)]
pub(crate) enum SnapshotFor {
    Named {
        name: Option<String>,
        reply: Reply<SnapshotInfo>,
    },
    Fork {
        copies: u32,
        reply: Reply<ForkSource>,
    },
}

/// The caller of a snapshot under way (see [`SnapshotFor`]).
#[derive(Debug)]
pub(super) enum SnapshotWaiter {
    Named(Reply<SnapshotInfo>),
    Fork(Reply<ForkSource>),
}

impl SnapshotWaiter {
    fn of(what: SnapshotFor) -> SnapshotWaiter {
        match what {
            SnapshotFor::Named { reply, .. } => SnapshotWaiter::Named(reply),
            SnapshotFor::Fork { reply, .. } => SnapshotWaiter::Fork(reply),
        }
    }

    /// Answer the caller with `e`.
    fn refuse(self, e: VmError) {
        match self {
            SnapshotWaiter::Named(r) => drop(r.send(Err(e))),
            SnapshotWaiter::Fork(r) => drop(r.send(Err(e))),
        }
    }
}

/// A rollback under way: the snapshot, its caller (and its progress), and whether it
/// waits for the VMM it ended to be gone.
#[derive(Debug)]
pub(super) struct PendingRollback {
    snap: SnapshotRecord,
    progress: Option<ProgressTx>,
    reply: Reply<VmInfo>,
    pub(super) after_exit: bool,
}

/// What the VM's snapshot must match now: this host's VMM version, and the VM's image
/// and kernel as `<name>@<registered_at>` (`gone` when the record is). Owns what it reads,
/// so a task can run it.
fn current(
    state: &VmActorState,
) -> impl std::future::Future<Output = Result<Current, VmError>> + Send + 'static {
    let (driver, store, image, kernel) = (
        state.driver(),
        Arc::clone(&state.env.store),
        state.rec.image.clone(),
        state.rec.kernel.clone(),
    );
    async move {
        let vmm_version = driver.version().await.map_err(|e| {
            VmError::Conflict(format!(
                "cannot tell the VMM's version: {}",
                error_chain(&e)
            ))
        })?;
        tokio::task::spawn_blocking(move || -> Result<Current, VmError> {
            let (image_at, kernel_at) = snapshot::stamps(&store, &image, &kernel)?;
            Ok(Current {
                vmm_version,
                image: image_at.unwrap_or_else(|| format!("{image}@gone")),
                kernel: kernel_at.unwrap_or_else(|| format!("{kernel}@gone")),
            })
        })
        .await
        .expect("store reads do not panic")
    }
}

/// The VM's snapshot `which` (a name or an id), or the error that says it has none.
fn find(state: &VmActorState, which: &str) -> Result<SnapshotRecord, VmError> {
    snapshot::find(&state.rec, which)
        .cloned()
        .ok_or_else(|| VmError::NoSnapshot {
            vm: state.rec.name.clone(),
            name: which.to_owned(),
            elsewhere: None,
        })
}

fn disk_error(path: std::path::PathBuf) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Disk(DiskError::Io { path, source })
}

impl VmActor {
    /// Check a snapshot can be taken (running or paused, nothing else under way, a free
    /// name, room for it), then take it in a task that reports [`VmMsg::Snapshotted`].
    pub(super) fn begin_snapshot(
        myself: &ActorRef<VmMsg>,
        state: &mut VmActorState,
        what: SnapshotFor,
        progress: Option<ProgressTx>,
    ) {
        let (name, copies) = match &what {
            SnapshotFor::Named { name, .. } => (name.clone(), None),
            SnapshotFor::Fork { copies, .. } => (None, Some(*copies)),
        };
        let checked = (|| {
            let vm = &state.rec.name;
            if let Some(why) = state.busy() {
                return Err(VmError::Conflict(why));
            }
            if state.suspend_waiter.is_some() {
                return Err(VmError::Conflict(format!("vm {vm} is being suspended")));
            }
            let rt = match (state.rec.state, state.rec.runtime.clone()) {
                (VmState::Running | VmState::Paused, Some(rt)) => rt,
                (s, _) if copies.is_some() => {
                    return Err(VmError::Conflict(format!(
                        "vm {vm} is {}: only a running or paused vm can be forked (its clones run on from its memory); start it with `banger vm start {vm}`",
                        s.as_str()
                    )));
                }
                (s, _) => {
                    return Err(VmError::Conflict(format!(
                        "vm {vm} is {}: only a running or paused vm can be snapshotted (its memory is part of the snapshot); start it with `banger vm start {vm}`",
                        s.as_str()
                    )));
                }
            };
            let name = match name {
                None if copies.is_some() => "fork".to_owned(),
                Some(n) => {
                    snapshot::validate_name(&n).map_err(VmError::Invalid)?;
                    if state.rec.snapshots.iter().any(|s| s.name == n) {
                        return Err(VmError::Conflict(format!(
                            "vm {vm} has a snapshot named {n} already; pick another name, or remove it with `banger vm snapshot rm {vm} {n}`"
                        )));
                    }
                    n
                }
                None => snapshot::generated_name(&state.rec.snapshots),
            };
            let need = match copies {
                Some(n) => fork::space_needed(&state.rec, &state.dir, n),
                None => snapshot::space_needed(&state.rec, &state.dir),
            };
            let free =
                disks::free_bytes(&state.dir.dir).map_err(disk_error(state.dir.dir.clone()))?;
            if free < need
                && let Some(n) = copies
            {
                return Err(VmError::Conflict(format!(
                    "not enough disk space to fork vm {vm} {n} times: each clone is a copy of its memory and the data on its disks, up to {} MiB in all, and {} has {} MiB free",
                    need >> 20,
                    state.dir.dir.display(),
                    free >> 20
                )));
            }
            if free < need {
                return Err(VmError::Conflict(format!(
                    "not enough disk space to snapshot vm {vm}: it needs up to {} MiB (its memory and the data on its disks), {} has {} MiB free; remove old snapshots with `banger vm snapshot rm`",
                    need >> 20,
                    state.dir.dir.display(),
                    free >> 20
                )));
            }
            Ok((rt, name))
        })();
        let waiter = SnapshotWaiter::of(what);
        let (rt, name) = match checked {
            Ok(v) => v,
            Err(e) => {
                waiter.refuse(e);
                return;
            }
        };
        state.snapshotting = Some(waiter);
        let id = model::new_id();
        let paused = state.rec.state == VmState::Paused;
        let (driver, dir, me, generation) = (
            state.driver(),
            state.dir.clone(),
            myself.clone(),
            state.generation,
        );
        let (vm, vmm, spec) = (state.rec.name.clone(), state.rec.vmm, state.rec.spec);
        let data = disks::allocated(&state.dir.overlay()) + disks::allocated(&state.dir.work());
        tracing::info!(vm = %vm, snapshot = %name, "taking a snapshot");
        // What it must match later, read before anything is stopped.
        let current = current(state);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = async {
                let now = current.await?;
                let (d, i) = (dir.clone(), id.clone());
                let state_dir = tokio::task::spawn_blocking(move || snapshot::begin(&d, &i))
                    .await
                    .expect("mkdir does not panic")
                    .map_err(disk_error(dir.snapshots()))?;
                tell(
                    &progress,
                    "save",
                    format!("memory ({} MiB) and device state", spec.memory_mib),
                );
                // Leaves the vCPUs stopped, whether it worked or not.
                let saved = driver
                    .save_state(&rt, &dir.run_dir(), &state_dir, true)
                    .await
                    .map_err(|source| VmError::Save {
                        vm: vm.clone(),
                        source,
                    });
                let files = match saved {
                    Ok(()) => {
                        tell(
                            &progress,
                            "copy",
                            format!("the disks ({} MiB of data)", data.div_ceil(1 << 20)),
                        );
                        let (d, i) = (dir.clone(), id.clone());
                        let files = tokio::task::spawn_blocking(move || snapshot::finish(&d, &i))
                            .await
                            .expect("a copy does not panic")
                            .map_err(disk_error(dir.snapshots()));
                        super::die_at("mid-snapshot");
                        files
                    }
                    Err(e) => Err(e),
                };
                let frozen = started.elapsed();
                if !paused {
                    tell(&progress, "resume", "the vm runs on");
                }
                if !paused && let Err(e) = driver.resume(&rt).await {
                    tracing::warn!(vm = %vm, error = %error_chain(&e), "cannot resume the vm after its snapshot");
                }
                let files = files?;
                tracing::info!(vm = %vm, ?frozen, "snapshot taken");
                Ok(SnapshotRecord {
                    id: id.clone(),
                    name,
                    created_at: now_secs(),
                    vmm,
                    vmm_version: now.vmm_version,
                    image: now.image,
                    kernel: now.kernel,
                    spec,
                    files,
                })
            }
            .await;
            if result.is_err() {
                let d = dir.clone();
                let _ = tokio::task::spawn_blocking(move || snapshot::abandon(&d, &id)).await;
            }
            let _ = me.cast(VmMsg::Snapshotted { generation, result });
        });
    }

    /// A snapshot's task is done: record it (or say why not).
    pub(super) async fn on_snapshotted(
        state: &mut VmActorState,
        generation: u64,
        result: Result<SnapshotRecord, VmError>,
    ) {
        let Some(waiter) = state.snapshotting.take() else {
            return;
        };
        let vm = state.rec.name.clone();
        let reply = match waiter {
            SnapshotWaiter::Named(reply) => reply,
            SnapshotWaiter::Fork(reply) => {
                let result = match result {
                    Ok(s) if generation != state.generation => {
                        let (d, id) = (state.dir.clone(), s.id);
                        let _ =
                            tokio::task::spawn_blocking(move || snapshot::remove(&d, &id)).await;
                        Err(VmError::Conflict(format!(
                            "vm {vm} stopped while it was being snapshotted for its fork; nothing was made"
                        )))
                    }
                    // Kept in no record: the fork removes it once its clones have their
                    // copies (a daemon's death leaves it to the next re-adoption's sweep).
                    Ok(snap) => Ok(ForkSource {
                        source: state.rec.clone(),
                        dir: state.dir.snapshot(&snap.id),
                        snap,
                    }),
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
                return;
            }
        };
        let result = match result {
            // The VM's VMM ended while it was taken: a snapshot of a guest that is gone
            // (its disks may have moved on since) is not kept.
            Ok(s) if generation != state.generation => {
                let (d, id) = (state.dir.clone(), s.id);
                let _ = tokio::task::spawn_blocking(move || snapshot::remove(&d, &id)).await;
                Err(VmError::Conflict(format!(
                    "vm {vm} stopped while it was being snapshotted; nothing was kept"
                )))
            }
            Ok(s) => {
                state.rec.snapshots.push(s.clone());
                match state.persist().await {
                    Ok(()) => Ok(snapshot::info(&state.rec, &state.dir, &s)),
                    Err(e) => {
                        state.rec.snapshots.pop();
                        let (d, id) = (state.dir.clone(), s.id);
                        let _ =
                            tokio::task::spawn_blocking(move || snapshot::remove(&d, &id)).await;
                        Err(e)
                    }
                }
            }
            Err(e) => {
                tracing::warn!(vm = %vm, error = %error_chain(&e), "snapshot failed; the vm runs on as it was");
                Err(e)
            }
        };
        let _ = reply.send(result);
    }

    /// `vm create --from-snapshot`: snapshot `which` of this VM as a new VM's source,
    /// checked in a task as a rollback checks it (its files whole, this host's VMM
    /// release, the image and kernel as they were; the size and VMM are the snapshot's,
    /// whatever this VM's are now). It may be taken while the VM does anything else: it
    /// is only read.
    pub(super) fn snapshot_source(state: &VmActorState, which: &str, reply: Reply<ForkSource>) {
        let vm = state.rec.name.clone();
        let snap = match find(state, which) {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let (rec, dir) = (state.rec.clone(), state.dir.clone());
        let now = current(state);
        tokio::spawn(async move {
            let result = async {
                let now = now.await?;
                let mut as_taken = rec.clone();
                (as_taken.vmm, as_taken.spec) = (snap.vmm, snap.spec);
                let (d, s) = (dir.clone(), snap.clone());
                let why = tokio::task::spawn_blocking(move || {
                    snapshot::mismatch(&as_taken, &d, &s, &now)
                })
                .await
                .expect("checks do not panic");
                match why {
                    None => Ok(ForkSource {
                        source: rec,
                        dir: dir.snapshot(&snap.id),
                        snap,
                    }),
                    Some(why) => Err(VmError::Conflict(format!(
                        "cannot make a vm from snapshot {} of vm {vm}: {why}",
                        snap.name
                    ))),
                }
            }
            .await;
            let _ = reply.send(result);
        });
    }

    pub(super) async fn remove_snapshot(
        state: &mut VmActorState,
        which: &str,
    ) -> Result<SnapshotInfo, VmError> {
        if let Some(why) = state.busy() {
            return Err(VmError::Conflict(why));
        }
        let s = find(state, which)?;
        let info = snapshot::info(&state.rec, &state.dir, &s);
        // The record first: a directory left by a removal that failed is swept at the
        // next re-adoption; a record without its files would be a snapshot that is not.
        let before = state.rec.snapshots.clone();
        state.rec.snapshots.retain(|x| x.id != s.id);
        if let Err(e) = state.persist().await {
            state.rec.snapshots = before;
            return Err(e);
        }
        let (d, id) = (state.dir.clone(), s.id.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || snapshot::remove(&d, &id))
            .await
            .expect("remove does not panic")
        {
            tracing::warn!(vm = %state.rec.name, snapshot = %s.name, error = %e, "removing the snapshot's files");
        }
        tracing::info!(vm = %state.rec.name, snapshot = %s.name, "snapshot removed");
        Ok(info)
    }

    /// Start a rollback: the snapshot must be the VM's and restorable (checked in a task
    /// that reports [`VmMsg::RollbackChecked`]; nothing is changed before).
    pub(super) fn begin_rollback(
        myself: &ActorRef<VmMsg>,
        state: &mut VmActorState,
        which: &str,
        progress: Option<ProgressTx>,
        reply: Reply<VmInfo>,
    ) {
        let vm = state.rec.name.clone();
        let refused = if let Some(why) = state.busy() {
            Some(VmError::Conflict(why))
        } else if state.suspend_waiter.is_some() {
            Some(VmError::Conflict(format!("vm {vm} is being suspended")))
        } else if matches!(state.rec.state, VmState::Starting | VmState::Stopping) {
            Some(VmError::Conflict(format!(
                "vm {vm} is {}; wait until it is done",
                state.rec.state.as_str()
            )))
        } else {
            None
        };
        if let Some(e) = refused {
            let _ = reply.send(Err(e));
            return;
        }
        let snap = match find(state, which) {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        tracing::info!(vm = %vm, snapshot = %snap.name, "rolling back");
        tell(
            &progress,
            "check",
            format!(
                "snapshot {}: its files, VMM release, image, kernel and spec",
                snap.name
            ),
        );
        let (rec, dir, me, s) = (
            state.rec.clone(),
            state.dir.clone(),
            myself.clone(),
            snap.clone(),
        );
        let now = current(state);
        tokio::spawn(async move {
            let result = async {
                let now = now.await?;
                let name = s.name.clone();
                let why =
                    tokio::task::spawn_blocking(move || snapshot::mismatch(&rec, &dir, &s, &now))
                        .await
                        .expect("checks do not panic");
                match why {
                    None => Ok(()),
                    Some(why) => Err(VmError::Conflict(format!(
                        "cannot roll vm {vm} back to snapshot {name}: {why}; the vm is left as it was"
                    ))),
                }
            }
            .await;
            let _ = me.cast(VmMsg::RollbackChecked { result });
        });
        state.rollback = Some(PendingRollback {
            snap,
            progress,
            reply,
            after_exit: false,
        });
    }

    /// The snapshot checked: end the VMM if it runs (the rollback goes on once it is gone,
    /// from `on_exited`), else put the files in place now.
    pub(super) async fn on_rollback_checked(
        myself: &ActorRef<VmMsg>,
        state: &mut VmActorState,
        result: Result<(), VmError>,
    ) {
        if let Err(e) = result {
            if let Some(p) = state.rollback.take() {
                let _ = p.reply.send(Err(e));
            }
            return;
        }
        if model::is_active(state.rec.state) {
            if let Some(p) = state.rollback.as_mut() {
                p.after_exit = true;
                tell(
                    &p.progress,
                    "stop",
                    "killing the VMM: the guest's changes are undone",
                );
            }
            // Whatever the guest does now is undone: no shutdown, a kill.
            Self::kill_now(state, nix::sys::signal::Signal::SIGKILL).await;
            return;
        }
        Self::rollback_files(myself, state);
    }

    /// The VMM a rollback ended is gone (called by `on_exited`).
    pub(super) fn rollback_after_exit(myself: &ActorRef<VmMsg>, state: &mut VmActorState) {
        if state.delete_after_exit.is_some() {
            // Deleted meanwhile (`vm rm --force`): nothing to roll back.
            if let Some(p) = state.rollback.take() {
                let _ = p.reply.send(Err(VmError::Conflict(format!(
                    "vm {} was deleted while it was being rolled back",
                    state.rec.name
                ))));
            }
            return;
        }
        if let Some(p) = state.rollback.as_mut() {
            p.after_exit = false;
        }
        Self::rollback_files(myself, state);
    }

    /// Copy the snapshot's disks and state into the VM's place, in a task that reports
    /// [`VmMsg::RollbackPrepared`].
    fn rollback_files(myself: &ActorRef<VmMsg>, state: &mut VmActorState) {
        let Some(p) = state.rollback.as_ref() else {
            return;
        };
        let data: u64 = p.snap.files.iter().map(|(_, len)| len).sum();
        tell(
            &p.progress,
            "copy",
            format!(
                "the snapshot's disks and state into place ({} MiB)",
                data.div_ceil(1 << 20)
            ),
        );
        let (dir, id, me) = (state.dir.clone(), p.snap.id.clone(), myself.clone());
        tokio::spawn(async move {
            let d = dir.clone();
            let result = tokio::task::spawn_blocking(move || snapshot::restore_files(&d, &id))
                .await
                .expect("a copy does not panic")
                .map_err(disk_error(dir.dir.clone()));
            let _ = me.cast(VmMsg::RollbackPrepared { result });
        });
    }

    /// The files are in place: the VM is suspended at the snapshot's moment, and is
    /// restored at once (in this same message: nothing else gets in between, so a `vm
    /// stop` cannot discard the state the rollback put there) and the rollback's caller
    /// answered once its guest runs.
    pub(super) async fn on_rollback_prepared(
        myself: &ActorRef<VmMsg>,
        state: &mut VmActorState,
        result: Result<(), VmError>,
    ) -> Result<(), ractor::ActorProcessingErr> {
        let Some(p) = state.rollback.take() else {
            return Ok(());
        };
        let vm = state.rec.name.clone();
        if let Err(e) = result {
            tracing::warn!(vm = %vm, error = %error_chain(&e), "rollback failed before the restore");
            let _ = p.reply.send(Err(VmError::Conflict(format!(
                "vm {vm}: rolling back to snapshot {} failed: {}; the vm is {} with its disks as they were (`banger vm start {vm}`)",
                p.snap.name,
                error_chain(&e),
                state.rec.state.as_str()
            ))));
            return Ok(());
        }
        state.rec.state = VmState::Suspended;
        state.rec.error = None;
        if let Err(e) = state.persist().await {
            let _ = p.reply.send(Err(e));
            return Ok(());
        }
        tracing::info!(vm = %vm, snapshot = %p.snap.name, "rolled back; restoring it");
        Self::begin_start(myself, state, p.progress, p.reply).await
    }

    /// Remove from the VM's `snapshots/` what its record does not name (a snapshot cut
    /// short by a daemon's death): see [`snapshot::sweep`]. True when it removed one: the
    /// VM's vCPUs may then still be stopped by that snapshot's save (see
    /// [`Self::resume_cut_snapshot`]).
    pub(super) async fn sweep_snapshots(state: &VmActorState) -> bool {
        if !state.dir.snapshots().exists() {
            return false;
        }
        let (rec, dir) = (state.rec.clone(), state.dir.clone());
        let removed = tokio::task::spawn_blocking(move || snapshot::sweep(&rec, &dir))
            .await
            .expect("sweep does not panic");
        if !removed.is_empty() {
            tracing::warn!(vm = %state.rec.name, ?removed, "removed snapshot files no snapshot of the vm names (a snapshot cut short)");
        }
        !removed.is_empty()
    }

    /// A re-adopted VM whose snapshot a daemon's death cut short, stored `running` but
    /// found paused: the pause was the snapshot's (a `vm pause` is stored), so it runs
    /// again, as it would have once the snapshot was done.
    pub(super) async fn resume_cut_snapshot(state: &mut VmActorState, stored: VmState) {
        if stored != VmState::Running || state.rec.state != VmState::Paused {
            return;
        }
        let Some(rt) = state.rec.runtime.clone() else {
            return;
        };
        match state.driver().resume(&rt).await {
            Ok(()) => {
                tracing::warn!(vm = %state.rec.name, "resumed the vm a cut-short snapshot left paused");
                state.rec.state = VmState::Running;
            }
            Err(e) => {
                tracing::warn!(vm = %state.rec.name, error = %error_chain(&e), "cannot resume the vm a cut-short snapshot left paused");
            }
        }
    }
}
