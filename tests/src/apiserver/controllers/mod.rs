//! What kube-apiserver and kube-controller-manager add to the stored objects, for [`super::ApiServer::start_cluster`]:
//! Service admission (defaulting, ClusterIP and NodePort allocation, validation: `admission.rs`), the EndpointSlice
//! controller following Pods (`endpointslice.rs`) and a cloud provider's load balancer controller (`cloud.rs`).
//!
//! They run synchronously after each write, under the store's lock: every change they make is its own event with
//! its own resourceVersion, as the real controllers' writes are, but a test never waits for a controller to catch up.
//! The pure parts take typed objects (k8s-openapi) and are unit-tested here; `reconcile` turns them into writes.

pub mod admission;
pub mod cloud;
pub mod endpointslice;

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use super::store::{Resource, Store};
use cloud::LbChange;

/// An address range, `10.96.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s}: not a CIDR"))?;
        let addr: IpAddr = a.parse().map_err(|e| format!("{s}: {e}"))?;
        let len: u8 = l.parse().map_err(|e| format!("{s}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("{s}: prefix longer than {max}"));
        }
        Ok(Cidr { addr, len })
    }

    fn bits(&self) -> u32 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    fn base(&self) -> u128 {
        let v = match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let host = self.bits() - u32::from(self.len);
        if host >= 128 { 0 } else { (v >> host) << host }
    }

    /// How many addresses it holds (capped for huge IPv6 ranges).
    pub fn size(&self) -> u128 {
        let host = self.bits() - u32::from(self.len);
        if host >= 32 { 1 << 32 } else { 1u128 << host }
    }

    /// The address `i` places above the range's first.
    pub fn nth(&self, i: u128) -> IpAddr {
        let v = self.base() + i;
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4((v as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(v.into()),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let v = match ip {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let host = self.bits() - u32::from(self.len);
        if host >= 128 {
            return true;
        }
        (v >> host) << host == self.base()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.nth(0), self.len)
    }
}

/// The cluster's ranges, as kube-apiserver's `--service-cluster-ip-range` and `--service-node-port-range` and a cloud
/// provider's address pool set them.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub service_cidrs: Vec<Cidr>,
    pub node_port_range: RangeInclusive<u16>,
    pub load_balancer_pool: Cidr,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            service_cidrs: vec![
                Cidr::parse("10.96.0.0/16").unwrap_or_else(|_| Cidr {
                    addr: IpAddr::from([10, 96, 0, 0]),
                    len: 16,
                }),
                Cidr::parse("fd00:10:96::/108").unwrap_or_else(|_| Cidr {
                    addr: IpAddr::from([0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0]),
                    len: 108,
                }),
            ],
            node_port_range: 30000..=32767,
            load_balancer_pool: Cidr {
                addr: IpAddr::from([203, 0, 113, 0]),
                len: 24,
            },
        }
    }
}

impl ClusterConfig {
    fn has_family(&self, family: &str) -> bool {
        self.service_cidrs
            .iter()
            .any(|c| c.addr.is_ipv4() == (family == "IPv4"))
    }
}

/// What a write touched, for the controllers to follow.
#[derive(Clone, Debug)]
pub enum Trigger {
    /// One Service (created, changed or deleted).
    Service { namespace: String, name: String },
    /// Pods of a namespace changed: every Service there may select them.
    Namespace(String),
    /// Nodes changed (zones): every Service.
    All,
}

impl Trigger {
    /// What writing an object of `resource` (as it was and as it is) triggers.
    pub fn of(resource: Resource, old: Option<&Value>, new: Option<&Value>) -> Option<Trigger> {
        let obj = new.or(old)?;
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        match resource {
            Resource::Services => Some(Trigger::Service {
                namespace: ns,
                name: obj.pointer("/metadata/name")?.as_str()?.to_owned(),
            }),
            Resource::Pods => Some(Trigger::Namespace(ns)),
            Resource::Nodes => Some(Trigger::All),
            // A managed slice deleted or edited by hand is put back.
            Resource::EndpointSlices => {
                let slice: EndpointSlice = serde_json::from_value(obj.clone()).ok()?;
                if !endpointslice::is_managed(&slice) {
                    return None;
                }
                Some(Trigger::Service {
                    namespace: ns,
                    name: endpointslice::service_of(&slice)?.to_owned(),
                })
            }
            Resource::ServiceCidrs => None,
        }
    }
}

/// One write the controllers want.
#[derive(Clone, Debug)]
pub enum Write {
    Upsert(Value),
    Delete(Resource, String, String),
}

/// The controllers' state across writes.
#[derive(Debug, Default)]
pub struct Controllers {
    pub config: ClusterConfig,
    alloc: admission::Allocations,
}

impl Controllers {
    pub fn new(config: ClusterConfig) -> Controllers {
        Controllers {
            config,
            alloc: admission::Allocations::default(),
        }
    }

