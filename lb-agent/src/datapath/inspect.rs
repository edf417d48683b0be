//! Read-only views of the pinned maps for the operator CLI. They read the maps, not the agent, so they work
//! whether or not the agent runs, and they show what the datapath really holds.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use lb_common::{BackendValue, ServiceKey, ServiceValue, addr_from_bytes};
use serde::Serialize;

use super::maps::{Maps, MapsError, PinnedMaps};
use crate::state::{Algorithm, Protocol, Scope};

#[derive(Debug, Serialize)]
pub struct BackendListing {
    pub id: u32,
    pub address: String,
    /// Share of the service's lookup table this backend owns (Maglev), in percent.
    pub share_percent: f64,
    pub connections: u64,
}

#[derive(Debug, Serialize)]
pub struct ServiceListing {
    pub id: u32,
    /// `namespace/name:port` from `LB_SVC_NAMES` (see [`with_names`]); empty when unknown.
    pub service: String,
    pub frontend: String,
    pub protocol: String,
    pub scope: String,
    pub algorithm: String,
    pub affinity_timeout_seconds: Option<u32>,
    /// What an empty backend set does: `reject` or `drop`.
    pub when_empty: &'static str,
    pub table_size: usize,
    pub backends: Vec<BackendListing>,
    pub connections: u64,
    pub rejects: u64,
}

pub fn show_addr(bytes: [u8; 16], port: u16) -> String {
    match addr_from_bytes(bytes) {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// Every programmed service with its backends, in frontend order.
pub fn services(maps: &PinnedMaps) -> Result<Vec<ServiceListing>, MapsError> {
    let backends: BTreeMap<u32, BackendValue> = maps.backends()?.into_iter().collect();
    let mut services: Vec<(ServiceKey, ServiceValue)> = maps.services()?;
    services.sort_by_key(|(k, _)| (k.scope, k.addr, k.port, k.proto));
    let mut out = Vec::with_capacity(services.len());
    for (key, value) in services {
        let table = if value.backend_count > 0 {
            maps.table(&value)?.unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for id in &table {
            *counts.entry(*id).or_default() += 1;
        }
        let mut listed = Vec::with_capacity(counts.len());
        for (id, n) in counts {
            let address = backends
                .get(&id)
                .map(|b| show_addr(b.addr, b.port))
                .unwrap_or_else(|| format!("<missing backend {id}>"));
            listed.push(BackendListing {
                id,
                address,
                share_percent: 100.0 * n as f64 / table.len().max(1) as f64,
                connections: maps.backend_stats(id).map(|s| s.sock_connects).unwrap_or(0),
            });
        }
        let stats = maps.service_stats(value.service_id).unwrap_or_default();
        out.push(ServiceListing {
            id: value.service_id,
            service: String::new(),
            frontend: show_addr(key.addr, key.port),
            protocol: Protocol::from_number(key.proto)
                .map_or_else(|| key.proto.to_string(), |p| p.to_string()),
            scope: match Scope::from_number(key.scope) {
                Some(Scope::Internal) => "internal".into(),
                Some(Scope::External) => "external".into(),
                None => key.scope.to_string(),
            },
            algorithm: Algorithm::from_number(value.algorithm)
                .map_or_else(|| value.algorithm.to_string(), |a| a.to_string()),
            affinity_timeout_seconds: (value.affinity_timeout > 0)
                .then_some(value.affinity_timeout),
            when_empty: if value.flags & lb_common::SVC_FLAG_DROP_NO_BACKEND != 0 {
                "drop"
            } else {
                "reject"
            },
            table_size: table.len(),
            backends: listed,
            connections: stats.sock_connects,
            rejects: stats.sock_rejects,
        });
    }
    Ok(out)
}

/// Fills in the Kubernetes names from the names map pinned in `dir` (absent with an agent that predates it).
pub fn with_names(mut list: Vec<ServiceListing>, dir: &std::path::Path) -> Vec<ServiceListing> {
    let names = super::listings::service_names(dir);
    for s in &mut list {
        if let Some(n) = names.get(&s.id) {
            s.service = n.name().to_owned();
        }
    }
    list
}

/// The human table `lb-agent services` prints.
pub fn render_services(list: &[ServiceListing]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<5} {:<32} {:<40} {:<5} {:<9} {:<7} {:<9} {:>7} {:>7}  BACKENDS (table share, connections)",
        "ID", "SERVICE", "FRONTEND", "PROTO", "SCOPE", "ALG", "AFFINITY", "CONNS", "REJECTS"
    );
    for svc in list {
        let affinity = svc
            .affinity_timeout_seconds
            .map_or_else(|| "-".to_string(), |t| format!("{t}s"));
        let backends = if svc.backends.is_empty() {
            format!("none ({})", svc.when_empty)
        } else {
            svc.backends
                .iter()
                .map(|b| format!("{} ({:.1}%, {})", b.address, b.share_percent, b.connections))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "{:<5} {:<32} {:<40} {:<5} {:<9} {:<7} {:<9} {:>7} {:>7}  {}",
            svc.id,
            if svc.service.is_empty() {
                "-"
            } else {
                svc.service.as_str()
            },
            svc.frontend,
            svc.protocol,
            svc.scope,
            svc.algorithm,
            affinity,
            svc.connections,
            svc.rejects,
            backends
        );
    }
    s
}
