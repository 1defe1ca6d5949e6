//! The command line (clap derive). Every read command takes `--json`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// banger: disposable development sandboxes as Firecracker microVMs.
#[derive(Debug, Parser)]
#[command(
    name = "banger",
    version = crate::commands::version::SHORT,
    about,
    disable_help_subcommand = true,
    after_help = "Examples:\n  banger run --rm -- uname -a     boot a VM, run a command in it, delete it\n  banger run --name dev           a VM to keep, and a shell in it\n  banger exec dev uname -a        a command in a running VM\n  banger cp ./src dev:/root/      copy into (or out of) a VM\n  banger ps -a                    the VMs (running ones without -a)\n  banger daemon status            is the daemon up? (pid, socket, log)\n  banger version --json           versions of this CLI and of the daemon\n  banger completion bash > ~/.local/share/bash-completion/completions/banger"
)]
pub struct Cli {
    /// The daemon's socket (default: /run/banger/bangerd.sock when the system service is
    /// installed, else $XDG_RUNTIME_DIR/banger/bangerd.sock).
    #[arg(
        long,
        global = true,
        env = "BANGER_SOCKET",
        value_name = "PATH",
        help_heading = "Global options"
    )]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, run and manage VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// List running VMs (`-a`: all of them), as `docker ps`.
    #[command(after_help = PS_HELP)]
    Ps(PsArgs),
    /// Boot a VM and run a command or a shell in it (= `banger vm run`).
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Run a command in a running VM (= `banger vm exec`).
    #[command(after_help = EXEC_HELP)]
    Exec(ExecArgs),
    /// ssh into a running VM (= `banger vm ssh`).
    #[command(after_help = SSH_HELP, alias = "shell")]
    Ssh(SshArgs),
    /// Copy files between the host and a VM (= `banger vm cp`).
    #[command(after_help = CP_HELP)]
    Cp(CpArgs),
    /// Print a VM's console log (= `banger vm logs`).
    #[command(after_help = LOGS_HELP)]
    Logs(LogsArgs),
    /// Start stopped VMs (= `banger vm start`).
    #[command(after_help = START_HELP)]
    Start(StartArgs),
    /// Stop VMs gracefully (= `banger vm stop`).
    #[command(after_help = STOP_HELP)]
    Stop(StopArgs),
    /// Save running VMs to disk and stop their VMMs (= `banger vm suspend`).
    #[command(after_help = SUSPEND_HELP)]
    Suspend(SuspendArgs),
    /// Delete VMs and their disks (= `banger vm rm`).
    #[command(after_help = RM_HELP)]
    Rm(RmArgs),
    /// Freeze running VMs in memory (= `banger vm pause`).
    #[command(after_help = PAUSE_HELP)]
    Pause(PauseArgs),
    /// Let paused VMs run again (= `banger vm resume`).
    #[command(after_help = RESUME_HELP)]
    Resume(PauseArgs),
    /// Manage images (root filesystems).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage guest kernels.
    #[command(subcommand)]
    Kernel(KernelCmd),
    /// Tools for banger's own release work (not needed to use banger).
    #[command(subcommand, hide = true)]
    Internal(InternalCmd),
    /// Manage the banger daemon (bangerd).
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// Install, inspect or remove the systemd service (needs root).
    #[command(subcommand)]
    System(SystemCmd),
    /// Update banger to the latest signed release (or the one named with --to).
    #[command(after_help = UPDATE_HELP)]
    Update {
        /// Only say whether an update is available.
        #[arg(long)]
        check: bool,
        /// Install this version (e.g. v0.3.1); allows going back to an older one.
        #[arg(long, value_name = "vX.Y.Z", value_parser = parse_version)]
        to: Option<String>,
        /// Download, verify and stage it, run its migration check, then stop.
        #[arg(long)]
        dry_run: bool,
        /// Update even while a VM is starting or stopping.
        #[arg(long)]
        force: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the host, the daemon and running VMs; one line per check with what to do.
    /// Exits 1 when a check fails.
    #[command(
        after_help = "Examples:\n  banger doctor\n  banger doctor --json | jq '.[] | select(.status != \"ok\")'"
    )]
    Doctor {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the versions of this CLI and of the running daemon.
    #[command(after_help = "Examples:\n  banger version\n  banger version --json")]
    Version {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let plain `ssh <vm>.vm` (and scp, rsync) reach banger's VMs: writes banger's own
    /// `Host *.vm` block and ONE `Include` line at the top of ~/.ssh/config.
    #[command(
        name = "ssh-config",
        after_help = "Examples:\n  banger ssh-config && ssh dev.vm\n  banger ssh-config --uninstall      remove the Include line and banger's block"
    )]
    SshConfig {
        /// Remove the Include line and the managed file.
        #[arg(long)]
        uninstall: bool,
    },
    /// ssh's ProxyCommand: splice stdin/stdout with sshd in the VM, through its agent.
    #[command(name = "__ssh-proxy", hide = true)]
    SshProxy {
        /// `<vm>` or `<vm>.vm`.
        host: String,
    },
    /// Print the help of banger or of one of its commands (`banger help vm run`).
    Help {
        /// The command, e.g. `vm run` (none: banger's own help).
        command: Vec<String>,
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
    /// Same as `banger system install`.
    Install(InstallArgs),
    /// Same as `banger system uninstall`.
    Uninstall(RootArgs),
    /// Print bangerd's log (JSON lines); -f follows it.
    #[command(
        after_help = "Examples:\n  banger daemon logs --tail 20\n  banger daemon logs -f | jq -r .fields.message"
    )]
    Logs {
        /// Keep printing new lines as bangerd writes them (Ctrl-C ends it).
        #[arg(long, short)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, short = 'n', value_name = "N")]
        tail: Option<usize>,
    },
    /// Restart the daemon that serves: the system service through systemd (as `banger
    /// system restart`), a user daemon by stopping and starting it, none by starting one.
    /// Running VMs keep running.
    Restart,
}

/// Flags of `system install`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The user the daemon drops to (default: the user who ran sudo).
    #[arg(long)]
    pub owner: Option<String>,
    /// Take the static guest binaries (banger-init, banger-agent) from DIR (default: beside
    /// this banger, its ../lib/banger, or a checkout's target/guest).
    #[arg(long, value_name = "DIR")]
    pub guest_dir: Option<PathBuf>,
    #[command(flatten)]
    pub root: RootArgs,
}

/// The root prefix of `system` commands.
#[derive(Debug, clap::Args)]
pub struct RootArgs {
    /// Install into this directory instead of / (for images and tests): systemctl runs
    /// offline on it and nothing is started.
    #[arg(long, hide = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SystemCmd {
    /// Install banger and bangerd to /usr/local/bin and enable bangerd.service.
    #[command(
        after_help = "Examples:\n  sudo banger system install\n  sudo banger system install --owner alice\n\nIt copies the banger and bangerd beside this executable, writes\n/etc/systemd/system/bangerd.service (+ bangerd.service.d/owner.conf), creates\nthe group `banger` (its members may use the socket /run/banger/bangerd.sock),\nand starts the service."
    )]
    Install(InstallArgs),
    /// Show whether the service is installed, enabled and running.
    #[command(after_help = "Examples:\n  banger system status\n  banger system status --json")]
    Status(RootArgs),
    /// Restart bangerd.service (VMs keep running).
    Restart,
    /// Stop and remove the service and binaries; your data, logs and config stay.
    #[command(after_help = "Examples:\n  sudo banger system uninstall")]
    Uninstall(RootArgs),
}

