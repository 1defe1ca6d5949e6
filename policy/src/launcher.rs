//! The jailer launcher: the helper's sibling confinement for the one operation that cannot
//! run under the helper's own, starting Firecracker's jailer.
//!
//! The jailer must unshare a mount namespace, bind-mount the jail, `pivot_root` into it,
//! `mknod` the devices Firecracker needs, write the cgroup tree and become the VM user.
//! Landlock forbids mount and pivot_root to any process it confines (and a landlock domain
//! is inherited and cannot be left), and the helper's seccomp filter denies them. So the
//! helper forks this process **before** confining itself, and the launcher confines itself
//! differently ([`crate::confine::apply_launcher`]): inherited fds closed, umask 022, only
//! the jailer's capabilities (`profiles/launcher.json`) in every set including bounding,
//! and the `launcher` seccomp filter (the helper's deny-list minus the mount family). No
//! landlock, on purpose and said so in `banger doctor`.
//!
//! It takes only `spawn_jailer`, `expose_vsock` and `clean_jail`, forwarded by the helper after validation
//! and validated again here. The command line comes from the helper's config, the VM id,
//! the VM's limits and the host's cgroup layout as the launcher sees it at each launch
//! ([`crate::jail::jailer_args`], [`crate::cgroup`]); the request names only the VM, its
//! console file, which is opened with the owner's file-system uid (`setfsuid`), so a path
//! the owner could not open itself is refused, and its vCPU and memory limits (bounded).
//! A jail base on a `nodev` mount is refused before anything runs (the jailer's device
//! nodes could not be opened there). Each request runs in a fresh worker, as in the helper.
//!
//! Spawn: the worker forks the jailer's process, which starts a session of its own (so it
//! survives the worker, the helper and bangerd, like a daemonised jailer would, and
//! nothing killing the worker's group reaches it), points stdout and stderr at the console
//! and execs the jailer with an empty environment. A close-on-exec pipe reports a failed
//! exec. The worker then waits (up to [`API_WAIT`]) for Firecracker's API socket and
//! exposes it outside the jail ([`crate::jail::owner`]), killing the jailer if it never
//! comes; the reply is the pid and its start time. The worker then exits, so the jailer
//! is reparented to init, which reaps it.
//!
//! Each VM runs as a uid of its own from the configured range (the request names it and
//! validation checks it): before the exec the VM's writable files in the jail are given
//! to it and the shared ones (rootfs, kernel, initrd) checked to be unwritable by it;
//! `clean_jail` gives the writable ones back to the owner before it removes the jail.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::unistd::{ForkResult, Gid, Uid, fork};

use crate::helper::{Envelope, run_in_worker};
use crate::request::{HelperConfig, JailerConfig, Reply, Request};
use crate::wire::{read_frame, write_frame};

/// The helper's end of its connection to the launcher.
#[derive(Debug)]
pub struct Launcher {
    sock: UnixStream,
    pid: nix::unistd::Pid,
}

impl Launcher {
    /// Fork the launcher. Called by the helper before it confines itself, while it is
    /// still single-threaded and holds every capability.
    pub fn fork(cfg: &HelperConfig) -> std::io::Result<Launcher> {
        let (ours, theirs) = UnixStream::pair()?;
        // SAFETY: the helper is single-threaded here (see `helper::main`).
        match unsafe { fork() }.map_err(std::io::Error::from)? {
            ForkResult::Child => {
                drop(ours);
                // The helper's stdin is its socket to bangerd: the launcher must not keep
                // that open (bangerd would not see the helper go), nor bangerd's stderr.
                if let Ok(null) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                {
                    for fd in 0..=2 {
                        // SAFETY: dup2 onto the standard descriptors of this process.
                        unsafe { nix::libc::dup2(null.as_raw_fd(), fd) };
                    }
                }
                let code = serve(cfg, theirs);
                std::process::exit(code);
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                let mut launcher = Launcher {
                    sock: ours,
                    pid: child,
                };
                // Its first word says whether it confined itself.
                let _ = launcher
                    .sock
                    .set_read_timeout(Some(std::time::Duration::from_secs(10)));
                match read_frame::<Reply>(&mut launcher.sock) {
                    Ok(Some(Reply::Done)) => Ok(launcher),
                    Ok(Some(Reply::Failed { reason })) => Err(std::io::Error::other(reason)),
                    other => Err(std::io::Error::other(format!(
                        "the jailer launcher did not start ({other:?})"
                    ))),
                }
            }
        }
    }

    /// The launcher's socket (kept open across the helper's fd clean-up).
    pub fn fd(&self) -> i32 {
        self.sock.as_raw_fd()
    }

