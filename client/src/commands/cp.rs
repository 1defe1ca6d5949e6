//! `banger vm cp SRC DST` (and `banger cp`): files and directories between the host and a
//! running VM, with `docker cp`'s rules. One side is `VM:PATH` (the VM by name or ID), the
//! other a host path or `-` (a tar stream on stdin or stdout).
//!
//! - A DST that is a directory (or ends with `/`) receives SRC inside it, under SRC's
//!   name; any other DST is SRC's new name (its parent must exist in the guest for a
//!   copy in; it is made on the host for a copy out of a directory).
//! - `SRC/.` copies a directory's content rather than the directory.
//!
//! Everything travels as tar through the guest agent, the CLI talking to it directly as
//! `vm exec` does: `TarIn` unpacks into a guest directory, `TarOut` packs one, `FileGet`
//! reads one file. Whether a guest path is a directory is asked with a `test -d` exec.
//! Modes and times are kept; owners are kept in the guest (its agent runs as root), not on
//! the host unless banger runs as root.

use std::path::{Path, PathBuf};

use banger_api::{VmState, codes};
use banger_guest::host;
use banger_guest::proto::{self, ExecRequest, ExitStatus, Kind, Request, Response};
use jsonrpsee::async_client::Client;

use crate::exit::{self, CliError};

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    Host(PathBuf),
    /// `-`: a tar stream on stdin (SRC) or stdout (DST).
    Stdio,
    Guest {
        vm: String,
        path: String,
    },
}

/// `VM:PATH` is a guest path when the part before the first `:` is a plausible VM name or
/// ID (no `/`, as docker decides); anything else is a host path. Pure.
pub fn side(s: &str) -> Side {
    if s == "-" {
        return Side::Stdio;
    }
    if let Some((vm, path)) = s.split_once(':')
        && !vm.is_empty()
        && vm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        let path = if path.is_empty() { "/root" } else { path };
        return Side::Guest {
            vm: vm.to_owned(),
            path: path.to_owned(),
        };
    }
    Side::Host(PathBuf::from(s))
}

/// The last component of a path as tar names it (`/a/b/` → `b`, `/` → `.`).
fn base_name(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some((_, b)) if !b.is_empty() => b.to_owned(),
        None if !trimmed.is_empty() => trimmed.to_owned(),
        _ => ".".to_owned(),
    }
}

/// The parent of a guest path (`/a/b` → `/a`, `b` → `.`).
fn parent(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", _)) => "/".to_owned(),
        Some((p, _)) => p.to_owned(),
        None => ".".to_owned(),
    }
}

/// What a copy does, decided from the two sides and what exists. Pure, for the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The directory the tar is unpacked into.
    pub into: String,
    /// The name SRC gets there (`.` for a directory's content).
    pub name: String,
}

/// Where SRC lands: `dst_is_dir` whether DST exists as a directory.
pub fn plan(src: &str, dst: &str, dst_is_dir: bool) -> Plan {
    let content_only = src.ends_with("/.") || src == ".";
    if dst_is_dir || dst.ends_with('/') {
        let name = if content_only {
            ".".to_owned()
        } else {
            base_name(src)
        };
        Plan {
            into: dst.to_owned(),
            name,
        }
    } else if content_only {
        // The content of SRC becomes the new directory DST.
        Plan {
            into: dst.to_owned(),
            name: ".".to_owned(),
        }
    } else {
        Plan {
            into: parent(dst),
            name: base_name(dst),
        }
    }
}

fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> CliError {
    CliError::Other(format!("{what}: {e}"))
}

fn agent_err(vm: &str, e: impl std::fmt::Display) -> CliError {
    CliError::Other(format!(
        "cannot reach vm {vm}'s guest agent: {e}; check `banger vm logs {vm}`"
    ))
}

/// `banger vm cp SRC DST`.
pub async fn run(client: &Client, src: &str, dst: &str) -> Result<u8, CliError> {
    match (side(src), side(dst)) {
        (Side::Guest { .. }, Side::Guest { .. }) => Err(CliError::Usage(
            "copying between two VMs is not supported: copy to the host first".into(),
        )),
        (Side::Guest { vm, path }, to @ (Side::Host(_) | Side::Stdio)) => {
            let (vm, sock) = running(client, vm).await?;
            copy_out(&vm, &sock, &path, to).await
        }
        (from @ (Side::Host(_) | Side::Stdio), Side::Guest { vm, path }) => {
            if let Side::Host(p) = &from
                && std::fs::symlink_metadata(p).is_err()
            {
                return Err(CliError::Rpc {
                    code: codes::NOT_FOUND,
                    message: format!("{}: no such file or directory", p.display()),
                });
            }
            let (vm, sock) = running(client, vm).await?;
            copy_in(&vm, &sock, from, &path).await
        }
        _ => Err(CliError::Usage(format!(
            "one of {src:?} and {dst:?} must be in a VM: VM:PATH (e.g. dev:/root)"
        ))),
    }
}

