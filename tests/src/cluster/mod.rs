//! A simulated multi-node Kubernetes cluster made of network namespaces, with one real `lb-agent` per node, all
//! watching one in-process API server with its controllers ([`crate::apiserver::ApiServer::start_cluster`]):
//!
//! ```text
//!                        client (192.0.2.1): an outside client on node-0's uplink
//!                          │ 192.0.2.0/24
//!              uplink ─── node-0 (198.51.100.10, ExternalIP 192.0.2.10) ── cni0 10.244.0.1/24 ── pods 10.244.0.x
//!                          │ underlay 198.51.100.0/24 (a bridge in its own namespace)
//!                         node-1 (198.51.100.11) ── cni0 10.244.1.1/24 ── pods 10.244.1.x
//!                         node-2 (198.51.100.12) ── cni0 10.244.2.1/24 ── pods 10.244.2.x
//! ```
//!
//! - Every node is a namespace that forwards, with routes to the other nodes' pod subnets over the underlay (as a
//!   flat cloud network or a CNI's host-gw mode sets them up) and a bridge `cni0` for its pods whose MAC is pinned
//!   (as the CNI bridge plugin does, so the bridge's MAC does not follow its ports). Zones `zone-a`, `zone-b`, ...
//! - Every pod is a namespace with `eth0` on its node's bridge and a default route through it; its processes run in
//!   the node's cgroup (`lbe-<token>-<node>`), as a kubelet puts every pod of a node under one cgroup subtree. A
//!   hostNetwork pod's processes run in the node's namespace, in the same cgroup.
//! - Every node runs `lb-agent run --kubeconfig` inside its namespace: socket LB on the node's cgroup, tc on its
//!   external devices (`ul` to the underlay, and `uplink` on node-0), pins in its own bpffs directory. It reaches the API
//!   server on its namespace's own 127.0.0.1 ([`crate::apiserver::ApiServer::listen_in`]).
//! - The client routes the node network (198.51.100.0/24), the load balancer pool (203.0.113.0/24, handed out by
//!   the cloud controller) and the service CIDR through node-0, as an upstream router and a pass-through cloud load
//!   balancer would. Like GCE's guest agent, the cloud adds every load balancer IP as a local route on every node
//!   (`ip route add local <ip> dev lo table local`).
//!
//! Network safety: nothing is connected to the root namespace; the only socket outside the cluster's namespaces is
//! the API server's own listener on 127.0.0.1. Drop stops the agents and processes, then deletes the pods, links,
//! nodes, cgroups and pin directories, also when a case panicked.

mod objects;
mod pods;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::apiserver::{ApiServer, ClusterConfig, LbChange, Resource, write_kubeconfig};
use crate::process::{Child, Cmd};
use crate::{BpfDir, Cgroup, NetNs, Probe, Veth, run_cmd, unique_token};

pub use objects::*;
pub use pods::{Pod, PodSpec};

/// The client's address on node-0's uplink, and node-0's.
pub const CLIENT_IP: &str = "192.0.2.1";
pub const NODE0_UPLINK_IP: &str = "192.0.2.10";
/// Where the cloud controller takes load balancer addresses from (routed to node-0 by the client).
pub const LB_POOL: &str = "203.0.113.0/24";
/// The service CIDR (the cluster's only ServiceCIDR object).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

const AGENT_READY: Duration = Duration::from_secs(60);

/// One node: its namespace, cgroup, pins and agent.
pub struct Node {
    pub index: usize,
    pub name: String,
    pub zone: String,
    pub ns: NetNs,
    pub cgroup: Cgroup,
    pub bpf: BpfDir,
    /// The devices its agent attaches the tc programs to.
    pub devices: Vec<String>,
    kubeconfig: PathBuf,
}

impl Node {
    /// Its InternalIP on the underlay.
    pub fn ip(&self) -> Ipv4Addr {
        node_ip(self.index)
    }

    /// The first address of its pod subnet (the bridge's).
    pub fn pod_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index as u8, 1)
    }

    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }
}

fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 10 + index as u8)
}

/// The running agent of one node.
struct NodeAgent {
    child: Child,
}

/// See the module documentation.
pub struct Cluster {
    // Field order is drop order: agents and every process first, then pods, links and namespaces, then cgroups and
    // pins, the API server last.
    agents: Mutex<Vec<NodeAgent>>,
    pods: pods::PodTable,
    links: Vec<Veth>,
    pub client: NetNs,
    pub nodes: Vec<Node>,
    underlay: NetNs,
    pub api: ApiServer,
    pub probe: Probe,
    agent_bin: PathBuf,
    dir: PathBuf,
    token: String,
}

impl Cluster {
    /// Builds the cluster with `nodes` nodes (2 to 9), starts its agents and waits until each has synced.
    pub fn up(agent_bin: &Path, probe: Probe, nodes: usize) -> Result<Cluster> {
        if !(2..=9).contains(&nodes) {
            bail!("a cluster has 2 to 9 nodes, not {nodes}");
        }
        let token = unique_token();
        let dir = std::env::temp_dir().join(format!("lb-e2e-{token}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let api = ApiServer::start_cluster(ClusterConfig::default())?;
        let underlay = NetNs::new(&format!("lbe-{token}-ul"))?;
        let client = NetNs::new(&format!("lbe-{token}-cl"))?;
        let mut cluster = Cluster {
            agents: Mutex::new(Vec::new()),
            pods: pods::PodTable::default(),
            links: Vec::new(),
            client,
            nodes: Vec::new(),
            underlay,
            api,
            probe,
            agent_bin: agent_bin.to_path_buf(),
            dir,
            token,
        };
        for i in 0..nodes {
            let node = cluster
                .add_node(i)
                .with_context(|| format!("building node-{i}"))?;
            cluster.nodes.push(node);
        }
        cluster.route().context("routing the cluster")?;
        cluster.register().context("registering the nodes")?;
        cluster.watch_load_balancers();
        for i in 0..nodes {
            let agent = cluster
                .start_agent(i)
                .with_context(|| format!("starting node-{i}'s agent"))?;
            cluster.agents().push(agent);
        }
        for i in 0..nodes {
            cluster.wait_agent(i)?;
        }
        Ok(cluster)
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    fn add_node(&mut self, i: usize) -> Result<Node> {
        let t = &self.token;
        let ns = NetNs::new(&format!("lbe-{t}-n{i}"))?;
        let cgroup = Cgroup::new(&format!("lbe-{t}-n{i}"))?;
        let bpf = BpfDir::new(&format!("lbe-{t}-n{i}"))?;
        let zone = format!("zone-{}", (b'a' + i as u8) as char);
        // The underlay: `ul` in the node, `n<i>` on the underlay's bridge.
        self.links.push(Veth::with_index(
            &ns,
            "ul",
            10,
            &self.underlay,
            &format!("n{i}"),
        )?);
        let ul = self.links.last().context("just pushed")?;
        ul.a().add_addr(&format!("{}/24", node_ip(i)))?;
        if i == 0 {
            self.underlay
                .ip(&["link", "add", "br0", "type", "bridge"])?;
            self.underlay.ip(&["link", "set", "br0", "up"])?;
        }
        self.underlay
            .ip(&["link", "set", &format!("n{i}"), "master", "br0"])?;
        ul.a().up()?;
        ul.b().up()?;
        let mut devices = vec!["ul".to_owned()];
        if i == 0 {
            self.links
                .push(Veth::with_index(&ns, "uplink", 11, &self.client, "eth0")?);
            let up = self.links.last().context("just pushed")?;
            up.a().add_addr(&format!("{NODE0_UPLINK_IP}/24"))?;
            up.b().add_addr(&format!("{CLIENT_IP}/24"))?;
            up.a().up()?;
            up.b().up()?;
            devices.push("uplink".into());
        }
        // The pods' bridge, its MAC pinned.
        ns.ip(&["link", "add", "cni0", "type", "bridge"])?;
        ns.ip(&[
            "link",
            "set",
            "cni0",
            "address",
            &format!("0a:58:0a:f4:{i:02x}:01"),
        ])?;
        ns.ip(&["addr", "add", &format!("10.244.{i}.1/24"), "dev", "cni0"])?;
        ns.ip(&["link", "set", "cni0", "up"])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let kubeconfig = self.dir.join(format!("kubeconfig-n{i}"));
        let addr = self.api.listen_in(&ns.path())?;
        write_kubeconfig(&format!("http://{addr}"), &kubeconfig)?;
        Ok(Node {
            index: i,
            name: format!("node-{i}"),
            zone,
            ns,
            cgroup,
            bpf,
            devices,
            kubeconfig,
        })
    }

    fn route(&self) -> Result<()> {
        for node in &self.nodes {
            for other in &self.nodes {
                if other.index != node.index {
                    node.ns.ip(&[
                        "route",
                        "add",
                        &other.pod_cidr(),
                        "via",
                        &other.ip().to_string(),
                    ])?;
                }
            }
            if node.index != 0 {
                node.ns.ip(&[
                    "route",
                    "add",
                    "192.0.2.0/24",
                    "via",
                    &node_ip(0).to_string(),
                ])?;
            }
        }
        for net in ["198.51.100.0/24", LB_POOL, SERVICE_CIDR] {
            self.client
                .ip(&["route", "add", net, "via", NODE0_UPLINK_IP])?;
        }
        Ok(())
    }

    /// The Node objects and the ServiceCIDR, as the kubelets and the API server create them.
    fn register(&self) -> Result<()> {
        self.api.apply_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
            "metadata": {"name": "kubernetes"}, "spec": {"cidrs": [SERVICE_CIDR]},
        }))?;
        for node in &self.nodes {
            let mut addresses =
                vec![json!({"type": "InternalIP", "address": node.ip().to_string()})];
            if node.index == 0 {
                addresses.push(json!({"type": "ExternalIP", "address": NODE0_UPLINK_IP}));
            }
            addresses.push(json!({"type": "Hostname", "address": node.name}));
            self.api.apply_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name, "labels": {
                    "kubernetes.io/hostname": node.name,
                    "topology.kubernetes.io/zone": node.zone,
                }},
                "spec": {"podCIDR": node.pod_cidr(), "podCIDRs": [node.pod_cidr()]},
                "status": {
                    "addresses": addresses,
                    "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }))?;
        }
        Ok(())
    }

