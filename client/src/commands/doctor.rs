//! `banger doctor`: one line per check — ok, warn or fail — with what to do. Checks the
//! host (architecture, KVM and whether it is nested PVM, tools), the VMM new VMs get and
//! why (`default_vmm = "auto"` resolved by the same rule as the daemon's,
//! `banger_host::choose`), the daemon (running, version drift, store schema, socket
//! permissions, VM defaults and where they come from) and running VMs' agents. Exits 1 when
//! a check fails — among them a missing binary of the VMM new VMs get (a configured
//! `default_vmm = "firecracker"` without Firecracker installed fails). The other VMM's
//! binaries are listed, and not needed. The VMM is the daemon's answer when it runs; else
//! what a daemon started now would pick.
//!
//! Doctor has the daemon's config checked by the daemon's own binary (`bangerd
//! --check-config`, the bangerd the CLI would start, with the environment it would give
//! it: the same file, `BANGER_CONFIG` and `BANGER_*` overrides; `--system` and no
//! environment for the system service; the CLI links none of the daemon): a config bangerd
//! would refuse fails (every command that needs the daemon exits 3 on it), and without a
//! daemon the VMM, its binaries and accelerator come from it.
//! Checks of parts banger does not have yet are not listed.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_api::{DaemonRpcClient, SpecDefaults, SpecSource, VmRpcClient, VmState, VmmKind};
use banger_host::choose::{self, Accel, Decision, Jailing, Kvm};
use serde::{Deserialize, Serialize};

use crate::connect::{self, Target};
use crate::exit::{self, CliError};
use crate::render;

/// The part of bangerd's config doctor looks at, from `bangerd --check-config` (which
/// prints all of it; the rest is ignored here). Its defaults are bangerd's (a test holds
/// them to the daemon's).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub default_vmm: String,
    pub firecracker: FirecrackerBins,
    pub qemu: QemuBins,
}

/// `[firecracker]`, the binaries.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct FirecrackerBins {
    pub binary: PathBuf,
    pub jailer: PathBuf,
}

/// `[qemu]`, the binaries and the accelerator.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct QemuBins {
    pub binary: PathBuf,
    pub accel: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_vmm: "auto".into(),
            firecracker: FirecrackerBins::default(),
            qemu: QemuBins::default(),
        }
    }
}

impl Default for FirecrackerBins {
    fn default() -> Self {
        FirecrackerBins {
            binary: "firecracker".into(),
            jailer: "jailer".into(),
        }
    }
}

impl Default for QemuBins {
    fn default() -> Self {
        QemuBins {
            binary: "qemu-system-x86_64".into(),
            accel: "auto".into(),
        }
    }
}

impl Config {
    /// `default_vmm` (bangerd validated it).
    fn vmm_choice(&self) -> banger_api::VmmChoice {
        self.default_vmm.parse().unwrap_or_default()
    }

    /// `[qemu] accel` (bangerd validated it: `auto`, `kvm` or `tcg`).
    fn qemu_accel(&self) -> Accel {
        match self.qemu.accel.as_str() {
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            _ => Accel::Auto,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Level,
    pub detail: String,
    /// What to do about it (warn and fail only).
    pub hint: Option<String>,
}

fn check(name: &str, status: Level, detail: impl Into<String>, hint: Option<&str>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
        hint: hint.map(str::to_owned),
    }
}

/// `name` on PATH (or a path that exists).
fn which(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.exists().then(|| p.to_owned());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|c| {
                std::fs::metadata(c)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    })
}

/// First line of `<bin> --version`.
fn version_of(bin: &Path) -> Option<String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    })
    .into_owned();
    text.lines().next().map(|l| l.trim().to_owned())
}

