//! `lb-agent run`: its flags, turned into the agent's configuration; the daemon itself is `crate::agent`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::agent::{AgentConfig, SourceConfig};
use crate::datapath::pins::Capacities;
use crate::datapath::tc_attach::TcAttachMode;
use crate::datapath::xdp_attach::XdpModeChoice;
use crate::install::objects::{CANARY_HEALTH_PORT, HEALTH_PORT};
use crate::model::NodePortAddresses;
use crate::ops::OpsConfig;
use crate::ops::metrics::ServiceMetrics;
use crate::source::kube::{self, Connection};
use crate::state::Algorithm;

use super::args::PinArgs;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Kubernetes YAML to serve (a file, or a directory of *.yaml / *.yml / *.json): Services, EndpointSlices and
    /// Nodes. Re-read whenever it changes. The default source outside a cluster.
    #[arg(long, env = "LB_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Watch the API server named by this kubeconfig (its current context) instead of manifest files. Inside a pod
    /// (`KUBERNETES_SERVICE_HOST` set) the service account is used when neither this nor --manifests is given.
    #[arg(long, env = "LB_KUBECONFIG", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// This node's name: picks its Node object and decides which endpoints are local.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// cgroup v2 directory the socket-LB programs attach to [default: the cgroup v2 root, i.e. the whole node].
    #[arg(long, env = "LB_CGROUP")]
    cgroup: Option<PathBuf>,
    #[command(flatten)]
    pins: PinArgs,
    #[command(flatten)]
    ops: OpsArgs,
    /// eBPF object to load instead of the one embedded at build time.
    #[arg(long, env = "LB_BPF_OBJECT")]
    bpf_object: Option<PathBuf>,
    /// Backend selection for Services without the `lb.io/algorithm` annotation.
    #[arg(long, default_value = "maglev", env = "LB_ALGORITHM")]
    algorithm: Algorithm,
    /// NodePort addresses when no Node object for this node is given (repeatable) [default: the host's own
    /// addresses].
    #[arg(
        long = "node-address",
        env = "LB_NODE_ADDRESSES",
        value_delimiter = ','
    )]
    node_addresses: Vec<IpAddr>,
    /// Service CIDRs (the cluster's `--service-cluster-ip-range`, comma-separated or repeated) to use when the API
    /// server or the manifests hold no `networking.k8s.io/v1` ServiceCIDR object. An address inside one that no
    /// Service holds (say, a deleted Service's ClusterIP) is dropped: from the wire at tc ingress, and at the
    /// socket by failing `connect()`/`sendmsg()` with EPERM. Empty (the default) and no ServiceCIDR objects: no such
    /// drop.
    #[arg(
        long = "service-cidrs",
        env = "LB_SERVICE_CIDRS",
        value_delimiter = ',',
        value_parser = super::args::parse_cidr_arg
    )]
    service_cidrs: Vec<(IpAddr, u8)>,
    /// Serve `localhost:nodePort` (IPv4 `127.0.0.0/8`, as kube-proxy's iptables mode does with
    /// `--iptables-localhost-nodeports`, whose default this follows) to processes in the agent's own network
    /// namespace, i.e. the host's with `hostNetwork`. Never for IPv6, never for pods (a pod's 127.0.0.1 is its
    /// own loopback). `false` behaves like kube-proxy's nftables mode. Needs a restart.
    #[arg(long, env = "LB_LOCALHOST_NODEPORTS", default_value_t = true, action = clap::ArgAction::Set)]
    localhost_nodeports: bool,
    /// Which node addresses serve NodePorts, as kube-proxy's flag: CIDRs (the host's addresses inside them, from
    /// `--node-address` when given; a family without a CIDR here serves on all of its addresses), or `primary`
    /// (the Node object's primary address per family: kube-proxy's nftables-mode default, and lb's; iptables and
    /// ipvs modes default to every local address, `0.0.0.0/0,::/0`). With CIDRs, `localhost:nodePort` is served
    /// only if they cover 127.0.0.1, as in kube-proxy's iptables mode. Needs a restart.
    #[arg(
        long = "nodeport-addresses",
        env = "LB_NODEPORT_ADDRESSES",
        value_delimiter = ','
    )]
    nodeport_addresses: Vec<String>,
    /// kube-proxy's local-traffic detection: accepted for compatibility, and checked as kube-proxy checks it. lb
    /// needs none of its modes: its socket-level programs see every socket of this node's pods and processes, so
    /// their traffic is known local by where it comes from, whatever its address or interface; packets arriving on
    /// the tc devices count as local when they come from this node's podCIDRs or addresses (what `NodeCIDR` means).
    /// docs/kube-proxy-flags.md says what each mode becomes.
    #[arg(long, env = "LB_DETECT_LOCAL_MODE", value_enum, default_value_t = DetectLocalMode::NodeCIDR)]
    detect_local_mode: DetectLocalMode,
    /// The cluster's pod CIDRs (kube-proxy's `--cluster-cidr`, comma-separated): checked, and used by no mode of lb
    /// (see --detect-local-mode).
    #[arg(
        long = "cluster-cidr",
        env = "LB_CLUSTER_CIDR",
        value_delimiter = ',',
        value_parser = super::args::parse_cidr_arg
    )]
    cluster_cidr: Vec<(IpAddr, u8)>,
    /// kube-proxy's `--pod-bridge-interface` (required by `--detect-local-mode BridgeInterface`).
    #[arg(long, env = "LB_POD_BRIDGE_INTERFACE")]
    pod_bridge_interface: Option<String>,
    /// kube-proxy's `--pod-interface-name-prefix` (required by `--detect-local-mode InterfaceNamePrefix`).
    #[arg(long, env = "LB_POD_INTERFACE_NAME_PREFIX")]
    pod_interface_name_prefix: Option<String>,
    /// Size the conntrack map as kube-proxy sizes netfilter's: room for max(this x CPUs, --conntrack-min)
    /// connections, two entries each (a source-NATed flow takes four). 0 (the default) leaves it to
    /// --max-conntrack; otherwise --max-conntrack is ignored. netfilter's own `nf_conntrack_max` is not touched: lb
    /// does not use netfilter's conntrack. Needs a restart.
    #[arg(long, env = "LB_CONNTRACK_MAX_PER_CORE", default_value_t = 0)]
    conntrack_max_per_core: u32,
    /// The fewest connections the conntrack map holds when --conntrack-max-per-core is set (kube-proxy's default).
    #[arg(long, env = "LB_CONNTRACK_MIN", default_value_t = 131072)]
    conntrack_min: u32,
    /// How long an idle established TCP connection keeps its conntrack entries (and so its backend and source-NAT
    /// port), as kube-proxy's flag (a Go duration; `0`: the default, 24h0m0s as on a kube-proxy node). Applies to
    /// connections established after the agent starts. lb's per-packet conntrack only: netfilter's is not touched.
    #[arg(long, env = "LB_CONNTRACK_TCP_TIMEOUT_ESTABLISHED", default_value = "0", value_parser = super::args::parse_timeout_secs)]
    conntrack_tcp_timeout_established: u32,
    /// How long an idle TCP connection that one side has closed (FIN) while the other has not keeps its entries, as
    /// kube-proxy's flag (`0`: the default, 1h0m0s). Closed both ways, or reset: 10 s.
    #[arg(long, env = "LB_CONNTRACK_TCP_TIMEOUT_CLOSE_WAIT", default_value = "0", value_parser = super::args::parse_timeout_secs)]
    conntrack_tcp_timeout_close_wait: u32,
    /// How long an idle UDP flow whose backend has not answered keeps its entries, as kube-proxy's flag (`0`: the
    /// default, 30s, netfilter's).
    #[arg(long, env = "LB_CONNTRACK_UDP_TIMEOUT", default_value = "0", value_parser = super::args::parse_timeout_secs)]
    conntrack_udp_timeout: u32,
    /// How long an idle UDP flow whose backend has answered keeps its entries, as kube-proxy's flag (`0`: the
    /// default, 120s, netfilter's).
    #[arg(long, env = "LB_CONNTRACK_UDP_TIMEOUT_STREAM", default_value = "0", value_parser = super::args::parse_timeout_secs)]
    conntrack_udp_timeout_stream: u32,
    /// Only proxy Services labelled `service.kubernetes.io/service-proxy-name=<this>` (kube-proxy's flag).
    #[arg(long, env = "LB_SERVICE_PROXY_NAME")]
    service_proxy_name: Option<String>,
    /// Smallest Maglev table (a prime from the built-in list); tables hold at least 100 slots per backend.
    #[arg(long, default_value_t = 251)]
    maglev_min_size: u32,
    /// Largest Maglev table.
    #[arg(long, default_value_t = 16381)]
    maglev_max_size: u32,
    /// Capacity of the services map (frontends x scopes) and of the per-service tables.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Capacity of the backends map.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Capacity of the session-affinity map (LRU).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_AFFINITY)]
    max_affinity: u32,
    /// Capacity of the socket reverse-translation map (LRU; one entry per load-balanced socket).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SOCK_REVNAT)]
    max_sock_revnat: u32,
    /// Capacity of the tc datapath's conntrack map (LRU; two entries per flow, four with SNAT). The default holds
    /// 131072 connections, kube-proxy's `--conntrack-min`.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_CONNTRACK)]
    max_conntrack: u32,
    /// Capacity of the tc datapath's fragment map (LRU; one entry per fragmented datagram in flight whose first
    /// fragment was translated, kept for its later fragments).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_FRAGMENTS)]
    max_fragments: u32,
    /// External interfaces for the per-packet programs (NodePort, LoadBalancer, externalIPs, ClusterIP from the
    /// wire) [default: the interfaces carrying the node addresses (--node-address, else the host's)]. `none`
    /// attaches nothing.
    #[arg(long, env = "LB_DEVICES", value_delimiter = ',')]
    devices: Vec<String>,
    /// Attach the XDP fast path (`lb_xdp`) to the same devices: loadBalancerSourceRanges drops before the stack,
    /// and established NodePort/LoadBalancer/externalIP flows to remote backends (DNAT + SNAT) translated and sent
    /// back out by XDP; everything else, and every new flow's first packets, still goes through tc. Needs a restart.
    #[arg(long, env = "LB_XDP")]
    xdp: bool,
    /// XDP attach mode: auto (native where the driver supports it, else generic; the log says which per device),
    /// native (driver mode or fail), generic (SKB mode).
    #[arg(long, value_enum, default_value = "auto", env = "LB_XDP_MODE")]
    xdp_mode: XdpModeChoice,
    /// Seconds between conntrack garbage collections (expired entries, entries of deleted services).
    #[arg(long, default_value_t = 30)]
    conntrack_gc_interval: u64,
    /// How the per-packet programs attach to `--devices`: `auto` (tcx links, the clsact qdisc only where tcx is
    /// unavailable), `tcx` (fail rather than fall back), or `clsact` (netlink filters on the clsact qdisc even where
    /// tcx works: for hosts whose tooling expects them, and to exercise the fallback).
    #[arg(long, env = "LB_TC_ATTACH", value_enum, default_value_t = TcAttachMode::Auto)]
    tc_attach: TcAttachMode,
    /// kube-proxy also runs on this node (a canary during the migration, or on the way back): leave the
    /// `healthCheckNodePort`s to it (both cannot listen there), and `--pass-untracked-tcp`. Give `--health-addr`
    /// another port than kube-proxy's 10256. Needs a restart.
    #[arg(long, env = "LB_COEXIST_WITH_KUBE_PROXY")]
    coexist_with_kube_proxy: bool,
    /// At tc ingress, leave a TCP packet to a Service alone when it is not a SYN and lb tracks no flow for it: it
    /// belongs to a connection netfilter translated (kube-proxy, before lb ran on this node), which lb would
    /// otherwise send to its own choice of backend and so reset. Only lb's own flows and new connections are
    /// balanced. UDP cannot be told apart: a datagram of such a flow is balanced by lb like a new one. Needs a
    /// restart.
    #[arg(long, env = "LB_PASS_UNTRACKED_TCP")]
    pass_untracked_tcp: bool,
}