const UPDATE_HELP: &str = "Examples:\n  banger update --check\n  sudo banger update                 (the system service)\n  banger update --to v0.3.1 --dry-run\n\nReleases come from the URL built into banger and must carry a valid signature by\nbanger's release key; the tarball's SHA-256 must match the signed SHA256SUMS.\nThe binaries beside this banger are replaced (rename), the daemon restarted and\nchecked (version, doctor); if that fails the previous binaries are put back.";

/// Size flags shared by `vm create` and `vm set`.
#[derive(Debug, clap::Args)]
pub struct SizeArgs {
    /// Number of vCPUs.
    #[arg(long)]
    pub vcpu: Option<u32>,
    /// Memory, e.g. 2G or 512M.
    #[arg(long, value_parser = parse_memory)]
    pub memory: Option<u64>,
    /// Size of the work disk mounted at /root, e.g. 8G (sparse: costs only what is used).
    #[arg(long = "disk-size", value_parser = parse_size)]
    pub disk_size: Option<u64>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    crate::commands::vm::parse_size(s)
}

/// `--to`: a release version, `[v]MAJOR.MINOR.PATCH[-pre]`, checked before anything is
/// fetched (`--to 1.2` was looked up in the release manifest first).
fn parse_version(s: &str) -> Result<String, String> {
    let bare = s.strip_prefix('v').unwrap_or(s);
    let (core, pre) = match bare.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (bare, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    let numbers = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let pre_ok = pre.is_none_or(|p| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    });
    if numbers && pre_ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a release version: use MAJOR.MINOR.PATCH, e.g. v0.3.1 (`banger update --check` shows the latest)"
        ))
    }
}

/// Memory goes to the daemon in whole MiB: a size that is not one (`--memory 1` is one
/// byte, which would arrive as 0 MiB) is refused here, in the user's units.
fn parse_memory(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s)?;
    if bytes % (1 << 20) != 0 {
        return Err(format!(
            "{s:?} is {}, not a whole number of MiB: give a unit, e.g. 2G or 512M",
            crate::commands::vm::bytes(bytes)
        ));
    }
    Ok(bytes)
}

/// `--ttl`: a duration as whole numbers with units, `1h30m`, `90s`, `10m`, `2d` (a bare
/// number is seconds); more than zero.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration: write it as 90s, 10m, 1h30m or 2d");
    let (mut total, mut digits) = (0u64, String::new());
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() {
        total = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| total.checked_add(n))
            .ok_or_else(bad)?;
    }
    if total == 0 {
        return Err(format!(
            "--ttl {s:?} is no time at all: give it at least 1s"
        ));
    }
    Ok(total)
}

