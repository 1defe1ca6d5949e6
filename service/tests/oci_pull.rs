//! OCI pulls through a real daemon against a real registry: Debian's `docker-registry` run
//! by the test on 127.0.0.1, images built by the test (layers written with the tar crate,
//! assembled with `umoci`, pushed with `skopeo`). The built ext4 is read back with debugfs.

mod pulls;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use banger_api::{ImageInfo, ImageRpcClient, PullEvent, PullImage, codes};
use jsonrpsee::async_client::Client;
use pulls::{E, Node, Registry};

struct Setup {
    reg: Registry,
    d: support::TestDaemon,
    c: Client,
    work: tempfile::TempDir,
}

/// Stand-ins for banger-init and banger-agent: small static ELFs (pulls refuse a guest
/// binary that is not one), told apart by their length; the boot test uses the real ones.
fn stand_in_init() -> Vec<u8> {
    banger_actors::kernel_format::fixture::minimal_elf(4096)
}

fn guest_dir(work: &Path) -> PathBuf {
    let g = work.join("guest");
    std::fs::create_dir_all(&g).unwrap();
    std::fs::write(g.join("banger-init"), stand_in_init()).unwrap();
    std::fs::write(
        g.join("banger-agent"),
        banger_actors::kernel_format::fixture::minimal_elf(8192),
    )
    .unwrap();
    g
}

async fn setup() -> Setup {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut config = support::test_config();
    config.images.insecure_registries = vec![reg.addr.clone()];
    config.images.guest_binaries_dir = Some(guest_dir(work.path()));
    let d = support::TestDaemon::start_with(tempfile::tempdir().unwrap(), config).await;
    let c = d.client().await;
    Setup { reg, d, c, work }
}

