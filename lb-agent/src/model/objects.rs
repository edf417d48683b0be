//! The model's input and what it reports back: the cluster objects (from any source) and the diagnostics of what it
//! had to skip. Sources (`crate::source`) produce these; the model consumes them and knows nothing of YAML or watches.
//!
//! The objects are lb's own compact types ([`kinds`]), not k8s-openapi's: only the fields the model reads, decoded
//! straight from the API server's JSON or a manifest, with repeated names interned ([`meta`]). An object is shared
//! (`Arc`) between the source that keeps it and the translator that reads it, never copied.

mod kinds;
mod meta;

use std::fmt;
use std::sync::Arc;

pub use kinds::{
    ClientIpConfig, Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
    ForNode, ForZone, LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeSpec,
    NodeStatus, Object, Service, ServiceCIDR, ServiceCIDRSpec, ServicePort, ServiceSpec,
    ServiceStatus, SessionAffinityConfig,
};
pub use meta::{
    ANNOTATION_ALGORITHM, ANNOTATION_LAST_CHANGE_TRIGGER_TIME, Annotations, KEPT_ANNOTATIONS,
    KEPT_LABELS, LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME, LABEL_TOPOLOGY_ZONE,
    Labels, Name, ObjectMeta,
};

/// The objects the model reads, in the order they were found.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
    /// `networking.k8s.io/v1` ServiceCIDRs (cluster-scoped): the ranges ClusterIPs are allocated from.
    pub service_cidrs: Vec<Arc<ServiceCIDR>>,
}

impl ClusterObjects {
    /// Appends every object of `other`, keeping the order (later files after earlier ones).
    pub fn extend(&mut self, other: ClusterObjects) {
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.nodes.extend(other.nodes);
        self.service_cidrs.extend(other.service_cidrs);
    }
}

/// A problem with one object or document that was skipped (or partly skipped) instead of failing the whole input.
/// The caller decides how loudly to report it (the agent logs each one as a warning).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// What the problem is in: `Service default/web`, or `document 3 of demo.yaml` when no object could be read.
    pub object: String,
    /// The field path inside the object, e.g. `spec.ports[0].port`, when one field is to blame.
    pub field: Option<String>,
    pub message: String,
}

impl Diagnostic {
    pub fn new(
        object: impl Into<String>,
        field: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            object: object.into(),
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {}: {}", self.object, field, self.message),
            None => write!(f, "{}: {}", self.object, self.message),
        }
    }
}

/// Names an object as diagnostics and logs show it: `Service default/web`, `Node worker-1`.
pub fn object_label(kind: &str, namespace: Option<&str>, name: Option<&str>) -> String {
    let name = name.filter(|n| !n.is_empty()).unwrap_or("(unnamed)");
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The namespace Kubernetes gives a namespaced object written without one (`kubectl apply` in the default context).
pub const DEFAULT_NAMESPACE: &str = "default";
