//! The Kubernetes objects of an lb installation, as k8s-openapi types. Each setting says why it is what it is;
//! `tests/capabilities.rs` runs the agent with exactly [`AGENT_CAPABILITIES`] (and without each of them).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, HostPathVolumeSource, Namespace, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceQuota, ResourceQuotaSpec, ResourceRequirements,
    ScopeSelector, ScopedResourceSelectorRequirement, SeccompProfile, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ApiServer, Document, Options, PROXY_LABEL, UninstallOptions};

pub const AGENT: &str = "lb-agent";
pub const CLEANUP: &str = "lb-cleanup";
/// kube-proxy's healthz port: kubelet probes it, and cloud load balancers probe it on the node IP for
/// `externalTrafficPolicy: Cluster` Services.
pub const HEALTH_PORT: u16 = 10256;
pub const METRICS_PORT: u16 = 9402;
/// The canary's health port: kube-proxy holds 10256 on the nodes where the canary runs. Not a port Kubernetes'
/// components use (kubelet 10248/10250/10255, kube-proxy 10249/10256, controller-manager 10257, cloud controller
/// 10258, scheduler 10259).
pub const CANARY_HEALTH_PORT: u16 = 10266;
pub const CANARY: &str = "lb-agent-canary";
/// The pods' label the metrics Service selects (both agents', not the cleanup's).
const METRICS_LABEL: &str = "lb.io/metrics";
/// The Linux capabilities the agent's container adds (after dropping all). `tests/capabilities.rs` proves the
/// list: the agent serves with exactly these, and fails where the kernel enforces each one without it.
///
/// - `SYS_ADMIN`: `bpf()` (the kernel accepts it in place of `CAP_BPF`, `CAP_PERFMON` and, for BPF program
///   types, `CAP_NET_ADMIN`), `setns` into pods' network namespaces to end sockets connected to a departed backend,
///   and mounting bpffs where the node has none.
/// - `NET_ADMIN`: sock_diag `SOCK_DESTROY` (ending those sockets) and tc qdiscs and filters (the clsact fallback).
pub const AGENT_CAPABILITIES: [&str; 2] = ["SYS_ADMIN", "NET_ADMIN"];
/// What `lb-agent cleanup` needs: removing pins is unlinking files lb's root owns (no capability), detaching the
/// clsact fallback's filters is netlink (`NET_ADMIN`).
pub const CLEANUP_CAPABILITIES: [&str; 1] = ["NET_ADMIN"];
/// Memory the agent is expected to use (the request): its peak resident set measured here (release build) is
/// 29.5 MiB with 10 Services, 32.6 MiB with 1000 and 192 MiB with 10000 (10 endpoints each; docs/operations.md), so
/// 128 MiB covers clusters up to about 6000 Services. No limit: a proxy killed for memory takes the node's Services with it
/// (kube-proxy sets none either).
pub const MEMORY_REQUEST: &str = "128Mi";
pub const CPU_REQUEST: &str = "100m";

const NAME_LABEL: &str = "app.kubernetes.io/name";
const COMPONENT_LABEL: &str = "app.kubernetes.io/component";

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_owned(), "lb".to_owned()),
        (COMPONENT_LABEL.to_owned(), component.to_owned()),
    ])
}

fn meta(name: &str, namespace: Option<&str>, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels(component)),
        ..ObjectMeta::default()
    }
}

fn to_value<T: serde::Serialize>(object: &T) -> serde_json::Value {
    // k8s-openapi's types serialize infallibly to JSON (plain structs of strings, numbers and maps).
    serde_json::to_value(object).unwrap_or(serde_json::Value::Null)
}

/// Every object of an installation, typed, in the order they are applied.
#[derive(Clone, Debug)]
pub struct Install {
    /// Only outside kube-system, which exists.
    pub namespace: Option<Namespace>,
    /// Outside kube-system: admits `system-node-critical` pods where the API server limits critical priority
    /// classes to namespaces with such a quota (GKE and clusters with `LimitedResources` configured).
    pub critical_pods_quota: Option<ResourceQuota>,
    pub service_account: ServiceAccount,
    pub cluster_role: ClusterRole,
    pub cluster_role_binding: ClusterRoleBinding,
    pub config_map: ConfigMap,
    /// lb alone on its nodes (every Linux node, or with `coexist_with_kube_proxy` those labelled `lb.io/proxy=lb`).
    pub daemon_set: DaemonSet,
    /// With `coexist_with_kube_proxy`: lb beside kube-proxy on the nodes labelled `lb.io/proxy=canary`.
    pub canary_daemon_set: Option<DaemonSet>,
    pub metrics_service: Option<Service>,
    /// `monitoring.coreos.com/v1` has no k8s-openapi type: a plain value.
    pub service_monitor: Option<serde_json::Value>,
    /// With the ServiceMonitor: lb's alerts (`deploy/monitoring/lb-prometheusrule.yaml`, in this namespace).
    pub prometheus_rule: Option<serde_json::Value>,
}

