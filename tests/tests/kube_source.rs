//! The Kubernetes source, end to end: the real agent (`lb-agent run --kubeconfig`) watches the in-process API server
//! through kube-rs, programs the real maps, and clients in the test's namespaces reach backends in theirs. The API
//! server on 127.0.0.1 is the only stand-in; every packet stays inside namespaces these tests create.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_tests::agent::backends_of;
use lb_tests::apiserver::Resource;
use lb_tests::{Agent, ApiServer, Probe, ProbeLine, Topology, agent_bin, probe, require_root};
use serde_json::{Value, json};

const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const NODE: &str = "test-node";
const RUN: Duration = Duration::from_secs(60);
const SYNC: Duration = Duration::from_secs(20);

/// A dual-stack Service (TCP 80 -> "http" 8080, UDP 53 -> "dns" 5353) on the given VIPs, with extra `spec` fields.
fn service(name: &str, vip4: &str, vip6: &str, extra_spec: Value) -> Service {
    let mut spec = json!({
        "type": "ClusterIP",
        "clusterIP": vip4,
        "clusterIPs": [vip4, vip6],
        "ipFamilies": ["IPv4", "IPv6"],
        "ipFamilyPolicy": "RequireDualStack",
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": TCP_PORT},
            {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": UDP_PORT},
        ],
    });
    if let (Some(spec), Value::Object(extra)) = (spec.as_object_mut(), extra_spec) {
        spec.extend(extra);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .expect("a valid Service")
}

fn web() -> Service {
    service("web", VIP4, VIP6, json!({}))
}

/// An endpoint for backend `i` of the star (its IPv4 or IPv6 address), ready and on this node unless changed.
fn endpoint(i: usize, v6: bool) -> Value {
    let addr = if v6 {
        format!("fd00:244:{}::2", i + 1)
    } else {
        format!("10.244.{}.2", i + 1)
    };
    json!({"addresses": [addr], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": NODE})
}

fn endpoints(backends: &[usize], v6: bool) -> Vec<Value> {
    backends.iter().map(|&i| endpoint(i, v6)).collect()
}

/// An EndpointSlice of Service `service` (linked by the `kubernetes.io/service-name` label).
fn slice(name: &str, service: &str, v6: bool, endpoints: Vec<Value>) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": [
            {"name": "http", "protocol": "TCP", "port": TCP_PORT},
            {"name": "dns", "protocol": "UDP", "port": UDP_PORT},
        ],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}

fn node(zone: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.244.1.1"}]},
    }))
    .expect("a valid Node")
}

/// `web` with its IPv4 and IPv6 slices holding `backends`.
fn serve_web(server: &ApiServer, backends: &[usize]) {
    server.apply(&web()).expect("web");
    server
        .apply(&slice("web-v4", "web", false, endpoints(backends, false)))
        .expect("web-v4");
    server
        .apply(&slice("web-v6", "web", true, endpoints(backends, true)))
        .expect("web-v6");
}

fn vip4(port: u16) -> SocketAddr {
    SocketAddr::new(VIP4.parse().expect("vip"), port)
}

fn vip6(port: u16) -> SocketAddr {
    SocketAddr::new(VIP6.parse().expect("vip"), port)
}

/// The star topology with echo servers on every backend.
fn topology(backends: usize) -> (Topology, Probe) {
    let probe = probe!();
    let mut topo = Topology::star(backends).expect("topology");
    topo.serve(&probe, &[TCP_PORT], &[UDP_PORT])
        .expect("backend servers");
    (topo, probe)
}

fn run_client(topo: &Topology, cmd: lb_tests::Cmd) -> Vec<ProbeLine> {
    topo.in_client(cmd)
        .run(RUN)
        .expect("client run")
        .probe_lines()
        .expect("client output")
}

/// Which backends answered, and how often; every request must have succeeded.
fn counts(lines: &[ProbeLine]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in lines {
        assert!(l.ok, "a request failed: {l:?}");
        *m.entry(l.backend.clone().expect("backend id")).or_insert(0) += 1;
    }
    m
}

