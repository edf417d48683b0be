//! `test/e2e/network/service.go` (`[sig-network] Services`).

use anyhow::{Result, bail, ensure};
use lb_tests::cluster::{Pod, PodSpec, cluster_ip, node_port, service};

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
        Case {
            name: "services/ports-added-removed",
            covers: &["[sig-network] Services should be updated after adding or deleting ports"],
            run: ports_added_removed,
        },
        Case {
            name: "services/up-down",
            covers: &["[sig-network] Services should be able to up and down services"],
            run: up_down,
        },
        Case {
            name: "services/recreate",
            covers: &["[sig-network] Services should work after the service has been recreated"],
            run: recreate,
        },
        Case {
            name: "services/restart-agent",
            covers: &[
                "[sig-network] Services should work after restarting kube-proxy [Disruptive]",
            ],
            run: restart_agent,
        },
        Case {
            name: "services/restart-apiserver",
            covers: &["[sig-network] Services should work after restarting apiserver [Disruptive]"],
            run: restart_apiserver,
        },
        Case {
            name: "services/externalip",
            covers: &[
                "[sig-network] Services should be possible to connect to a service via ExternalIP when the external IP is not assigned to a node",
            ],
            run: external_ip,
        },
        Case {
            name: "services/same-port-protocols",
            covers: &[
                "[sig-network] Services should serve endpoints on same port and different protocols [Conformance]",
                "[sig-network] Services should be able to update service type to NodePort listening on same port number but different protocols",
                "[sig-network] Services should serve endpoints on same port and different protocol for internal traffic on Type LoadBalancer",
            ],
            run: same_port_protocols,
        },
        Case {
            name: "services/type-changes",
            covers: &[
                "[sig-network] Services should be able to change the type from ExternalName to ClusterIP [Conformance]",
                "[sig-network] Services should be able to change the type from ExternalName to NodePort [Conformance]",
                "[sig-network] Services should be able to change the type from ClusterIP to ExternalName [Conformance]",
                "[sig-network] Services should be able to change the type from NodePort to ExternalName [Conformance]",
            ],
            run: type_changes,
        },
        Case {
            name: "services/nodeport-allocation",
            covers: &[
                "[sig-network] Services should prevent NodePort collisions",
                "[sig-network] Services should check NodePort out-of-range",
                "[sig-network] Services should release NodePorts on delete",
            ],
            run: node_port_allocation,
        },
        Case {
            name: "services/reject-no-endpoints",
            covers: &[
                "[sig-network] Services should be rejected when no endpoints exist",
                "[sig-network] Services should be rejected for evicted pods (no endpoints exist)",
            ],
            run: reject_no_endpoints,
        },
        Case {
            name: "services/itp-local",
            covers: &[
                "[sig-network] Services should respect internalTrafficPolicy=Local Pod to Pod",
                "[sig-network] Services should respect internalTrafficPolicy=Local Pod (hostNetwork: true) to Pod",
                "[sig-network] Services should respect internalTrafficPolicy=Local Pod and Node, to Pod (hostNetwork: true)",
            ],
            run: itp_local,
        },
        Case {
            name: "services/terminating-fallback",
            covers: &[
                "[sig-network] Services should fallback to terminating endpoints when there are no ready endpoints with internalTrafficPolicy=Cluster",
                "[sig-network] Services should fallback to local terminating endpoints when there are no ready endpoints with internalTrafficPolicy=Local",
                "[sig-network] Services should fallback to terminating endpoints when there are no ready endpoints with externallTrafficPolicy=Cluster",
                "[sig-network] Services should fallback to local terminating endpoints when there are no ready endpoints with externalTrafficPolicy=Local",
            ],
            run: terminating_fallback,
        },
        Case {
            name: "services/health-check-terminating",
            covers: &[
                "[sig-network] Services should fail health check node port if there are only terminating endpoints",
            ],
            run: health_check_terminating,
        },
        Case {
            name: "services/unready-endpoints",
            covers: &["[sig-network] Services should create endpoints for unready pods"],
            run: unready_endpoints,
        },
        Case {
            name: "services/publish-not-ready",
            covers: &[
                "[sig-network] Services should be able to connect to terminating and unready endpoints if PublishNotReadyAddresses is true",
                "[sig-network] Services should not be able to connect to terminating and unready endpoints if PublishNotReadyAddresses is false",
            ],
            run: publish_not_ready,
        },
        Case {
            name: "services/proxy-labels",
            covers: &[
                "[sig-network] Services should implement service.kubernetes.io/service-proxy-name",
                "[sig-network] Services should implement service.kubernetes.io/headless",
            ],
            run: proxy_labels,
        },
        Case {
            name: "services/duplicate-vip",
            covers: &[
                "lb: two Services claiming one VIP:port: the older keeps it, the newer is named as skipped",
            ],
            run: duplicate_vip,
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

/// "should be updated after adding or deleting ports".
fn ports_added_removed(ctx: &Ctx<'_>) -> Result<()> {
    let name = "edit-port-test";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .named_port("portname1", 80, "svc1", "TCP")
            .build(),
    )?;
    let ip = cluster_ip(&svc);
    expect_endpoints(ctx, name, &[])?;
    let pod1 = ctx
        .c
        .create_pod(&PodSpec::web(&ctx.ns, "pod1", 0, name, &[]).with_port("svc1", 100, "TCP"))?;
    expect_endpoints(ctx, name, &[(&pod1, 100)])?;
    let exec = ctx.exec_pod("execpod", 1)?;
    let from = From::Pod(&exec);
    ctx.expect_backends(&from, Proto::Tcp, sa(&ip, 80), &["pod1"])?;
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["ports"] = json!([
            {"name": "portname1", "port": 80, "targetPort": "svc1"},
            {"name": "portname2", "port": 81, "targetPort": "svc2"},
        ])
    })?;
    let pod2 = ctx
        .c
        .create_pod(&PodSpec::web(&ctx.ns, "pod2", 1, name, &[]).with_port("svc2", 101, "TCP"))?;
    expect_endpoints(ctx, name, &[(&pod1, 100), (&pod2, 101)])?;
    ctx.expect_backends(&from, Proto::Tcp, sa(&ip, 80), &["pod1"])?;
    ctx.expect_backends(&from, Proto::Tcp, sa(&ip, 81), &["pod2"])?;
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["ports"] = json!([{"name": "portname1", "port": 80, "targetPort": "svc1"}])
    })?;
    expect_endpoints(ctx, name, &[(&pod1, 100)])?;
    ctx.expect_backends(&from, Proto::Tcp, sa(&ip, 80), &["pod1"])?;
    // The removed port is no longer the Service's: a ClusterIP on a port it does not define rejects (rule 8).
    ctx.expect_refused(&from, Proto::Tcp, sa(&ip, 81))
}

