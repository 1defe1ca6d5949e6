//! The double over its socket, with a hand-written HTTP/1.1 client, so what is tested is
//! what a driver sees on the wire.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::*;

const WAIT: Duration = Duration::from_secs(5);

/// A jail: `root/` holds the files a driver links in; the API socket sits beside it.
struct Jail {
    _dir: TempDir,
    root: PathBuf,
    socket: PathBuf,
    double: FirecrackerDouble,
}

async fn jail() -> Jail {
    jail_with(Options::default()).await
}

async fn jail_with(options: Options) -> Jail {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(
        root.join("vmlinux"),
        crate::kernel_format::fixture::minimal_elf(4096),
    )
    .unwrap();
    for file in ["initrd", "rootfs.ext4", "data.ext4", "fc.log", "fc.metrics"] {
        std::fs::write(root.join(file), b"").unwrap();
    }
    let socket = dir.path().join("api.sock");
    let double = FirecrackerDouble::start_with(&socket, Some(&root), options)
        .await
        .unwrap();
    Jail {
        _dir: dir,
        root,
        socket,
        double,
    }
}

/// One HTTP/1.1 connection to the API socket; requests on it reuse it (keep-alive).
struct Client {
    stream: BufReader<UnixStream>,
}

impl Client {
    async fn connect(socket: &Path) -> Client {
        Client {
            stream: BufReader::new(UnixStream::connect(socket).await.unwrap()),
        }
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Option<Value>) {
        let body = body.map(|b| b.to_string());
        self.send_raw(method, path, body.as_deref()).await
    }

    async fn send_raw(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Option<Value>) {
        let body = body.unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        self.stream.read_line(&mut line).await.unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("bad status line {line:?}"))
            .parse()
            .unwrap();
        let mut length = 0;
        let mut server = String::new();
        loop {
            line.clear();
            self.stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "server" => server = value.trim().to_owned(),
                _ => {}
            }
        }
        assert_eq!(server, "Firecracker API");
        let mut bytes = vec![0; length];
        self.stream.read_exact(&mut bytes).await.unwrap();
        let body = (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).unwrap());
        (status, body)
    }
}

/// One request on its own connection.
async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Option<Value>) {
    Client::connect(socket).await.send(method, path, body).await
}

fn fault(body: &Option<Value>) -> &str {
    body.as_ref()
        .and_then(|b| b["fault_message"].as_str())
        .unwrap_or("")
}

/// The configuration a driver sends before `InstanceStart`, paths relative to the jail.
fn boot_sequence() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "PUT",
            "/logger",
            json!({"log_path": "/fc.log", "level": "Info", "show_level": true}),
        ),
        ("PUT", "/metrics", json!({"metrics_path": "fc.metrics"})),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false}),
        ),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": "/vmlinux", "initrd_path": "/initrd", "boot_args": "console=ttyS0 reboot=k panic=1"}),
        ),
        (
            "PUT",
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true, "is_read_only": false}),
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}),
        ),
        (
            "PUT",
            "/vsock",
            json!({"guest_cid": 3, "uds_path": "/v.sock"}),
        ),
        (
            "PUT",
            "/mmds/config",
            json!({"version": "V2", "network_interfaces": ["eth0"]}),
        ),
        (
            "PUT",
            "/mmds",
            json!({"latest": {"meta-data": {"instance-id": "sandbox"}}}),
        ),
    ]
}

async fn configure(client: &mut Client) {
    for (method, path, body) in boot_sequence() {
        let (status, answer) = client.send(method, path, Some(body)).await;
        assert_eq!(status, 204, "{method} {path}: {answer:?}");
        assert_eq!(answer, None);
    }
}

