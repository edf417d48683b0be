//! One [`ServiceEntry`] per VIP, port and scope (docs/semantics.md rules 2, 5, 8, 13, 14).
//!
//! This is what kube-proxy's nftables `syncProxyRules` writes into its `service-ips`, `service-nodeports` and
//! `no-endpoint-*` maps, split by who sends the packet:
//! - [`Scope::External`], packets arriving from outside the node. A ClusterIP takes the internal traffic policy's
//!   set (kube-proxy's `internalTrafficChain` matches every source, so `internalTrafficPolicy: Local` holds for a
//!   ClusterIP reached from the wire too). externalIPs, LoadBalancer IPs and NodePorts take the external traffic
//!   policy's set (`externalPolicyChain`).
//! - [`Scope::Internal`], this node's pods and processes (socket LB). A ClusterIP takes the internal policy's set
//!   as above. External VIPs take the Cluster set whatever the external policy: kube-proxy's "short-circuit pod
//!   traffic" / "short-circuit local traffic" rules send local clients to `clusterPolicyChain` (rule 5).
//!
//! An empty set rejects when the Service port has no usable endpoint anywhere (`hasEndpoints` false: the
//! `no-endpoint` maps with `goto reject-chain`) and drops otherwise (a Local policy without a local endpoint: the
//! maps with `drop`), rule 8.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::NodeContext;
use super::endpoint_slices::SliceIndex;
use super::endpoints::{Categorized, Uses, categorize_endpoints};
use super::ip::Family;
use super::objects::Diagnostic;
use super::service_ports::{PortInfo, ServiceInfo};
use crate::state::{Backend, DesiredState, Frontend, Scope, ServiceEntry, VipKind};

/// Accumulates frontends across Services; the first Service to claim a frontend keeps it (callers add them oldest
/// first, the conflict rule of docs/semantics.md rule 1; the translator resolves conflicts between Services itself).
#[derive(Debug, Default)]
pub(crate) struct StateBuilder {
    services: BTreeMap<Frontend, ServiceEntry>,
    diagnostics: Vec<Diagnostic>,
    /// Add the `localhost:nodePort` frontends (`ModelConfig::localhost_nodeports`, rule 14).
    pub(crate) localhost_nodeports: bool,
}

impl StateBuilder {
    pub(crate) fn finish(self) -> (DesiredState, Vec<Diagnostic>) {
        (
            DesiredState {
                services: self.services,
                ..DesiredState::default()
            },
            self.diagnostics,
        )
    }

