//! Egress policy for real: the privileged helper's nftables filter (`bridge banger`) and
//! the guests' resolver, in network namespaces this test creates and deletes (never the
//! host's own). A namespace plays the guest: a veth named like a banger tap on the bridge
//! of a "host" namespace, its clients written here; an "outside" namespace runs a DNS
//! server (allowed.test, denied.test) and an HTTP-like server on each answer's address.
//! Needs root (`root_*`); run by scripts/test.sh.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_actors::net::dns::{self, GuestPolicy, GuestResolver, Vouch, VouchFuture};
use banger_api::Egress;
use banger_policy::{Helper, HelperConfig, Reply, Request};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

mod support;
use support::Netns;

const VM: &str = "0123456789ab";
const GUEST: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 5);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
const ALLOWED: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const DENIED: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
/// The TTL of allowed.test's answer: short, for the expiry check.
const TTL: u32 = 2;

fn config(state: &Path) -> HelperConfig {
    HelperConfig {
        bridge: "banger0".into(),
        gateway: GATEWAY,
        prefix: 24,
        state_dirs: vec![state.to_owned()],
        jail_base: state.join("jail"),
        tap_uids: vec![1000],
        vmm_binaries: vec!["/bin/sh".into()],
        resolvectl: None,
        nft: "/usr/sbin/nft".into(),
        jailer: None,
    }
}

fn done(h: &Mutex<Helper>, r: Request) {
    let what = format!("{r:?}");
    assert_eq!(h.lock().unwrap().call(&r).unwrap(), Reply::Done, "{what}");
}

/// Run `f` on a thread inside namespace `ns` (sockets it makes stay in that namespace).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn sh(cmd: &str) {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The outside DNS server: allowed.test → ALLOWED (TTL), denied.test → DENIED.
fn dns_server(sock: UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        let query = q.queries[0].clone();
        let name = query.name().to_ascii().to_ascii_lowercase();
        let (addr, ttl) = match name.trim_end_matches('.') {
            "allowed.test" => (Some(ALLOWED), TTL),
            "denied.test" => (Some(DENIED), 300),
            _ => (None, 0),
        };
        r.add_query(query.clone());
        match addr {
            Some(a) if query.query_type() == RecordType::A => {
                r.add_answer(Record::from_rdata(
                    query.name().clone(),
                    ttl,
                    RData::A(A(a)),
                ));
            }
            Some(_) => {}
            None => r.metadata.response_code = ResponseCode::NXDomain,
        }
        let _ = sock.send_to(&r.to_vec().unwrap(), from);
    }
}

/// An HTTP-like server that answers every connection with `body`.
fn http_server(l: TcpListener, body: &'static str) {
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        let mut buf = [0u8; 512];
        let _ = c.read(&mut buf);
        let _ = c.write_all(format!("HTTP/1.0 200 OK\r\n\r\n{body}").as_bytes());
    }
}

/// From the guest: ask `server` for `name`; None when no answer comes (dropped).
fn guest_dns(ns: &str, server: Ipv4Addr, name: &str) -> Option<(ResponseCode, Vec<Ipv4Addr>)> {
    let name = name.to_owned();
    in_ns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut q = Message::query();
        q.metadata.id = 77;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(
            Name::from_ascii(&name).unwrap(),
            RecordType::A,
        ));
        s.send_to(&q.to_vec().unwrap(), (server, 53)).unwrap();
        let mut buf = [0u8; 1500];
        let n = s.recv(&mut buf).ok()?;
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.message_type, MessageType::Response);
        let addrs = m
            .answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(a)) => Some(a),
                _ => None,
            })
            .collect();
        Some((m.metadata.response_code, addrs))
    })
}

/// From the guest: fetch from `addr`:80; None when the connection does not open (dropped).
fn guest_get(ns: &str, addr: Ipv4Addr) -> Option<String> {
    in_ns(ns, move || {
        let to = SocketAddr::from((addr, 80));
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        c.read_to_string(&mut out).ok()?;
        Some(out.rsplit("\r\n\r\n").next().unwrap_or("").to_owned())
    })
}

/// Vouches through the real helper, as the daemon's HelperVouch does.
#[derive(Debug)]
struct TestVouch(Arc<Mutex<Helper>>);

