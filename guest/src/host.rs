//! The host side: reach the agent through a VM's hybrid vsock Unix socket and speak the
//! protocol asynchronously. Used by the daemon (health, ports, stats, shutdown) and by the
//! CLI (`vm exec` streams directly over the socket, keeping the daemon out of the data path).

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::proto::{
    self, AGENT_PORT, Frame, Hello, Kind, PROTOCOL_VERSION, ProtoError, Request, Response,
};

/// Errors reaching the agent.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot reach the vm's vsock socket {path}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest refused vsock port {0} (the agent is not listening yet)")]
    Refused(u32),
    #[error("timed out talking to the guest agent")]
    Timeout,
    #[error("unexpected answer from the guest agent: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

/// A connection to the agent, handshake done.
#[derive(Debug)]
pub struct AgentConn {
    pub stream: BufReader<UnixStream>,
    pub agent: Hello,
}

/// Connect to `port` through the hybrid vsock socket (`CONNECT <port>\n` → `OK …\n`).
pub async fn connect_port(socket: &Path, port: u32) -> Result<BufReader<UnixStream>, HostError> {
    let mut s = UnixStream::connect(socket)
        .await
        .map_err(|source| HostError::Socket {
            path: socket.display().to_string(),
            source,
        })?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(ProtoError::Io)?;
    let mut s = BufReader::new(s);
    let mut line = String::new();
    let n = s.read_line(&mut line).await.map_err(ProtoError::Io)?;
    // A refused port closes the connection with no reply (Firecracker and
    // vhost-device-vsock alike). Don't rely on the number after OK.
    if n == 0 || !line.starts_with("OK") {
        return Err(HostError::Refused(port));
    }
    Ok(s)
}

/// Connect to the agent and shake hands.
pub async fn connect(socket: &Path) -> Result<AgentConn, HostError> {
    let mut stream = connect_port(socket, AGENT_PORT).await?;
    write_json(
        &mut stream,
        Kind::Hello,
        &Hello {
            version: PROTOCOL_VERSION,
            software: format!("banger {}", env!("CARGO_PKG_VERSION")),
        },
    )
    .await?;
    let agent: Hello = proto::expect_json(&read_frame(&mut stream).await?, Kind::Hello)?;
    if agent.version != PROTOCOL_VERSION {
        return Err(ProtoError::Version {
            ours: PROTOCOL_VERSION,
            theirs: agent.version,
        }
        .into());
    }
    Ok(AgentConn { stream, agent })
}

/// The agent's `TcpConnect`: a stream spliced to `127.0.0.1:port` in the guest. Bytes the
/// guest sent right after `Connected` may already sit in the returned reader's buffer.
pub async fn tcp_connect(socket: &Path, port: u16) -> Result<BufReader<UnixStream>, HostError> {
    let mut c = connect(socket).await?;
    write_json(&mut c.stream, Kind::Request, &Request::TcpConnect { port }).await?;
    let frame = read_frame(&mut c.stream).await?;
    match proto::expect_json::<Response>(&frame, Kind::Response)? {
        Response::Connected => Ok(c.stream),
        other => Err(HostError::Unexpected(format!("{other:?}"))),
    }
}

/// Read one frame.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtoError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut header[got..]).await? {
            0 if got == 0 => return Err(ProtoError::Closed),
            0 => return Err(ProtoError::Truncated { got, want: 4 }),
            n => got += n,
        }
    }
    let len = proto::body_len(header)?;
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match r.read(&mut body[got..]).await? {
            0 => return Err(ProtoError::Truncated { got, want: len }),
            n => got += n,
        }
    }
    proto::decode_body(body)
}

/// Write one frame.
pub async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    payload: &[u8],
) -> Result<(), ProtoError> {
    w.write_all(&proto::encode(kind, payload)?).await?;
    w.flush().await?;
    Ok(())
}

pub async fn write_json<W: tokio::io::AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    kind: Kind,
    v: &T,
) -> Result<(), ProtoError> {
    write_frame(
        w,
        kind,
        &serde_json::to_vec(v).expect("protocol types serialise"),
    )
    .await
}

