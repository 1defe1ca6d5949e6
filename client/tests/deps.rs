//! The CLI links none of the daemon: no supervision tree (ractor), store (redb) or registry
//! client (oci-client) in its normal dependencies, nor the daemon's crates. (It once
//! depended on banger-actors and bangerd's lib for the update engine, make-bundle and
//! doctor.) Reads the lock file only: `cargo tree --offline --locked`.

use std::process::Command;

#[test]
fn the_cli_links_no_daemon_code() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            "banger",
            "-e",
            "normal",
        ])
        .args(["--prefix", "none", "--manifest-path", manifest])
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(crates.contains(&"banger-update"), "{tree}");
    for daemon_only in ["ractor", "redb", "oci-client", "banger-actors", "bangerd"] {
        assert!(
            !crates.contains(&daemon_only),
            "banger depends on {daemon_only}:\n{tree}"
        );
    }
}
