//! The service sets every benchmark runs against: N ClusterIP Services of E endpoints each, as Kubernetes objects
//! (for lb) and as plain data (for the kube-proxy rule generators), so both sides serve exactly the same thing.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Service CIDR: 10.96.0.0/12 holds the 100k ClusterIPs of the largest per-packet run.
const SERVICE_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
/// Pod addresses of the endpoints nobody connects to: 10.128.0.0/9, one distinct address per endpoint up to
/// 8M endpoints, so lb holds as many backends as kube-proxy writes KUBE-SEP chains.
const POD_BASE: u32 = u32::from_be_bytes([10, 128, 0, 0]);
/// The node's address in every manifest (only the Node object's InternalIP: nothing is reachable there).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const NODE_NAME: &str = "bench-node";
/// The port every endpoint listens on.
pub const TARGET_PORT: u16 = 8080;
/// First NodePort handed out (kube-proxy's default range is 30000-32767; larger sets wrap onto more node IPs,
/// which only the per-packet benchmark needs and which changes nothing for it).
const NODE_PORT_BASE: u16 = 30000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn upper(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    pub fn lower(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One single-port Service and its endpoints.
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub node_port: Option<u16>,
    pub endpoints: Vec<Ipv4Addr>,
}

impl Svc {
    /// kube-proxy's ServicePortName as its comments print it: `namespace/name:port-name`.
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:p", self.name)
    }
}

pub const NAMESPACE: &str = "bench";

/// `n` TCP Services (port 80) with `endpoints` endpoints each at distinct pod addresses; with `node_ports`, each
/// also gets a NodePort.
pub fn services(n: usize, endpoints: usize, node_ports: bool) -> Vec<Svc> {
    (0..n)
        .map(|i| {
            let first = POD_BASE + (i * endpoints) as u32 + 1;
            Svc {
                name: format!("svc-{i}"),
                vip: Ipv4Addr::from(SERVICE_BASE + i as u32 + 1),
                port: 80,
                proto: Proto::Tcp,
                node_port: node_ports.then(|| NODE_PORT_BASE + (i % 2700) as u16),
                endpoints: (0..endpoints)
                    .map(|j| Ipv4Addr::from(first + j as u32))
                    .collect(),
            }
        })
        .collect()
}

/// Service CIDR and cluster (pod) CIDR, for kube-proxy's `! -s <cluster CIDR>` masquerade rule.
pub const CLUSTER_CIDR: &str = "10.128.0.0/9";

/// The Kubernetes objects for `svcs` (Service + one EndpointSlice each) and the Node, as one multi-document YAML.
/// Flow style, one object per document: quick to write and to parse at 100k objects.
pub fn manifest(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 700);
    let _ = writeln!(
        out,
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}}}\nstatus: {{addresses: [{{type: InternalIP, address: {NODE_IP}}}]}}"
    );
    for s in svcs {
        let (ty, node_port) = match s.node_port {
            Some(p) => ("NodePort", format!(", nodePort: {p}")),
            None => ("ClusterIP", String::new()),
        };
        let _ = writeln!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec: {{type: {ty}, clusterIP: {vip}, ports: [{{name: p, protocol: {proto}, port: {port}, targetPort: {TARGET_PORT}{node_port}}}]}}",
            name = s.name,
            vip = s.vip,
            proto = s.proto.upper(),
            port = s.port,
        );
        let _ = write!(
            out,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-x, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, protocol: {proto}, port: {TARGET_PORT}}}]\nendpoints: [",
            name = s.name,
            proto = s.proto.upper(),
        );
        for (k, ep) in s.endpoints.iter().enumerate() {
            let sep = if k == 0 { "" } else { ", " };
            let _ = write!(
                out,
                "{sep}{{addresses: [{ep}], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}"
            );
        }
        out.push_str("]\n");
    }
    out
}

/// The same objects as [`manifest`], as the JSON an API server stores (for the benchmarks that serve them through
/// the in-process API server).
pub struct ApiObjects {
    pub node: serde_json::Value,
    pub services: Vec<serde_json::Value>,
    /// One per Service, in the same order.
    pub slices: Vec<serde_json::Value>,
}

pub fn api_objects(svcs: &[Svc]) -> ApiObjects {
    use serde_json::json;
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE_NAME},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()}]},
    });
    let mut services = Vec::with_capacity(svcs.len());
    let mut slices = Vec::with_capacity(svcs.len());
    for s in svcs {
        let mut port = json!({"name": "p", "protocol": s.proto.upper(), "port": s.port, "targetPort": TARGET_PORT});
        if let Some(p) = s.node_port {
            port["nodePort"] = json!(p);
        }
        services.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name, "namespace": NAMESPACE},
            "spec": {
                "type": if s.node_port.is_some() { "NodePort" } else { "ClusterIP" },
                "clusterIP": s.vip.to_string(),
                "ports": [port],
            },
        }));
        let endpoints: Vec<serde_json::Value> = s
            .endpoints
            .iter()
            .map(|ep| json!({"addresses": [ep.to_string()], "conditions": {"ready": true}, "nodeName": NODE_NAME}))
            .collect();
        slices.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-x", s.name), "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": s.name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "p", "protocol": s.proto.upper(), "port": TARGET_PORT}],
            "endpoints": endpoints,
        }));
    }
    ApiObjects {
        node,
        services,
        slices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_translates_to_two_frontends_per_service_with_all_endpoints() {
        let svcs = services(3, 10, false);
        let (objects, diags) =
            lb_agent::source::manifest::parse_manifests("bench", &manifest(&svcs));
        assert!(diags.is_empty(), "diagnostics: {diags:?}");
        let cfg = lb_agent::model::ModelConfig::default();
        let node = lb_agent::model::node_context(NODE_NAME, &objects.nodes, &cfg);
        let t = lb_agent::model::translate(&objects, &node, &cfg);
        assert!(t.diagnostics.is_empty(), "diagnostics: {:?}", t.diagnostics);
        assert_eq!(
            t.state.services.len(),
            6,
            "ClusterIP: External + Internal scope"
        );
        assert!(t.state.services.values().all(|e| e.backends.len() == 10));
    }

    #[test]
    fn api_objects_are_the_manifests_objects() {
        let svcs = services(3, 10, true);
        let (from_yaml, diags) =
            lb_agent::source::manifest::parse_manifests("bench", &manifest(&svcs));
        assert!(diags.is_empty(), "diagnostics: {diags:?}");
        let api = api_objects(&svcs);
        let docs: Vec<String> = std::iter::once(&api.node)
            .chain(
                api.services
                    .iter()
                    .zip(&api.slices)
                    .flat_map(|(a, b)| [a, b]),
            )
            .map(|v| v.to_string())
            .collect();
        let (from_json, diags) =
            lb_agent::source::manifest::parse_manifests("bench.json", &docs.join("\n"));
        assert!(diags.is_empty(), "diagnostics: {diags:?}");
        assert_eq!(from_json.services, from_yaml.services);
        assert_eq!(from_json.endpoint_slices, from_yaml.endpoint_slices);
        assert_eq!(from_json.nodes, from_yaml.nodes);
    }
}
