//! Service objects as the e2e tests' jig builds them (`e2eservice.TestJig`): a selector `app=<name>`, ports, and
//! whatever a case changes; the API server fills in the rest.

use serde_json::{Value, json};

/// A Service under construction.
#[derive(Clone, Debug)]
pub struct ServiceBuilder {
    value: Value,
}

/// A ClusterIP Service `namespace/name` selecting `app=<app>`, without ports yet.
pub fn service(namespace: &str, name: &str, app: &str) -> ServiceBuilder {
    ServiceBuilder {
        value: json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": app}, "ports": []},
        }),
    }
}

impl ServiceBuilder {
    /// A port `port` -> `target` (numeric) of `protocol`, named `name` (empty: unnamed).
    pub fn port(mut self, name: &str, port: u16, target: u16, protocol: &str) -> Self {
        let mut p = json!({"port": port, "targetPort": target, "protocol": protocol});
        if !name.is_empty() {
            p["name"] = json!(name);
        }
        self.push_port(p);
        self
    }

    /// A port whose target is a named container port.
    pub fn named_port(mut self, name: &str, port: u16, target: &str, protocol: &str) -> Self {
        self.push_port(
            json!({"name": name, "port": port, "targetPort": target, "protocol": protocol}),
        );
        self
    }

    fn push_port(&mut self, p: Value) {
        if let Some(ports) = self.value["spec"]["ports"].as_array_mut() {
            ports.push(p);
        }
    }

    /// Sets `spec.<key>`.
    pub fn spec(mut self, key: &str, value: Value) -> Self {
        self.value["spec"][key] = value;
        self
    }

    pub fn type_(self, t: &str) -> Self {
        self.spec("type", json!(t))
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.value["metadata"]["labels"][key] = json!(value);
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.value["metadata"]["annotations"][key] = json!(value);
        self
    }

    /// No selector: the endpoints are whatever slices someone else writes.
    pub fn without_selector(mut self) -> Self {
        if let Some(spec) = self.value["spec"].as_object_mut() {
            spec.remove("selector");
        }
        self
    }

    pub fn build(self) -> Value {
        self.value
    }
}

/// `spec.clusterIP` of a stored Service.
pub fn cluster_ip(svc: &Value) -> String {
    svc.pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// `spec.ports[i].nodePort` of a stored Service (0 when none).
pub fn node_port(svc: &Value, i: usize) -> u16 {
    svc.pointer(&format!("/spec/ports/{i}/nodePort"))
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(0)
}

/// `spec.healthCheckNodePort` of a stored Service (0 when none).
pub fn health_check_node_port(svc: &Value) -> u16 {
    svc.pointer("/spec/healthCheckNodePort")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(0)
}

/// The first `status.loadBalancer.ingress[].ip` of a stored Service.
pub fn ingress_ip(svc: &Value) -> Option<String> {
    svc.pointer("/status/loadBalancer/ingress/0/ip")
        .and_then(Value::as_str)
        .map(str::to_owned)
}
