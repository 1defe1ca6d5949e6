//! An image pulled from a registry boots through the rig and its agent answers. Needs root,
//! the rig (`scripts/rig/setup.sh`), the guest binaries (`scripts/build-guest.sh`) and the
//! registry tools (`scripts/rig/install-deps.sh`): `scripts/test.sh` does all of it.
//!
//! The rig's debootstrap rootfs is dumped with debugfs, tarred into one layer, assembled with
//! umoci and pushed with skopeo to a `docker-registry` the test runs on 127.0.0.1; bangerd
//! pulls it (replay, banger-init/agent injected, mkfs.ext4 -d) and boots it under QEMU.

#[path = "support/guests.rs"]
mod guests;
#[path = "../../service/tests/pulls/mod.rs"]
mod pulls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn rig(key: &str) -> String {
    let dir = std::env::var("BANGER_RIG_DIR").unwrap_or_else(|_| "/var/cache/banger-rig".into());
    let text = std::fs::read_to_string(Path::new(&dir).join("rig.env")).unwrap_or_else(|e| {
        panic!("the rig is not set up ({dir}/rig.env: {e}); run scripts/rig/setup.sh (scripts/test.sh does)")
    });
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_owned())
        .unwrap_or_else(|| panic!("{key} missing from rig.env"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

struct Home {
    dir: tempfile::TempDir,
    /// The guest slot this test holds while it boots (see `support/guests.rs`).
    _slot: guests::Slots,
}

impl Home {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_banger"));
        for (k, _) in std::env::vars() {
            if k.starts_with("BANGER_") || k.starts_with("XDG_") {
                cmd.env_remove(k);
            }
        }
        let p = self.dir.path();
        cmd.env("HOME", p)
            .env("XDG_RUNTIME_DIR", p.join("run"))
            .env("XDG_DATA_HOME", p.join("data"))
            .env("XDG_STATE_HOME", p.join("state"))
            .env("XDG_CACHE_HOME", p.join("cache"))
            .env("XDG_CONFIG_HOME", p.join("config"))
            .env("BANGER_SOCKET", p.join("run/banger/bangerd.sock"))
            .args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "banger {args:?} failed ({:?}): {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = self.run(&["vm", "rm", "-f", "pulled"]);
        let _ = self.run(&["daemon", "stop"]);
    }
}

/// The rig's rootfs as one uncompressed layer tar (owners, modes and links kept).
fn rig_layer(work: &Path) -> Vec<u8> {
    let tree = work.join("rig-tree");
    std::fs::create_dir(&tree).unwrap();
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", tree.display()))
        .arg(rig("BANGER_RIG_ROOTFS"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // rdump puts the root's entries in tree/ itself (named after "/", i.e. nothing).
    let tar = work.join("rig.tar");
    pulls::run(
        "tar",
        &[
            "--numeric-owner",
            "--xattrs",
            "--exclude=./lost+found",
            "-C",
            tree.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ],
    );
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::read(&tar).unwrap()
}

#[test]
fn root_a_pulled_oci_image_boots_and_its_agent_answers() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: run scripts/test.sh as root"
    );
    let guest = repo().join("target/guest");
    assert!(
        guest.join("banger-init").exists() && guest.join("banger-agent").exists(),
        "{} lacks banger-init/banger-agent: run scripts/build-guest.sh (scripts/test.sh does)",
        guest.display()
    );
    let reg = pulls::Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layer = rig_layer(work.path());
    let reference = reg.push(work.path(), "rig/debian", "v1", &[layer], "amd64", false);

    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let cfg = dir.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!(
            "default_vmm = \"qemu\"\nstop_timeout_secs = 30\ndns_listen = \"127.0.0.1:0\"\n[qemu]\naccel = \"tcg\"\nbinary = \"{}\"\n[vm_defaults]\nvcpu = 1\nmemory = \"512M\"\ndisk = \"2G\"\nnetwork = false\n[images]\ninsecure_registries = [\"{}\"]\nguest_binaries_dir = \"{}\"\n",
            rig("BANGER_RIG_QEMU"),
            reg.addr,
            guest.display()
        ),
    )
    .unwrap();
    let home = Home {
        dir,
        _slot: guests::acquire(1),
    };
    let kernel_dir = Path::new(&rig("BANGER_RIG_KERNEL"))
        .parent()
        .unwrap()
        .to_owned();
    home.ok(&[
        "kernel",
        "import",
        "rig",
        "--from",
        kernel_dir.to_str().unwrap(),
    ]);
    let t0 = Instant::now();
    let name = home.ok(&[
        "image",
        "pull",
        &reference,
        "--name",
        "pulled",
        "--kernel-ref",
        "rig",
    ]);
    assert_eq!(name.trim(), "pulled");
    let pull_secs = t0.elapsed().as_secs_f64();

    let t0 = Instant::now();
    let out = home.run(&["vm", "create", "--name", "pulled", "--image", "pulled"]);
    guests::guest_wait(&guests::test_name(), "vm-create", t0.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{err}\n{}",
        home.ok(&["vm", "logs", "pulled"])
    );
    assert!(err.contains("pulled is running"), "{err}");

    // The agent answers, from inside the pulled image.
    let deadline = Instant::now() + Duration::from_secs(60);
    let os = loop {
        let out = home.run(&["vm", "exec", "pulled", "--", "cat", "/etc/os-release"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the agent never answered: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(os.contains("Debian"), "{os}");
    let out = home.run(&["vm", "exec", "pulled", "--", "test", "-e", "/.dockerenv"]);
    assert_eq!(out.status.code(), Some(1), "/.dockerenv is gone");
    home.ok(&["vm", "rm", "-f", "pulled"]);
    #[allow(clippy::print_stderr)]
    {
        eprintln!("pull of the rig image: {pull_secs:.1}s");
    }
}
