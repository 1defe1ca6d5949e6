//! `banger`: parse, call the daemon, render. Exit statuses are listed in [`exit`].
#![allow(clippy::print_stderr)]

// First: its `outln!`/`out!` macros are used by the modules below.
#[macro_use]
mod render;
mod cli;
mod commands;
mod connect;
mod exit;
mod systemd;

use std::process::ExitCode;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("banger: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    // Shell completion (the scripts of `banger completion` call it): before clap, which
    // would parse the words being completed as banger's own.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__complete") {
        runtime.block_on(commands::complete::run(&args[2..]));
        runtime.shutdown_background();
        return ExitCode::from(exit::OK);
    }
    let cli = runtime.block_on(commands::parse());
    let code = match runtime.block_on(commands::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("banger: {err}");
            if let Some(hint) = err.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(err.exit_code())
        }
    };
    // Do not wait for a read of stdin that `vm exec` left blocked.
    runtime.shutdown_background();
    code
}