async fn pull(c: &Client, source: &str, name: Option<&str>) -> Result<ImageInfo, (i32, String)> {
    let mut sub = ImageRpcClient::pull(
        c,
        PullImage {
            source: source.into(),
            name: name.map(str::to_owned),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    while let Some(ev) = sub.next().await {
        match ev.unwrap() {
            PullEvent::Image { image } => return Ok(image),
            PullEvent::Failed { code, message } => return Err((code, message)),
            _ => {}
        }
    }
    panic!("the stream ended without a result");
}

fn base_layer() -> Vec<u8> {
    pulls::layer(&[
        E::dir("etc"),
        E::file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        E::dir("opt"),
        E::file("opt/old1", b"1"),
        E::file("opt/old2", b"2"),
        E::dir("gone"),
        E::file("gone/file", b"g"),
        E::file("remove-me", b"r"),
        E::dir("usr"),
        E::dir("usr/bin"),
        E::file("usr/bin/su", b"\x7fELF setuid").mode(0o4755),
        E::dir("usr/lib"),
        E::dir("home"),
        E::dir("home/user").mode(0o700).owner(1000, 1000),
        E::file("home/user/notes", b"mine")
            .mode(0o640)
            .owner(1000, 1000),
        E::file("xattr-file", b"x").xattr("user.test", b"hello"),
        E::file(".dockerenv", b""),
        E::dir("dev"),
        E::chardev("dev/null"),
    ])
}

fn top_layer() -> Vec<u8> {
    pulls::layer(&[
        E::file(".wh.remove-me", b""),
        E::file(".wh.gone", b""),
        E::file("opt/new", b"n"),
        E::file("opt/.wh..wh..opq", b""),
        E::hard("usr/bin/su-link", "usr/bin/su"),
        E::symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        E::symlink("usr/lib64", "lib"),
    ])
}

/// What the two layers above must give: path → (type+mode, uid, gid).
fn expected() -> BTreeMap<String, (u32, u32, u32)> {
    [
        ("dev", 0o40755, 0, 0),
        ("etc", 0o40755, 0, 0),
        ("etc/localtime", 0o120777, 0, 0),
        ("etc/passwd", 0o100644, 0, 0),
        ("home", 0o40755, 0, 0),
        ("home/user", 0o40700, 1000, 1000),
        ("home/user/notes", 0o100640, 1000, 1000),
        ("opt", 0o40755, 0, 0),
        ("opt/new", 0o100644, 0, 0),
        ("usr", 0o40755, 0, 0),
        ("usr/bin", 0o40755, 0, 0),
        ("usr/bin/su", 0o104755, 0, 0),
        ("usr/bin/su-link", 0o104755, 0, 0),
        ("usr/lib", 0o40755, 0, 0),
        ("usr/lib/banger", 0o40755, 0, 0),
        ("usr/lib/banger/banger-agent", 0o100755, 0, 0),
        ("usr/lib/banger/banger-init", 0o100755, 0, 0),
        ("usr/lib64", 0o120777, 0, 0),
        ("xattr-file", 0o100644, 0, 0),
    ]
    .into_iter()
    .map(|(p, m, u, g)| (p.to_owned(), (m, u, g)))
    .collect()
}

fn check_tree(image: &Path) {
    let tree = pulls::ext4_tree(image);
    let got: BTreeMap<String, (u32, u32, u32)> = tree
        .iter()
        .map(|(p, n)| (p.clone(), (n.mode, n.uid, n.gid)))
        .collect();
    assert_eq!(got, expected(), "the ext4 holds exactly the expected tree");
    let inode = |p: &str| tree.get(p).map(|n: &Node| n.inode);
    assert_eq!(inode("usr/bin/su"), inode("usr/bin/su-link"), "a hard link");
    assert_eq!(pulls::ext4_cat(image, "/opt/new"), b"n");
    assert_eq!(
        pulls::ext4_cat(image, "/usr/lib/banger/banger-init"),
        stand_in_init()
    );
    let stat = pulls::debugfs(image, "stat /etc/localtime");
    assert!(
        stat.contains("Fast link dest: \"/usr/share/zoneinfo/UTC\""),
        "{stat}"
    );
    let ea = pulls::debugfs(image, "ea_get /xattr-file user.test");
    assert!(ea.contains("hello"), "xattr kept: {ea}");
}

#[tokio::test]
async fn an_oci_image_becomes_an_exact_ext4_and_its_layers_are_cached() {
    let s = setup().await;
    let layers = [base_layer(), top_layer()];
    let oci = s
        .reg
        .push(s.work.path(), "test/img", "v1", &layers, "amd64", false);
    let v2s2 = s
        .reg
        .push(s.work.path(), "test/img", "docker", &layers, "amd64", true);
    let (_, _, raw) = s.reg.manifest(&v2s2);
    assert!(
        String::from_utf8_lossy(&raw)
            .contains("application/vnd.docker.distribution.manifest.v2+json"),
        "pushed as Docker v2 schema 2"
    );

    let img = pull(&s.c, &oci, None).await.expect("pull");
    assert_eq!(img.name, "img-v1");
    check_tree(Path::new(&img.rootfs));
    let gets = s.reg.blob_gets("test/img");
    assert_eq!(gets, 2, "two layers fetched");
    let cached = ImageRpcClient::cache_list(&s.c).await.unwrap();
    assert_eq!(cached.len(), 2, "{cached:?}");

    // Again under another name: every layer from the cache.
    let again = pull(&s.c, &oci, Some("again")).await.expect("second pull");
    check_tree(Path::new(&again.rootfs));
    assert_eq!(s.reg.blob_gets("test/img"), gets, "no blob fetched twice");

    // The Docker v2s2 manifest, and a pull by digest.
    let docker = pull(&s.c, &v2s2, Some("docker")).await.expect("v2s2 pull");
    check_tree(Path::new(&docker.rootfs));
    let (digest, _, _) = s.reg.manifest(&oci);
    let by_digest = format!("{}/test/img@{digest}", s.reg.addr);
    let d = pull(&s.c, &by_digest, None).await.expect("pull by digest");
    assert_eq!(d.name, format!("img-{}", &digest[7..19]));
    check_tree(Path::new(&d.rootfs));
    assert_eq!(
        s.reg.blob_gets("test/img"),
        gets,
        "still no blob fetched twice"
    );

    let pruned = ImageRpcClient::cache_prune(&s.c).await.unwrap();
    assert_eq!(pruned.removed.len(), 2);
    assert!(ImageRpcClient::cache_list(&s.c).await.unwrap().is_empty());
    // Images stay usable after a prune.
    assert!(Path::new(&img.rootfs).exists());
    s.d.shutdown().await;
}

#[tokio::test]
async fn an_index_resolves_to_linux_amd64() {
    let s = setup().await;
    let amd = s.reg.push(
        s.work.path(),
        "test/multi",
        "amd",
        &[pulls::layer(&[E::file("arch", b"amd64")])],
        "amd64",
        false,
    );
    let arm = s.reg.push(
        s.work.path(),
        "test/multi",
        "arm",
        &[pulls::layer(&[E::file("arch", b"arm64")])],
        "arm64",
        false,
    );
    let index = s
        .reg
        .push_index("test/multi", "both", &[(&arm, "arm64"), (&amd, "amd64")]);
    let img = pull(&s.c, &index, None).await.expect("pull of an index");
    assert_eq!(img.name, "multi-both");
    assert_eq!(pulls::ext4_cat(Path::new(&img.rootfs), "/arch"), b"amd64");
    s.d.shutdown().await;
}

#[tokio::test]
async fn hostile_layers_are_refused_and_leave_nothing() {
    let s = setup().await;
    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "traversal",
            vec![pulls::layer(&[E::file("../../escape", b"x")])],
            "entry ../../escape escapes the image root",
        ),
        (
            "through-symlink",
            vec![
                pulls::layer(&[E::symlink("evil", "/etc")]),
                pulls::layer(&[E::file("evil/passwd", b"pwned")]),
            ],
            "entry /evil/passwd goes through the symlink /evil",
        ),
        (
            "hardlink-out",
            vec![pulls::layer(&[E::hard("shadow", "../../../etc/shadow")])],
            "hard link /shadow -> ../../../etc/shadow points outside the image",
        ),
        (
            "symlink-out",
            vec![pulls::layer(&[E::dir("a"), E::symlink("a/up", "../../..")])],
            "symlink /a/up -> ../../.. escapes the image root",
        ),
    ];
    for (repo, layers, want) in cases {
        let reference = s.reg.push(
            s.work.path(),
            &format!("test/{repo}"),
            "v1",
            &layers,
            "amd64",
            false,
        );
        let (code, msg) = pull(&s.c, &reference, None).await.unwrap_err();
        assert!(msg.contains(want), "{repo}: {msg:?} should say {want:?}");
        assert!(msg.contains("refused layer sha256:"), "{msg}");
        assert_eq!(code, codes::INTERNAL_ERROR);
        for dir in [
            s.d.paths.data_dir.join("images"),
            s.d.paths.cache_dir.join("blobs/sha256"),
        ] {
            let left = pulls::leftovers(&dir);
            assert!(
                left.is_empty(),
                "{repo}: left in {}: {left:?}",
                dir.display()
            );
        }
        assert!(
            !s.d.paths
                .data_dir
                .join("images")
                .join(format!("{repo}-v1"))
                .exists()
        );
    }
    assert!(ImageRpcClient::list(&s.c).await.unwrap().is_empty());
    // A missing tag and an unreachable registry are clear errors too.
    let (_, msg) = pull(&s.c, &format!("{}/test/nothing:here", s.reg.addr), None)
        .await
        .unwrap_err();
    assert!(msg.contains("registry error for"), "{msg}");
    // A plain-HTTP registry that the config does not list: the error says what to set.
    let mut config = support::test_config();
    config.images.guest_binaries_dir = Some(guest_dir(s.work.path()));
    let strict = support::TestDaemon::start_with(tempfile::tempdir().unwrap(), config).await;
    let sc = strict.client().await;
    let (_, msg) = pull(&sc, &format!("{}/test/traversal:v1", s.reg.addr), None)
        .await
        .unwrap_err();
    assert!(msg.contains("insecure_registries"), "{msg}");
    strict.shutdown().await;
    let (code, msg) = pull(&s.c, "Bad/Reference:!!", None).await.unwrap_err();
    assert_eq!(code, codes::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("invalid image reference"), "{msg}");
    s.d.shutdown().await;
}