/// `vm set --ttl`: a duration as [`parse_ttl`], or `none` (0: no deadline).
pub fn parse_ttl_or_none(s: &str) -> Result<u64, String> {
    if s == "none" { Ok(0) } else { parse_ttl(s) }
}

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Create a VM and start it (its size: flags, else [vm_defaults], else host-derived).
    #[command(after_help = CREATE_HELP)]
    Create {
        /// Name (a-z, 0-9, '-'); generated when absent. Same as --name.
        #[arg(value_name = "NAME", conflicts_with = "name")]
        name_arg: Option<String>,
        /// Name (a-z, 0-9, '-'); generated when absent.
        #[arg(long)]
        name: Option<String>,
        /// Image (default: the config's default_image_name).
        #[arg(long)]
        image: Option<String>,
        /// Kernel (default: the image's).
        #[arg(long)]
        kernel: Option<String>,
        #[command(flatten)]
        size: SizeArgs,
        /// VMM: auto, firecracker or qemu (default: the config's default_vmm, itself
        /// `auto` unless set). `auto` picks Firecracker when it and its jailer are installed,
        /// /dev/kvm runs stock guests and bangerd has its privileged helper; else QEMU with
        /// KVM; else QEMU under TCG (emulated, slow). Decided when the VM is created; the VM
        /// keeps it.
        #[arg(long, value_name = "VMM")]
        vmm: Option<banger_api::VmmChoice>,
        /// Give the VM outbound network access through NAT.
        #[arg(long)]
        nat: bool,
        /// No network at all: no tap, no address, no `<vm>.vm` (vsock still works, so
        /// `vm exec` does too). Needs no privileges.
        #[arg(long, conflicts_with = "nat")]
        no_network: bool,
        /// A network even when the config's `[vm_defaults] network` is false.
        #[arg(long, conflicts_with = "no_network")]
        network: bool,
        /// Only create it (disks included); start it later with `banger vm start`.
        #[arg(long)]
        no_start: bool,
        /// Restore the VM from a snapshot instead of booting it: `VM/SNAPSHOT` (see `banger
        /// vm snapshot list`). It runs on from that moment as a machine of its own (a fork,
        /// see `banger vm fork`), with the snapshot's image, kernel, size and VMM.
        #[arg(long, value_name = "VM/SNAPSHOT", conflicts_with_all = ["image", "kernel", "vmm", "no_start"])]
        from_snapshot: Option<String>,
        /// Boot the VM even when a warm snapshot of its image, kernel, size and VMM could
        /// restore it in a fraction of the time (see `banger image warm`).
        #[arg(long, conflicts_with = "from_snapshot")]
        cold: bool,
        /// Stop the VM this long after its create (90s, 10m, 1h30m, 2d; E2B's timeout);
        /// `banger vm set --ttl` moves the deadline.
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Option<u64>,
        #[command(flatten)]
        publish: PublishArgs,
        #[command(flatten)]
        egress: EgressArgs,
        /// Print the VM as JSON when done.
        #[arg(long)]
        json: bool,
    },
    /// Create and boot a VM, then run a command in it (exits with its status), or open an
    /// interactive shell; with a path, that repo is shipped to /root/repo first.
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Ship a git repo into a VM, or export what changed in it there.
    #[command(subcommand)]
    Workspace(WorkspaceCmd),
    /// Start stopped VMs (each in turn; every failure is reported, exit non-zero if any).
    #[command(after_help = START_HELP)]
    Start(StartArgs),
    /// Stop VMs gracefully (Ctrl-Alt-Del, then SIGKILL after the timeout). Disks are kept.
    /// A suspended VM's saved state is discarded (its next start boots).
    #[command(after_help = STOP_HELP)]
    Stop(StopArgs),
    /// Freeze running VMs in memory: their vCPUs stop, the VMM and the guest's memory stay
    /// (exec, ssh and cp are refused until `vm resume`). A paused VM is left as it is.
    #[command(after_help = PAUSE_HELP)]
    Pause(PauseArgs),
    /// Let paused VMs run again where they were. A running VM is left as it is.
    #[command(after_help = RESUME_HELP)]
    Resume(PauseArgs),
    /// Save running VMs to disk (memory and device state, in the VM's directory) and stop
    /// their VMMs, freeing their memory; `vm start` restores each where it was.
    #[command(after_help = SUSPEND_HELP)]
    Suspend(SuspendArgs),
    /// Stop (if running) and start a VM.
    Restart {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// Print the VM as JSON when done.
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to VMs' VMM processes (default KILL).
    #[command(
        after_help = "Examples:\n  banger vm kill dev\n  banger vm kill dev other --signal TERM"
    )]
    Kill {
        /// The VMs' names or IDs (a unique prefix will do).
        #[arg(required = true, value_name = "VM")]
        vms: Vec<String>,
        /// The signal: a name (KILL, TERM, INT, …, with or without SIG) or a number.
        #[arg(long, short = 's', default_value = "KILL")]
        signal: String,
        /// Print the VMs as JSON (an array) when done.
        #[arg(long)]
        json: bool,
    },
    /// Delete VMs and their disks.
    #[command(visible_alias = "rm", after_help = RM_HELP)]
    Delete(RmArgs),
    /// Change a stopped VM's size (the work disk only grows), its network policy, or
    /// its deadline.
    #[command(
        after_help = "Examples:\n  banger vm set dev --vcpu 4 --memory 4G\n  banger vm set dev --disk-size 20G\n  banger vm set dev --ttl 2h"
    )]
    Set {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        #[command(flatten)]
        size: SizeArgs,
        /// Give the VM outbound network access through NAT.
        #[arg(long, overrides_with = "no_nat")]
        nat: bool,
        /// Take away its NAT (outbound access).
        #[arg(long)]
        no_nat: bool,
        /// Print the VM as JSON when done.
        #[arg(long)]
        json: bool,
        /// A new egress policy (none, all, subnet, allow=RULE,…); applied at once to a
        /// running VM.
        #[arg(long, value_name = "POLICY", conflicts_with_all = ["nat", "no_nat"])]
        egress: Option<banger_api::Egress>,
        /// Cut the VM off from the other VMs (at once when it runs).
        #[arg(long, overrides_with = "no_isolate")]
        isolate: bool,
        /// Let it reach the other VMs again.
        #[arg(long)]
        no_isolate: bool,
        /// A new deadline this long from now (90s, 10m, 1h30m, 2d), or `none` to remove
        /// it; what happens then (stop, or delete after `vm run --rm`) stays as it was.
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl_or_none)]
        ttl: Option<u64>,
    },
    /// List all VMs (`banger ps` without -a: the running ones).
    #[command(
        visible_alias = "ls",
        after_help = "Examples:\n  banger vm ls\n  banger vm ls --json | jq -r '.[].name'\n  banger vm ls -q"
    )]
    List {
        /// Only the VMs' IDs, one a line.
        #[arg(short = 'q', long, conflicts_with_all = ["json", "format"])]
        quiet: bool,
        /// A Go-template-like line per VM or a list of columns (see `banger ps --help`).
        #[arg(long, value_name = "FORMAT", conflicts_with = "json")]
        format: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM.
    Show {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resource use of a VM (host-side VMM figures).
    Stats {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a running VM through its guest agent; exits with its status.
    #[command(after_help = EXEC_HELP)]
    Exec(ExecArgs),
    /// ssh into a running VM as root (banger's key and known_hosts, over the VM's vsock:
    /// works without a network); with a command, run it and exit with its status.
    #[command(
        after_help = SSH_HELP,
        // What lima (`limactl shell`) users type.
        alias = "shell"
    )]
    Ssh(SshArgs),
    /// Copy files or directories between the host and a VM, as `docker cp` does.
    #[command(after_help = CP_HELP)]
    Cp(CpArgs),
    /// Publish guest ports on the host (`vm port add|rm|list`).
    #[command(subcommand)]
    Port(PortCmd),
    /// Named snapshots of a running VM, memory included (`vm snapshot create|list|show|rm`);
    /// `vm rollback` returns the VM to one.
    #[command(subcommand, visible_alias = "snap")]
    Snapshot(SnapshotCmd),
    /// Put a VM back to one of its snapshots, memory included: its VMM (if it runs) is
    /// ended, its disks replaced by the snapshot's, and it runs again from that moment.
    #[command(after_help = ROLLBACK_HELP)]
    Rollback {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// The snapshot's name or ID.
        snapshot: String,
        /// Print the VM as JSON when done.
        #[arg(long)]
        json: bool,
    },
    /// Clone a running VM: N new VMs that run on from its memory and disks, each its own
    /// machine (name, machine id, ssh host key, address, MAC).
    #[command(after_help = FORK_HELP)]
    Fork {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// How many clones.
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u32,
        /// Name the clones PREFIX-1 … PREFIX-N (the first free numbers); default: the
        /// VM's name.
        #[arg(long, value_name = "PREFIX")]
        name: Option<String>,
        /// Give the clones outbound network access through NAT (default: as the VM).
        #[arg(long)]
        nat: bool,
        /// Print the clones as JSON (an array) when done.
        #[arg(long)]
        json: bool,
    },
    /// Listening TCP/UDP ports in a running VM, with their processes.
    Ports {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a VM's console log; -f follows it until the VM stops.
    #[command(after_help = LOGS_HELP)]
    Logs(LogsArgs),
    /// Delete all VMs that are not running.
    #[command(
        after_help = "Examples:\n  banger vm prune        list what would be deleted, and ask\n  banger vm prune -f     delete without asking"
    )]
    Prune {
        /// Do not ask.
        #[arg(long, short)]
        force: bool,
    },
}

const RUN_HELP: &str = "Examples:\n  banger vm run --rm -- uname -a        boot, run, exit with its status, delete\n  banger vm run -d --name web -p 8000:8000 -- python3 -m http.server\n  banger vm run --rm . -- make test     ship this repo to /root/repo, test there\n  banger vm run --name dev              an interactive shell in a new VM\n  banger vm run --timings --rm -- true  how long each stage takes\n\nIf the guest never becomes reachable the VM is kept (even with --rm): see\n`banger vm logs <name>`.";