/// `lb-agent run`'s operational flags.
#[derive(clap::Args, Debug, Clone)]
pub struct OpsArgs {
    /// Address of `/healthz` (liveness) and `/readyz` (ready after the first full sync) [default: 0.0.0.0:10256,
    /// kube-proxy's: cloud load balancers probe it on the node's IP for `externalTrafficPolicy: Cluster` Services;
    /// 0.0.0.0:10266 with --coexist-with-kube-proxy, as kube-proxy holds 10256]. Port 0 picks a free port (logged).
    #[arg(long, env = "LB_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
    /// Address of the Prometheus `/metrics` endpoint (port 0: a free port, logged).
    #[arg(long, default_value = "127.0.0.1:9402", env = "LB_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Addresses the `healthCheckNodePort` servers listen on (comma-separated). The cloud load balancer probes
    /// them on the node's IP, so the default is every address.
    #[arg(
        long,
        default_value = "0.0.0.0",
        env = "LB_HEALTH_CHECK_NODE_PORT_ADDRESSES",
        value_delimiter = ','
    )]
    pub health_check_node_port_addresses: Vec<IpAddr>,
    /// Per-Service detail of the datapath counters on `/metrics`: `off` (node-wide totals only: no series grows
    /// with the number of Services), `per-service` (5 series per Service, summed over its ports and VIPs), or
    /// `per-frontend` (5 per frontend plus 3 per backend, labelled with addresses that change with every pod: for
    /// debugging one node). See docs/observability.md.
    #[arg(long, value_enum, default_value_t = ServiceMetrics::Off, env = "LB_SERVICE_METRICS")]
    pub service_metrics: ServiceMetrics,
}

