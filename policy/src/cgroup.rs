//! The host's cgroup layout, found the way Firecracker's jailer finds it, and the per-VM
//! cgroup banger asks the jailer for.
//!
//! The jailer (`src/jailer/src/cgroup.rs`, v1.13.1) reads `/proc/mounts`: with
//! `--cgroup-version 2` the first `cgroup2` line is *the* hierarchy, and a `--cgroup` file
//! is refused unless its controller is listed in that mount's `cgroup.controllers`; with
//! `--cgroup-version 1` each `--cgroup` file's controller (the part before the first `.`)
//! is looked up among the `cgroup` mounts by mount option. No matching line at all fails
//! the jailer with `CgroupHierarchyMissing` before Firecracker runs.
//!
//! So banger picks the version that can hold its limits ([`detect`]): v2 when the first
//! `cgroup2` mount offers `memory` and `cpu` (a unified host), else v1 when `memory` and
//! `cpu` are v1 mounts (a hybrid host: systemd's `/sys/fs/cgroup/unified` has no
//! controllers), else none, and then it passes no cgroup argument at all, so the jailer
//! touches no hierarchy (inside `ip netns exec`, which mounts a fresh sysfs, there is none).
//!
//! Each VM gets `<hierarchy>/banger/<vm id>` ([`PARENT`] as `--parent-cgroup`, so VMs do not
//! land in the jailer's default `firecracker` parent), with limits from its spec
//! ([`Limits`]). The jailer makes the directory and leaves it when Firecracker exits; the
//! launcher removes it with the jail ([`vm_dirs`]).

use std::path::{Path, PathBuf};

/// Where the mount table is read.
pub const PROC_MOUNTS: &str = "/proc/mounts";
/// The parent cgroup of every VM's (`--parent-cgroup`).
pub const PARENT: &str = "banger";
/// The cgroup v2 and v1 CPU period banger uses, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Memory a VM may use beyond its guest RAM: Firecracker's own (under 5 MiB by its
/// specification), its page cache of the VM's disks, slack.
pub const MEMORY_OVERHEAD_MIB: u64 = 64;

/// A cgroup hierarchy that can hold banger's limits, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// A unified hierarchy offering `memory` and `cpu`.
    V2 { root: PathBuf },
    /// Hybrid or legacy: the v1 hierarchies of `memory` and `cpu`.
    V1 { memory: PathBuf, cpu: PathBuf },
    /// No hierarchy that can: VMs get no cgroup of their own.
    None { why: String },
}

/// What a VM's cgroup is limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub vcpu: u32,
    pub memory_mib: u32,
}

impl Limits {
    /// `memory.max` / `memory.limit_in_bytes`: guest RAM plus [`MEMORY_OVERHEAD_MIB`].
    pub fn memory_bytes(&self) -> u64 {
        (u64::from(self.memory_mib) + MEMORY_OVERHEAD_MIB) << 20
    }

    /// The CPU quota per [`CPU_PERIOD_US`]: one CPU per vCPU, plus a quarter of one for
    /// Firecracker's own threads (device emulation, API), so a guest busy on every vCPU
    /// does not starve its own I/O.
    pub fn cpu_quota_us(&self) -> u64 {
        u64::from(self.vcpu) * CPU_PERIOD_US + CPU_PERIOD_US / 4
    }
}

/// One line of the mount table that is a cgroup mount.
#[derive(Debug)]
struct Mount<'a> {
    dir: &'a str,
    v2: bool,
    options: &'a str,
}

/// The cgroup mounts of a `/proc/mounts` text, in order: lines whose file-system type is
/// `cgroup` or `cgroup2` (the jailer's pattern: `<src> <dir> cgroup[2] <options> 0 0`).
fn mounts(text: &str) -> Vec<Mount<'_>> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, dir, fstype, options, "0", "0"] = f[..] else {
                return None;
            };
            match fstype {
                "cgroup" => Some(Mount {
                    dir,
                    v2: false,
                    options,
                }),
                "cgroup2" => Some(Mount {
                    dir,
                    v2: true,
                    options,
                }),
                _ => None,
            }
        })
        .collect()
}