async fn boot(jail: &Jail) -> Client {
    let mut client = Client::connect(&jail.socket).await;
    configure(&mut client).await;
    let (status, _) = client
        .send(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
        )
        .await;
    assert_eq!(status, 204);
    client
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_full_boot_sequence_answers_204_and_runs() {
    let jail = jail().await;
    let mut client = boot(&jail).await;

    assert_eq!(jail.double.state(), DoubleState::Running);
    assert_eq!(jail.double.violations(), Vec::<String>::new());
    let started = tokio::time::timeout(WAIT, jail.double.instance_started())
        .await
        .unwrap();
    let requests = jail.double.requests();
    assert_eq!(requests.len(), boot_sequence().len() + 1);
    let start = requests.last().unwrap();
    assert_eq!((start.path.as_str(), start.status), ("/actions", 204));
    assert_eq!(start.at, started);
    assert_eq!(requests[3].body, Some(boot_sequence()[3].2.clone()));

    let (status, info) = client.send("GET", "/", None).await;
    assert_eq!(status, 200);
    assert_eq!(info.unwrap()["state"], "Running");
    let (_, machine) = client.send("GET", "/machine-config", None).await;
    assert_eq!(
        machine.unwrap(),
        json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false, "track_dirty_pages": false, "huge_pages": "None"})
    );
    let (_, config) = client.send("GET", "/vm/config", None).await;
    let config = config.unwrap();
    assert_eq!(config["drives"][0]["drive_id"], "rootfs");
    assert_eq!(config["boot-source"]["kernel_image_path"], "/vmlinux");
    assert_eq!(config["network-interfaces"][0]["host_dev_name"], "tap0");

    // The vsock socket appeared under the root; a host-initiated connection is closed.
    let mut vsock = UnixStream::connect(jail.root.join("v.sock")).await.unwrap();
    vsock.write_all(b"CONNECT 52\n").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, vsock.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?}");
    assert_eq!(jail.double.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn keep_alive_and_one_request_per_connection_both_work() {
    let jail = jail().await;
    let mut client = Client::connect(&jail.socket).await;
    for _ in 0..3 {
        let (status, _) = client.send("GET", "/version", None).await;
        assert_eq!(status, 200);
    }
    let (status, version) = client.send("GET", "/version", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        version.unwrap(),
        json!({"firecracker_version": "1.17.0-dev"})
    );
    for _ in 0..3 {
        let (status, info) = call(&jail.socket, "GET", "/", None).await;
        assert_eq!(status, 200);
        assert_eq!(info.unwrap()["state"], "Not started");
    }
    assert_eq!(jail.double.requests().len(), 7);
}

#[tokio::test]
async fn answers_conform_to_the_spec() {
    let jail = jail().await;
    let mut client = boot(&jail).await;
    let spec = Spec::shared();
    for path in ["/", "/machine-config", "/version", "/vm/config", "/mmds"] {
        let (status, body) = client.send("GET", path, None).await;
        assert_eq!(status, 200, "{path}");
        if path != "/mmds" {
            spec.check_response("GET", path, status, &body.unwrap())
                .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        }
    }
    let (status, body) = client
        .send(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": "/vmlinux"})),
        )
        .await;
    assert_eq!(status, 400);
    spec.check_response("PUT", "/boot-source", status, &body.unwrap())
        .unwrap();
}

#[tokio::test]
async fn a_pre_boot_put_after_start_is_refused() {
    let jail = jail().await;
    let mut client = boot(&jail).await;
    let late = [
        (
            "/drives/data",
            json!({"drive_id": "data", "path_on_host": "/data.ext4", "is_root_device": false}),
        ),
        ("/boot-source", json!({"kernel_image_path": "/vmlinux"})),
        (
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128}),
        ),
        ("/logger", json!({"level": "Debug"})),
        ("/vsock", json!({"guest_cid": 4, "uds_path": "/w.sock"})),
        ("/actions", json!({"action_type": "InstanceStart"})),
    ];
    for (path, body) in late.clone() {
        let (status, answer) = client.send("PUT", path, Some(body)).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(
            fault(&answer),
            "The requested operation is not supported after starting the microVM."
        );
    }
    assert_eq!(jail.double.violations().len(), late.len());
    assert!(jail.double.violations()[0].starts_with("PUT /drives/data: "));
    // Post-boot updates are allowed.
    let patch = json!({"drive_id": "rootfs", "path_on_host": "/data.ext4"});
    let (status, _) = client.send("PATCH", "/drives/rootfs", Some(patch)).await;
    assert_eq!(status, 204);
    let patch =
        json!({"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 10, "refill_time": 100}}});
    let (status, _) = client
        .send("PATCH", "/network-interfaces/eth0", Some(patch))
        .await;
    assert_eq!(status, 204);
    assert_eq!(jail.double.violations().len(), late.len());
    assert_eq!(jail.double.state(), DoubleState::Running);
}

#[tokio::test]
async fn instance_start_without_a_boot_source_is_refused() {
    let jail = jail().await;
    let (status, answer) = call(
        &jail.socket,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        fault(&answer).contains("Cannot start microvm without kernel configuration."),
        "{answer:?}"
    );
    assert_eq!(jail.double.violations().len(), 1);
    assert_eq!(jail.double.state(), DoubleState::NotStarted);
    let started = tokio::time::timeout(Duration::from_millis(50), jail.double.instance_started());
    assert!(
        started.await.is_err(),
        "instance_started resolved without a start"
    );
}

/// Firecracker v1.13.1 loads the kernel at InstanceStart with linux-loader's ELF loader:
/// Debian's vmlinuz (a bzImage) gets this 400, word for word, and the VM does not start.
/// The ELF banger converts it to is accepted.
#[tokio::test]
async fn instance_start_refuses_a_kernel_that_is_not_an_elf_as_firecracker_does() {
    use crate::kernel_format::fixture::{bzimage, lz4_legacy, minimal_elf};
    let elf = minimal_elf(64 << 10);
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "bzImage",
            bzimage(&lz4_legacy(&elf)),
            "Invalid Elf magic number",
        ),
        ("short", b"\x7fELF".to_vec(), "Unable to read elf header"),
        (
            "big-endian",
            {
                let mut e = elf.clone();
                e[5] = 2;
                e
            },
            "Trying to load big-endian binary on little-endian machine",
        ),
        (
            "low entry",
            {
                let mut e = elf.clone();
                e[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
                e
            },
            "Invalid entry address",
        ),
    ];
    for (what, bytes, cause) in cases {
        let jail = jail().await;
        std::fs::write(jail.root.join("vmlinux"), &bytes).unwrap();
        let mut client = Client::connect(&jail.socket).await;
        configure(&mut client).await;
        let (status, answer) = client
            .send(
                "PUT",
                "/actions",
                Some(json!({"action_type": "InstanceStart"})),
            )
            .await;
        assert_eq!(status, 400, "{what}");
        assert_eq!(
            fault(&answer),
            format!(
                "Start microvm error: System configuration error: Cannot load kernel due to invalid memory configuration or invalid kernel image: Kernel Loader: failed to load ELF kernel image: Kernel Loader: {cause}"
            ),
            "{what}"
        );
        Spec::shared()
            .check_response("PUT", "/actions", status, answer.as_ref().unwrap())
            .unwrap();
        assert_eq!(jail.double.state(), DoubleState::NotStarted, "{what}");
        assert_eq!(jail.double.violations().len(), 1, "{what}");
    }
    // The same kernel converted: accepted.
    let jail = jail().await;
    let converted = crate::kernel_format::vmlinux_of(&bzimage(&lz4_legacy(&elf))).unwrap();
    std::fs::write(jail.root.join("vmlinux"), converted.1).unwrap();
    boot(&jail).await;
    assert_eq!(jail.double.state(), DoubleState::Running);
    assert_eq!(jail.double.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn post_boot_actions_before_start_are_refused() {
    let jail = jail().await;
    let pre = "The requested operation is not supported before starting the microVM.";
    let ctrl_alt_del = json!({"action_type": "SendCtrlAltDel"});
    let (status, answer) = call(&jail.socket, "PUT", "/actions", Some(ctrl_alt_del)).await;
    assert_eq!((status, fault(&answer)), (400, pre));
    let (status, answer) = call(
        &jail.socket,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
    )
    .await;
    assert_eq!((status, fault(&answer)), (400, pre));
    assert_eq!(jail.double.violations().len(), 2);
    assert_eq!(jail.double.state(), DoubleState::NotStarted);
}

#[tokio::test]
async fn a_path_and_body_id_mismatch_is_refused() {
    let jail = jail().await;
    let mut client = Client::connect(&jail.socket).await;
    let body = json!({"iface_id": "eth1", "host_dev_name": "tap0"});
    let (status, answer) = client
        .send("PUT", "/network-interfaces/eth0", Some(body))
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        fault(&answer),
        "The id from the path [eth0] does not match the id from the body [eth1]!"
    );
    let body = json!({"drive_id": "other", "path_on_host": "/rootfs.ext4", "is_root_device": true});
    let (status, answer) = client.send("PUT", "/drives/rootfs", Some(body)).await;
    assert_eq!(status, 400);
    assert_eq!(
        fault(&answer),
        "The id from the path does not match the id from the body!"
    );
    let body =
        json!({"drive_id": "root-fs", "path_on_host": "/rootfs.ext4", "is_root_device": true});
    let (status, _) = client.send("PUT", "/drives/root-fs", Some(body)).await;
    assert_eq!(status, 400);
    assert_eq!(jail.double.violations().len(), 3);
}

#[tokio::test]
async fn missing_files_are_refused_and_paths_resolve_under_the_root() {
    let jail = jail().await;
    let mut client = Client::connect(&jail.socket).await;
    let (status, answer) = client
        .send(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": "/no-such-vmlinux"})),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        fault(&answer).contains("The kernel file cannot be opened: No such file or directory"),
        "{answer:?}"
    );
    // The host path of a file that exists is not a path in the jail.
    let host = jail.root.join("vmlinux").display().to_string();
    let (status, _) = client
        .send(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": host})),
        )
        .await;
    assert_eq!(status, 400);
    let missing = [
        (
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": "/nope.ext4", "is_root_device": true}),
        ),
        ("/logger", json!({"log_path": "/nope.log"})),
        ("/metrics", json!({"metrics_path": "/nope.metrics"})),
        (
            "/boot-source",
            json!({"kernel_image_path": "/vmlinux", "initrd_path": "/nope"}),
        ),
    ];
    for (path, body) in missing.clone() {
        let (status, answer) = client.send("PUT", path, Some(body)).await;
        assert_eq!(status, 400, "{path}: {answer:?}");
    }
    assert_eq!(jail.double.violations().len(), 2 + missing.len());
    let (status, _) = client
        .send(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": "vmlinux"})),
        )
        .await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn requests_breaking_the_spec_are_refused_with_firecrackers_messages() {
    let jail = jail().await;
    let mut client = Client::connect(&jail.socket).await;
    let (status, answer) = client.send("GET", "/nope/deeper", None).await;
    assert_eq!(
        (status, fault(&answer)),
        (400, "Invalid request method and/or path: GET nope.")
    );
    let (status, answer) = client
        .send(
            "POST",
            "/boot-source",
            Some(json!({"kernel_image_path": "/vmlinux"})),
        )
        .await;
    assert_eq!(
        (status, fault(&answer)),
        (400, "Invalid request method and/or path: POST boot-source.")
    );
    let (status, answer) = client
        .send_raw("PUT", "/boot-source", Some("{\"kernel_image_path\":"))
        .await;
    assert_eq!(status, 400);
    assert!(
        fault(&answer)
            .starts_with("An error occurred when deserializing the json body of a request: "),
        "{answer:?}"
    );
    let body = json!({"kernel_image_path": "/vmlinux", "kernel_args": "x"});
    let (status, answer) = client.send("PUT", "/boot-source", Some(body)).await;
    assert_eq!(status, 400);
    assert!(
        fault(&answer).contains("unknown field `kernel_args`"),
        "{answer:?}"
    );
    let (status, answer) = client
        .send("PUT", "/actions", Some(json!({"action_type": "Reboot"})))
        .await;
    assert_eq!(status, 400);
    assert!(fault(&answer).contains("`Reboot`"), "{answer:?}");
    let (status, answer) = client.send_raw("PUT", "/machine-config", None).await;
    assert_eq!((status, fault(&answer)), (400, "Empty PUT request."));
    let (status, answer) = client.send_raw("GET", "/", Some("{}")).await;
    assert_eq!(
        (status, fault(&answer)),
        (400, "GET request cannot have a body.")
    );
    let (status, answer) = client.send("PUT", "/drives", Some(json!({}))).await;
    assert_eq!((status, fault(&answer)), (400, "The ID cannot be empty."));

    let violations = jail.double.violations();
    assert_eq!(violations.len(), 8, "{violations:#?}");
    assert!(
        violations[0].starts_with("GET /nope/deeper: Invalid request"),
        "{violations:?}"
    );
    let recorded = jail.double.requests();
    assert_eq!(recorded[2].body, Some(json!("{\"kernel_image_path\":")));
    assert!(recorded.iter().all(|r| r.status == 400));
    // The connection survived all of it.
    let (status, _) = client.send("GET", "/", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn metrics_initialise_once_and_the_logger_may_be_reconfigured() {
    let jail = jail().await;
    let mut client = Client::connect(&jail.socket).await;
    let metrics = json!({"metrics_path": "/fc.metrics"});
    let (status, _) = client.send("PUT", "/metrics", Some(metrics.clone())).await;
    assert_eq!(status, 204);
    let (status, answer) = client.send("PUT", "/metrics", Some(metrics)).await;
    assert_eq!(status, 400);
    assert!(
        fault(&answer).contains("Reinitialization of metrics not allowed."),
        "{answer:?}"
    );
    // Firecracker's `Logger::update` runs any number of times before boot.
    for level in ["Info", "Debug"] {
        let logger = json!({"log_path": "/fc.log", "level": level});
        let (status, _) = client.send("PUT", "/logger", Some(logger)).await;
        assert_eq!(status, 204);
    }
    assert_eq!(jail.double.violations().len(), 1);
}

#[tokio::test]
async fn fail_next_injects_the_status_and_message_once() {
    let jail = jail().await;
    jail.double.fail_next("/drives", 500, "disk on fire");
    let mut client = Client::connect(&jail.socket).await;
    let (status, _) = client
        .send(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": "/vmlinux"})),
        )
        .await;
    assert_eq!(status, 204);
    let drive =
        json!({"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true});
    let (status, answer) = client
        .send("PUT", "/drives/rootfs", Some(drive.clone()))
        .await;
    assert_eq!(status, 500);
    assert_eq!(answer, Some(json!({"fault_message": "disk on fire"})));
    let (status, answer) = client.send("PUT", "/drives/rootfs", Some(drive)).await;
    assert_eq!((status, answer), (204, None));
    assert_eq!(jail.double.violations(), Vec::<String>::new());
    let statuses: Vec<u16> = jail.double.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [204, 500, 204]);
}

#[tokio::test]
async fn get_root_reflects_the_state() {
    let jail = jail().await;
    let state = |answer: Option<Value>| answer.unwrap()["state"].as_str().unwrap().to_owned();
    let mut client = Client::connect(&jail.socket).await;
    let (_, info) = client.send("GET", "/", None).await;
    let info = info.unwrap();
    assert_eq!(
        info,
        json!({"app_name": "Firecracker", "id": "anonymous-instance", "state": "Not started", "vmm_version": "1.17.0-dev"})
    );
    configure(&mut client).await;
    client
        .send(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
        )
        .await;
    assert_eq!(state(client.send("GET", "/", None).await.1), "Running");
    let (status, _) = client
        .send("PATCH", "/vm", Some(json!({"state": "Paused"})))
        .await;
    assert_eq!(status, 204);
    assert_eq!(state(client.send("GET", "/", None).await.1), "Paused");
    assert_eq!(jail.double.state(), DoubleState::Paused);
    client
        .send("PATCH", "/vm", Some(json!({"state": "Resumed"})))
        .await;
    assert_eq!(state(client.send("GET", "/", None).await.1), "Running");
    assert_eq!(jail.double.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn ctrl_alt_del_exits_and_removes_the_socket() {
    let jail = jail().await;
    let mut client = boot(&jail).await;
    let (status, _) = client
        .send(
            "PUT",
            "/actions",
            Some(json!({"action_type": "SendCtrlAltDel"})),
        )
        .await;
    assert_eq!(status, 204);
    wait_until("the double exits", || {
        jail.double.state() == DoubleState::Exited
    })
    .await;
    assert!(!jail.socket.exists(), "the api socket is still there");
    assert!(UnixStream::connect(&jail.socket).await.is_err());
    // The open connection went with the process.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, client.stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert_eq!(jail.double.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn shutdown_stops_serving_and_removes_the_socket() {
    let Jail {
        _dir,
        socket,
        double,
        ..
    } = jail().await;
    assert!(socket.exists());
    double.shutdown().await;
    assert!(!socket.exists());
    assert!(UnixStream::connect(&socket).await.is_err());
    // Firecracker will not start on a socket path that exists; neither does the double.
    std::fs::write(&socket, b"").unwrap();
    assert!(FirecrackerDouble::start(&socket, None).await.is_err());
}

/// `CONNECT <port>` on the vsock socket: the answer line, or `None` if it was closed.
async fn vsock_connect(socket: &Path, port: u32) -> Option<String> {
    let mut stream = BufReader::new(UnixStream::connect(socket).await.unwrap());
    stream
        .get_mut()
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    let n = tokio::time::timeout(WAIT, stream.read_line(&mut line))
        .await
        .expect("the vsock socket answers or closes")
        .unwrap_or(0);
    (n > 0).then_some(line)
}

fn with_agent() -> Options {
    Options {
        guest_agent: true,
        ..Options::default()
    }
}

#[tokio::test]
async fn vsock_answers_ok_where_the_guest_listens_and_closes_elsewhere() {
    use banger_guest::proto::{AGENT_PORT, Request, Response};
    let jail = jail_with(with_agent()).await;
    let mut client = Client::connect(&jail.socket).await;
    configure(&mut client).await;
    let vsock = jail.root.join("v.sock");
    // Before boot nothing in the guest listens.
    assert_eq!(vsock_connect(&vsock, AGENT_PORT).await, None);
    let (status, _) = client
        .send(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
        )
        .await;
    assert_eq!(status, 204);
    // Firecracker's muxer numbers host-side ports from 2^30.
    assert_eq!(
        vsock_connect(&vsock, AGENT_PORT).await.as_deref(),
        Some("OK 1073741824\n")
    );
    assert_eq!(
        vsock_connect(&vsock, AGENT_PORT).await.as_deref(),
        Some("OK 1073741825\n")
    );
    assert_eq!(
        vsock_connect(&vsock, 52).await,
        None,
        "nothing listens on 52"
    );
    let health = banger_guest::host::call(&vsock, &Request::Health, WAIT)
        .await
        .unwrap();
    assert!(matches!(health, Response::Health { .. }), "{health:?}");
    // Without an agent, nothing listens at all.
    let bare = jail_with(Options::default()).await;
    let _client = boot(&bare).await;
    assert_eq!(
        vsock_connect(&bare.root.join("v.sock"), AGENT_PORT).await,
        None
    );
    assert_eq!(jail.double.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_paused_guest_answers_nothing_until_it_is_resumed() {
    use banger_guest::host;
    use banger_guest::proto::{AGENT_PORT, Kind, Request, Response};
    let jail = jail_with(with_agent()).await;
    let mut client = boot(&jail).await;
    let vsock = jail.root.join("v.sock");
    // A session opened while the guest runs, then the guest paused.
    let mut open = host::connect(&vsock).await.unwrap();
    let (status, _) = client
        .send("PATCH", "/vm", Some(json!({"state": "Paused"})))
        .await;
    assert_eq!(status, 204);
    // Its next request is not answered while paused...
    let (tx, mut answered) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        host::write_json(&mut open.stream, Kind::Request, &Request::Health)
            .await
            .unwrap();
        let _ = tx.send(host::read_frame(&mut open.stream).await.unwrap());
    });
    // ...and a new connection is dropped by the muxer without an OK (after its 2 s).
    assert_eq!(vsock_connect(&vsock, AGENT_PORT).await, None);
    assert!(answered.try_recv().is_err(), "a paused guest answered");
    client
        .send("PATCH", "/vm", Some(json!({"state": "Resumed"})))
        .await;
    // Resumed: the waiting request is answered, new connections are served.
    let frame = tokio::time::timeout(WAIT, answered).await.unwrap().unwrap();
    assert_eq!(frame.kind, Kind::Response);
    let health = host::call(&vsock, &Request::Health, WAIT).await.unwrap();
    assert!(matches!(health, Response::Health { .. }), "{health:?}");
    assert_eq!(jail.double.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_guest_poweroff_leaves_the_process_alive_and_a_reboot_ends_it() {
    use banger_guest::proto::{AGENT_PORT, Request, Response};
    let jail = jail_with(with_agent()).await;
    let mut client = boot(&jail).await;
    let vsock = jail.root.join("v.sock");
    let answer = banger_guest::host::call(&vsock, &Request::Shutdown { reboot: false }, WAIT)
        .await
        .unwrap();
    assert_eq!(answer, Response::ShuttingDown);
    assert_eq!(jail.double.guest_power(), GuestPower::Halted);
    // Firecracker "lives on": its API answers, the guest is gone from vsock, and
    // Ctrl+Alt+Del reaches no one.
    let (status, info) = client.send("GET", "/", None).await;
    assert_eq!(status, 200);
    assert_eq!(info.unwrap()["state"], "Running");
    assert_eq!(vsock_connect(&vsock, AGENT_PORT).await, None);
    let (status, _) = client
        .send(
            "PUT",
            "/actions",
            Some(json!({"action_type": "SendCtrlAltDel"})),
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(jail.double.guest_power(), GuestPower::Halted);
    assert_ne!(jail.double.state(), DoubleState::Exited);
    assert!(jail.socket.exists());

    // A reboot asked of the agent ends the process.
    let jail = jail_with(with_agent()).await;
    let _client = boot(&jail).await;
    let vsock = jail.root.join("v.sock");
    let answer = banger_guest::host::call(&vsock, &Request::Shutdown { reboot: true }, WAIT)
        .await
        .unwrap();
    assert_eq!(answer, Response::ShuttingDown);
    wait_until("the double exits", || {
        jail.double.state() == DoubleState::Exited
    })
    .await;
    assert!(!jail.socket.exists(), "the api socket is still there");

    // So does a power-off typed in the guest not.
    let jail = jail_with(with_agent()).await;
    let _client = boot(&jail).await;
    jail.double.guest_poweroff();
    assert_eq!(jail.double.guest_power(), GuestPower::Halted);
    assert_eq!(jail.double.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn the_oldest_release_refuses_a_field_added_since() {
    let balloon = json!({"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true});
    let oldest = jail_with(Options {
        release: Release::Oldest,
        ..Options::default()
    })
    .await;
    let (status, version) = call(&oldest.socket, "GET", "/version", None).await;
    assert_eq!(status, 200);
    assert_eq!(version.unwrap()["firecracker_version"], OLDEST_SUPPORTED);
    let (status, body) = call(&oldest.socket, "PUT", "/balloon", Some(balloon.clone())).await;
    assert_eq!(status, 400);
    assert!(fault(&body).contains("free_page_hinting"), "{body:?}");
    assert_eq!(oldest.double.violations().len(), 1);
    let newest = jail().await;
    let (status, body) = call(&newest.socket, "PUT", "/balloon", Some(balloon)).await;
    assert_eq!(status, 204, "{body:?}");
}

#[tokio::test]
async fn drives_advertise_flush_only_with_writeback() {
    let jail = jail().await;
    for (id, cache) in [
        ("rootfs", None),
        ("data", Some("Writeback")),
        ("fast", Some("Unsafe")),
    ] {
        let file = if id == "rootfs" {
            "/rootfs.ext4"
        } else {
            "/data.ext4"
        };
        let mut drive = json!({"drive_id": id, "path_on_host": file, "is_root_device": id == "rootfs", "is_read_only": false});
        if let Some(cache) = cache {
            drive["cache_type"] = json!(cache);
        }
        let (status, body) = call(&jail.socket, "PUT", &format!("/drives/{id}"), Some(drive)).await;
        assert_eq!(status, 204, "{body:?}");
    }
    assert_eq!(
        jail.double.flush_advertised("rootfs"),
        Some(false),
        "Unsafe is the default"
    );
    assert_eq!(jail.double.flush_advertised("data"), Some(true));
    assert_eq!(jail.double.flush_advertised("fast"), Some(false));
    assert_eq!(jail.double.flush_advertised("none"), None);
    let (status, body) = call(
        &jail.socket,
        "PUT",
        "/drives/bad",
        Some(json!({"drive_id": "bad", "path_on_host": "/data.ext4", "is_root_device": false, "is_read_only": false, "cache_type": "Writethrough"})),
    )
    .await;
    assert_eq!(status, 400, "{body:?}");
}

/// Snapshots as Firecracker takes them: `PUT /snapshot/create` only of a paused VM, into
/// files opened as `File::create` does (an existing file keeps its inode); the memory file
/// is the guest's size. `PUT /snapshot/load` only on a fresh process: a later one refuses
/// after boot resources, a state file the double did not write, or a memory file smaller
/// than the guest; a good one brings the devices back (the vsock socket answers again)
/// and the same guest (its boot id), without a boot.
#[tokio::test]
async fn snapshots_are_created_paused_and_load_only_fresh_and_whole() {
    let first = jail().await;
    let mut client = boot(&first).await;
    let body =
        json!({"snapshot_type": "Full", "snapshot_path": "vm.snap", "mem_file_path": "vm.mem"});
    let (status, answer) = client
        .send("PUT", "/snapshot/create", Some(body.clone()))
        .await;
    assert_eq!(status, 400, "running: {answer:?}");
    assert!(fault(&answer).contains("not paused"), "{answer:?}");
    std::fs::write(first.root.join("vm.mem"), b"old").unwrap();
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&first.root.join("vm.mem"));
    let (status, _) = client
        .send("PATCH", "/vm", Some(json!({"state": "Paused"})))
        .await;
    assert_eq!(status, 204);
    let (status, answer) = client.send("PUT", "/snapshot/create", Some(body)).await;
    assert_eq!(status, 204, "{answer:?}");
    assert_eq!(
        inode(&first.root.join("vm.mem")),
        before,
        "the same file, refilled"
    );
    assert_eq!(
        std::fs::metadata(first.root.join("vm.mem")).unwrap().len(),
        512 << 20
    );
    let (boot_id, restored) = first.double.boot();
    assert!(boot_id.is_some() && !restored);

    // Into fresh processes, the files copied into their roots.
    let fresh = || async {
        let j = jail().await;
        for f in ["vm.snap", "vm.mem"] {
            std::fs::copy(first.root.join(f), j.root.join(f)).unwrap();
        }
        j
    };
    let load = json!({"snapshot_path": "vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "vm.mem"}, "resume_vm": true});
    // After a boot resource.
    let j = fresh().await;
    let mut c = Client::connect(&j.socket).await;
    let (status, _) = c
        .send(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 128})),
        )
        .await;
    assert_eq!(status, 204);
    let (status, answer) = c.send("PUT", "/snapshot/load", Some(load.clone())).await;
    assert_eq!(status, 400);
    assert!(
        fault(&answer).contains("not allowed after configuring boot-specific resources"),
        "{answer:?}"
    );
    // Not a snapshot.
    let j = fresh().await;
    std::fs::write(j.root.join("vm.snap"), b"garbage").unwrap();
    let (status, answer) = call(&j.socket, "PUT", "/snapshot/load", Some(load.clone())).await;
    assert_eq!(status, 400);
    assert!(
        fault(&answer).contains("vm.snap is not a snapshot"),
        "{answer:?}"
    );
    // A memory file cut short.
    let j = fresh().await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(j.root.join("vm.mem"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (status, answer) = call(&j.socket, "PUT", "/snapshot/load", Some(load.clone())).await;
    assert_eq!(status, 400);
    assert!(fault(&answer).contains("holds 1048576 bytes"), "{answer:?}");
    // A whole one: running, the same guest, its vsock socket bound again.
    let j = fresh().await;
    let (status, answer) = call(&j.socket, "PUT", "/snapshot/load", Some(load)).await;
    assert_eq!(status, 204, "{answer:?}");
    assert_eq!(j.double.state(), DoubleState::Running);
    assert_eq!(j.double.boot(), (boot_id, true));
    assert!(
        j.root.join("v.sock").exists(),
        "the vsock socket is bound again"
    );
    let (status, answer) = call(
        &j.socket,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    )
    .await;
    assert_eq!(status, 400, "a restored VM is started: {answer:?}");
}
