// Shared by the build scripts of `bangerd` and `banger`: bakes the commit and the build
// time into the binary as BANGER_COMMIT and BANGER_BUILD_TIME. Honors SOURCE_DATE_EPOCH
// for reproducible builds, and BANGER_COMMIT when building outside a git checkout.
use std::process::Command;

fn build_info() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let commit = std::env::var("BANGER_COMMIT").ok().unwrap_or_else(|| {
        Command::new("git")
            .args(["-C", &manifest, "rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".into())
    });
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
    if let Some(git_dir) = Command::new("git")
        .args(["-C", &manifest, "rev-parse", "--absolute-git-dir"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
    {
        let git_dir = git_dir.trim();
        // HEAD, and (below) only the checked-out branch's ref: watching all of refs/heads
        // rebuilt (and re-linked, with LTO: minutes) both binaries whenever any other
        // branch moved, so a second quick start was not quick.
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
    }
    // In a worktree, branch refs live in the common dir, not in the worktree's git dir:
    // watch the checked-out branch's ref there, so a commit refreshes BANGER_COMMIT.
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
    if let (Some(common), Some(head)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        println!("cargo:rerun-if-changed={common}/{head}");
        println!("cargo:rerun-if-changed={common}/packed-refs");
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
