//! The pure translation from Kubernetes objects to the datapath's desired state (SEMANTICS.md rules 1-8, 10, 11, 13,
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
//! - `service_cidrs`: the ServiceCIDRs, whose unallocated addresses drop (rule 8).
//!
//! Nothing here touches the system or logs above `debug` (except [`node_context`] saying it fell back to the
//! given addresses): problems come back as [`Diagnostic`]s for the caller to report, so the same input always gives
//! the same output.
//!
//! Where SEMANTICS.md and kube-proxy differ, kube-proxy wins; each case is explained where it is implemented:
//! serving nil reads as true (`endpoint_slices`), topology hints apply whenever present and node hints come first
//! (`endpoints`), the Node's ExternalIP is a NodePort address when it has no InternalIP (`node`).

mod endpoint_slices;
mod endpoints;
mod explain;
mod frontends;
mod health;
mod ip;
mod node;
mod service_cidrs;
mod service_ports;
#[cfg(test)]
mod test_support;

use std::collections::BTreeMap;
use std::net::IpAddr;

pub use endpoints::Eligibility;
pub use explain::{
    EndpointExplanation, FrontendExplanation, PortExplanation, ServiceExplanation, explain,
};
pub use health::ServiceHealth;
pub use node::node_context;
pub use service_cidrs::parse_service_cidr;

use crate::manifest::{ClusterObjects, Diagnostic};
use crate::state::{Algorithm, DesiredState};

/// What the model knows about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// The Node name; endpoints whose `nodeName` equals it are local (an empty name makes none local).
    pub name: String,
    /// The node's primary addresses, where NodePorts listen: the Node object's InternalIP per family, else the
    /// addresses the caller gave (flag or host addresses).
    pub addresses: Vec<IpAddr>,
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
    /// NodePort addresses to use when no Node object for this node is known.
    pub fallback_node_addresses: Vec<IpAddr>,
    /// Service CIDRs to use when there is no ServiceCIDR object (`--service-cidrs`).
    pub fallback_service_cidrs: Vec<(IpAddr, u8)>,
    /// Serve `localhost:nodePort` to the host's own processes (`--localhost-nodeports`, rule 14).
    pub localhost_nodeports: bool,
}

/// The translation's result: the desired state and what had to be skipped on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub state: DesiredState,
    pub diagnostics: Vec<Diagnostic>,
    /// The health check servers this node runs (`healthCheckNodePort` of Local LoadBalancer Services).
    pub health: Vec<ServiceHealth>,
}

/// Computes this node's desired datapath state from the cluster objects. Pure: same input, same output.
pub fn translate(objects: &ClusterObjects, node: &NodeContext, cfg: &ModelConfig) -> Translation {
    let mut diagnostics = Vec::new();
    let slices =
        endpoint_slices::SliceIndex::build(&objects.endpoint_slices, &node.name, &mut diagnostics);

    // Services in namespace/name order, so frontend conflicts always resolve the same way. A Service given twice
    // (two manifests, or a file edited into a duplicate) is taken from its last definition, as `kubectl apply`
    // of the files in order would leave it.
    let mut services = BTreeMap::new();
    for svc in &objects.services {
        let namespace = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| crate::manifest::DEFAULT_NAMESPACE.to_owned());
        let name = svc.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            // Reported (and skipped) by the validation; nothing to key it by.
            let skipped = service_ports::service_info(svc, cfg, &mut diagnostics);
            debug_assert!(skipped.is_none(), "an unnamed Service passed validation");
            continue;
        }
        if services
            .insert((namespace.clone(), name.clone()), svc)
            .is_some()
        {
            diagnostics.push(Diagnostic::new(
                crate::manifest::object_label("Service", Some(&namespace), Some(&name)),
                None,
                "defined more than once; the last definition is used",
            ));
        }
    }

    let mut state = frontends::StateBuilder::default();
    state.localhost_nodeports = cfg.localhost_nodeports;
    let mut health = Vec::new();
    for svc in services.values() {
        if let Some(info) = service_ports::service_info(svc, cfg, &mut diagnostics) {
            state.add_service(&info, &slices, node);
            health.extend(health::service_health(svc, &info, &slices));
        }
    }
    let (mut state, conflicts) = state.finish();
    state.node = node::node_nets(&objects.nodes, node);
    state.endpoint_addresses = endpoint_slices::listed_addresses(&objects.endpoint_slices);
    state.service_cidrs = service_cidrs::service_cidrs(objects, cfg, &mut diagnostics);
    diagnostics.extend(conflicts);
    Translation {
        state,
        diagnostics,
        health,
    }
}