/// `verifyServeHostnameServiceUp`: from a hostNetwork pod and from a pod, exactly these pods answer.
fn verify_up(ctx: &Ctx<'_>, pods: &[Pod], ip: &str, exec: &Pod) -> Result<()> {
    let names = Ctx::names(pods);
    ctx.expect_backends(&From::Host(1), Proto::Tcp, sa(ip, 80), &names)?;
    ctx.expect_backends(&From::Pod(exec), Proto::Tcp, sa(ip, 80), &names)
}

/// `verifyServeHostnameServiceDown`: from a hostNetwork pod, nothing answers.
fn verify_down(ctx: &Ctx<'_>, ip: &str) -> Result<()> {
    ctx.expect_unreachable(&From::Host(1), Proto::Tcp, sa(ip, 80))
        .map(|_| ())
}

/// `StopServeHostnameService`: the pods, then the Service.
fn stop_serve_hostname(ctx: &Ctx<'_>, name: &str, pods: &[Pod]) -> Result<()> {
    for p in pods {
        ctx.c.delete_pod(p)?;
    }
    ctx.c.delete_service(&ctx.ns, name)
}

/// "should be able to up and down services".
fn up_down(ctx: &Ctx<'_>) -> Result<()> {
    let exec = ctx.exec_pod("verify-service-up-exec-pod", 2)?;
    let (svc1, pods1) = ctx.serve_hostname("up-down-1", 3, &[0, 1, 2], |s| s)?;
    let (svc2, pods2) = ctx.serve_hostname("up-down-2", 3, &[0, 1, 2], |s| s)?;
    let (ip1, ip2) = (cluster_ip(&svc1), cluster_ip(&svc2));
    verify_up(ctx, &pods1, &ip1, &exec)?;
    verify_up(ctx, &pods2, &ip2, &exec)?;
    stop_serve_hostname(ctx, "up-down-1", &pods1)?;
    verify_down(ctx, &ip1)?;
    verify_up(ctx, &pods2, &ip2, &exec)?;
    let (svc3, pods3) = ctx.serve_hostname("up-down-3", 3, &[0, 1, 2], |s| s)?;
    let ip3 = cluster_ip(&svc3);
    ensure!(ip2 != ip3, "service IPs conflict: {ip2}");
    verify_up(ctx, &pods2, &ip2, &exec)?;
    verify_up(ctx, &pods3, &ip3, &exec)
}

/// "should work after the service has been recreated".
fn recreate(ctx: &Ctx<'_>) -> Result<()> {
    let exec = ctx.exec_pod("verify-service-up-exec-pod", 0)?;
    let name = "service-deletion";
    let (svc, pods) = ctx.serve_hostname(name, 1, &[1], |s| s)?;
    verify_up(ctx, &pods, &cluster_ip(&svc), &exec)?;
    ctx.c.delete_service(&ctx.ns, name)?;
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .port("", 80, 9376, "TCP")
            .build(),
    )?;
    verify_up(ctx, &pods, &cluster_ip(&svc), &exec)
}