fn reached(topo: &Topology, probe: &Probe, to: SocketAddr, n: usize) -> Vec<String> {
    counts(&run_client(topo, probe.tcp_cmd(to, n)))
        .into_keys()
        .collect()
}

fn wait_backends(agent: &Agent, frontend: &str, proto: &str, want: &[&str]) {
    agent
        .wait_for_maps(SYNC, |l| {
            backends_of(l, frontend, proto, "internal").is_some_and(|b| b == want)
        })
        .unwrap_or_else(|e| panic!("{frontend}/{proto} should have backends {want:?}: {e:#}"));
}

/// (frontend scope, service id) of everything programmed.
fn service_ids(agent: &Agent) -> BTreeMap<String, u32> {
    agent
        .services()
        .expect("maps")
        .iter()
        .map(|s| (format!("{} {} {}", s.frontend, s.protocol, s.scope), s.id))
        .collect()
}

/// The agent's "synced" log lines.
fn synced_lines(agent: &Agent) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains(" synced ") || l.ends_with(" synced"))
        .map(str::to_owned)
        .collect()
}

fn field(line: &str, name: &str) -> Option<usize> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
}

#[test]
fn service_and_endpoint_slice_changes_from_the_api_server_reroute_traffic() {
    if !require_root("service_and_endpoint_slice_changes_from_the_api_server_reroute_traffic") {
        return;
    }
    let (topo, probe) = topology(3);
    let server = ApiServer::start().expect("api server");
    serve_web(&server, &[0, 1]);
    let agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    assert_eq!(
        reached(&topo, &probe, vip4(80), 40),
        ["backend-0", "backend-1"]
    );

    // An endpoint change (a rollout replacing pods).
    server
        .apply(&slice("web-v4", "web", false, endpoints(&[2], false)))
        .expect("update slice");
    wait_backends(&agent, "10.96.0.10:80", "TCP", &["10.244.3.2:8080"]);
    assert_eq!(reached(&topo, &probe, vip4(80), 20), ["backend-2"]);

    // A new Service, then its deletion.
    server
        .apply(&service("api", "10.96.0.20", "fd00:96::20", json!({})))
        .expect("api");
    server
        .apply(&slice("api-v4", "api", false, endpoints(&[1], false)))
        .expect("api slice");
    wait_backends(&agent, "10.96.0.20:80", "TCP", &["10.244.2.2:8080"]);
    let api: SocketAddr = "10.96.0.20:80".parse().expect("addr");
    assert_eq!(reached(&topo, &probe, api, 10), ["backend-1"]);
    server
        .delete(Resource::Services, "default", "api")
        .expect("delete api");
    agent
        .wait_for_maps(SYNC, |l| {
            l.iter().all(|s| !s.frontend.starts_with("10.96.0.20"))
        })
        .expect("the deleted Service's frontends are gone");

    // Deleting the slice leaves the Service without endpoints: it rejects (rule 8).
    server
        .delete(Resource::EndpointSlices, "default", "web-v4")
        .expect("delete slice");
    wait_backends(&agent, "10.96.0.10:80", "TCP", &[]);
    for l in run_client(&topo, probe.tcp_cmd(vip4(80), 3)) {
        assert_eq!(l.error.as_deref(), Some("ECONNREFUSED"), "{l:?}");
    }
    // The IPv6 side kept its own slice.
    assert_eq!(
        reached(&topo, &probe, vip6(80), 10),
        ["backend-0", "backend-1"]
    );
}