impl Install {
    pub fn new(opts: &Options) -> Install {
        let ns = opts.namespace.as_str();
        let kube_system = ns == super::DEFAULT_NAMESPACE;
        let metrics = opts.metrics || opts.service_monitor;
        Install {
            namespace: (!kube_system).then(|| namespace(ns)),
            critical_pods_quota: (!kube_system).then(|| critical_pods_quota(ns)),
            service_account: ServiceAccount {
                metadata: meta(AGENT, Some(ns), "agent"),
                ..ServiceAccount::default()
            },
            cluster_role: cluster_role(),
            cluster_role_binding: ClusterRoleBinding {
                metadata: meta(AGENT, None, "agent"),
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".to_owned()),
                    kind: "ClusterRole".to_owned(),
                    name: AGENT.to_owned(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".to_owned(),
                    name: AGENT.to_owned(),
                    namespace: Some(ns.to_owned()),
                    ..Subject::default()
                }]),
            },
            config_map: ConfigMap {
                metadata: meta(AGENT, Some(ns), "agent"),
                data: Some(config_files(opts, metrics)),
                ..ConfigMap::default()
            },
            daemon_set: agent_daemon_set(opts, Role::Alone, metrics),
            canary_daemon_set: opts
                .coexist_with_kube_proxy
                .then(|| agent_daemon_set(opts, Role::Canary, metrics)),
            metrics_service: opts.service_monitor.then(|| metrics_service(ns)),
            service_monitor: opts.service_monitor.then(|| service_monitor(ns)),
            prometheus_rule: opts.service_monitor.then(|| prometheus_rule(ns)).flatten(),
        }
    }

    /// The objects with a comment each, in apply order.
    pub fn documents(&self) -> Vec<Document> {
        let mut docs = Vec::new();
        let mut push = |comment: &str, object: serde_json::Value| {
            docs.push(Document {
                comment: comment.to_owned(),
                object,
            })
        };
        if let Some(ns) = &self.namespace {
            push(
                "The agent runs with the host's network and BPF capabilities: the namespace admits that.",
                to_value(ns),
            );
        }
        if let Some(q) = &self.critical_pods_quota {
            push(
                "Lets system-node-critical pods run in this namespace where the API server limits critical\n\
                 priority classes to namespaces with such a quota.",
                to_value(q),
            );
        }
        push(
            "The agent's identity towards the API server.",
            to_value(&self.service_account),
        );
        push(
            "Least privilege: get/list/watch on what a Service proxy reads (kube-proxy's own RBAC) and nothing\n\
             else. The agent writes no Kubernetes object. ServiceCIDRs (networking.k8s.io/v1, Kubernetes 1.33+)\n\
             let it drop traffic to unallocated ClusterIPs; on older clusters that watch only retries.",
            to_value(&self.cluster_role),
        );
        push("", to_value(&self.cluster_role_binding));
        push(
            "The agent's settings (`--config`), keyed by the long flags of `lb-agent run`.",
            to_value(&self.config_map),
        );
        let api = self.api_server_note();
        if self.canary_daemon_set.is_some() {
            push(
                &format!(
                    "lb alone: on the nodes labelled {PROXY_LABEL}=lb, where kube-proxy no longer runs.\nAPI \
                     server: {api}."
                ),
                to_value(&self.daemon_set),
            );
        } else {
            push(
                &format!("One agent per Linux node. API server: {api}."),
                to_value(&self.daemon_set),
            );
        }
        if let Some(canary) = &self.canary_daemon_set {
            push(
                &format!(
                    "The canary: lb beside kube-proxy on the nodes labelled {PROXY_LABEL}=canary. New connections\n\
                     go through lb, kube-proxy's keep theirs; kube-proxy keeps the health ports.\nAPI server: {api}."
                ),
                to_value(canary),
            );
        }
        if let Some(s) = &self.metrics_service {
            push(
                "Headless: gives the ServiceMonitor an endpoint per agent (the node's address).",
                to_value(s),
            );
        }
        if let Some(m) = &self.service_monitor {
            push(
                "For the Prometheus operator: scrape every agent's /metrics.",
                m.clone(),
            );
        }
        if let Some(r) = &self.prometheus_rule {
            push(
                "lb's alerts for the Prometheus operator; what each means and what to do: docs/observability.md.",
                r.clone(),
            );
        }
        docs
    }

    fn api_server_note(&self) -> String {
        self.daemon_set
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(API_SERVER_ANNOTATION))
            .cloned()
            .unwrap_or_default()
    }
}

