//! The EndpointSlice controller (`pkg/controller/endpointslice`), reduced to what a proxy can observe: for every
//! Service with a selector, the matching Pods of its namespace become endpoints, grouped into one slice per address
//! type and per resolved port list (`podToEndpoint`, `getEndpointPorts`, `setEndpointSliceLabels`):
//! - conditions: `serving` = the Pod is Ready, `terminating` = it has a deletionTimestamp, `ready` = serving and not
//!   terminating, or `publishNotReadyAddresses`; Pods without an IP or in a terminal phase are left out;
//! - `nodeName`, `zone` (the Node's `topology.kubernetes.io/zone`), `targetRef`;
//! - ports: a numeric targetPort as is, a named one resolved per Pod against its container ports (name and
//!   protocol); a Pod that lacks it simply has no such port, and lands in a slice of its own port list;
//! - labels: the Service's own (but the reserved ones), `kubernetes.io/service-name`, `endpointslice.kubernetes.io/
//!   managed-by`, and `service.kubernetes.io/headless` for a headless Service;
//! - the annotation `endpoints.kubernetes.io/last-change-trigger-time` with the time of the change that caused the
//!   update (RFC 3339 with nanoseconds, as upstream writes it);
//! - hints: `trafficDistribution: PreferClose` / `PreferSameZone` give every endpoint its own zone, `PreferSameNode`
//!   its node and zone; the `service.kubernetes.io/topology-mode: Auto` annotation gives own-zone hints when every
//!   zone holding a Node has an endpoint (the upstream heuristic allocates by CPU; with one endpoint per zone and equal
//!   nodes, as the e2e test sets up, it comes to the same);
//! - a Service without endpoints of an address type gets one empty placeholder slice with no ports.
//!
//! Slices keep their names across updates (one per address type and port list), so a change is an update, not a
//! delete and create, as the real controller mostly manages.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONTROLLER_NAME: &str = "endpointslice-controller.k8s.io";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Whether this controller manages `slice` (it leaves everybody else's alone).
pub fn is_managed(slice: &EndpointSlice) -> bool {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MANAGED_BY))
        .map(String::as_str)
        == Some(CONTROLLER_NAME)
}

/// The slice's Service (its `kubernetes.io/service-name` label).
pub fn service_of(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(LABEL_SERVICE_NAME)
        .map(String::as_str)
}

/// The slices the controller wants for `svc` (none for a Service without a selector or of type ExternalName),
/// without the trigger-time annotation, which the caller adds to the ones that change.
pub fn desired_slices(svc: &Service, pods: &[Pod], nodes: &[Node]) -> Vec<EndpointSlice> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let zones: BTreeMap<&str, &str> = nodes
        .iter()
        .filter_map(|n| {
            let zone = n.metadata.labels.as_ref()?.get(LABEL_ZONE)?;
            Some((n.metadata.name.as_deref()?, zone.as_str()))
        })
        .collect();
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let families: Vec<String> = spec
        .ip_families
        .clone()
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| vec!["IPv4".into()]);
    let mut out = Vec::new();
    for family in &families {
        // (port list) -> endpoints, in pod-name order.
        let mut groups: BTreeMap<Vec<PortKey>, Vec<Endpoint>> = BTreeMap::new();
        let mut matching: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(namespace.as_str()))
            .filter(|p| selects(selector, p))
            .collect();
        matching.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        for pod in matching {
            let Some(address) = pod_ip(pod, family) else {
                continue;
            };
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue;
            }
            let ports = endpoint_ports(svc, pod);
            groups.entry(ports).or_default().push(pod_endpoint(
                pod,
                address,
                publish_not_ready,
                &zones,
            ));
        }
        if groups.is_empty() {
            out.push(slice(
                svc,
                &name,
                &namespace,
                family,
                Vec::new(),
                Vec::new(),
            ));
            continue;
        }
        for (ports, endpoints) in groups {
            out.push(slice(svc, &name, &namespace, family, ports, endpoints));
        }
    }
    add_hints(svc, nodes, &zones, &mut out);
    out
}

