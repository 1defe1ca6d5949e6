//! End-to-end VM tests on REAL guests, booted through the rig (QEMU microvm under TCG,
//! the Debian cloud kernel, a debootstrap rootfs with banger-init injected). They need
//! root, `scripts/rig/setup.sh` (the rig cache) and `scripts/build-guest.sh` (a static
//! banger-init): `scripts/test.sh` does all three. Without them they fail, loudly.
#![allow(clippy::print_stderr)] // the exec round-trip measurement is reported, not asserted

#[path = "support/guests.rs"]
mod guests;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

/// KEY=VALUE lines of the rig's rig.env.
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

/// The test image: the rig's rootfs with banger-init injected (built once per process).
/// It lives in cargo's target tmp dir under one fixed name, rebuilt by each run: a static
/// is never dropped, so a TempDir here would leave a 1 GiB sparse copy behind every run.
fn test_rootfs() -> &'static Path {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let init = repo().join("target/guest/banger-init");
        let agent = repo().join("target/guest/banger-agent");
        for b in [&init, &agent] {
            assert!(
                b.exists(),
                "{} is missing: run scripts/build-guest.sh (scripts/test.sh does)",
                b.display()
            );
        }
        let img = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm_qemu-rootfs.ext4");
        copy_and_edit(
            Path::new(&rig()["BANGER_RIG_ROOTFS"]),
            &img,
            &[
                "mkdir /usr/lib/banger".to_owned(),
                format!("write {} /usr/lib/banger/banger-init", init.display()),
                "sif /usr/lib/banger/banger-init mode 0100755".to_owned(),
                format!("write {} /usr/lib/banger/banger-agent", agent.display()),
                "sif /usr/lib/banger/banger-agent mode 0100755".to_owned(),
            ],
        );
        img
    })
}

/// The longest a test waits for a guest (a boot, a console line, a prompt): the daemon's
/// default agent timeout. Guests boot at most one per core, so the slowest wait measured
/// (`scripts/flaky.sh` prints it) stays far below this; a wait that needs more is a bug.
const GUEST_WAIT: Duration = Duration::from_secs(120);

struct Home {
    dir: tempfile::TempDir,
    /// A daemon this test started itself (in a network namespace).
    daemon: Option<std::process::Child>,
    /// The guest slots this test holds (see `support/guests.rs`); freed after `drop`.
    _slots: guests::Slots,
}

impl Home {
    /// A daemon home configured for QEMU under TCG, with the rig's kernel and the test image.
    fn new() -> Home {
        Self::with_config(None, "", "")
    }

    /// `top` goes first in the config (top-level keys); `extra` last (start it with a table).
    fn with_config(netns: Option<&str>, top: &str, extra: &str) -> Home {
        Self::with_guests(1, netns, top, extra)
    }

