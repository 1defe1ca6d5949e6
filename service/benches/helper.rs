//! The privileged helper's cost per VM: a tap made, attached and deleted, and NAT added
//! and removed, through `bangerd __helper` (one forked worker per request) in a network
//! namespace this bench creates. Needs root.
//!
//! Run: `sudo cargo bench -p bangerd --bench helper`. Prints p50/p90 per request kind.

#![allow(clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use banger_policy::{HelperConfig, Reply, Request};

fn main() {
    let ns = support::Netns::new("bench");
    let dir = tempfile::tempdir().unwrap();
    let cfg = HelperConfig {
        bridge: "banger0".into(),
        gateway: Ipv4Addr::new(172, 30, 0, 1),
        prefix: 24,
        state_dirs: vec![dir.path().to_owned()],
        jail_base: dir.path().join("jail"),
        tap_uids: vec![0],
        vmm_binaries: Vec::new(),
        resolvectl: None,
        nft: "/usr/sbin/nft".into(),
        jailer: None,
    };
    let mut h = ns.helper(&cfg);
    let mut call = |r: Request| {
        let t = Instant::now();
        assert_eq!(h.call(&r).unwrap(), Reply::Done, "{r:?}");
        t.elapsed()
    };
    call(Request::EnsureBridge);
    let kinds = [
        "create_tap",
        "attach_tap",
        "delete_tap",
        "nat_add",
        "nat_remove",
    ];
    let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); kinds.len()];
    let n = 200;
    let t0 = Instant::now();
    for i in 0..n {
        let name = format!("bg-{i:012x}");
        let vm = format!("{i:012x}");
        lat[0].push(call(Request::CreateTap {
            name: name.clone(),
            uid: 0,
        }));
        lat[1].push(call(Request::AttachTap { name: name.clone() }));
        lat[3].push(call(Request::NatAdd {
            vm: vm.clone(),
            ip: Ipv4Addr::new(172, 30, 0, 5),
        }));
        lat[4].push(call(Request::NatRemove { vm }));
        lat[2].push(call(Request::DeleteTap { name }));
    }
    let total = t0.elapsed();
    for (k, l) in kinds.iter().zip(lat.iter_mut()) {
        l.sort();
        println!(
            "{k:>11}: p50 {:>8.2?}  p90 {:>8.2?}  ({n} runs)",
            l[n / 2],
            l[n * 9 / 10]
        );
    }
    println!(
        "tap lifecycle + NAT per VM: {:.2?} mean ({} requests in {:.2?})",
        total / n as u32,
        n * 5,
        total
    );
}
