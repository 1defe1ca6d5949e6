//! The double's state machine: what Firecracker's API thread does with each request, minus
//! the VM. No I/O except the host files Firecracker itself opens (kernel, drives, log and
//! metrics files, the vsock socket), each resolved under the jail's root.
//!
//! Rules and messages follow Firecracker's `api_server/parsed_request.rs`,
//! `api_server/request/*.rs` and `vmm/src/rpc_interface.rs` (which actions the
//! `PrebootApiController` and the `RuntimeApiController` accept), so a driver that passes
//! here sends what the real one accepts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value, json};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use super::guest::{self, Guest};
use super::spec::{RouteError, Spec};
use super::{DoubleState, Recorded};

const APP_NAME: &str = "Firecracker";
/// The key that marks a state file the double wrote (`PUT /snapshot/create`).
const SNAPSHOT_MAGIC: &str = "banger_fc_double_snapshot";
/// Firecracker's id when the jailer gives none (`--id`).
const INSTANCE_ID: &str = "anonymous-instance";

const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";

/// When an operation is accepted, from `rpc_interface.rs`: the preboot controller refuses
/// the runtime-only actions and the runtime controller the preboot-only ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Any,
    PreBoot,
    PostBoot,
}

/// The phase of every operation of the spec. `None` for an operation the double does not
/// know, which a test forbids. Where the spec's summary says "Pre-boot only" or "Post-boot
/// only" this table agrees (tested); where the spec is silent or looser, the table follows
/// Firecracker's code: logger, metrics, serial, balloon, memory hotplug and `InstanceStart`
/// are preboot-only, and the balloon updates and statistics are runtime-only although the
/// spec says "before or after machine startup".
pub(crate) fn phase(method: &str, template: &str, body: Option<&Value>) -> Option<Phase> {
    use Phase::*;
    let method = method.to_ascii_uppercase();
    Some(match (method.as_str(), template) {
        ("GET", "/" | "/version" | "/machine-config" | "/vm/config" | "/mmds" | "/balloon") => Any,
        ("PUT" | "PATCH", "/mmds") => Any,
        ("PUT", "/actions") => match body.and_then(|b| b["action_type"].as_str()) {
            Some("InstanceStart") => PreBoot,
            Some(_) => PostBoot,
            None => Any,
        },
        (
            "PUT",
            "/boot-source"
            | "/machine-config"
            | "/drives/{drive_id}"
            | "/pmem/{id}"
            | "/network-interfaces/{iface_id}"
            | "/vsock"
            | "/logger"
            | "/metrics"
            | "/mmds/config"
            | "/cpu-config"
            | "/entropy"
            | "/serial"
            | "/balloon"
            | "/hotplug/memory"
            | "/snapshot/load",
        ) => PreBoot,
        ("PATCH", "/machine-config") => PreBoot,
        (
            "PATCH",
            "/drives/{drive_id}"
            | "/pmem/{id}"
            | "/network-interfaces/{iface_id}"
            | "/vm"
            | "/balloon"
            | "/balloon/statistics"
            | "/balloon/hinting/start"
            | "/balloon/hinting/stop"
            | "/hotplug/memory",
        ) => PostBoot,
        ("GET", "/balloon/statistics" | "/balloon/hinting/status" | "/hotplug/memory") => PostBoot,
        ("PUT", "/snapshot/create") => PostBoot,
        _ => return None,
    })
}

/// What the server must do after answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    None,
    /// `InstanceStart` was accepted; it arrived at this instant.
    Started(Instant),
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Option<Value>,
    pub(crate) effect: Effect,
}

impl Answer {
    fn empty() -> Answer {
        Answer {
            status: 204,
            body: None,
            effect: Effect::None,
        }
    }

    fn json(body: Value) -> Answer {
        Answer {
            status: 200,
            body: Some(body),
            effect: Effect::None,
        }
    }

    fn fault(status: u16, message: &str) -> Answer {
        Answer {
            status,
            body: Some(json!({ "fault_message": message })),
            effect: Effect::None,
        }
    }
}

#[derive(Debug)]
struct Fault {
    path_prefix: String,
    status: u16,
    message: String,
}

/// The resources configured so far, as the bodies that configured them.
#[derive(Debug)]
struct Resources {
    boot_source: Option<Value>,
    machine: Map<String, Value>,
    drives: Vec<Value>,
    net: Vec<Value>,
    pmem: Vec<Value>,
    vsock: Option<Value>,
    balloon: Option<Value>,
    logger: Option<Value>,
    metrics: Option<Value>,
    mmds_config: Option<Value>,
    mmds: Option<Value>,
    cpu_config: Option<Value>,
    entropy: Option<Value>,
    serial: Option<Value>,
    memory_hotplug: Option<Value>,
    /// A boot-specific resource was configured, so loading a snapshot is refused
    /// (`PrebootApiController::boot_path`).
    boot_path: bool,
}

impl Default for Resources {
    fn default() -> Resources {
        Resources {
            boot_source: None,
            machine: default_machine(),
            drives: Vec::new(),
            net: Vec::new(),
            pmem: Vec::new(),
            vsock: None,
            balloon: None,
            logger: None,
            metrics: None,
            mmds_config: None,
            mmds: None,
            cpu_config: None,
            entropy: None,
            serial: None,
            memory_hotplug: None,
            boot_path: false,
        }
    }
}

