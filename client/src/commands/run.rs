//! `banger vm run [path] [-- cmd]`: create and boot a VM (through `vm.create` and its
//! progress stream), optionally ship a repo to /root/repo, then run the command through
//! the agent (exiting with its status) or open an interactive ssh session (see
//! [`super::ssh`]; in /root/repo when a path was shipped); `--rm` deletes the VM
//! afterwards, whatever the status.
//!
//! When the guest never becomes reachable (create fails after the VM exists), the VM is
//! kept even with `--rm`, so `banger vm logs <name>` can show why.
//!
//! An image that is not here yet (the default one on a first run, built from Debian's
//! packages; or one from a catalog) is said so on stderr, one line per stage of its pull
//! or build, as docker says "Unable to find image … locally" and shows its pull.
//!
//! `--timings` (or `BANGER_TIMINGS=1`) prints the stages to stderr: `image` (only when the
//! image had to be pulled or built first), `create` (the control
//! plane: from the request to the VMM launched, i.e. the daemon's `agent` stage), `boot`
//! (from there until the agent answers: the guest's own boot; `restore` instead when the VM
//! was restored from a warm snapshot, see `banger image warm`), `ship`, `services` (until the
//! guest's init has finished starting its services, see below), `command`, `delete`, and
//! the total.
//!
//! **The command runs on a booted machine.** The agent answers as soon as banger-init has
//! started it, before systemd has started the image's services; a command run then sees a
//! half-booted machine (`systemctl` refuses, sshd or dockerd not up yet). So `vm run` asks
//! the agent to wait for the boot to finish (`systemctl is-system-running --wait`; at most
//! 5 minutes, then it warns and goes on) before it runs the command or opens the shell, as
//! `limactl start` waits for its guest to be ready. `--no-boot-wait` runs at once (seconds
//! sooner, in an early environment). `vm exec` does not wait: it runs in whatever state
//! the VM is in, which is what one wants when looking into a boot that hangs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use banger_api::{CreateVm, Progress, VmRpcClient};
use jsonrpsee::async_client::Client;

use crate::cli::SizeArgs;
use crate::commands::workspace::{self, GUEST_REPO};
use crate::connect::Target;
use crate::exit::CliError;

/// The flags of `vm run`.
#[derive(Debug)]
pub struct Opts {
    pub path: Option<PathBuf>,
    pub name: Option<String>,
    pub image: Option<String>,
    pub size: SizeArgs,
    pub vmm: Option<banger_api::VmmChoice>,
    pub nat: bool,
    pub no_network: bool,
    /// `--cold`: boot even when a warm snapshot could restore the VM.
    pub cold: bool,
    /// `--publish`.
    pub publish: Vec<banger_api::PortSpec>,
    /// `--egress`, `--isolate`.
    pub egress: crate::cli::EgressArgs,
    pub rm: bool,
    /// `--ttl` (seconds): the daemon stops the VM then, or deletes it with `--rm`.
    pub ttl: Option<u64>,
    pub full_copy: bool,
    pub timings: bool,
    /// Wait for the guest's boot to finish before the command or shell (`--no-boot-wait`
    /// turns it off).
    pub boot_wait: bool,
    /// `-d`: start it and return; a command runs in the background (see [`DETACHED_LOG`]).
    pub detach: bool,
    /// `-e KEY=VALUE`, for the command or the shell.
    pub env: Vec<String>,
    /// `-w DIR` (default: the shipped repo, if any).
    pub workdir: Option<String>,
    pub cmd: Vec<String>,
}

/// Where a command started with `vm run -d` writes its output, in the guest.
pub const DETACHED_LOG: &str = "/root/.banger-run.log";

/// The guest command that starts `cmd` in the background, its output in
/// [`DETACHED_LOG`], and returns at once (the agent's exec ends with its `sh`).
pub fn detached(cmd: &[String]) -> Vec<String> {
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        format!("nohup \"$@\" </dev/null >>{DETACHED_LOG} 2>&1 &"),
        "banger-run".to_owned(),
    ];
    argv.extend(cmd.iter().cloned());
    argv
}

