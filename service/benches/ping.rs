//! `daemon.ping` over the Unix socket against a real in-process daemon.
//!
//! Run: `cargo bench -p bangerd --bench ping`. Prints p50/p99 latency of sequential pings
//! on one connection, and calls/s for 1 and 8 concurrent connections.

#![allow(clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use banger_api::DaemonRpcClient;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let daemon = support::TestDaemon::start().await;
        let client = daemon.client().await;
        for _ in 0..2_000 {
            client.ping().await.unwrap();
        }
        let n = 20_000;
        let mut lat = Vec::with_capacity(n);
        let t0 = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            client.ping().await.unwrap();
            lat.push(t.elapsed());
        }
        let total = t0.elapsed();
        lat.sort();
        println!(
            "daemon.ping sequential, 1 connection, {n} calls: p50 {:?}  p99 {:?}  max {:?}  {:.0} calls/s",
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            lat[lat.len() - 1],
            n as f64 / total.as_secs_f64()
        );

        let conns = 8;
        let per = 5_000;
        let mut clients = Vec::new();
        for _ in 0..conns {
            clients.push(daemon.client().await);
        }
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for c in clients {
            tasks.push(tokio::spawn(async move {
                for _ in 0..per {
                    c.ping().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let total = t0.elapsed();
        println!(
            "daemon.ping {conns} concurrent connections, {} calls: {:.0} calls/s",
            conns * per,
            (conns * per) as f64 / total.as_secs_f64()
        );
        drop(client);
        daemon.shutdown().await;
    });
}
