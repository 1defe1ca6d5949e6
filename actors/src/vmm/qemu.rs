//! The QEMU microvm driver, for hosts without Firecracker and for the test rig.
//!
//! Processes per VM: `qemu-system-x86_64 -M microvm`, then the agent proxy (`bangerd
//! --internal-agent-proxy`, see [`banger_guest::mux`]), each in its own process group. The
//! agent's channel is a virtio-serial port (`banger.agent`) whose host end is a Unix
//! socket QEMU listens on (`run/agent.sock`); the proxy runs a yamux session over it and
//! exposes the guest as a hybrid vsock Unix socket (`run/vsock.sock`, `CONNECT <port>\n`),
//! exactly like Firecracker's. (vhost-user-vsock, the earlier channel, cannot be migrated,
//! so a VM with it could never be saved.) The proxy outlives a daemon restart as QEMU does;
//! a daemon that re-adopts the VM starts a new one when it is gone ([`ensure_proxy`]).
//!
//! The serial console is appended to the VM's `console.log` by QEMU itself (a file
//! chardev), so it survives a daemon restart. QMP (`run/qmp.sock`) is used for status and
//! shutdown.
//!
//! Acceleration: KVM when `/dev/kvm` opens and is not PVM, TCG otherwise; `qemu_accel` in
//! the config forces one. (On a PVM host, /dev/kvm answers but a stock guest kernel dies
//! early: see RIG.md.) QMP is JSON lines; the handful of commands banger needs are spoken
//! directly with serde_json rather than through a QAPI crate.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{LaunchPlan, VmmError, tail, wait_for_path};
use crate::vm::model::Runtime;
use crate::vm::proc;

/// How QEMU accelerates the guest (defined beside the VMM choice, which weighs it).
pub use super::choose::Accel;

/// QEMU settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    /// The agent proxy's program (the daemon's own binary, which runs it with
    /// [`banger_guest::mux::PROXY_ARG`]).
    pub agent_proxy: PathBuf,
    pub accel: Accel,
}

/// Whether KVM is usable for stock guest kernels here (see [`super::choose::Kvm`]).
pub fn kvm_usable() -> bool {
    super::choose::Kvm::probe().usable()
}

/// A PVM host (nested paravirtualised KVM): the kvm_pvm module is loaded.
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn accel_arg(a: Accel) -> &'static str {
    match a {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
        Accel::Auto if kvm_usable() => "kvm",
        Accel::Auto => "tcg",
    }
}

/// The host's TSC frequency in kHz (microvm has no HPET; the guest needs
/// `tsc_early_khz`). From sysfs when the kernel exports it, else from the boot log's
/// "tsc: Refined TSC clocksource calibration" / "Detected ... MHz processor" lines, else
/// from /proc/cpuinfo's "cpu MHz".
pub fn host_tsc_khz() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        && let Ok(k) = s.trim().parse()
    {
        return Some(k);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz"))?
        .trim_start_matches([' ', '\t', ':'])
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// The QEMU command line.
pub fn qemu_args(c: &QemuConfig, plan: &LaunchPlan) -> Vec<String> {
    let run = &plan.run_dir;
    let mem = plan.spec.memory_mib;
    let accel = accel_arg(c.accel);
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("banger-{}", plan.id),
        "-M".into(),
        "microvm,rtc=on,pit=on,pic=on".into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        if accel == "kvm" { "host" } else { "max" }.into(),
        "-m".into(),
        format!("{mem}M"),
        "-smp".into(),
        plan.spec.vcpu.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        plan.kernel.display().to_string(),
    ];
    if let Some(initrd) = &plan.initrd {
        a.extend(["-initrd".into(), initrd.display().to_string()]);
    }
    a.extend([
        "-append".into(),
        plan.cmdline.clone(),
        "-chardev".into(),
        format!("file,id=console,path={},append=on", plan.console.display()),
        "-serial".into(),
        "chardev:console".into(),
    ]);
    // The root filesystem first: the guest kernel's root=/dev/vda.
    for (id, file, ro) in [
        ("rootfs", &plan.rootfs, true),
        ("overlay", &plan.overlay, false),
        ("work", &plan.work, false),
    ] {
        a.extend([
            "-drive".into(),
            format!(
                "id={id},file={},format=raw,if=none,readonly={}",
                file.display(),
                if ro { "on" } else { "off" }
            ),
            "-device".into(),
            format!("virtio-blk-device,drive={id}"),
        ]);
    }
    if let Some((tap, mac)) = &plan.tap {
        a.extend([
            "-netdev".into(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={mac}"),
        ]);
    }
    // The agent's channel: a virtio-serial port whose host end QEMU serves on a Unix
    // socket (without waiting for a client), for the agent proxy to connect to.
    a.extend([
        "-device".into(),
        "virtio-serial-device,max_ports=2".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            run.join(AGENT_SERIAL).display()
        ),
        "-device".into(),
        format!(
            "virtserialport,chardev=agent,name={}",
            banger_guest::mux::PORT_NAME
        ),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", run.join("qmp.sock").display()),
    ]);
    a
}

