//! Catalog pulls through a real daemon: bundles served by a local HTTP server the test
//! starts on 127.0.0.1, catalogs injected through `[images] catalog`/`kernel_catalog`.
//! Honest bundles are published and recorded; hostile or broken ones are refused with a
//! clear error and leave nothing behind; concurrent pulls share one download; `vm create`
//! pulls its missing default image and kernel.

mod pulls;
mod support;

use std::time::Duration;

use banger_api::{
    CreateVm, ImageRpcClient, KernelRpcClient, Progress, PullEvent, PullImage, PullKernel,
    VmRpcClient, codes,
};
use jsonrpsee::async_client::Client;
use pulls::{FileServer, Raw, Serve};

/// Collect a pull's events; Ok(events) when it ended with a result, Err((code, message)).
async fn collect(
    mut sub: jsonrpsee::core::client::Subscription<PullEvent>,
) -> Result<Vec<PullEvent>, (i32, String)> {
    let mut events = Vec::new();
    while let Some(ev) = sub.next().await {
        let ev = ev.expect("stream item");
        match ev {
            PullEvent::Failed { code, message } => return Err((code, message)),
            e @ (PullEvent::Image { .. } | PullEvent::Kernel { .. }) => {
                events.push(e);
                return Ok(events);
            }
            e => events.push(e),
        }
    }
    panic!("the stream ended without a result: {events:?}");
}

