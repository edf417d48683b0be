//! The per-packet datapath over a flow's life, with real traffic through node A of a [`NodePair`] (the real agent
//! in node A's namespace, tc programs on its two links) and the agent's own CLI reading the pinned maps:
//! conntrack entries of a deleted Service collected by the agent's GC, TCP FIN/RST shortening the entries' lives
//! and expired entries going, the per-service and per-backend packet counters, ClientIP affinity on the tc path.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lb_common::CT_LIFETIME_CLOSING_S;
use lb_tests::node_agent::{CtRow, NODE_A, NodeAgent, RUN, client, peers_seen, sa, service};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{Child, Probe, ProbeLine, agent_bin, probe, require_root};

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
/// The agent's conntrack GC period in these tests (`--conntrack-gc-interval`, default 30 s).
const GC_FLAGS: [&str; 2] = ["--conntrack-gc-interval", "1"];

struct Setup {
    // Declared first: dropped before the pair.
    agent: NodeAgent,
    pair: NodePair,
    probe: Probe,
    pod_a: usize,
    pod_b: usize,
}

fn setup(services: &str, extra: &[&str]) -> Setup {
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
    let agent = NodeAgent::start(&agent_bin!(), &pair, &format!("{NODE_A}{services}"), extra);
    Setup {
        agent,
        pair,
        probe,
        pod_a,
        pod_b,
    }
}

/// TCP `tcp` -> 8080 and UDP `udp` -> 5353.
fn ports(tcp: u16, udp: u16) -> [(&'static str, &'static str, u16, u16, u16); 2] {
    [
        ("http", "TCP", 80, TCP_PORT, tcp),
        ("dns", "UDP", 53, UDP_PORT, udp),
    ]
}

fn node(port: u16) -> String {
    format!("{}:{port}", node_pair::NODE_A_V4)
}

/// Starts a TCP connection to `port` that holds `hold_ms` before its request.
fn held(s: &mut Setup, port: u16, hold_ms: u64) -> u32 {
    let cmd = s
        .probe
        .tcp_cmd(sa(node_pair::NODE_A_V4, port), 1)
        .args(["--hold-ms", &hold_ms.to_string(), "--timeout-ms", "20000"])
        .netns(&s.pair.client);
    s.pair.spawn(cmd).expect("starting a held connection").pid()
}

/// Waits for the spawned probe `pid` to exit and returns its lines.
fn wait_probe(pair: &mut NodePair, pid: u32) -> Vec<ProbeLine> {
    let child = pair.child_by_pid(pid).expect("the probe child");
    child
        .wait_timeout(Duration::from_secs(60))
        .expect("waiting for the probe")
        .expect("the probe exited in time");
    child.probe_lines().expect("probe lines")
}

