//! `test/e2e/network/loadbalancer.go` (`[sig-network] LoadBalancers`, `LoadBalancers ESIPP`), the data-plane parts:
//! the cloud's pass-through load balancer delivers to node-0 (it does not health-check; cases that would need it to
//! pick another node check the health-check nodePort instead, see docs/e2e.md).

use std::net::SocketAddr;

use anyhow::{Result, bail, ensure};
use lb_tests::cluster::{
    CLIENT_IP, Pod, PodSpec, cluster_ip, health_check_node_port, ingress_ip, node_port, service,
};
use serde_json::{Value, json};

use crate::Case;
use crate::services::expect_health;
use crate::support::{Ctx, From, LAG, Proto, check_affinity, eventually, sa};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "loadbalancer/change-type-and-ports",
            covers: &[
                "[sig-network] LoadBalancers should be able to change the type and ports of a TCP service [Slow]",
                "[sig-network] LoadBalancers should be able to change the type and ports of a UDP service [Slow]",
            ],
            run: change_type_and_ports,
        },
        Case {
            name: "loadbalancer/without-nodeport",
            covers: &[
                "[sig-network] LoadBalancers should be able to create LoadBalancer Service without NodePort and change it [Slow]",
            ],
            run: without_node_port,
        },
        Case {
            name: "loadbalancer/affinity",
            covers: &[
                "[sig-network] LoadBalancers should have session affinity work for LoadBalancer service with ESIPP on [Slow] [LinuxOnly]",
                "[sig-network] LoadBalancers should be able to switch session affinity for LoadBalancer service with ESIPP on [Slow] [LinuxOnly]",
                "[sig-network] LoadBalancers should have session affinity work for LoadBalancer service with ESIPP off [Slow] [LinuxOnly]",
                "[sig-network] LoadBalancers should be able to switch session affinity for LoadBalancer service with ESIPP off [Slow] [LinuxOnly]",
            ],
            run: affinity,
        },
        Case {
            name: "loadbalancer/affinity-per-service-port",
            covers: &[
                "lb: one ClientIP affinity per Service port: ClusterIP, NodePort and LoadBalancer IP give a client one backend (pods and the outside client); under externalTrafficPolicy Local a remote backend remembered through the ClusterIP is not followed through the NodePort",
            ],
            run: affinity_per_service_port,
        },
        Case {
            name: "loadbalancer/esipp",
            covers: &[
                "[sig-network] LoadBalancers ESIPP [Slow] should work for type=LoadBalancer",
                "[sig-network] LoadBalancers ESIPP [Slow] should work for type=NodePort",
                "[sig-network] LoadBalancers ESIPP [Slow] should only target nodes with endpoints",
                "[sig-network] LoadBalancers ESIPP [Slow] should work from pods",
            ],
            run: esipp,
        },
        Case {
            name: "loadbalancer/esipp-policy-updates",
            covers: &[
                "[sig-network] LoadBalancers ESIPP [Slow] should handle updates to ExternalTrafficPolicy field",
            ],
            run: esipp_updates,
        },
        Case {
            name: "loadbalancer/source-ranges",
            covers: &[
                "[sig-network] LoadBalancers should only allow access from service loadbalancer source ranges [Slow]",
            ],
            run: source_ranges,
        },
    ]
}

/// The Service as stored once the cloud controller gave it an address.
fn with_ingress(ctx: &Ctx<'_>, name: &str) -> Result<(Value, String)> {
    let svc = ctx.c.service(&ctx.ns, name)?;
    match ingress_ip(&svc) {
        Some(ip) => Ok((svc, ip)),
        None => bail!("{name} has no load balancer address: {svc}"),
    }
}

