//! Which VMM a new VM gets: `default_vmm = "auto"` (the default) or `--vmm auto`,
//! resolved for this host.
//!
//! - **Firecracker** when `firecracker` and its `jailer` are installed, `/dev/kvm` runs
//!   stock guest kernels (it opens and is not nested PVM, where a stock kernel dies early:
//!   see RIG.md) and bangerd's privileged helper can start the jailer (bangerd was started
//!   as root and found the jailer then);
//! - else **QEMU with KVM** when KVM runs stock guests;
//! - else **QEMU under TCG**: the guest is emulated; it works, slowly, and `vm create` /
//!   `vm run` say so on a `warning` stage line (and the daemon logs it).
//!
//! `auto` is resolved when a VM is created, and its record stores the concrete VMM: a VM
//! never changes VMM behind its user's back (installing Firecracker later changes only the
//! VMs created after). A concrete `--vmm` or `default_vmm` is taken as asked.
//!
//! [`decide`] is the whole rule, a pure function over [`HostProbe`]: [`RealProbe`] looks
//! at this host, [`FakeProbe`] (beside it) is what the tests give it. The daemon and
//! `banger doctor` use the same function, so doctor says what `vm create` will do.

use std::path::{Path, PathBuf};

use banger_api::{VmmChoice, VmmKind};

/// How QEMU accelerates the guest (`[qemu] accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

/// What `/dev/kvm` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kvm {
    /// It opens and is not PVM: stock guest kernels run under it.
    Usable,
    /// Nested paravirtualised KVM (the `kvm_pvm` module): it opens, but a stock guest
    /// kernel dies early under it.
    Pvm,
    /// It exists, but this user cannot open it.
    NoAccess,
    /// There is none: no hardware virtualisation.
    Missing,
}

impl Kvm {
    /// Probe this host: `/dev/kvm` opened read-write, and `/sys/module/kvm_pvm`.
    pub fn probe() -> Kvm {
        Kvm::probe_at(Path::new("/dev/kvm"), Path::new("/sys/module/kvm_pvm"))
    }

    fn probe_at(dev: &Path, pvm_module: &Path) -> Kvm {
        if !dev.exists() {
            return Kvm::Missing;
        }
        let opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .is_ok();
        match (opens, pvm_module.exists()) {
            (false, _) => Kvm::NoAccess,
            (true, true) => Kvm::Pvm,
            (true, false) => Kvm::Usable,
        }
    }

    /// Whether stock guest kernels run under it.
    pub fn usable(self) -> bool {
        self == Kvm::Usable
    }

    /// What it means for guests, as a clause.
    pub fn describe(self) -> &'static str {
        match self {
            Kvm::Usable => "/dev/kvm runs stock guests",
            Kvm::Pvm => {
                "/dev/kvm is PVM (nested paravirtualised KVM), under which stock guest kernels die early"
            }
            Kvm::NoAccess => "/dev/kvm exists but this user cannot open it",
            Kvm::Missing => "there is no /dev/kvm (no hardware virtualisation)",
        }
    }
}

/// Whether bangerd can start Firecracker's jailer (it needs root, which only the
/// privileged helper keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jailing {
    /// The helper runs and was given the jailer when bangerd started.
    Ready,
    /// The helper runs, but the jailer or firecracker was not found when bangerd started.
    HelperWithoutJailer,
    /// No helper: bangerd was not started as root.
    NoHelper,
}

/// The host facts [`decide`] needs.
pub trait HostProbe: std::fmt::Debug + Send + Sync {
    /// Whether `firecracker` is installed.
    fn firecracker(&self) -> bool;
    /// Whether Firecracker's `jailer` is installed.
    fn jailer(&self) -> bool;
    fn kvm(&self) -> Kvm;
    fn jailing(&self) -> Jailing;
}

/// This host, with the configured binaries (names are looked up on PATH, then
/// /usr/sbin and /sbin).
#[derive(Debug, Clone)]
pub struct RealProbe {
    pub firecracker: PathBuf,
    pub jailer: PathBuf,
    pub jailing: Jailing,
}

impl HostProbe for RealProbe {
    fn firecracker(&self) -> bool {
        find_program(&self.firecracker).is_some()
    }
    fn jailer(&self) -> bool {
        find_program(&self.jailer).is_some()
    }
    fn kvm(&self) -> Kvm {
        Kvm::probe()
    }
    fn jailing(&self) -> Jailing {
        self.jailing
    }
}

/// Fixed answers, for tests.
#[derive(Debug, Clone, Copy)]
pub struct FakeProbe {
    pub firecracker: bool,
    pub jailer: bool,
    pub kvm: Kvm,
    pub jailing: Jailing,
}

