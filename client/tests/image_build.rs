//! `banger image build` end to end: mmdebstrap against Debian's real mirror, the built
//! image booted under the rig (QEMU microvm under TCG) with its agent as the probe; and
//! the failures (an unknown suite, a mirror that does not answer, a package that does not
//! exist, a cut download) against a mirror proxy this test runs, and a full disk (a small
//! tmpfs as the data dir).
//!
//! They need root (the daemon drops to a dedicated unprivileged user, `banger-build`,
//! with a subordinate id range, made here if missing: bangerd never builds as root, see
//! `actors/src/pull/build.rs`), mmdebstrap and uidmap, the rig (`scripts/rig/setup.sh`)
//! and static guest binaries (`scripts/build-guest.sh`); without them they fail, loudly.
//! Downloaded packages are kept in `/var/cache/banger-rig/image-build-cache` across runs
//! (`BANGER_IMAGE_BUILD_CACHE` overrides), so a warm run downloads only the indexes.
#![allow(clippy::print_stderr)] // the build and boot times are reported, not asserted

#[path = "support/guests.rs"]
mod guests;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The unprivileged user the test daemons run as.
const BUILD_USER: &str = "banger-build";

/// One build at a time: the machine is shared and the package cache is one directory.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_banger")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace",
        p.display()
    );
    p
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn rig() -> &'static std::collections::HashMap<String, String> {
    static RIG: OnceLock<std::collections::HashMap<String, String>> = OnceLock::new();
    RIG.get_or_init(|| {
        let dir = std::env::var("BANGER_RIG_DIR").unwrap_or_else(|_| "/var/cache/banger-rig".into());
        let text = std::fs::read_to_string(Path::new(&dir).join("rig.env")).unwrap_or_else(|e| {
            panic!("the rig is not set up ({dir}/rig.env: {e}); run scripts/rig/setup.sh (scripts/test.sh does)")
        });
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (uid, gid) of the build user, made (with a subordinate id range, as `useradd` gives a
/// normal user) when missing.
fn build_user() -> (u32, u32) {
    static USER: OnceLock<(u32, u32)> = OnceLock::new();
    *USER.get_or_init(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "image build tests need root: run scripts/test.sh as root"
        );
        for tool in ["mmdebstrap", "newuidmap"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .unwrap()
                    .status
                    .success(),
                "{tool} is missing: apt-get install mmdebstrap uidmap"
            );
        }
        if nix::unistd::User::from_name(BUILD_USER).unwrap().is_none() {
            run_ok(Command::new("useradd").args([
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "banger image-build tests",
                BUILD_USER,
            ]));
        }
        let u = nix::unistd::User::from_name(BUILD_USER).unwrap().unwrap();
        let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
        if !subuid
            .lines()
            .any(|l| l.starts_with(&format!("{BUILD_USER}:")))
        {
            run_ok(Command::new("usermod").args([
                "--add-subuids",
                "300000-365535",
                "--add-subgids",
                "300000-365535",
                BUILD_USER,
            ]));
        }
        (u.uid.as_raw(), u.gid.as_raw())
    })
}

/// The persistent package cache (as banger's cache dir: the `.deb`s are in `debs/`).
fn persistent_cache() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("BANGER_IMAGE_BUILD_CACHE")
            .unwrap_or_else(|_| "/var/cache/banger-rig/image-build-cache".into()),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let (uid, gid) = build_user();
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    dir
}

struct Home {
    dir: tempfile::TempDir,
    cache: PathBuf,
}

