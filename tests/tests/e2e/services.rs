//! `test/e2e/network/service.go` (`[sig-network] Services`).

use anyhow::{Result, bail, ensure};
use lb_tests::cluster::{PodSpec, cluster_ip, node_port, service};

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::Case;
use crate::support::{Ctx, From, LAG, Proto, check_affinity, eventually, sa};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "services/basic-endpoints",
            covers: &[
                "[sig-network] Services should serve a basic endpoint from pods [Conformance]",
            ],
            run: basic_endpoints,
        },
        Case {
            name: "services/multiport-endpoints",
            covers: &[
                "[sig-network] Services should serve multiport endpoints from pods [Conformance]",
            ],
            run: multiport_endpoints,
        },
        Case {
            name: "services/source-ip",
            covers: &[
                "[sig-network] Services should preserve source pod IP for traffic thru service cluster IP [LinuxOnly]",
            ],
            run: source_ip,
        },
        Case {
            name: "services/hairpin",
            covers: &[
                "[sig-network] Services should allow pods to hairpin back to themselves through services",
            ],
            run: hairpin,
        },
        Case {
            name: "services/nodeport",
            covers: &[
                "[sig-network] Services should be able to create a functioning NodePort service [Conformance]",
            ],
            run: nodeport,
        },
        Case {
            name: "services/affinity-clusterip",
            covers: &[
                "[sig-network] Services should have session affinity work for service with type clusterIP [LinuxOnly] [Conformance]",
                "[sig-network] Services should be able to switch session affinity for service with type clusterIP [LinuxOnly] [Conformance]",
            ],
            run: affinity_cluster_ip,
        },
        Case {
            name: "services/affinity-nodeport",
            covers: &[
                "[sig-network] Services should have session affinity work for NodePort service [LinuxOnly] [Conformance]",
                "[sig-network] Services should be able to switch session affinity for NodePort service [LinuxOnly] [Conformance]",
            ],
            run: affinity_node_port,
        },
        Case {
            name: "services/affinity-timeout",
            covers: &[
                "[sig-network] Services should have session affinity timeout work for service with type clusterIP [LinuxOnly]",
                "[sig-network] Services should have session affinity timeout work for NodePort service [LinuxOnly]",
            ],
            run: affinity_timeout,
        },
    ]
}

/// `validateEndpointsPortsOrFail`: the slices hold exactly these (pod IP, port) pairs.
fn expect_endpoints(
    ctx: &Ctx<'_>,
    svc: &str,
    want: &[(&lb_tests::cluster::Pod, u16)],
) -> Result<()> {
    let want: std::collections::BTreeSet<(String, u16)> = want
        .iter()
        .map(|(p, port)| (p.ip.to_string(), *port))
        .collect();
    let got = ctx.endpoint_ports(svc);
    ensure!(
        got == want,
        "{svc}'s EndpointSlices hold {got:?}, expected {want:?}"
    );
    Ok(())
}

/// "should serve a basic endpoint from pods": no pod, one, two, one, none; reachable through the ClusterIP from an
/// exec pod whenever there is a pod (`CheckServiceReachability`).
fn basic_endpoints(ctx: &Ctx<'_>) -> Result<()> {
    let svc = ctx.c.create_service(
        service(&ctx.ns, "endpoint-test2", "endpoint-test2")
            .port("", 80, 80, "TCP")
            .build(),
    )?;
    let vip = sa(&cluster_ip(&svc), 80);
    expect_endpoints(ctx, "endpoint-test2", &[])?;
    let exec = ctx.exec_pod("execpod", 1)?;
    let pod1 = ctx
        .c
        .create_pod(&PodSpec::web(&ctx.ns, "pod1", 0, "endpoint-test2", &[80]))?;
    expect_endpoints(ctx, "endpoint-test2", &[(&pod1, 80)])?;
    ctx.expect_backends(&From::Pod(&exec), Proto::Tcp, vip, &["pod1"])?;
    let pod2 = ctx
        .c
        .create_pod(&PodSpec::web(&ctx.ns, "pod2", 1, "endpoint-test2", &[80]))?;
    expect_endpoints(ctx, "endpoint-test2", &[(&pod1, 80), (&pod2, 80)])?;
    ctx.expect_backends(&From::Pod(&exec), Proto::Tcp, vip, &["pod1", "pod2"])?;
    ctx.c.delete_pod(&pod1)?;
    expect_endpoints(ctx, "endpoint-test2", &[(&pod2, 80)])?;
    ctx.expect_backends(&From::Pod(&exec), Proto::Tcp, vip, &["pod2"])?;
    ctx.c.delete_pod(&pod2)?;
    expect_endpoints(ctx, "endpoint-test2", &[])?;
    Ok(())
}

