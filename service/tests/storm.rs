//! The storm: a root `bangerd` (and its helper) in a network namespace this test makes,
//! Firecracker VMs on the double (jailed, with networks and NAT), four creates and deletes
//! at a time, and bangerd SIGKILLed at a random moment 0–500 ms into each round (its
//! helper too, every fifth round), then started again. At the end every VM still listed
//! is deleted, the daemon stopped, and a census fails on anything left: a process naming
//! the home or rooted in its jail base (pid and command line), a tap, an nft rule, a jail,
//! a cgroup, a VM directory, a record; and on any VM listed before a kill that is missing
//! after it (unless that round deleted it).
//!
//! `BANGER_STORM_SEED` replays a run (the seed is printed), `BANGER_STORM_ROUNDS` sets
//! its length (30). Root only (`root_*`), run by scripts/test.sh. The seed and the census
//! are printed (`--nocapture` shows them).
#![allow(clippy::print_stdout)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use banger_api::{CreateVm, Progress, VmRpcClient};
use jsonrpsee::async_client::Client;

use support::fc::{EXEC_NAME, Exec, Home, double_bin};

const OWNER: u32 = 65534;

/// xorshift64*: a seeded sequence, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `bangerd` in `ns` on `home` (a killed daemon's socket file removed first), and a client
/// once it answers.
async fn start(home: &Home, ns: &str) -> (support::fc::Daemon, std::sync::Arc<Client>) {
    let _ = std::fs::remove_file(home.socket());
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_bangerd")]);
    let daemon = home
        .spawn(cmd, &std::env::var_os("PATH").unwrap_or_default())
        .await;
    let c = support::client_for(&home.socket()).await;
    (daemon, std::sync::Arc::new(c))
}

/// The helper of the daemon `pid` (`bangerd __helper ...`, its child).
fn helper_of(pid: u32) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(pid) && String::from_utf8_lossy(&cmd).contains("__helper") {
            return Some(p);
        }
    }
    None
}

/// Live processes (not zombies) naming `home` in their command line or rooted under
/// `jail_base`: "pid cmdline".
fn processes(home: &Path, jail_base: &Path) -> Vec<String> {
    let (home, base) = (home.display().to_string(), jail_base.display().to_string());
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit_once(") ")
            .is_none_or(|(_, r)| r.starts_with('Z') || r.starts_with('X'))
        {
            continue;
        }
        let raw = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        let root = std::fs::read_link(e.path().join("root"))
            .map(|r| r.display().to_string())
            .unwrap_or_default();
        if cmd.contains(&home) || root.starts_with(&base) {
            out.push(format!("{pid} {cmd} (root {root})"));
        }
    }
    out
}

async fn create(c: &Client, name: String) -> bool {
    let req = CreateVm {
        name: Some(name),
        image: Some("img".into()),
        nat: true,
        ..Default::default()
    };
    let Ok(mut sub) = c.create(req).await else {
        return false;
    };
    while let Some(Ok(ev)) = sub.next().await {
        match ev {
            Progress::Done { .. } => return true,
            Progress::Failed { .. } => return false,
            _ => {}
        }
    }
    false
}

