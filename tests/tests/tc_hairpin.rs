//! Hairpin (rule 6: a pod reaching itself through a VIP), on the paths this design has, with the real agent in
//! node A of a [`NodePair`] and real traffic:
//! - a pod on node A (in the agent's cgroup, as every pod of a node is) reaching a NodePort or ClusterIP whose only
//!   backend is itself: the socket LB connects it to its own address, no packet leaves the pod, nothing to SNAT;
//! - a pod on node B (no lb there) reaching node A's NodePort whose only backend is itself: the packet enters node
//!   A through its tc-attached link to node B and goes back out of it; SNAT to node A's address makes it a
//!   conversation between the pod and node A, not with itself;
//! - a pod on node A whose interface is one of `--devices` (not the default: pods normally use the socket LB):
//!   the tc path SNATs the hairpin too, or the pod would drop a packet from its own address as a martian.

use lb_tests::node_agent::{NODE_A, NodeAgent, RUN, peers_seen, sa, service};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{Cmd, Probe, ProbeLine, agent_bin, probe, require_root};

struct Setup {
    // Declared first: dropped before the pair.
    agent: NodeAgent,
    pair: NodePair,
    probe: Probe,
    pod_a: usize,
    pod_b: usize,
}

/// With `pod_device`, the tc programs go on pod A's interface too (`--devices` is repeatable: its values add up).
fn setup(pod_device: bool) -> Setup {
    let probe = probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    let ap = format!("ap-{}", pair.token());
    let extra: &[&str] = if pod_device { &["--devices", &ap] } else { &[] };
    let cmds = [
        probe.serve_cmd("pod-a", &[8080], &[]).netns(&pair.pod_a),
        probe.serve_cmd("pod-b", &[8080], &[]).netns(&pair.pod_b),
    ];
    let mut ids = Vec::new();
    for cmd in cmds {
        ids.push(pair.serve(cmd).expect("serving in a pod"));
    }
    let (a, b) = (node_pair::POD_A_V4, node_pair::POD_B_V4);
    let port = |np| [("http", "TCP", 80, 8080, np)];
    let services = [
        service(
            "self-a",
            "10.96.4.1",
            "IPv4",
            "Cluster",
            &port(30270),
            &[(a, "node-a")],
            "",
        ),
        service(
            "self-b",
            "10.96.4.2",
            "IPv4",
            "Cluster",
            &port(30271),
            &[(b, "node-b")],
            "",
        ),
    ]
    .concat();
    let agent = NodeAgent::start(&agent_bin!(), &pair, &format!("{NODE_A}{services}"), extra);
    Setup {
        agent,
        pair,
        probe,
        pod_a: ids[0],
        pod_b: ids[1],
    }
}

fn run(cmd: Cmd) -> Vec<ProbeLine> {
    cmd.run(RUN)
        .expect("running the probe")
        .probe_lines()
        .expect("probe lines")
}

#[test]
fn a_pod_reaches_itself_through_nodeports_and_cluster_ips() {
    if !require_root("a_pod_reaches_itself_through_nodeports_and_cluster_ips") {
        return;
    }
    let mut s = setup(false);

    // Pod A through the socket LB (its processes are in the agent's cgroup).
    for to in [sa(node_pair::NODE_A_V4, 30270), sa("10.96.4.1", 80)] {
        let cmd = s
            .probe
            .tcp_cmd(to, 3)
            .netns(&s.pair.pod_a)
            .cgroup(s.pair.cgroup());
        let lines = run(cmd);
        assert!(
            lines.iter().all(|l| l.ok
                && l.backend.as_deref() == Some("pod-a")
                && l.peer.as_deref() == Some(&to.to_string()[..])),
            "pod A reaches itself through {to} and sees {to} as its peer: {lines:?}"
        );
    }
    let peers = peers_seen(s.pair.child(s.pod_a), "tcp");
    assert!(
        peers.len() == 6 && peers.iter().all(|p| p == node_pair::POD_A_V4),
        "the socket LB connected pod A to its own address, no SNAT: {peers:?}"
    );

    // Pod B through node A's NodePort (tc on node A's link to node B, in and out of the same interface).
    let to = sa(node_pair::NODE_A_V4, 30271);
    let lines = run(s.probe.tcp_cmd(to, 3).netns(&s.pair.pod_b));
    assert!(
        lines.iter().all(|l| l.ok
            && l.backend.as_deref() == Some("pod-b")
            && l.peer.as_deref() == Some(&to.to_string()[..])),
        "pod B reaches itself through node A's NodePort: {lines:?}"
    );
    let peers = peers_seen(s.pair.child(s.pod_b), "tcp");
    assert!(
        peers.len() == 3 && peers.iter().all(|p| p == node_pair::NODE_A_V4),
        "hairpin through tc is SNATed to node A's address: {peers:?}"
    );
    drop(s.agent);
}

#[test]
fn hairpin_through_tc_on_a_pod_interface_is_snated() {
    if !require_root("hairpin_through_tc_on_a_pod_interface_is_snated") {
        return;
    }
    let mut s = setup(true);
    assert!(
        s.agent
            .log()
            .contains(&format!("device=ap-{}", s.pair.token())),
        "tc programs on pod A's interface:\n{}",
        s.agent.log()
    );
    // Outside the cgroup: no socket LB, the packets go through node A's tc on `ap`.
    let to = sa(node_pair::NODE_A_V4, 30270);
    let lines = run(s.probe.tcp_cmd(to, 3).netns(&s.pair.pod_a));
    assert!(
        lines.iter().all(|l| l.ok
            && l.backend.as_deref() == Some("pod-a")
            && l.peer.as_deref() == Some(&to.to_string()[..])),
        "pod A reaches itself through tc on its own interface: {lines:?}"
    );
    let peers = peers_seen(s.pair.child(s.pod_a), "tcp");
    assert!(
        peers.len() == 3 && peers.iter().all(|p| p == node_pair::NODE_A_V4),
        "the hairpin is SNATed to node A's address: {peers:?}"
    );
    drop(s.agent);
}
