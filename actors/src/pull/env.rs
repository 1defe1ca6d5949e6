//! What the pull tasks share: the configuration, the store, the HTTP client and the blob
//! cache; and how they run blocking work.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::PullError;
use super::catalog::Catalogs;
use super::oci;
use crate::store::Store;

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
    /// `[images] mirror`: the Debian-family mirror of local builds (see [`super::build`]).
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
    /// The image builds running now (see [`super::build::Builds`]).
    pub builds: super::build::Builds,
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
            builds: Default::default(),
        })
    }
}

/// Run blocking work on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PullError> + Send + 'static,
) -> Result<T, PullError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(PullError::Join)?
}