async fn names(c: &Client) -> BTreeSet<String> {
    VmRpcClient::list(c)
        .await
        .expect("list after a restart")
        .into_iter()
        .map(|v| v.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_storm_of_daemon_kills_during_creates_and_deletes_leaks_nothing() {
    let seed = std::env::var("BANGER_STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let rounds: u32 = std::env::var("BANGER_STORM_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    println!("storm: seed {seed} (BANGER_STORM_SEED={seed} replays it), {rounds} rounds");
    let mut rng = Rng(seed);

    let ns = support::Netns::new("storm");
    let tmp = tempfile::tempdir().unwrap();
    let h = tmp.path();
    let files = h.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let fx = support::fc::Files::new(&files, Exec::Script);
    fx.chown(OWNER);
    let config = format!(
        "owner = \"{OWNER}\"\ndefault_vmm = \"firecracker\"\nagent_timeout_secs = 0\n\
         stop_timeout_secs = 5\ndns_listen = \"127.0.0.1:0\"\n\
         [firecracker]\njailer = \"{}\"\nbinary = \"{}\"\n[vm_defaults]\nnetwork = true\n\
         vcpu = 1\n",
        double_bin().display(),
        fx.firecracker.display()
    );
    let home = Home::new(h, OWNER, &config);
    let jail_base = h.join("data/banger/jail");

    let (mut daemon, mut c) = start(&home, &ns.0).await;
    fx.register(&c).await;
    let (mut kills, mut helper_kills, mut created, mut deleted) = (0, 0, 0, 0);
    let mut ids = BTreeSet::new();
    for round in 0..rounds {
        let before = names(&c).await;
        for v in VmRpcClient::list(&*c).await.unwrap() {
            ids.insert(v.id);
        }
        // Four operations at a time: creates, and deletes of listed VMs.
        let mut targets = BTreeSet::new();
        let mut ops = tokio::task::JoinSet::new();
        let listed: Vec<String> = before.iter().cloned().collect();
        for i in 0..4 {
            let c = std::sync::Arc::clone(&c);
            let victim = (!listed.is_empty() && rng.below(2) == 0)
                .then(|| listed[rng.below(listed.len() as u64) as usize].clone());
            match victim {
                Some(v) if targets.insert(v.clone()) => {
                    ops.spawn(
                        async move { (false, VmRpcClient::delete(&*c, v, true).await.is_ok()) },
                    );
                }
                _ => {
                    let name = format!("s{round}-{i}");
                    targets.insert(name.clone());
                    ops.spawn(async move { (true, create(&c, name).await) });
                }
            }
        }
        let kill_after = Duration::from_millis(rng.below(501));
        let kill_helper = round % 5 == 4;
        // The fault: SIGKILL at a random moment, whatever is under way.
        tokio::time::sleep(kill_after).await;
        if kill_helper && let Some(p) = helper_of(daemon.pid()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
            helper_kills += 1;
        }
        let _ = daemon.child.kill();
        let _ = daemon.child.wait();
        kills += 1;
        while let Some(r) = ops.join_next().await {
            match r.unwrap() {
                (true, true) => created += 1,
                (false, true) => deleted += 1,
                _ => {}
            }
        }
        drop(c);
        (daemon, c) = start(&home, &ns.0).await;
        let after = names(&c).await;
        let lost: Vec<_> = before
            .iter()
            .filter(|n| !after.contains(*n) && !targets.contains(*n))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round} (seed {seed}): listed before the kill, gone after: {lost:?}"
        );
    }

    // Every VM still listed is deletable.
    let all = VmRpcClient::list(&*c).await.unwrap();
    for v in &all {
        ids.insert(v.id.clone());
        VmRpcClient::delete(&*c, v.name.clone(), true)
            .await
            .unwrap_or_else(|e| panic!("delete {} (seed {seed}): {e}", v.name));
    }
    let left = VmRpcClient::list(&*c).await.unwrap();
    drop(c);
    daemon.stop();

    // The census.
    let mut leaks: Vec<String> = Vec::new();
    leaks.extend(left.iter().map(|v| format!("record {} ({})", v.name, v.id)));
    leaks.extend(
        processes(h, &jail_base)
            .into_iter()
            .map(|p| format!("process {p}")),
    );
    let links = ns.sh("ip -o link");
    leaks.extend(
        links
            .lines()
            .filter(|l| l.contains("bg-"))
            .map(|l| format!("tap {l}")),
    );
    let rules = ns.sh("nft list ruleset");
    for id in &ids {
        if rules.contains(id.as_str()) {
            leaks.push(format!("nft rule naming {id}"));
        }
    }
    if let Ok(jails) = std::fs::read_dir(jail_base.join(EXEC_NAME)) {
        leaks.extend(
            jails
                .flatten()
                .map(|j| format!("jail {}", j.path().display())),
        );
    }
    if let Ok(vms) = std::fs::read_dir(h.join("data/banger/vms")) {
        leaks.extend(
            vms.flatten()
                .map(|d| format!("vm dir {}", d.path().display())),
        );
    }
    for id in &ids {
        for cg in [
            format!("/sys/fs/cgroup/banger/{id}"),
            format!("/sys/fs/cgroup/cpu/banger/{id}"),
            format!("/sys/fs/cgroup/memory/banger/{id}"),
        ] {
            if Path::new(&cg).exists() {
                leaks.push(format!("cgroup {cg}"));
            }
        }
    }
    println!(
        "storm census: seed {seed}, rounds {rounds}, kills {kills} (helper {helper_kills}), VMs created {created} (answered done), deleted {deleted}, VMs seen {}, deleted at the end {}, leaks {}",
        ids.len(),
        all.len(),
        leaks.len()
    );
    for l in &leaks {
        println!("  leak: {l}");
    }
    assert!(
        leaks.is_empty(),
        "seed {seed}: {} leaks: {leaks:#?}",
        leaks.len()
    );
}
