//! Structured logs: JSON lines to `bangerd.log`, filtered by the config's `log_level`.
//! Initialised once, by the binary; libraries only emit `tracing` events.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("cannot open the log file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid log_level {0:?}")]
    Level(String),
    #[error("logging is already initialised")]
    Init,
}

/// Send JSON log lines to `file` (appended) at `level`.
pub fn init(file: &Path, level: &str) -> Result<(), LoggingError> {
    let targets = Targets::from_str(level).map_err(|_| LoggingError::Level(level.into()))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(|source| LoggingError::Open {
            path: file.to_owned(),
            source,
        })?;
    let layer = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_writer(Mutex::new(out))
        .with_filter(targets);
    tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .map_err(|_| LoggingError::Init)
}
