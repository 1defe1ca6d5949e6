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
