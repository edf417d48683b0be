//! `test/e2e/network/localhost_nodeports.go` (`[sig-network] LocalhostNodePorts`): a hostNetwork client reaching
//! `localhost:<nodePort>` (lb's `--localhost-nodeports`, on by default as kube-proxy's iptables mode).

use anyhow::Result;
use lb_tests::cluster::{node_port, service};
use serde_json::json;

use crate::Case;
use crate::support::{Ctx, From, check_affinity, sa};

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "localhost/nodeports",
        covers: &[
            "[sig-network] LocalhostNodePorts should proxy localhost NodePort traffic to backends across nodes [Feature:LocalhostNodePorts]",
            "[sig-network] LocalhostNodePorts should honor sessionAffinity=ClientIP for localhost NodePort [Feature:LocalhostNodePorts]",
        ],
        run: localhost_node_ports,
    }]
}

fn localhost_node_ports(ctx: &Ctx<'_>) -> Result<()> {
    // One backend on the client's node, one on another: requests spread over both.
    let name = "agnhost-localhost-nodeport";
    ctx.pods(name, 2, 9376, &[0, 1])?;
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .type_("NodePort")
            .port("", 9000, 9376, "TCP")
            .build(),
    )?;
    let to = sa("127.0.0.1", node_port(&svc, 0));
    check_affinity(ctx, &From::Host(0), to, false)?;
    // Three backends on the client's node and ClientIP affinity: every request to the same pod.
    let name = "agnhost-sticky-localhost";
    ctx.pods(name, 3, 9376, &[0])?;
    let svc = ctx.c.create_service(
        service(&ctx.ns, name, name)
            .type_("NodePort")
            .port("", 9000, 9376, "TCP")
            .spec("sessionAffinity", json!("ClientIP"))
            .spec(
                "sessionAffinityConfig",
                json!({"clientIP": {"timeoutSeconds": 10800}}),
            )
            .build(),
    )?;
    check_affinity(
        ctx,
        &From::Host(0),
        sa("127.0.0.1", node_port(&svc, 0)),
        true,
    )
}
