//! Observability end to end, through the real binary against a running agent: `lb-agent status` with the agent
//! and from the pins alone, kube-proxy's metrics (every one kubernetes-mixin's kube-proxy dashboard reads) with
//! samples from a real agent on the in-process API server, network programming latency from the EndpointSlice's
//! trigger time, the per-Service change log, and an unreachable API server retried with backoff and named.
//! HTTP goes to 127.0.0.1 only; nothing here sends Service traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_tests::{Agent, ApiServer, Cmd, Topology, agent_bin, require_root};
use serde_json::{Value, json};

const VIP: &str = "10.96.0.10";

fn manifest(backends: usize) -> String {
    let endpoints: String = (0..backends)
        .map(|i| {
            format!(
                "  - addresses: [10.244.{}.2]\n    conditions: {{ready: true}}\n    nodeName: test-node\n",
                i + 1
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {VIP}
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{endpoints}"#
    )
}

/// `lb-agent status [-o json] --bpffs <pins>` through the real binary.
fn status(pins: &std::path::Path, json: bool) -> String {
    let mut cmd = Cmd::new(agent_bin!()).arg("status");
    if json {
        cmd = cmd.args(["-o", "json"]);
    }
    let out = cmd
        .arg("--bpffs")
        .arg(pins)
        .label("lb-agent-status")
        .output(Duration::from_secs(30))
        .expect("lb-agent status runs");
    assert!(
        out.status.success(),
        "lb-agent status failed:\n{}",
        out.stderr
    );
    out.stdout
}

fn status_json(pins: &std::path::Path) -> Value {
    let text = status(pins, true);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("status is not JSON ({e}):\n{text}"))
}

/// One HTTP GET on loopback: (status, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    assert!(addr.ip().is_loopback(), "tests only talk HTTP to loopback");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// The value of the first sample of `metric` whose labels contain every `(key, value)`.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
        .find(|l| {
            let rest = &l[metric.len()..];
            (rest.starts_with('{') || rest.starts_with(' '))
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Polls `/metrics` until `pred` holds; the last scrape.
fn wait_metrics(
    addr: SocketAddr,
    what: &str,
    log: impl Fn() -> String,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, body)) = get(addr, "/metrics")
            && pred(&body)
        {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: /metrics never satisfied it; last:\n{:?}\nagent log:\n{}",
            get(addr, "/metrics"),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn status_shows_the_running_agent_and_then_what_the_pins_hold() {
    if !require_root("status_shows_the_running_agent_and_then_what_the_pins_hold") {
        return;
    }
    let topo = Topology::star(2).expect("topology");
    let mut agent = Agent::start(&agent_bin!(), &topo, &manifest(2)).expect("agent");
    let pins = agent.pins().to_path_buf();
    let cgroup = topo.cgroup().path().display().to_string();

    let s = status_json(&pins);
    let a = &s["agent"];
    assert_eq!(a["ready"], true, "{s:#}");
    assert_eq!(a["node"], "test-node", "{s:#}");
    assert_eq!(a["pid"].as_u64(), agent.pid().map(u64::from), "{s:#}");
    assert_eq!(a["source"]["kind"], "manifests", "{s:#}");
    assert!(
        a["source"]["location"]
            .as_str()
            .is_some_and(|l| l.ends_with("services.yaml")),
        "{s:#}"
    );
    assert_eq!(a["datapath"]["cgroup"], cgroup.as_str(), "{s:#}");
    assert_eq!(a["datapath"]["devices"], json!([]), "--devices none: {s:#}");
    assert!(
        a["datapath"]["kernel"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "{s:#}"
    );
    assert!(a["sync"]["syncs"].as_u64().unwrap_or(0) >= 1, "{s:#}");
    assert_eq!(a["sync"]["services"], 1, "{s:#}");
    assert_eq!(a["sync"]["backends"], 2, "{s:#}");
    assert_eq!(
        s["problems"],
        json!([]),
        "a healthy agent has no problems: {s:#}"
    );
    let sock = s["pins"]["links"]["sock"].as_array().expect("sock links");
    assert_eq!(sock.len(), lb_common::prog_names::SOCK_ALL.len(), "{s:#}");
    assert!(
        sock.iter().all(|l| l["cgroup"] == cgroup.as_str()),
        "the links name the topology's cgroup: {s:#}"
    );
    let maps = s["pins"]["maps"].as_array().expect("maps");
    let fill = |name: &str| {
        maps.iter()
            .find(|m| m["map"] == name)
            .map(|m| m["entries"].as_u64())
    };
    assert_eq!(fill("LB_BACKENDS"), Some(Some(2)), "{s:#}");
    assert!(
        fill("LB_CONNTRACK").is_some() && fill("LB_FRAGMENTS").is_some(),
        "every map's fill: {s:#}"
    );

    let table = status(&pins, false);
    for want in [
        "Agent:            running",
        "ready",
        "Source:           manifests",
        "Problems:         none",
    ] {
        assert!(table.contains(want), "{want:?} missing:\n{table}");
    }

    // Without the agent: the pins still answer, and the missing agent is the problem.
    agent.kill();
    let s = status_json(&pins);
    assert_eq!(s["agent"], Value::Null, "{s:#}");
    assert!(
        s["agent_unreachable"]
            .as_str()
            .is_some_and(|w| w.contains("no agent answers")),
        "{s:#}"
    );
    assert_eq!(
        s["pins"]["links"]["sock"].as_array().map(Vec::len),
        Some(8),
        "{s:#}"
    );
    assert_eq!(s["pins"]["backends"], 2, "{s:#}");
    let problems = s["problems"].as_array().expect("problems");
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.contains("follows no change"))),
        "{s:#}"
    );
    assert!(status(&pins, false).contains("NOT RUNNING"));
}

fn service() -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": VIP, "clusterIPs": [VIP],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]},
    }))
    .expect("Service")
}