    /// Forward one validated request and wait for its reply.
    pub fn call(&mut self, id: u64, request: &Request) -> Reply {
        let env = Envelope {
            id,
            request: request.clone(),
        };
        let _ = self.sock.set_read_timeout(Some(
            crate::helper::WORKER_TIMEOUT + std::time::Duration::from_secs(5),
        ));
        let gone = |e: String| Reply::WorkerDied {
            reason: format!(
                "the helper's jailer launcher (pid {}) is gone ({e}); restart bangerd",
                self.pid
            ),
        };
        if let Err(e) = write_frame(&mut self.sock, &env) {
            return gone(e.to_string());
        }
        match read_frame::<Reply>(&mut self.sock) {
            Ok(Some(r)) => r,
            Ok(None) => gone("it closed its socket".into()),
            Err(e) => gone(e.to_string()),
        }
    }
}

/// The launcher's life: confine, then serve until the helper closes the socket.
fn serve(cfg: &HelperConfig, mut sock: UnixStream) -> i32 {
    if let Err(e) = crate::confine::apply_launcher(sock.as_raw_fd()) {
        let reason = format!("the jailer launcher: {}", banger_error::error_chain(&e));
        let _ = write_frame(&mut sock, &Reply::Failed { reason });
        return 1;
    }
    if write_frame(&mut sock, &Reply::Done).is_err() {
        return 1;
    }
    loop {
        let env: Envelope = match read_frame(&mut sock) {
            Ok(Some(e)) => e,
            Ok(None) => return 0,
            Err(_) => return 1,
        };
        let reply = match env.request.validate(cfg) {
            Err(r) => Reply::Refused { reason: r.0 },
            Ok(()) => match &env.request {
                Request::SpawnJailer { .. }
                | Request::CleanJail { .. }
                | Request::ExposeVsock { .. } => run_in_worker(cfg, &env.request, execute),
                other => Reply::Refused {
                    reason: format!("the launcher does not do {}", other.op()),
                },
            },
        };
        if write_frame(&mut sock, &reply).is_err() {
            return 1;
        }
    }
}

/// Run a validated launcher request (in a worker).
pub fn execute(cfg: &HelperConfig, req: &Request) -> Reply {
    let Some(j) = &cfg.jailer else {
        return Reply::Refused {
            reason: "no jailer configured".into(),
        };
    };
    let result = match req {
        Request::SpawnJailer {
            vm,
            console,
            vcpu,
            memory_mib,
            uid,
        } => {
            let limits = crate::cgroup::Limits {
                vcpu: *vcpu,
                memory_mib: *memory_mib,
            };
            spawn(cfg, j, vm, console, limits, *uid)
        }
        Request::ExposeVsock { vm } => {
            let instance = crate::jail::instance_dir(&cfg.jail_base, &j.firecracker, vm);
            match crate::jail::owner::expose(
                &instance,
                crate::jail::VSOCK_SOCK,
                j.owner_uid,
                j.socket_gid,
            ) {
                Ok(true) => Ok(Reply::Done),
                Ok(false) => Err(format!(
                    "Firecracker made no {} in the jail {}",
                    crate::jail::VSOCK_SOCK,
                    instance.display()
                )),
                Err(e) => Err(e),
            }
        }
        Request::CleanJail { vm } => clean(cfg, j, vm).map(|()| Reply::Done),
        other => Err(format!("the launcher does not do {}", other.op())),
    };
    result.unwrap_or_else(|reason| Reply::Failed { reason })
}

/// Open `console` for appending with the owner's file-system identity.
fn open_console(j: &JailerConfig, console: &Path) -> Result<OwnedFd, String> {
    let as_owner = |uid: u32, gid: u32| {
        nix::unistd::setfsgid(Gid::from_raw(gid));
        nix::unistd::setfsuid(Uid::from_raw(uid));
    };
    as_owner(j.owner_uid, j.owner_gid);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(console);
    as_owner(0, 0);
    file.map(OwnedFd::from).map_err(|e| {
        format!(
            "cannot open the console {} as the owner: {e}",
            console.display()
        )
    })
}