    /// Adds every frontend of one proxied Service, once per IP family it has a ClusterIP in.
    pub(crate) fn add_service(
        &mut self,
        info: &ServiceInfo,
        slices: &SliceIndex,
        node: &NodeContext,
    ) {
        for family in Family::BOTH {
            let Some(cluster_ip) = info.cluster_ip(family) else {
                continue;
            };
            let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
                ips.iter()
                    .copied()
                    .filter(|ip| Family::of(ip) == family)
                    .collect()
            };
            let vips = FamilyVips {
                cluster_ip,
                external_ips: of_family(&info.external_ips),
                load_balancer_ips: of_family(&info.load_balancer_ips),
                node_addresses: of_family(node.nodeport_addresses()),
                source_ranges: lb_source_ranges(info, family, node),
            };
            for port in &info.ports {
                self.add_port(info, port, family, &vips, slices, node);
            }
        }
    }

    fn add_port(
        &mut self,
        info: &ServiceInfo,
        port: &PortInfo,
        family: Family,
        vips: &FamilyVips,
        slices: &SliceIndex,
        node: &NodeContext,
    ) {
        // kube-proxy's ServicePort.ExternallyAccessible, per family like its per-family service map.
        let externally_accessible = port.node_port.is_some()
            || !vips.load_balancer_ips.is_empty()
            || !vips.external_ips.is_empty();
        let uses = Uses::new(
            info.internal_policy_local,
            info.external_policy_local,
            externally_accessible,
        );
        let endpoints = slices.endpoints(
            &info.namespace,
            &info.name,
            family,
            &port.name,
            port.protocol,
        );
        let sets = categorize_endpoints(
            &endpoints,
            uses,
            &node.name,
            node.zone.as_deref().unwrap_or_default(),
        );

        let internal_policy_set = if info.internal_policy_local {
            &sets.local
        } else {
            &sets.cluster
        };
        let external_policy_set = if info.external_policy_local {
            &sets.local
        } else {
            &sets.cluster
        };
        let entry = |kind: VipKind, set: &Vec<Backend>| ServiceEntry {
            service: info.port_name(port),
            kind,
            algorithm: info.algorithm,
            affinity_timeout: info.affinity_timeout,
            backends: usable(&sets, set),
            drop_if_empty: sets.has_any && set.is_empty(),
            source_ranges: Vec::new(),
        };

        let localhost_nodeports = self.localhost_nodeports;
        let mut add = |addr: IpAddr, vip_port: u16, scope: Scope, entry: ServiceEntry| {
            let frontend = Frontend {
                addr,
                port: vip_port,
                proto: port.protocol,
                scope,
            };
            self.insert(info, frontend, entry);
        };
        for scope in [Scope::External, Scope::Internal] {
            add(
                vips.cluster_ip,
                port.port,
                scope,
                entry(VipKind::ClusterIp, internal_policy_set),
            );
        }
        for &ip in &vips.external_ips {
            add(
                ip,
                port.port,
                Scope::External,
                entry(VipKind::ExternalIp, external_policy_set),
            );
            add(
                ip,
                port.port,
                Scope::Internal,
                entry(VipKind::ExternalIp, &sets.cluster),
            );
        }
        for &ip in &vips.load_balancer_ips {
            add(
                ip,
                port.port,
                Scope::External,
                ServiceEntry {
                    source_ranges: vips.source_ranges.clone(),
                    ..entry(VipKind::LoadBalancer, external_policy_set)
                },
            );
            // Rule 9 holds for this node's pods and processes too, before rule 5's short-circuit: the Internal
            // frontend carries the ranges, and the socket LB checks them against the address of the socket's network
            // namespace. Without it, with the address a local route on the node (GCE's guest agent adds one for
            // every LB IP), a pod's packets would be delivered to the node itself, across no tc device: refused,
            // where kube-proxy serves them.
            add(
                ip,
                port.port,
                Scope::Internal,
                ServiceEntry {
                    source_ranges: vips.source_ranges.clone(),
                    ..entry(VipKind::LoadBalancer, &sets.cluster)
                },
            );
        }
        if let Some(node_port) = port.node_port {
            // Rule 14, kube-proxy iptables' `--iptables-localhost-nodeports` (default true): `127.0.0.0/8:nodePort`
            // from the host itself goes to the Service like the node's own traffic to its NodePort (the Cluster
            // set, rule 5's short-circuit: kube-proxy jumps to the Service's external chain, which sends local
            // sources to the cluster chain). IPv4 only, as upstream ("never works" for `::1`). The socket LB
            // looks up every `127.0.0.0/8` destination of a host-namespace socket under 127.0.0.1 and leaves
            // other namespaces' loopback alone. kube-proxy only does this when its NodePort addresses include
            // loopback (the iptables default); lb's NodePort addresses are the node's primary ones, so the flag
            // alone decides. kube-proxy's nftables mode never does it; `--localhost-nodeports=false` matches it.
            if localhost_nodeports && family == Family::V4 {
                add(
                    IpAddr::from(lb_common::LOCALHOST_NODEPORT_ADDR),
                    node_port,
                    Scope::Internal,
                    entry(VipKind::NodePort, &sets.cluster),
                );
            }
            for &ip in &vips.node_addresses {
                add(
                    ip,
                    node_port,
                    Scope::External,
                    entry(VipKind::NodePort, external_policy_set),
                );
                add(
                    ip,
                    node_port,
                    Scope::Internal,
                    entry(VipKind::NodePort, &sets.cluster),
                );
            }
        }
    }

    fn insert(&mut self, info: &ServiceInfo, frontend: Frontend, entry: ServiceEntry) {
        match self.services.get(&frontend) {
            None => {
                self.services.insert(frontend, entry);
            }
            // The same VIP listed twice by one Service port (say, an externalIP repeated): nothing new.
            Some(existing) if existing.service == entry.service => {}
            Some(existing) => self.diagnostics.push(Diagnostic::new(
                info.label(),
                None,
                format!(
                    "{frontend} ({:?}) is already served for {}; not added for {}",
                    frontend.scope, existing.service, entry.service
                ),
            )),
        }
    }
}

