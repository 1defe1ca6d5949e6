//! The jailer + Firecracker process around the API double: what `banger-fc-double` runs, so
//! a driver can be tested end to end against a real process that it spawns, waits for,
//! signals and cleans up after, exactly as it does `jailer ... -- --api-sock /api.sock`.
//!
//! As the jailer (Firecracker's `src/jailer/src/{main,env}.rs`): the command line is parsed
//! by the rules of Firecracker's `utils::arg_parser` (`--name value`, `--` ends the jailer's
//! arguments and the rest goes to Firecracker, unknown, duplicate, valueless and missing
//! required arguments are refused with its messages); `--id` must be 1 to 64 alphanumerics
//! or hyphens; `--exec-file` must be a file whose name contains `firecracker`;
//! `--chroot-base-dir` must be a directory; uid, gid, cgroup, resource limit and parent
//! cgroup values are checked. Then `<base>/<exec file name>/<id>/root` is created if
//! missing, the exec file is copied into it, `/`, `/dev`, `/dev/net` and `/run` are made
//! in it with mode 0700, and `<exec file name>.pid` records the pid, which stays the same
//! across the jailer's exec. As Firecracker: its own arguments are parsed (the jailer
//! passes `--id` and start times, then the arguments after `--`) and the API is served on
//! `--api-sock` (default `/run/firecracker.socket`) with [`FirecrackerDouble`].
//!
//! Then the jailer's privileged steps, for real ([`isolate`], `Env::run` and `chroot.rs`):
//! the cgroups (found in `/proc/mounts` as the jailer's `cgroup.rs` finds them: the first
//! `cgroup2` line for v2, v1 controllers by mount option; with `--cgroup` files the VM's
//! cgroup `<hierarchy>/<parent cgroup>/<id>` is made, the files written, the pid attached;
//! v2 without `--cgroup` joins `<v2>/<parent>` only if it exists; no hierarchy at all is
//! `CgroupHierarchyMissing`), then `unshare(CLONE_NEWNS)`, which fails unprivileged with
//! the jailer's `Failed to unshare into new mount namespace: Operation not permitted`, then
//! `/dev/net/tun` and `/dev/kvm` mknod'ed in the jail for the VM user. It then becomes
//! `--uid`/`--gid` (after a `chroot` into the jail standing in for its `pivot_root`, see
//! [`enter_root`]) before "exec'ing" Firecracker, so the API is served, the drives opened
//! and the socket made as that user, as with the real thing, and opens the jail's
//! `/dev/kvm` as Firecracker does, which fails on a `nodev` mount. Not modelled: the bind
//! mount (the `chroot` gives the same view of the files), rlimits and the network namespace (their arguments are
//! checked, not applied). Refused with a message: `--daemonize` and `--new-pid-ns` (they
//! change which process the caller must track) and the Firecracker arguments that
//! configure the VM outside the API (`--config-file`, `--no-api`, `--metadata`,
//! `--log-path`, `--metrics-path`, ...).
//!
//! Run under a name containing `firecracker` (a link or copy of the binary, as a driver
//! runs Firecracker without the jailer), it is Firecracker alone: its arguments are parsed
//! ([`firecracker_alone`]), paths are relative to its working directory, nothing is
//! isolated.
//!
//! A jailed double opens each network interface's tap through the jail's `/dev/net/tun`
//! at `PUT /network-interfaces`, as the VM user, as Firecracker does: a tap that does not
//! exist or belongs to another uid is refused with Firecracker's `Open tap device failed`.
//!
//! The guest: once `InstanceStart` is accepted, a few serial console lines go to stdout,
//! among them [`GUEST_BOOT_ID`] and the last being [`GUEST_RUNNING`]; a guest restored by
//! `PUT /snapshot/load` prints only [`GUEST_RESTORED`] with the boot id its snapshot kept. When the guest powers off, the kernel's
//! `reboot: Power down` line follows and the process lives on (as Firecracker does); when
//! it reboots, `reboot: Restarting system`, and the process exits 0 (Firecracker exits on
//! the reset). SIGUSR1 is `poweroff` typed in the guest. SIGTERM/SIGINT end the process
//! with `128 + signal`. Before exiting it writes the requests and violations to
//! `<root>/`[`RECORD_FILE`]. [`GUEST_ENV`] gives the guest an agent, [`RELEASE_ENV`] picks
//! the Firecracker release it answers as (by default the oldest banger supports).
//!
//! Exit codes: 1 for the jailer's errors (the real jailer returns 1 for argument errors
//! and panics on the others), 153 for Firecracker's argument errors
//! (`FC_EXIT_CODE_ARG_PARSING`), 1 when the API socket cannot be bound.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{DoubleState, FirecrackerDouble, GuestPower, Spec};

/// Where the record of requests and violations is written, in the jail root.
pub const RECORD_FILE: &str = "double-record.json";
/// The environment variable of injected API faults: `PATH_PREFIX:STATUS:MESSAGE`, several
/// separated by `;` (each fails one request, see [`FirecrackerDouble::fail_next`]).
pub const FAIL_ENV: &str = "BANGER_FC_DOUBLE_FAIL";
/// The console line of a booted guest before [`GUEST_RUNNING`], followed by its boot id.
pub const GUEST_BOOT_ID: &str = "banger-fc-double: boot id";
/// The console line of a guest restored from a snapshot, followed by `(boot <id>)`.
pub const GUEST_RESTORED: &str = "banger-fc-double: guest restored";
/// The last console line of a booted guest.
pub const GUEST_RUNNING: &str = "banger-fc-double: guest running";
/// The environment variable that gives the guest a banger agent when `1`
/// ([`super::Options::guest_agent`]).
pub const GUEST_ENV: &str = "BANGER_FC_DOUBLE_GUEST_AGENT";
/// The environment variable naming the Firecracker release the process answers as:
/// `oldest` (the default: [`super::OLDEST_SUPPORTED`]) or `newest`.
pub const RELEASE_ENV: &str = "BANGER_FC_DOUBLE_RELEASE";
/// The kernel's console line when the guest powers off.
pub const GUEST_POWER_DOWN: &str = "reboot: Power down";
/// The kernel's console line when the guest reboots.
pub const GUEST_RESTARTING: &str = "reboot: Restarting system";

/// The jailer's exit code for its errors.
const JAILER_ERROR: u8 = 1;
/// `FC_EXIT_CODE_ARG_PARSING`.
const FC_ARG_PARSING: u8 = 153;
/// `FC_EXIT_CODE_GENERIC_ERROR`.
const FC_GENERIC_ERROR: u8 = 1;
/// Firecracker's default `--api-sock`.
const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
/// How often the process looks whether the double has exited.
const EXIT_POLL: Duration = Duration::from_millis(10);
/// The folders the jailer makes in the jail (`FOLDER_HIERARCHY`) and their mode.
const FOLDERS: [&str; 4] = ["/", "/dev", "/dev/net", "/run"];
const FOLDER_MODE: u32 = 0o700;

/// A command line refused by `utils::arg_parser`; the messages are Firecracker's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    #[error("Argument '{0}' cannot be used together with argument '{1}'.")]
    Forbidden(String, String),
    #[error("Argument '{0}' required, but not found.")]
    Missing(String),
    #[error("The argument '{0}' requires a value, but none was supplied.")]
    MissingValue(String),
    #[error("Found argument '{0}' which wasn't expected, or isn't valid in this context.")]
    Unexpected(String),
    #[error("The argument '{0}' was provided more than once.")]
    Duplicate(String),
}

