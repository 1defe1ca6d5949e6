//! Published ports: host TCP listeners spliced to guest ports through the guest agent.
//!
//! Each published port is a `tokio` listener task on the host address (`127.0.0.1` unless
//! the spec names another). Every accepted connection gets its own agent connection over
//! the VM's hybrid vsock socket (`CONNECT <agent port>`, `Hello`, `TcpConnect { port }`);
//! once the agent answers `Connected`, the two streams are spliced both ways until either
//! side closes. Bytes the guest sent right after `Connected` may already sit in the
//! agent connection's read buffer, so they are written to the client first.
//!
//! Decisions, and why:
//! - **The agent, not the VM's network.** No root, no NAT or DNAT rule, no route to the
//!   bridge: it works for `--no-network` VMs and the rules of the VM's network (NAT,
//!   egress) do not apply to it. The guest sees the connection come from 127.0.0.1.
//! - **Loopback by default.** A port is reachable from other hosts only when the spec
//!   names an address (`0.0.0.0:8080:80`).
//! - **In the VM's record.** The specs are stored with the VM (`VmRecord::publish`), so a
//!   daemon restart re-binds them when it re-adopts a running VM. A spec with host port 0
//!   gets any free port; the port it got is stored too (`last_port`) and asked for first
//!   the next time (re-adoption after a daemon restart, or the next start), so the port
//!   stays the same while nothing else takes it.
//! - **Bound while the VM runs.** [`Published::bind_all`] at start, before the VMM is
//!   launched, so a taken port fails the start at once and launches nothing;
//!   [`Published::unbind_all`] when the VMM is gone (stop, kill, crash, delete). A
//!   connection accepted before the guest agent answers (the VM still booting) or to a
//!   guest port nothing listens on is accepted and closed at once, as docker-proxy does;
//!   the reason is logged at debug level.
//! - **A taken port is an error naming it** (`host port 127.0.0.1:8080 is already in
//!   use`): at create and `vm port add` of a stopped VM the port is probed (bound and let
//!   go), so nothing is created for a port that is taken now; a port taken between the probe
//!   and the start fails the start with the same message. When a restarted daemon cannot
//!   re-bind a port of a running VM, the VM keeps running and the port is reported not
//!   bound (and logged): the guest is not killed for a host port.
//! - **Removing a port closes its connections** (the listener task owns them).
//!
//! The VmActor holds one [`Published`] and calls it at start, launch, re-adoption and exit;
//! `vm port add|rm|list` arrive as one message carrying a [`PortOp`], applied by
//! [`Published::apply`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use banger_api::{PortRef, PortSpec, PublishedPort};
use banger_guest::host;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::actor::VmError;

/// How long a connection may wait for the agent's `Connected`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Splice buffer, each way.
const SPLICE_BUF: usize = 64 * 1024;

/// A published port as stored in the VM's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub spec: PortSpec,
    /// The host port it got when last bound (the one picked for host port 0), asked for
    /// first the next time.
    #[serde(default)]
    pub last_port: Option<u16>,
}

/// The records of newly published ports.
pub fn records(specs: &[PortSpec]) -> Vec<Publish> {
    specs
        .iter()
        .map(|&spec| Publish {
            spec,
            last_port: None,
        })
        .collect()
}

/// The ports as reported while nothing is bound.
pub fn unbound(ports: &[Publish]) -> Vec<PublishedPort> {
    ports
        .iter()
        .map(|p| PublishedPort {
            spec: p.spec,
            bound_port: None,
        })
        .collect()
}

/// Errors of published ports.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "host port {addr} is already in use; publish another port, or 0 for any free one (`--publish 0:{guest}`)"
    )]
    InUse { addr: SocketAddr, guest: u16 },
    #[error("cannot listen on host port {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{new} clashes with {old}, already published by vm {vm}")]
    Clash {
        vm: String,
        new: PortSpec,
        old: PortSpec,
    },
    #[error("vm {vm} publishes no port matching {what}; see `banger vm port list {vm}`")]
    NoMatch { vm: String, what: String },
    #[error("{0}")]
    Invalid(String),
}

impl From<PublishError> for VmError {
    fn from(e: PublishError) -> VmError {
        let message = banger_error::error_chain(&e);
        match e {
            PublishError::InUse { .. } | PublishError::Clash { .. } => VmError::Conflict(message),
            PublishError::Invalid(_) => VmError::Invalid(message),
            PublishError::NoMatch { .. } => VmError::Invalid(message),
            PublishError::Bind { .. } => VmError::Conflict(message),
        }
    }
}