    /// The cloud's side of a load balancer address on the nodes: a local route on each (GCE's guest agent).
    fn watch_load_balancers(&self) {
        let nodes: Vec<String> = self.nodes.iter().map(|n| n.ns.name().to_owned()).collect();
        let nodes = Arc::new(Mutex::new(nodes));
        self.api.on_load_balancer(Box::new(move |change| {
            let (verb, ip) = match change {
                LbChange::Added(ip) => ("add", ip),
                LbChange::Removed(ip) => ("del", ip),
            };
            let nodes = nodes.lock().unwrap_or_else(|p| p.into_inner());
            for ns in nodes.iter() {
                let ip = ip.to_string();
                let args = [
                    "-n", ns, "route", verb, "local", &ip, "dev", "lo", "table", "local",
                ];
                if let Err(e) = run_cmd("ip", &args) {
                    eprintln!(
                        "e2e: the cloud could not {verb} the local route {ip} on {ns}: {e:#}"
                    );
                }
            }
        }));
    }

    fn start_agent(&self, i: usize) -> Result<NodeAgent> {
        let node = &self.nodes[i];
        let child = Cmd::new(&self.agent_bin)
            .arg("run")
            .arg("--kubeconfig")
            .arg(&node.kubeconfig)
            .args(["--node-name", &node.name])
            .arg("--cgroup")
            .arg(node.cgroup.path())
            .arg("--bpffs")
            .arg(node.bpf.path())
            // Inside the node's namespace: these are the node's own interfaces.
            .args(["--devices", &node.devices.join(",")])
            .env("LB_LOG", "info")
            .label(&format!("lb-agent-{}", node.name))
            .netns(&node.ns)
            .spawn()?;
        Ok(NodeAgent { child })
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, Vec<NodeAgent>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_agent(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + AGENT_READY;
        let devices = self.nodes[i].devices.clone();
        let name = self.nodes[i].name.clone();
        loop {
            let (exited, log) = {
                let mut agents = self.agents();
                let agent = &mut agents[i];
                (agent.child.try_wait()?, agent.child.stderr())
            };
            let attached = devices.iter().all(|d| {
                log.lines().any(|l| {
                    l.contains("tc programs attached") && l.contains(&format!("device={d}"))
                })
            });
            if log.contains("initial sync done") && attached {
                return Ok(());
            }
            if let Some(status) = exited {
                bail!("{name}'s agent exited ({status}) before its initial sync:\n{log}");
            }
            if Instant::now() >= deadline {
                bail!("{name}'s agent did not sync within {AGENT_READY:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills node `i`'s agent (`kill -9`: its pinned datapath keeps serving) and starts a new one, which adopts the
    /// pins; waits for its initial sync.
    pub fn restart_agent(&self, i: usize) -> Result<()> {
        let agent = self.start_agent_after_kill(i)?;
        self.agents()[i] = agent;
        self.wait_agent(i)
    }

    fn start_agent_after_kill(&self, i: usize) -> Result<NodeAgent> {
        self.agents()[i].child.kill();
        self.start_agent(i)
    }

    /// Node `i`'s agent log so far.
    pub fn agent_log(&self, i: usize) -> String {
        self.agents()
            .get(i)
            .map(|a| a.child.stderr())
            .unwrap_or_default()
    }

    /// Whether every agent still runs (for the run's final check: an agent that died part way would make the later
    /// cases fail for the wrong reason).
    pub fn agents_alive(&self) -> Result<()> {
        for (i, a) in self.agents().iter_mut().enumerate() {
            if let Some(status) = a.child.try_wait()? {
                bail!("node-{i}'s agent exited ({status}):\n{}", a.child.stderr());
            }
        }
        Ok(())
    }

    /// `cmd` in the outside client's namespace.
    pub fn client_cmd(&self, cmd: Cmd) -> Cmd {
        cmd.netns(&self.client)
    }

    /// `cmd` as a hostNetwork pod of node `i` runs it: the node's namespace and cgroup.
    pub fn host_cmd(&self, i: usize, cmd: Cmd) -> Cmd {
        cmd.netns(&self.nodes[i].ns).cgroup(&self.nodes[i].cgroup)
    }

    /// Creates a Service (admitted by the API server) and returns it as stored.
    pub fn create_service(&self, svc: Value) -> Result<Value> {
        self.api.create(svc)
    }

    /// Updates the Service `ns/name` with `change`, as a client's read-modify-write does.
    pub fn update_service(
        &self,
        ns: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Result<Value> {
        self.api.update(Resource::Services, ns, name, change)
    }

    pub fn delete_service(&self, ns: &str, name: &str) -> Result<()> {
        self.api.delete(Resource::Services, ns, name)
    }

    pub fn service(&self, ns: &str, name: &str) -> Result<Value> {
        self.api
            .get(Resource::Services, ns, name)
            .with_context(|| format!("Service {ns}/{name} not found"))
    }

    /// The EndpointSlices of Service `ns/name`.
    pub fn slices(&self, ns: &str, name: &str) -> Vec<Value> {
        self.api
            .list(Resource::EndpointSlices, Some(ns))
            .into_iter()
            .filter(|s| {
                s.pointer("/metadata/labels/kubernetes.io~1service-name")
                    .and_then(Value::as_str)
                    == Some(name)
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents and pods' processes before any namespace or cgroup goes; the fields then drop in order.
        for a in self.agents().iter_mut() {
            a.child.kill();
        }
        self.pods.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