    /// Admission of an object about to be stored (`old`: the stored version on update): Services are defaulted,
    /// allocated and validated; other kinds pass.
    pub fn admit(
        &mut self,
        store: &Store,
        old: Option<&Value>,
        new: Value,
    ) -> Result<Value, String> {
        if new.get("kind").and_then(Value::as_str) != Some("Service") {
            return Ok(new);
        }
        let svc: Service = serde_json::from_value(new)
            .map_err(|e| format!("BadRequest: not a valid Service: {e}"))?;
        let old: Option<Service> = old.and_then(|o| serde_json::from_value(o.clone()).ok());
        let svc =
            admission::admit_service(&self.config, &mut self.alloc, store, old.as_ref(), svc)?;
        serde_json::to_value(svc).map_err(|e| e.to_string())
    }

    /// The controllers' writes after a change, and the load balancer addresses taken or released.
    pub fn reconcile(&mut self, store: &Store, trigger: &Trigger) -> (Vec<Write>, Vec<LbChange>) {
        let services: Vec<(String, String)> = match trigger {
            Trigger::Service { namespace, name } => vec![(namespace.clone(), name.clone())],
            Trigger::Namespace(ns) => keys(store, Resource::Services)
                .into_iter()
                .filter(|(n, _)| n == ns)
                .collect(),
            Trigger::All => keys(store, Resource::Services),
        };
        let pods: Vec<Pod> = typed(store, Resource::Pods);
        let nodes: Vec<Node> = typed(store, Resource::Nodes);
        let slices: Vec<EndpointSlice> = typed(store, Resource::EndpointSlices);
        let mut writes = Vec::new();
        let mut changes = Vec::new();
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        for (ns, name) in services {
            let svc: Option<Service> = store
                .get(Resource::Services, &ns, &name)
                .and_then(|v| serde_json::from_value(v.clone()).ok());
            let desired = svc
                .as_ref()
                .map(|s| endpointslice::desired_slices(s, &pods, &nodes))
                .unwrap_or_default();
            let existing: Vec<&EndpointSlice> = slices
                .iter()
                .filter(|s| s.metadata.namespace.as_deref() == Some(ns.as_str()))
                .filter(|s| endpointslice::is_managed(s))
                .filter(|s| endpointslice::service_of(s) == Some(name.as_str()))
                .collect();
            for mut d in desired.iter().cloned() {
                let current = existing.iter().find(|e| e.metadata.name == d.metadata.name);
                if current.is_some_and(|c| same_slice(c, &d)) {
                    continue;
                }
                d.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(endpointslice::ANNOTATION_TRIGGER_TIME.into(), now.clone());
                if let Ok(v) = serde_json::to_value(&d) {
                    writes.push(Write::Upsert(v));
                }
            }
            for e in existing {
                if !desired.iter().any(|d| d.metadata.name == e.metadata.name) {
                    writes.push(Write::Delete(
                        Resource::EndpointSlices,
                        ns.clone(),
                        e.metadata.name.clone().unwrap_or_default(),
                    ));
                }
            }
            if let Some(svc) = svc {
                let taken: BTreeSet<IpAddr> = typed::<Service>(store, Resource::Services)
                    .iter()
                    .filter(|s| s.metadata.uid != svc.metadata.uid)
                    .flat_map(cloud::ingress_ips)
                    .collect();
                let (updated, lb) = cloud::reconcile(&self.config, &taken, &svc);
                if let Some(v) = updated.and_then(|u| serde_json::to_value(u).ok()) {
                    writes.push(Write::Upsert(v));
                }
                changes.extend(lb);
            }
        }
        (writes, changes)
    }

    /// The load balancer addresses a deleted Service held.
    pub fn released(&self, deleted: &Value) -> Vec<LbChange> {
        serde_json::from_value::<Service>(deleted.clone())
            .map(|s| {
                cloud::ingress_ips(&s)
                    .into_iter()
                    .map(LbChange::Removed)
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn keys(store: &Store, resource: Resource) -> Vec<(String, String)> {
    store
        .all(resource)
        .filter_map(|v| {
            Some((
                v.pointer("/metadata/namespace")?.as_str()?.to_owned(),
                v.pointer("/metadata/name")?.as_str()?.to_owned(),
            ))
        })
        .collect()
}

fn typed<T: serde::de::DeserializeOwned>(store: &Store, resource: Resource) -> Vec<T> {
    store
        .all(resource)
        .filter_map(|v| serde_json::from_value(v.clone()).ok())
        .collect()
}

/// Whether a stored slice already says what the controller wants (labels, address type, endpoints, ports).
fn same_slice(a: &EndpointSlice, b: &EndpointSlice) -> bool {
    a.metadata.labels == b.metadata.labels
        && a.address_type == b.address_type
        && a.endpoints.clone().unwrap_or_default() == b.endpoints.clone().unwrap_or_default()
        && a.ports.clone().unwrap_or_default() == b.ports.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_enumerate_and_contain() {
        let c = Cidr::parse("10.96.0.0/16").expect("cidr");
        assert_eq!(c.nth(10).to_string(), "10.96.0.10");
        assert!(c.contains("10.96.255.1".parse().expect("ip")));
        assert!(!c.contains("10.97.0.1".parse().expect("ip")));
        let c6 = Cidr::parse("fd00:10:96::/108").expect("cidr");
        assert_eq!(c6.nth(10).to_string(), "fd00:10:96::a");
        assert_eq!(c6.to_string(), "fd00:10:96::/108");
    }
}
