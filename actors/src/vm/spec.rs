//! The size a new VM gets: a flag, else config `[vm_defaults]`, else derived from the host
//! (cpus/4 capped at 4, ram/8 capped at 8 GiB), else built-ins.

use banger_api::{SpecDefaults, SpecSource, VmSpec, VmmKind};

pub const BUILTIN_VCPU: u32 = 2;
pub const BUILTIN_MEMORY_MIB: u32 = 2048;
pub const BUILTIN_DISK_BYTES: u64 = 8 << 30;

/// `[vm_defaults]` from the config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigDefaults {
    pub vcpu: Option<u32>,
    pub memory_mib: Option<u32>,
    pub disk_bytes: Option<u64>,
}

/// What the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
}

impl Host {
    pub fn detect() -> Host {
        let cpus = std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() as u32);
        let memory_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
        Host { cpus, memory_bytes }
    }
}

/// Resolve the defaults with their sources.
pub fn defaults(cfg: &ConfigDefaults, host: &Host, vmm: VmmKind) -> SpecDefaults {
    let (vcpu, vcpu_from) = match (cfg.vcpu, host.cpus) {
        (Some(v), _) => (v, SpecSource::Config),
        (None, Some(c)) => ((c / 4).clamp(1, 4), SpecSource::Host),
        (None, None) => (BUILTIN_VCPU, SpecSource::Builtin),
    };
    let (memory_mib, memory_from) = match (cfg.memory_mib, host.memory_bytes) {
        (Some(m), _) => (m, SpecSource::Config),
        (None, Some(b)) => {
            let mib = (b / 8 / (1 << 20)).min(8 << 10);
            // Whole 256 MiB steps, at least 512 MiB.
            (((mib / 256) * 256).max(512) as u32, SpecSource::Host)
        }
        (None, None) => (BUILTIN_MEMORY_MIB, SpecSource::Builtin),
    };
    let (disk_bytes, disk_from) = match cfg.disk_bytes {
        Some(d) => (d, SpecSource::Config),
        None => (BUILTIN_DISK_BYTES, SpecSource::Builtin),
    };
    SpecDefaults {
        spec: VmSpec {
            vcpu,
            memory_mib,
            disk_bytes,
        },
        vcpu_from,
        memory_from,
        disk_from,
        vmm,
        vmm_choice: vmm.into(),
        vmm_reason: String::new(),
        vmm_emulated: false,
    }
}

/// Apply request overrides and validate.
pub fn resolve(
    d: &SpecDefaults,
    vcpu: Option<u32>,
    memory_mib: Option<u32>,
    disk_bytes: Option<u64>,
) -> Result<VmSpec, String> {
    let spec = VmSpec {
        vcpu: vcpu.unwrap_or(d.spec.vcpu),
        memory_mib: memory_mib.unwrap_or(d.spec.memory_mib),
        disk_bytes: disk_bytes.unwrap_or(d.spec.disk_bytes),
    };
    validate(&spec)?;
    Ok(spec)
}

/// Limits: 1–32 vCPUs (Firecracker's maximum), 128 MiB–1 TiB memory, 256 MiB–16 TiB disk.
pub fn validate(s: &VmSpec) -> Result<(), String> {
    validate_given(Some(s.vcpu), Some(s.memory_mib), Some(s.disk_bytes))
}

/// [`validate`] for the values a request gives (the others are defaults, valid already),
/// so a create can be refused before anything is pulled for it. Sizes are said in the
/// user's units (`not 64 MiB`, `not 100 TiB`).
pub fn validate_given(
    vcpu: Option<u32>,
    memory_mib: Option<u32>,
    disk_bytes: Option<u64>,
) -> Result<(), String> {
    if let Some(vcpu) = vcpu
        && !(1..=32).contains(&vcpu)
    {
        return Err(format!("vcpu must be 1 to 32, not {vcpu}"));
    }
    if let Some(mib) = memory_mib
        && !(128..=1 << 20).contains(&mib)
    {
        return Err(format!(
            "memory must be 128 MiB to 1 TiB, not {}",
            human_bytes(u64::from(mib) << 20)
        ));
    }
    if let Some(bytes) = disk_bytes
        && !((256 << 20)..=(16u64 << 40)).contains(&bytes)
    {
        return Err(format!(
            "disk must be 256 MiB to 16 TiB, not {}",
            human_bytes(bytes)
        ));
    }
    Ok(())
}

