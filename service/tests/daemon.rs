//! Tests against a real daemon serving on a socket in a tempdir (in this process).

mod support;

use std::time::Duration;

use banger_api::{DaemonMode, DaemonRpcClient, codes};
use jsonrpsee::core::client::{ClientT, Error as ClientError};
use jsonrpsee::rpc_params;
use support::{TestDaemon, client_for, http_post};

#[tokio::test]
async fn ping_round_trip() {
    let d = TestDaemon::start().await;
    let c = d.client().await;
    let pong = c.ping().await.unwrap();
    assert_eq!(pong.version, env!("CARGO_PKG_VERSION"));
    drop(c);
    d.shutdown().await;
}

#[tokio::test]
async fn status_reports_the_daemon() {
    let d = TestDaemon::start().await;
    let c = d.client().await;
    let s = c.status().await.unwrap();
    assert_eq!(s.pid, std::process::id());
    assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(s.mode, DaemonMode::User);
    assert_eq!(s.socket, d.socket.display().to_string());
    assert_eq!(s.log_path, d.paths.log_file().display().to_string());
    assert!(s.uptime_secs < 60);
    assert!(s.started_at > 1_700_000_000);
    assert_eq!(s.store.path, d.paths.store_file().display().to_string());
    assert_eq!(s.store.schema_version, banger_actors::store::SCHEMA_VERSION);
    assert_eq!(s.store.starts, 1);
    assert_eq!(
        s.store.instance_id.len(),
        36,
        "a uuid: {}",
        s.store.instance_id
    );
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_clients() {
    let d = TestDaemon::start().await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let socket = d.socket.clone();
        tasks.push(tokio::spawn(async move {
            let c = client_for(&socket).await;
            for _ in 0..20 {
                c.ping().await.unwrap_or_else(|e| panic!("client {i}: {e}"));
            }
            c.status().await.unwrap().pid
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), std::process::id());
    }
    d.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_the_store() {
    let d = TestDaemon::start().await;
    let first = d.client().await.status().await.unwrap().store;
    let dir = d.shutdown().await;
    assert!(
        !dir.path().join("run/bangerd.sock").exists(),
        "socket removed on shutdown"
    );
    let d = TestDaemon::start_in(dir).await;
    let second = d.client().await.status().await.unwrap().store;
    assert_eq!(second.instance_id, first.instance_id);
    assert_eq!(second.starts, first.starts + 1);
    d.shutdown().await;
}

#[tokio::test]
async fn a_second_daemon_on_the_same_state_refuses_and_leaves_the_first_alone() {
    let d = TestDaemon::start().await;
    let settings = bangerd::Settings::new(
        bangerd::config::Config::default(),
        support::paths_in(d.dir.path()),
    );
    let err = bangerd::Daemon::start(settings).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("already running"), "{msg}");
    assert!(
        msg.contains(&std::process::id().to_string()),
        "names the holder: {msg}"
    );
    // The first still serves on its socket.
    d.client().await.ping().await.unwrap();
    d.shutdown().await;
}

#[tokio::test]
async fn binding_a_live_socket_is_refused() {
    let d = TestDaemon::start().await;
    let access = bangerd::auth::Access::new(0, "banger");
    let err = bangerd::server::bind(&d.socket, &access).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    d.client().await.ping().await.unwrap();
    d.shutdown().await;
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = support::paths_in(dir.path()).socket;
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    // A socket nobody listens on, as left by a daemon killed with SIGKILL.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let d = TestDaemon::start_in(dir).await;
    d.client().await.ping().await.unwrap();
    d.shutdown().await;
}

#[tokio::test]
async fn socket_mode_is_0660() {
    use std::os::unix::fs::PermissionsExt;
    let d = TestDaemon::start().await;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    d.shutdown().await;
}

fn call_error(e: ClientError) -> (i32, String) {
    match e {
        ClientError::Call(obj) => (obj.code(), obj.message().to_owned()),
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_requests_get_json_rpc_errors_and_the_daemon_keeps_serving() {
    let d = TestDaemon::start().await;
    let c = d.client().await;

    // Unknown method and wrong params, over WebSocket.
    let e = c
        .request::<serde_json::Value, _>("daemon.nope", rpc_params![])
        .await
        .unwrap_err();
    assert_eq!(call_error(e).0, codes::METHOD_NOT_FOUND);
    let e = c
        .request::<serde_json::Value, _>("daemon.ping", rpc_params![1, "x", [2]])
        .await
        .unwrap_err();
    assert_eq!(call_error(e).0, codes::INVALID_PARAMS);
    c.ping().await.unwrap();

    // Malformed JSON, not JSON-RPC, and a wrong-type params, over plain HTTP.
    let (status, body) = http_post(&d.socket, b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"meth").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], codes::PARSE_ERROR);
    let (_, body) = http_post(&d.socket, b"[1, 2, 3]").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|r| r["error"]["code"] == codes::INVALID_REQUEST),
        "{v}"
    );
    let (_, body) = http_post(
        &d.socket,
        br#"{"jsonrpc":"2.0","id":7,"method":"daemon.status","params":{"verbose":true}}"#,
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], codes::INVALID_PARAMS, "{v}");
    assert_eq!(v["id"], 7);

    // A 20 MB request: refused with an error, over HTTP and over WebSocket.
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"daemon.ping","params":["{}"]}}"#,
        "x".repeat(20 * 1024 * 1024)
    );
    let (status, body) = http_post(&d.socket, big.as_bytes()).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("too big") || body.contains("Oversized"),
        "{body}"
    );
    let big_ws = d.client().await;
    let e = big_ws
        .request::<serde_json::Value, _>("daemon.ping", rpc_params!["x".repeat(20 * 1024 * 1024)])
        .await
        .unwrap_err();
    // The server cannot read the id of a message it refused to read, so its error answer
    // carries `"id": null`; the jsonrpsee client then drops that connection. The error body
    // itself is checked over HTTP above.
    let text = format!("{e:?}");
    assert!(
        text.contains("NotPendingRequest(\"null\")") || text.contains("too big"),
        "{text}"
    );

    // Still serving, on the old connection and on new ones.
    c.ping().await.unwrap();
    d.client().await.ping().await.unwrap();
    drop(c);
    d.shutdown().await;
}

#[tokio::test]
async fn daemon_stop_answers_then_shuts_down_gracefully() {
    let mut d = TestDaemon::start().await;
    let c = d.client().await;
    let ack = c.stop().await.unwrap();
    assert_eq!(ack.pid, std::process::id());
    let task = d.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("daemon stops")
        .unwrap()
        .unwrap();
    assert!(!d.socket.exists(), "socket removed");
    // The lock is released: a new daemon starts on the same state.
    let dir = d.shutdown().await;
    TestDaemon::start_in(dir).await.shutdown().await;
}

#[tokio::test]
async fn a_request_in_flight_when_shutdown_begins_still_gets_its_answer() {
    let d = TestDaemon::start().await;
    let c = d.client().await;
    // Many calls in flight; the stop request arrives in the middle of them.
    let calls: Vec<_> = (0..50).map(|_| c.status()).collect();
    let stop = c.stop();
    let (results, ack) = tokio::join!(futures::future::join_all(calls), stop);
    ack.unwrap();
    for r in results {
        r.unwrap();
    }
    d.shutdown().await;
}