/// Slice `web-1` with backends `10.244.<i>.2`, stamped with `trigger` as the EndpointSlice controller does.
fn slice(backends: &[usize], trigger: &str) -> EndpointSlice {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|i| json!({"addresses": [format!("10.244.{i}.2")], "conditions": {"ready": true}, "nodeName": "test-node"}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": trigger}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints,
    }))
    .expect("EndpointSlice")
}

/// RFC 3339 for a Unix time, as the EndpointSlice controller writes it.
fn rfc3339(unix: std::time::SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(unix)
        .expect("time")
        .to_string()
}

#[test]
fn a_kube_agent_serves_kube_proxys_metrics_logs_each_service_change_and_reports_its_watches() {
    if !require_root(
        "a_kube_agent_serves_kube_proxys_metrics_logs_each_service_change_and_reports_its_watches",
    ) {
        return;
    }
    let topo = Topology::star(2).expect("topology");
    let server = ApiServer::start().expect("api server");
    server.apply(&service()).expect("service");
    server
        .apply(&slice(&[1], &rfc3339(std::time::SystemTime::now())))
        .expect("slice");
    let mut agent = Agent::start_kube(&agent_bin!(), &topo, &server).expect("agent");
    let metrics = agent.metrics_addr().expect("metrics address");

    // An endpoint change the controller stamped 2 s ago: kube-proxy's network programming latency is measured
    // from that stamp, so the sample is at least 2 s. Stamps from before the agent started are not its latency
    // (kube-proxy ignores them too), so the agent runs for longer than that first.
    std::thread::sleep(Duration::from_secs(3));
    let stamp = std::time::SystemTime::now() - Duration::from_secs(2);
    server
        .apply(&slice(&[1, 2], &rfc3339(stamp)))
        .expect("slice update");
    agent
        .wait_for_log("Service updated", Duration::from_secs(20))
        .expect("a change line");
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("Service updated"))
        .expect("the change line");
    for want in [
        "service=default/web",
        "backends_added=10.244.2.2:8080",
        "backends_removed=-",
        "backends=2",
    ] {
        assert!(line.contains(want), "{want} missing from {line:?}");
    }
    let text = wait_metrics(
        metrics,
        "one network programming sample",
        || agent.log(),
        |t| {
            sample(
                t,
                "kubeproxy_network_programming_duration_seconds_count",
                &[],
            )
            .unwrap_or(0.0)
                >= 1.0
        },
    );
    let sum = sample(
        &text,
        "kubeproxy_network_programming_duration_seconds_sum",
        &[],
    )
    .expect("sum");
    assert!(
        (2.0..60.0).contains(&sum),
        "latency from the trigger time: {sum} s\n{text}"
    );
    let le1 = sample(
        &text,
        "kubeproxy_network_programming_duration_seconds_bucket",
        &[("le", "1.0")],
    )
    .expect("1 s bucket");
    assert_eq!(le1, 0.0, "a 2 s old change is not under 1 s:\n{text}");

    // Every metric kubernetes-mixin's kube-proxy dashboard and alerts read has samples, with their labels.
    for (metric, labels, used_by) in lb_agent::ops::metrics::KUBE_PROXY_MIXIN {
        if lb_agent::ops::metrics::FROM_THE_SCRAPE.contains(metric) {
            continue;
        }
        let line = text
            .lines()
            .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
            .unwrap_or_else(|| panic!("no sample of {metric} ({used_by}):\n{text}"));
        for l in *labels {
            assert!(
                line.contains(&format!("{l}=\"")),
                "{metric} without {l}: {line}"
            );
        }
    }
    assert!(
        sample(
            &text,
            "rest_client_requests_total",
            &[("code", "200"), ("method", "GET")]
        )
        .unwrap_or(0.0)
            >= 4.0,
        "the lists of four resources:\n{text}"
    );
    assert!(
        sample(
            &text,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            &[]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "kubeproxy_sync_proxy_rules_service_changes_total",
            &[]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            &[]
        )
        .unwrap_or(0.0)
            > 1.0e9,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
            &[]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "lb_service_sock_connects_total", &[]),
        None,
        "per-Service series are off by default"
    );

    // The status names the server and every watch.
    let s = status_json(agent.pins());
    let api = &s["agent"]["source"]["api"];
    assert_eq!(
        api["server"].as_str(),
        Some(format!("{}/", server.url().trim_end_matches('/')).as_str()),
        "{s:#}"
    );
    let watches = api["watches"].as_array().expect("watches");
    assert_eq!(watches.len(), 4, "{s:#}");
    for w in watches {
        assert_eq!(w["failures_in_a_row"], 0, "{s:#}");
        assert_eq!(w["listed"], true, "{s:#}");
    }
    assert_eq!(s["problems"], json!([]), "{s:#}");
}