/// Why the process stops. Messages are the jailer's and Firecracker's; the binary prints
/// the chain of causes.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("Failed to parse arguments")]
    JailerArguments(#[source] ArgError),
    #[error("Arguments parsing error")]
    FirecrackerArguments(#[source] ArgError),
    #[error("Invalid instance ID: {0}")]
    InvalidInstanceId(String),
    #[error("Failed to canonicalize path {}", .0.display())]
    Canonicalize(PathBuf, #[source] std::io::Error),
    #[error("{} is not a file", .0.display())]
    NotAFile(PathBuf),
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error(
        "Invalid filename. The filename of `--exec-file` option must contain \"firecracker\": {0}"
    )]
    ExecFileName(String),
    #[error("Invalid uid: {0}")]
    Uid(String),
    #[error("Invalid gid: {0}")]
    Gid(String),
    #[error("Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'")]
    CgroupInvalidParentPath,
    #[error("{0} is an invalid cgroup version specifier")]
    CgroupInvalidVersion(String),
    #[error("Invalid format for cgroups: {0}")]
    CgroupFormat(String),
    #[error("Cgroup invalid file: {0}")]
    CgroupInvalidFile(String),
    #[error("Invalid format for resources limits: {0}")]
    ResLimitFormat(String),
    #[error("Invalid limit value for resource: {0}: {1}")]
    ResLimitValue(String, String),
    #[error("Invalid resource argument: {0}")]
    ResLimitArgument(String),
    #[error("Failed to open file {}", .0.display())]
    FileOpen(PathBuf, #[source] std::io::Error),
    #[error("Failed to create directory {}", .0.display())]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("Failed to copy {} to {}", .0.display(), .1.display())]
    Copy(PathBuf, PathBuf, #[source] std::io::Error),
    #[error("Failed to change permissions on {}", .0.display())]
    Chmod(PathBuf, #[source] std::io::Error),
    #[error("Failed to change owner for {}", .0.display())]
    ChangeFileOwner(PathBuf, #[source] std::io::Error),
    #[error("Failed to write to {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    #[error("Failed to pivot root into {}", .0.display())]
    Chroot(PathBuf, #[source] std::io::Error),
    #[error("Failed to open the API socket at {}", .0.display())]
    ApiSocket(PathBuf, #[source] std::io::Error),
    #[error("banger-fc-double does not model {0}")]
    NotModelled(String),
    #[error("Hierarchy not found: {0}")]
    CgroupHierarchyMissing(String),
    #[error("Controller {0} is unavailable")]
    CgroupControllerUnavailable(String),
    #[error("Failed to write to cgroups file: {0}")]
    CgroupWrite(std::io::Error),
    #[error("Failed to inherit cgroups configurations from file {file} in path {path}", path = .0.display(), file = .1)]
    CgroupInheritFromParent(PathBuf, String),
    #[error("Failed to unshare into new mount namespace: {0}")]
    UnshareNewNs(std::io::Error),
    #[error("Failed to create {1} via mknod inside the jail: {0}")]
    MknodDev(std::io::Error, String),
    #[error("Failed to open the jail's device node {}", .0.display())]
    OpenDevice(PathBuf, #[source] std::io::Error),
    #[error("Failed to drop privileges to {0}")]
    Privileges(String, #[source] std::io::Error),
    #[error("banger-fc-double: cannot write the guest console")]
    Console(#[source] std::io::Error),
}

impl ProcessError {
    /// The exit code the real process would end with.
    pub fn exit_code(&self) -> u8 {
        match self {
            ProcessError::FirecrackerArguments(_) => FC_ARG_PARSING,
            ProcessError::ApiSocket(..) | ProcessError::Console(_) => FC_GENERIC_ERROR,
            _ => JAILER_ERROR,
        }
    }
}

/// One argument of an `utils::arg_parser` parser.
#[derive(Debug, Clone, Copy)]
struct ArgSpec {
    name: &'static str,
    required: bool,
    takes_value: bool,
    /// `allow_multiple`: may be given more than once, each with a value.
    multiple: bool,
    default: Option<&'static str>,
    requires: Option<&'static str>,
    forbids: &'static [&'static str],
}

/// An argument with a value (`Argument::new(name).takes_value(true)`).
const fn arg(name: &'static str) -> ArgSpec {
    ArgSpec {
        name,
        required: false,
        takes_value: true,
        multiple: false,
        default: None,
        requires: None,
        forbids: &[],
    }
}

/// A flag (`takes_value(false)`).
const fn flag(name: &'static str) -> ArgSpec {
    ArgSpec {
        takes_value: false,
        ..arg(name)
    }
}

impl ArgSpec {
    const fn required(self) -> ArgSpec {
        ArgSpec {
            required: true,
            ..self
        }
    }

    const fn multiple(self) -> ArgSpec {
        ArgSpec {
            multiple: true,
            ..self
        }
    }

    const fn default(self, value: &'static str) -> ArgSpec {
        ArgSpec {
            default: Some(value),
            ..self
        }
    }

    const fn requires(self, other: &'static str) -> ArgSpec {
        ArgSpec {
            requires: Some(other),
            ..self
        }
    }

    const fn forbids(self, others: &'static [&'static str]) -> ArgSpec {
        ArgSpec {
            forbids: others,
            ..self
        }
    }
}

/// The jailer's `build_arg_parser`.
const JAILER_ARGS: &[ArgSpec] = &[
    arg("id").required(),
    arg("exec-file").required(),
    arg("uid").required(),
    arg("gid").required(),
    arg("chroot-base-dir").default("/srv/jailer"),
    arg("netns"),
    flag("daemonize"),
    flag("new-pid-ns"),
    arg("cgroup").multiple(),
    arg("resource-limit").multiple(),
    arg("cgroup-version").default("1"),
    arg("parent-cgroup"),
    flag("version"),
];

/// Firecracker's arguments (`src/firecracker/src/main.rs`).
const FIRECRACKER_ARGS: &[ArgSpec] = &[
    arg("api-sock").default(DEFAULT_API_SOCK),
    arg("id").default("anonymous-instance"),
    arg("seccomp-filter").forbids(&["no-seccomp"]),
    flag("no-seccomp").forbids(&["seccomp-filter"]),
    arg("start-time-us"),
    arg("start-time-cpu-us"),
    arg("parent-cpu-time-us"),
    arg("config-file"),
    arg("metadata"),
    flag("no-api").requires("config-file"),
    arg("log-path"),
    arg("level").requires("log-path"),
    arg("module").requires("log-path"),
    flag("show-level").requires("log-path"),
    flag("show-log-origin").requires("log-path"),
    arg("metrics-path"),
    flag("boot-timer"),
    flag("version"),
    arg("describe-snapshot"),
    arg("http-api-max-payload-size"),
    arg("mmds-size-limit"),
    flag("enable-pci"),
];

/// Firecracker arguments that configure the VM outside the API, which the double refuses.
const FIRECRACKER_NOT_MODELLED: &[&str] = &[
    "config-file",
    "metadata",
    "no-api",
    "log-path",
    "metrics-path",
    "describe-snapshot",
];

/// A parsed command line.
#[derive(Debug, Default)]
struct Parsed {
    /// Values given, by argument name; a flag has one empty value.
    given: BTreeMap<&'static str, Vec<String>>,
    defaults: BTreeMap<&'static str, &'static str>,
    /// After `--`.
    extra: Vec<String>,
    help: bool,
    version: bool,
}

impl Parsed {
    fn value(&self, name: &str) -> Option<&str> {
        self.given
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
            .or_else(|| self.defaults.get(name).copied())
    }

    fn values(&self, name: &str) -> Vec<String> {
        self.given.get(name).cloned().unwrap_or_default()
    }

    fn flag(&self, name: &str) -> bool {
        self.given.contains_key(name)
    }
}

/// `Arguments::parse` of `utils::arg_parser`; `args` excludes the program name.
fn parse(specs: &[ArgSpec], args: &[String]) -> Result<Parsed, ArgError> {
    let (args, extra) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let mut parsed = Parsed {
        extra: extra.to_vec(),
        defaults: specs
            .iter()
            .filter_map(|s| s.default.map(|d| (s.name, d)))
            .collect(),
        ..Parsed::default()
    };
    // `--help` and `--version` anywhere skip the rest of the parsing.
    if args.iter().any(|a| a == "--help") {
        parsed.help = true;
        return Ok(parsed);
    }
    if args.iter().any(|a| a == "--version") {
        parsed.version = true;
        return Ok(parsed);
    }
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let name = arg
            .strip_prefix("--")
            .ok_or_else(|| ArgError::Unexpected(arg.clone()))?;
        let spec = specs
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ArgError::Unexpected(name.to_owned()))?;
        if parsed.given.contains_key(spec.name) && !spec.multiple {
            return Err(ArgError::Duplicate(spec.name.to_owned()));
        }
        let value = if spec.takes_value {
            iter.next()
                .filter(|v| !v.starts_with("--"))
                .ok_or_else(|| ArgError::MissingValue(spec.name.to_owned()))?
                .clone()
        } else {
            String::new()
        };
        parsed.given.entry(spec.name).or_default().push(value);
    }
    for spec in specs {
        let given = parsed.given.contains_key(spec.name);
        if spec.required && !given {
            return Err(ArgError::Missing(spec.name.to_owned()));
        }
        if !given {
            continue;
        }
        if let Some(other) = spec.requires
            && !parsed.given.contains_key(other)
        {
            return Err(ArgError::Missing(other.to_owned()));
        }
        if let Some(other) = spec.forbids.iter().find(|o| parsed.given.contains_key(**o)) {
            return Err(ArgError::Forbidden(
                spec.name.to_owned(),
                (*other).to_owned(),
            ));
        }
    }
    Ok(parsed)
}

/// `--help` text in `formatted_help`'s format.
fn help(specs: &[ArgSpec]) -> String {
    let mut text = String::new();
    for spec in specs {
        text.push_str("--");
        text.push_str(spec.name);
        if spec.takes_value {
            text.push_str(&format!(" <{}>", spec.name));
        }
        text.push('\n');
    }
    text
}

/// What the jailer's command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Print this to stdout and exit 0.
    Print(String),
    Run(Box<JailerArgs>),
}

/// The jailer's arguments, as given (checked by [`enter_jail`], in the jailer's order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerArgs {
    pub id: String,
    pub exec_file: String,
    pub uid: String,
    pub gid: String,
    pub chroot_base_dir: String,
    pub netns: Option<String>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    pub cgroups: Vec<String>,
    pub resource_limits: Vec<String>,
    pub cgroup_version: String,
    pub parent_cgroup: Option<String>,
    /// The arguments after `--`, for Firecracker.
    pub firecracker_args: Vec<String>,
}

/// Parse the jailer's command line (without the program name).
pub fn parse_jailer_args(args: &[String]) -> Result<Invocation, ProcessError> {
    let p = parse(JAILER_ARGS, args).map_err(ProcessError::JailerArguments)?;
    let version = Spec::shared().version();
    if p.help {
        return Ok(Invocation::Print(format!(
            "Jailer v{version}\n\n{}\n\nAny arguments after the -- separator will be supplied to the jailed binary.\n\n",
            help(JAILER_ARGS)
        )));
    }
    if p.version {
        return Ok(Invocation::Print(format!("Jailer v{version}\n\n")));
    }
    let value = |name: &str| p.value(name).unwrap_or_default().to_owned();
    Ok(Invocation::Run(Box::new(JailerArgs {
        id: value("id"),
        exec_file: value("exec-file"),
        uid: value("uid"),
        gid: value("gid"),
        chroot_base_dir: value("chroot-base-dir"),
        netns: p.value("netns").map(str::to_owned),
        daemonize: p.flag("daemonize"),
        new_pid_ns: p.flag("new-pid-ns"),
        cgroups: p.values("cgroup"),
        resource_limits: p.values("resource-limit"),
        cgroup_version: value("cgroup-version"),
        parent_cgroup: p.value("parent-cgroup").map(str::to_owned),
        firecracker_args: p.extra.clone(),
    })))
}

/// `validators::validate_instance_id`.
fn validate_instance_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!(
            "invalid len ({});  the length must be between 1 and 64",
            id.len()
        ));
    }
    match id
        .chars()
        .enumerate()
        .find(|(_, c)| !(*c == '-' || c.is_alphanumeric()))
    {
        Some((i, c)) => Err(format!("invalid char ({c}) at position {i}")),
        None => Ok(()),
    }
}

/// A path with no `.`, `..` or root component.
fn is_plain_relative(path: &str) -> bool {
    !Path::new(path).components().any(|c| {
        matches!(
            c,
            Component::CurDir | Component::ParentDir | Component::RootDir
        )
    })
}

/// The jail, set up, with Firecracker's arguments parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// `<chroot base>/<exec file name>/<id>/root`, the jailed process's `/`.
    pub root: PathBuf,
    /// The API socket on the host.
    pub api_socket: PathBuf,
}

