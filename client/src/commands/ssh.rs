//! ssh into VMs: `banger vm ssh`, `banger ssh-config`, and the hidden `banger __ssh-proxy`.
//!
//! Decisions:
//! - **Transport.** ssh never dials the VM's address: its `ProxyCommand` is
//!   `banger __ssh-proxy <vm>`, which asks the guest agent (over the VM's vsock socket) to
//!   open TCP 127.0.0.1:22 in the guest and splices it with its stdin/stdout. So ssh works
//!   for `--no-network` VMs and needs no root and no route to the bridge.
//! - **Key.** The daemon's key (`daemon.status` names it; see `banger_actors::vm::sshkey`),
//!   which the daemon puts into each guest's `/root/.ssh/authorized_keys`.
//! - **Host keys.** The proxy asks the agent for the guest's host public keys before it
//!   connects and writes them for `<vm>.vm` into banger's own known_hosts
//!   (`$XDG_STATE_HOME/banger/ssh/known_hosts`), replacing older lines for that name (a VM
//!   recreated under the same name has new keys; the agent channel is the trusted one).
//!   ssh then runs with `StrictHostKeyChecking yes` against that file.
//! - **ssh-config.** `banger ssh-config` writes `$XDG_STATE_HOME/banger/ssh/config` (a
//!   `Host *.vm` block) and puts ONE `Include` of it (with a comment line above) at the
//!   top of `~/.ssh/config` — at the top, because an `Include` after a `Host` block would
//!   only apply inside it. Running it again changes nothing; `--uninstall` removes both,
//!   and `~/.ssh/config` itself when nothing else is left in it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_api::DaemonRpcClient;
use banger_guest::host;
use banger_guest::proto::{Request, Response};
use jsonrpsee::async_client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::connect::Target;
use crate::exit::{self, CliError};

const MARK: &str = "# added by `banger ssh-config` (remove with `banger ssh-config --uninstall`)";

fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> CliError {
    CliError::Other(format!("{what}: {e}"))
}

fn home() -> Result<PathBuf, CliError> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| CliError::Other("HOME is not set".into()))
}

/// banger's client-side ssh files: `$XDG_STATE_HOME/banger/ssh` (or `~/.local/state/…`).
pub fn ssh_dir() -> Result<PathBuf, CliError> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(v) => PathBuf::from(v),
        None => home()?.join(".local/state"),
    };
    Ok(base.join("banger/ssh"))
}

fn known_hosts() -> Result<PathBuf, CliError> {
    Ok(ssh_dir()?.join("known_hosts"))
}

/// The daemon's ssh key (private key path).
async fn key_path(client: &Client) -> Result<PathBuf, CliError> {
    let st = client.status().await?;
    st.ssh_key.map(PathBuf::from).ok_or_else(|| {
        CliError::Other(
            "this bangerd does not manage an ssh key (it is older than this banger); restart it"
                .into(),
        )
    })
}

/// `dev.vm` → `dev`.
fn vm_of(host: &str) -> &str {
    host.strip_suffix(".vm").unwrap_or(host)
}

/// Replace `alias`'s lines in a known_hosts text with `keys`.
fn known_hosts_with(existing: &str, alias: &str, keys: &[String]) -> String {
    let mut out: String = existing
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(alias))
        .map(|l| format!("{l}\n"))
        .collect();
    for k in keys {
        // `type base64 [comment]` → `alias type base64`
        let mut parts = k.split_whitespace();
        if let (Some(t), Some(b)) = (parts.next(), parts.next()) {
            out.push_str(&format!("{alias} {t} {b}\n"));
        }
    }
    out
}