/// The layout of a host whose mount table is `proc_mounts`; `controllers(dir)` reads
/// `<dir>/cgroup.controllers` of a v2 mount.
pub fn detect(proc_mounts: &str, controllers: &dyn Fn(&Path) -> Option<String>) -> Layout {
    let all = mounts(proc_mounts);
    let mut why = Vec::new();
    // As the jailer: the first cgroup2 line is the hierarchy, whatever follows.
    match all.iter().find(|m| m.v2) {
        Some(v2) => {
            let offered = controllers(Path::new(v2.dir)).unwrap_or_default();
            let missing: Vec<&str> = ["memory", "cpu"]
                .into_iter()
                .filter(|c| !offered.split_whitespace().any(|o| o == *c))
                .collect();
            if missing.is_empty() {
                return Layout::V2 {
                    root: PathBuf::from(v2.dir),
                };
            }
            why.push(format!(
                "the cgroup2 hierarchy at {} offers no {} controller",
                v2.dir,
                missing.join(" or ")
            ));
        }
        None => why.push("no cgroup2 hierarchy is mounted".to_owned()),
    }
    let v1 = |controller: &str| {
        all.iter()
            .find(|m| !m.v2 && m.options.split(',').any(|o| o == controller))
            .map(|m| PathBuf::from(m.dir))
    };
    match (v1("memory"), v1("cpu")) {
        (Some(memory), Some(cpu)) => return Layout::V1 { memory, cpu },
        (None, None) if !all.iter().any(|m| !m.v2) => {
            why.push("no cgroup v1 hierarchy either".to_owned());
        }
        (memory, _) => why.push(format!(
            "cgroup v1 has no {} hierarchy",
            if memory.is_none() { "memory" } else { "cpu" }
        )),
    }
    if all.is_empty() {
        why = vec![format!(
            "{PROC_MOUNTS} lists no cgroup mount (under `ip netns exec`, /sys is a fresh sysfs without /sys/fs/cgroup)"
        )];
    }
    Layout::None {
        why: why.join("; "),
    }
}

/// This host's layout, from [`PROC_MOUNTS`] as this process sees it.
pub fn detect_host() -> Layout {
    let text = std::fs::read_to_string(PROC_MOUNTS).unwrap_or_default();
    detect(&text, &|dir| {
        std::fs::read_to_string(dir.join("cgroup.controllers")).ok()
    })
}

impl Layout {
    /// One line for `doctor` and `vm show`.
    pub fn describe(&self) -> String {
        match self {
            Layout::V2 { root } => format!(
                "cgroup v2 at {}, per VM {}/<vm id>",
                root.display(),
                root.join(PARENT).display()
            ),
            Layout::V1 { memory, cpu } => format!(
                "cgroup v1 (memory at {}, cpu at {}), per VM {PARENT}/<vm id> in each",
                memory.display(),
                cpu.display()
            ),
            Layout::None { why } => format!("no per-VM cgroup: {why}"),
        }
    }

    /// The jailer's cgroup arguments for a VM limited to `limits`; none without a
    /// hierarchy (the jailer's default, version 1 with no `--cgroup`, touches none).
    pub fn jailer_args(&self, limits: Limits) -> Vec<String> {
        let (version, files) = match self {
            Layout::V2 { .. } => (
                "2",
                vec![
                    format!("memory.max={}", limits.memory_bytes()),
                    format!("cpu.max={} {CPU_PERIOD_US}", limits.cpu_quota_us()),
                ],
            ),
            Layout::V1 { .. } => (
                "1",
                vec![
                    format!("memory.limit_in_bytes={}", limits.memory_bytes()),
                    format!("cpu.cfs_period_us={CPU_PERIOD_US}"),
                    format!("cpu.cfs_quota_us={}", limits.cpu_quota_us()),
                ],
            ),
            Layout::None { .. } => return Vec::new(),
        };
        let mut args = vec![
            "--cgroup-version".to_owned(),
            version.to_owned(),
            "--parent-cgroup".to_owned(),
            PARENT.to_owned(),
        ];
        for f in files {
            args.push("--cgroup".to_owned());
            args.push(f);
        }
        args
    }

    /// The directories the jailer makes for VM `id` (one per hierarchy).
    pub fn vm_dirs(&self, id: &str) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = match self {
            Layout::V2 { root } => vec![root.clone()],
            Layout::V1 { memory, cpu } => vec![memory.clone(), cpu.clone()],
            Layout::None { .. } => Vec::new(),
        }
        .into_iter()
        .map(|h| h.join(PARENT).join(id))
        .collect();
        dirs.dedup();
        dirs
    }
}

