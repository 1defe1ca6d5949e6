//! The JSON-RPC server on the Unix socket: binding (mode 0660, group `banger`), the accept
//! loop with the SO_PEERCRED check, and graceful shutdown (stop accepting, let in-flight
//! requests finish, close connections, then return so the caller removes the socket).

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonrpsee::server::middleware::rpc::RpcServiceBuilder;
use jsonrpsee::server::{
    Methods, Server, ServerConfig, serve_with_graceful_shutdown, stop_channel,
};
use tokio::net::UnixListener;
use tokio::task::JoinSet;

use crate::auth::{Access, Gate, Peer};

/// Largest request body accepted (HTTP body or WebSocket message). Larger requests get a
/// JSON-RPC "request too big" error (HTTP 413 on plain HTTP) and the daemon keeps serving.
pub const MAX_REQUEST_BYTES: u32 = 10 * 1024 * 1024;
/// Largest response sent (console logs and tar streams travel as subscriptions, in chunks).
pub const MAX_RESPONSE_BYTES: u32 = 64 * 1024 * 1024;
/// Connections served at once.
pub const MAX_CONNECTIONS: u32 = 1024;
/// How long shutdown waits for connections to finish their in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

type BoxedResponse = std::pin::Pin<
    Box<
        dyn Future<Output = Result<jsonrpsee::server::HttpResponse, jsonrpsee::core::BoxError>>
            + Send,
    >,
>;

type BoxedConn =
    std::pin::Pin<Box<dyn Future<Output = Result<(), jsonrpsee::core::BoxError>> + Send>>;

/// Errors of the socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "the socket {0} is in use by another process; stop that daemon first (`banger daemon stop`)"
    )]
    InUse(PathBuf),
    #[error("cannot bind the socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A bound socket file, removed when dropped (if it is still ours).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Bind `path`: a stale socket (nobody answering) is replaced; a live one is refused.
/// The caller must hold the instance lock. The socket is made 0660 and, if the socket
/// group exists, group-owned by it.
pub fn bind(path: &Path, access: &Access) -> Result<(UnixListener, SocketFile), ServerError> {
    use std::os::unix::fs::MetadataExt;
    let bind_err = |source| ServerError::Bind {
        path: path.to_owned(),
        source,
    };
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    if let Some(gid) = access.group_gid()
        && let Err(e) = nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
    {
        tracing::warn!(error = %e, socket = %path.display(), "cannot give the socket to the banger group");
    }
    let ino = std::fs::symlink_metadata(path).map_err(bind_err)?.ino();
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            ino,
        },
    ))
}

/// Serve `methods` on `listener` until `shutdown` completes, then drain.
pub async fn serve(
    listener: UnixListener,
    methods: Methods,
    no_params: &'static [&'static str],
    access: Access,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_handle, server_handle) = stop_channel();
    let config = ServerConfig::builder()
        .max_request_body_size(MAX_REQUEST_BYTES)
        .max_response_body_size(MAX_RESPONSE_BYTES)
        .max_connections(MAX_CONNECTIONS)
        .build();
    let builder = Server::builder().set_config(config).to_service_builder();
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let peer = stream.peer_cred().ok().map(|c| Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        });
        let verdict = access.check(peer);
        if let crate::auth::Verdict::Denied(reason) = &verdict {
            tracing::warn!(?peer, %reason, "connection refused");
        }
        let middleware = RpcServiceBuilder::new()
            .layer_fn(move |inner| Gate::new(inner, verdict.clone(), no_params));
        let svc_builder = builder.clone().set_rpc_middleware(middleware);
        let methods = methods.clone();
        let stop = stop_handle.clone();
        let svc = tower::service_fn(move |req| {
            let mut svc = svc_builder.clone().build(methods.clone(), stop.clone());
            let fut: BoxedResponse =
                Box::pin(async move { tower::Service::call(&mut svc, req).await });
            fut
        });
        let stopped = stop_handle.clone().shutdown();
        // Boxed here, outside the spawned block: rustc cannot prove the Send bound of this
        // future through jsonrpsee's higher-ranked error conversion otherwise.
        let conn: BoxedConn = Box::pin(serve_with_graceful_shutdown(stream, svc, stopped));
        conns.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = server_handle.stop();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = conns.len(),
            "connections still open after the drain timeout; closing them"
        );
        conns.abort_all();
    }
}