/// The VM (by name or ID prefix) and its agent socket; it must be running.
async fn running(client: &Client, vm: String) -> Result<(String, PathBuf), CliError> {
    let vm = super::vm::resolve(client, vm).await?;
    let info = super::exec::show_settled(client, &vm).await?;
    if info.state != VmState::Running {
        return Err(super::exec::not_running(
            &vm,
            info.state,
            " (cp needs its agent)",
        ));
    }
    let sock = info
        .vsock_socket
        .ok_or_else(|| agent_err(&vm, "the vm has no vsock socket"))?;
    Ok((info.name, PathBuf::from(sock)))
}

/// What a guest path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuestKind {
    Dir,
    Other,
    Missing,
}

/// Ask the guest what `path` is (an exec of `sh -c 'test …'`).
async fn guest_kind(vm: &str, sock: &Path, path: &str) -> Result<GuestKind, CliError> {
    let script = "if [ -d \"$1\" ]; then exit 10; elif [ -e \"$1\" ] || [ -L \"$1\" ]; then exit 11; else exit 12; fi";
    let argv = ["sh", "-c", script, "banger-cp", path]
        .map(String::from)
        .to_vec();
    let mut c = super::exec::connect_agent(vm, sock).await?;
    host::write_json(
        &mut c.stream,
        Kind::Request,
        &Request::Exec(ExecRequest {
            argv,
            env: Vec::new(),
            cwd: None,
            tty: false,
            rows: 0,
            cols: 0,
        }),
    )
    .await
    .map_err(|e| agent_err(vm, e))?;
    host::write_frame(&mut c.stream, Kind::StdinEof, &[])
        .await
        .map_err(|e| agent_err(vm, e))?;
    loop {
        let frame = host::read_frame(&mut c.stream)
            .await
            .map_err(|e| agent_err(vm, e))?;
        match frame.kind {
            Kind::Stdout | Kind::Stderr => {}
            _ => {
                let status: ExitStatus =
                    proto::expect_json(&frame, Kind::Exit).map_err(|e| agent_err(vm, e))?;
                return match status.code {
                    Some(10) => Ok(GuestKind::Dir),
                    Some(11) => Ok(GuestKind::Other),
                    Some(12) => Ok(GuestKind::Missing),
                    other => Err(CliError::Other(format!(
                        "vm {vm}: cannot tell what {path} is (sh exited with {other:?})"
                    ))),
                };
            }
        }
    }
}

/// A std socket pair: the async end for the agent, the blocking end for a tar thread.
fn pair() -> Result<(tokio::net::UnixStream, std::os::unix::net::UnixStream), CliError> {
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| io_err("a socket pair", e))?;
    ours.set_nonblocking(true)
        .map_err(|e| io_err("a socket pair", e))?;
    let ours = tokio::net::UnixStream::from_std(ours).map_err(|e| io_err("a socket pair", e))?;
    Ok((ours, theirs))
}

/// Host (or a tar on stdin) → guest.
async fn copy_in(vm: &str, sock: &Path, from: Side, dst: &str) -> Result<u8, CliError> {
    let kind = guest_kind(vm, sock, dst).await?;
    let into;
    let (ours, theirs) = pair()?;
    let writer = match from {
        Side::Stdio => {
            // A tar stream as it is, into DST (a directory, made if needed).
            into = dst.to_owned();
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut theirs = theirs;
                std::io::copy(&mut std::io::stdin().lock(), &mut theirs)?;
                theirs.shutdown(std::net::Shutdown::Write)
            })
        }
        Side::Host(src) => {
            let src_text = src.display().to_string();
            let is_dir = src.is_dir();
            if kind == GuestKind::Other && is_dir {
                return Err(CliError::Usage(format!(
                    "cannot copy the directory {src_text} onto the file {vm}:{dst}"
                )));
            }
            let p = plan(&src_text, dst, kind == GuestKind::Dir);
            into = p.into;
            let name = p.name;
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut b = tar::Builder::new(&theirs);
                b.follow_symlinks(false);
                if is_dir {
                    b.append_dir_all(&name, &src)?;
                } else {
                    b.append_path_with_name(&src, &name)?;
                }
                b.finish()?;
                drop(b);
                theirs.shutdown(std::net::Shutdown::Write)
            })
        }
        Side::Guest { .. } => unreachable!("copy_in from the host"),
    };
    let sent = host::upload(sock, &Request::TarIn { dir: into.clone() }, ours).await;
    let built = writer
        .join()
        .map_err(|_| CliError::Other("the tar writer panicked".into()))?;
    built.map_err(|e| io_err("reading what to copy", e))?;
    match sent.map_err(|e| CliError::Other(format!("copying into {vm}:{into}: {e}")))? {
        Response::Written { .. } => Ok(exit::OK),
        other => Err(CliError::Other(format!(
            "vm {vm}'s agent answered {other:?} to a tar upload"
        ))),
    }
}

