//! The manifests `lb-agent manifests` generates: deploy/ holds renderings of them that must match what the binary
//! renders now (each file's `Rendered by:` line is re-run), every document parses as its k8s-openapi type, and the
//! deployment keeps its promises: least-privilege RBAC, no privileged container, exactly the capabilities
//! `tests/capabilities.rs` proves, probes on the health port, `NODE_NAME` from the downward API, bpffs mounted, the
//! runtime's seccomp profile, node-critical priority, Linux nodes only, every taint tolerated.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, ResourceQuota, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_agent::cli::manifests::render_command_line;
use lb_agent::install::objects::{AGENT_CAPABILITIES, CLEANUP_CAPABILITIES, HEALTH_PORT};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The rendered files in deploy/.
fn rendered_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "deploy/ lost its renderings: {files:?}");
    files
}

/// The words after `lb-agent manifests` on a rendering's `Rendered by:` line.
fn command_of(text: &str, file: &Path) -> Vec<String> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("# Rendered by: lb-agent manifests"))
        .unwrap_or_else(|| panic!("{}: no `# Rendered by:` line", file.display()));
    line.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn deploy_holds_what_the_generator_renders_now() {
    for file in rendered_files() {
        let text = std::fs::read_to_string(&file).expect("readable");
        let words = command_of(&text, &file);
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let now =
            render_command_line(&words).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
        if now != text {
            let first = now
                .lines()
                .zip(text.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| now.lines().count().min(text.lines().count()));
            panic!(
                "{} differs from `lb-agent manifests {}` from line {}: regenerate it with that command \
                 (cargo run -p lb-agent -- manifests {} > {})\nrendered: {:?}\nin file:  {:?}",
                file.display(),
                words.join(" "),
                first + 1,
                words.join(" "),
                file.display(),
                now.lines().nth(first),
                text.lines().nth(first)
            );
        }
    }
}

/// Every document of a rendering, as JSON values.
fn documents(text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for doc in text.split("\n---\n") {
        if doc
            .lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        {
            out.push(serde_saphyr::from_str::<Value>(doc).expect("each document is YAML"));
        }
    }
    out
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{} does not parse as its type: {e}", v["kind"]))
}

#[derive(Default)]
struct Parsed {
    daemon_sets: Vec<DaemonSet>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    accounts: Vec<ServiceAccount>,
    config_maps: Vec<ConfigMap>,
    namespaces: Vec<Namespace>,
    quotas: Vec<ResourceQuota>,
    services: Vec<Service>,
    service_monitors: Vec<Value>,
}

/// Renders `words` and parses every document into its k8s-openapi type (an unknown kind fails).
fn parse(words: &[&str]) -> Parsed {
    let text = render_command_line(words).unwrap_or_else(|e| panic!("{words:?}: {e:#}"));
    let mut p = Parsed::default();
    for v in documents(&text) {
        match v["kind"].as_str() {
            Some("DaemonSet") => p.daemon_sets.push(typed(&v)),
            Some("ClusterRole") => p.roles.push(typed(&v)),
            Some("ClusterRoleBinding") => p.bindings.push(typed(&v)),
            Some("ServiceAccount") => p.accounts.push(typed(&v)),
            Some("ConfigMap") => p.config_maps.push(typed(&v)),
            Some("Namespace") => p.namespaces.push(typed(&v)),
            Some("ResourceQuota") => p.quotas.push(typed(&v)),
            Some("Service") => p.services.push(typed(&v)),
            Some("ServiceMonitor") => p.service_monitors.push(v),
            other => panic!("{words:?}: unexpected kind {other:?}"),
        }
    }
    p
}

const DEFAULT: &[&str] = &["--api-server", "192.0.2.1:6443"];

fn pod_spec(ds: &DaemonSet) -> &k8s_openapi::api::core::v1::PodSpec {
    ds.spec.template.spec.as_ref().expect("pod spec")
}

