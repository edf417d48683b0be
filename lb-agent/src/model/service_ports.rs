//! A Service to the ports and VIPs lb proxies for it.
//!
//! Mirrors kube-proxy's `ServiceChangeTracker.serviceToServiceMap`, `proxyutil.ShouldSkipService` and
//! `newBaseServiceInfo` (pkg/proxy/serviceport.go), and the informer label selector in cmd/kube-proxy (no
//! `service-proxy-name`, no `headless` label). kube-proxy trusts the API server to have validated every Service; lb
//! also reads hand-written manifests, so a Service the API server would have rejected (bad IP, port out of range,
//! unknown protocol, bad affinity timeout, ...) is skipped whole with a [`Diagnostic`] naming the field, and every
//! other Service keeps working. Fields the API server accepts but kube-proxy ignores are ignored the same way.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ModelConfig;
use super::ip::{Family, parse_cidr_sloppy, parse_ip_sloppy};
use super::objects::{
    ANNOTATION_ALGORITHM, DEFAULT_NAMESPACE, Diagnostic, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME,
    Service, ServicePort as K8sServicePort, ServiceSpec, object_label,
};
use crate::state::{Algorithm, Protocol, ServicePortName};
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default and maximum (API defaulting and validation).
const DEFAULT_AFFINITY_TIMEOUT: i32 = 10800;
const MAX_AFFINITY_TIMEOUT: i32 = 86400;

/// One Service port as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortInfo {
    /// The port's `name`; empty for a single unnamed port. Endpoints match on it (and the protocol).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// `None` when the Service has no NodePort for this port.
    pub node_port: Option<u16>,
}

/// The validated, proxied view of one Service (kube-proxy's `BaseServicePortInfo`, once for all ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// At most one per family, in `clusterIPs` order.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<PortInfo>,
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs in VIP mode (`ipMode: Proxy` ones are left to the load balancer).
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// `internalTrafficPolicy: Local` (apiservice.InternalPolicyLocal).
    pub internal_policy_local: bool,
    /// `externalTrafficPolicy: Local` on an externally accessible Service (apiservice.ExternalPolicyLocal).
    pub external_policy_local: bool,
    pub affinity_timeout: Option<u32>,
    pub algorithm: Algorithm,
}

impl ServiceInfo {
    /// kube-proxy's `proxyutil.GetClusterIPByFamily`: without a ClusterIP of a family, the Service does not exist
    /// for that family's proxier (its externalIPs and NodePorts of that family included).
    pub(crate) fn cluster_ip(&self, family: Family) -> Option<IpAddr> {
        self.cluster_ips
            .iter()
            .copied()
            .find(|ip| Family::of(ip) == family)
    }

    pub(crate) fn port_name(&self, port: &PortInfo) -> ServicePortName {
        ServicePortName {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            port: port.name.clone(),
        }
    }

    pub(crate) fn label(&self) -> String {
        object_label("Service", Some(&self.namespace), Some(&self.name))
    }
}

/// Collects a Service's problems: errors make it skipped, warnings only explain a part left out.
struct Check<'a> {
    object: String,
    errors: usize,
    diagnostics: &'a mut Vec<Diagnostic>,
}

impl Check<'_> {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors += 1;
        self.warn(field, message);
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic::new(
            self.object.clone(),
            Some(field.into()),
            message,
        ));
    }
}

