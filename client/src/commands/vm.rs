//! `banger vm …` and `banger ps`.

use std::io::IsTerminal;
use std::time::Instant;

use banger_api::{
    CreateVm, LogEvent, Progress, SetVm, SpecDefaults, SpecSource, VmInfo, VmRpcClient, VmSpec,
};
use jsonrpsee::core::client::Subscription;

use crate::cli::{PortCmd, SizeArgs, VmCmd, WorkspaceCmd};
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

/// Follow a progress stream to its end, printing stages to stderr.
async fn follow_progress(mut sub: Subscription<Progress>, quiet: bool) -> Result<VmInfo, CliError> {
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
            Progress::Done { vm } => {
                if !quiet {
                    eprintln!(
                        "{} is {} ({:.1}s)",
                        vm.name,
                        vm.state.as_str(),
                        t0.elapsed().as_secs_f64()
                    );
                }
                return Ok(vm);
            }
            Progress::Failed { code, message } => return Err(CliError::Rpc { code, message }),
        }
    }
    Err(CliError::Other(
        "the daemon ended the progress stream without a result".into(),
    ))
}

fn print_table(vms: &[VmInfo]) {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                // A busy VM's state is its last stored one (its actor did not answer).
                match v.busy {
                    true => format!("{}*", v.state.as_str()),
                    false => v.state.as_str().to_owned(),
                },
                v.vmm.as_str().to_owned(),
                v.spec.vcpu.to_string(),
                bytes(u64::from(v.spec.memory_mib) << 20),
                bytes(v.spec.disk_bytes),
                v.image.clone(),
                v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                ports_cell(v),
            ]
        })
        .collect();
    out!(
        "{}",
        render::table(
            &[
                "NAME", "STATE", "VMM", "VCPU", "MEMORY", "DISK", "IMAGE", "PID", "PORTS"
            ],
            &[false, false, false, true, true, true, false, true, false],
            &rows,
        )
    );
    if vms.iter().any(|v| v.busy) {
        outln!("* busy: the VM did not answer in time; its state is the last one stored");
    }
}

fn print_vm(v: &VmInfo) {
    outln!("name:     {}", v.name);
    outln!("id:       {}", v.id);
    outln!("state:    {}", v.state.as_str());
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
    if let Some(pid) = v.pid {
        outln!("pid:      {pid}");
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
            let p = client.port_add(vm, spec).await?;
            if json {
                render::json(&p)?;
            } else {
                outln!("{}", port_line(&p));
            }
        }
        PortCmd::Rm { vm, port } => {
            for p in client.port_rm(vm, port).await? {
                outln!("{}", p.arrow());
            }
        }
        PortCmd::List { vm, json } => {
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

fn size_req(s: &SizeArgs) -> (Option<u32>, Option<u32>, Option<u64>) {
    (s.vcpu, s.memory.map(|m| (m >> 20) as u32), s.disk_size)
}

pub async fn ps(target: &Target, json: bool) -> Result<u8, CliError> {
    run(target, VmCmd::List { json }).await
}

pub async fn run(target: &Target, cmd: VmCmd) -> Result<u8, CliError> {
    let client = connect::connect_or_start(target).await?;
    match cmd {
        VmCmd::Create {
            name,
            image,
            kernel,
            size,
            vmm,
            nat,
            no_network,
            network,
            no_start,
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
                name,
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
            };
            let sub = client.create(req).await?;
            let vm = follow_progress(sub, json).await?;
            if json {
                render::json(&vm)?;
            } else {
                outln!("{}", vm.name);
            }
        }
        VmCmd::Run {
            path,
            name,
            image,
            size,
            vmm,
            nat,
            no_network,
            publish,
            egress,
            rm,
            full_copy,
            timings,
            no_boot_wait,
            cmd,
        } => {
            let opts = super::run::Opts {
                path,
                name,
                image,
                size,
                vmm,
                nat,
                no_network,
                publish: publish.publish,
                egress,
                rm,
                full_copy,
                timings,
                boot_wait: !no_boot_wait,
                cmd,
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
            super::workspace::run_prepare(&client, &vm, &path, &opts).await?;
        }
        VmCmd::Workspace(WorkspaceCmd::Export { vm, out }) => {
            super::workspace::run_export(&client, &vm, out.as_deref()).await?;
        }
        VmCmd::Start { vm } => {
            follow_progress(client.start(vm).await?, false).await?;
        }
        VmCmd::Restart { vm } => {
            follow_progress(client.restart(vm).await?, false).await?;
        }
        VmCmd::Stop { vm, timeout } => {
            let t0 = Instant::now();
            let info = client.stop(vm, timeout).await?;
            eprintln!(
                "{} is {} ({:.1}s)",
                info.name,
                info.state.as_str(),
                t0.elapsed().as_secs_f64()
            );
        }
        VmCmd::Kill { vm, signal } => {
            let info = client.kill(vm, Some(signal)).await?;
            eprintln!("{} is {}", info.name, info.state.as_str());
        }
        VmCmd::Delete { vms, force } => {
            let mut failed = None;
            for vm in vms {
                match client.delete(vm.clone(), force).await {
                    Ok(info) => outln!("{}", info.name),
                    Err(e) => {
                        let e = CliError::from(e);
                        // The daemon's messages name the VM; say which one when not.
                        if e.to_string().contains(vm.as_str()) {
                            eprintln!("banger: {e}");
                        } else {
                            eprintln!("banger: vm {vm}: {e}");
                        }
                        failed = Some(e.exit_code());
                    }
                }
            }
            if let Some(code) = failed {
                return Ok(code);
            }
        }
        VmCmd::Set {
            vm,
            size,
            nat,
            no_nat,
            egress,
            isolate,
            no_isolate,
        } => {
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
            {
                return Err(CliError::Usage(
                    "nothing to set: pass --vcpu, --memory, --disk-size, --nat, --no-nat, --egress, --isolate or --no-isolate".into(),
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
                })
                .await?;
            eprintln!("{}: {}", info.name, spec_line(&info.spec));
        }
        VmCmd::List { json } => {
            let vms = client.list().await?;
            if json {
                render::json(&vms)?;
            } else {
                print_table(&vms);
            }
        }
        VmCmd::Show { vm, json } => {
            let info = client.show(vm).await?;
            if json {
                render::json(&info)?;
            } else {
                print_vm(&info);
            }
        }
        VmCmd::Stats { vm, json } => {
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
        VmCmd::Exec {
            vm,
            tty,
            env,
            workdir,
            cmd,
        } => {
            return super::exec::run(&client, &vm, tty, env, workdir, cmd).await;
        }
        VmCmd::Ssh { vm, cmd } => {
            return super::ssh::vm_ssh(&client, target, &vm, &cmd).await;
        }
        VmCmd::Port(cmd) => return port(&client, cmd).await,
        VmCmd::Ports { vm, json } => {
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
        VmCmd::Logs { vm, follow, tail } => {
            if !follow {
                let text = client.logs(vm, tail).await?;
                out!("{text}");
                return Ok(exit::OK);
            }
            let mut sub = client.logs_follow(vm).await?;
            while let Some(ev) = sub.next().await {
                match ev.map_err(|e| CliError::Other(format!("lost the console stream: {e}")))? {
                    // `vm logs -f dev | grep -m1 login:` ends when grep does.
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