/// kube-proxy's `--detect-local-mode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectLocalMode {
    #[value(name = "ClusterCIDR")]
    ClusterCIDR,
    #[value(name = "NodeCIDR")]
    NodeCIDR,
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    if let Some(file) = crate::ops::config::startup().file
        && let Some(ignored) = &file.kube_proxy_ignored
    {
        tracing::info!(
            file = %file.path.display(),
            settings = ?file.values,
            "kube-proxy KubeProxyConfiguration read as these lb settings (a flag or environment variable beats each)"
        );
        if !ignored.is_empty() {
            tracing::warn!(
                file = %file.path.display(),
                ?ignored,
                "kube-proxy settings lb does not apply (docs/kube-proxy-flags.md says why for each)"
            );
        }
    }
    let (config, notes) = agent_config_with_notes(args)?;
    for note in notes {
        tracing::info!("{note}");
    }
    crate::agent::run(config)
}

/// The agent's configuration from the flags (see [`agent_config_with_notes`]).
pub(super) fn agent_config(args: RunArgs) -> anyhow::Result<AgentConfig> {
    agent_config_with_notes(args).map(|(config, _)| config)
}

/// What the kube-proxy settings given become in lb, for the start-up log: one line each.
fn kube_proxy_notes(args: &RunArgs, conntrack: Option<u32>) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    let by_origin = "lb knows this node's pods and processes as local by where their traffic comes from (its \
                     socket-level programs see every socket on the node), and counts packets on its tc devices from \
                     this node's podCIDRs and addresses as local";
    match args.detect_local_mode {
        DetectLocalMode::NodeCIDR => {}
        DetectLocalMode::ClusterCIDR => notes.push(format!(
            "--detect-local-mode ClusterCIDR (cluster CIDRs {:?}): {by_origin}; the cluster CIDR is not used, as \
             other nodes' pods reaching this node through the wire are external here (source-NATed when their \
             backend is on another node, so that the reply comes back)",
            args.cluster_cidr
        )),
        DetectLocalMode::BridgeInterface => {
            let Some(bridge) = args.pod_bridge_interface.as_deref().filter(|b| !b.is_empty()) else {
                anyhow::bail!("--detect-local-mode BridgeInterface needs --pod-bridge-interface");
            };
            notes.push(format!(
                "--detect-local-mode BridgeInterface ({bridge}): {by_origin}; the bridge name is not needed"
            ));
        }
        DetectLocalMode::InterfaceNamePrefix => {
            let Some(prefix) = args.pod_interface_name_prefix.as_deref().filter(|p| !p.is_empty()) else {
                anyhow::bail!("--detect-local-mode InterfaceNamePrefix needs --pod-interface-name-prefix");
            };
            notes.push(format!(
                "--detect-local-mode InterfaceNamePrefix ({prefix}): {by_origin}; the interface names are not needed"
            ));
        }
    }
    if let Some(entries) = conntrack {
        notes.push(format!(
            "conntrack map: {entries} entries (2 per connection for max(--conntrack-max-per-core {} x {} CPUs, \
             --conntrack-min {})); --max-conntrack {} ignored",
            args.conntrack_max_per_core,
            cpus(),
            args.conntrack_min,
            args.max_conntrack
        ));
    }
    Ok(notes)
}

