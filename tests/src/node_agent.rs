//! The real agent inside node A of a [`NodePair`], for the per-packet datapath tests: start with extra `run` flags, edit the
//! manifest, read the pinned maps through the agent's own CLI (`conntrack`, `stats`, `backends` as JSON).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lb_agent::datapath::inspect;
use lb_agent::datapath::maps::PinnedMaps;
use serde::Deserialize;

use crate::probe::ProbeLine;
use crate::process::{Child, Cmd};
use crate::topology::{NodePair, node_pair};

const SYNC: Duration = Duration::from_secs(20);
/// How long a client probe or a CLI call may take.
pub const RUN: Duration = Duration::from_secs(30);

/// Node A's Node object: InternalIPs 192.0.2.10 and 2001:db8:1::10, the pod CIDRs of pod A.
pub const NODE_A: &str = r#"apiVersion: v1
kind: Node
metadata:
  name: node-a
spec:
  podCIDRs: [10.244.1.0/24, "fd00:244:1::/64"]
status:
  addresses:
    - {type: InternalIP, address: 192.0.2.10}
    - {type: InternalIP, address: "2001:db8:1::10"}
"#;

/// `lb-agent run` inside node A's namespace, with the tc programs on node A's two links; killed on drop (declare
/// it before the pair in a struct, so it drops first).
pub struct NodeAgent {
    child: Child,
    bin: PathBuf,
    manifest: PathBuf,
    dir: PathBuf,
    pins: PathBuf,
    devices: Vec<String>,
    extra: Vec<String>,
    /// A command the agent runs under (e.g. [`crate::caps::container_prefix`]); empty: run it directly.
    prefix: Vec<String>,
}

impl NodeAgent {
    /// Writes `manifest` and starts the agent with `extra` flags after the usual ones; waits for its initial sync
    /// and for the tc programs on both devices.
    pub fn start(bin: &Path, pair: &NodePair, manifest: &str, extra: &[&str]) -> NodeAgent {
        Self::start_on_devices(bin, pair, manifest, &pair.node_a_devices(), extra)
    }

    /// [`NodeAgent::start`] with `--devices` naming `devices` (interfaces of node A, such as a VLAN the test added)
    /// instead of [`NodePair::node_a_devices`]; kept across [`NodeAgent::restart`].
    pub fn start_on_devices(
        bin: &Path,
        pair: &NodePair,
        manifest: &str,
        devices: &[String],
        extra: &[&str],
    ) -> NodeAgent {
        Self::try_start_under(bin, pair, manifest, devices, extra, &[])
            .unwrap_or_else(|log| panic!("lb-agent exited before its initial sync:\n{log}"))
    }

    /// [`NodeAgent::start`] with the agent running under `prefix` (a command and its arguments, the agent's
    /// command line appended; kept across restarts). Returns the agent's log instead if it exits before its
    /// initial sync, for tests of how it fails.
    pub fn try_start_under(
        bin: &Path,
        pair: &NodePair,
        manifest: &str,
        devices: &[String],
        extra: &[&str],
        prefix: &[String],
    ) -> Result<NodeAgent, String> {
        let dir = std::env::temp_dir().join(format!("lb-tests-node-agent-{}", pair.token()));
        std::fs::create_dir_all(&dir).expect("agent directory");
        let path = dir.join("services.yaml");
        std::fs::write(&path, manifest).expect("writing the manifest");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let devices = devices.to_vec();
        let prefix = prefix.to_vec();
        let child = Self::launch(bin, pair, &path, &devices, &extra, &prefix);
        let mut agent = NodeAgent {
            child,
            bin: bin.to_path_buf(),
            manifest: path,
            dir,
            pins: pair.bpf_dir().path().to_path_buf(),
            devices,
            extra,
            prefix,
        };
        agent.try_wait_for_log("initial sync done")?;
        let log = agent.child.stderr();
        for dev in &agent.devices {
            assert!(
                log.lines()
                    .any(|l| l.contains("tc programs attached") && l.contains(dev.as_str())),
                "the agent did not attach the tc programs to {dev}:\n{log}"
            );
        }
        Ok(agent)
    }

    fn launch(
        bin: &Path,
        pair: &NodePair,
        path: &Path,
        devices: &[String],
        extra: &[String],
        prefix: &[String],
    ) -> Child {
        let devices = devices.join(",");
        let cmd = match prefix.split_first() {
            Some((program, args)) => Cmd::new(program).args(args).arg(bin),
            None => Cmd::new(bin),
        };
        // Inside node A's namespace: `--devices` names node A's own interfaces, never the host's.
        cmd.arg("run")
            .arg("--manifests")
            .arg(path)
            .args(["--node-name", "node-a"])
            .arg("--cgroup")
            .arg(pair.cgroup().path())
            .arg("--bpffs")
            .arg(pair.bpf_dir().path())
            .args(["--devices", &devices])
            .args(["--node-address", node_pair::NODE_A_V4])
            .args(["--health-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--health-check-node-port-addresses", "127.0.0.1"])
            .args(extra)
            .env("LB_LOG", "info")
            .label("lb-agent-node-a")
            .netns(&pair.node_a)
            .spawn()
            .expect("starting lb-agent in node A")
    }

