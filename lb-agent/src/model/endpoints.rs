//! Which endpoints each traffic policy may use (docs/semantics.md rules 4, 5, 7).
//!
//! A line-by-line mirror of kube-proxy's `CategorizeEndpoints`, `topologyModeFromHints` and `availableForTopology`
//! (pkg/proxy/topology.go). Current kube-proxy decides topology from the hints alone: the EndpointSlice controller
//! only writes hints for Services asking for them (`trafficDistribution: PreferClose`/`PreferSameZone`/
//! `PreferSameNode`, or the topology-mode annotation), so kube-proxy no longer reads the annotation itself (the
//! older `canUseTopology` did). Node hints (`forNodes`, feature `PreferSameTrafficDistribution`, GA and locked on
//! since Kubernetes 1.35) take precedence over zone hints, as upstream.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::objects::Name;
use crate::state::Backend;

/// One endpoint of one service port, with what kube-proxy reads from its EndpointSlice (`BaseEndpointInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    /// `nodeName` is this node.
    pub is_local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: BTreeSet<Name>,
    pub node_hints: BTreeSet<Name>,
}

impl Endpoint {
    fn backend(&self) -> Backend {
        Backend {
            addr: self.addr,
            port: self.port,
            weight: 1,
            local: self.is_local,
        }
    }

    fn is_serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// Which endpoint sets a service port needs (kube-proxy's `ServicePort.UsesClusterEndpoints` / `UsesLocalEndpoints`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Uses {
    pub cluster: bool,
    pub local: bool,
}

impl Uses {
    /// `UsesClusterEndpoints`: Cluster internal policy, or any external traffic at all (even with a Local external
    /// policy, local clients short-circuit to the cluster endpoints). `UsesLocalEndpoints`: either policy is Local
    /// where it applies.
    pub(crate) fn new(
        internal_policy_local: bool,
        external_policy_local: bool,
        externally_accessible: bool,
    ) -> Self {
        Uses {
            cluster: !internal_policy_local || externally_accessible,
            local: internal_policy_local || (external_policy_local && externally_accessible),
        }
    }
}

/// The result of [`categorize_endpoints`], as backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Categorized {
    /// Usable Cluster-policy backends, topology applied; empty when the port never uses Cluster policy.
    pub cluster: Vec<Backend>,
    /// Usable Local-policy backends; empty when the port never uses Local policy.
    pub local: Vec<Backend>,
    /// Some endpoint is usable somewhere in the cluster: an empty set then drops instead of rejecting (rule 8).
    pub has_any: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    None,
    PreferSameZone,
    PreferSameNode,
}

/// kube-proxy's `CategorizeEndpoints`. "Usable" means ready, falling back to serving-and-terminating endpoints when
/// none are ready, decided separately for the Cluster and the Local set. `zone` is this node's zone label, empty
/// when it has none.
pub(crate) fn categorize_endpoints(
    endpoints: &[Endpoint],
    uses: Uses,
    node_name: &str,
    zone: &str,
) -> Categorized {
    let mut out = Categorized::default();
    if endpoints.is_empty() {
        return out;
    }

    if uses.cluster {
        let mode = topology_mode_from_hints(endpoints, node_name, zone);
        let mut cluster = backends(endpoints, |ep| {
            ep.ready && available_for_topology(ep, mode, node_name, zone)
        });
        // No ready endpoint anywhere (topology already fell back to "none" if it had none for us): use the
        // serving-terminating ones, ignoring topology, so graceful termination does not drop connections.
        if cluster.is_empty() {
            cluster = backends(endpoints, Endpoint::is_serving_terminating);
        }
        out.has_any = !cluster.is_empty();
        out.cluster = cluster;
    }

    if !uses.local {
        return out;
    }

    // Pre-scan: which kind of local endpoint the Local policy uses, and whether any endpoint is usable anywhere.
    let mut has_local_ready = false;
    let mut has_local_serving_terminating = false;
    for ep in endpoints {
        if ep.ready {
            out.has_any = true;
            has_local_ready |= ep.is_local;
        } else if ep.is_serving_terminating() {
            out.has_any = true;
            has_local_serving_terminating |= ep.is_local;
        }
    }
    if has_local_ready {
        out.local = backends(endpoints, |ep| ep.is_local && ep.ready);
    } else if has_local_serving_terminating {
        out.local = backends(endpoints, |ep| ep.is_local && ep.is_serving_terminating());
    }
    out
}