/// `MachineConfig::default()`: 1 vCPU, 128 MiB, no SMT, no dirty page tracking, no huge
/// pages, no CPU template (left out, as Firecracker's `skip_serializing_if` does).
fn default_machine() -> Map<String, Value> {
    let Value::Object(map) = json!({
        "vcpu_count": 1,
        "mem_size_mib": 128,
        "smt": false,
        "track_dirty_pages": false,
        "huge_pages": "None",
    }) else {
        unreachable!("a json object literal")
    };
    map
}

/// The vsock device's host socket, listening like Firecracker's `VsockUnixBackend`.
#[derive(Debug)]
struct VsockSocket {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for VsockSocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Everything the double knows, behind the server's mutex.
#[derive(Debug)]
pub(crate) struct Vmm {
    spec: &'static Spec,
    root: Option<PathBuf>,
    pub(crate) state: DoubleState,
    pub(crate) requests: Vec<Recorded>,
    pub(crate) violations: Vec<String>,
    faults: Vec<Fault>,
    resources: Resources,
    vsock: Option<VsockSocket>,
    /// Taps opened at `PUT /network-interfaces` by a jailed double, held as Firecracker
    /// holds them, by interface id.
    taps: std::collections::HashMap<String, std::fs::File>,
    guest: Arc<Guest>,
    /// Ctrl+Alt+Del reached a paused guest: it reboots once resumed.
    reboot_on_resume: bool,
    /// Made at `InstanceStart`, kept in a snapshot: the same guest after a restore.
    boot_id: Option<String>,
    /// The guest came from `PUT /snapshot/load`.
    restored: bool,
}

impl Vmm {
    pub(crate) fn new(root: Option<&Path>, spec: &'static Spec, guest: Arc<Guest>) -> Vmm {
        Vmm {
            spec,
            root: root.map(Path::to_owned),
            state: DoubleState::NotStarted,
            requests: Vec::new(),
            violations: Vec::new(),
            faults: Vec::new(),
            resources: Resources::default(),
            vsock: None,
            taps: std::collections::HashMap::new(),
            guest,
            reboot_on_resume: false,
            boot_id: None,
            restored: false,
        }
    }

    /// Whether the drive advertises VirtIO flush to the guest, so that a guest fsync
    /// reaches the host's disk: only with `cache_type: Writeback`; the default, `Unsafe`,
    /// does not (`docs/api_requests/block-caching.md`). `None` for an unknown drive.
    pub(crate) fn flush_advertised(&self, drive_id: &str) -> Option<bool> {
        self.resources
            .drives
            .iter()
            .find(|d| d["drive_id"] == drive_id)
            .map(|d| d["cache_type"] == "Writeback")
    }

    pub(crate) fn version(&self) -> &str {
        self.spec.version()
    }

    pub(crate) fn fail_next(&mut self, path_prefix: &str, status: u16, message: &str) {
        self.faults.push(Fault {
            path_prefix: path_prefix.to_owned(),
            status,
            message: message.to_owned(),
        });
    }

    /// The process is gone: nothing listens on the vsock socket any more. Its file stays,
    /// as a killed Firecracker leaves it.
    pub(crate) fn exit(&mut self) {
        self.state = DoubleState::Exited;
        self.vsock = None;
    }

    /// Answer one request and record it; a request the double refuses on its own is also a
    /// violation (an injected fault is not).
    pub(crate) fn handle(&mut self, method: &str, path: &str, raw: &[u8], at: Instant) -> Answer {
        let injected = self
            .faults
            .iter()
            .position(|f| path.starts_with(&f.path_prefix))
            .map(|i| self.faults.remove(i));
        let answer = match injected {
            Some(fault) => Answer::fault(fault.status, &fault.message),
            None => self
                .dispatch(method, path, raw, at)
                .unwrap_or_else(|message| {
                    self.violations.push(format!("{method} {path}: {message}"));
                    Answer::fault(400, &message)
                }),
        };
        // The guest runs exactly while the VMM is not paused (PATCH /vm, a snapshot load).
        self.guest.set_paused(self.state == DoubleState::Paused);
        tracing::debug!(
            method,
            path,
            status = answer.status,
            "firecracker double answered"
        );
        self.requests.push(Recorded {
            method: method.to_owned(),
            path: path.to_owned(),
            body: recorded_body(raw),
            status: answer.status,
            at,
        });
        answer
    }