/// "should serve multiport endpoints from pods": ports 80 and 81 with named targets `svc1` (pod1: 100) and `svc2`
/// (pod2: 101).
fn multiport_endpoints(ctx: &Ctx<'_>) -> Result<()> {
    let name = "multi-endpoint-test";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .named_port("portname1", 80, "svc1", "TCP")
            .named_port("portname2", 81, "svc2", "TCP")
            .build(),
    )?;
    let ip = cluster_ip(&svc);
    expect_endpoints(ctx, name, &[])?;
    let mut spec1 = PodSpec::web(&ctx.ns, "pod1", 0, name, &[]);
    spec1 = spec1.with_port("svc1", 100, "TCP");
    let pod1 = ctx.c.create_pod(&spec1)?;
    expect_endpoints(ctx, name, &[(&pod1, 100)])?;
    let pod2 = ctx
        .c
        .create_pod(&PodSpec::web(&ctx.ns, "pod2", 1, name, &[]).with_port("svc2", 101, "TCP"))?;
    expect_endpoints(ctx, name, &[(&pod1, 100), (&pod2, 101)])?;
    let exec = ctx.exec_pod("execpod", 2)?;
    ctx.expect_backends(&From::Pod(&exec), Proto::Tcp, sa(&ip, 80), &["pod1"])?;
    ctx.expect_backends(&From::Pod(&exec), Proto::Tcp, sa(&ip, 81), &["pod2"])?;
    ctx.c.delete_pod(&pod1)?;
    expect_endpoints(ctx, name, &[(&pod2, 101)])?;
    ctx.c.delete_pod(&pod2)?;
    expect_endpoints(ctx, name, &[])?;
    Ok(())
}

/// "should preserve source pod IP for traffic thru service cluster IP": pause pods on two nodes reach the echo
/// server through the ClusterIP, and it sees each one's own pod IP.
fn source_ip(ctx: &Ctx<'_>) -> Result<()> {
    let name = "sourceip-test";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .port("", 8080, 8080, "TCP")
            .build(),
    )?;
    let server = ctx
        .c
        .create_pod(&PodSpec::web(&ctx.ns, "echo-sourceip", 0, name, &[8080]))?;
    expect_endpoints(ctx, name, &[(&server, 8080)])?;
    let vip = sa(&cluster_ip(&svc), 8080);
    for node in [0, 1] {
        let pause = ctx.exec_pod(&format!("pause-pod-{node}"), node)?;
        ctx.expect_backends(&From::Pod(&pause), Proto::Tcp, vip, &["echo-sourceip"])?;
        let peers: Vec<String> = ctx
            .c
            .served(&server, "tcp")
            .into_iter()
            .filter_map(|l| l.peer)
            .collect();
        let last = peers.last().cloned().unwrap_or_default();
        ensure!(
            last.starts_with(&format!("{}:", pause.ip)),
            "the server saw {last} for a connection from {} (node-{node}): source IP not preserved",
            pause.ip
        );
    }
    Ok(())
}

/// "should allow pods to hairpin back to themselves through services".
fn hairpin(ctx: &Ctx<'_>) -> Result<()> {
    let name = "hairpin-test";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .port("", 8080, 8080, "TCP")
            .build(),
    )?;
    let pod = ctx
        .c
        .create_pod(&PodSpec::web(&ctx.ns, "hairpin", 1, name, &[8080]))?;
    expect_endpoints(ctx, name, &[(&pod, 8080)])?;
    ctx.expect_backends(
        &From::Pod(&pod),
        Proto::Tcp,
        sa(&cluster_ip(&svc), 8080),
        &["hairpin"],
    )
}

/// "should be able to create a functioning NodePort service": `CheckServiceReachability` of a NodePort Service
/// from an exec pod (ClusterIP and every node's InternalIP:nodePort), and from outside through each node.
fn nodeport(ctx: &Ctx<'_>) -> Result<()> {
    let name = "nodeport-test";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .type_("NodePort")
            .port("http", 80, 9376, "TCP")
            .build(),
    )?;
    let np = node_port(&svc, 0);
    if np == 0 {
        bail!("no nodePort allocated: {svc}");
    }
    let pods = ctx.pods(name, 2, 9376, &[0, 1])?;
    let want = Ctx::names(&pods);
    let exec = ctx.exec_pod("execpod", 2)?;
    ctx.expect_backends(
        &From::Pod(&exec),
        Proto::Tcp,
        sa(&cluster_ip(&svc), 80),
        &want,
    )?;
    for node in &ctx.c.nodes {
        let to = sa(&node.ip().to_string(), np);
        ctx.expect_backends(&From::Pod(&exec), Proto::Tcp, to, &want)?;
        ctx.expect_backends(&From::External, Proto::Tcp, to, &want)?;
    }
    Ok(())
}

