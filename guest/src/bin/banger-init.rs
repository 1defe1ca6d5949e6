//! banger-init: PID 1 of every banger guest (`init=/usr/lib/banger/banger-init`).
//!
//! The kernel (through the distribution's initrd when there is one) has mounted the image's
//! root filesystem read-only at `/`. banger-init then:
//! 1. mounts /proc, /sys, /dev (when the initrd has not), and a tmpfs at /run;
//! 2. loads the modules it needs that are not built in (overlay, virtio_net, the virtio
//!    vsock transport, virtio_console) from the image's /lib/modules, dependencies first;
//! 3. mounts the VM's overlay disk (found by label, `banger.overlay=LABEL=bg-overlay`) and
//!    builds an overlayfs with the read-only root as its lower layer, then switches into it
//!    (move the mount onto `/`, chroot), so writes to `/` land on the overlay disk and the
//!    image stays untouched;
//!    the state directories of installed container engines (`/var/lib/docker`,
//!    `/var/lib/containerd`, `/var/lib/containers`) are bound to directories of the overlay
//!    disk itself, since their engines' own overlays cannot nest in an overlayfs;
//! 4. mounts the work disk (`banger.work=LABEL=bg-work`) at /root;
//! 5. sets the hostname from `banger.name`;
//! 6. starts banger-agent (`/usr/lib/banger/banger-agent`, vsock);
//! 7. when the image has sshd, writes `/etc/ssh/sshd_config.d/banger.conf` (root login by
//!    key only: `PermitRootLogin prohibit-password`, no password or keyboard-interactive),
//!    and makes an ed25519 host key if it has none (once per VM: it lands on the overlay
//!    disk; promoted images ship without host keys);
//! 8. says which init runs the guest in `/run/banger/init` (the agent's `Boot` waits for
//!    it, and then for systemd's start-up jobs), then
//!    execs the image's init (`/sbin/init`, systemd) if it has one; otherwise it stays PID
//!    1: it starts `sshd -D` and restarts it (and the agent) when they die, reaps
//!    orphans, and shuts the guest down on Ctrl-Alt-Del (SIGINT, how both VMMs ask for a
//!    shutdown), SIGTERM and SIGPWR.
//!
//! It says what it does on the console, prefixed `banger-init:`. A failure in steps 1–5
//! is reported and the guest is shut down rather than left half set up.
//!
//! Shutting down is always a **reboot**: both VMMs banger runs exit when their guest
//! reboots (Firecracker with `reboot=k`, QEMU with `-no-reboot`), but Firecracker has no
//! power-management device, so a guest that powers off halts while the Firecracker process
//! lives on (Firecracker's `FAQ.md`, which recommends `reboot` to shut a guest down). A
//! power-off that bypasses banger-init (`poweroff -f`, or an image's own init) is noticed
//! by the daemon from the kernel's `reboot: Power down` console line.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::ffi::CString;
use std::path::Path;

use banger_guest::init::{container_state_dirs, find_device, load_order, param, parse_modules_dep};
use nix::mount::{MsFlags, mount};
use nix::sys::signal::{SigSet, Signal};

fn say(msg: impl std::fmt::Display) {
    println!("banger-init: {msg}");
}

fn mounted(target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(target))
    })
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| format!("mount {fstype} {source} on {target}: {e}"))
}

fn load_modules(wanted: &[&str]) {
    let Ok(release) =
        nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned())
    else {
        return;
    };
    let dir = Path::new("/lib/modules").join(&release);
    let Ok(dep) = std::fs::read_to_string(dir.join("modules.dep")) else {
        say(format!(
            "no modules for {release} in the image; relying on built-in drivers"
        ));
        return;
    };
    for m in load_order(&parse_modules_dep(&dep), wanted) {
        let path = dir.join(&m);
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        match nix::kmod::finit_module(
            &file,
            &CString::default(),
            nix::kmod::ModuleInitFlags::empty(),
        ) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => say(format!("cannot load {}: {e}", path.display())),
        }
    }
}

