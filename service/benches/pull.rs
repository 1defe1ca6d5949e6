//! Pull throughput, against the same work done with the command-line tools in the same run.
//!
//! 1. OCI: a ~100 MB image (three layers of generated files) in a local `docker-registry`,
//!    pulled by bangerd to a finished ext4 (manifest, blobs, replay, mkfs.ext4 -d) with an
//!    empty layer cache each time, against `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d`
//!    to an ext4 of the same size.
//! 2. Bundle: the resulting image as a catalog bundle served over HTTP on 127.0.0.1, pulled
//!    by bangerd (download, sha256, zstd, tar, publish), against `sha256sum` +
//!    `zstd -dc | tar -x` of the same file already on disk.
//!
//! Medians of 3 runs; the ratio is bangerd's time over the tools'. Needs docker-registry,
//! umoci, skopeo, zstd (scripts/rig/install-deps.sh). Run:
//! `cargo bench -p bangerd --bench pull`.

#![allow(clippy::print_stdout)]

#[path = "../tests/pulls/mod.rs"]
mod pulls;
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use banger_api::{ImageRpcClient, PullEvent, PullImage};
use pulls::{E, FileServer, Registry, Serve};

const RUNS: usize = 3;

/// Generated file contents: pseudo-random words, about 2:1 compressible like real files.
fn content(seed: u32, len: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 16] = [
        b"the ", b"image ", b"layer ", b"banger ", b"kernel ", b"vm ", b"\n", b"0x1f ", b"static ",
        b"fn ", b"return ", b"{ ", b"} ", b"let ", b"mut ", b"i32 ",
    ];
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(WORDS[(x & 15) as usize]);
        if x & 0x300 == 0 {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

fn layers() -> Vec<Vec<u8>> {
    let mut small = vec![E::dir("usr"), E::dir("usr/share"), E::dir("usr/share/data")];
    for i in 0..3000 {
        small.push(E::file(
            &format!("usr/share/data/f{i}"),
            &content(i, 16 * 1024),
        ));
    }
    let mut mid = vec![E::dir("opt"), E::dir("opt/lib")];
    for i in 0..40 {
        mid.push(E::file(
            &format!("opt/lib/lib{i}.so"),
            &content(10_000 + i, 768 * 1024),
        ));
    }
    let big = vec![
        E::dir("var"),
        E::file("var/blob1", &content(77, 12 << 20)),
        E::file("var/blob2", &content(78, 8 << 20)),
    ];
    vec![pulls::layer(&small), pulls::layer(&mid), pulls::layer(&big)]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn sh(script: &str) {
    let st = Command::new("sh").arg("-c").arg(script).status().unwrap();
    assert!(st.success(), "{script}");
}

async fn pull(
    c: &jsonrpsee::async_client::Client,
    source: &str,
    name: &str,
) -> banger_api::ImageInfo {
    let mut sub = ImageRpcClient::pull(
        c,
        PullImage {
            source: source.into(),
            name: Some(name.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    while let Some(ev) = sub.next().await {
        match ev.unwrap() {
            PullEvent::Image { image } => return image,
            PullEvent::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    panic!("no result");
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let work = tempfile::tempdir().unwrap();
        let w = work.path();
        let guest = w.join("guest");
        std::fs::create_dir_all(&guest).unwrap();
        // Guest binaries must be static ELFs; small stand-ins do.
        let elf = banger_actors::kernel_format::fixture::minimal_elf(4096);
        std::fs::write(guest.join("banger-init"), &elf).unwrap();
        std::fs::write(guest.join("banger-agent"), &elf).unwrap();
        let reg = Registry::start();
        let layers = layers();
        let raw: usize = layers.iter().map(Vec::len).sum();
        let reference = reg.push(w, "bench/img", "v1", &layers, "amd64", false);
        println!("image: {} layers, {:.1} MB uncompressed", layers.len(), raw as f64 / 1e6);

        // --- OCI pull: bangerd, cold cache each run.
        let mut banger = Vec::new();
        let mut size = 0;
        let mut rootfs = std::path::PathBuf::new();
        let mut last_daemon = None;
        for i in 0..RUNS {
            let mut config = support::test_config();
            config.images.insecure_registries = vec![reg.addr.clone()];
            config.images.guest_binaries_dir = Some(guest.clone());
            let d = support::TestDaemon::start_with(tempfile::tempdir().unwrap(), config).await;
            let c = d.client().await;
            let t0 = Instant::now();
            let img = pull(&c, &reference, &format!("b{i}")).await;
            banger.push(t0.elapsed());
            size = img.size_bytes;
            rootfs = img.rootfs.into();
            if let Some(old) = last_daemon.replace(d) {
                old.shutdown().await;
            }
        }
        // --- The same with the tools.
        let mut tools = Vec::new();
        for i in 0..RUNS {
            let dir = w.join(format!("tools{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let d = dir.display();
            let t0 = Instant::now();
            sh(&format!(
                "skopeo --insecure-policy copy --quiet --src-tls-verify=false docker://{reference} oci:{d}/layout:t \
                 && umoci unpack --image {d}/layout:t {d}/bundle >/dev/null \
                 && truncate -s {size} {d}/rootfs.ext4 \
                 && mkfs.ext4 -q -F -O ^has_journal -d {d}/bundle/rootfs {d}/rootfs.ext4"
            ));
            tools.push(t0.elapsed());
            let _ = std::fs::remove_dir_all(&dir);
        }
        let (b, t) = (median(banger), median(tools));
        println!(
            "oci pull to ext4 ({} MiB image): bangerd {:.2}s, skopeo+umoci+mkfs {:.2}s, ratio {:.2}",
            size >> 20,
            b.as_secs_f64(),
            t.as_secs_f64(),
            b.as_secs_f64() / t.as_secs_f64()
        );

        // --- Bundle pull: the image just built, as a catalog bundle.
        let manifest = w.join("manifest.json");
        std::fs::write(&manifest, br#"{"kernel_ref":"k"}"#).unwrap();
        let bundle_path = w.join("bundle.tar.zst");
        let mut f = std::fs::File::create(&bundle_path).unwrap();
        banger_actors::pull::bundle::make_bundle(
            &[
                ("rootfs.ext4".into(), rootfs.clone()),
                ("manifest.json".into(), manifest),
            ],
            &mut f,
        )
        .unwrap();
        drop(f);
        let bytes = std::fs::read(&bundle_path).unwrap();
        let server = FileServer::start();
        let url = server.put("/b.tar.zst", Serve::Body(bytes.clone()));
        let (ip, kp) = pulls::catalogs(w, &[("bench", &url, &bytes, "k")], &[("k", &url, &bytes)]);
        let mut config = support::test_config();
        config.images.catalog = Some(ip);
        config.images.kernel_catalog = Some(kp);
        let d = support::TestDaemon::start_with(tempfile::tempdir().unwrap(), config).await;
        let c = d.client().await;
        let mut banger = Vec::new();
        for i in 0..RUNS {
            let t0 = Instant::now();
            pull(&c, "bench", &format!("bundle{i}")).await;
            banger.push(t0.elapsed());
        }
        d.shutdown().await;
        let mut tools = Vec::new();
        for i in 0..RUNS {
            let dir = w.join(format!("untar{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let t0 = Instant::now();
            sh(&format!(
                "sha256sum {b} >/dev/null && zstd -qdc {b} | tar -x -C {d}",
                b = bundle_path.display(),
                d = dir.display()
            ));
            tools.push(t0.elapsed());
            let _ = std::fs::remove_dir_all(&dir);
        }
        let (b, t) = (median(banger), median(tools));
        let mb = bytes.len() as f64 / 1e6;
        println!(
            "bundle pull ({mb:.1} MB .tar.zst): bangerd {:.2}s ({:.0} MB/s), sha256sum + zstd -dc | tar -x {:.2}s ({:.0} MB/s), ratio {:.2}",
            b.as_secs_f64(),
            mb / b.as_secs_f64(),
            t.as_secs_f64(),
            mb / t.as_secs_f64(),
            b.as_secs_f64() / t.as_secs_f64()
        );
    });
}
