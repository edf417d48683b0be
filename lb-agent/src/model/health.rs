//! What the per-Service health check servers report (kube-proxy's `healthCheckNodePort` servers, pkg/proxy/healthcheck/
//! service_health.go): for every LoadBalancer Service with `externalTrafficPolicy: Local`, the port the cloud load
//! balancer probes and how many endpoints of the Service are ready on this node. The load balancer then sends traffic
//! only to nodes that answer 200, so a node without a local endpoint is taken out instead of dropping.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::Serialize;

use super::endpoint_slices::SliceIndex;
use super::ip::Family;
use super::objects::Service;
use super::service_ports::ServiceInfo;

/// One health check server's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// `spec.healthCheckNodePort`.
    pub health_check_node_port: u16,
    /// Distinct local ready endpoints (address and port) over all the Service's ports and families.
    pub local_endpoints: usize,
}

/// The health check of one proxied Service, when it needs one: kube-proxy's `apiservice.NeedsHealthCheck` (type
/// LoadBalancer with a Local external policy) and a non-zero `healthCheckNodePort` (the API server allocates one for
/// exactly these Services). The count mirrors `EndpointsMap.LocalReadyEndpoints`: local and ready (a terminating
/// endpoint is not ready), each `ip:port` once.
pub(crate) fn service_health(
    svc: &Service,
    info: &ServiceInfo,
    slices: &SliceIndex,
) -> Option<ServiceHealth> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer") || !info.external_policy_local {
        return None;
    }
    let port = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)?;
    let mut local: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
    for family in Family::BOTH {
        if info.cluster_ip(family).is_none() {
            continue;
        }
        for p in &info.ports {
            for ep in slices.endpoints(&info.namespace, &info.name, family, &p.name, p.protocol) {
                if ep.is_local && ep.ready {
                    local.insert((ep.addr, ep.port));
                }
            }
        }
    }
    Some(ServiceHealth {
        namespace: info.namespace.clone(),
        name: info.name.clone(),
        health_check_node_port: port,
        local_endpoints: local.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    fn lb_service(policy: &str, endpoints: &str) -> String {
        format!(
            "
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalTrafficPolicy: {policy}
  healthCheckNodePort: 32000
  ports: [{{name: http, port: 80, nodePort: 30080}}, {{name: https, port: 443, nodePort: 30443}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: https, port: 8443}}]
endpoints:
{endpoints}"
        )
    }

    #[test]
    fn local_lb_services_report_local_ready_endpoints() {
        let eps = "\
- {addresses: [10.0.1.1], nodeName: worker-1}
- {addresses: [10.0.1.2], nodeName: worker-1, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.2.1], nodeName: worker-2}
";
        let t = translate_yaml(&lb_service("Local", eps), &worker());
        assert_eq!(t.health.len(), 1);
        let h = &t.health[0];
        assert_eq!((h.namespace.as_str(), h.name.as_str()), ("ns", "web"));
        assert_eq!(h.health_check_node_port, 32000);
        // 10.0.1.1 on both ports (kube-proxy counts ip:port); the terminating one and the remote one do not count.
        assert_eq!(h.local_endpoints, 2);
    }

    #[test]
    fn no_local_endpoint_reports_zero() {
        let t = translate_yaml(
            &lb_service("Local", "- {addresses: [10.0.2.1], nodeName: worker-2}\n"),
            &worker(),
        );
        assert_eq!(t.health[0].local_endpoints, 0);
    }

    #[test]
    fn cluster_policy_needs_no_health_check() {
        let t = translate_yaml(
            &lb_service("Cluster", "- {addresses: [10.0.1.1], nodeName: worker-1}\n"),
            &worker(),
        );
        assert!(t.health.is_empty(), "{:?}", t.health);
    }
}