impl Vouch for TestVouch {
    fn vouch(&self, vm: &str, addrs: Vec<(Ipv4Addr, u32)>) -> VouchFuture {
        let (h, vm) = (Arc::clone(&self.0), vm.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                match h.lock().unwrap().call(&Request::EgressVouch { vm, addrs }) {
                    Ok(Reply::Done) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            })
            .await
            .unwrap()
        })
    }
}

fn counter(h: &Mutex<Helper>) -> u64 {
    match h
        .lock()
        .unwrap()
        .call(&Request::EgressCounter { vm: VM.into() })
        .unwrap()
    {
        Reply::Counter { packets } => packets.unwrap_or(0),
        other => panic!("{other:?}"),
    }
}

fn refused(h: &Mutex<Helper>) -> Vec<banger_policy::egress::RefusedFlow> {
    match h
        .lock()
        .unwrap()
        .call(&Request::EgressRefused { vm: VM.into() })
        .unwrap()
    {
        Reply::RefusedFlows { flows } => flows,
        other => panic!("{other:?}"),
    }
}

/// One ICMP echo request from the guest to `to` (a raw socket: no ping binary needed).
fn guest_ping(ns: &str, to: Ipv4Addr) {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
    };
    in_ns(ns, move || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Icmp,
        )
        .unwrap();
        // Echo request, id 1, seq 1; the checksum over the 8 bytes.
        let mut pkt = [8u8, 0, 0, 0, 0, 1, 0, 1];
        let sum: u32 = pkt
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        let addr = SockaddrIn::from(std::net::SocketAddrV4::new(to, 0));
        sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &pkt,
            &addr,
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
    });
}

fn set_policy(h: &Mutex<Helper>, policies: &dns::Policies, egress: &Egress) {
    let filter = banger_actors::net::egress::filter(egress, false);
    done(
        h,
        Request::EgressSet {
            vm: VM.into(),
            ip: GUEST,
            filter,
        },
    );
    policies.write().unwrap().insert(
        GUEST,
        Arc::new(GuestPolicy::new(VM, "guest", egress.clone())),
    );
}

