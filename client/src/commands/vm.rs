//! `banger vm …` and `banger ps`.

use std::io::IsTerminal;
use std::time::Instant;

use banger_api::{
    CreateVm, LogEvent, Progress, SetVm, SpecDefaults, SpecSource, VmInfo, VmRpcClient, VmSpec,
};
use jsonrpsee::core::client::Subscription;

use crate::cli::{PortCmd, PsArgs, SizeArgs, VmCmd, WorkspaceCmd};
use crate::connect::{self, Target};
use crate::exit::{self, CliError};
use crate::render;

pub use banger_api::units::{human_bytes as bytes, parse_size};

/// `2 vcpu · 2 GiB memory · 8 GiB disk`.
pub fn spec_line(s: &VmSpec) -> String {
    format!(
        "{} vcpu · {} memory · {} disk",
        s.vcpu,
        bytes(u64::from(s.memory_mib) << 20),
        bytes(s.disk_bytes)
    )
}

fn source(s: SpecSource) -> &'static str {
    match s {
        SpecSource::Flag => "flag",
        SpecSource::Config => "config [vm_defaults]",
        SpecSource::Host => "auto, from this host",
        SpecSource::Builtin => "built-in",
    }
}

/// The text `vm create --help` appends: the defaults that apply now, and why.
pub fn defaults_help(d: &SpecDefaults) -> String {
    format!(
        "Defaults now (from the daemon):\n  --vcpu       {}  ({})\n  --memory     {}  ({})\n  --disk-size  {}  ({})\n  --vmm        {}  ({})",
        d.spec.vcpu,
        source(d.vcpu_from),
        bytes(u64::from(d.spec.memory_mib) << 20),
        source(d.memory_from),
        bytes(d.spec.disk_bytes),
        source(d.disk_from),
        d.vmm.as_str(),
        if d.vmm_reason.is_empty() {
            format!("default_vmm = {}", d.vmm_choice.as_str())
        } else {
            d.vmm_reason.clone()
        }
    )
}

/// Follow a progress stream to its end, printing stages to stderr, and the VM's state
/// once it is done.
async fn follow_progress(sub: Subscription<Progress>, quiet: bool) -> Result<VmInfo, CliError> {
    let t0 = Instant::now();
    match follow_events(sub, quiet).await? {
        Progress::Done { vm } => {
            if !quiet {
                eprintln!(
                    "{} is {} ({:.1}s)",
                    vm.name,
                    vm.state.as_str(),
                    t0.elapsed().as_secs_f64()
                );
            }
            Ok(vm)
        }
        other => Err(CliError::Other(format!(
            "the daemon ended the progress stream with {other:?}, not the vm"
        ))),
    }
}

/// Follow a progress stream, printing its stages to stderr, to its last event: `done` or
/// `snapshot` (answered), `failed` (the error).
pub(crate) async fn follow_events(
    mut sub: Subscription<Progress>,
    quiet: bool,
) -> Result<Progress, CliError> {
    let t0 = Instant::now();
    let tty = std::io::stderr().is_terminal();
    while let Some(item) = sub.next().await {
        let item =
            item.map_err(|e| CliError::Other(format!("lost the daemon's progress stream: {e}")))?;
        match item {
            Progress::Created { vm } => {
                if !quiet {
                    eprintln!("created {} ({})", vm.name, vm.id);
                    eprintln!("spec: {}", spec_line(&vm.spec));
                }
            }
            Progress::Stage { stage, detail } if stage == "warning" => {
                // Shown even with --json (on stderr): e.g. the VM is emulated and slow.
                eprintln!("warning: {}", detail.unwrap_or_default());
            }
            Progress::Stage { stage, detail } => {
                if !quiet {
                    let d = detail.map(|d| format!(": {d}")).unwrap_or_default();
                    let ms = t0.elapsed().as_millis();
                    if tty {
                        eprintln!("  \u{2022} {stage}{d}  [{ms} ms]");
                    } else {
                        eprintln!("  - {stage}{d} [{ms} ms]");
                    }
                }
            }
            last @ (Progress::Done { .. }
            | Progress::Snapshot { .. }
            | Progress::Forked { .. }
            | Progress::Warmed { .. }) => {
                return Ok(last);
            }
            Progress::Failed { code, message } => return Err(CliError::Rpc { code, message }),
        }
    }
    Err(CliError::Other(
        "the daemon ended the progress stream without a result".into(),
    ))
}

/// Seconds since the epoch, now.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The fields of a VM that `ps --format` knows, by name, as the table shows them.
pub const FIELDS: &[&str] = &[
    "id", "name", "state", "image", "kernel", "ip", "vmm", "vcpu", "memory", "disk", "pid",
    "ports", "created", "uptime",
];

/// The value of `field` (one of [`FIELDS`], any case) for `v`; None for an unknown field.
pub fn field(v: &VmInfo, field: &str, now: u64) -> Option<String> {
    Some(match field.to_ascii_lowercase().as_str() {
        "id" => v.id.clone(),
        "name" => v.name.clone(),
        // A busy VM's state is its last stored one (its actor did not answer).
        "state" => state_cell(v),
        "image" => v.image.clone(),
        "kernel" => v.kernel.clone(),
        "ip" => v.ip.clone().unwrap_or_else(|| "-".into()),
        "vmm" => v.vmm.as_str().to_owned(),
        "vcpu" => v.spec.vcpu.to_string(),
        "memory" => bytes(u64::from(v.spec.memory_mib) << 20),
        "disk" => bytes(v.spec.disk_bytes),
        "pid" => v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        "ports" => ports_cell(v),
        "created" => format!("{} ago", render::duration(now.saturating_sub(v.created_at))),
        "uptime" => match (v.state, v.started_at) {
            (banger_api::VmState::Running, Some(t)) => render::duration(now.saturating_sub(t)),
            _ => "-".into(),
        },
        _ => return None,
    })
}

