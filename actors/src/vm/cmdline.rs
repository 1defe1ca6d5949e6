//! The guest kernel command line, built in one place for both VMMs.
//!
//! `banger.*` parameters are read by banger-init (the Debian kernel has no `ip=` support,
//! and disks are found by label, not by probe order):
//! - `banger.id`, `banger.name`: identity (the hostname is the name).
//! - `banger.overlay=LABEL=bg-overlay`, `banger.work=LABEL=bg-work`: the per-VM disks.
//! - `banger.ip=<addr>/<prefix>`, `banger.gw`, `banger.dns`: the network, when the VM has one.

use banger_api::VmmKind;

/// Where banger-init lives in every image.
pub const INIT_PATH: &str = "/usr/lib/banger/banger-init";
/// The console line saying the guest has no banger-init, if `line` is one: the kernel, or
/// the image's initramfs, looked for [`INIT_PATH`] and did not find or could not run it.
/// Such a guest never runs banger's agent, so its start fails at once, quoting the line,
/// instead of waiting out the agent timeout. The ones seen in the wild:
/// - initramfs-tools' `run-init` (klibc): `run-init: can't execute '/usr/lib/banger/banger-init': No such file or directory`,
///   then its `init`: `Target filesystem doesn't have requested /usr/lib/banger/banger-init.`
///   (and a rescue shell that waits forever);
/// - the kernel without an initramfs (`init/main.c`): `Kernel panic - not syncing:
///   Requested init /usr/lib/banger/banger-init failed (error -2).`
///
/// The kernel's echo of its command line (`init=/usr/lib/banger/banger-init`) is not one.
pub fn init_missing(line: &str) -> bool {
    const SAID: [&str; 4] = [
        "can't execute",
        "doesn't have requested",
        "Requested init",
        "No such file or directory",
    ];
    line.contains(INIT_PATH) && SAID.iter().any(|s| line.contains(s))
}

/// Filesystem labels of the per-VM disks.
pub const OVERLAY_LABEL: &str = "bg-overlay";
pub const WORK_LABEL: &str = "bg-work";

/// Network parameters handed to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    pub address_cidr: String,
    pub gateway: String,
    pub dns: String,
}

/// Inputs of the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdlineInputs<'a> {
    pub vmm: VmmKind,
    pub id: &'a str,
    pub name: &'a str,
    pub net: Option<&'a GuestNet>,
    /// The host's TSC frequency, for QEMU microvm (no HPET: the kernel hangs calibrating
    /// without `tsc_early_khz`).
    pub tsc_khz: Option<u64>,
    /// Extra parameters from config, appended last.
    pub extra: &'a str,
}

/// Build the command line.
pub fn build(i: &CmdlineInputs<'_>) -> String {
    let mut p: Vec<String> = vec!["console=ttyS0".into(), "panic=1".into()];
    match i.vmm {
        // Firecracker adds `root=/dev/vda ro` itself for the root drive, and exits on a
        // guest reboot; `reboot=k` reboots through the keyboard controller it emulates. The
        // i8042 parameters are those of Firecracker's own default command line
        // (`DEFAULT_KERNEL_CMDLINE`, `vmm_config/boot_source.rs`): its i8042 has no aux
        // port, no multiplexer, no PnP and no real keyboard, and without them the guest
        // driver spends boot time probing for them (`docs/api_requests/actions.md`). The
        // driver is what `SendCtrlAltDel` reaches the guest through.
        VmmKind::Firecracker => {
            p.extend(
                [
                    "reboot=k",
                    "pci=off",
                    "i8042.noaux",
                    "i8042.nomux",
                    "i8042.nopnp",
                    "i8042.dumbkbd",
                ]
                .map(String::from),
            );
        }
        // microvm: `reboot=t` (triple fault) with `-no-reboot` makes a guest reboot exit QEMU.
        VmmKind::Qemu => {
            p.extend(["reboot=t".into(), "root=/dev/vda".into(), "ro".into()]);
            if let Some(khz) = i.tsc_khz {
                p.push(format!("tsc_early_khz={khz}"));
            }
        }
    }
    p.push(format!("init={INIT_PATH}"));
    p.push(format!("banger.id={}", i.id));
    p.push(format!("banger.name={}", i.name));
    p.push(format!("banger.overlay=LABEL={OVERLAY_LABEL}"));
    p.push(format!("banger.work=LABEL={WORK_LABEL}"));
    if let Some(net) = i.net {
        p.push(format!("banger.ip={}", net.address_cidr));
        p.push(format!("banger.gw={}", net.gateway));
        p.push(format!("banger.dns={}", net.dns));
    }
    let extra = i.extra.trim();
    if !extra.is_empty() {
        p.push(extra.into());
    }
    p.join(" ")
}

