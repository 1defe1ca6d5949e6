//! `banger image pull|list --available|cache` and `banger kernel pull|list --available` as a
//! user runs them: real binaries, a daemon auto-started in an isolated home, catalogs from
//! the config pointing at bundles a local HTTP server (started here) serves. Piped, a pull
//! prints only its result; on a terminal (through `script`) it shows stages and a bar.

#[path = "../../service/tests/pulls/mod.rs"]
mod pulls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pulls::{FileServer, Serve};

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new(catalogs: (PathBuf, PathBuf)) -> Home {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        let conf = dir.path().join("config/banger");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("config.toml"),
            format!(
                "[images]\ncatalog = \"{}\"\nkernel_catalog = \"{}\"\n",
                catalogs.0.display(),
                catalogs.1.display()
            ),
        )
        .unwrap();
        Home { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cmd(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        for (k, _) in std::env::vars() {
            if k.starts_with("BANGER_") || k.starts_with("XDG_") {
                cmd.env_remove(k);
            }
        }
        let p = self.path();
        cmd.env("HOME", p)
            .env("XDG_RUNTIME_DIR", p.join("run"))
            .env("XDG_DATA_HOME", p.join("data"))
            .env("XDG_STATE_HOME", p.join("state"))
            .env("XDG_CACHE_HOME", p.join("cache"))
            .env("XDG_CONFIG_HOME", p.join("config"))
            .env("BANGER_SOCKET", p.join("run/banger/bangerd.sock"))
            .env("BANGER_DNS_LISTEN", "127.0.0.1:0");
        cmd
    }

    fn banger(&self, args: &[&str]) -> Output {
        self.cmd(Path::new(env!("CARGO_BIN_EXE_banger")))
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = self.banger(&["daemon", "stop"]);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A bzImage (an LZ4 payload, as Debian's vmlinuz) written under `dir`.
fn tmp_bz(dir: &Path) -> PathBuf {
    use banger_actors::kernel_format::fixture::{bzimage, lz4_legacy, minimal_elf};
    let p = dir.join("bzImage");
    std::fs::write(&p, bzimage(&lz4_legacy(&minimal_elf(64 << 10)))).unwrap();
    p
}

/// `kernel import` as a user runs it: a file that is not a kernel exits 2 (a usage error,
/// README's exit-status table) naming the file and what banger takes; a bzImage with its
/// config imports, and `kernel show` says which VMMs it suits, in text and `--json`.
#[test]
fn kernel_import_refuses_a_non_kernel_with_status_2_and_show_says_which_vmms_it_suits() {
    let tmp = tempfile::tempdir().unwrap();
    let home = Home::new(pulls::catalogs(tmp.path(), &[], &[]));
    let junk = tmp.path().join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("vmlinuz"), vec![0x5au8; 10_000]).unwrap();
    let out = home.banger(&["kernel", "import", "j", "--from", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "{} is not a kernel banger can use",
            junk.join("vmlinuz").display()
        )),
        "{err}"
    );
    assert!(
        err.contains("uncompressed x86-64 ELF vmlinux, or a bzImage"),
        "{err}"
    );

    let src = tmp.path().join("k");
    std::fs::create_dir_all(src.join("modules/6.1.0")).unwrap();
    std::fs::rename(tmp_bz(tmp.path()), src.join("vmlinuz")).unwrap();
    std::fs::write(src.join("initrd"), b"initrd").unwrap();
    std::fs::copy(
        "/boot/config-6.1.0-57-cloud-amd64",
        src.join("config"),
    )
    .or_else(|_| {
        // Another kernel version: Debian's options for these, as 6.1's cloud kernel has them.
        std::fs::write(
            src.join("config"),
            "CONFIG_VIRTIO_MMIO=m\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\nCONFIG_ACPI=y\nCONFIG_PCI=y\n\
             CONFIG_SERIAL_8250_CONSOLE=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_VIRTIO_NET=m\n\
             CONFIG_VIRTIO_VSOCKETS=m\nCONFIG_OVERLAY_FS=m\n",
        )
        .map(|_| 0)
    })
    .unwrap();
    let out = home.banger(&["kernel", "import", "cloud", "--from", src.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = home.banger(&["kernel", "show", "cloud"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("(bzImage (LZ4 (legacy frame) payload))"),
        "{shown}"
    );
    assert!(shown.contains("kernels/cloud/vmlinux\n"), "{shown}");
    assert!(
        shown.contains("  firecracker  yes: ELF vmlinux; virtio-mmio (module), devices from ACPI; serial console; virtio-blk (module); virtio-net (module); vsock transport (module); overlayfs (module)\n"),
        "{shown}"
    );
    assert!(
        shown.contains("  qemu         yes: bzImage; virtio-mmio (module)"),
        "{shown}"
    );
    let out = home.banger(&["kernel", "show", "cloud", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["fits"][0]["vmm"], "firecracker");
    assert_eq!(v["fits"][0]["fits"], true);
    assert!(
        v["vmlinux"]
            .as_str()
            .unwrap()
            .ends_with("kernels/cloud/vmlinux")
    );
    assert!(
        v["config"]
            .as_str()
            .unwrap()
            .ends_with("kernels/cloud/config")
    );
}

#[test]
fn pulls_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let img = pulls::image_bundle(tmp.path(), "k1");
    let ker = pulls::kernel_bundle(tmp.path());
    let server = FileServer::start();
    let iu = server.put(
        "/deb.tar.zst",
        Serve::Slow(img.clone(), std::time::Duration::from_millis(300)),
    );
    let ku = server.put("/k1.tar.zst", Serve::Body(ker.clone()));
    let home = Home::new(pulls::catalogs(
        tmp.path(),
        &[("deb", &iu, &img, "k1")],
        &[("k1", &ku, &ker)],
    ));

    let out = home.banger(&["image", "list", "--available", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "deb");
    assert_eq!(v[0]["kernel_ref"], "k1");
    let out = home.banger(&["kernel", "list", "--available"]);
    assert!(text(&out.stdout).contains("k1"), "{}", text(&out.stdout));

    // Piped: the name and nothing else.
    let out = home.banger(&["image", "pull", "deb"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "deb\n");
    assert_eq!(text(&out.stderr), "", "nothing extra when piped");

    // On a terminal: stages and a progress bar on stderr.
    let banger = env!("CARGO_BIN_EXE_banger");
    let out = home
        .cmd(Path::new("script"))
        .args([
            "-qefc",
            &format!("{banger} image pull deb --name deb2"),
            "/dev/null",
        ])
        .output()
        .unwrap();
    let screen = text(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("\u{2022} download"), "{screen}");
    assert!(
        screen.contains('%') && screen.contains("] "),
        "a bar: {screen:?}"
    );
    assert!(screen.contains("deb2"), "{screen}");

    let out = home.banger(&["kernel", "pull", "k1", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(k["name"], "k1");
    assert!(k["initrd"].as_str().unwrap().ends_with("kernels/k1/initrd"));

    let out = home.banger(&["image", "pull", "nosuch"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("available: deb"),
        "{}",
        text(&out.stderr)
    );
    let out = home.banger(&["image", "pull", "deb"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "exists already: {}",
        text(&out.stderr)
    );

    let out = home.banger(&["image", "cache", "list", "--json"]);
    assert_eq!(text(&out.stdout).trim(), "[]");
    let out = home.banger(&["image", "cache", "prune"]);
    assert!(
        text(&out.stdout).contains("removed 0 blobs"),
        "{}",
        text(&out.stdout)
    );
    let out = home.banger(&["image", "ls"]);
    let listed = text(&out.stdout);
    assert!(
        listed.contains("deb ") && listed.contains("deb2"),
        "{listed}"
    );
}

#[test]
fn make_bundle_builds_bundles_that_pull() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // A root filesystem tar as `docker export` gives one.
    let rootfs = pulls::layer(&[
        pulls::E::dir("etc"),
        pulls::E::file("etc/hello", b"golden\n"),
        pulls::E::file(".dockerenv", b""),
        pulls::E::dir("usr"),
        pulls::E::dir("usr/bin"),
        pulls::E::file("usr/bin/sudo", b"s").mode(0o4755),
        pulls::E::dir("home"),
        pulls::E::dir("home/dev").owner(1000, 1000),
    ]);
    std::fs::write(t.join("rootfs.tar"), &rootfs).unwrap();
    let guest = t.join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    // Small static ELFs (guest binaries must be static), told apart by their length.
    let init = banger_actors::kernel_format::fixture::minimal_elf(4096);
    std::fs::write(guest.join("banger-init"), &init).unwrap();
    std::fs::write(
        guest.join("banger-agent"),
        banger_actors::kernel_format::fixture::minimal_elf(8192),
    )
    .unwrap();
    let kdir = t.join("kernel");
    std::fs::create_dir_all(kdir.join("modules/6.1/kernel")).unwrap();
    std::fs::write(kdir.join("vmlinuz"), std::fs::read(tmp_bz(t)).unwrap()).unwrap();
    std::fs::write(kdir.join("modules/6.1/kernel/a.ko"), b"ko").unwrap();
    std::os::unix::fs::symlink("/usr/src/linux", kdir.join("modules/6.1/build")).unwrap();

    let banger = Path::new(env!("CARGO_BIN_EXE_banger"));
    let make = |args: &[&str]| {
        let out = Command::new(banger)
            .args(["internal", "make-bundle", "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, text(&out.stderr))
    };
    let img_out = t.join("golden.tar.zst");
    let (img, _) = make(&[
        "--rootfs-tar",
        t.join("rootfs.tar").to_str().unwrap(),
        "--name",
        "golden",
        "--kernel-ref",
        "k",
        "--guest-dir",
        guest.to_str().unwrap(),
        "--out",
        img_out.to_str().unwrap(),
    ]);
    let k_out = t.join("k.tar.zst");
    let (ker, notes) = make(&[
        "--kernel-dir",
        kdir.to_str().unwrap(),
        "--out",
        k_out.to_str().unwrap(),
    ]);
    assert!(notes.contains("left out modules/6.1/build"), "{notes}");
    let img_bytes = std::fs::read(&img_out).unwrap();
    let k_bytes = std::fs::read(&k_out).unwrap();
    assert_eq!(img["sha256"], pulls::sha256(&img_bytes));
    assert_eq!(img["size"], img_bytes.len());
    assert_eq!(ker["sha256"], pulls::sha256(&k_bytes));

    let server = FileServer::start();
    let iu = server.put("/golden.tar.zst", Serve::Body(img_bytes.clone()));
    let ku = server.put("/k.tar.zst", Serve::Body(k_bytes.clone()));
    let home = Home::new(pulls::catalogs(
        t,
        &[("golden", &iu, &img_bytes, "k")],
        &[("k", &ku, &k_bytes)],
    ));
    let out = home.banger(&["image", "pull", "golden", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["kernel"], "k");
    let rootfs = PathBuf::from(info["rootfs"].as_str().unwrap());
    assert_eq!(pulls::ext4_cat(&rootfs, "/etc/hello"), b"golden\n");
    assert_eq!(
        pulls::ext4_cat(&rootfs, "/usr/lib/banger/banger-init"),
        init
    );
    let tree = pulls::ext4_tree(&rootfs);
    assert!(!tree.contains_key(".dockerenv"));
    assert_eq!(tree["usr/bin/sudo"].mode, 0o104755);
    assert_eq!((tree["home/dev"].uid, tree["home/dev"].gid), (1000, 1000));
    let out = home.banger(&["kernel", "pull", "k", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(k["kernel"].as_str().unwrap().ends_with("kernels/k/vmlinuz"));
    assert!(
        k["modules"]
            .as_str()
            .unwrap()
            .ends_with("kernels/k/modules")
    );
}
