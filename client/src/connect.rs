//! Finding, reaching and starting the daemon.
//!
//! The socket is, in order: `--socket`/`BANGER_SOCKET`; the system service's
//! `/run/banger/bangerd.sock` if it exists; the user daemon's
//! `$XDG_RUNTIME_DIR/banger/bangerd.sock`. Commands that need the daemon start a user
//! daemon when none answers (like the docker/lima CLIs bring their backend up): `bangerd
//! --background` is spawned from beside this executable (or `$BANGER_BANGERD`, or PATH),
//! and the CLI waits until it answers `daemon.ping`. `BANGER_NO_AUTOSTART=1` turns that
//! off. The system service is never started from here: that is systemd's job.
//!
//! The daemon inherits the CLI's environment (so `BANGER_LOG_LEVEL=debug banger ps` starts
//! a daemon that logs at debug: real config keys are meant for it), minus the variables
//! only the CLI reads ([`CLI_ONLY_VARS`]): those never reach the daemon's config.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_api::DaemonRpcClient;
use jsonrpsee::async_client::{Client, ClientBuilder};
use jsonrpsee::client_transport::ws::WsTransportClientBuilder;

use crate::exit::CliError;

/// How long to wait for a freshly started daemon to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one call may take before the CLI gives up (long operations stream progress).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Which daemon the CLI talks to.
#[derive(Debug, Clone)]
pub struct Target {
    pub socket: PathBuf,
    /// The system service (never auto-started).
    pub system: bool,
}

impl Target {
    pub fn resolve(flag: Option<PathBuf>) -> Target {
        if let Some(socket) = flag {
            return Target {
                socket,
                system: false,
            };
        }
        let system = Path::new(banger_api::socket::SYSTEM_SOCKET);
        if system.exists() {
            return Target {
                socket: system.to_owned(),
                system: true,
            };
        }
        let env = |k: &str| std::env::var(k).ok();
        Target {
            socket: banger_api::socket::user_socket(&env, nix::unistd::getuid().as_raw()),
            system: false,
        }
    }

    fn display(&self) -> String {
        self.socket.display().to_string()
    }
}

/// Connect without starting anything. A daemon that is going away (killed, or at the end
/// of a stop) can still accept a connection and then drop it during the handshake; that is
/// retried for a moment, after which the socket refuses and this says "not running".
pub async fn connect(target: &Target) -> Result<Client, CliError> {
    let mut tries = 0;
    loop {
        match connect_once(target).await {
            Err(Handshake::Dropped(_)) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(Handshake::Dropped(e)) => {
                return Err(CliError::Connect {
                    socket: target.display(),
                    message: e.to_string(),
                });
            }
            Err(Handshake::Other(e)) => return Err(e),
            Ok(c) => return Ok(c),
        }
    }
}

/// Why one connection attempt failed.
enum Handshake {
    /// The daemon closed the connection during the handshake.
    Dropped(std::io::Error),
    Other(CliError),
}

/// The io error under a handshake failure when it says the peer went away.
fn dropped(e: &jsonrpsee::client_transport::ws::WsHandshakeError) -> Option<std::io::Error> {
    use jsonrpsee::client_transport::ws::WsHandshakeError as W;
    let io = match e {
        W::Io(io) => io,
        W::Transport(t) => std::error::Error::source(t)?.downcast_ref::<std::io::Error>()?,
        _ => return None,
    };
    matches!(
        io.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof
    )
    .then(|| std::io::Error::new(io.kind(), io.to_string()))
}

