//! `banger daemon status|start|stop|socket`.

use std::time::{Duration, Instant};

use banger_api::DaemonRpcClient;

use crate::cli::{DaemonCmd, SystemCmd};
use crate::connect::{self, Target};
use crate::exit::{self, CliError};
use crate::render;

pub async fn run(target: &Target, cmd: DaemonCmd) -> Result<u8, CliError> {
    match cmd {
        DaemonCmd::Status { json } => status(target, json).await,
        DaemonCmd::Start => {
            let client = connect::connect_or_start(target).await?;
            let s = client.status().await?;
            outln!(
                "bangerd {} is running (pid {}, socket {})",
                s.version,
                s.pid,
                s.socket
            );
            Ok(exit::OK)
        }
        DaemonCmd::Stop => stop(target).await,
        // `banger daemon install|uninstall|restart` are `banger system …`.
        DaemonCmd::Install(a) => super::system::run(SystemCmd::Install(a)).await,
        DaemonCmd::Uninstall(a) => super::system::run(SystemCmd::Uninstall(a)).await,
        DaemonCmd::Restart => restart(target).await,
        DaemonCmd::Logs { follow, tail } => logs(target, follow, tail).await,
        DaemonCmd::Socket { json } => {
            let path = target.socket.display().to_string();
            if json {
                render::json(&serde_json::json!({ "socket": path, "system": target.system }))?;
            } else {
                outln!("{path}");
            }
            Ok(exit::OK)
        }
    }
}

async fn status(target: &Target, json: bool) -> Result<u8, CliError> {
    let client = match connect::connect(target).await {
        Ok(c) => c,
        Err(CliError::NotRunning { socket }) => {
            if json {
                render::json(&serde_json::json!({ "running": false, "socket": socket }))?;
            } else {
                outln!(
                    "bangerd is not running (socket {socket}); it starts on first use, or with `banger daemon start`"
                );
            }
            return Ok(exit::UNAVAILABLE);
        }
        Err(e) => return Err(e),
    };
    let s = client.status().await?;
    if json {
        let mut v = serde_json::to_value(&s).map_err(|e| CliError::Other(e.to_string()))?;
        v["running"] = serde_json::Value::Bool(true);
        render::json(&v)?;
        return Ok(exit::OK);
    }
    outln!(
        "bangerd {} (commit {}, built {}) is running",
        s.version,
        s.commit,
        s.build_time
    );
    outln!("  pid:     {}", s.pid);
    outln!(
        "  mode:    {}",
        serde_json::to_value(s.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    );
    outln!("  socket:  {}", s.socket);
    outln!("  log:     {}", s.log_path);
    outln!("  uptime:  {}", render::duration(s.uptime_secs));
    outln!(
        "  store:   {} (schema v{}, id {}, {} starts)",
        s.store.path,
        s.store.schema_version,
        s.store.instance_id,
        s.store.starts
    );
    Ok(exit::OK)
}

/// `banger daemon restart`: whichever daemon serves the socket. The system service is
/// restarted through systemd (`banger system restart`); a user daemon is stopped and
/// started again as on first use; with none running, one is started (as `systemctl
/// restart` starts a stopped unit).
async fn restart(target: &Target) -> Result<u8, CliError> {
    if target.system {
        return super::system::run(SystemCmd::Restart).await;
    }
    let old = match connect::connect(target).await {
        Ok(c) => Some(c.status().await?.pid),
        Err(CliError::NotRunning { .. }) => None,
        Err(e) => return Err(e),
    };
    if old.is_some() {
        stop_quietly(target).await?;
    }
    let client = connect::connect_or_start(target).await?;
    let s = client.status().await?;
    match old {
        Some(old) => outln!(
            "bangerd restarted: pid {old} stopped, bangerd {} (pid {}) answers on {}",
            s.version,
            s.pid,
            s.socket
        ),
        None => outln!(
            "bangerd was not running; bangerd {} (pid {}) answers on {}",
            s.version,
            s.pid,
            s.socket
        ),
    }
    Ok(exit::OK)
}

async fn stop(target: &Target) -> Result<u8, CliError> {
    match stop_quietly(target).await? {
        Some(pid) => outln!("bangerd (pid {pid}) stopped"),
        None => outln!("bangerd is not running"),
    }
    Ok(exit::OK)
}

/// Stop the daemon on `target` and wait until it is gone; its pid, or None when none ran.
async fn stop_quietly(target: &Target) -> Result<Option<u32>, CliError> {
    let client = match connect::connect(target).await {
        Ok(c) => c,
        Err(CliError::NotRunning { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    // Its pid first: a daemon that stops may close the connection before its answer to
    // `stop` is written, which is not a failure to stop.
    let pid = client.status().await?.pid;
    let pid = match client.stop().await {
        Ok(ack) => ack.pid,
        Err(jsonrpsee::core::client::Error::RestartNeeded(_)) => pid,
        Err(e) => return Err(e.into()),
    };
    drop(client);
    // Wait for the process to be gone (its lock and store released), not just the socket.
    let deadline = Instant::now() + Duration::from_secs(20);
    while target.socket.exists() || alive(pid) {
        if Instant::now() > deadline {
            return Err(CliError::Other(format!(
                "bangerd (pid {pid}) was asked to stop but is still running after 20s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Some(pid))
}

/// Whether `pid` is a live process (a zombie waiting to be reaped counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

/// Where bangerd writes its log: as the running daemon says (its `log_dir` may be
/// configured), else the default for this target (none is started to ask).
async fn log_path(target: &Target) -> std::path::PathBuf {
    if let Ok(client) = connect::connect(target).await
        && let Ok(s) = client.status().await
    {
        return s.log_path.into();
    }
    if target.system {
        return "/var/log/banger/bangerd.log".into();
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".local/state")))
        .unwrap_or_else(|| "/tmp".into());
    state.join("banger/bangerd.log")
}

/// `banger daemon logs [-f] [--tail N]`: bangerd's log file, as `tail [-f] -n N` would.
async fn logs(target: &Target, follow: bool, tail: Option<usize>) -> Result<u8, CliError> {
    use std::io::{Read, Seek, SeekFrom};
    let path = log_path(target).await;
    let mut file = std::fs::File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CliError::Rpc {
                code: banger_api::codes::NOT_FOUND,
                message: format!(
                    "{}: no daemon log yet (bangerd writes it once it starts)",
                    path.display()
                ),
            }
        } else {
            CliError::Other(format!("{}: {e}", path.display()))
        }
    })?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)
        .map_err(|e| CliError::Other(format!("{}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&text);
    match tail {
        Some(n) => out!("{}", super::vm::last_lines(&text, n)),
        None => out!("{text}"),
    }
    if !follow {
        return Ok(exit::OK);
    }
    let mut pos = file.stream_position().unwrap_or(0);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Polled, as `tail -f` does without inotify: a rotated or truncated log is read
        // again from its start.
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            if let Ok(f) = std::fs::File::open(&path) {
                file = f;
            }
            pos = 0;
        }
        let _ = file.seek(SeekFrom::Start(pos));
        match file.read(&mut buf) {
            Ok(0) | Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            Ok(n) => {
                pos += n as u64;
                render::stdout_bytes(&buf[..n]);
            }
        }
    }
}