/// What the jailer does before it execs Firecracker (`Env::new`, then `Env::run` minus the
/// privileged steps), then Firecracker's argument parsing. Blocking.
pub fn enter_jail(args: &JailerArgs) -> Result<Jail, ProcessError> {
    use ProcessError as E;
    validate_instance_id(&args.id).map_err(E::InvalidInstanceId)?;

    let exec_file = std::fs::canonicalize(&args.exec_file)
        .map_err(|e| E::Canonicalize(PathBuf::from(&args.exec_file), e))?;
    if !exec_file.is_file() {
        return Err(E::NotAFile(exec_file));
    }
    let exec_name = exec_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !exec_name.contains("firecracker") {
        return Err(E::ExecFileName(exec_name));
    }

    let base = std::fs::canonicalize(&args.chroot_base_dir)
        .map_err(|e| E::Canonicalize(PathBuf::from(&args.chroot_base_dir), e))?;
    if !base.is_dir() {
        return Err(E::NotADirectory(base));
    }
    let root = base.join(&exec_name).join(&args.id).join("root");

    let uid: u32 = args.uid.parse().map_err(|_| E::Uid(args.uid.clone()))?;
    let gid: u32 = args.gid.parse().map_err(|_| E::Gid(args.gid.clone()))?;
    if args.daemonize {
        return Err(E::NotModelled("--daemonize".into()));
    }
    if args.new_pid_ns {
        return Err(E::NotModelled("--new-pid-ns".into()));
    }
    check_cgroups(args, &exec_name)?;
    check_resource_limits(&args.resource_limits)?;

    std::fs::create_dir_all(&root).map_err(|e| E::CreateDir(root.clone(), e))?;
    let jailed_exec = root.join(&exec_name);
    std::fs::copy(&exec_file, &jailed_exec).map_err(|e| E::Copy(exec_file, jailed_exec, e))?;
    // The network namespace is joined only after the copy, as in `Env::run`; here only
    // opened.
    if let Some(netns) = &args.netns {
        std::fs::File::open(netns).map_err(|e| E::FileOpen(PathBuf::from(netns), e))?;
    }
    for folder in FOLDERS {
        let path = root.join(folder.trim_start_matches('/'));
        std::fs::create_dir_all(&path).map_err(|e| E::CreateDir(path.clone(), e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(FOLDER_MODE))
            .map_err(|e| E::Chmod(path.clone(), e))?;
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(
                &path,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| E::ChangeFileOwner(path.clone(), e.into()))?;
        }
    }
    let pid_file = root.join(format!("{exec_name}.pid"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&pid_file)
        .map_err(|e| E::FileOpen(pid_file.clone(), e))?;
    write!(file, "{}", std::process::id()).map_err(|e| E::Write(pid_file.clone(), e))?;

    // The exec: the jailer puts its own arguments before the caller's. Times are not
    // measured; only their presence matters to Firecracker's parser.
    let mut fc_args: Vec<String> = [
        "--id",
        &args.id,
        "--start-time-us",
        "0",
        "--start-time-cpu-us",
        "0",
        "--parent-cpu-time-us",
        "0",
    ]
    .map(str::to_owned)
    .to_vec();
    fc_args.extend(args.firecracker_args.iter().cloned());
    let fc = parse(FIRECRACKER_ARGS, &fc_args).map_err(E::FirecrackerArguments)?;
    if fc.help || fc.version {
        return Err(E::NotModelled("firecracker --help or --version".into()));
    }
    if let Some(name) = FIRECRACKER_NOT_MODELLED.iter().find(|n| fc.flag(n)) {
        return Err(E::NotModelled(format!("firecracker --{name}")));
    }
    let api_sock = fc.value("api-sock").unwrap_or(DEFAULT_API_SOCK);
    let jail = Jail {
        api_socket: root.join(api_sock.trim_start_matches('/')),
        root,
    };
    Ok(jail)
}

/// `firecracker --version` (anywhere on the line): what Firecracker prints first
/// (`src/firecracker/src/main.rs`: `Firecracker v<version>`, a blank line, then the
/// snapshot data format versions it supports, which the double leaves out), for the
/// release the double plays (what its API takes: `network_overrides` only from 1.12).
pub fn firecracker_version(args: &[String], release: super::Release) -> Option<String> {
    args.iter()
        .any(|a| a == "--version")
        .then(|| format!("Firecracker v{}\n\n", release.spec().version()))
}

/// Firecracker started without the jailer (`firecracker --id <id> --api-sock <path>`, as
/// `firectl` runs it): its own arguments, the API socket relative to the working directory
/// `cwd`, which is also where relative paths in requests resolve.
pub fn firecracker_alone(args: &[String], cwd: &Path) -> Result<Jail, ProcessError> {
    let fc = parse(FIRECRACKER_ARGS, args).map_err(ProcessError::FirecrackerArguments)?;
    if fc.help {
        return Err(ProcessError::NotModelled("firecracker --help".into()));
    }
    if let Some(name) = FIRECRACKER_NOT_MODELLED.iter().find(|n| fc.flag(n)) {
        return Err(ProcessError::NotModelled(format!("firecracker --{name}")));
    }
    // Firecracker checks its id as the jailer does (and panics on a bad one).
    validate_instance_id(fc.value("id").unwrap_or_default())
        .map_err(ProcessError::InvalidInstanceId)?;
    let api_sock = fc.value("api-sock").unwrap_or(DEFAULT_API_SOCK);
    Ok(Jail {
        root: cwd.to_owned(),
        api_socket: cwd.join(api_sock),
    })
}

/// Whether the binary runs as Firecracker alone: its name says `firecracker`, as the
/// binary a driver runs without the jailer does (the jailer is `jailer`, or this binary's
/// own name).
pub fn runs_as_firecracker(argv0: &str) -> bool {
    Path::new(argv0)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains("firecracker"))
}

