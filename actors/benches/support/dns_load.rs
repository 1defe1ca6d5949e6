//! The load both DNS benches put on a resolver: 4 client sockets on loopback, each keeping
//! 16 queries in flight for `run`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Send `packet` to `addr` as above: (answers received, time taken).
pub async fn answers(addr: SocketAddr, packet: Vec<u8>, run: Duration) -> (u64, Duration) {
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
    (total, t0.elapsed())
}
