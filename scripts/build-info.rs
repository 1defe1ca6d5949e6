// Shared by the build scripts of `bangerd` and `banger`: bakes the commit and the build
// time into the binary as BANGER_COMMIT and BANGER_BUILD_TIME. Honors SOURCE_DATE_EPOCH
// for reproducible builds, and BANGER_COMMIT when building outside a git checkout.
use std::process::Command;

fn build_info() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let git = |args: &[&str]| {
        Command::new("git")
            .args(["-C", &manifest])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
    };
    let commit = std::env::var("BANGER_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=BANGER_COMMIT={commit}");
    println!("cargo:rustc-env=BANGER_BUILD_TIME={}", rfc3339(secs));
    // What moves when HEAD does: HEAD itself (a checkout), HEAD's reflog (every commit,
    // reset or checkout appends to it), and the checked-out branch's ref, loose or packed.
    // Only paths that exist are watched: cargo treats a missing one as always stale, so
    // watching `packed-refs` in a repository without one re-ran this script, and re-linked
    // both binaries (minutes with LTO), on every build. Nothing else under refs/ is
    // watched, so another branch moving (a worktree's commit) rebuilds nothing.
    let mut watch = Vec::new();
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        watch.push(format!("{git_dir}/HEAD"));
        watch.push(format!("{git_dir}/logs/HEAD"));
    }
    // In a worktree, branch refs live in the common dir, not in the worktree's git dir.
    if let Some(common) = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]) {
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(format!("{common}/{head}"));
        }
        watch.push(format!("{common}/packed-refs"));
    }
    for path in watch {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-env-changed=BANGER_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, H. Hinnant).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}