#[test]
fn terminating_endpoints_serve_only_while_no_endpoint_is_ready() {
    if !require_root("terminating_endpoints_serve_only_while_no_endpoint_is_ready") {
        return;
    }
    let (topo, probe) = topology(2);
    let server = ApiServer::start().expect("api server");
    let mut terminating = endpoint(1, false);
    terminating["conditions"] = json!({"ready": false, "serving": true, "terminating": true});
    server.apply(&web()).expect("web");
    server
        .apply(&slice(
            "web-v4",
            "web",
            false,
            vec![endpoint(0, false), terminating.clone()],
        ))
        .expect("slice");
    let agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    assert_eq!(
        reached(&topo, &probe, vip4(80), 20),
        ["backend-0"],
        "a ready endpoint exists: the terminating one gets no new connections"
    );
    server
        .apply(&slice("web-v4", "web", false, vec![terminating]))
        .expect("only the terminating endpoint left");
    wait_backends(&agent, "10.96.0.10:80", "TCP", &["10.244.2.2:8080"]);
    assert_eq!(
        reached(&topo, &probe, vip4(80), 20),
        ["backend-1"],
        "no ready endpoint: serving-and-terminating ones take over"
    );
}

#[test]
fn internal_traffic_policy_local_reaches_only_this_nodes_endpoints() {
    if !require_root("internal_traffic_policy_local_reaches_only_this_nodes_endpoints") {
        return;
    }
    let (topo, probe) = topology(2);
    let server = ApiServer::start().expect("api server");
    let mut remote = endpoint(1, false);
    remote["nodeName"] = json!("other-node");
    server
        .apply(&service(
            "web",
            VIP4,
            VIP6,
            json!({"internalTrafficPolicy": "Local"}),
        ))
        .expect("web");
    server
        .apply(&slice(
            "web-v4",
            "web",
            false,
            vec![endpoint(0, false), remote.clone()],
        ))
        .expect("slice");
    let agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    assert_eq!(reached(&topo, &probe, vip4(80), 30), ["backend-0"]);

    // Back to Cluster: the other node's endpoint serves too.
    server.apply(&web()).expect("web, Cluster policy");
    wait_backends(
        &agent,
        "10.96.0.10:80",
        "TCP",
        &["10.244.1.2:8080", "10.244.2.2:8080"],
    );
    assert_eq!(
        reached(&topo, &probe, vip4(80), 40),
        ["backend-0", "backend-1"]
    );
}

#[test]
fn topology_hints_keep_traffic_in_this_nodes_zone() {
    if !require_root("topology_hints_keep_traffic_in_this_nodes_zone") {
        return;
    }
    let (topo, probe) = topology(3);
    let server = ApiServer::start().expect("api server");
    let hinted = |i: usize, zone: &str| {
        let mut e = endpoint(i, false);
        e["zone"] = json!(zone);
        e["hints"] = json!({"forZones": [{"name": zone}]});
        e
    };
    server.apply(&node("zone-a")).expect("node");
    server
        .apply(&service(
            "web",
            VIP4,
            VIP6,
            json!({"trafficDistribution": "PreferClose"}),
        ))
        .expect("web");
    server
        .apply(&slice(
            "web-v4",
            "web",
            false,
            vec![
                hinted(0, "zone-a"),
                hinted(1, "zone-b"),
                hinted(2, "zone-a"),
            ],
        ))
        .expect("slice");
    let agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    assert_eq!(
        reached(&topo, &probe, vip4(80), 40),
        ["backend-0", "backend-2"],
        "only endpoints hinted for this node's zone"
    );

    // The Node moves to zone-b (its label comes from the watched Node object).
    server.apply(&node("zone-b")).expect("node relabelled");
    wait_backends(&agent, "10.96.0.10:80", "TCP", &["10.244.2.2:8080"]);
    assert_eq!(reached(&topo, &probe, vip4(80), 20), ["backend-1"]);
}

