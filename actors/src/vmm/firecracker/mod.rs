//! The Firecracker driver: a jail (or, without the privileged helper, a plain directory),
//! Firecracker, then the HTTP API.
//!
//! Jail layout (the jailer's own convention): `<chroot_base>/<exec name>/<id>/root/`, the
//! exec name being the file name of the canonicalised Firecracker binary (see
//! [`banger_policy::jail`]). Before spawning, the driver hard-links the kernel, initrd and
//! disks into `root/` (same filesystem as banger's data dir; a copy is refused, it would
//! defeat sparse sharing) and creates the log and metrics files Firecracker opens but does
//! not create. Every path sent to the API is relative to `root/`.
//!
//! **Jailed or not.** The jailer needs root: it unshares a mount namespace, bind-mounts
//! and pivots into the jail, mknods `/dev/kvm` and `/dev/net/tun`, writes the cgroup tree
//! and becomes the VM user (Firecracker's `src/jailer/src/{env,chroot}.rs`). So:
//! - with the privileged helper, its launcher starts the jailer, with the VM's cgroup
//!   (`--cgroup` limits from the spec under `--parent-cgroup banger`, in the cgroup version
//!   this host has, see [`banger_policy::cgroup`]);
//! - without it (a bangerd started by hand as a user), Firecracker runs **unjailed**, as a
//!   plain child process the way `firectl` runs it: `firecracker --id <id> --api-sock
//!   <root>/api.sock` with `root/` as its working directory, so the same relative paths
//!   work. No chroot, no per-VM cgroup, bangerd's uid. `vm show` and `doctor` say so.
//!
//! A bare binary name (`firecracker`, the default) is resolved on PATH first: the jailer
//! canonicalises `--exec-file` relative to its own working directory.
//!
//! `--daemonize` is **not** used: the jailer's daemonize points stdio at /dev/null, which
//! would lose the serial console. Instead the process is spawned in its own process group
//! (or session, by the launcher) with stdout/stderr appended to the VM's `console.log`; the
//! jailer execs Firecracker, so the pid we record is Firecracker's, and the process
//! outlives a daemon restart like a daemonized one would.
//!
//! API sequence (each answered 204 by Firecracker): logger, metrics, machine-config,
//! boot-source, drives (rootfs read-only as root device, overlay and work with
//! `cache_type: Writeback` so that a guest fsync reaches the host's disk), network interface
//! (when the VM has a tap), vsock (hybrid, `vsock.sock` in the jail), then InstanceStart.
//!
//! Stopping: Firecracker exits only when its guest **reboots** (`reboot=k` on the command
//! line; the CPU reset ends the process). A guest that powers off or halts leaves the
//! process running with its vCPUs halted (Firecracker's `FAQ.md`: it "lives on"), since
//! it has no power-management device. So the VM actor asks the guest agent to *reboot*
//! (`Driver::guest_halt_ends_vmm` is false here), banger-init turns every shutdown into a
//! reboot, [`request_shutdown`] (when the agent cannot be reached) is `SendCtrlAltDel`,
//! which the guest answers with a reboot (x86-64 only: it needs the guest's i8042 driver),
//! and a guest that powers off anyway (an image's own `poweroff`) is ended by the actor
//! when the kernel prints its power-off line on the console.

#[cfg(feature = "test-double")]
pub mod double;

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use banger_policy::jail::{RESTORE_MEMORY, RESTORE_STATE, SAVE_MEMORY, SAVE_STATE};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::{LaunchPlan, VmmError, tail, wait_for_path};
use crate::net::host::HostNet;
use crate::vm::model::Runtime;
use crate::vm::proc;

/// The guest CID banger gives every VM (each VM has its own hybrid vsock socket).
pub const GUEST_CID: u32 = 3;
/// The API socket inside the jail.
pub const API_SOCK: &str = banger_policy::jail::API_SOCK;
/// The hybrid vsock socket inside the jail.
pub const VSOCK_SOCK: &str = banger_policy::jail::VSOCK_SOCK;

/// Firecracker settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerConfig {
    pub jailer: PathBuf,
    pub firecracker: PathBuf,
    /// `--chroot-base-dir` (under banger's data dir).
    pub chroot_base: PathBuf,
    /// The uids jailed VMs run as, one of its own each (`[firecracker] vm_uids`; the
    /// jailer's `--uid` and `--gid`): see [`allocate_uid`].
    pub vm_uids: banger_policy::UidRange,
    /// The group of the sockets exposed outside the jail (the daemon's socket group), when
    /// it exists. The launcher applies it to jailed VMs; an unjailed VM's are given it
    /// when bangerd is a member.
    pub socket_gid: Option<u32>,
}