/// `execAffinityTestForNonLBServiceWithOptionalTransition`: a ClientIP Service over three pods; affinity holds
/// (15 answers in a row from one pod), then with `sessionAffinity: None` it does not, then again it does.
fn affinity(ctx: &Ctx<'_>, name: &str, node_port_type: bool, from_node: usize) -> Result<()> {
    let ty = if node_port_type {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let (svc, _pods) = ctx.serve_hostname(name, 3, &[0, 1, 2], |s| {
        s.type_(ty).spec("sessionAffinity", json!("ClientIP"))
    })?;
    let exec = ctx.exec_pod("execpod-affinity", from_node)?;
    let from = From::Pod(&exec);
    let to = if node_port_type {
        // The first node's InternalIP: from an exec pod on another node this is the per-packet path.
        sa(&ctx.c.nodes[0].ip().to_string(), node_port(&svc, 0))
    } else {
        sa(&cluster_ip(&svc), 80)
    };
    // CheckServiceReachability (one pod answers: affinity keeps this client on it), then the affinity checks.
    eventually(&format!("{to} answers"), LAG, || {
        expect_some_backend(ctx, &from, to)
    })?;
    check_affinity(ctx, &from, to, true)?;
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["sessionAffinity"] = json!("None")
    })?;
    check_affinity(ctx, &from, to, false)?;
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["sessionAffinity"] = json!("ClientIP")
    })?;
    check_affinity(ctx, &from, to, true)
}

/// Affinity makes a ClusterIP reachable through one pod only: reachability then means "some pod answers".
fn expect_some_backend(ctx: &Ctx<'_>, from: &From<'_>, to: SocketAddr) -> Result<()> {
    let hosts = ctx.hosts(from, Proto::Tcp, to, 3)?;
    ensure!(!hosts.is_empty(), "nothing answered at {to}");
    Ok(())
}

fn affinity_cluster_ip(ctx: &Ctx<'_>) -> Result<()> {
    affinity(ctx, "affinity-clusterip-transition", false, 0)
}

fn affinity_node_port(ctx: &Ctx<'_>) -> Result<()> {
    // From node-1 to node-0's NodePort: the per-packet path (client address), and from node-0 itself: the socket LB.
    affinity(ctx, "affinity-nodeport-transition", true, 1)?;
    ctx.cleanup();
    affinity(ctx, "affinity-nodeport-local", true, 0)
}

/// `execAffinityTestForSessionAffinityTimeout`, with a 2-second timeout instead of 125: sticky while used more often
/// than the timeout, a different pod (within 10 tries) once a timeout passes without traffic.
fn affinity_timeout(ctx: &Ctx<'_>) -> Result<()> {
    const TIMEOUT: u64 = 2;
    for (name, node_port_type, from_node) in [
        ("affinity-clusterip-timeout", false, 0),
        ("affinity-nodeport-timeout", true, 1),
    ] {
        let ty = if node_port_type {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let (svc, _pods) = ctx.serve_hostname(name, 3, &[0, 1, 2], |s| {
            s.type_(ty).spec("sessionAffinity", json!("ClientIP")).spec(
                "sessionAffinityConfig",
                json!({"clientIP": {"timeoutSeconds": TIMEOUT}}),
            )
        })?;
        let exec = ctx.exec_pod(&format!("execpod-{name}"), from_node)?;
        let from = From::Pod(&exec);
        let to = if node_port_type {
            sa(&ctx.c.nodes[0].ip().to_string(), node_port(&svc, 0))
        } else {
            sa(&cluster_ip(&svc), 80)
        };
        check_affinity(ctx, &from, to, true)?;
        let mut hosts = BTreeSet::new();
        let mut moved = false;
        for _ in 0..10 {
            let h = ctx.hosts(&from, Proto::Tcp, to, 1)?;
            hosts.extend(h.into_keys());
            if hosts.len() > 1 {
                moved = true;
                break;
            }
            std::thread::sleep(Duration::from_secs(TIMEOUT + 1));
        }
        ensure!(
            moved,
            "{name}: session is sticky after reaching the timeout ({hosts:?})"
        );
    }
    Ok(())
}
