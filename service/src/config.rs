//! bangerd's configuration: `config.toml` (see [`crate::paths`] for where), then
//! `BANGER_*` environment overrides, validated before any actor starts.
//!
//! Every leaf key of the file can be overridden from the environment: `BANGER_LOG_LEVEL=debug`
//! sets `log_level`; a double underscore descends into a table
//! (`BANGER_VM_DEFAULTS__VCPU=2`). Values are read as TOML when they parse as TOML
//! (numbers, booleans, arrays) and as strings otherwise. An unknown key in the file is an
//! error.
//!
//! The environment is read through an explicit table of keys, [`env_keys`], derived from
//! [`Config`]'s own serde field names (the default config serialised and walked), so it can
//! never drift from the struct: only those variables become config. Every other `BANGER_*`
//! variable is left alone — `BANGER_TIMINGS` belongs to the CLI, `BANGER_SOCKET` to both
//! programs, and a daemon started by the CLI inherits them — except one that looks like a
//! typo of a key (edit distance at most [`TYPO_DISTANCE`] from a key's variable, e.g.
//! `BANGER_LOG_LEVLE`), which is an error naming the nearest key, so a misspelt override
//! never silently does nothing. The variables the programs themselves read
//! ([`NON_CONFIG_VARS`], `BANGER_TEST_*`) are never taken for typos.
//!
//! (A layered-config crate such as `figment` was considered: it would still need this key
//! list to ignore foreign `BANGER_*` variables and has no typo check, so the table is
//! simpler and adds nothing to the build.)

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `BANGER_*` variables that are not config keys (read by the CLI, tests, or the build);
/// never mistaken for a misspelt key.
pub const NON_CONFIG_VARS: &[&str] = &[
    "BANGER_CONFIG",
    "BANGER_SOCKET",
    "BANGER_BANGERD",
    "BANGER_COMMIT",
    "BANGER_BUILD_TIME",
    "BANGER_NO_AUTOSTART",
    "BANGER_TIMINGS",
];

/// Prefix of variables reserved for the test suite.
const TEST_PREFIX: &str = "BANGER_TEST_";

/// A `BANGER_*` variable this close (Levenshtein) to a key's variable is taken for a typo.
pub const TYPO_DISTANCE: usize = 2;

/// One config key that can be set from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvKey {
    /// The key's path in the file, e.g. `["vm_defaults", "vcpu"]`.
    pub path: Vec<String>,
    /// Its variable, e.g. `BANGER_VM_DEFAULTS__VCPU`.
    pub var: String,
}

impl EnvKey {
    /// The key as the file spells it: `vm_defaults.vcpu`.
    pub fn key(&self) -> String {
        self.path.join(".")
    }
}

/// The table of environment keys: every leaf of [`Config`] (a table descends; anything
/// else, arrays included, is a leaf), from its serde field names.
pub fn env_keys() -> Vec<EnvKey> {
    fn walk(v: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<EnvKey>) {
        if let serde_json::Value::Object(map) = v {
            for (k, child) in map {
                path.push(k.clone());
                walk(child, path, out);
                path.pop();
            }
        } else if !path.is_empty() {
            out.push(EnvKey {
                path: path.clone(),
                var: format!("BANGER_{}", path.join("__").to_ascii_uppercase()),
            });
        }
    }
    let value = serde_json::to_value(Config::default()).expect("the default config serialises");
    let mut out = Vec::new();
    walk(&value, &mut Vec::new(), &mut out);
    out
}

/// The daemon's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Tracing filter for `bangerd.log`: a level (`error`, `warn`, `info`, `debug`,
    /// `trace`) or per-target directives (`info,banger_actors=debug`).
    pub log_level: String,
    /// Where the store, images and VM disks live.
    pub data_dir: Option<PathBuf>,
    /// Where `bangerd.log` is written.
    pub log_dir: Option<PathBuf>,
    /// Where downloads and layer blobs are cached.
    pub cache_dir: Option<PathBuf>,
    /// Name of the group whose members may use the daemon besides its owner and root.
    pub socket_group: String,
    /// The image `vm create` uses when none is given.
    pub default_image_name: Option<String>,
    /// The VMM of new VMs: `auto` (the default: Firecracker where it can run jailed on
    /// real KVM, else QEMU with KVM, else QEMU under TCG; resolved when each VM is
    /// created, see `banger_actors::vmm::choose`), `firecracker` or `qemu`.
    pub default_vmm: String,
    /// Seconds `vm stop` waits for the guest to shut down before killing it.
    pub stop_timeout_secs: u64,
    /// Appended to every guest kernel command line.
    pub kernel_cmdline_extra: String,
    /// Seconds a start waits for the guest agent (banger-agent) to answer before it
    /// reports the VM as running without it; 0 does not wait.
    pub agent_timeout_secs: u64,
    /// Where the `.vm` resolver listens (`dig @127.0.0.1 -p 42069 dev.vm`); empty: off.
    pub dns_listen: String,
    /// The user bangerd runs as after it started as root and forked its privileged
    /// helper (a name or a uid). Unset: the user `sudo` was run by (`SUDO_UID`), else
    /// root with every capability dropped. `banger system install` sets it.
    pub owner: Option<String>,
    /// banger's ssh key (private key; `.pub` beside it), made with `ssh-keygen` on first
    /// use when missing. Default: `<data_dir>/ssh/id_ed25519`.
    pub ssh_key_path: Option<PathBuf>,
    /// `[[file_sync]]`: host files or directories copied into each new VM's /root when it
    /// first boots.
    pub file_sync: Vec<FileSync>,
    pub network: NetworkSection,
    pub vm_defaults: VmDefaults,
    pub firecracker: FirecrackerSection,
    pub qemu: QemuSection,
    pub images: ImagesSection,
}