    /// Parse, validate and carry out one request, in Firecracker's order: route, body
    /// presence, ids, JSON and schema, then the phase, then the action itself.
    fn dispatch(
        &mut self,
        method: &str,
        uri: &str,
        raw: &[u8],
        at: Instant,
    ) -> Result<Answer, String> {
        let method = method.to_ascii_uppercase();
        let path = uri.split('?').next().unwrap_or_default();
        let route = self.spec.route(&method, path).map_err(|e| match e {
            RouteError::MissingId => "The ID cannot be empty.".to_owned(),
            RouteError::Unknown => {
                // Firecracker names only the first segment of the path.
                let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
                format!("Invalid request method and/or path: {method} {first}.")
            }
        })?;
        match method.as_str() {
            "GET" if !raw.is_empty() => return Err("GET request cannot have a body.".into()),
            "PUT" if raw.is_empty() => return Err("Empty PUT request.".into()),
            // Firecracker takes a PATCH without a body only on /balloon/...
            "PATCH"
                if raw.is_empty()
                    && route.operation.body.is_some()
                    && !route.template.starts_with("/balloon") =>
            {
                return Err("Empty PATCH request.".into());
            }
            _ => {}
        }
        if let Some(id) = &route.id {
            checked_id(id)?;
        }
        let body: Option<Value> = if raw.is_empty() {
            None
        } else {
            Some(serde_json::from_slice(raw).map_err(|e| deserialize_error(&e.to_string()))?)
        };
        self.spec
            .check_body(&method, &route, body.as_ref())
            .map_err(|detail| deserialize_error(&detail))?;
        if let (Some(id), Some(body)) = (&route.id, &body) {
            check_id_match(route.template, id, body)?;
        }
        let phase = phase(&method, route.template, body.as_ref())
            .ok_or_else(|| format!("the double does not implement {method} {}", route.template))?;
        let booted = self.state != DoubleState::NotStarted;
        match phase {
            Phase::PreBoot if booted => return Err(POST_BOOT.into()),
            Phase::PostBoot if !booted => return Err(PRE_BOOT.into()),
            _ => {}
        }
        let body = body.unwrap_or(Value::Null);
        self.act(&method, route.template, route.id.as_deref(), body, at)
    }