fn agent_container(ds: &DaemonSet) -> &Container {
    pod_spec(ds)
        .containers
        .iter()
        .find(|c| c.name == "lb-agent")
        .expect("an lb-agent container")
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a k8s_openapi::api::core::v1::EnvVar> {
    c.env.iter().flatten().find(|e| e.name == name)
}

#[test]
fn rbac_is_exactly_get_list_watch_on_services_endpointslices_nodes_servicecidrs() {
    let d = parse(DEFAULT);
    assert_eq!(d.roles.len(), 1);
    let mut granted = Vec::new();
    for rule in d.roles[0].rules.iter().flatten() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        assert_eq!(verbs, ["get", "list", "watch"], "rule {rule:?}");
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.push(format!("{group}/{resource}"));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        [
            "/nodes",
            "/services",
            "discovery.k8s.io/endpointslices",
            "networking.k8s.io/servicecidrs"
        ]
    );
    let b = &d.bindings[0];
    assert_eq!(b.role_ref.name, "lb-agent");
    let sa = pod_spec(&d.daemon_sets[0])
        .service_account_name
        .as_deref()
        .expect("serviceAccountName");
    assert!(
        d.accounts
            .iter()
            .any(|a| a.metadata.name.as_deref() == Some(sa))
    );
    assert!(b.subjects.iter().flatten().any(|s| s.name == sa
        && s.kind == "ServiceAccount"
        && s.namespace.as_deref() == Some("kube-system")));
}

#[test]
fn the_agent_is_unprivileged_with_exactly_the_proved_capabilities_and_runtime_default_seccomp() {
    let d = parse(DEFAULT);
    assert_eq!(d.daemon_sets.len(), 1);
    let ds = &d.daemon_sets[0];
    let pod = pod_spec(ds);
    assert_eq!(
        pod.host_network,
        Some(true),
        "NodePorts need the host network"
    );
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
    let seccomp = pod
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .expect("a pod seccomp profile");
    assert_eq!(seccomp.type_, "RuntimeDefault");
    let c = agent_container(ds);
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    // tests/capabilities.rs runs the agent with exactly AGENT_CAPABILITIES (from the generator's DaemonSet) and
    // without each of them: the rendered list must be that list.
    assert_eq!(
        caps.add.clone().unwrap_or_default(),
        AGENT_CAPABILITIES.map(str::to_owned)
    );
}

#[test]
fn the_agent_runs_on_every_linux_node_as_node_critical_and_rolls_out_in_steps() {
    let d = parse(DEFAULT);
    let ds = &d.daemon_sets[0];
    let pod = pod_spec(ds);
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("kubernetes.io/os"))
            .map(String::as_str),
        Some("linux")
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "every taint tolerated, like kube-proxy"
    );
    let rolling = ds
        .spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.as_ref())
        .expect("maxUnavailable");
    assert!(
        matches!(rolling, IntOrString::String(p) if p.ends_with('%')),
        "{rolling:?}"
    );
    let requests = agent_container(ds)
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .expect("requests");
    assert!(requests.contains_key("memory") && requests.contains_key("cpu"));
    let limits = agent_container(ds)
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref());
    assert!(
        limits.is_none(),
        "a proxy killed for memory takes the node's Services with it"
    );
    // With a selector, both are required.
    let d = parse(&[
        "--api-server",
        "192.0.2.1:6443",
        "--node-selector",
        "pool=edge",
    ]);
    let sel = pod_spec(&d.daemon_sets[0])
        .node_selector
        .clone()
        .expect("selector");
    assert_eq!(sel.get("pool").map(String::as_str), Some("edge"));
    assert_eq!(
        sel.get("kubernetes.io/os").map(String::as_str),
        Some("linux")
    );
}

