//! Pulls from the catalogs: an image's or a kernel's bundle downloaded (the response body
//! read as a blocking stream by the unpacker on the blocking pool), checked, unpacked into
//! staging and published under the pull's reservation.

use std::path::PathBuf;
use std::sync::Arc;

use banger_api::CatalogEntry;

use super::bundle::{self, BundleKind, Expected};
use super::{ImagePlan, PullEnv, PullError, Reporter, Staging, blocking, reserve};
use crate::image::{ImageRecord, KernelRecord};
use crate::store::{Named, Reservation};

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
        .map_err(|source| PullError::Request {
            url: entry.url.clone(),
            source,
        })?;
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
                .map_err(|e| std::io::Error::other(banger_error::error_chain(&e))),
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

pub(super) async fn pull_catalog_image(
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

pub(super) async fn pull_kernel(
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