/// Host checks (no daemon needed).
pub fn host_checks() -> Vec<Check> {
    let mut out = Vec::new();
    let arch = std::env::consts::ARCH;
    out.push(match arch {
        "x86_64" | "aarch64" => check("architecture", Level::Ok, arch, None),
        other => check(
            "architecture",
            Level::Fail,
            other,
            Some("banger runs on x86_64 and aarch64 hosts"),
        ),
    });
    out.push(match Kvm::probe() {
        Kvm::Pvm => check(
            "kvm",
            Level::Warn,
            "/dev/kvm is PVM (nested paravirtualised KVM): stock guest kernels die early under it",
            Some("QEMU VMs run under TCG here (slow but real); Firecracker needs a PVM-enabled guest kernel"),
        ),
        Kvm::Usable => check("kvm", Level::Ok, "/dev/kvm is usable", None),
        Kvm::NoAccess => check(
            "kvm",
            Level::Fail,
            "/dev/kvm exists but this user cannot open it",
            Some("add yourself to the kvm group (`sudo usermod -aG kvm $USER`), or use the system service"),
        ),
        Kvm::Missing => check(
            "kvm",
            Level::Warn,
            "no /dev/kvm: no hardware virtualisation",
            Some("only `--vmm qemu` with TCG (slow) works; enable virtualisation in firmware or the hypervisor"),
        ),
    });
    out
}

/// What doctor knows of the VMM new VMs get.
#[derive(Debug, Clone)]
pub struct VmmView {
    pub decision: Decision,
    /// Where the answer comes from, as a clause.
    pub from: &'static str,
}

impl VmmView {
    /// The daemon's own answer (`vm.defaults`).
    fn of_daemon(d: &SpecDefaults) -> VmmView {
        VmmView {
            decision: Decision {
                vmm: d.vmm,
                emulated: d.vmm_emulated,
                reason: d.vmm_reason.clone(),
            },
            from: "the daemon's answer",
        }
    }

    /// Without a daemon: what one started now by this user with `config` would pick
    /// (started as root, it has the helper, given the jailer when installed). A config
    /// that does not load counts as the defaults (its own check fails).
    fn local(config: &Config) -> VmmView {
        let (fc, jailer) = (&config.firecracker.binary, &config.firecracker.jailer);
        let jailing = if !nix::unistd::geteuid().is_root() {
            Jailing::NoHelper
        } else if choose::find_program(fc).is_some() && choose::find_program(jailer).is_some() {
            Jailing::Ready
        } else {
            Jailing::HelperWithoutJailer
        };
        let probe = choose::RealProbe {
            firecracker: fc.clone(),
            jailer: jailer.clone(),
            jailing,
        };
        VmmView {
            decision: choose::decide(config.vmm_choice(), config.qemu_accel(), &probe),
            from: if config.default_vmm == "auto" {
                "the daemon is not running: what it would pick with default_vmm = auto"
            } else {
                "the daemon is not running: its config's default_vmm"
            },
        }
    }
}

/// The VMM check and one check per VMM binary (as `config` names them): those of the VMM
/// new VMs get must be installed (fail), the other VMM's are listed and not needed. `find`
/// locates a program.
pub fn vmm_checks(
    view: &VmmView,
    config: &Config,
    find: &dyn Fn(&str) -> Option<PathBuf>,
) -> Vec<Check> {
    let d = &view.decision;
    let mut out = vec![if d.emulated {
        check(
            "vmm",
            Level::Warn,
            format!(
                "new VMs get {}: {} ({})",
                d.vmm.as_str(),
                d.reason,
                view.from
            ),
            Some(
                "VMs work but are emulated and slow; a host whose /dev/kvm runs stock guests gives QEMU with KVM, or Firecracker when it is installed",
            ),
        )
    } else {
        check(
            "vmm",
            Level::Ok,
            format!(
                "new VMs get {}: {} ({})",
                d.vmm.as_str(),
                d.reason,
                view.from
            ),
            None,
        )
    }];
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut suspend = None;
    for (name, bin, vmm, hint) in [
        (
            "firecracker",
            path(&config.firecracker.binary),
            VmmKind::Firecracker,
            "install Firecracker's release (firecracker and jailer, github.com/firecracker-microvm/firecracker/releases), or set default_vmm = \"auto\"",
        ),
        (
            "jailer",
            path(&config.firecracker.jailer),
            VmmKind::Firecracker,
            "the jailer ships with Firecracker's release tarball",
        ),
        (
            "qemu",
            path(&config.qemu.binary),
            VmmKind::Qemu,
            "install QEMU (`apt-get install qemu-system-x86`)",
        ),
    ] {
        out.push(match find(&bin) {
            Some(p) => {
                let version = version_of(&p);
                if vmm == d.vmm && name != "jailer" {
                    suspend = Some(suspend_check(vmm, version.as_deref()));
                }
                check(
                    name,
                    Level::Ok,
                    format!(
                        "{} ({})",
                        version.unwrap_or_else(|| "version unknown".into()),
                        p.display()
                    ),
                    None,
                )
            }
            None if vmm == d.vmm => check(
                name,
                Level::Fail,
                format!("{bin} not found, and new VMs get {}", d.vmm.as_str()),
                Some(hint),
            ),
            None => check(
                name,
                Level::Ok,
                format!(
                    "{bin} not found (not needed: new VMs get {})",
                    d.vmm.as_str()
                ),
                None,
            ),
        });
    }
    out.extend(suspend);
    out
}

