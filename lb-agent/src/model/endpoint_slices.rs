//! A Service's EndpointSlices to one endpoint list per service port (docs/semantics.md rules 3, 4, 13).
//!
//! Mirrors kube-proxy's `EndpointSliceCache` (pkg/proxy/endpointslicecache.go): `endpointSliceCacheKeys` (slices
//! join their Service through the `kubernetes.io/service-name` label, in the same namespace),
//! `endpointInfoByServicePort` (a slice port joins the service port with the same name and protocol; its number is
//! the backend port, so `targetPort` names resolve per slice) and `addEndpoints` (only `addresses[0]` counts, an
//! address seen twice counts once, preferring the non-terminating copy). The per-family split is kube-proxy's
//! one-proxier-per-family: a slice only serves the family of its `addressType`, FQDN slices none.
//! Where kube-proxy would see API-server defaults (a port without `name` or `protocol`), the defaults apply.
//!
//! Endpoint conditions are read exactly as `addEndpoints` reads them: ready nil = true, serving nil = **true**,
//! terminating nil = false (docs/semantics.md rule 4). The API documentation says "serving nil = ready"; kube-proxy
//! wins, which only matters for an endpoint with `ready: false`, `terminating: true` and no `serving`:
//! kube-proxy (and lb) use it as a serving-terminating fallback.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::endpoints::Endpoint;
use super::ip::{Family, is_ipv4_mapped_literal, parse_ip_sloppy};
use super::objects::{
    DEFAULT_NAMESPACE, Diagnostic, EndpointSlice, LABEL_SERVICE_NAME, Name, object_label,
};
use crate::state::Protocol;

#[derive(Clone, Debug)]
struct SlicePort {
    name: String,
    protocol: Protocol,
    port: u16,
}

#[derive(Clone, Debug)]
struct SliceEndpoint {
    addr: IpAddr,
    node_name: Option<Name>,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: BTreeSet<Name>,
    node_hints: BTreeSet<Name>,
}

/// One valid EndpointSlice, reduced to what the model reads.
#[derive(Clone, Debug)]
struct SliceInfo {
    family: Family,
    ports: Vec<SlicePort>,
    endpoints: Vec<SliceEndpoint>,
}

/// One valid slice as kept by the index: its Service and its content.
#[derive(Clone, Debug)]
pub(crate) struct IndexedSlice {
    service: String,
    info: SliceInfo,
}

impl IndexedSlice {
    /// The Service this slice belongs to (its `kubernetes.io/service-name` label).
    pub(crate) fn service(&self) -> &str {
        &self.service
    }
}

/// Every usable slice, by the Service it belongs to.
#[derive(Debug, Default)]
pub(crate) struct SliceIndex {
    /// (namespace, Service name) -> slices by slice name (the order makes duplicate addresses resolve the same way).
    by_service: BTreeMap<(String, String), BTreeMap<String, SliceInfo>>,
    node_name: String,
}