/// `[images]`: pulls.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesSection {
    /// An image catalog file to use instead of the one built into bangerd.
    pub catalog: Option<PathBuf>,
    /// A kernel catalog file to use instead of the one built into bangerd.
    pub kernel_catalog: Option<PathBuf>,
    /// Registries (`host:port`) reached over plain HTTP, e.g. `["127.0.0.1:5000"]`.
    pub insecure_registries: Vec<String>,
    /// Where `banger-init` and `banger-agent` are taken from for OCI images. Default: beside
    /// the bangerd executable when they are there, else `/usr/lib/banger`.
    pub guest_binaries_dir: Option<PathBuf>,
    /// The Debian-family mirror of `image build` and recipe images. Default: the host's own
    /// apt sources when the host is Debian, else `http://deb.debian.org/debian`.
    pub mirror: Option<String>,
}

/// One `[[file_sync]]` entry: `host = "/home/me/.gitconfig"`, `guest = "~/.gitconfig"`,
/// optional `mode = 0o600` (of the copied file). Validated at load: `host` absolute,
/// `guest` under `~/` or `/root/`, no `..` in either; a missing host path is only a
/// warning (it is skipped when VMs are created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSync {
    pub host: PathBuf,
    pub guest: String,
    pub mode: Option<u32>,
}

impl FileSync {
    /// The guest path relative to /root (`~/.gitconfig` → `.gitconfig`).
    pub fn guest_relative(&self) -> Option<&str> {
        let rel = self
            .guest
            .strip_prefix("~/")
            .or_else(|| self.guest.strip_prefix("/root/"))?
            .trim_start_matches('/');
        (!rel.is_empty()).then_some(rel)
    }

    fn check(&self, i: usize) -> Result<(), ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            key: "file_sync",
            message: format!("entry {}: {message}", i + 1),
            from: None,
        };
        let dotdot = |p: &str| p.split('/').any(|c| c == "..");
        if !self.host.is_absolute() {
            return Err(bad(format!(
                "host path {} is not absolute",
                self.host.display()
            )));
        }
        if dotdot(&self.host.to_string_lossy()) || dotdot(&self.guest) {
            return Err(bad("paths must not contain `..`".into()));
        }
        if self.guest_relative().is_none() {
            return Err(bad(format!(
                "guest path {:?} must be under ~/ or /root/ (e.g. \"~/.gitconfig\")",
                self.guest
            )));
        }
        if let Some(m) = self.mode
            && m > 0o7777
        {
            return Err(bad(format!("mode {m:o} is not a file mode (e.g. 0o600)")));
        }
        Ok(())
    }
}

/// `[vm_defaults]`: the size of new VMs (each falls back to a host-derived value, then a
/// built-in one; `banger vm create --help` shows what applies and why).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefaults {
    pub vcpu: Option<u32>,
    /// e.g. `"2G"`, `"512M"`.
    pub memory: Option<String>,
    /// Work disk size, e.g. `"8G"`.
    pub disk: Option<String>,
    /// Whether new VMs get a network (a tap on the bridge, an address, `<vm>.vm`);
    /// default true. `vm create --no-network` / `--network` override it per VM.
    pub network: Option<bool>,
    /// The most clones one `vm fork --count` makes (default 16): each is a whole VM, its
    /// memory and disks copied.
    pub max_fork_count: Option<u32>,
    /// After a create boots an image cold, make its warm snapshot in the background, so
    /// the next `vm run` with the same image, kernel, size, VMM and network restores
    /// instead of booting (default false: it costs a boot and the guest's memory on disk;
    /// `banger image warm` makes one by hand).
    pub auto_warm: Option<bool>,
}

/// `[network]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// The VM subnet; the bridge takes its first address, VMs the others.
    pub subnet: String,
    /// The bridge's name.
    pub bridge: String,
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            subnet: "172.30.0.0/24".into(),
            bridge: "banger0".into(),
        }
    }
}

/// `[firecracker]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirecrackerSection {
    pub binary: PathBuf,
    pub jailer: PathBuf,
    /// The uids jailed VMs run as, `FIRST-LAST`: each VM gets one of its own (the
    /// jailer's `--uid` and `--gid`). Never 0, never the owner's.
    pub vm_uids: String,
    /// Replaced by `vm_uids` (a single uid shared by every VM); refused with a pointer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// `[firecracker] vm_uids` by default: far above the uids of users, systemd's dynamic and