/// Whether `vm suspend` and `vm snapshot` (and so a restore at `vm start`, a `vm rollback`)
/// work with the VMM new VMs get, from its `--version` line. QEMU saves with the `mapped-ram` migration capability, new in
/// QEMU 9.0; every Firecracker banger supports has its snapshot API, but a snapshot loads
/// only into the release that made it.
pub fn suspend_check(vmm: VmmKind, version: Option<&str>) -> Check {
    match vmm {
        VmmKind::Firecracker => check(
            "suspend",
            Level::Ok,
            "Firecracker's snapshot API: `vm suspend` and `vm snapshot` work (a saved VM restores only under the Firecracker release that saved it)",
            None,
        ),
        VmmKind::Qemu => {
            // "QEMU emulator version 10.0.2 (Debian ...)".
            let major = version
                .and_then(|v| v.split("version ").nth(1))
                .and_then(|v| v.split('.').next())
                .and_then(|m| m.trim().parse::<u32>().ok());
            match major {
                Some(m) if m >= 9 => check(
                    "suspend",
                    Level::Ok,
                    format!("QEMU {m} saves with mapped-ram: `vm suspend` and `vm snapshot` work"),
                    None,
                ),
                Some(m) => check(
                    "suspend",
                    Level::Warn,
                    format!(
                        "QEMU {m} has no mapped-ram migration: `vm suspend` and `vm snapshot` fail (the VM runs on)"
                    ),
                    Some("QEMU 9.0 or newer suspends VMs (Debian bookworm-backports has 10.0)"),
                ),
                None => check(
                    "suspend",
                    Level::Warn,
                    "QEMU's version is unknown: `vm suspend` and `vm snapshot` need QEMU 9.0 or newer (mapped-ram)",
                    None,
                ),
            }
        }
    }
}

/// Tools besides the VMMs.
fn tool_checks() -> Vec<Check> {
    let mut out = Vec::new();
    let tools = [
        "mkfs.ext4",
        "e2fsck",
        "resize2fs",
        "debugfs",
        "nft",
        "ip",
        "ssh",
        "mmdebstrap",
    ];
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            which(t)
                .or_else(|| which(&format!("/usr/sbin/{t}")))
                .is_none()
        })
        .collect();
    out.push(if missing.is_empty() {
        check("host tools", Level::Ok, tools.join(", "), None)
    } else if missing
        .iter()
        .any(|t| ["mkfs.ext4", "e2fsck", "resize2fs"].contains(t))
    {
        check(
            "host tools",
            Level::Fail,
            format!("missing: {}", missing.join(", ")),
            Some("install e2fsprogs (and nftables, iproute2, openssh-client)"),
        )
    } else {
        check(
            "host tools",
            Level::Warn,
            format!("missing: {}", missing.join(", ")),
            Some("install nftables, iproute2 and openssh-client"),
        )
    });
    out
}

fn source(s: SpecSource) -> &'static str {
    match s {
        SpecSource::Flag => "flag",
        SpecSource::Config => "config",
        SpecSource::Host => "auto",
        SpecSource::Builtin => "builtin",
    }
}