    fn act(
        &mut self,
        method: &str,
        template: &str,
        id: Option<&str>,
        body: Value,
        at: Instant,
    ) -> Result<Answer, String> {
        let r = &mut self.resources;
        match (method, template) {
            ("GET", "/") => Ok(Answer::json(self.instance_info())),
            ("GET", "/version") => Ok(Answer::json(
                json!({ "firecracker_version": self.spec.version() }),
            )),
            ("GET", "/machine-config") => Ok(Answer::json(Value::Object(r.machine.clone()))),
            ("GET", "/vm/config") => Ok(Answer::json(self.full_config())),
            ("GET", "/mmds") => Ok(Answer::json(r.mmds.clone().unwrap_or_else(|| json!({})))),
            ("GET", "/balloon") => r
                .balloon
                .clone()
                .map(Answer::json)
                .ok_or_else(|| "Balloon config error: No balloon device found.".to_owned()),
            ("GET", "/balloon/statistics") => {
                let enabled = r
                    .balloon
                    .as_ref()
                    .is_some_and(|b| b["stats_polling_interval_s"].as_u64().unwrap_or(0) > 0);
                if !enabled {
                    return Err(
                        "Balloon update error: Statistics for the balloon device are not enabled."
                            .into(),
                    );
                }
                Ok(Answer::json(
                    json!({"target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0}),
                ))
            }
            ("GET", "/balloon/hinting/status") => {
                if !r
                    .balloon
                    .as_ref()
                    .is_some_and(|b| b["free_page_hinting"] == true)
                {
                    return Err("Balloon update error: Free page hinting is not enabled.".into());
                }
                Ok(Answer::json(json!({ "host_cmd": 0 })))
            }
            ("GET", "/hotplug/memory") => {
                let config = r.memory_hotplug.as_ref().ok_or_else(|| {
                    "Memory hotplug update error: The memory hotplug device is not configured."
                        .to_owned()
                })?;
                Ok(Answer::json(json!({
                    "total_size_mib": config["total_size_mib"].as_u64().unwrap_or(0),
                    "slot_size_mib": config["slot_size_mib"].as_u64().unwrap_or(128),
                    "block_size_mib": config["block_size_mib"].as_u64().unwrap_or(2),
                    "plugged_size_mib": 0,
                    "requested_size_mib": 0,
                })))
            }
            ("PUT", "/actions") => self.action(body["action_type"].as_str().unwrap_or(""), at),
            ("PUT", "/boot-source") => {
                let kernel = body["kernel_image_path"].as_str().unwrap_or_default();
                self.existing(kernel).map_err(|e| {
                    format!("Boot source error: The kernel file cannot be opened: {e}")
                })?;
                if let Some(initrd) = body["initrd_path"].as_str() {
                    self.existing(initrd).map_err(|e| {
                        format!("Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. {e}")
                    })?;
                }
                let r = &mut self.resources;
                r.boot_source = Some(body);
                r.boot_path = true;
                Ok(Answer::empty())
            }
            ("PUT", "/machine-config") => {
                let mut machine = default_machine();
                self.update_machine(&mut machine, body)?;
                Ok(Answer::empty())
            }
            ("PATCH", "/machine-config") => {
                if body.as_object().is_some_and(Map::is_empty) {
                    return Err("Empty PATCH request.".into());
                }
                let mut machine = r.machine.clone();
                self.update_machine(&mut machine, body)?;
                Ok(Answer::empty())
            }
            ("PUT", "/drives/{drive_id}") => {
                self.put_drive(id.unwrap_or_default(), body)?;
                Ok(Answer::empty())
            }
            ("PATCH", "/drives/{drive_id}") => {
                let id = id.unwrap_or_default();
                if !r.drives.iter().any(|d| d["drive_id"] == id) {
                    return Err(format!(
                        "Drive config error: Unable to patch the block device: Invalid block device ID: {id}"
                    ));
                }
                if let Some(path) = body["path_on_host"].as_str() {
                    self.existing(path).map_err(|e| {
                        format!("Drive config error: Unable to patch the block device: cannot open {path}: {e}")
                    })?;
                }
                merge_into(&mut self.resources.drives, "drive_id", body);
                Ok(Answer::empty())
            }
            ("PUT", "/network-interfaces/{iface_id}") => {
                self.put_net(id.unwrap_or_default(), body)?;
                Ok(Answer::empty())
            }
            ("PATCH", "/network-interfaces/{iface_id}") => {
                if !r.net.iter().any(|n| n["iface_id"].as_str() == id) {
                    return Err("Network config error: Could not update the network device: Invalid interface ID - not found.".into());
                }
                merge_into(&mut r.net, "iface_id", body);
                Ok(Answer::empty())
            }
            ("PUT", "/pmem/{id}") => {
                let path = body["path_on_host"].as_str().unwrap_or_default();
                self.existing(path).map_err(|e| {
                    format!("Pmem device error: Unable to open the backing file {path}: {e}")
                })?;
                let r = &mut self.resources;
                let root = body["root_device"] == true;
                if root
                    && r.pmem
                        .iter()
                        .any(|p| p["root_device"] == true && p["id"] != body["id"])
                {
                    return Err("Pmem device error: A root pmem device already exists.".into());
                }
                upsert(&mut r.pmem, "id", body);
                r.boot_path = true;
                Ok(Answer::empty())
            }
            ("PATCH", "/pmem/{id}") => {
                if !r.pmem.iter().any(|p| p["id"].as_str() == id) {
                    return Err("Pmem device error: Invalid pmem device ID.".into());
                }
                merge_into(&mut r.pmem, "id", body);
                Ok(Answer::empty())
            }
            ("PUT", "/vsock") => {
                self.put_vsock(body)?;
                Ok(Answer::empty())
            }
            ("PUT", "/logger") => {
                // Firecracker's `Logger::update` may run any number of times before boot;
                // it opens `log_path` read-write without creating it.
                if let Some(path) = body["log_path"].as_str() {
                    self.existing(path)
                        .map_err(|e| format!("Logger error: Failed to open target file: {e}"))?;
                }
                self.resources.logger = Some(body);
                Ok(Answer::empty())
            }
            ("PUT", "/metrics") => {
                if r.metrics.is_some() {
                    return Err("Metrics error: Reinitialization of metrics not allowed.".into());
                }
                let path = body["metrics_path"].as_str().unwrap_or_default();
                self.existing(path)
                    .map_err(|e| format!("Metrics error: {e}"))?;
                self.resources.metrics = Some(body);
                Ok(Answer::empty())
            }
            ("PUT", "/mmds/config") => {
                let ids: Vec<&str> = body["network_interfaces"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if ids.is_empty() {
                    return Err("MMDS config error: The list of network interface IDs that allow forwarding MMDS requests is empty.".into());
                }
                if !ids
                    .iter()
                    .all(|id| r.net.iter().any(|n| n["iface_id"] == *id))
                {
                    return Err("MMDS config error: The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.".into());
                }
                r.mmds_config = Some(body);
                r.boot_path = true;
                Ok(Answer::empty())
            }
            ("PUT", "/mmds") => {
                r.mmds = Some(body);
                Ok(Answer::empty())
            }
            ("PATCH", "/mmds") => {
                let store = r.mmds.as_mut().ok_or_else(|| {
                    "MMDS error: The MMDS data store is not initialized.".to_owned()
                })?;
                merge_patch(store, &body);
                Ok(Answer::empty())
            }
            ("PUT", "/cpu-config") => {
                r.cpu_config = Some(body);
                Ok(Answer::empty())
            }
            ("PUT", "/entropy") => {
                r.entropy = Some(body);
                r.boot_path = true;
                Ok(Answer::empty())
            }
            ("PUT", "/serial") => {
                r.serial = Some(body);
                Ok(Answer::empty())
            }
            ("PUT", "/balloon") => {
                r.balloon = Some(body);
                r.boot_path = true;
                Ok(Answer::empty())
            }
            ("PUT", "/hotplug/memory") => {
                r.memory_hotplug = Some(body);
                r.boot_path = true;
                Ok(Answer::empty())
            }
            ("PATCH", "/balloon" | "/balloon/statistics") => {
                let balloon = r
                    .balloon
                    .as_mut()
                    .ok_or_else(|| "Balloon update error: No balloon device found.".to_owned())?;
                if let (Some(balloon), Some(update)) = (balloon.as_object_mut(), body.as_object()) {
                    balloon.extend(update.clone());
                }
                Ok(Answer::empty())
            }
            ("PATCH", "/balloon/hinting/start" | "/balloon/hinting/stop") => {
                if !r
                    .balloon
                    .as_ref()
                    .is_some_and(|b| b["free_page_hinting"] == true)
                {
                    return Err("Balloon update error: Free page hinting is not enabled.".into());
                }
                Ok(Answer::empty())
            }
            ("PATCH", "/hotplug/memory") => {
                if r.memory_hotplug.is_none() {
                    return Err(
                        "Memory hotplug update error: The memory hotplug device is not configured."
                            .into(),
                    );
                }
                Ok(Answer::empty())
            }
            ("PUT", "/snapshot/create") => {
                if self.state != DoubleState::Paused {
                    return Err("Create snapshot error: Cannot save the microVM state: the microVM is not paused.".into());
                }
                self.create_snapshot(&body)?;
                Ok(Answer::empty())
            }
            ("PUT", "/snapshot/load") => self.load_snapshot(&body, at),
            ("PATCH", "/vm") => match body["state"].as_str() {
                Some("Paused") => {
                    self.state = DoubleState::Paused;
                    Ok(Answer::empty())
                }
                _ => {
                    self.state = DoubleState::Running;
                    if std::mem::take(&mut self.reboot_on_resume) {
                        self.guest.reboot();
                    }
                    Ok(Answer::empty())
                }
            },
            _ => Err(format!("the double does not implement {method} {template}")),
        }
    }

    fn action(&mut self, action: &str, at: Instant) -> Result<Answer, String> {
        match action {
            "InstanceStart" => {
                let Some(boot) = &self.resources.boot_source else {
                    return Err(
                        "Start microvm error: Cannot start microvm without kernel configuration."
                            .into(),
                    );
                };
                let kernel = self.host_path(boot["kernel_image_path"].as_str().unwrap_or_default());
                load_elf_kernel(&kernel).map_err(|e| {
                    format!(
                        "Start microvm error: System configuration error: Cannot load kernel due to invalid memory configuration or invalid kernel image: Kernel Loader: failed to load ELF kernel image: Kernel Loader: {e}"
                    )
                })?;
                self.state = DoubleState::Running;
                self.boot_id = Some(new_boot_id());
                self.guest.boot();
                let mut answer = Answer::empty();
                answer.effect = Effect::Started(at);
                Ok(answer)
            }
            // The guest turns Ctrl+Alt+Del into a reboot, which ends the process; a guest
            // that has halted sees nothing (`Guest::reboot` does nothing then).
            "SendCtrlAltDel" => {
                match self.state {
                    DoubleState::Running => {
                        self.guest.reboot();
                    }
                    // A paused guest sees the keystroke only once resumed.
                    _ => self.reboot_on_resume = true,
                }
                Ok(Answer::empty())
            }
            // `METRICS.write()`: nothing to flush without a metrics file, and that is fine.
            "FlushMetrics" => Ok(Answer::empty()),
            other => Err(format!("the double does not implement action {other}")),
        }
    }

    fn update_machine(
        &mut self,
        machine: &mut Map<String, Value>,
        update: Value,
    ) -> Result<(), String> {
        if let Value::Object(update) = update {
            machine.extend(update);
        }
        // `cpu_template: "None"` clears the template.
        if machine.get("cpu_template").and_then(Value::as_str) == Some("None") {
            machine.remove("cpu_template");
        }
        let vcpus = machine["vcpu_count"].as_u64().unwrap_or(0);
        let smt = machine["smt"] == true;
        if vcpus == 0 || vcpus > 32 || (smt && vcpus > 1 && vcpus % 2 == 1) {
            return Err("Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.".into());
        }
        let mem = machine["mem_size_mib"].as_u64().unwrap_or(0);
        if mem == 0 || (machine["huge_pages"] == "2M" && mem % 2 == 1) {
            return Err("Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size.".into());
        }
        self.resources.machine = std::mem::take(machine);
        self.resources.boot_path = true;
        Ok(())
    }

    fn put_drive(&mut self, id: &str, body: Value) -> Result<(), String> {
        // vhost-user-block drives name a `socket` instead of a backing file.
        if body.get("socket").is_none() {
            let path = body["path_on_host"].as_str().ok_or_else(|| {
                "Drive config error: Unable to create the virtio block device: path_on_host is required for a virtio-block drive.".to_owned()
            })?;
            // Firecracker opens the backing file here, read-write unless read-only, as the
            // user the jailer made it: a drive that user may not write is refused now.
            let writable = body["is_read_only"] != true;
            self.openable(path, writable).map_err(|e| {
                format!("Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: {e} {path}")
            })?;
        }
        let r = &mut self.resources;
        if body["is_root_device"] == true
            && r.drives
                .iter()
                .any(|d| d["is_root_device"] == true && d["drive_id"] != id)
        {
            return Err("Drive config error: A root block device already exists!".into());
        }
        upsert(&mut r.drives, "drive_id", body);
        r.boot_path = true;
        Ok(())
    }

    fn put_net(&mut self, id: &str, body: Value) -> Result<(), String> {
        if let Some(mac) = body["guest_mac"].as_str()
            && !is_mac(mac)
        {
            return Err(deserialize_error(&format!(
                "invalid MAC address {mac:?} for `guest_mac`"
            )));
        }
        let r = &mut self.resources;
        let others = r.net.iter().filter(|n| n["iface_id"] != id);
        for other in others {
            if other["host_dev_name"] == body["host_dev_name"] {
                return Err(format!(
                    "Network config error: Could not create the network device: The host device name {} is already in use.",
                    body["host_dev_name"]
                ));
            }
            if body.get("guest_mac").is_some() && other["guest_mac"] == body["guest_mac"] {
                return Err(format!(
                    "Network config error: The guest MAC address {} is already in use.",
                    body["guest_mac"]
                ));
            }
        }
        // Firecracker opens the tap when the device is configured (`Tap::open_named`), as
        // the VM user: a tap that does not exist, or is another uid's, fails here. Only a
        // jailed double does (its jail has the /dev/net/tun the jailer made); others run
        // without taps.
        let tun = self.host_path("dev/net/tun");
        if self.root.is_some() && tun.exists() {
            let name = body["host_dev_name"].as_str().unwrap_or_default();
            let tap = banger_policy::ops::tap::open(&tun, name).map_err(|e| {
                format!(
                    "Network config error: Could not create the network device: Open tap device failed: Error while creating ifreq structure: {e}. Invalid TUN/TAP Backend provided by {name}. Check our documentation on setting up the network devices."
                )
            })?;
            self.taps.insert(id.to_owned(), tap);
        }
        let r = &mut self.resources;
        upsert(&mut r.net, "iface_id", body);
        r.boot_path = true;
        Ok(())
    }

    /// Like `VsockBuilder::insert`: remove the previous device's socket, then bind the new
    /// one, which fails if its path exists.
    fn put_vsock(&mut self, body: Value) -> Result<(), String> {
        if let Some(old) = self.vsock.take() {
            std::fs::remove_file(&old.path).map_err(|e| {
                format!(
                    "Vsock config error: Cannot create backend for vsock device: UnixBind({e:?})"
                )
            })?;
        }
        let path = self.host_path(body["uds_path"].as_str().unwrap_or_default());
        let listener = UnixListener::bind(&path).map_err(|e| {
            format!("Vsock config error: Cannot create backend for vsock device: UnixBind({e:?})")
        })?;
        let guest = self.guest.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(guest::host_connection(guest.clone(), stream));
            }
        });
        self.vsock = Some(VsockSocket { path, task });
        let r = &mut self.resources;
        r.vsock = Some(body);
        r.boot_path = true;
        Ok(())
    }

