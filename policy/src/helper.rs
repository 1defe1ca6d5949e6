//! The helper process: `bangerd __helper <config-json>` with its socket to bangerd as
//! stdin. It confines itself ([`crate::confine`]), says hello with the confinement the
//! kernel reports, then serves requests one at a time. Each validated request runs in a
//! fresh forked worker (which inherits the confinement), so a crash or a hang in one
//! privileged operation fails that request with [`Reply::WorkerDied`] and the next request
//! gets a clean process: the helper restarts its work without needing privileges it no
//! longer has to respawn itself.

#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use serde::{Deserialize, Serialize};

use banger_error::error_chain;

use crate::launcher::Launcher;
use crate::request::{Confinement, HelperConfig, Reply, Request};
use crate::wire::{read_frame, write_frame};

/// How long one privileged operation may take before its worker is killed.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(30);

/// The argument that makes bangerd run as the helper.
pub const HELPER_ARG: &str = "__helper";
/// The argument that makes bangerd run the helper's self-test (see [`selftest`]).
pub const SELFTEST_ARG: &str = "__helper-selftest";

/// From bangerd to the helper.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    pub request: Request,
}

/// From the helper to bangerd.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Sent once, after confinement: the helper is ready.
    Hello {
        confinement: Confinement,
    },
    /// Sent instead of `Hello` when the helper cannot start.
    Fatal {
        reason: String,
    },
    Answer {
        id: u64,
        reply: Reply,
    },
}

/// Entry point of `bangerd __helper <config-json>`.
pub fn main(config_json: &str) -> ExitCode {
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return ExitCode::from(2);
    };
    let mut sock = UnixStream::from(fd);
    let fatal = |sock: &mut UnixStream, reason: String| {
        let _ = write_frame(sock, &Message::Fatal { reason });
        ExitCode::FAILURE
    };
    let cfg: HelperConfig = match serde_json::from_str(config_json) {
        Ok(c) => c,
        Err(e) => return fatal(&mut sock, format!("bad helper config: {e}")),
    };
    if let Err(e) = cfg.validate() {
        return fatal(&mut sock, format!("bad helper config: {e}"));
    }
    if !nix::unistd::geteuid().is_root() {
        return fatal(&mut sock, "the helper must start as root".into());
    }
    // The launcher is forked before the helper confines itself: it needs what the helper's
    // confinement takes away (see `launcher`).
    let mut launcher = match cfg.jailer {
        None => None,
        Some(_) => match Launcher::fork(&cfg) {
            Ok(l) => Some(l),
            Err(e) => return fatal(&mut sock, format!("cannot start the jailer launcher: {e}")),
        },
    };
    let mut keep = vec![sock.as_raw_fd()];
    keep.extend(launcher.as_ref().map(Launcher::fd));
    if let Err(e) = crate::confine::apply(&cfg.state_dirs, &keep) {
        return fatal(&mut sock, error_chain(&e));
    }
    if write_frame(
        &mut sock,
        &Message::Hello {
            confinement: crate::confine::report(),
        },
    )
    .is_err()
    {
        return ExitCode::FAILURE;
    }
    serve(&cfg, &mut sock, launcher.as_mut())
}

/// What [`selftest`] saw, printed as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct SelfTest {
    pub confinement: Confinement,
    /// Opening `outside` (a path outside every landlock rule) for reading: the error, or
    /// "allowed".
    pub open_outside: String,
    /// Creating a file in the first state directory: "ok" or the error.
    pub write_state_dir: String,
    /// `keyctl` (session keyring id), a call the seccomp profile denies: EPERM under the
    /// filter, success (UnknownErrno 0) or ENOKEY without it. The errno name.
    pub denied_syscall: String,
    /// The raw errno of that call.
    pub denied_errno: i32,
}

/// `bangerd __helper-selftest <config-json> <outside-path>`: apply exactly the helper's
/// confinement, then probe it from inside, and print what happened as JSON. Used by
/// `banger doctor` and the tests to prove the confinement is in force on this host.
pub fn selftest(config_json: &str, outside: &str) -> ExitCode {
    let cfg: HelperConfig = match serde_json::from_str(config_json) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "bad helper config: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = crate::confine::apply(&cfg.state_dirs, &[]) {
        let _ = writeln!(std::io::stderr(), "confinement failed: {}", error_chain(&e));
        return ExitCode::FAILURE;
    }
    let open_outside = match std::fs::File::open(outside) {
        Ok(_) => "allowed".to_owned(),
        Err(e) => format!(
            "{:?}",
            nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0))
        ),
    };
    let probe = cfg.state_dirs[0].join(".helper-selftest");
    let write_state_dir = match std::fs::write(&probe, b"ok") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            "ok".to_owned()
        }
        Err(e) => e.to_string(),
    };
    // keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0) needs no capability and
    // succeeds (or fails with ENOKEY) anywhere seccomp does not deny it.
    // SAFETY: a keyctl query with integer arguments only; it reads no memory of ours.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_keyctl, 0, -3i64, 0) };
    let errno = if rc >= 0 {
        0
    } else {
        nix::errno::Errno::last_raw()
    };
    let report = SelfTest {
        confinement: crate::confine::report(),
        open_outside,
        write_state_dir,
        denied_syscall: format!("{:?}", nix::errno::Errno::from_raw(errno)),
        denied_errno: errno,
    };
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        serde_json::to_string(&report).expect("report serialises")
    );
    ExitCode::SUCCESS
}