/// `vm run` and `banger run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A directory (a git repo: tracked and untracked-not-ignored files plus .git) to
    /// ship to /root/repo; the command then runs there.
    pub path: Option<PathBuf>,
    /// Name (a-z, 0-9, '-'); generated when absent.
    #[arg(long)]
    pub name: Option<String>,
    /// Image (default: the config's default_image_name).
    #[arg(long)]
    pub image: Option<String>,
    #[command(flatten)]
    pub size: SizeArgs,
    /// VMM: auto, firecracker or qemu (default: the config's default_vmm, itself
    /// `auto` unless set). `auto` picks Firecracker when it and its jailer are installed,
    /// /dev/kvm runs stock guests and bangerd has its privileged helper; else QEMU with
    /// KVM; else QEMU under TCG (emulated, slow). Decided when the VM is created; the VM
    /// keeps it.
    #[arg(long, value_name = "VMM")]
    pub vmm: Option<banger_api::VmmChoice>,
    /// Give the VM outbound network access through NAT.
    #[arg(long)]
    pub nat: bool,
    /// No network at all (vsock still works, so commands and shells do too).
    #[arg(long, conflicts_with = "nat")]
    pub no_network: bool,
    /// Boot the VM even when a warm snapshot could restore it (see `banger image warm`).
    #[arg(long)]
    pub cold: bool,
    #[command(flatten)]
    pub publish: PublishArgs,
    #[command(flatten)]
    pub egress: EgressArgs,
    /// Delete the VM when the command or session ends, whatever its status.
    #[arg(long)]
    pub rm: bool,
    /// Stop the VM this long after its create (90s, 10m, 1h30m, 2d), ending the command
    /// or session; with --rm it is deleted then (also after -d).
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Option<u64>,
    /// Ship the whole directory (ignored files and submodules included).
    #[arg(long)]
    pub full_copy: bool,
    /// Print how long each stage took (create, boot to agent ready, ship, services,
    /// command, delete) to stderr; also BANGER_TIMINGS=1. Takes an optional value:
    /// `--timings=no`; 1/0, yes/no, true/false and on/off are all understood.
    #[arg(
        long,
        env = "BANGER_TIMINGS",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new(),
        hide_possible_values = true
    )]
    pub timings: bool,
    /// Run the command (or open the shell) as soon as the guest agent answers, without
    /// waiting for the guest's services to start (systemd's start-up jobs): seconds
    /// sooner, in a half-booted machine.
    #[arg(long)]
    pub no_boot_wait: bool,
    /// Start it and return (print its name): no shell; a command runs in the
    /// background in the guest, its output in /root/.banger-run.log.
    #[arg(short = 'd', long, conflicts_with = "rm")]
    pub detach: bool,
    /// Environment variable for the command or shell (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest (default: /root/repo with a path, else root's home).
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// The command and its arguments (after `--`); none: an interactive shell.
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

/// `vm exec` and `banger exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The VM's name or ID (a unique prefix will do).
    pub vm: String,
    /// Allocate a terminal (interactive programs).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Environment variable for the command (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// The command and its arguments (`--` before them is optional; banger's own flags go
    /// before the VM's name).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub cmd: Vec<String>,
}

/// `vm ssh` and `banger ssh`.
#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// The VM's name or ID (a unique prefix will do).
    pub vm: String,
    /// A command to run instead of a shell, and its arguments (`--` before it optional).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub cmd: Vec<String>,
}

/// `vm cp` and `banger cp`.
#[derive(Debug, clap::Args)]
pub struct CpArgs {
    /// What to copy: a host path, `VM:PATH` in a VM, or `-` (a tar stream on stdin).
    #[arg(value_name = "SRC")]
    pub src: String,
    /// Where to: a host path, `VM:PATH` in a VM, or `-` (a tar stream on stdout).
    #[arg(value_name = "DST")]
    pub dst: String,
}

/// `vm logs` and `banger logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The VM's name or ID (a unique prefix will do).
    pub vm: String,
    /// Keep printing new output until the VM stops (Ctrl-C ends it).
    #[arg(long, short)]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long, short = 'n', value_name = "N", conflicts_with = "bytes")]
    pub tail: Option<usize>,
    /// Only the last N bytes.
    #[arg(long, value_name = "N")]
    pub bytes: Option<u64>,
    /// What the VM's egress policy refused instead: names its resolver refused, and
    /// flows the host dropped in the last hour (the latest first).
    #[arg(long, conflicts_with_all = ["follow", "tail", "bytes"])]
    pub egress: bool,
    /// With --egress: print JSON.
    #[arg(long, requires = "egress")]
    pub json: bool,
}

/// `vm start` and `banger start`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The VMs' names or IDs (a unique prefix will do).
    #[arg(required = true, value_name = "VM")]
    pub vms: Vec<String>,
    /// Print the VMs as JSON (an array) when done.
    #[arg(long)]
    pub json: bool,
}

/// `vm stop` and `banger stop`.
#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// The VMs' names or IDs (a unique prefix will do).
    #[arg(required = true, value_name = "VM")]
    pub vms: Vec<String>,
    /// Seconds to wait for the guest before killing it (default: config stop_timeout_secs).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Print the VMs as JSON (an array) when done.
    #[arg(long)]
    pub json: bool,
}

/// `vm pause|resume` and `banger pause|resume`.
#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    /// The VMs' names or IDs (a unique prefix will do).
    #[arg(required = true, value_name = "VM")]
    pub vms: Vec<String>,
    /// Print the VMs as JSON (an array) when done.
    #[arg(long)]
    pub json: bool,
}

/// `vm suspend` and `banger suspend`: the same arguments.
pub type SuspendArgs = PauseArgs;

/// `vm rm` and `banger rm`.
#[derive(Debug, clap::Args)]
pub struct RmArgs {
    /// The VMs' names or IDs (a unique prefix will do).
    #[arg(required = true, value_name = "VM")]
    pub vms: Vec<String>,
    /// Kill running VMs first.
    #[arg(long, short)]
    pub force: bool,
    /// Print the deleted VMs as JSON (an array).
    #[arg(long)]
    pub json: bool,
}

/// `banger ps` (and `vm list`'s flags).
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// All VMs, not only the running ones.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Only the VMs' IDs, one a line.
    #[arg(short = 'q', long, conflicts_with_all = ["json", "format"])]
    pub quiet: bool,
    /// A Go-template-like line per VM (`{{.Name}} {{.State}}`; `table ...` adds a header)
    /// or a list of columns (`name,state,ip`). Fields: id, name, state, image, kernel,
    /// ip, vmm, vcpu, memory, disk, pid, ports, created, uptime.
    #[arg(long, value_name = "FORMAT", conflicts_with = "json")]
    pub format: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

const PS_HELP: &str = "Examples:\n  banger ps                         running VMs\n  banger ps -a                      all of them\n  banger rm -f $(banger ps -aq)     delete every VM\n  banger ps -a --format name,state,ip\n  banger ps --format '{{.Name}}\\t{{.IP}}'";

const EXEC_HELP: &str = "Examples:\n  banger vm exec dev uname -a\n  echo hi | banger vm exec dev cat\n  banger vm exec dev -- ls -la      `--` when the command could be taken\n                                    for banger's flags\n  banger vm exec -w /root -e FOO=bar dev sh -c 'echo $FOO'";

const SSH_HELP: &str = "Examples:\n  banger vm ssh dev\n  banger vm ssh dev uname -a\n\nFor plain `ssh dev.vm`, scp and rsync: `banger ssh-config`.";

const CP_HELP: &str = "Examples:\n  banger vm cp ./app dev:/root/         into /root/app in dev\n  banger vm cp dev:/etc/os-release .    out of dev, into this directory\n  banger vm cp ./a.txt dev:/root/b.txt  a file under a new name\n  tar -c . | banger vm cp - dev:/root/src\n  banger vm cp dev:/var/log - | tar -t\n\nAs `docker cp`: a DST that is a directory receives SRC inside it, else SRC is\ncopied as DST (its parent must exist); `SRC/.` copies a directory's content.\nThe VM must be running (its agent packs and unpacks; owners and modes kept).";