/// Guest → host (or a tar on stdout).
async fn copy_out(vm: &str, sock: &Path, src: &str, to: Side) -> Result<u8, CliError> {
    let kind = guest_kind(vm, sock, src).await?;
    if kind == GuestKind::Missing {
        return Err(CliError::Rpc {
            code: codes::NOT_FOUND,
            message: format!("{vm}:{src}: no such file or directory in the guest"),
        });
    }
    let dir = kind == GuestKind::Dir;
    // What lands where on the host; for `-`, a tar is written instead.
    let target = match &to {
        Side::Host(d) => {
            let p = plan(src, &d.display().to_string(), d.is_dir());
            Some(PathBuf::from(&p.into).join(&p.name))
        }
        _ => None,
    };
    let name = base_name(src);
    let file = target.clone().filter(|_| !dir);
    let (ours, theirs) = pair()?;
    // The agent's tar (of the directory, or of the one file) is read in a thread: unpacked
    // at `target`, or re-packed under SRC's name onto stdout.
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        match target {
            Some(target) if dir => {
                std::fs::create_dir_all(&target)?;
                let mut a = tar::Archive::new(theirs);
                a.set_preserve_permissions(true);
                a.set_preserve_mtime(true);
                a.unpack(&target)
            }
            Some(target) => {
                let mut f = std::fs::File::create(&target)?;
                let mut theirs = theirs;
                std::io::copy(&mut theirs, &mut f).map(|_| ())
            }
            None => {
                let out = std::io::stdout();
                let mut b = tar::Builder::new(out.lock());
                if dir {
                    let mut a = tar::Archive::new(theirs);
                    for entry in a.entries()? {
                        let mut entry = entry?;
                        let mut header = entry.header().clone();
                        let path = entry.path()?.into_owned();
                        let inner = path.strip_prefix(".").unwrap_or(&path);
                        let full = Path::new(&name).join(inner);
                        let link = entry.link_name()?.map(|l| l.into_owned());
                        match link {
                            Some(l) if header.entry_type().is_hard_link() => {
                                let l = l.strip_prefix(".").unwrap_or(&l);
                                b.append_link(&mut header, &full, Path::new(&name).join(l))?;
                            }
                            Some(l) => b.append_link(&mut header, &full, l)?,
                            None => b.append_data(&mut header, &full, &mut entry)?,
                        }
                    }
                } else {
                    // One file: its bytes, then a header for them (the size is known after).
                    let mut data = Vec::new();
                    let mut theirs = theirs;
                    std::io::Read::read_to_end(&mut theirs, &mut data)?;
                    let mut header = tar::Header::new_gnu();
                    header.set_size(data.len() as u64);
                    header.set_mode(0o644);
                    header.set_mtime(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0),
                    );
                    b.append_data(&mut header, &name, data.as_slice())?;
                }
                b.finish()
            }
        }
    });
    let mut ours = ours;
    let got = if dir {
        host::tar_out(sock, src, &mut ours).await.map(|_| None)
    } else {
        host::get_file(sock, src, &mut ours).await.map(Some)
    };
    drop(ours);
    let read = reader
        .join()
        .map_err(|_| CliError::Other("the tar reader panicked".into()))?;
    let got = got.map_err(|e| CliError::Other(format!("copying {vm}:{src}: {e}")))?;
    read.map_err(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return CliError::Other("stdout was closed".into());
        }
        io_err(format!("writing what came from {vm}:{src}"), e)
    })?;
    // A single file keeps its mode.
    if let (Some((_, mode)), Some(file)) = (got, file) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o7777));
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_told_apart_as_docker_does() {
        assert_eq!(
            side("dev:/root/x"),
            Side::Guest {
                vm: "dev".into(),
                path: "/root/x".into()
            }
        );
        assert_eq!(
            side("3fa1:"),
            Side::Guest {
                vm: "3fa1".into(),
                path: "/root".into()
            }
        );
        assert_eq!(side("./a:b"), Side::Host("./a:b".into()));
        assert_eq!(side("/tmp/x"), Side::Host("/tmp/x".into()));
        assert_eq!(side("-"), Side::Stdio);
    }

    #[test]
    fn a_directory_dst_receives_src_inside_else_src_is_renamed() {
        let p = plan("./app", "/root", true);
        assert_eq!((p.into.as_str(), p.name.as_str()), ("/root", "app"));
        let p = plan("./app/", "/root/", false);
        assert_eq!((p.into.as_str(), p.name.as_str()), ("/root/", "app"));
        let p = plan("a.txt", "/root/b.txt", false);
        assert_eq!((p.into.as_str(), p.name.as_str()), ("/root", "b.txt"));
        let p = plan("/etc/hostname", "out", false);
        assert_eq!((p.into.as_str(), p.name.as_str()), (".", "out"));
        let p = plan("./src/.", "/root/dst", false);
        assert_eq!((p.into.as_str(), p.name.as_str()), ("/root/dst", "."));
        let p = plan("/var/log/.", "here", true);
        assert_eq!((p.into.as_str(), p.name.as_str()), ("here", "."));
        assert_eq!(parent("/x"), "/");
        assert_eq!(base_name("/a/b/"), "b");
    }
}
