//! The per-packet datapath with real traffic: an outside client reaches NodePorts of node A, where the real agent
//! runs inside node A's namespace with the tc programs attached to its uplink and its link to node B
//! ([`lb_tests::topology::NodePair`]). Backends are `lb-probe serve` in a pod namespace on node A and one on node B;
//! the servers print the peer they see. Every packet stays inside the namespaces the test creates.

use std::time::{Duration, Instant};

use lb_tests::node_agent::{NODE_A, NodeAgent, RUN, client, peers_seen, sa};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{Child, Probe, ProbeLine, agent_bin, probe, require_root};
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

/// A Service `name` of `kind` NodePort with TCP `node_ports.0` -> 8080 and UDP `node_ports.1` -> 5353, the given
/// traffic policy, and endpoints `(address, node)`.
fn service(
    name: &str,
    family: &str,
    node_ports: (u16, u16),
    policy: &str,
    endpoints: &[(&str, &str)],
) -> String {
    let (tcp, udp) = node_ports;
    let cluster_ip = if family == "IPv4" {
        format!("10.96.0.{}", tcp % 200)
    } else {
        format!("\"fd00:96::{}\"", tcp % 200)
    };
    let mut eps = String::new();
    for (addr, node) in endpoints {
        eps.push_str(&format!(
            "  - {{addresses: [\"{addr}\"], conditions: {{ready: true}}, nodeName: {node}}}\n"
        ));
    }
    if eps.is_empty() {
        eps.push_str("  []\n");
    }
    let slice_family = family;
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: t}}
spec:
  type: NodePort
  clusterIP: {cluster_ip}
  ipFamilies: [{family}]
  externalTrafficPolicy: {policy}
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: {TCP_PORT}, nodePort: {tcp}}}
    - {{name: dns, protocol: UDP, port: 53, targetPort: {UDP_PORT}, nodePort: {udp}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: t
  labels: {{kubernetes.io/service-name: {name}}}
addressType: {slice_family}
ports:
  - {{name: http, protocol: TCP, port: {TCP_PORT}}}
  - {{name: dns, protocol: UDP, port: {UDP_PORT}}}
endpoints:
{eps}"#
    )
}

/// An externalIP and two LoadBalancer IPs (in the client's route to node A, `node_pair::EXTERNAL_NET`), all to
/// pod A: `lb-in` allows the client's network, `lb-out` does not (rule 9).
const EXTERNAL: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: t}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.50
  externalIPs: [203.0.113.7]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: lb-in, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.51
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30095}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.100}]
---
apiVersion: v1
kind: Service
metadata: {name: lb-out, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.52
  loadBalancerSourceRanges: [198.18.0.0/16]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30096}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.101}]
"#;

/// EndpointSlices of [`EXTERNAL`]'s Services: pod A only.
fn external_slices() -> String {
    ["ext", "lb-in", "lb-out"]
        .iter()
        .map(|name| {
            format!(
                r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: t
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
  - {{name: http, protocol: TCP, port: {TCP_PORT}}}
endpoints:
  - {{addresses: ["{}"], conditions: {{ready: true}}, nodeName: node-a}}
"#,
                node_pair::POD_A_V4
            )
        })
        .collect()
}

struct Setup {
    // Declared first: dropped before the pair.
    agent: NodeAgent,
    pair: NodePair,
    probe: Probe,
    pod_a: usize,
    pod_b: usize,
}

fn setup(services: &str) -> Setup {
    let probe = probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    let cmd = probe
        .serve_cmd("pod-a", &[TCP_PORT], &[UDP_PORT])
        .netns(&pair.pod_a);
    let pod_a = pair.serve(cmd).expect("serving in pod A");
    let cmd = probe
        .serve_cmd("pod-b", &[TCP_PORT], &[UDP_PORT])
        .netns(&pair.pod_b);
    let pod_b = pair.serve(cmd).expect("serving in pod B");
    let agent = NodeAgent::start(&agent_bin!(), &pair, &format!("{NODE_A}{services}"), &[]);
    Setup {
        agent,
        pair,
        probe,
        pod_a,
        pod_b,
    }
}

