//! Resume from suspend against a cold boot, on the same real guest in the same run: `vm
//! start` of a stopped VM (a boot, to agent-ready: `vm start` answers once the agent
//! does) and `vm start` of a suspended one (a restore, to agent-ready), interleaved, with
//! the ratio (the target: a restore at most a tenth of a boot). Also `vm suspend`'s
//! time and the saved state's allocated size, and `vm snapshot create` (time, size) and
//! `vm rollback` of the running guest with ~100 MiB in use, against the same cold boot;
//! and `vm fork --count 4` of it against four `vm create`s; and a warm `vm run --rm --
//! true` (restored from the image's warm snapshot, `image warm`) against a cold one
//! (`--cold`), interleaved.
//!
//! Needs root, the test rig (`scripts/rig/setup.sh`) and the static guest binaries
//! (`scripts/build-guest.sh`), like `client/tests/vm_qemu.rs`; the guest runs under
//! QEMU/TCG, so absolute figures are the emulator's; the ratio is the point.
//! Run: `cargo build --release -p bangerd && cargo bench -p banger --bench suspend`
//! (`BANGER_BENCH_RUNS`, default 3 of each).

#![allow(clippy::print_stdout)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger")).with_file_name(name)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn rig() -> std::collections::HashMap<String, String> {
    let dir = std::env::var("BANGER_RIG_DIR").unwrap_or_else(|_| "/var/cache/banger-rig".into());
    std::fs::read_to_string(Path::new(&dir).join("rig.env"))
        .unwrap_or_else(|e| panic!("the rig is not set up ({dir}/rig.env: {e})"))
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

struct Home(tempfile::TempDir);

impl Home {
    fn env(&self, cmd: &mut Command) {
        for (k, _) in std::env::vars() {
            if k.starts_with("BANGER_") || k.starts_with("XDG_") {
                cmd.env_remove(k);
            }
        }
        let p = self.0.path();
        cmd.env("HOME", p)
            .env("XDG_RUNTIME_DIR", p.join("run"))
            .env("XDG_DATA_HOME", p.join("data"))
            .env("XDG_STATE_HOME", p.join("state"))
            .env("XDG_CACHE_HOME", p.join("cache"))
            .env("XDG_CONFIG_HOME", p.join("config"))
            .env("BANGER_SOCKET", p.join("run/banger/bangerd.sock"));
    }

    fn ok(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(bin("banger"));
        self.env(&mut cmd);
        let out = cmd.args(args).output().unwrap();
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
        let mut cmd = Command::new(bin("banger"));
        self.env(&mut cmd);
        let _ = cmd.args(["vm", "rm", "-f", "bench"]).output();
        // The fork's clones, if a run stopped half-way (their VMMs outlive the daemon).
        for i in 1..=4 {
            let mut cmd = Command::new(bin("banger"));
            self.env(&mut cmd);
            let _ = cmd.args(["vm", "rm", "-f", &format!("bench-{i}")]).output();
        }
        let mut cmd = Command::new(bin("banger"));
        self.env(&mut cmd);
        let _ = cmd.args(["daemon", "stop"]).output();
    }
}

fn setup() -> Home {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root, as the rig's tests"
    );
    let rig = rig();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let cfg = dir.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!(
            "default_vmm = \"qemu\"\ndefault_image_name = \"rig\"\ndns_listen = \"127.0.0.1:0\"\n[qemu]\naccel = \"tcg\"\nbinary = \"{}\"\n[vm_defaults]\nvcpu = 1\nmemory = \"512M\"\ndisk = \"2G\"\nnetwork = false\n",
            rig["BANGER_RIG_QEMU"]
        ),
    )
    .unwrap();
    // The rig's rootfs with banger-init and banger-agent injected (as vm_qemu.rs does).
    let img = dir.path().join("rootfs.ext4");
    assert!(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&rig["BANGER_RIG_ROOTFS"])
            .arg(&img)
            .status()
            .unwrap()
            .success()
    );
    let guest = repo().join("target/guest");
    for cmd in [
        "mkdir /usr/lib/banger".to_owned(),
        format!(
            "write {}/banger-init /usr/lib/banger/banger-init",
            guest.display()
        ),
        "sif /usr/lib/banger/banger-init mode 0100755".to_owned(),
        format!(
            "write {}/banger-agent /usr/lib/banger/banger-agent",
            guest.display()
        ),
        "sif /usr/lib/banger/banger-agent mode 0100755".to_owned(),
    ] {
        let out = Command::new("debugfs")
            .args(["-w", "-R", &cmd])
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "debugfs {cmd}");
    }
    let home = Home(dir);
    let kernel_dir = Path::new(&rig["BANGER_RIG_KERNEL"])
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
    home.ok(&[
        "image",
        "register",
        "rig",
        img.to_str().unwrap(),
        "--kernel",
        "rig",
    ]);
    home
}

