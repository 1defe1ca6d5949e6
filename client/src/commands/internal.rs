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

/// Run `bangerd --internal-make-bundle` for `request`; its error is ours.
async fn make_bundle(
    request: &banger_api::tools::MakeBundle,
) -> Result<banger_api::tools::MadeBundle, CliError> {
    let bin = crate::connect::bangerd_path();
    let json = serde_json::to_string(request).map_err(|e| CliError::Other(e.to_string()))?;
    let out = tokio::process::Command::new(&bin)
        .arg(banger_api::tools::MAKE_BUNDLE_ARG)
        .arg(json)
        .output()
        .await
        .map_err(|e| {
            CliError::Other(format!(
                "cannot run {} (bangerd makes bundles; install it beside banger): {e}",
                bin.display()
            ))
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("unexpected argument") {
            return Err(CliError::Other(format!(
                "{} is older than this banger (it cannot make bundles): install the bangerd of the same release beside banger",
                bin.display()
            )));
        }
        let reason = stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .map(|l| l.trim_start_matches("bangerd: ").to_owned())
            .unwrap_or_else(|| format!("{} failed ({})", bin.display(), out.status));
        return Err(CliError::Other(reason));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        CliError::Other(format!(
            "{} answered something else than a bundle: {e}",
            bin.display()
        ))
    })
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
            // Bundles are built by the code that unpacks them, which is the daemon's: the
            // CLI links none of it, so bangerd (beside this banger) makes them.
            let request = banger_api::tools::MakeBundle {
                rootfs_tar,
                kernel_dir,
                name,
                kernel_ref,
                guest_dir: guest_dir.unwrap_or_else(default_guest_dir),
                size,
                out,
            };
            let made = make_bundle(&request).await?;
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
