//! `lb-agent monitor` end to end, through the real binary against a running agent: the events a test provokes
//! (a new flow, a reject, a drop) arrive with the right type, path, reason, Service and backend, from the socket LB
//! (a star topology's client) and from tc (an outside client of a node pair); `-o json` parses line by line; the
//! filters leave other Services' events out; a second reader is refused; stopping the monitor turns the events
//! off. Every packet stays inside the namespaces the tests create.

use std::path::Path;
use std::time::Duration;

use lb_tests::node_agent::{NODE_A, NodeAgent, client, sa, service};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{Agent, Child, Cmd, NetNs, Topology, agent_bin, require_root};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// `lb-agent monitor -o json --bpffs <pins> <extra>`, started and listening.
fn monitor(pins: &Path, extra: &[&str]) -> Child {
    monitor_in(None, pins, extra)
}

/// [`monitor`] inside `netns` (the node's namespace, where it names the interfaces as the node does).
fn monitor_in(netns: Option<&NetNs>, pins: &Path, extra: &[&str]) -> Child {
    let mut cmd = Cmd::new(agent_bin!())
        .args(["monitor", "-o", "json", "--bpffs"])
        .arg(pins)
        .args(extra)
        .label("lb-agent-monitor");
    if let Some(ns) = netns {
        cmd = cmd.netns(ns);
    }
    let mut child = cmd.spawn().expect("lb-agent monitor starts");
    let deadline = std::time::Instant::now() + WAIT;
    while !child.stderr().contains("Listening for events") {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("lb-agent monitor exited ({status}): {}", child.stderr());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lb-agent monitor never listened: {}",
            child.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The events printed so far (every stdout line must be one JSON object).
fn events(m: &Child) -> Vec<Value> {
    m.stdout_json::<Value>()
        .unwrap_or_else(|e| panic!("monitor output is not JSON lines ({e}):\n{}", m.stdout()))
        .into_iter()
        .filter(|e| e["type"] != "missed")
        .collect()
}

/// Waits for an event matching every `(field, value)`; returns it.
fn wait_event(m: &mut Child, want: &[(&str, &str)]) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(e) = events(m)
            .into_iter()
            .find(|e| want.iter().all(|(k, v)| e[*k].as_str() == Some(*v)))
        {
            return e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no event with {want:?}; got:\n{}\nstderr: {}",
            m.stdout(),
            m.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops the monitor as Ctrl-C would, and checks that it exits cleanly.
fn stop(mut m: Child) {
    m.signal(libc::SIGINT).expect("SIGINT");
    let status = m
        .wait_timeout(Duration::from_secs(10))
        .expect("wait")
        .expect("lb-agent monitor exits on SIGINT");
    assert!(status.success(), "monitor exit: {status}: {}", m.stderr());
}

/// A ServiceCIDR, `web` (10.96.0.10:80 -> backend 0), `other` (10.96.0.12:80 -> backend 0) and `empty`
/// (10.96.0.11:80, no endpoints).
const SOCKET_SERVICES: &str = r#"apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec:
  cidrs: [10.96.0.0/16]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: test-node}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: default}
spec:
  clusterIP: 10.96.0.12
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other-1, namespace: default, labels: {kubernetes.io/service-name: other}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: test-node}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
"#;