/// "should work after restarting kube-proxy [Disruptive]": node-0's agent killed (-9) and started again.
fn restart_agent(ctx: &Ctx<'_>) -> Result<()> {
    let exec = ctx.exec_pod("verify-service-up-exec-pod", 0)?;
    let (svc1, pods1) = ctx.serve_hostname("restart-proxy-1", 3, &[0, 1, 2], |s| s)?;
    let (svc2, pods2) = ctx.serve_hostname("restart-proxy-2", 3, &[0, 1, 2], |s| s)?;
    let (ip1, ip2) = (cluster_ip(&svc1), cluster_ip(&svc2));
    ensure!(ip1 != ip2, "VIPs conflict: {ip1}");
    ctx.expect_backends(
        &From::Pod(&exec),
        Proto::Tcp,
        sa(&ip1, 80),
        &Ctx::names(&pods1),
    )?;
    ctx.expect_backends(
        &From::Pod(&exec),
        Proto::Tcp,
        sa(&ip2, 80),
        &Ctx::names(&pods2),
    )?;
    ctx.c.restart_agent(0)?;
    ctx.expect_backends(
        &From::Pod(&exec),
        Proto::Tcp,
        sa(&ip1, 80),
        &Ctx::names(&pods1),
    )?;
    ctx.expect_backends(
        &From::Pod(&exec),
        Proto::Tcp,
        sa(&ip2, 80),
        &Ctx::names(&pods2),
    )?;
    ctx.expect_backends(
        &From::Host(0),
        Proto::Tcp,
        sa(&ip1, 80),
        &Ctx::names(&pods1),
    )
}

/// "should work after restarting apiserver [Disruptive]": every watch ends and its history is compacted, so each
/// agent relists; a Service created afterwards gets another address and is served.
fn restart_apiserver(ctx: &Ctx<'_>) -> Result<()> {
    let exec = ctx.exec_pod("verify-service-up-exec-pod", 1)?;
    let (svc1, pods1) = ctx.serve_hostname("restart-apiserver-1", 3, &[0, 1, 2], |s| s)?;
    let ip1 = cluster_ip(&svc1);
    verify_up(ctx, &pods1, &ip1, &exec)?;
    ctx.c.api.expire_watches();
    verify_up(ctx, &pods1, &ip1, &exec)?;
    let (svc2, pods2) = ctx.serve_hostname("restart-apiserver-2", 3, &[0, 1, 2], |s| s)?;
    let ip2 = cluster_ip(&svc2);
    ensure!(ip1 != ip2, "VIPs conflict: {ip1}");
    verify_up(ctx, &pods1, &ip1, &exec)?;
    verify_up(ctx, &pods2, &ip2, &exec)
}

/// "should be possible to connect to a service via ExternalIP when the external IP is not assigned to a node":
/// from a pod (ClusterIP and the externalIP, `CheckServiceReachability`) and from outside through node-0.
fn external_ip(ctx: &Ctx<'_>) -> Result<()> {
    let name = "externalip-test";
    let external = "203.0.113.250";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .port("http", 80, 9376, "TCP")
            .spec("externalIPs", json!([external]))
            .build(),
    )?;
    let pods = ctx.pods(name, 2, 9376, &[0, 1])?;
    let names = Ctx::names(&pods);
    let exec = ctx.exec_pod("execpod", 2)?;
    ctx.expect_backends(
        &From::Pod(&exec),
        Proto::Tcp,
        sa(&cluster_ip(&svc), 80),
        &names,
    )?;
    ctx.expect_backends(&From::Pod(&exec), Proto::Tcp, sa(external, 80), &names)?;
    ctx.expect_backends(&From::External, Proto::Tcp, sa(external, 80), &names)
}

