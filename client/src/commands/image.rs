//! `banger image …` and `banger kernel …`.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use banger_api::{
    BuildImage, CatalogEntry, ImageRpcClient, ImportKernel, KernelInfo, KernelRpcClient,
    PromoteImage, PullEvent, PullImage, PullKernel, RegisterImage,
};
use jsonrpsee::core::client::Subscription;

use crate::cli::{CacheCmd, ImageCmd, KernelCmd, WarmArgs, WarmCmd};
use crate::commands::vm::bytes;
use crate::connect::{self, Target};
use crate::exit::{self, CliError};
use crate::render;

fn absolute(p: &std::path::Path) -> Result<String, CliError> {
    std::path::absolute(p)
        .map(|p| p.display().to_string())
        .map_err(|e| CliError::Usage(format!("{}: {e}", p.display())))
}

/// The image a pull or promote made: its name, or all of it with `--json`.
fn print_image(event: PullEvent, json: bool) -> Result<(), CliError> {
    if let PullEvent::Image { image } = event {
        if json {
            render::json(&image)?;
        } else {
            outln!("{}", image.name);
        }
    }
    Ok(())
}

/// Follow a pull (or a promote) to its end. On a terminal, stages go to stderr and downloads draw a
/// progress bar there; piped, nothing but the result is printed (by the caller).
pub async fn follow_pull(mut sub: Subscription<PullEvent>) -> Result<PullEvent, CliError> {
    let tty = std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let mut bar = Bar::default();
    while let Some(item) = sub.next().await {
        let item =
            item.map_err(|e| CliError::Other(format!("lost the daemon's progress stream: {e}")))?;
        match item {
            PullEvent::Stage { stage, detail } => {
                if tty {
                    bar.clear();
                    let d = detail.map(|d| format!(": {d}")).unwrap_or_default();
                    eprintln!(
                        "  \u{2022} {stage}{d}  [{:.1}s]",
                        t0.elapsed().as_secs_f64()
                    );
                }
            }
            PullEvent::Bytes { done, total } => {
                if tty {
                    bar.draw(done, total);
                }
            }
            PullEvent::Failed { code, message } => {
                bar.clear();
                return Err(CliError::Rpc { code, message });
            }
            done @ (PullEvent::Image { .. } | PullEvent::Kernel { .. }) => {
                bar.clear();
                if tty {
                    eprintln!("done in {:.1}s", t0.elapsed().as_secs_f64());
                }
                return Ok(done);
            }
        }
    }
    bar.clear();
    Err(CliError::Other(
        "the daemon ended the pull's stream without a result".into(),
    ))
}

/// A one-line progress bar on stderr.
#[derive(Debug, Default)]
struct Bar {
    drawn: bool,
    started: Option<(Instant, u64)>,
}

