//! kube-proxy's own configuration file (`kind: KubeProxyConfiguration`, `apiVersion:
//! kubeproxy.config.k8s.io/v1alpha1`) read as `lb-agent run` settings: each field that means something to lb becomes
//! the setting (long flag name) with that meaning, and every other field that is set is named in one warning. The
//! result is an ordinary config file's values, so precedence (a flag or environment variable beats the file) and
//! reload work as for lb's own format. A leaf: imports nothing of the crate.
//!
//! Defaults follow kube-proxy's where lb has the setting: with `mode` iptables or ipvs (or unset: iptables) and no
//! `nodePortAddresses`, NodePorts listen on every local address (`0.0.0.0/0,::/0`), as kube-proxy does there; in
//! nftables mode `primary` (lb's default) and no `localhost:nodePort`. A field left null, empty, zero or false is
//! kube-proxy's default, not a choice: it sets nothing and is not named. docs/kube-proxy-flags.md has the table.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// kube-proxy's default ports, added to a bind address given without one (its `AppendPortIfNeeded`).
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;

/// The file's meaning for lb.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translated {
    /// Long flag name of `lb-agent run` -> value as typed on the command line.
    pub values: BTreeMap<String, String>,
    /// The fields that are set but mean nothing to lb (dotted paths, `iptables.masqueradeAll`), in file order.
    pub ignored: Vec<String>,
}

/// Whether a parsed YAML document is a KubeProxyConfiguration (by its kind or its API group).
pub fn is_kube_proxy_config(doc: &Map<String, Value>) -> bool {
    doc.get("kind").and_then(Value::as_str) == Some(KIND)
        || doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("kubeproxy.config.k8s.io/"))
}

/// Translates a KubeProxyConfiguration document. Errors name the field.
pub fn translate(doc: &Map<String, Value>) -> Result<Translated, String> {
    match doc.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        other => {
            return Err(format!(
                "apiVersion {other:?}: only {API_VERSION} (the KubeProxyConfiguration version kube-proxy reads) is understood"
            ));
        }
    }
    let mut leaves = Vec::new();
    flatten("", doc, &mut leaves);
    let text = |path: &str| -> Option<String> {
        leaves
            .iter()
            .find(|(p, _)| p == path)
            .and_then(|(_, v)| scalar(v))
            .filter(|s| !s.is_empty())
    };
    let mode = text("mode").unwrap_or_default();
    let mut out = Translated::default();
    let mut set = |key: &str, value: String| {
        out.values.insert(key.to_owned(), value);
    };
    let mut used: Vec<&str> = vec!["apiVersion", "kind", "mode"];

    if let Some(name) = text("hostnameOverride") {
        set("node-name", name.trim().to_lowercase());
    }
    used.push("hostnameOverride");
    if let Some(kubeconfig) = text("clientConnection.kubeconfig") {
        set("kubeconfig", kubeconfig);
    }
    used.push("clientConnection.kubeconfig");
    if let Some(addr) = text("healthzBindAddress") {
        set("health-addr", with_port(&addr, HEALTHZ_PORT));
    }
    used.push("healthzBindAddress");
    if let Some(addr) = text("metricsBindAddress") {
        set("metrics-addr", with_port(&addr, METRICS_PORT));
    }
    used.push("metricsBindAddress");

    // NodePorts: the list as given, else the mode's default.
    let nodeport_addresses = match leaves.iter().find(|(p, _)| p == "nodePortAddresses") {
        Some((_, Value::Array(items))) if !items.is_empty() => Some(
            items
                .iter()
                .map(|i| scalar(i).ok_or_else(|| format!("nodePortAddresses: {i} is not a string")))
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
        ),
        Some((_, v)) if !matches!(v, Value::Null | Value::Array(_)) => {
            return Err(format!("nodePortAddresses: expected a list, not {v}"));
        }
        _ if matches!(mode.as_str(), "" | "iptables" | "ipvs") => Some("0.0.0.0/0,::/0".to_owned()),
        _ => None,
    };
    if let Some(list) = nodeport_addresses {
        set("nodeport-addresses", list);
    }
    used.push("nodePortAddresses");
    // localhost:nodePort: iptables mode only (its `localhostNodePorts`, default true), never in the others.
    match mode.as_str() {
        "" | "iptables" => {
            if let Some(v) = text("iptables.localhostNodePorts") {
                set("localhost-nodeports", v);
            }
            used.push("iptables.localhostNodePorts");
        }
        _ => set("localhost-nodeports", "false".to_owned()),
    }

    for (field, key) in [
        ("detectLocalMode", "detect-local-mode"),
        ("detectLocal.bridgeInterface", "pod-bridge-interface"),
        (
            "detectLocal.interfaceNamePrefix",
            "pod-interface-name-prefix",
        ),
        ("clusterCIDR", "cluster-cidr"),
        ("conntrack.maxPerCore", "conntrack-max-per-core"),
        ("conntrack.min", "conntrack-min"),
    ] {
        if let Some(v) = text(field) {
            set(key, v);
        }
        used.push(field);
    }
    // Conntrack timeouts: Go durations, as lb's flags take them; a zero one leaves the default, as kube-proxy leaves
    // netfilter's.
    for (field, key) in [
        (
            "conntrack.tcpEstablishedTimeout",
            "conntrack-tcp-timeout-established",
        ),
        (
            "conntrack.tcpCloseWaitTimeout",
            "conntrack-tcp-timeout-close-wait",
        ),
        ("conntrack.udpTimeout", "conntrack-udp-timeout"),
        ("conntrack.udpStreamTimeout", "conntrack-udp-timeout-stream"),
    ] {
        if let Some((_, v)) = leaves.iter().find(|(p, _)| p == field)
            && is_set(field, v)
            && let Some(v) = scalar(v)
        {
            set(key, v);
        }
        used.push(field);
    }
    // klog's verbosity: 0-3 are kube-proxy's normal operation, 4 and 5 its debugging, 6 and up tracing.
    if let Some(v) = text("logging.verbosity").filter(|v| v != "0") {
        let level: u32 = v
            .parse()
            .map_err(|_| format!("logging.verbosity: {v:?} is not a number"))?;
        let level = match level {
            0..=3 => "info",
            4 | 5 => "debug",
            _ => "trace",
        };
        set("log-level", level.to_owned());
    }
    used.push("logging.verbosity");

    out.ignored = leaves
        .iter()
        .filter(|(path, value)| !used.contains(&path.as_str()) && is_set(path, value))
        .map(|(path, _)| path.clone())
        .collect();
    Ok(out)
}

