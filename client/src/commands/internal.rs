//! `banger internal …`: release tools, hidden from `--help`. They run locally; no daemon.

use crate::cli::InternalCmd;
use crate::exit::{self, CliError};
use crate::render;

/// Where the guest binaries are by default: beside this executable, else /usr/lib/banger.
fn default_guest_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_owned()))
        .filter(|d| d.join("banger-init").is_file())
        .unwrap_or_else(|| "/usr/lib/banger".into())
}

pub async fn run(cmd: InternalCmd) -> Result<u8, CliError> {
    match cmd {
        InternalCmd::MakeBundle {
            rootfs_tar,
            kernel_dir,
            name,
            kernel_ref,
            guest_dir,
            size,
            out,
            json,
        } => {
            let made = tokio::task::spawn_blocking(move || match (rootfs_tar, kernel_dir) {
                (Some(tar), _) => banger_actors::pull::make::image_bundle(
                    &tar,
                    &out,
                    &name,
                    kernel_ref.as_deref(),
                    &guest_dir.unwrap_or_else(default_guest_dir),
                    size,
                ),
                (None, Some(dir)) => banger_actors::pull::make::kernel_bundle(&dir, &out),
                (None, None) => unreachable!("clap requires one"),
            })
            .await
            .map_err(|e| CliError::Other(e.to_string()))?
            .map_err(|e| CliError::Other(banger_actors::vm::actor::error_chain(&e)))?;
            for s in &made.skipped {
                eprintln!("left out {s} (a symlink leaving modules/, or a special file)");
            }
            if json {
                render::json(&serde_json::json!({
                    "path": made.path, "size": made.size, "sha256": made.sha256
                }))?;
            } else {
                outln!(
                    "{}\nsha256: {}\nsize:   {}",
                    made.path.display(),
                    made.sha256,
                    made.size
                );
            }
            Ok(exit::OK)
        }
    }
}
