//! The VM lifecycle through the daemon's RPC with the Firecracker driver, against the
//! jailer+firecracker test double (`banger-fc-double`, built with banger-actors' tests):
//! fast, no guest, every API request checked against Firecracker's published spec.

mod support;

use std::time::Duration;

use banger_actors::kernel_format::fixture::{bzimage, lz4_legacy, minimal_elf};
use banger_api::{
    CreateVm, ImageRpcClient, ImportKernel, KernelRpcClient, LogEvent, Progress, RegisterImage,
    SetVm, VmRpcClient, VmState, codes,
};
use jsonrpsee::async_client::Client;
use jsonrpsee::core::client::Error as ClientError;

use support::Streamed;
use support::fc::{EXEC_NAME, Exec, double_bin};

async fn setup() -> (support::TestDaemon, Client, tempfile::TempDir) {
    setup_with(None, 0).await
}

/// `fail`: a fault for the double (`PATH:STATUS:MESSAGE`), injected through a wrapper
/// script since the daemon's environment is not the test's to change.
async fn setup_with(
    fail: Option<&str>,
    agent_timeout_secs: u64,
) -> (support::TestDaemon, Client, tempfile::TempDir) {
    let env = fail.map(|fault| format!("BANGER_FC_DOUBLE_FAIL='{fault}'"));
    setup_in(env.as_deref(), agent_timeout_secs, None).await
}

/// A double whose guest runs a banger agent (`Health`, `Shutdown`), waited for at start.
async fn setup_with_agent() -> (support::TestDaemon, Client, tempfile::TempDir) {
    setup_in(Some("BANGER_FC_DOUBLE_GUEST_AGENT=1"), 10, None).await
}

/// Without a helper (`netns` None) Firecracker runs unjailed: `firecracker` is the double
/// itself (a hard link, under Firecracker's name). With one, the double is the jailer and
/// `firecracker` only the exec file it copies into each jail (a script that runs the double, which is 150 MB).
/// `env`: environment assignments for the double (`NAME='value' ...`), set through a
/// wrapper script (as Firecracker, or as the jailer) since the daemon's environment is not
/// the test's to change.
async fn setup_in(
    env: Option<&str>,
    agent_timeout_secs: u64,
    netns: Option<&str>,
) -> (support::TestDaemon, Client, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let files = tempfile::tempdir().unwrap();
    let f = files.path();
    let exec = if netns.is_some() {
        Exec::Script
    } else {
        Exec::Double
    };
    let fx = support::fc::Files::new(f, exec);
    let versioned = fx.versioned.clone();
    let script = |name: &str, text: String| {
        let script = f.join(name);
        std::fs::write(&script, text).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    };
    let (jailer, firecracker) = match (env, netns) {
        (None, _) => (double_bin(), fx.firecracker.clone()),
        // Run as Firecracker (its name in argv[0]) with `env` in its environment.
        (Some(env), None) => (
            double_bin(),
            script(
                "firecracker-with-env",
                format!(
                    "#!/bin/bash\n{env} exec -a \"$0\" {} \"$@\"\n",
                    versioned.display()
                ),
            ),
        ),
        // The jailer clears the environment before exec: the double reads `env` as the
        // jailer, at its start. The exec file gets it too, for what it says when run
        // itself (`firecracker --version`: the release the double plays).
        (Some(env), Some(_)) => (
            {
                std::fs::write(
                    &versioned,
                    format!(
                        "#!/bin/bash\n{env} exec -a firecracker '{}' \"$@\"\n",
                        double_bin().display()
                    ),
                )
                .unwrap();
                script(
                    "jailer",
                    format!("#!/bin/sh\n{env} exec {} \"$@\"\n", double_bin().display()),
                )
            },
            fx.firecracker.clone(),
        ),
    };
    let mut config = support::test_config();
    config.firecracker.jailer = jailer;
    config.firecracker.binary = firecracker;
    config.stop_timeout_secs = 5;
    // The double has no guest, hence no agent: 0 does not wait for one.
    config.agent_timeout_secs = agent_timeout_secs;
    let d = match netns {
        None => support::TestDaemon::start_with(tempfile::tempdir().unwrap(), config).await,
        Some(ns) => {
            config.vm_defaults.network = Some(true);
            support::TestDaemon::start_in_netns(tempfile::tempdir().unwrap(), config, ns).await
        }
    };
    let c = d.client().await;
    fx.register(&c).await;
    (d, c, files)
}

async fn create(c: &Client, req: CreateVm) -> Result<Vec<Progress>, (i32, String)> {
    let mut sub = c.create(req).await.unwrap();
    let mut events = Vec::new();
    while let Some(ev) = sub.next().await {
        let ev = ev.unwrap();
        let end = matches!(ev, Progress::Done { .. } | Progress::Failed { .. });
        if let Progress::Failed { code, message } = &ev {
            return Err((*code, message.clone()));
        }
        events.push(ev);
        if end {
            break;
        }
    }
    Ok(events)
}

/// `vm start`, to its end: the VM as it ended, or the failure.
async fn start(c: &Client, vm: &str) -> Result<banger_api::VmInfo, (i32, String)> {
    let mut sub = c.start(vm.into()).await.unwrap();
    while let Some(ev) = sub.next().await {
        match ev.unwrap() {
            Progress::Done { vm } => return Ok(vm),
            Progress::Failed { code, message } => return Err((code, message)),
            _ => {}
        }
    }
    panic!("the start of {vm} ended without an answer")
}