const TABLE: &[&str] = &[
    "id", "name", "state", "image", "ip", "vmm", "created", "uptime", "ports",
];

fn print_table(vms: &[VmInfo]) {
    let now = now_secs();
    out!("{}", columns(vms, TABLE, now));
    if vms.iter().any(|v| v.busy) {
        outln!("* busy: the VM did not answer in time; its state is the last one stored");
    }
    if vms.iter().any(|v| v.adopting) {
        outln!(
            "(adopting): the daemon is still re-adopting the VM after its start; its state is the last one stored"
        );
    }
}

/// A VM's state as `ps` and `vm show` print it: a busy VM's is its last stored one (its
/// actor did not answer), marked `*`; so is an adopting VM's, marked `(adopting)`.
fn state_cell(v: &VmInfo) -> String {
    match (v.busy, v.adopting) {
        (true, _) => format!("{}*", v.state.as_str()),
        (false, true) => format!("{} (adopting)", v.state.as_str()),
        (false, false) => v.state.as_str().to_owned(),
    }
}

/// A table of `fields` (known ones: see [`field`]), headers in capitals.
fn columns(vms: &[VmInfo], fields: &[&str], now: u64) -> String {
    let head: Vec<String> = fields.iter().map(|f| f.to_ascii_uppercase()).collect();
    let head: Vec<&str> = head.iter().map(String::as_str).collect();
    let right: Vec<bool> = fields
        .iter()
        .map(|f| matches!(*f, "vcpu" | "memory" | "disk" | "pid"))
        .collect();
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            fields
                .iter()
                .map(|f| field(v, f, now).unwrap_or_default())
                .collect()
        })
        .collect();
    render::table(&head, &right, &rows)
}

/// `--format`: a template with `{{.Field}}` (`\t` and `\n` as escapes; `table ` first
/// adds a header line and lines the columns up), or a comma-separated list of fields (a
/// table). Unknown fields are a usage error naming the known ones.
pub fn format_vms(vms: &[VmInfo], format: &str, now: u64) -> Result<String, CliError> {
    let unknown = |f: &str| {
        CliError::Usage(format!(
            "--format: no field {f:?}; the fields are {}",
            FIELDS.join(", ")
        ))
    };
    if !format.contains("{{") {
        let fields: Vec<&str> = format
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        if fields.is_empty() {
            return Err(CliError::Usage("--format: no fields given".into()));
        }
        if let Some(f) = fields
            .iter()
            .find(|f| !FIELDS.contains(&f.to_ascii_lowercase().as_str()))
        {
            return Err(unknown(f));
        }
        let fields: Vec<String> = fields.iter().map(|f| f.to_ascii_lowercase()).collect();
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        return Ok(columns(vms, &fields, now));
    }
    let (table, template) = match format.strip_prefix("table ") {
        Some(t) => (true, t),
        None => (false, format),
    };
    let template = template.replace("\\t", "\t").replace("\\n", "\n");
    // Split into literal text and fields once, checking every field.
    let mut parts: Vec<(bool, String)> = Vec::new();
    let mut rest = template.as_str();
    while let Some(open) = rest.find("{{") {
        let close = rest[open..]
            .find("}}")
            .map(|c| open + c)
            .ok_or_else(|| CliError::Usage(format!("--format: {{{{ without }}}} in {format:?}")))?;
        parts.push((false, rest[..open].to_owned()));
        let inner = rest[open + 2..close].trim();
        let name = inner.strip_prefix('.').unwrap_or(inner);
        if !FIELDS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(unknown(name));
        }
        parts.push((true, name.to_ascii_lowercase()));
        rest = &rest[close + 2..];
    }
    parts.push((false, rest.to_owned()));
    let line = |value: &dyn Fn(&str) -> String| {
        parts
            .iter()
            .map(|(is_field, t)| if *is_field { value(t) } else { t.clone() })
            .collect::<String>()
    };
    let mut lines: Vec<String> = Vec::new();
    if table {
        lines.push(line(&|f| f.to_ascii_uppercase()));
    }
    for v in vms {
        lines.push(line(&|f| field(v, f, now).unwrap_or_default()));
    }
    if table {
        // Line the tab-separated columns up, as docker's tabwriter does.
        let rows: Vec<Vec<String>> = lines
            .iter()
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect();
        let head: Vec<&str> = rows[0].iter().map(String::as_str).collect();
        return Ok(render::table(&head, &[], &rows[1..]));
    }
    Ok(lines.into_iter().map(|l| l + "\n").collect())
}

/// `banger ps`/`vm list`'s output for `vms`.
fn print_list(
    vms: &[VmInfo],
    quiet: bool,
    format: Option<&str>,
    json: bool,
) -> Result<(), CliError> {
    if json {
        render::json(&vms)?;
    } else if quiet {
        for v in vms {
            outln!("{}", v.id);
        }
    } else if let Some(f) = format {
        out!("{}", format_vms(vms, f, now_secs())?);
    } else {
        print_table(vms);
    }
    Ok(())
}