/// The DaemonSet annotation saying where the API server address came from.
pub const API_SERVER_ANNOTATION: &str = "lb.io/api-server";

fn namespace(ns: &str) -> Namespace {
    let mut metadata = meta(ns, None, "agent");
    if let Some(l) = metadata.labels.as_mut() {
        l.insert(
            "pod-security.kubernetes.io/enforce".to_owned(),
            "privileged".to_owned(),
        );
    }
    Namespace {
        metadata,
        ..Namespace::default()
    }
}

fn critical_pods_quota(ns: &str) -> ResourceQuota {
    ResourceQuota {
        metadata: meta("lb-critical-pods", Some(ns), "agent"),
        spec: Some(ResourceQuotaSpec {
            hard: Some(BTreeMap::from([(
                "pods".to_owned(),
                Quantity("1000000".to_owned()),
            )])),
            scope_selector: Some(ScopeSelector {
                match_expressions: Some(vec![ScopedResourceSelectorRequirement {
                    operator: "In".to_owned(),
                    scope_name: "PriorityClass".to_owned(),
                    values: Some(vec!["system-node-critical".to_owned()]),
                }]),
            }),
            ..ResourceQuotaSpec::default()
        }),
        ..ResourceQuota::default()
    }
}

fn cluster_role() -> ClusterRole {
    let rule = |group: &str, resources: &[&str]| PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: ["get", "list", "watch"].map(str::to_owned).to_vec(),
        ..PolicyRule::default()
    };
    ClusterRole {
        metadata: meta(AGENT, None, "agent"),
        rules: Some(vec![
            rule("", &["services", "nodes"]),
            rule("discovery.k8s.io", &["endpointslices"]),
            rule("networking.k8s.io", &["servicecidrs"]),
        ]),
        ..ClusterRole::default()
    }
}

/// Which agent a DaemonSet runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The node's only Service proxy.
    Alone,
    /// Beside kube-proxy (the migration's canary).
    Canary,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Alone => AGENT,
            Role::Canary => CANARY,
        }
    }

    /// The pods' `app.kubernetes.io/component` (the DaemonSet selects on it: it must never change).
    fn component(self) -> &'static str {
        match self {
            Role::Alone => "agent",
            Role::Canary => "agent-canary",
        }
    }

    fn config_file(self) -> &'static str {
        match self {
            Role::Alone => "config.yaml",
            Role::Canary => "beside-kube-proxy.yaml",
        }
    }
}

/// The ConfigMap's files: `config.yaml` for lb alone, and with the migration `beside-kube-proxy.yaml` for the
/// canary.
fn config_files(opts: &Options, metrics: bool) -> BTreeMap<String, String> {
    let mut files = BTreeMap::from([(
        Role::Alone.config_file().to_owned(),
        agent_config(opts, Role::Alone, metrics),
    )]);
    if opts.coexist_with_kube_proxy {
        files.insert(
            Role::Canary.config_file().to_owned(),
            agent_config(opts, Role::Canary, metrics),
        );
    }
    files
}