impl Bar {
    fn draw(&mut self, done: u64, total: Option<u64>) {
        let (t0, base) = *self.started.get_or_insert((Instant::now(), done));
        let secs = t0.elapsed().as_secs_f64().max(0.001);
        let rate = (done.saturating_sub(base)) as f64 / secs;
        let width = terminal_size::terminal_size()
            .map(|(w, _)| w.0 as usize)
            .unwrap_or(80);
        let text = match total.filter(|t| *t > 0) {
            Some(t) => {
                let frac = (done as f64 / t as f64).min(1.0);
                let cells = width.saturating_sub(50).clamp(10, 40);
                let full = (frac * cells as f64) as usize;
                format!(
                    "  [{}{}] {:>3}% {} / {}  {}/s",
                    "#".repeat(full),
                    "-".repeat(cells - full),
                    (frac * 100.0) as u32,
                    bytes(done),
                    bytes(t),
                    bytes(rate as u64)
                )
            }
            None => format!("  {}  {}/s", bytes(done), bytes(rate as u64)),
        };
        let mut err = std::io::stderr();
        let _ = write!(err, "\r\x1b[2K{text}");
        let _ = err.flush();
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

fn print_catalog(entries: &[CatalogEntry], json: bool) -> Result<(), CliError> {
    if json {
        return render::json(&entries);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let from = match (&e.bundle, &e.recipe) {
                (Some(_), Some(_)) => "bundle,recipe".to_owned(),
                (Some(_), None) => "bundle".to_owned(),
                (None, Some(r)) => format!("recipe:{}", r.suite),
                (None, None) => "-".to_owned(),
            };
            let size = e
                .bundle
                .as_ref()
                .map(|b| bytes(b.size))
                .unwrap_or("-".into());
            let kernel = match (&e.kernel_ref, &e.recipe) {
                (Some(k), _) => k.clone(),
                (None, Some(_)) => "(built)".into(),
                (None, None) => "-".into(),
            };
            vec![e.name.clone(), from, size, kernel, e.description.clone()]
        })
        .collect();
    out!(
        "{}",
        render::table(
            &["NAME", "FROM", "SIZE", "KERNEL", "DESCRIPTION"],
            &[false, false, true, false, false],
            &rows
        )
    );
    Ok(())
}

pub async fn image(target: &Target, cmd: ImageCmd) -> Result<u8, CliError> {
    let client = connect::connect_or_start(target).await?;
    match cmd {
        ImageCmd::Pull {
            source,
            name,
            kernel,
            size,
            build,
            json,
        } => {
            let sub = ImageRpcClient::pull(
                &client,
                PullImage {
                    source,
                    name,
                    kernel_ref: kernel,
                    size_bytes: size,
                    build,
                },
            )
            .await?;
            print_image(follow_pull(sub).await?, json)?;
        }
        ImageCmd::Build {
            name,
            suite,
            mirror,
            include,
            size,
            kernel_package,
            kernel,
            json,
        } => {
            let sub = client
                .build(BuildImage {
                    name,
                    suite,
                    mirror,
                    include,
                    size_bytes: size,
                    kernel_package,
                    kernel,
                })
                .await?;
            print_image(follow_pull(sub).await?, json)?;
        }
        ImageCmd::Promote {
            vm,
            name,
            size,
            json,
        } => {
            let vm = super::vm::resolve(&client, vm).await?;
            let sub = client
                .promote(PromoteImage {
                    vm,
                    name,
                    size_bytes: size,
                })
                .await?;
            print_image(follow_pull(sub).await?, json)?;
        }
        ImageCmd::List {
            json,
            available: true,
        } => {
            let all = ImageRpcClient::available(&client).await?;
            print_catalog(&all, json)?;
        }
        ImageCmd::Cache(CacheCmd::List { json }) => {
            let all = client.cache_list().await?;
            if json {
                render::json(&all)?;
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|b| {
                        vec![
                            b.digest.clone(),
                            bytes(b.size_bytes),
                            format!("{} ago", render::duration(now.saturating_sub(b.used_at))),
                        ]
                    })
                    .collect();
                out!(
                    "{}",
                    render::table(&["DIGEST", "SIZE", "USED"], &[false, true, false], &rows)
                );
            }
        }
        ImageCmd::Warm(a) => warm(&client, a).await?,
        ImageCmd::Cache(CacheCmd::Prune) => {
            let p = client.cache_prune().await?;
            outln!(
                "removed {} blobs, {} freed",
                p.removed.len(),
                bytes(p.freed_bytes)
            );
        }
        ImageCmd::Register {
            name,
            rootfs,
            kernel,
            json,
        } => {
            let rootfs = absolute(&rootfs)?;
            let i = client
                .register(RegisterImage {
                    name,
                    rootfs,
                    kernel,
                })
                .await?;
            if json {
                render::json(&i)?;
            } else {
                outln!("{}", i.name);
            }
        }
        ImageCmd::List { json, .. } => {
            let all = ImageRpcClient::list(&client).await?;
            if json {
                render::json(&all)?;
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            bytes(i.size_bytes),
                            i.kernel.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                out!(
                    "{}",
                    render::table(&["NAME", "SIZE", "KERNEL"], &[false, true, false], &rows)
                );
            }
        }
        ImageCmd::Show { name, json } => {
            let i = ImageRpcClient::show(&client, name).await?;
            if json {
                render::json(&i)?;
            } else {
                outln!(
                    "name:    {}\nrootfs:  {}\nsize:    {}\nkernel:  {}",
                    i.name,
                    i.rootfs,
                    bytes(i.size_bytes),
                    i.kernel.as_deref().unwrap_or("-")
                );
            }
        }
        ImageCmd::Delete { name, json } => {
            let i = ImageRpcClient::delete(&client, name).await?;
            if json {
                render::json(&i)?;
            } else {
                outln!("{}", i.name);
            }
        }
    }
    Ok(exit::OK)
}