/// `vm port add|rm|list`.
#[derive(Debug, Clone)]
pub enum PortOp {
    Add(PortSpec),
    Remove(String),
    List,
}

/// What a [`PortOp`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortAnswer {
    Added(PublishedPort),
    Removed(Vec<PublishedPort>),
    List(Vec<PublishedPort>),
}

/// One bound listener; dropping it stops the listener and closes its connections.
#[derive(Debug)]
struct Bound {
    spec: PortSpec,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Bound {
    /// Stop the listener and wait until its socket (and its connections) are closed, so
    /// the port is free when this returns.
    async fn close(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn close_all(bound: Vec<Bound>) {
    for b in bound {
        b.close().await;
    }
}

/// The published ports of one VM while it runs: its listeners and where they connect.
#[derive(Debug)]
pub struct Published {
    vm: String,
    /// The VM's hybrid vsock socket while its VMM runs; None before launch.
    target: watch::Sender<Option<PathBuf>>,
    bound: Vec<Bound>,
    /// Between [`Published::bind_all`] and [`Published::unbind_all`]: new ports bind now.
    active: bool,
}

fn bind_error(addr: SocketAddr, guest: u16, source: std::io::Error) -> PublishError {
    if source.kind() == std::io::ErrorKind::AddrInUse {
        PublishError::InUse { addr, guest }
    } else {
        PublishError::Bind { addr, source }
    }
}

/// Check that the fixed host ports of `specs` are free now (bind and let go), and that no
/// two clash. For `vm create`: nothing is created for a port that is taken.
pub fn probe(vm: &str, specs: &[PortSpec]) -> Result<(), PublishError> {
    for (i, s) in specs.iter().enumerate() {
        if let Some(old) = specs[..i].iter().find(|&o| s.clashes_with(o) || o == s) {
            return Err(PublishError::Clash {
                vm: vm.into(),
                new: *s,
                old: *old,
            });
        }
        if s.host_port != 0 {
            let addr = SocketAddr::new(s.host_ip, s.host_port);
            std::net::TcpListener::bind(addr).map_err(|e| bind_error(addr, s.guest_port, e))?;
        }
    }
    Ok(())
}

impl Published {
    pub fn new(vm: &str) -> Published {
        Published {
            vm: vm.into(),
            target: watch::channel(None).0,
            bound: Vec::new(),
            active: false,
        }
    }

    /// Where connections go: the VM's vsock socket once its VMM runs.
    pub fn set_target(&self, vsock_socket: Option<PathBuf>) {
        self.target.send_replace(vsock_socket);
    }

    /// Bind one port: its last port first (for host port 0), else as asked.
    async fn bind(&self, p: &mut Publish) -> Result<Bound, PublishError> {
        let want = SocketAddr::new(p.spec.host_ip, p.spec.host_port);
        let listener = match p.last_port.filter(|_| p.spec.host_port == 0) {
            Some(last) => match TcpListener::bind(SocketAddr::new(p.spec.host_ip, last)).await {
                Ok(l) => Ok(l),
                Err(_) => TcpListener::bind(want).await,
            },
            None => TcpListener::bind(want).await,
        }
        .map_err(|e| bind_error(want, p.spec.guest_port, e))?;
        let addr = listener
            .local_addr()
            .map_err(|source| PublishError::Bind { addr: want, source })?;
        p.last_port = Some(addr.port());
        let task = tokio::spawn(serve(
            listener,
            self.target.subscribe(),
            p.spec.guest_port,
            self.vm.clone(),
        ));
        tracing::info!(vm = %self.vm, %addr, guest_port = p.spec.guest_port, "published");
        Ok(Bound {
            spec: p.spec,
            addr,
            task,
        })
    }

    /// Bind every port (a start): all or none; the first that fails is the error.
    pub async fn bind_all(&mut self, ports: &mut [Publish]) -> Result<(), PublishError> {
        self.unbind_all().await;
        let mut bound = Vec::with_capacity(ports.len());
        for p in ports.iter_mut() {
            match self.bind(p).await {
                Ok(b) => bound.push(b),
                Err(e) => {
                    close_all(bound).await;
                    return Err(e);
                }
            }
        }
        self.bound = bound;
        self.active = true;
        Ok(())
    }

    /// Bind what can be bound (a running VM re-adopted by a restarted daemon): a port that
    /// cannot is logged and reported not bound; the VM keeps running.
    pub async fn rebind_all(&mut self, ports: &mut [Publish]) {
        self.unbind_all().await;
        for p in ports.iter_mut() {
            match self.bind(p).await {
                Ok(b) => self.bound.push(b),
                Err(e) => {
                    tracing::warn!(vm = %self.vm, spec = %p.spec, error = %banger_error::error_chain(&e), "cannot re-bind a published port")
                }
            }
        }
        self.active = true;
    }

    /// Close every listener and its connections (the VMM is gone); the ports are free
    /// when this returns.
    pub async fn unbind_all(&mut self) {
        self.active = false;
        self.set_target(None);
        close_all(std::mem::take(&mut self.bound)).await;
    }

    fn view_of(&self, p: &Publish) -> PublishedPort {
        PublishedPort {
            spec: p.spec,
            bound_port: self
                .bound
                .iter()
                .find(|b| b.spec == p.spec)
                .map(|b| b.addr.port()),
        }
    }

    /// The ports as reported, with what is bound now.
    pub fn view(&self, ports: &[Publish]) -> Vec<PublishedPort> {
        ports.iter().map(|p| self.view_of(p)).collect()
    }

    /// `vm port add|rm|list`. `ports` is the record's list; the caller persists it when
    /// the answer is `Added` or `Removed`.
    pub async fn apply(
        &mut self,
        ports: &mut Vec<Publish>,
        op: PortOp,
    ) -> Result<PortAnswer, PublishError> {
        match op {
            PortOp::List => Ok(PortAnswer::List(self.view(ports))),
            PortOp::Add(spec) => {
                if let Some(old) = ports
                    .iter()
                    .find(|o| spec.clashes_with(&o.spec) || o.spec == spec)
                {
                    return Err(PublishError::Clash {
                        vm: self.vm.clone(),
                        new: spec,
                        old: old.spec,
                    });
                }
                let mut p = Publish {
                    spec,
                    last_port: None,
                };
                if self.active {
                    let b = self.bind(&mut p).await?;
                    self.bound.push(b);
                } else {
                    probe(&self.vm, &[spec])?;
                }
                ports.push(p);
                Ok(PortAnswer::Added(self.view_of(&p)))
            }
            PortOp::Remove(what) => {
                let r: PortRef = what.parse().map_err(PublishError::Invalid)?;
                let (gone, kept): (Vec<Publish>, Vec<Publish>) =
                    ports.iter().partition(|p| r.matches(&self.view_of(p)));
                if gone.is_empty() {
                    return Err(PublishError::NoMatch {
                        vm: self.vm.clone(),
                        what,
                    });
                }
                let views = gone.iter().map(|p| self.view_of(p)).collect();
                let (closing, staying): (Vec<Bound>, Vec<Bound>) = std::mem::take(&mut self.bound)
                    .into_iter()
                    .partition(|b| gone.iter().any(|p| p.spec == b.spec));
                self.bound = staying;
                close_all(closing).await;
                *ports = kept;
                Ok(PortAnswer::Removed(views))
            }
        }
    }
}

/// Accept connections on one published port until aborted; each is forwarded in a task
/// of this listener's own, so aborting the listener closes them too.
async fn serve(
    listener: TcpListener,
    target: watch::Receiver<Option<PathBuf>>,
    guest_port: u16,
    vm: String,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Some(sock) = target.borrow().clone() else {
                        tracing::debug!(%vm, %peer, "published port: the vm is not up yet; closing");
                        continue;
                    };
                    let vm = vm.clone();
                    conns.spawn(async move {
                        if let Err(e) = forward(tcp, &sock, guest_port).await {
                            tracing::debug!(%vm, %peer, guest_port, error = %e, "published port: connection closed");
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors, mostly: wait a little instead of spinning.
                    tracing::warn!(%vm, error = %e, "published port: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Errors of one forwarded connection (logged, never returned to a caller).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Agent(#[from] host::HostError),
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("i/o")]
    Io(#[from] std::io::Error),
}

/// Splice `tcp` with `127.0.0.1:guest_port` in the guest, through the agent at `sock`.
pub async fn forward(
    mut tcp: TcpStream,
    sock: &std::path::Path,
    guest_port: u16,
) -> Result<(), ForwardError> {
    let agent = tokio::time::timeout(CONNECT_TIMEOUT, host::tcp_connect(sock, guest_port))
        .await
        .map_err(|_| ForwardError::Timeout(CONNECT_TIMEOUT))??;
    // What the guest sent right after `Connected` may be in the read buffer already.
    let early = agent.buffer().to_vec();
    let mut unix = agent.into_inner();
    let _ = tcp.set_nodelay(true);
    tcp.write_all(&early).await?;
    tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut unix, SPLICE_BUF, SPLICE_BUF).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stand-in for a VM's hybrid vsock socket that hands each connection to the real
    /// agent code (as `banger_guest::host`'s tests do), so `TcpConnect` reaches 127.0.0.1
    /// of this host. Counts the connections it served.
    fn fake_vsock(dir: &std::path::Path) -> PathBuf {
        let path = dir.join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim() != format!("CONNECT {}", banger_guest::proto::AGENT_PORT) {
                        return;
                    }
                    conn.try_clone()
                        .unwrap()
                        .write_all(b"OK 1073741824\n")
                        .unwrap();
                    let _ = banger_guest::agent::serve(conn);
                });
            }
        });
        path
    }

    /// A "guest" server on 127.0.0.1: greets first (so the greeting races `Connected` into
    /// the host's read buffer), then answers each line with `echo: <line>`.
    async fn greeting_echo_server() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    w.write_all(b"hello\n").await.unwrap();
                    let mut lines = tokio::io::BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if w.write_all(format!("echo: {line}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        port
    }

    use tokio::io::AsyncBufReadExt;

    fn spec(s: &str) -> PortSpec {
        s.parse().unwrap()
    }

    async fn talk(addr: SocketAddr, msg: &str) -> String {
        let s = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = s.into_split();
        let mut lines = tokio::io::BufReader::new(r).lines();
        assert_eq!(lines.next_line().await.unwrap().unwrap(), "hello");
        w.write_all(format!("{msg}\n").as_bytes()).await.unwrap();
        lines.next_line().await.unwrap().unwrap()
    }

    fn bound_addr(p: &Published, ports: &[Publish], i: usize) -> SocketAddr {
        let v = p.view(ports);
        SocketAddr::new(v[i].spec.host_ip, v[i].bound_port.expect("bound"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_reach_the_guest_port_through_the_agent_concurrently() {
        let dir = tempfile::tempdir().unwrap();
        let sock = fake_vsock(dir.path());
        let guest = greeting_echo_server().await;
        let mut ports = vec![Publish {
            spec: spec(&format!("0:{guest}")),
            last_port: None,
        }];
        let mut p = Published::new("t");
        p.bind_all(&mut ports).await.unwrap();
        p.set_target(Some(sock));
        let addr = bound_addr(&p, &ports, 0);
        assert_eq!(addr.ip().to_string(), "127.0.0.1", "loopback by default");
        assert_eq!(
            ports[0].last_port,
            Some(addr.port()),
            "the picked port is kept"
        );
        let mut set = JoinSet::new();
        for i in 0..50 {
            set.spawn(async move { (i, talk(addr, &format!("n{i}")).await) });
        }
        let mut seen = 0;
        while let Some(r) = set.join_next().await {
            let (i, answer) = r.unwrap();
            assert_eq!(answer, format!("echo: n{i}"));
            seen += 1;
        }
        assert_eq!(seen, 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_data_both_ways_and_the_guests_close_reach_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let sock = fake_vsock(dir.path());
        // A guest server that reads 4 MiB, answers its length and closes.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let guest = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4 << 20];
            s.read_exact(&mut buf).await.unwrap();
            let sum: u64 = buf.iter().map(|&b| u64::from(b)).sum();
            s.write_all(format!("{sum}").as_bytes()).await.unwrap();
        });
        let mut ports = vec![Publish {
            spec: spec(&format!("0:{guest}")),
            last_port: None,
        }];
        let mut p = Published::new("t");
        p.bind_all(&mut ports).await.unwrap();
        p.set_target(Some(sock));
        let mut s = TcpStream::connect(bound_addr(&p, &ports, 0)).await.unwrap();
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let want: u64 = data.iter().map(|&b| u64::from(b)).sum();
        s.write_all(&data).await.unwrap();
        let mut back = String::new();
        // read_to_string ends only when the guest's close has come through.
        s.read_to_string(&mut back).await.unwrap();
        assert_eq!(back, want.to_string());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn before_launch_and_to_a_closed_guest_port_connections_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let guest = closed.local_addr().unwrap().port();
        drop(closed);
        let mut ports = vec![Publish {
            spec: spec(&format!("0:{guest}")),
            last_port: None,
        }];
        let mut p = Published::new("t");
        p.bind_all(&mut ports).await.unwrap();
        let addr = bound_addr(&p, &ports, 0);
        // No target yet (the VMM is not launched): accepted and closed.
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(s.read(&mut [0u8; 16]).await.unwrap(), 0);
        // Launched, but nothing listens on the guest port: the agent refuses; closed.
        p.set_target(Some(fake_vsock(dir.path())));
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(s.read(&mut [0u8; 16]).await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_taken_port_is_an_error_naming_it_and_binds_all_or_none() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let free = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = probe("t", &[spec(&format!("{port}:80"))]).unwrap_err();
        assert!(matches!(e, PublishError::InUse { .. }));
        assert!(
            e.to_string()
                .starts_with(&format!("host port 127.0.0.1:{port} is already in use")),
            "{e}"
        );
        let e = probe("t", &[spec("8080:80"), spec("0.0.0.0:8080:81")]).unwrap_err();
        assert!(e.to_string().contains("clashes with"), "{e}");

        let mut ports = vec![
            Publish {
                spec: spec(&format!("{free}:80")),
                last_port: None,
            },
            Publish {
                spec: spec(&format!("{port}:81")),
                last_port: None,
            },
        ];
        let mut p = Published::new("t");
        let e = p.bind_all(&mut ports).await.unwrap_err();
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(p.view(&ports).iter().all(|v| v.bound_port.is_none()));
        // The first port was let go again: it can be bound.
        std::net::TcpListener::bind(("127.0.0.1", free)).expect("released");
    }

    #[test]
    fn records_from_before_published_ports_load_and_ports_round_trip() {
        // A record as an older banger wrote it: no `publish`.
        let old = r#"{"id":"0123456789ab","name":"old","image":"img","kernel":"k","vmm":"qemu","spec":{"vcpu":1,"memory_mib":256,"disk_bytes":1073741824},"nat":false,"state":"stopped","error":null,"created_at":1,"started_at":null,"cmdline":null,"runtime":null,"ip":null}"#;
        let mut rec: crate::vm::model::VmRecord = serde_json::from_str(old).unwrap();
        assert!(rec.publish.is_empty());
        // Without ports it is written as before.
        assert_eq!(serde_json::to_string(&rec).unwrap(), old);
        rec.publish = vec![Publish {
            spec: spec("0:8000"),
            last_port: Some(41234),
        }];
        let back: crate::vm::model::VmRecord =
            serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back, rec);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn add_remove_and_sticky_ports() {
        let mut ports = Vec::new();
        let mut p = Published::new("t");
        // Not running: probed and stored, not bound.
        let PortAnswer::Added(a) = p
            .apply(&mut ports, PortOp::Add(spec("0:22")))
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(a.bound_port, None);
        let e = p
            .apply(&mut ports, PortOp::Add(spec("0:22")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("clashes"), "{e}");
        // Started: bound; a port added now binds at once.
        p.bind_all(&mut ports).await.unwrap();
        let first = p.view(&ports)[0].bound_port.unwrap();
        let PortAnswer::Added(b) = p
            .apply(&mut ports, PortOp::Add(spec("0:80")))
            .await
            .unwrap()
        else {
            panic!()
        };
        let second = b.bound_port.expect("bound at once");
        // Stopped and started again: host port 0 gets the port it had.
        p.unbind_all().await;
        assert!(TcpStream::connect(("127.0.0.1", first)).await.is_err());
        p.bind_all(&mut ports).await.unwrap();
        assert_eq!(p.view(&ports)[0].bound_port, Some(first));
        // rm by the bound port, then by spec; a miss names the vm.
        let PortAnswer::Removed(r) = p
            .apply(&mut ports, PortOp::Remove(second.to_string()))
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(r[0].spec, spec("0:80"));
        assert!(TcpStream::connect(("127.0.0.1", second)).await.is_err());
        let e = p
            .apply(&mut ports, PortOp::Remove("9:9".into()))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("vm t publishes no port matching 9:9"),
            "{e}"
        );
        let e = p
            .apply(&mut ports, PortOp::Remove("x".into()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("bad port spec \"x\""), "{e}");
        p.apply(&mut ports, PortOp::Remove("0:22".into()))
            .await
            .unwrap();
        assert!(ports.is_empty());
    }
}