impl FakeProbe {
    /// A host where every condition for Firecracker holds.
    pub fn firecracker_host() -> FakeProbe {
        FakeProbe {
            firecracker: true,
            jailer: true,
            kvm: Kvm::Usable,
            jailing: Jailing::Ready,
        }
    }
}

impl HostProbe for FakeProbe {
    fn firecracker(&self) -> bool {
        self.firecracker
    }
    fn jailer(&self) -> bool {
        self.jailer
    }
    fn kvm(&self) -> Kvm {
        self.kvm
    }
    fn jailing(&self) -> Jailing {
        self.jailing
    }
}

/// An executable by name on PATH (then /usr/sbin, /sbin), or as given when it is a path.
pub fn find_program(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.components().count() > 1 {
        return runnable(name).then(|| name.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| runnable(p))
}

/// The VMM a VM gets, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub vmm: VmmKind,
    /// QEMU under TCG: the guest is emulated (it works, slowly).
    pub emulated: bool,
    /// Why, as a sentence a user reads in `doctor` and `vm create --help`.
    pub reason: String,
}

impl Decision {
    /// The one line `vm create` / `vm run` show (and the daemon logs) for an emulated VM.
    pub fn warning(&self) -> Option<String> {
        self.emulated.then(|| {
            "this VM is emulated (QEMU under TCG, no usable KVM): it works, but boots and runs slowly".to_owned()
        })
    }
}