#[test]
fn an_unreachable_api_server_is_retried_with_backoff_named_and_reported() {
    if !require_root("an_unreachable_api_server_is_retried_with_backoff_named_and_reported") {
        return;
    }
    let topo = Topology::star(1).expect("topology");
    let dir = std::env::temp_dir().join(format!("lb-tests-obs-{}", topo.token()));
    std::fs::create_dir_all(&dir).expect("dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let server = format!("http://127.0.0.1:{port}");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"{server}\"}}}}]\n\
             users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .expect("kubeconfig");
    let mut child = Cmd::new(agent_bin!())
        .args(["run", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--node-name", "test-node", "--devices", "none"])
        .arg("--cgroup")
        .arg(topo.cgroup().path())
        .arg("--bpffs")
        .arg(topo.bpf_dir().path())
        .args([
            "--health-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("LB_LOG", "info")
        .label("lb-agent-unreachable")
        .spawn()
        .expect("agent");
    let started = Instant::now();
    // 20 s of an API server that refuses every connection.
    std::thread::sleep(Duration::from_secs(20));
    let s = status_json(topo.bpf_dir().path());
    let log = child.stderr();
    child.kill();
    let _ = std::fs::remove_dir_all(&dir);
    let elapsed = started.elapsed();

    let watches = s["agent"]["source"]["api"]["watches"]
        .as_array()
        .expect("watches");
    assert_eq!(watches.len(), 4, "{s:#}");
    let attempts: u64 = watches
        .iter()
        .map(|w| w["errors_total"].as_u64().unwrap_or(0))
        .sum();
    // Backoff 0.8 s doubling (jittered up to half again): about 5 attempts per watch in 20 s. Retrying every
    // 0.8-1.6 s (kube-runtime's reset backoff) made 13-25 each.
    assert!(
        (4..=4 * 7).contains(&attempts),
        "{attempts} attempts in {elapsed:?} over four watches:\n{s:#}"
    );
    for w in watches {
        assert!(w["failures_in_a_row"].as_u64().unwrap_or(0) >= 3, "{s:#}");
        assert!(
            w["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("Connection refused")),
            "{s:#}"
        );
    }
    let problems = s["problems"].as_array().expect("problems");
    assert!(
        problems.iter().any(|p| p
            .as_str()
            .is_some_and(|p| p.contains(&server) && p.contains("fails"))),
        "a problem names the server: {s:#}"
    );
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot watch the API server"))
        .collect();
    assert!(!warnings.is_empty(), "{log}");
    assert!(
        warnings
            .iter()
            .all(|l| l.contains(&format!("server={server}"))
                && l.contains("resource=")
                && l.contains("retry_in=")),
        "every warning names the server, the resource and the next retry:\n{log}"
    );
    // Quiet between doublings: at most the 1st, 2nd and 4th failure of each watch warn in this time.
    assert!(
        warnings.len() <= 4 * 3,
        "{} warnings:\n{log}",
        warnings.len()
    );
    assert!(
        !log.contains("kube_client"),
        "kube-rs's unnamed per-request errors are filtered:\n{log}"
    );
    assert!(
        log.lines().count() < 40,
        "{} log lines:\n{log}",
        log.lines().count()
    );
}

/// `lb-agent trace <args> tcp <src> <dst>` through the real binary: its JSON answer.
fn trace(args: &[&str], src: &str, dst: &str) -> Value {
    let out = Cmd::new(agent_bin!())
        .arg("trace")
        .args(args)
        .args(["tcp", src, dst])
        .label("lb-agent-trace")
        .output(Duration::from_secs(60))
        .expect("lb-agent trace runs");
    assert!(
        out.status.success(),
        "lb-agent trace {args:?} {dst} failed:\n{}",
        out.stderr
    );
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("trace output is not JSON ({e}):\n{}", out.stdout))
}

/// Conntrack entries, the trace record and the verdict counters of the live pins: what a trace must not touch.
fn live_runtime_state(pins: &std::path::Path) -> (usize, lb_common::TraceValue, Vec<u64>) {
    let maps = lb_agent::datapath::packet_maps::PacketMaps::open(pins).expect("live packet maps");
    let conntrack = lb_agent::datapath::map_fill::map_fill(pins)
        .into_iter()
        .find(|m| m.map == lb_common::map_names::CONNTRACK)
        .map(|m| m.entries as usize)
        .expect("LB_CONNTRACK");
    (
        conntrack,
        maps.trace_record().expect("trace record"),
        maps.reason_counts().expect("verdict counters"),
    )
}

#[test]
fn trace_runs_on_the_live_nodes_state_names_the_service_and_touches_nothing_live() {
    if !require_root(
        "trace_runs_on_the_live_nodes_state_names_the_service_and_touches_nothing_live",
    ) {
        return;
    }
    let topo = Topology::star(2).expect("topology");
    let agent = Agent::start_with_args(
        &agent_bin!(),
        &topo,
        &manifest(2),
        &["--service-cidrs", "10.96.0.0/16"],
    )
    .expect("agent");
    let pins = agent.pins().to_str().expect("utf-8").to_owned();
    let before = live_runtime_state(agent.pins());
    let client = "198.51.100.7:40000";

    // The default source: the node's pins.
    let t = trace(&["--bpffs", &pins], client, &format!("{VIP}:80"));
    assert_eq!(t["verdict"], "forward", "{t}");
    assert_eq!(t["reason"], "new-flow", "{t}");
    assert_eq!(
        t["service"], "default/web:http",
        "the Service and port it matched: {t}"
    );
    assert_eq!(t["kind"], "ClusterIP", "{t}");
    assert!(
        ["10.244.1.2:8080", "10.244.2.2:8080"].contains(&t["backend"].as_str().unwrap_or("")),
        "{t}"
    );
    assert!(
        t["source"].as_str().is_some_and(|s| s.contains(&pins)),
        "{t}"
    );
    // An address in the service CIDR that no Service holds: dropped on the node, so in the trace.
    let t = trace(&["--bpffs", &pins], client, "10.96.0.99:80");
    assert_eq!(
        (&t["verdict"], &t["reason"]),
        (&json!("drop"), &json!("unallocated-cluster-ip")),
        "{t}"
    );
    assert_eq!(t.get("service"), None, "{t}");
    // A port the Service does not define.
    let t = trace(&["--bpffs", &pins], client, &format!("{VIP}:81"));
    assert_eq!(t["reason"], "unknown-port", "{t}");
    // The node's state changes, the trace follows: one backend left.
    agent.write_manifest(&manifest(1)).expect("manifest");
    agent
        .wait_for_maps(Duration::from_secs(20), |l| {
            l.iter().all(|s| s.backends.len() == 1)
        })
        .expect("one backend");
    let t = trace(
        &["--bpffs", &pins, "--sweep", "32"],
        client,
        &format!("{VIP}:80"),
    );
    assert_eq!(t["backends"], json!(["10.244.1.2:8080"]), "{t}");
    assert_eq!(
        live_runtime_state(agent.pins()),
        before,
        "conntrack, the trace record and the counters of the node are untouched"
    );

    // From objects: the same manifest without the service CIDRs passes the unallocated address (what the old
    // trace said); with `--service-cidrs` it drops, as the node does.
    let manifests = agent.dir().join("services.yaml");
    let manifests = manifests.to_str().expect("utf-8");
    let objects = ["--manifests", manifests, "--node-name", "test-node"];
    let t = trace(&objects, client, "10.96.0.99:80");
    assert_eq!(t["verdict"], "pass", "{t}");
    let t = trace(
        &[&objects[..], &["--service-cidrs", "10.96.0.0/16"]].concat(),
        client,
        "10.96.0.99:80",
    );
    assert_eq!(t["reason"], "unallocated-cluster-ip", "{t}");
    let t = trace(&objects, client, &format!("{VIP}:80"));
    assert_eq!(
        (&t["service"], &t["backend"]),
        (&json!("default/web:http"), &json!("10.244.1.2:8080")),
        "{t}"
    );
}

#[test]
fn trace_lists_the_objects_from_the_api_server() {
    if !require_root("trace_lists_the_objects_from_the_api_server") {
        return;
    }
    let topo = Topology::star(1).expect("topology");
    let server = ApiServer::start().expect("api server");
    server.apply(&service()).expect("service");
    server
        .apply(&slice(&[1, 2], &rfc3339(std::time::SystemTime::now())))
        .expect("slice");
    let dir = std::env::temp_dir().join(format!("lb-tests-trace-{}", topo.token()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let t = trace(
        &[
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--node-name",
            "test-node",
            "--sweep",
            "32",
        ],
        "198.51.100.7:40000",
        &format!("{VIP}:80"),
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(t["verdict"], "forward", "{t}");
    assert_eq!(t["service"], "default/web:http", "{t}");
    assert_eq!(
        t["backends"],
        json!(["10.244.1.2:8080", "10.244.2.2:8080"]),
        "{t}"
    );
    assert!(
        t["source"]
            .as_str()
            .is_some_and(|s| s.contains(&server.url().trim_end_matches('/').to_string())),
        "{t}"
    );
}

/// `lb-agent stats -o json --bpffs <pins>` through the real binary.
fn stats_json(pins: &std::path::Path) -> Value {
    let out = Cmd::new(agent_bin!())
        .args(["stats", "-o", "json", "--bpffs"])
        .arg(pins)
        .label("lb-agent-stats")
        .output(Duration::from_secs(30))
        .expect("lb-agent stats runs");
    assert!(
        out.status.success(),
        "lb-agent stats failed:\n{}",
        out.stderr
    );
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stats is not JSON ({e}):\n{}", out.stdout))
}

/// The count `lb-agent stats -o json` gives a socket-LB refusal reason (0 when absent).
fn refusals(stats: &Value, reason: &str) -> u64 {
    stats["socket_refusals_by_reason"]
        .as_array()
        .unwrap_or_else(|| panic!("no socket_refusals_by_reason in {stats:#}"))
        .iter()
        .find(|r| r[0] == reason)
        .and_then(|r| r[1].as_u64())
        .unwrap_or(0)
}

#[test]
fn socket_lb_refusals_are_counted_by_reason() {
    if !require_root("socket_lb_refusals_are_counted_by_reason") {
        return;
    }
    // Rule 8 at the socket: an unallocated address of a service CIDR fails with EPERM, a ClusterIP on a port its
    // Service does not define with ECONNREFUSED. Both used to move no counter at all.
    let probe = lb_tests::probe!();
    let topo = Topology::star(1).expect("topology");
    let agent = Agent::start_with_args(
        &agent_bin!(),
        &topo,
        &manifest(1),
        &["--service-cidrs", "10.96.0.0/16"],
    )
    .expect("agent");
    let pins = agent.pins().to_path_buf();
    let before = stats_json(&pins);
    assert_eq!(refusals(&before, "unallocated-cluster-ip"), 0, "{before:#}");
    assert_eq!(refusals(&before, "unknown-port"), 0, "{before:#}");

    let run = |to: &str, count: usize| {
        topo.in_client(probe.tcp_cmd(to.parse().expect("address"), count))
            .run(Duration::from_secs(60))
            .expect("client run")
            .probe_lines()
            .expect("client output")
    };
    for l in run("10.96.0.99:80", 2) {
        assert_eq!(l.error.as_deref(), Some("EPERM"), "{l:?}");
    }
    for l in run(&format!("{VIP}:81"), 3) {
        assert_eq!(l.error.as_deref(), Some("ECONNREFUSED"), "{l:?}");
    }

    let after = stats_json(&pins);
    assert_eq!(refusals(&after, "unallocated-cluster-ip"), 2, "{after:#}");
    assert_eq!(refusals(&after, "unknown-port"), 3, "{after:#}");
    assert_eq!(refusals(&after, "no-endpoints"), 0, "{after:#}");
    let metrics = agent.metrics_addr().expect("metrics address");
    wait_metrics(
        metrics,
        "lb_socket_refusals_total by reason",
        || agent.log(),
        |text| {
            sample(
                text,
                "lb_socket_refusals_total",
                &[("reason", "unallocated-cluster-ip")],
            ) == Some(2.0)
                && sample(
                    text,
                    "lb_socket_refusals_total",
                    &[("reason", "unknown-port")],
                ) == Some(3.0)
        },
    );
}