#[test]
fn probes_point_at_the_health_endpoints_of_the_configured_health_address() {
    let d = parse(DEFAULT);
    let c = agent_container(&d.daemon_sets[0]);
    let text = d.config_maps[0]
        .data
        .as_ref()
        .and_then(|m| m.get("config.yaml"))
        .expect("config.yaml");
    let v: Value = serde_saphyr::from_str(text).expect("config.yaml is YAML");
    let addr = v["health-addr"].as_str().expect("health-addr");
    assert_eq!(
        addr,
        format!("0.0.0.0:{HEALTH_PORT}"),
        "kube-proxy's healthz address"
    );
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let http = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{path} probe missing"));
        assert_eq!(http.path.as_deref(), Some(path));
        assert_eq!(
            http.port,
            IntOrString::Int(i32::from(HEALTH_PORT)),
            "{path} probe port"
        );
    }
}

#[test]
fn the_api_server_address_is_given_to_the_in_cluster_client() {
    let c = |words: &[&str]| agent_container(&parse(words).daemon_sets[0]).clone();
    let given = c(DEFAULT);
    assert_eq!(
        env(&given, "KUBERNETES_SERVICE_HOST").and_then(|e| e.value.as_deref()),
        Some("192.0.2.1")
    );
    assert_eq!(
        env(&given, "KUBERNETES_SERVICE_PORT").and_then(|e| e.value.as_deref()),
        Some("6443")
    );
    // IPv6 and URLs: the bare address, as client-go and kube-rs expect it.
    let v6 = c(&["--api-server", "https://[2001:db8::1]:8443"]);
    assert_eq!(
        env(&v6, "KUBERNETES_SERVICE_HOST").and_then(|e| e.value.as_deref()),
        Some("2001:db8::1")
    );
    // in-cluster: the kubelet's own variables stay.
    let in_cluster = c(&["--api-server", "in-cluster"]);
    assert!(env(&in_cluster, "KUBERNETES_SERVICE_HOST").is_none());
    let node = env(&given, "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(node.field_path, "spec.nodeName");
    assert!(
        render_command_line(&["--api-server", "auto"]).is_err(),
        "auto needs a cluster"
    );
    assert!(render_command_line(&["--api-server", "no-port:"]).is_err());
}

#[test]
fn bpffs_cgroup_and_pod_namespaces_are_mounted_from_the_host() {
    let d = parse(DEFAULT);
    let ds = &d.daemon_sets[0];
    let c = agent_container(ds);
    let pod = pod_spec(ds);
    let host_path_of = |mount_path: &str| {
        let m = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("{mount_path} not mounted"));
        let v = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .expect("its volume");
        (m.clone(), v.host_path.as_ref().map(|h| h.path.clone()))
    };
    let (bpffs, path) = host_path_of("/sys/fs/bpf");
    assert_eq!(
        path.as_deref(),
        Some("/sys/fs/bpf"),
        "pins must outlive the pod"
    );
    assert_ne!(bpffs.read_only, Some(true), "the agent pins into it");
    assert_eq!(
        host_path_of("/sys/fs/cgroup").1.as_deref(),
        Some("/sys/fs/cgroup")
    );
    assert_eq!(host_path_of("/run/netns").1.as_deref(), Some("/run/netns"));
}

#[test]
fn the_config_map_holds_valid_agent_configs() {
    for words in [
        DEFAULT,
        &["--api-server", "192.0.2.1:6443", "--metrics"][..],
        &[
            "--api-server",
            "192.0.2.1:6443",
            "--coexist-with-kube-proxy",
        ][..],
    ] {
        let d = parse(words);
        for (name, text) in d.config_maps[0].data.iter().flatten() {
            let file = lb_agent::ops::config::parse(Path::new(name), text)
                .unwrap_or_else(|e| panic!("{words:?} {name}: {e}"));
            lb_agent::cli::check_config_file(&file).unwrap_or_else(|e| {
                panic!("{words:?} {name}: a key is not a flag of lb-agent run: {e}")
            });
        }
    }
}

/// The config file a DaemonSet's agent reads (its `--config=` argument), parsed.
fn config_of(d: &Parsed, ds: &DaemonSet) -> Value {
    let arg = agent_container(ds)
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--config=/etc/lb/"))
        .expect("--config");
    let text = &d.config_maps[0].data.as_ref().expect("data")[arg];
    serde_saphyr::from_str(text).expect("YAML")
}

