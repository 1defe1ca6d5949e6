//! The image and kernel catalogs: JSON files in `images/` embedded at build time
//! (`images/images.json`, `images/kernels.json`), or files named by the config
//! (`[images] catalog`, `kernel_catalog`), validated before the daemon uses them.
//!
//! Schema version 2 (one object per file):
//! ```json
//! { "version": 2, "images": [ { "name": "debian-bookworm", "arch": "x86_64",
//!   "recipe": { "suite": "bookworm", "packages": ["systemd", "…"],
//!               "kernel_package": "linux-image-cloud-amd64" },
//!   "bundle": { "url": "https://…/debian-bookworm-x86_64.tar.zst", "sha256": "<64 hex>",
//!               "size": 123456 },
//!   "kernel_ref": "cloud-6.1", "description": "…" } ] }
//! ```
//! An image entry has a `bundle`, a `recipe` or both: `image pull` downloads the bundle
//! when there is one and builds the recipe otherwise (`--build` forces the recipe, see
//! [`super::build`]). A bundle needs a `kernel_ref` naming an entry of the kernel
//! catalog; an image built from its recipe boots the kernel the recipe installed, so a
//! recipe-only entry has no `kernel_ref`. The kernel file has `"kernels"` instead of
//! `"images"`, bundle-only entries and no `kernel_ref`. Names follow the image name rules;
//! `sha256` is 64 lowercase hex digits; `size` is the bundle's size in bytes; suites and
//! package names follow Debian's rules. Unknown fields are errors.
//!
//! Version 1 files (the bundle's `url`, `sha256` and `size` at the top of each entry) are
//! still read, as bundle-only entries.

use std::path::Path;

use serde::Deserialize;

use banger_api::{Bundle, CatalogEntry, Recipe};

/// The embedded image catalog.
pub const EMBEDDED_IMAGES: &str = include_str!("../../../images/images.json");
/// The embedded kernel catalog.
pub const EMBEDDED_KERNELS: &str = include_str!("../../../images/kernels.json");

/// The catalog schema version this binary writes; it also reads version 1.
pub const CATALOG_VERSION: u32 = 2;

/// Errors loading a catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the catalog {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what} catalog: {message}")]
    Invalid { what: &'static str, message: String },
}

/// An entry as written, in either schema version.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    arch: String,
    // Version 1.
    url: Option<String>,
    sha256: Option<String>,
    size: Option<u64>,
    // Version 2.
    bundle: Option<Bundle>,
    recipe: Option<Recipe>,
    kernel_ref: Option<String>,
    description: String,
}

