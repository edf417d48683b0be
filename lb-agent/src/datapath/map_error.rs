//! The error every map access returns, and opening a pinned map: shared by the service maps (`maps`), the
//! per-packet datapath's maps (`packet_maps`) and the names map (`names`), none of which depends on another for it.

use std::path::Path;

use aya::maps::{Map, MapData, MapError};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("opening pinned map {path}: {source}")]
    Open { path: String, source: MapError },
    #[error("map {map} is missing from the loaded object")]
    Missing { map: &'static str },
    #[error("map {map} has an unexpected type or layout: {source}")]
    Layout { map: &'static str, source: MapError },
    #[error("{op} on {map}: {source}")]
    Op {
        map: &'static str,
        op: &'static str,
        source: MapError,
    },
    #[error("counting CPUs: {0}")]
    Cpus(String),
    #[error("an RCU fence failed: {0}")]
    Fence(std::io::Error),
    /// A failure already reported for another frontend of the same sync (one write covers many tables).
    #[error("{0}")]
    Again(String),
}

/// Opens the map pinned as `dir/name`, checking that it is a map aya understands.
pub(super) fn open_pinned(dir: &Path, name: &'static str) -> Result<Map, MapsError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
        path: path.display().to_string(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| MapsError::Layout { map: name, source })
}