/// The device nodes the jailer makes in every jail: (path in the jail, major, minor).
const DEVICES: [(&str, u64, u64); 2] = [("dev/net/tun", 10, 200), ("dev/kvm", 10, 232)];

/// The jailer's privileged steps before Firecracker runs, for real: the VM's cgroups
/// (from the mount table at `proc_mounts`), a mount namespace of its own, the device nodes
/// in the jail. Unprivileged, this fails as the jailer does. The cgroups it made.
pub fn isolate(
    args: &JailerArgs,
    jail: &Jail,
    proc_mounts: &Path,
) -> Result<Vec<PathBuf>, ProcessError> {
    let exec_name = jail
        .root
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let made = setup_cgroups(args, &exec_name, proc_mounts, std::process::id())?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| ProcessError::UnshareNewNs(e.into()))?;
    let uid = nix::unistd::Uid::from_raw(
        args.uid
            .parse()
            .map_err(|_| ProcessError::Uid(args.uid.clone()))?,
    );
    let gid = nix::unistd::Gid::from_raw(
        args.gid
            .parse()
            .map_err(|_| ProcessError::Gid(args.gid.clone()))?,
    );
    for (path, major, minor) in DEVICES {
        let node = jail.root.join(path);
        let name = format!("/{path}");
        nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
            nix::sys::stat::makedev(major, minor),
        )
        .map_err(|e| ProcessError::MknodDev(e.into(), name.clone()))?;
        nix::unistd::chown(&node, Some(uid), Some(gid))
            .map_err(|e| ProcessError::ChangeFileOwner(PathBuf::from(&name), e.into()))?;
    }
    Ok(made)
}

/// The jailer's `pivot_root` into the jail, as a `chroot` (the double has no mount of its
/// own to pivot): from here on the process sees only the jail, so the VM user needs no
/// access to the directories above it (banger's data directory is private to its owner),
/// and every path it resolves is the jailed one. Done only as root, as the real jailer
/// does unconditionally; the jail returned is the one the process sees.
pub fn enter_root(jail: &Jail) -> Result<Jail, ProcessError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(jail.clone());
    }
    nix::unistd::chroot(&jail.root)
        .and_then(|()| nix::unistd::chdir("/"))
        .map_err(|e| ProcessError::Chroot(jail.root.clone(), e.into()))?;
    let inside = Path::new("/");
    Ok(Jail {
        api_socket: inside.join(
            jail.api_socket
                .strip_prefix(&jail.root)
                .unwrap_or(&jail.api_socket),
        ),
        root: inside.to_owned(),
    })
}

