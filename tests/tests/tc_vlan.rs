//! A device whose name holds a dot, as an 802.1Q VLAN's does (`eth0.100`), as an lb device: bpffs refuses pin
//! names containing a dot, so the agent pins its tc and XDP links for it as `tc-in-mv<token>:7` and so on
//! (`pins::device_pin_name`). This kernel is built without 802.1Q (`CONFIG_VLAN_8021Q` is not set: `ip link add
//! ... type vlan` says "Unknown device type"), so the stacked device is a macvlan named like a VLAN, `mv<token>.7`,
//! on the uplink veth of a [`NodePair`] in node A, with one on the client's end too. What matters is the same for
//! both: a dotted name, and an upper device whose frames pass the lower device's hooks first and then its own
//! (the lower device's rx handler hands them on). The client reaches node A's NodePort address only through it,
//! and the agent runs with `--devices <mv>,<link to node B>` and `--xdp --xdp-mode generic`: the uplink veth
//! carries no lb program and answers no ARP for the macvlan's address, so every translation of the client's
//! traffic is the dotted device's. Checked: the agent starts and attaches there, the colon pins exist, NodePorts to
//! a pod on node A (Local policy, client address preserved) and on node B (Cluster, SNAT, then XDP's fast path both
//! ways) answer, the counters grow, a `kill -9` and restart adopts the pins, and `lb-agent cleanup` removes them and
//! detaches everything. Every packet stays inside the namespaces the test creates.

use std::time::{Duration, Instant};

use lb_tests::node_agent::{
    NODE_A, NodeAgent, RUN, Stats, client, peers_seen, sa, service, xdp_shown,
};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{Cmd, NetNs, Probe, agent_bin, probe, require_root};

/// The suffix after the dot, as a VLAN id would be.
const SUFFIX: &str = "7";
/// The dotted device's addresses (RFC 2544 benchmark range).
const CLIENT_DOTTED_V4: &str = "198.18.7.1";
const NODE_A_DOTTED_CIDR: &str = "198.18.7.10/24";
const NODE_A_DOTTED_V4: &str = "198.18.7.10";
const LOCAL_PORT: u16 = 30270;
const REMOTE_PORT: u16 = 30271;
const ECHO_NODE_PORT: u16 = 30272;
const ECHO_PORT: u16 = 9000;
const WAIT: Duration = Duration::from_secs(20);

/// Adds macvlan `name` (bridge mode) on `parent` in `ns`, with `addr`, up; `parent` answers ARP only for its own
/// addresses, so the peer sends to the macvlan's MAC and the frames are the macvlan's, not the lower veth's.
fn add_dotted(ns: &NetNs, parent: &str, name: &str, addr: &str) {
    ns.sysctl(&format!("net.ipv4.conf.{parent}.arp_ignore"), "1")
        .unwrap_or_else(|e| panic!("arp_ignore on {parent}: {e:#}"));
    let steps: [&[&str]; 3] = [
        &[
            "link", "add", "link", parent, "name", name, "type", "macvlan", "mode", "bridge",
        ],
        &["addr", "add", addr, "dev", name],
        &["link", "set", name, "up"],
    ];
    for args in steps {
        ns.ip(args)
            .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e:#}", ns.name()));
    }
}