/// The host end of the agent's virtio-serial port, in the run directory.
pub const AGENT_SERIAL: &str = "agent.sock";
/// The hybrid vsock socket the agent proxy serves, in the run directory.
pub const VSOCK: &str = "vsock.sock";
/// The agent proxy's log, in the run directory.
const PROXY_LOG: &str = "agent-proxy.log";

/// The agent proxy's command line (after the program).
pub fn proxy_args(run_dir: &Path) -> Vec<String> {
    vec![
        banger_guest::mux::PROXY_ARG.into(),
        run_dir.join(AGENT_SERIAL).display().to_string(),
        run_dir.join(VSOCK).display().to_string(),
    ]
}

/// Start the agent proxy of the VM whose run directory is `run_dir`, and wait until it
/// serves the hybrid vsock socket.
async fn spawn_proxy(c: &QemuConfig, run_dir: &Path) -> Result<(i32, u64), VmmError> {
    let vsock = run_dir.join(VSOCK);
    let _ = std::fs::remove_file(&vsock);
    let log = run_dir.join(PROXY_LOG);
    let (out, err) = log_file(&log)?;
    let (pid, start) = proc::spawn(
        Command::new(&c.agent_proxy)
            .args(proxy_args(run_dir))
            .stdout(out)
            .stderr(err),
    )
    .map_err(|source| VmmError::Spawn {
        what: format!("the agent proxy ({})", c.agent_proxy.display()),
        source,
    })?;
    if let Err(e) = wait_for_path(
        &vsock,
        "the agent proxy",
        Duration::from_secs(10),
        || proc::alive(pid, start),
        || tail(&log, 3),
    )
    .await
    {
        proc::signal(pid, start, nix::sys::signal::Signal::SIGKILL);
        return Err(e);
    }
    Ok((pid, start))
}

/// A re-adopted VM's agent proxy: start a new one when it is gone (killed while the daemon
/// was down), so the hybrid vsock socket answers again. Ok(true) when it started one and
/// `rt.helpers` changed. A VM of an older banger (vhost-device-vsock, no serial socket) is
/// left as it is.
pub async fn ensure_proxy(c: &QemuConfig, rt: &mut Runtime) -> Result<bool, VmmError> {
    let Some(run_dir) = Path::new(&rt.vsock_socket).parent().map(Path::to_owned) else {
        return Ok(false);
    };
    if !run_dir.join(AGENT_SERIAL).exists()
        || rt
            .helpers
            .iter()
            .any(|&(pid, start)| proc::alive(pid, start))
    {
        return Ok(false);
    }
    rt.helpers = vec![spawn_proxy(c, &run_dir).await?];
    Ok(true)
}

fn setup(e: impl std::fmt::Display) -> VmmError {
    VmmError::Setup(e.to_string())
}

fn log_file(path: &Path) -> Result<(Stdio, Stdio), VmmError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(setup)?;
    let g = f.try_clone().map_err(setup)?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

/// Launch QEMU, wait for QMP, check the guest runs, then start the agent proxy.
pub async fn launch(
    c: &QemuConfig,
    plan: &LaunchPlan,
    stage: &(dyn Fn(&str) + Send + Sync),
) -> Result<Runtime, VmmError> {
    launch_from(c, plan, None, stage, &|_, _| {}).await
}

/// [`launch`], telling `on_spawn` QEMU's (pid, start time) as soon as it exists (see
/// `firecracker::launch_with`). A failed launch returns once QEMU is gone.
pub async fn launch_with(
    c: &QemuConfig,
    plan: &LaunchPlan,
    stage: &(dyn Fn(&str) + Send + Sync),
    on_spawn: &(dyn Fn(i32, u64) + Send + Sync),
) -> Result<Runtime, VmmError> {
    launch_from(c, plan, None, stage, on_spawn).await
}