/// What Firecracker does with its jail's `/dev/kvm`: open it. On a `nodev` mount the node
/// is there but the open is refused; a host without the KVM driver (no such device) is
/// let through, as the double runs no VM.
pub fn open_kvm(jail: &Jail) -> Result<(), ProcessError> {
    let kvm = jail.root.join("dev/kvm");
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&kvm)
    {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(nix::libc::ENXIO | nix::libc::ENODEV)) => Ok(()),
        Err(e) => Err(ProcessError::OpenDevice(kvm, e)),
    }
}

/// A cgroup mount of the mount table, as the jailer's regex reads it.
struct CgroupMount {
    dir: PathBuf,
    v2: bool,
    options: String,
}

/// The cgroup lines of `/proc/mounts`: `<src> <dir> cgroup[2] <options> 0 0`.
fn cgroup_mounts(proc_mounts: &Path) -> Result<Vec<CgroupMount>, ProcessError> {
    let text = std::fs::read_to_string(proc_mounts)
        .map_err(|e| ProcessError::FileOpen(proc_mounts.to_owned(), e))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f[..] {
                [_, dir, "cgroup", options, "0", "0"] => Some(CgroupMount {
                    dir: dir.into(),
                    v2: false,
                    options: options.into(),
                }),
                [_, dir, "cgroup2", options, "0", "0"] => Some(CgroupMount {
                    dir: dir.into(),
                    v2: true,
                    options: options.into(),
                }),
                _ => None,
            }
        })
        .collect())
}

/// Write `value` and a newline, as the jailer's `writeln_special`.
fn write_special(path: &Path, value: &str) -> Result<(), ProcessError> {
    std::fs::write(path, format!("{value}\n")).map_err(|e| ProcessError::Write(path.to_owned(), e))
}

/// The jailer's cgroup steps (`Env::new` and `CgroupConfiguration::setup`) for process
/// `pid`: the cgroup directories made.
pub fn setup_cgroups(
    args: &JailerArgs,
    exec_name: &str,
    proc_mounts: &Path,
    pid: u32,
) -> Result<Vec<PathBuf>, ProcessError> {
    use ProcessError as E;
    let parent = PathBuf::from(args.parent_cgroup.as_deref().unwrap_or(exec_name));
    let version = args.cgroup_version.as_str();
    if args.cgroups.is_empty() && version != "2" {
        return Ok(Vec::new());
    }
    let mounts = cgroup_mounts(proc_mounts)?;
    let v2 = mounts.iter().find(|m| m.v2).map(|m| m.dir.clone());
    let v1: Vec<&CgroupMount> = mounts.iter().filter(|m| !m.v2).collect();
    let found = if version == "2" {
        v2.is_some()
    } else {
        !v1.is_empty()
    };
    if !found {
        return Err(E::CgroupHierarchyMissing(
            "No hierarchy found for this cgroup version.".into(),
        ));
    }
    if args.cgroups.is_empty() {
        // v2 with no --cgroup: join the parent cgroup, only if it exists.
        let dir = v2.expect("found").join(&parent);
        if dir.exists() {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string()).map_err(E::CgroupWrite)?;
        }
        return Ok(Vec::new());
    }
    // (location, properties) per hierarchy, in the order first named.
    let mut cgroups: Vec<(PathBuf, Vec<(String, String)>)> = Vec::new();
    for cgroup in &args.cgroups {
        let (file, value) = cgroup.split_once('=').expect("checked by enter_jail");
        let controller = file
            .split('.')
            .next()
            .filter(|_| file.contains('.'))
            .ok_or_else(|| E::CgroupInvalidFile(file.to_owned()))?;
        let hierarchy = if version == "2" {
            let root = v2.clone().expect("found");
            let offered =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if !offered.split_whitespace().any(|c| c == controller) {
                return Err(E::CgroupControllerUnavailable(controller.to_owned()));
            }
            root
        } else {
            v1.iter()
                .find(|m| m.options.split(',').any(|o| o == controller))
                .map(|m| m.dir.clone())
                .ok_or_else(|| E::CgroupControllerUnavailable(controller.to_owned()))?
        };
        let location = hierarchy.join(&parent).join(&args.id);
        match cgroups.iter_mut().find(|(l, _)| *l == location) {
            Some((_, props)) => props.push((file.to_owned(), value.to_owned())),
            None => cgroups.push((location, vec![(file.to_owned(), value.to_owned())])),
        }
    }
    for (location, props) in &cgroups {
        std::fs::create_dir_all(location).map_err(|e| E::CreateDir(location.clone(), e))?;
        let mut enabled: Vec<&str> = Vec::new();
        for (file, value) in props {
            if version == "2" {
                // Enable the controller in every parent, top down, as the jailer does.
                let controller = file.split('.').next().unwrap_or_default();
                if !enabled.contains(&controller) {
                    let mut ancestors: Vec<&Path> = location
                        .ancestors()
                        .skip(1)
                        .take_while(|a| a.join("cgroup.subtree_control").exists())
                        .collect();
                    ancestors.reverse();
                    for a in ancestors {
                        write_special(
                            &a.join("cgroup.subtree_control"),
                            &format!("+{controller}"),
                        )?;
                    }
                    enabled.push(controller);
                }
            } else {
                // v1: the child's file starts from the parent's value.
                let inherited = location
                    .parent()
                    .map(|p| p.join(file))
                    .and_then(|f| std::fs::read_to_string(f).ok())
                    .and_then(|t| t.lines().next().map(str::to_owned))
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| E::CgroupInheritFromParent(location.clone(), file.clone()))?;
                write_special(&location.join(file), &inherited)?;
            }
            write_special(&location.join(file), value)?;
        }
    }
    for (location, _) in &cgroups {
        let procs = if version == "2" {
            "cgroup.procs"
        } else {
            "tasks"
        };
        write_special(&location.join(procs), &pid.to_string())?;
    }
    Ok(cgroups.into_iter().map(|(l, _)| l).collect())
}

/// The jailer's last step before it execs Firecracker: become `--uid`/`--gid` (supplementary
/// groups cleared). Done only when the double runs as root, as the real jailer does
/// unconditionally (it requires root); the process then serves the API as that user, so
/// files it must open (drives, logs) have to be that user's.
pub fn drop_privileges(args: &JailerArgs) -> Result<(), ProcessError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let err = |what: &str, e: nix::Error| {
        ProcessError::Privileges(
            format!("uid {} gid {} ({what})", args.uid, args.gid),
            e.into(),
        )
    };
    let uid: u32 = args
        .uid
        .parse()
        .map_err(|_| ProcessError::Uid(args.uid.clone()))?;
    let gid: u32 = args
        .gid
        .parse()
        .map_err(|_| ProcessError::Gid(args.gid.clone()))?;
    let gid = nix::unistd::Gid::from_raw(gid);
    nix::unistd::setgroups(&[gid]).map_err(|e| err("setgroups", e))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| err("setgid", e))?;
    let uid = nix::unistd::Uid::from_raw(uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| err("setuid", e))
}