/// The config file: kube-proxy's ports where kube-proxy is gone, so probes and firewall rules written for it keep
/// working; beside it, its health port left to it.
fn agent_config(opts: &Options, role: Role, metrics_on_all_addresses: bool) -> String {
    let metrics = if metrics_on_all_addresses {
        format!(
            "# Every address of the node, for Prometheus (restrict it with a firewall or NetworkPolicy if needed).\n\
             metrics-addr: 0.0.0.0:{METRICS_PORT}\n"
        )
    } else {
        format!(
            "# Loopback only, as kube-proxy's metrics (lb-agent manifests --metrics serves it on the node IP).\n\
             metrics-addr: 127.0.0.1:{METRICS_PORT}\n"
        )
    };
    let (health, migration) = match (role, opts.coexist_with_kube_proxy) {
        (Role::Canary, _) => (
            format!(
                "# kube-proxy runs on this node and holds 10256 (kubelet and cloud load balancers keep probing it).\n\
                 health-addr: 0.0.0.0:{}\n",
                opts.canary_health_port
            ),
            "# kube-proxy keeps the healthCheckNodePorts, and its connections their backend (untracked TCP passes).\n\
             coexist-with-kube-proxy: true\n"
                .to_owned(),
        ),
        (Role::Alone, coexist) => (
            format!(
                "# kube-proxy's healthz port on every address: kubelet probes it on the node IP (hostNetwork), and cloud\n\
                 # load balancers probe it for externalTrafficPolicy: Cluster Services, as they do kube-proxy's.\n\
                 health-addr: 0.0.0.0:{HEALTH_PORT}\n"
            ),
            if coexist {
                "# Connections kube-proxy set up before this node moved keep their backend (netfilter's conntrack\n\
                 # translates them until they end); render without --coexist-with-kube-proxy once they are gone.\n\
                 pass-untracked-tcp: true\n"
                    .to_owned()
            } else {
                String::new()
            },
        ),
    };
    format!(
        "# algorithm, maglev-min-size, maglev-max-size and log-level apply as soon as this ConfigMap changes;\n\
         # the agent logs any other change as needing a restart (kubectl rollout restart ds/{name}).\n\
         {health}\
         {metrics}\
         {migration}\
         algorithm: maglev\n\
         log-level: info\n\
         # 127.0.0.1:<nodePort> from the node itself, as kube-proxy's iptables mode (false: as its nftables mode).\n\
         localhost-nodeports: true\n\
         # The Service range, used only when the API has no ServiceCIDR object (Kubernetes < 1.33): addresses in it\n\
         # that no Service holds are dropped. Your --service-cluster-ip-range, e.g.:\n\
         # service-cidrs: [10.96.0.0/12]\n",
        name = role.name()
    )
}

fn host_path(name: &str, path: &str, ty: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        host_path: Some(HostPathVolumeSource {
            path: path.to_owned(),
            type_: Some(ty.to_owned()),
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool, propagation: Option<&str>) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        mount_propagation: propagation.map(str::to_owned),
        ..VolumeMount::default()
    }
}

/// No `privileged`: root with every capability dropped but `add`, no escalation, a read-only root.
fn container_security(add: &[&str]) -> SecurityContext {
    SecurityContext {
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_user: Some(0),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: Some(add.iter().map(|c| c.to_string()).collect()),
        }),
        ..SecurityContext::default()
    }
}