    /// `PUT /snapshot/create` of a paused VM: the state file holds what the double knows
    /// of the VM (its configuration, as `GET /vm/config` shows it, the release that made
    /// it and the guest's boot id), the memory file is the guest's memory size (sparse).
    /// Both are opened as Firecracker opens them (`File::create`: created or truncated, so
    /// an existing file keeps its inode, its owner and its mode).
    fn create_snapshot(&mut self, body: &Value) -> Result<(), String> {
        let mib = self.resources.machine["mem_size_mib"]
            .as_u64()
            .unwrap_or(128);
        let state = json!({
            SNAPSHOT_MAGIC: 1,
            "firecracker": self.spec.version(),
            "boot_id": self.boot_id,
            "vm": self.full_config(),
        });
        let open = |path: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
        };
        let snapshot = self.host_path(body["snapshot_path"].as_str().unwrap_or_default());
        open(&snapshot)
            .and_then(|mut f| std::io::Write::write_all(&mut f, state.to_string().as_bytes()))
            .map_err(|e| {
                format!(
                    "Create snapshot error: Cannot save the microVM state: {}: {e}",
                    snapshot.display()
                )
            })?;
        let memory = self.host_path(body["mem_file_path"].as_str().unwrap_or_default());
        open(&memory)
            .and_then(|f| f.set_len(mib << 20))
            .map_err(|e| {
                format!(
                    "Create snapshot error: Cannot save the guest memory: {}: {e}",
                    memory.display()
                )
            })?;
        Ok(())
    }

