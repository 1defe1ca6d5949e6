//! Control-plane time of `vm create` with the Firecracker test double: from the RPC
//! request until the daemon reports the VM running, which is after Firecracker answered
//! InstanceStart (so it bounds "RPC in → InstanceStart sent" from above). Includes making
//! the two sparse ext4 disks, the jail with its hard links, spawning the jailer stand-in,
//! and the whole API sequence.
//!
//! Then the same for a create restored from a warm snapshot (`image warm`) against a
//! `--cold` one, on a daemon whose double runs a guest agent and that waits for it (a
//! warm VM takes its identity through the agent): to the agent's answer, both.
//!
//! Needs the double's binary: `cargo build -p banger-actors --features test-double --bin
//! banger-fc-double` (the test suite builds it too). Run:
//! `cargo bench -p bangerd --bench vm_create`.

#![allow(clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use banger_api::{CreateVm, Progress, VmRpcClient};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        // No helper in this process: Firecracker runs unjailed, so `firecracker` is the
        // double itself, under Firecracker's release name.
        let fx = support::fc::Files::new(&files, support::fc::Exec::Double);
        let mut config = support::test_config();
        config.firecracker.jailer = support::fc::double_bin();
        config.firecracker.binary = fx.firecracker.clone();
        config.agent_timeout_secs = 0;
        let d = support::TestDaemon::start_with(dir, config).await;
        let c = d.client().await;
        fx.register(&c).await;

        let req = |name: String, cold: bool| CreateVm {
            name: Some(name),
            image: Some("img".into()),
            vcpu: Some(1),
            memory_mib: Some(256),
            disk_bytes: Some(1 << 30),
            cold,
            ..Default::default()
        };
        measure(&c, "vm create (firecracker double)", |i| req(format!("b{i}"), false)).await;
        drop(c);
        d.shutdown().await;

        // Warm against cold, both to the agent's answer.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        let fx = support::fc::Files::new(&files, support::fc::Exec::Double);
        let script = files.join("firecracker-with-env");
        std::fs::write(
            &script,
            format!(
                "#!/bin/bash\nBANGER_FC_DOUBLE_GUEST_AGENT=1 BANGER_FC_DOUBLE_RELEASE=newest exec -a \"$0\" {} \"$@\"\n",
                fx.versioned.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut config = support::test_config();
        config.firecracker.jailer = support::fc::double_bin();
        config.firecracker.binary = script;
        config.agent_timeout_secs = 10;
        let d = support::TestDaemon::start_with(dir, config).await;
        let c = d.client().await;
        fx.register(&c).await;
        let mut sub = banger_api::ImageRpcClient::warm(
            &c,
            banger_api::WarmImage {
                image: Some("img".into()),
                vcpu: Some(1),
                memory_mib: Some(256),
                disk_bytes: Some(1 << 30),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        while let Some(ev) = sub.next().await {
            match ev.unwrap() {
                Progress::Warmed { .. } => break,
                Progress::Failed { message, .. } => panic!("{message}"),
                _ => {}
            }
        }
        measure(&c, "vm create --cold, to the agent (double)", |i| {
            req(format!("c{i}"), true)
        })
        .await;
        measure(&c, "vm create from the warm snapshot (double)", |i| {
            req(format!("w{i}"), false)
        })
        .await;
        drop(c);
        d.shutdown().await;
    });
}

/// `n` creates one after another (each deleted after), with the latency of each and the
/// time between its progress events; printed.
async fn measure(
    c: &jsonrpsee::async_client::Client,
    label: &str,
    req: impl Fn(usize) -> CreateVm,
) {
    let n = 40;
    let mut lat = Vec::new();
    let mut stages: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for i in 0..n {
        let r = req(i);
        let name = r.name.clone().unwrap();
        let t0 = Instant::now();
        let mut sub = c.create(r).await.unwrap();
        let mut last = ("rpc".to_owned(), t0);
        loop {
            let ev = sub.next().await.unwrap().unwrap();
            let now = Instant::now();
            let next = match &ev {
                Progress::Created { .. } => "created".to_owned(),
                Progress::Stage { stage, .. } => stage.clone(),
                Progress::Done { .. } => "running".to_owned(),
                Progress::Failed { message, .. } => panic!("{message}"),
                other => panic!("not an event of vm.create: {other:?}"),
            };
            stages
                .entry(format!("{} -> {next}", last.0))
                .or_default()
                .push((now - last.1).as_secs_f64() * 1000.0);
            last = (next, now);
            if matches!(ev, Progress::Done { .. }) {
                break;
            }
        }
        lat.push(t0.elapsed());
        VmRpcClient::delete(c, name, true).await.unwrap();
    }
    lat.sort();
    let pick = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{label}, {n} runs: p50 {:?}  p90 {:?}  min {:?}  max {:?}",
        pick(0.5),
        pick(0.9),
        lat[0],
        lat[lat.len() - 1]
    );
    for (k, mut v) in stages {
        v.sort_by(f64::total_cmp);
        println!("  {k:<24} p50 {:>6.2} ms", v[v.len() / 2]);
    }
}