/// What every lb pod shares: host network, node-critical, every taint tolerated (like kube-proxy: Services must
/// work on every node, tainted or not), Linux nodes, the runtime's default seccomp profile.
fn node_pod_spec(node_selector: &BTreeMap<String, String>) -> PodSpec {
    let mut selector = BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]);
    selector.extend(node_selector.clone());
    PodSpec {
        // NodePorts, healthCheckNodePorts and the tc programs are on the node's own interfaces.
        host_network: Some(true),
        // The node's resolver: cluster DNS is itself a Service, which the agent has yet to program.
        dns_policy: Some("Default".to_owned()),
        priority_class_name: Some("system-node-critical".to_owned()),
        node_selector: Some(selector),
        tolerations: Some(vec![Toleration {
            operator: Some("Exists".to_owned()),
            ..Toleration::default()
        }]),
        security_context: Some(PodSecurityContext {
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, port: u16) -> HTTPGetAction {
    HTTPGetAction {
        path: Some(path.to_owned()),
        port: IntOrString::Int(i32::from(port)),
        ..HTTPGetAction::default()
    }
}

fn agent_daemon_set(opts: &Options, role: Role, metrics_on_all_addresses: bool) -> DaemonSet {
    let ns = opts.namespace.as_str();
    let health_port = match role {
        Role::Alone => HEALTH_PORT,
        Role::Canary => opts.canary_health_port,
    };
    let mut env_vars = Vec::new();
    if let ApiServer::Address { host, port, .. } = &opts.api_server {
        // Read by the in-cluster client in place of the `kubernetes` Service's ClusterIP, which only works once a
        // proxy on this node programs it.
        env_vars.push(env("KUBERNETES_SERVICE_HOST", host));
        env_vars.push(env("KUBERNETES_SERVICE_PORT", &port.to_string()));
    }
    env_vars.push(EnvVar {
        // Which endpoints are local, and this node's Node object (NodePort addresses, zone, pod CIDRs).
        name: "NODE_NAME".to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "spec.nodeName".to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    });
    let container = Container {
        name: AGENT.to_owned(),
        image: Some(opts.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(vec![
            "run".to_owned(),
            format!("--config=/etc/lb/{}", role.config_file()),
            "--log-format=json".to_owned(),
        ]),
        env: Some(env_vars),
        ports: Some(vec![
            ContainerPort {
                name: Some("healthz".to_owned()),
                container_port: i32::from(health_port),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".to_owned()),
                container_port: i32::from(METRICS_PORT),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
        ]),
        // /healthz fails only when a sync is stuck (restarting then helps); /readyz waits for the first sync.
        liveness_probe: Some(Probe {
            http_get: Some(http_probe("/healthz", health_port)),
            initial_delay_seconds: Some(10),
            period_seconds: Some(10),
            failure_threshold: Some(6),
            ..Probe::default()
        }),
        readiness_probe: Some(Probe {
            http_get: Some(http_probe("/readyz", health_port)),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity(CPU_REQUEST.to_owned())),
                ("memory".to_owned(), Quantity(MEMORY_REQUEST.to_owned())),
            ])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(container_security(&AGENT_CAPABILITIES)),
        volume_mounts: Some(vec![
            // The pins: maps and program links outlive the pod here, so a restarting agent leaves the node
            // serving. HostToContainer because Kubernetes allows Bidirectional only in privileged containers; the
            // node mounts bpffs (systemd does).
            mount("bpffs", "/sys/fs/bpf", false, Some("HostToContainer")),
            // The cgroup v2 root, where the socket-LB programs attach for the whole node.
            mount("cgroup", "/sys/fs/cgroup", true, None),
            // Pods' network namespaces (containerd and CRI-O pin them here): the agent enters them to end sockets
            // still connected to a departed backend. HostToContainer so that new pods' pins show up.
            mount("netns", "/run/netns", true, Some("HostToContainer")),
            mount("config", "/etc/lb", true, None),
        ]),
        ..Container::default()
    };
    let mut node_selector = opts.node_selector.clone();
    if opts.coexist_with_kube_proxy {
        let value = match role {
            Role::Alone => "lb",
            Role::Canary => "canary",
        };
        node_selector.insert(PROXY_LABEL.to_owned(), value.to_owned());
    }
    let mut pod = node_pod_spec(&node_selector);
    pod.service_account_name = Some(AGENT.to_owned());
    // Time for the old agent to finish a sync; the pinned datapath keeps serving either way.
    pod.termination_grace_period_seconds = Some(30);
    pod.containers = vec![container];
    pod.volumes = Some(vec![
        host_path("bpffs", "/sys/fs/bpf", "DirectoryOrCreate"),
        host_path("cgroup", "/sys/fs/cgroup", "Directory"),
        host_path("netns", "/run/netns", "DirectoryOrCreate"),
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: AGENT.to_owned(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]);
    let mut pod_labels = labels(role.component());
    pod_labels.insert(METRICS_LABEL.to_owned(), "true".to_owned());
    let mut pod_meta = ObjectMeta {
        labels: Some(pod_labels),
        ..ObjectMeta::default()
    };
    if metrics_on_all_addresses {
        pod_meta.annotations = Some(BTreeMap::from([
            ("prometheus.io/scrape".to_owned(), "true".to_owned()),
            ("prometheus.io/port".to_owned(), METRICS_PORT.to_string()),
        ]));
    }
    let mut metadata = meta(role.name(), Some(ns), role.component());
    metadata.annotations = Some(BTreeMap::from([(
        API_SERVER_ANNOTATION.to_owned(),
        opts.api_server.to_string(),
    )]));
    DaemonSet {
        metadata,
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels(role.component())),
                ..LabelSelector::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                // A restarting agent leaves its node serving (everything is pinned), so a rollout can move
                // faster than one node at a time; a release whose agents never get ready stops it at 10%.
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::String("10%".to_owned())),
                    ..RollingUpdateDaemonSet::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(pod_meta),
                spec: Some(pod),
            },
            ..DaemonSetSpec::default()
        },
        ..DaemonSet::default()
    }
}