fn manifest_main() -> String {
    let (a, b) = (node_pair::POD_A_V4, node_pair::POD_B_V4);
    [
        service(
            "local",
            "IPv4",
            (30081, 30082),
            "Local",
            &[(a, "node-a"), (b, "node-b")],
        ),
        service(
            "remote",
            "IPv4",
            (30083, 30084),
            "Cluster",
            &[(b, "node-b")],
        ),
        service("empty", "IPv4", (30085, 30086), "Cluster", &[]),
        service("nolocal", "IPv4", (30089, 30090), "Local", &[(b, "node-b")]),
        EXTERNAL.to_owned(),
        external_slices(),
        service(
            "remote6",
            "IPv6",
            (30093, 30094),
            "Cluster",
            &[(node_pair::POD_B_V6, "node-b")],
        ),
        service(
            "local6",
            "IPv6",
            (30091, 30092),
            "Local",
            &[
                (node_pair::POD_A_V6, "node-a"),
                (node_pair::POD_B_V6, "node-b"),
            ],
        ),
    ]
    .concat()
}

#[test]
fn nodeport_from_outside_local_and_remote_backends() {
    if !require_root("nodeport_from_outside_local_and_remote_backends") {
        return;
    }
    let mut s = setup(&manifest_main());
    let node = node_pair::NODE_A_V4;

    // Local policy: always the local pod, and it sees the client's own address (rule 5).
    let lines = client(&s.pair, s.probe.tcp_cmd(sa(node, 30081), 5));
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.backend.as_deref() == Some("pod-a")),
        "TCP NodePort, Local policy: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.peer.as_deref() == Some(&sa(node, 30081).to_string()[..])),
        "the client sees the NodePort as its peer (reverse DNAT at egress): {lines:?}"
    );
    let peers = peers_seen(s.pair.child(s.pod_a), "tcp");
    assert_eq!(peers.len(), 5, "pod A saw 5 connections: {peers:?}");
    assert!(
        peers.iter().all(|p| p == node_pair::CLIENT_V4),
        "Local policy keeps the client source address: {peers:?}"
    );
    let lines = client(&s.pair, s.probe.udp_cmd(sa(node, 30082), 3, 2, false));
    assert!(
        lines.iter().all(|l| l.ok
            && l.backend.as_deref() == Some("pod-a")
            && l.from.as_deref() == Some(&sa(node, 30082).to_string()[..])),
        "UDP NodePort, Local policy (replies come from the NodePort): {lines:?}"
    );
    assert!(
        peers_seen(s.pair.child(s.pod_a), "udp")
            .iter()
            .all(|p| p == node_pair::CLIENT_V4),
        "UDP: the client source address is kept"
    );

    // Cluster policy, backend on node B: SNAT to node A's address (rule 6), and the replies come back through it.
    let lines = client(&s.pair, s.probe.tcp_cmd(sa(node, 30083), 5));
    assert!(
        lines.iter().all(|l| l.ok
            && l.backend.as_deref() == Some("pod-b")
            && l.peer.as_deref() == Some(&sa(node, 30083).to_string()[..])),
        "TCP NodePort to a remote backend: {lines:?}"
    );
    let peers = peers_seen(s.pair.child(s.pod_b), "tcp");
    assert_eq!(peers.len(), 5, "pod B saw 5 connections: {peers:?}");
    assert!(
        peers.iter().all(|p| p == node_pair::NODE_A_V4),
        "a remote backend sees node A's address (SNAT): {peers:?}"
    );
    let lines = client(&s.pair, s.probe.udp_cmd(sa(node, 30084), 3, 2, true));
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.backend.as_deref() == Some("pod-b")),
        "UDP NodePort to a remote backend (connected socket: the reply must come from the NodePort): {lines:?}"
    );

    // No endpoints: RST, so connect() is refused at once (rule 8).
    let lines = client(&s.pair, s.probe.tcp_cmd(sa(node, 30085), 2));
    assert!(
        lines
            .iter()
            .all(|l| !l.ok && l.error.as_deref() == Some("ECONNREFUSED")),
        "a NodePort without endpoints refuses connections: {lines:?}"
    );
    // UDP: ICMP port unreachable, which a connected socket reports as ECONNREFUSED.
    let lines = client(&s.pair, s.probe.udp_cmd(sa(node, 30086), 1, 1, true));
    assert!(
        lines
            .iter()
            .all(|l| !l.ok && l.error.as_deref() == Some("ECONNREFUSED")),
        "a UDP NodePort without endpoints answers ICMP port unreachable: {lines:?}"
    );

    // Local policy without a local endpoint: dropped, never sent to node B (rule 5): the connection times out.
    let lines = client(&s.pair, s.probe.tcp_cmd(sa(node, 30089), 1));
    assert!(
        lines
            .iter()
            .all(|l| !l.ok && l.error.as_deref() == Some("ETIMEDOUT")),
        "Local policy without a local endpoint drops: {lines:?}"
    );
    assert!(
        peers_seen(s.pair.child(s.pod_b), "tcp").len() == 5,
        "nothing reached pod B through the Local Service"
    );

    // externalIP and LoadBalancer IPs routed to node A.
    for (vip, what) in [
        ("203.0.113.7", "externalIP"),
        ("203.0.113.100", "LoadBalancer IP, allowed source"),
    ] {
        let lines = client(&s.pair, s.probe.tcp_cmd(sa(vip, 80), 2));
        assert!(
            lines.iter().all(|l| l.ok
                && l.backend.as_deref() == Some("pod-a")
                && l.peer.as_deref() == Some(&sa(vip, 80).to_string()[..])),
            "{what}: {lines:?}"
        );
    }
    let lines = client(&s.pair, s.probe.tcp_cmd(sa("203.0.113.101", 80), 1));
    assert!(
        lines
            .iter()
            .all(|l| !l.ok && l.error.as_deref() == Some("ETIMEDOUT")),
        "LoadBalancer IP from outside loadBalancerSourceRanges is dropped: {lines:?}"
    );
    // Its NodePort ignores the ranges (rule 9).
    let lines = client(&s.pair, s.probe.tcp_cmd(sa(node, 30096), 1));
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.backend.as_deref() == Some("pod-a")),
        "the NodePort of a source-ranged LoadBalancer Service: {lines:?}"
    );
    drop(s.agent);
}

