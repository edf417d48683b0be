//! The monitoring contract: dashboards and alerts written for kube-proxy work on lb, and lb's own dashboard and
//! alerts (deploy/monitoring/) name only metrics the agent exports.
//!
//! "Exported" is what the agent's registry renders once every labelled family has a series: the real
//! `lb_agent::ops::metrics::Metrics`, fed with one event of each kind, read back through its `# TYPE` lines. The
//! end-to-end check that a real agent on a real (in-process) API server exposes the kubernetes-mixin metrics with
//! samples is `tests/tests/observability.rs` (root).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lb_agent::datapath::map_fill::MapFill;
use lb_agent::datapath::reconcile::SyncReport;
use lb_agent::ops::metrics::{
    BackendSample, BuildInfo, CounterSource, FROM_THE_SCRAPE, KUBE_PROXY_MIXIN, Metrics,
    MetricsSources, ServiceMetrics, ServiceSample, sample_names,
};
use lb_agent::source::kube::api_metrics::ApiMetrics;

#[derive(Debug)]
struct OneOfEach;

impl CounterSource for OneOfEach {
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
            stats: Default::default(),
        }]
    }
    fn backends(&self) -> Vec<BackendSample> {
        vec![BackendSample {
            id: 1,
            backend: "10.0.0.1:8080".into(),
            protocol: "TCP".into(),
            stats: Default::default(),
        }]
    }
    fn map_fill(&self) -> Vec<MapFill> {
        vec![MapFill {
            map: "LB_CONNTRACK".into(),
            entries: 1,
            capacity: 2,
        }]
    }
    fn packets_by_reason(&self) -> Vec<(&'static str, u64)> {
        vec![("new-flow", 1)]
    }
}

/// The agent's registry after one event of each kind, rendered.
fn exported() -> String {
    let api = Arc::new(ApiMetrics::default());
    api.record("10.96.0.1:443", "GET", Some(200), 0.01);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let m = Metrics::new(MetricsSources {
        counters: OneOfEach,
        service_metrics: ServiceMetrics::PerFrontend,
        api,
        watches: Some(Arc::new(
            lb_agent::source::kube::watch_health::WatchHealth::new("https://10.96.0.1"),
        )),
        runtimes: vec![rt.handle().clone()],
        build: BuildInfo::default(),
    });
    let diagnostic = lb_agent::model::Diagnostic::new("Service ns/x", None, "no ports; skipped");
    m.agent.record_sync(
        &SyncReport::default(),
        &[&diagnostic],
        1,
        1,
        Duration::from_millis(1),
        true,
    );
    m.agent.network_programming.observe(0.5);
    m.agent.record_no_local_endpoints(&Default::default());
    m.agent.count_probe("/healthz", 200);
    m.agent.count_probe("/livez", 200);
    m.agent
        .syncs
        .get_or_create(&lb_agent::ops::metrics::ResultLabels {
            result: "ok".into(),
        })
        .inc();
    m.agent
        .config_reloads
        .get_or_create(&lb_agent::ops::metrics::ResultLabels {
            result: "ok".into(),
        })
        .inc();
    m.render()
}

