//! A test double of Firecracker's API server, faithful enough to hold a driver to
//! Firecracker's published contract: the vendored Swagger spec ([`Spec`]) plus the rules
//! Firecracker's code adds to it (which operations are pre-boot or post-boot only, id
//! checks, files that must exist, metrics that initialise once). It serves HTTP/1.1 with
//! keep-alive on the API Unix socket, records every request, and lists every request it
//! refused in [`FirecrackerDouble::violations`]: a correct driver causes none.
//!
//! It answers as one Firecracker release ([`Options::release`]): the newest vendored spec,
//! or that of the oldest release banger supports ([`spec::OLDEST_SUPPORTED`]), which
//! refuses fields added since.
//!
//! There is no VM behind it, only a model of the guest ([`guest`]). `InstanceStart` reads
//! the kernel as Firecracker's x86-64 loader does and answers 400 with Firecracker's
//! message to a file that is not an ELF vmlinux (a bzImage gets `Invalid Elf magic
//! number`), else moves it to Running and boots the guest. A guest reboot
//! (`SendCtrlAltDel` to a running guest, or the guest agent asked to reboot) makes the
//! process exit shortly after: the API socket stops accepting and is removed. A guest
//! power-off (the agent asked to power off, or [`FirecrackerDouble::guest_poweroff`])
//! leaves the process running, as Firecracker does. The vsock device's host socket is
//! bound at `PUT /vsock`, as Firecracker does; a connection to it is read
//! (`CONNECT <port>\n`) and answered `OK <port>\n` when the guest listens on that port
//! (its agent, when [`Options::guest_agent`]), else closed.
//!
//! Not modelled: the guest's software beyond that, tap devices (`host_dev_name` is not checked against the host),
//! rate limiting, snapshot contents (`/snapshot/create` writes empty files), MMDS over the
//! network, and the MMDS `ipv4_address` format.
//!
//! [`process`] wraps the double in a jailer + Firecracker process, the `banger-fc-double`
//! binary, for end-to-end tests of the driver: as the jailer it needs root, makes the VM's
//! cgroups and device nodes for real, and fails unprivileged as the jailer does; run under
//! a name containing `firecracker` it is Firecracker alone (the driver's unjailed mode).

mod guest;
mod machine;
pub mod process;
mod spec;
#[cfg(test)]
mod tests;

pub use guest::{GUEST_IDENTITY, GuestPower};
pub use spec::{OLDEST_SUPPORTED, Release, Spec};

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue, SERVER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use guest::Guest;
use machine::{Effect, Vmm};

/// How long a guest takes to reboot (and the process to exit) once it decided to.
const GUEST_SHUTDOWN: Duration = Duration::from_millis(50);

/// How the double behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// The Firecracker release whose API it answers as.
    pub release: Release,
    /// The guest runs a banger agent on vsock port [`banger_guest::proto::AGENT_PORT`]
    /// (once booted), answering `Health` and `Shutdown`.
    pub guest_agent: bool,
}

/// One request as the double received it, with the status it answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub method: String,
    /// The request target: path and query, as sent.
    pub path: String,
    /// The JSON body; a body that is not JSON is kept as a JSON string of its text.
    pub body: Option<serde_json::Value>,
    pub status: u16,
    /// When the request's head arrived.
    pub at: Instant,
}

/// Where the double's microVM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoubleState {
    NotStarted,
    Running,
    Paused,
    /// The guest shut down and the process is gone: the API socket is removed.
    Exited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The test is done with the double.
    Shutdown,
    /// The guest shut down: the process exits.
    Exit,
}

#[derive(Debug)]
struct Shared {
    api_socket: PathBuf,
    vmm: Mutex<Vmm>,
    guest: Arc<Guest>,
    started: watch::Sender<Option<Instant>>,
    stop: watch::Sender<Option<Stop>>,
}

impl Shared {
    fn vmm(&self) -> MutexGuard<'_, Vmm> {
        // A panic while holding the lock leaves the double's records usable.
        self.vmm.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A fake Firecracker process: its API server on a Unix socket, and the state behind it.
#[derive(Debug)]
pub struct FirecrackerDouble {
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
}

impl FirecrackerDouble {
    /// Bind `api_socket` and serve the API (HTTP/1.1 over the Unix socket, keep-alive, like
    /// Firecracker). Fails if the socket path exists, as Firecracker does. `root`: the
    /// directory relative to which paths in bodies are resolved (the jail's chroot); `None`
    /// uses paths as given.
    pub async fn start(api_socket: &Path, root: Option<&Path>) -> std::io::Result<Self> {
        Self::start_with(api_socket, root, Options::default()).await
    }

    /// [`FirecrackerDouble::start`], behaving as `options` say.
    pub async fn start_with(
        api_socket: &Path,
        root: Option<&Path>,
        options: Options,
    ) -> std::io::Result<Self> {
        let listener = UnixListener::bind(api_socket)?;
        let (started, _) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(None);
        let guest = Guest::new(options.guest_agent);
        let shared = Arc::new(Shared {
            api_socket: api_socket.to_owned(),
            vmm: Mutex::new(Vmm::new(root, options.release.spec(), guest.clone())),
            guest,
            started,
            stop,
        });
        let server = tokio::spawn(serve(listener, shared.clone(), stop_rx));
        Ok(FirecrackerDouble {
            shared,
            server: Some(server),
        })
    }

