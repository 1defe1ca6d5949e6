//! One module per command group; each turns parsed arguments into calls and output.

pub mod complete;
pub mod cp;
pub mod daemon;
pub mod doctor;
pub mod exec;
pub mod image;
pub mod internal;
pub mod run;
pub mod ssh;
pub mod system;
pub mod update;
pub mod version;
pub mod vm;
pub mod workspace;

use clap::CommandFactory;

use crate::cli::{Cli, Command, VmCmd};
use crate::connect::Target;
use crate::exit::{self, CliError};

/// Parse the command line. `vm create --help` shows the defaults that apply now, asked
/// from the daemon (when one answers; nothing is started for help).
pub async fn parse() -> Cli {
    use clap::FromArgMatches;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cmd = Cli::command();
    let words: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
    let wants_create_help = words.windows(2).any(|w| w == ["vm", "create"])
        && words.iter().any(|w| *w == "--help" || *w == "-h");
    if wants_create_help {
        let socket = words
            .windows(2)
            .find(|w| w[0] == "--socket")
            .map(|w| std::path::PathBuf::from(w[1]))
            .or_else(|| std::env::var_os("BANGER_SOCKET").map(Into::into));
        let target = Target::resolve(socket);
        let defaults = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let client = crate::connect::connect(&target).await.ok()?;
            banger_api::VmRpcClient::defaults(&client).await.ok()
        })
        .await
        .ok()
        .flatten();
        let text = match defaults {
            Some(d) => vm::defaults_help(&d),
            None => "Defaults: the daemon is not running, so they are not shown; start it with `banger daemon start`.".into(),
        };
        cmd = cmd.mut_subcommand("vm", |vm| {
            vm.mut_subcommand("create", |c| {
                let before = c
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                c.after_help(format!("{before}\n\n{text}"))
            })
        });
    }
    let matches = cmd.get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Run a parsed command line; returns the exit status.
pub async fn run(cli: Cli) -> Result<u8, CliError> {
    let target = Target::resolve(cli.socket);
    match cli.command {
        Command::Daemon(cmd) => daemon::run(&target, cmd).await,
        Command::System(cmd) => system::run(cmd).await,
        Command::Update {
            check,
            to,
            dry_run,
            force,
            json,
        } => {
            update::run(
                &target,
                update::Opts {
                    check,
                    to,
                    dry_run,
                    force,
                    json,
                },
            )
            .await
        }
        Command::Vm(cmd) => vm::run(&target, cmd).await,
        Command::Ps(args) => vm::ps(&target, args).await,
        // The everyday verbs at the top, as `docker run` and `docker exec` are.
        Command::Run(a) => vm::run(&target, VmCmd::Run(a)).await,
        Command::Exec(a) => vm::run(&target, VmCmd::Exec(a)).await,
        Command::Ssh(a) => vm::run(&target, VmCmd::Ssh(a)).await,
        Command::Cp(a) => vm::run(&target, VmCmd::Cp(a)).await,
        Command::Logs(a) => vm::run(&target, VmCmd::Logs(a)).await,
        Command::Start(a) => vm::run(&target, VmCmd::Start(a)).await,
        Command::Stop(a) => vm::run(&target, VmCmd::Stop(a)).await,
        Command::Suspend(a) => vm::run(&target, VmCmd::Suspend(a)).await,
        Command::Rm(a) => vm::run(&target, VmCmd::Delete(a)).await,
        Command::Pause(a) => vm::run(&target, VmCmd::Pause(a)).await,
        Command::Resume(a) => vm::run(&target, VmCmd::Resume(a)).await,
        Command::Image(cmd) => image::image(&target, cmd).await,
        Command::Kernel(cmd) => image::kernel(&target, cmd).await,
        Command::Internal(cmd) => internal::run(cmd).await,
        Command::Version { json } => version::run(&target, json).await,
        Command::Doctor { json } => doctor::run(&target, json).await,
        Command::SshConfig { uninstall } => {
            let client = if uninstall {
                None
            } else {
                Some(crate::connect::connect_or_start(&target).await?)
            };
            ssh::ssh_config(&target, client.as_ref(), uninstall).await
        }
        Command::SshProxy { host } => {
            let client = crate::connect::connect_or_start(&target).await?;
            ssh::proxy(&client, &host).await
        }
        Command::Help { command } => help(&command),
        Command::Completion { shell } => {
            // bash, zsh and fish ask `banger __complete` (names from the daemon); see `complete`.
            match shell {
                clap_complete::Shell::Bash => {
                    crate::render::stdout_bytes(complete::BASH.as_bytes());
                    return Ok(exit::OK);
                }
                clap_complete::Shell::Zsh => {
                    crate::render::stdout_bytes(complete::ZSH.as_bytes());
                    return Ok(exit::OK);
                }
                clap_complete::Shell::Fish => {
                    crate::render::stdout_bytes(complete::FISH.as_bytes());
                    return Ok(exit::OK);
                }
                _ => {}
            }
            let mut cmd = Cli::command();
            // Into memory first: clap_complete panics when its writer fails (`| head -1`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "banger", &mut script);
            crate::render::stdout_bytes(&script);
            Ok(exit::OK)
        }
    }
}

/// `banger help [COMMAND…]`: the help of banger or of the command named (aliases
/// work: `banger help vm rm`). A command of its own rather than clap's built-in one, which
/// takes no flags (`banger help --help` was an error).
fn help(path: &[String]) -> Result<u8, CliError> {
    let mut cmd = Cli::command();
    cmd.build();
    let mut cur = &mut cmd;
    for (i, name) in path.iter().enumerate() {
        let known = cur.get_subcommands().any(|c| {
            !c.is_hide_set() && (c.get_name() == name || c.get_all_aliases().any(|a| a == name))
        });
        if !known {
            return Err(CliError::Usage(format!(
                "no command `banger {}`; see `banger --help`",
                path[..=i].join(" ")
            )));
        }
        cur = cur.find_subcommand_mut(name).expect("just found");
    }
    out!("{}", cur.render_help());
    Ok(exit::OK)
}