/// Label names that appear on `metric`'s samples in a rendering.
fn labels_of(rendered: &str, metric: &str) -> BTreeSet<String> {
    rendered
        .lines()
        .filter_map(|l| l.strip_prefix(metric)?.strip_prefix('{'))
        .flat_map(|rest| {
            let inner = rest.split('}').next().unwrap_or_default();
            inner
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_metric_the_kube_proxy_mixin_queries_is_exported_with_its_labels() {
    let text = exported();
    let names = sample_names(&text);
    let mut missing = Vec::new();
    for (metric, labels, used_by) in KUBE_PROXY_MIXIN {
        if FROM_THE_SCRAPE.contains(metric) {
            continue;
        }
        if !names.contains(*metric) {
            missing.push(format!("{metric} (used by {used_by})"));
            continue;
        }
        let have = labels_of(&text, metric);
        for l in *labels {
            if !have.contains(*l) {
                missing.push(format!("label {l} of {metric} (used by {used_by})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the kube-proxy dashboard and alerts of kubernetes-mixin query what lb does not export:\n{}",
        missing.join("\n")
    );
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every PromQL expression of a Grafana dashboard: panel targets (rows' nested panels too) and template queries.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                match (k.as_str(), child) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    // label_values(<series selector>, <label>): the selector is PromQL.
                    ("definition", serde_json::Value::String(q)) => {
                        if let Some(inner) = q
                            .strip_prefix("label_values(")
                            .and_then(|r| r.strip_suffix(')'))
                            .and_then(|r| r.rsplit_once(','))
                        {
                            out.push(inner.0.to_owned());
                        }
                    }
                    _ => dashboard_exprs(child, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

/// PromQL keywords that read like identifiers, and the aggregation operators (which may be followed by `by (...)`
/// before their parenthesis).
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// The metric names a PromQL expression selects: identifiers outside strings, label matchers (`{...}`) and
/// ranges (`[...]`) that are not functions (followed by `(`), keywords, or the label lists of `by`, `without`,
/// `on`, `ignoring`, `group_left` and `group_right`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens: Vec<String> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                tokens.push(chars[start..i].iter().collect());
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations (5m, 1e3, 0.99).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            '(' | ')' | ',' => {
                tokens.push(c.to_string());
                i += 1;
            }
            _ => i += 1,
        }
    }
    let mut out = BTreeSet::new();
    let mut k = 0;
    while k < tokens.len() {
        let t = tokens[k].as_str();
        let next = tokens.get(k + 1).map(String::as_str);
        if [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ]
        .contains(&t)
            && next == Some("(")
        {
            // Skip the label list.
            while k < tokens.len() && tokens[k] != ")" {
                k += 1;
            }
        } else if next == Some("(") || KEYWORDS.contains(&t) || ["(", ")", ","].contains(&t) {
        } else {
            out.insert(t.to_owned());
        }
        k += 1;
    }
    out
}

#[test]
fn promql_metric_names_skip_functions_labels_strings_and_ranges() {
    let e = r#"histogram_quantile(0.99, sum by (instance, le) (rate(kubeproxy_network_programming_duration_seconds_bucket{job=~"lb-agent.*", instance=~"$instance"}[$__rate_interval]))) > 30 and on(instance) up == 1 or vector(0)"#;
    assert_eq!(
        metric_names(e).into_iter().collect::<Vec<_>>(),
        [
            "kubeproxy_network_programming_duration_seconds_bucket",
            "up"
        ]
    );
    assert_eq!(
        metric_names("sum without (map) (lb_map_entries / lb_map_capacity) offset 5m")
            .into_iter()
            .collect::<Vec<_>>(),
        ["lb_map_capacity", "lb_map_entries"]
    );
}

/// Every expression of the dashboard and the alerts, with where it is.
fn monitoring_exprs() -> Vec<(String, String)> {
    let dir = repo().join("deploy/monitoring");
    let mut out = Vec::new();
    let dashboard = dir.join("lb-dashboard.json");
    let text = std::fs::read_to_string(&dashboard).expect("deploy/monitoring/lb-dashboard.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&v, &mut exprs);
    out.extend(
        exprs
            .into_iter()
            .map(|e| ("lb-dashboard.json".to_owned(), e)),
    );
    let rules = dir.join("lb-prometheusrule.yaml");
    let text = std::fs::read_to_string(&rules).expect("deploy/monitoring/lb-prometheusrule.yaml");
    let v: serde_json::Value = serde_saphyr::from_str(&text).expect("the rules are YAML");
    assert_eq!(v["kind"], "PrometheusRule", "{v}");
    for group in v["spec"]["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .or_else(|| rule["record"].as_str())
                .expect("named");
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has no expr"));
            out.push((format!("lb-prometheusrule.yaml {name}"), expr.to_owned()));
        }
    }
    out
}

#[test]
fn the_dashboard_and_the_alerts_name_only_exported_metrics() {
    let names = sample_names(&exported());
    let exprs = monitoring_exprs();
    assert!(exprs.len() >= 20, "too few expressions found: {exprs:?}");
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for (place, expr) in &exprs {
        let metrics = metric_names(expr);
        assert!(!metrics.is_empty(), "{place}: no metric in {expr}");
        for m in metrics {
            if !names.contains(&m) && !FROM_THE_SCRAPE.contains(&m.as_str()) {
                unknown.push(format!("{place}: {m} in {expr}"));
            }
            used.insert(m);
        }
    }
    assert!(
        unknown.is_empty(),
        "not exported by the agent:\n{}",
        unknown.join("\n")
    );
    // The alerts cover the failure modes an SRE is paged for.
    for want in [
        "up",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "lb_unprogrammed_frontends",
        "lb_kube_watch_failures_in_a_row",
        "lb_map_entries",
    ] {
        assert!(used.contains(want), "nothing watches {want}");
    }
}