/// Three upstream tests of one port number on TCP and UDP.
fn same_port_protocols(ctx: &Ctx<'_>) -> Result<()> {
    // "should serve endpoints on same port and different protocols": both, then TCP only, then UDP only.
    let name = "multiprotocol-test";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .port("tcp-port", 80, 80, "TCP")
            .port("udp-port", 80, 80, "UDP")
            .build(),
    )?;
    let ip = cluster_ip(&svc);
    ctx.c.create_pod(
        &PodSpec::web(&ctx.ns, "pod1", 0, name, &[])
            .with_port("tcp-port", 80, "TCP")
            .with_port("udp-port", 80, "UDP"),
    )?;
    let exec = ctx.exec_pod("execpod", 1)?;
    let from = From::Pod(&exec);
    ctx.expect_backends(&from, Proto::Tcp, sa(&ip, 80), &["pod1"])?;
    ctx.expect_backends(&from, Proto::Udp, sa(&ip, 80), &["pod1"])?;
    let tcp = json!([{"name": "tcp-port", "port": 80, "targetPort": 80, "protocol": "TCP"}]);
    let udp = json!([{"name": "udp-port", "port": 80, "targetPort": 80, "protocol": "UDP"}]);
    ctx.c
        .update_service(&ctx.ns, name, |s| s["spec"]["ports"] = tcp)?;
    ctx.expect_backends(&from, Proto::Tcp, sa(&ip, 80), &["pod1"])?;
    ctx.expect_unreachable(&from, Proto::Udp, sa(&ip, 80))?;
    ctx.c
        .update_service(&ctx.ns, name, |s| s["spec"]["ports"] = udp)?;
    ctx.expect_backends(&from, Proto::Udp, sa(&ip, 80), &["pod1"])?;
    ctx.expect_unreachable(&from, Proto::Tcp, sa(&ip, 80))?;

    // "should be able to update service type to NodePort listening on same port number but different protocols".
    let name = "nodeport-update-service";
    ctx.c.create_service(
        service(&ctx.ns, name, name)
            .port("", 80, 9376, "TCP")
            .build(),
    )?;
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["type"] = json!("NodePort");
        s["spec"]["ports"] =
            json!([{"name": "tcp-port", "port": 80, "protocol": "TCP", "targetPort": 9376}]);
    })?;
    let pods = ctx.pods(name, 2, 9376, &[0, 1])?;
    let names = Ctx::names(&pods);
    let svc = ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["ports"] = json!([
            {"name": "tcp-port", "port": 80, "protocol": "TCP", "targetPort": 9376},
            {"name": "udp-port", "port": 80, "protocol": "UDP", "targetPort": 9376},
        ]);
    })?;
    let (np_tcp, np_udp) = (node_port(&svc, 0), node_port(&svc, 1));
    ensure!(np_tcp != 0 && np_udp != 0, "a port got no nodePort: {svc}");
    let ip = cluster_ip(&svc);
    for proto in [Proto::Tcp, Proto::Udp] {
        ctx.expect_backends(&from, proto, sa(&ip, 80), &names)?;
        let np = if proto == Proto::Tcp { np_tcp } else { np_udp };
        for node in &ctx.c.nodes {
            ctx.expect_backends(&from, proto, sa(&node.ip().to_string(), np), &names)?;
        }
    }

    // "should serve endpoints on same port and different protocol for internal traffic on Type LoadBalancer".
    let name = "multiprotocol-lb-test";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .type_("LoadBalancer")
            .named_port("portname1", 80, "svc1", "TCP")
            .named_port("portname2", 80, "svc2", "UDP")
            .build(),
    )?;
    ctx.c.create_pod(
        &PodSpec::web(&ctx.ns, "lb-pod1", 2, name, &[])
            .with_port("svc1", 100, "TCP")
            .with_port("svc2", 100, "UDP"),
    )?;
    let ip = cluster_ip(&svc);
    ctx.expect_backends(&from, Proto::Tcp, sa(&ip, 80), &["lb-pod1"])?;
    ctx.expect_backends(&from, Proto::Udp, sa(&ip, 80), &["lb-pod1"])
}

/// The four conformance type changes through ExternalName.
fn type_changes(ctx: &Ctx<'_>) -> Result<()> {
    let exec = ctx.exec_pod("execpod", 1)?;
    let from = From::Pod(&exec);
    let external_name = |name: &str| {
        service(&ctx.ns, name, name)
            .type_("ExternalName")
            .spec("externalName", json!("foo.example.com"))
            .build()
    };
    // "should be able to change the type from ExternalName to ClusterIP" and "... to NodePort".
    for (name, ty) in [
        ("externalname-to-clusterip", "ClusterIP"),
        ("externalname-to-nodeport", "NodePort"),
    ] {
        ctx.c.create_service(external_name(name))?;
        let svc = ctx.c.update_service(&ctx.ns, name, |s| {
            s["spec"]["type"] = json!(ty);
            s["spec"]["externalName"] = json!("");
            s["spec"]["ports"] =
                json!([{"port": 80, "name": "http", "protocol": "TCP", "targetPort": 9376}]);
        })?;
        let pods = ctx.pods(name, 2, 9376, &[0, 2])?;
        let names = Ctx::names(&pods);
        ctx.expect_backends(&from, Proto::Tcp, sa(&cluster_ip(&svc), 80), &names)?;
        if ty == "NodePort" {
            for node in &ctx.c.nodes {
                ctx.expect_backends(
                    &from,
                    Proto::Tcp,
                    sa(&node.ip().to_string(), node_port(&svc, 0)),
                    &names,
                )?;
            }
        }
    }
    // "should be able to change the type from ClusterIP to ExternalName" and "from NodePort to ExternalName": the
    // ClusterIP is cleared (and the nodePort released), so neither answers any more.
    let (_external, _) = ctx.serve_hostname("externalsvc", 2, &[0, 1], |s| s)?;
    for (name, ty) in [
        ("clusterip-service", "ClusterIP"),
        ("nodeport-service", "NodePort"),
    ] {
        let svc = ctx.c.create_service(
            service(&ctx.ns, name, name)
                .type_(ty)
                .port("", 80, 9376, "TCP")
                .build(),
        )?;
        let pods = ctx.pods(name, 1, 9376, &[2])?;
        let (ip, np) = (cluster_ip(&svc), node_port(&svc, 0));
        ctx.expect_backends(&from, Proto::Tcp, sa(&ip, 80), &Ctx::names(&pods))?;
        let svc = ctx.c.update_service(&ctx.ns, name, |s| {
            s["spec"]["type"] = json!("ExternalName");
            s["spec"]["externalName"] = json!(format!("externalsvc.{}.svc.cluster.local", ctx.ns));
        })?;
        ensure!(
            cluster_ip(&svc).is_empty(),
            "Spec.ClusterIP was not cleared: {svc}"
        );
        ensure!(
            node_port(&svc, 0) == 0,
            "the nodePort was not released: {svc}"
        );
        ctx.expect_unreachable(&from, Proto::Tcp, sa(&ip, 80))?;
        if ty == "NodePort" {
            ctx.expect_unreachable(
                &From::External,
                Proto::Tcp,
                sa(&ctx.c.nodes[0].ip().to_string(), np),
            )?;
        }
    }
    Ok(())
}

