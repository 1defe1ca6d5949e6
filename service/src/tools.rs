//! The CLI's local tools that need the daemon's code (see `banger_api::tools`): the `banger`
//! binary links none of the daemon, so it runs this one for them.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use banger_api::tools::{CheckedConfig, MadeBundle, MakeBundle};

use crate::config::Config;

/// `bangerd --check-config`: `config` (loaded and checked by the caller) on stdout.
pub fn print_config(file: Option<&Path>, config: &Config) -> std::io::Result<()> {
    let out = CheckedConfig {
        file: file.map(Path::to_owned),
        file_exists: file.is_some_and(Path::exists),
        config: serde_json::to_value(config).map_err(std::io::Error::other)?,
    };
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &out).map_err(std::io::Error::other)?;
    writeln!(stdout)
}

/// `bangerd --internal-make-bundle '<MakeBundle JSON>'`: make the bundle, print a
/// [`MadeBundle`] on stdout; on failure the reason on stderr and status 1.
pub fn make_bundle(request: &str) -> ExitCode {
    let fail = |message: String| {
        let _ = writeln!(std::io::stderr(), "bangerd: {message}");
        ExitCode::FAILURE
    };
    let req: MakeBundle = match serde_json::from_str(request) {
        Ok(r) => r,
        Err(e) => return fail(format!("not a bundle request: {e}")),
    };
    use banger_actors::pull::make;
    let made = match (&req.rootfs_tar, &req.kernel_dir) {
        (Some(tar), None) => make::image_bundle(
            tar,
            &req.out,
            &req.name,
            req.kernel_ref.as_deref(),
            &req.guest_dir,
            req.size,
        ),
        (None, Some(dir)) => make::kernel_bundle(dir, &req.out),
        _ => return fail("give exactly one of a rootfs tar and a kernel directory".into()),
    };
    match made {
        Ok(m) => {
            let out = MadeBundle {
                path: m.path,
                size: m.size,
                sha256: m.sha256,
                skipped: m.skipped,
            };
            let text = serde_json::to_string(&out).expect("a bundle serialises");
            match writeln!(std::io::stdout(), "{text}") {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("cannot write the answer: {e}")),
            }
        }
        Err(e) => fail(banger_error::error_chain(&e)),
    }
}