/// kube-proxy's `topologyModeFromHints`: only ready endpoints decide. Same-node when every ready endpoint has a node
/// hint and one names this node; else same-zone when every ready endpoint has a zone hint and one names this zone.
fn topology_mode_from_hints(endpoints: &[Endpoint], node_name: &str, zone: &str) -> TopologyMode {
    let mut has_ready = false;
    let mut all_node_hinted = true;
    let mut has_for_node = false;
    let mut all_zone_hinted = true;
    let mut has_for_zone = false;
    for ep in endpoints.iter().filter(|ep| ep.ready) {
        has_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hinted = false;
        } else if ep.node_hints.contains(node_name) {
            has_for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hinted = false;
        } else if ep.zone_hints.contains(zone) {
            has_for_zone = true;
        }
    }
    if !has_ready {
        TopologyMode::None
    } else if all_node_hinted && has_for_node {
        TopologyMode::PreferSameNode
    } else if all_zone_hinted && has_for_zone {
        TopologyMode::PreferSameZone
    } else {
        TopologyMode::None
    }
}

/// kube-proxy's `availableForTopology`: no fallback here, the fallback is in choosing the mode.
fn available_for_topology(ep: &Endpoint, mode: TopologyMode, node_name: &str, zone: &str) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => ep.node_hints.contains(node_name),
        TopologyMode::PreferSameZone => ep.zone_hints.contains(zone),
    }
}

/// Why an endpoint is, or is not, in one endpoint set of [`categorize_endpoints`] (for `lb-agent explain`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Eligibility {
    /// Ready (and, for the Cluster set, inside this node's topology).
    Ready,
    /// Serving and terminating, used because the set has no ready endpoint (graceful termination).
    TerminatingFallback,
    /// Serving and terminating, left out because the set has ready endpoints.
    Terminating,
    /// Neither ready nor serving-and-terminating.
    NotReady,
    /// Local set: the endpoint runs on another node.
    OtherNode,
    /// Cluster set: topology hints send this node's traffic to endpoints hinted for its zone; this one is not.
    OtherZone,
    /// Cluster set: node hints send this node's traffic to endpoints hinted for it; this one is not.
    OtherNodeHint,
}

impl Eligibility {
    pub fn is_used(self) -> bool {
        matches!(self, Eligibility::Ready | Eligibility::TerminatingFallback)
    }
}

/// The reasons behind [`categorize_endpoints`], one per endpoint (in `endpoints` order) for each set the port
/// uses (`None` for a set it never uses). It walks the same steps with the same helpers; the unit tests check
/// that exactly the endpoints marked used are the ones `categorize_endpoints` returns.
pub(crate) fn explain_endpoints(
    endpoints: &[Endpoint],
    uses: Uses,
    node_name: &str,
    zone: &str,
) -> (Option<Vec<Eligibility>>, Option<Vec<Eligibility>>) {
    let cluster = uses.cluster.then(|| {
        let mode = topology_mode_from_hints(endpoints, node_name, zone);
        let any_ready = endpoints
            .iter()
            .any(|ep| ep.ready && available_for_topology(ep, mode, node_name, zone));
        endpoints
            .iter()
            .map(|ep| match (any_ready, ep.ready) {
                (true, true) if available_for_topology(ep, mode, node_name, zone) => {
                    Eligibility::Ready
                }
                (true, true) if mode == TopologyMode::PreferSameNode => Eligibility::OtherNodeHint,
                (true, true) => Eligibility::OtherZone,
                (true, false) if ep.is_serving_terminating() => Eligibility::Terminating,
                (false, _) if ep.is_serving_terminating() => Eligibility::TerminatingFallback,
                _ => Eligibility::NotReady,
            })
            .collect()
    });
    let local = uses.local.then(|| {
        let has_local_ready = endpoints.iter().any(|ep| ep.is_local && ep.ready);
        endpoints
            .iter()
            .map(|ep| {
                if !ep.is_local {
                    Eligibility::OtherNode
                } else if ep.ready {
                    Eligibility::Ready
                } else if ep.is_serving_terminating() && has_local_ready {
                    Eligibility::Terminating
                } else if ep.is_serving_terminating() {
                    Eligibility::TerminatingFallback
                } else {
                    Eligibility::NotReady
                }
            })
            .collect()
    });
    (cluster, local)
}

