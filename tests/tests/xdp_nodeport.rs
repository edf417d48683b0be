//! The XDP fast path with real traffic: the agent runs in node A of a [`NodePair`] with `--xdp` in generic mode,
//! and in native mode (veth's native XDP_TX/redirect needs NAPI on the receiving peers: GRO is turned on there),
//! an outside client moves data through a
//! NodePort whose backend is on node B (DNAT + SNAT, Cluster policy), and the per-reason counters must show that
//! most packets of both directions were translated and sent by XDP, not tc. Every packet stays inside the
//! namespaces the test creates.
//!
//! The client's and the backend's interfaces have checksum offload off: with it, veth hands packets on with a
//! partial checksum (CHECKSUM_PARTIAL) that nothing ever verifies, and a wrong XDP checksum update would go
//! unnoticed. With full checksums the receiving stacks verify every segment, so a bad update breaks the transfer.

use std::time::{Duration, Instant};

use lb_agent::datapath::packet_maps::PacketMaps;
use lb_common::reason;
use lb_tests::node_agent::{NodeAgent, xdp_shown};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{Cmd, Probe, ProbeLine, agent_bin, probe, require_root};

const RUN: Duration = Duration::from_secs(60);
const SYNC: Duration = Duration::from_secs(20);
const ECHO_PORT: u16 = 9000;
const HTTP_PORT: u16 = 8080;

const MANIFEST: &str = r#"apiVersion: v1
kind: Node
metadata:
  name: node-a
spec:
  podCIDRs: [10.244.1.0/24, "fd00:244:1::/64"]
status:
  addresses:
    - {type: InternalIP, address: 192.0.2.10}
    - {type: InternalIP, address: "2001:db8:1::10"}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.40
  ports:
    - {name: echo, protocol: TCP, port: 9000, targetPort: 9000, nodePort: 30200}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: t
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
ports:
  - {name: echo, protocol: TCP, port: 9000}
endpoints:
  - {addresses: [10.244.2.2], conditions: {ready: true}, nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: echo6, namespace: t}
spec:
  type: NodePort
  clusterIP: "fd00:96::40"
  ipFamilies: [IPv6]
  ports:
    - {name: echo, protocol: TCP, port: 9000, targetPort: 9000, nodePort: 30201}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo6-1
  namespace: t
  labels: {kubernetes.io/service-name: echo6}
addressType: IPv6
ports:
  - {name: echo, protocol: TCP, port: 9000}
endpoints:
  - {addresses: ["fd00:244:2::2"], conditions: {ready: true}, nodeName: node-b}
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
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-in-1
  namespace: t
  labels: {kubernetes.io/service-name: lb-in}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
endpoints:
  - {addresses: [10.244.2.2], conditions: {ready: true}, nodeName: node-b}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-out-1
  namespace: t
  labels: {kubernetes.io/service-name: lb-out}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
endpoints:
  - {addresses: [10.244.2.2], conditions: {ready: true}, nodeName: node-b}
"#;

/// Starts the agent in node A with `--xdp --xdp-mode <mode>` and checks its log says XDP took every device.
fn start_xdp_agent(pair: &NodePair, mode: &str) -> NodeAgent {
    let agent = NodeAgent::start(
        &agent_bin!(),
        pair,
        MANIFEST,
        &["--xdp", "--xdp-mode", mode],
    );
    assert_xdp_attached(&agent, pair);
    agent
}

fn assert_xdp_attached(agent: &NodeAgent, pair: &NodePair) {
    let log = agent.log();
    for dev in pair.node_a_devices() {
        assert!(
            log.lines()
                .any(|l| l.contains("XDP fast path attached") && l.contains(&dev)),
            "no XDP on {dev}:\n{log}"
        );
    }
}

struct Setup {
    agent: NodeAgent,
    pair: NodePair,
    probe: Probe,
}

fn setup(mode: &'static str) -> Setup {
    let probe = probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    let t = pair.token().to_owned();
    // Full checksums from both ends (see the module doc), no segmentation offload.
    let off = ["tx", "off", "tso", "off", "gso", "off"];
    pair.client
        .ethtool(&format!("cl-{t}"), &off)
        .expect("ethtool");
    pair.pod_b
        .ethtool(&format!("pb-{t}"), &off)
        .expect("ethtool");
    if mode == "native" {
        // veth's native XDP_TX / redirect put frames on the peer's NAPI queue, which exists only with XDP or GRO
        // on the peer: the client's end (replies redirected out of the uplink) and node B's end of the link.
        pair.client
            .ethtool(&format!("cl-{t}"), &["gro", "on"])
            .expect("ethtool");
        pair.node_b
            .ethtool(&format!("ba-{t}"), &["gro", "on"])
            .expect("ethtool");
    }
    let serve = probe
        .serve_cmd("pod-b", &[HTTP_PORT], &[])
        .arg("--echo-port")
        .arg(ECHO_PORT.to_string())
        .netns(&pair.pod_b);
    pair.serve(serve).expect("serving in pod B");
    let agent = start_xdp_agent(&pair, mode);
    Setup { agent, pair, probe }
}