fn block_devices() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/block")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Everything up to the image's init. /proc is mounted already (by `main`, to read the
/// command line).
fn setup(cmdline: &str) -> Result<(), String> {
    if !mounted("/sys") {
        mount_fs(
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        )?;
    }
    if !mounted("/dev") {
        mount_fs(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )?;
    }
    if mounted("/run") {
        // Left by the initrd: detach it, the new root gets a fresh one.
        let _ = nix::mount::umount2("/run", nix::mount::MntFlags::MNT_DETACH);
    }
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;

    // `button`: the ACPI power button, how QEMU microvm (no keyboard controller) asks for
    // a shutdown. `virtio_console`: QEMU's agent channel, a virtio-serial port (a module in
    // Debian's kernels, as the vsock transport is; built-in kernels need nothing loaded).
    load_modules(&[
        "overlay",
        "virtio_net",
        "vmw_vsock_virtio_transport",
        "virtio_console",
        "button",
    ]);

    let devs = block_devices();
    let overlay_spec = param(cmdline, "banger.overlay").unwrap_or("LABEL=bg-overlay");
    let overlay_dev = find_device(overlay_spec, Path::new("/dev"), &devs)
        .ok_or_else(|| format!("no disk matches {overlay_spec}"))?;
    let disk = "/run/banger/overlay";
    mount_fs(
        &overlay_dev.display().to_string(),
        disk,
        "ext4",
        MsFlags::MS_NOATIME,
        None,
    )?;
    for d in ["upper", "work"] {
        std::fs::create_dir_all(format!("{disk}/{d}")).map_err(|e| format!("{disk}/{d}: {e}"))?;
    }
    let newroot = "/run/banger/root";
    mount_fs(
        "overlay",
        newroot,
        "overlay",
        MsFlags::empty(),
        Some(&format!(
            "lowerdir=/,upperdir={disk}/upper,workdir={disk}/work"
        )),
    )?;
    say(format!(
        "root: the image, read-only, under an overlay on {}",
        overlay_dev.display()
    ));
    // Container engines nest overlays under their state directory, which overlayfs
    // refuses on an overlayfs: give each installed engine's a directory of the overlay disk
    // (ext4; kept with the VM's other writes to `/`). Moved with the new root below.
    for dir in container_state_dirs(Path::new(newroot)) {
        let (src, dst) = (format!("{disk}/state/{dir}"), format!("{newroot}/{dir}"));
        let bound = std::fs::create_dir_all(&src)
            .and_then(|()| std::fs::create_dir_all(&dst))
            .map_err(|e| e.to_string())
            .and_then(|()| {
                mount(
                    Some(src.as_str()),
                    dst.as_str(),
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| e.to_string())
            });
        match bound {
            Ok(()) => say(format!(
                "/{dir}: on the overlay disk (a container engine's overlays cannot nest in /'s)"
            )),
            Err(e) => say(format!("/{dir} stays on the overlay: {e}")),
        }
    }
    for m in ["/proc", "/sys", "/dev"] {
        let target = format!("{newroot}{m}");
        let _ = std::fs::create_dir_all(&target);
        mount(
            Some(m),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| format!("move {m}: {e}"))?;
    }
    std::env::set_current_dir(newroot).map_err(|e| format!("chdir {newroot}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move the new root onto /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    let _ = std::fs::create_dir_all("/dev/pts");
    let _ = mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    );

    let work_spec = param(cmdline, "banger.work").unwrap_or("LABEL=bg-work");
    match find_device(work_spec, Path::new("/dev"), &block_devices()) {
        Some(dev) => {
            mount_fs(
                &dev.display().to_string(),
                "/root",
                "ext4",
                MsFlags::MS_NOATIME,
                None,
            )?;
            say(format!("/root: the work disk {}", dev.display()));
        }
        None => say(format!(
            "no disk matches {work_spec}; /root stays on the overlay"
        )),
    }

    if let Some(name) = param(cmdline, "banger.name") {
        let _ = nix::unistd::sethostname(name);
        let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
        // So the guest resolves its own name without a resolver.
        let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        if !hosts
            .lines()
            .any(|l| l.split_whitespace().skip(1).any(|h| h == name))
        {
            let _ = std::fs::write(
                "/etc/hosts",
                format!(
                    "{hosts}{}127.0.1.1 {name}\n",
                    if hosts.is_empty() || hosts.ends_with('\n') {
                        ""
                    } else {
                        "\n"
                    }
                ),
            );
        }
        say(format!("hostname {name}"));
    }
    network(cmdline);
    Ok(())
}

/// Configure the network from `banger.ip`/`banger.gw`/`banger.dns`. A failure is said on
/// the console and boot goes on: the agent still answers over vsock.
fn network(cmdline: &str) {
    use banger_guest::init::net;
    if let Err(e) = net::loopback_up() {
        say(format!("network: lo: {e}"));
    }
    let cfg = match net::NetConfig::from_cmdline(cmdline) {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            say(format!("network: {e}; left unconfigured"));
            return;
        }
    };
    let Some(nic) = net::first_nic() else {
        say("network: no network device (is virtio_net loaded?); left unconfigured");
        return;
    };
    match net::configure(&cfg, &nic) {
        Ok(()) => say(format!(
            "network: {nic} {}/{}{}",
            cfg.address,
            cfg.prefix,
            cfg.gateway.map(|g| format!(" via {g}")).unwrap_or_default()
        )),
        Err(e) => say(format!("network: {nic}: {e}")),
    }
    if let Some(dns) = cfg.dns {
        // Often a symlink into systemd-resolved's runtime dir: replace it with a file.
        let _ = std::fs::remove_file("/etc/resolv.conf");
        if let Err(e) = std::fs::write("/etc/resolv.conf", net::resolv_conf(dns)) {
            say(format!("network: /etc/resolv.conf: {e}"));
        }
    }
}