/// The file of a saved state in its directory (see [`save_state`]).
pub const STATE_FILE: &str = "vm.state";

/// The migration capabilities of a save and of its load (they must match): `mapped-ram`
/// writes each RAM page at a fixed offset of the file (zero pages are left as holes, so
/// the file is sparse and about as big as the memory in use) and loads with a few large
/// reads. Measured here (512 MiB TCG guest, ~100 MiB in a tmpfs, 257 MiB of pages): a
/// plain stream saves in 0.19-0.52 s and loads in 0.67-0.88 s; mapped-ram saves in
/// 0.28-0.48 s and loads in 0.10-0.24 s; mapped-ram + multifd (2 channels, on this 2-core
/// host) saves in 0.23-0.80 s and loads in 0.18-0.50 s. A load is what a `vm start` waits
/// for, so mapped-ram alone.
fn capabilities() -> Value {
    json!([{ "capability": "mapped-ram", "state": true }])
}

/// Save the running VM's memory and device state into `dir` (which exists, and is empty):
/// `stop`, then `migrate` to `file:<dir>/vm.state` with [`capabilities`], waiting for
/// `query-migrate` to say completed. The guest is left stopped either way: the caller
/// ends the VMM (a suspend), or [`resume`]s it (a failed save, a snapshot).
pub async fn save_state(rt: &Runtime, dir: &Path) -> Result<(), VmmError> {
    let mut qmp = Qmp::connect(Path::new(&rt.control_socket)).await?;
    qmp.execute("stop", None).await?;
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": capabilities() })),
    )
    .await?;
    // QEMU throttles a migration to 128 MiB/s by default; a file has no peer to spare.
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 1u64 << 40 })),
    )
    .await?;
    let uri = format!("file:{}", dir.join(STATE_FILE).display());
    qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
    wait_migration(&mut qmp, rt.pid, rt.start_time).await
}