#[test]
fn dual_stack_service_uses_the_slice_of_each_family() {
    if !require_root("dual_stack_service_uses_the_slice_of_each_family") {
        return;
    }
    let (topo, probe) = topology(3);
    let server = ApiServer::start().expect("api server");
    server.apply(&web()).expect("web");
    server
        .apply(&slice("web-v4", "web", false, endpoints(&[0, 1], false)))
        .expect("v4");
    server
        .apply(&slice("web-v6", "web", true, endpoints(&[2], true)))
        .expect("v6");
    let _agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    assert_eq!(
        reached(&topo, &probe, vip4(80), 40),
        ["backend-0", "backend-1"]
    );
    let v6 = run_client(&topo, probe.tcp_cmd(vip6(80), 10));
    for l in &v6 {
        assert_eq!(l.peer.as_deref(), Some("[fd00:96::10]:80"), "{l:?}");
    }
    assert_eq!(counts(&v6).into_keys().collect::<Vec<_>>(), ["backend-2"]);
    for l in run_client(&topo, probe.udp_cmd(vip6(53), 2, 2, false)) {
        assert!(l.ok, "{l:?}");
        assert_eq!(l.backend.as_deref(), Some("backend-2"), "{l:?}");
    }
}

/// Runs short TCP clients against `to` in a loop until `stop`, returning every result.
fn traffic_until(
    topo: &Topology,
    probe: &Probe,
    to: SocketAddr,
    stop: &AtomicBool,
) -> Vec<ProbeLine> {
    let mut all = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        all.extend(run_client(topo, probe.tcp_cmd(to, 10)));
    }
    all
}

#[test]
fn expired_watch_relists_without_disturbing_traffic_and_drops_what_vanished() {
    if !require_root("expired_watch_relists_without_disturbing_traffic_and_drops_what_vanished") {
        return;
    }
    let (topo, probe) = topology(3);
    let server = ApiServer::start().expect("api server");
    serve_web(&server, &[0, 1]);
    server
        .apply(&service("old", "10.96.0.30", "fd00:96::30", json!({})))
        .expect("old");
    let mut agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    let ids = service_ids(&agent);
    let syncs = synced_lines(&agent).len();
    let lists = server.count(Resource::Services, false);

    // 1. A relist that finds what the agent already has: traffic flows throughout, nothing is written.
    let stop = AtomicBool::new(false);
    let lines = std::thread::scope(|s| {
        let traffic = s.spawn(|| traffic_until(&topo, &probe, vip4(80), &stop));
        std::thread::sleep(Duration::from_millis(500));
        server.expire_watches();
        let relisted = [
            Resource::Services,
            Resource::EndpointSlices,
            Resource::Nodes,
        ]
        .into_iter()
        .map(|r| server.wait_for_requests(r, false, 2, SYNC))
        .collect::<Result<Vec<_>, _>>();
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        let lines = traffic.join().expect("traffic thread");
        relisted.expect("every kind relisted after 410 Gone");
        lines
    });
    assert!(
        lines.len() >= 20,
        "traffic ran during the relist: {} requests",
        lines.len()
    );
    assert_eq!(
        counts(&lines).into_keys().collect::<Vec<_>>(),
        ["backend-0", "backend-1"],
        "every connection during the relist succeeded"
    );
    agent
        .wait_for_log("410 Gone", SYNC)
        .expect("the agent saw the expiry");
    // The relisted version is watched again: one relist per expiry, not a 410 loop.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        server.count(Resource::Services, false),
        lists + 1,
        "{:?}",
        server.requests()
    );
    assert_eq!(service_ids(&agent), ids, "no service was re-created");
    assert_eq!(
        synced_lines(&agent).len(),
        syncs,
        "a relist returning the same objects writes nothing:\n{}",
        agent.log()
    );

    // 2. Changes made while the agent was cut off arrive only through the relist, with no Delete event for the
    // vanished Service: it must go, web must get its new backend, and nothing else may be touched.
    server.hold_lists(Resource::Services);
    server.hold_lists(Resource::EndpointSlices);
    let lists = server.count(Resource::Services, false);
    let slice_lists = server.count(Resource::EndpointSlices, false);
    server.expire_watches();
    server
        .delete(Resource::Services, "default", "old")
        .expect("delete old");
    server
        .apply(&slice("web-v4", "web", false, endpoints(&[0, 1, 2], false)))
        .expect("add backend 2");
    server
        .wait_for_requests(Resource::Services, false, lists + 1, SYNC)
        .expect("Services relist requested");
    server
        .wait_for_requests(Resource::EndpointSlices, false, slice_lists + 1, SYNC)
        .expect("EndpointSlices relist requested");
    // kube-runtime has sent `Init` for both kinds (it does before listing) and the lists hang: a source that
    // cleared its store on `Init` would program empty backends now. The maps must stay exactly as they were.
    let web_ids: BTreeMap<String, u32> = ids
        .iter()
        .filter(|(f, _)| f.contains("0.10:") || f.contains("::10]:"))
        .map(|(f, id)| (f.clone(), *id))
        .collect();
    let until = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < until {
        let list = agent.services().expect("maps");
        assert_eq!(
            backends_of(&list, "10.96.0.10:80", "TCP", "internal"),
            Some(vec![
                "10.244.1.2:8080".to_owned(),
                "10.244.2.2:8080".to_owned()
            ]),
            "web's backends changed while the relist was pending:\n{}",
            agent.log()
        );
        let now = service_ids(&agent);
        for (f, id) in &web_ids {
            assert_eq!(now.get(f), Some(id), "{f} changed mid-relist");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        reached(&topo, &probe, vip4(80), 30),
        ["backend-0", "backend-1"],
        "while the relist is pending the datapath keeps what it had"
    );
    server.release_lists(Resource::Services);
    server.release_lists(Resource::EndpointSlices);
    wait_backends(
        &agent,
        "10.96.0.10:80",
        "TCP",
        &["10.244.1.2:8080", "10.244.2.2:8080", "10.244.3.2:8080"],
    );
    agent
        .wait_for_maps(SYNC, |l| {
            l.iter().all(|s| !s.frontend.starts_with("10.96.0.30"))
        })
        .expect("the Service deleted while the watch was down is removed by the relist");
    let after = service_ids(&agent);
    for (frontend, id) in &ids {
        if !frontend.starts_with("10.96.0.30") && !frontend.starts_with("[fd00:96::30]") {
            assert_eq!(after.get(frontend), Some(id), "{frontend} kept its id");
        }
    }
    let old_frontends = ids
        .keys()
        .filter(|f| f.contains("0.30") || f.contains("::30"))
        .count();
    let deleted: usize = synced_lines(&agent)[syncs..]
        .iter()
        .filter_map(|l| field(l, "deleted"))
        .sum();
    assert_eq!(
        deleted,
        old_frontends,
        "only the vanished Service's frontends were deleted:\n{}",
        agent.log()
    );
    assert_eq!(
        reached(&topo, &probe, vip4(80), 60),
        ["backend-0", "backend-1", "backend-2"]
    );
}