/// Daemon and VM checks.
/// The helper's confinement, the bridge, NAT forwarding, the guests' resolver and the
/// host's `.vm` routing, from the daemon's status and the host.
fn network_checks(status: &banger_api::DaemonStatus) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(match &status.helper {
        None => check(
            "helper",
            Level::Warn,
            "no privileged helper: this bangerd was not started as root, so VMs with a network cannot start",
            Some("`sudo banger system install`, or create VMs with --no-network"),
        ),
        Some(h) => {
            let confined = h.seccomp_mode == 2 && h.no_new_privs && h.landlock == "fully enforced";
            let detail = format!(
                "uid {}, seccomp {}, landlock {}, capabilities {}",
                h.uid,
                if h.seccomp_mode == 2 { "filter" } else { "OFF" },
                h.landlock,
                h.caps_effective
                    .iter()
                    .map(|c| c.trim_start_matches("CAP_").to_lowercase())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            if confined {
                check("helper", Level::Ok, format!("confined: {detail}"), None)
            } else {
                check(
                    "helper",
                    Level::Fail,
                    format!("not fully confined: {detail}"),
                    Some("a kernel without landlock or seccomp? see `bangerd __helper-selftest` in docs/guide.md"),
                )
            }
        }
    });
    let (installed, detail) = super::ssh::doctor_state();
    out.push(if installed {
        check("ssh-config", Level::Ok, detail, None)
    } else {
        check(
            "ssh-config",
            Level::Warn,
            detail,
            Some("`banger ssh-config` makes plain `ssh <vm>.vm`, scp and rsync work"),
        )
    });
    let Some(net) = &status.network else {
        return out;
    };
    let addr = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", &net.bridge])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let inet = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .map(str::to_owned);
    out.push(match inet {
        Some(inet) => check(
            "bridge",
            Level::Ok,
            format!("{} {inet} (subnet {})", net.bridge, net.subnet),
            None,
        ),
        None if status.helper.is_some() => check(
            "bridge",
            Level::Warn,
            format!("{} does not exist", net.bridge),
            Some("the helper makes it when a VM with a network starts; see bangerd.log if one did"),
        ),
        None => check(
            "bridge",
            Level::Warn,
            format!("{} does not exist (no helper to make it)", net.bridge),
            Some("`sudo banger system install`"),
        ),
    });
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    out.push(check(
        "nat",
        Level::Ok,
        if forwarding {
            "IPv4 forwarding on (VMs created with --nat reach beyond the subnet)"
        } else {
            "IPv4 forwarding off: no VM has --nat (banger turns it on when one does)"
        },
        None,
    ));
    out.push(match &net.guest_dns {
        Some(a) => check(
            "guest dns",
            Level::Ok,
            format!("guests resolve .vm and forward the rest through {a}"),
            None,
        ),
        None => check(
            "guest dns",
            Level::Warn,
            "no resolver for guests (needs the helper, and port 53 on the bridge address free)",
            Some("guests then resolve nothing; see bangerd.log"),
        ),
    });
    let resolved = std::path::Path::new("/run/systemd/resolve").exists();
    out.push(if !resolved {
        check(
            "resolved routing",
            Level::Ok,
            "systemd-resolved is not in use: on the host, resolve <vm>.vm with `dig @127.0.0.1 -p 42069`, or `banger vm show`",
            None,
        )
    } else {
        let domains = std::process::Command::new("resolvectl")
            .args(["domain", &net.bridge])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if domains.contains("~vm") {
            check(
                "resolved routing",
                Level::Ok,
                format!("systemd-resolved sends .vm to {}", net.bridge),
                None,
            )
        } else {
            check(
                "resolved routing",
                Level::Warn,
                "systemd-resolved does not route .vm to banger",
                Some("restart the service (`sudo banger system restart`): bangerd sets it up at start"),
            )
        }
    });
    out
}

