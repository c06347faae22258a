//! The standalone source: a YAML file, watched for changes.
//!
//! The file is read again every poll interval and on every explicit trigger
//! (SIGHUP). Polling the content rather than subscribing to inotify events
//! also follows the atomic symlink swaps of mounted ConfigMaps and editors
//! that replace the file, and costs one small read per interval.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::{ReloadResult, Snapshot};
use crate::proxy::config::{ConfigError, ProxyConfig};

/// How often the file is read for changes by default: well inside the 2 s
/// a change may take to apply.
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// A watched configuration file.
pub struct FileSource {
    path: PathBuf,
    poll: Duration,
    trigger: Arc<Notify>,
    last: Option<Vec<u8>>,
}

impl FileSource {
    /// Watches `path`, polling every `poll`.
    pub fn new(path: impl Into<PathBuf>, poll: Duration) -> Self {
        FileSource { path: path.into(), poll, trigger: Arc::new(Notify::new()), last: None }
    }

    /// Notifying this handle makes the source read the file at once (wire it to SIGHUP).
    pub fn trigger(&self) -> Arc<Notify> {
        self.trigger.clone()
    }

    /// Reads and validates the file for the first snapshot.
    pub fn load(&mut self) -> Result<Snapshot, ConfigError> {
        let bytes = self.read()?;
        let snapshot = parse(&bytes)?;
        self.last = Some(bytes);
        Ok(snapshot)
    }

    /// Publishes every valid change on `tx` until every receiver is gone.
    /// Invalid changes are logged and reported to `on_reload`; the last good
    /// snapshot stays published.
    pub async fn watch(mut self, tx: watch::Sender<Arc<Snapshot>>, on_reload: impl Fn(ReloadResult) + Send) {
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                () = self.trigger.notified() => true,
                () = tx.closed() => return,
            };
            let bytes = match self.read() {
                Ok(b) => b,
                Err(e) => {
                    // A file briefly missing during a replace is not yet a reload.
                    if forced {
                        tracing::warn!(error = %e, "configuration reload failed; keeping the current configuration");
                        on_reload(ReloadResult::Rejected);
                    }
                    continue;
                }
            };
            if !forced && self.last.as_deref() == Some(&bytes[..]) {
                continue;
            }
            match parse(&bytes) {
                Ok(snapshot) => {
                    tracing::info!(path = %self.path.display(), "configuration reloaded");
                    self.last = Some(bytes);
                    tx.send_replace(Arc::new(snapshot));
                    on_reload(ReloadResult::Applied);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "invalid configuration ignored; keeping the current configuration");
                    // Remember the bad content so it is reported once, not every poll.
                    self.last = Some(bytes);
                    on_reload(ReloadResult::Rejected);
                }
            }
        }
    }

    fn read(&self) -> Result<Vec<u8>, ConfigError> {
        std::fs::read(&self.path)
            .map_err(|e| ConfigError::Read { path: self.path.display().to_string(), message: e.to_string() })
    }
}

fn parse(bytes: &[u8]) -> Result<Snapshot, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::Parse("the file is not UTF-8 text".into()))?;
    Ok(Snapshot::standalone(ProxyConfig::parse(text)?))
}