/// container ranges (`UIDS-GIDS.md`: containers use 524288–1879048191).
pub const DEFAULT_VM_UIDS: &str = "2000000000-2000065535";

impl FirecrackerSection {
    /// The parsed `vm_uids` (checked by [`Config::validate`]).
    pub fn vm_uids(&self) -> banger_policy::UidRange {
        self.vm_uids
            .parse()
            .expect("validated when the config was loaded")
    }
}

impl Default for FirecrackerSection {
    fn default() -> Self {
        FirecrackerSection {
            binary: "firecracker".into(),
            jailer: "jailer".into(),
            vm_uids: DEFAULT_VM_UIDS.into(),
            uid: None,
            gid: None,
        }
    }
}

/// `[qemu]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuSection {
    pub binary: PathBuf,
    /// Ignored: QEMU's agent channel no longer needs vhost-device-vsock (a virtio-serial
    /// port behind bangerd's own proxy). Still accepted, so configs that name it load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_vsock: Option<PathBuf>,
    /// `auto` (KVM when usable, else TCG), `kvm` or `tcg`.
    pub accel: String,
}

impl Default for QemuSection {
    fn default() -> Self {
        QemuSection {
            binary: "qemu-system-x86_64".into(),
            vhost_vsock: None,
            accel: "auto".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_level: "info".into(),
            data_dir: None,
            log_dir: None,
            cache_dir: None,
            socket_group: "banger".into(),
            default_image_name: None,
            default_vmm: "auto".into(),
            stop_timeout_secs: 30,
            kernel_cmdline_extra: String::new(),
            agent_timeout_secs: 120,
            dns_listen: "127.0.0.1:42069".into(),
            owner: None,
            ssh_key_path: None,
            file_sync: Vec::new(),
            network: NetworkSection::default(),
            vm_defaults: VmDefaults::default(),
            firecracker: FirecrackerSection::default(),
            qemu: QemuSection::default(),
            images: ImagesSection::default(),
        }
    }
}

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or a key in it is unknown or has a value of the wrong type.
    #[error("invalid config file {}: {message}", at(path, *line, key.as_deref()))]
    Parse {
        path: PathBuf,
        /// Where in the file (1-based), when the parser says.
        line: Option<usize>,
        /// The key, dotted (`vm_defaults.vcpu`), when the error is about one.
        key: Option<String>,
        message: String,
    },
    #[error("invalid setting from the environment: {message}")]
    Env { message: String },
    #[error(
        "{var} is not a config variable: did you mean {nearest} (the key `{key}`)? Unset it, or fix its name"
    )]
    EnvTypo {
        var: String,
        nearest: String,
        key: String,
    },
    /// A value of the right type that is still wrong; `from` says where it was set (the
    /// file and line, or the variable), once [`Config::load`] knows.
    #[error("invalid `{key}`{}: {message}", from.as_ref().map(|f| format!(" ({f})")).unwrap_or_default())]
    Invalid {
        key: &'static str,
        message: String,
        from: Option<String>,
    },
}

/// `/x/config.toml, line 3, key `vm_defaults.vcpu``.
fn at(path: &Path, line: Option<usize>, key: Option<&str>) -> String {
    let mut out = path.display().to_string();
    if let Some(line) = line {
        out.push_str(&format!(", line {line}"));
    }
    if let Some(key) = key {
        out.push_str(&format!(", key `{key}`"));
    }
    out
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The dotted key whose key or value holds `span` in the document `text` (the deepest
/// one), e.g. `vm_defaults.vcpu` for the `"x"` of `vcpu = "x"` under `[vm_defaults]`.
/// Arrays of tables add no index: the line tells the entries apart.
fn key_at(text: &str, span: &std::ops::Range<usize>) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    // The spans of a table made by a `[header]` cover the header alone, so every table is
    // searched; a leaf matches by its own key's or value's span, a table by its own when
    // none of its keys does (a missing field is reported on the table).
    fn walk(table: &DeTable<'_>, span: &std::ops::Range<usize>, path: &mut Vec<String>) -> bool {
        let holds = |s: std::ops::Range<usize>| s.start <= span.start && span.end <= s.end;
        for (k, v) in table.iter() {
            path.push(k.get_ref().to_string());
            let inner = match v.get_ref() {
                DeValue::Table(t) => walk(t, span, path),
                DeValue::Array(items) => items.iter().any(|item| match item.get_ref() {
                    DeValue::Table(t) => walk(t, span, path),
                    _ => false,
                }),
                _ => false,
            };
            if inner || holds(k.span()) || holds(v.span()) {
                return true;
            }
            path.pop();
        }
        false
    }
    let doc = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    walk(doc.get_ref(), span, &mut path).then(|| path.join("."))
}

/// The line where the dotted `key` is set in the document `text`, if it is.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part)?;
        if parts.peek().is_none() {
            return Some(line_of(text, k.span().start));
        }
        table = match v.get_ref() {
            DeValue::Table(t) => t,
            _ => return None,
        };
    }
    None
}

