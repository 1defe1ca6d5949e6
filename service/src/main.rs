//! `bangerd`: parse arguments, load config, start tracing, wire signals, run.
#![allow(clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use banger_actors::store::{MigrationCheck, check_migrations};
use banger_api::DaemonMode;
use bangerd::config::Config;
use bangerd::paths::{self, Paths};
use bangerd::{Daemon, Privileged, Settings, privilege, server};

/// The banger daemon. Usually started for you: by the `banger` CLI on first use, or by
/// systemd after `sudo banger system install`.
#[derive(Debug, Parser)]
#[command(version = VERSION, about, after_help = "Examples:\n  bangerd                       run a user daemon in the foreground\n  bangerd --check-migrations    check the store can be opened by this binary\n  sudo bangerd --system         run as the system service (systemd does this)")]
struct Args {
    /// Run as the system service (paths under /var/lib, /run/banger, /etc/banger).
    #[arg(long)]
    system: bool,
    /// Config file (default: $XDG_CONFIG_HOME/banger/config.toml, or /etc/banger/config.toml).
    #[arg(long, env = "BANGER_CONFIG")]
    config: Option<PathBuf>,
    /// Socket to listen on (default: $XDG_RUNTIME_DIR/banger/bangerd.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Check that this binary can open the store (migrating a copy), then exit:
    /// 0 when it can, 1 when it cannot (e.g. the store was written by a newer banger).
    #[arg(long)]
    check_migrations: bool,
    /// Load and check the config as the daemon would (the file, then `BANGER_*`), print
    /// it as JSON with the file it came from, then exit: 0 when bangerd would start on it,
    /// 1 when it refuses it (the reason on stderr). `banger doctor` runs this.
    #[arg(long)]
    check_config: bool,
    /// Started by the CLI: leave the terminal's session, and stop writing to stderr once
    /// serving (everything goes to bangerd.log).
    #[arg(long, hide = true)]
    background: bool,
}

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BANGER_COMMIT"),
    ", built ",
    env!("BANGER_BUILD_TIME"),
    ")"
);

fn main() -> ExitCode {
    // The privileged helper is this same binary (see bangerd::privilege).
    let mut argv = std::env::args();
    match argv.nth(1).as_deref() {
        Some(banger_policy::helper::HELPER_ARG) => {
            return banger_policy::helper::main(&argv.next().unwrap_or_default());
        }
        Some(banger_policy::helper::SELFTEST_ARG) => {
            let config = argv.next().unwrap_or_default();
            return banger_policy::helper::selftest(&config, &argv.next().unwrap_or_default());
        }
        // A QEMU VM's agent proxy (see banger_guest::mux), spawned by the QEMU driver.
        Some(banger_guest::mux::PROXY_ARG) => {
            let serial = PathBuf::from(argv.next().unwrap_or_default());
            let listen = PathBuf::from(argv.next().unwrap_or_default());
            return bangerd::agent_proxy(&serial, &listen);
        }
        // `banger internal make-bundle` runs this (see bangerd::tools).
        Some(banger_api::tools::MAKE_BUNDLE_ARG) => {
            return bangerd::tools::make_bundle(&argv.next().unwrap_or_default());
        }
        _ => {}
    }
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bangerd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.background {
        // Own session: a Ctrl-C in the terminal that started the CLI does not reach us.
        let _ = nix::unistd::setsid();
    }
    let mode = if args.system {
        DaemonMode::System
    } else {
        DaemonMode::User
    };
    let env = |k: &str| std::env::var(k).ok();
    let config_path = args
        .config
        .clone()
        .or_else(|| paths::config_file(mode, &env));
    let config = Config::load(
        config_path.as_deref(),
        args.config.is_some(),
        std::env::vars(),
    )?;
    if args.check_config {
        bangerd::tools::print_config(config_path.as_deref(), &config)
            .context("cannot print the config")?;
        return Ok(ExitCode::SUCCESS);
    }
    let paths = Paths::resolve(mode, &config, args.socket.as_deref(), &env)?;

    if args.check_migrations {
        return Ok(match check_migrations(&paths.store_file()) {
            Ok(MigrationCheck::NoStore { would_create }) => {
                eprintln!(
                    "no store at {} yet; it will be created at schema version {would_create}",
                    paths.store_file().display()
                );
                ExitCode::SUCCESS
            }
            Ok(MigrationCheck::Ok { from, to }) => {
                eprintln!(
                    "store {}: schema version {from}, migrates to {to}: ok",
                    paths.store_file().display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bangerd: {:#}", anyhow::Error::from(e));
                ExitCode::FAILURE
            }
        });
    }

    paths.create_dirs()?;
    let mut privileged = Privileged::default();
    if nix::unistd::geteuid().is_root() {
        // Before any thread exists: fork the helper, then become the owner.
        let owner = privilege::owner(&config, &env)?;
        let helper_config = privilege::helper_config(&config, &paths, owner);
        privileged.helper = Some(privilege::start_helper(&helper_config)?);
        privileged.helper_jails = helper_config.jailer.is_some();
        // The guests' resolver listens on the bridge's port 53, which only root may bind.
        privileged.guest_dns = privilege::bind_guest_dns(&helper_config);
        privilege::drop_to(owner, &paths)?;
    }
    bangerd::logging::init(&paths.log_file(), &config.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bangerd")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let settings = Settings::new(config, paths);
        let daemon = Daemon::start_with(settings, privileged).await?;
        let (listener, socket) =
            server::bind(&daemon.settings().paths.socket, &daemon.settings().access)?;
        eprintln!(
            "bangerd {} listening on {} (log: {})",
            bangerd::VERSION,
            socket.path().display(),
            daemon.settings().paths.log_file().display()
        );
        if args.background
            && let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null")
        {
            let _ = nix::unistd::dup2_stderr(&null);
        }
        let result = daemon.serve(listener, shutdown_signal()).await;
        drop(socket);
        result?;
        tracing::info!("bangerd stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