impl Home {
    /// A daemon home whose daemon runs as the build user, with QEMU under TCG, and banger's
    /// cache dir at `cache`.
    fn new(cache: &Path, extra: &str) -> Home {
        let (uid, gid) = build_user();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for d in ["run", "config/banger", "bin", "data", "state"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        // bangerd hands its own directories to the owner; their parents must let it in.
        for d in ["run", "data", "state"] {
            std::os::unix::fs::chown(dir.path().join(d), Some(uid), Some(gid)).unwrap();
        }
        let guest = repo().join("target/guest");
        for b in ["banger-init", "banger-agent"] {
            assert!(
                guest.join(b).exists(),
                "{} is missing: run scripts/build-guest.sh (scripts/test.sh does)",
                guest.join(b).display()
            );
        }
        std::fs::write(
            dir.path().join("config/banger/config.toml"),
            format!(
                "owner = \"{BUILD_USER}\"\ndefault_vmm = \"qemu\"\nagent_timeout_secs = 300\nstop_timeout_secs = 30\ndns_listen = \"127.0.0.1:0\"\n[qemu]\naccel = \"tcg\"\nbinary = \"{}\"\n[vm_defaults]\nvcpu = 1\nmemory = \"512M\"\ndisk = \"2G\"\nnetwork = false\n[images]\nguest_binaries_dir = \"{}\"\n{extra}",
                rig()["BANGER_RIG_QEMU"],
                guest.display(),
            ),
        )
        .unwrap();
        std::os::unix::fs::chown(cache, Some(uid), Some(gid)).unwrap();
        Home {
            dir,
            cache: cache.to_owned(),
        }
    }

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

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "banger {args:?} failed ({:?}): {}{}\n--- the end of bangerd.log ---\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("state/banger/bangerd.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn images_dir(&self) -> PathBuf {
        self.dir.path().join("data/banger/images")
    }

    /// Nothing in staging, no image or kernel recorded, and the daemon answers.
    fn assert_clean(&self, what: &str) {
        let left: Vec<String> = std::fs::read_dir(self.images_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            left.is_empty(),
            "{what}: left in {}: {left:?}",
            self.images_dir().display()
        );
        let kernels: Vec<String> = std::fs::read_dir(self.dir.path().join("data/banger/kernels"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(kernels.is_empty(), "{what}: kernels left: {kernels:?}");
        assert_eq!(
            self.json(&["image", "ls", "--json"]),
            serde_json::json!([]),
            "{what}"
        );
        assert_eq!(
            self.json(&["kernel", "ls", "--json"]),
            serde_json::json!([]),
            "{what}"
        );
        assert!(
            self.json(&["daemon", "status", "--json"])["pid"]
                .as_i64()
                .is_some()
        );
    }

    /// `image build` that must fail: its stderr.
    fn build_fails(&self, args: &[&str]) -> String {
        let mut all = vec!["image", "build"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{all:?} succeeded: {err}");
        err
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Ok(out) = self.cmd(&["vm", "ls", "--json"]).output()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        {
            for vm in v.as_array().into_iter().flatten() {
                let _ = self.run(&["vm", "rm", "-f", vm["name"].as_str().unwrap_or("")]);
            }
        }
        let _ = self.run(&["daemon", "stop"]);
    }
}

#[test]
fn root_image_build_boots_its_own_kernel_on_a_real_guest() {
    let _serial = serial();
    // It boots one guest (support/guests.rs).
    let _slot = guests::acquire(1);
    let home = Home::new(&persistent_cache(), "");
    let t0 = Instant::now();
    // systemd as the init, as in the catalog's recipes (see the `vm run` below).
    let out = home.run(&[
        "image",
        "build",
        "tiny",
        "--include",
        "systemd-sysv",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "image build failed: {err}\n{}",
        home.log_tail(40)
    );
    let built = t0.elapsed();
    let img: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(img["name"], "tiny");
    assert_eq!(
        img["kernel"], "tiny",
        "the kernel record is named after the image"
    );
    let kernel = home.json(&["kernel", "show", "tiny", "--json"]);
    assert!(kernel["initrd"].as_str().is_some(), "{kernel}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.images_dir().join("tiny/manifest.json")).unwrap(),
    )
    .unwrap();
    let version = manifest["kernel_version"].as_str().unwrap().to_owned();
    assert!(version.ends_with("-cloud-amd64"), "{manifest}");
    assert_eq!(
        manifest["mirror"], "http://deb.debian.org/debian",
        "the host's apt sources"
    );
    // The cache holds the packages for the next build.
    let debs = std::fs::read_dir(home.cache.join("banger/debs"))
        .unwrap()
        .count();
    assert!(debs > 50, "only {debs} packages cached");

    let t1 = Instant::now();
    home.ok(&["vm", "create", "--name", "b", "--image", "tiny"]);
    let booted = t1.elapsed();
    let uname = home.ok(&["vm", "exec", "b", "--", "uname", "-r"]);
    assert_eq!(uname.trim(), version, "the guest runs the built kernel");
    home.ok(&[
        "vm",
        "exec",
        "b",
        "--",
        "test",
        "-f",
        &format!("/lib/modules/{version}/modules.dep"),
    ]);
    // Per-image identity is not baked in: openssh-server's postinst made host keys in the
    // build, and they are gone (banger-init makes the VM's own).
    let keys = home.ok(&["vm", "exec", "b", "--", "ls", "/etc/ssh"]);
    for k in ["ssh_host_rsa_key", "ssh_host_ecdsa_key"] {
        assert!(!keys.contains(k), "{k} baked into the image: {keys}");
    }
    let resolv = home.ok(&["vm", "exec", "b", "--", "cat", "/etc/resolv.conf"]);
    assert!(
        !resolv.contains("nameserver"),
        "the build host's resolvers: {resolv}"
    );
    home.ok(&["vm", "rm", "-f", "b"]);

    // `vm run` runs its command on a booted machine: the agent answers seconds before
    // systemd is PID 1, let alone done with its start-up jobs (then `systemctl` says
    // "offline" or "starting"), so it waits for the boot to finish first.
    let out = home.run(&[
        "vm",
        "run",
        "--rm",
        "--no-network",
        "--timings",
        "--image",
        "tiny",
        "--",
        "systemctl",
        "is-system-running",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(stdout.trim(), "running", "{stderr}");
    assert!(out.status.success(), "{stderr}");
    let timings = stderr
        .lines()
        .find(|l| l.starts_with("timings:"))
        .unwrap_or_default();
    assert!(timings.contains(" services "), "{stderr}");
    eprintln!("vm run -- systemctl is-system-running: {timings}");
    eprintln!(
        "image build tiny: {:.1}s; vm create (TCG boot to agent): {:.1}s",
        built.as_secs_f64(),
        booted.as_secs_f64()
    );
}

/// A mirror proxy in front of deb.debian.org: every request is fetched whole from there,
/// and a package whose path contains `cut` is served with half its body, then the
/// connection is closed.
struct Proxy {
    port: u16,
}

impl Proxy {
    fn start(cut: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = serve(conn, cut);
                });
            }
        });
        Proxy { port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/debian", self.port)
    }
}

fn serve(conn: TcpStream, cut: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    let mut up = TcpStream::connect("deb.debian.org:80")?;
    up.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        up,
        "GET {path} HTTP/1.1\r\nHost: deb.debian.org\r\nUser-Agent: banger-test\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(resp.len());
    let (head, body) = resp.split_at(split);
    let head = String::from_utf8_lossy(head);
    let mut out = conn;
    let mut head: String = head
        .lines()
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    head.push_str("Connection: close\r\n\r\n");
    out.write_all(head.as_bytes())?;
    if !cut.is_empty() && path.contains(cut) {
        out.write_all(&body[..body.len() / 2])?;
    } else {
        out.write_all(body)?;
    }
    out.flush()
}

/// A closed port: bound, then released.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn root_image_build_failures_name_their_cause_and_leave_nothing() {
    let _serial = serial();
    let proxy = Proxy::start("/base-files_");
    // mmdebstrap resolves --include after the essential set is in: this one cuts nothing.
    let whole = Proxy::start("");
    // The packages of earlier builds, all but base-files: the one the proxy cuts must be
    // downloaded, and only it.
    let cache = tempfile::tempdir().unwrap();
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let warm = persistent_cache().join("banger/debs");
    let debs = cache.path().join("banger/debs");
    std::fs::create_dir_all(&debs).unwrap();
    let (uid, gid) = build_user();
    for d in [cache.path().join("banger"), debs.clone()] {
        std::os::unix::fs::chown(&d, Some(uid), Some(gid)).unwrap();
    }
    for e in std::fs::read_dir(&warm).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".deb") && !n.starts_with("base-files_") {
            std::fs::hard_link(e.path(), debs.join(&n))
                .or_else(|_| std::fs::copy(e.path(), debs.join(&n)).map(|_| ()))
                .unwrap();
        }
    }
    let home = Home::new(cache.path(), "");

