//! `--devices` changes between agent runs: a device left out of the new list stops translating at once (its tcx
//! link pins are removed, its clsact filters too), instead of keeping a previous agent's programs until `lb-agent
//! cleanup`. Real agent in node A of a [`NodePair`], real traffic; every packet stays inside the namespaces the
//! test creates.

use std::time::{Duration, Instant};

use lb_tests::node_agent::{NODE_A, NodeAgent, client, sa, service};
use lb_tests::topology::{NodePair, node_pair};
use lb_tests::{agent_bin, probe, require_root, run_cmd};

const PORT: u16 = 30270;

fn tc_pins(agent: &NodeAgent, dev: &str) -> Vec<String> {
    std::fs::read_dir(agent.pins().join("links"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("tc-") && n.ends_with(dev))
                .collect()
        })
        .unwrap_or_default()
}

fn lb_filters(pair: &NodePair, dev: &str) -> usize {
    ["ingress", "egress"]
        .iter()
        .map(|hook| {
            run_cmd(
                "tc",
                &["-n", pair.node_a.name(), "filter", "show", "dev", dev, hook],
            )
            .expect("tc filter show")
            .lines()
            .filter(|l| l.contains("lb_tc_"))
            .count()
        })
        .sum()
}

fn dropped_device_is_detached_on_restart(extra: &[&str]) {
    let probe = probe!();
    let mut pair = NodePair::new().expect("building the node pair");
    pair.serve(probe.serve_cmd("pod-a", &[8080], &[]).netns(&pair.pod_a))
        .expect("serving in pod A");
    let services = service(
        "web",
        "10.96.7.1",
        "IPv4",
        "Cluster",
        &[("http", "TCP", 80, 8080, PORT)],
        &[(node_pair::POD_A_V4, "node-a")],
        "",
    );
    let devices = pair.node_a_devices();
    let uplink = devices
        .iter()
        .find(|d| d.starts_with("up-"))
        .expect("node A's uplink among its devices")
        .clone();
    let mut agent = NodeAgent::start(&agent_bin!(), &pair, &format!("{NODE_A}{services}"), extra);
    let to = sa(node_pair::NODE_A_V4, PORT);
    let lines = client(&pair, probe.tcp_cmd(to, 3));
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.backend.as_deref() == Some("pod-a")),
        "the NodePort is served through {uplink}: {lines:?}"
    );
    let attached = tc_pins(&agent, &uplink).len() + lb_filters(&pair, &uplink);
    assert!(attached > 0, "lb's programs are attached on {uplink}");

    // The operator drops the uplink from --devices.
    let rest: Vec<String> = devices.iter().filter(|d| **d != uplink).cloned().collect();
    agent.restart_on_devices(&pair, &rest);
    assert!(
        tc_pins(&agent, &uplink).is_empty(),
        "no tc link pin of {uplink} is left: {:?}",
        tc_pins(&agent, &uplink)
    );
    assert_eq!(
        lb_filters(&pair, &uplink),
        0,
        "no lb clsact filter on {uplink}"
    );
    assert!(
        agent.log().contains("device no longer in --devices"),
        "the log says why:\n{}",
        agent.log()
    );
    // Nothing translates the NodePort on the uplink any more: node A itself refuses it (no listener).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = client(&pair, probe.tcp_cmd(to, 1));
        if lines
            .iter()
            .all(|l| !l.ok && l.error.as_deref() == Some("ECONNREFUSED"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the NodePort is still translated on {uplink}: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The devices still listed keep their programs.
    for dev in &rest {
        assert!(
            tc_pins(&agent, dev).len() + lb_filters(&pair, dev) > 0,
            "{dev} keeps lb's programs"
        );
    }
    drop(agent);
}

#[test]
fn a_device_dropped_from_devices_is_detached_on_restart_tcx() {
    if !require_root("a_device_dropped_from_devices_is_detached_on_restart_tcx") {
        return;
    }
    dropped_device_is_detached_on_restart(&[]);
}

#[test]
fn a_device_dropped_from_devices_is_detached_on_restart_clsact() {
    if !require_root("a_device_dropped_from_devices_is_detached_on_restart_clsact") {
        return;
    }
    dropped_device_is_detached_on_restart(&["--tc-attach", "clsact"]);
}
