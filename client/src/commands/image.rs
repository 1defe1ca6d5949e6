//! `banger image …` and `banger kernel …`.

use banger_api::{ImageRpcClient, ImportKernel, KernelRpcClient, RegisterImage};

use crate::cli::{ImageCmd, KernelCmd};
use crate::commands::vm::bytes;
use crate::connect::{self, Target};
use crate::exit::{self, CliError};
use crate::render;

fn absolute(p: &std::path::Path) -> Result<String, CliError> {
    std::path::absolute(p)
        .map(|p| p.display().to_string())
        .map_err(|e| CliError::Usage(format!("{}: {e}", p.display())))
}

pub async fn image(target: &Target, cmd: ImageCmd) -> Result<u8, CliError> {
    let client = connect::connect_or_start(target).await?;
    match cmd {
        ImageCmd::Register {
            name,
            rootfs,
            kernel,
        } => {
            let rootfs = absolute(&rootfs)?;
            let i = client
                .register(RegisterImage {
                    name,
                    rootfs,
                    kernel,
                })
                .await?;
            println!("{}", i.name);
        }
        ImageCmd::List { json } => {
            let all = ImageRpcClient::list(&client).await?;
            if json {
                render::json(&all)?;
            } else {
                println!("{:<24} {:>9} {:<16}", "NAME", "SIZE", "KERNEL");
                for i in all {
                    println!(
                        "{:<24} {:>9} {:<16}",
                        i.name,
                        bytes(i.size_bytes),
                        i.kernel.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        ImageCmd::Show { name, json } => {
            let i = ImageRpcClient::show(&client, name).await?;
            if json {
                render::json(&i)?;
            } else {
                println!(
                    "name:    {}\nrootfs:  {}\nsize:    {}\nkernel:  {}",
                    i.name,
                    i.rootfs,
                    bytes(i.size_bytes),
                    i.kernel.as_deref().unwrap_or("-")
                );
            }
        }
        ImageCmd::Delete { name } => {
            let i = ImageRpcClient::delete(&client, name).await?;
            println!("{}", i.name);
        }
    }
    Ok(exit::OK)
}

pub async fn kernel(target: &Target, cmd: KernelCmd) -> Result<u8, CliError> {
    let client = connect::connect_or_start(target).await?;
    match cmd {
        KernelCmd::Import { name, from } => {
            let from = absolute(&from)?;
            let k = client.import(ImportKernel { name, from }).await?;
            println!("{}", k.name);
        }
        KernelCmd::List { json } => {
            let all = KernelRpcClient::list(&client).await?;
            if json {
                render::json(&all)?;
            } else {
                println!("{:<24} {:<7} {:<8}", "NAME", "INITRD", "MODULES");
                for k in all {
                    println!(
                        "{:<24} {:<7} {:<8}",
                        k.name,
                        if k.initrd.is_some() { "yes" } else { "no" },
                        if k.modules.is_some() { "yes" } else { "no" }
                    );
                }
            }
        }
        KernelCmd::Show { name, json } => {
            let k = KernelRpcClient::show(&client, name).await?;
            if json {
                render::json(&k)?;
            } else {
                println!(
                    "name:    {}\nkernel:  {}\ninitrd:  {}\nmodules: {}",
                    k.name,
                    k.kernel,
                    k.initrd.as_deref().unwrap_or("-"),
                    k.modules.as_deref().unwrap_or("-")
                );
            }
        }
        KernelCmd::Rm { name } => {
            let k = client.rm(name).await?;
            println!("{}", k.name);
        }
    }
    Ok(exit::OK)
}
