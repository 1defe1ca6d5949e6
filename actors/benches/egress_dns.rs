//! Queries/s of the guests' resolver for a guest with a 100-rule egress policy against the
//! same guest with none, in one run: the daemon's own `serve_guests` loop on loopback,
//! forwarding to an upstream on loopback that answers at once, a vouch that returns at
//! once (the helper's nft call is not measured here). The policy's 100 rules are domains
//! and the name asked matches the last one (the worst case of the scan).
//! Run: `cargo bench -p banger-actors --bench egress_dns`.

#![allow(clippy::print_stdout)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

#[path = "support/dns_load.rs"]
mod dns_load;

use banger_actors::net::dns::{self, GuestPolicy, GuestResolver, Vouch, VouchFuture};
use hickory_proto::op::{Message, OpCode, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

#[derive(Debug)]
struct Instant0;

impl Vouch for Instant0 {
    fn vouch(&self, _vm: &str, _addrs: Vec<(Ipv4Addr, u32)>) -> VouchFuture {
        Box::pin(async { Ok(()) })
    }
}

async fn upstream() -> SocketAddr {
    let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = up.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = up.recv_from(&mut buf).await {
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.add_query(q.queries[0].clone());
            r.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
            ));
            let _ = up.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    addr
}

/// Answers/s over `run` under [`dns_load::answers`]'s load.
async fn measure(policy: Option<banger_api::Egress>, run: Duration) -> f64 {
    let resolver = GuestResolver {
        table: Default::default(),
        upstreams: Arc::new(vec![upstream().await]),
        policies: Default::default(),
        vouch: Some(Arc::new(Instant0)),
    };
    if let Some(p) = policy {
        resolver.policies.write().unwrap().insert(
            Ipv4Addr::LOCALHOST,
            Arc::new(GuestPolicy::new("0123456789ab", "bench", p)),
        );
    }
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let task = tokio::spawn(dns::serve_guests(server, resolver));
    let mut q = Message::query();
    q.add_query(Query::query(
        Name::from_ascii("host.d99.example.").unwrap(),
        RecordType::A,
    ));
    let packet = q.to_vec().unwrap();
    let (total, took) = dns_load::answers(addr, packet, run).await;
    task.abort();
    total as f64 / took.as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rules: Vec<String> = (0..100).map(|i| format!("*.d{i}.example")).collect();
    let policy: banger_api::Egress = format!("allow={}", rules.join(",")).parse().unwrap();
    rt.block_on(async {
        let run = Duration::from_secs(3);
        let none = measure(None, run).await;
        let hundred = measure(Some(policy), run).await;
        println!("egress dns: no policy {none:.0} queries/s");
        println!("egress dns: 100-rule policy {hundred:.0} queries/s");
        println!("ratio (100 rules / none): {:.2}", hundred / none);
    });
}
