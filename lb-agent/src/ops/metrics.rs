//! Prometheus metrics (`prometheus-client`), in three groups:
//!
//! - **kube-proxy's**, under kube-proxy's names and with kube-proxy's meaning wherever lb measures the same
//!   quantity (`pkg/proxy/metrics/metrics.go`): sync duration (all, full, partial), last sync and last queued
//!   timestamps, network programming latency from the EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`,
//!   Service and endpoint changes (total and pending), Services with a Local policy and no local endpoint,
//!   healthz/livez answers; the API client's `rest_client_*` (`source::kube::api_metrics`) and the `process_*`
//!   family (`process`). Dashboards and alerts written for kube-proxy (kubernetes-mixin's) read them unchanged.
//! - **lb's own** beside them, `lb_*`: what is programmed, what was skipped and why, the agent's own share of the
//!   programming latency, watch failures, config reloads, build information.
//! - **the datapath's**, read from the pinned maps at scrape time (`datapath`): packets by verdict reason and map
//!   fill always, per-Service and per-backend counters only as `--service-metrics` asks.
//!
//! kube-proxy 1.33+ labels some of its families with `ip_family`, because it runs one proxier per family; lb
//! programs both families in one sync, so its families carry no such label (every kubernetes-mixin query sums or
//! aggregates over it, so they work the same).

mod datapath;
mod process;

pub use datapath::{
    BackendSample, CounterSource, PinnedCounters, ServiceMetrics, ServiceSample, split_service_name,
};

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::datapath::reconcile::SyncReport;
use crate::model::{ChangeCounts, Diagnostic};
use crate::source::kube::api_metrics::ApiMetrics;
use crate::source::kube::watch_health::WatchHealth;
use crate::state::{DesiredState, Scope, VipKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkippedLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabels {
    pub traffic_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
    ebpf_object: String,
}

/// What this binary is, for `lb_build_info` and `lb-agent status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuildInfo {
    pub version: String,
    pub commit: String,
    pub ebpf_object: String,
}