/// The NodePort allocator's behaviour upstream checks, and that a released nodePort stops answering.
fn node_port_allocation(ctx: &Ctx<'_>) -> Result<()> {
    let nodeport = |name: &str, np: Option<u16>| {
        let mut b = service(&ctx.ns, name, name).type_("NodePort");
        b = match np {
            Some(p) => b.spec(
                "ports",
                json!([{"port": 80, "targetPort": 9376, "protocol": "TCP", "nodePort": p}]),
            ),
            None => b.port("", 80, 9376, "TCP"),
        };
        b.build()
    };
    // "should prevent NodePort collisions".
    let svc1 = ctx
        .c
        .create_service(nodeport("nodeport-collision-1", None))?;
    let np = node_port(&svc1, 0);
    ensure!(np != 0, "no nodePort: {svc1}");
    let err = ctx
        .c
        .create_service(nodeport("nodeport-collision-2", Some(np)))
        .expect_err("a conflicting nodePort must be refused");
    ensure!(
        format!("{err:#}").contains(&np.to_string())
            && format!("{err:#}").contains("port is already allocated"),
        "unexpected error: {err:#}"
    );
    ctx.c.delete_service(&ctx.ns, "nodeport-collision-1")?;
    ctx.c
        .create_service(nodeport("nodeport-collision-2", Some(np)))?;
    // "should check NodePort out-of-range".
    let svc = ctx
        .c
        .create_service(nodeport("nodeport-range-test", None))?;
    ensure!(
        (30000..=32767).contains(&node_port(&svc, 0)),
        "out-of-range port: {svc}"
    );
    let err = ctx
        .c
        .update_service(&ctx.ns, "nodeport-range-test", |s| {
            s["spec"]["ports"][0]["nodePort"] = json!(1234)
        })
        .expect_err("an out-of-range nodePort must be refused");
    ensure!(
        format!("{err:#}").contains("1234")
            && format!("{err:#}").contains("port is not in the valid range"),
        "{err:#}"
    );
    ctx.c.delete_service(&ctx.ns, "nodeport-range-test")?;
    let err = ctx
        .c
        .create_service(nodeport("nodeport-range-test", Some(1234)))
        .expect_err("an out-of-range nodePort must be refused");
    ensure!(
        format!("{err:#}").contains("port is not in the valid range"),
        "{err:#}"
    );
    // "should release NodePorts on delete": the port stops answering, and can be asked for again.
    let svc = ctx.c.create_service(nodeport("nodeport-reuse", None))?;
    let np = node_port(&svc, 0);
    let pods = ctx.pods("nodeport-reuse", 1, 9376, &[1])?;
    let to = sa(&ctx.c.nodes[0].ip().to_string(), np);
    ctx.expect_backends(&From::External, Proto::Tcp, to, &Ctx::names(&pods))?;
    ctx.c.delete_service(&ctx.ns, "nodeport-reuse")?;
    ctx.expect_unreachable(&From::External, Proto::Tcp, to)?;
    ctx.c.create_service(nodeport("nodeport-reuse", Some(np)))?;
    Ok(())
}

/// "should be rejected when no endpoints exist" and "should be rejected for evicted pods (no endpoints exist)".
fn reject_no_endpoints(ctx: &Ctx<'_>) -> Result<()> {
    let svc = ctx.c.create_service(
        service(&ctx.ns, "no-pods", "no-pods")
            .port("", 80, 80, "TCP")
            .build(),
    )?;
    let exec = ctx.exec_pod("execpod-noendpoints", 0)?;
    ctx.expect_refused(&From::Pod(&exec), Proto::Tcp, sa(&cluster_ip(&svc), 80))?;
    // An evicted pod (phase Failed) matching a publishNotReadyAddresses Service is no endpoint.
    let svc = ctx.c.create_service(
        service(&ctx.ns, "evicted-pods", "evicted-pods")
            .port("", 80, 80, "TCP")
            .spec("publishNotReadyAddresses", json!(true))
            .build(),
    )?;
    let evicted = ctx.c.create_pod(&PodSpec::web(
        &ctx.ns,
        "evicted-pod",
        1,
        "evicted-pods",
        &[80],
    ))?;
    ctx.c.api.update(
        lb_tests::apiserver::Resource::Pods,
        &ctx.ns,
        &evicted.name,
        |p| {
            p["status"]["phase"] = json!("Failed");
            p["status"]["reason"] = json!("Evicted");
        },
    )?;
    ensure!(
        ctx.endpoint_ports("evicted-pods").is_empty(),
        "the evicted pod is an endpoint"
    );
    let slices = ctx.c.slices(&ctx.ns, "evicted-pods");
    ensure!(
        slices.len() == 1,
        "expected exactly 1 EndpointSlice, got {}",
        slices.len()
    );
    ctx.expect_refused(&From::Pod(&exec), Proto::Tcp, sa(&cluster_ip(&svc), 80))
}

