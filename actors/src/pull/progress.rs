//! Progress of a pull: every caller waiting on it gets its events, a late joiner first the
//! stage it is at.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use banger_api::PullEvent;

/// Where a pull's progress events go.
pub type EventTx = mpsc::UnboundedSender<PullEvent>;

/// Sends progress to everyone waiting on one pull (joiners are added while it runs).
#[derive(Debug, Clone, Default)]
pub struct Reporter {
    inner: Arc<Mutex<ReporterInner>>,
}

#[derive(Debug, Default)]
struct ReporterInner {
    watchers: Vec<EventTx>,
    last_stage: Option<PullEvent>,
}

impl Reporter {
    pub(super) fn add(&self, tx: EventTx) {
        let mut g = self.inner.lock().expect("reporter lock");
        if let Some(stage) = &g.last_stage {
            let _ = tx.send(stage.clone());
        }
        g.watchers.push(tx);
    }

    pub(super) fn send(&self, ev: PullEvent) {
        let mut g = self.inner.lock().expect("reporter lock");
        g.watchers.retain(|w| w.send(ev.clone()).is_ok());
        if matches!(ev, PullEvent::Stage { .. }) {
            g.last_stage = Some(ev);
        }
    }

    pub fn stage(&self, stage: &str, detail: Option<String>) {
        tracing::debug!(stage, detail = detail.as_deref(), "pull stage");
        self.send(PullEvent::Stage {
            stage: stage.into(),
            detail,
        });
    }

    /// Report `counter` as bytes downloaded every 200 ms until the returned guard drops.
    pub fn ticker(&self, counter: Arc<std::sync::atomic::AtomicU64>, total: Option<u64>) -> Ticker {
        let me = self.clone();
        let task = tokio::spawn(async move {
            let mut last = u64::MAX;
            loop {
                let done = counter.load(std::sync::atomic::Ordering::Relaxed);
                if done != last {
                    me.send(PullEvent::Bytes { done, total });
                    last = done;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ticker(task)
    }
}

/// Stops a [`Reporter::ticker`] when dropped.
#[derive(Debug)]
pub struct Ticker(tokio::task::JoinHandle<()>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}
