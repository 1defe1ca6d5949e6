//! The agent's request handling, generic over the connection so it runs over vsock in the
//! guest and over socketpairs in tests. One request per connection (see [`crate::proto`]).
//!
//! `exec` without a tty: the child's stdin, stdout and stderr are pipes; two threads send
//! its output as `Stdout`/`Stderr` frames, the connection's reader feeds `Stdin`, closes
//! stdin on `StdinEof` and forwards `Signal`s to the command's process group; `Exit` comes
//! after the output (a background process that keeps the pipes open delays it by 500 ms at
//! most). With `tty`, the command runs on a pseudo-terminal as a session leader (see
//! [`tty`]): one output stream, `Resize` sets the window size.

pub mod boot;
pub mod files;
pub mod identity;
pub mod sys;
mod tty;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::proto::{
    self, ErrorMsg, ExecRequest, ExitStatus, Kind, ProtoError, Request, Response, SignalMsg,
};

/// A connection the agent can split between threads.
pub trait Conn: Read + Write + Send + 'static {
    fn try_clone_conn(&self) -> std::io::Result<Self>
    where
        Self: Sized;
    /// Stop both directions (unblocks a reader in another thread).
    fn shutdown_conn(&self);
}

impl Conn for std::os::unix::net::UnixStream {
    fn try_clone_conn(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// The agent's name and version, as sent in `Hello`.
pub fn software() -> String {
    format!("banger-agent {}", env!("CARGO_PKG_VERSION"))
}

/// Serve one connection: handshake, one request. Errors are reported to the host as an
/// `Error` frame when the connection still allows it.
pub fn serve<C: Conn>(mut conn: C) -> Result<(), ProtoError> {
    proto::server_hello(&mut conn, &software())?;
    let frame = proto::read_frame(&mut conn)?;
    let req: Request = match proto::expect_json(&frame, Kind::Request) {
        Ok(r) => r,
        Err(e) => {
            let _ = proto::write_json(
                &mut conn,
                Kind::Error,
                &ErrorMsg {
                    message: e.to_string(),
                },
            );
            return Err(e);
        }
    };
    let answer = match req {
        Request::Exec(e) => return exec(conn, e),
        Request::Health => Ok(Response::Health {
            software: software(),
            uptime_secs: sys::uptime_secs(),
        }),
        Request::Ports => Ok(Response::Ports {
            ports: sys::listening_ports(),
        }),
        Request::Stats => Ok(Response::Stats {
            stats: sys::stats(),
        }),
        Request::HostKeys => Ok(Response::HostKeys {
            keys: sys::host_keys(),
        }),
        Request::FilePut { path, mode } => return files::put(&mut conn, &path, mode),
        Request::FileGet { path } => return files::get(&mut conn, &path),
        Request::TarIn { dir } => return files::tar_in(&mut conn, &dir),
        Request::TarOut {
            dir,
            exclude,
            one_file_system,
            xattrs,
        } => {
            let opts = files::PackOptions {
                exclude: exclude.into_iter().map(Into::into).collect(),
                one_file_system,
                xattrs,
            };
            return files::tar_out(&mut conn, &dir, &opts);
        }
        Request::TcpConnect { port } => return tcp_connect(conn, port),
        Request::Boot { timeout_secs } => Ok(Response::Boot {
            boot: boot::Probe::default().wait(std::time::Duration::from_secs(timeout_secs.into())),
        }),
        Request::Restored {
            unix_nanos,
            entropy,
        } => sys::restored(unix_nanos, &entropy),
        Request::Identity {
            name,
            net,
            host_key,
        } => identity::take(&name, net.as_ref(), host_key.as_ref()),
        Request::Shutdown { reboot } => {
            proto::write_json(&mut conn, Kind::Response, &Response::ShuttingDown)?;
            sys::shutdown(reboot);
            return Ok(());
        }
    };
    match answer {
        Ok(r) => proto::write_json(&mut conn, Kind::Response, &r),
        Err(message) => proto::write_json(&mut conn, Kind::Error, &ErrorMsg { message }),
    }
}

/// `TcpConnect`: splice the connection with a TCP connection to 127.0.0.1:`port`.
fn tcp_connect<C: Conn>(mut conn: C, port: u16) -> Result<(), ProtoError> {
    let tcp = match std::net::TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => {
            let message = format!("cannot connect to 127.0.0.1:{port} in the guest: {e}");
            return proto::write_json(&mut conn, Kind::Error, &ErrorMsg { message });
        }
    };
    proto::write_json(&mut conn, Kind::Response, &Response::Connected)?;
    let mut to_host = conn.try_clone_conn()?;
    let mut from_tcp = tcp.try_clone()?;
    let out = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_tcp, &mut to_host);
        // The guest side ended: the session is over.
        to_host.shutdown_conn();
    });
    let mut to_tcp = &tcp;
    let _ = std::io::copy(&mut conn, &mut to_tcp);
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let _ = out.join();
    Ok(())
}