/// The three `internalTrafficPolicy=Local` tests: only a client on the endpoint's node reaches it.
fn itp_local(ctx: &Ctx<'_>) -> Result<()> {
    let local = |name: &str, port: u16, target: u16| {
        service(&ctx.ns, name, name)
            .port("http", port, target, "TCP")
            .spec("internalTrafficPolicy", json!("Local"))
            .build()
    };
    let pause0 = ctx.exec_pod("pause-pod-0", 0)?;
    let pause1 = ctx.exec_pod("pause-pod-1", 1)?;
    // "Pod to Pod" and "Pod (hostNetwork: true) to Pod".
    let svc = ctx.c.create_service(local("svc-itp", 80, 80))?;
    ctx.c.create_pod(&PodSpec::web(
        &ctx.ns,
        "echo-hostname-0",
        0,
        "svc-itp",
        &[80],
    ))?;
    let to = sa(&cluster_ip(&svc), 80);
    for (near, far) in [
        (From::Pod(&pause0), From::Pod(&pause1)),
        (From::Host(0), From::Host(1)),
    ] {
        for _ in 0..5 {
            ctx.expect_backends(&near, Proto::Tcp, to, &["echo-hostname-0"])?;
            ctx.assert_unreachable_now(&far, Proto::Tcp, to, 1)?;
        }
    }
    // "Pod and Node, to Pod (hostNetwork: true)": the endpoint is node-0's own address.
    let svc = ctx.c.create_service(local("svc-itp-host", 80, 10180))?;
    ctx.c.create_pod(
        &PodSpec::web(&ctx.ns, "echo-hostname-host", 0, "svc-itp-host", &[10180]).host_network(),
    )?;
    let to = sa(&cluster_ip(&svc), 80);
    for (near, far) in [
        (From::Pod(&pause0), From::Pod(&pause1)),
        (From::Host(0), From::Host(1)),
    ] {
        for _ in 0..5 {
            ctx.expect_backends(&near, Proto::Tcp, to, &["echo-hostname-host"])?;
            ctx.assert_unreachable_now(&far, Proto::Tcp, to, 1)?;
        }
    }
    Ok(())
}

/// The four "should fallback to (local) terminating endpoints when there are no ready endpoints" tests: the only
/// endpoint is terminating (still serving, as a pod with a long grace period is).
fn terminating_fallback(ctx: &Ctx<'_>) -> Result<()> {
    let pause0 = ctx.exec_pod("pause-pod-0", 0)?;
    let pause1 = ctx.exec_pod("pause-pod-1", 1)?;
    let (p0, p1) = (From::Pod(&pause0), From::Pod(&pause1));
    let (n0, n1) = (
        ctx.c.nodes[0].ip().to_string(),
        ctx.c.nodes[1].ip().to_string(),
    );
    for (name, ty, itp, etp) in [
        ("svc-itp-cluster", "ClusterIP", "Cluster", None),
        ("svc-itp-local", "ClusterIP", "Local", None),
        ("svc-etp-cluster", "NodePort", "Cluster", Some("Cluster")),
        ("svc-etp-local", "NodePort", "Cluster", Some("Local")),
    ] {
        let mut b = service(&ctx.ns, name, name)
            .type_(ty)
            .port("http", 80, 80, "TCP")
            .spec("internalTrafficPolicy", json!(itp));
        if let Some(etp) = etp {
            b = b.spec("externalTrafficPolicy", json!(etp));
        }
        let svc = ctx.c.create_service(b.build())?;
        let server = format!("{name}-0");
        let web = ctx
            .c
            .create_pod(&PodSpec::web(&ctx.ns, &server, 0, name, &[80]))?;
        let (vip, np) = (sa(&cluster_ip(&svc), 80), node_port(&svc, 0));
        ctx.expect_backends(&p0, Proto::Tcp, vip, &[&server])?;
        ctx.c.terminate_pod(&web, true)?;
        let w = &[server.as_str()];
        for i in 0..5 {
            match (itp, etp) {
                ("Cluster", None) => {
                    ctx.expect_backends(&p0, Proto::Tcp, vip, w)?;
                    ctx.expect_backends(&p1, Proto::Tcp, vip, w)?;
                }
                ("Local", None) => {
                    ctx.expect_backends(&p0, Proto::Tcp, vip, w)?;
                    ctx.assert_unreachable_now(&p1, Proto::Tcp, vip, 1)?;
                }
                (_, Some("Cluster")) => {
                    ctx.expect_backends(&p0, Proto::Tcp, sa(&n0, np), w)?;
                    ctx.expect_backends(&p1, Proto::Tcp, sa(&n0, np), w)?;
                }
                _ => {
                    // node-1 has no endpoint: external traffic to it drops. (pause1 -> node-1 is not checked
                    // upstream either: kube-proxy treats it as neither internal nor external.)
                    if i == 0 {
                        ctx.expect_unreachable(&p0, Proto::Tcp, sa(&n1, np))?;
                    } else {
                        ctx.assert_unreachable_now(&p0, Proto::Tcp, sa(&n1, np), 1)?;
                    }
                    ctx.expect_backends(&p0, Proto::Tcp, sa(&n0, np), w)?;
                    ctx.expect_backends(&p1, Proto::Tcp, sa(&n0, np), w)?;
                }
            }
        }
    }
    Ok(())
}