/// A uid of `range` for VM `id` that no VM in `used` has: chosen from a hash of the id and
/// probed forward, like the IPv4 lease (`net::lease`). None when every uid is taken.
pub fn allocate_uid(
    range: banger_policy::UidRange,
    id: &str,
    used: &std::collections::HashSet<u32>,
) -> Option<u32> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    let start = (h.finish() % u64::from(range.count.max(1))) as u32;
    (0..range.count)
        .map(|i| range.first + (start + i) % range.count)
        .find(|uid| !used.contains(uid))
}

/// The Firecracker binary: a bare name looked up on PATH (then /usr/sbin, /sbin), a path
/// as given.
pub fn firecracker_binary(c: &FirecrackerConfig) -> PathBuf {
    super::choose::find_program(&c.firecracker).unwrap_or_else(|| c.firecracker.clone())
}

/// `<chroot_base>/<exec name>/<id>/root`, where the jailer makes it (the exec name of the
/// canonicalised binary).
pub fn jail_root(c: &FirecrackerConfig, id: &str) -> PathBuf {
    jail_instance(c, id).join("root")
}

/// `<chroot_base>/<exec name>/<id>`: the jail's `root/` and, beside it, the links to the
/// API and vsock sockets bangerd and its users connect to (see
/// [`banger_policy::jail::owner`]).
pub fn jail_instance(c: &FirecrackerConfig, id: &str) -> PathBuf {
    banger_policy::jail::instance_dir(&c.chroot_base, &firecracker_binary(c), id)
}

/// The jailer's command line for a VM limited to `limits`, on a host with `cgroups` (the
/// launcher builds the same one: [`banger_policy::jail`]).
pub fn jailer_args(
    c: &FirecrackerConfig,
    id: &str,
    uid: u32,
    cgroups: &banger_policy::cgroup::Layout,
    limits: banger_policy::cgroup::Limits,
) -> Vec<String> {
    banger_policy::jail::jailer_args(
        &firecracker_binary(c),
        uid,
        uid,
        &c.chroot_base,
        id,
        cgroups,
        limits,
    )
}

/// What `vm show` says of a Firecracker VM run without the jailer.
pub const UNJAILED: &str = "unjailed: no privileged helper (Firecracker runs as a plain child of bangerd: no chroot, no cgroup of its own, bangerd's uid)";

/// What `vm show` says of a jailed Firecracker VM on a host with `cgroups`; `doctor` too.
/// `uid`: the VM's own, when the text is for one VM.
pub fn jailed(cgroups: &banger_policy::cgroup::Layout, uid: Option<u32>) -> String {
    let uid = uid.map(|u| format!(" as uid {u}")).unwrap_or_default();
    format!(
        "jailed by the helper's launcher{uid}; {}",
        cgroups.describe()
    )
}

fn setup(e: impl std::fmt::Display) -> VmmError {
    VmmError::Setup(e.to_string())
}

/// Hard-link `from` into the jail as `name` (replacing a stale link).
fn link_in(root: &Path, from: &Path, name: &str) -> Result<(), VmmError> {
    let to = root.join(name);
    let _ = std::fs::remove_file(&to);
    std::fs::hard_link(from, &to).map_err(|e| {
        setup(format!(
            "cannot hard-link {} into the jail {}: {e} (banger's data directory and the jail must be on one filesystem)",
            from.display(),
            root.display()
        ))
    })
}

/// Refuse a kernel Firecracker cannot load: its x86-64 loader takes only an ELF vmlinux
/// and answers anything else `Invalid Elf magic number` at InstanceStart. The plan names
/// the kernel record's ELF (see [`crate::image::KernelRecord::firecracker_kernel`]); this
/// catches a file that changed since, before any process is started.
pub fn check_kernel(kernel: &Path) -> Result<(), VmmError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(64);
    std::fs::File::open(kernel)
        .and_then(|f| f.take(64).read_to_end(&mut head))
        .map_err(|e| setup(format!("cannot read the kernel {}: {e}", kernel.display())))?;
    match crate::kernel_format::elf_problem(&head) {
        None => Ok(()),
        Some(problem) => Err(setup(format!(
            "the kernel {} is not an ELF vmlinux ({problem}), the only kind Firecracker boots: re-import the kernel (banger converts a bzImage), or use --vmm qemu",
            kernel.display()
        ))),
    }
}