fn timed(home: &Home, args: &[&str]) -> Duration {
    let t0 = Instant::now();
    home.ok(args);
    t0.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("BANGER_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let home = setup();
    home.ok(&["vm", "create", "--name", "bench", "--no-start"]);
    let dir = PathBuf::from(
        serde_json::from_str::<serde_json::Value>(&home.ok(&["vm", "show", "bench", "--json"]))
            .unwrap()["dir"]
            .as_str()
            .unwrap(),
    );
    // The first boot does first-boot work (ssh host keys): not a steady cold start.
    home.ok(&["vm", "start", "bench"]);
    home.ok(&["vm", "stop", "bench"]);
    let (mut cold, mut restore, mut suspend, mut state) = (vec![], vec![], vec![], 0u64);
    for _ in 0..runs {
        cold.push(timed(&home, &["vm", "start", "bench"]));
        suspend.push(timed(&home, &["vm", "suspend", "bench"]));
        let f = std::fs::metadata(dir.join("state/vm.state")).unwrap();
        state = std::os::unix::fs::MetadataExt::blocks(&f) * 512;
        restore.push(timed(&home, &["vm", "start", "bench"]));
        home.ok(&["vm", "stop", "bench"]);
    }
    let (c, r, s) = (median(cold), median(restore), median(suspend));
    println!("suspend/restore, 512 MiB guest under TCG, {runs} runs each (medians):");
    println!("  cold vm start to agent-ready   {:8.3} s", c.as_secs_f64());
    println!("  vm start of a suspended vm     {:8.3} s", r.as_secs_f64());
    println!("  vm suspend                     {:8.3} s", s.as_secs_f64());
    println!("  saved state allocated          {:8} MiB", state >> 20);
    println!(
        "  restore / cold boot            {:8.3}  (target <= 0.100)",
        r.as_secs_f64() / c.as_secs_f64()
    );

    // Named snapshots of the running guest with ~100 MiB in use (a tmpfs file of random
    // bytes), and rollbacks to one: against the cold boot above, what a user without
    // snapshots would do to get a clean machine back.
    home.ok(&["vm", "start", "bench"]);
    home.ok(&[
        "vm",
        "exec",
        "bench",
        "--",
        "sh",
        "-c",
        "mkdir -p /run/fill && head -c 100M /dev/urandom > /run/fill/f",
    ]);
    let (mut snap, mut rollback, mut bytes) = (vec![], vec![], 0u64);
    for i in 0..runs {
        let name = format!("s{i}");
        let t0 = Instant::now();
        let out = home.ok(&["vm", "snapshot", "create", "bench", &name, "--json"]);
        snap.push(t0.elapsed());
        bytes = serde_json::from_str::<serde_json::Value>(&out).unwrap()["bytes"]
            .as_u64()
            .unwrap();
        rollback.push(timed(&home, &["vm", "rollback", "bench", &name]));
    }
    let (sn, rb) = (median(snap), median(rollback));
    println!("snapshots of the running 512 MiB guest, ~100 MiB in a tmpfs, {runs} runs (medians):");
    println!(
        "  vm snapshot create             {:8.3} s",
        sn.as_secs_f64()
    );
    println!("  snapshot allocated             {:8} MiB", bytes >> 20);
    println!(
        "  vm rollback to agent-ready     {:8.3} s",
        rb.as_secs_f64()
    );
    println!(
        "  rollback / cold boot           {:8.3}",
        rb.as_secs_f64() / c.as_secs_f64()
    );

    // `vm fork --count 4` of the running guest against what a user without forks does to
    // get four machines: four `vm create`s, one after another (each a cold boot to
    // agent-ready on a fresh disk).
    let clones: Vec<String> = (1..=4).map(|i| format!("bench-{i}")).collect();
    let (mut fork, mut creates) = (vec![], vec![]);
    for _ in 0..runs {
        fork.push(timed(&home, &["vm", "fork", "bench", "--count", "4"]));
        for c in &clones {
            home.ok(&["vm", "rm", "-f", c]);
        }
        let t0 = Instant::now();
        for c in &clones {
            home.ok(&["vm", "create", "--name", c]);
        }
        creates.push(t0.elapsed());
        for c in &clones {
            home.ok(&["vm", "rm", "-f", c]);
        }
    }
    let (f, cr) = (median(fork), median(creates));
    println!("forks of the running 512 MiB guest, ~100 MiB in a tmpfs, {runs} runs (medians):");
    println!("  vm fork --count 4 to running   {:8.3} s", f.as_secs_f64());
    println!(
        "  4 x vm create (cold boots)     {:8.3} s",
        cr.as_secs_f64()
    );
    println!(
        "  fork / creates                 {:8.3}",
        f.as_secs_f64() / cr.as_secs_f64()
    );
    home.ok(&["vm", "rm", "-f", "bench"]);

    // `vm run --rm -- true` as a user runs it: a cold one (a boot, waited for until the
    // guest's services are up, the command, the delete) against a warm one (a restore of
    // the image's warm snapshot, its identity taken, the command, the delete).
    let t0 = Instant::now();
    home.ok(&["image", "warm", "rig"]);
    let made = t0.elapsed();
    let (mut cold, mut warm) = (vec![], vec![]);
    for _ in 0..runs {
        cold.push(timed(&home, &["vm", "run", "--rm", "--cold", "--", "true"]));
        warm.push(timed(&home, &["vm", "run", "--rm", "--", "true"]));
    }
    let (c, w) = (median(cold), median(warm));
    println!("warm starts of the 512 MiB guest, {runs} runs each (medians):");
    println!(
        "  image warm (once)              {:8.3} s",
        made.as_secs_f64()
    );
    println!("  vm run --rm --cold -- true     {:8.3} s", c.as_secs_f64());
    println!("  vm run --rm -- true (warm)     {:8.3} s", w.as_secs_f64());
    println!(
        "  warm / cold                    {:8.3}",
        w.as_secs_f64() / c.as_secs_f64()
    );
}