    /// `PUT /snapshot/load` on a fresh process: the state file must be one a
    /// `PUT /snapshot/create` of the same release wrote, the memory file at least the
    /// guest's memory size; the devices come back as they were saved, so the drives' files
    /// are opened again (where they were), the taps too (under `network_overrides`' names
    /// where given), and the vsock socket is bound again (at `vsock_override`'s path where
    /// given). The guest then runs on from where it was: same boot id, no boot.
    fn load_snapshot(&mut self, body: &Value, at: Instant) -> Result<Answer, String> {
        const E: &str = "Load snapshot error: Failed to restore from snapshot";
        if self.resources.boot_path {
            return Err("Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.".into());
        }
        let snapshot = body["snapshot_path"].as_str().unwrap_or_default();
        let path = self
            .existing(snapshot)
            .map_err(|e| format!("{E}: Cannot open {snapshot}: {e}"))?;
        let saved: Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .filter(|v| v[SNAPSHOT_MAGIC] == 1)
            .ok_or_else(|| {
                format!("{E}: Failed to get snapshot state from file: Failed to load snapshot state from file: {snapshot} is not a snapshot")
            })?;
        if saved["firecracker"] != self.spec.version() {
            return Err(format!(
                "{E}: Failed to get snapshot state from file: Failed to load snapshot state from file: the snapshot was made by Firecracker {}, this is {}",
                saved["firecracker"],
                self.spec.version()
            ));
        }
        let memory = match (
            body["mem_file_path"].as_str(),
            body["mem_backend"]["backend_path"].as_str(),
        ) {
            (Some(path), None) | (None, Some(path)) => path,
            _ => {
                return Err(deserialize_error(
                    "exactly one of `mem_file_path` and `mem_backend` must be given",
                ));
            }
        };
        let mem = self
            .existing(memory)
            .map_err(|e| format!("{E}: Cannot open {memory}: {e}"))?;
        let vm = &saved["vm"];
        let mib = vm["machine-config"]["mem_size_mib"].as_u64().unwrap_or(128);
        let len = std::fs::metadata(&mem).map_or(0, |m| m.len());
        if len < mib << 20 {
            return Err(format!(
                "{E}: Failed to load guest memory: {memory} holds {len} bytes, the snapshot's guest has {mib} MiB"
            ));
        }
        let drives: Vec<Value> = vm["drives"].as_array().cloned().unwrap_or_default();
        for d in &drives {
            let file = d["path_on_host"].as_str().unwrap_or_default();
            self.openable(file, d["is_read_only"] != true)
                .map_err(|e| {
                    format!("{E}: Failed to build microVM from snapshot: Cannot restore devices: Block(BackingFile({e}, {file:?}))")
                })?;
        }
        for n in vm["network-interfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let id = n["iface_id"].as_str().unwrap_or_default().to_owned();
            let mut n = n;
            if let Some(o) = body["network_overrides"]
                .as_array()
                .and_then(|os| os.iter().find(|o| o["iface_id"] == id.as_str()))
            {
                n["host_dev_name"] = o["host_dev_name"].clone();
            }
            self.put_net(&id, n)
                .map_err(|e| format!("{E}: Failed to build microVM from snapshot: {e}"))?;
        }
        if let Some(v) = vm.get("vsock").filter(|v| v.is_object()) {
            let mut v = v.clone();
            if let Some(uds) = body["vsock_override"]["uds_path"].as_str() {
                v["uds_path"] = uds.into();
            }
            self.put_vsock(v)
                .map_err(|e| format!("{E}: Failed to build microVM from snapshot: {e}"))?;
        }
        if let Some(Value::Object(machine)) = vm.get("machine-config") {
            self.resources.machine = machine.clone();
        }
        self.resources.drives = drives;
        self.resources.boot_source = vm.get("boot-source").cloned();
        self.boot_id = saved["boot_id"].as_str().map(str::to_owned);
        self.restored = true;
        self.state = if body["resume_vm"] == true {
            DoubleState::Running
        } else {
            DoubleState::Paused
        };
        self.guest.boot();
        let mut answer = Answer::empty();
        answer.effect = Effect::Started(at);
        Ok(answer)
    }