/// The cgroup arguments, checked as `Env::new` does; none is applied.
fn check_cgroups(args: &JailerArgs, exec_name: &str) -> Result<(), ProcessError> {
    let parent = args.parent_cgroup.as_deref().unwrap_or(exec_name);
    if !is_plain_relative(parent) {
        return Err(ProcessError::CgroupInvalidParentPath);
    }
    let version: u8 = args
        .cgroup_version
        .parse()
        .map_err(|_| ProcessError::CgroupInvalidVersion(args.cgroup_version.clone()))?;
    // `CgroupBuilder::new` checks the version, and is used for v2 or when cgroups are given.
    if (version == 2 || !args.cgroups.is_empty()) && !matches!(version, 1 | 2) {
        return Err(ProcessError::CgroupInvalidVersion(
            args.cgroup_version.clone(),
        ));
    }
    for cgroup in &args.cgroups {
        let parts: Vec<&str> = cgroup.split('=').collect();
        if parts.len() != 2 || parts[1].is_empty() {
            return Err(ProcessError::CgroupFormat(cgroup.clone()));
        }
        if !is_plain_relative(parts[0]) {
            return Err(ProcessError::CgroupInvalidFile(cgroup.clone()));
        }
    }
    Ok(())
}

/// `Env::parse_resource_limits`; none is applied.
fn check_resource_limits(limits: &[String]) -> Result<(), ProcessError> {
    for limit in limits {
        let (name, value) = limit
            .split_once('=')
            .ok_or_else(|| ProcessError::ResLimitFormat(limit.clone()))?;
        value
            .parse::<u64>()
            .map_err(|e| ProcessError::ResLimitValue(value.to_owned(), e.to_string()))?;
        if !matches!(name, "fsize" | "no-file") {
            return Err(ProcessError::ResLimitArgument(name.to_owned()));
        }
    }
    Ok(())
}

/// A fault to inject into the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub path_prefix: String,
    pub status: u16,
    pub message: String,
}

/// Parse [`FAIL_ENV`]: `PATH_PREFIX:STATUS:MESSAGE[;...]`.
pub fn parse_faults(spec: &str) -> Result<Vec<Fault>, String> {
    spec.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| {
            let mut parts = entry.splitn(3, ':');
            let (Some(path), Some(status), Some(message)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!(
                    "{FAIL_ENV}: {entry:?} is not PATH_PREFIX:STATUS:MESSAGE"
                ));
            };
            let status = status
                .parse::<u16>()
                .ok()
                .filter(|s| (400..600).contains(s))
                .ok_or_else(|| format!("{FAIL_ENV}: {status:?} is not an error status"))?;
            Ok(Fault {
                path_prefix: path.to_owned(),
                status,
                message: message.to_owned(),
            })
        })
        .collect()
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest shut down (Ctrl+Alt+Del) and the double exited.
    GuestExited,
    /// Told to stop by this signal number.
    Signalled(i32),
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::GuestExited => 0,
            Outcome::Signalled(signal) => u8::try_from(128 + signal).unwrap_or(u8::MAX),
        }
    }
}

/// Serve the API in the jail until the guest exits or `shutdown` resolves (to a signal
/// number), writing the guest's console to `console`; then write the record.
/// `poweroff`: each signal it receives is a `poweroff` typed in the guest.
pub async fn serve(
    jail: &Jail,
    faults: &[Fault],
    options: super::Options,
    console: &mut dyn Write,
    shutdown: impl Future<Output = i32>,
    poweroff: Option<tokio::signal::unix::Signal>,
) -> Result<Outcome, ProcessError> {
    let began = Instant::now();
    let double = FirecrackerDouble::start_with(&jail.api_socket, Some(&jail.root), options)
        .await
        .map_err(|e| ProcessError::ApiSocket(jail.api_socket.clone(), e))?;
    for fault in faults {
        double.fail_next(&fault.path_prefix, fault.status, &fault.message);
    }
    let outcome = tokio::select! {
        signal = shutdown => Ok(Outcome::Signalled(signal)),
        guest = guest(&double, console, poweroff) => guest.map(|()| Outcome::GuestExited),
    };
    let record = record(&double, began);
    double.shutdown().await;
    let path = jail.root.join(RECORD_FILE);
    let partial = jail.root.join(format!("{RECORD_FILE}.partial"));
    std::fs::write(&partial, format!("{record:#}\n"))
        .and_then(|()| std::fs::rename(&partial, &path))
        .map_err(|e| ProcessError::Write(path, e))?;
    outcome
}

/// The guest: boots when `InstanceStart` is accepted, runs until the double exits.
async fn guest(
    double: &FirecrackerDouble,
    console: &mut dyn Write,
    mut poweroff: Option<tokio::signal::unix::Signal>,
) -> Result<(), ProcessError> {
    double.instance_started().await;
    let requests = double.requests();
    let body_of = |path: &str| {
        requests
            .iter()
            .rev()
            .find(|r| r.path == path && (200..300).contains(&r.status))
            .and_then(|r| r.body.clone())
            .unwrap_or(Value::Null)
    };
    let (boot, machine) = (body_of("/boot-source"), body_of("/machine-config"));
    let (boot_id, restored) = double.boot();
    let boot_id = boot_id.unwrap_or_default();
    let lines = if restored {
        // A restored guest runs on: no boot, one line of the double's own.
        vec![format!("{GUEST_RESTORED} (boot {boot_id})")]
    } else {
        vec![
            "[    0.000000] Linux version (firecracker double)".to_owned(),
            format!(
                "[    0.000000] Command line: {}",
                boot["boot_args"].as_str().unwrap_or_default()
            ),
            format!(
                "[    0.000000] smpboot: {} CPUs, {} MiB",
                machine["vcpu_count"].as_u64().unwrap_or(1),
                machine["mem_size_mib"].as_u64().unwrap_or(128)
            ),
            format!("{GUEST_BOOT_ID} {boot_id}"),
            GUEST_RUNNING.to_owned(),
        ]
    };
    for line in lines {
        writeln!(console, "{line}").map_err(ProcessError::Console)?;
    }
    console.flush().map_err(ProcessError::Console)?;
    let mut said = GuestPower::Up;
    loop {
        let power = double.guest_power();
        if power != said {
            let line = match power {
                GuestPower::Halted => Some(GUEST_POWER_DOWN),
                GuestPower::Rebooting => Some(GUEST_RESTARTING),
                GuestPower::Off | GuestPower::Up => None,
            };
            if let Some(line) = line {
                writeln!(console, "[    1.000000] {line}").map_err(ProcessError::Console)?;
                console.flush().map_err(ProcessError::Console)?;
            }
            said = power;
        }
        if double.state() == DoubleState::Exited {
            return Ok(());
        }
        let signalled = async {
            match poweroff.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(EXIT_POLL) => {}
            Some(()) = signalled => double.guest_poweroff(),
        }
    }
}