    /// `kill -9` the agent and start a new one with the same manifest, pins, devices and flags; waits for its
    /// initial sync.
    pub fn restart(&mut self, pair: &NodePair) {
        self.child.kill();
        self.child = Self::launch(
            &self.bin,
            pair,
            &self.manifest,
            &self.devices,
            &self.extra,
            &self.prefix,
        );
        self.wait_for_log("initial sync done");
    }

    /// [`NodeAgent::restart`] with `--devices` naming `devices` from now on (an operator changing the flag).
    pub fn restart_on_devices(&mut self, pair: &NodePair, devices: &[String]) {
        self.devices = devices.to_vec();
        self.restart(pair);
    }

    /// [`NodeAgent::restart`] with `extra` as the `run` flags from now on (an operator changing them).
    pub fn restart_with_flags(&mut self, pair: &NodePair, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart(pair);
    }

    /// `kill -9` the agent (the pinned datapath stays).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// The Prometheus text of the agent's `/metrics` (fetched with curl inside node A's namespace, where the agent
    /// listens on the port its log names).
    pub fn metrics(&self, pair: &NodePair) -> String {
        let log = self.child.stderr();
        let addr = log
            .lines()
            .find(|l| l.contains("metrics server listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .map(|a| a.trim().to_owned())
            .unwrap_or_else(|| panic!("the agent did not log its metrics address:\n{log}"));
        Cmd::new("curl")
            .args(["-sf", &format!("http://{addr}/metrics")])
            .netns(&pair.node_a)
            .label("curl-metrics")
            .run(RUN)
            .expect("fetching /metrics")
            .stdout
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.child.stderr()
    }

    pub fn pins(&self) -> &Path {
        &self.pins
    }

    /// Waits until the log contains `needle`; panics with the log if the agent exits or it takes too long.
    pub fn wait_for_log(&mut self, needle: &str) {
        if let Err(log) = self.try_wait_for_log(needle) {
            panic!("lb-agent exited before {needle:?}:\n{log}");
        }
    }

    /// Waits until the log contains `needle`; returns the log if the agent exits first. Panics if it takes too long.
    pub fn try_wait_for_log(&mut self, needle: &str) -> Result<(), String> {
        let deadline = Instant::now() + SYNC;
        loop {
            let exited = self.child.try_wait().expect("polling the agent");
            let log = self.child.stderr();
            if log.contains(needle) {
                return Ok(());
            }
            if exited.is_some() {
                return Err(log);
            }
            assert!(
                Instant::now() < deadline,
                "lb-agent did not log {needle:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of the process started for the agent (under a prefix, the prefix's).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Replaces the manifest (renamed over, as editors do) and waits until the services at `frontend` (any
    /// protocol) have exactly the backends `want` (`ip:port`); an empty `want` with `gone` also accepts the
    /// frontend having no service at all.
    pub fn update(&self, manifest: &str, frontend: &str, want: &[&str], gone: bool) {
        let tmp = self.dir.join(".services.yaml.tmp");
        std::fs::write(&tmp, manifest).expect("writing the manifest");
        std::fs::rename(&tmp, &self.manifest).expect("renaming the manifest");
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        let deadline = Instant::now() + SYNC;
        loop {
            let maps = PinnedMaps::open(&self.pins).expect("opening the pinned maps");
            let list = inspect::services(&maps).expect("reading the services");
            let at: Vec<_> = list.iter().filter(|s| s.frontend == frontend).collect();
            let mut have: Vec<String> = at
                .iter()
                .flat_map(|s| s.backends.iter().map(|b| b.address.clone()))
                .collect();
            have.sort();
            have.dedup();
            if (gone && at.is_empty()) || (!at.is_empty() && have == want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{frontend} never reached backends {want:?} (has {have:?}):\n{}",
                self.child.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `lb-agent <args> --bpffs <pins> -o json` (from the root namespace: it only reads pinned maps) and
    /// parses its output.
    pub fn cli_json<T: for<'de> Deserialize<'de>>(&self, args: &[&str]) -> T {
        let out = Cmd::new(&self.bin)
            .args(args)
            .arg("--bpffs")
            .arg(&self.pins)
            .args(["-o", "json"])
            .label("lb-agent-cli")
            .run(RUN)
            .unwrap_or_else(|e| panic!("lb-agent {args:?}: {e:#}"));
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("lb-agent {args:?} printed no JSON ({e}):\n{}", out.stdout))
    }

    /// Every conntrack entry (`lb-agent conntrack -o json`).
    pub fn conntrack(&self) -> Vec<CtRow> {
        self.cli_json(&["conntrack"])
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- lb-agent (node A) log ---\n{}", self.child.stderr());
        }
        self.child.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One row of `lb-agent conntrack -o json`.
#[derive(Debug, Clone, Deserialize)]
pub struct CtRow {
    pub direction: String,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    pub new_source: String,
    pub new_destination: String,
    pub service_id: u32,
    pub backend_id: u32,
    pub flags: Vec<String>,
    pub idle_seconds: f64,
    pub lifetime_seconds: u32,
}

/// Whether `ip -d link show <dev>` in node A shows an XDP program.
pub fn xdp_shown(pair: &NodePair, dev: &str) -> bool {
    let out = pair
        .node_a
        .ip(&["-d", "link", "show", dev])
        .expect("ip link show");
    out.contains("prog/xdp") || out.contains("xdpgeneric")
}

pub fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("address"), port)
}

/// Runs an `lb-probe` client in the client namespace and returns its lines.
pub fn client(pair: &NodePair, cmd: Cmd) -> Vec<ProbeLine> {
    cmd.netns(&pair.client)
        .run(RUN)
        .expect("running the client probe")
        .probe_lines()
        .expect("client probe lines")
}

/// The lines a server printed for events `event` (`tcp`, `udp`, `sctp`).
pub fn server_events(server: &Child, event: &str) -> Vec<ProbeLine> {
    server
        .probe_lines()
        .expect("server lines")
        .into_iter()
        .filter(|l| l.event.as_deref() == Some(event))
        .collect()
}

/// The peer addresses (without port) a server saw for events `event`.
pub fn peers_seen(server: &Child, event: &str) -> Vec<String> {
    server_events(server, event)
        .into_iter()
        .filter_map(|l| l.peer)
        .map(|p| {
            p.parse::<SocketAddr>()
                .map(|a| a.ip().to_string())
                .unwrap_or(p)
        })
        .collect()
}

/// One port of a Service made by [`service`]: (name, protocol, port, targetPort, nodePort).
pub type Port<'a> = (&'a str, &'a str, u16, u16, u16);

/// A NodePort Service `t/<name>` with ClusterIP `cluster_ip` of `family` (`IPv4` / `IPv6`), the external traffic
/// `policy`, `ports`, `extra` lines appended to its spec (indented two spaces, e.g. `  sessionAffinity: ClientIP`),
/// and one EndpointSlice with `endpoints` (address, node name), ready.
pub fn service(
    name: &str,
    cluster_ip: &str,
    family: &str,
    policy: &str,
    ports: &[Port<'_>],
    endpoints: &[(&str, &str)],
    extra: &str,
) -> String {
    let mut svc_ports = String::new();
    let mut slice_ports = String::new();
    for (port_name, proto, port, target, node_port) in ports {
        svc_ports.push_str(&format!(
            "    - {{name: {port_name}, protocol: {proto}, port: {port}, targetPort: {target}, nodePort: {node_port}}}\n"
        ));
        slice_ports.push_str(&format!(
            "  - {{name: {port_name}, protocol: {proto}, port: {target}}}\n"
        ));
    }
    let mut eps = String::new();
    for (addr, node) in endpoints {
        eps.push_str(&format!(
            "  - {{addresses: [\"{addr}\"], conditions: {{ready: true}}, nodeName: {node}}}\n"
        ));
    }
    if eps.is_empty() {
        eps.push_str("  []\n");
    }
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: t}}
spec:
  type: NodePort
  clusterIP: "{cluster_ip}"
  ipFamilies: [{family}]
  externalTrafficPolicy: {policy}
  ports:
{svc_ports}{extra}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: t
  labels: {{kubernetes.io/service-name: {name}}}
addressType: {family}
ports:
{slice_ports}endpoints:
{eps}"#
    )
}

/// `lb-agent stats -o json`, the parts the tests read.
#[derive(Debug, Clone, Deserialize)]
pub struct Stats {
    pub services: Vec<StatsRow>,
    pub packets_by_reason: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StatsRow {
    pub service_id: u32,
    pub service: String,
    pub frontend: String,
    pub protocol: String,
    pub scope: String,
    pub counters: std::collections::BTreeMap<String, u64>,
}

impl Stats {
    /// Packets counted under `reason` (its `lb-agent trace` name, e.g. `fragment-followed`).
    pub fn reason(&self, reason: &str) -> u64 {
        self.packets_by_reason
            .iter()
            .find(|(name, _)| name == reason)
            .map_or(0, |(_, n)| *n)
    }
}

impl NodeAgent {
    pub fn stats(&self) -> Stats {
        self.cli_json(&["stats"])
    }
}

/// One row of `lb-agent backends -o json`.
#[derive(Debug, Clone, Deserialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub protocol: String,
    pub services: Vec<u32>,
    pub packets: u64,
    pub bytes: u64,
}

impl NodeAgent {
    pub fn backends(&self) -> Vec<BackendRow> {
        self.cli_json(&["backends"])
    }

    /// The stats row of the External frontend `frontend` (`ip:port`) for `protocol` (`TCP`, `UDP`, `SCTP`).
    pub fn service_stats(&self, frontend: &str, protocol: &str) -> StatsRow {
        self.stats()
            .services
            .into_iter()
            .find(|r| r.frontend == frontend && r.protocol == protocol && r.scope == "external")
            .unwrap_or_else(|| panic!("no external {protocol} service at {frontend}"))
    }
}