/// Make the jail and its files. Blocking. `restore`: the directory of a saved state to
/// restore from (see [`save_state`]).
pub fn prepare_jail(
    c: &FirecrackerConfig,
    plan: &LaunchPlan,
    restore: Option<&Path>,
) -> Result<PathBuf, VmmError> {
    check_kernel(&plan.kernel)?;
    let root = jail_root(c, &plan.id);
    // A jail left from an earlier run is rebuilt from scratch.
    if let Some(instance) = root.parent() {
        let _ = std::fs::remove_dir_all(instance);
    }
    std::fs::create_dir_all(&root).map_err(setup)?;
    link_in(&root, &plan.kernel, "vmlinux")?;
    if let Some(initrd) = &plan.initrd {
        link_in(&root, initrd, "initrd")?;
    }
    link_in(&root, &plan.rootfs, "rootfs.ext4")?;
    link_in(&root, &plan.overlay, "overlay.ext4")?;
    link_in(&root, &plan.work, "work.ext4")?;
    for f in ["firecracker.log", "metrics.json"] {
        std::fs::File::create(root.join(f)).map_err(setup)?;
    }
    // The files a suspend fills, made here: once Firecracker runs, its jail is the VM
    // uid's. Private (guest memory); empty until a suspend.
    std::fs::create_dir_all(&plan.run_dir)
        .map_err(|e| setup(format!("{}: {e}", plan.run_dir.display())))?;
    for name in [SAVE_STATE, SAVE_MEMORY] {
        let file = plan.run_dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&file)
            .map_err(|e| setup(format!("{}: {e}", file.display())))?;
        link_in(&root, &file, name)?;
    }
    if let Some(saved) = restore {
        link_in(&root, &saved.join(SAVE_STATE), RESTORE_STATE)?;
        link_in(&root, &saved.join(SAVE_MEMORY), RESTORE_MEMORY)?;
    }
    // The VM's writable files become its uid's in the launcher (`jail::owner::hand_over`),
    // which also refuses shared files the VM could write.
    Ok(root)
}

/// Expose an unjailed Firecracker's socket `name` beside `root/` as the launcher does a
/// jailed one's: 0660, the socket group when bangerd is in it, else its own.
fn expose_unjailed(c: &FirecrackerConfig, id: &str, name: &str) -> Result<(), VmmError> {
    let instance = jail_instance(c, id);
    let uid = nix::unistd::geteuid().as_raw();
    let own = nix::unistd::getegid().as_raw();
    let exposed = c
        .socket_gid
        .and_then(|gid| banger_policy::jail::owner::expose(&instance, name, uid, gid).ok())
        .map_or_else(
            || banger_policy::jail::owner::expose(&instance, name, uid, own),
            Ok,
        )
        .map_err(setup)?;
    if exposed {
        Ok(())
    } else {
        Err(setup(format!(
            "Firecracker made no {name} in {}",
            instance.display()
        )))
    }
}

