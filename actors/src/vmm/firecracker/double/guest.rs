//! The guest behind the double, as far as the host can see it: its power state and, when
//! asked for ([`super::Options::guest_agent`]), a banger agent listening on vsock port
//! [`AGENT_PORT`] that answers the handshake, `Health` and `Shutdown` (any other request
//! gets an `Error` frame).
//!
//! Power follows Firecracker (`FAQ.md`, "How can I gracefully reboot the guest?", and
//! `docs/api_requests/actions.md`): a guest **reboot** (the agent asked to reboot, or the
//! Ctrl+Alt+Del of `SendCtrlAltDel`, which a Linux guest turns into a reboot) ends the
//! process, because Firecracker exits on the CPU reset that `reboot=k` causes; a guest
//! **power-off or halt** brings the guest down, but "Firecracker process remains unaware of
//! the guest shutdown so it lives on": the API still answers, nothing in the guest listens
//! on vsock any more, and a later Ctrl+Alt+Del reaches no one. The kernel's last console
//! line tells the two apart, as on a real guest: `reboot: Restarting system` or
//! `reboot: Power down`.
//!
//! vsock, host-initiated (`docs/vsock.md`): a connection to the device's Unix socket sends
//! `CONNECT <port>\n`; when the guest listens on that port, Firecracker answers
//! `OK <host-side port>\n` (its muxer numbers host-side ports from 2^30 up) and the stream
//! is the guest's; when nothing listens, it closes the connection.
//!
//! Paused (`PATCH /vm {"state":"Paused"}`): the vCPUs are frozen, so nothing in the guest
//! answers. Firecracker's muxer (in the VMM thread, which runs) still takes a host
//! connection and its `CONNECT` line and queues the request for the guest, which does not
//! see it; after `CONN_REQUEST_TIMEOUT_MS` (2 s, `vsock/csm/connection.rs`) it drops the
//! connection. A resume within that time lets the guest answer. Established connections
//! stall: the agent answers nothing until the VM is resumed.
//!
//! Not modelled: guest-initiated connections (to `<uds_path>_<port>`), which banger does not
//! use.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use banger_guest::host;
use banger_guest::proto::{
    self, AGENT_PORT, ErrorMsg, Hello, Kind, PROTOCOL_VERSION, ProtoError, Request, Response,
};
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::watch;

/// How long a vsock connection may take to write its `CONNECT <port>\n` before it is closed.
const VSOCK_HANDSHAKE: Duration = Duration::from_secs(5);
/// The first host-side port Firecracker's muxer hands out (`local_port_last` starts at
/// 2^30 - 1 and is incremented before use).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long Firecracker's muxer waits for the guest to answer a connection request
/// (`CONN_REQUEST_TIMEOUT_MS`) before it drops the connection.
const CONN_REQUEST_TIMEOUT: Duration = Duration::from_millis(2000);
/// What the double's agent calls itself.
const AGENT_SOFTWARE: &str = "banger-agent (firecracker double)";

/// The guest's power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestPower {
    /// Not booted (before `InstanceStart`).
    Off,
    Up,
    /// Powered off or halted: the Firecracker process lives on.
    Halted,
    /// Rebooting: the Firecracker process exits.
    Rebooting,
}

/// The guest, shared by the API handler and the vsock socket's connections.
#[derive(Debug)]
pub(crate) struct Guest {
    agent: bool,
    power: watch::Sender<GuestPower>,
    /// The vCPUs are frozen (the VMM is paused).
    paused: watch::Sender<bool>,
    last_local_port: AtomicU32,
}

impl Guest {
    pub(crate) fn new(agent: bool) -> Arc<Guest> {
        Arc::new(Guest {
            agent,
            power: watch::channel(GuestPower::Off).0,
            paused: watch::channel(false).0,
            last_local_port: AtomicU32::new(FIRST_LOCAL_PORT - 1),
        })
    }

    pub(crate) fn power(&self) -> GuestPower {
        *self.power.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<GuestPower> {
        self.power.subscribe()
    }

    /// `InstanceStart` (or a snapshot resumed): the guest is up.
    pub(crate) fn boot(&self) {
        self.power.send_replace(GuestPower::Up);
    }

    /// The guest reboots, if it is up (a halted guest does nothing). True if it does.
    pub(crate) fn reboot(&self) -> bool {
        self.power.send_if_modified(|power| {
            let up = *power == GuestPower::Up;
            if up {
                *power = GuestPower::Rebooting;
            }
            up
        })
    }

    /// The guest powers off (or halts), if it is up.
    pub(crate) fn halt(&self) {
        self.power.send_if_modified(|power| {
            let up = *power == GuestPower::Up;
            if up {
                *power = GuestPower::Halted;
            }
            up
        });
    }

    /// The VMM paused or resumed the vCPUs.
    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused
            .send_if_modified(|p| std::mem::replace(p, paused) != paused);
    }