/// The record: state, requests (with milliseconds since the process began serving), and
/// violations.
fn record(double: &FirecrackerDouble, began: Instant) -> Value {
    let since = |at: Instant| at.saturating_duration_since(began).as_secs_f64() * 1000.0;
    let requests: Vec<Value> = double
        .requests()
        .into_iter()
        .map(|r| {
            json!({
                "method": r.method,
                "path": r.path,
                "body": r.body,
                "status": r.status,
                "at_ms": since(r.at),
            })
        })
        .collect();
    json!({
        "state": format!("{:?}", double.state()),
        "requests": requests,
        "violations": double.violations(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    const GOOD: &str = "--id vm-1 --exec-file /x/firecracker --uid 1 --gid 2 \
                        --chroot-base-dir /j --cgroup-version 2 -- --api-sock /api.sock";

    #[test]
    fn the_jailer_command_line_parses_like_the_real_one() {
        let Invocation::Run(a) = parse_jailer_args(&args(GOOD)).unwrap() else {
            panic!("not a run");
        };
        assert_eq!(a.id, "vm-1");
        assert_eq!(a.exec_file, "/x/firecracker");
        assert_eq!((a.uid.as_str(), a.gid.as_str()), ("1", "2"));
        assert_eq!(a.chroot_base_dir, "/j");
        assert_eq!(a.cgroup_version, "2");
        assert_eq!(a.firecracker_args, args("--api-sock /api.sock"));

        let defaults = "--id a --exec-file f --uid 1 --gid 2 --cgroup x=1 --cgroup y=2";
        let Invocation::Run(a) = parse_jailer_args(&args(defaults)).unwrap() else {
            panic!("not a run");
        };
        assert_eq!(a.chroot_base_dir, "/srv/jailer");
        assert_eq!(a.cgroup_version, "1");
        assert_eq!(a.cgroups, args("x=1 y=2"));
        assert!(a.firecracker_args.is_empty());

        assert!(matches!(
            parse_jailer_args(&args("--help")).unwrap(),
            Invocation::Print(text) if text.contains("--exec-file <exec-file>")
        ));
    }

    #[test]
    fn the_jailer_refuses_bad_command_lines_with_its_messages() {
        let refused = |line: &str| match parse_jailer_args(&args(line)) {
            Err(ProcessError::JailerArguments(e)) => e.to_string(),
            other => panic!("{line}: {other:?}"),
        };
        assert_eq!(
            refused("--exec-file f --uid 1 --gid 2"),
            "Argument 'id' required, but not found."
        );
        assert_eq!(
            refused("--id a --exec-file f --uid 1 --gid 2 --bogus 1"),
            "Found argument 'bogus' which wasn't expected, or isn't valid in this context."
        );
        assert_eq!(
            refused("--id a stray --exec-file f --uid 1 --gid 2"),
            "Found argument 'stray' which wasn't expected, or isn't valid in this context."
        );
        assert_eq!(
            refused("--id a --id b --exec-file f --uid 1 --gid 2"),
            "The argument 'id' was provided more than once."
        );
        assert_eq!(
            refused("--id --exec-file f --uid 1 --gid 2"),
            "The argument 'id' requires a value, but none was supplied."
        );
    }

    #[test]
    fn firecracker_arguments_follow_its_parser() {
        let fc = parse(FIRECRACKER_ARGS, &args("--id a --api-sock /s")).unwrap();
        assert_eq!(fc.value("api-sock"), Some("/s"));
        let fc = parse(FIRECRACKER_ARGS, &args("--id a")).unwrap();
        assert_eq!(fc.value("api-sock"), Some(DEFAULT_API_SOCK));
        assert_eq!(
            parse(FIRECRACKER_ARGS, &args("--id a --id b")).unwrap_err(),
            ArgError::Duplicate("id".into())
        );
        assert_eq!(
            parse(FIRECRACKER_ARGS, &args("--no-api")).unwrap_err(),
            ArgError::Missing("config-file".into())
        );
        assert_eq!(
            parse(FIRECRACKER_ARGS, &args("--no-seccomp --seccomp-filter f"))
                .unwrap_err()
                .to_string(),
            "Argument 'seccomp-filter' cannot be used together with argument 'no-seccomp'."
        );
    }

    #[test]
    fn instance_ids_are_checked_like_the_jailer() {
        assert!(validate_instance_id("0123456789ab").is_ok());
        assert!(validate_instance_id("a-b-c").is_ok());
        assert_eq!(
            validate_instance_id("a_b").unwrap_err(),
            "invalid char (_) at position 1"
        );
        assert_eq!(
            validate_instance_id(&"a".repeat(65)).unwrap_err(),
            "invalid len (65);  the length must be between 1 and 64"
        );
        assert!(validate_instance_id("").is_err());
    }

    /// The driver's arguments; `dir` holds the exec files in `bin/` and the jails in `jail/`.
    fn jailer(dir: &Path, id: &str, exec: &str) -> JailerArgs {
        JailerArgs {
            id: id.into(),
            exec_file: dir.join("bin").join(exec).display().to_string(),
            uid: nix::unistd::getuid().as_raw().to_string(),
            gid: nix::unistd::getgid().as_raw().to_string(),
            chroot_base_dir: dir.join("jail").display().to_string(),
            netns: None,
            daemonize: false,
            new_pid_ns: false,
            cgroups: Vec::new(),
            resource_limits: Vec::new(),
            cgroup_version: "2".into(),
            parent_cgroup: None,
            firecracker_args: args("--api-sock /api.sock"),
        }
    }

    #[test]
    fn entering_the_jail_does_what_the_jailer_does_before_exec() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        for sub in ["bin", "jail"] {
            std::fs::create_dir(base.join(sub)).unwrap();
        }
        std::fs::write(base.join("bin/firecracker-v1"), b"binary").unwrap();
        std::fs::write(base.join("bin/qemu"), b"binary").unwrap();

        let jail = enter_jail(&jailer(&base, "vm-1", "firecracker-v1")).unwrap();
        let root = base.join("jail/firecracker-v1/vm-1/root");
        assert_eq!(jail.root, root);
        assert_eq!(jail.api_socket, root.join("api.sock"));
        assert_eq!(
            std::fs::read(root.join("firecracker-v1")).unwrap(),
            b"binary"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("firecracker-v1.pid")).unwrap(),
            std::process::id().to_string()
        );
        for folder in ["dev/net", "run"] {
            let mode = std::fs::metadata(root.join(folder)).unwrap().permissions();
            assert_eq!(mode.mode() & 0o777, FOLDER_MODE, "{folder}");
        }
        // The pid file is created anew: a jail left over is refused, as by the jailer.
        assert!(matches!(
            enter_jail(&jailer(&base, "vm-1", "firecracker-v1")),
            Err(ProcessError::FileOpen(..))
        ));

        let refused = |a: JailerArgs| enter_jail(&a).unwrap_err().to_string();
        assert_eq!(
            refused(jailer(&base, "vm_1", "firecracker-v1")),
            "Invalid instance ID: invalid char (_) at position 2"
        );
        assert!(refused(jailer(&base, "vm-2", "qemu")).starts_with("Invalid filename."));
        assert!(
            refused(jailer(&base, "vm-2", "missing-firecracker"))
                .starts_with("Failed to canonicalize path")
        );
        let mut a = jailer(&base, "vm-2", "firecracker-v1");
        a.uid = "root".into();
        assert_eq!(refused(a), "Invalid uid: root");
        let mut a = jailer(&base, "vm-2", "firecracker-v1");
        a.cgroups = vec!["cpu.max".into()];
        assert_eq!(refused(a), "Invalid format for cgroups: cpu.max");
        let mut a = jailer(&base, "vm-2", "firecracker-v1");
        a.daemonize = true;
        assert_eq!(refused(a), "banger-fc-double does not model --daemonize");
        let mut a = jailer(&base, "vm-3", "firecracker-v1");
        a.firecracker_args = args("--api-sock /a --id x");
        let e = enter_jail(&a).unwrap_err();
        assert_eq!(e.exit_code(), FC_ARG_PARSING);
    }

    /// A cgroup file system in a temporary directory, as the jailer's own tests mock one:
    /// `mounts` is the mount table, with `{}` standing for the directory.
    fn mock_cgroups(mounts: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("mounts");
        std::fs::write(
            &table,
            mounts.replace("{}", &dir.path().display().to_string()),
        )
        .unwrap();
        (dir, table)
    }

    fn with_cgroups(version: &str, cgroups: &[&str]) -> JailerArgs {
        let mut a = jailer(Path::new("/x"), "vm-1", "firecracker");
        a.cgroup_version = version.into();
        a.parent_cgroup = Some("banger".into());
        a.cgroups = cgroups.iter().map(|c| (*c).to_owned()).collect();
        a
    }

    #[test]
    fn cgroups_v2_are_made_enabled_top_down_written_and_joined() {
        let (dir, table) = mock_cgroups("cgroup2 {}/unified cgroup2 rw,nsdelegate 0 0\n");
        let root = dir.path().join("unified");
        std::fs::create_dir_all(root.join("banger")).unwrap();
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        for d in [root.clone(), root.join("banger")] {
            std::fs::write(d.join("cgroup.subtree_control"), "").unwrap();
        }
        let a = with_cgroups("2", &["memory.max=603979776", "cpu.max=225000 100000"]);
        let made = setup_cgroups(&a, "firecracker", &table, 4242).unwrap();
        let vm = root.join("banger/vm-1");
        assert_eq!(made, std::slice::from_ref(&vm));
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(vm.join("memory.max")), "603979776\n");
        assert_eq!(read(vm.join("cpu.max")), "225000 100000\n");
        assert_eq!(read(vm.join("cgroup.procs")), "4242\n");
        // Each controller enabled in every parent (the last write is what a file shows).
        assert_eq!(read(root.join("cgroup.subtree_control")), "+cpu\n");
        assert_eq!(read(root.join("banger/cgroup.subtree_control")), "+cpu\n");

        // A controller the hierarchy does not offer (a hybrid host's unified mount).
        std::fs::write(root.join("cgroup.controllers"), "").unwrap();
        let e = setup_cgroups(&a, "firecracker", &table, 1).unwrap_err();
        assert_eq!(e.to_string(), "Controller memory is unavailable");
    }

    #[test]
    fn cgroups_v1_are_found_by_controller_and_start_from_the_parents_value() {
        let (dir, table) = mock_cgroups(
            "cgroup {}/cpu cgroup rw,relatime,cpu 0 0\n\
             cgroup {}/memory cgroup rw,relatime,memory 0 0\n\
             cgroup2 {}/unified cgroup2 rw,relatime 0 0\n",
        );
        for (c, files) in [
            ("cpu", &["cpu.cfs_period_us", "cpu.cfs_quota_us"][..]),
            ("memory", &["memory.limit_in_bytes"][..]),
        ] {
            let parent = dir.path().join(c).join("banger");
            std::fs::create_dir_all(&parent).unwrap();
            for f in files {
                std::fs::write(parent.join(f), "-1\n").unwrap();
            }
        }
        let a = with_cgroups(
            "1",
            &[
                "memory.limit_in_bytes=335544320",
                "cpu.cfs_period_us=100000",
                "cpu.cfs_quota_us=125000",
            ],
        );
        let made = setup_cgroups(&a, "firecracker", &table, 7).unwrap();
        let (mem, cpu) = (
            dir.path().join("memory/banger/vm-1"),
            dir.path().join("cpu/banger/vm-1"),
        );
        assert_eq!(made, [mem.clone(), cpu.clone()]);
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(mem.join("memory.limit_in_bytes")), "335544320\n");
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "125000\n");
        assert_eq!(read(mem.join("tasks")), "7\n");
        assert_eq!(read(cpu.join("tasks")), "7\n");
        // A controller no v1 hierarchy has.
        let a = with_cgroups("1", &["pids.max=10"]);
        let e = setup_cgroups(&a, "firecracker", &table, 7).unwrap_err();
        assert_eq!(e.to_string(), "Controller pids is unavailable");
    }

    #[test]
    fn no_hierarchy_fails_v2_even_without_cgroup_files_as_under_ip_netns_exec() {
        // `ip netns exec` mounts a fresh sysfs: no cgroup line at all.
        let (_dir, table) = mock_cgroups("sysfs /sys sysfs rw 0 0\nproc /proc proc rw 0 0\n");
        let e = setup_cgroups(&with_cgroups("2", &[]), "firecracker", &table, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Hierarchy not found: No hierarchy found for this cgroup version."
        );
        let e = setup_cgroups(
            &with_cgroups("1", &["memory.limit_in_bytes=1"]),
            "firecracker",
            &table,
            1,
        )
        .unwrap_err();
        assert!(matches!(e, ProcessError::CgroupHierarchyMissing(_)), "{e}");
        // Version 1 with no file touches no hierarchy.
        assert_eq!(
            setup_cgroups(&with_cgroups("1", &[]), "firecracker", &table, 1).unwrap(),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn the_binary_is_firecracker_alone_under_a_firecracker_name() {
        assert!(runs_as_firecracker("/usr/local/bin/firecracker"));
        assert!(runs_as_firecracker("firecracker-v1.13.1-x86_64"));
        assert!(!runs_as_firecracker("/target/debug/banger-fc-double"));
        assert!(!runs_as_firecracker("/usr/bin/jailer"));
        let jail = firecracker_alone(
            &args("--id vm-1 --api-sock /abs/api.sock"),
            Path::new("/vm"),
        )
        .unwrap();
        assert_eq!(jail.root, PathBuf::from("/vm"));
        assert_eq!(jail.api_socket, PathBuf::from("/abs/api.sock"));
        let jail = firecracker_alone(&args("--api-sock api.sock"), Path::new("/vm")).unwrap();
        assert_eq!(jail.api_socket, PathBuf::from("/vm/api.sock"));
        assert!(firecracker_alone(&args("--id vm_1"), Path::new("/vm")).is_err());
        let version = firecracker_version(
            &args("--version"),
            crate::vmm::firecracker::double::Release::Newest,
        )
        .unwrap();
        assert_eq!(
            version,
            format!("Firecracker v{}\n\n", Spec::shared().version())
        );
        assert_eq!(
            firecracker_version(
                &args("--version"),
                crate::vmm::firecracker::double::Release::Oldest
            )
            .unwrap(),
            "Firecracker v1.10.0\n\n"
        );
        assert_eq!(
            firecracker_version(
                &args("--id vm_1"),
                crate::vmm::firecracker::double::Release::Newest
            ),
            None
        );
    }

    #[test]
    fn faults_parse_from_the_environment_format() {
        assert_eq!(
            parse_faults("/drives/work:400:Drive error: bad; /actions:500:x").unwrap(),
            vec![
                Fault {
                    path_prefix: "/drives/work".into(),
                    status: 400,
                    message: "Drive error: bad".into()
                },
                Fault {
                    path_prefix: "/actions".into(),
                    status: 500,
                    message: "x".into()
                },
            ]
        );
        assert!(parse_faults("/drives:204:fine").is_err());
        assert!(parse_faults("/drives").is_err());
    }
}
