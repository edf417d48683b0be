//! The standalone source: Kubernetes YAML in a file or a directory, re-read whenever it changes.

use std::path::{Path, PathBuf};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watching {path}: {source}")]
    Notify {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Watches `path` (a file or a directory) and sends `()` on every change that may concern it. Editors replace a
/// file by renaming a new one over it, so for a file the parent directory is watched and events are filtered by
/// name; the watcher never loses the file that way.
pub fn watch(
    path: &Path,
) -> Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>), WatchError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let target = path.to_path_buf();
    let is_dir = path.is_dir();
    let file_name = path.file_name().map(|n| n.to_os_string());
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) => {
                if matches!(event.kind, EventKind::Access(_)) {
                    return;
                }
                let relevant = is_dir
                    || event
                        .paths
                        .iter()
                        .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name);
                if relevant {
                    let _ = tx.send(());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "file watcher error; the next change or SIGHUP resyncs")
            }
        })
        .map_err(|source| WatchError::Notify {
            path: target.clone(),
            source,
        })?;
    let watched = if is_dir {
        path.to_path_buf()
    } else {
        path.parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    };
    let watched = if watched.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        watched
    };
    watcher
        .watch(&watched, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Notify {
            path: watched.clone(),
            source,
        })?;
    Ok((watcher, rx))
}
