//! Planning an image pull: what a request's source names (a catalog bundle, a catalog
//! recipe, an OCI reference), the image's name, and the key pulls are coalesced by.

use banger_api::PullImage;

use super::{PullConfig, PullError, build, catalog, ext4, oci};
use banger_api::CatalogEntry;

/// What an image pull resolves to.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// A catalog entry's bundle.
    Catalog(CatalogEntry),
    Oci(oci_client::Reference),
    /// A catalog entry's recipe, built locally ([`build`]).
    Recipe(Box<build::BuildPlan>),
}

/// A resolved image pull.
#[derive(Debug, Clone)]
pub struct ImagePlan {
    pub source: ImageSource,
    pub name: String,
    pub kernel_ref: Option<String>,
    pub size_bytes: Option<u64>,
}

impl ImagePlan {
    pub(super) fn key(&self) -> String {
        let src = match &self.source {
            ImageSource::Catalog(e) => format!("catalog:{}", e.name),
            ImageSource::Oci(r) => format!("oci:{}", r.whole()),
            // Builds of one name share the work, whatever asked for them.
            ImageSource::Recipe(p) => return p.key(),
        };
        format!("image:{src}->{}", self.name)
    }
}

/// Whether `source` reads as an OCI reference rather than a catalog name.
fn looks_like_reference(source: &str) -> bool {
    source.contains([':', '/', '@'])
}

