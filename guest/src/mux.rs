//! The agent channel over one byte stream: QEMU's, where the guest end is a virtio-serial
//! port (`virtserialport,name=banger.agent`) and the host end a Unix socket QEMU listens
//! on. (QEMU's vhost-user-vsock cannot be migrated, so a VM with it can never be saved; a
//! virtio-serial port can.) Firecracker keeps its native vsock and does not use this.
//!
//! On the stream runs a [`yamux`] session (the host is the client), one yamux stream per
//! connection. The host side, [`host::run_proxy`], is a small per-VM process
//! (`bangerd --internal-agent-proxy`) that keeps the hybrid-vsock contract of Firecracker
//! and vhost-device-vsock on `<run>/vsock.sock`: `CONNECT <port>\n` → `OK <port>\n` and a
//! spliced stream, or a closed socket when nothing in the guest listens on the port. So
//! everything above ([`crate::host`], `vm exec`, the ssh proxy, published ports) is
//! unchanged.
//!
//! **A session**, each time the host end (re)connects:
//!
//! 1. the host writes `BANGER-MUX HELLO <nonce>\n`, again each second until answered;
//! 2. the guest, which reads everything as lines until then (skipping whatever an earlier
//!    session left in the port), answers the first hello of a nonce with
//!    `\nBANGER-MUX READY <nonce>\n`;
//! 3. the host skips what it reads up to that line, stops the hellos and writes
//!    `BANGER-MUX GO <nonce>\n`; the guest skips further hellos up to that line;
//! 4. both run yamux from the next byte on.
//!
//! The handshake makes a session start clean whatever the port still held from the one
//! before (a proxy killed mid-stream, a guest agent restarted): its lines start with a
//! byte that is not yamux's version 0, so a stale session that reads one fails at once.
//! When either end sees its session fail or end, it starts over at 1 (the host by
//! reconnecting to QEMU, which the guest sees as the port's host end closing and opening).
//!
//! **A stream**: the host writes the guest port as a big-endian u32; the guest answers one
//! byte, [`ACCEPTED`] (then the stream carries the connection's bytes both ways, with
//! half-close) or [`REFUSED`] (then it closes).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The argument of bangerd that runs the proxy: `bangerd --internal-agent-proxy <serial
/// socket> <vsock socket>`.
pub const PROXY_ARG: &str = "--internal-agent-proxy";

/// The name of the virtio-serial port (`virtserialport,name=…`), as the guest sees it in
/// `/sys/class/virtio-ports/*/name`.
pub const PORT_NAME: &str = "banger.agent";

/// The guest's answer to a stream's port: something listens there.
pub const ACCEPTED: u8 = 1;
/// The guest's answer to a stream's port: nothing listens there.
pub const REFUSED: u8 = 0;

const HELLO: &[u8] = b"BANGER-MUX HELLO ";
const READY: &[u8] = b"BANGER-MUX READY ";
const GO: &[u8] = b"BANGER-MUX GO ";
/// A longer line is not one of ours: only its tail is kept while scanning.
const MAX_LINE: usize = 128;

/// The yamux settings of both ends.
fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    // Default 512; the ssh proxy, published ports and parallel execs share one VM.
    c.set_max_num_streams(1024);
    c
}

/// Read `r` a byte at a time (never past the line, so yamux gets the very next byte) until
/// a line holding `prefix` followed by a nonce; returns that nonce. Everything else is
/// skipped. `Ok(None)`: the stream ended first.
async fn next_marked_line<R: AsyncRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    prefixes: &[&[u8]],
) -> io::Result<Option<(usize, String)>> {
    let mut b = [0u8; 1];
    loop {
        if r.read(&mut b).await? == 0 {
            return Ok(None);
        }
        if b[0] != b'\n' {
            if line.len() == MAX_LINE {
                line.remove(0);
            }
            line.push(b[0]);
            continue;
        }
        let found = prefixes.iter().enumerate().find_map(|(i, p)| {
            let at = line.windows(p.len()).rposition(|w| w == *p)?;
            let nonce = &line[at + p.len()..];
            (!nonce.is_empty() && nonce.iter().all(u8::is_ascii_hexdigit))
                .then(|| (i, String::from_utf8_lossy(nonce).into_owned()))
        });
        line.clear();
        if found.is_some() {
            return Ok(found);
        }
    }
}

fn marked(prefix: &[u8], nonce: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(prefix.len() + nonce.len() + 2);
    v.extend_from_slice(prefix);
    v.extend_from_slice(nonce.as_bytes());
    v.push(b'\n');
    v
}

