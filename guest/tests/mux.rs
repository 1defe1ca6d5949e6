//! The QEMU agent channel without a guest: bangerd's agent proxy (`mux::host`) on a real
//! Unix socket, its "serial port" a socketpair whose other end runs the guest's side
//! (`mux::guest::session`) with the real agent code behind it. The hybrid-vsock contract
//! is the one Firecracker and vhost-device-vsock keep: `CONNECT <port>\n` → `OK <port>\n`
//! for a port something listens on, a closed socket with no reply otherwise.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_guest::host::{self, HostError};
use banger_guest::mux::{self, guest};
use banger_guest::proto::{AGENT_PORT, Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// The guest's listeners: the agent on its port, nothing anywhere else.
fn agent_only() -> guest::Listen {
    Arc::new(|port| {
        if port != AGENT_PORT {
            return None;
        }
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().ok()?;
        std::thread::spawn(move || {
            let _ = banger_guest::agent::serve(ours);
        });
        Some(theirs)
    })
}

/// A proxy serving `<dir>/vsock.sock`. Each time it (re)connects to "QEMU" it gets one
/// end of a new socketpair; the other end is sent on the returned channel (the guest's
/// port, to run a session on or to close).
fn proxy(dir: &Path) -> (PathBuf, mpsc::UnboundedReceiver<UnixStream>) {
    let sock = dir.join("vsock.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(mux::host::run_proxy(listener, move || {
        let tx = tx.clone();
        async move {
            let (host_end, guest_end) = UnixStream::pair()?;
            tx.send(guest_end).map_err(std::io::Error::other)?;
            Ok(host_end)
        }
    }));
    (sock, rx)
}

/// Run the guest's side of a session on `port` until it ends.
fn guest_session(port: UnixStream) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move { guest::session(port, &agent_only()).await })
}

/// The raw exchange: what the socket answers to `CONNECT <port>\n` (None: it closed it).
async fn raw_connect(sock: &Path, line: &str) -> Option<String> {
    let mut s = BufReader::new(UnixStream::connect(sock).await.unwrap());
    s.get_mut().write_all(line.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let n = s.read_line(&mut answer).await.unwrap();
    if n == 0 {
        return None;
    }
    Some(answer)
}

async fn health(sock: &Path) -> Response {
    host::wait_ready(sock, Duration::from_secs(30))
        .await
        .expect("the agent answers through the proxy")
}

#[tokio::test]
async fn connect_ok_for_a_listening_port_and_a_closed_socket_for_a_refused_one() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, mut ports) = proxy(dir.path());
    let port = ports.recv().await.unwrap();

    // Before the guest's agent answers the proxy's hello, every port is refused.
    assert_eq!(
        raw_connect(&sock, &format!("CONNECT {AGENT_PORT}\n")).await,
        None
    );

    let session = guest_session(port);
    assert!(matches!(health(&sock).await, Response::Health { .. }));
    assert_eq!(
        raw_connect(&sock, &format!("CONNECT {AGENT_PORT}\n")).await,
        Some(format!("OK {AGENT_PORT}\n"))
    );
    // Nothing listens on port 1: closed, no reply, as vsock does.
    assert_eq!(raw_connect(&sock, "CONNECT 1\n").await, None);
    assert!(matches!(
        host::connect_port(&sock, 1).await,
        Err(HostError::Refused(1))
    ));
    // Not a CONNECT line: closed.
    assert_eq!(raw_connect(&sock, "HELLO\n").await, None);

    // A stream carries bytes both ways with half-close: a file there and back.
    let path = dir.path().join("f").display().to_string();
    let body = vec![7u8; 3 << 20];
    host::upload(
        &sock,
        &Request::FilePut {
            path: path.clone(),
            mode: None,
        },
        body.as_slice(),
    )
    .await
    .unwrap();
    let mut back = Vec::new();
    host::get_file(&sock, &path, &mut back).await.unwrap();
    assert_eq!(back, body);
    assert!(!session.is_finished());
}

#[tokio::test]
async fn twenty_concurrent_streams_on_one_session() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, mut ports) = proxy(dir.path());
    let _session = guest_session(ports.recv().await.unwrap());
    health(&sock).await;
    let calls = (0..20).map(|i| {
        let sock = sock.clone();
        let dir = dir.path().to_owned();
        tokio::spawn(async move {
            // Each holds its stream open while the others run: a file of its own.
            let path = dir.join(format!("f{i}")).display().to_string();
            let body = vec![i as u8; 256 << 10];
            host::upload(
                &sock,
                &Request::FilePut {
                    path: path.clone(),
                    mode: None,
                },
                body.as_slice(),
            )
            .await
            .unwrap();
            let mut back = Vec::new();
            host::get_file(&sock, &path, &mut back).await.unwrap();
            back == body
        })
    });
    for c in calls {
        assert!(c.await.unwrap());
    }
}

#[tokio::test]
async fn a_new_session_after_the_host_end_goes_away_and_stale_bytes_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, mut ports) = proxy(dir.path());
    let first = ports.recv().await.unwrap();
    // The guest end as QEMU sees it: the first session runs, then the "VM" closes its end
    // (the port's other end goes away, like a proxy or QEMU chardev reconnect).
    let (rd, wr) = first.into_split();
    let session = tokio::spawn(async move {
        let io = tokio::io::join(rd, wr);
        guest::session(io, &agent_only()).await
    });
    health(&sock).await;
    // A stream open while the session ends is closed, not left hanging.
    let mut open = host::connect(&sock).await.unwrap();
    session.abort();
    let _ = session.await;
    let mut rest = Vec::new();
    let _ = open.stream.read_to_end(&mut rest).await;

    // The proxy reconnects; the port still holds what the old session left (a yamux
    // header's worth of bytes and a half line), which both ends skip.
    let mut second = ports.recv().await.unwrap();
    second
        .write_all(b"\x00\x00\x00\x01\x00\x00\x00\x03half a line")
        .await
        .unwrap();
    let _session = guest_session(second);
    assert!(matches!(health(&sock).await, Response::Health { .. }));
}

#[tokio::test]
async fn the_proxy_ends_when_qemu_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let listen = dir.path().join("vsock.sock");
    // No QEMU listens on the serial socket: the proxy exits cleanly and removes its socket.
    mux::host::main(&dir.path().join("agent.sock"), &listen)
        .await
        .unwrap();
    assert!(!listen.exists());
}