fn code(e: ClientError) -> i32 {
    match e {
        ClientError::Call(o) => o.code(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_with_the_firecracker_double() {
    let (d, c, _files) = setup().await;
    let req = CreateVm {
        name: Some("fc".into()),
        image: Some("img".into()),
        vcpu: Some(2),
        memory_mib: Some(256),
        disk_bytes: Some(1 << 30),
        ..Default::default()
    };
    let events = create(&c, req.clone()).await.unwrap();
    let stages: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Progress::Stage { stage, .. } => Some(stage.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(stages, ["disks", "jail", "launch", "configure", "boot"]);
    assert!(matches!(&events[0], Progress::Created { vm } if vm.name == "fc" && vm.spec.vcpu == 2));
    let vm = VmRpcClient::show(&c, "fc".into()).await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    let id = vm.id.clone();
    // No privileged helper: Firecracker runs unjailed (the jailer needs root), a plain
    // child of bangerd, and `vm show` and the daemon's status say so.
    let isolation = vm.isolation.clone().unwrap_or_default();
    assert!(
        isolation.starts_with("unjailed: no privileged helper"),
        "{isolation}"
    );
    let status = banger_api::DaemonRpcClient::status(&c).await.unwrap();
    let fc = status.firecracker.unwrap();
    assert!(!fc.jailed && fc.isolation == isolation, "{fc:?}");

    // A duplicate name is refused; so is starting a running VM.
    assert_eq!(
        create(&c, req.clone()).await.unwrap_err().0,
        codes::CONFLICT
    );
    let mut sub = c.start("fc".into()).await.unwrap();
    assert!(matches!(
        sub.next().await.unwrap().unwrap(),
        Progress::Failed {
            code: codes::CONFLICT,
            ..
        }
    ));

    // The console (the double's serial output) is captured and followable.
    let log = c.logs("fc".into(), None).await.unwrap();
    assert!(log.contains("banger-fc-double: guest running"), "{log}");
    let mut follow = c.logs_follow("fc".into()).await.unwrap();
    match follow.next().await.unwrap().unwrap() {
        LogEvent::Data { text } => assert!(text.contains("guest running")),
        other => panic!("{other:?}"),
    }

    // Graceful stop: SendCtrlAltDel, the double exits, the follower gets its end.
    let stopped = c.stop("fc".into(), None).await.unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), follow.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            LogEvent::End { state } => {
                assert_eq!(state, VmState::Stopped);
                break;
            }
            LogEvent::Data { .. } => {}
        }
    }
    let jail = d.dir.path().join("data/jail").join(EXEC_NAME).join(&id);
    assert!(
        !jail.exists(),
        "the jail is removed once firecracker is gone"
    );

    // Resize while stopped, then start again (a new jail) and kill it.
    let set = c
        .set(SetVm {
            vm: "fc".into(),
            vcpu: Some(1),
            disk_bytes: Some(2 << 30),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(set.spec.vcpu, 1);
    let mut sub = c.start("fc".into()).await.unwrap();
    loop {
        match sub.next().await.unwrap().unwrap() {
            Progress::Done { vm } => {
                assert_eq!(vm.state, VmState::Running);
                break;
            }
            Progress::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    let killed = c.kill("fc".into(), None).await.unwrap();
    assert_eq!(killed.state, VmState::Stopped);

    // Unknown names, a bad signal, deleting, pruning.
    assert_eq!(
        code(VmRpcClient::show(&c, "nope".into()).await.unwrap_err()),
        codes::NOT_FOUND
    );
    let mut sub = c.start("fc".into()).await.unwrap();
    while let Some(Ok(ev)) = sub.next().await {
        if matches!(ev, Progress::Done { .. }) {
            break;
        }
    }
    assert_eq!(
        code(
            c.kill("fc".into(), Some("SIGNOPE".into()))
                .await
                .unwrap_err()
        ),
        codes::INVALID_ARGUMENT
    );
    assert_eq!(
        code(
            VmRpcClient::delete(&c, "fc".into(), false)
                .await
                .unwrap_err()
        ),
        codes::CONFLICT
    );
    let gone = VmRpcClient::delete(&c, "fc".into(), true).await.unwrap();
    assert_eq!(gone.name, "fc");
    assert!(!d.dir.path().join("data/vms").join(&id).exists());
    assert!(
        !d.dir
            .path()
            .join("data/jail")
            .join(EXEC_NAME)
            .join(&id)
            .exists()
    );
    assert!(VmRpcClient::list(&c).await.unwrap().is_empty());

    create(
        &c,
        CreateVm {
            name: Some("p1".into()),
            image: Some("img".into()),
            no_start: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let pruned = c.prune(false).await.unwrap();
    assert_eq!(pruned.deleted, ["p1"]);
    drop(c);
    d.shutdown().await;
}

/// `kernel import` of a bzImage (an LZ4 payload, as Debian's vmlinuz): kept as `vmlinuz`
/// for QEMU, converted to `vmlinux` for Firecracker, and a Firecracker VM of it boots: the
/// double loads the kernel at InstanceStart as Firecracker's ELF loader does, so handing it
/// the bzImage would fail the start with `Invalid Elf magic number`. `kernel show` says
/// which VMMs it suits from its config. Files that are not kernels are refused, as usage
/// errors, and leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_bzimage_boots_under_firecracker_as_its_elf() {
    let (d, c, files) = setup().await;
    let elf = minimal_elf(256 << 10);
    let src = files.path().join("bz");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("vmlinuz"), bzimage(&lz4_legacy(&elf))).unwrap();
    std::fs::write(
        src.join("config"),
        "CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\nCONFIG_SERIAL_8250_CONSOLE=y\n\
         CONFIG_VIRTIO_BLK=y\nCONFIG_VIRTIO_NET=y\nCONFIG_VIRTIO_VSOCKETS=y\n# CONFIG_OVERLAY_FS is not set\n",
    )
    .unwrap();
    let k = c
        .import(ImportKernel {
            name: "bz".into(),
            from: src.display().to_string(),
        })
        .await
        .unwrap();
    let kdir = d.dir.path().join("data/kernels/bz");
    assert_eq!(k.kernel, kdir.join("vmlinuz").display().to_string());
    assert_eq!(k.vmlinux, Some(kdir.join("vmlinux").display().to_string()));
    assert_eq!(
        k.format.as_deref(),
        Some("bzImage (LZ4 (legacy frame) payload)")
    );
    assert_eq!(std::fs::read(kdir.join("vmlinux")).unwrap(), elf);
    assert_eq!(
        std::fs::read(kdir.join("vmlinuz")).unwrap(),
        std::fs::read(src.join("vmlinuz")).unwrap()
    );
    let shown = KernelRpcClient::show(&c, "bz".into()).await.unwrap();
    assert_eq!(shown, k);
    assert_eq!(shown.fits.len(), 2);
    for fit in &shown.fits {
        assert_eq!(fit.fits, Some(false), "{fit:?}");
        assert_eq!(
            fit.reasons,
            ["overlayfs: CONFIG_OVERLAY_FS is not set"],
            "{fit:?}"
        );
    }

    c.register(RegisterImage {
        name: "bzimg".into(),
        rootfs: files.path().join("rootfs.ext4").display().to_string(),
        kernel: Some("bz".into()),
    })
    .await
    .unwrap();
    create(
        &c,
        CreateVm {
            name: Some("bzvm".into()),
            image: Some("bzimg".into()),
            vmm: Some(banger_api::VmmChoice::Firecracker),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|(code, msg)| panic!("{code}: {msg}"));
    let vm = VmRpcClient::show(&c, "bzvm".into()).await.unwrap();
    assert_eq!(vm.state, VmState::Running, "{:?}", vm.error);
    let jail = d.dir.path().join("data/jail").join(EXEC_NAME).join(&vm.id);
    assert_eq!(
        std::fs::read(jail.join("root/vmlinux")).unwrap(),
        elf,
        "Firecracker was given the ELF"
    );
    VmRpcClient::delete(&c, "bzvm".into(), true).await.unwrap();

    // Not kernels: random bytes, a truncated bzImage. Refused naming the file; nothing kept.
    let whole = bzimage(&lz4_legacy(&elf));
    let noise: Vec<u8> = (0..50_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (name, bytes, want) in [
        ("noise", noise, "neither an ELF vmlinux"),
        (
            "cut",
            whole[..whole.len() / 2].to_vec(),
            "a truncated bzImage",
        ),
    ] {
        let dir = files.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinuz"), bytes).unwrap();
        let e = c
            .import(ImportKernel {
                name: name.into(),
                from: dir.display().to_string(),
            })
            .await
            .unwrap_err();
        let ClientError::Call(obj) = e else {
            panic!("{e:?}")
        };
        assert_eq!(
            obj.code(),
            codes::INVALID_ARGUMENT,
            "{name}: {}",
            obj.message()
        );
        let msg = obj.message();
        assert!(
            msg.contains(&dir.join("vmlinuz").display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains(want) && msg.contains("uncompressed x86-64 ELF vmlinux"),
            "{msg}"
        );
        assert!(!d.dir.path().join("data/kernels").join(name).exists());
    }
    let left: Vec<_> = std::fs::read_dir(d.dir.path().join("data/kernels"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left.len(), 2, "only k and bz: {left:?}");
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_api_request_leaves_the_vm_in_error_with_the_reason() {
    let (d, c, _files) = setup_with(Some("/boot-source:400:Boot source error: injected"), 0).await;
    let err = create(
        &c,
        CreateVm {
            name: Some("bad".into()),
            image: Some("img".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.1.contains("failed to start") && err.1.contains("console log"),
        "{}",
        err.1
    );
    let vm = VmRpcClient::show(&c, "bad".into()).await.unwrap();
    assert_eq!(vm.state, VmState::Error);
    let why = vm.error.unwrap();
    assert!(
        why.contains("/boot-source") && why.contains("injected"),
        "{why}"
    );
    assert!(vm.pid.is_none());
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_waiting_for_its_agent_can_be_stopped_and_the_create_says_why() {
    // With an agent wait, a guest whose agent never answers stays `starting`...
    let (d, c, _files) = setup_with(None, 60).await;
    let c2 = d.client().await;
    let create = tokio::spawn(async move {
        create(
            &c2,
            CreateVm {
                name: Some("slow".into()),
                image: Some("img".into()),
                ..Default::default()
            },
        )
        .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(vm) = VmRpcClient::show(&c, "slow".into()).await
            && vm.state == VmState::Starting
            && vm.pid.is_some()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reached `starting` with a VMM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and a stop then ends it (through the VMM: there is no agent to ask).
    let stopped = tokio::time::timeout(Duration::from_secs(20), c.stop("slow".into(), Some(3)))
        .await
        .expect("stop does not hang")
        .unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    let err = create.await.unwrap().unwrap_err();
    assert!(
        err.1.contains("vm slow was stopped while it was starting") && err.0 == codes::CONFLICT,
        "{err:?}"
    );
    drop(c);
    d.shutdown().await;
}

/// A VMM that dies while its guest boots (here SIGKILLed, as the OOM killer would): the
/// create says so with the console's last lines (the guest's, or the VMM's own stderr),
/// not only "see the logs".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_dies_while_booting_fails_the_create_with_the_consoles_last_lines() {
    let (d, c, _files) = setup_with(None, 60).await;
    let c2 = d.client().await;
    let create = tokio::spawn(async move {
        create(
            &c2,
            CreateVm {
                name: Some("dies".into()),
                image: Some("img".into()),
                ..Default::default()
            },
        )
        .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Ok(vm) = VmRpcClient::show(&c, "dies".into()).await
            && vm.state == VmState::Starting
            && let Some(pid) = vm.pid
        {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reached `starting` with a VMM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The double has booted its guest model when it says so on the console
    // (`double::process::GUEST_RUNNING`).
    const GUEST_RUNNING: &str = "banger-fc-double: guest running";
    let vm = VmRpcClient::show(&c, "dies".into()).await.unwrap();
    let console = std::path::PathBuf::from(&vm.console_log);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains(GUEST_RUNNING)
    {
        assert!(std::time::Instant::now() < deadline, "the guest never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let err = create.await.unwrap().unwrap_err();
    assert!(
        err.1
            .contains("vm dies exited while it was booting (the console's last lines: ")
            && err.1.contains(GUEST_RUNNING),
        "{}",
        err.1
    );
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_firecracker_by_a_guest_reboot_not_a_kill() {
    // Firecracker lives on after a guest power-off and exits only on a guest reboot: a
    // stop that asked the agent to power off would wait out stop_timeout and SIGKILL.
    let (d, c, _files) = setup_with_agent().await;
    create(
        &c,
        CreateVm {
            name: Some("rb".into()),
            image: Some("img".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let vm = VmRpcClient::show(&c, "rb".into()).await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.error, None, "the double's agent answered");
    let stopped = c.stop("rb".into(), None).await.unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    // The guest rebooted (so the process exited by itself), it never powered off.
    let log = c.logs("rb".into(), None).await.unwrap();
    assert!(log.contains("reboot: Restarting system"), "{log}");
    assert!(!log.contains("reboot: Power down"), "{log}");
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poweroff_in_the_guest_is_noticed_although_firecracker_lives_on() {
    let (d, c, _files) = setup_with_agent().await;
    create(
        &c,
        CreateVm {
            name: Some("po".into()),
            image: Some("img".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let vm = VmRpcClient::show(&c, "po".into()).await.unwrap();
    let pid = vm.pid.expect("running");
    // SIGUSR1 is the double's `poweroff` typed in the guest: the guest halts, the process
    // stays.
    c.kill("po".into(), Some("SIGUSR1".into())).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let vm = loop {
        let vm = VmRpcClient::show(&c, "po".into()).await.unwrap();
        if vm.state != VmState::Running {
            break vm;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a halted guest is still shown as running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(vm.state, VmState::Stopped);
    assert_eq!(
        vm.pid, None,
        "the halted VM's firecracker (pid {pid}) was ended"
    );
    let log = c.logs("po".into(), None).await.unwrap();
    assert!(log.contains("reboot: Power down"), "{log}");
    drop(c);
    d.shutdown().await;
}

/// `vm run --rm --ttl`: when the time is up the daemon deletes the VM (its process, its
/// directory, its record), as E2B ends a sandbox at its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_with_delete_removes_the_vm_when_it_is_up() {
    let (d, c, _files) = setup().await;
    create(
        &c,
        CreateVm {
            name: Some("brief".into()),
            image: Some("img".into()),
            ttl: Some(banger_api::Ttl {
                secs: 1,
                delete: true,
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let vm = VmRpcClient::show(&c, "brief".into()).await.unwrap();
    assert_eq!(vm.expires.map(|e| e.delete), Some(true), "{vm:?}");
    let pid = vm.pid.expect("running");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !VmRpcClient::list(&c).await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM outlived its ttl"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !std::path::Path::new(&vm.dir).exists(),
        "its directory is gone"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "its firecracker (pid {pid}) is gone"
    );
    drop(c);
    d.shutdown().await;
}

/// A deadline that passes while the VM is still starting (here: a guest whose agent never
/// answers, waited for 2 s, and a ttl of 1 s) does not cut the start short: the start
/// ends as it would have (running, with the agent's error), and the VM is stopped once it
/// is up, the deadline spent. (Before, the create failed "stopped while it was starting".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_that_passes_during_the_start_stops_the_vm_once_it_is_up() {
    let (d, c, _files) = setup_with(None, 2).await;
    let t0 = std::time::Instant::now();
    let (_, message) = create(
        &c,
        CreateVm {
            name: Some("late".into()),
            image: Some("img".into()),
            ttl: Some(banger_api::Ttl {
                secs: 1,
                delete: false,
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        t0.elapsed() > Duration::from_secs(1),
        "the start outlasted the ttl"
    );
    assert!(
        message.contains("vm late runs, but its guest agent did not answer"),
        "the start ends as without a ttl: {message}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let vm = VmRpcClient::show(&c, "late".into()).await.unwrap();
        if vm.state == VmState::Stopped {
            assert!(vm.expires.is_none(), "spent: {vm:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not stopped after its ttl: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(c);
    d.shutdown().await;
}

/// The Firecracker API socket of a running VM (beside its vsock socket, in its root).
fn api_socket(vm: &banger_api::VmInfo) -> std::path::PathBuf {
    let vsock = std::path::Path::new(vm.vsock_socket.as_deref().expect("running"));
    vsock.with_file_name(banger_actors::vmm::firecracker::API_SOCK)
}

/// The VM once the daemon that just started has re-adopted it: until then `vm show`
/// answers its stored record with `adopting` (the daemon serves before re-adoption), and
/// the stored state is not what the VMM says (a VM resumed behind the daemon's back).
async fn adopted(c: &Client, vm: &str) -> banger_api::VmInfo {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = VmRpcClient::show(c, vm.into()).await.unwrap();
        if !v.adopting {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still adopting: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /`'s `state`: what Firecracker itself says.
async fn instance_state(vm: &banger_api::VmInfo) -> String {
    let mut api = banger_actors::vmm::firecracker::Api::connect(&api_socket(vm))
        .await
        .unwrap();
    let info = api.call("GET", "/", None).await.unwrap().unwrap();
    info["state"].as_str().unwrap().to_owned()
}

async fn agent_health(vm: &banger_api::VmInfo) -> Result<(), String> {
    let sock = std::path::Path::new(vm.vsock_socket.as_deref().expect("running"));
    banger_guest::host::call(
        sock,
        &banger_guest::proto::Request::Health,
        Duration::from_secs(60),
    )
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_the_guest_through_patch_vm_survives_a_daemon_restart_and_resume_brings_it_back()
 {
    let (d, c, _files) = setup_with_agent().await;
    for (name, no_start) in [("pz", false), ("idle", true)] {
        create(
            &c,
            CreateVm {
                name: Some(name.into()),
                image: Some("img".into()),
                no_start,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    // Only a running VM pauses.
    let e = c.pause("idle".into()).await.unwrap_err();
    let ClientError::Call(o) = e else { panic!() };
    assert_eq!(o.code(), codes::CONFLICT);
    assert!(
        o.message().contains("is not running (created)"),
        "{}",
        o.message()
    );
    assert_eq!(
        code(c.resume("idle".into()).await.unwrap_err()),
        codes::CONFLICT
    );
    // A resume of a running VM changes nothing.
    assert_eq!(c.resume("pz".into()).await.unwrap().state, VmState::Running);

    let vm = c.pause("pz".into()).await.unwrap();
    assert_eq!(vm.state, VmState::Paused);
    assert_eq!(instance_state(&vm).await, "Paused", "Firecracker paused it");
    assert_eq!(
        VmRpcClient::show(&c, "pz".into()).await.unwrap().state,
        VmState::Paused
    );
    let listed = VmRpcClient::list(&c).await.unwrap();
    assert_eq!(
        listed.iter().find(|v| v.name == "pz").unwrap().state,
        VmState::Paused
    );
    // Again: a no-op success.
    assert_eq!(c.pause("pz".into()).await.unwrap().state, VmState::Paused);
    // The frozen guest's agent does not answer: Firecracker's muxer drops the connection.
    let e = agent_health(&vm).await.unwrap_err();
    assert!(e.contains("refused"), "{e}");
    // What needs the guest says it is paused and how to get it back.
    let e = c.ports("pz".into()).await.unwrap_err();
    let ClientError::Call(o) = e else { panic!() };
    assert_eq!(
        (o.code(), o.message()),
        (codes::CONFLICT, "vm pz is paused; `banger vm resume pz`")
    );
    let mut start = c.start("pz".into()).await.unwrap();
    match start.next().await.unwrap().unwrap() {
        Progress::Failed { code, message } => {
            assert_eq!(code, codes::CONFLICT);
            assert!(message.contains("`banger vm resume pz`"), "{message}");
        }
        other => panic!("a paused VM started: {other:?}"),
    }
    assert_eq!(
        code(
            VmRpcClient::delete(&c, "pz".into(), false)
                .await
                .unwrap_err()
        ),
        codes::CONFLICT
    );

    // A restarted daemon asks Firecracker: still paused, the same process.
    drop(c);
    let d = d.restart().await;
    let c = d.client().await;
    let again = adopted(&c, "pz").await;
    assert_eq!((again.state, again.pid), (VmState::Paused, vm.pid));

    // Resumed behind the daemon's back while it is down: it takes Firecracker's word, not
    // its record's.
    drop(c);
    let config = d.config();
    let dir = d.shutdown_released().await;
    let mut api = banger_actors::vmm::firecracker::Api::connect(&api_socket(&vm))
        .await
        .unwrap();
    api.call(
        "PATCH",
        "/vm",
        Some(&serde_json::json!({"state": "Resumed"})),
    )
    .await
    .unwrap();
    let d = support::TestDaemon::start_with(dir, config).await;
    let c = d.client().await;
    let vm = adopted(&c, "pz").await;
    assert_eq!(vm.state, VmState::Running);
    agent_health(&vm).await.expect("the resumed guest answers");

    // Paused, then stopped: resumed first, so the guest reboots (Firecracker's way out)
    // instead of waiting out stop_timeout for a kill.
    c.pause("pz".into()).await.unwrap();
    let stopped = c.stop("pz".into(), Some(60)).await.unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    let log = c.logs("pz".into(), None).await.unwrap();
    assert!(log.contains("reboot: Restarting system"), "{log}");
    // A paused VM is killed as it is.
    let mut start = c.start("pz".into()).await.unwrap();
    loop {
        match start.next().await.unwrap().unwrap() {
            Progress::Done { vm } => break assert_eq!(vm.state, VmState::Running),
            Progress::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    c.pause("pz".into()).await.unwrap();
    let deleted = VmRpcClient::delete(&c, "pz".into(), true).await.unwrap();
    assert_eq!(deleted.name, "pz");
    drop(c);
    d.shutdown().await;
}

/// `dig` against the daemon's resolver: (status, answer addresses).
fn dig(port: u16, name: &str) -> (String, Vec<String>) {
    let out = std::process::Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            name,
            "A",
            "+time=2",
            "+tries=1",
        ])
        .output()
        .expect("dig (dnsutils, installed by scripts/rig/setup.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in dig output:\n{text}"))
        .to_owned();
    let answers = text
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect();
    (status, answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_vm_names_in_dns() {
    use banger_api::DaemonRpcClient;
    let (d, c, _files) = setup().await;
    let port: u16 = c
        .status()
        .await
        .unwrap()
        .dns
        .expect("resolver listening")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // 20 VMs created concurrently: 20 distinct addresses in the subnet.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let socket = d.socket.clone();
        tasks.push(tokio::spawn(async move {
            let c = support::client_for(&socket).await;
            create(
                &c,
                CreateVm {
                    name: Some(format!("n{i}")),
                    image: Some("img".into()),
                    // A lease comes with a network; not started, so no tap is needed.
                    network: Some(true),
                    no_start: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let vms = VmRpcClient::list(&c).await.unwrap();
    let ips: std::collections::HashSet<String> =
        vms.iter().map(|v| v.ip.clone().unwrap()).collect();
    assert_eq!(ips.len(), 20, "distinct leases");
    assert!(
        ips.iter()
            .all(|ip| ip.starts_with("172.30.0.") && ip != "172.30.0.1")
    );

    // dig answers from the VM table.
    let n3 = vms
        .iter()
        .find(|v| v.name == "n3")
        .unwrap()
        .ip
        .clone()
        .unwrap();
    assert_eq!(dig(port, "n3.vm"), ("NOERROR".into(), vec![n3.clone()]));
    assert_eq!(dig(port, "N3.VM.").1, vec![n3.clone()]);
    assert_eq!(dig(port, "ghost.vm").0, "NXDOMAIN");
    assert_eq!(dig(port, "example.com").0, "REFUSED");

    // Garbage, an oversized datagram and a flood do not stop it.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = format!("127.0.0.1:{port}");
    for i in 0..5_000u32 {
        let junk: Vec<u8> = (0..(i % 64))
            .map(|b| (b as u8).wrapping_mul(31) ^ i as u8)
            .collect();
        let _ = sock.send_to(&junk, &target).await;
    }
    let _ = sock.send_to(&vec![0xab; 60_000], &target).await;
    assert_eq!(dig(port, "n3.vm").1, vec![n3.clone()], "still answering");

    // Deleting releases the lease and the name; the next VM may take the address again.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let socket = d.socket.clone();
        tasks.push(tokio::spawn(async move {
            let c = support::client_for(&socket).await;
            VmRpcClient::delete(&c, format!("n{i}"), false)
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(VmRpcClient::list(&c).await.unwrap().is_empty());
    assert_eq!(dig(port, "n3.vm").0, "NXDOMAIN");
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_console_is_rotated_and_logs_still_show_it() {
    use std::io::Write;
    let (d, c, _files) = setup().await;
    create(
        &c,
        CreateVm {
            name: Some("chatty".into()),
            image: Some("img".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let vm = VmRpcClient::show(&c, "chatty".into()).await.unwrap();
    // Append like the VMM does (O_APPEND), past the 8 MiB cap, in one write: the rotation
    // then sees all of it or none (copy-truncate loses what lands between its copy and its
    // truncation).
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&vm.console_log)
        .unwrap();
    let mut chunk = Vec::with_capacity(9 << 20);
    for _ in 0..9 * 1024 {
        chunk.extend_from_slice(&[b'x'; 1023]);
        chunk.push(b'\n');
    }
    chunk.extend_from_slice(b"the last line\n");
    f.write_all(&chunk).unwrap();
    let old = format!("{}.1", vm.console_log);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Rotated: the old generation exists and the current one has been emptied.
    while !(std::path::Path::new(&old).exists()
        && std::fs::metadata(&vm.console_log).unwrap().len() < 1 << 20)
    {
        assert!(std::time::Instant::now() < deadline, "never rotated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.write_all(b"after the rotation\n").unwrap();
    let logs = c.logs("chatty".into(), None).await.unwrap();
    assert!(logs.contains("banger-fc-double: guest running") && logs.contains("the last line"));
    assert!(
        logs.ends_with("after the rotation\n"),
        "{}",
        &logs[logs.len() - 100..]
    );
    VmRpcClient::delete(&c, "chatty".into(), true)
        .await
        .unwrap();
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_helper_a_networked_vm_says_how_to_get_one() {
    let (d, c, _files) = setup().await;
    let err = create(
        &c,
        CreateVm {
            name: Some("net".into()),
            image: Some("img".into()),
            network: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.0, banger_api::codes::PERMISSION_DENIED, "{err:?}");
    assert!(err.1.contains("sudo banger system install"), "{}", err.1);
    assert!(err.1.contains("--no-network"), "{}", err.1);
    // --nat without a network is refused up front.
    let err = create(
        &c,
        CreateVm {
            name: Some("nat".into()),
            image: Some("img".into()),
            nat: true,
            network: Some(false),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.0, banger_api::codes::INVALID_ARGUMENT, "{err:?}");
    drop(c);
    d.shutdown().await;
}

/// As root: the daemon with its helper in a namespace this test makes. Twenty VMs (half
/// with --nat) started and deleted concurrently leave no tap, no nft rule, no lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_taps_and_nat_follow_twenty_concurrent_vms_in_a_netns() {
    let ns = support::Netns::new("fc20");
    let (d, c, _files) = setup_in(None, 0, Some(&ns.0)).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let socket = d.socket.clone();
        tasks.push(tokio::spawn(async move {
            let c = support::client_for(&socket).await;
            create(
                &c,
                CreateVm {
                    name: Some(format!("v{i}")),
                    image: Some("img".into()),
                    nat: i % 2 == 0,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let vms = VmRpcClient::list(&c).await.unwrap();
    assert_eq!(vms.len(), 20);
    let links = ns.sh("ip -o link show master banger0");
    for v in &vms {
        assert_eq!(v.state, VmState::Running, "{}", v.name);
        assert!(
            links.contains(&format!("bg-{}", v.id)),
            "tap of {}: {links}",
            v.name
        );
        let cmdline = v.cmdline.clone().unwrap();
        let ip = v.ip.clone().unwrap();
        assert!(cmdline.contains(&format!("banger.ip={ip}/24")), "{cmdline}");
        assert!(cmdline.contains("banger.gw=172.30.0.1"), "{cmdline}");
    }
    // Each VM is jailed in its own cgroup (the version this host has), limited by its
    // spec, holding its Firecracker.
    let cgroups = banger_policy::cgroup::detect_host();
    let mut vm_cgroups = Vec::new();
    for v in &vms {
        let isolation = v.isolation.clone().unwrap_or_default();
        assert!(
            isolation.starts_with("jailed by the helper's launcher as uid 2000"),
            "{isolation}"
        );
        for dir in cgroups.vm_dirs(&v.id) {
            let procs = std::fs::read_to_string(dir.join("tasks"))
                .or_else(|_| std::fs::read_to_string(dir.join("cgroup.procs")))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let pid = v.pid.unwrap().to_string();
            assert!(
                procs.lines().any(|l| l == pid),
                "{}: {procs}",
                dir.display()
            );
            vm_cgroups.push(dir);
        }
    }
    if !matches!(cgroups, banger_policy::cgroup::Layout::None { .. }) {
        assert_eq!(vm_cgroups.len() % 20, 0);
        assert!(!vm_cgroups.is_empty());
    }
    let rules = ns.sh("nft list table ip banger");
    assert_eq!(rules.matches("masquerade").count(), 10, "{rules}");
    let v0 = vms.iter().find(|v| v.name == "v0").unwrap();
    assert!(
        rules.contains(&format!("ip saddr {} ", v0.ip.clone().unwrap())),
        "{rules}"
    );
    assert_eq!(ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");

    // `vm set --no-nat` on a running VM drops its rule at once.
    VmRpcClient::set(
        &c,
        banger_api::SetVm {
            vm: "v0".into(),
            nat: Some(false),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let rules = ns.sh("nft list table ip banger");
    assert_eq!(rules.matches("masquerade").count(), 9, "{rules}");

    let mut tasks = Vec::new();
    for i in 0..20 {
        let socket = d.socket.clone();
        tasks.push(tokio::spawn(async move {
            let c = support::client_for(&socket).await;
            VmRpcClient::delete(&c, format!("v{i}"), true)
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        VmRpcClient::list(&c).await.unwrap().is_empty(),
        "no vm, no lease"
    );
    let links = ns.sh("ip -o link");
    assert!(!links.contains("bg-"), "no tap left: {links}");
    for dir in &vm_cgroups {
        assert!(!dir.exists(), "cgroup left: {}", dir.display());
    }
    let jails = std::fs::read_dir(d.dir.path().join("data/jail").join(EXEC_NAME))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(jails, 0, "no jail left");
    assert_eq!(ns.sh("nft list ruleset").trim(), "", "no nft rule left");
    assert_eq!(ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "0");
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_update_gate_refuses_while_a_vm_is_starting_unless_forced() {
    use banger_api::{UpdateGate, UpdateRpcClient};
    let (d, c, _files) = setup_with(None, 60).await;
    let gate = |force| UpdateGate {
        version: "9.9.9".into(),
        force,
    };
    // Nothing in flight: granted.
    assert!(c.gate(gate(false)).await.unwrap().in_flight.is_empty());
    let c2 = d.client().await;
    let create = tokio::spawn(async move {
        create(
            &c2,
            CreateVm {
                name: Some("busy".into()),
                image: Some("img".into()),
                ..Default::default()
            },
        )
        .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !VmRpcClient::show(&c, "busy".into())
        .await
        .is_ok_and(|vm| vm.state == VmState::Starting && vm.pid.is_some())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never reached `starting`"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Starting: refused with CONFLICT, naming the VM and saying how to proceed.
    let err = c.gate(gate(false)).await.unwrap_err();
    let ClientError::Call(obj) = err else {
        panic!("{err:?}")
    };
    assert_eq!(obj.code(), codes::CONFLICT);
    assert!(
        obj.message().contains("busy starting") && obj.message().contains("--force"),
        "{}",
        obj.message()
    );
    // Forced: granted, and the VMs in flight are reported.
    assert_eq!(
        c.gate(gate(true)).await.unwrap().in_flight,
        vec!["busy starting".to_owned()]
    );
    c.stop("busy".into(), Some(3)).await.unwrap();
    let _ = create.await;
    assert!(c.gate(gate(false)).await.unwrap().in_flight.is_empty());
    drop(c);
    d.shutdown().await;
}

fn proc_status(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| Some(l.strip_prefix(name)?.strip_prefix(':')?.trim().to_owned()))
        .unwrap_or_default()
}

/// As root, the real `bangerd` binary (in a namespace this test makes), as `sudo banger
/// system install` runs it: it forks its helper, drops to its owner (`nobody` here) with
/// no capability, and still runs Firecracker VMs: the helper's launcher starts the jailer
/// (the double, which drops to the owner as the jailer does), stop/kill/delete work, and
/// each jail the jailer made as root is removed through the helper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_bangerd_dropped_to_its_owner_runs_firecracker_vms_through_the_launcher() {
    const OWNER: u32 = 65534;
    let ns = support::Netns::new("fcown");
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let files = h.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let fx = support::fc::Files::new(&files, Exec::Script);
    fx.chown(OWNER);
    let config = format!(
        "owner = \"{OWNER}\"\ndefault_vmm = \"firecracker\"\nagent_timeout_secs = 0\n\
         stop_timeout_secs = 5\ndns_listen = \"127.0.0.1:0\"\n\
         [firecracker]\njailer = \"{}\"\nbinary = \"{}\"\n[vm_defaults]\nnetwork = true\n",
        double_bin().display(),
        fx.firecracker.display()
    );
    // The owner's own XDG directories, as in a user's home.
    let home_dirs = support::fc::Home::new(h, OWNER, &config);
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_bangerd")]);
    let daemon = home_dirs
        .spawn(cmd, &std::env::var_os("PATH").unwrap_or_default())
        .await;
    let socket = home_dirs.socket();
    // `ip netns exec` execs in place: the child is bangerd, now the owner with nothing.
    let pid = daemon.pid();
    assert_eq!(
        proc_status(pid, "Uid").split_whitespace().next(),
        Some("65534")
    );
    // No capability; the bounding set keeps SETUID, SETGID, DAC_OVERRIDE and SYS_ADMIN
    // only, for the setuid newuidmap/newgidmap of image builds.
    assert_eq!(proc_status(pid, "CapBnd"), "00000000002000c2");
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
    assert_eq!(proc_status(pid, "CapPrm"), "0000000000000000");

    let c = support::client_for(&socket).await;
    fx.register(&c).await;
    let req = |name: &str| CreateVm {
        name: Some(name.into()),
        image: Some("img".into()),
        ..Default::default()
    };
    create(&c, req("a")).await.unwrap();
    let a = VmRpcClient::show(&c, "a".into()).await.unwrap();
    assert_eq!(a.state, VmState::Running, "{:?}", a.error);
    let vm_pid = a.pid.unwrap() as u32;
    // Not bangerd's child: a process of bangerd's (its bounding set: what newuidmap needs) could not hold
    // these; the launcher's set, its filter, and the owner's uid after the jailer's drop.
    let want: u64 = [0u32, 1, 3, 27, 6, 7, 21, 18]
        .iter()
        .map(|b| 1u64 << b)
        .sum();
    assert_eq!(
        u64::from_str_radix(&proc_status(vm_pid, "CapBnd"), 16).unwrap(),
        want
    );
    assert_eq!(proc_status(vm_pid, "Seccomp"), "2");
    // Firecracker runs as the VM's own uid from the range: not root, not the owner.
    let vm_uid: u32 = proc_status(vm_pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (2_000_000_000..=2_000_065_535).contains(&vm_uid),
        "{vm_uid}"
    );
    let links = ns.sh("ip -o link show master banger0");
    assert!(links.contains(&format!("bg-{}", a.id)), "{links}");
    let jail = |id: &str| h.join("data/banger/jail").join(EXEC_NAME).join(id);
    assert!(jail(&a.id).join("root/api.sock").exists());
    // The jail's root/ is the VM uid's alone; bangerd (the owner, so the kernel checks)
    // reaches Firecracker through the sockets exposed beside it, 0660 to the owner.
    use std::os::unix::fs::MetadataExt;
    let meta = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap();
    let root = meta(&jail(&a.id).join("root"));
    assert_eq!((root.mode() & 0o777, root.uid()), (0o700, vm_uid));
    for s in ["api.sock", "vsock.sock"] {
        let m = meta(&jail(&a.id).join(s));
        assert_eq!((m.mode() & 0o777, m.uid()), (0o660, OWNER), "{s}");
    }
    assert_eq!(
        a.vsock_socket.as_deref(),
        Some(jail(&a.id).join("vsock.sock").to_str().unwrap())
    );
    // Its writable disks are its uid's while it runs; the image's rootfs stays the
    // owner's and unwritable to it.
    let vm_dir = h.join("data/banger/vms").join(&a.id);
    assert_eq!(meta(&vm_dir.join("overlay.ext4")).uid(), vm_uid);
    let rootfs = meta(&jail(&a.id).join("root/rootfs.ext4"));
    assert_eq!((rootfs.uid(), rootfs.mode() & 0o022), (OWNER, 0));

    // Graceful stop, then the jail (made by the jailer as root) is gone.
    let stopped = c.stop("a".into(), None).await.unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    assert!(!jail(&a.id).exists(), "jail left after stop");
    // The disks are the owner's again once the jail is gone.
    assert_eq!(meta(&vm_dir.join("overlay.ext4")).uid(), OWNER);
    assert_eq!(meta(&vm_dir.join("work.ext4")).uid(), OWNER);

    // Another one killed, then both deleted: nothing left.
    create(&c, req("b")).await.unwrap();
    let b = VmRpcClient::show(&c, "b".into()).await.unwrap();
    assert_eq!(b.state, VmState::Running, "{:?}", b.error);
    let b_uid = proc_status(b.pid.unwrap() as u32, "Uid");
    assert_ne!(
        b_uid.split_whitespace().next(),
        Some(vm_uid.to_string().as_str()),
        "each VM has a uid of its own"
    );
    // A stopped VM started again is jailed afresh (its old jail was cleared by the helper).
    let mut sub = c.start("a".into()).await.unwrap();
    loop {
        match sub.next().await.unwrap().unwrap() {
            Progress::Done { vm } => {
                assert_eq!(vm.state, VmState::Running, "{:?}", vm.error);
                break;
            }
            Progress::Failed { message, .. } => panic!("restart of a: {message}"),
            _ => {}
        }
    }
    assert_eq!(
        meta(&vm_dir.join("overlay.ext4")).uid(),
        vm_uid,
        "the same uid"
    );
    let killed = c.kill("b".into(), None).await.unwrap();
    assert_eq!(killed.state, VmState::Stopped);
    assert!(!jail(&b.id).exists(), "jail left after kill");
    for v in ["a", "b"] {
        VmRpcClient::delete(&c, v.into(), true).await.unwrap();
    }
    let links = ns.sh("ip -o link");
    assert!(!links.contains("bg-"), "{links}");
    drop(c);
    daemon.stop();
}

/// Not a test: `vm create` through the RPC until it is answered `done` (the double has
/// answered InstanceStart; no agent to wait for), N times in a row, jailed with per-VM
/// cgroups through the helper in a netns (with a tap each), and unjailed without a helper.
/// Prints p50/p90. Run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run explicitly"]
async fn root_bench_vm_create_control_plane() {
    async fn measure(c: &Client, n: usize, tag: &str) -> Vec<Duration> {
        let mut times = Vec::new();
        let mut stages: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for i in 0..n {
            let t = std::time::Instant::now();
            let mut sub = c
                .create(CreateVm {
                    name: Some(format!("{tag}{i}")),
                    image: Some("img".into()),
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut last = (String::from("rpc"), t.elapsed());
            while let Some(ev) = sub.next().await {
                let name = match ev.unwrap() {
                    Progress::Stage { stage, .. } => stage,
                    Progress::Done { .. } => "done".into(),
                    Progress::Failed { message, .. } => panic!("{message}"),
                    _ => continue,
                };
                let now = t.elapsed();
                stages
                    .entry(last.0.clone())
                    .or_default()
                    .push((now - last.1).as_secs_f64() * 1e3);
                let end = name == "done";
                last = (name, now);
                if end {
                    break;
                }
            }
            times.push(t.elapsed());
        }
        #[allow(clippy::print_stdout)]
        for (stage, mut ms) in stages {
            ms.sort_by(f64::total_cmp);
            println!("  {tag} {stage} -> next: p50 {:.1} ms", ms[ms.len() / 2]);
        }
        for i in 0..n {
            VmRpcClient::delete(c, format!("{tag}{i}"), true)
                .await
                .unwrap();
        }
        times.sort();
        times
    }
    let report = |what: &str, t: &[Duration]| {
        #[allow(clippy::print_stdout)]
        {
            println!(
                "{what}: n={} p50={:.1} ms p90={:.1} ms max={:.1} ms",
                t.len(),
                t[t.len() / 2].as_secs_f64() * 1e3,
                t[t.len() * 9 / 10].as_secs_f64() * 1e3,
                t[t.len() - 1].as_secs_f64() * 1e3
            );
        }
    };
    let ns = support::Netns::new("fcbench");
    let (d, c, _files) = setup_in(None, 0, Some(&ns.0)).await;
    measure(&c, 3, "w").await;
    let jailed = measure(&c, 30, "j").await;
    report("jailed, cgroups, tap", &jailed);
    drop(c);
    d.shutdown().await;
    let (d, c, _files) = setup().await;
    measure(&c, 3, "w").await;
    let unjailed = measure(&c, 30, "u").await;
    report("unjailed, no network", &unjailed);
    drop(c);
    d.shutdown().await;
}

/// The real `bangerd` started by hand by a user (`nobody` here, as root makes it): no
/// privileged helper, so no jailer (which needs root); a `--no-network` Firecracker VM
/// still runs, Firecracker as a plain child of bangerd, as that user, and `vm show` says
/// it is unjailed. Stop and delete leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_user_bangerd_runs_firecracker_unjailed_without_the_helper() {
    const USER: u32 = 65534;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let files = h.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let fx = support::fc::Files::new(&files, Exec::Double);
    fx.chown(USER);
    let config = format!(
        "default_vmm = \"firecracker\"\nagent_timeout_secs = 0\nstop_timeout_secs = 5\n\
         dns_listen = \"127.0.0.1:0\"\n[firecracker]\njailer = \"{}\"\nbinary = \"{}\"\n\
         [vm_defaults]\nnetwork = false\n",
        double_bin().display(),
        fx.firecracker.display()
    );
    let home_dirs = support::fc::Home::new(h, USER, &config);
    // setpriv execs bangerd in place as the user, supplementary groups cleared.
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_bangerd"));
    let daemon = home_dirs
        .spawn(cmd, "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".as_ref())
        .await;
    let socket = home_dirs.socket();
    let c = support::client_for(&socket).await;
    fx.register(&c).await;
    create(
        &c,
        CreateVm {
            name: Some("u".into()),
            image: Some("img".into()),
            network: Some(false),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|(code, msg)| panic!("{code}: {msg}"));
    let vm = VmRpcClient::show(&c, "u".into()).await.unwrap();
    assert_eq!(vm.state, VmState::Running, "{:?}", vm.error);
    assert_eq!(
        vm.isolation.as_deref(),
        Some(banger_actors::vmm::firecracker::UNJAILED)
    );
    let pid = vm.pid.unwrap() as u32;
    // Firecracker itself (the double under Firecracker's name), bangerd's child, as the user.
    assert_eq!(proc_status(pid, "PPid"), daemon.pid().to_string());
    assert_eq!(
        proc_status(pid, "Uid").split_whitespace().next(),
        Some("65534")
    );
    let jail = h.join("data/banger/jail").join(EXEC_NAME).join(&vm.id);
    assert!(jail.join("root/api.sock").exists());
    let stopped = c.stop("u".into(), None).await.unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    assert!(
        !jail.exists(),
        "the VM's directory is removed once Firecracker is gone"
    );
    VmRpcClient::delete(&c, "u".into(), true).await.unwrap();
    drop(c);
    daemon.stop();
}

/// As root, in a namespace: a VM's egress policy and isolation go through the daemon and
/// its helper into `bridge banger`, change on the running VM, and leave nothing on delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_an_egress_policy_follows_the_vm_through_the_daemon() {
    let ns = support::Netns::new("fceg");
    let (d, c, _files) = setup_in(None, 0, Some(&ns.0)).await;
    let egress: banger_api::Egress = "allow=allowed.test,10.0.0.0/8".parse().unwrap();
    create(
        &c,
        CreateVm {
            name: Some("eg".into()),
            image: Some("img".into()),
            egress: Some(egress.clone()),
            isolate: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let v = VmRpcClient::show(&c, "eg".into()).await.unwrap();
    assert_eq!((v.egress.clone(), v.isolate, v.nat), (egress, true, true));
    assert_eq!(v.egress_dropped, Some(0));
    assert_eq!(v.dns_refused, Some(0));
    let table = ns.sh("nft list table bridge banger");
    let tap = format!("bg-{}", v.id);
    assert!(table.contains(&format!("chain vm-{}", v.id)), "{table}");
    assert!(table.contains("ip daddr 10.0.0.0/8 accept"), "{table}");
    assert!(
        table.contains(&format!("ip daddr @d-{} accept", v.id)),
        "{table}"
    );
    assert!(
        table.contains(&format!("oifname \"{tap}\"")),
        "isolated: {table}"
    );
    assert!(ns.sh("nft list table ip banger").contains("masquerade"));

    // `vm set --egress none` on the running VM: no NAT, a filter with no rule of its own.
    VmRpcClient::set(
        &c,
        banger_api::SetVm {
            vm: "eg".into(),
            egress: Some(banger_api::Egress::None),
            isolate: Some(false),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let table = ns.sh("nft list table bridge banger");
    assert!(
        !table.contains("10.0.0.0/8") && !table.contains("oifname"),
        "{table}"
    );
    assert!(!ns.sh("nft list ruleset").contains("masquerade"));
    // `all`: NAT, nothing filtered.
    let v = VmRpcClient::set(
        &c,
        banger_api::SetVm {
            vm: "eg".into(),
            egress: Some(banger_api::Egress::All),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(v.nat);
    assert!(!ns.sh("nft list ruleset").contains("bridge banger"));
    VmRpcClient::set(
        &c,
        banger_api::SetVm {
            vm: "eg".into(),
            isolate: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(ns.sh("nft list ruleset").contains(&tap));
    VmRpcClient::delete(&c, "eg".into(), true).await.unwrap();
    assert_eq!(ns.sh("nft list ruleset").trim(), "", "nothing left");
    drop(c);
    d.shutdown().await;
}

/// As root, in a namespace: a `vm set --egress none` whose filter cannot be set (here banger's
/// table holds a set of the VM's name and another type, so the helper's nft transaction
/// fails) fails and leaves the running VM's network as it was: the NAT the change took
/// away first is put back, and the record still says `all`. Once the table is mended the
/// same change goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_vm_set_whose_filter_fails_puts_nat_back() {
    let ns = support::Netns::new("fchf");
    let (d, c, _files) = setup_in(None, 0, Some(&ns.0)).await;
    create(
        &c,
        CreateVm {
            name: Some("hf".into()),
            image: Some("img".into()),
            egress: Some(banger_api::Egress::All),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let v = VmRpcClient::show(&c, "hf".into()).await.unwrap();
    assert!(v.nat);
    let nat_rules = || ns.sh("nft list table ip banger");
    assert!(nat_rules().contains("masquerade"), "{}", nat_rules());
    ns.sh(&format!(
        "nft add table bridge banger; nft add set bridge banger d-{} '{{ type ether_addr; }}'",
        v.id
    ));
    // `none` has no NAT and a filter: the change takes NAT away, then sets the filter.
    let none = banger_api::Egress::None;
    let set = |egress: banger_api::Egress| {
        VmRpcClient::set(
            &c,
            banger_api::SetVm {
                vm: "hf".into(),
                egress: Some(egress),
                ..Default::default()
            },
        )
    };
    let e = set(none.clone()).await.unwrap_err();
    assert!(e.to_string().contains("egress filter"), "{e}");
    assert!(
        nat_rules().contains("masquerade"),
        "NAT put back: {}",
        nat_rules()
    );
    let v = VmRpcClient::show(&c, "hf".into()).await.unwrap();
    assert_eq!((v.egress, v.nat), (banger_api::Egress::All, true));

    ns.sh(&format!("nft delete set bridge banger d-{}", v.id));
    let v = set(none.clone()).await.unwrap();
    assert_eq!((v.egress, v.nat), (none, false));
    assert!(!ns.sh("nft list ruleset").contains("masquerade"));
    assert!(
        ns.sh("nft list table bridge banger")
            .contains(&format!("chain vm-{}", v.id))
    );
    VmRpcClient::delete(&c, "hf".into(), true).await.unwrap();
    assert_eq!(ns.sh("nft list ruleset").trim(), "", "nothing left");
    drop(c);
    d.shutdown().await;
}

/// Suspend and restore through Firecracker's snapshot API (on the double, which keeps the
/// guest's boot id in its snapshot): `vm suspend` pauses the VM, `PUT /snapshot/create`
/// fills the files linked into its jail, which end up in the VM's `state/` (the memory
/// file the guest's size, sparse) and the VMM is gone; `vm start` launches a new one that
/// `PUT /snapshot/load`s them: the same guest runs on (its boot id, no boot), and
/// `state/` is gone. A restore whose memory file was cut short fails saying so and leaves
/// the VM suspended, with no VMM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_start_restore_a_firecracker_vm_through_its_snapshot_api() {
    let (d, c, _files) = setup().await;
    create(
        &c,
        CreateVm {
            name: Some("snap".into()),
            image: Some("img".into()),
            memory_mib: Some(256),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let before = VmRpcClient::show(&c, "snap".into()).await.unwrap();
    let dir = std::path::PathBuf::from(&before.dir);
    let console = || std::fs::read_to_string(dir.join("console.log")).unwrap();
    let boot_id = console()
        .lines()
        .find_map(|l| l.strip_prefix("banger-fc-double: boot id "))
        .expect("a boot id on the console")
        .to_owned();

    let (stages, last) = support::follow(c.suspend("snap".into()).await.unwrap()).await;
    assert_eq!(stages, ["save", "stop"]);
    let Ok(Progress::Done { vm: saved }) = last else {
        panic!("{last:?}")
    };
    assert_eq!(saved.state, VmState::Suspended, "{saved:?}");
    assert_eq!(saved.pid, None);
    let pid = before.pid.unwrap();
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z ")),
        "the VMM is gone"
    );
    let memory = std::fs::metadata(dir.join("state/vm.mem")).unwrap();
    assert_eq!(memory.len(), 256 << 20, "the guest's memory size");
    // What it costs on disk: allocated bytes (the double's memory file is all holes).
    let shown = VmRpcClient::show(&c, "snap".into()).await.unwrap();
    assert!(
        shown.saved_bytes.is_some_and(|b| b > 0 && b < 256 << 20),
        "{:?}",
        shown.saved_bytes
    );
    assert!(dir.join("state/vm.snap").is_file() && !dir.join("state.tmp").exists());

    let started = start(&c, "snap").await.unwrap();
    assert_eq!(started.state, VmState::Running, "{started:?}");
    assert_ne!(started.pid, before.pid, "a new VMM");
    let text = console();
    assert!(
        text.contains(&format!(
            "banger-fc-double: guest restored (boot {boot_id})"
        )),
        "the same guest runs on: {text}"
    );
    assert_eq!(
        text.matches("banger-fc-double: boot id").count(),
        1,
        "no second boot: {text}"
    );
    assert!(!dir.join("state").exists(), "the saved state is spent");
    assert_eq!(started.saved_bytes, None);

    // A memory file cut short: the restore fails, the VM stays suspended, no VMM runs.
    c.suspended("snap").await.unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("state/vm.mem"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let (_, message) = start(&c, "snap").await.unwrap_err();
    assert!(
        message.contains("holds 4096 bytes"),
        "says what is wrong: {message}"
    );
    let vm = VmRpcClient::show(&c, "snap".into()).await.unwrap();
    assert_eq!(vm.state, VmState::Suspended, "{vm:?}");
    assert_eq!(vm.pid, None);
    VmRpcClient::delete(&c, "snap".into(), true).await.unwrap();
    assert!(!dir.exists());
    drop(c);
    d.shutdown().await;
}

/// As root, jailed (the helper in a namespace this test makes, the VM its own uid and a
/// tap): Firecracker writes the snapshot as the VM's uid into files the driver linked into
/// the jail before it started (it could not reach files made in the jail once it runs);
/// after the suspend they are in `state/`, private; the restore links them into the new
/// jail and the same guest runs on with its tap; deleting it leaves no tap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_jailed_firecracker_vm_suspends_and_restores() {
    use std::os::unix::fs::MetadataExt;
    let ns = support::Netns::new("fcsnap");
    let (d, c, _files) = setup_in(None, 0, Some(&ns.0)).await;
    create(
        &c,
        CreateVm {
            name: Some("js".into()),
            image: Some("img".into()),
            memory_mib: Some(128),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let before = VmRpcClient::show(&c, "js".into()).await.unwrap();
    let dir = std::path::PathBuf::from(&before.dir);
    let vm_uid = std::fs::metadata(format!("/proc/{}", before.pid.unwrap()))
        .unwrap()
        .uid();
    assert_ne!(vm_uid, 0, "jailed as the VM's own uid");
    let console = || std::fs::read_to_string(dir.join("console.log")).unwrap();
    let boot_id = console()
        .lines()
        .find_map(|l| l.strip_prefix("banger-fc-double: boot id "))
        .expect("a boot id on the console")
        .to_owned();

    let saved = c.suspended("js").await.unwrap();
    assert_eq!(saved.state, VmState::Suspended, "{saved:?}");
    // Written by Firecracker as the VM's uid into the files linked in before it started.
    for name in ["vm.snap", "vm.mem"] {
        let m = std::fs::metadata(dir.join("state").join(name)).unwrap();
        assert!(m.len() > 0, "{name} was written");
        assert_eq!(m.mode() & 0o077, 0, "{name} is private");
    }
    let started = start(&c, "js").await.unwrap();
    assert_eq!(started.state, VmState::Running, "{started:?}");
    assert!(
        console().contains(&format!(
            "banger-fc-double: guest restored (boot {boot_id})"
        )),
        "{}",
        console()
    );
    let tap = started
        .ip
        .as_ref()
        .map(|_| ns.sh("ip -o link show master banger0"));
    assert!(
        tap.as_deref().is_some_and(|t| t.contains("bg-")),
        "its tap: {tap:?}"
    );
    // A snapshot of the restored VM: Firecracker (the VM's uid) writes the save files
    // through their group (they stay the owner's), the VM runs on; a rollback loads it
    // into a new jail.
    let s = c.snapshotted("js", Some("j1")).await.unwrap();
    let snap_dir = std::path::PathBuf::from(&s.dir);
    for name in ["vm.snap", "vm.mem"] {
        let m = std::fs::metadata(snap_dir.join("state").join(name)).unwrap();
        assert!(m.len() > 0, "{name} was written");
        assert_eq!(m.mode() & 0o077, 0, "{name} is private");
        let saved = std::fs::metadata(dir.join("run").join(name)).unwrap();
        assert_eq!(
            (saved.uid(), saved.gid()),
            (0, vm_uid),
            "{name}: the owner's, the VM's group"
        );
    }
    let vm = VmRpcClient::show(&c, "js".into()).await.unwrap();
    assert_eq!((vm.state, vm.pid), (VmState::Running, started.pid));
    let back = c.rolled_back("js", "j1").await.unwrap();
    assert_eq!(back.state, VmState::Running, "{back:?}");
    assert_ne!(back.pid, started.pid);
    assert_eq!(
        console()
            .matches(&format!("guest restored (boot {boot_id})"))
            .count(),
        2,
        "{}",
        console()
    );
    VmRpcClient::delete(&c, "js".into(), true).await.unwrap();
    assert!(!dir.exists());
    assert!(!ns.sh("ip -o link").contains("bg-"), "no tap left");
    drop(c);
    d.shutdown().await;
}

/// A save that fails (Firecracker refuses `PUT /snapshot/create`) leaves the VM running
/// under the same VMM, with nothing saved (no `state/`, no `state.tmp/`) and not paused.
/// A VM that is not running cannot be suspended (a conflict).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_suspend_leaves_the_vm_running_and_nothing_saved() {
    let (d, c, _files) = setup_with(
        Some("/snapshot/create:400:Create snapshot error: Cannot save the microVM state: disk quota exceeded"),
        0,
    )
    .await;
    create(
        &c,
        CreateVm {
            name: Some("sus".into()),
            image: Some("img".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let before = VmRpcClient::show(&c, "sus".into()).await.unwrap();
    assert_eq!(before.state, VmState::Running);
    let e = c.suspended("sus").await.unwrap_err();
    let ClientError::Call(o) = e else {
        panic!("{e:?}")
    };
    assert!(
        o.message()
            .contains("saving its state failed, so it runs on")
            && o.message().contains("disk quota exceeded"),
        "{}",
        o.message()
    );
    let after = VmRpcClient::show(&c, "sus".into()).await.unwrap();
    assert_eq!(after.state, VmState::Running);
    assert_eq!(after.pid, before.pid, "the same VMM runs on");
    assert_eq!(instance_state(&after).await, "Running", "resumed");
    let dir = std::path::Path::new(&after.dir);
    assert!(!dir.join("state").exists() && !dir.join("state.tmp").exists());

    c.stop("sus".into(), None).await.unwrap();
    let e = c.suspended("sus").await.unwrap_err();
    assert_eq!(code(e), codes::CONFLICT);
    drop(c);
    d.shutdown().await;
}

fn message(e: ClientError) -> (i32, String) {
    match e {
        ClientError::Call(o) => (o.code(), o.message().to_owned()),
        other => panic!("{other:?}"),
    }
}

/// `vm snapshot create` of a Firecracker VM (through `PATCH /vm` + `PUT /snapshot/create`,
/// then resumed: the same VMM runs on, `Running`), a paused VM stays paused; `vm rollback`
/// ends the VMM and loads the snapshot into a new one (the same guest's boot id, no boot)
/// over disks put back as they were; the snapshot is kept for another rollback. Refused,
/// with nothing changed: a snapshot of a stopped VM, a duplicate name, an unknown name
/// (and another VM's, named), a memory file cut short, a VM whose size changed since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_rollback_of_a_firecracker_vm() {
    let (d, c, _files) = setup().await;
    for name in ["sn", "other"] {
        create(
            &c,
            CreateVm {
                name: Some(name.into()),
                image: Some("img".into()),
                memory_mib: Some(256),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let before = VmRpcClient::show(&c, "sn".into()).await.unwrap();
    let dir = std::path::PathBuf::from(&before.dir);
    let console = || std::fs::read_to_string(dir.join("console.log")).unwrap();
    let boot_id = console()
        .lines()
        .find_map(|l| l.strip_prefix("banger-fc-double: boot id "))
        .expect("a boot id on the console")
        .to_owned();
    let overlay = dir.join("overlay.ext4");
    // The disk's first MiB (ext4's superblock is in it): the disk itself is 16 GiB sparse.
    let head = |path: &std::path::Path| {
        use std::io::Read;
        let mut buf = Vec::new();
        std::fs::File::open(path)
            .unwrap()
            .take(1 << 20)
            .read_to_end(&mut buf)
            .unwrap();
        (buf, std::fs::metadata(path).unwrap().len())
    };
    let at_snapshot = head(&overlay);

    // The stream says what it does: the save, the copies, the VM running on.
    let (stages, last) = support::follow(
        c.snapshot_create("sn".into(), Some("one".into()))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(stages, ["save", "copy", "resume"]);
    let Ok(Progress::Snapshot { snapshot: s }) = last else {
        panic!("{last:?}")
    };
    assert_eq!((s.name.as_str(), s.vm.as_str()), ("one", "sn"));
    assert_eq!(s.vmm, banger_api::VmmKind::Firecracker);
    assert!(s.vmm_version.starts_with("Firecracker v"), "{s:?}");
    assert_eq!(s.spec, before.spec);
    let snap_dir = std::path::PathBuf::from(&s.dir);
    let mem = std::fs::metadata(snap_dir.join("state/vm.mem")).unwrap();
    assert_eq!(mem.len(), 256 << 20, "the guest's memory");
    for f in ["state/vm.snap", "overlay.ext4", "work.ext4"] {
        assert!(snap_dir.join(f).is_file(), "{f}");
    }
    let vm = VmRpcClient::show(&c, "sn".into()).await.unwrap();
    assert_eq!(
        (vm.state, vm.pid),
        (VmState::Running, before.pid),
        "the same VMM"
    );
    assert_eq!(
        instance_state(&vm).await,
        "Running",
        "resumed after the save"
    );
    assert_eq!(vm.snapshots.len(), 1);
    // Unnamed: snap-1; a name taken; the snapshot of a paused VM leaves it paused.
    c.pause("sn".into()).await.unwrap();
    let (stages, last) = support::follow(c.snapshot_create("sn".into(), None).await.unwrap()).await;
    assert_eq!(stages, ["save", "copy"], "a paused VM is not resumed");
    let Ok(Progress::Snapshot { snapshot: s2 }) = last else {
        panic!("{last:?}")
    };
    assert_eq!(s2.name, "snap-1");
    let vm = VmRpcClient::show(&c, "sn".into()).await.unwrap();
    assert_eq!(vm.state, VmState::Paused);
    assert_eq!(instance_state(&vm).await, "Paused");
    c.resume("sn".into()).await.unwrap();
    let (code_, m) = message(c.snapshotted("sn", Some("one")).await.unwrap_err());
    assert_eq!(code_, codes::CONFLICT, "{m}");
    assert!(m.contains("has a snapshot named one already"), "{m}");
    let (code_, m) = message(c.snapshotted("sn", Some("Bad Name")).await.unwrap_err());
    assert_eq!(code_, codes::INVALID_ARGUMENT, "{m}");
    let theirs = c.snapshotted("other", Some("theirs")).await.unwrap();
    let all = c.snapshot_list(None).await.unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(c.snapshot_list(Some("sn".into())).await.unwrap().len(), 2);

    // The guest's disk moves on; a rollback puts it back.
    std::fs::write(&overlay, b"written after the snapshot").unwrap();
    let (stages, last) =
        support::follow(c.rollback("sn".into(), "one".into()).await.unwrap()).await;
    assert_eq!(stages[..3], ["check", "stop", "copy"], "{stages:?}");
    assert!(
        stages.contains(&"restore".to_owned()) && !stages.contains(&"boot".to_owned()),
        "then the start's stages, a restore: {stages:?}"
    );
    let Ok(Progress::Done { vm: back }) = last else {
        panic!("{last:?}")
    };
    assert_eq!(back.state, VmState::Running, "{back:?}");
    assert_ne!(back.pid, before.pid, "a new VMM");
    assert!(head(&overlay) == at_snapshot, "the disk as it was");
    let text = console();
    assert!(
        text.contains(&format!(
            "banger-fc-double: guest restored (boot {boot_id})"
        )),
        "the snapshot's guest runs on: {text}"
    );
    assert_eq!(
        text.matches("banger-fc-double: boot id").count(),
        1,
        "no second boot: {text}"
    );
    assert!(!dir.join("state").exists(), "the restore spent its copy");
    // Kept: a second rollback, from a stopped VM this time, runs it again.
    c.stop("sn".into(), None).await.unwrap();
    let back = c.rolled_back("sn", "one").await.unwrap();
    assert_eq!(back.state, VmState::Running, "{back:?}");

    // Bad input, the VM left as it was.
    let running = back.pid;
    let (code_, m) = message(c.rolled_back("sn", "nope").await.unwrap_err());
    assert_eq!(code_, codes::NOT_FOUND, "{m}");
    let (code_, m) = message(c.rolled_back("sn", "theirs").await.unwrap_err());
    assert_eq!(code_, codes::NOT_FOUND, "{m}");
    assert!(m.contains("vm other has one"), "says whose it is: {m}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(snap_dir.join("state/vm.mem"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let (code_, m) = message(c.rolled_back("sn", "one").await.unwrap_err());
    assert_eq!(code_, codes::CONFLICT, "{m}");
    assert!(
        m.contains("vm.mem is 4096 bytes") && m.contains("left as it was"),
        "{m}"
    );
    let vm = VmRpcClient::show(&c, "sn".into()).await.unwrap();
    assert_eq!((vm.state, vm.pid), (VmState::Running, running), "untouched");
    // Resized since: named, with the way back.
    c.stop("sn".into(), None).await.unwrap();
    c.set(SetVm {
        vm: "sn".into(),
        memory_mib: Some(512),
        ..Default::default()
    })
    .await
    .unwrap();
    let (code_, m) = message(c.rolled_back("sn", "snap-1").await.unwrap_err());
    assert_eq!(code_, codes::CONFLICT, "{m}");
    assert!(
        m.contains("256 MiB, work disk 8 GiB then") && m.contains("512 MiB, work disk 8 GiB now"),
        "{m}"
    );
    assert!(m.contains("`banger vm set sn` it back"), "{m}");
    assert_eq!(
        VmRpcClient::show(&c, "sn".into()).await.unwrap().state,
        VmState::Stopped
    );
    // Only a running or paused VM has memory to snapshot.
    let (code_, m) = message(c.snapshotted("sn", None).await.unwrap_err());
    assert_eq!(code_, codes::CONFLICT, "{m}");
    assert!(m.contains("only a running or paused vm"), "{m}");

    // Removed: its files go, the VM stays.
    let gone = c.snapshot_rm("sn".into(), "one".into()).await.unwrap();
    assert_eq!(gone.name, "one");
    assert!(!snap_dir.exists());
    assert_eq!(c.snapshot_list(Some("sn".into())).await.unwrap().len(), 1);
    // A VM's snapshots go with it.
    let theirs_dir = std::path::PathBuf::from(&theirs.dir);
    VmRpcClient::delete(&c, "other".into(), true).await.unwrap();
    assert!(!theirs_dir.exists());
    assert_eq!(c.snapshot_list(None).await.unwrap().len(), 1);
    VmRpcClient::delete(&c, "sn".into(), true).await.unwrap();
    assert!(!dir.exists());
    drop(c);
    d.shutdown().await;
}

/// A snapshot whose save fails (Firecracker refuses `PUT /snapshot/create`) leaves the VM
/// running under the same VMM, resumed, with no snapshot recorded and no files left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_snapshot_leaves_the_vm_running_and_nothing_kept() {
    let (d, c, _files) = setup_with(
        Some("/snapshot/create:400:Create snapshot error: Cannot save the microVM state: disk quota exceeded"),
        0,
    )
    .await;
    create(
        &c,
        CreateVm {
            name: Some("fs".into()),
            image: Some("img".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let before = VmRpcClient::show(&c, "fs".into()).await.unwrap();
    let (code_, m) = message(c.snapshotted("fs", None).await.unwrap_err());
    assert!(
        m.contains("disk quota exceeded") && m.contains("runs on"),
        "{code_} {m}"
    );
    let after = VmRpcClient::show(&c, "fs".into()).await.unwrap();
    assert_eq!((after.state, after.pid), (VmState::Running, before.pid));
    assert_eq!(instance_state(&after).await, "Running", "resumed");
    assert!(after.snapshots.is_empty());
    let snaps = std::path::Path::new(&after.dir).join("snapshots");
    let left: Vec<_> = std::fs::read_dir(&snaps)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    support::delete_all(&c).await;
    drop(c);
    d.shutdown().await;
}

/// The double as the newest release (forks need `network_overrides`, Firecracker 1.12)
/// with a guest agent, which says on the console what identity it was given.
const FORK_ENV: &str = "BANGER_FC_DOUBLE_GUEST_AGENT=1 BANGER_FC_DOUBLE_RELEASE=newest";
/// The double's agent's console line for an identity (`double::GUEST_IDENTITY`).
const IDENTITY: &str = "banger-fc-double: identity";

fn console_of(vm: &banger_api::VmInfo) -> String {
    std::fs::read_to_string(std::path::Path::new(&vm.dir).join("console.log")).unwrap()
}

fn boot_id_of(vm: &banger_api::VmInfo) -> String {
    console_of(vm)
        .lines()
        .find_map(|l| l.strip_prefix("banger-fc-double: boot id "))
        .expect("a boot id on the console")
        .to_owned()
}

/// `vm fork` as root, jailed, with networks (the helper in a namespace this test makes):
/// the source is snapshotted and runs on under the same VMM, keeping no snapshot; each
/// clone is restored from that snapshot (the source's guest: its boot id, no boot of its
/// own) into its own jail with its own tap (the double opens the tap the load names as
/// the clone's uid: the source's, in use and another uid's, would fail), takes its own
/// identity through the agent (its name, its lease and MAC, the source's address given
/// up) and only then joins the bridge. Clones are VMs of their own (one deleted, the
/// others run on). Bad input is refused with nothing made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_fork_restores_clones_each_with_its_own_identity_and_tap() {
    let ns = support::Netns::new("fcfork");
    let (d, c, _files) = setup_in(Some(FORK_ENV), 10, Some(&ns.0)).await;
    small_vm(&c, "a").await;
    let a = VmRpcClient::show(&c, "a".into()).await.unwrap();
    let boot_id = boot_id_of(&a);
    let req = |count: Option<u32>| banger_api::ForkVm {
        vm: "a".into(),
        count,
        ..Default::default()
    };

    let (stages, last) = forked(&c, req(Some(2))).await;
    assert_eq!(stages, ["save", "copy", "resume", "clone", "restore"]);
    let Ok(Progress::Forked { vms }) = last else {
        panic!("{last:?}")
    };
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["a-1", "a-2"]);
    let a_ip = a.ip.clone().unwrap();
    let mut ips = vec![a_ip.clone()];
    for v in &vms {
        assert_eq!(v.state, VmState::Running, "{v:?}");
        assert_ne!(v.pid, a.pid);
        let ip = v.ip.clone().expect("a lease of its own");
        assert!(!ips.contains(&ip), "{ip} is taken: {ips:?}");
        ips.push(ip.clone());
        let text = console_of(v);
        assert!(
            text.contains(&format!("guest restored (boot {boot_id})")) && !text.contains("boot id"),
            "the source's guest runs on, not a boot: {text}"
        );
        let mac = banger_actors::net::lease::mac_for(ip.parse().unwrap());
        assert!(
            text.contains(&format!(
                "{IDENTITY} {}: {ip}/24 (was {a_ip}/24) mac {mac}",
                v.name
            )),
            "its own identity: {text}"
        );
        let tap = format!("bg-{}", v.id);
        assert!(
            ns.sh("ip -o link show master banger0").contains(&tap),
            "{tap} on the bridge once it has its address"
        );
    }
    let a_now = VmRpcClient::show(&c, "a".into()).await.unwrap();
    assert_eq!(
        (a_now.state, a_now.pid),
        (VmState::Running, a.pid),
        "a runs on"
    );
    assert!(a_now.snapshots.is_empty(), "the fork keeps no snapshot");
    let left = std::fs::read_dir(std::path::Path::new(&a.dir).join("snapshots"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "nor its files");

    // A clone of a clone: the next free name, and it gives up the clone's address.
    let v1_ip = vms[0].ip.clone().unwrap();
    let (_, last) = forked(
        &c,
        banger_api::ForkVm {
            vm: "a-1".into(),
            name: Some("a".into()),
            ..Default::default()
        },
    )
    .await;
    let Ok(Progress::Forked { vms: again }) = last else {
        panic!("{last:?}")
    };
    assert_eq!(again[0].name, "a-3");
    assert!(
        console_of(&again[0]).contains(&format!("(was {v1_ip}/24)")),
        "{}",
        console_of(&again[0])
    );

    // Each clone is a VM of its own.
    VmRpcClient::delete(&c, "a-1".into(), true).await.unwrap();
    let v2 = VmRpcClient::show(&c, "a-2".into()).await.unwrap();
    assert_eq!(v2.state, VmState::Running);

    // Bad input: nothing made.
    let before = VmRpcClient::list(&c).await.unwrap().len();
    for (count, want) in [(0, codes::INVALID_ARGUMENT), (17, codes::INVALID_ARGUMENT)] {
        let (_, last) = forked(&c, req(Some(count))).await;
        let (code_, m) = message(last.unwrap_err());
        assert_eq!(code_, want, "--count {count}: {m}");
        assert!(m.contains("max_fork_count"), "{m}");
    }
    let (_, last) = forked(
        &c,
        banger_api::ForkVm {
            vm: "nope".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(message(last.unwrap_err()).0, codes::NOT_FOUND);
    // A clone restores its source's NIC: it cannot go without one.
    let (_, last) = forked(
        &c,
        banger_api::ForkVm {
            vm: "a-2".into(),
            network: Some(false),
            ..Default::default()
        },
    )
    .await;
    let (code_, m) = message(last.unwrap_err());
    assert_eq!(code_, codes::INVALID_ARGUMENT, "{m}");
    assert!(m.contains("drop --no-network"), "{m}");
    c.stop("a-2".into(), None).await.unwrap();
    let (_, last) = forked(
        &c,
        banger_api::ForkVm {
            vm: "a-2".into(),
            ..Default::default()
        },
    )
    .await;
    let (code_, m) = message(last.unwrap_err());
    assert_eq!(code_, codes::CONFLICT, "{m}");
    assert!(
        m.contains("only a running or paused vm can be forked"),
        "{m}"
    );
    assert_eq!(
        VmRpcClient::list(&c).await.unwrap().len(),
        before,
        "nothing made"
    );

    support::delete_all(&c).await;
    assert!(!ns.sh("ip -o link").contains("bg-"), "no tap left");
    drop(c);
    d.shutdown().await;
}

/// Without a network (no helper: Firecracker unjailed), a clone takes its name alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_without_a_network_names_the_clones() {
    let (d, c, _files) = setup_in(Some(FORK_ENV), 10, None).await;
    small_vm(&c, "b").await;
    let (_, last) = forked(
        &c,
        banger_api::ForkVm {
            vm: "b".into(),
            count: Some(3),
            name: Some("try".into()),
            ..Default::default()
        },
    )
    .await;
    let Ok(Progress::Forked { vms }) = last else {
        panic!("{last:?}")
    };
    for (v, n) in vms.iter().zip(["try-1", "try-2", "try-3"]) {
        assert_eq!((v.name.as_str(), v.ip.as_deref()), (n, None));
        assert!(
            console_of(v).contains(&format!("{IDENTITY} {n}: no network")),
            "{}",
            console_of(v)
        );
    }
    support::delete_all(&c).await;
    drop(c);
    d.shutdown().await;
}

/// A clone that does not come up (every clone's Firecracker refuses its `PUT
/// /snapshot/load`) fails the fork: no clone is left (record, directory, process), and the
/// source runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_whose_clone_fails_leaves_no_clone() {
    let env = format!(
        "{FORK_ENV} BANGER_FC_DOUBLE_FAIL='/snapshot/load:400:Load snapshot error: Failed to restore from snapshot: Cannot restore devices'"
    );
    let (d, c, _files) = setup_in(Some(&env), 10, None).await;
    small_vm(&c, "f").await;
    let f = VmRpcClient::show(&c, "f".into()).await.unwrap();
    let (_, last) = forked(
        &c,
        banger_api::ForkVm {
            vm: "f".into(),
            count: Some(2),
            ..Default::default()
        },
    )
    .await;
    let (code_, m) = message(last.unwrap_err());
    assert_eq!(code_, codes::CONFLICT, "{m}");
    assert!(
        m.contains("did not come up")
            && m.contains("Cannot restore devices")
            && m.contains("every clone was deleted"),
        "{m}"
    );
    let vms = VmRpcClient::list(&c).await.unwrap();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!((vms[0].state, vms[0].pid), (VmState::Running, f.pid));
    let vms_dir = std::path::Path::new(&f.dir).parent().unwrap();
    assert_eq!(
        std::fs::read_dir(vms_dir).unwrap().count(),
        1,
        "no clone directory left"
    );
    support::delete_all(&c).await;
    drop(c);
    d.shutdown().await;
}

/// `vm create --from-snapshot b/s1`: a new VM restored from a stored snapshot (the
/// snapshot's guest runs on in it: its boot id, no boot), its own identity taken; the
/// snapshot is kept for more. Refused with nothing made: a snapshot or VM that does not
/// exist, a malformed source, a size or image given with it, a name taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_created_from_a_snapshot_runs_on_from_it() {
    let (d, c, _files) = setup_in(Some(FORK_ENV), 10, None).await;
    small_vm(&c, "b").await;
    let b = VmRpcClient::show(&c, "b".into()).await.unwrap();
    let boot_id = boot_id_of(&b);
    c.snapshotted("b", Some("s1")).await.unwrap();
    let from = |name: Option<&str>, snap: &str| CreateVm {
        name: name.map(Into::into),
        from_snapshot: Some(snap.into()),
        ..Default::default()
    };
    let events = create(&c, from(Some("c"), "b/s1")).await.unwrap();
    let Some(Progress::Done { vm: made }) = events.last() else {
        panic!("{events:?}")
    };
    assert_eq!((made.name.as_str(), made.state), ("c", VmState::Running));
    let text = console_of(made);
    assert!(
        text.contains(&format!("guest restored (boot {boot_id})")) && !text.contains("boot id"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{IDENTITY} c: no network")),
        "{text}"
    );
    // Kept: another from it, named by the daemon.
    let events = create(&c, from(None, "b/s1")).await.unwrap();
    assert!(
        matches!(events.last(), Some(Progress::Done { .. })),
        "{events:?}"
    );
    assert_eq!(c.snapshot_list(Some("b".into())).await.unwrap().len(), 1);

    let before = VmRpcClient::list(&c).await.unwrap().len();
    let (code_, m) = create(&c, from(None, "b/nope")).await.unwrap_err();
    assert_eq!(code_, codes::NOT_FOUND, "{m}");
    let (code_, m) = create(&c, from(None, "nope/s1")).await.unwrap_err();
    assert_eq!(code_, codes::NOT_FOUND, "{m}");
    let (code_, m) = create(&c, from(None, "b")).await.unwrap_err();
    assert_eq!(code_, codes::INVALID_ARGUMENT, "{m}");
    assert!(m.contains("<vm>/<snapshot>"), "{m}");
    let (code_, m) = create(
        &c,
        CreateVm {
            memory_mib: Some(256),
            image: Some("img".into()),
            ..from(None, "b/s1")
        },
    )
    .await
    .unwrap_err();
    assert_eq!(code_, codes::INVALID_ARGUMENT, "{m}");
    assert!(m.contains("--image") && m.contains("--memory"), "{m}");
    let (code_, m) = create(&c, from(Some("c"), "b/s1")).await.unwrap_err();
    assert_eq!(code_, codes::CONFLICT, "{m}");
    assert_eq!(
        VmRpcClient::list(&c).await.unwrap().len(),
        before,
        "nothing made"
    );
    let vms_dir = std::path::Path::new(&b.dir).parent().unwrap();
    assert_eq!(std::fs::read_dir(vms_dir).unwrap().count(), before);
    support::delete_all(&c).await;
    drop(c);
    d.shutdown().await;
}

/// A VM of 128 MiB from the registered image, running.
async fn small_vm(c: &Client, name: &str) {
    create(
        c,
        CreateVm {
            name: Some(name.into()),
            image: Some("img".into()),
            memory_mib: Some(128),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

/// `vm.fork`, followed to its end (see [`support::follow`]).
async fn forked(
    c: &Client,
    req: banger_api::ForkVm,
) -> (Vec<String>, Result<Progress, ClientError>) {
    support::follow(c.fork(req).await.unwrap()).await
}

/// `image.warm`, followed to its end: the warm snapshot made.
async fn warmed(
    c: &Client,
    req: banger_api::WarmImage,
) -> Result<banger_api::WarmInfo, ClientError> {
    match support::follow(c.warm(req).await.unwrap()).await.1? {
        Progress::Warmed { warm } => Ok(warm),
        other => panic!("the warm-up ended with {other:?}"),
    }
}

fn warm_img() -> banger_api::WarmImage {
    banger_api::WarmImage {
        image: Some("img".into()),
        memory_mib: Some(128),
        ..Default::default()
    }
}

/// Warm starts on the double (unjailed, no network): `image warm` boots the image once in
/// a maker VM, saves it and deletes the maker; a create with the same image, kernel, size
/// and VMM restores it (the warm guest runs on: no boot of its own) and the guest takes
/// the new VM's identity; `--cold`, another size, or a snapshot whose files are damaged
/// (removed, with a warning) boot instead. Deleting the image removes its warm snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_snapshot_restores_new_vms_until_its_image_goes() {
    let (d, c, _files) = setup_in(Some(FORK_ENV), 10, None).await;
    let w = warmed(&c, warm_img()).await.unwrap();
    assert_eq!((w.network, w.spec.memory_mib), (false, 128), "{w:?}");
    assert!(w.image.starts_with("img@") && w.bytes > 0, "{w:?}");
    assert!(w.vmm_version.contains("Firecracker"), "{w:?}");
    assert!(
        VmRpcClient::list(&c).await.unwrap().is_empty(),
        "the maker is gone"
    );
    assert_eq!(c.warm_list().await.unwrap(), std::slice::from_ref(&w));

    let vm = |name: &str, memory: u32, cold: bool| CreateVm {
        name: Some(name.into()),
        image: Some("img".into()),
        memory_mib: Some(memory),
        cold,
        ..Default::default()
    };
    let stages = |events: &[Progress]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Progress::Stage { stage, .. } => Some(stage.clone()),
                _ => None,
            })
            .collect()
    };
    let done = |events: &[Progress]| match events.last() {
        Some(Progress::Done { vm }) => vm.clone(),
        other => panic!("{other:?}"),
    };
    // Restored from it, twice (it stays for the next VM).
    for name in ["w1", "w2"] {
        let events = create(&c, vm(name, 128, false)).await.unwrap();
        assert!(stages(&events).contains(&"warm".to_owned()), "{events:?}");
        let made = done(&events);
        assert_eq!(made.state, VmState::Running);
        let text = console_of(&made);
        assert!(
            text.contains("guest restored") && !text.contains("boot id"),
            "{name} is restored, not booted: {text}"
        );
        assert!(
            text.contains(&format!("{IDENTITY} {name}: no network")),
            "{text}"
        );
        let dir = std::path::Path::new(&made.dir);
        assert!(!dir.join("state").exists(), "its saved state is spent");
    }
    // --cold, and another size: booted.
    for (name, memory, cold) in [("c1", 128, true), ("c2", 256, false)] {
        let events = create(&c, vm(name, memory, cold)).await.unwrap();
        assert!(!stages(&events).contains(&"warm".to_owned()), "{events:?}");
        assert!(
            console_of(&done(&events)).contains("boot id"),
            "{name} booted"
        );
    }
    // Damaged (its memory file gone): removed, with a warning, and the VM boots.
    let memory = std::fs::read_dir(std::path::Path::new(&w.dir).join("state"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("mem"))
        })
        .expect("a memory file");
    std::fs::remove_file(&memory).unwrap();
    let mut sub = c.create(vm("d1", 128, false)).await.unwrap();
    let mut warning = None;
    while let Some(ev) = sub.next().await {
        match ev.unwrap() {
            Progress::Stage { stage, detail } if stage == "warning" => warning = detail,
            Progress::Stage { stage, .. } => assert_ne!(stage, "warm"),
            Progress::Done { vm } => {
                assert!(console_of(&vm).contains("boot id"), "booted");
                break;
            }
            Progress::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    let warning = warning.expect("a warning");
    assert!(
        warning.contains("damaged") && warning.contains(&w.id) && warning.contains("booting"),
        "{warning}"
    );
    assert!(c.warm_list().await.unwrap().is_empty());
    assert!(!std::path::Path::new(&w.dir).exists());

    // Another, then the image goes: so does its warm snapshot.
    let w = warmed(&c, warm_img()).await.unwrap();
    let (code_, m) = message(c.warm_rm("nope".into()).await.unwrap_err());
    assert_eq!(code_, codes::NOT_FOUND, "{m}");
    assert!(m.contains("banger image warm list"), "{m}");
    support::delete_all(&c).await;
    ImageRpcClient::delete(&c, "img".into()).await.unwrap();
    assert!(c.warm_list().await.unwrap().is_empty());
    assert!(!std::path::Path::new(&w.dir).exists());
    drop(c);
    d.shutdown().await;
}

/// `[vm_defaults] auto_warm`: a create that boots makes the warm snapshot of its key in
/// the background (its maker then deleted), and the next create restores from it;
/// `image warm rm <image>` removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_warm_makes_a_warm_snapshot_after_a_cold_boot() {
    let (d, c, _files) = setup_in(Some(FORK_ENV), 10, None).await;
    let mut config = d.config();
    config.vm_defaults.auto_warm = Some(true);
    drop(c);
    let dir = d.shutdown_released().await;
    let d = support::TestDaemon::start_with(dir, config).await;
    let c = d.client().await;
    small_vm(&c, "a").await;
    let t0 = std::time::Instant::now();
    let warm = loop {
        let all = c.warm_list().await.unwrap();
        if let [w] = all.as_slice() {
            break w.clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no warm snapshot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Its maker goes once it is saved.
    while VmRpcClient::list(&c).await.unwrap().len() > 1 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the maker stays");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = create(
        &c,
        CreateVm {
            name: Some("b".into()),
            image: Some("img".into()),
            memory_mib: Some(128),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Progress::Stage { stage, .. } if stage == "warm")),
        "{events:?}"
    );
    let gone = c.warm_rm("img".into()).await.unwrap();
    assert_eq!(gone.iter().map(|w| &w.id).collect::<Vec<_>>(), [&warm.id]);
    assert!(c.warm_list().await.unwrap().is_empty());
    support::delete_all(&c).await;
    drop(c);
    d.shutdown().await;
}

/// What a daemon killed during `image warm` leaves is cleaned at the next start: its maker
/// VM (a record marked so) is deleted, and a warm directory no record names is removed
/// (only names shaped like ids: another file there is left alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_warm_up_leaves_no_maker_and_no_directory() {
    let (d, c, _files) = setup().await;
    create(
        &c,
        CreateVm {
            name: Some("warm-0123abcd".into()),
            image: Some("img".into()),
            no_start: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    small_vm(&c, "keep").await;
    drop(c);
    let warm = d.paths.data_dir.join("warm");
    let d = restarted_with(d, |store| {
        let mut maker = store.find_vm("warm-0123abcd").unwrap().unwrap();
        maker.warm_maker = true;
        store.put_vm(&maker).unwrap();
        for d in ["0123456789ab", "not-an-id"] {
            std::fs::create_dir_all(warm.join(d).join("state")).unwrap();
        }
    })
    .await;
    let c = d.client().await;
    let t0 = std::time::Instant::now();
    loop {
        let names: Vec<String> = VmRpcClient::list(&c)
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        if names == ["keep"] {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{names:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!warm.join("0123456789ab").exists());
    assert!(warm.join("not-an-id").exists());
    support::delete_all(&c).await;
    drop(c);
    d.shutdown().await;
}

/// A clone re-adopted before it took its own identity (the daemon died between its
/// restore and the identity: its record still says whose guest it runs, and `vm show`
/// says its identity is pending) takes it once re-adopted, and then is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_readopted_before_its_identity_takes_it() {
    let (d, c, _files) = setup_in(Some(FORK_ENV), 10, None).await;
    small_vm(&c, "a").await;
    let a = VmRpcClient::show(&c, "a".into()).await.unwrap();
    assert!(!console_of(&a).contains(IDENTITY));
    drop(c);
    let d = restarted_with(d, |store| {
        let mut rec = store.find_vm("a").unwrap().unwrap();
        rec.clone_of = Some(banger_actors::vm::model::CloneOf {
            vm: "src".into(),
            address: None,
        });
        store.put_vm(&rec).unwrap();
    })
    .await;
    let c = d.client().await;
    let t0 = std::time::Instant::now();
    let shown = loop {
        let shown = VmRpcClient::show(&c, "a".into()).await.unwrap();
        if shown.clone_of.is_none() && !shown.adopting {
            break shown;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{shown:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((shown.state, shown.pid), (VmState::Running, a.pid));
    assert!(
        console_of(&a).contains(&format!("{IDENTITY} a: no network")),
        "{}",
        console_of(&a)
    );
    support::delete_all(&c).await;
    drop(c);
    d.shutdown().await;
}

/// `d` shut down, its store changed by `edit` (as a daemon's death would have left it),
/// and started again on it.
async fn restarted_with(
    d: support::TestDaemon,
    edit: impl FnOnce(&banger_actors::store::Store),
) -> support::TestDaemon {
    let (config, store_file) = (d.config(), d.paths.store_file());
    let dir = d.shutdown_released().await;
    {
        let store = banger_actors::store::Store::open(&store_file).unwrap();
        edit(&store);
    }
    support::TestDaemon::start_with(dir, config).await
}

/// Warm starts with networks, jailed, with taps (the helper in a namespace this test
/// makes): under Firecracker 1.12 or newer the VM restores from the warm snapshot, its
/// load renaming the maker's tap to its own, and takes its own lease before its tap joins
/// the bridge; under the oldest release (no `network_overrides`) the same create boots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_warm_starts_with_networks_need_firecracker_1_12() {
    for (env, restores) in [(FORK_ENV, true), ("BANGER_FC_DOUBLE_GUEST_AGENT=1", false)] {
        let ns = support::Netns::new("fcwarm");
        let (d, c, _files) = setup_in(Some(env), 10, Some(&ns.0)).await;
        let w = warmed(&c, warm_img()).await.unwrap();
        assert!(w.network, "{w:?}");
        let events = create(
            &c,
            CreateVm {
                name: Some("n1".into()),
                image: Some("img".into()),
                memory_mib: Some(128),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let warm = events
            .iter()
            .any(|e| matches!(e, Progress::Stage { stage, .. } if stage == "warm"));
        let Some(Progress::Done { vm }) = events.last() else {
            panic!("{events:?}")
        };
        let text = console_of(vm);
        assert_eq!(warm, restores, "{env}: {events:?}");
        if restores {
            let ip = vm.ip.as_deref().unwrap();
            assert!(
                text.contains(&format!("{IDENTITY} n1: {ip}/24 (was ")),
                "{text}"
            );
            assert!(!text.contains("boot id"), "{text}");
        } else {
            assert!(text.contains("boot id"), "{env} booted: {text}");
        }
        support::delete_all(&c).await;
        drop(c);
        d.shutdown().await;
    }
}

/// A clone whose VMM died with the daemon before it took its identity (a restore cut
/// short) is stopped when re-adopted, and nothing is pending for it: its next start boots
/// it as its own machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_whose_vmm_died_before_its_identity_is_stopped_and_pending_nothing() {
    let (d, c, _files) = setup().await;
    small_vm(&c, "a").await;
    drop(c);
    let d = restarted_with(d, |store| {
        let mut rec = store.find_vm("a").unwrap().unwrap();
        rec.clone_of = Some(banger_actors::vm::model::CloneOf {
            vm: "src".into(),
            address: None,
        });
        // Its VMM as gone (the real one, claimed by no record now, is the census's).
        rec.runtime.as_mut().unwrap().pid = i32::MAX;
        store.put_vm(&rec).unwrap();
    })
    .await;
    let c = d.client().await;
    let shown = adopted(&c, "a").await;
    assert_eq!(shown.state, VmState::Stopped, "{shown:?}");
    assert_eq!(shown.clone_of, None, "{shown:?}");
    support::delete_all(&c).await;
    drop(c);
    d.shutdown().await;
}