/// One request → one response, within `timeout`.
pub async fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, HostError> {
    tokio::time::timeout(timeout, async {
        let mut c = connect(socket).await?;
        write_json(&mut c.stream, Kind::Request, req).await?;
        let frame = read_frame(&mut c.stream).await?;
        Ok(proto::expect_json(&frame, Kind::Response)?)
    })
    .await
    .map_err(|_| HostError::Timeout)?
}

/// Typed helper over [`call`].
pub async fn call_as<T: DeserializeOwned>(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<T, HostError> {
    let r = call(socket, req, timeout).await?;
    let v = serde_json::to_value(r).expect("responses serialise");
    serde_json::from_value(v).map_err(|e| {
        HostError::Proto(ProtoError::BadPayload {
            kind: Kind::Response,
            message: e.to_string(),
        })
    })
}

/// Send `data` as `Stdin` frames then `StdinEof` (64 KiB frames).
async fn send_stream<R: tokio::io::AsyncRead + Unpin>(
    c: &mut AgentConn,
    mut data: R,
) -> Result<(), HostError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = data.read(&mut buf).await.map_err(ProtoError::Io)?;
        if n == 0 {
            break;
        }
        write_frame(&mut c.stream, Kind::Stdin, &buf[..n]).await?;
    }
    write_frame(&mut c.stream, Kind::StdinEof, &[]).await?;
    Ok(())
}

/// Copy `Stdout` frames into `out` until `Exit`.
async fn receive_stream<W: tokio::io::AsyncWrite + Unpin>(
    c: &mut AgentConn,
    out: &mut W,
) -> Result<u64, HostError> {
    let mut total = 0;
    loop {
        let f = read_frame(&mut c.stream).await?;
        match f.kind {
            Kind::Stdout => {
                out.write_all(&f.payload).await.map_err(ProtoError::Io)?;
                total += f.payload.len() as u64;
            }
            Kind::Exit => {
                out.flush().await.map_err(ProtoError::Io)?;
                return Ok(total);
            }
            _ => {
                proto::expect_json::<proto::ExitStatus>(&f, Kind::Exit)?;
            }
        }
    }
}

/// A request that uploads a stream and gets one response (`FilePut`, `TarIn`).
pub async fn upload<R: tokio::io::AsyncRead + Unpin>(
    socket: &Path,
    req: &Request,
    data: R,
) -> Result<Response, HostError> {
    let mut c = connect(socket).await?;
    write_json(&mut c.stream, Kind::Request, req).await?;
    send_stream(&mut c, data).await?;
    Ok(proto::expect_json(
        &read_frame(&mut c.stream).await?,
        Kind::Response,
    )?)
}

/// `FileGet`: the file's bytes into `out`; returns (size, mode).
pub async fn get_file<W: tokio::io::AsyncWrite + Unpin>(
    socket: &Path,
    path: &str,
    out: &mut W,
) -> Result<(u64, u32), HostError> {
    let mut c = connect(socket).await?;
    write_json(
        &mut c.stream,
        Kind::Request,
        &Request::FileGet { path: path.into() },
    )
    .await?;
    let info: Response = proto::expect_json(&read_frame(&mut c.stream).await?, Kind::Response)?;
    let Response::FileInfo { size, mode } = info else {
        return Err(ProtoError::BadPayload {
            kind: Kind::Response,
            message: format!("{info:?}"),
        }
        .into());
    };
    receive_stream(&mut c, out).await?;
    Ok((size, mode))
}

/// `TarOut`: a tar stream of `dir` into `out`; returns its length.
pub async fn tar_out<W: tokio::io::AsyncWrite + Unpin>(
    socket: &Path,
    dir: &str,
    out: &mut W,
) -> Result<u64, HostError> {
    let req = Request::TarOut {
        dir: dir.into(),
        exclude: Vec::new(),
        one_file_system: false,
        xattrs: false,
    };
    tar_out_with(socket, &req, out).await
}