#[test]
fn dropped_watches_resume_without_relisting() {
    if !require_root("dropped_watches_resume_without_relisting") {
        return;
    }
    let (topo, probe) = topology(2);
    let server = ApiServer::start().expect("api server");
    serve_web(&server, &[0]);
    let agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    let ids = service_ids(&agent);
    let lists = server.count(Resource::EndpointSlices, false);
    let watches = server.count(Resource::EndpointSlices, true);
    server.disconnect_watches();
    server
        .wait_for_requests(Resource::EndpointSlices, true, watches + 1, SYNC)
        .expect("the watch is re-established");
    server
        .apply(&slice("web-v4", "web", false, endpoints(&[1], false)))
        .expect("update");
    wait_backends(&agent, "10.96.0.10:80", "TCP", &["10.244.2.2:8080"]);
    assert_eq!(reached(&topo, &probe, vip4(80), 10), ["backend-1"]);
    assert_eq!(
        server.count(Resource::EndpointSlices, false),
        lists,
        "a dropped watch resumes from its resourceVersion; no relist"
    );
    assert_eq!(service_ids(&agent), ids);
    let resumed = server
        .requests()
        .into_iter()
        .rfind(|r| r.resource == Resource::EndpointSlices && r.watch)
        .expect("a watch");
    let rv: u64 = resumed
        .query
        .split('&')
        .find_map(|kv| kv.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {}", resumed.query));
    assert!(rv > 0, "resumed from a version: {}", resumed.query);
}

#[test]
fn malformed_objects_from_the_api_server_are_skipped_and_the_rest_keep_working() {
    if !require_root("malformed_objects_from_the_api_server_are_skipped_and_the_rest_keep_working")
    {
        return;
    }
    let (topo, probe) = topology(1);
    let server = ApiServer::start().expect("api server");
    serve_web(&server, &[0]);
    server
        .apply_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "worse", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": "eighty"}]},
        }))
        .expect("mistyped port");
    server
        .apply_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "broken", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.300", "ports": [{"port": 80, "protocol": "TCP"}]},
        }))
        .expect("bad ClusterIP");
    server
        .apply_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "junk", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": "not a list",
        }))
        .expect("mistyped slice");
    let agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    assert_eq!(reached(&topo, &probe, vip4(80), 5), ["backend-0"]);
    let log = agent.log();
    assert!(
        log.contains("default/worse") && log.contains("spec.ports[0].port"),
        "the mistyped port is named with its field:\n{log}"
    );
    assert!(
        log.contains("default/broken") && log.contains("clusterIP"),
        "the bad ClusterIP is named:\n{log}"
    );
    assert!(
        log.contains("default/junk"),
        "the bad slice is named:\n{log}"
    );
    let list = agent.services().expect("maps");
    assert!(
        list.iter().all(|s| !s.frontend.starts_with("10.96.0.11")),
        "nothing programmed for the malformed one"
    );

    // Fixing the object through the API brings it in.
    server
        .apply(&service("worse", "10.96.0.11", "fd00:96::11", json!({})))
        .expect("fixed");
    server
        .apply(&slice("worse-v4", "worse", false, endpoints(&[0], false)))
        .expect("its slice");
    wait_backends(&agent, "10.96.0.11:80", "TCP", &["10.244.1.2:8080"]);
}

