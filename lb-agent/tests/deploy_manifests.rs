//! Every YAML in `deploy/` parses into its k8s-openapi type, and the deployment keeps its promises: least-privilege
//! RBAC, no privileged container, probes on the health port, `NODE_NAME` from the downward API, bpffs mounted.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every `*.yaml` in deploy/, as (file, JSON value).
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in deploy/");
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        let mut doc = String::new();
        let mut flush = |doc: &mut String| {
            if doc
                .lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            {
                let v: Value = serde_saphyr::from_str(doc)
                    .unwrap_or_else(|e| panic!("{}: not YAML: {e}", f.display()));
                out.push((f.display().to_string(), v));
            }
            doc.clear();
        };
        for line in text.lines() {
            if line.trim_end() == "---" {
                flush(&mut doc);
            } else {
                doc.push_str(line);
                doc.push('\n');
            }
        }
        flush(&mut doc);
    }
    out
}

fn typed<T: serde::de::DeserializeOwned>(file: &str, v: &Value) -> T {
    serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse as its type: {e}", v["kind"]))
}

struct Deploy {
    daemonsets: Vec<DaemonSet>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    accounts: Vec<ServiceAccount>,
    config_maps: Vec<ConfigMap>,
}

fn deploy() -> Deploy {
    let mut d = Deploy {
        daemonsets: vec![],
        roles: vec![],
        bindings: vec![],
        accounts: vec![],
        config_maps: vec![],
    };
    for (file, v) in documents() {
        match v["kind"].as_str() {
            Some("DaemonSet") => d.daemonsets.push(typed(&file, &v)),
            Some("ClusterRole") => d.roles.push(typed(&file, &v)),
            Some("ClusterRoleBinding") => d.bindings.push(typed(&file, &v)),
            Some("ServiceAccount") => d.accounts.push(typed(&file, &v)),
            Some("ConfigMap") => d.config_maps.push(typed(&file, &v)),
            Some("Namespace") => {
                typed::<Namespace>(&file, &v);
            }
            other => panic!("{file}: unexpected kind {other:?}"),
        }
    }
    d
}

fn pod_spec(ds: &DaemonSet) -> &k8s_openapi::api::core::v1::PodSpec {
    ds.spec.template.spec.as_ref().expect("pod spec")
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = pod_spec(ds);
    spec.containers
        .iter()
        .find(|c| c.name == "lb-agent")
        .expect("an lb-agent container")
}

#[test]
fn rbac_is_exactly_get_list_watch_on_services_endpointslices_nodes_servicecidrs() {
    let d = deploy();
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
    // The binding gives that role to the DaemonSet's ServiceAccount.
    let b = &d.bindings[0];
    assert_eq!(b.role_ref.name, "lb-agent");
    let ds = &d.daemonsets[0];
    let pod = pod_spec(ds);
    let sa = pod
        .service_account_name
        .as_deref()
        .expect("serviceAccountName");
    assert!(
        d.accounts
            .iter()
            .any(|a| a.metadata.name.as_deref() == Some(sa))
    );
    assert!(
        b.subjects
            .iter()
            .flatten()
            .any(|s| s.name == sa && s.kind == "ServiceAccount")
    );
}

#[test]
fn no_container_is_privileged_and_capabilities_are_listed() {
    let d = deploy();
    for ds in &d.daemonsets {
        let pod = pod_spec(ds);
        assert_eq!(
            pod.host_network,
            Some(true),
            "NodePorts need the host network"
        );
        assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
        for c in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            let sc = c.security_context.as_ref().expect("securityContext");
            assert_ne!(sc.privileged, Some(true), "{} is privileged", c.name);
            let caps = sc.capabilities.as_ref().expect("capabilities");
            assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
            let add = caps.add.clone().unwrap_or_default();
            // What the root test tests/tests/capabilities.rs shows the agent needs (it runs the agent with
            // exactly this list, and without each of them).
            for needed in ["SYS_ADMIN", "NET_ADMIN"] {
                assert!(
                    add.iter().any(|a| a == needed),
                    "{} lacks CAP_{needed}",
                    c.name
                );
            }
        }
    }
}

#[test]
fn probes_point_at_the_health_endpoints() {
    let d = deploy();
    let c = agent_container(&d.daemonsets[0]);
    let health_port = d
        .config_maps
        .iter()
        .filter_map(|cm| cm.data.as_ref()?.get("config.yaml"))
        .find_map(|text| {
            let v: Value = serde_saphyr::from_str(text).expect("config.yaml is YAML");
            let addr = v["health-addr"].as_str()?.to_owned();
            addr.rsplit_once(':')?.1.parse::<i32>().ok()
        })
        .unwrap_or(10256);
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let http = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{path} probe missing"));
        assert_eq!(http.path.as_deref(), Some(path));
        let port = match &http.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .expect("named port"),
        };
        assert_eq!(port, health_port, "{path} probe port");
    }
}

#[test]
fn node_name_comes_from_the_downward_api_and_bpffs_is_mounted() {
    let d = deploy();
    let ds = &d.daemonsets[0];
    let c = agent_container(ds);
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");

    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("/sys/fs/bpf mounted");
    let pod = pod_spec(ds);
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the bpffs volume");
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/bpf"),
        "pins must live on the host's bpffs to outlive the pod"
    );
    assert_ne!(mount.read_only, Some(true), "the agent pins into it");
    assert!(
        pod.volumes.iter().flatten().any(|v| v
            .host_path
            .as_ref()
            .is_some_and(|h| h.path == "/sys/fs/cgroup")),
        "the cgroup v2 root is mounted"
    );
}

#[test]
fn the_config_map_is_a_valid_agent_config() {
    let d = deploy();
    let text = d
        .config_maps
        .iter()
        .find_map(|cm| cm.data.as_ref()?.get("config.yaml").cloned())
        .expect("config.yaml in a ConfigMap");
    let file =
        lb_agent::ops::config::parse(Path::new("deploy/config.yaml"), &text).expect("parses");
    assert!(file.values.contains_key("health-addr"));
    // The keys are real flags: installing them as defaults must succeed and parse.
    lb_agent::cli::check_config_file(&file).expect("every key is a flag of lb-agent run");
}
