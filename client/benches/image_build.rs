//! `image build` of the default recipe (the catalog's `debian-bookworm`, built through
//! `image pull debian-bookworm --name …`) against the same work done by hand in the same
//! run: `mmdebstrap` of the same package list to a directory (as root, its default mode)
//! and `mkfs.ext4 -d` of that directory into an ext4 of the size banger chose. Both with
//! a warm package cache: the same `.deb` directory through mmdebstrap's sync-in/sync-out
//! hooks (a first, unmeasured build warms it when it is empty).
//!
//! The daemon runs as the `banger-build` user (made by `client/tests/image_build.rs` if
//! missing: bangerd never builds as root); the cache is
//! `/var/cache/banger-rig/image-build-cache` (`BANGER_IMAGE_BUILD_CACHE`). Medians of
//! `BANGER_BENCH_RUNS` runs (default 1: each is a minute or more), and minima. Needs root, mmdebstrap,
//! uidmap, e2fsprogs and a Debian mirror (the host's apt sources, else deb.debian.org).
//! Run: `cargo bench -p banger --bench image_build`.

#![allow(clippy::print_stdout)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BUILD_USER: &str = "banger-build";

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger")).with_file_name(name)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Home {
    dir: tempfile::TempDir,
    cache: PathBuf,
}

impl Home {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("banger"));
        for (k, _) in std::env::vars() {
            if k.starts_with("BANGER_") || k.starts_with("XDG_") || k.starts_with("SUDO_") {
                cmd.env_remove(k);
            }
        }
        let p = self.dir.path();
        cmd.env("HOME", p)
            .env("XDG_RUNTIME_DIR", p.join("run"))
            .env("XDG_DATA_HOME", p.join("data"))
            .env("XDG_STATE_HOME", p.join("state"))
            .env("XDG_CACHE_HOME", &self.cache)
            .env("XDG_CONFIG_HOME", p.join("config"))
            .env("BANGER_SOCKET", p.join("run/banger/bangerd.sock"))
            .args(args);
        cmd
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "banger {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = self.cmd(&["daemon", "stop"]).output();
    }
}

fn main() {
    assert!(nix::unistd::geteuid().is_root(), "run the bench as root");
    let user = nix::unistd::User::from_name(BUILD_USER)
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "no user {BUILD_USER}: run `cargo test -p banger --test image_build` once (it makes it)"
            )
        });
    let runs: usize = std::env::var("BANGER_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let cache = PathBuf::from(
        std::env::var("BANGER_IMAGE_BUILD_CACHE")
            .unwrap_or_else(|_| "/var/cache/banger-rig/image-build-cache".into()),
    );
    let debs = cache.join("banger/debs");
    std::fs::create_dir_all(&debs).unwrap();
    for d in [cache.clone(), cache.join("banger"), debs.clone()] {
        std::os::unix::fs::chown(&d, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(dir.path().join("config/banger")).unwrap();
    // bangerd (as root) hands its own directories to the owner; their parents must let
    // the owner in (as in client/tests/image_build.rs).
    for d in ["run", "data", "state"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
        std::os::unix::fs::chown(
            dir.path().join(d),
            Some(user.uid.as_raw()),
            Some(user.gid.as_raw()),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("config/banger/config.toml"),
        format!(
            "owner = \"{BUILD_USER}\"\ndns_listen = \"127.0.0.1:0\"\n[images]\nguest_binaries_dir = \"{}\"\n",
            repo().join("target/guest").display()
        ),
    )
    .unwrap();
    let home = Home {
        dir,
        cache: cache.clone(),
    };
    let catalog: serde_json::Value =
        serde_json::from_str(&home.ok(&["image", "ls", "--available", "--json"])).unwrap();
    let recipe = catalog
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "debian-bookworm")
        .expect("debian-bookworm in the catalog")["recipe"]
        .clone();
    // The same list banger gives mmdebstrap: the guest's packages, the recipe's, the kernel.
    let mut packages: Vec<String> = [
        "kmod",
        "iproute2",
        "procps",
        "openssh-server",
        "ca-certificates",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let kernel = recipe["kernel_package"]
        .as_str()
        .unwrap_or("linux-image-cloud-amd64")
        .to_owned();
    for p in recipe["packages"].as_array().unwrap() {
        let p = p.as_str().unwrap().to_owned();
        if !packages.contains(&p) {
            packages.push(p);
        }
    }
    packages.push(kernel);

    if std::fs::read_dir(&debs).unwrap().count() < 100 {
        println!("warming the package cache (one unmeasured build)…");
        home.ok(&["image", "pull", "debian-bookworm", "--name", "warm"]);
        home.ok(&["image", "rm", "warm"]);
        home.ok(&["kernel", "rm", "warm"]);
    }

    let mut banger = Vec::new();
    let mut by_hand = Vec::new();
    let mut mirror = String::new();
    for i in 0..runs {
        let name = format!("bench{i}");
        let t = Instant::now();
        home.ok(&["image", "pull", "debian-bookworm", "--name", &name]);
        banger.push(t.elapsed());
        let img: serde_json::Value =
            serde_json::from_str(&home.ok(&["image", "show", &name, "--json"])).unwrap();
        let size = img["size_bytes"].as_u64().unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                Path::new(img["rootfs"].as_str().unwrap()).with_file_name("manifest.json"),
            )
            .unwrap(),
        )
        .unwrap();
        mirror = manifest["mirror"].as_str().unwrap().to_owned();
        home.ok(&["image", "rm", &name]);
        home.ok(&["kernel", "rm", &name]);

        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("root");
        let img = work.path().join("root.ext4");
        let t = Instant::now();
        let st = Command::new("mmdebstrap")
            .args(["--variant=apt", "--quiet"])
            .arg(format!("--include={}", packages.join(",")))
            .arg("--skip=essential/unlink")
            .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
            .arg(format!(
                "--setup-hook=sync-in {} /var/cache/apt/archives/",
                debs.display()
            ))
            .arg(format!(
                "--customize-hook=sync-out /var/cache/apt/archives {}",
                debs.display()
            ))
            .arg("bookworm")
            .arg(&root)
            .arg(&mirror)
            .status()
            .unwrap();
        assert!(st.success(), "mmdebstrap by hand failed");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-d"])
            .arg(&root)
            .arg(&img)
            .status()
            .unwrap();
        assert!(st.success(), "mkfs.ext4 -d failed");
        by_hand.push(t.elapsed());
        // What root synced out: back to the build user, whose cache it is.
        let _ = Command::new("chown")
            .arg("-R")
            .arg(format!("{BUILD_USER}:{BUILD_USER}"))
            .arg(&debs)
            .status();
    }
    // The two alternate in each run, so a load that comes and goes (this is a shared
    // 2-core machine) falls on both; the minimum is the least disturbed of each.
    let min = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let (bmin, hmin) = (min(&banger), min(&by_hand));
    let (b, h) = (median(banger), median(by_hand));
    println!(
        "image build debian-bookworm ({} packages, mirror {mirror}, warm cache, {runs} run(s)): banger median {:.1}s (min {:.1}s), mmdebstrap + mkfs.ext4 -d by hand median {:.1}s (min {:.1}s); ratio of medians {:.2}, of minima {:.2} (target <= 1.15)",
        packages.len(),
        b.as_secs_f64(),
        bmin.as_secs_f64(),
        h.as_secs_f64(),
        hmin.as_secs_f64(),
        b.as_secs_f64() / h.as_secs_f64(),
        bmin.as_secs_f64() / hmin.as_secs_f64()
    );
}