/// (name, port, protocol) of one resolved endpoint port; ordered like the Service's ports.
type PortKey = (usize, String, i32, String);

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_ip(pod: &Pod, family: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    let want_v4 = family == "IPv4";
    status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.clone())
        .chain(status.pod_ip.clone())
        .find(|ip| {
            ip.parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_ipv4() == want_v4)
        })
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// `getEndpointPorts`: each Service port resolved against this Pod (`podutil.FindPort`).
fn endpoint_ports(svc: &Service, pod: &Pod) -> Vec<PortKey> {
    let mut out = Vec::new();
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    for (i, p) in ports.iter().enumerate() {
        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        let target = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
        let resolved = match target {
            IntOrString::Int(n) => Some(n),
            IntOrString::String(name) => pod
                .spec
                .as_ref()
                .into_iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol.as_deref().unwrap_or("TCP") == proto
                })
                .map(|cp| cp.container_port),
        };
        if let Some(port) = resolved {
            out.push((i, p.name.clone().unwrap_or_default(), port, proto));
        }
    }
    out
}

fn pod_endpoint(
    pod: &Pod,
    address: String,
    publish_not_ready: bool,
    zones: &BTreeMap<&str, &str>,
) -> Endpoint {
    let serving = pod_ready(pod);
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let ready = publish_not_ready || (serving && !terminating);
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let zone = node
        .as_deref()
        .and_then(|n| zones.get(n))
        .map(|z| z.to_string());
    Endpoint {
        addresses: vec![address],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        node_name: node,
        zone,
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(
    svc: &Service,
    name: &str,
    namespace: &str,
    family: &str,
    ports: Vec<PortKey>,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let mut labels: BTreeMap<String, String> = svc
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != LABEL_SERVICE_NAME && k != LABEL_MANAGED_BY)
        .collect();
    if svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None") {
        labels.insert(LABEL_HEADLESS.into(), String::new());
    } else {
        labels.remove(LABEL_HEADLESS);
    }
    labels.insert(LABEL_SERVICE_NAME.into(), name.into());
    labels.insert(LABEL_MANAGED_BY.into(), CONTROLLER_NAME.into());
    let signature = ports
        .iter()
        .map(|(_, n, p, proto)| format!("{n}/{p}/{proto}"))
        .collect::<Vec<_>>()
        .join(",");
    let slice_name = format!(
        "{name}-{}{}",
        if family == "IPv4" { "v4" } else { "v6" },
        short_hash(&signature)
    );
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            owner_references: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "v1".into(),
                    kind: "Service".into(),
                    name: name.into(),
                    uid: svc.metadata.uid.clone().unwrap_or_default(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                },
            ]),
            ..Default::default()
        },
        address_type: family.into(),
        endpoints: Some(endpoints),
        ports: Some(
            ports
                .into_iter()
                .map(|(_, n, port, proto)| EndpointPort {
                    name: Some(n),
                    port: Some(port),
                    protocol: Some(proto),
                    app_protocol: None,
                })
                .collect(),
        ),
    }
}

/// Five base-36 characters of an FNV-1a hash: a stable slice-name suffix per port list.
fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..5)
        .map(|i| DIGITS[((h >> (i * 7)) % 36) as usize] as char)
        .collect::<String>()
}

