//! A published port (`--publish`, bangerd splicing each connection through the guest
//! agent) against `ssh -L` to the same guest port of the same real guest, in the same run:
//! connection latency (connect, one request line, the answer, the server's close) and
//! throughput (32 MiB from the guest), for both paths interleaved, with the ratio.
//! `ssh -L` goes through banger's own ssh config (`banger ssh-config`), so its transport is
//! the agent too (`__ssh-proxy`): the difference is ssh's encryption and its extra hops.
//!
//! Needs root, the test rig (`scripts/rig/setup.sh`) and the static guest binaries
//! (`scripts/build-guest.sh`), like `client/tests/vm_qemu.rs`; the guest runs under QEMU/TCG,
//! so absolute figures are the emulator's; the ratio is the point.
//! Run: `cargo build --release -p bangerd && cargo bench -p banger --bench publish` (the
//! bench runs the release bangerd beside the release banger; `BANGER_BENCH_RUNS`, default 20 requests
//! and 3 transfers per path).

#![allow(clippy::print_stdout)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BULK: usize = 32 << 20;

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// connect, one line, the whole answer.
fn request(port: u16) -> Duration {
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"ping\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "pong ping\n");
    t0.elapsed()
}

/// MiB/s of reading the guest's 32 MiB.
fn bulk(port: u16) -> f64 {
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0;
    loop {
        match s.read(&mut buf).unwrap() {
            0 => break,
            n => got += n,
        }
    }
    assert_eq!(got, BULK);
    (BULK as f64 / (1 << 20) as f64) / t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("BANGER_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let home = setup();
    home.ok(&[
        "vm", "create", "--name", "bench", "-p", "0:8000", "-p", "0:8001",
    ]);
    home.ok(&[
        "vm", "exec", "bench", "--", "sh", "-c",
        &format!("setsid socat TCP-LISTEN:8000,fork,reuseaddr 'SYSTEM:read l; echo pong $l' </dev/null >/dev/null 2>&1 & setsid socat TCP-LISTEN:8001,fork,reuseaddr 'SYSTEM:head -c {BULK} /dev/zero' </dev/null >/dev/null 2>&1 &"),
    ]);
    let list: serde_json::Value =
        serde_json::from_str(&home.ok(&["vm", "port", "list", "bench", "--json"])).unwrap();
    let published = |guest: u16| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|p| p["guest_port"] == guest)
            .and_then(|p| p["bound_port"].as_u64())
            .unwrap() as u16
    };
    let (pub_req, pub_bulk) = (published(8000), published(8001));

    // ssh -L to the same guest ports, through banger's ssh config.
    home.ok(&["ssh-config"]);
    let (ssh_req, ssh_bulk) = (free_port(), free_port());
    let mut ssh = Command::new("ssh");
    home.env(&mut ssh);
    let mut ssh = ssh
        .arg("-F")
        .arg(home.0.path().join(".ssh/config"))
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("127.0.0.1:{ssh_req}:127.0.0.1:8000"))
        .arg("-L")
        .arg(format!("127.0.0.1:{ssh_bulk}:127.0.0.1:8001"))
        .arg("bench.vm")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until both the guest's servers and ssh's forward answer.
    let t0 = Instant::now();
    for port in [pub_req, ssh_req] {
        loop {
            let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                let _ = s.write_all(b"ping\n");
                let mut a = String::new();
                s.read_to_string(&mut a).is_ok() && a == "pong ping\n"
            });
            if ok {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "port {port} never answered"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    let (mut lp, mut ls) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        lp.push(request(pub_req).as_secs_f64() * 1000.0);
        ls.push(request(ssh_req).as_secs_f64() * 1000.0);
    }
    let (mut tp, mut ts) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        tp.push(bulk(pub_bulk));
        ts.push(bulk(ssh_bulk));
    }
    let _ = ssh.kill();
    let _ = ssh.wait();
    let (lp, ls, tp, ts) = (median(lp), median(ls), median(tp), median(ts));
    println!(
        "connection latency (median of {runs}): published {lp:.1} ms, ssh -L {ls:.1} ms, ratio {:.2}",
        lp / ls
    );
    println!(
        "throughput (median of 3 x 32 MiB):     published {tp:.1} MiB/s, ssh -L {ts:.1} MiB/s, ratio {:.2}",
        tp / ts
    );
}