pub async fn kernel(target: &Target, cmd: KernelCmd) -> Result<u8, CliError> {
    let client = connect::connect_or_start(target).await?;
    match cmd {
        KernelCmd::Import { name, from, json } => {
            let from = absolute(&from)?;
            let k = client.import(ImportKernel { name, from }).await?;
            if json {
                render::json(&k)?;
            } else {
                outln!("{}", k.name);
            }
        }
        KernelCmd::Pull { name, json } => {
            let sub = KernelRpcClient::pull(&client, PullKernel { name }).await?;
            if let PullEvent::Kernel { kernel } = follow_pull(sub).await? {
                if json {
                    render::json(&kernel)?;
                } else {
                    outln!("{}", kernel.name);
                }
            }
        }
        KernelCmd::List {
            json,
            available: true,
        } => {
            let all = KernelRpcClient::available(&client).await?;
            print_catalog(&all, json)?;
        }
        KernelCmd::List { json, .. } => {
            let all = KernelRpcClient::list(&client).await?;
            if json {
                render::json(&all)?;
            } else {
                let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|k| {
                        vec![
                            k.name.clone(),
                            yes(k.initrd.is_some()),
                            yes(k.modules.is_some()),
                        ]
                    })
                    .collect();
                out!(
                    "{}",
                    render::table(&["NAME", "INITRD", "MODULES"], &[false; 3], &rows)
                );
            }
        }
        KernelCmd::Show { name, json } => {
            let k = KernelRpcClient::show(&client, name).await?;
            if json {
                render::json(&k)?;
            } else {
                out!("{}", kernel_text(&k));
            }
        }
        KernelCmd::Rm { name, json } => {
            let k = client.rm(name).await?;
            if json {
                render::json(&k)?;
            } else {
                outln!("{}", k.name);
            }
        }
    }
    Ok(exit::OK)
}

/// `kernel show`: the files, then one line per VMM saying whether the kernel suits it and
/// why (what it has when it fits, what it lacks when it does not).
fn kernel_text(k: &KernelInfo) -> String {
    let mut out = format!(
        "name:    {}\nkernel:  {}{}\nvmlinux: {}\ninitrd:  {}\nmodules: {}\nconfig:  {}\nvmms:\n",
        k.name,
        k.kernel,
        k.format
            .as_deref()
            .map(|f| format!(" ({f})"))
            .unwrap_or_default(),
        k.vmlinux
            .as_deref()
            .unwrap_or("- (Firecracker cannot boot it: re-import it)"),
        k.initrd.as_deref().unwrap_or("-"),
        k.modules.as_deref().unwrap_or("-"),
        k.config.as_deref().unwrap_or("-"),
    );
    for fit in &k.fits {
        let verdict = match fit.fits {
            Some(true) => "yes: ",
            Some(false) => "no: ",
            None => "",
        };
        out.push_str(&format!(
            "  {:<12} {verdict}{}\n",
            fit.vmm.as_str(),
            fit.reasons.join("; ")
        ));
    }
    out
}

