//! The image and kernel catalogs: JSON files in `images/` embedded at build time
//! (`images/images.json`, `images/kernels.json`), or files named by the config
//! (`[images] catalog`, `kernel_catalog`), validated before the daemon uses them.
//!
//! Schema (one object per file):
//! ```json
//! { "version": 1, "images": [ { "name": "debian-bookworm", "arch": "x86_64",
//!   "url": "https://…/debian-bookworm-x86_64.tar.zst", "sha256": "<64 hex>",
//!   "size": 123456, "kernel_ref": "cloud-6.1", "description": "…" } ] }
//! ```
//! The kernel file has `"kernels"` instead of `"images"` and no `kernel_ref`. Names follow
//! the image name rules; `sha256` is 64 lowercase hex digits; `size` is the bundle's size in
//! bytes; an image's `kernel_ref` must name an entry of the kernel catalog. Unknown fields
//! are errors.

use std::path::Path;

use serde::Deserialize;

use banger_api::CatalogEntry;

/// The embedded image catalog.
pub const EMBEDDED_IMAGES: &str = include_str!("../../../images/images.json");
/// The embedded kernel catalog.
pub const EMBEDDED_KERNELS: &str = include_str!("../../../images/kernels.json");

/// The only catalog schema version this binary reads.
pub const CATALOG_VERSION: u32 = 1;

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageFile {
    version: u32,
    images: Vec<CatalogEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KernelFile {
    version: u32,
    kernels: Vec<CatalogEntry>,
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
        for (what, v) in [("image", img.version), ("kernel", ker.version)] {
            if v != CATALOG_VERSION {
                return Err(CatalogError::Invalid {
                    what,
                    message: format!(
                        "version {v}; this banger reads version {CATALOG_VERSION} (update banger)"
                    ),
                });
            }
        }
        validate("kernel", &ker.kernels, None)?;
        validate("image", &img.images, Some(&ker.kernels))?;
        Ok(Catalogs {
            images: img.images,
            kernels: ker.kernels,
        })
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
        let url = url_scheme(&e.url);
        if !matches!(url, Some("http" | "https")) {
            return Err(bad(&e.name, format!("url {:?} is not http(s)", e.url)));
        }
        if e.sha256.len() != 64
            || !e
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad(&e.name, "sha256 is not 64 lowercase hex digits".into()));
        }
        if e.size == 0 {
            return Err(bad(&e.name, "size is 0".into()));
        }
        if e.description.trim().is_empty() {
            return Err(bad(&e.name, "description is empty".into()));
        }
        match (kernels, &e.kernel_ref) {
            (None, Some(_)) => return Err(bad(&e.name, "a kernel has no kernel_ref".into())),
            (Some(_), None) => return Err(bad(&e.name, "kernel_ref is missing".into())),
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
    fn the_embedded_catalogs_are_valid() {
        let c = Catalogs::embedded().unwrap();
        assert!(!c.images.is_empty() && !c.kernels.is_empty());
    }

    #[test]
    fn a_valid_catalog_parses_and_looks_up() {
        let (i, k) = files(
            serde_json::json!([entry("img", Some("k"))]),
            serde_json::json!([entry("k", None)]),
        );
        let c = Catalogs::parse(&i, &k).unwrap();
        assert_eq!(c.image("img").unwrap().kernel_ref.as_deref(), Some("k"));
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
            r#"{"version":2,"images":[]}"#,
            r#"{"version":1,"kernels":[]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("version 2"), "{err}");
    }
}