/// Polls `cond` on the conntrack rows until it holds; panics with `what` and the rows after `limit`.
fn wait_conntrack(
    agent: &NodeAgent,
    limit: Duration,
    what: &str,
    cond: impl Fn(&[CtRow]) -> bool,
) -> Vec<CtRow> {
    let deadline = Instant::now() + limit;
    loop {
        let rows = agent.conntrack();
        if cond(&rows) {
            return rows;
        }
        assert!(Instant::now() < deadline, "{what}: {rows:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_tcp_peers(server: &mut Child, n: usize) {
    let deadline = Instant::now() + RUN;
    while peers_seen(server, "tcp").len() < n {
        assert!(
            Instant::now() < deadline,
            "the server never saw {n} connections"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The rows of the flow whose client end is `client` (`ip:port`): every direction names it somewhere.
fn flow_rows<'a>(rows: &'a [CtRow], client: &str) -> Vec<&'a CtRow> {
    rows.iter()
        .filter(|r| {
            [&r.source, &r.destination, &r.new_source, &r.new_destination]
                .iter()
                .any(|a| *a == client)
        })
        .collect()
}

#[test]
fn conntrack_gc_removes_the_entries_of_a_deleted_service_and_its_flows_end() {
    if !require_root("conntrack_gc_removes_the_entries_of_a_deleted_service_and_its_flows_end") {
        return;
    }
    let (a, b) = (node_pair::POD_A_V4, node_pair::POD_B_V4);
    let gone = service(
        "gone",
        "10.96.2.1",
        "IPv4",
        "Cluster",
        &ports(30220, 30221),
        &[(a, "node-a"), (b, "node-b")],
        "",
    );
    let keep = service(
        "keep",
        "10.96.2.2",
        "IPv4",
        "Cluster",
        &ports(30222, 30223),
        &[(b, "node-b")],
        "",
    );
    let mut s = setup(&format!("{gone}{keep}"), &GC_FLAGS);
    let ids = |tcp: u16| -> BTreeSet<u32> {
        [(tcp, "TCP"), (tcp + 1, "UDP")]
            .iter()
            .map(|(port, p)| s.agent.service_stats(&node(*port), p).service_id)
            .collect()
    };
    let (gone_ids, keep_ids) = (ids(30220), ids(30222));

    // Held TCP connections (request sent only after the edit) and UDP flows on both Services.
    let gone_pid = held(&mut s, 30220, 6000);
    let keep_pid = held(&mut s, 30222, 6000);
    let deadline = Instant::now() + RUN;
    while peers_seen(s.pair.child(s.pod_a), "tcp").len()
        + peers_seen(s.pair.child(s.pod_b), "tcp").len()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the held connections never arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for port in [30221, 30223] {
        let lines = client(
            &s.pair,
            s.probe.udp_cmd(sa(node_pair::NODE_A_V4, port), 2, 2, true),
        );
        assert!(lines.iter().all(|l| l.ok), "UDP to {port}: {lines:?}");
    }
    let rows = s.agent.conntrack();
    for (what, want) in [("gone", &gone_ids), ("keep", &keep_ids)] {
        let have: BTreeSet<u32> = rows
            .iter()
            .filter(|r| r.direction == "forward" && want.contains(&r.service_id))
            .map(|r| r.service_id)
            .collect();
        assert_eq!(
            &have, want,
            "{what}: TCP and UDP flows are tracked: {rows:#?}"
        );
    }

    // Delete the Service by editing the manifest. Nothing is sent to it meanwhile, so only the GC (every second
    // here) can remove its entries: the UDP ones would otherwise live 60 s, the established TCP ones 6 hours.
    s.agent
        .update(&format!("{NODE_A}{keep}"), &node(30220), &[], true);
    let rows = wait_conntrack(
        &s.agent,
        Duration::from_secs(20),
        "the GC never removed the deleted Service's entries",
        |rows| rows.iter().all(|r| !gone_ids.contains(&r.service_id)),
    );
    assert!(
        rows.iter().any(|r| r.direction == "forward"
            && r.protocol == "TCP"
            && keep_ids.contains(&r.service_id)),
        "the GC keeps the entries of a Service that still exists: {rows:#?}"
    );

    // Rule 12: the deleted Service's held connection ends (node A, no longer translating, answers its request with
    // a RST); the other one is served by its backend.
    let lines = wait_probe(&mut s.pair, gone_pid);
    assert!(
        lines.len() == 1
            && !lines[0].ok
            && matches!(lines[0].error.as_deref(), Some("ECONNRESET" | "EPIPE")),
        "a connection of a deleted Service is reset, not moved or left hanging: {lines:?}"
    );
    let lines = wait_probe(&mut s.pair, keep_pid);
    assert!(
        lines.len() == 1 && lines[0].ok && lines[0].backend.as_deref() == Some("pod-b"),
        "the other Service's held connection is untouched: {lines:?}"
    );
    drop(s.agent);
}

/// kube-proxy's conntrack timeout flags, each given a value no default has, so that an entry carrying it proves the
/// flag reached the programs.
const TIMEOUT_FLAGS: [&str; 8] = [
    "--conntrack-tcp-timeout-established",
    "7h0m0s",
    "--conntrack-tcp-timeout-close-wait",
    "45s",
    "--conntrack-udp-timeout",
    "25s",
    "--conntrack-udp-timeout-stream",
    "1m35s",
];
const ESTABLISHED_S: u32 = 7 * 3600;
const CLOSE_WAIT_S: u32 = 45;
const UDP_STREAM_S: u32 = 95;

#[test]
fn tcp_fin_and_rst_shorten_conntrack_lifetimes_and_expired_entries_go() {
    if !require_root("tcp_fin_and_rst_shorten_conntrack_lifetimes_and_expired_entries_go") {
        return;
    }
    let (a, b) = (node_pair::POD_A_V4, node_pair::POD_B_V4);
    let services = [
        service(
            "ll",
            "10.96.2.11",
            "IPv4",
            "Local",
            &ports(30230, 30231),
            &[(a, "node-a")],
            "",
        ),
        service(
            "lr",
            "10.96.2.12",
            "IPv4",
            "Cluster",
            &ports(30232, 30233),
            &[(b, "node-b")],
            "",
        ),
    ]
    .concat();
    let mut s = setup(&services, &[&GC_FLAGS[..], &TIMEOUT_FLAGS[..]].concat());

    // An established connection (to the remote backend: four entries) has the configured established lifetime in
    // every direction.
    let pid = held(&mut s, 30232, 6000);
    wait_for_tcp_peers(s.pair.child(s.pod_b), 1);
    let rows = wait_conntrack(
        &s.agent,
        Duration::from_secs(10),
        "an established SNATed flow has four entries with the established lifetime",
        |rows| {
            let tcp: Vec<_> = rows.iter().filter(|r| r.protocol == "TCP").collect();
            tcp.len() == 4
                && tcp.iter().all(|r| {
                    r.lifetime_seconds == ESTABLISHED_S
                        && r.flags.iter().any(|f| f == "established")
                        && !r.flags.iter().any(|f| f == "closing")
                })
        },
    );
    let directions: BTreeSet<&str> = rows.iter().map(|r| r.direction.as_str()).collect();
    assert_eq!(
        directions,
        ["forward", "reply", "snat", "snat-reply"]
            .into_iter()
            .collect(),
        "{rows:#?}"
    );
    let lines = wait_probe(&mut s.pair, pid);
    assert!(lines.len() == 1 && lines[0].ok, "{lines:?}");
    let held_client = lines[0]
        .local
        .clone()
        .expect("the held connection's address");

    // Closed connections: FIN both ways (the server closes after answering), and a RST from the client; to the
    // local backend (two entries) and the remote one (four).
    let mut closed = vec![(held_client, 4, "FIN, remote")];
    for (port, entries, reset, what) in [
        (30230, 2, false, "FIN, local"),
        (30230, 2, true, "RST, local"),
        (30232, 4, true, "RST, remote"),
    ] {
        let mut cmd = s.probe.tcp_cmd(sa(node_pair::NODE_A_V4, port), 1);
        if reset {
            cmd = cmd.arg("--reset");
        }
        let lines = client(&s.pair, cmd);
        assert!(lines.len() == 1 && lines[0].ok, "{what}: {lines:?}");
        closed.push((
            lines[0].local.clone().expect("local address"),
            entries,
            what,
        ));
    }
    for (client_end, entries, what) in &closed {
        wait_conntrack(
            &s.agent,
            Duration::from_secs(10),
            &format!(
                "{what}: every entry of the closed flow {client_end} gets the closing lifetime"
            ),
            |rows| {
                let flow = flow_rows(rows, client_end);
                flow.len() == *entries
                    && flow.iter().all(|r| {
                        r.lifetime_seconds == CT_LIFETIME_CLOSING_S
                            && r.flags.iter().any(|f| f == "closing")
                    })
            },
        );
    }

    // Half-closed: the server has answered and sent its FIN, the client lingers before closing. Meanwhile all four
    // entries have the close-wait lifetime; once the client's FIN follows, the closing one.
    let cmd = s
        .probe
        .tcp_cmd(sa(node_pair::NODE_A_V4, 30232), 1)
        .args(["--linger-ms", "6000"])
        .netns(&s.pair.client);
    let lingering = s
        .pair
        .spawn(cmd)
        .expect("starting a lingering client")
        .pid();
    wait_conntrack(
        &s.agent,
        Duration::from_secs(5),
        "a half-closed flow's four entries get the configured close-wait lifetime",
        |rows| {
            rows.iter()
                .filter(|r| {
                    r.protocol == "TCP"
                        && r.lifetime_seconds == CLOSE_WAIT_S
                        && r.flags.iter().any(|f| f == "closing")
                })
                .count()
                == 4
        },
    );
    let lines = wait_probe(&mut s.pair, lingering);
    assert!(lines.len() == 1 && lines[0].ok, "{lines:?}");
    let half_closed = lines[0].local.clone().expect("local address");
    wait_conntrack(
        &s.agent,
        Duration::from_secs(10),
        "the half-closed flow closed by the client gets the closing lifetime",
        |rows| {
            let flow = flow_rows(rows, &half_closed);
            flow.len() == 4
                && flow
                    .iter()
                    .all(|r| r.lifetime_seconds == CT_LIFETIME_CLOSING_S)
        },
    );
    closed.push((half_closed, 4, "FIN after a half-close, remote"));

    // A UDP flow that was answered has the configured stream lifetime and is not closing.
    let lines = client(
        &s.pair,
        s.probe.udp_cmd(sa(node_pair::NODE_A_V4, 30233), 1, 1, true),
    );
    assert!(lines.len() == 1 && lines[0].ok, "{lines:?}");
    let udp_client = lines[0].local.clone().expect("local address");
    let rows = s.agent.conntrack();
    let flow = flow_rows(&rows, &udp_client);
    assert!(
        flow.len() == 4
            && flow.iter().all(|r| r.lifetime_seconds == UDP_STREAM_S
                && r.flags.iter().any(|f| f == "established")
                && r.flags.iter().all(|f| f != "closing")),
        "an answered UDP flow's four entries live the stream lifetime, {UDP_STREAM_S} s: {flow:#?}"
    );

    // Expired entries go: the GC removes the closed flows' entries once their closing lifetime has passed (the
    // programs would treat them as misses, but they would hold LRU slots), and leaves the UDP flow's.
    wait_conntrack(
        &s.agent,
        Duration::from_secs(u64::from(CT_LIFETIME_CLOSING_S) + 20),
        "the closed flows' entries were never removed after expiring",
        |rows| closed.iter().all(|(c, _, _)| flow_rows(rows, c).is_empty()),
    );
    let rows = s.agent.conntrack();
    assert_eq!(
        flow_rows(&rows, &udp_client).len(),
        4,
        "the unexpired UDP flow stays: {rows:#?}"
    );
    drop(s.agent);
}

#[test]
fn per_service_and_per_backend_counters_count_forwarded_packets() {
    if !require_root("per_service_and_per_backend_counters_count_forwarded_packets") {
        return;
    }
    let (a, b) = (node_pair::POD_A_V4, node_pair::POD_B_V4);
    let services = service(
        "count",
        "10.96.2.21",
        "IPv4",
        "Cluster",
        &ports(30240, 30241),
        &[(a, "node-a"), (b, "node-b")],
        "",
    );
    // Per-frontend and per-backend series are opt-in (their count grows with the cluster).
    let s = setup(&services, &["--service-metrics", "per-frontend"]);
    let frontend = node(30241);
    let svc_before = s.agent.service_stats(&frontend, "UDP");
    let be_before = s.agent.backends();
    // One connected socket: one flow, so one backend; 20 datagrams, each answered.
    const N: u64 = 20;
    let lines = client(
        &s.pair,
        s.probe
            .udp_cmd(sa(node_pair::NODE_A_V4, 30241), N as usize, 1, true),
    );
    assert!(
        lines.len() == N as usize && lines.iter().all(|l| l.ok),
        "{lines:?}"
    );
    let served = lines[0].backend.clone().expect("backend");
    assert!(
        lines
            .iter()
            .all(|l| l.backend.as_deref() == Some(&served[..])),
        "one flow, one backend: {lines:?}"
    );
    let (served_addr, other_addr) = if served == "pod-a" {
        (format!("{a}:{UDP_PORT}"), format!("{b}:{UDP_PORT}"))
    } else {
        (format!("{b}:{UDP_PORT}"), format!("{a}:{UDP_PORT}"))
    };
    let svc_after = s.agent.service_stats(&frontend, "UDP");
    let counter = |r: &lb_tests::node_agent::StatsRow, name: &str| -> u64 {
        *r.counters
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name}: {r:?}"))
    };
    let packets =
        counter(&svc_after, "lb_service_packets") - counter(&svc_before, "lb_service_packets");
    let bytes = counter(&svc_after, "lb_service_bytes") - counter(&svc_before, "lb_service_bytes");
    // Each request is an IPv4 + UDP header and the probe's "lb-probe 0 i" payload: at least 28 + 12 bytes.
    assert!(
        packets >= N && bytes >= N * 40,
        "the Service counted the {N} forwarded datagrams: {packets} packets, {bytes} bytes"
    );
    let be = |rows: &[lb_tests::node_agent::BackendRow], addr: &str| {
        rows.iter()
            .find(|r| r.address == addr && r.protocol == "UDP")
            .cloned()
            .unwrap_or_else(|| panic!("no UDP backend {addr}: {rows:?}"))
    };
    let be_after = s.agent.backends();
    let (sb, sa_) = (be(&be_before, &served_addr), be(&be_after, &served_addr));
    assert!(
        sa_.packets - sb.packets >= N && sa_.bytes - sb.bytes >= N * 40,
        "the serving backend {served_addr} counted the datagrams: {sb:?} -> {sa_:?}"
    );
    let (ob, oa) = (be(&be_before, &other_addr), be(&be_after, &other_addr));
    assert_eq!(
        (oa.packets, oa.bytes),
        (ob.packets, ob.bytes),
        "the backend that served nothing counted nothing"
    );
    // The same counters on /metrics.
    let metrics = s.agent.metrics(&s.pair);
    let value = |prefix: &str, labels: &[&str]| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {prefix} {labels:?} in /metrics:\n{metrics}"))
            as u64
    };
    let frontend_label = format!("frontend=\"{frontend}\"");
    assert!(
        value(
            "lb_service_packets_total{",
            &[&frontend_label, "protocol=\"UDP\"", "scope=\"external\""]
        ) >= N,
        "/metrics: the Service's packets:\n{metrics}"
    );
    let backend_label = |addr: &str| format!("backend=\"{addr}\"");
    assert!(
        value(
            "lb_backend_packets_total{",
            &[&backend_label(&served_addr), "protocol=\"UDP\""]
        ) >= N,
        "/metrics: the serving backend's packets:\n{metrics}"
    );
    assert_eq!(
        value(
            "lb_backend_packets_total{",
            &[&backend_label(&other_addr), "protocol=\"UDP\""]
        ),
        ob.packets,
        "/metrics: the idle backend's packets"
    );
    drop(s.agent);
}

#[test]
fn client_ip_affinity_on_the_tc_path_keeps_a_client_on_one_backend() {
    if !require_root("client_ip_affinity_on_the_tc_path_keeps_a_client_on_one_backend") {
        return;
    }
    let (a, b) = (node_pair::POD_A_V4, node_pair::POD_B_V4);
    let services = service(
        "sticky",
        "10.96.2.31",
        "IPv4",
        "Cluster",
        &ports(30250, 30251),
        &[(a, "node-a"), (b, "node-b")],
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 3}}\n",
    );
    let s = setup(&services, &[]);
    let to = sa(node_pair::NODE_A_V4, 30250);
    // 24 connections from one address (24 source ports): without affinity the flow hash would spread them over
    // both backends (all on one: probability 2^-23).
    let first = client(&s.pair, s.probe.tcp_cmd(to, 24));
    assert!(first.iter().all(|l| l.ok), "{first:?}");
    let backends: BTreeSet<_> = first.iter().filter_map(|l| l.backend.clone()).collect();
    assert_eq!(
        backends.len(),
        1,
        "ClientIP affinity: every connection from {} reaches one backend: {first:?}",
        node_pair::CLIENT_V4
    );
    let ports: BTreeSet<_> = first.iter().filter_map(|l| l.local.clone()).collect();
    assert_eq!(
        ports.len(),
        24,
        "the connections used distinct source ports"
    );

    // A second client address (added on the client's link and used as its source towards node A) is sticky too,
    // to whichever backend it got.
    s.pair
        .client
        .ip(&[
            "addr",
            "add",
            "192.0.2.2/24",
            "dev",
            &format!("cl-{}", s.pair.token()),
        ])
        .expect("adding a second client address");
    s.pair
        .client
        .ip(&[
            "route",
            "replace",
            &format!("{}/32", node_pair::NODE_A_V4),
            "dev",
            &format!("cl-{}", s.pair.token()),
            "src",
            "192.0.2.2",
        ])
        .expect("routing from the second address");
    let second = client(&s.pair, s.probe.tcp_cmd(to, 24));
    assert!(
        second.iter().all(|l| l.ok
            && l.local
                .as_deref()
                .is_some_and(|a| a.starts_with("192.0.2.2:"))),
        "{second:?}"
    );
    let backends: BTreeSet<_> = second.iter().filter_map(|l| l.backend.clone()).collect();
    assert_eq!(
        backends.len(),
        1,
        "ClientIP affinity holds for the second client address as well: {second:?}"
    );
    drop(s.agent);
}
