//! The races of the store's check-and-write, run many times: each round starts the two
//! operations at once on a multi-threaded runtime and checks what the store and the disk
//! say afterwards. Without one transaction per check-and-write these fail within a few
//! rounds (checked against the code before the reservations).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_api::{CatalogEntry, CreateVm, PullImage, codes};

use super::fixtures::test_vm_config;
use super::{Tree, TreeError};
use crate::image::{ImageRecord, KernelRecord};
use crate::store::{Named, Store};

const ROUNDS: usize = 200;

/// A file `is_ext4` accepts (the superblock magic, nothing else).
fn fake_ext4(path: &Path) {
    let mut b = vec![0u8; 2048];
    b[1080] = 0x53;
    b[1081] = 0xEF;
    std::fs::write(path, b).unwrap();
}

/// Serve `bundles` (path → body) over HTTP/1.1 on 127.0.0.1, one thread per connection.
fn serve(bundles: Vec<(String, Vec<u8>)>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let bundles = Arc::new(bundles);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let bundles = Arc::clone(&bundles);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let body = bundles
                    .iter()
                    .find(|(p, _)| *p == path)
                    .map(|(_, b)| b.clone());
                let _ = match body {
                    Some(b) => conn
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                                b.len()
                            )
                            .as_bytes(),
                        )
                        .and_then(|()| conn.write_all(&b)),
                    None => conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    ),
                };
            });
        }
    });
    addr
}

/// A catalog image entry whose bundle says, in its manifest, that it came from `source`.
fn entry(
    dir: &Path,
    source: &str,
    addr: std::net::SocketAddr,
) -> (CatalogEntry, (String, Vec<u8>)) {
    let d = dir.join(format!("bundle-{source}"));
    std::fs::create_dir_all(&d).unwrap();
    fake_ext4(&d.join("rootfs.ext4"));
    std::fs::write(
        d.join("manifest.json"),
        serde_json::json!({ "source": source }).to_string(),
    )
    .unwrap();
    let mut body = Vec::new();
    let (size, sha256) = crate::pull::bundle::make_bundle(
        &[
            ("rootfs.ext4".into(), d.join("rootfs.ext4")),
            ("manifest.json".into(), d.join("manifest.json")),
        ],
        &mut body,
    )
    .unwrap();
    let path = format!("/{source}.tar.zst");
    let e = CatalogEntry {
        name: source.into(),
        arch: "x86_64".into(),
        bundle: Some(banger_api::Bundle {
            url: format!("http://{addr}{path}"),
            sha256,
            size,
        }),
        recipe: None,
        kernel_ref: None,
        description: format!("test image {source}"),
    };
    (e, (path, body))
}

fn code_of(e: &TreeError) -> i32 {
    match e {
        TreeError::Pull(p) => p.code(),
        TreeError::Store(s) => s.code(),
        TreeError::Vm(v) => v.code(),
        TreeError::NotFound(_) => codes::NOT_FOUND,
        _ => codes::INTERNAL_ERROR,
    }
}