/// Splice `a` and `b` both ways until each direction has ended, each on its own: a
/// direction ends at its reader's end (then its writer is shut down, a half-close) or at an
/// error, and the other goes on. `tokio::io::copy_bidirectional` returns at the first error
/// of either, dropping what the other still had to carry: when the guest's agent sent
/// `Exit` and shut its socket down while the host's `StdinEof` was on its way, the write of
/// that frame failed (EPIPE) before the `Exit` waiting on the other side was read, and
/// `vm exec` printed the output and then "the connection closed" (CI saw it).
pub async fn splice<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let there = async {
        let _ = tokio::io::copy(&mut ar, &mut bw).await;
        let _ = bw.shutdown().await;
    };
    let back = async {
        let _ = tokio::io::copy(&mut br, &mut aw).await;
        let _ = aw.shutdown().await;
    };
    tokio::join!(there, back);
}

/// The host side: the proxy.
pub mod host {
    use std::path::Path;
    use std::sync::Arc;
    use std::task::Poll;
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};
    use tokio::sync::{mpsc, oneshot, watch};
    use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

    use super::*;

    /// How often the host repeats its hello until the guest answers (the agent starts late
    /// in the guest's boot, and an answer may have been lost to a stale session): soon at
    /// first, then less often. After a restore the guest's agent still runs the session of
    /// the proxy before, which reads the first hello as a broken yamux frame and ends; the
    /// guest answers the next one (with a fixed 1 s, a restore waited a second for it).
    const HELLO_FIRST: Duration = Duration::from_millis(25);
    const HELLO_EVERY: Duration = Duration::from_secs(1);

    type Open = oneshot::Sender<yamux::Result<yamux::Stream>>;
    /// The open-a-stream channel of the current session; None between sessions.
    type Current = watch::Sender<Option<mpsc::Sender<Open>>>;

    /// Run the proxy: serve `listener` (the hybrid-vsock socket) and keep a session with
    /// the guest over the stream `connect` opens, reconnecting when a session ends.
    /// Returns when `connect` fails (QEMU, which listens on the serial socket, is gone).
    pub async fn run_proxy<C, Fut>(listener: UnixListener, mut connect: C) -> io::Result<()>
    where
        C: FnMut() -> Fut,
        Fut: std::future::Future<Output = io::Result<UnixStream>>,
    {
        let current: Arc<Current> = Arc::new(watch::channel(None).0);
        let accepting = {
            let current = Arc::clone(&current);
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let open = current.borrow().clone();
                    tokio::spawn(serve_client(client, open));
                }
            })
        };
        let result = loop {
            let serial = match connect().await {
                Ok(s) => s,
                Err(e) => break Err(e),
            };
            session(serial, &current).await;
            current.send_replace(None);
        };
        accepting.abort();
        result
    }

    /// One session over `serial`, until it fails or ends.
    async fn session(mut serial: UnixStream, current: &Current) {
        let nonce = nonce();
        let hello = marked(HELLO, &nonce);
        {
            let (mut rd, mut wr) = serial.split();
            let mut line = Vec::new();
            let scan = next_marked_line(&mut rd, &mut line, &[READY]);
            tokio::pin!(scan);
            let mut every = HELLO_FIRST;
            let next = tokio::time::sleep(Duration::ZERO);
            tokio::pin!(next);
            loop {
                tokio::select! {
                    r = &mut scan => match r {
                        Ok(Some((_, n))) if n == nonce => break,
                        // An answer to another proxy's hello, the stream's end, an error.
                        _ => return,
                    },
                    () = &mut next => {
                        if wr.write_all(&hello).await.is_err() {
                            return;
                        }
                        next.as_mut().reset(tokio::time::Instant::now() + every);
                        every = (every * 2).min(HELLO_EVERY);
                    },
                }
            }
            if wr.write_all(&marked(GO, &nonce)).await.is_err() {
                return;
            }
        }
        let mut conn = yamux::Connection::new(serial.compat(), yamux_config(), yamux::Mode::Client);
        let (tx, mut rx) = mpsc::channel::<Open>(64);
        current.send_replace(Some(tx));
        let mut waiting: std::collections::VecDeque<Open> = Default::default();
        let _ = std::future::poll_fn(|cx| {
            while let Poll::Ready(Some(open)) = rx.poll_recv(cx) {
                waiting.push_back(open);
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(r) => {
                        let failed = r.is_err();
                        let _ = waiting.pop_front().expect("not empty").send(r);
                        if failed {
                            return Poll::Ready(());
                        }
                    }
                    Poll::Pending => break,
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    // The guest opens no streams of its own: refuse any it does.
                    Poll::Ready(Some(Ok(stream))) => drop(stream),
                    Poll::Ready(_) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
    }

    /// A nonce that differs between proxies and sessions.
    fn nonce() -> String {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        format!("{:016x}", h.finish())
    }

    /// One client of the hybrid-vsock socket: `CONNECT <port>\n`, then the stream.
    async fn serve_client(client: UnixStream, open: Option<mpsc::Sender<Open>>) {
        let mut client = BufReader::new(client);
        let mut line = String::new();
        // A client that never says what it wants is dropped after a while.
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            let mut limited = (&mut client).take(64);
            limited.read_line(&mut line).await
        });
        let Ok(Ok(_)) = read.await else { return };
        let Some(port) = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim_end().parse::<u32>().ok())
        else {
            return;
        };
        // No session (the guest's agent is not up yet, or the proxy is reconnecting):
        // refused, as a vsock port nobody listens on.
        let Some(open) = open else { return };
        let (tx, rx) = oneshot::channel();
        if open.send(tx).await.is_err() {
            return;
        }
        let Ok(Ok(stream)) = rx.await else { return };
        let mut stream = stream.compat();
        let accepted = async {
            stream.write_all(&port.to_be_bytes()).await?;
            stream.flush().await?;
            let mut answer = [0u8; 1];
            stream.read_exact(&mut answer).await?;
            io::Result::Ok(answer[0] == ACCEPTED)
        };
        if !matches!(accepted.await, Ok(true)) {
            return;
        }
        if client
            .write_all(format!("OK {port}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        splice(client, stream).await;
    }

    /// The proxy process: bind `listen` (replacing a stale socket a killed proxy left),
    /// then serve it with sessions over QEMU's `serial` socket until QEMU is gone.
    #[allow(clippy::print_stderr)]
    pub async fn main(serial: &Path, listen: &Path) -> io::Result<()> {
        let _ = std::fs::remove_file(listen);
        let listener = UnixListener::bind(listen)?;
        let serial = serial.to_owned();
        let r = run_proxy(listener, || UnixStream::connect(serial.clone())).await;
        let _ = std::fs::remove_file(listen);
        match r {
            // QEMU is gone: the proxy's work is over.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                // Said in the proxy's log, which a failed start quotes.
                eprintln!(
                    "QEMU's agent port {} is gone ({e}): the agent proxy exits",
                    serial.display()
                );
                Ok(())
            }
            r => r,
        }
    }
}