/// The API requests of a launch, in order: (method, path, body).
pub fn api_sequence(plan: &LaunchPlan) -> Vec<(&'static str, String, Value)> {
    let mut boot = json!({
        "kernel_image_path": "vmlinux",
        "boot_args": plan.cmdline,
    });
    if plan.initrd.is_some() {
        boot["initrd_path"] = json!("initrd");
    }
    // Writable drives (overlay, work) are `Writeback`: the default `Unsafe` does not
    // advertise VirtIO flush, so a guest fsync would never reach the host's disk
    // (`docs/api_requests/block-caching.md`). The read-only root has nothing to flush.
    let drive = |id: &str, file: &str, root: bool, ro: bool| {
        let mut d = json!({
            "drive_id": id,
            "path_on_host": file,
            "is_root_device": root,
            "is_read_only": ro,
        });
        if !ro {
            d["cache_type"] = json!("Writeback");
        }
        d
    };
    let mut seq = vec![
        (
            "PUT",
            "/logger".to_owned(),
            json!({"log_path": "firecracker.log", "level": "Info", "show_level": true, "show_log_origin": false}),
        ),
        (
            "PUT",
            "/metrics".to_owned(),
            json!({"metrics_path": "metrics.json"}),
        ),
        (
            "PUT",
            "/machine-config".to_owned(),
            json!({"vcpu_count": plan.spec.vcpu, "mem_size_mib": plan.spec.memory_mib, "smt": false}),
        ),
        ("PUT", "/boot-source".to_owned(), boot),
        (
            "PUT",
            "/drives/rootfs".to_owned(),
            drive("rootfs", "rootfs.ext4", true, true),
        ),
        (
            "PUT",
            "/drives/overlay".to_owned(),
            drive("overlay", "overlay.ext4", false, false),
        ),
        (
            "PUT",
            "/drives/work".to_owned(),
            drive("work", "work.ext4", false, false),
        ),
    ];
    if let Some((tap, mac)) = &plan.tap {
        seq.push((
            "PUT",
            "/network-interfaces/eth0".to_owned(),
            json!({"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac}),
        ));
    }
    seq.push((
        "PUT",
        "/vsock".to_owned(),
        json!({"guest_cid": GUEST_CID, "uds_path": VSOCK_SOCK}),
    ));
    seq.push((
        "PUT",
        "/actions".to_owned(),
        json!({"action_type": "InstanceStart"}),
    ));
    seq
}

/// Whether the Firecracker whose `--version` line is `line` (`Firecracker v1.13.1`) takes
/// `network_overrides` at a snapshot load (1.12 and later), which a VM restored from
/// another's saved state with a network needs (a warm start, a fork's clone).
pub fn loads_network_overrides(line: &str) -> bool {
    let v = line
        .trim()
        .strip_prefix("Firecracker v")
        .unwrap_or_default();
    let mut parts = v.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (1, 12),
        _ => false,
    }
}

/// The API requests of a restore from the saved state linked into the jail, in order:
/// logger and metrics (allowed before a load), then `PUT /snapshot/load`, resuming the
/// guest. Nothing else: the machine, drives, tap and vsock come from the snapshot, with
/// the paths they had (the jail's layout does not change: drives and vsock are relative
/// paths in it). The tap is the VM's own, except for a clone (`plan.clone`), whose saved
/// state names its source's: `network_overrides` (Firecracker 1.12 and later) gives the
/// load the clone's.
pub fn restore_sequence(plan: &LaunchPlan) -> Vec<(&'static str, String, Value)> {
    let mut seq: Vec<_> = api_sequence(plan)
        .into_iter()
        .filter(|(_, path, _)| path == "/logger" || path == "/metrics")
        .collect();
    let mut load = json!({
        "snapshot_path": RESTORE_STATE,
        "mem_backend": {"backend_type": "File", "backend_path": RESTORE_MEMORY},
        "resume_vm": true,
    });
    if plan.clone
        && let Some((tap, _)) = &plan.tap
    {
        load["network_overrides"] = json!([{"iface_id": "eth0", "host_dev_name": tap}]);
    }
    seq.push(("PUT", "/snapshot/load".to_owned(), load));
    seq
}

/// Save a running VM (`vm suspend`): pause it, `PUT /snapshot/create` (a full snapshot)
/// into the files [`prepare_jail`] linked into the jail, then move those from the VM's
/// `run_dir` into `dir` (a suspend: the VMM is ended next), or copy them when it `run_on`
/// (a snapshot: its next save truncates the same files). Jailed, they stay the owner's
/// and the VM's group writes them (`jail::SAVED`), so bangerd can read them without root.
/// The VM stays paused; the caller ends it, or resumes it (a snapshot, a failure).
pub async fn save_state(
    rt: &Runtime,
    run_dir: &Path,
    dir: &Path,
    run_on: bool,
) -> Result<(), VmmError> {
    set_paused(rt, true).await?;
    let mut api = Api::connect(Path::new(&rt.control_socket)).await?;
    api.call(
        "PUT",
        "/snapshot/create",
        Some(&json!({
            "snapshot_type": "Full",
            "snapshot_path": SAVE_STATE,
            "mem_file_path": SAVE_MEMORY,
        })),
    )
    .await?;
    for name in [SAVE_STATE, SAVE_MEMORY] {
        let (from, to) = (run_dir.join(name), dir.join(name));
        // A VMM that runs on saves into the same jailed files next time (they are hard
        // links in its jail, truncated by each save): copy, so this save stays as it is.
        // One that ends is done with them: move.
        let moved = if run_on {
            let (f, t) = (from.clone(), to.clone());
            tokio::task::spawn_blocking(move || {
                crate::vm::disks::copy_sparse(&f, &t, 0o600).map(drop)
            })
            .await
            .expect("a copy does not panic")
        } else {
            // Private again: jailed, the VM's group could write it (`jail::SAVED`).
            std::fs::rename(&from, &to).and_then(|()| {
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
            })
        };
        moved.map_err(|e| {
            setup(format!(
                "cannot {} the saved {name} into {}: {e}",
                if run_on { "copy" } else { "move" },
                dir.display()
            ))
        })?;
    }
    Ok(())
}

/// A connection to Firecracker's API socket.
pub struct Api {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Api")
    }
}

