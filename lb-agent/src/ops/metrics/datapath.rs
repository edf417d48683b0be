//! The datapath's numbers, read from the pinned maps at scrape time (so they are current and follow a map
//! migration): node-wide packet counts by verdict reason and every map's fill always; per-Service and per-backend
//! counters as `--service-metrics` asks ([`ServiceMetrics`]), because they are what makes a node's series count
//! grow with the cluster.
//!
//! The counter families are the tables of `datapath::counters`: a new field in `lb_common::ServiceStats` or
//! `BackendStats` is one line there.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use lb_common::{BackendStats, ServiceStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::{Deserialize, Serialize};

use crate::datapath::counters::{BACKEND_COUNTERS, SERVICE_COUNTERS};
use crate::datapath::display::{proto_name, scope_name, show_addr};
use crate::datapath::listings;
use crate::datapath::map_fill::{MapFill, map_fill};
use crate::datapath::maps::{MapsRead, PinnedMaps};
use crate::datapath::names::{kind_name, service_names};

/// How much per-Service detail the datapath counters are exported with (`lb-agent run --service-metrics`). Each
/// step multiplies a node's series by the cluster's size, and every node exports its own:
///
/// - `off` (the default): none; node-wide totals only (packets by reason, map fill). Nothing grows with the
///   number of Services, so 10k Services cost no more series than ten.
/// - `per-service`: the five service counters summed over each Service's ports and VIPs, labelled `namespace`
///   and `name`: 5 series per Service (50k per node at 10k Services).
/// - `per-frontend`: the five counters per frontend (VIP, port, protocol, scope; a NodePort port alone is a
///   frontend per node address and scope), labelled with the Service, port, frontend, protocol, scope and kind,
///   plus three counters per backend (labelled with the backend address, which changes with every pod): for
///   debugging one node, not for a fleet.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceMetrics {
    #[default]
    Off,
    PerService,
    PerFrontend,
}

impl fmt::Display for ServiceMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceMetrics::Off => "off",
            ServiceMetrics::PerService => "per-service",
            ServiceMetrics::PerFrontend => "per-frontend",
        })
    }
}

/// One programmed frontend as the collector labels it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSample {
    pub id: u32,
    /// `ip:port` of the VIP.
    pub frontend: String,
    pub protocol: String,
    pub scope: String,
    /// From `LB_SVC_NAMES`; empty when the name is unknown (map absent, or written by an older agent).
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub kind: String,
    pub stats: ServiceStats,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSample {
    pub id: u32,
    /// `ip:port`.
    pub backend: String,
    pub protocol: String,
    pub stats: BackendStats,
}

