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
}

impl ractor::Actor for DnsActor {
    type Msg = DnsMsg;
    type State = DnsState;
    /// Where to listen (None: disabled), and the table to answer from.
    type Arguments = (Option<SocketAddr>, Table);

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<DnsMsg>,
        (listen, table): Self::Arguments,
    ) -> Result<DnsState, ractor::ActorProcessingErr> {
        let Some(listen) = listen else {
            return Ok(DnsState {
                addr: None,
                task: None,
            });
        };
        match tokio::net::UdpSocket::bind(listen).await {
            Ok(socket) => {
                let addr = socket.local_addr().ok();
                tracing::info!(?addr, "dns resolver for .vm listening");
                Ok(DnsState {
                    addr,
                    task: Some(tokio::spawn(serve(socket, table))),
                })
            }
            Err(e) => {
                tracing::error!(%listen, error = %e, "cannot listen for .vm dns queries; continuing without");
                Ok(DnsState {
                    addr: None,
                    task: None,
                })
            }
        }
    }

    async fn post_stop(
        &self,
        _myself: ractor::ActorRef<DnsMsg>,
        state: &mut DnsState,
    ) -> Result<(), ractor::ActorProcessingErr> {
        if let Some(t) = state.task.take() {
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
