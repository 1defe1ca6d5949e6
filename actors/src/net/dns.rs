//! The `.vm` resolver: answers A queries for `<vm>.vm` from the current VM table on
//! 127.0.0.1:42069 (configurable), NXDOMAIN for unknown VMs, REFUSED for every other zone.
//! Messages are parsed and built with hickory-proto; malformed packets get FORMERR when
//! their header is readable and are dropped otherwise; nothing a client sends can stop the
//! loop. (The guest-facing listener on the bridge, which also forwards other names
//! upstream, comes with the bridge.)

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// Names → addresses, shared by the VM supervisor (writer) and the resolver (reader).
pub type Table = Arc<RwLock<HashMap<String, Ipv4Addr>>>;

/// TTL of answers: short, VMs come and go.
pub const TTL: u32 = 5;

/// The zone banger answers for.
pub const ZONE: &str = "vm";

/// The answer to one packet, or None to stay silent (unreadable, or not a query).
pub fn answer(packet: &[u8], table: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    let query = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) if packet.len() >= 12 => {
            let id = u16::from_be_bytes([packet[0], packet[1]]);
            // A response (QR bit set) is never answered, even a broken one.
            if packet[2] & 0x80 != 0 {
                return None;
            }
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok();
        }
        Err(_) => return None,
    };
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    if query.metadata.op_code != OpCode::Query || query.queries.len() != 1 {
        resp.metadata.response_code = if query.metadata.op_code != OpCode::Query {
            ResponseCode::NotImp
        } else {
            ResponseCode::FormErr
        };
        return resp.to_vec().ok();
    }
    let q = query.queries[0].clone();
    let name = q.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    resp.add_query(q.clone());
    let vm = name.strip_suffix(ZONE).and_then(|n| n.strip_suffix('.'));
    match vm {
        Some(vm) if !vm.is_empty() && !vm.contains('.') => {
            resp.metadata.authoritative = true;
            match table.get(vm) {
                Some(ip) => {
                    if matches!(q.query_type(), RecordType::A | RecordType::ANY) {
                        resp.add_answer(Record::from_rdata(
                            q.name().clone(),
                            TTL,
                            RData::A(A(*ip)),
                        ));
                    }
                    // Other types of a known name: NOERROR with no answer (NODATA).
                }
                None => resp.metadata.response_code = ResponseCode::NXDomain,
            }
        }
        _ if name == ZONE => resp.metadata.authoritative = true,
        _ => resp.metadata.response_code = ResponseCode::Refused,
    }
    resp.to_vec().ok()
}

/// Serve `socket` until the task is dropped. Packets are read into a 4 KiB buffer; bigger
/// datagrams arrive truncated and are answered FORMERR (or dropped).
/// Whether a query asks about the `.vm` zone (None: not a parsable query).
pub fn asks_vm_zone(packet: &[u8]) -> Option<bool> {
    let m = Message::from_vec(packet).ok()?;
    let q = m.queries.first()?;
    let name = q.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    Some(name == ZONE || name.ends_with(".vm"))
}

/// The host's upstream resolvers, from a resolv.conf text (port 53).
pub fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// How long a forwarded query waits for an upstream.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Forwarded queries in flight at once; more are dropped (the guest retries).
const FORWARD_MAX: usize = 256;

/// Ask the upstreams in turn; their answer verbatim, or SERVFAIL.
async fn forward(packet: Vec<u8>, upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(up).await.is_err() || sock.send(&packet).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(FORWARD_TIMEOUT, sock.recv(&mut buf)).await {
            buf.truncate(n);
            return Some(buf);
        }
    }
    let q = Message::from_vec(&packet).ok()?;
    let mut resp = Message::response(q.metadata.id, q.metadata.op_code);
    resp.metadata.recursion_desired = q.metadata.recursion_desired;
    resp.metadata.response_code = ResponseCode::ServFail;
    for query in q.queries {
        resp.add_query(query);
    }
    resp.to_vec().ok()
}