/// "should be able to change the type and ports of a TCP service" and its UDP twin: ClusterIP, NodePort,
/// LoadBalancer, a new nodePort, a new port, no pods (TCP: not reachable; UDP: ICMP reject), a pod again, back to
/// ClusterIP (the load balancer closes).
fn change_type_and_ports(ctx: &Ctx<'_>) -> Result<()> {
    let exec = ctx.exec_pod("execpod", 1)?;
    for proto in [Proto::Tcp, Proto::Udp] {
        let name = format!("mutability-test-{}", proto.to_string().to_lowercase());
        let name = name.as_str();
        let svc = ctx.c.create_service(
            service(&ctx.ns, name, name)
                .port("", 80, 80, &proto.to_string())
                .build(),
        )?;
        let mut pod = run_pod(ctx, name, proto, 0)?;
        let from = From::Pod(&exec);
        ctx.expect_backends(&from, proto, sa(&cluster_ip(&svc), 80), &[&pod.name])?;
        let svc = ctx
            .c
            .update_service(&ctx.ns, name, |s| s["spec"]["type"] = json!("NodePort"))?;
        let np = node_port(&svc, 0);
        ensure!(np != 0, "no nodePort: {svc}");
        ctx.expect_backends(
            &from,
            proto,
            sa(&ctx.c.nodes[1].ip().to_string(), np),
            &[&pod.name],
        )?;
        ctx.c
            .update_service(&ctx.ns, name, |s| s["spec"]["type"] = json!("LoadBalancer"))?;
        let (svc, lb) = with_ingress(ctx, name)?;
        ensure!(
            node_port(&svc, 0) == np,
            "the nodePort changed ({np} -> {})",
            node_port(&svc, 0)
        );
        ctx.expect_backends(&From::External, proto, sa(&lb, 80), &[&pod.name])?;
        // A new nodePort: the load balancer keeps its address and keeps serving.
        let svc = ctx.c.update_service(&ctx.ns, name, |s| {
            s["spec"]["ports"][0]["nodePort"] = json!(np + 1)
        })?;
        ensure!(
            node_port(&svc, 0) == np + 1,
            "the nodePort did not change: {svc}"
        );
        ensure!(
            ingress_ip(&svc).as_deref() == Some(lb.as_str()),
            "the load balancer address changed: {svc}"
        );
        ctx.expect_backends(&From::External, proto, sa(&lb, 80), &[&pod.name])?;
        ctx.expect_backends(
            &from,
            proto,
            sa(&ctx.c.nodes[2].ip().to_string(), np + 1),
            &[&pod.name],
        )?;
        // A new service port.
        let svc = ctx
            .c
            .update_service(&ctx.ns, name, |s| s["spec"]["ports"][0]["port"] = json!(81))?;
        ensure!(
            node_port(&svc, 0) == np + 1,
            "the nodePort changed with the port: {svc}"
        );
        ctx.expect_backends(&From::External, proto, sa(&lb, 81), &[&pod.name])?;
        // Scaled to 0: no answer (UDP: an ICMP reject, "looking for ICMP REJECT").
        ctx.c.delete_pod(&pod)?;
        match proto {
            Proto::Tcp => ctx
                .expect_unreachable(&From::External, proto, sa(&lb, 81))
                .map(|_| ())?,
            Proto::Udp => ctx.expect_refused(&From::External, proto, sa(&lb, 81))?,
        }
        pod = run_pod(ctx, &format!("{name}-b"), proto, 0)?;
        relabel(ctx, &pod, name)?;
        ctx.expect_backends(&From::External, proto, sa(&lb, 81), &[&pod.name])?;
        // Back to ClusterIP: the nodePort is cleared and the load balancer closes.
        let svc = ctx
            .c
            .update_service(&ctx.ns, name, |s| s["spec"]["type"] = json!("ClusterIP"))?;
        ensure!(
            node_port(&svc, 0) == 0,
            "Spec.Ports[0].NodePort was not cleared: {svc}"
        );
        ensure!(
            ingress_ip(&svc).is_none(),
            "the load balancer was not destroyed: {svc}"
        );
        ctx.expect_unreachable(&From::External, proto, sa(&lb, 81))?;
    }
    Ok(())
}

/// A pod serving port 80 of `proto` with label `app=<app>` on `node` (the jig's `Run`).
fn run_pod(ctx: &Ctx<'_>, app: &str, proto: Proto, node: usize) -> Result<Pod> {
    ctx.c.create_pod(
        &PodSpec::web(&ctx.ns, &format!("{app}-pod"), node, app, &[]).with_port(
            "",
            80,
            &proto.to_string(),
        ),
    )
}

