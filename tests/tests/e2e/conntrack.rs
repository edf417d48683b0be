//! `test/e2e/network/conntrack.go` (`[sig-network] Conntrack`) and the two UDP LoadBalancer tests of
//! loadbalancer.go: a UDP client that keeps sending from one source port (upstream: `nc -u -p 12345` in a loop)
//! must reach the new backend once the old one is gone, however the old flow was tracked.

use std::net::SocketAddr;

use anyhow::{Result, bail};
use lb_tests::cluster::{Pod, PodSpec, cluster_ip, ingress_ip, node_port, service};
use serde_json::json;

use crate::Case;
use crate::support::{Ctx, From, LAG, Proto, eventually, sa};

const SRC_PORT: u16 = 12345;

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "conntrack/udp-server-cycles",
            covers: &[
                "[sig-network] Conntrack should be able to preserve UDP traffic when server pod cycles for a NodePort service",
                "[sig-network] Conntrack should be able to preserve UDP traffic when server pod cycles for a ClusterIP service",
                "[sig-network] Conntrack should be able to preserve UDP traffic when server pod cycles for a ClusterIP service and client is hostNetwork",
            ],
            run: server_cycles,
        },
        Case {
            name: "conntrack/udp-itp-local",
            covers: &[
                "[sig-network] Conntrack should be able to preserve UDP traffic when server pod cycles for a ClusterIP service with InternalTrafficPolicy set to Local",
            ],
            run: itp_local,
        },
        Case {
            name: "conntrack/udp-unready-gets-ready",
            covers: &[
                "[sig-network] Conntrack should be able to preserve UDP traffic when initial unready endpoints get ready",
            ],
            run: unready_gets_ready,
        },
        Case {
            name: "conntrack/udp-loadbalancer",
            covers: &[
                "[sig-network] LoadBalancers should be able to preserve UDP traffic when server pod cycles for a LoadBalancer service on different nodes",
                "[sig-network] LoadBalancers should be able to preserve UDP traffic when server pod cycles for a LoadBalancer service on the same nodes",
            ],
            run: load_balancer,
        },
    ]
}

/// Waits until a datagram from `sport` reaches `backend` (each try one new socket, as each `nc` run is).
fn expect_udp(
    ctx: &Ctx<'_>,
    from: &From<'_>,
    to: SocketAddr,
    sport: u16,
    backend: &str,
) -> Result<()> {
    eventually(
        &format!("UDP {to} from {from:?}:{sport} reaches {backend}"),
        LAG,
        || {
            let lines = ctx.probe_from_port(from, Proto::Udp, to, 1, 1000, sport)?;
            match lines.first() {
                Some(l) if l.ok && l.backend.as_deref() == Some(backend) => Ok(()),
                other => bail!("got {other:?}"),
            }
        },
    )
}

/// A datagram now, whatever comes of it (the client's loop keeps sending while the test changes things).
fn send(ctx: &Ctx<'_>, from: &From<'_>, to: SocketAddr, sport: u16) -> Result<()> {
    ctx.probe_from_port(from, Proto::Udp, to, 1, 300, sport)
        .map(|_| ())
}

fn udp_server(ctx: &Ctx<'_>, name: &str, node: usize, app: &str) -> Result<Pod> {
    ctx.c
        .create_pod(&PodSpec::web(&ctx.ns, name, node, app, &[]).with_port("", 80, "UDP"))
}

fn udp_service(ctx: &Ctx<'_>, name: &str, ty: &str, itp: &str) -> Result<serde_json::Value> {
    ctx.c.create_service(
        service(&ctx.ns, name, name)
            .type_(ty)
            .port("udp", 80, 80, "UDP")
            .spec("internalTrafficPolicy", json!(itp))
            .build(),
    )
}