    let err = home.build_fails(&["bad", "--suite", "nosuchsuite", "--mirror", &proxy.url()]);
    assert!(
        err.contains("the suite \"nosuchsuite\" is not on") && err.contains(&proxy.url()),
        "{err}"
    );
    home.assert_clean("unknown suite");

    let closed = format!("http://127.0.0.1:{}/debian", closed_port());
    let err = home.build_fails(&["bad", "--mirror", &closed]);
    assert!(
        err.contains(&format!("the mirror {closed} does not answer")),
        "{err}"
    );
    home.assert_clean("closed port");

    let err = home.build_fails(&[
        "bad",
        "--include",
        "banger-no-such-package",
        "--mirror",
        &whole.url(),
    ]);
    assert!(
        err.contains("there is no package \"banger-no-such-package\" in bookworm")
            && err.contains(&whole.url()),
        "{err}"
    );
    home.assert_clean("unknown package");

    let err = home.build_fails(&["bad", "--mirror", &proxy.url()]);
    assert!(
        err.contains("a package download from") && err.contains("base-files"),
        "{err}"
    );
    home.assert_clean("cut download");

    // Input that never reaches mmdebstrap.
    let err = home.build_fails(&["bad", "--include", "x,--force-yes"]);
    assert!(err.contains("invalid package name"), "{err}");
    let err = home.build_fails(&["bad", "--mirror", "ftp://mirror/debian"]);
    assert!(err.contains("invalid mirror"), "{err}");
    home.assert_clean("bad input");
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn root_image_build_on_a_full_disk_fails_clearly_and_leaves_nothing() {
    let _serial = serial();
    let cache = persistent_cache();
    let home = Home::new(&cache, "");
    let (uid, gid) = build_user();
    let data = home.dir.path().join("data");
    run_ok(Command::new("mount").args([
        "-t",
        "tmpfs",
        "-o",
        &format!("size=96m,mode=0755,uid={uid},gid={gid}"),
        "banger-test-full",
        data.to_str().unwrap(),
    ]));
    let _guard = Mounted(data.clone());
    let err = home.build_fails(&["full"]);
    assert!(
        err.contains("no space left on the disk holding") && err.contains(data.to_str().unwrap()),
        "{err}\n{}",
        home.log_tail(20)
    );
    home.assert_clean("full disk");
    let _ = home.run(&["daemon", "stop"]);
}

#[test]
fn root_a_root_daemon_without_an_owner_refuses_to_build() {
    // No owner: bangerd started as root drops to root without capabilities, and
    // mmdebstrap cannot build unprivileged there.
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new(dir.path(), "");
    let cfg = home.dir.path().join("config/banger/config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(&format!("owner = \"{BUILD_USER}\"\n"), ""),
    )
    .unwrap();
    let err = home.build_fails(&["x"]);
    assert!(
        err.contains("bangerd runs as root") && err.contains("owner = "),
        "{err}"
    );
    home.assert_clean("root daemon");
}