/// `banger image warm [IMAGE] | list | rm`.
async fn warm(client: &jsonrpsee::async_client::Client, a: WarmArgs) -> Result<(), CliError> {
    let rows = |all: &[banger_api::WarmInfo]| -> Vec<Vec<String>> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        all.iter()
            .map(|w| {
                vec![
                    w.id.clone(),
                    w.image_name().to_owned(),
                    w.kernel_name().to_owned(),
                    w.vmm.as_str().to_owned(),
                    format!(
                        "{} vCPU, {} MiB, {}",
                        w.spec.vcpu,
                        w.spec.memory_mib,
                        bytes(w.spec.disk_bytes)
                    ),
                    if w.network { "yes" } else { "no" }.to_owned(),
                    bytes(w.bytes),
                    format!("{} ago", render::duration(now.saturating_sub(w.created_at))),
                ]
            })
            .collect()
    };
    let table = |all: &[banger_api::WarmInfo]| {
        render::table(
            &[
                "ID", "IMAGE", "KERNEL", "VMM", "SIZE", "NETWORK", "DISK", "MADE",
            ],
            &[false, false, false, false, false, false, true, false],
            &rows(all),
        )
    };
    match a.cmd {
        Some(WarmCmd::List { json }) => {
            let all = client.warm_list().await?;
            if json {
                render::json(&all)?;
            } else if all.is_empty() {
                eprintln!("no warm snapshots; make one with `banger image warm <image>`");
            } else {
                out!("{}", table(&all));
            }
        }
        Some(WarmCmd::Rm { which, json }) => {
            let gone = client.warm_rm(which).await?;
            if json {
                render::json(&gone)?;
            } else {
                for w in &gone {
                    outln!("{}", w.id);
                }
            }
        }
        None => {
            let t0 = Instant::now();
            let (vcpu, memory_mib, disk_bytes) = crate::commands::vm::size_req(&a.size);
            let req = banger_api::WarmImage {
                image: a.image,
                kernel: a.kernel,
                vcpu,
                memory_mib,
                disk_bytes,
                vmm: a.vmm,
                network: a.no_network.then_some(false),
            };
            let sub = client.warm(req).await?;
            let w = match crate::commands::vm::follow_events(sub, a.json).await? {
                banger_api::Progress::Warmed { warm } => warm,
                other => {
                    return Err(CliError::Other(format!(
                        "the daemon ended the warm-up with {other:?}, not the warm snapshot"
                    )));
                }
            };
            if a.json {
                render::json(&w)?;
            } else {
                eprintln!(
                    "warm snapshot {} of {} made ({}, {:.1}s): `banger vm run` with this image and size restores it",
                    w.id,
                    w.image_name(),
                    bytes(w.bytes),
                    t0.elapsed().as_secs_f64()
                );
                outln!("{}", w.id);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::{KernelFit, VmmKind};

    #[test]
    fn kernel_show_says_which_vmms_it_suits_and_why() {
        let k = KernelInfo {
            name: "cloud".into(),
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd".into()),
            modules: None,
            registered_at: 0,
            format: Some("bzImage (LZ4 (legacy frame) payload)".into()),
            vmlinux: Some("/k/vmlinux".into()),
            config: None,
            fits: vec![
                KernelFit {
                    vmm: VmmKind::Firecracker,
                    fits: Some(false),
                    reasons: vec!["a: x".into(), "b: y".into()],
                },
                KernelFit {
                    vmm: VmmKind::Qemu,
                    fits: None,
                    reasons: vec!["unknown (no config)".into()],
                },
            ],
        };
        assert_eq!(
            kernel_text(&k),
            "name:    cloud\n\
             kernel:  /k/vmlinuz (bzImage (LZ4 (legacy frame) payload))\n\
             vmlinux: /k/vmlinux\n\
             initrd:  /k/initrd\n\
             modules: -\n\
             config:  -\n\
             vmms:\n  \
             firecracker  no: a: x; b: y\n  \
             qemu         unknown (no config)\n"
        );
    }
}
