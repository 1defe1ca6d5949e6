//! OCI pulls: any registry reference (Docker Hub short names become
//! `docker.io/library/…`; tags or digests; `linux/amd64` is picked from an index), through
//! `oci-client`. Registries named in `[images] insecure_registries` are spoken to over plain
//! HTTP, every other one over HTTPS (rustls).
//!
//! Layer blobs go to a digest-addressed cache, `<cache>/blobs/sha256/<hex>`: downloaded to a
//! `.partial` file beside it, checked against their digest, then renamed; a blob already
//! there is not fetched again, and concurrent pulls wanting the same blob wait for one
//! download ([`BlobCache`]). `image cache list|prune` shows and empties it.
//!
//! The image is then built in a staging directory next to its destination: layers replayed
//! oldest first into `tree/` ([`super::layers`]), `/.dockerenv` removed, `banger-init` and
//! `banger-agent` copied to `/usr/lib/banger/` from the guest binaries directory, the ext4
//! made with `mkfs.ext4 -d` ([`super::ext4`]), owners set with debugfs when the daemon is not
//! root, `tree/` removed, and the directory renamed into place with a `manifest.json`
//! saying where it came from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use banger_api::{CachePruned, CachedBlob};

use super::layers::{Owners, Replay};
use super::{ImagePlan, PullEnv, PullError, Reporter, Staging, blocking};
use crate::image::ImageRecord;
use crate::store::Reservation;

/// Where banger's guest binaries go inside an OCI image.
pub const GUEST_DIR: &str = "usr/lib/banger";
pub const GUEST_BINARIES: [&str; 2] = super::guest::NAMES;

/// The default image name for a reference: its last path component and its tag (or the
/// start of its digest), e.g. `docker.io/library/debian:bookworm` → `debian-bookworm`.
pub fn default_name(r: &Reference) -> String {
    let last = r.repository().rsplit('/').next().unwrap_or("image");
    let suffix = match (r.tag(), r.digest()) {
        (Some(t), _) => t.to_owned(),
        (None, Some(d)) => d.trim_start_matches("sha256:").chars().take(12).collect(),
        (None, None) => "latest".into(),
    };
    let raw = format!("{last}-{suffix}").to_ascii_lowercase();
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(63);
    name
}

/// The digest-addressed blob cache.
#[derive(Debug)]
pub struct BlobCache {
    dir: PathBuf,
    /// One lock per digest being fetched, so a blob is downloaded once.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

impl BlobCache {
    pub fn new(dir: PathBuf) -> BlobCache {
        BlobCache {
            dir,
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_for(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = self.locks.lock().expect("blob locks");
        Arc::clone(g.entry(digest.to_owned()).or_default())
    }

    /// The cached blob of `desc`, fetched from the registry if it is not there yet. Returns
    /// its path and whether it was downloaded now.
    pub async fn fetch(
        &self,
        client: &Client,
        reference: &Reference,
        desc: &OciDescriptor,
        counter: &std::sync::atomic::AtomicU64,
    ) -> Result<(PathBuf, bool), PullError> {
        let layer_err = |detail: String| PullError::Layer {
            reference: reference.whole(),
            digest: desc.digest.clone(),
            detail,
        };
        let hex = digest_hex(&desc.digest)
            .ok_or_else(|| layer_err("only sha256 digests are supported".into()))?
            .to_ascii_lowercase();
        let path = self.dir.join(&hex);
        let lock = self.lock_for(&desc.digest);
        let _guard = lock.lock().await;
        if tokio::fs::metadata(&path).await.is_ok() {
            // Mark it used (for `image cache list`).
            let p = path.clone();
            let _ = blocking(move || {
                let f = std::fs::File::options()
                    .write(true)
                    .open(&p)
                    .map_err(PullError::io(&p))?;
                let _ = f.set_modified(std::time::SystemTime::now());
                Ok(())
            })
            .await;
            counter.fetch_add(
                desc.size.max(0) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            return Ok((path, false));
        }
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(PullError::io(&self.dir))?;
        let partial = self
            .dir
            .join(format!(".{hex}-{}.partial", uuid::Uuid::new_v4().simple()));
        let result = async {
            let mut stream = client
                .pull_blob_stream(reference, desc)
                .await
                .map_err(|e| registry_err(reference, &e))?;
            let mut file = tokio::fs::File::create(&partial)
                .await
                .map_err(PullError::io(&partial))?;
            let mut hasher = Sha256::new();
            let mut got = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| PullError::Download {
                    url: format!("{} blob {}", reference.whole(), desc.digest),
                    detail: format!(
                        "{} (try again: the layers already fetched are kept)",
                        banger_error::error_chain(&e)
                    ),
                })?;
                hasher.update(&chunk);
                got += chunk.len() as u64;
                counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                file.write_all(&chunk)
                    .await
                    .map_err(PullError::io(&partial))?;
            }
            file.flush().await.map_err(PullError::io(&partial))?;
            file.sync_all().await.map_err(PullError::io(&partial))?;
            let actual = super::bundle::hex(&hasher.finalize());
            if desc.size >= 0 && got < desc.size as u64 {
                return Err(PullError::Truncated {
                    url: format!("{} blob {}", reference.whole(), desc.digest),
                    got,
                    expected: desc.size as u64,
                    cause: "the registry closed the stream".into(),
                });
            }
            if actual != hex {
                return Err(PullError::HashMismatch {
                    url: format!("{} blob {}", reference.whole(), desc.digest),
                    expected: hex.clone(),
                    actual,
                });
            }
            tokio::fs::rename(&partial, &path)
                .await
                .map_err(PullError::io(&path))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        result.map(|()| (path, true))
    }

    /// The blobs in the cache, most recently used first. Blocking.
    pub fn list(&self) -> Result<Vec<CachedBlob>, PullError> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(PullError::io(&self.dir)(e)),
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            let used_at = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            out.push(CachedBlob {
                digest: format!("sha256:{name}"),
                size_bytes: m.len(),
                used_at,
            });
        }
        out.sort_by(|a, b| b.used_at.cmp(&a.used_at).then(a.digest.cmp(&b.digest)));
        Ok(out)
    }