#[tokio::test]
async fn ten_concurrent_pulls_of_one_reference_download_once() {
    let s = setup().await;
    // ~2 MiB of incompressible data, so the download takes a moment.
    let mut big = vec![0u8; 2 << 20];
    let mut x: u32 = 12345;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let reference = s.reg.push(
        s.work.path(),
        "test/conc",
        "v1",
        &[
            pulls::layer(&[E::file("big", &big)]),
            pulls::layer(&[E::file("small", b"s")]),
        ],
        "amd64",
        false,
    );
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let c = s.d.client().await;
        let r = reference.clone();
        tasks.push(tokio::spawn(async move { pull(&c, &r, None).await }));
    }
    for t in tasks {
        let img = t.await.unwrap().expect("every pull succeeds");
        assert_eq!(img.name, "conc-v1");
    }
    assert_eq!(s.reg.blob_gets("test/conc"), 2, "each layer fetched once");
    assert_eq!(s.reg.manifest_gets("test/conc"), 1, "one manifest fetch");
    assert_eq!(ImageRpcClient::list(&s.c).await.unwrap().len(), 1);
    s.d.shutdown().await;
}

#[tokio::test]
async fn a_blob_download_cut_short_leaves_no_partial_and_a_retry_works() {
    let reg = Registry::start();
    let proxy = pulls::CuttingProxy::start(&reg.addr, 1000);
    let work = tempfile::tempdir().unwrap();
    let mut config = support::test_config();
    config.images.insecure_registries = vec![reg.addr.clone(), proxy.addr.clone()];
    config.images.guest_binaries_dir = Some(guest_dir(work.path()));
    let d = support::TestDaemon::start_with(tempfile::tempdir().unwrap(), config).await;
    let c = d.client().await;
    let big: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let direct = reg.push(
        work.path(),
        "test/cut",
        "v1",
        &[pulls::layer(&[E::file("big", &big)])],
        "amd64",
        false,
    );
    let proxied = direct.replace(&reg.addr, &proxy.addr);
    let (_, msg) = pull(&c, &proxied, Some("cut")).await.unwrap_err();
    assert!(
        msg.contains("download of") && msg.contains("blob sha256:"),
        "{msg}"
    );
    for dir in [
        d.paths.data_dir.join("images"),
        d.paths.cache_dir.join("blobs/sha256"),
    ] {
        let left = pulls::leftovers(&dir);
        assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
    }
    assert!(
        ImageRpcClient::cache_list(&c).await.unwrap().is_empty(),
        "nothing cached"
    );
    assert!(ImageRpcClient::list(&c).await.unwrap().is_empty());
    // Straight from the registry it works: nothing half-made was kept in the way.
    let img = pull(&c, &direct, Some("cut")).await.expect("retry");
    assert_eq!(pulls::ext4_cat(Path::new(&img.rootfs), "/big"), big);
    d.shutdown().await;
}

/// The path a daemon that is not root takes: owners recorded while replaying, then set in
/// the ext4 with debugfs. Same tree as with chown.
#[test]
fn owners_set_with_debugfs_give_the_same_tree() {
    use banger_actors::pull::{ext4, layers::Owners, oci};
    let work = tempfile::tempdir().unwrap();
    let blobs: Vec<(PathBuf, String)> = [base_layer(), top_layer()]
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let p = work.path().join(format!("l{i}"));
            std::fs::write(&p, l).unwrap();
            (p, format!("sha256:{}", pulls::sha256(l)))
        })
        .collect();
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let owners = oci::build_tree(
        &tree,
        &blobs,
        "test",
        &guest_dir(work.path()),
        Owners::Record,
    )
    .unwrap();
    assert!(
        owners
            .iter()
            .any(|(p, u, _)| p == Path::new("home/user") && *u == 1000)
    );
    let (bytes, inodes) = ext4::content_size(&tree).unwrap();
    let img = work.path().join("rootfs.ext4");
    ext4::mkfs(&tree, &img, ext4::auto_size(bytes, inodes), inodes).unwrap();
    ext4::set_owners(&img, &owners).unwrap();
    check_tree(&img);
}
