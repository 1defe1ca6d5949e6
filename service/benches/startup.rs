//! Start-up with many VMs: time from spawning the `bangerd` process to its first answer
//! (`daemon.ping`), and to every VM re-adopted (no VM listed `adopting` by `vm list`), with
//! 10, 100 and 1000 running VMs; and the daemon's RSS once it holds 1000 VM actors.
//!
//! The VMs are Firecracker test doubles, *running*, without networks: one VM is created
//! through a daemon (a real launch), which is then stopped; the others are copies of its
//! record, each with a double of its own started here the way the daemon started the
//! first one (same command line and working directory, the VM id swapped), so every VM's
//! re-adoption finds a live VMM process and does its whole work (process probe, console,
//! exit watch, record written). The daemon is the real binary, run as `nobody` (no helper,
//! so Firecracker unjailed and nothing on the host's network), restarted for each count
//! on the same store, which grows 10 → 100 → 1000.
//!
//! Needs root (to run the daemon as `nobody`) and the double's binary: `cargo build -p
//! banger-actors --features test-double --bin banger-fc-double`. Run:
//! `cargo bench -p bangerd --bench startup` (`--profile dev` for a debug daemon).

#![allow(clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_actors::store::Store;
use banger_actors::vm::model::VmRecord;
use banger_api::{CreateVm, DaemonRpcClient, Progress, VmRpcClient, VmState};

const USER: u32 = 65534;
const COUNTS: [usize; 3] = [10, 100, 1000];

/// The doubles started here; killed (by pid) when dropped.
struct Doubles(Vec<Child>);