/// Parse a `key=value` parameter from a command line (banger-init's side of the contract).
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(vmm: VmmKind) -> CmdlineInputs<'static> {
        CmdlineInputs {
            vmm,
            id: "0123456789ab",
            name: "dev",
            net: None,
            tsc_khz: Some(2_100_000),
            extra: "",
        }
    }

    #[test]
    fn firecracker_line() {
        let c = build(&inputs(VmmKind::Firecracker));
        assert!(
            c.starts_with("console=ttyS0 panic=1 reboot=k pci=off"),
            "{c}"
        );
        assert!(!c.contains("root="), "firecracker adds root= itself: {c}");
        // Firecracker's own default line's i8042 parameters, all of them.
        let words: Vec<&str> = c.split_whitespace().collect();
        for p in ["i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd"] {
            assert!(words.contains(&p), "{p} missing: {c}");
        }
        assert!(!c.contains("tsc_early_khz"), "{c}");
        assert_eq!(param(&c, "init"), Some(INIT_PATH));
        assert_eq!(param(&c, "banger.id"), Some("0123456789ab"));
        assert_eq!(param(&c, "banger.overlay"), Some("LABEL=bg-overlay"));
    }

    #[test]
    fn qemu_line_has_root_reboot_and_tsc() {
        let c = build(&inputs(VmmKind::Qemu));
        assert_eq!(param(&c, "root"), Some("/dev/vda"));
        assert_eq!(param(&c, "reboot"), Some("t"));
        assert_eq!(param(&c, "tsc_early_khz"), Some("2100000"));
        assert!(c.split_whitespace().any(|w| w == "ro"));
    }

    #[test]
    fn network_and_extra() {
        let net = GuestNet {
            address_cidr: "172.30.0.5/24".into(),
            gateway: "172.30.0.1".into(),
            dns: "172.30.0.1".into(),
        };
        let mut i = inputs(VmmKind::Qemu);
        i.net = Some(&net);
        i.extra = " loglevel=4 ";
        let c = build(&i);
        assert_eq!(param(&c, "banger.ip"), Some("172.30.0.5/24"));
        assert_eq!(param(&c, "banger.gw"), Some("172.30.0.1"));
        assert!(c.ends_with("loglevel=4"), "{c}");
        assert_eq!(param(&c, "banger.name"), Some("dev"));
        assert_eq!(param(&c, "nope"), None);
    }

    #[test]
    fn a_missing_init_is_told_from_the_console_and_the_command_line_is_not() {
        for line in [
            "run-init: can't execute '/usr/lib/banger/banger-init': No such file or directory",
            "Target filesystem doesn't have requested /usr/lib/banger/banger-init.",
            "[    2.5] Kernel panic - not syncing: Requested init /usr/lib/banger/banger-init failed (error -2).",
        ] {
            assert!(init_missing(line), "{line}");
        }
        for line in [
            "[    0.0] Kernel command line: console=ttyS0 panic=1 init=/usr/lib/banger/banger-init",
            "banger-init: mounting the overlay",
            "run-init: can't execute '/sbin/init': No such file or directory",
        ] {
            assert!(!init_missing(line), "{line}");
        }
    }
}
