//! `banger-fc-double`: a stand-in for `jailer ... -- firecracker --api-sock /api.sock`, so
//! the Firecracker driver can be tested end to end against a real process; run under a
//! name containing `firecracker`, a stand-in for Firecracker alone (no jailer). Everything it
//! does is in `banger_actors::vmm::firecracker::double::process`; this parses the command
//! line, reads the injected faults, and runs it.
//!
//! stdout is the guest's serial console (and `--help`); errors go to stderr, as the real
//! jailer and Firecracker print them.

// A binary's terminal output is its interface: the console on stdout, errors on stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use banger_actors::vmm::firecracker::double;
use banger_actors::vmm::firecracker::double::process::{self, Invocation};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    // Read before anything else: the real jailer clears the environment before exec.
    let faults = match std::env::var(process::FAIL_ENV) {
        Ok(spec) => match process::parse_faults(&spec) {
            Ok(faults) => faults,
            Err(message) => {
                eprintln!("{message}");
                return ExitCode::from(2);
            }
        },
        Err(_) => Vec::new(),
    };
    let release = std::env::var(process::RELEASE_ENV).unwrap_or_else(|_| "oldest".into());
    let Some(release) = double::Release::parse(&release) else {
        eprintln!(
            "{}: {release:?} is neither `oldest` nor `newest`",
            process::RELEASE_ENV
        );
        return ExitCode::from(2);
    };
    let options = double::Options {
        release,
        guest_agent: std::env::var(process::GUEST_ENV).is_ok_and(|v| v == "1"),
    };
    let argv0 = std::env::args().next().unwrap_or_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if process::runs_as_firecracker(&argv0) {
        run_alone(&args, &faults, options)
    } else {
        run(&args, &faults, options)
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            // `: `-separated, as the jailer prints an error and its cause.
            eprintln!("{}", banger_error::error_chain(&error));
            ExitCode::from(error.exit_code())
        }
    }
}

fn run(
    args: &[String],
    faults: &[process::Fault],
    options: double::Options,
) -> Result<u8, process::ProcessError> {
    let jailer = match process::parse_jailer_args(args)? {
        Invocation::Print(text) => {
            print!("{text}");
            return Ok(0);
        }
        Invocation::Run(jailer) => jailer,
    };
    let jail = process::enter_jail(&jailer)?;
    process::isolate(&jailer, &jail, std::path::Path::new("/proc/mounts"))?;
    let jail = process::enter_root(&jail)?;
    process::drop_privileges(&jailer)?;
    process::open_kvm(&jail)?;
    serve(&jail, faults, options)
}

/// Firecracker without the jailer: serve in the working directory.
fn run_alone(
    args: &[String],
    faults: &[process::Fault],
    options: double::Options,
) -> Result<u8, process::ProcessError> {
    if let Some(text) = process::firecracker_version(args, options.release) {
        print!("{text}");
        return Ok(0);
    }
    let cwd = std::env::current_dir().map_err(process::ProcessError::Console)?;
    let jail = process::firecracker_alone(args, &cwd)?;
    serve(&jail, faults, options)
}

fn serve(
    jail: &process::Jail,
    faults: &[process::Fault],
    options: double::Options,
) -> Result<u8, process::ProcessError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(process::ProcessError::Console)?;
    runtime.block_on(async {
        let shutdown = shutdown_signal().map_err(process::ProcessError::Console)?;
        // SIGUSR1: `poweroff` typed in the guest.
        let poweroff =
            signal(SignalKind::user_defined1()).map_err(process::ProcessError::Console)?;
        let mut stdout = std::io::stdout();
        let outcome =
            process::serve(jail, faults, options, &mut stdout, shutdown, Some(poweroff)).await?;
        Ok(outcome.exit_code())
    })
}

/// Resolves to the number of the first SIGTERM or SIGINT. Registered before serving, so a
/// signal never finds the default action once the API is up.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = i32>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => SignalKind::terminate().as_raw_value(),
            _ = int.recv() => SignalKind::interrupt().as_raw_value(),
        }
    })
}
