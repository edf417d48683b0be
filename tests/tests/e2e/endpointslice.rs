//! `test/e2e/network/endpointslice.go` (`[sig-network] EndpointSlice`): the controller's slices (the API server
//! double's, checked as upstream checks the real one), and Services whose slices someone else writes.

use std::collections::BTreeSet;

use anyhow::{Result, ensure};
use lb_tests::apiserver::Resource;
use lb_tests::cluster::{PodSpec, cluster_ip, service};
use serde_json::{Value, json};

use crate::Case;
use crate::support::{Ctx, From, LAG, Proto, eventually, sa};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "endpointslice/controller",
            covers: &[
                "[sig-network] EndpointSlice should create and delete Endpoints and EndpointSlices for a Service with a selector specified [Conformance]",
                "[sig-network] EndpointSlice should create Endpoints and EndpointSlices for Pods matching a Service [Conformance]",
            ],
            run: controller,
        },
        Case {
            name: "endpointslice/custom-slices",
            covers: &[
                "[sig-network] EndpointSlice should support a Service with multiple ports specified in multiple EndpointSlices",
                "[sig-network] EndpointSlice should support a Service with multiple endpoint IPs specified in multiple EndpointSlices",
            ],
            run: custom_slices,
        },
        Case {
            name: "endpointslice/ipv4-mapped-address",
            covers: &[
                "lb: an IPv4-mapped IPv6 literal in an IPv4 EndpointSlice is skipped with a warning naming the slice",
            ],
            run: bad_address,
        },
    ]
}

fn labels(slice: &Value) -> &serde_json::Map<String, Value> {
    static EMPTY: std::sync::OnceLock<serde_json::Map<String, Value>> = std::sync::OnceLock::new();
    slice["metadata"]["labels"]
        .as_object()
        .unwrap_or_else(|| EMPTY.get_or_init(serde_json::Map::new))
}