/// Gives `pod` the label `app=<app>` (a pod made under another name joins the Service).
fn relabel(ctx: &Ctx<'_>, pod: &Pod, app: &str) -> Result<()> {
    ctx.c
        .api
        .update(
            lb_tests::apiserver::Resource::Pods,
            &pod.namespace,
            &pod.name,
            |p| p["metadata"]["labels"]["app"] = json!(app),
        )
        .map(|_| ())
}

/// "should be able to create LoadBalancer Service without NodePort and change it".
fn without_node_port(ctx: &Ctx<'_>) -> Result<()> {
    let name = "reallocate-nodeport-test";
    ctx.c
        .create_service(service(&ctx.ns, name, name).port("", 80, 80, "TCP").build())?;
    let pod = run_pod(ctx, name, Proto::Tcp, 0)?;
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["type"] = json!("LoadBalancer");
        s["spec"]["allocateLoadBalancerNodePorts"] = json!(false);
    })?;
    let (svc, lb) = with_ingress(ctx, name)?;
    ensure!(node_port(&svc, 0) == 0, "a nodePort was allocated: {svc}");
    ctx.expect_backends(&From::External, Proto::Tcp, sa(&lb, 80), &[&pod.name])?;
    let svc = ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["allocateLoadBalancerNodePorts"] = json!(true)
    })?;
    let np = node_port(&svc, 0);
    ensure!(np != 0, "no nodePort allocated: {svc}");
    ensure!(
        ingress_ip(&svc).as_deref() == Some(lb.as_str()),
        "the load balancer address changed"
    );
    ctx.expect_backends(&From::External, Proto::Tcp, sa(&lb, 80), &[&pod.name])?;
    ctx.expect_backends(
        &From::External,
        Proto::Tcp,
        sa(&ctx.c.nodes[0].ip().to_string(), np),
        &[&pod.name],
    )
}

/// `execAffinityTestForLBServiceWithOptionalTransition` from outside, ESIPP on (Local: the pods on node-0, where the
/// load balancer delivers) and off.
fn affinity(ctx: &Ctx<'_>) -> Result<()> {
    for (name, etp, nodes) in [
        ("affinity-lb-esipp", "Local", &[0usize, 0, 0][..]),
        ("affinity-lb", "Cluster", &[0, 1, 2][..]),
    ] {
        ctx.serve_hostname(name, 3, nodes, |s| {
            s.type_("LoadBalancer")
                .spec("externalTrafficPolicy", json!(etp))
                .spec("sessionAffinity", json!("ClientIP"))
        })?;
        let (_, lb) = with_ingress(ctx, name)?;
        let to = sa(&lb, 80);
        check_affinity(ctx, &From::External, to, true)?;
        ctx.c.update_service(&ctx.ns, name, |s| {
            s["spec"]["sessionAffinity"] = json!("None")
        })?;
        check_affinity(ctx, &From::External, to, false)?;
        ctx.c.update_service(&ctx.ns, name, |s| {
            s["spec"]["sessionAffinity"] = json!("ClientIP")
        })?;
        check_affinity(ctx, &From::External, to, true)?;
    }
    Ok(())
}

/// The one backend that answers 15 connections from `from` to `to` (affinity holds), waiting for the data plane.
fn sticky_backend(ctx: &Ctx<'_>, from: &From<'_>, to: SocketAddr) -> Result<String> {
    eventually(&format!("one backend for {to} from {from:?}"), LAG, || {
        let hosts = ctx.hosts(from, Proto::Tcp, to, 15)?;
        match hosts.keys().collect::<Vec<_>>()[..] {
            [one] => Ok(one.clone()),
            _ => bail!("answers: {hosts:?}"),
        }
    })
}