/// How Firecracker VMs run here: jailed or not, their cgroup, the jail base's mount.
fn firecracker_checks(status: &banger_api::DaemonStatus) -> Vec<Check> {
    let Some(fc) = &status.firecracker else {
        return Vec::new();
    };
    let mut out = vec![if fc.jailed {
        check("firecracker jail", Level::Ok, fc.isolation.clone(), None)
    } else {
        check(
            "firecracker jail",
            Level::Warn,
            fc.isolation.clone(),
            fc.isolation.starts_with("unjailed").then_some(
                "`sudo banger system install` runs bangerd with its privileged helper, which starts each Firecracker VM under the jailer",
            ),
        )
    }];
    let no_cgroup = fc.cgroups.starts_with("no per-VM cgroup");
    out.push(match (fc.jailed, no_cgroup) {
        (true, true) => check(
            "cgroups",
            Level::Warn,
            fc.cgroups.clone(),
            Some("Firecracker VMs run without memory or CPU limits; mount cgroup2 with the memory and cpu controllers (or cgroup v1 memory and cpu)"),
        ),
        (true, false) => check("cgroups", Level::Ok, fc.cgroups.clone(), None),
        (false, _) => check(
            "cgroups",
            Level::Ok,
            format!("{} (used once VMs are jailed)", fc.cgroups),
            None,
        ),
    });
    out.push(match (&fc.nodev, fc.jailed) {
        (Some(problem), true) => check("jail base", Level::Fail, problem.clone(), None),
        (Some(problem), false) => check(
            "jail base",
            Level::Warn,
            format!("{problem} (matters once VMs are jailed)"),
            None,
        ),
        (None, _) => check(
            "jail base",
            Level::Ok,
            format!("{} allows device nodes", fc.jail_base),
            None,
        ),
    });
    out
}

/// The daemon's config, loaded and checked by `bangerd --check-config` as the daemon
/// serving `target` would load it (the system service's with `--system` and without our
/// environment; a user daemon's with the environment the CLI starts it with), and its
/// check. A config bangerd refuses fails.
fn config_check(target: &Target) -> (Check, Option<Config>) {
    let bin = connect::bangerd_path();
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("--check-config");
    if target.system {
        // systemd starts it with `--system` and an environment of its own.
        cmd.arg("--system").env_clear();
    } else {
        for v in connect::CLI_ONLY_VARS {
            cmd.env_remove(v);
        }
    }
    let refused = |detail: String| {
        check(
            "config",
            Level::Fail,
            detail,
            Some(
                "fix it: bangerd refuses to start on it, so every command that needs the daemon fails (exit 3)",
            ),
        )
    };
    let out = match cmd.stdin(std::process::Stdio::null()).output() {
        Ok(out) => out,
        Err(e) => {
            return (
                check(
                    "config",
                    Level::Fail,
                    format!("cannot run {} to check the config: {e}", bin.display()),
                    Some(
                        "install bangerd beside banger (scripts/install.sh), or set BANGER_BANGERD",
                    ),
                ),
                None,
            );
        }
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("unexpected argument '--check-config'") {
            return (
                check(
                    "config",
                    Level::Warn,
                    format!(
                        "{} is older than this banger and cannot check the config",
                        bin.display()
                    ),
                    Some("install the bangerd of the same release beside banger (`banger update`)"),
                ),
                None,
            );
        }
        let reason = stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .map(|l| l.trim_start_matches("bangerd: ").to_owned())
            .unwrap_or_else(|| format!("{} --check-config failed ({})", bin.display(), out.status));
        return (refused(reason), None);
    }
    let checked: banger_api::tools::CheckedConfig = match serde_json::from_slice(&out.stdout) {
        Ok(c) => c,
        Err(e) => {
            return (
                refused(format!(
                    "{} --check-config answered no config ({e}): is it an older bangerd?",
                    bin.display()
                )),
                None,
            );
        }
    };
    let config = match serde_json::from_value::<Config>(checked.config) {
        Ok(c) => c,
        Err(e) => return (refused(format!("bangerd's config: {e}")), None),
    };
    let detail = match &checked.file {
        Some(p) if checked.file_exists => format!("{} loads", p.display()),
        Some(p) => format!("no {}: the defaults apply", p.display()),
        None => "no config file (no HOME): the defaults apply".into(),
    };
    (check("config", Level::Ok, detail, None), Some(config))
}