/// `expectEndpointsAndSlices`: `slices` slices holding `pods` endpoints (pod name -> port).
fn expect_slices(ctx: &Ctx<'_>, svc: &str, want: &[(&str, u16)], slices: usize) -> Result<()> {
    let found = ctx.c.slices(&ctx.ns, svc);
    ensure!(
        found.len() == slices,
        "{svc}: {} EndpointSlices, expected {slices}: {found:?}",
        found.len()
    );
    let mut got = BTreeSet::new();
    for s in &found {
        ensure!(
            labels(s).get("endpointslice.kubernetes.io/managed-by")
                == Some(&json!("endpointslice-controller.k8s.io")),
            "{svc}: slice without the managed-by label: {s}"
        );
        let ports: Vec<u64> = s["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["port"].as_u64())
            .collect();
        let endpoints = s["endpoints"].as_array().cloned().unwrap_or_default();
        if want.is_empty() {
            ensure!(
                ports.is_empty(),
                "{svc}: a slice without endpoints must have no ports: {s}"
            );
        }
        for e in endpoints {
            let pod = e
                .pointer("/targetRef/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            for p in &ports {
                got.insert((pod.clone(), *p as u16));
            }
        }
    }
    let want: BTreeSet<(String, u16)> = want
        .iter()
        .map(|(p, port)| (p.to_string(), *port))
        .collect();
    ensure!(got == want, "{svc}: endpoints {got:?}, expected {want:?}");
    Ok(())
}

fn controller(ctx: &Ctx<'_>) -> Result<()> {
    // "... for a Service with a selector specified": one empty slice, gone with the Service.
    let empty = ctx.c.create_service(
        service(&ctx.ns, "example-empty-selector", "does-not-match-anything")
            .port("example", 80, 80, "TCP")
            .build(),
    )?;
    expect_slices(ctx, "example-empty-selector", &[], 1)?;
    ctx.c.delete_service(&ctx.ns, "example-empty-selector")?;
    expect_slices(ctx, "example-empty-selector", &[], 0)?;
    let exec = ctx.exec_pod("execpod", 0)?;
    ctx.expect_unreachable(&From::Pod(&exec), Proto::Tcp, sa(&cluster_ip(&empty), 80))?;

    // "... for Pods matching a Service".
    let pod = |name: &str, node: usize, ports: &[(&str, u16)], labels: &[&str]| {
        let mut spec = PodSpec::exec(&ctx.ns, name, node);
        for (n, p) in ports {
            spec = spec.with_port(n, *p, "TCP");
        }
        for l in labels {
            spec = spec.labelled(l, "on");
        }
        spec
    };
    ctx.c.create_pod(&pod(
        "pod1",
        1,
        &[("example-name", 3000)],
        &["pod1", "shared12"],
    ))?;
    ctx.c.create_pod(&pod(
        "pod2",
        2,
        &[("example-name", 3001), ("other-port", 3002)],
        &["pod2", "shared12"],
    ))?;
    let mk = |name: &str, key: &str, target: Value| {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ctx.ns},
            "spec": {"selector": {key: "on"}, "publishNotReadyAddresses": true,
                "ports": [{"name": "example", "port": 80, "targetPort": target, "protocol": "TCP"}]}})
    };
    ctx.c
        .create_service(mk("example-int-port", "pod1", json!(3000)))?;
    let named =
        ctx.c
            .create_service(mk("example-named-port", "shared12", json!("example-name")))?;
    ctx.c
        .create_service(mk("example-no-match", "pod3", json!(8080)))?;
    expect_slices(ctx, "example-int-port", &[("pod1", 3000)], 1)?;
    expect_slices(
        ctx,
        "example-named-port",
        &[("pod1", 3000), ("pod2", 3001)],
        2,
    )?;
    expect_slices(ctx, "example-no-match", &[], 1)?;
    // The named port resolves per pod: both pods are reached, each on its own port.
    ctx.expect_backends(
        &From::Pod(&exec),
        Proto::Tcp,
        sa(&cluster_ip(&named), 80),
        &["pod1", "pod2"],
    )?;
    // "recreating EndpointSlices after they've been deleted".
    for s in ctx.c.slices(&ctx.ns, "example-named-port") {
        let name = s
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        ctx.c.api.delete(Resource::EndpointSlices, &ctx.ns, &name)?;
    }
    expect_slices(
        ctx,
        "example-named-port",
        &[("pod1", 3000), ("pod2", 3001)],
        2,
    )?;
    // Every controller-written slice says when the change that caused it happened.
    for s in ctx.c.slices(&ctx.ns, "example-named-port") {
        let t =
            s.pointer("/metadata/annotations/endpoints.kubernetes.io~1last-change-trigger-time");
        ensure!(
            t.and_then(Value::as_str).is_some_and(|t| t.ends_with('Z')),
            "no trigger time: {s}"
        );
    }
    Ok(())
}

/// A custom slice of Service `svc` (managed by the test, as upstream's `e2e-custom-slice`).
fn custom_slice(
    ctx: &Ctx<'_>,
    name: &str,
    svc: &str,
    ip: &str,
    port_name: &str,
    port: u16,
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ctx.ns, "labels": {
            "kubernetes.io/service-name": svc,
            "endpointslice.kubernetes.io/managed-by": format!("e2e-test{}", ctx.ns),
        }},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    })
}

