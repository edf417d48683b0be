//! The desired datapath state: what the model computes from Kubernetes objects and the reconciler writes to the
//! maps. Plain values, independent of both Kubernetes types and map layouts, so each side is testable alone.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IANA protocol number, as the datapath stores it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
            Protocol::Sctp => lb_common::PROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            lb_common::PROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Parses a Kubernetes protocol string; Kubernetes defaults an absent protocol to TCP.
    pub fn from_k8s(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Which datapath a frontend serves (see `lb_common::SCOPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Packets from outside the node (tc/XDP).
    External,
    /// Sockets of this node's pods and processes (socket LB).
    Internal,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Scope::External => lb_common::SCOPE_EXTERNAL,
            Scope::Internal => lb_common::SCOPE_INTERNAL,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::SCOPE_EXTERNAL => Some(Scope::External),
            lb_common::SCOPE_INTERNAL => Some(Scope::Internal),
            _ => None,
        }
    }
}

/// Backend selection algorithm (docs/semantics.md rule 11).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    #[default]
    Maglev,
    Random,
}

impl Algorithm {
    pub fn number(self) -> u8 {
        match self {
            Algorithm::Maglev => lb_common::ALG_MAGLEV,
            Algorithm::Random => lb_common::ALG_RANDOM,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::ALG_MAGLEV => Some(Algorithm::Maglev),
            lb_common::ALG_RANDOM => Some(Algorithm::Random),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Maglev => "maglev",
            Algorithm::Random => "random",
        })
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "maglev" => Ok(Algorithm::Maglev),
            "random" => Ok(Algorithm::Random),
            other => Err(format!(
                "unknown algorithm {other:?} (expected maglev or random)"
            )),
        }
    }
}

/// Which kind of VIP a frontend is (docs/semantics.md rule 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VipKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

/// A virtual service as the datapath matches it: (VIP, port, protocol, scope).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    pub scope: Scope,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
        }
    }
}

/// One backend of a frontend: an endpoint address and the target port (the protocol is the frontend's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// Relative Maglev weight; 1 for every Kubernetes endpoint today.
    pub weight: u16,
    /// The endpoint's `nodeName` is this node (rule 6: a remote backend reached from outside needs SNAT).
    pub local: bool,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// Names a Service port: `namespace/name:port-name` (kube-proxy's `ServicePortName`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's `name`; empty for a single unnamed port.
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// What one frontend should do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    pub service: ServicePortName,
    pub kind: VipKind,
    pub algorithm: Algorithm,
    /// ClientIP affinity timeout in seconds, `None` without affinity.
    pub affinity_timeout: Option<u32>,
    /// Usable backends, sorted and without duplicates. Empty means reject, or drop when `drop_if_empty`.
    pub backends: Vec<Backend>,
    /// Endpoints exist but none may serve this scope (Local policy without a local endpoint): drop, not reject.
    pub drop_if_empty: bool,
    /// Allowed source prefixes (rule 9), only on External LoadBalancer frontends of Services with
    /// `loadBalancerSourceRanges`; empty = every source.
    pub source_ranges: Vec<(IpAddr, u8)>,
}

/// The whole desired state of one node's datapath.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, ServiceEntry>,
    /// This node's own networks, for the per-packet datapath.
    pub node: NodeNets,
    /// Every address an EndpointSlice lists, whatever its conditions. A backend that leaves a service while still
    /// listed is terminating and keeps its TCP connections; one no longer listed is gone, and the sockets the
    /// socket LB connected to it are ended (`datapath::sock_destroy`).
    pub endpoint_addresses: std::collections::BTreeSet<IpAddr>,
    /// The cluster's service CIDRs (every ServiceCIDR object's `spec.cidrs`, else the configured fallback), as
    /// (network, prefix length): an address inside one that no Service holds is unallocated and drops (rule 8).
    pub service_cidrs: Vec<(IpAddr, u8)>,
}

/// What the per-packet datapath must know about this node: which sources are its own pods or itself (they take the
/// Internal frontends, kube-proxy's local-traffic detector, rule 5) and which address replaces a client's when a
/// remote backend needs SNAT (rule 6).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeNets {
    /// The node's addresses (primary first per family; the first of each family is the SNAT address).
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs` of this node's Node object.
    pub pod_cidrs: Vec<(IpAddr, u8)>,
}

impl NodeNets {
    /// The SNAT address of a family: the node's first address of that family.
    pub fn snat_address(&self, v4: bool) -> Option<IpAddr> {
        self.addresses.iter().copied().find(|a| a.is_ipv4() == v4)
    }
}
