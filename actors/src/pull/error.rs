//! The errors of pulls, builds and promotes, and the JSON-RPC code of each.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_api::codes;

use super::{build, guest};
use crate::image::ImageError;
use crate::store::StoreError;

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
    /// The request itself failed (no connection, TLS, a timeout): the cause is kept.
    #[error("download of {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
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
    /// The task panicked or was cancelled.
    #[error("the pull task failed")]
    Join(#[source] tokio::task::JoinError),
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

    pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PullError + '_ {
        move |source| PullError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// A failed request and a failed task keep their causes (before: flattened into the
    /// message), and the chain reads as the message did.
    #[tokio::test]
    async fn request_and_task_failures_keep_their_causes() {
        // reqwest's rustls has no provider of its own: without this the test passed only
        // when another test of the binary had installed it first.
        crate::pull::env::install_crypto_provider();
        let url = "http://127.0.0.1:1/bundle.tar.zst";
        let e = reqwest::Client::new().get(url).send().await.unwrap_err();
        let flat = format!(
            "download of {url} failed: {}",
            banger_error::error_chain(&e)
        );
        let e = PullError::Request {
            url: url.into(),
            source: e,
        };
        assert!(
            e.source()
                .unwrap()
                .downcast_ref::<reqwest::Error>()
                .is_some()
        );
        assert_eq!(banger_error::error_chain(&e), flat);

        let join = tokio::spawn(async { panic!("boom") }).await.unwrap_err();
        let flat = format!("the pull task failed: {join}");
        let e = PullError::Join(join);
        assert!(
            e.source()
                .unwrap()
                .downcast_ref::<tokio::task::JoinError>()
                .is_some()
        );
        assert_eq!(banger_error::error_chain(&e), flat);
        assert!(flat.contains("panicked"), "{flat}");
    }
}
