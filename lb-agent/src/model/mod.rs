//! The pure translation from Kubernetes objects to the datapath's desired state (docs/semantics.md rules 1-8, 10, 11, 13,
//! 14; rule 9's source ranges are enforced per packet by the datapath).
//!
//! It follows kube-proxy's own pipeline, one module per step, each named after the upstream code it mirrors:
//! - `service_ports`: a Service to its proxied ports and VIPs (`ServiceChangeTracker`, `newBaseServiceInfo`),
//!   skipping what the API server would have rejected;
//! - `endpoint_slices`: the slices of a Service to one endpoint list per service port (`EndpointSliceCache`);
//! - `endpoints`: which endpoints each traffic policy may use (`CategorizeEndpoints`, pkg/proxy/topology.go);
//! - `frontends`: one [`ServiceEntry`](crate::state::ServiceEntry) per VIP, port and scope (what the nftables
//!   proxier's `syncProxyRules` writes into its maps);
//! - `node`: this node's addresses and zone;
//! - `service_cidrs`: the ServiceCIDRs, whose unallocated addresses drop (rule 8);
//! - `translator`: the same translation kept across syncs, rebuilding only the Services a change touches;
//! - `changes`: what a translation changed per Service (backends and frontends gained and lost), for the log;
//! - `objects`: the vocabulary: the cluster objects the model reads (from any `crate::source`) and the
//!   [`Diagnostic`]s it reports.
//!
//! Nothing here touches the system or logs above `debug` (except [`node_context`] saying it fell back to the
//! given addresses): problems come back as [`Diagnostic`]s for the caller to report, so the same input always gives
//! the same output.
//!
//! Where kube-proxy differs from the API documentation, lb does as kube-proxy; each case is explained where it is
//! implemented:
//! serving nil reads as true (`endpoint_slices`), topology hints apply whenever present and node hints come first
//! (`endpoints`), the Node's ExternalIP is a NodePort address when it has no InternalIP (`node`).

mod changes;
mod endpoint_slices;
mod endpoints;
mod explain;
mod frontends;
mod health;
mod ip;
mod node;
pub mod objects;
mod service_cidrs;
mod service_ports;
#[cfg(test)]
mod test_support;
mod translator;

use std::net::IpAddr;

pub use changes::{ChangeKind, ServiceChange, list as change_list};
pub use endpoints::Eligibility;
pub use explain::{
    EndpointExplanation, FrontendExplanation, PortExplanation, ServiceExplanation, explain,
};
pub use health::ServiceHealth;
pub use node::{NodePortAddresses, node_context};
pub use objects::{
    ClusterObjects, DEFAULT_NAMESPACE, Diagnostic, EndpointSlice, Name, Node, Object, ObjectMeta,
    Service, ServiceCIDR, object_label,
};
pub use service_cidrs::parse_service_cidr;
pub use translator::{ChangeCounts, ObjectRef, Translator};

use crate::state::{Algorithm, DesiredState};

/// What the model knows about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// The Node name; endpoints whose `nodeName` equals it are local (an empty name makes none local).
    pub name: String,
    /// The node's primary addresses (the first of a family is its SNAT address): the Node object's InternalIP per
    /// family, else the addresses the caller gave (flag or host addresses).
    pub addresses: Vec<IpAddr>,
    /// Where NodePorts listen when not on `addresses` (`--nodeport-addresses`, see [`NodePortAddresses`]).
    pub nodeport_addresses: Option<Vec<IpAddr>>,
    /// The node's `topology.kubernetes.io/zone` label, for topology hints.
    pub zone: Option<String>,
}

/// Agent settings that change the translation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// Backend selection for Services without an `lb.io/algorithm` annotation.
    pub default_algorithm: Algorithm,
    /// kube-proxy's `--service-proxy-name` convention: `None` proxies only Services without the
    /// `service.kubernetes.io/service-proxy-name` label; `Some(name)` proxies only Services whose label equals it.
    pub service_proxy_name: Option<String>,
    /// The node's addresses when no Node object for this node is known, and the candidates
    /// `--nodeport-addresses` selects from.
    pub fallback_node_addresses: Vec<IpAddr>,
    /// kube-proxy's `--nodeport-addresses`.
    pub nodeport_addresses: NodePortAddresses,
    /// Service CIDRs to use when there is no ServiceCIDR object (`--service-cidrs`).
    pub fallback_service_cidrs: Vec<(IpAddr, u8)>,
    /// Serve `localhost:nodePort` to the host's own processes (`--localhost-nodeports`, rule 14).
    pub localhost_nodeports: bool,
}

impl NodeContext {
    /// The addresses NodePorts listen on.
    pub fn nodeport_addresses(&self) -> &[IpAddr] {
        self.nodeport_addresses
            .as_deref()
            .unwrap_or(&self.addresses)
    }
}

/// The translation's result: the desired state and what had to be skipped on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub state: DesiredState,
    pub diagnostics: Vec<Diagnostic>,
    /// The health check servers this node runs (`healthCheckNodePort` of Local LoadBalancer Services).
    pub health: Vec<ServiceHealth>,
}

/// Computes this node's desired datapath state from the cluster objects. Pure: same input, same output. The agent
/// keeps a [`Translator`] instead, which gives the same result for a fraction of the work per change.
pub fn translate(objects: &ClusterObjects, node: &NodeContext, cfg: &ModelConfig) -> Translation {
    let mut translator = Translator::new(cfg.clone(), node.clone());
    translator.replace_all(objects.clone());
    translator.translate();
    translator.into_translation()
}