impl RawEntry {
    fn into_entry(self, what: &'static str, version: u32) -> Result<CatalogEntry, CatalogError> {
        let bad = |message: String| CatalogError::Invalid {
            what,
            message: format!("entry {:?}: {message}", self.name),
        };
        let flat = self.url.is_some() || self.sha256.is_some() || self.size.is_some();
        let bundle = match version {
            1 => {
                if self.bundle.is_some() || self.recipe.is_some() {
                    return Err(bad(
                        "bundle and recipe are version 2 fields (write \"version\": 2)".into(),
                    ));
                }
                match (self.url.clone(), self.sha256.clone(), self.size) {
                    (Some(url), Some(sha256), Some(size)) => Some(Bundle { url, sha256, size }),
                    _ => return Err(bad("a version 1 entry needs url, sha256 and size".into())),
                }
            }
            _ => {
                if flat {
                    return Err(bad(
                        "url, sha256 and size go inside \"bundle\" in version 2".into(),
                    ));
                }
                self.bundle.clone()
            }
        };
        Ok(CatalogEntry {
            name: self.name,
            arch: self.arch,
            bundle,
            recipe: self.recipe,
            kernel_ref: self.kernel_ref,
            description: self.description,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageFile {
    version: u32,
    images: Vec<RawEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KernelFile {
    version: u32,
    kernels: Vec<RawEntry>,
}

fn entries(
    what: &'static str,
    version: u32,
    raw: Vec<RawEntry>,
) -> Result<Vec<CatalogEntry>, CatalogError> {
    if !(1..=CATALOG_VERSION).contains(&version) {
        return Err(CatalogError::Invalid {
            what,
            message: format!(
                "version {version}; this banger reads versions 1 to {CATALOG_VERSION} (update banger)"
            ),
        });
    }
    raw.into_iter()
        .map(|e| e.into_entry(what, version))
        .collect()
}

/// Both catalogs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalogs {
    pub images: Vec<CatalogEntry>,
    pub kernels: Vec<CatalogEntry>,
}

impl Catalogs {
    /// The catalogs built into this binary.
    pub fn embedded() -> Result<Catalogs, CatalogError> {
        Catalogs::parse(EMBEDDED_IMAGES, EMBEDDED_KERNELS)
    }

    /// The catalogs from files, each falling back to the embedded one when `None`.
    pub fn load(images: Option<&Path>, kernels: Option<&Path>) -> Result<Catalogs, CatalogError> {
        let read = |p: Option<&Path>, default: &'static str| match p {
            Some(p) => std::fs::read_to_string(p).map_err(|source| CatalogError::Read {
                path: p.to_owned(),
                source,
            }),
            None => Ok(default.to_owned()),
        };
        Catalogs::parse(
            &read(images, EMBEDDED_IMAGES)?,
            &read(kernels, EMBEDDED_KERNELS)?,
        )
    }

    /// Parse and validate both catalogs.
    pub fn parse(images: &str, kernels: &str) -> Result<Catalogs, CatalogError> {
        let img: ImageFile = serde_json::from_str(images).map_err(|e| CatalogError::Invalid {
            what: "image",
            message: e.to_string(),
        })?;
        let ker: KernelFile = serde_json::from_str(kernels).map_err(|e| CatalogError::Invalid {
            what: "kernel",
            message: e.to_string(),
        })?;
        let kernels = entries("kernel", ker.version, ker.kernels)?;
        let images = entries("image", img.version, img.images)?;
        validate("kernel", &kernels, None)?;
        validate("image", &images, Some(&kernels))?;
        Ok(Catalogs { images, kernels })
    }

    pub fn image(&self, name: &str) -> Option<&CatalogEntry> {
        self.images.iter().find(|e| e.name == name)
    }

    pub fn kernel(&self, name: &str) -> Option<&CatalogEntry> {
        self.kernels.iter().find(|e| e.name == name)
    }
}

/// Names of a catalog's entries, for error messages (`a, b, c` or `none`).
pub fn names(entries: &[CatalogEntry]) -> String {
    if entries.is_empty() {
        "none".into()
    } else {
        entries
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn validate(
    what: &'static str,
    entries: &[CatalogEntry],
    kernels: Option<&[CatalogEntry]>,
) -> Result<(), CatalogError> {
    let bad = |name: &str, message: String| CatalogError::Invalid {
        what,
        message: format!("entry {name:?}: {message}"),
    };
    let mut seen = std::collections::HashSet::new();
    for e in entries {
        crate::image::validate_name(&e.name).map_err(|err| bad(&e.name, err.to_string()))?;
        if !seen.insert(e.name.as_str()) {
            return Err(bad(&e.name, "appears twice".into()));
        }
        if e.arch != "x86_64" {
            return Err(bad(&e.name, format!("arch {:?}: only x86_64", e.arch)));
        }
        if let Some(b) = &e.bundle {
            let url = url_scheme(&b.url);
            if !matches!(url, Some("http" | "https")) {
                return Err(bad(&e.name, format!("url {:?} is not http(s)", b.url)));
            }
            if b.sha256.len() != 64
                || !b
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(bad(&e.name, "sha256 is not 64 lowercase hex digits".into()));
            }
            if b.size == 0 {
                return Err(bad(&e.name, "size is 0".into()));
            }
        }
        match (&e.bundle, &e.recipe, kernels) {
            (None, None, _) => {
                return Err(bad(
                    &e.name,
                    "has neither a bundle nor a recipe: nothing could ever be fetched".into(),
                ));
            }
            (_, Some(_), None) => {
                return Err(bad(
                    &e.name,
                    "a kernel comes as a bundle, not a recipe".into(),
                ));
            }
            (_, Some(r), Some(_)) => {
                super::build::validate_recipe(r).map_err(|err| bad(&e.name, err.to_string()))?
            }
            _ => {}
        }
        if e.description.trim().is_empty() {
            return Err(bad(&e.name, "description is empty".into()));
        }
        match (kernels, &e.kernel_ref) {
            (None, Some(_)) => return Err(bad(&e.name, "a kernel has no kernel_ref".into())),
            (Some(_), None) if e.bundle.is_some() => {
                return Err(bad(&e.name, "kernel_ref is missing".into()));
            }
            (Some(_), Some(_)) if e.bundle.is_none() => {
                return Err(bad(
                    &e.name,
                    "kernel_ref is for a bundle; a recipe's image boots the kernel it installs"
                        .into(),
                ));
            }
            (Some(k), Some(r)) if !k.iter().any(|k| &k.name == r) => {
                return Err(bad(
                    &e.name,
                    format!("kernel_ref {r:?} is not in the kernel catalog"),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn url_scheme(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    (!rest.is_empty()).then_some(scheme)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, kernel_ref: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "name": name, "arch": "x86_64", "url": "http://127.0.0.1:1/x.tar.zst",
            "sha256": "ab".repeat(32), "size": 10, "kernel_ref": kernel_ref,
            "description": "d"
        })
    }

    fn files(images: serde_json::Value, kernels: serde_json::Value) -> (String, String) {
        (
            serde_json::json!({"version": 1, "images": images}).to_string(),
            serde_json::json!({"version": 1, "kernels": kernels}).to_string(),
        )
    }

    #[test]
    fn the_embedded_catalogs_are_valid_and_fetchable() {
        let c = Catalogs::embedded().unwrap();
        assert!(!c.images.is_empty());
        let lean = c.image("debian-bookworm").expect("the default image");
        let dev = c.image("debian-bookworm-dev").expect("the dev image");
        for e in [lean, dev] {
            let r = e.recipe.as_ref().expect("built from a recipe");
            for p in [
                "systemd",
                "openssh-server",
                "ca-certificates",
                "curl",
                "iproute2",
                "git",
                "sudo",
                "less",
            ] {
                assert!(r.packages.iter().any(|x| x == p), "{} lacks {p}", e.name);
            }
        }
        let dev_r = dev.recipe.as_ref().unwrap();
        assert!(dev_r.packages.iter().any(|p| p == "docker.io"));
        assert!(dev_r.packages.iter().any(|p| p == "build-essential"));
        // No placeholder: every bundle there is must be somewhere real.
        for e in c.images.iter().chain(&c.kernels) {
            if let Some(b) = &e.bundle {
                assert!(
                    !b.url.contains("example.invalid"),
                    "{}: placeholder url",
                    e.name
                );
                assert_ne!(b.sha256, "0".repeat(64), "{}: placeholder sha256", e.name);
            }
        }
    }

    fn v2(images: serde_json::Value, kernels: serde_json::Value) -> (String, String) {
        (
            serde_json::json!({"version": 2, "images": images}).to_string(),
            serde_json::json!({"version": 2, "kernels": kernels}).to_string(),
        )
    }

    #[test]
    fn version_2_entries_have_a_bundle_a_recipe_or_both() {
        let bundle = serde_json::json!({"url": "http://127.0.0.1:1/x.tar.zst", "sha256": "ab".repeat(32), "size": 10});
        let recipe = serde_json::json!({"suite": "bookworm", "packages": ["git"]});
        let k = serde_json::json!([{"name": "k", "arch": "x86_64", "bundle": bundle, "description": "d"}]);
        let (i, kk) = v2(
            serde_json::json!([
                {"name": "b", "arch": "x86_64", "bundle": bundle, "kernel_ref": "k", "description": "d"},
                {"name": "r", "arch": "x86_64", "recipe": recipe, "description": "d"},
                {"name": "both", "arch": "x86_64", "bundle": bundle, "recipe": recipe, "kernel_ref": "k", "description": "d"},
            ]),
            k.clone(),
        );
        let c = Catalogs::parse(&i, &kk).unwrap();
        assert!(c.image("b").unwrap().recipe.is_none());
        assert_eq!(
            c.image("r").unwrap().recipe.as_ref().unwrap().packages,
            ["git"]
        );
        assert!(c.image("r").unwrap().bundle.is_none());
        assert!(c.image("both").unwrap().bundle.is_some());
        let cases = [
            (
                serde_json::json!({"name": "x", "arch": "x86_64", "description": "d"}),
                "neither a bundle nor a recipe",
            ),
            (
                serde_json::json!({"name": "x", "arch": "x86_64", "recipe": recipe, "kernel_ref": "k", "description": "d"}),
                "kernel_ref is for a bundle",
            ),
            (
                serde_json::json!({"name": "x", "arch": "x86_64", "bundle": bundle, "description": "d"}),
                "kernel_ref is missing",
            ),
            (
                serde_json::json!({"name": "x", "arch": "x86_64", "recipe": {"suite": "bookworm", "packages": ["a,b"]}, "description": "d"}),
                "invalid package name",
            ),
            (
                serde_json::json!({"name": "x", "arch": "x86_64", "recipe": {"suite": "Bad/Suite", "packages": []}, "description": "d"}),
                "invalid suite",
            ),
            (
                serde_json::json!({"name": "x", "arch": "x86_64", "url": "http://a/b", "sha256": "ab".repeat(32), "size": 1, "kernel_ref": "k", "description": "d"}),
                "inside \"bundle\"",
            ),
        ];
        for (e, want) in cases {
            let (i, kk) = v2(serde_json::json!([e]), k.clone());
            let err = Catalogs::parse(&i, &kk).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        let (i, kk) = v2(
            serde_json::json!([]),
            serde_json::json!([{"name": "k", "arch": "x86_64", "recipe": recipe, "description": "d"}]),
        );
        let err = Catalogs::parse(&i, &kk).unwrap_err().to_string();
        assert!(err.contains("a kernel comes as a bundle"), "{err}");
    }

    #[test]
    fn a_valid_catalog_parses_and_looks_up() {
        let (i, k) = files(
            serde_json::json!([entry("img", Some("k"))]),
            serde_json::json!([entry("k", None)]),
        );
        let c = Catalogs::parse(&i, &k).unwrap();
        assert_eq!(c.image("img").unwrap().kernel_ref.as_deref(), Some("k"));
        // A version 1 entry is a bundle-only entry.
        let b = c.image("img").unwrap().bundle.as_ref().unwrap();
        assert_eq!(
            (b.url.as_str(), b.size),
            ("http://127.0.0.1:1/x.tar.zst", 10)
        );
        assert!(c.image("img").unwrap().recipe.is_none());
        assert!(c.image("nope").is_none());
        assert_eq!(names(&c.kernels), "k");
    }

    #[test]
    fn bad_catalogs_are_refused_with_the_entry_named() {
        let k = serde_json::json!([entry("k", None)]);
        let cases = [
            (
                serde_json::json!([entry("img", Some("missing"))]),
                "not in the kernel catalog",
            ),
            (
                serde_json::json!([entry("img", None)]),
                "kernel_ref is missing",
            ),
            (
                serde_json::json!([entry("img", Some("k")), entry("img", Some("k"))]),
                "twice",
            ),
            (
                serde_json::json!([entry("Bad Name", Some("k"))]),
                "invalid name",
            ),
            (
                {
                    let mut e = entry("img", Some("k"));
                    e["sha256"] = "xyz".into();
                    serde_json::json!([e])
                },
                "sha256",
            ),
            (
                {
                    let mut e = entry("img", Some("k"));
                    e["url"] = "ftp://x/y".into();
                    serde_json::json!([e])
                },
                "not http(s)",
            ),
            (
                {
                    let mut e = entry("img", Some("k"));
                    e["extra"] = 1.into();
                    serde_json::json!([e])
                },
                "unknown field",
            ),
        ];
        for (images, want) in cases {
            let (i, kk) = files(images, k.clone());
            let err = Catalogs::parse(&i, &kk).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        let (i, kk) = files(
            serde_json::json!([]),
            serde_json::json!([entry("k", Some("k"))]),
        );
        assert!(
            Catalogs::parse(&i, &kk)
                .unwrap_err()
                .to_string()
                .contains("no kernel_ref")
        );
        let err = Catalogs::parse(
            r#"{"version":3,"images":[]}"#,
            r#"{"version":1,"kernels":[]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("version 3"), "{err}");
    }
}
