//! PullActor: every image and kernel pull goes through it, and so does `image promote`
//! (a running VM's root made into an image, [`promote`]): the same staging, coalescing
//! and progress events.
//!
//! A pull is keyed by what it makes: `image:<source>-><name>` for an image (the source is
//! the catalog name, or the OCI reference written out in full, e.g.
//! `docker.io/library/debian:bookworm`), `kernel:<name>` for a kernel. Concurrent requests
//! with the same key share one pull: the first starts a task, later ones join it, and every
//! one of them gets its progress events and its result. Below that, OCI layer blobs are
//! fetched once per digest however many pulls want them (see [`oci`]), so two references
//! that resolve to the same image also share their downloads.
//!
//! Different keys for one name (two sources into one image name, a pull and a build or a
//! promote of one name, two builds making one kernel) are different images, so they are
//! never merged: the first to start reserves the name in the store
//! ([`crate::store::Store::reserve`], in the same transaction that checks no record has
//! it), the second is refused with a conflict that names what holds it (`image x is being
//! pulled from debian:bookworm right now; wait for that to finish, or choose another
//! name`). Nothing is written under `images/<name>/` or `kernels/<name>/` without that
//! reservation, and the record is published with it; a failed pull drops it.
//!
//! The actor itself only keeps the table of pulls in flight; downloading, hashing,
//! unpacking and mkfs run in a task (blocking parts on tokio's blocking pool), which
//! reports back with [`PullMsg::Done`]. A pull that fails leaves nothing behind: its staging
//! directory (next to the destination, `.staging-*`) and partial blobs are removed, and
//! leftovers of a crash are removed when the actor starts.
//!
//! Restart policy: the root restarts a failed PullActor; pulls that were in flight are lost
//! (their callers get "the pull actor did not answer") and their staging directories are
//! swept on start.

pub mod advice;
pub mod build;
pub mod bundle;
pub mod catalog;
pub mod ext4;
pub mod guest;
pub mod layers;
pub mod make;
pub mod oci;
pub mod promote;

mod env;
mod error;
mod from_catalog;
mod plan;
mod progress;
mod staging;

pub use env::{PullConfig, PullEnv, blocking, install_crypto_provider};
pub use error::{PullError, PullResult};
pub use plan::{ImagePlan, ImageSource, plan_image};
pub use progress::{EventTx, Reporter, Ticker};
pub use staging::{STAGING_PREFIX, Staging, reserve, sweep};

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use banger_api::{BuildImage, PullEvent, PullImage};

use crate::image::{ImageRecord, KernelRecord};
use crate::store::Named;
use from_catalog::{pull_catalog_image, pull_kernel};

/// Messages of the PullActor.
#[derive(Debug)]
pub enum PullMsg {
    Image {
        req: PullImage,
        events: Option<EventTx>,
        reply: RpcReplyPort<PullResult<ImageRecord>>,
    },
    Kernel {
        name: String,
        events: Option<EventTx>,
        reply: RpcReplyPort<PullResult<KernelRecord>>,
    },
    /// A pull task finished.
    Done {
        key: String,
        result: PullResult<Pulled>,
    },
    /// Keys of the pulls in flight.
    InFlight(RpcReplyPort<Vec<String>>),
    /// `image build`: an image and its kernel built from a mirror (see [`build`]).
    Build {
        req: BuildImage,
        events: Option<EventTx>,
        reply: RpcReplyPort<PullResult<ImageRecord>>,
    },
    /// `image promote`: a running VM's root becomes an image (see [`promote`]).
    Promote {
        plan: promote::PromotePlan,
        events: Option<EventTx>,
        reply: RpcReplyPort<PullResult<ImageRecord>>,
    },
}

/// What a pull made.
#[derive(Debug, Clone)]
pub enum Pulled {
    Image(ImageRecord),
    Kernel(KernelRecord),
}

#[derive(Debug)]
enum Waiter {
    Image(RpcReplyPort<PullResult<ImageRecord>>),
    Kernel(RpcReplyPort<PullResult<KernelRecord>>),
}

#[derive(Debug)]
struct InFlight {
    waiters: Vec<Waiter>,
    reporter: Reporter,
}

#[derive(Debug, Default)]
pub struct PullActor;

#[derive(Debug)]
pub struct PullState {
    env: Arc<PullEnv>,
    inflight: HashMap<String, InFlight>,
}

impl PullState {
    /// Join the pull `key`, or start it with `work`.
    fn join_or_start<F, Fut>(
        &mut self,
        myself: &ActorRef<PullMsg>,
        key: String,
        waiter: Waiter,
        events: Option<EventTx>,
        work: F,
    ) where
        F: FnOnce(Arc<PullEnv>, Reporter) -> Fut,
        Fut: std::future::Future<Output = Result<Pulled, PullError>> + Send + 'static,
    {
        if let Some(f) = self.inflight.get_mut(&key) {
            tracing::info!(
                key,
                waiters = f.waiters.len() + 1,
                "joining a pull in flight"
            );
            if let Some(tx) = events {
                let _ = tx.send(PullEvent::Stage {
                    stage: "join".into(),
                    detail: Some("sharing a pull already in progress".into()),
                });
                f.reporter.add(tx);
            }
            f.waiters.push(waiter);
            return;
        }
        let reporter = Reporter::default();
        if let Some(tx) = events {
            reporter.add(tx);
        }
        tracing::info!(key, "pull started");
        let fut = work(Arc::clone(&self.env), reporter.clone());
        let me = myself.clone();
        let k = key.clone();
        tokio::spawn(async move {
            // A panic in the work is an error of this pull, not of the actor.
            let result = match tokio::spawn(fut).await {
                Ok(r) => r.map_err(Arc::new),
                Err(e) => Err(Arc::new(PullError::Join(e))),
            };
            let _ = me.cast(PullMsg::Done { key: k, result });
        });
        self.inflight.insert(
            key,
            InFlight {
                waiters: vec![waiter],
                reporter,
            },
        );
    }
}

