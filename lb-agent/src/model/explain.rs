//! `lb-agent explain`: for one Service, which endpoints each traffic class may use and why the others may not, and
//! what every frontend should hold as a result. The reasons come from `endpoints::explain_endpoints`, which walks
//! `CategorizeEndpoints`' own steps; the frontends come from [`translate`] itself, so explain never disagrees
//! with what the agent programs.

use serde::Serialize;

use super::endpoint_slices::SliceIndex;
use super::endpoints::{Eligibility, Uses, explain_endpoints};
use super::ip::Family;
use super::objects::{ClusterObjects, DEFAULT_NAMESPACE, object_label};
use super::{ModelConfig, NodeContext, service_ports, translate};
use crate::state::{Frontend, Scope, ServiceEntry, VipKind};

#[derive(Clone, Debug, Serialize)]
pub struct ServiceExplanation {
    /// `namespace/name`.
    pub service: String,
    pub node: String,
    pub zone: Option<String>,
    /// Why the Service is not (fully) proxied: not found, skipped, diagnostics naming it.
    pub notes: Vec<String>,
    pub ports: Vec<PortExplanation>,
}

/// One Service port in one IP family.
#[derive(Clone, Debug, Serialize)]
pub struct PortExplanation {
    /// The port's name (empty for a single unnamed port).
    pub port: String,
    pub protocol: String,
    pub family: &'static str,
    pub internal_traffic_policy: &'static str,
    pub external_traffic_policy: &'static str,
    /// The Cluster set's verdicts, when some frontend uses it.
    pub cluster: Option<Vec<EndpointExplanation>>,
    /// The Local set's verdicts, when some frontend uses it.
    pub local: Option<Vec<EndpointExplanation>>,
    pub frontends: Vec<FrontendExplanation>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointExplanation {
    /// `address:port` as a backend.
    pub backend: String,
    /// On this node.
    pub local: bool,
    pub eligibility: Eligibility,
}

#[derive(Clone, Debug, Serialize)]
pub struct FrontendExplanation {
    pub frontend: Frontend,
    pub kind: VipKind,
    /// Which set it takes: `cluster` or `local` (docs/semantics.md rule 5; see `frontends.rs`).
    pub traffic_class: &'static str,
    /// The backends the model wants programmed, `address:port`.
    pub backends: Vec<String>,
    /// With no backend: `reject` or `drop`.
    pub when_empty: &'static str,
}

fn policy(local: bool) -> &'static str {
    if local { "Local" } else { "Cluster" }
}

/// Which endpoint set a frontend takes, as `frontends::StateBuilder::add_port` assigns them: ClusterIPs the
/// internal policy's, external VIPs the external policy's from outside and the Cluster set from local clients.
fn traffic_class(
    frontend: &Frontend,
    kind: VipKind,
    internal_local: bool,
    external_local: bool,
) -> bool {
    match (kind, frontend.scope) {
        (VipKind::ClusterIp, _) => internal_local,
        (_, Scope::External) => external_local,
        (_, Scope::Internal) => false,
    }
}

/// Explains Service `namespace/name` on `node`; `None` when no such Service is in `objects`.
pub fn explain(
    objects: &ClusterObjects,
    node: &NodeContext,
    cfg: &ModelConfig,
    namespace: &str,
    name: &str,
) -> Option<ServiceExplanation> {
    // The last definition wins, as in `translate`.
    let svc = objects.services.iter().rev().find(|s| {
        s.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE) == namespace
            && s.metadata.name.as_deref() == Some(name)
    })?;
    let label = object_label("Service", Some(namespace), Some(name));
    let translation = translate(objects, node, cfg);
    let mut notes: Vec<String> = translation
        .diagnostics
        .iter()
        .filter(|d| d.object == label)
        .map(|d| match &d.field {
            Some(f) => format!("{f}: {}", d.message),
            None => d.message.clone(),
        })
        .collect();
    let mut out = ServiceExplanation {
        service: format!("{namespace}/{name}"),
        node: node.name.clone(),
        zone: node.zone.clone(),
        notes: Vec::new(),
        ports: Vec::new(),
    };
    let mut ignored = Vec::new();
    let Some(info) = service_ports::service_info(svc, cfg, &mut ignored) else {
        if notes.is_empty() {
            notes.push(
                "not proxied: headless, ExternalName, or labelled for another service proxy (docs/semantics.md rule 1)"
                    .to_owned(),
            );
        }
        out.notes = notes;
        return Some(out);
    };
    let slices = SliceIndex::build(&objects.endpoint_slices, &node.name, &mut ignored);
    let zone = node.zone.as_deref().unwrap_or_default();
    let entries: Vec<(&Frontend, &ServiceEntry)> = translation
        .state
        .services
        .iter()
        .filter(|(_, e)| e.service.namespace == namespace && e.service.name == name)
        .collect();
    for family in Family::BOTH {
        if info.cluster_ip(family).is_none() {
            continue;
        }
        for port in &info.ports {
            let endpoints = slices.endpoints(
                &info.namespace,
                &info.name,
                family,
                &port.name,
                port.protocol,
            );
            let frontends: Vec<FrontendExplanation> = entries
                .iter()
                .filter(|(f, e)| {
                    e.service.port == port.name
                        && f.proto == port.protocol
                        && Family::of(&f.addr) == family
                })
                .map(|(f, e)| FrontendExplanation {
                    frontend: **f,
                    kind: e.kind,
                    traffic_class: if traffic_class(
                        f,
                        e.kind,
                        info.internal_policy_local,
                        info.external_policy_local,
                    ) {
                        "local"
                    } else {
                        "cluster"
                    },
                    backends: e.backends.iter().map(ToString::to_string).collect(),
                    when_empty: if e.drop_if_empty { "drop" } else { "reject" },
                })
                .collect();
            let uses = Uses {
                cluster: frontends.iter().any(|f| f.traffic_class == "cluster"),
                local: frontends.iter().any(|f| f.traffic_class == "local"),
            };
            let (cluster, local) = explain_endpoints(&endpoints, uses, &node.name, zone);
            let verdicts = |why: Option<Vec<Eligibility>>| {
                why.map(|v| {
                    v.into_iter()
                        .zip(&endpoints)
                        .map(|(eligibility, ep)| EndpointExplanation {
                            backend: match ep.addr {
                                std::net::IpAddr::V4(a) => format!("{a}:{}", ep.port),
                                std::net::IpAddr::V6(a) => format!("[{a}]:{}", ep.port),
                            },
                            local: ep.is_local,
                            eligibility,
                        })
                        .collect()
                })
            };
            out.ports.push(PortExplanation {
                port: port.name.clone(),
                protocol: port.protocol.to_string(),
                family: family.address_type(),
                internal_traffic_policy: policy(info.internal_policy_local),
                external_traffic_policy: policy(info.external_policy_local),
                cluster: verdicts(cluster),
                local: verdicts(local),
                frontends,
            });
        }
    }
    if endpoints_missing(&out) {
        notes.push("no EndpointSlice endpoints match this Service's ports".to_owned());
    }
    out.notes = notes;
    Some(out)
}