/// A parse error of the file `text` at `path`, with its line and key.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let span = e.span();
    ConfigError::Parse {
        path: path.to_owned(),
        line: span.as_ref().map(|s| line_of(text, s.start)),
        key: span.as_ref().and_then(|s| key_at(text, s)),
        message: e.message().trim_end().to_owned(),
    }
}

impl Config {
    /// Load `path` (a missing file means defaults unless `required`), apply the `BANGER_*`
    /// overrides from `vars`, and validate.
    pub fn load(
        path: Option<&Path>,
        required: bool,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => None,
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    });
                }
            },
            None => None,
        };
        let mut table = toml::Table::new();
        if let (Some(path), Some(text)) = (path, &text) {
            table = toml::Table::from_str(text).map_err(|e| parse_error(path, text, &e))?;
            // The file alone first, from its text (so errors carry its spans): an error
            // names the file, the line and the key, not the environment.
            toml::from_str::<Config>(text).map_err(|e| parse_error(path, text, &e))?;
        }
        let keys = env_keys();
        let mut overridden = Vec::new();
        for (name, value) in vars {
            if !name.starts_with("BANGER_") {
                continue;
            }
            let Some(key) = keys.iter().find(|k| k.var == name) else {
                check_not_a_typo(&name, &keys)?;
                continue;
            };
            let parsed = toml::Table::from_str(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value.clone()));
            insert(&mut table, &key.path, parsed);
            overridden.push(name);
        }
        let config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Env {
                message: format!("{} (set by {})", e.message(), overridden.join(", ")),
            })?;
        config.validate().map_err(|e| match e {
            // Say where the wrong value was set: by a variable, or on a line of the file.
            ConfigError::Invalid { key, message, .. } => {
                let var = keys
                    .iter()
                    .filter(|k| k.key() == key || k.key().starts_with(&format!("{key}.")))
                    .find(|k| overridden.contains(&k.var));
                let from = match (var, path, &text) {
                    (Some(k), _, _) => Some(format!("set by {}", k.var)),
                    (None, Some(path), Some(text)) => Some(at(path, line_of_key(text, key), None)),
                    _ => None,
                };
                ConfigError::Invalid { key, message, from }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// Check values beyond their types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_log_level(&self.log_level)?;
        for (key, dir) in [
            ("data_dir", &self.data_dir),
            ("log_dir", &self.log_dir),
            ("cache_dir", &self.cache_dir),
            ("ssh_key_path", &self.ssh_key_path),
        ] {
            if let Some(dir) = dir
                && !dir.is_absolute()
            {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("{} is not an absolute path", dir.display()),
                    from: None,
                });
            }
        }
        self.default_vmm
            .parse::<banger_api::VmmChoice>()
            .map_err(|message| ConfigError::Invalid {
                key: "default_vmm",
                message,
                from: None,
            })?;
        if !matches!(self.qemu.accel.as_str(), "auto" | "kvm" | "tcg") {
            return Err(ConfigError::Invalid {
                key: "qemu.accel",
                message: format!("{:?}: use auto, kvm or tcg", self.qemu.accel),
                from: None,
            });
        }
        for (key, v) in [
            ("vm_defaults.memory", &self.vm_defaults.memory),
            ("vm_defaults.disk", &self.vm_defaults.disk),
        ] {
            if let Some(v) = v {
                banger_actors::vm::spec::parse_size(v).map_err(|message| ConfigError::Invalid {
                    key,
                    message,
                    from: None,
                })?;
            }
        }
        let d = self.vm_spec_defaults();
        let probe = banger_actors::vm::spec::defaults(
            &d,
            &banger_actors::vm::spec::Host {
                cpus: None,
                memory_bytes: None,
            },
            banger_api::VmmKind::Qemu,
        );
        banger_actors::vm::spec::validate(&probe.spec).map_err(|message| ConfigError::Invalid {
            key: "vm_defaults",
            message,
            from: None,
        })?;
        if !self.dns_listen.is_empty() {
            self.dns_listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| ConfigError::Invalid {
                    key: "dns_listen",
                    message: format!(
                        "{:?}: {e} (use host:port, or \"\" to turn it off)",
                        self.dns_listen
                    ),
                    from: None,
                })?;
        }
        self.network
            .subnet
            .parse::<banger_actors::net::lease::Subnet>()
            .map_err(|message| ConfigError::Invalid {
                key: "network.subnet",
                message,
                from: None,
            })?;
        let bridge = &self.network.bridge;
        if bridge.is_empty()
            || bridge.len() > 15
            || !bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || bridge.starts_with(banger_policy::TAP_PREFIX)
        {
            return Err(ConfigError::Invalid {
                key: "network.bridge",
                message: format!(
                    "{bridge:?} is not a usable interface name (1-15 of [A-Za-z0-9_-], not starting with {})",
                    banger_policy::TAP_PREFIX
                ),
                from: None,
            });
        }
        if self.stop_timeout_secs == 0 {
            return Err(ConfigError::Invalid {
                key: "stop_timeout_secs",
                message: "must be at least 1".into(),
                from: None,
            });
        }
        for (key, p) in [
            ("images.catalog", &self.images.catalog),
            ("images.kernel_catalog", &self.images.kernel_catalog),
            ("images.guest_binaries_dir", &self.images.guest_binaries_dir),
        ] {
            if let Some(p) = p
                && !p.is_absolute()
            {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("{} is not an absolute path", p.display()),
                    from: None,
                });
            }
        }
        self.catalogs()?;
        for r in &self.images.insecure_registries {
            if r.is_empty() || r.contains(['/', ' ']) {
                return Err(ConfigError::Invalid {
                    key: "images.insecure_registries",
                    message: format!("{r:?}: use host or host:port"),
                    from: None,
                });
            }
        }
        for (i, f) in self.file_sync.iter().enumerate() {
            f.check(i)?;
        }
        if self.socket_group.is_empty() {
            return Err(ConfigError::Invalid {
                key: "socket_group",
                message: "must not be empty".into(),
                from: None,
            });
        }
        for (key, set) in [
            ("firecracker.uid", self.firecracker.uid.is_some()),
            ("firecracker.gid", self.firecracker.gid.is_some()),
        ] {
            if set {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!(
                        "one uid for every VM was replaced by a uid of its own for each: drop it, or set `vm_uids = \"FIRST-LAST\"` under [firecracker] (default {DEFAULT_VM_UIDS})"
                    ),
                    from: None,
                });
            }
        }
        self.firecracker
            .vm_uids
            .parse::<banger_policy::UidRange>()
            .map_err(|message| ConfigError::Invalid {
                key: "firecracker.vm_uids",
                message,
                from: None,
            })?;
        Ok(())
    }
}