fn add_hints(
    svc: &Service,
    nodes: &[Node],
    zones: &BTreeMap<&str, &str>,
    slices: &mut [EndpointSlice],
) {
    let distribution = svc
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.clone())
        .unwrap_or_default();
    let auto = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_TOPOLOGY_MODE))
        .is_some_and(|m| m.eq_ignore_ascii_case("auto"));
    let per_node = distribution == "PreferSameNode";
    let per_zone = per_node || matches!(distribution.as_str(), "PreferClose" | "PreferSameZone");
    if !per_zone && !auto {
        return;
    }
    let endpoints = || slices.iter().flat_map(|s| s.endpoints.iter().flatten());
    if auto && !per_zone {
        // The topology-aware-hints heuristic gives no hints unless every zone with a Node has an endpoint.
        let with_endpoints: BTreeSet<&str> =
            endpoints().filter_map(|e| e.zone.as_deref()).collect();
        let all: BTreeSet<&str> = nodes
            .iter()
            .filter_map(|n| {
                zones
                    .get(n.metadata.name.as_deref().unwrap_or_default())
                    .copied()
            })
            .collect();
        if all.is_empty()
            || !all.is_subset(&with_endpoints)
            || endpoints().any(|e| e.zone.is_none())
        {
            return;
        }
    }
    for s in slices.iter_mut() {
        for e in s.endpoints.iter_mut().flatten() {
            let Some(zone) = e.zone.clone() else { continue };
            e.hints = Some(EndpointHints {
                for_zones: Some(vec![ForZone { name: zone }]),
                for_nodes: if per_node {
                    e.node_name.clone().map(|n| vec![ForNode { name: n }])
                } else {
                    None
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1", "labels": {"team": "a"}}, "spec": spec}))
        .expect("service")
    }

    fn pod(name: &str, ip: &str, ready: bool, terminating: bool, ports: serde_json::Value) -> Pod {
        let mut meta = json!({"name": name, "namespace": "ns", "labels": {"app": "web"}});
        if terminating {
            meta["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": "node-0", "containers": [{"name": "c", "ports": ports}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}))
        .expect("pod")
    }

    fn node() -> Node {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-0", "labels": {LABEL_ZONE: "zone-a"}}}))
        .expect("node")
    }

    #[test]
    fn named_ports_split_pods_into_slices_and_conditions_follow_the_pod() {
        let s = svc(
            json!({"selector": {"app": "web"}, "clusterIP": "10.96.0.10", "ipFamilies": ["IPv4"],
            "ports": [{"name": "p1", "port": 80, "targetPort": "svc1", "protocol": "TCP"},
                      {"name": "p2", "port": 81, "targetPort": "svc2", "protocol": "TCP"}]}),
        );
        let pods = [
            pod(
                "pod1",
                "10.244.0.5",
                true,
                false,
                json!([{"name": "svc1", "containerPort": 100}]),
            ),
            pod(
                "pod2",
                "10.244.0.6",
                true,
                true,
                json!([{"name": "svc2", "containerPort": 101}]),
            ),
        ];
        let slices = desired_slices(&s, &pods, &[node()]);
        assert_eq!(slices.len(), 2);
        let by_port: BTreeMap<i32, &Endpoint> = slices
            .iter()
            .map(|sl| {
                (
                    sl.ports.as_ref().expect("ports")[0].port.expect("port"),
                    &sl.endpoints.as_ref().expect("endpoints")[0],
                )
            })
            .collect();
        let c1 = by_port[&100].conditions.clone().expect("conditions");
        assert_eq!(
            (c1.ready, c1.serving, c1.terminating),
            (Some(true), Some(true), Some(false))
        );
        let c2 = by_port[&101].conditions.clone().expect("conditions");
        assert_eq!(
            (c2.ready, c2.serving, c2.terminating),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(by_port[&100].zone.as_deref(), Some("zone-a"));
        let labels = slices[0].metadata.labels.clone().expect("labels");
        assert_eq!(labels.get("team").map(String::as_str), Some("a"));
        assert_eq!(
            labels.get(LABEL_SERVICE_NAME).map(String::as_str),
            Some("web")
        );
    }

    #[test]
    fn no_pods_give_one_empty_placeholder_and_no_selector_gives_nothing() {
        let s = svc(json!({"selector": {"app": "web"}, "ports": [{"port": 80}]}));
        let slices = desired_slices(&s, &[], &[]);
        assert_eq!(slices.len(), 1);
        assert!(slices[0].endpoints.as_ref().is_none_or(Vec::is_empty));
        assert_eq!(slices[0].ports.as_ref().map(Vec::len), Some(0));
        let s = svc(json!({"ports": [{"port": 80}]}));
        assert!(desired_slices(&s, &[], &[]).is_empty());
    }

    #[test]
    fn publish_not_ready_addresses_marks_unready_pods_ready_and_prefer_close_hints_own_zone() {
        let s = svc(
            json!({"selector": {"app": "web"}, "publishNotReadyAddresses": true,
            "trafficDistribution": "PreferClose", "ports": [{"port": 80, "targetPort": 80}]}),
        );
        let slices = desired_slices(
            &s,
            &[pod("p", "10.244.0.5", false, false, json!([]))],
            &[node()],
        );
        let ep = &slices[0].endpoints.as_ref().expect("endpoints")[0];
        assert_eq!(ep.conditions.as_ref().and_then(|c| c.ready), Some(true));
        let hint = ep
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.clone())
            .expect("hints");
        assert_eq!(hint[0].name, "zone-a");
    }
}
