//! The clsact fallback of the per-packet programs, forced with `--tc-attach clsact` (this kernel has tcx, so the
//! fallback never runs by itself here): the log says so, NodePorts work through the netlink filters, a restarted
//! agent replaces its filters instead of stacking new ones, and `lb-agent cleanup` removes them. Real agent in node
//! A of a [`NodePair`], real traffic; every packet stays inside the namespaces the test creates.

use lb_tests::node_agent::{NODE_A, NodeAgent, RUN, client, sa, service};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{Cmd, agent_bin, probe, require_root, run_cmd};

/// The lb filters (`tc filter show`) on one hook of `dev` in node A.
fn lb_filters(pair: &NodePair, dev: &str, hook: &str) -> Vec<String> {
    let out = run_cmd(
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
fn clsact_fallback_serves_nodeports_and_cleanup_removes_its_filters() {
    if !require_root("clsact_fallback_serves_nodeports_and_cleanup_removes_its_filters") {
        return;
    }
    let probe = probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    let cmds = [
        probe.serve_cmd("pod-a", &[8080], &[]).netns(&pair.pod_a),
        probe.serve_cmd("pod-b", &[8080], &[]).netns(&pair.pod_b),
    ];
    for cmd in cmds {
        pair.serve(cmd).expect("serving in a pod");
    }
    let (a, b) = (node_pair::POD_A_V4, node_pair::POD_B_V4);
    let services = [
        service(
            "local",
            "10.96.3.1",
            "IPv4",
            "Local",
            &[("http", "TCP", 80, 8080, 30260)],
            &[(a, "node-a")],
            "",
        ),
        service(
            "remote",
            "10.96.3.2",
            "IPv4",
            "Cluster",
            &[("http", "TCP", 80, 8080, 30261)],
            &[(b, "node-b")],
            "",
        ),
    ]
    .concat();
    let mut agent = NodeAgent::start(
        &agent_bin!(),
        &pair,
        &format!("{NODE_A}{services}"),
        &["--tc-attach", "clsact"],
    );
    let devices = pair.node_a_devices();
    let log = agent.log();
    for dev in &devices {
        assert!(
            log.lines()
                .filter(|l| l.contains("clsact") && l.contains(dev.as_str()))
                .count()
                == 2,
            "the log says both programs on {dev} use the clsact qdisc:\n{log}"
        );
    }
    let links = agent.pins().join("links");
    let tc_links: Vec<_> = std::fs::read_dir(&links)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("tc-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(tc_links.is_empty(), "no tcx links were made: {tc_links:?}");

    let check_traffic = |pair: &NodePair, what: &str| {
        for (port, backend) in [(30260, "pod-a"), (30261, "pod-b")] {
            let to = sa(node_pair::NODE_A_V4, port);
            let lines = client(pair, probe.tcp_cmd(to, 3));
            assert!(
                lines.iter().all(|l| l.ok
                    && l.backend.as_deref() == Some(backend)
                    && l.peer.as_deref() == Some(&to.to_string()[..])),
                "{what}: NodePort {port} through the clsact filters: {lines:?}"
            );
        }
    };
    let one_each = |pair: &NodePair, what: &str| {
        for dev in &devices {
            for (hook, prog) in [("ingress", "lb_tc_ingress"), ("egress", "lb_tc_egress")] {
                let filters = lb_filters(pair, dev, hook);
                assert!(
                    filters.len() == 1 && filters[0].contains(prog),
                    "{what}: one {prog} filter on {dev} {hook}: {filters:?}"
                );
            }
        }
    };
    one_each(&pair, "first agent");
    check_traffic(&pair, "first agent");

    // A restarted agent replaces its filters (a second filter would sit behind the first, running the old program
    // after an upgrade).
    agent.restart(&pair);
    one_each(&pair, "restarted agent");
    check_traffic(&pair, "restarted agent");

    // The filters outlive the agent (the datapath keeps serving) until `lb-agent cleanup` removes them.
    agent.kill();
    check_traffic(&pair, "agent gone");
    let out = Cmd::new(agent_bin!())
        .arg("cleanup")
        .arg("--bpffs")
        .arg(pair.bpf_dir().path())
        .netns(&pair.node_a)
        .label("lb-agent-cleanup")
        .run(RUN)
        .expect("lb-agent cleanup");
    for dev in &devices {
        for hook in ["ingress", "egress"] {
            let filters = lb_filters(&pair, dev, hook);
            assert!(
                filters.is_empty(),
                "cleanup removed the filters on {dev} {hook}: {filters:?}\n{}",
                out.stderr
            );
        }
        assert!(
            out.stderr.contains(&format!("lb_tc_ingress on {dev}")),
            "cleanup names what it removed:\n{}",
            out.stderr
        );
    }
    // Nothing translates any more: node A itself answers the NodePort (nothing listens there).
    let lines = client(&pair, probe.tcp_cmd(sa(node_pair::NODE_A_V4, 30260), 1));
    assert!(
        lines
            .iter()
            .all(|l| !l.ok && l.error.as_deref() == Some("ECONNREFUSED")),
        "after cleanup the NodePort is node A's own closed port: {lines:?}"
    );
    drop(agent);
}