/// The backends of the endpoints passing `keep`, sorted and without duplicates.
fn backends(endpoints: &[Endpoint], keep: impl Fn(&Endpoint) -> bool) -> Vec<Backend> {
    let mut out: Vec<Backend> = endpoints
        .iter()
        .filter(|ep| keep(ep))
        .map(Endpoint::backend)
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    //! Each case is a Service and its EndpointSlice as YAML; the expectation is the backend list of a frontend,
    //! worked out by hand from the rule the test names. The node is `worker-1` in `zone-a`.

    use super::super::test_support::*;
    use crate::model::Name;
    use crate::state::Scope;

    /// A ClusterIP Service `ns/web` (10.96.0.10:80) with the given extra spec lines, plus one IPv4 slice with the
    /// given endpoints (each a flow mapping), port `http` = 8080.
    fn service_with_endpoints(spec_extra: &str, endpoints: &[&str]) -> String {
        let endpoints: String = endpoints.iter().map(|e| format!("- {e}\n")).collect();
        format!(
            "
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80}}]
{spec_extra}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{endpoints}"
        )
    }

    /// (test case, spec lines, endpoints, expected backends of the internal ClusterIP frontend, drop_if_empty)
    type Case<'a> = (&'a str, &'a str, &'a [&'a str], &'a [&'a str], bool);

    fn run(cases: &[Case<'_>]) {
        for (case, spec, endpoints, want, want_drop) in cases {
            let t = translate_yaml(&service_with_endpoints(spec, endpoints), &worker());
            assert_eq!(t.diagnostics, vec![], "{case}");
            let e = entry(&t, "10.96.0.10", 80, Scope::Internal);
            assert_eq!(backends(e), *want, "{case}");
            assert_eq!(e.drop_if_empty, *want_drop, "{case}: drop_if_empty");
        }
    }

    const READY_A: &str = "{addresses: [10.0.1.1], nodeName: worker-1, conditions: {ready: true}}";
    const READY_B: &str = "{addresses: [10.0.2.1], nodeName: worker-2, conditions: {ready: true}}";
    const TERMINATING_A: &str = "{addresses: [10.0.1.2], nodeName: worker-1, conditions: {ready: false, serving: true, terminating: true}}";
    const TERMINATING_B: &str = "{addresses: [10.0.2.2], nodeName: worker-2, conditions: {ready: false, serving: true, terminating: true}}";
    const NOT_SERVING_B: &str = "{addresses: [10.0.2.3], nodeName: worker-2, conditions: {ready: false, serving: false, terminating: true}}";
    const UNREADY_B: &str =
        "{addresses: [10.0.2.4], nodeName: worker-2, conditions: {ready: false}}";

    #[test]
    fn ready_endpoints_serve() {
        run(&[
            (
                "ready ones only",
                "",
                &[READY_A, READY_B, UNREADY_B],
                &["10.0.1.1:8080", "10.0.2.1:8080"],
                false,
            ),
            (
                "terminating ignored while some are ready",
                "",
                &[READY_B, TERMINATING_A],
                &["10.0.2.1:8080"],
                false,
            ),
        ]);
    }

    #[test]
    fn terminating_endpoints_serve_when_none_ready() {
        run(&[
            (
                "serving-terminating fallback",
                "",
                &[TERMINATING_A, TERMINATING_B, NOT_SERVING_B, UNREADY_B],
                &["10.0.1.2:8080", "10.0.2.2:8080"],
                false,
            ),
            (
                "not serving never used: reject",
                "",
                &[NOT_SERVING_B, UNREADY_B],
                &[],
                false,
            ),
        ]);
    }

    #[test]
    fn nil_conditions_read_as_kube_proxy_reads_them() {
        run(&[
            // ready nil = true.
            (
                "no conditions at all",
                "",
                &["{addresses: [10.0.2.1]}"],
                &["10.0.2.1:8080"],
                false,
            ),
            // serving nil = true in kube-proxy (not "= ready"): a terminating endpoint without it is a fallback.
            (
                "serving nil while terminating",
                "",
                &["{addresses: [10.0.2.2], conditions: {ready: false, terminating: true}}"],
                &["10.0.2.2:8080"],
                false,
            ),
            // terminating nil = false: not ready and not terminating is never used.
            (
                "terminating nil",
                "",
                &["{addresses: [10.0.2.3], conditions: {ready: false, serving: true}}"],
                &[],
                false,
            ),
        ]);
    }

    #[test]
    fn publish_not_ready_addresses_is_ignored() {
        // Rule 4: only the endpoint conditions count (the EndpointSlice controller already marks such endpoints ready).
        run(&[(
            "unready stays unused",
            "  publishNotReadyAddresses: true",
            &[READY_B, UNREADY_B],
            &["10.0.2.1:8080"],
            false,
        )]);
    }

    #[test]
    fn internal_local_policy_uses_only_local_endpoints() {
        let local = "  internalTrafficPolicy: Local";
        run(&[
            (
                "local ready one",
                local,
                &[READY_A, READY_B],
                &["10.0.1.1:8080"],
                false,
            ),
            ("no local endpoint: drop", local, &[READY_B], &[], true),
            (
                "only remote terminating: drop",
                local,
                &[TERMINATING_B],
                &[],
                true,
            ),
            (
                "nothing usable anywhere: reject",
                local,
                &[UNREADY_B],
                &[],
                false,
            ),
        ]);
    }

    #[test]
    fn local_fallback_decided_separately_from_cluster() {
        // The cluster set has a ready endpoint (on worker-2), the local set has only a terminating one: the local
        // set still falls back to it.
        run(&[(
            "local terminating fallback",
            "  internalTrafficPolicy: Local",
            &[READY_B, TERMINATING_A],
            &["10.0.1.2:8080"],
            false,
        )]);
    }

    #[test]
    fn topology_hints_used_only_when_all_ready_endpoints_hinted() {
        let hinted = |addr: &str, node: &str, zone: &str| {
            format!(
                "{{addresses: [{addr}], nodeName: {node}, hints: {{forZones: [{{name: {zone}}}]}}}}"
            )
        };
        let a1 = hinted("10.0.1.1", "worker-1", "zone-a");
        let a2 = hinted("10.0.3.1", "worker-3", "zone-a");
        let b = hinted("10.0.2.1", "worker-2", "zone-b");
        let unhinted = "{addresses: [10.0.2.9], nodeName: worker-2}";
        let unhinted_unready =
            "{addresses: [10.0.2.8], nodeName: worker-2, conditions: {ready: false}}";
        let cases: &[(&str, Vec<&str>, &[&str])] = &[
            (
                "all hinted: this zone only",
                vec![a1.as_str(), a2.as_str(), b.as_str()],
                &["10.0.1.1:8080", "10.0.3.1:8080"],
            ),
            (
                "one ready endpoint unhinted: all",
                vec![a1.as_str(), b.as_str(), unhinted],
                &["10.0.1.1:8080", "10.0.2.1:8080", "10.0.2.9:8080"],
            ),
            (
                "unready unhinted endpoint does not count",
                vec![a1.as_str(), b.as_str(), unhinted_unready],
                &["10.0.1.1:8080"],
            ),
            (
                "no hint for this zone: all",
                vec![b.as_str()],
                &["10.0.2.1:8080"],
            ),
        ];
        for (case, endpoints, want) in cases {
            let yaml = service_with_endpoints("  trafficDistribution: PreferClose", endpoints);
            let t = translate_yaml(&yaml, &worker());
            assert_eq!(t.diagnostics, vec![], "{case}");
            assert_eq!(
                backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
                *want,
                "{case}"
            );
        }
    }

    #[test]
    fn topology_hints_ignored_when_node_has_no_zone() {
        let yaml = service_with_endpoints(
            "",
            &[
                "{addresses: [10.0.1.1], hints: {forZones: [{name: zone-a}]}}",
                "{addresses: [10.0.2.1], hints: {forZones: [{name: zone-b}]}}",
            ],
        );
        let node = crate::model::NodeContext {
            zone: None,
            ..worker()
        };
        let t = translate_yaml(&yaml, &node);
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.1.1:8080", "10.0.2.1:8080"]
        );
    }

    #[test]
    fn node_hints_take_precedence_over_zone_hints() {
        let yaml = service_with_endpoints(
            "  trafficDistribution: PreferSameNode",
            &[
                "{addresses: [10.0.1.1], nodeName: worker-1, hints: {forNodes: [{name: worker-1}], forZones: [{name: zone-a}]}}",
                "{addresses: [10.0.3.1], nodeName: worker-3, hints: {forNodes: [{name: worker-3}], forZones: [{name: zone-a}]}}",
            ],
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.1.1:8080"]
        );
    }

    /// `explain_endpoints` must mark as used exactly what `categorize_endpoints` returns, for every combination of
    /// conditions, locality and hints over pairs of endpoints (and triples of a smaller pool).
    #[test]
    fn explanations_agree_with_categorize_endpoints() {
        use super::{Endpoint, Uses, categorize_endpoints, explain_endpoints};
        use std::collections::BTreeSet;
        let mut pool = Vec::new();
        for bits in 0..16u8 {
            for hint in [None, Some("zone-a"), Some("zone-b")] {
                for node_hint in [None, Some("worker-1")] {
                    pool.push(Endpoint {
                        addr: ip(&format!("10.0.{bits}.{}", pool.len() % 250 + 1)),
                        port: 8080,
                        is_local: bits & 1 != 0,
                        ready: bits & 2 != 0,
                        serving: bits & 4 != 0,
                        terminating: bits & 8 != 0,
                        zone_hints: hint.into_iter().map(Name::from).collect(),
                        node_hints: node_hint.into_iter().map(Name::from).collect(),
                    });
                }
            }
        }
        let uses_all = [
            Uses::new(false, false, false),
            Uses::new(true, false, false),
            Uses::new(false, true, true),
        ];
        let mut checked = 0;
        for (i, a) in pool.iter().enumerate() {
            for b in &pool[i..] {
                let eps = vec![a.clone(), b.clone()];
                for uses in uses_all {
                    let sets = categorize_endpoints(&eps, uses, "worker-1", "zone-a");
                    let (cluster, local) = explain_endpoints(&eps, uses, "worker-1", "zone-a");
                    let used = |why: &Option<Vec<super::Eligibility>>| -> BTreeSet<String> {
                        why.iter()
                            .flatten()
                            .zip(&eps)
                            .filter(|(e, _)| e.is_used())
                            .map(|(_, ep)| format!("{}:{}", ep.addr, ep.port))
                            .collect()
                    };
                    let set = |v: &Vec<crate::state::Backend>| -> BTreeSet<String> {
                        v.iter().map(ToString::to_string).collect()
                    };
                    assert_eq!(used(&cluster), set(&sets.cluster), "cluster {eps:?}");
                    assert_eq!(used(&local), set(&sets.local), "local {eps:?}");
                    assert_eq!(cluster.is_some(), uses.cluster);
                    checked += 1;
                }
            }
        }
        assert!(checked > 10_000, "{checked}");
    }

    #[test]
    fn terminating_fallback_ignores_topology() {
        // No ready endpoint: topology mode is "none" and every serving-terminating endpoint serves.
        let yaml = service_with_endpoints(
            "",
            &[
                "{addresses: [10.0.1.2], conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-a}]}}",
                "{addresses: [10.0.2.2], conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-b}]}}",
            ],
        );
        let t = translate_yaml(&yaml, &worker());
        assert_eq!(
            backends(entry(&t, "10.96.0.10", 80, Scope::Internal)),
            ["10.0.1.2:8080", "10.0.2.2:8080"]
        );
    }
}
