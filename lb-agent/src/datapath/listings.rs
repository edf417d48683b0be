//! More read-only views of the maps for the operator CLI and the metrics (see `inspect` for `services`): backends,
//! one service's lookup table, counters, and (from the pins only) map fill levels and packet counts by reason.
//! Like `inspect`, they read the maps, not the agent, through [`MapsRead`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use lb_common::{ServiceKey, ServiceNameValue, ServiceValue, map_names};
use serde::Serialize;

use super::counters::SERVICE_COUNTERS;
use super::display::{proto_name, scope_name, show_addr};
use super::map_error::MapsError;
use super::maps::{MapsRead, PinnedMaps};
use super::names::{NameStore, PinnedNames, kind_name};
use crate::state::Algorithm;

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
pub fn backends(maps: &impl MapsRead) -> Result<Vec<BackendRow>, MapsError> {
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
    maps: &impl MapsRead,
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
    maps: &impl MapsRead,
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

/// Every service's counters, in frontend order; `names` as `names::service_names` reads them.
pub fn stats(
    maps: &impl MapsRead,
    names: &HashMap<u32, ServiceNameValue>,
) -> Result<Vec<StatsRow>, MapsError> {
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

/// The table `lb-agent backends` prints.
pub fn render_backends(rows: &[BackendRow], names: &HashMap<u32, ServiceNameValue>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<6} {:<45} {:<5} {:>9} {:>10} {:>12}  SERVICES (id name)",
        "ID", "BACKEND", "PROTO", "CONNS", "PACKETS", "BYTES"
    );
    for b in rows {
        let services = if b.services.is_empty() {
            "-".to_owned()
        } else {
            b.services
                .iter()
                .map(|id| match names.get(id) {
                    Some(n) => format!("{id} {}", n.name()),
                    None => id.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "{:<6} {:<45} {:<5} {:>9} {:>10} {:>12}  {}",
            b.id, b.address, b.protocol, b.connections, b.packets, b.bytes, services
        );
    }
    s
}

/// What `lb-agent maglev` prints: each table's size and every backend's slots and share.
pub fn render_tables(views: &[TableView]) -> String {
    let mut s = String::new();
    for v in views {
        let _ = writeln!(
            s,
            "service {} {} {}/{} ({}){}",
            v.service_id,
            v.frontend,
            v.protocol,
            v.scope,
            v.algorithm,
            if v.service.is_empty() {
                String::new()
            } else {
                format!("  {}", v.service)
            }
        );
        if v.size == 0 {
            let _ = writeln!(s, "  no table: the service has no backend\n");
            continue;
        }
        let per = v.size as f64 / v.backends.len().max(1) as f64;
        let _ = writeln!(
            s,
            "  table size {}  backends {}  ideal slots per backend {per:.1}",
            v.size,
            v.backends.len()
        );
        let _ = writeln!(
            s,
            "  {:<8} {:<45} {:>7} {:>8}",
            "BACKEND", "ADDRESS", "SLOTS", "SHARE"
        );
        for b in &v.backends {
            let _ = writeln!(
                s,
                "  {:<8} {:<45} {:>7} {:>7.2}%",
                b.backend_id, b.address, b.slots, b.share_percent
            );
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use lb_common::{BackendValue, ServiceKey, ServiceNameValue, ServiceValue};

    use super::*;
    use crate::datapath::maps::FakeMaps;

    fn key(addr: &str, port: u16, proto: u8, scope: u8) -> ServiceKey {
        ServiceKey::new(addr.parse().expect("ip"), port, proto, scope)
    }

    fn value(id: u32, backends: u32) -> ServiceValue {
        ServiceValue {
            service_id: id,
            backend_count: backends,
            ..Default::default()
        }
    }

    /// Two frontends of one VIP (TCP in both scopes, UDP external) sharing backend 7; backend 8 only in TCP's
    /// internal table; the UDP table names a backend the map does not hold.
    fn maps() -> FakeMaps {
        let mut m = FakeMaps::default();
        m.services.insert(key("10.96.0.10", 80, 6, 0), value(1, 1));
        m.services.insert(key("10.96.0.10", 80, 6, 1), value(2, 2));
        m.services.insert(key("fd00::10", 53, 17, 0), value(3, 1));
        m.services.insert(key("10.96.0.11", 80, 6, 0), value(4, 0));
        m.backends.insert(
            7,
            BackendValue::new("10.0.0.7".parse().expect("ip"), 8080, 6),
        );
        m.backends.insert(
            8,
            BackendValue::new("10.0.0.8".parse().expect("ip"), 8080, 6),
        );
        m.set_table(1, &[7, 7, 7]);
        m.set_table(2, &[7, 8, 8, 8]);
        m.set_table(3, &[9]);
        m
    }

    #[test]
    fn backends_list_the_services_whose_tables_use_them() {
        let rows = backends(&maps()).expect("rows");
        let users: Vec<(u32, Vec<u32>)> = rows.iter().map(|r| (r.id, r.services.clone())).collect();
        assert_eq!(users, vec![(7, vec![1, 2]), (8, vec![2])]);
        assert_eq!(rows[0].address, "10.0.0.7:8080");
        assert_eq!(rows[0].protocol, "TCP");
        let names = HashMap::from([(2, ServiceNameValue::new("ns/web:http", 0))]);
        let text = render_backends(&rows, &names);
        assert!(text.contains("1, 2 ns/web:http"), "{text}");
    }

    #[test]
    fn services_are_found_by_id_frontend_and_protocol() {
        let m = maps();
        let ids = |what: &str| -> Vec<u32> {
            find_services(&m, what)
                .expect("find")
                .iter()
                .map(|(_, v)| v.service_id)
                .collect()
        };
        assert_eq!(ids("3"), vec![3]);
        assert_eq!(ids("10.96.0.10:80"), vec![1, 2], "both scopes, scope order");
        assert_eq!(ids("10.96.0.10:80/tcp"), vec![1, 2]);
        assert_eq!(ids("10.96.0.10:80/UDP"), Vec::<u32>::new());
        assert_eq!(ids("[fd00::10]:53/UDP"), vec![3]);
        assert_eq!(ids("10.96.0.99:80"), Vec::<u32>::new());
    }

    #[test]
    fn a_table_shows_each_backends_share_and_names_a_missing_backend() {
        let m = maps();
        let names = HashMap::new();
        let (k, v) = find_services(&m, "2").expect("find").remove(0);
        let view = table(&m, &names, &k, &v).expect("table");
        assert_eq!(view.size, 4);
        let shares: Vec<(u32, usize, f64)> = view
            .backends
            .iter()
            .map(|b| (b.backend_id, b.slots, b.share_percent))
            .collect();
        assert_eq!(shares, vec![(7, 1, 25.0), (8, 3, 75.0)]);
        assert_eq!(view.scope, "internal");
        let (k, v) = find_services(&m, "3").expect("find").remove(0);
        let view = table(&m, &names, &k, &v).expect("table");
        assert_eq!(view.backends[0].address, "<missing backend 9>");
        let text = render_tables(&[view]);
        assert!(text.contains("table size 1  backends 1"), "{text}");
        let (k, v) = find_services(&m, "4").expect("find").remove(0);
        let text = render_tables(&[table(&m, &names, &k, &v).expect("table")]);
        assert!(
            text.contains("no table: the service has no backend"),
            "{text}"
        );
    }

    #[test]
    fn stats_rows_carry_every_counter_and_the_name() {
        let names = HashMap::from([(1, ServiceNameValue::new("ns/web:http", 1))]);
        let rows = stats(&maps(), &names).expect("stats");
        assert_eq!(rows.len(), 4);
        let web = rows.iter().find(|r| r.service_id == 1).expect("row 1");
        assert_eq!(web.service, "ns/web:http");
        assert_eq!(web.frontend, "10.96.0.10:80");
        assert_eq!(web.counters.len(), SERVICE_COUNTERS.len());
    }
}