/// An image without sshd: install it in the background, once (see `init::firstboot`).
fn first_boot(has_init: bool) {
    let Some(plan) = banger_guest::init::firstboot::plan(Path::new("/"), has_init) else {
        return;
    };
    say(format!(
        "first boot: this image has no sshd; installing openssh-server with {} in the background (once; it needs a package mirror: create the VM with --nat)",
        plan.manager
    ));
    let spawned = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "if {script}; then echo 'banger-init: first boot: sshd installed'; else echo 'banger-init: first boot: installing sshd failed; it is tried again at the next boot'; fi",
            script = plan.script
        ))
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .spawn();
    if let Err(e) = spawned {
        say(format!("first boot: cannot run /bin/sh: {e}"));
    }
}

const AGENT: &str = "/usr/lib/banger/banger-agent";

/// Start the guest agent (its output goes to the console).
fn spawn_agent() -> Option<i32> {
    if !Path::new(AGENT).exists() {
        say(format!(
            "{AGENT} is missing: `banger vm exec` will not work"
        ));
        return None;
    }
    match std::process::Command::new(AGENT)
        .stdin(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => Some(child.id() as i32),
        Err(e) => {
            say(format!("cannot start {AGENT}: {e}"));
            None
        }
    }
}

const SSHD: &str = "/usr/sbin/sshd";
/// Key-only root login, whatever the image's sshd_config says (Debian's includes
/// `sshd_config.d/*.conf` first, and the first value of a keyword wins).
const SSHD_CONF: &str = "# written by banger-init at every boot\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n";

/// The sshd drop-in, for sshd started by us or by the image's init.
fn ssh_config() {
    if !Path::new(SSHD).exists() {
        return;
    }
    let dir = Path::new("/etc/ssh/sshd_config.d");
    if let Err(e) = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(dir.join("banger.conf"), SSHD_CONF))
    {
        say(format!(
            "ssh: cannot write {}/banger.conf: {e}",
            dir.display()
        ));
    }
}

/// Host key (if none) and `/run/sshd`, before sshd starts. Runs before the reaping loop,
/// so waiting for ssh-keygen here cannot race with it.
fn prepare_sshd() -> bool {
    if !Path::new(SSHD).exists() || !host_key() {
        return false;
    }
    let _ = std::fs::create_dir_all("/run/sshd");
    true
}

/// An ed25519 host key when the image has sshd and no host key at all (a promoted image
/// has none: `banger image promote` strips them; the key lands on this VM's overlay, so
/// once per VM). False when one was needed and could not be made.
fn host_key() -> bool {
    if !Path::new(SSHD).exists() {
        return true;
    }
    let has_key = std::fs::read_dir("/etc/ssh").is_ok_and(|d| {
        d.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("ssh_host_") && n.ends_with("_key")
        })
    });
    if !has_key {
        let ok = banger_guest::init::make_host_key().is_ok_and(|s| s.success());
        if !ok {
            say("ssh: cannot make a host key (ssh-keygen failed); sshd not started");
            return false;
        }
        say("ssh: made an ed25519 host key (the image has none)");
    }
    true
}

fn spawn_sshd() -> Option<i32> {
    match std::process::Command::new(SSHD)
        .args(["-D", "-e"])
        .stdin(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => Some(child.id() as i32),
        Err(e) => {
            say(format!("cannot start {SSHD}: {e}"));
            None
        }
    }
}

fn power(action: nix::sys::reboot::RebootMode) -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(action);
    // reboot() only returns on error; nothing else to do as PID 1.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// End the guest, so that its VMM exits: a reboot (see the module docs for why not a
/// power-off).
fn shut_down() -> ! {
    power(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
}

/// Input devices named "Power Button" (the ACPI button driver's).
fn power_buttons() -> Vec<std::path::PathBuf> {
    let Ok(dir) = std::fs::read_dir("/sys/class/input") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("device/name"))
                .is_ok_and(|n| n.trim() == "Power Button")
        })
        .map(|e| Path::new("/dev/input").join(e.file_name()))
        .collect()
}