/// Poll `query-migrate` until the migration (out or in) completes; its error if it fails.
async fn wait_migration(qmp: &mut Qmp, pid: i32, start: u64) -> Result<(), VmmError> {
    loop {
        let r = qmp.execute("query-migrate", None).await?;
        match r.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some(s @ ("failed" | "cancelled")) => {
                let why = r
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(VmmError::Qmp(format!("the migration {s}: {why}")));
            }
            _ if !proc::alive(pid, start) => {
                return Err(VmmError::Died {
                    what: "qemu".into(),
                    detail: "it exited during the migration".into(),
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Launch QEMU with the VM's device line and load the state [`save_state`] wrote into
/// `dir` (`-incoming defer`, then `migrate-incoming` with the same capabilities), let it
/// run (`cont`), then start a fresh agent proxy: the guest's agent sees the port's host
/// end close and open again and starts a new session with it (see
/// [`banger_guest::mux`]).
pub async fn launch_restored(
    c: &QemuConfig,
    plan: &LaunchPlan,
    dir: &Path,
    stage: &(dyn Fn(&str) + Send + Sync),
    on_spawn: &(dyn Fn(i32, u64) + Send + Sync),
) -> Result<Runtime, VmmError> {
    let state = dir.join(STATE_FILE);
    if !state.is_file() {
        return Err(VmmError::Setup(format!(
            "the saved state {} is missing",
            state.display()
        )));
    }
    launch_from(c, plan, Some(&state), stage, on_spawn).await
}

async fn launch_from(
    c: &QemuConfig,
    plan: &LaunchPlan,
    incoming: Option<&Path>,
    stage: &(dyn Fn(&str) + Send + Sync),
    on_spawn: &(dyn Fn(i32, u64) + Send + Sync),
) -> Result<Runtime, VmmError> {
    stage("launch");
    let run = &plan.run_dir;
    let _ = std::fs::remove_dir_all(run);
    std::fs::create_dir_all(run).map_err(setup)?;
    // What QEMU says lands in the console log; from here on it is this launch's.
    let said_from = std::fs::metadata(&plan.console).map_or(0, |m| m.len());
    let (out, err) = log_file(&plan.console)?;
    let mut args = qemu_args(c, plan);
    if incoming.is_some() {
        args.extend(["-incoming".into(), "defer".into()]);
    }
    let spawned = proc::spawn(Command::new(&c.qemu).args(args).stdout(out).stderr(err));
    let (pid, start) = match spawned {
        Ok(p) => p,
        Err(source) => {
            return Err(VmmError::Spawn {
                what: c.qemu.display().to_string(),
                source,
            });
        }
    };
    on_spawn(pid, start);
    let result = async {
        let qmp_path = run.join("qmp.sock");
        wait_for_path(
            &qmp_path,
            "qemu",
            Duration::from_secs(10),
            || proc::alive(pid, start),
            || qemu_said(&plan.console, said_from),
        )
        .await?;
        stage(if incoming.is_some() {
            "restore"
        } else {
            "boot"
        });
        let mut qmp = super::connect_when_listening(
            Duration::from_secs(10),
            || proc::alive(pid, start),
            || Qmp::connect(&qmp_path),
        )
        .await?;
        if let Some(state) = incoming {
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": capabilities() })),
            )
            .await?;
            let uri = format!("file:{}", state.display());
            qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
                .await?;
            wait_migration(&mut qmp, pid, start).await?;
            qmp.execute("cont", None).await?;
        }
        let status = qmp.execute("query-status", None).await?;
        match status.get("status").and_then(Value::as_str) {
            Some("running") => Ok(()),
            other => Err(VmmError::Qmp(format!(
                "the guest is not running: {other:?}"
            ))),
        }?;
        spawn_proxy(c, run).await
    }
    .await;
    let proxy = match result {
        Ok(p) => p,
        Err(e) => {
            // A QMP socket that closes, or a guest that is not running, is most often QEMU on
            // its way out after an error it printed: let it finish (briefly), then say what it
            // said rather than how its socket went away.
            let exited = proc::wait_gone(pid, start, Duration::from_secs(2)).await;
            proc::signal(pid, start, nix::sys::signal::Signal::SIGKILL);
            if !proc::wait_gone(pid, start, Duration::from_secs(5)).await {
                tracing::warn!(vm = %plan.id, pid, "the failed launch's qemu did not end");
            }
            return Err(match e {
                VmmError::Died { .. } => e,
                _ if exited => VmmError::Died {
                    what: "qemu".into(),
                    detail: qemu_said(&plan.console, said_from),
                },
                e => e,
            });
        }
    };
    Ok(Runtime {
        pid,
        start_time: start,
        helpers: vec![proxy],
        control_socket: run.join("qmp.sock").display().to_string(),
        vsock_socket: run.join(VSOCK).display().to_string(),
        isolation: None,
    })
}

/// The last lines QEMU wrote to the console log since `from` (its own messages: a launch
/// that fails before the guest runs has no guest output), for an error message.
fn qemu_said(console: &Path, from: u64) -> String {
    let said = super::tail_since(console, from, 5);
    if said.is_empty() {
        "it printed nothing".into()
    } else {
        said
    }
}

/// Press the ACPI power button (`system_powerdown`). microvm has no keyboard controller,
/// so Ctrl-Alt-Del (Firecracker's way) cannot reach the guest; the power button reaches
/// systemd-logind in systemd images and banger-init otherwise, and the guest powers off,
/// which ends QEMU.
pub async fn request_shutdown(rt: &Runtime) -> Result<(), VmmError> {
    let mut qmp = Qmp::connect(Path::new(&rt.control_socket)).await?;
    qmp.execute("system_powerdown", None).await.map(drop)
}

// Pause and resume (see `Driver::pause`).

/// `stop` or `cont`. QEMU's `stop` of a stopped VM and `cont` of a running one succeed.
pub async fn set_paused(rt: &Runtime, paused: bool) -> Result<(), VmmError> {
    let mut qmp = Qmp::connect(Path::new(&rt.control_socket)).await?;
    let cmd = if paused { "stop" } else { "cont" };
    qmp.execute(cmd, None).await.map(drop)
}

/// `query-status` says `"status": "paused"` (a `stop`, not a guest shutdown or a
/// migration, which have statuses of their own).
pub async fn is_paused(rt: &Runtime) -> Result<bool, VmmError> {
    let mut qmp = Qmp::connect(Path::new(&rt.control_socket)).await?;
    let status = qmp.execute("query-status", None).await?;
    Ok(status.get("status").and_then(Value::as_str) == Some("paused"))
}

/// A QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connect, read the greeting, negotiate capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, VmmError> {
        let io = |source| VmmError::Io {
            what: format!("QMP at {}", path.display()),
            source,
        };
        let stream = tokio::net::UnixStream::connect(path).await.map_err(io)?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(VmmError::Qmp(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
            .await
            .map_err(|_| VmmError::Timeout("a QMP answer".into()))?
            .map_err(|source| VmmError::Io {
                what: "QMP".into(),
                source,
            })?;
        if n == 0 {
            return Err(VmmError::Qmp("QEMU closed the QMP connection".into()));
        }
        serde_json::from_str(&line).map_err(|e| VmmError::Qmp(format!("bad QMP line: {e}")))
    }

    /// Run one command and return its `return` value (events in between are skipped).
    pub async fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).expect("json");
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|source| VmmError::Io {
                what: "QMP".into(),
                source,
            })?;
        loop {
            let v = self.read().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(VmmError::Qmp(format!("{cmd}: {e}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::VmSpec;

    fn plan() -> LaunchPlan {
        LaunchPlan {
            id: "0123456789ab".into(),
            spec: VmSpec {
                vcpu: 2,
                memory_mib: 512,
                disk_bytes: 1 << 30,
            },
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd".into()),
            rootfs: "/i/rootfs.ext4".into(),
            overlay: "/v/overlay.ext4".into(),
            work: "/v/work.ext4".into(),
            cmdline: "console=ttyS0 root=/dev/vda ro".into(),
            console: "/v/console.log".into(),
            run_dir: "/v/run".into(),
            tap: None,
            uid: None,
            clone: false,
        }
    }

    fn cfg(accel: Accel) -> QemuConfig {
        QemuConfig {
            qemu: "qemu-system-x86_64".into(),
            agent_proxy: "bangerd".into(),
            accel,
        }
    }

    #[test]
    fn command_line_shape() {
        let a = qemu_args(&cfg(Accel::Tcg), &plan()).join(" ");
        for part in [
            "-M microvm,rtc=on,pit=on,pic=on",
            "-accel tcg -cpu max",
            "-m 512M -smp 2",
            "-no-reboot",
            "-kernel /k/vmlinuz -initrd /k/initrd",
            "-append console=ttyS0 root=/dev/vda ro",
            "file,id=console,path=/v/console.log,append=on",
            "id=rootfs,file=/i/rootfs.ext4,format=raw,if=none,readonly=on",
            "id=work,file=/v/work.ext4,format=raw,if=none,readonly=off",
            "-device virtio-serial-device,max_ports=2",
            "socket,id=agent,path=/v/run/agent.sock,server=on,wait=off",
            "virtserialport,chardev=agent,name=banger.agent",
            "unix:/v/run/qmp.sock,server=on,wait=off",
        ] {
            assert!(a.contains(part), "missing {part:?} in {a}");
        }
        let root = a.find("id=rootfs").unwrap();
        assert!(root < a.find("id=overlay").unwrap() && root < a.find("id=work").unwrap());
        assert!(!a.contains("-netdev"));
        let mut p = plan();
        p.tap = Some(("bg-x".into(), "06:00:00:00:00:01".into()));
        let a = qemu_args(&cfg(Accel::Kvm), &p).join(" ");
        assert!(a.contains("-accel kvm -cpu host"));
        assert!(a.contains("tap,id=n0,ifname=bg-x,script=no,downscript=no"));
        assert!(a.contains("virtio-net-device,netdev=n0,mac=06:00:00:00:00:01"));
    }

    #[test]
    fn proxy_command_line() {
        assert_eq!(
            proxy_args(Path::new("/v/run")).join(" "),
            "--internal-agent-proxy /v/run/agent.sock /v/run/vsock.sock"
        );
        // No vhost-user: guest memory is QEMU's own (and migratable).
        let a = qemu_args(&cfg(Accel::Tcg), &plan()).join(" ");
        assert!(!a.contains("vhost") && !a.contains("memory-backend"), "{a}");
    }

    #[test]
    fn tsc_khz_is_found_on_this_host() {
        let khz = host_tsc_khz().expect("tsc khz");
        assert!((100_000..10_000_000).contains(&khz), "{khz}");
    }
}