/// kube-proxy keeps one affinity per Service port, whatever address of it a client uses (one `recent` list per
/// endpoint chain, checked by every chain holding that endpoint), and follows it only to an endpoint the chain in
/// use may send to. Six pods over the three nodes, so that a per-address affinity would agree by chance for one
/// client in 36 (three clients here: 1 in 46656).
fn affinity_per_service_port(ctx: &Ctx<'_>) -> Result<()> {
    let name = "affinity-every-address";
    let (svc, _pods) = ctx.serve_hostname(name, 6, &[0, 1, 2], |s| {
        s.type_("LoadBalancer")
            .spec("sessionAffinity", json!("ClientIP"))
    })?;
    let (_, lb) = with_ingress(ctx, name)?;
    let cluster = sa(&cluster_ip(&svc), 80);
    let node_port_0 = sa(&ctx.c.nodes[0].ip().to_string(), node_port(&svc, 0));
    let lb = sa(&lb, 80);
    // Pods on node-0 (the socket LB, keyed by the pod), and the outside client through node-0 (the per-packet
    // path, keyed by its address): the ClusterIP first, then the other addresses, then the ClusterIP again.
    let execs = [ctx.exec_pod("execpod-a", 0)?, ctx.exec_pod("execpod-b", 0)?];
    let clients = [From::Pod(&execs[0]), From::Pod(&execs[1]), From::External];
    for from in &clients {
        let first = sticky_backend(ctx, from, cluster)?;
        for to in [node_port_0, lb, cluster] {
            let got = sticky_backend(ctx, from, to)?;
            ensure!(
                got == first,
                "{from:?}: {to} answered from {got}, the ClusterIP from {first}: one affinity per Service port"
            );
        }
    }

    // externalTrafficPolicy Local: the outside client's affinity is learned through the ClusterIP (the internal
    // policy's set: every endpoint) while only remote pods exist; then a pod on node-0 joins. Through node-0's
    // NodePort (local endpoints only) the client must reach that pod, not the remembered remote one.
    ctx.cleanup();
    let name = "affinity-local-policy";
    let (svc, remote) = ctx.serve_hostname(name, 3, &[1, 2], |s| {
        s.type_("NodePort")
            .spec("externalTrafficPolicy", json!("Local"))
            .spec("sessionAffinity", json!("ClientIP"))
    })?;
    let cluster = sa(&cluster_ip(&svc), 80);
    let node_port_0 = sa(&ctx.c.nodes[0].ip().to_string(), node_port(&svc, 0));
    let remembered = sticky_backend(ctx, &From::External, cluster)?;
    ensure!(
        remote.iter().any(|p| p.name == remembered),
        "{remembered} is not one of the remote pods"
    );
    let local = ctx.c.create_pod(&PodSpec::web(
        &ctx.ns,
        &format!("{name}-local"),
        0,
        name,
        &[9376],
    ))?;
    ctx.expect_backends(&From::External, Proto::Tcp, node_port_0, &[&local.name])?;
    // The ClusterIP still lists the remembered pod: the client keeps a backend there (the local pod, which the
    // NodePort taught it last, or the remembered one), and keeps it.
    let after = sticky_backend(ctx, &From::External, cluster)?;
    ensure!(
        after == local.name || after == remembered,
        "the ClusterIP answered from {after}, neither {} nor {remembered}",
        local.name
    );
    Ok(())
}

/// The client address the pod's server saw for the last connection.
fn last_client(ctx: &Ctx<'_>, pod: &Pod) -> Result<String> {
    let peer = ctx
        .c
        .served(pod, "tcp")
        .into_iter()
        .filter_map(|l| l.peer)
        .next_back()
        .unwrap_or_default();
    match peer.parse::<SocketAddr>() {
        Ok(a) => Ok(a.ip().to_string()),
        Err(_) => bail!("{} saw no client ({peer:?})", pod.name),
    }
}