/// The CPUs this process may run on (as Go's `runtime.NumCPU`, which kube-proxy multiplies).
fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// kube-proxy's conntrack sizing (`getConntrackMax`) as lb's map capacity: `None` when `max_per_core` is 0 (leave
/// it), else two entries for each of max(max_per_core x cpus, min) connections.
fn conntrack_capacity(max_per_core: u32, min: u32, cpus: u32) -> Option<u32> {
    (max_per_core > 0).then(|| max_per_core.saturating_mul(cpus).max(min).saturating_mul(2))
}

/// The agent's configuration from the flags, and what the kube-proxy settings among them became (for the log).
/// Where the objects come from: `--manifests` or `--kubeconfig` as given; with neither, the in-cluster config
/// inside a pod (as kube-proxy defaults to it), else an error: the standalone agent needs to be told what to serve.
fn agent_config_with_notes(args: RunArgs) -> anyhow::Result<(AgentConfig, Vec<String>)> {
    let nodeport_addresses =
        NodePortAddresses::parse(&args.nodeport_addresses).map_err(anyhow::Error::msg)?;
    let conntrack = conntrack_capacity(args.conntrack_max_per_core, args.conntrack_min, cpus());
    let mut notes = kube_proxy_notes(&args, conntrack)?;
    // kube-proxy's iptables mode serves localhost:nodePort only where --nodeport-addresses covers 127.0.0.1.
    let localhost_nodeports = args.localhost_nodeports && nodeport_addresses.allows_ipv4_loopback();
    if args.localhost_nodeports && !localhost_nodeports {
        notes.push(
            "localhost:nodePort not served: --nodeport-addresses does not cover 127.0.0.1 (as kube-proxy)".into(),
        );
    }
    let health_addr = args.ops.health_addr.unwrap_or_else(|| {
        let port = if args.coexist_with_kube_proxy {
            CANARY_HEALTH_PORT
        } else {
            HEALTH_PORT
        };
        SocketAddr::from(([0, 0, 0, 0], port))
    });
    let source = match (args.manifests, args.kubeconfig) {
        (Some(m), None) => SourceConfig::Manifests(m),
        (None, Some(k)) => SourceConfig::Kube(Connection::Kubeconfig(k)),
        (Some(_), Some(_)) => {
            anyhow::bail!("give either --manifests or --kubeconfig, not both")
        }
        (None, None) if kube::in_cluster() => SourceConfig::Kube(Connection::InCluster),
        (None, None) => anyhow::bail!(
            "nothing to serve: give --manifests <file|dir> or --kubeconfig <file> (inside a pod the service account is used)"
        ),
    };
    // No devices given: the interfaces carrying the node addresses; `none` given: none at all.
    let devices = (!args.devices.is_empty()).then(|| {
        args.devices
            .into_iter()
            .filter(|d| d != "none")
            .collect::<Vec<_>>()
    });
    let config = AgentConfig {
        source,
        node_name: args.node_name,
        cgroup: args.cgroup,
        pins: args.pins.bpffs,
        ops: OpsConfig {
            health_addr,
            metrics_addr: args.ops.metrics_addr,
            // Beside kube-proxy, it serves the healthCheckNodePorts (and would make every bind fail).
            health_check_node_port_addresses: if args.coexist_with_kube_proxy {
                Vec::new()
            } else {
                args.ops.health_check_node_port_addresses
            },
            service_metrics: args.ops.service_metrics,
        },
        bpf_object: args.bpf_object,
        algorithm: args.algorithm,
        node_addresses: args.node_addresses,
        service_cidrs: args.service_cidrs,
        nodeport_addresses,
        localhost_nodeports,
        service_proxy_name: args.service_proxy_name,
        maglev_min_size: args.maglev_min_size,
        maglev_max_size: args.maglev_max_size,
        capacities: Capacities {
            services: args.max_services,
            backends: args.max_backends,
            affinity: args.max_affinity,
            sock_revnat: args.max_sock_revnat,
            conntrack: conntrack.unwrap_or(args.max_conntrack),
            fragments: args.max_fragments,
            xdp: args.xdp,
        },
        devices,
        xdp: args.xdp,
        xdp_mode: args.xdp_mode,
        conntrack_gc_interval: Duration::from_secs(args.conntrack_gc_interval),
        tc_attach: args.tc_attach,
        pass_untracked_tcp: args.pass_untracked_tcp || args.coexist_with_kube_proxy,
        ct_lifetimes: lb_common::CtLifetimes {
            tcp_established_s: args.conntrack_tcp_timeout_established,
            tcp_close_wait_s: args.conntrack_tcp_timeout_close_wait,
            udp_s: args.conntrack_udp_timeout,
            udp_stream_s: args.conntrack_udp_timeout_stream,
        },
    };
    Ok((config, notes))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::ops::config::parse;

    fn config(args: &[&str], file: &str) -> anyhow::Result<AgentConfig> {
        let file = parse(Path::new("kube-proxy.yaml"), file).expect("parse");
        let args: Vec<&str> = ["--manifests", "/dev/null"]
            .iter()
            .chain(args)
            .copied()
            .collect();
        super::super::run_config(&args, Some(&file))
    }

    #[test]
    fn kube_proxy_settings_reach_the_agent_config_and_flags_beat_the_file() {
        let kube_proxy = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                          mode: nftables\nnodePortAddresses: [10.0.0.0/8]\nhealthzBindAddress: 0.0.0.0:10300\n\
                          conntrack: {maxPerCore: 1000, min: 5000}\nhostnameOverride: worker-7\n";
        let c = config(&[], kube_proxy).expect("config");
        assert_eq!(
            c.nodeport_addresses,
            NodePortAddresses::Cidrs(vec![("10.0.0.0".parse().expect("ip"), 8)])
        );
        assert_eq!(c.ops.health_addr, "0.0.0.0:10300".parse().expect("addr"));
        assert_eq!(c.node_name.as_deref(), Some("worker-7"));
        assert!(
            !c.localhost_nodeports,
            "nftables mode: no localhost:nodePort"
        );
        assert_eq!(
            c.capacities.conntrack,
            2 * (1000 * cpus()).max(5000),
            "two entries per connection"
        );

        let c = config(
            &[
                "--nodeport-addresses",
                "primary",
                "--health-addr",
                "127.0.0.1:1",
                "--node-name",
                "x",
            ],
            kube_proxy,
        )
        .expect("config");
        assert_eq!(
            c.nodeport_addresses,
            NodePortAddresses::Primary,
            "flag beats file"
        );
        assert_eq!(c.ops.health_addr, "127.0.0.1:1".parse().expect("addr"));
        assert_eq!(c.node_name.as_deref(), Some("x"));
    }

    #[test]
    fn defaults_follow_kube_proxy() {
        let c = config(&[], "").expect("config");
        assert_eq!(c.ops.health_addr, "0.0.0.0:10256".parse().expect("addr"));
        assert_eq!(c.nodeport_addresses, NodePortAddresses::Primary);
        assert!(c.localhost_nodeports);
        assert_eq!(c.capacities.conntrack, lb_common::DEFAULT_MAX_CONNTRACK);
        let c = config(&["--coexist-with-kube-proxy"], "").expect("config");
        assert_eq!(
            c.ops.health_addr,
            "0.0.0.0:10266".parse().expect("addr"),
            "beside kube-proxy, off its port"
        );
        let c = config(&["--nodeport-addresses", "192.168.0.0/16"], "").expect("config");
        assert!(!c.localhost_nodeports, "the CIDRs do not cover 127.0.0.1");
        let c =
            config(&["--nodeport-addresses", "127.0.0.0/8,192.168.0.0/16"], "").expect("config");
        assert!(c.localhost_nodeports);
    }

    #[test]
    fn conntrack_sizing_is_kube_proxys_in_entries() {
        assert_eq!(conntrack_capacity(0, 131072, 64), None, "0 leaves it");
        assert_eq!(
            conntrack_capacity(32768, 131072, 2),
            Some(262144),
            "the minimum wins"
        );
        assert_eq!(conntrack_capacity(32768, 131072, 16), Some(1048576));
        assert_eq!(
            conntrack_capacity(u32::MAX, 0, 4),
            Some(u32::MAX),
            "saturates"
        );
    }

    #[test]
    fn local_detection_modes_are_checked_as_kube_proxy_checks_them() {
        for (args, fails) in [
            (&["--detect-local-mode", "BridgeInterface"][..], true),
            (
                &[
                    "--detect-local-mode",
                    "BridgeInterface",
                    "--pod-bridge-interface",
                    "cni0",
                ],
                false,
            ),
            (&["--detect-local-mode", "InterfaceNamePrefix"], true),
            (
                &[
                    "--detect-local-mode",
                    "InterfaceNamePrefix",
                    "--pod-interface-name-prefix",
                    "veth",
                ],
                false,
            ),
            (
                &[
                    "--detect-local-mode",
                    "ClusterCIDR",
                    "--cluster-cidr",
                    "10.244.0.0/16,fd00:244::/56",
                ],
                false,
            ),
            (
                &[
                    "--detect-local-mode",
                    "ClusterCIDR",
                    "--cluster-cidr",
                    "10.244.0.0",
                ],
                true,
            ),
            (&["--detect-local-mode", "clustercidr"], true),
            (&["--nodeport-addresses", "primary,10.0.0.0/8"], true),
        ] {
            assert_eq!(config(args, "").is_err(), fails, "{args:?}");
        }
    }
}