/// One family's VIPs of a Service.
struct FamilyVips {
    cluster_ip: IpAddr,
    external_ips: Vec<IpAddr>,
    load_balancer_ips: Vec<IpAddr>,
    node_addresses: Vec<IpAddr>,
    /// The allowed sources of the LoadBalancer IPs (empty = all), see [`lb_source_ranges`].
    source_ranges: Vec<(IpAddr, u8)>,
}

/// A Service's `loadBalancerSourceRanges` of one family, as the datapath checks them (rule 9). kube-proxy's
/// nftables proxier also accepts the LoadBalancer IPs themselves as sources when some range holds a node IP
/// (`allowFromNode`: traffic a node sends to an LB IP may come back to it with the LB IP as source), so those are
/// added as host prefixes.
fn lb_source_ranges(info: &ServiceInfo, family: Family, node: &NodeContext) -> Vec<(IpAddr, u8)> {
    let mut ranges: Vec<(IpAddr, u8)> = info
        .source_ranges
        .iter()
        .copied()
        .filter(|(ip, _)| Family::of(ip) == family)
        .collect();
    let holds_node_ip = node.addresses.iter().any(|a| {
        ranges
            .iter()
            .any(|&(net, len)| prefix_contains(net, len, *a))
    });
    if holds_node_ip {
        for &ip in &info.load_balancer_ips {
            if Family::of(&ip) == family {
                ranges.push((ip, if ip.is_ipv4() { 32 } else { 128 }));
            }
        }
    }
    ranges.sort();
    ranges.dedup();
    ranges
}

/// Whether `addr` lies inside `net/len` (both of one family; different families never match).
pub(crate) fn prefix_contains(net: IpAddr, len: u8, addr: IpAddr) -> bool {
    let (net, addr, bits) = match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (
            u128::from(u32::from(n)) << 96,
            u128::from(u32::from(a)) << 96,
            32,
        ),
        (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
        _ => return false,
    };
    let len = u32::from(len).min(bits);
    if len == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - len);
    net & mask == addr & mask
}