impl SliceIndex {
    /// Validates and indexes the slices once; problems become diagnostics and the bad part is left out.
    pub(crate) fn build(
        slices: &[std::sync::Arc<EndpointSlice>],
        node_name: &str,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Self {
        // Slice-name order makes the duplicate-address preference deterministic. A slice given twice keeps its
        // last definition, like a Service.
        let mut by_name = BTreeMap::new();
        for slice in slices {
            let namespace = slice
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(DEFAULT_NAMESPACE)
                .to_owned();
            let Some(name) = slice.metadata.name.clone().filter(|n| !n.is_empty()) else {
                diagnostics.push(Diagnostic::new(
                    object_label("EndpointSlice", Some(&namespace), None),
                    Some("metadata.name".to_owned()),
                    "an EndpointSlice needs a name; skipped",
                ));
                continue;
            };
            if by_name
                .insert((namespace.clone(), name.clone()), slice)
                .is_some()
            {
                diagnostics.push(Diagnostic::new(
                    object_label("EndpointSlice", Some(&namespace), Some(&name)),
                    None,
                    "defined more than once; the last definition is used",
                ));
            }
        }

        let mut index = SliceIndex::new(node_name);
        for ((namespace, name), slice) in by_name {
            if let Some(indexed) = index_slice(slice, &namespace, &name, diagnostics) {
                index.insert(&namespace, &name, indexed);
            }
        }
        index
    }

    pub(crate) fn new(node_name: &str) -> Self {
        SliceIndex {
            by_service: BTreeMap::new(),
            node_name: node_name.to_owned(),
        }
    }

    /// Adds slice `namespace/name` (replacing nothing: remove its previous version first).
    pub(crate) fn insert(&mut self, namespace: &str, name: &str, slice: IndexedSlice) {
        self.by_service
            .entry((namespace.to_owned(), slice.service))
            .or_default()
            .insert(name.to_owned(), slice.info);
    }

    /// Removes slice `namespace/name` from Service `service`'s slices.
    pub(crate) fn remove(&mut self, namespace: &str, name: &str, service: &str) {
        let key = (namespace.to_owned(), service.to_owned());
        if let Some(slices) = self.by_service.get_mut(&key) {
            slices.remove(name);
            if slices.is_empty() {
                self.by_service.remove(&key);
            }
        }
    }

    pub(crate) fn set_node_name(&mut self, node_name: &str) {
        node_name.clone_into(&mut self.node_name);
    }

    /// The endpoints of one service port for one family: kube-proxy's `endpointInfoByServicePort` and
    /// `addEndpoints`, restricted to the slices of that Service.
    pub(crate) fn endpoints(
        &self,
        namespace: &str,
        service: &str,
        family: Family,
        port_name: &str,
        protocol: Protocol,
    ) -> Vec<Endpoint> {
        let Some(slices) = self
            .by_service
            .get(&(namespace.to_owned(), service.to_owned()))
        else {
            return Vec::new();
        };
        let mut set: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
        for slice in slices.values().filter(|s| s.family == family) {
            for port in slice
                .ports
                .iter()
                .filter(|p| p.name == port_name && p.protocol == protocol)
            {
                for ep in &slice.endpoints {
                    let endpoint = Endpoint {
                        addr: ep.addr,
                        port: port.port,
                        is_local: !self.node_name.is_empty()
                            && ep.node_name.as_deref() == Some(self.node_name.as_str()),
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        zone_hints: ep.zone_hints.clone(),
                        node_hints: ep.node_hints.clone(),
                    };
                    // addEndpoints: an address in two slices (moving between them, or an IP reused by a new pod
                    // before the old one is gone) counts once, and the running copy wins over the terminating one.
                    let key = (endpoint.addr, endpoint.port);
                    if !set.contains_key(&key) || !endpoint.terminating {
                        set.insert(key, endpoint);
                    }
                }
            }
        }
        set.into_values().collect()
    }
}

/// Checks slice `namespace/name`: its Service and usable content, or `None` (with diagnostics) if it is unusable.
pub(crate) fn index_slice(
    slice: &EndpointSlice,
    namespace: &str,
    name: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<IndexedSlice> {
    let object = object_label("EndpointSlice", Some(namespace), Some(name));
    slice_info(slice, &object, diagnostics).map(|(service, info)| IndexedSlice { service, info })
}

/// Checks one slice; returns the Service it belongs to and its usable content, or `None` if it is unusable.
fn slice_info(
    slice: &EndpointSlice,
    object: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<(String, SliceInfo)> {
    let diag = |diagnostics: &mut Vec<Diagnostic>, field: String, message: String| {
        diagnostics.push(Diagnostic::new(object, Some(field), message));
    };
    // endpointSliceCacheKeys: without the label kube-proxy cannot place the slice and ignores it.
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .filter(|s| !s.is_empty())
    else {
        diag(
            diagnostics,
            format!("metadata.labels[{LABEL_SERVICE_NAME:?}]"),
            "no Service named by this label; skipped".to_owned(),
        );
        return None;
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        "FQDN" => {
            tracing::debug!(slice = %object, "FQDN EndpointSlice ignored, as kube-proxy does");
            return None;
        }
        other => {
            diag(
                diagnostics,
                "addressType".to_owned(),
                format!("unknown address type {other:?}; skipped"),
            );
            return None;
        }
    };

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // API-server defaults: an absent name is "" (the unnamed service port), an absent protocol TCP.
        let name = p.name.clone().unwrap_or_default();
        let Some(protocol) = Protocol::from_k8s(p.protocol.as_deref().filter(|s| !s.is_empty()))
        else {
            diag(
                diagnostics,
                format!("ports[{i}].protocol"),
                format!(
                    "unknown protocol {:?}; port skipped",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            );
            continue;
        };
        // kube-proxy ignores a port without a number ("all ports" is not implemented) or with 0.
        match p
            .port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0)
        {
            Some(port) => ports.push(SlicePort {
                name,
                protocol,
                port,
            }),
            None => {
                let message = match p.port {
                    None => {
                        "no port number (kube-proxy does not implement \"all ports\"); port skipped"
                            .to_owned()
                    }
                    Some(n) => format!("{n} is not a port number (1-65535); port skipped"),
                };
                diag(diagnostics, format!("ports[{i}].port"), message);
            }
        }
    }

    // Sized up front: the index keeps it as long as the slice exists.
    let mut endpoints = Vec::with_capacity(slice.endpoints.as_ref().map_or(0, Vec::len));
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        // addEndpoints reads addresses[0] only (the API allows one address per endpoint today).
        let Some(raw) = ep.addresses.first() else {
            diag(
                diagnostics,
                format!("endpoints[{i}].addresses"),
                "no address; endpoint skipped".to_owned(),
            );
            continue;
        };
        if is_ipv4_mapped_literal(raw) {
            diag(
                diagnostics,
                format!("endpoints[{i}].addresses[0]"),
                format!(
                    "{raw} is an IPv4-mapped IPv6 address, not a valid {} endpoint address (the API server refuses it); endpoint skipped",
                    family.address_type()
                ),
            );
            continue;
        }
        let Some(addr) = parse_ip_sloppy(raw) else {
            diag(
                diagnostics,
                format!("endpoints[{i}].addresses[0]"),
                format!("{raw:?} is not an IP address; endpoint skipped"),
            );
            continue;
        };
        if Family::of(&addr) != family {
            diag(
                diagnostics,
                format!("endpoints[{i}].addresses[0]"),
                format!(
                    "{raw} is not an {} address; endpoint skipped",
                    family.address_type()
                ),
            );
            continue;
        }
        // Conditions as kube-proxy reads them: ready nil = true, serving nil = true, terminating nil = false.
        let conditions = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        endpoints.push(SliceEndpoint {
            addr,
            node_name: ep.node_name.clone(),
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
    }
    Some((
        service.clone(),
        SliceInfo {
            family,
            ports,
            endpoints,
        },
    ))
}

/// Every address one slice lists, whatever its conditions or Service (see `DesiredState::endpoint_addresses`).
pub(crate) fn listed_addresses(slice: &EndpointSlice) -> Vec<IpAddr> {
    slice
        .endpoints
        .iter()
        .flatten()
        .flat_map(|e| e.addresses.iter())
        // Not a listed endpoint: the slice's reader skips it too.
        .filter(|a| !is_ipv4_mapped_literal(a))
        .filter_map(|a| parse_ip_sloppy(a))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::state::{Protocol, Scope};

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: dns, port: 53, protocol: UDP}
";

    fn slice(
        name: &str,
        namespace: &str,
        address_type: &str,
        ports: &str,
        endpoints: &str,
    ) -> String {
        format!(
            "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: {namespace}, labels: {{kubernetes.io/service-name: web}}}}
addressType: {address_type}
ports: {ports}
endpoints: {endpoints}
"
        )
    }

    #[test]
    fn named_port_resolved_per_slice() {
        // During a rollout that renumbers the container port, the old and new pods sit in different slices with
        // different numbers for the same port name: each endpoint keeps its own slice's number.
        let yaml = format!(
            "{SERVICE}{}{}",
            slice(
                "web-old",
                "ns",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.1]}]"
            ),
            slice(
                "web-new",
                "ns",
                "IPv4",
                "[{name: http, port: 9090}]",
                "[{addresses: [10.0.0.2]}]"
            ),
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.diagnostics, vec![]);
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.0.1:8080", "10.0.0.2:9090"]
        );
    }

    #[test]
    fn an_ipv4_mapped_ipv6_literal_is_not_an_ipv4_endpoint() {
        // The API server refuses `::ffff:a.b.c.d` in an IPv4 slice (and in an IPv6 one); a file can still hold it.
        // It is skipped with a warning naming the slice and the address, and the slice's other endpoints serve.
        let yaml = format!(
            "{SERVICE}{}{}",
            slice(
                "web-v4",
                "ns",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [\"::ffff:10.0.0.1\"]}, {addresses: [10.0.0.2]}]"
            ),
            slice(
                "web-v6",
                "ns",
                "IPv6",
                "[{name: http, port: 8080}]",
                "[{addresses: [\"::ffff:10.0.0.3\"]}]"
            ),
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.0.2:8080"]
        );
        let warned: Vec<(&str, &str)> = t
            .diagnostics
            .iter()
            .map(|d| (d.object.as_str(), d.message.as_str()))
            .collect();
        assert_eq!(warned.len(), 2, "{warned:?}");
        assert_eq!(warned[0].0, "EndpointSlice ns/web-v4");
        assert!(
            warned[0].1.contains("::ffff:10.0.0.1") && warned[0].1.contains("IPv4-mapped"),
            "{warned:?}"
        );
        assert_eq!(warned[1].0, "EndpointSlice ns/web-v6");
        assert!(warned[1].1.contains("::ffff:10.0.0.3"), "{warned:?}");
    }

    #[test]
    fn slice_port_must_match_name_and_protocol() {
        let yaml = format!(
            "{SERVICE}{}",
            slice(
                "web-1",
                "ns",
                "IPv4",
                "[{name: http, port: 8080}, {name: dns, port: 5353, protocol: TCP}, {name: dns, port: 53, protocol: UDP}, {name: other, port: 1}]",
                "[{addresses: [10.0.0.1]}]"
            ),
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.diagnostics, vec![]);
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.0.1:8080"]
        );
        assert_eq!(
            backends(entry_proto(
                &t,
                "10.96.0.10",
                53,
                Protocol::Udp,
                Scope::Internal
            )),
            ["10.0.0.1:53"]
        );
    }

    #[test]
    fn unnamed_slice_port_matches_unnamed_service_port() {
        // An EndpointSlice port without `name` is the API server's default "", the single unnamed service port.
        let yaml = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
";
        let t = translate_yaml(yaml, &worker());
        assert_eq!(t.diagnostics, vec![]);
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.0.1:8080"]
        );
    }

    #[test]
    fn duplicate_address_across_slices_counts_once() {
        // 10.0.0.1 is terminating in one slice and running in the other: one backend, and it counts as ready, so
        // the terminating-only 10.0.0.2 is not used.
        let yaml = format!(
            "{SERVICE}{}{}",
            slice(
                "web-a",
                "ns",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}},
                  {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}]"
            ),
            slice("web-b", "ns", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.0.0.1]}, {addresses: [10.0.0.1]}]"),
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.diagnostics, vec![]);
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.0.1:8080"]
        );
    }

    #[test]
    fn only_first_address_of_an_endpoint_used() {
        let yaml = format!(
            "{SERVICE}{}",
            slice(
                "web-1",
                "ns",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.1, 10.0.0.9]}]"
            )
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.0.1:8080"]
        );
    }

    #[test]
    fn slices_of_other_services_and_namespaces_ignored() {
        let other_service = "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: ns, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.3]}]
";
        let yaml = format!(
            "{SERVICE}{}{}{other_service}{}",
            slice(
                "web-1",
                "ns",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.1]}]"
            ),
            slice(
                "web-1",
                "elsewhere",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.2]}]"
            ),
            slice(
                "web-fqdn",
                "ns",
                "FQDN",
                "[{name: http, port: 8080}]",
                "[{addresses: [web.example.com]}]"
            ),
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.diagnostics, vec![]);
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.0.1:8080"]
        );
    }

    #[test]
    fn bad_endpoint_addresses_and_ports_skipped_with_diagnostics() {
        let yaml = format!(
            "{SERVICE}{}",
            slice(
                "web-1",
                "ns",
                "IPv4",
                "[{name: http, port: 8080}, {name: dns, protocol: UDP}, {name: x, port: 1, protocol: ICMP}]",
                "[{addresses: [10.0.0.1]}, {addresses: [10.0.0.256]}, {addresses: ['fd00::1']}, {addresses: []}]"
            ),
        );
        let t = translate_yaml(&yaml, &worker());
        let got: Vec<String> = t
            .diagnostics
            .iter()
            .map(|d| format!("{} {}", d.object, d.field.clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            got,
            [
                "EndpointSlice ns/web-1 ports[1].port",
                "EndpointSlice ns/web-1 ports[2].protocol",
                "EndpointSlice ns/web-1 endpoints[1].addresses[0]",
                "EndpointSlice ns/web-1 endpoints[2].addresses[0]",
                "EndpointSlice ns/web-1 endpoints[3].addresses",
            ]
        );
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.0.1:8080"]
        );
    }

    #[test]
    fn slice_without_service_label_reported() {
        let yaml = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, namespace: ns}
addressType: IPv4
endpoints: []
";
        let t = translate_yaml(yaml, &worker());
        let got: Vec<Option<String>> = t.diagnostics.iter().map(|d| d.field.clone()).collect();
        assert_eq!(
            got,
            [Some(
                "metadata.labels[\"kubernetes.io/service-name\"]".to_owned()
            )]
        );
    }

    #[test]
    fn dual_stack_uses_matching_slice_family() {
        let yaml = format!(
            "
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns}}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00:96::10']
  ipFamilies: [IPv4, IPv6]
  ports: [{{name: http, port: 80}}]
{}{}",
            slice(
                "web-v4",
                "ns",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.1]}]"
            ),
            slice(
                "web-v6",
                "ns",
                "IPv6",
                "[{name: http, port: 8080}]",
                "[{addresses: ['fd00::1']}, {addresses: ['fd00::2']}]"
            ),
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.diagnostics, vec![]);
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.0.1:8080"]
        );
        assert_eq!(
            backends(entry(&t, "fd00:96::10", 80, Scope::Internal)),
            ["[fd00::1]:8080", "[fd00::2]:8080"]
        );
    }
}
