//! `updater::stage` on a release served from 127.0.0.1: download streamed through SHA-256,
//! signature check, hash check, unpack — the part of `banger update` that scales with the
//! release's size.
//!
//! Run: `cargo bench -p banger-update --bench update_stage`. Prints the time per stage and
//! MB/s for a 64 MiB release (two 32 MiB "binaries", gzip level 1).

#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use base64::Engine;
use p256::ecdsa::{Signature, SigningKey, signature::Signer};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use sha2::{Digest, Sha256};

use banger_update::{self as updater, Release};

fn serve(root: std::path::PathBuf) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let body =
                    std::fs::read(root.join(path.trim_start_matches('/'))).unwrap_or_default();
                let mut conn = conn;
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(&body);
            });
        }
    });
    addr
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    // Incompressible-ish content, like machine code: a xorshift stream.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut blob = vec![0u8; 32 << 20];
    for chunk in blob.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let arch = std::env::consts::ARCH;
    let name = format!("banger-9.9.9-{arch}-linux.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(www.join(&name)).unwrap(),
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        for f in ["banger", "bangerd"] {
            let mut h = tar::Header::new_gnu();
            h.set_size(blob.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            tar.append_data(&mut h, f, blob.as_slice()).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }
    let bytes = std::fs::read(www.join(&name)).unwrap();
    let size = bytes.len();
    let sums = format!("{:x}  {name}\n", Sha256::digest(&bytes));
    let key = SigningKey::from_bytes(&[3u8; 32].into()).unwrap();
    let sig: Signature = key.sign(sums.as_bytes());
    std::fs::write(www.join("SHA256SUMS"), &sums).unwrap();
    std::fs::write(
        www.join("SHA256SUMS.sig"),
        base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes()),
    )
    .unwrap();
    let addr = serve(www);
    let pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let src = updater::Source::new(&format!("http://{addr}/manifest.json"), &pem).unwrap();
    let rel = Release {
        version: "9.9.9".into(),
        commit: None,
        date: None,
        tarballs: [(arch.to_owned(), name.clone())].into(),
        sha256sums: "SHA256SUMS".into(),
        signature: "SHA256SUMS.sig".into(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let staging = dir.path().join("staging");
    let runs = 5;
    let mut times: Vec<Duration> = Vec::new();
    rt.block_on(async {
        for _ in 0..runs + 1 {
            let t = Instant::now();
            let staged = updater::stage(&src, &rel, arch, &staging).await.unwrap();
            times.push(t.elapsed());
            drop(staged);
        }
    });
    times.remove(0);
    times.sort();
    let med = times[times.len() / 2];
    println!(
        "updater::stage, {:.1} MiB tarball (2 x 32 MiB files), {runs} runs: median {med:?} ({:.0} MiB/s), min {:?}, max {:?}",
        size as f64 / (1 << 20) as f64,
        size as f64 / (1 << 20) as f64 / med.as_secs_f64(),
        times[0],
        times[times.len() - 1],
    );
}
