include!("../scripts/build-info.rs");

/// The release channel compiled into `banger update`: the manifest URL and the public key
/// releases must be signed with. Set at build time only (`BANGER_RELEASE_MANIFEST_URL`,
/// `BANGER_RELEASE_KEY` = a PEM file); the config cannot change them.
fn release_channel() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let key = std::env::var("BANGER_RELEASE_KEY")
        .unwrap_or_else(|_| format!("{manifest}/../scripts/release-key.pub"));
    let url = std::env::var("BANGER_RELEASE_MANIFEST_URL")
        .unwrap_or_else(|_| "https://example.invalid/banger/releases/manifest.json".into());
    println!("cargo:rustc-env=BANGER_RELEASE_KEY_FILE={key}");
    println!("cargo:rustc-env=BANGER_RELEASE_MANIFEST_URL={url}");
    println!("cargo:rerun-if-env-changed=BANGER_RELEASE_KEY");
    println!("cargo:rerun-if-env-changed=BANGER_RELEASE_MANIFEST_URL");
    println!("cargo:rerun-if-changed={key}");
}

fn main() {
    build_info();
    release_channel();
}
