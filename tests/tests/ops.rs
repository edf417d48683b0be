//! Operating the agent, end to end with the real agent: `/healthz` and `/readyz`, a `healthCheckNodePort` server,
//! `/metrics` after real traffic, the config file's live reload, and the operator CLI on the real pinned maps (with
//! and without a running agent). HTTP goes to 127.0.0.1 only; Service traffic only between the namespaces the
//! topology creates.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lb_tests::{Agent, Cmd, Topology, agent_bin, probe, require_root};
use serde_json::Value;

const VIP: &str = "10.96.0.10";
const PORT: u16 = 8080;

/// A ClusterIP Service `default/web` (80 -> 8080 `http`) with `backends` endpoints of the star topology on
/// `node`, plus, when `hc_port` is set, the same as a LoadBalancer with `externalTrafficPolicy: Local` and that
/// `healthCheckNodePort`.
fn web(backends: usize, node: &str, hc_port: Option<u16>) -> String {
    let lb = match hc_port {
        Some(p) => format!(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {p}\n"
        ),
        None => "  type: ClusterIP\n".into(),
    };
    let node_port = if hc_port.is_some() {
        ", nodePort: 30080"
    } else {
        ""
    };
    let mut endpoints = String::new();
    for i in 0..backends {
        endpoints.push_str(&format!(
            "  - addresses: [10.244.{}.2]\n    conditions: {{ready: true}}\n    nodeName: {node}\n",
            i + 1
        ));
    }
    if endpoints.is_empty() {
        endpoints = "  []\n".into();
    }
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
{lb}  clusterIP: {VIP}
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: {PORT}{node_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: {PORT}}}]
endpoints:
{endpoints}"#
    )
}