/// A `TarOut` request with its options (see [`Request::TarOut`]) into `out`; returns the
/// stream's length. Any other request is refused here, before it is sent.
pub async fn tar_out_with<W: tokio::io::AsyncWrite + Unpin>(
    socket: &Path,
    req: &Request,
    out: &mut W,
) -> Result<u64, HostError> {
    if !matches!(req, Request::TarOut { .. }) {
        return Err(ProtoError::BadPayload {
            kind: Kind::Request,
            message: "tar_out_with takes a tar_out request".into(),
        }
        .into());
    }
    let mut c = connect(socket).await?;
    write_json(&mut c.stream, Kind::Request, req).await?;
    receive_stream(&mut c, out).await
}

/// Wait until the agent answers `health`, retrying while the guest boots.
pub async fn wait_ready(socket: &Path, timeout: Duration) -> Result<Response, HostError> {
    wait_answer(socket, timeout, || Request::Health).await
}

/// Wait until the agent answers the request `req` makes (made again for each try: one
/// that carries the time is sent with the time it is sent), retrying while the guest
/// boots or a restored guest's agent starts its new session.
pub async fn wait_answer(
    socket: &Path,
    timeout: Duration,
    req: impl Fn() -> Request,
) -> Result<Response, HostError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = HostError::Timeout;
    // Soon at first (a restored guest answers within milliseconds), then every 100 ms.
    let mut pause = Duration::from_millis(5);
    while tokio::time::Instant::now() < deadline {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match call(socket, &req(), left.min(Duration::from_secs(5))).await {
            Ok(r) => return Ok(r),
            // A version mismatch will not fix itself by waiting, nor will a refusal: the
            // agent is up and answered.
            Err(HostError::Proto(e @ (ProtoError::Version { .. } | ProtoError::Remote(_)))) => {
                return Err(e.into());
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};

    /// A stand-in for the hybrid vsock socket: answers `CONNECT <port>` like
    /// vhost-device-vsock (OK, or a close for any other port), then hands the connection
    /// to the real agent code.
    fn fake_vsock(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim() != format!("CONNECT {AGENT_PORT}") {
                        return;
                    }
                    let mut w = conn.try_clone().unwrap();
                    w.write_all(b"OK 1073741824\n").unwrap();
                    let _ = crate::agent::serve(conn);
                });
            }
        });
        path
    }

    #[tokio::test]
    async fn files_and_trees_through_the_hybrid_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = fake_vsock(dir.path());
        let target = dir.path().join("put.txt").display().to_string();
        let r = upload(
            &sock,
            &Request::FilePut {
                path: target.clone(),
                mode: Some(0o600),
            },
            &b"content"[..],
        )
        .await
        .unwrap();
        assert_eq!(r, Response::Written { bytes: 7 });
        let mut back = Vec::new();
        assert_eq!(
            get_file(&sock, &target, &mut back).await.unwrap(),
            (7, 0o600)
        );
        assert_eq!(back, b"content");
        let mut tarball = Vec::new();
        let n = tar_out(&sock, &dir.path().display().to_string(), &mut tarball)
            .await
            .unwrap();
        assert_eq!(n as usize, tarball.len());
        let into = dir.path().join("copy").display().to_string();
        upload(&sock, &Request::TarIn { dir: into }, tarball.as_slice())
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("copy/put.txt")).unwrap(),
            b"content"
        );
    }

    #[tokio::test]
    async fn health_through_a_hybrid_socket_and_refused_ports() {
        let dir = tempfile::tempdir().unwrap();
        let sock = fake_vsock(dir.path());
        let r = wait_ready(&sock, Duration::from_secs(5)).await.unwrap();
        assert!(matches!(r, Response::Health { .. }));
        assert!(matches!(
            connect_port(&sock, 1).await,
            Err(HostError::Refused(1))
        ));
        let missing = dir.path().join("nope.sock");
        let err = wait_ready(&missing, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, HostError::Socket { .. }), "{err}");
    }
}