fn spawn(
    cfg: &HelperConfig,
    j: &JailerConfig,
    vm: &str,
    console: &Path,
    limits: crate::cgroup::Limits,
    uid: u32,
) -> Result<Reply, String> {
    if let Some(problem) = crate::jail::nodev_problem(&cfg.jail_base) {
        return Err(problem);
    }
    let console = open_console(j, console)?;
    let instance = crate::jail::instance_dir(&cfg.jail_base, &j.firecracker, vm);
    crate::jail::owner::hand_over(&instance.join("root"), uid)?;
    // Looked up at each launch, in the launcher's mount namespace (the jailer's).
    let cgroups = crate::cgroup::detect_host();
    let prog = CString::new(j.jailer.as_os_str().as_encoded_bytes())
        .map_err(|_| "the jailer path holds a NUL byte".to_owned())?;
    let mut argv = vec![prog.clone()];
    for a in crate::jail::jailer_args(
        &j.firecracker,
        uid,
        uid,
        &cfg.jail_base,
        vm,
        &cgroups,
        limits,
    ) {
        argv.push(CString::new(a).map_err(|_| "an argument holds a NUL byte".to_owned())?);
    }
    let env: [CString; 0] = [];
    let devnull = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| e.to_string())?;
    // SAFETY: the worker is single-threaded; the child only calls async-signal-safe
    // functions (setsid, dup2, execve, write, _exit) before exec.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            let _ = nix::unistd::setsid();
            // SAFETY: dup2 onto the standard descriptors of this about-to-exec child.
            let ok = unsafe {
                nix::libc::dup2(devnull.as_raw_fd(), 0) == 0
                    && nix::libc::dup2(console.as_raw_fd(), 1) == 1
                    && nix::libc::dup2(console.as_raw_fd(), 2) == 2
            };
            let errno = if ok {
                nix::unistd::execve(&prog, &argv, &env)
                    .err()
                    .map_or(0, |e| e as i32)
            } else {
                nix::errno::Errno::last_raw()
            };
            let _ = nix::unistd::write(&tx, &errno.to_ne_bytes());
            // SAFETY: _exit skips atexit handlers and buffers inherited from the worker.
            unsafe { nix::libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(tx);
            let mut buf = Vec::new();
            let _ = std::fs::File::from(rx).read_to_end(&mut buf);
            if buf.len() >= 4 {
                let _ = nix::sys::wait::waitpid(child, None);
                let errno = i32::from_ne_bytes(buf[..4].try_into().expect("4 bytes"));
                return Err(format!(
                    "cannot run the jailer {}: {}",
                    j.jailer.display(),
                    nix::errno::Errno::from_raw(errno).desc()
                ));
            }
            let start_time = start_time(child.as_raw())
                .ok_or_else(|| format!("the jailer (pid {child}) exited at once"))?;
            wait_and_expose_api(j, &instance, child)?;
            Ok(Reply::Spawned {
                pid: child.as_raw(),
                start_time,
            })
        }
    }
}

/// How long the launcher waits for Firecracker's API socket after the exec.
pub const API_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Wait for the API socket of the jailer `child` and expose it outside the jail. The
/// jailer is ended (and reaped) if it exits first, the wait times out or the socket
/// cannot be exposed: nothing is left running that bangerd could not reach.
fn wait_and_expose_api(
    j: &JailerConfig,
    instance: &Path,
    child: nix::unistd::Pid,
) -> Result<(), String> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let end = |why: String| {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(child, None);
        Err(why)
    };
    let started = std::time::Instant::now();
    loop {
        match crate::jail::owner::expose(instance, crate::jail::API_SOCK, j.owner_uid, j.socket_gid)
        {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return end(e),
        }
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(WaitStatus::Exited(_, code)) => {
                return Err(format!(
                    "the jailer exited with status {code} before Firecracker's API was up (its output is in the VM's console log)"
                ));
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return Err(format!(
                    "the jailer was killed by {sig} before Firecracker's API was up"
                ));
            }
            Ok(_) => {}
            Err(e) => return end(format!("waiting for the jailer: {e}")),
        }
        if started.elapsed() > API_WAIT {
            return end(format!(
                "Firecracker made no API socket in {} within {}s",
                instance.join("root").display(),
                API_WAIT.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Give the VM's writable files back to the owner, then remove the VM's jail (device nodes
/// and folders the jailer made as root included), under whatever exec name it was made,
/// and the cgroup the jailer left behind. Absent is fine.
fn clean(cfg: &HelperConfig, j: &JailerConfig, vm: &str) -> Result<(), String> {
    for dir in crate::jail::instance_dirs(&cfg.jail_base, vm) {
        crate::jail::owner::give_back(
            &dir.join("root"),
            |uid| j.vm_uids.contains(uid) && uid != 0,
            (j.owner_uid, j.owner_gid),
        )?;
        crate::ops::remove_jail_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    crate::cgroup::remove_vm_dirs(&crate::cgroup::detect_host().vm_dirs(vm))
}