fn counts(pair: &NodePair) -> Vec<u64> {
    PacketMaps::open(pair.bpf_dir().path())
        .expect("opening the pinned maps")
        .reason_counts()
        .expect("reading LB_DROP_STATS")
}

fn delta(before: &[u64], after: &[u64], why: u32) -> u64 {
    after[why as usize] - before[why as usize]
}

/// A bulk echo exchange from the client through `to`; panics unless all data came back intact.
fn echo(s: &Setup, to: &str, rounds: usize, size: usize) {
    let lines = s
        .probe
        .cmd()
        .args(["echo", "--to", to])
        .args(["--rounds", &rounds.to_string(), "--size", &size.to_string()])
        .netns(&s.pair.client)
        .run(RUN)
        .expect("running the echo client")
        .probe_lines()
        .expect("echo lines");
    assert!(
        lines.len() == 1 && lines[0].ok,
        "the echo transfer through {to} failed: {lines:?}"
    );
}

/// Most packets of both directions went through XDP: per direction, tc counts a packet it translates twice
/// (ingress and egress), XDP once.
fn assert_mostly_xdp(before: &[u64], after: &[u64], what: &str) {
    let xdp_fwd = delta(before, after, reason::XDP_FORWARD);
    let xdp_rep = delta(before, after, reason::XDP_REPLY);
    let tc_fwd = delta(before, after, reason::CONNTRACK) / 2;
    let tc_rep = delta(before, after, reason::REPLY) / 2;
    eprintln!(
        "{what}: xdp forward {xdp_fwd}, tc forward {tc_fwd}, xdp reply {xdp_rep}, tc reply {tc_rep}"
    );
    assert!(
        xdp_fwd >= 500 && xdp_fwd * 10 >= (xdp_fwd + tc_fwd) * 8,
        "{what}: client -> backend packets mostly not through XDP (xdp {xdp_fwd}, tc {tc_fwd})"
    );
    assert!(
        xdp_rep >= 500 && xdp_rep * 10 >= (xdp_rep + tc_rep) * 8,
        "{what}: backend -> client packets mostly not through XDP (xdp {xdp_rep}, tc {tc_rep})"
    );
}

#[test]
fn xdp_generic_forwards_bulk_nodeport_traffic_to_a_remote_backend_v4_and_v6() {
    if !require_root("xdp_generic_forwards_bulk_nodeport_traffic_to_a_remote_backend_v4_and_v6") {
        return;
    }
    let s = setup("generic");
    for (to, what) in [
        (format!("{}:30200", node_pair::NODE_A_V4), "IPv4"),
        (format!("[{}]:30201", node_pair::NODE_A_V6), "IPv6"),
    ] {
        let before = counts(&s.pair);
        echo(&s, &to, 40, 64 * 1024);
        let after = counts(&s.pair);
        assert_mostly_xdp(&before, &after, what);
    }
    let log = s.agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("XDP fast path attached") && l.contains("generic")),
        "the log names the mode:\n{log}"
    );
}

#[test]
fn xdp_drops_sources_outside_ranges_and_passes_allowed_ones() {
    if !require_root("xdp_drops_sources_outside_ranges_and_passes_allowed_ones") {
        return;
    }
    let s = setup("generic");
    let before = counts(&s.pair);
    let out: Vec<ProbeLine> = s
        .probe
        .tcp_cmd("203.0.113.101:80".parse().expect("address"), 1)
        .args(["--timeout-ms", "1000"])
        .netns(&s.pair.client)
        .run(RUN)
        .expect("client")
        .probe_lines()
        .expect("lines");
    assert!(
        out.len() == 1 && !out[0].ok,
        "a client outside lb-out's ranges must not connect: {out:?}"
    );
    let after = counts(&s.pair);
    assert!(
        delta(&before, &after, reason::SOURCE_RANGE) >= 1,
        "the source-range drop was not counted"
    );
    let ok: Vec<ProbeLine> = s
        .probe
        .tcp_cmd("203.0.113.100:80".parse().expect("address"), 3)
        .netns(&s.pair.client)
        .run(RUN)
        .expect("client")
        .probe_lines()
        .expect("lines");
    assert!(
        ok.len() == 3 && ok.iter().all(|l| l.ok),
        "an allowed client connects: {ok:?}"
    );
}