fn custom_slices(ctx: &Ctx<'_>) -> Result<()> {
    let exec = ctx.exec_pod("pause-pod-0", 2)?;
    let from = From::Pod(&exec);
    // "... multiple ports specified in multiple EndpointSlices": one pod, 8090 and 9090, one slice per port.
    let svc = ctx.c.create_service(
        service(&ctx.ns, "example-custom-endpoints", "none")
            .without_selector()
            .port("port80", 80, 80, "TCP")
            .port("port81", 81, 81, "TCP")
            .build(),
    )?;
    let ip = cluster_ip(&svc);
    let pod = ctx.c.create_pod(
        &PodSpec::exec(&ctx.ns, "pod-handle-http-request", 0)
            .with_port("", 8090, "TCP")
            .with_port("", 9090, "TCP"),
    )?;
    ctx.c.api.create(custom_slice(
        ctx,
        "e2e-custom-slice-1",
        "example-custom-endpoints",
        &pod.ip.to_string(),
        "port80",
        8090,
    ))?;
    ctx.c.api.create(custom_slice(
        ctx,
        "e2e-custom-slice-2",
        "example-custom-endpoints",
        &pod.ip.to_string(),
        "port81",
        9090,
    ))?;
    ctx.expect_backends(&from, Proto::Tcp, sa(&ip, 80), &["pod-handle-http-request"])?;
    ctx.expect_backends(&from, Proto::Tcp, sa(&ip, 81), &["pod-handle-http-request"])?;
    // "... multiple endpoint IPs specified in multiple EndpointSlices": a pod per slice, both on 8090.
    ctx.c.delete_service(&ctx.ns, "example-custom-endpoints")?;
    for s in ["e2e-custom-slice-1", "e2e-custom-slice-2"] {
        ctx.c.api.delete(Resource::EndpointSlices, &ctx.ns, s)?;
    }
    let svc = ctx.c.create_service(
        service(&ctx.ns, "example-custom-endpoints2", "none")
            .without_selector()
            .port("port80", 80, 80, "TCP")
            .port("port81", 81, 81, "TCP")
            .build(),
    )?;
    let ip = cluster_ip(&svc);
    let pod1 = ctx.c.create_pod(
        &PodSpec::exec(&ctx.ns, "pod1-handle-http-request", 1).with_port("", 8090, "TCP"),
    )?;
    let pod2 = ctx.c.create_pod(
        &PodSpec::exec(&ctx.ns, "pod2-handle-http-request", 2).with_port("", 8090, "TCP"),
    )?;
    ctx.c.api.create(custom_slice(
        ctx,
        "e2e-custom-slice-3",
        "example-custom-endpoints2",
        &pod1.ip.to_string(),
        "port80",
        8090,
    ))?;
    ctx.c.api.create(custom_slice(
        ctx,
        "e2e-custom-slice-4",
        "example-custom-endpoints2",
        &pod2.ip.to_string(),
        "port81",
        8090,
    ))?;
    ctx.expect_backends(
        &from,
        Proto::Tcp,
        sa(&ip, 80),
        &["pod1-handle-http-request"],
    )?;
    ctx.expect_backends(
        &from,
        Proto::Tcp,
        sa(&ip, 81),
        &["pod2-handle-http-request"],
    )?;
    // The controller leaves slices it does not manage alone.
    eventually("custom slices stay", LAG, || {
        ensure!(
            ctx.c.slices(&ctx.ns, "example-custom-endpoints2").len() == 2,
            "slices changed"
        );
        Ok(())
    })
}

/// An IPv4-mapped IPv6 literal (`::ffff:a.b.c.d`) in an `addressType: IPv4` slice is no IPv4 endpoint: the API
/// server refuses it, a file can still hold it. The agent skips that endpoint with a warning naming the slice, and
/// serves the others (rule 1 of the Service semantics).
fn bad_address(ctx: &Ctx<'_>) -> Result<()> {
    let name = "mapped-address";
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, "none")
            .without_selector()
            .port("http", 80, 8080, "TCP")
            .build(),
    )?;
    let mapped = ctx
        .c
        .create_pod(&PodSpec::exec(&ctx.ns, "mapped", 1).with_port("", 8080, "TCP"))?;
    let plain = ctx
        .c
        .create_pod(&PodSpec::exec(&ctx.ns, "plain", 2).with_port("", 8080, "TCP"))?;
    // Written as a file or a client skipping validation would: the double stores it as given.
    ctx.c.api.apply_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "mapped-address-1", "namespace": ctx.ns,
            "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [format!("::ffff:{}", mapped.ip)], "conditions": {"ready": true}},
            {"addresses": [plain.ip.to_string()], "conditions": {"ready": true}},
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))?;
    let exec = ctx.exec_pod("execpod", 0)?;
    ctx.expect_backends(
        &From::Pod(&exec),
        Proto::Tcp,
        sa(&cluster_ip(&svc), 80),
        &["plain"],
    )?;
    let object = format!("object=EndpointSlice {}/mapped-address-1", ctx.ns);
    for i in 0..ctx.c.nodes.len() {
        eventually(
            &format!("node-{i}'s agent warns about the mapped address"),
            LAG,
            || {
                let log = ctx.c.agent_log(i);
                ensure!(
                    log.lines().any(
                        |l| l.contains(&object) && l.contains(&format!("::ffff:{}", mapped.ip))
                    ),
                    "no warning naming the slice and the address"
                );
                Ok(())
            },
        )?;
    }
    Ok(())
}