/// Resolve `choice` on `host`. `accel` is the configured QEMU acceleration (`[qemu]
/// accel`), which decides whether a QEMU VM is emulated. See the module docs for the rule.
pub fn decide(choice: VmmChoice, accel: Accel, host: &dyn HostProbe) -> Decision {
    let kvm = host.kvm();
    let qemu_emulated = match accel {
        Accel::Tcg => true,
        Accel::Kvm => false,
        Accel::Auto => !kvm.usable(),
    };
    let qemu_how = || {
        if qemu_emulated {
            "QEMU under TCG (emulated, slow)"
        } else {
            "QEMU with KVM"
        }
    };
    match choice {
        VmmChoice::Firecracker => Decision {
            vmm: VmmKind::Firecracker,
            emulated: false,
            reason: "firecracker, as configured".into(),
        },
        VmmChoice::Qemu => Decision {
            vmm: VmmKind::Qemu,
            emulated: qemu_emulated,
            reason: if qemu_emulated && accel == Accel::Auto {
                format!("{}, as configured; {}", qemu_how(), kvm.describe())
            } else {
                format!("{}, as configured", qemu_how())
            },
        },
        VmmChoice::Auto => {
            let mut missing: Vec<&str> = Vec::new();
            if !host.firecracker() {
                missing.push("firecracker is not installed");
            } else if !host.jailer() {
                missing.push("firecracker's jailer is not installed");
            }
            if !kvm.usable() {
                missing.push(kvm.describe());
            }
            match host.jailing() {
                Jailing::Ready => {}
                Jailing::NoHelper => missing.push(
                    "bangerd has no privileged helper to start the jailer (it was not started as root)",
                ),
                Jailing::HelperWithoutJailer if missing.is_empty() => missing.push(
                    "bangerd found no jailer when it started (restart it now that Firecracker is installed)",
                ),
                Jailing::HelperWithoutJailer => {}
            }
            if missing.is_empty() {
                return Decision {
                    vmm: VmmKind::Firecracker,
                    emulated: false,
                    reason: "auto: Firecracker, as firecracker and its jailer are installed, /dev/kvm runs stock guests and bangerd's privileged helper starts the jailer".into(),
                };
            }
            Decision {
                vmm: VmmKind::Qemu,
                emulated: qemu_emulated,
                reason: format!("auto: {}, as {}", qemu_how(), missing.join("; ")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(host: FakeProbe) -> Decision {
        decide(VmmChoice::Auto, Accel::Auto, &host)
    }

    #[test]
    fn auto_picks_firecracker_when_every_condition_holds() {
        let d = auto(FakeProbe::firecracker_host());
        assert_eq!(d.vmm, VmmKind::Firecracker);
        assert!(!d.emulated && d.warning().is_none());
        assert!(d.reason.starts_with("auto: Firecracker"), "{}", d.reason);
    }

    #[test]
    fn auto_picks_qemu_with_kvm_when_firecracker_is_missing() {
        let d = auto(FakeProbe {
            firecracker: false,
            ..FakeProbe::firecracker_host()
        });
        assert_eq!((d.vmm, d.emulated), (VmmKind::Qemu, false));
        assert!(
            d.reason.contains("QEMU with KVM") && d.reason.contains("firecracker is not installed"),
            "{}",
            d.reason
        );
        assert!(d.warning().is_none());
    }

    #[test]
    fn auto_picks_qemu_with_kvm_when_the_jailer_is_missing() {
        let d = auto(FakeProbe {
            jailer: false,
            ..FakeProbe::firecracker_host()
        });
        assert_eq!((d.vmm, d.emulated), (VmmKind::Qemu, false));
        assert!(d.reason.contains("jailer is not installed"), "{}", d.reason);
    }

    #[test]
    fn auto_picks_qemu_with_kvm_without_the_privileged_helper() {
        let d = auto(FakeProbe {
            jailing: Jailing::NoHelper,
            ..FakeProbe::firecracker_host()
        });
        assert_eq!((d.vmm, d.emulated), (VmmKind::Qemu, false));
        assert!(d.reason.contains("not started as root"), "{}", d.reason);
        let d = auto(FakeProbe {
            jailing: Jailing::HelperWithoutJailer,
            ..FakeProbe::firecracker_host()
        });
        assert_eq!(d.vmm, VmmKind::Qemu);
        assert!(d.reason.contains("restart it"), "{}", d.reason);
    }

    #[test]
    fn auto_picks_qemu_under_tcg_on_a_pvm_host_and_says_it_is_slow() {
        // This machine's kind: Debian 12, PVM /dev/kvm, no firecracker, user daemon.
        let d = auto(FakeProbe {
            firecracker: false,
            jailer: false,
            kvm: Kvm::Pvm,
            jailing: Jailing::NoHelper,
        });
        assert_eq!((d.vmm, d.emulated), (VmmKind::Qemu, true));
        assert!(
            d.reason.contains("QEMU under TCG") && d.reason.contains("PVM"),
            "{}",
            d.reason
        );
        assert!(d.warning().unwrap().contains("emulated"));
        // Even with Firecracker installed and the helper there, PVM rules it out.
        let d = auto(FakeProbe {
            kvm: Kvm::Pvm,
            ..FakeProbe::firecracker_host()
        });
        assert_eq!((d.vmm, d.emulated), (VmmKind::Qemu, true));
    }

    #[test]
    fn auto_picks_qemu_under_tcg_without_kvm_or_access_to_it() {
        for kvm in [Kvm::Missing, Kvm::NoAccess] {
            let d = auto(FakeProbe {
                kvm,
                ..FakeProbe::firecracker_host()
            });
            assert_eq!((d.vmm, d.emulated), (VmmKind::Qemu, true), "{kvm:?}");
            assert!(d.reason.contains(kvm.describe()), "{}", d.reason);
        }
    }

    #[test]
    fn a_configured_vmm_is_taken_as_asked() {
        let tcg_host = FakeProbe {
            firecracker: false,
            jailer: false,
            kvm: Kvm::Pvm,
            jailing: Jailing::NoHelper,
        };
        let d = decide(VmmChoice::Firecracker, Accel::Auto, &tcg_host);
        assert_eq!((d.vmm, d.emulated), (VmmKind::Firecracker, false));
        let d = decide(VmmChoice::Qemu, Accel::Auto, &tcg_host);
        assert_eq!((d.vmm, d.emulated), (VmmKind::Qemu, true));
        assert!(d.reason.contains("PVM"), "{}", d.reason);
        // `[qemu] accel` decides emulation for QEMU, whatever KVM offers.
        let fc_host = FakeProbe::firecracker_host();
        assert!(decide(VmmChoice::Qemu, Accel::Tcg, &fc_host).emulated);
        assert!(!decide(VmmChoice::Qemu, Accel::Auto, &fc_host).emulated);
        assert!(!decide(VmmChoice::Qemu, Accel::Kvm, &tcg_host).emulated);
    }

    #[test]
    fn the_kvm_probe_reads_the_device_and_the_pvm_module() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        let pvm = dir.path().join("kvm_pvm");
        assert_eq!(Kvm::probe_at(&dev, &pvm), Kvm::Missing);
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(Kvm::probe_at(&dev, &pvm), Kvm::Usable);
        std::fs::create_dir(&pvm).unwrap();
        assert_eq!(Kvm::probe_at(&dev, &pvm), Kvm::Pvm);
        let dir_dev = dir.path().join("notadevice");
        std::fs::create_dir(&dir_dev).unwrap();
        assert_eq!(
            Kvm::probe_at(&dir_dev, &pvm),
            Kvm::NoAccess,
            "exists, cannot be opened read-write"
        );
    }

    #[test]
    fn the_real_probe_finds_programs_on_path_and_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("firecracker");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        let plain = dir.path().join("jailer");
        std::fs::write(&plain, b"").unwrap();
        let probe = RealProbe {
            firecracker: exe.clone(),
            jailer: plain.clone(),
            jailing: Jailing::NoHelper,
        };
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        assert!(probe.firecracker(), "an executable given by path");
        assert!(
            !probe.jailer(),
            "a file that is not executable is not installed"
        );
        assert!(find_program(Path::new("sh")).is_some(), "found on PATH");
        assert!(find_program(Path::new("no-such-program-banger")).is_none());
    }
}
