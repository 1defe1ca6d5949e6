//! What idle VMs cost the daemon: its CPU time while 50 Firecracker VMs (the test double,
//! unjailed, no network) sit idle, as a share of one core. Each VM's actor watches its
//! VMM for exit and follows its console; both should cost nothing while nothing happens.
//!
//! Needs the double's binary: `cargo build -p banger-actors --features test-double --bin
//! banger-fc-double`. Run: `cargo bench -p bangerd --bench idle` (`BANGER_BENCH_VMS` and
//! `BANGER_BENCH_SECS` change the 50 VMs and the 10 s measured).

#![allow(clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use banger_api::{CreateVm, Progress, VmRpcClient};

/// This process's user + system CPU time.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let vms = env_or("BANGER_BENCH_VMS", 50);
    let secs = env_or("BANGER_BENCH_SECS", 10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        let fx = support::fc::Files::new(&files, support::fc::Exec::Double);
        let mut config = support::test_config();
        config.firecracker.jailer = support::fc::double_bin();
        config.firecracker.binary = fx.firecracker.clone();
        config.agent_timeout_secs = 0;
        let d = support::TestDaemon::start_with(dir, config).await;
        let c = d.client().await;
        fx.register(&c).await;
        for i in 0..vms {
            let req = CreateVm {
                name: Some(format!("idle{i}")),
                image: Some("img".into()),
                vcpu: Some(1),
                memory_mib: Some(128),
                disk_bytes: Some(1 << 30),
                ..Default::default()
            };
            let mut sub = c.create(req).await.unwrap();
            loop {
                match sub.next().await.unwrap().unwrap() {
                    Progress::Done { .. } => break,
                    Progress::Failed { message, .. } => panic!("{message}"),
                    _ => {}
                }
            }
        }
        // Let the creates' own work settle, then measure a quiet stretch.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (c0, t0) = (cpu(), Instant::now());
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let (used, wall) = (cpu() - c0, t0.elapsed());
        println!(
            "idle: {vms} VMs, {:.1} s: daemon CPU {} ms = {:.2}% of one core",
            wall.as_secs_f64(),
            used.as_millis(),
            100.0 * used.as_secs_f64() / wall.as_secs_f64()
        );
        for i in 0..vms {
            let _ = VmRpcClient::delete(&c, format!("idle{i}"), true).await;
        }
        drop(c);
        d.shutdown().await;
    });
}
