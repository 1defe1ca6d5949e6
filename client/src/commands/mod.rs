//! One module per command group; each turns parsed arguments into calls and output.

pub mod daemon;
pub mod version;

use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::connect::Target;
use crate::exit::{self, CliError};

/// Run a parsed command line; returns the exit status.
pub async fn run(cli: Cli) -> Result<u8, CliError> {
    let target = Target::resolve(cli.socket);
    match cli.command {
        Command::Daemon(cmd) => daemon::run(&target, cmd).await,
        Command::Version { json } => version::run(&target, json).await,
        Command::Completion { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "banger", &mut std::io::stdout());
            Ok(exit::OK)
        }
    }
}