/// `level` or comma-separated `target=level` directives, each level one of tracing's. (A
/// bare word is a *target* to `Targets`, so `loud` would pass it and log everything.)
impl Config {
    /// Problems that do not stop the daemon (logged at start-up): `[[file_sync]]` host
    /// paths that do not exist.
    pub fn warnings(&self) -> Vec<String> {
        self.file_sync
            .iter()
            .filter(|f| !f.host.exists())
            .map(|f| {
                format!(
                    "file_sync: {} does not exist; it is skipped when VMs are created",
                    f.host.display()
                )
            })
            .collect()
    }
}

fn validate_log_level(value: &str) -> Result<(), ConfigError> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    let bad = |message: String| ConfigError::Invalid {
        key: "log_level",
        message,
        from: None,
    };
    for directive in value.split(',') {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, l)| l)
            .trim();
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad(format!(
                "{directive:?} is not a level (use off, error, warn, info, debug or trace, or target=level)"
            )));
        }
    }
    tracing_subscriber::filter::Targets::from_str(value).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

impl Config {
    /// The image and kernel catalogs: the configured files, else the embedded ones.
    pub fn catalogs(&self) -> Result<banger_actors::pull::catalog::Catalogs, ConfigError> {
        banger_actors::pull::catalog::Catalogs::load(
            self.images.catalog.as_deref(),
            self.images.kernel_catalog.as_deref(),
        )
        .map_err(|e| ConfigError::Invalid {
            key: "images.catalog",
            message: banger_error::error_chain(&e),
            from: None,
        })
    }

    /// `[qemu] accel` as the driver takes it (validated: `auto`, `kvm` or `tcg`).
    pub fn qemu_accel(&self) -> banger_actors::vmm::qemu::Accel {
        use banger_actors::vmm::qemu::Accel;
        match self.qemu.accel.as_str() {
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            _ => Accel::Auto,
        }
    }

    /// `default_vmm` (validated when loaded).
    pub fn vmm_choice(&self) -> banger_api::VmmChoice {
        self.default_vmm.parse().unwrap_or_default()
    }

    /// `[vm_defaults]` as the actors take it (sizes already validated).
    pub fn vm_spec_defaults(&self) -> banger_actors::vm::spec::ConfigDefaults {
        let size = |v: &Option<String>| {
            v.as_deref()
                .and_then(|s| banger_actors::vm::spec::parse_size(s).ok())
        };
        banger_actors::vm::spec::ConfigDefaults {
            vcpu: self.vm_defaults.vcpu,
            memory_mib: size(&self.vm_defaults.memory).map(|b| (b >> 20) as u32),
            disk_bytes: size(&self.vm_defaults.disk),
        }
    }
}

/// A `BANGER_*` variable that is no key: an error when it is within [`TYPO_DISTANCE`] of
/// a key's variable (and not one the programs read themselves), else ignored.
fn check_not_a_typo(name: &str, keys: &[EnvKey]) -> Result<(), ConfigError> {
    if NON_CONFIG_VARS.contains(&name) || name.starts_with(TEST_PREFIX) {
        return Ok(());
    }
    let nearest = keys
        .iter()
        .map(|k| (strsim::levenshtein(name, &k.var), k))
        .min_by_key(|(d, _)| *d);
    match nearest {
        Some((d, k)) if d <= TYPO_DISTANCE => Err(ConfigError::EnvTypo {
            var: name.to_owned(),
            nearest: k.var.clone(),
            key: k.key(),
        }),
        _ => Ok(()),
    }
}

