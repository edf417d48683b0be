//! The capabilities of the agent's DaemonSet (`lb-agent manifests`, rendered in deploy/lb-agent.yaml), proved rather
//! than argued. The real agent runs as the DaemonSet's
//! container runs it (`lb_tests::caps`): root with exactly the capabilities the manifest adds (read from the
//! generated DaemonSet object, so this fails when the two diverge), `no_new_privs`, and its own PID namespace (the pod has no
//! `hostPID`, so `/proc` shows only the agent). It runs inside node A of a [`NodePair`] and must program the
//! datapath that real traffic then takes: a NodePort from the outside client (tc), a ClusterIP from a pod (socket
//! LB), and a pod's connected UDP sockets ended when their backend leaves (the pod's namespace found under
//! /run/netns, entered with setns, sockets ended with SOCK_DESTROY).
//!
//! Then each listed capability is taken away in turn, and the agent must fail where the kernel enforces it, with
//! an error that names the capability. A listed capability whose removal changes nothing fails the test: it is not
//! needed. Every packet stays inside the namespaces the test creates.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lb_agent::datapath::inspect;
use lb_agent::datapath::maps::PinnedMaps;
use lb_tests::caps::{self, ProcessCaps};
use lb_tests::node_agent::{NODE_A, NodeAgent, RUN, client, sa, service};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{Child, ProbeLine, agent_bin, probe, require_root};

const CLUSTER_IP: &str = "10.96.9.1";
const TCP_NODE_PORT: u16 = 30470;
const UDP_NODE_PORT: u16 = 30471;
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
/// Connected UDP sockets the pod opens; with two backends, the chance that none lands on pod B is 2^-16.
const SOCKETS: usize = 16;

/// The Service `caps`: TCP 80 and UDP 53 on [`CLUSTER_IP`] and as NodePorts, to `endpoints` (address, node).
fn manifest(endpoints: &[(&str, &str)]) -> String {
    let ports = [
        ("http", "TCP", 80, TCP_PORT, TCP_NODE_PORT),
        ("dns", "UDP", 53, UDP_PORT, UDP_NODE_PORT),
    ];
    let svc = service("caps", CLUSTER_IP, "IPv4", "Cluster", &ports, endpoints, "");
    format!("{NODE_A}{svc}")
}

const BOTH: [(&str, &str); 2] = [
    (node_pair::POD_A_V4, "node-a"),
    (node_pair::POD_B_V4, "node-b"),
];

/// What became of an agent started with a capability set.
enum Outcome {
    /// It exited before its initial sync; its log.
    FailedToStart(String),
    Ran(Ran),
}

struct Ran {
    log: String,
    caps: ProcessCaps,
    /// The agent's PID namespace differs from the test's (it cannot see the pod's processes).
    own_pid_namespace: bool,
    /// Whether the pod's connected UDP sockets on the removed backend were ended (false: they kept reaching it).
    stale_sockets_ended: bool,
}