#[test]
fn nodeport_ipv6_local_and_remote_backends() {
    if !require_root("nodeport_ipv6_local_and_remote_backends") {
        return;
    }
    let mut s = setup(&manifest_main());
    let node = node_pair::NODE_A_V6;
    // A longer timeout than the probe's 2 s: once in about 40 runs one of these connections failed (not
    // investigated further; the suspect is neighbour discovery on fresh links, where a lost first segment costs a
    // 1 s retransmission). A datapath that never forwards still fails every time.
    let slow = ["--timeout-ms", "5000"];
    let lines = client(&s.pair, s.probe.tcp_cmd(sa(node, 30091), 3).args(slow));
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.backend.as_deref() == Some("pod-a")),
        "IPv6 TCP NodePort, Local policy: {lines:?}"
    );
    assert!(
        peers_seen(s.pair.child(s.pod_a), "tcp")
            .iter()
            .all(|p| p == node_pair::CLIENT_V6),
        "IPv6: Local policy keeps the client address"
    );
    let lines = client(&s.pair, s.probe.tcp_cmd(sa(node, 30093), 3).args(slow));
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.backend.as_deref() == Some("pod-b")),
        "IPv6 TCP NodePort to a remote backend (SNAT): {lines:?}"
    );
    assert!(
        peers_seen(s.pair.child(s.pod_b), "tcp")
            .iter()
            .all(|p| p == node_pair::NODE_A_V6),
        "IPv6: the remote backend sees node A's IPv6 address"
    );
    let lines = client(
        &s.pair,
        s.probe.udp_cmd(sa(node, 30094), 2, 1, true).args(slow),
    );
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.backend.as_deref() == Some("pod-b")),
        "IPv6 UDP NodePort to a remote backend: {lines:?}"
    );
    drop(s.agent);
}

