//! This node's name, NodePort addresses and zone (SEMANTICS.md rule 2, inputs "Node").

use std::net::IpAddr;
use std::sync::Arc;

use super::ip::{Family, parse_ip_sloppy};
use super::objects::{LABEL_TOPOLOGY_ZONE, Node};
use super::{ModelConfig, NodeContext};

/// Builds the [`NodeContext`] for `node_name` from its Node object. NodePorts listen on the node's primary address
/// per family (kube-proxy's `--nodeport-addresses=primary`). Without a Node object (a bare manifest file) or without
/// addresses in it, they listen on `cfg.fallback_node_addresses`, and an info line says so.
pub fn node_context(node_name: &str, nodes: &[Arc<Node>], cfg: &ModelConfig) -> NodeContext {
    let node = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name));
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|labels| labels.get(LABEL_TOPOLOGY_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    let mut addresses = node.map(|n| node_host_ips(n)).unwrap_or_default();
    if addresses.is_empty() {
        let fallback = &cfg.fallback_node_addresses;
        match node {
            None => tracing::info!(
                node = node_name,
                ?fallback,
                "no Node object for this node: NodePorts use the fallback addresses"
            ),
            Some(_) => tracing::info!(
                node = node_name,
                ?fallback,
                "Node has no usable address: NodePorts use the fallback addresses"
            ),
        }
        addresses = fallback.clone();
    }
    NodeContext {
        name: node_name.to_owned(),
        addresses,
        zone,
    }
}

/// This node's networks for the per-packet datapath: its NodePort addresses (`node.addresses`, the first per family
/// is the SNAT address) and the Node object's `spec.podCIDRs` (local pods, kube-proxy's `--detect-local-mode=NodeCIDR`).
pub fn node_nets(nodes: &[Arc<Node>], node: &NodeContext) -> crate::state::NodeNets {
    let pod_cidrs = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node.name.as_str()))
        .and_then(|n| n.spec.as_ref())
        .and_then(|s| {
            s.pod_cidrs
                .clone()
                .or_else(|| s.pod_cidr.clone().map(|c| vec![c]))
        })
        .unwrap_or_default()
        .iter()
        .filter_map(|c| super::ip::parse_cidr_sloppy(c))
        .collect();
    crate::state::NodeNets {
        addresses: node.addresses.clone(),
        pod_cidrs,
    }
}

/// kube-proxy's primary node IPs (`utilnode.GetNodeHostIPs`): the first InternalIP, else the first ExternalIP, and
/// then the first address of the other family, InternalIPs before ExternalIPs. SEMANTICS.md says "InternalIP per
/// family"; upstream also falls back to ExternalIP, and upstream wins.
fn node_host_ips(node: &Node) -> Vec<IpAddr> {
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    let of_type = |type_: &str| -> Vec<IpAddr> {
        addresses
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == type_)
            .filter_map(|a| parse_ip_sloppy(&a.address))
            .collect()
    };
    let all: Vec<IpAddr> = of_type("InternalIP")
        .into_iter()
        .chain(of_type("ExternalIP"))
        .collect();
    let Some(&primary) = all.first() else {
        return Vec::new();
    };
    let mut ips = vec![primary];
    if let Some(&secondary) = all.iter().find(|ip| Family::of(ip) != Family::of(&primary)) {
        ips.push(secondary);
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const NODES: &str = "
apiVersion: v1
kind: Node
metadata: {name: worker-1, labels: {topology.kubernetes.io/zone: zone-a}}
status:
  addresses:
  - {type: Hostname, address: worker-1}
  - {type: ExternalIP, address: 203.0.113.10}
  - {type: InternalIP, address: 192.168.0.10}
  - {type: InternalIP, address: 192.168.0.11}
  - {type: InternalIP, address: 'fd00::10'}
---
apiVersion: v1
kind: Node
metadata: {name: edge}
status:
  addresses:
  - {type: ExternalIP, address: 203.0.113.20}
  - {type: ExternalIP, address: '2001:db8::20'}
---
apiVersion: v1
kind: Node
metadata: {name: bare}
";

    fn cfg() -> ModelConfig {
        ModelConfig {
            fallback_node_addresses: vec![ip("10.9.9.9")],
            ..ModelConfig::default()
        }
    }

    #[test]
    fn node_context_takes_primary_address_per_family() {
        // (node name, expected addresses, expected zone)
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            ("worker-1", &["192.168.0.10", "fd00::10"], Some("zone-a")),
            ("edge", &["203.0.113.20", "2001:db8::20"], None),
            ("bare", &["10.9.9.9"], None),
            ("absent", &["10.9.9.9"], None),
        ];
        let nodes = parse(NODES).nodes;
        for (name, want_addrs, want_zone) in cases {
            let got = node_context(name, &nodes, &cfg());
            let want = NodeContext {
                name: (*name).to_owned(),
                addresses: want_addrs.iter().map(|a| ip(a)).collect(),
                zone: want_zone.map(str::to_owned),
            };
            assert_eq!(got, want, "{name}");
        }
    }
}