    /// Remove every blob no pull is fetching right now. Blocking.
    pub fn prune(&self) -> Result<CachePruned, PullError> {
        let mut removed = Vec::new();
        let mut freed_bytes = 0;
        for b in self.list()? {
            let lock = self.lock_for(&b.digest);
            let Ok(_g) = lock.try_lock() else { continue };
            let hex = b.digest.trim_start_matches("sha256:");
            let path = self.dir.join(hex);
            if std::fs::remove_file(&path).is_ok() {
                freed_bytes += b.size_bytes;
                removed.push(b.digest);
            }
        }
        Ok(CachePruned {
            removed,
            freed_bytes,
        })
    }
}

fn registry_err(reference: &Reference, e: &oci_client::errors::OciDistributionError) -> PullError {
    PullError::Registry {
        reference: reference.whole(),
        detail: banger_error::error_chain(e),
    }
}

/// An OCI client for `insecure` registries over HTTP and the rest over HTTPS, resolving
/// indexes to linux/amd64.
pub fn client(insecure: &[String]) -> Client {
    super::install_crypto_provider();
    Client::new(ClientConfig {
        protocol: if insecure.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(insecure.to_vec())
        },
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        connect_timeout: Some(std::time::Duration::from_secs(30)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    })
}

/// Pull `reference` and build image `plan.name` from it, into the name `reservation` holds.
pub async fn pull(
    env: &Arc<PullEnv>,
    plan: &ImagePlan,
    reference: Reference,
    rep: &Reporter,
    reservation: Reservation,
) -> Result<ImageRecord, PullError> {
    let guest_dir = env.config.guest_binaries_dir.clone();
    {
        // Both there and static (see `super::guest`), before anything is downloaded.
        let dir = guest_dir.clone();
        blocking(move || Ok(super::guest::check_dir(&dir)?)).await?;
    }
    rep.stage("resolve", Some(reference.whole()));
    let client = client(&env.config.insecure_registries);
    let (manifest, digest) = client
        .pull_image_manifest(&reference, &RegistryAuth::Anonymous)
        .await
        .map_err(|e| {
            let mut err = registry_err(&reference, &e);
            let registry = reference.resolve_registry();
            // Advice from the real cause (see `super::advice`).
            if let PullError::Registry { detail, .. } = &mut err
                && let Some(a) =
                    super::advice::advice(&e, registry, &env.config.insecure_registries)
            {
                detail.push_str(&format!(" ({a})"));
            }
            err
        })?;
    let total: u64 = manifest.layers.iter().map(|l| l.size.max(0) as u64).sum();
    rep.stage(
        "download",
        Some(format!(
            "{} layers, {:.1} MiB ({digest})",
            manifest.layers.len(),
            total as f64 / (1u64 << 20) as f64
        )),
    );
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticker = rep.ticker(Arc::clone(&counter), Some(total));
    // Three blobs at a time; each future owns what it needs (a borrowed closure here trips
    // the compiler's higher-ranked Send check).
    let jobs: Vec<_> = manifest
        .layers
        .iter()
        .cloned()
        .map(|desc| {
            let (env, client, reference, counter) = (
                Arc::clone(env),
                client.clone(),
                reference.clone(),
                Arc::clone(&counter),
            );
            async move { env.blobs.fetch(&client, &reference, &desc, &counter).await }
        })
        .collect();
    let fetched: Vec<Result<(PathBuf, bool), PullError>> =
        futures::stream::iter(jobs).buffered(3).collect().await;
    drop(ticker);
    let mut layers = Vec::new();
    for (f, desc) in fetched.into_iter().zip(&manifest.layers) {
        layers.push((f?.0, desc.digest.clone()));
    }
    rep.stage("unpack", Some(format!("{} layers", layers.len())));
    let images = env.config.images_dir();
    let (name, whole, size) = (plan.name.clone(), reference.whole(), plan.size_bytes);
    let owners = Owners::detect();
    let rep2 = rep.clone();
    let kernel = plan.kernel_ref.clone();
    let layer_digests: Vec<String> = layers.iter().map(|(_, d)| d.clone()).collect();
    blocking(move || {
        let staging = Staging::new(&images, &name)?;
        let tree = staging.path().join("tree");
        std::fs::create_dir(&tree).map_err(PullError::io(&tree))?;
        let owner_list = build_tree(&tree, &layers, &whole, &guest_dir, owners)?;
        rep2.stage("mkfs", None);
        let rootfs = staging.path().join("rootfs.ext4");
        let size = super::ext4::build(&tree, &rootfs, size, &owner_list, &rep2)?;
        let manifest = serde_json::json!({
            "name": name,
            "arch": "x86_64",
            "source": whole,
            "digest": digest,
            "layers": layer_digests,
            "kernel_ref": kernel,
        });
        let mpath = staging.path().join("manifest.json");
        std::fs::write(&mpath, serde_json::to_vec_pretty(&manifest).expect("json"))
            .map_err(PullError::io(&mpath))?;
        rep2.stage("publish", Some(name.clone()));
        let dest = images.join(&name);
        staging.publish(&dest)?;
        let rootfs = dest.join("rootfs.ext4");
        let rec = ImageRecord {
            name,
            size_bytes: size,
            rootfs,
            kernel,
            registered_at: crate::store::now_secs(),
        };
        reservation.publish_image(&rec)?;
        Ok(rec)
    })
    .await
}

/// Replay `layers` (cached blob, digest) into `tree`, then remove `/.dockerenv` and add the
/// guest binaries. Returns the owners to set with debugfs (empty when chowned).
pub fn build_tree(
    tree: &Path,
    layers: &[(PathBuf, String)],
    reference: &str,
    guest_dir: &Path,
    owners: Owners,
) -> Result<Vec<(PathBuf, u64, u64)>, PullError> {
    let mut replay = Replay::new(tree, owners);
    for (path, digest) in layers {
        let layer_err = |detail: String| PullError::Layer {
            reference: reference.to_owned(),
            digest: digest.clone(),
            detail,
        };
        let reader = super::layers::open_layer(path).map_err(|e| layer_err(e.to_string()))?;
        replay.apply(reader).map_err(layer_err)?;
    }
    let build = |detail: String| PullError::Build(format!("preparing the image: {detail}"));
    replay.delete(Path::new(".dockerenv")).map_err(build)?;
    for b in GUEST_BINARIES {
        replay
            .inject(&Path::new(GUEST_DIR).join(b), &guest_dir.join(b), 0o755)
            .map_err(build)?;
    }
    if replay.skipped > 0 {
        tracing::info!(
            reference,
            skipped = replay.skipped,
            "device nodes and fifos skipped"
        );
    }
    replay.finish().map_err(build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names() {
        let n = |s: &str| default_name(&s.parse().unwrap());
        assert_eq!(n("debian:bookworm"), "debian-bookworm");
        assert_eq!(n("127.0.0.1:5000/test/img:v1"), "img-v1");
        assert_eq!(n("alpine"), "alpine-latest");
        assert_eq!(
            n(&format!("ghcr.io/a/b@sha256:{}", "ab".repeat(32))),
            "b-abababababab"
        );
    }
}