fn endpoints_missing(e: &ServiceExplanation) -> bool {
    e.ports.iter().all(|p| {
        p.cluster.as_ref().is_none_or(Vec::is_empty) && p.local.as_ref().is_none_or(Vec::is_empty)
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const YAML: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  trafficDistribution: PreferClose
  ports: [{name: http, port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.1.1], nodeName: worker-1, hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.0.2.1], nodeName: worker-2, hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.0.1.3], nodeName: worker-1, conditions: {ready: false}}
- {addresses: [10.0.1.4], nodeName: worker-1, conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-a}]}}
";

    #[test]
    fn explains_each_endpoint_per_traffic_class() {
        let e = explain(
            &parse(YAML),
            &worker(),
            &ModelConfig::default(),
            "ns",
            "web",
        )
        .expect("service exists");
        assert_eq!(e.notes, Vec::<String>::new());
        assert_eq!(e.ports.len(), 1);
        let p = &e.ports[0];
        let verdicts = |v: &Option<Vec<EndpointExplanation>>| -> Vec<(String, Eligibility)> {
            v.iter()
                .flatten()
                .map(|x| (x.backend.clone(), x.eligibility))
                .collect()
        };
        assert_eq!(
            verdicts(&p.cluster),
            vec![
                ("10.0.1.1:8080".into(), Eligibility::Ready),
                ("10.0.1.3:8080".into(), Eligibility::NotReady),
                ("10.0.1.4:8080".into(), Eligibility::Terminating),
                ("10.0.2.1:8080".into(), Eligibility::OtherZone),
            ]
        );
        assert_eq!(
            verdicts(&p.local),
            vec![
                ("10.0.1.1:8080".into(), Eligibility::Ready),
                ("10.0.1.3:8080".into(), Eligibility::NotReady),
                ("10.0.1.4:8080".into(), Eligibility::Terminating),
                ("10.0.2.1:8080".into(), Eligibility::OtherNode),
            ]
        );
        // NodePort from outside takes the Local set; the ClusterIP and local clients of the NodePort the Cluster set.
        let classes: Vec<(String, Scope, &str)> = p
            .frontends
            .iter()
            .map(|f| (f.frontend.to_string(), f.frontend.scope, f.traffic_class))
            .collect();
        assert!(classes.contains(&("192.168.0.10:30080/TCP".into(), Scope::External, "local")));
        assert!(classes.contains(&("192.168.0.10:30080/TCP".into(), Scope::Internal, "cluster")));
        assert!(classes.contains(&("10.96.0.10:80/TCP".into(), Scope::Internal, "cluster")));
        for f in &p.frontends {
            assert_eq!(
                f.backends,
                vec!["10.0.1.1:8080".to_string()],
                "{}",
                f.frontend
            );
        }
    }

    #[test]
    fn unknown_and_unproxied_services_say_so() {
        let cfg = ModelConfig::default();
        assert!(explain(&parse(YAML), &worker(), &cfg, "ns", "nope").is_none());
        let headless = "
apiVersion: v1
kind: Service
metadata: {name: db, namespace: ns}
spec: {clusterIP: None, ports: [{port: 5432}]}
";
        let e = explain(&parse(headless), &worker(), &cfg, "ns", "db").expect("exists");
        assert!(e.ports.is_empty());
        assert!(e.notes[0].contains("not proxied"), "{:?}", e.notes);
    }
}