    /// Every request in arrival order, with the status answered.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.vmm().requests.clone()
    }

    /// The requests that broke the spec or Firecracker's rules, each as
    /// `"<METHOD> <path>: <fault_message>"`.
    pub fn violations(&self) -> Vec<String> {
        self.shared.vmm().violations.clone()
    }

    pub fn state(&self) -> DoubleState {
        self.shared.vmm().state
    }

    /// The guest's power state.
    pub fn guest_power(&self) -> GuestPower {
        self.shared.guest.power()
    }

    /// The guest powers off by itself (`poweroff` typed in it): it halts, and the process
    /// lives on. Nothing happens unless the guest is up.
    pub fn guest_poweroff(&self) {
        self.shared.guest.halt();
    }

    /// The guest's boot id (made at `InstanceStart`, carried through a snapshot) and
    /// whether the guest was restored from a snapshot rather than booted.
    pub fn boot(&self) -> (Option<String>, bool) {
        self.shared.vmm().boot()
    }

    /// The version of the spec the double answers as.
    pub fn version(&self) -> String {
        self.shared.vmm().version().to_owned()
    }

    /// Whether drive `drive_id` advertises flush to the guest (`cache_type: Writeback`);
    /// `None` if there is no such drive.
    pub fn flush_advertised(&self, drive_id: &str) -> Option<bool> {
        self.shared.vmm().flush_advertised(drive_id)
    }

    /// Make the next request whose path starts with `path_prefix` fail with `status` and
    /// Firecracker's error body `{"fault_message": message}`. Not a violation. Several
    /// calls queue up; each fails one request.
    pub fn fail_next(&self, path_prefix: &str, status: u16, message: &str) {
        self.shared.vmm().fail_next(path_prefix, status, message);
    }

    /// Resolves when `InstanceStart` has been accepted; returns when it arrived.
    pub async fn instance_started(&self) -> Instant {
        let mut started = self.shared.started.subscribe();
        match started.wait_for(Option::is_some).await {
            Ok(at) => at.expect("wait_for saw Some"),
            // The sender lives in `self`, so this cannot happen; never resolving is the
            // honest answer if it did.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stop serving and remove the socket.
    pub async fn shutdown(mut self) {
        self.shared.stop.send_if_modified(|stop| {
            let first = stop.is_none();
            stop.get_or_insert(Stop::Shutdown);
            first
        });
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for FirecrackerDouble {
    fn drop(&mut self) {
        // The server task removes the socket on its way out.
        self.shared.stop.send_if_modified(|stop| {
            let first = stop.is_none();
            stop.get_or_insert(Stop::Shutdown);
            first
        });
    }
}

/// Accept connections until told to stop, then drop them all (like a process that exits),
/// remove the socket, and, if the guest shut down, mark the double Exited.
async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Option<Stop>>,
) {
    let mut connections = JoinSet::new();
    let mut power = shared.guest.subscribe();
    let mut exiting = false;
    let reason = loop {
        tokio::select! {
            // The guest rebooted: Firecracker exits on the reset.
            Ok(()) = power.changed(), if !exiting => {
                if *power.borrow_and_update() == GuestPower::Rebooting {
                    exiting = true;
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(GUEST_SHUTDOWN).await;
                        shared.stop.send_if_modified(|stop| {
                            let first = stop.is_none();
                            stop.get_or_insert(Stop::Exit);
                            first
                        });
                    });
                }
            }
            changed = stop.changed() => {
                break match changed {
                    Ok(()) => (*stop.borrow()).unwrap_or(Stop::Shutdown),
                    Err(_) => Stop::Shutdown,
                };
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, shared.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "firecracker double: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    };
    drop(listener);
    connections.shutdown().await;
    if let Err(error) = std::fs::remove_file(&shared.api_socket) {
        tracing::debug!(%error, "firecracker double: api socket already gone");
    }
    if reason == Stop::Exit {
        shared.vmm().exit();
    }
}

async fn serve_connection(stream: UnixStream, shared: Arc<Shared>) {
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(answer(&shared, request).await) }
    });
    if let Err(error) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%error, "firecracker double: connection ended");
    }
}

async fn answer(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let at = Instant::now();
    let method = request.method().as_str().to_owned();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let raw = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            tracing::debug!(%error, "firecracker double: body not read");
            return respond(400, None);
        }
    };
    let answer = shared.vmm().handle(&method, &path, &raw, at);
    match answer.effect {
        Effect::None => {}
        Effect::Started(at) => {
            shared.started.send_replace(Some(at));
        }
    }
    respond(answer.status, answer.body.as_ref())
}

/// A response as Firecracker's micro_http writes it: `Server: Firecracker API`, JSON bodies.
fn respond(status: u16, body: Option<&serde_json::Value>) -> Response<Full<Bytes>> {
    let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let headers = response.headers_mut();
    headers.insert(SERVER, HeaderValue::from_static("Firecracker API"));
    if body.is_some() {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response
}