/// Daemon and VM checks, and the daemon's VM defaults when it answers. `config_ok`: the
/// config loads, so a daemon can be started.
async fn daemon_checks(target: &Target, config_ok: bool) -> (Vec<Check>, Option<SpecDefaults>) {
    let mut out = Vec::new();
    let client = match connect::connect(target).await {
        Ok(c) => c,
        Err(CliError::NotRunning { socket }) if !config_ok => {
            out.push(check(
                "daemon",
                Level::Fail,
                format!("not running (socket {socket}), and it cannot start: its config is refused (see config)"),
                Some("fix the config; then it starts on first use, or `banger daemon start`"),
            ));
            return (out, None);
        }
        Err(CliError::NotRunning { socket }) => {
            out.push(check(
                "daemon",
                Level::Warn,
                format!("not running (socket {socket})"),
                Some("it starts on first use, or `banger daemon start`"),
            ));
            return (out, None);
        }
        Err(e) => {
            out.push(check(
                "daemon",
                Level::Fail,
                e.to_string(),
                e.hint().as_deref(),
            ));
            return (out, None);
        }
    };
    let status = match client.status().await {
        Ok(s) => s,
        Err(e) => {
            out.push(check(
                "daemon",
                Level::Fail,
                CliError::from(e).to_string(),
                None,
            ));
            return (out, None);
        }
    };
    out.push(check(
        "daemon",
        Level::Ok,
        format!(
            "bangerd {} pid {} ({:?})",
            status.version, status.pid, status.mode
        )
        .to_lowercase(),
        None,
    ));
    let cli = super::version::VERSION;
    out.push(
        if status.version == cli && status.commit == super::version::COMMIT {
            check(
                "version drift",
                Level::Ok,
                format!("cli and daemon both {cli}"),
                None,
            )
        } else {
            check(
                "version drift",
                Level::Warn,
                format!(
                    "cli {cli} ({}), daemon {} ({})",
                    super::version::COMMIT,
                    status.version,
                    status.commit
                ),
                Some("restart the daemon: `banger daemon stop` (it restarts on next use)"),
            )
        },
    );
    out.push(match &status.dns {
        Some(addr) => {
            let (host, port) = addr.rsplit_once(':').unwrap_or(("127.0.0.1", "42069"));
            check(
                "dns",
                Level::Ok,
                format!(".vm resolver on {addr} (`dig @{host} -p {port} <vm>.vm`)"),
                None,
            )
        }
        None => check(
            "dns",
            Level::Warn,
            "the .vm resolver is not listening",
            Some("its port is taken, or dns_listen is empty: see bangerd.log"),
        ),
    });
    out.extend(network_checks(&status));
    out.extend(firecracker_checks(&status));
    out.push(check(
        "store",
        Level::Ok,
        format!(
            "{} (schema v{}, {} starts)",
            status.store.path, status.store.schema_version, status.store.starts
        ),
        None,
    ));
    out.push(match std::fs::metadata(&status.socket) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid()))
                .ok()
                .flatten()
                .map(|g| g.name)
                .unwrap_or_else(|| m.gid().to_string());
            if mode == 0o660 {
                check(
                    "socket",
                    Level::Ok,
                    format!("{} mode 0660 group {group}", status.socket),
                    None,
                )
            } else {
                check(
                    "socket",
                    Level::Warn,
                    format!("{} mode {mode:04o} group {group}", status.socket),
                    Some("restart the daemon; it makes its socket 0660"),
                )
            }
        }
        Err(e) => check(
            "socket",
            Level::Fail,
            format!("{}: {e}", status.socket),
            None,
        ),
    });
    let defaults = client.defaults().await.ok();
    if let Some(d) = &defaults {
        out.push(check(
            "vm defaults",
            Level::Ok,
            format!(
                "vcpu {} ({}) · memory {} MiB ({}) · disk {} ({}) · vmm {}",
                d.spec.vcpu,
                source(d.vcpu_from),
                d.spec.memory_mib,
                source(d.memory_from),
                super::vm::bytes(d.spec.disk_bytes),
                source(d.disk_from),
                d.vmm.as_str()
            ),
            None,
        ));
    }
    if let Ok(vms) = VmRpcClient::list(&client).await {
        for vm in vms.into_iter().filter(|v| v.state == VmState::Running) {
            let name = format!("agent of {}", vm.name);
            let Some(sock) = vm.vsock_socket else {
                continue;
            };
            let health = banger_guest::host::call(
                Path::new(&sock),
                &banger_guest::proto::Request::Health,
                Duration::from_secs(3),
            )
            .await;
            out.push(match health {
                Ok(banger_guest::proto::Response::Health { software, .. }) => {
                    let same = software.ends_with(cli);
                    check(
                        &name,
                        if same { Level::Ok } else { Level::Warn },
                        software,
                        (!same).then_some("rebuild the image with this banger's agent"),
                    )
                }
                Ok(other) => check(
                    &name,
                    Level::Warn,
                    format!("unexpected answer {other:?}"),
                    None,
                ),
                Err(e) => check(
                    &name,
                    Level::Warn,
                    e.to_string(),
                    Some("see `banger vm logs`"),
                ),
            });
        }
    }
    (out, defaults)
}

