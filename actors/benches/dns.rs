//! Queries/s of the `.vm` resolver on loopback: the daemon's own `serve` loop, 4 client
//! sockets each keeping 16 queries in flight for 3 seconds.
//! Run: `cargo bench -p banger-actors --bench dns`.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_actors::net::dns;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let table: dns::Table = Arc::new(std::sync::RwLock::new(HashMap::from([(
            "web".to_owned(),
            Ipv4Addr::new(172, 30, 0, 7),
        )])));
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(dns::serve(server, table));
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("web.vm.").unwrap(),
            RecordType::A,
        ));
        let packet = q.to_vec().unwrap();
        let run = Duration::from_secs(3);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let packet = packet.clone();
            tasks.push(tokio::spawn(async move {
                let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                s.connect(addr).await.unwrap();
                let mut buf = [0u8; 512];
                let mut answered = 0u64;
                for _ in 0..16 {
                    s.send(&packet).await.unwrap();
                }
                while t0.elapsed() < run {
                    if let Ok(Ok(_)) =
                        tokio::time::timeout(Duration::from_millis(200), s.recv(&mut buf)).await
                    {
                        answered += 1;
                    }
                    s.send(&packet).await.unwrap();
                }
                answered
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        println!(
            "dns: {total} answers in {:?}: {:.0} queries/s",
            t0.elapsed(),
            total as f64 / t0.elapsed().as_secs_f64()
        );
    });
}