/// Resolve a request: a catalog entry (its bundle, else its recipe; `build` forces the
/// recipe), or an OCI reference; the image's name.
pub fn plan_image(config: &PullConfig, req: &PullImage) -> Result<ImagePlan, PullError> {
    let catalogs = &config.catalogs;
    let source = if let Some(e) = catalogs.image(&req.source) {
        match (&e.bundle, &e.recipe) {
            (Some(_), _) if !req.build => ImageSource::Catalog(e.clone()),
            (_, Some(recipe)) => {
                let name = req.name.clone().unwrap_or_else(|| e.name.clone());
                let plan = build::plan_recipe(
                    config,
                    &name,
                    recipe,
                    None,
                    req.kernel_ref.clone(),
                    req.size_bytes,
                )?;
                return Ok(ImagePlan {
                    name,
                    kernel_ref: Some(plan.kernel_name.clone()),
                    size_bytes: req.size_bytes,
                    source: ImageSource::Recipe(Box::new(plan)),
                });
            }
            _ => {
                return Err(PullError::Reference {
                    reference: req.source.clone(),
                    detail:
                        "--build: this catalog entry has no recipe; pull its bundle without --build"
                            .into(),
                });
            }
        }
    } else if looks_like_reference(&req.source) {
        let r: oci_client::Reference =
            req.source
                .parse()
                .map_err(|e: oci_client::ParseError| PullError::Reference {
                    reference: req.source.clone(),
                    detail: e.to_string(),
                })?;
        ImageSource::Oci(r)
    } else {
        return Err(PullError::UnknownName {
            kind: "image",
            name: req.source.clone(),
            available: catalog::names(&catalogs.images),
            hint: " (an OCI image needs a tag or a registry, e.g. debian:bookworm)",
        });
    };
    if req.build {
        return Err(PullError::Reference {
            reference: req.source.clone(),
            detail: "--build applies to catalog images with a recipe (`banger image list --available`); use `banger image build` for your own".into(),
        });
    }
    let name = match (&req.name, &source) {
        (Some(n), _) => n.clone(),
        (None, ImageSource::Catalog(e)) => e.name.clone(),
        (None, ImageSource::Oci(r)) => oci::default_name(r),
        (None, ImageSource::Recipe(p)) => p.name.clone(),
    };
    crate::image::validate_name(&name)?;
    let kernel_ref = req.kernel_ref.clone().or(match &source {
        ImageSource::Catalog(e) => e.kernel_ref.clone(),
        _ => None,
    });
    if let Some(k) = &kernel_ref {
        crate::image::validate_name(k)?;
    }
    if let Some(size) = req.size_bytes {
        if matches!(source, ImageSource::Catalog(_)) {
            return Err(PullError::Size(
                "--size applies to OCI pulls and builds; a catalog bundle comes with its own ext4 (--build builds its recipe)".into(),
            ));
        }
        if size < ext4::MIN_SIZE {
            return Err(PullError::Size(format!(
                "{size} bytes is below the minimum of {} MiB",
                ext4::MIN_SIZE >> 20
            )));
        }
    }
    Ok(ImagePlan {
        source,
        name,
        kernel_ref,
        size_bytes: req.size_bytes,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use banger_api::{BuildImage, codes};

    use super::*;

    fn config_with(catalogs: catalog::Catalogs) -> PullConfig {
        PullConfig {
            data_dir: "/d".into(),
            cache_dir: "/c".into(),
            catalogs: Arc::new(catalogs),
            insecure_registries: vec![],
            guest_binaries_dir: "/g".into(),
            mirror: Some("http://mirror.example/debian".into()),
        }
    }

    #[test]
    fn sources_resolve_to_catalog_entries_or_references() {
        let bundle = banger_api::Bundle {
            url: "http://127.0.0.1:1/b.tar.zst".into(),
            sha256: "ab".repeat(32),
            size: 1,
        };
        let kernel = CatalogEntry {
            name: "k".into(),
            arch: "x86_64".into(),
            bundle: Some(bundle.clone()),
            recipe: None,
            kernel_ref: None,
            description: "d".into(),
        };
        let both = CatalogEntry {
            name: "both".into(),
            bundle: Some(bundle),
            recipe: Some(banger_api::Recipe {
                suite: "bookworm".into(),
                packages: vec!["git".into()],
                kernel_package: None,
            }),
            kernel_ref: Some("k".into()),
            ..kernel.clone()
        };
        let recipe_only = CatalogEntry {
            name: "built".into(),
            bundle: None,
            kernel_ref: None,
            ..both.clone()
        };
        let c = config_with(catalog::Catalogs {
            images: vec![both.clone(), recipe_only],
            kernels: vec![kernel],
        });
        let pull = |source: &str, build: bool| {
            plan_image(
                &c,
                &PullImage {
                    source: source.into(),
                    build,
                    ..Default::default()
                },
            )
        };
        // A bundle when there is one …
        let p = pull("both", false).unwrap();
        assert!(matches!(p.source, ImageSource::Catalog(_)));
        assert_eq!(p.kernel_ref.as_deref(), Some("k"));
        // … else the recipe, and --build forces it; both keyed by the image name, as
        // `image build` is.
        for (src, build) in [("built", false), ("both", true)] {
            let p = pull(src, build).unwrap();
            let ImageSource::Recipe(b) = &p.source else {
                panic!("{src}: {:?}", p.source)
            };
            assert_eq!(b.mirror, "http://mirror.example/debian");
            assert_eq!(b.mirror_from, "[images] mirror");
            assert_eq!(b.kernel_name, src);
            assert_eq!(b.kernel_package, build::DEFAULT_KERNEL_PACKAGE);
            assert_eq!(p.key(), format!("image:build->{src}"));
            let direct = build::plan(
                &c,
                &BuildImage {
                    name: src.into(),
                    include: vec!["git".into()],
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(direct.key(), p.key());
        }
        let e = pull("debian:bookworm", true).unwrap_err().to_string();
        assert!(e.contains("--build applies to catalog images"), "{e}");
        let p = pull("debian:bookworm", false).unwrap();
        match &p.source {
            ImageSource::Oci(r) => assert_eq!(r.whole(), "docker.io/library/debian:bookworm"),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.name, "debian-bookworm");
        let e = pull("nosuch", false).unwrap_err().to_string();
        assert!(e.contains("available: both, built"), "{e}");
        let e = plan_image(
            &c,
            &PullImage {
                source: "both".into(),
                size_bytes: Some(1 << 30),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, PullError::Size(_)), "{e}");
        let e = build::plan(
            &c,
            &BuildImage {
                name: "x".into(),
                mirror: Some("ftp://x".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.code(), codes::INVALID_ARGUMENT, "{e}");
    }
}