/// The guests' resolver (on the bridge address, port 53): `.vm` from the table, every
/// other name forwarded to the host's upstream resolvers.
pub async fn serve_guests(socket: tokio::net::UdpSocket, table: Table, upstreams: Vec<SocketAddr>) {
    let socket = std::sync::Arc::new(socket);
    let upstreams = std::sync::Arc::new(upstreams);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(FORWARD_MAX));
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from): (usize, SocketAddr) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "guest dns recv");
                continue;
            }
        };
        let packet = &buf[..n];
        if asks_vm_zone(packet) == Some(false) {
            let Ok(permit) = std::sync::Arc::clone(&permits).try_acquire_owned() else {
                continue;
            };
            let (socket, upstreams, packet) = (
                std::sync::Arc::clone(&socket),
                std::sync::Arc::clone(&upstreams),
                packet.to_vec(),
            );
            tokio::spawn(async move {
                if let Some(reply) = forward(packet, &upstreams).await {
                    let _ = socket.send_to(&reply, from).await;
                }
                drop(permit);
            });
            continue;
        }
        let reply = {
            let t = table.read().expect("dns table lock");
            answer(packet, &t)
        };
        if let Some(reply) = reply {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

/// How long a guest's TCP connection may sit idle between queries.
const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// Guests' TCP connections served at once; more wait in the kernel's backlog.
const TCP_MAX: usize = 64;

/// One DNS message over TCP: a 2-byte big-endian length, then the message (RFC 1035 4.2.2).
async fn read_tcp_message<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let len = r.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    r.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_tcp_message<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    msg: &[u8],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("message too long"))?;
    let mut frame = Vec::with_capacity(msg.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(msg);
    w.write_all(&frame).await
}

/// Ask the upstreams in turn over TCP (the guest asked over TCP, typically after a
/// truncated UDP answer); their answer verbatim, or SERVFAIL.
async fn forward_tcp(packet: Vec<u8>, upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let exchange = async {
            let mut conn = tokio::net::TcpStream::connect(up).await?;
            write_tcp_message(&mut conn, &packet).await?;
            read_tcp_message(&mut conn).await
        };
        if let Ok(Ok(reply)) = tokio::time::timeout(FORWARD_TIMEOUT, exchange).await {
            return Some(reply);
        }
    }
    forward(packet, &[]).await
}

/// The guests' resolver over TCP (same address and port as over UDP): `.vm` from the
/// table, the rest forwarded to the upstreams over TCP. Several queries may follow on one
/// connection; an idle or malformed connection is closed, the listener goes on.
pub async fn serve_guests_tcp(
    listener: tokio::net::TcpListener,
    table: Table,
    upstreams: Vec<SocketAddr>,
) {
    let upstreams = std::sync::Arc::new(upstreams);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(TCP_MAX));
    loop {
        let Ok(permit) = std::sync::Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let mut conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                tracing::debug!(error = %e, "guest dns accept");
                continue;
            }
        };
        let (table, upstreams) = (Arc::clone(&table), std::sync::Arc::clone(&upstreams));
        tokio::spawn(async move {
            while let Ok(Ok(packet)) =
                tokio::time::timeout(TCP_IDLE, read_tcp_message(&mut conn)).await
            {
                let reply = if asks_vm_zone(&packet) == Some(false) {
                    forward_tcp(packet, &upstreams).await
                } else {
                    let t = table.read().expect("dns table lock");
                    answer(&packet, &t)
                };
                let Some(reply) = reply else {
                    break;
                };
                if write_tcp_message(&mut conn, &reply).await.is_err() {
                    break;
                }
            }
            drop(permit);
        });
    }
}