/// The first four ESIPP tests.
fn esipp(ctx: &Ctx<'_>) -> Result<()> {
    // "should work for type=LoadBalancer": the backend sees the outside client's own address.
    let name = "external-local-lb";
    let (svc, pods) = ctx.serve_hostname(name, 1, &[0], |s| {
        s.type_("LoadBalancer")
            .spec("externalTrafficPolicy", json!("Local"))
    })?;
    ensure!(
        health_check_node_port(&svc) != 0,
        "Service HealthCheck NodePort was not allocated"
    );
    let (_, lb) = with_ingress(ctx, name)?;
    ctx.expect_backends(&From::External, Proto::Tcp, sa(&lb, 80), &[&pods[0].name])?;
    let seen = last_client(ctx, &pods[0])?;
    ensure!(
        seen == CLIENT_IP,
        "Source IP was NOT preserved: the backend saw {seen}"
    );

    // "should work from pods": a pod reaching the load balancer address keeps its own address too.
    let pause = ctx.exec_pod("pause-pod", 1)?;
    ctx.expect_backends(
        &From::Pod(&pause),
        Proto::Tcp,
        sa(&lb, 80),
        &[&pods[0].name],
    )?;
    let seen = last_client(ctx, &pods[0])?;
    ensure!(
        seen == pause.ip.to_string(),
        "Source IP not preserved from {}: {seen}",
        pause.name
    );

    // "should work for type=NodePort": from a pod on another node to each endpoint node's NodePort.
    let name = "external-local-nodeport";
    let (svc, pods) = ctx.serve_hostname(name, 2, &[0, 1], |s| {
        s.type_("NodePort")
            .spec("externalTrafficPolicy", json!("Local"))
    })?;
    let test_container = ctx.exec_pod("test-container-pod", 2)?;
    for pod in &pods {
        let to = sa(&ctx.c.nodes[pod.node].ip().to_string(), node_port(&svc, 0));
        ctx.expect_backends(&From::Pod(&test_container), Proto::Tcp, to, &[&pod.name])?;
        let seen = last_client(ctx, pod)?;
        ensure!(
            seen == test_container.ip.to_string(),
            "Source IP was NOT preserved: {seen}"
        );
    }

    // "should only target nodes with endpoints": the health check passes on the endpoint's node only.
    let name = "external-local-nodes";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .type_("LoadBalancer")
            .spec("externalTrafficPolicy", json!("Local"))
            .port("", 8081, 80, "TCP")
            .build(),
    )?;
    let hc = health_check_node_port(&svc);
    let (_, lb) = with_ingress(ctx, name)?;
    for endpoint_node in 0..ctx.c.nodes.len() {
        let pod = run_pod(
            ctx,
            &format!("{name}-{endpoint_node}"),
            Proto::Tcp,
            endpoint_node,
        )?;
        relabel(ctx, &pod, name)?;
        if endpoint_node == 0 {
            ctx.expect_backends(&From::External, Proto::Tcp, sa(&lb, 8081), &[&pod.name])?;
        }
        for node in &ctx.c.nodes {
            let code = if node.index == endpoint_node {
                200
            } else {
                503
            };
            expect_health(
                ctx,
                &From::Pod(&test_container),
                sa(&node.ip().to_string(), hc),
                code,
            )?;
        }
        ctx.c.delete_pod(&pod)?;
    }
    Ok(())
}

/// "should handle updates to ExternalTrafficPolicy field": Local to Cluster (the health check nodePort is released
/// and stops answering; nodes without the endpoint proxy to it) and back (the same health check nodePort, asked
/// for; the client's address preserved again).
fn esipp_updates(ctx: &Ctx<'_>) -> Result<()> {
    let name = "external-local-update";
    let (svc, pods) = ctx.serve_hostname(name, 1, &[0], |s| {
        s.type_("LoadBalancer")
            .spec("externalTrafficPolicy", json!("Local"))
    })?;
    let pod = &pods[0];
    let hc = health_check_node_port(&svc);
    let (_, lb) = with_ingress(ctx, name)?;
    let test_container = ctx.exec_pod("test-container-pod", 2)?;
    let tc = From::Pod(&test_container);
    let hc0 = sa(&ctx.c.nodes[0].ip().to_string(), hc);
    expect_health(ctx, &tc, hc0, 200)?;

    let svc = ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["externalTrafficPolicy"] = json!("Cluster")
    })?;
    ensure!(
        health_check_node_port(&svc) == 0,
        "Service HealthCheck NodePort still present: {svc}"
    );
    let np = node_port(&svc, 0);
    for node in &ctx.c.nodes[1..] {
        ctx.expect_backends(
            &tc,
            Proto::Tcp,
            sa(&node.ip().to_string(), np),
            &[&pod.name],
        )?;
    }
    eventually(
        &format!("the health check at {hc0} goes away"),
        LAG,
        || match ctx.http(&tc, hc0, "/healthz")? {
            None => Ok(()),
            Some(answer) => bail!("still answered {answer:?}"),
        },
    )?;
    // Source IP not preserved through another node (SNAT to that node's address, in the node network). Through
    // node-0, whose own pod serves, lb keeps the client's address: the deliberate divergence (docs/e2e.md).
    let via_node1 = sa(&ctx.c.nodes[1].ip().to_string(), np);
    ctx.expect_backends(&From::External, Proto::Tcp, via_node1, &[&pod.name])?;
    let seen = last_client(ctx, pod)?;
    ensure!(
        seen == ctx.c.nodes[1].ip().to_string(),
        "Source IP WAS preserved even after ESIPP turned off: {seen}"
    );
    ctx.expect_backends(&From::External, Proto::Tcp, sa(&lb, 80), &[&pod.name])?;
    let seen = last_client(ctx, pod)?;
    ensure!(
        seen == CLIENT_IP,
        "local backend under Cluster: lb keeps the client's address, saw {seen}"
    );

    let svc = ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["externalTrafficPolicy"] = json!("Local");
        s["spec"]["healthCheckNodePort"] = json!(hc);
    })?;
    ensure!(
        health_check_node_port(&svc) == hc,
        "the requested health check nodePort was not kept: {svc}"
    );
    expect_health(ctx, &tc, hc0, 200)?;
    ctx.expect_backends(&From::External, Proto::Tcp, sa(&lb, 80), &[&pod.name])?;
    let seen = last_client(ctx, pod)?;
    ensure!(
        seen == CLIENT_IP,
        "Source IP is not the client IP even after ESIPP turned on: {seen}"
    );
    Ok(())
}

