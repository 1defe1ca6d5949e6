//! The `.vm` resolver: answers A queries for `<vm>.vm` from the current VM table on
//! 127.0.0.1:42069 (configurable), NXDOMAIN for unknown VMs, REFUSED for every other zone.
//! Messages are parsed and built with hickory-proto; malformed packets get FORMERR when
//! their header is readable and are dropped otherwise; nothing a client sends can stop the
//! loop. (The guest-facing listener on the bridge, which also forwards other names
//! upstream, comes with the bridge.)
//!
//! Egress policy: a guest whose VM has a filtered policy (`--egress none|allow=…`, see
//! [`banger_api::egress`]) gets answers only for `.vm` names and the domains its policy
//! allows; any other name is REFUSED, counted and logged (at most one line per VM every
//! [`REFUSAL_LOG_EVERY`]). The addresses in an allowed answer are handed to a [`Vouch`]
//! (the helper's per-VM nftables set, each with its record's TTL as the timeout) before the
//! answer goes back, so the guest's connection right after the lookup already passes.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// Names → addresses, shared by the VM supervisor (writer) and the resolver (reader).
pub type Table = Arc<RwLock<HashMap<String, Ipv4Addr>>>;

/// A running VM's egress policy as the guest resolver applies it.
#[derive(Debug)]
pub struct GuestPolicy {
    /// The VM's id (names its nftables set) and its name (for logs).
    pub vm: String,
    pub name: String,
    pub egress: banger_api::Egress,
    /// Queries refused for the policy.
    pub refused: std::sync::atomic::AtomicU64,
    last_log: std::sync::Mutex<Option<std::time::Instant>>,
    /// The names refused: queries and the last one's time, the newest [`REFUSED_NAMES`].
    /// (queries, last time, the refusal count then: orders them exactly).
    names: std::sync::Mutex<std::collections::HashMap<String, (u64, std::time::Instant, u64)>>,
}

/// Most refused names a VM's policy remembers (for `vm logs --egress`).
pub const REFUSED_NAMES: usize = 256;

impl GuestPolicy {
    pub fn new(vm: &str, name: &str, egress: banger_api::Egress) -> GuestPolicy {
        GuestPolicy {
            vm: vm.to_owned(),
            name: name.to_owned(),
            egress,
            refused: Default::default(),
            last_log: Default::default(),
            names: Default::default(),
        }
    }

    /// The names refused, the latest first.
    pub fn refused_names(&self) -> Vec<banger_api::RefusedName> {
        let names = self.names.lock().expect("refused names lock");
        let mut out: Vec<_> = names.iter().collect();
        out.sort_by_key(|(_, (_, _, seq))| std::cmp::Reverse(*seq));
        out.into_iter()
            .map(|(name, (queries, last, _))| banger_api::RefusedName {
                name: name.clone(),
                queries: *queries,
                last_secs: last.elapsed().as_secs(),
            })
            .collect()
    }

    fn refuse(&self, qname: &str) {
        let n = self
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        {
            let mut names = self.names.lock().expect("refused names lock");
            let now = std::time::Instant::now();
            let entry = names.entry(qname.to_owned()).or_insert((0, now, n));
            *entry = (entry.0 + 1, now, n);
            if names.len() > REFUSED_NAMES
                && let Some(oldest) = names
                    .iter()
                    .min_by_key(|(_, (_, _, seq))| *seq)
                    .map(|(n, _)| n.clone())
            {
                names.remove(&oldest);
            }
        }
        let mut last = self.last_log.lock().expect("refusal log lock");
        if last.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
            *last = Some(std::time::Instant::now());
            tracing::info!(vm = %self.name, name = %qname, refused = n, policy = %self.egress, "dns query refused by the egress policy");
        }
    }
}

/// Egress policies of running VMs by their lease, written by the VM actors.
pub type Policies = Arc<RwLock<HashMap<Ipv4Addr, Arc<GuestPolicy>>>>;