impl Api {
    pub async fn connect(socket: &Path) -> Result<Api, VmmError> {
        let io_err = |source| VmmError::Io {
            what: format!("the firecracker API at {}", socket.display()),
            source,
        };
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(io_err)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| io_err(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Api { sender })
    }

    /// Send one request; Ok on 2xx, else Firecracker's `fault_message`.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, VmmError> {
        let io_err = |e: hyper::Error| VmmError::Io {
            what: format!("firecracker API {method} {path}"),
            source: std::io::Error::other(e),
        };
        let payload = body
            .map(|b| serde_json::to_vec(b).expect("json"))
            .unwrap_or_default();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "localhost")
            .header("Accept", "application/json");
        if body.is_some() {
            req = req.header("Content-Type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(payload)))
            .expect("valid request");
        self.sender.ready().await.map_err(io_err)?;
        let resp = self.sender.send_request(req).await.map_err(io_err)?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(io_err)?.to_bytes();
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let fault = json
            .as_ref()
            .and_then(|j| j.get("fault_message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(VmmError::Api {
            method: method.into(),
            path: path.into(),
            status,
            fault,
        })
    }
}

/// Launch: jail, jailer, API sequence. With a privileged helper (`host`), the helper's
/// launcher starts the jailer (it needs root; bangerd has dropped to its owner), else
/// bangerd runs Firecracker itself, unjailed (see the module docs).
pub async fn launch(
    c: &FirecrackerConfig,
    plan: &LaunchPlan,
    host: &HostNet,
    stage: &(dyn Fn(&str) + Send + Sync),
) -> Result<Runtime, VmmError> {
    launch_with(c, plan, host, stage, &|_, _| {}).await
}

/// [`launch`], telling `spawned` the process's (pid, start time) as soon as it exists,
/// before it is configured (the VM actor stores it: a daemon killed during the launch
/// leaves no process it does not know of). A failed launch returns once the process is
/// gone.
pub async fn launch_with(
    c: &FirecrackerConfig,
    plan: &LaunchPlan,
    host: &HostNet,
    stage: &(dyn Fn(&str) + Send + Sync),
    spawned: &(dyn Fn(i32, u64) + Send + Sync),
) -> Result<Runtime, VmmError> {
    launch_from(c, plan, None, host, stage, spawned).await
}

/// [`launch_with`] from the state [`save_state`] wrote into `dir`: the same jail, then
/// [`restore_sequence`] instead of the boot. Needs the Firecracker release that saved it.
pub async fn launch_restored(
    c: &FirecrackerConfig,
    plan: &LaunchPlan,
    dir: &Path,
    host: &HostNet,
    stage: &(dyn Fn(&str) + Send + Sync),
    spawned: &(dyn Fn(i32, u64) + Send + Sync),
) -> Result<Runtime, VmmError> {
    for name in [SAVE_STATE, SAVE_MEMORY] {
        if !dir.join(name).is_file() {
            return Err(setup(format!(
                "the saved state has no {name} (in {})",
                dir.display()
            )));
        }
    }
    launch_from(c, plan, Some(dir), host, stage, spawned).await
}