impl Drop for Doubles {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_daemon(home: &support::fc::Home) -> Child {
    let h = &home.dir;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_bangerd"))
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", h)
        .env("XDG_RUNTIME_DIR", h.join("run"))
        .env("XDG_DATA_HOME", h.join("data"))
        .env("XDG_STATE_HOME", h.join("state"))
        .env("XDG_CACHE_HOME", h.join("cache"))
        .env("XDG_CONFIG_HOME", h.join("config"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(h.join("bangerd.err")).unwrap());
    cmd.spawn().unwrap()
}

fn stop_daemon(mut child: Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "bangerd exited with {status}");
}

/// The first `daemon.ping` answered after `t0`, polled every millisecond.
async fn first_answer(home: &support::fc::Home, child: &mut Child, t0: Instant) -> Duration {
    let socket = home.socket();
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "bangerd exited: {}",
            std::fs::read_to_string(home.dir.join("bangerd.err")).unwrap_or_default()
        );
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            let c = support::client_for(&socket).await;
            if c.ping().await.is_ok() {
                return t0.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Start a double for `rec`, a copy of `tpl` (whose double runs as `tpl_pid`), and give
/// `rec` its runtime.
fn clone_vm(tpl: &VmRecord, tpl_pid: i32, id: &str, name: &str, doubles: &mut Doubles) -> VmRecord {
    let swap = |s: &str| s.replace(&tpl.id, id);
    let cmdline = std::fs::read(format!("/proc/{tpl_pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| swap(&String::from_utf8_lossy(a)))
        .collect();
    let cwd = PathBuf::from(swap(
        &std::fs::read_link(format!("/proc/{tpl_pid}/cwd"))
            .unwrap()
            .display()
            .to_string(),
    ));
    std::fs::create_dir_all(&cwd).unwrap();
    let exe = std::fs::read_link(format!("/proc/{tpl_pid}/exe")).unwrap();
    let child = {
        use std::os::unix::process::CommandExt;
        Command::new(exe)
            .arg0(&argv[0])
            .args(&argv[1..])
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let pid = child.id() as i32;
    doubles.0.push(child);
    let start_time = banger_actors::vm::proc::start_time(pid).unwrap();
    let mut rt = tpl.runtime.clone().unwrap();
    rt.pid = pid;
    rt.start_time = start_time;
    rt.control_socket = swap(&rt.control_socket);
    rt.vsock_socket = swap(&rt.vsock_socket);
    rt.helpers.clear();
    VmRecord {
        id: id.to_owned(),
        name: name.to_owned(),
        runtime: Some(rt),
        ..tpl.clone()
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let home_dir = tempfile::tempdir().unwrap();
        let h = home_dir.path();
        let files = h.join("files");
        std::fs::create_dir_all(&files).unwrap();
        let fx = support::fc::Files::new(&files, support::fc::Exec::Double);
        fx.chown(USER);
        let config = format!(
            "default_vmm = \"firecracker\"\nagent_timeout_secs = 0\nstop_timeout_secs = 5\n\
             dns_listen = \"127.0.0.1:0\"\n[firecracker]\njailer = \"{}\"\nbinary = \"{}\"\n\
             [vm_defaults]\nnetwork = false\n",
            support::fc::double_bin().display(),
            fx.firecracker.display()
        );
        let home = support::fc::Home::new(h, USER, &config);
        let mut doubles = Doubles(Vec::new());

        // The template: one VM launched for real.
        let mut child = spawn_daemon(&home);
        first_answer(&home, &mut child, Instant::now()).await;
        let c = support::client_for(&home.socket()).await;
        fx.register(&c).await;
        let mut sub = c
            .create(CreateVm {
                name: Some("v0".into()),
                image: Some("img".into()),
                network: Some(false),
                ..Default::default()
            })
            .await
            .unwrap();
        loop {
            match sub.next().await.unwrap().unwrap() {
                Progress::Done { vm } => {
                    assert_eq!(vm.state, VmState::Running);
                    break;
                }
                Progress::Failed { message, .. } => panic!("{message}"),
                _ => {}
            }
        }
        drop(sub);
        drop(c);
        stop_daemon(child);

        let store_file = h.join("data/banger/banger.redb");
        let mut have = 1;
        let mut rows = Vec::new();
        let mut tpl_pid = None;
        for n in COUNTS {
            {
                let store = Store::open(&store_file).unwrap();
                let tpl = store.find_vm("v0").unwrap().unwrap();
                let pid = *tpl_pid.get_or_insert(tpl.runtime.as_ref().unwrap().pid);
                for i in have..n {
                    let id = banger_actors::vm::model::new_id();
                    let rec = clone_vm(&tpl, pid, &id, &format!("v{i}"), &mut doubles);
                    store.put_vm(&rec).unwrap();
                }
                have = n;
            }
            // Own the new files as the daemon's user (the store, the VM dirs).
            let status = Command::new("chown")
                .args(["-R", "65534:65534"])
                .arg(h.join("data"))
                .status()
                .unwrap();
            assert!(status.success());

            let t0 = Instant::now();
            let mut child = spawn_daemon(&home);
            let first = first_answer(&home, &mut child, t0).await;
            let c = support::client_for(&home.socket()).await;
            let (all, listed) = loop {
                let vms = VmRpcClient::list(&c).await.unwrap();
                if vms.iter().all(|v| !v.adopting) {
                    break (t0.elapsed(), vms);
                }
            };
            assert_eq!(listed.len(), n);
            let running = listed
                .iter()
                .filter(|v| v.state == VmState::Running)
                .count();
            assert_eq!(running, n, "every VM is re-adopted running");
            let rss = rss_kib(child.id());
            rows.push((n, first, all, rss));
            drop(c);
            stop_daemon(child);
        }

        println!();
        println!("| VMs  | first answer | all re-adopted | daemon RSS |");
        println!("|------|--------------|----------------|------------|");
        for (n, first, all, rss) in rows {
            println!(
                "| {n:>4} | {:>9.1} ms | {:>11.1} ms | {:>6.1} MiB |",
                first.as_secs_f64() * 1000.0,
                all.as_secs_f64() * 1000.0,
                rss as f64 / 1024.0
            );
        }
        // The template's double was started by the daemon: end it by its pid.
        if let Some(pid) = tpl_pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        drop(doubles);
        support::kill_processes_naming(h);
    });
}