    /// Until the vCPUs run (at once when they do).
    async fn running(&self) {
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|p| !*p).await;
    }

    fn listens(&self, port: u32) -> bool {
        self.agent && port == AGENT_PORT && self.power() == GuestPower::Up
    }

    /// Like the muxer's `allocate_local_port`: the next port with bit 30 set, bit 31 clear.
    fn local_port(&self) -> u32 {
        let previous = self
            .last_local_port
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(((p + 1) & !(1 << 31)) | (1 << 30))
            })
            .unwrap_or(FIRST_LOCAL_PORT - 1);
        ((previous + 1) & !(1 << 31)) | (1 << 30)
    }
}

/// A host-initiated connection to the vsock device's socket.
pub(crate) async fn host_connection(guest: Arc<Guest>, mut stream: UnixStream) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let read_line = async {
        while let Ok(1) = stream.read(&mut byte).await {
            if byte[0] == b'\n' {
                return true;
            }
            line.push(byte[0]);
        }
        false
    };
    let complete = tokio::time::timeout(VSOCK_HANDSHAKE, read_line)
        .await
        .unwrap_or(false);
    let text = String::from_utf8_lossy(&line).into_owned();
    let port = text
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok());
    // A paused guest does not see the request; the muxer gives up on it in time.
    if tokio::time::timeout(CONN_REQUEST_TIMEOUT, guest.running())
        .await
        .is_err()
    {
        tracing::debug!(request = %text, "vsock connection dropped: the guest is paused");
        return;
    }
    if !port.is_some_and(|p| complete && guest.listens(p)) {
        tracing::debug!(request = %text, "vsock connection closed: nothing listens in the guest");
        return;
    }
    let ok = format!("OK {}\n", guest.local_port());
    if stream.write_all(ok.as_bytes()).await.is_err() {
        return;
    }
    if let Err(error) = agent(&guest, &mut stream).await {
        tracing::debug!(%error, "the double's agent: connection ended");
    }
}

/// One agent connection: handshake, one request, its answer.
async fn agent(guest: &Guest, stream: &mut UnixStream) -> Result<(), ProtoError> {
    let theirs: Hello = proto::expect_json(&host::read_frame(stream).await?, Kind::Hello)?;
    if theirs.version != PROTOCOL_VERSION {
        let message = ProtoError::Version {
            ours: PROTOCOL_VERSION,
            theirs: theirs.version,
        }
        .to_string();
        return host::write_json(stream, Kind::Error, &ErrorMsg { message }).await;
    }
    let ours = Hello {
        version: PROTOCOL_VERSION,
        software: AGENT_SOFTWARE.into(),
    };
    guest.running().await;
    host::write_json(stream, Kind::Hello, &ours).await?;
    let request: Request = proto::expect_json(&host::read_frame(stream).await?, Kind::Request)?;
    // A paused guest answers nothing until it is resumed.
    guest.running().await;
    match request {
        Request::Health => {
            let health = Response::Health {
                software: AGENT_SOFTWARE.into(),
                uptime_secs: 0,
            };
            host::write_json(stream, Kind::Response, &health).await
        }
        Request::Shutdown { reboot } => {
            host::write_json(stream, Kind::Response, &Response::ShuttingDown).await?;
            if reboot {
                guest.reboot();
            } else {
                guest.halt();
            }
            Ok(())
        }
        Request::Boot { .. } => {
            // The double's guest has no init of its own: booted once it runs.
            let boot = Response::Boot {
                boot: proto::BootState {
                    init: proto::BOOT_INIT_BANGER.into(),
                    state: "running".into(),
                    failed: Vec::new(),
                },
            };
            host::write_json(stream, Kind::Response, &boot).await
        }
        Request::Identity { name, net, .. } => {
            // What a real agent changes is the guest's; the double says on its console
            // what it was asked, for the host's tests.
            let net = net.map_or("no network".to_owned(), |n| {
                format!(
                    "{} (was {}) mac {}",
                    n.address,
                    n.old_address.as_deref().unwrap_or("-"),
                    n.mac
                )
            });
            {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{GUEST_IDENTITY} {name}: {net}");
                let _ = out.flush();
            }
            let identity = Response::Identity {
                machine_id: format!("{:032x}", rand_u128()),
                host_keys: Vec::new(),
            };
            host::write_json(stream, Kind::Response, &identity).await
        }
        other => {
            let message = format!("the firecracker double's agent does not implement {other:?}");
            host::write_json(stream, Kind::Error, &ErrorMsg { message }).await
        }
    }
}

/// The console line of the double's agent taking an identity (`vm fork`'s clones),
/// followed by `<name>: <address> (was <old>) mac <mac>` or `<name>: no network`.
pub const GUEST_IDENTITY: &str = "banger-fc-double: identity";

/// A random number, from the kernel.
fn rand_u128() -> u128 {
    use std::io::Read;
    let mut b = [0u8; 16];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u128::from_le_bytes(b)
}
