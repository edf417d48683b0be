//! A cloud provider's service controller (`k8s.io/cloud-provider/controllers/service`) for a cloud whose load
//! balancers pass packets through to the nodes with the LoadBalancer IP as their destination, as GCE's network load
//! balancers do: a `type: LoadBalancer` Service (without a `loadBalancerClass`) gets an address from the pool in
//! `status.loadBalancer.ingress` (`ipMode: VIP`); `spec.loadBalancerIP`, when set and inside the pool, is honoured.
//! Leaving the type releases it and clears the status. What the cloud does on the nodes with the address (GCE's guest
//! agent adds it as a local route on every node) is the cluster harness's business: [`LbChange`] tells it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus};

use super::ClusterConfig;

/// A load balancer address taken into use or released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LbChange {
    Added(IpAddr),
    Removed(IpAddr),
}

/// The ingress addresses a Service's status lists.
pub fn ingress_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// The Service as the controller leaves it (`None`: nothing to change) and the address changes to act on.
/// `taken` holds the addresses of every other Service.
pub fn reconcile(
    cfg: &ClusterConfig,
    taken: &BTreeSet<IpAddr>,
    svc: &Service,
) -> (Option<Service>, Vec<LbChange>) {
    let spec = svc.spec.as_ref();
    let wants = spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
        && spec.and_then(|s| s.load_balancer_class.as_ref()).is_none();
    let current = ingress_ips(svc);
    if !wants {
        if current.is_empty() {
            return (None, Vec::new());
        }
        let mut out = svc.clone();
        out.status = Some(ServiceStatus::default());
        return (
            Some(out),
            current.into_iter().map(LbChange::Removed).collect(),
        );
    }
    if !current.is_empty() {
        return (None, Vec::new());
    }
    let requested = spec
        .and_then(|s| s.load_balancer_ip.as_deref())
        .and_then(|s| s.parse::<Ipv4Addr>().ok())
        .filter(|ip| cfg.load_balancer_pool.contains(IpAddr::V4(*ip)))
        .filter(|ip| !taken.contains(&IpAddr::V4(*ip)));
    let Some(ip) = requested.or_else(|| {
        (1..cfg.load_balancer_pool.size().saturating_sub(1))
            .map(|i| cfg.load_balancer_pool.nth(i))
            .find(|ip| !taken.contains(ip))
            .and_then(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
    }) else {
        return (None, Vec::new());
    };
    let mut out = svc.clone();
    out.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                ip: Some(ip.to_string()),
                ip_mode: Some("VIP".into()),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    });
    (Some(out), vec![LbChange::Added(IpAddr::V4(ip))])
}
