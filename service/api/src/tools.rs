//! What `bangerd` answers the CLI's local tools, which need the daemon's code but no
//! daemon: the CLI links none of it (no supervision tree, store or registry client), so it
//! runs the `bangerd` binary beside it for these, and they exchange JSON:
//!
//! - `bangerd --check-config` (`banger doctor`): the config loaded and checked exactly as
//!   the daemon would, printed as [`CheckedConfig`]; a refused config exits 1 with the
//!   reason on stderr.
//! - `bangerd --internal-make-bundle '<MakeBundle JSON>'` (`banger internal make-bundle`):
//!   catalog bundles built by the code that unpacks them, answered as [`MadeBundle`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// bangerd's first argument for [`MakeBundle`] (hidden; the CLI's plumbing).
pub const MAKE_BUNDLE_ARG: &str = "--internal-make-bundle";

/// `bangerd --check-config`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckedConfig {
    /// The config file it read, or would have read (none without a home directory).
    pub file: Option<PathBuf>,
    /// Whether that file exists (when not, the defaults and `BANGER_*` apply).
    pub file_exists: bool,
    /// The whole effective config, as the daemon's `Config` serialises.
    pub config: serde_json::Value,
}

/// A bundle to make: an image bundle from `rootfs_tar`, or a kernel bundle from
/// `kernel_dir` (exactly one of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MakeBundle {
    pub rootfs_tar: Option<PathBuf>,
    pub kernel_dir: Option<PathBuf>,
    pub name: String,
    pub kernel_ref: Option<String>,
    pub guest_dir: PathBuf,
    pub size: Option<u64>,
    pub out: PathBuf,
}

/// A bundle made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MadeBundle {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// Paths left out (kernel: symlinks leaving modules/, special files).
    pub skipped: Vec<String>,
}