pub async fn run(target: &Target, json: bool) -> Result<u8, CliError> {
    let (config_check, config) = config_check(target);
    let (daemon, defaults) = daemon_checks(target, config.is_some()).await;
    let config = config.unwrap_or_default();
    let view = match &defaults {
        Some(d) => VmmView::of_daemon(d),
        None => VmmView::local(&config),
    };
    let mut checks = host_checks();
    checks.extend(vmm_checks(&view, &config, &which));
    checks.extend(tool_checks());
    checks.push(config_check);
    checks.extend(daemon);
    checks.push(super::system::doctor_check(
        &super::system::Layout::new(None),
        &crate::systemd::SystemctlCmd { root: None },
    ));
    let failed = checks.iter().any(|c| c.status == Level::Fail);
    if json {
        render::json(&checks)?;
    } else {
        for c in &checks {
            let tag = match c.status {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            outln!("{tag}  {:<18} {}", c.name, c.detail);
            if let Some(h) = &c.hint {
                outln!("      {:<18} → {h}", "");
            }
        }
    }
    Ok(if failed { exit::FAILURE } else { exit::OK })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(vmm: VmmKind, emulated: bool) -> VmmView {
        VmmView {
            decision: Decision {
                vmm,
                emulated,
                reason: "why".into(),
            },
            from: "test",
        }
    }

    fn status<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    /// A host where only `installed` are found (each at /bin/true, which runs, so the
    /// version probe has something to run).
    fn only(installed: &'static [&'static str]) -> impl Fn(&str) -> Option<PathBuf> {
        move |bin| installed.contains(&bin).then(|| PathBuf::from("/bin/true"))
    }

    #[test]
    fn doctor_says_when_firecracker_runs_unjailed_and_when_the_jail_base_is_nodev() {
        let status = |jailed: bool, nodev: Option<&str>, cgroups: &str| {
            let mut s: banger_api::DaemonStatus = serde_json::from_value(serde_json::json!({
                "pid": 1, "version": "v", "commit": "c", "build_time": "b", "mode": "user",
                "socket": "s", "log_path": "l", "uptime_secs": 0, "started_at": 0,
                "store": {"path": "p", "schema_version": 1, "instance_id": "i", "starts": 1},
            }))
            .unwrap();
            s.firecracker = Some(banger_api::FirecrackerStatus {
                jailed,
                isolation: if jailed {
                    "jailed by the helper's launcher".into()
                } else {
                    "unjailed: no privileged helper".into()
                },
                cgroups: cgroups.into(),
                jail_base: "/data/jail".into(),
                nodev: nodev.map(str::to_owned),
            });
            s
        };
        let c = firecracker_checks(&status(false, None, "cgroup v1 (memory at /m, cpu at /c)"));
        let jail = status_of(&c, "firecracker jail");
        assert_eq!(jail.status, Level::Warn);
        assert!(
            jail.detail.contains("unjailed: no privileged helper"),
            "{}",
            jail.detail
        );
        assert_eq!(status_of(&c, "jail base").status, Level::Ok);
        let c = firecracker_checks(&status(
            true,
            Some("the jail base /data/jail is on a nodev mount"),
            "no per-VM cgroup: none",
        ));
        assert_eq!(status_of(&c, "firecracker jail").status, Level::Ok);
        assert_eq!(status_of(&c, "cgroups").status, Level::Warn);
        let base = status_of(&c, "jail base");
        assert_eq!(base.status, Level::Fail);
        assert!(base.detail.contains("nodev"), "{}", base.detail);
    }

    fn status_of<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn a_missing_binary_of_the_chosen_vmm_fails_and_the_other_vmm_is_not_needed() {
        let find = only(&["qemu-system-x86_64"]);
        let c = vmm_checks(
            &view(VmmKind::Firecracker, false),
            &Config::default(),
            &find,
        );
        assert_eq!(status(&c, "firecracker").status, Level::Fail);
        assert_eq!(status(&c, "jailer").status, Level::Fail);
        assert!(
            status(&c, "firecracker")
                .hint
                .as_deref()
                .unwrap()
                .contains("auto")
        );
        assert_eq!(status(&c, "qemu").status, Level::Ok);

        let c = vmm_checks(&view(VmmKind::Qemu, false), &Config::default(), &find);
        assert_eq!(status(&c, "firecracker").status, Level::Ok);
        assert_eq!(status(&c, "qemu").status, Level::Ok);
        // QEMU's agent channel is bangerd's own proxy: nothing else to install.
        assert!(c.iter().all(|c| !c.name.contains("vhost")), "{c:?}");
        assert_eq!(status(&c, "vmm").status, Level::Ok);
    }

    #[test]
    fn suspend_needs_qemu_9_and_firecracker_always_has_it() {
        let qemu = |v: &str| suspend_check(VmmKind::Qemu, Some(v));
        let c = qemu("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)");
        assert_eq!(
            (c.status, c.detail.as_str()),
            (
                Level::Ok,
                "QEMU 10 saves with mapped-ram: `vm suspend` and `vm snapshot` work"
            )
        );
        let c = qemu("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u12)");
        assert_eq!(c.status, Level::Warn);
        assert!(
            c.detail.contains("`vm snapshot` fail") && c.hint.as_deref().unwrap().contains("9.0")
        );
        assert_eq!(suspend_check(VmmKind::Qemu, None).status, Level::Warn);
        assert_eq!(suspend_check(VmmKind::Firecracker, None).status, Level::Ok);
    }

    /// Doctor's view of the config starts from the daemon's defaults (it uses them when
    /// the config is refused), and reads what `bangerd --check-config` prints.
    #[test]
    fn the_config_view_has_the_daemons_defaults_and_reads_its_output() {
        let daemon = serde_json::to_value(bangerd::config::Config::default()).unwrap();
        let view: Config = serde_json::from_value(daemon).unwrap();
        assert_eq!(view, Config::default());
        let mut set = serde_json::to_value(bangerd::config::Config::default()).unwrap();
        set["default_vmm"] = "qemu".into();
        set["qemu"]["accel"] = "tcg".into();
        set["firecracker"]["jailer"] = "/opt/fc/jailer".into();
        let view: Config = serde_json::from_value(set).unwrap();
        assert_eq!(view.vmm_choice(), banger_api::VmmChoice::Qemu);
        assert_eq!(view.qemu_accel(), Accel::Tcg);
        assert_eq!(view.firecracker.jailer, PathBuf::from("/opt/fc/jailer"));
    }

    #[test]
    fn an_emulated_vmm_is_a_warning_that_says_why() {
        let find = only(&["qemu-system-x86_64"]);
        let c = vmm_checks(&view(VmmKind::Qemu, true), &Config::default(), &find);
        let vmm = status(&c, "vmm");
        assert_eq!(vmm.status, Level::Warn);
        assert!(
            vmm.detail.contains("new VMs get qemu: why"),
            "{}",
            vmm.detail
        );
        assert!(c.iter().all(|c| c.status != Level::Fail));
    }
}
