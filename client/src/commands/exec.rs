//! `banger vm exec`: the CLI asks the daemon where the VM's vsock socket is, then talks to
//! the guest agent through it directly, so output streams without a hop through the
//! daemon (like `docker exec` hijacking its connection). Reaching the socket needs the
//! same rights as reaching the daemon (owner, root, or group `banger`).

use std::io::Write;

use banger_api::{VmRpcClient, VmState, codes};
use banger_guest::host;
use banger_guest::proto::{self, ExecRequest, ExitStatus, Kind, Request, SignalMsg};
use jsonrpsee::async_client::Client;
use tokio::io::AsyncReadExt;

use crate::exit::{self, CliError};

fn agent_err(vm: &str, e: impl std::fmt::Display) -> CliError {
    CliError::Other(format!(
        "cannot reach vm {vm}'s guest agent: {e}; check `banger vm logs {vm}`"
    ))
}

/// The local terminal in raw mode for a `-t` exec; restored when dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enable() -> Option<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// `-e KEY=VALUE` flags as pairs; one without `=` is a usage error.
pub fn parse_env(env: &[String]) -> Result<Vec<(String, String)>, CliError> {
    env.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            None => Err(CliError::Usage(format!("--env {kv}: use KEY=VALUE"))),
        })
        .collect()
}

/// `vm show`, waiting while the daemon has not re-adopted the VM yet (a daemon that just
/// started answers at once and re-adopts its VMs behind, `adopting`): a command for the
/// VM's guest waits for it, as it would for the daemon itself.
pub async fn show_settled(client: &Client, vm: &str) -> Result<banger_api::VmInfo, CliError> {
    let deadline = std::time::Instant::now() + ADOPTION_WAIT;
    loop {
        let info = client.show(vm.to_owned()).await?;
        if !info.adopting || std::time::Instant::now() >= deadline {
            return Ok(info);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// How long a command waits for a VM's re-adoption.
const ADOPTION_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a command retries a running guest whose agent refuses the connection: after
/// a daemon restart re-adopted the VM, its guest's agent takes the new agent proxy's
/// session within about a second.
const AGENT_SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Connect to the agent of the running `vm` at `sock`, retrying for [`AGENT_SETTLE`] a
/// refusal, or a connection the proxy accepted and closed before the agent's hello (CI saw
/// one right after a re-adoption: the stream opened on the session being handed over).
pub async fn connect_agent(vm: &str, sock: &std::path::Path) -> Result<host::AgentConn, CliError> {
    let deadline = std::time::Instant::now() + AGENT_SETTLE;
    loop {
        match host::connect(sock).await {
            Err(
                host::HostError::Refused(_) | host::HostError::Proto(proto::ProtoError::Closed),
            ) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => return other.map_err(|e| agent_err(vm, e)),
        }
    }
}

/// Why the guest of `vm`, in `state` (not running), cannot be reached, with the way out;
/// `note` is appended (e.g. " (cp needs its agent)"). The conflict exit status.
pub fn not_running(vm: &str, state: VmState, note: &str) -> CliError {
    let message = match state {
        VmState::Paused => format!("{}{note}", banger_api::paused_refusal(vm)),
        _ => format!(
            "vm {vm} is {}; start it with `banger vm start {vm}`{note}",
            state.as_str()
        ),
    };
    CliError::Rpc {
        code: codes::CONFLICT,
        message,
    }
}

/// Run `cmd` in `vm`; the result is the command's exit status (128+N for a signal).
pub async fn run(
    client: &Client,
    vm: &str,
    tty: bool,
    env: Vec<String>,
    workdir: Option<String>,
    cmd: Vec<String>,
) -> Result<u8, CliError> {
    let env = parse_env(&env)?;
    let info = show_settled(client, vm).await?;
    if info.state != VmState::Running {
        return Err(not_running(vm, info.state, ""));
    }
    let sock = info
        .vsock_socket
        .ok_or_else(|| agent_err(vm, "the vm has no vsock socket"))?;
    let conn = connect_agent(vm, std::path::Path::new(&sock)).await?;
    let mut stream = conn.stream;
    let size = if tty {
        terminal_size::terminal_size()
    } else {
        None
    };
    let (cols, rows) = size.map(|(w, h)| (w.0, h.0)).unwrap_or((0, 0));
    host::write_json(
        &mut stream,
        Kind::Request,
        &Request::Exec(ExecRequest {
            argv: cmd,
            env,
            cwd: workdir,
            tty,
            rows,
            cols,
        }),
    )
    .await
    .map_err(|e| agent_err(vm, e))?;
    debug_assert!(stream.buffer().is_empty());
    let (mut rx, mut tx) = stream.into_inner().into_split();

    // Host → guest: stdin, then its end; Ctrl-C as a signal.
    let (frames_tx, mut frames) = tokio::sync::mpsc::channel::<(Kind, Vec<u8>)>(16);
    let stdin_tx = frames_tx.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = stdin_tx.send((Kind::StdinEof, Vec::new())).await;
                    break;
                }
                Ok(n) => {
                    if stdin_tx
                        .send((Kind::Stdin, buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    // On a terminal in raw mode, Ctrl-C travels as a byte; track window size instead.
    let raw = if tty { RawMode::enable() } else { None };
    if tty {
        let resize_tx = frames_tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((w, h)) = terminal_size::terminal_size() {
                    let msg = serde_json::to_vec(&proto::ResizeMsg {
                        rows: h.0,
                        cols: w.0,
                    })
                    .expect("json");
                    if resize_tx.send((Kind::Resize, msg)).await.is_err() {
                        break;
                    }
                }
            }
        });
    }
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            let msg = serde_json::to_vec(&SignalMsg { signal: 2 }).expect("json");
            if frames_tx.send((Kind::Signal, msg)).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Some((kind, payload)) = frames.recv().await {
            if host::write_frame(&mut tx, kind, &payload).await.is_err() {
                break;
            }
        }
    });

    // Guest → host: output, then the exit status.
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    loop {
        let frame = host::read_frame(&mut rx)
            .await
            .map_err(|e| agent_err(vm, e))?;
        match frame.kind {
            Kind::Stdout => {
                let written = out.write_all(&frame.payload).and_then(|()| out.flush());
                if written.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
                    // Our reader went away (`vm exec dev -- cat big | head`): end quietly,
                    // as a local command killed by SIGPIPE would (see `render`).
                    drop(raw);
                    return Ok(exit::BROKEN_PIPE);
                }
            }
            Kind::Stderr => {
                let _ = err.write_all(&frame.payload);
                let _ = err.flush();
            }
            Kind::Exit => {
                drop(raw);
                let status: ExitStatus =
                    proto::expect_json(&frame, Kind::Exit).map_err(|e| agent_err(vm, e))?;
                return Ok(match (status.code, status.signal) {
                    (Some(c), _) => c.clamp(0, 255) as u8,
                    (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
                    (None, None) => 1,
                });
            }
            _ => {
                let e = proto::expect_json::<ExitStatus>(&frame, Kind::Exit).unwrap_err();
                return Err(CliError::Other(format!("vm {vm}: {e}")));
            }
        }
    }
}