#[test]
fn root_egress_allows_only_the_policy_through_the_filter_and_the_resolver() {
    let (host, guest, outside) = (Netns::new("egh"), Netns::new("egg"), Netns::new("ego"));
    let dir = tempfile::tempdir().unwrap();
    let h = Arc::new(Mutex::new(host.helper(&config(dir.path()))));
    done(&h, Request::EnsureBridge);
    let tap = format!("bg-{VM}");
    // The guest: a veth with a tap's name on the bridge, the other end in `guest`.
    sh(&format!(
        "ip -n {} link add {tap} type veth peer name g0 netns {}",
        host.0, guest.0
    ));
    done(&h, Request::AttachTap { name: tap.clone() });
    let g = &guest.0;
    sh(&format!(
        "ip -n {g} link set lo up && ip -n {g} addr add {GUEST}/24 dev g0 && ip -n {g} link set g0 up && ip -n {g} route add default via {GATEWAY}"
    ));
    // The outside, behind the host.
    let (hn, o) = (&host.0, &outside.0);
    sh(&format!(
        "ip -n {hn} link add out0 type veth peer name o0 netns {o} && ip -n {hn} addr add 10.99.0.1/24 dev out0 && ip -n {hn} link set out0 up && ip -n {o} link set lo up && ip -n {o} addr add {ALLOWED}/24 dev o0 && ip -n {o} addr add {DENIED}/24 dev o0 && ip -n {o} link set o0 up"
    ));
    done(
        &h,
        Request::NatAdd {
            vm: VM.into(),
            ip: GUEST,
        },
    );
    let (dns_sock, web_ok, web_no) = in_ns(o, || {
        (
            UdpSocket::bind((ALLOWED, 53)).unwrap(),
            TcpListener::bind((ALLOWED, 80)).unwrap(),
            TcpListener::bind((DENIED, 80)).unwrap(),
        )
    });
    std::thread::spawn(move || dns_server(dns_sock));
    std::thread::spawn(move || http_server(web_ok, "allowed"));
    std::thread::spawn(move || http_server(web_no, "denied"));

    // The guests' resolver on the bridge address, forwarding to the outside server; its
    // runtime (and every socket it makes to forward) lives in the host namespace.
    let policies: dns::Policies = Default::default();
    let resolver = GuestResolver {
        table: Default::default(),
        upstreams: Arc::new(vec![SocketAddr::from((ALLOWED, 53))]),
        policies: Arc::clone(&policies),
        vouch: Some(Arc::new(TestVouch(Arc::clone(&h)))),
    };
    let ns_path = format!("/run/netns/{hn}");
    let (bound_tx, bound) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns_path).unwrap();
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let sock = UdpSocket::bind((GATEWAY, 53)).unwrap();
        sock.set_nonblocking(true).unwrap();
        bound_tx.send(()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sock = tokio::net::UdpSocket::from_std(sock).unwrap();
            dns::serve_guests(sock, resolver).await
        })
    });
    bound.recv().unwrap();

    // Before any policy (the subnet default with NAT, `all`): everything answers.
    assert_eq!(guest_get(g, DENIED).as_deref(), Some("denied"));

    let allow: Egress = "allow=allowed.test".parse().unwrap();
    set_policy(&h, &policies, &allow);
    assert_eq!(counter(&h), 0);

    // The allowed name resolves through the bridge resolver and its address answers.
    let (code, addrs) = guest_dns(g, GATEWAY, "allowed.test").expect("an answer");
    assert_eq!((code, addrs), (ResponseCode::NoError, vec![ALLOWED]));
    assert_eq!(guest_get(g, ALLOWED).as_deref(), Some("allowed"));
    // The denied name is refused, and counted.
    let (code, addrs) = guest_dns(g, GATEWAY, "denied.test").expect("an answer");
    assert_eq!((code, addrs.len()), (ResponseCode::Refused, 0));
    let p = Arc::clone(policies.read().unwrap().get(&GUEST).unwrap());
    assert_eq!(p.refused.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The denied server's address, never resolved through an allowed name, is dropped.
    assert_eq!(guest_get(g, DENIED), None);
    let after_direct = counter(&h);
    assert!(after_direct > 0, "the drop is counted");
    // So is DNS to any server but the bridge resolver, even at an allowed address.
    assert_eq!(guest_dns(g, ALLOWED, "allowed.test"), None);
    assert!(counter(&h) > after_direct);
    // What was dropped is remembered per flow (`vm logs --egress`): the connection to the
    // denied server, the DNS query to the outside server, a ping.
    guest_ping(g, DENIED);
    let flows = refused(&h);
    let flow = |addr: Ipv4Addr, proto: &str, port: Option<u16>| {
        flows
            .iter()
            .find(|f| f.addr == addr && f.proto == proto && f.port == port)
            .unwrap_or_else(|| panic!("{addr} {proto} {port:?} in {flows:?}"))
    };
    assert!(flow(DENIED, "tcp", Some(80)).packets >= 1);
    assert!(flow(ALLOWED, "udp", Some(53)).packets >= 1);
    assert_eq!(flow(DENIED, "icmp", None).packets, 1);
    assert!(flows.iter().all(|f| f.last_secs < 60), "{flows:?}");
    // A guest that fills the remembered flows (more destinations than are kept) is still
    // dropped: remembering is a rule of its own, and a full set does not skip the drop.
    let keep = banger_policy::egress::REFUSED_MAX as u16;
    in_ns(g, move || {
        let s = UdpSocket::bind((GUEST, 0)).unwrap();
        for port in 1000..1000 + keep + 20 {
            s.send_to(b"x", (DENIED, port)).unwrap();
        }
    });
    let flows = refused(&h);
    let with_port = flows.iter().filter(|f| f.port.is_some()).count();
    assert_eq!(with_port, usize::from(keep), "a full set keeps what it had");
    // A new flow with the set full: dropped (a connection to a port nothing listens on
    // that got through would be refused by the outside at once; dropped, it times out).
    let before = counter(&h);
    let e = in_ns(g, || {
        TcpStream::connect_timeout(&SocketAddr::from((DENIED, 81)), Duration::from_secs(2))
            .unwrap_err()
            .kind()
    });
    assert_eq!(
        e,
        std::io::ErrorKind::TimedOut,
        "still dropped with the set full"
    );
    assert!(counter(&h) > before);
    // Setting the filter again (`vm set --egress` on the running VM) keeps what was
    // remembered.
    set_policy(&h, &policies, &allow);
    assert!(
        refused(&h)
            .iter()
            .any(|f| f.addr == DENIED && f.port == Some(80))
    );

    // TTL: once the resolver's vouching runs out, allowed.test's address is dropped too.
    let set = format!("nft list set bridge banger d-{VM}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while host.sh(&set).contains(&ALLOWED.to_string()) {
        assert!(Instant::now() < deadline, "the element never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(guest_get(g, ALLOWED), None);
    // Resolved again, reachable again.
    assert!(guest_dns(g, GATEWAY, "allowed.test").is_some());
    assert_eq!(guest_get(g, ALLOWED).as_deref(), Some("allowed"));

    // `all`, on the running guest: everything works, filter gone.
    set_policy(&h, &policies, &Egress::All);
    assert_eq!(guest_get(g, DENIED).as_deref(), Some("denied"));
    let (code, addrs) = guest_dns(g, GATEWAY, "denied.test").expect("an answer");
    assert_eq!((code, addrs), (ResponseCode::NoError, vec![DENIED]));
    assert!(guest_dns(g, ALLOWED, "denied.test").is_some());

    // `none`: not even the allowed name; the bridge resolver still answers (REFUSED).
    set_policy(&h, &policies, &Egress::None);
    let (code, _) = guest_dns(g, GATEWAY, "allowed.test").expect("an answer");
    assert_eq!(code, ResponseCode::Refused);
    assert_eq!(guest_get(g, ALLOWED), None);

    // Removed with the VM: nothing of it is left, and the table goes with the last VM.
    done(&h, Request::EgressRemove { vm: VM.into() });
    done(&h, Request::EgressRemove { vm: VM.into() }); // absent is fine
    done(&h, Request::NatRemove { vm: VM.into() });
    let left = host.sh("nft list ruleset");
    assert!(!left.contains(VM) && !left.contains("banger"), "{left}");
}

#[test]
fn root_isolate_cuts_a_vm_off_from_its_neighbours_but_not_from_the_host() {
    let (host, g1, g2) = (Netns::new("eih"), Netns::new("ei1"), Netns::new("ei2"));
    let dir = tempfile::tempdir().unwrap();
    let h = Mutex::new(host.helper(&config(dir.path())));
    done(&h, Request::EnsureBridge);
    let (vm2, ip2) = ("0123456789ac", Ipv4Addr::new(172, 30, 0, 6));
    for (vm, ns, ip) in [(VM, &g1, GUEST), (vm2, &g2, ip2)] {
        let tap = format!("bg-{vm}");
        sh(&format!(
            "ip -n {} link add {tap} type veth peer name g0 netns {}",
            host.0, ns.0
        ));
        done(&h, Request::AttachTap { name: tap });
        let n = &ns.0;
        sh(&format!(
            "ip -n {n} link set lo up && ip -n {n} addr add {ip}/24 dev g0 && ip -n {n} link set g0 up"
        ));
    }
    let web = in_ns(&g2.0, move || TcpListener::bind((ip2, 80)).unwrap());
    std::thread::spawn(move || http_server(web, "neighbour"));
    let host_web = in_ns(&host.0, || TcpListener::bind((GATEWAY, 80)).unwrap());
    std::thread::spawn(move || http_server(host_web, "host"));
    // The default: VMs reach each other.
    assert_eq!(guest_get(&g1.0, ip2).as_deref(), Some("neighbour"));
    let isolated = banger_actors::net::egress::filter(&Egress::Subnet, true);
    done(
        &h,
        Request::EgressSet {
            vm: VM.into(),
            ip: GUEST,
            filter: isolated,
        },
    );
    assert_eq!(guest_get(&g1.0, ip2), None, "cut off from its neighbour");
    assert_eq!(guest_get(&g1.0, GATEWAY).as_deref(), Some("host"));
    assert!(counter(&h) > 0);
    done(&h, Request::EgressRemove { vm: VM.into() });
    assert_eq!(guest_get(&g1.0, ip2).as_deref(), Some("neighbour"));
    assert!(!host.sh("nft list ruleset").contains("banger"));
}