/// "should fail health check node port if there are only terminating endpoints": 200 with a ready local endpoint,
/// 503 once it only terminates, while its NodePort still serves it.
fn health_check_terminating(ctx: &Ctx<'_>) -> Result<()> {
    let name = "svc-proxy-terminating";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .type_("LoadBalancer")
            .port("http", 80, 80, "TCP")
            .spec("externalTrafficPolicy", json!("Local"))
            .build(),
    )?;
    let web = ctx
        .c
        .create_pod(&PodSpec::web(&ctx.ns, "echo-hostname-0", 0, name, &[80]))?;
    let pause = ctx.exec_pod("pause-pod-0", 0)?;
    let from = From::Pod(&pause);
    let node = ctx.c.nodes[0].ip().to_string();
    let hc = sa(&node, lb_tests::cluster::health_check_node_port(&svc));
    ensure!(hc.port() != 0, "no healthCheckNodePort: {svc}");
    expect_health(ctx, &from, hc, 200)?;
    ctx.c.terminate_pod(&web, true)?;
    expect_health(ctx, &from, hc, 503)?;
    ctx.expect_backends(
        &from,
        Proto::Tcp,
        sa(&node, node_port(&svc, 0)),
        &["echo-hostname-0"],
    )
}

/// Polls the health check nodePort until it answers `code`.
pub fn expect_health(ctx: &Ctx<'_>, from: &From<'_>, hc: SocketAddr, code: u16) -> Result<()> {
    eventually(&format!("{hc}/healthz answers {code}"), LAG, || {
        match ctx.http(from, hc, "/healthz")? {
            Some((c, _)) if c == code => Ok(()),
            other => bail!("got {other:?}"),
        }
    })
}

/// "should create endpoints for unready pods": a never-ready pod of a publishNotReadyAddresses Service is
/// reachable; once it terminates, only while the Service tolerates unready endpoints.
fn unready_endpoints(ctx: &Ctx<'_>) -> Result<()> {
    let name = "tolerate-unready";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .port("http", 80, 80, "TCP")
            .spec("publishNotReadyAddresses", json!(true))
            .build(),
    )?;
    let pod = ctx.c.create_pod(
        &PodSpec::web(&ctx.ns, "slow-terminating-unready-pod", 1, name, &[80]).unready(),
    )?;
    let exec = ctx.exec_pod("execpod", 0)?;
    let from = From::Pod(&exec);
    let to = sa(&cluster_ip(&svc), 80);
    ctx.expect_backends(&from, Proto::Tcp, to, &["slow-terminating-unready-pod"])?;
    // Scaling to zero: the pod terminates (its preStop sleep keeps it serving).
    ctx.c.terminate_pod(&pod, false)?;
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["publishNotReadyAddresses"] = json!(false)
    })?;
    ctx.expect_unreachable(&from, Proto::Tcp, to)?;
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["publishNotReadyAddresses"] = json!(true)
    })?;
    ctx.expect_backends(&from, Proto::Tcp, to, &["slow-terminating-unready-pod"])?;
    ctx.c.delete_pod(&pod)
}