fn write_known_hosts(alias: &str, keys: &[String]) -> Result<(), CliError> {
    let path = known_hosts()?;
    let dir = path.parent().expect("a file in a dir");
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir.display(), e))?;
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let text = known_hosts_with(&existing, alias, keys);
    if text != existing {
        let tmp = dir.join(format!(".known_hosts.{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(|e| io_err(tmp.display(), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err(path.display(), e))?;
    }
    Ok(())
}

/// `banger __ssh-proxy <vm>`: learn the guest's host keys, then splice stdin/stdout with
/// its sshd through the agent. Waits (up to 60 s) for sshd while the guest starts it.
pub async fn proxy(client: &Client, host_arg: &str) -> Result<u8, CliError> {
    let vm = vm_of(host_arg);
    let (_, sock) = super::workspace::agent_socket(client, vm).await?;
    let alias = format!("{vm}.vm");
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        let keys: Result<Vec<String>, String> =
            match host::call(&sock, &Request::HostKeys, Duration::from_secs(10)).await {
                Ok(Response::HostKeys { keys }) => Ok(keys),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            };
        let attempt: Result<_, String> = match keys {
            Ok(keys) if !keys.is_empty() => {
                write_known_hosts(&alias, &keys)?;
                host::tcp_connect(&sock, 22)
                    .await
                    .map_err(|e| e.to_string())
            }
            Ok(_) => {
                Err("the guest has no ssh host key yet (is openssh-server in the image?)".into())
            }
            Err(e) => Err(e),
        };
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(CliError::Other(format!(
                    "cannot reach sshd in vm {vm}: {e}; check `banger vm logs {vm}`"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    // Bytes of sshd's banner may already sit in the read buffer.
    let early = stream.buffer().to_vec();
    let (mut rx, mut tx) = stream.into_inner().into_split();
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(&early)
        .await
        .map_err(|e| io_err("stdout", e))?;
    stdout.flush().await.map_err(|e| io_err("stdout", e))?;
    let up = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.shutdown().await;
    });
    let _ = tokio::io::copy(&mut rx, &mut stdout).await;
    let _ = stdout.flush().await;
    up.abort();
    Ok(exit::OK)
}

/// The ProxyCommand: this very banger, with the socket it talks to.
fn proxy_command(target: &Target) -> Result<String, CliError> {
    let exe = std::env::current_exe().map_err(|e| io_err("the banger executable", e))?;
    Ok(format!(
        "\"{}\" --socket \"{}\" __ssh-proxy %n",
        exe.display(),
        target.socket.display()
    ))
}

/// The `ssh` argv for `vm ssh` and `vm run`.
pub async fn ssh_command(
    client: &Client,
    target: &Target,
    vm: &str,
    remote: Option<&str>,
    tty: bool,
) -> Result<std::process::Command, CliError> {
    let key = key_path(client).await?;
    let mut c = std::process::Command::new("ssh");
    c.arg("-i")
        .arg(&key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts()?.display()))
        .arg("-o")
        .arg(format!("HostKeyAlias={vm}.vm"))
        .arg("-o")
        .arg(format!("ProxyCommand={}", proxy_command(target)?))
        .args(["-o", "LogLevel=ERROR", "-l", "root"]);
    if tty {
        c.arg("-t");
    }
    c.arg(format!("{vm}.vm"));
    if let Some(r) = remote {
        c.arg("--").arg(r);
    }
    Ok(c)
}

/// Run ssh to its end; SIGINT goes to ssh (the terminal's process group), not to us.
pub async fn run_ssh(mut c: std::process::Command) -> Result<u8, CliError> {
    let ignore = tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    let status = tokio::task::spawn_blocking(move || c.status())
        .await
        .map_err(|e| io_err("ssh", e))?
        .map_err(|e| io_err("cannot run ssh (install openssh-client)", e))?;
    ignore.abort();
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => exit::FAILURE,
    })
}

/// Quote `argv` for the remote shell, so each argument arrives as given (plain ssh joins
/// them with spaces: `ssh h sh -c 'exit 3'` would run `sh -c exit 3`). POSIX quoting by
/// `shlex`; an argument cannot hold a NUL (argv never does), so quoting cannot fail.
pub fn shell_join(argv: &[String]) -> String {
    shlex::try_join(argv.iter().map(String::as_str)).expect("argv holds no NUL byte")
}

/// `banger vm ssh <vm> [-- cmd]`.
pub async fn vm_ssh(
    client: &Client,
    target: &Target,
    vm: &str,
    cmd: &[String],
) -> Result<u8, CliError> {
    super::workspace::agent_socket(client, vm).await?;
    let remote = (!cmd.is_empty()).then(|| shell_join(cmd));
    let c = ssh_command(client, target, vm, remote.as_deref(), cmd.is_empty()).await?;
    run_ssh(c).await
}

/// The managed `Host *.vm` block.
fn managed_config(key: &Path, known_hosts: &Path, proxy: &str) -> String {
    format!(
        "# managed by banger (`banger ssh-config`); rewritten by it, do not edit\nHost *.vm\n    User root\n    IdentityFile \"{}\"\n    IdentitiesOnly yes\n    UserKnownHostsFile \"{}\"\n    StrictHostKeyChecking yes\n    ProxyCommand {proxy}\n",
        key.display(),
        known_hosts.display()
    )
}

/// `~/.ssh/config` with our Include at the top (None: already there).
fn with_include(existing: &str, include: &str) -> Option<String> {
    if existing.lines().any(|l| l.trim() == include) {
        return None;
    }
    Some(format!("{MARK}\n{include}\n\n{existing}"))
}