#[test]
fn nothing_is_programmed_before_services_and_endpoint_slices_are_both_listed() {
    if !require_root("nothing_is_programmed_before_services_and_endpoint_slices_are_both_listed") {
        return;
    }
    let (topo, probe) = topology(2);
    let server = ApiServer::start().expect("api server");
    serve_web(&server, &[0, 1]);
    server.hold_lists(Resource::EndpointSlices);
    let mut agent = Agent::launch_kube(&agent_bin!(), &topo, &server).expect("agent");
    server
        .wait_for_requests(Resource::Services, true, 1, SYNC)
        .expect("Services listed and watched");
    server
        .wait_for_requests(Resource::EndpointSlices, false, 1, SYNC)
        .expect("EndpointSlices list pending");
    agent
        .wait_for_log("adopted the pinned state", SYNC)
        .expect("datapath loaded");
    // Services are known now and their slices are not: for a while, nothing may be written at all.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        let list = agent.services().expect("maps");
        assert!(
            list.is_empty(),
            "programmed before the EndpointSlices were listed: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(synced_lines(&agent).is_empty(), "{}", agent.log());
    server.release_lists(Resource::EndpointSlices);
    agent
        .wait_for_log("initial sync done", SYNC)
        .expect("initial sync after both lists");
    let synced = synced_lines(&agent);
    assert_eq!(synced.len(), 1, "one initial sync:\n{}", agent.log());
    for s in agent.services().expect("maps") {
        assert!(
            !s.backends.is_empty(),
            "the first write already had the backends: {s:?}"
        );
    }
    assert_eq!(
        reached(&topo, &probe, vip4(80), 40),
        ["backend-0", "backend-1"]
    );
}

#[test]
fn restarted_kube_agent_adopts_the_maps_and_rewrites_nothing() {
    if !require_root("restarted_kube_agent_adopts_the_maps_and_rewrites_nothing") {
        return;
    }
    let (topo, probe) = topology(2);
    let server = ApiServer::start().expect("api server");
    serve_web(&server, &[0, 1]);
    let mut agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    let ids = service_ids(&agent);
    agent.kill();
    agent.restart().expect("restart");
    assert_eq!(service_ids(&agent), ids);
    let synced = synced_lines(&agent);
    assert!(
        synced.iter().all(|l| field(l, "written") == Some(0)),
        "a restart rewrites nothing that is right:\n{}",
        agent.log()
    );
    let seen: BTreeSet<String> = counts(&run_client(&topo, probe.tcp_cmd(vip4(80), 20)))
        .into_keys()
        .collect();
    assert_eq!(seen.len(), 2);
}

/// What the pinned `LB_SVC_CIDRS` holds, as sorted `addr/len`.
fn svc_cidrs(agent: &Agent) -> Vec<String> {
    let maps = lb_agent::datapath::maps::PinnedMaps::open(agent.pins()).expect("pinned maps");
    let mut out: Vec<String> = maps
        .packet
        .svc_cidrs
        .iter()
        .map(|r| {
            let (k, _) = r.expect("LB_SVC_CIDRS entry");
            let addr = lb_common::addr_from_bytes(k.data());
            let len = if addr.is_ipv4() {
                k.prefix_len() - 96
            } else {
                k.prefix_len()
            };
            format!("{addr}/{len}")
        })
        .collect();
    out.sort();
    out
}

fn wait_svc_cidrs(agent: &Agent, want: &[&str]) {
    let deadline = std::time::Instant::now() + SYNC;
    loop {
        let got = svc_cidrs(agent);
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "LB_SVC_CIDRS holds {got:?}, expected {want:?}; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn service_cidrs_from_the_api_server_make_unallocated_addresses_drop() {
    if !require_root("service_cidrs_from_the_api_server_make_unallocated_addresses_drop") {
        return;
    }
    let (topo, probe) = topology(1);
    let server = ApiServer::start().expect("api server");
    serve_web(&server, &[0]);
    let agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    let unallocated: SocketAddr = "10.96.0.99:80".parse().expect("addr");

    // No ServiceCIDR yet: the address is nobody's business (no route in the client namespace).
    assert!(svc_cidrs(&agent).is_empty());
    let before = run_client(&topo, probe.tcp_cmd(unallocated, 1));
    assert_eq!(
        before[0].error.as_deref(),
        Some("ENETUNREACH"),
        "{before:?}"
    );

    // The cluster's ServiceCIDR arrives through the watch.
    server
        .apply_value(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "ServiceCIDR",
            "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": ["10.96.0.0/16", "fd00:96::/112"]},
        }))
        .expect("ServiceCIDR");
    wait_svc_cidrs(&agent, &["10.96.0.0/16", "fd00:96::/112"]);
    for l in run_client(&topo, probe.tcp_cmd(unallocated, 2)) {
        assert_eq!(
            (l.error.as_deref(), l.stage.as_deref()),
            (Some("EPERM"), Some("connect")),
            "{l:?}"
        );
    }
    // The Service inside the CIDR keeps working.
    assert_eq!(reached(&topo, &probe, vip4(80), 4), ["backend-0"]);

    // Deleted: nothing is dropped as unallocated any more.
    server
        .delete(Resource::ServiceCidrs, "", "kubernetes")
        .expect("delete ServiceCIDR");
    wait_svc_cidrs(&agent, &[]);
    let after = run_client(&topo, probe.tcp_cmd(unallocated, 1));
    assert_eq!(after[0].error.as_deref(), Some("ENETUNREACH"), "{after:?}");
}

