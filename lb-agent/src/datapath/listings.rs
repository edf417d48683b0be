//! More read-only views of the pinned maps for the operator CLI and the metrics (see `inspect` for `services`):
//! backends, one service's lookup table, counters (map fill levels are `map_fill`'s). Like `inspect`, they read the
//! maps, not the agent.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use lb_common::{ServiceKey, ServiceNameValue, ServiceValue, map_names};
use serde::Serialize;

use super::counters::SERVICE_COUNTERS;
use super::display::{proto_name, scope_name, show_addr};
use super::map_error::MapsError;
use super::maps::{Maps, PinnedMaps};
use super::names::{kind_name, service_names};
use crate::state::Algorithm;

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub protocol: String,
    /// Frontends (by service id) whose table names this backend.
    pub services: Vec<u32>,
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Every backend with the services whose tables use it.
pub fn backends(maps: &PinnedMaps) -> Result<Vec<BackendRow>, MapsError> {
    let mut users: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (_, v) in maps.services()? {
        if v.backend_count == 0 {
            continue;
        }
        let mut ids = maps.table(v.service_id)?.unwrap_or_default();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            users.entry(id).or_default().push(v.service_id);
        }
    }
    let mut out: Vec<BackendRow> = maps
        .backends()?
        .into_iter()
        .map(|(id, b)| {
            let stats = maps.backend_stats(id).unwrap_or_default();
            let mut services = users.remove(&id).unwrap_or_default();
            services.sort_unstable();
            BackendRow {
                id,
                address: show_addr(b.addr, b.port),
                protocol: proto_name(b.proto),
                services,
                connections: stats.sock_connects,
                packets: stats.packets,
                bytes: stats.bytes,
            }
        })
        .collect();
    out.sort_by_key(|b| b.id);
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct TableShare {
    pub backend_id: u32,
    pub address: String,
    pub slots: usize,
    pub share_percent: f64,
}

#[derive(Debug, Serialize)]
pub struct TableView {
    pub service_id: u32,
    pub frontend: String,
    pub protocol: String,
    pub scope: String,
    pub service: String,
    pub algorithm: String,
    /// Slots in the table (the Maglev size M, or the backend count for random).
    pub size: usize,
    pub backends: Vec<TableShare>,
    /// The slots themselves (backend ids), for `-o json`.
    pub slots: Vec<u32>,
}

/// Finds services by id (`17`) or frontend (`10.96.0.10:80`, `[fd00::1]:80`, optionally `/TCP`); a frontend
/// matches in every scope.
pub fn find_services(
    maps: &PinnedMaps,
    what: &str,
) -> Result<Vec<(ServiceKey, ServiceValue)>, MapsError> {
    let services = maps.services()?;
    if let Ok(id) = what.parse::<u32>() {
        return Ok(services
            .into_iter()
            .filter(|(_, v)| v.service_id == id)
            .collect());
    }
    let (addr, proto) = match what.rsplit_once('/') {
        Some((a, p)) => (a, Some(p.to_ascii_uppercase())),
        None => (what, None),
    };
    let mut found: Vec<_> = services
        .into_iter()
        .filter(|(k, _)| {
            show_addr(k.addr, k.port) == addr
                && proto.as_deref().is_none_or(|p| proto_name(k.proto) == p)
        })
        .collect();
    found.sort_by_key(|(k, _)| (k.scope, k.proto));
    Ok(found)
}

/// One service's lookup table with each backend's share.
pub fn table(
    maps: &PinnedMaps,
    names: &HashMap<u32, ServiceNameValue>,
    key: &ServiceKey,
    value: &ServiceValue,
) -> Result<TableView, MapsError> {
    let backends: HashMap<u32, lb_common::BackendValue> = maps.backends()?.into_iter().collect();
    let slots = if value.backend_count > 0 {
        maps.table(value.service_id)?.unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for s in &slots {
        *counts.entry(*s).or_default() += 1;
    }
    let shares = counts
        .into_iter()
        .map(|(id, n)| TableShare {
            backend_id: id,
            address: backends
                .get(&id)
                .map(|b| show_addr(b.addr, b.port))
                .unwrap_or_else(|| format!("<missing backend {id}>")),
            slots: n,
            share_percent: 100.0 * n as f64 / slots.len().max(1) as f64,
        })
        .collect();
    Ok(TableView {
        service_id: value.service_id,
        frontend: show_addr(key.addr, key.port),
        protocol: proto_name(key.proto),
        scope: scope_name(key.scope),
        service: names
            .get(&value.service_id)
            .map(|n| n.name().to_owned())
            .unwrap_or_default(),
        algorithm: Algorithm::from_number(value.algorithm)
            .map_or_else(|| value.algorithm.to_string(), |a| a.to_string()),
        size: slots.len(),
        backends: shares,
        slots,
    })
}

#[derive(Debug, Serialize)]
pub struct StatsRow {
    pub service_id: u32,
    pub service: String,
    pub kind: String,
    pub frontend: String,
    pub protocol: String,
    pub scope: String,
    /// Every `ServiceStats` counter by metric name (the same table the metrics use).
    pub counters: BTreeMap<&'static str, u64>,
}

/// Every service's counters, in frontend order.
pub fn stats(maps: &PinnedMaps, dir: &Path) -> Result<Vec<StatsRow>, MapsError> {
    let names = service_names(dir);
    let mut services = maps.services()?;
    services.sort_by_key(|(k, _)| (k.scope, k.addr, k.port, k.proto));
    Ok(services
        .into_iter()
        .map(|(k, v)| {
            let s = maps.service_stats(v.service_id).unwrap_or_default();
            let name = names.get(&v.service_id);
            StatsRow {
                service_id: v.service_id,
                service: name.map(|n| n.name().to_owned()).unwrap_or_default(),
                kind: name
                    .map(|n| kind_name(n.kind).to_owned())
                    .unwrap_or_default(),
                frontend: show_addr(k.addr, k.port),
                protocol: proto_name(k.proto),
                scope: scope_name(k.scope),
                counters: SERVICE_COUNTERS
                    .iter()
                    .map(|(name, _, read)| (*name, read(&s)))
                    .collect(),
            }
        })
        .collect())
}

/// The per-packet datapath's packet counts by reason (`LB_DROP_STATS`, summed over CPUs), non-zero ones only;
/// empty when the map is not pinned.
pub fn packets_by_reason(dir: &Path) -> Vec<(&'static str, u64)> {
    let path = dir.join(map_names::DROP_STATS);
    let Ok(data) = aya::maps::MapData::from_pin(&path) else {
        return Vec::new();
    };
    let Ok(map) = aya::maps::PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(data))
    else {
        return Vec::new();
    };
    (0..lb_common::reason::COUNT)
        .filter_map(|r| {
            let total: u64 = map.get(&r, 0).ok()?.iter().sum();
            (total > 0).then(|| (lb_common::reason::name(r), total))
        })
        .collect()
}
