//! `banger system install|status|uninstall` against a temporary root prefix (the hidden
//! `--root`), with the real `systemctl --root` (offline, no PID 1 needed), and
//! `systemd-analyze verify` on the unit exactly as installed. Needs root (the files are
//! installed root-owned, `groupadd --prefix` edits the prefix's /etc/group), systemd's
//! tools and `groupadd`; `scripts/rig/install-deps.sh` installs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn banger() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(args: &[&str]) -> Output {
    let mut cmd = Command::new(banger());
    for (k, _) in std::env::vars() {
        if k.starts_with("BANGER_") || k == "SUDO_USER" {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).output().unwrap()
}

/// A root prefix with an owner account.
fn prefix() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    std::fs::write(
        dir.path().join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("etc/group"), "root:x:0:\n").unwrap();
    dir
}

fn systemd_analyze_verify(unit: &Path) -> Output {
    Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .current_dir(unit.parent().unwrap())
        .output()
        .expect(
            "systemd-analyze (Debian's systemd package; scripts/rig/install-deps.sh installs it)",
        )
}

#[test]
fn root_install_status_uninstall_in_a_prefix() {
    let dir = prefix();
    let root = dir.path().to_str().unwrap();
    let out = run(&["system", "install", "--root", root, "--owner", "alice"]);
    assert!(out.status.success(), "install: {}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("bangerd.service") && said.contains("owner alice"),
        "{said}"
    );

    let bin = dir.path().join("usr/local/bin");
    for b in ["banger", "bangerd"] {
        let installed = std::fs::read(bin.join(b)).unwrap();
        let built = std::fs::read(banger().with_file_name(b)).unwrap();
        assert!(installed == built, "{b} is not the built binary");
    }
    // The static guest binaries, from the checkout's target/guest (scripts/build-guest.sh;
    // the dynamic ones beside the test's banger are skipped), go where the installed
    // bangerd looks: /usr/local/bin/../lib/banger.
    let target_guest = banger().parent().unwrap().join("../guest");
    for b in ["banger-init", "banger-agent"] {
        let installed = std::fs::read(dir.path().join("usr/local/lib/banger").join(b)).unwrap();
        assert!(
            installed == std::fs::read(target_guest.join(b)).unwrap(),
            "{b} is not the static build in target/guest"
        );
    }
    let unit = dir.path().join("etc/systemd/system/bangerd.service");
    assert_eq!(
        std::fs::read_to_string(&unit).unwrap(),
        include_str!("../../systemd/bangerd.service")
    );
    // Enabled by the real systemctl, offline.
    let link = dir
        .path()
        .join("etc/systemd/system/multi-user.target.wants/bangerd.service");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("/etc/systemd/system/bangerd.service")
    );
    assert!(
        std::fs::read_to_string(dir.path().join("etc/group"))
            .unwrap()
            .contains("\nbanger:x:")
    );

    let st = run(&["system", "status", "--root", root, "--json"]);
    assert!(st.status.success(), "{}", text(&st.stderr));
    let s: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(s["installed"], true);
    assert_eq!(s["unit_current"], true);
    assert_eq!(s["owner"], "alice");
    assert_eq!(s["enabled"], "enabled");
    assert!(
        s["bangerd"].as_str().unwrap().starts_with("bangerd "),
        "{s}"
    );

    // The unit as installed passes systemd-analyze verify (ExecStart pointed into the
    // prefix, where the binary is: verify checks it exists and is executable).
    let check = dir.path().join("verify/bangerd.service");
    std::fs::create_dir_all(check.parent().unwrap()).unwrap();
    std::fs::write(
        &check,
        std::fs::read_to_string(&unit).unwrap().replace(
            "ExecStart=/usr/local/bin/bangerd",
            &format!("ExecStart={}", bin.join("bangerd").display()),
        ),
    )
    .unwrap();
    let v = systemd_analyze_verify(&check);
    assert!(
        v.status.success() && v.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        text(&v.stdout),
        text(&v.stderr)
    );

    // The user's data survives an uninstall, and uninstall says where it is.
    let data = dir.path().join("var/lib/banger");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("banger.redb"), b"store").unwrap();
    let out = run(&["daemon", "uninstall", "--root", root]);
    assert!(out.status.success(), "uninstall: {}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains(&data.display().to_string()), "{said}");
    assert!(said.contains("kept your data"), "{said}");
    assert!(!unit.exists() && !bin.join("bangerd").exists() && !bin.join("banger").exists());
    assert!(!dir.path().join("usr/local/lib/banger").exists());
    assert!(link.symlink_metadata().is_err(), "still enabled");
    assert_eq!(std::fs::read(data.join("banger.redb")).unwrap(), b"store");
    let st = run(&["system", "status", "--root", root]);
    assert_eq!(st.status.code(), Some(3), "{}", text(&st.stdout));
}

#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    // As shipped, ExecStart names /usr/local/bin/bangerd; point it at the built one.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("bangerd.service");
    std::fs::write(
        &unit,
        include_str!("../../systemd/bangerd.service").replace(
            "ExecStart=/usr/local/bin/bangerd",
            &format!("ExecStart={}", banger().with_file_name("bangerd").display()),
        ),
    )
    .unwrap();
    let v = systemd_analyze_verify(&unit);
    assert!(
        v.status.success() && v.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        text(&v.stdout),
        text(&v.stderr)
    );
    // A broken unit is caught (the check is real).
    std::fs::write(&unit, "[Service]\nExecStart=relative/path\nBogusKey=1\n").unwrap();
    assert!(!systemd_analyze_verify(&unit).stderr.is_empty());
}

#[test]
fn install_without_root_or_owner_is_refused_with_what_to_do() {
    if nix::unistd::geteuid().is_root() {
        // As root: no owner (no SUDO_USER, no --owner) is the refusal to show.
        let out = run(&["system", "install"]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("--owner"),
            "{}",
            text(&out.stderr)
        );
    } else {
        let out = run(&["system", "install", "--owner", "x"]);
        assert_eq!(out.status.code(), Some(5));
        assert!(text(&out.stderr).contains("sudo banger system install"));
    }
}