fn insert(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = entry {
                insert(t, rest, value);
            }
        }
        [] => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn vm_sections() {
        let (_d, path) = write(
            "default_vmm = \"qemu\"\n[vm_defaults]\nvcpu = 2\nmemory = \"1G\"\ndisk = \"4G\"\n[qemu]\naccel = \"tcg\"\n",
        );
        let c = Config::load(Some(&path), true, vec![]).unwrap();
        let d = c.vm_spec_defaults();
        assert_eq!(
            (d.vcpu, d.memory_mib, d.disk_bytes),
            (Some(2), Some(1024), Some(4 << 30))
        );
        let c = Config::load(
            None,
            false,
            vars(&[
                ("BANGER_VM_DEFAULTS__VCPU", "3"),
                ("BANGER_QEMU__ACCEL", "kvm"),
            ]),
        )
        .unwrap();
        assert_eq!(c.vm_defaults.vcpu, Some(3));
        assert_eq!(c.qemu.accel, "kvm");
        for bad in [
            "default_vmm = \"xen\"\n",
            "[qemu]\naccel = \"fast\"\n",
            "[vm_defaults]\nmemory = \"lots\"\n",
            "[vm_defaults]\nvcpu = 0\n",
            "[vm_defaults]\ncpus = 2\n",
        ] {
            let (_d, path) = write(bad);
            assert!(Config::load(Some(&path), true, vec![]).is_err(), "{bad}");
        }
    }

    #[test]
    fn images_section() {
        let dir = tempfile::tempdir().unwrap();
        let cat = dir.path().join("images.json");
        std::fs::write(&cat, r#"{"version":1,"images":[]}"#).unwrap();
        let (_d, path) = write(&format!(
            "[images]\ncatalog = \"{}\"\ninsecure_registries = [\"127.0.0.1:5000\"]\n",
            cat.display()
        ));
        let c = Config::load(Some(&path), true, vec![]).unwrap();
        assert!(c.catalogs().unwrap().images.is_empty());
        assert_eq!(c.images.insecure_registries, ["127.0.0.1:5000"]);
        std::fs::write(&cat, r#"{"version":1,"images":[{"name":"x"}]}"#).unwrap();
        let e = Config::load(Some(&path), true, vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("images.catalog"), "{e}");
        let (_d, path) = write("[images]\ncatalog = \"rel.json\"\n");
        assert!(Config::load(Some(&path), true, vec![]).is_err());
    }

    #[test]
    fn file_sync_entries_are_validated_at_load() {
        let (_d, path) = write(
            "[[file_sync]]\nhost = \"/etc/hostname\"\nguest = \"~/.hostname\"\nmode = 0o600\n[[file_sync]]\nhost = \"/nonexistent/x\"\nguest = \"/root/x/y\"\n",
        );
        let c = Config::load(Some(&path), true, vec![]).unwrap();
        assert_eq!(c.file_sync.len(), 2);
        assert_eq!(c.file_sync[0].guest_relative(), Some(".hostname"));
        assert_eq!(c.file_sync[0].mode, Some(0o600));
        assert_eq!(c.file_sync[1].guest_relative(), Some("x/y"));
        // A missing host path is a warning, not an error.
        let w = c.warnings();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("/nonexistent/x"), "{w:?}");
        for (entry, says) in [
            ("host = \"rel/x\"\nguest = \"~/x\"", "not absolute"),
            ("host = \"/a/../b\"\nguest = \"~/x\"", "`..`"),
            ("host = \"/a\"\nguest = \"~/../etc/passwd\"", "`..`"),
            ("host = \"/a\"\nguest = \"/etc/x\"", "under ~/ or /root/"),
            ("host = \"/a\"\nguest = \"/root\"", "under ~/ or /root/"),
            (
                "host = \"/a\"\nguest = \"~/x\"\nmode = 0o17777",
                "not a file mode",
            ),
            ("host = \"/a\"\nguest = \"~/x\"\ncolor = 1", "unknown field"),
        ] {
            let (_d, path) = write(&format!("[[file_sync]]\n{entry}\n"));
            let e = Config::load(Some(&path), true, vec![]).unwrap_err();
            assert!(e.to_string().contains(says), "{entry}: {e}");
        }
    }

    #[test]
    fn missing_file_gives_defaults() {
        let c = Config::load(Some(Path::new("/nonexistent/banger.toml")), false, vec![]).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn missing_required_file_is_an_error() {
        let e =
            Config::load(Some(Path::new("/nonexistent/banger.toml")), true, vec![]).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }

    #[test]
    fn file_values_and_env_overrides() {
        let (_d, path) = write("log_level = \"warn\"\ndata_dir = \"/srv/b\"\n");
        let c = Config::load(Some(&path), true, vars(&[])).unwrap();
        assert_eq!(c.log_level, "warn");
        assert_eq!(c.data_dir, Some(PathBuf::from("/srv/b")));
        let c = Config::load(
            Some(&path),
            true,
            vars(&[
                ("BANGER_LOG_LEVEL", "debug"),
                ("BANGER_SOCKET", "/x"),
                ("BANGER_OWNER", "alice"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.log_level, "debug");
        // `banger system install` sets the owner this way (bangerd.service.d/owner.conf).
        assert_eq!(c.owner.as_deref(), Some("alice"));
    }

    #[test]
    fn unknown_key_in_file_names_the_file() {
        let (_d, path) = write("log_lvl = \"warn\"\n");
        let e = Config::load(Some(&path), true, vec![]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("config.toml") && msg.contains("log_lvl"),
            "{msg}"
        );
    }

    /// A wrong type once read `invalid type: integer 5, expected a string`, with neither
    /// key nor line: every file error now names the file, the line and the key.
    #[test]
    fn errors_in_the_file_name_the_key_and_the_line() {
        for (text, says) in [
            (
                "log_level = 5\n",
                "config.toml, line 1, key `log_level`: invalid type: integer `5`, expected a string",
            ),
            (
                "# sizes\n[vm_defaults]\nvcpu = \"x\"\n",
                "config.toml, line 3, key `vm_defaults.vcpu`: invalid type: string \"x\", expected u32",
            ),
            (
                "vm_defaults.vcpu = \"x\"\n",
                "line 1, key `vm_defaults.vcpu`: invalid type",
            ),
            (
                "[vm_defaults]\ncpus = 2\n",
                "line 2, key `vm_defaults.cpus`: unknown field `cpus`",
            ),
            (
                "[[file_sync]]\nhost = \"/a\"\nguest = \"~/a\"\n[[file_sync]]\nhost = \"/b\"\nguest = \"~/b\"\nmode = \"x\"\n",
                "line 7, key `file_sync.mode`: invalid type",
            ),
            ("\nthis is not toml\n", "config.toml, line 2: "),
            // Right type, wrong value: the key, then where it was set.
            ("\n\ndefault_vmm = \"xen\"\n", "invalid `default_vmm` ("),
            (
                "\n\ndefault_vmm = \"xen\"\n",
                "config.toml, line 3): unknown vmm",
            ),
        ] {
            let (_d, path) = write(text);
            let e = Config::load(Some(&path), true, vec![])
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{text:?}: {e}");
            assert!(e.contains(&path.display().to_string()), "{text:?}: {e}");
        }
        // Set by a variable: the variable is named instead.
        let e = Config::load(None, false, vars(&[("BANGER_VM_DEFAULTS__MEMORY", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid `vm_defaults.memory` (set by BANGER_VM_DEFAULTS__MEMORY): "),
            "{e}"
        );
    }

    #[test]
    fn unknown_env_key_names_the_variable() {
        let e = Config::load(None, false, vars(&[("BANGER_LOG_LVL", "debug")])).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("BANGER_LOG_LVL"), "{msg}");
    }

    #[test]
    fn only_real_keys_are_read_from_the_environment() {
        // The CLI's own variables and anything else BANGER_* that is no key: left alone
        // (BANGER_TIMINGS=1 once stopped an auto-started daemon: "unknown field `timings`").
        let c = Config::load(
            None,
            false,
            vars(&[
                ("BANGER_TIMINGS", "1"),
                ("BANGER_SOCKET", "/x.sock"),
                ("BANGER_NO_AUTOSTART", "1"),
                ("BANGER_TEST_UPDATE_KEY", "k"),
                ("BANGER_SOMETHING_ELSE_ENTIRELY", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c, Config::default());
        // A real key still overrides, nested ones and arrays included.
        let c = Config::load(
            None,
            false,
            vars(&[
                ("BANGER_TIMINGS", "1"),
                ("BANGER_DEFAULT_VMM", "qemu"),
                ("BANGER_IMAGES__INSECURE_REGISTRIES", "[\"127.0.0.1:5000\"]"),
                ("BANGER_VM_DEFAULTS__NETWORK", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(c.default_vmm, "qemu");
        assert_eq!(c.images.insecure_registries, ["127.0.0.1:5000"]);
        assert_eq!(c.vm_defaults.network, Some(false));
    }

    #[test]
    fn a_misspelt_variable_names_the_nearest_key() {
        for (typo, nearest, key) in [
            ("BANGER_LOG_LEVLE", "BANGER_LOG_LEVEL", "log_level"),
            (
                "BANGER_VM_DEFAULTS_VCPU",
                "BANGER_VM_DEFAULTS__VCPU",
                "vm_defaults.vcpu",
            ),
            ("BANGER_QEMU__ACEL", "BANGER_QEMU__ACCEL", "qemu.accel"),
        ] {
            let e = Config::load(None, false, vars(&[(typo, "x")])).unwrap_err();
            match &e {
                ConfigError::EnvTypo {
                    var,
                    nearest: n,
                    key: k,
                } => {
                    assert_eq!((var.as_str(), n.as_str(), k.as_str()), (typo, nearest, key));
                }
                other => panic!("{typo}: {other:?}"),
            }
            let msg = e.to_string();
            assert!(msg.contains(typo) && msg.contains(nearest), "{msg}");
        }
    }

    /// One uid for every VM is refused with what replaced it; a range with uid 0 too.
    #[test]
    fn vm_uids_replace_the_shared_firecracker_uid() {
        let parse = |text: &str| {
            let c: Config = toml::from_str(text).unwrap();
            c.validate().map(|()| c)
        };
        let c = parse("").unwrap();
        assert_eq!(c.firecracker.vm_uids().to_string(), DEFAULT_VM_UIDS);
        let e = parse("[firecracker]\nuid = 1000\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("firecracker.uid") && e.contains("vm_uids"),
            "{e}"
        );
        let e = parse("[firecracker]\nvm_uids = \"0-10\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("uid 0"), "{e}");
        let c = parse("[firecracker]\nvm_uids = \"300000-300009\"\n").unwrap();
        assert_eq!(c.firecracker.vm_uids().count, 10);
    }

    #[test]
    fn the_env_table_is_every_leaf_of_the_config() {
        let keys = env_keys();
        let vars: Vec<&str> = keys.iter().map(|k| k.var.as_str()).collect();
        for v in [
            "BANGER_LOG_LEVEL",
            "BANGER_DEFAULT_VMM",
            "BANGER_OWNER",
            "BANGER_SSH_KEY_PATH",
            "BANGER_NETWORK__BRIDGE",
            "BANGER_VM_DEFAULTS__MEMORY",
            "BANGER_FIRECRACKER__VM_UIDS",
            "BANGER_QEMU__ACCEL",
            "BANGER_IMAGES__GUEST_BINARIES_DIR",
        ] {
            assert!(vars.contains(&v), "{v} missing from {vars:?}");
        }
        assert!(!vars.contains(&"BANGER_NETWORK"), "tables are not leaves");
        // Every key is one the file accepts at that path (a string value parses for each).
        for k in &keys {
            let mut t = toml::Table::new();
            insert(&mut t, &k.path, toml::Value::String("x".into()));
            let e = Config::deserialize(toml::Value::Table(t)).err();
            let msg = e.map(|e| e.message().to_owned()).unwrap_or_default();
            assert!(!msg.contains("unknown field"), "{}: {msg}", k.var);
        }
        // What the programs read is never a key.
        for v in NON_CONFIG_VARS {
            assert!(!vars.contains(v), "{v}");
        }
    }

    /// The sample in the guide's Configuration section (docs/guide.md) must load as it is.
    #[test]
    fn the_guides_sample_config_is_accepted() {
        let guide = include_str!("../../docs/guide.md");
        let section = &guide[guide
            .find("### Configuration")
            .expect("docs/guide.md has a Configuration section")..];
        let start = section.find("```toml\n").expect("with a toml block") + "```toml\n".len();
        let len = section[start..].find("```").expect("that ends");
        let sample = &section[start..start + len];
        let (_d, path) = write(sample);
        let c = Config::load(Some(&path), true, vec![])
            .unwrap_or_else(|e| panic!("docs/guide.md's sample config is refused: {e}"));
        assert_eq!(c.default_vmm, "auto");
        assert!(c.ssh_key_path.is_some() && !c.images.insecure_registries.is_empty());
    }

    #[test]
    fn the_default_vmm_is_auto() {
        assert_eq!(Config::default().default_vmm, "auto");
        for ok in ["auto", "firecracker", "qemu"] {
            let (_d, path) = write(&format!("default_vmm = \"{ok}\"\n"));
            Config::load(Some(&path), true, vec![]).unwrap();
        }
        let (_d, path) = write("default_vmm = \"xen\"\n");
        let e = Config::load(Some(&path), true, vec![]).unwrap_err();
        assert!(
            e.to_string().contains("use auto, firecracker or qemu"),
            "{e}"
        );
    }

    #[test]
    fn invalid_values_are_refused_before_start() {
        let e = Config::load(None, false, vars(&[("BANGER_LOG_LEVEL", "loud")])).unwrap_err();
        assert!(e.to_string().contains("log_level"), "{e}");
        Config::load(
            None,
            false,
            vars(&[("BANGER_LOG_LEVEL", "info,banger_actors=debug")]),
        )
        .unwrap();
        let e = Config::load(None, false, vars(&[("BANGER_DATA_DIR", "rel/dir")])).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        let (_d, path) = write("log_level = 3\n");
        assert!(Config::load(Some(&path), true, vec![]).is_err());
        let (_d, path) = write("this is not toml");
        assert!(matches!(
            Config::load(Some(&path), true, vec![]),
            Err(ConfigError::Parse { .. })
        ));
    }
}