pub use banger_api::units::{human_bytes, parse_size};

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes in refusals are in the user's units (they read "not 0 MiB" for `--memory 1`
    /// and raw bytes for `--disk-size 100T`).
    #[test]
    fn refused_sizes_are_said_in_human_units() {
        assert_eq!(
            validate_given(None, Some(64), None).unwrap_err(),
            "memory must be 128 MiB to 1 TiB, not 64 MiB"
        );
        assert_eq!(
            validate_given(None, None, Some(100 << 40)).unwrap_err(),
            "disk must be 256 MiB to 16 TiB, not 100 TiB"
        );
        assert_eq!(
            validate_given(Some(33), None, None).unwrap_err(),
            "vcpu must be 1 to 32, not 33"
        );
        assert!(validate_given(None, None, None).is_ok());
        assert!(validate_given(Some(2), Some(2048), Some(8 << 30)).is_ok());
        let shrink = crate::vm::disks::DiskError::Shrink {
            current: 8 << 30,
            asked: 1 << 30,
        };
        assert_eq!(
            shrink.to_string(),
            "the work disk is 8 GiB; it can only grow (asked for 1 GiB)"
        );
    }

    const HOST: Host = Host {
        cpus: Some(16),
        memory_bytes: Some(32 << 30),
    };

    #[test]
    fn config_then_host_then_builtin() {
        let d = defaults(&ConfigDefaults::default(), &HOST, VmmKind::Qemu);
        assert_eq!((d.spec.vcpu, d.vcpu_from), (4, SpecSource::Host));
        assert_eq!((d.spec.memory_mib, d.memory_from), (4096, SpecSource::Host));
        assert_eq!(
            (d.spec.disk_bytes, d.disk_from),
            (BUILTIN_DISK_BYTES, SpecSource::Builtin)
        );

        let cfg = ConfigDefaults {
            vcpu: Some(3),
            memory_mib: Some(1024),
            disk_bytes: Some(4 << 30),
        };
        let d = defaults(&cfg, &HOST, VmmKind::Qemu);
        assert_eq!(
            d.spec,
            VmSpec {
                vcpu: 3,
                memory_mib: 1024,
                disk_bytes: 4 << 30
            }
        );
        assert_eq!(
            (d.vcpu_from, d.memory_from, d.disk_from),
            (SpecSource::Config, SpecSource::Config, SpecSource::Config)
        );

        let none = Host {
            cpus: None,
            memory_bytes: None,
        };
        let d = defaults(&ConfigDefaults::default(), &none, VmmKind::Qemu);
        assert_eq!(d.spec.vcpu, BUILTIN_VCPU);
        assert_eq!(d.spec.memory_mib, BUILTIN_MEMORY_MIB);
        assert_eq!(d.vcpu_from, SpecSource::Builtin);
    }

    #[test]
    fn host_derivation_is_capped_and_floored() {
        let big = Host {
            cpus: Some(128),
            memory_bytes: Some(1 << 40),
        };
        let d = defaults(&ConfigDefaults::default(), &big, VmmKind::Qemu);
        assert_eq!(d.spec.vcpu, 4);
        assert_eq!(d.spec.memory_mib, 8192);
        let small = Host {
            cpus: Some(2),
            memory_bytes: Some(2 << 30),
        };
        let d = defaults(&ConfigDefaults::default(), &small, VmmKind::Qemu);
        assert_eq!(d.spec.vcpu, 1);
        assert_eq!(d.spec.memory_mib, 512);
    }

    #[test]
    fn overrides_and_limits() {
        let d = defaults(&ConfigDefaults::default(), &HOST, VmmKind::Qemu);
        assert_eq!(resolve(&d, Some(1), None, None).unwrap().vcpu, 1);
        assert!(resolve(&d, Some(0), None, None).is_err());
        assert!(resolve(&d, Some(33), None, None).is_err());
        assert!(resolve(&d, None, Some(64), None).is_err());
        assert!(resolve(&d, None, None, Some(1 << 20)).is_err());
    }
}
