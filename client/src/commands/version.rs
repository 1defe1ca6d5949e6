//! `banger version`.

use std::time::Duration;

use banger_api::DaemonRpcClient;
use serde::Serialize;

use crate::connect::{self, Target};
use crate::exit::{self, CliError};
use crate::render;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("BANGER_COMMIT");
pub const BUILD_TIME: &str = env!("BANGER_BUILD_TIME");

/// `0.1.0 (commit abc, built 2026-…)`, for `--version`.
pub const SHORT: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BANGER_COMMIT"),
    ", built ",
    env!("BANGER_BUILD_TIME"),
    ")"
);

#[derive(Debug, Serialize)]
struct Build {
    version: String,
    commit: String,
    build_time: String,
}

#[derive(Debug, Serialize)]
struct Versions {
    client: Build,
    /// The running daemon's build, if one answers (it is not started for this).
    daemon: Option<Build>,
    /// Where `banger update` looks for releases (compiled in).
    release_manifest: &'static str,
}

pub async fn run(target: &Target, json: bool) -> Result<u8, CliError> {
    let daemon = tokio::time::timeout(Duration::from_secs(2), async {
        let client = connect::connect(target).await.ok()?;
        client.status().await.ok()
    })
    .await
    .ok()
    .flatten()
    .map(|s| Build {
        version: s.version,
        commit: s.commit,
        build_time: s.build_time,
    });
    let v = Versions {
        client: Build {
            version: VERSION.into(),
            commit: COMMIT.into(),
            build_time: BUILD_TIME.into(),
        },
        daemon,
        release_manifest: super::update::MANIFEST_URL,
    };
    if json {
        render::json(&v)?;
        return Ok(exit::OK);
    }
    outln!(
        "banger  {} (commit {}, built {})",
        v.client.version,
        v.client.commit,
        v.client.build_time
    );
    match &v.daemon {
        Some(d) if d.version == v.client.version && d.commit == v.client.commit => {
            outln!("bangerd same build (running)");
        }
        Some(d) => {
            outln!(
                "bangerd {} (commit {}, built {})",
                d.version,
                d.commit,
                d.build_time
            );
            let how = if target.system {
                "`sudo banger system restart`"
            } else {
                "`banger daemon stop` (it restarts on next use)"
            };
            outln!(
                "note: the running daemon is another build than this CLI; restart it with {how}"
            );
        }
        None => outln!("bangerd not running"),
    }
    Ok(exit::OK)
}