/// One HTTP GET on loopback: (status, body). Errors (refused, timeout) come back as `Err`.
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
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `path` until `pred(status, body)` holds.
fn wait_http(
    addr: SocketAddr,
    path: &str,
    what: &str,
    pred: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = get(addr, path);
        if let Ok((status, body)) = &got
            && pred(*status, body)
        {
            return (*status, body.clone());
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {path} on {addr} last answered {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A port free on loopback right now (for a healthCheckNodePort the test then asks the agent to open).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `lb-agent-under-test <args> --bpffs <pins>`; panics with its stderr when it fails.
fn cli(pins: &std::path::Path, args: &[&str]) -> String {
    let out = Cmd::new(agent_bin!())
        .args(args)
        .arg("--bpffs")
        .arg(pins)
        .label("lb-agent-cli")
        .output(Duration::from_secs(30))
        .expect("cli runs");
    assert!(
        out.status.success(),
        "lb-agent {args:?} failed:\n{}",
        out.stderr
    );
    out.stdout
}

fn cli_json(pins: &std::path::Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let text = cli(pins, &a);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("lb-agent {args:?}: not JSON ({e}):\n{text}"))
}

#[test]
fn healthz_and_readyz_answer_and_ready_follows_the_first_sync() {
    if !require_root("healthz_and_readyz_answer_and_ready_follows_the_first_sync") {
        return;
    }
    let topo = Topology::star(1).expect("topology");
    let agent = Agent::start(&agent_bin!(), &topo, &web(1, "test-node", None)).expect("agent");
    let addr = agent.health_addr().expect("health address");
    let (status, body) = get(addr, "/healthz").expect("healthz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(addr, "/readyz").expect("readyz");
    assert_eq!(status, 200, "ready after the initial sync: {body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["ready"], true);
    assert!(v["lastSyncMs"].as_u64().unwrap_or(0) > 0, "{body}");
    assert_eq!(get(addr, "/nope").expect("404").0, 404);
}

#[test]
fn readyz_is_unavailable_until_the_first_sync() {
    if !require_root("readyz_is_unavailable_until_the_first_sync") {
        return;
    }
    // An agent whose source never answers (an API server address on loopback where nothing listens) loads and
    // attaches the datapath but never completes a first sync: alive, not ready.
    let topo = Topology::star(1).expect("topology");
    let dir = std::env::temp_dir().join(format!("lb-tests-ops-{}", topo.token()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://127.0.0.1:{}\"}}}}]\n\
             users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
            free_port()
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
        .label("lb-agent-unsynced")
        .spawn()
        .expect("agent");
    // The log goes to stderr; poll it for the bound address.
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        if let Some(l) = child
            .stderr()
            .lines()
            .find(|l| l.contains("health server listening"))
        {
            break l.to_owned();
        }
        assert!(
            child.try_wait().expect("status").is_none() && Instant::now() < deadline,
            "no health server line:\n{}",
            child.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    wait_http(addr, "/healthz", "alive while unsynced", |s, _| s == 200);
    // Give it time to load and attach (and fail to list); it must still not claim readiness.
    std::thread::sleep(Duration::from_secs(2));
    let (status, body) = get(addr, "/readyz").expect("readyz");
    assert_eq!(
        status,
        503,
        "not ready before any sync: {body}\n{}",
        child.stderr()
    );
    assert!(!child.stderr().contains("initial sync done"));
    child.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn health_check_node_port_reports_local_endpoints_and_503_without_them() {
    if !require_root("health_check_node_port_reports_local_endpoints_and_503_without_them") {
        return;
    }
    let hc = free_port();
    let topo = Topology::star(2).expect("topology");
    let agent = Agent::start(&agent_bin!(), &topo, &web(2, "test-node", Some(hc))).expect("agent");
    let addr: SocketAddr = ([127, 0, 0, 1], hc).into();
    let (_, body) = wait_http(addr, "/", "two local endpoints", |s, _| s == 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
    );

    // The endpoints move to another node: the port stays open and answers 503 with zero.
    agent
        .write_manifest(&web(2, "other-node", Some(hc)))
        .expect("manifest");
    let (_, body) = wait_http(addr, "/", "no local endpoint", |s, _| s == 503);
    assert!(body.contains("\"localEndpoints\":0"), "{body}");

    // A ClusterIP Service needs no health check: the server closes.
    agent
        .write_manifest(&web(2, "test-node", None))
        .expect("manifest");
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(addr, "/").is_ok() {
        assert!(
            Instant::now() < deadline,
            "health check port {hc} still open:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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

#[test]
fn metrics_and_cli_show_real_counters_after_real_traffic() {
    if !require_root("metrics_and_cli_show_real_counters_after_real_traffic") {
        return;
    }
    let probe = probe!();
    let mut topo = Topology::star(2).expect("topology");
    topo.serve(&probe, &[PORT], &[]).expect("backends");
    // Per-frontend and per-backend series are opt-in (their count grows with the cluster).
    let mut agent = Agent::start_with_args(
        &agent_bin!(),
        &topo,
        &web(2, "test-node", None),
        &["--service-metrics", "per-frontend"],
    )
    .expect("agent");
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("vip");
    let lines = topo
        .in_client(probe.tcp_cmd(vip, 20))
        .run(Duration::from_secs(60))
        .expect("client")
        .probe_lines()
        .expect("client output");
    assert_eq!(lines.len(), 20);
    assert!(lines.iter().all(|l| l.ok), "{lines:?}");

    // Metrics: the socket LB's connects for default/web:http, by name and frontend.
    let addr = agent.metrics_addr().expect("metrics address");
    let labels = [
        ("namespace", "default"),
        ("name", "web"),
        ("port", "http"),
        ("frontend", "10.96.0.10:80"),
        ("scope", "internal"),
    ];
    let (_, text) = wait_http(addr, "/metrics", "connects counted", |s, body| {
        s == 200 && sample(body, "lb_service_sock_connects_total", &labels).unwrap_or(0.0) >= 20.0
    });
    assert_eq!(
        sample(&text, "lb_programmed_frontends", &[]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "lb_programmed_backends", &[]),
        Some(2.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "kubeproxy_sync_proxy_rules_duration_seconds_count",
            &[]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "lb_map_entries", &[("map", "LB_SERVICES")]),
        Some(2.0),
        "{text}"
    );
    assert!(
        sample(&text, "lb_map_capacity", &[("map", "LB_SERVICES")]).unwrap_or(0.0) > 0.0,
        "{text}"
    );
    let per_backend: f64 = ["10.244.1.2:8080", "10.244.2.2:8080"]
        .iter()
        .map(|b| sample(&text, "lb_backend_sock_connects_total", &[("backend", b)]).unwrap_or(0.0))
        .sum();
    assert!(per_backend >= 20.0, "{text}");

    // A change through the file is a programming-latency sample.
    agent
        .write_manifest(&web(1, "test-node", None))
        .expect("manifest");
    wait_http(
        addr,
        "/metrics",
        "programming latency observed",
        |_, body| {
            sample(body, "lb_change_programming_duration_seconds_count", &[]).unwrap_or(0.0) >= 1.0
                && sample(body, "lb_programmed_backends", &[]) == Some(1.0)
        },
    );
    agent
        .write_manifest(&web(2, "test-node", None))
        .expect("manifest");
    agent
        .wait_for_maps(Duration::from_secs(20), |l| {
            l.iter().all(|s| s.backends.len() == 2)
        })
        .expect("two backends again");

    // The CLI, with the agent running and after it is gone (everything it reads is pinned).
    let pins = agent.pins().to_path_buf();
    for running in [true, false] {
        if !running {
            agent.kill();
        }
        let services = cli(&pins, &["services"]);
        assert!(
            services.contains("default/web:http"),
            "services names the Service:\n{services}"
        );
        let stats = cli_json(&pins, &["stats"]);
        let row = stats["services"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["scope"] == "internal"))
            .unwrap_or_else(|| panic!("no internal service in {stats}"));
        assert_eq!(row["service"], "default/web:http");
        assert_eq!(row["kind"], "ClusterIP");
        assert!(
            row["counters"]["lb_service_sock_connects"]
                .as_u64()
                .unwrap_or(0)
                >= 20,
            "{row}"
        );
        assert!(
            stats["maps"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["map"] == "LB_SVC_NAMES")),
            "{stats}"
        );

        let backends = cli_json(&pins, &["backends"]);
        let addrs: Vec<&str> = backends
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|b| b["address"].as_str())
            .collect();
        assert!(
            addrs.contains(&"10.244.1.2:8080") && addrs.contains(&"10.244.2.2:8080"),
            "{backends}"
        );
        assert!(
            backends
                .as_array()
                .expect("list")
                .iter()
                .all(|b| b["services"].as_array().is_some_and(|s| s.len() == 2)),
            "each backend serves both scopes: {backends}"
        );

        let tables = cli_json(&pins, &["maglev", "10.96.0.10:80/TCP"]);
        let tables = tables.as_array().expect("list");
        assert_eq!(tables.len(), 2, "one table per scope: {tables:?}");
        for t in tables {
            assert_eq!(t["service"], "default/web:http");
            let size = t["size"].as_u64().expect("size");
            assert!(size >= 251, "{t}");
            let slots: u64 = t["backends"]
                .as_array()
                .expect("backends")
                .iter()
                .map(|b| b["slots"].as_u64().unwrap_or(0))
                .sum();
            assert_eq!(slots, size, "every slot belongs to a backend: {t}");
        }
        let id = tables[0]["service_id"].as_u64().expect("id").to_string();
        let by_id = cli(&pins, &["maglev", &id]);
        assert!(by_id.contains("table size"), "{by_id}");

        // explain agrees with the maps for this manifest.
        let manifest = agent.dir().join("services.yaml");
        let explain = cli_json(
            &pins,
            &[
                "explain",
                "default/web",
                "--manifests",
                manifest.to_str().expect("utf-8"),
                "--node-name",
                "test-node",
            ],
        );
        let programmed = explain["maps"]
            .as_array()
            .unwrap_or_else(|| panic!("maps compared: {explain}"));
        assert_eq!(programmed.len(), 2, "{explain}");
        for p in programmed {
            assert_eq!(p["differences"], serde_json::json!([]), "{explain}");
        }
    }
}

#[test]
fn explain_flags_what_the_maps_do_not_hold() {
    if !require_root("explain_flags_what_the_maps_do_not_hold") {
        return;
    }
    let topo = Topology::star(2).expect("topology");
    let agent = Agent::start(&agent_bin!(), &topo, &web(1, "test-node", None)).expect("agent");
    // A manifest the agent has not seen: one more endpoint than the maps hold.
    let other = agent.dir().join("other.yaml");
    std::fs::write(&other, web(2, "test-node", None)).expect("write");
    let text = cli(
        agent.pins(),
        &[
            "explain",
            "default/web",
            "--manifests",
            other.to_str().expect("utf-8"),
            "--node-name",
            "test-node",
        ],
    );
    assert!(
        text.contains("MISMATCH: model uses 10.244.2.2:8080, the maps do not"),
        "{text}"
    );
    assert!(text.contains("used: ready"), "{text}");
}

#[test]
fn conntrack_lists_entries_or_says_it_is_not_available() {
    if !require_root("conntrack_lists_entries_or_says_it_is_not_available") {
        return;
    }
    let topo = Topology::star(1).expect("topology");
    let agent = Agent::start(&agent_bin!(), &topo, &web(1, "test-node", None)).expect("agent");
    let out = Cmd::new(agent_bin!())
        .args(["conntrack", "-o", "json", "--proto", "tcp", "--bpffs"])
        .arg(agent.pins())
        .label("lb-agent-conntrack")
        .output(Duration::from_secs(30))
        .expect("cli runs");
    if agent.pins().join(lb_common::map_names::CONNTRACK).exists() {
        assert!(out.status.success(), "{}", out.stderr);
        let v: Value = serde_json::from_str(&out.stdout).expect("json");
        assert!(v.is_array(), "{v}");
    } else {
        assert!(!out.status.success());
        assert!(out.stderr.contains("not loaded"), "{}", out.stderr);
    }
}

#[test]
fn config_file_changes_apply_live_or_say_they_need_a_restart() {
    if !require_root("config_file_changes_apply_live_or_say_they_need_a_restart") {
        return;
    }
    let topo = Topology::star(1).expect("topology");
    let dir = std::env::temp_dir().join(format!("lb-tests-config-{}", topo.token()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("lb.yaml");
    std::fs::write(&config, "algorithm: maglev\nmax-affinity: 65536\n").expect("config");
    let mut agent = Agent::start_with_args(
        &agent_bin!(),
        &topo,
        &web(1, "test-node", None),
        &["--config", config.to_str().expect("utf-8")],
    )
    .expect("agent");
    assert!(
        agent
            .services()
            .expect("maps")
            .iter()
            .all(|s| s.algorithm == "maglev")
    );

    let tmp = dir.join(".lb.yaml.tmp");
    std::fs::write(&tmp, "algorithm: random\nmax-affinity: 1024\n").expect("config");
    std::fs::rename(&tmp, &config).expect("rename");
    agent
        .wait_for_log("needs a restart", Duration::from_secs(20))
        .expect("restart-only setting named");
    agent
        .wait_for_maps(Duration::from_secs(20), |l| {
            !l.is_empty() && l.iter().all(|s| s.algorithm == "random")
        })
        .expect("the default algorithm changed live");
    assert!(
        agent.log().contains("setting=max-affinity"),
        "{}",
        agent.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// kube-proxy's own config file given to `--config`: the agent starts on it, logs the settings it took from it
/// and, in one warning, the fields it does not apply; the command line's flags beat the file's values.
#[test]
fn a_kube_proxy_configuration_file_is_read_and_its_unapplied_fields_named() {
    if !require_root("a_kube_proxy_configuration_file_is_read_and_its_unapplied_fields_named") {
        return;
    }
    let topo = Topology::star(1).expect("topology");
    let dir = std::env::temp_dir().join(format!("lb-tests-kpconfig-{}", topo.token()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("config.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n\
         hostnameOverride: another-node\nhealthzBindAddress: 127.0.0.1:1\nconntrack:\n  maxPerCore: 1024\n  \
         tcpEstablishedTimeout: 2h0m0s\niptables: {masqueradeAll: true}\nclusterCIDR: 10.244.0.0/16\n",
    )
    .expect("config");
    let agent = Agent::start_with_args(
        &agent_bin!(),
        &topo,
        &web(1, "test-node", None),
        &["--config", config.to_str().expect("utf-8")],
    )
    .expect("an agent started on a KubeProxyConfiguration");
    let log = agent.log();
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{log}"))
            .to_owned()
    };
    let settings = line("KubeProxyConfiguration read as these lb settings");
    assert!(
        settings.contains("conntrack-max-per-core")
            && settings.contains("conntrack-tcp-timeout-established")
            && settings.contains("localhost-nodeports"),
        "{settings}"
    );
    let warning = line("kube-proxy settings lb does not apply");
    assert!(
        warning.contains("WARN")
            && !warning.contains("conntrack.tcpEstablishedTimeout")
            && warning.contains("iptables.masqueradeAll")
            && !warning.contains("hostnameOverride"),
        "{warning}"
    );
    assert!(
        log.contains("conntrack map:") && log.contains("--max-conntrack"),
        "maxPerCore sized the conntrack map:\n{log}"
    );
    // The test's own --health-addr 127.0.0.1:0 beats the file's address.
    let addr = agent.health_addr().expect("health address");
    assert_ne!(
        addr.port(),
        1,
        "the flag beats the file's healthzBindAddress"
    );
    assert_eq!(get(addr, "/readyz").expect("readyz").0, 200);
    assert!(
        agent
            .services()
            .expect("maps")
            .iter()
            .any(|s| s.frontend.starts_with(VIP)),
        "the Service is programmed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