/// Runs the whole scenario with the agent holding exactly `caps`.
fn scenario(caps: &[String]) -> Outcome {
    let probe = probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    let cmds = [
        probe
            .serve_cmd("pod-a", &[TCP_PORT], &[UDP_PORT])
            .netns(&pair.pod_a),
        probe
            .serve_cmd("pod-b", &[TCP_PORT], &[UDP_PORT])
            .netns(&pair.pod_b),
    ];
    for cmd in cmds {
        pair.serve(cmd).expect("serving in a pod");
    }
    // Pod A reaches pod B through the socket LB, so node B routes pod A's network back, as cluster nodes route
    // each other's pod CIDRs.
    pair.node_b
        .ip(&["route", "add", "10.244.1.0/24", "via", "198.51.100.1"])
        .expect("node B's route to pod A");
    let prefix = caps::container_prefix(caps).expect("capability prefix");
    let started = NodeAgent::try_start_under(
        &agent_bin!(),
        &pair,
        &manifest(&BOTH),
        &pair.node_a_devices(),
        &[],
        &prefix,
    );
    let mut agent = match started {
        Ok(agent) => agent,
        Err(log) => return Outcome::FailedToStart(log),
    };
    let agent_pid = caps::first_child(agent.pid()).expect("the agent under unshare");
    let process = caps::process_caps(agent_pid).expect("the agent's capabilities");
    let pid_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let own_pid_namespace = pid_ns(&agent_pid.to_string()) != pid_ns("self");

    // The maps hold the Service as the manifest says.
    let maps = PinnedMaps::open(agent.pins()).expect("opening the pinned maps");
    let listed = inspect::services(&maps).expect("reading the services");
    for frontend in [
        format!("{CLUSTER_IP}:80"),
        format!("{}:{TCP_NODE_PORT}", node_pair::NODE_A_V4),
    ] {
        let mut backends: Vec<String> = listed
            .iter()
            .filter(|s| s.frontend == frontend)
            .flat_map(|s| s.backends.iter().map(|b| b.address.clone()))
            .collect();
        backends.sort();
        backends.dedup();
        assert_eq!(
            backends,
            [
                format!("{}:{TCP_PORT}", node_pair::POD_A_V4),
                format!("{}:{TCP_PORT}", node_pair::POD_B_V4)
            ],
            "{frontend} in the maps:\n{}",
            inspect::render_services(&listed)
        );
    }

    // tc: the outside client through node A's NodePort.
    let to = sa(node_pair::NODE_A_V4, TCP_NODE_PORT);
    let lines = client(&pair, probe.tcp_cmd(to, 10));
    assert!(
        lines.len() == 10
            && lines
                .iter()
                .all(|l| l.ok && matches!(l.backend.as_deref(), Some("pod-a") | Some("pod-b"))),
        "NodePort {to} from the client: {lines:?}"
    );

    // Socket LB: pod A (in the agent's cgroup, as every pod is) to the ClusterIP; its peer stays the VIP.
    let to = sa(CLUSTER_IP, 80);
    let cmd = probe
        .tcp_cmd(to, 10)
        .netns(&pair.pod_a)
        .cgroup(pair.cgroup());
    let lines = cmd
        .run(RUN)
        .expect("pod A's client")
        .probe_lines()
        .expect("probe lines");
    assert!(
        lines.len() == 10
            && lines.iter().all(|l| l.ok
                && matches!(l.backend.as_deref(), Some("pod-a") | Some("pod-b"))
                && l.peer.as_deref() == Some(&to.to_string()[..])),
        "ClusterIP {to} from pod A through the socket LB: {lines:?}"
    );

    // Stale sockets: pod A's connected UDP sockets, then pod B leaves the Service while its server keeps running.
    let pause = std::env::temp_dir().join(format!("lb-tests-caps-pause-{}", pair.token()));
    let cmd = probe
        .udp_sticky_cmd(sa(CLUSTER_IP, 53), SOCKETS, 2, &pause)
        .arg("--connected")
        .netns(&pair.pod_a)
        .cgroup(pair.cgroup());
    let client_pid = pair.spawn(cmd).expect("pod A's UDP client").pid();
    fn udp_client(pair: &mut NodePair, pid: u32) -> &mut Child {
        pair.child_by_pid(pid).expect("the UDP client")
    }
    wait_round(udp_client(&mut pair, client_pid), 1);
    agent.update(
        &manifest(&BOTH[..1]),
        &format!("{CLUSTER_IP}:53"),
        &[&format!("{}:{UDP_PORT}", node_pair::POD_A_V4)],
        false,
    );
    agent.wait_for_log("ended sockets connected to departed backends");
    std::fs::write(&pause, b"").expect("releasing round 2");
    wait_round(udp_client(&mut pair, client_pid), 2);
    let _ = std::fs::remove_file(&pause);
    let lines = udp_client(&mut pair, client_pid)
        .probe_lines()
        .expect("UDP client lines");
    let round = |r: usize| -> BTreeMap<usize, &ProbeLine> {
        lines
            .iter()
            .filter(|l| l.round == Some(r) && !l.is_round_done())
            .map(|l| (l.socket.expect("socket index"), l))
            .collect()
    };
    let (first, second) = (round(1), round(2));
    let (mut ended, mut stale) = (0, 0);
    for (socket, before) in &first {
        assert!(before.ok, "round 1, socket {socket}: {before:?}");
        let after = second[socket];
        if before.backend.as_deref() == Some("pod-b") {
            if after.ok {
                assert_eq!(after.backend, before.backend, "socket {socket} moved");
                stale += 1;
            } else {
                ended += 1;
            }
        } else {
            assert!(
                after.ok && after.backend == before.backend,
                "socket {socket} on the remaining backend was disturbed: {after:?}"
            );
        }
    }
    assert!(
        ended + stale > 0,
        "no socket was on pod B; the test proved nothing: {first:?}"
    );
    assert!(
        ended == 0 || stale == 0,
        "of the sockets on pod B, {ended} were ended and {stale} not:\n{}",
        agent.log()
    );
    Outcome::Ran(Ran {
        log: agent.log(),
        caps: process,
        own_pid_namespace,
        stale_sockets_ended: ended > 0,
    })
}