async fn launch_from(
    c: &FirecrackerConfig,
    plan: &LaunchPlan,
    restore: Option<&Path>,
    host: &HostNet,
    stage: &(dyn Fn(&str) + Send + Sync),
    spawned: &(dyn Fn(i32, u64) + Send + Sync),
) -> Result<Runtime, VmmError> {
    stage("jail");
    let privileged = host.privileged().await;
    if privileged {
        // A jail left by an earlier run is the VM uid's: only the helper can clear it.
        host.clean_jail(&plan.id).await.map_err(setup)?;
    }
    let root = {
        let (c, plan, restore) = (c.clone(), plan.clone(), restore.map(Path::to_owned));
        tokio::task::spawn_blocking(move || prepare_jail(&c, &plan, restore.as_deref()))
            .await
            .map_err(setup)??
    };
    stage("launch");
    let isolation = if privileged {
        // The launcher checks too; here the error reaches the user before any process.
        if let Some(problem) = banger_policy::jail::nodev_problem(&c.chroot_base) {
            return Err(setup(problem));
        }
        jailed(&banger_policy::cgroup::detect_host(), plan.uid)
    } else {
        UNJAILED.to_owned()
    };
    let instance = jail_instance(c, &plan.id);
    let (pid, start) = if privileged {
        let uid = plan
            .uid
            .ok_or_else(|| setup("the VM has no uid of its own to run as"))?;
        host.spawn_jailer(
            &plan.id,
            &plan.console,
            plan.spec.vcpu,
            plan.spec.memory_mib,
            uid,
        )
        .await
        .map_err(|e| VmmError::Spawn {
            what: format!(
                "the jailer {} ({})",
                c.jailer.display(),
                super::tail(&plan.console, 5)
            ),
            source: std::io::Error::other(e),
        })?
    } else {
        let binary = firecracker_binary(c);
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&plan.console)
            .map_err(setup)?;
        let console2 = console.try_clone().map_err(setup)?;
        proc::spawn(
            Command::new(&binary)
                .arg("--id")
                .arg(&plan.id)
                .arg("--api-sock")
                .arg(root.join(API_SOCK))
                .current_dir(&root)
                .stdout(Stdio::from(console))
                .stderr(Stdio::from(console2)),
        )
        .map_err(|source| VmmError::Spawn {
            what: format!("firecracker {}", binary.display()),
            source,
        })?
    };
    spawned(pid, start);
    // Jailed, the launcher exposed the API socket before it answered; unjailed, the same
    // is done here once Firecracker has made it.
    let api_sock = instance.join(API_SOCK);
    let result = async {
        if !privileged {
            wait_for_path(
                &root.join(API_SOCK),
                "the firecracker API socket",
                Duration::from_secs(10),
                || proc::alive(pid, start),
                || tail(&plan.console, 5),
            )
            .await?;
            expose_unjailed(c, &plan.id, API_SOCK)?;
        }
        stage("configure");
        let mut api = super::connect_when_listening(
            Duration::from_secs(10),
            || proc::alive(pid, start),
            || Api::connect(&api_sock),
        )
        .await?;
        let sequence = match restore {
            Some(_) => restore_sequence(plan),
            None => api_sequence(plan),
        };
        for (method, path, body) in sequence {
            match path.as_str() {
                "/actions" => stage("boot"),
                "/snapshot/load" => stage("restore"),
                _ => {}
            }
            api.call(method, &path, Some(&body)).await?;
            if path == "/vsock" || path == "/snapshot/load" {
                // Bound by `PUT /vsock`; reached from outside the jail like the API.
                if privileged {
                    host.expose_vsock(&plan.id).await.map_err(setup)?;
                } else {
                    expose_unjailed(c, &plan.id, VSOCK_SOCK)?;
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        // The jailer may still be root here (it becomes the VM user just before Firecracker
        // runs): `host` goes through the helper when our uid may not signal it.
        host.signal(pid, start, nix::sys::signal::Signal::SIGKILL)
            .await;
        if !proc::wait_gone(pid, start, Duration::from_secs(5)).await {
            tracing::warn!(vm = %plan.id, pid, "the failed launch's firecracker did not end");
        }
        return Err(e);
    }
    Ok(Runtime {
        pid,
        start_time: start,
        helpers: Vec::new(),
        control_socket: api_sock.display().to_string(),
        vsock_socket: instance.join(VSOCK_SOCK).display().to_string(),
        isolation: Some(isolation),
    })
}

/// SendCtrlAltDel.
pub async fn request_shutdown(rt: &Runtime) -> Result<(), VmmError> {
    let mut api = Api::connect(Path::new(&rt.control_socket)).await?;
    api.call(
        "PUT",
        "/actions",
        Some(&json!({"action_type": "SendCtrlAltDel"})),
    )
    .await
    .map(drop)
}

// Pause and resume (see `Driver::pause`; Firecracker's `docs/api_requests/patch-vm.md`).

/// `PATCH /vm {"state": "Paused" | "Resumed"}`, allowed once the guest has started.
/// Firecracker answers 204 to a pause of a paused VM and a resume of a running one.
pub async fn set_paused(rt: &Runtime, paused: bool) -> Result<(), VmmError> {
    let mut api = Api::connect(Path::new(&rt.control_socket)).await?;
    let state = if paused { "Paused" } else { "Resumed" };
    api.call("PATCH", "/vm", Some(&json!({ "state": state })))
        .await
        .map(drop)
}

/// `GET /` (InstanceInfo): `state` is "Not started", "Running" or "Paused".
pub async fn is_paused(rt: &Runtime) -> Result<bool, VmmError> {
    let mut api = Api::connect(Path::new(&rt.control_socket)).await?;
    let info = api.call("GET", "/", None).await?;
    Ok(info
        .as_ref()
        .and_then(|i| i.get("state"))
        .and_then(Value::as_str)
        == Some("Paused"))
}

/// Remove the VM's jail, under whatever exec name it was made (what this uid can: a jail
/// the jailer made as root is the helper's to remove).
pub fn cleanup(c: &FirecrackerConfig, id: &str) {
    for instance in banger_policy::jail::instance_dirs(&c.chroot_base, id) {
        let _ = std::fs::remove_dir_all(instance);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn network_overrides_come_with_1_12() {
        for (line, takes) in [
            ("Firecracker v1.13.1", true),
            ("Firecracker v1.12.0", true),
            ("Firecracker v2.0.0-dev", true),
            ("Firecracker v1.11.4", false),
            ("Firecracker v1.10.0", false),
            ("firecracker 1.13", false),
            ("", false),
        ] {
            assert_eq!(loads_network_overrides(line), takes, "{line}");
        }
    }

    use super::*;
    use banger_api::VmSpec;

    pub(crate) fn plan(dir: &Path) -> LaunchPlan {
        LaunchPlan {
            id: "0123456789ab".into(),
            spec: VmSpec {
                vcpu: 2,
                memory_mib: 512,
                disk_bytes: 1 << 30,
            },
            kernel: dir.join("vmlinux"),
            initrd: None,
            rootfs: dir.join("rootfs.ext4"),
            overlay: dir.join("overlay.ext4"),
            work: dir.join("work.ext4"),
            cmdline: "console=ttyS0".into(),
            console: dir.join("console.log"),
            run_dir: dir.join("run"),
            tap: Some(("bg-0123456789ab".into(), "06:00:ac:1e:00:05".into())),
            uid: Some(2_000_000_001),
            clone: false,
        }
    }

    /// VM uids come from the range, one per VM, spread by id and probed past the taken.
    #[test]
    fn each_vm_gets_a_uid_of_its_own_from_the_range() {
        let range = banger_policy::UidRange {
            first: 5000,
            count: 3,
        };
        let mut used = std::collections::HashSet::new();
        for id in ["a", "b", "c"] {
            let uid = allocate_uid(range, id, &used).unwrap();
            assert!(range.contains(uid), "{uid}");
            assert!(used.insert(uid), "{uid} given twice");
        }
        assert_eq!(allocate_uid(range, "d", &used), None, "all taken");
        // The same id gets the same uid while it is free.
        let empty = std::collections::HashSet::new();
        assert_eq!(
            allocate_uid(range, "a", &empty),
            allocate_uid(range, "a", &empty)
        );
    }

    #[test]
    fn jailer_command_line() {
        let c = FirecrackerConfig {
            jailer: "/usr/bin/jailer".into(),
            firecracker: "/usr/bin/firecracker".into(),
            chroot_base: "/var/lib/banger/jail".into(),
            vm_uids: banger_policy::UidRange {
                first: 900,
                count: 10,
            },
            socket_gid: None,
        };
        let none = banger_policy::cgroup::Layout::None { why: "x".into() };
        let limits = banger_policy::cgroup::Limits {
            vcpu: 1,
            memory_mib: 128,
        };
        let args = jailer_args(&c, "abc", 905, &none, limits);
        assert_eq!(
            args.join(" "),
            "--id abc --exec-file /usr/bin/firecracker --uid 905 --gid 905 --chroot-base-dir /var/lib/banger/jail -- --api-sock /api.sock"
        );
        assert_eq!(
            jail_root(&c, "abc"),
            PathBuf::from("/var/lib/banger/jail/firecracker/abc/root")
        );
    }

    /// A bare name (the config's default `firecracker`) is resolved on PATH before it
    /// reaches the jailer, which would canonicalise it relative to its working directory,
    /// or the unjailed spawn. (`sh` stands in for a binary every PATH has.)
    #[test]
    fn a_bare_binary_name_is_resolved_on_path_first() {
        let c = FirecrackerConfig {
            jailer: "/usr/bin/jailer".into(),
            firecracker: "sh".into(),
            chroot_base: "/j".into(),
            vm_uids: banger_policy::UidRange { first: 1, count: 1 },
            socket_gid: None,
        };
        let resolved = firecracker_binary(&c);
        assert!(
            resolved.is_absolute() && resolved.ends_with("sh"),
            "{resolved:?}"
        );
        let none = banger_policy::cgroup::Layout::None { why: "x".into() };
        let limits = banger_policy::cgroup::Limits {
            vcpu: 1,
            memory_mib: 128,
        };
        let args = jailer_args(&c, "abc", 1, &none, limits);
        assert_eq!(args[3], resolved.display().to_string(), "{args:?}");
        // The jail is named after what the name resolves to (sh may link to dash).
        let name = banger_policy::jail::exec_name(&resolved);
        assert_eq!(
            jail_root(&c, "abc"),
            Path::new("/j").join(name).join("abc/root")
        );
    }

    #[test]
    fn every_request_of_a_launch_conforms_to_the_published_spec() {
        let dir = tempfile::tempdir().unwrap();
        let seq = api_sequence(&plan(dir.path()));
        assert_eq!(
            seq.last().unwrap().1,
            "/actions",
            "InstanceStart comes last"
        );
        // The newest spec and that of the oldest release banger supports.
        for spec in [double::Spec::load(), double::Spec::oldest()] {
            for (method, path, body) in &seq {
                spec.validate(method, path, Some(body))
                    .unwrap_or_else(|e| panic!("v{}: {method} {path}: {e}", spec.version()));
            }
        }
    }

    /// A clone's restore renames the tap its saved state names to its own
    /// (`network_overrides`, in the newest spec, unknown to the oldest release, which
    /// refuses it: forks need Firecracker 1.12); a VM's own restore does not send it.
    #[test]
    fn a_clone_s_restore_gives_the_load_its_own_tap() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = plan(dir.path());
        let load = |p: &LaunchPlan| restore_sequence(p).pop().unwrap();
        assert_eq!(load(&p).2.get("network_overrides"), None);
        p.clone = true;
        let (method, path, body) = load(&p);
        assert_eq!(
            body["network_overrides"],
            json!([{"iface_id": "eth0", "host_dev_name": "bg-0123456789ab"}])
        );
        double::Spec::load()
            .validate(method, &path, Some(&body))
            .unwrap();
        assert!(
            double::Spec::oldest()
                .validate(method, &path, Some(&body))
                .is_err()
        );
    }

    /// The whole launch sequence against the double answering as the oldest supported
    /// release: all accepted, and the writable drives advertise flush (`Writeback`), so a
    /// guest fsync on them reaches the host's disk.
    #[tokio::test]
    async fn a_launch_passes_the_oldest_release_and_writable_drives_flush() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(
            root.join("vmlinux"),
            crate::kernel_format::fixture::minimal_elf(4096),
        )
        .unwrap();
        for f in [
            "rootfs.ext4",
            "overlay.ext4",
            "work.ext4",
            "firecracker.log",
            "metrics.json",
        ] {
            std::fs::write(root.join(f), b"").unwrap();
        }
        let socket = dir.path().join("api.sock");
        let options = double::Options {
            release: double::Release::Oldest,
            ..Default::default()
        };
        let fc = double::FirecrackerDouble::start_with(&socket, Some(&root), options)
            .await
            .unwrap();
        assert_eq!(fc.version(), double::OLDEST_SUPPORTED);
        let mut api = Api::connect(&socket).await.unwrap();
        for (method, path, body) in api_sequence(&plan(dir.path())) {
            api.call(method, &path, Some(&body))
                .await
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        }
        assert_eq!(fc.violations(), Vec::<String>::new());
        assert_eq!(fc.state(), double::DoubleState::Running);
        assert_eq!(fc.flush_advertised("overlay"), Some(true));
        assert_eq!(fc.flush_advertised("work"), Some(true));
        assert_eq!(fc.flush_advertised("rootfs"), Some(false), "read-only");
        fc.shutdown().await;
    }
}