fn exec<C: Conn>(mut conn: C, req: ExecRequest) -> Result<(), ProtoError> {
    let fail =
        |conn: &mut C, message: String| proto::write_json(conn, Kind::Error, &ErrorMsg { message });
    if req.tty {
        return tty::exec(conn, req);
    }
    let Some((prog, args)) = req.argv.split_first() else {
        return fail(&mut conn, "exec needs a command".into());
    };
    let mut cmd = Command::new(prog);
    // Its own process group, so a forwarded signal reaches `sh -c` and what it started.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.args(args)
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(&mut conn, format!("cannot run {prog}: {e}")),
    };
    let pid = child.id() as i32;
    let writer = Arc::new(Mutex::new(conn.try_clone_conn()?));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let pump = |mut from: Box<dyn Read + Send>, kind: Kind, w: Arc<Mutex<C>>| {
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let _done = done;
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut w = w.lock().expect("writer lock");
                        if proto::write_frame(&mut *w, kind, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    };
    let out = pump(
        Box::new(child.stdout.take().expect("piped")),
        Kind::Stdout,
        Arc::clone(&writer),
    );
    let err = pump(
        Box::new(child.stderr.take().expect("piped")),
        Kind::Stderr,
        Arc::clone(&writer),
    );
    // The host's frames: stdin, its end, signals.
    let mut stdin = child.stdin.take();
    let mut reader = conn;
    let reader_conn = reader.try_clone_conn()?;
    let input = std::thread::spawn(move || {
        while let Ok(frame) = proto::read_frame(&mut reader) {
            match frame.kind {
                Kind::Stdin => {
                    if let Some(s) = stdin.as_mut()
                        && s.write_all(&frame.payload).is_err()
                    {
                        stdin = None;
                    }
                }
                Kind::StdinEof => stdin = None,
                Kind::Signal => forward_signal(&frame.payload, pid),
                _ => {}
            }
        }
    });
    let status = child.wait()?;
    drop(done_tx);
    let _ = (out, err);
    finish(status, &done_rx, &writer, &reader_conn, input)
}