/// Go reads an empty string field as unset; so do the API server's defaults.
fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// Validates a Service and returns what lb proxies for it, or `None` when it is not proxied (rule 1) or is invalid
/// (then with diagnostics pushed).
pub(crate) fn service_info(
    svc: &Service,
    cfg: &ModelConfig,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<ServiceInfo> {
    let meta = &svc.metadata;
    let namespace = meta.namespace().unwrap_or(DEFAULT_NAMESPACE).to_owned();
    let name = non_empty(&meta.name).unwrap_or_default().to_owned();
    let mut check = Check {
        object: object_label("Service", Some(&namespace), Some(&name)),
        errors: 0,
        diagnostics,
    };
    if name.is_empty() {
        check.error("metadata.name", "a Service needs a name; skipped");
        return None;
    }

    // Rule 1, first half: kube-proxy's informers never see these (cmd/kube-proxy label selector).
    let labels = meta.labels.as_ref();
    let proxy_name = labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME));
    if proxy_name != cfg.service_proxy_name.as_ref() {
        tracing::debug!(service = %check.object, ?proxy_name, "not proxied: service-proxy-name label is for another proxy");
        return None;
    }
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        tracing::debug!(service = %check.object, "not proxied: headless label");
        return None;
    }

    let Some(spec) = svc.spec.as_ref() else {
        check.error("spec", "a Service needs a spec; skipped");
        return None;
    };
    let service_type = non_empty(&spec.type_).unwrap_or("ClusterIP");
    match service_type {
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        // Rule 1, second half: kube-proxy's ShouldSkipService.
        "ExternalName" => {
            tracing::debug!(service = %check.object, "not proxied: ExternalName");
            return None;
        }
        other => {
            check.error(
                "spec.type",
                format!("unknown Service type {other:?}; skipped"),
            );
            return None;
        }
    }

    let cluster_ips = match cluster_ips(spec, &mut check) {
        ClusterIps::Headless => {
            tracing::debug!(service = %check.object, "not proxied: headless (clusterIP None)");
            return None;
        }
        ClusterIps::Invalid => return None,
        ClusterIps::Ips(ips) => ips,
    };

    let allocates_node_ports = match service_type {
        "NodePort" => true,
        "LoadBalancer" => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    };
    let ports = ports(
        spec.ports.as_deref().unwrap_or_default(),
        service_type,
        allocates_node_ports,
        &mut check,
    );

    let mut external_ips = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        match parse_ip_sloppy(ip) {
            Some(ip) => external_ips.push(ip),
            None => check.error(
                format!("spec.externalIPs[{i}]"),
                format!("{ip:?} is not an IP address; skipped"),
            ),
        }
    }

    let mut source_ranges = Vec::new();
    for (i, cidr) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match parse_cidr_sloppy(cidr) {
            Some(range) => source_ranges.push(range),
            None => check.error(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{cidr:?} is not a CIDR; skipped"),
            ),
        }
    }

    let internal_policy_local = traffic_policy(
        &spec.internal_traffic_policy,
        "spec.internalTrafficPolicy",
        &mut check,
    );
    let external_policy_local = traffic_policy(
        &spec.external_traffic_policy,
        "spec.externalTrafficPolicy",
        &mut check,
    );
    // apiservice.ExternallyAccessible: the external policy only means something where external traffic exists.
    let externally_accessible = matches!(service_type, "NodePort" | "LoadBalancer")
        || (service_type == "ClusterIP" && !external_ips.is_empty());

    let affinity_timeout = session_affinity(spec, &mut check);
    let algorithm = algorithm(
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_ALGORITHM)),
        cfg,
        &mut check,
    );
    let load_balancer_ips = load_balancer_ips(svc, &mut check);

    if check.errors > 0 {
        return None;
    }
    Some(ServiceInfo {
        namespace,
        name,
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        source_ranges,
        internal_policy_local,
        external_policy_local: externally_accessible && external_policy_local,
        affinity_timeout,
        algorithm,
    })
}

enum ClusterIps {
    Headless,
    Invalid,
    Ips(Vec<IpAddr>),
}

/// `spec.clusterIP` / `spec.clusterIPs` as the API server stores them (clusterIPs[0] == clusterIP, at most one per
/// family). A manifest may give either field; the API server would fill in the other.
fn cluster_ips(spec: &ServiceSpec, check: &mut Check<'_>) -> ClusterIps {
    let single = non_empty(&spec.cluster_ip);
    let list: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    // helper.IsServiceIPSet: "None" means headless.
    if single == Some("None") || list.first() == Some(&"None") {
        return ClusterIps::Headless;
    }
    let (field, raw): (&str, Vec<&str>) = if list.is_empty() {
        ("spec.clusterIP", single.into_iter().collect())
    } else {
        ("spec.clusterIPs", list)
    };
    if raw.is_empty() {
        check.error(
            "spec.clusterIP",
            "not set: lb does not allocate ClusterIPs, a manifest must give the one the API server assigned; skipped",
        );
        return ClusterIps::Invalid;
    }
    if let (Some(single), Some(first)) = (single, raw.first())
        && single != *first
    {
        check.error(
            "spec.clusterIPs[0]",
            format!("{first:?} must equal spec.clusterIP {single:?}; skipped"),
        );
        return ClusterIps::Invalid;
    }
    if raw.len() > 2 {
        check.error(
            field,
            "at most two ClusterIPs (one per family) are allowed; skipped",
        );
        return ClusterIps::Invalid;
    }
    let mut ips = Vec::new();
    for (i, s) in raw.iter().enumerate() {
        let at = if field == "spec.clusterIP" {
            field.to_owned()
        } else {
            format!("{field}[{i}]")
        };
        match parse_ip_sloppy(s) {
            Some(ip) if ips.iter().any(|other| Family::of(other) == Family::of(&ip)) => {
                check.error(at, "two ClusterIPs of the same family; skipped");
                return ClusterIps::Invalid;
            }
            Some(ip) => ips.push(ip),
            None => {
                check.error(at, format!("{s:?} is not an IP address; skipped"));
                return ClusterIps::Invalid;
            }
        }
    }
    ClusterIps::Ips(ips)
}

