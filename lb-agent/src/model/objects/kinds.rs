//! The four kinds lb reads, reduced to the fields the model reads: the same names and nesting as the Kubernetes API
//! (so a field path in a diagnostic is the API's), every other field skipped while decoding. A field lb reads is
//! type-checked as the API's own types would check it; a field it does not read is not looked at.
//!
//! Absent required fields read as their zero value, as k8s-openapi reads them, and are left to the model's
//! validation (a port 0 is reported there, with its field).

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

use super::meta::{Name, ObjectMeta};

/// A required field as k8s-openapi reads it: absent or `null` is the zero value.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn empty_name() -> Name {
    Name::new("")
}

fn null_as_empty_name<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Name, D::Error> {
    Ok(Option::<Name>::deserialize(deserializer)?.unwrap_or_else(empty_name))
}

/// `v1` Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
    pub status: Option<ServiceStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    pub load_balancer_source_ranges: Option<Vec<String>>,
    pub internal_traffic_policy: Option<String>,
    pub external_traffic_policy: Option<String>,
    pub session_affinity: Option<String>,
    pub session_affinity_config: Option<SessionAffinityConfig>,
    pub allocate_load_balancer_node_ports: Option<bool>,
    pub health_check_node_port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: Option<String>,
    pub protocol: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub port: i32,
    pub target_port: Option<IntOrString>,
    pub node_port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SessionAffinityConfig {
    #[serde(rename = "clientIP")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    pub timeout_seconds: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct LoadBalancerStatus {
    pub ingress: Option<Vec<LoadBalancerIngress>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngress {
    pub ip: Option<String>,
    pub ip_mode: Option<String>,
}

/// `discovery.k8s.io/v1` EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub address_type: String,
    pub endpoints: Option<Vec<Endpoint>>,
    pub ports: Option<Vec<EndpointPort>>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    /// Boxed: most endpoints have none, and an endpoint slot is paid once per endpoint of the cluster.
    pub hints: Option<Box<EndpointHints>>,
    /// Interned: a cluster's endpoints run on a few nodes.
    pub node_name: Option<Name>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHints {
    pub for_zones: Option<Vec<ForZone>>,
    pub for_nodes: Option<Vec<ForNode>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ForZone {
    #[serde(default = "empty_name", deserialize_with = "null_as_empty_name")]
    pub name: Name,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ForNode {
    #[serde(default = "empty_name", deserialize_with = "null_as_empty_name")]
    pub name: Name,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub port: Option<i32>,
}

/// `v1` Node (lb watches only its own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Node {
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    pub spec: Option<NodeSpec>,
    pub status: Option<NodeStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct NodeSpec {
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct NodeStatus {
    pub addresses: Option<Vec<NodeAddress>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type", default, deserialize_with = "null_as_default")]
    pub type_: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub address: String,
}

/// `networking.k8s.io/v1` ServiceCIDR.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ServiceCIDR {
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceCIDRSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ServiceCIDRSpec {
    pub cidrs: Option<Vec<String>>,
}

/// What the sources need of every kind: its API identity and its metadata.
pub trait Object:
    Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static
{
    const KIND: &'static str;
    /// `group/version`, or `version` for the core group.
    const API_VERSION: &'static str;
    /// The resource's plural, as the API's paths name it.
    const PLURAL: &'static str;
    const NAMESPACED: bool;
    fn metadata(&self) -> &ObjectMeta;
    fn metadata_mut(&mut self) -> &mut ObjectMeta;
    /// Gives back the spare capacity decoding left in its lists (serde grows a list 4, 8, 16, ... as it reads
    /// it): the object is kept for as long as it exists in the cluster, at 10k slices that is megabytes.
    fn shrink_to_fit(&mut self) {}
}

macro_rules! object {
    ($type:ty, $kind:literal, $api_version:literal, $plural:literal, $namespaced:literal) => {
        object!(
            $type,
            $kind,
            $api_version,
            $plural,
            $namespaced,
            |_object| {}
        );
    };
    ($type:ty, $kind:literal, $api_version:literal, $plural:literal, $namespaced:literal, $shrink:expr) => {
        impl Object for $type {
            const KIND: &'static str = $kind;
            const API_VERSION: &'static str = $api_version;
            const PLURAL: &'static str = $plural;
            const NAMESPACED: bool = $namespaced;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
            fn shrink_to_fit(&mut self) {
                let shrink: fn(&mut $type) = $shrink;
                shrink(self);
            }
        }
    };
}

object!(Service, "Service", "v1", "services", true, |svc| {
    if let Some(ports) = svc.spec.as_mut().and_then(|s| s.ports.as_mut()) {
        ports.shrink_to_fit();
    }
});
object!(
    EndpointSlice,
    "EndpointSlice",
    "discovery.k8s.io/v1",
    "endpointslices",
    true,
    |slice| {
        for ep in slice.endpoints.iter_mut().flatten() {
            ep.addresses.shrink_to_fit();
        }
        if let Some(endpoints) = slice.endpoints.as_mut() {
            endpoints.shrink_to_fit();
        }
        if let Some(ports) = slice.ports.as_mut() {
            ports.shrink_to_fit();
        }
    }
);
object!(Node, "Node", "v1", "nodes", false);
object!(
    ServiceCIDR,
    "ServiceCIDR",
    "networking.k8s.io/v1",
    "servicecidrs",
    false
);
