//! The image and kernel a `vm create` needs, pulled first when they are missing and the
//! catalog has them.

use std::sync::Arc;

use banger_api::CreateVm;

use super::Tree;
use super::tree::TreeError;
use crate::pull::PullError;
use crate::vm::actor::ProgressTx;

impl Tree {
    pub(super) async fn auto_pull(
        &self,
        req: &CreateVm,
        progress: Option<&ProgressTx>,
    ) -> Result<(), TreeError> {
        let Some(image) = req.image.clone().or_else(|| self.default_image.clone()) else {
            return Ok(());
        };
        let catalogs = Arc::clone(&self.pull_env.config.catalogs);
        let stage = |detail: String| {
            if let Some(p) = progress {
                let _ = p.send(banger_api::Progress::Stage {
                    stage: "pull".into(),
                    detail: Some(detail),
                });
            }
        };
        let record = match self.image(image.clone()).await? {
            Some(r) => r,
            None if catalogs.image(&image).is_some() => {
                let entry = catalogs.image(&image).expect("just checked");
                let events = if entry.bundle.is_none() && entry.recipe.is_some() {
                    let (mirror, _) = crate::pull::build::default_mirror(&self.pull_env.config);
                    stage(format!("building {image} from {mirror}, once"));
                    // The build's own stages, as `pull` stages of the create.
                    progress.cloned().map(|p| {
                        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                        tokio::spawn(async move {
                            while let Some(ev) = rx.recv().await {
                                if let banger_api::PullEvent::Stage { stage, detail } = ev {
                                    let detail = match detail {
                                        Some(d) => format!("{stage}: {d}"),
                                        None => stage,
                                    };
                                    let _ = p.send(banger_api::Progress::Stage {
                                        stage: "pull".into(),
                                        detail: Some(detail),
                                    });
                                }
                            }
                        });
                        tx
                    })
                } else {
                    stage(format!("image {image} (not here yet; from the catalog)"));
                    None
                };
                let req = banger_api::PullImage {
                    source: image.clone(),
                    ..Default::default()
                };
                match self.pull_image(req, events).await {
                    Ok(r) => r,
                    // Pulled meanwhile by someone else: fine.
                    Err(TreeError::Pull(e)) if matches!(*e, PullError::Exists(_)) => {
                        match self.image(image.clone()).await? {
                            Some(r) => r,
                            None => return Err(TreeError::Pull(e)),
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            None => return Ok(()),
        };
        let Some(kernel) = req.kernel.clone().or(record.kernel) else {
            return Ok(());
        };
        if self.kernel(kernel.clone()).await?.is_none() && catalogs.kernel(&kernel).is_some() {
            stage(format!("kernel {kernel} (not here yet; from the catalog)"));
            match self.pull_kernel(kernel, None).await {
                Ok(_) => {}
                Err(TreeError::Pull(e)) if matches!(*e, PullError::Exists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
