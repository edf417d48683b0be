//! This node's name, NodePort addresses and zone (docs/semantics.md rule 2, inputs "Node"), and kube-proxy's
//! `--nodeport-addresses` ([`NodePortAddresses`]).

use std::net::IpAddr;
use std::sync::Arc;

use super::frontends::prefix_contains;
use super::ip::{Family, parse_cidr_sloppy, parse_ip_sloppy};
use super::objects::{LABEL_TOPOLOGY_ZONE, Node};
use super::{ModelConfig, NodeContext};

/// kube-proxy's `--nodeport-addresses` (`pkg/proxy/util/nodeport_addresses.go`): which of the node's addresses
/// serve NodePorts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// `primary`: the Node object's primary address per family. kube-proxy's default in nftables mode (since 1.29;
    /// iptables and ipvs default to every local address), and lb's.
    #[default]
    Primary,
    /// A list of CIDRs: the host's addresses inside them. A family with no CIDR in the list serves NodePorts on
    /// every address of that family, as kube-proxy's `NewNodePortAddresses` adds `0.0.0.0/0` or `::/0` for it.
    Cidrs(Vec<(IpAddr, u8)>),
}

impl NodePortAddresses {
    /// Parses the flag's values as kube-proxy validates them: empty (unset) or `primary` alone, else CIDRs only.
    pub fn parse(items: &[String]) -> Result<Self, String> {
        let items: Vec<&str> = items
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        match items.as_slice() {
            [] | ["primary"] => Ok(Self::Primary),
            _ => items
                .iter()
                .map(|s| {
                    parse_cidr_sloppy(s).ok_or_else(|| {
                        format!(
                            "--nodeport-addresses: {s:?} is not a CIDR (give CIDRs, or `primary` alone)"
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Self::Cidrs),
        }
    }

    /// Whether the list covers IPv4 loopback (`ContainsIPv4Loopback`): kube-proxy's iptables mode serves
    /// `localhost:nodePort` only then. A list without an IPv4 CIDR matches all IPv4 addresses, loopback included.
    /// `primary` never does for kube-proxy; lb keeps `--localhost-nodeports` deciding alone there (its default).
    pub fn allows_ipv4_loopback(&self) -> bool {
        match self {
            Self::Primary => true,
            Self::Cidrs(cidrs) => {
                let v4: Vec<&(IpAddr, u8)> = cidrs.iter().filter(|(a, _)| a.is_ipv4()).collect();
                v4.is_empty()
                    || v4.iter().any(|&&(net, len)| {
                        net.is_loopback() || prefix_contains(net, len, IpAddr::from([127, 0, 0, 0]))
                    })
            }
        }
    }

    /// The addresses among `candidates` and `primary` (the node's primary ones) that serve NodePorts, in that order.
    fn select(&self, primary: &[IpAddr], candidates: &[IpAddr]) -> Vec<IpAddr> {
        // `primary` is kube-proxy's list of one /32 (/128) per primary address.
        let cidrs: Vec<(IpAddr, u8)> = match self {
            Self::Primary => primary
                .iter()
                .map(|&a| (a, if a.is_ipv4() { 32 } else { 128 }))
                .collect(),
            Self::Cidrs(c) => c.clone(),
        };
        let mut out: Vec<IpAddr> = Vec::new();
        for &addr in candidates.iter().chain(primary) {
            let family = Family::of(&addr);
            let mut of_family = cidrs
                .iter()
                .filter(|(n, _)| Family::of(n) == family)
                .peekable();
            let matched = of_family.peek().is_none()
                || of_family.any(|&(net, len)| prefix_contains(net, len, addr));
            if matched && !out.contains(&addr) {
                out.push(addr);
            }
        }
        out
    }
}

/// Builds the [`NodeContext`] for `node_name` from its Node object. The node's primary address per family comes from
/// it (the SNAT address); without a Node object (a bare manifest file) or without addresses in it,
/// `cfg.fallback_node_addresses` stand in, and an info line says so. NodePorts listen on the addresses
/// `cfg.nodeport_addresses` selects among the primary ones and `cfg.fallback_node_addresses` (the host's own
/// addresses unless `--node-address` names them; kube-proxy reads the host's interfaces the same way).
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
    let nodeport_addresses = cfg
        .nodeport_addresses
        .select(&addresses, &cfg.fallback_node_addresses);
    NodeContext {
        name: node_name.to_owned(),
        nodeport_addresses: (nodeport_addresses != addresses).then_some(nodeport_addresses),
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
/// then the first address of the other family, InternalIPs before ExternalIPs: not only "InternalIP per
/// family", as one might expect; upstream also falls back to ExternalIP, and lb follows upstream.
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
                nodeport_addresses: None,
                zone: want_zone.map(str::to_owned),
            };
            assert_eq!(got, want, "{name}");
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn nodeport_addresses_parse_as_kube_proxy_validates_them() {
        assert_eq!(
            NodePortAddresses::parse(&[]),
            Ok(NodePortAddresses::Primary)
        );
        assert_eq!(
            NodePortAddresses::parse(&strings(&["primary"])),
            Ok(NodePortAddresses::Primary)
        );
        assert_eq!(
            NodePortAddresses::parse(&strings(&["10.0.0.0/8", " fd00::/64"])),
            Ok(NodePortAddresses::Cidrs(vec![
                (ip("10.0.0.0"), 8),
                (ip("fd00::"), 64)
            ]))
        );
        for bad in [
            &["primary", "10.0.0.0/8"][..],
            &["10.0.0.1"],
            &["foo"],
            &["10.0.0.0/33"],
        ] {
            let e = NodePortAddresses::parse(&strings(bad)).expect_err("invalid");
            assert!(e.contains("--nodeport-addresses"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn nodeport_addresses_select_host_addresses_per_family() {
        // The host: two IPv4 addresses on different networks and two IPv6 ones; the Node's primary IPs are the
        // first of each family.
        let host = ["192.168.0.10", "10.20.0.10", "fd00::10", "2001:db8::10"];
        let nodes = parse(
            "
apiVersion: v1
kind: Node
metadata: {name: node-a}
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.10}
  - {type: InternalIP, address: 'fd00::10'}
---
apiVersion: v1
kind: Node
metadata: {name: v4-only}
status: {addresses: [{type: InternalIP, address: 192.168.0.10}]}
",
        )
        .nodes;
        // (node, --nodeport-addresses, NodePort addresses, localhost allowed)
        let cases: &[(&str, &[&str], &[&str], bool)] = &[
            ("node-a", &[], &["192.168.0.10", "fd00::10"], true),
            (
                "node-a",
                &["10.20.0.0/16"],
                &["10.20.0.10", "fd00::10", "2001:db8::10"],
                false,
            ),
            (
                "node-a",
                &["10.20.0.0/16", "2001:db8::/32"],
                &["10.20.0.10", "2001:db8::10"],
                false,
            ),
            ("node-a", &["0.0.0.0/0", "::/0"], &host, true),
            (
                "node-a",
                &["127.0.0.1/32", "192.168.0.0/16"],
                &["192.168.0.10", "fd00::10", "2001:db8::10"],
                true,
            ),
            (
                "node-a",
                &["172.16.0.0/12"],
                &["fd00::10", "2001:db8::10"],
                false,
            ),
            // `primary` on a node with no IPv6 primary: kube-proxy matches every IPv6 address.
            (
                "v4-only",
                &["primary"],
                &["192.168.0.10", "fd00::10", "2001:db8::10"],
                true,
            ),
        ];
        for (node, flag, want, localhost) in cases {
            let npa = NodePortAddresses::parse(&strings(flag)).expect("valid");
            let cfg = ModelConfig {
                fallback_node_addresses: host.iter().map(|a| ip(a)).collect(),
                nodeport_addresses: npa.clone(),
                ..ModelConfig::default()
            };
            let got = node_context(node, &nodes, &cfg);
            let want: Vec<IpAddr> = want.iter().map(|a| ip(a)).collect();
            assert_eq!(got.nodeport_addresses(), want.as_slice(), "{node} {flag:?}");
            assert_eq!(npa.allows_ipv4_loopback(), *localhost, "{flag:?}");
            assert_eq!(
                got.addresses[0],
                ip("192.168.0.10"),
                "the primary (SNAT) address stays: {flag:?}"
            );
        }
    }
}