    /// Like `with_config`, for a test that runs `guests` guests at once: it holds that many
    /// guest slots (the machine-wide limit on concurrent TCG guests) while it runs. With
    /// `Some(ns)`, VMs have networks and the daemon runs as root inside `ns`.
    fn with_guests(guests: usize, netns: Option<&str>, top: &str, extra: &str) -> Home {
        let network = netns.is_some();
        let slots = guests::acquire(guests);
        assert!(
            nix::unistd::geteuid().is_root(),
            "VM tests need root: run scripts/test.sh as root"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        let cfg = dir.path().join("config/banger");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(
            cfg.join("config.toml"),
            format!(
                "{top}default_vmm = \"qemu\"\ndefault_image_name = \"rig\"\nstop_timeout_secs = 30\ndns_listen = \"127.0.0.1:0\"\n[qemu]\naccel = \"tcg\"\nbinary = \"{}\"\n[vm_defaults]\nvcpu = 1\nmemory = \"512M\"\ndisk = \"2G\"\nnetwork = {network}\n{extra}",
                rig()["BANGER_RIG_QEMU"],
            ),
        )
        .unwrap();
        let mut home = Home {
            dir,
            daemon: None,
            _slots: slots,
        };
        if let Some(ns) = netns {
            home.daemon = Some(home.start_daemon_in(ns));
        }
        let kernel_dir = Path::new(&rig()["BANGER_RIG_KERNEL"])
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
            test_rootfs().to_str().unwrap(),
            "--kernel",
            "rig",
        ]);
        home
    }

    /// Start bangerd as root inside `ns` (so QEMU opens its taps there), as systemd
    /// would start it: it forks its helper, then drops its capabilities.
    fn start_daemon_in(&self, ns: &str) -> std::process::Child {
        let cmd = self.cmd(&[]);
        let mut daemon = Command::new("ip");
        daemon.args(["netns", "exec", ns]).arg(bin("bangerd"));
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => daemon.env(k, v),
                None => daemon.env_remove(k),
            };
        }
        daemon
            .arg("--socket")
            .arg(self.dir.path().join("run/banger/bangerd.sock"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("bangerd.stderr")).unwrap());
        let mut child = daemon.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let said = || std::fs::read_to_string(self.dir.path().join("bangerd.stderr")).unwrap();
        while !self.dir.path().join("run/banger/bangerd.sock").exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("bangerd in {ns} exited with {status}: {}", said());
            }
            assert!(
                Instant::now() < deadline,
                "bangerd did not start in {ns} within 20 s: {}",
                said()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("banger"));
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
        let t0 = Instant::now();
        let out = self.cmd(args).output().unwrap();
        // The commands that wait for a guest's agent: record how long, for the margin.
        if let ["vm", verb @ ("create" | "run" | "start" | "restart"), ..] = args
            && !args.contains(&"--no-start")
        {
            guests::guest_wait(&guests::test_name(), &format!("vm-{verb}"), t0.elapsed());
        }
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "banger {args:?} failed ({:?}): {}{}\n--- the end of bangerd.log ---\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log_tail(40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The last `n` lines of the daemon's log, for failure messages (the home is removed
    /// when the test ends).
    fn daemon_log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("state/banger/bangerd.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn wait_console(&self, vm: &str, needle: &str) {
        // As long as an agent gets (the daemon's default agent_timeout_secs): guests boot at
        // most one per core (`support/guests.rs`), and the slowest console line the tests
        // wait for follows first boot's `ssh-keygen -A` under emulation.
        let t0 = Instant::now();
        let deadline = t0 + GUEST_WAIT;
        loop {
            let log = self.ok(&["vm", "logs", vm]);
            if log.contains(needle) {
                guests::guest_wait(
                    &guests::test_name(),
                    &format!("console:{needle}"),
                    t0.elapsed(),
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never appeared on {vm}'s console:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn daemon_pid(&self) -> i32 {
        self.json(&["daemon", "status", "--json"])["pid"]
            .as_i64()
            .unwrap() as i32
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // Leave nothing behind even when a test failed half-way.
        let _ = self.run(&["vm", "prune", "-f"]);
        if let Ok(out) = self.cmd(&["vm", "ls", "--json"]).output()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        {
            for vm in v.as_array().into_iter().flatten() {
                let _ = self.run(&["vm", "rm", "-f", vm["name"].as_str().unwrap_or("")]);
            }
        }
        let _ = self.run(&["daemon", "stop"]);
        if let Some(mut d) = self.daemon.take() {
            let _ = d.wait();
        }
    }
}

/// connect + hello + exec `true` + wait for its exit, straight over the hybrid socket.
async fn exec_true(sock: &str) {
    use banger_guest::{host, proto};
    let mut c = host::connect(Path::new(sock)).await.unwrap();
    let req = proto::Request::Exec(proto::ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    });
    host::write_json(&mut c.stream, proto::Kind::Request, &req)
        .await
        .unwrap();
    // `true` may have exited (and the agent closed its side) before this lands.
    let _ = host::write_frame(&mut c.stream, proto::Kind::StdinEof, &[]).await;
    loop {
        let f = host::read_frame(&mut c.stream).await.unwrap();
        if f.kind == proto::Kind::Exit {
            break;
        }
    }
}

/// A child's output stream, collected by a thread, so a test can wait until the child has
/// printed something (the exact point it needs) instead of sleeping and hoping.
struct Collected(
    std::sync::Arc<std::sync::Mutex<String>>,
    std::thread::JoinHandle<()>,
);

impl Collected {
    fn new(mut from: impl std::io::Read + Send + 'static) -> Collected {
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = text.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Collected(text, reader)
    }

    /// Wait until the output contains `needle` (at most `GUEST_WAIT`).
    fn wait_for(&self, needle: &str) {
        let t0 = Instant::now();
        while !self.0.lock().unwrap().contains(needle) {
            assert!(
                t0.elapsed() < GUEST_WAIT,
                "{needle:?} never appeared: {}",
                self.0.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything, once the stream has ended.
    fn finish(self) -> String {
        self.1.join().unwrap();
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

#[test]
fn root_rig_vm_lifecycle_on_a_real_guest() {
    let home = Home::new();
    let image_before = std::fs::read(
        home.json(&["image", "show", "rig", "--json"])["rootfs"]
            .as_str()
            .unwrap(),
    )
    .unwrap();

    // create → running, with the spec line and stages on stderr.
    let out = home.run(&["vm", "create", "--name", "t"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("spec: 1 vcpu · 512 MiB memory · 2 GiB disk"),
        "{err}"
    );
    assert!(
        err.contains("boot") && err.contains("t is running"),
        "{err}"
    );
    let vm = home.json(&["vm", "show", "t", "--json"]);
    assert_eq!(vm["state"], "running");
    let pid = vm["pid"].as_i64().unwrap();
    assert!(alive(pid));
    assert!(
        vm["cmdline"]
            .as_str()
            .unwrap()
            .contains("init=/usr/lib/banger/banger-init")
    );

    // The guest really booted, and banger-init built its root.
    home.wait_console("t", "banger-init: ready");
    let log = home.ok(&["vm", "logs", "t"]);
    assert!(
        log.contains("Linux version"),
        "kernel banner on the console"
    );
    assert!(log.contains("under an overlay on /dev/vd"), "{log}");
    assert!(log.contains("/root: the work disk"), "{log}");

    // exec: both streams, the exit status, stdin.
    let out = home.run(&[
        "vm",
        "exec",
        "t",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(code(&out), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let mut cat = home
        .cmd(&["vm", "exec", "t", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        cat.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    }
    let out = cat.wait_with_output().unwrap();
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
        ),
        (Some(0), "hi\n".into())
    );
    let out = home.run(&[
        "vm",
        "exec",
        "t",
        "-w",
        "/root",
        "-e",
        "G=hello",
        "--",
        "sh",
        "-c",
        "echo $G; pwd",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n/root\n");

    // -t: a pseudo-terminal in the guest (stdin here is not a terminal, so no raw mode).
    let out = home.run(&[
        "vm",
        "exec",
        "-t",
        "t",
        "--",
        "sh",
        "-c",
        "tty; test -t 1 && echo isatty",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("/dev/pts/") && text.contains("isatty"),
        "{text}"
    );

    // A listener started in the guest shows in `vm ports`, with its process.
    home.ok(&[
        "vm",
        "exec",
        "t",
        "--",
        "sh",
        "-c",
        "socat -u TCP-LISTEN:8123,reuseaddr,fork OPEN:/dev/null >/dev/null 2>&1 </dev/null &",
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ports = home.json(&["vm", "ports", "t", "--json"]);
        if let Some(p) = ports.as_array().unwrap().iter().find(|p| p["port"] == 8123) {
            assert_eq!(p["proto"], "tcp");
            assert_eq!(p["process"], "socat");
            break;
        }
        assert!(Instant::now() < deadline, "8123 never listed: {ports}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Guest figures are plausible for a 512 MiB, 2 GiB-disk VM.
    let stats = home.json(&["vm", "stats", "t", "--json"]);
    let g = &stats["guest"];
    let mem = g["memory_total_bytes"].as_u64().unwrap();
    assert!((256 << 20..=512 << 20).contains(&mem), "{stats}");
    assert!(g["memory_available_bytes"].as_u64().unwrap() < mem);
    let work = g["work_total_bytes"].as_u64().unwrap();
    assert!((1 << 30..=2 << 30).contains(&work), "{stats}");
    assert!(g["processes"].as_u64().unwrap() > 1 && g["uptime_secs"].as_u64().unwrap() > 0);

    // Round-trip of a trivial exec through the vsock, measured (reported, not asserted).
    let sock = vm["vsock_socket"].as_str().unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut lat: Vec<Duration> = (0..20)
        .map(|_| {
            let t = Instant::now();
            rt.block_on(exec_true(&sock));
            t.elapsed()
        })
        .collect();
    lat.sort();
    eprintln!(
        "exec `true` through vsock (connect + hello + exec + exit), 20 runs: p50 {:?}, min {:?}, max {:?}",
        lat[10], lat[0], lat[19]
    );

    // A tree goes into the guest as a tar stream and comes back out.
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tree.path().join("src")).unwrap();
    std::fs::write(
        tree.path().join("src/main.c"),
        b"int main(void) { return 0; }\n",
    )
    .unwrap();
    std::fs::write(tree.path().join("Makefile"), b"test:\n\ttrue\n").unwrap();
    let mut archive = Vec::new();
    {
        let mut b = tar::Builder::new(&mut archive);
        b.append_dir_all(".", tree.path()).unwrap();
        b.finish().unwrap();
    }
    rt.block_on(banger_guest::host::upload(
        Path::new(&sock),
        &banger_guest::proto::Request::TarIn {
            dir: "/root/repo".into(),
        },
        archive.as_slice(),
    ))
    .unwrap();
    assert_eq!(
        home.ok(&["vm", "exec", "t", "--", "cat", "/root/repo/src/main.c"]),
        "int main(void) { return 0; }\n"
    );
    let mut back = Vec::new();
    rt.block_on(banger_guest::host::tar_out(
        Path::new(&sock),
        "/root/repo",
        &mut back,
    ))
    .unwrap();
    let names: Vec<String> = tar::Archive::new(back.as_slice())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with("src/main.c"))
            && names.iter().any(|n| n.ends_with("Makefile")),
        "{names:?}"
    );

    // Writes to / (the overlay) and /root (the work disk) must survive a stop/start.
    home.ok(&[
        "vm",
        "exec",
        "t",
        "--",
        "sh",
        "-c",
        "echo keep > /etc/banger-test && echo work > /root/work-test && sync",
    ]);

    // Clear errors for what cannot be done.
    let out = home.run(&["vm", "start", "t"]);
    assert_eq!(code(&out), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
    let out = home.run(&["vm", "rm", "t"]);
    assert_eq!(code(&out), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = home.run(&["vm", "create", "--name", "t", "--no-start"]);
    assert_eq!(code(&out), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
    let out = home.run(&["vm", "show", "nope"]);
    assert_eq!(code(&out), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no vm named nope"));
    let out = home.run(&["vm", "set", "t", "--vcpu", "2"]);
    assert_eq!(code(&out), Some(6), "resizing a running vm is refused");

    // Host-side stats.
    let stats = home.json(&["vm", "stats", "t", "--json"]);
    assert!(stats["vmm_rss_bytes"].as_u64().unwrap() > 10 << 20);
    assert!(
        stats["work_allocated_bytes"].as_u64().unwrap() < 256 << 20,
        "sparse work disk"
    );

    // `logs -f` follows until the vm stops, then ends by itself. The stop comes once the
    // follower has printed the log so far (it is following by then).
    let mut follower = home
        .cmd(&["vm", "logs", "-f", "t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let followed_out = Collected::new(follower.stdout.take().unwrap());
    let followed_err = Collected::new(follower.stderr.take().unwrap());
    followed_out.wait_for("banger-init: ready");

    // stop → stopped; every process is gone.
    let proxy = agent_proxies(vm["dir"].as_str().unwrap());
    assert_eq!(proxy.len(), 1, "one agent proxy for the vm");
    let out = home.run(&["vm", "stop", "t", "--timeout", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        home.json(&["vm", "show", "t", "--json"])["state"],
        "stopped"
    );
    assert!(!alive(pid), "qemu is gone");
    assert!(!alive(proxy[0]), "the agent proxy is gone");
    assert!(follower.wait().unwrap().success());
    assert!(followed_out.finish().contains("banger-init: ready"));
    let followed_err = followed_err.finish();
    assert!(followed_err.contains("the vm is stopped"), "{followed_err}");

    // Resize the work disk while stopped; start again from the same disks.
    home.ok(&["vm", "set", "t", "--disk-size", "3G", "--vcpu", "2"]);
    let vm = home.json(&["vm", "show", "t", "--json"]);
    assert_eq!(vm["spec"]["vcpu"], 2);
    assert_eq!(
        std::fs::metadata(Path::new(vm["dir"].as_str().unwrap()).join("work.ext4"))
            .unwrap()
            .len(),
        3 << 30
    );

    home.ok(&["vm", "start", "t"]);
    let out = home.ok(&[
        "vm",
        "exec",
        "t",
        "--",
        "cat",
        "/etc/banger-test",
        "/root/work-test",
    ]);
    assert_eq!(out, "keep\nwork\n", "writes survive a stop/start");
    let df = home.ok(&["vm", "exec", "t", "--", "sh", "-c", "df -k /root | tail -1"]);
    let kb: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        kb > 2 << 20,
        "the grown work disk is seen by the guest: {df}"
    );
    let out = home.run(&["vm", "stop", "t"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stopped ("),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // delete → nothing left: no directory, no sockets, no processes.
    let dir = PathBuf::from(vm["dir"].as_str().unwrap());
    assert!(dir.exists());
    home.ok(&["vm", "rm", "t"]);
    assert!(!dir.exists(), "vm directory removed");
    assert_eq!(code(&home.run(&["vm", "show", "t"])), Some(4));
    assert!(
        home.json(&["vm", "ls", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The shared image was never written to.
    let image_after = std::fs::read(
        home.json(&["image", "show", "rig", "--json"])["rootfs"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(
        image_before == image_after,
        "the image's rootfs is unchanged byte for byte"
    );
}

/// The pids of the agent proxies (`bangerd --internal-agent-proxy`) of the VM in `dir`.
fn agent_proxies(dir: &str) -> Vec<i64> {
    String::from_utf8_lossy(
        &Command::new("pgrep")
            .args([
                "-f",
                &format!("^[^ ]*bangerd --internal-agent-proxy {dir}/run/agent.sock "),
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .split_whitespace()
    .filter_map(|p| p.parse().ok())
    .collect()
}

/// `n` `vm exec`s of one VM at once, each its own stream on the agent channel; each echoes
/// its own index after a moment, so all are open together.
fn concurrent_execs(home: &Home, vm: &str, n: usize) {
    let children: Vec<_> = (0..n)
        .map(|i| {
            home.cmd(&[
                "vm",
                "exec",
                vm,
                "--",
                "sh",
                "-c",
                &format!("sleep 1; echo {i}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "exec {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{i}\n"));
    }
}

#[test]
fn root_rig_a_vm_survives_a_daemon_sigkill() {
    let home = Home::new();
    home.ok(&["vm", "create", "--name", "keep"]);
    let shown = home.json(&["vm", "show", "keep", "--json"]);
    let pid = shown["pid"].as_i64().unwrap();
    let dir = shown["dir"].as_str().unwrap().to_owned();
    home.wait_console("keep", "banger-init: ready");
    // Twenty exec streams at once over QEMU's agent channel (one virtio-serial port).
    concurrent_execs(&home, "keep", 20);

    // The agent proxy dies with the daemon (SIGKILL both): the restarted daemon starts a
    // new proxy when it re-adopts the VM, and the guest's agent takes the new session.
    let proxy = agent_proxies(&dir);
    assert_eq!(proxy.len(), 1, "one agent proxy: {proxy:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let daemon = home.daemon_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(i64::from(daemon)) {
        assert!(Instant::now() < deadline, "bangerd did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(alive(pid), "the guest outlives the daemon");

    // The next command starts a new daemon, which re-adopts the running VM.
    let vm = home.json(&["vm", "show", "keep", "--json"]);
    assert_ne!(home.daemon_pid(), daemon);
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["pid"].as_i64().unwrap(), pid, "same VMM process");
    // Its console is still captured.
    let before = home.ok(&["vm", "logs", "keep"]).len();
    assert!(before > 0);
    let now = agent_proxies(&dir);
    assert!(
        now.len() == 1 && now[0] != proxy[0],
        "a new agent proxy: {now:?}, was {proxy:?}"
    );
    assert!(!alive(proxy[0]));
    assert_eq!(
        home.ok(&["vm", "exec", "keep", "--", "echo", "back"]),
        "back\n",
        "exec works again through the new proxy"
    );
    let out = home.run(&["vm", "stop", "keep", "--timeout", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!alive(pid));
    home.ok(&["vm", "rm", "keep"]);
}

/// Live processes (not zombies) whose command line names `dir`: (pid, command line).
fn naming(dir: &Path) -> Vec<(i64, String)> {
    let dir = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&dir) && alive(pid) {
            out.push((pid, cmd));
        }
    }
    out
}

/// The storm of service/tests/storm.rs with real QEMU guests: a root bangerd in a network
/// namespace, VMs with taps (NAT on every other one), and in each round one create (a
/// TCG boot takes seconds, so the kill lands anywhere from the record's write to the
/// agent's answer) or one delete, cut by a SIGKILL of bangerd at a random moment (its
/// helper too, every other round); then the daemon is started again. After each restart
/// every VM listed before is still listed (unless the round deleted it) and every QEMU of
/// the home is the pid of a listed VM; at the end every VM is deleted and nothing is
/// left: no process naming the home but the daemon's own, no tap, no nft rule, no VM
/// directory.
///
/// `BANGER_STORM_SEED` replays a run (the seed is printed), `BANGER_QEMU_STORM_ROUNDS` sets
/// its length (6).
#[test]
#[allow(clippy::print_stdout)] // the seed and the census, for the note and a replay
fn root_rig_a_daemon_killed_mid_create_or_delete_loses_no_vm_and_leaks_no_qemu() {
    let topo = Topology::new();
    let mut home = Home::with_guests(2, Some(&topo.host), "", "");
    let seed = std::env::var("BANGER_STORM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let rounds: usize = std::env::var("BANGER_QEMU_STORM_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    println!("qemu storm: seed {seed}, {rounds} rounds");
    let mut rng = seed;
    let mut below = |n: u64| {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    };
    let settled = |home: &Home| -> Vec<serde_json::Value> {
        let deadline = Instant::now() + GUEST_WAIT;
        loop {
            let vms = home.json(&["vm", "ls", "--json"]);
            let vms = vms.as_array().unwrap().clone();
            if vms.iter().all(|v| v["adopting"] != true) {
                return vms;
            }
            assert!(Instant::now() < deadline, "still adopting: {vms:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let names = |vms: &[serde_json::Value]| -> Vec<String> {
        vms.iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (mut created, mut kills) = (0, 0);
    for round in 0..rounds {
        let before = settled(&home);
        let listed = names(&before);
        let daemon = home.daemon_pid();
        let helper = std::fs::read_to_string(format!("/proc/{daemon}/task/{daemon}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i64>().ok())
            .find(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("__helper"))
            });
        // At most two VMs (the guest slots this test holds): a delete when there are two.
        let (what, args, delay_ms): (String, Vec<String>, u64) = if listed.len() >= 2 {
            let victim = listed[below(listed.len() as u64) as usize].clone();
            (
                format!("delete {victim}"),
                vec!["vm".into(), "rm".into(), "-f".into(), victim],
                below(1500),
            )
        } else {
            let name = format!("s{round}");
            let mut args = vec!["vm".into(), "create".into(), "--name".into(), name.clone()];
            if round % 2 == 1 {
                args.push("--nat".into());
            }
            created += 1;
            (format!("create {name}"), args, below(8000))
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut op = home
            .cmd(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let with_helper = round % 2 == 1 && helper.is_some();
        for pid in std::iter::once(i64::from(daemon)).chain(helper.filter(|_| with_helper)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        kills += 1;
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(i64::from(daemon)) || helper.is_some_and(|h| with_helper && alive(h)) {
            assert!(Instant::now() < deadline, "bangerd did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The command either finished before the kill or fails with the daemon gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = op.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "banger {args:?} hangs after the kill"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(mut old) = home.daemon.take() {
            let _ = old.wait();
        }
        let _ = std::fs::remove_file(home.dir.path().join("run/banger/bangerd.sock"));
        home.daemon = Some(home.start_daemon_in(&topo.host));

        let after = settled(&home);
        let now = names(&after);
        for name in &listed {
            assert!(
                now.contains(name) || what == format!("delete {name}"),
                "round {round} (seed {seed}): {name} was listed before the kill and is gone: {now:?}"
            );
        }
        // Every QEMU of this home is the VMM of a listed VM.
        let pids: Vec<i64> = after.iter().filter_map(|v| v["pid"].as_i64()).collect();
        for (pid, cmd) in naming(home.dir.path()) {
            if cmd
                .split(' ')
                .next()
                .is_some_and(|exe| exe.contains("qemu-system"))
            {
                assert!(
                    pids.contains(&pid),
                    "round {round} (seed {seed}): a QEMU no VM claims: {pid} {cmd}\n{after:?}"
                );
            }
        }
        let states: Vec<String> = after
            .iter()
            .map(|v| format!("{}={}", v["name"].as_str().unwrap(), v["state"]))
            .collect();
        println!(
            "round {round}: {what}, killed after {delay_ms} ms{} (the command {}); now {}",
            if with_helper { " with its helper" } else { "" },
            if status.success() {
                "finished first"
            } else {
                "was cut"
            },
            states.join(" ")
        );
    }

    // Every VM still listed is deletable; then nothing is left.
    for vm in names(&settled(&home)) {
        home.ok(&["vm", "rm", "-f", &vm]);
    }
    // The daemon and its helper name the home; nothing else may (a VMM, an agent proxy).
    // (The daemon is left running for Home's drop, which stops it: a command after a
    // `daemon stop` here would start a daemon outside the namespace.)
    let left: Vec<_> = naming(home.dir.path())
        .into_iter()
        .filter(|(_, cmd)| !cmd.contains("bangerd --socket") && !cmd.contains("__helper"))
        .collect();
    let links = in_ns(&topo.host, "ip -o link");
    let rules = in_ns(&topo.host, "nft list ruleset");
    let dirs: Vec<_> = std::fs::read_dir(home.dir.path().join("data/banger/vms"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    println!(
        "qemu storm census: {rounds} rounds, {kills} kills, {created} creates; left: {} processes, {} taps, {} nft lines, {} VM dirs",
        left.len(),
        links.matches("bg-").count(),
        rules.trim().lines().count(),
        dirs.len()
    );
    assert!(left.is_empty(), "seed {seed}: processes left: {left:?}");
    assert!(!links.contains("bg-"), "seed {seed}: taps left: {links}");
    assert_eq!(rules.trim(), "", "seed {seed}: nft rules left");
    assert!(
        dirs.is_empty(),
        "seed {seed}: VM directories left: {dirs:?}"
    );
}

/// Runs `cmd` in the network namespace `ns`.
fn in_ns(ns: &str, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces: `host` (bangerd, its bridge, and an uplink) and `outside` (an
/// address beyond the VM subnet, 10.99.0.1, with no route back to the VMs).
struct Topology {
    host: String,
    outside: String,
}

impl Topology {
    /// Names are unique per topology, not only per test process: the tests of one binary
    /// run on threads of one process, and two topologies named by the pid alone delete
    /// each other's namespaces (CI saw a daemon fail to start and a guest lose its DNS).
    fn new() -> Topology {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = Topology {
            host: format!("bgt-gh-{pid}-{n}"),
            outside: format!("bgt-go-{pid}-{n}"),
        };
        for ns in [&t.host, &t.outside] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            assert!(
                Command::new("ip")
                    .args(["netns", "add", ns])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        in_ns(
            &t.host,
            &format!(
                "ip link add up0 type veth peer name up1 netns {o} && ip addr add 10.99.0.2/24 dev up0 && ip link set up0 up && ip link set lo up",
                o = t.outside
            ),
        );
        in_ns(
            &t.outside,
            "ip addr add 10.99.0.1/24 dev up1 && ip link set up1 up && ip link set lo up",
        );
        t
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.host, &self.outside] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn root_rig_guests_get_addresses_names_and_nat_only_when_asked() {
    let topo = Topology::new();
    let home = Home::with_guests(2, Some(&topo.host), "", "");
    home.ok(&["vm", "create", "--name", "a", "--nat"]);
    home.ok(&["vm", "create", "--name", "b"]);
    let ip = |vm: &str| {
        home.json(&["vm", "show", vm, "--json"])["ip"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (ip_a, ip_b) = (ip("a"), ip("b"));
    let sh = |vm: &str, cmd: &str| home.run(&["vm", "exec", vm, "--", "sh", "-c", cmd]);

    // Each guest has its lease on eth0 and a default route through the bridge.
    for (vm, addr) in [("a", &ip_a), ("b", &ip_b)] {
        let out = sh(vm, "ip -4 -o addr show eth0; ip route show default");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("inet {addr}/24")), "{vm}: {text}");
        assert!(text.contains("default via 172.30.0.1"), "{vm}: {text}");
        let out = sh(vm, "ping -c 1 -W 5 172.30.0.1");
        assert_eq!(
            code(&out),
            Some(0),
            "{vm} pings the bridge: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The guests' resolver on the bridge knows the other VM's name.
    let out = sh("a", "getent hosts b.vm");
    assert_eq!(
        code(&out),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&ip_b),
        "{:?}",
        out
    );
    // The host side: taps on the bridge, and the one NAT rule.
    let links = in_ns(&topo.host, "ip -o link show master banger0");
    assert_eq!(links.matches("bg-").count(), 2, "{links}");
    let rules = in_ns(&topo.host, "nft list table ip banger");
    assert!(
        rules.contains(&format!("ip saddr {ip_a} ")) && !rules.contains(&ip_b),
        "{rules}"
    );

    // Outside the subnet: a (with --nat) gets there, b does not.
    let out = sh("a", "ping -c 1 -W 5 10.99.0.1");
    assert_eq!(
        code(&out),
        Some(0),
        "a with NAT reaches 10.99.0.1: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = sh("b", "ping -c 1 -W 3 10.99.0.1");
    assert_ne!(code(&out), Some(0), "b without NAT must not get an answer");

    // `vm set --nat` on the running b: now it does.
    home.ok(&["vm", "set", "b", "--nat"]);
    let out = sh("b", "ping -c 1 -W 5 10.99.0.1");
    assert_eq!(
        code(&out),
        Some(0),
        "b after set --nat: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Delete both: nothing left on the host side.
    home.ok(&["vm", "rm", "-f", "a"]);
    home.ok(&["vm", "rm", "-f", "b"]);
    let links = in_ns(&topo.host, "ip -o link");
    assert!(!links.contains("bg-"), "{links}");
    assert_eq!(in_ns(&topo.host, "nft list ruleset").trim(), "");
}

/// Servers on threads inside a network namespace, until dropped.
struct NsServers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl NsServers {
    fn new() -> NsServers {
        NsServers {
            stop: Default::default(),
            threads: Vec::new(),
        }
    }

    /// Run `serve` on a thread in namespace `ns`; it must return soon after `stop` is set.
    fn spawn(
        &mut self,
        ns: &str,
        serve: impl FnOnce(&std::sync::atomic::AtomicBool) + Send + 'static,
    ) {
        use std::os::fd::AsFd;
        let (path, stop) = (format!("/run/netns/{ns}"), self.stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        self.threads.push(std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            ready_tx.send(()).unwrap();
            serve(&stop)
        }));
        ready_rx.recv().unwrap();
    }
}

impl Drop for NsServers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A DNS server on `addr`:53 (UDP, and TCP connections accepted and closed) answering
/// each name of `names` with its address (TTL 300), NXDOMAIN otherwise.
fn outside_dns(
    servers: &mut NsServers,
    ns: &str,
    addr: &str,
    names: &'static [(&'static str, std::net::Ipv4Addr)],
) {
    use hickory_proto::op::{Message, OpCode, ResponseCode};
    use hickory_proto::rr::{RData, Record, RecordType, rdata::A};
    let addr = addr.to_owned();
    let tcp_addr = addr.clone();
    servers.spawn(ns, move |stop| {
        let sock = std::net::UdpSocket::bind((addr.as_str(), 53)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 1500];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(query) = q.queries.first().cloned() else {
                continue;
            };
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.metadata.recursion_available = true;
            r.add_query(query.clone());
            let name = query.name().to_ascii().to_ascii_lowercase();
            match names.iter().find(|(n, _)| *n == name.trim_end_matches('.')) {
                Some((_, a)) if query.query_type() == RecordType::A => {
                    r.add_answer(Record::from_rdata(
                        query.name().clone(),
                        300,
                        RData::A(A(*a)),
                    ));
                }
                Some(_) => {}
                None => r.metadata.response_code = ResponseCode::NXDomain,
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), from);
        }
    });
    servers.spawn(ns, move |stop| accept_loop(&tcp_addr, 53, stop, |_| {}));
}

/// Accept connections on `addr`:`port` until `stop`, handing each to `each`.
fn accept_loop(
    addr: &str,
    port: u16,
    stop: &std::sync::atomic::AtomicBool,
    each: impl Fn(std::net::TcpStream),
) {
    let l = std::net::TcpListener::bind((addr, port)).unwrap();
    l.set_nonblocking(true).unwrap();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match l.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false).unwrap();
                each(c)
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// An HTTP-like server on `addr`:80 that answers every request with `body`.
fn outside_http(servers: &mut NsServers, ns: &str, addr: &str, body: &'static str) {
    let addr = addr.to_owned();
    servers.spawn(ns, move |stop| {
        accept_loop(&addr, 80, stop, |mut c| {
            use std::io::{Read, Write};
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf);
            let _ = c.write_all(format!("HTTP/1.0 200 OK\r\n\r\n{body}").as_bytes());
        })
    });
}

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over /etc/resolv.conf for
/// what it runs in `ns` (bangerd's upstream resolvers); removed when dropped.
struct NsResolvConf(PathBuf);

impl NsResolvConf {
    fn new(ns: &str, nameserver: &str) -> NsResolvConf {
        let dir = PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\n"),
        )
        .unwrap();
        NsResolvConf(dir)
    }
}

impl Drop for NsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--egress allow=allowed.test` on a real guest, against an "outside" namespace with a
/// DNS server (allowed.test, denied.test) and an HTTP server on each answer's address: the
/// guest resolves and fetches the allowed name, the denied name is refused, the denied
/// address and the outside DNS server are unreachable directly; `vm set --egress all`
/// opens everything at once; after `vm rm` banger's tables hold nothing of the VM.
#[test]
fn root_rig_a_guests_egress_policy_allows_only_its_names() {
    const ALLOWED: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 99, 0, 3);
    const DENIED: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 99, 0, 4);
    let topo = Topology::new();
    in_ns(
        &topo.outside,
        "ip addr add 10.99.0.3/24 dev up1 && ip addr add 10.99.0.4/24 dev up1",
    );
    let mut servers = NsServers::new();
    outside_dns(
        &mut servers,
        &topo.outside,
        "10.99.0.1",
        &[("allowed.test", ALLOWED), ("denied.test", DENIED)],
    );
    outside_http(&mut servers, &topo.outside, "10.99.0.3", "allowed");
    outside_http(&mut servers, &topo.outside, "10.99.0.4", "denied");
    let _resolv = NsResolvConf::new(&topo.host, "10.99.0.1");
    let home = Home::with_guests(1, Some(&topo.host), "", "");
    home.ok(&[
        "vm",
        "create",
        "--name",
        "eg",
        "--egress",
        "allow=allowed.test",
    ]);
    let sh = |cmd: &str| home.run(&["vm", "exec", "eg", "--", "bash", "-c", cmd]);
    let fetch = |addr: &str| {
        sh(&format!(
            "exec 3<>/dev/tcp/{addr}/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 5 cat <&3"
        ))
    };
    let reach = |addr: &str, port: u16| {
        code(&sh(&format!(
            "timeout 3 bash -c 'exec 3<>/dev/tcp/{addr}/{port}'"
        ))) == Some(0)
    };
    let out = sh("getent hosts allowed.test");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some("10.99.0.3"),
        "{out:?}"
    );
    let got = fetch("10.99.0.3");
    assert!(
        String::from_utf8_lossy(&got.stdout).ends_with("allowed"),
        "{got:?}"
    );
    let out = sh("getent hosts denied.test");
    assert_ne!(code(&out), Some(0), "denied.test resolved: {out:?}");
    assert!(!reach("10.99.0.4", 80), "the denied address is reachable");
    assert!(
        !reach("10.99.0.1", 53),
        "the outside DNS server is reachable directly"
    );
    let shown = home.json(&["vm", "show", "eg", "--json"]);
    assert!(shown["dns_refused"].as_u64() >= Some(1), "{shown}");
    assert!(shown["egress_dropped"].as_u64() >= Some(1), "{shown}");
    // What was refused, by name and by flow.
    let log = home.json(&["vm", "logs", "eg", "--egress", "--json"]);
    assert_eq!(log["egress"], "allow=allowed.test", "{log}");
    let names = log["names"].as_array().unwrap();
    assert!(
        names.iter().any(|n| n["name"] == "denied.test"),
        "the refused name: {log}"
    );
    let flows = log["flows"].as_array().unwrap();
    for (addr, proto, port) in [("10.99.0.4", "tcp", 80), ("10.99.0.1", "tcp", 53)] {
        assert!(
            flows
                .iter()
                .any(|f| f["addr"] == addr && f["proto"] == proto && f["port"] == port),
            "{addr} {proto} {port} dropped: {log}"
        );
    }
    let text = home.ok(&["vm", "logs", "eg", "--egress"]);
    assert!(
        text.contains("denied.test") && text.contains("10.99.0.4"),
        "{text}"
    );

    home.ok(&["vm", "set", "eg", "--egress", "all"]);
    let out = sh("getent hosts denied.test");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("10.99.0.4"),
        "{out:?}"
    );
    let got = fetch("10.99.0.4");
    assert!(
        String::from_utf8_lossy(&got.stdout).ends_with("denied"),
        "{got:?}"
    );
    assert!(reach("10.99.0.1", 53), "--egress all reaches any server");

    let ip = shown["ip"].as_str().unwrap().to_owned();
    home.ok(&["vm", "rm", "-f", "eg"]);
    let rules = in_ns(&topo.host, "nft list ruleset");
    assert!(!rules.contains(&ip) && !rules.contains("bg-"), "{rules}");
}

/// Copy the ext4 image `src` to `img` (sparse) and change the copy with debugfs commands
/// (as root, no mount).
fn copy_and_edit(src: &Path, img: &Path, cmds: &[String]) {
    assert!(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(src)
            .arg(img)
            .status()
            .unwrap()
            .success()
    );
    edit_image(img, cmds);
}

/// Change the ext4 image `img` with debugfs commands (as root, no mount).
fn edit_image(img: &Path, cmds: &[String]) {
    for cmd in cmds {
        let out = Command::new("debugfs")
            .args(["-w", "-R", cmd])
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "debugfs {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A copy of the test image changed by debugfs commands.
fn image_variant(dir: &Path, name: &str, cmds: &[String]) -> PathBuf {
    let img = dir.join(name);
    copy_and_edit(test_rootfs(), &img, cmds);
    img
}

#[test]
fn root_rig_an_image_without_sshd_gets_it_installed_once_on_first_boot_and_dockers_state_is_on_ext4()
 {
    let home = Home::new();
    // A container-like image: no sshd, and an apt-get that stands in for the package
    // manager and its mirror (no mirror is reachable from the test's namespaces): it logs
    // its arguments to the work disk and "installs" an sshd.
    let files = tempfile::tempdir().unwrap();
    let apt = files.path().join("apt-get");
    std::fs::write(
        &apt,
        r#"#!/bin/sh
echo "apt-get $*" >> /root/apt.log
case "$*" in
*openssh-server*) printf '#!/bin/sh\nexit 0\n' > /usr/sbin/sshd; chmod 755 /usr/sbin/sshd ;;
esac
"#,
    )
    .unwrap();
    // It also has docker installed (its daemon binary is what counts): its state dir must
    // not be on the root's overlayfs, where docker's own overlays cannot nest.
    let dockerd = files.path().join("dockerd");
    std::fs::write(&dockerd, b"").unwrap();
    let img = image_variant(
        files.path(),
        "bare.ext4",
        &[
            "rm /usr/sbin/sshd".into(),
            "rm /usr/bin/apt-get".into(),
            format!("write {} /usr/bin/apt-get", apt.display()),
            "sif /usr/bin/apt-get mode 0100755".into(),
            format!("write {} /usr/sbin/dockerd", dockerd.display()),
        ],
    );
    home.ok(&[
        "image",
        "register",
        "bare",
        img.to_str().unwrap(),
        "--kernel",
        "rig",
    ]);
    home.ok(&["vm", "create", "--name", "fb", "--image", "bare"]);
    home.wait_console("fb", "first boot: sshd installed");
    let log = home.ok(&["vm", "logs", "fb"]);
    assert!(
        log.contains("first boot: this image has no sshd; installing openssh-server with apt-get"),
        "{log}"
    );
    let out = home.ok(&["vm", "exec", "fb", "--", "cat", "/root/apt.log"]);
    assert_eq!(
        out,
        "apt-get update\napt-get install -y --no-install-recommends openssh-server\n"
    );
    home.ok(&[
        "vm",
        "exec",
        "fb",
        "--",
        "test",
        "-f",
        "/var/lib/banger/firstboot-sshd",
    ]);
    let fs_of = |p: &str| home.ok(&["vm", "exec", "fb", "--", "stat", "-f", "-c", "%T", p]);
    assert_eq!(fs_of("/"), "overlayfs\n");
    assert_eq!(
        fs_of("/var/lib/docker"),
        "ext2/ext3\n",
        "{}",
        home.ok(&["vm", "logs", "fb"])
    );
    home.ok(&["vm", "exec", "fb", "--", "touch", "/var/lib/docker/kept"]);
    // Once: a second boot finds the marker (on the overlay) and does nothing.
    home.ok(&["vm", "stop", "fb"]);
    home.ok(&["vm", "start", "fb"]);
    home.ok(&["vm", "exec", "fb", "--", "true"]);
    let out = home.ok(&["vm", "exec", "fb", "--", "cat", "/root/apt.log"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    // docker's state is the VM's, kept across boots like the rest of its writes.
    home.ok(&[
        "vm",
        "exec",
        "fb",
        "--",
        "test",
        "-f",
        "/var/lib/docker/kept",
    ]);
    let log = home.ok(&["vm", "logs", "fb"]);
    assert_eq!(
        log.matches("first boot: this image has no sshd").count(),
        1,
        "{log}"
    );
    home.ok(&["vm", "rm", "-f", "fb"]);
}

fn git_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir` except `.git`, with its bytes and executable bit.
fn tree_of(dir: &Path) -> std::collections::BTreeMap<String, (Vec<u8>, bool)> {
    let mut m = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_name() == ".git" {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let exec = p.metadata().unwrap().permissions().mode() & 0o111 != 0;
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                m.insert(rel, (std::fs::read(&p).unwrap(), exec));
            }
        }
    }
    m
}

/// `vm run` on real guests: a command's output and status, `--rm`, `--timings`, a repo
/// shipped to /root/repo; then workspace export of edits made in the guest, applied with
/// `git apply` on a host clone. Three boots.
#[test]
fn root_rig_vm_run_commands_repos_and_workspace_export() {
    let home = Home::new();
    let vms = |home: &Home| home.json(&["vm", "ls", "--json"]).as_array().unwrap().len();

    // -- uname -a: the guest's kernel, exit 0, and the VM is gone.
    let out = home.run(&["vm", "run", "--rm", "--timings", "--", "uname", "-a"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(code(&out), Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("Linux "), "{stdout}");
    let ver = &rig()["BANGER_RIG_KERNEL_VERSION"];
    assert!(stdout.contains(ver), "{stdout} is not the rig kernel {ver}");
    let timings = stderr
        .lines()
        .find(|l| l.starts_with("timings:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    for stage in ["create", "boot", "command", "delete", "total"] {
        assert!(timings.contains(stage), "{timings}");
    }
    eprintln!("vm run --rm -- uname -a: {timings}");
    assert_eq!(vms(&home), 0, "--rm left the VM behind");

    // -- false: its status, and --rm deletes on failure too.
    let out = home.run(&["vm", "run", "--rm", "--", "false"]);
    assert_eq!(
        code(&out),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        vms(&home),
        0,
        "--rm left the VM behind after a failing command"
    );

    // A repo shipped to /root/repo; the command runs there. Kept (no --rm) for export.
    let src = tempfile::tempdir().unwrap();
    let repo = src.path().join("proj");
    std::fs::create_dir(&repo).unwrap();
    git_in(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("hello.txt"), "hi\n").unwrap();
    std::fs::write(repo.join("gone.txt"), "delete me\n").unwrap();
    std::fs::write(repo.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(repo.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(repo.join(".gitignore"), "*.log\n").unwrap();
    std::fs::write(repo.join("blob.bin"), [0u8, 1, 2, 255, 0, 7]).unwrap();
    git_in(&repo, &["add", "-A"]);
    git_in(&repo, &["commit", "-q", "-m", "init"]);
    std::fs::write(repo.join("untracked.txt"), "new\n").unwrap();
    std::fs::write(repo.join("noise.log"), "ignored\n").unwrap();
    let out = home.run(&[
        "vm", "run", "--name", "ws", repo.to_str().unwrap(), "--",
        "sh", "-c", "pwd; ./run.sh; cat hello.txt untracked.txt; test -e noise.log && echo LEAK; test -f .git/HEAD && echo git",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        code(&out),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "/root/repo\nran\nhi\nnew\ngit\n");

    // Edit, add (a binary file too), delete, chmod in the guest; export; apply on a clone.
    home.ok(&[
        "vm", "exec", "ws", "-w", "/root/repo", "--", "sh", "-c",
        "echo changed >> hello.txt && rm gone.txt && mkdir -p sub && printf 'bin\\000\\377\\001' > sub/new.bin \
         && printf '\\000\\000' >> blob.bin && chmod -x run.sh && echo x > more.log",
    ]);
    // A workspace operation holding the VM's workspace lock makes the next one wait.
    let vm_dir = home.json(&["vm", "show", "ws", "--json"])["dir"]
        .as_str()
        .unwrap()
        .to_owned();
    let held = nix::fcntl::Flock::lock(
        std::fs::File::open(&vm_dir).unwrap(),
        nix::fcntl::FlockArg::LockExclusive,
    )
    .unwrap();
    let mut waiting = home
        .cmd(&["vm", "workspace", "export", "ws"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waiting_err = Collected::new(waiting.stderr.take().unwrap());
    // It says it waits (and so has found the lock held) before the lock is let go.
    waiting_err.wait_for("waiting for another workspace");
    drop(held);
    assert!(
        waiting.wait().unwrap().success(),
        "{}",
        waiting_err.finish()
    );
    let index_before = home.ok(&[
        "vm",
        "exec",
        "ws",
        "--",
        "sha256sum",
        "/root/repo/.git/index",
    ]);
    let diff_path = src.path().join("changes.diff");
    home.ok(&[
        "vm",
        "workspace",
        "export",
        "ws",
        "--out",
        diff_path.to_str().unwrap(),
    ]);
    let index_after = home.ok(&[
        "vm",
        "exec",
        "ws",
        "--",
        "sha256sum",
        "/root/repo/.git/index",
    ]);
    assert_eq!(
        index_before, index_after,
        "export touched the guest's index"
    );
    let diff = std::fs::read_to_string(&diff_path).unwrap();
    assert!(diff.contains("GIT binary patch"), "{diff}");
    assert!(
        !diff.contains("more.log"),
        "an ignored file was exported:\n{diff}"
    );

    // The expected tree: the guest's, read back through the agent.
    let guest_tar = src.path().join("guest.tar");
    let t = tokio::runtime::Runtime::new().unwrap();
    let sock = home.json(&["vm", "show", "ws", "--json"])["vsock_socket"]
        .as_str()
        .unwrap()
        .to_owned();
    t.block_on(async {
        let mut f = tokio::fs::File::create(&guest_tar).await.unwrap();
        banger_guest::host::tar_out(Path::new(&sock), "/root/repo", &mut f)
            .await
            .unwrap();
    });
    let guest_tree = src.path().join("guest");
    let mut a = tar::Archive::new(std::fs::File::open(&guest_tar).unwrap());
    a.set_preserve_permissions(true);
    a.unpack(&guest_tree).unwrap();
    std::fs::remove_file(guest_tree.join("more.log")).unwrap();
    std::fs::remove_file(guest_tree.join("noise.log")).ok();

    // The clone starts from the shipped state (the commit + the untracked file).
    let clone = src.path().join("clone");
    git_in(
        src.path(),
        &[
            "clone",
            "-q",
            repo.to_str().unwrap(),
            clone.to_str().unwrap(),
        ],
    );
    std::fs::write(clone.join("untracked.txt"), "new\n").unwrap();
    let applied = Command::new("git")
        .arg("-C")
        .arg(&clone)
        .args(["apply", "--whitespace=nowarn"])
        .arg(&diff_path)
        .output()
        .unwrap();
    assert!(
        applied.status.success(),
        "git apply: {}\n{diff}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert_eq!(
        tree_of(&clone),
        tree_of(&guest_tree),
        "the diff did not reproduce the guest's tree:\n{diff}"
    );
    assert!(!clone.join("gone.txt").exists());

    // prepare --branch --from: the guest's HEAD is a new branch at that ref.
    let first = git_in(&repo, &["rev-parse", "HEAD"]).trim().to_owned();
    home.ok(&[
        "vm",
        "workspace",
        "prepare",
        "ws",
        repo.to_str().unwrap(),
        "--from",
        "main",
        "--branch",
        "try",
    ]);
    let head = home.ok(&[
        "vm",
        "exec",
        "ws",
        "--",
        "cat",
        "/root/repo/.git/HEAD",
        "/root/repo/.git/refs/heads/try",
    ]);
    assert_eq!(head, format!("ref: refs/heads/try\n{first}\n"));
    let bad = home.run(&[
        "vm",
        "workspace",
        "prepare",
        "ws",
        repo.to_str().unwrap(),
        "--from",
        "nope",
    ]);
    assert_eq!(
        code(&bad),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    home.ok(&["vm", "rm", "-f", "ws"]);
}

/// ssh on a real guest with no network: the daemon's key in authorized_keys, sshd
/// key-only, host keys learned into banger's known_hosts (strict checking), `vm ssh`,
/// `banger ssh-config` then plain `ssh <vm>.vm` (with the user config it wrote), and an
/// interactive `vm run --rm` driven through tmux. Two boots. Also `[[file_sync]]`:
/// a file (with its mode) and a directory copied into the new VM's /root.
#[test]
fn root_rig_ssh_over_vsock_ssh_config_and_interactive_vm_run() {
    let sync = tempfile::tempdir().unwrap();
    std::fs::write(sync.path().join("gitconfig"), "[user]\n\tname = t\n").unwrap();
    std::fs::create_dir(sync.path().join("app")).unwrap();
    std::fs::write(sync.path().join("app/settings.json"), "{}").unwrap();
    let extra = format!(
        "[[file_sync]]\nhost = \"{0}/gitconfig\"\nguest = \"~/.gitconfig\"\nmode = 0o600\n[[file_sync]]\nhost = \"{0}/app\"\nguest = \"/root/.config/app\"\n[[file_sync]]\nhost = \"{0}/missing\"\nguest = \"~/missing\"\n",
        sync.path().display()
    );
    let home = Home::with_config(None, "", &extra);
    home.ok(&["vm", "create", "--name", "s"]);
    let synced = home.ok(&[
        "vm", "exec", "s", "--", "sh", "-c",
        "stat -c '%a %U' /root/.gitconfig && cat /root/.gitconfig /root/.config/app/settings.json; test -e /root/missing || echo no-missing",
    ]);
    assert_eq!(synced, "600 root\n[user]\n\tname = t\n{}no-missing\n");

    // vm ssh -- cmd: its output and its status.
    assert_eq!(home.ok(&["vm", "ssh", "s", "--", "hostname"]), "s\n");
    let out = home.run(&["vm", "ssh", "s", "--", "sh", "-c", "exit 3"]);
    assert_eq!(
        code(&out),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The key, the guest's sshd settings, the learned host key.
    let key = home.json(&["daemon", "status", "--json"])["ssh_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let public = std::fs::read_to_string(format!("{key}.pub")).unwrap();
    let auth = home.ok(&[
        "vm",
        "exec",
        "s",
        "--",
        "stat",
        "-c",
        "%a %U",
        "/root/.ssh",
        "/root/.ssh/authorized_keys",
    ]);
    assert_eq!(auth, "700 root\n600 root\n");
    let keys = home.ok(&["vm", "exec", "s", "--", "cat", "/root/.ssh/authorized_keys"]);
    assert_eq!(keys.trim(), public.trim());
    let sshd = home.ok(&["vm", "exec", "s", "--", "/usr/sbin/sshd", "-T"]);
    for line in [
        "permitrootlogin without-password",
        "passwordauthentication no",
        "kbdinteractiveauthentication no",
    ] {
        assert!(
            sshd.lines().any(|l| l == line),
            "sshd -T lacks {line:?}:\n{sshd}"
        );
    }
    let kh_path = home.dir.path().join("state/banger/ssh/known_hosts");
    let kh = std::fs::read_to_string(&kh_path).unwrap();
    let host_key = home.ok(&[
        "vm",
        "exec",
        "s",
        "--",
        "cat",
        "/etc/ssh/ssh_host_ed25519_key.pub",
    ]);
    let blob = host_key.split_whitespace().nth(1).unwrap();
    assert_eq!(kh, format!("s.vm ssh-ed25519 {blob}\n"));

    // Strict checking is on: a wrong key for s.vm is refused.
    std::fs::write(
        &kh_path,
        "s.vm ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMvJ3bJ+r3yRmaq0YVsDq6wiURrWk8r0nJ0u3P1uAU0N\n",
    )
    .unwrap();
    let out = Command::new("ssh")
        .envs(
            home.cmd(&[])
                .get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .args([
            "-i",
            &key,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}.bad", kh_path.display()))
        .arg("-o")
        .arg(format!(
            "ProxyCommand={} __ssh-proxy %n",
            bin("banger").display()
        ))
        .args(["root@s.vm", "true"])
        .output()
        .unwrap();
    assert_ne!(code(&out), Some(0), "ssh accepted an unknown host key");
    std::fs::write(format!("{}.bad", kh_path.display()), "").ok();

    // ssh-config: one Include, idempotent, then plain ssh with that config.
    std::fs::create_dir_all(home.dir.path().join(".ssh")).unwrap();
    std::fs::write(
        home.dir.path().join(".ssh/config"),
        "Host other\n    User me\n",
    )
    .unwrap();
    home.ok(&["ssh-config"]);
    home.ok(&["ssh-config"]);
    let user_config = home.dir.path().join(".ssh/config");
    let text = std::fs::read_to_string(&user_config).unwrap();
    assert_eq!(text.matches("Include ").count(), 1, "{text}");
    assert!(text.starts_with("# added by `banger ssh-config`"), "{text}");
    assert!(text.ends_with("Host other\n    User me\n"), "{text}");
    // OpenSSH finds ~/.ssh/config through the passwd entry, not $HOME: name it with -F.
    let out = Command::new("ssh")
        .envs(
            home.cmd(&[])
                .get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .arg("-F")
        .arg(&user_config)
        .args([
            "-o",
            "BatchMode=yes",
            "s.vm",
            "--",
            "cat",
            "/proc/sys/kernel/hostname",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "s\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    home.ok(&["ssh-config", "--uninstall"]);
    assert_eq!(
        std::fs::read_to_string(&user_config).unwrap(),
        "Host other\n    User me\n"
    );
    home.ok(&["vm", "rm", "-f", "s"]);

    // Interactive `vm run --rm` in tmux: a shell prompt, a command, exit, VM gone.
    let sock = format!("banger-test-{}", std::process::id());
    let mut line = String::from("env");
    for (k, v) in home.cmd(&[]).get_envs() {
        if let Some(v) = v {
            line.push_str(&format!(
                " {}='{}'",
                k.to_string_lossy(),
                v.to_string_lossy()
            ));
        }
    }
    line.push_str(&format!(
        " {} vm run --rm --name it; echo banger-run-exited-$?; sleep 60",
        bin("banger").display()
    ));
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .arg("-L")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap()
    };
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "120",
        "-y",
        "40",
        &line,
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let pane = |tmux: &dyn Fn(&[&str]) -> Output| {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned()
    };
    // Wait until the pane satisfies `done` (its whole text), never asserting on output that
    // may still be in flight: each step below waits for exactly what it checks.
    let wait_until = |what: &str, done: &dyn Fn(&str) -> bool| {
        let t0 = Instant::now();
        loop {
            let p = pane(&tmux);
            if done(&p) {
                guests::guest_wait(&guests::test_name(), what, t0.elapsed());
                return p;
            }
            assert!(t0.elapsed() < GUEST_WAIT, "{what} never appeared:\n{p}");
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    // A whole boot happens before the prompt.
    wait_until("prompt", &|p| p.contains("root@it:~#"));
    tmux(&[
        "send-keys",
        "-t",
        "t",
        "echo banger-$((6*7)); hostname",
        "Enter",
    ]);
    // The echo's line and then hostname's: both printed lines, in order (the typed command
    // line holds neither `banger-42` nor a line that is just `it`).
    let printed = |p: &str| {
        let lines: Vec<&str> = p.lines().map(str::trim_end).collect();
        lines
            .iter()
            .position(|l| *l == "banger-42")
            .is_some_and(|i| lines[i + 1..].contains(&"it"))
    };
    wait_until("hostname", &printed);
    tmux(&["send-keys", "-t", "t", "exit", "Enter"]);
    wait_until("exit", &|p| p.contains("banger-run-exited-0"));
    tmux(&["kill-server"]);
    assert!(
        home.json(&["vm", "ls", "--json"])
            .as_array()
            .unwrap()
            .is_empty(),
        "vm run --rm left the VM behind"
    );
}

/// `vm run --rm` on a guest whose agent does not answer in time (a 1 s agent timeout on
/// a TCG boot): the VM is kept and the error says where to look. (The guest is killed by
/// the test's cleanup well before its boot ends.)
#[test]
fn root_rig_vm_run_keeps_an_unreachable_vm_and_says_where_to_look() {
    let home = Home::with_config(None, "agent_timeout_secs = 1\n", "");
    let out = home.run(&["vm", "run", "--rm", "--name", "late", "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(1), "{err}");
    assert!(err.contains("see `banger vm logs late`"), "{err}");
    let vms = home.json(&["vm", "ls", "--json"]);
    assert_eq!(vms[0]["name"], "late", "{vms}");
}

/// `debugfs -R cmd` on an ext4 image (read-only), its stdout.
fn debugfs(img: &str, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", cmd, img])
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs {cmd}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Names in a directory of an ext4 image, without `.` and `..`.
fn ext4_ls(img: &str, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = debugfs(img, &format!("ls {dir}"))
        .split_whitespace()
        .filter(|w| !w.starts_with('(') && w.parse::<u64>().is_err())
        .filter(|w| *w != "." && *w != "..")
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

/// Entries of `<data>/images` (published images and any staging leftovers).
fn image_dirs(home: &Home) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.dir.path().join("data/banger/images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn root_rig_image_promote_makes_a_running_guests_root_an_image_that_boots() {
    let guest_dir = repo().join("target/guest");
    let home = Home::with_guests(
        2,
        None,
        "",
        &format!(
            "[images]\nguest_binaries_dir = \"{}\"\n",
            guest_dir.display()
        ),
    );

    // An unknown VM: not found (exit 4), and nothing is made.
    let out = home.run(&["image", "promote", "nosuch", "img"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(4), "{err}");
    assert!(err.contains("no vm named nosuch"), "{err}");

    home.ok(&["vm", "create", "--name", "src"]);
    // What the image must carry (owner, mode, setuid, a hard link, a symlink), and what it
    // must not (/tmp, the work disk at /root, another mounted filesystem, the identity).
    home.ok(&[
        "vm",
        "exec",
        "src",
        "--",
        "sh",
        "-ec",
        "mkdir -p /opt/promoted
         echo hello > /opt/promoted/data
         chown 1234:2345 /opt/promoted/data
         chmod 0640 /opt/promoted/data
         cp /bin/true /opt/promoted/suid
         chmod 4755 /opt/promoted/suid
         ln /opt/promoted/data /opt/promoted/data.link
         ln -s data /opt/promoted/data.sym
         echo junk > /tmp/scratch
         echo mine > /root/only-here
         mkdir -p /mnt/other && mount -t tmpfs none /mnt/other && echo x > /mnt/other/inside
         echo 0123456789abcdef0123456789abcdef > /etc/machine-id
         test -f /etc/ssh/ssh_host_ed25519_key",
    ]);
    let src_key = home.ok(&[
        "vm",
        "exec",
        "src",
        "--",
        "cat",
        "/etc/ssh/ssh_host_ed25519_key.pub",
    ]);

    let t0 = Instant::now();
    let out = home.run(&["image", "promote", "src", "promoted", "--json"]);
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "promote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(image["name"], "promoted");
    assert_eq!(image["kernel"], "rig", "the VM's kernel");
    let rootfs = image["rootfs"].as_str().unwrap().to_owned();
    let used = String::from_utf8_lossy(
        &Command::new("du")
            .args(["-sm", &rootfs])
            .output()
            .unwrap()
            .stdout,
    )
    .split_whitespace()
    .next()
    .unwrap_or("?")
    .to_owned();
    eprintln!(
        "image promote of a running TCG guest: {secs:.1} s, ext4 of {} MiB ({used} MiB used)",
        image["size_bytes"].as_u64().unwrap() >> 20
    );

    // The image itself, read on the host: mount points and /tmp empty, no identity.
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/tmp",
        "/root",
        "/mnt/other",
    ] {
        assert_eq!(ext4_ls(&rootfs, d), Vec::<String>::new(), "{d} is empty");
    }
    assert!(
        !ext4_ls(&rootfs, "/etc/ssh")
            .iter()
            .any(|n| n.starts_with("ssh_host_")),
        "no ssh host keys"
    );
    assert_eq!(debugfs(&rootfs, "cat /etc/machine-id"), "");
    assert!(!ext4_ls(&rootfs, "/etc").contains(&"hostname".to_owned()));
    assert!(!debugfs(&rootfs, "cat /etc/hosts").contains("127.0.1.1 src"));

    // The same name again: a conflict (exit 6) that leaves no staging directory behind.
    let out = home.run(&["image", "promote", "src", "promoted"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(6), "{err}");
    assert!(err.contains("exists already"), "{err}");
    assert_eq!(image_dirs(&home), ["promoted", "rig"]);

    // A VM made from it boots and finds the files as they were.
    home.ok(&["vm", "create", "--name", "dst", "--image", "promoted"]);
    let stat = |path: &str| {
        home.ok(&["vm", "exec", "dst", "--", "stat", "-c", "%a %u %g %i", path])
            .trim()
            .to_owned()
    };
    let data = stat("/opt/promoted/data");
    assert_eq!(&data[..data.rfind(' ').unwrap()], "640 1234 2345");
    assert_eq!(
        stat("/opt/promoted/data.link"),
        data,
        "a hard link, same inode"
    );
    assert!(
        stat("/opt/promoted/suid").starts_with("4755 0 0 "),
        "setuid kept"
    );
    assert_eq!(
        home.ok(&["vm", "exec", "dst", "--", "cat", "/opt/promoted/data.sym"]),
        "hello\n"
    );
    home.ok(&["vm", "exec", "dst", "--", "/opt/promoted/suid"]);
    for absent in ["/tmp/scratch", "/root/only-here", "/mnt/other/inside"] {
        home.ok(&["vm", "exec", "dst", "--", "test", "!", "-e", absent]);
    }
    assert_eq!(home.ok(&["vm", "exec", "dst", "--", "hostname"]), "dst\n");
    let dst_key = home.ok(&[
        "vm",
        "exec",
        "dst",
        "--",
        "cat",
        "/etc/ssh/ssh_host_ed25519_key.pub",
    ]);
    assert_ne!(src_key, dst_key, "a host key of its own");
    home.ok(&["vm", "rm", "-f", "dst"]);

    // A stopped VM: a conflict that says how to start it; nothing is made.
    home.ok(&["vm", "stop", "src"]);
    let out = home.run(&["image", "promote", "src", "again"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(6), "{err}");
    assert!(err.contains("banger vm start src"), "{err}");
    assert_eq!(image_dirs(&home), ["promoted", "rig"]);
    home.ok(&["vm", "rm", "-f", "src"]);
    home.ok(&["image", "rm", "promoted"]);
}

/// A plain rootfs (the rig's debootstrap tree: no banger-init, no agent) registered as it
/// is boots and runs a command: `image register` gave banger's copy the daemon's guest
/// binaries. With banger-init taken out of that copy again (an image registered before
/// banger did this), a start fails as soon as the console says the init is missing,
/// quoting the line, and the VM is stopped: the agent timeout here is 600 s, so a start
/// that waited for the agent (as it did) would outlast the test's own waits.
#[test]
fn root_rig_a_plain_rootfs_gets_bangers_guest_side_an_old_agent_is_replaced_and_a_missing_init_fails_at_once()
 {
    let guest_dir = repo().join("target/guest");
    let home = Home::with_config(
        None,
        "agent_timeout_secs = 600\n",
        &format!(
            "[images]\nguest_binaries_dir = \"{}\"\n",
            guest_dir.display()
        ),
    );
    let plain = rig()["BANGER_RIG_ROOTFS"].clone();
    home.ok(&["image", "register", "plain", &plain, "--kernel", "rig"]);
    home.ok(&["vm", "run", "--image", "plain", "--rm", "--", "true"]);
    let copy = home.dir.path().join("data/banger/images/plain/rootfs.ext4");

    // An image an older banger made: its agent has no revision mark (it listened on vsock
    // only, which QEMU VMs do not have). The next start gives it this banger's agent.
    let old_agent = home.dir.path().join("old-agent");
    std::fs::copy("/bin/true", &old_agent).unwrap();
    edit_image(
        &copy,
        &[
            "rm /usr/lib/banger/banger-agent".into(),
            format!("write {} /usr/lib/banger/banger-agent", old_agent.display()),
            "sif /usr/lib/banger/banger-agent mode 0100755".into(),
        ],
    );
    home.ok(&["vm", "run", "--image", "plain", "--rm", "--", "true"]);
    let agent = home.dir.path().join("agent-now");
    debugfs(
        copy.to_str().unwrap(),
        &format!("dump /usr/lib/banger/banger-agent {}", agent.display()),
    );
    assert_eq!(
        std::fs::read(&agent).unwrap(),
        std::fs::read(guest_dir.join("banger-agent")).unwrap(),
        "the image has this banger's agent"
    );
    let log = std::fs::read_to_string(home.dir.path().join("state/banger/bangerd.log")).unwrap();
    assert!(
        log.contains("gave the image this banger's guest binaries"),
        "{log}"
    );

    let out = Command::new("debugfs")
        .args(["-w", "-R", "rm /usr/lib/banger/banger-init"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = home.run(&[
        "vm", "run", "--image", "plain", "--name", "noinit", "--", "true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(1), "{err}");
    assert!(
        err.contains("vm noinit cannot boot: its image has no banger init (the console says \"")
            && err.contains("/usr/lib/banger/banger-init"),
        "{err}"
    );
    assert_eq!(err.matches("kept").count(), 1, "{err}");
    let vm = home.json(&["vm", "show", "noinit", "--json"]);
    assert_eq!(vm["state"], "stopped", "{vm}");
}

/// One request to a published port: `GET /<n>` as one line, the whole answer (the guest's
/// server closes after it, and that close must come through).
fn published_get(port: u16, n: usize) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(GUEST_WAIT))?;
    s.write_all(format!("GET /{n}\n").as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

fn published_port(home: &Home, vm: &str, guest: u16) -> Option<u16> {
    let list = home.json(&["vm", "port", "list", vm, "--json"]);
    list.as_array()
        .unwrap()
        .iter()
        .find(|p| p["guest_port"] == guest && p["host_ip"] == "127.0.0.1")
        .and_then(|p| p["bound_port"].as_u64())
        .map(|p| p as u16)
}

/// `--publish 0:8000` to a server in a real guest (socat, started with `vm exec`): 50
/// concurrent connections all answered through the agent; the daemon killed with SIGKILL
/// and restarted re-binds the same host port, which answers again; `vm port add|rm` on the
/// running VM bind and unbind at once; a taken host port is an error naming it; after a
/// stop the port is closed. One boot.
#[test]
fn root_rig_published_ports_reach_a_guest_server_across_a_daemon_sigkill() {
    let home = Home::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let in_use = format!("host port 127.0.0.1:{taken_port} is already in use");
    home.ok(&["vm", "create", "--name", "web", "--publish", "0:8000"]);
    let vm = home.json(&["vm", "show", "web", "--json"]);
    let port = vm["published"][0]["bound_port"].as_u64().expect("bound") as u16;
    assert_eq!(published_port(&home, "web", 8000), Some(port));
    // A server that reads one line and answers it, then closes.
    home.ok(&[
        "vm",
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "setsid socat TCP-LISTEN:8000,fork,reuseaddr 'SYSTEM:read l; echo HTTP/1.0 200 OK; echo; echo got $l' </dev/null >/dev/null 2>&1 &",
    ]);
    let t0 = Instant::now();
    loop {
        let ports = home.json(&["vm", "ports", "web", "--json"]);
        if ports
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 8000 && p["proto"] == "tcp")
        {
            break;
        }
        assert!(t0.elapsed() < GUEST_WAIT, "socat never listened: {ports}");
        std::thread::sleep(Duration::from_millis(200));
    }
    guests::guest_wait(&guests::test_name(), "socat-listening", t0.elapsed());

    let t0 = Instant::now();
    let clients: Vec<_> = (0..50)
        .map(|n| std::thread::spawn(move || (n, published_get(port, n))))
        .collect();
    for c in clients {
        let (n, answer) = c.join().unwrap();
        let answer = answer.unwrap_or_else(|e| panic!("connection {n}: {e}"));
        assert!(answer.starts_with("HTTP/1.0 200 OK\n"), "{n}: {answer:?}");
        assert!(answer.contains(&format!("got GET /{n}")), "{n}: {answer:?}");
    }
    eprintln!(
        "50 concurrent requests through a published port: {:?}",
        t0.elapsed()
    );

    // The daemon dies; the guest and its server live on. The next command starts a new
    // daemon, which re-adopts the VM and re-binds the port it had.
    let daemon = home.daemon_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(i64::from(daemon)) {
        assert!(Instant::now() < deadline, "bangerd did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        published_port(&home, "web", 8000),
        Some(port),
        "the same port"
    );
    assert_ne!(home.daemon_pid(), daemon);
    let answer = published_get(port, 51).unwrap();
    assert!(answer.contains("got GET /51"), "{answer:?}");

    // Added on the running VM: bound at once; a taken port is named; removed: closed.
    let out = home.run(&["vm", "port", "add", "web", &format!("{taken_port}:8000")]);
    assert_eq!(code(&out), Some(6));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&in_use),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(taken);
    let fixed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    home.ok(&["vm", "port", "add", "web", &format!("{fixed}:8000")]);
    assert!(published_get(fixed, 52).unwrap().contains("got GET /52"));
    home.ok(&["vm", "port", "rm", "web", &fixed.to_string()]);
    assert!(
        published_get(fixed, 53).is_err(),
        "removed: nothing listens"
    );

    // Stopped: the port is closed, and shown as not bound.
    home.ok(&["vm", "stop", "web", "--timeout", "3"]);
    assert!(published_get(port, 54).is_err(), "stopped: nothing listens");
    assert_eq!(published_port(&home, "web", 8000), None);
    home.ok(&["vm", "rm", "web"]);
}

/// On one real guest: `run -d` boots a VM and returns, its command running in the
/// background with `-e` and `-w`; `exec` takes the command without `--`; `cp` follows
/// `docker cp`: a directory DST receives SRC inside it, another DST is SRC's new name,
/// `SRC/.` copies a directory's content, `-` is a tar stream on stdin or stdout, modes are
/// kept, and a missing guest path is not found (4).
#[test]
fn root_rig_vm_cp_run_detached_and_exec_without_dashes() {
    use std::os::unix::fs::PermissionsExt;
    let home = Home::new();
    let name = home.ok(&[
        "run",
        "-d",
        "--name",
        "cp",
        "-e",
        "GREETING=hi",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $GREETING $(pwd) > /root/detached.txt; exec sleep 1000",
    ]);
    assert_eq!(name.trim(), "cp");
    assert_eq!(
        home.json(&["vm", "show", "cp", "--json"])["state"],
        "running"
    );
    // The background command writes its file soon after; wait for it (bounded).
    let deadline = Instant::now() + GUEST_WAIT;
    let detached = loop {
        let out = home.run(&["exec", "cp", "cat", "/root/detached.txt"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(Instant::now() < deadline, "the detached command never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(detached, "hi /tmp\n");
    // exec without `--`, flags of the command included.
    assert!(
        home.ok(&["exec", "cp", "ls", "-la", "/root"])
            .contains("detached.txt")
    );

    let host = tempfile::tempdir().unwrap();
    let app = host.path().join("app");
    std::fs::create_dir_all(app.join("bin")).unwrap();
    std::fs::write(app.join("a.txt"), "A\n").unwrap();
    std::fs::write(app.join("bin/run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        app.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let app_s = app.to_str().unwrap();
    // Into a directory: /root/app.
    home.ok(&["cp", app_s, "cp:/root/"]);
    assert_eq!(home.ok(&["exec", "cp", "cat", "/root/app/a.txt"]), "A\n");
    assert_eq!(
        home.ok(&["exec", "cp", "stat", "-c", "%a", "/root/app/bin/run.sh"]),
        "750\n"
    );
    // A file under a new name; a directory's content into a new directory.
    home.ok(&[
        "vm",
        "cp",
        app.join("a.txt").to_str().unwrap(),
        "cp:/root/b.txt",
    ]);
    assert_eq!(home.ok(&["exec", "cp", "cat", "/root/b.txt"]), "A\n");
    home.ok(&["cp", &format!("{app_s}/."), "cp:/root/flat"]);
    assert_eq!(home.ok(&["exec", "cp", "cat", "/root/flat/a.txt"]), "A\n");

    // Out of the guest: a directory into an existing one, a file under a new name.
    let out = host.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    home.ok(&["cp", "cp:/root/app", out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(out.join("app/a.txt")).unwrap(),
        "A\n"
    );
    let mode = std::fs::metadata(out.join("app/bin/run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750);
    home.ok(&[
        "cp",
        "cp:/root/detached.txt",
        out.join("d.txt").to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(out.join("d.txt")).unwrap(),
        "hi /tmp\n"
    );

    // `-`: a tar on stdout, under SRC's name; a tar on stdin, unpacked into DST.
    let tar_out = home.cmd(&["cp", "cp:/root/app", "-"]).output().unwrap();
    assert!(
        tar_out.status.success(),
        "{}",
        String::from_utf8_lossy(&tar_out.stderr)
    );
    let mut names: Vec<String> = tar::Archive::new(tar_out.stdout.as_slice())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    names.sort();
    assert!(names.contains(&"app/a.txt".to_owned()), "{names:?}");
    assert!(names.contains(&"app/bin/run.sh".to_owned()), "{names:?}");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "x/y.txt", &b"yes"[..]).unwrap();
    let tarball = b.into_inner().unwrap();
    let mut child = home
        .cmd(&["cp", "-", "cp:/root/in"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &tarball).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert_eq!(home.ok(&["exec", "cp", "cat", "/root/in/x/y.txt"]), "yes");

    let missing = home.run(&["cp", "cp:/nope", out.to_str().unwrap()]);
    assert_eq!(
        code(&missing),
        Some(4),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    home.ok(&["rm", "-f", "cp"]);
}

/// The guest's uptime (seconds, its own clock) and the counter its loop keeps in
/// /tmp/count, read in one exec.
fn uptime_and_count(home: &Home, vm: &str) -> (f64, u64) {
    let out = home.ok(&[
        "vm",
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        "cat /proc/uptime; cat /tmp/count 2>/dev/null || echo 0",
    ]);
    let mut lines = out.lines();
    let uptime = lines.next().and_then(|l| l.split(' ').next()).unwrap();
    let count = lines.next().unwrap_or("0").trim();
    (uptime.parse().unwrap(), count.parse().unwrap())
}

#[test]
fn root_rig_a_paused_guest_stands_still_refuses_exec_stays_paused_across_a_restart_and_resumes() {
    let home = Home::new();
    home.ok(&["vm", "create", "--name", "pz"]);
    home.wait_console("pz", "banger-init: ready");
    let pid = home.json(&["vm", "show", "pz", "--json"])["pid"]
        .as_i64()
        .unwrap();
    // A guest-side counter: a loop that counts (and writes the count) on its own.
    home.ok(&[
        "vm",
        "exec",
        "pz",
        "--",
        "sh",
        "-c",
        "setsid -f sh -c 'n=0; while :; do n=$((n+1)); echo $n > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done' </dev/null >/dev/null 2>&1",
    ]);
    let t0 = Instant::now();
    while uptime_and_count(&home, "pz").1 == 0 {
        assert!(t0.elapsed() < GUEST_WAIT, "the counter never counted");
    }

    // The guest's clock across a window in which it is paused for at least PAUSED (on
    // the host's clock), against the host's clock over the same window: paused, the
    // guest's clock (QEMU's virtual clock, its TSC) stands still, so the guest sees at
    // most the window minus the pause. Unpaused it would see all of it.
    const PAUSED: Duration = Duration::from_secs(6);
    let window = Instant::now();
    let (up1, n1) = uptime_and_count(&home, "pz");
    let out = home.run(&["vm", "pause", "pz"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "pz is paused\n");
    let paused_at = Instant::now();
    // A no-op when paused already.
    home.ok(&["vm", "pause", "pz"]);
    let shown = home.json(&["vm", "show", "pz", "--json"]);
    assert_eq!(shown["state"], "paused");
    let ps = home.ok(&["ps", "--format", "name,state"]);
    assert!(
        ps.lines()
            .any(|l| l.split_whitespace().eq(["pz", "paused"])),
        "`banger ps` lists it paused: {ps}"
    );

    // What needs the guest says it is paused, with the conflict status.
    for args in [
        &["vm", "exec", "pz", "--", "true"][..],
        &["exec", "pz", "true"],
        &["vm", "ssh", "pz", "true"],
        &["vm", "cp", "pz:/etc/hostname", "-"],
    ] {
        let out = home.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), Some(6), "{args:?}: {err}");
        assert!(
            err.contains("vm pz is paused; `banger vm resume pz`"),
            "{args:?}: {err}"
        );
    }
    let out = home.run(&["vm", "start", "pz"]);
    assert_eq!(
        code(&out),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A daemon restart asks QEMU (query-status) and finds it paused.
    let daemon = home.daemon_pid();
    home.ok(&["daemon", "stop"]);
    let shown = home.json(&["vm", "show", "pz", "--json"]);
    assert_ne!(home.daemon_pid(), daemon, "a new daemon");
    assert_eq!(shown["state"], "paused");
    assert_eq!(shown["pid"].as_i64(), Some(pid), "the same QEMU");
    let rest = PAUSED.saturating_sub(paused_at.elapsed());
    std::thread::sleep(rest); // the pause being measured, not a wait for anything
    let resumed_at = Instant::now();
    let out = home.run(&["resume", "pz"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "pz is running\n");
    let paused = resumed_at - paused_at;
    let (up2, n2) = uptime_and_count(&home, "pz");
    let host = window.elapsed().as_secs_f64();
    let guest = up2 - up1;
    eprintln!(
        "host {host:.2}s, paused {:.2}s, guest {guest:.2}s, counter +{}",
        paused.as_secs_f64(),
        n2 - n1
    );
    // A whole second of slack for /proc/uptime's rounding and the clocks' rates.
    assert!(
        guest < host - paused.as_secs_f64() + 1.0,
        "the guest's clock ran while paused: {guest:.2}s of {host:.2}s, paused {:.2}s",
        paused.as_secs_f64()
    );
    // The counter sleeps 0.1 s (of the guest's time) a round: it counted only while the
    // guest ran.
    assert!(
        (n2 - n1) as f64 <= guest / 0.1 + 2.0,
        "the counter ran while paused: +{} in {guest:.2}s of guest time",
        n2 - n1
    );
    // Resumed, the counter goes on, and exec works again.
    let t0 = Instant::now();
    while uptime_and_count(&home, "pz").1 <= n2 {
        assert!(t0.elapsed() < GUEST_WAIT, "the counter stopped for good");
    }
    assert_eq!(
        home.ok(&["vm", "exec", "pz", "--", "echo", "back"]),
        "back\n"
    );

    // Stop of a paused VM: resumed, then shut down from inside (not killed).
    home.ok(&["pause", "pz"]);
    let out = home.run(&["vm", "stop", "pz", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stopped[0]["state"], "stopped");
    let log = home.ok(&["vm", "logs", "pz"]);
    assert!(
        log.contains("banger-init: shutting down"),
        "the guest shut down from inside: {}",
        &log[log.len().saturating_sub(3000)..]
    );
    assert!(!alive(pid));
    let out = home.run(&["vm", "pause", "pz"]);
    assert_eq!(code(&out), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not running (stopped)"));
    home.ok(&["vm", "rm", "pz"]);
}

/// The guest's wall clock minus the host's, in seconds: bounded by the host's clock read
/// before and after the exec that reads the guest's (so the exec's own time is no error).
fn guest_clock_offset(home: &Home, vm: &str) -> (f64, f64) {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = now();
    let guest: f64 = home
        .ok(&["vm", "exec", vm, "--", "date", "+%s.%N"])
        .trim()
        .parse()
        .unwrap();
    let after = now();
    (guest - after, guest - before)
}

/// What the listener started before the first suspend says to a connection: its pid and
/// how many connections it has served (its memory).
fn ask_listener(home: &Home, vm: &str) -> (u32, u32) {
    ask_listener_with(
        home,
        vm,
        "$c = IO::Socket::INET->new('127.0.0.1:7777') or die \"connect: $!\"; print scalar <$c>",
    )
}

/// As [`ask_listener`], for a listener just started in the background: perl takes a moment
/// to bind under TCG, so connecting is retried (in the guest, for up to 60 s).
fn ask_new_listener(home: &Home, vm: &str) -> (u32, u32) {
    ask_listener_with(
        home,
        vm,
        "for (1..600) { $c = IO::Socket::INET->new('127.0.0.1:7777') and last; select(undef, undef, undef, 0.1) } $c or die \"connect: $!\"; print scalar <$c>",
    )
}

fn ask_listener_with(home: &Home, vm: &str, script: &str) -> (u32, u32) {
    let out = home.ok(&[
        "vm",
        "exec",
        vm,
        "--",
        "perl",
        "-MIO::Socket::INET",
        "-e",
        script,
    ]);
    parse_listener(&out)
}

fn parse_listener(out: &str) -> (u32, u32) {
    let mut it = out.split_whitespace().map(|w| w.parse::<u32>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// The counter the guest's loop keeps in `/root/counter`: it writes each value to a new
/// file and renames it into place, so a read never sees the file truncated and not yet
/// written (CI saw `cat` read it empty when the loop wrote it in place). 0 before the
/// loop's first write (the loop is started in the background: CI saw the first read
/// come before it).
fn guest_counter(home: &Home, vm: &str) -> u64 {
    home.ok(&[
        "vm",
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        "cat /root/counter 2>/dev/null || echo 0",
    ])
    .trim()
    .parse()
    .unwrap()
}

/// Wait until the guest's counter passes `past` (the process that writes it runs).
fn counter_passes(home: &Home, vm: &str, past: u64) -> u64 {
    let deadline = Instant::now() + GUEST_WAIT;
    loop {
        let now = guest_counter(home, vm);
        if now > past {
            return now;
        }
        assert!(Instant::now() < deadline, "the counter stays at {now}");
    }
}

/// Suspend → start, five cycles: the guest goes on where it was each time (a process
/// started before the first suspend still runs with its memory: a counter it keeps
/// writing, a tmpfs file, an open TCP listener that counts its connections), files written
/// between cycles are all there, the clock is the host's again, and no QEMU runs while it
/// is suspended. Then: a suspended VM stays suspended across a daemon restart, `vm stop`
/// of a suspended VM discards its state (the next start boots), and `vm rm` of a
/// suspended VM removes it. Under TCG here a cycle costs about 2 s (suspend 0.3 s, restore
/// to agent-ready about 1 s, the checks' execs), so the suite affords the issue's five.
#[test]
fn root_rig_suspend_and_start_restore_a_running_guest_where_it_was() {
    let home = Home::new();
    home.ok(&["vm", "create", "--name", "s"]);
    let shown = home.json(&["vm", "show", "s", "--json"]);
    let dir = PathBuf::from(shown["dir"].as_str().unwrap());
    home.ok(&[
        "vm",
        "exec",
        "s",
        "--",
        "sh",
        "-c",
        "mkdir -p /run/t && echo in-tmpfs > /run/t/f \
         && (i=0; while :; do i=$((i+1)); echo $i > /root/counter.new; mv /root/counter.new /root/counter; sleep 0.05; done) >/dev/null 2>&1 & \
         perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => 7777, Listen => 5, ReuseAddr => 1) or die; $n = 0; while ($c = $s->accept) { $n++; print $c \"$$ $n\\n\"; close $c }' >/dev/null 2>&1 &",
    ]);
    let mut counter = counter_passes(&home, "s", 0);
    let (listener, mut served) = ask_new_listener(&home, "s");
    assert_eq!(served, 1);
    let tmpfs_dev = home.ok(&["vm", "exec", "s", "--", "stat", "-f", "-c", "%T", "/run/t"]);
    assert_eq!(tmpfs_dev.trim(), "tmpfs");

    for cycle in 1..=5 {
        home.ok(&[
            "vm",
            "exec",
            "s",
            "--",
            "sh",
            "-c",
            &format!("echo {cycle} > /root/cycle-{cycle} && sync"),
        ]);
        let pid = home.json(&["vm", "show", "s", "--json"])["pid"]
            .as_i64()
            .unwrap();
        let t0 = Instant::now();
        let out = home.json(&["vm", "suspend", "s", "--json"]);
        let suspend_s = t0.elapsed().as_secs_f64();
        assert_eq!(out[0]["state"], "suspended", "{out}");
        let vm = home.json(&["vm", "show", "s", "--json"]);
        assert_eq!(vm["state"], "suspended");
        assert!(vm["pid"].is_null(), "{vm}");
        assert!(!alive(pid), "the VMM is gone (its memory freed)");
        assert!(dir.join("state").is_dir() && !dir.join("state.tmp").exists());
        let ps = home.ok(&["ps", "-a"]);
        assert!(ps.contains("suspended"), "{ps}");
        let shown = home.ok(&["vm", "show", "s"]);
        assert!(
            shown.contains("saved:    ") && shown.contains("on disk"),
            "{shown}"
        );
        assert!(
            vm["saved_bytes"].as_u64().is_some_and(|b| b > 1 << 20),
            "{vm}"
        );
        if cycle == 2 {
            // A suspended VM is a record and files only: a new daemon finds it suspended.
            home.ok(&["daemon", "stop"]);
            assert_eq!(
                home.json(&["vm", "show", "s", "--json"])["state"],
                "suspended"
            );
            // A while suspended, as users leave VMs: the guest's clock would lag this.
            std::thread::sleep(Duration::from_secs(2));
        }

        let t0 = Instant::now();
        let out = home.run(&["vm", "start", "s"]);
        let start_s = t0.elapsed().as_secs_f64();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}\n{}", home.daemon_log_tail(30));
        assert!(err.contains("restore"), "a restore, not a boot: {err}");
        assert!(!dir.join("state").exists(), "a restore consumes the state");
        eprintln!("cycle {cycle}: suspend {suspend_s:.2}s, start (restore) {start_s:.2}s");

        // Where it was: the same processes, their memory, the tmpfs.
        let (pid_now, n) = ask_listener(&home, "s");
        assert_eq!(pid_now, listener, "the same listener process");
        assert_eq!(n, served + 1, "the listener kept its count");
        served = n;
        let c = guest_counter(&home, "s");
        assert!(
            c >= counter,
            "the counter went on from {counter}, not over: {c}"
        );
        counter = counter_passes(&home, "s", c);
        assert_eq!(
            home.ok(&["vm", "exec", "s", "--", "cat", "/run/t/f"]),
            "in-tmpfs\n"
        );
        let files = home.ok(&["vm", "exec", "s", "--", "sh", "-c", "cat /root/cycle-*"]);
        let want: String = (1..=cycle).map(|i| format!("{i}\n")).collect();
        assert_eq!(files, want);
        let (lo, hi) = guest_clock_offset(&home, "s");
        assert!(
            lo > -1.0 && hi < 1.0,
            "cycle {cycle}: the guest's clock is off the host's by {lo:.3}..{hi:.3} s"
        );
    }

    // A restore that cannot load: a clear error, the VM left suspended with its state, no
    // QEMU left behind; once the file is back it restores.
    home.ok(&["vm", "suspend", "s"]);
    let state = dir.join("state/vm.state");
    let aside = dir.join("vm.state.aside");
    std::fs::rename(&state, &aside).unwrap();
    let out = home.run(&["vm", "start", "s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("saved state") && err.contains("missing"),
        "{err}"
    );
    let vm = home.json(&["vm", "show", "s", "--json"]);
    assert_eq!(vm["state"], "suspended", "{vm}");
    assert!(vm["pid"].is_null());
    std::fs::rename(&aside, &state).unwrap();
    // Truncated: QEMU refuses the load, and the start says what QEMU said.
    let full = std::fs::read(&state).unwrap();
    std::fs::write(&state, &full[..4096]).unwrap();
    let out = home.run(&["vm", "start", "s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("migration") || err.contains("QMP"), "{err}");
    assert_eq!(
        home.json(&["vm", "show", "s", "--json"])["state"],
        "suspended"
    );
    assert!(
        !home.ok(&["ps", "-a"]).contains("running"),
        "no VMM runs after a failed load"
    );
    std::fs::write(&state, &full).unwrap();
    drop(full);
    let out = home.run(&["vm", "start", "s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ask_listener(&home, "s").0, listener, "restored after all");

    // stop of a suspended VM discards the saved state; the next start boots.
    home.ok(&["vm", "suspend", "s"]);
    let out = home.json(&["vm", "stop", "s", "--json"]);
    assert_eq!(out[0]["state"], "stopped");
    assert!(!dir.join("state").exists());
    let out = home.run(&["vm", "start", "s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("boot") && !err.contains("restore"), "{err}");
    assert_eq!(
        home.ok(&["vm", "exec", "s", "--", "sh", "-c", "cat /root/cycle-*"]),
        "1\n2\n3\n4\n5\n",
        "the work disk is kept"
    );

    // Refused where it makes no sense, with the conflict status.
    home.ok(&["vm", "suspend", "s"]);
    let again = home.run(&["vm", "suspend", "s"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already suspended"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // rm of a suspended VM removes it and its state.
    home.ok(&["vm", "rm", "s"]);
    assert!(!dir.exists());
}

/// `vm snapshot create` of a running guest, then changes (a file on its disk and one in
/// its tmpfs rewritten, a new file, the listener process killed), then `vm rollback`:
/// everything is as at the snapshot, memory included (the same listener process with its
/// count, the tmpfs file), its clock is the host's. The snapshot is kept, so a second
/// rollback works too. The VM runs on during the snapshot (the same VMM, the listener
/// answers). Bad input: a snapshot whose file was truncated is refused with what is wrong
/// and the VM is left running as it was; an unknown snapshot is "not found" (exit 4).
#[test]
fn root_rig_rollback_puts_a_running_guest_back_to_its_snapshot_memory_included() {
    let home = Home::new();
    home.ok(&["vm", "create", "--name", "r"]);
    home.ok(&[
        "vm",
        "exec",
        "r",
        "--",
        "sh",
        "-c",
        "mkdir -p /run/t && echo then > /run/t/f && echo then > /root/file && sync \
         && perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => 7777, Listen => 5, ReuseAddr => 1) or die; $n = 0; while ($c = $s->accept) { $n++; print $c \"$$ $n\\n\"; close $c }' >/dev/null 2>&1 &",
    ]);
    let (listener, served) = ask_new_listener(&home, "r");
    assert_eq!(served, 1);
    let pid = home.json(&["vm", "show", "r", "--json"])["pid"]
        .as_i64()
        .unwrap();

    let t0 = Instant::now();
    let snap = home.json(&["vm", "snapshot", "create", "r", "before", "--json"]);
    let snapshot_s = t0.elapsed().as_secs_f64();
    assert_eq!(snap["name"], "before", "{snap}");
    assert_eq!(snap["vm"], "r");
    assert_eq!(snap["vmm"], "qemu");
    assert!(
        snap["vmm_version"]
            .as_str()
            .is_some_and(|v| v.contains("QEMU")),
        "{snap}"
    );
    assert!(
        snap["bytes"].as_u64().is_some_and(|b| b > 1 << 20),
        "{snap}"
    );
    let snap_dir = PathBuf::from(snap["dir"].as_str().unwrap());
    assert!(snap_dir.join("state/vm.state").is_file());
    // It ran on: the same VMM, the listener answers on.
    let vm = home.json(&["vm", "show", "r", "--json"]);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["pid"].as_i64(), Some(pid), "the same VMM");
    assert_eq!(ask_listener(&home, "r"), (listener, 2));
    assert_eq!(vm["snapshots"][0]["name"], "before", "{vm}");
    let listed = home.ok(&["vm", "snapshot", "ls", "r"]);
    assert!(
        listed.contains("before") && listed.contains("NAME"),
        "{listed}"
    );
    let shown = home.ok(&["vm", "snapshot", "show", "r", "before"]);
    assert!(shown.contains("vmm:      qemu (QEMU"), "{shown}");

    // Everything changes.
    home.ok(&[
        "vm",
        "exec",
        "r",
        "--",
        "sh",
        "-c",
        &format!(
            "echo later > /root/file && echo later > /run/t/f && touch /root/new && kill {listener} && sync"
        ),
    ]);

    for round in 1..=2 {
        let t0 = Instant::now();
        let back = home.json(&["vm", "rollback", "r", "before", "--json"]);
        let rollback_s = t0.elapsed().as_secs_f64();
        assert_eq!(back["state"], "running", "{back}");
        assert_ne!(back["pid"].as_i64(), Some(pid), "a new VMM");
        eprintln!("snapshot {snapshot_s:.2}s, rollback {round} {rollback_s:.2}s");
        // As at the snapshot: the same listener (which had served one), the files.
        assert_eq!(ask_listener(&home, "r"), (listener, 2), "round {round}");
        assert_eq!(
            home.ok(&["vm", "exec", "r", "--", "cat", "/root/file"]),
            "then\n"
        );
        assert_eq!(
            home.ok(&["vm", "exec", "r", "--", "cat", "/run/t/f"]),
            "then\n"
        );
        let new = home.run(&["vm", "exec", "r", "--", "test", "-e", "/root/new"]);
        assert_eq!(code(&new), Some(1), "/root/new is from after the snapshot");
        let (lo, hi) = guest_clock_offset(&home, "r");
        assert!(
            lo > -1.0 && hi < 1.0,
            "the guest's clock is off the host's by {lo:.3}..{hi:.3} s"
        );
        assert!(
            snap_dir.join("state/vm.state").is_file(),
            "the snapshot is kept"
        );
        home.ok(&[
            "vm",
            "exec",
            "r",
            "--",
            "sh",
            "-c",
            "echo later > /root/file && sync",
        ]);
    }

    // A snapshot cut short on disk: refused before anything changes.
    let pid = home.json(&["vm", "show", "r", "--json"])["pid"]
        .as_i64()
        .unwrap();
    let state = snap_dir.join("state/vm.state");
    let full = std::fs::read(&state).unwrap();
    std::fs::write(&state, &full[..4096]).unwrap();
    let out = home.run(&["vm", "rollback", "r", "before"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(6), "a conflict: {err}");
    assert!(
        err.contains("is 4096 bytes") && err.contains("left as it was"),
        "{err}"
    );
    let vm = home.json(&["vm", "show", "r", "--json"]);
    assert_eq!(
        (vm["state"].as_str(), vm["pid"].as_i64()),
        (Some("running"), Some(pid))
    );
    assert_eq!(
        home.ok(&["vm", "exec", "r", "--", "cat", "/root/file"]),
        "later\n"
    );
    let out = home.run(&["vm", "rollback", "r", "nope"]);
    assert_eq!(
        code(&out),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    home.ok(&["vm", "snapshot", "rm", "r", "before"]);
    assert!(!snap_dir.exists());
    assert_eq!(
        home.json(&["vm", "snapshot", "ls", "--json"]),
        serde_json::json!([])
    );
    home.ok(&["vm", "rm", "-f", "r"]);
}

/// `vm fork a --count 3` on real guests with networks (the daemon in a namespace of its
/// own): four running VMs, each its own machine — distinct hostname, machine id, ssh host
/// key (`vm ssh` with strict host-key checking passes for each), address and MAC (its
/// lease's, on its NIC); all four reach each other by `.vm` name; a file written in `a`
/// before the fork is in each clone, one written in a clone afterwards only there; a
/// process that ran in `a` before the fork runs in each clone. The bridge never saw one
/// address answered by two MACs (`ip monitor neigh` through the fork, and `ip neigh`
/// after). The three clones are restored, not booted: the test holds two guest slots.
#[test]
fn root_rig_fork_makes_clones_that_are_each_their_own_machine() {
    let topo = Topology::new();
    let home = Home::with_guests(2, Some(&topo.host), "", "");
    home.ok(&["vm", "create", "--name", "a"]);
    let sh = |vm: &str, cmd: &str| home.ok(&["vm", "exec", vm, "--", "sh", "-c", cmd]);
    sh(
        "a",
        "echo before > /root/before-fork && sync && (nohup sleep 777777 >/dev/null 2>&1 &)",
    );
    // `ip netns exec` execs `ip monitor` in place: the child is the monitor.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &topo.host, "ip", "monitor", "neigh"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = Collected::new(child.stdout.take().unwrap());
    let monitor = KillOnDrop(child);

    let t0 = std::time::Instant::now();
    let clones = home.json(&["vm", "fork", "a", "--count", "3", "--json"]);
    eprintln!("fork --count 3: {:.1}s", t0.elapsed().as_secs_f64());
    let clones: Vec<String> = clones
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(clones, ["a-1", "a-2", "a-3"]);
    let all: Vec<&str> = std::iter::once("a")
        .chain(clones.iter().map(String::as_str))
        .collect();

    let mut facts: Vec<(String, String, String, String, String)> = Vec::new();
    for vm in &all {
        let shown = home.json(&["vm", "show", vm, "--json"]);
        assert_eq!(shown["state"], "running", "{shown}");
        let ip = shown["ip"].as_str().unwrap().to_owned();
        let out = sh(
            vm,
            // The rig's image has an empty machine id: `a` may have none.
            "hostname; echo id=$(cat /etc/machine-id 2>/dev/null); cat /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2; \
             cat /sys/class/net/eth0/address; ip -4 -o addr show eth0 | awk '{print $4}'",
        );
        let l: Vec<&str> = out.lines().collect();
        assert_eq!(l.len(), 5, "{vm}: {out}");
        assert_eq!(l[0], *vm, "{vm}'s hostname");
        assert_eq!(
            l[4],
            format!("{ip}/24"),
            "{vm}: its own lease, alone on eth0: {out}"
        );
        let o: Vec<u8> = ip.split('.').map(|x| x.parse().unwrap()).collect();
        let mac = format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        assert_eq!(l[3], mac, "{vm}: its lease's MAC");
        facts.push((
            l[0].into(),
            l[1].into(),
            l[2].into(),
            l[3].into(),
            ip.clone(),
        ));
        // What `a` had before the fork, and a process that ran then.
        assert_eq!(sh(vm, "cat /root/before-fork"), "before\n", "{vm}");
        assert!(
            !sh(vm, "pgrep -f 'sleep 777777' || true").trim().is_empty(),
            "{vm}: the process from before the fork runs"
        );
        // strict host-key checking against the key the agent reports passes.
        assert_eq!(
            home.ok(&["vm", "ssh", vm, "--", "hostname"]),
            format!("{vm}\n")
        );
    }
    for i in 0..facts.len() {
        for j in i + 1..facts.len() {
            let (a, b) = (&facts[i], &facts[j]);
            assert!(
                a.0 != b.0 && a.1 != b.1 && a.2 != b.2 && a.3 != b.3 && a.4 != b.4,
                "{a:?} and {b:?} share an identity"
            );
        }
    }
    // Files written after the fork are each VM's own.
    for vm in &clones {
        sh(vm, &format!("echo {vm} > /root/after-{vm} && sync"));
    }
    for vm in &all {
        let have = sh(vm, "ls /root | grep after- || true");
        let want = if *vm == "a" {
            String::new()
        } else {
            format!("after-{vm}\n")
        };
        assert_eq!(have, want, "{vm}");
    }
    // All four by name, each from each.
    for vm in &all {
        let others: Vec<String> = all
            .iter()
            .filter(|o| *o != vm)
            .map(|o| format!("{o}.vm"))
            .collect();
        sh(
            vm,
            &format!(
                "for h in {}; do ping -c 1 -W 5 $h >/dev/null || {{ echo no answer from $h; exit 1; }}; done",
                others.join(" ")
            ),
        );
    }
    // One MAC per address on the bridge, the lease's: during the fork and after (the
    // bridge's neighbour entries); and each guest's MAC learnt on one bridge port only,
    // its own (the bridge's fdb events: a clone that sent with its source's MAC before
    // taking its own would show it on a second port).
    let neigh = in_ns(&topo.host, "ip neigh show dev banger0");
    drop(monitor);
    let monitored = seen.finish();
    type Seen = std::collections::HashMap<String, std::collections::HashSet<String>>;
    let (mut macs, mut ports): (Seen, Seen) = Default::default();
    for line in monitored.lines().chain(neigh.lines()) {
        let f: Vec<&str> = line
            .split_whitespace()
            .skip_while(|w| *w == "Deleted")
            .collect();
        let (Some(first), Some(mac)) = (
            f.first(),
            f.iter()
                .position(|w| *w == "lladdr")
                .and_then(|i| f.get(i + 1)),
        ) else {
            continue;
        };
        if line.contains("NOARP") || line.contains("PERMANENT") {
            continue; // multicast, and the taps' own addresses
        }
        if first.parse::<std::net::IpAddr>().is_ok() {
            macs.entry((*first).to_owned())
                .or_default()
                .insert((*mac).to_owned());
        } else if *first == "dev"
            && let Some(port) = f.get(1)
        {
            ports
                .entry((*mac).to_owned())
                .or_default()
                .insert((*port).to_owned());
        }
    }
    for (_, _, _, mac, ip) in &facts {
        if let Some(seen) = macs.get(ip) {
            assert_eq!(
                seen.iter().collect::<Vec<_>>(),
                vec![mac],
                "{ip} was answered by {seen:?}:\n{monitored}"
            );
        }
        let on = ports.get(mac).cloned().unwrap_or_default();
        assert!(on.len() <= 1, "{mac} came from {on:?}:\n{monitored}");
    }
    for (addr, seen) in &macs {
        assert_eq!(seen.len(), 1, "{addr} answered by {seen:?}:\n{monitored}");
    }
    assert!(
        !ports.is_empty(),
        "the bridge learnt the guests' MACs:\n{monitored}"
    );
    for vm in all.iter().rev() {
        home.ok(&["vm", "rm", "-f", vm]);
    }
    assert!(!in_ns(&topo.host, "ip -o link").contains("bg-"));
}

/// A child process killed (and reaped) when dropped, whatever the test did.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Warm starts on a real guest with a network (the daemon in a namespace of its own):
/// `image warm rig` boots the image once and saves it (its maker gone after); `vm run --rm`
/// then restores it instead of booting (`--timings` says `restore`), and the guest is the
/// new VM: its hostname and `/etc/hostname`, `/etc/hosts` without the maker's name, one
/// address on eth0 (its own lease), no process naming the maker. A warm snapshot whose
/// files were removed falls back to a cold boot with a warning, and is forgotten.
#[test]
fn root_rig_warm_vm_run_restores_and_is_its_own_machine() {
    let topo = Topology::new();
    let home = Home::with_guests(1, Some(&topo.host), "", "");
    let w = home.json(&["image", "warm", "rig", "--json"]);
    let dir = PathBuf::from(w["dir"].as_str().unwrap());
    assert!(dir.join("state").is_dir(), "{w}");
    assert_eq!(
        home.json(&["vm", "ls", "--json"]),
        serde_json::json!([]),
        "the maker is gone"
    );
    let listed = home.json(&["image", "warm", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    let out = home.run(&[
        "vm",
        "run",
        "--rm",
        "--timings",
        "--name",
        "fresh",
        "--",
        "sh",
        "-c",
        "cat /etc/hostname; hostname; ip -4 -o addr show eth0 | awk '{print $4}'; echo ==; cat /etc/hosts; echo ==; ps -eo args",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    let l: Vec<&str> = stdout.lines().collect();
    assert_eq!(&l[..2], ["fresh", "fresh"], "{stdout}");
    assert!(
        l[2].starts_with("172.") && l[3] == "==",
        "one address on eth0, its own: {stdout}"
    );
    assert!(
        !stdout.contains("warm-"),
        "the maker's name is left: {stdout}"
    );
    let timings = stderr.lines().find(|l| l.starts_with("timings:")).unwrap();
    assert!(
        timings.contains(" restore ") && !timings.contains(" boot "),
        "{timings}"
    );

    // Its memory gone: a cold boot, said, and the warm snapshot forgotten.
    std::fs::remove_dir_all(dir.join("state")).unwrap();
    let out = home.run(&["vm", "run", "--rm", "--timings", "--", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: warm snapshot") && stderr.contains("damaged"),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("timings:") && l.contains(" boot ")),
        "{stderr}"
    );
    assert_eq!(
        home.json(&["image", "warm", "list", "--json"]),
        serde_json::json!([])
    );
    assert!(!dir.exists());
}