/// "should be able to connect to terminating and unready endpoints if PublishNotReadyAddresses is true" and the
/// same "... is false" test: a deleted, unready pod on node-0 reached from a pod on node-1 through the ClusterIP
/// and both NodePorts, or not at all.
fn publish_not_ready(ctx: &Ctx<'_>) -> Result<()> {
    let pause = ctx.exec_pod("pause-pod-1", 1)?;
    let from = From::Pod(&pause);
    for publish in [true, false] {
        let name = if publish {
            "svc-tolerate-unready"
        } else {
            "svc-not-tolerate-unready"
        };
        let svc = ctx.c.create_service(
            service(&ctx.ns, name, name)
                .type_("NodePort")
                .port("http", 80, 80, "TCP")
                .spec("publishNotReadyAddresses", json!(publish))
                .build(),
        )?;
        let server = format!("{name}-webserver");
        let web = ctx
            .c
            .create_pod(&PodSpec::web(&ctx.ns, &server, 0, name, &[80]))?;
        let np = node_port(&svc, 0);
        let targets = [
            sa(&cluster_ip(&svc), 80),
            sa(&ctx.c.nodes[0].ip().to_string(), np),
            sa(&ctx.c.nodes[1].ip().to_string(), np),
        ];
        ctx.expect_backends(&from, Proto::Tcp, targets[0], &[&server])?;
        // Deleted with a long grace period; its readiness probe fails while it shuts down.
        ctx.c.terminate_pod(&web, false)?;
        if publish {
            for _ in 0..5 {
                for to in targets {
                    ctx.expect_backends(&from, Proto::Tcp, to, &[&server])?;
                }
            }
        } else {
            for to in &targets[1..] {
                ctx.expect_unreachable(&from, Proto::Tcp, *to)?;
            }
            for _ in 0..5 {
                for to in targets {
                    ctx.assert_unreachable_now(&from, Proto::Tcp, to, 1)?;
                }
            }
        }
    }
    Ok(())
}

/// "should implement service.kubernetes.io/service-proxy-name" and "... /headless": a Service labelled so is not
/// proxied, and toggling the label on another one takes it down and back up.
fn proxy_labels(ctx: &Ctx<'_>) -> Result<()> {
    let exec = ctx.exec_pod("verify-service-up-exec-pod", 0)?;
    for (label, value, prefix) in [
        (
            "service.kubernetes.io/service-proxy-name",
            "foo-bar",
            "service-proxy",
        ),
        ("service.kubernetes.io/headless", "", "service-headless"),
    ] {
        let disabled = format!("{prefix}-disabled");
        let toggled = format!("{prefix}-toggled");
        let (svc_d, _) = ctx.serve_hostname(&disabled, 3, &[0, 1, 2], |s| s.label(label, value))?;
        let (svc_t, pods_t) = ctx.serve_hostname(&toggled, 3, &[0, 1, 2], |s| s)?;
        let (ip_d, ip_t) = (cluster_ip(&svc_d), cluster_ip(&svc_t));
        verify_up(ctx, &pods_t, &ip_t, &exec)?;
        verify_down(ctx, &ip_d)?;
        ctx.c.update_service(&ctx.ns, &toggled, |s| {
            s["metadata"]["labels"] = json!({label: value})
        })?;
        verify_down(ctx, &ip_t)?;
        ctx.c.update_service(&ctx.ns, &toggled, |s| {
            if let Some(m) = s["metadata"].as_object_mut() {
                m.remove("labels");
            }
        })?;
        verify_up(ctx, &pods_t, &ip_t, &exec)?;
        verify_down(ctx, &ip_d)?;
    }
    Ok(())
}

/// Two Services claiming one VIP, port and protocol (an externalIP: the API server does not refuse that, and files
/// can hold anything): the older one (creationTimestamp, then namespace/name) keeps it, and every agent names the
/// newer one as skipped (rule 1 of the Service semantics).
fn duplicate_vip(ctx: &Ctx<'_>) -> Result<()> {
    let vip = "203.0.113.240";
    let mk = |name: &str| {
        service(&ctx.ns, name, name)
            .port("http", 80, 9376, "TCP")
            .spec("externalIPs", json!([vip]))
            .build()
    };
    // The older one sorts last by name: a name order would pick the newer.
    ctx.c.create_service(mk("z-older"))?;
    ctx.pods("z-older", 1, 9376, &[1])?;
    // creationTimestamp has a resolution of one second.
    std::thread::sleep(Duration::from_millis(1100));
    ctx.c.create_service(mk("a-newer"))?;
    ctx.pods("a-newer", 1, 9376, &[2])?;
    let exec = ctx.exec_pod("execpod", 0)?;
    ctx.expect_backends(&From::Pod(&exec), Proto::Tcp, sa(vip, 80), &["z-older-0"])?;
    ctx.expect_backends(&From::External, Proto::Tcp, sa(vip, 80), &["z-older-0"])?;
    let skipped = format!("{}/a-newer", ctx.ns);
    let kept = format!("{}/z-older", ctx.ns);
    for i in 0..ctx.c.nodes.len() {
        eventually(
            &format!("node-{i}'s agent names {skipped} as skipped"),
            LAG,
            || {
                let log = ctx.c.agent_log(i);
                let line = log
                    .lines()
                    .rev()
                    .find(|l| {
                        l.contains("skipped") && l.contains(vip) && l.contains("already served")
                    })
                    .unwrap_or_default();
                ensure!(
                    line.contains(&format!("object=Service {skipped}")) && line.contains(&kept),
                    "no warning naming {skipped} as the skipped one (last: {line:?})"
                );
                Ok(())
            },
        )?;
    }
    Ok(())
}
