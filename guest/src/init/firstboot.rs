//! First boot of an image without sshd (a plain container image): banger-init installs it
//! once with the distribution's package manager, in the background (the agent already
//! answers), saying on the console what it does. A marker on the overlay
//! ([`MARKER`]) makes it once per VM; a failed attempt leaves no marker and is retried on
//! the next boot. It needs the VM to reach a package mirror: create the VM with `--nat`.

use std::path::Path;

/// Written when the installation succeeded.
pub const MARKER: &str = "/var/lib/banger/firstboot-sshd";

/// What to run, and how to say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The package manager found (`apt-get`, `apk`, `dnf`, …).
    pub manager: &'static str,
    /// A `/bin/sh -c` script: install, mark, and (without an init system) start sshd.
    pub script: String,
}

/// Package managers in the order they are looked for, with their install command.
const MANAGERS: &[(&str, &str, &str)] = &[
    (
        "apt-get",
        "/usr/bin/apt-get",
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server",
    ),
    ("apk", "/sbin/apk", "apk add --no-cache openssh-server"),
    ("dnf", "/usr/bin/dnf", "dnf install -y openssh-server"),
    ("yum", "/usr/bin/yum", "yum install -y openssh-server"),
    (
        "zypper",
        "/usr/bin/zypper",
        "zypper --non-interactive install openssh",
    ),
    (
        "pacman",
        "/usr/bin/pacman",
        "pacman -Sy --noconfirm openssh",
    ),
];

/// The first-boot plan for the root at `root`, or None when there is nothing to do
/// (sshd is there, it was done, or no known package manager exists).
pub fn plan(root: &Path, has_init_system: bool) -> Option<Plan> {
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    if ["/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"]
        .iter()
        .any(|p| at(p).exists())
        || at(MARKER).exists()
    {
        return None;
    }
    let (manager, _, install) = MANAGERS.iter().find(|(_, path, _)| at(path).exists())?;
    let start = if has_init_system {
        // The package's own unit starts it under the image's init.
        String::new()
    } else {
        " && ssh-keygen -A && mkdir -p /run/sshd && /usr/sbin/sshd".to_owned()
    };
    Some(Plan {
        manager,
        script: format!("{install} && mkdir -p /var/lib/banger && : > {MARKER}{start}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(files: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for f in files {
            let p = d.path().join(f.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        d
    }

    #[test]
    fn installs_sshd_once_with_the_image_s_package_manager() {
        let debian = root_with(&["/usr/bin/apt-get"]);
        let p = plan(debian.path(), false).unwrap();
        assert_eq!(p.manager, "apt-get");
        assert!(p.script.starts_with("apt-get update && "), "{}", p.script);
        assert!(
            p.script
                .contains("install -y --no-install-recommends openssh-server")
        );
        assert!(p.script.contains(MARKER) && p.script.ends_with("/usr/sbin/sshd"));
        // Under an init system the package's unit starts sshd.
        assert!(
            !plan(debian.path(), true)
                .unwrap()
                .script
                .contains("/usr/sbin/sshd")
        );
        let alpine = root_with(&["/sbin/apk"]);
        assert_eq!(plan(alpine.path(), false).unwrap().manager, "apk");
        // Nothing to do: sshd present, already done, or no package manager.
        assert_eq!(
            plan(
                root_with(&["/usr/bin/apt-get", "/usr/sbin/sshd"]).path(),
                false
            ),
            None
        );
        assert_eq!(
            plan(root_with(&["/usr/bin/apt-get", MARKER]).path(), false),
            None
        );
        assert_eq!(plan(root_with(&["/bin/sh"]).path(), false), None);
    }
}