/// The Service ports, checked as the API server's `ValidateService` would. Problems are errors (the Service is
/// skipped) except a NodePort a manifest left for the API server to allocate, which is only left out.
fn ports(
    ports: &[K8sServicePort],
    service_type: &str,
    allocates_node_ports: bool,
    check: &mut Check<'_>,
) -> Vec<PortInfo> {
    if ports.is_empty() {
        check.error(
            "spec.ports",
            "a Service with a ClusterIP needs at least one port; skipped",
        );
    }
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    let mut port_protos = BTreeSet::new();
    let mut node_port_protos = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let at = |field: &str| format!("spec.ports[{i}].{field}");
        let name = p.name.clone().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            check.error(
                at("name"),
                "every port of a multi-port Service needs a name; skipped",
            );
        } else if !name.is_empty() && !is_dns1123_label(&name) {
            check.error(
                at("name"),
                format!("{name:?} is not a DNS-1123 label; skipped"),
            );
        } else if !names.insert(name.clone()) {
            check.error(at("name"), format!("duplicate port name {name:?}; skipped"));
        }

        let Some(protocol) = Protocol::from_k8s(non_empty(&p.protocol)) else {
            check.error(
                at("protocol"),
                format!(
                    "unknown protocol {:?} (TCP, UDP or SCTP); skipped",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            );
            continue;
        };
        let Some(port) = valid_port(p.port) else {
            check.error(
                at("port"),
                format!("{} is not a port number (1-65535); skipped", p.port),
            );
            continue;
        };
        if !port_protos.insert((port, protocol)) {
            check.error(
                at("port"),
                format!("duplicate port {port}/{protocol}; skipped"),
            );
        }

        // kube-proxy never reads targetPort (the EndpointSlice carries the resolved port), but the API server
        // rejects a bad one, so a Service carrying one would not exist.
        match &p.target_port {
            None => {}
            Some(IntOrString::Int(n)) if valid_port(*n).is_some() => {}
            Some(IntOrString::Int(n)) => check.error(
                at("targetPort"),
                format!("{n} is not a port number (1-65535); skipped"),
            ),
            Some(IntOrString::String(s)) if is_iana_svc_name(s) => {}
            Some(IntOrString::String(s)) => {
                check.error(
                    at("targetPort"),
                    format!("{s:?} is neither a port number nor a port name; skipped"),
                );
            }
        }

        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => match valid_port(n) {
                None => {
                    check.error(
                        at("nodePort"),
                        format!("{n} is not a port number (1-65535); skipped"),
                    );
                    None
                }
                Some(_) if service_type == "ClusterIP" => {
                    check.error(
                        at("nodePort"),
                        "a ClusterIP Service may not have a nodePort; skipped",
                    );
                    None
                }
                Some(np) => {
                    if !node_port_protos.insert((np, protocol)) {
                        check.error(
                            at("nodePort"),
                            format!("duplicate nodePort {np}/{protocol}; skipped"),
                        );
                    }
                    Some(np)
                }
            },
        };
        if node_port.is_none() && allocates_node_ports && p.node_port.is_none() {
            check.warn(
                at("nodePort"),
                "not set (the API server would allocate one): no NodePort for this port",
            );
        }

        out.push(PortInfo {
            name,
            protocol,
            port,
            node_port,
        });
    }
    out
}

fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// `validation.IsDNS1123Label`: a Service port name.
fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// `validation.IsValidPortName` (IANA_SVC_NAME): a named targetPort.
fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && s.bytes().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// `Cluster` (or unset) is false, `Local` is true; anything else is rejected by the API server.
fn traffic_policy(value: &Option<String>, field: &str, check: &mut Check<'_>) -> bool {
    match non_empty(value) {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            check.error(
                field,
                format!("unknown traffic policy {other:?} (Cluster or Local); skipped"),
            );
            false
        }
    }
}