/// Turn a press of the power button into SIGPWR to ourselves.
fn watch_power_button(dev: std::path::PathBuf) {
    use std::io::Read;
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let _ = std::thread::Builder::new()
        .name("power-button".into())
        .spawn(move || {
            let Ok(mut f) = std::fs::File::open(&dev) else {
                return;
            };
            // struct input_event on 64-bit: timeval (16 bytes), u16 type, u16 code, i32 value.
            let mut ev = [0u8; 24];
            while f.read_exact(&mut ev).is_ok() {
                let kind = u16::from_ne_bytes([ev[16], ev[17]]);
                let code = u16::from_ne_bytes([ev[18], ev[19]]);
                let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
                if kind == EV_KEY && code == KEY_POWER && value == 1 {
                    say("power button pressed");
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), Signal::SIGPWR);
                }
            }
        });
}

/// Stay PID 1: reap children (restarting the agent if it dies), and shut down when asked.
fn supervise(mut agent: Option<i32>, mut sshd: Option<i32>) -> ! {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGPWR,
    ] {
        set.add(s);
    }
    let _ = set.thread_block();
    // The button driver registers its input device asynchronously after the module loads:
    // keep looking for a while.
    let _ = std::thread::Builder::new()
        .name("power-button-scan".into())
        .spawn(|| {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..120 {
                for dev in power_buttons() {
                    if seen.insert(dev.clone()) {
                        watch_power_button(dev);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
        });
    say("ready");
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) =
                    nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
                {
                    let Some(pid) = status.pid() else {
                        break;
                    };
                    if Some(pid.as_raw()) == agent {
                        say(format!("the agent exited ({status:?}); restarting it"));
                        std::thread::sleep(std::time::Duration::from_millis(500));
                        agent = spawn_agent();
                    } else if sshd.is_some() && Some(pid.as_raw()) == sshd {
                        say(format!("sshd exited ({status:?}); restarting it"));
                        std::thread::sleep(std::time::Duration::from_millis(500));
                        sshd = spawn_sshd();
                    }
                }
            }
            Ok(Signal::SIGINT) => {
                say("ctrl-alt-del: shutting down (rebooting: the VMM exits)");
                shut_down();
            }
            Ok(_) => {
                say("shutting down (rebooting: the VMM exits)");
                shut_down();
            }
            Err(_) => {}
        }
    }
}

/// Say which init runs the guest from here on (`None`: this one), for the agent's `Boot`
/// (see [`banger_guest::agent::boot`]).
fn boot_marker(init: Option<&Path>) {
    let marker = Path::new(banger_guest::proto::BOOT_INIT_MARKER);
    if let Some(dir) = marker.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // Whole or not at all: the agent may read it at any moment.
    let tmp = marker.with_extension("tmp");
    let written = std::fs::write(&tmp, banger_guest::agent::boot::marker_for(init))
        .and_then(|()| std::fs::rename(&tmp, marker));
    if let Err(e) = written {
        say(format!("cannot write {}: {e}", marker.display()));
    }
}

fn main() {
    // Kept in the binary: the host reads the guest side's revision from an image.
    std::hint::black_box(banger_guest::REVISION_MARK);
    if nix::unistd::getpid().as_raw() != 1 {
        eprintln!("banger-init: must run as PID 1 (init=/usr/lib/banger/banger-init)");
        std::process::exit(2);
    }
    // Ctrl-Alt-Del → SIGINT to us instead of an immediate reboot.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    if !mounted("/proc") {
        let _ = mount_fs(
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        );
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    say(format!("starting (banger {})", env!("CARGO_PKG_VERSION")));
    if let Err(e) = setup(&cmdline) {
        say(format!("setup failed: {e}; shutting down"));
        shut_down();
    }
    let agent = spawn_agent();
    let inits = ["/sbin/init", "/usr/sbin/init", "/lib/systemd/systemd"];
    let has_init = inits.iter().any(|i| {
        let p = Path::new(i);
        p.exists()
            && std::fs::canonicalize(p).ok().as_deref() != std::env::current_exe().ok().as_deref()
    });
    ssh_config();
    first_boot(has_init);
    if has_init {
        // The image's init starts sshd; make sure it has a key to start with.
        host_key();
    }
    for init in inits {
        let p = Path::new(init);
        if p.exists()
            && std::fs::canonicalize(p).ok().as_deref() != std::env::current_exe().ok().as_deref()
        {
            say(format!("exec {init}"));
            boot_marker(Some(p));
            let prog = CString::new(init).expect("static path");
            let err = nix::unistd::execv(&prog, std::slice::from_ref(&prog));
            say(format!("exec {init} failed: {err:?}; staying as init"));
            break;
        }
    }
    boot_marker(None);
    let sshd = if prepare_sshd() { spawn_sshd() } else { None };
    supervise(agent, sshd);
}
