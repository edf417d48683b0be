//! The per-packet datapath with real traffic beyond plain TCP/UDP: SCTP through NodePorts (port change, CRC32c
//! updated in flight) and UDP datagrams larger than the MTU (IP fragments, translated through `LB_FRAGMENTS`), to a
//! backend on node A and one on node B (SNAT), IPv4 and IPv6. The agent runs inside node A of a
//! [`NodePair`]; every packet stays inside the namespaces the test creates.
//!
//! SCTP: this kernel has no SCTP stack (`CONFIG_IP_SCTP` is not set and modules are off, so
//! `socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)` fails with EPROTONOSUPPORT), so `lb-probe sctp` / `sctp-serve` speak
//! SCTP over raw sockets: a real INIT from the client, a real INIT-ACK from the backend, each with its CRC32c
//! computed by the probe and checked by the receiver. The packets cross real veths, the real tc programs and
//! the nodes' forwarding; only the association state machine is missing, which the datapath never sees anyway
//! (it translates ports and tracks the flow, it does not read chunks).

use lb_tests::node_agent::{NODE_A, NodeAgent, client, peers_seen, sa, server_events, service};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{Probe, agent_bin, probe, require_root};

const UDP_PORT: u16 = 5353;
const SCTP_PORT: u16 = 9000;

struct Setup {
    // Declared first: dropped before the pair.
    agent: NodeAgent,
    pair: NodePair,
    probe: Probe,
    pod_a: usize,
    pod_b: usize,
}

/// The pair with `servers` started in pod A and pod B (given the identity), and the agent on `services`.
fn setup(services: &str, sctp: bool) -> Setup {
    let probe = probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    let mut ids = [0usize; 2];
    for (k, id) in ["pod-a", "pod-b"].into_iter().enumerate() {
        let cmd = if sctp {
            probe.sctp_serve_cmd(id, SCTP_PORT)
        } else {
            probe.serve_cmd(id, &[], &[UDP_PORT])
        };
        let ns = if k == 0 { &pair.pod_a } else { &pair.pod_b };
        let cmd = cmd.netns(ns);
        ids[k] = pair.serve(cmd).expect("starting a pod's server");
    }
    let agent = NodeAgent::start(&agent_bin!(), &pair, &format!("{NODE_A}{services}"), &[]);
    Setup {
        agent,
        pair,
        probe,
        pod_a: ids[0],
        pod_b: ids[1],
    }
}

/// Checks that the socket API cannot open SCTP sockets here, which is why the probe uses raw ones; if a kernel
/// with SCTP runs this, the doc comment above is out of date and says so.
fn sctp_sockets_available() -> bool {
    // SAFETY: plain socket(2) call; a valid descriptor is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd >= 0 {
        // SAFETY: fd is a descriptor we own.
        unsafe { libc::close(fd) };
        return true;
    }
    false
}

#[test]
fn sctp_nodeport_to_local_and_remote_backends_with_port_change() {
    if !require_root("sctp_nodeport_to_local_and_remote_backends_with_port_change") {
        return;
    }
    eprintln!(
        "SCTP sockets on this kernel: {} (the probe uses raw sockets either way)",
        sctp_sockets_available()
    );
    let (a4, b4, a6, b6) = (
        node_pair::POD_A_V4,
        node_pair::POD_B_V4,
        node_pair::POD_A_V6,
        node_pair::POD_B_V6,
    );
    let port = |np| [("sctp", "SCTP", 9100, SCTP_PORT, np)];
    let services = [
        service(
            "sl",
            "10.96.1.1",
            "IPv4",
            "Local",
            &port(30200),
            &[(a4, "node-a")],
            "",
        ),
        service(
            "sr",
            "10.96.1.2",
            "IPv4",
            "Cluster",
            &port(30201),
            &[(b4, "node-b")],
            "",
        ),
        service(
            "sl6",
            "fd00:96::1:1",
            "IPv6",
            "Local",
            &port(30202),
            &[(a6, "node-a")],
            "",
        ),
        service(
            "sr6",
            "fd00:96::1:2",
            "IPv6",
            "Cluster",
            &port(30203),
            &[(b6, "node-b")],
            "",
        ),
    ]
    .concat();
    let mut s = setup(&services, true);
    let cases = [
        (
            node_pair::NODE_A_V4,
            30200,
            "pod-a",
            node_pair::CLIENT_V4,
            41000u16,
        ),
        (
            node_pair::NODE_A_V4,
            30201,
            "pod-b",
            node_pair::NODE_A_V4,
            42000,
        ),
        (
            node_pair::NODE_A_V6,
            30202,
            "pod-a",
            node_pair::CLIENT_V6,
            43000,
        ),
        (
            node_pair::NODE_A_V6,
            30203,
            "pod-b",
            node_pair::NODE_A_V6,
            44000,
        ),
    ];
    for (node, node_port, backend, seen_as, sport) in cases {
        let (before_a, before_b) = (
            server_events(s.pair.child(s.pod_a), "sctp").len(),
            server_events(s.pair.child(s.pod_b), "sctp").len(),
        );
        let to = sa(node, node_port);
        // A longer timeout than the probe's 1 s: the first packet on a fresh IPv6 link waits for neighbour
        // discovery.
        let lines = client(
            &s.pair,
            s.probe
                .sctp_cmd(to, 4, sport)
                .args(["--timeout-ms", "5000"]),
        );
        assert_eq!(lines.len(), 4, "{to}: {lines:?}");
        for (i, l) in lines.iter().enumerate() {
            assert!(
                l.ok && l.backend.as_deref() == Some(backend),
                "{to}: the INIT-ACK comes from {backend} with a right CRC32c: {l:?}"
            );
            assert_eq!(
                l.from.as_deref(),
                Some(&to.to_string()[..]),
                "{to}: the reply's source is the NodePort again (port 9000 -> {node_port}): {l:?}"
            );
            assert_eq!(
                l.port,
                Some(sport + i as u16),
                "{to}: the reply reaches the INIT's source port: {l:?}"
            );
        }
        let server = if backend == "pod-a" { s.pod_a } else { s.pod_b };
        let (before, other, other_before) = if backend == "pod-a" {
            (before_a, s.pod_b, before_b)
        } else {
            (before_b, s.pod_a, before_a)
        };
        let events = server_events(s.pair.child(server), "sctp");
        let new = &events[before..];
        assert_eq!(new.len(), 4, "{backend} got the 4 INITs once each: {new:?}");
        assert!(
            new.iter().all(|e| e.ok && e.port == Some(SCTP_PORT)),
            "{backend} got the INITs on the target port with a right CRC32c after the rewrite: {new:?}"
        );
        let peers: Vec<String> = peers_seen(s.pair.child(server), "sctp")[before..].to_vec();
        assert!(
            peers.iter().all(|p| p == seen_as),
            "{backend} sees {seen_as} as the source (Local keeps the client, Cluster to node B SNATs): {peers:?}"
        );
        assert_eq!(
            server_events(s.pair.child(other), "sctp").len(),
            other_before,
            "nothing of {to} reached the other pod"
        );
    }
    let flows: Vec<_> = s
        .agent
        .conntrack()
        .into_iter()
        .filter(|r| r.protocol == "SCTP" && r.direction == "forward")
        .collect();
    assert_eq!(
        flows.len(),
        16,
        "one forward conntrack entry per SCTP flow (4 source ports x 4 NodePorts): {flows:?}"
    );
    drop(s.agent);
}