/// Rule 10: `ClientIP` affinity and its timeout, with the API server's default and bounds.
fn session_affinity(spec: &ServiceSpec, check: &mut Check<'_>) -> Option<u32> {
    match non_empty(&spec.session_affinity) {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
            if (1..=MAX_AFFINITY_TIMEOUT).contains(&timeout) {
                u32::try_from(timeout).ok()
            } else {
                check.error(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{timeout} is outside 1..={MAX_AFFINITY_TIMEOUT}; skipped"),
                );
                None
            }
        }
        Some(other) => {
            check.error(
                "spec.sessionAffinity",
                format!("unknown session affinity {other:?} (None or ClientIP); skipped"),
            );
            None
        }
    }
}

/// Rule 11: the `lb.io/algorithm` annotation; a bad value falls back to the default (the Service still works).
fn algorithm(annotation: Option<&String>, cfg: &ModelConfig, check: &mut Check<'_>) -> Algorithm {
    match annotation.map(|a| a.parse::<Algorithm>()) {
        None => cfg.default_algorithm,
        Some(Ok(algorithm)) => algorithm,
        Some(Err(message)) => {
            check.warn(
                format!("metadata.annotations[{ANNOTATION_ALGORITHM:?}]"),
                format!("{message}; using {}", cfg.default_algorithm),
            );
            cfg.default_algorithm
        }
    }
}

/// `status.loadBalancer.ingress[].ip` in VIP mode (kube-proxy's `proxyutil.IsVIPMode`: unset or `VIP`). A bad entry
/// is left out alone: the status is written by a controller, and the rest of the Service is fine.
fn load_balancer_ips(svc: &Service, check: &mut Check<'_>) -> Vec<IpAddr> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let mut ips = Vec::new();
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let Some(raw) = non_empty(&ing.ip) else {
            continue; // A hostname-only ingress has no IP to capture.
        };
        match non_empty(&ing.ip_mode) {
            None | Some("VIP") => {}
            Some("Proxy") => {
                tracing::debug!(service = %check.object, ip = raw, "LoadBalancer IP in Proxy mode: left to the load balancer");
                continue;
            }
            Some(other) => {
                check.warn(
                    format!("status.loadBalancer.ingress[{i}].ipMode"),
                    format!("unknown ipMode {other:?}; this IP is left out"),
                );
                continue;
            }
        }
        match parse_ip_sloppy(raw) {
            Some(ip) => ips.push(ip),
            None => check.warn(
                format!("status.loadBalancer.ingress[{i}].ip"),
                format!("{raw:?} is not an IP address; this IP is left out"),
            ),
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn info(yaml: &str, cfg: &ModelConfig) -> (Option<ServiceInfo>, Vec<Diagnostic>) {
        let objects = parse(yaml);
        assert_eq!(
            objects.services.len(),
            1,
            "one Service expected in the fixture"
        );
        let mut diags = Vec::new();
        let info = service_info(&objects.services[0], cfg, &mut diags);
        (info, diags)
    }

    /// The fields of each diagnostic, for comparisons that must name exactly the right field.
    fn fields(diags: &[Diagnostic]) -> Vec<String> {
        diags
            .iter()
            .map(|d| format!("{} {}", d.object, d.field.clone().unwrap_or_default()))
            .collect()
    }

    const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}]