/// A set is only used when the Service port has usable endpoints at all; otherwise the frontend rejects.
fn usable(sets: &Categorized, set: &[Backend]) -> Vec<Backend> {
    if sets.has_any {
        set.to_vec()
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::test_support::*;
    use crate::state::{
        Algorithm, Backend, Protocol, Scope, ServiceEntry, ServicePortName, VipKind,
    };

    /// worker-1's endpoint 10.0.1.1 and worker-2's endpoint 10.0.2.1 for Service `ns/web`, port `http` = 8080.
    const SLICE: &str = "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.1.1], nodeName: worker-1}
- {addresses: [10.0.2.1], nodeName: worker-2}
";
    const REMOTE_ONLY_SLICE: &str = "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.2.1], nodeName: worker-2}
";
    const BOTH: &[&str] = &["10.0.1.1:8080", "10.0.2.1:8080"];
    const LOCAL: &[&str] = &["10.0.1.1:8080"];
    const REMOTE: &[&str] = &["10.0.2.1:8080"];

    fn web(spec: &str, slice: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: ns}}\nspec:\n{spec}\n{slice}"
        )
    }

    #[test]
    fn cluster_ip_service_full_state() {
        let yaml = web(
            "  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, targetPort: 8080}]",
            SLICE,
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.diagnostics, vec![]);
        let backend = |addr: &str| Backend {
            addr: ip(addr),
            port: 8080,
            weight: 1,
            local: addr == "10.0.1.1",
        };
        let entry = ServiceEntry {
            service: ServicePortName {
                namespace: "ns".into(),
                name: "web".into(),
                port: "http".into(),
            },
            kind: VipKind::ClusterIp,
            algorithm: Algorithm::Maglev,
            affinity_timeout: None,
            backends: vec![backend("10.0.1.1"), backend("10.0.2.1")],
            drop_if_empty: false,
            source_ranges: vec![],
        };
        let want: BTreeMap<_, _> = [
            (
                fe("10.96.0.10", 80, Protocol::Tcp, Scope::External),
                entry.clone(),
            ),
            (fe("10.96.0.10", 80, Protocol::Tcp, Scope::Internal), entry),
        ]
        .into_iter()
        .collect();
        assert_eq!(t.state.services, want);
    }

    #[test]
    fn every_vip_gets_both_scopes() {
        let yaml = web(
            "  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.5]
  ports: [{name: http, port: 80, nodePort: 30080}]",
            &format!(
                "status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.7}}, {{ip: 198.51.100.8, ipMode: Proxy}}]}}}}\n{SLICE}"
            ),
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.diagnostics, vec![]);
        // worker() has 192.168.0.10 and fd00::10; the IPv4-only Service gets its NodePort on the IPv4 one only.
        assert_eq!(
            frontends(&t),
            [
                "10.96.0.10:80/TCP External ClusterIp",
                "10.96.0.10:80/TCP Internal ClusterIp",
                "192.168.0.10:30080/TCP External NodePort",
                "192.168.0.10:30080/TCP Internal NodePort",
                "198.51.100.7:80/TCP External LoadBalancer",
                "198.51.100.7:80/TCP Internal LoadBalancer",
                "203.0.113.5:80/TCP External ExternalIp",
                "203.0.113.5:80/TCP Internal ExternalIp",
            ]
        );
        for e in t.state.services.values() {
            assert_eq!(backends(e), BOTH);
        }
    }

    #[test]
    fn headless_service_is_not_proxied() {
        // The slice is there, but a headless Service has no VIP: no frontend and nothing to report.
        let t = translate_yaml(
            &web(
                "  clusterIP: None\n  ports: [{name: http, port: 80}]",
                SLICE,
            ),
            &worker(),
        );
        // The node's own networks are always there (for the per-packet datapath); no service is.
        assert!(t.state.services.is_empty(), "{:?}", t.state.services);
        assert_eq!(t.diagnostics, vec![]);
    }

    #[test]
    fn internal_local_policy_without_local_endpoint_drops() {
        let yaml = web(
            "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80}]",
            REMOTE_ONLY_SLICE,
        );
        let t = translate_yaml(&yaml, &worker());
        for scope in [Scope::Internal, Scope::External] {
            let e = entry(&t, "10.96.0.10", 80, scope);
            assert_eq!((backends(e), e.drop_if_empty), (vec![], true), "{scope:?}");
        }
    }

    #[test]
    fn internal_local_policy_applies_to_cluster_ip_from_the_wire() {
        // kube-proxy's ClusterIP rule jumps to the internal policy chain for every source.
        let yaml = web(
            "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80}]",
            SLICE,
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::External)),
            LOCAL
        );
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            LOCAL
        );
    }

    #[test]
    fn external_local_policy_uses_local_endpoints_from_outside_and_all_from_inside() {
        let yaml = web(
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  externalIPs: [203.0.113.5]\n  ports: [{name: http, port: 80, nodePort: 30080}]",
            SLICE,
        );
        let t = translate_yaml(&yaml, &worker());
        // (VIP, port, scope, expected backends)
        let cases: &[(&str, u16, Scope, &[&str])] = &[
            ("192.168.0.10", 30080, Scope::External, LOCAL),
            ("192.168.0.10", 30080, Scope::Internal, BOTH),
            ("203.0.113.5", 80, Scope::External, LOCAL),
            ("203.0.113.5", 80, Scope::Internal, BOTH),
            // The external policy does not touch the ClusterIP.
            ("10.96.0.10", 80, Scope::External, BOTH),
            ("10.96.0.10", 80, Scope::Internal, BOTH),
        ];
        for (addr, port, scope, want) in cases {
            assert_eq!(
                backends(entry(&t, addr, *port, *scope)),
                *want,
                "{addr}:{port} {scope:?}"
            );
        }
    }

    #[test]
    fn localhost_node_ports_are_ipv4_internal_cluster_set_and_only_when_enabled() {
        let yaml = web(
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00:96::10']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, nodePort: 30080}]",
            REMOTE_ONLY_SLICE,
        );
        let on = super::super::ModelConfig {
            localhost_nodeports: true,
            ..super::super::ModelConfig::default()
        };
        let t = super::super::translate(&parse(&yaml), &worker(), &on);
        // Rule 5's short-circuit: the node's own traffic takes the Cluster set even under a Local policy.
        let lo = entry(&t, "127.0.0.1", 30080, Scope::Internal);
        let node = entry(&t, "192.168.0.10", 30080, Scope::Internal);
        assert_eq!(lo, node);
        assert_eq!(lo.kind, VipKind::NodePort);
        assert!(!lo.backends.is_empty());
        let loopbacks: Vec<String> = frontends(&t)
            .into_iter()
            .filter(|f| f.starts_with("127.") || f.starts_with("[::1]"))
            .collect();
        assert_eq!(loopbacks, ["127.0.0.1:30080/TCP Internal NodePort"]);
        // Off (the default, and kube-proxy's nftables mode): no loopback frontend at all.
        let off = translate_yaml(&yaml, &worker());
        assert!(
            !frontends(&off).iter().any(|f| f.starts_with("127.")),
            "{:?}",
            frontends(&off)
        );
    }

    #[test]
    fn nodeport_local_policy_without_local_endpoint_drops() {
        let yaml = web(
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, nodePort: 30080}]",
            REMOTE_ONLY_SLICE,
        );
        let t = translate_yaml(&yaml, &worker());
        let outside = entry(&t, "192.168.0.10", 30080, Scope::External);
        assert_eq!((backends(outside), outside.drop_if_empty), (vec![], true));
        // Local clients short-circuit to all cluster endpoints even with none local (rule 5).
        let inside = entry(&t, "192.168.0.10", 30080, Scope::Internal);
        assert_eq!(
            (backends(inside), inside.drop_if_empty),
            (REMOTE.iter().map(|s| s.to_string()).collect(), false)
        );
    }

    #[test]
    fn service_without_endpoints_rejects_everywhere() {
        let yaml = web(
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80, nodePort: 30080}]",
            "",
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.state.services.len(), 4);
        for (frontend, e) in &t.state.services {
            assert_eq!(
                (e.backends.len(), e.drop_if_empty),
                (0, false),
                "{frontend}"
            );
        }
    }

    #[test]
    fn load_balancer_source_ranges_hold_for_the_internal_frontend_too() {
        // Rule 9 before rule 5: this node's pods reach the LB IP through the socket LB, which checks the same
        // ranges (and the LB IPs themselves, allowed because a range holds this node's address).
        let yaml = web(
            "  type: LoadBalancer
  clusterIP: 10.96.0.10
  loadBalancerSourceRanges: [203.0.113.0/24, 192.168.0.0/24]
  allocateLoadBalancerNodePorts: false
  ports: [{name: http, port: 80}]",
            &format!("status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.7}}]}}}}\n{SLICE}"),
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.diagnostics, vec![]);
        assert_eq!(
            frontends(&t),
            [
                "10.96.0.10:80/TCP External ClusterIp",
                "10.96.0.10:80/TCP Internal ClusterIp",
                "198.51.100.7:80/TCP External LoadBalancer",
                "198.51.100.7:80/TCP Internal LoadBalancer",
            ]
        );
        let ranges = vec![
            (ip("192.168.0.0"), 24),
            (ip("198.51.100.7"), 32),
            (ip("203.0.113.0"), 24),
        ];
        for scope in [Scope::External, Scope::Internal] {
            assert_eq!(
                entry(&t, "198.51.100.7", 80, scope).source_ranges,
                ranges,
                "{scope:?}"
            );
        }
        // The Internal frontend serves the whole cluster set (rule 5's short-circuit), once the ranges allow.
        assert_eq!(
            backends(entry(&t, "198.51.100.7", 80, Scope::Internal)),
            BOTH
        );
        assert!(
            entry(&t, "10.96.0.10", 80, Scope::Internal)
                .source_ranges
                .is_empty()
        );
    }

    #[test]
    fn source_ranges_of_the_other_family_do_not_count() {
        // kube-proxy filters loadBalancerSourceRanges by family: an IPv6 range puts no firewall on an IPv4 LB IP.
        let yaml = web(
            "  type: LoadBalancer
  clusterIP: 10.96.0.10
  loadBalancerSourceRanges: ['2001:db8::/32']
  allocateLoadBalancerNodePorts: false
  ports: [{name: http, port: 80}]",
            &format!("status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.7}}]}}}}\n{SLICE}"),
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(
            backends(entry(&t, "198.51.100.7", 80, Scope::Internal)),
            BOTH
        );
    }

    #[test]
    fn dual_stack_service_gets_one_cluster_ip_per_family() {
        let yaml = web(
            "  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00:96::10']
  ports: [{name: http, port: 80, nodePort: 30080}]",
            SLICE,
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.diagnostics, vec![]);
        assert_eq!(
            frontends(&t),
            [
                "10.96.0.10:80/TCP External ClusterIp",
                "10.96.0.10:80/TCP Internal ClusterIp",
                "192.168.0.10:30080/TCP External NodePort",
                "192.168.0.10:30080/TCP Internal NodePort",
                "[fd00::10]:30080/TCP External NodePort",
                "[fd00::10]:30080/TCP Internal NodePort",
                "[fd00:96::10]:80/TCP External ClusterIp",
                "[fd00:96::10]:80/TCP Internal ClusterIp",
            ]
        );
        // No IPv6 slice: the IPv6 frontends reject.
        let v6 = entry(&t, "fd00:96::10", 80, Scope::Internal);
        assert_eq!((v6.backends.len(), v6.drop_if_empty), (0, false));
    }

    #[test]
    fn affinity_and_algorithm_reach_every_entry() {
        let yaml = format!(
            "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns, annotations: {{lb.io/algorithm: random}}}}
spec:
  clusterIP: 10.96.0.10
  sessionAffinity: ClientIP
  ports: [{{name: http, port: 80}}]
{SLICE}"
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(t.state.services.len(), 2);
        for e in t.state.services.values() {
            assert_eq!(
                (e.algorithm, e.affinity_timeout),
                (Algorithm::Random, Some(10800))
            );
        }
    }

    #[test]
    fn malformed_service_skipped_others_kept() {
        let yaml = format!(
            "apiVersion: v1
kind: Service
metadata: {{name: broken, namespace: ns}}
spec: {{clusterIP: 10.96.0.300, ports: [{{name: http, port: 80}}]}}
---
{}",
            web(
                "  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]",
                SLICE
            )
        );
        let t = translate_yaml(&yaml, &worker());
        let diags: Vec<String> = t.diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert!(
            diags[0].starts_with("Service ns/broken: spec.clusterIP: "),
            "{diags:?}"
        );
        assert_eq!(
            frontends(&t),
            [
                "10.96.0.10:80/TCP External ClusterIp",
                "10.96.0.10:80/TCP Internal ClusterIp"
            ]
        );
    }

    #[test]
    fn conflicting_frontend_kept_by_first_service() {
        let yaml = "
apiVersion: v1
kind: Service
metadata: {name: b, namespace: ns}
spec: {clusterIP: 10.96.0.2, externalIPs: [203.0.113.5], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns}
spec: {clusterIP: 10.96.0.1, externalIPs: [203.0.113.5], ports: [{port: 80}]}
";
        let t = translate_yaml(yaml, &worker());
        let owner = |scope| entry(&t, "203.0.113.5", 80, scope).service.name.clone();
        assert_eq!(
            (owner(Scope::External), owner(Scope::Internal)),
            ("a".to_owned(), "a".to_owned())
        );
        let objects: Vec<&str> = t.diagnostics.iter().map(|d| d.object.as_str()).collect();
        assert_eq!(objects, ["Service ns/b", "Service ns/b"]);
    }

    #[test]
    fn conflicting_frontend_kept_by_the_older_service() {
        // docs/semantics.md rule 1: the older Service (creationTimestamp, then namespace/name) keeps a VIP, port and
        // protocol two Services claim, whatever their names; the warning names the one skipped. `z` is older but
        // sorts last; `u` has no creationTimestamp (its age is unknown: it yields to any Service with one).
        let yaml = "
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns, creationTimestamp: \"2025-06-01T00:00:00Z\"}
spec: {clusterIP: 10.96.0.1, externalIPs: [203.0.113.5], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: z, namespace: ns, creationTimestamp: \"2025-01-01T00:00:00Z\"}
spec: {clusterIP: 10.96.0.2, externalIPs: [203.0.113.5], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: u, namespace: ns}
spec: {clusterIP: 10.96.0.3, externalIPs: [203.0.113.5], ports: [{port: 80}]}
";
        let t = translate_yaml(yaml, &worker());
        let owner = |scope| entry(&t, "203.0.113.5", 80, scope).service.name.clone();
        assert_eq!(
            (owner(Scope::External), owner(Scope::Internal)),
            ("z".to_owned(), "z".to_owned())
        );
        let mut skipped: Vec<(&str, &str)> = t
            .diagnostics
            .iter()
            .map(|d| (d.object.as_str(), d.message.as_str()))
            .collect();
        skipped.sort();
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        for (i, (object, message)) in skipped.iter().enumerate() {
            let loser = if i < 2 { "a" } else { "u" };
            assert_eq!(*object, format!("Service ns/{loser}"));
            assert!(
                message.contains("already served for ns/z")
                    && message.contains(&format!("not added for ns/{loser}")),
                "{message}"
            );
        }
    }

    #[test]
    fn udp_and_sctp_ports_keep_their_protocol() {
        let yaml = web(
            "  clusterIP: 10.96.0.10\n  ports: [{name: dns, port: 53, protocol: UDP}, {name: sig, port: 3868, protocol: SCTP}]",
            "",
        );
        let t = translate_yaml(&yaml, &worker());
        let got: Vec<String> = t
            .state
            .services
            .keys()
            .map(|f| format!("{f} {:?}", f.scope))
            .collect();
        assert_eq!(
            got,
            [
                "10.96.0.10:53/UDP External",
                "10.96.0.10:53/UDP Internal",
                "10.96.0.10:3868/SCTP External",
                "10.96.0.10:3868/SCTP Internal"
            ]
        );
    }

    #[test]
    fn node_ports_follow_node_addresses() {
        let yaml = web(
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 30080}]",
            SLICE,
        );
        let node = crate::model::NodeContext {
            addresses: vec![ip("10.1.0.5"), ip("10.2.0.5")],
            ..worker()
        };
        let t = translate_yaml(&yaml, &node);
        let node_ports: Vec<String> = t
            .state
            .services
            .keys()
            .filter(|f| f.port == 30080)
            .map(|f| format!("{f} {:?}", f.scope))
            .collect();
        assert_eq!(
            node_ports,
            [
                "10.1.0.5:30080/TCP External",
                "10.1.0.5:30080/TCP Internal",
                "10.2.0.5:30080/TCP External",
                "10.2.0.5:30080/TCP Internal"
            ]
        );
    }
}