/// The three "server pod cycles" tests: client on node-0, both backends on node-1; the first goes, the second must
/// get the traffic.
fn server_cycles(ctx: &Ctx<'_>) -> Result<()> {
    let client = ctx.exec_pod("pod-client", 0)?;
    for (name, ty, from) in [
        ("svc-udp-np", "NodePort", From::Pod(&client)),
        ("svc-udp-cip", "ClusterIP", From::Pod(&client)),
        ("svc-udp-host", "ClusterIP", From::Host(0)),
    ] {
        let svc = udp_service(ctx, name, ty, "Cluster")?;
        let to = if ty == "NodePort" {
            sa(&ctx.c.nodes[1].ip().to_string(), node_port(&svc, 0))
        } else {
            sa(&cluster_ip(&svc), 80)
        };
        send(ctx, &from, to, SRC_PORT)?;
        let b1 = udp_server(ctx, &format!("{name}-server-1"), 1, name)?;
        expect_udp(ctx, &from, to, SRC_PORT, &b1.name)?;
        let b2 = udp_server(ctx, &format!("{name}-server-2"), 1, name)?;
        ctx.c.delete_pod(&b1)?;
        expect_udp(ctx, &from, to, SRC_PORT, &b2.name)?;
    }
    Ok(())
}

/// Regression test for kubernetes#126934: the local backend goes while the remote one stays (no local endpoint:
/// dropped), then a new local one comes; traffic must reach it.
fn itp_local(ctx: &Ctx<'_>) -> Result<()> {
    let name = "svc-udp";
    let svc = udp_service(ctx, name, "ClusterIP", "Local")?;
    let to = sa(&cluster_ip(&svc), 80);
    let client = ctx.exec_pod("pod-client", 0)?;
    let from = From::Pod(&client);
    send(ctx, &from, to, SRC_PORT)?;
    let b1 = udp_server(ctx, "pod-server-1", 0, name)?;
    expect_udp(ctx, &from, to, SRC_PORT, &b1.name)?;
    udp_server(ctx, "pod-server-2", 1, name)?;
    ctx.c.delete_pod(&b1)?;
    for _ in 0..5 {
        send(ctx, &from, to, SRC_PORT)?;
    }
    let b3 = udp_server(ctx, "pod-server-3", 0, name)?;
    expect_udp(ctx, &from, to, SRC_PORT, &b3.name)
}

/// Regression test for kubernetes#105657: traffic while the only endpoint is not ready yet must not leave anything
/// behind that keeps it from the endpoint once it is.
fn unready_gets_ready(ctx: &Ctx<'_>) -> Result<()> {
    let name = "svc-udp";
    let svc = udp_service(ctx, name, "ClusterIP", "Cluster")?;
    let to = sa(&cluster_ip(&svc), 80);
    let client = ctx.exec_pod("pod-client", 0)?;
    let from = From::Pod(&client);
    let b1 = ctx.c.create_pod(
        &PodSpec::web(&ctx.ns, "pod-server-1", 1, name, &[])
            .with_port("", 80, "UDP")
            .unready(),
    )?;
    for _ in 0..5 {
        send(ctx, &from, to, SRC_PORT)?;
    }
    ctx.c.set_ready(&b1, true)?;
    expect_udp(ctx, &from, to, SRC_PORT, &b1.name)
}

/// The two LoadBalancer tests: the outside client sends to the load balancer from one source port; the first
/// backend (node-0, where the cloud delivers) goes, the second (node-1, or node-0 again) must get the traffic.
fn load_balancer(ctx: &Ctx<'_>) -> Result<()> {
    for (name, second_node, sport) in [
        ("svc-udp-lb-nodes", 1, 54321),
        ("svc-udp-lb-same", 0, 54322),
    ] {
        let svc = udp_service(ctx, name, "LoadBalancer", "Cluster")?;
        let svc = ctx.c.service(&ctx.ns, name).unwrap_or(svc);
        let Some(ip) = ingress_ip(&svc) else {
            bail!("no load balancer address: {svc}");
        };
        let to = sa(&ip, 80);
        send(ctx, &From::External, to, sport)?;
        let b1 = udp_server(ctx, &format!("{name}-hostname1"), 0, name)?;
        expect_udp(ctx, &From::External, to, sport, &b1.name)?;
        let b2 = udp_server(ctx, &format!("{name}-hostname2"), second_node, name)?;
        ctx.c.delete_pod(&b1)?;
        expect_udp(ctx, &From::External, to, sport, &b2.name)?;
    }
    Ok(())
}