/// The remote command of a `vm run` shell: a login shell, in `dir` and with `env` when
/// given; None for plain `ssh`'s own.
pub fn shell_command(dir: Option<&str>, env: &[(String, String)]) -> Option<String> {
    if dir.is_none() && env.is_empty() {
        return None;
    }
    let mut line = String::new();
    if let Some(dir) = dir {
        line.push_str(&format!(
            "cd {} && ",
            shlex::try_quote(dir).unwrap_or_default()
        ));
    }
    line.push_str("exec ");
    if !env.is_empty() {
        line.push_str("env");
        for (k, v) in env {
            let kv = format!("{k}={v}");
            line.push(' ');
            line.push_str(&shlex::try_quote(&kv).unwrap_or_default());
        }
        line.push(' ');
    }
    line.push_str("\"${SHELL:-/bin/sh}\" -l");
    Some(line)
}

#[derive(Default)]
struct Timings(Vec<(&'static str, Duration)>);

impl Timings {
    fn print(&self, total: Duration) {
        let mut line = String::from("timings:");
        for (stage, d) in &self.0 {
            line.push_str(&format!(" {stage} {} ms ·", d.as_millis()));
        }
        line.push_str(&format!(" total {} ms", total.as_millis()));
        eprintln!("{line}");
    }
}

/// Create + boot, following the progress stream; `Err((name, e))` carries the VM's name
/// when it was created before the failure.
async fn create(
    client: &Client,
    req: CreateVm,
    t: &mut Timings,
) -> Result<banger_api::VmInfo, (Option<String>, CliError)> {
    let mut t0 = Instant::now();
    let mut sub = client.create(req).await.map_err(|e| (None, e.into()))?;
    let mut name = None;
    let mut launched = None;
    let mut pulling = false;
    // Restored from a warm snapshot: the guest's part is a `restore`, not a `boot`.
    let mut restored = false;
    while let Some(item) = sub.next().await {
        let item = item.map_err(|e| {
            (
                name.clone(),
                CliError::Other(format!("lost the daemon's progress stream: {e}")),
            )
        })?;
        match item {
            Progress::Created { vm } => {
                eprintln!("banger: created {} ({})", vm.name, vm.id);
                name = Some(vm.name);
            }
            Progress::Stage { stage, detail } => {
                if let Some(line) = pull_line(&stage, detail.as_deref()) {
                    eprintln!("{line}");
                    pulling = true;
                    continue;
                }
                if std::mem::take(&mut pulling) {
                    t.0.push(("image", t0.elapsed()));
                    t0 = Instant::now();
                }
                if stage == "warning" {
                    // e.g. the VM is emulated (QEMU under TCG) and slow.
                    eprintln!("banger: warning: {}", detail.unwrap_or_default());
                }
                if stage == "warm" {
                    restored = true;
                }
                if stage == "agent" {
                    launched = Some(Instant::now());
                    t.0.push(("create", t0.elapsed()));
                }
            }
            Progress::Done { vm } => {
                if let Some(l) = launched {
                    t.0.push((if restored { "restore" } else { "boot" }, l.elapsed()));
                } else {
                    t.0.push(("create", t0.elapsed()));
                }
                return Ok(vm);
            }
            Progress::Failed { code, message } => {
                return Err((name, CliError::Rpc { code, message }));
            }
            // Only `vm.snapshot_create` and `vm.fork` end with them.
            Progress::Snapshot { .. } | Progress::Forked { .. } | Progress::Warmed { .. } => {}
        }
    }
    Err((
        name,
        CliError::Other("the daemon ended the progress stream without a result".into()),
    ))
}

/// The line `vm run` prints for a stage of the create, when it is one of the image's pull
/// or build (the daemon's `pull` stages): the user waits minutes on a first run and must
/// see why. Other stages stay quiet (see `--timings`).
fn pull_line(stage: &str, detail: Option<&str>) -> Option<String> {
    (stage == "pull").then(|| format!("banger: {}", detail.unwrap_or("pulling the image")))
}

/// The error of a `vm run` whose VM was created but never became reachable: the cause
/// (the daemon's words, which name the VM), where to look when it does not say, and that
/// the VM is kept even with `--rm`, each said once.
fn kept(name: &str, cause: &str) -> String {
    let logs = if cause.contains("banger vm logs") {
        String::new()
    } else {
        format!("; see `banger vm logs {name}`")
    };
    format!(
        "{cause}{logs}; the VM is kept (even with --rm): remove it with `banger vm rm -f {name}`"
    )
}

/// `banger vm run`.
pub async fn run(client: &Client, target: &Target, o: Opts) -> Result<u8, CliError> {
    let start = Instant::now();
    // Checked before anything is created.
    let env = super::exec::parse_env(&o.env)?;
    let mut t = Timings::default();
    let req = CreateVm {
        name: o.name.clone(),
        image: o.image.clone(),
        kernel: None,
        vcpu: o.size.vcpu,
        memory_mib: o.size.memory.map(|m| (m >> 20) as u32),
        disk_bytes: o.size.disk_size,
        vmm: o.vmm,
        nat: o.nat,
        network: o.no_network.then_some(false),
        no_start: false,
        publish: o.publish.clone(),
        egress: o.egress.egress.clone(),
        isolate: o.egress.isolate,
        ttl: o.ttl.map(|secs| banger_api::Ttl { secs, delete: o.rm }),
        from_snapshot: None,
        cold: o.cold,
    };
    // Check the path before creating anything.
    if let Some(p) = &o.path
        && !p.is_dir()
    {
        return Err(CliError::Usage(format!(
            "{} is not a directory (vm run ships a directory to {GUEST_REPO})",
            p.display()
        )));
    }
    let vm = match create(client, req, &mut t).await {
        Ok(vm) => vm,
        Err((Some(name), e)) => return Err(CliError::Other(kept(&name, &e.to_string()))),
        Err((None, e)) => return Err(e),
    };
    if let Some(e) = &vm.error {
        // Running, but the agent never answered within agent_timeout_secs.
        return Err(CliError::Other(kept(
            &vm.name,
            &format!("vm {} did not become reachable: {e}", vm.name),
        )));
    }
    let name = vm.name.clone();
    let result = session(client, target, &o, &env, &vm, &mut t).await;
    if o.rm {
        let t1 = Instant::now();
        match client.delete(name.clone(), true).await {
            Ok(_) => t.0.push(("delete", t1.elapsed())),
            // Its --ttl ran out first and the daemon deleted it.
            Err(jsonrpsee::core::client::Error::Call(e))
                if o.ttl.is_some() && e.code() == banger_api::codes::NOT_FOUND =>
            {
                eprintln!("banger: vm {name} was deleted at the end of its --ttl");
            }
            Err(e) => eprintln!(
                "banger: deleting vm {name}: {}; remove it with `banger vm rm -f {name}`",
                CliError::from(e)
            ),
        }
    }
    if o.timings {
        t.print(start.elapsed());
    }
    result
}

/// How long `vm run` waits for the guest's boot to finish before it goes on anyway.
const BOOT_WAIT: Duration = Duration::from_secs(300);

/// Wait until the guest has finished booting (the agent's `Boot`: systemd's start-up jobs
/// done), so the command or the shell sees the machine with its services up, not half
/// booted. A boot that does not finish in [`BOOT_WAIT`], or finishes `degraded`, is said
/// on stderr and the command runs anyway; an agent older than `Boot` is not waited for.
async fn wait_boot(vm: &banger_api::VmInfo) -> Result<(), CliError> {
    use banger_guest::host::{self, HostError};
    use banger_guest::proto::{ProtoError, Request, Response};
    let name = &vm.name;
    let Some(sock) = &vm.vsock_socket else {
        return Ok(());
    };
    let req = Request::Boot {
        timeout_secs: BOOT_WAIT.as_secs() as u32,
    };
    let boot = match host::call(
        std::path::Path::new(sock),
        &req,
        BOOT_WAIT + Duration::from_secs(10),
    )
    .await
    {
        Ok(Response::Boot { boot }) => boot,
        // An agent that predates `Boot`.
        Ok(_) | Err(HostError::Proto(ProtoError::Remote(_))) => return Ok(()),
        Err(e) => {
            return Err(CliError::Other(format!(
                "cannot reach vm {name}'s guest agent: {e}; check `banger vm logs {name}`"
            )));
        }
    };
    if !boot.finished() {
        eprintln!(
            "banger: warning: vm {name} has not finished booting after {} s ({} is {}): going on anyway; see `banger vm logs {name}`",
            BOOT_WAIT.as_secs(),
            boot.init,
            boot.state
        );
    } else if boot.state == "degraded" {
        eprintln!(
            "banger: warning: vm {name} booted with failed units: {} (see `banger vm exec {name} -- systemctl --failed`)",
            boot.failed.join(", ")
        );
    }
    Ok(())
}

async fn session(
    client: &Client,
    target: &Target,
    o: &Opts,
    env: &[(String, String)],
    vm: &banger_api::VmInfo,
    t: &mut Timings,
) -> Result<u8, CliError> {
    let name = &vm.name;
    let mut workdir = None;
    if let Some(path) = &o.path {
        let sock = vm.vsock_socket.clone().ok_or_else(|| {
            CliError::Other(format!(
                "vm {name} has no vsock socket; see `banger vm logs {name}`"
            ))
        })?;
        let t1 = Instant::now();
        let opts = workspace::Opts {
            full_copy: o.full_copy,
            ..Default::default()
        };
        let _lock = workspace::lock(vm).await?;
        workspace::prepare(name, std::path::Path::new(&sock), path, &opts).await?;
        t.0.push(("ship", t1.elapsed()));
        workdir = Some(GUEST_REPO.to_owned());
    }
    if o.boot_wait {
        let t1 = Instant::now();
        wait_boot(vm).await?;
        t.0.push(("services", t1.elapsed()));
    }
    if o.workdir.is_some() {
        workdir = o.workdir.clone();
    }
    let t1 = Instant::now();
    let status = if o.detach {
        if !o.cmd.is_empty() {
            let argv = detached(&o.cmd);
            let status =
                super::exec::run(client, name, false, o.env.clone(), workdir, argv).await?;
            if status != 0 {
                return Ok(status);
            }
            eprintln!("banger: the command runs in {name}; its output: {DETACHED_LOG}");
        }
        outln!("{name}");
        0
    } else if o.cmd.is_empty() {
        // Interactive: ssh (through the agent's vsock, so no network is needed).
        let remote = shell_command(workdir.as_deref(), env);
        let c = super::ssh::ssh_command(client, target, name, remote.as_deref(), true).await?;
        super::ssh::run_ssh(c).await?
    } else {
        super::exec::run(client, name, false, o.env.clone(), workdir, o.cmd.clone()).await?
    };
    t.0.push(("command", t1.elapsed()));
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_vm_is_said_kept_once() {
        // The daemon's words for an agent that never answered, as it sends them.
        let agent = "vm dev runs, but its guest agent did not answer within 120s (timed out); it is left running: see `banger vm logs dev`";
        let m = kept("dev", agent);
        assert_eq!(m.matches("kept").count(), 1, "{m}");
        assert_eq!(m.matches("banger vm logs").count(), 1, "{m}");
        assert!(
            m.starts_with(agent) && m.ends_with("`banger vm rm -f dev`"),
            "{m}"
        );
        let m = kept(
            "dev",
            "vm dev failed to start: qemu exited during start-up: boom",
        );
        assert!(
            m.contains("; see `banger vm logs dev`; the VM is kept"),
            "{m}"
        );
    }

    #[test]
    fn the_images_pull_and_build_stages_are_said_and_the_others_are_not() {
        assert_eq!(
            pull_line(
                "pull",
                Some("building debian-bookworm from http://m/debian, once")
            ),
            Some("banger: building debian-bookworm from http://m/debian, once".into())
        );
        assert_eq!(
            pull_line("pull", Some("mkfs")).as_deref(),
            Some("banger: mkfs")
        );
        assert_eq!(pull_line("agent", Some("waiting")), None);
        assert_eq!(pull_line("warning", Some("emulated")), None);
    }
}
