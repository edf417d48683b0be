//! The node-by-node migration from kube-proxy, and the way back, with kube-proxy's real rule sets (iptables and
//! nftables, as `lb_tests::bench::kubeproxy` writes them for the same Services) loaded in node A of a [`NodePair`]:
//!
//! 1. kube-proxy alone: a connection from the outside client to a NodePort and one from pod A to a ClusterIP are
//!    set up through kube-proxy's DNAT, and held (`lb-probe echo --pause-file`: one round per step below).
//! 2. lb starts beside it (`--coexist-with-kube-proxy`): both old connections keep working; new connections go
//!    through lb (its counters move, the DNAT rules' counters do not); the old NodePort connection's packets are the
//!    ones lb passes as `untracked-tcp`.
//! 3. kube-proxy's rules are removed (what `kube-proxy --cleanup` removes): the old connections still work
//!    (netfilter's conntrack keeps translating them), new ones go through lb.
//! 4. The way back: kube-proxy's rules are restored, the agent stops and `lb-agent cleanup` removes lb. A pod's
//!    connection set up through lb's socket-level balancing keeps working (it is connected to the backend itself);
//!    a NodePort connection lb's tc programs DNATed and SNATed ends (kube-proxy sees its next packet as a new flow
//!    and sends it on with another source, which the backend resets); new connections go through kube-proxy again.
//!
//! Every packet stays inside the namespaces the test creates.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_tests::bench::kubeproxy;
use lb_tests::bench::workload::{Proto, Svc, TARGET_PORT};
use lb_tests::node_agent::{NODE_A, NodeAgent, RUN, Stats, sa, service};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{Child, Cmd, ProbeLine, agent_bin, probe, require_root};

const WEB_IP: &str = "10.96.50.1";
const WEB_NODE_PORT: u16 = 30480;
/// A Service whose only endpoint is on node B: lb DNATs and SNATs its NodePort flows.
const FAR_IP: &str = "10.96.50.2";
const FAR_NODE_PORT: u16 = 30481;

#[derive(Clone, Copy, Debug)]
enum Rules {
    Iptables,
    Nftables,
}

/// The Services as kube-proxy's rule generators take them.
fn services() -> Vec<Svc> {
    let pod = |a: &str| a.parse::<Ipv4Addr>().expect("address");
    vec![
        Svc {
            name: "web".into(),
            vip: pod(WEB_IP),
            port: 80,
            proto: Proto::Tcp,
            node_port: Some(WEB_NODE_PORT),
            endpoints: vec![pod(node_pair::POD_A_V4), pod(node_pair::POD_B_V4)],
        },
        Svc {
            name: "far".into(),
            vip: pod(FAR_IP),
            port: 80,
            proto: Proto::Tcp,
            node_port: Some(FAR_NODE_PORT),
            endpoints: vec![pod(node_pair::POD_B_V4)],
        },
    ]
}

/// The same Services for lb.
fn manifest() -> String {
    let port = |np| [("p", "TCP", 80, TARGET_PORT, np)];
    let web = service(
        "web",
        WEB_IP,
        "IPv4",
        "Cluster",
        &port(WEB_NODE_PORT),
        &[
            (node_pair::POD_A_V4, "node-a"),
            (node_pair::POD_B_V4, "node-b"),
        ],
        "",
    );
    let far = service(
        "far",
        FAR_IP,
        "IPv4",
        "Cluster",
        &port(FAR_NODE_PORT),
        &[(node_pair::POD_B_V4, "node-b")],
        "",
    );
    format!("{NODE_A}{web}{far}")
}

fn load(program: &str, args: &[&str], input: &str, ns: &str) {
    kubeproxy::timed_load(ns, program, args, input, RUN)
        .unwrap_or_else(|e| panic!("loading kube-proxy's rules with {program}: {e:#}"));
}

