//! End-to-end tests of the `banger` and `bangerd` binaries as a user runs them: real
//! processes, real sockets, isolated XDG directories in a tempdir.
//!
//! `bangerd` is found beside `banger` in the target directory, as the CLI itself finds it
//! for auto-start: run these through `cargo test --workspace` (the README's test command).
//! Tests whose names start with `root_` need root (they switch uid) and fail without it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn bangerd_bin() -> PathBuf {
    let p = banger_bin().with_file_name("bangerd");
    assert!(
        p.exists(),
        "{} is missing: build the workspace (cargo test --workspace)",
        p.display()
    );
    p
}

/// An isolated home for one test; kills any daemon it started when dropped.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        Home { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn socket(&self) -> PathBuf {
        self.path().join("run/banger/bangerd.sock")
    }

    fn store(&self) -> PathBuf {
        self.path().join("data/banger/banger.redb")
    }

    fn lock(&self) -> PathBuf {
        self.path().join("data/banger/bangerd.lock")
    }

    fn env(&self, cmd: &mut Command) {
        for (k, _) in std::env::vars() {
            if k.starts_with("BANGER_") || k.starts_with("XDG_") {
                cmd.env_remove(k);
            }
        }
        let p = self.path();
        cmd.env("HOME", p)
            .env("XDG_RUNTIME_DIR", p.join("run"))
            .env("XDG_DATA_HOME", p.join("data"))
            .env("XDG_STATE_HOME", p.join("state"))
            .env("XDG_CACHE_HOME", p.join("cache"))
            .env("XDG_CONFIG_HOME", p.join("config"))
            .env("BANGER_SOCKET", self.socket())
            // Many test daemons run at once: each resolver on a free port.
            .env("BANGER_DNS_LISTEN", "127.0.0.1:0")
            // Never the host's own network: network tests make their own namespaces.
            .env("BANGER_VM_DEFAULTS__NETWORK", "false");
    }

    fn banger(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(banger_bin());
        self.env(&mut cmd);
        cmd.args(args).output().unwrap()
    }

    fn bangerd(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bangerd_bin());
        self.env(&mut cmd);
        cmd.args(args).output().unwrap()
    }

    fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.lock())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Some(pid) = self.daemon_pid() {
            let pid = nix::unistd::Pid::from_raw(pid);
            if nix::sys::signal::kill(pid, None).is_ok() && is_bangerd(pid.as_raw()) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        // VMMs outlive their daemon by design: a test that failed before deleting its VMs
        // would leave them running (every one names this home in its command line).
        kill_processes_naming(self.path());
    }
}