/// (pid, parent pid, process group) of every process, by /proc/<pid>/stat.
fn processes() -> Vec<(i32, i32, i32)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command's `(…) `: state, ppid, pgrp.
        let rest: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
        if let (Some(Ok(ppid)), Some(Ok(pgrp))) = (
            rest.get(1).map(|s| s.parse()),
            rest.get(2).map(|s| s.parse()),
        ) {
            v.push((pid, ppid, pgrp));
        }
    }
    v
}

/// `daemon stop` during a build: its mmdebstrap (its whole process group) stops with the
/// daemon instead of running on to the end of the build, and nothing is published (before,
/// the daemon's exit waited for the build, which then published an image no one waited
/// for). A daemon killed mid-build is the start-up sweep's (pull/staging.rs unit test).
#[test]
fn root_image_build_stops_with_its_daemon_and_publishes_nothing() {
    let _serial = serial();
    let home = Home::new(&persistent_cache(), "");
    home.ok(&["image", "ls"]);
    let daemon = home.json(&["daemon", "status", "--json"])["pid"]
        .as_i64()
        .unwrap() as i32;
    let mut build = home
        .cmd(&["image", "build", "stopped"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let group = loop {
        let mm = processes().into_iter().find(|&(pid, ppid, _)| {
            ppid == daemon
                && std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.contains("mmdebstrap"))
        });
        if let Some((pid, _, _)) = mm {
            break pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no mmdebstrap started"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Into its package installation (its namespace's processes started).
    while processes().iter().filter(|p| p.2 == group).count() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "mmdebstrap did not get going"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    home.ok(&["daemon", "stop"]);
    let _ = build.wait();
    let stopped = Instant::now();
    while processes().iter().any(|p| p.2 == group || p.0 == daemon) {
        assert!(
            stopped.elapsed() < Duration::from_secs(120),
            "the build (or its daemon) ran on"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "build and daemon gone {:?} after the stop",
        stopped.elapsed()
    );
    assert!(
        home.log_tail(20)
            .contains("the daemon is stopping: stopping an image build"),
        "{}",
        home.log_tail(20)
    );
    home.assert_clean("a build stopped with its daemon");
}