#[test]
fn monitor_shows_socket_lb_new_flows_rejects_and_drops_with_reason_and_backend() {
    if !require_root("monitor_shows_socket_lb_new_flows_rejects_and_drops_with_reason_and_backend")
    {
        return;
    }
    let probe = lb_tests::probe!();
    let mut topo = Topology::star(1).expect("topology");
    topo.serve(&probe, &[8080], &[]).expect("backend server");
    let agent = Agent::start(&agent_bin!(), &topo, SOCKET_SERVICES).expect("agent");
    let pins = agent.pins().to_path_buf();
    let connect = |to: &str| {
        topo.in_client(probe.tcp_cmd(to.parse().expect("address"), 1))
            .run(Duration::from_secs(60))
            .expect("client run")
            .probe_lines()
            .expect("client output")
    };

    let mut m = monitor(&pins, &[]);
    // A ring buffer has one reader: a second monitor is refused, and says why.
    let second = Cmd::new(agent_bin!())
        .args(["monitor", "--bpffs"])
        .arg(&pins)
        .label("lb-agent-monitor-2")
        .output(WAIT)
        .expect("second monitor runs");
    assert!(
        !second.status.success() && second.stderr.contains("already reads the events"),
        "a second monitor must be refused: {second:?}"
    );

    assert!(connect("10.96.0.10:80").iter().all(|l| l.ok));
    let flow = wait_event(&mut m, &[("type", "new-flow"), ("path", "socket")]);
    assert_eq!(flow["reason"], "new-flow", "{flow}");
    assert_eq!(flow["service"], "default/web:http", "{flow}");
    assert_eq!(flow["destination"], "10.96.0.10:80", "{flow}");
    assert_eq!(flow["backend"], "10.244.1.2:8080", "{flow}");
    assert_eq!(flow["protocol"], "tcp", "{flow}");
    assert!(
        flow["netns_cookie"].as_u64().is_some_and(|c| c != 0),
        "{flow}"
    );

    // Rule 8, no endpoints: ECONNREFUSED at connect(), the socket form of a reject.
    assert!(
        connect("10.96.0.11:80")
            .iter()
            .all(|l| l.error.as_deref() == Some("ECONNREFUSED"))
    );
    let reject = wait_event(&mut m, &[("type", "reject"), ("reason", "no-endpoints")]);
    assert_eq!(reject["service"], "default/empty:http", "{reject}");
    assert_eq!(reject["destination"], "10.96.0.11:80", "{reject}");
    assert_eq!(reject["path"], "socket", "{reject}");
    assert!(reject["backend"].is_null(), "{reject}");

    // An unallocated address of the service CIDR: EPERM, the socket form of a drop.
    assert!(
        connect("10.96.0.99:80")
            .iter()
            .all(|l| l.error.as_deref() == Some("EPERM"))
    );
    let drop = wait_event(
        &mut m,
        &[("type", "drop"), ("reason", "unallocated-cluster-ip")],
    );
    assert_eq!(drop["destination"], "10.96.0.99:80", "{drop}");
    assert!(drop["service"].is_null(), "{drop}");
    stop(m);

    // Filtered by Service: `web`'s flows stay out, `other`'s come through.
    let mut m = monitor(&pins, &["--service", "default/other"]);
    assert!(connect("10.96.0.10:80").iter().all(|l| l.ok));
    assert!(connect("10.96.0.12:80").iter().all(|l| l.ok));
    wait_event(
        &mut m,
        &[("type", "new-flow"), ("service", "default/other:http")],
    );
    let seen = events(&m);
    assert!(
        seen.iter().all(|e| e["service"] == "default/other:http"),
        "the filter let another Service through: {seen:?}"
    );
    stop(m);

    // Filtered by type, in the kernel: only drops are asked for, so the flow is not even emitted.
    let mut m = monitor(&pins, &["--type", "drop"]);
    assert!(connect("10.96.0.10:80").iter().all(|l| l.ok));
    connect("10.96.0.99:80");
    wait_event(&mut m, &[("type", "drop")]);
    let seen = events(&m);
    assert!(
        seen.iter().all(|e| e["type"] == "drop"),
        "--type drop let other types through: {seen:?}"
    );
    stop(m);
}

/// `lb-out`: a LoadBalancer IP (routed from the client to node A) whose source ranges leave the client out.
const LB_OUT: &str = r#"---
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
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-out-1, namespace: t, labels: {kubernetes.io/service-name: lb-out}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - {addresses: ["10.244.1.2"], conditions: {ready: true}, nodeName: node-a}
"#;