#[test]
fn fragmented_udp_through_nodeports_arrives_and_returns_intact() {
    if !require_root("fragmented_udp_through_nodeports_arrives_and_returns_intact") {
        return;
    }
    let (a4, b4, a6, b6) = (
        node_pair::POD_A_V4,
        node_pair::POD_B_V4,
        node_pair::POD_A_V6,
        node_pair::POD_B_V6,
    );
    let port = |np| [("dns", "UDP", 53, UDP_PORT, np)];
    let services = [
        service(
            "fl",
            "10.96.1.11",
            "IPv4",
            "Local",
            &port(30210),
            &[(a4, "node-a")],
            "",
        ),
        service(
            "fr",
            "10.96.1.12",
            "IPv4",
            "Cluster",
            &port(30211),
            &[(b4, "node-b")],
            "",
        ),
        service(
            "fl6",
            "fd00:96::1:11",
            "IPv6",
            "Local",
            &port(30212),
            &[(a6, "node-a")],
            "",
        ),
        service(
            "fr6",
            "fd00:96::1:12",
            "IPv6",
            "Cluster",
            &port(30213),
            &[(b6, "node-b")],
            "",
        ),
    ]
    .concat();
    let mut s = setup(&services, false);
    let cases = [
        (node_pair::NODE_A_V4, 30210, "pod-a", node_pair::CLIENT_V4),
        (node_pair::NODE_A_V4, 30211, "pod-b", node_pair::NODE_A_V4),
        (node_pair::NODE_A_V6, 30212, "pod-a", node_pair::CLIENT_V6),
        (node_pair::NODE_A_V6, 30213, "pod-b", node_pair::NODE_A_V6),
    ];
    for (node, node_port, backend, seen_as) in cases {
        for size in [3000usize, 8000] {
            let server = if backend == "pod-a" { s.pod_a } else { s.pod_b };
            let before = server_events(s.pair.child(server), "udp").len();
            let stats_before = s.agent.stats();
            let to = sa(node, node_port);
            // Two sockets (two flows) of three datagrams each: later datagrams of a flow follow its conntrack
            // entry, and each datagram's fragments the fragment entry of its own identification.
            let lines = client(
                &s.pair,
                s.probe.udp_cmd(to, 3, 2, true).args([
                    "--size",
                    &size.to_string(),
                    "--timeout-ms",
                    "5000",
                ]),
            );
            assert_eq!(lines.len(), 6, "{to}, {size} bytes: {lines:?}");
            assert!(
                lines.iter().all(|l| l.ok
                    && l.len == Some(size)
                    && l.backend.as_deref() == Some(backend)
                    && l.from.as_deref() == Some(&to.to_string()[..])),
                "{to}: {size}-byte datagrams (fragmented over the 1500-byte MTU) reach {backend} and come back \
                 intact from the NodePort: {lines:?}"
            );
            let events = server_events(s.pair.child(server), "udp");
            let new = &events[before..];
            assert!(
                new.len() == 6 && new.iter().all(|e| e.len == Some(size)),
                "{backend} reassembled six whole {size}-byte datagrams: {new:?}"
            );
            let peers = &peers_seen(s.pair.child(server), "udp")[before..];
            assert!(
                peers.iter().all(|p| p == seen_as),
                "{backend} sees {seen_as} as the source of every datagram: {peers:?}"
            );
            // Every datagram has at least one later fragment each way, and each was translated through
            // LB_FRAGMENTS (at ingress, and at egress for the SNAT and reverse-NAT hooks); none passed untouched.
            let stats = s.agent.stats();
            let followed =
                stats.reason("fragment-followed") - stats_before.reason("fragment-followed");
            assert!(
                followed >= 12,
                "{to}, {size} bytes: at least 12 later fragments followed their first one (6 datagrams, both \
                 ways), counted {followed}"
            );
            assert_eq!(
                stats.reason("fragment"),
                stats_before.reason("fragment"),
                "{to}: no fragment passed untranslated"
            );
        }
    }
    drop(s.agent);
}