const LOGS_HELP: &str = "Examples:\n  banger vm logs dev\n  banger vm logs --tail 20 dev\n  banger vm logs -f -n 0 dev     only what comes next\n  banger vm logs --egress dev    what its egress policy refused";

const START_HELP: &str = "Examples:\n  banger vm start dev\n  banger vm start dev other --json";

const STOP_HELP: &str = "Examples:\n  banger vm stop dev\n  banger vm stop dev other --timeout 5";

const PAUSE_HELP: &str = "Examples:\n  banger vm pause dev\n  banger pause dev other --json\n\nThe guest does not run while paused: its clock and processes stand still, exec,\nssh and cp say it is paused (exit 6), its published ports get no answer.\n`vm stop` of a paused VM resumes it and shuts it down; `vm kill` and `vm rm -f`\nend it as it is. A daemon restart keeps it paused.";

const RESUME_HELP: &str = "Examples:\n  banger vm resume dev\n  banger resume dev other --json";

const SUSPEND_HELP: &str = "Examples:\n  banger vm suspend dev\n  banger vm start dev          restores it where it was\n  banger suspend dev other --json\n\nThe VM's processes, open files and tmpfs survive; its clock is set to the\nhost's and its random pool reseeded when it is restored. `banger vm stop` of a\nsuspended VM discards the saved state.";

const RM_HELP: &str =
    "Examples:\n  banger vm rm dev\n  banger vm rm -f dev other\n  banger rm -f $(banger ps -aq)";

/// `--egress` and `--isolate`, shared by `vm create` and `vm run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EgressArgs {
    /// What the VM may reach: `subnet` (the default: the bridge subnet, no NAT), `all`
    /// (what --nat means), `none` (only the bridge resolver, which then answers only
    /// `.vm`), or `allow=RULE,…` where a rule is a CIDR (10.0.0.0/8), ADDRESS:PORT
    /// (192.0.2.7:443) or a domain (example.org, *.example.org): NAT, the subnet, DNS to the
    /// bridge resolver and what the rules allow; domains are answered by the resolver only
    /// when allowed and their addresses are reachable for their TTL. Drops are counted
    /// (`banger vm stats`).
    #[arg(long, value_name = "POLICY", conflicts_with = "nat")]
    pub egress: Option<banger_api::Egress>,
    /// Cut the VM off from the other VMs on the bridge, both ways (by default VMs reach
    /// each other); DNS, the host and published ports keep working.
    #[arg(long)]
    pub isolate: bool,
}

/// `--publish`, shared by `vm create` and `vm run`.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Publish a guest TCP port on the host (repeatable): bangerd listens on HOSTIP
    /// (default 127.0.0.1) and splices each connection to GUESTPORT in the guest through
    /// its agent (no root, works with --no-network). HOSTPORT 0 picks a free port
    /// (`banger vm port list` shows it).
    #[arg(
        long = "publish",
        short = 'p',
        value_name = "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp]"
    )]
    pub publish: Vec<banger_api::PortSpec>,
}

/// `banger vm port …`.
#[derive(Debug, Subcommand)]
pub enum PortCmd {
    /// Publish a guest TCP port on the host: now if the VM runs, else when it starts.
    #[command(
        after_help = "Examples:\n  banger vm port add dev 8080:80             127.0.0.1:8080 -> port 80 in dev\n  banger vm port add dev 0:8000              any free host port (printed)\n  banger vm port add dev 0.0.0.0:8080:80     reachable from other hosts too"
    )]
    Add {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// What to publish: host address (default 127.0.0.1), host port (0: any free
        /// one), guest port; tcp only.
        #[arg(value_name = "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp]")]
        spec: banger_api::PortSpec,
        /// Print the port as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop publishing a port: by host port (the one bound for 0 too) or by its spec.
    #[command(
        visible_alias = "remove",
        after_help = "Examples:\n  banger vm port rm dev 8080\n  banger vm port rm dev 0:8000"
    )]
    Rm {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// The host port (the bound one, for a spec with port 0) or the spec as added.
        #[arg(value_name = "HOSTPORT|SPEC")]
        port: String,
    },
    /// The VM's published ports, with the host port bound while it runs.
    #[command(visible_alias = "ls")]
    List {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// Print the ports as JSON.
        #[arg(long)]
        json: bool,
    },
}

const FORK_HELP: &str = "Examples:\n  banger vm fork dev                  one clone, dev-1\n  banger vm fork dev -n 4 --name try  try-1 … try-4\n  banger vm fork dev --nat --json\n\nThe VM is snapshotted (its vCPUs stop for the save, then it runs on) and each\nclone restored from that moment: its processes, files and memory are the VM's.\nBefore a clone's network is attached it takes its own hostname, machine id, ssh\nhost key, address and MAC. A clone has a network if the VM has one (it restores\nthe VM's NIC) and gets the VM's egress policy unless --nat says otherwise; it\ndoes not get its published ports, deadline or snapshots. A clone that fails\nundoes the whole fork.";

const ROLLBACK_HELP: &str = "Examples:\n  banger vm snapshot create dev before-upgrade\n  banger vm exec dev -- apt-get -y dist-upgrade\n  banger vm rollback dev before-upgrade     as it was, processes included\n\nWhat the guest did since the snapshot is gone: files, processes, memory. The\nsnapshot is kept, so a VM can go back to it again. Refused, with nothing\nchanged, when the VM's size, image or kernel or this host's VMM release is not\nwhat it was when the snapshot was taken.";

/// `banger vm snapshot …`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a running (or paused) VM: its vCPUs stop while its memory and device
    /// state are saved and its disks copied (sparse), then it runs on as it was.
    #[command(
        after_help = "Examples:\n  banger vm snapshot create dev                   named snap-1, snap-2, …\n  banger vm snapshot create dev before-upgrade\n  banger vm snapshot create dev --json\n\nIt takes about the guest's memory in use plus the data on its disks\n(`banger vm snapshot list` shows each one's size). Only `vm rollback` uses it;\nit is deleted with its VM."
    )]
    Create {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// The snapshot's name (a-z, 0-9, '-', '.', '_'); `snap-N` when absent.
        name: Option<String>,
        /// Print the snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The snapshots of a VM, or of every VM, oldest first.
    #[command(
        visible_alias = "ls",
        after_help = "Examples:\n  banger vm snapshot ls dev\n  banger vm snapshot ls --json | jq -r '.[].name'"
    )]
    List {
        /// The VM's name or ID (all VMs when absent).
        vm: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One snapshot of a VM.
    Show {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// The snapshot's name or ID.
        snapshot: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshots of a VM (their files); the VM is not touched.
    #[command(
        visible_alias = "remove",
        after_help = "Examples:\n  banger vm snapshot rm dev before-upgrade\n  banger vm snapshot rm dev snap-1 snap-2"
    )]
    Rm {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// The snapshots' names or IDs.
        #[arg(required = true, value_name = "SNAPSHOT")]
        snapshots: Vec<String>,
        /// Print the deleted snapshots as JSON (an array).
        #[arg(long)]
        json: bool,
    },
}

