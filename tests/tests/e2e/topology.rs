//! `test/e2e/network/traffic_distribution.go` (`[sig-network] Traffic Distribution`) and `topology_hints.go`
//! (`[sig-network] Topology Hints`): the cluster's three nodes are in three zones.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{Result, bail, ensure};
use lb_tests::cluster::{PodSpec, cluster_ip, service};
use serde_json::{Value, json};

use crate::Case;
use crate::support::{Ctx, From, LAG, Proto, eventually, sa};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "topology/traffic-distribution",
            covers: &[
                "[sig-network] Traffic Distribution when Service has trafficDistribution=PreferClose should route traffic to an endpoint that is close to the client",
            ],
            run: traffic_distribution,
        },
        Case {
            name: "topology/hints",
            covers: &["[sig-network] Topology Hints should distribute endpoints evenly"],
            run: topology_hints,
        },
    ]
}

/// Waits until `n` requests in a row from `from` all succeed, each reaching a pod `ok` accepts.
fn consecutive(
    ctx: &Ctx<'_>,
    from: &From<'_>,
    to: SocketAddr,
    n: usize,
    ok: impl Fn(&str) -> bool,
) -> Result<()> {
    eventually(&format!("{n} requests in a row from {from:?}"), LAG, || {
        let lines = ctx.probe(from, Proto::Tcp, to, n, 2000)?;
        for l in &lines {
            let backend = l.backend.as_deref().unwrap_or_default();
            if !l.ok || !ok(backend) {
                bail!("request answered by {backend:?} ({l:?})");
            }
        }
        Ok(())
    })
}

/// "should route traffic to an endpoint that is close to the client": serving pods in zones a and b; clients there
/// stay in their zone, a client in zone c (no serving pod) reaches any.
fn traffic_distribution(ctx: &Ctx<'_>) -> Result<()> {
    let name = "traffic-dist-test-service";
    let mut zone_of: BTreeMap<String, usize> = BTreeMap::new();
    for node in [0, 1] {
        let pod = ctx.c.create_pod(&PodSpec::web(
            &ctx.ns,
            &format!("serving-pod-in-{}", ctx.c.nodes[node].zone),
            node,
            name,
            &[9376],
        ))?;
        zone_of.insert(pod.name, node);
    }
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .port("", 80, 9376, "TCP")
            .spec("trafficDistribution", json!("PreferClose"))
            .build(),
    )?;
    let to = sa(&cluster_ip(&svc), 80);
    for node in [0, 1] {
        let client = ctx.exec_pod(&format!("client-pod-in-{}", ctx.c.nodes[node].zone), node)?;
        consecutive(ctx, &From::Pod(&client), to, 10, |b| {
            zone_of.get(b) == Some(&node)
        })?;
    }
    let client = ctx.exec_pod("client-pod-in-zone-c", 2)?;
    consecutive(ctx, &From::Pod(&client), to, 10, |b| {
        zone_of.contains_key(b)
    })
}

/// "should distribute endpoints evenly": one serving pod per node (a DaemonSet), `topology-mode: Auto`; every
/// endpoint gets a hint for its own zone, and every zone's client stays in its zone.
fn topology_hints(ctx: &Ctx<'_>) -> Result<()> {
    let name = "topology-hints";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .annotation("service.kubernetes.io/topology-mode", "Auto")
            .spec("publishNotReadyAddresses", json!(true))
            .port("example", 80, 9376, "TCP")
            .build(),
    )?;
    let mut node_of: BTreeMap<String, usize> = BTreeMap::new();
    for node in 0..ctx.c.nodes.len() {
        let pod = ctx.c.create_pod(&PodSpec::web(
            &ctx.ns,
            &format!("topology-serve-hostname-{node}"),
            node,
            name,
            &[9376],
        ))?;
        node_of.insert(pod.name, node);
    }
    for slice in ctx.c.slices(&ctx.ns, name) {
        for ep in slice["endpoints"].as_array().into_iter().flatten() {
            let zone = ep["zone"].as_str();
            let hints: Vec<&str> = ep
                .pointer("/hints/forZones")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|z| z["name"].as_str())
                .collect();
            ensure!(zone.is_some(), "Expected endpoint to have zone: {ep}");
            ensure!(
                hints.len() == 1,
                "Expected endpoint to have exactly 1 zone hint: {ep}"
            );
            ensure!(
                zone == Some(hints[0]),
                "Expected endpoint to have same zone hint: {ep}"
            );
        }
    }
    let to = sa(&cluster_ip(&svc), 80);
    for node in 0..ctx.c.nodes.len() {
        let client = ctx.exec_pod(&format!("curl-from-{}", ctx.c.nodes[node].zone), node)?;
        consecutive(ctx, &From::Pod(&client), to, 5, |b| {
            node_of.get(b) == Some(&node)
        })?;
    }
    Ok(())
}
