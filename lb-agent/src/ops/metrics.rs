//! Prometheus metrics (`prometheus-client`): the agent's own (sync duration, network programming latency, what is
//! programmed, skipped objects, frontends that did not fit) and, read from the pinned maps at scrape time, the
//! datapath's per-service and per-backend counters and the maps' fill levels.
//!
//! The datapath counters are the tables of `datapath::counters`: a new field in `lb_common::ServiceStats` or
//! `BackendStats` is one line there.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use lb_common::{BackendStats, ServiceStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::datapath::counters::{BACKEND_COUNTERS, SERVICE_COUNTERS};
use crate::datapath::display::{proto_name, scope_name, show_addr};
use crate::datapath::listings;
use crate::datapath::maps::{MapsRead, PinnedMaps};
use crate::datapath::names::{kind_name, service_names};
use crate::datapath::reconcile::SyncReport;
use crate::model::Diagnostic;

/// One programmed service as the collector labels it.
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

/// A map's fill level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Where the collector reads the datapath's numbers: the pinned maps, or a fake in unit tests.
pub trait CounterSource: fmt::Debug + Send + Sync + 'static {
    fn services(&self) -> Vec<ServiceSample>;
    fn backends(&self) -> Vec<BackendSample>;
    fn map_fill(&self) -> Vec<MapFill>;
    /// The per-packet datapath's packet counts by verdict reason (`LB_DROP_STATS`), node-wide.
    fn packets_by_reason(&self) -> Vec<(&'static str, u64)>;
}

/// Splits `namespace/name:port` (the names map's form) into its parts.
pub fn split_service_name(full: &str) -> (String, String, String) {
    let (namespace, rest) = full.split_once('/').unwrap_or(("", full));
    let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
    (namespace.to_owned(), name.to_owned(), port.to_owned())
}