/// `banger vm workspace …`.
#[derive(Debug, Subcommand)]
pub enum WorkspaceCmd {
    /// Ship a git repo to /root/repo in a running VM: tracked and untracked-not-ignored
    /// files (or the whole tree with --full-copy) and its .git, so the guest has a repo.
    #[command(
        after_help = "Examples:\n  banger vm workspace prepare dev .\n  banger vm workspace prepare dev ~/src/app --from v1.2 --branch try-fix\n  banger vm workspace prepare dev . --full-copy"
    )]
    Prepare {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// The git repo (a directory) to ship.
        path: PathBuf,
        /// Check out a new branch of this name at the shipped ref in the guest.
        #[arg(long)]
        branch: Option<String>,
        /// Ship the tree of this commit/tag/branch instead of the working tree.
        #[arg(long, value_name = "REF")]
        from: Option<String>,
        /// Ship the whole directory (ignored files and submodules included).
        #[arg(long, conflicts_with = "from")]
        full_copy: bool,
    },
    /// A binary git diff (`git apply`-able) of everything changed in the VM's /root/repo
    /// since the shipped ref; the guest's own index is not touched.
    #[command(
        after_help = "Examples:\n  banger vm workspace export dev > changes.diff\n  banger vm workspace export dev --out changes.diff && git apply changes.diff"
    )]
    Export {
        /// The VM's name or ID (a unique prefix will do).
        vm: String,
        /// Write the diff here instead of stdout.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

const CREATE_HELP: &str = "Examples:\n  banger vm create dev\n  banger vm create --name big --vcpu 4 --memory 8G --disk-size 50G\n  banger vm create --vmm qemu --image debian";

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Register a local ext4 root filesystem as an image.
    #[command(
        after_help = "Examples:\n  banger image register debian ./rootfs.ext4 --kernel cloud"
    )]
    Register {
        /// The image's name.
        name: String,
        /// The ext4 file to register (banger keeps its own copy).
        rootfs: PathBuf,
        /// The kernel VMs of this image boot by default.
        #[arg(long)]
        kernel: Option<String>,
        /// Print the image as JSON when done.
        #[arg(long)]
        json: bool,
    },
    /// Pull an image from the catalog or from an OCI registry, with a progress bar on a
    /// terminal.
    #[command(
        after_help = "Examples:\n  banger image pull debian-bookworm            a catalog image (ls --available)\n  banger image pull debian:bookworm --name deb  Docker Hub (library/debian)\n  banger image pull ghcr.io/org/app@sha256:…    any registry, by digest\n  banger image pull 127.0.0.1:5000/dev:1 --size 2G --kernel cloud\n\nPlain-HTTP registries must be listed in the daemon's config: [images]\ninsecure_registries = [\"127.0.0.1:5000\"]."
    )]
    Pull {
        /// A catalog name or an OCI reference.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        source: String,
        /// The image's name (default: the catalog name, or `<repo>-<tag>`).
        #[arg(long)]
        name: Option<String>,
        /// The kernel VMs of this image boot by default (`--kernel-ref`, its old name, works
        /// too).
        #[arg(long = "kernel", alias = "kernel-ref", value_name = "KERNEL")]
        kernel: Option<String>,
        /// Size of the ext4 built from an OCI image or a recipe (default: the content plus
        /// headroom).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Build a catalog image from its recipe even when it has a bundle.
        #[arg(long)]
        build: bool,
        /// Print the image as JSON when done.
        #[arg(long)]
        json: bool,
    },
    /// Build an image and its kernel from a Debian-family mirror with mmdebstrap
    /// (unprivileged; packages are cached across builds).
    #[command(
        after_help = "Examples:\n  banger image build deb    bookworm, banger's guest packages, the cloud kernel\n  banger image build dev --include git,build-essential,curl --size 4G\n  banger image build trixie --suite trixie --mirror http://deb.debian.org/debian\n\nThe mirror: --mirror, else [images] mirror, else the host's apt sources on\nDebian, else http://deb.debian.org/debian. The kernel the package installs\nbecomes a kernel record named after the image (--kernel to name it), and its\nmodules stay in the image. Needs mmdebstrap and uidmap, and a subordinate id\nrange (/etc/subuid, /etc/subgid) for bangerd's user."
    )]
    Build {
        /// The image's name.
        name: String,
        /// The distribution's suite.
        #[arg(long)]
        suite: Option<String>,
        /// The mirror (an http(s) URL).
        #[arg(long)]
        mirror: Option<String>,
        /// Packages to install, comma-separated (banger's guest packages always are).
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// Size of the image's ext4 (default: the content plus headroom).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// The kernel package (default linux-image-cloud-amd64).
        #[arg(long = "kernel-package")]
        kernel_package: Option<String>,
        /// The kernel record's name (default: the image's).
        #[arg(long)]
        kernel: Option<String>,
        /// Print the image as JSON when done.
        #[arg(long)]
        json: bool,
    },
    /// Make a running VM's root filesystem a new image (like `docker commit`); VMs made
    /// from it boot the VM's kernel.
    #[command(
        after_help = "Examples:\n  banger image promote dev dev-tools              dev's / as the image dev-tools\n  banger vm create --name dev2 --image dev-tools\n  banger image promote dev snap --size 4G --json\n\nThe VM must be running: its guest agent packs /. Left out: the contents of\n/proc, /sys, /dev, /run, /tmp, /lost+found and /root (the VM's work disk: new\nVMs get their own), other mounted filesystems, and per-VM identity (ssh host\nkeys, /etc/machine-id, the VM's name)."
    )]
    Promote {
        /// The running VM.
        vm: String,
        /// The new image's name.
        name: String,
        /// Size of the image's ext4 (default: the content plus headroom).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Print the image as JSON when done.
        #[arg(long)]
        json: bool,
    },
    /// List images (`--available`: the catalog).
    #[command(visible_alias = "ls")]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// List the catalog instead of the images here.
        #[arg(long)]
        available: bool,
    },
    /// The layer cache of OCI pulls.
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Warm snapshots: an image booted once and saved, so `vm run` / `vm create` with its
    /// image, kernel, size, VMM and network restore in a fraction of a boot.
    #[command(after_help = WARM_HELP, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Warm(WarmArgs),
    /// Show an image.
    Show {
        /// The image's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete an image no VM uses.
    #[command(visible_alias = "rm")]
    Delete {
        /// The image's name.
        name: String,
        /// Print the deleted image as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum InternalCmd {
    /// Build a catalog bundle (.tar.zst): an image from a root filesystem tar (e.g. `docker
    /// export`), or a kernel from a directory. Prints the catalog entry's sha256 and size.
    #[command(
        after_help = "Examples:\n  banger internal make-bundle --rootfs-tar rootfs.tar --name debian-bookworm --kernel-ref cloud-6.1 --out debian-bookworm-x86_64.tar.zst\n  banger internal make-bundle --kernel-dir ./kernel --out cloud-6.1-x86_64.tar.zst"
    )]
    MakeBundle {
        /// An image from this root filesystem tar (plain, gzip or zstd).
        #[arg(
            long,
            conflicts_with = "kernel_dir",
            required_unless_present = "kernel_dir"
        )]
        rootfs_tar: Option<PathBuf>,
        /// A kernel from this directory (vmlinux or vmlinuz, optional initrd and modules/).
        #[arg(long)]
        kernel_dir: Option<PathBuf>,
        /// The image's name, written to its manifest.
        #[arg(long, default_value = "image")]
        name: String,
        /// The kernel the image boots, written to its manifest.
        #[arg(long = "kernel-ref")]
        kernel_ref: Option<String>,
        /// Where banger-init and banger-agent are (default: beside this banger, else
        /// /usr/lib/banger).
        #[arg(long)]
        guest_dir: Option<PathBuf>,
        /// Size of the ext4 (default: the content plus headroom).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// The bundle to write.
        #[arg(long)]
        out: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