/// `~/.ssh/config` without our lines (None: they were not there).
fn without_include(existing: &str, include: &str) -> Option<String> {
    if !existing.lines().any(|l| l.trim() == include) {
        return None;
    }
    let mut out = String::new();
    let mut lines = existing.lines().peekable();
    while let Some(l) = lines.next() {
        if l.trim() == MARK || l.trim() == include {
            // Also drop the blank line we added after the Include.
            if l.trim() == include && lines.peek().is_some_and(|n| n.trim().is_empty()) {
                lines.next();
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    Some(out)
}

/// For `banger doctor`: whether `~/.ssh/config` includes banger's file, and that file
/// exists. (installed, detail)
pub fn doctor_state() -> (bool, String) {
    let (Ok(dir), Ok(home)) = (ssh_dir(), home()) else {
        return (false, "HOME is not set".into());
    };
    let managed = dir.join("config");
    let include = format!("Include \"{}\"", managed.display());
    let user_config = home.join(".ssh/config");
    let included =
        std::fs::read_to_string(&user_config).is_ok_and(|t| t.lines().any(|l| l.trim() == include));
    match (included, managed.is_file()) {
        (true, true) => (
            true,
            format!("{} includes {}", user_config.display(), managed.display()),
        ),
        (true, false) => (
            false,
            format!(
                "{} includes {}, which is missing",
                user_config.display(),
                managed.display()
            ),
        ),
        (false, _) => (
            false,
            format!("{} has no banger Include", user_config.display()),
        ),
    }
}

/// `banger ssh-config [--uninstall]`.
pub async fn ssh_config(
    target: &Target,
    client: Option<&Client>,
    uninstall: bool,
) -> Result<u8, CliError> {
    let dir = ssh_dir()?;
    let managed = dir.join("config");
    let include = format!("Include \"{}\"", managed.display());
    let ssh = home()?.join(".ssh");
    let user_config = ssh.join("config");
    let existing = std::fs::read_to_string(&user_config).unwrap_or_default();
    if uninstall {
        if let Some(text) = without_include(&existing, &include) {
            if text.trim().is_empty() {
                // Nothing but our lines (typically a file `ssh-config` created): gone.
                std::fs::remove_file(&user_config).map_err(|e| io_err(user_config.display(), e))?;
                eprintln!(
                    "removed {} (it held only banger's Include)",
                    user_config.display()
                );
            } else {
                std::fs::write(&user_config, text).map_err(|e| io_err(user_config.display(), e))?;
                eprintln!("removed banger's Include from {}", user_config.display());
            }
        } else {
            eprintln!("{} has no banger Include", user_config.display());
        }
        let _ = std::fs::remove_file(&managed);
        return Ok(exit::OK);
    }
    let client = client.ok_or_else(|| CliError::Other("no daemon".into()))?;
    let key = key_path(client).await?;
    std::fs::create_dir_all(&dir).map_err(|e| io_err(dir.display(), e))?;
    let text = managed_config(&key, &known_hosts()?, &proxy_command(target)?);
    std::fs::write(&managed, text).map_err(|e| io_err(managed.display(), e))?;
    if !ssh.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&ssh)
            .map_err(|e| io_err(ssh.display(), e))?;
    }
    match with_include(&existing, &include) {
        Some(text) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&user_config)
                .map_err(|e| io_err(user_config.display(), e))?;
            f.write_all(text.as_bytes())
                .map_err(|e| io_err(user_config.display(), e))?;
            eprintln!(
                "added `{include}` to {}: `ssh <vm>.vm` works now",
                user_config.display()
            );
        }
        None => eprintln!("{} already includes banger's config", user_config.display()),
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_is_added_once_at_the_top_and_removed_cleanly() {
        let inc = "Include \"/s/banger/ssh/config\"";
        let mine = "Host foo\n    User me\n";
        let added = with_include(mine, inc).unwrap();
        assert!(added.starts_with(MARK), "{added}");
        assert!(added.ends_with(mine));
        assert!(with_include(&added, inc).is_none());
        assert_eq!(without_include(&added, inc).unwrap(), mine);
        assert!(without_include(mine, inc).is_none());
    }

    #[test]
    fn remote_arguments_are_quoted_for_the_shell() {
        let argv: Vec<String> = ["sh", "-c", "exit 3", "it's", "", r#"$HOME `x` \ "q" * ~"#]
            .map(String::from)
            .into();
        let joined = shell_join(&argv);
        assert!(
            joined.starts_with("sh -c "),
            "plain words stay plain: {joined}"
        );
        // What a remote shell makes of the line: the same words, read back by a real `sh`.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("for a in {joined}; do printf '%s\\0' \"$a\"; done"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let words: Vec<String> = out
            .stdout
            .strip_suffix(&[0])
            .unwrap()
            .split(|b| *b == 0)
            .map(|w| String::from_utf8(w.to_vec()).unwrap())
            .collect();
        assert_eq!(words, argv, "{joined}");
    }

    #[test]
    fn known_hosts_lines_for_a_vm_are_replaced() {
        let old = "dev.vm ssh-ed25519 OLD\nother.vm ssh-ed25519 KEEP\n";
        let new = known_hosts_with(old, "dev.vm", &["ssh-ed25519 NEW root@dev".into()]);
        assert_eq!(new, "other.vm ssh-ed25519 KEEP\ndev.vm ssh-ed25519 NEW\n");
        assert_eq!(vm_of("dev.vm"), "dev");
    }
}