#[test]
fn monitor_shows_tc_new_flows_rejects_and_source_range_drops_from_outside() {
    if !require_root("monitor_shows_tc_new_flows_rejects_and_source_range_drops_from_outside") {
        return;
    }
    let probe = lb_tests::probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    let cmd = probe.serve_cmd("pod-b", &[8080], &[]).netns(&pair.pod_b);
    pair.serve(cmd).expect("serving in pod B");
    let manifest = [
        NODE_A,
        &service(
            "remote",
            "10.96.0.83",
            "IPv4",
            "Cluster",
            &[("http", "TCP", 80, 8080, 30083)],
            &[(node_pair::POD_B_V4, "node-b")],
            "",
        ),
        &service(
            "empty",
            "10.96.0.85",
            "IPv4",
            "Cluster",
            &[("http", "TCP", 80, 8080, 30085)],
            &[],
            "",
        ),
        LB_OUT,
    ]
    .concat();
    let agent = NodeAgent::start(&agent_bin!(), &pair, &manifest, &[]);
    let node = node_pair::NODE_A_V4;
    let uplink = pair.node_a_devices()[0].clone();
    let mut m = monitor_in(Some(&pair.node_a), agent.pins(), &[]);

    // A new flow from outside to a remote backend: tc picks it and SNATs it (rule 6).
    let lines = client(&pair, probe.tcp_cmd(sa(node, 30083), 1));
    assert!(lines.iter().all(|l| l.ok), "{lines:?}");
    let flow = wait_event(&mut m, &[("type", "new-flow"), ("path", "tc")]);
    assert_eq!(flow["service"], "t/remote:http", "{flow}");
    assert_eq!(flow["destination"], format!("{node}:30083"), "{flow}");
    assert_eq!(
        flow["backend"],
        format!("{}:8080", node_pair::POD_B_V4),
        "{flow}"
    );
    assert_eq!(flow["snat"], true, "{flow}");
    assert_eq!(flow["interface"].as_str(), Some(uplink.as_str()), "{flow}");
    assert!(
        flow["client"]
            .as_str()
            .is_some_and(|c| c.starts_with(&format!("{}:", node_pair::CLIENT_V4))),
        "{flow}"
    );

    // No endpoints: tc answers the SYN with a RST (rule 8).
    let lines = client(&pair, probe.tcp_cmd(sa(node, 30085), 1));
    assert!(
        lines
            .iter()
            .all(|l| l.error.as_deref() == Some("ECONNREFUSED")),
        "{lines:?}"
    );
    let reject = wait_event(&mut m, &[("type", "reject"), ("path", "tc")]);
    assert_eq!(reject["reason"], "no-endpoints", "{reject}");
    assert_eq!(reject["service"], "t/empty:http", "{reject}");
    assert_eq!(reject["destination"], format!("{node}:30085"), "{reject}");

    // Outside the LoadBalancer's source ranges: dropped (rule 9); the client times out.
    let lines = client(&pair, probe.tcp_cmd(sa("203.0.113.101", 80), 1));
    assert!(lines.iter().all(|l| !l.ok), "{lines:?}");
    let dropped = wait_event(&mut m, &[("type", "drop"), ("reason", "source-range")]);
    assert_eq!(dropped["service"], "t/lb-out:http", "{dropped}");
    assert_eq!(dropped["destination"], "203.0.113.101:80", "{dropped}");
    assert_eq!(dropped["path"], "tc", "{dropped}");

    // Filtered by address: only what involves the LoadBalancer IP.
    stop(m);
    let mut m = monitor_in(
        Some(&pair.node_a),
        agent.pins(),
        &["--address", "203.0.113.101"],
    );
    assert!(
        client(&pair, probe.tcp_cmd(sa(node, 30083), 1))
            .iter()
            .all(|l| l.ok)
    );
    client(&pair, probe.tcp_cmd(sa("203.0.113.101", 80), 1));
    wait_event(
        &mut m,
        &[("type", "drop"), ("destination", "203.0.113.101:80")],
    );
    let seen = events(&m);
    assert!(
        seen.iter().all(|e| e["destination"] == "203.0.113.101:80"),
        "--address let other events through: {seen:?}"
    );
    stop(m);

    // With the XDP fast path in front, the same drop happens in XDP, and says so.
    let mut agent = agent;
    agent.restart_with_flags(&pair, &["--xdp", "--xdp-mode", "generic"]);
    let mut m = monitor_in(Some(&pair.node_a), agent.pins(), &["--type", "drop"]);
    client(&pair, probe.tcp_cmd(sa("203.0.113.101", 80), 1));
    let dropped = wait_event(&mut m, &[("type", "drop"), ("path", "xdp")]);
    assert_eq!(dropped["reason"], "source-range", "{dropped}");
    assert_eq!(dropped["service"], "t/lb-out:http", "{dropped}");
    assert_eq!(
        dropped["interface"].as_str(),
        Some(uplink.as_str()),
        "{dropped}"
    );
    stop(m);
    drop(agent);
}