/// The guest side: the agent's end of the port.
pub mod guest {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream as StdUnixStream;
    use std::path::{Path, PathBuf};
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, ready};
    use std::time::Duration;

    use tokio::io::ReadBuf;
    use tokio::io::unix::AsyncFd;
    use tokio_util::compat::FuturesAsyncReadCompatExt;

    use super::*;

    /// What serves a port: a connected stream for an accepted connection, or None (refused).
    pub type Listen = Arc<dyn Fn(u32) -> Option<StdUnixStream> + Send + Sync>;

    /// Whether the VM has a virtio console device (virtio device id 3): QEMU's VMs do,
    /// Firecracker's do not.
    pub fn has_console_device(sys: &Path) -> bool {
        std::fs::read_dir(sys.join("bus/virtio/devices"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| {
                std::fs::read_to_string(d.path().join("device"))
                    .is_ok_and(|id| id.trim() == "0x0003")
            })
    }

    /// The device node of the port named [`PORT_NAME`], once the driver has it.
    pub fn find_port(sys: &Path, dev: &Path) -> Option<PathBuf> {
        std::fs::read_dir(sys.join("class/virtio-ports"))
            .ok()?
            .flatten()
            .find(|p| {
                std::fs::read_to_string(p.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME)
            })
            .map(|p| dev.join(p.file_name()))
    }

    /// One session on `io` (see the module docs), serving streams with `listen` until the
    /// session fails or the host end goes away (the stream ends).
    pub async fn session<T>(mut io: T, listen: &Listen) -> io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut line = Vec::new();
        let mut answered: Option<String> = None;
        loop {
            match next_marked_line(&mut io, &mut line, &[HELLO, GO]).await? {
                None => return Ok(()),
                Some((0, n)) => {
                    if answered.as_deref() != Some(n.as_str()) {
                        let mut ready = vec![b'\n'];
                        ready.extend(marked(READY, &n));
                        io.write_all(&ready).await?;
                        io.flush().await?;
                        answered = Some(n);
                    }
                }
                Some((_, n)) if answered.as_deref() == Some(n.as_str()) => break,
                Some(_) => {}
            }
        }
        let mut conn = yamux::Connection::new(
            tokio_util::compat::TokioAsyncReadCompatExt::compat(io),
            yamux_config(),
            yamux::Mode::Server,
        );
        loop {
            match std::future::poll_fn(|cx| conn.poll_next_inbound(cx)).await {
                Some(Ok(stream)) => {
                    tokio::spawn(serve_stream(stream, Arc::clone(listen)));
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Ok(()),
            }
        }
    }

    async fn serve_stream(stream: yamux::Stream, listen: Listen) {
        let mut stream = stream.compat();
        let mut port = [0u8; 4];
        if stream.read_exact(&mut port).await.is_err() {
            return;
        }
        let Some(conn) = listen(u32::from_be_bytes(port)) else {
            let _ = stream.write_all(&[REFUSED]).await;
            let _ = stream.shutdown().await;
            return;
        };
        let conn = conn
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(conn));
        let Ok(conn) = conn else {
            let _ = stream.write_all(&[REFUSED]).await;
            return;
        };
        if stream.write_all(&[ACCEPTED]).await.is_err() {
            return;
        }
        splice(stream, conn).await;
    }

    /// Serve the port at `path` for good: a session whenever the host end is connected,
    /// waiting for it to come back when it goes away (a proxy restart, a restore).
    pub async fn serve_port(path: &Path, listen: Listen) -> io::Result<()> {
        let port = Port::open(path)?;
        loop {
            port.wait_host().await;
            if let Err(e) = session(&port, &listen).await {
                log(format!("the session with the host ended: {e}"));
            }
        }
    }

    #[allow(clippy::print_stderr)]
    fn log(msg: String) {
        eprintln!("banger-agent: {msg}");
    }

    /// A virtio-serial port, non-blocking: a read returns 0 while the host end is closed.
    #[derive(Debug)]
    pub struct Port(AsyncFd<OwnedFd>);

    impl Port {
        pub fn open(path: &Path) -> io::Result<Port> {
            use nix::fcntl::{OFlag, open};
            let fd = open(
                path,
                OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                nix::sys::stat::Mode::empty(),
            )?;
            Ok(Port(register(fd)?))
        }

        /// Wait until the host end is open: poll(2) says POLLHUP while it is closed. It
        /// looks every 50 ms (only between sessions), which is simpler than telling a
        /// wake-up for the host's open from one for stale data.
        async fn wait_host(&self) {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            use std::os::fd::AsFd;
            loop {
                let mut fds = [PollFd::new(self.0.get_ref().as_fd(), PollFlags::POLLOUT)];
                let hup = poll(&mut fds, PollTimeout::ZERO).is_ok()
                    && fds[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLHUP));
                if !hup {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Register the port's descriptor with the runtime.
    #[allow(unsafe_code)]
    fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
        // SAFETY: `register` asks that the descriptor stay open and valid as long as the
        // AsyncFd lives: the AsyncFd owns this OwnedFd (nothing else holds it) and closes
        // it only when dropped.
        unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
    }

    impl AsyncRead for &Port {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            loop {
                let mut guard = ready!(self.0.poll_read_ready(cx))?;
                let unfilled = buf.initialize_unfilled();
                match guard
                    .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
                {
                    Ok(Ok(n)) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Ok(Err(e)) => return Poll::Ready(Err(e)),
                    Err(_would_block) => continue,
                }
            }
        }
    }

    impl AsyncWrite for &Port {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            loop {
                let mut guard = ready!(self.0.poll_write_ready(cx))?;
                match guard
                    .try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
                {
                    Ok(r) => return Poll::Ready(r),
                    Err(_would_block) => continue,
                }
            }
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixStream;

    /// The agent's end sent its last frame and shut its socket down both ways while the
    /// host still had bytes on their way to it: the splice fails to deliver those (the
    /// agent will not read them) but still carries the agent's last frame to the host, then
    /// the end of the stream. (`copy_bidirectional` lost the frame: it tried the write
    /// first, failed with EPIPE and returned.)
    #[tokio::test]
    async fn a_failed_write_one_way_does_not_drop_what_the_other_way_still_carries() {
        let (agent, agent_side) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mut host, host_side) = UnixStream::pair().unwrap();
        // What the host sent late is already waiting, and the agent's exit frame too.
        host.write_all(b"stdin-eof").await.unwrap();
        std::io::Write::write_all(&mut &agent, b"exit-frame").unwrap();
        agent.shutdown(std::net::Shutdown::Both).unwrap();
        agent_side.set_nonblocking(true).unwrap();
        let agent_side = UnixStream::from_std(agent_side).unwrap();
        let spliced = tokio::spawn(splice(host_side, agent_side));
        let mut got = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            host.read_to_end(&mut got),
        )
        .await
        .expect("the stream ends")
        .unwrap();
        assert_eq!(got, b"exit-frame");
        drop(host);
        tokio::time::timeout(std::time::Duration::from_secs(10), spliced)
            .await
            .expect("the splice ends when both ways have")
            .unwrap();
        drop(agent);
    }
}
