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

pub mod build;
pub mod bundle;
pub mod catalog;
pub mod ext4;
pub mod guest;
pub mod layers;
pub mod make;
pub mod oci;
pub mod promote;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use banger_api::{BuildImage, CatalogEntry, PullEvent, PullImage, codes};

use crate::image::{ImageError, ImageRecord, KernelRecord};
use crate::store::{Named, Reservation, Store, StoreError};
use bundle::{BundleKind, Expected};
use catalog::Catalogs;

/// Where a pull's progress events go.
pub type EventTx = mpsc::UnboundedSender<PullEvent>;

/// What a pull answers.
pub type PullResult<T> = Result<T, Arc<PullError>>;

/// Errors of pulls.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("no {kind} named {name:?} in the catalog; available: {available}{hint}")]
    UnknownName {
        kind: &'static str,
        name: String,
        available: String,
        hint: &'static str,
    },
    #[error("{0}")]
    Exists(String),
    #[error("invalid image reference {reference:?}: {detail}")]
    Reference { reference: String, detail: String },
    #[error(transparent)]
    Name(#[from] ImageError),
    #[error("invalid size: {0}")]
    Size(String),
    #[error("download of {url} failed: {detail}")]
    Download { url: String, detail: String },
    #[error(
        "download of {url} was cut short: {got} of {expected} bytes ({cause}); nothing was kept, try again"
    )]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
        cause: String,
    },
    #[error(
        "sha256 of {url} is {actual}, the catalog says {expected}: refused and removed (a corrupt download, or a wrong catalog entry)"
    )]
    HashMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("bad {kind} bundle: {detail}; refused and removed")]
    Bundle { kind: &'static str, detail: String },
    #[error("registry error for {reference}: {detail}")]
    Registry { reference: String, detail: String },
    #[error("refused layer {digest} of {reference}: {detail}; nothing was kept")]
    Layer {
        reference: String,
        digest: String,
        detail: String,
    },
    #[error("{0}")]
    Build(String),
    #[error(
        "the guest binaries are missing: {path} not found (run scripts/build-guest.sh, or set [images] guest_binaries_dir)"
    )]
    GuestBinaries { path: PathBuf },
    #[error(transparent)]
    GuestBinary(#[from] guest::GuestBinaryError),
    #[error("i/o error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the pull task failed: {0}")]
    Task(String),
    #[error("vm {vm}: cannot read its root filesystem through the guest agent: {detail}")]
    Guest { vm: String, detail: String },
    #[error(transparent)]
    Recipe(#[from] build::BuildError),
}

impl PullError {
    /// The JSON-RPC code of this error.
    pub fn code(&self) -> i32 {
        match self {
            PullError::UnknownName { .. } => codes::NOT_FOUND,
            PullError::Exists(_) => codes::CONFLICT,
            PullError::Reference { .. } | PullError::Name(_) | PullError::Size(_) => {
                codes::INVALID_ARGUMENT
            }
            PullError::Recipe(e) if e.is_invalid_argument() => codes::INVALID_ARGUMENT,
            PullError::Store(e) => e.code(),
            _ => codes::INTERNAL_ERROR,
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PullError + '_ {
        move |source| PullError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// What the pulls need from the daemon's configuration.
#[derive(Debug, Clone)]
pub struct PullConfig {
    pub data_dir: PathBuf,
    /// Layer blobs live in `<cache_dir>/blobs/sha256/`.
    pub cache_dir: PathBuf,
    pub catalogs: Arc<Catalogs>,
    /// Registries (`host:port`) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Where `banger-init` and `banger-agent` are taken from for OCI images.
    pub guest_binaries_dir: PathBuf,
    /// `[images] mirror`: the Debian-family mirror of local builds (see [`build`]).
    pub mirror: Option<String>,
}

impl PullConfig {
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    pub fn kernels_dir(&self) -> PathBuf {
        self.data_dir.join("kernels")
    }

    pub fn blobs_dir(&self) -> PathBuf {
        self.cache_dir.join("blobs").join("sha256")
    }

    /// The `.deb` cache of local builds.
    pub fn debs_dir(&self) -> PathBuf {
        self.cache_dir.join("debs")
    }
}

/// What the pull tasks share.
#[derive(Debug)]
pub struct PullEnv {
    pub config: PullConfig,
    pub store: Arc<Store>,
    pub http: reqwest::Client,
    pub blobs: oci::BlobCache,
}

/// Install rustls' `ring` provider as the process default (once; reqwest and oci-client use
/// it).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl PullEnv {
    pub fn new(config: PullConfig, store: Arc<Store>) -> Arc<PullEnv> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("banger/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an http client with the process crypto provider");
        let blobs = oci::BlobCache::new(config.blobs_dir());
        Arc::new(PullEnv {
            config,
            store,
            http,
            blobs,
        })
    }
}

/// Sends progress to everyone waiting on one pull (joiners are added while it runs).
#[derive(Debug, Clone, Default)]
pub struct Reporter {
    inner: Arc<Mutex<ReporterInner>>,
}

#[derive(Debug, Default)]
struct ReporterInner {
    watchers: Vec<EventTx>,
    last_stage: Option<PullEvent>,
}

impl Reporter {
    fn add(&self, tx: EventTx) {
        let mut g = self.inner.lock().expect("reporter lock");
        if let Some(stage) = &g.last_stage {
            let _ = tx.send(stage.clone());
        }
        g.watchers.push(tx);
    }

    fn send(&self, ev: PullEvent) {
        let mut g = self.inner.lock().expect("reporter lock");
        g.watchers.retain(|w| w.send(ev.clone()).is_ok());
        if matches!(ev, PullEvent::Stage { .. }) {
            g.last_stage = Some(ev);
        }
    }

    pub fn stage(&self, stage: &str, detail: Option<String>) {
        tracing::debug!(stage, detail = detail.as_deref(), "pull stage");
        self.send(PullEvent::Stage {
            stage: stage.into(),
            detail,
        });
    }

    /// Report `counter` as bytes downloaded every 200 ms until the returned guard drops.
    pub fn ticker(&self, counter: Arc<std::sync::atomic::AtomicU64>, total: Option<u64>) -> Ticker {
        let me = self.clone();
        let task = tokio::spawn(async move {
            let mut last = u64::MAX;
            loop {
                let done = counter.load(std::sync::atomic::Ordering::Relaxed);
                if done != last {
                    me.send(PullEvent::Bytes { done, total });
                    last = done;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ticker(task)
    }
}

/// Stops a [`Reporter::ticker`] when dropped.
#[derive(Debug)]
pub struct Ticker(tokio::task::JoinHandle<()>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A directory removed on drop unless [`Staging::keep`] was called.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    armed: bool,
}

pub const STAGING_PREFIX: &str = ".staging-";

impl Staging {
    /// A new empty staging directory in `parent`, for `name`.
    pub fn new(parent: &Path, name: &str) -> Result<Staging, PullError> {
        std::fs::create_dir_all(parent).map_err(PullError::io(parent))?;
        let path = parent.join(format!(
            "{STAGING_PREFIX}{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&path).map_err(PullError::io(&path))?;
        Ok(Staging { path, armed: true })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rename to `dest` (replacing a leftover directory that no record points at).
    pub fn publish(mut self, dest: &Path) -> Result<(), PullError> {
        if dest.exists() {
            std::fs::remove_dir_all(dest).map_err(PullError::io(dest))?;
        }
        std::fs::rename(&self.path, dest).map_err(PullError::io(dest))?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Remove staging directories and partial files a crash left in `dir`.
pub fn sweep(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(STAGING_PREFIX) || name.ends_with(".partial") {
            tracing::info!(path = %e.path().display(), "removing a leftover of an interrupted pull");
            let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
        }
    }
}

/// What an image pull resolves to.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// A catalog entry's bundle.
    Catalog(CatalogEntry),
    Oci(oci_client::Reference),
    /// A catalog entry's recipe, built locally ([`build`]).
    Recipe(Box<build::BuildPlan>),
}

/// A resolved image pull.
#[derive(Debug, Clone)]
pub struct ImagePlan {
    pub source: ImageSource,
    pub name: String,
    pub kernel_ref: Option<String>,
    pub size_bytes: Option<u64>,
}

impl ImagePlan {
    fn key(&self) -> String {
        let src = match &self.source {
            ImageSource::Catalog(e) => format!("catalog:{}", e.name),
            ImageSource::Oci(r) => format!("oci:{}", r.whole()),
            // Builds of one name share the work, whatever asked for them.
            ImageSource::Recipe(p) => return p.key(),
        };
        format!("image:{src}->{}", self.name)
    }
}

/// Whether `source` reads as an OCI reference rather than a catalog name.
fn looks_like_reference(source: &str) -> bool {
    source.contains([':', '/', '@'])
}

/// Resolve a request: a catalog entry (its bundle, else its recipe; `build` forces the
/// recipe), or an OCI reference; the image's name.
pub fn plan_image(config: &PullConfig, req: &PullImage) -> Result<ImagePlan, PullError> {
    let catalogs = &config.catalogs;
    let source = if let Some(e) = catalogs.image(&req.source) {
        match (&e.bundle, &e.recipe) {
            (Some(_), _) if !req.build => ImageSource::Catalog(e.clone()),
            (_, Some(recipe)) => {
                let name = req.name.clone().unwrap_or_else(|| e.name.clone());
                let plan = build::plan_recipe(
                    config,
                    &name,
                    recipe,
                    None,
                    req.kernel_ref.clone(),
                    req.size_bytes,
                )?;
                return Ok(ImagePlan {
                    name,
                    kernel_ref: Some(plan.kernel_name.clone()),
                    size_bytes: req.size_bytes,
                    source: ImageSource::Recipe(Box::new(plan)),
                });
            }
            _ => {
                return Err(PullError::Reference {
                    reference: req.source.clone(),
                    detail:
                        "--build: this catalog entry has no recipe; pull its bundle without --build"
                            .into(),
                });
            }
        }
    } else if looks_like_reference(&req.source) {
        let r: oci_client::Reference =
            req.source
                .parse()
                .map_err(|e: oci_client::ParseError| PullError::Reference {
                    reference: req.source.clone(),
                    detail: e.to_string(),
                })?;
        ImageSource::Oci(r)
    } else {
        return Err(PullError::UnknownName {
            kind: "image",
            name: req.source.clone(),
            available: catalog::names(&catalogs.images),
            hint: " (an OCI image needs a tag or a registry, e.g. debian:bookworm)",
        });
    };
    if req.build {
        return Err(PullError::Reference {
            reference: req.source.clone(),
            detail: "--build applies to catalog images with a recipe (`banger image list --available`); use `banger image build` for your own".into(),
        });
    }
    let name = match (&req.name, &source) {
        (Some(n), _) => n.clone(),
        (None, ImageSource::Catalog(e)) => e.name.clone(),
        (None, ImageSource::Oci(r)) => oci::default_name(r),
        (None, ImageSource::Recipe(p)) => p.name.clone(),
    };
    crate::image::validate_name(&name)?;
    let kernel_ref = req.kernel_ref.clone().or(match &source {
        ImageSource::Catalog(e) => e.kernel_ref.clone(),
        _ => None,
    });
    if let Some(k) = &kernel_ref {
        crate::image::validate_name(k)?;
    }
    if let Some(size) = req.size_bytes {
        if matches!(source, ImageSource::Catalog(_)) {
            return Err(PullError::Size(
                "--size applies to OCI pulls and builds; a catalog bundle comes with its own ext4 (--build builds its recipe)".into(),
            ));
        }
        if size < ext4::MIN_SIZE {
            return Err(PullError::Size(format!(
                "{size} bytes is below the minimum of {} MiB",
                ext4::MIN_SIZE >> 20
            )));
        }
    }
    Ok(ImagePlan {
        source,
        name,
        kernel_ref,
        size_bytes: req.size_bytes,
    })
}

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
                Err(e) => Err(Arc::new(PullError::Task(e.to_string()))),
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
                        tracing::warn!(key, error = %crate::vm::actor::error_chain(&**e), "pull failed")
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

/// Run blocking work on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PullError> + Send + 'static,
) -> Result<T, PullError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PullError::Task(e.to_string()))?
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

/// Reserve `name` for the pull, build or promote about to make it (see
/// [`crate::store::Reservation`]): a record of that name is [`PullError::Exists`] with
/// `hint` after the message; a name something else is making is a conflict that says what.
/// `doing` is that clause for others (`being pulled from debian:bookworm`).
pub async fn reserve(
    env: &PullEnv,
    kind: Named,
    name: &str,
    doing: String,
    hint: String,
) -> Result<Reservation, PullError> {
    let store = Arc::clone(&env.store);
    let name = name.to_owned();
    blocking(move || {
        store.reserve(kind, &name, &doing).map_err(|e| match e {
            e @ StoreError::Exists { .. } => PullError::Exists(format!("{e}; {hint}")),
            e => e.into(),
        })
    })
    .await
}

/// Stream `url` into `unpack` on the blocking pool: the body passes once through sha256,
/// zstd and tar.
async fn download_bundle(
    env: &PullEnv,
    kind: BundleKind,
    entry: &CatalogEntry,
    staging: PathBuf,
    rep: &Reporter,
) -> Result<bundle::Unpacked, PullError> {
    let entry = entry.bundle.as_ref().ok_or_else(|| PullError::Download {
        url: entry.name.clone(),
        detail: "the catalog entry has no bundle".into(),
    })?;
    rep.stage("download", Some(entry.url.clone()));
    let download_err = |detail: String| PullError::Download {
        url: entry.url.clone(),
        detail,
    };
    let resp = env
        .http
        .get(&entry.url)
        .send()
        .await
        .map_err(|e| download_err(crate::vm::actor::error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(download_err(format!(
            "the server answered {}",
            resp.status()
        )));
    }
    // The body as a blocking reader for the unpacker on the blocking pool.
    let body = {
        use futures::TryStreamExt;
        tokio_util::io::StreamReader::new(
            resp.bytes_stream()
                .map_err(|e| std::io::Error::other(crate::vm::actor::error_chain(&e))),
        )
    };
    let reader = tokio_util::io::SyncIoBridge::new(body);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let _ticker = rep.ticker(Arc::clone(&counter), Some(entry.size));
    let expected = Expected {
        url: entry.url.clone(),
        size: entry.size,
        sha256: entry.sha256.clone(),
    };
    blocking(move || bundle::unpack(kind, reader, &staging, &expected, Some(counter))).await
}

async fn pull_catalog_image(
    env: &Arc<PullEnv>,
    plan: &ImagePlan,
    entry: CatalogEntry,
    rep: &Reporter,
    reservation: Reservation,
) -> Result<ImageRecord, PullError> {
    let images = env.config.images_dir();
    let name = plan.name.clone();
    let staging = blocking({
        let images = images.clone();
        move || Staging::new(&images, &name)
    })
    .await?;
    let unpacked = download_bundle(
        env,
        BundleKind::Image,
        &entry,
        staging.path().to_owned(),
        rep,
    )
    .await?;
    rep.stage("publish", Some(plan.name.clone()));
    let name = plan.name.clone();
    let kernel = plan.kernel_ref.clone().or(unpacked.kernel_ref);
    blocking(move || {
        let dest = images.join(&name);
        staging.publish(&dest)?;
        let rootfs = dest.join("rootfs.ext4");
        let size_bytes = std::fs::metadata(&rootfs)
            .map_err(PullError::io(&rootfs))?
            .len();
        let rec = ImageRecord {
            name,
            rootfs,
            size_bytes,
            kernel,
            registered_at: crate::store::now_secs(),
        };
        reservation.publish_image(&rec)?;
        Ok(rec)
    })
    .await
}

async fn pull_kernel(
    env: &Arc<PullEnv>,
    entry: CatalogEntry,
    rep: &Reporter,
) -> Result<KernelRecord, PullError> {
    let kernels = env.config.kernels_dir();
    let name = entry.name.clone();
    let reservation = reserve(
        env,
        Named::Kernel,
        &name,
        "being pulled from the kernel catalog".into(),
        format!("remove it with `banger kernel rm {name}` to pull it again"),
    )
    .await?;
    let staging = blocking({
        let kernels = kernels.clone();
        move || Staging::new(&kernels, &name)
    })
    .await?;
    let unpacked = download_bundle(
        env,
        BundleKind::Kernel,
        &entry,
        staging.path().to_owned(),
        rep,
    )
    .await?;
    rep.stage("publish", Some(entry.name.clone()));
    let name = entry.name.clone();
    blocking(move || {
        let dest = kernels.join(&name);
        staging.publish(&dest)?;
        let config = unpacked.config.then(|| dest.join("config"));
        let options = match &config {
            Some(c) => crate::kernel_format::config_options(
                &std::fs::read_to_string(c).map_err(PullError::io(c))?,
            ),
            None => Default::default(),
        };
        let rec = KernelRecord {
            name,
            kernel: dest.join(&unpacked.main),
            initrd: unpacked.initrd.then(|| dest.join("initrd")),
            modules: unpacked.modules.then(|| dest.join("modules")),
            registered_at: crate::store::now_secs(),
            vmlinux: Some(dest.join("vmlinux")),
            format: unpacked.format,
            config,
            options,
        };
        reservation.publish_kernel(&rec)?;
        Ok(rec)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_is_removed_unless_published_and_sweep_clears_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let s = Staging::new(dir.path(), "img").unwrap();
        let p = s.path().to_owned();
        std::fs::write(p.join("f"), b"x").unwrap();
        drop(s);
        assert!(!p.exists(), "dropped staging is removed");
        let s = Staging::new(dir.path(), "img").unwrap();
        std::fs::write(s.path().join("f"), b"x").unwrap();
        s.publish(&dir.path().join("img")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("img/f")).unwrap(), b"x");

        // What a crash leaves: a staging dir and a partial blob; kept: everything else.
        std::fs::create_dir(dir.path().join(".staging-x-123")).unwrap();
        std::fs::write(dir.path().join(".abc-1.partial"), b"p").unwrap();
        sweep(dir.path());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["img"]);
    }

    fn config_with(catalogs: catalog::Catalogs) -> PullConfig {
        PullConfig {
            data_dir: "/d".into(),
            cache_dir: "/c".into(),
            catalogs: Arc::new(catalogs),
            insecure_registries: vec![],
            guest_binaries_dir: "/g".into(),
            mirror: Some("http://mirror.example/debian".into()),
        }
    }

    #[test]
    fn sources_resolve_to_catalog_entries_or_references() {
        let bundle = banger_api::Bundle {
            url: "http://127.0.0.1:1/b.tar.zst".into(),
            sha256: "ab".repeat(32),
            size: 1,
        };
        let kernel = CatalogEntry {
            name: "k".into(),
            arch: "x86_64".into(),
            bundle: Some(bundle.clone()),
            recipe: None,
            kernel_ref: None,
            description: "d".into(),
        };
        let both = CatalogEntry {
            name: "both".into(),
            bundle: Some(bundle),
            recipe: Some(banger_api::Recipe {
                suite: "bookworm".into(),
                packages: vec!["git".into()],
                kernel_package: None,
            }),
            kernel_ref: Some("k".into()),
            ..kernel.clone()
        };
        let recipe_only = CatalogEntry {
            name: "built".into(),
            bundle: None,
            kernel_ref: None,
            ..both.clone()
        };
        let c = config_with(catalog::Catalogs {
            images: vec![both.clone(), recipe_only],
            kernels: vec![kernel],
        });
        let pull = |source: &str, build: bool| {
            plan_image(
                &c,
                &PullImage {
                    source: source.into(),
                    build,
                    ..Default::default()
                },
            )
        };
        // A bundle when there is one …
        let p = pull("both", false).unwrap();
        assert!(matches!(p.source, ImageSource::Catalog(_)));
        assert_eq!(p.kernel_ref.as_deref(), Some("k"));
        // … else the recipe, and --build forces it; both keyed by the image name, as
        // `image build` is.
        for (src, build) in [("built", false), ("both", true)] {
            let p = pull(src, build).unwrap();
            let ImageSource::Recipe(b) = &p.source else {
                panic!("{src}: {:?}", p.source)
            };
            assert_eq!(b.mirror, "http://mirror.example/debian");
            assert_eq!(b.mirror_from, "[images] mirror");
            assert_eq!(b.kernel_name, src);
            assert_eq!(b.kernel_package, build::DEFAULT_KERNEL_PACKAGE);
            assert_eq!(p.key(), format!("image:build->{src}"));
            let direct = build::plan(
                &c,
                &BuildImage {
                    name: src.into(),
                    include: vec!["git".into()],
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(direct.key(), p.key());
        }
        let e = pull("debian:bookworm", true).unwrap_err().to_string();
        assert!(e.contains("--build applies to catalog images"), "{e}");
        let p = pull("debian:bookworm", false).unwrap();
        match &p.source {
            ImageSource::Oci(r) => assert_eq!(r.whole(), "docker.io/library/debian:bookworm"),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.name, "debian-bookworm");
        let e = pull("nosuch", false).unwrap_err().to_string();
        assert!(e.contains("available: both, built"), "{e}");
        let e = plan_image(
            &c,
            &PullImage {
                source: "both".into(),
                size_bytes: Some(1 << 30),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, PullError::Size(_)), "{e}");
        let e = build::plan(
            &c,
            &BuildImage {
                name: "x".into(),
                mirror: Some("ftp://x".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.code(), codes::INVALID_ARGUMENT, "{e}");
    }
}