async fn pull_image(c: &Client, source: &str) -> Result<Vec<PullEvent>, (i32, String)> {
    let sub = ImageRpcClient::pull(
        c,
        PullImage {
            source: source.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    collect(sub).await
}

async fn pull_kernel(c: &Client, name: &str) -> Result<Vec<PullEvent>, (i32, String)> {
    let sub = KernelRpcClient::pull(c, PullKernel { name: name.into() })
        .await
        .unwrap();
    collect(sub).await
}

struct Setup {
    d: support::TestDaemon,
    c: Client,
    server: FileServer,
    _files: tempfile::TempDir,
}

/// A daemon whose catalogs hold `images`/`kernels` served by a fresh file server.
/// `images`: (name, path on the server, how, the bytes the catalog describes, kernel_ref).
async fn setup(
    images: &[(&str, &str, Serve, Vec<u8>, &str)],
    kernels: &[(&str, &str, Serve, Vec<u8>)],
    default_image: Option<&str>,
) -> Setup {
    let files = tempfile::tempdir().unwrap();
    let server = FileServer::start();
    let imgs: Vec<(String, String, Vec<u8>, String)> = images
        .iter()
        .map(|(n, p, how, b, k)| {
            (
                n.to_string(),
                server.put(p, how.clone()),
                b.clone(),
                k.to_string(),
            )
        })
        .collect();
    let kers: Vec<(String, String, Vec<u8>)> = kernels
        .iter()
        .map(|(n, p, how, b)| (n.to_string(), server.put(p, how.clone()), b.clone()))
        .collect();
    let i: Vec<(&str, &str, &[u8], &str)> = imgs
        .iter()
        .map(|(n, u, b, k)| (n.as_str(), u.as_str(), b.as_slice(), k.as_str()))
        .collect();
    let k: Vec<(&str, &str, &[u8])> = kers
        .iter()
        .map(|(n, u, b)| (n.as_str(), u.as_str(), b.as_slice()))
        .collect();
    let (ip, kp) = pulls::catalogs(files.path(), &i, &k);
    let mut config = support::test_config();
    config.images.catalog = Some(ip);
    config.images.kernel_catalog = Some(kp);
    config.default_image_name = default_image.map(str::to_owned);
    config.agent_timeout_secs = 0;
    let d = support::TestDaemon::start_with(tempfile::tempdir().unwrap(), config).await;
    let c = d.client().await;
    Setup {
        d,
        c,
        server,
        _files: files,
    }
}

fn assert_clean(s: &Setup) {
    for dir in ["images", "kernels"] {
        let left = pulls::leftovers(&s.d.paths.data_dir.join(dir));
        assert!(left.is_empty(), "left behind in {dir}: {left:?}");
    }
}

#[tokio::test]
async fn image_and_kernel_bundles_are_pulled_published_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let img = pulls::image_bundle(tmp.path(), "k1");
    let ker = pulls::kernel_bundle(tmp.path());
    let s = setup(
        &[("deb", "/deb.tar.zst", Serve::Body(img.clone()), img, "k1")],
        &[("k1", "/k1.tar.zst", Serve::Body(ker.clone()), ker)],
        None,
    )
    .await;
    let events = pull_image(&s.c, "deb").await.expect("pull");
    let stages: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            PullEvent::Stage { stage, .. } => Some(stage.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stages, ["download", "publish"], "{events:?}");
    let Some(PullEvent::Image { image }) = events.last() else {
        panic!("{events:?}")
    };
    assert_eq!(image.name, "deb");
    assert_eq!(image.kernel.as_deref(), Some("k1"));
    let rootfs = std::path::Path::new(&image.rootfs);
    assert!(banger_actors::image::is_ext4(rootfs).unwrap());
    assert_eq!(
        rootfs.parent().unwrap(),
        s.d.paths.data_dir.join("images/deb")
    );
    let shown = ImageRpcClient::show(&s.c, "deb".into()).await.unwrap();
    assert_eq!(&shown, image);

    // The same name again is a conflict, and downloads nothing.
    let (code, msg) = pull_image(&s.c, "deb").await.unwrap_err();
    assert_eq!(code, codes::CONFLICT, "{msg}");
    assert_eq!(s.server.hits("/deb.tar.zst"), 1);

    let events = pull_kernel(&s.c, "k1").await.expect("kernel pull");
    let Some(PullEvent::Kernel { kernel }) = events.last() else {
        panic!("{events:?}")
    };
    let kdir = s.d.paths.data_dir.join("kernels/k1");
    // The bzImage as shipped (QEMU boots it), and beside it the ELF it carries.
    assert_eq!(kernel.kernel, kdir.join("vmlinuz").display().to_string());
    assert_eq!(
        kernel.vmlinux.as_deref(),
        Some(kdir.join("vmlinux").to_str().unwrap())
    );
    assert_eq!(
        kernel.format.as_deref(),
        Some("bzImage (LZ4 (legacy frame) payload)")
    );
    assert_eq!(
        std::fs::read(kdir.join("vmlinux")).unwrap(),
        pulls::kernel_elf()
    );
    assert_eq!(
        kernel.initrd.as_deref(),
        Some(kdir.join("initrd").to_str().unwrap())
    );
    assert_eq!(
        std::fs::read(kdir.join("modules/6.1.0/alias.ko")).unwrap(),
        b"module"
    );
    assert!(
        std::fs::symlink_metadata(kdir.join("modules/6.1.0/alias.ko"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let avail = KernelRpcClient::available(&s.c).await.unwrap();
    assert_eq!(avail.len(), 1);
    assert_clean(&s);
    s.d.shutdown().await;
}

#[tokio::test]
async fn ten_concurrent_pulls_share_one_download() {
    let tmp = tempfile::tempdir().unwrap();
    let img = pulls::image_bundle(tmp.path(), "k1");
    let s = setup(
        &[(
            "deb",
            "/deb.tar.zst",
            Serve::Slow(img.clone(), Duration::from_millis(700)),
            img,
            "k1",
        )],
        &[("k1", "/k1.tar.zst", Serve::Body(vec![1]), vec![1])],
        None,
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let c = s.d.client().await;
        tasks.push(tokio::spawn(async move { pull_image(&c, "deb").await }));
    }
    let mut names = Vec::new();
    for t in tasks {
        let events = t.await.unwrap().expect("every pull succeeds");
        // Every waiter hears the progress, joiners included.
        assert!(
            events
                .iter()
                .any(|e| matches!(e, PullEvent::Stage { stage, .. } if stage == "download" || stage == "publish")),
            "{events:?}"
        );
        match events.last() {
            Some(PullEvent::Image { image }) => names.push(image.name.clone()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(names, vec!["deb"; 10]);
    assert_eq!(
        s.server.hits("/deb.tar.zst"),
        1,
        "one download for ten pulls"
    );
    assert_clean(&s);
    s.d.shutdown().await;
}

/// Build a zstd'd tar by hand (hostile names go in raw).
fn hostile(entries: &[Raw<'_>]) -> Vec<u8> {
    pulls::zstd(&pulls::raw_tar(entries))
}

#[tokio::test]
async fn hostile_and_broken_bundles_are_refused_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let good = pulls::image_bundle(tmp.path(), "k1");
    let ext4 = std::fs::read(pulls::small_ext4(tmp.path())).unwrap();
    let manifest = br#"{"kernel_ref":"k1"}"#;
    let extra = hostile(&[
        Raw::File("rootfs.ext4", &ext4),
        Raw::File("manifest.json", manifest),
        Raw::File("extra.sh", b"#!/bin/sh\n"),
    ]);
    let traversal = hostile(&[
        Raw::File("rootfs.ext4", &ext4),
        Raw::File("../../escape", b"x"),
    ]);
    let absolute = hostile(&[Raw::File("/etc/evil", b"x")]);
    let device = hostile(&[Raw::CharDev("rootfs.ext4")]);
    let not_ext4 = hostile(&[
        Raw::File("rootfs.ext4", b"not a filesystem"),
        Raw::File("manifest.json", manifest),
    ]);
    let k_escape = hostile(&[
        Raw::File("vmlinux", b"k"),
        Raw::Dir("modules"),
        Raw::Symlink("modules/build", "../../../../usr/src"),
    ]);
    let k_hardlink = hostile(&[
        Raw::File("vmlinux", b"k"),
        Raw::Dir("modules"),
        Raw::HardLink("modules/x", "/etc/shadow"),
    ]);
    let k_through = hostile(&[
        Raw::File("vmlinux", b"k"),
        Raw::Dir("modules"),
        Raw::Symlink("modules/link", "."),
        Raw::File("modules/link/file", b"x"),
    ]);
    // A kernel file that is neither an ELF nor a bzImage: refused at the pull, not at boot.
    let k_junk = hostile(&[Raw::File("vmlinuz", b"not a kernel at all")]);
    let mut wrong_sha = good.clone();
    let n = wrong_sha.len();
    wrong_sha[n / 2] ^= 0xff;
    let s = setup(
        &[
            ("extra", "/extra", Serve::Body(extra.clone()), extra, "k1"),
            (
                "trav",
                "/trav",
                Serve::Body(traversal.clone()),
                traversal,
                "k1",
            ),
            ("abs", "/abs", Serve::Body(absolute.clone()), absolute, "k1"),
            ("dev", "/dev", Serve::Body(device.clone()), device, "k1"),
            (
                "noext4",
                "/noext4",
                Serve::Body(not_ext4.clone()),
                not_ext4,
                "k1",
            ),
            // Served bytes differ from what the catalog describes.
            ("sha", "/sha", Serve::Body(wrong_sha), good.clone(), "k1"),
            (
                "short",
                "/short",
                Serve::Truncate(good.clone(), good.len() / 3),
                good.clone(),
                "k1",
            ),
            ("gone", "/missing", Serve::Body(vec![]), good.clone(), "k1"),
        ],
        &[
            ("k1", "/k1", Serve::Body(k_escape.clone()), k_escape),
            ("k2", "/k2", Serve::Body(k_hardlink.clone()), k_hardlink),
            ("k3", "/k3", Serve::Body(k_through.clone()), k_through),
            ("k4", "/k4", Serve::Body(k_junk.clone()), k_junk),
        ],
        None,
    )
    .await;
    let cases: &[(&str, &[&str])] = &[
        (
            "extra",
            &[
                "unexpected entry extra.sh",
                "only rootfs.ext4 and manifest.json",
            ],
        ),
        ("trav", &["../../escape escapes the bundle"]),
        ("abs", &["/etc/evil escapes the bundle"]),
        ("dev", &["character device"]),
        ("noext4", &["rootfs.ext4 is not an ext4 filesystem"]),
        (
            "sha",
            &["sha256 of", "the catalog says", &pulls::sha256(&good)],
        ),
        ("short", &["cut short", "try again"]),
    ];
    for (name, wants) in cases {
        let (code, msg) = pull_image(&s.c, name).await.unwrap_err();
        for w in *wants {
            assert!(msg.contains(w), "{name}: {msg:?} should say {w:?}");
        }
        assert_ne!(code, codes::NOT_FOUND, "{name}: {msg}");
        assert_clean(&s);
        assert!(!s.d.paths.data_dir.join("images").join(name).exists());
    }
    let (_, msg) = pull_image(&s.c, "gone").await.unwrap_err();
    assert!(msg.contains("sha256") || msg.contains("cut short"), "{msg}");
    for (name, want) in [
        (
            "k1",
            "symlink modules/build -> ../../../../usr/src leaves the modules/ tree",
        ),
        ("k2", "hard link"),
        ("k3", "goes through modules/link, which is not a directory"),
        (
            "k4",
            "bad kernel bundle: vmlinuz is not a kernel banger can use: neither an ELF vmlinux",
        ),
    ] {
        let (_, msg) = pull_kernel(&s.c, name).await.unwrap_err();
        assert!(msg.contains(want), "{name}: {msg:?} should say {want:?}");
        assert_clean(&s);
    }
    assert!(ImageRpcClient::list(&s.c).await.unwrap().is_empty());
    assert!(KernelRpcClient::list(&s.c).await.unwrap().is_empty());

    // Unknown names list what exists.
    let (code, msg) = pull_image(&s.c, "nosuch").await.unwrap_err();
    assert_eq!(code, codes::NOT_FOUND);
    assert!(msg.contains("no image named \"nosuch\""), "{msg}");
    assert!(msg.contains("available: extra, trav, abs"), "{msg}");
    let (code, msg) = pull_kernel(&s.c, "nosuch").await.unwrap_err();
    assert_eq!(code, codes::NOT_FOUND);
    assert!(msg.contains("available: k1, k2, k3, k4"), "{msg}");
    // The daemon is still up.
    assert_eq!(ImageRpcClient::available(&s.c).await.unwrap().len(), 8);
    s.d.shutdown().await;
}

#[tokio::test]
async fn vm_create_pulls_the_missing_default_image_and_its_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let img = pulls::image_bundle(tmp.path(), "k1");
    let ker = pulls::kernel_bundle(tmp.path());
    let s = setup(
        &[("golden", "/g.tar.zst", Serve::Body(img.clone()), img, "k1")],
        &[("k1", "/k1.tar.zst", Serve::Body(ker.clone()), ker)],
        Some("golden"),
    )
    .await;
    let mut sub = VmRpcClient::create(
        &s.c,
        CreateVm {
            name: Some("auto".into()),
            no_start: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut pull_stages = Vec::new();
    let vm = loop {
        match sub.next().await.expect("an item").unwrap() {
            Progress::Stage { stage, detail } if stage == "pull" => {
                pull_stages.push(detail.unwrap_or_default())
            }
            Progress::Done { vm } => break vm,
            Progress::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    };
    assert_eq!(pull_stages.len(), 2, "{pull_stages:?}");
    assert!(pull_stages[0].contains("image golden"), "{pull_stages:?}");
    assert!(pull_stages[1].contains("kernel k1"), "{pull_stages:?}");
    assert_eq!((vm.image.as_str(), vm.kernel.as_str()), ("golden", "k1"));
    assert_eq!(s.server.hits("/g.tar.zst"), 1);
    assert_eq!(s.server.hits("/k1.tar.zst"), 1);
    // Present now: a second VM pulls nothing.
    let mut sub = VmRpcClient::create(
        &s.c,
        CreateVm {
            name: Some("again".into()),
            no_start: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    loop {
        match sub.next().await.expect("an item").unwrap() {
            Progress::Stage { stage, .. } => assert_ne!(stage, "pull"),
            Progress::Done { .. } => break,
            Progress::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    assert_eq!(s.server.hits("/g.tar.zst"), 1);
    s.d.shutdown().await;
}