/// Forward a `Signal` frame's signal to the command's process group.
pub(super) fn forward_signal(payload: &[u8], pid: i32) {
    if let Ok(s) = serde_json::from_slice::<SignalMsg>(payload)
        && let Ok(sig) = nix::sys::signal::Signal::try_from(s.signal)
    {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// After the command exited: let its remaining output go out (a background process that
/// keeps the pipes open holds the exit back 500 ms at most: `outputs_done` disconnects when
/// every output pump has ended), send `Exit`, and end the input thread.
pub(super) fn finish<C: Conn>(
    status: std::process::ExitStatus,
    outputs_done: &std::sync::mpsc::Receiver<()>,
    writer: &Mutex<C>,
    reader: &C,
    input: std::thread::JoinHandle<()>,
) -> Result<(), ProtoError> {
    use std::os::unix::process::ExitStatusExt;
    let _ = outputs_done.recv_timeout(std::time::Duration::from_millis(500));
    let exit = ExitStatus {
        code: status.code(),
        signal: status.signal(),
    };
    {
        let mut w = writer.lock().expect("writer lock");
        proto::write_json(&mut *w, Kind::Exit, &exit)?;
    }
    reader.shutdown_conn();
    let _ = input.join();
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Serve one connection on a thread; return the host end.
    pub fn agent() -> UnixStream {
        let (host, guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _ = serve(guest);
        });
        host
    }

    /// Shake hands and send `req`.
    pub fn request(req: &Request) -> UnixStream {
        let mut s = agent();
        proto::client_hello(&mut s, "test").unwrap();
        proto::write_json(&mut s, Kind::Request, req).unwrap();
        s
    }

    /// All output frames (both streams) and the exit status.
    pub fn read_all(mut s: UnixStream) -> (Vec<u8>, ExitStatus) {
        let mut out = Vec::new();
        loop {
            let f = proto::read_frame(&mut s).unwrap();
            match f.kind {
                Kind::Stdout | Kind::Stderr => out.extend(f.payload),
                Kind::Exit => return (out, proto::expect_json(&f, Kind::Exit).unwrap()),
                other => panic!(
                    "unexpected {other:?}: {}",
                    String::from_utf8_lossy(&f.payload)
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Frame, GuestStats};

    use super::tests_support::{agent, request};

    /// Run an exec to its end: (stdout, stderr, exit).
    fn run(req: ExecRequest, stdin: Option<&[u8]>) -> (Vec<u8>, Vec<u8>, ExitStatus) {
        let mut s = request(&Request::Exec(req));
        if let Some(data) = stdin {
            proto::write_frame(&mut s, Kind::Stdin, data).unwrap();
            proto::write_frame(&mut s, Kind::StdinEof, &[]).unwrap();
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let f: Frame = proto::read_frame(&mut s).unwrap();
            match f.kind {
                Kind::Stdout => out.extend(f.payload),
                Kind::Stderr => err.extend(f.payload),
                Kind::Exit => return (out, err, proto::expect_json(&f, Kind::Exit).unwrap()),
                Kind::Error => panic!("{}", String::from_utf8_lossy(&f.payload)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn sh(script: &str) -> ExecRequest {
        ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }
    }

    #[test]
    fn exec_streams_both_outputs_and_the_exit_status() {
        let (out, err, exit) = run(sh("echo out; echo err >&2; exit 7"), None);
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert_eq!(
            exit,
            ExitStatus {
                code: Some(7),
                signal: None
            }
        );
    }

    #[test]
    fn exec_feeds_stdin_env_and_cwd() {
        let (out, _, exit) = run(
            ExecRequest {
                argv: vec!["cat".into()],
                ..Default::default()
            },
            Some(b"hi\n"),
        );
        assert_eq!((out.as_slice(), exit.code), (&b"hi\n"[..], Some(0)));
        let mut req = sh("echo $GREETING; pwd");
        req.env = vec![("GREETING".into(), "hello".into())];
        req.cwd = Some("/tmp".into());
        let (out, _, _) = run(req, None);
        assert_eq!(String::from_utf8(out).unwrap(), "hello\n/tmp\n");
    }

    #[test]
    fn exec_reports_signals_and_forwards_them() {
        let mut s = request(&Request::Exec(sh("echo started; sleep 30")));
        assert_eq!(proto::read_frame(&mut s).unwrap().payload, b"started\n");
        proto::write_json(&mut s, Kind::Signal, &SignalMsg { signal: 15 }).unwrap();
        loop {
            let f = proto::read_frame(&mut s).unwrap();
            if f.kind == Kind::Exit {
                let e: ExitStatus = proto::expect_json(&f, Kind::Exit).unwrap();
                assert_eq!(
                    e,
                    ExitStatus {
                        code: None,
                        signal: Some(15)
                    }
                );
                break;
            }
        }
    }

    #[test]
    fn exec_of_a_missing_program_is_a_clear_error() {
        let mut s = request(&Request::Exec(ExecRequest {
            argv: vec!["/no/such".into()],
            ..Default::default()
        }));
        let err = proto::expect_json::<ExitStatus>(&proto::read_frame(&mut s).unwrap(), Kind::Exit)
            .unwrap_err();
        assert!(err.to_string().contains("cannot run /no/such"), "{err}");
        let mut s = request(&Request::Exec(ExecRequest {
            argv: vec!["/no/such".into()],
            tty: true,
            ..Default::default()
        }));
        let err = proto::expect_json::<ExitStatus>(&proto::read_frame(&mut s).unwrap(), Kind::Exit)
            .unwrap_err();
        assert!(err.to_string().contains("cannot run /no/such"), "{err}");
    }

    #[test]
    fn health_stats_and_ports_answer() {
        let mut s = request(&Request::Health);
        let r: Response =
            proto::expect_json(&proto::read_frame(&mut s).unwrap(), Kind::Response).unwrap();
        assert!(
            matches!(r, Response::Health { software, .. } if software.starts_with("banger-agent"))
        );
        let mut s = request(&Request::Stats);
        let r: Response =
            proto::expect_json(&proto::read_frame(&mut s).unwrap(), Kind::Response).unwrap();
        let Response::Stats {
            stats:
                GuestStats {
                    memory_total_bytes,
                    root_total_bytes,
                    uptime_secs,
                    processes,
                    ..
                },
        } = r
        else {
            panic!("{r:?}");
        };
        assert!(memory_total_bytes > 0 && root_total_bytes > 0 && uptime_secs > 0 && processes > 0);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut s = request(&Request::Ports);
        let r: Response =
            proto::expect_json(&proto::read_frame(&mut s).unwrap(), Kind::Response).unwrap();
        let Response::Ports { ports } = r else {
            panic!()
        };
        let mine = ports
            .iter()
            .find(|p| p.port == port && p.proto == "tcp")
            .expect("our listener is listed");
        assert_eq!(mine.address, "127.0.0.1");
        assert_eq!(mine.pid, Some(std::process::id() as i32));
        assert!(mine.process.is_some());
    }

    #[test]
    fn tcp_connect_splices_both_ways_and_refuses_a_closed_port() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"SSH-2.0-test\r\n").unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&got).unwrap();
        });
        let mut s = request(&Request::TcpConnect { port });
        let f = proto::read_frame(&mut s).unwrap();
        assert_eq!(
            proto::expect_json::<Response>(&f, Kind::Response).unwrap(),
            Response::Connected
        );
        s.write_all(b"hello").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"SSH-2.0-test\r\nhello");
        server.join().unwrap();

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let mut s = request(&Request::TcpConnect { port });
        let f = proto::read_frame(&mut s).unwrap();
        assert!(
            matches!(proto::expect_json::<Response>(&f, Kind::Response), Err(ProtoError::Remote(m)) if m.contains("cannot connect")),
        );
    }

    #[test]
    fn a_bad_request_gets_an_error_and_the_agent_survives() {
        let mut s = agent();
        proto::client_hello(&mut s, "test").unwrap();
        proto::write_frame(&mut s, Kind::Request, br#"{"op":"rm_rf"}"#).unwrap();
        let f = proto::read_frame(&mut s).unwrap();
        assert_eq!(f.kind, Kind::Error);
        // Garbage instead of a hello, and a connection closed half-way: no panic, no hang.
        let mut s = agent();
        s.write_all(&[0, 0, 0, 3, 0x55, 1, 2]).unwrap();
        let _ = proto::read_frame(&mut s);
        let mut s = agent();
        s.write_all(&[0, 0, 1]).unwrap();
        drop(s);
        // A fresh connection still works.
        let mut s = request(&Request::Health);
        assert_eq!(proto::read_frame(&mut s).unwrap().kind, Kind::Response);
    }
}