#[test]
fn the_migration_runs_a_canary_beside_kube_proxy_and_lb_alone_by_node_label() {
    let d = parse(&[
        "--api-server",
        "192.0.2.1:6443",
        "--coexist-with-kube-proxy",
    ]);
    assert_eq!(d.daemon_sets.len(), 2, "lb alone and the canary");
    let by_name = |n: &str| {
        d.daemon_sets
            .iter()
            .find(|ds| ds.metadata.name.as_deref() == Some(n))
            .unwrap_or_else(|| panic!("no DaemonSet {n}"))
    };
    let (alone, canary) = (by_name("lb-agent"), by_name("lb-agent-canary"));
    let label = |ds: &DaemonSet| {
        pod_spec(ds)
            .node_selector
            .as_ref()
            .and_then(|s| s.get("lb.io/proxy"))
            .cloned()
    };
    assert_eq!(label(alone).as_deref(), Some("lb"));
    assert_eq!(label(canary).as_deref(), Some("canary"));
    // A DaemonSet's selector cannot change: lb-agent's is the same with and without the migration, so the last
    // step (rendering without --coexist-with-kube-proxy) applies over it.
    let plain = parse(DEFAULT);
    assert_eq!(alone.spec.selector, plain.daemon_sets[0].spec.selector);
    // Each selects only its own pods.
    for (ds, other) in [(alone, canary), (canary, alone)] {
        let other_labels = other
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .expect("labels");
        let selects_other = ds
            .spec
            .selector
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| other_labels.get(k) == Some(v));
        assert!(
            !selects_other,
            "{:?} selects {:?}'s pods",
            ds.metadata.name, other.metadata.name
        );
    }
    // The canary leaves kube-proxy its port and health check ports; its probes follow its own port.
    let canary_config = config_of(&d, canary);
    assert_eq!(
        canary_config["coexist-with-kube-proxy"].as_bool(),
        Some(true)
    );
    let addr = canary_config["health-addr"].as_str().expect("health-addr");
    assert!(!addr.ends_with(":10256"), "kube-proxy holds 10256: {addr}");
    let port: i32 = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("port");
    for probe in [
        &agent_container(canary).liveness_probe,
        &agent_container(canary).readiness_probe,
    ] {
        let http = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("http probe");
        assert_eq!(http.port, IntOrString::Int(port));
    }
    // lb alone has kube-proxy's port, and leaves kube-proxy's connections to netfilter until they end.
    let alone_config = config_of(&d, alone);
    assert_eq!(alone_config["health-addr"].as_str(), Some("0.0.0.0:10256"));
    assert_eq!(alone_config["pass-untracked-tcp"].as_bool(), Some(true));
    assert!(
        config_of(&plain, &plain.daemon_sets[0])
            .get("pass-untracked-tcp")
            .is_none()
    );
}

#[test]
fn metrics_stay_on_loopback_unless_asked_and_the_servicemonitor_finds_them() {
    let metrics_addr = |d: &Parsed| -> String {
        let text = d.config_maps[0].data.as_ref().expect("data")["config.yaml"].clone();
        let v: Value = serde_saphyr::from_str(&text).expect("YAML");
        v["metrics-addr"].as_str().expect("metrics-addr").to_owned()
    };
    let plain = parse(DEFAULT);
    assert!(metrics_addr(&plain).starts_with("127.0.0.1:"));
    assert!(plain.services.is_empty() && plain.service_monitors.is_empty());
    let monitored = parse(&["--api-server", "192.0.2.1:6443", "--servicemonitor"]);
    assert!(metrics_addr(&monitored).starts_with("0.0.0.0:"));
    let svc = &monitored.services[0];
    let spec = svc.spec.as_ref().expect("spec");
    assert_eq!(
        spec.cluster_ip.as_deref(),
        Some("None"),
        "headless: one endpoint per node"
    );
    let pod_labels = monitored.daemon_sets[0]
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    for (k, v) in spec.selector.iter().flatten() {
        assert_eq!(pod_labels.get(k), Some(v), "the Service selects the agents");
    }
    let port_name = spec
        .ports
        .iter()
        .flatten()
        .next()
        .and_then(|p| p.name.clone());
    let sm = &monitored.service_monitors[0];
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"].as_str(),
        port_name.as_deref()
    );
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("labels")
    {
        assert_eq!(
            svc.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(k))
                .map(String::as_str),
            v.as_str()
        );
    }
}