fn metrics_service(ns: &str) -> Service {
    Service {
        metadata: meta("lb-agent-metrics", Some(ns), "agent"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(BTreeMap::from([
                (NAME_LABEL.to_owned(), "lb".to_owned()),
                (METRICS_LABEL.to_owned(), "true".to_owned()),
            ])),
            ports: Some(vec![ServicePort {
                name: Some("metrics".to_owned()),
                port: i32::from(METRICS_PORT),
                protocol: Some("TCP".to_owned()),
                target_port: Some(IntOrString::Int(i32::from(METRICS_PORT))),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn service_monitor(ns: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": to_value(&meta(AGENT, Some(ns), "agent")),
        "spec": {
            "selector": {"matchLabels": labels("agent")},
            "namespaceSelector": {"matchNames": [ns]},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}],
        },
    })
}

/// The alerts of `deploy/monitoring/` (one file, which `lb-agent/tests/monitoring.rs` checks against the exported
/// metrics), moved to `ns`. `None` only if that file stopped parsing, which `deploy_manifests.rs` catches.
fn prometheus_rule(ns: &str) -> Option<serde_json::Value> {
    const RULE: &str = include_str!("../../../deploy/monitoring/lb-prometheusrule.yaml");
    let mut rule: serde_json::Value = serde_saphyr::from_str(RULE).ok()?;
    rule.get_mut("metadata")?
        .as_object_mut()?
        .insert("namespace".to_owned(), ns.into());
    Some(rule)
}

/// The cleanup DaemonSet of `lb-agent manifests --uninstall`: on every node, an init container runs `lb-agent
/// cleanup` (after kube-proxy answers, unless told not to wait) and a sleeping container then keeps the pod Running,
/// so `kubectl rollout status ds/lb-cleanup` returns once every node is clean and `kubectl get pods -o wide` shows
/// which are.
pub fn cleanup_daemon_set(opts: &UninstallOptions) -> DaemonSet {
    let mut args = vec!["cleanup".to_owned()];
    if opts.wait_for_kube_proxy {
        args.push("--wait-for-kube-proxy".to_owned());
    }
    let cleanup = Container {
        name: "cleanup".to_owned(),
        image: Some(opts.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(args),
        security_context: Some(container_security(&CLEANUP_CAPABILITIES)),
        volume_mounts: Some(vec![mount(
            "bpffs",
            "/sys/fs/bpf",
            false,
            Some("HostToContainer"),
        )]),
        ..Container::default()
    };
    let done = Container {
        name: "done".to_owned(),
        image: Some(opts.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["sleep".to_owned(), "infinity".to_owned()]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("1m".to_owned())),
                ("memory".to_owned(), Quantity("8Mi".to_owned())),
            ])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(container_security(&[])),
        ..Container::default()
    };
    let mut pod = node_pod_spec(&opts.node_selector);
    // It reads nothing from the API.
    pod.automount_service_account_token = Some(false);
    pod.init_containers = Some(vec![cleanup]);
    pod.containers = vec![done];
    pod.volumes = Some(vec![host_path("bpffs", "/sys/fs/bpf", "DirectoryOrCreate")]);
    DaemonSet {
        metadata: meta(CLEANUP, Some(&opts.namespace), "cleanup"),
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels("cleanup")),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels("cleanup")),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DaemonSetSpec::default()
        },
        ..DaemonSet::default()
    }
}

/// The documents of `--uninstall`.
pub fn uninstall_documents(opts: &UninstallOptions) -> Vec<Document> {
    let wait = if opts.wait_for_kube_proxy {
        "Each node is cleaned only once kube-proxy answers on its health port (127.0.0.1:10256), so no node\n\
         is ever left without a proxy."
    } else {
        "It does not wait for kube-proxy: a node is left without a Service proxy from its cleanup on."
    };
    vec![Document {
        comment: format!(
            "Removes lb from every node: detaches its programs and unpins its maps (`lb-agent cleanup`). Apply\n\
             after deleting the lb-agent DaemonSet(s); done when `kubectl -n {} rollout status ds/{CLEANUP}`\n\
             returns. Then delete this DaemonSet.\n{wait}",
            opts.namespace
        ),
        object: to_value(&cleanup_daemon_set(opts)),
    }]
}
