//! More read-only views of the pinned maps for the operator CLI and the metrics (see `inspect` for `services`):
//! backends, one service's lookup table, counters, map fill levels. Like `inspect`, they read the maps, not the
//! agent.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use lb_common::{ServiceKey, ServiceNameValue, ServiceValue, map_names};
use serde::Serialize;

use super::inspect::show_addr;
use super::maps::{Maps, MapsError, PinnedMaps};
use super::names::{NameStore, PinnedNames, kind_name};
use crate::state::{Algorithm, Protocol, Scope};

pub fn proto_name(proto: u8) -> String {
    Protocol::from_number(proto).map_or_else(|| proto.to_string(), |p| p.to_string())
}

pub fn scope_name(scope: u8) -> String {
    match Scope::from_number(scope) {
        Some(Scope::Internal) => "internal".into(),
        Some(Scope::External) => "external".into(),
        None => scope.to_string(),
    }
}

/// Service names by id, from `LB_SVC_NAMES`; empty when the map does not exist (an agent that predates it).
pub fn service_names(dir: &Path) -> HashMap<u32, ServiceNameValue> {
    PinnedNames::open(dir)
        .and_then(|n| n.names())
        .map(|v| v.into_iter().collect())
        .unwrap_or_default()
}

/// Entries in each pinned map that lb can count, and its capacity.
pub fn map_fill(dir: &Path) -> Vec<(&'static str, u64, u64)> {
    let capacity = |name: &str| {
        aya::maps::MapInfo::from_pin(dir.join(name))
            .map(|i| u64::from(i.max_entries()))
            .unwrap_or(0)
    };
    let mut out = Vec::new();
    if let Ok(maps) = PinnedMaps::open(dir) {
        let services = maps.services().unwrap_or_default();
        // The slot array's elements are 64-byte blocks: those the distinct tables occupy.
        let regions: std::collections::BTreeMap<u32, u64> = services
            .iter()
            .filter_map(|(_, v)| {
                let layout = super::lut::Layout::of(v)?;
                Some((v.table_offset, layout.region_len()))
            })
            .collect();
        let blocks = regions.values().sum::<u64>() / u64::from(lb_common::LUT_BLOCK_BYTES);
        out.push((map_names::SERVICES, services.len() as u64));
        out.push((map_names::MAGLEV_SLOTS, blocks));
        out.push((
            map_names::BACKENDS,
            maps.backends().map_or(0, |b| b.len() as u64),
        ));
        out.push((
            map_names::AFFINITY,
            maps.affinity_entries().map_or(0, |a| a.len() as u64),
        ));
        out.push((
            map_names::SOCK_REVNAT,
            maps.sock_revnat_entries().map_or(0, |a| a.len() as u64),
        ));
    }
    if let Ok(names) = PinnedNames::open(dir) {
        out.push((
            map_names::SVC_NAMES,
            names.names().map_or(0, |n| n.len() as u64),
        ));
    }
    out.into_iter().map(|(m, n)| (m, n, capacity(m))).collect()
}

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
        let mut ids = maps.table(&v)?.unwrap_or_default();
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
        maps.table(value)?.unwrap_or_default()
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
                counters: crate::ops::metrics::SERVICE_COUNTERS
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