fn wait_round(client: &mut Child, n: usize) {
    let deadline = Instant::now() + RUN;
    loop {
        let done = client
            .probe_lines()
            .expect("client output")
            .iter()
            .filter(|l| l.is_round_done())
            .count();
        if done >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "round {n} did not finish: {}",
            client.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the kernel does to an agent holding `rest`, by its own rules: bpf() needs CAP_BPF, networking program
/// types CAP_NET_ADMIN, the verifier's privileged rules CAP_PERFMON, and CAP_SYS_ADMIN stands in for all three
/// (`bpf_capable()`, `bpf_net_capable()`, `perfmon_capable()`); setns into another network namespace needs
/// CAP_SYS_ADMIN, and sock_diag's SOCK_DESTROY CAP_NET_ADMIN, with no stand-in.
#[derive(Debug, PartialEq)]
enum Expect {
    /// Loading the datapath fails; the error names these capabilities.
    FailsToStart(Vec<&'static str>),
    /// Everything runs but the pod's stale sockets stay open, and the agent says it lacks this capability.
    StaleSocketsStay(&'static str),
}

/// `None`: nothing the agent does needs `removed` while it holds `rest`.
fn expectation(removed: &str, rest: &[String]) -> Option<Expect> {
    let has = |c: &str| rest.iter().any(|r| r == c);
    let missing: Vec<&'static str> = if has("SYS_ADMIN") {
        Vec::new()
    } else {
        [
            ("BPF", "CAP_BPF"),
            ("NET_ADMIN", "CAP_NET_ADMIN"),
            ("PERFMON", "CAP_PERFMON"),
        ]
        .into_iter()
        .filter(|(c, _)| !has(c))
        .map(|(_, n)| n)
        .collect()
    };
    if !missing.is_empty() {
        return Some(Expect::FailsToStart(missing));
    }
    match removed {
        "SYS_ADMIN" => Some(Expect::StaleSocketsStay("CAP_SYS_ADMIN")),
        "NET_ADMIN" => Some(Expect::StaleSocketsStay("CAP_NET_ADMIN")),
        _ => None,
    }
}

/// Takes each capability of `set` away in turn and checks that the kernel's refusal shows as expected.
fn each_capability_is_enforced(set: &[String]) {
    for removed in set {
        let rest: Vec<String> = set.iter().filter(|c| *c != removed).cloned().collect();
        let Some(expect) = expectation(removed, &rest) else {
            // Shown by running it: an agent without it does everything the full set does.
            match scenario(&rest) {
                Outcome::Ran(ran)
                    if ran.stale_sockets_ended && !ran.log.contains("the agent lacks") =>
                {
                    panic!(
                        "{removed} is listed, but the agent needs nothing of it while it holds {rest:?}: \
                         remove it from AGENT_CAPABILITIES (lb-agent/src/install/objects.rs) and the table of \
                         docs/capabilities.md"
                    )
                }
                Outcome::Ran(ran) => panic!(
                    "without {removed} something failed that this test does not expect:\n{}",
                    ran.log
                ),
                Outcome::FailedToStart(log) => {
                    panic!(
                        "without {removed} the agent did not start, which this test does not expect:\n{log}"
                    )
                }
            }
        };
        match (scenario(&rest), &expect) {
            (Outcome::FailedToStart(log), Expect::FailsToStart(names)) => {
                let error = log
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("lb-agent:"))
                    .unwrap_or_else(|| panic!("without {removed}: no error line in:\n{log}"));
                assert!(
                    error.contains(&format!("the agent lacks {}", names.join(", "))),
                    "without {removed}: the error does not name {names:?}: {error}"
                );
                assert!(
                    error.contains("Operation not permitted")
                        || error.contains("Permission denied"),
                    "without {removed}: the kernel's refusal is not in the error: {error}"
                );
            }
            (Outcome::Ran(ran), Expect::StaleSocketsStay(cap)) => {
                assert!(
                    !ran.stale_sockets_ended,
                    "without {removed} the pod's stale sockets were still ended:\n{}",
                    ran.log
                );
                assert!(
                    ran.log
                        .contains(&format!("cannot end stale sockets: the agent lacks {cap}")),
                    "without {removed} the agent does not say it lacks {cap}:\n{}",
                    ran.log
                );
            }
            (Outcome::FailedToStart(log), _) => {
                panic!("without {removed} ({expect:?}) the agent did not start:\n{log}")
            }
            (Outcome::Ran(ran), _) => {
                panic!(
                    "without {removed} ({expect:?}) the agent started:\n{}",
                    ran.log
                )
            }
        }
    }
}

#[test]
fn the_daemonsets_capabilities_carry_traffic_and_end_stale_pod_sockets() {
    if !require_root("the_daemonsets_capabilities_carry_traffic_and_end_stale_pod_sockets") {
        return;
    }
    let ds = caps::daemonset_security().expect("the generated DaemonSet");
    // What the simulation stands for must be what the manifest says.
    assert_eq!(
        ds.drop,
        ["ALL"],
        "the container drops every other capability"
    );
    assert!(!ds.privileged && !ds.allow_privilege_escalation && !ds.host_pid);
    assert_eq!(ds.run_as_user, Some(0));
    assert!(
        ds.host_paths
            .contains(&("/run/netns".to_owned(), "/run/netns".to_owned())),
        "the agent finds pods' network namespaces under the node's /run/netns: {:?}",
        ds.host_paths
    );
    let want = caps::mask(&ds.add).expect("known capability names");

    let Outcome::Ran(ran) = scenario(&ds.add) else {
        panic!(
            "the agent did not start with the DaemonSet's capabilities {:?}",
            ds.add
        );
    };
    assert_eq!(
        (ran.caps.effective, ran.caps.permitted, ran.caps.bounding),
        (want, want, want),
        "the agent ran with {:?}, the DaemonSet grants {:?}",
        caps::names(ran.caps.effective),
        ds.add
    );
    assert!(ran.caps.no_new_privs, "no_new_privs is not set");
    assert!(
        ran.own_pid_namespace,
        "the agent shares the test's PID namespace"
    );
    assert!(
        ran.stale_sockets_ended,
        "the pod's sockets on the removed backend were not ended:\n{}",
        ran.log
    );
    assert!(
        !ran.log.contains("the agent lacks"),
        "the agent reports a missing capability:\n{}",
        ran.log
    );
}

#[test]
fn each_capability_the_daemonset_adds_is_enforced_by_the_kernel() {
    if !require_root("each_capability_the_daemonset_adds_is_enforced_by_the_kernel") {
        return;
    }
    let ds = caps::daemonset_security().expect("the generated DaemonSet");
    each_capability_is_enforced(&ds.add);
}

/// The set docs/capabilities.md offers for nodes that do without CAP_SYS_ADMIN: the datapath and the traffic work;
/// only the pods' stale sockets stay open (the agent says why), and each of the three is still enforced.
#[test]
fn without_sys_admin_bpf_net_admin_and_perfmon_run_everything_but_ending_pod_sockets() {
    if !require_root(
        "without_sys_admin_bpf_net_admin_and_perfmon_run_everything_but_ending_pod_sockets",
    ) {
        return;
    }
    let set: Vec<String> = ["BPF", "NET_ADMIN", "PERFMON"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let Outcome::Ran(ran) = scenario(&set) else {
        panic!("the agent did not start with {set:?}");
    };
    assert_eq!(
        ran.caps.effective,
        caps::mask(&set).expect("mask"),
        "{:?}",
        caps::names(ran.caps.effective)
    );
    assert!(
        !ran.stale_sockets_ended
            && ran
                .log
                .contains("cannot end stale sockets: the agent lacks CAP_SYS_ADMIN"),
        "without CAP_SYS_ADMIN the pod's sockets cannot be reached, and the agent says so:\n{}",
        ran.log
    );
    each_capability_is_enforced(&set);
}

/// lb's clsact filters on one hook of `dev` in node A.
fn lb_filters(pair: &NodePair, dev: &str, hook: &str) -> Vec<String> {
    lb_tests::run_cmd(
        "tc",
        &["-n", pair.node_a.name(), "filter", "show", "dev", dev, hook],
    )
    .expect("tc filter show")
    .lines()
    .filter(|l| l.contains("lb_tc_"))
    .map(str::to_owned)
    .collect()
}

/// `lb-agent cleanup` as the cleanup DaemonSet's container runs it, with exactly `caps`, in node A.
fn cleanup_with(pair: &NodePair, caps: &[&str]) -> lb_tests::Output {
    let prefix = caps::container_prefix(caps).expect("capability prefix");
    let (program, args) = prefix.split_first().expect("a prefix");
    lb_tests::Cmd::new(program)
        .args(args)
        .arg(agent_bin!())
        .args(["cleanup", "--bpffs"])
        .arg(pair.bpf_dir().path())
        .netns(&pair.node_a)
        .label("lb-agent-cleanup")
        .run(RUN)
        .expect("lb-agent cleanup")
}

/// The cleanup DaemonSet (`lb-agent manifests --uninstall`) adds only `CLEANUP_CAPABILITIES`: with exactly those,
/// `lb-agent cleanup` removes every pin and the clsact fallback's filters; without them the filters stay.
#[test]
fn the_cleanup_daemonsets_capabilities_remove_all_lb_left_and_are_needed() {
    if !require_root("the_cleanup_daemonsets_capabilities_remove_all_lb_left_and_are_needed") {
        return;
    }
    use lb_agent::install::objects::CLEANUP_CAPABILITIES;
    let pair = NodePair::new().expect("building the node pair");
    let devices = pair.node_a_devices();
    let filters_left = |pair: &NodePair| -> Vec<String> {
        devices
            .iter()
            .flat_map(|d| ["ingress", "egress"].map(|h| lb_filters(pair, d, h)))
            .flatten()
            .collect()
    };
    for (caps, enough) in [(&[][..], false), (&CLEANUP_CAPABILITIES[..], true)] {
        let mut agent = NodeAgent::start(
            &agent_bin!(),
            &pair,
            &manifest(&BOTH),
            &["--tc-attach", "clsact"],
        );
        agent.kill();
        assert!(
            !filters_left(&pair).is_empty(),
            "the agent attached no clsact filter"
        );
        let out = cleanup_with(&pair, caps);
        let pins_left: Vec<_> = std::fs::read_dir(pair.bpf_dir().path())
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        assert!(
            pins_left.is_empty(),
            "with {caps:?} cleanup left pins {pins_left:?}:\n{}",
            out.stderr
        );
        let left = filters_left(&pair);
        if enough {
            assert!(
                left.is_empty() && out.stderr.contains("cleanup done"),
                "with {caps:?} (the cleanup DaemonSet's) cleanup left filters {left:?}:\n{}",
                out.stderr
            );
        } else {
            assert!(
                !left.is_empty(),
                "without any capability cleanup removed the clsact filters: NET_ADMIN is not needed, remove it \
                 from CLEANUP_CAPABILITIES:\n{}",
                out.stderr
            );
            // Gone with full rights before the next round.
            let full = cleanup_with(&pair, &["NET_ADMIN", "SYS_ADMIN"]);
            assert!(filters_left(&pair).is_empty(), "{}", full.stderr);
        }
        drop(agent);
    }
}
