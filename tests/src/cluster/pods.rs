//! Pods: a network namespace on its node's bridge (or the node's own, for hostNetwork), an optional `lb-probe serve`
//! answering with the pod's name, and the Pod object the kubelet would report (IP, readiness, termination).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Cluster;
use crate::apiserver::Resource;
use crate::process::{Child, Cmd};
use crate::{NetNs, Probe, ProbeLine, Veth};

const SERVE_READY: Duration = Duration::from_secs(10);

/// What to run: a pod named `name` in namespace `namespace` on node `node`, labelled `labels`, serving TCP and UDP
/// `ports` (each a container port: name, number, protocol) with `lb-probe serve --id <name>`.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub labels: Vec<(String, String)>,
    /// (name, containerPort, protocol `TCP` / `UDP`); the server listens on each.
    pub ports: Vec<(String, u16, String)>,
    /// The Ready condition the kubelet reports once the server listens.
    pub ready: bool,
    pub host_network: bool,
}

impl PodSpec {
    /// A pod serving `ports` (TCP, unnamed) with labels `app=<app>`.
    pub fn web(namespace: &str, name: &str, node: usize, app: &str, tcp: &[u16]) -> PodSpec {
        PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            node,
            labels: vec![("app".into(), app.into())],
            ports: tcp
                .iter()
                .map(|p| (String::new(), *p, "TCP".to_owned()))
                .collect(),
            ready: true,
            host_network: false,
        }
    }

    /// A client pod (no server, no labels), as upstream's exec and pause pods.
    pub fn exec(namespace: &str, name: &str, node: usize) -> PodSpec {
        PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            node,
            labels: Vec::new(),
            ports: Vec::new(),
            ready: true,
            host_network: false,
        }
    }

    pub fn with_port(mut self, name: &str, port: u16, protocol: &str) -> PodSpec {
        self.ports.push((name.into(), port, protocol.into()));
        self
    }

    pub fn labelled(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.push((key.into(), value.into()));
        self
    }

    pub fn unready(mut self) -> PodSpec {
        self.ready = false;
        self
    }

    pub fn host_network(mut self) -> PodSpec {
        self.host_network = true;
        self
    }
}

/// A pod of the cluster, as the cases name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    pub host_network: bool,
}

/// What the cluster keeps per pod. Field order is drop order: the server before its namespace.
struct Running {
    server: Option<Child>,
    /// Held for its `Drop`, which deletes the link while the namespace still exists.
    _veth: Option<Veth>,
    ns: Option<NetNs>,
}

#[derive(Default)]
pub(super) struct PodTable {
    pods: Mutex<BTreeMap<(String, String), Running>>,
    /// Next host address per node, never reused within a run.
    next: Mutex<BTreeMap<usize, u8>>,
    counter: Mutex<u32>,
}