/// What a VM argument names: a VM's name or ID as given (the daemon knows both), or, as
/// docker takes them, a prefix of exactly one VM's ID (IDs are hex, so only a hex word is
/// looked up). A prefix of several is a usage error naming them.
pub async fn resolve(
    client: &jsonrpsee::async_client::Client,
    vm: String,
) -> Result<String, CliError> {
    if vm.is_empty() || !vm.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(vm);
    }
    let vms = client.list().await?;
    pick(&vms, vm)
}

/// [`resolve`]'s choice among `vms`. Pure.
fn pick(vms: &[VmInfo], vm: String) -> Result<String, CliError> {
    if vms.iter().any(|v| v.name == vm || v.id == vm) {
        return Ok(vm);
    }
    let hits: Vec<&VmInfo> = vms.iter().filter(|v| v.id.starts_with(&vm)).collect();
    match hits.as_slice() {
        [one] => Ok(one.name.clone()),
        [] => Ok(vm),
        many => Err(CliError::Usage(format!(
            "{vm} is a prefix of several VMs' IDs: {}; give more of the ID, or the name",
            many.iter()
                .map(|v| format!("{} ({})", v.name, v.id))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Act on each VM in turn, as `docker stop a b` does: every failure is said on stderr
/// (naming its VM) and the others still go ahead; the status is that of the last failure
/// (0 when none failed). `ok` gets each success.
async fn each<T, F, Fut>(vms: Vec<String>, mut act: F, mut ok: impl FnMut(T)) -> u8
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, CliError>>,
{
    let mut status = exit::OK;
    for vm in vms {
        match act(vm.clone()).await {
            Ok(t) => ok(t),
            Err(e) => {
                // The daemon's messages name the VM; say which one when not.
                if e.to_string().contains(vm.as_str()) {
                    eprintln!("banger: {e}");
                } else {
                    eprintln!("banger: vm {vm}: {e}");
                }
                status = e.exit_code();
            }
        }
    }
    status
}

/// `vm logs --egress`: what the VM's policy refused, names then flows.
fn egress_log(log: &banger_api::EgressLog) {
    outln!("policy: {}", log.egress);
    if log.names.is_empty() && log.flows.is_empty() {
        outln!("nothing refused (a VM's log starts when its policy is set, while it runs)");
        return;
    }
    let ago = |s: u64| format!("{} ago", render::duration(s));
    if !log.names.is_empty() {
        outln!("{:<40} {:>8}  LAST", "REFUSED NAME", "QUERIES");
        for n in &log.names {
            outln!("{:<40} {:>8}  {}", n.name, n.queries, ago(n.last_secs));
        }
    }
    if !log.flows.is_empty() {
        outln!(
            "{:<16} {:<5} {:>5} {:>8}  LAST",
            "DROPPED TO",
            "PROTO",
            "PORT",
            "PACKETS"
        );
        for f in &log.flows {
            let port = f.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            outln!(
                "{:<16} {:<5} {:>5} {:>8}  {}",
                f.addr,
                f.proto,
                port,
                f.packets,
                ago(f.last_secs)
            );
        }
    }
}

/// The last `n` lines of `text` (a last line without its newline counts).
pub fn last_lines(text: &str, n: usize) -> &str {
    if n == 0 {
        return "";
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    match body.rmatch_indices('\n').nth(n - 1) {
        Some((i, _)) => &text[i + 1..],
        None => text,
    }
}

fn print_vm(v: &VmInfo) {
    outln!("name:     {}", v.name);
    outln!("id:       {}", v.id);
    outln!("state:    {}", state_cell(v));
    if let Some(e) = &v.error {
        outln!("error:    {e}");
    }
    outln!("vmm:      {}", v.vmm.as_str());
    outln!("spec:     {}", spec_line(&v.spec));
    outln!("image:    {}", v.image);
    outln!("kernel:   {}", v.kernel);
    outln!("nat:      {}", if v.nat { "on" } else { "off" });
    outln!(
        "egress:   {}{}",
        v.egress,
        if v.isolate {
            " (isolated from other VMs)"
        } else {
            ""
        }
    );
    if let Some(n) = v.egress_dropped {
        outln!("dropped:  {n} packets by the egress policy");
    }
    if let Some(n) = v.dns_refused {
        outln!("refused:  {n} DNS queries by the egress policy");
    }
    if v.egress_dropped.unwrap_or(0) + v.dns_refused.unwrap_or(0) > 0 {
        outln!("          (what: `banger vm logs {} --egress`)", v.name);
    }
    if let Some(e) = v.expires {
        let left = e.at.saturating_sub(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        let then = if e.delete { "deleted" } else { "stopped" };
        outln!(
            "expires:  in {} ({then} then)",
            crate::render::duration(left)
        );
    }
    if let Some(bytes) = v.saved_bytes {
        outln!(
            "saved:    {} on disk (its memory and device state; `vm start` resumes it, `vm stop` discards it)",
            self::bytes(bytes)
        );
    }
    if !v.snapshots.is_empty() {
        let names: Vec<String> = v
            .snapshots
            .iter()
            .map(|s| format!("{} ({})", s.name, bytes(s.bytes)))
            .collect();
        outln!("snapshots: {}", names.join(", "));
    }
    if let Some(pid) = v.pid {
        outln!("pid:      {pid}");
    }
    if let Some(c) = &v.clone_of {
        outln!("identity:  pending (it still runs {c}'s guest, off the bridge)");
    }
    if let Some(i) = &v.isolation {
        outln!("isolation: {i}");
    }
    outln!("dir:      {}", v.dir);
    outln!("console:  {}", v.console_log);
    if let Some(c) = &v.cmdline {
        outln!("cmdline:  {c}");
    }
    for (i, p) in v.published.iter().enumerate() {
        let label = if i == 0 { "ports:" } else { "" };
        outln!("{label:<9} {}", port_line(p));
    }
}

/// `127.0.0.1:41234->8000/tcp`, or what is asked and `(not bound)` while it is not.
fn port_line(p: &banger_api::PublishedPort) -> String {
    match p.bound_port {
        Some(_) => p.arrow(),
        None => format!("{} (not bound)", p.arrow()),
    }
}

/// The PORTS column of `ps`: the bound ports, docker's way.
fn ports_cell(v: &VmInfo) -> String {
    if v.published.is_empty() {
        return "-".into();
    }
    v.published
        .iter()
        .map(|p| p.arrow())
        .collect::<Vec<_>>()
        .join(",")
}

/// `banger vm port add|rm|list`.
async fn port(client: &jsonrpsee::async_client::Client, cmd: PortCmd) -> Result<u8, CliError> {
    match cmd {
        PortCmd::Add { vm, spec, json } => {
            let vm = resolve(client, vm).await?;
            let p = client.port_add(vm, spec).await?;
            if json {
                render::json(&p)?;
            } else {
                outln!("{}", port_line(&p));
            }
        }
        PortCmd::Rm { vm, port } => {
            let vm = resolve(client, vm).await?;
            for p in client.port_rm(vm, port).await? {
                outln!("{}", p.arrow());
            }
        }
        PortCmd::List { vm, json } => {
            let vm = resolve(client, vm).await?;
            let ports = client.port_list(vm).await?;
            if json {
                render::json(&ports)?;
            } else {
                let rows: Vec<Vec<String>> = ports
                    .iter()
                    .map(|p| {
                        let port = p.bound_port.unwrap_or(p.spec.host_port);
                        let state = if p.bound_port.is_some() {
                            "bound"
                        } else {
                            "not bound"
                        };
                        vec![
                            std::net::SocketAddr::new(p.spec.host_ip, port).to_string(),
                            format!("{}/{}", p.spec.guest_port, p.spec.proto.as_str()),
                            state.to_owned(),
                        ]
                    })
                    .collect();
                out!(
                    "{}",
                    render::table(&["HOST", "GUEST", "STATE"], &[false; 3], &rows)
                );
            }
        }
    }
    Ok(exit::OK)
}

/// `vm snapshot …`.
async fn snapshot(
    client: &jsonrpsee::async_client::Client,
    cmd: crate::cli::SnapshotCmd,
) -> Result<u8, CliError> {
    use crate::cli::SnapshotCmd;
    match cmd {
        SnapshotCmd::Create { vm, name, json } => {
            let vm = resolve(client, vm).await?;
            let t0 = Instant::now();
            let s = match follow_events(client.snapshot_create(vm, name).await?, json).await? {
                Progress::Snapshot { snapshot } => snapshot,
                other => {
                    return Err(CliError::Other(format!(
                        "the daemon ended the snapshot's progress with {other:?}, not the snapshot"
                    )));
                }
            };
            if json {
                render::json(&s)?;
            } else {
                eprintln!(
                    "{} has snapshot {} ({} on disk, {:.1}s)",
                    s.vm,
                    s.name,
                    bytes(s.bytes),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        SnapshotCmd::List { vm, json } => {
            let vm = match vm {
                Some(vm) => Some(resolve(client, vm).await?),
                None => None,
            };
            let all = client.snapshot_list(vm).await?;
            if json {
                render::json(&all)?;
            } else {
                out!("{}", snapshot_table(&all, now_secs()));
            }
        }
        SnapshotCmd::Show { vm, snapshot, json } => {
            let vm = resolve(client, vm).await?;
            let info = client.show(vm.clone()).await?;
            let Some(s) = info
                .snapshots
                .iter()
                .find(|s| s.name == snapshot)
                .or_else(|| info.snapshots.iter().find(|s| s.id == snapshot))
            else {
                return Err(CliError::Rpc {
                    code: banger_api::codes::NOT_FOUND,
                    message: format!(
                        "vm {vm} has no snapshot named {snapshot}; see `banger vm snapshot list {vm}`"
                    ),
                });
            };
            if json {
                render::json(s)?;
            } else {
                outln!("name:     {}", s.name);
                outln!("id:       {}", s.id);
                outln!("vm:       {}", s.vm);
                outln!(
                    "created:  {} ago",
                    render::duration(now_secs().saturating_sub(s.created_at))
                );
                outln!("size:     {} on disk", bytes(s.bytes));
                outln!("vmm:      {} ({})", s.vmm.as_str(), s.vmm_version);
                outln!("image:    {}", s.image);
                outln!("kernel:   {}", s.kernel);
                outln!(
                    "spec:     {} vCPU, {} memory, {} work disk",
                    s.spec.vcpu,
                    bytes(u64::from(s.spec.memory_mib) << 20),
                    bytes(s.spec.disk_bytes)
                );
                outln!("dir:      {}", s.dir);
            }
        }
        SnapshotCmd::Rm {
            vm,
            snapshots,
            json,
        } => {
            let vm = resolve(client, vm).await?;
            let mut done = Vec::new();
            let (c, v) = (client, &vm);
            let status = each(
                snapshots,
                |s| async move { Ok(c.snapshot_rm(v.clone(), s).await?) },
                |s| {
                    if !json {
                        eprintln!("removed snapshot {} of {}", s.name, s.vm);
                    }
                    done.push(s)
                },
            )
            .await;
            if json {
                render::json(&done)?;
            }
            return Ok(status);
        }
    }
    Ok(exit::OK)
}

/// `vm snapshot list`'s table.
fn snapshot_table(all: &[banger_api::SnapshotInfo], now: u64) -> String {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            vec![
                s.vm.clone(),
                s.name.clone(),
                s.id.clone(),
                format!("{} ago", render::duration(now.saturating_sub(s.created_at))),
                bytes(s.bytes),
            ]
        })
        .collect();
    render::table(
        &["VM", "NAME", "ID", "CREATED", "SIZE"],
        &[false, false, false, false, true],
        &rows,
    )
}

/// `vm pause|resume`: each VM in turn, every failure reported.
async fn pause_resume(
    client: &jsonrpsee::async_client::Client,
    a: crate::cli::PauseArgs,
    pause: bool,
) -> Result<u8, CliError> {
    let mut done = Vec::new();
    let json = a.json;
    let status = each(
        a.vms,
        |vm| async move {
            let vm = resolve(client, vm).await?;
            Ok(if pause {
                client.pause(vm).await?
            } else {
                client.resume(vm).await?
            })
        },
        |info| {
            if !json {
                eprintln!("{} is {}", info.name, info.state.as_str());
            }
            done.push(info)
        },
    )
    .await;
    if json {
        render::json(&done)?;
    }
    Ok(status)
}

/// `op` on each VM in turn (its name or ID prefix resolved first), each said on stderr with
/// the state it ends in and how long it took, or all as one JSON array (`vm stop`, `vm
/// suspend`).
async fn timed_each<F, Fut>(
    client: &jsonrpsee::async_client::Client,
    vms: Vec<String>,
    json: bool,
    op: F,
) -> Result<u8, CliError>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<VmInfo, CliError>>,
{
    let mut done = Vec::new();
    let op = &op;
    let status = each(
        vms,
        |vm| async move {
            let vm = resolve(client, vm).await?;
            let t0 = Instant::now();
            let info = op(vm).await?;
            if !json {
                eprintln!(
                    "{} is {} ({:.1}s)",
                    info.name,
                    info.state.as_str(),
                    t0.elapsed().as_secs_f64()
                );
            }
            Ok(info)
        },
        |info| done.push(info),
    )
    .await;
    if json {
        render::json(&done)?;
    }
    Ok(status)
}

pub(crate) fn size_req(s: &SizeArgs) -> (Option<u32>, Option<u32>, Option<u64>) {
    (s.vcpu, s.memory.map(|m| (m >> 20) as u32), s.disk_size)
}

/// `banger ps`: running VMs, as `docker ps`; all of them with `-a`.
pub async fn ps(target: &Target, a: PsArgs) -> Result<u8, CliError> {
    let client = connect::connect_or_start(target).await?;
    let mut vms = client.list().await?;
    if !a.all {
        // As `docker ps` lists paused containers: a paused VM still has its VMM.
        vms.retain(|v| {
            matches!(
                v.state,
                banger_api::VmState::Running | banger_api::VmState::Paused
            )
        });
    }
    print_list(&vms, a.quiet, a.format.as_deref(), a.json)?;
    Ok(exit::OK)
}

pub async fn run(target: &Target, cmd: VmCmd) -> Result<u8, CliError> {
    let client = connect::connect_or_start(target).await?;
    match cmd {
        VmCmd::Create {
            name_arg,
            name,
            image,
            kernel,
            size,
            vmm,
            nat,
            no_network,
            network,
            no_start,
            from_snapshot,
            cold,
            ttl,
            publish,
            egress,
            json,
        } => {
            let (vcpu, memory_mib, disk_bytes) = size_req(&size);
            let network = match (network, no_network) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let req = CreateVm {
                name: name.or(name_arg),
                image,
                kernel,
                vcpu,
                memory_mib,
                disk_bytes,
                vmm,
                nat,
                network,
                no_start,
                publish: publish.publish,
                egress: egress.egress,
                isolate: egress.isolate,
                ttl: ttl.map(|secs| banger_api::Ttl {
                    secs,
                    delete: false,
                }),
                from_snapshot,
                cold,
            };
            let sub = client.create(req).await?;
            let vm = follow_progress(sub, json).await?;
            if json {
                render::json(&vm)?;
            } else {
                outln!("{}", vm.name);
            }
        }
        VmCmd::Run(a) => {
            let opts = super::run::Opts {
                path: a.path,
                name: a.name,
                image: a.image,
                size: a.size,
                vmm: a.vmm,
                nat: a.nat,
                no_network: a.no_network,
                cold: a.cold,
                publish: a.publish.publish,
                egress: a.egress,
                rm: a.rm,
                ttl: a.ttl,
                full_copy: a.full_copy,
                timings: a.timings,
                boot_wait: !a.no_boot_wait,
                detach: a.detach,
                env: a.env,
                workdir: a.workdir,
                cmd: a.cmd,
            };
            return super::run::run(&client, target, opts).await;
        }
        VmCmd::Workspace(WorkspaceCmd::Prepare {
            vm,
            path,
            branch,
            from,
            full_copy,
        }) => {
            let opts = super::workspace::Opts {
                branch,
                from,
                full_copy,
            };
            let vm = resolve(&client, vm).await?;
            super::workspace::run_prepare(&client, &vm, &path, &opts).await?;
        }
        VmCmd::Workspace(WorkspaceCmd::Export { vm, out }) => {
            let vm = resolve(&client, vm).await?;
            super::workspace::run_export(&client, &vm, out.as_deref()).await?;
        }
        VmCmd::Start(a) => {
            let mut done = Vec::new();
            let c = &client;
            let status = each(
                a.vms,
                |vm| async move {
                    let vm = resolve(c, vm).await?;
                    follow_progress(c.start(vm).await?, a.json).await
                },
                |info| done.push(info),
            )
            .await;
            if a.json {
                render::json(&done)?;
            }
            return Ok(status);
        }
        VmCmd::Restart { vm, json } => {
            let vm = resolve(&client, vm).await?;
            let info = follow_progress(client.restart(vm).await?, json).await?;
            if json {
                render::json(&info)?;
            }
        }
        VmCmd::Stop(a) => {
            let (c, timeout) = (&client, a.timeout);
            return timed_each(c, a.vms, a.json, |vm| async move {
                Ok(c.stop(vm, timeout).await?)
            })
            .await;
        }
        VmCmd::Pause(a) => return pause_resume(&client, a, true).await,
        VmCmd::Resume(a) => return pause_resume(&client, a, false).await,
        VmCmd::Suspend(a) => {
            let mut done = Vec::new();
            let c = &client;
            let status = each(
                a.vms,
                |vm| async move {
                    let vm = resolve(c, vm).await?;
                    follow_progress(c.suspend(vm).await?, a.json).await
                },
                |info| done.push(info),
            )
            .await;
            if a.json {
                render::json(&done)?;
            }
            return Ok(status);
        }
        VmCmd::Kill { vms, signal, json } => {
            let mut done = Vec::new();
            let c = &client;
            let signal = &signal;
            let status = each(
                vms,
                |vm| async move {
                    let vm = resolve(c, vm).await?;
                    Ok(c.kill(vm, Some(signal.clone())).await?)
                },
                |info| {
                    if !json {
                        eprintln!("{} is {}", info.name, info.state.as_str());
                    }
                    done.push(info)
                },
            )
            .await;
            if json {
                render::json(&done)?;
            }
            return Ok(status);
        }
        VmCmd::Delete(a) => {
            let mut done = Vec::new();
            let c = &client;
            let force = a.force;
            let json = a.json;
            let status = each(
                a.vms,
                |vm| async move {
                    let vm = resolve(c, vm).await?;
                    Ok(c.delete(vm, force).await?)
                },
                |info| {
                    if !json {
                        outln!("{}", info.name);
                    }
                    done.push(info)
                },
            )
            .await;
            if json {
                render::json(&done)?;
            }
            return Ok(status);
        }
        VmCmd::Set {
            vm,
            size,
            nat,
            no_nat,
            json,
            egress,
            isolate,
            no_isolate,
            ttl,
        } => {
            let vm = resolve(&client, vm).await?;
            let (vcpu, memory_mib, disk_bytes) = size_req(&size);
            let isolate = match (isolate, no_isolate) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let nat = if nat {
                Some(true)
            } else if no_nat {
                Some(false)
            } else {
                None
            };
            if vcpu.is_none()
                && memory_mib.is_none()
                && disk_bytes.is_none()
                && nat.is_none()
                && egress.is_none()
                && isolate.is_none()
                && ttl.is_none()
            {
                return Err(CliError::Usage(
                    "nothing to set: pass --vcpu, --memory, --disk-size, --nat, --no-nat, --egress, --isolate, --no-isolate or --ttl".into(),
                ));
            }
            let info = client
                .set(SetVm {
                    vm,
                    vcpu,
                    memory_mib,
                    disk_bytes,
                    nat,
                    egress,
                    isolate,
                    ttl_secs: ttl,
                })
                .await?;
            if json {
                render::json(&info)?;
            } else {
                eprintln!("{}: {}", info.name, spec_line(&info.spec));
            }
        }
        VmCmd::List {
            quiet,
            format,
            json,
        } => {
            let vms = client.list().await?;
            print_list(&vms, quiet, format.as_deref(), json)?;
        }
        VmCmd::Show { vm, json } => {
            let vm = resolve(&client, vm).await?;
            let info = client.show(vm).await?;
            if json {
                render::json(&info)?;
            } else {
                print_vm(&info);
            }
        }
        VmCmd::Stats { vm, json } => {
            let vm = resolve(&client, vm).await?;
            let s = client.stats(vm).await?;
            if json {
                render::json(&s)?;
            } else {
                outln!("vm:           {} ({})", s.vm, s.state.as_str());
                if let Some(pid) = s.pid {
                    outln!("vmm pid:      {pid}");
                }
                if let Some(rss) = s.vmm_rss_bytes {
                    outln!("vmm memory:   {} resident", bytes(rss));
                }
                if let Some(cpu) = s.vmm_cpu_ms {
                    outln!("vmm cpu:      {:.1}s", cpu as f64 / 1000.0);
                }
                if let Some(up) = s.uptime_secs {
                    outln!("uptime:       {}", render::duration(up));
                }
                outln!(
                    "overlay disk: {} used on the host",
                    bytes(s.overlay_allocated_bytes)
                );
                outln!(
                    "work disk:    {} used on the host",
                    bytes(s.work_allocated_bytes)
                );
                if let Some(n) = s.egress_dropped {
                    outln!("egress drops: {n} packets");
                }
                if let Some(n) = s.dns_refused {
                    outln!("dns refused:  {n} queries");
                }
            }
        }
        VmCmd::Exec(a) => {
            let vm = resolve(&client, a.vm).await?;
            return super::exec::run(&client, &vm, a.tty, a.env, a.workdir, a.cmd).await;
        }
        VmCmd::Ssh(a) => {
            let vm = resolve(&client, a.vm).await?;
            return super::ssh::vm_ssh(&client, target, &vm, &a.cmd).await;
        }
        VmCmd::Cp(a) => return super::cp::run(&client, &a.src, &a.dst).await,
        VmCmd::Port(cmd) => return port(&client, cmd).await,
        VmCmd::Snapshot(cmd) => return snapshot(&client, cmd).await,
        VmCmd::Rollback { vm, snapshot, json } => {
            let vm = resolve(&client, vm).await?;
            let t0 = Instant::now();
            let sub = client.rollback(vm, snapshot.clone()).await?;
            let info = match follow_events(sub, json).await? {
                Progress::Done { vm } => vm,
                other => {
                    return Err(CliError::Other(format!(
                        "the daemon ended the rollback's progress with {other:?}, not the vm"
                    )));
                }
            };
            if json {
                render::json(&info)?;
            } else {
                eprintln!(
                    "{} is back at snapshot {snapshot} and {} ({:.1}s)",
                    info.name,
                    info.state.as_str(),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        VmCmd::Fork {
            vm,
            count,
            name,
            nat,
            json,
        } => {
            let vm = resolve(&client, vm).await?;
            let t0 = Instant::now();
            let req = banger_api::ForkVm {
                vm,
                count: Some(count),
                name,
                nat,
                network: None,
            };
            let vms = match follow_events(client.fork(req).await?, json).await? {
                Progress::Forked { vms } => vms,
                other => {
                    return Err(CliError::Other(format!(
                        "the daemon ended the fork's progress with {other:?}, not the clones"
                    )));
                }
            };
            if json {
                render::json(&vms)?;
            } else {
                for v in &vms {
                    eprintln!(
                        "{} is {}{}",
                        v.name,
                        v.state.as_str(),
                        v.ip.as_deref()
                            .map(|ip| format!(" at {ip}"))
                            .unwrap_or_default()
                    );
                }
                eprintln!(
                    "{} clone{} ({:.1}s)",
                    vms.len(),
                    if vms.len() == 1 { "" } else { "s" },
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        VmCmd::Ports { vm, json } => {
            let vm = resolve(&client, vm).await?;
            let ports = client.ports(vm).await?;
            if json {
                render::json(&ports)?;
            } else {
                outln!("{:<5} {:<28} {:>6}  PROCESS", "PROTO", "ADDRESS", "PORT");
                for p in ports {
                    let who = match (p.process, p.pid) {
                        (Some(n), Some(pid)) => format!("{n} ({pid})"),
                        _ => "-".into(),
                    };
                    outln!("{:<5} {:<28} {:>6}  {who}", p.proto, p.address, p.port);
                }
            }
        }
        VmCmd::Logs(a) => {
            let vm = resolve(&client, a.vm).await?;
            if a.egress {
                let log = client.egress_log(vm).await?;
                if a.json {
                    render::json(&log)?;
                } else {
                    egress_log(&log);
                }
                return Ok(exit::OK);
            }
            if !a.follow {
                let text = client.logs(vm, a.bytes).await?;
                match a.tail {
                    Some(n) => out!("{}", last_lines(&text, n)),
                    None => out!("{text}"),
                }
                return Ok(exit::OK);
            }
            let mut sub = client.logs_follow(vm).await?;
            // The first data is the log so far: --tail cuts that, as `docker logs -f -n`.
            let mut backlog = true;
            while let Some(ev) = sub.next().await {
                match ev.map_err(|e| CliError::Other(format!("lost the console stream: {e}")))? {
                    // `vm logs -f dev | grep -m1 login:` ends when grep does.
                    LogEvent::Data { text } if std::mem::take(&mut backlog) => {
                        let text = match (a.tail, a.bytes) {
                            (Some(n), _) => last_lines(&text, n),
                            (_, Some(n)) => {
                                let mut from = text.len().saturating_sub(n as usize);
                                while !text.is_char_boundary(from) {
                                    from += 1;
                                }
                                &text[from..]
                            }
                            _ => &text,
                        };
                        render::stdout_bytes(text.as_bytes());
                    }
                    LogEvent::Data { text } => render::stdout_bytes(text.as_bytes()),
                    LogEvent::End { state } => {
                        eprintln!("\n[banger: the vm is {}]", state.as_str());
                        break;
                    }
                }
            }
        }
        VmCmd::Prune { force } => {
            let would = client.prune(true).await?;
            if would.deleted.is_empty() {
                eprintln!("nothing to prune");
                return Ok(exit::OK);
            }
            if !force {
                eprintln!("would delete: {}", would.deleted.join(", "));
                if !std::io::stdin().is_terminal() {
                    return Err(CliError::Usage(
                        "not a terminal: pass --force to delete without asking".into(),
                    ));
                }
                eprint!("delete these {} vms? [y/N] ", would.deleted.len());
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
                if !matches!(line.trim(), "y" | "Y" | "yes") {
                    eprintln!("nothing deleted");
                    return Ok(exit::OK);
                }
            }
            let done = client.prune(false).await?;
            for name in done.deleted {
                outln!("{name}");
            }
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, name: &str, state: banger_api::VmState) -> VmInfo {
        VmInfo {
            id: id.into(),
            name: name.into(),
            state,
            error: None,
            vmm: banger_api::VmmKind::Firecracker,
            spec: VmSpec {
                vcpu: 2,
                memory_mib: 1024,
                disk_bytes: 8 << 30,
            },
            image: "img".into(),
            kernel: "k".into(),
            nat: false,
            created_at: 1000,
            started_at: Some(1900),
            pid: None,
            dir: "/d".into(),
            console_log: "/d/console.log".into(),
            cmdline: None,
            vsock_socket: None,
            ip: Some("10.0.0.2".into()),
            isolation: None,
            published: Vec::new(),
            egress: banger_api::Egress::Subnet,
            isolate: false,
            egress_dropped: None,
            dns_refused: None,
            busy: false,
            clone_of: None,
            adopting: false,
            expires: None,
            saved_bytes: None,
            snapshots: Vec::new(),
        }
    }

    /// An ID prefix names the one VM whose ID it begins; a name or whole ID is kept; a
    /// prefix of several is a usage error naming them (docker's rules).
    #[test]
    fn unique_id_prefixes_name_a_vm() {
        use banger_api::VmState::Running;
        let vms = [
            vm("abc123000000", "one", Running),
            vm("abd999000000", "two", Running),
        ];
        assert_eq!(pick(&vms, "abc".into()).unwrap(), "one");
        assert_eq!(pick(&vms, "abd9".into()).unwrap(), "two");
        assert_eq!(pick(&vms, "abc123000000".into()).unwrap(), "abc123000000");
        assert_eq!(pick(&vms, "ff".into()).unwrap(), "ff", "left to the daemon");
        let e = pick(&vms, "ab".into()).unwrap_err();
        assert_eq!(e.exit_code(), exit::USAGE);
        assert!(
            e.to_string()
                .contains("one (abc123000000), two (abd999000000)"),
            "{e}"
        );
        // A VM named like a prefix of another's ID wins, as a name.
        let vms = [
            vm("beef00000000", "one", Running),
            vm("123456789abc", "beef", Running),
        ];
        assert_eq!(pick(&vms, "beef".into()).unwrap(), "beef");
    }

    /// `ps --format`: Go-template-like (`{{.Name}}`, `\t`, `table ` adds a header and
    /// lines columns up) or a list of columns; an unknown field is a usage error.
    #[test]
    fn ps_format_templates_and_field_lists() {
        use banger_api::VmState::{Running, Stopped};
        let vms = [
            vm("abc123000000", "one", Running),
            vm("def456000000", "two", Stopped),
        ];
        assert_eq!(
            format_vms(&vms, "{{.Name}} {{ .State }}", 2000).unwrap(),
            "one running\ntwo stopped\n"
        );
        assert_eq!(
            format_vms(&vms, "{{.ID}}\\t{{.IP}}", 2000).unwrap(),
            "abc123000000\t10.0.0.2\ndef456000000\t10.0.0.2\n"
        );
        assert_eq!(
            format_vms(&vms, "table {{.Name}}\\t{{.Uptime}}", 2000).unwrap(),
            "NAME  UPTIME\none   1m 40s\ntwo   -\n"
        );
        assert_eq!(
            format_vms(&vms, "name,state,created", 2000).unwrap(),
            "NAME  STATE    CREATED\none   running  16m 40s ago\ntwo   stopped  16m 40s ago\n"
        );
        for bad in ["{{.Nope}}", "name,nope", "{{.Name"] {
            let e = format_vms(&vms, bad, 0).unwrap_err();
            assert_eq!(e.exit_code(), exit::USAGE, "{bad}");
        }
        // The default table: docker's columns.
        let t = columns(&vms, TABLE, 2000);
        assert!(
            t.starts_with("ID            NAME  STATE    IMAGE  IP        VMM          CREATED      UPTIME  PORTS\n"),
            "{t}"
        );
    }

    /// `--tail N` counts lines, the last one with or without its newline.
    #[test]
    fn tail_counts_lines() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
        assert_eq!(last_lines("a\nb\n", 5), "a\nb\n");
        assert_eq!(last_lines("a\nb\n", 0), "");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn spec_line_reads_like_the_issue() {
        let s = VmSpec {
            vcpu: 2,
            memory_mib: 2048,
            disk_bytes: 8 << 30,
        };
        assert_eq!(spec_line(&s), "2 vcpu · 2 GiB memory · 8 GiB disk");
    }
}