/// At most one refusal line per VM this often.
pub const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Future of a [`Vouch`].
pub type VouchFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// Makes the addresses of an allowed answer reachable for a VM, each for its TTL (seconds).
pub trait Vouch: Send + Sync + std::fmt::Debug {
    fn vouch(&self, vm: &str, addrs: Vec<(Ipv4Addr, u32)>) -> VouchFuture;
}

/// What the guests' resolver answers from: the `.vm` table, the upstreams, the policies.
#[derive(Debug, Clone)]
pub struct GuestResolver {
    pub table: Table,
    pub upstreams: Arc<Vec<SocketAddr>>,
    pub policies: Policies,
    /// None: no helper; allowed answers vouch for nothing (the filter needs the helper too).
    pub vouch: Option<Arc<dyn Vouch>>,
}

/// An answer of `code` to `packet` (None when unreadable).
fn reply_code(packet: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let q = Message::from_vec(packet).ok()?;
    let mut resp = Message::response(q.metadata.id, q.metadata.op_code);
    resp.metadata.recursion_desired = q.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = code;
    for query in q.queries {
        resp.add_query(query);
    }
    resp.to_vec().ok()
}

/// The question's name, lower case without the trailing dot.
fn qname(packet: &[u8]) -> Option<String> {
    let m = Message::from_vec(packet).ok()?;
    let q = m.queries.first()?;
    Some(
        q.name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase(),
    )
}

/// The A records of an answer, with TTLs clamped to what the helper takes.
pub fn answer_addrs(reply: &[u8]) -> Vec<(Ipv4Addr, u32)> {
    let Ok(m) = Message::from_vec(reply) else {
        return Vec::new();
    };
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(ip)) => Some((*ip, r.ttl.clamp(1, banger_policy::egress::MAX_TTL))),
            _ => None,
        })
        .collect()
}

/// What the policy says of a query not in `.vm` from `from`: None to forward it as is,
/// Some(refusal) to answer REFUSED, or the policy to forward under (then vouch).
enum Verdict {
    Forward,
    Refuse(Option<Vec<u8>>),
    Vouch(Arc<GuestPolicy>),
}

impl GuestResolver {
    fn verdict(&self, packet: &[u8], from: SocketAddr) -> Verdict {
        let std::net::IpAddr::V4(src) = from.ip() else {
            return Verdict::Forward;
        };
        let policy = self
            .policies
            .read()
            .expect("dns policies lock")
            .get(&src)
            .cloned();
        let Some(policy) = policy.filter(|p| p.egress.filtered()) else {
            return Verdict::Forward;
        };
        let name = qname(packet).unwrap_or_default();
        if !policy.egress.resolves(&name) {
            policy.refuse(&name);
            return Verdict::Refuse(reply_code(packet, ResponseCode::Refused));
        }
        Verdict::Vouch(policy)
    }

    /// Vouch for the addresses of `reply` for `policy`'s VM; SERVFAIL when that fails (the
    /// guest could not reach them).
    async fn vouched(
        &self,
        policy: &GuestPolicy,
        packet: &[u8],
        reply: Vec<u8>,
    ) -> Option<Vec<u8>> {
        let addrs = answer_addrs(&reply);
        if addrs.is_empty() {
            return Some(reply);
        }
        let Some(vouch) = &self.vouch else {
            return Some(reply);
        };
        match vouch.vouch(&policy.vm, addrs).await {
            Ok(()) => Some(reply),
            Err(e) => {
                tracing::warn!(vm = %policy.name, error = %e, "allowing the addresses of an answer");
                reply_code(packet, ResponseCode::ServFail)
            }
        }
    }