/// The document's leaves as (dotted path, value); `featureGates` stays whole.
fn flatten(prefix: &str, map: &Map<String, Value>, out: &mut Vec<(String, Value)>) {
    for (key, value) in map {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Value::Object(inner) if path != "featureGates" => {
                flatten(&path, inner, out);
            }
            _ => out.push((path, value.clone())),
        }
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Whether a field carries a choice rather than kube-proxy's zero value (which its defaulting fills in).
fn is_set(path: &str, v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        // A bind address left unspecified is kube-proxy's default (`bindAddress: 0.0.0.0`).
        Value::String(s) => {
            !(s.is_empty()
                || s == "0"
                || s == "0s"
                || (path == "bindAddress" && (s == "0.0.0.0" || s == "::")))
        }
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// `addr` with `port` appended when it has none (an IPv6 address gets brackets).
fn with_port(addr: &str, port: u16) -> String {
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return addr.to_owned();
    }
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(a)) => format!("[{a}]:{port}"),
        _ => format!("{addr}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> Map<String, Value> {
        match serde_saphyr::from_str::<Value>(yaml).expect("yaml") {
            Value::Object(m) => m,
            other => panic!("not a mapping: {other}"),
        }
    }

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// kubeadm's kube-proxy ConfigMap (`config.conf`) as `kubeadm init` writes it, with a few choices made.
    const KUBEADM: &str = "
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: \"\"
  burst: 0
  contentType: \"\"
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: 65536
  min: null
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: 2h0m0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: \"\"
  interfaceNamePrefix: \"\"
detectLocalMode: \"\"
enableProfiling: false
healthzBindAddress: \"\"
hostnameOverride: \"\"
iptables:
  localhostNodePorts: null
  masqueradeAll: true
  masqueradeBit: null
  minSyncPeriod: 1s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  scheduler: \"\"
  strictARP: false
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: \"0\"
  verbosity: 0
metricsBindAddress: 0.0.0.0
mode: nftables
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: \"\"
showHiddenMetricsForVersion: \"\"
winkernel:
  enableDSR: false
  networkName: \"\"
";

    #[test]
    fn a_kubeadm_config_maps_what_applies_and_names_the_rest() {
        let t = translate(&doc(KUBEADM)).expect("valid");
        assert_eq!(
            t.values,
            values(&[
                ("cluster-cidr", "10.244.0.0/16"),
                ("conntrack-max-per-core", "65536"),
                ("conntrack-tcp-timeout-established", "2h0m0s"),
                ("kubeconfig", "/var/lib/kube-proxy/kubeconfig.conf"),
                ("localhost-nodeports", "false"),
                ("metrics-addr", "0.0.0.0:10249"),
            ])
        );
        assert_eq!(
            t.ignored,
            vec!["iptables.masqueradeAll", "iptables.minSyncPeriod",]
        );
    }

    #[test]
    fn iptables_mode_defaults_nodeports_to_every_address_and_keeps_localhost() {
        let t = translate(&doc(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: iptables\n\
             iptables: {localhostNodePorts: false}\nhealthzBindAddress: '::'\nhostnameOverride: ' Worker-1 '\n\
             logging: {verbosity: 4}\n",
        ))
        .expect("valid");
        assert_eq!(
            t.values,
            values(&[
                ("health-addr", "[::]:10256"),
                ("localhost-nodeports", "false"),
                ("log-level", "debug"),
                ("node-name", "worker-1"),
                ("nodeport-addresses", "0.0.0.0/0,::/0"),
            ])
        );
        assert!(t.ignored.is_empty(), "{:?}", t.ignored);

        let t = translate(&doc(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             nodePortAddresses: [primary]\ndetectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: cni0}\n\
             featureGates: {SomeGate: true}\nbindAddress: 192.168.0.10\n",
        ))
        .expect("valid");
        assert_eq!(
            t.values,
            values(&[
                ("detect-local-mode", "BridgeInterface"),
                ("nodeport-addresses", "primary"),
                ("pod-bridge-interface", "cni0"),
            ])
        );
        assert_eq!(t.ignored, vec!["bindAddress", "featureGates"]);
    }

    #[test]
    fn other_versions_and_bad_fields_are_errors() {
        let d = doc("apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n");
        assert!(is_kube_proxy_config(&d));
        let e = translate(&d).expect_err("unknown version");
        assert!(e.contains("v1alpha1"), "{e}");
        let e = translate(&doc(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnodePortAddresses: 10.0.0.0/8\n",
        ))
        .expect_err("not a list");
        assert!(e.contains("nodePortAddresses"), "{e}");
        assert!(!is_kube_proxy_config(&doc("algorithm: random\n")));
    }
}
