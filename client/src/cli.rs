//! The command line (clap derive). Every read command takes `--json`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// banger: disposable development sandboxes as Firecracker microVMs.
#[derive(Debug, Parser)]
#[command(
    name = "banger",
    version = crate::commands::version::SHORT,
    about,
    after_help = "Examples:\n  banger daemon status          is the daemon up? (pid, socket, log, uptime)\n  banger version --json         versions of this CLI and of the daemon\n  banger completion bash > ~/.local/share/bash-completion/completions/banger"
)]
pub struct Cli {
    /// The daemon's socket (default: /run/banger/bangerd.sock when the system service is
    /// installed, else $XDG_RUNTIME_DIR/banger/bangerd.sock).
    #[arg(long, global = true, env = "BANGER_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the banger daemon (bangerd).
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// Print the versions of this CLI and of the running daemon.
    #[command(after_help = "Examples:\n  banger version\n  banger version --json")]
    Version {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  banger completion bash > ~/.local/share/bash-completion/completions/banger\n  banger completion zsh > \"${fpath[1]}/_banger\"\n  banger completion fish > ~/.config/fish/completions/banger.fish"
    )]
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum DaemonCmd {
    /// Show whether bangerd is running: pid, version, socket, log, uptime, store.
    /// Exits 3 when it is not running (it does not start it).
    #[command(
        after_help = "Examples:\n  banger daemon status\n  banger daemon status --json | jq .pid"
    )]
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start bangerd in the background if it is not running (other commands do this for you).
    Start,
    /// Stop bangerd gracefully: in-flight requests finish, the socket is removed.
    /// Running VMs keep running.
    Stop,
    /// Print the path of the daemon's socket.
    Socket {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}