";

    #[test]
    fn valid_service_is_read() {
        let (info, diags) = info(WEB, &ModelConfig::default());
        assert_eq!(diags, vec![]);
        let want = ServiceInfo {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ips: vec![ip("10.96.0.10")],
            ports: vec![PortInfo {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            }],
            external_ips: vec![],
            load_balancer_ips: vec![],
            source_ranges: vec![],
            internal_policy_local: false,
            external_policy_local: false,
            affinity_timeout: None,
            algorithm: Algorithm::Maglev,
        };
        assert_eq!(info, Some(want));
    }

    #[test]
    fn services_not_proxied_without_diagnostics() {
        let cases = [
            ("headless", "spec: {clusterIP: None, ports: [{port: 80}]}"),
            (
                "headless_in_cluster_ips",
                "spec: {clusterIPs: [None], ports: [{port: 80}]}",
            ),
            (
                "external_name",
                "spec: {type: ExternalName, externalName: example.com}",
            ),
        ];
        for (case, spec) in cases {
            let yaml = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\n{spec}\n");
            let (info, diags) = info(&yaml, &ModelConfig::default());
            assert_eq!(info, None, "{case}");
            assert_eq!(diags, vec![], "{case}");
        }
    }

    #[test]
    fn service_proxy_name_label_selects_the_proxy() {
        let labelled = "
apiVersion: v1
kind: Service
metadata: {name: s, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
";
        let ours = ModelConfig {
            service_proxy_name: Some("other".into()),
            ..ModelConfig::default()
        };
        // (config, labelled Service proxied?, unlabelled Service proxied?)
        for (cfg, want_labelled, want_plain) in
            [(ModelConfig::default(), false, true), (ours, true, false)]
        {
            assert_eq!(
                info(labelled, &cfg).0.is_some(),
                want_labelled,
                "{cfg:?} labelled"
            );
            assert_eq!(
                info(WEB, &cfg).0.is_some(),
                want_plain,
                "{cfg:?} unlabelled"
            );
        }
    }

    #[test]
    fn headless_label_service_is_not_proxied() {
        let yaml = "
apiVersion: v1
kind: Service
metadata: {name: s, labels: {service.kubernetes.io/headless: ''}}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
";
        assert_eq!(info(yaml, &ModelConfig::default()), (None, vec![]));
    }

    /// Each malformed field skips the Service with one diagnostic naming that field.
    #[test]
    fn malformed_fields_skip_the_service() {
        let cases: &[(&str, &str)] = &[
            (
                "spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}",
                "spec.clusterIP",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2], ports: [{port: 80}]}",
                "spec.clusterIPs[0]",
            ),
            (
                "spec: {clusterIPs: [10.96.0.1, 10.96.0.2], ports: [{port: 80}]}",
                "spec.clusterIPs[1]",
            ),
            ("spec: {ports: [{port: 80}]}", "spec.clusterIP"),
            ("spec: {clusterIP: 10.96.0.1, ports: []}", "spec.ports"),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{port: 0}]}",
                "spec.ports[0].port",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{port: 70000}]}",
                "spec.ports[0].port",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{port: 80, protocol: ICMP}]}",
                "spec.ports[0].protocol",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: 0}]}",
                "spec.ports[0].targetPort",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: '8080'}]}",
                "spec.ports[0].targetPort",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: Http_Port}]}",
                "spec.ports[0].targetPort",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{port: 80}, {name: b, port: 81}]}",
                "spec.ports[0].name",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{name: a, port: 80}, {name: a, port: 81}]}",
                "spec.ports[1].name",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{name: a, port: 80}, {name: b, port: 80}]}",
                "spec.ports[1].port",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{name: Web, port: 80}]}",
                "spec.ports[0].name",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30080}]}",
                "spec.ports[0].nodePort",
            ),
            (
                "spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 70000}]}",
                "spec.ports[0].nodePort",
            ),
            (
                "spec: {type: Other, clusterIP: 10.96.0.1, ports: [{port: 80}]}",
                "spec.type",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, externalIPs: [1.2.3], ports: [{port: 80}]}",
                "spec.externalIPs[0]",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, internalTrafficPolicy: Node, ports: [{port: 80}]}",
                "spec.internalTrafficPolicy",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, sessionAffinity: Cookie, ports: [{port: 80}]}",
                "spec.sessionAffinity",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}, ports: [{port: 80}]}",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ),
            (
                "spec: {type: LoadBalancer, clusterIP: 10.96.0.1, loadBalancerSourceRanges: [10.0.0.0/40], ports: [{port: 80, nodePort: 30080}]}",
                "spec.loadBalancerSourceRanges[0]",
            ),
        ];
        for (spec, field) in cases {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\n{spec}\n"
            );
            let (info, diags) = info(&yaml, &ModelConfig::default());
            assert_eq!(info, None, "{spec}");
            assert_eq!(
                fields(&diags),
                vec![format!("Service ns/s {field}")],
                "{spec}: {diags:?}"
            );
        }
    }

    #[test]
    fn unnamed_service_is_skipped() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {namespace: ns}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let (info, diags) = info(yaml, &ModelConfig::default());
        assert_eq!(info, None);
        assert_eq!(fields(&diags), vec!["Service ns/(unnamed) metadata.name"]);
    }

    #[test]
    fn client_ip_affinity_defaults_to_10800_seconds() {
        let cases = [
            ("sessionAffinity: ClientIP", Some(10800)),
            (
                "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
                Some(60),
            ),
            (
                "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}",
                Some(86400),
            ),
            ("sessionAffinity: None", None),
            ("sessionAffinity: ''", None),
        ];
        for (affinity, want) in cases {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{{port: 80}}]\n  {affinity}\n"
            );
            let (info, diags) = info(&yaml, &ModelConfig::default());
            assert_eq!(diags, vec![], "{affinity}");
            assert_eq!(info.map(|i| i.affinity_timeout), Some(want), "{affinity}");
        }
    }

    #[test]
    fn algorithm_annotation_overrides_default() {
        let with = |value: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, annotations: {{lb.io/algorithm: {value}}}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
            )
        };
        let random_default = ModelConfig {
            default_algorithm: Algorithm::Random,
            ..ModelConfig::default()
        };
        let (got, diags) = info(&with("random"), &ModelConfig::default());
        assert_eq!(
            (got.map(|i| i.algorithm), diags),
            (Some(Algorithm::Random), vec![])
        );
        let (got, diags) = info(&with("maglev"), &random_default);
        assert_eq!(
            (got.map(|i| i.algorithm), diags),
            (Some(Algorithm::Maglev), vec![])
        );
        let (got, diags) = info(WEB, &random_default);
        assert_eq!(
            (got.map(|i| i.algorithm), diags),
            (Some(Algorithm::Random), vec![])
        );
    }

    #[test]
    fn bad_algorithm_annotation_uses_default_with_diagnostic() {
        let yaml = "
apiVersion: v1
kind: Service
metadata: {name: s, annotations: {lb.io/algorithm: round-robin}}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
";
        let (got, diags) = info(
            yaml,
            &ModelConfig {
                default_algorithm: Algorithm::Random,
                ..ModelConfig::default()
            },
        );
        assert_eq!(got.map(|i| i.algorithm), Some(Algorithm::Random));
        assert_eq!(
            fields(&diags),
            vec!["Service default/s metadata.annotations[\"lb.io/algorithm\"]"]
        );
    }

    #[test]
    fn node_port_left_for_allocation_is_only_a_warning() {
        let yaml = "
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80}]}
";
        let (got, diags) = info(yaml, &ModelConfig::default());
        assert_eq!(got.map(|i| i.ports[0].node_port), Some(None));
        assert_eq!(
            fields(&diags),
            vec!["Service default/s spec.ports[0].nodePort"]
        );
    }

    #[test]
    fn external_traffic_policy_counts_only_when_externally_accessible() {
        // apiservice.ExternalPolicyLocal: a plain ClusterIP Service has no external traffic to apply it to.
        let cases = [
            ("clusterIP: 10.96.0.1\n  ports: [{port: 80}]", false),
            (
                "clusterIP: 10.96.0.1\n  externalIPs: [203.0.113.1]\n  ports: [{port: 80}]",
                true,
            ),
            (
                "type: NodePort\n  clusterIP: 10.96.0.1\n  ports: [{port: 80, nodePort: 30080}]",
                true,
            ),
        ];
        for (spec, want) in cases {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  externalTrafficPolicy: Local\n  {spec}\n"
            );
            let (got, diags) = info(&yaml, &ModelConfig::default());
            assert_eq!(diags, vec![], "{spec}");
            assert_eq!(got.map(|i| i.external_policy_local), Some(want), "{spec}");
        }
    }

    #[test]
    fn load_balancer_ips_keep_only_vip_mode() {
        let yaml = "
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {type: LoadBalancer, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30080}]}
status:
  loadBalancer:
    ingress:
    - ip: 203.0.113.1
    - {ip: 203.0.113.2, ipMode: VIP}
    - {ip: 203.0.113.3, ipMode: Proxy}
    - hostname: lb.example.com
    - ip: not-an-ip
";
        let (got, diags) = info(yaml, &ModelConfig::default());
        assert_eq!(
            got.map(|i| i.load_balancer_ips),
            Some(vec![ip("203.0.113.1"), ip("203.0.113.2")])
        );
        assert_eq!(
            fields(&diags),
            vec!["Service default/s status.loadBalancer.ingress[4].ip"]
        );
    }
}