    /// The guest's boot id (made at `InstanceStart`, carried by a snapshot) and whether
    /// it was restored from one rather than booted.
    pub(crate) fn boot(&self) -> (Option<String>, bool) {
        (self.boot_id.clone(), self.restored)
    }

    fn instance_info(&self) -> Value {
        let state = match self.state {
            DoubleState::NotStarted => "Not started",
            DoubleState::Paused => "Paused",
            // Exited is only seen by a request racing the exit, while the process is up.
            DoubleState::Running | DoubleState::Exited => "Running",
        };
        json!({
            "app_name": APP_NAME,
            "id": INSTANCE_ID,
            "state": state,
            "vmm_version": self.spec.version(),
        })
    }

    /// `GET /vm/config`: the FullVmConfiguration. Resources not configured are left out
    /// (the spec declares none of them nullable); the lists are always there.
    fn full_config(&self) -> Value {
        let r = &self.resources;
        let mut config = Map::new();
        let singles = [
            ("balloon", &r.balloon),
            ("boot-source", &r.boot_source),
            ("cpu-config", &r.cpu_config),
            ("logger", &r.logger),
            ("metrics", &r.metrics),
            ("memory-hotplug", &r.memory_hotplug),
            ("mmds-config", &r.mmds_config),
            ("vsock", &r.vsock),
            ("entropy", &r.entropy),
        ];
        for (key, value) in singles {
            if let Some(value) = value {
                config.insert(key.to_owned(), value.clone());
            }
        }
        config.insert("machine-config".into(), Value::Object(r.machine.clone()));
        config.insert("drives".into(), Value::Array(r.drives.clone()));
        config.insert("network-interfaces".into(), Value::Array(r.net.clone()));
        config.insert("pmem".into(), Value::Array(r.pmem.clone()));
        Value::Object(config)
    }

    /// A path from a request body, as the jailed Firecracker sees it: under the root.
    fn host_path(&self, path: &str) -> PathBuf {
        match &self.root {
            Some(root) => root.join(path.trim_start_matches('/')),
            None => PathBuf::from(path),
        }
    }

    /// A file Firecracker opens (read, and write when `write`) but does not create.
    fn openable(&self, path: &str, write: bool) -> std::io::Result<PathBuf> {
        let host = self.host_path(path);
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(&host)?;
        Ok(host)
    }

    /// The host path of a file Firecracker opens but does not create.
    fn existing(&self, path: &str) -> std::io::Result<PathBuf> {
        let host = self.host_path(path);
        std::fs::metadata(&host)?;
        Ok(host)
    }
}

/// A boot id: this process and the time, in hex.
fn new_boot_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{:016x}", nanos ^ (u64::from(std::process::id()) << 40))
}