    /// The answer to a guest's query over UDP or TCP (`tcp`: forward over TCP).
    pub async fn resolve(&self, packet: Vec<u8>, from: SocketAddr, tcp: bool) -> Option<Vec<u8>> {
        if asks_vm_zone(&packet) != Some(false) {
            let t = self.table.read().expect("dns table lock");
            return answer(&packet, &t);
        }
        let policy = match self.verdict(&packet, from) {
            Verdict::Refuse(r) => return r,
            Verdict::Forward => None,
            Verdict::Vouch(p) => Some(p),
        };
        let reply = if tcp {
            forward_tcp(packet.clone(), &self.upstreams).await?
        } else {
            forward(packet.clone(), &self.upstreams).await?
        };
        match policy {
            Some(p) => self.vouched(&p, &packet, reply).await,
            None => Some(reply),
        }
    }
}

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
/// other name forwarded to the host's upstream resolvers, under each VM's egress policy.
pub async fn serve_guests(socket: tokio::net::UdpSocket, resolver: GuestResolver) {
    let socket = std::sync::Arc::new(socket);
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
        let packet = buf[..n].to_vec();
        if asks_vm_zone(&packet) != Some(false) {
            let reply = {
                let t = resolver.table.read().expect("dns table lock");
                answer(&packet, &t)
            };
            if let Some(reply) = reply {
                let _ = socket.send_to(&reply, from).await;
            }
            continue;
        }
        let Ok(permit) = std::sync::Arc::clone(&permits).try_acquire_owned() else {
            continue;
        };
        let (socket, resolver) = (std::sync::Arc::clone(&socket), resolver.clone());
        tokio::spawn(async move {
            if let Some(reply) = resolver.resolve(packet, from, false).await {
                let _ = socket.send_to(&reply, from).await;
            }
            drop(permit);
        });
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
pub async fn serve_guests_tcp(listener: tokio::net::TcpListener, resolver: GuestResolver) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(TCP_MAX));
    loop {
        let Ok(permit) = std::sync::Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let (mut conn, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "guest dns accept");
                continue;
            }
        };
        let resolver = resolver.clone();
        tokio::spawn(async move {
            while let Ok(Ok(packet)) =
                tokio::time::timeout(TCP_IDLE, read_tcp_message(&mut conn)).await
            {
                let reply = resolver.resolve(packet, from, true).await;
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

    fn resolver(upstreams: Vec<SocketAddr>) -> GuestResolver {
        GuestResolver {
            table: Arc::new(RwLock::new(table())),
            upstreams: Arc::new(upstreams),
            policies: Default::default(),
            vouch: None,
        }
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

    /// A real upstream on loopback that answers every A query with 192.0.2.1, TTL 60.
    async fn fixed_upstream() -> std::net::SocketAddr {
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
        up_addr
    }

    #[tokio::test]
    async fn guests_get_vm_names_and_everything_else_forwarded_upstream() {
        let up_addr = fixed_upstream().await;
        let guest = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let guest_addr = guest.local_addr().unwrap();
        tokio::spawn(serve_guests(guest, resolver(vec![up_addr])));
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
        tokio::spawn(serve_guests_tcp(listener, resolver(vec![up_addr])));

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

    /// One vouch: the VM and its (address, TTL)s.
    type Vouched = (String, Vec<(Ipv4Addr, u32)>);

    /// Records what it is asked to vouch for.
    #[derive(Debug, Default)]
    struct Recorder(std::sync::Mutex<Vec<Vouched>>);

    impl Vouch for Recorder {
        fn vouch(&self, vm: &str, addrs: Vec<(Ipv4Addr, u32)>) -> VouchFuture {
            self.0.lock().unwrap().push((vm.to_owned(), addrs));
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_filtered_guest_gets_only_allowed_names_and_their_addresses_are_vouched_for() {
        let up_addr = fixed_upstream().await;
        let recorder = Arc::new(Recorder::default());
        let mut r = resolver(vec![up_addr]);
        r.vouch = Some(Arc::clone(&recorder) as Arc<dyn Vouch>);
        let egress: banger_api::Egress = "allow=allowed.test,*.svc.test".parse().unwrap();
        r.policies.write().unwrap().insert(
            Ipv4Addr::LOCALHOST,
            Arc::new(GuestPolicy::new("0123456789ab", "g", egress)),
        );
        let ask = |name: &str| {
            let mut q = Message::query();
            q.metadata.id = 5;
            q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            q.to_vec().unwrap()
        };
        let guest: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let other: SocketAddr = "127.0.0.2:5353".parse().unwrap();
        let code = |reply: Option<Vec<u8>>| {
            Message::from_vec(&reply.unwrap())
                .unwrap()
                .metadata
                .response_code
        };
        assert_eq!(
            code(r.resolve(ask("denied.test."), guest, false).await),
            ResponseCode::Refused
        );
        assert!(recorder.0.lock().unwrap().is_empty());
        assert_eq!(
            code(r.resolve(ask("web.vm."), guest, false).await),
            ResponseCode::NoError,
            ".vm names are always answered"
        );
        for name in ["allowed.test.", "a.svc.test."] {
            assert_eq!(
                code(r.resolve(ask(name), guest, false).await),
                ResponseCode::NoError
            );
        }
        assert_eq!(
            *recorder.0.lock().unwrap(),
            vec![
                (
                    "0123456789ab".to_owned(),
                    vec![(Ipv4Addr::new(192, 0, 2, 1), 60)]
                );
                2
            ]
        );
        let p = Arc::clone(
            r.policies
                .read()
                .unwrap()
                .get(&Ipv4Addr::LOCALHOST)
                .unwrap(),
        );
        assert_eq!(p.refused.load(std::sync::atomic::Ordering::Relaxed), 1);
        let names = p.refused_names();
        assert_eq!(
            names
                .iter()
                .map(|n| (n.name.as_str(), n.queries))
                .collect::<Vec<_>>(),
            [("denied.test", 1)],
            "the refused name is remembered for `vm logs --egress`"
        );
        // A guest without a filtered policy is forwarded as before, with nothing vouched.
        assert_eq!(
            code(r.resolve(ask("denied.test."), other, false).await),
            ResponseCode::NoError
        );
        assert_eq!(recorder.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_policy_remembers_the_newest_refused_names_only() {
        let p = GuestPolicy::new("0123456789ab", "g", banger_api::Egress::None);
        for i in 0..REFUSED_NAMES + 10 {
            p.refuse(&format!("n{i}.test"));
        }
        p.refuse("n20.test");
        let names = p.refused_names();
        assert_eq!(names.len(), REFUSED_NAMES);
        assert!(
            !names.iter().any(|n| n.name == "n0.test"),
            "the oldest went"
        );
        let again = names.iter().find(|n| n.name == "n20.test").unwrap();
        assert_eq!(again.queries, 2);
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

fn start_guest(
    guest: Option<&GuestDns>,
    table: &Table,
    policies: Policies,
    vouch: Option<Arc<dyn Vouch>>,
) -> Option<tokio::task::JoinHandle<()>> {
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
    let resolver = GuestResolver {
        table: Arc::clone(table),
        upstreams: Arc::new(g.upstreams.clone()),
        policies,
        vouch,
    };
    Some(tokio::spawn(async move {
        match tcp {
            Some(l) => {
                tokio::join!(
                    serve_guests(sock, resolver.clone()),
                    serve_guests_tcp(l, resolver)
                );
            }
            None => serve_guests(sock, resolver).await,
        }
    }))
}

impl ractor::Actor for DnsActor {
    type Msg = DnsMsg;
    type State = DnsState;
    /// Where to listen (None: disabled), the table to answer from, the guests' listener,
    /// the running VMs' egress policies and where allowed answers' addresses go.
    type Arguments = (
        Option<SocketAddr>,
        Table,
        Option<GuestDns>,
        Policies,
        Option<Arc<dyn Vouch>>,
    );

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<DnsMsg>,
        (listen, table, guest, policies, vouch): Self::Arguments,
    ) -> Result<DnsState, ractor::ActorProcessingErr> {
        let guest_task = start_guest(guest.as_ref(), &table, policies, vouch);
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
