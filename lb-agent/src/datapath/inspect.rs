//! Read-only views of the maps for the operator CLI (`services`; `listings` has the others). They read the maps,
//! not the agent, so they work whether or not the agent runs, and they show what the datapath really holds. They
//! take any [`MapsRead`]: the pins in the CLI, the fake maps in tests (`tests/scenarios.rs` prints them).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use lb_common::{
    BackendValue, ServiceKey, ServiceNameValue, ServiceValue, addr_from_bytes, map_names,
};
use serde::Serialize;

use super::display::show_addr;
use super::map_error::MapsError;
use super::maps::MapsRead;
use super::packet_maps::NodeEntry;
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

/// Every programmed service with its backends, in frontend order.
pub fn services(maps: &impl MapsRead) -> Result<Vec<ServiceListing>, MapsError> {
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

/// Fills in the Kubernetes names from the names map's contents (`names::service_names`; empty with an agent that
/// predates it).
pub fn with_names(
    mut list: Vec<ServiceListing>,
    names: &HashMap<u32, ServiceNameValue>,
) -> Vec<ServiceListing> {
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

/// The node-level maps (`LB_LOCAL_NETS`, `LB_SRC_RANGES`, `LB_VIPS`, `LB_SVC_CIDRS`), one entry a line in map then
/// key order: `LB_SRC_RANGES service 3 10.0.0.0/8`.
pub fn render_node_entries(entries: &[NodeEntry]) -> String {
    let cidr = |prefix: u32, addr: [u8; 16]| {
        let ip = addr_from_bytes(addr);
        let len = if ip.is_ipv4() {
            prefix.saturating_sub(96)
        } else {
            prefix
        };
        format!("{ip}/{len}")
    };
    let mut lines: Vec<String> = entries
        .iter()
        .map(|e| match *e {
            NodeEntry::LocalNet { prefix, addr, kind } => {
                let kind = match kind {
                    lb_common::LOCAL_NET_POD => "pod".to_owned(),
                    lb_common::LOCAL_NET_NODE => "node".to_owned(),
                    k => k.to_string(),
                };
                format!("{} {} {kind}", map_names::LOCAL_NETS, cidr(prefix, addr))
            }
            NodeEntry::SrcRange {
                service_id,
                prefix,
                addr,
            } => format!(
                "{} service {service_id} {}",
                map_names::SRC_RANGES,
                cidr(prefix, addr)
            ),
            NodeEntry::Vip { addr, flags } => {
                let what = if flags & lb_common::VIP_FLAG_CLUSTER_IP != 0 {
                    "ClusterIP"
                } else {
                    "other"
                };
                format!("{} {} {what}", map_names::VIPS, addr_from_bytes(addr))
            }
            NodeEntry::ServiceCidr { prefix, addr } => {
                format!("{} {}", map_names::SVC_CIDRS, cidr(prefix, addr))
            }
        })
        .collect();
    lines.sort();
    let mut s = String::new();
    for l in lines {
        let _ = writeln!(s, "{l}");
    }
    s
}

#[cfg(test)]
mod tests {
    use lb_common::{BackendValue, ServiceKey, ServiceNameValue, ServiceValue};

    use super::*;
    use crate::datapath::maps::FakeMaps;

    #[test]
    fn services_list_shares_names_and_what_an_empty_service_does() {
        let mut m = FakeMaps::default();
        let vip = "10.96.0.10".parse().expect("ip");
        m.services.insert(
            ServiceKey::new(vip, 80, 6, 0),
            ServiceValue {
                service_id: 1,
                backend_count: 2,
                affinity_timeout: 600,
                ..Default::default()
            },
        );
        m.services.insert(
            ServiceKey::new(vip, 81, 6, 0),
            ServiceValue {
                service_id: 2,
                flags: lb_common::SVC_FLAG_DROP_NO_BACKEND,
                ..Default::default()
            },
        );
        m.backends.insert(
            5,
            BackendValue::new("10.0.0.5".parse().expect("ip"), 8080, 6),
        );
        m.backends.insert(
            6,
            BackendValue::new("10.0.0.6".parse().expect("ip"), 8080, 6),
        );
        m.set_table(1, &[5, 6, 6, 6]);
        let names = HashMap::from([(1, ServiceNameValue::new("ns/web:http", 0))]);
        let list = with_names(services(&m).expect("services"), &names);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].service, "ns/web:http");
        assert_eq!(list[0].affinity_timeout_seconds, Some(600));
        let shares: Vec<(&str, f64)> = list[0]
            .backends
            .iter()
            .map(|b| (b.address.as_str(), b.share_percent))
            .collect();
        assert_eq!(
            shares,
            vec![("10.0.0.5:8080", 25.0), ("10.0.0.6:8080", 75.0)]
        );
        assert_eq!(list[1].when_empty, "drop");
        let text = render_services(&list);
        assert!(
            text.contains("10.0.0.5:8080 (25.0%, 0), 10.0.0.6:8080 (75.0%, 0)"),
            "{text}"
        );
        assert!(text.contains("none (drop)"), "{text}");
        assert!(text.contains("600s"), "{text}");
    }

    #[test]
    fn node_entries_print_as_cidrs_per_map() {
        use crate::datapath::packet_maps::lpm_prefix;
        let (prefix, addr) = lpm_prefix("203.0.113.0".parse().expect("ip"), 24);
        let (p6, a6) = lpm_prefix("fd00:96::".parse().expect("ip"), 112);
        let text = render_node_entries(&[
            NodeEntry::ServiceCidr {
                prefix: p6,
                addr: a6,
            },
            NodeEntry::SrcRange {
                service_id: 4,
                prefix,
                addr,
            },
        ]);
        assert_eq!(
            text,
            "LB_SRC_RANGES service 4 203.0.113.0/24\nLB_SVC_CIDRS fd00:96::/112\n"
        );
    }
}