const WARM_HELP: &str = "Examples:\n  banger image warm debian-bookworm     boot it once and save it\n  banger image warm debian-bookworm --memory 2G --vmm qemu\n  banger image warm list                what is kept, its size on disk\n  banger image warm rm debian-bookworm  remove its warm snapshots (or one: id)\n\nA `vm run` or `vm create` whose image, kernel, size, VMM and network match one\nrestores it and takes its own name, address, machine id and ssh host key, as a\nfork's clone does; `--cold` boots instead. With `[vm_defaults] auto_warm = true`\none is made after each first cold boot. Deleting or replacing the image or its\nkernel removes it.";

/// `image warm [IMAGE] [flags] | list | rm`.
#[derive(Debug, clap::Args)]
pub struct WarmArgs {
    #[command(subcommand)]
    pub cmd: Option<WarmCmd>,
    /// The image to warm (default: the config's default_image_name).
    pub image: Option<String>,
    /// Kernel (default: the image's).
    #[arg(long)]
    pub kernel: Option<String>,
    #[command(flatten)]
    pub size: SizeArgs,
    /// VMM: auto, firecracker or qemu (default: the config's default_vmm), as `vm create`.
    #[arg(long, value_name = "VMM")]
    pub vmm: Option<banger_api::VmmChoice>,
    /// For VMs without a network (`--no-network`): a restore brings back the devices saved.
    #[arg(long)]
    pub no_network: bool,
    /// Print the warm snapshot as JSON when done.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum WarmCmd {
    /// The warm snapshots kept, with their size on disk.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a warm snapshot by id, or every one of an image by its name.
    #[command(visible_alias = "delete")]
    Rm {
        /// An id (`image warm list`) or an image name.
        which: String,
        /// Print what was removed as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCmd {
    /// Layer blobs in the cache, most recently used first.
    #[command(visible_alias = "ls")]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove every cached layer blob (images already pulled are not affected).
    Prune,
}

#[derive(Debug, Subcommand)]
pub enum KernelCmd {
    /// Pull a kernel from the kernel catalog.
    #[command(
        after_help = "Examples:\n  banger kernel pull cloud-6.1\n  banger kernel list --available"
    )]
    Pull {
        /// The kernel's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Import a kernel from a directory with vmlinux or vmlinuz, and optionally initrd, modules/ and config.
    ///
    /// The kernel must be an uncompressed x86-64 ELF vmlinux or a bzImage (vmlinuz) whose
    /// payload is LZ4, gzip, xz or zstd: a bzImage is kept for QEMU and converted to an ELF
    /// for Firecracker; anything else is refused (exit status 2). `config` (Debian's
    /// /boot/config-<version>) lets `kernel show` say which VMMs the kernel suits.
    #[command(after_help = "Examples:\n  banger kernel import cloud --from ./kernel-dir")]
    Import {
        /// The kernel's name.
        name: String,
        /// The directory holding vmlinux or vmlinuz (and optionally initrd, modules/, config).
        #[arg(long)]
        from: PathBuf,
        /// Print the kernel as JSON when done.
        #[arg(long)]
        json: bool,
    },
    /// List kernels (`--available`: the catalog).
    #[command(visible_alias = "ls")]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// List the catalog instead of the kernels here.
        #[arg(long)]
        available: bool,
    },
    /// Show a kernel: its files, and which VMMs it suits and why (from its config).
    Show {
        /// The kernel's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a kernel no VM uses.
    #[command(visible_alias = "delete")]
    Rm {
        /// The kernel's name.
        name: String,
        /// Print the deleted kernel as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_to_takes_release_versions_only() {
        for ok in ["v0.3.1", "0.3.1", "v1.0.0-rc.1", "10.20.30"] {
            assert_eq!(parse_version(ok).as_deref(), Ok(ok), "{ok}");
        }
        for bad in [
            "1.2", "v1", "", "v", "1.2.x", "1.2.3.4", "v1.2.3-", "latest", "1..2",
        ] {
            let e = parse_version(bad).unwrap_err();
            assert!(e.contains("MAJOR.MINOR.PATCH"), "{bad}: {e}");
        }
    }

    #[test]
    fn ttl_durations() {
        for (text, secs) in [
            ("90", 90),
            ("90s", 90),
            ("10m", 600),
            ("1h30m", 5400),
            ("2d", 172_800),
            ("1h5", 3605),
        ] {
            assert_eq!(parse_ttl(text), Ok(secs), "{text}");
        }
        for bad in [
            "",
            "0",
            "0s",
            "1x",
            "h",
            "1.5h",
            "-1m",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_ttl_or_none("none"), Ok(0));
        assert!(parse_ttl("none").is_err(), "a create's --ttl is a time");
    }

    fn parse(args: &[&str]) -> Cli {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("banger").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// `banger run|exec|ssh|cp|logs|start|stop|rm` are `banger vm …`; `exec` and `ssh`
    /// take the command without `--`; `vm create NAME`; several VMs for start/stop/kill/rm.
    #[test]
    fn docker_shaped_command_lines() {
        match parse(&["exec", "dev", "ls", "-la"]).command {
            Command::Exec(a) => assert_eq!(
                (a.vm.as_str(), a.cmd),
                ("dev", vec!["ls".to_owned(), "-la".to_owned()])
            ),
            other => panic!("{other:?}"),
        }
        // banger's flags before the command; from its first word on, all is the command's.
        match parse(&["exec", "dev", "-t", "top"]).command {
            Command::Exec(a) => assert_eq!((a.tty, a.cmd), (true, vec!["top".to_owned()])),
            other => panic!("{other:?}"),
        }
        match parse(&["exec", "dev", "ls", "-t"]).command {
            Command::Exec(a) => assert_eq!(
                (a.tty, a.cmd),
                (false, vec!["ls".to_owned(), "-t".to_owned()])
            ),
            other => panic!("{other:?}"),
        }
        match parse(&["vm", "exec", "-e", "A=1", "dev", "--", "sh", "-c", "x"]).command {
            Command::Vm(VmCmd::Exec(a)) => {
                assert_eq!(a.cmd, ["sh", "-c", "x"]);
                assert_eq!(a.env, ["A=1"]);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["ssh", "dev", "uname", "-a"]).command {
            Command::Ssh(a) => assert_eq!(a.cmd, ["uname", "-a"]),
            other => panic!("{other:?}"),
        }
        match parse(&[
            "run", "-d", "-e", "K=V", "-w", "/tmp", "--name", "x", "--", "sleep", "9",
        ])
        .command
        {
            Command::Run(a) => {
                assert!(a.detach);
                assert_eq!(
                    (a.env, a.workdir.as_deref()),
                    (vec!["K=V".to_owned()], Some("/tmp"))
                );
                assert_eq!(a.cmd, ["sleep", "9"]);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["vm", "create", "dev", "--no-start"]).command {
            Command::Vm(VmCmd::Create { name_arg, name, .. }) => {
                assert_eq!((name_arg.as_deref(), name), (Some("dev"), None))
            }
            other => panic!("{other:?}"),
        }
        match parse(&["stop", "a", "b", "--json"]).command {
            Command::Stop(a) => assert_eq!(a.vms, ["a", "b"]),
            other => panic!("{other:?}"),
        }
        match parse(&["suspend", "a", "b", "--json"]).command {
            Command::Suspend(a) => assert_eq!(
                (a.vms, a.json),
                (vec!["a".to_owned(), "b".to_owned()], true)
            ),
            other => panic!("{other:?}"),
        }
        match parse(&["vm", "suspend", "a"]).command {
            Command::Vm(VmCmd::Suspend(a)) => assert_eq!(a.vms, ["a"]),
            other => panic!("{other:?}"),
        }
        match parse(&["vm", "snapshot", "create", "a", "before", "--json"]).command {
            Command::Vm(VmCmd::Snapshot(SnapshotCmd::Create { vm, name, json })) => {
                assert_eq!(
                    (vm.as_str(), name.as_deref(), json),
                    ("a", Some("before"), true)
                )
            }
            other => panic!("{other:?}"),
        }
        match parse(&["vm", "snap", "ls"]).command {
            Command::Vm(VmCmd::Snapshot(SnapshotCmd::List {
                vm: None,
                json: false,
            })) => {}
            other => panic!("{other:?}"),
        }
        match parse(&["vm", "snapshot", "rm", "a", "s1", "s2"]).command {
            Command::Vm(VmCmd::Snapshot(SnapshotCmd::Rm { snapshots, .. })) => {
                assert_eq!(snapshots, ["s1", "s2"])
            }
            other => panic!("{other:?}"),
        }
        match parse(&["vm", "rollback", "a", "s1"]).command {
            Command::Vm(VmCmd::Rollback { vm, snapshot, .. }) => {
                assert_eq!((vm.as_str(), snapshot.as_str()), ("a", "s1"))
            }
            other => panic!("{other:?}"),
        }
        match parse(&["vm", "create", "--from-snapshot", "a/s1", "--name", "c"]).command {
            Command::Vm(VmCmd::Create {
                from_snapshot,
                name,
                ..
            }) => assert_eq!(
                (from_snapshot.as_deref(), name.as_deref()),
                (Some("a/s1"), Some("c"))
            ),
            other => panic!("{other:?}"),
        }
        // The snapshot's image, kernel and VMM: refused with it.
        for flag in [["--image", "x"], ["--kernel", "x"], ["--vmm", "qemu"]] {
            let mut args = vec!["banger", "vm", "create", "--from-snapshot", "a/s1"];
            args.extend(flag);
            assert!(Cli::try_parse_from(&args).is_err(), "{flag:?}");
        }
        match parse(&["vm", "fork", "a", "-n", "3", "--name", "t", "--nat"]).command {
            Command::Vm(VmCmd::Fork {
                vm,
                count,
                name,
                nat,
                ..
            }) => assert_eq!(
                (vm.as_str(), count, name.as_deref(), nat),
                ("a", 3, Some("t"), true)
            ),
            other => panic!("{other:?}"),
        }
        match parse(&["vm", "kill", "a", "b"]).command {
            Command::Vm(VmCmd::Kill { vms, .. }) => assert_eq!(vms, ["a", "b"]),
            other => panic!("{other:?}"),
        }
        match parse(&["start", "a", "b"]).command {
            Command::Start(a) => assert_eq!(a.vms, ["a", "b"]),
            other => panic!("{other:?}"),
        }
        match parse(&["pause", "a", "b", "--json"]).command {
            Command::Pause(a) => assert!(a.json && a.vms == ["a", "b"]),
            other => panic!("{other:?}"),
        }
        match parse(&["vm", "resume", "a"]).command {
            Command::Vm(VmCmd::Resume(a)) => assert_eq!(a.vms, ["a"]),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse(&["rm", "-f", "a", "b"]).command, Command::Rm(a) if a.force && a.vms.len() == 2)
        );
        assert!(
            matches!(parse(&["logs", "--tail", "3", "dev"]).command, Command::Logs(a) if a.tail == Some(3))
        );
        assert!(matches!(
            parse(&["cp", "./x", "dev:/root"]).command,
            Command::Cp(_)
        ));
        assert!(matches!(parse(&["ps", "-aq"]).command, Command::Ps(a) if a.all && a.quiet));
        // One verb per action: rm and delete on vm, image and kernel alike; --kernel on
        // pull as everywhere.
        for args in [
            &["vm", "delete", "a"][..],
            &["vm", "rm", "a"],
            &["image", "rm", "a"],
            &["image", "delete", "a"],
            &["kernel", "rm", "a"],
            &["kernel", "delete", "a"],
            &["image", "pull", "x", "--kernel", "k"],
            &["image", "pull", "x", "--kernel-ref", "k"],
            &["image", "register", "a", "f", "--json"],
            &["kernel", "import", "a", "--from", "d", "--json"],
            &["daemon", "logs", "-f", "-n", "5"],
        ] {
            parse(args);
        }
    }

    #[test]
    fn memory_is_whole_mib() {
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        let e = parse_memory("1").unwrap_err();
        assert!(e.contains("1 B, not a whole number of MiB"), "{e}");
    }

    /// Every command, argument and flag of the whole tree says what it is for (clap's own
    /// `--help`/`--version` aside), and every example line fits 80 columns. (`<VM>`,
    /// `--json`, `--nat/--no-nat`, `logs -f`, `--signal`, `--from` had no help.)
    #[test]
    fn every_command_and_argument_is_described_and_examples_fit() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.is_hide_set() {
                return;
            }
            if cmd.get_about().is_none() {
                missing.push(format!("{path}: the command"));
            }
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" || a.is_hide_set() {
                    continue;
                }
                if a.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{path}: {id}"));
                }
            }
            if let Some(after) = cmd.get_after_help() {
                for line in after.to_string().lines() {
                    if line.chars().count() > 80 {
                        missing.push(format!("{path}: a help line over 80 columns: {line}"));
                    }
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "banger", &mut missing);
        // Global options are grouped apart from each command's own.
        for a in Cli::command().get_arguments().filter(|a| a.is_global_set()) {
            if a.get_help_heading() != Some("Global options") {
                missing.push(format!(
                    "banger: {} is not under Global options",
                    a.get_id()
                ));
            }
        }
        assert!(missing.is_empty(), "undescribed:\n{}", missing.join("\n"));
    }
}