pub async fn serve(socket: tokio::net::UdpSocket, table: Table) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from): (usize, SocketAddr) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier replies surface here on Linux: keep serving.
                tracing::debug!(error = %e, "dns recv");
                continue;
            }
        };
        let reply = {
            let t = table.read().expect("dns table lock");
            answer(&buf[..n], &t)
        };
        if let Some(reply) = reply {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn table() -> HashMap<String, Ipv4Addr> {
        HashMap::from([("web".to_owned(), Ipv4Addr::new(172, 30, 0, 7))])
    }

    fn ask(name: &str, ty: RecordType) -> Message {
        let mut q = Message::query();
        q.metadata.id = 4242;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
        Message::from_vec(&answer(&q.to_vec().unwrap(), &table()).unwrap()).unwrap()
    }

    #[test]
    fn known_vm_gets_its_address() {
        for name in ["web.vm.", "WEB.VM", "web.vm"] {
            let r = ask(name, RecordType::A);
            assert_eq!(r.metadata.id, 4242);
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(r.metadata.authoritative);
            assert_eq!(r.answers.len(), 1, "{name}");
            assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(172, 30, 0, 7))));
            assert_eq!(r.answers[0].ttl, TTL);
        }
        let r = ask("web.vm.", RecordType::AAAA);
        assert_eq!(
            (r.metadata.response_code, r.answers.len()),
            (ResponseCode::NoError, 0)
        );
    }

    #[test]
    fn unknown_vms_and_other_zones() {
        assert_eq!(
            ask("db.vm.", RecordType::A).metadata.response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask("a.b.vm.", RecordType::A).metadata.response_code,
            ResponseCode::Refused
        );
        assert_eq!(
            ask("example.com.", RecordType::A).metadata.response_code,
            ResponseCode::Refused
        );
        assert_eq!(
            ask("vm.", RecordType::A).metadata.response_code,
            ResponseCode::NoError
        );
    }

    #[tokio::test]
    async fn guests_get_vm_names_and_everything_else_forwarded_upstream() {
        // A real upstream on loopback that answers every A query with 192.0.2.1.
        let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
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
        let guest = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let guest_addr = guest.local_addr().unwrap();
        let t: Table = Arc::new(RwLock::new(table()));
        tokio::spawn(serve_guests(guest, t, vec![up_addr]));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ask = |name: &'static str| {
            let client = &client;
            async move {
                let mut q = Message::query();
                q.metadata.id = 7;
                q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
                client
                    .send_to(&q.to_vec().unwrap(), guest_addr)
                    .await
                    .unwrap();
                let mut buf = vec![0u8; 4096];
                let n =
                    tokio::time::timeout(std::time::Duration::from_secs(5), client.recv(&mut buf))
                        .await
                        .expect("an answer")
                        .unwrap();
                Message::from_vec(&buf[..n]).unwrap()
            }
        };
        let r = ask("web.vm.").await;
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(172, 30, 0, 7))));
        let r = ask("example.com.").await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(192, 0, 2, 1))));
        assert_eq!(r.metadata.id, 7);
        assert_eq!(
            ask("ghost.vm.").await.metadata.response_code,
            ResponseCode::NXDomain
        );
    }

    #[tokio::test]
    async fn guests_over_tcp_get_vm_names_forwarded_names_and_survive_garbage() {
        // A real upstream on loopback, over TCP, answering every A query with 192.0.2.2.
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = up.accept().await {
                tokio::spawn(async move {
                    while let Ok(q) = read_tcp_message(&mut c).await {
                        let q = Message::from_vec(&q).unwrap();
                        let mut r = Message::response(q.metadata.id, OpCode::Query);
                        r.add_query(q.queries[0].clone());
                        r.add_answer(Record::from_rdata(
                            q.queries[0].name().clone(),
                            60,
                            RData::A(A(Ipv4Addr::new(192, 0, 2, 2))),
                        ));
                        write_tcp_message(&mut c, &r.to_vec().unwrap())
                            .await
                            .unwrap();
                    }
                });
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t: Table = Arc::new(RwLock::new(table()));
        tokio::spawn(serve_guests_tcp(listener, t, vec![up_addr]));

        // Garbage first: a length with nothing behind it, then a closed connection.
        {
            use tokio::io::AsyncWriteExt;
            let mut bad = tokio::net::TcpStream::connect(addr).await.unwrap();
            bad.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        }
        // Two queries on one connection: a VM name and a forwarded one.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut ask = async |name: &str| {
            let mut q = Message::query();
            q.metadata.id = 9;
            q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            write_tcp_message(&mut c, &q.to_vec().unwrap())
                .await
                .unwrap();
            let r =
                tokio::time::timeout(std::time::Duration::from_secs(5), read_tcp_message(&mut c))
                    .await
                    .expect("an answer")
                    .unwrap();
            Message::from_vec(&r).unwrap()
        };
        let r = ask("web.vm.").await;
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(172, 30, 0, 7))));
        let r = ask("example.com.").await;
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(192, 0, 2, 2))));
        assert_eq!(r.metadata.id, 9);
    }

    #[test]
    fn upstreams_from_resolv_conf() {
        let u =
            upstreams("# x\nnameserver 10.0.0.2\nnameserver ::1\nsearch lan\nnameserver bogus\n");
        assert_eq!(
            u,
            vec!["10.0.0.2:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
    }

    #[test]
    fn garbage_gets_formerr_or_silence() {
        assert_eq!(answer(&[1, 2, 3], &table()), None);
        let mut junk = vec![0x12, 0x34, 0x01, 0x00];
        junk.extend([0xff; 40]);
        let r = Message::from_vec(&answer(&junk, &table()).unwrap()).unwrap();
        assert_eq!(
            (r.metadata.id, r.metadata.response_code),
            (0x1234, ResponseCode::FormErr)
        );
        // A response is never answered (no reflection loops).
        let mut resp = Message::response(1, OpCode::Query);
        resp.add_query(Query::query(
            Name::from_ascii("web.vm.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(answer(&resp.to_vec().unwrap(), &table()), None);
        let mut broken = vec![0, 1, 0x80, 0];
        broken.extend([0xff; 20]);
        assert_eq!(answer(&broken, &table()), None);
    }
}

/// DnsActor: owns the resolver's socket and task. A socket that cannot be bound (the port
/// is taken) is logged and reported as no address; the daemon keeps running without DNS.
#[derive(Debug, Default)]
pub struct DnsActor;

/// Messages of the DnsActor.
#[derive(Debug)]
pub enum DnsMsg {
    /// The address it listens on, if any.
    Addr(ractor::RpcReplyPort<Option<SocketAddr>>),
}

#[derive(Debug)]
pub struct DnsState {
    addr: Option<SocketAddr>,
    task: Option<tokio::task::JoinHandle<()>>,
    guest_task: Option<tokio::task::JoinHandle<()>>,
}

/// The guest-facing listener: a socket bound (as root, before bangerd dropped
/// privileges) on the bridge address, port 53, and the upstreams to forward to.
#[derive(Debug, Clone)]
pub struct GuestDns {
    pub socket: Arc<std::net::UdpSocket>,
    /// The same address over TCP (answers too large for UDP are retried there).
    pub tcp: Option<Arc<std::net::TcpListener>>,
    pub upstreams: Vec<SocketAddr>,
}

fn start_guest(guest: Option<&GuestDns>, table: &Table) -> Option<tokio::task::JoinHandle<()>> {
    let g = guest?;
    let tcp = g.tcp.as_ref().and_then(|l| {
        l.try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .map_err(|e| tracing::error!(error = %e, "guest dns tcp listener"))
            .ok()
    });
    let sock = g
        .socket
        .try_clone()
        .and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UdpSocket::from_std(s)
        })
        .map_err(|e| tracing::error!(error = %e, "guest dns socket"))
        .ok()?;
    tracing::info!(addr = ?sock.local_addr().ok(), tcp = tcp.is_some(), upstreams = ?g.upstreams, "dns resolver for guests listening");
    let (table, upstreams) = (Arc::clone(table), g.upstreams.clone());
    Some(tokio::spawn(async move {
        match tcp {
            Some(l) => {
                tokio::join!(
                    serve_guests(sock, Arc::clone(&table), upstreams.clone()),
                    serve_guests_tcp(l, table, upstreams)
                );
            }
            None => serve_guests(sock, table, upstreams).await,
        }
    }))
}

impl ractor::Actor for DnsActor {
    type Msg = DnsMsg;
    type State = DnsState;
    /// Where to listen (None: disabled), the table to answer from, the guests' listener.
    type Arguments = (Option<SocketAddr>, Table, Option<GuestDns>);

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<DnsMsg>,
        (listen, table, guest): Self::Arguments,
    ) -> Result<DnsState, ractor::ActorProcessingErr> {
        let guest_task = start_guest(guest.as_ref(), &table);
        let Some(listen) = listen else {
            return Ok(DnsState {
                addr: None,
                task: None,
                guest_task,
            });
        };
        match tokio::net::UdpSocket::bind(listen).await {
            Ok(socket) => {
                let addr = socket.local_addr().ok();
                tracing::info!(?addr, "dns resolver for .vm listening");
                Ok(DnsState {
                    addr,
                    task: Some(tokio::spawn(serve(socket, table))),
                    guest_task,
                })
            }
            Err(e) => {
                tracing::error!(%listen, error = %e, "cannot listen for .vm dns queries; continuing without");
                Ok(DnsState {
                    addr: None,
                    task: None,
                    guest_task,
                })
            }
        }
    }

    async fn post_stop(
        &self,
        _myself: ractor::ActorRef<DnsMsg>,
        state: &mut DnsState,
    ) -> Result<(), ractor::ActorProcessingErr> {
        for t in [state.task.take(), state.guest_task.take()]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ractor::ActorRef<DnsMsg>,
        msg: DnsMsg,
        state: &mut DnsState,
    ) -> Result<(), ractor::ActorProcessingErr> {
        match msg {
            DnsMsg::Addr(reply) => {
                let _ = reply.send(state.addr);
            }
        }
        Ok(())
    }
}
