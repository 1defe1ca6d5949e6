//! Queries/s of the `.vm` resolver on loopback: the daemon's own `serve` loop, 4 client
//! sockets each keeping 16 queries in flight for 3 seconds.
//! Run: `cargo bench -p banger-actors --bench dns`.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

#[path = "support/dns_load.rs"]
mod dns_load;

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
        let (total, took) = dns_load::answers(addr, packet, run).await;
        println!(
            "dns: {total} answers in {:?}: {:.0} queries/s",
            took,
            total as f64 / took.as_secs_f64()
        );
    });
}