impl Actor for PullActor {
    type Msg = PullMsg;
    type State = PullState;
    type Arguments = Arc<PullEnv>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        env: Arc<PullEnv>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let dirs = [
            env.config.images_dir(),
            env.config.kernels_dir(),
            env.config.blobs_dir(),
        ];
        tokio::task::spawn_blocking(move || dirs.iter().for_each(|d| sweep(d))).await?;
        Ok(PullState {
            env,
            inflight: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PullMsg::Image { req, events, reply } => {
                let plan = match plan_image(&state.env.config, &req) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = reply.send(Err(Arc::new(e)));
                        return Ok(());
                    }
                };
                let key = plan.key();
                state.join_or_start(
                    &myself,
                    key,
                    Waiter::Image(reply),
                    events,
                    |env, rep| async move { pull_image(&env, plan, &rep).await.map(Pulled::Image) },
                );
            }
            PullMsg::Kernel {
                name,
                events,
                reply,
            } => {
                let entry = match state.env.config.catalogs.kernel(&name) {
                    Some(e) => e.clone(),
                    None => {
                        let _ = reply.send(Err(Arc::new(PullError::UnknownName {
                            kind: "kernel",
                            name,
                            available: catalog::names(&state.env.config.catalogs.kernels),
                            hint: "",
                        })));
                        return Ok(());
                    }
                };
                let key = format!("kernel:{}", entry.name);
                state.join_or_start(&myself, key, Waiter::Kernel(reply), events, |env, rep| {
                    async move { pull_kernel(&env, entry, &rep).await.map(Pulled::Kernel) }
                });
            }
            PullMsg::Done { key, result } => {
                let Some(f) = state.inflight.remove(&key) else {
                    return Ok(());
                };
                match &result {
                    Ok(_) => tracing::info!(key, waiters = f.waiters.len(), "pull done"),
                    Err(e) => {
                        tracing::warn!(key, error = %banger_error::error_chain(&**e), "pull failed")
                    }
                }
                for w in f.waiters {
                    match (w, &result) {
                        (Waiter::Image(r), Ok(Pulled::Image(i))) => {
                            let _ = r.send(Ok(i.clone()));
                        }
                        (Waiter::Kernel(r), Ok(Pulled::Kernel(k))) => {
                            let _ = r.send(Ok(k.clone()));
                        }
                        (Waiter::Image(r), Err(e)) => {
                            let _ = r.send(Err(Arc::clone(e)));
                        }
                        (Waiter::Kernel(r), Err(e)) => {
                            let _ = r.send(Err(Arc::clone(e)));
                        }
                        (Waiter::Image(r), Ok(_)) => {
                            let _ = r.send(Err(Arc::new(PullError::Task("wrong result".into()))));
                        }
                        (Waiter::Kernel(r), Ok(_)) => {
                            let _ = r.send(Err(Arc::new(PullError::Task("wrong result".into()))));
                        }
                    }
                }
            }
            PullMsg::Promote {
                plan,
                events,
                reply,
            } => {
                let key = plan.key();
                state.join_or_start(
                    &myself,
                    key,
                    Waiter::Image(reply),
                    events,
                    |env, rep| async move {
                        promote::promote(&env, plan, &rep).await.map(Pulled::Image)
                    },
                );
            }
            PullMsg::Build { req, events, reply } => {
                let plan = match build::plan(&state.env.config, &req) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = reply.send(Err(Arc::new(e)));
                        return Ok(());
                    }
                };
                state.join_or_start(
                    &myself,
                    plan.key(),
                    Waiter::Image(reply),
                    events,
                    |env, rep| async move { build::build(&env, plan, &rep).await.map(Pulled::Image) },
                );
            }
            PullMsg::InFlight(reply) => {
                let _ = reply.send(state.inflight.keys().cloned().collect());
            }
        }
        Ok(())
    }
}

async fn pull_image(
    env: &Arc<PullEnv>,
    plan: ImagePlan,
    rep: &Reporter,
) -> Result<ImageRecord, PullError> {
    let doing = match &plan.source {
        ImageSource::Catalog(e) => format!("being pulled from the catalog's {}", e.name),
        ImageSource::Oci(r) => format!("being pulled from {}", r.whole()),
        // A build reserves its image and its kernel itself.
        ImageSource::Recipe(b) => return build::build(env, (**b).clone(), rep).await,
    };
    let name = plan.name.clone();
    let reservation = reserve(
        env,
        Named::Image,
        &name,
        doing,
        format!("pass --name, or delete it with `banger image delete {name}`"),
    )
    .await?;
    match plan.source.clone() {
        ImageSource::Catalog(entry) => {
            pull_catalog_image(env, &plan, entry, rep, reservation).await
        }
        ImageSource::Oci(reference) => oci::pull(env, &plan, reference, rep, reservation).await,
        ImageSource::Recipe(_) => unreachable!("handled above"),
    }
}