/// kube-proxy's `sync_proxy_rules_duration_seconds` buckets: 1 ms doubling to ~16 s.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// kube-proxy's `network_programming_duration_seconds` buckets: 0.25 s, 0.5 s, every second to 59 s, every 5 s to
/// 115 s, every 30 s to 5 min.
fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The agent's own metrics, updated by the run loop through `Ops`.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub last_queued: Gauge<f64, AtomicU64>,
    pub network_programming: Histogram,
    pub change_programming: Histogram,
    pub endpoint_changes: Counter,
    pub service_changes: Counter,
    pub no_local_endpoints: Family<TrafficPolicyLabels, Gauge>,
    pub healthz: Family<CodeLabels, Counter>,
    pub livez: Family<CodeLabels, Counter>,
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
            sync_duration: Histogram::new(sync_buckets()),
            sync_full_duration: Histogram::new(sync_buckets()),
            sync_partial_duration: Histogram::new(sync_buckets()),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            network_programming: Histogram::new(network_programming_buckets()),
            change_programming: Histogram::new(sync_buckets()),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            syncs: Family::default(),
            frontends_programmed: Gauge::default(),
            backends_programmed: Gauge::default(),
            frontends_failed: Gauge::default(),
            skipped_objects: Family::default(),
            health_check_servers: Gauge::default(),
            config_reloads: Family::default(),
        }
    }

    /// Records one sync: its duration (full or partial), outcome, what it left programmed, and, when it
    /// succeeded, kube-proxy's last-sync timestamp.
    pub fn record_sync(
        &self,
        report: &SyncReport,
        diagnostics: &[&Diagnostic],
        frontends: usize,
        backends: usize,
        took: Duration,
        full: bool,
    ) {
        let seconds = took.as_secs_f64();
        self.sync_duration.observe(seconds);
        if full {
            self.sync_full_duration.observe(seconds)
        } else {
            self.sync_partial_duration.observe(seconds)
        }
        let ok = report.failed.is_empty();
        self.syncs
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "partial" }.into(),
            })
            .inc();
        // kube-proxy moves the timestamp only when the rules were written; a sync that left a frontend out is
        // not a success, so an alert on a stale timestamp fires until capacity is fixed.
        if ok {
            self.last_sync.set(unix_seconds(SystemTime::now()));
        }
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

    /// kube-proxy's change counters: `counts` is the translator's running total, `before` its value at the
    /// previous call.
    pub fn record_changes(&self, before: ChangeCounts, counts: ChangeCounts) {
        self.service_changes
            .inc_by(counts.services.saturating_sub(before.services));
        self.endpoint_changes.inc_by(
            counts
                .endpoint_slices
                .saturating_sub(before.endpoint_slices),
        );
    }

    /// `kubeproxy_sync_proxy_rules_no_local_endpoints_total`: Service ports (per family) that have endpoints but
    /// none this node may use under their Local policy: `internal` for the ClusterIP (internalTrafficPolicy),
    /// `external` for NodePort, LoadBalancer and external IPs (externalTrafficPolicy). The model marks exactly
    /// these frontends `drop_if_empty`.
    pub fn record_no_local_endpoints(&self, desired: &DesiredState) {
        let mut internal = std::collections::BTreeSet::new();
        let mut external = std::collections::BTreeSet::new();
        for (f, e) in &desired.services {
            if !(e.drop_if_empty && e.backends.is_empty()) {
                continue;
            }
            let key = (&e.service, f.addr.is_ipv4());
            match (e.kind, f.scope) {
                (VipKind::ClusterIp, _) => internal.insert(key),
                (_, Scope::External) => external.insert(key),
                // A NodePort or external address reached from this node's pods follows the external policy too,
                // but it is the same Service port already counted (or not) from outside.
                (_, Scope::Internal) => false,
            };
        }
        for (policy, n) in [("internal", internal.len()), ("external", external.len())] {
            self.no_local_endpoints
                .get_or_create(&TrafficPolicyLabels {
                    traffic_policy: policy.into(),
                })
                .set(n as i64);
        }
    }

    /// Counts a `/healthz` or `/livez` answer (kube-proxy's `proxy_healthz_total` / `proxy_livez_total`).
    pub fn count_probe(&self, path: &str, status: u16) {
        let family = match path {
            "/healthz" => &self.healthz,
            "/livez" => &self.livez,
            _ => return,
        };
        family
            .get_or_create(&CodeLabels {
                code: status.to_string(),
            })
            .inc();
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

/// The kube source's watches and pending changes, read at scrape time; zeros for the file source, so the same
/// families exist whatever the source.
#[derive(Debug)]
struct SourceCollector {
    watches: Option<Arc<WatchHealth>>,
}

impl Collector for SourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let state = self.watches.as_ref().map(|w| w.state()).unwrap_or_default();
        for (name, help, value) in [
            (
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes (Services changed since the last sync).",
                state.pending_services,
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes (EndpointSlices changed since the last sync).",
                state.pending_endpoint_slices,
            ),
        ] {
            ConstGauge::new(value as i64).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        let mut errors = encoder.encode_descriptor(
            "lb_kube_watch_errors",
            "Failed list or watch attempts against the API server, by resource (each is retried with backoff).",
            None,
            MetricType::Counter,
        )?;
        for w in &state.watches {
            let labels = ResourceLabels {
                resource: w.resource.clone(),
            };
            ConstCounter::new(w.errors_total).encode(errors.encode_family(&labels)?)?;
        }
        let mut failing = encoder.encode_descriptor(
            "lb_kube_watch_failures_in_a_row",
            "Failed attempts of each watch since its last progress; 0 while it works.",
            None,
            MetricType::Gauge,
        )?;
        for w in &state.watches {
            let labels = ResourceLabels {
                resource: w.resource.clone(),
            };
            ConstGauge::new(i64::from(w.failures_in_a_row))
                .encode(failing.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Everything the registry reads besides the agent's own metrics.
pub struct MetricsSources<S> {
    pub counters: S,
    pub service_metrics: ServiceMetrics,
    /// The API client's request counters (empty for the file source).
    pub api: Arc<ApiMetrics>,
    /// The kube source's watches, if it is the source.
    pub watches: Option<Arc<WatchHealth>>,
    /// The async runtimes whose tasks `go_goroutines` counts.
    pub runtimes: Vec<tokio::runtime::Handle>,
    pub build: BuildInfo,
}

/// The registry: agent metrics plus the collectors.
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
    pub fn new<S: CounterSource>(sources: MetricsSources<S>) -> Self {
        let mut r = Registry::default();
        let a = AgentMetrics::new();
        // kube-proxy's (pkg/proxy/metrics/metrics.go), same names, same meaning.
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds: one sync, translating what changed and writing the differences \
             to the maps (full and partial).",
            a.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs (the first sync, SIGHUP, a config reload, a \
             re-read manifest directory).",
            a.sync_full_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs (only the changed Services).",
            a.sync_partial_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced (every frontend programmed).",
            a.last_sync.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued (a change was seen); much later than the last sync \
             means the agent is stuck.",
            a.last_queued.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds: from an EndpointSlice's \
             endpoints.kubernetes.io/last-change-trigger-time (the Service or pod change, stamped by the \
             EndpointSlice controller) to the maps holding it; one sample per changed EndpointSlice.",
            a.network_programming.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes (adds, updates, deletes that changed something).",
            a.service_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes (EndpointSlice adds, updates, deletes that changed something).",
            a.endpoint_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints (Service ports per family that have \
             endpoints, none of them on this node), by traffic_policy: internal or external.",
            a.no_local_endpoints.clone(),
        );
        r.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            a.healthz.clone(),
        );
        r.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            a.livez.clone(),
        );
        r.register(
            "rest_client_requests",
            "Number of HTTP requests to the API server, partitioned by status code (<error>: no response), \
             method, and host.",
            sources.api.requests.clone(),
        );
        r.register(
            "rest_client_request_duration_seconds",
            "Request latency in seconds (to the response headers; a watch until its stream opens). Broken down \
             by verb, and host.",
            sources.api.duration.clone(),
        );
        // lb's own.
        r.register(
            "lb_change_programming_duration_seconds",
            "From the agent seeing a change (watch event, file event) to the maps holding it: the agent's own share \
             of the network programming latency, batching included.",
            a.change_programming.clone(),
        );
        r.register(
            "lb_syncs",
            "Syncs, by result (ok, partial: some frontend could not be programmed).",
            a.syncs.clone(),
        );
        r.register(
            "lb_programmed_frontends",
            "Frontends (VIP, port, protocol, scope) programmed in the maps after the last sync.",
            a.frontends_programmed.clone(),
        );
        r.register(
            "lb_programmed_backends",
            "Backends programmed in the maps after the last sync.",
            a.backends_programmed.clone(),
        );
        r.register(
            "lb_unprogrammed_frontends",
            "Frontends the last sync could not program (map capacity, map errors); see the log for which.",
            a.frontends_failed.clone(),
        );
        r.register(
            "lb_skipped_objects",
            "Objects (or parts) the last sync skipped, by kind and reason.",
            a.skipped_objects.clone(),
        );
        r.register(
            "lb_health_check_servers",
            "healthCheckNodePort servers running.",
            a.health_check_servers.clone(),
        );
        r.register(
            "lb_config_reloads",
            "Configuration file reloads, by result.",
            a.config_reloads.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: sources.build.version,
                commit: sources.build.commit,
                ebpf_object: sources.build.ebpf_object,
            })
            .set(1);
        r.register(
            "lb_build_info",
            "Always 1, labelled with the agent's version, the commit it was built from and the SHA-256 of its eBPF \
             object.",
            build,
        );
        r.register_collector(Box::new(SourceCollector {
            watches: sources.watches,
        }));
        r.register_collector(Box::new(process::ProcessCollector {
            runtimes: sources.runtimes,
        }));
        r.register_collector(Box::new(datapath::DatapathCollector {
            source: sources.counters,
            mode: sources.service_metrics,
        }));
        Self {
            registry: r,
            agent: a,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Every sample name a rendering can hold, from its `# TYPE` lines: counters with `_total`, histograms with
/// `_bucket`, `_count` and `_sum`, gauges as they are. For checks that dashboards and alerts name only what the
/// agent exports.
pub fn sample_names(rendered: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for line in rendered.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() != Some("#") || parts.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_count", "_sum"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            "info" => {
                out.insert(format!("{name}_info"));
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

/// Every metric the kubernetes-mixin's kube-proxy dashboard (`dashboards/proxy.libsonnet`) and alerts
/// (`alerts/kube_proxy.libsonnet`, which instantiate `lib/absent_alert.libsonnet` and
/// `lib/instance_unreachable_alert.libsonnet`) query, as of kubernetes-monitoring/kubernetes-mixin aa38e2b, with
/// the labels those queries select or group by (besides `cluster`, `job` and `instance`, which the scrape adds).
/// Our list, kept by hand: when the mixin changes, this list changes with it. `lb-agent/tests/monitoring.rs`
/// checks the registry exports each (with its labels), `tests/tests/observability.rs` that a real agent on an API
/// server has samples of each.
pub const KUBE_PROXY_MIXIN: &[(&str, &[&str], &str)] = &[
    (
        "up",
        &[],
        "panel Up; alerts KubeProxyDown, KubeProxyInstanceUnreachable",
    ),
    (
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        &[],
        "panel Rules Sync Rate",
    ),
    (
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        &["le"],
        "panel Rules Sync Latency 99th Quantile",
    ),
    (
        "kubeproxy_network_programming_duration_seconds_count",
        &[],
        "panel Network Programming Rate",
    ),
    (
        "kubeproxy_network_programming_duration_seconds_bucket",
        &["le"],
        "panel Network Programming Latency 99th Quantile",
    ),
    (
        "rest_client_requests_total",
        &["code"],
        "panel Kube API Request Rate",
    ),
    (
        "rest_client_request_duration_seconds_bucket",
        &["verb", "le"],
        "panels Post and Get Request Latency 99th Quantile",
    ),
    ("process_resident_memory_bytes", &[], "panel Memory"),
    ("process_cpu_seconds_total", &[], "panel CPU usage"),
    ("go_goroutines", &[], "panel Goroutines"),
];

/// Metrics Prometheus makes itself for every target.
pub const FROM_THE_SCRAPE: &[&str] = &["up"];

/// Shared between the run loop (writer) and the metrics server (reader).
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::map_fill::MapFill;
    use lb_common::{BackendStats, ServiceStats};

    #[derive(Debug)]
    struct Fake;

    fn sample(frontend: &str, scope: &str, connects: u64) -> ServiceSample {
        ServiceSample {
            id: 1,
            frontend: frontend.into(),
            protocol: "TCP".into(),
            scope: scope.into(),
            namespace: "ns".into(),
            name: "web".into(),
            port: "http".into(),
            kind: "ClusterIP".into(),
            stats: ServiceStats {
                sock_connects: connects,
                sock_rejects: 2,
                ..Default::default()
            },
        }
    }

    impl CounterSource for Fake {
        fn services(&self) -> Vec<ServiceSample> {
            vec![
                sample("10.96.0.10:80", "internal", 7),
                sample("10.96.0.10:80", "external", 3),
            ]
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
                map: "LB_CONNTRACK".into(),
                entries: 2,
                capacity: 262144,
            }]
        }
        fn packets_by_reason(&self) -> Vec<(&'static str, u64)> {
            vec![("no-endpoints", 3), ("source-range", 4)]
        }
    }

    fn metrics(mode: ServiceMetrics) -> Metrics {
        Metrics::new(MetricsSources {
            counters: Fake,
            service_metrics: mode,
            api: Arc::new(ApiMetrics::default()),
            watches: None,
            runtimes: Vec::new(),
            build: BuildInfo {
                version: "0.1.0".into(),
                commit: "abc".into(),
                ebpf_object: "sha256:00".into(),
            },
        })
    }

    #[test]
    fn per_frontend_metrics_label_every_frontend_and_backend() {
        let text = metrics(ServiceMetrics::PerFrontend).render();
        let labels = r#"namespace="ns",name="web",port="http",frontend="10.96.0.10:80",protocol="TCP",scope="internal",kind="ClusterIP""#;
        assert!(
            text.contains(&format!("lb_service_sock_connects_total{{{labels}}} 7")),
            "{text}"
        );
        assert!(
            text.contains(
                r#"lb_backend_sock_connects_total{backend="10.0.1.1:8080",protocol="TCP"} 5"#
            ),
            "{text}"
        );
    }

    #[test]
    fn per_service_metrics_sum_the_frontends_and_off_exports_no_service_series() {
        let text = metrics(ServiceMetrics::PerService).render();
        assert!(
            text.contains(r#"lb_service_sock_connects_total{namespace="ns",name="web"} 10"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_service_sock_rejects_total{namespace="ns",name="web"} 4"#),
            "{text}"
        );
        assert!(!text.contains("lb_backend_sock_connects_total{"), "{text}");
        let off = metrics(ServiceMetrics::Off).render();
        assert!(
            !off.contains("lb_service_sock_connects_total{") && !off.contains("backend=\""),
            "{off}"
        );
        // The same families are described whatever the mode.
        assert_eq!(sample_names(&off), sample_names(&text));
        for text in [&off, &text] {
            assert!(
                text.contains(r#"lb_datapath_packets_total{reason="no-endpoints"} 3"#)
                    && text.contains(r#"lb_map_entries{map="LB_CONNTRACK"} 2"#)
                    && text.contains(r#"lb_map_capacity{map="LB_CONNTRACK"} 262144"#),
                "{text}"
            );
        }
    }

    #[test]
    fn kube_proxy_metrics_follow_the_syncs() {
        let m = metrics(ServiceMetrics::Off);
        let bad = Diagnostic::new(
            "Service ns/bad",
            Some("spec.ports".into()),
            "no ports; skipped",
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
        m.agent
            .record_sync(&report, &[&bad], 10, 4, Duration::from_millis(3), true);
        let text = m.render();
        assert!(text.contains("lb_programmed_frontends 9"), "{text}");
        assert!(text.contains("lb_unprogrammed_frontends 1"), "{text}");
        assert!(
            text.contains(r#"lb_skipped_objects{kind="Service",reason="invalid"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 1")
                && text.contains("kubeproxy_sync_full_proxy_rules_duration_seconds_count 1")
                && text.contains("kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds 0.0"),
            "a partial sync is not a successful one:\n{text}"
        );
        m.agent.record_sync(
            &SyncReport::default(),
            &[],
            10,
            4,
            Duration::from_millis(1),
            false,
        );
        let text = m.render();
        assert!(!text.contains("reason=\"invalid\""), "{text}");
        assert!(
            !text.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds 0.0"),
            "{text}"
        );
        m.agent.record_changes(
            ChangeCounts::default(),
            ChangeCounts {
                services: 2,
                endpoint_slices: 5,
            },
        );
        m.agent.count_probe("/healthz", 200);
        m.agent.count_probe("/healthz", 503);
        m.agent.count_probe("/readyz", 200);
        let text = m.render();
        for want in [
            "kubeproxy_sync_proxy_rules_service_changes_total 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 5",
            r#"kubeproxy_proxy_healthz_total{code="200"} 1"#,
            r#"kubeproxy_proxy_healthz_total{code="503"} 1"#,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
            r#"lb_build_info{version="0.1.0",commit="abc",ebpf_object="sha256:00"} 1"#,
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }

    #[test]
    fn network_programming_buckets_are_kube_proxys() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 2 + 59 + 12 + 7);
        assert_eq!(
            (b[0], b[2], b[60], b[61], b[72], b[73], b[79]),
            (0.25, 1.0, 59.0, 60.0, 115.0, 120.0, 300.0)
        );
    }

    #[test]
    fn sample_names_expand_the_types() {
        // Families without a series are not written: give the labelled ones one.
        let api = Arc::new(ApiMetrics::default());
        api.record("10.0.0.1:443", "GET", Some(200), 0.01);
        let m = Metrics::new(MetricsSources {
            counters: Fake,
            service_metrics: ServiceMetrics::Off,
            api,
            watches: None,
            runtimes: Vec::new(),
            build: BuildInfo::default(),
        });
        m.agent.record_no_local_endpoints(&DesiredState::default());
        let text = m.render();
        let names = sample_names(&text);
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_network_programming_duration_seconds_count",
            "rest_client_requests_total",
            "rest_client_request_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "lb_map_entries",
            "lb_build_info",
        ] {
            assert!(names.contains(want), "{want} not in {names:?}");
        }
    }
}