fn serve(
    cfg: &HelperConfig,
    sock: &mut UnixStream,
    mut launcher: Option<&mut Launcher>,
) -> ExitCode {
    loop {
        let env: Envelope = match read_frame(sock) {
            Ok(Some(e)) => e,
            // bangerd closed its end: it is going away, and so is the helper.
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // A malformed request: say so (id unknown) and keep serving.
                let _ = write_frame(
                    sock,
                    &Message::Answer {
                        id: 0,
                        reply: Reply::Refused {
                            reason: format!("malformed request: {e}"),
                        },
                    },
                );
                continue;
            }
            Err(_) => return ExitCode::FAILURE,
        };
        let reply = match (
            env.request.validate(cfg),
            &env.request,
            launcher.as_deref_mut(),
        ) {
            (Err(refusal), _, _) => Reply::Refused { reason: refusal.0 },
            // The jailer's work needs the launcher's confinement, not the helper's.
            (
                Ok(()),
                Request::SpawnJailer { .. }
                | Request::CleanJail { .. }
                | Request::ExposeVsock { .. },
                Some(l),
            ) => l.call(env.id, &env.request),
            (Ok(()), _, _) => run_in_worker(cfg, &env.request, crate::ops::execute),
        };
        if write_frame(sock, &Message::Answer { id: env.id, reply }).is_err() {
            return ExitCode::FAILURE;
        }
    }
}

/// Run one request in a forked worker (`execute` in the child) and collect its reply.
pub(crate) fn run_in_worker(
    cfg: &HelperConfig,
    req: &Request,
    execute: fn(&HelperConfig, &Request) -> Reply,
) -> Reply {
    let (mut rx, mut tx) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            return Reply::Failed {
                reason: format!("socketpair: {e}"),
            };
        }
    };
    // SAFETY: the helper is single-threaded (it starts no threads and neli's plain socket
    // handle spawns none), so the child may run arbitrary code after fork.
    match unsafe { fork() } {
        Err(e) => Reply::Failed {
            reason: format!("fork: {e}"),
        },
        Ok(ForkResult::Child) => {
            drop(rx);
            // Its own process group, so whatever it runs goes with it (see below).
            let _ =
                nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
            let reply = execute(cfg, req);
            let code = if write_frame(&mut tx, &reply).is_ok() {
                0
            } else {
                1
            };
            let _ = tx.flush();
            std::process::exit(code);
        }
        Ok(ForkResult::Parent { child }) => {
            drop(tx);
            let _ = rx.set_read_timeout(Some(WORKER_TIMEOUT));
            let started = Instant::now();
            let mut buf = Vec::new();
            let read = rx.read_to_end(&mut buf);
            let timed_out = read.is_err() && started.elapsed() >= WORKER_TIMEOUT;
            if timed_out {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            }
            let status = waitpid(child, None::<WaitPidFlag>);
            // Nothing a worker started may outlive it (a hung `nft`, say).
            let _ = nix::sys::signal::killpg(child, nix::sys::signal::Signal::SIGKILL);
            let reply: Option<Reply> = read_frame(&mut buf.as_slice()).ok().flatten();
            match (reply, status) {
                (Some(r), Ok(WaitStatus::Exited(_, 0))) => r,
                (_, _) if timed_out => Reply::WorkerDied {
                    reason: format!(
                        "the {} operation did not finish within {}s and was killed",
                        req.op(),
                        WORKER_TIMEOUT.as_secs()
                    ),
                },
                (_, Ok(WaitStatus::Signaled(_, sig, _))) => Reply::WorkerDied {
                    reason: format!("the helper's worker for {} was killed by {sig}", req.op()),
                },
                (_, status) => Reply::WorkerDied {
                    reason: format!(
                        "the helper's worker for {} ended without an answer ({status:?})",
                        req.op()
                    ),
                },
            }
        }
    }
}