/// Reads the pinned maps on every scrape (so numbers are current and a map migration is followed); before the
/// agent pinned anything it reports nothing.
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
        listings::map_fill(&self.dir)
            .into_iter()
            .map(|(map, entries, capacity)| MapFill {
                map,
                entries,
                capacity,
            })
            .collect()
    }

    fn packets_by_reason(&self) -> Vec<(&'static str, u64)> {
        listings::packets_by_reason(&self.dir)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    name: String,
    port: String,
    frontend: String,
    protocol: String,
    scope: String,
    kind: String,
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkippedLabels {
    /// The object's kind (`Service`, `EndpointSlice`, `Node`, `document`).
    pub kind: String,
    /// `invalid`, `duplicate` or `frontend-conflict`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// Reads the datapath's counters at scrape time.
#[derive(Debug)]
struct DatapathCollector<S: CounterSource> {
    source: S,
}

impl<S: CounterSource> Collector for DatapathCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let services = self.source.services();
        for (metric, help, read) in SERVICE_COUNTERS {
            let mut family = encoder.encode_descriptor(
                metric,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for s in &services {
                let labels = ServiceLabels {
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
        let backends = self.source.backends();
        for (metric, help, read) in BACKEND_COUNTERS {
            let mut family = encoder.encode_descriptor(
                metric,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
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
            "Packets the per-packet datapath handled, by verdict reason (new flow, no endpoints, source range, \
             malformed, ...), node-wide.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, n) in self.source.packets_by_reason() {
            let labels = ReasonLabels {
                reason: reason.to_owned(),
            };
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        let fill = self.source.map_fill();
        for (metric, help, read) in [
            (
                "lb_map_entries",
                "Entries in each pinned map.",
                (|f: &MapFill| f.entries) as fn(&MapFill) -> u64,
            ),
            (
                "lb_map_capacity",
                "Capacity (max_entries) of each pinned map.",
                |f: &MapFill| f.capacity,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                metric,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for f in &fill {
                let labels = MapLabels {
                    map: f.map.to_owned(),
                };
                ConstGauge::new(read(f) as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The agent's own metrics, updated by the run loop.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    pub sync_duration: Histogram,
    pub programming_latency: Histogram,
    pub syncs: Family<ResultLabels, Counter>,
    pub frontends_programmed: Gauge,
    pub backends_programmed: Gauge,
    pub frontends_failed: Gauge,
    pub skipped_objects: Family<SkippedLabels, Gauge>,
    pub health_check_servers: Gauge,
    pub config_reloads: Family<ResultLabels, Counter>,
}

impl AgentMetrics {
    fn new() -> Self {
        Self {
            // 1 ms .. ~16 s: a sync of a few services takes milliseconds, tens of thousands take seconds.
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            programming_latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            syncs: Family::default(),
            frontends_programmed: Gauge::default(),
            backends_programmed: Gauge::default(),
            frontends_failed: Gauge::default(),
            skipped_objects: Family::default(),
            health_check_servers: Gauge::default(),
            config_reloads: Family::default(),
        }
    }

    /// Records one sync's outcome.
    pub fn record_sync(
        &self,
        report: &SyncReport,
        diagnostics: &[&Diagnostic],
        frontends: usize,
        backends: usize,
    ) {
        let result = if report.failed.is_empty() {
            "ok"
        } else {
            "partial"
        };
        self.syncs
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
        self.frontends_programmed
            .set(frontends.saturating_sub(report.failed.len()) as i64);
        self.backends_programmed.set(backends as i64);
        self.frontends_failed.set(report.failed.len() as i64);
        // Gauges of the last sync: objects fixed since then must disappear from the numbers.
        self.skipped_objects.clear();
        for d in diagnostics {
            self.skipped_objects.get_or_create(&skipped_labels(d)).inc();
        }
    }
}

/// Classifies a diagnostic for `lb_skipped_objects`.
pub fn skipped_labels(d: &Diagnostic) -> SkippedLabels {
    let kind = d.object.split_whitespace().next().unwrap_or("unknown");
    let reason = if d.message.contains("defined more than once") {
        "duplicate"
    } else if d.message.contains("is already served") {
        "frontend-conflict"
    } else {
        "invalid"
    };
    SkippedLabels {
        kind: kind.to_owned(),
        reason: reason.to_owned(),
    }
}

/// The registry: agent metrics plus the datapath collector.
pub struct Metrics {
    registry: Registry,
    pub agent: AgentMetrics,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(source: impl CounterSource) -> Self {
        let mut registry = Registry::default();
        let agent = AgentMetrics::new();
        registry.register(
            "lb_sync_duration_seconds",
            "Time one sync takes: translate the objects and write the differences to the maps.",
            agent.sync_duration.clone(),
        );
        registry.register(
            "lb_network_programming_duration_seconds",
            "From a change being seen (file event) to the maps holding it (kube-proxy's network_programming_duration).",
            agent.programming_latency.clone(),
        );
        registry.register(
            "lb_syncs",
            "Syncs, by result (ok, partial: some frontend could not be programmed).",
            agent.syncs.clone(),
        );
        registry.register(
            "lb_programmed_frontends",
            "Frontends (VIP, port, protocol, scope) programmed in the maps after the last sync.",
            agent.frontends_programmed.clone(),
        );
        registry.register(
            "lb_programmed_backends",
            "Backends programmed in the maps after the last sync.",
            agent.backends_programmed.clone(),
        );
        registry.register(
            "lb_unprogrammed_frontends",
            "Frontends the last sync could not program (map capacity, map errors); see the log for which.",
            agent.frontends_failed.clone(),
        );
        registry.register(
            "lb_skipped_objects",
            "Objects (or parts) the last sync skipped, by kind and reason.",
            agent.skipped_objects.clone(),
        );
        registry.register(
            "lb_health_check_servers",
            "healthCheckNodePort servers running.",
            agent.health_check_servers.clone(),
        );
        registry.register(
            "lb_config_reloads",
            "Configuration file reloads, by result.",
            agent.config_reloads.clone(),
        );
        registry.register_collector(Box::new(DatapathCollector { source }));
        Self { registry, agent }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Shared between the run loop (writer) and the metrics server (reader).
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake;

    impl CounterSource for Fake {
        fn services(&self) -> Vec<ServiceSample> {
            vec![ServiceSample {
                id: 1,
                frontend: "10.96.0.10:80".into(),
                protocol: "TCP".into(),
                scope: "internal".into(),
                namespace: "ns".into(),
                name: "web".into(),
                port: "http".into(),
                kind: "ClusterIP".into(),
                stats: ServiceStats {
                    sock_connects: 7,
                    sock_rejects: 2,
                    ..Default::default()
                },
            }]
        }
        fn backends(&self) -> Vec<BackendSample> {
            vec![BackendSample {
                id: 3,
                backend: "10.0.1.1:8080".into(),
                protocol: "TCP".into(),
                stats: BackendStats {
                    sock_connects: 5,
                    ..Default::default()
                },
            }]
        }
        fn map_fill(&self) -> Vec<MapFill> {
            vec![MapFill {
                map: "LB_SERVICES",
                entries: 2,
                capacity: 65536,
            }]
        }
        fn packets_by_reason(&self) -> Vec<(&'static str, u64)> {
            vec![("no-endpoints", 3), ("source-range", 4)]
        }
    }

    #[test]
    fn renders_datapath_counters_with_service_labels() {
        let m = Metrics::new(Fake);
        let text = m.render();
        let labels = r#"namespace="ns",name="web",port="http",frontend="10.96.0.10:80",protocol="TCP",scope="internal",kind="ClusterIP""#;
        assert!(
            text.contains(&format!("lb_service_sock_connects_total{{{labels}}} 7")),
            "{text}"
        );
        assert!(
            text.contains(&format!("lb_service_sock_rejects_total{{{labels}}} 2")),
            "{text}"
        );
        assert!(
            text.contains(
                r#"lb_backend_sock_connects_total{backend="10.0.1.1:8080",protocol="TCP"} 5"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_map_entries{map="LB_SERVICES"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_datapath_packets_total{reason="no-endpoints"} 3"#)
                && text.contains(r#"lb_datapath_packets_total{reason="source-range"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_map_capacity{map="LB_SERVICES"} 65536"#),
            "{text}"
        );
        // Every counter of the table is exported, even at zero.
        for (name, _, _) in SERVICE_COUNTERS {
            assert!(
                text.contains(&format!("# TYPE {name} counter")),
                "{name} missing:\n{text}"
            );
        }
    }

    #[test]
    fn sync_metrics_follow_the_last_sync() {
        let m = Metrics::new(Fake);
        let bad = Diagnostic::new(
            "Service ns/bad",
            Some("spec.ports".into()),
            "no ports; skipped",
        );
        let dup = Diagnostic::new(
            "Service ns/web",
            None,
            "defined more than once; the last definition is used",
        );
        let report = SyncReport {
            failed: vec![(
                crate::state::Frontend {
                    addr: "10.96.0.1".parse().expect("ip"),
                    port: 80,
                    proto: crate::state::Protocol::Tcp,
                    scope: crate::state::Scope::Internal,
                },
                crate::datapath::reconcile::FrontendError::ServiceCapacity {
                    capacity: 15,
                    needed: None,
                },
            )],
            ..Default::default()
        };
        m.agent.record_sync(&report, &[&bad, &dup], 10, 4);
        m.agent.sync_duration.observe(0.01);
        let text = m.render();
        assert!(text.contains("lb_programmed_frontends 9"), "{text}");
        assert!(text.contains("lb_unprogrammed_frontends 1"), "{text}");
        assert!(
            text.contains(r#"lb_skipped_objects{kind="Service",reason="invalid"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_skipped_objects{kind="Service",reason="duplicate"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_syncs_total{result="partial"} 1"#),
            "{text}"
        );
        assert!(text.contains("lb_sync_duration_seconds_count 1"), "{text}");
        m.agent.record_sync(&SyncReport::default(), &[], 10, 4);
        let text = m.render();
        assert!(
            !text.contains("reason=\"invalid\""),
            "cleared after a clean sync:\n{text}"
        );
    }

    #[test]
    fn service_names_split_into_labels() {
        assert_eq!(
            split_service_name("ns/web:http"),
            ("ns".into(), "web".into(), "http".into())
        );
        assert_eq!(
            split_service_name("ns/web"),
            ("ns".into(), "web".into(), String::new())
        );
    }
}