/// Where the collector reads the datapath's numbers: the pinned maps, or a fake in unit tests.
pub trait CounterSource: fmt::Debug + Send + Sync + 'static {
    fn services(&self) -> Vec<ServiceSample>;
    fn backends(&self) -> Vec<BackendSample>;
    fn map_fill(&self) -> Vec<MapFill>;
    /// The per-packet datapath's packet counts by verdict reason (`LB_DROP_STATS`), node-wide.
    fn packets_by_reason(&self) -> Vec<(&'static str, u64)>;
    /// The socket LB's refused `connect()` / `sendmsg()` calls by reason (`LB_SOCK_STATS`), node-wide.
    fn sock_refusals_by_reason(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Splits `namespace/name:port` (the names map's form) into its parts.
pub fn split_service_name(full: &str) -> (String, String, String) {
    let (namespace, rest) = full.split_once('/').unwrap_or(("", full));
    let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
    (namespace.to_owned(), name.to_owned(), port.to_owned())
}

/// Reads the pinned maps on every scrape; before the agent pinned anything it reports nothing.
#[derive(Debug)]
pub struct PinnedCounters {
    pub dir: PathBuf,
}

impl CounterSource for PinnedCounters {
    fn services(&self) -> Vec<ServiceSample> {
        let Ok(maps) = PinnedMaps::open(&self.dir) else {
            return Vec::new();
        };
        let names = service_names(&self.dir);
        let Ok(services) = maps.services() else {
            return Vec::new();
        };
        services
            .into_iter()
            .map(|(key, value)| {
                let name = names.get(&value.service_id);
                let (namespace, svc, port) = name
                    .map(|n| split_service_name(n.name()))
                    .unwrap_or_default();
                ServiceSample {
                    id: value.service_id,
                    frontend: show_addr(key.addr, key.port),
                    protocol: proto_name(key.proto),
                    scope: scope_name(key.scope),
                    namespace,
                    name: svc,
                    port,
                    kind: name
                        .map(|n| kind_name(n.kind).to_owned())
                        .unwrap_or_default(),
                    stats: maps.service_stats(value.service_id).unwrap_or_default(),
                }
            })
            .collect()
    }

    fn backends(&self) -> Vec<BackendSample> {
        let Ok(maps) = PinnedMaps::open(&self.dir) else {
            return Vec::new();
        };
        maps.backends()
            .unwrap_or_default()
            .into_iter()
            .map(|(id, b)| BackendSample {
                id,
                backend: show_addr(b.addr, b.port),
                protocol: proto_name(b.proto),
                stats: maps.backend_stats(id).unwrap_or_default(),
            })
            .collect()
    }

    fn map_fill(&self) -> Vec<MapFill> {
        map_fill(&self.dir)
    }

    fn packets_by_reason(&self) -> Vec<(&'static str, u64)> {
        listings::packets_by_reason(&self.dir)
    }

    fn sock_refusals_by_reason(&self) -> Vec<(&'static str, u64)> {
        listings::sock_refusals_by_reason(&self.dir)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontendLabels {
    namespace: String,
    name: String,
    port: String,
    frontend: String,
    protocol: String,
    scope: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

/// The collector the registry calls at every scrape.
#[derive(Debug)]
pub struct DatapathCollector<S> {
    pub source: S,
    pub mode: ServiceMetrics,
}

impl<S: CounterSource> Collector for DatapathCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // Families are described whatever the mode, so the set of exported names never depends on a flag.
        let services = match self.mode {
            ServiceMetrics::Off => Vec::new(),
            _ => self.source.services(),
        };
        match self.mode {
            ServiceMetrics::Off => {
                for (metric, help, _) in SERVICE_COUNTERS {
                    encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
                }
            }
            ServiceMetrics::PerService => {
                for (metric, help, read) in SERVICE_COUNTERS {
                    let mut sums: BTreeMap<ServiceLabels, u64> = BTreeMap::new();
                    for s in &services {
                        let labels = ServiceLabels {
                            namespace: s.namespace.clone(),
                            name: s.name.clone(),
                        };
                        *sums.entry(labels).or_default() += read(&s.stats);
                    }
                    let mut family =
                        encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
                    for (labels, n) in &sums {
                        ConstCounter::new(*n).encode(family.encode_family(labels)?)?;
                    }
                }
            }
            ServiceMetrics::PerFrontend => {
                for (metric, help, read) in SERVICE_COUNTERS {
                    let mut family =
                        encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
                    for s in &services {
                        let labels = FrontendLabels {
                            namespace: s.namespace.clone(),
                            name: s.name.clone(),
                            port: s.port.clone(),
                            frontend: s.frontend.clone(),
                            protocol: s.protocol.clone(),
                            scope: s.scope.clone(),
                            kind: s.kind.clone(),
                        };
                        ConstCounter::new(read(&s.stats)).encode(family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        let backends = match self.mode {
            ServiceMetrics::PerFrontend => self.source.backends(),
            _ => Vec::new(),
        };
        for (metric, help, read) in BACKEND_COUNTERS {
            let mut family = encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for b in &backends {
                let labels = BackendLabels {
                    backend: b.backend.clone(),
                    protocol: b.protocol.clone(),
                };
                ConstCounter::new(read(&b.stats)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "lb_datapath_packets",
            "Packets the per-packet datapath (tc, XDP) handled, by verdict reason (new flow, no endpoints, source \
             range, unallocated ClusterIP, malformed, ...), node-wide.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in self.source.packets_by_reason() {
            let labels = ReasonLabels {
                reason: reason.to_owned(),
            };
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "lb_socket_refusals",
            "connect() and sendmsg() calls the socket LB failed, by reason: unallocated-cluster-ip and source-range \
             (EPERM), unknown-port and no-endpoints (ECONNREFUSED), no-local-endpoint (EPERM), node-wide.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in self.source.sock_refusals_by_reason() {
            let labels = ReasonLabels {
                reason: reason.to_owned(),
            };
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        let fill = self.source.map_fill();
        for (metric, help, read) in [
            (
                "lb_map_entries",
                "Entries in each pinned map that fills up (hash, LRU and LPM maps; conntrack included).",
                (|f: &MapFill| f.entries) as fn(&MapFill) -> u64,
            ),
            (
                "lb_map_capacity",
                "Capacity (max_entries) of each pinned map that fills up.",
                |f: &MapFill| f.capacity,
            ),
        ] {
            let mut family = encoder.encode_descriptor(metric, help, None, MetricType::Gauge)?;
            for f in &fill {
                let labels = MapLabels { map: f.map.clone() };
                ConstGauge::new(read(f) as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