/// Runs `lb-agent explain <args>` against the agent's pins and returns its stdout.
fn explain(agent: &Agent, args: &[&str]) -> String {
    let out = lb_tests::Cmd::new(agent_bin!())
        .arg("explain")
        .args(args)
        .arg("--bpffs")
        .arg(agent.pins())
        .label("lb-agent-explain")
        .output(Duration::from_secs(30))
        .expect("explain runs");
    assert!(
        out.status.success(),
        "lb-agent explain {args:?} failed:\n{}",
        out.stderr
    );
    out.stdout
}

#[test]
fn explain_lists_from_the_api_server_and_compares_with_the_running_agents_maps() {
    if !require_root("explain_lists_from_the_api_server_and_compares_with_the_running_agents_maps")
    {
        return;
    }
    let (topo, probe) = topology(2);
    let server = ApiServer::start().expect("api server");
    server
        .apply_value(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "ServiceCIDR",
            "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": ["10.96.0.0/16"]},
        }))
        .expect("ServiceCIDR");
    server.apply(&node("zone-a")).expect("node");
    // internalTrafficPolicy Local: a ready local endpoint (used), a local one not ready, a ready one elsewhere.
    server
        .apply_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "mixed", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.30",
                "internalTrafficPolicy": "Local",
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": TCP_PORT}],
            },
        }))
        .expect("mixed");
    let mut not_ready = endpoint(1, false);
    not_ready["conditions"] = json!({"ready": false, "serving": false, "terminating": false});
    let mut elsewhere = endpoint(8, false);
    elsewhere["nodeName"] = json!("other-node");
    server
        .apply(&slice(
            "mixed-1",
            "mixed",
            false,
            vec![endpoint(0, false), not_ready, elsewhere],
        ))
        .expect("slice");
    let mut agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    wait_backends(&agent, "10.96.0.30:80", "TCP", &["10.244.1.2:8080"]);
    let mixed: SocketAddr = "10.96.0.30:80".parse().expect("addr");
    assert_eq!(reached(&topo, &probe, mixed, 4), ["backend-0"]);

    let kubeconfig = agent.dir().join("kubeconfig");
    let kubeconfig = kubeconfig.to_str().expect("utf-8");
    let args = [
        "default/mixed",
        "--kubeconfig",
        kubeconfig,
        "--node-name",
        NODE,
    ];
    let json_args: Vec<&str> = args.iter().copied().chain(["-o", "json"]).collect();
    let v: Value = serde_json::from_str(&explain(&agent, &json_args)).expect("json");
    assert!(
        v["source"]
            .as_str()
            .is_some_and(|s| s.contains("API server")),
        "{v}"
    );
    assert_eq!(v["zone"], "zone-a", "the Node came from the API: {v}");
    assert_eq!(v["service_cidrs"], json!(["10.96.0.0/16"]), "{v}");
    assert_eq!(v["service_cidrs_in_maps"], json!(["10.96.0.0/16"]), "{v}");
    let port = &v["ports"][0];
    let verdicts: BTreeMap<String, String> = port["local"]
        .as_array()
        .unwrap_or_else(|| panic!("the Local set is explained: {v}"))
        .iter()
        .map(|e| {
            (
                e["backend"].as_str().expect("backend").to_owned(),
                e["eligibility"].as_str().expect("eligibility").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        BTreeMap::from([
            ("10.244.1.2:8080".to_owned(), "ready".to_owned()),
            ("10.244.2.2:8080".to_owned(), "not-ready".to_owned()),
            ("10.244.9.2:8080".to_owned(), "other-node".to_owned()),
        ]),
        "{v}"
    );
    let programmed = v["maps"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(programmed.len(), 2, "both scopes of the ClusterIP: {v}");
    for p in programmed {
        assert_eq!(p["backends"], json!(["10.244.1.2:8080"]), "{v}");
        assert_eq!(p["differences"], json!([]), "{v}");
    }
    let text = explain(&agent, &args);
    assert!(
        text.contains("not used: on another node (Local policy)"),
        "{text}"
    );
    assert!(text.contains("agrees"), "{text}");

    // With the agent stopped, a change in the API is what explain sees and the maps do not hold: flagged.
    agent.kill();
    server
        .apply(&slice("mixed-1", "mixed", false, vec![endpoint(1, false)]))
        .expect("slice change");
    let text = explain(&agent, &args);
    assert!(
        text.contains("MISMATCH: model uses 10.244.2.2:8080, the maps do not"),
        "{text}"
    );
    assert!(
        text.contains("MISMATCH: the maps hold 10.244.1.2:8080, the model does not use it"),
        "{text}"
    );
}