/// Two pulls into one image name from different sources, at once: exactly one makes the
/// image, the other is refused with a conflict, and the record, the files and the answer
/// of the one that succeeded agree. (Before: both passed the "exists?" check, the second
/// removed the first's published directory and overwrote its record, and both succeeded.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pulls_into_one_name_from_different_sources_never_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    // The entries are made first (the server needs their bodies), then pointed at it.
    let tmp = tempfile::tempdir().unwrap();
    let placeholder: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let (a0, ba) = entry(tmp.path(), "src-a", placeholder);
    let (b0, bb) = entry(tmp.path(), "src-b", placeholder);
    let addr = serve(vec![ba, bb]);
    let fix = |mut e: CatalogEntry| {
        let b = e.bundle.as_mut().unwrap();
        b.url = b.url.replace(&placeholder.to_string(), &addr.to_string());
        e
    };
    let (a, b) = (fix(a0), fix(b0));

    let mut config = test_vm_config(dir.path());
    config.pull.catalogs = Arc::new(crate::pull::catalog::Catalogs {
        images: vec![a, b],
        kernels: Vec::new(),
    });
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let (tree, _join) = Tree::start(store, config, None).await.unwrap();

    // Rounds that went wrong: (round, what happened).
    let mut bad: Vec<(usize, String)> = Vec::new();
    for round in 0..ROUNDS {
        let name = format!("img-{round}");
        let pull = |source: &str| {
            let (tree, req) = (
                tree.clone(),
                PullImage {
                    source: source.into(),
                    name: Some(name.clone()),
                    ..Default::default()
                },
            );
            tokio::spawn(async move { tree.pull_image(req, None).await })
        };
        let (ra, rb) = (pull("src-a"), pull("src-b"));
        let (ra, rb) = (ra.await.unwrap(), rb.await.unwrap());
        let (winner, loser) = match (&ra, &rb) {
            (Ok(_), Ok(_)) => {
                bad.push((round, "both pulls succeeded".into()));
                continue;
            }
            (Ok(w), Err(l)) => (("src-a", w), l),
            (Err(l), Ok(w)) => (("src-b", w), l),
            (Err(x), Err(y)) => {
                bad.push((round, format!("both pulls failed: {x} / {y}")));
                continue;
            }
        };
        if code_of(loser) != codes::CONFLICT {
            bad.push((round, format!("the other pull is not a conflict: {loser}")));
            continue;
        }
        let stored = tree.image(name.clone()).await.unwrap();
        if stored.as_ref() != Some(winner.1) {
            bad.push((round, format!("the record is not the winner's: {stored:?}")));
            continue;
        }
        let manifest = dir.path().join("images").join(&name).join("manifest.json");
        match std::fs::read_to_string(&manifest) {
            Ok(m) if m.contains(winner.0) => {}
            other => bad.push((round, format!("the files are not the winner's: {other:?}"))),
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {ROUNDS} rounds went wrong: {bad:?}",
        bad.len()
    );
    // Nothing is left reserved: a pull into a fresh name, and into a taken one, behave.
    let e = tree
        .pull_image(
            PullImage {
                source: "src-a".into(),
                name: Some("img-0".into()),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    tree.stop();
}

/// Write an image record the way the code under test lets one in.
fn put_image(db: &Arc<Store>, rec: &ImageRecord) {
    db.reserve(Named::Image, &rec.name, "set up by a test")
        .unwrap()
        .publish_image(rec)
        .unwrap();
}

fn put_kernel(db: &Arc<Store>, rec: &KernelRecord) {
    db.reserve(Named::Kernel, &rec.name, "set up by a test")
        .unwrap()
        .publish_kernel(rec)
        .unwrap();
}

fn kernel_rec(name: &str) -> KernelRecord {
    KernelRecord {
        name: name.into(),
        kernel: PathBuf::from("/nonexistent/vmlinux"),
        initrd: None,
        modules: None,
        registered_at: 1,
        vmlinux: None,
        format: None,
        config: None,
        options: Default::default(),
    }
}

fn image_rec(name: &str) -> ImageRecord {
    ImageRecord {
        name: name.into(),
        rootfs: PathBuf::from("/nonexistent/rootfs.ext4"),
        size_bytes: 1 << 20,
        kernel: None,
        registered_at: 1,
    }
}

/// What a round deletes while a VM naming it is created.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Deleted {
    Image,
    Kernel,
}

/// `image delete` (or `kernel rm`) and a `vm create` naming that image (kernel), at once:
/// either the VM exists and so does what it names (the delete refused, naming the VM), or
/// that is gone and no VM names it (the create refused: not found). Never a VM whose image
/// or kernel was deleted under it.
async fn delete_and_create_at_once(what: Deleted) {
    let dir = tempfile::tempdir().unwrap();
    // VM disks are never made (no mkfs per round): `vms` is a file, so a create that got
    // its record in fails right after, at its disks; the record is what is checked.
    std::fs::write(dir.path().join("vms"), b"").unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let (tree, _join) = Tree::start(store, test_vm_config(dir.path()), None)
        .await
        .unwrap();
    let db = Arc::clone(&tree.db);
    match what {
        Deleted::Image => put_kernel(&db, &kernel_rec("k")),
        Deleted::Kernel => put_image(&db, &image_rec("img")),
    }
    let mut orphans = Vec::new();
    for round in 0..ROUNDS {
        let vm = format!("vm-{round}");
        let (image, kernel) = match what {
            Deleted::Image => (format!("img-{round}"), "k".to_owned()),
            Deleted::Kernel => ("img".to_owned(), format!("k-{round}")),
        };
        match what {
            Deleted::Image => put_image(&db, &image_rec(&image)),
            Deleted::Kernel => put_kernel(&db, &kernel_rec(&kernel)),
        }
        let create = {
            let (tree, req) = (
                tree.clone(),
                CreateVm {
                    name: Some(vm.clone()),
                    image: Some(image.clone()),
                    kernel: Some(kernel.clone()),
                    network: Some(false),
                    no_start: true,
                    ..Default::default()
                },
            );
            tokio::spawn(async move { tree.create_vm(req, None).await })
        };
        let delete = {
            let (tree, image, kernel) = (tree.clone(), image.clone(), kernel.clone());
            tokio::spawn(async move {
                match what {
                    Deleted::Image => tree.delete_image(image).await.map(|r| r.is_some()),
                    Deleted::Kernel => tree.remove_kernel(kernel).await.map(|r| r.is_some()),
                }
            })
        };
        let (created, deleted) = (create.await.unwrap(), delete.await.unwrap());
        let rec = db.find_vm(&vm).unwrap();
        let there = match what {
            Deleted::Image => db.get_image(&image).unwrap().is_some(),
            Deleted::Kernel => db.get_kernel(&kernel).unwrap().is_some(),
        };
        if rec.is_some() && !there {
            orphans.push(round);
            continue;
        }
        match (&rec, &deleted) {
            (Some(_), Err(e)) => {
                assert_eq!(code_of(e), codes::CONFLICT, "round {round}: {e}");
                assert!(
                    e.to_string().contains(&vm),
                    "round {round}: names the vm: {e}"
                );
            }
            (None, Ok(true)) => {
                let e = created.expect_err("no vm, so its create failed");
                assert_eq!(code_of(&e), codes::NOT_FOUND, "round {round}: {e}");
            }
            other => panic!("round {round}: vm {rec:?}, delete {deleted:?} ({other:?})"),
        }
    }
    assert!(
        orphans.is_empty(),
        "a vm was left naming a deleted {what:?} in {} of {ROUNDS} rounds: {:?}",
        orphans.len(),
        orphans
    );
    tree.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_delete_and_a_vm_create_of_it_never_leave_a_vm_without_its_image() {
    delete_and_create_at_once(Deleted::Image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_rm_and_a_vm_create_of_it_never_leave_a_vm_without_its_kernel() {
    delete_and_create_at_once(Deleted::Kernel).await;
}