/// "should only allow access from service loadbalancer source ranges", in the GCE shape: the cloud adds the load
/// balancer IP as a local route on every node, so a pod's packets to it never cross a tc device and only the socket
/// LB can serve (or refuse) them. Pods inside the ranges reach it (kube-proxy DNATs them), pods outside do not
/// (docs/semantics.md rule 9: pods and the node are checked too); the outside client likewise through the tc path.
fn source_ranges(ctx: &Ctx<'_>) -> Result<()> {
    let name = "lb-sourcerange";
    let accept = ctx.exec_pod("execpod-accept", 0)?;
    let drop = ctx.exec_pod("execpod-drop", 1)?;
    ctx.pods(name, 1, 80, &[2])?;
    let backend = format!("{name}-0");
    let range = |pod: &Pod| json!([format!("{}/32", pod.ip)]);
    ctx.c.create_service(
        service(&ctx.ns, name, name)
            .type_("LoadBalancer")
            .port("", 80, 80, "TCP")
            .spec("loadBalancerSourceRanges", range(&accept))
            .build(),
    )?;
    let (_, lb) = with_ingress(ctx, name)?;
    let to = sa(&lb, 80);
    let reach = |pod: &Pod, yes: bool| -> Result<()> {
        if yes {
            ctx.expect_backends(&From::Pod(pod), Proto::Tcp, to, &[&backend])
        } else {
            ctx.expect_unreachable(&From::Pod(pod), Proto::Tcp, to)
                .map(|_| ())
        }
    };
    reach(&accept, true)?;
    reach(&drop, false)?;
    ctx.expect_unreachable(&From::External, Proto::Tcp, to)?;
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["loadBalancerSourceRanges"] = range(&drop)
    })?;
    reach(&accept, false)?;
    reach(&drop, true)?;
    // The outside client's own range: it gets in through node-0's tc path.
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["loadBalancerSourceRanges"] = json!([format!("{CLIENT_IP}/32")])
    })?;
    ctx.expect_backends(&From::External, Proto::Tcp, to, &[&backend])?;
    reach(&accept, false)?;
    // The node itself (and its hostNetwork pods) is checked too: a range holding node-0's address lets node-0 in,
    // not node-1.
    ctx.c.update_service(&ctx.ns, name, |s| {
        s["spec"]["loadBalancerSourceRanges"] = json!([format!("{}/32", ctx.c.nodes[0].ip())])
    })?;
    ctx.expect_backends(&From::Host(0), Proto::Tcp, to, &[&backend])?;
    ctx.expect_unreachable(&From::Host(1), Proto::Tcp, to)?;
    reach(&accept, false)?;
    ctx.c.update_service(&ctx.ns, name, |s| {
        if let Some(spec) = s["spec"].as_object_mut() {
            spec.remove("loadBalancerSourceRanges");
        }
    })?;
    reach(&accept, true)?;
    reach(&drop, true)
}