/// What Firecracker's x86-64 kernel loader checks before it copies a kernel into guest
/// memory at InstanceStart (`linux-loader` 0.13 `Elf::load`, which Firecracker v1.13.1's
/// `arch::x86_64::load_kernel` calls with the 1 MiB high-memory start): the 64-byte ELF
/// header, its magic, little-endian data, 56-byte program headers at an offset past the
/// header, an entry point above 1 MiB, and program headers that can be read. Errors are
/// linux-loader's own texts; the caller adds Firecracker's prefix.
fn load_elf_kernel(kernel: &Path) -> Result<(), &'static str> {
    use std::io::{Read, Seek, SeekFrom};
    const HIMEM_START: u64 = 0x10_0000;
    let mut f = std::fs::File::open(kernel).map_err(|_| "Unable to read elf header")?;
    let mut ehdr = [0u8; 64];
    f.read_exact(&mut ehdr)
        .map_err(|_| "Unable to read elf header")?;
    let u16_at = |at: usize| u16::from_le_bytes([ehdr[at], ehdr[at + 1]]);
    let u64_at = |at: usize| u64::from_le_bytes(ehdr[at..at + 8].try_into().expect("8 bytes"));
    if &ehdr[..4] != b"\x7fELF" {
        return Err("Invalid Elf magic number");
    }
    if ehdr[5] != 1 {
        return Err("Trying to load big-endian binary on little-endian machine");
    }
    if u16_at(54) != 56 {
        return Err("Invalid program header size");
    }
    let phoff = u64_at(32);
    if phoff < 64 {
        return Err("Invalid program header offset");
    }
    if u64_at(24) < HIMEM_START {
        return Err("Invalid entry address");
    }
    f.seek(SeekFrom::Start(phoff))
        .map_err(|_| "Unable to seek to program header")?;
    let mut phdrs = vec![0u8; 56 * u16_at(56) as usize];
    f.read_exact(&mut phdrs)
        .map_err(|_| "Unable to read program header")?;
    Ok(())
}

/// Firecracker's `checked_id`.
fn checked_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("The ID cannot be empty.".into());
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(
            "API Resource IDs can only contain alphanumeric characters and underscores.".into(),
        );
    }
    Ok(())
}

/// The id in the path must be the one in the body; the body field has the name of the path
/// parameter (`{drive_id}` ↔ `drive_id`). The messages differ per resource in Firecracker.
fn check_id_match(template: &str, id: &str, body: &Value) -> Result<(), String> {
    let Some(param) = template
        .rsplit('/')
        .next()
        .and_then(|s| s.strip_prefix('{'))
        .and_then(|s| s.strip_suffix('}'))
    else {
        return Ok(());
    };
    let in_body = body[param].as_str().unwrap_or_default();
    if in_body == id {
        return Ok(());
    }
    if template.starts_with("/network-interfaces") {
        Err(format!(
            "The id from the path [{id}] does not match the id from the body [{in_body}]!"
        ))
    } else {
        Err("The id from the path does not match the id from the body!".into())
    }
}

fn deserialize_error(detail: &str) -> String {
    format!("An error occurred when deserializing the json body of a request: {detail}.")
}

/// The body as recorded: JSON if it parses, else the raw text as a JSON string.
fn recorded_body(raw: &[u8]) -> Option<Value> {
    if raw.is_empty() {
        return None;
    }
    Some(
        serde_json::from_slice(raw)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(raw).into_owned())),
    )
}

/// Firecracker's `MacAddr` text form: six two-digit hex bytes joined by `:`.
fn is_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Replace the item with the same `key`, or append.
fn upsert(list: &mut Vec<Value>, key: &str, item: Value) {
    match list.iter_mut().find(|i| i[key] == item[key]) {
        Some(existing) => *existing = item,
        None => list.push(item),
    }
}

/// Merge a PATCH body's fields into the item with the same `key`.
fn merge_into(list: &mut [Value], key: &str, update: Value) {
    let Some(existing) = list.iter_mut().find(|i| i[key] == update[key]) else {
        return;
    };
    if let (Some(existing), Value::Object(update)) = (existing.as_object_mut(), update) {
        existing.extend(update);
    }
}

/// RFC 7396 JSON merge patch, which `PATCH /mmds` applies.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_table_covers_the_spec_and_agrees_with_it() {
        let spec = Spec::shared();
        for (method, template, operation) in spec.operations() {
            let body = json!({"action_type": "InstanceStart"});
            let phase = phase(method, template, Some(&body))
                .unwrap_or_else(|| panic!("no phase for {method} {template}"));
            let text = format!("{} {}", operation.summary, operation.description);
            if text.contains("Pre-boot only") {
                assert_eq!(phase, Phase::PreBoot, "{method} {template}");
            }
            if text.contains("Post-boot only") {
                assert_eq!(phase, Phase::PostBoot, "{method} {template}");
            }
        }
        let stop = json!({"action_type": "SendCtrlAltDel"});
        assert_eq!(phase("PUT", "/actions", Some(&stop)), Some(Phase::PostBoot));
    }

    #[test]
    fn mmds_patch_is_a_merge_patch() {
        let mut store = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge_patch(&mut store, &json!({"a": {"b": null, "e": 4}, "d": [1]}));
        assert_eq!(store, json!({"a": {"c": 2, "e": 4}, "d": [1]}));
    }

    #[test]
    fn macs_and_ids_are_checked_like_firecracker() {
        assert!(is_mac("06:00:AC:10:00:02"));
        assert!(!is_mac("06:00:ac:10:00"));
        assert!(!is_mac("06:00:ac:10:00:2"));
        assert!(checked_id("rootfs_1").is_ok());
        assert!(checked_id("root-fs").is_err());
    }
}