/// Waits until no interface of node A shows an XDP program.
fn wait_no_xdp(pair: &NodePair, after: &str) {
    // The kernel releases an unpinned link from a workqueue (bpf_link_put_deferred): wait for it.
    let deadline = Instant::now() + SYNC;
    for dev in pair.node_a_devices() {
        while xdp_shown(pair, &dev) {
            assert!(
                Instant::now() < deadline,
                "XDP still attached to {dev} after {after}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn an_agent_restarted_without_xdp_detaches_it_and_traffic_goes_on_through_tc() {
    if !require_root("an_agent_restarted_without_xdp_detaches_it_and_traffic_goes_on_through_tc") {
        return;
    }
    let mut s = setup("generic");
    for dev in s.pair.node_a_devices() {
        assert!(
            xdp_shown(&s.pair, &dev),
            "XDP is attached to {dev} at first"
        );
    }
    s.agent.restart_with_flags(&s.pair, &[]);
    wait_no_xdp(&s.pair, "a restart without --xdp");
    let before = counts(&s.pair);
    echo(&s, &format!("{}:30200", node_pair::NODE_A_V4), 4, 16 * 1024);
    let after = counts(&s.pair);
    assert_eq!(
        delta(&before, &after, reason::XDP_FORWARD),
        0,
        "no XDP forwarding without --xdp"
    );
    assert!(
        delta(&before, &after, reason::CONNTRACK) > 0,
        "tc carried the flow"
    );
}

#[test]
fn xdp_established_connection_survives_kill_9_and_cleanup_detaches_xdp() {
    if !require_root("xdp_established_connection_survives_kill_9_and_cleanup_detaches_xdp") {
        return;
    }
    let mut s = setup("generic");
    let to = format!("{}:30200", node_pair::NODE_A_V4);
    // About 8 s of rounds on one connection; the agent is killed and restarted in the middle.
    let cmd = s
        .probe
        .cmd()
        .args(["echo", "--to", &to])
        .args(["--rounds", "40", "--size", "16384", "--pause-ms", "200"])
        .netns(&s.pair.client);
    let pid = s.pair.spawn(cmd).expect("echo client").pid();
    std::thread::sleep(Duration::from_millis(1500));
    s.agent.restart(&s.pair);
    assert_xdp_attached(&s.agent, &s.pair);
    let after_restart = counts(&s.pair);
    let child = s.pair.child_by_pid(pid).expect("the echo child");
    child
        .wait_timeout(RUN)
        .expect("waiting for the echo client")
        .expect("the echo client finished in time");
    let lines = child.probe_lines().expect("echo lines");
    assert!(
        lines.len() == 1 && lines[0].ok,
        "the established connection broke across kill -9 and restart: {lines:?}"
    );
    let end = counts(&s.pair);
    assert!(
        delta(&after_restart, &end, reason::XDP_FORWARD) > 0
            && delta(&after_restart, &end, reason::XDP_REPLY) > 0,
        "after the restart the flow is on the XDP fast path again"
    );
    // Cleanup leaves no XDP program on node A's interfaces.
    let devices = s.pair.node_a_devices();
    for dev in &devices {
        assert!(
            xdp_shown(&s.pair, dev),
            "XDP is attached to {dev} before cleanup"
        );
    }
    drop(s.agent);
    let out = Cmd::new(agent_bin!())
        .arg("cleanup")
        .arg("--bpffs")
        .arg(s.pair.bpf_dir().path())
        .netns(&s.pair.node_a)
        .run(RUN)
        .expect("lb-agent cleanup");
    assert!(out.status.success(), "cleanup failed: {}", out.stderr);
    wait_no_xdp(&s.pair, "cleanup");
}

#[test]
fn xdp_native_forwards_bulk_nodeport_traffic_to_a_remote_backend_v4_and_v6() {
    if !require_root("xdp_native_forwards_bulk_nodeport_traffic_to_a_remote_backend_v4_and_v6") {
        return;
    }
    let s = setup("native");
    for (to, what) in [
        (format!("{}:30200", node_pair::NODE_A_V4), "IPv4 native"),
        (format!("[{}]:30201", node_pair::NODE_A_V6), "IPv6 native"),
    ] {
        let before = counts(&s.pair);
        echo(&s, &to, 40, 64 * 1024);
        let after = counts(&s.pair);
        assert_mostly_xdp(&before, &after, what);
    }
    let log = s.agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("XDP fast path attached") && l.contains("native")),
        "the log names the mode:\n{log}"
    );
}