async fn connect_once(target: &Target) -> Result<Client, Handshake> {
    let stream = match tokio::net::UnixStream::connect(&target.socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(Handshake::Other(CliError::NotRunning {
                socket: target.display(),
            }));
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Handshake::Other(CliError::SocketDenied {
                socket: target.display(),
            }));
        }
        Err(e) => {
            return Err(Handshake::Other(CliError::Connect {
                socket: target.display(),
                message: e.to_string(),
            }));
        }
    };
    let url = url::Url::parse("ws://bangerd/").expect("static url");
    let (tx, rx) = WsTransportClientBuilder::default()
        .max_request_size(64 * 1024 * 1024)
        .max_response_size(64 * 1024 * 1024)
        .build_with_stream(url, stream)
        .await
        .map_err(|e| match dropped(&e) {
            Some(io) => Handshake::Dropped(io),
            None => Handshake::Other(CliError::Connect {
                socket: target.display(),
                message: e.to_string(),
            }),
        })?;
    Ok(ClientBuilder::default()
        .request_timeout(REQUEST_TIMEOUT)
        .build_with_tokio(tx, rx))
}

/// Connect, starting a user daemon first if none answers.
pub async fn connect_or_start(target: &Target) -> Result<Client, CliError> {
    match connect(target).await {
        Err(CliError::NotRunning { socket })
            if !target.system && std::env::var_os("BANGER_NO_AUTOSTART").is_none() =>
        {
            start(target).await.map_err(|e| match e {
                CliError::NotRunning { .. } => CliError::NotRunning { socket },
                e => e,
            })
        }
        other => other,
    }
}

/// `BANGER_*` variables read by the CLI alone; removed from an auto-started daemon's
/// environment. (`BANGER_SOCKET` is passed as `--socket` instead.)
pub const CLI_ONLY_VARS: &[&str] = &[
    "BANGER_TIMINGS",
    "BANGER_SOCKET",
    "BANGER_BANGERD",
    "BANGER_NO_AUTOSTART",
];

/// The command that starts a user daemon for `socket`.
fn daemon_command(bin: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--background").arg("--socket").arg(socket);
    for v in CLI_ONLY_VARS {
        cmd.env_remove(v);
    }
    cmd
}

pub(crate) fn bangerd_path() -> PathBuf {
    if let Some(p) = std::env::var_os("BANGER_BANGERD") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let sibling = dir.join("bangerd");
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from("bangerd")
}

/// Spawn `bangerd --background` and wait for it to answer.
async fn start(target: &Target) -> Result<Client, CliError> {
    let bin = bangerd_path();
    let mut child = daemon_command(&bin, &target.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CliError::StartFailed {
            message: format!("cannot run {}: {e}", bin.display()),
            log: None,
        })?;
    let mut stderr = child.stderr.take().expect("piped");
    let collector = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stderr.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(client) = connect(target).await
            && client.ping().await.is_ok()
        {
            return Ok(client);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = collector.join().unwrap_or_default();
            let message = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim_start_matches("bangerd: ").to_owned())
                .unwrap_or_else(|| format!("it exited with {status}"));
            // It stopped before logging anything: its message is all there is.
            return Err(CliError::StartFailed { message, log: None });
        }
        if Instant::now() > deadline {
            return Err(CliError::StartFailed {
                message: format!(
                    "it did not answer on {} within {START_TIMEOUT:?}",
                    target.display()
                ),
                log: Some("bangerd.log under $XDG_STATE_HOME/banger".into()),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_autostarted_daemon_gets_none_of_the_cli_only_variables() {
        let cmd = daemon_command(Path::new("/x/bangerd"), Path::new("/run/b.sock"));
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for v in ["BANGER_TIMINGS", "BANGER_SOCKET", "BANGER_NO_AUTOSTART"] {
            assert!(
                removed.iter().any(|r| r == v),
                "{v} reaches the daemon: {removed:?}"
            );
        }
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(args, ["--background", "--socket", "/run/b.sock"]);
    }

    /// A daemon that is going away accepts a connection, drops it, then stops listening:
    /// that is "not running" (so the CLI may start one), not a connection error.
    #[tokio::test]
    async fn a_daemon_dying_during_the_handshake_reads_as_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bangerd.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let dying = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            drop(conn);
            drop(listener);
        });
        let target = Target {
            socket,
            system: false,
        };
        let Err(err) = connect(&target).await else {
            panic!("connected to no daemon");
        };
        dying.join().unwrap();
        assert!(matches!(err, CliError::NotRunning { .. }), "{err:?}");
    }
}