/// Remove a VM's cgroup directories. The last task leaves a cgroup as it exits, just
/// before its parent reaps it, so a busy cgroup is retried briefly. Absent is fine.
pub fn remove_vm_dirs(dirs: &[PathBuf]) -> Result<(), String> {
    for dir in dirs {
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(format!("the VM's cgroup {}: {e}", dir.display())),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 12 as systemd sets it up: unified only.
    const UNIFIED: &str = "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
/dev/vda1 / ext4 rw,relatime 0 0
";
    /// This project's build machine: hybrid, the v1 controllers one per mount.
    const HYBRID: &str = "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
    /// Older hybrid layout (Ubuntu 20.04): cpu and cpuacct share a mount, `none` sources.
    const HYBRID_SHARED: &str =
        "none /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
none /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
none /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
";
    /// Inside `ip netns exec`: a fresh sysfs, nothing under it.
    const NETNS_EXEC: &str = "/dev/vda1 / ext4 rw,relatime 0 0
proc /proc proc rw,relatime 0 0
sysfs /sys sysfs rw,relatime 0 0
";

    fn controllers(
        of: &'static [(&'static str, &'static str)],
    ) -> impl Fn(&Path) -> Option<String> {
        move |dir| {
            of.iter()
                .find(|(d, _)| Path::new(d) == dir)
                .map(|(_, c)| (*c).to_owned())
        }
    }

    #[test]
    fn a_unified_host_with_memory_and_cpu_gets_v2() {
        let layout = detect(
            UNIFIED,
            &controllers(&[("/sys/fs/cgroup", "cpuset cpu io memory hugetlb pids rdma\n")]),
        );
        assert_eq!(
            layout,
            Layout::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        let limits = Limits {
            vcpu: 2,
            memory_mib: 512,
        };
        assert_eq!(
            layout.jailer_args(limits).join(" "),
            "--cgroup-version 2 --parent-cgroup banger --cgroup memory.max=603979776 --cgroup cpu.max=225000 100000"
        );
        assert_eq!(
            layout.vm_dirs("0123456789ab"),
            [PathBuf::from("/sys/fs/cgroup/banger/0123456789ab")]
        );
    }

    #[test]
    fn a_hybrid_host_gets_v1_because_unified_has_no_controllers() {
        // The jailer would take /sys/fs/cgroup/unified for v2 and refuse memory.max there.
        let layout = detect(HYBRID, &controllers(&[("/sys/fs/cgroup/unified", "")]));
        assert_eq!(
            layout,
            Layout::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu".into()
            }
        );
        let limits = Limits {
            vcpu: 1,
            memory_mib: 256,
        };
        assert_eq!(
            layout.jailer_args(limits).join(" "),
            "--cgroup-version 1 --parent-cgroup banger --cgroup memory.limit_in_bytes=335544320 \
             --cgroup cpu.cfs_period_us=100000 --cgroup cpu.cfs_quota_us=125000"
        );
        assert_eq!(
            layout.vm_dirs("abc"),
            [
                PathBuf::from("/sys/fs/cgroup/memory/banger/abc"),
                PathBuf::from("/sys/fs/cgroup/cpu/banger/abc")
            ]
        );
        let shared = detect(HYBRID_SHARED, &|_| Some(String::new()));
        assert_eq!(
            shared,
            Layout::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu,cpuacct".into()
            }
        );
    }

    #[test]
    fn the_first_cgroup2_mount_decides_as_in_the_jailer() {
        // A second cgroup2 mount with controllers does not count: the jailer stops at the
        // first one.
        let text = format!("{HYBRID}cgroup2 /mnt/other cgroup2 rw 0 0\n");
        let text = text.replace(
            "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n",
            "",
        );
        let layout = detect(
            &text,
            &controllers(&[("/sys/fs/cgroup/unified", ""), ("/mnt/other", "memory cpu")]),
        );
        let Layout::None { why } = layout else {
            panic!("{layout:?}")
        };
        assert!(
            why.contains("/sys/fs/cgroup/unified offers no memory or cpu controller")
                && why.contains("cgroup v1 has no memory hierarchy"),
            "{why}"
        );
    }

    #[test]
    fn no_cgroup_mount_means_no_cgroup_arguments() {
        let layout = detect(NETNS_EXEC, &|_| None);
        let Layout::None { why } = &layout else {
            panic!("{layout:?}")
        };
        assert!(why.contains("ip netns exec"), "{why}");
        assert!(
            layout
                .jailer_args(Limits {
                    vcpu: 1,
                    memory_mib: 128
                })
                .is_empty()
        );
        assert!(layout.vm_dirs("abc").is_empty());
        assert!(layout.describe().starts_with("no per-VM cgroup"));
    }

    #[test]
    fn this_hosts_layout_is_read_from_proc_mounts() {
        // Whatever this machine has, it is one of the three and describes itself.
        let layout = detect_host();
        assert!(!layout.describe().is_empty(), "{layout:?}");
    }
}