#[test]
fn established_connection_survives_backend_changes() {
    if !require_root("established_connection_survives_backend_changes") {
        return;
    }
    let (a, b) = (node_pair::POD_A_V4, node_pair::POD_B_V4);
    let only_a = service("hold", "IPv4", (30087, 30088), "Cluster", &[(a, "node-a")]);
    let both = service(
        "hold",
        "IPv4",
        (30087, 30088),
        "Cluster",
        &[(a, "node-a"), (b, "node-b")],
    );
    let mut s = setup(&only_a);
    let frontend = format!("{}:30087", node_pair::NODE_A_V4);
    let to = sa(node_pair::NODE_A_V4, 30087);

    // A connection to pod A, held open while pod B is added: it stays on pod A (conntrack, rule 12).
    let cmd = s
        .probe
        .tcp_cmd(to, 1)
        .args(["--hold-ms", "3000", "--timeout-ms", "10000"])
        .netns(&s.pair.client);
    let held = s.pair.spawn(cmd).expect("starting the held connection");
    let held_pid = held.pid();
    wait_for_connections(s.pair.child(s.pod_a), 1);
    s.agent.update(
        &format!("{NODE_A}{both}"),
        &frontend,
        &[&format!("{a}:{TCP_PORT}"), &format!("{b}:{TCP_PORT}")],
        false,
    );
    let lines = wait_probe(&mut s.pair, held_pid);
    assert!(
        lines.len() == 1 && lines[0].ok && lines[0].backend.as_deref() == Some("pod-a"),
        "the held connection keeps its backend after a backend was added: {lines:?}"
    );

    // New connections spread over both backends now.
    let lines = client(&s.pair, s.probe.tcp_cmd(to, 16));
    assert!(lines.iter().all(|l| l.ok), "{lines:?}");

    // A connection held while the *other* backend is removed keeps working too.
    let before_a = peers_seen(s.pair.child(s.pod_a), "tcp").len();
    let before_b = peers_seen(s.pair.child(s.pod_b), "tcp").len();
    let cmd = s
        .probe
        .tcp_cmd(to, 1)
        .args(["--hold-ms", "3000", "--timeout-ms", "10000"])
        .netns(&s.pair.client);
    let held = s
        .pair
        .spawn(cmd)
        .expect("starting the second held connection");
    let held_pid = held.pid();
    let deadline = Instant::now() + RUN;
    let on_a = loop {
        let (na, nb) = (
            peers_seen(s.pair.child(s.pod_a), "tcp").len(),
            peers_seen(s.pair.child(s.pod_b), "tcp").len(),
        );
        if na > before_a {
            break true;
        }
        if nb > before_b {
            break false;
        }
        assert!(
            Instant::now() < deadline,
            "the held connection never reached a backend"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (keep, keep_id, other) = if on_a {
        ((a, "node-a"), "pod-a", "pod B")
    } else {
        ((b, "node-b"), "pod-b", "pod A")
    };
    let remaining = service("hold", "IPv4", (30087, 30088), "Cluster", &[keep]);
    s.agent.update(
        &format!("{NODE_A}{remaining}"),
        &frontend,
        &[&format!("{}:{TCP_PORT}", keep.0)],
        false,
    );
    let lines = wait_probe(&mut s.pair, held_pid);
    assert!(
        lines.len() == 1 && lines[0].ok && lines[0].backend.as_deref() == Some(keep_id),
        "the held connection on {keep_id} survives the removal of {other}: {lines:?}"
    );
    drop(s.agent);
}

/// Waits until a server has accepted `n` TCP connections.
fn wait_for_connections(server: &mut Child, n: usize) {
    let deadline = Instant::now() + RUN;
    while peers_seen(server, "tcp").len() < n {
        assert!(
            Instant::now() < deadline,
            "the server never saw {n} connections"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the spawned probe `pid` to exit and returns its lines.
fn wait_probe(pair: &mut NodePair, pid: u32) -> Vec<ProbeLine> {
    let child = pair.child_by_pid(pid).expect("the probe child");
    child
        .wait_timeout(RUN)
        .expect("waiting for the probe")
        .expect("the probe exited in time");
    child.probe_lines().expect("probe lines")
}

#[test]
fn established_nodeport_connections_survive_kill_9_and_restart_of_the_agent() {
    if !require_root("established_nodeport_connections_survive_kill_9_and_restart_of_the_agent") {
        return;
    }
    let (a, b) = (node_pair::POD_A_V4, node_pair::POD_B_V4);
    // Cluster policy over a local and a remote pod: connections take the plain DNAT path and the SNAT path.
    let both = service(
        "restart",
        "IPv4",
        (30089, 30090),
        "Cluster",
        &[(a, "node-a"), (b, "node-b")],
    );
    let mut s = setup(&both);
    let to = sa(node_pair::NODE_A_V4, 30089);
    let pids: Vec<u32> = (0..6)
        .map(|_| {
            let cmd = s
                .probe
                .tcp_cmd(to, 1)
                .args(["--hold-ms", "4000", "--timeout-ms", "15000"])
                .netns(&s.pair.client);
            s.pair.spawn(cmd).expect("held connection").pid()
        })
        .collect();
    let deadline = Instant::now() + RUN;
    while peers_seen(s.pair.child(s.pod_a), "tcp").len()
        + peers_seen(s.pair.child(s.pod_b), "tcp").len()
        < 6
    {
        assert!(
            Instant::now() < deadline,
            "the held connections never all reached a backend"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.agent.restart(&s.pair);
    let lines: Vec<ProbeLine> = pids
        .into_iter()
        .flat_map(|pid| wait_probe(&mut s.pair, pid))
        .collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        assert!(
            l.ok,
            "an established NodePort connection broke across kill -9 and restart: {l:?}"
        );
    }
    // And the restarted agent serves new connections.
    let fresh = client(&s.pair, s.probe.tcp_cmd(to, 8));
    assert!(fresh.iter().all(|l| l.ok), "{fresh:?}");
    drop(s.agent);
}

/// kube-proxy's `--nodeport-addresses` with a CIDR: node A gets a second address, 192.0.2.11, on its uplink, and
/// NodePorts listen only there; the Node's InternalIP 192.0.2.10 (still the SNAT address) serves none, so a
/// connection to it reaches node A's own stack, where nothing listens on the port.
#[test]
fn nodeport_addresses_limit_where_nodeports_listen() {
    if !require_root("nodeport_addresses_limit_where_nodeports_listen") {
        return;
    }
    let probe = probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    let uplink = pair.node_a_devices()[0].clone();
    pair.node_a
        .ip(&["addr", "add", "192.0.2.11/24", "dev", &uplink])
        .expect("a second address on node A's uplink");
    let cmd = probe
        .serve_cmd("pod-b", &[TCP_PORT], &[UDP_PORT])
        .netns(&pair.pod_b);
    let pod_b = pair.serve(cmd).expect("serving in pod B");
    let services = service(
        "remote",
        "IPv4",
        (30083, 30084),
        "Cluster",
        &[(node_pair::POD_B_V4, "node-b")],
    );
    let agent = NodeAgent::start(
        &agent_bin!(),
        &pair,
        &format!("{NODE_A}{services}"),
        &[
            "--node-address",
            "192.0.2.11",
            "--nodeport-addresses",
            "192.0.2.11/32",
        ],
    );

    let lines = client(&pair, probe.tcp_cmd(sa("192.0.2.11", 30083), 3));
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.backend.as_deref() == Some("pod-b")),
        "the NodePort on the address inside --nodeport-addresses: {lines:?}"
    );
    let peers = peers_seen(pair.child(pod_b), "tcp");
    assert!(
        peers.len() == 3 && peers.iter().all(|p| p == node_pair::NODE_A_V4),
        "the remote backend sees the node's primary address (SNAT), not the NodePort address: {peers:?}"
    );
    let lines = client(&pair, probe.tcp_cmd(sa(node_pair::NODE_A_V4, 30083), 2));
    assert!(
        lines
            .iter()
            .all(|l| !l.ok && l.error.as_deref() == Some("ECONNREFUSED")),
        "no NodePort on the InternalIP outside --nodeport-addresses (node A's stack refuses it): {lines:?}"
    );
    assert_eq!(
        peers_seen(pair.child(pod_b), "tcp").len(),
        3,
        "nothing more reached the backend"
    );
    drop(agent);
}