/// kube-proxy's rules for [`services`] in node A. nftables rules get a `counter` on each DNAT (kube-proxy's have
/// none; the test reads them).
fn load_rules(rules: Rules, ns: &str) {
    let svcs = services();
    match rules {
        Rules::Iptables => {
            load(
                "iptables-restore",
                &["--noflush"],
                &kubeproxy::iptables_base(),
                ns,
            );
            load(
                "iptables-restore",
                &["--noflush"],
                &kubeproxy::iptables_restore(&svcs, &[]),
                ns,
            );
        }
        Rules::Nftables => {
            let ruleset = kubeproxy::nft_ruleset(&svcs).replace(" dnat to ", " counter dnat to ");
            load("nft", &["-f", "-"], &ruleset, ns);
        }
    }
}

fn in_node_a(pair: &NodePair, program: &str, args: &[&str]) -> String {
    Cmd::new(program)
        .args(args)
        .netns(&pair.node_a)
        .label(program)
        .run(RUN)
        .unwrap_or_else(|e| panic!("{program} {args:?} in node A: {e:#}"))
        .stdout
}

/// What `kube-proxy --cleanup` removes: iptables, the jumps from the built-in chains and every `KUBE-` chain;
/// nftables, its table.
fn remove_rules(rules: Rules, pair: &NodePair) {
    match rules {
        Rules::Iptables => {
            for (chain, target, comment) in [
                ("PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
                ("OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
                (
                    "POSTROUTING",
                    "KUBE-POSTROUTING",
                    "kubernetes postrouting rules",
                ),
            ] {
                in_node_a(
                    pair,
                    "iptables",
                    &[
                        "-t",
                        "nat",
                        "-D",
                        chain,
                        "-m",
                        "comment",
                        "--comment",
                        comment,
                        "-j",
                        target,
                    ],
                );
            }
            let saved = in_node_a(pair, "iptables-save", &["-t", "nat"]);
            let chains: Vec<&str> = saved
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|c| c.starts_with("KUBE-"))
                .collect();
            for flag in ["-F", "-X"] {
                for chain in &chains {
                    in_node_a(pair, "iptables", &["-t", "nat", flag, chain]);
                }
            }
            let left = in_node_a(pair, "iptables-save", &["-t", "nat"]);
            assert!(
                !left.contains("KUBE-"),
                "kube-proxy's chains remain:\n{left}"
            );
        }
        Rules::Nftables => {
            in_node_a(pair, "nft", &["delete", "table", "ip", "kube-proxy"]);
        }
    }
}

/// Packets that went through kube-proxy's DNAT rules (each counts the first packet of a connection).
fn dnat_count(rules: Rules, pair: &NodePair) -> u64 {
    match rules {
        Rules::Iptables => in_node_a(pair, "iptables-save", &["-c", "-t", "nat"])
            .lines()
            .filter(|l| l.contains("-j DNAT"))
            .filter_map(|l| l.strip_prefix('[')?.split(':').next()?.parse::<u64>().ok())
            .sum(),
        Rules::Nftables => {
            let table = in_node_a(pair, "nft", &["list", "table", "ip", "kube-proxy"]);
            table
                .lines()
                .filter(|l| l.contains("dnat to"))
                .filter_map(|l| {
                    let rest = l.split("counter packets ").nth(1)?;
                    rest.split_whitespace().next()?.parse::<u64>().ok()
                })
                .sum()
        }
    }
}

/// A held TCP connection through `lb-probe echo --pause-file`: one echoed round per [`Held::round`].
struct Held {
    child: Child,
    pause: PathBuf,
    rounds: usize,
    what: &'static str,
}

impl Held {
    fn open(what: &'static str, cmd: Cmd, dir: &Path) -> Held {
        let pause = dir.join(format!("pause-{what}"));
        let child = cmd
            .args(["--rounds", "100", "--size", "2000", "--timeout-ms", "3000"])
            .arg("--pause-file")
            .arg(&pause)
            .label(what)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e:#}"));
        let mut held = Held {
            child,
            pause,
            rounds: 0,
            what,
        };
        assert!(
            held.wait_round(),
            "{what}: the first round failed:\n{}",
            held.child.stdout()
        );
        held
    }

    /// Whether the next round's bytes came back intact.
    fn round(&mut self) -> bool {
        std::fs::write(&self.pause, b"").expect("writing the pause file");
        self.wait_round()
    }

    fn wait_round(&mut self) -> bool {
        let round = self.rounds;
        let line = self
            .child
            .wait_for_line(Duration::from_secs(10), |l| {
                serde_json::from_str::<ProbeLine>(l).is_ok_and(|p| {
                    (p.round == Some(round) && p.is_round_done()) || (!p.ok && p.event.is_none())
                })
            })
            .unwrap_or_else(|e| panic!("{}: round {round}: {e:#}", self.what));
        self.rounds += 1;
        let parsed: ProbeLine = serde_json::from_str(&line).expect("a probe line");
        if !parsed.ok {
            eprintln!("{}: round {round} failed: {line}", self.what);
        }
        parsed.ok
    }
}

/// One short echo exchange (a new connection); whether it succeeded.
fn exchange(cmd: Cmd) -> bool {
    let lines = cmd
        .args(["--rounds", "2", "--size", "1000", "--timeout-ms", "3000"])
        .run(RUN)
        .expect("running lb-probe echo")
        .probe_lines()
        .expect("probe lines");
    lines.len() == 1 && lines[0].ok
}

/// A counter of lb's per-service rows for `frontend`, summed over scopes and counters whose name ends in `suffix`.
fn lb_counter(stats: &Stats, frontend: &str, suffix: &str) -> u64 {
    stats
        .services
        .iter()
        .filter(|r| r.frontend == frontend)
        .flat_map(|r| r.counters.iter())
        .filter(|(k, _)| k.ends_with(suffix))
        .map(|(_, v)| *v)
        .sum()
}

fn migrate_and_roll_back(rules: Rules) {
    let probe = probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    let servers: Vec<Cmd> = [(&pair.pod_a, "pod-a"), (&pair.pod_b, "pod-b")]
        .into_iter()
        .map(|(ns, id)| {
            probe
                .serve_cmd(id, &[], &[])
                .args(["--echo-port", &TARGET_PORT.to_string()])
                .netns(ns)
        })
        .collect();
    for cmd in servers {
        pair.serve(cmd).expect("serving in a pod");
    }
    // Pod A reaches pod B directly through lb's socket LB: node B routes pod A's network back.
    pair.node_b
        .ip(&["route", "add", "10.244.1.0/24", "via", "198.51.100.1"])
        .expect("node B's route to pod A");
    let dir = std::env::temp_dir().join(format!("lb-tests-migration-{}", pair.token()));
    std::fs::create_dir_all(&dir).expect("test directory");
    let node_a = pair.node_a.name().to_owned();
    let web_node_port = sa(node_pair::NODE_A_V4, WEB_NODE_PORT);
    let web_cluster_ip = sa(WEB_IP, 80);
    let from_client = |to: std::net::SocketAddr| {
        probe
            .cmd()
            .arg("echo")
            .arg("--to")
            .arg(to.to_string())
            .netns(&pair.client)
    };
    let from_pod_a = |to: std::net::SocketAddr| {
        probe
            .cmd()
            .arg("echo")
            .arg("--to")
            .arg(to.to_string())
            .netns(&pair.pod_a)
            .cgroup(pair.cgroup())
    };

    // 1. kube-proxy alone.
    load_rules(rules, &node_a);
    let mut ext_old = Held::open(
        "client-nodeport-via-kube-proxy",
        from_client(web_node_port),
        &dir,
    );
    let mut pod_old = Held::open(
        "pod-clusterip-via-kube-proxy",
        from_pod_a(web_cluster_ip),
        &dir,
    );
    let dnat_before_lb = dnat_count(rules, &pair);
    assert!(
        dnat_before_lb >= 2,
        "{rules:?}: the old connections did not go through kube-proxy's DNAT"
    );

    // 2. lb starts beside kube-proxy.
    let agent = NodeAgent::start(
        &agent_bin!(),
        &pair,
        &manifest(),
        &["--coexist-with-kube-proxy"],
    );
    assert!(
        ext_old.round(),
        "{rules:?}: the NodePort connection set up by kube-proxy broke when lb started"
    );
    assert!(
        pod_old.round(),
        "{rules:?}: the pod's ClusterIP connection set up by kube-proxy broke when lb started"
    );
    let stats_before = agent.stats();
    assert!(
        exchange(from_client(web_node_port)),
        "{rules:?}: a new NodePort connection beside kube-proxy failed"
    );
    assert!(
        exchange(from_pod_a(web_cluster_ip)),
        "{rules:?}: a new ClusterIP connection beside kube-proxy failed"
    );
    let stats_after = agent.stats();
    let frontend_np = format!("{}:{WEB_NODE_PORT}", node_pair::NODE_A_V4);
    let frontend_ip = format!("{WEB_IP}:80");
    assert!(
        lb_counter(&stats_after, &frontend_np, "packets")
            > lb_counter(&stats_before, &frontend_np, "packets"),
        "{rules:?}: the new NodePort connection did not go through lb's tc program"
    );
    assert!(
        lb_counter(&stats_after, &frontend_ip, "sock_connects")
            > lb_counter(&stats_before, &frontend_ip, "sock_connects"),
        "{rules:?}: the new ClusterIP connection did not go through lb's socket LB"
    );
    assert_eq!(
        dnat_count(rules, &pair),
        dnat_before_lb,
        "{rules:?}: new connections went through kube-proxy's DNAT rules beside lb"
    );
    assert!(
        stats_after.reason("untracked-tcp") > 0,
        "{rules:?}: the old NodePort connection's packets were not passed to netfilter as untracked TCP"
    );

    // 3. kube-proxy's rules removed.
    remove_rules(rules, &pair);
    assert!(
        ext_old.round(),
        "{rules:?}: the old NodePort connection broke when kube-proxy's rules went"
    );
    assert!(
        pod_old.round(),
        "{rules:?}: the old ClusterIP connection broke when kube-proxy's rules went"
    );
    assert!(
        exchange(from_client(web_node_port)),
        "{rules:?}: a NodePort connection through lb alone failed"
    );

    // 4. The way back.
    let mut sock_lb = Held::open(
        "pod-clusterip-via-lb-socket-lb",
        from_pod_a(web_cluster_ip),
        &dir,
    );
    let far = sa(node_pair::NODE_A_V4, FAR_NODE_PORT);
    let mut tc_dnat = Held::open("client-nodeport-via-lb-tc", from_client(far), &dir);
    load_rules(rules, &node_a);
    let dnat_restored = dnat_count(rules, &pair);
    let pins = agent.pins().to_path_buf();
    drop(agent);
    let cleanup = Cmd::new(agent_bin!())
        .args(["cleanup", "--bpffs"])
        .arg(&pins)
        .netns(&pair.node_a)
        .label("lb-agent-cleanup")
        .run(RUN)
        .expect("lb-agent cleanup");
    assert!(
        cleanup.stderr.contains("cleanup done"),
        "{}",
        cleanup.stderr
    );
    assert!(
        sock_lb.round(),
        "{rules:?}: a socket-LB connection broke when lb was removed"
    );
    assert!(
        !tc_dnat.round(),
        "{rules:?}: a NodePort connection lb DNATed and SNATed survived the rollback: docs/install.md says it ends"
    );
    assert!(
        ext_old.round(),
        "{rules:?}: kube-proxy's old NodePort connection broke on the way back"
    );
    assert!(
        pod_old.round(),
        "{rules:?}: kube-proxy's old ClusterIP connection broke on the way back"
    );
    assert!(
        exchange(from_client(web_node_port)),
        "{rules:?}: a NodePort connection after the rollback failed"
    );
    assert!(
        dnat_count(rules, &pair) > dnat_restored,
        "{rules:?}: after the rollback new connections did not go through kube-proxy's DNAT"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn migration_beside_kube_proxy_iptables_keeps_connections_and_rolls_back() {
    if !require_root("migration_beside_kube_proxy_iptables_keeps_connections_and_rolls_back") {
        return;
    }
    migrate_and_roll_back(Rules::Iptables);
}

#[test]
fn migration_beside_kube_proxy_nftables_keeps_connections_and_rolls_back() {
    if !require_root("migration_beside_kube_proxy_nftables_keeps_connections_and_rolls_back") {
        return;
    }
    migrate_and_roll_back(Rules::Nftables);
}