/// The link pins (`links/`) of the agent, by name.
fn link_pins(agent: &NodeAgent) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(agent.pins().join("links"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn reason_delta(before: &Stats, after: &Stats, reason: &str) -> u64 {
    after.reason(reason) - before.reason(reason)
}

fn packets(agent: &NodeAgent, port: u16) -> u64 {
    let row = agent.service_stats(&format!("{}:{port}", node_pair::NODE_A_V4), "TCP");
    *row.counters
        .get("lb_service_packets")
        .unwrap_or_else(|| panic!("no packet counter: {row:?}"))
}

/// NodePort `LOCAL_PORT` (pod A) and `REMOTE_PORT` (pod B) answer the client through the dotted device, each by its own
/// backend, and the tc datapath counted them.
fn check_traffic(pair: &NodePair, agent: &NodeAgent, probe: &Probe, what: &str) {
    let before = agent.stats();
    for (port, backend) in [(LOCAL_PORT, "pod-a"), (REMOTE_PORT, "pod-b")] {
        let svc_before = packets(agent, port);
        let to = sa(node_pair::NODE_A_V4, port);
        let lines = client(pair, probe.tcp_cmd(to, 3));
        assert!(
            lines.len() == 3
                && lines.iter().all(|l| l.ok
                    && l.backend.as_deref() == Some(backend)
                    && l.peer.as_deref() == Some(&to.to_string()[..])),
            "{what}: NodePort {port} through the dotted device reaches {backend}: {lines:?}"
        );
        let svc_after = packets(agent, port);
        assert!(
            svc_after - svc_before >= 3,
            "{what}: the service at :{port} counted the dotted device's traffic ({svc_before} -> {svc_after})"
        );
    }
    let after = agent.stats();
    assert!(
        reason_delta(&before, &after, "new-flow") >= 6
            && reason_delta(&before, &after, "reply") >= 6,
        "{what}: tc translated the new flows and their replies: {:?} -> {:?}",
        before.packets_by_reason,
        after.packets_by_reason
    );
}

/// A bulk echo exchange from the client to pod B's echo port through the NodePort; panics unless it came back
/// intact.
fn echo(pair: &NodePair, probe: &Probe, rounds: usize, size: usize) {
    let to = format!("{}:{ECHO_NODE_PORT}", node_pair::NODE_A_V4);
    let lines = probe
        .cmd()
        .args(["echo", "--to", &to])
        .args(["--rounds", &rounds.to_string(), "--size", &size.to_string()])
        .netns(&pair.client)
        .run(RUN)
        .expect("running the echo client")
        .probe_lines()
        .expect("echo lines");
    assert!(
        lines.len() == 1 && lines[0].ok,
        "the echo transfer through the dotted device failed: {lines:?}"
    );
}

/// The [`NodePair`] with the dotted device on both ends of the uplink, the client routing node A's NodePort
/// address through it, the pods serving, and the manifest; the agent's `--devices` are the dotted device and the
/// link to node B.
struct Setup {
    pair: NodePair,
    probe: Probe,
    dotted: String,
    devices: Vec<String>,
    manifest: String,
    /// [`NodePair::child`] index of pod A's server.
    pod_a: usize,
}

fn setup() -> Setup {
    let probe = probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    let t = pair.token().to_owned();
    // `mv` + a token of at most 9 characters + `.7`: within IFNAMSIZ (15 characters).
    let dotted = format!("mv{t}.{SUFFIX}");
    add_dotted(
        &pair.client,
        &format!("cl-{t}"),
        &dotted,
        &format!("{CLIENT_DOTTED_V4}/24"),
    );
    add_dotted(
        &pair.node_a,
        &format!("up-{t}"),
        &dotted,
        NODE_A_DOTTED_CIDR,
    );
    // The NodePort address is reached through the dotted device only (more specific than the uplink's /24), from the
    // client's address on the dotted device.
    pair.client
        .ip(&[
            "route",
            "add",
            &format!("{}/32", node_pair::NODE_A_V4),
            "via",
            NODE_A_DOTTED_V4,
            "dev",
            &dotted,
        ])
        .expect("routing the node address through the dotted device");
    // Full checksums and no segmentation offload, as in `xdp_nodeport.rs`: XDP updates checksums incrementally.
    let off = ["tx", "off", "tso", "off", "gso", "off"];
    pair.client
        .ethtool(&format!("cl-{t}"), &off)
        .expect("ethtool");
    pair.client.ethtool(&dotted, &off).expect("ethtool");
    pair.pod_b
        .ethtool(&format!("pb-{t}"), &off)
        .expect("ethtool");

    let cmds = [
        probe.serve_cmd("pod-a", &[8080], &[]).netns(&pair.pod_a),
        probe
            .serve_cmd("pod-b", &[8080], &[])
            .arg("--echo-port")
            .arg(ECHO_PORT.to_string())
            .netns(&pair.pod_b),
    ];
    let mut servers = Vec::new();
    for cmd in cmds {
        servers.push(pair.serve(cmd).expect("serving in a pod"));
    }
    let (a, b) = (node_pair::POD_A_V4, node_pair::POD_B_V4);
    let services = [
        service(
            "local",
            "10.96.7.1",
            "IPv4",
            "Local",
            &[("http", "TCP", 80, 8080, LOCAL_PORT)],
            &[(a, "node-a")],
            "",
        ),
        service(
            "remote",
            "10.96.7.2",
            "IPv4",
            "Cluster",
            &[
                ("http", "TCP", 80, 8080, REMOTE_PORT),
                ("echo", "TCP", ECHO_PORT, ECHO_PORT, ECHO_NODE_PORT),
            ],
            &[(b, "node-b")],
            "",
        ),
    ]
    .concat();
    // The dotted device, not the uplink veth it rides on: the client's packets meet lb only there.
    let devices = vec![dotted.clone(), format!("ab-{t}")];
    Setup {
        pair,
        probe,
        dotted,
        devices,
        manifest: format!("{NODE_A}{services}"),
        pod_a: servers[0],
    }
}

#[test]
fn a_dotted_device_gets_colon_pins_serves_nodeports_survives_restart_and_cleanup() {
    if !require_root(
        "a_dotted_device_gets_colon_pins_serves_nodeports_survives_restart_and_cleanup",
    ) {
        return;
    }
    let Setup {
        mut pair,
        probe,
        dotted,
        devices,
        manifest,
        pod_a,
    } = setup();
    let pin_dev = dotted.replace('.', ":");
    let t = pair.token().to_owned();
    let mut agent = NodeAgent::start_on_devices(
        &agent_bin!(),
        &pair,
        &manifest,
        &devices,
        &["--xdp", "--xdp-mode", "generic"],
    );
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("XDP fast path attached")
            && l.contains(dotted.as_str())
            && l.contains("generic")),
        "XDP (generic) attached to {dotted}:\n{log}"
    );
    let want: Vec<String> = {
        let mut v = vec![
            format!("tc-eg-{pin_dev}"),
            format!("tc-in-{pin_dev}"),
            format!("xdp-skb-{pin_dev}"),
        ];
        v.sort();
        v
    };
    let pins = link_pins(&agent);
    for name in &want {
        assert!(pins.contains(name), "pin {name} exists: {pins:?}");
    }
    assert!(
        !pins
            .iter()
            .any(|p| p.contains('.') || p.contains(&format!("up-{t}"))),
        "no dotted pin, nothing on the uplink veth: {pins:?}"
    );
    assert!(xdp_shown(&pair, &dotted), "XDP shows on {dotted}");
    assert!(
        !xdp_shown(&pair, &format!("up-{t}")),
        "nothing on the uplink veth"
    );

    check_traffic(&pair, &agent, &probe, "first agent");
    // The Local policy keeps the client's address: pod A saw the client's address on the dotted device, so the packets came in
    // through the dotted device.
    let seen = peers_seen(pair.child(pod_a), "tcp");
    assert!(
        !seen.is_empty() && seen.iter().all(|p| p == CLIENT_DOTTED_V4),
        "pod A saw the client's address on the dotted device: {seen:?}"
    );
    // An established flow to node B goes onto the XDP fast path both ways: in on the dotted device, out on the link to
    // node B, and the replies back out through the dotted device.
    let before = agent.stats();
    echo(&pair, &probe, 200, 16 * 1024);
    let after = agent.stats();
    let (fwd, rep) = (
        reason_delta(&before, &after, "xdp-forward"),
        reason_delta(&before, &after, "xdp-reply"),
    );
    eprintln!("through {dotted}: xdp forward {fwd}, xdp reply {rep}");
    assert!(
        fwd > 0 && rep > 0,
        "XDP forwarded ({fwd}) and replied ({rep}) for the flow through the dotted device: {:?}",
        after.packets_by_reason
    );

    // kill -9 and restart: the pins are adopted (replaced in place), not refused or duplicated.
    agent.restart(&pair);
    let log = agent.log();
    assert!(
        !log.lines()
            .any(|l| (l.contains("ERROR") || l.contains("WARN"))
                && (l.contains(dotted.as_str()) || l.contains(pin_dev.as_str()))),
        "the restarted agent adopted the pins of {dotted} quietly:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("tc programs attached") && l.contains(dotted.as_str())),
        "the restarted agent attached on {dotted}:\n{log}"
    );
    let pins_after = link_pins(&agent);
    assert_eq!(pins_after, pins, "the restart kept the same pins");
    check_traffic(&pair, &agent, &probe, "restarted agent");

    // Cleanup removes the dotted device's pins and detaches its programs: node A then answers the NodePort itself.
    agent.kill();
    let out = Cmd::new(agent_bin!())
        .arg("cleanup")
        .arg("--bpffs")
        .arg(pair.bpf_dir().path())
        .netns(&pair.node_a)
        .label("lb-agent-cleanup")
        .run(RUN)
        .expect("lb-agent cleanup");
    assert!(out.status.success(), "cleanup failed: {}", out.stderr);
    let left = link_pins(&agent);
    assert!(left.is_empty(), "cleanup removed the link pins: {left:?}");
    // The kernel releases an unpinned link from a workqueue: wait for it.
    let deadline = Instant::now() + WAIT;
    while xdp_shown(&pair, &dotted) {
        assert!(
            Instant::now() < deadline,
            "XDP still attached to {dotted} after cleanup"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = |pair: &NodePair| {
        client(pair, probe.tcp_cmd(sa(node_pair::NODE_A_V4, LOCAL_PORT), 1))
            .iter()
            .all(|l| !l.ok && l.error.as_deref() == Some("ECONNREFUSED"))
    };
    while !refused(&pair) {
        assert!(
            Instant::now() < deadline,
            "after cleanup the NodePort is still translated on {dotted}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(agent);
}

/// The lb filters (`tc filter show`) on one hook of `dev` in node A.
fn lb_filters(pair: &NodePair, dev: &str, hook: &str) -> Vec<String> {
    let out = lb_tests::run_cmd(
        "tc",
        &["-n", pair.node_a.name(), "filter", "show", "dev", dev, hook],
    )
    .expect("tc filter show");
    out.lines()
        .filter(|l| l.contains("lb_tc_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_dotted_device_works_with_the_clsact_fallback_and_cleanup_removes_its_filters() {
    if !require_root(
        "a_dotted_device_works_with_the_clsact_fallback_and_cleanup_removes_its_filters",
    ) {
        return;
    }
    let Setup {
        pair,
        probe,
        dotted,
        devices,
        manifest,
        ..
    } = setup();
    let mut agent = NodeAgent::start_on_devices(
        &agent_bin!(),
        &pair,
        &manifest,
        &devices,
        &["--tc-attach", "clsact"],
    );
    let one_each = |pair: &NodePair, what: &str| {
        for (hook, prog) in [("ingress", "lb_tc_ingress"), ("egress", "lb_tc_egress")] {
            let filters = lb_filters(pair, &dotted, hook);
            assert!(
                filters.len() == 1 && filters[0].contains(prog),
                "{what}: one {prog} filter on {dotted} {hook}: {filters:?}"
            );
        }
    };
    one_each(&pair, "first agent");
    check_traffic(&pair, &agent, &probe, "clsact");
    agent.restart(&pair);
    one_each(&pair, "restarted agent");
    check_traffic(&pair, &agent, &probe, "clsact, restarted");

    agent.kill();
    let out = Cmd::new(agent_bin!())
        .arg("cleanup")
        .arg("--bpffs")
        .arg(pair.bpf_dir().path())
        .netns(&pair.node_a)
        .label("lb-agent-cleanup")
        .run(RUN)
        .expect("lb-agent cleanup");
    assert!(
        out.stderr.contains(&format!("lb_tc_ingress on {dotted}")),
        "cleanup names what it removed on {dotted}:\n{}",
        out.stderr
    );
    for hook in ["ingress", "egress"] {
        let filters = lb_filters(&pair, &dotted, hook);
        assert!(
            filters.is_empty(),
            "cleanup removed the filters on {dotted} {hook}: {filters:?}"
        );
    }
    let lines = client(
        &pair,
        probe.tcp_cmd(sa(node_pair::NODE_A_V4, LOCAL_PORT), 1),
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.ok && l.error.as_deref() == Some("ECONNREFUSED")),
        "after cleanup the NodePort is node A's own closed port: {lines:?}"
    );
    drop(agent);
}