#[test]
fn another_namespace_is_created_privileged_and_admits_node_critical_pods() {
    let own = parse(DEFAULT);
    assert!(
        own.namespaces.is_empty() && own.quotas.is_empty(),
        "kube-system exists"
    );
    let d = parse(&["--api-server", "192.0.2.1:6443", "--namespace", "lb-system"]);
    let ns = &d.namespaces[0];
    assert_eq!(ns.metadata.name.as_deref(), Some("lb-system"));
    assert_eq!(
        ns.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-security.kubernetes.io/enforce"))
            .map(String::as_str),
        Some("privileged")
    );
    let scope = &d.quotas[0].spec.as_ref().expect("spec").scope_selector;
    let values = scope
        .as_ref()
        .and_then(|s| s.match_expressions.as_ref())
        .and_then(|e| e[0].values.clone())
        .expect("priority classes");
    assert_eq!(values, ["system-node-critical"]);
    assert_eq!(
        d.daemon_sets[0].metadata.namespace.as_deref(),
        Some("lb-system")
    );
}

#[test]
fn the_cleanup_daemon_set_waits_for_kube_proxy_cleans_and_then_shows_done() {
    let d = parse(&["--uninstall"]);
    assert_eq!(d.daemon_sets.len(), 1, "only the cleanup");
    let ds = &d.daemon_sets[0];
    let pod = pod_spec(ds);
    assert_eq!(
        pod.host_network,
        Some(true),
        "clsact filters are on the host's interfaces"
    );
    assert_eq!(pod.automount_service_account_token, Some(false));
    let init = &pod.init_containers.as_ref().expect("init containers")[0];
    assert_eq!(
        init.args.clone().unwrap_or_default(),
        ["cleanup", "--wait-for-kube-proxy"],
        "the cleanup runs before the pod is Running"
    );
    let caps = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("capabilities");
    assert_eq!(
        caps.add.clone().unwrap_or_default(),
        CLEANUP_CAPABILITIES.map(str::to_owned)
    );
    assert!(
        init.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/sys/fs/bpf")
    );
    let done = &pod.containers[0];
    assert_eq!(
        done.command.clone().unwrap_or_default(),
        ["sleep", "infinity"]
    );
    let forced = parse(&["--uninstall", "--no-wait-for-kube-proxy"]);
    let init = &pod_spec(&forced.daemon_sets[0])
        .init_containers
        .as_ref()
        .expect("init")[0];
    assert_eq!(init.args.clone().unwrap_or_default(), ["cleanup"]);
}

#[test]
fn the_image_named_is_the_one_cargo_xtask_image_builds() {
    let d = parse(DEFAULT);
    let image = agent_container(&d.daemon_sets[0])
        .image
        .clone()
        .expect("image");
    assert_eq!(
        image,
        format!("localhost/lb-agent:{}", env!("CARGO_PKG_VERSION"))
    );
    // xtask cannot depend on lb-agent (it builds it); its default tag is written the same way.
    let xtask = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/src/image.rs"),
    )
    .expect("xtask/src/image.rs");
    assert!(
        xtask.contains(r#"pub const DEFAULT_TAG: &str = concat!("localhost/lb-agent:", env!("CARGO_PKG_VERSION"));"#),
        "cargo xtask image's default tag is no longer the image lb-agent manifests names"
    );
}