/// SIGKILL every process other than this one whose command line contains `dir`.
fn kill_processes_naming(dir: &Path) {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        if pid != me && cmdline.windows(needle.len()).any(|w| w == needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn is_bangerd(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "bangerd")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `daemon restart` restarts the daemon that serves, here a user daemon: a new process
/// answers on the same socket. (It ran `systemctl restart bangerd.service` whatever
/// served, which fails for a user daemon, or restarts another daemon than the one in use.)
/// With none running it starts one.
#[test]
fn daemon_restart_restarts_the_user_daemon_that_serves() {
    let home = Home::new();
    let pid = |home: &Home| {
        let out = home.banger(&["daemon", "status", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stdout));
        json(&out)["pid"].as_i64().unwrap() as i32
    };
    let out = home.banger(&["daemon", "restart"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("was not running"),
        "{}",
        text(&out.stdout)
    );
    let first = pid(&home);
    let out = home.banger(&["daemon", "restart"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second = pid(&home);
    assert_ne!(first, second, "a new daemon");
    // Gone, or a zombie its parent (long exited; reparented) has not reaped yet.
    let state = std::fs::read_to_string(format!("/proc/{first}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .map(|(_, r)| r[..1].to_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    assert!(
        matches!(state.as_str(), "" | "Z" | "X"),
        "the old one is gone: {state}"
    );
    assert!(is_bangerd(second));
    assert!(
        text(&out.stdout).contains(&format!("pid {first} stopped")),
        "{}",
        text(&out.stdout)
    );
    home.banger(&["daemon", "stop"]);
}

#[test]
fn version_flag_and_command() {
    let home = Home::new();
    let out = home.banger(&["--version"]);
    assert!(out.status.success());
    let s = text(&out.stdout);
    assert!(
        s.contains(env!("CARGO_PKG_VERSION")) && s.contains("commit") && s.contains("built"),
        "{s}"
    );

    let out = home.banger(&["version", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["client"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["client"]["build_time"].as_str().unwrap().ends_with('Z'));
    assert!(
        v["daemon"].is_null(),
        "no daemon was started for `version`: {v}"
    );
    assert!(!home.socket().exists());
}

#[test]
fn completion_scripts() {
    let home = Home::new();
    // bash, zsh and fish ask `banger __complete` (see `completion_is_live_in_bash`, and
    // `docker_conventions_on_double_vms` for zsh).
    for shell in ["bash", "zsh", "fish"] {
        let out = home.banger(&["completion", shell]);
        assert!(out.status.success(), "{shell}");
        let s = text(&out.stdout);
        assert!(s.contains("banger __complete"), "{shell}: {s}");
    }
    let s = text(&home.banger(&["completion", "zsh"]).stdout);
    assert!(s.starts_with("#compdef banger\n"), "{s}");
    let out = home.banger(&["completion", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "unknown shell is a usage error");
}

/// `banger completion bash` completes from the daemon: bash itself runs the script's
/// completion function, as it does on TAB (COMP_WORDS/COMP_CWORD set, `_banger` called,
/// COMPREPLY read), with `banger` on its PATH. VM, image and kernel names come from the
/// running daemon; hidden commands are never offered; with the daemon stopped a
/// completion is silent and starts nothing.
#[test]
fn completion_is_live_in_bash() {
    let home = Home::new();
    let work = home.path().join("work");
    std::fs::create_dir_all(work.join("kernel")).unwrap();
    std::fs::write(
        work.join("kernel/vmlinux"),
        banger_actors::kernel_format::fixture::minimal_elf(4096),
    )
    .unwrap();
    let rootfs = work.join("rootfs.ext4");
    banger_rootfs(&rootfs);
    for args in [
        &[
            "kernel",
            "import",
            "cloud",
            "--from",
            work.join("kernel").to_str().unwrap(),
        ][..],
        &[
            "image",
            "register",
            "deb",
            rootfs.to_str().unwrap(),
            "--kernel",
            "cloud",
        ],
        &[
            "vm",
            "create",
            "--name",
            "dev",
            "--image",
            "deb",
            "--no-start",
        ],
        &[
            "vm",
            "create",
            "--name",
            "db",
            "--image",
            "deb",
            "--no-start",
        ],
    ] {
        let out = home.banger(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let script = work.join("banger.bash");
    std::fs::write(&script, home.banger(&["completion", "bash"]).stdout).unwrap();
    let complete = |words: &[&str]| -> (Vec<String>, String) {
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let mut cmd = Command::new("bash");
        home.env(&mut cmd);
        let path = format!(
            "{}:{}",
            banger_bin().parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = cmd
            .env("PATH", path)
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=(banger {}); COMP_CWORD={}; _banger; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display(),
                quoted.join(" "),
                words.len()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{words:?}: {}", text(&out.stderr));
        let got = text(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        (got, text(&out.stderr))
    };
    assert_eq!(complete(&["vm", "start", ""]).0, ["db", "dev"]);
    assert_eq!(complete(&["vm", "start", "de"]).0, ["dev"]);
    assert_eq!(complete(&["vm", "create", "--image", ""]).0, ["deb"]);
    assert_eq!(complete(&["kernel", "show", ""]).0, ["cloud"]);
    let (top, _) = complete(&[""]);
    assert!(
        top.contains(&"vm".to_owned()) && top.contains(&"ps".to_owned()),
        "{top:?}"
    );
    for hidden in ["internal", "__ssh-proxy", "__complete"] {
        assert!(
            !top.iter().any(|c| c == hidden),
            "{hidden} offered: {top:?}"
        );
    }

    // No daemon: nothing offered, nothing said, nothing started.
    assert!(home.banger(&["daemon", "stop"]).status.success());
    let (got, err) = complete(&["vm", "start", ""]);
    assert!(got.is_empty() && err.is_empty(), "{got:?} {err}");
    let out = home.banger(&["__complete", "vm", "start", ""]);
    assert!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty());
    assert!(!home.socket().exists(), "no daemon was started");
}

/// `banger ps | head -1`: once the reader has gone, writing fails with EPIPE. The CLI
/// ends quietly with 141 (what a shell shows for SIGPIPE), never a panic (101 and a
/// backtrace). The pipe's read end is closed before the command starts, so its first
/// write fails.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    let home = Home::new();
    let closed_pipe = || {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        std::process::Stdio::from(write)
    };
    for args in [
        &["completion", "bash"][..],
        &["version"],
        &["ps"],
        &["ps", "--json"],
        &["vm", "ls", "--json"],
    ] {
        let mut cmd = Command::new(banger_bin());
        home.env(&mut cmd);
        let out = cmd.args(args).stdout(closed_pipe()).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert_eq!(err, "", "{args:?} says nothing");
    }
    home.banger(&["daemon", "stop"]);
}

/// `banger help` is a command like the others: `banger help --help` works (clap's
/// built-in one refused it), `banger help vm run` is `banger vm run --help`, aliases
/// included, and a command that does not exist is a usage error. The top-level examples
/// start with `vm run`.
#[test]
fn help_is_a_command_that_takes_help() {
    let home = Home::new();
    let out = home.banger(&["help", "--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Usage: banger help"),
        "{}",
        text(&out.stdout)
    );
    let out = home.banger(&["help", "vm", "run"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let direct = home.banger(&["vm", "run", "--help"]);
    assert_eq!(text(&out.stdout).trim(), text(&direct.stdout).trim());
    let out = home.banger(&["help", "vm", "rm"]);
    assert!(
        text(&out.stdout).contains("Usage: banger vm delete"),
        "{}",
        text(&out.stdout)
    );
    let out = home.banger(&["help", "vm", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no command `banger vm nope`"));
    let top = text(&home.banger(&["--help"]).stdout);
    let examples = top.split_once("Examples:").unwrap().1;
    // `banger run` is `banger vm run` (the top-level shortcuts are listed too).
    assert!(examples.trim_start().starts_with("banger run"), "{top}");
    assert!(top.contains("(= `banger vm run`)"), "{top}");
    assert!(top.contains("Global options:\n      --socket"), "{top}");
    assert!(!home.socket().exists(), "help starts no daemon");
}

#[test]
fn help_has_examples() {
    let home = Home::new();
    for args in [
        &["--help"][..],
        &["daemon", "status", "--help"],
        &["completion", "--help"],
    ] {
        let out = home.banger(args);
        assert!(out.status.success());
        assert!(text(&out.stdout).contains("Examples:"), "{args:?}");
    }
}

#[test]
fn default_socket_follows_xdg_runtime_dir() {
    let home = Home::new();
    let mut cmd = Command::new(banger_bin());
    home.env(&mut cmd);
    cmd.env_remove("BANGER_SOCKET");
    let out = cmd.args(["daemon", "socket", "--json"]).output().unwrap();
    let v = json(&out);
    if Path::new("/run/banger/bangerd.sock").exists() {
        assert_eq!(v["socket"], "/run/banger/bangerd.sock");
        assert_eq!(v["system"], true);
    } else {
        assert_eq!(v["socket"], home.socket().display().to_string());
        assert_eq!(v["system"], false);
    }
}

#[test]
fn lifecycle_autostart_status_second_daemon_sigterm() {
    let home = Home::new();
    // Not running: status says so, exits 3, starts nothing.
    let out = home.banger(&["daemon", "status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("not running"));
    let out = home.banger(&["daemon", "status", "--json"]);
    assert_eq!(json(&out)["running"], false);
    assert!(!home.socket().exists());

    // Start: the CLI spawns bangerd and waits for it.
    let out = home.banger(&["daemon", "start"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = home.banger(&["daemon", "status", "--json"]);
    assert!(out.status.success());
    let v = json(&out);
    assert_eq!(v["running"], true);
    let pid = v["pid"].as_i64().unwrap() as i32;
    assert!(is_bangerd(pid), "pid {pid} is a live bangerd");
    assert_eq!(v["socket"], home.socket().display().to_string());
    assert!(
        Path::new(v["log_path"].as_str().unwrap()).exists(),
        "log file exists"
    );
    let mode = std::fs::metadata(home.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    // It runs in its own session, detached from ours.
    assert_eq!(
        nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid)))
            .unwrap()
            .as_raw(),
        pid
    );

    // Starting again is a no-op on the same daemon.
    let out = home.banger(&["daemon", "start"]);
    assert!(text(&out.stdout).contains(&pid.to_string()));

    // A second bangerd on the same state refuses, clearly, and leaves the first serving.
    let out = home.bangerd(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("already running") && err.contains(&pid.to_string()),
        "{err}"
    );
    assert!(home.banger(&["daemon", "status"]).status.success());

    // SIGTERM: graceful, socket removed, status back to "not running".
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until("bangerd to exit", || !is_bangerd(pid));
    assert!(!home.socket().exists(), "socket removed on SIGTERM");
    assert_eq!(home.banger(&["daemon", "status"]).status.code(), Some(3));

    // The log recorded it, as JSON lines.
    let log = std::fs::read_to_string(home.path().join("state/banger/bangerd.log")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["fields"]["message"], "bangerd stopped");
    assert!(log.contains("SIGTERM received"));
}

#[test]
fn stop_then_restart_keeps_the_store() {
    let home = Home::new();
    assert!(home.banger(&["daemon", "start"]).status.success());
    let first = json(&home.banger(&["daemon", "status", "--json"]));
    let out = home.banger(&["daemon", "stop"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("stopped"));
    assert!(!home.socket().exists());
    // Stopping a stopped daemon is fine.
    assert!(home.banger(&["daemon", "stop"]).status.success());
    assert!(home.banger(&["daemon", "start"]).status.success());
    let second = json(&home.banger(&["daemon", "status", "--json"]));
    assert_ne!(first["pid"], second["pid"]);
    assert_eq!(
        first["store"]["instance_id"],
        second["store"]["instance_id"]
    );
    assert_eq!(second["store"]["starts"], 2);
    home.banger(&["daemon", "stop"]);
}

#[test]
fn check_migrations_and_a_store_from_a_newer_binary() {
    let home = Home::new();
    let out = home.bangerd(&["--check-migrations"]);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("no store"),
        "{}",
        text(&out.stderr)
    );

    assert!(home.banger(&["daemon", "start"]).status.success());
    // Checking while the daemon runs works (it migrates a copy).
    let out = home.bangerd(&["--check-migrations"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(": ok"));
    let out = home.banger(&["daemon", "stop"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let newer = banger_actors::store::SCHEMA_VERSION + 1;
    banger_actors::store::force_schema_version(&home.store(), newer).unwrap();
    let before = std::fs::read(home.store()).unwrap();
    let out = home.bangerd(&["--check-migrations"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("newer banger") && err.contains(&format!("schema version {newer}")),
        "{err}"
    );

    // The daemon refuses to start on it, and the CLI shows why.
    let out = home.banger(&["daemon", "start"]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(err.contains("newer banger"), "{err}");
    assert!(
        std::fs::read(home.store()).unwrap() == before,
        "store untouched"
    );
}

#[test]
fn a_bad_config_is_reported_before_anything_starts() {
    let home = Home::new();
    let cfg = home.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("config.toml"), "log_levle = \"debug\"\n").unwrap();
    let out = home.banger(&["daemon", "start"]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(
        err.contains("config.toml") && err.contains("log_levle"),
        "{err}"
    );
    assert!(!home.socket().exists());
    assert!(
        !home.store().exists(),
        "no store created for a daemon that never started"
    );

    // A wrong type names the key, the file and its line, and the CLI sends nobody to a
    // log the daemon never wrote.
    std::fs::write(cfg.join("config.toml"), "# mine\nlog_level = 5\n").unwrap();
    let out = home.banger(&["ps"]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert_eq!(
        err,
        format!(
            "banger: bangerd failed to start: invalid config file {}, line 2, key `log_level`: invalid type: integer `5`, expected a string\n",
            cfg.join("config.toml").display()
        )
    );

    std::fs::write(cfg.join("config.toml"), "log_level = \"debug\"\n").unwrap();
    let mut cmd = Command::new(banger_bin());
    home.env(&mut cmd);
    let out = cmd
        .env("BANGER_LOG_LEVL", "x")
        .args(["daemon", "start"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("BANGER_LOG_LEVL"),
        "{}",
        text(&out.stderr)
    );
}

/// `BANGER_TIMINGS` is the CLI's: with any boolean spelling it parses, and a daemon the
/// CLI starts does not take it for a config key (it once refused to start: "unknown
/// field `timings`").
#[test]
fn banger_timings_works_with_an_autostarted_daemon() {
    let home = Home::new();
    for value in ["1", "0", "yes", "no", "on", "off", "true", "false"] {
        let mut cmd = Command::new(banger_bin());
        home.env(&mut cmd);
        let out = cmd
            .env("BANGER_TIMINGS", value)
            .args(["vm", "run", "--image", "nope", "--no-network", "--", "true"])
            .output()
            .unwrap();
        let err = text(&out.stderr);
        // The daemon started (or was already up) and answered: the image does not exist.
        assert_eq!(out.status.code(), Some(4), "BANGER_TIMINGS={value}: {err}");
        assert!(err.contains("nope"), "BANGER_TIMINGS={value}: {err}");
    }
    assert!(home.banger(&["daemon", "status"]).status.success());
    let mut cmd = Command::new(banger_bin());
    home.env(&mut cmd);
    let out = cmd
        .env("BANGER_TIMINGS", "maybe")
        .args(["vm", "run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // The flag takes the same values, and none.
    for flag in ["--timings", "--timings=yes", "--timings=0"] {
        let out = home.banger(&["vm", "run", flag, "--image", "nope", "--", "true"]);
        assert_eq!(out.status.code(), Some(4), "{flag}: {}", text(&out.stderr));
    }
    home.banger(&["daemon", "stop"]);
}

/// A 16 MiB ext4 at `path` with banger's guest side in place (`/usr/lib/banger/banger-init`
/// and `banger-agent`, stand-ins: the tests that use it never boot a guest's userland), so
/// `image register` takes it as it is.
fn banger_rootfs(path: &Path) {
    let tree = tempfile::tempdir().unwrap();
    let dir = tree.path().join("usr/lib/banger");
    std::fs::create_dir_all(&dir).unwrap();
    for b in ["banger-init", "banger-agent"] {
        std::fs::write(dir.join(b), b"stand-in").unwrap();
    }
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(tree.path())
        .arg(path)
        .arg("16M")
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{}", text(&mkfs.stderr));
}

/// A boot that QEMU itself refuses says what QEMU said, in the error and in `vm logs`: the
/// kernel here is an ELF header banger accepts (x86-64) with nothing QEMU can load behind
/// it, so QEMU prints its reason on stderr and exits at once. The error once was only
/// "talking to QMP: Connection reset by peer" (QEMU closing its QMP socket as it exited),
/// and `vm logs` printed nothing, because QEMU's stderr went to a file in the VM's run
/// directory that the failed start removed. Real QEMU, under TCG, no network, no root.
#[test]
fn a_boot_qemu_refuses_says_what_qemu_said() {
    let home = Home::new();
    let cfg = home.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        "default_vmm = \"qemu\"\n[qemu]\naccel = \"tcg\"\n",
    )
    .unwrap();
    let work = home.path().join("work");
    std::fs::create_dir_all(work.join("kernel")).unwrap();
    let mut elf = b"\x7fELF\x02\x01\x01\x00".to_vec();
    elf.resize(16, 0);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.resize(4096, 0);
    std::fs::write(work.join("kernel/vmlinux"), elf).unwrap();
    let rootfs = work.join("rootfs.ext4");
    banger_rootfs(&rootfs);
    for args in [
        &[
            "kernel",
            "import",
            "k",
            "--from",
            work.join("kernel").to_str().unwrap(),
        ][..],
        &[
            "image",
            "register",
            "img",
            rootfs.to_str().unwrap(),
            "--kernel",
            "k",
        ],
    ] {
        let out = home.banger(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let out = home.banger(&["vm", "create", "--name", "a", "--image", "img"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let (_, said) = err
        .split_once("qemu exited during start-up: ")
        .unwrap_or_else(|| panic!("the error says QEMU exited: {err}"));
    let said = said.trim();
    assert!(
        said.starts_with("qemu-system-x86_64: ") && !err.contains("QMP"),
        "QEMU's own words, not its socket's: {err}"
    );
    let logs = home.banger(&["vm", "logs", "a"]);
    assert!(logs.status.success(), "{}", text(&logs.stderr));
    assert!(
        text(&logs.stdout).contains(said),
        "vm logs shows what QEMU said ({said}): {}",
        text(&logs.stdout)
    );
    home.banger(&["daemon", "stop"]);
}

/// `debugfs -R <request> <image>`'s stdout.
fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .unwrap();
    text(&out.stdout)
}

/// `image register` of a rootfs without banger's guest side (a plain ext4, as a
/// debootstrap tree made into one is) gives banger's copy the daemon's guest binaries,
/// growing a full filesystem to fit them, and leaves the user's file as it was; a daemon
/// that has no usable guest binaries refuses such a rootfs saying how to get them. (It
/// was registered as it was, and every VM of it waited out the agent timeout.)
#[test]
fn image_register_gives_a_plain_rootfs_bangers_guest_side() {
    let home = Home::new();
    let work = home.path().join("work");
    let guest = work.join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    // Static ELF executables, as the daemon's check wants (no interpreter).
    let init = banger_actors::kernel_format::fixture::minimal_elf(4096);
    let agent = banger_actors::kernel_format::fixture::minimal_elf(8192);
    std::fs::write(guest.join("banger-init"), &init).unwrap();
    std::fs::write(guest.join("banger-agent"), &agent).unwrap();
    let cfg = home.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!("[images]\nguest_binaries_dir = \"{}\"\n", guest.display()),
    )
    .unwrap();
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "plain\n").unwrap();
    // Plain, and too full for the guest binaries: 6 of its 8 MiB taken.
    std::fs::write(tree.join("filler"), vec![0x5a; 6 << 20]).unwrap();
    let rootfs = work.join("plain.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&rootfs)
        .arg("8M")
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{}", text(&mkfs.stderr));
    let before = std::fs::read(&rootfs).unwrap();

    let out = home.banger(&["image", "register", "plain", rootfs.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let copy = home.path().join("data/banger/images/plain/rootfs.ext4");
    for (name, bytes) in [("banger-init", &init), ("banger-agent", &agent)] {
        let path = format!("/usr/lib/banger/{name}");
        let stat = debugfs(&copy, &format!("stat {path}"));
        assert!(
            stat.contains("Type: regular") && stat.contains("Mode:  0755"),
            "{path} in banger's copy: {stat}"
        );
        assert!(
            stat.contains("User:     0") && stat.contains("Group:     0"),
            "{path} is root's: {stat}"
        );
        let dump = work.join(format!("{name}.dump"));
        debugfs(&copy, &format!("dump {path} {}", dump.display()));
        assert_eq!(
            &std::fs::read(&dump).unwrap(),
            bytes,
            "{path} is the daemon's"
        );
    }
    assert!(
        std::fs::metadata(&copy).unwrap().len() > 8 << 20,
        "the full filesystem was grown to fit them"
    );
    assert!(
        debugfs(&copy, "cat /etc/hostname").contains("plain"),
        "the rootfs's own files are kept"
    );
    assert_eq!(
        std::fs::read(&rootfs).unwrap(),
        before,
        "the user's file is not changed"
    );

    // A daemon without guest binaries refuses, saying how to get them.
    let bare = Home::new();
    let cfg = bare.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    let empty = bare.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!("[images]\nguest_binaries_dir = \"{}\"\n", empty.display()),
    )
    .unwrap();
    let out = bare.banger(&["image", "register", "plain", rootfs.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{} has no /usr/lib/banger/banger-init (banger's guest side)",
            rootfs.display()
        )) && err.contains("scripts/build-guest.sh"),
        "{err}"
    );
    let out = bare.banger(&["image", "ls", "--json"]);
    assert_eq!(json(&out), serde_json::json!([]), "nothing was registered");
    home.banger(&["daemon", "stop"]);
    bare.banger(&["daemon", "stop"]);
}

/// A stand-in for `qemu-system-x86_64` whose guest boots an initramfs that cannot find
/// banger-init: it serves QMP as QEMU does (greeting, `return` answers, `running`) and,
/// once asked for its status, writes initramfs-tools' lines to the console file QEMU
/// would (`-chardev file,...,path=`), then waits as the rescue shell does. (No kernel is
/// needed; `root_rig_*` tests in vm_qemu.rs boot real guests.)
const QEMU_WITHOUT_INIT: &str = r#"#!/usr/bin/env python3
import json, socket, sys
args = sys.argv[1:]
console = qmp = None
for i, a in enumerate(args):
    if a == "-chardev" and args[i + 1].startswith("file,"):
        console = dict(kv.split("=", 1) for kv in args[i + 1].split(",")[1:])["path"]
    if a == "-qmp":
        qmp = args[i + 1].split(",")[0][len("unix:"):]
    # The agent's virtio-serial port: QEMU listens on it from the start (server=on,wait=off).
    if a == "-chardev" and args[i + 1].startswith("socket,") and "server=on" in args[i + 1]:
        port = dict(kv.split("=", 1) for kv in args[i + 1].split(",")[1:] if "=" in kv)["path"]
        agent = socket.socket(socket.AF_UNIX)
        agent.bind(port)
        agent.listen(4)
s = socket.socket(socket.AF_UNIX)
s.bind(qmp)
s.listen(4)
while True:
    c, _ = s.accept()
    f = c.makefile("rw")
    f.write('{"QMP": {"version": {}, "capabilities": []}}\n')
    f.flush()
    for line in f:
        cmd = json.loads(line).get("execute")
        f.write(json.dumps({"return": {"status": "running"} if cmd == "query-status" else {}}) + "\n")
        f.flush()
        if cmd == "query-status":
            with open(console, "a") as out:
                out.write("Begin: Running /scripts/init-bottom ... done.\r\n")
                out.write("run-init: can't execute '/usr/lib/banger/banger-init': No such file or directory\r\n")
                out.write("Target filesystem doesn't have requested /usr/lib/banger/banger-init.\r\n")
    c.close()
"#;

/// A guest whose console says banger-init is missing fails its start at once, quoting the
/// line, and is not left running. (It waited out the whole agent timeout, two minutes by
/// default, and the error said "the VM is kept" twice.) The agent timeout here is the
/// default, so a start that waited for the agent would not end within the test's run.
#[test]
fn a_start_fails_as_soon_as_the_console_says_the_init_is_missing() {
    let home = Home::new();
    let work = home.path().join("work");
    std::fs::create_dir_all(work.join("kernel")).unwrap();
    let qemu = work.join("qemu");
    std::fs::write(&qemu, QEMU_WITHOUT_INIT).unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = home.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!(
            "default_vmm = \"qemu\"\n[qemu]\naccel = \"tcg\"\nbinary = \"{}\"\n",
            qemu.display()
        ),
    )
    .unwrap();
    std::fs::write(
        work.join("kernel/vmlinux"),
        banger_actors::kernel_format::fixture::minimal_elf(4096),
    )
    .unwrap();
    let rootfs = work.join("rootfs.ext4");
    banger_rootfs(&rootfs);
    for args in [
        &[
            "kernel",
            "import",
            "k",
            "--from",
            work.join("kernel").to_str().unwrap(),
        ][..],
        &[
            "image",
            "register",
            "img",
            rootfs.to_str().unwrap(),
            "--kernel",
            "k",
        ],
    ] {
        let out = home.banger(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let out = home.banger(&[
        "vm", "run", "--name", "a", "--image", "img", "--rm", "--", "true",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("vm a cannot boot: its image has no banger init (the console says \"run-init: can't execute '/usr/lib/banger/banger-init': No such file or directory\")"),
        "{err}"
    );
    assert_eq!(err.matches("kept").count(), 1, "said once: {err}");
    let vm = json(&home.banger(&["vm", "show", "a", "--json"]));
    assert_eq!(vm["state"], "stopped", "its VMM was ended: {vm}");
    home.banger(&["daemon", "stop"]);
}

/// The first `/boot/vmlinuz-*` (the rig installs linux-image-cloud-amd64).
fn host_kernel() -> PathBuf {
    std::fs::read_dir("/boot")
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .expect("no /boot/vmlinuz-*: install linux-image-cloud-amd64 (scripts/rig/setup.sh does)")
}

/// With neither `--vmm` nor `default_vmm`, `auto` is resolved by the daemon's real probes
/// when the VM is created, and the record keeps the result. On this machine's kind
/// (no Firecracker installed, PVM /dev/kvm) that is QEMU under TCG, said on a warning line.
#[test]
fn vm_create_without_a_vmm_resolves_auto_for_this_host() {
    let home = Home::new();
    let work = home.path().join("work");
    std::fs::create_dir_all(work.join("kernel")).unwrap();
    std::fs::copy(host_kernel(), work.join("kernel/vmlinuz")).unwrap();
    let rootfs = work.join("rootfs.ext4");
    banger_rootfs(&rootfs);
    let ok = |args: &[&str]| {
        let out = home.banger(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        out
    };
    ok(&[
        "kernel",
        "import",
        "k",
        "--from",
        work.join("kernel").to_str().unwrap(),
    ]);
    ok(&[
        "image",
        "register",
        "img",
        rootfs.to_str().unwrap(),
        "--kernel",
        "k",
    ]);
    let out = ok(&[
        "vm",
        "create",
        "--name",
        "a",
        "--image",
        "img",
        "--no-start",
        "--json",
    ]);
    let vm = json(&out);
    let firecracker_here = Command::new("sh")
        .args(["-c", "command -v firecracker"])
        .output()
        .unwrap()
        .status
        .success();
    if !firecracker_here {
        assert_eq!(vm["vmm"], "qemu", "{vm}");
    }
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let err = text(&out.stderr);
    if pvm {
        assert_eq!(vm["vmm"], "qemu", "{vm}");
        assert!(
            err.contains("warning:") && err.contains("emulated"),
            "an emulated VM is said to be one: {err}"
        );
    }
    // The record keeps it: `vm show` later says the same.
    let shown = json(&ok(&["vm", "show", "a", "--json"]));
    assert_eq!(shown["vmm"], vm["vmm"]);
    // An explicit --vmm still wins.
    let out = ok(&[
        "vm",
        "create",
        "--name",
        "b",
        "--image",
        "img",
        "--no-start",
        "--json",
        "--vmm",
        "firecracker",
    ]);
    assert_eq!(json(&out)["vmm"], "firecracker");
    home.banger(&["daemon", "stop"]);
}

#[test]
fn doctor_fails_when_the_configured_vmm_is_not_installed() {
    let home = Home::new();
    let cfg = home.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("config.toml"), "default_vmm = \"firecracker\"\n").unwrap();
    assert!(home.banger(&["daemon", "start"]).status.success());
    let out = home.banger(&["doctor", "--json"]);
    let checks = json(&out);
    let fc = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "firecracker")
        .unwrap()
        .clone();
    let installed = Command::new("sh")
        .args(["-c", "command -v firecracker"])
        .output()
        .unwrap()
        .status
        .success();
    if installed {
        assert_eq!(fc["status"], "ok", "{fc}");
    } else {
        assert_eq!(out.status.code(), Some(1), "{checks}");
        assert_eq!(fc["status"], "fail", "{fc}");
        assert!(fc["hint"].as_str().unwrap().contains("auto"), "{fc}");
    }
    home.banger(&["daemon", "stop"]);
}

/// Without a daemon, doctor reads the config bangerd would read: one that bangerd
/// refuses (so every command exits 3) fails doctor, naming the key and line, and a
/// configured VMM that is not installed fails it too. (It once said "warn daemon not
/// running → it starts on first use" and exited 0 for both.) Doctor starts no daemon.
#[test]
fn doctor_without_a_daemon_checks_the_config_it_would_start_with() {
    let home = Home::new();
    let cfg = home.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    let get = |checks: &serde_json::Value, name: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {checks}"))
            .clone()
    };

    std::fs::write(cfg.join("config.toml"), "[vm_defaults]\nvcpu = \"x\"\n").unwrap();
    assert_eq!(
        home.banger(&["ps"]).status.code(),
        Some(3),
        "bangerd refuses it"
    );
    let out = home.banger(&["doctor", "--json"]);
    let checks = json(&out);
    assert_eq!(out.status.code(), Some(1), "{checks}");
    let config = get(&checks, "config");
    assert_eq!(config["status"], "fail", "{config}");
    let detail = config["detail"].as_str().unwrap();
    assert!(
        detail.contains("config.toml, line 2, key `vm_defaults.vcpu`"),
        "{detail}"
    );
    let daemon = get(&checks, "daemon");
    assert_eq!(daemon["status"], "fail", "{daemon}");
    assert!(
        daemon["detail"].as_str().unwrap().contains("cannot start"),
        "{daemon}"
    );

    std::fs::write(cfg.join("config.toml"), "default_vmm = \"firecracker\"\n").unwrap();
    let out = home.banger(&["doctor", "--json"]);
    let checks = json(&out);
    assert_eq!(get(&checks, "config")["status"], "ok", "{checks}");
    assert!(
        get(&checks, "vmm")["detail"]
            .as_str()
            .unwrap()
            .starts_with("new VMs get firecracker"),
        "{checks}"
    );
    let installed = Command::new("sh")
        .args(["-c", "command -v firecracker"])
        .output()
        .unwrap()
        .status
        .success();
    if !installed {
        assert_eq!(out.status.code(), Some(1), "{checks}");
        assert_eq!(get(&checks, "firecracker")["status"], "fail", "{checks}");
    }

    // Binaries are the config's: a QEMU that is not where it says fails.
    std::fs::write(
        cfg.join("config.toml"),
        "default_vmm = \"qemu\"\n[qemu]\nbinary = \"/nonexistent/qemu\"\n",
    )
    .unwrap();
    let out = home.banger(&["doctor", "--json"]);
    let checks = json(&out);
    assert_eq!(out.status.code(), Some(1), "{checks}");
    let qemu = get(&checks, "qemu");
    assert_eq!(qemu["status"], "fail", "{qemu}");
    assert!(
        qemu["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/qemu"),
        "{qemu}"
    );
    assert!(!home.socket().exists(), "doctor started no daemon");
}

/// `ssh-config --uninstall` leaves nothing behind: a `~/.ssh/config` that held only
/// banger's Include (one `ssh-config` created) is removed, not left empty; one with the
/// user's own lines keeps exactly those.
#[test]
fn ssh_config_uninstall_leaves_no_empty_config() {
    let home = Home::new();
    let user_config = home.path().join(".ssh/config");
    let out = home.banger(&["ssh-config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        std::fs::read_to_string(&user_config)
            .unwrap()
            .contains("Include")
    );
    let out = home.banger(&["ssh-config", "--uninstall"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !user_config.exists(),
        "{} is left behind",
        user_config.display()
    );

    let mine = "Host foo\n    User me\n";
    std::fs::write(&user_config, mine).unwrap();
    assert!(home.banger(&["ssh-config"]).status.success());
    assert!(home.banger(&["ssh-config", "--uninstall"]).status.success());
    assert_eq!(std::fs::read_to_string(&user_config).unwrap(), mine);
    home.banger(&["daemon", "stop"]);
}

/// Small things a new user met: `vm shell` (lima's word) is `vm ssh`; an empty image
/// reference and an `update --to` that is no version are usage errors, before the
/// daemon or the network is asked anything.
#[test]
fn small_usage_errors_and_aliases() {
    let home = Home::new();
    let out = home.banger(&["vm", "shell", "--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("ssh into a running VM"),
        "{}",
        text(&out.stdout)
    );

    let out = home.banger(&["image", "pull", ""]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("catalog"),
        "{}",
        text(&out.stderr)
    );

    let mut cmd = Command::new(banger_bin());
    home.env(&mut cmd);
    // Nothing listens here: a fetch would fail with a connection error instead.
    let out = cmd
        .env(
            "BANGER_TEST_UPDATE_MANIFEST_URL",
            "http://127.0.0.1:9/manifest.json",
        )
        .args(["update", "--to", "1.2"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("MAJOR.MINOR.PATCH"), "{err}");
    assert!(!home.socket().exists(), "no daemon was started");
}

#[test]
fn no_autostart_when_asked() {
    let home = Home::new();
    let mut cmd = Command::new(banger_bin());
    home.env(&mut cmd);
    let out = cmd
        .env("BANGER_NO_AUTOSTART", "1")
        .args(["daemon", "start"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("not running"));
    assert!(!home.socket().exists());
}

fn as_nobody(home: &Home, args: &[&str]) -> Output {
    assert!(
        nix::unistd::geteuid().is_root(),
        "root_ tests need root: run scripts/test.sh as root"
    );
    // setpriv (util-linux) also clears the supplementary groups, which std cannot do yet.
    let mut cmd = Command::new("setpriv");
    home.env(&mut cmd);
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(banger_bin())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn root_a_uid_that_is_not_allowed_is_refused() {
    let home = Home::new();
    assert!(home.banger(&["daemon", "start"]).status.success());
    // Let nobody reach the directory (the tempdir is 0700).
    for dir in [
        home.path(),
        &home.path().join("run"),
        &home.path().join("run/banger"),
    ] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // With the socket at 0660, the kernel already refuses the connect: a permission
    // error (5) that says who may use it, not "unavailable" (3) with a stale-socket hint.
    let out = as_nobody(&home, &["daemon", "status"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("permission denied") && err.contains("group"),
        "{err}"
    );
    assert!(!err.contains("stale"), "{err}");

    // Loosen the socket: now the SO_PEERCRED check is the only wall, and it holds, with
    // a JSON-RPC error (exit 5), not a hang.
    std::fs::set_permissions(home.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let t = Instant::now();
    let out = as_nobody(&home, &["daemon", "status"]);
    assert!(t.elapsed() < Duration::from_secs(10), "answered promptly");
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("permission denied") && err.contains("uid 65534"),
        "{err}"
    );
    let out = as_nobody(&home, &["daemon", "stop"]);
    assert_eq!(out.status.code(), Some(5));
    // The daemon is still up and serves its owner.
    assert!(home.banger(&["daemon", "status"]).status.success());
    home.banger(&["daemon", "stop"]);
}

#[test]
fn vm_create_help_shows_the_resolved_defaults_and_their_sources() {
    let home = Home::new();
    // Without a daemon, help says so rather than guessing (and starts nothing).
    let out = home.banger(&["vm", "create", "--help"]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("daemon is not running"),
        "{}",
        text(&out.stdout)
    );
    assert!(!home.socket().exists());

    let cfg = home.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("config.toml"), "[vm_defaults]\nvcpu = 3\n").unwrap();
    assert!(home.banger(&["daemon", "start"]).status.success());
    let out = home.banger(&["vm", "create", "--help"]);
    let help = text(&out.stdout);
    assert!(help.contains("Defaults now"), "{help}");
    assert!(
        help.contains("--vcpu       3  (config [vm_defaults])"),
        "{help}"
    );
    assert!(
        help.contains("(auto, from this host)"),
        "memory comes from the host: {help}"
    );
    assert!(help.contains("--disk-size  8 GiB  (built-in)"), "{help}");
    // What `auto` picks here, and why.
    // (clap wraps help text: join the lines from there on.)
    let at = help
        .rfind("--vmm        ")
        .unwrap_or_else(|| panic!("no --vmm default: {help}"));
    let vmm = help[at..].split_whitespace().collect::<Vec<_>>().join(" ");
    let vmm = vmm.replacen("--vmm ", "--vmm        ", 1);
    assert!(vmm.contains("auto: "), "{vmm}");
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(
            vmm.contains("--vmm        qemu") && vmm.contains("TCG") && vmm.contains("PVM"),
            "{vmm}"
        );
    }
    home.banger(&["daemon", "stop"]);
}

#[test]
fn vm_commands_fail_clearly_without_images() {
    let home = Home::new();
    // `""`: no default image (unset, it is the catalog's debian-bookworm, built on first use).
    let cfg = home.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("config.toml"), "default_image_name = \"\"\n").unwrap();
    let out = home.banger(&["vm", "create", "--name", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no image given"),
        "{}",
        text(&out.stderr)
    );
    let out = home.banger(&["vm", "create", "--image", "nope"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let out = home.banger(&["vm", "create", "--name", "Bad_Name", "--image", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("invalid vm name"));
    let out = home.banger(&["vm", "stop", "ghost"]);
    assert_eq!(out.status.code(), Some(4));
    let out = home.banger(&["vm", "ls", "--json"]);
    assert_eq!(json(&out), serde_json::json!([]));
    let out = home.banger(&["ps"]);
    assert!(text(&out.stdout).starts_with("ID"));
    home.banger(&["daemon", "stop"]);
}

/// A name that names nothing reads the same whatever its kind and whichever command
/// met it: `no <kind> named <name>; see \`banger <kind> list\``, exit 4. (It once read
/// "no vm named image nope (see `banger image list`); see `banger vm list`", and
/// `vm rm nope` said "nope: no vm named nope".)
/// Kernel `k` (the host's) and image `img` (a 16 MiB ext4 with stand-in guest binaries)
/// in `home`'s daemon.
fn import_k_and_register_img(home: &Home) {
    let work = home.path().join("work");
    std::fs::create_dir_all(work.join("kernel")).unwrap();
    std::fs::copy(host_kernel(), work.join("kernel/vmlinuz")).unwrap();
    let rootfs = work.join("rootfs.ext4");
    banger_rootfs(&rootfs);
    let kernel_dir = work.join("kernel");
    for args in [
        &[
            "kernel",
            "import",
            "k",
            "--from",
            kernel_dir.to_str().unwrap(),
        ][..],
        &[
            "image",
            "register",
            "img",
            rootfs.to_str().unwrap(),
            "--kernel",
            "k",
        ],
    ] {
        let out = home.banger(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
}

#[test]
fn a_missing_name_has_one_message_shape() {
    let home = Home::new();
    import_k_and_register_img(&home);
    let vm = "no vm named nope; see `banger vm list`";
    let image = "no image named nope; see `banger image list`";
    let kernel = "no kernel named nope; see `banger kernel list`";
    for (args, said) in [
        (
            &["vm", "create", "--image", "nope", "--no-start"][..],
            image,
        ),
        (
            &[
                "vm",
                "create",
                "--image",
                "img",
                "--kernel",
                "nope",
                "--no-start",
            ],
            kernel,
        ),
        (&["vm", "rm", "nope"], vm),
        // No `stop` stage before the error.
        (&["vm", "restart", "nope"], vm),
        (&["vm", "show", "nope"], vm),
        (&["vm", "stop", "nope"], vm),
        (&["image", "show", "nope"], image),
        (&["image", "delete", "nope"], image),
        (&["kernel", "show", "nope"], kernel),
        (&["kernel", "rm", "nope"], kernel),
    ] {
        let out = home.banger(args);
        assert_eq!(
            out.status.code(),
            Some(4),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), format!("banger: {said}\n"), "{args:?}");
    }
    home.banger(&["daemon", "stop"]);
}

/// Sizes in errors are in the user's units, and a size no VM can have is refused before
/// the default image is pulled for it. (`--memory 1` said "not 0 MiB", `--disk-size 100T`
/// gave bytes, `vm set --disk-size 1G` "8589934592 bytes … asked for 1073741824".)
#[test]
fn sizes_in_errors_are_in_human_units() {
    let home = Home::new();
    for (args, said) in [
        (
            &["vm", "create", "--memory", "1", "--no-start"][..],
            "\"1\" is 1 B, not a whole number of MiB: give a unit, e.g. 2G or 512M",
        ),
        (
            &["vm", "create", "--memory", "64M", "--no-start"],
            "banger: memory must be 128 MiB to 1 TiB, not 64 MiB\n",
        ),
        (
            &["vm", "create", "--disk-size", "100T", "--no-start"],
            "banger: disk must be 256 MiB to 16 TiB, not 100 TiB\n",
        ),
    ] {
        let out = home.banger(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(said), "{args:?}: {err}");
        assert!(!err.contains("pull"), "refused before any pull: {err}");
    }
    import_k_and_register_img(&home);
    let out = home.banger(&[
        "vm",
        "create",
        "--name",
        "a",
        "--image",
        "img",
        "--no-start",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = home.banger(&["vm", "set", "a", "--disk-size", "1G"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "banger: the work disk is 8 GiB; it can only grow (asked for 1 GiB)\n"
    );
    home.banger(&["daemon", "stop"]);
}

/// What does not exist is "not found" (4) and says so: a `kernel import --from`
/// directory that is missing (it was a usage error saying the directory had no vmlinux),
/// a rootfs to register that is missing (it was 1), and a kernel to register with that
/// was never imported (it was accepted).
#[test]
fn a_missing_path_or_kernel_to_import_or_register_is_not_found() {
    let home = Home::new();
    let work = home.path().join("work");
    std::fs::create_dir_all(work.join("empty")).unwrap();
    let rootfs = work.join("rootfs.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&rootfs)
        .arg("16M")
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{}", text(&mkfs.stderr));
    let missing = work.join("nope");
    let missing = missing.to_str().unwrap();
    let empty = work.join("empty");
    for (args, code, said) in [
        (
            &["kernel", "import", "k", "--from", missing][..],
            4,
            format!("banger: the kernel directory {missing} does not exist\n"),
        ),
        (
            &["kernel", "import", "k", "--from", empty.to_str().unwrap()],
            2,
            format!("banger: {} has no vmlinux or vmlinuz\n", empty.display()),
        ),
        (
            &["image", "register", "i", missing],
            4,
            format!("banger: the rootfs {missing} does not exist\n"),
        ),
        (
            &[
                "image",
                "register",
                "i",
                rootfs.to_str().unwrap(),
                "--kernel",
                "nope",
            ],
            4,
            "banger: no kernel named nope; see `banger kernel list`\n".into(),
        ),
    ] {
        let out = home.banger(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), said, "{args:?}");
    }
    let out = home.banger(&["image", "ls", "--json"]);
    assert_eq!(json(&out), serde_json::json!([]), "nothing was registered");
    home.banger(&["daemon", "stop"]);
}

#[test]
fn doctor_tells_the_truth_about_this_host() {
    let home = Home::new();
    assert!(home.banger(&["daemon", "start"]).status.success());
    let out = home.banger(&["doctor", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let checks = json(&out);
    let get = |name: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {checks}"))
            .clone()
    };
    assert_eq!(get("architecture")["detail"], std::env::consts::ARCH);
    let kvm = get("kvm");
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(kvm["status"], "warn");
        assert!(kvm["detail"].as_str().unwrap().contains("PVM"), "{kvm}");
    }
    // The VMM new VMs get (auto here), and why; QEMU under TCG on a PVM host.
    let vmm = get("vmm");
    let vmm_detail = vmm["detail"].as_str().unwrap();
    assert!(vmm_detail.contains("auto: "), "{vmm}");
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(vmm["status"], "warn", "{vmm}");
        assert!(
            vmm_detail.starts_with("new VMs get qemu") && vmm_detail.contains("TCG"),
            "{vmm}"
        );
    }
    assert_eq!(get("daemon")["status"], "ok", "{}", get("daemon"));
    assert_eq!(get("version drift")["status"], "ok");
    assert_eq!(get("dns")["status"], "ok");
    // No `banger ssh-config` in this HOME yet: a warning that says what to run.
    let ssh = get("ssh-config");
    assert_eq!(ssh["status"], "warn", "{ssh}");
    assert!(
        ssh["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("banger ssh-config"),
        "{ssh}"
    );
    assert!(get("socket")["detail"].as_str().unwrap().contains("0660"));
    if nix::unistd::geteuid().is_root() {
        // Started as root, the daemon forked its helper, confined.
        let helper = get("helper");
        assert_eq!(helper["status"], "ok", "{helper}");
        let detail = helper["detail"].as_str().unwrap();
        assert!(
            detail.contains("seccomp filter") && detail.contains("landlock fully enforced"),
            "{detail}"
        );
    }
    // The system service: this host has none installed (the tests install only into
    // temporary roots), and doctor says so.
    if !Path::new("/etc/systemd/system/bangerd.service").exists() {
        let svc = get("system-service");
        assert_eq!(svc["status"], "ok");
        assert!(
            svc["detail"].as_str().unwrap().contains("not installed"),
            "{svc}"
        );
    }
    let defaults = get("vm defaults")["detail"].as_str().unwrap().to_owned();
    assert!(
        defaults.contains("(auto)") && defaults.contains("(builtin)"),
        "{defaults}"
    );
    // The human form: one line per check, ok/warn/FAIL first.
    let out = home.banger(&["doctor"]);
    for line in text(&out.stdout).lines().filter(|l| !l.starts_with(' ')) {
        assert!(
            ["ok ", "warn", "FAIL"].iter().any(|p| line.starts_with(p)),
            "{line}"
        );
    }
    home.banger(&["daemon", "stop"]);
}

#[test]
fn root_doctor_fails_for_a_user_who_cannot_use_kvm() {
    let home = Home::new();
    if !Path::new("/dev/kvm").exists() {
        // No KVM at all is a warning (QEMU with TCG still works), not a failure.
        let checks = json(&home.banger(&["doctor", "--json"]));
        let kvm = checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "kvm")
            .unwrap()
            .clone();
        assert_eq!(kvm["status"], "warn");
        return;
    }
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_nobody(&home, &["doctor", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let checks = json(&out);
    let kvm = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kvm")
        .unwrap()
        .clone();
    assert_eq!(kvm["status"], "fail");
    assert!(kvm["hint"].as_str().unwrap().contains("kvm group"), "{kvm}");
}

#[test]
fn root_a_root_daemon_changes_no_network_until_a_vm_needs_one() {
    // In a namespace of its own, so the check is exact (the host may run a real banger).
    /// Deleted when dropped, also when an assertion fails.
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let ns = format!("bgt-cli-{}", std::process::id());
    let _ = Command::new("ip")
        .args(["netns", "del", &ns])
        .stderr(std::process::Stdio::null())
        .status();
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success()
    );
    let _guard = Netns(ns.clone());
    let home = Home::new();
    let mut cmd = Command::new("ip");
    home.env(&mut cmd);
    let out = cmd
        .args(["netns", "exec", &ns])
        .arg(bangerd_bin())
        .arg("--background")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !home.banger(&["daemon", "status"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "bangerd did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // It forked its confined helper and bound the guests' resolver, and made no link.
    let status = json(&home.banger(&["daemon", "status", "--json"]));
    assert_eq!(status["helper"]["seccomp_mode"], 2, "{status}");
    assert!(
        status["network"]["guest_dns"]
            .as_str()
            .unwrap()
            .ends_with(":53"),
        "{status}"
    );
    // The guests' resolver listens over UDP and TCP (answers too big for a datagram).
    let listening = Command::new("ip")
        .args(["netns", "exec", &ns, "ss", "-Hlntu", "sport = :53"])
        .output()
        .unwrap();
    let listening = text(&listening.stdout);
    assert!(
        listening.contains("udp") && listening.contains("tcp"),
        "{listening}"
    );
    let links = Command::new("ip")
        .args(["-n", &ns, "-o", "link"])
        .output()
        .unwrap();
    let links = text(&links.stdout);
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    assert!(home.banger(&["daemon", "stop"]).status.success());
    let mut out = out;
    let _ = out.wait();
}

/// `--publish` specs and taken host ports, without a guest: a bad spec is refused by the CLI
/// with the spec named (before anything is asked of the daemon, so before any pull), a
/// taken host port is refused by the daemon naming address and port, and nothing is
/// created for it; `vm port add|rm|list` keep the VM's record. (Forwarding itself is
/// tested against the real agent code in `banger_actors::vm::publish` and on a real guest
/// in `vm_qemu.rs`.)
#[test]
fn published_port_specs_and_taken_host_ports_are_refused_with_what_is_wrong() {
    let home = Home::new();
    for (spec, why) in [
        ("70000:80", "the host port 70000 is out of range (0-65535)"),
        ("abc", "it needs a host port and a guest port"),
        ("1.2.3:80:80", "\"1.2.3\" is not an IPv4 address"),
        (
            "8080:80/udp",
            "only tcp ports can be published for now, not udp",
        ),
    ] {
        let out = home.banger(&["vm", "create", "--no-start", "--publish", spec]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {err}");
        assert!(err.contains(&format!("bad port spec \"{spec}\"")), "{err}");
        assert!(err.contains(why), "{spec}: {err}");
        assert!(
            !home.socket().exists(),
            "refused before the daemon is asked"
        );
    }
    let out = home.banger(&["vm", "run", "--rm", "-p", "abc", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("bad port spec \"abc\""),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !home.socket().exists(),
        "refused before the daemon is asked"
    );
    import_k_and_register_img(&home);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let in_use = format!("host port 127.0.0.1:{port} is already in use");
    let spec = format!("{port}:80");
    let out = home.banger(&[
        "vm",
        "create",
        "--name",
        "a",
        "--image",
        "img",
        "--no-start",
        "-p",
        "0:22",
        "-p",
        &spec,
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&in_use), "{}", text(&out.stderr));
    let out = home.banger(&["vm", "ls", "--json"]);
    assert_eq!(json(&out), serde_json::json!([]), "nothing was created");

    let out = home.banger(&[
        "vm",
        "create",
        "--name",
        "b",
        "--image",
        "img",
        "--no-start",
        "-p",
        "0:8000",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = home.banger(&["vm", "port", "add", "b", &spec]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&in_use), "{}", text(&out.stderr));
    let out = home.banger(&["vm", "port", "add", "b", "0:8000"]);
    assert!(
        text(&out.stderr).contains("clashes with"),
        "{}",
        text(&out.stderr)
    );
    drop(taken);
    let out = home.banger(&["vm", "port", "add", "b", &spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json(&out)["host_port"], port);
    let out = home.banger(&["vm", "port", "list", "b", "--json"]);
    let list = json(&out);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[0]["guest_port"], 8000);
    assert_eq!(list[0]["host_ip"], "127.0.0.1");
    assert_eq!(
        list[0]["bound_port"],
        serde_json::Value::Null,
        "not running"
    );
    let ps = text(&home.banger(&["ps", "-a"]).stdout);
    assert!(ps.contains("PORTS"), "{ps}");
    assert!(ps.contains(&format!("127.0.0.1:{port}->80/tcp")), "{ps}");
    let out = home.banger(&["vm", "port", "rm", "b", &port.to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = home.banger(&["vm", "port", "rm", "b", "9"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("vm b publishes no port matching 9"),
        "{}",
        text(&out.stderr)
    );
    let show = json(&home.banger(&["vm", "show", "b", "--json"]));
    assert_eq!(show["published"].as_array().unwrap().len(), 1, "{show}");
    assert!(
        text(&home.banger(&["vm", "show", "b"]).stdout)
            .contains("127.0.0.1:0->8000/tcp (not bound)")
    );
    home.banger(&["daemon", "stop"]);
}

/// A home whose daemon runs Firecracker VMs on the test double (`banger-fc-double`, as
/// jailer and as Firecracker): they start and stop at once, with no guest to boot (no
/// agent: `agent_timeout_secs = 0`). Kernel `k` and image `img` are registered through the
/// CLI, with `--json`.
fn double_home() -> Home {
    let home = Home::new();
    let exe = banger_bin();
    let double = exe.with_file_name("banger-fc-double");
    assert!(
        double.exists(),
        "{} is missing: cargo build -p banger-actors --features test-double --bin banger-fc-double",
        double.display()
    );
    let work = home.path().join("work");
    std::fs::create_dir_all(work.join("kernel")).unwrap();
    std::fs::write(
        work.join("kernel/vmlinux"),
        banger_actors::kernel_format::fixture::minimal_elf(4096),
    )
    .unwrap();
    let versioned = work.join("firecracker-v1.13.1-x86_64");
    if std::fs::hard_link(&double, &versioned).is_err() {
        std::fs::copy(&double, &versioned).unwrap();
    }
    std::os::unix::fs::symlink(&versioned, work.join("firecracker")).unwrap();
    let rootfs = work.join("rootfs.ext4");
    banger_rootfs(&rootfs);
    let cfg = home.path().join("config/banger");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.toml"),
        format!(
            "default_vmm = \"firecracker\"\nagent_timeout_secs = 0\nstop_timeout_secs = 5\n\
             [firecracker]\njailer = \"{}\"\nbinary = \"{}\"\n",
            double.display(),
            work.join("firecracker").display()
        ),
    )
    .unwrap();
    let out = home.banger(&[
        "kernel",
        "import",
        "k",
        "--from",
        work.join("kernel").to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json(&out)["name"], "k", "kernel import --json");
    let out = home.banger(&[
        "image",
        "register",
        "img",
        rootfs.to_str().unwrap(),
        "--kernel",
        "k",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json(&out)["name"], "img", "image register --json");
    home
}

/// The docker/lima conventions of issue 21 on VMs of the Firecracker double: `vm create
/// NAME`; `ps` lists running VMs and `-a` all, `-q` IDs, `--format` fields; a unique ID
/// prefix names a VM; `start`/`stop`/`kill`/`rm` take several VMs, act on each, report
/// each failure and exit non-zero if any failed, `--json` an array; `logs --tail N` counts
/// lines; zsh completion offers the daemon's VM names.
/// `--ttl`: the daemon stops the VM when its time is up, `vm show` says when, `vm set
/// --ttl` moves or removes the deadline, and a deadline outlives a daemon restart (the new
/// daemon arms it again from the record).
#[test]
fn a_ttl_stops_the_vm_and_vm_set_moves_it_across_a_daemon_restart() {
    let home = double_home();
    let ok = |args: &[&str]| {
        let out = home.banger(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        out
    };
    let show = |vm: &str| json(&ok(&["vm", "show", vm, "--json"]));
    let bad = home.banger(&["vm", "create", "x", "--image", "img", "--ttl", "soon"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    assert!(
        text(&bad.stderr).contains("90s, 10m, 1h30m"),
        "{}",
        text(&bad.stderr)
    );

    ok(&["vm", "create", "short", "--image", "img", "--ttl", "1s"]);
    ok(&["vm", "create", "long", "--image", "img", "--ttl", "1h"]);
    let long = show("long");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at = long["expires"]["at"].as_u64().unwrap();
    assert!((now + 3590..=now + 3600).contains(&at), "{long}");
    assert!(long["expires"].get("delete").is_none(), "{long}");
    let shown = text(&ok(&["vm", "show", "long"]).stdout);
    assert!(
        (shown.contains("expires:  in 1h 0m 0s") || shown.contains("expires:  in 59m"))
            && shown.contains("(stopped then)"),
        "{shown}"
    );

    wait_until("the short VM's ttl", || show("short")["state"] == "stopped");
    assert!(
        show("short").get("expires").is_none(),
        "fired once: {}",
        show("short")
    );
    assert_eq!(show("long")["state"], "running");
    // Started again, it runs without a deadline.
    ok(&["vm", "start", "short"]);
    assert!(show("short").get("expires").is_none());

    // `none` removes a deadline; a new one is armed at once.
    ok(&["vm", "set", "short", "--ttl", "1h"]);
    assert!(show("short")["expires"]["at"].as_u64().is_some());
    ok(&["vm", "set", "short", "--ttl", "none"]);
    assert!(show("short").get("expires").is_none());
    ok(&["vm", "set", "long", "--ttl", "2s"]);
    // The daemon goes away before the deadline (the VMs run on); the next one fires it.
    assert!(home.banger(&["daemon", "stop"]).status.success());
    ok(&["daemon", "start"]);
    wait_until("the long VM's moved ttl", || {
        show("long")["state"] == "stopped"
    });
    assert_eq!(show("short")["state"], "running", "no deadline any more");
    ok(&["rm", "-f", "short", "long"]);
    home.banger(&["daemon", "stop"]);
}

#[test]
fn docker_conventions_on_double_vms() {
    let home = double_home();
    let ok = |args: &[&str]| {
        let out = home.banger(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        out
    };
    ok(&["vm", "create", "a", "--image", "img"]);
    ok(&["vm", "create", "--name", "b", "--image", "img"]);
    ok(&["vm", "create", "c", "--image", "img", "--no-start"]);
    let state = |vm: &str| json(&ok(&["vm", "show", vm, "--json"]))["state"].clone();
    assert_eq!(state("a"), "running");
    let ids: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|vm| {
            json(&ok(&["vm", "show", vm, "--json"]))["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let lines = |out: &Output| -> Vec<String> {
        let mut l: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
        l.sort();
        l
    };
    let mut running = vec![ids[0].clone(), ids[1].clone()];
    running.sort();
    assert_eq!(lines(&ok(&["ps", "-q"])), running, "ps: running VMs only");
    let mut all = ids.clone();
    all.sort();
    assert_eq!(lines(&ok(&["ps", "-aq"])), all, "ps -a: all");
    assert_eq!(
        text(&ok(&["ps", "-a", "--format", "{{.Name}}:{{.State}}"]).stdout),
        "a:running\nb:running\nc:created\n"
    );
    let table = text(&ok(&["ps"]).stdout);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains("UPTIME") && !table.contains("created"),
        "{table}"
    );

    // c by the shortest prefix of its ID that no other ID shares (at least 3 characters,
    // so it is no VM's name).
    let len = (3..=12)
        .find(|&n| ids[..2].iter().all(|o| !o.starts_with(&ids[2][..n])))
        .unwrap();
    let prefix = &ids[2][..len];
    ok(&["start", prefix]);
    assert_eq!(state("c"), "running", "started by its ID prefix {prefix}");

    // Several at once; one that does not exist fails alone, and says so.
    let out = home.banger(&["stop", "a", "nope", "b"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no vm named nope"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(state("a"), "stopped");
    assert_eq!(state("b"), "stopped");
    let started = json(&ok(&["vm", "start", "a", "b", "--json"]));
    let names: Vec<&str> = started
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert!(
        started
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] == "running")
    );
    let killed = json(&ok(&["vm", "kill", "a", "b", "--json"]));
    assert_eq!(killed.as_array().unwrap().len(), 2, "{killed}");
    for vm in ["a", "b"] {
        assert_ne!(state(vm), "running", "{vm} was killed");
    }

    // zsh: the script of `banger completion zsh`, run by zsh with compadd and compdef
    // standing in for its completion system, offers the daemon's VMs.
    let script = home.path().join("_banger");
    std::fs::write(&script, ok(&["completion", "zsh"]).stdout).unwrap();
    let bin_dir = banger_bin().parent().unwrap().to_owned();
    let mut zsh = Command::new("zsh");
    home.env(&mut zsh);
    let out = zsh
        .env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        )
        .args(["-f", "-c"])
        .arg(format!(
            "compdef() {{ :; }}; compadd() {{ print -rl -- \"${{(@P)2}}\"; }}; _files() {{ print FILES; }}\n\
             source {}\nwords=(banger vm start ''); CURRENT=4; _banger\n\
             words=(banger vm create --image ''); CURRENT=5; _banger\n\
             words=(banger image register ''); CURRENT=4; _banger",
            script.display()
        ))
        .output()
        .expect("zsh (apt-get install zsh)");
    assert_eq!(
        text(&out.stdout),
        "a\nb\nc\nimg\nFILES\n",
        "VMs, images, then files for a new image's name: {}",
        text(&out.stderr)
    );

    // logs --tail counts lines (the console's last lines here are the test's).
    let console = json(&ok(&["vm", "show", "a", "--json"]))["console_log"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&console)
        .unwrap();
    std::io::Write::write_all(&mut f, b"\nline 1\nline 2\nline 3\n").unwrap();
    drop(f);
    assert_eq!(
        text(&ok(&["logs", "--tail", "2", "a"]).stdout),
        "line 2\nline 3\n"
    );
    assert_eq!(
        text(&ok(&["vm", "logs", "a", "--bytes", "7"]).stdout),
        "line 3\n"
    );

    let gone = json(&ok(&["rm", "-f", "a", "b", "c", "--json"]));
    assert_eq!(gone.as_array().unwrap().len(), 3, "{gone}");
    assert!(text(&ok(&["ps", "-aq"]).stdout).is_empty());
    let out = home.banger(&["rm", "x1", "x2"]);
    assert_eq!(out.status.code(), Some(4));
    let err = text(&out.stderr);
    assert!(
        err.contains("x1") && err.contains("x2"),
        "each failure said: {err}"
    );
    assert_eq!(json(&ok(&["image", "rm", "img", "--json"]))["name"], "img");
    assert_eq!(json(&ok(&["kernel", "delete", "k", "--json"]))["name"], "k");
    home.banger(&["daemon", "stop"]);
}

/// `banger daemon logs`: bangerd's log, `--tail N` its last N lines (JSON lines); with no
/// log yet, not found (4), and nothing is started to ask.
#[test]
fn daemon_logs_prints_bangerds_log() {
    let home = Home::new();
    let out = home.banger(&["daemon", "logs"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no daemon log yet"),
        "{}",
        text(&out.stderr)
    );
    assert!(!home.socket().exists(), "daemon logs starts no daemon");
    assert!(home.banger(&["daemon", "start"]).status.success());
    let out = home.banger(&["daemon", "logs", "--tail", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let last = text(&out.stdout);
    assert_eq!(last.lines().count(), 1, "{last}");
    let line: serde_json::Value = serde_json::from_str(last.trim()).unwrap();
    assert!(line["level"].is_string(), "{line}");
    let all = text(&home.banger(&["daemon", "logs"]).stdout);
    assert!(all.lines().count() >= 1 && all.ends_with(&last), "{all}");
    home.banger(&["daemon", "stop"]);
}

#[test]
fn bad_egress_rules_are_refused_with_the_rule_named_before_any_daemon() {
    let home = Home::new();
    for (policy, says) in [
        ("allow=300.1.1.1/8", "bad egress rule \"300.1.1.1/8\""),
        ("allow=example.org,,x.org", "empty domain"),
        (
            "allow=foo.*.example.org",
            "\"foo.*.example.org\": a wildcard only",
        ),
        ("everything", "bad egress policy \"everything\""),
    ] {
        for cmd in [&["vm", "create"][..], &["vm", "run"][..]] {
            let mut args = cmd.to_vec();
            args.extend(["--egress", policy]);
            let out = home.banger(&args);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert!(err.contains(says), "{args:?}: {err}");
        }
    }
    let out = home.banger(&["vm", "set", "x", "--egress", "allow=10.1.0.0/8"]);
    assert!(text(&out.stderr).contains("host bits set"));
    let out = home.banger(&["vm", "create", "--nat", "--egress", "none"]);
    assert_eq!(out.status.code(), Some(2), "--nat is --egress all");
    assert!(home.daemon_pid().is_none(), "no daemon was started");
}