impl PodTable {
    pub(super) fn clear(&self) {
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Cluster {
    /// Starts a pod: its namespace and link, its server (waiting until it listens), then its Pod object.
    pub fn create_pod(&self, spec: &PodSpec) -> Result<Pod> {
        let node = self
            .nodes
            .get(spec.node)
            .with_context(|| format!("no node {}", spec.node))?;
        let key = (spec.namespace.clone(), spec.name.clone());
        if self
            .pods
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&key)
        {
            bail!("pod {}/{} exists", spec.namespace, spec.name);
        }
        let (ns, veth, ip) = if spec.host_network {
            (None, None, node.ip())
        } else {
            let k = {
                let mut c = self.pods.counter.lock().unwrap_or_else(|p| p.into_inner());
                *c += 1;
                *c
            };
            let host = {
                let mut next = self.pods.next.lock().unwrap_or_else(|p| p.into_inner());
                let n = next.entry(spec.node).or_insert(2);
                let host = *n;
                *n = n.checked_add(1).context("pod subnet exhausted")?;
                host
            };
            let ip = Ipv4Addr::new(10, 244, spec.node as u8, host);
            let ns = NetNs::new(&format!("lbe-{}-p{k}", self.token))?;
            // The node's end gets an index of its own, distinct from the pod end's (see `Veth::with_index`).
            let veth = Veth::with_index(&node.ns, &format!("veth{k}"), 100 + k, &ns, "eth0")?;
            veth.b().add_addr(&format!("{ip}/24"))?;
            node.ns
                .ip(&["link", "set", &format!("veth{k}"), "master", "cni0"])?;
            veth.a().up()?;
            veth.b().up()?;
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &node.pod_gateway().to_string(),
            ])?;
            (Some(ns), Some(veth), ip)
        };
        let pod = Pod {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            node: spec.node,
            ip,
            host_network: spec.host_network,
        };
        let mut running = Running {
            server: None,
            _veth: veth,
            ns,
        };
        if !spec.ports.is_empty() {
            let tcp: Vec<u16> = spec
                .ports
                .iter()
                .filter(|p| p.2 == "TCP")
                .map(|p| p.1)
                .collect();
            let udp: Vec<u16> = spec
                .ports
                .iter()
                .filter(|p| p.2 == "UDP")
                .map(|p| p.1)
                .collect();
            let cmd = self.in_pod(
                &running,
                spec.node,
                self.probe.serve_cmd(&spec.name, &tcp, &udp),
            );
            let mut child = cmd.spawn()?;
            Probe::wait_ready(&mut child, SERVE_READY)
                .with_context(|| format!("pod {}/{}'s server", spec.namespace, spec.name))?;
            running.server = Some(child);
        }
        self.pods
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, running);
        self.api
            .create(pod_object(spec, &node.name, ip, node.ip()))?;
        Ok(pod)
    }

    fn in_pod(&self, running: &Running, node: usize, cmd: Cmd) -> Cmd {
        let node = &self.nodes[node];
        match &running.ns {
            Some(ns) => cmd.netns(ns).cgroup(&node.cgroup),
            None => cmd.netns(&node.ns).cgroup(&node.cgroup),
        }
    }

    /// `cmd` inside `pod`: its namespace (the node's for hostNetwork) and its node's cgroup.
    pub fn pod_cmd(&self, pod: &Pod, cmd: Cmd) -> Cmd {
        let pods = self.pods.pods.lock().unwrap_or_else(|p| p.into_inner());
        match pods.get(&(pod.namespace.clone(), pod.name.clone())) {
            Some(r) => self.in_pod(r, pod.node, cmd),
            // A deleted pod: run where its node's pods run, which a case never wants; make it fail loudly.
            None => cmd.arg(format!("--pod-{}-was-deleted", pod.name)),
        }
    }

    /// Sets the pod's Ready condition, as the kubelet does when a readiness probe starts or stops passing.
    pub fn set_ready(&self, pod: &Pod, ready: bool) -> Result<()> {
        self.api
            .update(Resource::Pods, &pod.namespace, &pod.name, |p| {
                set_ready_condition(p, ready)
            })
            .map(|_| ())
    }

    /// Starts a graceful deletion: the Pod gets a deletionTimestamp; its server goes on serving, as a pod draining
    /// with a long grace period or a preStop sleep does. `serving`: it stays Ready (no readiness probe, as agnhost's
    /// `netexec --delay-shutdown`), else its readiness probe fails from now on. [`Cluster::delete_pod`] ends it.
    pub fn terminate_pod(&self, pod: &Pod, serving: bool) -> Result<()> {
        let now = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        self.api
            .update(Resource::Pods, &pod.namespace, &pod.name, |p| {
                p["metadata"]["deletionTimestamp"] = json!(now);
                p["metadata"]["deletionGracePeriodSeconds"] = json!(30);
                set_ready_condition(p, serving);
            })
            .map(|_| ())
    }

    /// Stops the pod's processes, deletes its namespace and then its Pod object (a deletion with grace period 0,
    /// or the end of a graceful one).
    pub fn delete_pod(&self, pod: &Pod) -> Result<()> {
        let running = self
            .pods
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(pod.namespace.clone(), pod.name.clone()));
        drop(running);
        self.api.delete(Resource::Pods, &pod.namespace, &pod.name)
    }

    /// Deletes every pod of `namespace` (a case's cleanup).
    pub fn delete_namespace_pods(&self, namespace: &str) {
        let keys: Vec<(String, String)> = self
            .pods
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|(ns, _)| ns == namespace)
            .cloned()
            .collect();
        for (ns, name) in keys {
            self.pods
                .pods
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(ns.clone(), name.clone()));
            let _ = self.api.delete(Resource::Pods, &ns, &name);
        }
    }

    /// The lines the pod's server printed for `event` (`tcp`, `udp`): one per connection or datagram, with the peer
    /// it saw.
    pub fn served(&self, pod: &Pod, event: &str) -> Vec<ProbeLine> {
        let pods = self.pods.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.get(&(pod.namespace.clone(), pod.name.clone()))
            .and_then(|r| r.server.as_ref())
            .and_then(|c| c.probe_lines().ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.event.as_deref() == Some(event))
            .collect()
    }
}

fn set_ready_condition(pod: &mut Value, ready: bool) {
    pod["status"]["conditions"] = json!([
        {"type": "Ready", "status": if ready { "True" } else { "False" }},
        {"type": "ContainersReady", "status": if ready { "True" } else { "False" }},
    ]);
}

/// The Pod object a kubelet would have made running: node, IP, container ports, phase Running, readiness.
fn pod_object(spec: &PodSpec, node: &str, ip: Ipv4Addr, host_ip: Ipv4Addr) -> Value {
    let labels: serde_json::Map<String, Value> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|(name, port, proto)| {
            let mut p = json!({"containerPort": port, "protocol": proto});
            if !name.is_empty() {
                p["name"] = json!(name);
            }
            p
        })
        .collect();
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "hostNetwork": spec.host_network,
            "containers": [{"name": "main", "image": "lb-probe", "ports": ports}],
        },
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "hostIP": host_ip.to_string()},
    });
    set_ready_condition(&mut pod, spec.ready);
    pod
}
